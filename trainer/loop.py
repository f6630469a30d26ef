"""The training run: build the parts from the config, resume if asked, then step, log, evaluate, checkpoint.

Everything a resumed run needs to continue bit for bit is in the checkpoint: weights and BN statistics, optimizer
momentum, the iteration (which fixes the epoch and the batch within it, and so the data order and every crop),
the metrics history the schedule reads, the open logging window and the RNG states.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from data_pipeline import UserError, build_train_loader, build_val_loader
from data_pipeline.datasets import check_same_classes, val_classes
from data_pipeline.loaders import TrainBatches
from data_pipeline.synthetic import ensure_synthetic
from trainer.checkpoint import (
    latest_checkpoint,
    load_model_and_optimizer,
    read_train_state,
    save_checkpoint,
)
from trainer.config import Config, to_dict, to_yaml
from trainer.distributed import (
    LaunchEnv,
    all_gather_rows,
    all_reduce_sum,
    average_bn_buffers,
    barrier,
    init_process_group,
    peak_memory_bytes,
    pick_device,
)
from trainer.evaluate import EvalResult, evaluate, topk_hits
from trainer.faults import NonFiniteLoss, Preempted, StopSignals
from trainer.hardware import environment, format_environment, resolve_auto
from trainer.run_log import RunLog
from trainer.schedule import LRSchedule, MetricHistory, build_schedule
from trainer.step import STEP_FLAGS, HostCopy, StepOutcome, Stepper, build_stepper
from trainer.throughput import peak_flops, training_flops_per_image

log = logging.getLogger(__name__)


WINDOW_SUMS = ("loss_sum", "correct1", "correct5", "count")


@dataclass
class TrainWindow:
    """Running training metrics between two log points: sums over this rank's images of the loss, the top-1 and
    top-5 hits and the images (WINDOW_SUMS), kept on the device so that no step waits for them. What is logged (and
    what the warm-up schedule reads) is ``summed`` over all ranks; a checkpoint keeps that sum on rank 0 alone."""

    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(len(WINDOW_SUMS), dtype=torch.float64))

    @classmethod
    def from_state_dict(cls, saved: dict[str, float]) -> TrainWindow:
        return cls(torch.tensor([saved[key] for key in WINDOW_SUMS], dtype=torch.float64))

    def add(self, step: StepOutcome, labels: torch.Tensor) -> None:
        """A step's losses and hits; none of a skipped step (its loss may be NaN)."""
        hit1, hit5 = (hits.sum() for hits in topk_hits(step.logits.float(), labels))
        count = labels.new_full((), len(labels), dtype=torch.float64)
        sums = torch.stack([step.loss_sum.double(), hit1.double(), hit5.double(), count])
        self.sums = self.sums.to(sums.device) + torch.where(step.skipped, 0.0, sums)

    def summed(self, device: torch.device) -> dict[str, float]:
        """The sums over every rank, on every rank."""
        return dict(zip(WINDOW_SUMS, all_reduce_sum(self.sums, device).tolist(), strict=True))


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


@dataclass
class TrainState:
    iteration: int = 0
    skipped_steps: int = 0  # steps without an update because the loss was not finite
    scaler_skipped_steps: int = 0  # fp16 steps the gradient scaler skipped (overflow)
    history: MetricHistory = field(default_factory=MetricHistory)
    window: TrainWindow = field(default_factory=TrainWindow)


@dataclass
class Run:
    """The parts of one training run, built once from the config."""

    config: Config
    launch: LaunchEnv
    run_dir: Path
    device: torch.device
    stepper: Stepper  # the model, its parallel wrapper, the optimizer and the gradient scaler
    loader: TrainBatches
    val_batches: Any
    schedule: LRSchedule
    total_iterations: int
    peak_flops: float | None = None  # the GPUs' dense peak, for the model FLOP utilization
    flops_per_image: float = 0.0  # training FLOPs: 3 x forward


