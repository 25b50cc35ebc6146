"""Every layer's backward against float64 central finite differences on random inputs.

Each check uses the scalar L = sum(forward(x) * R) for a random R, so dL/dy = R, and
compares the analytic gradients with (L(v + h) - L(v - h)) / 2h, norm-wise relative
error below 1e-6, over all coordinates of small tensors or a random sample of larger ones.
"""
import numpy as np
import pytest

from engine import batchnorm
from engine.conv import col2im, im2col
from engine.flat import FlatLayout
from engine.layers import BatchNorm, Conv2d, GlobalAvgPool, Linear, MaxPool
from engine.loss import softmax_cross_entropy
from engine.parallel import Team
from engine.workspace import Workspace
from numerics import assert_close, norm_rel_err

H = 1e-6
TOL = 1e-6


@pytest.fixture
def rng():
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print("seed", seed)
    return np.random.default_rng(seed)


def bound(layer, rng, dtype=np.float64):
    """Give a parameterized layer its own flat buffers, filled at random."""
    layout = FlatLayout(layer.specs())
    params, grads = layout.alloc(np, dtype), layout.alloc(np, dtype)
    params[...] = rng.standard_normal(layout.total)
    done = []
    layer.bind(layout, params, grads, done.append)
    return done


def numeric_grad(loss, v, rng, samples=60):
    """Central differences of loss() with respect to a random sample of v's entries
    (v is perturbed in place and restored)."""
    flat = v.reshape(-1)
    idx = rng.choice(flat.size, size=min(samples, flat.size), replace=False)
    out = np.empty(idx.size)
    for j, i in enumerate(idx):
        old = flat[i]
        flat[i] = old + H
        up = loss()
        flat[i] = old - H
        down = loss()
        flat[i] = old
        out[j] = (up - down) / (2 * H)
    return idx, out


def check(analytic, loss, v, rng):
    idx, num = numeric_grad(loss, v, rng)
    err = norm_rel_err(np.ravel(analytic)[idx], num)
    assert err < TOL, err


@pytest.mark.parametrize("k,s,p,hw", [(1, 1, 0, (5, 6)), (1, 2, 0, (6, 7)), (3, 1, 1, (5, 5)),
                                       (3, 2, 1, (7, 6)), (7, 2, 3, (9, 8)), (2, 1, 0, (5, 4)),
                                       (3, 1, 0, (6, 5)), (3, 3, 2, (8, 7))])
def test_conv2d(rng, k, s, p, hw):
    ws = Workspace(np)
    conv = Conv2d("c", ws, 3, 4, k, s, p)
    done = bound(conv, rng)
    x = rng.standard_normal((2, *hw, 3))
    y = conv.forward(x, train=True)
    r = rng.standard_normal(y.shape)
    # Reference forward: a direct sum over the kernel on a padded input.
    xpad = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    ref = np.zeros_like(y)
    for kh in range(k):
        for kw in range(k):
            patch = xpad[:, kh:kh + s * y.shape[1]:s, kw:kw + s * y.shape[2]:s, :][:, :y.shape[1], :y.shape[2]]
            ref += patch @ conv.weight[:, kh, kw, :].T      # OHWI: (Cout, KH, KW, Cin)
    assert_close(y, ref, rtol=1e-12, atol=1e-12)
    dx = conv.backward(r.copy())
    assert done == [conv]
    dw = conv.dweight.copy()
    loss = lambda: float(np.sum(conv.forward(x, train=True) * r))
    check(dx, loss, x, rng)
    check(dw, loss, conv.weight, rng)


def test_im2col_col2im_are_adjoint(rng):
    """<im2col(x), c> == <x, col2im(c)>: the scatter is exactly the gather's transpose."""
    ws = Workspace(np)
    x = rng.standard_normal((2, 9, 7, 3))
    col = im2col(ws, x, 3, 2, 1).copy()
    c = rng.standard_normal(col.shape)
    dx = col2im(ws, c, np.empty_like(x), 2, 1)
    assert abs(np.sum(col * c) - np.sum(x * dx)) < 1e-10 * np.sum(np.abs(col * c))


