// Training-mode batch norm backward over x (rows = N*H*W, C), through the fused ReLU:
//   bn_backward_reduce    grid (ceil(C/32), G), block (32, 8): per channel, partial sums of
//                         g = relu'(y)*dy and of g*xhat over strided rows, reduced in shared
//                         memory; one partial per block row.
//   bn_backward_finalize  one thread per channel adds the G partials: dbeta = sum g,
//                         dgamma = sum g*xhat.
//   bn_backward_dx        dx = gamma*inv_std*(g - dbeta/R - xhat*dgamma/R), elementwise with
//                         128-bit loads when C % 4 == 0. dx may be dy itself (the model passes
//                         dy as `out`): each element is read before it is written.
#include "recipe_math.cuh"


extern "C" __global__ void bn_backward_reduce(const float* dy, const float* x, const float* y,
                                              long long rows, int C, const float* mean,
                                              const float* inv_std, int relu, float* part_dy,
                                              float* part_dyxh)
{
    __shared__ float sh_dy[RM_BN_TY][RM_BN_TX], sh_dyxh[RM_BN_TY][RM_BN_TX];
    const int c = blockIdx.x * RM_BN_TX + threadIdx.x;
    float s_dy = 0.0f, s_dyxh = 0.0f;
    if (c < C) {
        const float mu = mean[c], is = inv_std[c];
        for (long long r = (long long)blockIdx.y * RM_BN_TY + threadIdx.y; r < rows;
             r += (long long)gridDim.y * RM_BN_TY) {
            const long long i = r * C + c;
            const float g = rm_relu_grad(dy[i], relu ? y[i] : 1.0f, relu);
            s_dy += g;
            s_dyxh += g * ((x[i] - mu) * is);
        }
    }
    sh_dy[threadIdx.y][threadIdx.x] = s_dy;
    sh_dyxh[threadIdx.y][threadIdx.x] = s_dyxh;
    __syncthreads();
    for (int half = RM_BN_TY / 2; half > 0; half /= 2) {
        if (threadIdx.y < half) {
            sh_dy[threadIdx.y][threadIdx.x] += sh_dy[threadIdx.y + half][threadIdx.x];
            sh_dyxh[threadIdx.y][threadIdx.x] += sh_dyxh[threadIdx.y + half][threadIdx.x];
        }
        __syncthreads();
    }
    if (threadIdx.y == 0 && c < C) {
        part_dy[(long long)blockIdx.y * C + c] = sh_dy[0][threadIdx.x];
        part_dyxh[(long long)blockIdx.y * C + c] = sh_dyxh[0][threadIdx.x];
    }
}

extern "C" __global__ void bn_backward_finalize(const float* part_dy, const float* part_dyxh, int G,
                                                int C, float* dgamma, float* dbeta)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float s_dy = 0.0f, s_dyxh = 0.0f;
    for (int k = 0; k < G; ++k) {
        s_dy += part_dy[(long long)k * C + c];
        s_dyxh += part_dyxh[(long long)k * C + c];
    }
    dbeta[c] = s_dy;
    dgamma[c] = s_dyxh;
}

__device__ __forceinline__ float dx1(float dy, float x, float y, int c, const float* gamma,
                                     const float* mean, const float* inv_std, const float* dgamma,
                                     const float* dbeta, float inv_rows, int relu)
{
    return rm_bn_dx(rm_relu_grad(dy, y, relu), x, mean[c], inv_std[c], gamma[c], dbeta[c] * inv_rows,
                    dgamma[c] * inv_rows);
}

extern "C" __global__ void bn_backward_dx(const float* dy, const float* x, const float* y, long long n,
                                          int C, const float* gamma, const float* mean,
                                          const float* inv_std, const float* dgamma,
                                          const float* dbeta, float inv_rows, int relu, float* dx)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (first >= n) return;     // also every thread when n == 0, where C may be 0
    const bool vec = C % 4 == 0 && (((size_t)dy | (size_t)x | (size_t)y | (size_t)dx) & 15) == 0;
    const long long nvec = vec ? n / 4 : 0;
    const float4 ones = make_float4(1.0f, 1.0f, 1.0f, 1.0f);
    rm_channel_walk ch = rm_channel_start(first * 4, stride * 4, C);
    for (long long v = first; v < nvec; v += stride, rm_channel_next(&ch)) {
        const float4 g = reinterpret_cast<const float4*>(dy)[v];
        const float4 a = reinterpret_cast<const float4*>(x)[v];
        const float4 b = relu ? reinterpret_cast<const float4*>(y)[v] : ones;
        const int c = ch.c;
        reinterpret_cast<float4*>(dx)[v] = make_float4(
            dx1(g.x, a.x, b.x, c, gamma, mean, inv_std, dgamma, dbeta, inv_rows, relu),
            dx1(g.y, a.y, b.y, c + 1, gamma, mean, inv_std, dgamma, dbeta, inv_rows, relu),
            dx1(g.z, a.z, b.z, c + 2, gamma, mean, inv_std, dgamma, dbeta, inv_rows, relu),
            dx1(g.w, a.w, b.w, c + 3, gamma, mean, inv_std, dgamma, dbeta, inv_rows, relu));
    }
    ch = rm_channel_start(nvec * 4 + first, stride, C);
    for (long long i = nvec * 4 + first; i < n; i += stride, rm_channel_next(&ch))
        dx[i] = dx1(dy[i], x[i], relu ? y[i] : 1.0f, ch.c, gamma, mean, inv_std, dgamma, dbeta, inv_rows,
                    relu);
}
