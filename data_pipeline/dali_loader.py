"""The DALI path (``data.backend=dali``): the paper's augmentations as DALI pipelines, on the GPU (JPEG decoding
with ``device="mixed"``, every op on the GPU, CUDA tensors out) or, without one, in DALI's CPU-only mode
(``device_id=None``). ``data.device`` forces either; the choice is logged.

Order, sharding and resume are the torchvision path's: the same ``ShardedEpochSampler`` picks each rank's images
of each batch, and every random parameter of a sample's augmentation (scale, crop position, flip, lighting) is
drawn from that sample's own seed in Python and fed to the pipeline with the encoded image. So a DALI epoch can
start at any batch, and a resumed run sees the same crops, with no reader state to checkpoint. The pipelines
receive encoded files (ImageFolder) or the in-memory CIFAR arrays through ``external_source``; with
``data.workers > 0`` the files are read by that many DALI worker processes (parallel external source).

Batches are the torch path's: N x 3 x H x W normalized float32 images and int64 labels.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from data_pipeline.config import DataConfig
from data_pipeline.damaged import DAMAGE, CorruptImage, SkipCorrupt, damage, left_out
from data_pipeline.datasets import CifarDataset, ImageFolderDataset, open_dataset
from data_pipeline.datasets.idx import IdxDataset
from data_pipeline.datasets.webdataset import WebDatasetDataset
from data_pipeline.errors import UserError, from_worker_traceback
from data_pipeline.sampling import (
    ShardedEpochSampler,
    sample_seed,
    sample_uniforms,
    training_sampler,
    val_share,
)
from data_pipeline.torch_loader import Batch, interrupts_ignored
from data_pipeline.transforms import (
    CIFAR_PADDING,
    ERASE_COLUMNS,
    PCA_EIGENVALUES,
    PCA_EIGENVECTORS,
    RRC_TRIES,
    cifar_crop_flip,
    erase_windows,
)

log = logging.getLogger(__name__)


def dali_device(requested: str) -> str:
    """ "gpu" when asked for or (``auto``) when CUDA is present, else "cpu"."""
    if requested == "gpu" and not torch.cuda.is_available():
        raise UserError("data.device=gpu: no CUDA device here; data.device=cpu runs DALI in its CPU-only mode")
    return "gpu" if requested == "gpu" or (requested == "auto" and torch.cuda.is_available()) else "cpu"


def train_parameters(config: DataConfig, seed: int, size: tuple[int, int] | None = None,
                     crop: int | None = None) -> dict[str, np.ndarray]:  # fmt: skip
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
        resized = np.stack([np.where(width <= height, shorter, np.floor(width * scale)),
                            np.where(height <= width, shorter, np.floor(height * scale))], axis=1)  # fmt: skip
        corner = np.floor(u[:, 2:4] * (resized - crop + 1))  # RandomCrop's uniform integer corner
        anchor, shape = corner / scale[:, None], np.repeat((crop / scale)[:, None], 2, axis=1)
    size = np.full((len(seeds), 2), crop, dtype=np.float32)
    return {"anchor": anchor.astype(np.float32), "shape": shape.astype(np.float32), "flip": flip, "mean": mean,
            "size": size, **erase}  # fmt: skip


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
    center = np.stack([np.where(in_ratio < 3 / 4, width, np.where(in_ratio > 4 / 3, np.round(height * 4 / 3), width)),
                       np.where(in_ratio < 3 / 4, np.round(width * 4 / 3), height)], axis=1)  # fmt: skip
    center_anchor = np.floor((np.stack([width, height], axis=1) - center) / 2)
    missed = ~fits.any(axis=1)
    return np.where(missed[:, None], center_anchor, anchor), np.where(missed[:, None], center, crop)


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


def _normalization(config: DataConfig) -> dict:
    return {"mean": [255 * m for m in config.mean], "std": [255 * s for s in config.std]}


def _pipeline_options(batch: int, device: str, config: DataConfig) -> dict:
    """What every pipeline here is built with: its batch, the GPU or DALI's CPU-only mode (``device_id=None``),
    ``data.threads`` CPU threads (as training resolves "auto": trainer.hardware.plan_threads; alone, this process's
    cores), and ``data.workers`` reader processes started with spawn (CUDA may be initialised already)."""
    threads = config.threads if config.threads != "auto" else len(os.sched_getaffinity(0))
    return dict(
        batch_size=batch,
        num_threads=threads,
        device_id=torch.cuda.current_device() if device == "gpu" else None,
        py_num_workers=max(1, _workers(config)),
        py_start_method="spawn",
    )


def _workers(config: DataConfig) -> int:
    return config.workers if config.workers != "auto" else 1


def _external_source_options(config: DataConfig) -> dict:
    """A source's batches come from the reader processes, one whole batch per process: as many batches in flight as
    processes, or one process works while the others wait (DALI's default depth is 1)."""
    workers = _workers(config)
    return {"parallel": True, "prefetch_queue_depth": max(2, workers)} if workers > 0 else {"parallel": False}


def build_train_pipeline(source: TrainSource, config: DataConfig, device: str, *, batch: int):
    from nvidia.dali import fn, pipeline_def, types

    names = ["data", "labels", *source.parameter_names()]
    # auto_aug chooses ops with DALI's conditionals; its generator's seed: the start's (epoch, batch)
    seed = sample_seed(source.sampler.seed, source.first_epoch, source.first_batch)
    options = _pipeline_options(batch, device, config) | {"enable_conditionals": config.auto_augment != "none",
                                                          "seed": seed % 2**31}  # fmt: skip

    @pipeline_def(**options)
    def pipeline():
        layouts = ["HWC" if config.in_memory else "", *[""] * (len(names) - 1)]
        outputs = fn.external_source(
            source=source,
            num_outputs=len(names),
            batch=True,
            batch_info=True,
            layout=layouts,
            **_external_source_options(config),
        )
        given = {name: outputs[position] for position, name in enumerate(names)}  # (autograph has no zip(strict))
        labels = given["labels"]
        if config.in_memory:
            images = given["data"].gpu() if device == "gpu" else given["data"]
            side = source.reader.side
            padded = fn.slice(  # a side x side window at (x, y) in -4..4 of the zero-padded image
                images, start=given["offset"], shape=[side, side], axis_names="WH", out_of_bounds_policy="pad",
                fill_values=0,
            )  # fmt: skip
            images = fn.crop_mirror_normalize(
                auto_augment(padded, config), mirror=given["flip"], dtype=types.FLOAT, output_layout="CHW",
                **_normalization(config),
            )  # fmt: skip
        else:
            images = fn.decoders.image_slice(  # decodes the crop's window only
                given["data"], given["anchor"], given["shape"], axis_names="WH", output_type=types.RGB,
                normalized_anchor=False, normalized_shape=False, device="mixed" if device == "gpu" else "cpu",
                adjust_orientation=False,  # as torchvision (and Pillow's header size, the window's frame): no EXIF turn
                jpeg_fancy_upsampling=True,  # the GPU's chroma upsampling as libjpeg-turbo's (Pillow, DALI's CPU)
            )  # fmt: skip
            images = fn.resize(images, size=given["size"], antialias=True)
            images = fn.crop_mirror_normalize(
                auto_augment(images, config),
                mirror=given["flip"],
                mean=given["mean"],
                std=_normalization(config)["std"],
                dtype=types.FLOAT,
                output_layout="CHW",
            )
        if config.random_erase > 0:
            images = fn.erase(images, anchor=given["erase_anchor"], shape=given["erase_shape"], axis_names="HW",
                              fill_value=0.0)  # fmt: skip
        return images, labels.gpu() if device == "gpu" else labels

    return pipeline()


def auto_augment(images, config: DataConfig):
    """data.auto_augment on a batch of uint8 HWC images, with nvidia.dali.auto_aug (its ops and magnitudes drawn
    by DALI's generator, from the pipeline's seed: not per sample)."""
    from nvidia.dali.auto_aug import rand_augment, trivial_augment

    if config.auto_augment == "trivial_augment_wide":
        return trivial_augment.trivial_augment_wide(images)
    if config.auto_augment == "rand_augment":
        return rand_augment.rand_augment(images, n=config.rand_augment_ops, m=config.rand_augment_magnitude)
    return images


@dataclass
class DaliTrainLoader:
    """The DALI counterpart of ``TrainLoader``: ``epoch(e, start_batch)`` yields (images, labels) batches."""

    source: TrainSource
    sampler: ShardedEpochSampler
    classes: list[str]
    device: str
    channels: int
    _pipeline: object = None
    _next_epoch: tuple[int, int] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """The pipeline runs on into the next epoch when the last one was read to its end; a new start, a jump or
        an epoch left unfinished gets a pipeline of its own."""
        if self._next_epoch != (epoch, start_batch):
            self.source.first_epoch, self.source.first_batch = epoch, start_batch
            self._pipeline = build_train_pipeline(
                self.source, self.source.config, self.device, batch=self.sampler.per_rank
            )
            with interrupts_ignored():  # its reader processes: Ctrl-C is the trainer's
                self._pipeline.build()
        self._next_epoch = None

        def finished() -> None:
            self._next_epoch = (epoch + 1, 0)

        return run_pipeline(
            self._pipeline, finished, lambda produced: self.source.explain(epoch, start_batch, produced)
        )


def run_pipeline(pipeline, finished, explain=lambda produced: None) -> Iterator[Batch]:
    """Batches until the source's epoch ends; the pipeline is then reset for the next one and ``finished()``.
    When DALI fails on a batch, ``explain(batches produced)`` names the files at fault, where it can."""
    produced = 0
    while True:
        try:
            images, labels = pipeline.run()
        except StopIteration:
            pipeline.reset()
            finished()
            return
        except Exception as error:
            if "received from worker" in str(error) and (raised := from_worker_traceback(str(error))) is not None:
                raise raised from None  # raised in a reader worker process: its one line
            if not isinstance(error, RuntimeError) or (culprits := explain(produced)) is None:
                raise
            raise UserError(f"{culprits} (DALI: {str(error).strip().splitlines()[-1][:200]})") from None
        produced += 1
        yield to_torch(images, torch.float32), to_torch(labels, torch.int64)


def to_torch(tensors, dtype: torch.dtype) -> torch.Tensor:
    """A dense DALI TensorList as a torch tensor on its device (a copy: DALI reuses its buffers)."""
    from nvidia.dali.backend import TensorListGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray

    tensor = tensors.as_tensor()
    if isinstance(tensors, TensorListGPU):
        out = torch.empty(tensor.shape(), dtype=dtype, device=torch.device("cuda", torch.cuda.current_device()))
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream())
        return out
    return torch.from_numpy(np.array(tensor)).to(dtype)


