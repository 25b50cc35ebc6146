"""What an installed engine carries and what the gpu extra gives CuPy, checked without a GPU."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from engine import cuda_ops
from kernel_check import cupy_options

ROOT = Path(__file__).resolve().parent.parent
KERNEL_FILES = sorted(p.name for p in cuda_ops.KERNELS_DIR.iterdir() if p.suffix in (".cu", ".cuh"))
# Build outputs of the shared checkout stay behind: the wheel is built from a copy.
BUILD_LEFTOVERS = shutil.ignore_patterns("*.so", "*.c", "*.cpp", "__pycache__", "build", "*.egg-info")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel of the project, built from a copy of the sources (pip, no build isolation:
    the test extra brings Cython and setuptools)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py"):
        shutil.copy(ROOT / name, src / name)
    for name in ("csrc", "engine", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=BUILD_LEFTOVERS)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    (built,) = (tmp / "dist").glob("engine-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_carries_every_kernel_source(wheel, tmp_path):
    assert {"optimizer_update.cu", "recipe_math.cuh"} <= set(KERNEL_FILES)
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in KERNEL_FILES if f"engine/kernels/{f}" not in names]
    missing += [f for f in ("engine/simulate/__init__.py", "engine/simulate/__main__.py") if f not in names]
    assert not missing, f"{wheel.name} lacks {missing}"
    # The installed package finds them where the loader looks, away from the checkout.
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = ("from engine import cuda_ops; import sys; "
            "[cuda_ops.kernel_source(f) for f in sys.argv[1:] if f.endswith('.cu')]; print(cuda_ops.KERNELS_DIR)")
    res = subprocess.run([sys.executable, "-c", code, *KERNEL_FILES], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()) == tmp_path / "site" / "engine" / "kernels"


# ---- the gpu extra: what CuPy needs without a CUDA toolkit ------------------------------

def test_cupy_assembles_our_options_with_cuda_headers_from_the_gpu_extra():
    """CuPy's assemble_cupy_compiler_options succeeds for our tuple and puts a CUDA include
    dir on the path that holds the headers NVRTC needs ("Failed to find CUDA headers")."""
    from cupy._core.core import assemble_cupy_compiler_options
    options = assemble_cupy_compiler_options(cuda_ops.NVRTC_OPTIONS)
    include_dirs = [Path(o[2:]) for o in options if o.startswith("-I")]
    assert all(d.is_dir() for d in include_dirs), include_dirs
    cuda_include = [d for d in include_dirs if (d / "cuda_runtime.h").is_file() and (d / "cuda_fp16.h").is_file()]
    assert cuda_include, f"no CUDA include dir among {include_dirs}: install nvidia-cuda-runtime-cu12"
    # The same assembly reaches NVRTC at run time (kernel_check captures CuPy's full list).
    assert set(options) <= set(cupy_options("sm_80"))


def test_cupys_cublas_module_finds_libcublaslt():
    """CuPy's first matmul imports its cuBLAS binding, which loads libcublasLt."""
    from cupy_backends.cuda.libs import cublas
    assert callable(cublas.create)
