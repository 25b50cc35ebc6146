"""Checks of the CUDA kernels that need no GPU: NVRTC compile, ptxas report, SASS, signatures.

The kernels are compiled here with the options NVRTC receives at run time: engine.cuda_ops's
NVRTC_OPTIONS (imported, never copied) as CuPy's RawModule assembles them with its own:

    runtime_options("sm_80") -> (..., *NVRTC_OPTIONS, ..., "-ftz=true", "-arch=sm_80", ...)
    compile_kernel_file(path, "sm_80") -> Compiled(ptx, cubin, log)   # NVRTC through ctypes, the
                                                                      # loader's source and options
    ptxas_report(compiled.log) -> {kernel: PtxasInfo(registers, spill_stores, spill_loads, ...)}
    global_load_widths(compiled.ptx) -> {kernel: {bits: count}}       # from PTX ld.global*
    sass_global_load_widths(cubin) -> {kernel: {bits: count}}         # nvdisasm (sm_80, sm_90)
    kernel_signatures(source) -> {kernel: [Param(ctype, pointer)]}    # the extern "C" kernels
    check_launch_args(params, args) -> [problems]                     # numpy types vs C types

NVRTC comes from the nvidia-cuda-nvrtc-cu12 wheel (libnvrtc.so.12) or a CUDA 13 wheel
(nvidia/cu13/lib/libnvrtc.so.13), found through the `nvidia` package, or from the system
library path. It generates code for sm_70 to sm_90 without a
device; with `--ptxas-options=-v` its log carries ptxas's register and spill report.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from engine.cuda_ops import KERNELS_DIR, NVRTC_OPTIONS, kernel_source

ARCHS = ("sm_70", "sm_80", "sm_90")
PTXAS_VERBOSE = "--ptxas-options=-v"


class NvrtcError(RuntimeError):
    """NVRTC is missing or rejected a kernel; the message carries NVRTC's log."""


# Where the NVIDIA wheels put libnvrtc, under the `nvidia` namespace package: the CUDA 12
# wheel (nvidia-cuda-nvrtc-cu12) in cuda_nvrtc/lib, the CUDA 13 ones in cu13/lib.
NVRTC_WHEEL_DIRS = ("cuda_nvrtc/lib", "cu13/lib")


def _find_nvrtc() -> str:
    try:
        spec = importlib.util.find_spec("nvidia")
    except ModuleNotFoundError:
        spec = None
    for where in (spec.submodule_search_locations or []) if spec is not None else []:
        for sub in NVRTC_WHEEL_DIRS:
            libs = sorted(Path(where, sub).glob("libnvrtc.so*"))
            if libs:
                return str(libs[0])
    found = ctypes.util.find_library("nvrtc")
    if found:
        return found
    raise NvrtcError("libnvrtc not found in the nvidia-cuda-nvrtc-cu12 or CUDA 13 wheels (nvidia/"
                     + " or nvidia/".join(NVRTC_WHEEL_DIRS) + ") nor on the system library path: "
                     "install the test extra (pip install -e '.[test]')")


_NVRTC = None
# What a compiled program yields: (size call, copy call) of NVRTC.
_OUTPUTS = {"log": ("nvrtcGetProgramLogSize", "nvrtcGetProgramLog"),
            "ptx": ("nvrtcGetPTXSize", "nvrtcGetPTX"),
            "cubin": ("nvrtcGetCUBINSize", "nvrtcGetCUBIN")}


def nvrtc():
    """The NVRTC library, loaded once, with the argument types of the calls used here."""
    global _NVRTC
    if _NVRTC is None:
        lib = ctypes.CDLL(_find_nvrtc())
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        lib.nvrtcCreateProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_char_p,
                                           ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.nvrtcCompileProgram.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        for size_fn, get_fn in _OUTPUTS.values():
            getattr(lib, size_fn).argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
            getattr(lib, get_fn).argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        _NVRTC = lib
    return _NVRTC


