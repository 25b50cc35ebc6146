import importlib.abc
import sys
import types

import numpy as np
import pytest
# The real exception type CuPy raises for CUDA runtime errors (cupy is in the test extra).
from cupy_backends.cuda.api.runtime import CUDARuntimeError

from engine import backend
from engine.backend import DeviceError, agree_on_backend, get_backend, job_backend

NO_DEVICE, INSUFFICIENT_DRIVER = 100, 35      # cudaErrorNoDevice, cudaErrorInsufficientDriver


def fake_cupy(monkeypatch, count=0, error=None, driver="12.9", bus_ids=None):
    """Put a stand-in CuPy in sys.modules whose device count is `count` or whose count call
    raises `error` (a real CUDARuntimeError); `driver` is what libcuda reports (None: no
    driver); device i sits at PCI bus `bus_ids[i]` (default: ordinal i at bus i, as when
    CUDA_VISIBLE_DEVICES is unset). Returns the list of devices the code under test bound
    with Device(i).use()."""
    bound = []
    bus_ids = bus_ids or [f"0000:{i + 1:02x}:00.0" for i in range(max(count, 1))]

    def get_device_count():
        if error is not None:
            raise error
        return count

    runtime = types.SimpleNamespace(getDeviceCount=get_device_count, CUDARuntimeError=CUDARuntimeError,
                                    runtimeGetVersion=lambda: 12090)
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(runtime=runtime,
                                      Device=lambda i: types.SimpleNamespace(use=lambda: bound.append(i),
                                                                             pci_bus_id=bus_ids[i]))
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(backend, "_driver_cuda_version", lambda: driver)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return bound


def test_cpu_backend_is_numpy_with_noop_streams():
    be = get_backend("cpu")
    assert be.name == "cpu" and be.xp is np and not be.is_gpu and be.device_id is None
    a = be.asarray([1.5, 2.5], dtype=np.float32)
    ev = be.event()
    with be.stream() as s:
        ev.record(s)
        ev.wait_on(s)
    ev.synchronize()
    be.synchronize()
    assert ev.done()
    np.testing.assert_array_equal(be.asnumpy(a), np.array([1.5, 2.5], np.float32))


def test_unknown_device_names_the_option():
    with pytest.raises(DeviceError, match="--device must be one of cpu, gpu, auto"):
        get_backend("tpu")


def test_without_cupy_auto_trains_on_the_cpu_and_gpu_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)    # import cupy raises ModuleNotFoundError
    assert backend.probe_gpus() == (0, "CuPy is not installed (install the 'gpu' extra: "
                                       "pip install -e '.[gpu]')", False)
    be = get_backend("auto")
    assert be.name == "cpu" and "CuPy is not installed" in be.why_not_gpu
    with pytest.raises(DeviceError, match=r"--device gpu: no usable CUDA device: CuPy is not installed"):
        get_backend("gpu")


