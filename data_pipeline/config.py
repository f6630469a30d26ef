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
    """What ``residual data synth`` writes when ``data.root`` is missing (see data_pipeline.prepare.synthetic)."""

    classes: int = 10
    train_per_class: int = 500
    val_per_class: int = 100
    size: int = 32
    seed: int = 0  # the images drawn (their shapes, colours and noise): the same seed writes the same files

    def __post_init__(self) -> None:
        require(self.classes >= 2, "data.synthesize.classes", self.classes, "must be at least 2")
        require(self.train_per_class >= 1, "data.synthesize.train_per_class", self.train_per_class, "must be >= 1")
        require(self.val_per_class >= 1, "data.synthesize.val_per_class", self.val_per_class, "must be >= 1")
        require(self.size >= 8, "data.synthesize.size", self.size, "must be at least 8 pixels")


@dataclass
class ResolutionRamp:
    """Progressive resizing (FFCV): the training crop is ``start_size`` up to epoch ``start_epoch``, data.crop_size
    from ``end_epoch`` on, and between them the linear interpolation rounded to a multiple of ``multiple``."""

    start_size: int = 160  # the first epochs' crop (FFCV's min_res)
    start_epoch: int = 0  # the last epoch at start_size (start_ramp)
    end_epoch: int = 1  # the first epoch at data.crop_size (end_ramp)
    multiple: int = 32  # the crops between are multiples of this

    def __post_init__(self) -> None:
        require(self.start_size >= 8, "data.progressive.start_size", self.start_size, "must be at least 8 pixels")
        require(
            0 <= self.start_epoch <= self.end_epoch,
            "data.progressive.start_epoch",
            self.start_epoch,
            "must be in [0, end_epoch]",
        )
        require(self.multiple >= 1, "data.progressive.multiple", self.multiple, "must be >= 1")

    def size(self, epoch: int, end_size: int) -> int:
        """FFCV's ``get_resolution``: the crop of ``epoch``."""
        if epoch <= self.start_epoch:
            return self.start_size
        if epoch >= self.end_epoch:
            return end_size
        share = (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch)
        interpolated = self.start_size + share * (end_size - self.start_size)
        return int(round(interpolated / self.multiple)) * self.multiple


@dataclass
class DataConfig:
    root: str = "data/imagenet"  # the data set's folder
    # "imagefolder" (train/<class>/*.JPEG, val/<class>/*) | "cifar" (python batches) | "idx" (MNIST's four files,
    # gzipped or not: MNIST, Fashion-MNIST, KMNIST, EMNIST) | "webdataset" (train/*.tar, val/*.tar with indexes:
    # `residual data shard`)
    format: Literal["imagefolder", "cifar", "idx", "webdataset"] = "imagefolder"
    backend: Literal["torch", "dali"] = "torch"  # "torch": torchvision transforms + DataLoader | "dali": DALI
    device: Literal["auto", "cpu", "gpu"] = "auto"  # DALI: "gpu" (decode and augment on the GPU) | "cpu" (CPU-only)
    batch_size: int = 256  # global mini-batch: images per iteration summed over all ranks
    # loader processes per rank, or "auto": none for CIFAR-format data on the torch backend (held as tensors); else
    # on a GPU all the rank's cores but one, on a CPU half of them, beside torch's threads on every core; with DALI
    # (whose threads decode) a quarter. auto grows by one while the step waits for data (trainer.machine.auto)
    workers: Any = "auto"
    # DALI's CPU threads (decoding; on a GPU the decoder's CPU stage); auto: from the cores, grown as data.workers
    threads: Any = "auto"
    # "scale" (Sec. 3.4: shorter side in [scale_min, scale_max]) | "random_resized_crop"
    train_augment: Literal["scale", "random_resized_crop"] = "scale"
    scale_min: int = 256  # scale augmentation: the shorter side's smallest value (Sec. 3.4)
    scale_max: int = 480  # and its largest
    crop_size: int = 224  # the training crop (the last one, with progressive)
    progressive: ResolutionRamp | None = None  # a training crop that grows with the epoch (FFCV); None: crop_size
    val_resize: int = 256  # val: shorter side to this, then the center val_crop
    val_crop: int | None = None  # val: the center crop (test-time resolution, Touvron et al. 2019); None: crop_size
    lighting_std: float = 0.1  # AlexNet PCA lighting noise; 0 turns it off
    flip: bool = True  # random horizontal flips in training (false for digits and letters, which must not mirror)
    # after the crop and flip: "none" | "trivial_augment_wide" (Mueller & Hutter 2021) | "rand_augment" (Cubuk et al.
    # 2020). torch path: torchvision's transforms.v2, each image's ops drawn from its own seed; DALI: its
    # nvidia.dali.auto_aug, whose draws come from DALI's own generator (seeded from train.seed and where a start
    # begins, not per image: a resumed DALI run draws other ops than the run it continues)
    auto_augment: Literal["none", "trivial_augment_wide", "rand_augment"] = "none"
    rand_augment_ops: int = 2  # rand_augment: ops per image (N)
    rand_augment_magnitude: int = 9  # rand_augment: their magnitude (M, of 31 bins)
    random_erase: float = 0.0  # Zhong et al. 2020: the probability of erasing a box of the normalized image to 0
    ra_reps: int = 1  # repeated augmentation (Hoffer et al. 2020, torchvision's RASampler): copies of each image
    # per-channel, on [0, 1] pixels: one value per channel of the images (model.in_channels)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))  # per-channel, on [0, 1] pixels
    # where an image folder's sample index is kept (data_pipeline.datasets.folder_index): listed by one process,
    # read by the others and by later starts while the tree is unchanged; training puts it in its run directory
    # (index/); null: each opening lists the tree
    index_dir: str | None = None
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
        val_crop = self.eval_crop
        require(val_crop <= self.val_resize, "data.val_crop", val_crop, "must be <= data.val_resize")
        require(0 <= self.random_erase <= 1, "data.random_erase", self.random_erase, "must be in [0, 1]")
        require(self.ra_reps >= 1, "data.ra_reps", self.ra_reps, "must be >= 1")
        require(
            0 <= self.rand_augment_magnitude <= 30,
            "data.rand_augment_magnitude",
            self.rand_augment_magnitude,
            "must be in [0, 30]",
        )
        require(self.rand_augment_ops >= 1, "data.rand_augment_ops", self.rand_augment_ops, "must be >= 1")
        if self.progressive is not None:
            why = f"{self.format} data trains on its images as they are"
            require(not self.in_memory, "data.progressive", "set", why)
        require(self.lighting_std >= 0, "data.lighting_std", self.lighting_std, "must be >= 0")
        require(
            len(self.mean) == len(self.std) and len(self.mean) in (1, 3),
            "data.mean/std",
            (self.mean, self.std),
            "need one value per channel, 3 (RGB) or 1 (grey), as many of each",
        )
        require(all(s > 0 for s in self.std), "data.std", self.std, "must be > 0")

    @property
    def in_memory(self) -> bool:
        """CIFAR's batches and IDX files: small images held whole as one tensor, trained on at their own size
        (pad 4, crop, flip: Sec. 4.2) and tested as they are."""
        return self.format in ("cifar", "idx")

    @property
    def eval_crop(self) -> int:
        """The center crop of evaluation: data.val_crop, else the training crop."""
        return self.val_crop if self.val_crop is not None else self.crop_size

    def train_crop(self, epoch: int) -> int:
        """The training crop of ``epoch``: data.crop_size, or where the progressive ramp has it."""
        return self.crop_size if self.progressive is None else self.progressive.size(epoch, self.crop_size)
