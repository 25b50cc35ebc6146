"""The flat-buffer optimizers against the float64 formulas, bucket by bucket and whole."""
import numpy as np
import pytest

from engine.flat import FlatLayout
from engine.optimizer import HybridOptimizer, MomentumSGD, make_optimizer
from engine.parallel import Team
from engine.schedule import Coefficients, make_schedule

SEED = np.random.SeedSequence().entropy % 2**32
print(f"test_optimizer seed {SEED}")


@pytest.fixture
def rng():
    return np.random.default_rng(SEED)


def small_layout():
    return FlatLayout([("fc.bias", (10,), False), ("fc.weight", (10, 33), True),
                       ("bn1.weight", (7,), False), ("bn1.bias", (7,), False),
                       ("conv1.weight", (8, 3, 3, 3), True)])


def setup(rng, layout):
    params = layout.alloc(np)
    for v in layout.views(params).values():
        v[...] = rng.standard_normal(v.shape)
    grads = layout.alloc(np)
    for v in layout.views(grads).values():
        v[...] = rng.standard_normal(v.shape) * 2
    return params, grads


def reference(params, grads, state, decay, coef, grad_scale, mu1, mu2, eps, wd, hybrid):
    w, gr = params.astype(np.float64), grads.astype(np.float64)
    g = gr * grad_scale + wd * decay * w
    d = state["d"].astype(np.float64)
    if hybrid:
        m = mu2 * state["m"].astype(np.float64) + (1 - mu2) * g * g
        d = mu1 * d - (coef.a_sgd + coef.a_rms / (np.sqrt(m) + eps)) * g
        return w + coef.eta * d, {"d": d, "m": m}
    d = mu1 * d - g
    return w + coef.eta * d, {"d": d}


@pytest.mark.parametrize("name", ["hybrid", "sgd"])
@pytest.mark.parametrize("exclude", [True, False])
def test_steps_match_float64(rng, name, exclude):
    layout = small_layout()
    params, grads = setup(rng, layout)
    opt = make_optimizer(name, params, layout, weight_decay=1e-2, exclude_bn_bias=exclude)
    decay = layout.decay_mask(np, np.float64) if exclude else np.ones(layout.total)
    sched = make_schedule("hybrid", 1024, 9)
    ref_w = params.astype(np.float64)
    ref_state = {k: np.zeros(layout.total) for k in opt.state}
    for it in range(5):
        coef = sched(1.0 + 0.1 * it)
        ref_w, ref_state = reference(ref_w, grads, ref_state, decay, coef, 0.25, 0.9, 0.99, 1e-8,
                                     1e-2, name == "hybrid")
        opt.step(grads, coef=coef, grad_scale=0.25)
        grads = (grads * 0.7 + rng.standard_normal(layout.total).astype(np.float32)).astype(np.float32)
    assert np.max(np.abs(params - ref_w)) / np.max(np.abs(ref_w)) < 1e-5
    for k, v in opt.state.items():
        assert np.max(np.abs(v - ref_state[k])) / np.max(np.abs(ref_state[k])) < 1e-5


def test_bn_and_bias_are_not_decayed_by_default(rng):
    layout = small_layout()
    params, _ = setup(rng, layout)
    before = params.copy()
    opt = HybridOptimizer(params, layout, weight_decay=0.1)
    opt.step(layout.alloc(np), coef=Coefficients(1.0, 1.0, 0.0))
    views, old = layout.views(params), layout.views(before)
    for slot in layout.slots:
        changed = not np.array_equal(views[slot.name], old[slot.name])
        assert changed == slot.decay, slot.name


@pytest.mark.parametrize("threads", [1, 3])
def test_bucketwise_updates_equal_one_step(rng, threads):
    """The reducer updates bucket by bucket, each split over the model's Team; the result
    must equal one whole-buffer step on one thread, bit for bit."""
    layout = small_layout()
    p1, grads = setup(rng, layout)
    p2 = p1.copy()
    coef = Coefficients(0.3, 0.6, 0.2)
    whole = HybridOptimizer(p1, layout)
    whole.step(grads, coef=coef, grad_scale=0.5)
    buckets = HybridOptimizer(p2, layout, team=Team(threads, min_split=1))
    cuts = [0, layout.slots[1].offset, layout.slots[3].offset, layout.total]
    for start, stop in zip(cuts, cuts[1:]):
        buckets.update(grads[start:stop], start, stop, coef=coef, grad_scale=0.5)  # slice form
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(whole.state["m"], buckets.state["m"])


def test_fp16_gradients_with_loss_scale(rng):
    """An FP16 all-reduce result with a loss scale gives the fp32 result of the mean gradient."""
    layout = small_layout()
    p1, grads = setup(rng, layout)
    p2 = p1.copy()
    world, loss_scale = 4, 128.0
    summed16 = (grads * world * loss_scale).astype(np.float16)
    coef = Coefficients(0.5, 0.7, 0.1)
    MomentumSGD(p1, layout).step(summed16.astype(np.float32) / (world * loss_scale), coef=coef)
    MomentumSGD(p2, layout).step(summed16, coef=coef, grad_scale=1 / (world * loss_scale))
    np.testing.assert_allclose(p1, p2, rtol=1e-6, atol=1e-7)


