"""``residual bench loader``: images/s of the DALI and torchvision paths on the same files, measured alternately
in one run, with the ratio of their medians (docs/benchmarks.md keeps the figures)."""

from __future__ import annotations

import itertools
import statistics
import time

import torch

from data_pipeline.config import DataConfig
from data_pipeline.loaders import build_train_loader, build_val_loader

PIPELINES = ("paper", "val", "tencrop")


def bench_loader(
    *, data: str, backends: list[str], pipeline: str, batch: int, batches: int, rounds: int, workers: int
) -> None:
    """Training pipelines: ``batches`` batches per round from one endless stream of epochs (steady state);
    evaluation pipelines: one whole pass over the val set per round."""
    streams = {backend: make_stream(data, backend, pipeline, batch, workers) for backend in backends}
    rates: dict[str, list[float]] = {backend: [] for backend in backends}
    for round_index in range(rounds + 1):  # round 0 warms up: worker start, pipeline build, file cache
        for backend, stream in streams.items():
            start, images = time.perf_counter(), 0
            for views, _ in stream(batches):
                images += len(views)
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


def bench_feeder(*, data: str, batch: int, batches: int, rounds: int) -> None:
    """What one DALI reader process does per training batch (read each file, check its header, draw the batch's
    augmentation), in this process alone, without DALI: the images/s one reader process can feed."""
    from data_pipeline.dali.loader import build_dali_train_loader

    source = build_dali_train_loader(
        DataConfig(root=data, backend="dali", batch_size=batch, workers=0), rank=0, world_size=1, seed=0
    ).source
    per_epoch = source.sampler.batches_per_epoch
    steps = ((index // per_epoch, index % per_epoch) for index in itertools.count())
    rates = []
    for round_index in range(rounds + 1):  # round 0 warms up: the file cache
        start = time.perf_counter()
        for _ in range(batches):
            source.batch(*next(steps))
        if round_index > 0:
            rates.append(batches * batch / (time.perf_counter() - start))
    shown = ", ".join(f"{rate:.0f}" for rate in rates)
    print(f"feeder {statistics.median(rates):8.1f} images/s   (rounds: {shown})")
    print(
        f"[one DALI reader process's work, batch {batch}, {batches} batches per round, medians of {rounds} rounds, "
        f"{data}]"
    )


def make_stream(data: str, backend: str, pipeline: str, batch: int, workers: int):
    config = DataConfig(root=data, backend=backend, batch_size=batch, workers=workers)
    if pipeline == "paper":
        train = build_train_loader(config, rank=0, world_size=1, seed=0)
        endless = itertools.chain.from_iterable(train.epoch(epoch) for epoch in itertools.count())
        return lambda batches: itertools.islice(endless, batches)
    protocol = "center" if pipeline == "val" else pipeline
    evaluation = build_val_loader(config, rank=0, world_size=1, batch_per_rank=batch, protocol=protocol)
    return lambda batches: iter(evaluation)
