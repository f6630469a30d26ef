"""A stop signal, as SLURM sends it before preemption, during a real training process."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.checkpoint import latest_checkpoint, load_checkpoint
from trainer.faults import REQUEUE_EXIT_CODE

ROOT = Path(__file__).parents[2]


def wait_for_progress(metrics: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and metrics.read_text().strip():
            return
        time.sleep(0.2)
    raise AssertionError(f"no training progress within {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGUSR1, signal.SIGTERM])
def test_stop_signal_checkpoints_and_exits_for_requeue(tmp_path, quickstart_on_cifar, stop_signal):
    command = [
        sys.executable,
        "-m",
        "trainer",
        *quickstart_on_cifar,
        "data.batch_size=20",
        "train.iterations=10000",
        "log.every=2",
        "eval.every=5000",
        "checkpoint.every=5000",
        f"train.output_dir={tmp_path}",
        "eval.batch_size=100",
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_progress(tmp_path / "quickstart/metrics.jsonl", process)
    process.send_signal(stop_signal)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == REQUEUE_EXIT_CODE, stderr[-2000:]
    assert f"stopped by {stop_signal.name} at iteration" in stderr
    checkpoint = load_checkpoint(latest_checkpoint(tmp_path / "quickstart"))
    stopped_at = checkpoint["iteration"]
    assert 2 <= stopped_at < 10000

    more = f"train.iterations={stopped_at + 4}"  # the later of two values of a key wins
    resumed = subprocess.run([*command, more], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {latest_checkpoint(tmp_path / 'quickstart').parent}" in resumed.stderr
    lines = (tmp_path / "quickstart/metrics.jsonl").read_text().splitlines()
    iterations = [json.loads(line)["iteration"] for line in lines if '"train"' in line]
    assert iterations == sorted(set(iterations)) and iterations[-1] > stopped_at  # continued, nothing twice
    assert load_checkpoint(latest_checkpoint(tmp_path / "quickstart"))["iteration"] == stopped_at + 4
