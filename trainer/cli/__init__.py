"""``residual``: the one command line of the project. Each area (train, data, cluster, reports, bench) adds its
commands, the parser beside the handler; ``residual --help`` lists every command with its usage, made from those
parsers (``command_usages``), so that the usage text cannot drift from what the parser accepts."""

from __future__ import annotations

import argparse
import logging
import sys

from trainer.cli import bench, cluster, data, reports, train

AREAS = (train, data, cluster, reports, bench)  # each adds its commands, the parser beside the handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="residual",
        description="Train and evaluate the ResNets of He et al. (2016): one process, torchrun, SLURM or Ray Tune.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for area in AREAS:
        area.add_commands(commands)
    parser.epilog = "commands:\n" + "\n".join(f"  {usage}" for usage in command_usages(parser))
    return parser


def command_usages(parser: argparse.ArgumentParser) -> list[str]:
    """Every command's usage line as its parser makes it ("residual data synth OUT [--format ...] ..."), the
    nested ones (data, config, bench) each subcommand on its own."""
    usages = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in dict.fromkeys(action.choices.values()):  # aliases once
                nested = command_usages(command)
                usages += nested or [" ".join(command.format_usage().split())[len("usage: ") :]]
    return usages


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
        from trainer.machine.distributed import LaunchEnv
        from trainer.user_errors import report_error

        return report_error(error, LaunchEnv.from_environ())
