"""The paper's augmentations as torchvision.transforms.v2 pipelines on uint8 C x H x W images.

ImageNet train (Sec. 3.4): shorter side to a random integer in [256, 480], random 224 crop, horizontal flip,
AlexNet PCA lighting, per-channel mean/std normalization (the modern stand-in for the paper's per-pixel mean).
ImageNet val: shorter side 256, center 224. CIFAR-10 train (Sec. 4.2): 4-pixel zero padding (black, before
normalization), random 32 crop, flip; CIFAR-10 test: the image as is.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.transforms import v2

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
