"""The training step: the host never waits for the device in it, and a non-finite loss cancels the update there."""

import pytest
import torch

from trainer.config import Config, ModelConfig, TrainConfig
from trainer.machine.distributed import LaunchEnv
from trainer.training.step import STEP_FLAGS, build_stepper

HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


def stepper_for(precision: str, device: str = "cpu", skip_nonfinite: bool = False):
    train = TrainConfig(precision=precision, device=device, skip_nonfinite=skip_nonfinite)
    config = Config(model=ModelConfig(name="resnet20"), train=train)
    return build_stepper(config, LaunchEnv(), torch.device(device))


def batch(device: str = "cpu", poisoned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 32, generator=generator)
    if poisoned:
        images[0] = float("nan")
    return images.to(device), (torch.arange(8) % 10).to(device)


def snapshot(stepper) -> list[torch.Tensor]:
    momentum = [stepper.optimizer.state[p]["momentum_buffer"] for p in stepper.model.parameters()]
    return [t.detach().clone() for t in [*stepper.model.parameters(), *momentum]]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_step_reads_nothing_back_from_the_device(monkeypatch, precision):
    """Every way Python reads a tensor's value raises during the step (the old step read the loss with .item(),
    the flags with .cpu() and the fp16 scale with get_scale() twice)."""
    stepper = stepper_for(precision)
    stepper.step(*batch(), stop=False, grad_norm=True)  # the first step may set things up

    def read(*args, **kwargs):
        raise AssertionError("the step read a tensor's value on the host")

    with monkeypatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, read)
        outcome = stepper.step(*batch(), stop=True, grad_norm=True)
    assert dict(zip(STEP_FLAGS, outcome.flags.tolist(), strict=True)) == {"skipped": 0, "stop": 1, "scaler_skipped": 0}


def test_a_nonfinite_loss_changes_neither_weights_nor_momentum():
    stepper = stepper_for("fp32")
    first = snapshot(stepper)
    outcome = stepper.step(*batch(poisoned=True), stop=False, grad_norm=False)  # the very first step
    assert outcome.skipped and not outcome.loss_sum.isfinite()
    assert all(torch.equal(a, b) for a, b in zip(first, snapshot(stepper), strict=True))  # momentum still zeros
    stepper.step(*batch(), stop=False, grad_norm=False)
    fresh = stepper_for("fp32")
    fresh.step(*batch(), stop=False, grad_norm=False)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(fresh), snapshot(stepper), strict=True))
    trained = snapshot(stepper)
    assert stepper.step(*batch(poisoned=True), stop=False, grad_norm=False).skipped
    assert all(torch.equal(a, b) for a, b in zip(trained, snapshot(stepper), strict=True))


def buffers(stepper) -> list[torch.Tensor]:
    return [b.detach().clone() for b in stepper.model.buffers()]


def test_a_skipped_step_leaves_the_bn_statistics_as_they_were():
    """The forward of a NaN batch writes NaN into BN's running statistics before the step knows it is skipped: a
    run that goes on (train.skip_nonfinite) gets them back, weights and momentum untouched as well."""
    stepper = stepper_for("fp32", skip_nonfinite=True)
    stepper.step(*batch(), stop=False, grad_norm=False)
    before, weights = buffers(stepper), snapshot(stepper)
    assert stepper.step(*batch(poisoned=True), stop=False, grad_norm=False).skipped
    assert all(torch.equal(a, b) for a, b in zip(before, buffers(stepper), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(weights, snapshot(stepper), strict=True))
    stepper.step(*batch(), stop=False, grad_norm=False)  # a good step still moves them
    assert not all(torch.equal(a, b) for a, b in zip(before, buffers(stepper), strict=True))


@pytest.mark.gpu
def test_a_step_on_the_gpu_never_synchronizes():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: run on a GPU machine")
    for precision in ("bf16", "fp16"):
        stepper = stepper_for(precision, "cuda")
        stepper.step(*batch("cuda"), stop=False, grad_norm=False)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            outcome = stepper.step(*batch("cuda", poisoned=True), stop=False, grad_norm=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert outcome.flags.tolist()[0] == 1
