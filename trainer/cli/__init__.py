"""``residual``: the one command line of the project.

residual train CONFIG [key=value ...] [--resume [CHECKPOINT]]
residual eval CHECKPOINT --data DIR [--protocol center|flip|tencrop|multiscale] [--scales 224,256,...]
                                    [--weights raw|ema]
residual export CHECKPOINT OUT.pt [--weights raw|ema]
residual models [--json]
residual env [--json]
residual config show CONFIG [key=value ...]
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
residual report RUN_DIR [RUN_DIR ...] [--out DIR] [--target TOP1]
residual bench loader --data DIR [--backend dali|torch|both] [--pipeline paper|val|tencrop] [--batch B]
                      [--feeder-only]
residual bench gpu [--out DIR]
residual bench optim [--model NAME] [--steps N] [--rounds R]
residual bench recipes [--config CONFIG] [--iterations N] [--rounds R]
residual bench train [--model NAME] [--batch B] [--strategy ddp|fsdp] [--precision auto] [--steps N] [--rounds R]
                     [--cudnn-benchmark on|off]
                     [--end-to-end [--config CONFIG] [--iterations N]]
"""

from __future__ import annotations

import argparse
import logging
import sys

from trainer.cli import bench, cluster, data, reports, train

AREAS = (train, data, cluster, reports, bench)  # each adds its commands, the parser beside the handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="residual", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for area in AREAS:
        area.add_commands(commands)
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
    except KeyboardInterrupt:  # Ctrl-C in a command without its own answer to it (training has one)
        print(f"residual: interrupted (Ctrl-C): {args.command} stopped", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 (a UserError, a refused file, a bug: each said in one line)
        from trainer.distributed import LaunchEnv
        from trainer.user_errors import report_error

        return report_error(error, LaunchEnv.from_environ())
