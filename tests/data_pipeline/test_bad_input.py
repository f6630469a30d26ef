"""A corrupt or truncated image in training: stopped with the file's name, or with data.skip_corrupt skipped and
counted, on both backends."""

import logging
import shutil
from pathlib import Path

import pytest
from checkout import ROOT

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
    return DataConfig(
        root=str(root),
        backend=backend,
        batch_size=12,
        workers=workers,
        skip_corrupt=skip,
        scale_min=40,
        scale_max=56,
        crop_size=32,
        val_resize=36,
    )


def test_the_four_readers_find_the_same_files_damaged_for_the_same_reason(damaged, tmp_path):
    """An image folder's samples (torch path), the same files in WebDataset shards, DALI's reader and `residual
    data verify`: one rule (data_pipeline.damaged), one reason per file."""
    from data_pipeline.dali.sources import SampleReader
    from data_pipeline.damaged import CorruptImage
    from data_pipeline.datasets import ImageFolderDataset
    from data_pipeline.datasets.webdataset import WebDatasetDataset
    from data_pipeline.prepare.shard import shard_imagefolder
    from data_pipeline.prepare.verify import verify_images

    root, names = damaged
    folder = ImageFolderDataset(root / "train")
    shard_imagefolder(root, tmp_path / "shards", shard_size=16)
    shards = WebDatasetDataset(tmp_path / "shards" / "train")

    def reasons(dataset) -> dict[int, str]:
        found = {}
        for index in range(len(dataset)):
            try:
                dataset[index]
            except CorruptImage as error:
                found[index] = error.reason
        return found

    torch_path = reasons(folder)
    assert {Path(folder.samples.path(index)).name for index in torch_path} == names
    reader = SampleReader(folder)
    dali = {index: reason for index in range(len(folder)) if (reason := reader.inspect(reader.encoded(index))[1])}
    files = {folder.samples.path(index): index for index in range(len(folder))}
    verified = {files[str(path)]: reason for path, reason in verify_images(root / "train", workers=1)[1]}
    assert torch_path == reasons(shards) == dali == verified, (torch_path, reasons(shards), dali, verified)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_cifar_label_outside_the_classes_is_refused_at_start_in_one_line(cifar_root, tmp_path):
    """Label 12 where batches.meta names 10 classes: it failed the first step ("Target 12 is out of bounds")."""
    import pickle
    import subprocess
    import sys

    root = tmp_path / "cifar"
    shutil.copytree(cifar_root, root)
    with open(root / "data_batch_3", "rb") as file:
        batch = pickle.load(file, encoding="bytes")
    batch[b"labels"][5] = 12
    with open(root / "data_batch_3", "wb") as file:
        pickle.dump(batch, file)
    before = {path: path.read_bytes() for path in root.iterdir()}
    command = [
        sys.executable,
        "-m",
        "trainer",
        "configs/quickstart.yaml",
        f"data.root={root}",
        "data.synthesize=null",
        "log.progress=false",
        f"train.output_dir={tmp_path / 'runs'}",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.splitlines()[-1] == (
        f"residual: error: {root / 'data_batch_3'}: label 12 of image 5 is "
        f"outside the 10 classes (0-9) of {root / 'batches.meta'}"
    )
    assert before == {path: path.read_bytes() for path in root.iterdir()}
    assert not list((tmp_path / "runs").rglob("*.pt"))


@pytest.fixture(scope="module")
def with_a_panorama(imagefolder_root, tmp_path_factory):
    """A 20,000 x 10,000 JPEG in train/: 200 million pixels, past Pillow's decompression-bomb limit (179 million)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("panorama") / "set"
    shutil.copytree(imagefolder_root, root)
    panorama = next((root / "train").iterdir()) / "panorama.JPEG"
    Image.new("RGB", (20_000, 10_000), (200, 120, 40)).save(panorama, quality=50)
    return root, panorama


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "workers"), [("torch", 0), ("torch", 1), ("dali", 1)])
def test_a_huge_image_is_decoded_like_any_other_on_both_backends(with_a_panorama, backend, workers):
    """The rule: an image is damaged when it cannot be decoded, never for its size (DALI has no limit)."""
    root, _ = with_a_panorama
    settings = config(root, backend, skip=False, workers=workers)
    settings.batch_size = 7  # 49 images: every one read in 7 batches
    loader = build_train_loader(settings, rank=0, world_size=1, seed=0)
    assert sum(len(labels) for _, labels in loader.epoch(0)) == 49


@pytest.mark.slow
def test_verify_passes_a_huge_image(with_a_panorama):
    from data_pipeline.prepare.verify import verify_images

    root, _ = with_a_panorama
    assert verify_images(root / "train", workers=1) == (49, [])
