"""Each CUDA kernel against float64 NumPy (tests/kernel_reference.py, or a reference of its
own) and against its CPU path (engine.hostmath, engine.precision); needs a GPU. The CPU path
is built from the same header (kernels/recipe_math.cuh), so agreeing with it alone
would not show a bug they share.

Skipped without a device; `make gpu-check` runs them where there is one.
"""
import numpy as np
import pytest

import kernel_reference as reference
from engine import hostmath, precision
from numerics import assert_close

pytestmark = pytest.mark.gpu

SEED = np.random.SeedSequence().entropy % 2**32
print(f"test_kernels_gpu seed {SEED}")


@pytest.fixture
def cp():
    import cupy
    return cupy


@pytest.fixture
def ops():
    from engine import cuda_ops
    return cuda_ops


@pytest.fixture
def rng():
    return np.random.default_rng(SEED)


HYPER = dict(eta=0.8, a_sgd=0.6, a_rms=0.3, mu1=0.9, mu2=0.99, eps=1e-8, wd=5e-4, gscale=1 / 64)


def scal_of(cp, ops, h):
    return cp.asarray(np.array([h[k] for k in ops.SCALARS], np.float32))


@pytest.mark.parametrize("gdtype", [np.float32, np.float16])
@pytest.mark.parametrize("offset", [0, 1])   # 1: pointers not 16-byte aligned, scalar path
@pytest.mark.parametrize("with_mask", [True, False])
def test_hybrid_update(cp, ops, rng, gdtype, offset, with_mask):
    n = 100_003
    w, d = rng.standard_normal(n).astype(np.float32), (0.01 * rng.standard_normal(n)).astype(np.float32)
    m = (1e-3 * rng.random(n)).astype(np.float32)
    g = (64 * rng.standard_normal(n)).astype(gdtype)
    mask = (rng.random(n) < 0.6).astype(np.uint8) if with_mask else None
    dev = [cp.asarray(a) for a in (w, d, m, g)]
    dmask = None if mask is None else cp.asarray(mask)
    w_lp = cp.zeros(n, ops.BF16)
    sl = slice(offset, n)
    decay = 1.0 if mask is None else mask[sl].astype(np.float64)
    want = reference.hybrid_update(w[sl], d[sl], m[sl], g[sl], decay, **HYPER)
    hostmath.hybrid_update(w[sl], d[sl], m[sl], g[sl], None if mask is None else mask[sl], **HYPER)
    ops.hybrid_update(*(a[sl] for a in dev), None if dmask is None else dmask[sl], scal_of(cp, ops, HYPER),
                      HYPER["mu1"], HYPER["mu2"], HYPER["eps"], HYPER["wd"], w_lp=w_lp[sl])
    for host, gpu, exact in zip((w, d, m), dev, want):
        assert_close(cp.asnumpy(gpu), host, rtol=1e-6, atol=1e-6 * np.abs(host).max())
        # float32 error relative to the update's O(1) terms (test_hostmath's bounds)
        assert_close(cp.asnumpy(gpu)[sl], exact, rtol=2e-5, atol=2e-5)
    got_w = cp.asnumpy(dev[0])[sl]
    assert np.array_equal(cp.asnumpy(w_lp)[sl].view(np.uint16), got_w.astype(ops.BF16).view(np.uint16))


@pytest.mark.parametrize("gdtype", [np.float32, np.float16])
def test_sgd_update(cp, ops, rng, gdtype):
    n = 65_536 + 7
    w, d = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(gdtype)
    mask = (rng.random(n) < 0.5).astype(np.uint8)
    dw, dd, dg, dm = (cp.asarray(a) for a in (w, d, g, mask))
    want_w, want_d, _ = reference.hybrid_update(w, d, np.zeros(n), g, mask.astype(np.float64), 3.2, 1.0, 0.0,
                                                0.9, 0.0, 0.0, 1e-4, 0.5)
    hostmath.sgd_update(w, d, g, mask, 3.2, 0.9, 1e-4, 0.5)
    ops.sgd_update(dw, dd, dg, dm, scal_of(cp, ops, dict(eta=3.2, a_sgd=1.0, a_rms=0.0, gscale=0.5)), 0.9, 1e-4)
    assert_close(cp.asnumpy(dw), w, rtol=1e-6, atol=1e-6 * np.abs(w).max())
    assert_close(cp.asnumpy(dd), d, rtol=1e-6, atol=1e-6 * np.abs(d).max())
    assert_close(cp.asnumpy(dw), want_w, rtol=2e-5, atol=2e-5)
    assert_close(cp.asnumpy(dd), want_d, rtol=2e-5, atol=2e-5)


