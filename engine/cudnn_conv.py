"""Convolutions through cuDNN on the GPU (issue 17, phase 2): descriptors, algorithm choice,
workspace and the start-up self-check, independent of the layers (Conv2d calls in).

One `CudnnConvolutions` per job and device. A convolution is named by a `ConvShape`
(N, H, W, Cin, Cout, K, stride, pad); with the object's precision (engine.cudnn.PRECISIONS:
data dtype, compute dtype, math type) that is the cache key. Per key, once for the job:

* the descriptors: TensorDesc x (N, H, W, Cin) and y (N, Ho, Wo, Cout), NHWC packed;
  FilterDesc w (Cout, K, K, Cin), cuDNN's NHWC filter layout KRSC = the engine's OHWI;
  ConvDesc (pad, stride, cross-correlation, compute dtype, math type set explicitly).
  cudnnGetConvolution2dForwardOutputDim must agree with engine.conv.out_size, or the key is
  refused (a wrong descriptor must never run);
* one algorithm per direction (forward, backward data, backward filter): the fastest that
  cudnnFind...AlgorithmEx timed on real buffers (search="find"), or the heuristic's first
  (search="heuristic"), among those that succeeded and whose workspace, the larger of what
  the search reported and what cudnnGet...WorkspaceSize says, fits `workspace_cap_bytes`.

The workspace is ONE buffer, as large as the largest need among all chosen algorithms,
allocated through the injected `alloc(nbytes)` (CuPy's memory pool by default); it grows
only when a later key needs more, never above the cap. The Find searches get a buffer of
the cap's size (so that they may try everything that fits), allocated once per `prepare`
and dropped afterwards.

The three calls take arrays that expose a raw device pointer (`.data.ptr` for CuPy;
`pointer=` overrides how it is read: the tests pass NumPy arrays and `a.ctypes.data`, since
their stand-in libcudnn works on host memory) and run on the handle's stream:
    forward(x, w, y)                          y  = conv(x, w)
    backward_data(dy, w, dx, accumulate)      dx = conv^T(dy, w)  (+ dx with accumulate)
    backward_filter(x, dy, dw)                dw = dconv/dw (x, dy)

Self-check (`self_check(shapes, run_im2col)`): each distinct shape runs forward and both
backward directions through cuDNN and through `run_im2col(shape, x, w, dy) -> (y, dx, dw)`
(the engine's im2col path) on the same fresh random inputs. A shape whose relative error
in norm, ||cudnn - im2col|| / ||im2col||, exceeds `error_bound` for a direction, or whose
call raises, falls back to im2col; one warning line names every such shape and why.

The bound (`error_bound(direction, shape, precision)`). A sum of m products accumulated in
float32 has a relative error below m * 2^-24 (the classical worst case gamma_m ~ m*u, u =
2^-24, relative to sum |x_i w_i|); each implementation carries that, so two of them differ
by up to twice as much. m is the length of the direction's sums: K*K*Cin for forward,
K*K*Cout for backward data, N*Ho*Wo for backward filter. On top come the precision's
per-element roundings, which do not grow with m: tf32 rounds both operands of every
product to 10 mantissa bits (2^-11 each, so 2 * 2^-11 per product), bf16 rounds the
outputs to 8 significant bits (2^-8 between neighbours: the two implementations may
round to either). So
    bound = 2 * (m * 2^-24 + r),   r = 0 (fp32), 2 * 2^-11 (tf32), 2^-8 (bf16),
capped at 2^-5. The worst case is pessimistic by about sqrt(m) for random inputs (the
rounding errors are independent, so they add like a random walk: a correct cuDNN differs
from im2col by ~sqrt(m) * 2^-24, or ~2^-11 for tf32, ~2^-9 for bf16); the cap keeps the
check able to see a 3% error where the worst-case term alone would allow more (backward
filter of a large batch: N*Ho*Wo = 400 000 already gives 0.05). A wrong descriptor (a
swapped layout, pad or stride) errs by O(1).

Errors: `CudnnConvError`, whose message starts with the shape and the direction.
"""
from __future__ import annotations

import sys
from collections import namedtuple

import numpy as np

from engine.conv import out_size
from engine.errors import EngineError

