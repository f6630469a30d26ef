"""``residual eval CHECKPOINT --data DIR``: one protocol over a whole validation set, alone or under torchrun.

Takes this project's checkpoints (a training checkpoint file, an FSDP2 DCP directory, an exported state dict)
and torchvision's ``resnet*`` state-dict files; prints the paper's table row and writes the counts as JSON.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset

from data_pipeline.config import CIFAR10_MEAN, CIFAR10_STD, DataConfig
from data_pipeline.datasets import ImageFolderDataset, check_same_classes, open_dataset
from data_pipeline.errors import UserError
from data_pipeline.published import identify, title
from data_pipeline.torch_loader import build_eval_loader
from trainer.config import PAPER_SCALES, ModelConfig, check_evaluation
from trainer.eval.counts import EvalResult, calibration_error
from trainer.eval.evaluate import evaluate
from trainer.eval.weights import Weights, load_model_state, read_weights
from trainer.machine.auto import resolve_precision
from trainer.machine.distributed import LaunchEnv, init_process_group, pick_device
from trainer.models import create_model, get_model_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalRequest:
    checkpoint: Path
    data: Path
    protocol: str = "center"
    scales: tuple[int, ...] = PAPER_SCALES
    batch_size: int = 64  # global
    model: str | None = None
    out: Path | None = None
    per_class: bool = False
    workers: int = 4
    precision: str = "auto"
    mean: list[float] | None = None  # None: the checkpoint's (or an export's), else the data set's
    std: list[float] | None = None
    resize: int | None = None
    crop: int | None = None
    weights: str = "raw"  # of a training checkpoint: "raw" (the trained weights) or "ema" (their moving average)
    predictions: bool = False  # keep each image's label, top-1 class and confidence (for --report)


def build_model(weights: Weights, requested: str | None, source: Path) -> nn.Module:
    name = requested or weights.model_name
    if name is None:
        raise UserError(f"{source}: a plain state dict does not name its model: pass --model (e.g. --model resnet50)")
    if requested and weights.model_name and requested != weights.model_name:
        raise UserError(f"{source}: a checkpoint of {weights.model_name!r}, not of --model {requested!r}")
    if weights.config is not None:
        overrides = ModelConfig(**weights.config["model"]).overrides()
    elif "fc.weight" in weights.state_dict:
        overrides = {"num_classes": weights.state_dict["fc.weight"].shape[0]}
    else:
        raise UserError(f"{source}: no fc.weight: not the state dict of a ResNet")
    try:
        model = create_model(name, **overrides)
    except KeyError as error:
        raise UserError(f"--model: {error.args[0]}") from None
    load_model_state(model, weights.state_dict, source=source, name=name)
    return model


def build_data_config(weights: Weights, model_name: str, request: EvalRequest) -> DataConfig:
    """The run's own preprocessing (mean/std, resize, crop) when the checkpoint or an export carries it, else the
    defaults of the model's data set; then what --mean/--std/--resize/--crop set. The format follows the folder."""
    if weights.config is not None:
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), weights.config["data"]))
    elif get_model_spec(model_name).dataset == "cifar10":
        config = DataConfig(format="cifar", mean=list(CIFAR10_MEAN), std=list(CIFAR10_STD))
    else:
        config = DataConfig()
    data_format = folder_format(request.data)
    if data_format != "imagefolder" and (request.resize or request.crop):
        raise UserError(f"--resize/--crop: {data_format} data is tested on the image as it is (Sec. 4.2)")
    given = {"mean": request.mean, "std": request.std, "val_resize": request.resize, "val_crop": request.crop}
    given = {key: value for key, value in given.items() if value is not None}
    try:
        return replace(
            config, **given, root=str(request.data), format=data_format, workers=request.workers, synthesize=None
        )
    except UserError as error:  # DataConfig's own checks (a crop larger than the resize, say)
        raise UserError(f"{error} (from the checkpoint or --mean/--std/--resize/--crop)") from None


