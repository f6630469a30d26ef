"""Model FLOP utilization (MFU): the share of the GPUs' dense peak that the model's own arithmetic uses,
3 x forward FLOPs per image (forward, and backward at twice the forward) x images/s / (peak x GPUs)."""

from __future__ import annotations

import functools
from typing import Any

import torch

from trainer.config import Config
from trainer.models.complexity import count_params_and_macs

# Dense (no sparsity) tensor-core peaks in TFLOP/s for bf16 and fp16 from NVIDIA's data sheets, and the whole
# chip's SM count; the first name found in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_TFLOPS = (
    ("B200", 2250.0, 148),
    ("H100 NVL", 835.0, 132),
    ("H200 NVL", 835.0, 132),
    ("H100 PCIe", 756.0, 114),
    ("H800 PCIe", 756.0, 114),
    ("H100", 989.0, 132),
    ("H200", 989.0, 132),
    ("H800", 989.0, 132),
    ("A100", 312.0, 108),
    ("A800", 312.0, 108),
    ("L40S", 362.0, 142),
)


def table_peak_flops(name: str, sms: int) -> float | None:
    """A GPU's dense bf16/fp16 peak FLOP/s from its name and the SMs it has: a MIG slice's share of its chip."""
    for key, tflops, chip_sms in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12 * min(1.0, sms / chip_sms)
    return None


def peak_flops(device: torch.device, precision: str) -> float | None:
    """One GPU's peak FLOP/s for the training precision; None on a CPU, in fp32 or for a GPU not in the table."""
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    properties = torch.cuda.get_device_properties(device)
    return table_peak_flops(properties.name, properties.multi_processor_count)


def training_flops_per_image(config: Config, epoch: int | None = None) -> float:
    """At the training crop of ``epoch`` (progressive resizing trains smaller crops first: FFCV's 160-pixel epochs
    cost 0.69 of its 192-pixel ones); without one, at ``data.crop_size``."""
    data = config.data
    size = {"cifar": 32, "idx": 28}.get(data.format) or (data.crop_size if epoch is None else data.train_crop(epoch))
    return 3 * 2 * forward_macs(config.model.name, size, tuple(sorted(config.model.overrides().items())))


@functools.cache
def forward_macs(name: str, size: int, overrides: tuple[tuple[str, Any], ...]) -> int:
    return count_params_and_macs(name, image_size=size, **dict(overrides))[1]
