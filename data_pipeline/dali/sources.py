"""What DALI's pipelines are fed: per sample the encoded file (or a CIFAR/IDX image from the arrays in memory), its
label and its augmentation's parameters, drawn in Python from the sample's own seed (data_pipeline.augment.draws)
in the order the torch path's sampler gives. Picklable, for DALI's reader processes; files that the header checks
flag are judged by data_pipeline.damaged."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from data_pipeline.augment.draws import batch_parameters, train_parameters
from data_pipeline.config import DataConfig
from data_pipeline.damaged import DAMAGE, CorruptImage, SkipCorrupt, damage, left_out
from data_pipeline.datasets import CifarDataset, ImageFolderDataset
from data_pipeline.datasets.idx import IdxDataset
from data_pipeline.datasets.webdataset import WebDatasetDataset
from data_pipeline.sampling import ShardedEpochSampler

JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # SOFn markers


def header_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header or a PNG's IHDR, without Pillow (its parse is most of a header
    check's cost); None for anything else or a header that does not parse. ``head``: the file's first bytes."""
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if not head.startswith(b"\xff\xd8"):
        return None
    position = 2
    while position + 9 <= len(head):
        if head[position] != 0xFF:
            return None
        marker = head[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in JPEG_FRAMES:
            height = int.from_bytes(head[position + 5 : position + 7], "big")
            width = int.from_bytes(head[position + 7 : position + 9], "big")
            return (width, height) if width and height else None
        position += 2 + int.from_bytes(head[position + 2 : position + 4], "big")
    return None


class SampleReader:
    """What a pipeline is fed per sample: the encoded file of an ImageFolder image (DALI decodes it) or a CIFAR
    image (H x W x C, from the arrays in memory), and its label. Picklable, for DALI's worker processes."""

    def __init__(self, dataset: ImageFolderDataset | CifarDataset | WebDatasetDataset) -> None:
        self.dataset = dataset if isinstance(dataset, WebDatasetDataset) else None  # reads at the indexed offsets
        # an image folder's FolderIndex: arrays, pickled to each reader process as a few buffers
        self.files = dataset.samples if isinstance(dataset, ImageFolderDataset) else None
        if isinstance(dataset, CifarDataset | IdxDataset):
            self.labels = dataset.labels.numpy()
            self.images = np.ascontiguousarray(dataset.images.permute(0, 2, 3, 1).numpy())
            self.side, self.channels = self.images.shape[2], self.images.shape[3]
        else:
            self.labels = self.files.labels if self.files is not None else dataset.labels
            self.side, self.channels = None, 3  # decoded to RGB

    def encoded(self, index: int) -> np.ndarray:
        if self.dataset is not None:
            return self.dataset.encoded(index)
        if self.files is None:
            return self.images[index]
        return np.fromfile(self.files.path(index), dtype=np.uint8)

    def label(self, index: int) -> np.ndarray:
        return np.array(self.labels[index], dtype=np.int64)

    def name(self, index: int) -> str:
        if self.files is not None:
            return self.files.path(index)
        if self.dataset is not None:
            return self.dataset.name(index)
        return f"image {index}"

    def inspect(self, encoded: np.ndarray) -> tuple[tuple[int, int] | None, str | None]:
        """An encoded file's (width, height) from its header, and why it is damaged if it is (None for a CIFAR
        image). Only a file that the header checks flag (a header that does not parse, a JPEG without its end
        marker) is decoded, to be judged by data_pipeline.damaged's rule and reason."""
        if encoded.ndim == 3:
            return None, None
        data = encoded.data  # no copy
        size = header_size(bytes(data[:65536]))
        if size is None:  # not a JPEG or PNG whose header parses: Pillow's reading of the header
            try:
                with Image.open(io.BytesIO(data)) as image:
                    size = image.size
            except DAMAGE:
                pass
        truncated = bytes(data[:2]) == b"\xff\xd8" and not bytes(data[-64:]).rstrip(b"\x00").endswith(b"\xff\xd9")
        if size is not None and not truncated:
            return size, None
        return size, damage(encoded)

    def undecodable(self, indices: Sequence[int]) -> str | None:
        """The samples among ``indices`` that are damaged, named with why (after DALI failed on their batch)."""
        bad = [(self.name(i), reason) for i in indices if (reason := damage(self.encoded(i)))]
        return "; ".join(f"{name}: cannot decode image ({reason})" for name, reason in bad) or None


class TrainSource:
    """The external source of a training pipeline: batch k of the epochs it was started for, as lists of
    per-sample arrays (encoded file or CIFAR image, label, augmentation parameters)."""

    def __init__(self, reader: SampleReader, sampler: ShardedEpochSampler, config: DataConfig) -> None:
        self.reader = reader
        self.sampler = sampler
        self.config = config
        self.first_epoch, self.first_batch = 0, 0
        self.skip_corrupt = SkipCorrupt(config.skip_corrupt)
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its order of the data set)

    def batch_samples(self, epoch: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's share of global batch ``batch`` of ``epoch``: dataset indices and augmentation seeds, as the
        sampler gives them (its epoch order computed once per epoch, not per batch)."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.sampler.epoch_order(epoch).numpy())
        indices, seeds = self.sampler.rank_share(self._order[1], epoch, batch)
        return indices.copy(), seeds  # a copy: ``batch`` puts a skipped file's replacement into it

    def samples(self, epoch: int, batch: int) -> list[tuple[int, int]]:
        return list(zip(*(values.tolist() for values in self.batch_samples(epoch, batch)), strict=True))

    def __call__(self, info) -> tuple[list[np.ndarray] | np.ndarray, ...]:
        """DALI's BatchInfo counts batches and epochs since the pipeline started: epoch k of it is our
        ``first_epoch + k``, which starts at ``first_batch`` when k == 0."""
        epoch = self.first_epoch + info.epoch_idx
        batch = info.iteration + (self.first_batch if info.epoch_idx == 0 else 0)
        if batch >= self.sampler.batches_per_epoch:
            raise StopIteration
        return self.batch(epoch, batch)

    def batch(self, epoch: int, batch: int) -> tuple[list[np.ndarray] | np.ndarray, ...]:
        """The encoded files (or CIFAR images), the labels and each parameter of the batch, the per-sample work
        only reading and a header check; the parameters drawn for the whole batch at once."""
        indices, seeds = self.batch_samples(epoch, batch)
        data, sizes = [], []
        for position, index in enumerate(indices.tolist()):
            index, encoded, size = self.usable(index)
            indices[position] = index
            data.append(encoded)
            sizes.append(size)
        sizes = None if self.config.in_memory else np.array(sizes)
        parameters = batch_parameters(self.config, seeds, sizes, self.reader.side or self.config.train_crop(epoch))
        labels = self.reader.labels[indices].astype(np.int64)
        return (data, labels, *(parameters[key] for key in sorted(parameters)))

    def usable(self, index: int) -> tuple[int, np.ndarray, tuple[int, int] | None]:
        """Sample ``index`` (its index, encoded file and size), or with data.skip_corrupt the next one whose file
        passes the cheap checks; without it, a file that fails them stops the run with its name."""

        def attempt(candidate: int) -> tuple[int, np.ndarray, tuple[int, int] | None]:
            encoded = self.reader.encoded(candidate)
            size, defect = self.reader.inspect(encoded)
            if defect is not None:
                raise CorruptImage(self.reader.name(candidate), defect)
            return candidate, encoded, size

        return self.skip_corrupt.first_usable(index, len(self.reader.labels), attempt)

    def explain(self, epoch: int, start: int, produced: int) -> str | None:
        """After DALI failed on a batch: the files of that batch Pillow cannot decode either, named."""
        batch = start + produced
        if batch >= self.sampler.batches_per_epoch:
            return None
        return self.reader.undecodable(self.batch_samples(epoch, batch)[0].tolist())

    def parameter_names(self) -> list[str]:
        return sorted(train_parameters(self.config, 0, None if self.config.in_memory else (1, 1)))


class EvalSource:
    """The external source of an evaluation pipeline: this rank's contiguous share of the val set in batches (the
    last one smaller), so that every image is counted exactly once over the ranks. With ``skip_corrupt`` a file
    that fails the cheap checks is left out of the evaluation (warned about)."""

    def __init__(self, reader: SampleReader, indices: range, batch: int, *, skip_corrupt: bool = False) -> None:
        self.reader, self.indices, self.batch, self.skip_corrupt = reader, indices, batch, skip_corrupt

    def chosen(self, batch: int) -> range:
        return self.indices[batch * self.batch : (batch + 1) * self.batch]

    def __call__(self, info) -> tuple[list[np.ndarray], list[np.ndarray]]:
        chosen = self.chosen(info.iteration)
        if len(chosen) == 0:
            raise StopIteration
        data, labels = [], []
        for index in chosen:
            encoded = self.reader.encoded(index)
            if self.skip_corrupt and (defect := self.reader.inspect(encoded)[1]) is not None:
                left_out(CorruptImage(self.reader.name(index), defect))
                continue
            data.append(encoded)
            labels.append(self.reader.label(index))
        return data, labels

    def explain(self, produced: int) -> str | None:
        """After DALI failed on a batch: the files of that batch Pillow cannot decode either, named."""
        return self.reader.undecodable(self.chosen(produced))
