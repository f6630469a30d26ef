"""The data sets on disk, read into (image, label) samples: an ImageFolder tree of JPEGs, CIFAR-10's python
batches, MNIST's IDX files (data_pipeline.idx) and WebDataset shards (data_pipeline.webdataset). Images come out
as uint8 C x H x W tensors; augmentation is data_pipeline.transforms' business."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset

from data_pipeline.damaged import decode_rgb
from data_pipeline.errors import UserError, outside_the_classes
from data_pipeline.folder_index import folder_index

CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"
# CIFAR-100's python layout: one training file and one test file, the 100 classes' labels under b"fine_labels"
# (b"coarse_labels" holds the 20 superclasses), their names in meta's b"fine_label_names"
CIFAR100_FILES, CIFAR100_META = {True: "train", False: "test"}, "meta"


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` as in ImageNet's train/ and val/ folders; classes sorted by folder name. The samples
    are a ``FolderIndex`` (arrays, not Python objects), read from ``index`` where it is saved and current, else
    listed (and saved there)."""

    def __init__(self, root: Path, index: Path | None = None) -> None:
        self.root = root
        self.samples = folder_index(root, index)
        self.classes: list[str] = self.samples.classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return decode_rgb(self.samples.path(index)), int(self.samples.labels[index])


def _read_cifar_batch(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: CIFAR batch file missing (expected CIFAR-10's data_batch_1..5 and test_batch, or "
                        f"CIFAR-100's train and test)")  # fmt: skip
    try:
        with open(path, "rb") as file:
            return pickle.load(file, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise UserError(f"{path}: not a CIFAR-10 python batch ({error})") from None


CIFAR_ROW_BYTES = 3 * 32 * 32  # one image: the red, green and blue 32 x 32 planes


def _check_cifar_batch(path: Path, batch: dict, labels: bytes) -> None:
    """A batch of other images (64 x 64, say) would reshape into scrambled 32 x 32 ones with misaligned labels."""
    if not isinstance(batch, dict) or b"data" not in batch or labels not in batch:
        raise UserError(f"{path}: not a CIFAR python batch (no b'data' and {labels!r})")
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_ROW_BYTES:
        raise UserError(
            f"{path}: data of shape {data.shape} and type {data.dtype}; CIFAR-10 batches hold one uint8 row of "
            f"{CIFAR_ROW_BYTES} bytes (3 x 32 x 32) per image"
        )
    if len(batch[labels]) != len(data):
        raise UserError(f"{path}: {len(data)} images but {len(batch[labels])} labels")


class CifarDataset(Dataset):
    """CIFAR-10's or CIFAR-100's python batches (by the files in ``root``), held in memory as one uint8
    N x 3 x 32 x 32 tensor; CIFAR-100 with its 100 fine labels."""

    def __init__(self, root: Path, *, train: bool) -> None:
        if not root.is_dir():
            raise UserError(f"{root}: folder does not exist")
        hundred = (root / CIFAR100_FILES[train]).is_file() and not (root / CIFAR_TEST_BATCH).is_file()
        names = (CIFAR100_FILES[train],) if hundred else CIFAR_TRAIN_BATCHES if train else (CIFAR_TEST_BATCH,)
        key = b"fine_labels" if hundred else b"labels"
        batches = [_read_cifar_batch(root / name) for name in names]
        for name, batch in zip(names, batches, strict=True):
            _check_cifar_batch(root / name, batch, key)
        data = np.concatenate([batch[b"data"] for batch in batches])
        self.images = torch.from_numpy(data.reshape(-1, 3, 32, 32))
        self.labels = torch.tensor([label for batch in batches for label in batch[key]], dtype=torch.int64)
        meta, names_key = (root / CIFAR100_META, b"fine_label_names") if hundred else (root / "batches.meta",
                                                                                       b"label_names")  # fmt: skip
        if meta.is_file():
            self.classes = [name.decode() for name in _read_cifar_batch(meta)[names_key]]
            files = np.repeat(np.arange(len(names)), [len(batch[key]) for batch in batches])
            index = first_outside(self.labels.numpy(), len(self.classes))
            if index is not None:
                number = index - int(np.searchsorted(files, files[index]))
                raise UserError(f"{root / names[files[index]]}: label {int(self.labels[index])} of image {number} is "
                                f"{outside_the_classes(len(self.classes), meta)}")  # fmt: skip
        else:
            self.classes = [str(i) for i in range(int(self.labels.max()) + 1)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


def first_outside(labels: np.ndarray, classes: int) -> int | None:
    """The position of the first label that is not a class (0 to ``classes`` - 1), or None: a label past the model's
    classes fails the first step with "Target 12 is out of bounds", so each data set checks at opening."""
    outside = np.flatnonzero((labels < 0) | (labels >= classes))
    return int(outside[0]) if len(outside) else None


def check_same_classes(expected: list[str], found: list[str], *, where: str, expected_are: str) -> None:
    """Labels are positions in a sorted class list: data scored against another list is scored against the wrong
    labels."""
    if found == expected:
        return
    differing = [f"{a!r} vs {b!r}" for a, b in zip(expected, found, strict=False) if a != b]
    if not differing:
        differing = [f"{len(found)} vs {len(expected)} classes"]
    raise UserError(
        f"{where}: its {len(found)} classes are not the {len(expected)} {expected_are} (first differences: "
        f"{', '.join(differing[:3])})"
    )


def check_folder_classes(root: str | Path, data_format: str) -> None:
    """An image folder's val/ holds the classes of its train/ (CIFAR's batches and WebDataset shards share one list
    with training): checked from the class folders alone, before anything is listed or written."""
    train, val = Path(root) / "train", Path(root) / "val"
    if data_format != "imagefolder" or not train.is_dir() or not val.is_dir():
        return
    try:
        expected, found = (torchvision.datasets.folder.find_classes(str(split))[0] for split in (train, val))
    except FileNotFoundError:  # no class folders: opening the split says so
        return
    check_same_classes(expected, found, where=f"{root}/val", expected_are="of train/")


def open_dataset(root: str | Path, data_format: str, *, train: bool, index_dir: str | Path | None = None) -> Dataset:
    """``data.format``: "imagefolder" (root/train, root/val), "cifar" (the python batches in root), "idx" (MNIST's
    four files in root), "webdataset" (shards in root/train, root/val, written by `residual data shard`).
    ``index_dir``: where an image folder's sample index is kept (data.index_dir: data_pipeline.folder_index)."""
    root = Path(root)
    split = "train" if train else "val"
    if data_format == "cifar":
        return CifarDataset(root, train=train)
    if data_format == "idx":
        from data_pipeline.idx import IdxDataset

        return IdxDataset(root, train=train)
    if data_format == "webdataset":
        from data_pipeline.webdataset import WebDatasetDataset

        return WebDatasetDataset(root / split)
    index = Path(index_dir) / f"{split}.npz" if index_dir is not None else None
    return ImageFolderDataset(root / split, index)