def nvrtc_version() -> tuple:
    major, minor = ctypes.c_int(), ctypes.c_int()
    nvrtc().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def _read(lib, prog, what) -> bytes:
    size_fn, get_fn = _OUTPUTS[what]
    size = ctypes.c_size_t()
    getattr(lib, size_fn)(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    getattr(lib, get_fn)(prog, buf)
    return buf.raw[:size.value]


@dataclass(frozen=True)
class Compiled:
    arch: str
    ptx: str
    cubin: bytes
    log: str


def compile_kernel_file(path, arch: str, extra=()) -> Compiled:
    """Compile one kernels/*.cu file as the loader does (its source text, its options) for `arch`."""
    name = Path(path).name
    return compile_source(kernel_source(name), name, arch, extra)


# ---- the options CuPy hands NVRTC -----------------------------------------------------
# cupy.RawModule(code, options, backend="nvrtc") compiles through cupy._core.core.compile_with_cache
# (CuPy 13 and 14), which calls assemble_cupy_compiler_options: CCCL include dirs, then ours,
# then CuPy's include dir and the CUDA include dir (the nvidia-cuda-runtime wheel's, or the
# toolkit's). cupy.cuda.compiler then appends "-ftz=true" (_compile_with_cache_cuda), the
# architecture ("-arch=sm_XX": a cubin, for architectures this NVRTC knows) and, RawModule
# not using Jitify, "--device-as-default-execution-space". NVRTC takes the LAST of two
# conflicting options, so an "-ftz=false" of ours cannot undo CuPy's "-ftz=true".
_OPTIONS_PROBE = "// kernel_check: capture CuPy's NVRTC options\n"


class _Captured(Exception):
    pass


def reassembled_options(arch: str) -> tuple:
    """What CuPy adds to NVRTC_OPTIONS for `arch`, re-assembled without CuPy: all of it but the
    include dirs, which exist only where CuPy is installed (our kernels include none of theirs)."""
    return (*NVRTC_OPTIONS, "-ftz=true", f"-arch={arch}", "--device-as-default-execution-space")


def cupy_options(arch: str) -> tuple:
    """CuPy's own assembly of NVRTC_OPTIONS for `arch`, from CuPy's code: RawModule's compile
    path runs up to its NVRTC call for a probe source, which records the options and stops it.
    No device is needed: the architecture is given and the per-device memo of CuPy's
    architecture option is bypassed. Raises ImportError without CuPy."""
    from cupy._core import core
    from cupy.cuda import compiler

    seen = []
    program_compile = compiler._NVRTCProgram.compile
    arch_option = compiler._get_arch_for_options_for_nvrtc

    def capture(program, options=(), log_stream=None):
        if program.src == _OPTIONS_PROBE:
            seen.append(tuple(options))
            raise _Captured
        return program_compile(program, options, log_stream)    # CuPy's own preprocess of ''

    compiler._NVRTCProgram.compile = capture
    compiler._get_arch_for_options_for_nvrtc = getattr(arch_option, "__wrapped__", arch_option)
    try:
        core.compile_with_cache(_OPTIONS_PROBE, NVRTC_OPTIONS, arch=arch.removeprefix("sm_"),
                                prepend_cupy_headers=False, backend="nvrtc")
    except _Captured:
        pass
    finally:
        compiler._NVRTCProgram.compile = program_compile
        compiler._get_arch_for_options_for_nvrtc = arch_option
    if len(seen) != 1:
        raise RuntimeError(f"CuPy's compile path did not reach NVRTC for the options probe ({len(seen)} calls): "
                           "tests/kernel_check.py does not know this CuPy version")
    return seen[0]


@functools.lru_cache(maxsize=None)
def runtime_options(arch: str) -> tuple:
    """The options NVRTC receives when CuPy compiles our kernels for `arch` ("sm_80"): CuPy's
    own assembly where CuPy imports, else `reassembled_options`."""
    try:
        return cupy_options(arch)
    except ImportError:
        return reassembled_options(arch)


def compile_source(source: str, name: str, arch: str, extra=(), options=None) -> Compiled:
    """Compile CUDA source with `options` (default: the run-time options for `arch`,
    `runtime_options`) plus `extra`."""
    lib = nvrtc()
    prog = ctypes.c_void_p()
    status = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None)
    if status:
        raise NvrtcError(f"{name}: nvrtcCreateProgram: {lib.nvrtcGetErrorString(status).decode()}")
    try:
        options = [*(runtime_options(arch) if options is None else options), *extra]
        argv = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        status = lib.nvrtcCompileProgram(prog, len(options), argv)
        log = _read(lib, prog, "log").rstrip(b"\0").decode(errors="replace")
        if status:
            raise NvrtcError(f"{name} for {arch}: {lib.nvrtcGetErrorString(status).decode()}\n{log}")
        ptx = _read(lib, prog, "ptx").rstrip(b"\0").decode()
        cubin = _read(lib, prog, "cubin")
        return Compiled(arch, ptx, cubin, log)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def kernel_files():
    """Every CUDA source of the project (one per fused op)."""
    return sorted(KERNELS_DIR.glob("*.cu"))


# ---- ptxas report --------------------------------------------------------------------

@dataclass(frozen=True)
class PtxasInfo:
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int


_PTXAS_FUNC = re.compile(r"Compiling entry function '(\w+)'|Function properties for (\w+)")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_report(log: str) -> dict:
    """Per kernel: registers, spill stores/loads and stack frame, from ptxas -v output."""
    out, current, frame = {}, None, None
    for line in log.splitlines():
        if m := _PTXAS_FUNC.search(line):
            current = m.group(1) or m.group(2)
        if m := _PTXAS_SPILL.search(line):
            frame = tuple(int(x) for x in m.groups())
        if (m := _PTXAS_USED.search(line)) and current:
            stack, stores, loads = frame or (0, 0, 0)
            out[current] = PtxasInfo(int(m.group(1)), stores, loads, stack)
            frame = None
    return out


