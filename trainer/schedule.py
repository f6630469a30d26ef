"""Learning-rate schedules: the paper's (Sec. 3.4, Sec. 4.2), Goyal et al. 2017's warm-up, and the decays of the
recipes users train with today: cosine (torchvision's V2), linear (FFCV's ramp-down), polynomial (MLPerf's).

``LRSchedule.lr(iteration, history)`` is a pure function of the iteration and of the metrics seen before it, so a
resumed run that restores the ``MetricHistory`` continues with exactly the same rates.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from trainer.config import OptimConfig, ScheduleConfig


@dataclass
class MetricHistory:
    """The metrics a schedule may react to, as (iteration, error) pairs; saved in every checkpoint."""

    val_errors: list[tuple[int, float]] = field(default_factory=list)  # top-1 error of each evaluation
    train_errors: list[tuple[int, float]] = field(default_factory=list)  # running top-1 error of each log window

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
    """All lengths in iterations. ``base_lr`` already includes the linear scaling rule when it applies."""

    base_lr: float
    decay: str = "step"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    plateau_patience: int = 5
    plateau_threshold: float = 1e-3
    min_lr: float = 0.0
    warmup: str = "none"
    warmup_lr: float = 0.01
    warmup_iterations: int = 0
    warmup_until_train_error: float | None = None
    total_iterations: int = 0  # the run's length: where cosine, linear and poly reach min_lr
    poly_power: float = 2.0

    def lr(self, iteration: int, history: MetricHistory | None = None) -> float:
        history = history or MetricHistory()
        if self.in_warmup(iteration, history):
            if self.warmup == "linear":
                return self.warmup_lr + (self.base_lr - self.warmup_lr) * iteration / self.warmup_iterations
            return self.warmup_lr
        if self.decay in ("cosine", "linear", "poly"):
            return self.annealed(iteration)
        if self.decay == "step":
            decays = bisect.bisect_right(self.milestones, iteration)
        else:
            seen = [error for at, error in history.val_errors if at < iteration]
            decays = plateau_decays(seen, patience=self.plateau_patience, threshold=self.plateau_threshold)
        return max(self.base_lr * self.gamma**decays, self.min_lr)

    def annealed(self, iteration: int) -> float:
        """From base_lr at the warm-up's end to min_lr at the run's end: t of T iterations after the warm-up."""
        length = max(1, self.total_iterations - self.warmup_iterations)
        t = min(max(iteration - self.warmup_iterations, 0), length)
        span = self.base_lr - self.min_lr
        if self.decay == "cosine":  # torch's CosineAnnealingLR, closed form
            return self.min_lr + span * (1 + math.cos(math.pi * t / length)) / 2
        if self.decay == "linear":  # FFCV's cyclic schedule after its peak
            return self.min_lr + span * (1 - t / length)
        return self.min_lr + span * (1 - t / (length + 1)) ** self.poly_power  # MLPerf: T + 1 decay steps

    def in_warmup(self, iteration: int, history: MetricHistory) -> bool:
        if self.warmup == "none":
            return False
        if self.warmup_until_train_error is None:
            return iteration < self.warmup_iterations
        if self.warmup_iterations and iteration >= self.warmup_iterations:
            return False
        # Sec. 4.2: 0.01 "until the training error is below 80%", then back to 0.1.
        return not any(at < iteration and error < self.warmup_until_train_error for at, error in history.train_errors)


def build_schedule(schedule: ScheduleConfig, optim: OptimConfig, *, global_batch: int, iterations_per_epoch: int,
                   total_iterations: int) -> LRSchedule:  # fmt: skip
    to_iterations = iterations_per_epoch if schedule.unit == "epoch" else 1
    base_lr = optim.lr * global_batch / optim.base_batch if optim.linear_scaling else optim.lr
    return LRSchedule(
        base_lr=base_lr,
        decay=schedule.decay,
        milestones=tuple(m * to_iterations for m in schedule.milestones),
        gamma=schedule.gamma,
        plateau_patience=schedule.plateau_patience,
        plateau_threshold=schedule.plateau_threshold,
        min_lr=schedule.min_lr,
        warmup=schedule.warmup,
        warmup_lr=schedule.warmup_lr,
        warmup_iterations=schedule.warmup_length * to_iterations,
        warmup_until_train_error=schedule.warmup_until_train_error,
        total_iterations=total_iterations,
        poly_power=schedule.poly_power,
    )
