"""SGD with momentum and weight decay (Sec. 3.4)."""

from __future__ import annotations

import torch
from torch import nn

from trainer.config import OptimConfig


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.SGD:
    """With ``no_decay_bn_bias``, BN weights and every bias (the one-dimensional parameters) get no weight decay."""
    if config.no_decay_bn_bias:
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:
        groups = [{"params": list(model.parameters())}]
    return torch.optim.SGD(
        groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=config.nesterov
    )
