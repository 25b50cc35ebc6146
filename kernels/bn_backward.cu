// Training-mode batch norm backward over x (rows = N*H*W, C), through the fused ReLU; dy, x,
// y and dx float32 (_f32) or bfloat16 (_bf16) in memory, float32 math and sums for both, in
// two launches:
//   bn_backward_reduce    grid (ceil(C/32), G), block (32, 8): per channel, partial sums of
//                         g = relu'(y)*dy and of g*xhat over strided rows, reduced in shared
//                         memory; one partial per block row. The last block of each grid
//                         column to finish (grid_reduce.cuh) adds the column's G partials in
//                         block-row order: dbeta = sum g, dgamma = sum g*xhat. With a
//                         non-null `gated` (the first BN backward of a residual block's
//                         output gradient, relu 0), g = dy*(y>0) with y the block's output
//                         (rm_relu_mask_grad, a product as in relu_grad_) and g is also
//                         stored there (dy itself: the gradient the shortcut receives), so
//                         the block's ReLU gradient costs no pass of its own.
//   bn_backward_dx        dx = gamma*inv_std*(g - dbeta/R - xhat*dgamma/R), elementwise with
//                         128-bit loads (4 float32 or 8 bfloat16) when C is a multiple of that
//                         and every pointer 16-byte aligned. dx may be dy itself (the model
//                         passes dy as `out`): each element is read before it is written.
#include "recipe_math.cuh"
#include "grid_reduce.cuh"


template <typename T>
__device__ __forceinline__ float masked_grad(const T* dy, const T* y, T* gated, long long i, int relu)
{
    if (gated == nullptr)
        return rm_relu_grad(rm_load1(dy, i), relu ? rm_load1(y, i) : 1.0f, relu);
    const float g = rm_relu_mask_grad(rm_load1(dy, i), rm_load1(y, i));
    rm_store1(gated, i, g);     // exact in bfloat16 too: dy times 0 or 1
    return g;
}

template <typename T>
__device__ __forceinline__ void backward_reduce(const T* dy, const T* x, const T* y, T* gated, long long rows,
                                                int C, const float* mean, const float* inv_std, int relu,
                                                float* part_dy, float* part_dyxh, unsigned int* arrivals,
                                                float* dgamma, float* dbeta)
{
    __shared__ float sh_dy[RM_BN_TY][RM_BN_TX], sh_dyxh[RM_BN_TY][RM_BN_TX];
    const int c = blockIdx.x * RM_BN_TX + threadIdx.x;
    float s_dy = 0.0f, s_dyxh = 0.0f;
    if (c < C) {
        const float mu = mean[c], is = inv_std[c];
        for (long long r = (long long)blockIdx.y * RM_BN_TY + threadIdx.y; r < rows;
             r += (long long)gridDim.y * RM_BN_TY) {
            const long long i = r * C + c;
            const float g = masked_grad(dy, y, gated, i, relu);
            s_dy += g;
            s_dyxh += g * ((rm_load1(x, i) - mu) * is);
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
    if (!rm_last_block_of_column(arrivals) || threadIdx.y != 0 || c >= C)
        return;
    float t_dy = 0.0f, t_dyxh = 0.0f;
    for (int k = 0; k < (int)gridDim.y; ++k) {
        t_dy += rm_load_partial(part_dy, (long long)k * C + c);
        t_dyxh += rm_load_partial(part_dyxh, (long long)k * C + c);
    }
    dbeta[c] = t_dy;
    dgamma[c] = t_dyxh;
}

extern "C" __global__ void bn_backward_reduce_f32(const float* dy, const float* x, const float* y, float* gated,
                                                  long long rows, int C, const float* mean,
                                                  const float* inv_std, int relu, float* part_dy,
                                                  float* part_dyxh, unsigned int* arrivals, float* dgamma,
                                                  float* dbeta)
{
    backward_reduce(dy, x, y, gated, rows, C, mean, inv_std, relu, part_dy, part_dyxh, arrivals, dgamma, dbeta);
}

extern "C" __global__ void bn_backward_reduce_bf16(const rm_bf16* dy, const rm_bf16* x, const rm_bf16* y,
                                                   rm_bf16* gated, long long rows, int C, const float* mean,
                                                   const float* inv_std, int relu, float* part_dy,
                                                   float* part_dyxh, unsigned int* arrivals, float* dgamma,
                                                   float* dbeta)
{
    backward_reduce(dy, x, y, gated, rows, C, mean, inv_std, relu, part_dy, part_dyxh, arrivals, dgamma, dbeta);
}

__device__ __forceinline__ float dx1(float dy, float x, float y, int c, const float* gamma,
                                     const float* mean, const float* inv_std, const float* dgamma,
                                     const float* dbeta, float inv_rows, int relu)
{
    return rm_bn_dx(rm_relu_grad(dy, y, relu), x, mean[c], inv_std[c], gamma[c], dbeta[c] * inv_rows,
                    dgamma[c] * inv_rows);
}

// y is read only with the ReLU (null without it).
template <typename T>
__device__ __forceinline__ void backward_dx(const T* dy, const T* x, const T* y, long long n, int C,
                                            const float* gamma, const float* mean, const float* inv_std,
                                            const float* dgamma, const float* dbeta, float inv_rows,
                                            int relu, T* dx)
{
    constexpr int N = rm_pack<T>::N;
    auto one = [=](float g, float a, float b, int c) {
        return dx1(g, a, b, c, gamma, mean, inv_std, dgamma, dbeta, inv_rows, relu);
    };
    rm_channel_for<N>(n, C, rm_aligned16(dy, x, y, dx), [&](long long k, int c) {
        rm_pack<T> g = rm_pack_load(dy, k);
        const rm_pack<T> a = rm_pack_load(x, k);
        rm_pack<T> b;       // y without the ReLU is never read: ones stand in (rm_relu_grad ignores them)
#pragma unroll
        for (int j = 0; j < N; ++j) b.v[j] = 1.0f;
        if (relu) b = rm_pack_load(y, k);
#pragma unroll
        for (int j = 0; j < N; ++j) g.v[j] = one(g.v[j], a.v[j], b.v[j], c + j);
        rm_pack_store(dx, k, g);
    }, [&](long long i, int c) {
        rm_store1(dx, i, one(rm_load1(dy, i), rm_load1(x, i), relu ? rm_load1(y, i) : 1.0f, c));
    });
}

extern "C" __global__ void bn_backward_dx_f32(const float* dy, const float* x, const float* y, long long n,
                                              int C, const float* gamma, const float* mean,
                                              const float* inv_std, const float* dgamma,
                                              const float* dbeta, float inv_rows, int relu, float* dx)
{
    backward_dx(dy, x, y, n, C, gamma, mean, inv_std, dgamma, dbeta, inv_rows, relu, dx);
}

extern "C" __global__ void bn_backward_dx_bf16(const rm_bf16* dy, const rm_bf16* x, const rm_bf16* y,
                                               long long n, int C, const float* gamma, const float* mean,
                                               const float* inv_std, const float* dgamma,
                                               const float* dbeta, float inv_rows, int relu, rm_bf16* dx)
{
    backward_dx(dy, x, y, n, C, gamma, mean, inv_std, dgamma, dbeta, inv_rows, relu, dx);
}
