"""The CUDA kernels executed on the host (tests/kernel_emulation.py), through the real launchers.

engine/cuda_ops.py's launchers run unchanged with `_launch` replaced by the emulated one, on
NumPy buffers placed at chosen offsets from a 64-byte boundary, between guard bytes that a
write out of bounds would change. Results are checked against engine.hostmath and
engine.precision (the CPU path) and against float64 NumPy. The grids are made small so that
several blocks run and every grid-stride loop wraps. A misaligned vector access aborts the
process (-fsanitize=alignment), and so does a divergent __syncthreads.
"""
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import kernel_check
import kernel_emulation
from engine import batchnorm, conv, cuda_ops, hostmath, precision
from engine.layers import MaxPool
from engine.workspace import Workspace

import kernel_reference as reference
import softmax_xent_reference as xent
from numerics import assert_close

BF16 = cuda_ops.BF16

SEED = np.random.SeedSequence().entropy % 2**32
print(f"test_kernels_emulated seed {SEED}")

OFFSETS = range(9)      # elements past a 64-byte boundary, as bucket slices start
HYPER = dict(eta=0.8, a_sgd=0.6, a_rms=0.3, mu1=0.9, mu2=0.99, eps=1e-8, wd=5e-4, gscale=1 / 64)
GUARD_BYTE = 0xA5
FIXED = ("mu1", "mu2", "eps", "wd")     # by-value kernel parameters; the rest are read from scal


def scal_of(h):
    """The device array of the per-step scalars (cuda_ops.SCALARS) of the hyperparameters h."""
    return np.array([h[k] for k in cuda_ops.SCALARS], np.float32)


@pytest.fixture
def rng():
    return np.random.default_rng(SEED)


@pytest.fixture
def launches(monkeypatch):
    """Emulated launches on small grids; returns the list of (file, kernel, grid) launched."""
    seen = []

    def launch(filename, kernel, grid, block, args):
        seen.append((filename, kernel, grid))
        kernel_emulation.emulated_launch(filename, kernel, grid, block, args)
    monkeypatch.setattr(cuda_ops, "_launch", launch)
    monkeypatch.setattr(cuda_ops, "MAX_BLOCKS", 3)
    monkeypatch.setattr(cuda_ops, "BN_MAX_BLOCKS", 4)
    monkeypatch.setattr(cuda_ops, "BN_ROWS_PER_THREAD", 2)
    return seen


def placed(values, offset):
    """A copy of `values` starting `offset` elements past a 64-byte boundary, with guard
    bytes on both sides (see untouched)."""
    values = np.asarray(values)
    raw = np.full(values.nbytes + offset * values.itemsize + 256, GUARD_BYTE, np.uint8)
    start = -raw.ctypes.data % 64 + 64 + offset * values.itemsize
    view = raw[start:start + values.nbytes].view(values.dtype).reshape(values.shape)
    view[...] = values
    return view


def untouched(view):
    """The guard bytes around a `placed` array still hold their pattern."""
    raw = view.base
    lo = view.ctypes.data - raw.ctypes.data
    outside = np.concatenate([raw[:lo], raw[lo + view.nbytes:]])
    return bool(np.all(outside == GUARD_BYTE))


# ---- every kernel runs -------------------------------------------------------------------

def test_every_kernel_of_every_file_is_launched(launches, rng):
    x = rng.standard_normal((40, 8)).astype(np.float32)
    gamma, beta = np.ones(8, np.float32), np.zeros(8, np.float32)
    for xs in (x, x.astype(BF16)):
        y, mean, var, inv_std = cuda_ops.bn_train_forward(xs, gamma, beta, 1e-5, True, residual=xs)
        cuda_ops.bn_backward(xs.copy(), xs, y, gamma, mean, inv_std, False, out=xs.copy(), gate=True)
        cuda_ops.bn_infer_forward(xs, gamma, beta, mean, var, 1e-5, False)
    cuda_ops.unpack_fp16(cuda_ops.pack_fp16(x.ravel(), 2.0), 0.5)
    img = rng.standard_normal((2, 5, 5, 8)).astype(np.float32)
    for xs in (img, img.astype(BF16)):
        col = cuda_ops.im2col(xs, 3, 2, 1, np.empty((2, 3, 3, 3, 3, 8), xs.dtype))
        cuda_ops.col2im(col, np.empty_like(xs), 2, 1)
        y = cuda_ops.maxpool_forward(xs, np.empty((2, 3, 3, 8), xs.dtype), 3, 2, 1)
        cuda_ops.maxpool_backward(xs, y, np.empty_like(xs), 3, 2, 1)
    flat = [x.ravel().copy() for _ in range(3)]
    for g in (x.ravel(), x.ravel().astype(np.float16)):
        cuda_ops.hybrid_update(*flat, g, None, scal_of(HYPER), *(HYPER[k] for k in FIXED))
        cuda_ops.sgd_update(flat[0], flat[1], g, None, scal_of(HYPER), 0.9, 0.0)
    cuda_ops.softmax_xent(x, rng.integers(0, 8, 40), 0.1)
    every = {(f.name, k) for f in kernel_check.kernel_files()
             for k in kernel_check.kernel_signatures(f.read_text())}
    assert {(f, k) for f, k, _ in launches} == every


# ---- optimizer ---------------------------------------------------------------------------

def _reference_update(w, d, m, g, mask, hybrid, h):
    """The recipe's update of h's hyperparameters in float64 (SGD: the hybrid's a_sgd = 1,
    a_rms = 0); returns (w, d, m)."""
    decay = 1.0 if mask is None else mask.astype(np.float64)
    return reference.hybrid_update(w, d, m, g, decay, **(h if hybrid else dict(h, a_sgd=1.0, a_rms=0.0)))


