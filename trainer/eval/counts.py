"""What an evaluation counts, and the top-k hits it counts them by: ``EvalResult`` (exact top-1/top-5 counts, per
class, the confusion matrix and the calibration bins) and ``topk_hits``, shared by the evaluation
(trainer.eval.evaluate) and the training's running top-1/top-5 (trainer.training.metrics), which must count alike."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

CALIBRATION_BINS = 15  # of the top-1 softmax confidence, equal widths (Guo et al. 2017's ECE)


@dataclass(frozen=True)
class EvalResult:
    correct1: int
    correct5: int
    count: int
    per_class: tuple[tuple[int, int, int], ...] = ()  # (correct1, correct5, count) of each class
    seconds: float = 0.0
    # classes x classes image counts, row the true class, column the top-1 prediction (summed over ranks)
    confusion: torch.Tensor | None = field(default=None, compare=False, repr=False)
    # CALIBRATION_BINS x 3 (images, summed confidence, top-1 correct) by top-1 confidence (summed over ranks)
    calibration: torch.Tensor | None = field(default=None, compare=False, repr=False)
    # images x 3 (label, top-1 class, its confidence), in the data set's order over all ranks, where asked for
    predictions: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def top1(self) -> float:
        return self.correct1 / self.count

    @property
    def top5(self) -> float:
        return self.correct5 / self.count

    @property
    def images_per_second(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "correct1": self.correct1,
            "correct5": self.correct5,
            "count": self.count,
            "top1": self.top1,
            "top5": self.top5,
            "top1_error": 1 - self.top1,
            "top5_error": 1 - self.top5,
            "images_per_second": self.images_per_second,
        }


def calibration_error(calibration: torch.Tensor) -> float:
    """Expected calibration error: the image-weighted mean gap between accuracy and confidence over the bins."""
    images, confidence, correct = calibration.T
    return float((correct - confidence).abs().sum() / images.sum())


def topk_hits(
    scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5), top: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Per image, whether its label is among its k best classes, for each k; ``top``: the ranking, if made."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices if top is None else top
    hits = top == labels[:, None]
    return [hits[:, :k].any(dim=1) for k in ks]
