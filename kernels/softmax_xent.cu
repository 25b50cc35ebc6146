// Softmax cross-entropy with label smoothing over logits (n, K), float32, C-contiguous, and
// int64 labels (n,): the loss, its gradient and the top-1 hits of a batch in two launches.
//   softmax_xent_rows    one block per row (rows beyond the grid in a block-stride loop),
//                        blockDim.x a power of two <= SOFTMAX_XENT_THREADS: the row's max and
//                        first argmax (rm_argmax_takes), sum exp(z - max) and sum (z - max),
//                        each reduced over the block in shared memory in a fixed tree; then
//                        row_loss[r] (rm_xent_loss), row_hit[r] = (argmax == label) and
//                        dlogits[r, :] = (softmax - q) / n (rm_xent_grad).
//   softmax_xent_reduce  one block: out[0] = sum(row_loss) / n, out[1] = sum(row_hit), each
//                        thread summing rows tid, tid + blockDim.x, ... in order, then a fixed
//                        tree: the same bits on every run (no atomics).
// A label outside [0, K) reads nothing: its row's loss and gradient are NaN (so the trainer's
// check_finite stops the job) and its hit 0. A NaN logit makes its row's loss and gradient
// NaN, as in engine/loss.py.
#include "recipe_math.cuh"

#define SOFTMAX_XENT_THREADS 256

extern "C" __global__ void softmax_xent_rows(const float* logits, const long long* labels, long long n, int K,
                                             float e, float one_minus_e, float e_over_k, float* dlogits,
                                             float* row_loss, float* row_hit)
{
    __shared__ float sh_a[SOFTMAX_XENT_THREADS], sh_b[SOFTMAX_XENT_THREADS];
    __shared__ long long sh_at[SOFTMAX_XENT_THREADS];
    const int t = threadIdx.x, T = blockDim.x;
    const float nan = rm_bits_f32(0x7fc00000u), minus_inf = rm_bits_f32(0xff800000u);
    for (long long r = blockIdx.x; r < n; r += gridDim.x) {
        const float* z = logits + r * K;
        const long long label = labels[r];
        const bool valid = label >= 0 && label < K;

        // max and its first index
        float best = minus_inf;
        long long at = K;                       // no index yet: any element is taken
        for (int k = t; k < K; k += T)
            if (rm_argmax_takes(z[k], k, best, at)) { best = z[k]; at = k; }
        sh_a[t] = best;
        sh_at[t] = at;
        __syncthreads();
        for (int half = T / 2; half > 0; half /= 2) {
            if (t < half && rm_argmax_takes(sh_a[t + half], sh_at[t + half], sh_a[t], sh_at[t])) {
                sh_a[t] = sh_a[t + half];
                sh_at[t] = sh_at[t + half];
            }
            __syncthreads();
        }
        const float m = sh_a[0];
        const long long argmax = sh_at[0];
        __syncthreads();                        // every thread has read sh_a[0] before it changes

        // sum exp(s) and sum s, s = z - m
        float se = 0.0f, ss = 0.0f;
        for (int k = t; k < K; k += T) {
            const float s = z[k] - m;
            se += expf(s);
            ss += s;
        }
        sh_a[t] = se;
        sh_b[t] = ss;
        __syncthreads();
        for (int half = T / 2; half > 0; half /= 2) {
            if (t < half) {
                sh_a[t] += sh_a[t + half];
                sh_b[t] += sh_b[t + half];
            }
            __syncthreads();
        }
        const float log_z = logf(sh_a[0]);
        const float sum_s = sh_b[0];
        __syncthreads();                        // the next row writes sh_a, sh_b again

        const float nf = (float)n;
        for (int k = t; k < K; k += T)
            dlogits[r * K + k] = valid ? rm_xent_grad(z[k] - m, log_z, k == label, one_minus_e, e_over_k) / nf : nan;
        if (t == 0) {
            row_loss[r] = valid ? rm_xent_loss(log_z, z[label] - m, sum_s, K, one_minus_e, e) : nan;
            row_hit[r] = valid && argmax == label ? 1.0f : 0.0f;
        }
    }
}

extern "C" __global__ void softmax_xent_reduce(const float* row_loss, const float* row_hit, long long n, float* out)
{
    __shared__ float sh_loss[SOFTMAX_XENT_THREADS], sh_hit[SOFTMAX_XENT_THREADS];
    const int t = threadIdx.x, T = blockDim.x;
    float l = 0.0f, h = 0.0f;
    for (long long r = t; r < n; r += T) {
        l += row_loss[r];
        h += row_hit[r];
    }
    sh_loss[t] = l;
    sh_hit[t] = h;
    __syncthreads();
    for (int half = T / 2; half > 0; half /= 2) {
        if (t < half) {
            sh_loss[t] += sh_loss[t + half];
            sh_hit[t] += sh_hit[t + half];
        }
        __syncthreads();
    }
    if (t == 0) {
        out[0] = sh_loss[0] / (float)n;
        out[1] = sh_hit[0];
    }
}
