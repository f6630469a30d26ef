"""Mixed precision (``train.precision``): autocast to bf16 or fp16; fp16 adds a gradient scaler whose skipped
steps (inf/NaN gradients, after which the scale halves) are counted."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def maybe_autocast(device: torch.device, precision: str) -> AbstractContextManager:
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def build_grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Enabled for fp16 only; disabled, it passes the loss and the step straight through."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
