"""``residual``: the one command line of the project.

residual train CONFIG [key=value ...] [--resume [CHECKPOINT]]
residual eval CHECKPOINT --data DIR [--protocol center|tencrop|multiscale] [--scales 224,256,...]
residual export CHECKPOINT OUT.pt
residual models [--json]
residual env [--json]
residual data synth OUT [--format imagefolder|cifar] [--classes K] [--per-class N] [--size WxH]
residual data prepare-imagenet IMAGES OUT (--devkit GROUND_TRUTH META.mat | --solution LOC_val_solution.csv)
residual data shard SRC OUT [--shard-size N]
residual data verify DIR
residual bench eval [--model NAME] [--batch B]
residual submit CONFIG [key=value ...] --nodes N --gpus-per-node G [--tasks-per-node T] [--partition P ...]
              [--array seeds=1,2,3 | --array-file CONFIGS] [--dry-run]
residual jobs [RUNS_DIR]
residual sweep SWEEP.yaml [--resume] [--address HOST:PORT]
residual tensorboard [RUNS_DIR] [--port P] [--host H]
residual report RUN_DIR [RUN_DIR ...] [--out DIR]
residual bench loader --data DIR [--backend dali|torch|both] [--pipeline paper|val|tencrop] [--batch B]
                      [--feeder-only]
residual bench gpu [--out DIR]
residual bench train [--model NAME] [--batch B] [--strategy ddp|fsdp] [--precision auto] [--steps N] [--rounds R]
                     [--end-to-end [--config CONFIG] [--iterations N]]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path

from data_pipeline.errors import UserError
from trainer.config import PAPER_SCALES, PRECISIONS, PROTOCOLS

log = logging.getLogger("residual")


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.run import run

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    return run(args.config, overrides)


def cmd_eval(args: argparse.Namespace) -> None:
    from trainer.distributed import LaunchEnv, destroy_process_group
    from trainer.evaluate_checkpoint import (
        EvalRequest,
        evaluate_checkpoint,
        format_table,
        per_class_report,
        write_report,
    )

    request = EvalRequest(
        checkpoint=Path(args.checkpoint),
        data=Path(args.data),
        protocol=args.protocol,
        scales=tuple(args.scales),
        batch_size=args.batch,
        model=args.model,
        out=Path(args.out) if args.out else None,
        per_class=args.per_class,
        workers=args.workers,
        precision=args.precision,
        mean=args.mean,
        std=args.std,
        resize=args.resize,
        crop=args.crop,
    )
    launch = LaunchEnv.from_environ()
    try:
        result, classes, report = evaluate_checkpoint(request, launch)
    finally:
        destroy_process_group()
    if launch.is_main:
        if request.per_class:
            report["per_class"] = per_class_report(result, classes)
        print(format_table(report))
        print(f"wrote {write_report(request, report)}")


def cmd_export(args: argparse.Namespace) -> None:
    import torchvision

    from trainer.checkpoint import export_state_dict

    weights = export_state_dict(Path(args.checkpoint), Path(args.out))
    name, classes = weights.model_name, len(weights.classes)
    print(f"wrote the {name} weights of {args.checkpoint} to {args.out}, with the run's preprocessing and classes")
    if hasattr(torchvision.models, name):
        print(f"  torchvision.models.{name}(num_classes={classes}) loads them; `residual eval {args.out}` reads them")
    else:
        print(f"  `residual eval {args.out} --data DIR` reads them (torchvision has no {name})")


def cmd_bench_eval(args: argparse.Namespace) -> None:
    from trainer.bench import bench_eval

    bench_eval(model_name=args.model, batch_size=args.batch, images=args.images, workers=args.workers)


def cmd_bench_train(args: argparse.Namespace) -> None:
    from trainer.bench import bench_end_to_end, bench_train

    if args.end_to_end:
        bench_end_to_end(config_path=args.config, precision=args.precision, iterations=args.iterations,
                         rounds=args.rounds, per_class=args.per_class)  # fmt: skip
        return
    bench_train(
        model_name=args.model,
        batch=args.batch,
        strategy=args.strategy,
        precision=args.precision,
        steps=args.steps,
        rounds=args.rounds,
        fsdp_mixed_precision=args.fsdp_mixed_precision,
    )


def cmd_bench_gpu(args: argparse.Namespace) -> int:
    from trainer.bench import bench_gpu

    return bench_gpu(out=Path(args.out))


def cmd_submit(args: argparse.Namespace) -> None:
    from cluster.slurm import Resources, plan, submit

    resources = Resources(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        time=args.time,
        mem=args.mem,
    )
    runs = plan(args.config, list(args.overrides), resources, args.array, args.array_file)
    result = submit(runs, resources, dry_run=args.dry_run)
    if args.dry_run:
        print(result)
        return
    for run, job in zip(runs, result, strict=True):
        print(f"submitted job {job.job_id}: {run.run_dir}  ({resources.tasks} tasks)")
        print(f"  logs: {job.paths.stdout}  {job.paths.stderr}")
    print(f"watch: residual jobs {runs[0].run_dir.parent}")


def cmd_jobs(args: argparse.Namespace) -> None:
    from cluster.jobs import format_jobs, jobs_table

    rows = jobs_table(Path(args.runs_dir))
    if not rows:
        print(f"no SLURM jobs recorded below {args.runs_dir}")
        return
    print(format_jobs(rows))


def cmd_sweep(args: argparse.Namespace) -> None:
    from cluster.sweep import run_sweep

    print(run_sweep(Path(args.sweep), resume=args.resume, address=args.address))


def cmd_tensorboard(args: argparse.Namespace) -> None:
    """TensorBoard replaces this process (exec): its PID is the one to stop, and no child outlives it."""
    runs = Path(args.runs_dir)
    if not runs.is_dir():
        raise UserError(f"{runs}: no such folder of runs")
    with socket.socket() as probe:  # the URL is printed only for a port TensorBoard can listen on
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((args.host, args.port))
        except OSError as error:
            raise UserError(f"--port {args.port}: cannot listen on {args.host} ({error.strerror})") from None
    print(f"TensorBoard for {runs}: http://{args.host}:{args.port}/#custom_scalars", flush=True)
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(runs), "--host", args.host]
    os.execv(sys.executable, [*command, "--port", str(args.port), "--reload_interval", "5"])


def cmd_report(args: argparse.Namespace) -> None:
    # matplotlib keeps a font cache and config in ~/.cache and ~/.config unless told otherwise: here, for this run
    with tempfile.TemporaryDirectory(prefix="residual-matplotlib-") as scratch:
        os.environ.setdefault("MPLCONFIGDIR", scratch)
        from trainer.report import write_report

        for path in write_report([Path(run) for run in args.run_dirs], Path(args.out)):
            print(f"wrote {path}")


def cmd_bench_loader(args: argparse.Namespace) -> None:
    from data_pipeline.bench import bench_loader

    if args.feeder_only:
        from data_pipeline.bench import bench_feeder

        bench_feeder(data=args.data, batch=args.batch, batches=args.batches, rounds=args.rounds)
        return
    backends = ["dali", "torch"] if args.backend == "both" else [args.backend]
    bench_loader(data=args.data, backends=backends, pipeline=args.pipeline, batch=args.batch, batches=args.batches,
                 rounds=args.rounds, workers=args.workers)  # fmt: skip


def cmd_data_shard(args: argparse.Namespace) -> None:
    from data_pipeline.webdataset import shard_imagefolder

    if args.shard_size < 1:
        raise UserError(f"--shard-size {args.shard_size}: must be at least 1")
    counts = shard_imagefolder(Path(args.source), Path(args.out), shard_size=args.shard_size)
    shards = ", ".join(f"{split}: {count} shards" for split, count in counts.items())
    print(f"wrote {args.out} ({shards}; data.format=webdataset data.root={args.out})")


def cmd_prepare_imagenet(args: argparse.Namespace) -> None:
    from data_pipeline.imagenet import labels_from_devkit, labels_from_solution, prepare_val

    for path in [args.images, *(args.devkit or []), *([args.solution] if args.solution else [])]:
        if not Path(path).exists():
            raise UserError(f"{path}: does not exist")
    labels = labels_from_devkit(*map(Path, args.devkit)) if args.devkit else labels_from_solution(Path(args.solution))
    count = prepare_val(Path(args.images), Path(args.out), labels, mode=args.mode)
    print(f"placed {count} images in {len(set(labels.values()))} class folders under {args.out}")


def cmd_env(args: argparse.Namespace) -> None:
    from trainer.hardware import environment, format_environment

    facts = environment()
    print(json.dumps(facts, indent=2) if args.json else format_environment(facts))


def cmd_models(args: argparse.Namespace) -> None:
    from trainer.models.complexity import complexity_table

    rows = complexity_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'model':<11}{'params':>10}{'paper':>8}{'ratio':>7}{'mult-adds':>12}{'paper':>9}{'ratio':>7}")
    for row in rows:
        paper_macs, macs = row["paper_macs"], row["macs"]
        macs_text = f"{macs / 1e9:>10.3f}G" if row["dataset"] == "imagenet" else f"{macs / 1e6:>10.1f}M"
        paper_text = f"{paper_macs / 1e9:>8.1f}G{macs / paper_macs:>7.3f}" if paper_macs else f"{'-':>9}{'-':>7}"
        print(
            f"{row['name']:<11}{row['params'] / 1e6:>9.2f}M{row['paper_params'] / 1e6:>7.2f}M"
            f"{row['params'] / row['paper_params']:>7.3f}{macs_text}{paper_text}"
        )
    print(
        "mult-adds at 224x224 (ImageNet) and 32x32 (CIFAR-10), bottlenecks with the paper's stride_in_1x1=True; "
        "the paper gives no CIFAR-10 FLOPs"
    )


def parse_scales(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"scales {text!r} are not comma-separated integers (224,256,384)") from None


def parse_floats(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not three comma-separated numbers (0.485,0.456,0.406)")
    return values


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not WxH (example: 64x64)") from None
    return width, height


def cmd_data_synth(args: argparse.Namespace) -> None:
    from data_pipeline.synthetic import synthesize_cifar, synthesize_imagefolder

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


def cmd_data_verify(args: argparse.Namespace) -> int:
    from data_pipeline.verify import verify_images

    checked, failures = verify_images(Path(args.root), workers=args.workers)
    for path, reason in failures:
        print(f"{path}: {reason}")
    print(f"{checked} images checked, {len(failures)} not decodable", file=sys.stderr)
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="residual", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", help="YAML file, e.g. configs/quickstart.yaml")
    train.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optim.lr=0.05")
    train.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CKPT",
        help="resume from the run's latest checkpoint (an error if there is none), or from CKPT; without the flag "
        "a run resumes from its latest checkpoint when it has one (checkpoint.resume=auto)",
    )
    train.set_defaults(run=cmd_train)

    evaluation = commands.add_parser("eval", help="top-1/top-5 of a checkpoint over a validation set")
    evaluation.add_argument("checkpoint", help="training checkpoint, DCP directory, or a state dict file")
    evaluation.add_argument("--data", required=True, help="ImageFolder root (with val/) or class folders, or CIFAR")
    evaluation.add_argument("--protocol", choices=PROTOCOLS, default="center")
    evaluation.add_argument(
        "--scales",
        type=parse_scales,
        default=list(PAPER_SCALES),
        help="shorter sides for multiscale (default: the paper's 224,256,384,480,640)",
    )
    evaluation.add_argument("--batch", type=int, default=64, help="images per step over all ranks")
    evaluation.add_argument("--model", help="model name, for state dicts that do not carry it")
    evaluation.add_argument("--out", help="JSON file to write (default: beside the checkpoint)")
    evaluation.add_argument("--per-class", action="store_true", help="add per-class accuracy to the JSON")
    evaluation.add_argument("--workers", type=int, default=4, help="loader processes per rank")
    evaluation.add_argument(
        "--precision", choices=PRECISIONS, default="auto", help="auto: bf16 where native, fp16 on older GPUs, else fp32"
    )
    preprocessing = "(default: the checkpoint's, an export's, else the data set's)"
    evaluation.add_argument("--mean", type=parse_floats, help=f"per-channel mean on [0, 1] pixels {preprocessing}")
    evaluation.add_argument("--std", type=parse_floats, help=f"per-channel std on [0, 1] pixels {preprocessing}")
    evaluation.add_argument("--resize", type=int, help=f"shorter side before the center crop {preprocessing}")
    evaluation.add_argument("--crop", type=int, help=f"center crop size {preprocessing}")
    evaluation.set_defaults(run=cmd_eval)

    export = commands.add_parser("export", help="a checkpoint's weights as a plain (torchvision) state dict")
    export.add_argument("checkpoint", help="training checkpoint file or DCP directory")
    export.add_argument("out", help="the .pt file to write")
    export.set_defaults(run=cmd_export)

    slurm = commands.add_parser("submit", help="submit a training run to SLURM (submitit)")
    slurm.add_argument("config", help="YAML config")
    slurm.add_argument("overrides", nargs="*", help="key=value config overrides")
    slurm.add_argument("--nodes", type=int, default=1)
    slurm.add_argument("--gpus-per-node", type=int, default=1, help="one task per GPU; 0: CPU tasks (gloo)")
    slurm.add_argument("--tasks-per-node", type=int, help="ranks per node (default: one per GPU)")
    slurm.add_argument("--cpus-per-task", type=int)
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--constraint")
    slurm.add_argument("--time", default="24:00:00", help="time limit, [D-]HH:MM:SS")
    slurm.add_argument("--mem", help="memory per node, e.g. 400G")
    array = slurm.add_mutually_exclusive_group()
    array.add_argument("--array", metavar="KEY=V1,V2", help="one run per value (seeds=1,2,3 sets train.seed)")
    array.add_argument("--array-file", metavar="CONFIGS", help="a file listing one config per line, one run each")
    slurm.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    slurm.set_defaults(run=cmd_submit)

    jobs = commands.add_parser("jobs", help="the project's SLURM jobs: state, elapsed, last step, last top-1")
    jobs.add_argument("runs_dir", nargs="?", default="runs")
    jobs.set_defaults(run=cmd_jobs)

    sweep = commands.add_parser("sweep", help="a Ray Tune sweep over config keys (ASHA on the validation top-1)")
    sweep.add_argument("sweep", help="sweep YAML: base config, overrides, search space, scheduler, resources")
    sweep.add_argument("--resume", action="store_true", help="continue an interrupted sweep (Tuner.restore)")
    sweep.add_argument("--address", help="an existing Ray cluster (default: a local one on 127.0.0.1)")
    sweep.set_defaults(run=cmd_sweep)

    board = commands.add_parser("tensorboard", help="TensorBoard over the runs, on 127.0.0.1 unless asked")
    board.add_argument("runs_dir", nargs="?", default="runs")
    board.add_argument("--port", type=int, default=6006)
    board.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    board.set_defaults(run=cmd_tensorboard)

    report = commands.add_parser("report", help="the paper's figures and table for some runs")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", default="report", help="folder for the PNG figures and report.md")
    report.set_defaults(run=cmd_report)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    bench_eval = bench.add_parser("eval", help="images/s of center-crop and 10-crop evaluation, and their ratio")
    bench_eval.add_argument("--model", default="resnet50")
    bench_eval.add_argument("--batch", type=int, default=32)
    bench_eval.add_argument("--images", type=int, default=128, help="synthetic 320x256 validation images")
    bench_eval.add_argument("--workers", type=int, default=2)
    bench_eval.set_defaults(run=cmd_bench_eval)
    bench_loader = bench.add_parser("loader", help="images/s of the DALI and torchvision loaders, and their ratio")
    bench_loader.add_argument("--data", required=True, help="an ImageFolder root (train/ and val/)")
    bench_loader.add_argument("--backend", choices=("dali", "torch", "both"), default="both")
    bench_loader.add_argument("--pipeline", choices=("paper", "val", "tencrop"), default="paper")
    bench_loader.add_argument("--batch", type=int, default=64)
    bench_loader.add_argument(
        "--batches", type=int, default=30, help="training batches per round (evaluation: one pass per round)"
    )
    bench_loader.add_argument("--rounds", type=int, default=3)
    bench_loader.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    bench_loader.add_argument(
        "--feeder-only", action="store_true", help="images/s of one DALI reader process's work alone (paper pipeline)"
    )
    bench_loader.set_defaults(run=cmd_bench_loader)
    bench_train = bench.add_parser("train", help="images/s of the trainer's step against a minimal loop")
    bench_train.add_argument("--model", default="resnet50")
    bench_train.add_argument("--batch", type=int, default=32, help="images per rank and step")
    bench_train.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp", help="under torchrun")
    bench_train.add_argument("--precision", choices=PRECISIONS, default="auto")
    bench_train.add_argument("--fsdp-mixed-precision", choices=("policy", "autocast"), default="policy")
    bench_train.add_argument("--steps", type=int, default=10, help="steps per timed round")
    bench_train.add_argument("--rounds", type=int, default=5, help="timed rounds of each, alternating")
    bench_train.add_argument(
        "--end-to-end", action="store_true", help="the CLI's whole training against a bare loop, wall time"
    )
    bench_train.add_argument("--config", default="configs/cifar10/resnet20.yaml", help="--end-to-end: the recipe")
    bench_train.add_argument("--iterations", type=int, default=600, help="--end-to-end: iterations per run")
    bench_train.add_argument("--per-class", type=int, default=1000, help="--end-to-end: synthetic images per class")
    bench_train.set_defaults(run=cmd_bench_train)

    bench_gpu = bench.add_parser("gpu", help="the first figures of a new GPU node, each with device and versions")
    bench_gpu.add_argument("--out", default="bench-gpu", help="folder for its synthetic data, runs and logs")
    bench_gpu.set_defaults(run=cmd_bench_gpu)

    env = commands.add_parser("env", help="this machine: CPU, GPUs, backends, DALI, versions, and what auto picks")
    env.add_argument("--json", action="store_true", help="the facts as JSON (as each run directory's env.json)")
    env.set_defaults(run=cmd_env)

    models = commands.add_parser("models", help="params and mult-adds of every model beside the paper's")
    models.add_argument("--json", action="store_true", help="a JSON list instead of the table")
    models.set_defaults(run=cmd_models)

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
    imagenet = data.add_parser("prepare-imagenet", help="sort ILSVRC2012's val images into val/<wnid>/ folders")
    imagenet.add_argument("images", help="the folder of ILSVRC2012_val_*.JPEG")
    imagenet.add_argument("out", help="the val/ folder to write (next to train/)")
    truth = imagenet.add_mutually_exclusive_group(required=True)
    truth.add_argument("--devkit", nargs=2, metavar=("GROUND_TRUTH_TXT", "META_MAT"),
                       help="ILSVRC2012_validation_ground_truth.txt and the devkit's meta.mat")  # fmt: skip
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
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # key=value overrides may follow options too: `residual submit CONFIG --nodes 4 optim.lr=0.2`
    stray = [item for item in unknown if item.startswith("-") or "=" not in item]
    if stray or (unknown and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or unknown)}")
    if unknown:
        args.overrides = [*args.overrides, *unknown]
    try:
        return args.run(args) or 0
    except UserError as error:
        from trainer.distributed import LaunchEnv, reports_user_errors

        if reports_user_errors(LaunchEnv.from_environ()):
            print(f"residual: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