def build_dali_train_loader(config: DataConfig, *, rank: int, world_size: int, seed: int) -> DaliTrainLoader:
    dataset = open_dataset(config.root, config.format, train=True, index_dir=config.index_dir)
    sampler = training_sampler(config, len(dataset), rank=rank, world_size=world_size, seed=seed)
    device = dali_device(config.device)
    log.info("data: DALI %s pipeline (%s), %d reader workers", device, config.format, config.workers)
    source = TrainSource(SampleReader(dataset), sampler, config)
    return DaliTrainLoader(source, sampler, dataset.classes, device, source.reader.channels)


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


def ten_crop_windows() -> list[tuple[float, float, int]]:
    """(relative x, relative y, mirror) of the ten views in torchvision's TenCrop order: the corners and center of
    the image, then those of its mirror image (whose top-left crop is the mirrored top-right one, and so on)."""
    five = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5)]
    mirrored = [(1.0, 0.0), (0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (0.5, 0.5)]
    return [(x, y, 0) for x, y in five] + [(x, y, 1) for x, y in mirrored]


def build_eval_pipeline(source: EvalSource, config: DataConfig, device: str, *, protocol: str):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(**_pipeline_options(source.batch, device, config))
    def pipeline():
        layout = "HWC" if config.in_memory else ""
        data, labels = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                          layout=[layout, ""], **_external_source_options(config))  # fmt: skip
        normalize = dict(dtype=types.FLOAT, output_layout="CHW", **_normalization(config))
        if config.in_memory:  # the test image as is
            images = fn.crop_mirror_normalize(data.gpu() if device == "gpu" else data, **normalize)
        else:
            images = fn.decoders.image(data, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB,
                                       adjust_orientation=False, jpeg_fancy_upsampling=True)  # fmt: skip
            images = fn.resize(images, resize_shorter=config.val_resize, antialias=True)
            crop = (config.eval_crop, config.eval_crop)
            if protocol == "center":
                images = fn.crop_mirror_normalize(images, crop=crop, **normalize)
            else:  # flip: B x 2 x 3 x crop x crop; tencrop: B x 10 x ...
                windows = [(0.5, 0.5, 0), (0.5, 0.5, 1)] if protocol == "flip" else ten_crop_windows()
                views = [fn.crop_mirror_normalize(images, crop=crop, crop_pos_x=x, crop_pos_y=y, mirror=m, **normalize)
                         for x, y, m in windows]  # fmt: skip
                images = fn.stack(*views, axis=0)
        return images, labels.gpu() if device == "gpu" else labels

    return pipeline()