# ---- widths of global loads ----------------------------------------------------------

_PTX_ENTRY = re.compile(r"\.entry (\w+)\(")
_PTX_LD = re.compile(r"\bld\.global(?:\.nc)?(?:\.v(\d))?\.(?:[bfsu])(\d+)")


def global_load_widths(ptx: str) -> dict:
    """Per kernel, a count of global loads by width in bits (128 = vectorized float4)."""
    out, current = {}, None
    for line in ptx.splitlines():
        if m := _PTX_ENTRY.search(line):
            current = m.group(1)
            out[current] = {}
        elif current and (m := _PTX_LD.search(line)):
            bits = int(m.group(1) or 1) * int(m.group(2))
            out[current][bits] = out[current].get(bits, 0) + 1
    return out


def nvdisasm_path():
    """nvdisasm from the nvidia-cuda-nvdisasm wheel or the CUDA toolkit, or None."""
    spec = importlib.util.find_spec("nvidia")
    for where in (spec.submodule_search_locations if spec else []):
        for cand in sorted(Path(where).glob("*/bin/nvdisasm")):
            return str(cand)
    return shutil.which("nvdisasm")


# SASS architectures the installed nvdisasm reads (CUDA 13 dropped sm_70).
SASS_ARCHS = ("sm_80", "sm_90")
_SASS_FUNC = re.compile(r"^\.text\.(\w+):")
_SASS_LDG = re.compile(r"\bLDG\.E((?:\.\w+)*)")
_SASS_WIDTH = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def sass_global_load_widths(cubin: bytes) -> dict | None:
    """Per kernel, LDG instructions by width in bits, from nvdisasm; None without it."""
    tool = nvdisasm_path()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, f.name], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"nvdisasm failed: {res.stderr.strip()}")
    out, current = {}, None
    for line in res.stdout.splitlines():
        if m := _SASS_FUNC.search(line):
            current = m.group(1)
            out[current] = {}
        elif current and (m := _SASS_LDG.search(line)):
            mods = m.group(1).split(".")
            bits = next((_SASS_WIDTH[x] for x in mods if x in _SASS_WIDTH), 32)
            out[current][bits] = out[current].get(bits, 0) + 1
    return out


# ---- launcher arguments against the C signatures --------------------------------------

@dataclass(frozen=True)
class Param:
    ctype: str      # base type without qualifiers, e.g. "float", "long long", "unsigned short"
    pointer: bool
    name: str


_KERNEL_DECL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', re.S)
_QUALIFIERS = {"const", "__restrict__", "volatile"}

# The numpy dtype each C type takes, for scalars and for pointees. unsigned short carries
# IEEE half bits: its arrays are float16; rm_bf16 (recipe_math.cuh) carries bfloat16 bits:
# its arrays are ml_dtypes.bfloat16.
C_TO_NUMPY = {
    "float": np.float32, "double": np.float64, "int": np.int32, "unsigned int": np.uint32,
    "long long": np.int64, "unsigned long long": np.uint64, "unsigned char": np.uint8,
    "unsigned short": np.float16, "rm_bf16": ml_dtypes.bfloat16,
}


def kernel_signatures(source: str) -> dict:
    """The extern "C" __global__ kernels of a source: name -> [Param]."""
    out = {}
    for name, params in _KERNEL_DECL.findall(source):
        plist = []
        for raw in params.split(","):
            pointer = "*" in raw
            words = [w for w in raw.replace("*", " ").split() if w not in _QUALIFIERS]
            plist.append(Param(" ".join(words[:-1]), pointer, words[-1]))
        out[name] = plist
    return out


def check_launch_args(params, args) -> list:
    """Problems with passing `args` (as a launcher builds them) to a kernel of `params`.

    A pointer parameter takes an array (NumPy stands in for CuPy here) of the pointee's
    dtype; a scalar parameter takes a NumPy scalar of exactly the C type's dtype: a Python
    float would go in as a double, a Python int as a 64-bit integer.
    """
    problems = []
    if len(args) != len(params):
        return [f"{len(args)} arguments for {len(params)} parameters"]
    for p, a in zip(params, args):
        want = C_TO_NUMPY.get(p.ctype)
        if want is None:
            problems.append(f"{p.name}: C type {p.ctype!r} has no numpy mapping")
        elif p.pointer:
            if a is None:
                continue  # a null pointer (optional input such as the decay mask)
            if not hasattr(a, "dtype") or getattr(a, "ndim", 0) == 0:
                problems.append(f"{p.name}: expects an array of {p.ctype}, got {type(a).__name__}")
            elif a.dtype != want:
                problems.append(f"{p.name}: expects {np.dtype(want).name} elements, got {a.dtype}")
        elif not isinstance(a, np.generic) or a.dtype != want:
            got = a.dtype if isinstance(a, np.generic) else type(a).__name__
            problems.append(f"{p.name}: expects numpy {np.dtype(want).name} for C {p.ctype}, got {got}")
    return problems
