"""Data sets, augmentations and loaders; knows nothing of models or training."""

from data_pipeline.config import DataConfig, SynthConfig
from data_pipeline.errors import UserError
from data_pipeline.loaders import build_train_loader, build_val_loader
from data_pipeline.torch_loader import Batch, TrainLoader

__all__ = ["Batch", "DataConfig", "SynthConfig", "TrainLoader", "UserError", "build_train_loader", "build_val_loader"]
