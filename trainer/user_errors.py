"""Where every error becomes one line: the entry points (`residual`'s commands, ``trainer.entry``, which torchrun,
SLURM tasks and sweep trials start) hand what escaped them to ``report_error``, which says it without a traceback,
on the ranks that should say it, and returns the documented exit code:

- 2: a user error (``UserError``: a bad config, a missing or damaged file), said where it was found;
- 74 (EX_IOERR): the system refused a file or folder (read-only, full, missing, no permission), said with its path;
- 1: a loader process killed, memory exhausted, or a bug: a traceback no user should read goes to a file, and the
  line names it.

A stopped training (``TrainingStopped``) is said by ``trainer.entry`` itself. Light to import: every `residual`
command's error path comes here."""

from __future__ import annotations

import errno
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

from data_pipeline.errors import UserError
from trainer.machine.distributed import LaunchEnv, joined_group

USER_ERROR_EXIT_CODE = 2
SYSTEM_ERROR_EXIT_CODE = 74  # EX_IOERR
FAILED_EXIT_CODE = 1

WHAT_TO_DO = {  # by errno: the way out of a refused file or folder
    errno.ENOSPC: "free space on that disk, or write elsewhere (train.output_dir)",
    errno.EDQUOT: "free space within the quota, or write elsewhere (train.output_dir)",
    errno.EROFS: "the file system is read-only: write elsewhere (train.output_dir, --report, OUT)",
    errno.EACCES: "no permission: make it accessible to this user, or use another path",
    errno.EPERM: "not permitted: make it accessible to this user, or use another path",
    errno.ENOENT: "it does not exist: check the path",
    errno.EIO: "the disk reported an I/O error: check the device (dmesg) or use another path",
}
LOADER_DIED = re.compile(r"DataLoader worker \(pids?\(?s?\)? ([\d, ]+)\)? (?:is killed by signal: (.+?)\.|exited)")


def reports_user_errors(launch: LaunchEnv) -> bool:
    """Whether this rank prints a UserError. Before the process group, errors come from the arguments, the config
    and the files every rank of a host reads alike: one rank per host says it. Later, the rank that met it does."""
    return launch.local_rank == 0 or joined_group()


def report_user_error(error: Exception, launch: LaunchEnv) -> int:
    """Say a UserError in one line, without a traceback, on the ranks ``reports_user_errors`` picks; the process's
    exit code for it."""
    if reports_user_errors(launch):
        print(f"residual: error: {error}", file=sys.stderr)
    return USER_ERROR_EXIT_CODE


def report_error(error: BaseException, launch: LaunchEnv, *, resume_hint: str = "") -> int:
    """Say any exception that escaped an entry point in one line (``resume_hint``: how a training goes on, where
    there is one); its exit code."""
    if isinstance(error, UserError):
        return report_user_error(error, launch)
    line, code = one_line(error)
    if reports_user_errors(launch):
        print(f"residual: error: {line}{resume_hint}", file=sys.stderr)
    return code


def one_line(error: BaseException) -> tuple[str, int]:
    """What went wrong and what to do, and the exit code, for an exception that is not a UserError."""
    if isinstance(error, OSError) and error.errno in WHAT_TO_DO:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}; {WHAT_TO_DO[error.errno]}", SYSTEM_ERROR_EXIT_CODE
    if died := LOADER_DIED.search(str(error)):
        pids, signal = died.group(1).strip(), died.group(2)
        how = f"was killed by signal {signal}" if signal else "exited unexpectedly"
        oom = " (SIGKILL: most often the kernel's out-of-memory killer, see dmesg)" if signal == "Killed" else ""
        return (
            f"a data loader process (pid {pids}) {how}{oom}; the run stopped in the middle of a step, which cannot "
            f"be trusted; fewer data.workers or a smaller data.batch_size need less memory",
            FAILED_EXIT_CODE,
        )
    if isinstance(error, MemoryError) or "out of memory" in str(error) or "can't allocate memory" in str(error):
        return (
            "out of memory; lower data.batch_size (train.accumulation keeps the global batch), or data.workers",
            FAILED_EXIT_CODE,
        )
    saved = save_traceback(error)
    return (
        f"an internal error ({type(error).__name__}: {first_line(error)}); the traceback is in {saved}: please "
        f"report it with that file",
        FAILED_EXIT_CODE,
    )


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else "no message")[:200]


def save_traceback(error: BaseException) -> Path | str:
    """The traceback of ``error`` in a file of its own (in $TMPDIR); where it is."""
    path = Path(tempfile.gettempdir()) / f"residual-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        path.write_text("".join(traceback.format_exception(error)))
    except OSError:
        return "no file (the temporary folder cannot be written either)"
    return path
