"""Stopping cleanly: on a preemption or time-limit signal, and on a loss that is no longer finite.

SLURM sends SIGUSR1 (or what ``--signal`` names) some time before it preempts a job or its time runs out, and
SIGTERM at the end; submitit 1.5 uses SIGUSR2 for its own checkpointing. Each only sets a flag: the loop finishes
the step it is in (all ranks agree on the flag), writes a checkpoint and exits with ``REQUEUE_EXIT_CODE``, which
the cluster layer requeues on. (SIGUSR1 is known to clash with NCCL on some clusters: SLURM's ``--signal`` can
name SIGUSR2 or SIGTERM instead.)
"""

from __future__ import annotations

import signal
from types import FrameType

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class TrainingStopped(Exception):
    """The run stopped before its last iteration; ``exit_code`` says how the process should end."""

    exit_code = 1


class Preempted(TrainingStopped):
    exit_code = REQUEUE_EXIT_CODE


class NonFiniteLoss(TrainingStopped):
    exit_code = 1


class CheckpointNotWritten(TrainingStopped):
    exit_code = 74  # EX_IOERR


class StopSignals:
    """Records the first stop signal received; restores the previous handlers when closed."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for number in STOP_SIGNALS:
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = number

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
