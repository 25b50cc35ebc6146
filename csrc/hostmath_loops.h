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
#include <math.h>
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

/* Rows summed in float before the running sums take them in double: the float inner
 * loop vectorizes, and a block's float error stays small. Callers that split the rows
 * over threads cut at multiples of HM_BLOCK_ROWS, so every split sums the same blocks. */
#define HM_BLOCK_ROWS 64

HM_ALWAYS_INLINE int64_t hm_block_end(int64_t r0, int64_t rows)
{
    return r0 + HM_BLOCK_ROWS < rows ? r0 + HM_BLOCK_ROWS : rows;
}

/* Add a block's two float partials (part[0:C], part[C:2C]) into the double sums, and
 * zero them for the next block. */
HM_ALWAYS_INLINE void hm_flush_partials(float *restrict part, int64_t C, double *restrict s1,
                                        double *restrict s2)
{
    for (int64_t c = 0; c < C; ++c) {
        s1[c] += part[c];
        s2[c] += part[C + c];
    }
    memset(part, 0, (size_t)(2 * C) * sizeof(float));
}

/* The shift for hm_bn_shifted_sums: per-channel mean of the first min(rows, HM_BLOCK_ROWS)
 * rows, close enough to the true mean that the shifted sums cannot cancel. */
static void hm_bn_pilot_mean(const float *restrict x, int64_t rows, int64_t C, float *restrict pilot)
{
    int64_t n = rows < HM_BLOCK_ROWS ? rows : HM_BLOCK_ROWS;
    for (int64_t c = 0; c < C; ++c)
        pilot[c] = 0.0f;
    for (int64_t r = 0; r < n; ++r)
        for (int64_t c = 0; c < C; ++c)
            pilot[c] += x[r * C + c];
    for (int64_t c = 0; c < C; ++c)
        pilot[c] = n ? pilot[c] / (float)n : 0.0f;
}

/* Per-channel sums of d = x - shift and of d*d over the rows of x (rows, C), added into
 * s1 and s2. With the shift near the mean, var = s2/R - (s1/R)^2 loses nothing to
 * cancellation, and the loop has no division (Welford's update divides per element,
 * which made the statistics pass 4x slower than a copy). Returns -1 if scratch
 * allocation fails. */
static int hm_bn_shifted_sums(const float *restrict x, int64_t rows, int64_t C,
                              const float *restrict shift, double *restrict s1, double *restrict s2)
{
    float *part = (float *)calloc((size_t)(2 * C), sizeof(float));
    if (!part) return -1;
    float *p1 = part, *p2 = part + C;
    for (int64_t r0 = 0; r0 < rows; r0 += HM_BLOCK_ROWS) {
        for (int64_t r = r0; r < hm_block_end(r0, rows); ++r)
            for (int64_t c = 0; c < C; ++c) {
                float d = x[r * C + c] - shift[c];
                p1[c] += d;
                p2[c] += d * d;
            }
        hm_flush_partials(part, C, s1, s2);
    }
    free(part);
    return 0;
}

/* The BN loops below come in two instances each, with and without the fused ReLU (the
 * flag is a constant after inlining): without it, y is never loaded and the mask costs no
 * compare. */

/* y = BN(x) (+ReLU) with per-channel scale = gamma*inv_std, shift = beta - mean*scale. */
HM_ALWAYS_INLINE void hm_bn_apply_loop(const float *restrict x, float *restrict y, int64_t rows,
                                       int64_t C, const float *restrict scale,
                                       const float *restrict shift, int relu)
{
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < C; ++c)
            y[r * C + c] = rm_bn_apply(x[r * C + c], scale[c], shift[c], relu);
}

static void hm_bn_apply(const float *restrict x, float *restrict y, int64_t rows, int64_t C,
                        const float *restrict scale, const float *restrict shift, int relu)
{
    if (relu) hm_bn_apply_loop(x, y, rows, C, scale, shift, 1);
    else hm_bn_apply_loop(x, y, rows, C, scale, shift, 0);
}

/* The per-channel sums of BN backward, added into sum_dy and sum_dyxh: sum(g) and
 * sum(g * xhat), with g = dy through the fused ReLU's mask. `part`: 2*C zeroed floats. */
