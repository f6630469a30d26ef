"""The DALI path in DALI's CPU-only mode (no GPU here): the same order, views and batches as the torch path, the
augmentations exactly as specified, deterministic per sample whatever the worker count."""

import numpy as np
import pytest
import torch
from checkout import RESIDUAL
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from data_pipeline.augment.draws import train_parameters
from data_pipeline.config import DataConfig
from data_pipeline.dali.loader import build_dali_train_loader, build_dali_val_loader
from data_pipeline.damaged import decode_rgb
from data_pipeline.datasets import open_dataset
from data_pipeline.loaders import build_train_loader
from data_pipeline.sampling import sample_seed
from data_pipeline.torch_loader import build_torch_val_loader as build_val_loader

MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]


def cifar_config(root, **overrides) -> DataConfig:
    return DataConfig(
        **{"root": str(root), "format": "cifar", "batch_size": 16, "workers": 0, "mean": MEAN, "std": STD, **overrides}
    )


def imagefolder_config(root, **overrides) -> DataConfig:
    sizes = dict(scale_min=40, scale_max=56, crop_size=32, val_resize=36)
    return DataConfig(
        **{"root": str(root), "batch_size": 12, "workers": 0, "mean": MEAN, "std": STD, **sizes, **overrides}
    )


def test_cifar_training_batches_are_the_specified_augmentation(cifar_root):
    """Each image: zero-pad 4, the 32 x 32 window at the sample's drawn offset, flipped if drawn, normalized."""
    config = cifar_config(cifar_root)
    loader = build_dali_train_loader(config, rank=0, world_size=1, seed=3)
    images, labels = next(loader.epoch(2, 5))
    dataset = open_dataset(cifar_root, "cifar", train=True)
    samples = loader.source.samples(2, 5)
    for image, label, (index, seed) in zip(images, labels, samples, strict=True):
        parameters = train_parameters(config, seed)
        x, y = parameters["offset"]
        expected = TF.pad(dataset.images[index], [4]).float()[:, 4 + y : 36 + y, 4 + x : 36 + x]
        if parameters["flip"]:
            expected = expected.flip(-1)
        expected = TF.normalize(expected / 255, MEAN, STD)
        assert label == dataset.labels[index]
        torch.testing.assert_close(image, expected, atol=1e-5, rtol=0)


def test_order_and_resume_match_the_torch_path(cifar_root):
    config = cifar_config(cifar_root)
    dali = build_dali_train_loader(config, rank=1, world_size=2, seed=0)
    torch_path = build_train_loader(config, rank=1, world_size=2, seed=0)
    epoch = list(dali.epoch(1))
    assert len(epoch) == dali.batches_per_epoch == torch_path.batches_per_epoch
    tensors = list(torch_path.epoch(1))  # CIFAR on the torch backend: the tensor path, the same draws per seed
    assert [labels.tolist() for _, labels in epoch] == [labels.tolist() for _, labels in tensors]
    for (dali_images, _), (tensor_images, _) in zip(epoch, tensors, strict=True):
        torch.testing.assert_close(dali_images, tensor_images, atol=1e-5, rtol=0)
    resumed = next(dali.epoch(1, 4))  # a new start mid-epoch: the same batch, the same crops
    assert torch.equal(resumed[0], epoch[4][0]) and torch.equal(resumed[1], epoch[4][1])
    following = next(dali.epoch(2))
    assert not torch.equal(following[0], epoch[0][0])


