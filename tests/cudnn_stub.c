/* A stand-in libcudnn.so.9 for tests/test_cudnn_binding.py: the functions engine.cudnn looks
 * up, on HOST memory, so that the GPU-only wrappers (handles, algorithm searches, workspace
 * sizes, the three convolutions) can be run without a GPU. The convolutions compute the real
 * NHWC cross-correlation with KRSC filters from the descriptors they are given, so a
 * wrapper that passes an argument in the wrong place gives a wrong result: float32 data,
 * or bfloat16 data with float32 sums rounded once to nearest even at the end (cuDNN's
 * PSEUDO_BFLOAT16 configuration; stub_float32_only(1) refuses it, as an older library
 * would). Every call is also written to a log (stub_log) with its pointers, algorithm,
 * workspace and alpha/beta.
 * An algorithm of 99 sleeps 300 ms first: the test checks that Python threads run meanwhile.
 * Built by the test with `cc -shared -fPIC`; never part of the engine.
 */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct { int dtype, n, c, h, w; } Tensor;
typedef struct { int dtype, format, k, c, h, w; } Filter;
typedef struct { int ph, pw, u, v, dh, dw, mode, compute, math; } Conv;
typedef struct { void *stream; } Handle;
typedef struct { int algo, status; float time; size_t memory; int determinism, mathType, reserved[3]; } Perf;

static char log_buf[1 << 16];
static size_t log_len;
static char last_error[256];

static void say(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(log_buf + log_len, sizeof(log_buf) - log_len, fmt, ap);
    va_end(ap);
    if (n > 0 && log_len + n < sizeof(log_buf)) log_len += n;
}

const char *stub_log(void) { return log_buf; }
void stub_clear(void) { log_len = 0; log_buf[0] = 0; }

static int fail(int status, const char *msg) { snprintf(last_error, sizeof(last_error), "%s", msg); return status; }

enum { DATA_FLOAT = 0, DATA_BFLOAT16 = 9 };
static int float32_only;
void stub_float32_only(int on) { float32_only = on; }

size_t cudnnGetVersion(void) { return 90100; }
size_t cudnnGetCudartVersion(void) { return 12040; }
const char *cudnnGetErrorString(int s) {
    return s == 0 ? "CUDNN_STATUS_SUCCESS" : s == 2000 ? "CUDNN_STATUS_BAD_PARAM"
         : s == 3003 ? "CUDNN_STATUS_NOT_SUPPORTED_DATA_TYPE" : "CUDNN_STATUS_UNKNOWN";
}
void cudnnGetLastErrorString(char *message, size_t max_size) {
    snprintf(message, max_size, "%s", last_error);
    last_error[0] = 0;
}

int cudnnCreate(Handle **h) { *h = calloc(1, sizeof(Handle)); say("cudnnCreate %p\n", (void *)*h); return 0; }
int cudnnDestroy(Handle *h) { say("cudnnDestroy %p\n", (void *)h); free(h); return 0; }
int cudnnSetStream(Handle *h, void *s) { h->stream = s; say("cudnnSetStream %p %p\n", (void *)h, s); return 0; }
int cudnnGetStream(Handle *h, void **s) { *s = h->stream; return 0; }

int cudnnCreateTensorDescriptor(Tensor **d) { *d = calloc(1, sizeof(Tensor)); return 0; }
int cudnnDestroyTensorDescriptor(Tensor *d) { free(d); return 0; }
int cudnnSetTensor4dDescriptor(Tensor *d, int format, int dtype, int n, int c, int h, int w) {
    if (format != 1) return fail(2000, "stub: NHWC only");
    if (n <= 0 || c <= 0 || h <= 0 || w <= 0) return fail(2000, "stub: non-positive dimension");
    d->dtype = dtype; d->n = n; d->c = c; d->h = h; d->w = w;
    return 0;
}
int cudnnGetTensor4dDescriptor(Tensor *d, int *dtype, int *n, int *c, int *h, int *w,
                               int *sn, int *sc, int *sh, int *sw) {
    *dtype = d->dtype; *n = d->n; *c = d->c; *h = d->h; *w = d->w;
    *sc = 1; *sw = d->c; *sh = d->w * d->c; *sn = d->h * d->w * d->c;
    return 0;
}
int cudnnCreateFilterDescriptor(Filter **d) { *d = calloc(1, sizeof(Filter)); return 0; }
int cudnnDestroyFilterDescriptor(Filter *d) { free(d); return 0; }
int cudnnSetFilter4dDescriptor(Filter *d, int dtype, int format, int k, int c, int h, int w) {
    d->dtype = dtype; d->format = format; d->k = k; d->c = c; d->h = h; d->w = w;
    return 0;
}
int cudnnGetFilter4dDescriptor(Filter *d, int *dtype, int *format, int *k, int *c, int *h, int *w) {
    *dtype = d->dtype; *format = d->format; *k = d->k; *c = d->c; *h = d->h; *w = d->w;
    return 0;
}
int cudnnCreateConvolutionDescriptor(Conv **d) { *d = calloc(1, sizeof(Conv)); return 0; }
int cudnnDestroyConvolutionDescriptor(Conv *d) { free(d); return 0; }
int cudnnSetConvolution2dDescriptor(Conv *d, int ph, int pw, int u, int v, int dh, int dw, int mode, int compute) {
    if (ph < 0 || pw < 0 || u <= 0 || v <= 0 || dh <= 0 || dw <= 0) return fail(2000, "stub: bad conv");
    d->ph = ph; d->pw = pw; d->u = u; d->v = v; d->dh = dh; d->dw = dw; d->mode = mode; d->compute = compute;
    return 0;
}
int cudnnGetConvolution2dDescriptor(Conv *d, int *ph, int *pw, int *u, int *v, int *dh, int *dw, int *mode,
                                    int *compute) {
    *ph = d->ph; *pw = d->pw; *u = d->u; *v = d->v; *dh = d->dh; *dw = d->dw; *mode = d->mode; *compute = d->compute;
    return 0;
}
int cudnnSetConvolutionMathType(Conv *d, int math) { d->math = math; return 0; }
int cudnnGetConvolutionMathType(Conv *d, int *math) { *math = d->math; return 0; }

