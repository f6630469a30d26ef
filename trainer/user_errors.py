"""A user error (``UserError``: a bad config, a missing file) said in one line without a traceback, by the ranks
that should say it, and the exit code for it. Light to import: every `residual` command's error path comes here."""

from __future__ import annotations

import sys

from trainer.distributed import LaunchEnv, joined_group


def reports_user_errors(launch: LaunchEnv) -> bool:
    """Whether this rank prints a UserError. Before the process group, errors come from the arguments, the config
    and the files every rank of a host reads alike: one rank per host says it. Later, the rank that met it does."""
    return launch.local_rank == 0 or joined_group()


USER_ERROR_EXIT_CODE = 2


def report_user_error(error: Exception, launch: LaunchEnv) -> int:
    """Say a UserError in one line, without a traceback, on the ranks ``reports_user_errors`` picks; the process's
    exit code for it."""
    if reports_user_errors(launch):
        print(f"residual: error: {error}", file=sys.stderr)
    return USER_ERROR_EXIT_CODE