def build_run(config: Config, launch: LaunchEnv, device: torch.device) -> Run:
    """``config`` with its ``auto`` settings resolved (``resolve_auto``)."""
    init_process_group(launch, device)
    if launch.is_main and ensure_synthetic(config.data):
        log.info("wrote synthetic data to %s", config.data.root)
    barrier()
    loader = build_train_loader(
        config.data, rank=launch.rank, world_size=launch.world_size, seed=config.train.seed, device=device
    )
    if len(loader.classes) != config.model.num_classes:
        raise UserError(
            f"model.num_classes={config.model.num_classes}: the data at {config.data.root} has "
            f"{len(loader.classes)} classes"
        )
    val_batches = build_eval_batches(config, launch, config.eval.protocol, device)
    if (classes := val_classes(config.data.root, config.data.format)) is not None:
        check_same_classes(loader.classes, classes, where=f"{config.data.root}/val", expected_are="of train/")
    stepper = build_stepper(config, launch, device)
    train = config.train
    total = train.iterations if train.iterations is not None else train.epochs * loader.batches_per_epoch
    schedule = build_schedule(
        config.schedule, config.optim, global_batch=config.global_batch(), iterations_per_epoch=loader.batches_per_epoch
    )
    run_dir = Path(train.output_dir) / train.run_name
    run = Run(config, launch, run_dir, device, stepper, loader, val_batches, schedule, total)
    run.peak_flops = peak_flops(device, train.precision)
    if run.peak_flops is not None:
        run.flops_per_image = training_flops_per_image(config)
    return run


def build_eval_batches(config: Config, launch: LaunchEnv, protocol: str, device: torch.device) -> Any:
    return build_val_loader(
        config.data,
        rank=launch.rank,
        world_size=launch.world_size,
        batch_per_rank=config.eval.batch_size // launch.world_size,
        protocol=protocol,
        scales=tuple(config.eval.scales),
        device=device,
    )


def train_state_dict(run: Run, state: TrainState) -> dict[str, Any]:
    """What a checkpoint holds besides the model and the optimizer."""
    return {
        "model_name": run.config.model.name,
        "iteration": state.iteration,
        "epoch": state.iteration // run.loader.batches_per_epoch,  # with the iteration: the data position
        "strategy": run.config.dist.strategy,
        "world_size": run.launch.world_size,
        "skipped_steps": state.skipped_steps,
        "scaler_skipped_steps": state.scaler_skipped_steps,
        "scaler": run.stepper.scaler.state_dict(),
        "batches_per_epoch": run.loader.batches_per_epoch,
        "classes": run.loader.classes,
        "history": state.history.state_dict(),
        "window": dict(zip(WINDOW_SUMS, state.window.sums.tolist(), strict=True)),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "config": to_dict(run.config),
    }


def restore(run: Run, checkpoint: dict[str, Any], source: Path) -> TrainState:
    if checkpoint.get("model_name") != run.config.model.name:
        raise UserError(
            f"{source}: a checkpoint of {checkpoint.get('model_name')!r}, not of model.name={run.config.model.name!r}"
        )
    if checkpoint["batches_per_epoch"] != run.loader.batches_per_epoch:
        raise UserError(
            f"{source}: saved with {checkpoint['batches_per_epoch']} batches per epoch, this run has "
            f"{run.loader.batches_per_epoch}: the data set or data.batch_size changed"
        )
    stepper = run.stepper
    load_model_and_optimizer(source, checkpoint, stepper.model, stepper.optimizer, name=run.config.model.name)
    torch.set_rng_state(checkpoint["rng"]["torch"])
    random.setstate(checkpoint["rng"]["python"])
    history = MetricHistory.from_state_dict(checkpoint["history"])
    window = TrainWindow.from_state_dict(checkpoint["window"]) if run.launch.is_main else TrainWindow()
    stepper.scaler.load_state_dict(checkpoint["scaler"])
    skipped = checkpoint["skipped_steps"], checkpoint["scaler_skipped_steps"]
    return TrainState(checkpoint["iteration"], *skipped, history, window)


