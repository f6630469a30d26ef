from dataclasses import replace

import pytest
import torch

from data_pipeline.config import DataConfig
from data_pipeline.datasets import ImageFolderDataset
from data_pipeline.errors import UserError
from data_pipeline.loaders import build_train_loader as build_loader
from data_pipeline.sampling import ShardedEpochSampler
from data_pipeline.torch_loader import build_torch_train_loader as build_train_loader
from data_pipeline.torch_loader import build_torch_val_loader as build_val_loader


def cifar_config(root, **overrides) -> DataConfig:
    return DataConfig(**{"root": str(root), "format": "cifar", "batch_size": 32, "workers": 0, **overrides})


def test_ranks_split_each_global_batch_disjointly():
    single = list(ShardedEpochSampler(100, global_batch=20, rank=0, world_size=1, seed=3))
    ranks = [list(ShardedEpochSampler(100, global_batch=20, rank=r, world_size=4, seed=3)) for r in range(4)]
    for batch in range(5):
        union = [item for rank in ranks for item in rank[batch * 5 : (batch + 1) * 5]]
        assert union == single[batch * 20 : (batch + 1) * 20]
    indices = [index for rank in ranks for index, _ in rank]
    assert sorted(indices) == list(range(100))


def test_each_epoch_is_a_new_seeded_order():
    sampler = ShardedEpochSampler(50, global_batch=10, rank=0, world_size=1, seed=0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert [i for i, _ in first] != [i for i, _ in second]
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert len(first) == 50 and len({seed for _, seed in first + second}) == 100


def test_start_batch_continues_the_epoch():
    sampler = ShardedEpochSampler(64, global_batch=8, rank=1, world_size=2, seed=1)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.set_epoch(2, start_batch=3)
    assert list(sampler) == whole[3 * 4 :]
    assert len(sampler) == len(whole) - 12


def test_batches_do_not_depend_on_worker_count_or_resume_point(imagefolder_root):
    config = DataConfig(root=str(imagefolder_root), batch_size=4, workers=0, scale_min=40, scale_max=56, crop_size=32)
    reference = build_train_loader(config, rank=0, world_size=1, seed=7)
    with_workers = build_train_loader(replace(config, workers=2), rank=0, world_size=1, seed=7)
    full = list(reference.epoch(1))
    assert len(full) == reference.batches_per_epoch == 12
    for (a, la), (b, lb) in zip(full, with_workers.epoch(1), strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    for (a, _), (b, _) in zip(full[5:], reference.epoch(1, start_batch=5), strict=True):
        assert torch.equal(a, b)


def test_val_shards_count_every_image_once(imagefolder_root):
    config = DataConfig(
        root=str(imagefolder_root), batch_size=4, workers=0, scale_min=32, scale_max=48, crop_size=32, val_resize=36
    )
    single = torch.cat([labels for _, labels in build_val_loader(config, rank=0, world_size=1, batch_per_rank=3)])
    shards = [build_val_loader(config, rank=r, world_size=3, batch_per_rank=4) for r in range(3)]
    labels = torch.cat([labels for loader in shards for _, labels in loader])
    assert len(single) == 20 and torch.equal(labels, single)  # 20 images over 3 ranks: 6, 7, 7, none repeated


def test_imagefolder_batches(imagefolder_root):
    config = DataConfig(
        root=str(imagefolder_root), batch_size=8, workers=0, scale_min=40, scale_max=56, crop_size=32, val_resize=36
    )
    loader = build_train_loader(config, rank=0, world_size=1, seed=0)
    images, labels = next(loader.epoch(0))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert loader.classes == ImageFolderDataset(imagefolder_root / "train").classes


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(UserError, match="folder does not exist"):
        build_train_loader(DataConfig(root=str(tmp_path)), rank=0, world_size=1, seed=0)
    (tmp_path / "train" / "n01440764").mkdir(parents=True)
    with pytest.raises(UserError, match="n01440764"):
        build_train_loader(DataConfig(root=str(tmp_path)), rank=0, world_size=1, seed=0)


def test_undecodable_image_names_the_file(tmp_path):
    folder = tmp_path / "train" / "n01440764"
    folder.mkdir(parents=True)
    (folder / "broken.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    loader = build_train_loader(DataConfig(root=str(tmp_path), batch_size=1, workers=0), rank=0, world_size=1, seed=0)
    with pytest.raises(UserError, match="broken.JPEG: cannot decode image"):
        next(loader.epoch(0))


def test_batch_larger_than_the_data_set(cifar_root, imagefolder_root):
    with pytest.raises(UserError, match="data.batch_size=1000"):
        build_loader(cifar_config(cifar_root, batch_size=1000), rank=0, world_size=1, seed=0)
    with pytest.raises(UserError, match="data.batch_size=1000"):
        build_loader(DataConfig(root=str(imagefolder_root), batch_size=1000), rank=0, world_size=1, seed=0)


def test_workers_hand_over_uint8_and_the_whole_batch_is_normalized_as_each_image_was(imagefolder_root):
    from data_pipeline.torch_loader import AugmentedDataset

    config = DataConfig(
        root=str(imagefolder_root), batch_size=4, workers=0, scale_min=40, scale_max=56, crop_size=32, lighting_std=0.0
    )
    loader = build_train_loader(config, rank=0, world_size=1, seed=7)
    keys = list(loader.loader.sampler)[:4]
    assert loader.loader.dataset[keys[0]][0].dtype == torch.uint8
    per_image = AugmentedDataset(loader.loader.dataset.dataset, config, normalize=True)
    images, _ = next(iter(loader.epoch(0)))
    assert images.dtype == torch.float32
    assert torch.equal(images, torch.stack([per_image[key][0] for key in keys]))
    with_lighting = build_train_loader(replace(config, lighting_std=0.1), rank=0, world_size=1, seed=7)
    assert with_lighting.normalize is None and with_lighting.loader.dataset[keys[0]][0].dtype == torch.float32
