"""Checkpoints in ``RUN_DIR/checkpoints``, written atomically, the last k kept.

DDP and a single process (whatever its strategy) write one file ``ckpt-N.pt``: a plain dict of tensors and Python
containers, read back with ``weights_only=True``. FSDP2 over more than one rank writes a directory ``ckpt-N``: the
sharded model and optimizer as a torch.distributed.checkpoint (DCP), each rank its own shards, beside
``train_state.pt`` (everything else). Both
hold the model and the optimizer under the model's own parameter names (torch.distributed.checkpoint.state_dict),
so either resumes into either strategy and any world size. What reads them for evaluation and export is
trainer.eval.weights; the reader of a DCP directory's metadata (``check_dcp_metadata``, which refuses what would
run code) and of a whole DCP checkpoint (``read_dcp``) are here, beside the writer.
"""

from __future__ import annotations

import collections
import inspect
import logging
import os
import pathlib
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from data_pipeline.errors import UserError
from trainer.config import Config, to_dict
from trainer.distributed import any_rank, average_bn_buffers, barrier
from trainer.ema import WeightAverage
from trainer.faults import CheckpointNotWritten, NonFiniteState, first_nonfinite

if TYPE_CHECKING:
    from trainer.run_parts import Run

CHECKPOINT_PATTERN = re.compile(r"^ckpt-(\d+)(\.pt)?$")
CPU = torch.device("cpu")
TRAIN_STATE = "train_state.pt"  # in a DCP directory: what is not model or optimizer

log = logging.getLogger(__name__)


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, files and DCP directories, oldest first (a ``.tmp`` left by a crash
    mid-write is not one)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(path.name))]
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


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


def is_write_failure(error: BaseException) -> bool:
    """Whether ``error`` is the writer's: an OSError, or torch.save's zip writer failing on one."""
    chain = [error, error.__context__, error.__cause__]
    return any(isinstance(cause, OSError) for cause in chain) or any(
        marker in str(error) for marker in ("PytorchStreamWriter", "unexpected pos", "file write failed")
    )


def write_error(error: BaseException) -> str:
    """The system's reason for a failed write where there is one (torch.save's "unexpected pos" follows an OSError,
    or a write that fell short on a full disk)."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError):
            return cause.strerror or str(cause)
        cause = cause.__context__
    return f"{type(error).__name__}: {str(error).strip()[:200]}"


def write_file(path: Path, state: dict[str, Any]) -> None:
    with open(path, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def read_train_state(path: Path) -> dict[str, Any]:
    """A checkpoint's step, schedule and data state, model name and config: a whole file, or a DCP directory's
    ``train_state.pt``."""
    return load_checkpoint(path / TRAIN_STATE if path.is_dir() else path)


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


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a truncated or foreign file
        raise UserError(f"checkpoint {str(path)!r} cannot be read: {why_unreadable(path, error)}") from None


def why_unreadable(path: Path, error: Exception) -> str:
    """What a file torch.load refused is, in words (never torch's advice to load it unsafely)."""
    with open(path, "rb") as file:
        head = file.read(4096)
    if not head:
        return "empty (0 bytes): a write that never finished"
    legacy = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)  # how torch's pre-zip format begins
    if not (head.startswith(b"PK\x03\x04") or head.startswith(legacy)):
        try:
            head.decode("utf-8")
        except UnicodeDecodeError:
            return "not a file torch.save wrote"
        return "a text file, not a checkpoint"
    if named := re.search(r"GLOBAL (\S+) was not an allowed global", str(error)):
        return f"it names {named.group(1)}, which weights-only loading does not run (checkpoints hold tensors)"
    first = str(error).strip().splitlines()[0]
    return f"damaged or truncated ({first.split('. ')[0][:200]})"


def read_dcp(path: Path) -> dict[str, Any]:
    """A DCP checkpoint directory read whole into one process, through a temporary torch.save file."""
    check_dcp_metadata(path)
    train_state = load_checkpoint(path / TRAIN_STATE) if (path / TRAIN_STATE).is_file() else {}
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        converted = Path(scratch) / "checkpoint.pt"
        dcp_to_torch_save(path, converted)
        return {**train_state, **load_checkpoint(converted)}