@pytest.mark.parametrize("hybrid", [True, False], ids=["hybrid", "sgd"])
@pytest.mark.parametrize("gdtype", [np.float32, np.float16])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("n", [1, 7, 4 * 3 * 256 + 5])      # tails of 1 and 3; the last wraps
def test_update_at_every_offset(launches, rng, hybrid, gdtype, with_mask, n):
    h = dict(HYPER) if hybrid else dict(HYPER, a_sgd=1.0, a_rms=0.0, mu2=0.0, eps=0.0)
    for offset in OFFSETS:
        w = rng.standard_normal(n).astype(np.float32)
        d = (0.01 * rng.standard_normal(n)).astype(np.float32)
        m = (1e-3 * rng.random(n)).astype(np.float32)
        g = (64 * rng.standard_normal(n)).astype(gdtype)
        mask = (rng.random(n) < 0.6).astype(np.uint8) if with_mask else None
        ref = _reference_update(w, d, m, g, mask, hybrid, h)
        dev = [placed(a, offset) for a in (w, d, m, g)]
        dmask = None if mask is None else placed(mask, offset)
        host = [a.copy() for a in (w, d, m)]
        w_lp = placed(np.zeros(n, BF16), offset)
        if hybrid:
            cuda_ops.hybrid_update(*dev, dmask, scal_of(h), *(h[k] for k in FIXED), w_lp=w_lp)
            hostmath.hybrid_update(*host, g, mask, *h.values())
        else:
            cuda_ops.sgd_update(dev[0], dev[1], dev[3], dmask, scal_of(h), h["mu1"], h["wd"], w_lp=w_lp)
            hostmath.sgd_update(host[0], host[1], g, mask, h["eta"], h["mu1"], h["wd"], h["gscale"])
        # the bf16 copy: the updated w rounded as ml_dtypes rounds, bit for bit
        assert np.array_equal(w_lp.view(np.uint16), dev[0].astype(BF16).view(np.uint16)), offset
        assert untouched(w_lp)
        # w + eta*d and mu1*d - step*g may cancel; their terms are of order 1 (m's are positive)
        for got, cpu, want, terms in zip(dev[:3] if hybrid else dev[:2], host, ref, (1, 1, 0)):
            assert_close(got, cpu, rtol=1e-6, atol=1e-6 * terms, what=f"offset {offset}")
            assert_close(got, want, rtol=1e-5, atol=1e-5 * terms, what=f"offset {offset}")
        assert all(untouched(a) for a in dev + ([dmask] if with_mask else []))
    assert n < 3072 or -(-n // 4) > launches[-1][2][0] * cuda_ops.THREADS    # the grid-stride loop wraps


def test_update_with_one_operand_misaligned(launches, rng):
    """Each pointer alone off its vector alignment sends the whole range down the scalar path."""
    n = 1030
    for odd in range(5):
        arrays = [rng.standard_normal(n).astype(np.float32) for _ in range(2)] + [rng.random(n, np.float32)]
        g = rng.standard_normal(n).astype(np.float16)
        mask = (rng.random(n) < 0.5).astype(np.uint8)
        ref = _reference_update(*arrays, g, mask, True, HYPER)
        dev = [placed(a, 1 if k == odd else 0) for k, a in enumerate([*arrays, g, mask])]
        cuda_ops.hybrid_update(*dev, scal_of(HYPER), *(HYPER[k] for k in FIXED))
        for got, want, terms in zip(dev[:3], ref, (1, 1, 0)):
            assert_close(got, want, rtol=1e-5, atol=1e-5 * terms, what=f"operand {odd} misaligned")


def test_update_bf16_copy_misaligned_alone_and_scalars_read_from_the_array(launches, rng):
    """w_lp alone off its 8-byte alignment takes the scalar path, still bit-exact; and the
    kernel reads eta, a_sgd, a_rms, gscale from scal: the same call after writing new values
    into the array gives the update of the new values."""
    n = 1030
    scal = scal_of(HYPER)
    for step, h in enumerate((HYPER, dict(HYPER, eta=0.05, a_sgd=0.9, a_rms=0.01, gscale=0.5))):
        scal[...] = scal_of(h)      # the array changes, the call does not
        w, d = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
        m = rng.random(n, np.float32)
        g = rng.standard_normal(n).astype(np.float32)
        ref = _reference_update(w, d, m, g, None, True, h)
        dev = [placed(a, 0) for a in (w, d, m, g)]
        w_lp = placed(np.zeros(n, BF16), 1)
        cuda_ops.hybrid_update(*dev, None, scal, *(HYPER[k] for k in FIXED), w_lp=w_lp)
        for got, want, terms in zip(dev[:3], ref, (1, 1, 0)):
            assert_close(got, want, rtol=1e-5, atol=1e-5 * terms, what=f"step {step}")
        assert np.array_equal(w_lp.view(np.uint16), dev[0].astype(BF16).view(np.uint16)) and untouched(w_lp)


# ---- FP16 --------------------------------------------------------------------------------

def _every_rounding_case():
    """Every finite half, and the float32 midway between each pair of neighbours (ties),
    with both signs, plus values that overflow to infinity."""
    h = np.arange(0x7c00, dtype=np.uint16).view(np.float16).astype(np.float64)
    mid = (h[:-1] + h[1:]) / 2
    top = np.array([65504.0, 65519.0, 65520.0, 65536.0, 1e30, np.inf])
    pos = np.concatenate([h, mid, np.nextafter(mid, 0), np.nextafter(mid, 1e9), top])
    return np.concatenate([pos, -pos]).astype(np.float32)


def test_pack_rounds_as_numpy_bit_for_bit(launches):
    x = _every_rounding_case()
    got = cuda_ops.pack_fp16(placed(x, 0), 1.0)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    nan = cuda_ops.pack_fp16(np.array([np.nan, -np.nan], np.float32), 1.0)
    assert np.isnan(nan).all()


@pytest.mark.parametrize("n", [1, 3, 4, 1031])
def test_pack_unpack_at_every_alignment(launches, rng, n):
    x = (rng.standard_normal(n) * np.exp2(rng.integers(-30, 20, n))).astype(np.float32)
    scale = np.float32(rng.uniform(0.5, 4))
    for xo in OFFSETS:
        for ho in OFFSETS:
            src, out = placed(x, xo), placed(np.zeros(n, np.float16), ho)
            cuda_ops.pack_fp16(src, scale, out=out)
            want = precision.pack_fp16(x, scale)
            assert np.array_equal(out.view(np.uint16), want.view(np.uint16)), (xo, ho)
            back = placed(np.zeros(n, np.float32), xo)
            cuda_ops.unpack_fp16(out, 1 / scale, out=back)
            assert np.array_equal(back, precision.unpack_fp16(want, 1 / scale)), (xo, ho)
            assert untouched(src) and untouched(out) and untouched(back)


def test_unpack_every_half(launches):
    h = np.arange(2**16, dtype=np.uint16).view(np.float16)
    got = cuda_ops.unpack_fp16(placed(h, 3), 1.0)
    want = h.astype(np.float32)
    finite = ~np.isnan(want)
    assert np.array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))
    assert np.isnan(got[~finite]).all()


