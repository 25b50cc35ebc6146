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


def pack_fp16(x, scale: float = 1.0, out=None):
    """float16(x * scale) for a float32 array x; `out` a float16 array of x's shape."""
    if x.dtype != np.float32:
        raise TypeError(f"precision: pack_fp16 takes float32, got {x.dtype}")
    if not _is_numpy(x):
        from . import cuda_ops
        return cuda_ops.pack_fp16(x, scale, out)
    h = _out(out, x, np.float16, "pack_fp16")
    # The ufunc multiplies in float32, then casts the result to float16 once; overflow to
    # infinity is the defined result (a loss-scale controller looks for it), not an error.
    with np.errstate(over="ignore"):
        np.multiply(x, np.float32(scale), out=h, dtype=np.float32, casting="unsafe")
    return h


def unpack_fp16(h, scale: float = 1.0, out=None):
    """float32(h) * scale for a float16 array h; `out` a float32 array of h's shape."""
    if h.dtype != np.float16:
        raise TypeError(f"precision: unpack_fp16 takes float16, got {h.dtype}")
    if not _is_numpy(h):
        from . import cuda_ops
        return cuda_ops.unpack_fp16(h, scale, out)
    x = _out(out, h, np.float32, "unpack_fp16")
    np.multiply(h, np.float32(scale), out=x, dtype=np.float32)
    return x
