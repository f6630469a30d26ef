"""Data sets, augmentations and loaders; knows nothing of models or training."""

from data_pipeline.config import DataConfig, SynthConfig
from data_pipeline.errors import UserError
from data_pipeline.torch_loader import Batch, TrainLoader, build_train_loader, build_val_loader

__all__ = ["Batch", "DataConfig", "SynthConfig", "TrainLoader", "UserError", "build_train_loader", "build_val_loader"]
