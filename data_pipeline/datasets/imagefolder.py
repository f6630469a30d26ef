"""An ImageFolder tree, ``root/<class>/<image>`` as ImageNet's train/ and val/ folders, read into (image, label)
samples: uint8 C x H x W tensors decoded by Pillow (data_pipeline.damaged)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from data_pipeline.damaged import decode_rgb
from data_pipeline.datasets.folder_index import folder_index


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
