"""Checkpoints: one file per save in ``RUN_DIR/checkpoints``, written atomically, the last k kept.

A checkpoint is a plain dict of tensors and Python containers, read back with ``weights_only=True``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from data_pipeline.errors import UserError

CHECKPOINT_PATTERN = re.compile(r"^ckpt-(\d+)\.pt$")


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a ``.tmp`` left by a crash mid-write is not one)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(path.name))]
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(run_dir: Path, iteration: int, state: dict[str, Any], *, keep: int) -> Path:
    """Write to a temporary name, flush to disk, rename: a crash mid-write leaves the previous checkpoint whole."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ckpt-{iteration:09d}.pt"
    partial = path.with_name(path.name + ".tmp")
    with open(partial, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a truncated or foreign file
        raise UserError(f"checkpoint {str(path)!r} cannot be read: {str(error).splitlines()[0]}") from None