def test_a_cupy_that_fails_to_import_is_not_a_missing_gpu(monkeypatch):
    class BrokenCupy(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "cupy":
                raise ImportError("libnvrtc.so.12: cannot open shared object file")

    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.setattr(sys, "meta_path", [BrokenCupy(), *sys.meta_path])
    found = backend.probe_gpus()
    assert found.count == 0 and found.broken and "libnvrtc.so.12" in found.reason
    with pytest.raises(DeviceError, match="does not work: CuPy is installed but does not import.*--device cpu"):
        get_backend("auto")


def test_without_a_driver_auto_trains_on_the_cpu(monkeypatch):
    fake_cupy(monkeypatch, error=CUDARuntimeError(INSUFFICIENT_DRIVER), driver=None)
    assert get_backend("auto").why_not_gpu == "no NVIDIA driver: libcuda.so.1 cannot be loaded"
    with pytest.raises(DeviceError, match="libcuda.so.1 cannot be loaded"):
        get_backend("gpu")


def test_a_driver_older_than_the_runtime_refuses_auto_with_both_versions(monkeypatch):
    fake_cupy(monkeypatch, error=CUDARuntimeError(INSUFFICIENT_DRIVER), driver="11.4")
    found = backend.probe_gpus()
    assert found.count == 0 and found.broken
    for part in ("CUDA error 35", "cudaErrorInsufficientDriver", "driver supports CUDA 11.4",
                 "runtime is CUDA 12.9"):
        assert part in found.reason, found.reason
    with pytest.raises(DeviceError, match="--device auto found a GPU stack that does not work: CUDA error 35"):
        get_backend("auto")
    with pytest.raises(DeviceError, match="--device gpu: no usable CUDA device: CUDA error 35"):
        get_backend("gpu")


def test_visible_devices_that_hide_every_gpu_are_named(monkeypatch):
    fake_cupy(monkeypatch, error=CUDARuntimeError(NO_DEVICE))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    found = backend.probe_gpus()
    assert not found.broken and "CUDA_VISIBLE_DEVICES='7'" in found.reason
    assert "cudaErrorNoDevice" in found.reason
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", " ")
    assert backend.probe_gpus().reason == "CUDA_VISIBLE_DEVICES is set but empty: it hides every GPU"
    assert get_backend("auto").name == "cpu"


def test_gpu_backend_binds_local_rank_modulo_the_count(monkeypatch):
    bound = fake_cupy(monkeypatch, count=2)
    be = get_backend("auto", local_rank=3)
    assert (be.name, be.device_id, be.visible, bound) == ("gpu", 1, 2, [1])
    assert be.xp is sys.modules["cupy"]


@pytest.mark.parametrize("var", ["MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"])
def test_local_rank_read_from_launcher_environment(monkeypatch, var):
    for v in backend._LOCAL_RANK_VARS:
        monkeypatch.delenv(v, raising=False)
    assert backend.local_rank_from_env() == 0
    monkeypatch.setenv(var, "3")
    assert backend.local_rank_from_env() == 3


@pytest.mark.gpu
def test_gpu_backend_binds_device_from_local_rank():
    import cupy
    n = backend.gpu_count()
    before = cupy.cuda.runtime.getDevice()
    try:
        be = get_backend("gpu", local_rank=n + 1)
        assert be.xp is cupy and be.device_id == (n + 1) % n
        assert cupy.cuda.Device().id == be.device_id
        x = be.asarray(np.arange(5, dtype=np.float32))
        ev = be.event()
        ev.record(be.current_stream())
        ev.synchronize()
        assert ev.done()
        np.testing.assert_array_equal(be.asnumpy(x * 2), np.arange(5) * 2)
    finally:
        # Later tests allocate on whatever device is bound: left on device 1, a subset run
        # (-k, or these two files alone) would give test_kernels_gpu's optimizer test its
        # parameters there and, once get_backend binds device 0, its state on another GPU.
        cupy.cuda.Device(before).use()


# ---- ranks agree on the backend (mpiexec -n 2) ------------------------------------------

def backend_of_rank(monkeypatch, comm, counts, launcher_sets_local_rank=True):
    """get_backend("auto") on this rank with `counts[rank]` GPUs visible (stand-in CuPy),
    its local rank read from the launcher's environment, or 0 when the launcher sets none."""
    count = counts[comm.rank]
    fake_cupy(monkeypatch, count=count, error=None if count else CUDARuntimeError(NO_DEVICE))
    for var in backend._LOCAL_RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    if launcher_sets_local_rank:
        monkeypatch.setenv("MPI_LOCALRANKID", str(comm.rank))
    return get_backend("auto")


REFUSALS = {
    "a-rank-without-gpu": ((2, 0), True, r"(?s)ranks chose different backends.*rank 0: gpu 0 of 2 visible"
                                         r".*rank 1: cpu \(the NVIDIA driver sees no CUDA device"),
    "more-ranks-than-gpus": ((1, 1), True, r"rank 0 \(local rank 0, device 0 of 1 visible\), rank 1 \(local rank 1, "
                                           r"device 0 of 1 visible\) would share the GPU at PCI 0000:01:00.0: "
                                           r"2 ranks run on this host.*Duplicate GPU"),
    "no-local-rank-from-the-launcher": ((2, 2), False, r"rank 0 \(local rank 0, device 0 of 2 visible\), rank 1 "
                                                       r"\(local rank 0, device 0 of 2 visible\) would share the GPU "
                                                       r"at PCI 0000:01:00.0.*check that the launcher sets a local rank"),
}


class RanksInTurn:
    """The world of ranks of one host, simulated one after another in this process: each
    allgather adds the caller's entry and returns every entry so far, so the last rank's
    agree_on_backend judges them all."""

    def __init__(self):
        self.entries = []

    def allgather(self, entry):
        self.entries.append(entry)
        return list(self.entries)


# (CUDA_VISIBLE_DEVICES as PCI bus ids per rank, whether NCCL would find a duplicate GPU)
VISIBLE_PER_RANK = {
    # Slurm --gpus-per-task=1: each rank sees only its own GPU, as its device 0
    "own-gpu-each-as-device-0": ((["0000:01:00.0"], ["0000:02:00.0"]), False),
    # both ranks see the same one GPU
    "one-gpu-for-two": ((["0000:01:00.0"], ["0000:01:00.0"]), True),
    # rank 1's mask lists the GPUs the other way round: its device 1 is rank 0's device 0
    "one-gpu-under-two-ordinals": ((["0000:01:00.0", "0000:02:00.0"], ["0000:02:00.0", "0000:01:00.0"]), True),
}


@pytest.mark.parametrize("visible, duplicate", VISIBLE_PER_RANK.values(), ids=VISIBLE_PER_RANK)
def test_ranks_share_a_gpu_when_nccl_would_say_so(monkeypatch, visible, duplicate):
    """A device is its PCI bus id on its host, as NCCL's "Duplicate GPU" check tells them
    apart, not the ordinal, which CUDA_VISIBLE_DEVICES renumbers per rank."""
    world = RanksInTurn()
    for rank, bus_ids in enumerate(visible):
        fake_cupy(monkeypatch, count=len(bus_ids), bus_ids=bus_ids)
        monkeypatch.setenv("MPI_LOCALRANKID", str(rank))
        be = get_backend("gpu")
        if rank < len(visible) - 1 or not duplicate:
            agree_on_backend(world, be)
        else:
            with pytest.raises(DeviceError, match=r"would share the GPU at PCI 0000:01:00\.0.*Duplicate GPU"):
                agree_on_backend(world, be)


@pytest.mark.mpi
@pytest.mark.parametrize("counts, launcher_sets_local_rank, message", REFUSALS.values(), ids=REFUSALS)
def test_ranks_that_cannot_work_together_all_stop_with_one_message(monkeypatch, comm, counts,
                                                                   launcher_sets_local_rank, message):
    assert comm.size == 2
    be = backend_of_rank(monkeypatch, comm, counts, launcher_sets_local_rank)
    with pytest.raises(DeviceError, match=message):
        agree_on_backend(comm, be)


@pytest.mark.mpi
@pytest.mark.parametrize("counts", [(2, 2), (0, 0)], ids=["one-gpu-each", "all-cpu"])
def test_agreeing_ranks_pass(monkeypatch, comm, counts):
    be = backend_of_rank(monkeypatch, comm, counts)
    agree_on_backend(comm, be)
    assert be.name == ("gpu" if counts[0] else "cpu")


@pytest.mark.mpi
@pytest.mark.parametrize("counts, failing", [((0, 0), "0, 1"), ((2, 0), "1")], ids=["every-rank", "rank-1"])
def test_a_rank_that_cannot_use_the_device_stops_the_job_with_one_message(monkeypatch, comm, counts, failing):
    """--device gpu where a rank sees no GPU: every rank raises the same collective error,
    which names the failing ranks (rank 0 alone prints it)."""
    count = counts[comm.rank]
    fake_cupy(monkeypatch, count=count, error=None if count else CUDARuntimeError(NO_DEVICE))
    monkeypatch.setenv("MPI_LOCALRANKID", str(comm.rank))
    with pytest.raises(DeviceError) as raised:
        job_backend(comm, "gpu")
    assert raised.value.collective
    assert str(raised.value).startswith("--device gpu: no usable CUDA device")
    assert str(raised.value).endswith(f"(rank {failing} of 2)")
    assert str(comm.bcast(str(raised.value))) == str(raised.value)     # the same words on every rank