def test_hybrid_warmup_then_sgd_minimizes_a_quadratic(rng):
    """The optimizer actually optimizes: an ill-conditioned least-squares problem."""
    layout = FlatLayout([("w", (64,), True)])
    params = layout.alloc(np)
    target = rng.standard_normal(64).astype(np.float32)
    curv = np.logspace(-1, 1, 64).astype(np.float32)
    opt = HybridOptimizer(params, layout, weight_decay=0.0)
    sched = make_schedule("hybrid", 256, 10, base_lr=0.05, eta_rms=1e-2)
    loss = lambda: float(0.5 * np.sum(curv * (params - target) ** 2))
    start = loss()
    for it in range(400):
        opt.step(curv * (params - target), coef=sched(it / 40))
    assert loss() < 1e-3 * start


def test_state_dict_roundtrip_and_refusals(rng):
    layout = small_layout()
    params, grads = setup(rng, layout)
    opt = HybridOptimizer(params, layout)
    opt.step(grads, coef=Coefficients(0.1, 0.5, 0.2))
    sd = opt.state_dict()
    other = HybridOptimizer(params.copy(), layout)
    other.load_state_dict(sd)
    for k in ("d", "m"):
        np.testing.assert_array_equal(other.state[k], opt.state[k])
    sd["d"][0] = 123.0  # the state dict is a copy, not a view
    assert opt.state["d"][0] != 123.0
    with pytest.raises(ValueError, match="holds 'hybrid' state, this is 'sgd'"):
        MomentumSGD(params, layout).load_state_dict(sd)
    other_layout = FlatLayout([("w", (layout.total,), True)])
    with pytest.raises(ValueError, match="another parameter layout"):
        HybridOptimizer(other_layout.alloc(np), other_layout).load_state_dict(sd)


def test_bad_ranges_and_inputs_are_named(rng):
    layout = small_layout()
    params, grads = setup(rng, layout)
    opt = HybridOptimizer(params, layout)
    coef = Coefficients(0.1)
    with pytest.raises(ValueError, match=r"range \[0, 99999\)"):
        opt.update(grads, 0, 99999, coef=coef)
    with pytest.raises(ValueError, match="gradients have 5 elements"):
        opt.update(grads[:5], 16, 32, coef=coef)
    with pytest.raises(TypeError, match="float32 or float16"):
        opt.step(grads.astype(np.float64), coef=coef)
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        make_optimizer("adam", params, layout)


@pytest.mark.parametrize("name", ["hybrid", "sgd"])
def test_weight_copy_is_the_rounded_params_after_every_update(rng, name):
    import ml_dtypes
    layout = small_layout()
    params, grads = setup(rng, layout)
    copy = np.zeros(layout.total, ml_dtypes.bfloat16)
    opt = make_optimizer(name, params, layout, weight_copy=copy, team=Team(3, min_split=1))
    copy[...] = params          # as model.refresh_weight_copy() does
    cut = layout.slots[2].offset
    before = copy.copy()
    opt.update(grads, 0, cut, coef=Coefficients(0.3, 0.6, 0.2))
    assert np.array_equal(copy[:cut].view(np.uint16), params[:cut].astype(ml_dtypes.bfloat16).view(np.uint16))
    assert np.array_equal(copy[cut:].view(np.uint16), before[cut:].view(np.uint16))   # outside the range
    with pytest.raises(ValueError, match="weight_copy must be a bfloat16"):
        make_optimizer(name, params, layout, weight_copy=np.zeros(layout.total, np.float16))


def test_device_scalars_are_copied_once_per_change(rng, monkeypatch):
    """The device path (stand-ins: NumPy arrays taken for device arrays, a recording update
    launcher and a counting copy): one copy of the 4 scalars per change of (coef, grad_scale)."""
    from engine import cuda_ops, optimizer
    copies, seen = [], []
    monkeypatch.setattr(optimizer, "_is_numpy", lambda a: False)
    monkeypatch.setattr(optimizer, "_copy_to_device", lambda dst, host: (copies.append(host.copy()),
                                                                         dst.__setitem__(Ellipsis, host)))
    monkeypatch.setattr(cuda_ops, "hybrid_update", lambda *a, **k: seen.append(a[5].copy()))
    layout = small_layout()
    params, grads = setup(rng, layout)
    opt = HybridOptimizer(params, layout)
    coef, cut = Coefficients(0.3, 0.6, 0.2), layout.slots[2].offset
    for _ in range(2):                  # two buckets of one step, twice over
        opt.update(grads, 0, cut, coef=coef, grad_scale=0.25)
        opt.update(grads, cut, None, coef=coef, grad_scale=0.25)
    opt.prepare(coef, 0.25)             # before a graph replay: same values, no copy
    assert len(copies) == 1 and len(seen) == 4
    np.testing.assert_array_equal(copies[0], np.float32([0.3, 0.6, 0.2, 0.25]))
    opt.prepare(Coefficients(0.1, 0.6, 0.2), 0.25)
    opt.update(grads, coef=Coefficients(0.1, 0.6, 0.2), grad_scale=0.25)
    assert len(copies) == 2 and seen[-1][0] == np.float32(0.1)
