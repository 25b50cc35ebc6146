"""Learning-rate and warm-up schedules of the large-minibatch recipe, per iteration.

Every schedule is a function of the epoch as a real number (``iteration / iters_per_epoch``)
and every boundary is stated for the paper's 90-epoch run and scaled proportionally to the
run's length (``epochs=10`` puts the 40-epoch boundary at 4.44). A schedule returns the
three coefficients the optimizer needs for one iteration::

    sched = make_schedule("hybrid", global_batch=32768, epochs=90)
    coef = sched(epoch_at(it, iters_per_epoch))   # Coefficients(eta, a_sgd, a_rms)
    optimizer.update(grads, start, stop, coef=coef, grad_scale=1 / world_size)

"hybrid" (Akiba et al. 2017):
  * linear scaling rule: ``eta = 0.1 * global_batch / 256``;
  * slow-start: ``0.5*eta`` until epoch 40, ``0.075*eta`` to 70, ``0.01*eta`` to 85,
    ``0.001*eta`` to 90 (no separate learning-rate warm-up);
  * RMSprop warm-up: ``a_sgd(e) = 0.5*exp(2(e-c)/p)`` for ``e < c``, then the middle branch
    until ``c + p/2``, then 1, with c = 10 and p = 5 epochs (of 90). The middle branch is
    ``0.5 + (e-c)/p`` (form "smooth": continuous, with a continuous slope, ends at 1).
    Transcriptions of the paper print ``0.5 + 2(e-c)/p`` (form "published"), which reaches
    1.5 at ``c + p/2`` and drops back to 1 (a_rms below is then negative in that window);
    it is kept, as printed, for comparison;
  * ``a_rms = (1 - a_sgd) * eta_rms / eta``: the RMSprop term then moves the weights at the
    rate ``(1 - a_sgd) * eta_rms`` whatever eta is. This is this reimplementation's choice
    (eta_rms = 3e-4 default), not a formula confirmed in the paper.

"goyal" (the baseline, Goyal et al. 2017): momentum SGD at the linearly scaled rate with a
linear warm-up over 5 epochs (of 90) from ``min(0.1, eta)`` (the rate of a 256 batch) to eta,
then eta divided by 10 at epochs 30, 60 and 80 (of 90). It returns a_sgd = 1, a_rms = 0,
which turns the hybrid update into momentum SGD.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

REFERENCE_EPOCHS = 90.0
A_SGD_FORMS = ("smooth", "published")


@dataclass(frozen=True)
class Coefficients:
    """What the optimizer needs for one iteration."""

    eta: float
    a_sgd: float = 1.0
    a_rms: float = 0.0


def linear_scaled_lr(global_batch: int, base_lr: float = 0.1, base_batch: int = 256) -> float:
    """Goyal et al.'s linear scaling rule: the rate grows with the global minibatch."""
    if global_batch <= 0:
        raise ValueError(f"schedule: global_batch must be positive, got {global_batch}")
    return base_lr * global_batch / base_batch


def epoch_at(iteration: int, iters_per_epoch: int) -> float:
    """The fractional epoch at which iteration `iteration` (0-based) runs."""
    return iteration / iters_per_epoch


def _scaled(epochs_of_90: float, epochs: float) -> float:
    return epochs_of_90 * epochs / REFERENCE_EPOCHS


def _piecewise(epoch: float, boundaries, values) -> float:
    """values[i] before boundaries[i]; the last value after the last boundary."""
    for bound, value in zip(boundaries, values):
        if epoch < bound:
            return value
    return values[-1]


@dataclass(frozen=True)
class SlowStart:
    """The paper's slow-start rate: fractions of eta between scaled epoch boundaries."""

    eta: float
    epochs: float
    boundaries_of_90: tuple = (40.0, 70.0, 85.0)
    fractions: tuple = (0.5, 0.075, 0.01, 0.001)

    def __call__(self, epoch: float) -> float:
        bounds = [_scaled(b, self.epochs) for b in self.boundaries_of_90]
        return self.eta * _piecewise(epoch, bounds, self.fractions)


@dataclass(frozen=True)
class RmsWarmup:
    """a_sgd(e): from RMSprop (a_sgd ~ 0) to SGD (a_sgd = 1) around epoch c (scaled)."""

    epochs: float
    c_of_90: float = 10.0
    p_of_90: float = 5.0
    form: str = "smooth"

    def __post_init__(self):
        if self.form not in A_SGD_FORMS:
            raise ValueError(f"schedule: a_sgd form must be one of {A_SGD_FORMS}, got {self.form!r}")

    def __call__(self, epoch: float) -> float:
        c, p = _scaled(self.c_of_90, self.epochs), _scaled(self.p_of_90, self.epochs)
        if epoch < c:
            return 0.5 * math.exp(2.0 * (epoch - c) / p)
        if epoch < c + p / 2:
            slope = 1.0 if self.form == "smooth" else 2.0
            return 0.5 + slope * (epoch - c) / p
        return 1.0


@dataclass(frozen=True)
class HybridSchedule:
    """Slow-start rate with the RMSprop-to-SGD warm-up."""

    slow_start: SlowStart
    warmup: RmsWarmup
    eta_rms: float = 3e-4

    def __call__(self, epoch: float) -> Coefficients:
        eta = self.slow_start(epoch)
        a_sgd = self.warmup(epoch)
        return Coefficients(eta, a_sgd, (1.0 - a_sgd) * self.eta_rms / eta)


@dataclass(frozen=True)
class GoyalSchedule:
    """Linear warm-up then step decay, for momentum SGD."""

    eta: float
    epochs: float
    warmup_of_90: float = 5.0
    warmup_start: float = 0.1
    steps_of_90: tuple = (30.0, 60.0, 80.0)

    def __call__(self, epoch: float) -> Coefficients:
        warm = _scaled(self.warmup_of_90, self.epochs)
        start = min(self.warmup_start, self.eta)
        if epoch < warm:
            return Coefficients(start + (self.eta - start) * epoch / warm)
        bounds = [_scaled(s, self.epochs) for s in self.steps_of_90]
        factors = [0.1 ** k for k in range(len(bounds) + 1)]
        return Coefficients(self.eta * _piecewise(epoch, bounds, factors))


SCHEDULES = ("hybrid", "goyal")


def make_schedule(name: str, global_batch: int, epochs: float, *, base_lr: float = 0.1,
                  a_sgd_form: str = "smooth", eta_rms: float = 3e-4):
    """The schedule `name` ("hybrid" or "goyal") for a run of `epochs` at `global_batch`."""
    if epochs <= 0:
        raise ValueError(f"schedule: --epochs must be positive, got {epochs}")
    eta = linear_scaled_lr(global_batch, base_lr)
    if name == "hybrid":
        return HybridSchedule(SlowStart(eta, epochs), RmsWarmup(epochs, form=a_sgd_form), eta_rms)
    if name == "goyal":
        return GoyalSchedule(eta, epochs, warmup_start=base_lr)
    raise ValueError(f"schedule: unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