def folder_format(root: Path) -> str:
    """What --data holds: CIFAR-10's test_batch or CIFAR-100's test, MNIST's t10k IDX files, else an ImageFolder."""
    if (root / "test_batch").is_file() or (root / "test").is_file():
        return "cifar"
    return "idx" if any(root.glob("*t10k-images-idx3-ubyte*")) else "imagefolder"


def open_eval_dataset(config: DataConfig) -> Dataset:
    root = Path(config.root)
    if config.in_memory:
        return open_dataset(root, config.format, train=False)
    return ImageFolderDataset(root / "val" if (root / "val").is_dir() else root)


def check_classes(weights: Weights, dataset_classes: list[str], num_outputs: int, data_root: str) -> None:
    if weights.classes is not None:
        trained = "the checkpoint was trained on"
        check_same_classes(weights.classes, dataset_classes, where=data_root, expected_are=trained)
    if len(dataset_classes) != num_outputs:
        raise UserError(f"{data_root}: {len(dataset_classes)} classes, the model has {num_outputs} outputs")


def evaluate_checkpoint(request: EvalRequest, launch: LaunchEnv) -> tuple[EvalResult, Dataset, dict[str, Any]]:
    """The evaluation, the data set it was of, and the JSON report (what was evaluated, how, and the counts)."""
    weights = read_weights(request.checkpoint, request.weights)
    model = build_model(weights, request.model, request.checkpoint)
    model_name = request.model or weights.model_name
    data = build_data_config(weights, model_name, request)
    scales = list(request.scales) if request.protocol == "multiscale" else []  # used by multiscale alone
    check_evaluation(
        data,
        {"--protocol": request.protocol},
        ("--scales", scales),
        ("--batch", request.batch_size),
        world_size=launch.world_size,
    )
    dataset = open_eval_dataset(data)
    check_classes(weights, dataset.classes, model.fc.out_features, data.root)
    device = pick_device("auto", launch)
    init_process_group(launch, device)
    batches = build_eval_loader(
        dataset,
        data,
        rank=launch.rank,
        world_size=launch.world_size,
        batch_per_rank=request.batch_size // launch.world_size,
        protocol=request.protocol,
        scales=request.scales,
    )
    model = model.to(device, memory_format=torch.channels_last)
    precision, reason = resolve_precision(request.precision, device)
    log.info("precision %s: %s", precision, reason)
    result = evaluate(
        model,
        batches,
        num_classes=len(dataset.classes),
        device=device,
        precision=precision,
        channels_last=True,
        predictions=request.predictions,
    )
    report = {
        "checkpoint": str(request.checkpoint),
        "model": model_name,
        "iteration": weights.iteration,
        "data": data.root,
        "dataset": title(identify(data, dataset.classes)),
        "protocol": request.protocol,
        "weights": request.weights,
        "precision": precision,
        "scales": list(request.scales) if request.protocol == "multiscale" else None,
        **result.as_dict(),
        "ece": calibration_error(result.calibration),
        "calibration": result.calibration.tolist(),  # per confidence bin: images, summed confidence, top-1 correct
    }
    return result, dataset, report


def per_class_report(result: EvalResult, classes: list[str]) -> list[dict[str, Any]]:
    return [
        {"class": name, "correct1": c1, "correct5": c5, "count": n, "top1": c1 / n if n else None}
        for name, (c1, c5, n) in zip(classes, result.per_class, strict=True)
    ]


def format_table(report: dict[str, Any]) -> str:
    """The paper's columns: top-1 and top-5 error (%) beside the accuracies."""
    header = f"{'protocol':<11}{'images':>8}{'top-1':>9}{'top-5':>9}{'top-1 err':>11}{'top-5 err':>11}{'images/s':>10}"
    row = (
        f"{report['protocol']:<11}{report['count']:>8}{100 * report['top1']:>8.2f}%{100 * report['top5']:>8.2f}%"
        f"{100 * report['top1_error']:>10.2f}%{100 * report['top5_error']:>10.2f}%"
        f"{report['images_per_second']:>10.1f}"
    )
    return f"{header}\n{row}"


def write_report(request: EvalRequest, report: dict[str, Any]) -> Path:
    out = request.out or request.checkpoint.with_name(f"{request.checkpoint.name}.eval-{request.protocol}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return out
