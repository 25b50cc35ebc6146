# cython: language_level=3
"""A small Cython binding of NCCL: what data-parallel training needs, nothing more.

Built without CUDA or NCCL headers (csrc/nccl_decls.h declares the few types we use);
`libnccl.so.2` is opened at first use, from, in this order:

1. the path in the environment variable ENGINE_NCCL_LIBRARY, when set;
2. the nvidia-nccl-cu12 or nvidia-nccl-cu13 wheel (both install nvidia/nccl/lib/libnccl.so.2;
   found with importlib, without importing CuPy);
3. the system's library search path.

When none loads, every call raises `NcclMissing`, which says what was tried and how to
install NCCL. Every NCCL call runs without the GIL, so a thread blocked in NCCL never
stops the Python threads of the same process.

Buffers are objects with `__cuda_array_interface__` (CuPy arrays, ...): their dtype,
element count and contiguity are checked, and a send/receive size mismatch is an error.
The `*_ptr` variants take raw device pointers, each with the number of bytes it points to,
and check the element count against both.
"""
import importlib.util
import os

from libc.stdint cimport uintptr_t
from libc.string cimport memcpy
from posix.dlfcn cimport RTLD_LOCAL, RTLD_NOW, dlerror, dlopen, dlsym

cdef extern from "nccl_decls.h" nogil:
    int UNIQUE_ID_BYTES "ENGINE_NCCL_UNIQUE_ID_BYTES"
    int NCCL_SUCCESS "ENGINE_NCCL_SUCCESS"
    int NCCL_FLOAT16 "ENGINE_NCCL_FLOAT16"
    int NCCL_FLOAT32 "ENGINE_NCCL_FLOAT32"
    int NCCL_BFLOAT16 "ENGINE_NCCL_BFLOAT16"
    int NCCL_SUM "ENGINE_NCCL_SUM"
    int NCCL_AVG "ENGINE_NCCL_AVG"

    ctypedef struct engine_ncclComm:
        pass
    ctypedef engine_ncclComm* ncclComm_t
    ctypedef void* cudaStream_t
    ctypedef struct ncclUniqueId:
        char internal[128]
    ctypedef int ncclResult_t
    ctypedef int ncclDataType_t
    ctypedef int ncclRedOp_t

    ctypedef ncclResult_t (*ncclGetVersion_t)(int*)
    ctypedef ncclResult_t (*ncclGetUniqueId_t)(ncclUniqueId*)
    ctypedef ncclResult_t (*ncclCommInitRank_t)(ncclComm_t*, int, ncclUniqueId, int)
    ctypedef ncclResult_t (*ncclCommDestroy_t)(ncclComm_t)
    ctypedef ncclResult_t (*ncclCommAbort_t)(ncclComm_t)
    ctypedef ncclResult_t (*ncclCommGetAsyncError_t)(ncclComm_t, ncclResult_t*)
    ctypedef ncclResult_t (*ncclCommCount_t)(ncclComm_t, int*)
    ctypedef ncclResult_t (*ncclCommUserRank_t)(ncclComm_t, int*)
    ctypedef ncclResult_t (*ncclAllReduce_t)(const void*, void*, size_t, ncclDataType_t,
                                             ncclRedOp_t, ncclComm_t, cudaStream_t)
    ctypedef ncclResult_t (*ncclBroadcast_t)(const void*, void*, size_t, ncclDataType_t, int,
                                             ncclComm_t, cudaStream_t)
    ctypedef ncclResult_t (*ncclGroupStart_t)()
    ctypedef ncclResult_t (*ncclGroupEnd_t)()
    ctypedef const char* (*ncclGetErrorString_t)(ncclResult_t)
    ctypedef const char* (*ncclGetLastError_t)(ncclComm_t)


UNIQUE_ID_SIZE = UNIQUE_ID_BYTES
LIBRARY_ENV = "ENGINE_NCCL_LIBRARY"

# NCCL_VERSION(2, 10, 0): the first release with ncclAvg and ncclBfloat16.
_V2_10 = 21000

_STATUS_NAMES = {
    0: "ncclSuccess", 1: "ncclUnhandledCudaError", 2: "ncclSystemError",
    3: "ncclInternalError", 4: "ncclInvalidArgument", 5: "ncclInvalidUsage",
    6: "ncclRemoteError", 7: "ncclInProgress", 8: "ncclTimeout",
}

