"""engine.gemm: the host twin against float64, and the cuBLAS call's operands against a
column-major GEMM emulator (the transposes, leading dimensions and types a wrong mapping
gets wrong), without a GPU."""
import ctypes
import sys
import types

import ml_dtypes
import numpy as np
import pytest

from engine import gemm

BF16 = np.dtype(ml_dtypes.bfloat16)
# Every input exact in bf16, each product exact in float32: the float32 sum of K terms is
# within K * 2^-24 of the float64 one, relative to sum |a||b|.
K = 37


def _operands(rng, m, k, n, dtype, a_t, b_t):
    """a (m, k) and b (k, n), each C-contiguous or a transposed view of a C-contiguous array."""
    a = rng.standard_normal((k, m) if a_t else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if b_t else (k, n)).astype(dtype)
    return (a.T if a_t else a), (b.T if b_t else b)


@pytest.mark.parametrize("a_t,b_t", [(False, False), (True, False), (False, True), (True, True)])
def test_host_bf16_rounds_once_from_float32_accumulation(a_t, b_t):
    rng = np.random.default_rng()
    a, b = _operands(rng, 9, K, 5, BF16, a_t, b_t)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    bound = K * 2.0 ** -24 * (np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)))
    out32 = gemm.matmul(a, b, np.empty((9, 5), np.float32), "bf16")
    assert np.all(np.abs(out32 - exact) <= bound)
    out16 = gemm.matmul(a, b, np.empty((9, 5), BF16), "bf16")
    # One rounding of the float32 result: exactly what ml_dtypes gives for it.
    np.testing.assert_array_equal(out16.view(np.uint16), out32.astype(BF16).view(np.uint16))


def test_shape_and_dtype_errors_name_the_operands():
    a = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"\(3, 4\) @ \(5, 2\)"):
        gemm.matmul(a, np.ones((5, 2), np.float32), np.empty((3, 2), np.float32))
    with pytest.raises(TypeError, match="different dtypes"):
        gemm.matmul(a, np.ones((4, 2), np.float64), np.empty((3, 2), np.float32))
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        gemm.activation_dtype("fp8")


# ---- the cuBLAS path, on NumPy buffers ----------------------------------------------------

class _Data:
    def __init__(self, ptr):
        self.ptr = ptr


class FakeDeviceArray(np.ndarray):
    """A NumPy array with CuPy's `.data.ptr`, so engine.gemm takes its cuBLAS branch."""

    @property
    def data(self):
        return _Data(self.__array_interface__["data"][0])


_TYPES = {0: np.dtype(np.float32), 1: np.dtype(np.float64), 14: BF16}
CALLS = []


def _col_major(ptr, dtype, rows, cols, ld):
    """The column-major (rows, cols) matrix with leading dimension ld at address ptr."""
    nbytes = ((cols - 1) * ld + rows) * dtype.itemsize
    buf = np.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=dtype)
    return np.lib.stride_tricks.as_strided(buf, (rows, cols), (dtype.itemsize, ld * dtype.itemsize))


def _gemm_ex(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc,
             compute, algo):
    """cublasGemmEx by its definition: C (m, n) = alpha op(A) op(B) + beta C, column-major
    (C is not read when beta is 0, as in BLAS: the NaN prefill of the tests stays unread)."""
    CALLS.append(dict(compute=compute, types=(Atype, Btype, Ctype)))
    scalar = ctypes.c_double if compute == 70 else ctypes.c_float
    al, be = scalar.from_address(alpha).value, scalar.from_address(beta).value
    opa = _col_major(A, _TYPES[Atype], *((k, m) if transa else (m, k)), lda).astype(np.float64)
    opb = _col_major(B, _TYPES[Btype], *((n, k) if transb else (k, n)), ldb).astype(np.float64)
    c = _col_major(C, _TYPES[Ctype], m, n, ldc)
    product = al * ((opa.T if transa else opa) @ (opb.T if transb else opb))
    c[...] = product if be == 0 else product + be * c.astype(np.float64)