def find_resume_checkpoint(run: Run) -> Path | None:
    """``train.resume``: "auto" (the latest checkpoint if there is one), "latest" (it must exist), "never", or
    a checkpoint's path."""
    resume = run.config.train.resume
    if resume == "never":
        return None
    if resume in ("auto", "latest"):
        latest = latest_checkpoint(run.run_dir)
        if latest is None and resume == "latest":
            raise UserError(f"--resume: no checkpoint in {run.run_dir / 'checkpoints'} to resume from")
        return latest
    return Path(resume)


def run_evaluation(run: Run, batches: Any) -> EvalResult:
    average_bn_buffers(run.stepper.model)
    return evaluate(
        run.stepper.wrapped,
        batches,
        num_classes=run.config.model.num_classes,
        device=run.device,
        precision=run.config.train.precision,
        channels_last=run.config.train.channels_last,
        sharded=run.config.dist.strategy == "fsdp" and run.launch.distributed,
    )


def train(config: Config, launch: LaunchEnv) -> tuple[EvalResult, RunLog]:
    """Train to ``total_iterations`` (resuming when a checkpoint is found) and return the final evaluation
    (``eval.final_protocol``); a run that had finished is evaluated again."""
    facts = environment(launch) if launch.is_main else {}
    if launch.is_main:
        log.info("this machine:\n%s", format_environment(facts))
    device = pick_device(config.train.device, launch)
    config, choices = resolve_auto(config, launch, device)
    for line in choices:
        log.info("%s", line)
    run = build_run(config, launch, device)
    state = TrainState()
    source = find_resume_checkpoint(run)
    if source is not None:
        state = restore(run, read_train_state(source), source)
        log.info("resumed from %s at iteration %d", source, state.iteration)
    if launch.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "config.yaml").write_text(to_yaml(config))
        (run.run_dir / "env.json").write_text(json.dumps(facts, indent=2) + "\n")
    run_log = RunLog(run.run_dir, start_iteration=state.iteration, enabled=launch.is_main)
    run_log.text("config", "```\n" + to_yaml(config) + "```\n\n" + "\n\n".join(choices))
    accumulation = config.train.accumulation
    log.info(
        "%s, %s: global batch %d (%d per rank x %d ranks x %d accumulation), %d iterations (%d per epoch), "
        "run directory %s",
        config.model.name,
        config.dist.strategy if launch.distributed else "one process",
        config.global_batch(),
        config.global_batch() // launch.world_size // accumulation,
        launch.world_size,
        accumulation,
        run.total_iterations,
        run.loader.batches_per_epoch,
        run.run_dir,
    )
    try:
        with StopSignals() as signals:
            result = train_iterations(run, state, run_log, signals)
        final = config.eval.final_protocol
        if final != config.eval.protocol:
            result = run_evaluation(run, build_eval_batches(config, launch, final, run.device))
            if not run_log.has_eval(state.iteration, final):  # not logged by an earlier start of a finished run
                run_log.log("eval", state.iteration, {"protocol": final, **result.as_dict()})
        final_metrics = {"top1": result.top1, "top5": result.top5, "top1_error": 1 - result.top1}
        run_log.hparams(state.iteration, to_dict(config), {f"hparams/{k}": v for k, v in final_metrics.items()})
    finally:
        run_log.close()
    return result, run_log


UNIX_SOCKET_ROOM = 75  # multiprocessing binds sockets at TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX; Linux allows 107


def use_run_tmpdir(run_dir: Path, launch: LaunchEnv) -> None:
    """This rank's temporary files (multiprocessing's pymp-*, those of DALI's workers) in RUN_DIR/tmp/rankN, emptied
    at each start: a run killed with -9 leaves them in its own folder, not in $TMPDIR. A run directory too deep for
    a socket path keeps $TMPDIR. For the whole process: `residual train` calls it first."""
    folder = run_dir.absolute() / "tmp" / f"rank{launch.rank}"
    if len(str(folder)) > UNIX_SOCKET_ROOM:
        log.info("temporary files in %s (%s is too long a path for the sockets made there)", tempfile.gettempdir(),
                 folder)  # fmt: skip
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.environ["TMPDIR"] = str(folder)  # for the processes this one starts
    tempfile.tempdir = str(folder)


