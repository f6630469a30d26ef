"""The torchvision path: DataLoaders over data_pipeline.datasets with data_pipeline.augment.transforms.

Order and augmentation are functions of (seed, epoch, position) alone: each epoch is a seeded permutation, every
sample's random augmentation is drawn from its own seed, and a loader can start at any batch of an epoch. So a
resumed run sees the same images with the same crops, whatever the number of loader workers.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from data_pipeline.augment.transforms import (
    build_eval_transform,
    build_train_transform,
    normalize_batch,
    normalizes_in_batches,
    seed_cpu_generator,
)
from data_pipeline.config import DataConfig
from data_pipeline.damaged import CorruptImage, SkippingCorrupt, left_out
from data_pipeline.datasets import open_dataset
from data_pipeline.errors import UserError, from_worker_traceback
from data_pipeline.sampling import ShardedEpochSampler, training_sampler, val_share

log = logging.getLogger(__name__)

CPU = torch.device("cpu")
Batch = tuple[torch.Tensor, torch.Tensor]  # images (N x 3 x H x W, normalized float32), labels (N, int64)


class AugmentedDataset(Dataset):
    """Applies the training transform to the epoch's crop size to sample ``index``, with the torch RNG seeded by the
    sampler's seed (``CropSampler``'s keys); uint8 out unless ``normalize`` (else the batches are normalized whole:
    ``TrainLoader``)."""

    def __init__(self, dataset: Dataset, config: DataConfig, *, normalize: bool) -> None:
        self.dataset = dataset
        self.config = config
        self.normalize = normalize
        self.transforms: dict[int, v2.Compose] = {}  # per crop size, built where first needed (each worker)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, int]:
        index, seed, crop = key
        image, label = self.dataset[index]
        if crop not in self.transforms:
            self.transforms[crop] = build_train_transform(self.config, crop, normalize=self.normalize)
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched (num_workers=0)
            seed_cpu_generator(seed)
            return self.transforms[crop](image), label


class CropSampler(Sampler[tuple[int, int, int]]):
    """The sampler's (index, seed) keys with the epoch's training crop (data.progressive), for ``AugmentedDataset``."""

    def __init__(self, sampler: ShardedEpochSampler, config: DataConfig) -> None:
        self.sampler, self.config = sampler, config

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        crop = self.config.train_crop(self.sampler.epoch)
        return ((index, seed, crop) for index, seed in self.sampler)


@dataclass
class TrainLoader:
    loader: DataLoader
    sampler: ShardedEpochSampler
    classes: list[str]
    channels: int = 3  # image files are decoded to RGB
    normalize: DataConfig | None = None  # uint8 batches from the workers, normalized whole on ``device``
    device: torch.device = CPU

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from ``start_batch`` on."""
        self.sampler.set_epoch(epoch, start_batch)
        batches = from_workers(self.loader)
        if self.normalize is None:
            return batches
        return (
            (normalize_batch(images.to(self.device, non_blocking=True), self.normalize), labels)
            for images, labels in batches
        )


def from_workers(loader: DataLoader) -> Iterator[Batch]:
    """The loader's batches. DataLoader re-raises an exception of a worker process with the worker's traceback for
    its message (as a RuntimeError where the type takes other arguments): a UserError comes out as its one line."""
    try:
        yield from loader
    except (UserError, RuntimeError) as error:
        if "in DataLoader worker process" not in str(error) or (raised := from_worker_traceback(str(error))) is None:
            raise
        raise raised from None


@dataclass
class EvalBatches:
    """An evaluation's DataLoader, through ``from_workers``."""

    loader: DataLoader

    def __iter__(self) -> Iterator[Batch]:
        return from_workers(self.loader)