# ---- batch norm --------------------------------------------------------------------------

# rows 0 and 1; C % 4 != 0; C = 20, 100: the vector loop's channel step (3072 % C) is not 0
SHAPES = [(0, 8), (1, 5), (1, 64), (7, 3), (37, 12), (300, 37), (130, 64), (200, 20), (53, 100)]


def _bn_inputs(rng, rows, C):
    x = (rng.standard_normal((rows, C)) * rng.uniform(0.5, 3, C) + rng.uniform(-2, 2, C)).astype(np.float32)
    return x, rng.uniform(0.5, 2, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)


# Storage types of the activations, and the bound of one rounding to each relative to the
# largest |value| (bfloat16: 8 significant bits, half an ulp is 2**-9 of the value; 2**-8
# leaves room for the float32 error before the rounding).
STORAGE = {"f32": (np.float32, 1e-5), "bf16": (BF16, 2.0**-8)}


def channel_views(C, k, at=1):
    """k float32 (C,) arrays, consecutive views into a larger placed buffer with one guard
    element each side (NaN: a stray write of a finite value shows), and that buffer."""
    buf = placed(np.full(k * C + 2, np.nan, np.float32), at)
    return tuple(buf[1 + j * C:1 + (j + 1) * C] for j in range(k)), buf


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "plain"])
@pytest.mark.parametrize("rows,C", SHAPES + [(5, 0)])    # C = 0: every launch idle, nothing written
def test_bn_forward(launches, rng, relu, rows, C, storage):
    dtype, bound = STORAGE[storage]
    for offset, out_offset in ((0, 0), (4, 8), (1, 1), (0, 3), (5, 4), (8, 8), (2, 6)):   # both, neither, one aligned
        x, gamma, beta = _bn_inputs(rng, rows, C)
        x = x.astype(dtype).astype(np.float32)       # the values the storage holds, exactly
        xd, out = placed(x.astype(dtype), offset), placed(np.zeros_like(x, dtype), out_offset)
        stats, buf = channel_views(C, 3)
        y, mean, var, inv_std = cuda_ops.bn_train_forward(xd, gamma, beta, 1e-5, relu, out=out, stats_out=stats)
        ry, rmean, rvar = reference.bn_train_forward(x, gamma, beta, 1e-5, relu)
        hy, hmean, hvar, _ = hostmath.bn_train_forward(x, gamma, beta, 1e-5, relu)
        assert y is out and all(a is b for a, b in zip((mean, var, inv_std), stats))
        assert not cuda_ops._bn_arrival_counters[None].any()    # left at zero for the next launch
        assert untouched(xd) and untouched(out) and untouched(buf) and np.isnan(buf[[0, -1]]).all()
        # y = x*scale + shift cancels where var << eps (rows = 1): measure against x*scale
        floor = np.max(np.abs(x) * gamma / np.sqrt(rvar + 1e-5), initial=0)
        assert_close(y, ry, rtol=bound, atol=bound * max(np.abs(ry).max(initial=0), floor))
        assert_close(mean, rmean, rtol=1e-5, atol=1e-5 * np.abs(rmean).max(initial=0))
        assert_close(var, rvar, rtol=1e-5, atol=1e-5 * np.abs(rvar).max(initial=0))
        assert_close(inv_std, 1 / np.sqrt(rvar + 1e-5), rtol=1e-5, atol=0)
        assert_close(y, hy, rtol=bound, atol=bound * max(np.abs(hy).max(initial=0), floor))
        assert_close(mean, hmean, rtol=1e-5, atol=1e-5 * np.abs(hmean).max(initial=0))
        assert_close(var, hvar, rtol=1e-5, atol=1e-5 * np.abs(hvar).max(initial=0))
        if storage == "bf16":      # y is the float32 result rounded once, as ml_dtypes rounds it
            assert np.abs(y.astype(np.float32) - hy).max(initial=0) <= np.abs(hy).max(initial=0) * 2.0**-8 + 1e-6
    stats_grid = next(grid for _, k, grid in launches if k.startswith("bn_stats_"))
    assert rows < 100 or stats_grid[1] > 1       # several block rows, each walking several rows


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "plain"])
@pytest.mark.parametrize("rows,C", SHAPES + [(5, 0)])
def test_bn_backward(launches, rng, relu, rows, C, storage):
    dtype, bound = STORAGE[storage]
    exact = lambda a: a.astype(dtype).astype(np.float32)     # the values the storage holds
    for dy_at, x_at, y_at in ((0, 0, 0), (4, 8, 4), (2, 2, 2), (0, 0, 1), (0, 3, 0), (5, 0, 0), (8, 8, 8)):
        x, gamma, beta = _bn_inputs(rng, rows, C)
        x, dy = exact(x), exact(rng.standard_normal((rows, C)).astype(np.float32))
        y, mean, var, inv_std = hostmath.bn_train_forward(x, gamma, beta, 1e-5, relu)
        y = exact(y)
        hdx, hdg, hdb = hostmath.bn_backward(dy, x, y, gamma, mean, inv_std, relu)
        rdx, rdg, rdb = reference.bn_backward(dy, x, y, gamma, mean, inv_std, relu)   # the same statistics
        dyd = placed(dy.astype(dtype), dy_at)      # dx written over dy, as the model does
        grads, buf = channel_views(C, 2)          # as views into the flat gradient buffer
        dx, dgamma, dbeta = cuda_ops.bn_backward(dyd, placed(x.astype(dtype), x_at), placed(y.astype(dtype), y_at),
                                                 gamma, mean, inv_std, relu, out=dyd, grads_out=grads)
        assert dx is dyd and untouched(dyd) and dgamma is grads[0] and dbeta is grads[1]
        assert not cuda_ops._bn_arrival_counters[None].any()    # left at zero for the next launch
        assert untouched(buf) and np.isnan(buf[[0, -1]]).all()
        assert_close(dbeta, rdb, rtol=1e-5, atol=1e-5 * np.abs(rdb).max(initial=0))
        assert_close(dgamma, rdg, rtol=1e-5, atol=1e-5 * np.abs(rdg).max(initial=0))
        assert_close(dx, rdx, rtol=bound, atol=bound * np.abs(rdx).max(initial=0))
        assert_close(dx, hdx, rtol=bound, atol=bound * np.abs(hdx).max(initial=0))
        assert_close(dgamma, hdg, rtol=1e-5, atol=1e-5 * np.abs(hdg).max(initial=0))
        assert_close(dbeta, hdb, rtol=1e-5, atol=1e-5 * np.abs(hdb).max(initial=0))


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "plain"])
@pytest.mark.parametrize("rows,C", SHAPES + [(5, 0)])    # C = 0: no thread may take a channel
def test_bn_infer(launches, rng, relu, rows, C, storage):
    dtype, bound = STORAGE[storage]
    for offset in OFFSETS:
        x, gamma, beta = _bn_inputs(rng, rows, C)
        x = x.astype(dtype).astype(np.float32)
        mean, var = rng.standard_normal(C).astype(np.float32), rng.uniform(0.1, 3, C).astype(np.float32)
        xd, out = placed(x.astype(dtype), offset), placed(np.zeros_like(x, dtype), offset)
        y = cuda_ops.bn_infer_forward(xd, gamma, beta, mean, var, 1e-5, relu, out=out)
        ref = (x - mean.astype(np.float64)) / np.sqrt(var.astype(np.float64) + 1e-5) * gamma + beta
        assert y is out
        ref = np.maximum(ref, 0) if relu else ref
        host = hostmath.bn_infer_forward(x, gamma, beta, mean, var, 1e-5, relu)
        assert_close(y, ref, rtol=bound, atol=bound * np.abs(ref).max(initial=0))
        assert_close(y, host, rtol=bound, atol=bound * np.abs(host).max(initial=0))
        assert untouched(xd) and untouched(out)


