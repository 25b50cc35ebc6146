# cython: language_level=3
"""engine.hostmath: the host build of kernels/recipe_math.cuh, the CPU twin of every kernel.

The same __host__ __device__ header that NVRTC compiles into the CUDA kernels is compiled
here by the host C compiler, so the CPU path and the GPU path run one formula. Every
function releases the GIL and works in place on contiguous NumPy arrays.

Optimizer updates (in place on flat float32 slices; g float32 or float16; mask uint8 or None):
    hybrid_update(w, d, m, g, mask, eta, a_sgd, a_rms, mu1, mu2, eps, wd, gscale)
    sgd_update(w, d, g, mask, eta, mu1, wd, gscale)
Batch norm over x2d (rows, C), float32, the signatures of engine.batchnorm, plus `run`
(how to split the rows over threads; see `serial`):
    bn_train_forward(x2d, gamma, beta, eps, relu, out=None, run=serial) -> (y2d, mean, var, inv_std)
    bn_backward(dy2d, x2d, y2d, gamma, mean, inv_std, relu, out=None, run=serial) -> (dx2d, dgamma, dbeta)
    bn_infer_forward(x2d, gamma, beta, mean, var, eps, relu, out=None, run=serial) -> y2d
im2col of NHWC float32 x into col (N, Ho, Wo, K, K, C), zero padding p, stride s:
    im2col(x, col, k, s, p, run=serial)
Max pool over NHWC float32 (window k, stride s, padding p), and its gradient into dx:
    maxpool_forward(x, y, k, s, p, run=serial)
    maxpool_backward(x, dy, dx, k, s, p, run=serial)
The end of a residual block and its gradient, in place:
    add_relu_(y, s, run=serial)      y = relu(y + s)
    relu_grad_(dy, y, run=serial)    dy *= (y > 0)
"""
import numpy as np

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t


cdef extern from "hostmath_loops.h" nogil:
    ctypedef struct rm_coef:
        float eta, a_sgd, a_rms, mu1, mu2, eps, wd, gscale
    void hm_hybrid_update(float *w, float *d, float *m, const float *g32, const uint16_t *g16,
                          const uint8_t *mask, int64_t n, rm_coef c)
    void hm_sgd_update(float *w, float *d, const float *g32, const uint16_t *g16,
                       const uint8_t *mask, int64_t n, rm_coef c)
    void hm_bn_pilot_mean(const float *x, int64_t rows, int64_t C, float *pilot)
    int hm_bn_shifted_sums(const float *x, int64_t rows, int64_t C, const float *shift,
                           double *s1, double *s2)
    void hm_bn_apply(const float *x, float *y, int64_t rows, int64_t C,
                     const float *scale, const float *shift, int relu)
    int hm_bn_grad_sums(const float *dy, const float *x, const float *y, int64_t rows, int64_t C,
                        const float *mean, const float *inv_std, int relu,
                        double *sum_dy, double *sum_dyxh)
    void hm_bn_dx(const float *dy, const float *x, const float *y, int64_t rows, int64_t C,
                  const float *gamma, const float *mean, const float *inv_std, int relu,
                  const float *mean_dy, const float *mean_dyxh, float *dx)
    void hm_add_relu(float *y, const float *s, int64_t n)
    void hm_relu_grad(float *dy, const float *y, int64_t n)
    void hm_im2col(const float *x, float *col, int64_t n, int64_t h, int64_t w, int64_t C,
                   int64_t k, int64_t s, int64_t p, int64_t ho, int64_t wo)
    void hm_maxpool_forward(const float *x, float *y, int64_t n, int64_t h, int64_t w, int64_t C,
                            int64_t k, int64_t s, int64_t p, int64_t ho, int64_t wo, int32_t *arg)
    void hm_maxpool_backward(const float *x, const float *dy, float *dx, int64_t n, int64_t h,
                             int64_t w, int64_t C, int64_t k, int64_t s, int64_t p, int64_t ho,
                             int64_t wo, int32_t *arg, float *best)
    int HM_BLOCK_ROWS
    float rm_bn_scale(float gamma, float inv_std)
    float rm_bn_shift(float beta, float mean, float scale)
    float rm_bn_inv_std(float var, float eps)


