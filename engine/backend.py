"""The one place where CPU and GPU differ in kind: array module, device, streams, events.

Everything else in the engine takes a `Backend` and writes `be.xp.matmul(...)`, so the
same model, optimizer and reducer run on NumPy under MPI and on CuPy under NCCL.
On the CPU, streams and events are no-ops with the same methods, so no caller branches.
"""
from __future__ import annotations

import ctypes
import os
import socket
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple

import ml_dtypes
import numpy as np

from engine.errors import EngineError

DEVICES = ("cpu", "gpu", "auto")

# Environment variables that MPI launchers set to the rank within the node, most specific first.
_LOCAL_RANK_VARS = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK",
                    "SLURM_LOCALID", "LOCAL_RANK")


class DeviceError(EngineError):
    """The requested device cannot be used (no CuPy, no GPU, a broken driver, ranks that
    disagree); collective where agree_on_backend and job_backend raise it on every rank."""


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


def device_of(xp):
    """The current CUDA device of the array module xp (None for NumPy): the key of the
    engine's per-device caches (engine.cuda_ops's scratch, engine.transforms's constants)."""
    return None if xp is np else xp.cuda.runtime.getDevice()


def fused_kernels(*arrays):
    """engine.cuda_ops (the fused CUDA kernels) when every array is a float32 or bfloat16
    device array (anything but a NumPy array: CuPy); None otherwise (NumPy, float64 CuPy):
    callers then run their generic code."""
    if not all(not isinstance(a, np.ndarray) and a.dtype in (np.float32, ml_dtypes.bfloat16) for a in arrays):
        return None
    from engine import cuda_ops
    return cuda_ops


class GpuProbe(NamedTuple):
    """What `probe_gpus` found: `count` usable CUDA devices, or 0 and the reason why.

    `broken` tells an absent GPU (no CuPy, no NVIDIA driver, no device, devices hidden by
    CUDA_VISIBLE_DEVICES) from a GPU stack that is there but fails (driver older than
    CuPy's runtime, CuPy that does not import, an unexpected CUDA error): `--device auto`
    may train on the CPU in the first case, never in the second."""

    count: int
    reason: str
    broken: bool


# cudaErrorNoDevice: the driver works and finds no device (or none that CUDA_VISIBLE_DEVICES lets through).
_CUDA_ERROR_NO_DEVICE = 100
_INSTALL_HINT = "install the 'gpu' extra: pip install -e '.[gpu]'"


def _cuda_version(v: int) -> str:
    """CUDA's integer version (12040) as people write it (12.4)."""
    return f"{v // 1000}.{v % 1000 // 10}"


def _driver_cuda_version() -> str | None:
    """The CUDA version the installed NVIDIA driver supports ("12.4"); None when
    libcuda.so.1, which only the driver installs, cannot be loaded."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return "unknown"
    return _cuda_version(version.value)


def _visible_devices_note() -> str:
    """How CUDA_VISIBLE_DEVICES restricts the devices, for a message ('' when unset)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "" if value is None else f" (CUDA_VISIBLE_DEVICES={value!r})"


def probe_gpus() -> GpuProbe:
    """Count the CUDA devices CuPy can use, and say why when there are none.

    Never raises: every failure becomes a reason naming its cause (the CUDA error's
    name and text, the driver's and the runtime's CUDA versions)."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and not hidden.strip():
        return GpuProbe(0, "CUDA_VISIBLE_DEVICES is set but empty: it hides every GPU", False)
    try:
        import cupy
    except ModuleNotFoundError as e:
        if e.name != "cupy":     # CuPy is there but one of its own dependencies is not
            return GpuProbe(0, f"CuPy is installed but does not import: {e}", True)
        return GpuProbe(0, f"CuPy is not installed ({_INSTALL_HINT})", False)
    except Exception as e:   # CuPy's import can fail in its extension modules, with any type
        return GpuProbe(0, f"CuPy is installed but does not import: {type(e).__name__}: {e}", True)
    driver = _driver_cuda_version()
    if driver is None:
        return GpuProbe(0, "no NVIDIA driver: libcuda.so.1 cannot be loaded", False)
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as e:
        if e.status == _CUDA_ERROR_NO_DEVICE:
            return GpuProbe(0, f"the NVIDIA driver sees no CUDA device{_visible_devices_note()}: {e}", False)
        runtime = _cuda_version(cupy.cuda.runtime.runtimeGetVersion())
        return GpuProbe(0, f"CUDA error {e.status} {e}{_visible_devices_note()}; the driver supports CUDA "
                           f"{driver}, CuPy's runtime is CUDA {runtime}", True)
    if count == 0:
        return GpuProbe(0, f"the NVIDIA driver sees no CUDA device{_visible_devices_note()}", False)
    return GpuProbe(count, "", False)


def gpu_count() -> int:
    """Number of CUDA devices CuPy can use (0, for whatever reason: see `probe_gpus`)."""
    return probe_gpus().count


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
    visible: int = 0          # CUDA devices this rank's process sees
    why_not_gpu: str = ""     # on the CPU under --device auto: why no GPU was usable
    bus_id: str = ""          # PCI bus id of the device: what tells two GPUs of a host apart

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

    "auto" takes the GPU when one is usable and the CPU when there is no GPU stack at all
    (no CuPy, no driver, no device); a GPU stack that is there but fails (a driver older
    than CuPy's runtime, ...) is an error that names the cause, never a silent CPU run.
    On a GPU, rank `local_rank` of the node takes device `local_rank % count`; it is
    selected here, before any communicator exists, so NCCL sees the right device.
    """
    if device not in DEVICES:
        raise DeviceError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return Backend("cpu", np, None)
    probe = probe_gpus()
    if probe.count == 0:
        if device == "gpu":
            raise DeviceError(f"--device gpu: no usable CUDA device: {probe.reason} (or use --device cpu)")
        if probe.broken:
            raise DeviceError(f"--device auto found a GPU stack that does not work: {probe.reason}; "
                              "fix it, or pass --device cpu to train on the CPU")
        return Backend("cpu", np, None, why_not_gpu=probe.reason)
    import cupy
    if local_rank is None:
        local_rank = local_rank_from_env()
    device_id = local_rank % probe.count
    device = cupy.cuda.Device(device_id)
    device.use()
    return Backend("gpu", cupy, device_id, visible=probe.count, bus_id=device.pci_bus_id)