# ---- im2col, col2im, max pool ---------------------------------------------------

# (N, H, W, C, K, stride, pad): K = 1/3/7, s = 1/2, p = 0/1/3; C = 8, 16 take the 128-bit paths
# of both storage types, C = 4, 12 that of float32 only, C = 3, 5, 7 the element paths; a
# window larger than the input; p >= K, where some windows see only padding.
WINDOWS = [(2, 7, 6, 8, 3, 1, 1), (1, 9, 9, 3, 7, 2, 3), (2, 5, 5, 16, 1, 2, 0), (1, 6, 7, 5, 3, 2, 0),
           (3, 5, 4, 12, 3, 1, 1), (1, 3, 3, 4, 7, 1, 3), (1, 4, 5, 8, 1, 2, 1), (2, 8, 8, 7, 3, 2, 1),
           (1, 6, 6, 4, 2, 2, 3)]
WINDOW_IDS = [f"n{n}h{h}w{w}c{c}k{k}s{s}p{p}" for n, h, w, c, k, s, p in WINDOWS]
# (input, output) offsets in elements: both aligned, both not (a view from element 1 of a
# larger buffer), one each, and aligned again 16 or 32 bytes on
PLACEMENTS = ((0, 0), (1, 1), (0, 1), (1, 0), (8, 8))
U32 = 2.0**-24     # float32's unit roundoff


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint32 if a.dtype.itemsize == 4 else np.uint16)


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("n,h,w,c,k,s,p", WINDOWS, ids=WINDOW_IDS)
def test_im2col_col2im(launches, rng, storage, n, h, w, c, k, s, p):
    dtype = STORAGE[storage][0]
    ho, wo = reference.out_hw(h, w, k, s, p)
    for x_at, out_at in PLACEMENTS:
        x = rng.standard_normal((n, h, w, c)).astype(dtype)
        xd, col = placed(x, x_at), placed(np.full((n, ho, wo, k, k, c), np.nan, dtype), out_at)
        assert cuda_ops.im2col(xd, k, s, p, col) is col
        # a bit copy: exactly the float64 patches (zeros at the border) in the storage type
        assert np.array_equal(_bits(col), _bits(reference.im2col(x, k, s, p).astype(dtype))), (x_at, out_at)
        assert untouched(xd) and untouched(col)
        if dtype == np.float32 and p < k:
            assert np.array_equal(col, hostmath.im2col(x, np.empty_like(col), k, s, p))
        dcol = placed(rng.standard_normal(col.shape).astype(dtype), x_at)
        dx = placed(np.full(x.shape, np.nan, dtype), out_at)
        assert cuda_ops.col2im(dcol, dx, s, p) is dx
        ref, absum = reference.scatter(lambda kh, kw: dcol[:, :, :, kh, kw, :].astype(np.float64), x.shape, k, s, p)
        # float32 sums of at most K*K terms: within K*K units of roundoff of the sum of |terms|;
        # bfloat16 adds the one rounding of the result (2**-9 of it, 2**-8 with room)
        bound = k * k * U32 * absum + (2.0**-8 * np.abs(ref) if storage == "bf16" else 0)
        assert np.all(np.abs(dx.astype(np.float64) - ref) <= bound), (x_at, out_at)
        assert untouched(dcol) and untouched(dx)
        if dtype == np.float32:      # the CPU path's shifted accumulations, in the same order: bit for bit
            assert np.array_equal(dx, conv.col2im(Workspace(np), np.array(dcol), np.empty_like(x), s, p))
    assert launches[-1][1] == f"col2im_{storage}"


