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
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const bool vec = C % 4 == 0 && (((size_t)x | (size_t)y) & 15) == 0;
    const long long nvec = vec ? n / 4 : 0;
    for (long long v = first; v < nvec; v += stride) {
        const float4 a = reinterpret_cast<const float4*>(x)[v];
        const int c = (int)((v * 4) % C);
        reinterpret_cast<float4*>(y)[v] = make_float4(
            infer1(a.x, c, gamma, beta, mean, var, eps, relu), infer1(a.y, c + 1, gamma, beta, mean, var, eps, relu),
            infer1(a.z, c + 2, gamma, beta, mean, var, eps, relu), infer1(a.w, c + 3, gamma, beta, mean, var, eps, relu));
    }
    for (long long i = nvec * 4 + first; i < n; i += stride)
        y[i] = infer1(x[i], (int)(i % C), gamma, beta, mean, var, eps, relu);
}
