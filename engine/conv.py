"""im2col and col2im on NHWC activations, generic in the array module (NumPy or CuPy).

A KxK convolution with stride s and padding p becomes one GEMM:
    col (N*Ho*Wo, K*K*Cin) @ W (Cout, K*K*Cin)^T
with the weight in OHWI layout (Cout, K, K, Cin), so W.reshape(Cout, -1) is a view (its
transpose a free transposed GEMM operand) and col's row (oh, ow) lists the input patch in
the same (kh, kw, cin) order as a row of W.

The gather is ONE strided copy: in a zero-padded NHWC input, the KW*Cin values under a
kernel row are contiguous, so col viewed as (N, Ho, Wo, KH, KW*Cin) is a strided view of
the padded input (strides N, s*H, s*W, H, C). The backward scatter (col2im) cannot be one
copy, because neighbouring patches overlap when s < K: it accumulates the KH*KW shifted
slices one by one, each clipped to the input instead of going through a padded buffer.

For float32 NumPy, engine.hostmath does the gather in C straight from the unpadded input,
one memcpy per window row (zeros at the border): the strided NumPy copy spent most of
its time in the iterator, one step per 768-byte row, and needed the padded copy first.
Each copy is split over images with the workspace's Team (engine.parallel), so on the
CPU it runs on as many cores as the GEMM next to it.

For float32 and bfloat16 CuPy arrays each direction is ONE fused kernel launch
(kernels/im2col.cu through engine.cuda_ops): im2col reads the unpadded input,
16 bytes per thread where C allows; col2im is a gather, one thread per input element
summing its patch gradients in float32, deterministic and without atomics. The code
below (padded copy, strided views, K*K shifted accumulations) serves float64 (NumPy or
CuPy) and bfloat16 NumPy.
"""
from __future__ import annotations

from engine.backend import fused_kernels, host_math


def out_size(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def _as_strided(xp, a, shape, strides):
    return xp.lib.stride_tricks.as_strided(a, shape=shape, strides=strides)


def padded(ws, x, p, pad_value=0.0):
    """x with a border of p `pad_value`s, in a shared scratch buffer (x itself if p == 0).
    The border is written once, when the buffer is created; only the interior is copied."""
    if p == 0:
        return x
    n, h, w, c = x.shape
    xpad = ws.scratch(("pad", pad_value), (n, h + 2 * p, w + 2 * p, c), x.dtype, fill=pad_value)

    def copy(lo, hi):
        xpad[lo:hi, p:p + h, p:p + w, :] = x[lo:hi]
    ws.team.map(copy, n, size=x.size)
    return xpad


def im2col(ws, x, k, s, p):
    """The (N, Ho, Wo, K, K, C) patch array of x, in the workspace's arena (valid until
    the next im2col)."""
    xp = ws.xp
    n, h, w, c = x.shape
    ho, wo = out_size(h, k, s, p), out_size(w, k, s, p)
    col = ws.arena((n, ho, wo, k, k, c), x.dtype)
    if (host := host_math(x, col)) is not None:      # one C pass, no padded copy
        return host.im2col(x, col, k, s, p, ws.team.map)
    if (fused := fused_kernels(x, col)) is not None:  # one kernel launch, no padded copy
        return fused.im2col(x, k, s, p, col)
    xpad = padded(ws, x, p)
    if not xpad.flags.c_contiguous:
        raise ValueError("im2col: the input must be C-contiguous NHWC")
    sn, sh, sw, sc = xpad.strides
    patches = _as_strided(xp, xpad, (n, ho, wo, k, k * c), (sn, s * sh, s * sw, sh, sc))
    rows = col.reshape(n, ho, wo, k, k * c)

    def gather(lo, hi):
        xp.copyto(rows[lo:hi], patches[lo:hi])
    ws.team.map(gather, n, size=col.size)
    return col


def clipped(k_off, s, p, in_size, out_count):
    """Output index range [o0, o0+cnt) whose input index o*s - p + k_off lies in the input,
    and the first such input index."""
    shift = k_off - p
    o0 = max(0, (s - 1 - shift) // s)      # smallest o with o*s + shift >= 0
    last = min(out_count - 1, (in_size - 1 - shift) // s)
    return o0, max(0, last - o0 + 1), o0 * s + shift


def col2im(ws, dcol, dx, s, p):
    """dx (N, H, W, C) = the sum of every patch gradient of dcol (N, Ho, Wo, K, K, C) at
    the input position it was gathered from; padding positions are dropped."""
    if (fused := fused_kernels(dcol, dx)) is not None:   # one launch: a gather, no atomics
        return fused.col2im(dcol, dx, s, p)
    n, ho, wo, kh_count, kw_count, _ = dcol.shape
    _, h, w, _ = dx.shape

    def scatter(lo, hi):
        dx[lo:hi].fill(0)
        for kh in range(kh_count):
            oh0, nh, ih0 = clipped(kh, s, p, h, ho)
            if nh == 0:
                continue
            for kw in range(kw_count):
                ow0, nw, iw0 = clipped(kw, s, p, w, wo)
                if nw == 0:
                    continue
                dx[lo:hi, ih0:ih0 + s * (nh - 1) + 1:s, iw0:iw0 + s * (nw - 1) + 1:s, :] += \
                    dcol[lo:hi, oh0:oh0 + nh, ow0:ow0 + nw, kh, kw, :]
    ws.team.map(scatter, n, size=dcol.size)
    return dx
