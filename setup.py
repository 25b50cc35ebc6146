"""Builds the Cython extensions in csrc/ into the engine package.

Every csrc/<name>.pyx becomes engine.<name>; kernels/ is on the include path so the
host build compiles exactly the __host__ __device__ headers that NVRTC compiles.
"""
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent


def march() -> str:
    """x86-64-v3 (AVX2, FMA) where this machine has it: the BN and ReLU loops run 1.1-2x
    faster with 8-wide vectors (bench/kernels.py). The extensions are built where they run
    (pip install -e), so the build machine's CPU is the one that matters."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    return "x86-64-v3" if {"avx2", "fma", "bmi2"} <= set(flags) else "x86-64-v2"


def extensions():
    exts = []
    for pyx in sorted((HERE / "csrc").glob("*.pyx")):
        exts.append(Extension(
            f"engine.{pyx.stem}",
            [str(pyx.relative_to(HERE))],
            include_dirs=["csrc", "kernels", numpy.get_include()],
            extra_compile_args=["-O3", f"-march={march()}", "-fno-math-errno"],
            libraries=["dl"],
        ))
    return cythonize(exts, language_level=3, compiler_directives={"boundscheck": False, "wraparound": False})


setup(ext_modules=extensions())
