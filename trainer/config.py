"""Typed run configuration: dataclasses per section, loaded from YAML plus ``key=value`` overrides (OmegaConf).

OmegaConf rejects unknown keys and values of the wrong type; each section's ``__post_init__`` rejects impossible
values; ``load_config`` checks what needs more than one section (the batch against the world size, the data
folder). Every failure is a ``UserError`` that names the key and the value.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipeline.config import DataConfig
from data_pipeline.errors import UserError, read_text, require, require_one_of
from trainer.models.table import MODEL_NAMES

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Protocol = Literal["center", "flip", "tencrop", "multiscale"]
PRECISIONS, PROTOCOLS = get_args(Precision), get_args(Protocol)
PAPER_SCALES = (224, 256, 384, 480, 640)  # the shorter sides of multi-scale testing (Table 4)


@dataclass
class ModelConfig:
    name: str = "resnet50"  # a network of `residual models` (trainer/models/table.py)
    num_classes: int = 1000  # outputs of the last layer: the data's classes
    in_channels: int = 3  # channels of the input images: 3 (RGB) or 1 (grey: MNIST, Fashion-MNIST)
    shortcut: str | None = None  # "A" | "B" | "C" (Sec. 3.3); None keeps the model's default
    stride_in_1x1: bool = False  # True: the paper's v1 bottleneck; False: torchvision's v1.5
    zero_init_residual: bool = False  # each block's last BN weight starts at 0 (Goyal et al. 2017; not in the paper)
    sync_bn: bool = False  # SyncBatchNorm across ranks (GPUs only)
    depth: int | None = None  # CIFAR-10 nets only: any 6n+2

    def __post_init__(self) -> None:
        require_one_of("model.name", self.name, MODEL_NAMES)
        require(self.num_classes >= 2, "model.num_classes", self.num_classes, "must be at least 2")
        require(self.in_channels >= 1, "model.in_channels", self.in_channels, "must be at least 1")
        if self.shortcut is not None:
            require_one_of("model.shortcut", self.shortcut, ("A", "B", "C"))

    def overrides(self) -> dict[str, Any]:
        """The keyword arguments of ``create_model`` that this section sets."""
        overrides: dict[str, Any] = dict(
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            stride_in_1x1=self.stride_in_1x1,
            zero_init_residual=self.zero_init_residual,
        )
        if self.shortcut is not None:
            overrides["shortcut"] = self.shortcut
        if self.depth is not None:
            overrides["depth"] = self.depth
        return overrides


@dataclass
class OptimConfig:
    """SGD with momentum (Sec. 3.4), or LARS (You et al. 2017, as MLPerf trains ResNet-50 at batches of thousands)."""

    # "sgd" (torch.optim.SGD) | "lars": SGD whose step of each weight is scaled by its trust ratio
    # trust_coefficient x |w| / (|g| + weight_decay x |w|) (trainer.recipe.optim.LARS)
    name: Literal["sgd", "lars"] = "sgd"
    lr: float = 0.1  # at `base_batch` images per iteration
    momentum: float = 0.9  # Sec. 3.4
    weight_decay: float = 1e-4  # L2 penalty, Sec. 3.4
    nesterov: bool = False  # Nesterov momentum (not in the paper)
    no_decay_bn_bias: bool = False  # exclude BN parameters and biases from weight decay (and, with LARS, its scaling)
    linear_scaling: bool = False  # Goyal et al. 2017: lr x global_batch / base_batch
    base_batch: int = 256  # the batch `lr` is given for (linear_scaling)
    trust_coefficient: float = 0.001  # LARS's eta (MLPerf: 0.001)
    lars_eps: float = 0.0  # LARS: added to the trust ratio's denominator (MLPerf's lars_epsilon: 0)

    def __post_init__(self) -> None:
        require(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        require(0 <= self.momentum < 1, "optim.momentum", self.momentum, "must be in [0, 1)")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        require(self.base_batch >= 1, "optim.base_batch", self.base_batch, "must be >= 1")
        require(self.trust_coefficient > 0, "optim.trust_coefficient", self.trust_coefficient, "must be > 0")
        require(self.lars_eps >= 0, "optim.lars_eps", self.lars_eps, "must be >= 0")
        require(not (self.nesterov and not self.momentum), "optim.nesterov", True, "needs optim.momentum > 0")


@dataclass
class ScheduleConfig:
    """The learning-rate schedule (trainer.recipe.schedule): a warm-up, then a decay over the rest of the run.
    Lengths are in `unit`s: iterations or epochs. Every rate is a function of the iteration (and, for "plateau", of the
    evaluations before it), computed at every iteration."""

    unit: Literal["iteration", "epoch"] = "iteration"  # unit of milestones and warmup_length
    # "step": x gamma at each milestone | "plateau": x gamma when the val error stalls | "cosine": half a cosine from
    # lr to min_lr at the last iteration (Loshchilov & Hutter 2017) | "linear": a straight line from lr to min_lr
    # (FFCV's ramp-down) | "poly": min_lr + (lr - min_lr) (1 - t / (T + 1))^poly_power, t of T decay iterations
    # (MLPerf's ResNet-50)
    decay: Literal["step", "plateau", "cosine", "linear", "poly"] = "step"
    milestones: list[int] = field(default_factory=list)  # decay: step: where the lr is multiplied by gamma, in `unit`s
    gamma: float = 0.1  # the lr's factor at each decay (Sec. 3.4: divided by 10)
    plateau_patience: int = 5  # evaluations without improvement before a decay
    plateau_threshold: float = 1e-3  # relative improvement of the val error that counts
    min_lr: float = 0.0  # no decay below this; where cosine, linear and poly end
    poly_power: float = 2.0  # decay: poly: the exponent (MLPerf: 2)
    warmup: Literal["none", "constant", "linear"] = "none"  # "constant": lr = warmup_lr | "linear": warmup_lr -> lr
    warmup_lr: float = 0.01  # the warm-up's lr (Sec. 4.2: 0.01 for ResNet-110); the linear warm-up's first
    warmup_length: int = 0  # constant/linear warm-up length; 0 with warmup_until_train_error: no fixed cap
    warmup_until_train_error: float | None = None  # constant warm-up ends when train error < this (0.8, Sec. 4.2)
    warmup_check_every: int = 50  # warmup_until_train_error: the training error is measured over each window of
    # this many iterations, its own (the log's windows are log.every's, and a logging setting never changes the lr)

    def __post_init__(self) -> None:
        require(0 < self.gamma < 1, "schedule.gamma", self.gamma, "must be in (0, 1)")
        require(self.milestones == sorted(self.milestones), "schedule.milestones", self.milestones, "must increase")
        require(all(m > 0 for m in self.milestones), "schedule.milestones", self.milestones, "must be > 0")
        require(self.plateau_patience >= 0, "schedule.plateau_patience", self.plateau_patience, "must be >= 0")
        require(self.min_lr >= 0, "schedule.min_lr", self.min_lr, "must be >= 0")
        require(self.warmup_lr >= 0, "schedule.warmup_lr", self.warmup_lr, "must be >= 0")
        require(self.poly_power > 0, "schedule.poly_power", self.poly_power, "must be > 0")
        require(self.warmup_length >= 0, "schedule.warmup_length", self.warmup_length, "must be >= 0")
        require(self.warmup_check_every > 0, "schedule.warmup_check_every", self.warmup_check_every, "must be > 0")
        if self.warmup == "linear":
            require(self.warmup_length > 0, "schedule.warmup_length", self.warmup_length, "linear warm-up needs > 0")
        if self.warmup_until_train_error is not None:
            require(self.warmup == "constant", "schedule.warmup", self.warmup, "warmup_until_train_error is constant")
            error = self.warmup_until_train_error
            require(0 < error < 1, "schedule.warmup_until_train_error", error, "must be in (0, 1)")


@dataclass
class TrainConfig:
    iterations: int | None = None  # length of the run; exactly one of iterations and epochs
    epochs: int | None = None  # length of the run in passes over the training set
    # "auto" (trainer.machine.auto: bf16 where the GPU or CPU computes it natively, fp16 on older GPUs, else fp32)
    # | "fp32" | "bf16" (autocast) | "fp16" (autocast + gradient scaler)
    precision: Precision = "auto"
    channels_last: bool = True  # NHWC memory layout for the convolutions
    # torch's CPU threads per rank; None: on a CPU every core of the rank, on a GPU the cores its workers leave
    # (trainer.machine.auto.plan_threads)
    threads: int | None = None
    compile: bool = False  # torch.compile the model
    accumulation: int = 1  # micro-batches per update: each rank forwards data.batch_size / (world x accumulation)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # "auto": cuda if present
    seed: int = 0  # weights, data order and every augmentation follow from it
    output_dir: str = "runs"  # runs are written to OUTPUT_DIR/RUN_NAME
    run_name: str | None = None  # default: the config file's name
    skip_nonfinite: bool = False  # skip (and count) a step whose loss is not finite instead of stopping the run

    @property
    def run_dir(self) -> Path:
        """Where the run writes everything: OUTPUT_DIR/RUN_NAME (decided here alone)."""
        return Path(self.output_dir) / self.run_name

    def __post_init__(self) -> None:
        require(self.threads is None or self.threads >= 1, "train.threads", self.threads, "must be >= 1 or null")
        for key in ("iterations", "epochs"):
            value = getattr(self, key)
            require(value is None or value > 0, f"train.{key}", value, "must be > 0 or null")
        require(self.accumulation >= 1, "train.accumulation", self.accumulation, "must be >= 1")


@dataclass
class LossConfig:
    """What the model is trained against: cross-entropy with label smoothing, on batches that Mixup or CutMix may
    blend (trainer.recipe.mixing; on the batch, after the data pipeline, so on either backend). With mixing, the running
    train top-1/top-5 count a prediction against each image's dominant label (the larger share)."""

    label_smoothing: float = 0.0  # Szegedy et al. 2016: the target puts this much mass uniformly on all classes
    mixup_alpha: float = 0.0  # Mixup (Zhang et al. 2018): lambda ~ Beta(alpha, alpha); 0: off
    cutmix_alpha: float = 0.0  # CutMix (Yun et al. 2019): lambda ~ Beta(alpha, alpha), a box of area 1 - lambda
    mix_prob: float = 1.0  # the share of batches that are mixed at all
    switch_prob: float = 0.5  # with both alphas > 0: the share of mixed batches that CutMix (the others Mixup)

    def __post_init__(self) -> None:
        smoothing = self.label_smoothing
        require(0 <= smoothing < 1, "loss.label_smoothing", smoothing, "must be in [0, 1)")
        for key in ("mixup_alpha", "cutmix_alpha"):
            require(getattr(self, key) >= 0, f"loss.{key}", getattr(self, key), "must be >= 0")
        for key in ("mix_prob", "switch_prob"):
            require(0 <= getattr(self, key) <= 1, f"loss.{key}", getattr(self, key), "must be in [0, 1]")

    @property
    def mixing(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


@dataclass
class EmaConfig:
    """An exponential moving average of the weights (trainer.recipe.ema): every `every` iterations
    ema = decay x ema + (1 - decay) x weights, on each rank's shards under FSDP2. Saved in every checkpoint;
    eval.weights says which weights the evaluations use."""

    decay: float | None = None  # the weight of the old average at each update; None: no EMA
    every: int = 1  # iterations between updates (torchvision: 32)
    # BatchNorm's running statistics: "copy" (the EMA model uses the trained model's) | "average" (as the weights)
    bn_buffers: Literal["copy", "average"] = "average"
    start: int = 0  # iterations in which the EMA follows the weights exactly (torchvision: the lr warm-up)

    def __post_init__(self) -> None:
        require(self.decay is None or 0 < self.decay < 1, "ema.decay", self.decay, "must be in (0, 1) or null")
        require(self.every >= 1, "ema.every", self.every, "must be >= 1")
        require(self.start >= 0, "ema.start", self.start, "must be >= 0")


@dataclass
class CheckpointConfig:
    """Checkpoints in RUN_DIR/checkpoints (trainer.training.checkpoint.CheckpointManager)."""

    every: int | None = None  # iterations between checkpoints; None: every epoch (and always at the last iteration)
    keep: int = 3  # the newest this many are kept
    resume: str = "auto"  # "auto": the run's latest checkpoint if any | "latest": it must exist | "never" | a path

    def __post_init__(self) -> None:
        require(self.every is None or self.every > 0, "checkpoint.every", self.every, "must be > 0 or null")
        require(self.keep >= 1, "checkpoint.keep", self.keep, "must be >= 1")


@dataclass
class LogConfig:
    """Training metrics in TensorBoard and metrics.jsonl (trainer.training.metrics.MetricsProcessor)."""

    every: int = 20  # iterations between training metrics
    progress: bool = True  # rank 0: a tqdm bar when stderr is a terminal; else, and when false, a line per window
    # at each evaluation, top-1 per class as eval/PROTOCOL/class/NAME and the confusion matrix as an image;
    # None: on for data sets of up to 100 classes
    per_class: bool | None = None

    def __post_init__(self) -> None:
        require(self.every >= 1, "log.every", self.every, "must be >= 1")


@dataclass
class EvalConfig:
    """Evaluation during training (``protocol``, every ``every``) and at its end (``final_protocol``):
    "center" (shorter side data.val_resize, center data.val_crop; CIFAR: the image as is), "flip" (that center crop
    and its mirror, FFCV's test-time augmentation), "tencrop" (corners and center and their flips) or "multiscale"
    (the whole image at each of ``scales`` and its flip). The views' class probabilities are averaged."""

    every: int | None = None  # iterations between evaluations; None: every epoch (and always at the last iteration)
    protocol: Protocol = "center"  # during training
    final_protocol: Protocol = "center"  # at the end of training
    scales: list[int] = field(default_factory=lambda: list(PAPER_SCALES))  # shorter sides, Table 4
    batch_size: int = 256  # global: images per evaluation step over all ranks
    # "raw": the trained weights | "ema": their moving average (ema.decay) | "both": each, the raw ones first (the
    # schedule reads the raw weights' error; the final result is the EMA's)
    weights: Literal["raw", "ema", "both"] = "raw"
    # the final evaluation's report (per class, confusions with their images, calibration) as RUN_DIR/eval-report/
    report: bool = False

    def __post_init__(self) -> None:
        require(self.every is None or self.every > 0, "eval.every", self.every, "must be > 0 or null")
        require(len(self.scales) > 0, "eval.scales", self.scales, "needs at least one scale")
        require(self.batch_size >= 1, "eval.batch_size", self.batch_size, "must be >= 1")


@dataclass
class DistConfig:
    """Data parallelism over the ranks of a launch (one rank alone runs the plain model, whatever the strategy)."""

    strategy: Literal["ddp", "fsdp"] = "ddp"  # "ddp": replicated model, one checkpoint file | "fsdp": FSDP2, DCP
    static_graph: bool = False  # DDP: the graph is the same every step (lets DDP overlap more; no unused params)
    bucket_cap_mb: int = 25  # DDP's gradient bucket size
    reshard_after_forward: bool = True  # FSDP2: free the gathered parameters after forward (less memory)
    # FSDP2 with bf16/fp16: "policy" gathers the blocks' parameters in that type (half the traffic; BatchNorm in
    # fp32 groups of its own); "autocast" keeps fp32 parameters and gathers, with autocast (fewer collectives)
    fsdp_mixed_precision: Literal["policy", "autocast"] = "policy"

    def __post_init__(self) -> None:
        require(self.bucket_cap_mb >= 1, "dist.bucket_cap_mb", self.bucket_cap_mb, "must be >= 1")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)


