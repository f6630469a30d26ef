import subprocess
from pathlib import Path

import pytest

from data_pipeline.prepare.synthetic import synthesize_cifar, synthesize_imagefolder


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """A small synthetic set in CIFAR-10's python layout: 10 classes, 40 train and 10 test images each."""
    root = tmp_path_factory.mktemp("cifar")
    synthesize_cifar(root, classes=10, train_per_class=40, val_per_class=10, seed=0)
    return root


@pytest.fixture(scope="session")
def imagefolder_root(tmp_path_factory) -> Path:
    """A small synthetic ImageFolder of 48x40 JPEGs: 4 classes, 12 train and 5 val images each."""
    root = tmp_path_factory.mktemp("imagefolder")
    synthesize_imagefolder(root, classes=4, train_per_class=12, val_per_class=5, size=(48, 40), seed=0)
    return root


@pytest.fixture
def quickstart_on_cifar(cifar_root) -> list[str]:
    """``python -m trainer`` arguments: the quickstart config on the small CIFAR set, without synthesis, loader
    workers or progress bar. Tests append their own overrides (of two values of a key, the later wins)."""
    return [
        "configs/quickstart.yaml",
        f"data.root={cifar_root}",
        "data.synthesize=null",
        "data.workers=0",
        "log.progress=false",
    ]


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 3 MB tmpfs, a disk that fills for real: room for one ResNet-20 checkpoint (2.2 MB) and a run's logs."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {mounted.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


PROCESS_MARKERS = ("distributed", "slurm", "ray", "browser")  # several processes, a cluster or a browser: seconds each


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts processes, a cluster or a browser is slow too: out of the edit-test tier (-m "not slow")."""
    for item in items:
        if any(item.get_closest_marker(name) for name in PROCESS_MARKERS) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
