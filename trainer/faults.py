"""Stopping cleanly: on Ctrl-C, on a preemption or time-limit signal, and on a loss that is no longer finite.

SLURM sends SIGUSR1 (or what ``--signal`` names) some time before it preempts a job or its time runs out, and
SIGTERM at the end; submitit 1.5 uses SIGUSR2 for its own checkpointing. Each only sets a flag: the loop finishes
the step it is in and the next (the flag rides in a step's flags, read once the next step is queued; all ranks agree
on it), writes a checkpoint and exits with ``REQUEUE_EXIT_CODE``, which
the cluster layer requeues on. (SIGUSR1 is known to clash with NCCL on some clusters: SLURM's ``--signal`` can
name SIGUSR2 or SIGTERM instead.)

Ctrl-C (SIGINT) stops the same way, and exits 130, as a shell reports an interrupted command: a person stopped the
run, so nothing requeues it. A second Ctrl-C stops at once. torchrun forwards the terminal's Ctrl-C to its ranks,
which had it already from the terminal: a second SIGINT within ``SAME_INTERRUPT_S`` of the first is the same one.
"""

from __future__ import annotations

import os
import signal
import time
from types import FrameType

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"
INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
SAME_INTERRUPT_S = 1.0


class TrainingStopped(Exception):
    """The run stopped before its last iteration; ``exit_code`` says how the process should end."""

    exit_code = 1


class Preempted(TrainingStopped):
    exit_code = REQUEUE_EXIT_CODE


class Interrupted(TrainingStopped):
    exit_code = INTERRUPT_EXIT_CODE


class NonFiniteLoss(TrainingStopped):
    exit_code = 1


class CheckpointNotWritten(TrainingStopped):
    exit_code = 74  # EX_IOERR


class StopSignals:
    """Records the first stop signal received; restores the previous handlers when closed."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._at = 0.0  # when it came (monotonic seconds)
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
            self.received, self._at = number, time.monotonic()
        elif number == signal.SIGINT and time.monotonic() - self._at > SAME_INTERRUPT_S:
            os.write(2, b"residual: stopped at once by a second Ctrl-C; the last checkpoint is kept\n")
            os._exit(INTERRUPT_EXIT_CODE)

    @property
    def interrupted(self) -> bool:
        return self.received == signal.SIGINT

    @property
    def name(self) -> str:
        if self.received is None:
            return "a signal on another rank"
        return "Ctrl-C (SIGINT)" if self.interrupted else signal.Signals(self.received).name
