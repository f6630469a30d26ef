import pytest

from trainer.config import OptimConfig, ScheduleConfig
from trainer.schedule import LRSchedule, MetricHistory, build_schedule, plateau_decays


def test_cifar_step_schedule_of_the_paper():
    schedule = LRSchedule(base_lr=0.1, milestones=(32000, 48000))
    assert schedule.lr(0) == 0.1
    assert schedule.lr(31999) == 0.1
    assert schedule.lr(32000) == pytest.approx(0.01)
    assert schedule.lr(47999) == pytest.approx(0.01)
    assert schedule.lr(48000) == pytest.approx(0.001)
    assert schedule.lr(63999) == pytest.approx(0.001)


def test_epoch_milestones_become_iterations():
    config = ScheduleConfig(unit="epoch", milestones=[30, 60])
    schedule = build_schedule(config, OptimConfig(), global_batch=256, iterations_per_epoch=5005)
    assert schedule.milestones == (150150, 300300)
    assert schedule.lr(150149) == 0.1 and schedule.lr(150150) == pytest.approx(0.01)


def test_plateau_decays_after_patience_evaluations_without_improvement():
    assert plateau_decays([0.5, 0.4, 0.3], patience=1, threshold=0.0) == 0
    assert plateau_decays([0.5, 0.5, 0.5], patience=1, threshold=0.0) == 1  # two stale evaluations > patience 1
    assert plateau_decays([0.5, 0.5, 0.5, 0.5, 0.5], patience=1, threshold=0.0) == 2
    assert plateau_decays([0.5, 0.499, 0.498], patience=1, threshold=0.01) == 1  # below the relative threshold


def test_plateau_schedule_reads_only_evaluations_before_the_iteration():
    schedule = LRSchedule(base_lr=0.1, decay="plateau", plateau_patience=1, plateau_threshold=0.0, min_lr=0.002)
    history = MetricHistory(val_errors=[(100, 0.5), (200, 0.5), (300, 0.5), (400, 0.5), (500, 0.5), (600, 0.5)])
    assert schedule.lr(300, history) == 0.1  # the evaluation at 300 is not seen before step 300
    assert schedule.lr(301, history) == pytest.approx(0.01)
    assert schedule.lr(501, history) == pytest.approx(0.002)  # 0.001 floored at min_lr
    assert schedule.lr(10_000, history) == pytest.approx(0.002)


def test_warmup_until_train_error_below_80_percent():
    """Sec. 4.2: ResNet-110/1202 train at 0.01 until the training error is below 80%, then at 0.1."""
    schedule = LRSchedule(
        base_lr=0.1, milestones=(32000,), warmup="constant", warmup_lr=0.01, warmup_until_train_error=0.8
    )
    history = MetricHistory(train_errors=[(100, 0.9), (200, 0.85), (300, 0.79), (400, 0.81)])
    assert schedule.lr(0, history) == 0.01
    assert schedule.lr(300, history) == 0.01
    assert schedule.lr(301, history) == 0.1
    assert schedule.lr(10_000, history) == 0.1  # an error back above 80% does not restart the warm-up
    assert schedule.lr(40_000, history) == pytest.approx(0.01)


def test_warmup_until_train_error_is_capped_by_a_fixed_length():
    schedule = LRSchedule(
        base_lr=0.1, warmup="constant", warmup_lr=0.01, warmup_iterations=400, warmup_until_train_error=0.8
    )
    stuck = MetricHistory(train_errors=[(100, 0.9), (300, 0.9), (500, 0.9)])
    assert schedule.lr(399, stuck) == 0.01 and schedule.lr(400, stuck) == 0.1


def test_fixed_constant_warmup():
    schedule = LRSchedule(base_lr=0.1, warmup="constant", warmup_lr=0.01, warmup_iterations=400)
    assert schedule.lr(399) == 0.01 and schedule.lr(400) == 0.1


def test_goyal_linear_scaling_and_linear_warmup():
    optim = OptimConfig(lr=0.1, linear_scaling=True, base_batch=256)
    config = ScheduleConfig(unit="epoch", milestones=[30, 60, 80], warmup="linear", warmup_lr=0.1, warmup_length=5)
    schedule = build_schedule(config, optim, global_batch=8192, iterations_per_epoch=156)
    assert schedule.base_lr == pytest.approx(3.2)
    assert schedule.lr(0) == pytest.approx(0.1)
    assert schedule.lr(390) == pytest.approx(0.1 + (3.2 - 0.1) / 2)
    assert schedule.lr(780) == pytest.approx(3.2)
    assert schedule.lr(30 * 156) == pytest.approx(0.32)


def test_history_round_trips_through_a_state_dict():
    history = MetricHistory(val_errors=[(1, 0.5)], train_errors=[(2, 0.25), (3, 0.125)])
    assert MetricHistory.from_state_dict(history.state_dict()) == history
