"""Mixup and CutMix of a batch on the training device, after the data pipeline, so either backend feeds them.

As torchvision's ``transforms.v2.MixUp``/``CutMix`` do it: each image is blended with the batch rolled by one
(image i with image i - 1) and the target is the same blend of the two one-hot labels; CutMix pastes a box of the
rolled batch whose area fixes the label weights. A batch's draws (whether it is mixed, which of the two, lambda,
the box) come from a generator seeded by (train.seed, iteration, rank) alone, so a resumed run mixes exactly as the
run it continues. The running top-1/top-5 count against each image's dominant label: its own when lambda >= 1/2,
else its neighbour's.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from trainer.config import LossConfig


def cutmix_box(lam: float, height: int, width: int, u: tuple[float, float]) -> tuple[int, int, int, int]:
    """CutMix's box (top, bottom, left, right) for ``lam``: side ratio sqrt(1 - lam), centred at the uniform draws
    ``u`` of the image, clipped to it (torchvision's CutMix; the clipped area is what the labels weigh)."""
    center_y, center_x = int(u[0] * height), int(u[1] * width)
    ratio = 0.5 * math.sqrt(1.0 - lam)
    half_h, half_w = int(ratio * height), int(ratio * width)
    top, bottom = max(center_y - half_h, 0), min(center_y + half_h, height)
    left, right = max(center_x - half_w, 0), min(center_x + half_w, width)
    return top, bottom, left, right


class BatchMixer:
    def __init__(self, config: LossConfig, *, num_classes: int, seed: int, rank: int) -> None:
        self.config, self.num_classes, self.seed, self.rank = config, num_classes, seed, rank

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, iteration: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, targets, dominant labels) of batch ``iteration``: the targets are class probabilities (N x C)
        when the batch is mixed, else the labels themselves."""
        config = self.config
        if not config.mixing:
            return images, labels, labels
        draws = np.random.default_rng([self.seed, iteration, self.rank])
        if draws.random() >= config.mix_prob:
            return images, labels, labels
        use_cutmix = config.cutmix_alpha > 0 and (config.mixup_alpha == 0 or draws.random() < config.switch_prob)
        alpha = config.cutmix_alpha if use_cutmix else config.mixup_alpha
        lam = float(draws.beta(alpha, alpha))
        rolled = images.roll(1, 0)
        if use_cutmix:
            height, width = images.shape[-2:]
            top, bottom, left, right = cutmix_box(lam, height, width, tuple(draws.random(2)))
            images = images.clone()
            images[..., top:bottom, left:right] = rolled[..., top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (height * width)
        else:
            images = rolled.mul(1.0 - lam).add_(images, alpha=lam)
        return images, mixed_targets(labels, lam, self.num_classes), dominant_labels(labels, lam)


def mixed_targets(labels: torch.Tensor, lam: float, num_classes: int) -> torch.Tensor:
    """lam x one-hot(label) + (1 - lam) x one-hot(the rolled batch's label)."""
    one_hot = F.one_hot(labels, num_classes).float()
    return one_hot.roll(1, 0).mul_(1.0 - lam).add_(one_hot, alpha=lam)


def dominant_labels(labels: torch.Tensor, lam: float) -> torch.Tensor:
    """Each image's label of the larger share: its own for lam >= 1/2, else that of the image rolled onto it."""
    return labels if lam >= 0.5 else labels.roll(1, 0)
