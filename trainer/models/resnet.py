"""Residual and plain networks of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016).

One ``ResNet`` class covers the ImageNet nets of Table 1 and the CIFAR-10 nets of Sec. 4.2: they differ only in
the stem, the stage widths and the number of blocks, which are parameters. Module names follow torchvision's
``resnet.py`` (``conv1``, ``bn1``, ``layer1..4``, ``downsample``, ``fc``) so that state dicts interchange.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Shortcut = Literal["A", "B", "C"]


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A of Sec. 3.3: identity that subsamples by ``stride`` and zero-pads the new channels; no parameters."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


def build_shortcut(in_channels: int, out_channels: int, stride: int, shortcut: Shortcut) -> nn.Module | None:
    """The shortcut of one block (Sec. 3.3): ``None`` means identity."""
    grows = stride != 1 or in_channels != out_channels
    if shortcut == "C" or (shortcut == "B" and grows):
        return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
    if shortcut == "A" and grows:
        return ZeroPadShortcut(stride, out_channels - in_channels)
    return None


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (Fig. 2, left); ``residual=False`` gives the plain baseline's block."""

    expansion = 1

    def __init__(
        self, in_channels: int, width: int, *, stride: int, shortcut: Shortcut, residual: bool, stride_in_1x1: bool
    ) -> None:
        super().__init__()
        del stride_in_1x1  # only bottlenecks have a 1x1 to put the stride on
        self.conv1 = conv3x3(in_channels, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.residual = residual
        self.downsample = build_shortcut(in_channels, width, stride, shortcut) if residual else None

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand by 4 (Fig. 5, right).

    The paper (v1) strides the first 1x1 convolution; torchvision and NVIDIA ("v1.5") stride the 3x3, which is
    about 0.5% top-1 better and a little slower. ``stride_in_1x1=True`` selects the paper's layout.
    """

    expansion = 4

    def __init__(
        self, in_channels: int, width: int, *, stride: int, shortcut: Shortcut, residual: bool, stride_in_1x1: bool
    ) -> None:
        super().__init__()
        out_channels = width * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(in_channels, width, stride_1x1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride_3x3)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.residual = residual
        self.downsample = build_shortcut(in_channels, out_channels, stride, shortcut) if residual else None

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class ResNet(nn.Module):
    """A stem, stages of blocks (the first block of each later stage halves the map), global pool and fc.

    ImageNet (Table 1): 7x7/2 conv 64 + 3x3/2 max-pool, widths 64-512. CIFAR-10 (Sec. 4.2): 3x3 conv 16, no pool,
    widths 16-64. BN follows every convolution; He (fan_out) initialization; no dropout.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        blocks_per_stage: tuple[int, ...],
        *,
        widths: tuple[int, ...],
        cifar_stem: bool = False,
        num_classes: int = 1000,
        in_channels: int = 3,
        shortcut: Shortcut = "B",
        residual: bool = True,
        stride_in_1x1: bool = False,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(widths) != len(blocks_per_stage):
            raise ValueError(f"{len(widths)} widths for {len(blocks_per_stage)} stages")
        if shortcut not in ("A", "B", "C"):
            raise ValueError(f"shortcut must be 'A', 'B' or 'C', got {shortcut!r}")
        stem_width = widths[0]
        if cifar_stem:
            self.conv1 = conv3x3(in_channels, stem_width)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        in_channels = stem_width  # from here on, each block's input
        for index, (width, count) in enumerate(zip(widths, blocks_per_stage, strict=True)):
            stage = []
            for block_index in range(count):
                stride = 2 if index > 0 and block_index == 0 else 1
                options = dict(shortcut=shortcut, residual=residual, stride_in_1x1=stride_in_1x1)
                stage.append(block(in_channels, width, stride=stride, **options))
                in_channels = width * block.expansion
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, num_classes)
        self.reset_parameters(zero_init_residual=zero_init_residual)

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{index + 1}") for index in range(self.num_stages)]

    def reset_parameters(self, *, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            # Goyal et al. 2017: each residual block starts as the identity.
            for stage in self.stages():
                for block in stage:
                    nn.init.zeros_(block.last_bn().weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages():
            x = stage(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))
