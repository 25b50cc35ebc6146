// The optimizer update over one flat range [0, n) of the parameter buffer, in ONE launch:
// hybrid RMSprop-to-SGD (w, d, m) or momentum SGD (w, d), gradients fp32 or fp16 (bits).
//
// Every term is fused: gradient scale (1/N, loss scale), weight decay under the uint8 mask
// (null: decay everywhere), the m and d updates and the weight update. Each input is read
// once and each output written once, with 128-bit loads of w, d, m and fp32 g (64-bit for
// fp16 g, 32-bit for the mask) in a grid-stride loop; a scalar loop handles the tail and
// ranges whose pointers are not 16-byte aligned. With w_lp (not null) the updated w is also
// written as bfloat16 (rounded to nearest even) in the same pass, 64 bits per 4 elements:
// the bf16 working copy of the weights that the next forward pass reads.
//
// The per-step scalars eta, a_sgd, a_rms, gscale come from the float32 device array
// scal = [eta, a_sgd, a_rms, gscale], read once per thread: a captured CUDA graph replays
// with whatever the host wrote there before the replay. mu1, mu2, eps, wd are fixed for a
// run and stay by-value parameters. sgd reads eta and gscale from the same layout.
#include "recipe_math.cuh"

struct Quad { float v[4]; };

__device__ __forceinline__ Quad load4(const float* p, long long i)
{
    float4 t = reinterpret_cast<const float4*>(p)[i];
    Quad q = {{t.x, t.y, t.z, t.w}};
    return q;
}

__device__ __forceinline__ void store4(float* p, long long i, const Quad& q)
{
    reinterpret_cast<float4*>(p)[i] = make_float4(q.v[0], q.v[1], q.v[2], q.v[3]);
}

__device__ __forceinline__ Quad load4(const unsigned short* p, long long i)
{
    uint2 t = reinterpret_cast<const uint2*>(p)[i];
    Quad q = {{rm_half_to_float((unsigned short)(t.x & 0xffffu)), rm_half_to_float((unsigned short)(t.x >> 16)),
               rm_half_to_float((unsigned short)(t.y & 0xffffu)), rm_half_to_float((unsigned short)(t.y >> 16))}};
    return q;
}

__device__ __forceinline__ float load1(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load1(const unsigned short* p, long long i) { return rm_half_to_float(p[i]); }

__device__ __forceinline__ Quad mask4(const unsigned char* mask, long long i)
{
    if (!mask) { Quad q = {{1.0f, 1.0f, 1.0f, 1.0f}}; return q; }
    uchar4 t = reinterpret_cast<const uchar4*>(mask)[i];
    Quad q = {{(float)t.x, (float)t.y, (float)t.z, (float)t.w}};
    return q;
}

template <bool HYBRID>
__device__ __forceinline__ void step1(float* w, float* d, float* m, float g, float decay, const rm_coef& c)
{
    if (HYBRID) rm_hybrid_step(w, d, m, g, decay, &c);
    else rm_sgd_step(w, d, g, decay, &c);
}

__device__ __forceinline__ void store4_bf16(rm_bf16* p, long long i, const Quad& q)
{
    reinterpret_cast<uint2*>(p)[i] = make_uint2(rm_bf16x2(q.v[0], q.v[1]), rm_bf16x2(q.v[2], q.v[3]));
}

template <bool HYBRID, typename G>
__device__ __forceinline__ void update_range(float* __restrict__ w, float* __restrict__ d,
                                             float* __restrict__ m, const G* __restrict__ g,
                                             const unsigned char* __restrict__ mask,
                                             rm_bf16* __restrict__ w_lp, long long n, const rm_coef& c)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    // One test for all pointers: each term is zero mod 16 exactly when that pointer allows
    // its vector width (16 bytes for fp32, 8 for 4 halves or 4 bfloat16, 4 for 4 mask bytes).
    const size_t align = (size_t)w | (size_t)d | (HYBRID ? (size_t)m : 0) |
                         ((size_t)g * (16 / (4 * sizeof(G)))) | ((size_t)mask * 4) | ((size_t)w_lp * 2);
    const long long nvec = (align & 15) == 0 ? n / 4 : 0;
    for (long long v = first; v < nvec; v += stride) {
        Quad wq = load4(w, v), dq = load4(d, v), gq = load4(g, v), kq = mask4(mask, v);
        Quad mq = HYBRID ? load4(m, v) : wq;
#pragma unroll
        for (int k = 0; k < 4; ++k) step1<HYBRID>(&wq.v[k], &dq.v[k], &mq.v[k], gq.v[k], kq.v[k], c);
        store4(w, v, wq);
        store4(d, v, dq);
        if (HYBRID) store4(m, v, mq);
        if (w_lp) store4_bf16(w_lp, v, wq);
    }
    for (long long i = nvec * 4 + first; i < n; i += stride) {
        float wi = w[i], di = d[i], mi = HYBRID ? m[i] : 0.0f;
        step1<HYBRID>(&wi, &di, &mi, load1(g, i), mask ? (float)mask[i] : 1.0f, c);
        w[i] = wi;
        d[i] = di;
        if (HYBRID) m[i] = mi;
        if (w_lp) w_lp[i].bits = rm_float_to_bf16(wi);
    }
}

// The slots of scal (engine.cuda_ops.SCALARS names them in the same order).
enum { SCAL_ETA, SCAL_A_SGD, SCAL_A_RMS, SCAL_GSCALE };

__device__ __forceinline__ rm_coef hybrid_coef(const float* scal, float mu1, float mu2, float eps, float wd)
{
    rm_coef c = {scal[SCAL_ETA], scal[SCAL_A_SGD], scal[SCAL_A_RMS], mu1, mu2, eps, wd, scal[SCAL_GSCALE]};
    return c;
}

__device__ __forceinline__ rm_coef sgd_coef(const float* scal, float mu1, float wd)
{
    rm_coef c = {scal[SCAL_ETA], 1.0f, 0.0f, mu1, 0.0f, 0.0f, wd, scal[SCAL_GSCALE]};
    return c;
}

extern "C" __global__ void hybrid_update_f32(float* w, float* d, float* m, const float* g,
                                             const unsigned char* mask, rm_bf16* w_lp, long long n,
                                             const float* scal, float mu1, float mu2, float eps, float wd)
{
    update_range<true>(w, d, m, g, mask, w_lp, n, hybrid_coef(scal, mu1, mu2, eps, wd));
}

extern "C" __global__ void hybrid_update_f16(float* w, float* d, float* m, const unsigned short* g,
                                             const unsigned char* mask, rm_bf16* w_lp, long long n,
                                             const float* scal, float mu1, float mu2, float eps, float wd)
{
    update_range<true>(w, d, m, g, mask, w_lp, n, hybrid_coef(scal, mu1, mu2, eps, wd));
}

extern "C" __global__ void sgd_update_f32(float* w, float* d, const float* g, const unsigned char* mask,
                                          rm_bf16* w_lp, long long n, const float* scal, float mu1, float wd)
{
    update_range<false>(w, d, (float*)0, g, mask, w_lp, n, sgd_coef(scal, mu1, wd));
}

extern "C" __global__ void sgd_update_f16(float* w, float* d, const unsigned short* g,
                                          const unsigned char* mask, rm_bf16* w_lp, long long n,
                                          const float* scal, float mu1, float wd)
{
    update_range<false>(w, d, (float*)0, g, mask, w_lp, n, sgd_coef(scal, mu1, wd));
}
