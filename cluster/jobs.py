"""``residual jobs``: the project's SLURM jobs with their state (sacct, squeue), elapsed time, and the last step
and top-1 their run directories hold."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from cluster.slurm import JOB_IDS
from trainer.training.run_log import METRICS_FILE, read_metrics


def find_runs(root: Path) -> list[Path]:
    """Run directories below ``root`` (or ``root`` itself) that SLURM jobs were submitted for."""
    return sorted(path.parent for path in root.rglob(JOB_IDS))


def job_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """State and elapsed time per job id, from sacct (finished and running jobs), squeue for what sacct lacks."""
    states: dict[str, tuple[str, str]] = {}
    if job_ids and shutil.which("sacct"):
        result = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-o", "JobID,State,Elapsed", "-j", ",".join(job_ids)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        for line in result.stdout.splitlines():
            job, state, elapsed = line.split("|")
            states[job] = (state.split()[0], elapsed)
    missing = [job for job in job_ids if job not in states]
    if missing and shutil.which("squeue"):
        result = subprocess.run(
            ["squeue", "-h", "-o", "%i|%T|%M", "-j", ",".join(missing)], capture_output=True, text=True, timeout=60
        )
        for line in result.stdout.splitlines():
            job, state, elapsed = line.split("|")
            states[job] = (state, elapsed)
    return states


def last_progress(run_dir: Path) -> tuple[int | None, float | None]:
    """The last logged iteration and the last evaluation's top-1."""
    records = read_metrics(run_dir / METRICS_FILE)
    iteration = max((r["iteration"] for r in records), default=None)
    evals = [r for r in records if r["kind"] == "eval"]
    return iteration, (evals[-1]["top1"] if evals else None)


def jobs_table(root: Path) -> list[dict[str, object]]:
    rows = []
    for run_dir in find_runs(root):
        entries = [line.split(" ", 1) for line in (run_dir / JOB_IDS).read_text().splitlines() if line]
        states = job_states([job for job, _ in entries])
        iteration, top1 = last_progress(run_dir)
        for job, logs in entries:
            state, elapsed = states.get(job, ("UNKNOWN", "-"))
            rows.append(
                dict(job=job, state=state, elapsed=elapsed, run=str(run_dir), step=iteration, top1=top1, logs=logs)
            )
    return rows


def format_jobs(rows: list[dict[str, object]]) -> str:
    lines = [f"{'job':<14}{'state':<12}{'elapsed':>11}{'step':>9}{'top-1':>8}  run directory"]
    for row in rows:
        top1 = f"{100 * row['top1']:.2f}" if row["top1"] is not None else "-"
        step = row["step"] if row["step"] is not None else "-"
        lines.append(f"{row['job']:<14}{row['state']:<12}{row['elapsed']:>11}{step:>9}{top1:>8}  {row['run']}")
    return "\n".join(lines)
