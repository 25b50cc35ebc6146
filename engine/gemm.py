"""Every GEMM of the layers, in the run's precision mode: `matmul(a, b, out, precision)`.

    fp32  float32 inputs and output, float32 math (cuBLAS CUBLAS_COMPUTE_32F).
    tf32  float32 storage; on a GPU the multiplications use TF32 tensor cores (inputs rounded
          to 10 mantissa bits, products summed in float32: CUBLAS_COMPUTE_32F_FAST_TF32). The
          CPU has no TF32: there it computes exactly as fp32.
    bf16  bfloat16 inputs (activations, im2col columns, the bf16 copy of the weights), float32
          accumulation, output bfloat16 (activations and their gradients) or float32 (weight
          gradients, written straight into the flat float32 gradient buffer).

On a GPU each call is one cublasGemmEx with its types and compute type given explicitly,
so no process-wide CuPy setting decides the math (CuPy's own matmul reads a global compute
type, CUPY_TF32), and the result lands in `out` without a copy. On the CPU the bf16 path
is the twin of cuBLAS's: the bf16 inputs widened to float32 (exact), one float32 GEMM,
rounded once to the output's dtype (ml_dtypes rounds to nearest even, as the GPU does).

a and b are 2-D, each C-contiguous or the transpose of a C-contiguous array (`w.T`); out is
C-contiguous (M, N) and must not overlap a or b. `accumulate=True` adds the product to what
out holds (cuBLAS's beta = 1: a residual block's two input gradients meet in the GEMM of its
first 1x1 conv, with no separate pass over them and, on a GPU, one rounding instead of two).
"""
from __future__ import annotations

import ctypes

import numpy as np

from engine.backend import array_module

PRECISIONS = ("fp32", "tf32", "bf16")


def _bf16():
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


def activation_dtype(precision: str) -> np.dtype:
    """The storage dtype of activations and GEMM inputs in `precision`."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return _bf16() if precision == "bf16" else np.dtype(np.float32)


def matmul(a, b, out, precision: str = "fp32", accumulate: bool = False):
    """out = a @ b (out += a @ b with `accumulate`) in `precision` (see the module
    docstring); returns out."""
    m, k = a.shape
    k2, n = b.shape
    if k != k2 or tuple(out.shape) != (m, n):
        raise ValueError(f"matmul: shapes {tuple(a.shape)} @ {tuple(b.shape)} -> {tuple(out.shape)} do not agree")
    if a.dtype != b.dtype:
        raise TypeError(f"matmul: inputs of different dtypes ({a.dtype}, {b.dtype})")
    if array_module(out) is np:
        return _host_matmul(a, b, out, accumulate)
    return _cublas_matmul(a, b, out, precision, accumulate)


def _host_matmul(a, b, out, accumulate=False):
    if a.dtype == out.dtype and a.dtype.kind == "f" and a.dtype.itemsize >= 4:
        if accumulate:          # NumPy has no beta: the product, then one add
            out += np.matmul(a, b)
            return out
        return np.matmul(a, b, out=out)         # float32/float64: the BLAS, in place
    if a.dtype != _bf16():
        raise TypeError(f"matmul: unsupported dtypes {a.dtype} -> {out.dtype}")
    f32 = np.float32
    product = np.matmul(a.astype(f32), b.astype(f32))
    if accumulate:
        product += out.astype(f32)              # in float32, as cuBLAS adds beta * C
    out[...] = product                          # one rounding (to nearest even for bf16)
    return out


# cudaDataType_t and cublasComputeType_t values (library_types.h, cublas_api.h).
_CUDA_R_32F, _CUDA_R_64F, _CUDA_R_16BF = 0, 1, 14
_COMPUTE_32F, _COMPUTE_32F_FAST_TF32, _COMPUTE_64F = 68, 77, 70
_OP_N, _OP_T = 0, 1
_GEMM_DEFAULT = -1


def _cuda_type(dtype) -> int:
    if dtype == np.float32:
        return _CUDA_R_32F
    if dtype == np.float64:
        return _CUDA_R_64F
    if dtype == _bf16():
        return _CUDA_R_16BF
    raise TypeError(f"matmul: no cuBLAS type for {dtype}")


def _compute_type(in_dtype, out_dtype, precision) -> int:
    if in_dtype == np.float64:
        if out_dtype != np.float64:
            raise TypeError("matmul: float64 inputs need a float64 output")
        return _COMPUTE_64F
    if precision == "tf32" and in_dtype == np.float32:
        return _COMPUTE_32F_FAST_TF32
    return _COMPUTE_32F


def _column_major(x):
    """(pointer, cuBLAS op, leading dimension) of x as cuBLAS's column-major operand of the
    transposed product. Row-major X (r, c) is column-major X^T with ld = c: op N; a transposed
    view of a C-contiguous array is column-major X with ld = r: op T."""
    if x.flags.c_contiguous:
        return x.data.ptr, _OP_N, max(1, x.shape[1])
    if x.T.flags.c_contiguous:
        return x.data.ptr, _OP_T, max(1, x.shape[0])
    raise ValueError("matmul: each input must be C-contiguous or the transpose of a C-contiguous array")


def _cublas_matmul(a, b, out, precision, accumulate=False):
    """Row-major out (M, N) = a @ b is column-major out^T = b^T a^T: cuBLAS multiplies b's
    operand by a's, m = N, n = M, ldc = N."""
    from cupy.cuda import device
    from cupy_backends.cuda.libs import cublas
    if not out.flags.c_contiguous:
        raise ValueError("matmul: out must be C-contiguous")
    m, k = a.shape
    n = b.shape[1]
    if out.size == 0:
        return out
    compute = _compute_type(a.dtype, out.dtype, precision)
    scalar = ctypes.c_double if compute == _COMPUTE_64F else ctypes.c_float
    alpha, beta = scalar(1.0), scalar(1.0 if accumulate else 0.0)
    b_ptr, b_op, ldb = _column_major(b)
    a_ptr, a_op, lda = _column_major(a)
    cublas.gemmEx(device.get_cublas_handle(), b_op, a_op, n, m, k,
                  ctypes.addressof(alpha), b_ptr, _cuda_type(b.dtype), ldb,
                  a_ptr, _cuda_type(a.dtype), lda,
                  ctypes.addressof(beta), out.data.ptr, _cuda_type(out.dtype), max(1, n),
                  compute, _GEMM_DEFAULT)
    return out