@pytest.fixture
def fake_cublas(monkeypatch):
    cublas = types.SimpleNamespace(gemmEx=_gemm_ex)
    device = types.SimpleNamespace(get_cublas_handle=lambda: 0)
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs", types.SimpleNamespace(cublas=cublas))
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs.cublas", cublas)
    monkeypatch.setitem(sys.modules, "cupy.cuda", types.SimpleNamespace(device=device))
    monkeypatch.setitem(sys.modules, "cupy.cuda.device", device)
    monkeypatch.setattr(gemm, "array_module", lambda a: "cupy")
    CALLS.clear()
    return CALLS


@pytest.mark.parametrize("a_t,b_t", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("dtype,out_dtype,precision,compute", [
    (np.float32, np.float32, "fp32", 68), (np.float32, np.float32, "tf32", 77),
    (BF16, BF16, "bf16", 68), (BF16, np.float32, "bf16", 68), (np.float64, np.float64, "fp32", 70)])
def test_cublas_call_computes_the_row_major_product(fake_cublas, a_t, b_t, dtype, out_dtype, precision, compute):
    rng = np.random.default_rng()
    m, k, n = 6, 11, 4      # all different, so a swapped dimension or ld is caught
    a, b = _operands(rng, m, k, n, dtype, a_t, b_t)
    a, b = a.view(FakeDeviceArray), b.view(FakeDeviceArray)
    out = np.full((m, n), np.nan, out_dtype).view(FakeDeviceArray)
    gemm.matmul(a, b, out, precision)
    exact = np.asarray(a).astype(np.float64) @ np.asarray(b).astype(np.float64)
    np.testing.assert_allclose(np.asarray(out).astype(np.float64), exact, rtol=2e-2 if out_dtype == BF16 else 1e-5,
                               atol=1e-5)
    (call,) = fake_cublas
    assert call["compute"] == compute
    assert call["types"][2] == {np.dtype(np.float32): 0, np.dtype(np.float64): 1, BF16: 14}[np.dtype(out_dtype)]


def test_cublas_refuses_a_strided_operand(fake_cublas):
    a = np.ones((4, 8), np.float32)[:, ::2].view(FakeDeviceArray)
    b = np.ones((4, 3), np.float32).view(FakeDeviceArray)
    with pytest.raises(ValueError, match="C-contiguous or the transpose"):
        gemm.matmul(a, b, np.empty((4, 3), np.float32).view(FakeDeviceArray))


@pytest.mark.parametrize("dtype,out_dtype,precision", [
    (np.float32, np.float32, "fp32"), (BF16, BF16, "bf16"), (np.float64, np.float64, "fp32")])
def test_accumulate_adds_the_product_to_out_on_both_paths(fake_cublas, dtype, out_dtype, precision):
    """accumulate=True is beta = 1 on cuBLAS (C read and added) and out += a @ b on the host."""
    rng = np.random.default_rng()
    a, b = _operands(rng, 6, 11, 4, dtype, False, True)
    start = rng.standard_normal((6, 4)).astype(out_dtype)
    want = start.astype(np.float64) + a.astype(np.float64) @ b.astype(np.float64)
    tol = 2e-2 if out_dtype == BF16 else 1e-5
    device = start.copy().view(FakeDeviceArray)
    gemm.matmul(a.view(FakeDeviceArray), b.view(FakeDeviceArray), device, precision, accumulate=True)
    np.testing.assert_allclose(np.asarray(device).astype(np.float64), want, rtol=tol, atol=1e-5)
    host = start.copy()
    gemm._host_matmul(a, b, host, accumulate=True)
    np.testing.assert_allclose(host.astype(np.float64), want, rtol=tol, atol=1e-5)
    if out_dtype == BF16:        # one rounding of the float32 sum, as cuBLAS rounds C
        f32 = start.astype(np.float32) + a.astype(np.float32) @ b.astype(np.float32)
        np.testing.assert_array_equal(host.view(np.uint16), f32.astype(BF16).view(np.uint16))
