"""Each sample's augmentation drawn from its own seed alone, in numpy, for whole batches: what the CIFAR tensor
path (``cifar_crop_flip``, ``erase_windows``) and DALI's feeders (``batch_parameters``: scale, crop window,
RandomResizedCrop's window, flip, PCA lighting, erasing) draw, as torchvision would. A function of (seed) alone, so
that order and augmentation survive a resume and do not depend on worker or rank counts."""

from __future__ import annotations

import numpy as np

from data_pipeline.config import DataConfig
from data_pipeline.sampling import GOLDEN, sample_uniforms, splitmix64

# AlexNet's "standard color augmentation", with fb.resnet.torch's values (reference/resnet-paper.md).
PCA_EIGENVALUES = (0.2175, 0.0188, 0.0045)
PCA_EIGENVECTORS = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


CIFAR_PADDING = 4


def cifar_crop_flip(seeds: np.ndarray, *, flip: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each image's crop corner (left, top in 0..8 of the image zero-padded by 4) and flip (0/1; always 0 without
    ``flip``), a function of its 32-bit seed alone: splitmix64's finalizer, three fields of its bits (the modulo
    bias is 7 in 65,536)."""
    with np.errstate(over="ignore"):
        mixed = splitmix64(seeds.astype(np.uint64) + np.uint64(GOLDEN))
    positions = 2 * CIFAR_PADDING + 1
    left = (mixed & np.uint64(0xFFFF)) % np.uint64(positions)
    top = ((mixed >> np.uint64(16)) & np.uint64(0xFFFF)) % np.uint64(positions)
    flips = (mixed >> np.uint64(32)) & np.uint64(1) if flip else np.zeros_like(mixed)
    return left.astype(np.int64), top.astype(np.int64), flips.astype(np.int64)


RRC_TRIES = 10  # torchvision's RandomResizedCrop: ten draws of the window, then the center crop
ERASE_TRIES = 10
ERASE_COLUMNS = slice(10 + 4 * RRC_TRIES, 11 + 4 * RRC_TRIES + 4 * ERASE_TRIES)  # after the crop's uniforms


def erase_windows(u: np.ndarray, side: int, probability: float) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's RandomErasing of a side x side image, drawn from 1 + 4 uniforms per try and sample: with
    ``probability``, the first of 10 boxes (area 0.02-0.33 of the image, aspect 0.3-3.3 log-uniform, rounded sides)
    that fits inside, at a uniform integer place; (y, x) and (height, width), zero where none is erased."""
    erased, tries = u[:, 0] < probability, u[:, 1:].reshape(len(u), ERASE_TRIES, 4)
    area = side * side * (0.02 + 0.31 * tries[..., 0])
    ratio = np.exp(np.log(0.3) + (np.log(3.3) - np.log(0.3)) * tries[..., 1])
    height, width = np.round(np.sqrt(area * ratio)), np.round(np.sqrt(area / ratio))
    fits = (height < side) & (width < side)
    first, rows = fits.argmax(axis=1), np.arange(len(u))
    box = np.stack([height[rows, first], width[rows, first]], axis=1)
    anchor = np.floor(tries[rows, first, 2:4] * (side - box + 1))
    chosen = (erased & fits.any(axis=1))[:, None]
    return np.where(chosen, anchor, 0).astype(np.float32), np.where(chosen, box, 0).astype(np.float32)


def train_parameters(
    config: DataConfig, seed: int, size: tuple[int, int] | None = None, crop: int | None = None
) -> dict[str, np.ndarray]:
    """One sample's augmentation (``batch_parameters`` of a batch of one)."""
    sizes = None if size is None else np.array([size])
    return {key: value[0] for key, value in batch_parameters(config, np.array([seed]), sizes, crop).items()}


