"""FP16 for the communication path: pack float32 into float16 with a scale, and back.

The recipe all-reduces gradients in FP16 and computes in FP32. A scale (the loss scale, or
1/N folded in early) keeps small gradients above float16's subnormal range:

    h = pack_fp16(grads[a:b], scale)          # half(x * scale), round to nearest even
    x = unpack_fp16(h, 1 / scale, out=...)    # float(h) / scale

Generic in the array module: a fused CUDA kernel (engine.cuda_ops) on CuPy arrays, NumPy on
the host. Both multiply in float32 and round once to float16, to nearest even with overflow
to infinity, so the two paths agree bit for bit.
"""
from __future__ import annotations

import numpy as np


def _is_numpy(a) -> bool:
    return isinstance(a, np.ndarray)


def _out(out, like, dtype, name):
    if out is None:
        return np.empty(like.shape, dtype)
    if out.dtype != dtype or out.shape != like.shape:
        raise ValueError(f"precision: {name} needs out of dtype {np.dtype(dtype).name} and shape "
                         f"{like.shape}, got {out.dtype} {out.shape}")
    return out


def _convert(name, a, scale, out, src, dst, host_op):
    """`name` of engine.cuda_ops on a CuPy array; on a NumPy one, host_op(a, float32 scale,
    out) into `out` (a `dst` array of a's shape, allocated when None). `a` must be `src`."""
    if a.dtype != src:
        raise TypeError(f"precision: {name} takes {np.dtype(src).name}, got {a.dtype}")
    if not _is_numpy(a):
        from . import cuda_ops
        return getattr(cuda_ops, name)(a, scale, out)
    out = _out(out, a, dst, name)
    host_op(a, np.float32(scale), out)
    return out


def _pack_host(x, scale, h):
    # The ufunc multiplies in float32, then casts the result to float16 once; overflow to
    # infinity is the defined result (a loss-scale controller looks for it), not an error.
    with np.errstate(over="ignore"):
        np.multiply(x, scale, out=h, dtype=np.float32, casting="unsafe")


def _unpack_host(h, scale, x):
    np.multiply(h, scale, out=x, dtype=np.float32)


def pack_fp16(x, scale: float = 1.0, out=None):
    """float16(x * scale) for a float32 array x; `out` a float16 array of x's shape."""
    return _convert("pack_fp16", x, scale, out, np.float32, np.float16, _pack_host)


def unpack_fp16(h, scale: float = 1.0, out=None):
    """float32(h) * scale for a float16 array h; `out` a float32 array of h's shape."""
    return _convert("unpack_fp16", h, scale, out, np.float16, np.float32, _unpack_host)
