"""A NumPy-backed stand-in for CuPy that logs every device operation, for GPU code paths without a GPU.

    cupy = install(monkeypatch)            # sys.modules["cupy"], engine.cuda_ops._launch replaced
    backend = Backend("gpu", cupy, 0)      # the engine's own GPU backend, on the stand-in
    ... run the engine ...
    OPS                                    # [Op(kind, name, where, nbytes), ...] in issue order

`cupy.ndarray` here is NOT a numpy.ndarray subclass (neither is CuPy's), so every
`isinstance(a, np.ndarray)` dispatch in the engine takes its GPU branch, and an implicit
conversion to NumPy (np.asarray, __array__) raises TypeError as CuPy does. Each array wraps
a NumPy array (views share memory, so in-place work on a view reaches its base); indexing
one, even by a scalar, gives a device array, never a host value.

What would synchronise a real CuPy step is either logged as a sync (below) or refused:
np.asarray of a device array (TypeError), a NumPy function the stand-in does not model
(NotImplementedError), a CuPy function it does not have, such as the data-dependent sizes of
nonzero, unique or argwhere (AttributeError).

What one logged op stands for, modelled on CuPy 14's implementation (cupy/_core):
  elementwise  one ufunc call, astype, a comparison: one ElementwiseKernel launch
  reduction    sum/mean/max/argmax/..., ufunc.reduce: one ReductionKernel launch
  gemm         a 2-D matmul: one cuBLAS call (dot/tensordot_core); an operand neither C- nor
               F-contiguous adds a copy, an `out` that is not C-contiguous adds a temporary
               and a copy (matmul in _routines_linalg.pyx)
  copy         a device-to-device copy (setitem from a device array, copyto, .copy())
  fill         a scalar setitem, fill(), zeros/ones
  gather/scatter  advanced-index getitem/setitem (CuPy: at least one kernel; counted as one)
  h2d, d2h     transfers (asarray of host data, .set(), .get(), asnumpy)
  kernel       one engine.cuda_ops._launch (the fused kernels of kernels/)
  nccl         one collective on the stand-in NCCL communicator
  event        an event record or a stream waiting on an event
  sync         the host waits for the device: float(), int(), bool(), an index, .item(),
               .tolist(), .get(), str(), repr(), format() (f-strings), a boolean mask
               (getitem or setitem), a stream, event or device synchronize()
  alloc        a new device buffer from the memory pool (views allocate nothing)
`where` is the engine code that issued it: the class of the innermost layer on the call
stack (Conv2d, BatchNorm, ...), else the engine module (loss, transforms, reducer, ...).
"""
from __future__ import annotations

import contextlib
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

ENGINE_DIR = str(Path(__file__).resolve().parent.parent / "engine")
LAUNCHES = ("kernel", "elementwise", "reduction", "gemm", "copy", "fill", "gather/scatter", "h2d",
            "d2h", "nccl")


@dataclass(frozen=True)
class Op:
    kind: str
    name: str
    where: str
    nbytes: int = 0
    capturing: bool = False
    pool: object = None        # alloc: the MemoryPool of the allocator in use (None: CuPy's default)


OPS: list = []
_capture = []          # the Graph being captured (at most one), see Stream.begin_capture


class CaptureError(RuntimeError):
    """What CUDA answers to a host synchronisation while a stream is capturing."""


# Engine modules that issue work on behalf of their caller: an op is credited further out.
_HELPERS = {"cuda_ops", "backend", "batchnorm", "conv", "workspace", "precision", "comm", "flat", "gemm", "parallel"}


def _where() -> str:
    from engine.layers import Layer
    from engine.model import ResidualBlock
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code.co_filename
        if code.startswith(ENGINE_DIR):
            owner = frame.f_locals.get("self")
            if isinstance(owner, (Layer, ResidualBlock)):
                return type(owner).__name__
            if Path(code).stem not in _HELPERS and Path(code).stem != "layers":
                return Path(code).stem
        frame = frame.f_back
    return "outside engine"