class DcpMetadataUnpickler(pickle.Unpickler):
    """DCP reads ``.metadata`` with plain ``pickle.load``, which runs whatever a crafted file names. This admits
    only what DCP itself writes there: its metadata classes, torch.Size, dtypes and layouts, and paths."""

    ALLOWED = {
        **{
            (dcp_metadata.__name__, name): value
            for name, value in vars(dcp_metadata).items()
            if inspect.isclass(value) and value.__module__ == dcp_metadata.__name__
        },
        (dcp_filesystem.__name__, "_StorageInfo"): dcp_filesystem._StorageInfo,
        ("torch", "Size"): torch.Size,
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
        **{("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
        **{
            ("pathlib", name): getattr(pathlib, name)
            for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")
        },
        ("collections", "OrderedDict"): collections.OrderedDict,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP's metadata never holds")
        return self.ALLOWED[module, name]


def check_dcp_metadata(path: Path) -> dcp_metadata.Metadata:
    """Before DCP unpickles a directory's ``.metadata``: read it with ``DcpMetadataUnpickler``, refuse it with one
    line unless it is DCP's own ``Metadata``; that metadata (what the checkpoint holds)."""
    metadata = path / ".metadata"
    if not metadata.is_file():
        raise UserError(f"{path}: a directory without .metadata is not a torch.distributed.checkpoint checkpoint")
    try:
        with open(metadata, "rb") as file:
            loaded = DcpMetadataUnpickler(file).load()
    except Exception as error:  # noqa: BLE001 (a crafted or damaged pickle raises anything)
        raise UserError(f"{metadata}: not loaded: {error} (checkpoints are read weights-only)") from None
    if not isinstance(loaded, dcp_metadata.Metadata):
        raise UserError(f"{metadata}: holds a {type(loaded).__name__}, not DCP's Metadata; not loaded")
    check_dcp_files(path, loaded)
    return loaded


def check_dcp_files(path: Path, metadata: dcp_metadata.Metadata) -> None:
    """Every shard file the metadata names is there, and long enough for what it says it holds: one missing or cut
    short (a copy interrupted, a rank's disk lost) is named here, rather than as DCP's error from every rank."""
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, length in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            raise UserError(f"{shard}: missing, a shard of the checkpoint {path}; resume from an earlier checkpoint")
        if (size := shard.stat().st_size) < length:
            raise UserError(
                f"{shard}: cut short ({size} of {length} bytes), a shard of the checkpoint {path}; resume from an "
                f"earlier checkpoint"
            )


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, saved: dict[str, Any]) -> None: ...


class RngStates:
    """The CPU's random generators, which the data order and every crop draw from."""

    def state_dict(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state(), "python": random.getstate()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        torch.set_rng_state(saved["torch"])
        random.setstate(saved["python"])


class CheckpointManager:
    """What a training run's checkpoint holds, when one is due, and which one a run resumes from.

    A checkpoint holds the model, the optimizer and the EMA of the weights if the run keeps one; beside them each
    of ``states`` under its name (the loop's: the train state, with the iteration that fixes the epoch and the batch
    within it, and so the data order and every crop, the skipped steps and the metrics history the schedule reads;
    the open metrics window), the gradient scaler and the RNG states; and the config, the classes (which `residual
    eval` and `export` carry on) and what a resume checks: the model's name and the batches per epoch (the data set
    and batch size).
    """

    def __init__(self, run: Run, states: dict[str, Stateful]) -> None:
        self.run = run  # its config as it stands at each save (a grown loader's data.workers)
        self.run_dir, self.launch, self.device = run.run_dir, run.launch, run.device
        self.model, self.optimizer, self.ema = run.stepper.model, run.stepper.optimizer, run.ema
        self.states = {**states, "scaler": run.stepper.scaler, "rng": RngStates()}
        self.total_iterations = run.total_iterations
        self.batches_per_epoch, self.classes = run.loader.batches_per_epoch, run.loader.classes
        self.sharded = run.sharded
        self.every = run.config.checkpoint.every or self.batches_per_epoch

    @property
    def config(self) -> Config:
        return self.run.config

    def due(self, iteration: int) -> bool:
        """On the cadence (``checkpoint.every``, default every epoch) and at the last iteration."""
        return iteration % self.every == 0 or iteration == self.total_iterations

    def resume_source(self) -> Path | None:
        """``checkpoint.resume``: "auto" (the latest checkpoint if there is one), "latest" (it must exist), "never",
        or a checkpoint's path."""
        resume = self.config.checkpoint.resume
        if resume == "never":
            return None
        if resume in ("auto", "latest"):
            latest = latest_checkpoint(self.run_dir)
            if latest is None and resume == "latest":
                raise UserError(f"--resume: no checkpoint in {checkpoint_dir(self.run_dir)} to resume from")
            return latest
        return Path(resume)

    def resume(self) -> int:
        """Load the checkpoint ``resume_source`` names, if any, into this run; the iteration it was written at (0
        for none)."""
        source = self.resume_source()
        if source is None:
            return 0
        saved = read_train_state(source)
        name = self.config.model.name
        if saved.get("model_name") != name:
            raise UserError(f"{source}: a checkpoint of {saved.get('model_name')!r}, not of model.name={name!r}")
        if saved["batches_per_epoch"] != self.batches_per_epoch:
            raise UserError(
                f"{source}: saved with {saved['batches_per_epoch']} batches per epoch, this run has "
                f"{self.batches_per_epoch}: the data set or data.batch_size changed"
            )
        load_model_and_optimizer(source, saved, self.model, self.optimizer, name=name, ema=self.ema)
        for key, state in self.states.items():
            state.load_state_dict(saved.get(key, saved))  # checkpoints before 2026-12-06 hold the train state's
            # fields at their top level
        log.info("resumed from %s at iteration %d", source, saved["iteration"])
        return saved["iteration"]

    def save(self, iteration: int, *, now: bool = False) -> Path | None:
        """The checkpoint of ``iteration`` if one is ``due`` (or ``now``), else nothing. Called on every rank (BN
        statistics are averaged and the metrics window summed over the ranks first)."""
        if not (now or self.due(iteration)):
            return None
        average_bn_buffers(self.model)
        extra = {
            "iteration": iteration,
            "epoch": iteration // self.batches_per_epoch,  # with the iteration: the data position
            "model_name": self.config.model.name,
            "strategy": self.config.dist.strategy,
            "world_size": self.launch.world_size,
            "batches_per_epoch": self.batches_per_epoch,
            "classes": self.classes,
            "config": to_dict(self.config),
        }
        return save_checkpoint(
            self.run_dir,
            iteration,
            self.model,
            self.optimizer,
            {key: state.state_dict() for key, state in self.states.items()} | extra,
            ema=self.ema,
            sharded=self.sharded,
            keep=self.config.checkpoint.keep,
            is_main=self.launch.is_main,
            device=self.device,
        )
