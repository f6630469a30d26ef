"""What is due at an iteration: a log point, an evaluation, a checkpoint, a reading of the warm-up's training error.
One answer to "is it due?", decided from the config once (``Cadence.of``); the loop asks it after each step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from trainer.config import Config


class Due(NamedTuple):
    log: bool
    evaluate: bool
    checkpoint: bool


@dataclass(frozen=True)
class Cadence:
    log_every: int  # log.every
    eval_every: int  # eval.every, default every epoch
    checkpoint_every: int  # checkpoint.every, default every epoch
    total_iterations: int  # the last iteration evaluates and checkpoints, whatever the cadence

    @classmethod
    def of(cls, config: Config, *, batches_per_epoch: int, total_iterations: int) -> Cadence:
        return cls(
            log_every=config.log.every,
            eval_every=config.eval.every or batches_per_epoch,
            checkpoint_every=config.checkpoint.every or batches_per_epoch,
            total_iterations=total_iterations,
        )

    def at(self, iteration: int) -> Due:
        """What is due once the step that ends at ``iteration`` is made (at 0, a start's: nothing but an evaluation
        a checkpoint left due). Where anything is, the host waits for the device (the step's flags are read)."""
        last = iteration == self.total_iterations
        return Due(
            log=iteration > 0 and iteration % self.log_every == 0,
            evaluate=iteration > 0 and (iteration % self.eval_every == 0 or last),
            checkpoint=iteration > 0 and (iteration % self.checkpoint_every == 0 or last),
        )