# dtype name -> (NCCL type, bytes per element); cuda-array typestrs map onto the names.
_DTYPES = {"float16": (NCCL_FLOAT16, 2), "float32": (NCCL_FLOAT32, 4),
           "bfloat16": (NCCL_BFLOAT16, 2)}
_TYPESTRS = {"<f2": "float16", "<f4": "float32"}
_OPS = {"sum": NCCL_SUM, "avg": NCCL_AVG}


class NcclError(RuntimeError):
    """An NCCL call failed: `status` (int), `name` ("ncclInvalidArgument", ...), `message`
    (NCCL's own description of the status and its last error). Survives pickling, so it
    can cross process boundaries (multiprocessing, MPI object collectives)."""

    def __init__(self, status, message=""):
        self.status = int(status)
        self.name = _STATUS_NAMES.get(self.status, f"ncclResult({self.status})")
        self.message = str(message)
        super().__init__(f"{self.name}: {self.message}" if self.message else self.name)

    def __reduce__(self):
        return (type(self), (self.status, self.message))


class NcclMissing(RuntimeError):
    """libnccl.so.2 could not be loaded; the message lists every place that was tried."""


cdef struct Api:
    ncclGetVersion_t get_version
    ncclGetUniqueId_t get_unique_id
    ncclCommInitRank_t comm_init_rank
    ncclCommDestroy_t comm_destroy
    ncclCommAbort_t comm_abort
    ncclCommGetAsyncError_t comm_get_async_error
    ncclCommCount_t comm_count
    ncclCommUserRank_t comm_user_rank
    ncclAllReduce_t all_reduce
    ncclBroadcast_t broadcast
    ncclGroupStart_t group_start
    ncclGroupEnd_t group_end
    ncclGetErrorString_t get_error_string
    ncclGetLastError_t get_last_error      # NULL before NCCL 2.13

cdef Api _api
cdef void* _lib = NULL
cdef int _version = 0
_loaded_path = None
_load_failure = None


include "libload.pxi"


def _candidates():
    """Paths to try, in order (see the module docstring)."""
    return _library_candidates(LIBRARY_ENV, ("nccl/lib",), "libnccl.so.2")


cdef void* _symbol(void* lib, const char* name, bint required) except? NULL:
    cdef void* fn = dlsym(lib, name)
    if fn == NULL and required:
        raise NcclMissing(f"{_loaded_path} has no symbol {name.decode()}: not an NCCL 2 library")
    return fn


cdef int _load() except -1:
    """Open libnccl once; afterwards raise the same NcclMissing on every call."""
    global _lib, _loaded_path, _load_failure, _version
    if _lib != NULL:
        return 0
    if _load_failure is not None:
        raise NcclMissing(_load_failure)
    tried, opened = [], []
    cdef void* lib = _open_first(_candidates(), tried, opened)
    if lib == NULL:
        _load_failure = ("NCCL is not available: libnccl.so.2 could not be loaded from\n"
                         + "\n".join(tried)
                         + "\nInstall it with `pip install nvidia-nccl-cu12` (the 'gpu' extra; nvidia-nccl-cu13 for CUDA 13), "
                         f"or set {LIBRARY_ENV} to the library's path.")
        raise NcclMissing(_load_failure)
    _loaded_path = opened[0]
    _api.get_version = <ncclGetVersion_t>_symbol(lib, b"ncclGetVersion", True)
    _api.get_unique_id = <ncclGetUniqueId_t>_symbol(lib, b"ncclGetUniqueId", True)
    _api.comm_init_rank = <ncclCommInitRank_t>_symbol(lib, b"ncclCommInitRank", True)
    _api.comm_destroy = <ncclCommDestroy_t>_symbol(lib, b"ncclCommDestroy", True)
    _api.comm_abort = <ncclCommAbort_t>_symbol(lib, b"ncclCommAbort", True)
    _api.comm_get_async_error = <ncclCommGetAsyncError_t>_symbol(lib, b"ncclCommGetAsyncError", True)
    _api.comm_count = <ncclCommCount_t>_symbol(lib, b"ncclCommCount", True)
    _api.comm_user_rank = <ncclCommUserRank_t>_symbol(lib, b"ncclCommUserRank", True)
    _api.all_reduce = <ncclAllReduce_t>_symbol(lib, b"ncclAllReduce", True)
    _api.broadcast = <ncclBroadcast_t>_symbol(lib, b"ncclBroadcast", True)
    _api.group_start = <ncclGroupStart_t>_symbol(lib, b"ncclGroupStart", True)
    _api.group_end = <ncclGroupEnd_t>_symbol(lib, b"ncclGroupEnd", True)
    _api.get_error_string = <ncclGetErrorString_t>_symbol(lib, b"ncclGetErrorString", True)
    _api.get_last_error = <ncclGetLastError_t>_symbol(lib, b"ncclGetLastError", False)
    cdef int v = 0
    cdef ncclResult_t status
    with nogil:
        status = _api.get_version(&v)
    if status != NCCL_SUCCESS:
        raise NcclError(status, "ncclGetVersion failed")
    _version = v
    _lib = lib
    return 0