HM_ALWAYS_INLINE void hm_bn_grad_sums_loop(const float *restrict dy, const float *restrict x,
                                           const float *restrict y, int64_t rows, int64_t C,
                                           const float *restrict mean, const float *restrict inv_std,
                                           int relu, double *restrict sum_dy,
                                           double *restrict sum_dyxh, float *restrict part)
{
    float *part_dy = part, *part_dyxh = part + C;
    for (int64_t r0 = 0; r0 < rows; r0 += HM_BLOCK_ROWS) {
        for (int64_t r = r0; r < hm_block_end(r0, rows); ++r)
            for (int64_t c = 0; c < C; ++c) {
                int64_t i = r * C + c;
                float g = rm_relu_grad(dy[i], relu ? y[i] : 1.0f, relu);
                part_dy[c] += g;
                part_dyxh[c] += g * ((x[i] - mean[c]) * inv_std[c]);
            }
        hm_flush_partials(part, C, sum_dy, sum_dyxh);
    }
}

/* Returns -1 if scratch allocation fails. */
static int hm_bn_grad_sums(const float *restrict dy, const float *restrict x, const float *restrict y,
                           int64_t rows, int64_t C, const float *restrict mean,
                           const float *restrict inv_std, int relu,
                           double *restrict sum_dy, double *restrict sum_dyxh)
{
    float *part = (float *)calloc((size_t)(2 * C), sizeof(float));
    if (!part) return -1;
    if (relu) hm_bn_grad_sums_loop(dy, x, y, rows, C, mean, inv_std, 1, sum_dy, sum_dyxh, part);
    else hm_bn_grad_sums_loop(dy, x, y, rows, C, mean, inv_std, 0, sum_dy, sum_dyxh, part);
    free(part);
    return 0;
}

/* dx of training-mode BN from the per-channel means of g and g*xhat. dx may be dy itself
 * (dy is consumed), so those two are not restrict: each element is read before written. */
HM_ALWAYS_INLINE void hm_bn_dx_loop(const float *dy, const float *restrict x, const float *restrict y,
                                    int64_t rows, int64_t C, const float *restrict gamma,
                                    const float *restrict mean, const float *restrict inv_std, int relu,
                                    const float *restrict mean_dy, const float *restrict mean_dyxh,
                                    float *dx)
{
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < C; ++c) {
            int64_t i = r * C + c;
            dx[i] = rm_bn_dx(rm_relu_grad(dy[i], relu ? y[i] : 1.0f, relu), x[i], mean[c], inv_std[c],
                             gamma[c], mean_dy[c], mean_dyxh[c]);
        }
}

static void hm_bn_dx(const float *dy, const float *restrict x, const float *restrict y,
                     int64_t rows, int64_t C, const float *restrict gamma,
                     const float *restrict mean, const float *restrict inv_std, int relu,
                     const float *restrict mean_dy, const float *restrict mean_dyxh, float *dx)
{
    if (relu) hm_bn_dx_loop(dy, x, y, rows, C, gamma, mean, inv_std, 1, mean_dy, mean_dyxh, dx);
    else hm_bn_dx_loop(dy, x, y, rows, C, gamma, mean, inv_std, 0, mean_dy, mean_dyxh, dx);
}

/* The end of a residual block, in place: y = relu(y + s). NaN stays NaN (it must reach
 * the loss, where the training loop stops on it). */
static void hm_add_relu(float *restrict y, const float *restrict s, int64_t n)
{
    for (int64_t i = 0; i < n; ++i) {
        float v = y[i] + s[i];
        y[i] = v < 0.0f ? 0.0f : v;
    }
}

/* Its gradient, in place over dy: dy * (y > 0), as a product so that a non-finite dy
 * stays non-finite. (Written as dy *= (float)(y > 0), GCC emits a loop 8x slower.) */
static void hm_relu_grad(float *restrict dy, const float *restrict y, int64_t n)
{
    for (int64_t i = 0; i < n; ++i) {
        float keep = y[i] > 0.0f ? 1.0f : 0.0f;
        dy[i] = dy[i] * keep;
    }
}

/* Max pool over NHWC x (n, h, w, C), window k, stride s, padding p that never wins (each
 * window must hold an input element: p < k, output sizes from the window; the caller
 * checks). One window scan serves both directions: per channel, the window's max into
 * best and its first position in (kh, kw) order, kh*k + kw, into arg (PyTorch's tie
 * rule; int32 like the floats, so the selects vectorize together). A NaN in a window is
 * its max, as with numpy.maximum. */
