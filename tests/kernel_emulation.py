"""The CUDA kernels run on the host: kernels/*.cu compiled unchanged as C++ against
csrc/cuda_host_shim.h, driven by the real launchers of engine.cuda_ops on NumPy buffers.

    emulated_launch(filename, kernel, grid, block, args)   # a drop-in for cuda_ops._launch
    launch(cu_path, kernel, grid, block, args)             # the same for any .cu file

Each .cu file becomes one shared library, built with g++ and OpenMP (one team of threads per
block, blocks in turn) and `-fsanitize=alignment -fno-sanitize-recover`, so a float4, uint2
or uchar4 access at an address the GPU would refuse aborts the process as a GPU's
"misaligned address" fault ends a job. The entry point of each kernel, `emu_<kernel>(grid,
block, args)`, is generated from the signature kernel_check (tests/kernel_check.py) parses: `args` holds one
pointer per parameter to its value, as cuLaunchKernel takes them. Arrays go in at their real
addresses (a slice at an odd offset stays misaligned), NumPy scalars as the C type of their
parameter, None as a null pointer.

Libraries are cached under build/kernel_emulation/, keyed by a hash of the kernel sources,
the shim, the generated entry points, the compiler command and the compiler's version, so a
session compiles once.
What this does not model: warps, the GPU memory model, speed.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from engine import cuda_ops
from kernel_check import C_TO_NUMPY, check_launch_args, kernel_signatures

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT / "csrc" / "cuda_host_shim.h"
CACHE_DIR = ROOT / "build" / "kernel_emulation"
FLAGS = ("-std=c++17", "-O1", "-fPIC", "-shared", "-fopenmp", "-fsanitize=alignment",
         "-fno-sanitize-recover=all")

# CUDA's launch limits: a grid or block outside them fails on a GPU before any thread runs.
MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_BLOCK = (1024, 1024, 64)
MAX_THREADS_PER_BLOCK = 1024

_libraries: dict = {}
_one_launch_at_a_time = threading.Lock()     # the shim keeps the running block's state in globals


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if not cxx:
        raise RuntimeError("kernel emulation needs a C++ compiler with OpenMP: no g++ on PATH and CXX unset")
    return cxx


# What makes a block's threads depend on each other: a file using none of these (nor do the
# headers it includes) has its threads run one after the other (emu_launch_serial), else as
# a team per block (emu_launch).
BLOCK_COOPERATION = ("__syncthreads", "__shared__", "__shfl", "__syncwarp")


def _with_headers(cu: Path, seen=None) -> str:
    """The text of `cu` and of every header it includes with #include "...", recursively."""
    seen = set() if seen is None else seen
    seen.add(cu)
    text = cu.read_text()
    for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', text, flags=re.M):
        header = cu.parent / name
        if header.exists() and header not in seen:
            text += _with_headers(header, seen)
    return text


def entry_points(cu: Path) -> str:
    """C++ that includes the CUDA file `cu` and defines emu_<kernel> for each of its kernels."""
    text = cu.read_text()
    run = "emu_launch" if any(word in _with_headers(cu) for word in BLOCK_COOPERATION) else "emu_launch_serial"
    lines = [f'#include "{cu}"', ""]
    for kernel, params in kernel_signatures(text).items():
        values = ", ".join(f"*({p.ctype}**)args[{k}]" if p.pointer else f"*({p.ctype}*)args[{k}]"
                           for k, p in enumerate(params))
        lines += [f'extern "C" void emu_{kernel}(const unsigned int* grid, const unsigned int* block, void** args)',
                  f'{{ {run}("{kernel}", grid, block, [=] {{ {kernel}({values}); }}); }}', ""]
    return "\n".join(lines)


def library_path(cu: Path) -> Path:
    """Build (once per content) and return the shared library of the CUDA file `cu`."""
    cxx = compiler()
    source = entry_points(cu)
    command = [cxx, *FLAGS, "-include", str(SHIM)]
    texts = [p.read_text() for p in (cu, *sorted(cu.parent.glob("*.cuh")), SHIM)]
    key = hashlib.sha256("\0".join([*texts, source, *command, _compiler_version(cxx)]).encode())
    target = CACHE_DIR / f"{cu.stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as tmp:
        cc, so = Path(tmp, "entry.cc"), Path(tmp, "lib.so")
        cc.write_text(source)
        res = subprocess.run([*command, str(cc), "-o", str(so)], capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"kernel emulation: building {cu} failed:\n{res.stderr}")
        os.replace(so, target)   # atomic: a concurrent session sees the whole library or none
    return target


def _compiler_version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout


def _kernel(cu: Path, kernel: str):
    """The signature and the entry point of `kernel` in `cu` (its library loaded once)."""
    lib = _libraries.get(cu)
    if lib is None:
        lib = _libraries[cu] = (ctypes.CDLL(str(library_path(cu))), kernel_signatures(cu.read_text()))
    params = lib[1].get(kernel)
    if params is None:
        raise ValueError(f"kernel emulation: {cu.name} has no kernel {kernel!r}")
    return params, getattr(lib[0], f"emu_{kernel}")


def _dims(name: str, dims: tuple, limits: tuple) -> tuple:
    full = (*dims, 1, 1)[:3]
    if len(dims) > 3 or any(not 1 <= d <= hi for d, hi in zip(full, limits)):
        raise ValueError(f"kernel emulation: {name} {dims} outside CUDA's limits {limits}")
    return full


def emulated_launch(filename: str, kernel: str, grid: tuple, block: tuple, args: tuple) -> None:
    """Run `kernel` of kernels/<filename> on the host, as cuda_ops._launch runs it on a GPU."""
    launch(cuda_ops.KERNELS_DIR / filename, kernel, grid, block, args)


def launch(cu: Path, kernel: str, grid: tuple, block: tuple, args: tuple) -> None:
    """Run `kernel` of the CUDA file `cu` on the host over `grid` blocks of `block` threads."""
    params, entry = _kernel(Path(cu), kernel)
    problems = check_launch_args(params, args)
    if problems:
        raise TypeError(f"kernel emulation: {Path(cu).name}:{kernel}: " + "; ".join(problems))
    grid, block = _dims("grid", grid, MAX_GRID), _dims("block", block, MAX_BLOCK)
    if block[0] * block[1] * block[2] > MAX_THREADS_PER_BLOCK:
        raise ValueError(f"kernel emulation: block {block} has more than {MAX_THREADS_PER_BLOCK} threads")
    values = []     # the storage each argument pointer points to, alive until the call returns
    for p, a in zip(params, args):
        if p.pointer:
            values.append(ctypes.c_void_p(None if a is None else a.ctypes.data))
        else:
            values.append(np.array(a, dtype=C_TO_NUMPY[p.ctype]))
    argv = (ctypes.c_void_p * len(values))(*(
        ctypes.addressof(v) if isinstance(v, ctypes.c_void_p) else v.ctypes.data for v in values))
    dims = ctypes.c_uint * 3
    with _one_launch_at_a_time:
        entry(dims(*grid), dims(*block), argv)
