/* sinkhorn.c: Sinkhorn balancing of router logits (SPEC 3.2).
 *
 * Dimension letters (bm.h): T tokens, X experts.
 *   C  = exp(2 S) (BlackMamba) or exp(S) (vanilla Megatron)
 *   d0 = ones(T);  d1 = 1 / (X colsum C) (BlackMamba) or ones(X)
 *   repeat: d0 = (1/T) / (C d1 + 1e-8);  d1 = (1/X) / (C^T d0 + 1e-8)
 *           until mean |d1 - d1_prev| <= tol or max_iters
 *   P = diag(d0) C diag(d1)
 *
 * Precision. C, d0, d1 and every sum are float64; only S and P are float32. T*X is small
 * (router logits), so the float64 copy of C is cheap, and it matters twice over:
 *  - range: exp(2 S) overflows float32 from S > 44.4 but float64 only from S > 354, where the
 *    float64 reference overflows too (both then give inf/NaN the same way);
 *  - the stopping test compares mean |d1 - d1_prev| (values ~1/(X colsum C), any scale) with
 *    an absolute tol, so the iteration count can only match the reference if d1 is computed
 *    to the reference's precision.
 * No max is subtracted from S before exp to avoid overflow. Scaling C by a constant or per
 * column would leave the exact fixed point unchanged but not this algorithm's iterates: the
 * 1e-8 terms are not scaled along, and d1 (hence the absolute stopping test) is scaled by the
 * inverse factor, so the number of iterations and P would differ from the reference.
 *
 * Both products C d1 and C^T d0 are done in one pass over C per iteration: row t gives d0[t],
 * which is immediately added into the column sums. Rows are split into fixed blocks whose
 * partial column sums are added in block order, so the result does not depend on the number
 * of threads.
 */
#include "bm.h"

#include <math.h>
#include <stdlib.h>

/* Rows per block of partial column sums: the unit of parallel work. Fixed (not derived from
 * the thread count) so that the summation order, and hence P, is the same on any machine. */
#define SK_ROWS 2048

/* One pass over rows [t0, t1) of C (T, X): d0[t] = (1/T) / (C[t] . d1 + 1e-8) for each row
 * when d1 is non-NULL (else d0 is left alone and read), and part (X) = sum_t C[t, :] d0[t]
 * (d0 NULL: plain column sums). */
static void sk_block(const double *C, const double *d1, double *d0, double *part, int64_t t0,
                     int64_t t1, int64_t T, int64_t X) {
    for (int64_t j = 0; j < X; j++) part[j] = 0.0;
    for (int64_t t = t0; t < t1; t++) {
        const double *c = C + t * X; /* (X) */
        double r = 1.0;
        if (d1) {
            double s = 0.0;
            for (int64_t j = 0; j < X; j++) s += c[j] * d1[j];
            d0[t] = (1.0 / (double)T) / (s + 1e-8);
        }
        if (d0) r = d0[t];
        for (int64_t j = 0; j < X; j++) part[j] += c[j] * r;
    }
}

/* col (X) = sum over blocks of sk_block's partial sums (parts: (nb, X) scratch). */
static void sk_pass(const double *C, const double *d1, double *d0, double *parts, double *col,
                    int64_t T, int64_t X) {
    const int64_t nb = (T + SK_ROWS - 1) / SK_ROWS;
#pragma omp parallel for num_threads(bm_get_num_threads()) if (nb > 1) schedule(static)
    for (int64_t b = 0; b < nb; b++) {
        const int64_t t0 = b * SK_ROWS, t1 = t0 + SK_ROWS < T ? t0 + SK_ROWS : T;
        sk_block(C, d1, d0, parts + b * X, t0, t1, T, X);
    }
    for (int64_t j = 0; j < X; j++) col[j] = 0.0;
    for (int64_t b = 0; b < nb; b++)
        for (int64_t j = 0; j < X; j++) col[j] += parts[b * X + j];
}

bm_status bm_sinkhorn(const float *S, float *P, int64_t T, int64_t X, float tol,
                      bm_sinkhorn_init init, int max_iters, int *iters) {
    /* S (T, X) logits; P (T, X) out */
    if (iters) *iters = 0;
    if (init != BM_SINKHORN_BLACKMAMBA && init != BM_SINKHORN_UNIFORM) return BM_ERR_ARG;
    if (T <= 0 || X <= 0) return BM_OK;

    const int64_t nb = (T + SK_ROWS - 1) / SK_ROWS;
    /* C (T, X), d0 (T), d1 (X), d1_prev (X), col (X), parts (nb, X) */
    double *C = malloc(sizeof(double) * (size_t)(T * X + T + 3 * X + nb * X));
    if (!C) return BM_ERR_NOMEM;
    double *d0 = C + T * X, *d1 = d0 + T, *d1_prev = d1 + X, *col = d1_prev + X;
    double *parts = col + X;

    const double scale = init == BM_SINKHORN_BLACKMAMBA ? 2.0 : 1.0;
#pragma omp parallel for num_threads(bm_get_num_threads()) if (T * X >= 65536)
    for (int64_t i = 0; i < T * X; i++) C[i] = exp(scale * (double)S[i]);
    for (int64_t t = 0; t < T; t++) d0[t] = 1.0;
    if (init == BM_SINKHORN_BLACKMAMBA) {
        sk_pass(C, NULL, NULL, parts, col, T, X);
        for (int64_t j = 0; j < X; j++) d1[j] = 1.0 / ((double)X * col[j]);
    } else {
        for (int64_t j = 0; j < X; j++) d1[j] = 1.0;
    }

    int it = 0;
    while (it < max_iters) {
        it++;
        for (int64_t j = 0; j < X; j++) d1_prev[j] = d1[j];
        sk_pass(C, d1_prev, d0, parts, col, T, X); /* d0 from d1_prev; col = C^T d0 */
        double err = 0.0;
        for (int64_t j = 0; j < X; j++) {
            d1[j] = (1.0 / (double)X) / (col[j] + 1e-8);
            err += fabs(d1[j] - d1_prev[j]);
        }
        /* NaN never satisfies <=: like the reference, it runs on to max_iters */
        if (err / (double)X <= (double)tol) break;
    }

#pragma omp parallel for num_threads(bm_get_num_threads()) if (T * X >= 65536)
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < X; j++) P[t * X + j] = (float)(d0[t] * C[t * X + j] * d1[j]);
    free(C);
    if (iters) *iters = it;
    return BM_OK;
}
