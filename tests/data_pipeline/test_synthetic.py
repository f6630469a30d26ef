import concurrent.futures
import multiprocessing
import pickle

import numpy as np
import pytest
from PIL import Image

from data_pipeline.config import DataConfig, SynthConfig
from data_pipeline.datasets import CifarDataset, ImageFolderDataset, open_dataset
from data_pipeline.prepare.synthetic import ensure_synthetic, render_sample


def test_imagefolder_layout(imagefolder_root):
    for split, per_class in (("train", 12), ("val", 5)):
        classes = sorted(path.name for path in (imagefolder_root / split).iterdir())
        assert len(classes) == 4
        for name in classes:
            images = sorted((imagefolder_root / split / name).glob("*.JPEG"))
            assert len(images) == per_class
            assert Image.open(images[0]).size == (48, 40)
    assert len(ImageFolderDataset(imagefolder_root / "train")) == 48


def test_cifar_layout_matches_the_real_batches(cifar_root):
    names = sorted(path.name for path in cifar_root.iterdir())
    assert names == ["batches.meta", *[f"data_batch_{i}" for i in range(1, 6)], "test_batch"]
    with open(cifar_root / "data_batch_1", "rb") as file:
        batch = pickle.load(file, encoding="bytes")
    assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (80, 3072)
    train, test = CifarDataset(cifar_root, train=True), CifarDataset(cifar_root, train=False)
    assert (len(train), len(test)) == (400, 100)
    assert train.labels.bincount().tolist() == [40] * 10
    assert len(train.classes) == 10


def test_same_seed_same_images():
    first = render_sample(3, (32, 32), np.random.default_rng(5))
    again = render_sample(3, (32, 32), np.random.default_rng(5))
    other = render_sample(3, (32, 32), np.random.default_rng(6))
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_classes_differ_more_than_samples_of_a_class():
    """The mean image of a class is closer to its own samples than to another class's: the data is learnable."""
    rng = np.random.default_rng(0)
    means = [np.mean([render_sample(c, (32, 32), rng) for _ in range(64)], axis=0) for c in range(4)]
    for c in range(4):
        sample = np.mean([render_sample(c, (32, 32), rng) for _ in range(16)], axis=0)
        distances = [np.abs(sample - mean).mean() for mean in means]
        assert int(np.argmin(distances)) == c


@pytest.mark.parametrize("data_format", ["cifar", "imagefolder"])
def test_ensure_synthetic_writes_once(tmp_path, data_format):
    synth = SynthConfig(classes=2, train_per_class=3, val_per_class=1, size=16)
    config = DataConfig(root=str(tmp_path / "set"), format=data_format, synthesize=synth)
    assert ensure_synthetic(config) is True
    assert ensure_synthetic(config) is False
    assert [path.name for path in tmp_path.iterdir()] == ["set"]  # no partial folder left


def test_runs_that_start_together_each_get_the_whole_set(tmp_path):
    """A sweep's trials start at once on a missing data.root: each writes its own folder, the first rename wins,
    none fails (they once shared one partial folder, and one trial died writing into a folder another removed)."""
    synth = SynthConfig(classes=4, train_per_class=60, val_per_class=10)
    config = DataConfig(root=str(tmp_path / "set"), format="cifar", synthesize=synth)
    with concurrent.futures.ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        wrote = list(pool.map(ensure_synthetic, [config] * 4))
    assert 1 <= sum(wrote) <= 4 and [path.name for path in tmp_path.iterdir()] == ["set"]
    assert len(open_dataset(tmp_path / "set", "cifar", train=True)) == 240
