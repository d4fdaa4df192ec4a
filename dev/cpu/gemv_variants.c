/* gemv_variants.c: bf16 GEMV (M=1) inner-loop variants over 1.2 GB, interleaved, best-of-N.
 *   gcc -O3 -fopenmp gemv_variants.c -o /tmp/gv && NT=2 /tmp/gv */
#include "../../csrc/gemm.c"
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

AVX512 static float sum512(const float *a, int64_t n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t i = 0; i < n; i += 64) {
        s0 = _mm512_add_ps(s0, _mm512_loadu_ps(a + i)); s1 = _mm512_add_ps(s1, _mm512_loadu_ps(a + i + 16));
        s2 = _mm512_add_ps(s2, _mm512_loadu_ps(a + i + 32)); s3 = _mm512_add_ps(s3, _mm512_loadu_ps(a + i + 48));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

/* V1: R rows, 32/iter, folded double load (current) ; PF = prefetch bytes ahead (0 = none) */
#define HI _mm512_set1_epi32((int)0xffff0000u)
AVX512 static inline __attribute__((always_inline)) void v_rows(const uint16_t *W, const float *xp, float *y, int64_t K, int R, int PF, int U) {
    __m512 acc[8][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const __m512i hi = HI;
    for (int64_t k = 0; k < K; k += 32 * U) {
        for (int u = 0; u < U; u++) {
            __m512 xe = _mm512_loadu_ps(xp + k + 32 * u), xo = _mm512_loadu_ps(xp + k + 32 * u + 16);
            for (int r = 0; r < R; r++) {
                if (PF && u == 0) _mm_prefetch((const char *)(W + r * K + k) + PF, _MM_HINT_T0);
                __m512i w = _mm512_loadu_si512(W + r * K + k + 32 * u);
                acc[r][u & 1] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), xe, acc[r][u & 1]);
                acc[r][u & 1] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(w, hi)), xo, acc[r][u & 1]);
            }
        }
    }
    for (int r = 0; r < R; r++) y[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}
/* zero-extend variant: x in natural order */
AVX512 static inline __attribute__((always_inline)) void z_rows(const uint16_t *W, const float *x, float *y, int64_t K, int R, int PF) {
    __m512 acc[8][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
        for (int r = 0; r < R; r++) {
            if (PF) _mm_prefetch((const char *)(W + r * K + k) + PF, _MM_HINT_T0);
            __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(W + r * K + k))), 16));
            __m512 w1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(W + r * K + k + 16))), 16));
            acc[r][0] = _mm512_fmadd_ps(w0, x0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(w1, x1, acc[r][1]);
        }
    }
    for (int r = 0; r < R; r++) y[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}

/* bf16, one row, 64 weights per step, no mask computation in the main loop */
AVX512 static inline __attribute__((always_inline)) void u_row(const uint16_t *W, const float *xp, float *y, int64_t K, int PF) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        if (PF) { _mm_prefetch((const char *)(W + k) + PF, _MM_HINT_T0); _mm_prefetch((const char *)(W + k) + PF + 64, _MM_HINT_T0); }
        __m512i w0 = _mm512_loadu_si512(W + k), w1 = _mm512_loadu_si512(W + k + 32);
        a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w0, 16)), _mm512_loadu_ps(xp + k), a0);
        a1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(w0, hi)), _mm512_loadu_ps(xp + k + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w1, 16)), _mm512_loadu_ps(xp + k + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(w1, hi)), _mm512_loadu_ps(xp + k + 48), a3);
    }
    for (; k < K; k += 32) {
        __mmask32 mk = K - k >= 32 ? ~(__mmask32)0 : (__mmask32)((1ull << (K - k)) - 1);
        __m512i w0 = _mm512_maskz_loadu_epi16(mk, W + k);
        a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w0, 16)), _mm512_loadu_ps(xp + k), a0);
        a1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(w0, hi)), _mm512_loadu_ps(xp + k + 16), a1);
    }
    *y = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}
