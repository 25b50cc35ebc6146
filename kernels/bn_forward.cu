// Training-mode batch norm over NHWC seen as x (rows = N*H*W, C), in two launches, x and y
// float32 (_f32) or bfloat16 (_bf16) in memory, float32 math and statistics for both:
//   bn_stats           grid (ceil(C/32), G), block (32, 8): each thread runs Welford over a
//                      strided set of rows of one channel (a warp reads 32 consecutive
//                      channels of a row: coalesced); the 8 threads of a channel are merged
//                      in shared memory (Chan); one partial (n, mean, M2) per block row.
//                      The last block of each grid column to finish (grid_reduce.cuh) then
//                      merges the column's G partials per channel, in block-row order
//                      (Chan), and writes mean, biased var, inv_std (saved for backward) and
//                      the folded scale = gamma*inv_std, shift = beta - mean*scale.
//   bn_forward_apply   y = x*scale + shift (+ReLU), 128-bit loads and stores (4 float32 or
//                      8 bfloat16) when C is a multiple of that and x, y are 16-byte aligned;
//                      with a non-null `shortcut` (the BN that ends a residual block),
//                      y = relu(x*scale + shift + shortcut): the block's sum and ReLU in the
//                      same pass, rounded once.
// Welford within a thread and Chan's merge between threads keep the variance exact when
// |mean| >> std, where E[x^2] - E[x]^2 in fp32 would cancel.
#include "recipe_math.cuh"
#include "grid_reduce.cuh"


template <typename T>
__device__ __forceinline__ void stats(const T* x, long long rows, int C, float* part_n, float* part_mean,
                                      float* part_m2, unsigned int* arrivals, const float* gamma,
                                      const float* beta, float eps, float* mean, float* var, float* inv_std,
                                      float* scale, float* shift)
{
    __shared__ float sh_n[RM_BN_TY][RM_BN_TX], sh_mean[RM_BN_TY][RM_BN_TX], sh_m2[RM_BN_TY][RM_BN_TX];
    const int c = blockIdx.x * RM_BN_TX + threadIdx.x;
    rm_moments s = {0.0f, 0.0f, 0.0f};
    if (c < C) {
        for (long long r = (long long)blockIdx.y * RM_BN_TY + threadIdx.y; r < rows;
             r += (long long)gridDim.y * RM_BN_TY)
            rm_welford_push(&s, rm_load1(x, r * C + c));
    }
    sh_n[threadIdx.y][threadIdx.x] = s.n;
    sh_mean[threadIdx.y][threadIdx.x] = s.mean;
    sh_m2[threadIdx.y][threadIdx.x] = s.m2;
    __syncthreads();
    for (int half = RM_BN_TY / 2; half > 0; half /= 2) {
        if (threadIdx.y < half) {
            rm_moments o = {sh_n[threadIdx.y + half][threadIdx.x], sh_mean[threadIdx.y + half][threadIdx.x],
                            sh_m2[threadIdx.y + half][threadIdx.x]};
            rm_moments_merge(&s, &o);
            sh_n[threadIdx.y][threadIdx.x] = s.n;
            sh_mean[threadIdx.y][threadIdx.x] = s.mean;
            sh_m2[threadIdx.y][threadIdx.x] = s.m2;
        }
        __syncthreads();
    }
    if (threadIdx.y == 0 && c < C) {
        const long long at = (long long)blockIdx.y * C + c;
        part_n[at] = s.n;
        part_mean[at] = s.mean;
        part_m2[at] = s.m2;
    }
    if (!rm_last_block_of_column(arrivals) || threadIdx.y != 0 || c >= C)
        return;
    rm_moments m = {0.0f, 0.0f, 0.0f};
    for (int k = 0; k < (int)gridDim.y; ++k) {
        const long long at = (long long)k * C + c;
        rm_moments o = {rm_load_partial(part_n, at), rm_load_partial(part_mean, at), rm_load_partial(part_m2, at)};
        rm_moments_merge(&m, &o);
    }
    const float v = m.n > 0.0f ? m.m2 / m.n : 0.0f;
    const float is = rm_bn_inv_std(v, eps);
    const float sc = rm_bn_scale(gamma[c], is);
    mean[c] = m.mean;
    var[c] = v;
    inv_std[c] = is;
    scale[c] = sc;
    shift[c] = rm_bn_shift(beta[c], m.mean, sc);
}

extern "C" __global__ void bn_stats_f32(const float* x, long long rows, int C, float* part_n, float* part_mean,
                                        float* part_m2, unsigned int* arrivals, const float* gamma,
                                        const float* beta, float eps, float* mean, float* var, float* inv_std,
                                        float* scale, float* shift)
{
    stats(x, rows, C, part_n, part_mean, part_m2, arrivals, gamma, beta, eps, mean, var, inv_std, scale, shift);
}

extern "C" __global__ void bn_stats_bf16(const rm_bf16* x, long long rows, int C, float* part_n,
                                         float* part_mean, float* part_m2, unsigned int* arrivals,
                                         const float* gamma, const float* beta, float eps, float* mean,
                                         float* var, float* inv_std, float* scale, float* shift)
{
    stats(x, rows, C, part_n, part_mean, part_m2, arrivals, gamma, beta, eps, mean, var, inv_std, scale, shift);
}

template <typename T>
__device__ __forceinline__ void forward_apply(const T* x, const T* shortcut, T* y, long long n, int C,
                                              const float* scale, const float* shift, int relu)
{
    rm_channel_map(x, shortcut, y, n, C, [=](float v, float s, int c) {
        return shortcut != nullptr ? rm_bn_apply_residual(v, scale[c], shift[c], s, relu)
                                   : rm_bn_apply(v, scale[c], shift[c], relu);
    });
}

extern "C" __global__ void bn_forward_apply_f32(const float* x, const float* shortcut, float* y, long long n,
                                                int C, const float* scale, const float* shift, int relu)
{
    forward_apply(x, shortcut, y, n, C, scale, shift, relu);
}

extern "C" __global__ void bn_forward_apply_bf16(const rm_bf16* x, const rm_bf16* shortcut, rm_bf16* y,
                                                 long long n, int C, const float* scale, const float* shift,
                                                 int relu)
{
    forward_apply(x, shortcut, y, n, C, scale, shift, relu);
}
