"""One training step: the model as it trains (plain, DDP-wrapped or FSDP2-sharded, perhaps compiled), its optimizer
and gradient scaler, and the update from one batch, accumulated over micro-batches when the config asks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from data_pipeline.errors import UserError
from trainer.config import Config
from trainer.machine.distributed import LaunchEnv, any_rank_on_device, apply_sync_batchnorm
from trainer.models import create_model
from trainer.recipe.optim import build_optimizer, cancels_on_device
from trainer.recipe.parallel import full_tensor, gradient_sync, is_sharded, parallelize
from trainer.recipe.precision import build_grad_scaler, maybe_autocast


@dataclass
class StepOutcome:
    """One step's results, left on the device: making them made the host wait for nothing."""

    loss_sum: torch.Tensor  # the sum of the step's per-image losses on this rank (0-dim)
    logits: torch.Tensor  # of all micro-batches, for the running top-1/top-5
    flags: torch.Tensor  # STEP_FLAGS as 0/1, the same on every rank
    grad_norm: torch.Tensor | None = None  # the global gradient norm (before any scaling), when asked for

    @property
    def skipped(self) -> torch.Tensor:
        return self.flags[0].bool()


# skipped: the loss was not finite on some rank, no update (the run stops unless train.skip_nonfinite);
# stop: some rank received a stop signal (checkpoint and exit); scaler_skipped: fp16 gradients overflowed, the
# gradient scaler cancelled the update (and halves its scale)
STEP_FLAGS = ("skipped", "stop", "scaler_skipped")


