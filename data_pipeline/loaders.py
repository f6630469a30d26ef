"""The loaders the trainer asks for, from the backend the config names: torchvision (``data.backend=torch``) or
DALI (``data.backend=dali``). Both yield the same batches: normalized float32 N x 3 x H x W (or N x 10 x 3 x H x W
for ten-crop) images and int64 labels, in the same order."""

from __future__ import annotations

from typing import Any

from data_pipeline.config import DataConfig
from data_pipeline.torch_loader import build_train_loader as build_torch_train_loader
from data_pipeline.torch_loader import build_val_loader as build_torch_val_loader


def build_train_loader(config: DataConfig, *, rank: int, world_size: int, seed: int) -> Any:
    if config.backend == "dali":
        from data_pipeline.dali_loader import build_dali_train_loader

        return build_dali_train_loader(config, rank=rank, world_size=world_size, seed=seed)
    return build_torch_train_loader(config, rank=rank, world_size=world_size, seed=seed)


def build_val_loader(
    config: DataConfig, *, rank: int, world_size: int, batch_per_rank: int, protocol: str = "center",
    scales: tuple[int, ...] = (),
) -> Any:  # fmt: skip
    """Multi-scale views differ in shape per image and scale: they come from the torch path on either backend."""
    if config.backend == "dali" and protocol != "multiscale":
        from data_pipeline.dali_loader import build_dali_val_loader

        return build_dali_val_loader(
            config, rank=rank, world_size=world_size, batch_per_rank=batch_per_rank, protocol=protocol
        )
    return build_torch_val_loader(
        config, rank=rank, world_size=world_size, batch_per_rank=batch_per_rank, protocol=protocol, scales=scales
    )
