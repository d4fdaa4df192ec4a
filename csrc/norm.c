/* norm.c: RMSNorm with the fused residual add, and LayerNorm (SPEC 1), rows of (T, d).
 *
 *   rms:   r = x + residual (float32, stored: it is the residual stream);
 *          out = r * rsqrt(mean(r^2) + eps) * w
 *   layer: r = x + residual;  out = (r - mean) * rsqrt(var + eps) * w + bias, biased var
 *
 * Statistics are accumulated in double: a row is at most a few thousand elements, the loops
 * are memory-bound, and double sums make the result independent of row length and magnitude
 * (rows of 1e4 or 1e-4 lose nothing). LayerNorm is two-pass (mean, then sum of squared
 * deviations), so rows with a large mean and a small spread keep their precision; it also
 * forms x + residual and centres in double, since its r is never stored.
 * The reductions use `omp simd reduction`, which licenses the reassociation that plain C
 * forbids, so they vectorise without -ffast-math. Each row kernel is compiled for AVX-512 and
 * for the baseline ISA and picked at run time. Reference: blackmamba/ref.py rms_norm,
 * layer_norm.
 */
#include "bm.h"

#include <math.h>

/* Below this many elements (T * d) threads cost more than they save (decode: T = batch). */
#define NORM_PAR_MIN 65536

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define INLINE static inline __attribute__((always_inline))

typedef struct {
    const float *x;        /* (T, d) */
    const float *residual; /* (T, d) or NULL */
    const float *w;        /* (d) */
    const float *bias;     /* (d) or NULL (layer norm only) */
    float *out;            /* (T, d) */
    float *res_out;        /* (T, d) (rms norm only; may alias x or residual) */
    double eps;
    int64_t d;
} norm_args;

/* One row of RMSNorm. res_out may alias x or residual: each element is read before it is
 * written, at the same index. res_out NULL: r is formed in out, then scaled in place. */
INLINE void rms_row_body(const norm_args *a, int64_t t) {
    const int64_t d = a->d;
    const float *x = a->x + t * d;
    const float *rs = a->residual ? a->residual + t * d : NULL;
    float *o = a->out + t * d;
    float *r = a->res_out ? a->res_out + t * d : o;             /* (d) r kept in out if no res_out */
    const float *w = a->w;
    double ss = 0.0;
    if (rs) {
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < d; i++) {
            float v = x[i] + rs[i];
            r[i] = v;
            ss += (double)v * (double)v;
        }
    } else {
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < d; i++) {
            float v = x[i];
            r[i] = v;
            ss += (double)v * (double)v;
        }
    }
    /* rounding the scale to float costs 0.5 ulp; the two products another ulp */
    const float inv = (float)(1.0 / sqrt(ss / (double)d + a->eps));
#pragma omp simd
    for (int64_t i = 0; i < d; i++) o[i] = r[i] * inv * w[i];
}

/* One row of LayerNorm; `HAS_RES` and `HAS_BIAS` are compile-time constants in the callers. */
INLINE void ln_row(const norm_args *a, int64_t t, const int HAS_RES, const int HAS_BIAS) {
    const int64_t d = a->d;
    const float *x = a->x + t * d;
    const float *rs = HAS_RES ? a->residual + t * d : NULL;
    float *o = a->out + t * d;
    const float *w = a->w, *bias = a->bias;
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < d; i++) s += HAS_RES ? (double)x[i] + (double)rs[i] : (double)x[i];
    const double mu = s / (double)d;
    double ss = 0.0;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < d; i++) {
        double c = (HAS_RES ? (double)x[i] + (double)rs[i] : (double)x[i]) - mu;
        ss += c * c;
    }
    const double rstd = 1.0 / sqrt(ss / (double)d + a->eps);
    /* out in double, one rounding at the end: x may be o (in-place), read before written */
#pragma omp simd
    for (int64_t i = 0; i < d; i++) {
        double c = (HAS_RES ? (double)x[i] + (double)rs[i] : (double)x[i]) - mu;
        double v = c * rstd * (double)w[i];
        o[i] = (float)(HAS_BIAS ? v + (double)bias[i] : v);
    }
}

INLINE void ln_row_body(const norm_args *a, int64_t t) {
    if (a->residual) {
        if (a->bias) ln_row(a, t, 1, 1);
        else ln_row(a, t, 1, 0);
    } else {
        if (a->bias) ln_row(a, t, 0, 1);
        else ln_row(a, t, 0, 0);
    }
}

typedef void (*row_fn)(const norm_args *, int64_t);

static void rms_row_base(const norm_args *a, int64_t t) { rms_row_body(a, t); }
static void ln_row_base(const norm_args *a, int64_t t) { ln_row_body(a, t); }
#if defined(__x86_64__) && defined(__GNUC__)
AVX512_TARGET static void rms_row_avx512(const norm_args *a, int64_t t) { rms_row_body(a, t); }
AVX512_TARGET static void ln_row_avx512(const norm_args *a, int64_t t) { ln_row_body(a, t); }
#define PICK(base, avx) (bm_cpu_has_avx512() ? (avx) : (base))
#else
#define PICK(base, avx) (base)
#endif

static void run_rows(row_fn fn, const norm_args *a, int64_t T) {
#pragma omp parallel for num_threads(bm_get_num_threads()) schedule(static) \
    if (T * a->d >= NORM_PAR_MIN && T > 1)
    for (int64_t t = 0; t < T; t++) fn(a, t);
}

bm_status bm_rms_norm(const float *x, const float *residual, const float *w, float eps,
                      float *out, float *res_out, int64_t T, int64_t d) {
    if (T < 0 || d < 0) return BM_ERR_ARG;
    if (T == 0 || d == 0) return BM_OK;
    norm_args a = {x, residual, w, NULL, out, res_out, (double)eps, d};
    run_rows(PICK(rms_row_base, rms_row_avx512), &a, T);
    return BM_OK;
}

bm_status bm_layer_norm(const float *x, const float *residual, const float *w,
                        const float *bias, float eps, float *out, int64_t T, int64_t d) {
    if (T < 0 || d < 0) return BM_ERR_ARG;
    if (T == 0 || d == 0) return BM_OK;
    norm_args a = {x, residual, w, bias, out, NULL, (double)eps, d};
    run_rows(PICK(ln_row_base, ln_row_avx512), &a, T);
    return BM_OK;
}
