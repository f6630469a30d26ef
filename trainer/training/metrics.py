"""The training metrics and when they are logged: the running loss and top-1/top-5 of a log window (kept on the
device), this rank's wait for data and step time, images/s, the model FLOP utilization, each rank's peak memory,
the progress shown (a bar on a terminal; a plain line per window for a job's log file), and the evaluations'
records. The loop calls ``record`` after each step and ``flush`` at a log point. The open window
(``TrainWindow``) is the loop's, which a checkpoint keeps so that a resumed run logs the same figures."""

from __future__ import annotations

import logging
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from trainer.eval.counts import EvalResult, topk_hits
from trainer.machine.distributed import LaunchEnv, all_gather_rows, all_reduce_sum
from trainer.training.run_log import RunLog
from trainer.training.step import StepOutcome

log = logging.getLogger(__name__)

WINDOW_SUMS = ("loss_sum", "correct1", "correct5", "count")


class TrainWindow:
    """Sums over this rank's images between two log points of the loss, the top-1 and top-5 hits and the images
    (WINDOW_SUMS), kept on the device so that no step waits for them. What is logged is ``summed`` over all ranks
    (the loop keeps a second window for the training error Sec. 4.2's warm-up waits for). A checkpoint keeps the
    open window (``state_dict``), so that a resumed run logs the same figures."""

    def __init__(self, device: torch.device, *, is_main: bool = True) -> None:
        self.device, self.is_main = device, is_main
        self.sums = self.zeros()

    def zeros(self) -> torch.Tensor:
        """Made on the device: a window from the CPU's would be copied there at its first step, a copy from
        pageable memory that waits for the stream."""
        return torch.zeros(len(WINDOW_SUMS), dtype=torch.float64, device=self.device)

    def add(self, step: StepOutcome, labels: torch.Tensor) -> None:
        """A step's losses and hits; none of a skipped step (its loss may be NaN)."""
        hit1, hit5 = (hits.sum() for hits in topk_hits(step.logits.float(), labels))
        count = labels.new_full((), len(labels), dtype=torch.float64)
        sums = torch.stack([step.loss_sum.double(), hit1.double(), hit5.double(), count])
        self.sums = self.sums + torch.where(step.skipped, 0.0, sums)

    def summed(self) -> dict[str, float]:
        """The sums over every rank, on every rank (a collective)."""
        return dict(zip(WINDOW_SUMS, all_reduce_sum(self.sums, self.device).tolist(), strict=True))

    def take(self) -> dict[str, float]:
        """``summed``, and a new window opened."""
        sums, self.sums = self.summed(), self.zeros()
        return sums

    def state_dict(self) -> dict[str, float]:
        """The open window's sums over all ranks (a collective: every rank calls it). Rank 0 carries them on, the
        others start an empty window, so a restore that gives rank 0 the saved window logs the same figures."""
        sums = self.summed()
        self.load_state_dict(sums)
        return sums

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        # a part a checkpoint lacks (the warm-up's window, before 2026-12-08) opens empty
        values = [saved.get(key, 0.0) for key in WINDOW_SUMS] if self.is_main else [0.0] * len(WINDOW_SUMS)
        self.sums = torch.tensor(values, dtype=torch.float64, device=self.device)


def peak_memory_bytes(device: torch.device) -> float:
    """The peak memory of this rank: allocated on its GPU, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


def window_summary(sums: dict[str, float]) -> dict[str, float]:
    count = sums["count"]
    return {
        "loss": sums["loss_sum"] / count,
        "top1": sums["correct1"] / count,
        "top5": sums["correct5"] / count,
        "top1_error": 1 - sums["correct1"] / count,
    }


@dataclass
class StepTimes:
    """This rank's time between two log points: waiting for batches, and the rest of the steps (forward,
    backward, update, and reading the flags of the step before)."""

    data_seconds: float = 0.0
    compute_seconds: float = 0.0
    steps: int = 0

    @property
    def seconds(self) -> float:
        """The window's wall time, less evaluations and checkpoints."""
        return self.data_seconds + self.compute_seconds


