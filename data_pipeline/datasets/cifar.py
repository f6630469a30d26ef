"""CIFAR-10's and CIFAR-100's python batches, read whole into one uint8 N x 3 x 32 x 32 tensor
(data_pipeline.cifar_tensors augments it in batches on the training device)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from data_pipeline.datasets.labels import first_outside
from data_pipeline.errors import UserError, outside_the_classes

CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"
# CIFAR-100's python layout: one training file and one test file, the 100 classes' labels under b"fine_labels"
# (b"coarse_labels" holds the 20 superclasses), their names in meta's b"fine_label_names"
CIFAR100_FILES, CIFAR100_META = {True: "train", False: "test"}, "meta"


def _read_cifar_batch(path: Path) -> dict:
    if not path.is_file():
        raise UserError(
            f"{path}: CIFAR batch file missing (expected CIFAR-10's data_batch_1..5 and test_batch, or "
            f"CIFAR-100's train and test)"
        )
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
        meta, names_key = (
            (root / CIFAR100_META, b"fine_label_names") if hundred else (root / "batches.meta", b"label_names")
        )
        if meta.is_file():
            self.classes = [name.decode() for name in _read_cifar_batch(meta)[names_key]]
            files = np.repeat(np.arange(len(names)), [len(batch[key]) for batch in batches])
            index = first_outside(self.labels.numpy(), len(self.classes))
            if index is not None:
                number = index - int(np.searchsorted(files, files[index]))
                raise UserError(
                    f"{root / names[files[index]]}: label {int(self.labels[index])} of image {number} is "
                    f"{outside_the_classes(len(self.classes), meta)}"
                )
        else:
            self.classes = [str(i) for i in range(int(self.labels.max()) + 1)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])
