"""Every registered network with the paper's figures for it (Table 1, Table 6; reference/resnet-paper.md).

Plain nets have no shortcut parameters, so the paper's parameter count for them is that of the option-A
residual net of the same depth (Sec. 4.1: "no extra parameter"), which for ResNet-18/34 is within 2% of the
option-B figure in Table 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from trainer.models.resnet import BasicBlock, Bottleneck, ResNet


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., nn.Module]
    dataset: str  # "imagenet" or "cifar10": fixes the input size the figures refer to
    paper_params: float
    paper_macs: float | None  # multiply-adds at 224x224 (ImageNet); the paper gives none for CIFAR

    @property
    def image_size(self) -> int:
        return 224 if self.dataset == "imagenet" else 32


_REGISTRY: dict[str, ModelSpec] = {}

IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_WIDTHS = (16, 32, 64)


def _imagenet(block: type[BasicBlock | Bottleneck], blocks: tuple[int, ...], residual: bool) -> Callable[..., ResNet]:
    def build(*, num_classes: int = 1000, shortcut: str = "B", **overrides: Any) -> ResNet:
        return ResNet(
            block,
            blocks,
            widths=IMAGENET_WIDTHS,
            num_classes=num_classes,
            shortcut=shortcut,
            residual=residual,
            **overrides,
        )

    return build


def _cifar(default_depth: int, residual: bool) -> Callable[..., ResNet]:
    def build(*, depth: int = default_depth, num_classes: int = 10, shortcut: str = "A", **overrides: Any) -> ResNet:
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a CIFAR-10 net has 6n+2 layers (20, 32, 44, 56, 110, 1202, ...), got depth={depth}")
        n = (depth - 2) // 6
        return ResNet(
            BasicBlock,
            (n, n, n),
            widths=CIFAR_WIDTHS,
            cifar_stem=True,
            num_classes=num_classes,
            shortcut=shortcut,
            residual=residual,
            **overrides,
        )

    return build


def _register(name: str, build: Callable[..., nn.Module], dataset: str, params: float, macs: float | None) -> None:
    _REGISTRY[name] = ModelSpec(name, build, dataset, params, macs)


for _depth, _block, _blocks, _params, _macs in [
    (18, BasicBlock, (2, 2, 2, 2), 11.7e6, 1.8e9),
    (34, BasicBlock, (3, 4, 6, 3), 21.8e6, 3.6e9),
    (50, Bottleneck, (3, 4, 6, 3), 25.6e6, 3.8e9),
    (101, Bottleneck, (3, 4, 23, 3), 44.5e6, 7.6e9),
    (152, Bottleneck, (3, 8, 36, 3), 60.2e6, 11.3e9),
]:
    _register(f"resnet{_depth}", _imagenet(_block, _blocks, residual=True), "imagenet", _params, _macs)
    if _depth in (18, 34):
        _register(f"plain{_depth}", _imagenet(_block, _blocks, residual=False), "imagenet", _params, _macs)

for _depth, _params in [(20, 0.27e6), (32, 0.46e6), (44, 0.66e6), (56, 0.85e6), (110, 1.7e6), (1202, 19.4e6)]:
    _register(f"resnet{_depth}", _cifar(_depth, residual=True), "cifar10", _params, None)
    if _depth <= 56:
        _register(f"plain{_depth}", _cifar(_depth, residual=False), "cifar10", _params, None)


def list_models() -> list[str]:
    return list(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(_REGISTRY)}") from None


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model; overrides: num_classes, shortcut ("A"/"B"/"C"), stride_in_1x1, zero_init_residual,
    and depth (any 6n+2) for the CIFAR-10 nets."""
    return get_model_spec(name).build(**overrides)