@pytest.mark.parametrize("k,s,p", [(7, 2, 3), (3, 1, 1), (3, 2, 1), (1, 2, 0), (3, 1, 2), (2, 3, 0)])
@pytest.mark.parametrize("threads", [1, 3])
def test_float32_im2col_in_c_equals_the_numpy_gather(rng, k, s, p, threads):
    """hostmath's gather (float32, no padded copy) against the strided NumPy copy of the
    padded input (float64): the same patches, bit for bit, borders included."""
    x = rng.standard_normal((4, 11, 9, 5))
    cols = {}
    for dtype in (np.float32, np.float64):
        ws = Workspace(np, Team(threads, min_split=1))
        ws.arena((10**5,), dtype).fill(np.nan)             # stale content must be overwritten
        cols[dtype] = im2col(ws, x.astype(dtype), k, s, p).copy()
    np.testing.assert_array_equal(cols[np.float32], cols[np.float64].astype(np.float32))


@pytest.mark.parametrize("relu", [False, True])
def test_batchnorm_train(rng, relu):
    ws = Workspace(np)
    bn = BatchNorm("bn", ws, 5, relu=relu)
    done = bound(bn, rng)
    x = rng.standard_normal((3, 4, 2, 5)) * 2 + 1
    y = bn.forward(x, train=True)
    x2d = x.reshape(-1, 5)
    mean, var = x2d.mean(0), x2d.var(0)
    ref = (x2d - mean) / np.sqrt(var + bn.eps) * bn.weight + bn.bias
    assert_close(y.reshape(-1, 5), np.maximum(ref, 0) if relu else ref, rtol=1e-12, atol=1e-12)
    assert_close(bn.batch_mean, mean, rtol=1e-12, atol=1e-12)
    assert_close(bn.batch_var, var, rtol=1e-12, atol=0)
    assert bn.batch_count == 24
    np.testing.assert_array_equal(bn.eval_mean, bn.batch_mean)
    r = rng.standard_normal(y.shape)
    dx = bn.backward(r.copy())
    assert done == [bn]
    dgamma, dbeta = bn.dweight.copy(), bn.dbias.copy()
    loss = lambda: float(np.sum(bn.forward(x, train=True) * r))
    check(dx, loss, x, rng)
    check(dgamma, loss, bn.weight, rng)
    check(dbeta, loss, bn.bias, rng)


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 1e-3)])
def test_batchnorm_adds_eps_to_a_variance_close_to_it(rng, dtype, rtol):
    """Channel variances from 1e-8 to 1e-3 around eps = 1e-5, against float64: a batch norm
    that dropped eps (the NumPy expressions for float64, the C loops for float32) normalizes
    the small ones to unit variance instead."""
    ws = Workspace(np)
    bn = BatchNorm("bn", ws, 16, relu=False)
    bound(bn, rng, dtype)
    x = (0.25 + rng.standard_normal((4, 5, 3, 16)) * np.logspace(-4, -1.5, 16)).astype(dtype)
    y = bn.forward(x, train=True).reshape(-1, 16)
    x2d = x.reshape(-1, 16).astype(np.float64)
    mean, var = x2d.mean(0), x2d.var(0)
    gamma, beta = bn.weight.astype(np.float64), bn.bias.astype(np.float64)
    ref = (x2d - mean) / np.sqrt(var + bn.eps) * gamma + beta
    assert_close(y, ref, rtol=rtol, atol=rtol * 0.1)
    assert_close(bn.inv_std, 1 / np.sqrt(var + bn.eps), rtol=rtol, atol=0)
    infer = bn.forward(x, train=False).reshape(-1, 16)
    assert_close(infer, ref, rtol=rtol, atol=rtol * 0.1)


def test_batchnorm_backward_keeps_dy_unless_consumed(rng):
    ws = Workspace(np)
    bn = BatchNorm("bn", ws, 3, relu=True)
    bound(bn, rng)
    x = rng.standard_normal((2, 3, 3, 3))
    bn.forward(x, train=True)
    dy = rng.standard_normal(x.shape)
    kept = dy.copy()
    dx = bn.backward(dy, consume=False)
    np.testing.assert_array_equal(dy, kept)
    assert dx is not dy


