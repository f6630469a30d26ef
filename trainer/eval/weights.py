"""The weights ``residual eval`` and ``residual export`` read: a training checkpoint (file or FSDP2 DCP directory,
its trained weights or their EMA), an exported state dict, or torchvision's ``resnet*`` files; and the export of a
checkpoint's weights as a plain state dict with what evaluation needs beside them."""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_pipeline.errors import UserError
from trainer.training.checkpoint.files import load_checkpoint, read_dcp, remove, write_file
from trainer.training.faults import first_nonfinite

# ``residual export`` writes what evaluation needs besides the weights (the model section, the class names, the
# data section's preprocessing) into the state dict's own ``_metadata``, where load_state_dict looks only for
# module prefixes: torchvision's models load the file unchanged, and `residual eval` reads it back.
EXPORT_METADATA = "residual"
PREPROCESSING = ("mean", "std", "val_resize", "crop_size", "val_crop")


@dataclass
class Weights:
    """A model's weights with what is known of it: a training checkpoint carries its model and run config and the
    class names it was trained on; an exported state dict carries the model section, the class names and the
    preprocessing (as ``config``'s model and data sections); torchvision's files carry none."""

    state_dict: dict[str, torch.Tensor]
    model_name: str | None = None
    config: dict[str, Any] | None = None
    classes: list[str] | None = None
    plain: bool = False  # a state dict, not a training checkpoint
    iteration: int | None = None  # a training checkpoint's


def read_weights(path: Path, which: str = "raw") -> Weights:
    """A training checkpoint file, a DCP checkpoint directory (FSDP2), or a plain state dict file; of a training
    checkpoint, its trained weights (``which="raw"``) or their EMA (``"ema"``)."""
    checkpoint = read_dcp(path) if path.is_dir() else load_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path}: neither a checkpoint nor a state dict")
    if "model" in checkpoint and isinstance(checkpoint["model"], dict):
        state = checkpoint["model"]
        if which == "ema":
            if "ema" not in checkpoint:
                raise UserError(f"{path}: holds no EMA of the weights (the run had no ema.decay); use --weights raw")
            state = {**state, **checkpoint["ema"]}
        named = (checkpoint.get("model_name"), checkpoint.get("config"), checkpoint.get("classes"))
        return Weights(state, *named, iteration=checkpoint.get("iteration"))
    if which == "ema":
        raise UserError(f"{path}: a plain state dict holds one set of weights; --weights ema needs a checkpoint")
    if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        exported = getattr(checkpoint, "_metadata", {}).get(EXPORT_METADATA)
        if exported is None:
            return Weights(checkpoint, plain=True)
        config = {"model": exported["model"], "data": exported["data"]}
        return Weights(checkpoint, exported["model"]["name"], config, exported["classes"], plain=True)
    raise UserError(f"{path}: neither a checkpoint nor a state dict")


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


def export_state_dict(source: Path, out: Path, which: str = "raw") -> Weights:
    """Write the model weights of a checkpoint (file or DCP directory), the trained ones or (``which="ema"``)
    their EMA, as a plain state dict, the format of torchvision's ``resnet*`` files, with the run's model section,
    class names and preprocessing in its ``_metadata``; returns what was exported. Written atomically."""
    weights = read_weights(source, which)
    if weights.plain:
        raise UserError(f"{source}: already a plain state dict; nothing to export")
    if (bad := first_nonfinite(weights.state_dict)) is not None:
        raise UserError(
            f"{source}: {bad} holds inf or NaN (a diverged run): not exported; export an earlier checkpoint"
        )
    state_dict = collections.OrderedDict(weights.state_dict)
    state_dict._metadata = collections.OrderedDict()  # as Module.state_dict() has it
    state_dict._metadata[EXPORT_METADATA] = {
        "model": weights.config["model"],
        "classes": weights.classes,
        "data": {key: weights.config["data"].get(key) for key in PREPROCESSING},
    }
    partial = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_file(partial, state_dict)
        os.replace(partial, out)
    except OSError as error:
        remove(partial)
        raise UserError(f"{out}: cannot write ({error.strerror}: {error.filename})") from None
    return weights