def train_iterations(run: Run, state: TrainState, run_log: RunLog, signals: StopSignals) -> EvalResult:
    """Steps to ``total_iterations``; returns the last evaluation. A checkpoint is written before the evaluation of
    the same iteration, so a failed evaluation loses no training; a run resumed from it makes that evaluation
    first (logged once)."""
    train, per_epoch = run.config.train, run.loader.batches_per_epoch
    eval_every, checkpoint_every = train.eval_every or per_epoch, train.checkpoint_every or per_epoch

    def evaluation_due() -> bool:
        return state.iteration > 0 and (state.iteration % eval_every == 0 or state.iteration == run.total_iterations)

    memory_format = torch.channels_last if train.channels_last else torch.contiguous_format
    batch = run.config.global_batch()
    progress = tqdm(
        total=run.total_iterations * batch,
        initial=state.iteration * batch,
        unit="img",
        unit_scale=True,
        disable=not (train.progress and run.launch.is_main),
        mininterval=1.0,
        dynamic_ncols=True,
    )
    result, times, first_batch = None, StepTimes(), True
    unread: list[tuple[int, HostCopy]] = []  # steps whose flags are on their way to the host
    if evaluation_due():  # resumed from the checkpoint written before this iteration's evaluation
        result = evaluate_and_log(run, state, run_log)
    start_epoch = state.iteration // per_epoch
    run.stepper.wrapped.train()
    while state.iteration < run.total_iterations:
        epoch, start = divmod(state.iteration, per_epoch)
        tick = time.perf_counter()
        for images, labels in run.loader.epoch(epoch, start):
            arrived = time.perf_counter()
            lr = run.schedule.lr(state.iteration, state.history)
            for group in run.stepper.optimizer.param_groups:
                group["lr"] = lr
            images = images.to(run.device, non_blocking=True, memory_format=memory_format)
            labels = labels.to(run.device, non_blocking=True)
            if first_batch:
                run_log.batch_image(state.iteration, images, run.config.data.mean, run.config.data.std)
                first_batch = False
            logging_step = (state.iteration + 1) % train.log_every == 0
            step = run.stepper.step(images, labels, stop=signals.received is not None, grad_norm=logging_step)
            state.iteration += 1
            state.window.add(step, labels)
            unread.append((state.iteration, HostCopy(step.flags)))
            checkpoint_due = state.iteration % checkpoint_every == 0 or state.iteration == run.total_iterations
            # A step's flags are read once the next step is queued; at a log point, checkpoint or evaluation, now.
            read_now = logging_step or checkpoint_due or evaluation_due()
            reading, unread = (unread, []) if read_now else (unread[:-1], unread[-1:])
            stop = read_step_flags(run, state, reading)
            progress.update(batch)
            done = time.perf_counter()
            times.data_seconds += arrived - tick
            times.compute_seconds += done - arrived
            times.steps += 1
            if logging_step:
                loss = log_window(run, state, run_log, lr=lr, times=times, last_step=step)
                progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.4g}")
                times = StepTimes()
            if checkpoint_due or stop:
                save(run, state)
            if stop:
                raise Preempted(
                    f"stopped by {signals.name} at iteration {state.iteration} of "
                    f"{run.total_iterations}; checkpoint written; a new start resumes from it"
                )
            if evaluation_due():
                result = evaluate_and_log(run, state, run_log)
            if state.iteration == run.total_iterations:
                break
            tick = time.perf_counter()  # the wait for the next batch starts here: evaluations are not counted
        if epoch == start_epoch and run.device.type == "cuda":  # DALI's pools grow, never shrink: say how far
            free, total = torch.cuda.mem_get_info(run.device)
            peak = torch.cuda.max_memory_allocated(run.device)
            log.info("after the first epoch: %.1f of %.1f GB of the GPU in use (torch's peak allocation %.1f GB)",
                     (total - free) / 2**30, total / 2**30, peak / 2**30)  # fmt: skip
    progress.close()
    return result


