/* bench_gemm.c: dev harness for csrc/gemm.c (not part of the build; includes gemm.c to reach
 * its static kernels). Build: ./build.sh; run /tmp/bench_gemm <mode> ...
 *   bw                 plain AVX-512 read vs fp32 GEMV vs bf16 GEMV vs OpenBLAS sgemv, 1.2 GB
 *   model M...         one token's active weights (2.8B shapes), fp32 and bf16, per M
 *   cross K N M...     GEMV kernel vs sgemm path at M rows (bf16 and fp32)
 *   gemm M...          prefill shapes: sgemm fp32 vs bf16 panel path
 * Every comparison interleaves its variants round by round and keeps each one's best time:
 * this machine is shared, so only same-run best-of-N ratios mean anything. */
#include "../../csrc/gemm.c"

#include <stdio.h>
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
static float read_bw(const float *a, int64_t n) {
    float tot = 0;
    #pragma omp parallel num_threads(bm_get_num_threads()) reduction(+:tot)
    { int id = omp_get_thread_num(), T = omp_get_num_threads(); int64_t ch = n / T / 64 * 64; tot += sum512(a + id * ch, ch); }
    return tot;
}

static void fill(float *a, int64_t n, unsigned seed) {
    #pragma omp parallel for
    for (int64_t i = 0; i < n; i++) { unsigned h = (unsigned)i * 2654435761u ^ seed; a[i] = ((h >> 8) & 0xffff) / 65536.0f - 0.5f; }
}
static void fill16(uint16_t *a, int64_t n, unsigned seed) {
    #pragma omp parallel for
    for (int64_t i = 0; i < n; i++) { unsigned h = (unsigned)i * 2654435761u ^ seed; float f = ((h >> 8) & 0xffff) / 65536.0f - 0.5f; uint32_t u; memcpy(&u, &f, 4); a[i] = u >> 16; }
}

#define NV 8
typedef struct { const char *name; double best; double bytes; double flops; } var;
static void report(var *v, int nv, int ref) {
    for (int i = 0; i < nv; i++)
        printf("  %-28s %9.3f ms %8.2f GB/s %8.1f GFLOP/s  %5.1f%% of %s\n", v[i].name, v[i].best * 1e3,
               v[i].bytes / v[i].best / 1e9, v[i].flops / v[i].best / 1e9,
               100 * (v[i].bytes / v[i].best) / (v[ref].bytes / v[ref].best), v[ref].name);
}

typedef struct { int64_t n, k; } shp;
static const shp layer_shapes[] = {{5888, 1472}, {124, 2944}, {2944, 92}, {1472, 2944}, {8, 1472}, {7744, 1472}, {1472, 3872}};

static void bw(int reps) {
    int64_t n = (int64_t)300 << 20, K = 4096, N = n / K;  /* 1.2 GB of float32 */
    float *a = aligned_alloc(64, n * 4); fill(a, n, 1);
    float *x = malloc(4 * K), *y = malloc(4 * N * 2); fill(x, K, 3);
    var v[] = {{"read (sum512)", 1e9, n * 4., 0}, {"fp32 gemv (ours)", 1e9, n * 4., 2. * n},
               {"fp32 sgemv (OpenBLAS)", 1e9, n * 4., 2. * n}, {"bf16 gemv (ours, 2x rows)", 1e9, n * 4., 4. * n}};
    volatile float sink = 0;
    for (int r = 0; r < reps; r++)
        for (int i = 0; i < 4; i++) {
            double t = now();
            if (i == 0) sink += read_bw(a, n);
            if (i == 1) gemv(x, a, BM_F32, y, 1, N, K);
            if (i == 2) scipy_cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)N, (int)K, 1.0f, a, (int)K, x, 1, 0.0f, y, 1);
            if (i == 3) gemv(x, a, BM_BF16, y, 1, 2 * N, K);
            t = now() - t; if (t < v[i].best) v[i].best = t;
        }
    printf("1.2 GB streams, %d threads, best of %d\n", bm_get_num_threads(), reps);
    report(v, 4, 0);
    free(a); free(x); free(y);
}

