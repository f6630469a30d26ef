"""The data sets on disk, read into (image, label) samples, one module per format: an ImageFolder tree of JPEGs
(imagefolder, with its sample index in folder_index), CIFAR-10's and CIFAR-100's python batches (cifar), MNIST's
IDX files (idx) and WebDataset shards (webdataset). Images come out as uint8 C x H x W tensors; augmentation is
data_pipeline.augment's business, and what counts as a damaged image data_pipeline.damaged's."""

from __future__ import annotations

from pathlib import Path

import torchvision
from torch.utils.data import Dataset

from data_pipeline.datasets.cifar import CifarDataset
from data_pipeline.datasets.idx import IdxDataset
from data_pipeline.datasets.imagefolder import ImageFolderDataset
from data_pipeline.datasets.labels import check_same_classes
from data_pipeline.datasets.webdataset import WebDatasetDataset


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
    ``index_dir``: where an image folder's sample index is kept (data.index_dir: .folder_index)."""
    root = Path(root)
    split = "train" if train else "val"
    if data_format == "cifar":
        return CifarDataset(root, train=train)
    if data_format == "idx":
        return IdxDataset(root, train=train)
    if data_format == "webdataset":
        return WebDatasetDataset(root / split)
    index = Path(index_dir) / f"{split}.npz" if index_dir is not None else None
    return ImageFolderDataset(root / split, index)
