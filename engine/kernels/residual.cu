// The end of a residual block and its gradient, in place, one launch each:
//   add_relu_:  y = relu(y + shortcut)   (rm_add_relu: the sum in float32, rounded once to
//                                         bfloat16, as ml_dtypes computes y += s on the CPU)
//   relu_grad_: dy = dy * (y > 0)        (rm_relu_mask_grad; y is add_relu_'s result)
// Elementwise over n elements, 128 bits per access (4 float32, 8 bfloat16) when both pointers
// are 16-byte aligned, a scalar loop for the rest. T is float (_f32) or bfloat16 (_bf16).
#include "recipe_math.cuh"

// a[i] = f(a[i], b[i]) over n elements.
template <typename T, typename F>
__device__ __forceinline__ void pair_update(T* a, const T* b, long long n, F f)
{
    constexpr int N = rm_pack<T>::N;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long npack = rm_aligned16(a, b) ? n / N : 0;
    for (long long k = first; k < npack; k += stride) {
        rm_pack<T> u = rm_pack_load(a, k);
        const rm_pack<T> v = rm_pack_load(b, k);
#pragma unroll
        for (int j = 0; j < N; ++j) u.v[j] = f(u.v[j], v.v[j]);
        rm_pack_store(a, k, u);
    }
    for (long long i = npack * N + first; i < n; i += stride)
        rm_store1(a, i, f(rm_load1(a, i), rm_load1(b, i)));
}

extern "C" __global__ void add_relu_f32(float* y, const float* shortcut, long long n)
{
    pair_update(y, shortcut, n, [](float a, float b) { return rm_add_relu(a, b); });
}

extern "C" __global__ void add_relu_bf16(rm_bf16* y, const rm_bf16* shortcut, long long n)
{
    pair_update(y, shortcut, n, [](float a, float b) { return rm_add_relu(a, b); });
}

extern "C" __global__ void relu_grad_f32(float* dy, const float* y, long long n)
{
    pair_update(dy, y, n, [](float g, float v) { return rm_relu_mask_grad(g, v); });
}

extern "C" __global__ void relu_grad_bf16(rm_bf16* dy, const rm_bf16* y, long long n)
{
    pair_update(dy, y, n, [](float g, float v) { return rm_relu_mask_grad(g, v); });
}
