"""FP16 pack/unpack with scaling on the host path (the CUDA twin is compared in test_kernels_gpu)."""
import numpy as np
import pytest

from engine.precision import pack_fp16, unpack_fp16


def wide_range(rng, n):
    """Values from float16-subnormal to beyond float16's range, both signs."""
    return (rng.standard_normal(n) * np.exp(rng.uniform(-25, 13, n))).astype(np.float32)


def test_pack_rounds_once_to_nearest_even():
    rng = np.random.default_rng()
    x = wide_range(rng, 50_000)
    scale = float(rng.uniform(1, 1000))
    h = pack_fp16(x, scale)
    ref = x.astype(np.float64) * np.float32(scale)
    # The reference rounds the float32 product; float64 -> float16 directly would differ
    # where the product itself was rounded, so round in two steps as the kernel does.
    with np.errstate(over="ignore"):
        expected = ref.astype(np.float32).astype(np.float16)
    np.testing.assert_array_equal(h.view(np.uint16), expected.view(np.uint16))
    finite = np.abs(ref) < 65504
    rel = np.abs(h[finite].astype(np.float64) - ref[finite]) / np.maximum(np.abs(ref[finite]), 2**-14)
    # Half an ulp of float16 (relative for normals, 2**-25 absolute for subnormals) plus
    # the float32 rounding of the product that comes first: the two roundings can add up.
    assert rel.max() <= 2**-11 + 2**-24
    assert np.all(np.isinf(h[np.abs(ref) >= 65520]))  # overflow is infinity, not a wrap


def test_unpack_inverts_pack_with_the_inverse_scale():
    rng = np.random.default_rng()
    x = (rng.standard_normal((64, 33)) * 1e-6).astype(np.float32)  # tiny gradients
    scale = 2.0**16
    h = pack_fp16(x, scale)
    back = unpack_fp16(h, 1 / scale)
    assert back.shape == x.shape and back.dtype == np.float32
    big = np.abs(x) > 1e-7
    assert np.max(np.abs(back - x)[big] / np.abs(x[big])) <= 2**-11 * (1 + 1e-6)
    # Without the scale they fall into float16's subnormals (steps of 6e-8) and lose bits.
    plain = unpack_fp16(pack_fp16(x))
    assert np.max(np.abs(plain - x)) > 10 * np.max(np.abs(back - x))


def test_into_preallocated_buffers_and_bad_input():
    x = np.arange(-8, 8, dtype=np.float32) / 8  # exact in float16
    h = np.empty(16, np.float16)
    assert pack_fp16(x, 2.0, out=h) is h
    out = np.empty(16, np.float32)
    assert unpack_fp16(h, 0.5, out=out) is out
    np.testing.assert_array_equal(out, x)
    with pytest.raises(TypeError, match="pack_fp16 takes float32"):
        pack_fp16(x.astype(np.float64))
    with pytest.raises(ValueError, match="unpack_fp16 needs out of dtype float32"):
        unpack_fp16(h, out=np.empty(8, np.float32))
