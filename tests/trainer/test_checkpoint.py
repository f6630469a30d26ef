"""kill -9 in the middle of a checkpoint write, for both formats: the previous checkpoint stays whole."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import latest_checkpoint, list_checkpoints, load_model_and_optimizer, read_train_state
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
