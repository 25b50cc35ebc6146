"""Builds the Cython extensions in csrc/ into the engine package.

Every csrc/<name>.pyx becomes engine.<name>; kernels/ is on the include path so the
host build compiles exactly the __host__ __device__ headers that NVRTC compiles.
"""
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent


def extensions():
    exts = []
    for pyx in sorted((HERE / "csrc").glob("*.pyx")):
        exts.append(Extension(
            f"engine.{pyx.stem}",
            [str(pyx.relative_to(HERE))],
            include_dirs=["csrc", "kernels", numpy.get_include()],
            extra_compile_args=["-O3", "-march=x86-64-v2", "-fno-math-errno"],
            libraries=["dl"],
        ))
    return cythonize(exts, language_level=3, compiler_directives={"boundscheck": False, "wraparound": False})


setup(ext_modules=extensions())
