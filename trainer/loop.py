"""The training run as its algorithm: build the parts from the config, resume if a checkpoint is found, then for
each batch set the lr, step, record the metrics, and at their points log, checkpoint, evaluate, stop; end with the
final evaluation. The parts: ``Stepper`` (trainer.step) makes the update, ``MetricsProcessor`` (trainer.metrics)
measures and logs, ``CheckpointManager`` (trainer.checkpoint) decides what a checkpoint holds and when one is written.

A resumed run continues bit for bit: a checkpoint holds weights and BN statistics, optimizer momentum, the
iteration (which fixes the epoch and the batch within it, and so the data order and every crop), the metrics
history the schedule reads, the open logging window and the RNG states.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from data_pipeline import UserError, build_train_loader, build_val_loader
from data_pipeline.datasets import check_folder_classes
from data_pipeline.datasets.folder_index import index_splits
from data_pipeline.loaders import TrainBatches
from data_pipeline.prepare.synthetic import ensure_synthetic
from data_pipeline.published import identify, title
from trainer.checkpoint import CheckpointManager, latest_checkpoint
from trainer.config import Config, to_dict, to_yaml
from trainer.distributed import LaunchEnv, average_bn_buffers, barrier, init_process_group, pick_device
from trainer.ema import WeightAverage, build_weight_average
from trainer.evaluate import EvalResult, evaluate
from trainer.faults import Interrupted, NonFiniteLoss, Preempted, StopSignals
from trainer.hardware import LoaderTuner, environment, format_environment, resolve_auto
from trainer.metrics import MetricsProcessor
from trainer.mixing import BatchMixer
from trainer.run_dir import run_directory
from trainer.run_log import RunLog
from trainer.schedule import LRSchedule, MetricHistory, build_schedule
from trainer.step import LateFlags, Stepper, build_stepper
from trainer.throughput import peak_flops, training_flops_per_image

log = logging.getLogger(__name__)


def train(config: Config, launch: LaunchEnv) -> tuple[EvalResult, RunLog]:
    """Train to the run's last iteration (resuming when a checkpoint is found) and end with the final evaluation
    (``eval.final_protocol``); a run that had finished is evaluated again."""
    device = pick_device(config.train.device, launch)
    init_process_group(launch, device)
    run_dir = Path(config.train.output_dir) / config.train.run_name
    with run_directory(run_dir, launch, device):  # before anything is written or logged: refused if another run has it
        return train_in(run_dir, config, launch, device)


def train_in(run_dir: Path, config: Config, launch: LaunchEnv, device: torch.device) -> tuple[EvalResult, RunLog]:
    facts = environment(launch) if launch.is_main else {}
    if launch.is_main:
        log.info("this machine:\n%s", format_environment(facts))
    config, choices, tuner = resolve_auto(config, launch, device)
    if config.data.index_dir is None:  # an image folder is listed once, into the run directory
        config = replace(config, data=replace(config.data, index_dir=str(run_dir / "index")))
    for line in choices:
        log.info("%s", line)
    run = build_run(config, launch, device)
    run.tuner = tuner
    state = TrainState()
    checkpoints = CheckpointManager(
        run.run_dir, config, model=run.stepper.model, optimizer=run.stepper.optimizer, scaler=run.stepper.scaler,
        ema=run.ema, launch=launch, device=device, batches_per_epoch=run.loader.batches_per_epoch,
        classes=run.loader.classes, total_iterations=run.total_iterations,
    )  # fmt: skip
    saved_window = checkpoints.resume(state)
    if state.iteration > run.total_iterations:
        raise UserError(
            f"train.iterations={run.total_iterations}: the run's checkpoint is at iteration {state.iteration}, past "
            f"it; train on with more iterations, or evaluate it with `residual eval {latest_checkpoint(run.run_dir)}`"
        )
    run_log = RunLog(run.run_dir, start_iteration=state.iteration, enabled=launch.is_main)
    dataset = identify(config.data, run.loader.classes)
    log.info("data set: %s (%s)", title(dataset), config.data.root)
    run_log.record_run(to_yaml(config), facts, choices, dataset)
    metrics = MetricsProcessor(
        run_log, launch=launch, device=device, log_every=config.log.every, progress=config.log.progress,
        images_per_step=config.global_batch(), iterations=(state.iteration, run.total_iterations),
        iterations_per_epoch=run.loader.batches_per_epoch,
        flops=(run.peak_flops, run.flops_per_image), data_stats=(config.data.mean, config.data.std),
    )  # fmt: skip
    if saved_window is not None:
        metrics.load_state_dict(saved_window)
    metrics.loader_workers = tuner.count
    describe(run)
    try:
        with StopSignals() as signals:
            last = train_iterations(run, state, checkpoints, metrics, signals)
        result = final_evaluation(run, state, metrics, last)
    finally:
        metrics.close()
        run_log.close()
    return result, run_log


@dataclass
class TrainState:
    iteration: int = 0
    skipped_steps: int = 0  # steps without an update because the loss was not finite
    scaler_skipped_steps: int = 0  # fp16 steps the gradient scaler skipped (overflow)
    history: MetricHistory = field(default_factory=MetricHistory)
    seconds: float = 0.0  # wall-clock of training and evaluation so far, over every start (time-to-accuracy)

    def state_dict(self) -> dict[str, Any]:
        return {**vars(self), "history": self.history.state_dict()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.iteration, self.skipped_steps = saved["iteration"], saved["skipped_steps"]
        self.scaler_skipped_steps, self.history = (
            saved["scaler_skipped_steps"],
            MetricHistory.from_state_dict(saved["history"]),
        )
        self.seconds = saved.get("seconds", 0.0)  # checkpoints before time-to-accuracy have none


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
    mixer: BatchMixer  # Mixup/CutMix of each batch (loss section), or nothing
    ema: WeightAverage | None = None  # the EMA of the weights (ema section)
    tuner: LoaderTuner | None = None  # data.workers (DALI: data.threads) auto: grown while the step waits for data
    peak_flops: float | None = None  # the GPUs' dense peak, for the model FLOP utilization
    flops_per_image: Callable[[int], float] | None = None  # training FLOPs of an epoch's images: 3 x forward

    def evaluation_due(self, iteration: int) -> bool:
        """On the cadence (``eval.every``, default every epoch) and at the last iteration."""
        every = self.config.eval.every or self.loader.batches_per_epoch
        return iteration > 0 and (iteration % every == 0 or iteration == self.total_iterations)

    def set_lr(self, state: TrainState) -> float:
        lr = self.schedule.lr(state.iteration, state.history)
        for group in self.stepper.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def grow_loader(self, data_wait: float, iteration: int) -> bool:
        """One more loader process (DALI: thread) where the last window waited for data (``LoaderTuner``): the
        loader is built again with it, and the caller restarts the epoch at the next batch (the batches are
        functions of the position alone: the same images and crops, whatever the count)."""
        if self.tuner is None or (count := self.tuner.grow(data_wait)) is None:
            return False
        key = self.tuner.key
        log.info("data.%s %d -> %d at iteration %d: the step waited for data %.0f%% of the last window", key,
                 getattr(self.config.data, key), count, iteration, 100 * data_wait)  # fmt: skip
        self.config = replace(self.config, data=replace(self.config.data, **{key: count}))
        self.loader = build_train_loader(self.config.data, rank=self.launch.rank, world_size=self.launch.world_size,
                                         seed=self.config.train.seed, device=self.device)  # fmt: skip
        return True

    def to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memory_format = torch.channels_last if self.config.train.channels_last else torch.contiguous_format
        images = images.to(self.device, non_blocking=True, memory_format=memory_format)
        return images, labels.to(self.device, non_blocking=True)


def build_run(config: Config, launch: LaunchEnv, device: torch.device) -> Run:
    """``config`` with its ``auto`` settings resolved (``resolve_auto``), in its process group."""
    if launch.is_main and ensure_synthetic(config.data):
        log.info("wrote synthetic data to %s", config.data.root)
    check_folder_classes(config.data.root, config.data.format)
    if launch.is_main and config.data.format == "imagefolder" and config.data.index_dir is not None:
        started = time.perf_counter()
        done = index_splits(config.data.root, config.data.index_dir)
        log.info("data index: %s in %.1f s (%s)", "; ".join(done), time.perf_counter() - started,
                 config.data.index_dir)  # fmt: skip
    barrier()  # the other ranks read what rank 0 wrote
    loader = build_train_loader(
        config.data, rank=launch.rank, world_size=launch.world_size, seed=config.train.seed, device=device
    )
    if len(loader.classes) != config.model.num_classes:
        raise UserError(
            f"model.num_classes={config.model.num_classes}: the data at {config.data.root} has "
            f"{len(loader.classes)} classes"
        )
    if loader.channels != config.model.in_channels:
        raise UserError(
            f"model.in_channels={config.model.in_channels}: the images at {config.data.root} have "
            f"{loader.channels} channel{'s' if loader.channels > 1 else ''}"
        )
    val_batches = build_eval_batches(config, launch, config.eval.protocol, device)
    stepper = build_stepper(config, launch, device)
    train = config.train
    total = train.iterations if train.iterations is not None else train.epochs * loader.batches_per_epoch
    schedule = build_schedule(config.schedule, config.optim, global_batch=config.global_batch(),
                              iterations_per_epoch=loader.batches_per_epoch, total_iterations=total)  # fmt: skip
    run_dir = Path(train.output_dir) / train.run_name
    mixer = BatchMixer(config.loss, num_classes=config.model.num_classes, seed=train.seed, rank=launch.rank)
    ema = build_weight_average(stepper.model, config.ema)
    run = Run(config, launch, run_dir, device, stepper, loader, val_batches, schedule, total, mixer, ema)
    run.peak_flops = peak_flops(device, train.precision)
    if run.peak_flops is not None:
        run.flops_per_image = functools.partial(training_flops_per_image, config)
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


def describe(run: Run) -> None:
    config, launch, split = run.config, run.launch, run.config.train.accumulation
    where = config.dist.strategy if launch.distributed else "one process"
    per_rank = config.global_batch() // launch.world_size // split
    log.info(f"{config.model.name}, {where}: global batch {config.global_batch()} ({per_rank} per rank x "
             f"{launch.world_size} ranks x {split} accumulation), {run.total_iterations} iterations "
             f"({run.loader.batches_per_epoch} per epoch), run directory {run.run_dir}")  # fmt: skip


def train_iterations(run: Run, state: TrainState, checkpoints: CheckpointManager, metrics: MetricsProcessor,
                     signals: StopSignals) -> EvalResult | None:  # fmt: skip
    """Steps to the last iteration; returns the last evaluation. A checkpoint is written before the evaluation of
    the same iteration, so a failed evaluation loses no training; a run resumed from it makes that evaluation first."""
    result = evaluate_and_log(run, state, metrics) if run.evaluation_due(state.iteration) else None
    flags, first_epoch = LateFlags(), state.iteration // run.loader.batches_per_epoch
    run.stepper.wrapped.train()
    clock = (time.monotonic(), state.seconds)
    while state.iteration < run.total_iterations:
        epoch, start = divmod(state.iteration, run.loader.batches_per_epoch)
        for images, labels in metrics.timed(run.loader.epoch(epoch, start)):
            lr = run.set_lr(state)
            images, labels = run.to_device(images, labels)
            images, targets, labels = run.mixer(images, labels, state.iteration)
            stop = signals.received is not None
            step = run.stepper.step(images, targets, stop=stop, grad_norm=metrics.should_log(state.iteration + 1))
            state.iteration += 1
            if run.ema is not None:
                run.ema.update(state.iteration)
            metrics.record(state.iteration, step, images, labels)
            state.seconds = clock[1] + time.monotonic() - clock[0]
            logging, saving, evaluating = (metrics.should_log(state.iteration), checkpoints.due(state.iteration),
                                           run.evaluation_due(state.iteration))  # fmt: skip
            stop = check_flags(run, state, flags.read(state.iteration, step, now=logging or saving or evaluating))
            if logging:
                counts = {"skipped_steps": state.skipped_steps, "scaler_skipped_steps": state.scaler_skipped_steps}
                data_wait = metrics.flush(state.iteration, lr=lr, last_step=step, counts=counts,
                                          history=state.history, scaler=run.stepper.scaler)  # fmt: skip
                restart = run.grow_loader(data_wait, state.iteration)
            if saving or stop:
                checkpoints.save(state, metrics)
            if stop:
                stopped = Interrupted if signals.interrupted else Preempted
                raise stopped(f"stopped by {signals.name} at iteration {state.iteration} of {run.total_iterations}; "
                              f"checkpoint written; the same command again resumes from it")  # fmt: skip
            if evaluating:
                result = evaluate_and_log(run, state, metrics)
            if state.iteration == run.total_iterations:
                break
            if logging and restart:
                metrics.loader_workers = run.tuner.count
                break
        if epoch == first_epoch:
            metrics.log_memory()
    return result


def check_flags(run: Run, state: TrainState, read: list[tuple[int, dict[str, float]]]) -> bool:
    """Count the skipped steps among the flags ``read`` and stop at a non-finite loss unless train.skip_nonfinite
    (its update was cancelled); whether a rank received a stop signal."""
    stop = False
    for iteration, flags in read:
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


def evaluate_and_log(run: Run, state: TrainState, metrics: MetricsProcessor) -> EvalResult:
    """This iteration's evaluation, into the history the schedule reads and into the logs, each once (a checkpoint
    of an earlier version of this code holds it already; a start before this one may have logged it)."""
    results = evaluate_weights(run, run.val_batches)
    first = next(iter(results.values()))
    if not state.history.val_errors or state.history.val_errors[-1][0] != state.iteration:
        state.history.val_errors.append((state.iteration, 1 - first.top1))
    for weights, result in results.items():
        metrics.log_eval(state.iteration, run.config.eval.protocol, result, weights=weights, seconds=state.seconds)
    return result


def evaluate_weights(run: Run, batches: Any) -> dict[str, EvalResult]:
    """The evaluation of each set of weights eval.weights names ("raw", "ema"), in that order."""
    chosen = {"raw": ["raw"], "ema": ["ema"], "both": ["raw", "ema"]}[run.config.eval.weights]
    results = {}
    for weights in chosen:
        if weights == "ema":
            run.ema.average_statistics_over_ranks()
            with run.ema.applied():
                results[weights] = run_evaluation(run, batches)
        else:
            results[weights] = run_evaluation(run, batches)
    return results


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


def final_evaluation(run: Run, state: TrainState, metrics: MetricsProcessor, last: EvalResult) -> EvalResult:
    """``eval.final_protocol`` at the last iteration (the loop's last evaluation when it is the same protocol), and
    the run's hyperparameters with its result, for TensorBoard's HParams view."""
    config, result = run.config, last
    if config.eval.final_protocol != config.eval.protocol:
        batches = build_eval_batches(config, run.launch, config.eval.final_protocol, run.device)
        for weights, result in evaluate_weights(run, batches).items():
            metrics.log_eval(
                state.iteration, config.eval.final_protocol, result, weights=weights, seconds=state.seconds
            )
    final = {"top1": result.top1, "top5": result.top5, "top1_error": 1 - result.top1}
    metrics.run_log.hparams(state.iteration, to_dict(config), {f"hparams/{k}": v for k, v in final.items()})
    return result
