// FP16 pack and unpack with scaling, for the communication path (gradients are all-reduced
// in FP16, computed in FP32):
//   pack_fp16:   h = half(x * scale)   round to nearest even, overflow to inf (as NumPy)
//   unpack_fp16: x = float(h) * scale
// Halves travel as their 16 bits (unsigned short). Four elements per thread and iteration:
// 128-bit float loads/stores, 64-bit half loads/stores; a scalar loop takes the tail.
#include "recipe_math.cuh"

extern "C" __global__ void pack_fp16(const float* x, unsigned short* h, long long n, float scale)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long nvec = (((size_t)x & 15) | ((size_t)h & 7)) == 0 ? n / 4 : 0;
    for (long long v = first; v < nvec; v += stride) {
        const float4 a = reinterpret_cast<const float4*>(x)[v];
        uint2 o;
        o.x = (unsigned int)rm_float_to_half(a.x * scale) | ((unsigned int)rm_float_to_half(a.y * scale) << 16);
        o.y = (unsigned int)rm_float_to_half(a.z * scale) | ((unsigned int)rm_float_to_half(a.w * scale) << 16);
        reinterpret_cast<uint2*>(h)[v] = o;
    }
    for (long long i = nvec * 4 + first; i < n; i += stride)
        h[i] = rm_float_to_half(x[i] * scale);
}

extern "C" __global__ void unpack_fp16(const unsigned short* h, float* x, long long n, float scale)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long nvec = (((size_t)x & 15) | ((size_t)h & 7)) == 0 ? n / 4 : 0;
    for (long long v = first; v < nvec; v += stride) {
        const uint2 a = reinterpret_cast<const uint2*>(h)[v];
        reinterpret_cast<float4*>(x)[v] = make_float4(
            rm_half_to_float((unsigned short)(a.x & 0xffffu)) * scale, rm_half_to_float((unsigned short)(a.x >> 16)) * scale,
            rm_half_to_float((unsigned short)(a.y & 0xffffu)) * scale, rm_half_to_float((unsigned short)(a.y >> 16)) * scale);
    }
    for (long long i = nvec * 4 + first; i < n; i += stride)
        x[i] = rm_half_to_float(h[i]) * scale;
}