def job_backend(world, device: str) -> Backend:
    """get_backend on every rank of `world` (an mpi4py communicator), then agree_on_backend.

    Collective. A rank that cannot use `device` stops the whole job with ONE message (said
    by rank 0) naming every failing rank and its reason, instead of one report per rank."""
    from engine.guard import on_every_rank
    backend = on_every_rank(world, lambda: get_backend(device), DeviceError)
    agree_on_backend(world, backend)
    return backend


def agree_on_backend(world, backend: Backend) -> None:
    """Stop every rank with one message unless all ranks chose the same backend and, on
    GPUs, no two ranks of a host bound the same device.

    Collective over `world` (an mpi4py communicator): call it on every rank after
    `get_backend` and before any communicator exists. A CPU rank among GPU ranks would
    otherwise enter MPI collectives while the others enter NCCL ones (a hang), and two
    ranks on one device make NCCL fail with "Duplicate GPU". A device is its PCI bus id on
    its host, as NCCL tells them apart: the ordinal names different GPUs in ranks that
    CUDA_VISIBLE_DEVICES gives different devices (one GPU per rank under Slurm's
    --gpus-per-task, each rank's device 0), and one GPU under two ordinals in others."""
    me = (backend.name, backend.visible, backend.why_not_gpu, local_rank_from_env(),
          socket.gethostname(), backend.device_id, backend.bus_id)
    everyone = world.allgather(me)
    names = sorted({name for name, *_ in everyone})
    if len(names) > 1:
        lines = [f"rank {r}: " + (f"gpu {device_id} of {visible} visible" if name == "gpu" else f"cpu ({why or 'requested'})")
                 for r, (name, visible, why, _, _, device_id, _) in enumerate(everyone)]
        raise DeviceError("ranks chose different backends, so their collectives would not match:\n  "
                          + "\n  ".join(lines) + "\nmake every rank see the same devices, or pass --device cpu",
                          collective=True)
    if names == ["gpu"]:
        _check_one_rank_per_device(everyone)


def _check_one_rank_per_device(everyone) -> None:
    by_device: dict = {}
    for r, (_, visible, _, local_rank, host, device_id, bus_id) in enumerate(everyone):
        by_device.setdefault((host, bus_id), []).append((r, local_rank, device_id, visible))
    for (host, bus_id), ranks in sorted(by_device.items()):
        if len(ranks) > 1:
            on_host = sum(1 for *_, h, _, _ in everyone if h == host)
            shown = ", ".join(f"rank {r} (local rank {lr}, device {d} of {v} visible)" for r, lr, d, v in ranks)
            raise DeviceError(f"{host}: {shown} would share the GPU at PCI {bus_id}: {on_host} ranks run on "
                              f"this host; NCCL refuses two ranks on one device ('Duplicate GPU'): start at most "
                              "as many ranks per node as it has GPUs, check that the launcher sets a local "
                              "rank, and that CUDA_VISIBLE_DEVICES does not give two ranks the same GPU",
                              collective=True)


if __name__ == "__main__":     # make gpu-check: the device count, or why there is none (exit 1)
    import argparse
    argparse.ArgumentParser(prog="python -m engine.backend",
                            description="Probe the CUDA devices this process can use: print how many, "
                                        "or why there is none and exit 1 (what make gpu-check runs first).").parse_args()
    found = probe_gpus()
    if found.count == 0:
        sys.exit(f"gpu-check: no usable CUDA device: {found.reason}")
    print(f"gpu-check: {found.count} CUDA device(s) visible")
