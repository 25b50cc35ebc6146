"""Fused CUDA kernels of the recipe: loader and launchers (CuPy, NVRTC).

Each kernels/*.cu file is compiled once per process by `cupy.RawModule` with NVRTC and
the fixed option tuple NVRTC_OPTIONS, to which CuPy adds its own (include dirs, -ftz=true,
-arch; tests/kernel_check.py compiles with exactly that assembly, for sm_70/sm_80/sm_90, in the
normal test suite). CuPy is imported lazily: this module imports, and its launchers can be
inspected, without CuPy.

Every launcher casts each argument to the C type of the kernel's parameter (np.float32 for
float, np.int64 for long long, np.int32 for int); a test checks each launcher's arguments
against the extern "C" signature parsed from the source. The functions take CuPy arrays;
activations (x, y, dy, dx) are float32 or bfloat16 (ml_dtypes.bfloat16, one type per call),
statistics, BN parameters and their gradients always float32. A launcher writes its results
into the arrays it is given (out, stats_out, grads_out, possibly views into larger
buffers), else into new ones; the BN partials live in one reused scratch buffer per device.

    hybrid_update(w, d, m, g, mask, scal, mu1, mu2, eps, wd, w_lp=None)  # scal: float32 device
    sgd_update(w, d, g, mask, scal, mu1, wd, w_lp=None)                  # array of SCALARS
    bn_train_forward(x2d, gamma, beta, eps, relu, *, out=None, stats_out=None, residual=None)
        -> (y2d, mean, var, inv_std)                     # stats_out = (mean, var, inv_std)
    bn_backward(dy2d, x2d, y2d, gamma, mean, inv_std, relu, *, out=None, grads_out=None, gate=False)
        -> (dx2d, dgamma, dbeta)                         # grads_out = (dgamma, dbeta)
    bn_infer_forward(x2d, gamma, beta, mean, var, eps, relu, *, out=None, residual=None) -> y2d
    im2col(x, k, s, p, out) -> out              # NHWC x -> col (N, Ho, Wo, K, K, C); engine.conv
    col2im(dcol, dx, s, p) -> dx                # a gather, float32 sums, no atomics
    maxpool_forward(x, y, k, s, p) -> y         # engine.layers.MaxPool
    maxpool_backward(x, dy, dx, k, s, p) -> dx  # a gather; ties to the first max in (kh, kw) order
    softmax_xent(logits, labels, smoothing, *, dlogits=None, out=None, scratch=None)
        -> (loss, dlogits, hits)     # engine.loss; loss, hits: 0-d float32 views of out (2,)
    pack_fp16(x, scale, out=None) -> float16 array;  unpack_fp16(h, scale, out=None) -> float32
                                                                                   # engine.precision
The optimizer kernels read eta, a_sgd, a_rms, gscale from `scal` on the device (so a
captured CUDA graph replays with the values written there before the replay) and, with
w_lp, write the bfloat16 copy of the updated weights in the same pass; their CPU twins in
engine.hostmath take the same scalars as floats. The BN launchers have the signatures of
engine.batchnorm's (which dispatches device arrays here).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import ml_dtypes
import numpy as np

from engine.backend import array_module, device_of

# The CUDA sources: kernels/ at the top of the source tree, engine/kernels where a wheel
# installed them (pyproject.toml maps that package's data to the top-level folder).
_HERE = Path(__file__).resolve().parent
KERNELS_DIR = _HERE / "kernels" if (_HERE / "kernels").is_dir() else _HERE.parent / "kernels"

# The one option tuple of every kernel compile. No fast math: sqrtf and division stay
# correctly rounded, as in the host build the CPU path uses. CuPy appends -ftz=true after
# these (and NVRTC keeps the last), so float32 subnormals flush to zero on the device:
# docs/kernels.md says what that changes.
NVRTC_OPTIONS = ("--std=c++17", f"--include-path={KERNELS_DIR}")

THREADS = 256
MAX_BLOCKS = 4096               # grid-stride loops cover the rest
BN_BLOCK = (32, 8)              # RM_BN_TX, RM_BN_TY of kernels/recipe_math.cuh
BN_ROWS_PER_THREAD = 32         # rows a reduction thread walks before another block row pays off
BN_MAX_BLOCKS = 1024

BF16 = np.dtype(ml_dtypes.bfloat16)   # bfloat16 arrays: rm_bf16 in the kernels

_modules: dict = {}      # file name -> cupy.RawModule
_functions: dict = {}    # (device, file name, kernel) -> its cupy Function, fetched once per device


def kernel_source(filename: str) -> str:
    """The code handed to NVRTC for kernels/<filename> (tests/kernel_check.py compiles this too).

    CuPy's kernel cache keys on the code and the options, not on included files: the digest
    of the shared headers, appended as a comment, makes an edited header a new cache entry."""
    digest = hashlib.sha256(b"".join(h.read_bytes() for h in sorted(KERNELS_DIR.glob("*.cuh")))).hexdigest()
    return (KERNELS_DIR / filename).read_text() + f"\n// kernels/*.cuh sha256 {digest}\n"


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

# The slots of the per-step scalar array `scal` (enum SCAL_* of optimizer_update.cu).
SCALARS = ("eta", "a_sgd", "a_rms", "gscale")


def _update_inputs(w, state, g, mask, scal, w_lp):
    n = w.size
    for a, name in ((w, "w"), *state):
        _check(a, np.float32, name, n)
    if g.dtype not in (np.float32, np.float16):
        raise TypeError(f"cuda_ops: g must be float32 or float16, got {g.dtype}")
    _check(g, g.dtype, "g", n)
    if mask is not None:
        _check(mask, np.uint8, "mask", n)
    _check(scal, np.float32, "scal", len(SCALARS))
    if w_lp is not None:
        _check(w_lp, BF16, "w_lp", n)
    return n, "f16" if g.dtype == np.float16 else "f32"


def hybrid_update(w, d, m, g, mask, scal, mu1, mu2, eps, wd, w_lp=None):
    """The hybrid step over a flat range, in place on w, d, m, and w_lp = bf16(w) when given
    (one launch); eta, a_sgd, a_rms, gscale are read on the device from `scal` (SCALARS)."""
    n, variant = _update_inputs(w, ((d, "d"), (m, "m")), g, mask, scal, w_lp)
    if n:
        _launch("optimizer_update.cu", f"hybrid_update_{variant}", _grid_1d(-(-n // 4)), (THREADS,),
                (w, d, m, g, mask, w_lp, np.int64(n), scal, *_f32(mu1, mu2, eps, wd)))


def sgd_update(w, d, g, mask, scal, mu1, wd, w_lp=None):
    """Momentum SGD over a flat range, in place on w, d, and w_lp = bf16(w) when given (one
    launch); eta and gscale are read on the device from `scal` (the SCALARS layout)."""
    n, variant = _update_inputs(w, ((d, "d"),), g, mask, scal, w_lp)
    if n:
        _launch("optimizer_update.cu", f"sgd_update_{variant}", _grid_1d(-(-n // 4)), (THREADS,),
                (w, d, g, mask, w_lp, np.int64(n), scal, *_f32(mu1, wd)))


# ---- batch norm ---------------------------------------------------------------------

# Kernel-name suffix of each activation storage type; statistics and parameters are float32.
_BN_STORAGE = {np.dtype(np.float32): "f32", BF16: "bf16"}


def _bn_activation(a, name, like=None):
    """Check a (rows, C) activation of a storage type the kernels take (that of `like`, when
    given, and its shape); returns the kernel-name suffix."""
    if a.ndim != 2:
        raise ValueError(f"cuda_ops: {name} must be 2-D (N*H*W, C), got shape {a.shape}")
    if like is not None and (a.shape != like.shape or a.dtype != like.dtype):
        raise ValueError(f"cuda_ops: {name} is {a.dtype} {a.shape}, expected {like.dtype} {like.shape}")
    if a.dtype not in _BN_STORAGE:
        raise TypeError(f"cuda_ops: {name} must be float32 or bfloat16, got {a.dtype}")
    _check(a, a.dtype, name)
    return _BN_STORAGE[a.dtype]


def _bn_grid(rows: int, C: int) -> tuple:
    gx = max(1, -(-C // BN_BLOCK[0]))      # C = 0: one idle block column, not an empty grid
    gy = max(1, min(-(-rows // (BN_BLOCK[1] * BN_ROWS_PER_THREAD)), BN_MAX_BLOCKS // gx))
    return gx, gy


def _channel_vectors(C, **arrays):
    for name, a in arrays.items():
        _check(a, np.float32, name, C)


def _channel_outputs(xp, C, given, names):
    """The float32 (C,) arrays a finalize kernel writes: `given` (checked), or new ones."""
    if given is None:
        return tuple(xp.empty((len(names), C), np.float32))
    if len(given) != len(names):
        raise ValueError(f"cuda_ops: expected {len(names)} arrays ({', '.join(names)}), got {len(given)}")
    _channel_vectors(C, **dict(zip(names, given)))
    return tuple(given)


def _out(xp, like, out):
    if out is None:
        return xp.empty_like(like)
    _check(out, like.dtype, "out", like.size)
    return out


# One float32 scratch buffer per device for the BN partials and the folded scale/shift,
# grown as needed and reused by every call, so no BN call allocates it. Safe because every
# BN launch of the engine is ordered on one stream (the current stream of the process's one
# device): a call's kernels start only after the previous call's kernels that used the
# buffer have finished. A grown buffer replaces the old one, which CuPy's pool frees in
# that same stream order; a CUDA graph captured after warm-up (which sized the buffer)
# keeps the pointer it baked in.
_bn_scratch_buffers: dict = {}     # device (None: the host, in emulation) -> float32 buffer
_bn_arrival_counters: dict = {}    # device -> uint32 zeros, one per grid column (grid_reduce.cuh)


def _per_device(cache, xp, size, make):
    """cache's buffer for the current device, replaced by make(size) when missing or smaller."""
    device = device_of(xp)
    buf = cache.get(device)
    if buf is None or buf.size < size:
        buf = cache[device] = make(size)
    return buf


