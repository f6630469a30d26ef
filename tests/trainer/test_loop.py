import logging
import math
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from training_runs import imagefolder_run, metrics, small_run

from data_pipeline.errors import UserError
from trainer.machine.distributed import LaunchEnv
from trainer.machine.hardware import usable_cores
from trainer.training.checkpoint.files import latest_checkpoint, list_checkpoints, load_checkpoint
from trainer.training.faults import NonFiniteLoss, NonFiniteState
from trainer.training.loop import train


def scalar_steps(run_dir: Path, tag: str) -> list[int]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


@pytest.mark.slow
def test_a_resumed_run_continues_its_curves(tmp_path, cifar_root):
    """A run that went on past its last checkpoint (to 13) before dying resumes at 10 and logs no point twice."""
    train(small_run(tmp_path, cifar_root, "train.iterations=13", "checkpoint.every=10"), LaunchEnv())
    (tmp_path / "run/checkpoints/ckpt-000000013.pt").unlink()
    time.sleep(1)  # TensorBoard orders event files by name: one process's writers in one second may sort wrongly
    train(small_run(tmp_path, cifar_root, "train.iterations=16"), LaunchEnv())
    assert scalar_steps(tmp_path / "run", "train/loss") == [3, 6, 9, 12, 15]
    assert scalar_steps(tmp_path / "run", "eval/center/top1") == [5, 10, 15, 16]
    assert [r["iteration"] for r in metrics(tmp_path / "run", "train")] == [3, 6, 9, 12, 15]
    train(small_run(tmp_path, cifar_root, "train.iterations=16"), LaunchEnv())  # finished: evaluates, logs nothing
    assert [r["iteration"] for r in metrics(tmp_path / "run", "eval")] == [5, 10, 15, 16]


