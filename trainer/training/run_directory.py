"""The run directory, as one run's own: a path that can be a folder, one training at a time in it (rank 0 holds a
lock for the run's lifetime), and the run's temporary files kept inside it."""

from __future__ import annotations

import fcntl
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import torch

from data_pipeline.errors import UserError
from trainer.config import TrainConfig
from trainer.machine.distributed import LaunchEnv, any_rank
from trainer.training.faults import TrainingStopped

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
MIN_FREE_BYTES = 1 << 20  # less than this at the start: not a disk a run can write its first logs to


class RunDirInUse(TrainingStopped):
    """On the other ranks of a run whose rank 0 found the directory held: rank 0 says why."""

    exit_code = 2


def check_run_dir(train: TrainConfig) -> None:
    """Refuse, before anything starts, a run directory that cannot be one: it, or a folder above it, is a file."""
    run_dir, run_name, output_dir = train.run_dir, train.run_name, train.output_dir
    for path in [run_dir, *run_dir.parents]:
        if path.exists() and not path.is_dir():
            key = f"train.run_name={run_name}" if path == run_dir else f"train.output_dir={output_dir}"
            raise UserError(f"{key}: {path} is a file, not a folder: the run directory would be {run_dir}")


@contextmanager
def run_directory(run_dir: Path, launch: LaunchEnv, device: torch.device) -> Iterator[None]:
    """The run directory as this run's for the block, its temporary files inside it (``use_run_tmpdir``).

    Rank 0 takes an exclusive lock on RUN_DIR/run.lock and writes who holds it; a second training on the same
    directory (a requeued job beside a manual restart, a command pasted twice) is refused on every rank, and rank 0
    names the holder. The kernel releases the lock when its process dies (kill -9, a node's SLURM requeue), so a
    dead run never blocks a restart. A file system without locks is warned about, not refused. At the block's end
    (a process that goes on, as a test does, may train again) the lock is let go, $TMPDIR given back, and folders
    made only to hold the lock (a run refused at start) removed."""
    made = next((path for path in reversed([run_dir, *run_dir.parents]) if not path.exists()), None)
    held, refusal = lock(run_dir) if launch.is_main else (None, None)
    try:
        if any_rank([refusal is not None], device)[0]:
            if refusal is not None:
                raise UserError(refusal)
            raise RunDirInUse("the run directory is in use by another training")
        previous = (os.environ.get("TMPDIR"), tempfile.tempdir)
        use_run_tmpdir(run_dir, launch)
        try:
            yield
        finally:
            if previous[0] is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = previous[0]
            tempfile.tempdir = previous[1]
    finally:
        if held is not None:
            held.close()
        if made is not None and {path.name for path in made.rglob("*") if path.is_file()} <= {LOCK_FILE}:
            shutil.rmtree(made, ignore_errors=True)  # only the lock (and empty temporary folders): nothing of a run


def lock(run_dir: Path) -> tuple[IO[str] | None, str | None]:
    """Take the lock: the open file that holds it (None where the file system has no locks), or why not."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if (free := shutil.disk_usage(run_dir).free) < MIN_FREE_BYTES:
        return None, (
            f"{run_dir}: its disk is full ({free // 1024} KiB free), and a run writes logs and checkpoints; free "
            f"space there, or choose another train.output_dir"
        )
    handle = open(run_dir / LOCK_FILE, "a+")  # noqa: SIM115 (open for the run's lifetime)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that has not yet said who it is"
        handle.close()
        return None, (
            f"{run_dir} is in use by another training ({holder}); stop that one first, or give this one "
            f"another train.run_name"
        )
    except OSError as error:
        log.warning(
            "%s: cannot lock (%s): nothing stops a second training from using this directory at the same time",
            run_dir / LOCK_FILE,
            error.strerror,
        )
        handle.close()
        return None, None
    job = f", SLURM job {os.environ['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in os.environ else ""
    handle.seek(0)
    handle.truncate()
    handle.write(f"host {platform.node()}, pid {os.getpid()}{job}, since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
    handle.flush()
    return handle, None


UNIX_SOCKET_ROOM = 75  # multiprocessing binds sockets at TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX; Linux allows 107


def use_run_tmpdir(run_dir: Path, launch: LaunchEnv) -> None:
    """This rank's temporary files (multiprocessing's pymp-*, those of DALI's workers) in RUN_DIR/tmp/rankN, emptied
    at each start: a run killed with -9 leaves them in its own folder, not in $TMPDIR. A run directory too deep for
    a socket path keeps $TMPDIR. For the whole process (``run_directory`` gives it back at the run's end)."""
    folder = run_dir.absolute() / "tmp" / f"rank{launch.rank}"
    if len(str(folder)) > UNIX_SOCKET_ROOM:
        log.info(
            "temporary files in %s (%s is too long a path for the sockets made there)", tempfile.gettempdir(), folder
        )
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.environ["TMPDIR"] = str(folder)  # for the processes this one starts
    tempfile.tempdir = str(folder)
