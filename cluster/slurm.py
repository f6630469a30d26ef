"""SLURM jobs through submitit: every task runs the trainer's own entry point, which initialises torch.distributed
from the SLURM environment (trainer.machine.distributed.LaunchEnv), and a preempted job requeues itself and resumes from
the latest checkpoint of its run directory.

Preemption: SLURM signals the tasks (``--signal=USR2@90``, submitit's default; or SIGTERM, or what the cluster
sends); the trainer finishes the step under way and the next, writes a checkpoint and stops with
``REQUEUE_EXIT_CODE``; the task of global rank 0 then asks SLURM to requeue the job. The requeued job starts the
same tasks, which resume.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from data_pipeline.errors import UserError, read_text
from trainer.config import Config, load_config
from trainer.training.faults import REQUEUE_EXIT_CODE

JOB_IDS = "slurm_jobs.txt"  # in a run directory: the SLURM jobs that ran it and their submitit folders


class TrainTask(submitit.helpers.Checkpointable):
    """What each task of a job runs: the training entry point (``trainer.entry``) in the task's own process.

    Checkpointable: should submitit's own signal handler run (a signal before training started), it requeues the
    task unchanged, and the new start resumes from the run directory like any other."""

    def __init__(self, config: str, overrides: list[str]) -> None:
        self.config = config
        self.overrides = overrides

    def __call__(self) -> int:
        from trainer.entry import run

        code = run(self.config, self.overrides)
        if code == REQUEUE_EXIT_CODE:
            environment = submitit.JobEnvironment()
            if environment.global_rank == 0:
                subprocess.run(["scontrol", "requeue", environment.job_id], check=True, timeout=60)
                print(f"residual: requeued job {environment.job_id}; it resumes from its checkpoint", flush=True)
            sys.exit(code)  # no result file: the job is not over
        if code != 0:
            raise RuntimeError(f"residual train {self.config} {' '.join(self.overrides)} exited with {code}")
        return code


@dataclass
class Resources:
    nodes: int = 1
    gpus_per_node: int = 1
    tasks_per_node: int | None = None  # default: one per GPU; required without GPUs
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time: str = "24:00:00"
    mem: str | None = None
    signal_delay_s: int = 90  # how long before the time limit SLURM signals the job
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def tasks(self) -> int:
        return self.nodes * self.tasks_per_node_or_gpus

    @property
    def tasks_per_node_or_gpus(self) -> int:
        return self.tasks_per_node if self.tasks_per_node is not None else self.gpus_per_node


def parse_time(text: str) -> int:
    """SLURM's [D-]HH:MM:SS (or MM) in whole minutes."""
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+)(?::(\d+))?", text)
    if match is None:
        raise UserError(f"--time {text!r}: not [D-]HH:MM:SS")
    days, hours, minutes, seconds = (int(part) if part else 0 for part in match.groups())
    if match.group(4) is None and match.group(2) is not None:  # HH:MM means MM:SS in SLURM
        hours, minutes, seconds = 0, hours, minutes
    return max(1, days * 1440 + hours * 60 + minutes + (seconds + 59) // 60)


def parse_mem_gb(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)B?", text.upper())
    if match is None:
        raise UserError(f"--mem {text!r}: not a size such as 64G or 500M")
    number, unit = float(match.group(1)), match.group(2) or "M"  # SLURM's default unit is megabytes
    return number * {"K": 2**-20, "M": 2**-10, "G": 1, "T": 2**10}[unit]


def check_task_counts(resources: Resources) -> None:
    """A job of at least one task: before its world size is used for anything."""
    if resources.gpus_per_node == 0 and resources.tasks_per_node is None:
        raise UserError("--gpus-per-node 0: say how many CPU ranks per node with --tasks-per-node T")
    if resources.nodes < 1 or resources.tasks_per_node_or_gpus < 1:
        raise UserError(f"--nodes {resources.nodes} x {resources.tasks_per_node_or_gpus} tasks: nothing to run")


def check_resources(resources: Resources) -> None:
    """Refuse what SLURM cannot run, before anything is submitted: a partition that does not exist, more GPUs per
    node than its nodes have, CPU tasks without a count."""
    check_task_counts(resources)
    if shutil.which("sinfo") is None:
        raise UserError("sinfo not found: no SLURM on this machine (tools/slurm/start-local.sh starts a local one)")
    partitions = sinfo(["-o", "%P"])
    names = [name.rstrip("*") for name in partitions]
    partition = resources.partition or next((n.rstrip("*") for n in partitions if n.endswith("*")), None)
    if resources.partition is not None and resources.partition not in names:
        raise UserError(f"--partition {resources.partition}: no such partition (this cluster has: {', '.join(names)})")
    if resources.gpus_per_node > 0:
        gres = sinfo(["-p", partition, "-o", "%G"]) if partition else sinfo(["-o", "%G"])
        most = max((int(m.group(1)) for g in gres if (m := re.search(r"gpu(?::[^:,()]+)?:(\d+)", g))), default=0)
        if resources.gpus_per_node > most:
            raise UserError(
                f"--gpus-per-node {resources.gpus_per_node}: the nodes of partition {partition} have at most "
                f"{most} GPUs (gres {', '.join(sorted(set(gres)))})"
            )


def sinfo(arguments: list[str]) -> list[str]:
    result = subprocess.run(["sinfo", "-h", *arguments], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise UserError(f"sinfo {' '.join(arguments)}: {result.stderr.strip()}")
    return sorted(set(result.stdout.split()))


def build_executor(folder: Path, resources: Resources, name: str) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    parameters = dict(
        name=name,
        nodes=resources.nodes,
        tasks_per_node=resources.tasks_per_node_or_gpus,
        timeout_min=parse_time(resources.time),
        slurm_signal_delay_s=resources.signal_delay_s,
        slurm_additional_parameters={"requeue": True, **resources.extra},
    )
    if resources.gpus_per_node:
        parameters["gpus_per_node"] = resources.gpus_per_node
    optional = {
        "cpus_per_task": resources.cpus_per_task,
        "slurm_partition": resources.partition,
        "slurm_account": resources.account,
        "slurm_qos": resources.qos,
        "slurm_constraint": resources.constraint,
        "mem_gb": parse_mem_gb(resources.mem) if resources.mem else None,
    }
    parameters.update({key: value for key, value in optional.items() if value is not None})
    executor.update_parameters(**parameters)
    return executor


@dataclass
class Submission:
    """One training run of a submission: its config, overrides and run directory."""

    config: Config
    config_path: Path
    overrides: list[str]

    @property
    def run_dir(self) -> Path:
        return self.config.train.run_dir


def plan(config_path: str, overrides: list[str], resources: Resources, array: str | None, array_file: str | None):
    """The runs to submit, each config loaded and validated for the job's world size before anything is
    submitted. ``array``: KEY=V1,V2,... (``seeds=1,2,3`` is train.seed), one run per value, named
    RUN_NAME-KEYVALUE; ``array_file``: one config path per line, one run each."""
    check_task_counts(resources)
    world_size = resources.tasks

    def load(path: str, extra: list[str]) -> Submission:
        absolute = Path(path).resolve()
        config = load_config(absolute, [*overrides, *extra], world_size=world_size)
        output_dir = Path(config.train.output_dir).resolve()  # the tasks may start elsewhere on the shared disk
        pinned = [f"train.output_dir={output_dir}", f"train.run_name={config.train.run_name}"]
        if config.data.root and not Path(config.data.root).is_absolute():
            pinned.append(f"data.root={Path(config.data.root).resolve()}")
        config = load_config(absolute, [*overrides, *extra, *pinned], world_size=world_size)
        return Submission(config, absolute, [*overrides, *extra, *pinned])

    if array_file is not None:
        lines = [line.strip() for line in read_text(array_file, "--array-file").splitlines()]
        paths = [line for line in lines if line and not line.startswith("#")]
        if not paths:
            raise UserError(f"--array-file {array_file}: lists no config")
        return [load(path, []) for path in paths]
    if array is None:
        return [load(config_path, [])]
    key, _, values = array.partition("=")
    key = {"seeds": "train.seed", "seed": "train.seed"}.get(key, key)
    if not values:
        raise UserError(f"--array {array!r}: not KEY=V1,V2,... (example: seeds=1,2,3)")
    base = load(config_path, []).config.train.run_name
    label = key.rsplit(".", 1)[-1]
    return [
        load(config_path, [f"{key}={value}", f"train.run_name={base}-{label}{value}"]) for value in values.split(",")
    ]


def submit(submissions: list[Submission], resources: Resources, *, dry_run: bool) -> list[submitit.Job] | str:
    """Submit one job per run (a SLURM job array when there are several), after ``check_resources``; with
    ``dry_run``, return the sbatch script submitit would write instead, without asking the cluster anything."""
    if not dry_run:
        check_resources(resources)
    first = submissions[0]
    folder = first.run_dir.parent / "submitit" if len(submissions) > 1 else first.run_dir / "submitit"
    name = f"residual-{first.config.train.run_name}"
    executor = build_executor(folder, resources, name)
    if dry_run:
        slurm = executor._executor  # the SlurmExecutor: its script text is what sbatch would get
        return slurm._make_submission_file_text(slurm._submitit_command_str, "DRY-RUN")
    tasks = [TrainTask(str(run.config_path), run.overrides) for run in submissions]
    if len(tasks) == 1:
        jobs = [executor.submit(tasks[0])]
    else:
        with executor.batch():
            jobs = [executor.submit(task) for task in tasks]
    for run, job in zip(submissions, jobs, strict=True):  # what `residual jobs` reads
        run.run_dir.mkdir(parents=True, exist_ok=True)
        with open(run.run_dir / JOB_IDS, "a") as file:
            file.write(f"{job.job_id} {job.paths.stdout.parent}\n")
    return jobs
