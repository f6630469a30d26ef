"""A stop signal, as SLURM sends it before preemption, or Ctrl-C, during a real training process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checkout import ROOT

from trainer.training.checkpoint.files import latest_checkpoint, load_checkpoint
from trainer.training.faults import INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE

UNTIL_STOPPED = ["train.iterations=10000", "log.every=2", "eval.every=5000"]  # the test stops it; no evaluation


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
        *UNTIL_STOPPED,
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


@pytest.mark.slow
def test_a_preemption_signal_while_the_run_is_built_stops_its_first_step(tmp_path, quickstart_on_cifar):
    """SLURM may signal a job while it lists its data or builds its model: the signal is kept, and the first step
    checkpoints and exits for the requeue (before, the default action killed the process with nothing said)."""
    command = [sys.executable, "-m", "trainer", *quickstart_on_cifar, *UNTIL_STOPPED, f"train.output_dir={tmp_path}"]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:  # the first line train() logs, before the run's parts are built
        if "this machine:" in line:
            process.send_signal(signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == REQUEUE_EXIT_CODE, stderr[-2000:]
    assert "stopped by SIGTERM at iteration" in stderr and "Traceback" not in stderr
    assert load_checkpoint(latest_checkpoint(tmp_path / "quickstart"))["iteration"] <= 2


def ctrl_c(process: subprocess.Popen) -> None:
    """What a terminal does on Ctrl-C: SIGINT to the whole foreground process group (loader processes too)."""
    os.killpg(process.pid, signal.SIGINT)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["tensors", "dataloader", "dali"])
def test_ctrl_c_finishes_the_step_and_writes_a_checkpoint(tmp_path, cifar_root, imagefolder_root, path):
    data = {
        "tensors": [f"data.root={cifar_root}", "data.workers=0"],
        "dataloader": [f"data.root={imagefolder_root}", "data.format=imagefolder", "data.workers=1"],
        "dali": [f"data.root={imagefolder_root}", "data.format=imagefolder", "data.backend=dali", "data.workers=1"],
    }[path]
    command = [
        sys.executable,
        "-m",
        "trainer",
        "configs/quickstart.yaml",
        *data,
        "data.synthesize=null",
        "log.progress=false",
        "data.batch_size=8",
        *UNTIL_STOPPED,
        "checkpoint.every=5000",
        "eval.batch_size=10",
        "model.num_classes=4",
        f"train.output_dir={tmp_path}",
    ]
    if path == "tensors":
        command[-2] = "model.num_classes=10"
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    wait_for_progress(tmp_path / "quickstart/metrics.jsonl", process)
    ctrl_c(process)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == INTERRUPT_EXIT_CODE, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("residual: stopped by Ctrl-C (SIGINT) at iteration ") and "the same command again" in last
    stopped_at = load_checkpoint(latest_checkpoint(tmp_path / "quickstart"))["iteration"]
    assert f"at iteration {stopped_at} of 10000; checkpoint written" in last

    resumed = subprocess.run(
        [*command, f"train.iterations={stopped_at + 2}"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-2000:]


SECOND_CTRL_C = """
import os, signal, time
from trainer.training.faults import StopSignals
with StopSignals() as signals:
    os.kill(os.getpid(), signal.SIGINT)  # the terminal's Ctrl-C
    os.kill(os.getpid(), signal.SIGINT)  # torchrun forwarding the same one: not a second
    time.sleep(0.2)
    print("finishing the step after", signals.name, flush=True)
    time.sleep(1.5)
    os.kill(os.getpid(), signal.SIGINT)  # the person pressing it again
    time.sleep(10)
    print("not stopped")
