"""The recipes' data side on both backends: progressive resizing, test-time resolution, auto-augmentation, random
erasing and repeated augmentation."""

import numpy as np
import pytest
import torch

from data_pipeline.augment.draws import erase_windows
from data_pipeline.config import DataConfig, ResolutionRamp
from data_pipeline.dali.loader import build_dali_train_loader, build_dali_val_loader
from data_pipeline.loaders import build_train_loader, build_val_loader
from data_pipeline.sampling import sample_seed, sample_uniforms

MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]


def imagefolder_config(root, **overrides) -> DataConfig:
    sizes = dict(scale_min=40, scale_max=56, crop_size=32, val_resize=36, train_augment="random_resized_crop")
    return DataConfig(
        **{"root": str(root), "batch_size": 8, "workers": 0, "mean": MEAN, "std": STD, **sizes, **overrides}
    )


def test_the_ramp_is_ffcvs_get_resolution():
    """ffcv-imagenet's rn50 88-epoch config: 160 to epoch 65, 192 from 76, between them the multiple of 32 nearest
    the straight line."""
    ramp = ResolutionRamp(start_size=160, start_epoch=65, end_epoch=76, multiple=32)
    sizes = {epoch: ramp.size(epoch, 192) for epoch in range(88)}
    assert sizes[0] == sizes[65] == 160 and sizes[76] == sizes[87] == 192
    line = {epoch: 160 + (epoch - 65) / 11 * 32 for epoch in range(66, 76)}
    assert all(sizes[e] == int(round(line[e] / 32)) * 32 for e in line)
    assert sizes[70] == 160 and sizes[71] == 192  # the nearest multiple switches past the middle


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_the_training_crop_grows_with_the_epoch_on_both_backends(imagefolder_root, backend):
    ramp = ResolutionRamp(start_size=16, start_epoch=0, end_epoch=2, multiple=8)
    config = imagefolder_config(imagefolder_root, backend=backend, progressive=ramp)
    loader = build_train_loader(config, rank=0, world_size=1, seed=0)
    sizes = {epoch: tuple(next(iter(loader.epoch(epoch)))[0].shape[-2:]) for epoch in (0, 1, 2, 3)}
    assert sizes == {0: (16, 16), 1: (24, 24), 2: (32, 32), 3: (32, 32)}


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_evaluation_at_another_resolution_than_training(imagefolder_root, backend):
    """Train at 32 and evaluate at a resize of 44 and a center crop of 40 (torchvision V2 trains 176, tests 232/224)."""
    config = imagefolder_config(imagefolder_root, backend=backend, val_resize=44, val_crop=40)
    images, _ = next(iter(build_val_loader(config, rank=0, world_size=1, batch_per_rank=4)))
    assert images.shape[-2:] == (40, 40)
    assert next(iter(build_train_loader(config, rank=0, world_size=1, seed=0).epoch(0)))[0].shape[-2:] == (32, 32)


def test_erase_windows_follow_torchvision():
    """Drawn as RandomErasing draws (scale 0.02-0.33, ratio 0.3-3.3, the first of 10 tries that fits): the boxes lie
    inside, in the share of samples asked, with the area distribution of torchvision's own draws."""
    seeds = np.arange(20000, dtype=np.uint64)
    u = sample_uniforms(seeds, 91)[:, 50:]
    anchor, shape = erase_windows(u, 32, 0.5)
    erased = shape[:, 0] > 0
    assert erased.mean() == pytest.approx(0.5, abs=0.02)
    assert ((anchor + shape) <= 32).all() and (anchor >= 0).all()
    from torchvision.transforms import v2

    torch.manual_seed(0)
    reference = [
        v2.RandomErasing.get_params(torch.zeros(3, 32, 32), scale=(0.02, 0.33), ratio=(0.3, 3.3), value=[0])
        for _ in range(4000)
    ]
    areas = np.array([h * w for _, _, h, w, _ in reference]) / 32**2
    ours = (shape[erased, 0] * shape[erased, 1]) / 32**2
    assert np.median(ours) == pytest.approx(np.median(areas), abs=0.02)
    assert ours.mean() == pytest.approx(areas.mean(), abs=0.01)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_random_erasing_zeroes_the_drawn_box(imagefolder_root, backend):
    config = imagefolder_config(imagefolder_root, backend=backend, random_erase=1.0, lighting_std=0.0)
    images, _ = next(iter(build_train_loader(config, rank=0, world_size=1, seed=0).epoch(0)))
    zeros = (images == 0).all(dim=1)  # erased pixels are 0 in every channel of the normalized image
    assert all(zeros[i].any() for i in range(len(images)))
    if backend == "dali":  # the box is the feeder's, drawn from each sample's seed
        source = build_dali_train_loader(config, rank=0, world_size=1, seed=0).source
        _, _, *values = source.batch(0, 0)
        parameters = dict(zip(source.parameter_names(), values, strict=True))
        for image, (y, x), (h, w) in zip(
            images, parameters["erase_anchor"].astype(int), parameters["erase_shape"].astype(int), strict=True
        ):
            assert h * w > 0 and (image[:, y : y + h, x : x + w] == 0).all()
            assert (image == 0).all(dim=0).sum() == h * w


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("policy", ["trivial_augment_wide", "rand_augment"])
def test_auto_augmentation_changes_images_per_sample(imagefolder_root, backend, policy):
    """On the torch path each image's ops come from its own seed: the same batch twice is the same. (DALI draws
    them from its pipeline's generator, seeded per start: a restart at the same batch draws the same here, but
    not a resume elsewhere; the config's docs say so.)"""
    plain = imagefolder_config(imagefolder_root, backend=backend, lighting_std=0.0)
    augmented = imagefolder_config(imagefolder_root, backend=backend, lighting_std=0.0, auto_augment=policy)
    first = next(iter(build_train_loader(plain, rank=0, world_size=1, seed=0).epoch(0)))[0]
    batches = [next(iter(build_train_loader(augmented, rank=0, world_size=1, seed=0).epoch(0)))[0] for _ in range(2)]
    assert batches[0].shape == first.shape
    changed = [not torch.allclose(a, b) for a, b in zip(batches[0], first, strict=True)]
    assert sum(changed) >= len(changed) // 2  # some ops (identity, a zero magnitude) leave an image as it was
    assert torch.equal(batches[0], batches[1])


