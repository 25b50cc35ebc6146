// Inference-mode batch norm (+ReLU) with given per-channel statistics, one launch:
// y = x*scale + shift with scale = gamma/sqrt(var+eps), shift = beta - mean*scale, the
// per-channel coefficients folded by each thread (they stay in L1/L2; x is read once and y
// written once, 128-bit wide when C % 4 == 0).
#include "recipe_math.cuh"

__device__ __forceinline__ float infer1(float x, int c, const float* gamma, const float* beta,
                                        const float* mean, const float* var, float eps, int relu)
{
    const float scale = rm_bn_scale(gamma[c], rm_bn_inv_std(var[c], eps));
    return rm_bn_apply(x, scale, rm_bn_shift(beta[c], mean[c], scale), relu);
}

extern "C" __global__ void bn_infer(const float* x, float* y, long long n, int C, const float* gamma,
                                    const float* beta, const float* mean, const float* var, float eps,
                                    int relu)
{
    rm_channel_map(x, y, n, C, [=](float v, int c) { return infer1(v, c, gamma, beta, mean, var, eps, relu); });
}
