"""`residual data shard` writes WebDataset shards that DALI's own reader and both loader paths read back."""

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from checkout import RESIDUAL

from data_pipeline.config import DataConfig
from data_pipeline.datasets import ImageFolderDataset, open_dataset
from data_pipeline.errors import UserError
from data_pipeline.loaders import build_train_loader, build_val_loader
from data_pipeline.prepare.shard import shard_imagefolder


@pytest.fixture(scope="module")
def shards(imagefolder_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    result = subprocess.run(
        [RESIDUAL, "data", "shard", str(imagefolder_root), str(out), "--shard-size", "10"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "train: 5 shards, val: 2 shards" in result.stdout
    return out


@pytest.mark.slow
def test_shards_read_back_with_the_right_images_and_labels(shards, imagefolder_root):
    for split in ("train", "val"):
        folder = ImageFolderDataset(imagefolder_root / split)
        sharded = open_dataset(shards, "webdataset", train=split == "train")
        assert len(sharded) == len(folder) and sharded.classes == folder.classes
        for index in range(len(folder)):
            image, label = sharded[index]
            assert label == folder.samples[index][1]
            assert torch.equal(image, folder[index][0])


def test_dali_reads_the_shards_with_their_indexes(shards, imagefolder_root):
    """The .idx files are the format DALI's fn.readers.webdataset reads."""
    from nvidia.dali import fn, pipeline_def

    tars = sorted(str(path) for path in (shards / "val").glob("*.tar"))

    @pipeline_def(batch_size=20, num_threads=1, device_id=None)
    def pipeline():
        return tuple(fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars], ext=["jpg", "cls"]))

    pipe = pipeline()
    pipe.build()
    encoded, labels = pipe.run()
    folder = ImageFolderDataset(imagefolder_root / "val")
    assert [int(np.array(label).tobytes()) for label in labels] == [label for _, label in folder.samples]
    assert np.array(encoded[0]).tobytes() == Path(folder.samples[0][0]).read_bytes()


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_both_backends_train_and_evaluate_on_shards(shards, backend):
    config = DataConfig(
        root=str(shards),
        format="webdataset",
        backend=backend,
        batch_size=8,
        workers=0,
        scale_min=40,
        scale_max=56,
        crop_size=32,
        val_resize=36,
    )
    images, labels = next(iter(build_train_loader(config, rank=0, world_size=1, seed=0).epoch(0)))
    assert images.shape == (8, 3, 32, 32) and labels.dtype == torch.int64
    counted = sum(len(labels) for _, labels in build_val_loader(config, rank=0, world_size=1, batch_per_rank=6))
    assert counted == 20


def test_a_sample_without_label_or_index_is_named(shards, tmp_path):
    broken = tmp_path / "val"
    broken.mkdir()
    for path in (shards / "val").glob("shard-000000.*"):
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "shard-000000.labels").unlink()
    index = broken / "shard-000000.idx"
    lines = index.read_text().splitlines()
    lines[3] = " ".join(lines[3].split()[:4])  # sample 2 keeps its image, loses its .cls
    index.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"shard-000000.tar: sample 000000002 has no .cls label"):
        open_dataset(tmp_path, "webdataset", train=False)
    index.unlink()
    with pytest.raises(UserError, match="shard-000000.tar: no index shard-000000.idx"):
        open_dataset(tmp_path, "webdataset", train=False)
    with pytest.raises(UserError, match="no train/ or val/ folder"):
        shard_imagefolder(tmp_path / "nothing", tmp_path / "out", shard_size=5)


def test_a_label_outside_the_classes_is_named_with_its_shard_and_sample(shards, tmp_path):
    broken = tmp_path / "train"
    broken.mkdir()
    for path in (shards / "train").iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (tmp_path / "classes.txt").write_text((shards / "classes.txt").read_text())  # 4 classes
    labels = (broken / "shard-000001.labels").read_text().split()
    labels[7] = "9"
    (broken / "shard-000001.labels").write_text("\n".join(labels) + "\n")
    with pytest.raises(UserError) as raised:
        open_dataset(tmp_path, "webdataset", train=True)
    assert str(raised.value) == (
        f"{broken / 'shard-000001.tar'}: sample 7 has label 9, outside the 4 classes (0-3) "
        f"of {tmp_path / 'classes.txt'}"
    )