"""


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_without_a_traceback():
    result = subprocess.run([sys.executable, "-c", SECOND_CTRL_C], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == INTERRUPT_EXIT_CODE
    assert result.stdout == "finishing the step after Ctrl-C (SIGINT)\n"
    assert result.stderr == "residual: stopped at once by a second Ctrl-C; the last checkpoint is kept\n"


@pytest.mark.slow
def test_ctrl_c_under_torchrun_checkpoints_every_rank(tmp_path, quickstart_on_cifar):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--log-dir={tmp_path}/logs"]
    command = [
        *torchrun,
        "-m",
        "trainer",
        *quickstart_on_cifar,
        "data.batch_size=20",
        *UNTIL_STOPPED,
        "checkpoint.every=5000",
        f"train.output_dir={tmp_path}",
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    wait_for_progress(tmp_path / "quickstart/metrics.jsonl", process)
    ctrl_c(process)  # the agent forwards it to the ranks as well: each rank gets it twice, as one
    _, stderr = process.communicate(timeout=120)
    assert "stopped by Ctrl-C (SIGINT) at iteration" in stderr and "second Ctrl-C" not in stderr, stderr[-3000:]
    assert "KeyboardInterrupt" not in stderr, stderr[-3000:]
    stopped_at = load_checkpoint(latest_checkpoint(tmp_path / "quickstart"))["iteration"]
    assert f"at iteration {stopped_at} of 10000; checkpoint written" in stderr


@pytest.mark.slow
@pytest.mark.parametrize("which", ["output_dir", "run_dir"])
def test_a_run_directory_that_is_a_file_is_refused_in_one_line(tmp_path, quickstart_on_cifar, which):
    output_dir = tmp_path / "runs"
    if which == "output_dir":
        output_dir.write_text("notes\n")
        expected = f"residual: error: train.output_dir={output_dir}: {output_dir} is a file, not a folder"
    else:
        output_dir.mkdir()
        (output_dir / "quickstart").write_text("notes\n")
        expected = f"residual: error: train.run_name=quickstart: {output_dir / 'quickstart'} is a file, not a folder"
    result = subprocess.run(
        [sys.executable, "-m", "trainer", *quickstart_on_cifar, f"train.output_dir={output_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert result.stderr.startswith(expected)
    assert sorted(path.name for path in tmp_path.rglob("*")) == (
        ["runs"] if which == "output_dir" else ["quickstart", "runs"]
    )
    assert (output_dir if which == "output_dir" else output_dir / "quickstart").read_text() == "notes\n"


@pytest.mark.slow
def test_a_second_training_on_one_run_directory_is_refused_and_a_dead_ones_lock_is_not(tmp_path, quickstart_on_cifar):
    command = [
        sys.executable,
        "-m",
        "trainer",
        *quickstart_on_cifar,
        "data.batch_size=20",
        *UNTIL_STOPPED,
        "checkpoint.every=4",
        f"train.output_dir={tmp_path}",
    ]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "quickstart"
    try:
        wait_for_progress(run_dir / "metrics.jsonl", first)
        started = {name: (run_dir / name).stat().st_mtime_ns for name in ("config.yaml", "env.json")}
        second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr[-2000:]
        assert second.stderr.startswith(f"residual: error: {run_dir} is in use by another training (host ")
        assert f", pid {first.pid}, since " in second.stderr and "another train.run_name" in second.stderr
        assert first.poll() is None  # the first trains on, alone: one start's records, its files untouched
        assert started == {name: (run_dir / name).stat().st_mtime_ns for name in started}
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        iterations = [json.loads(line)["iteration"] for line in lines if '"train"' in line]
        assert iterations == sorted(set(iterations))
    finally:
        first.kill()  # as kill -9: the lock is left on a dead process
        first.communicate()
    kept = load_checkpoint(latest_checkpoint(run_dir))["iteration"]
    shortened = subprocess.run(
        [*command, f"train.iterations={kept - 1}"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert shortened.returncode == 2, shortened.stderr[-2000:]  # a run cut shorter than its checkpoint: refused
    assert f"train.iterations={kept - 1}: the run's checkpoint is at iteration {kept}, past it" in shortened.stderr
    restarted = subprocess.run(
        [*command, f"train.iterations={kept + 2}"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert "resumed from" in restarted.stderr
