"""The DALI path (``data.backend=dali``): the paper's augmentations as DALI pipelines, on the GPU (JPEG decoding
with ``device="mixed"``, every op on the GPU, CUDA tensors out) or, without one, in DALI's CPU-only mode
(``device_id=None``). ``data.device`` forces either; the choice is logged.

Order, sharding and resume are the torchvision path's: the same ``ShardedEpochSampler`` picks each rank's images
of each batch, and every random parameter of a sample's augmentation (scale, crop position, flip, lighting) is
drawn from that sample's own seed in Python and fed to the pipeline with the encoded image. So a DALI epoch can
start at any batch, and a resumed run sees the same crops, with no reader state to checkpoint. The pipelines
receive encoded files (ImageFolder) or the in-memory CIFAR arrays through ``external_source``; with
``data.workers > 0`` the files are read by that many DALI worker processes (parallel external source).

Batches are the torch path's: N x 3 x H x W normalized float32 images and int64 labels.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from data_pipeline.config import DataConfig
from data_pipeline.dali.graphs import build_eval_pipeline, build_train_pipeline
from data_pipeline.dali.sources import EvalSource, SampleReader, TrainSource
from data_pipeline.datasets import open_dataset
from data_pipeline.errors import UserError, from_worker_traceback
from data_pipeline.sampling import (
    ShardedEpochSampler,
    training_sampler,
    val_share,
)
from data_pipeline.torch_loader import Batch, interrupts_ignored

log = logging.getLogger(__name__)


def dali_device(requested: str) -> str:
    """ "gpu" when asked for or (``auto``) when CUDA is present, else "cpu"."""
    if requested == "gpu" and not torch.cuda.is_available():
        raise UserError("data.device=gpu: no CUDA device here; data.device=cpu runs DALI in its CPU-only mode")
    return "gpu" if requested == "gpu" or (requested == "auto" and torch.cuda.is_available()) else "cpu"


@dataclass
class DaliTrainLoader:
    """The DALI counterpart of ``TrainLoader``: ``epoch(e, start_batch)`` yields (images, labels) batches."""

    source: TrainSource
    sampler: ShardedEpochSampler
    classes: list[str]
    device: str
    channels: int
    _pipeline: object = None
    _next_epoch: tuple[int, int] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """The pipeline runs on into the next epoch when the last one was read to its end; a new start, a jump or
        an epoch left unfinished gets a pipeline of its own."""
        if self._next_epoch != (epoch, start_batch):
            self.source.first_epoch, self.source.first_batch = epoch, start_batch
            self._pipeline = build_train_pipeline(
                self.source, self.source.config, self.device, batch=self.sampler.per_rank
            )
            with interrupts_ignored():  # its reader processes: Ctrl-C is the trainer's
                self._pipeline.build()
        self._next_epoch = None

        def finished() -> None:
            self._next_epoch = (epoch + 1, 0)

        return run_pipeline(
            self._pipeline, finished, lambda produced: self.source.explain(epoch, start_batch, produced)
        )


def run_pipeline(pipeline, finished, explain=lambda produced: None) -> Iterator[Batch]:
    """Batches until the source's epoch ends; the pipeline is then reset for the next one and ``finished()``.
    When DALI fails on a batch, ``explain(batches produced)`` names the files at fault, where it can."""
    produced = 0
    while True:
        try:
            images, labels = pipeline.run()
        except StopIteration:
            pipeline.reset()
            finished()
            return
        except Exception as error:
            if "received from worker" in str(error) and (raised := from_worker_traceback(str(error))) is not None:
                raise raised from None  # raised in a reader worker process: its one line
            if not isinstance(error, RuntimeError) or (culprits := explain(produced)) is None:
                raise
            raise UserError(f"{culprits} (DALI: {str(error).strip().splitlines()[-1][:200]})") from None
        produced += 1
        yield to_torch(images, torch.float32), to_torch(labels, torch.int64)


def to_torch(tensors, dtype: torch.dtype) -> torch.Tensor:
    """A dense DALI TensorList as a torch tensor on its device (a copy: DALI reuses its buffers)."""
    from nvidia.dali.backend import TensorListGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray

    tensor = tensors.as_tensor()
    if isinstance(tensors, TensorListGPU):
        out = torch.empty(tensor.shape(), dtype=dtype, device=torch.device("cuda", torch.cuda.current_device()))
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream())
        return out
    return torch.from_numpy(np.array(tensor)).to(dtype)


def build_dali_train_loader(config: DataConfig, *, rank: int, world_size: int, seed: int) -> DaliTrainLoader:
    dataset = open_dataset(config.root, config.format, train=True, index_dir=config.index_dir)
    sampler = training_sampler(config, len(dataset), rank=rank, world_size=world_size, seed=seed)
    device = dali_device(config.device)
    log.info("data: DALI %s pipeline (%s), %d reader workers", device, config.format, config.workers)
    source = TrainSource(SampleReader(dataset), sampler, config)
    return DaliTrainLoader(source, sampler, dataset.classes, device, source.reader.channels)


class DaliEvalLoader:
    """Iterates over this rank's val share; the pipeline is built at the first pass (DALI's memory pools never
    shrink: no eval pipeline is held before an evaluation needs it) and reused by the later ones."""

    def __init__(self, source: EvalSource, config: DataConfig, device: str, protocol: str) -> None:
        self.source, self.config, self.device, self.protocol = source, config, device, protocol
        self.pipeline, self.ready = None, False  # ready: built, or the last pass read to its end

    def __iter__(self) -> Iterator[Batch]:
        if not self.ready:
            self.pipeline = build_eval_pipeline(self.source, self.config, self.device, protocol=self.protocol)
            with interrupts_ignored():
                self.pipeline.build()
        self.ready = False
        return run_pipeline(self.pipeline, lambda: setattr(self, "ready", True), self.source.explain)


def build_dali_val_loader(
    config: DataConfig, *, rank: int, world_size: int, batch_per_rank: int, protocol: str
) -> DaliEvalLoader:
    if protocol == "multiscale":
        raise UserError("multiscale evaluation runs on the torch path (data.backend=torch or `residual eval`)")
    dataset = open_dataset(config.root, config.format, train=False, index_dir=config.index_dir)
    share = val_share(len(dataset), rank=rank, world_size=world_size)
    source = EvalSource(SampleReader(dataset), share, batch_per_rank, skip_corrupt=config.skip_corrupt)
    return DaliEvalLoader(source, config, dali_device(config.device), protocol)