def _bn_scratch(xp, *sizes):
    """Consecutive float32 views of the given sizes into this device's BN scratch."""
    buf = _per_device(_bn_scratch_buffers, xp, sum(sizes), lambda n: xp.empty(n, np.float32))
    ends = np.cumsum(sizes)
    return tuple(buf[end - size:end] for size, end in zip(sizes, ends))


def _bn_arrivals(xp, columns: int):
    """This device's grid-column arrival counters: zeros, made once (and again when a grid
    needs more); every reducing kernel leaves the counters it used at zero again."""
    return _per_device(_bn_arrival_counters, xp, columns, lambda n: xp.zeros(n, np.uint32))


def bn_train_forward(x2d, gamma, beta, eps, relu, *, out=None, stats_out=None, residual=None):
    """Training-mode BN (+ReLU): Welford partials and their Chan merge, fused apply (2 launches).
    x2d (and out, residual) float32 or bfloat16; stats_out = (mean, var, inv_std), float32
    (C,) arrays the merge kernel writes (new ones when None); `residual`, a residual block's
    shortcut, is added in the apply before the ReLU."""
    variant = _bn_activation(x2d, "x2d")
    if residual is not None:
        _bn_activation(residual, "residual", like=x2d)
    rows, C = x2d.shape
    _channel_vectors(C, gamma=gamma, beta=beta)
    xp = array_module(x2d)
    grid = _bn_grid(rows, C)
    part_n, part_mean, part_m2, scale, shift = _bn_scratch(xp, *(3 * [grid[1] * C]), C, C)
    mean, var, inv_std = _channel_outputs(xp, C, stats_out, ("mean", "var", "inv_std"))
    y = _out(xp, x2d, out)
    _launch("bn_forward.cu", f"bn_stats_{variant}", grid, BN_BLOCK,
            (x2d, np.int64(rows), np.int32(C), part_n, part_mean, part_m2, _bn_arrivals(xp, grid[0]),
             gamma, beta, np.float32(eps), mean, var, inv_std, scale, shift))
    _launch("bn_forward.cu", f"bn_forward_apply_{variant}", _grid_1d(-(-rows * C // 4)), (THREADS,),
            (x2d, residual, y, np.int64(rows * C), np.int32(C), scale, shift, np.int32(bool(relu))))
    return y, mean, var, inv_std


def bn_backward(dy2d, x2d, y2d, gamma, mean, inv_std, relu, *, out=None, grads_out=None, gate=False):
    """Training-mode BN backward through the fused ReLU (2 launches); out may be dy2d.
    dy2d, x2d, y2d (and out) one storage type, float32 or bfloat16; grads_out = (dgamma,
    dbeta), float32 (C,) arrays the finalize kernel writes (views into the flat gradient
    buffer; new arrays when None). `gate` (relu False): dy2d is first gated in place by
    y2d > 0, y2d being a residual block's output (the gradient its shortcut receives),
    in the reduce kernel; out must then be another buffer."""
    variant = _bn_activation(x2d, "x2d")
    rows, C = x2d.shape
    if (relu or gate) and y2d is None:
        raise ValueError("cuda_ops: bn_backward with relu or gate needs y2d (the output it masks by)")
    if gate and (relu or out is dy2d):
        raise ValueError("cuda_ops: bn_backward's gate leaves the gated gradient in dy2d: it takes "
                         "relu=False and an `out` other than dy2d")
    for a, name in ((dy2d, "dy2d"), (y2d, "y2d")):
        if a is not None:
            _bn_activation(a, name, like=x2d)
    _channel_vectors(C, gamma=gamma, mean=mean, inv_std=inv_std)
    xp = array_module(x2d)
    grid = _bn_grid(rows, C)
    part_dy, part_dyxh = _bn_scratch(xp, grid[1] * C, grid[1] * C)
    dgamma, dbeta = _channel_outputs(xp, C, grads_out, ("dgamma", "dbeta"))
    dx = _out(xp, x2d, out)
    relu_flag = np.int32(bool(relu))
    _launch("bn_backward.cu", f"bn_backward_reduce_{variant}", grid, BN_BLOCK,
            (dy2d, x2d, y2d, dy2d if gate else None, np.int64(rows), np.int32(C), mean, inv_std, relu_flag,
             part_dy, part_dyxh, _bn_arrivals(xp, grid[0]), dgamma, dbeta))
    _launch("bn_backward.cu", f"bn_backward_dx_{variant}", _grid_1d(-(-rows * C // 4)), (THREADS,),
            (dy2d, x2d, y2d, np.int64(rows * C), np.int32(C), gamma, mean, inv_std, dgamma, dbeta,
             np.float32(1.0 / max(rows, 1)), relu_flag, dx))
    return dx, dgamma, dbeta


def bn_infer_forward(x2d, gamma, beta, mean, var, eps, relu, *, out=None, residual=None):
    """Inference-mode BN (+ReLU) with given statistics (1 launch); x2d (and out, residual)
    float32 or bfloat16; `residual` is added before the ReLU, as in bn_train_forward."""
    variant = _bn_activation(x2d, "x2d")
    if residual is not None:
        _bn_activation(residual, "residual", like=x2d)
    rows, C = x2d.shape
    _channel_vectors(C, gamma=gamma, beta=beta, mean=mean, var=var)
    y = _out(array_module(x2d), x2d, out)
    _launch("bn_infer.cu", f"bn_infer_{variant}", _grid_1d(-(-rows * C // 4)), (THREADS,),
            (x2d, residual, y, np.int64(rows * C), np.int32(C), gamma, beta, mean, var, np.float32(eps),
             np.int32(bool(relu))))
    return y


# ---- convolution gather, max pool ----------------------------------------------------

_INT_MAX = 2**31 - 1


def _activation(a, name, ndim=None, like=None):
    """Check an activation array of a storage type the kernels take (float32 or bfloat16;
    that of `like`, when given), C-contiguous, of `ndim` dimensions; returns the kernel-name
    suffix."""
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"cuda_ops: {name} must be {ndim}-D, got shape {a.shape}")
    if a.dtype not in _BN_STORAGE:
        raise TypeError(f"cuda_ops: {name} must be float32 or bfloat16, got {a.dtype}")
    if like is not None and a.dtype != like.dtype:
        raise TypeError(f"cuda_ops: {name} is {a.dtype}, expected {like.dtype} (that of the input)")
    _check(a, a.dtype, name)
    return _BN_STORAGE[a.dtype]


def _shape(a, name, shape):
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"cuda_ops: {name} has shape {tuple(a.shape)}, expected {tuple(shape)}")


def _window(name, x_shape, k, s, p):
    """(N, H, W, C, Ho, Wo) of a K x K window, stride s, padding p over NHWC x_shape; the
    kernels index within one image in int (H*W*C, Ho*Wo*K*K*C < 2^31)."""
    n, h, w, c = (int(v) for v in x_shape)
    k, s, p = int(k), int(s), int(p)
    if not (k >= 1 and s >= 1 and p >= 0):
        raise ValueError(f"cuda_ops: {name} needs k >= 1, s >= 1 and p >= 0, got k={k} s={s} p={p}")
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"cuda_ops: {name}: a {h}x{w} input is smaller than the {k}x{k} window (p={p})")
    if max(h * w * c, ho * wo * k * k * c) > _INT_MAX:
        raise ValueError(f"cuda_ops: {name}: one image of {h}x{w}x{c} (k={k}) is too large for the kernels' "
                         "int offsets")
    return n, h, w, c, ho, wo


def _address(a) -> int:
    """The device (CuPy) or host (NumPy, in emulation) address of a's first element."""
    if isinstance(a, np.ndarray):
        return a.ctypes.data
    return a.data.ptr


def _geometry(h, w, c, k, s, p, ho, wo):
    return tuple(np.int32(v) for v in (h, w, c, k, s, p, ho, wo))


def im2col(x, k, s, p, out):
    """out (N, Ho, Wo, K, K, C) = the zero-padded K x K patches of NHWC x, stride s, padding
    p (one launch, a bit copy: 16 bytes per thread when C * itemsize % 16 == 0 and both
    arrays are 16-byte aligned, else one element); returns out."""
    variant = _activation(x, "x", 4)
    n, h, w, c, ho, wo = _window("im2col", x.shape, k, s, p)
    _activation(out, "out", 6, like=x)
    _shape(out, "out", (n, ho, wo, k, k, c))
    total = out.size
    vec = c * x.itemsize % 16 == 0 and (_address(x) | _address(out)) % 16 == 0
    if total:
        _launch("im2col.cu", f"im2col_{variant}", _grid_1d(total // (16 // x.itemsize) if vec else total),
                (THREADS,), (x, out, np.int64(total), *_geometry(h, w, c, k, s, p, ho, wo), np.int32(vec)))
    return out


def col2im(dcol, dx, s, p):
    """dx (N, H, W, C) = the sum, in float32, of the patch gradients dcol (N, Ho, Wo, K, K,
    C) over the positions they were gathered from (padding dropped), written once in dx's
    type (one launch, a gather: deterministic, no atomics); returns dx."""
    variant = _activation(dcol, "dcol", 6)
    _activation(dx, "dx", 4, like=dcol)
    k = int(dcol.shape[3])
    if dcol.shape[4] != k:
        raise ValueError(f"cuda_ops: dcol must be (N, Ho, Wo, K, K, C), got shape {tuple(dcol.shape)}")
    n, h, w, c, ho, wo = _window("col2im", dx.shape, k, s, p)
    _shape(dcol, "dcol", (n, ho, wo, k, k, c))
    if dx.size:
        _launch("im2col.cu", f"col2im_{variant}", _grid_1d(dx.size), (THREADS,),
                (dcol, dx, np.int64(dx.size), *_geometry(h, w, c, k, s, p, ho, wo)))
    return dx


def maxpool_forward(x, y, k, s, p):
    """y (N, Ho, Wo, C) = the max of each K x K window of NHWC x (stride s; padding p never
    wins; NaN is a max; -inf for a window that sees only padding), one launch; returns y."""
    variant = _activation(x, "x", 4)
    n, h, w, c, ho, wo = _window("maxpool_forward", x.shape, k, s, p)
    _activation(y, "y", 4, like=x)
    _shape(y, "y", (n, ho, wo, c))
    if y.size:
        _launch("maxpool.cu", f"maxpool_forward_{variant}", _grid_1d(y.size), (THREADS,),
                (x, y, np.int64(y.size), *_geometry(h, w, c, k, s, p, ho, wo)))
    return y


def maxpool_backward(x, dy, dx, k, s, p):
    """dx (N, H, W, C, overwritten) = the gradient of maxpool_forward: each dy goes to the
    first position of its window, in (kh, kw) order, that holds the max (found again from
    x); one launch, a gather summing in float32; returns dx."""
    variant = _activation(x, "x", 4)
    n, h, w, c, ho, wo = _window("maxpool_backward", x.shape, k, s, p)
    _activation(dy, "dy", 4, like=x)
    _shape(dy, "dy", (n, ho, wo, c))
    _activation(dx, "dx", 4, like=x)
    _shape(dx, "dx", x.shape)
    if dx.size:
        _launch("maxpool.cu", f"maxpool_backward_{variant}", _grid_1d(dx.size), (THREADS,),
                (x, dy, dx, np.int64(dx.size), *_geometry(h, w, c, k, s, p, ho, wo)))
    return dx


# ---- loss ----------------------------------------------------------------------------

XENT_MAX_THREADS = 256          # SOFTMAX_XENT_THREADS of kernels/softmax_xent.cu


def _xent_block(items: int) -> tuple:
    """A power of two from 32 (a warp) to XENT_MAX_THREADS covering `items` if it can: the
    kernels' shared-memory trees need a power of two."""
    t = 32
    while t < min(items, XENT_MAX_THREADS):
        t *= 2
    return (t,)


def softmax_xent(logits, labels, smoothing, *, dlogits=None, out=None, scratch=None):
    """Softmax cross-entropy with label smoothing e = `smoothing` of float32 logits (N, K)
    and int64 labels (N,), engine/loss.py's definition, in two launches: (loss, dlogits, hits)
    with loss the batch mean and hits the top-1 count (NumPy's argmax tie rule: the first
    index of the row max), both 0-d float32 views of `out` (a float32 array of 2, written by
    the second kernel), and dlogits (N, K) float32 = (softmax - q) / N. `scratch`: a float32
    array of 2N (the per-row losses and hits); out and scratch default to one new buffer.
    A label outside [0, K) is never read through: its row's loss and gradient are NaN (the
    loss then fails engine.metrics.check_finite) and its hit 0. The batch sums run in a fixed
    order: the same inputs give the same bits on every run."""
    if logits.ndim != 2:
        raise ValueError(f"cuda_ops: logits must be 2-D (N, classes), got shape {tuple(logits.shape)}")
    _check(logits, np.float32, "logits")
    n, k = (int(v) for v in logits.shape)
    if k < 1 or k > _INT_MAX:
        raise ValueError(f"cuda_ops: logits need 1 to 2**31 - 1 classes, got {k}")
    _check(labels, np.int64, "labels", n)
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"cuda_ops: smoothing must be in [0, 1), got {smoothing}")
    xp = array_module(logits)
    if dlogits is None:
        dlogits = xp.empty((n, k), np.float32)
    _check(dlogits, np.float32, "dlogits")
    _shape(dlogits, "dlogits", (n, k))
    if out is None and scratch is None:
        buf = xp.empty(2 + 2 * n, np.float32)
        out, scratch = buf[:2], buf[2:]
    if out is None:
        out = xp.empty(2, np.float32)
    if scratch is None:
        scratch = xp.empty(2 * n, np.float32)
    _check(out, np.float32, "out", 2)
    _check(scratch, np.float32, "scratch", 2 * n)
    row_loss, row_hit = scratch[:n], scratch[n:]
    e = float(smoothing)
    _launch("softmax_xent.cu", "softmax_xent_rows", (max(1, min(n, MAX_BLOCKS)),), _xent_block(k),
            (logits, labels, np.int64(n), np.int32(k), *_f32(e, 1.0 - e, e / k), dlogits, row_loss, row_hit))
    _launch("softmax_xent.cu", "softmax_xent_reduce", (1,), _xent_block(n),
            (row_loss, row_hit, np.int64(n), out))
    return out[0:1].reshape(()), dlogits, out[1:2].reshape(())


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
