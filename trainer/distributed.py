"""The launch environment, read once, and the process group and DDP wrap built from it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data_pipeline.errors import UserError


@dataclass(frozen=True)
class LaunchEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> LaunchEnv:
        """torchrun's RANK, WORLD_SIZE and LOCAL_RANK; a plain process is rank 0 of 1."""
        return cls(int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1)), int(environ.get("LOCAL_RANK", 0)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, launch: LaunchEnv) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(launch.local_rank)
        return torch.device("cuda", launch.local_rank)
    return torch.device("cpu")


def init_process_group(launch: LaunchEnv, device: torch.device) -> None:
    """NCCL on GPUs, gloo on CPU; torchrun's MASTER_ADDR/MASTER_PORT give the rendezvous."""
    if launch.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size)


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The sum over all ranks (on ``device`` for the collective, as NCCL needs); the tensor itself without a group."""
    if not dist.is_initialized():
        return values
    reduced = values.to(device)
    dist.all_reduce(reduced)
    return reduced.cpu()


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """For each flag, whether it is set on any rank: one collective, and every rank gets the same answer."""
    counts = all_reduce_sum(torch.tensor(flags, dtype=torch.int32), device)
    return [bool(count) for count in counts.tolist()]


def apply_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm statistics over the global batch (``model.sync_bn``): NCCL on GPUs only, as SyncBatchNorm is."""
    if device.type != "cuda":
        raise UserError(
            "model.sync_bn=true: SyncBatchNorm runs on GPUs only (it refuses CPU modules); on the CPU "
            "set model.sync_bn=false: BN statistics are then averaged over ranks before evaluations "
            "and checkpoints"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def average_bn_buffers(model: nn.Module) -> None:
    """Average BatchNorm running statistics over ranks, so that what is evaluated and saved is one model (each rank
    updates its own from its own images; DDP only copies rank 0's at the next forward, FSDP2 never)."""
    if not dist.is_initialized():
        return
    world_size = dist.get_world_size()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var):
                dist.all_reduce(buffer)
                buffer.div_(world_size)