def test_im2col_takes_16_byte_moves_only_when_aligned(launches, rng, monkeypatch):
    """The launcher's vector flag: C * itemsize % 16 == 0 and both pointers 16-byte aligned
    (a set flag with a misaligned pointer would abort under the alignment sanitizer)."""
    flags, emulated = [], cuda_ops._launch
    monkeypatch.setattr(cuda_ops, "_launch", lambda f, kern, grid, block, args: (
        flags.append(int(args[-1])), emulated(f, kern, grid, block, args)))
    for dtype, c in ((np.float32, 4), (np.float32, 6), (BF16, 8), (BF16, 12)):
        for x_at, out_at in PLACEMENTS:
            x = rng.standard_normal((1, 4, 4, c)).astype(dtype)
            col = placed(np.zeros((1, 4, 4, 3, 3, c), dtype), out_at)
            cuda_ops.im2col(placed(x, x_at), 3, 1, 1, col)
            assert np.array_equal(_bits(col), _bits(reference.im2col(x, 3, 1, 1).astype(dtype)))
            aligned = c * np.dtype(dtype).itemsize % 16 == 0 and x_at % 8 == 0 and out_at % 8 == 0
            assert flags[-1] == aligned, (dtype, c, x_at, out_at)
    assert sum(flags) == 4 and len(flags) == 20


POOL_VALUES = ("normal", "ties", "nan")


def _pool_input(rng, shape, values, dtype):
    if values == "ties":     # a handful of values: most windows hold their max more than once
        return rng.integers(-2, 3, shape).astype(dtype)
    x = rng.standard_normal(shape)
    if values == "nan":
        x[rng.random(shape) < 0.05] = np.nan
    return x.astype(dtype)


