"""The one place where CPU and GPU differ in kind: array module, device, streams, events.

Everything else in the engine takes a `Backend` and writes `be.xp.matmul(...)`, so the
same model, optimizer and reducer run on NumPy under MPI and on CuPy under NCCL.
On the CPU, streams and events are no-ops with the same methods, so no caller branches.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from types import ModuleType

import numpy as np

DEVICES = ("cpu", "gpu", "auto")

# Environment variables that MPI launchers set to the rank within the node, most specific first.
_LOCAL_RANK_VARS = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK",
                    "SLURM_LOCALID", "LOCAL_RANK")


class DeviceError(RuntimeError):
    """The requested device cannot be used (no CuPy, no GPU, bad index)."""


def local_rank_from_env() -> int:
    """Rank of this process within its node, from the launcher's environment (0 if unset)."""
    for var in _LOCAL_RANK_VARS:
        if var in os.environ:
            return int(os.environ[var])
    return 0


def array_module(a) -> ModuleType:
    """cupy for a CuPy array, numpy otherwise; never imports CuPy itself (a CuPy array can
    only exist once CuPy is imported), so NumPy-only code paths stay free of it."""
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(a, cupy.ndarray):
        return cupy
    return np


def host_math(*arrays):
    """engine.hostmath (the C loops of the CPU path) when every array is float32 NumPy;
    None otherwise, or when the extension is not built: callers then run NumPy code."""
    if not all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in arrays):
        return None
    try:
        from engine import hostmath
    except ImportError:
        return None
    return hostmath


def gpu_count() -> int:
    """Number of CUDA devices CuPy can see; 0 when CuPy or the driver is missing."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # ImportError, CUDARuntimeError (no driver), ...: no usable GPU
        return 0


class _HostStream:
    """A CPU stand-in for a CUDA stream: work on the host is already ordered."""

    def synchronize(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _HostEvent:
    """A CPU stand-in for a CUDA event: recorded work on the host is already complete."""

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait_on(self, stream) -> None:
        pass

    def done(self) -> bool:
        return True


class _DeviceEvent:
    """A CUDA event with the same three verbs as `_HostEvent`."""

    def __init__(self, cupy):
        self._event = cupy.cuda.Event(disable_timing=True)

    def record(self, stream=None) -> None:
        self._event.record(stream)

    def synchronize(self) -> None:
        self._event.synchronize()

    def wait_on(self, stream) -> None:
        """Make `stream` wait for this event without blocking the host."""
        stream.wait_event(self._event)

    def done(self) -> bool:
        return self._event.done


@dataclass(frozen=True)
class Backend:
    """Array module and execution primitives of one rank."""

    name: str                 # "cpu" or "gpu"
    xp: ModuleType            # numpy or cupy
    device_id: int | None     # CUDA device of this rank; None on the CPU

    @property
    def is_gpu(self) -> bool:
        return self.name == "gpu"

    def synchronize(self) -> None:
        """Block until all work queued on this rank's device is done."""
        if self.is_gpu:
            self.xp.cuda.Device(self.device_id).synchronize()

    def stream(self):
        """A new non-blocking stream (communication runs on its own stream)."""
        return self.xp.cuda.Stream(non_blocking=True) if self.is_gpu else _HostStream()

    def current_stream(self):
        return self.xp.cuda.get_current_stream() if self.is_gpu else _HostStream()

    def event(self):
        return _DeviceEvent(self.xp) if self.is_gpu else _HostEvent()

    def asnumpy(self, a) -> np.ndarray:
        return self.xp.asnumpy(a) if self.is_gpu else np.asarray(a)

    def asarray(self, a, dtype=None):
        return self.xp.asarray(a, dtype=dtype)


def get_backend(device: str = "auto", local_rank: int | None = None) -> Backend:
    """Pick the array module for `device` ("cpu", "gpu" or "auto") and bind the GPU.

    On a GPU, rank `local_rank` of the node takes device `local_rank % count`; it is
    selected here, before any communicator exists, so NCCL sees the right device.
    """
    if device not in DEVICES:
        raise DeviceError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    count = gpu_count() if device != "cpu" else 0
    if device == "gpu" and count == 0:
        raise DeviceError("--device gpu was requested, but no CUDA device is visible "
                          "(install the 'gpu' extra and check nvidia-smi), or use --device cpu")
    if device == "cpu" or count == 0:
        return Backend("cpu", np, None)
    import cupy
    if local_rank is None:
        local_rank = local_rank_from_env()
    device_id = local_rank % count
    cupy.cuda.Device(device_id).use()
    return Backend("gpu", cupy, device_id)
