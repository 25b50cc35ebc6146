"""The recipe's schedules: linear scaling, slow-start, a_sgd warm-up, a_rms, Goyal baseline."""
import math

import numpy as np
import pytest

from engine.schedule import (Coefficients, GoyalSchedule, RmsWarmup, SlowStart, epoch_at,
                             linear_scaled_lr, make_schedule)


def test_linear_scaling_rule():
    assert linear_scaled_lr(256) == pytest.approx(0.1)
    assert linear_scaled_lr(32768) == pytest.approx(12.8)
    with pytest.raises(ValueError, match="global_batch"):
        linear_scaled_lr(0)


def test_slow_start_at_90_epochs():
    s = SlowStart(eta=12.8, epochs=90)
    for epoch, frac in [(0, 0.5), (39.99, 0.5), (40, 0.075), (69.9, 0.075), (70, 0.01),
                        (84.9, 0.01), (85, 0.001), (89.99, 0.001)]:
        assert s(epoch) == pytest.approx(12.8 * frac), epoch


def test_slow_start_scales_with_run_length():
    """A 9-epoch run has every boundary at a tenth: 4, 7, 8.5."""
    short, full = SlowStart(eta=1.0, epochs=9), SlowStart(eta=1.0, epochs=90)
    for e in np.linspace(0, 8.99, 97):
        assert short(e) == full(10 * e)
    assert short(3.999) == 0.5 and short(4.0) == 0.075


def test_a_sgd_smooth_form():
    w = RmsWarmup(epochs=90)  # c = 10, p = 5
    assert w(0) == pytest.approx(0.5 * math.exp(-4))
    assert w(10) == pytest.approx(0.5)
    assert w(11) == pytest.approx(0.7)
    assert w(12.5) == 1.0 and w(50) == 1.0
    es = np.linspace(0, 20, 4001)
    a = np.array([w(e) for e in es])
    assert np.all(np.diff(a) >= 0) and a.max() == 1.0
    # Continuous value and slope at c and at c + p/2 (the point of the smooth form).
    assert np.max(np.abs(np.diff(a))) < 2 * (es[1] - es[0]) / 5 + 1e-12


def test_a_sgd_published_form_overshoots():
    w = RmsWarmup(epochs=90, form="published")
    assert w(11) == pytest.approx(0.9)
    assert w(12.49) == pytest.approx(0.5 + 2 * 2.49 / 5)
    assert w(12.49) > 1.4 and w(12.5) == 1.0
    with pytest.raises(ValueError, match="a_sgd form"):
        RmsWarmup(epochs=90, form="other")


def test_a_sgd_scales_with_run_length():
    short, full = RmsWarmup(epochs=18), RmsWarmup(epochs=90)
    for e in np.linspace(0, 4, 41):
        assert short(e) == pytest.approx(full(5 * e))


def test_hybrid_coefficients():
    sched = make_schedule("hybrid", global_batch=32768, epochs=90, eta_rms=3e-4)
    for epoch in (0.0, 5.3, 10.0, 11.7, 30.0, 75.0):
        c = sched(epoch)
        eta = sched.slow_start(epoch)
        a_sgd = sched.warmup(epoch)
        assert c == Coefficients(eta, a_sgd, c.a_rms)
        # The RMSprop term moves weights at (1 - a_sgd) * eta_rms whatever eta is.
        assert c.eta * c.a_rms == pytest.approx((1 - a_sgd) * 3e-4)
    assert sched(20.0).a_rms == 0.0


def test_goyal_baseline():
    sched = make_schedule("goyal", global_batch=8192, epochs=90)
    eta = 3.2
    assert sched(0).eta == pytest.approx(0.1)
    assert sched(2.5).eta == pytest.approx(0.1 + (eta - 0.1) / 2)
    assert sched(5).eta == pytest.approx(eta)
    assert sched(29.9).eta == pytest.approx(eta)
    assert sched(30).eta == pytest.approx(eta / 10)
    assert sched(60).eta == pytest.approx(eta / 100)
    assert sched(80).eta == pytest.approx(eta / 1000)
    assert sched(45) == Coefficients(pytest.approx(eta / 10), 1.0, 0.0)
    # Scaled: a 9-epoch run warms up over 0.5 epochs and steps at 3, 6 and 8.
    short = GoyalSchedule(eta=eta, epochs=9)
    assert short(0.25).eta == pytest.approx(sched(2.5).eta)
    assert short(3.0).eta == pytest.approx(eta / 10)


def test_per_iteration_fractional_epochs():
    sched = make_schedule("hybrid", global_batch=4096, epochs=9)
    its = 7
    rates = [sched(epoch_at(i, its)).eta for i in range(9 * its)]
    # The boundary at 4 epochs falls at iteration 28 exactly.
    assert rates[27] == pytest.approx(0.5 * 1.6) and rates[28] == pytest.approx(0.075 * 1.6)
    a = [sched(epoch_at(i, its)).a_sgd for i in range(9 * its)]
    assert len(set(a[:7])) == 7  # changes every iteration, not once per epoch


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="unknown schedule 'adam'"):
        make_schedule("adam", 256, 10)
    with pytest.raises(ValueError, match="--epochs"):
        make_schedule("hybrid", 256, 0)
