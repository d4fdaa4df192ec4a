/* moe.c: top-1 routing, dispatch and the expert MLPs of a MoE layer (SPEC 3), and the dense
 * gated MLP of "1" layers.
 *
 * Dimension letters (bm.h): T tokens, d hidden size, X experts, F ffn hidden size.
 * All matrix products go through bm_linear (gemm.c), so float32 and bf16 weights share one
 * path here. The expert path is: counting sort of the tokens by expert (bm_moe_dispatch),
 * then per expert gather its rows into a contiguous block, two GEMMs with the activation
 * between them, and scatter the gate-scaled result back to the token order.
 */
#include "bm.h"
#include "act.h" /* gelu_f, gelu_tanh_f, silu_f: vectorisable activations */

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Rows of one expert (or of the dense MLP) handled per GEMM pair. Bounds the scratch at
 * ROWS * (d + 3F) floats whatever T is (at T = 2048, F = 3072 an unbounded buffer would be
 * 75 MB), while keeping the GEMMs tall enough that BLAS runs near peak. */
#define BM_MLP_ROWS 1024

/* Loops over fewer elements than this stay on the calling thread. The gathers, scatters and
 * (vectorised) activations between the GEMMs take ~0.1-0.5 ns per element, so below ~1M
 * elements splitting them saves less than it risks: after a parallel region OpenMP's
 * workers spin-wait for a while, competing for the cores with OpenBLAS's threads that run
 * the very next GEMM. */
#define BM_PAR_MIN (1 << 20)

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Element offset `off` into a weight array stored as `dt`. */
static inline const void *weight_at(const void *W, bm_dtype dt, int64_t off) {
    return dt == BM_BF16 ? (const void *)((const uint16_t *)W + off)
                         : (const void *)((const float *)W + off);
}

/* ---- activations (formulas in act.h) ------------------------------------------------------ */

/* h[j] = f(a[j]) * up[j] (gated) or f(a[j]); h may equal a (element j only reads j). */
#define ACT_LOOP(f)                                                                         \
    do {                                                                                    \
        if (up) {                                                                           \
            _Pragma("omp simd") for (int64_t j = 0; j < F; j++) h[j] = f(a[j]) * up[j];     \
        } else {                                                                            \
            _Pragma("omp simd") for (int64_t j = 0; j < F; j++) h[j] = f(a[j]);             \
        }                                                                                   \
    } while (0)

/* One row: h (F) = act(a[:F]) * up[:F] (up = a + F when gated, NULL otherwise). */
static inline __attribute__((always_inline)) void act_row_impl(const float *a, const float *up,
                                                                float *h, int64_t F,
                                                                bm_act act) {
    switch (act) {
    case BM_ACT_GELU: ACT_LOOP(gelu_f); break;
    case BM_ACT_GELU_TANH: ACT_LOOP(gelu_tanh_f); break;
    case BM_ACT_SILU: ACT_LOOP(silu_f); break;
    default: ACT_LOOP(ident_f); break; /* BM_ACT_NONE */
    }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) static void
act_row_avx512(const float *a, const float *up, float *h, int64_t F, bm_act act) {
    act_row_impl(a, up, h, F, act);
}

__attribute__((target("avx2,fma"))) static void
act_row_avx2(const float *a, const float *up, float *h, int64_t F, bm_act act) {
    act_row_impl(a, up, h, F, act);
}

static void act_row_generic(const float *a, const float *up, float *h, int64_t F, bm_act act) {
    act_row_impl(a, up, h, F, act);
}

/* h (M, F) from a (M, 2F) (gated: act(a[:, :F]) * a[:, F:]) or a (M, F) (ungated; h may
 * equal a). */
static void act_rows(const float *a, float *h, int64_t M, int64_t F, bm_act act, int gated) {
    const int64_t lda = gated ? 2 * F : F;
    void (*row)(const float *, const float *, float *, int64_t, bm_act) =
        bm_cpu_has_avx512() ? act_row_avx512 : bm_cpu_has_avx2() ? act_row_avx2 : act_row_generic;
#pragma omp parallel for num_threads(bm_get_num_threads()) if (M * F >= BM_PAR_MIN)
    for (int64_t i = 0; i < M; i++)
        row(a + i * lda, gated ? a + i * lda + F : NULL, h + i * F, F, act);
}

static int act_valid(bm_act act) {
    return act == BM_ACT_GELU || act == BM_ACT_GELU_TANH || act == BM_ACT_SILU ||
           act == BM_ACT_NONE;
}

/* ---- router ----------------------------------------------------------------------------- */