def test_run_directory_and_logs(tmp_path, cifar_root):
    config = small_run(tmp_path, cifar_root, "train.iterations=12", "checkpoint.keep=1")
    result, run_log = train(config, LaunchEnv())
    run_dir = tmp_path / "run"
    assert (run_dir / "config.yaml").read_text().count("resnet20") == 1
    assert [path.name for path in list_checkpoints(run_dir)] == ["ckpt-000000012.pt"]
    assert [r["iteration"] for r in metrics(run_dir, "train")] == [3, 6, 9, 12]
    assert [r["iteration"] for r in metrics(run_dir, "eval")] == [5, 10, 12]
    assert result.count == 100 and metrics(run_dir, "eval")[-1]["correct1"] == result.correct1
    assert [r["lr"] for r in metrics(run_dir, "train")] == pytest.approx([0.1, 0.1, 0.01, 0.01])
    events = EventAccumulator(str(run_log.tensorboard_dir), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["data/first_augmented_batch", "eval/center/confusion"]
    assert {"custom_scalars__config__", "config/text_summary"} <= set(events.Tags()["tensors"])
    assert set(events.PluginTagToContent("hparams")) == {
        "_hparams_/experiment",
        "_hparams_/session_start_info",
        "_hparams_/session_end_info",
    }
    tags = set(events.Tags()["scalars"])
    assert {f"eval/center/{name}" for name in ("top1", "top5", "top1_error", "top5_error")} <= tags
    assert events.Scalars("hparams/top1")[-1].value == pytest.approx(result.top1)
    layout = layout_pb2.Layout.FromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    assert [category.title for category in layout.category] == ["Training", "Evaluation", "Speed", "Health"]
    assert {"train/loss", "train/top1", "train/top5", "train/lr", "train/grad_norm", "eval/center/top1"} <= tags
    speed = ("images_per_second", "step_seconds_min", "step_seconds_median", "step_seconds_max", "slowest_rank")
    assert {f"speed/{name}" for name in (*speed, "data_wait_fraction", "peak_memory_gb/rank0")} <= tags
    assert [event.step for event in events.Scalars("train/loss")] == [3, 6, 9, 12]
    assert all(event.value > 0 for event in events.Scalars("speed/images_per_second"))
    assert all(0 <= event.value < 1 for event in events.Scalars("speed/data_wait_fraction"))
    assert all(event.value > 0 for event in events.Scalars("train/grad_norm"))


@pytest.mark.slow
def test_the_warmup_ends_on_its_own_windows_whatever_log_every(tmp_path, cifar_root):
    """Sec. 4.2's warm-up reads the training error of its own windows (schedule.warmup_check_every), not the log's:
    two log.every values train the same weights, and so does a run stopped inside a warm-up window and resumed."""
    warm = (
        "eval.every=12",
        "schedule.milestones=[18]",
        "schedule.warmup=constant",
        "schedule.warmup_until_train_error=0.85",
        "schedule.warmup_check_every=4",
    )
    lrs, weights = {}, {}
    for name, every, stops in (("every-1", 1, [12]), ("every-5", 5, [12]), ("resumed", 5, [7, 12])):
        for stop in stops:
            train(
                small_run(tmp_path / name, cifar_root, *warm, f"log.every={every}", f"train.iterations={stop}"),
                LaunchEnv(),
            )
        lrs[name] = {r["iteration"]: r["lr"] for r in metrics(tmp_path / name / "run", "train")}
        weights[name] = load_checkpoint(tmp_path / name / "run/checkpoints/ckpt-000000012.pt")["model"]
    assert lrs["every-1"][9] == 0.01 and lrs["every-1"][10] == 0.1  # iterations 5-8 below 85%: the warm-up's end
    assert all(lrs["every-1"][i] == lr for name in ("every-5", "resumed") for i, lr in lrs[name].items())
    for name in ("every-5", "resumed"):
        assert all(torch.equal(weights[name][key], value) for key, value in weights["every-1"].items()), name


def test_class_count_must_match_the_data(tmp_path, cifar_root):
    with pytest.raises(UserError, match="model.num_classes=100: the data .* has 10 classes"):
        train(small_run(tmp_path, cifar_root, "train.iterations=5", "model.num_classes=100"), LaunchEnv())


@pytest.mark.slow
def test_final_protocol_at_the_end_of_training(tmp_path, imagefolder_root):
    config = imagefolder_run(
        tmp_path, imagefolder_root, "train.iterations=6", "eval.every=3", "eval.final_protocol=tencrop"
    )
    result, run_log = train(config, LaunchEnv())
    evaluations = [(r["iteration"], r["protocol"], r["count"]) for r in metrics(tmp_path / "quickstart", "eval")]
    assert evaluations == [(3, "center", 20), (6, "center", 20), (6, "tencrop", 20)]
    assert metrics(tmp_path / "quickstart", "eval")[-1]["correct1"] == result.correct1
    assert scalar_steps(tmp_path / "quickstart", "eval/tencrop/top1") == [6]
    assert load_checkpoint(latest_checkpoint(tmp_path / "quickstart"))["classes"] == sorted(
        path.name for path in (imagefolder_root / "train").iterdir()
    )
    index = tmp_path / "quickstart" / "index"  # listed once, by rank 0, for every rank and later start
    assert sorted(path.name for path in index.iterdir()) == ["train.npz", "val.npz"]
    assert f"index_dir: {index}" in (tmp_path / "quickstart" / "config.yaml").read_text()


def poison_loss(monkeypatch, call: int, factor: float = float("nan")) -> None:
    """Multiply the loss of the ``call``-th training step by ``factor`` (evaluation computes no loss)."""
    calls = {"count": 0}
    cross_entropy = torch.nn.functional.cross_entropy

    def poisoned(*args, **kwargs):
        calls["count"] += 1
        loss = cross_entropy(*args, **kwargs)
        return loss * factor if calls["count"] == call else loss

    monkeypatch.setattr("torch.nn.functional.cross_entropy", poisoned)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, cifar_root, monkeypatch):
    poison_loss(monkeypatch, 7)
    config = small_run(tmp_path, cifar_root, "train.iterations=12", "checkpoint.every=5")
    with pytest.raises(NonFiniteLoss, match="not finite at iteration 7; .*ckpt-000000005.pt"):
        train(config, LaunchEnv())
    checkpoint = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert checkpoint["iteration"] == 5 and all(torch.isfinite(t).all() for t in checkpoint["model"].values())


def assert_finite(checkpoint: dict) -> None:
    states = [checkpoint["model"], *checkpoint["optimizer"]["state"].values()]
    assert all(t.isfinite().all() for state in states for t in state.values() if t.is_floating_point())


def test_a_diverged_update_is_never_written_as_a_checkpoint(tmp_path, cifar_root):
    """At lr 1e6 a step's loss is finite while its update overflows the weights (and the next forward the BN
    statistics): that state is refused before anything is written, naming the tensor and the intact checkpoint."""
    config = small_run(tmp_path, cifar_root, "train.iterations=12", "checkpoint.every=1", "optim.lr=1e6")
    with pytest.raises(
        NonFiniteState, match=r"iteration \d+ was not written: model\.\S+ holds inf or NaN .*lower optim"
    ):
        train(config, LaunchEnv())
    checkpoints = list_checkpoints(tmp_path / "run")
    assert not list((tmp_path / "run/checkpoints").glob("*.tmp"))
    for path in checkpoints:
        assert_finite(load_checkpoint(path))