class MetricsProcessor:
    def __init__(
        self,
        run_log: RunLog,
        window: TrainWindow,
        *,
        launch: LaunchEnv,
        device: torch.device,
        progress: bool,
        images_per_step: int,
        iterations: tuple[int, int],  # (start, total)
        iterations_per_epoch: int = 1,
        flops: tuple[float | None, Callable[[int], float] | None] = (None, None),  # the GPUs' dense peak, and the
        # training FLOPs per image of an epoch
        data_stats: tuple[tuple[float, ...], tuple[float, ...]] = ((0.0,), (1.0,)),  # mean and std, to show a batch
        classes: list[str] | None = None,  # logged one by one at each evaluation (log.per_class); None: not
    ) -> None:
        self.run_log, self.launch, self.device = run_log, launch, device
        self.classes = classes
        self.peak_flops, self.flops_per_image = flops
        self.data_stats = data_stats
        self.window, self.times = window, StepTimes()
        self.images_per_step = images_per_step
        self.total_iterations, self.iterations_per_epoch = iterations[1], iterations_per_epoch
        # a bar where a person watches (rank 0's stderr is a terminal); elsewhere (a SLURM job's .out, nohup, CI, a
        # sweep's trial log) tqdm's carriage returns make one unbounded line: a plain line per log window instead
        bar = progress and launch.is_main and sys.stderr.isatty()
        self.lines = launch.is_main and not bar
        self.progress = tqdm(
            total=iterations[1] * images_per_step,
            initial=iterations[0] * images_per_step,
            unit="img",
            unit_scale=True,
            disable=not bar,
            mininterval=1.0,
            dynamic_ncols=True,
        )
        self.shown_batch, self.arrived = False, 0.0
        self.loader_workers = 0  # the loader's processes (or DALI's threads) now: logged with each window's speed

    def timed(self, batches: Iterable) -> Iterator:
        """The batches, counting the wait for each as data time (not the evaluations and checkpoints between)."""
        iterator = iter(batches)
        while True:
            tick = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.arrived = time.perf_counter()
            self.times.data_seconds += self.arrived - tick
            yield batch

    def record(self, iteration: int, step: StepOutcome, images: torch.Tensor, labels: torch.Tensor) -> None:
        """After each step: into the window (on the device), the step's time, the progress bar; the first batch
        this start sees goes to TensorBoard as images."""
        if not self.shown_batch:
            self.run_log.batch_image(iteration - 1, images, *self.data_stats)
            self.shown_batch = True
        self.window.add(step, labels)
        self.progress.update(self.images_per_step)
        self.times.compute_seconds += time.perf_counter() - self.arrived
        self.times.steps += 1

    def flush(
        self,
        iteration: int,
        *,
        lr: float,
        last_step: StepOutcome,
        counts: dict[str, int],
        scaler: torch.amp.GradScaler,
    ) -> float:
        """Log the window's training metrics and each rank's times and peak memory, gathered on every rank (one
        collective each for sums and per-rank rows); images/s is over rank 0's time. ``counts``: the skipped steps so
        far. Returns the share of the window the slowest-fed rank waited for data (the same on every rank)."""
        sums = self.window.take()
        times, self.times = self.times, StepTimes()
        row = [times.compute_seconds / times.steps, times.data_seconds / times.steps, peak_memory_bytes(self.device)]
        per_rank = all_gather_rows(torch.tensor(row, dtype=torch.float64), self.device)
        compute, data = per_rank[:, 0], per_rank[:, 1]
        data_wait = float((data / (compute + data)).max())
        if sums["count"] == 0:  # every step of the window was skipped (train.skip_nonfinite)
            self.run_log.log("train", iteration, {"lr": lr, "skipped_steps": counts["skipped_steps"]})
            self.progress.set_postfix(loss=math.nan, lr=f"{lr:.4g}")
            return data_wait
        summary = window_summary(sums)
        values = {**summary, "lr": lr, "skipped_steps": counts["skipped_steps"]}
        if not last_step.skipped:
            values["grad_norm"] = float(last_step.grad_norm)
        if scaler.is_enabled():
            values |= {"loss_scale": scaler.get_scale(), "scaler_skipped_steps": counts["scaler_skipped_steps"]}
        self.run_log.log("train", iteration, values)
        images_per_second = sums["count"] / times.seconds
        self.run_log.log("speed", iteration, self.speed_metrics(images_per_second, per_rank, iteration))
        self.progress.set_postfix(loss=f"{summary['loss']:.3f}", lr=f"{lr:.4g}", data=f"{data_wait:.0%}")
        if self.lines:
            left = format_seconds((self.total_iterations - iteration) * times.seconds / times.steps)
            self.say(
                iteration,
                f"loss {summary['loss']:.4f}  top-1 {100 * summary['top1']:.2f}%  lr {lr:.4g}  "
                f"{images_per_second:,.0f} img/s  data {data_wait:.0%}  ETA {left}",
            )
        return data_wait

    def say(self, iteration: int, text: str) -> None:
        """A line of the job's log, on stdout: ``[iteration/total] epoch E  text``."""
        width = len(str(self.total_iterations))
        tqdm.write(
            f"[{iteration:>{width}}/{self.total_iterations}] epoch {self.epoch(iteration)}  {text}", file=sys.stdout
        )
        sys.stdout.flush()

    def epoch(self, iteration: int) -> int:
        """The epoch of the step that ends at ``iteration`` (0 before the first)."""
        return (iteration - 1) // self.iterations_per_epoch if iteration else 0

    def speed_metrics(self, images_per_second: float, per_rank: torch.Tensor, iteration: int) -> dict[str, float]:
        """Global images/s; the per-rank step time (compute, without the wait for data) as min/median/max and the
        slowest rank; the share of the step spent waiting for data (of the slowest waiter); peak memory per rank."""
        compute, data, memory = per_rank.T.tolist()
        totals = [c + d for c, d in zip(compute, data, strict=True)]
        metrics = {
            "images_per_second": images_per_second,
            "step_seconds_min": min(compute),
            "step_seconds_median": statistics.median(compute),
            "step_seconds_max": max(compute),
            "slowest_rank": max(range(len(compute)), key=compute.__getitem__),
            "data_wait_fraction": max(d / t for d, t in zip(data, totals, strict=True)),
            "loader_workers": self.loader_workers,
            **{f"peak_memory_gb/rank{rank}": value / 2**30 for rank, value in enumerate(memory)},
        }
        if self.peak_flops is not None and self.flops_per_image is not None:
            flops = self.flops_per_image(self.epoch(iteration))
            metrics["mfu"] = flops * images_per_second / (self.peak_flops * self.launch.world_size)
        return metrics

    def log_eval(
        self, iteration: int, protocol: str, result: EvalResult, *, weights: str = "raw", seconds: float = 0.0
    ) -> None:
        """An evaluation's record, once (a start before this one may have logged it), with the run's wall-clock
        time so far (``seconds``, over all its starts) in hours and device-hours (times the ranks), the measure
        time-to-accuracy is given in. The EMA's evaluation is the protocol "PROTOCOL-ema"."""
        label = protocol if weights == "raw" else f"{protocol}-{weights}"
        if self.launch.is_main:
            self.say(
                iteration,
                f"evaluation ({label}, {result.count} images): top-1 {100 * result.top1:.2f}%  "
                f"top-5 {100 * result.top5:.2f}%",
            )
        if not self.run_log.has_eval(iteration, label):
            hours = seconds / 3600
            timing = {"hours": hours, "device_hours": hours * self.launch.world_size}
            self.run_log.log("eval", iteration, {"protocol": label, **result.as_dict(), **timing})
            if self.classes is not None:
                self.run_log.per_class(iteration, label, result, self.classes)

    def log_memory(self) -> None:
        """After a start's first epoch on a GPU: DALI's pools grow, never shrink, so say how far."""
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            log.info(
                "after the first epoch: %.1f of %.1f GB of the GPU in use (torch's peak allocation %.1f GB)",
                (total - free) / 2**30,
                total / 2**30,
                peak / 2**30,
            )

    def close(self) -> None:
        self.progress.close()