def log(kind: str, name: str, nbytes: int = 0, replay=None) -> bool:
    """Log one device operation; True when the caller should do it now. Inside a capture,
    `replay` (a callable doing it on the same buffers) becomes a node of the graph and is
    NOT done now, as a captured CUDA call only records: `if log(...): replay()`.
    Host transfers and synchronisations raise there, as CUDA and CuPy refuse them."""
    if kind in ("sync", "h2d", "d2h") and _capture:
        raise CaptureError(f"{kind} ({name}) while a stream is capturing")
    allocator = current_allocator() if kind == "alloc" else None
    OPS.append(Op(kind, name, _where(), nbytes, bool(_capture), getattr(allocator, "__self__", None)))
    if _capture and replay is not None:
        _capture[0].nodes.append((kind, name, replay))
        return False
    return True


def reset() -> None:
    OPS.clear()


# ---- arrays ---------------------------------------------------------------------------

def _np(a):
    """The NumPy array under a stand-in array (anything else unchanged)."""
    return a._a if isinstance(a, ndarray) else a


def _unwrap(args):
    if isinstance(args, (list, tuple)):
        return type(args)(_unwrap(a) for a in args)
    if isinstance(args, dict):
        return {k: _unwrap(v) for k, v in args.items()}
    return _np(args)


def _wrap(a):
    return ndarray(a) if isinstance(a, np.ndarray) else a


def _new(a: np.ndarray) -> "ndarray":
    """A freshly allocated device array holding `a` (logged as one allocation)."""
    log("alloc", f"{a.dtype}{list(a.shape)}", a.nbytes)
    return ndarray(a)


def _advanced(key) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, (ndarray, np.ndarray, list)) for k in keys)


def _masked(key) -> bool:
    """A boolean mask among the keys: CuPy counts its True elements on the host to size the
    result (_prepare_mask_indexing_single), a host synchronisation."""
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, (ndarray, np.ndarray)) and _np(k).dtype == np.bool_ for k in keys)


class _Data:
    def __init__(self, a):
        self.ptr = a.__array_interface__["data"][0]


