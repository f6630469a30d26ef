"""WebDataset shards: tar files of samples ``KEY.jpg`` + ``KEY.cls`` (the integer label as text), each with the
index that DALI's ``fn.readers.webdataset`` reads (``.idx``: "v1.2 N", then per sample its files' extension, data
offset, size and name), and ``.labels`` (one label per line, in index order) so that opening a set reads no image.

``residual data shard`` writes them (data_pipeline.prepare.shard). ``WebDatasetDataset`` reads a folder of shards
by random access through the indexes: the sampler, augmentations and both backends work as on folders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from data_pipeline.damaged import decode_rgb
from data_pipeline.datasets.labels import first_outside
from data_pipeline.errors import UserError, outside_the_classes

INDEX_VERSION = "v1.2"


class WebDatasetDataset(Dataset):
    """The samples of every ``*.tar`` in ``root`` (sorted), read through their ``.idx`` indexes; held as arrays
    (each sample's shard, image offset, size and label), as image folders' are (data_pipeline.datasets.folder_index)."""

    def __init__(self, root: Path) -> None:
        shards = sorted(root.glob("*.tar"))
        if not shards:
            raise UserError(f"{root}: no .tar shards (`residual data shard` writes them)")
        self.shards = [str(shard) for shard in shards]
        tables = [np.array(read_index(shard), dtype=np.int64).reshape(-1, 3) for shard in shards]
        self.shard_of = np.concatenate([np.full(len(table), number, np.int32) for number, table in enumerate(tables)])
        self.offsets, self.sizes, labels = np.concatenate(tables).T
        self.labels = labels.astype(np.int32)
        classes = root.parent / "classes.txt"
        count = int(self.labels.max()) + 1
        self.classes = classes.read_text().split() if classes.is_file() else [str(i) for i in range(count)]
        index = first_outside(self.labels, len(self.classes))
        if index is not None:
            shard = self.shard_of[index]
            number = index - int(np.searchsorted(self.shard_of, shard))
            raise UserError(
                f"{self.shards[shard]}: sample {number} has label {self.labels[index]}, "
                f"{outside_the_classes(len(self.classes), classes)}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, index: int) -> str:
        return f"{self.shards[self.shard_of[index]]} (image at byte {self.offsets[index]})"

    def encoded(self, index: int) -> np.ndarray:
        shard = self.shards[self.shard_of[index]]
        return np.fromfile(shard, dtype=np.uint8, count=int(self.sizes[index]), offset=int(self.offsets[index]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return decode_rgb(self.encoded(index), self.name(index)), int(self.labels[index])


def read_index(shard: Path) -> list[tuple[int, int, int]]:
    """(offset of the image, its size, label) of each sample of ``shard``."""
    index = shard.with_suffix(".idx")
    if not index.is_file():
        raise UserError(f"{shard}: no index {index.name} (`residual data shard` writes one with each shard)")
    lines = index.read_text().splitlines()
    labels_file = shard.with_suffix(".labels")
    labels = [int(line) for line in labels_file.read_text().split()] if labels_file.is_file() else None
    samples = []
    for number, line in enumerate(lines[1:]):
        fields = line.split()
        files = {fields[i]: (int(fields[i + 1]), int(fields[i + 2]), fields[i + 3]) for i in range(0, len(fields), 4)}
        image = next((files[ext] for ext in ("jpg", "jpeg", "png", "webp") if ext in files), None)
        if image is None:
            raise UserError(f"{shard}: sample {number} has no image file ({', '.join(files)})")
        if labels is not None:
            label = labels[number]
        elif "cls" in files:
            offset, size, _ = files["cls"]
            label = int(np.fromfile(shard, dtype=np.uint8, count=size, offset=offset).tobytes())
        else:
            raise UserError(f"{shard}: sample {image[2].rsplit('.', 1)[0]} has no .cls label")
        samples.append((image[0], image[1], label))
    return samples