typedef void (*fn_t)(const uint16_t *, const float *, float *, int64_t, int64_t, int64_t);
AVX512 static void u2(const uint16_t *W, const float *xp, float *y, int64_t K, int64_t n0, int64_t n1) { for (int64_t n = n0; n < n1; n++) u_row(W + n * K, xp, y + n, K, 0); }
AVX512 static void u2pf2k(const uint16_t *W, const float *xp, float *y, int64_t K, int64_t n0, int64_t n1) { for (int64_t n = n0; n < n1; n++) u_row(W + n * K, xp, y + n, K, 2048); }
AVX512 static void u2pf8k(const uint16_t *W, const float *xp, float *y, int64_t K, int64_t n0, int64_t n1) { for (int64_t n = n0; n < n1; n++) u_row(W + n * K, xp, y + n, K, 8192); }
AVX512 static void lib_bf16(const uint16_t *W, const float *xp, float *y, int64_t K, int64_t n0, int64_t n1) { gemv_rows_bf16_avx512(xp, W, y, 1, 1 << 30, K, K, n0, n1); }
/* the fp32 kernel over the same bytes: half the rows of the same K (as fp32 of 2x... same row bytes: K/2 floats) */
AVX512 static void lib_f32(const uint16_t *W, const float *xp, float *y, int64_t K, int64_t n0, int64_t n1) { gemv_rows_f32_avx512(xp, (const float *)W, y, 1, 1 << 30, K / 2, n0, n1); }
/* fp32, one row, 64 floats (4 lines) per step, 4 accumulators; rows of K/2 floats */
AVX512 static void f32u4(const uint16_t *W16, const float *x, float *y, int64_t K2, int64_t n0, int64_t n1) {
    int64_t K = K2 / 2;
    const float *W = (const float *)W16;
    for (int64_t n = n0; n < n1; n++) {
        const float *w = W + n * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t k = 0;
        for (; k + 64 <= K; k += 64) {
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 32), _mm512_loadu_ps(x + k + 32), a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 48), _mm512_loadu_ps(x + k + 48), a3);
        }
        for (; k < K; k += 16) {
            __mmask16 mk = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
            a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, w + k), _mm512_maskz_loadu_ps(mk, x + k), a0);
        }
        y[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    }
}
static void blas_f32(const uint16_t *W16, const float *x, float *y, int64_t K2, int64_t n0, int64_t n1) {
    int64_t K = K2 / 2;
    scipy_cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)(n1 - n0), (int)K, 1.0f, (const float *)W16 + n0 * K, (int)K, x, 1, 0.0f, y + n0, 1);
}
static struct { const char *name; fn_t f; } V[] = {
    {"gemm.c f32 (same bytes)", lib_f32}, {"gemm.c bf16", lib_bf16}, {"f32 64/step", f32u4}, {"OpenBLAS sgemv 1thr/blk", blas_f32}};
#define NVAR (int)(sizeof(V) / sizeof(V[0]))

int main(void) {
    int nt = getenv("NT") ? atoi(getenv("NT")) : 2, reps = getenv("REPS") ? atoi(getenv("REPS")) : 7;
    int64_t n = (int64_t)300 << 20, K = getenv("K") ? atoll(getenv("K")) : 4096, N = 2 * n / K;
    float *a = aligned_alloc(64, n * 4);
    #pragma omp parallel for
    for (int64_t i = 0; i < n; i++) a[i] = 0.01f * (i & 7);
    float *x = aligned_alloc(64, 4 * K), *y = aligned_alloc(64, 4 * N);
    for (int i = 0; i < K; i++) x[i] = 0.5f;
    double best[16]; for (int i = 0; i <= NVAR; i++) best[i] = 1e9;
    volatile float sink = 0;
    for (int r = 0; r < reps; r++)
        for (int v = 0; v <= NVAR; v++) {
            double t = now();
            if (v == 0) {
                float tot = 0;
                #pragma omp parallel num_threads(nt) reduction(+:tot)
                { int id = omp_get_thread_num(); int64_t ch = n / nt; tot += sum512(a + id * ch, ch); }
                sink += tot;
            } else {
                #pragma omp parallel num_threads(nt)
                { int id = omp_get_thread_num(); int64_t per = N / nt; V[v - 1].f((const uint16_t *)a, x, y, K, id * per, id * per + per); }
            }
            t = now() - t; if (t < best[v]) best[v] = t;
        }
    printf("NT=%d K=%lld best of %d\n  %-20s %6.2f GB/s\n", nt, (long long)K, reps, "read sum512", n * 4 / best[0] / 1e9);
    for (int v = 1; v <= NVAR; v++) printf("  %-24s %6.2f GB/s %5.1f%% of read, %5.1f%% of f32\n", V[v - 1].name, n * 4 / best[v] / 1e9, 100 * best[0] / best[v], 100 * best[1] / best[v]);
}