static int out_dim(int in, int k, int pad, int stride, int dil) { return (in + 2 * pad - ((k - 1) * dil + 1)) / stride + 1; }

int cudnnGetConvolution2dForwardOutputDim(Conv *cd, Tensor *x, Filter *w, int *n, int *c, int *h, int *wo) {
    if (x->c != w->c) return fail(2000, "stub: channel mismatch");
    *n = x->n; *c = w->k;
    *h = out_dim(x->h, w->h, cd->ph, cd->u, cd->dh);
    *wo = out_dim(x->w, w->w, cd->pw, cd->v, cd->dw);
    return 0;
}

static void pause_if(int algo) {
    if (algo == 99) { struct timespec t = {0, 300000000}; nanosleep(&t, NULL); }
}

static int check(Conv *cd, Tensor *x, Filter *w, Tensor *y) {
    int n, c, h, wo;
    if (x->dtype != w->dtype || x->dtype != y->dtype) return fail(3003, "stub: mixed data types");
    if (x->dtype != DATA_FLOAT && (x->dtype != DATA_BFLOAT16 || float32_only))
        return fail(3003, float32_only ? "stub: float32 only" : "stub: float32 or bfloat16 only");
    if (w->format != 1) return fail(2000, "stub: KRSC filters only");
    if (cudnnGetConvolution2dForwardOutputDim(cd, x, w, &n, &c, &h, &wo)) return 2000;
    if (y->n != n || y->c != c || y->h != h || y->w != wo) return fail(2000, "stub: output shape mismatch");
    return 0;
}

/* The one loop nest of all three directions: for each (n, oh, ow, k) and tap (r, s, c) with
 * an input inside the image, mode 0: y += x*w, 1: dx += dy*w, 2: dw += x*dy. */
static void loops(int mode, Conv *cd, Tensor *x, Filter *w, float *X, float *W, float *Y) {
    int ho = out_dim(x->h, w->h, cd->ph, cd->u, cd->dh), wo = out_dim(x->w, w->w, cd->pw, cd->v, cd->dw);
    for (int n = 0; n < x->n; n++)
        for (int oh = 0; oh < ho; oh++)
            for (int ow = 0; ow < wo; ow++)
                for (int k = 0; k < w->k; k++) {
                    float *yv = &Y[((n * ho + oh) * wo + ow) * w->k + k];
                    for (int r = 0; r < w->h; r++) {
                        int ih = oh * cd->u - cd->ph + r * cd->dh;
                        if (ih < 0 || ih >= x->h) continue;
                        for (int s = 0; s < w->w; s++) {
                            int iw = ow * cd->v - cd->pw + s * cd->dw;
                            if (iw < 0 || iw >= x->w) continue;
                            for (int c = 0; c < x->c; c++) {
                                float *xv = &X[((n * x->h + ih) * x->w + iw) * x->c + c];
                                float *wv = &W[((k * w->h + r) * w->w + s) * w->c + c];
                                if (mode == 0) *yv += *xv * *wv;
                                else if (mode == 1) *xv += *yv * *wv;
                                else *wv += *xv * *yv;
                            }
                        }
                    }
                }
}

