"""``residual bench optim``: milliseconds per optimizer step, fused SGD against LARS."""

from __future__ import annotations

import statistics

import torch

from trainer.bench.train import timed
from trainer.config import OptimConfig
from trainer.machine.distributed import LaunchEnv, pick_device
from trainer.models import create_model
from trainer.recipe.optim import build_optimizer


def bench_optim(*, model_name: str, steps: int, rounds: int) -> None:
    """Milliseconds per optimizer step of the fused SGD and of LARS (``trainer.recipe.optim``, trust ratios on, BN and
    biases excluded, cancellable on the device as the trainer steps it), on one model's parameters and random
    gradients, alternating; medians. A LARS step once took a kernel or more per parameter tensor (ResNet-50: 161);
    tests/trainer/test_recipes.py now holds it to the same few ops at any depth."""
    device = pick_device("auto", LaunchEnv())
    model = create_model(model_name).to(device, memory_format=torch.channels_last)
    generator = torch.Generator(device).manual_seed(0)
    for parameter in model.parameters():
        parameter.grad = torch.empty_like(parameter).normal_(generator=generator)  # the parameter's layout
    found_inf = torch.zeros((), device=device)
    optimizers = {
        name: build_optimizer(model, OptimConfig(name=name, no_decay_bn_bias=True, lr=0.01)) for name in ("sgd", "lars")
    }
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for round_index in range(rounds + 1):  # round 0 warms up
        for name, optimizer in optimizers.items():
            optimizer.found_inf = found_inf
            seconds = timed(lambda _, optimizer=optimizer: optimizer.step(), steps, device)
            if round_index > 0:
                times[name].append(1e3 * seconds / steps)
    sgd, lars = statistics.median(times["sgd"]), statistics.median(times["lars"])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    tensors = len(list(model.parameters()))
    print(f"sgd   {sgd:8.2f} ms/step   (rounds: {', '.join(f'{t:.2f}' for t in times['sgd'])})")
    print(f"lars  {lars:8.2f} ms/step   (rounds: {', '.join(f'{t:.2f}' for t in times['lars'])})")
    print(
        f"lars / sgd = {lars / sgd:.2f}  [{model_name}, {tensors} parameter tensors, {where}, "
        f"torch {torch.__version__}, medians of {rounds} rounds of {steps} steps]"
    )