@pytest.mark.parametrize("values", POOL_VALUES)
@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("n,h,w,c,k,s,p", WINDOWS, ids=WINDOW_IDS)
def test_maxpool(launches, rng, storage, values, n, h, w, c, k, s, p):
    dtype = STORAGE[storage][0]
    ho, wo = reference.out_hw(h, w, k, s, p)
    for x_at, out_at in PLACEMENTS:
        x = _pool_input(rng, (n, h, w, c), values, dtype)
        xd, y = placed(x, x_at), placed(np.zeros((n, ho, wo, c), dtype), out_at)
        assert cuda_ops.maxpool_forward(xd, y, k, s, p) is y
        ref_y, arg = reference.maxpool(x, k, s, p)
        assert np.array_equal(y.astype(np.float64), ref_y, equal_nan=True), (x_at, out_at)
        assert (p >= k) == bool(np.any(arg < 0))       # windows of padding only: -inf, and only then
        dy = placed(rng.standard_normal(y.shape).astype(dtype), x_at)
        dx = placed(np.full(x.shape, np.nan, dtype), out_at)
        assert cuda_ops.maxpool_backward(xd, dy, dx, k, s, p) is dx
        dy64 = dy.astype(np.float64)
        ref, absum = reference.scatter(lambda kh, kw: np.where(arg == kh * k + kw, dy64, 0.0), x.shape, k, s, p)
        terms = (-(-k // s)) ** 2        # windows that can hold one input position
        bound = terms * U32 * absum + (2.0**-8 * np.abs(ref) if storage == "bf16" else 0)
        assert np.all(np.abs(dx.astype(np.float64) - ref) <= bound), (x_at, out_at)
        assert all(untouched(a) for a in (xd, y, dy, dx))
        if dtype == np.float32 and p < k:    # engine.hostmath, the CPU path: bit for bit
            assert np.array_equal(y, hostmath.maxpool_forward(x, np.empty_like(y), k, s, p), equal_nan=True)
            assert np.array_equal(dx, hostmath.maxpool_backward(x, np.array(dy), np.empty_like(x), k, s, p))


@pytest.mark.parametrize("values", ("normal", "ties"))
@pytest.mark.parametrize("n,h,w,c,k,s,p", WINDOWS, ids=WINDOW_IDS)
def test_maxpool_agrees_with_the_generic_numpy_layer(launches, rng, values, n, h, w, c, k, s, p):
    """engine.layers.MaxPool on float64 NumPy (its generic path: shifted views of the
    -inf-padded input, first hit claims) gives the kernels' results on finite inputs."""
    x = _pool_input(rng, (n, h, w, c), values, np.float32)
    layer = MaxPool("pool", Workspace(np), k, s, p)
    y64 = layer.forward(x.astype(np.float64), train=True)
    dy = rng.standard_normal(y64.shape).astype(np.float32)
    dx64 = layer.backward(dy.astype(np.float64))
    y = cuda_ops.maxpool_forward(x, np.empty(y64.shape, np.float32), k, s, p)
    dx = cuda_ops.maxpool_backward(x, dy, np.empty_like(x), k, s, p)
    assert np.array_equal(y, y64)
    assert_close(dx, dx64, rtol=1e-6, atol=1e-6 * np.abs(dx64).max(initial=0))


# ---- the BN that ends a residual block ---------------------------------------------------

# rows x C: tails of both paths; the last wraps the grid-stride loops of the elementwise kernels
RESIDUAL_SHAPES = [(1, 7), (3, 8), (97, 64)]


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")     # the references of channel 0
@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("rows,C", RESIDUAL_SHAPES)
def test_bn_with_the_residual_sum_and_its_gated_gradient(launches, rng, storage, rows, C):
    """relu(bn(x) + shortcut) in the apply kernel (training and inference) against float64
    and against the host path's separate passes; backward with gate: dy left as
    dy * (y > 0) bit for bit (a product: inf * 0 is NaN, as relu_grad_ on the CPU), the
    BN gradients of that g. A NaN in x reaches every y of its channel."""
    dtype, bound = STORAGE[storage]
    exact = lambda a: a.astype(dtype).astype(np.float32)
    for x_at, s_at, y_at in ((0, 0, 0), (4, 8, 4), (1, 3, 2), (8, 8, 8)):
        x, gamma, beta = _bn_inputs(rng, rows, C)
        x, sc = exact(x), exact(rng.standard_normal((rows, C)).astype(np.float32))
        x[rng.integers(rows), 0] = np.nan      # channel 0's statistics and outputs: all NaN
        xd, sd, out = placed(x.astype(dtype), x_at), placed(sc.astype(dtype), s_at), placed(np.zeros_like(x, dtype), y_at)
        y, mean, var, inv_std = cuda_ops.bn_train_forward(xd, gamma, beta, 1e-5, True, out=out, residual=sd)
        hy, *_ = batchnorm.bn_train_forward(x.astype(dtype), gamma, beta, 1e-5, True, residual=sc.astype(dtype))
        xf = x.astype(np.float64)
        m64, v64 = xf.mean(0), xf.var(0)
        ref = np.maximum((xf - m64) / np.sqrt(v64 + 1e-5) * gamma + beta + sc, 0)
        nan = np.isnan(ref)
        assert y is out and untouched(xd) and untouched(sd) and untouched(out)
        assert np.array_equal(np.isnan(y.astype(np.float64)), nan) and np.array_equal(np.isnan(hy.astype(np.float64)), nan)
        clean = ~np.isnan(mean)          # channels without a NaN: their statistics are finite
        # x*scale + shift cancels where var << eps (rows = 1): measure against x*scale
        floor = np.max(np.abs(xf[:, clean]) * gamma[clean] / np.sqrt(v64[clean] + 1e-5), initial=0)
        scale = max(np.abs(ref[:, clean]).max(initial=0), floor)
        assert_close(y[:, clean], ref[:, clean], rtol=bound, atol=bound * scale)
        assert_close(y[:, clean], hy[:, clean], rtol=bound, atol=bound * scale)
        yi = cuda_ops.bn_infer_forward(xd, gamma, beta, mean, var, 1e-5, True, residual=sd)
        hyi = batchnorm.bn_infer_forward(x, gamma, beta, mean, var, 1e-5, True, residual=sc)
        assert np.array_equal(np.isnan(yi.astype(np.float64)), np.isnan(hyi))
        assert_close(yi[:, clean], hyi[:, clean], rtol=bound, atol=bound * scale)
        # backward on the finite channels' data: the gradient of the block's ReLU left in dy
        x = np.nan_to_num(x)
        y, mean, var, inv_std = hostmath.bn_train_forward(x, gamma, beta, 1e-5, False)
        y = exact(np.maximum(y + sc, 0))
        dy = exact(rng.standard_normal((rows, C)).astype(np.float32))
        dy[rng.random(dy.shape) < 0.02] = np.inf
        dyd, dx_out = placed(dy.astype(dtype), s_at), placed(np.zeros_like(x, dtype), x_at)
        grads, buf = channel_views(C, 2)
        dx, dgamma, dbeta = cuda_ops.bn_backward(dyd, placed(x.astype(dtype), x_at), placed(y.astype(dtype), y_at),
                                                 gamma, mean, inv_std, False, out=dx_out, grads_out=grads, gate=True)
        with np.errstate(invalid="ignore"):
            g = dy.astype(np.float64) * (y > 0)
        assert dx is dx_out and untouched(dyd) and untouched(dx_out) and untouched(buf)
        g_bits = np.asarray(g.astype(dtype)).view(np.uint16 if dtype == BF16 else np.uint32)
        got_bits = np.asarray(dyd).view(g_bits.dtype)
        assert np.array_equal(np.isnan(g), np.isnan(dyd.astype(np.float64)))
        assert np.array_equal(got_bits[~np.isnan(g)], g_bits[~np.isnan(g)])      # -0 included
        finite = np.isfinite(g).all(0)       # channels whose sums are finite
        xhat = (x - mean.astype(np.float64)) * inv_std
        rdb, rdg = g.sum(0), (g * xhat).sum(0)
        rdx = gamma * inv_std.astype(np.float64) * (g - rdb / rows - xhat * rdg / rows)
        for got, want, tol in ((dbeta[finite], rdb[finite], 1e-5), (dgamma[finite], rdg[finite], 1e-5),
                               (dx[:, finite], rdx[:, finite], bound)):
            assert_close(got, want, rtol=tol, atol=tol * np.abs(want).max(initial=0))
    assert rows < 90 or -(-rows * C // 8) > max(g for f, k, g in launches if "apply" in k)[0] * cuda_ops.THREADS


def test_bn_gate_refuses_a_relu_or_an_out_over_dy(launches):
    x = np.ones((4, 3), np.float32)
    c = np.ones(3, np.float32)
    for relu, out in ((True, None), (False, x)):
        with pytest.raises(ValueError, match="gate"):
            cuda_ops.bn_backward(x, x.copy(), x.copy(), c, c, c, relu, out=out, gate=True)
        with pytest.raises(ValueError, match="gate"):
            batchnorm.bn_backward(x, x.copy(), x.copy(), c, c, c, relu, out=out, gate=True)
    with pytest.raises(ValueError, match="cuda_ops: residual is float32 \\(4, 2\\), expected float32 \\(4, 3\\)"):
        cuda_ops.bn_train_forward(x, c, c, 1e-5, True, residual=x[:, :2].copy())
    assert launches == []


def test_window_launchers_refuse_wrong_arrays_by_name(launches):
    x = np.zeros((1, 4, 4, 3), np.float32)
    with pytest.raises(ValueError, match=r"cuda_ops: out has shape \(1, 4, 4, 3, 3, 3\), expected \(1, 2, 2, 3, 3, 3\)"):
        cuda_ops.im2col(x, 3, 2, 1, np.zeros((1, 4, 4, 3, 3, 3), np.float32))
    with pytest.raises(TypeError, match="cuda_ops: out is bfloat16, expected float32"):
        cuda_ops.im2col(x, 3, 1, 1, np.zeros((1, 4, 4, 3, 3, 3), BF16))
    with pytest.raises(TypeError, match="cuda_ops: x must be float32 or bfloat16, got float64"):
        cuda_ops.maxpool_forward(x.astype(np.float64), np.zeros((1, 2, 2, 3)), 3, 2, 1)
    with pytest.raises(ValueError, match="cuda_ops: x must be C-contiguous"):
        cuda_ops.maxpool_forward(np.zeros((1, 4, 8, 3), np.float32)[:, :, ::2], np.zeros((1, 2, 2, 3), np.float32), 3, 2, 1)
    with pytest.raises(ValueError, match="cuda_ops: dy has shape"):
        cuda_ops.maxpool_backward(x, np.zeros((1, 3, 3, 3), np.float32), np.zeros_like(x), 3, 2, 1)
    with pytest.raises(ValueError, match="cuda_ops: dcol must be"):
        cuda_ops.col2im(np.zeros((1, 2, 2, 3, 1, 3), np.float32), x, 2, 1)
    with pytest.raises(ValueError, match="smaller than the 7x7 window"):
        cuda_ops.im2col(x, 7, 1, 1, np.zeros((1, 1, 1, 7, 7, 3), np.float32))
    assert launches == []


# ---- loss --------------------------------------------------------------------------------
# Bounds and reference: tests/softmax_xent_reference.py (derived there from float32 rounding).

@pytest.mark.parametrize("kind", xent.KINDS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("n,k", xent.SIZES)
def test_softmax_xent(launches, rng, n, k, smoothing, kind):
    logits, labels = xent.logits_and_labels(rng, n, k, kind)
    z, y = placed(logits, 1), placed(labels, 3)
    d, out, scratch = placed(np.zeros((n, k), np.float32), 2), placed(np.zeros(2, np.float32), 1), \
        placed(np.zeros(2 * n, np.float32), 5)
    loss, dlogits, hits = cuda_ops.softmax_xent(z, y, smoothing, dlogits=d, out=out, scratch=scratch)
    assert dlogits is d and loss.shape == hits.shape == () and loss.dtype == hits.dtype == np.float32
    assert np.shares_memory(loss, out) and np.shares_memory(hits, out)
    xent.check(logits, labels, smoothing, loss, dlogits, hits, scratch[:n], scratch[n:])
    assert np.array_equal(z, logits) and np.array_equal(y, labels)
    assert all(untouched(a) for a in (z, y, d, out, scratch))
    # two launches; more rows than blocks: the block-stride loop over rows wraps
    assert [kern for _, kern, _ in launches] == ["softmax_xent_rows", "softmax_xent_reduce"]
    assert launches[0][2] == (min(n, cuda_ops.MAX_BLOCKS),)
    if kind == "ties":
        assert 0 < hits < n or n < 3
    elif kind == "normal":      # deterministic: the same bits again, and from the default buffers
        again = cuda_ops.softmax_xent(logits, labels, smoothing)
        assert np.array_equal(again[1], d) and np.array_equal(np.stack(again[::2]), out)


def test_softmax_xent_matches_the_generic_loss(launches, rng):
    """engine.loss's xp code and the kernels: float32 both, a few ulp apart."""
    from engine.loss import softmax_cross_entropy_with_hits
    logits, labels = xent.logits_and_labels(rng, 33, 1000, "normal")
    for e in (0.0, 0.1):
        loss, d, hits = softmax_cross_entropy_with_hits(logits, labels, e)    # NumPy: the xp code
        assert launches == []
        got = cuda_ops.softmax_xent(logits, labels, e)
        assert abs(float(got[0]) - float(loss)) <= 1e-5 * abs(float(loss))
        assert np.max(np.abs(got[1] - d)) <= 2.0**-20 / 33 and float(got[2]) == hits
        launches.clear()


def test_softmax_xent_label_out_of_range_is_a_nan_row(launches, rng):
    """No read through a bad label: its row's loss and gradient are NaN, its hit 0, so the
    batch loss is NaN (engine.metrics.check_finite stops the job); the other rows are exact."""
    n, k = 7, 10
    logits, labels = xent.logits_and_labels(rng, n, k, "normal")
    bad = labels.copy()
    bad[[1, 4, 5]] = [-1, k, 2**40]
    z, y, scratch = placed(logits, 0), placed(bad, 1), placed(np.zeros(2 * n, np.float32), 0)
    loss, d, hits = cuda_ops.softmax_xent(z, y, 0.1, scratch=scratch)
    assert np.isnan(loss) and np.all(np.isnan(d[[1, 4, 5]])) and np.all(np.isnan(scratch[[1, 4, 5]]))
    good = [0, 2, 3, 6]
    ref_rows, ref_d, ref_hit, _, _ = xent.reference(logits, labels, 0.1)
    assert np.all(np.isfinite(d[good])) and np.all(np.isfinite(scratch[good]))
    assert_close(scratch[good], ref_rows[good], rtol=1e-5, atol=1e-5 * np.abs(ref_rows[good]).max(initial=0))
    assert_close(d[good], ref_d[good], rtol=1e-5, atol=1e-5 * np.abs(ref_d[good]).max(initial=0))
    assert float(hits) == ref_hit[good].sum() and np.all(scratch[n:][[1, 4, 5]] == 0)
    assert untouched(z) and untouched(y) and untouched(scratch)
    from engine.metrics import NonFiniteLoss, check_finite
    with pytest.raises(NonFiniteLoss, match="loss is nan"):
        check_finite(float(loss), 1, 0.0)


def test_softmax_xent_refuses_wrong_arrays_by_name(launches):
    z = np.zeros((3, 4), np.float32)
    y = np.zeros(3, np.int64)
    with pytest.raises(TypeError, match="cuda_ops: logits must be float32, got float64"):
        cuda_ops.softmax_xent(z.astype(np.float64), y, 0.0)
    with pytest.raises(TypeError, match="cuda_ops: labels must be int64, got int32"):
        cuda_ops.softmax_xent(z, y.astype(np.int32), 0.0)
    with pytest.raises(ValueError, match="cuda_ops: labels has 2 elements, expected 3"):
        cuda_ops.softmax_xent(z, y[:2], 0.0)
    with pytest.raises(ValueError, match=r"cuda_ops: smoothing must be in \[0, 1\)"):
        cuda_ops.softmax_xent(z, y, 1.0)
    with pytest.raises(ValueError, match=r"cuda_ops: dlogits has shape \(4, 3\), expected \(3, 4\)"):
        cuda_ops.softmax_xent(z, y, 0.0, dlogits=np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="cuda_ops: scratch has 4 elements, expected 6"):
        cuda_ops.softmax_xent(z, y, 0.0, scratch=np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="cuda_ops: logits must be C-contiguous"):
        cuda_ops.softmax_xent(np.zeros((3, 8), np.float32)[:, ::2], y, 0.0)
    assert launches == []


# ---- launch checks and barrier faults -----------------------------------------------------

def test_launch_refuses_what_a_gpu_refuses():
    x = np.zeros(4, np.float32)
    h = np.zeros(4, np.float16)
    with pytest.raises(ValueError, match="grid"):
        kernel_emulation.emulated_launch("fp16_pack.cu", "pack_fp16", (0,), (32,), (x, h, np.int64(4), np.float32(1)))
    with pytest.raises(ValueError, match="more than 1024 threads"):
        kernel_emulation.emulated_launch("fp16_pack.cu", "pack_fp16", (1,), (64, 32), (x, h, np.int64(4), np.float32(1)))
    with pytest.raises(TypeError, match="pack_fp16: scale"):
        kernel_emulation.emulated_launch("fp16_pack.cu", "pack_fp16", (1,), (32,), (x, h, np.int64(4), 1.0))


def _fault(tmp_path, source, kernel, args):
    """Launch `kernel` of CUDA `source` over 2 blocks of 64 threads in a child process, where a
    fault may abort; `args` is Python in which at(offset, dtype) is 16 bytes `offset` bytes past
    a 64-byte boundary. Returns the child's return code and stderr."""
    cu = tmp_path / "fault.cu"
    cu.write_text(source)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
        import kernel_emulation
        import numpy as np
        raw = np.zeros(256, np.uint8)
        def at(offset, dtype):
            start = -raw.ctypes.data % 64 + offset
            return raw[start:start + 16].view(dtype)
        kernel_emulation.launch({str(cu)!r}, {kernel!r}, (2,), (64,), {args})
    """)
    env = dict(os.environ, EMU_BARRIER_TIMEOUT_S="1")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                         cwd=kernel_emulation.ROOT)
    return res.returncode, res.stderr


VECTOR_LOADS = r"""
extern "C" __global__ void load_float4(const float* p, float* out)
{ out[threadIdx.x] = reinterpret_cast<const float4*>(p)[0].y; }
extern "C" __global__ void load_uint2(const unsigned int* p, float* out)
{ out[threadIdx.x] = reinterpret_cast<const uint2*>(p)[0].y; }
extern "C" __global__ void load_uchar4(const unsigned char* p, float* out)
{ out[threadIdx.x] = reinterpret_cast<const uchar4*>(p)[0].y; }
"""


@pytest.mark.parametrize("vector,dtype,needs", [("float4", "float32", 16), ("uint2", "uint32", 8), ("uchar4", "uint8", 4)])
def test_misaligned_vector_load_aborts_as_on_a_gpu(tmp_path, vector, dtype, needs):
    """The shim's vector types carry the GPU's alignment, and the sanitizer enforces it."""
    args = f"(at({{}}, np.{dtype}), np.zeros(64, np.float32))"
    code, err = _fault(tmp_path, VECTOR_LOADS, f"load_{vector}", args.format(needs))
    assert code == 0, err
    code, err = _fault(tmp_path, VECTOR_LOADS, f"load_{vector}", args.format(needs // 2))
    assert code == -signal.SIGABRT
    assert "misaligned address" in err and f"requires {needs} byte alignment" in err, err
    assert f"kernel emulation: load_{vector}: misaligned access in block (0,0,0)" in err, err


DIVERGENT = r"""
extern "C" __global__ void early_return(float* x)
{
    __shared__ float s[64];
    if (threadIdx.x == 5) return;            // one thread leaves; the others wait for it
    s[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    x[threadIdx.x] = s[63 - threadIdx.x];
}

extern "C" __global__ void stuck(float* x)
{
    __shared__ volatile int flag;
    if (threadIdx.x == 0) flag = 0;
    __syncthreads();
    if (threadIdx.x < 32) { __syncthreads(); flag = 1; }   // half the block waits at a barrier
    else while (!flag) {}                                  // the other half spins on the first
    x[threadIdx.x] = 1.0f;
}
"""


@pytest.mark.parametrize("kernel,message", [
    ("early_return", "a thread returned from the kernel before a barrier the others reach"),
    ("stuck", r"\d+ threads still wait at a barrier after 1 s"),   # those the spinning half let run
], ids=["early_return", "stuck"])
def test_divergent_syncthreads_stops_with_a_message(tmp_path, kernel, message):
    code, err = _fault(tmp_path, DIVERGENT, kernel, "(np.zeros(64, np.float32),)")
    assert code == -signal.SIGABRT, err
    assert re.search(rf"{kernel}: divergent __syncthreads in block \(0,0,0\) of 64 threads: {message}", err)
