"""The loaders the trainer asks for, from the backend and format the config names: CIFAR-format data as tensors on
the training device (``data.backend=torch``), torchvision's DataLoader for image files (``data.backend=torch``), or
DALI (``data.backend=dali``). All yield the same batches: normalized float32 N x 3 x H x W (or N x 10 x 3 x H x W
for ten-crop) images and int64 labels, in the same order."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch

from data_pipeline.config import DataConfig
from data_pipeline.torch_loader import CPU, Batch, build_torch_train_loader, build_torch_val_loader


class TrainBatches(Protocol):
    """What every backend's training loader offers the loop."""

    classes: list[str]
    channels: int  # of the images: 3 (RGB) or 1 (grey)

    @property
    def batches_per_epoch(self) -> int: ...

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]: ...


def uses_tensor_path(config: DataConfig) -> bool:
    """CIFAR-format and IDX data on the torch backend is held as tensors: no loader worker processes."""
    return config.backend == "torch" and config.in_memory


def build_train_loader(
    config: DataConfig, *, rank: int, world_size: int, seed: int, device: torch.device = CPU
) -> TrainBatches:
    if config.backend == "dali":
        from data_pipeline.dali.loader import build_dali_train_loader

        return build_dali_train_loader(config, rank=rank, world_size=world_size, seed=seed)
    if uses_tensor_path(config):
        from data_pipeline.cifar_tensors import build_cifar_train_loader

        return build_cifar_train_loader(config, rank=rank, world_size=world_size, seed=seed, device=device)
    return build_torch_train_loader(config, rank=rank, world_size=world_size, seed=seed, device=device)


def build_val_loader(
    config: DataConfig,
    *,
    rank: int,
    world_size: int,
    batch_per_rank: int,
    protocol: str = "center",
    scales: tuple[int, ...] = (),
    device: torch.device = CPU,
) -> Any:
    """Multi-scale views differ in shape per image and scale: they come from the torch path on either backend."""
    if config.backend == "dali" and protocol != "multiscale":
        from data_pipeline.dali.loader import build_dali_val_loader

        return build_dali_val_loader(
            config, rank=rank, world_size=world_size, batch_per_rank=batch_per_rank, protocol=protocol
        )
    if uses_tensor_path(config) and protocol == "center":
        from data_pipeline.cifar_tensors import CifarTensorEval

        return CifarTensorEval(config, rank=rank, world_size=world_size, batch_per_rank=batch_per_rank, device=device)
    return build_torch_val_loader(
        config, rank=rank, world_size=world_size, batch_per_rank=batch_per_rank, protocol=protocol, scales=scales
    )
