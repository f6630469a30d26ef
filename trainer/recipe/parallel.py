"""Data parallelism over the ranks of a launch (``dist.strategy``): DDP, or FSDP2 per residual block then the root,
and the switch that lets the micro-batches of an accumulated step skip the gradient reduction."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from trainer.config import DistConfig
from trainer.models import BasicBlock, Bottleneck
from trainer.recipe.precision import AUTOCAST_DTYPES


def is_sharded(config: DistConfig, world_size: int) -> bool:
    """Whether the model's weights are FSDP2's shards: ``dist.strategy=fsdp`` over more than one rank (one rank
    alone trains the plain model, whatever the strategy)."""
    return config.strategy == "fsdp" and world_size > 1


def parallelize(model: nn.Module, config: DistConfig, *, precision: str, device: torch.device, world_size: int):
    """The module that runs the training steps. One rank alone runs ``model`` itself; FSDP2 shards ``model`` in
    place (its state dict keeps the plain model's names), DDP wraps it."""
    if world_size == 1:
        return model
    if is_sharded(config, world_size):
        shard_fully(model, device=device, world_size=world_size, precision=precision, config=config)
        return model
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=config.bucket_cap_mb,
        static_graph=config.static_graph,
    )


def shard_fully(model: nn.Module, *, device: torch.device, world_size: int, precision: str, config: DistConfig):
    """FSDP2: one parameter group per residual block, then the root (the stem and the classifier).

    With bf16 or fp16 (and ``dist.fsdp_mixed_precision=policy``), the blocks gather their parameters in that type
    and reduce gradients in fp32; autocast runs the ops either way. Each block's BatchNorms keep fp32 parameters
    in a group of their own that does not cast its input (``batchnorm_groups``): under the blocks' policy alone its
    weight would be bf16 while its running statistics stay fp32 ("expected scalar type BFloat16 but found Float"),
    the failure of pytorch/torchtitan#674. BatchNorm then runs in mixed precision, as under autocast.
    """
    mesh = init_device_mesh(device.type, (world_size,))
    reshard = config.reshard_after_forward
    low = AUTOCAST_DTYPES.get(precision) if config.fsdp_mixed_precision == "policy" else None
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low is not None else None)
    if low is not None:
        keep_fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, cast_forward_inputs=False)
        for group in batchnorm_groups(model):
            fully_shard(group, mesh=mesh, mp_policy=keep_fp32, reshard_after_forward=reshard)
    for module in model.modules():
        if isinstance(module, BasicBlock | Bottleneck):
            fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)


def batchnorm_groups(model: nn.Module) -> list[list[nn.Module]]:
    """The BatchNorms of each block as one group, and those outside the blocks (the stem's) as another: one
    all-gather and one reduce-scatter per block for them, not one per BatchNorm (ResNet-50: 17 groups, not 53;
    ResNet-152: 51, not 155), small collectives whose latency adds up."""
    groups = [
        [m for m in block.modules() if isinstance(m, _BatchNorm)]
        for block in model.modules()
        if isinstance(block, BasicBlock | Bottleneck)
    ]
    grouped = {id(module) for group in groups for module in group}
    rest = [m for m in model.modules() if isinstance(m, _BatchNorm) and id(m) not in grouped]
    return [group for group in [*groups, rest] if group]


def gradient_sync(module: nn.Module, enabled: bool) -> AbstractContextManager:
    """Whether this backward reduces gradients over ranks: only the last micro-batch of an accumulated step does."""
    module = getattr(module, "_orig_mod", module)  # under torch.compile
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(enabled)
    elif isinstance(module, DistributedDataParallel) and not enabled:
        return module.no_sync()
    return nullcontext()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank calls it), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: updating it updates the DTensor), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def reshard(model: nn.Module) -> None:
    """Free FSDP2's gathered parameters, so that the next forward gathers the shards again: with
    ``reshard_after_forward=false`` a no-grad forward leaves them gathered, and a later forward would not see a
    write into the shards (the EMA's swap). Nothing without FSDP2."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
