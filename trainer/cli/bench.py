"""`residual bench eval|loader|train|optim|recipes|imagenet-size|gpu`: the project's measurements, each printing
how it was measured."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from trainer.config import PRECISIONS


def cmd_bench_eval(args: argparse.Namespace) -> None:
    from trainer.bench.eval import bench_eval

    bench_eval(model_name=args.model, batch_size=args.batch, images=args.images, workers=args.workers)


def add_bench_eval(bench: argparse._SubParsersAction) -> None:
    parser = bench.add_parser("eval", help="images/s of center-crop and 10-crop evaluation, and their ratio")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=128, help="synthetic 320x256 validation images")
    parser.add_argument("--workers", type=int, default=2)
    parser.set_defaults(run=cmd_bench_eval)


def cmd_bench_loader(args: argparse.Namespace) -> None:
    from data_pipeline.bench import bench_loader

    if args.feeder_only:
        from data_pipeline.bench import bench_feeder

        bench_feeder(data=args.data, batch=args.batch, batches=args.batches, rounds=args.rounds)
        return
    backends = ["dali", "torch"] if args.backend == "both" else [args.backend]
    bench_loader(
        data=args.data,
        backends=backends,
        pipeline=args.pipeline,
        batch=args.batch,
        batches=args.batches,
        rounds=args.rounds,
        workers=args.workers,
    )


def add_bench_loader(bench: argparse._SubParsersAction) -> None:
    parser = bench.add_parser("loader", help="images/s of the DALI and torchvision loaders, and their ratio")
    parser.add_argument("--data", required=True, help="an ImageFolder root (train/ and val/)")
    parser.add_argument("--backend", choices=("dali", "torch", "both"), default="both")
    parser.add_argument("--pipeline", choices=("paper", "val", "tencrop"), default="paper")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--batches", type=int, default=30, help="training batches per round (evaluation: one pass per round)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--feeder-only", action="store_true", help="images/s of one DALI reader process's work alone (paper pipeline)"
    )
    parser.set_defaults(run=cmd_bench_loader)


def cmd_bench_train(args: argparse.Namespace) -> None:
    from trainer.bench.train import bench_end_to_end, bench_train

    if args.end_to_end:
        bench_end_to_end(
            config_path=args.config,
            precision=args.precision,
            iterations=args.iterations,
            rounds=args.rounds,
            per_class=args.per_class,
        )
        return
    bench_train(
        model_name=args.model,
        batch=args.batch,
        strategy=args.strategy,
        precision=args.precision,
        steps=args.steps,
        rounds=args.rounds,
        fsdp_mixed_precision=args.fsdp_mixed_precision,
        cudnn_benchmark=args.cudnn_benchmark == "on",
    )


def add_bench_train(bench: argparse._SubParsersAction) -> None:
    parser = bench.add_parser("train", help="images/s of the trainer's step against a minimal loop")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=32, help="images per rank and step")
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp", help="under torchrun")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--fsdp-mixed-precision", choices=("policy", "autocast"), default="policy")
    parser.add_argument(
        "--cudnn-benchmark",
        choices=("on", "off"),
        default="on",
        help="cuDNN's autotuning (a training run turns it on for fixed shapes)",
    )
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each, alternating")
    parser.add_argument(
        "--end-to-end", action="store_true", help="the CLI's whole training against a bare loop, wall time"
    )
    parser.add_argument("--config", default="configs/cifar10/resnet20.yaml", help="--end-to-end: the recipe")
    parser.add_argument("--iterations", type=int, default=600, help="--end-to-end: iterations per run")
    parser.add_argument("--per-class", type=int, default=1000, help="--end-to-end: synthetic images per class")
    parser.set_defaults(run=cmd_bench_train)


def cmd_bench_optim(args: argparse.Namespace) -> None:
    from trainer.bench.optim import bench_optim

    bench_optim(model_name=args.model, steps=args.steps, rounds=args.rounds)


def add_bench_optim(bench: argparse._SubParsersAction) -> None:
    parser = bench.add_parser("optim", help="milliseconds per step of the fused SGD and of LARS on a model's weights")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.set_defaults(run=cmd_bench_optim)


def cmd_bench_recipes(args: argparse.Namespace) -> None:
    from trainer.bench.train import bench_recipes

    bench_recipes(
        config_path=args.config,
        precision=args.precision,
        iterations=args.iterations,
        rounds=args.rounds,
        per_class=args.per_class,
        pieces=args.pieces.split(",") if args.pieces else None,
    )


def add_bench_recipes(bench: argparse._SubParsersAction) -> None:
    parser = bench.add_parser("recipes", help="the cost per step of each recipe piece against the paper's recipe")
    parser.add_argument("--config", default="configs/quickstart.yaml", help="the paper's recipe to add pieces to")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--iterations", type=int, default=40, help="iterations per run (logged every 10)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, each running every piece in turn")
    parser.add_argument("--per-class", type=int, default=600, help="synthetic CIFAR-format images per class")
    parser.add_argument("--pieces", help="comma-separated pieces to measure (default: all of bench.train's list)")
    parser.set_defaults(run=cmd_bench_recipes)


def cmd_bench_imagenet_size(args: argparse.Namespace) -> None:
    from trainer.bench.imagenet_size import bench_imagenet_size

    bench_imagenet_size(
        scratch=Path(args.scratch),
        classes=args.classes,
        per_class=args.per_class,
        val_per_class=args.val_per_class,
        backend=args.backend,
        ranks=args.ranks,
        workers=args.workers,
        batch=args.batch,
        seconds=args.seconds,
    )


def add_bench_imagenet_size(bench: argparse._SubParsersAction) -> None:
    parser = bench.add_parser(
        "imagenet-size", help="time to the first step and memory per process on a tree of ImageNet's shape (hard links)"
    )
    parser.add_argument("--scratch", default="bench-imagenet-size", help="folder for the tree, the index and the runs")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument(
        "--per-class", type=int, default=1281, help="training files per class (ImageNet: 1,281,167 in all)"
    )
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--backend", choices=("torch", "dali"), default="torch")
    parser.add_argument("--ranks", type=int, default=1, help="training processes (torchrun) on this node")
    parser.add_argument("--workers", type=int, default=2, help="loader processes per rank (DALI: reader processes)")
    parser.add_argument("--batch", type=int, default=32, help="images per rank and step")
    parser.add_argument("--seconds", type=float, default=60.0, help="training between the two memory readings")
    parser.set_defaults(run=cmd_bench_imagenet_size)


def cmd_bench_gpu(args: argparse.Namespace) -> int:
    from trainer.bench.gpu import bench_gpu

    return bench_gpu(out=Path(args.out))


def add_bench_gpu(bench: argparse._SubParsersAction) -> None:
    parser = bench.add_parser("gpu", help="the first figures of a new GPU node, each with device and versions")
    parser.add_argument("--out", default="bench-gpu", help="folder for its synthetic data, runs and logs")
    parser.set_defaults(run=cmd_bench_gpu)


def add_bench(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    add_bench_eval(bench)
    add_bench_loader(bench)
    add_bench_train(bench)
    add_bench_optim(bench)
    add_bench_recipes(bench)
    add_bench_imagenet_size(bench)
    add_bench_gpu(bench)


def add_commands(commands: argparse._SubParsersAction) -> None:
    add_bench(commands)
