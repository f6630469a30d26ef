"""An exponential moving average of the weights (Polyak averaging, as torchvision's V2 recipe and timm keep one).

Every ``ema.every`` iterations ``ema = decay * ema + (1 - decay) * weights``, for the parameters and (``average``)
BatchNorm's running statistics; with ``copy`` the EMA model uses the trained model's statistics. The average
holds tensors of the model's own kind: under FSDP2 each rank averages its shards (no collective, no full copy).
An evaluation swaps the average into the model (``applied``) and back. ``state_dict`` is saved in every
checkpoint under the model's own names, so a resumed run continues the same average bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from trainer.config import EmaConfig
from trainer.machine.distributed import any_rank, average_over_ranks
from trainer.recipe.parallel import full_tensor, local, reshard
from trainer.training.faults import NonFiniteState, first_nonfinite


class WeightAverage:
    def __init__(self, model: nn.Module, config: EmaConfig) -> None:
        self.model, self.config = model, config
        self.tracked = dict(model.named_parameters())
        if config.bn_buffers == "average":
            self.tracked |= {name: b for name, b in model.named_buffers() if b.is_floating_point()}
        self.average = {name: value.detach().clone() for name, value in self.tracked.items()}
        self.statistics = [self.average[name] for name, _ in model.named_buffers() if name in self.average]
        self.copied = {name: b for name, b in model.named_buffers() if name not in self.average}  # BN's batch counts

    def reset(self) -> None:
        """The average starts again from the weights."""
        with torch.no_grad():
            for name, value in self.tracked.items():
                self.average[name].copy_(value.detach())

    def update(self, iteration: int) -> None:
        """After the update of ``iteration`` (counted from 1): fold the weights in when it is an EMA iteration;
        within ``ema.start`` the average is the weights."""
        if iteration % self.config.every:
            return
        weight = 1.0 if iteration <= self.config.start else 1 - self.config.decay
        averages = [local(value) for value in self.average.values()]  # each rank's shards under FSDP2
        values = [local(value.detach()) for value in self.tracked.values()]
        with torch.no_grad():
            torch._foreach_lerp_(averages, values, weight)

    def average_statistics_over_ranks(self) -> None:
        """The average's BN statistics (``bn_buffers=average``) are each rank's own, folded from its own images: made
        one over the ranks before an evaluation and a save, as the model's are (``average_bn_buffers``), so that
        every rank evaluates, and a checkpoint keeps, the same average (DCP would keep one rank's per key)."""
        average_over_ranks(self.statistics)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block and its own again after it. Under FSDP2 the swap
        writes the shards: the gathered parameters are freed on either side of it, so that the forwards in the
        block, and the training step after it, gather what was written (``dist.reshard_after_forward=false`` keeps
        them gathered after a no-grad forward)."""
        bad = first_nonfinite(self.average)  # each rank's shards: every rank learns whether any holds one
        if any_rank([bad is not None], local(next(iter(self.average.values()))).device)[0]:
            raise NonFiniteState(
                f"the EMA of the weights holds inf or NaN ({bad or 'on another rank'}): not swapped in; train on "
                f"from an earlier checkpoint with a lower optim.lr or ema.decay"
            )
        saved = {name: value.detach().clone() for name, value in self.tracked.items()}
        reshard(self.model)
        with torch.no_grad():
            for name, value in self.tracked.items():
                value.copy_(self.average[name])
        try:
            yield
        finally:
            reshard(self.model)
            with torch.no_grad():
                for name, value in self.tracked.items():
                    value.copy_(saved[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged model's state under the model's names: DTensor shards under FSDP2, else full tensors."""
        return {**self.copied, **self.average}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The same as whole tensors on the CPU (a collective under FSDP2: call on every rank)."""
        return {name: full_tensor(value).cpu() for name, value in self.state_dict().items()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """From either kind of checkpoint: whole tensors are cut into this run's shards."""
        with torch.no_grad():
            for name, value in self.average.items():
                given = saved[name]
                if isinstance(value, DTensor):
                    given = distribute_tensor(given.to(local(value).device), value.device_mesh, value.placements)
                value.copy_(given)


def build_weight_average(model: nn.Module, config: EmaConfig) -> WeightAverage | None:
    return None if config.decay is None else WeightAverage(model, config)
