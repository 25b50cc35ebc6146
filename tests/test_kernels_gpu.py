"""Each CUDA kernel against its CPU path (engine.hostmath, engine.precision); needs a GPU.

Skipped without a device; `make gpu-check` runs them where there is one.
"""
import numpy as np
import pytest

from engine import hostmath, precision

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


def rel_err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30)


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
    hostmath.hybrid_update(w[sl], d[sl], m[sl], g[sl], None if mask is None else mask[sl], **HYPER)
    ops.hybrid_update(*(a[sl] for a in dev), None if dmask is None else dmask[sl], scal_of(cp, ops, HYPER),
                      HYPER["mu1"], HYPER["mu2"], HYPER["eps"], HYPER["wd"], w_lp=w_lp[sl])
    for host, gpu in zip((w, d, m), dev):
        assert rel_err(cp.asnumpy(gpu), host) < 1e-6
    got_w = cp.asnumpy(dev[0])[sl]
    assert np.array_equal(cp.asnumpy(w_lp)[sl].view(np.uint16), got_w.astype(ops.BF16).view(np.uint16))


@pytest.mark.parametrize("gdtype", [np.float32, np.float16])
def test_sgd_update(cp, ops, rng, gdtype):
    n = 65_536 + 7
    w, d = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(gdtype)
    mask = (rng.random(n) < 0.5).astype(np.uint8)
    dw, dd, dg, dm = (cp.asarray(a) for a in (w, d, g, mask))
    hostmath.sgd_update(w, d, g, mask, 3.2, 0.9, 1e-4, 0.5)
    ops.sgd_update(dw, dd, dg, dm, scal_of(cp, ops, dict(eta=3.2, a_sgd=1.0, a_rms=0.0, gscale=0.5)), 0.9, 1e-4)
    assert rel_err(cp.asnumpy(dw), w) < 1e-6
    assert rel_err(cp.asnumpy(dd), d) < 1e-6


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
    x64 = x.astype(np.float64)
    assert rel_err(got[1], x64.mean(0)) < 1e-6
    assert np.max(np.abs(got[2] - x64.var(0)) / x64.var(0)) < 1e-3
    assert np.max(np.abs(got[2] - ref[2]) / ref[2]) < 1e-3
    assert rel_err(got[3], ref[3]) < 1e-3
    assert np.max(np.abs(got[0] - ref[0])) < 5e-3


@pytest.mark.parametrize("rows,C", [(8 * 28 * 28, 128), (1000, 5)])
@pytest.mark.parametrize("relu", [False, True])
def test_bn_backward(cp, ops, rng, rows, C, relu):
    x, gamma, beta = bn_inputs(rng, rows, C)
    dy = rng.standard_normal((rows, C)).astype(np.float32)
    y, mean, _, inv_std = hostmath.bn_train_forward(x, gamma, beta, 1e-5, relu)
    ref = hostmath.bn_backward(dy, x, y, gamma, mean, inv_std, relu)
    ddy = cp.asarray(dy)
    got = ops.bn_backward(ddy, *(cp.asarray(a) for a in (x, y, gamma, mean, inv_std)), relu, out=ddy)
    assert got[0] is ddy  # in place over dy, as the model asks
    for g, r in zip(got, ref):
        assert rel_err(cp.asnumpy(g), r) < 1e-4


@pytest.mark.parametrize("C", [64, 6])
def test_bn_infer_forward(cp, ops, rng, C):
    x, gamma, beta = bn_inputs(rng, 3001, C)
    mean = rng.standard_normal(C).astype(np.float32)
    var = rng.uniform(0.5, 2, C).astype(np.float32)
    ref = hostmath.bn_infer_forward(x, gamma, beta, mean, var, 1e-5, True)
    got = ops.bn_infer_forward(*(cp.asarray(a) for a in (x, gamma, beta, mean, var)), 1e-5, True)
    assert np.max(np.abs(cp.asnumpy(got) - ref)) < 1e-5 * max(1.0, np.max(np.abs(ref)))


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
    assert rel_err(cp.asnumpy(gpu_params), params) < 1e-6
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
    assert rel_err(cp.asnumpy(mean), rmean) < 1e-5 and np.max(np.abs(cp.asnumpy(var) - rvar) / rvar) < 1e-3
    assert rel_err(cp.asnumpy(y).astype(np.float64), ry) < 2.0**-8
    dy = rng.standard_normal((rows, C)).astype(bf16)
    g = dy.astype(np.float64) * ((cp.asnumpy(y).astype(np.float64) > 0) if relu else 1)
    xhat = (x - cp.asnumpy(mean)) * cp.asnumpy(inv_std)
    rdb, rdg = g.sum(0), (g * xhat).sum(0)
    rdx = gamma * cp.asnumpy(inv_std) * (g - rdb / rows - xhat * rdg / rows)
    dx, dgamma, dbeta = ops.bn_backward(cp.asarray(dy), cp.asarray(x.astype(bf16)), y, cp.asarray(gamma), mean,
                                        inv_std, relu)
    assert rel_err(cp.asnumpy(dbeta), rdb) < 1e-4 and rel_err(cp.asnumpy(dgamma), rdg) < 1e-4
    assert rel_err(cp.asnumpy(dx).astype(np.float64), rdx) < 2.0**-8
    yi = ops.bn_infer_forward(cp.asarray(x.astype(bf16)), cp.asarray(gamma), cp.asarray(beta), mean, var, 1e-5, relu)
    assert rel_err(cp.asnumpy(yi).astype(np.float64), ry) < 2.0**-8
