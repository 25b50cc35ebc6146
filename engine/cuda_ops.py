"""Fused CUDA kernels of the recipe: loader and launchers (CuPy, NVRTC).

Each engine/kernels/*.cu file is compiled once per process by `cupy.RawModule` with NVRTC and
the fixed option tuple NVRTC_OPTIONS, to which CuPy adds its own (include dirs, -ftz=true,
-arch; engine.kernel_check compiles with exactly that assembly, for sm_70/sm_80/sm_90, in the
normal test suite). CuPy is imported lazily: this module imports, and its launchers can be
inspected, without CuPy.

Every launcher casts each argument to the C type of the kernel's parameter (np.float32 for
float, np.int64 for long long, np.int32 for int); a test checks each launcher's arguments
against the extern "C" signature parsed from the source. The functions take CuPy arrays
and have the signatures of their CPU twins:

    hybrid_update(w, d, m, g, mask, eta, a_sgd, a_rms, mu1, mu2, eps, wd, gscale)   # engine.hostmath
    sgd_update(w, d, g, mask, eta, mu1, wd, gscale)
    bn_train_forward(x2d, gamma, beta, eps, relu, *, out=None) -> (y2d, mean, var, inv_std)
    bn_backward(dy2d, x2d, y2d, gamma, mean, inv_std, relu, *, out=None) -> (dx2d, dgamma, dbeta)
    bn_infer_forward(x2d, gamma, beta, mean, var, eps, relu, *, out=None) -> y2d   # engine.batchnorm
    pack_fp16(x, scale, out=None) -> float16 array;  unpack_fp16(h, scale, out=None) -> float32
                                                                                   # engine.precision
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from engine.backend import array_module

KERNELS_DIR = Path(__file__).resolve().parent / "kernels"

# The one option tuple of every kernel compile. No fast math: sqrtf and division stay
# correctly rounded, as in the host build the CPU path uses. CuPy appends -ftz=true after
# these (and NVRTC keeps the last), so float32 subnormals flush to zero on the device:
# README, "Kernels", says what that changes.
NVRTC_OPTIONS = ("--std=c++17", f"--include-path={KERNELS_DIR}")

THREADS = 256
MAX_BLOCKS = 4096               # grid-stride loops cover the rest
BN_BLOCK = (32, 8)              # RM_BN_TX, RM_BN_TY of engine/kernels/recipe_math.cuh
BN_ROWS_PER_THREAD = 32         # rows a reduction thread walks before another block row pays off
BN_MAX_BLOCKS = 1024

_modules: dict = {}      # file name -> cupy.RawModule
_functions: dict = {}    # (device, file name, kernel) -> its cupy Function, fetched once per device


def kernel_source(filename: str) -> str:
    """The code handed to NVRTC for engine/kernels/<filename> (engine.kernel_check compiles this too).

    CuPy's kernel cache keys on the code and the options, not on included files: the digest
    of the shared header, appended as a comment, makes an edited header a new cache entry."""
    digest = hashlib.sha256((KERNELS_DIR / "recipe_math.cuh").read_bytes()).hexdigest()
    return (KERNELS_DIR / filename).read_text() + f"\n// recipe_math.cuh sha256 {digest}\n"


def _module(filename: str):
    mod = _modules.get(filename)
    if mod is None:
        import cupy
        mod = cupy.RawModule(code=kernel_source(filename), options=NVRTC_OPTIONS, backend="nvrtc")
        _modules[filename] = mod
    return mod


def _function(filename: str, kernel: str):
    """The kernel's function object, looked up by name once per device: a function belongs
    to the CUDA context of the device that was current when CuPy loaded the module. The
    engine binds one device per process; a test or a tool that switches devices gets the
    current device's function, never another context's."""
    import cupy
    key = (cupy.cuda.runtime.getDevice(), filename, kernel)
    fn = _functions.get(key)
    if fn is None:
        fn = _functions[key] = _module(filename).get_function(kernel)
    return fn


def _launch(filename: str, kernel: str, grid: tuple, block: tuple, args: tuple) -> None:
    """The single place where a kernel runs (tests replace it to record the arguments)."""
    _function(filename, kernel)(grid, block, args)


def _grid_1d(n_items: int) -> tuple:
    return (max(1, min(-(-n_items // THREADS), MAX_BLOCKS)),)


def _check(a, dtype, name, size=None):
    if a.dtype != dtype:
        raise TypeError(f"cuda_ops: {name} must be {np.dtype(dtype).name}, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"cuda_ops: {name} must be C-contiguous")
    if size is not None and a.size != size:
        raise ValueError(f"cuda_ops: {name} has {a.size} elements, expected {size}")


def _f32(*values):
    return tuple(np.float32(v) for v in values)


# ---- optimizer ----------------------------------------------------------------------

def _update_inputs(w, state, g, mask):
    n = w.size
    for a, name in ((w, "w"), *state):
        _check(a, np.float32, name, n)
    if g.dtype not in (np.float32, np.float16):
        raise TypeError(f"cuda_ops: g must be float32 or float16, got {g.dtype}")
    _check(g, g.dtype, "g", n)
    if mask is not None:
        _check(mask, np.uint8, "mask", n)
    return n, "f16" if g.dtype == np.float16 else "f32"


def hybrid_update(w, d, m, g, mask, eta, a_sgd, a_rms, mu1, mu2, eps, wd, gscale):
    """The hybrid step over a flat range, in place on w, d, m (one launch)."""
    n, variant = _update_inputs(w, ((d, "d"), (m, "m")), g, mask)
    if n:
        _launch("optimizer_update.cu", f"hybrid_update_{variant}", _grid_1d(-(-n // 4)), (THREADS,),
                (w, d, m, g, mask, np.int64(n), *_f32(eta, a_sgd, a_rms, mu1, mu2, eps, wd, gscale)))


def sgd_update(w, d, g, mask, eta, mu1, wd, gscale):
    """Momentum SGD over a flat range, in place on w, d (one launch)."""
    n, variant = _update_inputs(w, ((d, "d"),), g, mask)
    if n:
        _launch("optimizer_update.cu", f"sgd_update_{variant}", _grid_1d(-(-n // 4)), (THREADS,),
                (w, d, g, mask, np.int64(n), *_f32(eta, mu1, wd, gscale)))


# ---- batch norm ---------------------------------------------------------------------

def _bn_shape(x2d, name="x2d"):
    if x2d.ndim != 2:
        raise ValueError(f"cuda_ops: {name} must be 2-D (N*H*W, C), got shape {x2d.shape}")
    _check(x2d, np.float32, name)
    return x2d.shape


def _bn_grid(rows: int, C: int) -> tuple:
    gx = max(1, -(-C // BN_BLOCK[0]))      # C = 0: one idle block column, not an empty grid
    gy = max(1, min(-(-rows // (BN_BLOCK[1] * BN_ROWS_PER_THREAD)), BN_MAX_BLOCKS // gx))
    return gx, gy


def _channel_vectors(C, **arrays):
    for name, a in arrays.items():
        _check(a, np.float32, name, C)


def _out(xp, like, out):
    if out is None:
        return xp.empty_like(like)
    _check(out, np.float32, "out", like.size)
    return out


def bn_train_forward(x2d, gamma, beta, eps, relu, *, out=None):
    """Training-mode BN (+ReLU): Welford partials, Chan merge, fused apply (3 launches)."""
    rows, C = _bn_shape(x2d)
    _channel_vectors(C, gamma=gamma, beta=beta)
    xp = array_module(x2d)
    grid = _bn_grid(rows, C)
    part = xp.empty((3, grid[1], C), np.float32)
    mean, var, inv_std, scale, shift = xp.empty((5, C), np.float32)
    y = _out(xp, x2d, out)
    _launch("bn_forward.cu", "bn_stats_partial", grid, BN_BLOCK,
            (x2d, np.int64(rows), np.int32(C), part[0], part[1], part[2]))
    _launch("bn_forward.cu", "bn_stats_finalize", _grid_1d(C), (THREADS,),
            (part[0], part[1], part[2], np.int32(grid[1]), np.int32(C), gamma, beta, np.float32(eps),
             mean, var, inv_std, scale, shift))
    _launch("bn_forward.cu", "bn_forward_apply", _grid_1d(-(-rows * C // 4)), (THREADS,),
            (x2d, y, np.int64(rows * C), np.int32(C), scale, shift, np.int32(bool(relu))))
    return y, mean, var, inv_std


def bn_backward(dy2d, x2d, y2d, gamma, mean, inv_std, relu, *, out=None):
    """Training-mode BN backward through the fused ReLU (3 launches); out may be dy2d."""
    rows, C = _bn_shape(x2d)
    if relu and y2d is None:
        raise ValueError("cuda_ops: bn_backward with relu needs y2d (the forward output)")
    for a, name in ((dy2d, "dy2d"), (y2d, "y2d")):
        if a is not None and _bn_shape(a, name) != (rows, C):
            raise ValueError(f"cuda_ops: {name} has shape {a.shape}, expected {(rows, C)}")
    _channel_vectors(C, gamma=gamma, mean=mean, inv_std=inv_std)
    xp = array_module(x2d)
    grid = _bn_grid(rows, C)
    part = xp.empty((2, grid[1], C), np.float32)
    dgamma, dbeta = xp.empty((2, C), np.float32)
    dx = _out(xp, x2d, out)
    relu_flag = np.int32(bool(relu))
    _launch("bn_backward.cu", "bn_backward_reduce", grid, BN_BLOCK,
            (dy2d, x2d, y2d, np.int64(rows), np.int32(C), mean, inv_std, relu_flag, part[0], part[1]))
    _launch("bn_backward.cu", "bn_backward_finalize", _grid_1d(C), (THREADS,),
            (part[0], part[1], np.int32(grid[1]), np.int32(C), dgamma, dbeta))
    _launch("bn_backward.cu", "bn_backward_dx", _grid_1d(-(-rows * C // 4)), (THREADS,),
            (dy2d, x2d, y2d, np.int64(rows * C), np.int32(C), gamma, mean, inv_std, dgamma, dbeta,
             np.float32(1.0 / max(rows, 1)), relu_flag, dx))
    return dx, dgamma, dbeta


def bn_infer_forward(x2d, gamma, beta, mean, var, eps, relu, *, out=None):
    """Inference-mode BN (+ReLU) with given statistics (1 launch)."""
    rows, C = _bn_shape(x2d)
    _channel_vectors(C, gamma=gamma, beta=beta, mean=mean, var=var)
    y = _out(array_module(x2d), x2d, out)
    _launch("bn_infer.cu", "bn_infer", _grid_1d(-(-rows * C // 4)), (THREADS,),
            (x2d, y, np.int64(rows * C), np.int32(C), gamma, beta, mean, var, np.float32(eps),
             np.int32(bool(relu))))
    return y


# ---- FP16 communication ---------------------------------------------------------------

def _fp16_convert(kernel, a, name, src, dst, scale, out):
    """One launch of fp16_pack.cu's `kernel`: `a` (named `name`, dtype `src`) into `out`, a
    `dst` array of a's size (allocated when None), four elements per thread."""
    _check(a, src, name)
    b = array_module(a).empty(a.shape, dst) if out is None else out
    _check(b, dst, "out", a.size)
    if a.size:
        _launch("fp16_pack.cu", kernel, _grid_1d(-(-a.size // 4)), (THREADS,),
                (a, b, np.int64(a.size), np.float32(scale)))
    return b


def pack_fp16(x, scale, out=None):
    """half(x * scale), one launch; `out` a float16 array of x's size."""
    return _fp16_convert("pack_fp16", x, "x", np.float32, np.float16, scale, out)


def unpack_fp16(h, scale, out=None):
    """float(h) * scale, one launch; `out` a float32 array of h's size."""
    return _fp16_convert("unpack_fp16", h, "h", np.float16, np.float32, scale, out)
