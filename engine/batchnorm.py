"""Batch normalization over the rows of an NHWC activation seen as a 2-D (N*H*W, C) array.

Three functions, the contract between the model and the fused CUDA kernels
(engine/cuda_ops.py has versions with the same signatures):

    bn_train_forward(x2d, gamma, beta, eps, relu) -> (y2d, mean, var, inv_std)
    bn_backward(dy2d, x2d, y2d, gamma, mean, inv_std, relu) -> (dx2d, dgamma, dbeta)
    bn_infer_forward(x2d, gamma, beta, mean, var, eps, relu) -> y2d

`var` is the biased variance over the N*H*W rows (what normalizes the batch), `relu` fuses
a ReLU after the affine transform (its backward masks with y2d > 0, so y2d is only read
when relu is true). The code below is generic in the array module (NumPy or CuPy); float32
NumPy arrays go to engine.hostmath instead: the host build of the same per-element math as
the CUDA kernels (engine/kernels/recipe_math.cuh), one fused C loop per pass, sums in float64,
2-5x faster than the NumPy passes.

Each function also takes an optional keyword `out`: a preallocated (N*H*W, C) array that
receives the result, so the model reuses one buffer per layer instead of allocating one
per step. `out` may be `dy2d` itself in bn_backward (dy is consumed). Callers always use
the returned array, so an implementation is free to ignore `out`. The keyword `team` (an
engine.parallel.Team) splits hostmath's loops over its threads; the other paths ignore it.
"""
from __future__ import annotations

import numpy as np

from engine.backend import array_module, host_math
from engine.parallel import SERIAL


def _fused(a):
    """engine.cuda_ops (the fused CUDA kernels, same signatures) for float32 CuPy arrays, else None."""
    if isinstance(a, np.ndarray) or a.dtype != np.float32:
        return None
    from engine import cuda_ops
    return cuda_ops


def _colsum(xp, a):
    """Sum over rows (einsum: one pass, no temporary; NumPy's `ones @ a` takes a slow
    non-BLAS path, 30x slower)."""
    return xp.einsum("ij->j", a)


def _rowdot(xp, a, b):
    """Per-column dot product of two (M, C) arrays without materializing a * b."""
    return xp.einsum("ij,ij->j", a, b)


def bn_train_forward(x2d, gamma, beta, eps, relu, *, out=None, team=SERIAL):
    """Normalize with this batch's statistics; returns (y2d, mean, var, inv_std), all (C,)."""
    if (fused := _fused(x2d)) is not None:
        return fused.bn_train_forward(x2d, gamma, beta, eps, relu, out=out)
    host = host_math(x2d, gamma, beta)
    if host is not None:
        return host.bn_train_forward(x2d, gamma, beta, eps, relu, out, team.map)
    return xp_bn_train_forward(x2d, gamma, beta, eps, relu, out=out)


def xp_bn_train_forward(x2d, gamma, beta, eps, relu, *, out=None):
    """bn_train_forward in NumPy/CuPy expressions (float64, and any array no fused path
    takes); bench/kernels.py times hostmath against it."""
    xp = array_module(x2d)
    m = x2d.shape[0]
    y = xp.empty_like(x2d) if out is None else out
    mean = _colsum(xp, x2d) / m
    # Two passes (center, then square) keep the variance exact when |mean| >> std.
    xp.subtract(x2d, mean, out=y)
    var = _rowdot(xp, y, y) / m
    inv_std = 1.0 / xp.sqrt(var + eps)
    y *= gamma * inv_std
    y += beta
    if relu:
        xp.maximum(y, 0, out=y)
    return y, mean, var, inv_std


def bn_infer_forward(x2d, gamma, beta, mean, var, eps, relu, *, out=None, team=SERIAL):
    """Normalize with given statistics (evaluation mode)."""
    if (fused := _fused(x2d)) is not None:
        return fused.bn_infer_forward(x2d, gamma, beta, mean, var, eps, relu, out=out)
    host = host_math(x2d, gamma, beta, mean, var)
    if host is not None:
        return host.bn_infer_forward(x2d, gamma, beta, mean, var, eps, relu, out, team.map)
    return xp_bn_infer_forward(x2d, gamma, beta, mean, var, eps, relu, out=out)


def xp_bn_infer_forward(x2d, gamma, beta, mean, var, eps, relu, *, out=None):
    """bn_infer_forward in NumPy/CuPy expressions."""
    xp = array_module(x2d)
    scale = gamma / xp.sqrt(var + eps)
    y = xp.multiply(x2d, scale, out=out)
    y += beta - mean * scale
    if relu:
        xp.maximum(y, 0, out=y)
    return y


def bn_backward(dy2d, x2d, y2d, gamma, mean, inv_std, relu, *, out=None, team=SERIAL):
    """Gradients of bn_train_forward: returns (dx2d, dgamma, dbeta).

    With g the gradient after the ReLU mask and xc = x - mean:
      dbeta = sum g,  dgamma = inv_std * sum(g * xc),
      dx = gamma*inv_std * (g - dbeta/M - xc * inv_std^2 * sum(g * xc)/M).
    """
    if (fused := _fused(dy2d)) is not None:
        return fused.bn_backward(dy2d, x2d, y2d, gamma, mean, inv_std, relu, out=out)
    host = host_math(dy2d, x2d, y2d, gamma, mean, inv_std)
    if host is not None:
        return host.bn_backward(dy2d, x2d, y2d, gamma, mean, inv_std, relu, out, team.map)
    return xp_bn_backward(dy2d, x2d, y2d, gamma, mean, inv_std, relu, out=out)


def xp_bn_backward(dy2d, x2d, y2d, gamma, mean, inv_std, relu, *, out=None):
    """bn_backward in NumPy/CuPy expressions."""
    xp = array_module(dy2d)
    m = dy2d.shape[0]
    g = xp.empty_like(dy2d) if out is None else out
    if relu:
        xp.multiply(dy2d, y2d > 0, out=g)
    elif g is not dy2d:
        g[...] = dy2d
    dbeta = _colsum(xp, g)
    xc = x2d - mean
    gxc = _rowdot(xp, g, xc)
    dgamma = gxc * inv_std
    a = gamma * inv_std
    xc *= -a * inv_std * inv_std * (gxc / m)
    g *= a
    g += xc
    g -= a * (dbeta / m)
    return g, dgamma, dbeta
