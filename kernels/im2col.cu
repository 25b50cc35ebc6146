// im2col and col2im of a KxK convolution (stride s, padding p) on NHWC activations, one
// launch each (engine/conv.py says why the GEMM wants this layout):
//   im2col: col (N, Ho, Wo, K, K, C) = the patch of x (N, H, W, C) under each output
//           position, zeros where the window hangs over the border. A bit copy: with
//           `vec` (the launcher's choice: C * sizeof(T) % 16 == 0 and both pointers 16-byte
//           aligned, which the kernel checks again) every thread moves 16 bytes (uint4),
//           else one element.
//   col2im: dx (N, H, W, C) = for each input element, the sum in float32 of the patch
//           gradients dcol gathered from it, over the (kh, kw) whose output position is in
//           range, in (kh, kw) order; written once, in its storage type. A gather, one thread
//           per dx element (a whole 128-bit pack of channels when C and alignment allow):
//           no atomics, the same result on every run.
// T is float (_f32) or bfloat16 (_bf16). Positions are 64-bit (col arrays of ResNet-50 at
// batch 256 exceed 2^31 elements); H, W, C, K, Ho, Wo and K*K*C fit in int (the launcher checks).
#include "recipe_math.cuh"

// One unit U (an element, or 16 bytes as uint4) per iteration of a grid-stride walk over
// col; Cu units per channel row.
template <typename U>
__device__ __forceinline__ void im2col_units(const U* x, U* col, long long total, int H, int W, int Cu, int K,
                                             int s, int p, int Ho, int Wo)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    const int patch = K * K * Cu;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const long long pix = i / patch;                 // (n, oh, ow)
        int r = (int)(i - pix * patch);                  // (kh, kw, cu)
        const int cu = r % Cu;
        r /= Cu;
        const int kw = r % K, kh = r / K;
        const long long t = pix / Wo;
        const int ow = (int)(pix - t * Wo);
        const long long n = t / Ho;
        const int oh = (int)(t - n * Ho);
        const int ih = oh * s - p + kh, iw = ow * s - p + kw;
        U v = U();
        if ((unsigned)ih < (unsigned)H && (unsigned)iw < (unsigned)W)
            v = x[((n * H + ih) * W + iw) * Cu + cu];
        col[i] = v;
    }
}

template <typename T>
__device__ __forceinline__ void im2col_any(const T* x, T* col, long long total, int H, int W, int C, int K,
                                           int s, int p, int Ho, int Wo, int vec)
{
    constexpr int V = 16 / sizeof(T);
    if (vec && C % V == 0 && rm_aligned16(x, col))
        im2col_units(reinterpret_cast<const uint4*>(x), reinterpret_cast<uint4*>(col), total / V, H, W, C / V, K,
                     s, p, Ho, Wo);
    else
        im2col_units(x, col, total, H, W, C, K, s, p, Ho, Wo);
}

extern "C" __global__ void im2col_f32(const float* x, float* col, long long total, int H, int W, int C, int K,
                                      int s, int p, int Ho, int Wo, int vec)
{
    im2col_any(x, col, total, H, W, C, K, s, p, Ho, Wo, vec);
}

extern "C" __global__ void im2col_bf16(const rm_bf16* x, rm_bf16* col, long long total, int H, int W, int C,
                                       int K, int s, int p, int Ho, int Wo, int vec)
{
    im2col_any(x, col, total, H, W, C, K, s, p, Ho, Wo, vec);
}

// L channels (1, or one 128-bit pack) of one dx element per iteration.
template <int L, typename T>
__device__ __forceinline__ void col2im_lanes(const T* dcol, T* dx, long long units, int H, int W, int C, int K,
                                             int s, int p, int Ho, int Wo)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < units; i += stride) {
        const rm_nhwc at = rm_split_nhwc<L>(i, H, W, C);     // one dx element group
        const long long pix = at.pix, n = at.n;
        const int ih = at.h, iw = at.w, c = at.c;
        float acc[L];
#pragma unroll
        for (int j = 0; j < L; ++j) acc[j] = 0.0f;
        // kh with (ih + p - kh) % s == 0 and 0 <= oh = (ih + p - kh) / s < Ho, likewise kw
        for (int kh = (ih + p) % s; kh < K && kh <= ih + p; kh += s) {
            const int oh = (ih + p - kh) / s;
            if (oh >= Ho) continue;
            for (int kw = (iw + p) % s; kw < K && kw <= iw + p; kw += s) {
                const int ow = (iw + p - kw) / s;
                if (ow >= Wo) continue;
                float v[L];
                rm_load_lanes<L>(dcol, (((n * Ho + oh) * Wo + ow) * K * K + kh * K + kw) * C + c, v);
#pragma unroll
                for (int j = 0; j < L; ++j) acc[j] += v[j];
            }
        }
        rm_store_lanes<L>(dx, pix * C + c, acc);
    }
}

template <typename T>
__device__ __forceinline__ void col2im_any(const T* dcol, T* dx, long long total, int H, int W, int C, int K,
                                           int s, int p, int Ho, int Wo)
{
    constexpr int N = rm_pack<T>::N;
    if (C % N == 0 && rm_aligned16(dcol, dx))
        col2im_lanes<N>(dcol, dx, total / N, H, W, C, K, s, p, Ho, Wo);
    else
        col2im_lanes<1>(dcol, dx, total, H, W, C, K, s, p, Ho, Wo);
}

extern "C" __global__ void col2im_f32(const float* dcol, float* dx, long long total, int H, int W, int C, int K,
                                      int s, int p, int Ho, int Wo)
{
    col2im_any(dcol, dx, total, H, W, C, K, s, p, Ho, Wo);
}

extern "C" __global__ void col2im_bf16(const rm_bf16* dcol, rm_bf16* dx, long long total, int H, int W, int C,
                                       int K, int s, int p, int Ho, int Wo)
{
    col2im_any(dcol, dx, total, H, W, C, K, s, p, Ho, Wo);
}
