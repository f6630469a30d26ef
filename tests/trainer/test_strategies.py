"""DDP and FSDP2 on two gloo ranks under torchrun: they follow one process, resume bit for bit after kill -9,
resume into each other and into another world size, and come back under torchrun --max-restarts."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from checkout import ROOT

from trainer.eval.weights import read_weights
from trainer.training.checkpoint.files import latest_checkpoint, list_checkpoints, read_train_state
from trainer.training.faults import REQUEUE_EXIT_CODE

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def trainer_command(ranks: int, *, max_restarts: int = 0) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "trainer"]
    restarts = [f"--max-restarts={max_restarts}"] if max_restarts else []
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        *restarts,
        "-m",
        "trainer",
    ]


def run_trainer(ranks: int, args: list[str]) -> subprocess.CompletedProcess:
    # One thread per process whatever the ranks' share of the cores: kernels that split work over threads round
    # differently, and the single process must round as each rank does.
    command = [*trainer_command(ranks), *args, "train.threads=1"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == kind]


def losses(run_dir: Path) -> dict[int, float]:
    return {record["iteration"]: record["loss"] for record in records(run_dir, "train")}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return read_weights(latest_checkpoint(run_dir)).state_dict


@pytest.fixture
def short(quickstart_on_cifar, tmp_path) -> list[str]:
    return [
        *quickstart_on_cifar,
        "data.batch_size=40",
        "log.every=1",
        "eval.every=10",
        "train.precision=fp32",
        "eval.batch_size=20",
        f"train.output_dir={tmp_path}",
    ]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_follow_one_process_with_the_same_global_batch(tmp_path, short, strategy):
    """One process accumulating two micro-batches of 20 computes what two ranks of 20 do: the same BN batches,
    the same mean gradient. The losses of 10 steps agree to float rounding."""
    run_trainer(1, [*short, "train.iterations=10", "train.accumulation=2", "train.run_name=one"])
    two = run_trainer(2, [*short, "train.iterations=10", f"dist.strategy={strategy}", "train.run_name=two"])
    assert f"{strategy}: global batch 40 (20 per rank x 2 ranks x 1 accumulation)" in two.stderr
    one, other = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == 10 and one.keys() == other.keys()
    assert [other[i] for i in one] == pytest.approx([one[i] for i in one], rel=1e-4)
    assert records(tmp_path / "two", "eval")[-1]["count"] == 100  # every test image once over both ranks
    sharded = strategy == "fsdp"
    assert [path.is_dir() for path in list_checkpoints(tmp_path / "two")] == [sharded]


@pytest.mark.parametrize("mixed_precision", ["policy", "autocast"])
def test_fsdp_in_bf16_follows_one_process(tmp_path, short, mixed_precision):
    """bf16 under FSDP2: parameters gathered in bf16 with BatchNorm in fp32 groups (policy), or fp32 gathers under
    autocast; either follows one bf16 process closely (both round the convolutions' weights to bf16)."""
    bf16 = [*short, "train.iterations=8", "train.precision=bf16"]
    run_trainer(1, [*bf16, "train.accumulation=2", "train.run_name=one"])
    fsdp = [f"dist.fsdp_mixed_precision={mixed_precision}", "dist.strategy=fsdp", "train.run_name=fsdp"]
    run_trainer(2, [*bf16, *fsdp])
    one, other = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    assert [other[i] for i in one] == pytest.approx([one[i] for i in one], rel=2e-2)
    assert records(tmp_path / "fsdp", "eval")[-1]["count"] == 100


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_kill_9_and_resume_is_bit_exact(tmp_path, short, strategy):
    """2N steps straight == N steps, kill -9 of the whole launch, resume, N more: weights and logs bit for bit. About
    30-40 s: three two-rank torchrun launches (FSDP2's per-block collectives over gloo are the slower)."""
    args = [*short, "train.iterations=24", "checkpoint.every=12", f"dist.strategy={strategy}"]
    run_trainer(2, [*args, "train.run_name=straight"])

    process = subprocess.Popen(
        [*trainer_command(2), *args, "train.run_name=killed"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_until(lambda: list_checkpoints(tmp_path / "killed"), process)
    assert process.poll() is None, "the run finished before it could be killed"
    kill_tree(process.pid)
    process.wait()
    assert [int(path.name[5:14]) for path in list_checkpoints(tmp_path / "killed")] == [12]
    resumed = run_trainer(2, [*args, "train.run_name=killed"])
    assert f"{list_checkpoints(tmp_path / 'killed')[0]} at iteration 12" in resumed.stderr, resumed.stderr[-3000:]

    straight, killed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert all(torch.equal(straight[name], killed[name]) for name in straight)
    assert losses(tmp_path / "straight") == losses(tmp_path / "killed")


def test_ema_and_lars_under_fsdp_follow_one_process(tmp_path, short):
    """The EMA kept on each rank's shards: two FSDP2 ranks follow one process accumulating two micro-batches, to 6
    steps and after a resume of each (DCP and file) to 10. LARS's trust
    ratios from the shards' norms: 3 steps agree (the norms are summed in another order, 1e-8 apart at the first
    step, which the training's own sensitivity grows about tenfold a step). BN's running statistics are left out:
    one process updates them once per micro-batch (so the EMA's evaluations are not compared, only made). About
    65 s: eight launches, half of them two-rank torchrun under FSDP2."""
    common = [*short, "ema.decay=0.5", "ema.every=2", "eval.weights=both", "eval.every=6", "checkpoint.every=6"]
    lars = ["optim.name=lars", "optim.lr=0.2", "optim.no_decay_bn_bias=true", "train.iterations=3"]
    for name, keys, tolerance in [
        ("sgd", ["train.iterations=6"], 1e-6),
        ("sgd", ["train.iterations=10"], 1e-6),
        ("lars", lars, 1e-4),
    ]:
        run_trainer(1, [*common, *keys, "train.accumulation=2", f"train.run_name={name}-one"])
        run_trainer(2, [*common, *keys, "dist.strategy=fsdp", f"train.run_name={name}-fsdp"])
        one, fsdp = (
            read_weights(latest_checkpoint(tmp_path / f"{name}-{kind}"), "ema").state_dict for kind in ("one", "fsdp")
        )
        raw = read_weights(latest_checkpoint(tmp_path / f"{name}-one")).state_dict
        assert not torch.equal(one["conv1.weight"], raw["conv1.weight"])  # an average, not the weights
        for key in (key for key in one if "running_" not in key and one[key].is_floating_point()):
            torch.testing.assert_close(fsdp[key], one[key], rtol=10 * tolerance, atol=tolerance, msg=key)
    evaluated = [r["count"] for r in records(tmp_path / "sgd-fsdp", "eval") if r["protocol"] == "center-ema"]
    assert evaluated == [100, 100]


def test_the_recipe_pieces_under_ddp_resume_bit_exact_after_kill_9(tmp_path, short):
    """Two DDP ranks with Mixup/CutMix (each rank its own draws), label smoothing, LARS, a cosine schedule over the
    whole run and the EMA: 24 steps straight equal 12, kill -9, a new start, 12 more: weights, average and losses
    bit for bit. About 33 s: three two-rank torchrun launches."""
    args = [
        *short,
        "loss.mixup_alpha=0.2",
        "loss.cutmix_alpha=1.0",
        "loss.label_smoothing=0.1",
        "optim.name=lars",
        "optim.lr=0.5",
        "schedule.decay=cosine",
        "ema.decay=0.9",
        "eval.weights=both",
        "train.iterations=24",
        "checkpoint.every=12",
        "dist.strategy=ddp",
    ]
    run_trainer(2, [*args, "train.run_name=straight"])
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    process = subprocess.Popen(
        [*trainer_command(2), *args, "train.run_name=killed"], cwd=ROOT, **quiet, start_new_session=True
    )
    wait_until(lambda: list_checkpoints(tmp_path / "killed"), process)
    assert process.poll() is None, "the run finished before it could be killed"
    kill_tree(process.pid)
    process.wait()
    resumed = run_trainer(2, [*args, "train.run_name=killed"])
    assert "at iteration 12" in resumed.stderr, resumed.stderr[-3000:]
    for which in ("raw", "ema"):
        straight, killed = (
            read_weights(latest_checkpoint(tmp_path / name), which).state_dict for name in ("straight", "killed")
        )
        assert all(torch.equal(straight[name], killed[name]) for name in straight), which
    assert losses(tmp_path / "straight") == losses(tmp_path / "killed")


def test_checkpoints_resume_across_strategies_and_world_sizes(tmp_path, short):
    """FSDP2 on 2 ranks -> 1 process, and 1 process -> FSDP2 on 2 ranks, and DDP on 2 -> FSDP2 on 2: each second
    half follows the straight single-process run (accumulating, so that BN sees the same batches). About 70 s: seven
    launches, four of them torchrun with two gloo ranks, each paying torch's import and the process group."""
    steps = ["checkpoint.every=6", "train.accumulation=1"]
    one = [*short, *steps, "train.accumulation=2"]
    run_trainer(1, [*one, "train.iterations=12", "train.run_name=straight"])
    reference = losses(tmp_path / "straight")

    for name, first, second in (
        ("fsdp-to-one", (2, ["dist.strategy=fsdp"]), (1, ["train.accumulation=2"])),
        ("one-to-fsdp", (1, ["train.accumulation=2"]), (2, ["dist.strategy=fsdp"])),
        ("ddp-to-fsdp", (2, ["dist.strategy=ddp"]), (2, ["dist.strategy=fsdp"])),
    ):
        (ranks_a, keys_a), (ranks_b, keys_b) = first, second
        run_trainer(ranks_a, [*short, *steps, *keys_a, "train.iterations=6", f"train.run_name={name}"])
        result = run_trainer(ranks_b, [*short, *steps, *keys_b, "train.iterations=12", f"train.run_name={name}"])
        assert "at iteration 6" in result.stderr, name
        resumed = losses(tmp_path / name)
        assert [resumed[i] for i in range(7, 13)] == pytest.approx([reference[i] for i in range(7, 13)], rel=1e-4)


def test_a_rank_killed_under_max_restarts_comes_back_from_the_checkpoint(tmp_path, short):
    args = [*short, "train.iterations=60", "checkpoint.every=10", "train.run_name=restarts"]
    process = subprocess.Popen(
        [*trainer_command(2, max_restarts=1), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_until(lambda: list_checkpoints(tmp_path / "restarts"), process)
        worker = rank_process(process.pid, rank=1)
        os.kill(worker, signal.SIGKILL)
        _, stderr = process.communicate(timeout=300)
    finally:
        kill_tree(process.pid)
    assert process.returncode == 0, stderr[-12000:]
    assert "resumed from" in stderr
    assert read_train_state(latest_checkpoint(tmp_path / "restarts"))["iteration"] == 60
    iterations = [record["iteration"] for record in records(tmp_path / "restarts", "train")]
    assert iterations == list(range(1, 61))  # continued, no step logged twice


def test_sigusr1_makes_fsdp_ranks_checkpoint_and_exit_for_requeue(tmp_path, short):
    """SLURM signals every task: each FSDP2 rank finishes its step, the sharded checkpoint is written, and the
    ranks exit with the requeue code; a new start resumes from that checkpoint."""
    args = [*short, "train.iterations=100000", "dist.strategy=fsdp", "train.run_name=usr1"]
    process = subprocess.Popen(
        [*trainer_command(2), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: (tmp_path / "usr1/metrics.jsonl").exists(), process)
        workers = [rank_process(process.pid, rank=rank) for rank in (0, 1)]
        os.kill(workers[1], signal.SIGUSR1)  # one rank's signal is enough: the ranks agree at the next step
        _, stderr = process.communicate(timeout=120)
    finally:
        kill_tree(process.pid)
    assert f"exitcode  : {REQUEUE_EXIT_CODE}" in stderr, stderr[-3000:]
    (checkpoint,) = list_checkpoints(tmp_path / "usr1")
    assert checkpoint.is_dir() and (checkpoint / ".metadata").is_file()
    stopped_at = read_train_state(checkpoint)["iteration"]
    resumed = run_trainer(2, [*args, f"train.iterations={stopped_at + 2}"])
    assert f"at iteration {stopped_at}" in resumed.stderr


def test_sigterm_to_torchrun_checkpoints_and_the_ranks_say_so(tmp_path, short):
    """torchrun passes SIGTERM on to its ranks, which write a checkpoint and exit 75; torchrun itself then exits 1
    with its own SignalException (docs/operators.md's catalogue says why that stays)."""
    args = [*short, "train.iterations=100000", "train.run_name=term"]
    process = subprocess.Popen(
        [*trainer_command(2), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: (tmp_path / "term/metrics.jsonl").exists(), process)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        kill_tree(process.pid)
    assert process.returncode == 1 and stderr.count("residual: stopped by SIGTERM at iteration") == 1, stderr[-3000:]
    (checkpoint,) = list_checkpoints(tmp_path / "term")
    assert read_train_state(checkpoint)["iteration"] > 0


def descendants(root: int) -> list[int]:
    """Every living process started by ``root``, directly or not (torchrun's workers have sessions of their own)."""
    children: dict[int, list[int]] = {}
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        children.setdefault(parent, []).append(pid)
    found, pending = [], [root]
    while pending:
        kids = children.get(pending.pop(), [])
        found.extend(kids)
        pending.extend(kids)
    return sorted(found)


def kill_tree(root: int) -> None:
    """kill -9 of a launch: the agent and every worker, at once."""
    for pid in [root, *descendants(root)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def rank_process(launcher: int, *, rank: int) -> int:
    """The pid of the training worker of ``rank`` under a torchrun agent: the first process whose environment
    says RANK=rank (the worker's own children inherit it)."""
    for pid in descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no rank {rank} worker under {launcher}")


def wait_until(condition, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout} s (exit code {process.poll()})")
