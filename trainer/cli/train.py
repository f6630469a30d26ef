"""`residual train`, `eval`, `export`: a run, a checkpoint's top-1/top-5, its weights as a state dict."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from data_pipeline.errors import UserError
from trainer.config import PAPER_SCALES, PRECISIONS, PROTOCOLS


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.entry import run

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    return run(args.config, overrides)


def add_train(commands: argparse._SubParsersAction) -> None:
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


def cmd_eval(args: argparse.Namespace) -> None:
    from trainer.eval.evaluate_checkpoint import EvalRequest, evaluate_checkpoint, format_table, per_class_report
    from trainer.machine.distributed import LaunchEnv, destroy_process_group

    if args.other and not args.report:
        raise UserError(f"{args.other}: a second checkpoint is compared in a report: add --report DIR")
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
        weights=args.weights,
        predictions=args.report is not None,
    )
    launch = LaunchEnv.from_environ()
    evaluated = []
    try:
        for checkpoint in [request.checkpoint, *([Path(args.other)] if args.other else [])]:
            evaluated.append(evaluate_checkpoint(replace(request, checkpoint=checkpoint), launch))
    finally:
        destroy_process_group()
    if not launch.is_main:
        return
    for result, dataset, report in evaluated:
        if request.per_class:
            report["per_class"] = per_class_report(result, dataset.classes)
        print(format_table(report))
        if not args.other:
            write_counts(request, report)
    if args.report:
        print(f"wrote {write_report_page(Path(args.report), evaluated)}")


def write_counts(request, report: dict) -> None:
    """The counts as JSON beside the checkpoint (or at --out); a read-only store keeps the evaluation going."""
    from trainer.eval.evaluate_checkpoint import write_report

    try:
        print(f"wrote {write_report(request, report)}")
    except OSError as error:
        if request.out is not None:  # the file asked for: an error the entry point says
            raise
        print(
            f"residual: the counts were not written beside the checkpoint ({error.strerror}); --out FILE puts "
            "them elsewhere",
            file=sys.stderr,
        )


def write_report_page(out: Path, evaluated: list) -> Path:
    """The evaluation report (trainer.eval.eval_report) of one checkpoint, or of two side by side."""
    from trainer.eval.eval_report import Evaluated, write_comparison_report, write_eval_report

    runs = [
        Evaluated.of(
            result,
            dataset,
            model=report["model"],
            checkpoint=report["checkpoint"],
            iteration=report["iteration"],
            weights=report["weights"],
            data_set=f"{report['dataset']} ({report['data']})",
            protocol=report["protocol"],
            precision=report["precision"],
        )
        for result, dataset, report in evaluated
    ]
    return write_eval_report(out, runs[0]) if len(runs) == 1 else write_comparison_report(out, *runs)


def add_eval(commands: argparse._SubParsersAction) -> None:
    evaluation = commands.add_parser("eval", help="top-1/top-5 of a checkpoint over a validation set")
    evaluation.add_argument("checkpoint", help="training checkpoint, DCP directory, or a state dict file")
    evaluation.add_argument(
        "other", nargs="?", metavar="CHECKPOINT_B", help="a second one, compared with the first in --report"
    )
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
    evaluation.add_argument(
        "--report",
        metavar="DIR",
        help="write the evaluation report (per class, confusions with their images, calibration) as DIR/index.html",
    )
    evaluation.add_argument("--workers", type=int, default=4, help="loader processes per rank")
    evaluation.add_argument(
        "--precision", choices=PRECISIONS, default="auto", help="auto: bf16 where native, fp16 on older GPUs, else fp32"
    )
    preprocessing = "(default: the checkpoint's, an export's, else the data set's)"
    evaluation.add_argument("--mean", type=parse_floats, help=f"per-channel mean on [0, 1] pixels {preprocessing}")
    evaluation.add_argument("--std", type=parse_floats, help=f"per-channel std on [0, 1] pixels {preprocessing}")
    evaluation.add_argument("--resize", type=int, help=f"shorter side before the center crop {preprocessing}")
    evaluation.add_argument("--crop", type=int, help=f"center crop size {preprocessing}")
    add_weights_flag(evaluation)
    evaluation.set_defaults(run=cmd_eval)


def add_weights_flag(parser: argparse.ArgumentParser) -> None:
    text = "of a training checkpoint: the trained weights, or their EMA (a run with ema.decay)"
    parser.add_argument("--weights", choices=("raw", "ema"), default="raw", help=text)


def cmd_export(args: argparse.Namespace) -> None:
    import torchvision

    from trainer.eval.weights import export_state_dict

    weights = export_state_dict(Path(args.checkpoint), Path(args.out), args.weights)
    name, classes = weights.model_name, len(weights.classes)
    which = "EMA weights" if args.weights == "ema" else "weights"
    print(f"wrote the {name} {which} of {args.checkpoint} to {args.out}, with the run's preprocessing and classes")
    if hasattr(torchvision.models, name):
        print(f"  torchvision.models.{name}(num_classes={classes}) loads them; `residual eval {args.out}` reads them")
    else:
        print(f"  `residual eval {args.out} --data DIR` reads them (torchvision has no {name})")


def add_export(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser("export", help="a checkpoint's weights as a plain (torchvision) state dict")
    export.add_argument("checkpoint", help="training checkpoint file or DCP directory")
    export.add_argument("out", help="the .pt file to write")
    add_weights_flag(export)
    export.set_defaults(run=cmd_export)


def add_commands(commands: argparse._SubParsersAction) -> None:
    add_train(commands)
    add_eval(commands)
    add_export(commands)