HM_ALWAYS_INLINE void hm_pool_window(const float *restrict x, int64_t img, int64_t oh, int64_t ow,
                                     int64_t h, int64_t w, int64_t C, int64_t k, int64_t s,
                                     int64_t p, float *restrict best, int32_t *restrict arg)
{
    /* the window's rows and columns inside x: [kh0, kh1) x [kw0, kw1), never empty */
    int64_t kh0 = p - oh * s > 0 ? p - oh * s : 0, kh1 = h + p - oh * s < k ? h + p - oh * s : k;
    int64_t kw0 = p - ow * s > 0 ? p - ow * s : 0, kw1 = w + p - ow * s < k ? w + p - ow * s : k;
    int64_t corner = ((img * h + oh * s - p) * w + ow * s - p) * C;   /* may lie before x */
    for (int64_t c = 0; c < C; ++c) {
        best[c] = x[corner + (kh0 * w + kw0) * C + c];
        arg[c] = (int32_t)(kh0 * k + kw0);
    }
    for (int64_t kh = kh0; kh < kh1; ++kh)
        for (int64_t kw = kw0; kw < kw1; ++kw) {
            const float *restrict xi = x + corner + (kh * w + kw) * C;
            int32_t pos = (int32_t)(kh * k + kw);
            for (int64_t c = 0; c < C; ++c) {
                float v = xi[c], m = best[c];
                int take = m == m && !(v <= m);
                best[c] = take ? v : m;
                arg[c] = take ? pos : arg[c];
            }
        }
}

/* y (n, ho, wo, C) = the max of each window. `arg` is scratch for C elements. */
static void hm_maxpool_forward(const float *restrict x, float *restrict y, int64_t n, int64_t h,
                               int64_t w, int64_t C, int64_t k, int64_t s, int64_t p,
                               int64_t ho, int64_t wo, int32_t *restrict arg)
{
    for (int64_t img = 0; img < n; ++img)
        for (int64_t oh = 0; oh < ho; ++oh)
            for (int64_t ow = 0; ow < wo; ++ow)
                hm_pool_window(x, img, oh, ow, h, w, C, k, s, p,
                               y + ((img * ho + oh) * wo + ow) * C, arg);
}

/* Its gradient: dx (zeroed here) receives each dy at its window's arg. `arg` and `best`
 * are scratch for C elements. */
static void hm_maxpool_backward(const float *restrict x, const float *restrict dy, float *restrict dx,
                                int64_t n, int64_t h, int64_t w, int64_t C, int64_t k, int64_t s,
                                int64_t p, int64_t ho, int64_t wo, int32_t *restrict arg,
                                float *restrict best)
{
    memset(dx, 0, (size_t)(n * h * w * C) * sizeof(float));
    for (int64_t img = 0; img < n; ++img)
        for (int64_t oh = 0; oh < ho; ++oh)
            for (int64_t ow = 0; ow < wo; ++ow) {
                hm_pool_window(x, img, oh, ow, h, w, C, k, s, p, best, arg);
                const float *restrict g = dy + ((img * ho + oh) * wo + ow) * C;
                int64_t corner = ((img * h + oh * s - p) * w + ow * s - p) * C;
                for (int64_t c = 0; c < C; ++c)
                    dx[corner + (arg[c] / k * w + arg[c] % k) * C + c] += g[c];
            }
}

/* im2col on NHWC x (n, h, w, C) -> col (n, ho, wo, k, k, C), zeros where the window
 * hangs over the border, without a padded copy of x: a window row whose k positions all
 * lie inside x is one memcpy of k*C floats (they are adjacent in NHWC). */
static void hm_im2col(const float *restrict x, float *restrict col, int64_t n, int64_t h, int64_t w,
                      int64_t C, int64_t k, int64_t s, int64_t p, int64_t ho, int64_t wo)
{
    size_t run = (size_t)C * sizeof(float);
    for (int64_t img = 0; img < n; ++img)
        for (int64_t oh = 0; oh < ho; ++oh)
            for (int64_t ow = 0; ow < wo; ++ow) {
                float *restrict out = col + ((img * ho + oh) * wo + ow) * k * k * C;
                int64_t iw0 = ow * s - p;
                int inside_w = iw0 >= 0 && iw0 + k <= w;
                for (int64_t kh = 0; kh < k; ++kh, out += k * C) {
                    int64_t ih = oh * s - p + kh;
                    if (ih < 0 || ih >= h) {
                        memset(out, 0, (size_t)k * run);
                        continue;
                    }
                    const float *row = x + ((img * h + ih) * w) * C;
                    if (inside_w) {
                        memcpy(out, row + iw0 * C, (size_t)k * run);
                        continue;
                    }
                    for (int64_t kw = 0; kw < k; ++kw) {
                        int64_t iw = iw0 + kw;
                        if (iw < 0 || iw >= w) memset(out + kw * C, 0, run);
                        else memcpy(out + kw * C, row + iw * C, run);
                    }
                }
            }
}

#endif /* HOSTMATH_LOOPS_H */
