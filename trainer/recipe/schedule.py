"""Learning-rate schedules: the paper's (Sec. 3.4, Sec. 4.2), Goyal et al. 2017's warm-up, and the decays of the
recipes users train with today: cosine (torchvision's V2), linear (FFCV's ramp-down), polynomial (MLPerf's).

``LRSchedule.lr(iteration, history)`` is a pure function of the iteration and of the metrics seen before it, so a
resumed run that restores the ``MetricHistory`` continues with exactly the same rates.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, replace

from trainer.config import OptimConfig, ScheduleConfig


@dataclass
class MetricHistory:
    """The metrics a schedule may react to, as (iteration, error) pairs; saved in every checkpoint."""

    val_errors: list[tuple[int, float]] = field(default_factory=list)  # top-1 error of each evaluation
    train_errors: list[tuple[int, float]] = field(default_factory=list)  # top-1 error of each warm-up window

    def state_dict(self) -> dict[str, list[tuple[int, float]]]:
        return {"val_errors": list(self.val_errors), "train_errors": list(self.train_errors)}

    @classmethod
    def from_state_dict(cls, state: dict[str, list]) -> MetricHistory:
        return cls([tuple(item) for item in state["val_errors"]], [tuple(item) for item in state["train_errors"]])


def plateau_decays(errors: list[float], *, patience: int, threshold: float) -> int:
    """How many times a divide-on-plateau schedule has decayed after these validation errors.

    An error counts as better when it is below ``best * (1 - threshold)``; after more than ``patience`` evaluations
    without a better one the rate decays and the count restarts (ReduceLROnPlateau's rule, mode "min", "rel").
    """
    best, stale, decays = math.inf, 0, 0
    for error in errors:
        if error < best * (1 - threshold):
            best, stale = error, 0
        else:
            stale += 1
        if stale > patience:
            decays, stale = decays + 1, 0
    return decays


@dataclass(frozen=True)
class LRSchedule:
    """The rate at each iteration: ``shape``'s warm-up and decay with every length in iterations, from ``base_lr``
    (the linear scaling rule already applied where it applies) to the run's end at ``total_iterations``."""

    base_lr: float
    shape: ScheduleConfig = field(default_factory=ScheduleConfig)  # unit "iteration" (build_schedule converts)
    total_iterations: int = 0  # where cosine, linear and poly reach min_lr

    def lr(self, iteration: int, history: MetricHistory | None = None) -> float:
        history, shape = history or MetricHistory(), self.shape
        if self.in_warmup(iteration, history):
            if shape.warmup == "linear":
                return shape.warmup_lr + (self.base_lr - shape.warmup_lr) * iteration / shape.warmup_length
            return shape.warmup_lr
        if shape.decay in ("cosine", "linear", "poly"):
            return self.annealed(iteration)
        if shape.decay == "step":
            decays = bisect.bisect_right(shape.milestones, iteration)
        else:
            seen = [error for at, error in history.val_errors if at < iteration]
            decays = plateau_decays(seen, patience=shape.plateau_patience, threshold=shape.plateau_threshold)
        return max(self.base_lr * shape.gamma**decays, shape.min_lr)

    def annealed(self, iteration: int) -> float:
        """From base_lr at the warm-up's end to min_lr at the run's end: t of T iterations after the warm-up."""
        shape = self.shape
        length = max(1, self.total_iterations - shape.warmup_length)
        t = min(max(iteration - shape.warmup_length, 0), length)
        span = self.base_lr - shape.min_lr
        if shape.decay == "cosine":  # torch's CosineAnnealingLR, closed form
            return shape.min_lr + span * (1 + math.cos(math.pi * t / length)) / 2
        if shape.decay == "linear":  # FFCV's cyclic schedule after its peak
            return shape.min_lr + span * (1 - t / length)
        return shape.min_lr + span * (1 - t / (length + 1)) ** shape.poly_power  # MLPerf: T + 1 decay steps

    def awaits_train_error(self, iteration: int, history: MetricHistory) -> bool:
        """Whether the warm-up at ``iteration`` waits for the training error (Sec. 4.2), which the loop then
        measures over windows of ``warmup_check_every`` iterations into ``history.train_errors``."""
        return self.shape.warmup_until_train_error is not None and self.in_warmup(iteration, history)

    def in_warmup(self, iteration: int, history: MetricHistory) -> bool:
        shape = self.shape
        if shape.warmup == "none":
            return False
        if shape.warmup_until_train_error is None:
            return iteration < shape.warmup_length
        if shape.warmup_length and iteration >= shape.warmup_length:
            return False
        # Sec. 4.2: 0.01 "until the training error is below 80%", then back to 0.1.
        return not any(at < iteration and error < shape.warmup_until_train_error for at, error in history.train_errors)


def scaled_lr(optim: OptimConfig, global_batch: int) -> float:
    """The run's base rate: ``optim.lr``, times global_batch / base_batch under the linear scaling rule."""
    return optim.lr * global_batch / optim.base_batch if optim.linear_scaling else optim.lr


def build_schedule(
    schedule: ScheduleConfig, *, base_lr: float, iterations_per_epoch: int, total_iterations: int
) -> LRSchedule:
    """``base_lr``: the run's (``scaled_lr``, decided in the plan)."""
    if schedule.unit == "epoch":  # the same schedule, its lengths in iterations
        milestones = [m * iterations_per_epoch for m in schedule.milestones]
        warmup_length = schedule.warmup_length * iterations_per_epoch
        schedule = replace(schedule, unit="iteration", milestones=milestones, warmup_length=warmup_length)
    return LRSchedule(base_lr, schedule, total_iterations)
