"""The training run as its algorithm: build the parts from the config, resume if a checkpoint is found, then for
each batch set the lr, step, record the metrics, and at their points log, checkpoint, evaluate, stop; end with the
final evaluation. The parts: ``Stepper`` (trainer.training.step) makes the update, ``MetricsProcessor``
(trainer.training.metrics) measures and logs, ``CheckpointManager`` (trainer.training.checkpoint) decides what a
checkpoint holds and when one is written.

A resumed run continues bit for bit: a checkpoint holds weights and BN statistics, optimizer momentum, the
iteration (which fixes the epoch and the batch within it, and so the data order and every crop), the metrics
history the schedule reads, the open logging and warm-up windows and the RNG states.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import torch

from data_pipeline import UserError
from data_pipeline.datasets import open_dataset
from data_pipeline.published import identify, title
from trainer.config import Config, to_dict, to_yaml
from trainer.eval.counts import EvalResult
from trainer.eval.evaluate import evaluate
from trainer.machine.distributed import LaunchEnv, average_bn_buffers, init_process_group, pick_device
from trainer.machine.environment import environment, format_environment
from trainer.training.checkpoint.files import latest_checkpoint
from trainer.training.checkpoint.manager import CheckpointManager
from trainer.training.faults import Interrupted, NonFiniteLoss, Preempted, StopSignals
from trainer.training.metrics import MetricsProcessor, TrainWindow
from trainer.training.parts import Run, TrainState, build_eval_batches, build_run, describe
from trainer.training.plan import resolve
from trainer.training.run_directory import run_directory
from trainer.training.run_log import RunLog
from trainer.training.step import LateFlags, StepOutcome

log = logging.getLogger(__name__)


def train(config: Config, launch: LaunchEnv, started: StopSignals | None = None) -> tuple[EvalResult, RunLog]:
    """Train to the run's last iteration (resuming when a checkpoint is found) and end with the final evaluation
    (``eval.final_protocol``); a run that had finished is evaluated again. ``started``: the signals recorded since
    the command started (a preemption while the data was listed stops the first step)."""
    device = pick_device(config.train.device, launch)
    init_process_group(launch, device)
    # before anything is written or logged: refused if another run has it
    with run_directory(config.train.run_dir, launch, device):
        return train_in(config, launch, device, started)


def train_in(
    config: Config, launch: LaunchEnv, device: torch.device, started: StopSignals | None = None
) -> tuple[EvalResult, RunLog]:
    facts = environment(launch) if launch.is_main else {}
    if launch.is_main:
        log.info("this machine:\n%s", format_environment(facts))
    plan, tuner = resolve(config, launch, device)
    config = plan.config
    for line in plan.choices:
        log.info("%s", line)
    run = build_run(plan, launch, device)
    run.tuner = tuner
    state, window = TrainState(), TrainWindow(device, is_main=launch.is_main)
    warmup = TrainWindow(device, is_main=launch.is_main)  # Sec. 4.2's training error, on its own windows
    checkpoints = CheckpointManager(run, {"train": state, "window": window, "warmup_window": warmup})
    if checkpoints.resume() > run.total_iterations:
        raise UserError(
            f"train.iterations={run.total_iterations}: the run's checkpoint is at iteration {state.iteration}, past "
            f"it; train on with more iterations, or evaluate it with `residual eval {latest_checkpoint(run.run_dir)}`"
        )
    run_log = RunLog(run.run_dir, start_iteration=state.iteration, enabled=launch.is_main)
    dataset = identify(config.data, run.loader.classes)
    log.info("data set: %s (%s)", title(dataset), config.data.root)
    run_log.record_run(to_yaml(config), facts, list(plan.choices), dataset)
    metrics = MetricsProcessor(
        run_log,
        window,
        launch=launch,
        device=device,
        progress=config.log.progress,
        images_per_step=plan.global_batch,
        iterations=(state.iteration, run.total_iterations),
        iterations_per_epoch=run.loader.batches_per_epoch,
        flops=(run.peak_flops, run.flops_per_image),
        data_stats=(config.data.mean, config.data.std),
        classes=run.loader.classes if logs_per_class(config, run.loader.classes) else None,
    )
    metrics.loader_workers = tuner.count
    describe(run)
    try:
        with StopSignals(before=started) as signals:
            last = train_iterations(run, state, checkpoints, metrics, signals, warmup)
        result = final_evaluation(run, state, metrics, last)
    finally:
        metrics.close()
        run_log.close()
    return result, run_log


def train_iterations(
    run: Run,
    state: TrainState,
    checkpoints: CheckpointManager,
    metrics: MetricsProcessor,
    signals: StopSignals,
    warmup: TrainWindow,
) -> EvalResult | None:
    """Steps to the last iteration; returns the last evaluation. A checkpoint is written before the evaluation of
    the same iteration, so a failed evaluation loses no training; a run resumed from it makes that evaluation first."""
    result = evaluate_and_log(run, state, metrics) if run.cadence.at(state.iteration).evaluate else None
    flags, first_epoch = LateFlags(), state.iteration // run.loader.batches_per_epoch
    run.stepper.wrapped.train()
    started, seconds_before = time.monotonic(), state.seconds  # the wall-clock of this start, and of those before
    while state.iteration < run.total_iterations:
        epoch, start = divmod(state.iteration, run.loader.batches_per_epoch)
        for images, labels in metrics.timed(run.loader.epoch(epoch, start)):
            lr = run.set_lr(state)
            awaits_train_error = run.schedule.awaits_train_error(state.iteration, state.history)
            images, labels = run.to_device(images, labels)
            images, targets, labels = run.mixer(images, labels, state.iteration)
            signalled = signals.received is not None  # this rank: raised in the step's flags, read by all a step late
            step = run.stepper.step(images, targets, stop=signalled, grad_norm=run.cadence.at(state.iteration + 1).log)
            state.iteration += 1
            if run.ema is not None:
                run.ema.update(state.iteration)
            metrics.record(state.iteration, step, images, labels)
            if awaits_train_error:
                measure_warmup(run, state, warmup, step, labels)
            state.seconds = seconds_before + time.monotonic() - started
            due = run.cadence.at(state.iteration)
            # reading the flags waits for the device: now only where the host acts on them (a log, a checkpoint, an
            # evaluation), elsewhere a step late, when they are ready (the late flags' point)
            read = flags.read(state.iteration, step, now=any(due))
            all_stop = check_flags(run, state, read)  # some rank was signalled: every rank stops at this step
            if due.log:
                counts = {"skipped_steps": state.skipped_steps, "scaler_skipped_steps": state.scaler_skipped_steps}
                data_wait = metrics.flush(
                    state.iteration,
                    lr=lr,
                    last_step=step,
                    counts=counts,
                    scaler=run.stepper.scaler,
                )
                restart = run.grow_loader(data_wait, state.iteration)
            if due.checkpoint or all_stop:
                checkpoints.save(state.iteration)
            if all_stop:
                stopped = Interrupted if signals.interrupted else Preempted
                raise stopped(
                    f"stopped by {signals.name} at iteration {state.iteration} of {run.total_iterations}; "
                    f"checkpoint written; the same command again resumes from it"
                )
            if due.evaluate:
                result = evaluate_and_log(run, state, metrics)
            if state.iteration == run.total_iterations:
                break
            if due.log and restart:
                metrics.loader_workers = run.tuner.count
                break
        if epoch == first_epoch:
            metrics.log_memory()
    return result


def measure_warmup(run: Run, state: TrainState, window: TrainWindow, step: StepOutcome, labels: torch.Tensor) -> None:
    """Sec. 4.2: while the warm-up waits for the training error, each step's hits go into a window of its own, read
    every ``schedule.warmup_check_every`` iterations (a host sync, during the warm-up only) into the history the
    schedule reads. Its own, not the log's: a logging setting never changes the lr."""
    window.add(step, labels)
    if state.iteration % run.schedule.shape.warmup_check_every == 0:
        sums = window.take()
        if sums["count"]:  # not every step skipped (train.skip_nonfinite)
            state.history.train_errors.append((state.iteration, 1 - sums["correct1"] / sums["count"]))


