"""Checkpoints: kill -9 mid-write (both formats), unreadable and crafted files, full disks, bit-exact resume, the
resume choices and refusals, exports."""

import copy
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkout import RESIDUAL, ROOT
from training_runs import imagefolder_run, metrics, small_run

from data_pipeline.errors import UserError
from trainer.eval.weights import read_weights
from trainer.machine.distributed import LaunchEnv
from trainer.models import create_model
from trainer.training.checkpoint.files import latest_checkpoint, list_checkpoints, load_checkpoint, read_train_state
from trainer.training.checkpoint.state import load_model_and_optimizer, save_checkpoint
from trainer.training.loop import train

# Saves iteration 1, then starts iteration 2 with the write of its last part stalled, and says so.
WRITER = """
import sys, time
from pathlib import Path
import torch
import trainer.training.checkpoint.state as checkpoint
from trainer.models import create_model

run_dir, sharded = Path(sys.argv[1]), sys.argv[2] == "sharded"
torch.manual_seed(0)
model = create_model("resnet20")
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
def save(iteration):
    checkpoint.save_checkpoint(run_dir, iteration, model, optimizer, {"iteration": iteration, "model_name": "resnet20"},
                               sharded=sharded, keep=3, is_main=True)
save(1)
real_save = torch.save
def stalled_save(state, file):
    real_save(state, file)
    file.truncate(file.tell() // 2)  # half of it on disk
    print("writing", flush=True)
    time.sleep(600)
torch.save = stalled_save
with torch.no_grad():
    for parameter in model.parameters():
        parameter.add_(1.0)
save(2)
"""


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [False, True])
def test_kill_9_mid_write_leaves_the_previous_checkpoint(tmp_path, sharded):
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), "sharded" if sharded else "file"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "writing"
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()
    folder = tmp_path / "checkpoints"
    assert sorted(path.name for path in folder.iterdir() if path.name.endswith(".tmp")) == [
        "ckpt-000000002" + ("" if sharded else ".pt") + ".tmp"
    ]
    (previous,) = list_checkpoints(tmp_path)
    assert previous == latest_checkpoint(tmp_path) and read_train_state(previous)["iteration"] == 1
    model = create_model("resnet20")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    load_model_and_optimizer(previous, read_train_state(previous), model, optimizer, name="resnet20")
    torch.manual_seed(0)
    assert torch.equal(model.conv1.weight, create_model("resnet20").conv1.weight)  # iteration 1's weights