def ignore_interrupts(worker_id: int = 0) -> None:
    """In a loader process: Ctrl-C is the trainer's to answer. The terminal sends SIGINT to the whole process
    group, and the trainer finishes its step and writes a checkpoint; a worker that died of it would end the epoch
    under it ("DataLoader worker exited unexpectedly")."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def interrupts_ignored() -> Iterator[None]:
    """For processes started in here (DALI's reader processes, spawned): they inherit SIGINT ignored, through fork
    and exec alike, and Python leaves an ignored SIGINT so. A Ctrl-C in this short window is lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _loader_options(config: DataConfig) -> dict:
    return {
        "num_workers": config.workers,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": config.workers > 0,
        "worker_init_fn": ignore_interrupts if config.workers > 0 else None,
    }


def build_torch_train_loader(
    config: DataConfig, *, rank: int, world_size: int, seed: int, device: torch.device = CPU
) -> TrainLoader:
    """Image files (ImageFolder, WebDataset shards) read and augmented one at a time in DataLoader workers."""
    assert not config.in_memory, "CIFAR and IDX data go through data_pipeline.cifar_tensors"
    dataset = open_dataset(config.root, config.format, train=True, index_dir=config.index_dir)
    if config.skip_corrupt:
        dataset = SkippingCorrupt(dataset)
    sampler = training_sampler(config, len(dataset), rank=rank, world_size=world_size, seed=seed)
    batched = normalizes_in_batches(config)
    loader = DataLoader(
        AugmentedDataset(dataset, config, normalize=not batched),
        batch_size=sampler.per_rank,
        sampler=CropSampler(sampler, config),
        drop_last=True,
        **_loader_options(config),
    )
    return TrainLoader(loader, sampler, dataset.classes, normalize=config if batched else None, device=device)


class _Transformed(Dataset):
    """An evaluation's views of each image. With ``data.skip_corrupt`` an image that cannot be decoded is left out
    of the evaluation (None, dropped by ``collate_views``; warned about): the counts are those of the others."""

    def __init__(self, dataset: Dataset, transform: torch.nn.Module, *, skip_corrupt: bool) -> None:
        self.dataset, self.transform, self.skip_corrupt = dataset, transform, skip_corrupt

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        try:
            image, label = self.dataset[index]
        except CorruptImage as error:
            if not self.skip_corrupt:
                raise
            left_out(error)
            return None
        return self.transform(image), label


def collate_views(samples: list[tuple[object, int] | None]) -> tuple[object, torch.Tensor]:
    """Stack the views of a batch where their shapes allow (center: B x C x H x W, tencrop: B x 10 x C x H x W);
    multi-scale views stay one list per image. Images left out (None) are dropped; a batch of none is empty."""
    samples = [sample for sample in samples if sample is not None]
    if not samples:
        return torch.empty(0), torch.empty(0, dtype=torch.int64)
    views, labels = zip(*samples, strict=True)
    stacked = torch.stack(views) if isinstance(views[0], torch.Tensor) else list(views)
    return stacked, torch.tensor(labels, dtype=torch.int64)


def build_torch_val_loader(
    config: DataConfig,
    *,
    rank: int,
    world_size: int,
    batch_per_rank: int,
    protocol: str = "center",
    scales: tuple[int, ...] = (),
) -> EvalBatches:
    """Rank r reads the r-th contiguous share of the val set: every image exactly once over all ranks, no padding
    duplicates and no dropped tail, so summed counts are exact."""
    dataset = open_dataset(config.root, config.format, train=False, index_dir=config.index_dir)
    return build_eval_loader(
        dataset,
        config,
        rank=rank,
        world_size=world_size,
        batch_per_rank=batch_per_rank,
        protocol=protocol,
        scales=scales,
    )


def build_eval_loader(
    dataset: Dataset,
    config: DataConfig,
    *,
    rank: int,
    world_size: int,
    batch_per_rank: int,
    protocol: str,
    scales: tuple[int, ...],
) -> EvalBatches:
    transform = build_eval_transform(config, protocol, scales)
    share = torch.utils.data.Subset(
        _Transformed(dataset, transform, skip_corrupt=config.skip_corrupt),
        val_share(len(dataset), rank=rank, world_size=world_size),
    )
    options = _loader_options(config) | {"persistent_workers": False}
    return EvalBatches(DataLoader(share, batch_size=batch_per_rank, shuffle=False, collate_fn=collate_views, **options))
