"""The paper's augmentations as torchvision.transforms.v2 pipelines on uint8 C x H x W images.

ImageNet train (Sec. 3.4): shorter side to a random integer in [256, 480], random 224 crop, horizontal flip,
AlexNet PCA lighting, per-channel mean/std normalization (the modern stand-in for the paper's per-pixel mean).
ImageNet val: shorter side 256, center 224; the paper's test views (Sec. 3.4): ten crops (the corners and center
of 224 and their flips) of the 256 image, or the whole image at several shorter sides with its flip.
CIFAR-10 train (Sec. 4.2): 4-pixel zero padding (black, before normalization), random 32 crop, flip; CIFAR-10
test: the image as is.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from data_pipeline.config import DataConfig

# AlexNet's "standard color augmentation", with fb.resnet.torch's values (reference/resnet-paper.md).
PCA_EIGENVALUES = (0.2175, 0.0188, 0.0045)
PCA_EIGENVECTORS = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


class PCALighting(nn.Module):
    """Adds ``eigenvectors @ (alpha * eigenvalues)``, alpha ~ N(0, std), to every pixel of a [0, 1] RGB image."""

    def __init__(self, std: float) -> None:
        super().__init__()
        self.std = std
        self.register_buffer("eigenvalues", torch.tensor(PCA_EIGENVALUES))
        self.register_buffer("eigenvectors", torch.tensor(PCA_EIGENVECTORS))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.std
        shift = self.eigenvectors @ (alpha * self.eigenvalues)
        return image + shift.view(3, 1, 1)


def _to_normalized(config: DataConfig) -> list[nn.Module]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(config.mean, config.std)]


def build_train_transform(config: DataConfig) -> v2.Compose:
    if config.format == "cifar":
        return v2.Compose([v2.RandomCrop(32, padding=4, fill=0), v2.RandomHorizontalFlip(), *_to_normalized(config)])
    if config.train_augment == "scale":
        resize_crop = [
            v2.RandomShortestSize(list(range(config.scale_min, config.scale_max + 1)), antialias=True),
            v2.RandomCrop(config.crop_size),
        ]
    else:
        resize_crop = [v2.RandomResizedCrop(config.crop_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True)]
    lighting = [PCALighting(config.lighting_std)] if config.lighting_std > 0 else []
    return v2.Compose(
        [
            *resize_crop,
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            *lighting,
            v2.Normalize(config.mean, config.std),
        ]
    )


def build_val_transform(config: DataConfig) -> v2.Compose:
    if config.format == "cifar":
        return v2.Compose(_to_normalized(config))
    resize_crop = [v2.Resize(config.val_resize, antialias=True), v2.CenterCrop(config.crop_size)]
    return v2.Compose([*resize_crop, *_to_normalized(config)])


def five_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """The four corner crops and the center crop of ``size``: 5 x C x size x size."""
    height, width = image.shape[-2:]
    if min(height, width) < size:
        raise ValueError(f"a {height}x{width} image is smaller than the {size} crop")
    center = (int(round((height - size) / 2.0)), int(round((width - size) / 2.0)))
    corners = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size), center]
    return torch.stack([image[..., top : top + size, left : left + size] for top, left in corners])


def ten_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """AlexNet's ten views of a C x H x W image: the five crops of the image and of its horizontal reflection,
    10 x C x size x size, in torchvision's TenCrop order."""
    return torch.cat([five_crop(image, size), five_crop(image.flip(-1), size)])


class TenCropViews(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return ten_crop(image, self.size)


class MultiScaleViews(nn.Module):
    """For each shorter side s: the whole image resized to s and its flip, a 2 x C x H_s x W_s tensor (the shapes
    differ per scale and per image aspect, so the views stay a list)."""

    def __init__(self, scales: tuple[int, ...]) -> None:
        super().__init__()
        self.scales = scales

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        views = []
        for scale in self.scales:
            resized = TF.resize(image, scale, antialias=True)
            views.append(torch.stack([resized, resized.flip(-1)]))
        return views


def build_eval_transform(config: DataConfig, protocol: str, scales: tuple[int, ...] = ()) -> v2.Compose:
    """The test views of one image for ``protocol``: "center" (one view), "tencrop" (10) or "multiscale"."""
    if protocol == "center":
        return build_val_transform(config)
    if protocol == "tencrop":
        return v2.Compose(
            [v2.Resize(config.val_resize, antialias=True), *_to_normalized(config), TenCropViews(config.crop_size)]
        )
    return v2.Compose([*_to_normalized(config), MultiScaleViews(tuple(scales))])