class RunsACommand:
    """What a crafted ``.metadata`` holds: unpickling it runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_a_crafted_dcp_metadata_is_refused_before_it_runs_code(tmp_path):
    model = create_model("resnet20")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = {"iteration": 1, "model_name": "resnet20"}
    path = save_checkpoint(tmp_path, 1, model, optimizer, state, sharded=True, keep=1, is_main=True)
    assert read_weights(path).model_name == "resnet20"  # DCP's own metadata passes
    marker = tmp_path / "ran"
    (path / ".metadata").write_bytes(pickle.dumps(RunsACommand(marker)))
    with pytest.raises(UserError, match=r"\.metadata: not loaded: it names posix\.system"):
        read_weights(path)
    with pytest.raises(UserError, match=r"\.metadata: not loaded"):
        load_model_and_optimizer(path, read_train_state(path), model, optimizer, name="resnet20")
    result = subprocess.run(
        [RESIDUAL, "eval", str(path), "--data", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "not loaded" in result.stderr and not marker.exists()
    (path / ".metadata").write_bytes(pickle.dumps({"model.fc.weight": 1}))
    with pytest.raises(UserError, match="holds a dict, not DCP's Metadata"):
        read_weights(path)


def test_a_full_disk_during_a_dcp_save_stops_with_one_line(small_disk):
    from trainer.training.faults import CheckpointNotWritten

    (small_disk / "filler").write_bytes(bytes(2 * 2**20))  # 1 MB left
    model = create_model("resnet20")  # 2.2 MB with its momentum
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    with pytest.raises(CheckpointNotWritten, match=r"iteration 3 could not be written .* \(No space left on"):
        save_checkpoint(small_disk / "run", 3, model, optimizer, {"iteration": 3}, sharded=True, keep=1, is_main=True)
    assert list((small_disk / "run" / "checkpoints").iterdir()) == []


@pytest.mark.parametrize(
    ("precision", "half", "batch"),
    # bf16 and fp16 are emulated on CPUs without them (12x slower than fp32 on an AVX2-only CPU): the fewest steps;
    # N a multiple of eval.every
    [
        pytest.param("fp32", 10, 32, marks=pytest.mark.slow),
        ("bf16", 5, 8),
        pytest.param("fp16", 5, 8, marks=pytest.mark.slow),
    ],
)
def test_resume_is_bit_exact(tmp_path, cifar_root, precision, half, batch):
    """2N iterations straight == N, stop, resume, N more (the resume falls mid-epoch)."""
    common = (f"train.precision={precision}", f"data.batch_size={batch}", "checkpoint.every=10")
    train(small_run(tmp_path / "a", cifar_root, f"train.iterations={2 * half}", *common), LaunchEnv())
    train(small_run(tmp_path / "b", cifar_root, f"train.iterations={half}", *common), LaunchEnv())
    train(small_run(tmp_path / "b", cifar_root, f"train.iterations={2 * half}", *common), LaunchEnv())

    a, b = (
        load_checkpoint(latest_checkpoint(tmp_path / "a/run")),
        load_checkpoint(latest_checkpoint(tmp_path / "b/run")),
    )
    assert a["iteration"] == b["iteration"] == 2 * half
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for index, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][index]["momentum_buffer"])
    assert a["train"]["history"] == b["train"]["history"]
    assert metrics(tmp_path / "a/run", "train") == metrics(tmp_path / "b/run", "train")
    assert metrics(tmp_path / "a/run", "eval") == metrics(tmp_path / "b/run", "eval")


@pytest.mark.slow
def test_a_checkpoint_of_the_earlier_layout_resumes_bit_exact(tmp_path, cifar_root):
    """Checkpoints written before 2026-12-06 hold the train state's fields at their top level, not under "train"
    (the window, scaler and RNG states under the names they still have): such a checkpoint resumes as its run would
    have gone on, mid-epoch and mid log window."""
    train(small_run(tmp_path / "a", cifar_root, "train.iterations=20", "train.precision=fp32"), LaunchEnv())
    train(small_run(tmp_path / "b", cifar_root, "train.iterations=10", "train.precision=fp32"), LaunchEnv())
    path = latest_checkpoint(tmp_path / "b/run")
    saved = load_checkpoint(path)
    torch.save({**saved.pop("train"), **saved}, path)
    train(small_run(tmp_path / "b", cifar_root, "train.iterations=20", "train.precision=fp32"), LaunchEnv())

    a, b = (load_checkpoint(latest_checkpoint(tmp_path / run)) for run in ("a/run", "b/run"))
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["train"] == b["train"] | {"seconds": a["train"]["seconds"]}
    assert metrics(tmp_path / "a/run", "train") == metrics(tmp_path / "b/run", "train")


def test_resuming_another_models_checkpoint_is_refused(tmp_path, cifar_root):
    train(small_run(tmp_path, cifar_root, "train.iterations=5"), LaunchEnv())
    with pytest.raises(UserError, match="a checkpoint of 'resnet20', not of model.name='resnet32'"):
        train(small_run(tmp_path, cifar_root, "train.iterations=10", "model.name=resnet32"), LaunchEnv())


class Foreign:
    pass


def test_unreadable_checkpoints_are_named_for_what_they_are(tmp_path):
    """Never torch's advice to retry with weights_only=False."""
    path = tmp_path / "ckpt-000000001.pt"
    torch.save({"model": {"w": torch.zeros(3)}}, path)
    whole = path.read_bytes()
    cases = {
        bytes(range(256)) * 8: "not a file torch.save wrote",
        b"model: resnet50\n": "a text file, not a checkpoint",
        whole[: len(whole) // 2]: r"damaged or truncated \(PytorchStreamReader failed reading zip archive: failed",
    }
    torch.save({"model": Foreign()}, path)
    cases[path.read_bytes()] = r"it names \S*test_checkpoint.Foreign, which weights-only loading does not run"
    for content, message in cases.items():
        path.write_bytes(content)
        with pytest.raises(UserError, match=f"ckpt-000000001.pt' cannot be read: {message}") as raised:
            load_checkpoint(path)
        assert "weights_only" not in str(raised.value) and "\n" not in str(raised.value)


def test_resume_latest_needs_a_checkpoint_and_a_path_must_exist(tmp_path, cifar_root):
    with pytest.raises(UserError, match="no checkpoint in .* to resume from"):
        train(small_run(tmp_path, cifar_root, "train.iterations=5", "checkpoint.resume=latest"), LaunchEnv())
    with pytest.raises(UserError, match="nope.pt' does not exist"):
        train(
            small_run(tmp_path, cifar_root, "train.iterations=5", f"checkpoint.resume={tmp_path}/nope.pt"), LaunchEnv()
        )


@pytest.mark.slow
def test_resume_from_a_named_checkpoint_into_a_new_run(tmp_path, cifar_root):
    train(small_run(tmp_path, cifar_root, "train.iterations=10"), LaunchEnv())
    source = tmp_path / "run/checkpoints/ckpt-000000010.pt"
    config = small_run(
        tmp_path, cifar_root, "train.iterations=12", "train.run_name=next", f"checkpoint.resume={source}"
    )
    train(config, LaunchEnv())
    assert [r["iteration"] for r in metrics(tmp_path / "next", "train")] == [12]


def test_export_gives_a_torchvision_state_dict(tmp_path, imagefolder_root):
    import torchvision

    from trainer.eval.weights import export_state_dict

    config = imagefolder_run(tmp_path, imagefolder_root, "train.iterations=2", "data.mean=[0.2,0.3,0.4]")
    train(config, LaunchEnv())
    source = latest_checkpoint(tmp_path / "quickstart")
    assert export_state_dict(source, tmp_path / "resnet18.pt").model_name == "resnet18"
    reference = torchvision.models.resnet18(num_classes=4)
    reference.load_state_dict(torch.load(tmp_path / "resnet18.pt", weights_only=True))
    assert torch.equal(reference.fc.weight, load_checkpoint(source)["model"]["fc.weight"])
    with pytest.raises(UserError, match="already a plain state dict"):
        export_state_dict(tmp_path / "resnet18.pt", tmp_path / "again.pt")
    with pytest.raises(UserError, match=r"resnet18.pt/out.pt: cannot write \(File exists"):  # under a file
        export_state_dict(source, tmp_path / "resnet18.pt" / "out.pt")


@pytest.mark.slow
def test_an_export_evaluates_as_its_checkpoint_and_the_flags_override(tmp_path, imagefolder_root):
    """The export carries the run's normalization, resize and crop (here none of the defaults) and its classes."""
    from trainer.eval.evaluate_checkpoint import EvalRequest, evaluate_checkpoint
    from trainer.eval.weights import export_state_dict

    overrides = ("train.iterations=4", "data.mean=[0.2,0.3,0.4]", "data.std=[0.3,0.2,0.25]", "data.val_resize=44")
    train(imagefolder_run(tmp_path, imagefolder_root, *overrides), LaunchEnv())
    source = latest_checkpoint(tmp_path / "quickstart")
    export_state_dict(source, tmp_path / "resnet18.pt")

    def evaluation(path: Path, **flags) -> dict:
        request = EvalRequest(path, imagefolder_root, batch_size=10, workers=0, precision="fp32", **flags)
        return evaluate_checkpoint(request, LaunchEnv())[2]

    by_checkpoint, by_export = evaluation(source), evaluation(tmp_path / "resnet18.pt")  # no --model needed
    assert by_export["model"] == "resnet18"
    assert by_export["correct1"] == by_checkpoint["correct1"] and by_export["correct5"] == by_checkpoint["correct5"]
    flags = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resize": 36, "crop": 36}
    assert [evaluation(tmp_path / "resnet18.pt", **flags)[key] for key in ("count", "top1")] == [
        evaluation(source, **flags)[key] for key in ("count", "top1")
    ]
    with pytest.raises(UserError, match=r"data.val_crop=40: must be <= data.val_resize \(from the checkpoint or"):
        evaluation(tmp_path / "resnet18.pt", resize=36, crop=40)


def test_a_full_disk_stops_with_the_last_good_checkpoint_named(small_disk, cifar_root):
    from trainer.training.checkpoint.files import read_train_state
    from trainer.training.faults import CheckpointNotWritten

    overrides = ("train.iterations=10", "checkpoint.every=5", "checkpoint.keep=2")
    with pytest.raises(CheckpointNotWritten) as raised:
        train(small_run(small_disk, cifar_root, *overrides), LaunchEnv())
    folder = small_disk / "run" / "checkpoints"
    assert str(raised.value) == (
        f"the checkpoint of iteration 10 could not be written to {folder} (No space left on device); nothing is "
        f"lost: the last good checkpoint is {folder / 'ckpt-000000005.pt'}, and a new start resumes from it"
    )
    assert raised.value.exit_code == 74
    assert sorted(path.name for path in folder.iterdir()) == ["ckpt-000000005.pt"]  # no partial file left
    assert read_train_state(folder / "ckpt-000000005.pt")["iteration"] == 5


def test_resuming_with_another_batch_size_is_refused(tmp_path, cifar_root):
    train(small_run(tmp_path, cifar_root, "train.iterations=5"), LaunchEnv())
    with pytest.raises(UserError, match=r"saved with 12 batches per epoch, this run has 25: the data set or"):
        train(small_run(tmp_path, cifar_root, "train.iterations=10", "data.batch_size=16"), LaunchEnv())
    assert [path.name for path in list_checkpoints(tmp_path / "run")] == ["ckpt-000000005.pt"]


def test_a_resume_that_changes_channels_last_gives_the_momentum_its_parameters_layout():
    """Saved in one layout, resumed in the other: fused SGD's update must still equal foreach's (issue 24, item 2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    torch.manual_seed(0)
    saved_model = create_model("resnet20", num_classes=10)
    optimizer = torch.optim.SGD(saved_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    torch.nn.functional.cross_entropy(saved_model(images), labels).backward()
    optimizer.step()  # momentum buffers in the contiguous layout
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # as save_checkpoint writes a .pt file
    checkpoint = dict(zip(("model", "optimizer"), get_state_dict(saved_model, optimizer, options=options), strict=True))

    def resumed_step(fused: bool) -> list[torch.Tensor]:
        model = create_model("resnet20", num_classes=10).to(memory_format=torch.channels_last)
        resumed = torch.optim.SGD(
            model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, fused=fused or None, foreach=not fused
        )
        loaded = copy.deepcopy(checkpoint)  # as read from its file again: the optimizer keeps the loaded tensors
        load_model_and_optimizer(Path("ckpt.pt"), loaded, model, resumed, name="resnet20")
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(images.to(memory_format=torch.channels_last)), labels).backward()
        resumed.step()
        return [p.detach().clone() for p in model.parameters()]

    fused, foreach = resumed_step(fused=True), resumed_step(fused=False)
    assert max((a - b).abs().max().item() for a, b in zip(fused, foreach, strict=True)) < 1e-6
