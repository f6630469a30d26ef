"""Throughput of training: the trainer's step against a minimal hand-written loop (``bench train``), the CLI's whole
training against a bare loop of the same recipe (``--end-to-end``), and the cost of each recipe piece (``bench
recipes``)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from data_pipeline.augment.draws import cifar_crop_flip
from data_pipeline.datasets import CifarDataset
from data_pipeline.prepare.synthetic import synthesize_cifar
from data_pipeline.sampling import ShardedEpochSampler, sample_seeds
from trainer.config import Config, DistConfig, ModelConfig, TrainConfig
from trainer.machine.auto import resolve_precision
from trainer.machine.distributed import LaunchEnv, destroy_process_group, init_process_group, pick_device
from trainer.machine.throughput import peak_flops, training_flops_per_image
from trainer.models import create_model, get_model_spec
from trainer.recipe.precision import maybe_autocast
from trainer.training.metrics import TrainWindow
from trainer.training.step import LateFlags, Stepper, build_stepper


def bench_train(
    *,
    model_name: str,
    batch: int,
    strategy: str,
    precision: str,
    steps: int,
    rounds: int,
    fsdp_mixed_precision: str,
    cudnn_benchmark: bool = True,
) -> None:
    """Images/s of the trainer's step (``Stepper.step``, the lr set and the running top-1/top-5, everything the
    loop does per batch but load it) and of a minimal hand-written loop of the same model, batch, precision and
    wrapper, on the same synthetic tensors, measured alternately; the ratio of their medians. Under torchrun,
    ``batch`` is per rank. ``cudnn_benchmark``: cuDNN's autotuning, as a training run turns it on for fixed
    shapes (``trainer.machine.auto.choose_cudnn_benchmark``), for both."""
    launch = LaunchEnv.from_environ()
    device = pick_device("auto", launch)
    init_process_group(launch, device)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    precision, reason = resolve_precision(precision, device)
    if launch.is_main:
        print(f"precision {precision}: {reason}")
    spec = get_model_spec(model_name)
    classes = 1000 if spec.dataset == "imagenet" else 10
    config = Config(
        model=ModelConfig(name=model_name, num_classes=classes),
        train=TrainConfig(iterations=steps, precision=precision),
        dist=DistConfig(strategy=strategy, fsdp_mixed_precision=fsdp_mixed_precision),
    )
    config.data.batch_size = batch * launch.world_size
    config.data.format = "imagefolder" if spec.dataset == "imagenet" else "cifar"
    config.data.crop_size = spec.image_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, spec.image_size, spec.image_size, generator=generator)
    images = images.to(device, memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (batch,), generator=generator).to(device)
    compared = {
        "trainer": trainer_step(build_stepper(config, launch, device), images, labels),
        "minimal": minimal_step(model_name, classes, precision, strategy, launch, device, images, labels),
    }
    rates: dict[str, list[float]] = {"trainer": [], "minimal": []}
    for round_index in range(rounds + 1):  # round 0 warms up (allocator, kernels, compilation)
        for name, step in compared.items():
            seconds = timed(step, steps, device)
            if round_index > 0:
                rates[name].append(batch * launch.world_size * steps / seconds)
    destroy_process_group()
    if not launch.is_main:
        return
    trainer, reference = statistics.median(rates["trainer"]), statistics.median(rates["minimal"])
    for name, median in (("trainer", trainer), ("minimal", reference)):
        print(f"{name}  {median:10.1f} images/s   (rounds: {', '.join(f'{r:.1f}' for r in rates[name])})")
    where = f"{launch.world_size} x " + (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    print(
        f"trainer / minimal = {trainer / reference:.3f}  [{model_name}, batch {batch} per rank, {precision}, "
        f"{strategy if launch.distributed else 'one process'}"
        f"{f' ({fsdp_mixed_precision})' if launch.distributed and strategy == 'fsdp' else ''}, {where}, "
        f"{f'cudnn.benchmark={cudnn_benchmark}, ' if device.type == 'cuda' else ''}"
        f"torch {torch.__version__}, "
        f"medians of {rounds} rounds of {steps} steps]"
    )
    peak = peak_flops(device, precision)
    if peak is not None:
        mfu = training_flops_per_image(config) * trainer / (peak * launch.world_size)
        print(f"model FLOP utilization {100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOP/s per GPU")


def trainer_step(stepper: Stepper, images: torch.Tensor, labels: torch.Tensor):
    """The trainer's step as the loop makes it, but for the loading: the lr set, ``Stepper.step``, the running
    top-1/top-5 into the window, the flags read a step late and the window summed at each log point (every 20)."""
    window, flags = TrainWindow(images.device), LateFlags()

    def step(index: int) -> None:
        for group in stepper.optimizer.param_groups:
            group["lr"] = 0.1
        logging_step = index % 20 == 0
        outcome = stepper.step(images, labels, stop=False, grad_norm=logging_step)
        window.add(outcome, labels)
        flags.read(index, outcome, now=logging_step)
        if logging_step:
            window.summed()

    return step


def minimal_step(
    name: str,
    classes: int,
    precision: str,
    strategy: str,
    launch: LaunchEnv,
    device: torch.device,
    images: torch.Tensor,
    labels: torch.Tensor,
):
    """The textbook loop: channels-last model, autocast, cross-entropy, backward, SGD; DDP or one FSDP2 root."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=classes).to(device)
    if launch.distributed and strategy == "fsdp":
        fully_shard(model)
    else:
        model = model.to(memory_format=torch.channels_last)
        if launch.distributed:
            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step(index: int) -> None:
        with maybe_autocast(device, precision):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def timed(step, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for index in range(steps):
        step(index)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_end_to_end(*, config_path: str, precision: str, iterations: int, rounds: int, per_class: int) -> None:
    """Wall time of the CLI's whole training (``trainer.training.loop.train``: data, augmentation, step, logging,
    evaluation, checkpoints) against a bare loop of the same recipe (model and its initialization, batch, SGD, lr
    steps at half and three quarters of the run, precision, batched pad-crop-flip of a CIFAR-format set held as one
    tensor, one evaluation at the end), on the same synthetic data, the same images in the same order with the same
    crops, alternating; the ratio of the medians, and the two top-1s, which agree within the noise of float
    rounding. Both run in this process, after one untimed warm-up of each."""
    from trainer.config import load_config
    from trainer.training.loop import train

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "data"
        synthesize_cifar(root, classes=10, train_per_class=per_class, val_per_class=max(1, per_class // 5), seed=0)
        overrides = [
            f"data.root={root}",
            "data.synthesize=null",
            f"train.precision={precision}",
            f"train.output_dir={scratch}/runs",
            "log.progress=false",
            "checkpoint.resume=never",
        ]
        # the paper's two decays at the same shares of this shorter run: a final top-1 taken at the full lr swings
        # by points from one iteration to the next, and a comparison of two runs needs a settled one
        overrides.append(f"schedule.milestones=[{iterations // 2},{iterations * 3 // 4}]")
        config = load_config(config_path, [*overrides, f"train.iterations={iterations}"])
        launch = LaunchEnv()
        precision, reason = resolve_precision(config.train.precision, pick_device(config.train.device, launch))
        print(f"precision {precision}: {reason}")
        seconds: dict[str, list[float]] = {"cli": [], "bare": []}
        top1s: dict[str, list[float]] = {"cli": [], "bare": []}
        for round_index in range(rounds + 1):  # round 0 warms up (allocator, kernels, page cache)
            warm_up = round_index == 0
            length = 10 if warm_up else iterations
            for name in ("cli", "bare"):
                started = time.perf_counter()
                if name == "cli":
                    run = [*overrides, f"train.iterations={length}", f"train.run_name=cli-{round_index}"]
                    top1 = train(load_config(config_path, run), launch)[0].top1
                else:
                    top1 = bare_loop(config, precision, iterations=length)
                elapsed = time.perf_counter() - started
                if not warm_up:
                    seconds[name].append(elapsed)
                    top1s[name].append(top1)
                    print(f"round {round_index} {name:<4} {elapsed:7.1f} s  top-1 {100 * top1:.2f}%", flush=True)
    cli, bare = statistics.median(seconds["cli"]), statistics.median(seconds["bare"])
    print(
        f"cli / bare = {cli / bare:.3f}  [{config.model.name}, {iterations} iterations of {config.data.batch_size}, "
        f"{precision}, {per_class * 10} synthetic CIFAR-format images, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, medians of {rounds} rounds: cli {cli:.1f} s, bare {bare:.1f} s]"
    )
    print(
        f"top-1: cli {100 * statistics.median(top1s['cli']):.2f}%, bare {100 * statistics.median(top1s['bare']):.2f}% "
        f"(the same images, crops and initialization: equal up to float rounding)"
    )


# What each piece of the modern recipes adds to the paper's recipe (the config's own), as overrides.
RECIPE_PIECES = {
    "paper": [],
    "label_smoothing": ["loss.label_smoothing=0.1"],
    "mixup": ["loss.mixup_alpha=0.2"],
    "cutmix": ["loss.cutmix_alpha=1.0"],
    "ema": ["ema.decay=0.999"],
    "lars": ["optim.name=lars", "optim.no_decay_bn_bias=true"],
    "nesterov": ["optim.nesterov=true"],
    "cosine": ["schedule.decay=cosine", "schedule.warmup=linear", "schedule.warmup_length=10"],
    "trivial_augment_wide": ["data.auto_augment=trivial_augment_wide"],
    "random_erase": ["data.random_erase=0.25"],
    "ra_reps": ["data.ra_reps=4"],
}


def bench_recipes(
    *, config_path: str, precision: str, iterations: int, rounds: int, per_class: int, pieces: list[str] | None = None
) -> None:
    """The cost per training step of each recipe piece (``RECIPE_PIECES``, or the ``pieces`` named; the paper's
    recipe always) on top of the config, as the ratio of the paper recipe's images/s to the piece's: the trainer's
    own logged images/s (data and step, no evaluation), the median of its log windows after the first, each piece
    run in turn in every round, the median over rounds."""
    from trainer.config import load_config
    from trainer.training.loop import train
    from trainer.training.run_log import read_metrics

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "data"
        synthesize_cifar(root, classes=10, train_per_class=per_class, val_per_class=10, seed=0)
        overrides = [
            f"data.root={root}",
            "data.synthesize=null",
            f"train.precision={precision}",
            "log.every=10",
            f"train.output_dir={scratch}/runs",
            "log.progress=false",
            "checkpoint.resume=never",
            f"train.iterations={iterations}",
            f"eval.every={iterations}",
            f"checkpoint.every={iterations}",
            "eval.batch_size=100",
        ]
        config = load_config(config_path, overrides)
        precision, _ = resolve_precision(config.train.precision, pick_device(config.train.device, LaunchEnv()))
        chosen = {name: piece for name, piece in RECIPE_PIECES.items() if name == "paper" or name in (pieces or [name])}
        speeds: dict[str, list[float]] = {name: [] for name in chosen}
        for round_index in range(rounds + 1):  # round 0 warms up
            for name, piece in chosen.items():
                run_name = f"{name}-{round_index}"
                train(load_config(config_path, [*overrides, *piece, f"train.run_name={run_name}"]), LaunchEnv())
                records = read_metrics(Path(scratch) / "runs" / run_name / "metrics.jsonl")
                windows = [r["images_per_second"] for r in records if r["kind"] == "speed"][1:]
                if round_index:
                    speeds[name].append(statistics.median(windows))
                    print(f"round {round_index} {name:<22} {speeds[name][-1]:8.1f} images/s", flush=True)
    paper = statistics.median(speeds["paper"])
    print(
        f"cost per step against the paper recipe [{config_path}, {iterations} iterations of "
        f"{config.data.batch_size}, {precision}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, medians of {rounds} rounds]:"
    )
    for name, values in speeds.items():
        print(f"  {name:<22} {paper / statistics.median(values):5.2f}x  ({statistics.median(values):.0f} images/s)")


def bare_loop(config: Config, precision: str, *, iterations: int) -> float:
    """A 60-line training script of ``config``'s recipe, as one writes it by hand; returns its final top-1. It sees
    the images the CLI sees: each epoch's order and each image's crop and flip come from the same seeds
    (``ShardedEpochSampler``'s permutation, ``cifar_crop_flip``), the augmentation is its own gather."""
    data = config.data
    train_set = CifarDataset(Path(data.root), train=True)
    val_set = CifarDataset(Path(data.root), train=False)
    mean = torch.tensor(data.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(data.std).view(1, 3, 1, 1) * 255
    torch.manual_seed(config.train.seed)
    model = create_model(config.model.name, **config.model.overrides()).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.optim.lr, momentum=config.optim.momentum, weight_decay=config.optim.weight_decay
    )
    milestones = torch.optim.lr_scheduler.MultiStepLR(optimizer, config.schedule.milestones, config.schedule.gamma)
    device = torch.device("cpu")
    batch, seed = data.batch_size, config.train.seed
    sampler = ShardedEpochSampler(len(train_set), global_batch=batch, rank=0, world_size=1, seed=seed)
    for iteration in range(iterations):
        epoch, position = divmod(iteration, sampler.batches_per_epoch)
        if position == 0:
            order = sampler.epoch_order(epoch)
        indices = order[position * batch : (position + 1) * batch]
        left, top, flip = map(
            torch.from_numpy, cifar_crop_flip(sample_seeds(seed, epoch, position * batch + np.arange(batch)))
        )
        images = torch.nn.functional.pad(train_set.images[indices], [4] * 4)
        steps = torch.arange(32)
        rows = (top[:, None] + steps)[:, None, :, None]
        columns = left[:, None] + torch.where(flip[:, None].bool(), steps.flip(0), steps)
        images = images[
            torch.arange(batch)[:, None, None, None],
            torch.arange(3)[None, :, None, None],
            rows,
            columns[:, None, None, :],
        ]
        images = ((images.float() - mean) / std).contiguous(memory_format=torch.channels_last)
        with maybe_autocast(device, precision):
            loss = F.cross_entropy(model(images).float(), train_set.labels[indices])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        milestones.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(val_set), config.eval.batch_size):
            images = (val_set.images[start : start + config.eval.batch_size].float() - mean) / std
            with maybe_autocast(device, precision):
                logits = model(images.contiguous(memory_format=torch.channels_last))
            correct += int((logits.argmax(1) == val_set.labels[start : start + config.eval.batch_size]).sum())
    return correct / len(val_set)