DIRECTIONS = ("forward", "backward_data", "backward_filter")
ROUNDING = {"fp32": 0.0, "tf32": 2 * 2.0 ** -11, "bf16": 2.0 ** -8}
ACCUMULATION_U = 2.0 ** -24         # the compute dtype is float32 in every precision
BOUND_CAP = 2.0 ** -5
DEFAULT_WORKSPACE_CAP = 64 << 20


class ConvShape(namedtuple("ConvShape", "n h w cin cout k stride pad")):
    """One convolution's geometry: input (N, H, W, Cin), weight (Cout, K, K, Cin)."""
    __slots__ = ()

    @property
    def out(self):
        """(N, Ho, Wo, Cout)."""
        return (self.n, out_size(self.h, self.k, self.stride, self.pad),
                out_size(self.w, self.k, self.stride, self.pad), self.cout)

    @property
    def x(self):
        return (self.n, self.h, self.w, self.cin)

    @property
    def weight(self):
        return (self.cout, self.k, self.k, self.cin)

    def __str__(self):
        return (f"conv {self.k}x{self.k}/{self.stride} pad {self.pad} "
                f"{self.n}x{self.h}x{self.w}x{self.cin} -> {self.cout}")


class CudnnConvError(EngineError):
    """A cuDNN convolution could not be set up or run; names the shape and direction.
    `cause` is the underlying error (a CudnnError, say), or None."""

    def __init__(self, shape, direction, reason, cause=None):
        self.shape, self.direction, self.reason, self.cause = shape, direction, str(reason), cause
        super().__init__(f"{shape}, {direction}: {reason}")


Algo = namedtuple("Algo", "algo name workspace time_ms")
Algo.__doc__ = "The algorithm chosen for one direction: code, name, workspace in bytes, Find's time (ms)."

SelfCheck = namedtuple("SelfCheck", "cudnn fallback errors warning")
SelfCheck.__doc__ = ("The self-check's outcome: `cudnn` the set of shapes that passed, `fallback` "
                     "{shape: reason} for the rest, `errors` {shape: {direction: relative error}} "
                     "as measured, `warning` the one line naming the fallbacks (None when none).")


def error_bound(direction, shape, precision):
    """The self-check's bound on ||cudnn - im2col|| / ||im2col|| (module docstring)."""
    ho, wo = shape.out[1:3]
    m = {"forward": shape.k * shape.k * shape.cin,
         "backward_data": shape.k * shape.k * shape.cout,
         "backward_filter": shape.n * ho * wo}[direction]
    return min(2.0 * (m * ACCUMULATION_U + ROUNDING[precision]), BOUND_CAP)


def device_pointer(a):
    """A CuPy array's device pointer (`a.data.ptr`)."""
    try:
        return int(a.data.ptr)
    except AttributeError:
        raise TypeError(f"no device pointer in a {type(a).__name__}: pass CuPy arrays, or give "
                        "CudnnConvolutions a `pointer=` that reads one") from None


def route_convolutions(layers, precision, workspace_bytes, search="find", warn=None):
    """Send the Conv2d `layers` of a model on this GPU through one CudnnConvolutions (each
    shape self-checked against the layer's im2col path at first sight, a failure said once
    through `warn`, by default a line on stderr); returns it."""
    convs = CudnnConvolutions(gpu_handle_factory(), precision, workspace_bytes, search=search)
    say = warn if warn is not None else (lambda message: print(message, file=sys.stderr, flush=True))
    for layer in layers:
        layer.cudnn = (convs, say)
    return convs


def gpu_handle_factory(stream=None):
    """A handle_factory for CuPy: makes sure the libraries that cuDNN's engines dlopen by
    soname (libcublasLt, libnvrtc: engine.cudnn's docstring) are already in the process, by
    having CuPy load cuBLAS and NVRTC, then returns a factory of a Handle on `stream` (a
    cupy.cuda.Stream; None: CuPy's current stream when the handle is made)."""
    def make():
        import cupy
        from engine import cudnn
        cupy.cuda.device.get_cublas_handle()      # libcublas.so, and libcublasLt.so with it
        cupy.cuda.nvrtc.getVersion()              # libnvrtc.so
        s = stream if stream is not None else cupy.cuda.get_current_stream()
        return cudnn.Handle(s.ptr)
    return make


