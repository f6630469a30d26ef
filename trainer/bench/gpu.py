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
    residual, data = [sys.executable, "-m", "trainer.cli"], str(out / "data")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                f"--log-dir={out / 'torchrun'}", "-m", "trainer.cli"]  # fmt: skip
    dali_run = [*residual, "train", "configs/imagenet/resnet50.yaml", f"data.root={data}", "data.backend=dali",
                "data.device=gpu", "model.num_classes=10", "data.batch_size=64", "eval.batch_size=64",
                "train.iterations=60", "eval.every=20", "checkpoint.every=60", "log.every=10",
                f"train.output_dir={out / 'runs'}", "train.run_name=dali-gpu", "log.progress=false"]  # fmt: skip
    steps = [
        ("this machine", [*residual, "env"]),
        ("synthetic ImageNet-like data (500x375 JPEGs)",
         [*residual, "data", "synth", data, "--classes", "10", "--per-class", "320", "--size", "500x375"]),
        ("a DALI run on the GPU: an epoch of 50 batches and 10 more, 3 evaluations, memory", dali_run),
        ("the gpu-marked tests: the CIFAR path builds batches without waiting, DALI's pixels against the torch path's",
         [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "tests"]),
        ("trainer step / minimal step and MFU: ResNet-50", [*residual, "bench", "train", "--model", "resnet50",
                                                           "--batch", "256"]),
        ("the same without cuDNN's autotuning", [*residual, "bench", "train", "--model", "resnet50", "--batch", "256",
                                                 "--cudnn-benchmark", "off"]),
        ("optimizer step: fused SGD and LARS on ResNet-50", [*residual, "bench", "optim", "--model", "resnet50"]),
        ("trainer step / minimal step and MFU: ResNet-20", [*residual, "bench", "train", "--model", "resnet20",
                                                           "--batch", "128"]),
        ("the DALI loader at 1 reader process", [*residual, "bench", "loader", "--data", data, "--backend", "dali",
                                                 "--workers", "1", "--batch", "256"]),
        ("the DALI loader at 8 reader processes", [*residual, "bench", "loader", "--data", data, "--backend",
                                                   "dali", "--workers", "8", "--batch", "256"]),
        ("one DALI reader process's work", [*residual, "bench", "loader", "--data", data, "--feeder-only",
                                            "--batch", "256"]),
        ("evaluation images/s: center crop and 10-crop", [*residual, "bench", "eval", "--model", "resnet50",
                                                          "--batch", "256"]),
    ]  # fmt: skip
    if gpus > 1:
        for strategy in ("ddp", "fsdp"):
            steps.append((f"{strategy.upper()} over the node's {gpus} GPUs: ResNet-50",
                          [*torchrun, "bench", "train", "--model", "resnet50", "--batch", "256", "--strategy",
                           strategy]))  # fmt: skip
    return steps


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
