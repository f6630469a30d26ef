"""`residual submit` against the real one-node SLURM cluster of tools/slurm/start-local.sh: CPU ranks with gloo."""

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from checkout import RESIDUAL, ROOT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.training.checkpoint.files import latest_checkpoint, read_train_state

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def submit(*args: str) -> list[str]:
    result = subprocess.run([RESIDUAL, "submit", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return re.findall(r"submitted job (\S+):", result.stdout)


def sacct(job: str) -> str:
    result = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job], capture_output=True, text=True)
    return result.stdout.strip().split("\n")[0].split(" ")[0]


def wait_for_jobs(jobs: list[str], timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [sacct(job) for job in jobs]
        if all(state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY") for state in states):
            assert states == ["COMPLETED"] * len(jobs), states
            return
        time.sleep(1)
    raise AssertionError(f"jobs {jobs} not done in {timeout} s: {[sacct(job) for job in jobs]}")


def train_iterations(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record["iteration"] for record in map(json.loads, lines) if record["kind"] == "train"]


@pytest.fixture
def job_args(quickstart_on_cifar, tmp_path) -> list[str]:
    return [
        *quickstart_on_cifar,
        "data.batch_size=32",
        "log.every=10",
        "eval.batch_size=50",
        f"train.output_dir={tmp_path}",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=00:30:00",
    ]


def test_two_cpu_ranks_train_as_one_job(slurm, job_args, tmp_path):
    start = time.monotonic()
    (job,) = submit(*job_args, "train.iterations=40", "checkpoint.every=20", "--tasks-per-node=2")
    wait_for_jobs([job])
    turnaround = time.monotonic() - start
    run_dir = tmp_path / "quickstart"
    assert read_train_state(latest_checkpoint(run_dir))["iteration"] == 40
    assert train_iterations(run_dir) == list(range(10, 41, 10))
    log = (run_dir / "submitit" / job / f"{job}_0_log.err").read_text()
    assert "global batch 32 (16 per rank x 2 ranks x 1 accumulation)" in log
    assert "cores: 1 for this rank (SLURM_CPUS_PER_TASK) -> 1 torch threads, 0 loader workers" in log
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    jobs = subprocess.run([RESIDUAL, "jobs", str(tmp_path)], capture_output=True, text=True, timeout=60).stdout
    assert re.search(rf"{job}\s+COMPLETED\s+\S+\s+40\s+\d+\.\d\d\s+{run_dir}", jobs), jobs
    print(f"2-task job of 40 steps: {turnaround:.1f} s from submission to COMPLETED")


def test_a_preempted_job_requeues_and_resumes_to_the_same_step_count(slurm, job_args, tmp_path):
    args = [*job_args, "train.iterations=120", "checkpoint.every=20", "--tasks-per-node=2"]
    (job,) = submit(*args)
    run_dir = tmp_path / "quickstart"
    deadline = time.monotonic() + 300
    while latest_checkpoint(run_dir) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert latest_checkpoint(run_dir) is not None, "no checkpoint before the preemption"
    signalled = time.monotonic()
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # what SLURM sends before the time limit
    wait_for_jobs([job])
    print(f"preempted job: {time.monotonic() - signalled:.1f} s from the signal to COMPLETED")

    show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert "Restarts=1" in show, show
    logs = "".join(path.read_text() for path in (run_dir / "submitit" / job).glob("*_0_log.err"))
    stopped = int(re.search(r"stopped by SIGUSR2 at iteration (\d+)", logs).group(1))
    assert f"at iteration {stopped}" in logs.split("resumed from", 1)[1]
    assert read_train_state(latest_checkpoint(run_dir))["iteration"] == 120  # as an uninterrupted job ends
    assert train_iterations(run_dir) == list(range(10, 121, 10))  # every point once
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == list(range(10, 121, 10))


def test_a_seed_array_runs_three_seeds(slurm, job_args, tmp_path):
    jobs = submit(*job_args, "train.iterations=20", "--tasks-per-node=1", "--array=seeds=1,2,3")
    assert len(jobs) == 3 and len({job.split("_")[0] for job in jobs}) == 1  # one array job
    wait_for_jobs(jobs)
    finals = []
    for seed in (1, 2, 3):
        state = read_train_state(latest_checkpoint(tmp_path / f"quickstart-seed{seed}"))
        assert state["iteration"] == 20 and state["config"]["train"]["seed"] == seed
        finals.append(train_iterations(tmp_path / f"quickstart-seed{seed}"))
    assert finals == [[10, 20]] * 3


def test_bad_requests_are_refused_before_submission(slurm, job_args, tmp_path):
    for extra, message in (
        (["--tasks-per-node=1", "--partition=nope"], "--partition nope: no such partition (this cluster has: debug)"),
        (["--gpus-per-node=1"], "--gpus-per-node 1: the nodes of partition debug have at most 0 GPUs"),
        (["--tasks-per-node=3"], "data.batch_size=32: must be divisible by the world size x train.accumulation"),
    ):
        command = [RESIDUAL, "submit", *job_args, "train.iterations=5", *extra]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "quickstart").exists()


def test_stop_local_ends_running_jobs_and_start_local_begins_clean(slurm, tmp_path):
    """A job in flight: stop-local cancels it and waits for its step; the next start holds no stale job."""
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nsleep 613\n")
    submitted = subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", str(script)], capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    deadline = time.monotonic() + 60
    while not subprocess.run(["pgrep", "-f", "sleep 613"], capture_output=True).stdout:
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.5)
    stopped = subprocess.run(["bash", "tools/slurm/stop-local.sh"], cwd=ROOT, capture_output=True, text=True)
    assert stopped.returncode == 0 and "cancelling jobs" in stopped.stderr, stopped.stderr
    found = subprocess.run(["pgrep", "-f", "sleep 613|slurmstepd"], capture_output=True, text=True).stdout.split()
    alive = [pid for pid in found if not re.search(r"\) Z ", Path(f"/proc/{pid}/stat").read_text())]  # no zombie
    assert not alive, alive
    started = subprocess.run(["bash", "tools/slurm/start-local.sh"], cwd=ROOT, capture_output=True, text=True)
    assert started.returncode == 0, started.stderr[-2000:]
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip() == ""
    assert subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True).stdout.strip() == "idle"
