"""The model, the optimizer and the EMA of the weights in a checkpoint of either format, written and loaded on every
rank: a full file (one process, DDP) or DCP shards (FSDP2), nothing non-finite ever written."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from data_pipeline.errors import UserError
from trainer.machine.distributed import any_rank, barrier
from trainer.recipe.ema import WeightAverage
from trainer.training.checkpoint.files import (
    TRAIN_STATE,
    check_dcp_metadata,
    checkpoint_dir,
    is_write_failure,
    latest_checkpoint,
    list_checkpoints,
    remove,
    write_error,
    write_file,
)
from trainer.training.faults import CheckpointNotWritten, NonFiniteState, first_nonfinite

CPU = torch.device("cpu")

log = logging.getLogger(__name__)


def save_checkpoint(
    run_dir: Path,
    iteration: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict[str, Any],
    *,
    ema: WeightAverage | None = None,
    sharded: bool,
    keep: int,
    is_main: bool,
    device: torch.device = CPU,
) -> Path:
    """Called on every rank. Written under a temporary name, flushed to disk, renamed: a crash mid-write leaves the
    previous checkpoint whole. A write that fails (a full disk) on any rank stops every rank with
    ``CheckpointNotWritten``, the previous checkpoints untouched."""
    folder = checkpoint_dir(run_dir)
    path = folder / (f"ckpt-{iteration:09d}" if sharded else f"ckpt-{iteration:09d}.pt")
    partial = path.with_name(path.name + ".tmp")
    options = StateDictOptions(full_state_dict=not sharded, cpu_offload=not sharded)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)  # a collective under FSDP2
    if ema is not None:
        ema.average_statistics_over_ranks()
    averages = {} if ema is None else {"ema": ema.state_dict() if sharded else ema.full_state_dict()}
    refuse_nonfinite({"model": model_state, "optimizer": optimizer_state, **averages}, iteration, run_dir, device)
    failure = None
    try:
        if is_main:
            folder.mkdir(parents=True, exist_ok=True)
            remove(partial)
        if sharded:
            barrier()
            dcp.save({"model": model_state, "optimizer": optimizer_state, **averages}, checkpoint_id=partial)
            if is_main:
                write_file(partial / TRAIN_STATE, train_state)
        elif is_main:
            write_file(partial, {**train_state, "model": model_state, "optimizer": optimizer_state, **averages})
    except (OSError, RuntimeError) as error:  # torch.save's zip writer reports a full disk as a RuntimeError
        if not is_write_failure(error):  # a loader process's death is raised wherever the trainer is, here too
            raise
        failure = error
    except CheckpointException as error:  # DCP gathers its ranks' errors into one: the first rank's
        failure = next(iter(error.failures.values()))[0]
    (failed,) = any_rank([failure is not None], device)  # every rank's part is written, or every rank stops
    if failed:
        if is_main:
            remove(partial)
        reason = "failed on another rank" if failure is None else write_error(failure)
        raise CheckpointNotWritten(
            f"the checkpoint of iteration {iteration} could not be written to {folder} ({reason}); nothing is lost: "
            f"the last good checkpoint is {latest_checkpoint(run_dir) or 'none yet'}, and a new start resumes from it"
        )
    if is_main:
        remove(path)
        os.replace(partial, path)
        for old in list_checkpoints(run_dir)[:-keep]:
            remove(old)
    barrier()
    return path


def refuse_nonfinite(state: dict[str, Any], iteration: int, run_dir: Path, device: torch.device) -> None:
    """Called on every rank before anything is written: stop every rank with ``NonFiniteState`` when a floating
    tensor of ``state`` (this rank's shards) holds an inf or NaN, so that no checkpoint is ever one to resume a
    diverged run from. The update of a step whose loss was finite can still overflow (a too high lr)."""
    bad = first_nonfinite(state)
    (found,) = any_rank([bad is not None], device)
    if found:
        raise NonFiniteState(
            f"the checkpoint of iteration {iteration} was not written: {bad or 'a tensor on another rank'} holds "
            f"inf or NaN (the training diverged); the last intact checkpoint is "
            f"{latest_checkpoint(run_dir) or 'none yet'}: resume from it with a lower optim.lr, "
            f"train.skip_nonfinite=true or train.precision=fp32"
        )


def load_model_and_optimizer(
    path: Path,
    checkpoint: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    name: str,
    ema: WeightAverage | None = None,
) -> None:
    """Called on every rank: load a checkpoint of either format into the model and optimizer of this run, whatever
    their strategy and world size (DCP reshards; a full file is cut into this run's shards), and the EMA of the
    weights if the run keeps one (one the checkpoint lacks starts from the loaded weights)."""
    if path.is_dir():
        saved_keys = check_dcp_metadata(path).state_dict_metadata
        averaged = ema is not None and any(key.startswith("ema.") for key in saved_keys)
    else:
        averaged = ema is not None and "ema" in checkpoint
    try:
        if path.is_dir():
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path)
            set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
            if averaged:
                dcp.load({"ema": ema.average}, checkpoint_id=path)  # into this run's tensors, in place
        else:
            set_state_dict(
                model,
                optimizer,
                model_state_dict=checkpoint["model"],
                optim_state_dict=checkpoint["optimizer"],
                options=StateDictOptions(full_state_dict=True),
            )
            if averaged:
                ema.load_state_dict(checkpoint["ema"])
    except (RuntimeError, KeyError, ValueError) as error:  # another depth, width or class count
        raise UserError(f"{path}: does not fit {name}: {str(error).strip().splitlines()[-1][:300]}") from None
    if ema is not None and not averaged:
        log.warning("%s holds no EMA of the weights: the average starts from its weights", path)
        ema.reset()
    for group in optimizer.param_groups:  # the update's kernel is this run's choice (fused where torch has it)
        group.update({key: optimizer.defaults[key] for key in ("fused", "foreach") if key in optimizer.defaults})
    match_parameter_layouts(optimizer)


def match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Each state tensor (momentum) in its parameter's memory layout. ``load_state_dict`` keeps the strides the
    buffers were saved with, while the parameters have this run's ``train.channels_last``: CUDA's fused SGD then
    refuses the step (params, grads and buffers must share a layout), and the CPU's silently mixes the layouts, so
    its update is no longer the foreach one."""
    for param in (p for group in optimizer.param_groups for p in group["params"]):
        state = optimizer.state.get(param)
        if state is None or isinstance(param, DTensor):  # FSDP2's shards: contiguous, and no fused SGD
            continue
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