class ndarray(NDArrayOperatorsMixin):
    """A device array: NumPy storage, CuPy's behaviour at the boundary to the host."""

    __array_priority__ = 100
    __module__ = "cupy._core.core"      # engine.comm checks that a buffer belongs to cupy

    def __init__(self, a: np.ndarray):
        self._a = a

    # -- what CuPy refuses, or makes a host synchronisation
    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed (stand-in for cupy.ndarray)")

    def _read(self, how):
        log("sync", how)
        log("d2h", how, self._a.nbytes)
        return self._a

    def __float__(self):
        return float(self._read("float()"))

    def __int__(self):
        return int(self._read("int()"))

    def __index__(self):
        return int(self._read("index"))

    def __bool__(self):
        return bool(self._read("bool()"))

    def item(self, *args):
        return self._read(".item()").item(*args)

    def tolist(self):
        return self._read(".tolist()").tolist()

    # CuPy prints an array by copying it to the host first: str(), repr() and any format
    # (an f-string included) of a device value wait for the device.
    def __str__(self):
        return str(self._read("str()"))

    def __repr__(self):
        return repr(self._read("repr()")).replace("array(", "standin.cupy.array(", 1)

    def __format__(self, spec):
        host = self._read("format()")
        return format(host.item() if host.ndim == 0 else host, spec)

    def get(self, stream=None):
        return self._read(".get()").copy()

    def set(self, host, stream=None):
        src = np.asarray(host)
        dst = self._a
        if log("h2d", ".set()", src.nbytes, replay=lambda: np.copyto(dst, src)):
            np.copyto(dst, src)

    # -- metadata, views
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    strides = property(lambda self: self._a.strides)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray(self._a.T))
    data = property(lambda self: _Data(self._a))

    def __len__(self):
        return len(self._a)

    def view(self, dtype=None):
        return ndarray(self._a.view() if dtype is None else self._a.view(dtype))

    def transpose(self, *axes):
        return ndarray(self._a.transpose(*axes))

    def reshape(self, *shape):
        out = self._a.reshape(*shape)
        if not np.shares_memory(out, self._a):      # CuPy copies where no view exists
            return _copy_of(out, "reshape")
        return ndarray(out)

    def ravel(self):
        return self.reshape(-1)

    def __getitem__(self, key):
        if _masked(key):
            log("sync", "boolean mask")
        key = _unwrap(key)
        out = self._a[key]
        if _advanced(key):
            result = _new(out)
            src = self._a
            log("gather/scatter", "getitem", out.nbytes,
                replay=lambda: np.copyto(result._a, src[key]))
            return result
        return ndarray(out) if isinstance(out, np.ndarray) else ndarray(np.asarray(out))

    def __setitem__(self, key, value):
        if _masked(key):
            log("sync", "boolean mask")
        key, dst = _unwrap(key), self._a
        if isinstance(value, np.ndarray):        # host data: CuPy transfers it first
            value = asarray(value)
        src = _np(value)
        kind = "gather/scatter" if _advanced(key) else "copy" if isinstance(value, ndarray) else "fill"

        def run():
            dst[key] = src
        if log(kind, "setitem", 0, replay=run):
            run()

    # -- one kernel each
    def astype(self, dtype, copy=True, **kwargs):
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        out = _new(np.empty(self.shape, dtype))
        src = self._a

        def run():
            np.copyto(out._a, src, casting="unsafe")
        if log("elementwise", f"astype({np.dtype(dtype)})", out.nbytes, replay=run):
            run()
        return out

    def copy(self, order="C"):
        return _copy_of(self._a, "copy")

    def fill(self, value):
        dst = self._a
        if log("fill", "fill", dst.nbytes, replay=lambda: dst.fill(value)):
            dst.fill(value)

    def _reduce(self, name, *args, out=None, **kwargs):
        """One ReductionKernel, into `out` when given (no allocation), else a new array."""
        src = self._a
        host = getattr(src, name)(*args, **kwargs)
        fresh = out is None
        if fresh:
            out = _new(np.asarray(host))
        if log("reduction", name, out.nbytes,
               replay=lambda: np.copyto(out._a, getattr(src, name)(*args, **kwargs))) and not fresh:
            np.copyto(out._a, host)
        return out

    def sum(self, *a, **k):
        return self._reduce("sum", *a, **k)

    def mean(self, *a, **k):
        return self._reduce("mean", *a, **k)

    def max(self, *a, **k):
        return self._reduce("max", *a, **k)

    def min(self, *a, **k):
        return self._reduce("min", *a, **k)

    def argmax(self, *a, **k):
        return self._reduce("argmax", *a, **k)

    # -- NumPy's protocols: every ufunc and array function called on a stand-in array
    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        if method not in ("__call__", "reduce"):
            return NotImplemented
        args = _unwrap(inputs)
        outs = _unwrap(out) if out is not None else None
        if ufunc is np.matmul:
            return _matmul(*args, out=None if outs is None else outs[0])
        kind = "elementwise" if method == "__call__" else "reduction"
        fn = getattr(ufunc, method)
        if outs is None:
            res = fn(*args, **kwargs)
            results = res if isinstance(res, tuple) else (res,)
            wrapped = tuple(_new(np.asarray(r)) for r in results)
            targets = tuple(w._a for w in wrapped)
        else:
            wrapped, targets = out, outs

        def run():
            fn(*args, out=targets, **kwargs)
        if log(kind, f"{ufunc.__name__}.{method}" if method != "__call__" else ufunc.__name__, 0,
               replay=run) and outs is not None:
            run()
        return wrapped if isinstance(wrapped, tuple) and len(wrapped) > 1 else wrapped[0]

    def __array_function__(self, func, types_, args, kwargs):
        handler = _FUNCTIONS.get(func.__name__)
        if handler is None:
            raise NotImplementedError(f"the stand-in cupy does not model numpy.{func.__name__}: add it to "
                                      "tests/gpu_standins.py, with the kernels CuPy launches for it")
        return handler(*args, **kwargs)


def _copy_of(a: np.ndarray, name: str) -> ndarray:
    out = _new(np.empty(a.shape, a.dtype))
    if log("copy", name, a.nbytes, replay=lambda: np.copyto(out._a, a)):
        np.copyto(out._a, a)
    return out


def _cublas_operand(a: np.ndarray) -> np.ndarray:
    """cuBLAS takes C- or F-contiguous operands; CuPy copies any other (_mat_to_cublas_contiguous)."""
    if a.flags.c_contiguous or a.flags.f_contiguous:
        return a
    return _copy_of(a, "matmul operand")._a


