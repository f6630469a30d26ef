"""One training step: the model as it trains (plain, DDP-wrapped or FSDP2-sharded, perhaps compiled), its optimizer
and gradient scaler, and the update from one batch, accumulated over micro-batches when the config asks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from data_pipeline.errors import UserError
from trainer.config import Config
from trainer.distributed import LaunchEnv, any_rank, apply_sync_batchnorm
from trainer.models import create_model
from trainer.optim import build_optimizer
from trainer.parallel import gradient_sync, parallelize
from trainer.precision import build_grad_scaler, maybe_autocast


@dataclass
class StepOutcome:
    loss: float  # mean over the step's images on this rank
    logits: torch.Tensor  # of all micro-batches, for the running top-1/top-5
    skipped: bool  # the loss was not finite on some rank: no update (the run stops unless train.skip_nonfinite)
    stop: bool  # some rank received a stop signal: checkpoint after this step and exit
    scaler_skipped: bool = False  # fp16: the gradients overflowed, the scaler skipped the update
    grad_norm: float | None = None  # the global gradient norm (before any scaling), when asked for


@dataclass
class Stepper:
    model: nn.Module  # the plain model (FSDP2 shards it in place): what is saved and exported
    wrapped: nn.Module  # what runs the steps: the model, its DDP wrapper, or either compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    precision: str
    accumulation: int = 1

    def step(self, images: torch.Tensor, labels: torch.Tensor, *, stop: bool, grad_norm: bool) -> StepOutcome:
        """Forward and backward each micro-batch (the gradients are reduced over ranks after the last), then one
        host sync for the loss, one collective for the flags every rank must agree on, and the update."""
        self.optimizer.zero_grad(set_to_none=True)
        micro = list(zip(images.chunk(self.accumulation), labels.chunk(self.accumulation), strict=True))
        total_loss, outputs = torch.zeros((), device=self.device), []
        for index, (inputs, targets) in enumerate(micro):
            with gradient_sync(self.wrapped, enabled=index == len(micro) - 1):
                with maybe_autocast(self.device, self.precision):
                    logits = self.wrapped(inputs)
                    loss = F.cross_entropy(logits.float(), targets)
                self.scaler.scale(loss * (len(targets) / len(labels))).backward()
            total_loss += loss.detach() * len(targets)
            outputs.append(logits.detach())
        loss_value = total_loss.item() / len(labels)  # the step's one host sync: checked, logged
        nonfinite, stop = any_rank([not math.isfinite(loss_value), stop], self.device)
        outcome = StepOutcome(loss_value, torch.cat(outputs), skipped=nonfinite, stop=stop)
        if nonfinite:  # the gradients were reduced like any others (every rank took the same path); dropped here
            self.optimizer.zero_grad(set_to_none=True)
            return outcome
        if grad_norm:
            self.scaler.unscale_(self.optimizer)
            outcome.grad_norm = gradient_norm(self.model)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        self.scaler.step(self.optimizer)  # fp16: no update when a gradient overflowed (the same on every rank)
        self.scaler.update()
        outcome.scaler_skipped = self.scaler.is_enabled() and self.scaler.get_scale() < scale
        return outcome


def gradient_norm(model: nn.Module) -> float:
    """The L2 norm of all gradients of the model, over every rank's shard under FSDP2."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def build_stepper(config: Config, launch: LaunchEnv, device: torch.device) -> Stepper:
    train = config.train
    if config.dist.strategy == "fsdp" and train.precision == "fp16" and launch.distributed:
        raise UserError(
            "dist.strategy=fsdp with train.precision=fp16: the gradient scaler would decide on each rank's shard "
            "alone; use train.precision=bf16 (or fp32) with FSDP2, or dist.strategy=ddp for fp16"
        )
    torch.manual_seed(train.seed)
    model = create_model(config.model.name, **config.model.overrides())
    # FSDP2 shards contiguous parameters only; the channels-last inputs still select channels-last kernels.
    sharded = config.dist.strategy == "fsdp" and launch.distributed
    memory_format = torch.channels_last if train.channels_last and not sharded else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    if config.model.sync_bn:
        model = apply_sync_batchnorm(model, device)
    wrapped = parallelize(model, config.dist, precision=train.precision, device=device, world_size=launch.world_size)
    if train.compile:
        wrapped = torch.compile(wrapped)
    optimizer = build_optimizer(model, config.optim)
    scaler = build_grad_scaler(device, train.precision)
    return Stepper(model, wrapped, optimizer, scaler, device, train.precision, train.accumulation)
