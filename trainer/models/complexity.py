"""Parameters and multiply-adds of the registered models beside the paper's figures (Table 1, Table 6)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer.models.registry import create_model, get_model_spec, list_models


def count_params_and_macs(name: str, image_size: int | None = None, **overrides: Any) -> tuple[int, int]:
    """Counted on the meta device (no memory, no arithmetic), for one image of ``image_size`` (default: the
    paper's, 224 or 32). FlopCounterMode counts 2 FLOPs per multiply-add of the convolutions and the fc layer, the
    operations the paper's FLOP figures count."""
    size = image_size or get_model_spec(name).image_size
    with torch.device("meta"):
        model = create_model(name, **overrides)
        image = torch.empty(1, model.conv1.in_channels, size, size)
    with FlopCounterMode(display=False) as counter:
        model(image)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2


def complexity_table() -> list[dict[str, Any]]:
    """One row per registered model. Bottleneck nets are counted with ``stride_in_1x1=True``, the paper's layout,
    whose FLOPs Table 1 gives (torchvision's v1.5 layout costs about 7% more)."""
    rows = []
    for name in list_models():
        spec = get_model_spec(name)
        params, macs = count_params_and_macs(name, stride_in_1x1=True)
        rows.append(
            {
                "name": name,
                "dataset": spec.dataset,
                "params": params,
                "macs": macs,
                "paper_params": spec.paper_params,
                "paper_macs": spec.paper_macs,
            }
        )
    return rows
