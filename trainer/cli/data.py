"""`residual data synth|get|prepare-imagenet|shard|verify`: data sets to train on, generated, fetched, sorted, sharded,
checked."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from data_pipeline.errors import UserError


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not WxH (example: 64x64)") from None
    return width, height


def cmd_data_synth(args: argparse.Namespace) -> None:
    from data_pipeline.prepare.synthetic import synthesize_cifar, synthesize_imagefolder

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: folder exists and is not empty")
    counts = {
        "classes": args.classes,
        "train_per_class": args.per_class,
        "seed": args.seed,
        "val_per_class": args.val_per_class or max(1, args.per_class // 5),
    }
    if args.format == "cifar":
        synthesize_cifar(out, **counts)
    else:
        synthesize_imagefolder(out, size=args.size, **counts)
    print(f"wrote {args.format} data, {args.classes} classes, to {out}")


def cmd_prepare_imagenet(args: argparse.Namespace) -> None:
    from data_pipeline.prepare.imagenet import labels_from_devkit, labels_from_solution, prepare_val

    for path in [args.images, *(args.devkit or []), *([args.solution] if args.solution else [])]:
        if not Path(path).exists():
            raise UserError(f"{path}: does not exist")
    labels = labels_from_devkit(*map(Path, args.devkit)) if args.devkit else labels_from_solution(Path(args.solution))
    count = prepare_val(Path(args.images), Path(args.out), labels, mode=args.mode)
    print(f"placed {count} images in {len(set(labels.values()))} class folders under {args.out}")


def cmd_data_shard(args: argparse.Namespace) -> None:
    from data_pipeline.prepare.shard import shard_imagefolder

    if args.shard_size < 1:
        raise UserError(f"--shard-size {args.shard_size}: must be at least 1")
    counts = shard_imagefolder(Path(args.source), Path(args.out), shard_size=args.shard_size)
    shards = ", ".join(f"{split}: {count} shards" for split, count in counts.items())
    print(f"wrote {args.out} ({shards}; data.format=webdataset data.root={args.out})")


def cmd_data_verify(args: argparse.Namespace) -> int:
    from data_pipeline.prepare.verify import verify_images

    checked, failures = verify_images(Path(args.root), workers=args.workers, progress=True)
    for path, reason in failures:
        print(f"{path}: {reason}")
    print(f"{checked} images checked, {len(failures)} not decodable", file=sys.stderr)
    return 1 if failures else 0


def cmd_data_get(args: argparse.Namespace) -> None:
    from data_pipeline.prepare.get import PUBLISHED, get_dataset

    out = Path(args.out)
    origin = get_dataset(args.name, out, mirror=args.mirror, system=Path(args.system))
    print(f"{args.name} in {out}, from {origin}; train with data.format={PUBLISHED[args.name].format} data.root={out}")


def add_data(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="data set tools").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write a learnable synthetic data set")
    synth.add_argument("out")
    synth.add_argument("--format", choices=("imagefolder", "cifar"), default="imagefolder")
    synth.add_argument("--classes", type=int, default=10)
    synth.add_argument("--per-class", type=int, default=500, help="training images per class")
    synth.add_argument("--val-per-class", type=int, help="validation images per class (default per-class / 5)")
    synth.add_argument("--size", type=parse_size, default=(64, 64), help="WxH of ImageFolder images (CIFAR: 32x32)")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(run=cmd_data_synth)
    get = data.add_parser("get", help="a published data set: Debian's copy where installed, else its official source")
    get.add_argument("name", choices=("fashion-mnist", "mnist", "cifar10", "cifar100"))
    get.add_argument("out", help="the folder to write (absent or empty)")
    get.add_argument("--mirror", help="a base address to download from instead of the official one (md5 still checked)")
    get.add_argument("--system", default="/usr/share/datasets", help="where Debian's dataset packages put their files")
    get.set_defaults(run=cmd_data_get)
    imagenet = data.add_parser("prepare-imagenet", help="sort ILSVRC2012's val images into val/<wnid>/ folders")
    imagenet.add_argument("images", help="the folder of ILSVRC2012_val_*.JPEG")
    imagenet.add_argument("out", help="the val/ folder to write (next to train/)")
    truth = imagenet.add_mutually_exclusive_group(required=True)
    truth.add_argument(
        "--devkit",
        nargs=2,
        metavar=("GROUND_TRUTH_TXT", "META_MAT"),
        help="ILSVRC2012_validation_ground_truth.txt and the devkit's meta.mat",
    )
    truth.add_argument("--solution", metavar="LOC_VAL_SOLUTION_CSV", help="Kaggle's LOC_val_solution.csv")
    imagenet.add_argument("--mode", choices=("link", "copy", "move"), default="link")
    imagenet.set_defaults(run=cmd_prepare_imagenet)
    shard = data.add_parser("shard", help="an ImageFolder root's train/ and val/ as WebDataset shards with indexes")
    shard.add_argument("source", help="ImageFolder root (train/<class>/*, val/<class>/*)")
    shard.add_argument("out", help="folder for train/*.tar, val/*.tar and classes.txt")
    shard.add_argument("--shard-size", type=int, default=5000, help="samples per shard")
    shard.set_defaults(run=cmd_data_shard)
    verify = data.add_parser("verify", help="decode every image below a folder; list those that fail (exit 1)")
    verify.add_argument("root")
    verify.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    verify.set_defaults(run=cmd_data_verify)


def add_commands(commands: argparse._SubParsersAction) -> None:
    add_data(commands)