class HostCopy:
    """A small device tensor on its way to the host: started without waiting for the device, ``values()`` waits
    for this copy alone. The loop reads a step's flags after it has queued the next step, so the GPU never idles."""

    def __init__(self, tensor: torch.Tensor):
        self.event = None
        if tensor.device.type == "cuda":
            self.tensor = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.tensor.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.tensor = tensor

    def values(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.tensor.tolist()


class LateFlags:
    """The steps' flags on their way to the host: each step's are read once the next step is queued (``read``), or
    at once where the loop must know (``read(now=True)``: a log point, a checkpoint, an evaluation)."""

    def __init__(self) -> None:
        self.unread: list[tuple[int, HostCopy]] = []

    def read(self, iteration: int, step: StepOutcome, *, now: bool) -> list[tuple[int, dict[str, float]]]:
        """Add ``step`` (of ``iteration``); the (iteration, flags) read by this call, oldest first."""
        self.unread.append((iteration, HostCopy(step.flags)))
        reading, self.unread = (self.unread, []) if now else (self.unread[:-1], self.unread[-1:])
        return [(at, dict(zip(STEP_FLAGS, copy.values(), strict=True))) for at, copy in reading]


@dataclass
class Stepper:
    model: nn.Module  # the plain model (FSDP2 shards it in place): what is saved and exported
    wrapped: nn.Module  # what runs the steps: the model, its DDP wrapper, or either compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    precision: str
    accumulation: int = 1
    label_smoothing: float = 0.0
    skip_nonfinite: bool = False  # train.skip_nonfinite: the run goes on past a skipped step

    def __post_init__(self) -> None:
        # BN's running statistics move in the forward, before the flags say whether the step counts: a run that goes
        # on past a skipped step gets them back (one that stops there writes nothing of that step)
        self.buffers = [b for b in self.model.buffers() if not isinstance(b, DTensor)] if self.skip_nonfinite else []
        self.kept = [torch.empty_like(b) for b in self.buffers]

    def step(self, images: torch.Tensor, labels: torch.Tensor, *, stop: bool, grad_norm: bool) -> StepOutcome:
        """``labels``: class indices, or class probabilities (N x C) of a mixed batch (trainer.recipe.mixing).

        Forward and backward each micro-batch (the gradients are reduced over ranks after the last), one
        collective for the flags every rank must agree on, and the update, which a non-finite loss on any rank
        cancels on the device (``found_inf`` of the fused SGD and of LARS, as the gradient scaler uses it). Nothing
        here waits for the device, but SGD under FSDP2 (no fused SGD for DTensors): the host reads the flag first."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.buffers:
            torch._foreach_copy_(self.kept, self.buffers)
        micro = list(zip(images.chunk(self.accumulation), labels.chunk(self.accumulation), strict=True))
        total_loss, outputs = torch.zeros((), device=self.device), []
        for index, (inputs, targets) in enumerate(micro):
            with gradient_sync(self.wrapped, enabled=index == len(micro) - 1):
                with maybe_autocast(self.device, self.precision):
                    logits = self.wrapped(inputs)
                    loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
                self.scaler.scale(loss * (len(targets) / len(labels))).backward()
            total_loss += loss.detach() * len(targets)
            outputs.append(logits.detach())
        local = torch.stack([total_loss.isfinite().logical_not(), torch.full((), stop, device=self.device)])
        skipped, stop_flag = any_rank_on_device(local.float())  # the gradients were reduced like any others
        for buffer, kept in zip(self.buffers, self.kept, strict=True):
            buffer.copy_(torch.where(skipped.bool(), kept, buffer))
        self.scaler.unscale_(self.optimizer)  # fp16 (else nothing): finds overflow, the norm is of true gradients
        norm = gradient_norm(self.model) if grad_norm else None
        overflow = scaler_found_inf(self.scaler, self.optimizer, self.device)
        if cancels_on_device(self.optimizer):
            self.optimizer.found_inf = torch.maximum(skipped, overflow)
            self.optimizer.step()
            del self.optimizer.found_inf
        elif not skipped.item():
            self.optimizer.step()
        self.scaler.update()  # fp16: the scale halves after an overflow, and grows after a run of good steps
        flags = torch.stack([skipped, stop_flag, overflow * (1 - skipped)])
        return StepOutcome(total_loss, torch.cat(outputs), flags, norm)


def scaler_found_inf(
    scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, device: torch.device
) -> torch.Tensor:
    """1 when the enabled gradient scaler found an inf/NaN in the gradients it unscaled, else 0 (a device tensor).
    GradScaler keeps these per device, the way its own step reads them (torch has no public reader)."""
    if not scaler.is_enabled():
        return torch.zeros((), device=device)
    return sum(scaler._found_inf_per_device(optimizer).values()).clamp(max=1)


def gradient_norm(model: nn.Module) -> torch.Tensor:
    """The L2 norm of all gradients of the model, over every rank's shard under FSDP2 (a device tensor)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    return full_tensor(norm)


def build_stepper(config: Config, launch: LaunchEnv, device: torch.device, lr: float | None = None) -> Stepper:
    """``lr``: the run's base rate (build_optimizer)."""
    train = config.train
    sharded = is_sharded(config.dist, launch.world_size)
    if sharded and train.precision == "fp16":
        raise UserError(
            "dist.strategy=fsdp with train.precision=fp16: the gradient scaler would decide on each rank's shard "
            "alone; use train.precision=bf16 (or fp32) with FSDP2, or dist.strategy=ddp for fp16"
        )
    torch.manual_seed(train.seed)
    model = create_model(config.model.name, **config.model.overrides())
    # FSDP2 shards contiguous parameters only; the channels-last inputs still select channels-last kernels.
    memory_format = torch.channels_last if train.channels_last and not sharded else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    if config.model.sync_bn:
        model = apply_sync_batchnorm(model, device)
    wrapped = parallelize(model, config.dist, precision=train.precision, device=device, world_size=launch.world_size)
    if train.compile:
        wrapped = torch.compile(wrapped)
    optimizer = build_optimizer(model, config.optim, lr)
    scaler = build_grad_scaler(device, train.precision)
    return Stepper(
        model,
        wrapped,
        optimizer,
        scaler,
        device,
        train.precision,
        train.accumulation,
        config.loss.label_smoothing,
        train.skip_nonfinite,
    )
