"""SGD with momentum and weight decay (Sec. 3.4)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from trainer.config import OptimConfig


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.SGD:
    """With ``no_decay_bn_bias``, BN weights and every bias (the one-dimensional parameters) get no weight decay.

    Fused (one kernel per device and dtype) wherever torch has it: there the step can be cancelled on the device
    (``optimizer.found_inf``) without the host waiting for the loss. FSDP2's DTensors have no fused SGD in torch, so
    a sharded model gets the foreach one. The momentum buffers start as zeros rather than on the first update
    (the same first step, as dampening is 0): a cancelled first fused step would leave them uninitialized."""
    params = list(model.parameters())
    if config.no_decay_bn_bias:
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:
        groups = [{"params": params}]
    fused = not any(isinstance(p, DTensor) for p in params)
    optimizer = torch.optim.SGD(
        groups,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
        fused=fused or None,
    )
    if fused and config.momentum:
        for p in params:
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer
