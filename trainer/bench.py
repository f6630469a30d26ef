"""Benchmarks: tools that print figures and ratios (docs/benchmarks.md keeps them), not timed tests."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from data_pipeline.config import DataConfig
from data_pipeline.datasets import ImageFolderDataset
from data_pipeline.synthetic import synthesize_imagefolder
from data_pipeline.torch_loader import build_eval_loader
from trainer.config import Config, DistConfig, ModelConfig, TrainConfig
from trainer.distributed import LaunchEnv, destroy_process_group, init_process_group, pick_device
from trainer.evaluate import evaluate, topk_correct
from trainer.models import create_model, get_model_spec
from trainer.precision import maybe_autocast
from trainer.step import build_stepper
from trainer.throughput import peak_flops, training_flops_per_image


def bench_eval(*, model_name: str, batch_size: int, images: int, workers: int) -> None:
    """Center-crop and 10-crop evaluation of one model on the same synthetic 320x256 images and batch size: the
    10-crop path shares the decode and resize of each image and forwards its B*10 views B at a time, so its
    images/s should be at least 1/11 of center-crop's."""
    classes = 8
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        per_class = -(-images // classes)
        synthesize_imagefolder(root, classes=classes, train_per_class=1, val_per_class=per_class, size=(320, 256))
        dataset = ImageFolderDataset(root / "val")
        config = DataConfig(root=str(root), workers=workers)
        device = pick_device("auto", LaunchEnv())
        model = create_model(model_name, num_classes=classes).to(device, memory_format=torch.channels_last)
        rates = {}
        for protocol in ("center", "tencrop"):
            batches = build_eval_loader(
                dataset, config, rank=0, world_size=1, batch_per_rank=batch_size, protocol=protocol, scales=()
            )
            evaluate(model, [next(iter(batches))], num_classes=classes, device=device, channels_last=True)  # warm-up
            result = evaluate(model, batches, num_classes=classes, device=device, channels_last=True)
            rates[protocol] = result.images_per_second
            print(f"{protocol:<8} {result.count} images  {result.images_per_second:8.1f} images/s")
    ratio = rates["tencrop"] / rates["center"]
    print(
        f"tencrop / center = {ratio:.3f} (10 views per image; at least 1/11 = 0.091 expected) "
        f"[{model_name}, batch {batch_size}, {device}, torch {torch.__version__}]"
    )


def bench_train(
    *, model_name: str, batch: int, strategy: str, precision: str, steps: int, rounds: int, fsdp_mixed_precision: str
) -> None:
    """Images/s of the trainer's step (``Stepper.step``, the lr set and the running top-1/top-5, everything the
    loop does per batch but load it) and of a minimal hand-written loop of the same model, batch, precision and
    wrapper, on the same synthetic tensors, measured alternately; the ratio of their medians. Under torchrun,
    ``batch`` is per rank."""
    launch = LaunchEnv.from_environ()
    device = pick_device("auto", launch)
    init_process_group(launch, device)
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
    stepper = build_stepper(config, launch, device)
    minimal = minimal_step(model_name, classes, precision, strategy, launch, device, images, labels)

    def trainer_step(index: int) -> None:
        for group in stepper.optimizer.param_groups:
            group["lr"] = 0.1
        outcome = stepper.step(images, labels, stop=False, grad_norm=index % 20 == 0)
        topk_correct(outcome.logits.float(), labels)

    rates: dict[str, list[float]] = {"trainer": [], "minimal": []}
    for round_index in range(rounds + 1):  # round 0 warms up (allocator, kernels, compilation)
        for name, step in (("trainer", trainer_step), ("minimal", minimal)):
            seconds = timed(step, steps, device)
            if round_index > 0:
                rates[name].append(batch * launch.world_size * steps / seconds)
    destroy_process_group()
    if not launch.is_main:
        return
    trainer, reference = statistics.median(rates["trainer"]), statistics.median(rates["minimal"])
    print(f"trainer  {trainer:10.1f} images/s   (rounds: {', '.join(f'{r:.1f}' for r in rates['trainer'])})")
    print(f"minimal  {reference:10.1f} images/s   (rounds: {', '.join(f'{r:.1f}' for r in rates['minimal'])})")
    where = f"{launch.world_size} x " + (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    print(
        f"trainer / minimal = {trainer / reference:.3f}  [{model_name}, batch {batch} per rank, {precision}, "
        f"{strategy if launch.distributed else 'one process'}"
        f"{f' ({fsdp_mixed_precision})' if launch.distributed and strategy == 'fsdp' else ''}, {where}, "
        f"torch {torch.__version__}, "
        f"medians of {rounds} rounds of {steps} steps]"
    )
    peak = peak_flops(device, precision)
    if peak is not None:
        mfu = training_flops_per_image(config) * trainer / (peak * launch.world_size)
        print(f"model FLOP utilization {100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOP/s per GPU")


def minimal_step(name: str, classes: int, precision: str, strategy: str, launch: LaunchEnv, device: torch.device,
                 images: torch.Tensor, labels: torch.Tensor):  # fmt: skip
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
