"""Data sets, augmentations and loaders; knows nothing of models or training. The loaders (and torch) are
imported when first used, so that checking a config does not import torch."""

from importlib import import_module
from typing import Any

from data_pipeline.config import DataConfig, SynthConfig
from data_pipeline.errors import UserError

EXPORTS = {
    "Batch": "torch_loader",
    "TrainLoader": "torch_loader",
    "build_train_loader": "loaders",
    "build_val_loader": "loaders",
}
__all__ = ["Batch", "DataConfig", "SynthConfig", "TrainLoader", "UserError", "build_train_loader", "build_val_loader"]


def __getattr__(name: str) -> Any:
    if name not in EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{EXPORTS[name]}"), name)
