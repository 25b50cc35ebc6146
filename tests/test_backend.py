import numpy as np
import pytest

from engine import backend
from engine.backend import DeviceError, get_backend


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


def test_gpu_requested_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backend, "gpu_count", lambda: 0)
    with pytest.raises(DeviceError, match="no CUDA device is visible"):
        get_backend("gpu")


def test_auto_without_gpu_falls_back_to_cpu(monkeypatch):
    monkeypatch.setattr(backend, "gpu_count", lambda: 0)
    assert get_backend("auto").name == "cpu"


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
    be = get_backend("gpu", local_rank=n + 1)
    assert be.xp is cupy and be.device_id == (n + 1) % n
    assert cupy.cuda.Device().id == be.device_id
    x = be.asarray(np.arange(5, dtype=np.float32))
    ev = be.event()
    ev.record(be.current_stream())
    ev.synchronize()
    assert ev.done()
    np.testing.assert_array_equal(be.asnumpy(x * 2), np.arange(5) * 2)
