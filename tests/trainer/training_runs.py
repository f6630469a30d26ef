"""Small training runs for the tests: ResNet-20 on the CIFAR fixture, ResNet-18 on the ImageFolder fixture, and
their metrics records."""

import json
from pathlib import Path

from checkout import QUICKSTART

from trainer.config import load_config

# The recipes beside the paper's (issue 15): configs/<these>.yaml, which the paper-config checks leave out.
RECIPES = [
    "imagenet/resnet50-torchvision-v2",
    "imagenet/resnet50-ffcv-16ep",
    "imagenet/resnet50-ffcv-88ep",
    "imagenet/resnet50-mlperf",
    "cifar10/resnet56-modern",
]


def small_run(tmp_path: Path, cifar_root: Path, *overrides: str):
    base = [
        f"data.root={cifar_root}",
        "data.synthesize=null",
        "data.batch_size=32",
        "data.workers=0",
        "eval.batch_size=50",
        f"train.output_dir={tmp_path}",
        "train.run_name=run",
        "log.every=3",
        "eval.every=5",
        "checkpoint.every=10",
        "log.progress=false",
        "schedule.milestones=[7]",
    ]
    return load_config(QUICKSTART, [*base, *overrides])


def imagefolder_run(tmp_path: Path, imagefolder_root: Path, *overrides: str):
    """ResNet-18 on the 4-class ImageFolder fixture, at 32x32 crops."""
    base = [
        f"data.root={imagefolder_root}",
        "data.synthesize=null",
        "data.format=imagefolder",
        "data.batch_size=8",
        "data.workers=0",
        "data.scale_min=40",
        "data.scale_max=48",
        "data.crop_size=32",
        "data.val_resize=36",
        "model.name=resnet18",
        "model.num_classes=4",
        "log.progress=false",
        f"train.output_dir={tmp_path}",
        "eval.batch_size=10",
    ]
    return load_config(QUICKSTART, [*base, *overrides])


WALL_CLOCK = ("images_per_second", "hours", "device_hours")


def metrics(run_dir: Path, kind: str) -> list[dict]:
    """The records of one kind, less the wall-clock figures (speed and time so far: what a resume may change)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [record for record in map(json.loads, lines) if record["kind"] == kind]
    return [{key: value for key, value in record.items() if key not in WALL_CLOCK} for record in records]