@pytest.mark.parametrize("relu", [False, True])
def test_batchnorm_inference_uses_given_statistics(rng, relu):
    x = rng.standard_normal((10, 4))
    gamma, beta = rng.standard_normal(4), rng.standard_normal(4)
    mean, var = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    y = batchnorm.bn_infer_forward(x, gamma, beta, mean, var, 1e-5, relu)
    ref = (x - mean) / np.sqrt(var + 1e-5) * gamma + beta
    assert_close(y, np.maximum(ref, 0) if relu else ref, rtol=1e-12, atol=1e-12)


def test_maxpool(rng):
    ws = Workspace(np)
    pool = MaxPool("maxpool", ws)
    x = rng.standard_normal((2, 7, 6, 3))
    y = pool.forward(x, train=True)
    assert y.shape == (2, 4, 3, 3)
    xpad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    ref = np.full(y.shape, -np.inf)
    for kh in range(3):
        for kw in range(3):
            ref = np.maximum(ref, xpad[:, kh:kh + 8:2, kw:kw + 6:2, :])
    np.testing.assert_array_equal(y, ref)
    r = rng.standard_normal(y.shape)
    dx = pool.backward(r.copy())
    check(dx, lambda: float(np.sum(pool.forward(x, train=True) * r)), x, rng)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])     # NumPy views; hostmath's C loop
def test_maxpool_ties_go_to_the_first_position(dtype):
    ws = Workspace(np)
    pool = MaxPool("maxpool", ws)
    x = np.zeros((1, 2, 2, 1), dtype)
    pool.forward(x, train=True)
    dx = pool.backward(np.ones((1, 1, 1, 1), dtype))
    np.testing.assert_array_equal(dx.ravel(), [1, 0, 0, 0])


@pytest.mark.parametrize("threads", [1, 3])
def test_float32_maxpool_in_c_equals_the_float64_numpy_one(rng, threads):
    """hostmath's loops (float32) against the shifted-view code (float64) on the same
    values: the max is exact, so the outputs agree bit for bit and every gradient goes to
    the same input, ties included (small integers make many), and with NaN in a window;
    only the sums where windows overlap round differently in float32."""
    x = rng.integers(-3, 4, (5, 9, 8, 7)).astype(np.float32)
    x[0, 0, 0, 0] = np.nan
    dy = rng.standard_normal((5, 5, 4, 7)).astype(np.float32)
    pools = {}
    for dtype in (np.float32, np.float64):
        ws = Workspace(np, Team(threads, min_split=1))
        pool = MaxPool("maxpool", ws)
        y = pool.forward(x.astype(dtype), train=True).copy()
        pools[dtype] = y, pool.backward(dy.astype(dtype))
    (y32, dx32), (y64, dx64) = pools[np.float32], pools[np.float64]
    np.testing.assert_array_equal(y32, y64)
    assert np.isnan(y32[0, 0, 0, 0])
    dx32[0, :2, :2, 0] = dx64[0, :2, :2, 0] = 0       # a NaN window's gradient is anyone's guess
    np.testing.assert_allclose(dx32, dx64, rtol=1e-6, atol=1e-6)


def test_global_avg_pool_and_linear(rng):
    ws = Workspace(np)
    pool, fc = GlobalAvgPool("avgpool", ws), Linear("fc", ws, 6, 4)
    done = bound(fc, rng)
    x = rng.standard_normal((3, 2, 5, 6))
    forward = lambda: fc.forward(pool.forward(x, train=True), train=True)
    y = forward()
    assert_close(y, x.mean(axis=(1, 2)) @ fc.weight + fc.bias, rtol=1e-12, atol=1e-12)
    r = rng.standard_normal(y.shape)
    dx = pool.backward(fc.backward(r.copy()))
    assert done == [fc]
    dw, db = fc.dweight.copy(), fc.dbias.copy()
    loss = lambda: float(np.sum(forward() * r))
    check(dx, loss, x, rng)
    check(dw, loss, fc.weight, rng)
    check(db, loss, fc.bias, rng)


