"""Which samples a rank sees, and with which randomness, on both backends: each epoch a seeded permutation cut into
global batches, each rank its slice of every batch; seeds that are functions of (seed, epoch, position) alone, so
that order and augmentation survive a resume and do not depend on worker or rank counts (splitmix64's finalizer,
vectorized over numpy's uint64, whose arithmetic wraps modulo 2**64); each rank's contiguous share of the
validation set."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import Sampler

from data_pipeline.config import DataConfig
from data_pipeline.errors import UserError

Order = TypeVar("Order", torch.Tensor, np.ndarray)  # an epoch's permutation of the data set

GOLDEN = 0x9E3779B97F4A7C15
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def splitmix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer of each uint64: every output bit depends on every input bit."""
    with np.errstate(over="ignore"):
        mixed = (values ^ (values >> np.uint64(30))) * np.uint64(MIX1)
        mixed = (mixed ^ (mixed >> np.uint64(27))) * np.uint64(MIX2)
    return mixed ^ (mixed >> np.uint64(31))


def sample_seeds(seed: int, epoch: int, positions: np.ndarray) -> np.ndarray:
    """A well-mixed 32-bit seed for each (seed, epoch, position): torch's generator keeps only the low 32 bits of a
    seed, so the parts cannot simply be stacked into a 64-bit number."""
    base = np.uint64((seed * GOLDEN + epoch * MIX1) % 2**64)
    with np.errstate(over="ignore"):
        stacked = base + np.asarray(positions).astype(np.uint64) * np.uint64(MIX2)  # -1 wraps to 2**64 - 1
    return splitmix64(stacked) & np.uint64(2**32 - 1)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    return int(sample_seeds(seed, epoch, np.array([position]))[0])


def sample_uniforms(seeds: np.ndarray, count: int) -> np.ndarray:
    """``count`` uniforms in [0, 1) for each seed (N x count), each a function of its seed and column alone: the
    top 53 bits of splitmix64 of (seed, column)."""
    columns = np.arange(1, count + 1, dtype=np.uint64) * np.uint64(GOLDEN)
    with np.errstate(over="ignore"):
        keys = np.asarray(seeds).astype(np.uint64)[:, None] * np.uint64(MIX1) + columns
    return (splitmix64(keys) >> np.uint64(11)).astype(np.float64) * 2.0**-53


class ShardedEpochSampler(Sampler[tuple[int, int]]):
    """A seeded permutation per epoch, cut into whole global batches (the tail that does not fill one is left for
    a later epoch's permutation); rank r takes the r-th slice of every global batch, so the ranks' union of batch k
    is exactly batch k of a single process with the global batch. Yields (dataset index, augmentation seed).

    With ``repeats`` > 1 (repeated augmentation, data.ra_reps): an epoch is as many samples as the data set, but
    of its first 1/repeats images in the permutation, each ``repeats`` times, the copies on different ranks
    where there are enough (torchvision's RASampler: copy c of an image goes to rank (its place + c) mod world);
    each copy's augmentation comes from its own position, so the copies differ."""

    def __init__(
        self, dataset_size: int, *, global_batch: int, rank: int, world_size: int, seed: int, repeats: int = 1
    ) -> None:
        self.dataset_size = dataset_size
        self.world_size = world_size
        self.repeats = repeats
        self.global_batch = global_batch
        self.per_rank = global_batch // world_size
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset_size // self.global_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.per_rank

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation of the data set."""
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, -1))
        order = torch.randperm(self.dataset_size, generator=generator)
        if self.repeats == 1:
            return order
        # RASampler's stream (each image `repeats` times), dealt out to the ranks in turn: rank r's j-th sample of
        # batch k is the stream's (k * per_rank + j) * world + r-th
        stream = order.repeat_interleave(self.repeats)[: self.dataset_size]
        used = self.batches_per_epoch * self.global_batch
        dealt = stream[:used].reshape(-1, self.per_rank, self.world_size).transpose(1, 2).reshape(-1)
        return torch.cat([dealt, stream[used:]])

    def rank_share(self, order: Order, epoch: int, batch: int) -> tuple[Order, np.ndarray]:
        """This rank's share of global batch ``batch`` of an epoch whose ``order`` is given (a tensor on any device,
        or an array): its data set indices, a slice of ``order``, and their augmentation seeds."""
        start = batch * self.global_batch + self.rank * self.per_rank
        positions = np.arange(start, start + self.per_rank)
        return order[start : start + self.per_rank], sample_seeds(self.seed, epoch, positions)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.epoch_order(self.epoch)
        for batch in range(self.start_batch, self.batches_per_epoch):
            indices, seeds = self.rank_share(order, self.epoch, batch)
            yield from zip(indices.tolist(), seeds.tolist(), strict=True)


def training_sampler(
    config: DataConfig, dataset_size: int, *, rank: int, world_size: int, seed: int
) -> ShardedEpochSampler:
    """The sampler of every backend's training loader: data.batch_size images a step, data.ra_reps copies."""
    if dataset_size < config.batch_size:
        raise UserError(f"data.batch_size={config.batch_size}: larger than the {dataset_size} training images")
    return ShardedEpochSampler(
        dataset_size,
        global_batch=config.batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        repeats=config.ra_reps,
    )


def val_share(size: int, *, rank: int, world_size: int) -> range:
    """Rank r's contiguous share of a val set of ``size`` images: every image exactly once over all ranks, no
    padding duplicates and no dropped tail, so summed counts are exact."""
    return range(rank * size // world_size, (rank + 1) * size // world_size)