def evaluate_and_log(run: Run, state: TrainState, run_log: RunLog) -> EvalResult:
    """This iteration's evaluation, into the history the schedule reads and into the logs, each once (a checkpoint
    of an earlier version of this code holds it already; a start before this one may have logged it)."""
    result = run_evaluation(run, run.val_batches)
    if not state.history.val_errors or state.history.val_errors[-1][0] != state.iteration:
        state.history.val_errors.append((state.iteration, 1 - result.top1))
    protocol = run.config.eval.protocol
    if not run_log.has_eval(state.iteration, protocol):
        run_log.log("eval", state.iteration, {"protocol": protocol, **result.as_dict()})
    return result


def read_step_flags(run: Run, state: TrainState, unread: list[tuple[int, HostCopy]]) -> bool:
    """Count the skipped steps among ``unread`` (iteration, flags) and stop at a non-finite loss unless
    train.skip_nonfinite (its update was cancelled); whether a rank received a stop signal."""
    stop = False
    for iteration, copy in unread:
        flags = dict(zip(STEP_FLAGS, copy.values(), strict=True))
        if flags["skipped"] and not run.config.train.skip_nonfinite:
            raise NonFiniteLoss(
                f"the training loss is not finite at iteration {iteration}; stopped without updating the weights; "
                f"the last checkpoint is kept ({latest_checkpoint(run.run_dir)}); train.skip_nonfinite=true skips "
                f"such steps"
            )
        state.skipped_steps += int(flags["skipped"])
        state.scaler_skipped_steps += int(flags["scaler_skipped"])
        stop = stop or bool(flags["stop"])
    return stop


def log_window(run: Run, state: TrainState, run_log: RunLog, *, lr: float, times: StepTimes,
               last_step: StepOutcome) -> float:  # fmt: skip
    """Log the window's training metrics and each rank's times and peak memory, gathered on every rank (one
    collective each for sums and per-rank rows); images/s is over rank 0's time. Returns the window's loss."""
    sums = state.window.summed(run.device)
    state.window = TrainWindow()
    row = [times.compute_seconds / times.steps, times.data_seconds / times.steps, peak_memory_bytes(run.device)]
    per_rank = all_gather_rows(torch.tensor(row, dtype=torch.float64), run.device)
    if sums["count"] == 0:  # every step of the window was skipped (train.skip_nonfinite)
        run_log.log("train", state.iteration, {"lr": lr, "skipped_steps": state.skipped_steps})
        return math.nan
    summary = window_summary(sums)
    state.history.train_errors.append((state.iteration, summary["top1_error"]))
    values = {**summary, "lr": lr, "skipped_steps": state.skipped_steps}
    if not last_step.skipped:
        values["grad_norm"] = float(last_step.grad_norm)
    scaler = run.stepper.scaler
    if scaler.is_enabled():
        values |= {"loss_scale": scaler.get_scale(), "scaler_skipped_steps": state.scaler_skipped_steps}
    run_log.log("train", state.iteration, values)
    run_log.log("speed", state.iteration, speed_metrics(run, sums["count"] / times.seconds, per_rank))
    return summary["loss"]


def speed_metrics(run: Run, images_per_second: float, per_rank: torch.Tensor) -> dict[str, float]:
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
        **{f"peak_memory_gb/rank{rank}": value / 2**30 for rank, value in enumerate(memory)},
    }
    if run.peak_flops is not None:
        metrics["mfu"] = run.flops_per_image * images_per_second / (run.peak_flops * run.launch.world_size)
    return metrics


def save(run: Run, state: TrainState) -> None:
    # The open window's sums over all ranks go into the checkpoint; rank 0 carries them on, so a restore that
    # gives rank 0 the saved window and the others an empty one logs the same figures.
    window = state.window.summed(run.device)
    state.window = TrainWindow.from_state_dict(window) if run.launch.is_main else TrainWindow()
    average_bn_buffers(run.stepper.model)
    save_checkpoint(
        run.run_dir,
        state.iteration,
        run.stepper.model,
        run.stepper.optimizer,
        train_state_dict(run, state),
        sharded=run.config.dist.strategy == "fsdp",
        keep=run.config.train.keep_checkpoints,
        is_main=run.launch.is_main,
        device=run.device,
    )