@pytest.mark.slow
def test_imagefolder_training_is_the_same_with_worker_processes(imagefolder_root):
    inline = list(build_dali_train_loader(imagefolder_config(imagefolder_root), rank=0, world_size=1, seed=1).epoch(0))
    workers = imagefolder_config(imagefolder_root, workers=2)
    parallel = list(build_dali_train_loader(workers, rank=0, world_size=1, seed=1).epoch(0))
    assert len(inline) == 4 and inline[0][0].shape == (12, 3, 32, 32)
    for (a, la), (b, lb) in zip(inline, parallel, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    flips = [train_parameters(imagefolder_config(imagefolder_root), sample_seed(1, 0, i))["flip"] for i in range(400)]
    assert 0.4 < np.mean(flips) < 0.6


@pytest.mark.parametrize("protocol", ["center", "flip", "tencrop"])
def test_evaluation_views_match_the_torch_path_and_count_every_image_once(imagefolder_root, cifar_root, protocol):
    config = imagefolder_config(imagefolder_root)
    counted = 0
    for rank in range(3):  # 20 val images over 3 ranks in batches of 4: shares of 6, 7, 7, partial last batches
        dali = list(build_dali_val_loader(config, rank=rank, world_size=3, batch_per_rank=4, protocol=protocol))
        reference = list(build_val_loader(config, rank=rank, world_size=3, batch_per_rank=4, protocol=protocol))
        for (views, labels), (expected, expected_labels) in zip(dali, reference, strict=True):
            assert views.shape == expected.shape and torch.equal(labels, expected_labels)
            # DALI's and torchvision's antialiased resizes differ by a few levels; a wrong view differs by far more
            assert (views - expected).abs().mean() < 0.05, (views - expected).abs().mean()
            counted += len(labels)
    assert counted == 20
    if protocol == "center":  # CIFAR's test image as is: exactly the torch path's
        cifar = cifar_config(cifar_root)
        (dali,) = list(build_dali_val_loader(cifar, rank=0, world_size=1, batch_per_rank=100, protocol="center"))
        (reference,) = list(build_val_loader(cifar, rank=0, world_size=1, batch_per_rank=100, protocol="center"))
        torch.testing.assert_close(dali[0], reference[0], atol=1e-5, rtol=0)


def test_the_decoded_window_is_the_crop_of_the_rescaled_image(imagefolder_root):
    """Decoding only the crop's window and resizing it to the crop gives what resizing the whole image to the
    drawn shorter side and cropping gives (torchvision's order), up to resampling."""
    config = imagefolder_config(imagefolder_root, lighting_std=0.1)
    loader = build_dali_train_loader(config, rank=0, world_size=1, seed=7)
    images, _ = next(loader.epoch(0))
    dataset = open_dataset(imagefolder_root, "imagefolder", train=True)
    for image, (index, seed) in zip(images, loader.source.samples(0, 0), strict=True):
        decoded = decode_rgb(dataset.samples[index][0])
        height, width = decoded.shape[-2:]
        parameters = train_parameters(config, seed, (width, height))
        shorter = round(config.crop_size * min(width, height) / float(parameters["shape"][0]))
        assert config.scale_min <= shorter <= config.scale_max
        left, top = np.rint(parameters["anchor"] * shorter / min(width, height)).astype(int)
        expected = TF.resize(decoded, shorter, antialias=True).float()[:, top : top + 32, left : left + 32] / 255
        expected = expected.flip(-1) if parameters["flip"] else expected
        expected = TF.normalize(expected, (parameters["mean"] / 255).tolist(), STD)
        assert (image - expected).abs().mean() < 0.1


def test_the_scale_augmentation_follows_its_distribution():
    """Over many samples of a 500 x 375 image: the shorter side is uniform over [256, 480], the 224 crop lies
    inside the rescaled image, the flip is a fair coin."""
    config = DataConfig(root="unused")
    drawn = [train_parameters(config, sample_seed(0, 0, i), (500, 375)) for i in range(9000)]
    shorter = np.array([round(224 * 375 / float(p["shape"][0])) for p in drawn])
    counts = np.bincount(shorter - 256, minlength=225)
    assert shorter.min() == 256 and shorter.max() == 480 and len(counts) == 225
    assert counts.min() > 9000 / 225 * 0.4 and counts.max() < 9000 / 225 * 1.8
    windows = np.array([np.concatenate([p["anchor"], p["shape"]]) for p in drawn])
    assert (windows[:, :2] >= 0).all() and (windows[:, 0] + windows[:, 2] <= 500 + 1e-3).all()
    assert (windows[:, 1] + windows[:, 3] <= 375 + 1e-3).all()
    assert 0.47 < np.mean([p["flip"] for p in drawn]) < 0.53


def test_an_epoch_left_unfinished_does_not_leak_into_the_next(cifar_root):
    loader = build_dali_train_loader(cifar_config(cifar_root), rank=0, world_size=1, seed=0)
    first = next(loader.epoch(0))  # abandoned after one batch
    whole = list(loader.epoch(1))
    assert len(whole) == loader.batches_per_epoch
    assert torch.equal(
        whole[0][0], next(build_dali_train_loader(cifar_config(cifar_root), rank=0, world_size=1, seed=0).epoch(1))[0]
    )
    assert not torch.equal(first[0], whole[0][0])
    evaluation = build_dali_val_loader(
        cifar_config(cifar_root), rank=0, world_size=1, batch_per_rank=30, protocol="center"
    )
    next(iter(evaluation))
    assert sum(len(labels) for _, labels in evaluation) == 100  # a new pass after an unfinished one is whole
    assert sum(len(labels) for _, labels in evaluation) == 100


def test_random_resized_crop_windows_follow_torchvision(imagefolder_root):
    """data.train_augment=random_resized_crop on DALI: windows of 8-100% of the area with aspect 3/4-4/3 inside
    the image, resized to the crop."""
    config = DataConfig(root="unused", train_augment="random_resized_crop")
    windows = [train_parameters(config, sample_seed(0, 0, i), (500, 375)) for i in range(4000)]
    shapes = np.array([w["shape"] for w in windows])
    corners = np.array([w["anchor"] for w in windows])
    area = shapes[:, 0] * shapes[:, 1] / (500 * 375)
    torch.manual_seed(0)
    reference = [v2.RandomResizedCrop(32).make_params([torch.empty(3, 375, 500)]) for _ in range(4000)]
    reference_area = np.array([p["height"] * p["width"] for p in reference]) / (500 * 375)
    assert area.min() > 0.07 and area.max() <= 1.0
    assert np.quantile(area, [0.25, 0.5, 0.75]) == pytest.approx(
        np.quantile(reference_area, [0.25, 0.5, 0.75]), abs=0.03
    )
    ratio = shapes[:, 0] / shapes[:, 1]
    assert ratio.min() > 0.74 and ratio.max() < 1.35
    assert (corners >= 0).all() and (corners + shapes <= [500, 375]).all()
    rrc = imagefolder_config(imagefolder_root, train_augment="random_resized_crop")
    images, _ = next(build_dali_train_loader(rrc, rank=0, world_size=1, seed=0).epoch(0))
    assert images.shape == (12, 3, 32, 32)


SLOW_READER = '''
import time
from data_pipeline.dali.sources import SampleReader

class SlowReader(SampleReader):
    """Each sample costs 10 ms to read, like a file on a slow disk: the reader processes' parallelism shows."""

    def encoded(self, index):
        time.sleep(0.01)
        return super().encoded(index)
'''


@pytest.mark.slow
def test_n_reader_processes_read_about_n_times_as_fast(cifar_root, tmp_path, monkeypatch):
    """DALI's pool gives each process a whole batch: without as many batches in flight as processes (the source's
    prefetch_queue_depth), the processes past the first wait."""
    import sys
    import time

    from data_pipeline.dali.graphs import build_train_pipeline
    from data_pipeline.dali.sources import TrainSource
    from data_pipeline.sampling import ShardedEpochSampler

    (tmp_path / "slow_reader.py").write_text(SLOW_READER)
    monkeypatch.syspath_prepend(str(tmp_path))
    from slow_reader import SlowReader

    dataset = open_dataset(cifar_root, "cifar", train=True)
    rates = {}
    for workers in (1, 4):
        config = cifar_config(cifar_root, batch_size=8, workers=workers, threads=1)
        sampler = ShardedEpochSampler(len(dataset), global_batch=8, rank=0, world_size=1, seed=0)
        pipeline = build_train_pipeline(TrainSource(SlowReader(dataset), sampler, config), config, "cpu", batch=8)
        pipeline.build()
        pipeline.run()  # the processes are up
        started = time.perf_counter()
        for _ in range(24):
            pipeline.run()
        rates[workers] = 24 / (time.perf_counter() - started)
        del pipeline
    assert rates[4] > 2.5 * rates[1], rates  # 80 ms of reading per batch: 12.5 batches/s per process at most
    assert "slow_reader" in sys.modules


def test_an_exif_rotated_jpeg_is_read_unrotated_on_both_paths(imagefolder_root, tmp_path):
    """One rule, torchvision's: the EXIF orientation is not applied. DALI's decoders would turn the image while the
    crop window comes from its unturned size: "the cropping window ... is not valid", and the paths would disagree."""
    import shutil

    from PIL import Image

    root = tmp_path / "data"
    shutil.copytree(imagefolder_root, root)
    for split in ("train", "val"):
        for path in sorted((root / split).rglob("*.JPEG"))[::3]:
            with Image.open(path) as image:
                exif = image.getexif()
                exif[0x0112] = 6  # orientation: turned 90 degrees (a portrait photo from a phone)
                image.save(path, exif=exif, quality=95)
    config = imagefolder_config(root)
    batches = list(build_dali_train_loader(config, rank=0, world_size=1, seed=0).epoch(0))  # a whole epoch
    assert len(batches) == 4 and all(images.shape == (12, 3, 32, 32) for images, _ in batches)
    dali = list(build_dali_val_loader(config, rank=0, world_size=1, batch_per_rank=20, protocol="center"))
    reference = list(build_val_loader(config, rank=0, world_size=1, batch_per_rank=20, protocol="center"))
    for (views, _), (expected, _) in zip(dali, reference, strict=True):
        assert (views - expected).abs().mean() < 0.05, (views - expected).abs().mean()


def test_header_sizes_are_pillows(tmp_path):
    """The feeder reads a JPEG's frame header or a PNG's IHDR itself; Pillow's size is the reference."""
    import io

    from PIL import Image

    from data_pipeline.dali.sources import header_size

    image = Image.new("RGB", (123, 45), (10, 200, 30))
    exif = image.getexif()
    exif[0x0112] = 6
    variants = {
        "baseline": dict(format="JPEG"),
        "progressive": dict(format="JPEG", progressive=True),
        "exif": dict(format="JPEG", exif=exif),
        "png": dict(format="PNG"),
    }
    for name, options in variants.items():
        buffer = io.BytesIO()
        (image.convert("L") if name == "png" else image).save(buffer, **options)
        assert header_size(buffer.getvalue()) == (123, 45), name
    assert header_size(b"GIF89a....") is None and header_size(b"\xff\xd8\xff\xe0\x00") is None


@pytest.mark.slow
def test_the_feeder_bench_prints_one_processs_rate(imagefolder_root):
    import subprocess

    command = [
        RESIDUAL,
        "bench",
        "loader",
        "--data",
        str(imagefolder_root),
        "--feeder-only",
        "--batch",
        "8",
        "--batches",
        "3",
        "--rounds",
        "2",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split()[1]) > 0 and "one DALI reader process's work, batch 8" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run on a GPU machine")
def test_the_gpus_decoded_pixels_are_the_cpus(imagefolder_root):
    """The mixed decoder upsamples chroma as libjpeg-turbo does (jpeg_fancy_upsampling): the GPU's views are the
    CPU path's within a few levels (issue 24, item 9)."""
    cpu = imagefolder_config(imagefolder_root)
    gpu = imagefolder_config(imagefolder_root, device="gpu")
    (on_cpu, _), *_ = list(build_dali_val_loader(cpu, rank=0, world_size=1, batch_per_rank=20, protocol="center"))
    (on_gpu, _), *_ = list(build_dali_val_loader(gpu, rank=0, world_size=1, batch_per_rank=20, protocol="center"))
    assert on_gpu.is_cuda
    assert (on_gpu.cpu() - on_cpu).abs().mean() < 0.02  # normalized units: about one of 255 levels