/* Index of the largest of s[0..X): ties go to the lowest index (strict >). NaN follows
 * numpy.argmax, the reference: the first NaN wins, so a token with a NaN logit goes to a valid
 * expert (never out of range) and its gate, sigmoid(NaN), is NaN, which shows up downstream
 * instead of being silently routed by the remaining logits. */
static inline int32_t argmax_first(const float *s, int64_t X) {
    int32_t best = 0;
    float bv = s[0];
    if (isnan(bv)) return 0;
    for (int64_t i = 1; i < X; i++) {
        if (isnan(s[i])) return (int32_t)i;
        if (s[i] > bv) { bv = s[i]; best = (int32_t)i; }
    }
    return best;
}

bm_status bm_route_top1(const float *x, const float *rw, const float *rb, float *logits,
                        int32_t *ids, float *gates, int64_t T, int64_t d, int64_t X) {
    /* x (T, d); rw (X, d); rb (X) or NULL; logits (T, X) or NULL; ids, gates (T) */
    if (T <= 0) return BM_OK;
    if (X <= 0 || X > INT32_MAX) return BM_ERR_ARG;
    float *s = logits;
    if (!s && !(s = malloc(sizeof(float) * (size_t)(T * X)))) return BM_ERR_NOMEM;
    bm_status st = bm_linear(x, rw, BM_F32, rb, s, T, X, d);
    if (st == BM_OK) {
#pragma omp parallel for num_threads(bm_get_num_threads()) if (T * X >= BM_PAR_MIN)
        for (int64_t t = 0; t < T; t++) {
            int32_t e = argmax_first(s + t * X, X);
            ids[t] = e;
            gates[t] = 1.0f / (1.0f + expf(-s[t * X + e]));
        }
    }
    if (s != logits) free(s);
    return st;
}

/* ---- dispatch --------------------------------------------------------------------------- */

bm_status bm_moe_dispatch(const int32_t *ids, int64_t T, int64_t X, int64_t *counts,
                          int64_t *offsets, int64_t *perm) {
    /* ids (T); counts (X); offsets (X+1); perm (T) */
    if (X < 0) return BM_ERR_ARG;
    for (int64_t t = 0; t < T; t++)
        if (ids[t] < 0 || ids[t] >= X) return BM_ERR_ARG; /* before any output is written */
    memset(counts, 0, sizeof(int64_t) * (size_t)X);
    for (int64_t t = 0; t < T; t++) counts[ids[t]]++;
    /* offsets[0..X) serve as the write cursors of the counting sort: visiting tokens in
     * increasing order makes it stable. Afterwards cursor e sits at the start of expert e+1,
     * so the exclusive sums are rebuilt from counts. */
    offsets[0] = 0;
    for (int64_t e = 0; e < X; e++) offsets[e + 1] = offsets[e] + counts[e];
    for (int64_t t = 0; t < T; t++) perm[offsets[ids[t]]++] = t;
    offsets[0] = 0;
    for (int64_t e = 0; e < X; e++) offsets[e + 1] = offsets[e] + counts[e];
    return BM_OK;
}

/* ---- gated MLP on contiguous rows ------------------------------------------------------- */

/* out (M, d) = fc2 @ act-gate(fc1 @ x) for M contiguous rows, in blocks of BM_MLP_ROWS.
 * x (M, d); fc1 (2F, d) gated or (F, d); fc2 (d, F); a scratch (BM_MLP_ROWS, 2F or F);
 * h scratch (BM_MLP_ROWS, F) (may equal a when ungated). */
static bm_status mlp_rows(const float *x, const void *fc1, const void *fc2, bm_dtype wdtype,
                          bm_act act, int gated, float *out, int64_t M, int64_t d, int64_t F,
                          float *a, float *h) {
    const int64_t F1 = gated ? 2 * F : F;
    for (int64_t m0 = 0; m0 < M; m0 += BM_MLP_ROWS) {
        const int64_t mb = min64(BM_MLP_ROWS, M - m0);
        bm_status st = bm_linear(x + m0 * d, fc1, wdtype, NULL, a, mb, F1, d);
        if (st != BM_OK) return st;
        act_rows(a, h, mb, F, act, gated);
        st = bm_linear(h, fc2, wdtype, NULL, out + m0 * d, mb, d, F);
        if (st != BM_OK) return st;
    }
    return BM_OK;
}

