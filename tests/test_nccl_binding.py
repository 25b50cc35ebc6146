"""The Cython NCCL binding: loads, reports NCCL's version and ids, fails clearly without a GPU
or without the library, and refuses malformed buffers before NCCL ever sees them."""
import ast
import importlib.metadata
import re
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import nccl


class FakeCudaArray:
    """Host memory dressed as a CUDA array: enough to exercise the argument checks."""

    def __init__(self, host, typestr=None, strides=None, readonly=False):
        self.host = host
        self.__cuda_array_interface__ = {
            "data": (host.ctypes.data, readonly), "shape": host.shape,
            "typestr": typestr or host.dtype.str, "strides": strides, "version": 3}


def test_library_loads_from_the_wheel_and_reports_its_version():
    assert nccl.is_available(), "install the test extra (nvidia-nccl-cu12)"
    path = nccl.library_path()
    assert path.endswith("libnccl.so.2")
    major, minor, patch = nccl.version_tuple()
    if "site-packages" in path:     # nvidia-nccl-cu12 and -cu13 both install nvidia/nccl/lib/libnccl.so.2
        wheels = [d.version for d in importlib.metadata.distributions()
                  if d.metadata["Name"] in ("nvidia-nccl-cu12", "nvidia-nccl-cu13")]
        assert any(v.startswith(f"{major}.{minor}.{patch}") for v in wheels), wheels
    assert nccl.get_version() == major * 10000 + minor * 100 + patch


def test_reductions_and_dtypes_are_coded_as_the_wheels_nccl_h_codes_them():
    """The binding's own constants (csrc/nccl_decls.h) against the enums of the nccl.h that
    ships with the library: a one-rank all-reduce (below) gives its input back whatever the
    reduction, so a sum coded as another op would show nowhere else without two GPUs."""
    import nvidia.nccl
    header = (Path(list(nvidia.nccl.__path__)[0]) / "include" / "nccl.h").read_text()
    codes = {name: int(value) for name, value in re.findall(r"\b(nccl\w+)\s*=\s*(\d+)", header)}
    assert nccl._OPS == {"sum": codes["ncclSum"], "avg": codes["ncclAvg"]}
    assert {name: code for name, (code, _) in nccl._DTYPES.items()} == {
        "float16": codes["ncclFloat16"], "float32": codes["ncclFloat32"], "bfloat16": codes["ncclBfloat16"]}


def test_unique_ids_are_128_fresh_bytes():
    a, b = nccl.get_unique_id(), nccl.get_unique_id()
    assert isinstance(a, bytes) and len(a) == nccl.UNIQUE_ID_SIZE == 128
    assert a != b


def test_comm_init_without_a_gpu_raises_a_clear_nccl_error():
    """In a process that sees no device (CUDA_VISIBLE_DEVICES empty, so on a GPU machine too):
    an NcclError with its status, name and message, which survives pickling (MPI carries it)."""
    code = ("import pickle\n"
            "from engine import nccl\n"
            "try:\n"
            "    nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)\n"
            "except nccl.NcclError as err:\n"
            "    back = pickle.loads(pickle.dumps(err))\n"
            "    print(repr([type(back) is nccl.NcclError, [err.status, err.name, err.message, str(err)],\n"
            "                [back.status, back.name, back.message, str(back)]]))\n")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout, out.stderr
    same_type, (status, name, message, text), back = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert status != 0 and name.startswith("nccl") and name != "ncclSuccess"
    assert message and name in text
    assert same_type and back == [status, name, message, text]


def test_nccl_error_names_every_status_and_pickles():
    err = nccl.NcclError(4, "invalid argument (count is 0)")
    assert err.name == "ncclInvalidArgument" and "count is 0" in str(err)
    back = pickle.loads(pickle.dumps(err))
    assert (back.status, back.name, back.message) == (4, "ncclInvalidArgument", "invalid argument (count is 0)")
    assert nccl.NcclError(42).name == "ncclResult(42)"


@pytest.mark.parametrize("size,rank,uid_len", [(2, 2, 128), (0, 0, 128), (2, -1, 128), (1, 0, 127)])
def test_comm_init_refuses_bad_arguments(size, rank, uid_len):
    with pytest.raises(ValueError):
        nccl.NcclCommunicator(size, bytes(uid_len), rank)


def test_missing_library_is_reported_with_what_was_tried():
    env = dict(os.environ, ENGINE_NCCL_LIBRARY="/nonexistent/dir/libnccl.so.2")
    code = ("from engine import nccl\n"
            "assert not nccl.is_available()\n"
            "try:\n    nccl.get_unique_id()\nexcept nccl.NcclMissing as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "NCCL is not available" in out.stdout
    assert "/nonexistent/dir/libnccl.so.2" in out.stdout
    assert "pip install nvidia-nccl-cu12" in out.stdout


def test_buffer_info_reads_pointer_count_and_dtype():
    host = np.random.default_rng().standard_normal((3, 5)).astype(np.float32)
    ptr, count, name, readonly = nccl.buffer_info(FakeCudaArray(host))
    assert (ptr, count, name, readonly) == (host.ctypes.data, 15, "float32", False)
    half = host.astype(np.float16)
    assert nccl.buffer_info(FakeCudaArray(half))[2] == "float16"
    bits = half.view(np.uint16)
    assert nccl.buffer_info(FakeCudaArray(bits), dtype="bfloat16")[1:3] == (15, "bfloat16")


def test_pairs_of_different_size_or_dtype_are_refused():
    a = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="differ"):
        nccl.check_pair(FakeCudaArray(a), FakeCudaArray(np.zeros(11, np.float32)))
    with pytest.raises(ValueError, match="differ"):
        nccl.check_pair(FakeCudaArray(a), FakeCudaArray(np.zeros(10, np.float16)))
    with pytest.raises(ValueError, match="read-only"):
        nccl.check_pair(FakeCudaArray(a), FakeCudaArray(a, readonly=True))
    sptr, rptr, count, name = nccl.check_pair(FakeCudaArray(a), FakeCudaArray(a))
    assert sptr == rptr == a.ctypes.data and (count, name) == (10, "float32")


