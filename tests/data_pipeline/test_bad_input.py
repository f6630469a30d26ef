"""A corrupt or truncated image in training: stopped with the file's name, or with data.skip_corrupt skipped and
counted, on both backends."""

import logging
import shutil

import pytest

from data_pipeline.config import DataConfig
from data_pipeline.errors import UserError
from data_pipeline.loaders import build_train_loader


@pytest.fixture
def damaged(imagefolder_root, tmp_path):
    root = tmp_path / "damaged"
    shutil.copytree(imagefolder_root, root)
    images = sorted(path for path in (root / "train").rglob("*") if path.is_file())
    truncated, garbage = images[3], images[20]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    garbage.write_bytes(b"this is not a JPEG")
    return root, {truncated.name, garbage.name}


def config(root, backend: str, skip: bool, workers: int = 0) -> DataConfig:
    return DataConfig(root=str(root), backend=backend, batch_size=12, workers=workers, skip_corrupt=skip,
                      scale_min=40, scale_max=56, crop_size=32, val_resize=36)  # fmt: skip


@pytest.mark.parametrize(("backend", "workers"), [("torch", 0), ("torch", 1), ("dali", 0), ("dali", 1)])
def test_a_damaged_file_stops_training_with_its_name_in_one_line(damaged, backend, workers):
    """From a loader worker process as from the main one: the one line, not the worker's traceback."""
    root, names = damaged
    loader = build_train_loader(config(root, backend, skip=False, workers=workers), rank=0, world_size=1, seed=0)
    with pytest.raises(UserError) as raised:
        for _ in loader.epoch(0):
            pass
    message = str(raised.value)
    assert any(message.startswith(f"{root}/train/") and name in message for name in names), message
    assert message.endswith("data.skip_corrupt=true skips such files, `residual data verify` lists them"), message
    assert "\n" not in message


@pytest.mark.parametrize("workers", [0, 1])
def test_a_damaged_val_file_stops_evaluation_in_one_line(damaged, workers):
    from data_pipeline.loaders import build_val_loader

    root, _ = damaged
    val = sorted(path for path in (root / "val").rglob("*") if path.is_file())[2]
    val.write_bytes(b"not an image")
    settings = config(root, "torch", skip=False, workers=workers)
    batches = build_val_loader(settings, rank=0, world_size=1, batch_per_rank=4)
    with pytest.raises(UserError, match=f"^{val}: cannot decode image .* lists them$"):
        list(batches)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_skip_corrupt_skips_and_counts(damaged, backend, caplog):
    root, names = damaged
    loader = build_train_loader(config(root, backend, skip=True), rank=0, world_size=1, seed=0)
    with caplog.at_level(logging.WARNING):
        batches = list(loader.epoch(0))
    assert len(batches) == loader.batches_per_epoch and all(len(labels) == 12 for _, labels in batches)
    skipped = [record.getMessage() for record in caplog.records if "skipped" in record.getMessage()]
    assert {name for name in names if any(name in message for message in skipped)} == names
    assert "(2 skipped by this process)" in skipped[-1]
    assert not any("data.skip_corrupt=true" in message for message in skipped)  # no advice to turn on what is on


def test_cifar_batches_of_other_images_are_refused_with_the_file(cifar_root, tmp_path):
    """64 x 64 images (12,288-byte rows) would reshape into scrambled 32 x 32 ones with misaligned labels."""
    import pickle

    import numpy as np

    from data_pipeline.datasets import open_dataset

    root = tmp_path / "cifar"
    shutil.copytree(cifar_root, root)
    with open(root / "data_batch_2", "rb") as file:
        batch = pickle.load(file, encoding="bytes")
    batch[b"data"] = np.zeros((len(batch[b"labels"]), 3 * 64 * 64), dtype=np.uint8)
    with open(root / "data_batch_2", "wb") as file:
        pickle.dump(batch, file)
    with pytest.raises(UserError, match=r"data_batch_2: data of shape \(80, 12288\) .* 3072 bytes"):
        open_dataset(root, "cifar", train=True)
    batch[b"data"], batch[b"labels"] = np.zeros((80, 3072), dtype=np.uint8), [0] * 79
    with open(root / "data_batch_2", "wb") as file:
        pickle.dump(batch, file)
    with pytest.raises(UserError, match="data_batch_2: 80 images but 79 labels"):
        open_dataset(root, "cifar", train=True)
    assert len(open_dataset(root, "cifar", train=False)) == 100  # the test batch is whole
