/* conv.c: causal depthwise conv1d over time with optional SiLU (SPEC 2), prefill and decode.
 *
 *   y[b,t,e] = act(bias[e] + sum_{k<K} w[e,k] * xp[b, t+k, e]),  xp = concat(conv_in, x) in time
 *
 * xp has K-1+L rows per batch: the K-1 carried inputs (zeros without a state), then x.
 * Reference: blackmamba/ref.py causal_conv1d / causal_conv1d_update.
 *
 * Layout: channels are contiguous (token-major), so each output row is an axpy-like sweep over
 * E with K input rows; we vectorise over E. w is (E, K), strided along E, so it is transposed
 * once per call to (K, E). Work items are (batch, block of rows) and sweep whole rows, so x
 * and y are read and written in address order; the K-1 rows a row reuses stay in L1/L2.
 * (Tiling E so that the K rows stay in L1 measured no faster: the sweep is bound by memory
 * traffic, and SiLU by arithmetic.) The sweep is written once (conv_item_body) and compiled
 * three times, for AVX-512, AVX2+FMA and the baseline ISA, picked at run time in that order.
 * -std=c11 keeps FMA contraction off, so all three give the same bits.
 */
#include "bm.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define CONV_ROWS 32    /* time steps per work item */
#define CONV_KMAX 8
/* Below this many multiply-adds a parallel region costs more than it saves (decode steps). */
#define CONV_PAR_MIN (1 << 18)

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define INLINE static inline __attribute__((always_inline))

/* Below this, exp(x) < 2^-126 = FLT_MIN: denormal, flushed to 0 by the callers. */
#define EXP_MIN_ARG -87.33f

/* exp(x) for x <= 0 (Cephes expf: range reduction by ln 2, degree-5 polynomial, ~1 ulp).
 * Branch-free and libm-free so that loops calling it vectorise. Inputs below EXP_MIN_ARG and
 * NaN give garbage here (2^n would leave the normal range): the caller masks them. */
