"""The IDX format of MNIST and the sets that copy its layout (Fashion-MNIST, KMNIST, EMNIST): four files in one
folder, ``[prefix-]train-images-idx3-ubyte``, ``[prefix-]train-labels-idx1-ubyte`` and their ``t10k`` pair, gzipped
or not (LeCun, Cortes and Burges, "The MNIST database": a 4-byte magic number of two zero bytes, the element type
and the number of dimensions, then each dimension as a big-endian 32-bit integer, then the elements, row-major).

The set is read whole into one uint8 N x 1 x H x W tensor, as CIFAR's batches are (data_pipeline.cifar_tensors
augments it in batches on the training device). Class names come from ``classes.txt`` in the folder (one per
line, written by ``residual data get``), else they are the labels' numbers.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from data_pipeline.errors import UserError, outside_the_classes

UNSIGNED_BYTE = 0x08  # the element type of MNIST's images and labels
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801  # uint8, 3 dimensions; uint8, 1 dimension
CLASSES_FILE = "classes.txt"


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array of an IDX file whose magic number must be ``magic``; one ``UserError`` naming the file for
    anything else (another magic number, a truncated or damaged file)."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise UserError(f"{path}: cannot read ({error})") from None
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic:
        shown = "none (under 4 bytes)" if found is None else f"0x{found:08x}"
        raise UserError(
            f"{path}: magic number {shown}, expected 0x{magic:08x} (an IDX file of uint8 "
            f"{'images' if magic == IMAGES_MAGIC else 'labels'})"
        )
    dimensions = magic & 0xFF
    header = 4 + 4 * dimensions
    if len(raw) < header:
        raise UserError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dimensions))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise UserError(f"{path}: {what}: {len(raw)} bytes where the header's shape {shape} needs {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def find_idx_file(root: Path, split: str, kind: str) -> Path:
    """The one file ``*{split}-{kind}-idx?-ubyte[.gz]`` in ``root`` (split "train" or "t10k"; kind "images" or
    "labels"), so that EMNIST's prefixed names (emnist-letters-train-...) are found as MNIST's are."""
    found = sorted(root.glob(f"*{split}-{kind}-idx?-ubyte")) + sorted(root.glob(f"*{split}-{kind}-idx?-ubyte.gz"))
    if len(found) != 1:
        what = "no file" if not found else f"{len(found)} files ({', '.join(path.name for path in found)})"
        raise UserError(
            f"{root}: {what} matching *{split}-{kind}-idx?-ubyte[.gz]; an IDX data set holds the four "
            f"files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
            f"t10k-labels-idx1-ubyte (gzipped or not)"
        )
    return found[0]


def read_class_names(root: Path) -> list[str] | None:
    path = root / CLASSES_FILE
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) < 2:
        raise UserError(f"{path}: {len(names)} class names; one per line, at least 2")
    return names


def training_label_names(root: Path, labels: np.ndarray | None) -> list[str]:
    """Without classes.txt, the classes are 0 to the largest training label: the test set is held to them."""
    if labels is None:
        labels = read_idx(find_idx_file(root, "train", "labels"), LABELS_MAGIC)
    return [str(label) for label in range(max(int(labels.max()) + 1, 2))] if len(labels) else ["0", "1"]


class IdxDataset(Dataset):
    """The training (``train-*``) or test (``t10k-*``) half of an IDX data set, held as one uint8 N x 1 x H x W
    tensor with int64 labels."""

    def __init__(self, root: Path, *, train: bool) -> None:
        if not root.is_dir():
            raise UserError(f"{root}: folder does not exist")
        split = "train" if train else "t10k"
        images_path, labels_path = find_idx_file(root, split, "images"), find_idx_file(root, split, "labels")
        images, labels = read_idx(images_path, IMAGES_MAGIC), read_idx(labels_path, LABELS_MAGIC)
        if len(images) != len(labels):
            raise UserError(f"{labels_path}: {len(labels)} labels for the {len(images)} images of {images_path.name}")
        if len(images) == 0:
            raise UserError(f"{images_path}: holds no images")
        self.classes = read_class_names(root) or training_label_names(root, labels if train else None)
        if (largest := int(labels.max())) >= len(self.classes):
            source = root / CLASSES_FILE if (root / CLASSES_FILE).is_file() else "the training labels"
            raise UserError(f"{labels_path}: label {largest} is {outside_the_classes(len(self.classes), source)}")
        self.images = torch.from_numpy(images.copy()).unsqueeze(1)  # N x 1 x H x W
        self.labels = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])
