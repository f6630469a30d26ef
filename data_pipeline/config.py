"""The data section of a run's config: which data set, in which format, with which augmentation and batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from data_pipeline.errors import require

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]  # of the CIFAR-10 training set
CIFAR10_STD = [0.2470, 0.2435, 0.2616]


@dataclass
class SynthConfig:
    """What ``residual data synth`` writes when ``data.root`` is missing (see data_pipeline.synthetic)."""

    classes: int = 10
    train_per_class: int = 500
    val_per_class: int = 100
    size: int = 32
    seed: int = 0  # weights, data order and every augmentation follow from it

    def __post_init__(self) -> None:
        require(self.classes >= 2, "data.synthesize.classes", self.classes, "must be at least 2")
        require(self.train_per_class >= 1, "data.synthesize.train_per_class", self.train_per_class, "must be >= 1")
        require(self.val_per_class >= 1, "data.synthesize.val_per_class", self.val_per_class, "must be >= 1")
        require(self.size >= 8, "data.synthesize.size", self.size, "must be at least 8 pixels")


@dataclass
class DataConfig:
    root: str = "data/imagenet"  # the data set's folder
    # "imagefolder" (train/<class>/*.JPEG, val/<class>/*) | "cifar" (python batches) | "webdataset" (tar shards)
    format: Literal["imagefolder", "cifar", "webdataset"] = "imagefolder"
    #                              | "webdataset" (train/*.tar, val/*.tar with indexes: `residual data shard`)
    backend: Literal["torch", "dali"] = "torch"  # "torch": torchvision transforms + DataLoader | "dali": DALI
    device: Literal["auto", "cpu", "gpu"] = "auto"  # DALI: "gpu" (decode and augment on the GPU) | "cpu" (CPU-only)
    batch_size: int = 256  # global mini-batch: images per iteration summed over all ranks
    # loader processes per rank, or "auto": none for CIFAR-format data on the torch backend (held as tensors); else
    # on a GPU all the rank's cores but one, on a CPU half of them; with DALI (whose threads decode) a quarter
    # (trainer.hardware.plan_threads)
    workers: Any = "auto"
    threads: Any = "auto"  # DALI's CPU threads (decoding; on a GPU the decoder's CPU stage); auto: from the cores
    # "scale" (Sec. 3.4: shorter side in [scale_min, scale_max]) | "random_resized_crop"
    train_augment: Literal["scale", "random_resized_crop"] = "scale"
    scale_min: int = 256  # scale augmentation: the shorter side's smallest value (Sec. 3.4)
    scale_max: int = 480  # and its largest
    crop_size: int = 224  # the training crop (and the center crop of evaluation)
    val_resize: int = 256  # val: shorter side to this, then the center crop_size
    lighting_std: float = 0.1  # AlexNet PCA lighting noise; 0 turns it off
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))  # per-channel, on [0, 1] pixels
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))  # per-channel, on [0, 1] pixels
    skip_corrupt: bool = False  # an undecodable image: training takes the next, evaluation leaves it out (warned)
    synthesize: SynthConfig | None = None  # generate synthetic data at `root` when it does not exist

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "data.batch_size", self.batch_size, "must be >= 1")
        valid_workers = self.workers == "auto" or (type(self.workers) is int and self.workers >= 0)
        require(valid_workers, "data.workers", self.workers, 'must be "auto" or an integer >= 0')
        valid_threads = self.threads == "auto" or (type(self.threads) is int and self.threads >= 1)
        require(valid_threads, "data.threads", self.threads, 'must be "auto" or an integer >= 1')
        require(0 < self.scale_min <= self.scale_max, "data.scale_min", self.scale_min, "must be in (0, scale_max]")
        require(self.crop_size <= self.scale_min, "data.crop_size", self.crop_size, "must be <= data.scale_min")
        require(self.crop_size <= self.val_resize, "data.crop_size", self.crop_size, "must be <= data.val_resize")
        require(self.lighting_std >= 0, "data.lighting_std", self.lighting_std, "must be >= 0")
        require(len(self.mean) == 3 and len(self.std) == 3, "data.mean/std", (self.mean, self.std), "need 3 values")
        require(all(s > 0 for s in self.std), "data.std", self.std, "must be > 0")
