"""LR schedules: values at the phase boundaries, the paper's stage schedules, the config factory, errors, and
driving a torch optimizer (explicitly and through LambdaLR, resumed from its state_dict)."""

import itertools
import math

import pytest
import torch

from sala_train.train.schedules import (
    ScheduleConfig,
    ScheduleError,
    WarmupStableDecay,
    build_schedule,
    constant,
    cosine_decay,
    exponential_decay,
    lambda_lr,
    set_learning_rate,
    wsd,
)


def test_constant_with_warmup():
    schedule = constant(7.5e-3, warmup_steps=2000)  # stage 2
    assert schedule.lr_at(0) == pytest.approx(7.5e-3 / 2000)
    assert schedule.lr_at(999) == pytest.approx(7.5e-3 / 2)
    assert schedule.lr_at(1999) == pytest.approx(7.5e-3)
    assert schedule.lr_at(2000) == schedule.lr_at(10**9) == 7.5e-3
    assert constant(1e-3).lr_at(0) == 1e-3


def test_exponential_decay_is_log_linear_and_ends_at_final_lr():
    steps = 1000
    schedule = exponential_decay(7.5e-3, 3.75e-4, total_steps=steps)  # stage 3
    assert schedule.lr_at(0) == pytest.approx(7.5e-3)
    assert schedule.lr_at(steps // 2) == pytest.approx(math.sqrt(7.5e-3 * 3.75e-4))
    assert schedule.lr_at(steps) == pytest.approx(3.75e-4)
    assert schedule.lr_at(5 * steps) == pytest.approx(3.75e-4)
    logs = [math.log(schedule.lr_at(s)) for s in range(0, steps + 1, 100)]
    assert all(b - a == pytest.approx(logs[1] - logs[0]) for a, b in itertools.pairwise(logs))


def test_decay_starts_after_warmup():
    schedule = exponential_decay(1e-3, 1e-4, total_steps=1100, warmup_steps=100)
    assert schedule.lr_at(99) == pytest.approx(1e-3)
    assert schedule.lr_at(100) == pytest.approx(1e-3)
    assert schedule.lr_at(600) == pytest.approx(math.sqrt(1e-3 * 1e-4))
    assert schedule.lr_at(1100) == pytest.approx(1e-4)


def test_cosine_to_a_floor():
    schedule = cosine_decay(1e-3, 1e-4, total_steps=200, warmup_steps=10)
    assert schedule.lr_at(10) == pytest.approx(1e-3)
    assert schedule.lr_at(105) == pytest.approx((1e-3 + 1e-4) / 2)
    assert schedule.lr_at(200) == pytest.approx(1e-4)
    values = [schedule.lr_at(s) for s in range(10, 201)]
    assert all(b <= a for a, b in itertools.pairwise(values))
    assert cosine_decay(1e-3, 0.0, total_steps=10).lr_at(10) == 0.0


@pytest.mark.parametrize("shape,midpoint", [("linear", 5.5e-4), ("exponential", math.sqrt(1e-3 * 1e-4)),
                                            ("cosine", 5.5e-4)])
def test_wsd_is_stable_then_decays_over_the_last_fraction(shape, midpoint):
    schedule = wsd(1e-3, 1e-4, total_steps=1000, decay_fraction=0.2, decay_shape=shape, warmup_steps=50)
    assert (schedule.warmup_steps, schedule.stable_steps, schedule.decay_steps) == (50, 750, 200)
    assert schedule.lr_at(49) == schedule.lr_at(50) == schedule.lr_at(799) == pytest.approx(1e-3)
    assert schedule.lr_at(900) == pytest.approx(midpoint)
    assert schedule.lr_at(1000) == pytest.approx(1e-4)
    assert schedule.total_steps == 1000


def test_multiplier_is_lr_over_peak():
    schedule = cosine_decay(2e-3, 1e-4, total_steps=50, warmup_steps=5)
    for step in (0, 4, 5, 27, 50, 80):
        assert schedule.multiplier(step) == pytest.approx(schedule.lr_at(step) / 2e-3)


@pytest.mark.parametrize("kind,direct", [
    ("constant", constant(1e-3, 10)),
    ("exponential", exponential_decay(1e-3, 1e-5, 100, 10)),
    ("cosine", cosine_decay(1e-3, 1e-5, 100, 10)),
    ("wsd", wsd(1e-3, 1e-5, 100, 0.3, "cosine", 10)),
])
def test_build_schedule_from_config(kind, direct):
    config = ScheduleConfig(kind=kind, lr=1e-3, final_lr=1e-5, warmup_steps=10, total_steps=100,
                            decay_fraction=0.3, decay_shape="cosine")
    assert build_schedule(config) == direct


@pytest.mark.parametrize("config,message", [
    (ScheduleConfig(kind="linear_decay"), "unknown"),
    (ScheduleConfig(kind="exponential", lr=1e-4, final_lr=1e-3, total_steps=10), "above the peak"),
    (ScheduleConfig(kind="cosine", lr=1e-3, final_lr=1e-4, warmup_steps=20, total_steps=10), "longer than"),
    (ScheduleConfig(kind="constant", warmup_steps=20, total_steps=10), "longer than"),
    (ScheduleConfig(kind="exponential", lr=1e-3, total_steps=10), "final_lr"),
    (ScheduleConfig(kind="wsd", lr=1e-3, final_lr=1e-4), "total_steps"),
    (ScheduleConfig(kind="exponential", lr=1e-3, final_lr=0.0, total_steps=10), "positive final"),
    (ScheduleConfig(kind="wsd", lr=1e-3, final_lr=1e-4, total_steps=10, decay_fraction=1.5), "decay_fraction"),
    (ScheduleConfig(kind="wsd", lr=1e-3, final_lr=1e-4, total_steps=10, warmup_steps=5, decay_fraction=0.8),
     "more than"),
    (ScheduleConfig(kind="wsd", lr=1e-3, final_lr=1e-4, total_steps=10, decay_shape="step"), "decay_shape"),
    (ScheduleConfig(kind="constant", lr=0.0), "positive"),
    (ScheduleConfig(kind="constant", warmup_steps=-1), "warmup_steps"),
])
def test_impossible_values_fail_with_the_value_named(config, message):
    with pytest.raises(ScheduleError, match=message):
        build_schedule(config)


def test_negative_step_fails():
    with pytest.raises(ScheduleError, match="step"):
        constant(1e-3).lr_at(-1)


def _optimizer(lr_scales=(1.0, 0.25), peak=1e-3):
    groups = [dict(params=[torch.nn.Parameter(torch.ones(3))], lr=peak * scale, lr_scale=scale)
              for scale in lr_scales]
    return torch.optim.AdamW(groups)


def test_lambda_lr_follows_the_schedule_on_every_group_and_resumes():
    schedule = wsd(1e-3, 1e-5, total_steps=30, decay_fraction=0.5, warmup_steps=5)
    optimizer = _optimizer()
    scheduler = lambda_lr(optimizer, schedule)
    seen = []
    for step in range(20):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    for step, lrs in enumerate(seen):
        assert lrs == pytest.approx([schedule.lr_at(step), schedule.lr_at(step) * 0.25])

    # A fresh optimizer and scheduler restored from the state_dicts continue where the run stopped.
    resumed_optimizer = _optimizer()
    resumed = lambda_lr(resumed_optimizer, schedule)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(scheduler.state_dict())
    for step in range(20, 32):
        expected = [group["lr"] for group in optimizer.param_groups]
        assert [group["lr"] for group in resumed_optimizer.param_groups] == pytest.approx(expected)
        assert expected == pytest.approx([schedule.lr_at(step), schedule.lr_at(step) * 0.25])
        for opt, sched in ((optimizer, scheduler), (resumed_optimizer, resumed)):
            opt.step()
            sched.step()


def test_set_learning_rate_scales_each_group():
    optimizer = _optimizer(lr_scales=(1.0, 0.5))
    optimizer.add_param_group(dict(params=[torch.nn.Parameter(torch.ones(2))]))  # no lr_scale: 1
    set_learning_rate(optimizer, 2e-3)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([2e-3, 1e-3, 2e-3])


def test_lambda_lr_rejects_groups_built_with_another_peak():
    with pytest.raises(ScheduleError, match="peak_lr"):
        lambda_lr(_optimizer(peak=5e-4), constant(1e-3))


def test_schedule_is_plain_data():
    schedule = WarmupStableDecay(1e-3, 1e-4, warmup_steps=1, stable_steps=2, decay_steps=3, decay_shape="cosine")
    assert schedule == WarmupStableDecay(1e-3, 1e-4, 1, 2, 3, "cosine")
    with pytest.raises(ScheduleError, match="decay_steps"):
        WarmupStableDecay(1e-3, 1e-4, decay_steps=2.5)
