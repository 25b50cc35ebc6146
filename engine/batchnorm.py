"""Batch normalization over the rows of an NHWC activation seen as a 2-D (N*H*W, C) array.

Three functions, the contract between the model and the fused CUDA kernels
(engine/cuda_ops.py has versions with the same signatures):

    bn_train_forward(x2d, gamma, beta, eps, relu, residual=None) -> (y2d, mean, var, inv_std)
    bn_backward(dy2d, x2d, y2d, gamma, mean, inv_std, relu, gate=False) -> (dx2d, dgamma, dbeta)
    bn_infer_forward(x2d, gamma, beta, mean, var, eps, relu, residual=None) -> y2d

`var` is the biased variance over the N*H*W rows (what normalizes the batch), `relu` fuses
a ReLU after the affine transform (its backward masks with y2d > 0, so y2d is only read
when relu is true).

A residual block ends in its last BN: `residual` (the shortcut) is added after the affine
transform and before the ReLU, y = relu(bn(x) + shortcut), so the block's sum costs no
pass of its own. Its backward needs the gradient g = dy * (y > 0) twice (for the BN and for
the shortcut): the first BN backward to see dy, called with `gate=True` (and relu False),
leaves g in dy2d itself, y2d being the block's output. The CUDA kernels do both inside
their BN passes (the ReLU gradient in the reduce kernel); the host paths below run the
separate residual passes (engine.hostmath's add_relu_/relu_grad_, the same float32 math)
around the plain BN. The code below is generic in the array module (NumPy or CuPy); float32
NumPy arrays go to engine.hostmath instead: the host build of the same per-element math as
the CUDA kernels (kernels/recipe_math.cuh), one fused C loop per pass, sums in float64,
2-5x faster than the NumPy passes.

Each function also takes an optional keyword `out`: a preallocated (N*H*W, C) array that
receives the result, so the model reuses one buffer per layer instead of allocating one
per step. `out` may be `dy2d` itself in bn_backward (dy is consumed). Callers always use
the returned array, so an implementation is free to ignore `out`. The per-channel results
go where they live: `stats_out=(mean, var, inv_std)` and `grads_out=(dgamma, dbeta)` are
(C,) arrays (a layer's statistics, views of the flat gradient buffer) that receive them;
the CUDA kernels write them there directly, with no copy launch. The keyword `team` (an
engine.parallel.Team) splits hostmath's loops over its threads; the other paths ignore it.

Activations may be bfloat16 (x2d, y2d, dy2d, dx2d; --precision bf16): the CUDA kernels read
and write them as such with float32 math; on the CPU the twin widens them to float32
(exact), runs the float32 host math and rounds the result once, to nearest even, as the
kernels do. Statistics, gamma, beta and their gradients are float32 in every mode.
"""
from __future__ import annotations

import numpy as np

from engine.backend import array_module, host_math
from engine.gemm import activation_dtype
from engine.parallel import SERIAL


def _fused(a):
    """engine.cuda_ops (the fused CUDA kernels, same signatures) for float32 and bfloat16 CuPy
    arrays, else None."""
    if isinstance(a, np.ndarray) or a.dtype not in (np.float32, activation_dtype("bf16")):
        return None
    from engine import cuda_ops
    return cuda_ops


def _host_bf16(a) -> bool:
    return isinstance(a, np.ndarray) and a.dtype == activation_dtype("bf16")


def _wide(a):
    return None if a is None else a.astype(np.float32)


def _narrow(a32, out):
    """a32 rounded once to bfloat16, into `out` when given."""
    if out is None:
        return a32.astype(activation_dtype("bf16"))
    out[...] = a32
    return out


def _store(dsts, values):
    """values, each copied into its destination of `dsts` (when given); the values the caller gets."""
    if dsts is None:
        return values
    for dst, v in zip(dsts, values):
        dst[...] = v
    return tuple(dsts)


def _colsum(xp, a):
    """Sum over rows (einsum: one pass, no temporary; NumPy's `ones @ a` takes a slow
    non-BLAS path, 30x slower)."""
    return xp.einsum("ij->j", a)


def _rowdot(xp, a, b):
    """Per-column dot product of two (M, C) arrays without materializing a * b."""
    return xp.einsum("ij,ij->j", a, b)


def add_residual_(y, shortcut, relu, team=SERIAL):
    """y = y + shortcut (+ReLU) in place: the end of a residual block on the host paths."""
    if relu and (host := host_math(y, shortcut)) is not None:
        return host.add_relu_(y, shortcut, team.map)
    y += shortcut
    if relu:
        array_module(y).maximum(y, 0, out=y)
    return y


