"""The one entry point of a training command: ``run(CONFIG, overrides)`` in this process, whatever started it.
`residual train`, ``python -m trainer`` (what torchrun and Ray trials start) and SLURM tasks all call it, and get
its exit code; it prints user errors in one line. Code that trains in its own process (``residual bench``) calls
``trainer.training.loop.train``, the run itself, directly."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from trainer.config import Config, load_config
from trainer.machine.distributed import LaunchEnv, destroy_process_group
from trainer.reports.comparison import published_line
from trainer.training.checkpoint.files import latest_checkpoint
from trainer.training.faults import INTERRUPT_EXIT_CODE, PREEMPTION_SIGNALS, StopSignals, TrainingStopped
from trainer.training.loop import train
from trainer.training.run_directory import check_run_dir
from trainer.user_errors import report_error


def run(config_path: str, overrides: Sequence[str] = ()) -> int:
    """Train (or resume) the run CONFIG with ``key=value`` overrides describes, as one rank of it.

    0 after the final evaluation, which rank 0 prints with where the TensorBoard logs are; a stopped run's code
    (75 after a stop signal, on which the cluster layer requeues; 130 after Ctrl-C; 74 when a checkpoint could not
    be written; 1 for a loss that is not finite); 2 for a mistake in the config or the data, or a run directory
    another training holds, said in one line once per host."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    launch, config = LaunchEnv.from_environ(), None
    try:
        # a preemption signal while the run is built (the data listed, the model made) stops its first step;
        # Ctrl-C there stops at once (KeyboardInterrupt, below)
        with StopSignals(PREEMPTION_SIGNALS) as started:
            config = load_config(config_path, list(overrides), world_size=launch.world_size)
            check_run_dir(config.train)
            logging.getLogger().setLevel(logging.INFO if launch.is_main else logging.WARNING)
            result, run_log = train(config, launch, started)
    except TrainingStopped as stopped:
        if launch.is_main:
            print(f"residual: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:  # before the training loop, or in the final evaluation: no step to finish
        if launch.is_main:
            print(
                "residual: interrupted (Ctrl-C) before training or in the final evaluation; the checkpoints are "
                "kept; the same command again resumes",
                file=sys.stderr,
            )
        return INTERRUPT_EXIT_CODE
    except Exception as error:  # noqa: BLE001 (every other failure, a UserError included, said in one line)
        return report_error(error, launch, resume_hint=resume_hint(config))
    finally:
        destroy_process_group()
    if launch.is_main:
        protocol = config.eval.final_protocol
        print(
            f"{config.model.name}: top-1 {100 * result.top1:.2f}%  top-5 {100 * result.top5:.2f}%  "
            f"({protocol}, {result.count} validation images; chance {100 / config.model.num_classes:.1f}%)"
        )
        print(published_line(run_log.dataset, config.model.name, config.model.shortcut, protocol))
        print(f"TensorBoard logs: {run_log.tensorboard_dir}  (tensorboard --logdir {run_log.tensorboard_dir})")
    return 0


def resume_hint(config: Config | None) -> str:
    """How a training that failed goes on: from its last checkpoint, if it has one."""
    try:
        latest = config and latest_checkpoint(config.train.run_dir)
    except OSError:  # the run directory itself is what failed
        return ""
    return f"; the same command resumes from {latest}" if latest else ""