def _cupy_alloc(nbytes):
    import cupy
    return cupy.empty(int(nbytes), dtype=cupy.uint8)       # from CuPy's memory pool


class _Plan:
    __slots__ = ("x", "w", "y", "conv", "algos")


class CudnnConvolutions:
    """Descriptors, algorithms and workspace of every convolution of a job, and the calls.

    handle_factory()       -> an engine.cudnn.Handle on the stream the calls go to; called
                              once, at the first use
    precision              "fp32" | "tf32" | "bf16" (engine.cudnn.PRECISIONS)
    workspace_cap_bytes    no algorithm needing more is chosen; the workspace never exceeds it
    search                 "find" (cudnnFind...AlgorithmEx, timed) | "heuristic"
    alloc(nbytes)          a device buffer of at least nbytes bytes (default: CuPy's pool)
    pointer(array)         its device pointer (default: .data.ptr)
    xp                     the array module of the self-check's and the searches' buffers
                           (default: CuPy)
    api                    the binding (default: engine.cudnn; the tests wrap it)
    """

    def __init__(self, handle_factory, precision="fp32", workspace_cap_bytes=DEFAULT_WORKSPACE_CAP,
                 search="find", alloc=None, pointer=device_pointer, xp=None, api=None):
        if api is None:
            from engine import cudnn as api
        if precision not in api.PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(api.PRECISIONS)}")
        if search not in ("find", "heuristic"):
            raise ValueError(f"search must be 'find' or 'heuristic', got {search!r}")
        if int(workspace_cap_bytes) < 0:
            raise ValueError(f"workspace cap must be >= 0 bytes, got {workspace_cap_bytes}")
        self.api = api
        self.precision = precision
        self.dtype, self.compute, self.math = api.PRECISIONS[precision]
        self.cap = int(workspace_cap_bytes)
        self.search = search
        self._handle_factory = handle_factory
        self._handle = None
        self._alloc = _cupy_alloc if alloc is None else alloc
        self._pointer = pointer
        self._xp = xp
        self._plans = {}
        self._workspace = None
        self.workspace_bytes = 0
        self._search_buffer = None
        self.searches = 0          # how many keys were searched (the cache's misses)
        self.fallback = {}         # shape -> why it failed the self-check
        self._admitted = set()     # shapes admit() has self-checked

    # ---- set-up --------------------------------------------------------------------------

    @property
    def xp(self):
        if self._xp is None:
            import cupy
            self._xp = cupy
        return self._xp

    @property
    def handle(self):
        if self._handle is None:
            self._handle = self._handle_factory()
        return self._handle

    def key(self, shape):
        """The cache key: the geometry, the data dtype, the compute dtype and the math type."""
        return (ConvShape(*shape), self.dtype, self.compute, self.math)

    def algorithms(self, shape):
        """{direction: Algo} chosen for `shape` (searches it if not yet done)."""
        return dict(self._plan(ConvShape(*shape)).algos)

    def prepare(self, shapes):
        """Search every shape not yet cached, with one search buffer for all of them; then
        grow the workspace once to the largest need. Raises CudnnConvError on the first
        shape that fails (self_check catches per shape)."""
        try:
            for shape in dict.fromkeys(ConvShape(*s) for s in shapes):
                self._plan(shape, grow=False)
        finally:
            self._search_buffer = None
            self._grow()

    def _plan(self, shape, grow=True, buffers=None):
        key = self.key(shape)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        try:
            plan = self._search(shape, buffers)
        finally:
            if grow:
                self._search_buffer = None
        self._plans[key] = plan
        self.searches += 1
        if grow:
            self._grow()
        return plan

    def _descriptors(self, shape):
        api = self.api
        plan = _Plan()
        try:
            plan.x = api.TensorDesc(*shape.x, self.dtype)
            plan.y = api.TensorDesc(*shape.out, self.dtype)
            plan.w = api.FilterDesc(*shape.weight, self.dtype)
            plan.conv = api.ConvDesc(shape.pad, shape.stride, compute=self.compute, math=self.math)
            got = tuple(api.forward_output_dim(plan.conv, plan.x, plan.w))
        except Exception as e:
            raise CudnnConvError(shape, "descriptors", f"{type(e).__name__}: {e}", e) from e
        if got != shape.out:
            raise CudnnConvError(shape, "descriptors", f"cuDNN's output shape {got} is not ours {shape.out}")
        return plan

    def _search(self, shape, buffers):
        api, xp = self.api, self.xp
        plan = self._descriptors(shape)
        handle = self.handle
        ptr = self._pointer
        if self.search == "find":
            if buffers is None:
                dt = _np_dtype(self.dtype)
                x, w = xp.zeros(shape.x, dt), xp.zeros(shape.weight, dt)
                y, dx, dw = xp.zeros(shape.out, dt), xp.zeros(shape.x, dt), xp.zeros(shape.weight, dt)
                dy = y
            else:
                x, w, y, dy, dx, dw = buffers
            ws, wsb = self._search_workspace()
            args = {
                "forward": (api.find_forward_algorithms,
                            (handle, plan.x, ptr(x), plan.w, ptr(w), plan.conv, plan.y, ptr(y), ws, wsb)),
                "backward_data": (api.find_backward_data_algorithms,
                                  (handle, plan.w, ptr(w), plan.y, ptr(dy), plan.conv, plan.x, ptr(dx), ws, wsb)),
                "backward_filter": (api.find_backward_filter_algorithms,
                                    (handle, plan.x, ptr(x), plan.y, ptr(dy), plan.conv, plan.w, ptr(dw), ws, wsb)),
            }
        else:
            args = {
                "forward": (api.get_forward_algorithms, (handle, plan.x, plan.w, plan.conv, plan.y)),
                "backward_data": (api.get_backward_data_algorithms, (handle, plan.w, plan.y, plan.conv, plan.x)),
                "backward_filter": (api.get_backward_filter_algorithms, (handle, plan.x, plan.y, plan.conv, plan.w)),
            }
        sizes = {
            "forward": lambda a: api.forward_workspace_size(handle, plan.x, plan.w, plan.conv, plan.y, a),
            "backward_data": lambda a: api.backward_data_workspace_size(handle, plan.w, plan.y, plan.conv, plan.x, a),
            "backward_filter": lambda a: api.backward_filter_workspace_size(handle, plan.x, plan.y, plan.conv,
                                                                            plan.w, a),
        }
        plan.algos = {}
        for direction in DIRECTIONS:
            fn, fargs = args[direction]
            try:
                perfs = fn(*fargs)
            except Exception as e:
                raise CudnnConvError(shape, direction, f"algorithm search failed: {type(e).__name__}: {e}", e) from e
            plan.algos[direction] = self._choose(shape, direction, perfs, sizes[direction])
        return plan

    def _choose(self, shape, direction, perfs, size_of):
        """The fastest (Find) or first (heuristic) successful algorithm that fits the cap."""
        fitting, skipped = [], []
        for p in perfs:
            if p.status != 0:
                skipped.append(f"{p.name}: {p.status_name}")
                continue
            try:
                need = max(int(p.workspace), int(size_of(p.algo)))
            except Exception as e:            # cuDNN will not run it with these descriptors
                skipped.append(f"{p.name}: {type(e).__name__}: {e}")
                continue
            if need > self.cap:
                skipped.append(f"{p.name}: workspace {need} > cap {self.cap}")
                continue
            fitting.append(Algo(p.algo, p.name, need, p.time_ms))
        if not fitting:
            raise CudnnConvError(shape, direction, f"no algorithm within the workspace cap of {self.cap} bytes"
                                 f" ({'; '.join(skipped) or 'the search returned none'})")
        if self.search == "find":
            return min(fitting, key=lambda a: a.time_ms)
        return fitting[0]

    def _search_workspace(self):
        if self.cap == 0:
            return 0, 0
        if self._search_buffer is None:
            self._search_buffer = self._alloc(self.cap)
        return self._pointer(self._search_buffer), self.cap

    def _grow(self):
        need = max((a.workspace for p in self._plans.values() for a in p.algos.values()), default=0)
        if need > self.workspace_bytes:
            assert need <= self.cap
            self._workspace = None                # back to the pool before the larger one
            self._workspace = self._alloc(need)
            self.workspace_bytes = need

    def _ws(self, algo):
        if algo.workspace == 0 or self._workspace is None:
            return 0, 0
        return self._pointer(self._workspace), algo.workspace

    # ---- the calls -----------------------------------------------------------------------

    def _check(self, shape, direction, **arrays):
        if shape in self.fallback:
            raise CudnnConvError(shape, direction, f"failed the self-check ({self.fallback[shape]}): use im2col")
        expect = {"x": shape.x, "dx": shape.x, "w": shape.weight, "dw": shape.weight,
                  "y": shape.out, "dy": shape.out}
        for name, a in arrays.items():
            if tuple(a.shape) != expect[name]:
                raise CudnnConvError(shape, direction, f"{name} has shape {tuple(a.shape)}, expected {expect[name]}")
            if np.dtype(a.dtype).name != self.dtype:
                raise CudnnConvError(shape, direction, f"{name} is {np.dtype(a.dtype).name}, expected {self.dtype}")

    def _shape_of(self, x, w, stride, pad):
        n, h, wd, cin = x.shape
        cout, k, k2, cin2 = w.shape
        shape = ConvShape(n, h, wd, cin, cout, k, stride, pad)
        if k != k2 or cin != cin2:
            raise CudnnConvError(shape, "shapes", f"weight {tuple(w.shape)} is not (Cout, K, K, {cin})")
        return shape

    def _call(self, direction, call, x_like, w, stride, pad, arrays, args):
        """Check `arrays` for the shape of (x_like, w), then `call(handle, *args(plan, ptr,
        algo, workspace pointer, workspace bytes))` with the direction's chosen algorithm."""
        shape = self._shape_of(x_like, w, stride, pad)
        self._check(shape, direction, **arrays)
        plan = self._plan(shape)
        algo = plan.algos[direction]
        handle, arguments = self.handle, args(plan, self._pointer, algo.algo, *self._ws(algo))
        try:
            call(handle, *arguments)
        except Exception as e:
            raise CudnnConvError(shape, direction, f"{type(e).__name__}: {e}", e) from e

    def forward(self, x, w, y, stride, pad):
        """y = conv(x, w): x (N, H, W, Cin), w (Cout, K, K, Cin), y (N, Ho, Wo, Cout)."""
        self._call("forward", self.api.convolution_forward, x, w, stride, pad, dict(x=x, w=w, y=y),
                   lambda plan, ptr, algo, ws, nws: (plan.x, ptr(x), plan.w, ptr(w), plan.conv, algo,
                                                     plan.y, ptr(y), ws, nws, 1.0, 0.0))
        return y

    def backward_data(self, dy, w, dx, stride, pad, accumulate=False):
        """dx = conv^T(dy, w); with accumulate, dx += it (beta = 1)."""
        self._call("backward_data", self.api.convolution_backward_data, dx, w, stride, pad, dict(dy=dy, w=w, dx=dx),
                   lambda plan, ptr, algo, ws, nws: (plan.w, ptr(w), plan.y, ptr(dy), plan.conv, algo,
                                                     plan.x, ptr(dx), ws, nws, 1.0, 1.0 if accumulate else 0.0))
        return dx

    def backward_filter(self, x, dy, dw, stride, pad):
        """dw = the weight gradient of conv(x, .) for the output gradient dy (overwritten)."""
        self._call("backward_filter", self.api.convolution_backward_filter, x, dw, stride, pad,
                   dict(x=x, dy=dy, dw=dw),
                   lambda plan, ptr, algo, ws, nws: (plan.x, ptr(x), plan.y, ptr(dy), plan.conv, algo,
                                                     plan.w, ptr(dw), ws, nws, 1.0, 0.0))
        return dw

    # ---- the self-check ------------------------------------------------------------------

    def self_check(self, shapes, run_im2col, rng=None):
        """Run each distinct shape through cuDNN and `run_im2col(shape, x, w, dy) -> (y, dx, dw)`
        on the same fresh random inputs; see the module docstring. All shapes are searched
        first (one search buffer), the workspace is then allocated once at the largest need,
        then each shape is checked. Returns a SelfCheck; afterwards `uses_cudnn(shape)` is
        False for the shapes that fell back."""
        rng = np.random.default_rng() if rng is None else rng
        xp = self.xp
        dt = _np_dtype(self.dtype)
        shapes = list(dict.fromkeys(ConvShape(*s) for s in shapes))
        passed, fallback, errors = set(), {}, {}
        try:
            for shape in shapes:
                try:
                    self._plan(shape, grow=False)
                except Exception as e:
                    fallback[shape] = _reason(e)
        finally:
            self._search_buffer = None
            self._grow()
        for shape in shapes:
            if shape in fallback:
                continue
            x = xp.asarray(rng.standard_normal(shape.x, dtype=np.float32).astype(dt))
            w = xp.asarray(rng.standard_normal(shape.weight, dtype=np.float32).astype(dt))
            dy = xp.asarray(rng.standard_normal(shape.out, dtype=np.float32).astype(dt))
            y, dx, dw = xp.zeros(shape.out, dt), xp.zeros(shape.x, dt), xp.zeros(shape.weight, dt)
            try:
                self.forward(x, w, y, shape.stride, shape.pad)
                self.backward_data(dy, w, dx, shape.stride, shape.pad)
                self.backward_filter(x, dy, dw, shape.stride, shape.pad)
                ours = {"forward": y, "backward_data": dx, "backward_filter": dw}
                refs = dict(zip(DIRECTIONS, run_im2col(shape, x, w, dy)))
            except Exception as e:
                fallback[shape] = _reason(e)
                continue
            errors[shape] = {}
            bad = []
            for direction in DIRECTIONS:
                err = _relative_error(ours[direction], refs[direction])
                errors[shape][direction] = err
                bound = error_bound(direction, shape, self.precision)
                if not err <= bound:                    # NaN fails too
                    bad.append(f"{direction} relative error {err:.3g} > bound {bound:.3g}")
            if bad:
                fallback[shape] = "; ".join(bad)
            else:
                passed.add(shape)
        self.fallback.update(fallback)
        warning = None
        if fallback:
            warning = (f"cuDNN self-check ({self.precision}): {len(fallback)} of {len(shapes)} conv shapes "
                       "fall back to im2col: " + " | ".join(f"{s}: {r}" for s, r in fallback.items()))
        return SelfCheck(frozenset(passed), dict(fallback), errors, warning)

    def uses_cudnn(self, shape):
        """False for a shape that failed the self-check (it must go through im2col)."""
        return ConvShape(*shape) not in self.fallback

    def admit(self, shape, run_im2col, warn):
        """Whether `shape` runs through cuDNN: self-checked against `run_im2col` the first
        time it is seen (in the job's first steps, before any CUDA graph is captured), a
        failure said once through `warn`; then the cached answer."""
        shape = ConvShape(*shape)
        if shape not in self._admitted:
            self._admitted.add(shape)
            result = self.self_check([shape], run_im2col)
            if result.warning:
                warn(result.warning)
        return self.uses_cudnn(shape)

    def close(self):
        """Drop the descriptors, the workspace and the handle (destroyed if we made it)."""
        for plan in self._plans.values():
            for d in (plan.x, plan.y, plan.w, plan.conv):
                d.destroy()
        self._plans.clear()
        self._workspace = self._search_buffer = None
        self.workspace_bytes = 0
        if self._handle is not None:
            self._handle.destroy()
            self._handle = None


def _np_dtype(name):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _host64(a):
    get = getattr(a, "get", None)
    a = get() if callable(get) and not isinstance(a, np.ndarray) else np.asarray(a)
    return a.astype(np.float64)


def _reason(e):
    """Why a shape failed, without repeating the shape."""
    if isinstance(e, CudnnConvError):
        return f"{e.direction}: {e.reason}"
    return f"{type(e).__name__}: {e}"


def _relative_error(ours, ref):
    a, b = _host64(ours), _host64(ref)
    if a.shape != b.shape:
        return float("inf")
    denom = np.linalg.norm(b)
    diff = np.linalg.norm(a - b)
    if denom == 0:
        return 0.0 if diff == 0 else float("inf")
    return float(diff / denom)