def bn_inputs(rng, rows, C, offset=0.0):
    x = (offset + rng.standard_normal((rows, C)) * rng.uniform(0.2, 3, C)).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, C).astype(np.float32)
    beta = rng.standard_normal(C).astype(np.float32)
    return x, gamma, beta


@pytest.mark.parametrize("rows,C", [(8 * 56 * 56, 64), (4 * 7 * 7, 2048), (999, 3), (32, 37)])
@pytest.mark.parametrize("relu", [False, True])
def test_bn_train_forward(cp, ops, rng, rows, C, relu):
    x, gamma, beta = bn_inputs(rng, rows, C, offset=500.0)   # |mean| >> std
    ref = hostmath.bn_train_forward(x, gamma, beta, 1e-5, relu)
    got = [cp.asnumpy(a) for a in ops.bn_train_forward(cp.asarray(x), cp.asarray(gamma), cp.asarray(beta), 1e-5, relu)]
    want_y, want_mean, want_var = reference.bn_train_forward(x, gamma, beta, 1e-5, relu)
    assert_close(got[1], want_mean, rtol=1e-6, atol=0)
    assert_close(got[2], want_var, rtol=1e-3, atol=0)
    assert_close(got[3], 1 / np.sqrt(want_var + 1e-5), rtol=1e-3, atol=0)
    assert_close(got[0], want_y, rtol=0, atol=1e-2)      # |mean| = 500: x itself is rounded to 3e-5
    assert_close(got[2], ref[2], rtol=1e-3, atol=0)
    assert_close(got[3], ref[3], rtol=1e-3, atol=1e-3 * np.abs(ref[3]).max())
    assert_close(got[0], ref[0], rtol=0, atol=5e-3)


