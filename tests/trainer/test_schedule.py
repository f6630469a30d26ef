import math

import numpy as np
import pytest
import torch

from trainer.config import OptimConfig, ScheduleConfig
from trainer.recipe.schedule import LRSchedule, MetricHistory, build_schedule, plateau_decays, scaled_lr


def test_cifar_step_schedule_of_the_paper():
    schedule = LRSchedule(0.1, ScheduleConfig(milestones=[32000, 48000]))
    assert schedule.lr(0) == 0.1
    assert schedule.lr(31999) == 0.1
    assert schedule.lr(32000) == pytest.approx(0.01)
    assert schedule.lr(47999) == pytest.approx(0.01)
    assert schedule.lr(48000) == pytest.approx(0.001)
    assert schedule.lr(63999) == pytest.approx(0.001)


def test_epoch_milestones_become_iterations():
    config = ScheduleConfig(unit="epoch", milestones=[30, 60])
    schedule = build_schedule(config, base_lr=0.1, iterations_per_epoch=5005, total_iterations=90 * 5005)
    assert schedule.shape.milestones == [150150, 300300]
    assert schedule.lr(150149) == 0.1 and schedule.lr(150150) == pytest.approx(0.01)


def test_plateau_decays_after_patience_evaluations_without_improvement():
    assert plateau_decays([0.5, 0.4, 0.3], patience=1, threshold=0.0) == 0
    assert plateau_decays([0.5, 0.5, 0.5], patience=1, threshold=0.0) == 1  # two stale evaluations > patience 1
    assert plateau_decays([0.5, 0.5, 0.5, 0.5, 0.5], patience=1, threshold=0.0) == 2
    assert plateau_decays([0.5, 0.499, 0.498], patience=1, threshold=0.01) == 1  # below the relative threshold


def test_plateau_schedule_reads_only_evaluations_before_the_iteration():
    schedule = LRSchedule(0.1, ScheduleConfig(decay="plateau", plateau_patience=1, plateau_threshold=0.0, min_lr=0.002))
    history = MetricHistory(val_errors=[(100, 0.5), (200, 0.5), (300, 0.5), (400, 0.5), (500, 0.5), (600, 0.5)])
    assert schedule.lr(300, history) == 0.1  # the evaluation at 300 is not seen before step 300
    assert schedule.lr(301, history) == pytest.approx(0.01)
    assert schedule.lr(501, history) == pytest.approx(0.002)  # 0.001 floored at min_lr
    assert schedule.lr(10_000, history) == pytest.approx(0.002)


def test_warmup_until_train_error_below_80_percent():
    """Sec. 4.2: ResNet-110/1202 train at 0.01 until the training error is below 80%, then at 0.1."""
    shape = ScheduleConfig(milestones=[32000], warmup="constant", warmup_lr=0.01, warmup_until_train_error=0.8)
    schedule = LRSchedule(0.1, shape)
    history = MetricHistory(train_errors=[(100, 0.9), (200, 0.85), (300, 0.79), (400, 0.81)])
    assert schedule.lr(0, history) == 0.01
    assert schedule.lr(300, history) == 0.01
    assert schedule.lr(301, history) == 0.1
    assert schedule.lr(10_000, history) == 0.1  # an error back above 80% does not restart the warm-up
    assert schedule.lr(40_000, history) == pytest.approx(0.01)


def test_warmup_until_train_error_is_capped_by_a_fixed_length():
    shape = ScheduleConfig(warmup="constant", warmup_lr=0.01, warmup_length=400, warmup_until_train_error=0.8)
    schedule = LRSchedule(0.1, shape)
    stuck = MetricHistory(train_errors=[(100, 0.9), (300, 0.9), (500, 0.9)])
    assert schedule.lr(399, stuck) == 0.01 and schedule.lr(400, stuck) == 0.1


def test_fixed_constant_warmup():
    schedule = LRSchedule(0.1, ScheduleConfig(warmup="constant", warmup_lr=0.01, warmup_length=400))
    assert schedule.lr(399) == 0.01 and schedule.lr(400) == 0.1


