"""``residual bench eval``: center-crop against 10-crop evaluation."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from data_pipeline.config import DataConfig
from data_pipeline.datasets import ImageFolderDataset
from data_pipeline.prepare.synthetic import synthesize_imagefolder
from data_pipeline.torch_loader import build_eval_loader
from trainer.eval.evaluate import evaluate
from trainer.machine.distributed import LaunchEnv, pick_device
from trainer.models import create_model


def bench_eval(*, model_name: str, batch_size: int, images: int, workers: int) -> None:
    """Center-crop and 10-crop evaluation of one model on the same synthetic 320x256 images and batch size: the
    10-crop path shares the decode and resize of each image and forwards its B*10 views B at a time, so its
    images/s should be at least 1/11 of center-crop's."""
    classes = 8
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        per_class = -(-images // classes)
        synthesize_imagefolder(root, classes=classes, train_per_class=1, val_per_class=per_class, size=(320, 256))
        dataset = ImageFolderDataset(root / "val")
        config = DataConfig(root=str(root), workers=workers)
        device = pick_device("auto", LaunchEnv())
        model = create_model(model_name, num_classes=classes).to(device, memory_format=torch.channels_last)
        rates = {}
        for protocol in ("center", "tencrop"):
            batches = build_eval_loader(
                dataset, config, rank=0, world_size=1, batch_per_rank=batch_size, protocol=protocol, scales=()
            )
            evaluate(model, [next(iter(batches))], num_classes=classes, device=device, channels_last=True)  # warm-up
            result = evaluate(model, batches, num_classes=classes, device=device, channels_last=True)
            rates[protocol] = result.images_per_second
            print(f"{protocol:<8} {result.count} images  {result.images_per_second:8.1f} images/s")
    ratio = rates["tencrop"] / rates["center"]
    print(
        f"tencrop / center = {ratio:.3f} (10 views per image; at least 1/11 = 0.091 expected) "
        f"[{model_name}, batch {batch_size}, {device}, torch {torch.__version__}]"
    )
