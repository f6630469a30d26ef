"""CIFAR-format and IDX data held as tensors (``data.backend=torch``, ``data.format=cifar|idx``): the whole set is
one uint8 N x C x H x W tensor on the training device (150 MB for CIFAR-10's 50,000 images, 47 MB for
Fashion-MNIST's 60,000), and each batch is gathered,
augmented and normalized there by batched tensor ops, as airbench and hlb-CIFAR10 do. No worker processes, no
Python work per image.

The batches are the same as the per-sample paths' (the DALI loader's, and torchvision's transforms applied to one
image at a time): order from ``ShardedEpochSampler``, each image's crop and flip from its own seed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torchvision.transforms import v2

from data_pipeline.augment.transforms import (
    after_crop,
    augment_cifar_batch,
    augment_each,
    erase_batch,
    normalize_batch,
    to_device,
)
from data_pipeline.config import DataConfig
from data_pipeline.datasets import CifarDataset, open_dataset
from data_pipeline.sampling import ShardedEpochSampler, training_sampler, val_share
from data_pipeline.torch_loader import Batch


class CifarTensorLoader:
    """The training batches of ``epoch`` from any ``start_batch``: functions of (seed, epoch, position) alone."""

    def __init__(self, dataset: CifarDataset, sampler: ShardedEpochSampler, config: DataConfig, device: torch.device):
        self.images = dataset.images.to(device)
        self.labels = dataset.labels.to(device)
        self.classes = dataset.classes
        self.channels = dataset.images.shape[1]
        self.sampler = sampler
        self.config = config
        # the auto-augmentation draws each image's ops from its seed, one image at a time (erasing is batched)
        auto = config.auto_augment != "none"
        self.per_image = v2.Compose(after_crop(config, lighting=False, erase=False)) if auto else None

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        order = to_device(self.sampler.epoch_order(epoch), self.images.device)
        for batch in range(start_batch, self.batches_per_epoch):
            indices, seeds = self.sampler.rank_share(order, epoch, batch)
            images = augment_cifar_batch(self.images[indices], seeds, flip=self.config.flip)
            if self.per_image is not None:
                images = augment_each(images, seeds, self.per_image)
            else:
                images = normalize_batch(images, self.config)
            if self.config.random_erase > 0:
                images = erase_batch(images, seeds, self.config.random_erase)
            yield images, self.labels[indices]


def build_cifar_train_loader(
    config: DataConfig, *, rank: int, world_size: int, seed: int, device: torch.device
) -> CifarTensorLoader:
    dataset = open_dataset(config.root, config.format, train=True)
    sampler = training_sampler(config, len(dataset), rank=rank, world_size=world_size, seed=seed)
    return CifarTensorLoader(dataset, sampler, config, device)


class CifarTensorEval:
    """This rank's contiguous share of the test set (every image once over all ranks), normalized in batches."""

    def __init__(self, config: DataConfig, *, rank: int, world_size: int, batch_per_rank: int, device: torch.device):
        dataset = open_dataset(config.root, config.format, train=False)
        share = val_share(len(dataset), rank=rank, world_size=world_size)
        self.images = dataset.images[share.start : share.stop].to(device)
        self.labels = dataset.labels[share.start : share.stop].to(device)
        self.classes = dataset.classes
        self.config = config
        self.batch = batch_per_rank

    def __iter__(self) -> Iterator[Batch]:
        for start in range(0, len(self.labels), self.batch):
            stop = start + self.batch
            yield normalize_batch(self.images[start:stop], self.config), self.labels[start:stop]