def test_a_window_of_skipped_steps_logs_only_the_count(tmp_path, cifar_root, monkeypatch):
    for call in (4, 5, 6):
        poison_loss(monkeypatch, call)
    train(small_run(tmp_path, cifar_root, "train.iterations=6", "train.skip_nonfinite=true"), LaunchEnv())
    last = metrics(tmp_path / "run", "train")[-1]
    assert last["iteration"] == 6 and last["skipped_steps"] == 3 and "loss" not in last


def test_skip_nonfinite_skips_and_counts_the_step(tmp_path, cifar_root, monkeypatch):
    poison_loss(monkeypatch, 2)
    config = small_run(tmp_path, cifar_root, "train.iterations=6", "train.skip_nonfinite=true")
    result, _ = train(config, LaunchEnv())
    records = metrics(tmp_path / "run", "train")
    assert [r["skipped_steps"] for r in records] == [1, 1]
    assert all(math.isfinite(r["loss"]) for r in records) and result.count == 100
    assert load_checkpoint(latest_checkpoint(tmp_path / "run"))["train"]["skipped_steps"] == 1


@pytest.mark.slow
def test_fp16_logs_the_loss_scale_and_counts_overflow_steps(tmp_path, cifar_root, monkeypatch):
    poison_loss(monkeypatch, 2, factor=1e30)  # finite, but its fp16 gradients at scale 2^16 overflow
    overrides = ("train.iterations=6", "train.precision=fp16", "data.batch_size=8")
    train(small_run(tmp_path, cifar_root, *overrides), LaunchEnv())
    records = metrics(tmp_path / "run", "train")
    assert records[0]["loss_scale"] == 32768 and records[0]["scaler_skipped_steps"] == 1
    assert load_checkpoint(latest_checkpoint(tmp_path / "run"))["scaler"]["scale"] == records[-1]["loss_scale"]


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(tmp_path, cifar_root):
    """train.compile=true: torch.compile (inductor, C++ on the CPU) gives the eager run's losses. About 60 s, nearly
    all of it inductor compiling ResNet-20's forward and backward to C++; three steps are what is trained."""
    common = ("train.iterations=3", "train.precision=fp32", "log.every=1", "data.batch_size=16")
    train(small_run(tmp_path / "eager", cifar_root, *common), LaunchEnv())
    train(small_run(tmp_path / "compiled", cifar_root, *common, "train.compile=true"), LaunchEnv())
    eager, compiled = metrics(tmp_path / "eager/run", "train"), metrics(tmp_path / "compiled/run", "train")
    assert compiled[0]["loss"] == pytest.approx(eager[0]["loss"], rel=1e-5)  # the same first forward
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-2)


@pytest.mark.slow
def test_the_dali_backend_trains_and_resumes_bit_exact(tmp_path, cifar_root):
    """data.backend=dali (CPU-only mode here): 10 + 10 iterations == 20, and the evaluation counts every image."""
    common = ("data.backend=dali", "train.precision=fp32")
    train(small_run(tmp_path / "a", cifar_root, "train.iterations=20", *common), LaunchEnv())
    train(small_run(tmp_path / "b", cifar_root, "train.iterations=10", *common), LaunchEnv())
    train(small_run(tmp_path / "b", cifar_root, "train.iterations=20", *common), LaunchEnv())
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / f"{name}/run")) for name in "ab")
    assert all(torch.equal(tensor, b["model"][name]) for name, tensor in a["model"].items())
    assert metrics(tmp_path / "a/run", "train") == metrics(tmp_path / "b/run", "train")
    assert metrics(tmp_path / "b/run", "eval")[-1]["count"] == 100


def test_a_partial_last_line_in_metrics_is_left_out_by_every_reader(tmp_path, cifar_root):
    """A crash mid-write leaves one; resume, `residual report`, `residual jobs` and sweeps read the same records."""
    from cluster.jobs import last_progress
    from cluster.sweep import new_evaluations
    from trainer.reports.report import read_run
    from trainer.training.run_log import read_metrics

    train(small_run(tmp_path, cifar_root, "train.iterations=5"), LaunchEnv())
    path = tmp_path / "run" / "metrics.jsonl"
    whole = read_metrics(path)
    with open(path, "a") as file:
        file.write('{"kind": "eval", "itera')
    assert read_metrics(path) == whole
    (evaluation,) = [record for record in whole if record["kind"] == "eval"]
    assert read_run(tmp_path / "run").val_error == [(5, 100 * evaluation["top1_error"])]
    assert last_progress(tmp_path / "run") == (5, evaluation["top1"])
    assert new_evaluations(path, after=0) == [evaluation]
    train(small_run(tmp_path, cifar_root, "train.iterations=10"), LaunchEnv())  # resumes at 5
    assert [record["iteration"] for record in read_metrics(path) if record["kind"] == "eval"] == [5, 10]
    path.write_text('{"kind": "eval", "iteration": 1}\nnot json\n')
    with pytest.raises(UserError, match=r"metrics.jsonl, line 2: not a JSON record \('not json'\)"):
        read_metrics(path)