def _matmul(a, b, out=None):
    a, b = _unwrap(a), _unwrap(b)
    if a.ndim > 2 or b.ndim > 2:
        raise NotImplementedError("the stand-in cupy models 2-D matmul only (batched: _integral/strided batched)")
    a, b = _cublas_operand(a), _cublas_operand(b)
    target = out
    if out is None or not out.flags.c_contiguous:
        target = _new(np.empty((a.shape[0], b.shape[1]), np.result_type(a, b)))._a
    if log("gemm", f"matmul {a.shape[0]}x{a.shape[1]}x{b.shape[1]}", 0,
           replay=lambda: np.matmul(a, b, out=target)):
        np.matmul(a, b, out=target)
    if out is None:
        return ndarray(target)
    if target is not out:
        if log("copy", "matmul out", out.nbytes, replay=lambda: np.copyto(out, target)):
            np.copyto(out, target)
    return ndarray(out)


def _gemm_ex(a, b, out, precision, accumulate=False):
    """engine.gemm's one cublasGemmEx call (its argument mapping is tested in
    tests/test_gemm.py against a column-major emulator): one logged GEMM, computed by the
    CPU twin on the same buffers."""
    from engine import gemm
    for x in (a, b):
        gemm._column_major(x)        # the operand check of the real call; raises as it does
    a, b, o = _np(a), _np(b), _np(out)
    if not o.flags.c_contiguous:
        raise ValueError("matmul: out must be C-contiguous")
    if log("gemm", f"gemmEx {a.shape[0]}x{a.shape[1]}x{b.shape[1]} {precision}", 0,
           replay=lambda: gemm._host_matmul(a, b, o, accumulate)):
        gemm._host_matmul(a, b, o, accumulate)
    return out


def _copyto(dst, src, **kwargs):
    d, s = _np(dst), _np(src)
    kind = "copy" if isinstance(src, ndarray) else "h2d" if isinstance(src, np.ndarray) else "fill"
    if log(kind, "copyto", d.nbytes, replay=lambda: np.copyto(d, s, **kwargs)):
        np.copyto(d, s, **kwargs)


def _like(fill):
    def make(a, dtype=None, **kwargs):
        return _filled(np.empty(_np(a).shape, dtype or _np(a).dtype), fill)
    return make


_FUNCTIONS = {
    "copyto": _copyto,
    "matmul": _matmul,
    "empty_like": _like(None),
    "zeros_like": _like(0),
    "shares_memory": lambda a, b, **k: np.shares_memory(_np(a), _np(b)),
}


# ---- the module-level functions the engine calls on xp ------------------------------------

def _filled(a: np.ndarray, value):
    out = _new(a)
    if value is not None:
        out.fill(value)
    return out


def empty(shape, dtype=np.float32, order="C"):
    return _filled(np.empty(shape, dtype), None)


def zeros(shape, dtype=np.float32, order="C"):
    return _filled(np.empty(shape, dtype), 0)


def ones(shape, dtype=np.float32, order="C"):
    return _filled(np.empty(shape, dtype), 1)


def full(shape, value, dtype=None):
    return _filled(np.empty(shape, dtype or np.asarray(value).dtype), value)


def asarray(a, dtype=None):
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    host = np.ascontiguousarray(np.asarray(a, dtype=dtype))
    out = _new(np.empty(host.shape, host.dtype))
    out.set(host)
    return out


array = asarray


def asnumpy(a, stream=None):
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def arange(*args, dtype=None):
    host = np.arange(*args, dtype=dtype)
    out = _new(np.empty(host.shape, host.dtype))
    log("elementwise", "arange", out.nbytes, replay=lambda: np.copyto(out._a, host))
    np.copyto(out._a, host)
    return out


def _as_strided(x, shape=None, strides=None):
    return ndarray(np.lib.stride_tricks.as_strided(_np(x), shape=shape, strides=strides))


# ---- streams, events, graphs, memory pools ------------------------------------------------

class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.captured = False

    def record(self, stream=None):
        self.captured = bool(_capture)
        log("event", "record")

    def synchronize(self):
        log("sync", "Event.synchronize")

    @property
    def done(self):
        if _capture or self.captured:
            raise CaptureError("querying an event recorded in a stream capture")
        return True


def get_elapsed_time(start, end):
    if start.captured or end.captured:
        raise CaptureError("elapsed time of an event recorded in a stream capture")
    return 0.0


_current = []        # the stack of streams entered with `with`


