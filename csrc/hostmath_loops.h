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

/* One loop body per (gradient type, mask) combination: the flags are compile-time
 * constants after inlining, so each of the four instances is branch-free and vectorizes. */
#define HM_ALWAYS_INLINE static inline __attribute__((always_inline))

HM_ALWAYS_INLINE float hm_grad(const float *restrict g32, const uint16_t *restrict g16, int64_t i, int half)
{
    return half ? rm_half_to_float(g16[i]) : g32[i];
}

HM_ALWAYS_INLINE float hm_decay(const uint8_t *restrict mask, int64_t i, int masked)
{
    return masked ? (float)mask[i] : 1.0f;
}

HM_ALWAYS_INLINE void hm_hybrid_loop(float *restrict w, float *restrict d, float *restrict m,
                                     const float *restrict g32, const uint16_t *restrict g16,
                                     const uint8_t *restrict mask, int64_t n, rm_coef c,
                                     int half, int masked)
{
    for (int64_t i = 0; i < n; ++i)
        rm_hybrid_step(&w[i], &d[i], &m[i], hm_grad(g32, g16, i, half), hm_decay(mask, i, masked), &c);
}

HM_ALWAYS_INLINE void hm_sgd_loop(float *restrict w, float *restrict d, const float *restrict g32,
                                  const uint16_t *restrict g16, const uint8_t *restrict mask,
                                  int64_t n, rm_coef c, int half, int masked)
{
    for (int64_t i = 0; i < n; ++i)
        rm_sgd_step(&w[i], &d[i], hm_grad(g32, g16, i, half), hm_decay(mask, i, masked), &c);
}

/* g32 or g16 (fp16 bits) is given, the other is NULL; mask NULL means decay everywhere. */
static void hm_hybrid_update(float *restrict w, float *restrict d, float *restrict m,
                             const float *restrict g32, const uint16_t *restrict g16,
                             const uint8_t *restrict mask, int64_t n, rm_coef c)
{
    if (g16) {
        if (mask) hm_hybrid_loop(w, d, m, g32, g16, mask, n, c, 1, 1);
        else hm_hybrid_loop(w, d, m, g32, g16, mask, n, c, 1, 0);
    } else {
        if (mask) hm_hybrid_loop(w, d, m, g32, g16, mask, n, c, 0, 1);
        else hm_hybrid_loop(w, d, m, g32, g16, mask, n, c, 0, 0);
    }
}

static void hm_sgd_update(float *restrict w, float *restrict d,
                          const float *restrict g32, const uint16_t *restrict g16,
                          const uint8_t *restrict mask, int64_t n, rm_coef c)
{
    if (g16) {
        if (mask) hm_sgd_loop(w, d, g32, g16, mask, n, c, 1, 1);
        else hm_sgd_loop(w, d, g32, g16, mask, n, c, 1, 0);
    } else {
        if (mask) hm_sgd_loop(w, d, g32, g16, mask, n, c, 0, 1);
        else hm_sgd_loop(w, d, g32, g16, mask, n, c, 0, 0);
    }
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

/* Rows summed in float before the running sums take them in double: the float inner
 * loop vectorizes, and a block's float error stays small. */
#define HM_BLOCK_ROWS 64

/* Training-mode BN backward: per-channel sums, then dx. */
static int hm_bn_backward(const float *restrict dy, const float *restrict x, const float *restrict y,
                          int64_t rows, int64_t C, const float *restrict gamma,
                          const float *restrict mean, const float *restrict inv_std, int relu,
                          float *restrict dx, float *restrict dgamma, float *restrict dbeta)
{
    double *acc = (double *)calloc((size_t)(2 * C), sizeof(double));
    float *part = (float *)malloc((size_t)(2 * C) * sizeof(float));
    if (!acc || !part) { free(acc); free(part); return -1; }
    double *sum_dy = acc, *sum_dyxh = acc + C;
    float *part_dy = part, *part_dyxh = part + C;
    for (int64_t r0 = 0; r0 < rows; r0 += HM_BLOCK_ROWS) {
        int64_t r1 = r0 + HM_BLOCK_ROWS < rows ? r0 + HM_BLOCK_ROWS : rows;
        memset(part, 0, (size_t)(2 * C) * sizeof(float));
        for (int64_t r = r0; r < r1; ++r)
            for (int64_t c = 0; c < C; ++c) {
                int64_t i = r * C + c;
                float g = rm_relu_grad(dy[i], y[i], relu);
                part_dy[c] += g;
                part_dyxh[c] += g * ((x[i] - mean[c]) * inv_std[c]);
            }
        for (int64_t c = 0; c < C; ++c) {
            sum_dy[c] += part_dy[c];
            sum_dyxh[c] += part_dyxh[c];
        }
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
    free(part);
    return 0;
}

#endif /* HOSTMATH_LOOPS_H */
