"""The DALI pipeline graphs: training (decode the crop's window, resize, flip, lighting, normalize, the modern
recipes' auto-augmentation and erasing) and evaluation (center crop, 10-crop, multi-scale), on the GPU
(``mixed`` decoding) or in DALI's CPU-only mode."""

from __future__ import annotations

import os

import torch

from data_pipeline.config import DataConfig
from data_pipeline.dali.sources import EvalSource, TrainSource
from data_pipeline.sampling import sample_seed


def _normalization(config: DataConfig) -> dict:
    return {"mean": [255 * m for m in config.mean], "std": [255 * s for s in config.std]}


def _pipeline_options(batch: int, device: str, config: DataConfig) -> dict:
    """What every pipeline here is built with: its batch, the GPU or DALI's CPU-only mode (``device_id=None``),
    ``data.threads`` CPU threads (as training resolves "auto": trainer.machine.auto.plan_threads; alone, this process's
    cores), and ``data.workers`` reader processes started with spawn (CUDA may be initialised already)."""
    threads = config.threads if config.threads != "auto" else len(os.sched_getaffinity(0))
    return dict(
        batch_size=batch,
        num_threads=threads,
        device_id=torch.cuda.current_device() if device == "gpu" else None,
        py_num_workers=max(1, _workers(config)),
        py_start_method="spawn",
    )


def _workers(config: DataConfig) -> int:
    return config.workers if config.workers != "auto" else 1


def _external_source_options(config: DataConfig) -> dict:
    """A source's batches come from the reader processes, one whole batch per process: as many batches in flight as
    processes, or one process works while the others wait (DALI's default depth is 1)."""
    workers = _workers(config)
    return {"parallel": True, "prefetch_queue_depth": max(2, workers)} if workers > 0 else {"parallel": False}


def build_train_pipeline(source: TrainSource, config: DataConfig, device: str, *, batch: int):
    from nvidia.dali import fn, pipeline_def

    names = ["data", "labels", *source.parameter_names()]
    # auto_aug chooses ops with DALI's conditionals; its generator's seed: the start's (epoch, batch)
    seed = sample_seed(source.sampler.seed, source.first_epoch, source.first_batch)
    options = _pipeline_options(batch, device, config) | {
        "enable_conditionals": config.auto_augment != "none",
        "seed": seed % 2**31,
    }

    @pipeline_def(**options)
    def pipeline():
        layouts = ["HWC" if config.in_memory else "", *[""] * (len(names) - 1)]
        outputs = fn.external_source(
            source=source,
            num_outputs=len(names),
            batch=True,
            batch_info=True,
            layout=layouts,
            **_external_source_options(config),
        )
        given = {name: outputs[position] for position, name in enumerate(names)}  # (autograph has no zip(strict))
        labels = given["labels"]
        if config.in_memory:
            images = padded_window(given, config, source.reader.side, device)
        else:
            images = decoded_window(given, config, device)
        if config.random_erase > 0:
            images = fn.erase(
                images, anchor=given["erase_anchor"], shape=given["erase_shape"], axis_names="HW", fill_value=0.0
            )
        return images, labels.gpu() if device == "gpu" else labels

    return pipeline()


def padded_window(given: dict, config: DataConfig, side: int, device: str):
    """Images held in memory (CIFAR's recipe): the side x side window at the drawn (x, y) in -4..4 of the image
    zero-padded by 4, flipped where drawn, normalized."""
    from nvidia.dali import fn, types

    images = given["data"].gpu() if device == "gpu" else given["data"]
    padded = fn.slice(
        images,
        start=given["offset"],
        shape=[side, side],
        axis_names="WH",
        out_of_bounds_policy="pad",
        fill_values=0,
    )
    return fn.crop_mirror_normalize(
        auto_augment(padded, config),
        mirror=given["flip"],
        dtype=types.FLOAT,
        output_layout="CHW",
        **_normalization(config),
    )


def decoded_window(given: dict, config: DataConfig, device: str):
    """Encoded images (ImageNet's recipe): only the drawn crop's window decoded, resized to the crop, flipped where
    drawn, normalized by the sample's drawn mean (which carries its lighting noise)."""
    from nvidia.dali import fn, types

    images = fn.decoders.image_slice(
        given["data"],
        given["anchor"],
        given["shape"],
        axis_names="WH",
        output_type=types.RGB,
        normalized_anchor=False,
        normalized_shape=False,
        device="mixed" if device == "gpu" else "cpu",
        adjust_orientation=False,  # as torchvision (and Pillow's header size, the window's frame): no EXIF turn
        jpeg_fancy_upsampling=True,  # the GPU's chroma upsampling as libjpeg-turbo's (Pillow, DALI's CPU)
    )
    images = fn.resize(images, size=given["size"], antialias=True)
    return fn.crop_mirror_normalize(
        auto_augment(images, config),
        mirror=given["flip"],
        mean=given["mean"],
        std=_normalization(config)["std"],
        dtype=types.FLOAT,
        output_layout="CHW",
    )


def auto_augment(images, config: DataConfig):
    """data.auto_augment on a batch of uint8 HWC images, with nvidia.dali.auto_aug (its ops and magnitudes drawn
    by DALI's generator, from the pipeline's seed: not per sample)."""
    from nvidia.dali.auto_aug import rand_augment, trivial_augment

    if config.auto_augment == "trivial_augment_wide":
        return trivial_augment.trivial_augment_wide(images)
    if config.auto_augment == "rand_augment":
        return rand_augment.rand_augment(images, n=config.rand_augment_ops, m=config.rand_augment_magnitude)
    return images


def ten_crop_windows() -> list[tuple[float, float, int]]:
    """(relative x, relative y, mirror) of the ten views in torchvision's TenCrop order: the corners and center of
    the image, then those of its mirror image (whose top-left crop is the mirrored top-right one, and so on)."""
    five = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5)]
    mirrored = [(1.0, 0.0), (0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (0.5, 0.5)]
    return [(x, y, 0) for x, y in five] + [(x, y, 1) for x, y in mirrored]


def build_eval_pipeline(source: EvalSource, config: DataConfig, device: str, *, protocol: str):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(**_pipeline_options(source.batch, device, config))
    def pipeline():
        layout = "HWC" if config.in_memory else ""
        data, labels = fn.external_source(
            source=source,
            num_outputs=2,
            batch=True,
            batch_info=True,
            layout=[layout, ""],
            **_external_source_options(config),
        )
        normalize = dict(dtype=types.FLOAT, output_layout="CHW", **_normalization(config))
        if config.in_memory:  # the test image as is
            images = fn.crop_mirror_normalize(data.gpu() if device == "gpu" else data, **normalize)
        else:
            images = fn.decoders.image(
                data,
                device="mixed" if device == "gpu" else "cpu",
                output_type=types.RGB,
                adjust_orientation=False,
                jpeg_fancy_upsampling=True,
            )
            images = fn.resize(images, resize_shorter=config.val_resize, antialias=True)
            crop = (config.eval_crop, config.eval_crop)
            if protocol == "center":
                images = fn.crop_mirror_normalize(images, crop=crop, **normalize)
            else:  # flip: B x 2 x 3 x crop x crop; tencrop: B x 10 x ...
                windows = [(0.5, 0.5, 0), (0.5, 0.5, 1)] if protocol == "flip" else ten_crop_windows()
                views = [
                    fn.crop_mirror_normalize(images, crop=crop, crop_pos_x=x, crop_pos_y=y, mirror=m, **normalize)
                    for x, y, m in windows
                ]
                images = fn.stack(*views, axis=0)
        return images, labels.gpu() if device == "gpu" else labels

    return pipeline()