class Stream:
    null = None

    def __init__(self, null=False, non_blocking=False, ptr=None, priority=None):
        self.is_null = null

    def __enter__(self):
        _current.append(self)
        return self

    def __exit__(self, *exc):
        _current.pop()
        return False

    def synchronize(self):
        log("sync", "Stream.synchronize")

    def wait_event(self, event):
        log("event", "wait_event")

    def record(self, event=None):
        event = event or Event()
        event.record(self)
        return event

    def begin_capture(self, mode=None):
        if self.is_null:
            raise RuntimeError("cannot capture on the default (legacy) stream")
        if _capture:
            raise RuntimeError("a capture is already under way")
        _capture.append(Graph())
        # Captured calls are not done, so arrays made inside hold what np.empty left: their
        # values (computed only to learn shapes and dtypes) may overflow, harmlessly.
        _capture[0].errstate = np.seterr(all="ignore")

    def end_capture(self):
        graph = _capture.pop()
        np.seterr(**graph.errstate)
        return graph

    def is_capturing(self):
        return bool(_capture)


Stream.null = Stream(null=True)


def get_current_stream():
    return _current[-1] if _current else Stream.null


class Graph:
    """The operations logged between begin_capture and end_capture, replayed in order on
    the same buffers: what a replay computes depends on device memory only, as on a GPU
    (host values a captured call was given stay as they were at capture)."""

    def __init__(self):
        self.nodes = []
        self.launches = 0

    def launch(self, stream=None):
        log("graph", f"launch of {len(self.nodes)} nodes")
        self.launches += 1
        for _, _, run in self.nodes:
            run()

    def upload(self, stream=None):
        pass


class Device:
    def __init__(self, device_id=0):
        self.id = device_id
        self.pci_bus_id = f"0000:{device_id:02x}:00.0"

    def use(self):
        pass

    def synchronize(self):
        log("sync", "Device.synchronize")


class MemoryPointer:
    def __init__(self, pool, size):
        self.pool, self.size = pool, size


class MemoryPool:
    """Counts what is allocated through it (the stand-in's arrays are NumPy's)."""

    def __init__(self):
        self.allocated = 0

    def malloc(self, size):
        self.allocated += size
        return MemoryPointer(self, size)

    def free_all_blocks(self):
        pass


_allocators = []


@contextlib.contextmanager
def using_allocator(allocator=None):
    _allocators.append(allocator)
    try:
        yield
    finally:
        _allocators.pop()


def current_allocator():
    return _allocators[-1] if _allocators else None


def _module() -> types.ModuleType:
    cupy = types.ModuleType("cupy", "NumPy-backed stand-in for CuPy (tests/gpu_standins.py)")
    for name in ("float16", "float32", "float64", "int32", "int64", "uint8", "uint16", "bool_", "dtype",
                 "add", "subtract", "multiply", "divide", "true_divide", "maximum", "minimum", "equal",
                 "greater", "less", "exp", "log", "sqrt", "negative", "abs", "newaxis"):
        setattr(cupy, name, getattr(np, name))
    for name in ("ndarray", "empty", "zeros", "ones", "full", "asarray", "array", "asnumpy", "arange"):
        setattr(cupy, name, globals()[name])
    for name in ("sum", "mean", "max", "min", "argmax"):
        setattr(cupy, name, lambda a, *args, _name=name, **kwargs: a._reduce(_name, *args, **kwargs))
    cupy.empty_like, cupy.zeros_like = _like(None), _like(0)
    cupy.copyto, cupy.matmul = _copyto, _matmul
    cupy.lib = types.SimpleNamespace(stride_tricks=types.SimpleNamespace(as_strided=_as_strided))
    runtime = types.SimpleNamespace(getDevice=lambda: 0, streamCaptureModeRelaxed=2)
    cupy.cuda = types.SimpleNamespace(Stream=Stream, Event=Event, Device=Device, Graph=Graph,
                                      get_current_stream=get_current_stream, get_elapsed_time=get_elapsed_time,
                                      MemoryPool=MemoryPool, using_allocator=using_allocator, runtime=runtime)
    return cupy


def counted_launch(filename, kernel, grid, block, args):
    """engine.cuda_ops._launch that logs one launch and skips the kernel (op counts only)."""
    log("kernel", f"{filename}:{kernel}", replay=lambda: None)


def emulated_launch(filename, kernel, grid, block, args):
    """engine.cuda_ops._launch that logs one launch and runs the unchanged .cu on the host
    (tests/kernel_emulation.py), at capture and at every replay."""
    import kernel_emulation
    host_args = tuple(_np(a) for a in args)

    def run():
        kernel_emulation.emulated_launch(filename, kernel, grid, block, host_args)
    if log("kernel", f"{filename}:{kernel}", replay=run):
        run()