static void model(int M, int reps) {
    int nl = 18 * 7 + 1;
    void *w16[128]; shp s[128]; int64_t tot = 0;
    for (int l = 0; l < nl; l++) {
        s[l] = l < 126 ? layer_shapes[l % 7] : (shp){50304, 1472};
        int64_t e = s[l].n * s[l].k; tot += e;
        w16[l] = aligned_alloc(64, (e * 2 + 63) / 64 * 64); fill16(w16[l], e, l);
    }
    int64_t n = (int64_t)300 << 20; float *a = aligned_alloc(64, n * 4); fill(a, n, 1);
    float *x = malloc(sizeof(float) * M * 50304), *y = malloc(sizeof(float) * M * 50304);
    fill(x, M * 50304, 7);
    var v[] = {{"read (sum512) 1.2GB", 1e9, n * 4., 0}, {"bf16 token", 1e9, tot * 2., 2. * M * tot}};
    volatile float sink = 0;
    for (int r = 0; r < reps; r++) {
        double t = now(); sink += read_bw(a, n); t = now() - t; if (t < v[0].best) v[0].best = t;
        t = now();
        for (int l = 0; l < nl; l++) bm_linear(x, w16[l], BM_BF16, NULL, y, M, s[l].n, s[l].k);
        t = now() - t; if (t < v[1].best) v[1].best = t;
    }
    printf("model token, %lld active matrix params, M=%d, %d threads, best of %d\n", (long long)tot, M, bm_get_num_threads(), reps);
    report(v, 2, 0);
    for (int l = 0; l < nl; l++) free(w16[l]);
    free(a); free(x); free(y);
}

/* each distinct layer shape on its own: enough copies of it to pass 150 MB, streamed in turn */
static void layers(int M, int reps) {
    int64_t n = (int64_t)300 << 20; float *a = aligned_alloc(64, n * 4); fill(a, n, 1);
    float *x = malloc(sizeof(float) * M * 50304), *y = malloc(sizeof(float) * M * 50304);
    fill(x, M * 50304, 7);
    volatile float sink = 0;
    double tr = 1e9;
    for (int r = 0; r < reps; r++) { double t = now(); sink += read_bw(a, n); t = now() - t; if (t < tr) tr = t; }
    printf("read (sum512) %.2f GB/s; bf16 GEMV M=%d per shape:\n", n * 4 / tr / 1e9, M);
    for (int l = 0; l < 8; l++) {
        shp s = l < 7 ? layer_shapes[l] : (shp){50304, 1472};
        int f32 = getenv("F32") && atoi(getenv("F32")), es = f32 ? 4 : 2;
        int64_t e = s.n * s.k, copies = (150 << 20) / (es * e) + 1;
        if (copies > 4096) copies = 4096;
        void **w = malloc(sizeof(void *) * copies);
        for (int64_t c = 0; c < copies; c++) {
            w[c] = aligned_alloc(64, (es * e + 63) / 64 * 64);
            if (f32) fill(w[c], e, c); else fill16(w[c], e, c);
        }
        double best = 1e9;
        for (int r = 0; r < reps; r++) {
            double t = now();
            for (int64_t c = 0; c < copies; c++) bm_linear(x, w[c], f32 ? BM_F32 : BM_BF16, NULL, y, M, s.n, s.k);
            t = now() - t; if (t < best) best = t;
        }
        printf("  (%5lld,%5lld) x%4lld: %7.1f us/call %6.2f GB/s %5.1f%%\n", (long long)s.n, (long long)s.k, (long long)copies,
               best / copies * 1e6, copies * e * es / best / 1e9, 100 * copies * e * es / best / (n * 4 / tr));
        for (int64_t c = 0; c < copies; c++) free(w[c]);
        free(w);
    }
    free(a); free(x); free(y);
}

/* the previous design, for comparison: OpenBLAS's own threads, bf16 panels widened by an
 * OpenMP loop between sgemm calls (two thread pools taking turns on the cores) */
static void old_linear(const float *x, const void *W, bm_dtype wdtype, float *y, int64_t M, int64_t N, int64_t K) {
    scipy_openblas_set_num_threads(bm_get_num_threads());
    if (wdtype == BM_F32) {
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.0f, x, K, W, K, 0.0f, y, N);
    } else {
        int64_t P = (int64_t)(8 << 20) / (4 * K); if (P > N) P = N;
        float *panel = malloc(4 * P * K);
        for (int64_t n0 = 0; n0 < N; n0 += P) {
            int64_t np = min64(P, N - n0);
            bm_bf16_to_f32((const uint16_t *)W + n0 * K, panel, np * K);
            scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, np, K, 1.0f, x, K, panel, K, 0.0f, y + n0, N);
        }
        free(panel);
    }
    scipy_openblas_set_num_threads(1);
}

