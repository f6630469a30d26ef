"""Exact top-1/top-5 over a validation set: counts, not rates, summed over ranks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from trainer.distributed import all_reduce_sum


@dataclass(frozen=True)
class EvalResult:
    correct1: int
    correct5: int
    count: int

    @property
    def top1(self) -> float:
        return self.correct1 / self.count

    @property
    def top5(self) -> float:
        return self.correct5 / self.count

    def as_dict(self) -> dict[str, float | int]:
        return {
            "correct1": self.correct1,
            "correct5": self.correct5,
            "count": self.count,
            "top1": self.top1,
            "top5": self.top5,
            "top1_error": 1 - self.top1,
            "top5_error": 1 - self.top5,
        }


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """How many rows have their label among the k highest logits, for each k (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable, *, device: torch.device, precision: str, channels_last: bool
) -> EvalResult:
    """Center-crop (one view) evaluation; every rank passes its own share and gets the global counts."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.int64)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for images, labels in batches:
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(images)
        correct1, correct5 = topk_correct(logits.float().cpu(), labels)
        counts += torch.tensor([correct1, correct5, len(labels)])
    model.train(was_training)
    return EvalResult(*all_reduce_sum(counts, device).tolist())