@pytest.mark.parametrize("projection", [False, True])
def test_the_batchnorms_that_end_a_residual_block(rng, projection):
    """y = relu(bn3(x) + s), with s the block's input or, for a projection, bn_s(xs):
    forward against float64, and backward as ResidualBlock runs it. The first BN to see dy
    (gate_by=y) leaves the block's ReLU gradient dy * (y > 0) in dy; a projection's bn3
    then takes it pre-gated. Every input's gradient against central differences."""
    ws = Workspace(np)
    bn3 = BatchNorm("bn3", ws, 5, relu=True)
    bound(bn3, rng)
    bn_s = BatchNorm("bn_s", ws, 5, relu=False)
    bound(bn_s, rng)
    x, xs = rng.standard_normal((3, 4, 2, 5)) * 2 + 1, rng.standard_normal((3, 4, 2, 5))

    def forward():
        s = bn_s.forward(xs, train=True) if projection else xs
        return bn3.forward(x, train=True, residual=s)

    def plain(v, bn):
        v2d = v.reshape(-1, 5)
        return ((v2d - v2d.mean(0)) / np.sqrt(v2d.var(0) + bn.eps) * bn.weight + bn.bias).reshape(v.shape)
    y = forward()
    assert norm_rel_err(y, np.maximum(plain(x, bn3) + (plain(xs, bn_s) if projection else xs), 0)) < 1e-12
    r = rng.standard_normal(y.shape)
    assert (y == 0).any() and (y > 0).any()
    dy = r.copy()
    if projection:
        ds = bn_s.backward(dy, consume=False, gate_by=y)
        dx = bn3.backward(dy, pre_gated=True)
    else:
        dx = bn3.backward(dy, consume=False, gate_by=y)
        ds = dy
        np.testing.assert_array_equal(dy, r * (y > 0))     # what the shortcut receives
    loss = lambda: float(np.sum(forward() * r))
    check(dx, loss, x, rng)
    check(ds, loss, xs, rng)
    with pytest.raises(ValueError, match="bn3: gate_by leaves the gated gradient in dy"):
        forward()
        bn3.backward(dy, gate_by=y)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_cross_entropy(rng, smoothing):
    logits = rng.standard_normal((5, 7)) * 3
    labels = rng.integers(0, 7, 5)
    loss, d = softmax_cross_entropy(logits, labels, smoothing)
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    q = np.full((5, 7), smoothing / 7)
    q[np.arange(5), labels] += 1 - smoothing
    assert abs(loss - float(-(q * log_p).sum(1).mean())) < 1e-12
    check(d, lambda: softmax_cross_entropy(logits, labels, smoothing)[0], logits, rng)


def test_softmax_cross_entropy_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels"):
        softmax_cross_entropy(np.zeros((3, 4)), np.zeros(2, int))
    with pytest.raises(ValueError, match="label_smoothing"):
        softmax_cross_entropy(np.zeros((3, 4)), np.zeros(3, int), 1.5)


def test_workspace_reuses_and_refuses_double_give():
    ws = Workspace(np)
    a = ws.take((4, 3), np.float32)
    a[...] = 7
    ws.give(a.reshape(12))
    b = ws.take((2, 5), np.float32)              # smaller, other shape: same memory
    assert np.shares_memory(a, b) and b.shape == (2, 5)
    c = ws.take((2, 5), np.float32)              # while b is out, a new buffer
    assert not np.shares_memory(b, c)
    ws.give(b)
    with pytest.raises(RuntimeError, match="twice"):
        ws.give(b)
    ws.give(np.empty((4, 3), np.float32))       # not from take: ignored
    assert np.shares_memory(ws.take((4, 3), np.float32), a)


@pytest.mark.parametrize("relu", [False, True])
def test_batchnorm_float32_path_matches_float64(rng, relu):
    """float32 NumPy goes to engine.hostmath (the host build of the CUDA kernels' math):
    it must agree with the float64 NumPy code checked above."""
    ws = Workspace(np)
    x = (rng.standard_normal((4, 6, 5, 16)) * 3 + 2)
    dy = rng.standard_normal(x.shape)
    results = {}
    for dtype in (np.float64, np.float32):
        bn = BatchNorm("bn", ws, 16, relu=relu)
        layout = FlatLayout(bn.specs())
        params, grads = layout.alloc(np, dtype), layout.alloc(np, dtype)
        params[...] = np.random.default_rng(5).uniform(0.5, 1.5, layout.total)
        bn.bind(layout, params, grads, lambda layer: None)
        y = bn.forward(x.astype(dtype), train=True).copy()
        dx = bn.backward(dy.astype(dtype))
        results[dtype] = (y, dx, grads.copy(), bn.batch_var.copy())
    for ref, got in zip(results[np.float64], results[np.float32]):
        assert norm_rel_err(got, ref) < 1e-5
