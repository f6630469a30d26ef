"""Checkpoints: one file per save in ``RUN_DIR/checkpoints``, written atomically, the last k kept.

A checkpoint is a plain dict of tensors and Python containers, read back with ``weights_only=True``; for
evaluation, ``read_weights`` also takes FSDP2's DCP directories and plain state dicts (torchvision's files).
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


@dataclass
class Weights:
    """A model's weights with what is known of it: a training checkpoint carries its model and run config and the
    class names it was trained on; a plain state dict (``residual export``, torchvision's files) carries none."""

    state_dict: dict[str, torch.Tensor]
    model_name: str | None = None
    config: dict[str, Any] | None = None
    classes: list[str] | None = None


def read_weights(path: Path) -> Weights:
    """A training checkpoint file, a DCP checkpoint directory (FSDP2), or a plain state dict file."""
    checkpoint = _read_dcp(path) if path.is_dir() else load_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path}: neither a checkpoint nor a state dict")
    if "model" in checkpoint and isinstance(checkpoint["model"], dict):
        return Weights(
            checkpoint["model"], checkpoint.get("model_name"), checkpoint.get("config"), checkpoint.get("classes")
        )
    if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        return Weights(checkpoint)
    raise UserError(f"{path}: neither a checkpoint nor a state dict")


def _read_dcp(path: Path) -> dict[str, Any]:
    """A torch.distributed.checkpoint directory read whole into one process, through a temporary torch.save file."""
    if not (path / ".metadata").is_file():
        raise UserError(f"{path}: a directory without .metadata is not a torch.distributed.checkpoint checkpoint")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        converted = Path(scratch) / "checkpoint.pt"
        dcp_to_torch_save(path, converted)
        return load_checkpoint(converted)


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: Path, name: str) -> None:
    """``load_state_dict(strict=True)`` with a short message naming what does not fit."""
    expected, given = set(model.state_dict()), set(state_dict)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        parts = [
            f"{len(keys)} {kind} keys ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
            for kind, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise UserError(f"{source}: does not fit {name}: {'; '.join(parts)}")
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:  # a size mismatch: another width, depth or class count
        raise UserError(f"{source}: does not fit {name}: {str(error).splitlines()[1].strip()}") from None


def export_state_dict(source: Path, out: Path) -> str:
    """Write the model weights of a checkpoint (file or DCP directory) as a plain state dict, the format of
    torchvision's ``resnet*`` files; returns the model's name. Written atomically, like a checkpoint."""
    weights = read_weights(source)
    if weights.model_name is None:
        raise UserError(f"{source}: already a plain state dict; nothing to export")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".tmp")
    torch.save(weights.state_dict, partial)
    os.replace(partial, out)
    return weights.model_name
