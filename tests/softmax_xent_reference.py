"""The float64 reference and the float32 error bounds of the fused softmax cross-entropy
(kernels/softmax_xent.cu), shared by the emulated tier (tests/test_kernels_emulated.py)
and the GPU tier (tests/test_kernels_gpu.py).

Error bounds, u = 2**-24 (float32's unit roundoff), first order, for a row with shifted logits
s = z - max z (s <= 0, one of them 0), E = sum exp(s) in [1, K], log_z = log E, p = softmax:
  * a sum over the K classes in the kernel's order (each of T threads adds ceil(K/T) terms in
    turn, then a tree of log2 T levels; T = cuda_ops._xent_block(K)) is off by at most
    D u times the sum of the magnitudes of its terms, D = ceil(K/T) + log2 T (D = K for a
    sum in any order: the "K * 2**-24" of a float32 row sum, 12 for K = 1000, T = 256);
  * s_k = fl(z_k - m) is off by at most u|s_k|, which moves exp(s_k) by exp(s_k) u |s_k|:
    relative to E that is u sum p_k |s_k| = u (H(p) - log_z) <= u ln K;
  * each expf and logf is within 2 ulp (CUDA's documented bound; glibc's is 1), 4u relative;
  * so E is off by (D + 4 + ln K) u relative and log_z by err_z = u (D + 4 + ln K + 4 |log_z|);
  * nll = log_z - s_c is off by err_z + u (|s_c| + |nll|), the mean of log_p by
    err_z + u D mean|s_k| + u |mean log_p| (a sum of terms of one sign, and a division);
  * loss = (1 - e) nll - e mean log_p adds u |loss| per product and the difference:
        ROW_TOL = 2 [(1 - e) err_nll + e err_mean + 3 u (|nll| + |mean log_p|)],
    the factor 2 for the second order terms;
  * the batch mean adds (N + 1) u relative (a sum of N terms, one division);
  * N * dlogits_k = p_k - q_k with p_k = expf(s_k - log_z): p_k is off by p_k (err_z +
    u (2 |s_k| + |log_z|) + 4u) relative, each of the two subtractions by u (p_k + q_k), the
    division by N by u; the GPU flushes results below 2**-126 to zero (-ftz=true), which
    bounds what is left absolutely (2 * 2**-126).
  * hits and the per-row hits are exact: NumPy's argmax of the float32 logits (first index of
    a tied max).
"""
from __future__ import annotations

import numpy as np

U = 2.0**-24
TINY = 2.0**-126
SIZES = [(n, k) for n in (1, 2, 7, 33) for k in (10, 1000, 1001)]
KINDS = ("normal", "ties", "large")


def logits_and_labels(rng, n, k, kind):
    """float32 logits (n, k) and int64 labels of the given kind:
    normal  3 * standard normal;
    ties    small integers, so rows hold their max several times, labels often at a tied max
            (the first one or a later one: hit and miss under the first-index rule);
    large   large magnitudes: rows around +-1e4 with spreads of 1 to 200 (exp underflows),
            and a row with a single far outlier (softmax of exactly one and zeros)."""
    labels = rng.integers(0, k, n)
    if kind == "normal":
        z = 3 * rng.standard_normal((n, k))
    elif kind == "ties":
        z = rng.integers(-3, 3, (n, k)).astype(np.float64)
        for r in range(n):
            z[r, rng.choice(k, min(k, 3), replace=False)] = 3.0      # the max, at least twice
            tied = np.flatnonzero(z[r] == 3.0)
            labels[r] = tied[0] if r % 3 == 0 else tied[-1] if r % 3 == 1 else labels[r]
    elif kind == "large":
        centre = rng.choice([-1e4, 1e4, 3e3], (n, 1))
        spread = rng.choice([1.0, 30.0, 200.0], (n, 1))
        z = centre + spread * rng.standard_normal((n, k))
        if n > 1:
            z[1] = -50.0
            z[1, labels[1]] = 1e4                                    # p = 1 at the label, 0 elsewhere
    else:
        raise ValueError(kind)
    return z.astype(np.float32), labels.astype(np.int64)


def reference(logits, labels, e):
    """float64: (row losses, dlogits, per-row hits, log_z, shifted logits s)."""
    z = np.asarray(logits, np.float64)
    n, k = z.shape
    s = z - z.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(s).sum(axis=1))
    log_p = s - log_z[:, None]
    rows = np.arange(n)
    nll = -log_p[rows, labels]
    loss = (1 - e) * nll - e * log_p.mean(axis=1)
    q = np.full((n, k), e / k)
    q[rows, labels] += 1 - e
    d = (np.exp(log_p) - q) / n
    hit = (np.asarray(logits).argmax(axis=1) == labels).astype(np.float64)
    return loss, d, hit, log_z, s


def depth(k):
    """D of the module docstring: the additions on the longest path of the kernel's row sums."""
    from engine import cuda_ops
    t = cuda_ops._xent_block(k)[0]
    return -(-k // t) + int(np.log2(t))


def check(logits, labels, e, loss, dlogits, hits, row_loss=None, row_hit=None):
    """Assert the kernels' results within the bounds of the module docstring."""
    n, k = logits.shape
    ref_rows, ref_d, ref_hit, log_z, s = reference(logits, labels, e)
    rows = np.arange(n)
    s_c = s[rows, labels]
    nll = log_z - s_c
    mean_logp = s.mean(axis=1) - log_z
    d = depth(k)
    err_z = U * (d + 4 + np.log(k) + 4 * np.abs(log_z))
    err_nll = err_z + U * (np.abs(s_c) + np.abs(nll))
    err_mean = err_z + U * d * np.abs(s).mean(axis=1) + U * np.abs(mean_logp)
    row_tol = 2 * ((1 - e) * err_nll + e * err_mean + 3 * U * (np.abs(nll) + np.abs(mean_logp)))
    if row_loss is not None:
        err = np.abs(np.asarray(row_loss, np.float64) - ref_rows)
        assert np.all(err <= row_tol), (err.max(), row_tol[err.argmax()], int(err.argmax()))
        np.testing.assert_array_equal(np.asarray(row_hit), ref_hit)
    mean_tol = row_tol.mean() + (n + 1) * U * np.abs(ref_rows).mean()
    assert abs(float(loss) - ref_rows.mean()) <= mean_tol, (float(loss), ref_rows.mean(), mean_tol)
    assert float(hits) == ref_hit.sum()
    p = np.exp(s - log_z[:, None])
    q = np.full((n, k), e / k)
    q[rows, labels] += 1 - e
    tol_nd = p * (err_z[:, None] + U * (2 * np.abs(s) + np.abs(log_z)[:, None] + 4)) + U * (3 * p + 2 * q)
    d_tol = 2 * tol_nd / n + 2 * TINY
    err = np.abs(np.asarray(dlogits, np.float64) - ref_d)
    assert np.all(err <= d_tol), (err.max(), d_tol.flat[err.argmax()], np.unravel_index(err.argmax(), err.shape))
