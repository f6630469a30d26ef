"""Model FLOP utilization (MFU): the share of the GPUs' dense peak that the model's own arithmetic uses,
3 x forward FLOPs per image (forward, and backward at twice the forward) x images/s / (peak x GPUs)."""

from __future__ import annotations

import torch

from trainer.config import Config
from trainer.models.complexity import count_params_and_macs

# Dense (no sparsity) tensor-core peaks in TFLOP/s for bf16 and fp16 from NVIDIA's data sheets, and the whole
# chip's SM count; the first name found in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_TFLOPS = (
    ("H100 NVL", 835.0, 132),
    ("H200 NVL", 835.0, 132),
    ("H100 PCIe", 756.0, 114),
    ("H100", 989.0, 132),
    ("H200", 989.0, 132),
    ("A100", 312.0, 108),
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


def training_flops_per_image(config: Config) -> float:
    size = {"cifar": 32, "idx": 28}.get(config.data.format, config.data.crop_size)  # CIFAR's, MNIST's images
    _, macs = count_params_and_macs(config.model.name, image_size=size, **config.model.overrides())
    return 3 * 2 * macs
