import numpy as np
import torch
from torchvision.transforms import v2

from data_pipeline.augment.draws import PCA_EIGENVALUES, cifar_crop_flip
from data_pipeline.augment.transforms import (
    PCALighting,
    augment_cifar_batch,
    build_train_transform,
    build_val_transform,
)
from data_pipeline.config import DataConfig


def test_paper_scale_augmentation_gives_224_crops():
    transform = build_train_transform(DataConfig())
    resize = transform.transforms[0]
    assert isinstance(resize, v2.RandomShortestSize) and (min(resize.min_size), max(resize.min_size)) == (256, 480)
    image = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    assert transform(image).shape == (3, 224, 224)


def test_val_is_resize_256_and_center_224():
    image = torch.randint(0, 256, (3, 256, 512), dtype=torch.uint8)
    transform = build_val_transform(DataConfig())
    reference = v2.Compose(
        [v2.CenterCrop(224), v2.ToDtype(torch.float32, scale=True), v2.Normalize(DataConfig().mean, DataConfig().std)]
    )
    assert torch.allclose(transform(image), reference(image))  # already 256 on the shorter side


def test_cifar_pads_by_four_and_keeps_32():
    config = DataConfig(format="cifar", mean=[0.0] * 3, std=[1.0] * 3)
    images = torch.full((20, 3, 32, 32), 255, dtype=torch.uint8)
    outs = augment_cifar_batch(images, np.arange(20))
    assert outs.shape == (20, 3, 32, 32)
    assert (outs == 0).flatten(1).any(dim=1).any()  # some crops reach into the black padding
    assert torch.equal(build_val_transform(config)(images[0]), torch.ones(3, 32, 32))


def test_cifar_crops_and_flips_are_uniform_and_a_function_of_the_seed():
    left, top, flip = cifar_crop_flip(np.arange(90_000))
    for values, count in ((left, 9), (top, 9), (flip, 2)):
        frequencies = np.bincount(values, minlength=count) / len(values)
        assert len(frequencies) == count and np.abs(frequencies - 1 / count).max() < 0.01
    assert abs(np.corrcoef(left, top)[0, 1]) < 0.02 and abs(np.corrcoef(left, flip)[0, 1]) < 0.02
    again = cifar_crop_flip(np.arange(90_000)[::-1].copy())
    assert np.array_equal(again[0][::-1], left)  # each seed's draw, whatever its neighbours


def test_pca_lighting_shifts_each_channel_by_a_constant():
    torch.manual_seed(0)
    image = torch.rand(3, 8, 8)
    out = PCALighting(0.1)(image)
    shift = (out - image).flatten(1)
    assert torch.allclose(shift, shift[:, :1].expand_as(shift))
    assert shift.abs().max() < 0.1 * 3 * max(PCA_EIGENVALUES) * 3
    assert torch.equal(PCALighting(0.0)(image), image)
