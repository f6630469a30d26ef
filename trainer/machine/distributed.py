"""The launch environment, read once, the process group built from it, and the collectives the trainer uses."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from data_pipeline.errors import UserError

SLURM_PORT_BASE = 20000  # a SLURM job's rendezvous port: this + job id % 20000, unless MASTER_PORT is set
TRIAL_CPUS = "RESIDUAL_TRIAL_CPUS"  # set by a Ray Tune trial (cluster.sweep): the CPUs the trial was given


@dataclass(frozen=True)
class LaunchEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"  # "torchrun" | "slurm" | "none"
    local_world_size: int = 1  # ranks on this host
    rank_cpus: int | None = None  # CPUs the launcher gave each rank (SLURM, a Ray trial); None: a share of the host's
    rank_cpus_source: str = ""

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] = os.environ) -> LaunchEnv:
        """torchrun's RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; else a SLURM task's SLURM_PROCID,
        SLURM_NTASKS and SLURM_LOCALID, with the job's first host as the rendezvous (MASTER_ADDR/MASTER_PORT are set
        in ``environ`` for torch.distributed when the job does not set them); else rank 0 of 1. The CPUs of a rank:
        SLURM's --cpus-per-task, or its share of a Ray trial's CPUs (``RESIDUAL_TRIAL_CPUS``)."""
        if "RANK" in environ:
            local = int(environ.get("LOCAL_WORLD_SIZE", 1))
            ranks = int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0))
            return cls(*ranks, "torchrun", local, *trial_cpus(environ, local))
        if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
            environ.setdefault("MASTER_ADDR", first_host(environ["SLURM_JOB_NODELIST"]))
            environ.setdefault("MASTER_PORT", str(SLURM_PORT_BASE + int(environ["SLURM_JOB_ID"]) % 20000))
            rank, world_size = int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"])
            nodes = int(environ.get("SLURM_JOB_NUM_NODES", 1))
            local = int(environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or -(-world_size // nodes))
            cpus = (None, "")
            if "SLURM_CPUS_PER_TASK" in environ:
                cpus = (int(environ["SLURM_CPUS_PER_TASK"]), "SLURM_CPUS_PER_TASK")
            return cls(rank, world_size, int(environ.get("SLURM_LOCALID", 0)), "slurm", local, *cpus)
        return cls(0, 1, 0, "none", 1, *trial_cpus(environ, 1))

    def rank_cores(self, available: int) -> tuple[int, str]:
        """The cores this rank may use (``available``: the process's affinity mask), and where the figure came from."""
        if self.rank_cpus is not None:
            return max(1, min(self.rank_cpus, available)), self.rank_cpus_source
        return max(1, available // self.local_world_size), f"{available} usable cores / {self.local_world_size} ranks"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def trial_cpus(environ: Mapping[str, str], local_world_size: int) -> tuple[int | None, str]:
    if TRIAL_CPUS not in environ:
        return None, ""
    share = max(1, int(environ[TRIAL_CPUS]) // local_world_size)
    return share, f"{environ[TRIAL_CPUS]} CPUs of the Ray trial / {local_world_size} ranks"


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[003-005,9],cpu1" -> "gpu003"."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if match is None:
        raise UserError(f"SLURM_JOB_NODELIST={nodelist!r}: not a node list")
    prefix, ranges = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def pick_device(requested: str, launch: LaunchEnv) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(launch.local_rank)
        return torch.device("cuda", launch.local_rank)
    return torch.device("cpu")


_group_started = False  # this process joined its ranks' process group (the run itself began)


def init_process_group(launch: LaunchEnv, device: torch.device) -> None:
    """NCCL on GPUs, gloo on CPU; MASTER_ADDR/MASTER_PORT (torchrun's, or the SLURM job's) give the rendezvous."""
    global _group_started
    if launch.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            rank=launch.rank,
            world_size=launch.world_size,
            store=restart_store(launch),
            device_id=device if device.type == "cuda" else None,  # NCCL binds its communicator to this GPU
        )
        _group_started = True


def joined_group() -> bool:
    """Whether this process has joined its ranks' process group (the run itself has begun)."""
    return _group_started


def restart_store(launch: LaunchEnv, environ: Mapping[str, str] = os.environ) -> dist.Store | None:
    """A fresh key space for a torchrun restart (``--max-restarts``). torchrun gives every attempt the same shared
    store, which still holds the addresses the previous attempt's ranks published: the new ranks would connect to
    dead ones ("Gloo connectFullMesh failed ... Connection refused", pytorch/pytorch#167288). None: the default."""
    attempt = int(environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if attempt == 0 or environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    shared = dist.TCPStore(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), launch.world_size, is_master=False)
    return dist.PrefixStore(f"residual/attempt-{attempt}", shared)


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


def all_gather_rows(row: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every rank's ``row``, stacked in rank order: [world_size, len(row)], on every rank."""
    if not dist.is_initialized():
        return row.unsqueeze(0)
    rows = [torch.empty_like(row, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, row.to(device))
    return torch.stack(rows).cpu()


def largest_over_ranks(value: int, device: torch.device) -> int:
    """The largest of each rank's ``value``, on every rank (one collective)."""
    if not dist.is_initialized():
        return value
    largest = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return int(largest.item())


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """For each flag, whether it is set on any rank: one collective, and every rank gets the same answer."""
    return [bool(flag) for flag in any_rank_on_device(torch.tensor(flags, dtype=torch.float32, device=device))]


def any_rank_on_device(flags: torch.Tensor) -> torch.Tensor:
    """The largest of each 0/1 flag over all ranks, left on the flags' device: no wait for the device here."""
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


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
    average_over_ranks(
        [
            buffer
            for module in model.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
            for buffer in (module.running_mean, module.running_var)
        ]
    )


def average_over_ranks(tensors: list[torch.Tensor]) -> None:
    """Each tensor replaced, in place, by its mean over the ranks."""
    if not dist.is_initialized():
        return
    for tensor in tensors:
        dist.all_reduce(tensor)
        tensor.div_(dist.get_world_size())