/* GEMV kernel vs the sgemm path at M rows over a matrix far beyond L3 */
static void cross(int64_t K, int64_t N, int M, int reps) {
    int64_t e = N * K;
    float *w = aligned_alloc(64, 4 * e); uint16_t *w16 = aligned_alloc(64, 2 * e); fill(w, e, 1); fill16(w16, e, 2);
    float *x = malloc(4 * M * K), *y = malloc(4 * M * N); fill(x, M * K, 3);
    var v[] = {{"fp32 gemv", 1e9, 4. * e, 2. * M * e}, {"fp32 gemm (split)", 1e9, 4. * e, 2. * M * e},
               {"bf16 gemv", 1e9, 2. * e, 2. * M * e}, {"bf16 gemm (split)", 1e9, 2. * e, 2. * M * e}};
    for (int r = 0; r < reps; r++)
        for (int i = 0; i < 4; i++) {
            double t = now();
            if (i == 0) gemv(x, w, BM_F32, y, M, N, K);
            if (i == 1) gemm(x, w, BM_F32, y, M, N, K);
            if (i == 2) gemv(x, w16, BM_BF16, y, M, N, K);
            if (i == 3) gemm(x, w16, BM_BF16, y, M, N, K);
            t = now() - t; if (t < v[i].best) v[i].best = t;
        }
    printf("M=%d N=%lld K=%lld\n", M, (long long)N, (long long)K);
    report(v, 4, 1);
    free(w); free(w16); free(x); free(y);
}

static void gemm_shapes(int M, int reps) {
    for (int l = 0; l < 8; l++) {
        shp s = l < 7 ? layer_shapes[l] : (shp){3072, 3072};
        if (s.n < 1000 || s.k < 1000) continue;
        int64_t e = s.n * s.k;
        float *w = malloc(4 * e); uint16_t *w16 = malloc(2 * e); fill(w, e, 1); fill16(w16, e, 2);
        float *x = malloc(4 * M * s.k), *y = malloc(4 * M * s.n); fill(x, M * s.k, 3);
        var v[] = {{"fp32 OpenBLAS threads (old)", 1e9, 4. * e, 2. * M * e}, {"fp32 split (new)", 1e9, 4. * e, 2. * M * e},
                   {"bf16 old", 1e9, 2. * e, 2. * M * e}, {"bf16 split (new)", 1e9, 2. * e, 2. * M * e}};
        /* OLD=1: only the old variants, OLD=0 only the new (OpenBLAS's workers keep spinning
         * after a threaded call, which would slow whatever runs next) */
        int only = getenv("OLD") ? atoi(getenv("OLD")) : -1;
        for (int r = 0; r < reps; r++)
            for (int i = 0; i < 4; i++) {
                if ((only == 1 && (i & 1)) || (only == 0 && !(i & 1))) continue;
                double t = now();
                if (i == 0) old_linear(x, w, BM_F32, y, M, s.n, s.k);
                if (i == 1) bm_linear(x, w, BM_F32, NULL, y, M, s.n, s.k);
                if (i == 2) old_linear(x, w16, BM_BF16, y, M, s.n, s.k);
                if (i == 3) bm_linear(x, w16, BM_BF16, NULL, y, M, s.n, s.k);
                t = now() - t; if (t < v[i].best) v[i].best = t;
            }
        printf("gemm M=%d N=%lld K=%lld\n", M, (long long)s.n, (long long)s.k);
        report(v, 4, 0);
        free(w); free(w16); free(x); free(y);
    }
}

int main(int argc, char **argv) {
    int nt = getenv("NT") ? atoi(getenv("NT")) : 2, reps = getenv("REPS") ? atoi(getenv("REPS")) : 7;
    bm_set_num_threads(nt);
    if (argc < 2) return 1;
    if (!strcmp(argv[1], "bw")) bw(reps);
    else if (!strcmp(argv[1], "model")) for (int i = 2; i < argc; i++) model(atoi(argv[i]), reps);
    else if (!strcmp(argv[1], "gemm")) for (int i = 2; i < argc; i++) gemm_shapes(atoi(argv[i]), reps);
    else if (!strcmp(argv[1], "layers")) for (int i = 2; i < argc; i++) layers(atoi(argv[i]), reps);
    else if (!strcmp(argv[1], "cross")) for (int i = 4; i < argc; i++) cross(atoll(argv[2]), atoll(argv[3]), atoi(argv[i]), reps);
    return 0;
}
