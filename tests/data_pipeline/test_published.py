"""Which data set a folder holds, as a run records it: the published sets by their test labels, ImageNet by its
WordNet ids, synthetic sets by their class names, any other by its format."""

from pathlib import Path

import pytest

from data_pipeline.config import DataConfig
from data_pipeline.datasets import open_dataset
from data_pipeline.published import PUBLISHED, identify, published_results, title
from tests.data_pipeline.test_idx import write_idx_set

DEBIAN_COPY = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not DEBIAN_COPY.is_dir(), reason="Debian's dataset-fashion-mnist is not installed (tools/test.sh installs it)"
)
def test_fashion_mnist_is_recognized_by_its_test_labels(tmp_path):
    config = DataConfig(root=str(DEBIAN_COPY), format="idx", mean=[0.3], std=[0.35])
    assert identify(config, open_dataset(DEBIAN_COPY, "idx", train=True).classes) == "fashion-mnist"
    assert title("fashion-mnist") == "Fashion-MNIST" and dict(published_results("fashion-mnist"))["ResNet-18"] == 94.9


def test_sets_of_ones_own_are_named_by_their_format(tmp_path, cifar_root, imagefolder_root):
    write_idx_set(tmp_path)
    idx = DataConfig(root=str(tmp_path), format="idx", mean=[0.3], std=[0.35])
    assert identify(idx, open_dataset(tmp_path, "idx", train=True).classes) == "idx"
    cifar = DataConfig(root=str(cifar_root), format="cifar")
    assert identify(cifar, open_dataset(cifar_root, "cifar", train=True).classes) == "synthetic"
    folder = DataConfig(root=str(imagefolder_root))
    assert identify(folder, open_dataset(imagefolder_root, "imagefolder", train=True).classes) == "synthetic"
    assert identify(folder, ["cat", "dog"]) == "imagefolder" and title("imagefolder") == "imagefolder data"
    assert identify(folder, [f"n{index:08d}" for index in range(1000)]) == "imagenet"
    assert published_results("synthetic") == () and "cifar10" in PUBLISHED