static float bf16_to_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint16_t float_to_bf16(float f) {      /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* count values of data (float32 or bfloat16) as a new float32 array; NULL data: zeros. */
static float *widen(const void *data, int dtype, size_t count) {
    float *out = calloc(count, sizeof(float));
    for (size_t i = 0; data && i < count; i++)
        out[i] = dtype == DATA_FLOAT ? ((const float *)data)[i] : bf16_to_float(((const uint16_t *)data)[i]);
    return out;
}

/* out = alpha * acc + beta * out, in out's data type (one rounding for bfloat16). */
static void blend(void *out, int dtype, const float *acc, size_t count, float alpha, float beta) {
    for (size_t i = 0; i < count; i++) {
        float old = beta == 0.0f ? 0.0f
                  : dtype == DATA_FLOAT ? ((float *)out)[i] : bf16_to_float(((uint16_t *)out)[i]);
        float v = alpha * acc[i] + (beta == 0.0f ? 0.0f : beta * old);
        if (dtype == DATA_FLOAT) ((float *)out)[i] = v;
        else ((uint16_t *)out)[i] = float_to_bf16(v);
    }
}

static size_t tcount(Tensor *t) { return (size_t)t->n * t->h * t->w * t->c; }
static size_t fcount(Filter *f) { return (size_t)f->k * f->h * f->w * f->c; }

int cudnnConvolutionForward(Handle *hd, const float *alpha, Tensor *xd, const void *x, Filter *wd, const void *w,
                            Conv *cd, int algo, void *ws, size_t wsb, const float *beta, Tensor *yd, void *y) {
    int st = check(cd, xd, wd, yd);
    say("cudnnConvolutionForward handle=%p x=%p w=%p y=%p algo=%d ws=%p wsb=%zu alpha=%g beta=%g math=%d\n",
        (void *)hd, x, w, y, algo, ws, wsb, *alpha, *beta, cd->math);
    if (st) return st;
    pause_if(algo);
    float *X = widen(x, xd->dtype, tcount(xd)), *W = widen(w, wd->dtype, fcount(wd)), *acc = widen(NULL, 0, tcount(yd));
    loops(0, cd, xd, wd, X, W, acc);
    blend(y, yd->dtype, acc, tcount(yd), *alpha, *beta);
    free(X); free(W); free(acc);
    return 0;
}

int cudnnConvolutionBackwardData(Handle *hd, const float *alpha, Filter *wd, const void *w, Tensor *dyd,
                                 const void *dy, Conv *cd, int algo, void *ws, size_t wsb, const float *beta,
                                 Tensor *dxd, void *dx) {
    int st = check(cd, dxd, wd, dyd);
    say("cudnnConvolutionBackwardData handle=%p w=%p dy=%p dx=%p algo=%d ws=%p wsb=%zu alpha=%g beta=%g\n",
        (void *)hd, w, dy, dx, algo, ws, wsb, *alpha, *beta);
    if (st) return st;
    float *W = widen(w, wd->dtype, fcount(wd)), *DY = widen(dy, dyd->dtype, tcount(dyd)), *acc = widen(NULL, 0, tcount(dxd));
    loops(1, cd, dxd, wd, acc, W, DY);
    blend(dx, dxd->dtype, acc, tcount(dxd), *alpha, *beta);
    free(W); free(DY); free(acc);
    return 0;
}

int cudnnConvolutionBackwardFilter(Handle *hd, const float *alpha, Tensor *xd, const void *x, Tensor *dyd,
                                   const void *dy, Conv *cd, int algo, void *ws, size_t wsb, const float *beta,
                                   Filter *dwd, void *dw) {
    int st = check(cd, xd, dwd, dyd);
    say("cudnnConvolutionBackwardFilter handle=%p x=%p dy=%p dw=%p algo=%d ws=%p wsb=%zu alpha=%g beta=%g\n",
        (void *)hd, x, dy, dw, algo, ws, wsb, *alpha, *beta);
    if (st) return st;
    float *X = widen(x, xd->dtype, tcount(xd)), *DY = widen(dy, dyd->dtype, tcount(dyd)), *acc = widen(NULL, 0, fcount(dwd));
    loops(2, cd, xd, dwd, X, acc, DY);
    blend(dw, dwd->dtype, acc, fcount(dwd), *alpha, *beta);
    free(X); free(DY); free(acc);
    return 0;
}

/* Searches: `requested` results at most, algorithm i with workspace 1000*i bytes, the ones
 * that do not fit the given workspace marked CUDNN_STATUS_NOT_SUPPORTED (3000). */
static int perfs(const char *what, Handle *hd, int requested, int *returned, Perf *perf, void *ws, size_t wsb,
                 int count) {
    say("%s handle=%p requested=%d ws=%p wsb=%zu\n", what, (void *)hd, requested, ws, wsb);
    int n = requested < count ? requested : count;
    for (int i = 0; i < n; i++) {
        memset(&perf[i], 0, sizeof(Perf));
        perf[i].algo = n - 1 - i;
        perf[i].memory = 1000 * (size_t)perf[i].algo;
        perf[i].status = perf[i].memory <= wsb ? 0 : 3000;
        perf[i].time = 0.5f * (i + 1);
        perf[i].determinism = perf[i].algo % 2;
        perf[i].mathType = 1;
    }
    *returned = n;
    return 0;
}

int cudnnFindConvolutionForwardAlgorithmEx(Handle *hd, Tensor *xd, const void *x, Filter *wd, const void *w,
                                           Conv *cd, Tensor *yd, void *y, int requested, int *returned,
                                           Perf *perf, void *ws, size_t wsb) {
    int st = check(cd, xd, wd, yd);
    if (st) return st;
    say("  x=%p w=%p y=%p\n", x, w, y);
    return perfs("cudnnFindConvolutionForwardAlgorithmEx", hd, requested, returned, perf, ws, wsb, 8);
}
int cudnnFindConvolutionBackwardDataAlgorithmEx(Handle *hd, Filter *wd, const void *w, Tensor *dyd, const void *dy,
                                                Conv *cd, Tensor *dxd, void *dx, int requested, int *returned,
                                                Perf *perf, void *ws, size_t wsb) {
    int st = check(cd, dxd, wd, dyd);
    if (st) return st;
    say("  w=%p dy=%p dx=%p\n", w, dy, dx);
    return perfs("cudnnFindConvolutionBackwardDataAlgorithmEx", hd, requested, returned, perf, ws, wsb, 6);
}
int cudnnFindConvolutionBackwardFilterAlgorithmEx(Handle *hd, Tensor *xd, const void *x, Tensor *dyd,
                                                  const void *dy, Conv *cd, Filter *dwd, void *dw, int requested,
                                                  int *returned, Perf *perf, void *ws, size_t wsb) {
    int st = check(cd, xd, dwd, dyd);
    if (st) return st;
    say("  x=%p dy=%p dw=%p\n", x, dy, dw);
    return perfs("cudnnFindConvolutionBackwardFilterAlgorithmEx", hd, requested, returned, perf, ws, wsb, 7);
}
int cudnnGetConvolutionForwardAlgorithm_v7(Handle *hd, Tensor *xd, Filter *wd, Conv *cd, Tensor *yd,
                                           int requested, int *returned, Perf *perf) {
    int st = check(cd, xd, wd, yd);
    return st ? st : perfs("cudnnGetConvolutionForwardAlgorithm_v7", hd, requested, returned, perf, NULL, 1 << 30, 8);
}
int cudnnGetConvolutionBackwardDataAlgorithm_v7(Handle *hd, Filter *wd, Tensor *dyd, Conv *cd, Tensor *dxd,
                                                int requested, int *returned, Perf *perf) {
    int st = check(cd, dxd, wd, dyd);
    return st ? st : perfs("cudnnGetConvolutionBackwardDataAlgorithm_v7", hd, requested, returned, perf, NULL, 1 << 30, 6);
}
int cudnnGetConvolutionBackwardFilterAlgorithm_v7(Handle *hd, Tensor *xd, Tensor *dyd, Conv *cd, Filter *dwd,
                                                  int requested, int *returned, Perf *perf) {
    int st = check(cd, xd, dwd, dyd);
    return st ? st : perfs("cudnnGetConvolutionBackwardFilterAlgorithm_v7", hd, requested, returned, perf, NULL, 1 << 30, 7);
}

/* Workspace: 1000 * algo + the direction (0, 1, 2), so a swapped call shows. */
int cudnnGetConvolutionForwardWorkspaceSize(Handle *hd, Tensor *xd, Filter *wd, Conv *cd, Tensor *yd, int algo,
                                            size_t *bytes) {
    int st = check(cd, xd, wd, yd);
    *bytes = 1000 * (size_t)algo;
    return st;
}
int cudnnGetConvolutionBackwardDataWorkspaceSize(Handle *hd, Filter *wd, Tensor *dyd, Conv *cd, Tensor *dxd,
                                                 int algo, size_t *bytes) {
    int st = check(cd, dxd, wd, dyd);
    *bytes = 1000 * (size_t)algo + 1;
    return st;
}
int cudnnGetConvolutionBackwardFilterWorkspaceSize(Handle *hd, Tensor *xd, Tensor *dyd, Conv *cd, Filter *dwd,
                                                   int algo, size_t *bytes) {
    int st = check(cd, xd, dwd, dyd);
    *bytes = 1000 * (size_t)algo + 2;
    return st;
}
