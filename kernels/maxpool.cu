// Max pool over NHWC activations (window K, stride s, padding p that never wins), one launch
// each way, with engine.hostmath's rules (rm_pool_takes): per channel, the max of the window's
// elements inside x; ties go to the FIRST position in (kh, kw) order; a NaN is the max. A
// window that sees only padding (p >= K) pools to -inf and takes no gradient.
//   maxpool_forward:  y (N, Ho, Wo, C) = the window max; one thread per output element.
//   maxpool_backward: dx (N, H, W, C), a gather: one thread per dx element sums, in float32 and
//                     in (oh, ow) order, the dy of every window that holds it and whose first
//                     max, found again from x, is this position; written once (no atomics,
//                     nothing stored by forward, the same result on every run).
// Forward walks a whole 128-bit pack of channels per thread when C and alignment allow;
// backward one channel per thread (a pack of window scans held 60-75 registers, over the
// 64 of the static tier's budget). T is float (_f32) or bfloat16 (_bf16); positions are
// 64-bit, H, W, C, K, Ho, Wo int, offsets within one image int (H*W*C < 2^31, checked).
#include "recipe_math.cuh"

// The in-bounds kernel rows [*k0, *k1) of the window starting at input row o*s - p.
__device__ __forceinline__ void pool_span(int o, int s, int p, int K, int size, int* k0, int* k1)
{
    const int start = o * s - p;
    *k0 = start < 0 ? -start : 0;
    *k1 = size - start < K ? size - start : K;
}

// Scan the window at (oh, ow) of one image (xn: its first element), L channels from c: its
// max into best, the position kh*K + kw of its first max into arg (-1: no element of x in the
// window). Offsets within an image are int (the launcher checks H*W*C < 2^31).
template <int L, typename T>
__device__ __forceinline__ void pool_window(const T* xn, int oh, int ow, int c, int H, int W, int C, int K, int s,
                                            int p, float* best, int* arg)
{
    int kh0, kh1, kw0, kw1;
    pool_span(oh, s, p, K, H, &kh0, &kh1);
    pool_span(ow, s, p, K, W, &kw0, &kw1);
#pragma unroll
    for (int j = 0; j < L; ++j) {
        best[j] = rm_bits_f32(0xff800000u);     // -inf
        arg[j] = -1;
    }
    if (kh0 >= kh1 || kw0 >= kw1) return;
    const int corner = ((oh * s - p) * W + ow * s - p) * C + c;     // may lie before the image
    rm_load_lanes<L>(xn, corner + (kh0 * W + kw0) * C, best);
#pragma unroll
    for (int j = 0; j < L; ++j) arg[j] = kh0 * K + kw0;
#pragma unroll 1
    for (int kh = kh0; kh < kh1; ++kh)
#pragma unroll 1
        for (int kw = kw0; kw < kw1; ++kw) {
            float v[L];
            rm_load_lanes<L>(xn, corner + (kh * W + kw) * C, v);
#pragma unroll
            for (int j = 0; j < L; ++j)
                if (rm_pool_takes(v[j], best[j])) {
                    best[j] = v[j];
                    arg[j] = kh * K + kw;
                }
        }
}

template <int L, typename T>
__device__ __forceinline__ void forward_lanes(const T* x, T* y, long long units, int H, int W, int C, int K, int s,
                                              int p, int Ho, int Wo)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < units; i += stride) {
        const rm_nhwc at = rm_split_nhwc<L>(i, Ho, Wo, C);   // one output element group
        const long long pix = at.pix, n = at.n;
        const int oh = at.h, ow = at.w, c = at.c;
        float best[L];
        int arg[L];
        pool_window<L>(x + n * H * W * C, oh, ow, c, H, W, C, K, s, p, best, arg);
        rm_store_lanes<L>(y, pix * C + c, best);
    }
}

// The output windows [*o0, *o1) along one axis that hold input index i: 0 <= i + p - o*s < K.
__device__ __forceinline__ void windows_of(int i, int s, int p, int K, int out, int* o0, int* o1)
{
    const int lo = i + p - K + 1;                   // o*s >= lo
    *o0 = lo <= 0 ? 0 : (lo + s - 1) / s;
    const int hi = (i + p) / s + 1;                 // o*s <= i + p (i + p >= 0)
    *o1 = hi < out ? hi : out;
}

template <int L, typename T>
__device__ __forceinline__ void backward_lanes(const T* x, const T* dy, T* dx, long long units, int H, int W, int C,
                                               int K, int s, int p, int Ho, int Wo)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < units; i += stride) {
        const rm_nhwc at = rm_split_nhwc<L>(i, H, W, C);     // one dx element group
        const long long pix = at.pix, n = at.n;
        const int ih = at.h, iw = at.w, c = at.c;
        float acc[L];
#pragma unroll
        for (int j = 0; j < L; ++j) acc[j] = 0.0f;
        int oh0, oh1, ow0, ow1;
        windows_of(ih, s, p, K, Ho, &oh0, &oh1);
        windows_of(iw, s, p, K, Wo, &ow0, &ow1);
        const T* xn = x + n * H * W * C;
        const T* dyn = dy + n * Ho * Wo * C;
        for (int oh = oh0; oh < oh1; ++oh)
            for (int ow = ow0; ow < ow1; ++ow) {
                float best[L];
                int arg[L];
                pool_window<L>(xn, oh, ow, c, H, W, C, K, s, p, best, arg);
                const int self = (ih + p - oh * s) * K + (iw + p - ow * s);
                float g[L];
                rm_load_lanes<L>(dyn, (oh * Wo + ow) * C + c, g);
#pragma unroll
                for (int j = 0; j < L; ++j)
                    if (arg[j] == self) acc[j] += g[j];
            }
        rm_store_lanes<L>(dx, pix * C + c, acc);
    }
}

template <typename T>
__device__ __forceinline__ void forward_any(const T* x, T* y, long long total, int H, int W, int C, int K, int s,
                                            int p, int Ho, int Wo)
{
    constexpr int N = rm_pack<T>::N;
    if (C % N == 0 && rm_aligned16(x, y))
        forward_lanes<N>(x, y, total / N, H, W, C, K, s, p, Ho, Wo);
    else
        forward_lanes<1>(x, y, total, H, W, C, K, s, p, Ho, Wo);
}


extern "C" __global__ void maxpool_forward_f32(const float* x, float* y, long long total, int H, int W, int C,
                                               int K, int s, int p, int Ho, int Wo)
{
    forward_any(x, y, total, H, W, C, K, s, p, Ho, Wo);
}

extern "C" __global__ void maxpool_forward_bf16(const rm_bf16* x, rm_bf16* y, long long total, int H, int W,
                                                int C, int K, int s, int p, int Ho, int Wo)
{
    forward_any(x, y, total, H, W, C, K, s, p, Ho, Wo);
}

extern "C" __global__ void maxpool_backward_f32(const float* x, const float* dy, float* dx, long long total, int H,
                                                int W, int C, int K, int s, int p, int Ho, int Wo)
{
    backward_lanes<1>(x, dy, dx, total, H, W, C, K, s, p, Ho, Wo);
}

extern "C" __global__ void maxpool_backward_bf16(const rm_bf16* x, const rm_bf16* dy, rm_bf16* dx, long long total,
                                                 int H, int W, int C, int K, int s, int p, int Ho, int Wo)
{
    backward_lanes<1>(x, dy, dx, total, H, W, C, K, s, p, Ho, Wo);
}