@pytest.mark.parametrize("change", ["rename", "extra", "missing"])
def test_val_classes_other_than_trains_are_refused_at_start(tmp_path, imagefolder_root, change):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(imagefolder_root, root)
    first = sorted((root / "val").iterdir())[0]
    if change == "rename":
        first.rename(first.with_name("zebra"))
    elif change == "extra":
        shutil.copytree(first, first.with_name("zebra"))
    else:
        shutil.rmtree(first)
    with pytest.raises(UserError, match=r"val: its \d classes are not the 4 of train/ \(first differences: "):
        train(imagefolder_run(tmp_path / "runs", root, "train.iterations=2"), LaunchEnv())
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_a_failed_evaluation_keeps_the_checkpoint_due_and_skip_corrupt_covers_val(tmp_path, imagefolder_root, backend):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(imagefolder_root, root)
    damaged = sorted(path for path in (root / "val").rglob("*") if path.is_file())[7]
    damaged.write_bytes(b"this is not a JPEG")
    overrides = ["train.iterations=4", "eval.every=2", "checkpoint.every=2", "log.every=2"]
    overrides.append(f"data.backend={backend}")
    with pytest.raises(UserError, match=f"{damaged.name}: cannot decode"):
        train(imagefolder_run(tmp_path, root, *overrides), LaunchEnv())
    run_dir = tmp_path / "quickstart"
    assert [path.name for path in list_checkpoints(run_dir)] == ["ckpt-000000002.pt"]  # written before the evaluation
    assert metrics(run_dir, "eval") == []
    result, _ = train(imagefolder_run(tmp_path, root, *overrides, "data.skip_corrupt=true"), LaunchEnv())
    evaluations = [(record["iteration"], record["count"]) for record in metrics(run_dir, "eval")]
    assert evaluations == [(2, 19), (4, 19)] and result.count == 19  # resumed at 2: its evaluation made first, once
    assert [record["iteration"] for record in metrics(run_dir, "train")] == [2, 4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run on a GPU machine")
def test_dali_on_the_gpu_trains_through_its_evaluations(tmp_path, imagefolder_root):
    """The mixed decoder, the GPU augmentation and labels, and evaluations counted on the GPU."""
    overrides = ("data.backend=dali", "data.device=gpu", "train.iterations=4", "eval.every=2", "data.workers=1")
    result, _ = train(imagefolder_run(tmp_path, imagefolder_root, *overrides, "log.every=2"), LaunchEnv())
    assert result.count == 20 and [r["iteration"] for r in metrics(tmp_path / "quickstart", "eval")] == [2, 4]
    torch_path = imagefolder_run(tmp_path, imagefolder_root, "train.iterations=4", "train.run_name=torch")
    assert train(torch_path, LaunchEnv())[0].count == result.count  # the torch path counts the same images


@pytest.mark.slow
def test_a_loader_that_keeps_the_step_waiting_gets_more_workers_and_the_same_batches(
    tmp_path, imagefolder_root, monkeypatch, caplog
):
    """data.workers=auto grows while the step waits for data (here every window is taken to wait): the loader is
    built again with one more process and the epoch goes on at the next batch, so the run sees the batches a run
    with a fixed count sees."""
    fixed = imagefolder_run(
        tmp_path, imagefolder_root, "train.iterations=12", "log.every=2", "data.workers=1", "train.run_name=fixed"
    )
    train(fixed, LaunchEnv())
    monkeypatch.setattr("trainer.machine.auto.DATA_WAIT_LIMIT", -1.0)
    grown = imagefolder_run(
        tmp_path, imagefolder_root, "train.iterations=12", "log.every=2", "data.workers=auto", "train.run_name=grown"
    )
    with caplog.at_level(logging.INFO, logger="trainer"):
        train(grown, LaunchEnv())
    cores = LaunchEnv().rank_cores(usable_cores())[0]
    first = max(1, cores // 2)
    assert f"data.workers {first} -> {first + 1} at iteration 4: the step waited for data" in caplog.text
    counts = [record["loader_workers"] for record in metrics(tmp_path / "grown", "speed")]
    expected = [first, first, first + 1, first + 1, first + 2, first + 2]  # judged at 4 and 8, logged after
    assert counts == [min(count, cores) for count in expected]  # one process per core at most
    saved = load_checkpoint(tmp_path / "grown/checkpoints/ckpt-000000012.pt")["config"]
    assert saved["data"]["workers"] == counts[-1]  # the checkpoint records the loader as it grew
    assert metrics(tmp_path / "grown", "train") == metrics(tmp_path / "fixed", "train")  # the same batches
