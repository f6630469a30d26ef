"""``residual bench gpu``: the checklist of what only a GPU machine can show, run in one go."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import torch

from data_pipeline.errors import UserError


def gpu_checklist(*, out: Path, gpus: int) -> list[tuple[str, list[str]]]:
    """The first figures that matter on a new GPU node, as the commands that measure them (each prints its device
    and versions, or ``residual env`` does): (title, argv) in order."""
    data, runs = shlex.quote(str(out / "data")), shlex.quote(str(out / "runs"))
    torchrun = (
        f"torch.distributed.run --standalone --nproc_per_node={gpus} --log-dir={shlex.quote(str(out / 'torchrun'))}"
    )
    dali_run = (
        f"train configs/imagenet/resnet50.yaml data.root={data} data.backend=dali data.device=gpu model.num_classes=10 "
        f"data.batch_size=64 eval.batch_size=64 train.iterations=60 eval.every=20 checkpoint.every=60 log.every=10 "
        f"train.output_dir={runs} train.run_name=dali-gpu log.progress=false"
    )
    loader = f"bench loader --data {data} --batch 256"
    steps = [  # (title, a module and its arguments)
        ("this machine", "trainer.cli env"),
        (
            "synthetic ImageNet-like data (500x375 JPEGs)",
            f"trainer.cli data synth {data} --classes 10 --per-class 320 --size 500x375",
        ),
        ("a DALI run on the GPU: an epoch of 50 batches and 10 more, 3 evaluations, memory", f"trainer.cli {dali_run}"),
        (
            "the gpu-marked tests: the CIFAR path builds batches without waiting, DALI's pixels against the torch "
            "path's",
            "pytest -m gpu -q tests",
        ),
        ("trainer step / minimal step and MFU: ResNet-50", "trainer.cli bench train --model resnet50 --batch 256"),
        (
            "the same without cuDNN's autotuning",
            "trainer.cli bench train --model resnet50 --batch 256 --cudnn-benchmark off",
        ),
        ("optimizer step: fused SGD and LARS on ResNet-50", "trainer.cli bench optim --model resnet50"),
        ("trainer step / minimal step and MFU: ResNet-20", "trainer.cli bench train --model resnet20 --batch 128"),
        ("the DALI loader at 1 reader process", f"trainer.cli {loader} --backend dali --workers 1"),
        ("the DALI loader at 8 reader processes", f"trainer.cli {loader} --backend dali --workers 8"),
        ("one DALI reader process's work", f"trainer.cli {loader} --feeder-only"),
        ("evaluation images/s: center crop and 10-crop", "trainer.cli bench eval --model resnet50 --batch 256"),
    ]
    if gpus > 1:
        steps += [
            (
                f"{strategy.upper()} over the node's {gpus} GPUs: ResNet-50",
                f"{torchrun} -m trainer.cli bench train --model resnet50 --batch 256 --strategy {strategy}",
            )
            for strategy in ("ddp", "fsdp")
        ]
    return [(title, [sys.executable, "-m", *shlex.split(command)]) for title, command in steps]


def bench_gpu(*, out: Path) -> int:
    """Run the checklist, each step's output as it comes under its title; the exit status of the first step that
    fails (the rest are still run)."""
    if not torch.cuda.is_available():
        raise UserError("residual bench gpu measures a GPU node: no CUDA device here (`residual env` says why)")
    status = 0
    for title, command in gpu_checklist(out=out, gpus=torch.cuda.device_count()):
        print(f"\n== {title}\n$ {shlex.join(command)}", flush=True)
        code = subprocess.run(command, cwd=Path(__file__).parents[2]).returncode
        status = status or code
    return status
