"""The paper's augmentations as torchvision.transforms.v2 pipelines on uint8 C x H x W images.

ImageNet train (Sec. 3.4): shorter side to a random integer in [256, 480], random 224 crop, horizontal flip,
AlexNet PCA lighting, per-channel mean/std normalization (the modern stand-in for the paper's per-pixel mean).
ImageNet val: shorter side 256, center 224; the paper's test views (Sec. 3.4): ten crops (the corners and center
of 224 and their flips) of the 256 image, or the whole image at several shorter sides with its flip.
CIFAR-10 train (Sec. 4.2): 4-pixel zero padding (black, before normalization), random 32 crop, flip; CIFAR-10
test: the image as is. CIFAR's augmentation runs on whole batches of uint8 tensors (``augment_cifar_batch``), each
image's crop and flip a hash of its own seed (``draws.cifar_crop_flip``), so no work is done per image in Python.

The modern recipes' additions (data.auto_augment, data.random_erase, progressive crops): torchvision's
TrivialAugmentWide, RandAugment and RandomErasing after the crop and flip (``after_crop``); on CIFAR tensors the
auto-augmentation image by image (``augment_each``) and the erasing batched, with the boxes DALI's feeder draws
(``draws.erase_windows``, ``erase_batch``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from data_pipeline.augment.draws import (
    CIFAR_PADDING,
    ERASE_COLUMNS,
    PCA_EIGENVALUES,
    PCA_EIGENVECTORS,
    cifar_crop_flip,
    erase_windows,
)
from data_pipeline.config import DataConfig
from data_pipeline.sampling import sample_uniforms


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


def to_device(values: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host array (or tensor) on ``device`` without waiting: on a GPU, copied from pinned memory asynchronously.
    A copy from pageable memory synchronizes the stream, so building batch N+1 would wait for step N to finish
    (the caching host allocator keeps the pinned block until the copy is done)."""
    tensor = values if isinstance(values, torch.Tensor) else torch.from_numpy(values)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def augment_cifar_batch(images: torch.Tensor, seeds: np.ndarray, *, flip: bool = True) -> torch.Tensor:
    """The paper's CIFAR-10 augmentation (Sec. 4.2) of a uint8 B x C x S x S batch (CIFAR's 32 x 32, MNIST's
    28 x 28), on its device: zero-pad 4 pixels, take each image's S x S crop at its corner, mirror the images whose
    flip is 1 (none where ``flip`` is false: data.flip). One gather."""
    left, top, flip = (to_device(values, images.device) for values in cifar_crop_flip(seeds, flip=flip))
    size = images.shape[-1]
    padded = torch.nn.functional.pad(images, [CIFAR_PADDING] * 4)
    steps = torch.arange(size, device=images.device)
    rows = top[:, None] + steps  # B x 32
    columns = left[:, None] + torch.where(flip[:, None].bool(), steps.flip(0), steps)
    batch = torch.arange(len(images), device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channels, rows[:, None, :, None], columns[:, None, None, :]]


def erase_batch(images: torch.Tensor, seeds: np.ndarray, probability: float) -> torch.Tensor:
    """Random erasing of a normalized B x C x S x S batch, each image's box (``erase_windows``) from its own seed's
    uniforms (those DALI's feeder draws it from), zeroed by one mask."""
    u = sample_uniforms(seeds, ERASE_COLUMNS.stop)[:, ERASE_COLUMNS]
    boxes = erase_windows(u, images.shape[-1], probability)
    anchor, shape = (to_device(values, images.device) for values in boxes)
    steps = torch.arange(images.shape[-1], device=images.device)
    rows = (steps >= anchor[:, :1]) & (steps < anchor[:, :1] + shape[:, :1])  # B x S
    columns = (steps >= anchor[:, 1:]) & (steps < anchor[:, 1:] + shape[:, 1:])
    return images.masked_fill((rows[:, :, None] & columns[:, None, :])[:, None], 0.0)


def normalize_batch(images: torch.Tensor, config: DataConfig) -> torch.Tensor:
    """uint8 images to float32 in [0, 1], then the per-channel mean/std: what ``_to_normalized`` does per image."""
    return TF.normalize(TF.to_dtype(images, torch.float32, scale=True), config.mean, config.std)


def _to_normalized(config: DataConfig) -> list[nn.Module]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(config.mean, config.std)]


