/* Host loops over the per-element math of kernels/recipe_math.cuh (the CPU path).
 *
 * Each loop is the host twin of one CUDA kernel: same formulas, same order of operations
 * per element. The loops are branch-free over restrict pointers so that the C compiler
 * vectorizes them; they run without the GIL (see hostmath.pyx).
 */
#ifndef HOSTMATH_LOOPS_H
#define HOSTMATH_LOOPS_H

#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include "recipe_math.cuh"

/* Gradient element i as float: fp32 input, or fp16 bits when g16 is given. */
#define HM_GRAD(i) (g32 ? g32[i] : rm_half_bits_to_float(g16[i]))
/* Decay factor of element i: the mask byte, or 1 everywhere when there is no mask. */
#define HM_DECAY(i) (mask ? (float)mask[i] : 1.0f)

static void hm_hybrid_update(float *restrict w, float *restrict d, float *restrict m,
                             const float *restrict g32, const uint16_t *restrict g16,
                             const uint8_t *restrict mask, int64_t n, rm_coef c)
{
    for (int64_t i = 0; i < n; ++i)
        rm_hybrid_step(&w[i], &d[i], &m[i], HM_GRAD(i), HM_DECAY(i), &c);
}

static void hm_sgd_update(float *restrict w, float *restrict d,
                          const float *restrict g32, const uint16_t *restrict g16,
                          const uint8_t *restrict mask, int64_t n, rm_coef c)
{
    for (int64_t i = 0; i < n; ++i)
        rm_sgd_step(&w[i], &d[i], HM_GRAD(i), HM_DECAY(i), &c);
}

/* Per-channel (mean, biased var, inv_std) of x (rows, C) by Welford's method, one pass.
 * Returns 0, or -1 when the scratch allocation fails. */
static int hm_bn_stats(const float *restrict x, int64_t rows, int64_t C, float eps,
                       float *restrict mean, float *restrict var, float *restrict inv_std)
{
    rm_moments *s = (rm_moments *)calloc((size_t)C, sizeof(rm_moments));
    if (!s) return -1;
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < C; ++c)
            rm_welford_push(&s[c], x[r * C + c]);
    for (int64_t c = 0; c < C; ++c) {
        mean[c] = s[c].mean;
        var[c] = rows ? s[c].m2 / s[c].n : 0.0f;
        inv_std[c] = rm_bn_inv_std(var[c], eps);
    }
    free(s);
    return 0;
}

/* y = BN(x) (+ReLU) with per-channel scale = gamma*inv_std, shift = beta - mean*scale. */
static void hm_bn_apply(const float *restrict x, float *restrict y, int64_t rows, int64_t C,
                        const float *restrict scale, const float *restrict shift, int relu)
{
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < C; ++c)
            y[r * C + c] = rm_bn_apply(x[r * C + c], scale[c], shift[c], relu);
}

/* Training-mode BN backward: per-channel sums (in double on the host), then dx. */
static int hm_bn_backward(const float *restrict dy, const float *restrict x, const float *restrict y,
                          int64_t rows, int64_t C, const float *restrict gamma,
                          const float *restrict mean, const float *restrict inv_std, int relu,
                          float *restrict dx, float *restrict dgamma, float *restrict dbeta)
{
    double *acc = (double *)calloc((size_t)(2 * C), sizeof(double));
    if (!acc) return -1;
    double *sum_dy = acc, *sum_dyxh = acc + C;
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < C; ++c) {
            int64_t i = r * C + c;
            float g = rm_relu_grad(dy[i], y[i], relu);
            sum_dy[c] += g;
            sum_dyxh[c] += (double)g * ((x[i] - mean[c]) * inv_std[c]);
        }
    float inv_rows = rows ? 1.0f / (float)rows : 0.0f;
    for (int64_t c = 0; c < C; ++c) {
        dbeta[c] = (float)sum_dy[c];
        dgamma[c] = (float)sum_dyxh[c];
    }
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < C; ++c) {
            int64_t i = r * C + c;
            dx[i] = rm_bn_dx(rm_relu_grad(dy[i], y[i], relu), x[i], mean[c], inv_std[c], gamma[c],
                             dbeta[c] * inv_rows, dgamma[c] * inv_rows);
        }
    free(acc);
    return 0;
}

#endif /* HOSTMATH_LOOPS_H */
