/* The per-element math of every fused kernel, written once.
 *
 * NVRTC compiles this header into the CUDA kernels (the .cu files beside it); the host C compiler
 * compiles it into engine.hostmath (csrc/hostmath.pyx) for the CPU path. Both paths
 * therefore run the same formulas, and the host build is tested against float64 NumPy.
 * Plain C99 on the host side: no templates, no overloading, float arithmetic only.
 */
#ifndef RECIPE_MATH_CUH
#define RECIPE_MATH_CUH

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define RM_FN __host__ __device__ __forceinline__
#else
#include <math.h>
#include <string.h>
#define RM_FN static inline
#endif

/* ---- optimizer ------------------------------------------------------------------- */

/* Coefficients of one update, fixed for a whole launch (computed per iteration on the host
 * from the schedules). The gradient arrives as a sum over ranks of loss-scaled gradients;
 * gscale (= 1/(N*loss_scale)) turns it into the mean gradient. */
typedef struct {
    float eta;      /* learning rate of this iteration */
    float a_sgd;    /* weight of the SGD direction (1 after the warm-up) */
    float a_rms;    /* weight of the RMSprop direction (0 after the warm-up) */
    float mu1;      /* momentum of the direction d */
    float mu2;      /* decay of the squared-gradient average m */
    float eps;      /* added to sqrt(m), outside the root */
    float wd;       /* weight decay (L2), applied where the decay mask is 1 */
    float gscale;   /* folds 1/N and the loss scale into the gradient */
} rm_coef;

/* The gradient the optimizer sees: scaled, plus L2 weight decay where it applies. */
RM_FN float rm_effective_grad(float g, float w, float decay, const rm_coef *c)
{
    return g * c->gscale + c->wd * decay * w;
}

/* Momentum step shared by both optimizers: d = mu1*d - step*g, w = w + eta*d. */
RM_FN void rm_momentum_step(float *w, float *d, float g, float step, const rm_coef *c)
{
    float dn = c->mu1 * (*d) - step * g;
    *d = dn;
    *w = *w + c->eta * dn;
}

/* The hybrid RMSprop-to-SGD update (no bias correction, eps outside the root):
 *   m = mu2*m + (1-mu2)*g^2
 *   d = mu1*d - (a_sgd + a_rms/(sqrt(m)+eps)) * g
 *   w = w + eta*d                                                                     */
RM_FN void rm_hybrid_step(float *w, float *d, float *m, float graw, float decay, const rm_coef *c)
{
    float g = rm_effective_grad(graw, *w, decay, c);
    float mn = c->mu2 * (*m) + (1.0f - c->mu2) * g * g;
    *m = mn;
    rm_momentum_step(w, d, g, c->a_sgd + c->a_rms / (sqrtf(mn) + c->eps), c);
}

/* Momentum SGD of the baseline (Goyal et al.), in the same form with a_sgd = 1, a_rms = 0:
 * d = mu1*d - g, w = w + eta*d (the learning rate multiplies the whole direction, so a
 * change of eta needs no momentum correction). */
RM_FN void rm_sgd_step(float *w, float *d, float graw, float decay, const rm_coef *c)
{
    rm_momentum_step(w, d, rm_effective_grad(graw, *w, decay, c), 1.0f, c);
}

/* ---- half precision, carried as the 16 bits of IEEE binary16 (unsigned short) ------- */
/* No cuda_fp16.h: NVRTC then needs no toolkit headers, and the host needs no half type. */

