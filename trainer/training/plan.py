"""The run's plan: every run-wide value decided once, from the config, the launch and this machine (``resolve``),
and passed down. The builders take it; nothing decides these values again. The one change a running plan sees is a
grown loader (``grown``), which the checkpoints and the log then record."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from trainer.config import Config
from trainer.machine.auto import LoaderTuner, resolve_auto
from trainer.machine.distributed import LaunchEnv
from trainer.recipe.schedule import scaled_lr


@dataclass(frozen=True)
class Plan:
    config: Config  # auto settings decided, the index folder set: what the run trains with, as config.yaml records
    choices: tuple[str, ...]  # one line per choice made for this machine, and why
    run_dir: Path
    global_batch: int  # images per update over all ranks (data.batch_size)
    per_rank_batch: int  # what each rank's loader gives a step
    micro_batch: int  # what each forward sees: per_rank_batch / train.accumulation
    base_lr: float  # optim.lr, scaled by global_batch / optim.base_batch under the linear scaling rule

    def grown(self, key: str, count: int) -> Plan:
        """The plan with the loader's processes (``workers``) or DALI's threads (``threads``) at ``count``."""
        return replace(self, config=replace(self.config, data=replace(self.config.data, **{key: count})))


def resolve(config: Config, launch: LaunchEnv, device: torch.device) -> tuple[Plan, LoaderTuner]:
    """The plan of this rank's run (torch's thread count set on the way), and the tuner of the loader's automatic
    count. The checks across keys and ranks were made when the config was loaded (trainer.config.validate_launch)."""
    config, choices, tuner = resolve_auto(config, launch, device)
    run_dir = config.train.run_dir
    if config.data.index_dir is None:  # an image folder is listed once, into the run directory
        config = replace(config, data=replace(config.data, index_dir=str(run_dir / "index")))
    per_rank = config.data.batch_size // launch.world_size
    plan = Plan(
        config=config,
        choices=tuple(choices),
        run_dir=run_dir,
        global_batch=config.data.batch_size,
        per_rank_batch=per_rank,
        micro_batch=per_rank // config.train.accumulation,
        base_lr=scaled_lr(config.optim, config.data.batch_size),
    )
    return plan, tuner
