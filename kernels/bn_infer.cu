// Inference-mode batch norm (+ReLU) with given per-channel statistics, one launch:
// y = x*scale + shift with scale = gamma/sqrt(var+eps), shift = beta - mean*scale, the
// per-channel coefficients folded by each thread (they stay in L1/L2; x is read once and y
// written once, 128-bit wide when alignment and C allow: 4 float32 or 8 bfloat16 per access).
// x and y are float32 (_f32) or bfloat16 (_bf16); statistics and parameters float32. A
// non-null `shortcut` (the BN that ends a residual block) is added before the ReLU, as in
// bn_forward_apply.
#include "recipe_math.cuh"

__device__ __forceinline__ float infer1(float x, float s, int c, const float* gamma, const float* beta,
                                        const float* mean, const float* var, float eps, int relu,
                                        bool residual)
{
    const float scale = rm_bn_scale(gamma[c], rm_bn_inv_std(var[c], eps));
    const float shift = rm_bn_shift(beta[c], mean[c], scale);
    return residual ? rm_bn_apply_residual(x, scale, shift, s, relu) : rm_bn_apply(x, scale, shift, relu);
}

template <typename T>
__device__ __forceinline__ void infer(const T* x, const T* shortcut, T* y, long long n, int C,
                                      const float* gamma, const float* beta, const float* mean,
                                      const float* var, float eps, int relu)
{
    rm_channel_map(x, shortcut, y, n, C, [=](float v, float s, int c) {
        return infer1(v, s, c, gamma, beta, mean, var, eps, relu, shortcut != nullptr);
    });
}

extern "C" __global__ void bn_infer_f32(const float* x, const float* shortcut, float* y, long long n, int C,
                                        const float* gamma, const float* beta, const float* mean,
                                        const float* var, float eps, int relu)
{
    infer(x, shortcut, y, n, C, gamma, beta, mean, var, eps, relu);
}

extern "C" __global__ void bn_infer_bf16(const rm_bf16* x, const rm_bf16* shortcut, rm_bf16* y, long long n,
                                         int C, const float* gamma, const float* beta, const float* mean,
                                         const float* var, float eps, int relu)
{
    infer(x, shortcut, y, n, C, gamma, beta, mean, var, eps, relu);
}
