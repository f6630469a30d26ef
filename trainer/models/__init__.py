"""The model registry: ``create_model(name, **overrides)`` builds every network of the paper. Its names are in
``trainer.models.table`` (no torch); the rest is imported when first used, so that checking a config does not
import torch."""

from importlib import import_module
from typing import Any

EXPORTS = {
    "BasicBlock": "resnet",
    "Bottleneck": "resnet",
    "ResNet": "resnet",
    "ModelSpec": "registry",
    "create_model": "registry",
    "get_model_spec": "registry",
    "list_models": "registry",
    "paper_error": "registry",
}
__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ModelSpec",
    "ResNet",
    "create_model",
    "get_model_spec",
    "list_models",
    "paper_error",
]


def __getattr__(name: str) -> Any:
    if name not in EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{EXPORTS[name]}"), name)