def relu_grad_(dy, y, team=SERIAL):
    """dy = dy * (y > 0) in place (a product: a non-finite dy stays non-finite)."""
    if (host := host_math(dy, y)) is not None:
        return host.relu_grad_(dy, y, team.map)
    return array_module(dy).multiply(dy, y > 0, out=dy)


def bn_train_forward(x2d, gamma, beta, eps, relu, *, out=None, stats_out=None, residual=None, team=SERIAL):
    """Normalize with this batch's statistics; returns (y2d, mean, var, inv_std), all (C,)."""
    if (fused := _fused(x2d)) is not None:
        return fused.bn_train_forward(x2d, gamma, beta, eps, relu, out=out, stats_out=stats_out,
                                      residual=residual)
    if _host_bf16(x2d):     # the sum in float32 too, one rounding at the end as on the device
        y, *stats = bn_train_forward(_wide(x2d), gamma, beta, eps, relu, stats_out=stats_out,
                                     residual=_wide(residual), team=team)
        return (_narrow(y, out), *stats)
    plain_relu = relu and residual is None
    host = host_math(x2d, gamma, beta)
    if host is not None:
        y, *stats = host.bn_train_forward(x2d, gamma, beta, eps, plain_relu, out, team.map)
    else:
        y, *stats = xp_bn_train_forward(x2d, gamma, beta, eps, plain_relu, out=out)
    if residual is not None:
        add_residual_(y, residual, relu, team)
    return (y, *_store(stats_out, stats))


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


def bn_infer_forward(x2d, gamma, beta, mean, var, eps, relu, *, out=None, residual=None, team=SERIAL):
    """Normalize with given statistics (evaluation mode)."""
    if (fused := _fused(x2d)) is not None:
        return fused.bn_infer_forward(x2d, gamma, beta, mean, var, eps, relu, out=out, residual=residual)
    if _host_bf16(x2d):
        return _narrow(bn_infer_forward(_wide(x2d), gamma, beta, mean, var, eps, relu,
                                        residual=_wide(residual), team=team), out)
    plain_relu = relu and residual is None
    host = host_math(x2d, gamma, beta, mean, var)
    if host is not None:
        y = host.bn_infer_forward(x2d, gamma, beta, mean, var, eps, plain_relu, out, team.map)
    else:
        y = xp_bn_infer_forward(x2d, gamma, beta, mean, var, eps, plain_relu, out=out)
    return y if residual is None else add_residual_(y, residual, relu, team)


def xp_bn_infer_forward(x2d, gamma, beta, mean, var, eps, relu, *, out=None):
    """bn_infer_forward in NumPy/CuPy expressions."""
    xp = array_module(x2d)
    scale = gamma / xp.sqrt(var + eps)
    y = xp.multiply(x2d, scale, out=out)
    y += beta - mean * scale
    if relu:
        xp.maximum(y, 0, out=y)
    return y


def bn_backward(dy2d, x2d, y2d, gamma, mean, inv_std, relu, *, out=None, grads_out=None, gate=False,
                team=SERIAL):
    """Gradients of bn_train_forward: returns (dx2d, dgamma, dbeta).

    With g the gradient after the ReLU mask and xc = x - mean:
      dbeta = sum g,  dgamma = inv_std * sum(g * xc),
      dx = gamma*inv_std * (g - dbeta/M - xc * inv_std^2 * sum(g * xc)/M).
    `gate`: g = dy2d * (y2d > 0) is first left in dy2d (see the module's docstring).
    """
    if gate and (relu or out is dy2d):
        raise ValueError("bn_backward: gate leaves the gated gradient in dy2d; it takes relu=False "
                         "and an `out` other than dy2d")
    if (fused := _fused(dy2d)) is not None:
        return fused.bn_backward(dy2d, x2d, y2d, gamma, mean, inv_std, relu, out=out, grads_out=grads_out,
                                 gate=gate)
    if gate:
        relu_grad_(dy2d, y2d, team)
    if _host_bf16(dy2d):
        dx, *grads = bn_backward(_wide(dy2d), _wide(x2d), _wide(y2d), gamma, mean, inv_std, relu,
                                 grads_out=grads_out, team=team)
        return (_narrow(dx, out), *grads)
    host = host_math(dy2d, x2d, y2d, gamma, mean, inv_std)
    if host is not None:
        dx, *grads = host.bn_backward(dy2d, x2d, y2d, gamma, mean, inv_std, relu, out, team.map)
    else:
        dx, *grads = xp_bn_backward(dy2d, x2d, y2d, gamma, mean, inv_std, relu, out=out)
    return (dx, *_store(grads_out, grads))


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