cdef str _message(ncclResult_t status, ncclComm_t comm):
    """NCCL's description of `status`, plus its last error text when it has one."""
    cdef const char* text = _api.get_error_string(status)
    msg = text.decode(errors="replace") if text != NULL else ""
    if _api.get_last_error != NULL:
        text = _api.get_last_error(comm)
        if text != NULL and text[0] != 0:
            msg = f"{msg} ({text.decode(errors='replace')})" if msg else text.decode(errors="replace")
    return msg


cdef int _check(ncclResult_t status, ncclComm_t comm=NULL) except -1:
    if status != NCCL_SUCCESS:
        raise NcclError(status, _message(status, comm))
    return 0


def is_available():
    """True when libnccl.so.2 loads (says nothing about GPUs)."""
    try:
        _load()
    except NcclMissing:
        return False
    return True


def library_path():
    """The path libnccl.so.2 was loaded from (loads it if needed)."""
    _load()
    return _loaded_path


def get_version():
    """NCCL's version code, e.g. 22703 for 2.27.3 (NCCL_VERSION(X, Y, Z))."""
    _load()
    return _version


def version_tuple():
    """(major, minor, patch) of the loaded NCCL."""
    v = get_version()
    if v < 10000:            # codes before 2.9 were X*1000 + Y*100 + Z
        return (v // 1000, (v % 1000) // 100, v % 100)
    return (v // 10000, (v % 10000) // 100, v % 100)


def get_unique_id():
    """A fresh communicator id: 128 opaque bytes that rank 0 creates and sends to all."""
    _load()
    cdef ncclUniqueId uid
    cdef ncclResult_t status
    with nogil:
        status = _api.get_unique_id(&uid)
    _check(status)
    return <bytes>uid.internal[:UNIQUE_ID_BYTES]


def group_start():
    """Fuse the following calls into one launch, until `group_end()`."""
    _load()
    cdef ncclResult_t status
    with nogil:
        status = _api.group_start()
    _check(status)


def group_end():
    _load()
    cdef ncclResult_t status
    with nogil:
        status = _api.group_end()
    _check(status)


def _dtype_code(name):
    try:
        code, size = _DTYPES[name]
    except KeyError:
        raise TypeError(f"NCCL dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None
    if name == "bfloat16" and _version < _V2_10:
        raise TypeError(f"bfloat16 needs NCCL >= 2.10, this is {_version}")
    return code, size


def _op_code(op):
    try:
        code = _OPS[op]
    except KeyError:
        raise ValueError(f"NCCL reduction must be one of {sorted(_OPS)}, got {op!r}") from None
    if op == "avg" and _version < _V2_10:
        raise ValueError(f"op='avg' needs NCCL >= 2.10, this is {_version}")
    return code


def buffer_info(buf, dtype=None):
    """(device pointer, element count, dtype name, read-only) of a contiguous CUDA array.

    `dtype` reinterprets the elements (CuPy has no bfloat16, so bf16 data lives in
    uint16/float16 arrays): it must have the array's element size.
    """
    try:
        cai = buf.__cuda_array_interface__
    except AttributeError:
        raise TypeError(f"expected a CUDA array (with __cuda_array_interface__), got "
                        f"{type(buf).__name__}") from None
    ptr, readonly = cai["data"]
    shape = tuple(cai["shape"])
    typestr = cai["typestr"]
    itemsize = int(typestr[2:])
    count = 1
    for d in shape:
        count *= int(d)
    strides = cai.get("strides")
    if strides is not None and count > 1:
        expected, step = [], itemsize
        for d in reversed(shape):
            expected.append(step)
            step *= int(d)
        if tuple(s for s, d in zip(strides, shape) if d != 1) != \
                tuple(s for s, d in zip(reversed(expected), shape) if d != 1):
            raise ValueError(f"NCCL needs a C-contiguous array, got shape {shape} strides {tuple(strides)}")
    if dtype is None:
        if typestr not in _TYPESTRS:
            raise TypeError(f"NCCL buffers must be float16 or float32 (or pass dtype='bfloat16' "
                            f"for 2-byte data), got typestr {typestr!r}")
        name = _TYPESTRS[typestr]
    else:
        name = str(dtype)
        _, size = _DTYPES.get(name, (None, None))
        if size is None:
            raise TypeError(f"NCCL dtype must be one of {sorted(_DTYPES)}, got {name!r}")
        if size != itemsize:
            raise TypeError(f"dtype={name!r} has {size}-byte elements, the array has {itemsize}-byte ones")
    if count and not ptr:
        raise ValueError("CUDA array with a NULL data pointer")
    return int(ptr), count, name, bool(readonly)


def check_pair(sendbuf, recvbuf, dtype=None):
    """(send pointer, receive pointer, count, dtype name) of two equal CUDA arrays, or an error."""
    sptr, scount, sname, _ = buffer_info(sendbuf, dtype)
    rptr, rcount, rname, readonly = buffer_info(recvbuf, dtype)
    if readonly:
        raise ValueError("the receive buffer is read-only")
    if scount != rcount or sname != rname:
        raise ValueError(f"send and receive buffers differ: {scount} x {sname} vs {rcount} x {rname}")
    return sptr, rptr, scount, sname


def check_ptr(ptr, nbytes, count, dtype):
    """Check that `count` elements of `dtype` fit in the `nbytes` at `ptr`; returns the count."""
    _, size = _DTYPES.get(str(dtype), (None, None))
    if size is None:
        raise TypeError(f"NCCL dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    count, nbytes = int(count), int(nbytes)
    if count < 0 or nbytes < 0:
        raise ValueError(f"negative count ({count}) or size ({nbytes} bytes)")
    if count * size > nbytes:
        raise ValueError(f"{count} x {dtype} ({count * size} bytes) does not fit in the "
                         f"{nbytes} bytes at 0x{int(ptr):x}")
    if count and not ptr:
        raise ValueError("NULL device pointer")
    return count


cdef cudaStream_t _stream(stream) except? NULL:
    """0, an integer handle, or an object with `.ptr` (a CuPy stream)."""
    if stream is None:
        return NULL
    handle = getattr(stream, "ptr", stream)
    return <cudaStream_t><uintptr_t>int(handle)


cdef class NcclCommunicator:
    """One rank's NCCL communicator. Create it only after the rank's device is selected."""

    cdef ncclComm_t _comm
    cdef readonly int rank
    cdef readonly int size

    def __cinit__(self):
        self._comm = NULL

    def __init__(self, int size, bytes unique_id, int rank):
        _load()
        if len(unique_id) != UNIQUE_ID_BYTES:
            raise ValueError(f"the NCCL unique id is {UNIQUE_ID_BYTES} bytes, got {len(unique_id)}")
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"rank {rank} is not in a communicator of size {size}")
        cdef ncclUniqueId uid
        memcpy(uid.internal, <const char*>unique_id, UNIQUE_ID_BYTES)
        cdef ncclComm_t comm = NULL
        cdef ncclResult_t status
        with nogil:
            status = _api.comm_init_rank(&comm, size, uid, rank)
        _check(status)
        self._comm = comm
        self.rank = rank
        self.size = size

    cdef ncclComm_t _live(self) except NULL:
        if self._comm == NULL:
            raise ValueError("this NCCL communicator was destroyed or aborted")
        return self._comm

    def all_reduce(self, sendbuf, recvbuf, op="sum", stream=None, dtype=None):
        """recvbuf = reduction of every rank's sendbuf (in place when they are the same array)."""
        sptr, rptr, count, name = check_pair(sendbuf, recvbuf, dtype)
        self._all_reduce(sptr, rptr, count, name, op, stream)

    def all_reduce_ptr(self, send_ptr, send_nbytes, recv_ptr, recv_nbytes, count, dtype,
                       op="sum", stream=None):
        """As `all_reduce`, on raw device pointers, each with the byte size it points to."""
        check_ptr(send_ptr, send_nbytes, count, dtype)
        check_ptr(recv_ptr, recv_nbytes, count, dtype)
        self._all_reduce(send_ptr, recv_ptr, count, dtype, op, stream)

    def _all_reduce(self, send_ptr, recv_ptr, count, dtype, op, stream):
        cdef ncclComm_t comm = self._live()
        code, _ = _dtype_code(dtype)
        cdef ncclRedOp_t c_op = _op_code(op)
        cdef ncclDataType_t c_type = code
        cdef const void* s = <const void*><uintptr_t>int(send_ptr)
        cdef void* r = <void*><uintptr_t>int(recv_ptr)
        cdef size_t n = int(count)
        cdef cudaStream_t st = _stream(stream)
        cdef ncclResult_t status
        with nogil:
            status = _api.all_reduce(s, r, n, c_type, c_op, comm, st)
        _check(status, comm)

    def broadcast(self, sendbuf, recvbuf, int root=0, stream=None, dtype=None):
        """recvbuf on every rank = sendbuf of rank `root`."""
        sptr, rptr, count, name = check_pair(sendbuf, recvbuf, dtype)
        self._broadcast(sptr, rptr, count, name, root, stream)

    def broadcast_ptr(self, send_ptr, send_nbytes, recv_ptr, recv_nbytes, count, dtype,
                      int root=0, stream=None):
        check_ptr(send_ptr, send_nbytes, count, dtype)
        check_ptr(recv_ptr, recv_nbytes, count, dtype)
        self._broadcast(send_ptr, recv_ptr, count, dtype, root, stream)

    def _broadcast(self, send_ptr, recv_ptr, count, dtype, int root, stream):
        cdef ncclComm_t comm = self._live()
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root {root} is not a rank of this communicator (size {self.size})")
        code, _ = _dtype_code(dtype)
        cdef ncclDataType_t c_type = code
        cdef const void* s = <const void*><uintptr_t>int(send_ptr)
        cdef void* r = <void*><uintptr_t>int(recv_ptr)
        cdef size_t n = int(count)
        cdef cudaStream_t st = _stream(stream)
        cdef ncclResult_t status
        with nogil:
            status = _api.broadcast(s, r, n, c_type, root, comm, st)
        _check(status, comm)

    def async_error(self):
        """The communicator's asynchronous error status (0 = none); raises NcclError on failure."""
        cdef ncclComm_t comm = self._live()
        cdef ncclResult_t err = 0
        cdef ncclResult_t status
        with nogil:
            status = _api.comm_get_async_error(comm, &err)
        _check(status, comm)
        return int(err)

    def check_async_error(self):
        """Raise NcclError if a collective of this communicator failed asynchronously."""
        err = self.async_error()
        if err != NCCL_SUCCESS and err != 7:      # 7: ncclInProgress, not a failure
            raise NcclError(err, _message(err, self._comm))

    def abort(self):
        """Free the communicator without waiting for pending operations (unblocks a stuck rank)."""
        self._free(True)

    def destroy(self):
        """Free the communicator after its pending operations; a second call does nothing."""
        self._free(False)

    cdef int _free(self, bint abort) except -1:
        """Abort or destroy the communicator once: the handle is dropped before the call, so a
        failing call is never repeated and a second abort/destroy does nothing."""
        cdef ncclComm_t comm = self._comm
        self._comm = NULL
        if comm == NULL:
            return 0
        cdef ncclResult_t status
        with nogil:
            status = _api.comm_abort(comm) if abort else _api.comm_destroy(comm)
        _check(status)
        return 0

    @property
    def alive(self):
        return self._comm != NULL

    def __dealloc__(self):
        # Destroy (not abort) on garbage collection; errors cannot be raised from here.
        if self._comm != NULL and _lib != NULL:
            with nogil:
                _api.comm_destroy(self._comm)
            self._comm = NULL