CHOICE_ERROR = re.compile(r"Invalid value '(.*)', expected one of \[(.*)\]")  # OmegaConf's, of a Literal field

# Keys that moved to the section that owns them; a config that still names one is told the new name.
RENAMED_KEYS = {
    "train.eval_every": "eval.every",
    "train.checkpoint_every": "checkpoint.every",
    "train.keep_checkpoints": "checkpoint.keep",
    "train.resume": "checkpoint.resume",
    "train.log_every": "log.every",
    "train.progress": "log.progress",
}


def load_config(
    path: str | os.PathLike, overrides: list[str] = (), *, world_size: int = 1, data_needed: bool = True
) -> Config:
    """Read a YAML config, apply ``key=value`` overrides, validate, and fill ``train.run_name``. ``data_needed``:
    refuse a data root that is not there (training; not `residual config show`, which only reads)."""
    path = Path(path)
    text = read_text(path, "config file")
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value (example: optim.lr=0.05)")
    try:
        loaded = OmegaConf.create(text) if text.strip() else None
        if not isinstance(loaded, DictConfig) or not loaded:
            kind = "empty" if not loaded else "a list"
            raise UserError(f"{kind}, not a mapping of sections (model:, data:, train:, ...)")
        merged = OmegaConf.merge(OmegaConf.structured(Config), loaded, OmegaConf.from_dotlist(overrides))
        config: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        if error.full_key in RENAMED_KEYS:
            raise UserError(
                f"{path}: {error.full_key} is now {RENAMED_KEYS[error.full_key]} "
                f"(python tools/migrate_config.py FILE rewrites a config file)"
            ) from None
        raise said_in_one_line(path, error) from None
    except UserError as error:
        raise UserError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML ({error})") from None
    if config.train.run_name is None:
        config.train.run_name = path.stem
    validate_launch(config, world_size=world_size)
    if data_needed and (missing := missing_data(config)):
        raise UserError(missing)
    return config


