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
from collections.abc import Iterable, Iterator, Mapping
from types import FrameType
from typing import Any

import torch

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"
INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
PREEMPTION_SIGNALS = STOP_SIGNALS[:3]  # recorded from the start of a training command (Ctrl-C: see trainer.entry)
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


class NonFiniteState(TrainingStopped):
    """Weights, BN statistics, optimizer state or the EMA hold an inf or NaN: what would have been written is not."""

    exit_code = 1


def named_tensors(state: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a nested state dict (dicts, lists, tuples) with its dotted name, in order; DTensors as
    this rank's shard."""
    if isinstance(state, torch.Tensor):
        yield prefix, state.to_local() if hasattr(state, "to_local") else state
    elif isinstance(state, Mapping):
        for key, value in state.items():
            yield from named_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(state, (list, tuple)):
        for index, value in enumerate(state):
            yield from named_tensors(value, f"{prefix}.{index}" if prefix else str(index))


def nonfinite_flags(tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[list[str], torch.Tensor]:
    """The floating tensors' names and, on the device, a 0/1 per tensor: whether it holds an inf or NaN. One fused
    reduction per dtype and device (``torch._foreach_norm``'s max-norm, which is inf or NaN exactly when an element
    is), nothing read by the host."""
    groups: dict[tuple[torch.dtype, torch.device], list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in tensors:
        if tensor.is_floating_point() and tensor.numel():
            groups.setdefault((tensor.dtype, tensor.device), []).append((name, tensor))
    names, flags = [], []
    for members in groups.values():
        norms = torch._foreach_norm([tensor.detach() for _, tensor in members], float("inf"))
        names += [name for name, _ in members]
        flags.append(torch.stack(norms).isfinite().logical_not())
    if not flags:
        return [], torch.zeros(0)
    devices = {flag.device for flag in flags}
    target = next(iter(devices)) if len(devices) == 1 else torch.device("cpu")
    return names, torch.cat([flag.to(target).float() for flag in flags])


def first_nonfinite(state: Any) -> str | None:
    """The name of the first floating tensor of ``state`` that holds an inf or NaN, or None (one host read)."""
    tensors = list(named_tensors(state))
    names, flags = nonfinite_flags(tensors)
    bad = {names[index] for index in flags.nonzero().flatten().tolist()}
    return next((name for name, _ in tensors if name in bad), None)


class StopSignals:
    """Records the first stop signal received; restores the previous handlers when closed. ``before``: the
    StopSignals of the start-up (``trainer.entry``), whose signal, if one came while the run was being built, this one
    takes on: the first step then stops as if it had come during it."""

    def __init__(self, numbers: tuple[int, ...] = STOP_SIGNALS, before: StopSignals | None = None) -> None:
        self.numbers, self.before = numbers, before
        self.received: int | None = None
        self._at = 0.0  # when it came (monotonic seconds)
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if self.before is not None and self.before.received is not None:
            self.received, self._at = self.before.received, self.before._at
        for number in self.numbers:
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