@pytest.mark.parametrize("rows,C", [(8 * 14 * 14, 64), (999, 3)])
def test_bn_adds_eps_to_a_variance_close_to_it(cp, ops, rng, rows, C):
    """Channel variances from 1e-8 to 1e-3 around eps (test_hostmath's case, on the kernels)."""
    eps = 1e-5
    x = (0.25 + rng.standard_normal((rows, C)) * np.logspace(-4, -1.5, C)).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, C).astype(np.float32)
    beta = (0.1 * rng.standard_normal(C)).astype(np.float32)
    y, mean, var, inv_std = ops.bn_train_forward(cp.asarray(x), cp.asarray(gamma), cp.asarray(beta), eps, False)
    want_y, _, want_var = reference.bn_train_forward(x, gamma, beta, eps, False)
    assert_close(cp.asnumpy(inv_std), 1 / np.sqrt(want_var + eps), rtol=1e-3, atol=0)
    assert_close(cp.asnumpy(y), want_y, rtol=1e-3, atol=1e-3)
    infer = ops.bn_infer_forward(*(cp.asarray(a) for a in (x, gamma, beta)), mean, var, eps, False)
    assert_close(cp.asnumpy(infer), want_y, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("rows,C", [(8 * 28 * 28, 128), (1000, 5)])
@pytest.mark.parametrize("relu", [False, True])
def test_bn_backward(cp, ops, rng, rows, C, relu):
    x, gamma, beta = bn_inputs(rng, rows, C)
    dy = rng.standard_normal((rows, C)).astype(np.float32)
    y, mean, _, inv_std = hostmath.bn_train_forward(x, gamma, beta, 1e-5, relu)
    ref = hostmath.bn_backward(dy, x, y, gamma, mean, inv_std, relu)
    want = reference.bn_backward(dy, x, y, gamma, mean, inv_std, relu)      # from the same statistics
    ddy = cp.asarray(dy)
    got = ops.bn_backward(ddy, *(cp.asarray(a) for a in (x, y, gamma, mean, inv_std)), relu, out=ddy)
    assert got[0] is ddy  # in place over dy, as the model asks
    for g, r, exact in zip(got, ref, want):
        assert_close(cp.asnumpy(g), r, rtol=1e-4, atol=1e-4 * np.abs(r).max())
        assert_close(cp.asnumpy(g), exact, rtol=1e-4, atol=2e-4 * np.abs(exact).max())


@pytest.mark.parametrize("C", [64, 6])
def test_bn_infer_forward(cp, ops, rng, C):
    x, gamma, beta = bn_inputs(rng, 3001, C)
    mean = rng.standard_normal(C).astype(np.float32)
    var = rng.uniform(0.5, 2, C).astype(np.float32)
    ref = hostmath.bn_infer_forward(x, gamma, beta, mean, var, 1e-5, True)
    got = ops.bn_infer_forward(*(cp.asarray(a) for a in (x, gamma, beta, mean, var)), 1e-5, True)
    scale = max(1.0, np.max(np.abs(ref)))
    assert_close(cp.asnumpy(got), ref, rtol=0, atol=1e-5 * scale)
    want = (x - mean.astype(np.float64)) / np.sqrt(var.astype(np.float64) + 1e-5) * gamma + beta
    assert_close(cp.asnumpy(got), np.maximum(want, 0), rtol=1e-5, atol=2e-5 * scale)


@pytest.mark.parametrize("offset", [0, 1, 3, 5])
def test_fp16_pack_unpack_bit_exact(cp, rng, offset):
    """Bucket slices as the reducer passes them: input and output start `offset` elements into
    device buffers (sliced ON the device: cp.asarray of a host slice would copy it into a
    fresh, aligned allocation and the kernel would never see the offset)."""
    n = 50_001
    full = (rng.standard_normal(n) * np.exp(rng.uniform(-25, 13, n))).astype(np.float32)
    x = cp.asarray(full)[offset:]
    h = cp.zeros(n, cp.float16)[offset:]
    assert x.data.ptr % 16 == 4 * offset % 16 and h.data.ptr % 8 == 2 * offset % 8
    h_ref = precision.pack_fp16(full[offset:], 37.5)
    assert precision.pack_fp16(x, 37.5, out=h) is h
    np.testing.assert_array_equal(cp.asnumpy(h).view(np.uint16), h_ref.view(np.uint16))
    back = cp.zeros(n, cp.float32)[offset:]
    precision.unpack_fp16(h, 1 / 37.5, out=back)
    np.testing.assert_array_equal(cp.asnumpy(back), precision.unpack_fp16(h_ref, 1 / 37.5))


def test_optimizer_on_gpu_matches_cpu(cp, rng):
    from engine.backend import get_backend
    from engine.flat import FlatLayout
    from engine.optimizer import make_optimizer
    from engine.schedule import make_schedule
    layout = FlatLayout([("fc.bias", (10,), False), ("fc.weight", (64, 10), True), ("bn.weight", (64,), False)])
    params = layout.alloc(np)
    params[:] = rng.standard_normal(layout.total)
    gpu_params = cp.asarray(params)
    cpu = make_optimizer("hybrid", params, layout)
    gpu = make_optimizer("hybrid", gpu_params, layout, get_backend("gpu"))
    sched = make_schedule("hybrid", 4096, 9)
    for it in range(4):
        grads = rng.standard_normal(layout.total).astype(np.float16)
        cpu.update(grads, 0, layout.slots[1].offset, coef=sched(it / 3), grad_scale=0.5)
        cpu.update(grads, layout.slots[1].offset, layout.total, coef=sched(it / 3), grad_scale=0.5)
        gpu.step(cp.asarray(grads), coef=sched(it / 3), grad_scale=0.5)
    assert_close(cp.asnumpy(gpu_params), params, rtol=1e-6, atol=1e-6 * np.abs(params).max())
    np.testing.assert_allclose(gpu.state_dict()["m"], cpu.state_dict()["m"], rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("rows,C", [(8 * 28 * 28, 128), (999, 12)])
@pytest.mark.parametrize("relu", [False, True])
def test_bn_bf16_against_float64(cp, ops, rng, rows, C, relu):
    """bf16 activations, float32 statistics: forward, backward and inference against float64
    NumPy on the values the bf16 storage holds (outputs within one bf16 rounding, 2**-8)."""
    bf16 = ops.BF16
    x, gamma, beta = bn_inputs(rng, rows, C, offset=3.0)
    x = x.astype(bf16).astype(np.float64)
    y, mean, var, inv_std = ops.bn_train_forward(cp.asarray(x.astype(bf16)), cp.asarray(gamma),
                                                 cp.asarray(beta), 1e-5, relu)
    rmean, rvar = x.mean(0), x.var(0)
    ry = (x - rmean) / np.sqrt(rvar + 1e-5) * gamma + beta
    ry = np.maximum(ry, 0) if relu else ry
    assert_close(cp.asnumpy(mean), rmean, rtol=1e-5, atol=1e-5 * np.abs(rmean).max())
    assert_close(cp.asnumpy(var), rvar, rtol=1e-3, atol=0)
    assert_close(cp.asnumpy(y).astype(np.float64), ry, rtol=2.0**-8, atol=2.0**-8 * np.abs(ry).max())
    dy = rng.standard_normal((rows, C)).astype(bf16)
    g = dy.astype(np.float64) * ((cp.asnumpy(y).astype(np.float64) > 0) if relu else 1)
    xhat = (x - cp.asnumpy(mean)) * cp.asnumpy(inv_std)
    rdb, rdg = g.sum(0), (g * xhat).sum(0)
    rdx = gamma * cp.asnumpy(inv_std) * (g - rdb / rows - xhat * rdg / rows)
    dx, dgamma, dbeta = ops.bn_backward(cp.asarray(dy), cp.asarray(x.astype(bf16)), y, cp.asarray(gamma), mean,
                                        inv_std, relu)
    assert_close(cp.asnumpy(dbeta), rdb, rtol=1e-4, atol=1e-4 * np.abs(rdb).max())
    assert_close(cp.asnumpy(dgamma), rdg, rtol=1e-4, atol=1e-4 * np.abs(rdg).max())
    assert_close(cp.asnumpy(dx).astype(np.float64), rdx, rtol=2.0**-8, atol=2.0**-8 * np.abs(rdx).max())
    yi = ops.bn_infer_forward(cp.asarray(x.astype(bf16)), cp.asarray(gamma), cp.asarray(beta), mean, var, 1e-5, relu)
    assert_close(cp.asnumpy(yi).astype(np.float64), ry, rtol=2.0**-8, atol=2.0**-8 * np.abs(ry).max())


# ---- im2col, col2im, max pool, the BN that ends a residual block ---------------------------

def _on_device(cp, a, offset):
    """a copied to the device `offset` elements into a larger buffer (sliced ON the device, so
    the kernel sees the misalignment; one host-to-device copy, no CuPy kernel on bfloat16)."""
    host = np.zeros(a.size + offset, a.dtype)
    host[offset:] = a.ravel()
    return cp.asarray(host)[offset:].reshape(a.shape)


# (N, H, W, C, K, stride, pad): ResNet-50's stem (7x7/2, C = 3: element path), its 3x3s, a
# strided 3x3, a 1x1/2 downsample gather, odd C
CONV_WINDOWS = [(8, 56, 56, 64, 3, 1, 1), (4, 224, 224, 3, 7, 2, 3), (8, 28, 28, 128, 3, 2, 1),
                (8, 14, 14, 256, 1, 2, 0), (3, 17, 13, 5, 3, 1, 1)]


@pytest.mark.parametrize("offset", [0, 1])     # 1: pointers off 16 bytes, element moves
@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
@pytest.mark.parametrize("n,h,w,c,k,s,p", CONV_WINDOWS)
def test_im2col_col2im(cp, ops, rng, n, h, w, c, k, s, p, bf16, offset):
    dtype = ops.BF16 if bf16 else np.float32
    ho, wo = reference.out_hw(h, w, k, s, p)
    x = rng.standard_normal((n, h, w, c)).astype(dtype)
    col = _on_device(cp, np.full((n, ho, wo, k, k, c), np.nan, dtype), offset)
    assert ops.im2col(_on_device(cp, x, offset), k, s, p, col) is col
    got = cp.asnumpy(col)
    assert np.array_equal(got.view(np.uint16 if bf16 else np.uint32),
                          reference.im2col(x, k, s, p).astype(dtype).view(np.uint16 if bf16 else np.uint32))
    dcol = rng.standard_normal(col.shape).astype(dtype)
    dx = _on_device(cp, np.full(x.shape, np.nan, dtype), offset)
    assert ops.col2im(_on_device(cp, dcol, offset), dx, s, p) is dx
    ref, absum = reference.scatter(lambda kh, kw: dcol[:, :, :, kh, kw, :].astype(np.float64), x.shape, k, s, p)
    bound = k * k * 2.0**-24 * absum + (2.0**-8 * np.abs(ref) if bf16 else 0) + 1e-37   # + FTZ
    assert np.all(np.abs(cp.asnumpy(dx).astype(np.float64) - ref) <= bound)
    if not bf16:
        np.testing.assert_array_equal(cp.asnumpy(col), hostmath.im2col(x, np.empty(col.shape, np.float32), k, s, p))


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("ties", [False, True], ids=["normal", "ties"])
@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
@pytest.mark.parametrize("n,h,w,c,k,s,p", [(8, 112, 112, 64, 3, 2, 1), (3, 15, 14, 5, 3, 2, 1), (2, 9, 9, 16, 2, 2, 0)])
def test_maxpool(cp, ops, rng, n, h, w, c, k, s, p, bf16, ties, offset):
    dtype = ops.BF16 if bf16 else np.float32
    ho, wo = reference.out_hw(h, w, k, s, p)
    x = (rng.integers(-2, 3, (n, h, w, c)) if ties else rng.standard_normal((n, h, w, c))).astype(dtype)
    xd = _on_device(cp, x, offset)
    y = _on_device(cp, np.zeros((n, ho, wo, c), dtype), offset)
    assert ops.maxpool_forward(xd, y, k, s, p) is y
    ref_y, arg = reference.maxpool(x, k, s, p)
    assert np.array_equal(cp.asnumpy(y).astype(np.float64), ref_y)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = _on_device(cp, np.full(x.shape, np.nan, dtype), offset)
    assert ops.maxpool_backward(xd, _on_device(cp, dy, offset), dx, k, s, p) is dx
    dy64 = dy.astype(np.float64)
    ref, absum = reference.scatter(lambda kh, kw: np.where(arg == kh * k + kw, dy64, 0.0), x.shape, k, s, p)
    bound = (-(-k // s)) ** 2 * 2.0**-24 * absum + (2.0**-8 * np.abs(ref) if bf16 else 0) + 1e-37
    assert np.all(np.abs(cp.asnumpy(dx).astype(np.float64) - ref) <= bound)
    if not bf16:       # the CPU path, summing in the same order
        np.testing.assert_array_equal(cp.asnumpy(y), hostmath.maxpool_forward(x, np.empty(y.shape, np.float32), k, s, p))
        host_dx = hostmath.maxpool_backward(x, dy, np.empty_like(x), k, s, p)
        assert_close(cp.asnumpy(dx), host_dx, rtol=1e-6, atol=1e-6 * np.abs(host_dx).max())


@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
def test_bn_residual_sum_and_gated_gradient(cp, ops, rng, bf16, offset):
    """The BN that ends a residual block at a ResNet-50 stage-1 size: relu(bn(x) + s) in
    the apply kernel, and the gate of the reduce kernel (dy left as dy * (y > 0), exact)."""
    dtype = ops.BF16 if bf16 else np.float32
    rows, C = 8 * 56 * 56, 256
    x, sc, dy = (rng.standard_normal((rows, C)).astype(dtype) for _ in range(3))
    gamma, beta = rng.uniform(0.5, 2, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    xd, sd = _on_device(cp, x, offset), _on_device(cp, sc, offset)
    y, mean, var, inv_std = ops.bn_train_forward(xd, cp.asarray(gamma), cp.asarray(beta), 1e-5, True, residual=sd)
    x64 = x.astype(np.float64)
    ref = np.maximum((x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5) * gamma + beta + sc.astype(np.float64), 0)
    tol = 2.0**-8 if bf16 else 1e-5
    assert_close(cp.asnumpy(y), ref, rtol=tol, atol=tol * np.abs(ref).max())
    dyd = _on_device(cp, dy, offset)
    ops.bn_backward(dyd, xd, y, cp.asarray(gamma), mean, inv_std, False, out=cp.empty_like(dyd), gate=True)
    keep = cp.asnumpy(y).astype(np.float32) > 0
    assert np.array_equal(cp.asnumpy(dyd).astype(np.float32), np.where(keep, dy.astype(np.float32), 0))


def test_layers_run_the_fused_kernels_on_device_arrays(cp, rng):
    """conv.im2col/col2im and MaxPool on CuPy float32 give what they give on NumPy."""
    from engine import conv, layers
    from engine.workspace import Workspace
    x = rng.standard_normal((4, 16, 16, 32)).astype(np.float32)
    gws, hws = Workspace(cp), Workspace(np)
    xd = cp.asarray(x)
    np.testing.assert_array_equal(conv.im2col(gws, xd, 3, 2, 1).get(), conv.im2col(hws, x, 3, 2, 1))
    gpool, hpool = layers.MaxPool("p", gws), layers.MaxPool("p", hws)
    np.testing.assert_array_equal(gpool.forward(xd, True).get(), hpool.forward(x, True))
    dy = rng.standard_normal((4, 8, 8, 32)).astype(np.float32)
    host_dx = hpool.backward(dy)
    assert_close(gpool.backward(cp.asarray(dy)).get(), host_dx, rtol=1e-6, atol=1e-6 * np.abs(host_dx).max())


@pytest.mark.parametrize("kind", ["normal", "ties", "large"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("n,k", [(1, 10), (2, 1000), (7, 1001), (33, 10), (33, 1000), (256, 1000), (5000, 10)])
def test_softmax_xent(cp, ops, rng, n, k, smoothing, kind):
    """The fused loss against float64 NumPy within the float32 bounds of
    tests/softmax_xent_reference.py (as the emulated tier); 5000 rows: more rows than blocks."""
    import softmax_xent_reference as xent
    logits, labels = xent.logits_and_labels(rng, n, k, kind)
    z, y = cp.asarray(logits), cp.asarray(labels)
    scratch = cp.zeros(2 * n, np.float32)
    loss, d, hits = ops.softmax_xent(z, y, smoothing, scratch=scratch)
    assert loss.shape == hits.shape == () and loss.dtype == hits.dtype == np.float32
    s = cp.asnumpy(scratch)
    xent.check(logits, labels, smoothing, cp.asnumpy(loss), cp.asnumpy(d), cp.asnumpy(hits), s[:n], s[n:])
    # deterministic: the same bits on a second run
    again = ops.softmax_xent(z, y, smoothing)
    assert cp.asnumpy(again[0]) == cp.asnumpy(loss) and np.array_equal(cp.asnumpy(again[1]), cp.asnumpy(d))
    from engine.loss import softmax_cross_entropy_with_hits
    got = softmax_cross_entropy_with_hits(z, y, smoothing)          # engine.loss dispatches here
    assert cp.asnumpy(got[0]) == cp.asnumpy(loss) and float(got[2]) == float(hits)


def test_softmax_xent_bad_label_is_a_nan_row(cp, ops, rng):
    logits = rng.standard_normal((4, 10)).astype(np.float32)
    labels = np.array([1, -1, 10, 3])
    loss, d, hits = ops.softmax_xent(cp.asarray(logits), cp.asarray(labels), 0.1)
    d = cp.asnumpy(d)
    assert np.isnan(float(loss)) and np.isnan(d[[1, 2]]).all() and np.isfinite(d[[0, 3]]).all()
    assert float(hits) == (logits.argmax(axis=1) == labels)[[0, 3]].sum()
