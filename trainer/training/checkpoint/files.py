"""A run's checkpoint files: where they are, written atomically, and read back weights-only (a whole file, a DCP
directory's metadata through a safe unpickler, or a whole DCP checkpoint into one process), for resume, eval and
export."""

from __future__ import annotations

import collections
import inspect
import logging
import os
import pathlib
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata

from data_pipeline.errors import UserError

CHECKPOINT_PATTERN = re.compile(r"^ckpt-(\d+)(\.pt)?$")
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