def test_goyal_linear_scaling_and_linear_warmup():
    optim = OptimConfig(lr=0.1, linear_scaling=True, base_batch=256)
    config = ScheduleConfig(unit="epoch", milestones=[30, 60, 80], warmup="linear", warmup_lr=0.1, warmup_length=5)
    schedule = build_schedule(
        config, base_lr=scaled_lr(optim, 8192), iterations_per_epoch=156, total_iterations=90 * 156
    )
    assert schedule.base_lr == pytest.approx(3.2)
    assert schedule.lr(0) == pytest.approx(0.1)
    assert schedule.lr(390) == pytest.approx(0.1 + (3.2 - 0.1) / 2)
    assert schedule.lr(780) == pytest.approx(3.2)
    assert schedule.lr(30 * 156) == pytest.approx(0.32)


def test_history_round_trips_through_a_state_dict():
    history = MetricHistory(val_errors=[(1, 0.5)], train_errors=[(2, 0.25), (3, 0.125)])
    assert MetricHistory.from_state_dict(history.state_dict()) == history


def test_cosine_after_linear_warmup_follows_torchvision_v2():
    """torchvision's reference: LinearLR(start_factor=0.01) over the warm-up, then CosineAnnealingLR(T_max = the
    rest, eta_min); torch's schedulers stepped once per iteration give the anchor's values."""
    warmup, total, base, floor = 5, 40, 0.5, 1e-3
    config = ScheduleConfig(decay="cosine", warmup="linear", warmup_lr=0.01 * base, warmup_length=warmup, min_lr=floor)
    schedule = build_schedule(config, base_lr=base, iterations_per_epoch=1, total_iterations=total)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    anchor = torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [
            torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=floor),
        ],
        milestones=[warmup],
    )
    for iteration in range(total + 1):
        assert schedule.lr(iteration) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9), iteration
        optimizer.step()
        anchor.step()
    assert schedule.lr(total) == pytest.approx(floor)


def test_ffcv_ramps_up_and_down_as_its_cyclic_schedule():
    """ffcv-imagenet's get_cyclic_lr: np.interp(epoch, [0, peak, epochs], [1e-4 lr, lr, 0]), interpolated linearly
    within each epoch."""
    lr, peak, epochs, per_epoch = 1.7, 2, 16, 10
    config = ScheduleConfig(unit="epoch", decay="linear", warmup="linear", warmup_lr=1e-4 * lr, warmup_length=peak)
    schedule = build_schedule(
        config,
        base_lr=lr,
        iterations_per_epoch=per_epoch,
        total_iterations=epochs * per_epoch,
    )
    for iteration in range(epochs * per_epoch):
        epoch = iteration // per_epoch
        start, end = (np.interp([e], [0, peak, epochs], [1e-4 * lr, lr, 0])[0] for e in (epoch, epoch + 1))
        expected = np.interp(iteration % per_epoch, [0, per_epoch], [start, end])
        assert schedule.lr(iteration) == pytest.approx(expected, rel=1e-9, abs=1e-12), iteration


def test_mlperf_polynomial_decay_after_warmup_from_zero():
    """MLPerf's ResNet-50 reference: base_lr x step / warmup_steps, then
    end_lr + (base_lr - end_lr) (1 - min(step - warmup, decay_steps) / decay_steps)^2, decay_steps = train_steps -
    warmup_steps + 1, end_lr 1e-4."""
    base, end, per_epoch, warmup_epochs, epochs = 10.5, 1e-4, 8, 2, 37
    config = ScheduleConfig(
        unit="epoch",
        decay="poly",
        poly_power=2,
        warmup="linear",
        warmup_lr=0.0,
        warmup_length=warmup_epochs,
        min_lr=end,
    )
    total = epochs * per_epoch
    schedule = build_schedule(config, base_lr=base, iterations_per_epoch=per_epoch, total_iterations=total)
    warmup_steps, decay_steps = warmup_epochs * per_epoch, total - warmup_epochs * per_epoch + 1
    for step in range(total):
        if step <= warmup_steps:
            expected = base * step / warmup_steps
        else:
            expected = end + (base - end) * (1 - min(step - warmup_steps, decay_steps) / decay_steps) ** 2
        assert schedule.lr(step) == pytest.approx(expected, rel=1e-9), step
    assert schedule.lr(total - 1) > end and math.isclose(schedule.lr(10**9), end + (base - end) / decay_steps**2)
