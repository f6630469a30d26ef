"""What a training run's checkpoint holds, and which one a run resumes from (when one is due: the cadence)."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from data_pipeline.errors import UserError
from trainer.config import Config, to_dict
from trainer.machine.distributed import average_bn_buffers
from trainer.training.checkpoint.files import checkpoint_dir, latest_checkpoint, read_train_state
from trainer.training.checkpoint.state import load_model_and_optimizer, save_checkpoint

if TYPE_CHECKING:
    from trainer.training.parts import Run


log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, saved: dict[str, Any]) -> None: ...


class RngStates:
    """The CPU's random generators, which the data order and every crop draw from."""

    def state_dict(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state(), "python": random.getstate()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        torch.set_rng_state(saved["torch"])
        random.setstate(saved["python"])


class CheckpointManager:
    """What a training run's checkpoint holds, and which one a run resumes from.

    A checkpoint holds the model, the optimizer and the EMA of the weights if the run keeps one; beside them each of
    ``states`` under its name (the loop's: the train state, with the iteration that fixes the epoch and the batch
    within it, and so the data order and every crop, the skipped steps and the metrics history the schedule reads;
    the open metrics and warm-up windows), the gradient scaler and the RNG states; and the config, the classes
    (which `residual eval` and `export` carry on) and what a resume checks: the model's name and the batches per
    epoch (the data set and batch size).
    """

    def __init__(self, run: Run, states: dict[str, Stateful]) -> None:
        self.run = run  # its config as it stands at each save (a grown loader's data.workers)
        self.run_dir, self.launch, self.device = run.run_dir, run.launch, run.device
        self.model, self.optimizer, self.ema = run.stepper.model, run.stepper.optimizer, run.ema
        self.states = {**states, "scaler": run.stepper.scaler, "rng": RngStates()}
        self.batches_per_epoch, self.classes = run.loader.batches_per_epoch, run.loader.classes
        self.sharded = run.sharded

    @property
    def config(self) -> Config:
        return self.run.config

    def resume_source(self) -> Path | None:
        """``checkpoint.resume``: "auto" (the latest checkpoint if there is one), "latest" (it must exist), "never",
        or a checkpoint's path."""
        resume = self.config.checkpoint.resume
        if resume == "never":
            return None
        if resume in ("auto", "latest"):
            latest = latest_checkpoint(self.run_dir)
            if latest is None and resume == "latest":
                raise UserError(f"--resume: no checkpoint in {checkpoint_dir(self.run_dir)} to resume from")
            return latest
        return Path(resume)

    def resume(self) -> int:
        """Load the checkpoint ``resume_source`` names, if any, into this run; the iteration it was written at (0
        for none)."""
        source = self.resume_source()
        if source is None:
            return 0
        saved = read_train_state(source)
        name = self.config.model.name
        if saved.get("model_name") != name:
            raise UserError(f"{source}: a checkpoint of {saved.get('model_name')!r}, not of model.name={name!r}")
        if saved["batches_per_epoch"] != self.batches_per_epoch:
            raise UserError(
                f"{source}: saved with {saved['batches_per_epoch']} batches per epoch, this run has "
                f"{self.batches_per_epoch}: the data set or data.batch_size changed"
            )
        load_model_and_optimizer(source, saved, self.model, self.optimizer, name=name, ema=self.ema)
        for key, state in self.states.items():
            state.load_state_dict(saved.get(key, saved))  # checkpoints before 2026-12-06 hold the train state's
            # fields at their top level
        log.info("resumed from %s at iteration %d", source, saved["iteration"])
        return saved["iteration"]

    def save(self, iteration: int) -> Path:
        """The checkpoint of ``iteration``. Called on every rank (BN statistics are averaged and the metrics window
        summed over the ranks first)."""
        average_bn_buffers(self.model)
        extra = {
            "iteration": iteration,
            "epoch": iteration // self.batches_per_epoch,  # with the iteration: the data position
            "model_name": self.config.model.name,
            "strategy": self.config.dist.strategy,
            "world_size": self.launch.world_size,
            "batches_per_epoch": self.batches_per_epoch,
            "classes": self.classes,
            "config": to_dict(self.config),
        }
        return save_checkpoint(
            self.run_dir,
            iteration,
            self.model,
            self.optimizer,
            {key: state.state_dict() for key, state in self.states.items()} | extra,
            ema=self.ema,
            sharded=self.sharded,
            keep=self.config.checkpoint.keep,
            is_main=self.launch.is_main,
            device=self.device,
        )