# ---- NCCL and MPI stand-ins ---------------------------------------------------------------

class OneWorld:
    """The MPI world of one rank (start-up checks allgather and bcast on it)."""
    rank, size = 0, 1

    def allgather(self, x):
        return [x]

    def bcast(self, x, root=0):
        return x

    def Barrier(self):
        pass


class FakeNccl:
    """engine.nccl.NcclCommunicator of one rank: a sum over ranks is the buffer itself."""

    def __init__(self, size, uid, rank):
        pass

    def all_reduce(self, send, recv, op="sum", stream=None):
        log("nccl", f"all_reduce {send.size}", replay=lambda: None)

    def broadcast(self, send, recv, root=0, stream=None):
        log("nccl", f"broadcast {send.size}", replay=lambda: None)

    def destroy(self):
        pass

    def abort(self):
        pass

    def check_async_error(self):
        pass


class Patches:
    """The part of pytest's monkeypatch that install() uses, for tools run without pytest
    (bench/opcount.py after `make train`'s core install): `with Patches() as mp:` undoes
    every setattr and setitem on exit, newest first."""

    _MISSING = object()

    def __init__(self):
        self._undo = []

    def setattr(self, obj, name, value, raising=True):
        old = getattr(obj, name, self._MISSING)
        if old is self._MISSING and raising:
            raise AttributeError(f"{obj!r} has no attribute {name!r}")
        self._undo.append(lambda: delattr(obj, name) if old is self._MISSING else setattr(obj, name, old))
        setattr(obj, name, value)

    def setitem(self, mapping, key, value):
        old = mapping.get(key, self._MISSING)
        self._undo.append(lambda: mapping.pop(key, None) if old is self._MISSING else mapping.__setitem__(key, old))
        mapping[key] = value

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        while self._undo:
            self._undo.pop()()
        return False


def install(monkeypatch, launch=counted_launch):
    """Put the stand-in in place of CuPy (and NCCL) for this test; returns the module."""
    from engine import cuda_ops, gemm, nccl
    cupy = _module()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(cuda_ops, "_launch", launch)
    monkeypatch.setattr(gemm, "_cublas_matmul", _gemm_ex)
    monkeypatch.setattr(nccl, "get_unique_id", lambda: b"standin", raising=False)
    monkeypatch.setattr(nccl, "NcclCommunicator", FakeNccl, raising=False)
    reset()
    return cupy


def trainer_on_standins(monkeypatch, argv, launch=counted_launch):
    """engine.train.Trainer (options `argv`) on a one-GPU backend whose CuPy and NCCL are
    these stand-ins, watchdog, evaluation and checkpoints off."""
    import tempfile
    import engine.backend
    import engine.comm
    from engine.backend import Backend
    from engine.train import Trainer, parse_args
    cupy = install(monkeypatch, launch)
    monkeypatch.setattr(engine.backend, "get_backend",
                        lambda device="auto", local_rank=None: Backend("gpu", cupy, 0, visible=1, bus_id="standin"))
    monkeypatch.setattr(engine.comm, "create_communicator",
                        lambda backend, *a, **k: engine.comm.NcclCommunicator(backend, OneWorld()))
    log = tempfile.mkdtemp(prefix="standin-trainer-")
    return Trainer(parse_args(["--watchdog", "0", "--eval-every", "0", "--no-checkpoint", "--print-every", "1000",
                               "--log-dir", log, "--runs-dir", log, "--device", "gpu"] + list(argv)))


def run_steps(trainer, steps: int, read_loss: bool = False) -> list:
    """Run `steps` training steps as engine.train's loop does (train_step, then the submit of
    its loss and top-1); per step (ops of train_step, ops of the submit, the loss read back
    after them when `read_loss`, else None). The reads are host syncs outside both lists."""
    batches = trainer.loader.train_batches(trainer.sampler, 0, 0)
    out = []
    for i in range(steps):
        _, batch = next(batches)
        reset()
        loss, hits = trainer.train_step(batch, trainer.coefficients(i / trainer.steps_per_epoch))
        step_ops = list(OPS)
        reset()
        trainer.stats.submit({"step": i}, loss, hits, len(batch.labels))
        out.append((step_ops, list(OPS), trainer.stats.pop()["loss"] if read_loss else None))
    return out
