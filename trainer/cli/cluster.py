"""`residual submit`, `jobs`, `sweep`: runs on SLURM (submitit) and sweeps (Ray Tune)."""

from __future__ import annotations

import argparse
from pathlib import Path


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


def add_submit(commands: argparse._SubParsersAction) -> None:
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


def cmd_jobs(args: argparse.Namespace) -> None:
    from cluster.jobs import format_jobs, jobs_table

    rows = jobs_table(Path(args.runs_dir))
    if not rows:
        print(f"no SLURM jobs recorded below {args.runs_dir}")
        return
    print(format_jobs(rows))


def add_jobs(commands: argparse._SubParsersAction) -> None:
    jobs = commands.add_parser("jobs", help="the project's SLURM jobs: state, elapsed, last step, last top-1")
    jobs.add_argument("runs_dir", nargs="?", default="runs")
    jobs.set_defaults(run=cmd_jobs)


def cmd_sweep(args: argparse.Namespace) -> None:
    from cluster.sweep import run_sweep

    print(run_sweep(Path(args.sweep), resume=args.resume, address=args.address))


def add_sweep(commands: argparse._SubParsersAction) -> None:
    sweep = commands.add_parser("sweep", help="a Ray Tune sweep over config keys (ASHA on the validation top-1)")
    sweep.add_argument("sweep", help="sweep YAML: base config, overrides, search space, scheduler, resources")
    sweep.add_argument("--resume", action="store_true", help="continue an interrupted sweep (Tuner.restore)")
    sweep.add_argument("--address", help="an existing Ray cluster (default: a local one on 127.0.0.1)")
    sweep.set_defaults(run=cmd_sweep)


def add_commands(commands: argparse._SubParsersAction) -> None:
    add_submit(commands)
    add_jobs(commands)
    add_sweep(commands)
