"""MNIST's IDX files read natively: the arrays as written, gzipped or not; one line naming the file for each kind of
bad input; the paper's CIFAR augmentation at 28 x 28 on one channel, with the flip that data.flip turns off; the
same batches from DALI's CPU-only mode."""

import gzip
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from data_pipeline.config import DataConfig
from data_pipeline.datasets import open_dataset
from data_pipeline.errors import UserError
from data_pipeline.loaders import build_train_loader, build_val_loader

MEAN, STD = [0.3], [0.35]


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: two zero bytes, type 0x08, the number of dimensions, each dimension as a
    big-endian 32-bit integer, the elements."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(
    root: Path, *, train: int = 64, test: int = 24, classes: int = 10, gzipped: bool = True, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(train, dtype=np.uint8) % classes,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(test, dtype=np.uint8) * 3) % classes,
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = idx_bytes(array)
        (root / (name + ".gz" if gzipped else name)).write_bytes(gzip.compress(data) if gzipped else data)
    return arrays


def idx_config(root, **overrides) -> DataConfig:
    return DataConfig(
        **{"root": str(root), "format": "idx", "batch_size": 16, "workers": 0, "mean": MEAN, "std": STD, **overrides}
    )


@pytest.fixture(scope="module")
def idx_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("idx")
    write_idx_set(root)
    return root


@pytest.mark.parametrize("gzipped", [True, False])
def test_the_arrays_come_back_as_one_channel_tensors(tmp_path, gzipped):
    arrays = write_idx_set(tmp_path, gzipped=gzipped)
    train, test = open_dataset(tmp_path, "idx", train=True), open_dataset(tmp_path, "idx", train=False)
    assert train.images.shape == (64, 1, 28, 28) and train.images.dtype == torch.uint8
    assert torch.equal(train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert torch.equal(test.labels, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"].astype(np.int64)))
    assert train.classes == test.classes == [str(i) for i in range(10)]


def test_class_names_come_from_classes_txt_and_emnist_prefixes_are_found(tmp_path):
    write_idx_set(tmp_path, classes=3)
    for path in tmp_path.iterdir():
        path.rename(tmp_path / f"emnist-letters-{path.name}")
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    assert open_dataset(tmp_path, "idx", train=False).classes == ["a", "b", "c"]


def corrupt(root: Path, name: str, change) -> Path:
    path = root / f"{name}.gz"
    path.write_bytes(gzip.compress(change(gzip.decompress(path.read_bytes()))))
    return path


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("train-images-idx3-ubyte", lambda b: b"\x00\x00\x08\x01" + b[4:], "magic number 0x00000801, expected"),
        ("train-labels-idx1-ubyte", lambda b: b"\x00\x00\x08\x03" + b[4:], "magic number 0x00000803, expected"),
        ("train-images-idx3-ubyte", lambda b: b[:-100], "truncated: 50092 bytes where the header's shape"),
        ("train-images-idx3-ubyte", lambda b: b[:10], "truncated IDX header (10 bytes)"),
        ("train-labels-idx1-ubyte", lambda b: idx_bytes(np.zeros(63, np.uint8)), "63 labels for the 64 images"),
        ("train-labels-idx1-ubyte", lambda b: idx_bytes(np.full(64, 12, np.uint8)), "label 12 is outside the 10"),
    ],
)
def test_bad_files_are_refused_in_one_line_naming_the_file(tmp_path, name, change, message):
    write_idx_set(tmp_path)
    (tmp_path / "classes.txt").write_text("\n".join(str(i) for i in range(10)))
    path = corrupt(tmp_path, name, change)
    with pytest.raises(UserError, match=re.escape(message)) as raised:
        open_dataset(tmp_path, "idx", train=True)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_a_test_label_outside_the_training_labels_and_a_damaged_gzip_are_refused(tmp_path):
    write_idx_set(tmp_path)
    corrupt(tmp_path, "t10k-labels-idx1-ubyte", lambda b: idx_bytes(np.full(24, 10, np.uint8)))
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.gz: label 10 is outside the 10 classes"):
        open_dataset(tmp_path, "idx", train=False)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(UserError, match=f"{path}: cannot read"):
        open_dataset(tmp_path, "idx", train=True)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(UserError, match="no file matching \\*t10k-images-idx\\?-ubyte"):
        open_dataset(tmp_path, "idx", train=False)


@pytest.mark.parametrize("flip", [True, False])
def test_training_batches_are_the_papers_cifar_augmentation_at_28(idx_root, flip):
    """Each image: zero-pad 4, its 28 x 28 window, mirrored only where drawn and data.flip allows it."""
    from data_pipeline.augment.draws import cifar_crop_flip

    loader = build_train_loader(idx_config(idx_root, flip=flip), rank=0, world_size=1, seed=3)
    assert loader.channels == 1
    dataset = open_dataset(idx_root, "idx", train=True)
    flips = 0
    for batch, (images, labels) in enumerate(loader.epoch(1)):
        indices, seeds = loader.sampler.rank_share(loader.sampler.epoch_order(1), 1, batch)
        for image, label, index, seed in zip(images, labels, indices.tolist(), seeds.tolist(), strict=True):
            (left,), (top,), (mirror,) = cifar_crop_flip(np.array([seed]))
            expected = TF.crop(TF.pad(dataset.images[index], [4], fill=0), int(top), int(left), 28, 28)
            expected = TF.horizontal_flip(expected) if mirror and flip else expected
            torch.testing.assert_close(image, TF.normalize(expected.float() / 255, MEAN, STD), atol=1e-6, rtol=0)
            assert label == dataset.labels[index]
            flips += int(mirror)
    assert 16 <= flips <= 48  # about half of the 64 draws are flips, whether or not they are applied


def test_dali_gives_the_tensor_paths_batches(idx_root):
    from data_pipeline.dali.loader import build_dali_train_loader, build_dali_val_loader

    for flip in (True, False):
        config = idx_config(idx_root, flip=flip, random_erase=0.5)
        dali = list(build_dali_train_loader(config, rank=1, world_size=2, seed=4).epoch(2))
        tensors = list(build_train_loader(config, rank=1, world_size=2, seed=4).epoch(2))
        assert len(dali) == len(tensors) == 4
        for (dali_images, dali_labels), (images, labels) in zip(dali, tensors, strict=True):
            assert dali_images.shape == (8, 1, 28, 28) and torch.equal(dali_labels, labels)
            torch.testing.assert_close(dali_images, images, atol=1e-5, rtol=0)
    config = idx_config(idx_root)
    (dali,) = build_dali_val_loader(config, rank=0, world_size=1, batch_per_rank=24, protocol="center")
    (tensors,) = build_val_loader(config, rank=0, world_size=1, batch_per_rank=24)
    torch.testing.assert_close(dali[0], tensors[0], atol=1e-5, rtol=0)
    assert torch.equal(dali[1], tensors[1])
