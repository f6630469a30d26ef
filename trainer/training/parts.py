"""The parts of one training run, built once from its plan (``build_run``), and the state the loop carries from
step to step and checkpoint to checkpoint (``TrainState``)."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_pipeline import UserError, build_train_loader, build_val_loader
from data_pipeline.datasets import check_folder_classes
from data_pipeline.datasets.folder_index import index_splits
from data_pipeline.loaders import TrainBatches
from data_pipeline.prepare.synthetic import ensure_synthetic
from trainer.config import Config
from trainer.machine.auto import LoaderTuner
from trainer.machine.distributed import LaunchEnv, barrier
from trainer.machine.throughput import peak_flops, training_flops_per_image
from trainer.recipe.ema import WeightAverage, build_weight_average
from trainer.recipe.mixing import BatchMixer
from trainer.recipe.parallel import is_sharded
from trainer.recipe.schedule import LRSchedule, MetricHistory, build_schedule
from trainer.training.cadence import Cadence
from trainer.training.plan import Plan
from trainer.training.step import Stepper, build_stepper

log = logging.getLogger(__name__)


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
    """The parts of one training run, built once from its plan."""

    plan: Plan  # every run-wide value, decided once (trainer.training.plan)
    launch: LaunchEnv
    device: torch.device
    stepper: Stepper  # the model, its parallel wrapper, the optimizer and the gradient scaler
    loader: TrainBatches
    val_batches: Any
    schedule: LRSchedule
    total_iterations: int
    mixer: BatchMixer  # Mixup/CutMix of each batch (loss section), or nothing
    cadence: Cadence  # what is due at each iteration: log, evaluation, checkpoint
    ema: WeightAverage | None = None  # the EMA of the weights (ema section)
    tuner: LoaderTuner | None = None  # data.workers (DALI: data.threads) auto: grown while the step waits for data
    peak_flops: float | None = None  # the GPUs' dense peak, for the model FLOP utilization
    flops_per_image: Callable[[int], float] | None = None  # training FLOPs of an epoch's images: 3 x forward

    @property
    def config(self) -> Config:
        return self.plan.config

    @property
    def run_dir(self) -> Path:
        return self.plan.run_dir

    @property
    def sharded(self) -> bool:
        return is_sharded(self.config.dist, self.launch.world_size)

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
        log.info(
            "data.%s %d -> %d at iteration %d: the step waited for data %.0f%% of the last window",
            key,
            getattr(self.config.data, key),
            count,
            iteration,
            100 * data_wait,
        )
        self.plan = self.plan.grown(key, count)
        self.loader = build_train_loader(
            self.config.data,
            rank=self.launch.rank,
            world_size=self.launch.world_size,
            seed=self.config.train.seed,
            device=self.device,
        )
        return True

    def to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memory_format = torch.channels_last if self.config.train.channels_last else torch.contiguous_format
        images = images.to(self.device, non_blocking=True, memory_format=memory_format)
        return images, labels.to(self.device, non_blocking=True)


def build_run(plan: Plan, launch: LaunchEnv, device: torch.device) -> Run:
    """The parts of the run ``plan`` describes, in its process group."""
    config = plan.config
    if launch.is_main and ensure_synthetic(config.data):
        log.info("wrote synthetic data to %s", config.data.root)
    check_folder_classes(config.data.root, config.data.format)
    if launch.is_main and config.data.format == "imagefolder" and config.data.index_dir is not None:
        started = time.perf_counter()
        done = index_splits(config.data.root, config.data.index_dir)
        log.info("data index: %s in %.1f s (%s)", "; ".join(done), time.perf_counter() - started, config.data.index_dir)
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
    train = config.train
    total = train.iterations if train.iterations is not None else train.epochs * loader.batches_per_epoch
    schedule = build_schedule(
        config.schedule, base_lr=plan.base_lr, iterations_per_epoch=loader.batches_per_epoch, total_iterations=total
    )
    stepper = build_stepper(config, launch, device, lr=plan.base_lr)
    mixer = BatchMixer(config.loss, num_classes=config.model.num_classes, seed=train.seed, rank=launch.rank)
    ema = build_weight_average(stepper.model, config.ema)
    cadence = Cadence.of(config, batches_per_epoch=loader.batches_per_epoch, total_iterations=total)
    run = Run(plan, launch, device, stepper, loader, val_batches, schedule, total, mixer, cadence, ema)
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
    config, launch, plan = run.config, run.launch, run.plan
    where = config.dist.strategy if launch.distributed else "one process"
    log.info(
        f"{config.model.name}, {where}: global batch {plan.global_batch} ({plan.micro_batch} per rank x "
        f"{launch.world_size} ranks x {config.train.accumulation} accumulation), {run.total_iterations} iterations "
        f"({run.loader.batches_per_epoch} per epoch), run directory {run.run_dir}"
    )