#if defined(__CUDA_ARCH__)
RM_FN float rm_half_to_float(unsigned short h)
{
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

/* Round to nearest even, overflow to infinity: the same as NumPy's float32 -> float16. */
RM_FN unsigned short rm_float_to_half(float f)
{
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#else
/* Branch-free, so the host loops vectorize: the 15 bits below the sign, moved into a
 * float's exponent and mantissa and multiplied by 2^112, give every finite half exactly
 * (subnormals included); exponent 31 (inf, nan) maps to exponent 255. */
RM_FN float rm_bits_float(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
RM_FN unsigned int rm_float_bits(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }

RM_FN float rm_half_to_float(unsigned short h)
{
    unsigned int em = (unsigned int)(h & 0x7fffu) << 13;
    float finite = rm_bits_float(em) * 0x1p112f;
    unsigned int special = 0u - (unsigned int)((h & 0x7c00u) == 0x7c00u);   /* all ones or 0 */
    unsigned int bits = (special & (em | 0x7f800000u)) | (~special & rm_float_bits(finite));
    return rm_bits_float(bits | ((unsigned int)(h & 0x8000u) << 16));
}

/* Round to nearest even, overflow to infinity, as cvt.rn.f16.f32 and NumPy. The host-emulated
 * kernels (engine/kernel_emulation.py) take this path; the CPU path itself packs with NumPy. */
RM_FN unsigned short rm_float_to_half(float f)
{
    const unsigned int u = rm_float_bits(f), a = u & 0x7fffffffu;
    const unsigned short sign = (unsigned short)((u >> 16) & 0x8000u);
    if (a > 0x7f800000u) return sign | 0x7e00u | (unsigned short)((a >> 13) & 0x3ffu);  /* quiet nan */
    if (a >= 0x477ff000u) return sign | 0x7c00u;          /* 65520 and above round to inf */
    if (a < 0x38800000u)                                  /* below 2^-14: subnormal half or zero, */
        return sign | (unsigned short)rintf(rm_bits_float(a) * 0x1p24f);   /* in units of 2^-24 */
    const unsigned int r = a - 0x38000000u;               /* exponent rebased from 127 to 15 */
    const unsigned int rest = r & 0x1fffu, h = r >> 13;
    return sign | (unsigned short)(h + ((rest > 0x1000u) | ((rest == 0x1000u) & (h & 1u))));
}
#endif

/* ---- bfloat16, carried as its 16 bits (unsigned short) ---------------------------- */
/* The upper half of a float32: widening is exact, narrowing rounds to nearest even. One
 * integer formula on the device (every arch: sm_70 has no cvt.rn.bf16.f32) and on the host,
 * so the kernels, their host emulation and the CPU path (ml_dtypes.bfloat16, which rounds
 * the same way) agree bit for bit. A NaN becomes the canonical quiet NaN of its sign, as in
 * ml_dtypes; a float above the largest bfloat16 rounds to inf. */
#if defined(__CUDA_ARCH__)
RM_FN unsigned int rm_f32_bits(float f) { return __float_as_uint(f); }
RM_FN float rm_bits_f32(unsigned int u) { return __uint_as_float(u); }
#else
RM_FN unsigned int rm_f32_bits(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
RM_FN float rm_bits_f32(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
#endif

RM_FN float rm_bf16_to_float(unsigned short b) { return rm_bits_f32((unsigned int)b << 16); }

RM_FN unsigned short rm_float_to_bf16(float f)
{
    const unsigned int u = rm_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)(((u >> 16) & 0x8000u) | 0x7fc0u);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* A bfloat16 in memory, as kernel parameters name it: a type of its own, so the launch checks
 * (engine.kernel_check) tell it from the binary16 bits that unsigned short carries, and so
 * templated kernels instantiate for it apart from any 16-bit integer. */
typedef struct {
    unsigned short bits;
} rm_bf16;

/* Two bfloat16 in one 32-bit word, `lo` at the lower address (little-endian). */
RM_FN unsigned int rm_bf16x2(float lo, float hi)
{
    return (unsigned int)rm_float_to_bf16(lo) | ((unsigned int)rm_float_to_bf16(hi) << 16);
}

/* ---- batch norm ------------------------------------------------------------------ */

/* Block shape of the per-channel reductions: 32 consecutive channels (one warp, coalesced)
 * by 8 row groups. engine/cuda_ops.py launches with the same shape (a test checks). */
#define RM_BN_TX 32
#define RM_BN_TY 8

/* Running (count, mean, M2) of Welford's method; M2 = sum of squared deviations. */
typedef struct {
    float n;
    float mean;
    float m2;
} rm_moments;

RM_FN void rm_welford_push(rm_moments *s, float x)
{
    s->n += 1.0f;
    float delta = x - s->mean;
    s->mean += delta / s->n;
    s->m2 += delta * (x - s->mean);
}

/* Chan et al.'s merge of two partial results: exact for any split of the data. */
RM_FN void rm_moments_merge(rm_moments *a, const rm_moments *b)
{
    float n = a->n + b->n;
    if (b->n == 0.0f) return;
    if (a->n == 0.0f) { *a = *b; return; }
    float delta = b->mean - a->mean;
    float wb = b->n / n;
    a->mean += delta * wb;
    a->m2 += b->m2 + delta * delta * a->n * wb;
    a->n = n;
}

RM_FN float rm_bn_inv_std(float var, float eps) { return 1.0f / sqrtf(var + eps); }

/* y = (x - mean) * inv_std * gamma + beta, as one multiply-add with folded scale/shift. */
RM_FN float rm_bn_scale(float gamma, float inv_std) { return gamma * inv_std; }
RM_FN float rm_bn_shift(float beta, float mean, float scale) { return beta - mean * scale; }

RM_FN float rm_bn_apply(float x, float scale, float shift, int relu)
{
    float y = x * scale + shift;
    return (relu && y < 0.0f) ? 0.0f : y;
}

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
/* Device only (C++). The channel of element i = start + k*step of a grid-stride walk over x
 * seen as (n / C, C): two 64-bit remainders per thread, then per iteration one add and one
 * wrap (the step is below C) instead of a 64-bit remainder per element. C > 0. */
struct rm_channel_walk {
    int c, step, C;
};

__device__ __forceinline__ rm_channel_walk rm_channel_start(long long start, long long step, int C)
{
    rm_channel_walk w = {(int)(start % C), (int)(step % C), C};
    return w;
}

__device__ __forceinline__ void rm_channel_next(rm_channel_walk* w)
{
    w->c += w->step;
    if (w->c >= w->C) w->c -= w->C;
}

/* Activations in memory: float32, or bfloat16 widened to float32 on load and rounded to
 * nearest even on store; the math between is float32 for both. */
__device__ __forceinline__ float rm_load1(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float rm_load1(const rm_bf16* p, long long i) { return rm_bf16_to_float(p[i].bits); }
__device__ __forceinline__ void rm_store1(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void rm_store1(rm_bf16* p, long long i, float v) { p[i].bits = rm_float_to_bf16(v); }

/* The elements of T that one 128-bit access moves (4 float32, 8 bfloat16), as float32. */
template <typename T>
struct rm_pack {
    enum { N = 16 / sizeof(T) };
    float v[N];
};

__device__ __forceinline__ rm_pack<float> rm_pack_load(const float* p, long long k)
{
    const float4 t = reinterpret_cast<const float4*>(p)[k];
    rm_pack<float> q = {{t.x, t.y, t.z, t.w}};
    return q;
}

__device__ __forceinline__ void rm_pack_store(float* p, long long k, const rm_pack<float>& q)
{
    reinterpret_cast<float4*>(p)[k] = make_float4(q.v[0], q.v[1], q.v[2], q.v[3]);
}

/* bfloat16 widening is a shift: the low element of each word to the upper half, the high
 * element masked in place. */
__device__ __forceinline__ rm_pack<rm_bf16> rm_pack_load(const rm_bf16* p, long long k)
{
    const uint4 t = reinterpret_cast<const uint4*>(p)[k];
    const unsigned int w[4] = {t.x, t.y, t.z, t.w};
    rm_pack<rm_bf16> q;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        q.v[2 * j] = rm_bits_f32(w[j] << 16);
        q.v[2 * j + 1] = rm_bits_f32(w[j] & 0xffff0000u);
    }
    return q;
}

__device__ __forceinline__ void rm_pack_store(rm_bf16* p, long long k, const rm_pack<rm_bf16>& q)
{
    reinterpret_cast<uint4*>(p)[k] = make_uint4(rm_bf16x2(q.v[0], q.v[1]), rm_bf16x2(q.v[2], q.v[3]),
                                                rm_bf16x2(q.v[4], q.v[5]), rm_bf16x2(q.v[6], q.v[7]));
}

/* L consecutive elements of T starting at element `at` (a multiple of L), as float32: one
 * 128-bit access when L is a whole pack (rm_pack<T>::N; `at` then 16-byte aligned when p is),
 * else L = 1, one element. The windowed kernels (im2col.cu, maxpool.cu) walk channels this way. */
template <int L, typename T>
__device__ __forceinline__ void rm_load_lanes(const T* p, long long at, float* v)
{
    if constexpr (L == 1) {
        v[0] = rm_load1(p, at);
    } else {
        static_assert(L == rm_pack<T>::N, "a lane group is one element or one 128-bit pack");
        const rm_pack<T> q = rm_pack_load(p, at / L);
#pragma unroll
        for (int j = 0; j < L; ++j) v[j] = q.v[j];
    }
}

template <int L, typename T>
__device__ __forceinline__ void rm_store_lanes(T* p, long long at, const float* v)
{
    if constexpr (L == 1) {
        rm_store1(p, at, v[0]);
    } else {
        static_assert(L == rm_pack<T>::N, "a lane group is one element or one 128-bit pack");
        rm_pack<T> q;
#pragma unroll
        for (int j = 0; j < L; ++j) q.v[j] = v[j];
        rm_pack_store(p, at / L, q);
    }
}

/* Grid-stride item i of an NHWC walk in groups of L channels (i < N*H*W*C/L): the pixel
 * index n*H*W + h*W + w, its n, h, w, and the group's first channel c. */
struct rm_nhwc {
    long long pix, n;
    int h, w, c;
};

template <int L>
__device__ __forceinline__ rm_nhwc rm_split_nhwc(long long i, int H, int W, int C)
{
    rm_nhwc at;
    const int Cl = C / L;
    at.pix = i / Cl;
    at.c = (int)(i - at.pix * Cl) * L;
    const long long t = at.pix / W;
    at.w = (int)(at.pix - t * W);
    at.n = t / H;
    at.h = (int)(t - at.n * H);
    return at;
}

/* Whether every pointer allows 128-bit accesses (a null pointer does). */
template <typename... P>
__device__ __forceinline__ bool rm_aligned16(const P*... p)
{
    return ((((size_t)p) | ...) & 15) == 0;
}

/* The grid-stride walk of the elementwise BN kernels over x seen as (n / C, C): when `packed`
 * and C % N == 0, pack(k, c) for each pack k of N elements (one row, channels c..c+N-1:
 * elements k*N .. k*N+N-1), then elem(i, c) for each element the packs leave (all of them
 * when not packed). */
template <int N, typename P, typename E>
__device__ __forceinline__ void rm_channel_for(long long n, int C, bool packed, P pack, E elem)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (first >= n) return;     /* also every thread when n == 0, where C may be 0 */
    const long long npack = packed && C % N == 0 ? n / N : 0;
    rm_channel_walk ch = rm_channel_start(first * N, stride * N, C);
    for (long long k = first; k < npack; k += stride, rm_channel_next(&ch))
        pack(k, ch.c);
    ch = rm_channel_start(npack * N + first, stride, C);
    for (long long i = npack * N + first; i < n; i += stride, rm_channel_next(&ch))
        elem(i, ch.c);
}

/* y[i] = f(x[i], r[i], c) over x seen as (n / C, C) with c the channel of element i, x, r
 * and y of storage type T, 128 bits per access when alignment and C allow; r may be null
 * (a residual block's shortcut, when there is one), and f then gets 0 for it. The
 * elementwise BN kernels (bn_forward_apply, bn_infer) are this loop with their own f. */
template <typename T, typename F>
__device__ __forceinline__ void rm_channel_map(const T* x, const T* r, T* y, long long n, int C, F f)
{
    constexpr int N = rm_pack<T>::N;
    rm_channel_for<N>(n, C, rm_aligned16(x, r, y), [&](long long k, int c) {
        rm_pack<T> a = rm_pack_load(x, k);
        rm_pack<T> b;
#pragma unroll
        for (int j = 0; j < N; ++j) b.v[j] = 0.0f;
        if (r != nullptr) b = rm_pack_load(r, k);
#pragma unroll
        for (int j = 0; j < N; ++j) a.v[j] = f(a.v[j], b.v[j], c + j);
        rm_pack_store(y, k, a);
    }, [&](long long i, int c) { rm_store1(y, i, f(rm_load1(x, i), r != nullptr ? rm_load1(r, i) : 0.0f, c)); });
}
#endif

/* ---- pooling and residual ------------------------------------------------------- */

/* Whether a max pool window's scan, holding `best` so far, takes v: a larger value, or a
 * NaN (the window's max, as with numpy.maximum); a tie keeps the earlier position (PyTorch's
 * rule, in (kh, kw) order), and a NaN once taken stays. Also engine.hostmath's rule. */
RM_FN int rm_pool_takes(float v, float best)
{
    return best == best && !(v <= best);
}

/* The end of a residual block: relu(y + shortcut); NaN stays NaN, -0 stays -0 (as hostmath). */
RM_FN float rm_add_relu(float y, float shortcut)
{
    const float v = y + shortcut;
    return v < 0.0f ? 0.0f : v;
}

/* Its gradient: dy * (y > 0), a product, so a non-finite dy stays non-finite (as hostmath). */
RM_FN float rm_relu_mask_grad(float dy, float y)
{
    return dy * (y > 0.0f ? 1.0f : 0.0f);
}

/* A batch norm that ends a residual block: bn(x) + shortcut (+ReLU), the affine transform
 * first and the sum after it, in float32, as the separate passes compute it in float32
 * (engine.batchnorm's host path). */
RM_FN float rm_bn_apply_residual(float x, float scale, float shift, float shortcut, int relu)
{
    const float y = rm_bn_apply(x, scale, shift, 0);
    return relu ? rm_add_relu(y, shortcut) : y + shortcut;
}

/* Gradient through the fused ReLU: y is the BN(+ReLU) output of the forward pass. */
RM_FN float rm_relu_grad(float dy, float y, int relu)
{
    return (relu && !(y > 0.0f)) ? 0.0f : dy;
}

/* dx of training-mode BN, with sum_dy = sum(dy), sum_dyxh = sum(dy * xhat) per channel
 * over the R = N*H*W rows: dx = gamma*inv_std*(dy - sum_dy/R - xhat*sum_dyxh/R). */
RM_FN float rm_bn_dx(float dy, float x, float mean, float inv_std, float gamma,
                     float mean_dy, float mean_dyxh)
{
    float xhat = (x - mean) * inv_std;
    return gamma * inv_std * (dy - mean_dy - xhat * mean_dyxh);
}

/* ---- loss (softmax_xent.cu) ----------------------------------------------------- */

/* Whether a row's argmax scan, holding (best, at) so far, takes (v, k): NumPy's argmax rule,
 * the first index of the largest value, a NaN (the first one) above everything. Any two
 * candidates compare the same whichever is `best`, so a tree merge of per-thread results
 * finds what a scan in index order finds. */
RM_FN int rm_argmax_takes(float v, long long k, float best, long long at)
{
    if (v != v) return best == best || k < at;
    if (best != best) return 0;
    return v > best || (v == best && k < at);
}

/* One row's smoothed cross-entropy, as engine/loss.py defines it: with s = z - max(z),
 * log_z = log(sum exp s) and log_p = s - log_z,
 *   loss = (1 - e) * (-log_p[label]) - e * mean_k log_p
 *        = (1 - e) * (log_z - s[label]) - e * (sum_s / K - log_z). */
RM_FN float rm_xent_loss(float log_z, float s_label, float sum_s, int K, float one_minus_e, float e)
{
    return one_minus_e * (log_z - s_label) - e * (sum_s / (float)K - log_z);
}

/* d loss / d z of one element before the 1/N of the batch mean: softmax - q, with
 * q = (1 - e) * onehot + e / K, subtracted in engine/loss.py's order. */
RM_FN float rm_xent_grad(float s, float log_z, int is_label, float one_minus_e, float e_over_k)
{
    float p = expf(s - log_z);
    if (is_label) p -= one_minus_e;
    return p - e_over_k;
}

#endif /* RECIPE_MATH_CUH */
