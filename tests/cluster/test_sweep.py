"""`residual sweep` with a local Ray on 127.0.0.1: ASHA over the learning rate of the quickstart config."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from checkout import RESIDUAL, ROOT

from cluster.sweep import load_sweep
from data_pipeline.errors import UserError
from trainer.config import load_config


def write_sweep(tmp_path: Path, cifar_root: Path, iterations: int, every: int = 5) -> Path:
    """4 trials of ``iterations`` each, evaluated and checkpointed every ``every``."""
    sweep = {
        "base": "configs/quickstart.yaml",
        "overrides": [
            f"train.iterations={iterations}",
            f"eval.every={every}",
            f"checkpoint.every={every}",
            "data.workers=0",
            "data.batch_size=32",
            f"data.root={cifar_root}",
            "data.synthesize=null",
            "eval.batch_size=50",
        ],
        "space": {"optim.lr": {"grid": [0.001, 0.01, 0.1, 0.4]}},
        "scheduler": "asha",
        "grace_period": 1,
        "reduction_factor": 2,
        "resources": {"cpu": 1},
        "output_dir": str(tmp_path),
        "name": "lr",
    }
    path = tmp_path / "lr.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def trial_rows(output: str) -> list[list[str]]:
    return [line.split() for line in output.splitlines() if line.startswith("run_trial_")]


@pytest.mark.slow
@pytest.mark.ray
def test_an_asha_sweep_stops_the_worst_trials_and_writes_the_best_config(tmp_path, cifar_root):
    start = time.monotonic()
    result = subprocess.run(
        [RESIDUAL, "sweep", str(write_sweep(tmp_path, cifar_root, 20))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = trial_rows(result.stdout)
    assert len(rows) == 4 and all(row[2] != "failed" for row in rows), result.stdout
    evaluations = [int(row[3]) for row in rows]
    assert max(evaluations) == 4 and min(evaluations) < 4, result.stdout  # ASHA stopped some early
    best = load_config(tmp_path / "lr/best.yaml")
    assert best.optim.lr == float(rows[0][1]) and best.train.run_name == "lr-best"
    assert len(list((tmp_path / "lr/runs").glob("run_trial_*/tensorboard"))) == 4  # every trial's curves, one place
    processes = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True).stdout.splitlines()
    alive = [line for line in processes if not line.lstrip().startswith("Z")]  # a zombie awaits reaping, holds nothing
    assert not [line for line in alive if "ray::" in line], processes
    print(f"4-trial ASHA sweep: {time.monotonic() - start:.1f} s")


@pytest.mark.slow
@pytest.mark.ray
def test_an_interrupted_sweep_resumes_to_completion(tmp_path, cifar_root):
    """A sweep's driver killed mid-trial, then `residual sweep --resume`: every trial ends once, resumed from its
    checkpoint. About 50 s: Ray's start twice (about 10 s each here) and the trials' own processes."""
    sweep = write_sweep(tmp_path, cifar_root, 40)
    driver = subprocess.Popen(
        [RESIDUAL, "sweep", str(sweep)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    metrics = tmp_path / "lr/runs"
    deadline = time.monotonic() + 180
    while not any(metrics.glob("run_trial_*/checkpoints/ckpt-*")) and time.monotonic() < deadline:
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C, as a terminal sends it: Tune saves the experiment and stops
    interrupted, errors = driver.communicate(timeout=180)
    assert "unfinished (interrupted)" in interrupted, interrupted
    assert "Traceback" not in errors and "KeyboardInterrupt" not in errors, errors[-3000:]

    result = subprocess.run(
        [RESIDUAL, "sweep", str(sweep), "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = trial_rows(result.stdout)
    assert len(rows) == 4 and all(row[2] != "failed" for row in rows) and "unfinished" not in result.stdout
    assert max(int(row[3]) for row in rows) == 8 and (tmp_path / "lr/best.yaml").exists()


def test_bad_sweeps_are_refused_with_the_key(tmp_path):
    def sweep(**fields) -> Path:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({"base": "configs/quickstart.yaml", **fields}))
        return path

    lr = {"optim.lr": {"grid": [0.1]}}
    for fields, message in (
        ({"space": {}}, "space: empty"),
        ({"space": {"optim.lrr": {"grid": [0.1]}}}, "space.optim.lrr: .*lrr"),
        ({"space": {"optim.lr": {"normal": [0, 1]}}}, "space.optim.lr: one of grid, choice, loguniform, uniform"),
        ({"space": {"optim.lr": {"loguniform": [0.1]}}}, r"space.optim.lr.loguniform: \[0.1\]"),
        ({"space": lr, "scheduler": "hyperband"}, "scheduler='hyperband': must be one of asha, fifo"),
        ({"space": lr, "metric": "loss"}, "metric='loss': must be one of top1, top5"),
    ):
        with pytest.raises(UserError, match=message):
            load_sweep(sweep(**fields))


@pytest.mark.slow
@pytest.mark.ray
def test_a_sweep_attaches_to_a_running_ray_cluster(tmp_path, cifar_root):
    """--address: the trials run on an existing Ray head, started here on 127.0.0.1. About 32 s: a Ray head of its
    own (`ray start`), then the sweep's trials on it."""
    ray = str(Path(sys.executable).parent / "ray")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Loopback only; no token authentication (Ray 2.60's `ray start --head` turns it on and keeps the token in
    # ~/.ray, which a test should not touch); a short temp dir below (socket paths have a length limit).
    environ = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    head = [
        ray,
        "start",
        "--head",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--include-dashboard=false",
        "--num-cpus=2",
        f"--temp-dir={tempfile.mkdtemp(prefix='ray', dir='/tmp')}",
    ]
    subprocess.run(head, check=True, capture_output=True, env=environ, timeout=120)
    try:
        sweep = write_sweep(tmp_path, cifar_root, 10)
        result = subprocess.run(
            [RESIDUAL, "sweep", str(sweep), "--address", f"127.0.0.1:{port}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            env=environ,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert len(trial_rows(result.stdout)) == 4 and (tmp_path / "lr/best.yaml").exists()
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120, env=environ)