def said_in_one_line(path: Path, error: OmegaConfBaseException) -> UserError:
    """OmegaConf's error as the user's: the file, the key, and for a Literal field the value and its choices."""
    message = str(error).splitlines()[0]
    if choice := CHOICE_ERROR.match(message):  # a Literal field's value: said as require_one_of says it
        choices = choice.group(2).replace("'", "")
        return UserError(f"{path}: {error.full_key}={choice.group(1)!r}: must be one of {choices}")
    return UserError(f"{path}: {error.full_key or 'config'}: {message}")


def validate_launch(config: Config, *, world_size: int) -> None:
    """Checks across keys, or of the launch environment and the file system."""
    train = config.train
    require(
        (train.iterations is None) != (train.epochs is None),
        "train.iterations/epochs",
        (train.iterations, train.epochs),
        "set exactly one of the two",
    )
    split = world_size * train.accumulation
    require(
        config.data.batch_size % split == 0,
        "data.batch_size",
        config.data.batch_size,
        f"must be divisible by the world size x train.accumulation = {world_size} x {train.accumulation}",
    )
    require(
        not (config.dist.static_graph and train.accumulation > 1),
        "dist.static_graph",
        True,
        f"not with train.accumulation={train.accumulation}: DDP's static graph asserts at the first step and past it "
        "stops all-reducing gradients (pytorch/pytorch#143580)",
    )
    require(
        config.eval.weights == "raw" or config.ema.decay is not None,
        "eval.weights",
        config.eval.weights,
        "evaluates the EMA of the weights: set ema.decay",
    )
    require(
        len(config.data.mean) == config.model.in_channels,
        "data.mean/std",
        (config.data.mean, config.data.std),
        f"need one value per input channel: model.in_channels={config.model.in_channels}",
    )
    protocols = {"eval.protocol": config.eval.protocol, "eval.final_protocol": config.eval.final_protocol}
    check_evaluation(
        config.data,
        protocols,
        ("eval.scales", config.eval.scales),
        ("eval.batch_size", config.eval.batch_size),
        world_size=world_size,
    )


