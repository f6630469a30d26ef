"""CIFAR-format data as tensors: the batches are those of a per-image path, at any start, on any rank."""

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from data_pipeline.augment.draws import cifar_crop_flip
from data_pipeline.augment.transforms import build_val_transform
from data_pipeline.cifar_tensors import CifarTensorEval, CifarTensorLoader
from data_pipeline.config import DataConfig
from data_pipeline.datasets import open_dataset
from data_pipeline.loaders import build_train_loader, build_val_loader
from data_pipeline.sampling import ShardedEpochSampler
from data_pipeline.torch_loader import build_torch_val_loader as build_per_image_val_loader

MEAN, STD = [0.45, 0.5, 0.55], [0.2, 0.25, 0.3]


def cifar_config(root, **overrides) -> DataConfig:
    return DataConfig(
        **{"root": str(root), "format": "cifar", "batch_size": 16, "workers": 0, "mean": MEAN, "std": STD, **overrides}
    )


def per_image_batch(config, sampler: ShardedEpochSampler, epoch: int, batch: int):
    """Batch ``batch`` of ``epoch`` built one image at a time, with torchvision's functional ops: the sampler's
    (index, seed) pairs, zero padding, the crop, the flip, the per-image normalization."""
    dataset = open_dataset(config.root, "cifar", train=True)
    sampler.set_epoch(epoch, batch)
    pairs = list(sampler)[: sampler.per_rank]
    normalize = build_val_transform(config)
    images = []
    for index, seed in pairs:
        (left,), (top,), (flip,) = cifar_crop_flip(torch.tensor([seed]).numpy())
        image = TF.crop(TF.pad(dataset.images[index], [4], fill=0), int(top), int(left), 32, 32)
        images.append(normalize(TF.horizontal_flip(image) if flip else image))
    return torch.stack(images), torch.stack([dataset.labels[index] for index, _ in pairs])


@pytest.mark.parametrize(("rank", "world_size", "epoch", "start"), [(0, 1, 0, 0), (1, 2, 3, 7), (0, 2, 1, 11)])
def test_batches_equal_the_per_image_path_at_any_start(cifar_root, rank, world_size, epoch, start):
    config = cifar_config(cifar_root)
    loader = build_train_loader(config, rank=rank, world_size=world_size, seed=5)
    assert isinstance(loader, CifarTensorLoader)
    sampler = ShardedEpochSampler(400, global_batch=16, rank=rank, world_size=world_size, seed=5)
    batches = list(loader.epoch(epoch, start))
    assert len(batches) == loader.batches_per_epoch - start == 25 - start
    for offset, (images, labels) in enumerate(batches[:3]):
        expected_images, expected_labels = per_image_batch(config, sampler, epoch, start + offset)
        assert torch.equal(labels, expected_labels)
        assert torch.equal(images, expected_images)


def test_a_new_start_mid_epoch_continues_it_exactly(cifar_root):
    loader = build_train_loader(cifar_config(cifar_root), rank=0, world_size=1, seed=0)
    whole = list(loader.epoch(2))
    resumed = list(build_train_loader(cifar_config(cifar_root), rank=0, world_size=1, seed=0).epoch(2, 9))
    for (a, la), (b, lb) in zip(whole[9:], resumed, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(next(loader.epoch(3))[0], whole[0][0])  # each epoch its own order and crops


def test_the_ranks_together_are_the_single_process_batch(cifar_root):
    single = next(build_train_loader(cifar_config(cifar_root), rank=0, world_size=1, seed=1).epoch(4, 2))
    halves = [
        next(build_train_loader(cifar_config(cifar_root), rank=r, world_size=2, seed=1).epoch(4, 2)) for r in (0, 1)
    ]
    assert torch.equal(torch.cat([images for images, _ in halves]), single[0])
    assert torch.equal(torch.cat([labels for _, labels in halves]), single[1])


def test_evaluation_equals_the_per_image_path_and_counts_every_image_once(cifar_root):
    config = cifar_config(cifar_root)
    reference = list(build_per_image_val_loader(config, rank=0, world_size=1, batch_per_rank=30))
    shares = [build_val_loader(config, rank=r, world_size=3, batch_per_rank=30) for r in range(3)]
    assert all(isinstance(share, CifarTensorEval) for share in shares)
    images = torch.cat([images for share in shares for images, _ in share])
    labels = torch.cat([labels for share in shares for _, labels in share])
    assert torch.equal(images, torch.cat([images for images, _ in reference]))
    assert torch.equal(labels, torch.cat([labels for _, labels in reference])) and len(labels) == 100


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run on a GPU machine")
def test_on_a_gpu_the_data_stays_there_and_the_batches_and_counts_are_the_cpus(cifar_root):
    from trainer.eval.evaluate import evaluate
    from trainer.models import create_model

    config, gpu = cifar_config(cifar_root), torch.device("cuda")
    on_cpu = build_train_loader(config, rank=0, world_size=1, seed=0)
    on_gpu = build_train_loader(config, rank=0, world_size=1, seed=0, device=gpu)
    for (a, la), (b, lb) in zip(on_cpu.epoch(1, 20), on_gpu.epoch(1, 20), strict=True):
        assert b.is_cuda and lb.is_cuda
        torch.testing.assert_close(b.cpu(), a, atol=1e-6, rtol=0)
        assert torch.equal(lb.cpu(), la)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a batch is built without waiting for the steps before it
    try:
        next(iter(on_gpu.epoch(0)))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10)
    results = []
    for device in (torch.device("cpu"), gpu):
        batches = build_val_loader(config, rank=0, world_size=1, batch_per_rank=30, device=device)
        results.append(evaluate(model.to(device), batches, num_classes=10, device=device))
    assert results[1].count == results[0].count == 100
    assert abs(results[1].correct1 - results[0].correct1) <= 1  # the same images; kernels may round differently