class DaliEvalLoader:
    """Iterates over this rank's val share; the pipeline is built at the first pass (DALI's memory pools never
    shrink: no eval pipeline is held before an evaluation needs it) and reused by the later ones."""

    def __init__(self, source: EvalSource, config: DataConfig, device: str, protocol: str) -> None:
        self.source, self.config, self.device, self.protocol = source, config, device, protocol
        self.pipeline, self.ready = None, False  # ready: built, or the last pass read to its end

    def __iter__(self) -> Iterator[Batch]:
        if not self.ready:
            self.pipeline = build_eval_pipeline(self.source, self.config, self.device, protocol=self.protocol)
            with interrupts_ignored():
                self.pipeline.build()
        self.ready = False
        return run_pipeline(self.pipeline, lambda: setattr(self, "ready", True), self.source.explain)


def build_dali_val_loader(
    config: DataConfig, *, rank: int, world_size: int, batch_per_rank: int, protocol: str
) -> DaliEvalLoader:
    if protocol == "multiscale":
        raise UserError("multiscale evaluation runs on the torch path (data.backend=torch or `residual eval`)")
    dataset = open_dataset(config.root, config.format, train=False, index_dir=config.index_dir)
    share = val_share(len(dataset), rank=rank, world_size=world_size)
    source = EvalSource(SampleReader(dataset), share, batch_per_rank, skip_corrupt=config.skip_corrupt)
    return DaliEvalLoader(source, config, dali_device(config.device), protocol)
