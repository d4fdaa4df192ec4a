/* bench_gemm.c: dev harness for csrc/gemm.c (not part of the build).
 *   gcc -O3 -fopenmp -I../../csrc -I$OB/include bench_gemm.c ../../csrc/gemm.c ../../csrc/cpu.c \
 *       -L$OB/lib -lscipy_openblas -Wl,-rpath,$OB/lib -lm -o bench_gemm
 * Modes: bw | gemv <M> | model <M> | gemm <M> */
#include "bm.h"
#include <cblas.h>
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

__attribute__((target("avx512f"))) static float sum512(const float *a, int64_t n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t i = 0; i < n; i += 64) {
        s0 = _mm512_add_ps(s0, _mm512_loadu_ps(a + i)); s1 = _mm512_add_ps(s1, _mm512_loadu_ps(a + i + 16));
        s2 = _mm512_add_ps(s2, _mm512_loadu_ps(a + i + 32)); s3 = _mm512_add_ps(s3, _mm512_loadu_ps(a + i + 48));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

static void fill(float *a, int64_t n, unsigned seed) {
    #pragma omp parallel for
    for (int64_t i = 0; i < n; i++) { unsigned h = (unsigned)i * 2654435761u ^ seed; a[i] = ((h >> 8) & 0xffff) / 65536.0f - 0.5f; }
}
static void fill16(uint16_t *a, int64_t n, unsigned seed) {
    #pragma omp parallel for
    for (int64_t i = 0; i < n; i++) { unsigned h = (unsigned)i * 2654435761u ^ seed; float f = ((h >> 8) & 0xffff) / 65536.0f - 0.5f; uint32_t u; memcpy(&u, &f, 4); a[i] = u >> 16; }
}

/* the 2.8B model's active weights for one token */
typedef struct { int64_t n, k; } shp;
static const shp layer_shapes[] = {{5888, 1472}, {124, 2944}, {2944, 92}, {1472, 2944}, {8, 1472}, {7744, 1472}, {1472, 3872}};

static void model(int M, int nt, int reps) {
    int nl = 18 * 7 + 1;
    void *w32[128], *w16[128]; shp s[128]; int64_t tot = 0;
    for (int l = 0; l < nl; l++) {
        s[l] = l < 126 ? layer_shapes[l % 7] : (shp){50304, 1472};
        int64_t e = s[l].n * s[l].k; tot += e;
        w32[l] = aligned_alloc(64, (e * 4 + 63) / 64 * 64); fill(w32[l], e, l);
        w16[l] = aligned_alloc(64, (e * 2 + 63) / 64 * 64); fill16(w16[l], e, l);
    }
    float *x = malloc(sizeof(float) * M * 50304), *y = malloc(sizeof(float) * M * 50304);
    fill(x, M * 50304, 7);
    printf("model: %lld active params, M=%d threads=%d\n", (long long)tot, M, nt);
    for (int dt = 0; dt < 2; dt++) {
        double best = 1e9;
        for (int r = 0; r < reps; r++) {
            double t = now();
            for (int l = 0; l < nl; l++)
                bm_linear(x, dt ? w16[l] : w32[l], dt ? BM_BF16 : BM_F32, NULL, y, M, s[l].n, s[l].k);
            t = now() - t; if (t < best) best = t;
        }
        printf("  %s: %.2f ms  %.2f GB/s\n", dt ? "bf16" : "fp32", best * 1e3, tot * (dt ? 2 : 4) / best / 1e9);
    }
    for (int l = 0; l < nl; l++) { free(w32[l]); free(w16[l]); }
    free(x); free(y);
}

static void bw(int nt) {
    int64_t n = (int64_t)300 << 20; float *a = aligned_alloc(64, n * 4); fill(a, n, 1);
    double best = 1e9; float tot = 0;
    for (int r = 0; r < 5; r++) {
        double t = now();
        #pragma omp parallel num_threads(nt) reduction(+:tot)
        { int id = omp_get_thread_num(); int64_t ch = n / nt; tot += sum512(a + id * ch, ch); }
        t = now() - t; if (t < best) best = t;
    }
    printf("read bw (sum512, %d thr): %.2f GB/s\n", nt, n * 4 / best / 1e9);
    /* fp32 gemv over the same 1.2 GB */
    int64_t K = 4096, N = n / K; float *x = malloc(4 * K), *y = malloc(4 * N * 8); fill(x, K, 3);
    for (int M = 1; M <= 1; M++) {
        best = 1e9;
        for (int r = 0; r < 5; r++) { double t = now(); bm_linear(x, a, BM_F32, NULL, y, M, N, K); t = now() - t; if (t < best) best = t; }
        printf("fp32 gemv M=%d over 1.2GB: %.2f GB/s\n", M, n * 4 / best / 1e9);
    }
    uint16_t *a16 = (uint16_t *)a; int64_t N16 = N * 2;
    fill16(a16, n * 2, 5);
    best = 1e9;
    for (int r = 0; r < 5; r++) { double t = now(); bm_linear(x, a16, BM_BF16, NULL, y, 1, N16, K); t = now() - t; if (t < best) best = t; }
    printf("bf16 gemv M=1 over 1.2GB: %.2f GB/s\n", n * 4 / best / 1e9);
    free(a); free(x); free(y);
}

static void gemm(int M, int nt) {
    for (int l = 0; l < 8; l++) {
        shp s = l < 7 ? layer_shapes[l] : (shp){2048, 2048};
        if (s.n < 1000 || s.k < 1000) continue;
        int64_t e = s.n * s.k;
        float *w = malloc(4 * e); uint16_t *w16 = malloc(2 * e); fill(w, e, 1); fill16(w16, e, 2);
        float *x = malloc(4 * M * s.k), *y = malloc(4 * M * s.n); fill(x, M * s.k, 3);
        double fl = 2.0 * M * e, b32 = 1e9, b16 = 1e9;
        for (int r = 0; r < 3; r++) {
            double t = now(); bm_linear(x, w, BM_F32, NULL, y, M, s.n, s.k); t = now() - t; if (t < b32) b32 = t;
            t = now(); bm_linear(x, w16, BM_BF16, NULL, y, M, s.n, s.k); t = now() - t; if (t < b16) b16 = t;
        }
        printf("gemm M=%d N=%lld K=%lld: fp32 %.1f GFLOP/s  bf16 %.1f GFLOP/s (%.0f%%)\n", M, (long long)s.n, (long long)s.k, fl / b32 / 1e9, fl / b16 / 1e9, 100 * b32 / b16);
        free(w); free(w16); free(x); free(y);
    }
}

int main(int argc, char **argv) {
    int nt = getenv("NT") ? atoi(getenv("NT")) : 2;
    bm_set_num_threads(nt);
    if (argc < 2) return 1;
    if (!strcmp(argv[1], "bw")) bw(nt);
    else if (!strcmp(argv[1], "model")) for (int i = 2; i < argc; i++) model(atoi(argv[i]), nt, 5);
    else if (!strcmp(argv[1], "gemm")) for (int i = 2; i < argc; i++) gemm(atoi(argv[i]), nt);
    return 0;
}
