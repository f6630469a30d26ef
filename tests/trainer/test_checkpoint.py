"""kill -9 in the middle of a checkpoint write, for both formats: the previous checkpoint stays whole."""

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline.errors import UserError
from trainer.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_model_and_optimizer,
    read_train_state,
    read_weights,
    save_checkpoint,
)
from trainer.models import create_model

# Saves iteration 1, then starts iteration 2 with the write of its last part stalled, and says so.
WRITER = """
import sys, time
from pathlib import Path
import torch
import trainer.checkpoint as checkpoint
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


@pytest.mark.parametrize("sharded", [False, True])
def test_kill_9_mid_write_leaves_the_previous_checkpoint(tmp_path, sharded):
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), "sharded" if sharded else "file"],
        cwd=Path(__file__).parents[2],
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
        [str(Path(sys.executable).parent / "residual"), "eval", str(path), "--data", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "not loaded" in result.stderr and not marker.exists()
    (path / ".metadata").write_bytes(pickle.dumps({"model.fc.weight": 1}))
    with pytest.raises(UserError, match="holds a dict, not DCP's Metadata"):
        read_weights(path)


def test_a_full_disk_during_a_dcp_save_stops_with_one_line(small_disk):
    from trainer.faults import CheckpointNotWritten

    (small_disk / "filler").write_bytes(bytes(2 * 2**20))  # 1 MB left
    model = create_model("resnet20")  # 2.2 MB with its momentum
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    with pytest.raises(CheckpointNotWritten, match=r"iteration 3 could not be written .* \(No space left on"):
        save_checkpoint(small_disk / "run", 3, model, optimizer, {"iteration": 3}, sharded=True, keep=1, is_main=True)
    assert list((small_disk / "run" / "checkpoints").iterdir()) == []
