"""The one training entry point: ``run(CONFIG, overrides)`` in this process, whatever started it. `residual train`,
``python -m trainer`` (what torchrun and Ray trials start) and SLURM tasks all call it, and get its exit code."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from data_pipeline.errors import UserError
from trainer.comparison import published_line
from trainer.config import load_config
from trainer.distributed import LaunchEnv, destroy_process_group, report_user_error
from trainer.faults import TrainingStopped
from trainer.loop import train

log = logging.getLogger(__name__)


def run(config_path: str, overrides: Sequence[str] = ()) -> int:
    """Train (or resume) the run CONFIG with ``key=value`` overrides describes, as one rank of it.

    0 after the final evaluation, which rank 0 prints with where the TensorBoard logs are; a stopped run's code
    (75 after a stop signal, on which the cluster layer requeues; 74 when a checkpoint could not be written; 1 for
    a loss that is not finite); 2 for a mistake in the config or the data, said in one line once per host."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    launch = LaunchEnv.from_environ()
    try:
        config = load_config(config_path, list(overrides), world_size=launch.world_size)
        use_run_tmpdir(Path(config.train.output_dir) / config.train.run_name, launch)
        logging.getLogger().setLevel(logging.INFO if launch.is_main else logging.WARNING)
        result, run_log = train(config, launch)
    except TrainingStopped as stopped:
        if launch.is_main:
            print(f"residual: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except UserError as error:
        return report_user_error(error, launch)
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


UNIX_SOCKET_ROOM = 75  # multiprocessing binds sockets at TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX; Linux allows 107


def use_run_tmpdir(run_dir: Path, launch: LaunchEnv) -> None:
    """This rank's temporary files (multiprocessing's pymp-*, those of DALI's workers) in RUN_DIR/tmp/rankN, emptied
    at each start: a run killed with -9 leaves them in its own folder, not in $TMPDIR. A run directory too deep for
    a socket path keeps $TMPDIR. For the whole process: ``run`` calls it first."""
    folder = run_dir.absolute() / "tmp" / f"rank{launch.rank}"
    if len(str(folder)) > UNIX_SOCKET_ROOM:
        log.info("temporary files in %s (%s is too long a path for the sockets made there)", tempfile.gettempdir(),
                 folder)  # fmt: skip
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.environ["TMPDIR"] = str(folder)  # for the processes this one starts
    tempfile.tempdir = str(folder)