def test_unsupported_or_strided_buffers_are_refused():
    with pytest.raises(TypeError, match="float16 or float32"):
        nccl.buffer_info(FakeCudaArray(np.zeros(4, np.float64)))
    with pytest.raises(TypeError, match="CUDA array"):
        nccl.buffer_info(np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="2-byte"):
        nccl.buffer_info(FakeCudaArray(np.zeros(4, np.float32)), dtype="bfloat16")
    host = np.zeros((4, 6), np.float32)
    with pytest.raises(ValueError, match="C-contiguous"):
        nccl.buffer_info(FakeCudaArray(host[:, ::2], strides=(24, 8)))
    # explicit C strides are contiguous
    assert nccl.buffer_info(FakeCudaArray(host, strides=(24, 4)))[1] == 24


def test_pointer_and_count_must_fit_the_stated_bytes():
    assert nccl.check_ptr(0x1000, 400, 100, "float32") == 100
    assert nccl.check_ptr(0x1000, 400, 200, "bfloat16") == 200
    with pytest.raises(ValueError, match="does not fit"):
        nccl.check_ptr(0x1000, 399, 100, "float32")
    with pytest.raises(ValueError, match="NULL"):
        nccl.check_ptr(0, 400, 100, "float32")
    with pytest.raises(TypeError):
        nccl.check_ptr(0x1000, 400, 100, "float64")


# ---- on a device: a 1-rank communicator really reduces and broadcasts -------------------

@pytest.fixture
def gpu_comm():
    import cupy
    comm = nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)
    yield comm, cupy
    comm.destroy()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("op", ["sum", "avg"])
def test_one_rank_all_reduce(gpu_comm, dtype, op):
    comm, cp = gpu_comm
    host = np.random.default_rng().standard_normal(1000).astype(np.float32)
    if dtype == "bfloat16":     # CuPy has no bf16: keep the top 16 bits of float32 in uint16
        bits = (host.view(np.uint32) >> 16).astype(np.uint16)
        send, recv = cp.asarray(bits), cp.zeros(1000, cp.uint16)
        expected = bits
    else:
        send, recv = cp.asarray(host.astype(dtype)), cp.zeros(1000, dtype)
        expected = host.astype(dtype)
    stream = cp.cuda.Stream(non_blocking=True)
    # send's copy and recv's zeros are queued on the current (null) stream, which a
    # non-blocking stream does not wait for by itself: NCCL could read send early and the
    # zeros land after the result.
    stream.wait_event(cp.cuda.get_current_stream().record())
    comm.all_reduce(send, recv, op=op, stream=stream, dtype="bfloat16" if dtype == "bfloat16" else None)
    stream.synchronize()
    # One rank: sum = avg = input, so this shows that the collective ran on these buffers and
    # stream, not which reduction it made: the reduction's code is checked against nccl.h
    # above, the sum over ranks on stand-ins (tests/test_nccl_comm.py).
    np.testing.assert_array_equal(cp.asnumpy(recv), expected)
    assert comm.async_error() == 0


@pytest.mark.gpu
def test_one_rank_broadcast_in_place_and_destroy_twice(gpu_comm):
    comm, cp = gpu_comm
    host = np.random.default_rng().standard_normal(257).astype(np.float32)
    buf = cp.asarray(host)
    comm.broadcast(buf, buf, root=0)
    cp.cuda.Device().synchronize()
    np.testing.assert_array_equal(cp.asnumpy(buf), host)
    with pytest.raises(ValueError, match="differ"):
        comm.all_reduce(buf, cp.zeros(256, cp.float32))
    comm.destroy()
    comm.destroy()
    assert not comm.alive
    with pytest.raises(ValueError, match="destroyed"):
        comm.all_reduce(buf, buf)


@pytest.mark.gpu
def test_engine_nccl_communicator_of_one_rank_orders_streams_without_host_sync():
    import cupy as cp
    from mpi4py import MPI
    from engine.backend import get_backend
    from engine.comm import NcclCommunicator, create_communicator
    be = get_backend("gpu")
    comm = create_communicator(be, MPI.COMM_SELF)
    assert isinstance(comm, NcclCommunicator) and (comm.rank, comm.size) == (0, 1)
    host = np.random.default_rng().standard_normal(4096).astype(np.float32)
    for dtype in (np.float32, np.float16):
        buf = cp.asarray(host.astype(dtype))
        work = comm.allreduce_async(buf, "avg")
        work.wait()                        # the compute stream now waits for the collective
        out = cp.asnumpy(buf * 1)          # runs on the compute stream, after the all-reduce
        np.testing.assert_array_equal(out, host.astype(dtype))
        assert work.done() or (work.synchronize() is None and work.done())
    started, finished, _ = comm.progress()
    assert started == finished == 2
    comm.close()
