"""Evaluation as the paper did it (Sec. 3.4, Table 2-4): center crop, 10-crop and multi-scale fully-convolutional
testing, with exact top-1/top-5 counts summed over ranks.

Views come from the data pipeline (data_pipeline.augment.transforms.build_eval_transform) as one tensor per image
(center), ten stacked crops per image (tencrop, decoded and resized once, forwarded B views at a time) or one
[image, flip] pair per scale (multiscale, batched by shape); the class probabilities of all views of an image
are averaged.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from data_pipeline.errors import UserError
from trainer.eval.counts import CALIBRATION_BINS, EvalResult, topk_hits
from trainer.machine.distributed import all_reduce_sum, any_rank, largest_over_ranks
from trainer.recipe.precision import maybe_autocast


class ViewScorer:
    """Class probabilities of a batch of views, averaged over each image's views."""

    def __init__(
        self, model: nn.Module, *, device: torch.device, precision: str, channels_last: bool, sharded: bool = False
    ) -> None:
        self.model = model
        self.device = device
        self.sharded = sharded  # the forward is a collective (FSDP2): every rank must run as many
        self.precision = precision
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        with maybe_autocast(self.device, self.precision):
            logits = self.model(images)
        return logits.float().softmax(dim=1)

    def __call__(self, views: torch.Tensor | list[list[torch.Tensor]]) -> torch.Tensor:
        if isinstance(views, list):
            return self.multiscale(views)
        if views.ndim == 5:  # B x V x C x H x W
            # Forwards of B views each: the size of a center-crop forward at the same batch, so memory stays that
            # of center-crop and the throughput per view too (one B*V forward ran 17% slower per image on a CPU).
            batch, count = views.shape[:2]
            chunks = views.flatten(0, 1).split(batch)
            return torch.cat([self.probabilities(chunk) for chunk in chunks]).view(batch, count, -1).mean(dim=1)
        return self.probabilities(views)

    def multiscale(self, views: list[list[torch.Tensor]]) -> torch.Tensor:
        """``views[i][s]`` is image i at scale s and its flip (2 x C x H x W): views of one shape go in one forward."""
        by_shape: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = defaultdict(list)
        for index, scales in enumerate(views):
            for pair in scales:
                by_shape[tuple(pair.shape)].append((index, pair))
        # FSDP2: the shapes, so the forwards, depend on each rank's images: every rank runs as many as the most
        forwards = largest_over_ranks(len(by_shape), self.device) if self.sharded else len(by_shape)
        totals: torch.Tensor | None = None
        for group in by_shape.values():
            probabilities = self.probabilities(torch.cat([pair for _, pair in group]))
            per_image = probabilities.view(len(group), -1, probabilities.shape[1]).sum(dim=1)
            if totals is None:
                totals = torch.zeros(len(views), probabilities.shape[1], device=probabilities.device)
            totals.index_add_(0, torch.tensor([index for index, _ in group], device=totals.device), per_image)
        for _ in range(forwards - len(by_shape)):
            self.probabilities(views[0][0][:1])  # joins the other ranks' all-gathers; its scores count for nothing
        return totals / (2 * len(views[0]))


def in_lockstep(batches: Iterable, device: torch.device) -> Iterator[tuple[Any, torch.Tensor]]:
    """The batches, then, while any other rank still has one, this rank's last batch again with no labels (its
    forward joins the others' collectives, its scores count for nothing). One flag all-reduce per batch."""
    iterator, last = iter(batches), None
    while True:
        batch = next(iterator, None)
        (any_left,) = any_rank([batch is not None], device)
        if not any_left:
            return
        if batch is not None and len(batch[0]) > 0:
            last = batch
            yield batch
        elif last is not None:  # done, or a batch of images all left out (data.skip_corrupt)
            views, labels = last
            yield views, labels[:0]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable,
    *,
    num_classes: int,
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
    sharded: bool = False,
    predictions: bool = False,
) -> EvalResult:
    """Every rank passes its own share of the images and gets the counts over all of them: top-1/top-5 per class,
    the confusion matrix and the calibration bins. ``sharded``: the model's forward is a collective (FSDP2 gathers
    each layer's shards), so every rank runs as many forwards as the rank with the most batches. ``predictions``:
    keep each image's label, top-1 class and confidence (not its scores), gathered from every rank."""
    was_training = model.training
    model.eval()
    score = ViewScorer(model, device=device, precision=precision, channels_last=channels_last, sharded=sharded)
    # The counts live on the evaluation's device, beside the scores: labels come to it from wherever the loader
    # put them (DALI on a GPU and CIFAR tensors: the GPU; the torch path: the CPU); nothing is read back until the end.
    counts = torch.zeros(num_classes, 3, dtype=torch.int64, device=device)  # per class: top-1, top-5, images
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    calibration = torch.zeros(CALIBRATION_BINS, 3, dtype=torch.float64, device=device)
    kept: list[torch.Tensor] = []  # per image: label, top-1 class, confidence (``predictions``)
    started = time.perf_counter()
    for views, labels in in_lockstep(batches, device) if sharded else batches:
        if len(views) == 0:  # every image of the batch left out (data.skip_corrupt)
            continue
        scores = score(views)
        if len(labels) == 0:  # a lockstep repeat: its forward joined the other ranks'; it counts for nothing
            continue
        labels = labels.to(device, non_blocking=True)
        top = scores.topk(min(5, scores.shape[1]), dim=1).indices  # one ranking for every count, ties included
        hit1, hit5 = topk_hits(scores, labels, top=top)
        counts.index_add_(0, labels, torch.stack([hit1, hit5, torch.ones_like(hit1)], dim=1).long())
        top1 = top[:, 0]
        confidence = scores.gather(1, top1[:, None]).squeeze(1)
        confusion.index_add_(0, labels * num_classes + top1, torch.ones_like(labels))
        bins = (confidence * CALIBRATION_BINS).long().clamp_(max=CALIBRATION_BINS - 1)
        calibration.index_add_(0, bins, torch.stack([torch.ones_like(confidence), confidence, hit1], 1).double())
        if predictions:
            kept.append(torch.stack([labels.float(), top1.float(), confidence], dim=1))
    seconds = time.perf_counter() - started
    model.train(was_training)
    counts = all_reduce_sum(counts, device)
    confusion = all_reduce_sum(confusion, device).view(num_classes, num_classes).cpu()
    calibration = all_reduce_sum(calibration, device).cpu()
    correct1, correct5, count = counts.sum(dim=0).tolist()
    if count == 0:
        raise UserError(
            "no validation image was evaluated: each was undecodable and left out (data.skip_corrupt), or the set is "
            "empty; `residual data verify DIR` lists the damaged files"
        )
    per_image = gather_in_rank_order(torch.cat(kept).cpu() if kept else torch.zeros(0, 3)) if predictions else None
    per_class = tuple(map(tuple, counts.tolist()))
    return EvalResult(correct1, correct5, count, per_class, seconds, confusion, calibration, per_image)


def gather_in_rank_order(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, rank 0's first: the data set's order, as each rank evaluates a contiguous share of it
    (data_pipeline.sampling.val_share). Small: three numbers per image."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    shares: list[torch.Tensor | None] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, local)
    return torch.cat(shares)
