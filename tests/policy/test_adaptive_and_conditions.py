"""AdaptiveInterval, overhead_interval, young_daly_interval, Monitor, moved_enough, SaveTrigger: concrete numbers."""
from __future__ import annotations

import math

import pytest

from lightning_ckpt.policy import AdaptiveInterval, Monitor, SaveTrigger, moved_enough, overhead_interval, young_daly_interval


# --------------------------------------------------------------------------- overhead budget


def test_overhead_interval_concrete():
    # a 0.5 s stall every N steps of 0.1 s costs 0.5 / (0.1 N); <= 5 % needs N >= 100
    assert overhead_interval(0.1, 0.5, 0.05) == 100
    assert overhead_interval(0.1, 0.5, 0.5) == 10
    assert overhead_interval(0.2, 0.5, 0.05) == 50
    # rounding up: 0.5 / (0.03 * 0.1) = 166.67 -> 167 keeps it under budget, 166 would not
    n = overhead_interval(0.1, 0.5, 0.03)
    assert n == 167
    assert 0.5 / (n * 0.1) <= 0.03 < 0.5 / ((n - 1) * 0.1)


def test_overhead_interval_never_below_one():
    assert overhead_interval(1.0, 0.0, 0.05) == 1
    assert overhead_interval(10.0, 0.01, 0.5) == 1
    assert overhead_interval(0.0, 1.0, 0.05) == 1


def test_young_daly_interval_concrete():
    # sqrt(2 * 0.5 s * 3600 s) = 60 s of work = 600 steps of 0.1 s
    assert young_daly_interval(0.1, 0.5, 3600) == 600
    # sqrt(2 * 2 * 10000) = 200 s -> 200 steps of 1 s
    assert young_daly_interval(1.0, 2.0, 10000) == 200
    assert young_daly_interval(100.0, 0.001, 1.0) == 1
    assert young_daly_interval(0.0, 1.0, 100) == 1


# --------------------------------------------------------------------------- AdaptiveInterval


def test_adaptive_warmup_until_both_are_measured():
    ad = AdaptiveInterval(max_overhead=0.05, warmup_steps=7)
    assert ad.interval() == 7
    ad.observe_step(0.1)
    assert ad.interval() == 7
    ad.observe_stall(0.5)
    assert ad.interval() == 100


def test_adaptive_with_mtbf_uses_young_daly_but_never_below_budget():
    ad = AdaptiveInterval(max_overhead=0.05, mtbf_s=3600)
    ad.observe_step(0.1)
    ad.observe_stall(0.5)
    assert ad.interval() == 600
    short = AdaptiveInterval(max_overhead=0.05, mtbf_s=1.0)  # Young/Daly says 10, the budget says 100
    short.observe_step(0.1)
    short.observe_stall(0.5)
    assert short.interval() == 100


def test_adaptive_max_interval_caps():
    ad = AdaptiveInterval(max_overhead=0.05, max_interval=30)
    ad.observe_step(0.1)
    ad.observe_stall(0.5)
    assert ad.interval() == 30


def test_adaptive_moving_average_and_ignored_nonpositive_steps():
    ad = AdaptiveInterval()
    ad.observe_step(0.1)
    ad.observe_step(0.2)
    assert ad.step_s == pytest.approx(0.8 * 0.1 + 0.2 * 0.2)
    ad.observe_step(0.0)
    ad.observe_step(-1.0)
    assert ad.step_s == pytest.approx(0.12)
    ad.observe_stall(1.0)
    ad.observe_stall(0.0)
    assert ad.stall_s == pytest.approx(0.8)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, "5%", None])
def test_adaptive_invalid_max_overhead_raises(bad):
    with pytest.raises(ValueError, match="max_overhead"):
        AdaptiveInterval(max_overhead=bad)


@pytest.mark.parametrize("bad", [0, -5, "long"])
def test_adaptive_invalid_mtbf_raises(bad):
    with pytest.raises(ValueError, match="mtbf_s"):
        AdaptiveInterval(mtbf_s=bad)


# --------------------------------------------------------------------------- Monitor


def test_monitor_better_min():
    m = Monitor("val_loss")
    assert m.better(1.0, 2.0)
    assert not m.better(2.0, 1.0)
    assert not m.better(1.0, 1.0)
    assert m.better(5.0, None)
    assert m.better(5.0, float("nan"))
    assert not m.better(float("nan"), 1.0)
    assert not m.better(float("inf"), None)
    assert not m.better(None, 1.0)


def test_monitor_better_max_and_min_delta():
    m = Monitor("acc", mode="max", min_delta=0.1)
    assert m.better(0.95, 0.8)
    assert not m.better(0.85, 0.8)  # improves by 0.05 < min_delta
    assert not m.better(0.7, 0.8)
    mn = Monitor("loss", mode="min", min_delta=0.5)
    assert not mn.better(1.6, 2.0)
    assert mn.better(1.4, 2.0)


def test_monitor_sort_key_smaller_is_better():
    assert Monitor("l").sort_key(1.0) < Monitor("l").sort_key(2.0)
    assert Monitor("a", mode="max").sort_key(2.0) < Monitor("a", mode="max").sort_key(1.0)
    assert Monitor("l").sort_key(float("nan")) == math.inf
    assert Monitor("a", mode="max").sort_key(float("nan")) == math.inf


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"monitor": ""}, "monitor"),
        ({"monitor": "x", "mode": "x"}, "mode='x'"),
        ({"monitor": "x", "min_delta": -1}, "min_delta=-1"),
        ({"monitor": "x", "min_delta": float("nan")}, "min_delta"),
    ],
)
def test_monitor_invalid(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Monitor(**kwargs)


# --------------------------------------------------------------------------- moved_enough


def test_moved_enough_relative():
    assert moved_enough(1.0, None, 0.5)
    assert not moved_enough(1.0, 2.0, 0.5)  # moved exactly 50 %: not more than
    assert moved_enough(0.9, 2.0, 0.5)  # 55 %
    assert moved_enough(3.1, 2.0, 0.5)  # 55 % upwards
    assert not moved_enough(2.5, 2.0, 0.5)
    assert moved_enough(-1.0, 1.0, 0.5)  # 200 %


def test_moved_enough_from_zero_and_non_finite():
    assert moved_enough(1e-6, 0.0, 0.5)
    assert not moved_enough(0.0, 0.0, 0.5)
    assert moved_enough(float("nan"), 1.0, 0.5)
    assert moved_enough(1.0, float("inf"), 0.5)


# --------------------------------------------------------------------------- SaveTrigger


def test_save_trigger_steps_and_default():
    t = SaveTrigger(every_n_train_steps=4)
    assert [s for s in range(0, 13) if t.due_on_step(s, None, 0.0, 0.0)] == [4, 8, 12]
    assert not t.due_on_step(8, 8, 0.0, 0.0)
    assert SaveTrigger().every_n_epochs == 1
    assert SaveTrigger(every_n_epochs=2).due_on_epoch_end(1, 8, None)
    assert not SaveTrigger(every_n_epochs=2).due_on_epoch_end(0, 4, None)


def test_save_trigger_two_set_raises():
    with pytest.raises(ValueError, match="every_n_train_steps and every_n_seconds"):
        SaveTrigger(every_n_train_steps=1, every_n_seconds=2.0)