def missing_data(config: Config) -> str | None:
    """Why the data root cannot be trained on as it stands, or None (one that ``data.synthesize`` makes is fine)."""
    root = Path(config.data.root)
    if config.data.synthesize is not None or root.is_dir():
        return None
    what = "a file, not a folder" if root.exists() else "folder does not exist"
    return f"data.root={str(root)!r}: {what} (run `residual data synth {root}` or set data.synthesize to generate it)"


def check_evaluation(
    data: DataConfig,
    protocols: dict[str, str],
    scales: tuple[str, list[int]],
    batch: tuple[str, int],
    *,
    world_size: int,
) -> None:
    """What an evaluation needs, for a training run's eval section and `residual eval`'s flags alike: each argument
    comes with the key or flag the user set it with, which the message names."""
    for key, protocol in protocols.items():
        if data.in_memory and protocol != "center":
            raise UserError(
                f"{key} {protocol}: {data.format} data is tested on the single original image, as CIFAR-10 "
                f"is (Sec. 4.2); use center"
            )
    if small := [scale for scale in scales[1] if scale < data.crop_size]:
        raise UserError(
            f"{scales[0]}: {small} smaller than the {data.crop_size} crop (every scale must be at least "
            f"the {data.crop_size} crop the model sees in training, data.crop_size)"
        )
    if batch[1] % world_size:
        raise UserError(f"{batch[0]} {batch[1]}: not divisible by the world size {world_size}")


FIELD_LINE = re.compile(r"^    (\w+): [^=#]+(?:=[^#]*)?(?:#\s*(.*))?$")  # a dataclass field, perhaps commented


def field_docs(section: type) -> dict[str, str]:
    """Each field's one-line documentation, read off the class's source: the comment on its line, else the comment
    lines just above it."""
    docs, above = {}, []
    for line in inspect.getsource(section).splitlines():
        if line.strip().startswith("#"):
            above.append(line.strip().lstrip("# "))
            continue
        if field_line := FIELD_LINE.match(line):
            docs[field_line.group(1)] = field_line.group(2) or " ".join(above)
        above = []
    return docs


def describe(config: Config) -> str:
    """The resolved config as YAML (JSON values), each key with its one-line documentation."""
    lines, plain = [], to_dict(config)
    for section in fields(config):
        value = getattr(config, section.name)
        docs = field_docs(type(value))
        lines.append(f"{section.name}:")
        for key in fields(value):
            text = f"  {key.name}: {json.dumps(plain[section.name][key.name])}"
            doc = docs.get(key.name)
            lines.append(f"{text:<44} # {doc}" if doc else text)
    return "\n".join(lines)


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(config))
