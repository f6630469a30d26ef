"""``residual bench loader``: images/s of the DALI and torchvision paths on the same files, measured alternately
in one run, with the ratio of their medians (docs/benchmarks.md keeps the figures)."""

from __future__ import annotations

import statistics
import time

import torch

from data_pipeline.config import DataConfig
from data_pipeline.loaders import build_train_loader, build_val_loader

PIPELINES = ("paper", "val", "tencrop")


def bench_loader(*, data: str, backends: list[str], pipeline: str, batch: int, batches: int, rounds: int,
                 workers: int) -> None:  # fmt: skip
    loaders = {backend: make_loader(data, backend, pipeline, batch, workers) for backend in backends}
    rates: dict[str, list[float]] = {backend: [] for backend in backends}
    for round_index in range(rounds + 1):  # round 0 warms up: worker start, pipeline build, file cache
        for backend, loader in loaders.items():
            start, images = time.perf_counter(), 0
            for index, (views, _) in enumerate(loader(round_index)):
                images += len(views)
                if index + 1 == batches:
                    break
            if views.is_cuda:
                torch.cuda.synchronize()
            if round_index > 0:
                rates[backend].append(images / (time.perf_counter() - start))
    for backend in backends:
        shown = ", ".join(f"{rate:.0f}" for rate in rates[backend])
        print(f"{backend:<6} {statistics.median(rates[backend]):8.1f} images/s   (rounds: {shown})")
    if len(backends) == 2:
        ratio = statistics.median(rates["dali"]) / statistics.median(rates["torch"])
        print(
            f"dali / torch = {ratio:.2f}  [{pipeline}, batch {batch}, {workers} workers, {batches} batches per round, "
            f"medians of {rounds} rounds, {data}]"
        )


def make_loader(data: str, backend: str, pipeline: str, batch: int, workers: int):
    config = DataConfig(root=data, backend=backend, batch_size=batch, workers=workers)
    if pipeline == "paper":
        train = build_train_loader(config, rank=0, world_size=1, seed=0)
        return lambda round_index: train.epoch(round_index % max(1, train.batches_per_epoch))
    evaluation = build_val_loader(config, rank=0, world_size=1, batch_per_rank=batch, protocol=pipeline.replace(
        "val", "center"))  # fmt: skip
    return lambda round_index: iter(evaluation)
