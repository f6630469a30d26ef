"""The training run: build the parts from the config, resume if asked, then step, log, evaluate, checkpoint.

Everything a resumed run needs to continue bit for bit is in the checkpoint: weights and BN statistics, optimizer
momentum, the iteration (which fixes the epoch and the batch within it, and so the data order and every crop),
the metrics history the schedule reads, the open logging window and the RNG states.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from data_pipeline import TrainLoader, UserError, build_train_loader, build_val_loader
from data_pipeline.synthetic import ensure_synthetic
from trainer.checkpoint import latest_checkpoint, load_checkpoint, load_model_state, save_checkpoint
from trainer.config import Config, to_dict, to_yaml
from trainer.distributed import (
    LaunchEnv,
    all_reduce_sum,
    any_rank,
    apply_ddp,
    apply_sync_batchnorm,
    average_bn_buffers,
    barrier,
    init_process_group,
    pick_device,
)
from trainer.evaluate import EvalResult, evaluate, topk_correct
from trainer.faults import NonFiniteLoss, Preempted, StopSignals
from trainer.models import create_model
from trainer.optim import build_optimizer
from trainer.precision import build_grad_scaler, maybe_autocast
from trainer.run_log import RunLog
from trainer.schedule import LRSchedule, MetricHistory, build_schedule

log = logging.getLogger(__name__)


@dataclass
class TrainWindow:
    """Running training metrics between two log points, as sums over this rank's images. What is logged (and
    what the warm-up schedule reads) is ``summed`` over all ranks; a checkpoint keeps that sum on rank 0 alone."""

    loss_sum: float = 0.0
    correct1: int = 0
    correct5: int = 0
    count: int = 0

    def add(self, loss: float, correct1: int, correct5: int, count: int) -> None:
        self.loss_sum += loss * count
        self.correct1 += correct1
        self.correct5 += correct5
        self.count += count

    def summary(self) -> dict[str, float]:
        return {
            "loss": self.loss_sum / self.count,
            "top1": self.correct1 / self.count,
            "top5": self.correct5 / self.count,
            "top1_error": 1 - self.correct1 / self.count,
        }

    def summed(self, device: torch.device) -> TrainWindow:
        """The sums over every rank, on every rank."""
        sums = torch.tensor([self.loss_sum, self.correct1, self.correct5, self.count], dtype=torch.float64)
        loss_sum, correct1, correct5, count = all_reduce_sum(sums, device).tolist()
        return TrainWindow(loss_sum, int(correct1), int(correct5), int(count))


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
    model: nn.Module  # the plain model: what is saved and exported
    wrapped: nn.Module  # what runs the steps (DDP and/or compiled)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: TrainLoader
    val_batches: Any
    schedule: LRSchedule
    total_iterations: int


def build_run(config: Config, launch: LaunchEnv) -> Run:
    device = pick_device(config.train.device, launch)
    init_process_group(launch, device)
    if launch.is_main and ensure_synthetic(config.data):
        log.info("wrote synthetic data to %s", config.data.root)
    barrier()
    loader = build_train_loader(config.data, rank=launch.rank, world_size=launch.world_size, seed=config.train.seed)
    if len(loader.classes) != config.model.num_classes:
        raise UserError(
            f"model.num_classes={config.model.num_classes}: the data at {config.data.root} has "
            f"{len(loader.classes)} classes"
        )
    val_batches = build_eval_batches(config, launch, config.eval.protocol)
    torch.manual_seed(config.train.seed)
    model = create_model(config.model.name, **config.model.overrides())
    memory_format = torch.channels_last if config.train.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    if config.model.sync_bn:
        model = apply_sync_batchnorm(model, device)
    wrapped = apply_ddp(model, device) if launch.distributed else model
    if config.train.compile:
        wrapped = torch.compile(wrapped)
    train = config.train
    total = train.iterations if train.iterations is not None else train.epochs * loader.batches_per_epoch
    schedule = build_schedule(
        config.schedule, config.optim, global_batch=config.global_batch(), iterations_per_epoch=loader.batches_per_epoch
    )
    run_dir = Path(train.output_dir) / train.run_name
    optimizer = build_optimizer(model, config.optim)
    scaler = build_grad_scaler(device, train.precision)
    return Run(config, launch, run_dir, device, model, wrapped, optimizer, scaler, loader, val_batches, schedule, total)


def build_eval_batches(config: Config, launch: LaunchEnv, protocol: str) -> Any:
    return build_val_loader(
        config.data,
        rank=launch.rank,
        world_size=launch.world_size,
        batch_per_rank=config.eval.batch_size // launch.world_size,
        protocol=protocol,
        scales=tuple(config.eval.scales),
    )


def checkpoint_state(run: Run, state: TrainState) -> dict[str, Any]:
    return {
        "model_name": run.config.model.name,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "iteration": state.iteration,
        "skipped_steps": state.skipped_steps,
        "scaler_skipped_steps": state.scaler_skipped_steps,
        "scaler": run.scaler.state_dict(),
        "batches_per_epoch": run.loader.batches_per_epoch,
        "classes": run.loader.classes,
        "history": state.history.state_dict(),
        "window": vars(state.window).copy(),
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
    load_model_state(run.model, checkpoint["model"], source=source, name=run.config.model.name)
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    random.setstate(checkpoint["rng"]["python"])
    history = MetricHistory.from_state_dict(checkpoint["history"])
    window = TrainWindow(**checkpoint["window"]) if run.launch.is_main else TrainWindow()
    run.scaler.load_state_dict(checkpoint["scaler"])
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


@dataclass
class StepOutcome:
    loss: float
    logits: torch.Tensor
    skipped: bool  # the loss was not finite on some rank and train.skip_nonfinite is set: no update
    stop: bool  # some rank received a stop signal: checkpoint after this step and exit
    scaler_skipped: bool = False  # fp16: the gradients overflowed, the scaler skipped the update


def train_step(run: Run, images: torch.Tensor, labels: torch.Tensor, signals: StopSignals) -> StepOutcome:
    with maybe_autocast(run.device, run.config.train.precision):
        logits = run.wrapped(images)
        loss = F.cross_entropy(logits, labels)
    loss_value = loss.item()  # the step's one host sync: the finiteness check and the logged loss both use it
    nonfinite, stop = any_rank([not math.isfinite(loss_value), signals.received is not None], run.device)
    run.optimizer.zero_grad(set_to_none=True)
    scaler_skipped = False
    if not nonfinite:  # every rank takes the same branch, as DDP's collective backward requires
        scale = run.scaler.get_scale() if run.scaler.is_enabled() else 1.0
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)  # fp16: no update when a gradient overflowed (the same on every rank)
        run.scaler.update()
        scaler_skipped = run.scaler.is_enabled() and run.scaler.get_scale() < scale
    return StepOutcome(loss_value, logits.detach(), skipped=nonfinite, stop=stop, scaler_skipped=scaler_skipped)


def run_evaluation(run: Run, batches: Any) -> EvalResult:
    average_bn_buffers(run.model)
    return evaluate(
        run.wrapped,
        batches,
        num_classes=run.config.model.num_classes,
        device=run.device,
        precision=run.config.train.precision,
        channels_last=run.config.train.channels_last,
    )


def train(config: Config, launch: LaunchEnv) -> tuple[EvalResult, RunLog]:
    """Train to ``total_iterations`` (resuming when a checkpoint is found) and return the final evaluation
    (``eval.final_protocol``)."""
    run = build_run(config, launch)
    state = TrainState()
    source = find_resume_checkpoint(run)
    if source is not None:
        state = restore(run, load_checkpoint(source), source)
        log.info("resumed from %s at iteration %d", source, state.iteration)
    if launch.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "config.yaml").write_text(to_yaml(config))
    run_log = RunLog(run.run_dir, start_iteration=state.iteration, enabled=launch.is_main)
    run_log.text("config", "```\n" + to_yaml(config) + "```")
    log.info(
        "%s: global batch %d (%d per rank x %d ranks), %d iterations (%d per epoch), run directory %s",
        config.model.name,
        config.global_batch(),
        config.global_batch() // launch.world_size,
        launch.world_size,
        run.total_iterations,
        run.loader.batches_per_epoch,
        run.run_dir,
    )
    try:
        with StopSignals() as signals:
            result = train_iterations(run, state, run_log, signals)
        if result is None:  # the run had finished before: evaluate its final weights again, logging nothing new
            result = run_evaluation(run, run.val_batches)
        final = config.eval.final_protocol
        if final != config.eval.protocol:
            result = run_evaluation(run, build_eval_batches(config, launch, final))
            run_log.log("eval", state.iteration, {"protocol": final, **result.as_dict()})
    finally:
        run_log.close()
    return result, run_log


def train_iterations(run: Run, state: TrainState, run_log: RunLog, signals: StopSignals) -> EvalResult | None:
    train, per_epoch = run.config.train, run.loader.batches_per_epoch
    eval_every, checkpoint_every = train.eval_every or per_epoch, train.checkpoint_every or per_epoch
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
    result, window_seconds, tick = None, 0.0, time.perf_counter()
    run.wrapped.train()
    while state.iteration < run.total_iterations:
        epoch, start = divmod(state.iteration, per_epoch)
        for images, labels in run.loader.epoch(epoch, start):  # the wait for a batch counts in the window's time
            lr = run.schedule.lr(state.iteration, state.history)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            images = images.to(run.device, non_blocking=True, memory_format=memory_format)
            labels = labels.to(run.device, non_blocking=True)
            step = train_step(run, images, labels, signals)
            state.iteration += 1
            if step.skipped:
                if not train.skip_nonfinite:
                    raise NonFiniteLoss(
                        f"the training loss is not finite at iteration {state.iteration}; stopped "
                        f"without updating the weights; the last checkpoint is kept "
                        f"({latest_checkpoint(run.run_dir)}); train.skip_nonfinite=true skips such steps"
                    )
                state.skipped_steps += 1
            else:
                state.scaler_skipped_steps += step.scaler_skipped
                state.window.add(step.loss, *topk_correct(step.logits.float(), labels), len(labels))
            progress.update(batch)
            window_seconds += time.perf_counter() - tick
            result = None
            if state.iteration % train.log_every == 0:
                log_window(run, state, run_log, lr=lr, seconds=window_seconds, progress=progress)
                window_seconds = 0.0
            if state.iteration % eval_every == 0 or state.iteration == run.total_iterations:
                result = run_evaluation(run, run.val_batches)
                state.history.val_errors.append((state.iteration, 1 - result.top1))
                run_log.log("eval", state.iteration, {"protocol": run.config.eval.protocol, **result.as_dict()})
            if state.iteration % checkpoint_every == 0 or state.iteration == run.total_iterations or step.stop:
                save(run, state)
            if step.stop:
                raise Preempted(
                    f"stopped by {signals.name} at iteration {state.iteration} of "
                    f"{run.total_iterations}; checkpoint written; a new start resumes from it"
                )
            if state.iteration == run.total_iterations:
                break
            tick = time.perf_counter()
    progress.close()
    return result


def log_window(run: Run, state: TrainState, run_log: RunLog, *, lr: float, seconds: float, progress: tqdm) -> None:
    """Log the window's training metrics; ``seconds`` is its wall time less evaluations and checkpoints."""
    window = state.window.summed(run.device)
    state.window = TrainWindow()
    if window.count == 0:  # every step of the window was skipped (train.skip_nonfinite)
        run_log.log("train", state.iteration, {"lr": lr, "skipped_steps": state.skipped_steps})
        return
    summary = window.summary()
    if not math.isfinite(summary["loss"]):
        raise RuntimeError(f"non-finite training loss at iteration {state.iteration}; the last checkpoint is kept")
    state.history.train_errors.append((state.iteration, summary["top1_error"]))
    images_per_second = window.count / seconds
    values = {**summary, "lr": lr, "images_per_second": images_per_second, "skipped_steps": state.skipped_steps}
    if run.scaler.is_enabled():
        values |= {"loss_scale": run.scaler.get_scale(), "scaler_skipped_steps": state.scaler_skipped_steps}
    run_log.log("train", state.iteration, values)
    progress.set_postfix(loss=f"{summary['loss']:.3f}", top1=f"{summary['top1']:.3f}", lr=f"{lr:.4g}")


def save(run: Run, state: TrainState) -> None:
    # The open window's sums over all ranks go into the checkpoint; rank 0 carries them on, so a restore that
    # gives rank 0 the saved window and the others an empty one logs the same figures.
    window = state.window.summed(run.device)
    state.window = window if run.launch.is_main else TrainWindow()
    average_bn_buffers(run.model)
    if run.launch.is_main:
        save_checkpoint(
            run.run_dir, state.iteration, checkpoint_state(run, state), keep=run.config.train.keep_checkpoints
        )
    barrier()
