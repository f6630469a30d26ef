"""Learnable synthetic data sets in the two on-disk layouts the project reads: an ImageNet-style ImageFolder of
JPEGs and the CIFAR-10 python batches.

Each class is a fixed combination of a shape, a hue and a texture; each sample varies the position, size,
rotation, colour (hue, saturation, brightness), background and pixel noise, so a network has to learn shape,
colour and texture cues rather than memorize pixels. Everything follows from one seed.
"""

from __future__ import annotations

import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_pipeline.config import DataConfig

SHAPES = ("disc", "square", "triangle", "cross", "ring", "diamond", "bar", "star")
TEXTURES = ("solid", "stripes", "checker")
CIFAR_BATCH_COUNT = 5


def class_recipe(class_index: int) -> tuple[str, float, str]:
    """(shape, hue in [0, 1), texture) of a class: neighbouring classes differ in shape, hue and texture."""
    shape = SHAPES[class_index % len(SHAPES)]
    texture = TEXTURES[(class_index // len(SHAPES)) % len(TEXTURES)]
    hue = (class_index * 0.618034) % 1.0
    return shape, hue, texture


def _polygon(shape: str, center: np.ndarray, radius: float, angle: float) -> list[tuple[float, float]]:
    corners = {"triangle": 3, "square": 4, "diamond": 4, "star": 10, "bar": 4}[shape]
    turns = np.arange(corners) * 2 * np.pi / corners + (np.pi / 4 if shape in ("square", "bar") else 0)
    radii = np.full(corners, radius)
    if shape == "star":
        radii[1::2] *= 0.45
    points = np.stack([np.cos(turns) * radii, np.sin(turns) * radii], axis=1)
    points[:, 1] *= {"bar": 0.3, "diamond": 0.55}.get(shape, 1.0)  # elongate before turning
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return [tuple(p) for p in center + points @ rotation.T]


def _shape_mask(shape: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    width, height = size
    short = min(width, height)
    radius = short * rng.uniform(0.22, 0.38)
    center = np.array([rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)])
    angle = rng.uniform(0, 2 * np.pi)
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    box = [*(center - radius), *(center + radius)]
    if shape == "disc":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        inner = radius * 0.55
        draw.ellipse([*(center - inner), *(center + inner)], fill=0)
    elif shape == "cross":
        arm = radius * 0.35
        for along_x in (True, False):
            half = np.array([radius, arm]) if along_x else np.array([arm, radius])
            draw.rectangle([*(center - half), *(center + half)], fill=255)
        mask = mask.rotate(np.degrees(angle), center=tuple(center))
    else:
        draw.polygon(_polygon(shape, center, radius, angle), fill=255)
    return np.asarray(mask, dtype=np.float32) / 255.0


def _texture(texture: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    width, height = size
    if texture == "solid":
        return np.ones((height, width), np.float32)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    period = min(width, height) * rng.uniform(0.12, 0.2)
    if texture == "stripes":
        angle = rng.uniform(0, np.pi)
        phase = (x * np.cos(angle) + y * np.sin(angle)) / period
        return np.where(np.floor(phase) % 2 == 0, 1.0, 0.35).astype(np.float32)
    checker = (np.floor(x / period) + np.floor(y / period)) % 2
    return np.where(checker == 0, 1.0, 0.35).astype(np.float32)


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    channel = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6
    return value - value * saturation * np.clip(np.minimum(channel, 4 - channel), 0, 1)


def render_sample(class_index: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """One H x W x 3 uint8 image of ``class_index``."""
    shape, hue, texture = class_recipe(class_index)
    width, height = size
    background = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.3), rng.uniform(0.2, 0.8))
    gradient = np.linspace(rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0), width, dtype=np.float32)
    image = background[None, None, :] * gradient[None, :, None] * np.ones((height, 1, 1), np.float32)
    colour = _hsv_to_rgb((hue + rng.normal(0, 0.05)) % 1.0, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    mask = _shape_mask(shape, size, rng)[..., None]
    foreground = colour[None, None, :] * _texture(texture, size, rng)[..., None]
    image = image * (1 - mask) + foreground * mask
    image = image + rng.normal(0, 0.04, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _render_split(classes: int, per_class: int, size: tuple[int, int], rng: np.random.Generator):
    for class_index in range(classes):
        for sample in range(per_class):
            yield class_index, sample, render_sample(class_index, size, rng)


def class_name(class_index: int) -> str:
    shape, _, texture = class_recipe(class_index)
    return f"c{class_index:03d}_{shape}_{texture}"


def synthesize_imagefolder(
    out: Path, *, classes: int, train_per_class: int, val_per_class: int, size: tuple[int, int], seed: int = 0
) -> None:
    """Write ``out/train/<class>/*.JPEG`` and ``out/val/<class>/*.JPEG`` (ImageNet's layout)."""
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for class_index, sample, pixels in _render_split(classes, per_class, size, rng):
            folder = out / split / class_name(class_index)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{split}_{class_index:03d}_{sample:05d}.JPEG", quality=90)


def synthesize_cifar(out: Path, *, classes: int, train_per_class: int, val_per_class: int, seed: int = 0) -> None:
    """Write CIFAR-10's python layout at 32x32: data_batch_1..5, test_batch and batches.meta.

    Each batch is a pickled dict with bytes keys, as the real files are: b"data" (N x 3072 uint8, the R, G and B
    planes of each row-major image), b"labels", b"filenames" and b"batch_label".
    """
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    train = list(_render_split(classes, train_per_class, (32, 32), rng))
    test = list(_render_split(classes, val_per_class, (32, 32), rng))
    order = rng.permutation(len(train))  # the real batches mix classes
    train = [train[i] for i in order]
    chunks = np.array_split(np.arange(len(train)), CIFAR_BATCH_COUNT)
    batches = {f"data_batch_{i + 1}": [train[j] for j in chunk] for i, chunk in enumerate(chunks)}
    batches["test_batch"] = test
    for name, samples in batches.items():
        record = {
            b"batch_label": name.encode(),
            b"labels": [label for label, _, _ in samples],
            b"data": np.stack([pixels.transpose(2, 0, 1).reshape(-1) for _, _, pixels in samples]),
            b"filenames": [f"{class_name(label)}_{index:05d}.png".encode() for label, index, _ in samples],
        }
        with open(out / name, "wb") as file:
            pickle.dump(record, file)
    meta = {b"label_names": [class_name(i).encode() for i in range(classes)], b"num_vis": 3072}
    with open(out / "batches.meta", "wb") as file:
        pickle.dump(meta, file)


def ensure_synthetic(config: DataConfig) -> bool:
    """Write ``config.synthesize``'s set at ``config.root`` unless the folder exists; returns whether it wrote.
    Written in a folder of this process's own beside it and renamed into place, so an interrupted run never leaves
    half a data set, and runs that start together (a sweep's trials) each write whole and the first rename wins."""
    root, synth = Path(config.root), config.synthesize
    if synth is None or root.exists():
        return False
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    counts = {
        "classes": synth.classes,
        "train_per_class": synth.train_per_class,
        "val_per_class": synth.val_per_class,
        "seed": synth.seed,
    }
    try:
        if config.format == "cifar":
            synthesize_cifar(partial, **counts)
        else:
            synthesize_imagefolder(partial, size=(synth.size, synth.size), **counts)
        partial.chmod(0o755)  # mkdtemp's folder is private
        partial.rename(root)
    except OSError:
        if not root.is_dir():  # not another process's set, renamed into place first: a real failure
            raise
        return False
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return True