INLINE float exp_nonpos(float x) {
    float t = x >= EXP_MIN_ARG ? x : EXP_MIN_ARG;               /* NaN -> EXP_MIN_ARG too */
    /* n = round(t / ln2) with the 1.5 * 2^23 trick (exact for |v| < 2^22, no libm call) */
    float fn = (t * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = t - fn * 0.693359375f;                            /* ln2 split in two parts */
    r = r - fn * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    int32_t n = (int32_t)fn;                                    /* in [-126, 0] */
    uint32_t bits = (uint32_t)(n + 127) << 23;                  /* 2^n as a float */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* SiLU(v) = v * sigmoid(v), through exp(-|v|) so nothing overflows; NaN stays NaN (v * ...),
 * v < EXP_MIN_ARG gives -0 instead of a value below 1.1e-36. */
INLINE float silu_f(float v) {
    float a = -fabsf(v);
    float e = exp_nonpos(a);
    e = a < EXP_MIN_ARG ? 0.0f : e;
    float num = v >= 0.0f ? v : v * e;
    return num / (1.0f + e);
}

/* One output row, the width K and the activation known at compile time (the tap sum unrolls,
 * acc stays in a register, SiLU is applied before the store). rows[k]: input row for tap k;
 * wt (K, E) transposed weights; bias (E), zeros when there is none. Summation order matches
 * ref.py: taps in order, then the bias. */
INLINE void conv_row(const float *const *rows, const float *wt, const float *bias, float *y,
                     int64_t E, const int K, const int SILU) {
    for (int64_t e = 0; e < E; e++) {
        float acc = wt[e] * rows[0][e];
        for (int k = 1; k < K; k++) acc += wt[k * E + e] * rows[k][e];
        acc += bias[e];
        y[e] = SILU ? silu_f(acc) : acc;
    }
}

/* Arguments of one call, shared by all work items. */
typedef struct {
    const float *x;       /* (b, L, E) */
    const float *wt;      /* (K, E) the weights transposed, so every tap is a contiguous row */
    const float *bias;    /* (E) the bias, or zeros */
    const float *zeros;   /* (E) stands for the state rows when there is no conv_in */
    const float *conv_in; /* (b, K-1, E) or NULL */
    float *y;             /* (b, L, E) */
    int silu;
    int64_t L, E, K;
    int64_t n_rblk;       /* row blocks per batch entry */
} conv_args;

/* Work item `item` = (batch bi, block of rows rb); whole rows, so x and y stream in order. */
INLINE void conv_item_body(const conv_args *a, int64_t item) {
    const int64_t L = a->L, E = a->E, K = a->K;
    const int64_t bi = item / a->n_rblk;
    const int64_t t0 = (item % a->n_rblk) * CONV_ROWS;
    const int64_t t1 = L - t0 < CONV_ROWS ? L : t0 + CONV_ROWS;
    const float *xb = a->x + bi * L * E;                                   /* (L, E) */
    const float *sb = a->conv_in ? a->conv_in + bi * (K - 1) * E : NULL;   /* (K-1, E) */
    for (int64_t t = t0; t < t1; t++) {
        const float *rows[CONV_KMAX];
        for (int64_t k = 0; k < K; k++) {
            int64_t p = t + k;                                             /* row of xp */
            if (p >= K - 1) rows[k] = xb + (p - (K - 1)) * E;
            else rows[k] = sb ? sb + p * E : a->zeros;
        }
        float *yr = a->y + (bi * L + t) * E;
#define CONV_CASE(KK)                                                                         \
    case KK:                                                                                  \
        if (a->silu) conv_row(rows, a->wt, a->bias, yr, E, KK, 1);                            \
        else conv_row(rows, a->wt, a->bias, yr, E, KK, 0);                                    \
        break;
        switch (K) {
            CONV_CASE(2) CONV_CASE(3) CONV_CASE(4) CONV_CASE(5) CONV_CASE(6) CONV_CASE(7)
            default: CONV_CASE(8)
        }
#undef CONV_CASE
    }
}

static void conv_item_base(const conv_args *a, int64_t item) { conv_item_body(a, item); }

#if defined(__x86_64__) && defined(__GNUC__)
AVX512_TARGET static void conv_item_avx512(const conv_args *a, int64_t item) {
    conv_item_body(a, item);
}
__attribute__((target("avx2,fma"))) static void conv_item_avx2(const conv_args *a,
                                                               int64_t item) {
    conv_item_body(a, item);
}
#endif

/* conv_out (b, K-1, E) = rows L .. L+K-2 of xp. Row j comes from xp row L+j >= j, so going up
 * in j never reads a row already overwritten when conv_out == conv_in. */
static void conv_write_state(const float *x, const float *conv_in, float *conv_out, int64_t b,
                             int64_t L, int64_t E, int64_t K) {
    const size_t row = sizeof(float) * (size_t)E;
    for (int64_t bi = 0; bi < b; bi++) {
        float *so = conv_out + bi * (K - 1) * E;
        const float *si = conv_in ? conv_in + bi * (K - 1) * E : NULL;
        for (int64_t j = 0; j < K - 1; j++) {
            int64_t p = L + j;
            if (p >= K - 1) memcpy(so + j * E, x + (bi * L + p - (K - 1)) * E, row);
            else if (!si) memset(so + j * E, 0, row);
            else if (si + p * E != so + j * E) memmove(so + j * E, si + p * E, row);
        }
    }
}

bm_status bm_conv_forward(const float *x, const float *w, const float *bias,
                          const float *conv_in, float *conv_out, float *y, int silu, int64_t b,
                          int64_t L, int64_t E, int64_t K) {
    if (K < 2 || K > CONV_KMAX || b < 0 || L < 0 || E < 0) return BM_ERR_ARG;
    if (b == 0 || E == 0) return BM_OK;
    if (L > 0) {
        /* scratch (K+2, E): wt (K, E), then the bias (or zeros), then a zero row */
        float *scratch = malloc(sizeof(float) * (size_t)((K + 2) * E));
        if (!scratch) return BM_ERR_NOMEM;
        float *wt = scratch, *bz = scratch + K * E, *zeros = scratch + (K + 1) * E;
        for (int64_t e = 0; e < E; e++)
            for (int64_t k = 0; k < K; k++) wt[k * E + e] = w[e * K + k];
        if (bias) memcpy(bz, bias, sizeof(float) * (size_t)E);
        else memset(bz, 0, sizeof(float) * (size_t)E);
        memset(zeros, 0, sizeof(float) * (size_t)E);

        conv_args a = {x, wt, bz, zeros, conv_in, y, silu, L, E, K,
                       (L + CONV_ROWS - 1) / CONV_ROWS};
        void (*item_fn)(const conv_args *, int64_t) = conv_item_base;
#if defined(__x86_64__) && defined(__GNUC__)
        if (bm_cpu_has_avx512()) item_fn = conv_item_avx512;
        else if (bm_cpu_has_avx2()) item_fn = conv_item_avx2;
#endif
        const int64_t n_items = b * a.n_rblk;
        /* y is complete before the state is written: conv_out may be conv_in. */
#pragma omp parallel for num_threads(bm_get_num_threads()) schedule(static) \
    if (b * L * E * K >= CONV_PAR_MIN && n_items > 1)
        for (int64_t item = 0; item < n_items; item++) item_fn(&a, item);
        free(scratch);
    }
    if (conv_out) conv_write_state(x, conv_in, conv_out, b, L, E, K);
    return BM_OK;
}

/* One token is the forward pass with L = 1 and the state as both conv_in and conv_out, so
 * stepping and prefilling share one arithmetic path (same rounding, bit for bit). */
bm_status bm_conv_step(const float *x, float *conv_state, const float *w, const float *bias,
                       float *y, int silu, int64_t b, int64_t E, int64_t K) {
    return bm_conv_forward(x, w, bias, conv_state, conv_state, y, silu, b, 1, E, K);
}