def check_flags(run: Run, state: TrainState, read: list[tuple[int, dict[str, float]]]) -> bool:
    """Count the skipped steps among the flags ``read`` and stop at a non-finite loss unless train.skip_nonfinite
    (its update was cancelled); whether some rank was signalled to stop."""
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


def logs_per_class(config: Config, classes: list[str]) -> bool:
    """``log.per_class``: as set, else on for up to 100 classes (1,000 scalars an evaluation is not a dashboard)."""
    return config.log.per_class if config.log.per_class is not None else len(classes) <= 100


def evaluate_and_log(run: Run, state: TrainState, metrics: MetricsProcessor) -> EvalResult:
    """The loop's evaluation (``eval.protocol``). Its error goes into the history the schedule reads once per
    iteration (a checkpoint of an earlier version of this code holds it already; a start before this one may have
    logged it): the raw weights' where they are evaluated, as they are the weights that train."""
    last = state.iteration == run.total_iterations  # the final evaluation's records, for its report
    keep = run.config.eval.report and last and run.config.eval.final_protocol == run.config.eval.protocol
    results = evaluate_weights(run, run.val_batches, run.config.eval.protocol, state, metrics, predictions=keep)
    trained = results.get("raw", results.get("ema"))
    if not state.history.val_errors or state.history.val_errors[-1][0] != state.iteration:
        state.history.val_errors.append((state.iteration, 1 - trained.top1))
    return reported(results)


