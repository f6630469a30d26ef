"""The optimizers: SGD with momentum and weight decay (Sec. 3.4), and LARS for large batches (MLPerf's ResNet-50)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from trainer.config import OptimConfig
from trainer.recipe.parallel import local


def gathers_scales(device: torch.device) -> bool:
    """Whether LARS multiplies its steps by the trust ratios in one op, each element's ratio gathered by the index
    of its tensor: on a GPU, where each op is a launch. A CPU launches nothing and gathers slowly, so there each
    tensor's step is multiplied by its own ratio (ResNet-50 on a 2-core EPYC: 4 ms against 60 ms)."""
    return device.type != "cpu"


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017), as MLPerf's reference trains ResNet-50: per
    parameter tensor w with gradient g, in a group with ``lars`` on,

        ratio = trust_coefficient * |w| / (|g| + weight_decay * |w| + eps)   (1 where |w| or |g| is 0)
        v = momentum * v + lr * ratio * (g + weight_decay * w);   w = w - v

    (Nesterov: w = w - lr * ratio * (g + weight_decay * w) - momentum * v). A group with ``lars`` off (BN
    parameters and biases, ``optim.no_decay_bn_bias``) takes the plain step with ratio 1.

    Like the fused SGD, a step is cancelled on the device when ``found_inf`` (a 0-dim tensor set by the caller)
    is nonzero: weights and momentum keep their values and the host waits for nothing. Under FSDP2 each rank updates
    its shards; the norms are of whole tensors (one all-reduce of the shards' squared norms per step)."""

    def __init__(
        self,
        params,
        *,
        lr: float,
        momentum: float,
        weight_decay: float,
        trust_coefficient: float,
        eps: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            nesterov=nesterov,
            lars=True,
        )
        super().__init__(params, defaults)
        zero_momentum(self)

    @torch.no_grad()
    def step(self, closure=None) -> None:
        assert closure is None, "LARS takes no closure"
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params)

    def _update(self, group: dict, params: list[torch.Tensor]) -> None:
        """One group's step in the same few ops whatever its number of tensors. The steps are written into one
        buffer, each as a view with its weight's strides, so that every foreach op stays on CUDA's one-launch
        route; the trust ratios (one per tensor; on a GPU, ``gathers_scales``) and the ``found_inf`` mask apply to
        that buffer at once. Per tensor, they took a kernel each."""
        weights, grads = [local(p) for p in params], [local(p.grad) for p in params]
        buffers = [local(self.state[p]["momentum_buffer"]) for p in params]
        decay, momentum = group["weight_decay"], group["momentum"]
        lengths = [w.numel() for w in weights]
        flat = torch.empty(sum(lengths), dtype=weights[0].dtype, device=weights[0].device)
        steps = [part.as_strided(w.shape, w.stride()) for part, w in zip(flat.split(lengths), weights, strict=True)]
        torch._foreach_copy_(steps, grads)
        if decay:
            torch._foreach_add_(steps, weights, alpha=decay)
        if group["lars"]:
            norms = torch.stack([torch.stack(torch._foreach_norm(weights)), torch.stack(torch._foreach_norm(grads))])
            if isinstance(params[0], DTensor):  # each rank holds shards: the whole tensors' norms
                squares = norms.square()
                dist.all_reduce(squares, group=params[0].device_mesh.get_group())
                norms = squares.sqrt()
            w_norm, g_norm = norms
            ratio = group["trust_coefficient"] * w_norm / (g_norm + decay * w_norm + group["eps"])
            scale = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio)) * group["lr"]
            if gathers_scales(flat.device):
                flat.mul_(scale.index_select(0, self._owners(lengths, flat.device)))
            else:
                torch._foreach_mul_(steps, list(scale.unbind()))
        else:
            flat.mul_(group["lr"])
        found_inf = getattr(self, "found_inf", None)  # set by the caller for one step
        keep = None if found_inf is None else (found_inf == 0).to(flat.dtype)
        if keep is not None:  # a cancelled step: no step, the momentum kept as it is
            flat.masked_fill_(keep == 0, 0.0)
            torch._foreach_mul_(buffers, keep * momentum + (1 - keep))
        else:
            torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, steps)
        updates = torch._foreach_add(steps, buffers, alpha=momentum) if group["nesterov"] else buffers
        torch._foreach_sub_(weights, updates if keep is None else torch._foreach_mul(updates, keep))

    def _owners(self, lengths: list[int], device: torch.device) -> torch.Tensor:
        """For each element of a group's steps laid end to end, the index of its tensor (4 bytes per weight): made
        on the device once, as a copy to the device each step would wait for it."""
        cache = self.__dict__.setdefault("_owners_on_device", {})
        key = (tuple(lengths), device)
        if key not in cache:
            owners = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))
            cache[key] = owners.to(device)
        return cache[key]


def build_optimizer(model: nn.Module, config: OptimConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """``lr``: the run's base rate (the linear scaling rule applied: trainer.recipe.schedule), else ``optim.lr``; the
    schedule writes each iteration's into the groups. With ``no_decay_bn_bias``, BN weights and every bias (the
    one-dimensional parameters) get no weight decay (and, with LARS, no trust ratio).

    SGD is fused (one kernel per device and dtype) wherever torch has it: there the step can be cancelled on the
    device (``optimizer.found_inf``) without the host waiting for the loss. FSDP2's DTensors have no fused SGD in
    torch, so a sharded model gets the foreach one. The momentum buffers start as zeros rather than on the first
    update (the same first step, as dampening is 0): a cancelled first fused step would leave them uninitialized."""
    lr = config.lr if lr is None else lr
    params = list(model.parameters())
    if config.no_decay_bn_bias:
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lars": False}]
    else:
        groups = [{"params": params}]
    if config.name == "lars":
        return LARS(
            groups,
            lr=lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            trust_coefficient=config.trust_coefficient,
            eps=config.lars_eps,
            nesterov=config.nesterov,
        )
    for group in groups:
        group.pop("lars", None)
    fused = not any(isinstance(p, DTensor) for p in params)
    optimizer = torch.optim.SGD(
        groups,
        lr=lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
        fused=fused or None,
    )
    if fused and config.momentum:
        zero_momentum(optimizer)
    return optimizer


def zero_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Momentum buffers of zeros for every parameter, before the first step (a cancelled first step then leaves
    them zero rather than uninitialized)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def cancels_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's step reads ``found_inf`` on the device (fused SGD, LARS), so the host need not."""
    return bool(optimizer.defaults.get("fused")) or isinstance(optimizer, LARS)