def normalizes_in_batches(config: DataConfig) -> bool:
    """Whether the torch path's training images leave the loader processes as uint8 and are normalized a batch at a
    time on the training device (``normalize_batch``, the same arithmetic): where nothing between the crop and the
    normalization needs floats (no lighting noise, no random erasing). A quarter of the bytes cross to the trainer,
    and one vectorized op replaces one per image in the processes that share the CPU with the step; timm's loader
    does the same."""
    return config.lighting_std == 0 and config.random_erase == 0


def build_train_transform(config: DataConfig, crop: int | None = None, *, normalize: bool = True) -> v2.Compose:
    """One image file's training augmentation to a ``crop`` x ``crop`` image (default data.crop_size; progressive
    resizing asks for the epoch's), then data.auto_augment, the lighting noise, normalization and data.random_erase
    (CIFAR's is ``augment_cifar_batch``, on whole batches, with ``augment_each`` for these last). ``normalize=False``
    (only where ``normalizes_in_batches``): the uint8 image after the auto-augmentation."""
    crop = crop or config.crop_size
    if config.train_augment == "scale":
        resize_crop = [
            v2.RandomShortestSize(list(range(config.scale_min, config.scale_max + 1)), antialias=True),
            v2.RandomCrop(crop),
        ]
    else:
        resize_crop = [v2.RandomResizedCrop(crop, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True)]
    flip = [v2.RandomHorizontalFlip()] if config.flip else []
    return v2.Compose([*resize_crop, *flip, *after_crop(config, normalize=normalize)])


def after_crop(
    config: DataConfig, *, lighting: bool = True, erase: bool = True, normalize: bool = True
) -> list[nn.Module]:
    """What follows the crop and flip, on a uint8 image: the auto-augmentation, then to float with the lighting
    noise (ImageNet's, not CIFAR's), normalization and random erasing (to 0, the mean, as torchvision's recipe
    erases; CIFAR tensors erase whole batches instead)."""
    auto = {
        "none": [],
        "trivial_augment_wide": [v2.TrivialAugmentWide()],
        "rand_augment": [v2.RandAugment(num_ops=config.rand_augment_ops, magnitude=config.rand_augment_magnitude)],
    }[config.auto_augment]
    lighting = [PCALighting(config.lighting_std)] if config.lighting_std > 0 and lighting else []
    erasing = [v2.RandomErasing(p=config.random_erase, value=0)] if config.random_erase > 0 and erase else []
    if not normalize:
        assert not lighting and not erasing, "lighting and erasing need floats: normalizes_in_batches is false"
        return auto
    return [*auto, v2.ToDtype(torch.float32, scale=True), *lighting, v2.Normalize(config.mean, config.std), *erasing]


def seed_cpu_generator(seed: int) -> None:
    """Seeds the CPU generator that torchvision's transforms draw from. ``torch.manual_seed`` would seed every
    CUDA generator too, and where CUDA is not initialized (a loader worker) it queues that call with a captured
    traceback each time: 0.13 ms per image, a quarter of a 112-pixel crop's whole augmentation."""
    torch.default_generator.manual_seed(seed)


def augment_each(images: torch.Tensor, seeds: np.ndarray, transform: nn.Module) -> torch.Tensor:
    """``transform`` of each uint8 image of a batch with torch's generator seeded by the image's own seed (the ops of
    an auto-augmentation differ per image; torchvision draws them from torch's global generator)."""
    out = []
    with torch.random.fork_rng(devices=[]):
        for image, seed in zip(images, seeds.tolist(), strict=True):
            seed_cpu_generator(seed)
            out.append(transform(image))
    return torch.stack(out)


def build_val_transform(config: DataConfig) -> v2.Compose:
    if config.in_memory:
        return v2.Compose(_to_normalized(config))
    resize_crop = [v2.Resize(config.val_resize, antialias=True), v2.CenterCrop(config.eval_crop)]
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


class FlipViews(nn.Module):
    """The image and its mirror image: 2 x C x H x W."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.stack([image, image.flip(-1)])


def build_eval_transform(config: DataConfig, protocol: str, scales: tuple[int, ...] = ()) -> v2.Compose:
    """The test views of one image for ``protocol``: "center" (one view), "flip" (the center crop and its mirror:
    FFCV's test-time augmentation), "tencrop" (10) or "multiscale"."""
    if protocol == "center":
        return build_val_transform(config)
    if protocol == "flip":
        return v2.Compose([build_val_transform(config), FlipViews()])
    if protocol == "tencrop":
        return v2.Compose(
            [v2.Resize(config.val_resize, antialias=True), *_to_normalized(config), TenCropViews(config.eval_crop)]
        )
    return v2.Compose([*_to_normalized(config), MultiScaleViews(tuple(scales))])