def _check(a, dtype, name, n=None, writable=False):
    """A clear error for the wrong array, instead of a silent copy or a crash."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"hostmath: {name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"hostmath: {name} must be {np.dtype(dtype).name}, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"hostmath: {name} must be C-contiguous")
    if writable and not a.flags.writeable:
        raise ValueError(f"hostmath: {name} must be writable")
    if n is not None and a.size != n:
        raise ValueError(f"hostmath: {name} has {a.size} elements, expected {n}")


cdef float *_f32(a, name, n=None, writable=False) except NULL:
    _check(a, np.float32, name, n, writable)
    return <float *> <size_t> a.ctypes.data


# The arrays of one optimizer update over n = w.size elements, checked, as C pointers.
cdef struct _UpdateArgs:
    float *w
    float *d
    float *m                    # NULL for SGD, which keeps no squared-gradient average
    const float *g32            # exactly one of g32 / g16 is set, by g's dtype
    const uint16_t *g16
    const uint8_t *mask         # NULL without a mask: weight decay on every element


cdef _UpdateArgs _update_args(w, d, m, g, mask, bint with_m) except *:
    """Check w, d, m (with_m: the hybrid step's; m is not looked at otherwise), g and mask,
    in this order, naming the bad one."""
    cdef int64_t n = w.size
    cdef _UpdateArgs a
    a.w = _f32(w, "w", n, True)
    a.d = _f32(d, "d", n, True)
    a.m = _f32(m, "m", n, True) if with_m else NULL
    if isinstance(g, np.ndarray) and g.dtype == np.float16:
        _check(g, np.float16, "g", n)
        a.g16 = <const uint16_t *> <size_t> g.ctypes.data
        a.g32 = NULL
    else:
        _check(g, np.float32, "g", n)
        a.g32 = <const float *> <size_t> g.ctypes.data
        a.g16 = NULL
    if mask is None:
        a.mask = NULL
    else:
        _check(mask, np.uint8, "mask", n)
        a.mask = <uint8_t *> <size_t> mask.ctypes.data
    return a


def hybrid_update(w, d, m, g, mask, float eta, float a_sgd, float a_rms, float mu1, float mu2,
                  float eps, float wd, float gscale):
    """The hybrid RMSprop-to-SGD step over one flat range, in place on w, d, m."""
    cdef int64_t n = w.size
    cdef rm_coef c
    c.eta, c.a_sgd, c.a_rms, c.mu1, c.mu2, c.eps, c.wd, c.gscale = eta, a_sgd, a_rms, mu1, mu2, eps, wd, gscale
    cdef _UpdateArgs a = _update_args(w, d, m, g, mask, True)
    with nogil:
        hm_hybrid_update(a.w, a.d, a.m, a.g32, a.g16, a.mask, n, c)


def sgd_update(w, d, g, mask, float eta, float mu1, float wd, float gscale):
    """Momentum SGD (d = mu1*d - g, w += eta*d) over one flat range, in place on w, d."""
    cdef int64_t n = w.size
    cdef rm_coef c
    c.eta, c.a_sgd, c.a_rms, c.mu1, c.mu2, c.eps, c.wd, c.gscale = eta, 1.0, 0.0, mu1, 0.0, 0.0, wd, gscale
    cdef _UpdateArgs a = _update_args(w, d, None, g, mask, False)
    with nogil:
        hm_sgd_update(a.w, a.d, a.g32, a.g16, a.mask, n, c)


def serial(fn, n, grain, size):
    """The `run` argument's default: fn(0, n) on this thread, as a one-chunk list.

    Every BN and ReLU function below takes `run(fn, n, grain, size)`, which calls fn(lo, hi)
    on chunks [lo, hi) of range(n) (inner bounds at multiples of `grain`; `size` elements
    in all), possibly on several threads at once, and returns the results in chunk order:
    engine.parallel.Team.map.
    The loops release the GIL, so the chunks run in parallel."""
    return [fn(0, n)]


def _rows_channels(x2d, name):
    if getattr(x2d, "ndim", 0) != 2:
        raise ValueError(f"hostmath: {name} must be 2-D (N*H*W, C), got shape {getattr(x2d, 'shape', None)}")
    return x2d.shape[0], x2d.shape[1]


cdef size_t _addr(a):
    return <size_t> a.ctypes.data


def _output(out, like, name):
    """`out` when it can take the result (checked), else a new array like `like`."""
    if out is None:
        return np.empty_like(like)
    _f32(out, name, like.size, True)
    return out


def _scale_shift(gamma, beta, mean, inv_std):
    # Typed views keep the per-channel loop in C: through Python indexing it cost ~0.5 us
    # per channel, 1 ms for a 2048-channel BN whatever the batch.
    cdef int64_t c, C = gamma.size
    scale = np.empty(C, np.float32)
    shift = np.empty(C, np.float32)
    cdef const float[::1] g = gamma, b = beta, mu = mean, inv = inv_std
    cdef float[::1] sc = scale, sh = shift
    for c in range(C):
        sc[c] = rm_bn_scale(g[c], inv[c])
        sh[c] = rm_bn_shift(b[c], mu[c], sc[c])
    return scale, shift


def _inv_std(var, float eps):
    cdef int64_t c, C = var.size
    inv_std = np.empty(C, np.float32)
    cdef const float[::1] v = var
    cdef float[::1] inv = inv_std
    for c in range(C):
        inv[c] = rm_bn_inv_std(v[c], eps)
    return inv_std


def _apply(x2d, scale, shift, bint relu, out, run):
    cdef int64_t rows, C
    rows, C = _rows_channels(x2d, "x2d")
    y = _output(out, x2d, "out")
    _f32(x2d, "x2d")
    _f32(scale, "scale", C)
    _f32(shift, "shift", C)
    cdef size_t px = _addr(x2d), py = _addr(y), ps = _addr(scale), pt = _addr(shift)

    def chunk(int64_t lo, int64_t hi):
        with nogil:
            hm_bn_apply(<const float *> px + lo * C, <float *> py + lo * C, hi - lo, C,
                        <const float *> ps, <const float *> pt, relu)
    run(chunk, rows, HM_BLOCK_ROWS, rows * C)
    return y


def bn_train_forward(x2d, gamma, beta, float eps, bint relu, out=None, run=serial):
    """Training-mode BN (+ReLU) over (N*H*W, C): statistics of this batch, biased variance.
    Returns (y2d, mean, var, inv_std); y2d is `out` when given."""
    cdef int64_t rows, C
    rows, C = _rows_channels(x2d, "x2d")
    _f32(x2d, "x2d")
    _check(gamma, np.float32, "gamma", C)
    _check(beta, np.float32, "beta", C)
    pilot = np.empty(C, np.float32)
    cdef size_t px = _addr(x2d), pp = _addr(pilot)
    with nogil:
        hm_bn_pilot_mean(<const float *> px, rows, C, <float *> pp)

    def chunk(int64_t lo, int64_t hi):
        sums = np.zeros((2, C), np.float64)
        cdef size_t ps = _addr(sums)
        cdef int status
        with nogil:
            status = hm_bn_shifted_sums(<const float *> px + lo * C, hi - lo, C, <const float *> pp,
                                        <double *> ps, <double *> ps + C)
        if status:
            raise MemoryError("hostmath.bn_train_forward: scratch allocation failed")
        return sums
    s1, s2 = np.sum(run(chunk, rows, HM_BLOCK_ROWS, rows * C), axis=0) / max(rows, 1)
    mean = (pilot + s1).astype(np.float32)
    var = np.maximum(s2 - s1 * s1, 0.0).astype(np.float32)
    inv_std = _inv_std(var, eps)
    scale, shift = _scale_shift(gamma, beta, mean, inv_std)
    return _apply(x2d, scale, shift, relu, out, run), mean, var, inv_std


def bn_infer_forward(x2d, gamma, beta, mean, var, float eps, bint relu, out=None, run=serial):
    """Inference-mode BN (+ReLU) with given per-channel statistics."""
    C = _rows_channels(x2d, "x2d")[1]
    for a, name in ((gamma, "gamma"), (beta, "beta"), (mean, "mean"), (var, "var")):
        _check(a, np.float32, name, C)
    scale, shift = _scale_shift(gamma, beta, mean, _inv_std(var, eps))
    return _apply(x2d, scale, shift, relu, out, run)


def bn_backward(dy2d, x2d, y2d, gamma, mean, inv_std, bint relu, out=None, run=serial):
    """Training-mode BN backward through the fused ReLU: (dx2d, dgamma, dbeta). dx2d is
    `out` when given, which may be dy2d itself."""
    cdef int64_t rows, C
    rows, C = _rows_channels(x2d, "x2d")
    n = rows * C
    dx = _output(out, x2d, "out")
    for a, name in ((dy2d, "dy2d"), (x2d, "x2d"), (y2d, "y2d")):
        _f32(a, name, n)
    for a, name in ((gamma, "gamma"), (mean, "mean"), (inv_std, "inv_std")):
        _f32(a, name, C)
    cdef size_t pdy = _addr(dy2d), px = _addr(x2d), py = _addr(y2d), pdx = _addr(dx)
    cdef size_t pg = _addr(gamma), pm = _addr(mean), pinv = _addr(inv_std)

    def sums(int64_t lo, int64_t hi):
        part = np.zeros((2, C), np.float64)
        cdef size_t ps = _addr(part)
        cdef int status
        with nogil:
            status = hm_bn_grad_sums(<const float *> pdy + lo * C, <const float *> px + lo * C,
                                     <const float *> py + lo * C, hi - lo, C, <const float *> pm,
                                     <const float *> pinv, relu, <double *> ps, <double *> ps + C)
        if status:
            raise MemoryError("hostmath.bn_backward: scratch allocation failed")
        return part
    sum_dy, sum_dyxh = np.sum(run(sums, rows, HM_BLOCK_ROWS, rows * C), axis=0)
    dbeta, dgamma = sum_dy.astype(np.float32), sum_dyxh.astype(np.float32)
    inv_rows = np.float32(1.0 / rows if rows else 0.0)
    mean_dy, mean_dyxh = dbeta * inv_rows, dgamma * inv_rows
    cdef size_t pmdy = _addr(mean_dy), pmdyxh = _addr(mean_dyxh)

    def grad_x(int64_t lo, int64_t hi):
        with nogil:
            hm_bn_dx(<const float *> pdy + lo * C, <const float *> px + lo * C, <const float *> py + lo * C,
                     hi - lo, C, <const float *> pg, <const float *> pm, <const float *> pinv, relu,
                     <const float *> pmdy, <const float *> pmdyxh, <float *> pdx + lo * C)
    run(grad_x, rows, HM_BLOCK_ROWS, rows * C)
    return dx, dgamma, dbeta


ctypedef void (*_inplace_loop)(float *a, const float *b, int64_t n) noexcept nogil


cdef _inplace(_inplace_loop loop, a, b, names, run):
    """a = loop(a, b) elementwise in place, over float32 arrays of one size, in chunks."""
    cdef int64_t n = a.size
    _f32(a, names[0], None, True)
    _f32(b, names[1], n)
    cdef size_t pa = _addr(a), pb = _addr(b)

    def chunk(int64_t lo, int64_t hi):
        with nogil:
            loop(<float *> pa + lo, <const float *> pb + lo, hi - lo)
    run(chunk, n, 1024, n)
    return a


def add_relu_(y, s, run=serial):
    """y = relu(y + s) in place (float32, same size), one pass."""
    return _inplace(hm_add_relu, y, s, ("y", "s"), run)


def relu_grad_(dy, y, run=serial):
    """dy *= (y > 0) in place (float32, same size), one pass."""
    return _inplace(hm_relu_grad, dy, y, ("dy", "y"), run)


def _window_shapes(x, y, int64_t k, int64_t s, int64_t p, name, extra_dims=0):
    """Checked NHWC x and its windowed output y (N, Ho, Wo, [K, K,] C): Ho and Wo must be
    what the window gives, as the C loops take them from y. Returns (x.shape, Ho, Wo)."""
    if getattr(x, "ndim", 0) != 4 or getattr(y, "ndim", 0) != 4 + extra_dims \
            or x.shape[0] != y.shape[0] or x.shape[3] != y.shape[3 + extra_dims]:
        raise ValueError(f"hostmath.{name}: x must be NHWC and y (N, Ho, Wo, {'K, K, ' * (extra_dims > 0)}C) "
                         f"with x's N and C, got {getattr(x, 'shape', None)} and {getattr(y, 'shape', None)}")
    if not (k >= 1 and s >= 1 and p >= 0):
        raise ValueError(f"hostmath.{name}: need k >= 1, s >= 1 and p >= 0, got k={k} s={s} p={p}")
    out = tuple((size + 2 * p - k) // s + 1 for size in x.shape[1:3])
    if y.shape[1:3] != out:
        raise ValueError(f"hostmath.{name}: {x.shape[1]}x{x.shape[2]} with k={k} s={s} p={p} gives "
                         f"{out[0]}x{out[1]}, y is {y.shape[1]}x{y.shape[2]}")
    _f32(x, "x")
    _f32(y, "y", None, True)
    return x.shape, y.shape[1], y.shape[2]


def _pool_shapes(x, y, int64_t k, int64_t s, int64_t p, name):
    """_window_shapes, and every window must hold an input element (the C loops index x
    through each window's argmax)."""
    if p >= k:
        raise ValueError(f"hostmath.{name}: need p < k, got k={k} p={p}")
    return _window_shapes(x, y, k, s, p, name)


def maxpool_forward(x, y, int64_t k, int64_t s, int64_t p, run=serial):
    """y = max pool of NHWC x (window k, stride s, padding p that never wins), into y."""
    (n, h, w, C), ho, wo = _pool_shapes(x, y, k, s, p, "maxpool_forward")
    cdef int64_t h_ = h, w_ = w, C_ = C, ho_ = ho, wo_ = wo
    cdef size_t px = _addr(x), py = _addr(y)

    def chunk(int64_t lo, int64_t hi):
        arg = np.empty(C_, np.int32)
        cdef size_t pa = _addr(arg)
        with nogil:
            hm_maxpool_forward(<const float *> px + lo * h_ * w_ * C_, <float *> py + lo * ho_ * wo_ * C_,
                               hi - lo, h_, w_, C_, k, s, p, ho_, wo_, <int32_t *> pa)
    run(chunk, n, 1, x.size)
    return y


def maxpool_backward(x, dy, dx, int64_t k, int64_t s, int64_t p, run=serial):
    """dx (overwritten) = the gradient of maxpool_forward: each dy goes to the first
    position of its window, in (kh, kw) order, that holds the max."""
    (n, h, w, C), ho, wo = _pool_shapes(x, dy, k, s, p, "maxpool_backward")
    _f32(dx, "dx", x.size, True)
    cdef int64_t h_ = h, w_ = w, C_ = C, ho_ = ho, wo_ = wo
    cdef size_t px = _addr(x), pdy = _addr(dy), pdx = _addr(dx)

    def chunk(int64_t lo, int64_t hi):
        arg = np.empty(C_, np.int32)
        best = np.empty(C_, np.float32)
        cdef size_t pa = _addr(arg), pb = _addr(best)
        cdef int64_t off = lo * h_ * w_ * C_
        with nogil:
            hm_maxpool_backward(<const float *> px + off, <const float *> pdy + lo * ho_ * wo_ * C_,
                                <float *> pdx + off, hi - lo, h_, w_, C_, k, s, p, ho_, wo_,
                                <int32_t *> pa, <float *> pb)
    run(chunk, n, 1, x.size)
    return dx


def im2col(x, col, int64_t k, int64_t s, int64_t p, run=serial):
    """col (N, Ho, Wo, K, K, C) = the zero-padded patches of NHWC x, no padded copy made."""
    _window_shapes(x, col, k, s, p, "im2col", extra_dims=2)
    if col.shape[3:5] != (k, k):
        raise ValueError(f"hostmath.im2col: col must be (N, Ho, Wo, {k}, {k}, C), got {col.shape}")
    cdef int64_t n = x.shape[0], h = x.shape[1], w = x.shape[2], C = x.shape[3]
    cdef int64_t ho = col.shape[1], wo = col.shape[2]
    cdef size_t px = _addr(x), pc = _addr(col)

    def chunk(int64_t lo, int64_t hi):
        with nogil:
            hm_im2col(<const float *> px + lo * h * w * C, <float *> pc + lo * ho * wo * k * k * C,
                      hi - lo, h, w, C, k, s, p, ho, wo)
    run(chunk, n, 1, col.size)
    return col