def batch_parameters(
    config: DataConfig, seeds: np.ndarray, sizes: np.ndarray | None, crop: int | None = None
) -> dict[str, np.ndarray]:
    """Each sample's augmentation, a function of its own seed alone, for a whole batch at once (numpy, no Python
    loop per sample: the feeder's work per image). CIFAR and IDX (``crop``: the images' side): the crop's offset in
    the 4-padded image and the flip, as the tensor path draws them (``cifar_crop_flip``). ImageNet (images of
    ``sizes`` = N x (width, height)): the shorter side S in [scale_min, scale_max] and the crop's place, as the
    window of the original image that the crop covers (``anchor``, ``shape``: the crop of side c of the image
    resized to shorter side S is the window of side c * short / S resized to c, so only the window is decoded and
    resized; with data.train_augment=random_resized_crop, RandomResizedCrop's window); the flip (none without
    data.flip); the normalization mean shifted by the PCA lighting noise (adding the shift before normalizing is
    subtracting it from the mean); the output ``size`` (``crop``, default data.crop_size: progressive resizing asks
    for the epoch's). With data.random_erase, the erased box of the output (``erase_anchor``, ``erase_shape``:
    (y, x), (height, width); empty: none)."""
    u = sample_uniforms(seeds, ERASE_COLUMNS.stop if config.random_erase > 0 else ERASE_COLUMNS.start)
    crop = crop or config.crop_size
    erase = {}
    if config.random_erase > 0:
        anchor, shape = erase_windows(u[:, ERASE_COLUMNS], crop, config.random_erase)
        erase = {"erase_anchor": anchor, "erase_shape": shape}
    if config.in_memory:
        left, top, flip = cifar_crop_flip(seeds)
        offset = np.stack([left, top], axis=1).astype(np.int32) - CIFAR_PADDING  # (x, y) in the padded image
        return {"offset": offset, "flip": (flip * config.flip).astype(np.int32), **erase}
    flip = (u[:, 0] < 0.5).astype(np.int32) * config.flip
    normals = np.sqrt(-2 * np.log1p(-u[:, 4:7])) * np.cos(2 * np.pi * u[:, 7:10])  # Box-Muller
    alpha = normals * config.lighting_std
    shift = (alpha * np.asarray(PCA_EIGENVALUES)) @ np.asarray(PCA_EIGENVECTORS).T
    mean = ((np.asarray(config.mean) - shift) * 255).astype(np.float32)
    if sizes is None:  # the parameters' shapes alone
        sizes = np.full((len(seeds), 2), config.scale_min)
    width, height = sizes.T.astype(np.float64)
    if config.train_augment == "random_resized_crop":
        anchor, shape = random_resized_windows(u[:, 10 : 10 + 4 * RRC_TRIES], width, height)
    else:
        shorter = config.scale_min + np.floor(u[:, 1] * (config.scale_max - config.scale_min + 1))
        scale = shorter / np.minimum(width, height)  # as torchvision's RandomShortestSize: the long side truncated
        resized = np.stack(
            [
                np.where(width <= height, shorter, np.floor(width * scale)),
                np.where(height <= width, shorter, np.floor(height * scale)),
            ],
            axis=1,
        )
        corner = np.floor(u[:, 2:4] * (resized - crop + 1))  # RandomCrop's uniform integer corner
        anchor, shape = corner / scale[:, None], np.repeat((crop / scale)[:, None], 2, axis=1)
    size = np.full((len(seeds), 2), crop, dtype=np.float32)
    return {
        "anchor": anchor.astype(np.float32),
        "shape": shape.astype(np.float32),
        "flip": flip,
        "mean": mean,
        "size": size,
        **erase,
    }


def random_resized_windows(u: np.ndarray, width: np.ndarray, height: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RandomResizedCrop's window (scale 0.08-1 of the area, aspect 3/4-4/3 log-uniform, the first of 10 tries that
    fits, else the center crop of the clamped aspect), as torchvision draws it, from 4 uniforms per try and sample:
    (left, top) and (width, height)."""
    tries = u.reshape(len(u), RRC_TRIES, 4)
    area, log_ratio = (width * height)[:, None], (np.log(3 / 4), np.log(4 / 3))
    target = area * (0.08 + 0.92 * tries[..., 0])
    ratio = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * tries[..., 1])
    crop_width, crop_height = np.round(np.sqrt(target * ratio)), np.round(np.sqrt(target / ratio))
    fits = (crop_width > 0) & (crop_width <= width[:, None]) & (crop_height > 0) & (crop_height <= height[:, None])
    first, rows = fits.argmax(axis=1), np.arange(len(u))
    crop = np.stack([crop_width[rows, first], crop_height[rows, first]], axis=1)
    left = np.floor(tries[rows, first, 2] * (width - crop[:, 0] + 1))
    top = np.floor(tries[rows, first, 3] * (height - crop[:, 1] + 1))
    anchor = np.stack([left, top], axis=1)
    in_ratio = width / height  # no try fit: the center crop of the clamped aspect
    center = np.stack(
        [
            np.where(in_ratio < 3 / 4, width, np.where(in_ratio > 4 / 3, np.round(height * 4 / 3), width)),
            np.where(in_ratio < 3 / 4, np.round(width * 4 / 3), height),
        ],
        axis=1,
    )
    center_anchor = np.floor((np.stack([width, height], axis=1) - center) / 2)
    missed = ~fits.any(axis=1)
    return np.where(missed[:, None], center_anchor, anchor), np.where(missed[:, None], center, crop)