def evaluate_weights(
    run: Run, batches: Any, protocol: str, state: TrainState, metrics: MetricsProcessor, predictions: bool = False
) -> dict[str, EvalResult]:
    """The evaluation of each set of weights eval.weights names ("raw", "ema", in that order), each logged. The BN
    statistics are averaged over the ranks first (each rank's follow its own batches); the EMA's as well."""
    chosen = {"raw": ["raw"], "ema": ["ema"], "both": ["raw", "ema"]}[run.config.eval.weights]
    results = {}
    for weights in chosen:
        if weights == "ema":
            run.ema.average_statistics_over_ranks()
        with run.ema.applied() if weights == "ema" else contextlib.nullcontext():
            average_bn_buffers(run.stepper.model)
            results[weights] = evaluate(
                run.stepper.wrapped,
                batches,
                num_classes=run.config.model.num_classes,
                device=run.device,
                precision=run.config.train.precision,
                channels_last=run.config.train.channels_last,
                sharded=run.sharded,
                predictions=predictions,
            )
        metrics.log_eval(state.iteration, protocol, results[weights], weights=weights, seconds=state.seconds)
    return results


def reported(results: dict[str, EvalResult]) -> EvalResult:
    """The run's result: the EMA's where it is evaluated (the weights a recipe with an EMA is for), else the raw
    weights'."""
    return results.get("ema", results.get("raw"))


def final_evaluation(run: Run, state: TrainState, metrics: MetricsProcessor, last: EvalResult) -> EvalResult:
    """``eval.final_protocol`` at the last iteration (the loop's last evaluation when it is the same protocol), and
    the run's hyperparameters with its result, for TensorBoard's HParams view."""
    config, result = run.config, last
    if config.eval.final_protocol != config.eval.protocol:
        batches = build_eval_batches(config, run.launch, config.eval.final_protocol, run.device)
        evaluated = evaluate_weights(run, batches, config.eval.final_protocol, state, metrics, config.eval.report)
        result = reported(evaluated)
    if config.eval.report and run.launch.is_main:
        log.info("evaluation report: %s", write_run_report(run, state, result))
    final = {"top1": result.top1, "top5": result.top5, "top1_error": 1 - result.top1}
    metrics.run_log.hparams(state.iteration, to_dict(config), {f"hparams/{k}": v for k, v in final.items()})
    return result


def write_run_report(run: Run, state: TrainState, result: EvalResult) -> Path:
    """``eval.report``: the final evaluation's report in RUN_DIR/eval-report (trainer.eval.eval_report)."""
    from trainer.eval.eval_report import Evaluated, write_eval_report

    config = run.config
    dataset = open_dataset(config.data.root, config.data.format, train=False, index_dir=config.data.index_dir)
    evaluated = Evaluated.of(
        result,
        dataset,
        model=config.model.name,
        checkpoint=latest_checkpoint(run.run_dir),
        iteration=state.iteration,
        weights="raw" if config.eval.weights == "raw" else "ema",
        data_set=f"{title(identify(config.data, run.loader.classes))} ({config.data.root})",
        protocol=config.eval.final_protocol,
        precision=config.train.precision,
    )
    return write_eval_report(run.run_dir / "eval-report", evaluated)