bm_status bm_mlp(const float *x, const void *fc1, const void *fc2, bm_dtype wdtype, bm_act act,
                 int gated, float *out, int64_t T, int64_t d, int64_t F) {
    /* x (T, d); fc1 (2F, d) if gated else (F, d); fc2 (d, F); out (T, d) */
    if (!act_valid(act) || (wdtype != BM_F32 && wdtype != BM_BF16)) return BM_ERR_ARG;
    if (T <= 0 || d <= 0) return BM_OK;
    if (F <= 0) { /* an empty hidden layer contributes nothing */
        memset(out, 0, sizeof(float) * (size_t)(T * d));
        return BM_OK;
    }
    const int64_t rows = min64(T, BM_MLP_ROWS);
    const int64_t F1 = gated ? 2 * F : F;
    /* a (rows, F1) then h (rows, F); ungated runs the activation in place in a */
    float *a = malloc(sizeof(float) * (size_t)(rows * (F1 + (gated ? F : 0))));
    if (!a) return BM_ERR_NOMEM;
    float *h = gated ? a + rows * F1 : a;
    bm_status st = mlp_rows(x, fc1, fc2, wdtype, act, gated, out, T, d, F, a, h);
    free(a);
    return st;
}

/* ---- experts ---------------------------------------------------------------------------- */

bm_status bm_moe_experts(const float *x, const int32_t *ids, const float *gates,
                         const void *fc1, const void *fc2, bm_dtype wdtype, bm_act act,
                         float *out, int64_t T, int64_t d, int64_t X, int64_t F) {
    /* x (T, d); ids (T) in [0, X); gates (T) or NULL; fc1 (X, 2F, d); fc2 (X, d, F);
     * out (T, d) */
    if (!act_valid(act) || (wdtype != BM_F32 && wdtype != BM_BF16)) return BM_ERR_ARG;
    if (T <= 0 || d <= 0) return BM_OK;
    if (X <= 0) return BM_ERR_ARG; /* T > 0 tokens cannot all have an expert */

    /* idx: counts (X), offsets (X+1), perm (T) */
    int64_t *idx = malloc(sizeof(int64_t) * (size_t)(2 * X + 1 + T));
    float *buf = NULL;
    bm_status st = BM_ERR_NOMEM;
    if (!idx) goto done;
    int64_t *counts = idx, *offsets = idx + X, *perm = idx + 2 * X + 1;
    st = bm_moe_dispatch(ids, T, X, counts, offsets, perm);
    if (st != BM_OK) goto done;
    if (F <= 0) {
        memset(out, 0, sizeof(float) * (size_t)(T * d));
        goto done;
    }

    int64_t maxc = 0;
    for (int64_t e = 0; e < X; e++) maxc = counts[e] > maxc ? counts[e] : maxc;
    const int64_t rows = min64(maxc, BM_MLP_ROWS);
    /* xs (rows, d): gathered inputs, reused for the outputs; a (rows, 2F); h (rows, F) */
    buf = malloc(sizeof(float) * (size_t)(rows * (d + 3 * F)));
    st = BM_ERR_NOMEM;
    if (!buf) goto done;
    float *xs = buf, *a = buf + rows * d, *h = a + rows * 2 * F;

    st = BM_OK;
    for (int64_t e = 0; e < X && st == BM_OK; e++) {
        const void *w1 = weight_at(fc1, wdtype, e * 2 * F * d); /* (2F, d) */
        const void *w2 = weight_at(fc2, wdtype, e * d * F);     /* (d, F) */
        for (int64_t c0 = 0; c0 < counts[e]; c0 += rows) {
            const int64_t mb = min64(rows, counts[e] - c0);
            const int64_t *tok = perm + offsets[e] + c0; /* (mb) token indices */
#pragma omp parallel for num_threads(bm_get_num_threads()) if (mb * d >= BM_PAR_MIN)
            for (int64_t i = 0; i < mb; i++)
                memcpy(xs + i * d, x + tok[i] * d, sizeof(float) * (size_t)d);
            /* in place: mb <= BM_MLP_ROWS rows are one block, read before written */
            st = mlp_rows(xs, w1, w2, wdtype, act, 1, xs, mb, d, F, a, h);
            if (st != BM_OK) break;
#pragma omp parallel for num_threads(bm_get_num_threads()) if (mb * d >= BM_PAR_MIN)
            for (int64_t i = 0; i < mb; i++) {
                const float g = gates ? gates[tok[i]] : 1.0f;
                const float *o = xs + i * d;
                float *dst = out + tok[i] * d;
                for (int64_t j = 0; j < d; j++) dst[j] = o[j] * g;
            }
        }
    }
done:
    free(buf);
    free(idx);
    return st;
}
