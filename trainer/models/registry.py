"""Every registered network with the paper's figures for it (He et al., "Deep Residual Learning for Image
Recognition", 2016: Table 1, Table 6).

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
from trainer.models.table import CIFAR_NETS, CIFAR_PLAIN, IMAGENET_NETS, IMAGENET_PLAIN


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


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
for _depth, _block, _blocks, _params, _macs in IMAGENET_NETS:
    _register(f"resnet{_depth}", _imagenet(BLOCKS[_block], _blocks, residual=True), "imagenet", _params, _macs)
    if _depth in IMAGENET_PLAIN:
        _register(f"plain{_depth}", _imagenet(BLOCKS[_block], _blocks, residual=False), "imagenet", _params, _macs)

for _depth, _params in CIFAR_NETS:
    _register(f"resnet{_depth}", _cifar(_depth, residual=True), "cifar10", _params, None)
    if _depth in CIFAR_PLAIN:
        _register(f"plain{_depth}", _cifar(_depth, residual=False), "cifar10", _params, None)


# Validation errors (%) the paper reports, as (top-1, top-5; None where it gives none), per protocol: ImageNet
# 10-crop (Tables 2, 3) and multi-scale (Table 4), CIFAR-10 on the original test image (Table 6). ResNet-34 has a
# row per shortcut option; the other ImageNet ResNets use B.
PAPER_ERRORS: dict[tuple[str, str], tuple[float, float | None]] = {
    ("plain18", "tencrop"): (27.94, None),
    ("plain34", "tencrop"): (28.54, 10.02),
    ("resnet18", "tencrop"): (27.88, None),
    ("resnet34-A", "tencrop"): (25.03, 7.76),
    ("resnet34", "tencrop"): (24.52, 7.46),
    ("resnet34-C", "tencrop"): (24.19, 7.40),
    ("resnet50", "tencrop"): (22.85, 6.71),
    ("resnet101", "tencrop"): (21.75, 6.05),
    ("resnet152", "tencrop"): (21.43, 5.71),
    ("resnet34", "multiscale"): (21.84, 5.71),
    ("resnet34-C", "multiscale"): (21.53, 5.60),
    ("resnet50", "multiscale"): (20.74, 5.25),
    ("resnet101", "multiscale"): (19.87, 4.60),
    ("resnet152", "multiscale"): (19.38, 4.49),
    ("resnet20", "center"): (8.75, None),
    ("resnet32", "center"): (7.51, None),
    ("resnet44", "center"): (7.17, None),
    ("resnet56", "center"): (6.97, None),
    ("resnet110", "center"): (6.43, None),
    ("resnet1202", "center"): (7.93, None),
}


def paper_error(name: str, protocol: str, shortcut: str | None = None) -> tuple[float, float | None] | None:
    """The paper's (top-1, top-5) error in % for a model evaluated with ``protocol``, if it reports one."""
    if name == "resnet34" and shortcut in ("A", "C"):
        name = f"resnet34-{shortcut}"
    return PAPER_ERRORS.get((name, protocol))


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
