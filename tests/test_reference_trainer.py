"""tools/reference_cifar_resnet.py, the independent check of the paper's CIFAR experiment: its nets are the paper's
(Table 6's parameter counts; option A adds none, so plain and residual nets are the same size) and it trains."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from checkout import ROOT

spec = importlib.util.spec_from_file_location("reference", ROOT / "tools" / "reference_cifar_resnet.py")
reference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reference)


@pytest.mark.parametrize(("depth", "millions"), [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)])
def test_the_reference_nets_have_table_6s_sizes(depth, millions):
    sizes = [sum(p.numel() for p in reference.network(depth, residual, 3, 10).parameters()) for residual in (1, 0)]
    assert sizes[0] == sizes[1] and sizes[0] / 1e6 == pytest.approx(millions, rel=0.03)
    assert reference.network(depth, True, 1, 10)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.slow
def test_the_reference_trains_on_fashion_mnist(tmp_path):
    root = ROOT / "data" / "fashion-mnist"
    if not root.is_dir():
        root = tmp_path / "fm"
        got = subprocess.run([sys.executable, "-m", "trainer.cli", "data", "get", "fashion-mnist", str(root)], cwd=ROOT)
        assert got.returncode == 0
    command = [sys.executable, str(ROOT / "tools" / "reference_cifar_resnet.py"), str(root), "--iterations", "40"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.splitlines()[-1])
    assert record["iteration"] == 40 and record["test_error"] < 60  # chance: 90