def test_cifar_tensors_augment_each_image_by_its_seed(cifar_root):
    config = DataConfig(
        root=str(cifar_root),
        format="cifar",
        batch_size=16,
        workers=0,
        mean=MEAN,
        std=STD,
        auto_augment="trivial_augment_wide",
        random_erase=0.5,
    )
    loader = build_train_loader(config, rank=0, world_size=1, seed=0)
    a, b = next(iter(loader.epoch(0))), next(iter(loader.epoch(0)))
    assert torch.equal(a[0], b[0]) and a[0].shape == (16, 3, 32, 32)
    assert (a[0] == 0).all(dim=1).flatten(1).any(dim=1).sum() >= 2  # about half the images have an erased box


def test_cifar_erasing_is_the_same_on_dali_and_the_tensor_path(cifar_root):
    """Both draw each image's box from its seed's uniforms: the batches are equal, erased boxes and all."""
    config = DataConfig(
        root=str(cifar_root), format="cifar", batch_size=16, workers=0, mean=MEAN, std=STD, random_erase=0.5
    )
    tensors = next(iter(build_train_loader(config, rank=0, world_size=1, seed=0).epoch(1)))[0]
    dali = next(iter(build_dali_train_loader(config, rank=0, world_size=1, seed=0).epoch(1)))[0]
    torch.testing.assert_close(dali, tensors, atol=1e-5, rtol=0)
    assert 4 <= int((tensors == 0).all(dim=1).flatten(1).any(dim=1).sum()) <= 12  # about half erased


def test_repeated_augmentation_on_one_process_keeps_the_epoch_length(cifar_root):
    config = DataConfig(root=str(cifar_root), format="cifar", batch_size=16, workers=0, mean=MEAN, std=STD, ra_reps=2)
    loader = build_train_loader(config, rank=0, world_size=1, seed=0)
    labels = torch.cat([batch[1] for batch in loader.epoch(0)])
    plain = DataConfig(root=str(cifar_root), format="cifar", batch_size=16, workers=0, mean=MEAN, std=STD)
    assert len(labels) == len(
        torch.cat([b[1] for b in build_train_loader(plain, rank=0, world_size=1, seed=0).epoch(0)])
    )
    images = torch.cat([batch[0] for batch in loader.epoch(0)])
    assert not torch.equal(images[0], images[1])  # one image twice, two augmentations
    assert sample_seed(0, 0, 0) != sample_seed(0, 0, 1)


def test_dali_evaluation_uses_the_val_crop_on_tencrop(imagefolder_root):
    config = imagefolder_config(imagefolder_root, backend="dali", val_resize=44, val_crop=40)
    images, _ = next(iter(build_dali_val_loader(config, rank=0, world_size=1, batch_per_rank=2, protocol="tencrop")))
    assert images.shape[1:] == (10, 3, 40, 40)


def test_the_flip_protocol_is_the_center_crop_and_its_mirror(imagefolder_root):
    config = imagefolder_config(imagefolder_root, val_resize=44, val_crop=40)
    center = next(iter(build_val_loader(config, rank=0, world_size=1, batch_per_rank=4)))[0]
    flip = next(iter(build_val_loader(config, rank=0, world_size=1, batch_per_rank=4, protocol="flip")))[0]
    assert flip.shape == (4, 2, 3, 40, 40)
    assert torch.equal(flip[:, 0], center) and torch.equal(flip[:, 1], center.flip(-1))
