"""The model registry: ``create_model(name, **overrides)`` builds every network of the paper."""

from trainer.models.registry import ModelSpec, create_model, get_model_spec, list_models, paper_error
from trainer.models.resnet import BasicBlock, Bottleneck, ResNet

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
