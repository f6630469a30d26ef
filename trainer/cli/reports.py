"""`residual tensorboard`, `report`, `env`, `models`, `config show`: what runs, machines, models and configs say."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

from data_pipeline.errors import UserError


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


def add_tensorboard(commands: argparse._SubParsersAction) -> None:
    board = commands.add_parser("tensorboard", help="TensorBoard over the runs, on 127.0.0.1 unless asked")
    board.add_argument("runs_dir", nargs="?", default="runs")
    board.add_argument("--port", type=int, default=6006)
    board.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    board.set_defaults(run=cmd_tensorboard)


def cmd_report(args: argparse.Namespace) -> None:
    # matplotlib keeps a font cache and config in ~/.cache and ~/.config unless told otherwise: here, for this run
    with tempfile.TemporaryDirectory(prefix="residual-matplotlib-") as scratch:
        os.environ.setdefault("MPLCONFIGDIR", scratch)
        from trainer.reports.report import write_report

        for path in write_report([Path(run) for run in args.run_dirs], Path(args.out), args.target):
            print(f"wrote {path}")


def add_report(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser("report", help="the paper's figures and table for some runs")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", default="report", help="folder for the PNG figures and report.md")
    target = "top-1 %%s whose time to reach the time table gives (default: the best every run reached)"
    report.add_argument("--target", type=float, nargs="+", metavar="TOP1", help=target)
    report.set_defaults(run=cmd_report)


def cmd_env(args: argparse.Namespace) -> None:
    from trainer.machine.environment import environment, format_environment

    facts = environment()
    print(json.dumps(facts, indent=2) if args.json else format_environment(facts))


def add_env(commands: argparse._SubParsersAction) -> None:
    env = commands.add_parser("env", help="this machine: CPU, GPUs, backends, DALI, versions, and what auto picks")
    env.add_argument("--json", action="store_true", help="the facts as JSON (as each run directory's env.json)")
    env.set_defaults(run=cmd_env)


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


def add_models(commands: argparse._SubParsersAction) -> None:
    models = commands.add_parser("models", help="params and mult-adds of every model beside the paper's")
    models.add_argument("--json", action="store_true", help="a JSON list instead of the table")
    models.set_defaults(run=cmd_models)


def cmd_config_show(args: argparse.Namespace) -> None:
    from trainer.config import describe, load_config, missing_data

    config = load_config(args.config, list(args.overrides), data_needed=False)
    print(describe(config))
    if missing := missing_data(config):
        print(f"note: {missing}; training would stop there")


def add_config(commands: argparse._SubParsersAction) -> None:
    config = commands.add_parser("config", help="config tools").add_subparsers(dest="config_command", required=True)
    show = config.add_parser("show", help="the resolved config, each key with its one-line documentation")
    show.add_argument("config", help="YAML file")
    show.add_argument("overrides", nargs="*", help="key=value config overrides")
    show.set_defaults(run=cmd_config_show)


def add_commands(commands: argparse._SubParsersAction) -> None:
    add_tensorboard(commands)
    add_report(commands)
    add_env(commands)
    add_models(commands)
    add_config(commands)
