/* gemm.c: y (M, Nout) = x (M, Kin) @ W^T + bias, W (Nout, Kin) stored as float32 or bfloat16.
 *
 * Two regimes:
 *  - few rows (decode, M <= GEMV_MAX_M_*): a streaming GEMV. Every weight is used M times, so
 *    the time is the time to read W from DRAM once. Our kernel streams W (bf16 or fp32) with
 *    float32 accumulation; each thread takes a contiguous block of output rows.
 *  - many rows (prefill): each thread takes a block of output columns (rows of W) and runs one
 *    single-threaded OpenBLAS sgemm on it; bf16 rows are first widened into the thread's own
 *    float32 panel. Widening is O(Nout*Kin) against the product's O(M*Nout*Kin).
 * The GEMV and the conversions have AVX-512, AVX2+FMA and portable C kernels, chosen at run
 * time in that order (bm_cpu_has_avx512(), bm_cpu_has_avx2(); simd_level() below). The
 * float64 reference is blackmamba/ref.py linear; tests in tests/test_gemm.py, measurements in
 * benchmarks/bench_cpu_ops.py and dev/cpu/.
 */
#include "bm.h"

#include <cblas.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define BM_X86 1
#endif

/* Largest M served by the GEMV kernels. At M rows each weight costs M FMAs and the kernel
 * re-reads all of x for every weight row; past these M, sgemm (blocked for the caches) is as
 * fast or faster. Measured on Zen 4 with dev/cpu/bench_gemm.c (cross mode). */
#define GEMV_MAX_M_BF16 16
#define GEMV_MAX_M_F32 8
/* Below this many weights a GEMV runs on one thread: waking the second thread costs more
 * than the few microseconds of streaming it would save. */
#define GEMV_PAR_MIN_ELEMS (1 << 16)
/* Below this many multiply-adds a GEMM runs on one thread. */
#define GEMM_PAR_MIN_MACS 1e6
/* Float32 scratch per thread for a bf16 panel (bytes): big enough that each sgemm call has a
 * wide N, small enough that all threads' panels stay in L3 (32 MiB here) and under glibc's
 * mmap threshold, so the buffer is recycled between calls instead of page-faulted in. */
#ifndef PANEL_BYTES /* (-D for dev/cpu experiments) */
#define PANEL_BYTES (8u << 20)
#endif

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Which kernels run: 2 AVX-512, 1 AVX2+FMA, 0 portable C. Asked once per call, outside the
 * parallel regions (the environment overrides are read at every call). */
enum { LEVEL_C = 0, LEVEL_AVX2 = 1, LEVEL_AVX512 = 2 };
static int simd_level(void) {
    return bm_cpu_has_avx512() ? LEVEL_AVX512 : bm_cpu_has_avx2() ? LEVEL_AVX2 : LEVEL_C;
}

/* ---- float32 <-> bfloat16 --------------------------------------------------------------- */

/* Portable and AVX-512 kernels of one thread; the public functions split big arrays across
 * threads. f32 -> bf16 rounds with integer arithmetic rather than vcvtneps2bf16, which
 * flushes denormals to zero. */
static void widen_c(const uint16_t *src, float *dst, int64_t n) {
    uint32_t *d = (uint32_t *)dst;
    for (int64_t i = 0; i < n; i++) d[i] = (uint32_t)src[i] << 16;
}

static void narrow_c(const float *src, uint16_t *dst, int64_t n) {
    const uint32_t *s = (const uint32_t *)src;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = s[i];
        if ((u & 0x7fffffffu) > 0x7f800000u) dst[i] = (uint16_t)((u >> 16) | 0x40); /* NaN */
        else dst[i] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
}

#ifdef BM_X86
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

AVX512 static void widen_avx512(const uint16_t *src, float *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(src + i)));
        _mm512_storeu_si512(dst + i, _mm512_slli_epi32(v, 16));
    }
    widen_c(src + i, dst + i, n - i);
}

AVX512 static void narrow_avx512(const float *src, uint16_t *dst, int64_t n) {
    const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
    const __m512i abs = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
    const __m512i quiet = _mm512_set1_epi32(0x40);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i u = _mm512_loadu_si512(src + i);
        __m512i hi = _mm512_srli_epi32(u, 16);
        __m512i r = _mm512_srli_epi32(
            _mm512_add_epi32(_mm512_add_epi32(u, bias), _mm512_and_si512(hi, one)), 16);
        __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs), inf);
        r = _mm512_mask_or_epi32(r, nan, hi, quiet);
        _mm256_storeu_si256((__m256i *)(dst + i), _mm512_cvtepi32_epi16(r));
    }
    narrow_c(src + i, dst + i, n - i);
}

/* AVX2 twins of the two conversions (8 lanes; same integer arithmetic, same results). */
#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static void widen_avx2(const uint16_t *src, float *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + i)));
        _mm256_storeu_si256((__m256i *)(dst + i), _mm256_slli_epi32(v, 16));
    }
    widen_c(src + i, dst + i, n - i);
}

AVX2 static void narrow_avx2(const float *src, uint16_t *dst, int64_t n) {
    const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff);
    const __m256i abs = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    const __m256i quiet = _mm256_set1_epi32(0x40);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i u = _mm256_loadu_si256((const __m256i *)(src + i));
        __m256i hi = _mm256_srli_epi32(u, 16);
        __m256i r = _mm256_srli_epi32(
            _mm256_add_epi32(_mm256_add_epi32(u, bias), _mm256_and_si256(hi, one)), 16);
        /* |u| and inf are below 2^31, so the signed compare is the unsigned one */
        __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs), inf);
        r = _mm256_blendv_epi8(r, _mm256_or_si256(hi, quiet), nan);
        /* r < 2^16: packus is exact; it packs within 128-bit lanes, the permute restores order */
        __m256i pk = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_castsi256_si128(pk));
    }
    narrow_c(src + i, dst + i, n - i);
}
#endif

/* Elements per thread-chunk of a conversion: below ~1 MB the threads cost more than they
 * save. */
#define CONVERT_CHUNK (1 << 18)

static void widen(const uint16_t *src, float *dst, int64_t n, int level) {
#ifdef BM_X86
    if (level == LEVEL_AVX512) { widen_avx512(src, dst, n); return; }
    if (level == LEVEL_AVX2) { widen_avx2(src, dst, n); return; }
#endif
    widen_c(src, dst, n);
}

void bm_bf16_to_f32(const uint16_t *src, float *dst, int64_t n) {
    int level = simd_level();
    int64_t chunks = (n + CONVERT_CHUNK - 1) / CONVERT_CHUNK;
    #pragma omp parallel for num_threads(bm_get_num_threads()) schedule(static) if (chunks > 1)
    for (int64_t c = 0; c < chunks; c++)
        widen(src + c * CONVERT_CHUNK, dst + c * CONVERT_CHUNK,
              min64(CONVERT_CHUNK, n - c * CONVERT_CHUNK), level);
}

void bm_f32_to_bf16(const float *src, uint16_t *dst, int64_t n) {
    int level = simd_level();
    int64_t chunks = (n + CONVERT_CHUNK - 1) / CONVERT_CHUNK;
    #pragma omp parallel for num_threads(bm_get_num_threads()) schedule(static) if (chunks > 1)
    for (int64_t c = 0; c < chunks; c++) {
        const float *s = src + c * CONVERT_CHUNK;
        uint16_t *d = dst + c * CONVERT_CHUNK;
        int64_t m = min64(CONVERT_CHUNK, n - c * CONVERT_CHUNK);
#ifdef BM_X86
        if (level == LEVEL_AVX512) { narrow_avx512(s, d, m); continue; }
        if (level == LEVEL_AVX2) { narrow_avx2(s, d, m); continue; }
#endif
        narrow_c(s, d, m);
    }
}

static void add_bias(float *y, const float *bias, int64_t M, int64_t Nout) {
    if (!bias) return;
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < Nout; n++) y[m * Nout + n] += bias[n];
}

/* ---- GEMV: portable kernels ------------------------------------------------------------- */
/* Plain C that gcc -O3 vectorises for the baseline ISA (SSE2 on x86-64, NEON on aarch64),
 * checked with -fopt-info-vec-optimized: one loop per weight dtype (a dtype test inside the
 * k loop kept it scalar), bf16 widened by an integer shift and a bit copy, restrict pointers.
 * A float sum over k is a reduction gcc may not reorder without -ffast-math, so the sum is
 * written as GEMV_LANES independent partial sums, a fixed order that maps onto whole vectors
 * (4 registers of 4 lanes on SSE2/NEON) and keeps 4 add chains in flight:
 *   acc[j] = sum over k = j (mod GEMV_LANES), k increasing;
 *   result = acc halved pairwise: acc[j] += acc[j + h] for h = 8, 4, 2, 1.
 * This rounds differently from the AVX-512/AVX2 kernels (other lane counts, FMA); each is
 * tested against the float64 reference. */
#define GEMV_LANES 16

static inline float gemv_lanes_sum(float *acc) {
    for (int h = GEMV_LANES / 2; h > 0; h /= 2)
        for (int j = 0; j < h; j++) acc[j] += acc[j + h];
    return acc[0];
}

/* bf16 -> float32: the 16 bits are the top half of the float */
static inline float bf16_c(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* y[m*Nout] = dot(w, x row m) for m < MB: w (Kin) fp32 or bf16 (BF16, like MB, a constant at
 * each call site, so each instance has one loop without branches), x (MB, Kin). The MB x rows
 * share each widened weight; every row keeps its own GEMV_LANES sums, so its result does not
 * depend on MB. */
static inline __attribute__((always_inline)) void dot_rows_c(const void *restrict w, int BF16,
                                                             const float *restrict x,
                                                             float *restrict y, int64_t Nout,
                                                             int64_t Kin, int MB) {
    const float *restrict wf = (const float *)w;
    const uint16_t *restrict wh = (const uint16_t *)w;
    float acc[4][GEMV_LANES] = {{0}};
    int64_t k = 0;
    for (; k + GEMV_LANES <= Kin; k += GEMV_LANES)
        for (int j = 0; j < GEMV_LANES; j++) {
            const float wk = BF16 ? bf16_c(wh[k + j]) : wf[k + j];
            for (int m = 0; m < MB; m++) acc[m][j] += wk * x[m * Kin + k + j];
        }
    for (int j = 0; k < Kin; k++, j++) {
        const float wk = BF16 ? bf16_c(wh[k]) : wf[k];
        for (int m = 0; m < MB; m++) acc[m][j] += wk * x[m * Kin + k];
    }
    for (int m = 0; m < MB; m++) y[m * Nout] = gemv_lanes_sum(acc[m]);
}

/* y[m*Nout + n] for n in [n0, n1), all m < M. x (M, Kin); W (Nout, Kin) of `wdtype`. One
 * weight row at a time (one sequential stream per thread), in groups of up to 4 x rows;
 * the row is re-read from L1 for every group. */
static void gemv_rows_c(const float *x, const void *W, bm_dtype wdtype, float *y, int64_t M,
                        int64_t Nout, int64_t Kin, int64_t n0, int64_t n1) {
#define DOT_C(BF16, T, MB)                                                                     \
    dot_rows_c((const T *)W + n * Kin, BF16, x + m * Kin, y + m * Nout + n, Nout, Kin, MB)
    if (wdtype == BM_BF16)
        for (int64_t n = n0; n < n1; n++)
            for (int64_t m = 0; m < M; m += 4) switch (min64(M - m, 4)) {
                case 1: DOT_C(1, uint16_t, 1); break;
                case 2: DOT_C(1, uint16_t, 2); break;
                case 3: DOT_C(1, uint16_t, 3); break;
                default: DOT_C(1, uint16_t, 4); break;
                }
    else
        for (int64_t n = n0; n < n1; n++)
            for (int64_t m = 0; m < M; m += 4) switch (min64(M - m, 4)) {
                case 1: DOT_C(0, float, 1); break;
                case 2: DOT_C(0, float, 2); break;
                case 3: DOT_C(0, float, 3); break;
                default: DOT_C(0, float, 4); break;
                }
#undef DOT_C
}

/* ---- GEMV: AVX-512 kernels -------------------------------------------------------------- */
#ifdef BM_X86
#define KERNEL static inline __attribute__((always_inline)) AVX512

/* One weight row at a time, start to end, so that each thread reads one sequential stream:
 * measured on Zen 4, interleaving 2 or 4 rows (to share x loads) or adding software
 * prefetches lost 10-40% of the bandwidth the hardware prefetcher gets from one stream
 * (dev/cpu/gemv_variants.c). A row of W is at most a few KiB, so when M > 4 the next group
 * of x rows re-reads it from L1.
 *
 * bf16: one 64-byte load holds 32 weights; as 16 uint32 lanes, lane j = w[2j+1]:w[2j].
 * `lane << 16` is w[2j] as float32 and `lane & 0xffff0000` is w[2j+1]: two integer ops
 * widen 32 weights. x is pre-shuffled to match (xp below), so no cross-lane shuffles. */

/* xp (M, Kp), Kp = 32*ceil(Kin/32): per block of 32 the 16 even-index x then the 16 odd
 * ones; the padding is zero (masked weight loads read zeros there too). */
AVX512 static void shuffle_x_bf16(const float *x, float *xp, int64_t M, int64_t Kin,
                                  int64_t Kp) {
    const __m512i even =
        _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * Kin;
        float *pm = xp + m * Kp;
        for (int64_t k = 0; k < Kp; k += 32) {
            int64_t left = Kin - k; /* > 0: Kp - Kin < 32 */
            __mmask16 m0 = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
            __mmask16 m1 = left >= 32   ? 0xffff
                           : left <= 16 ? 0
                                        : (__mmask16)((1u << (left - 16)) - 1);
            __m512 a = _mm512_maskz_loadu_ps(m0, xm + k);
            __m512 b = _mm512_maskz_loadu_ps(m1, xm + k + 16);
            _mm512_storeu_ps(pm + k, _mm512_permutex2var_ps(a, even, b));
            _mm512_storeu_ps(pm + k + 16, _mm512_permutex2var_ps(a, odd, b));
        }
    }
}

/* One 32-weight block of R rows at column k into acc; mk masks the last, partial block. */
KERNEL void bf16_block(const uint16_t *W, int64_t Kin, const float *xp, int64_t Kp, int64_t k,
                       __mmask32 mk, int R, int MB, __m512 acc[2][4][2]) {
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    __m512 we[2], wo[2];
    for (int r = 0; r < R; r++) {
        __m512i w = mk == (__mmask32)~0u ? _mm512_loadu_si512(W + r * Kin + k)
                                         : _mm512_maskz_loadu_epi16(mk, W + r * Kin + k);
        we[r] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
        wo[r] = _mm512_castsi512_ps(_mm512_and_si512(w, hi));
    }
    for (int m = 0; m < MB; m++) {
        __m512 xe = _mm512_loadu_ps(xp + m * Kp + k), xo = _mm512_loadu_ps(xp + m * Kp + k + 16);
        for (int r = 0; r < R; r++) {
            acc[r][m][0] = _mm512_fmadd_ps(we[r], xe, acc[r][m][0]);
            acc[r][m][1] = _mm512_fmadd_ps(wo[r], xo, acc[r][m][1]);
        }
    }
}

/* y[r + m*Nout] for r < R, m < MB = dot(W row r, x row m); W rows r are Kin apart; xp (MB, Kp)
 * shuffled. Even and odd halves go to separate accumulators. R = 1 steps 64 weights (two
 * cache lines) with two accumulator sets: few instructions per line, so the out-of-order
 * window covers more lines in flight (bf16 carries twice the work of fp32 per line; with one
 * block per step and the tail mask in the loop it streamed ~15% slower than fp32 at Kin=2944).
 * R = 2 (used when M > 4, where the kernel is bound by loads of x rather than by DRAM): two
 * rows share each x load (measured in L2 on Zen 4, M = 8: 52 -> 79 GFLOP/s per core; not used
 * for M <= 4, where a second weight stream costs DRAM bandwidth). R and MB are compile-time
 * constants at each call site, so the accumulators live in registers. x is re-read from L1
 * for every weight row: past Kin ~ 4K (over 16 KiB of x per x row) it spills to L2 and the
 * stream slows (Kin = 8192: ~60% of the fp32 kernel's rate; column chunks over blocks of rows
 * measured worse still). The released shapes have Kin <= 3872. */
KERNEL void bf16_rows(const uint16_t *W, const float *xp, float *y, int64_t Nout, int64_t Kin,
                      int64_t Kp, int R, int MB) {
    __m512 a[2][4][2], b[2][4][2]; /* b: the second block of a 64-step (R = 1) */
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++)
            a[r][m][0] = a[r][m][1] = b[r][m][0] = b[r][m][1] = _mm512_setzero_ps();
    const __mmask32 all = (__mmask32)~0u;
    int64_t k = 0;
    if (R == 1)
        for (; k + 64 <= Kin; k += 64) {
            bf16_block(W, Kin, xp, Kp, k, all, R, MB, a);
            bf16_block(W, Kin, xp, Kp, k + 32, all, R, MB, b);
        }
    for (; k + 32 <= Kin; k += 32) bf16_block(W, Kin, xp, Kp, k, all, R, MB, a);
    if (k < Kin) bf16_block(W, Kin, xp, Kp, k, (__mmask32)((1ull << (Kin - k)) - 1), R, MB, a);
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++)
            y[r + m * Nout] = _mm512_reduce_add_ps(_mm512_add_ps(
                _mm512_add_ps(a[r][m][0], a[r][m][1]), _mm512_add_ps(b[r][m][0], b[r][m][1])));
}

/* fp32: two 16-wide blocks (one 128-byte step) into separate accumulators. */
KERNEL void f32_row(const float *W, const float *x, float *y, int64_t Nout, int64_t Kin, int MB) {
    __m512 a0[4], a1[4];
    for (int m = 0; m < MB; m++) a0[m] = a1[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= Kin; k += 32) {
        __m512 w0 = _mm512_loadu_ps(W + k), w1 = _mm512_loadu_ps(W + k + 16);
        for (int m = 0; m < MB; m++) {
            a0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * Kin + k), a0[m]);
            a1[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * Kin + k + 16), a1[m]);
        }
    }
    for (; k < Kin; k += 16) {
        __mmask16 mk = Kin - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (Kin - k)) - 1);
        __m512 w0 = _mm512_maskz_loadu_ps(mk, W + k);
        for (int m = 0; m < MB; m++)
            a0[m] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(mk, x + m * Kin + k), a0[m]);
    }
    for (int m = 0; m < MB; m++) y[m * Nout] = _mm512_reduce_add_ps(_mm512_add_ps(a0[m], a1[m]));
}

/* y (M, Nout) for rows n in [n0, n1), in groups of up to 4 x rows (MB instantiated 1..4). */
#define FOR_ROWS_AND_GROUPS(CALL)                                                              \
    for (; n < n1; n++)                                                                        \
        for (int64_t m = 0; m < M; m += 4) switch (min64(M - m, 4)) {                          \
            case 1: CALL(1); break;                                                            \
            case 2: CALL(2); break;                                                            \
            case 3: CALL(3); break;                                                            \
            default: CALL(4); break;                                                           \
            }

/* xp (M, Kp) shuffled; W (Nout, Kin) bf16 */
AVX512 static void gemv_rows_bf16_avx512(const float *xp, const uint16_t *W, float *y, int64_t M,
                                         int64_t Nout, int64_t Kin, int64_t Kp, int64_t n0,
                                         int64_t n1) {
    int64_t n = n0;
#define CALL_BF16_2(MB) bf16_rows(W + n * Kin, xp + m * Kp, y + m * Nout + n, Nout, Kin, Kp, 2, MB)
#define CALL_BF16(MB) bf16_rows(W + n * Kin, xp + m * Kp, y + m * Nout + n, Nout, Kin, Kp, 1, MB)
    if (M > 4) /* x no longer fits L1 with the weight row: share its loads between 2 rows */
        for (; n + 2 <= n1; n += 2)
            for (int64_t m = 0; m < M; m += 4) switch (min64(M - m, 4)) {
                case 1: CALL_BF16_2(1); break;
                case 2: CALL_BF16_2(2); break;
                case 3: CALL_BF16_2(3); break;
                default: CALL_BF16_2(4); break;
                }
    FOR_ROWS_AND_GROUPS(CALL_BF16)
#undef CALL_BF16
#undef CALL_BF16_2
}

/* x (M, Kin); W (Nout, Kin) fp32 */
AVX512 static void gemv_rows_f32_avx512(const float *x, const float *W, float *y, int64_t M,
                                        int64_t Nout, int64_t Kin, int64_t n0, int64_t n1) {
    int64_t n = n0;
#define CALL_F32(MB) f32_row(W + n * Kin, x + m * Kin, y + m * Nout + n, Nout, Kin, MB)
    FOR_ROWS_AND_GROUPS(CALL_F32)
#undef CALL_F32
}

/* ---- GEMV: AVX2+FMA kernels ------------------------------------------------------------- */
/* The AVX-512 layout in 8 lanes, without the x shuffle: vpmovzxwd widens 8 bf16 to 8 uint32
 * in order and `<< 16` makes them float32, so x is used as it is. One weight row at a time
 * (one sequential stream per thread, as above), 32 weights (one cache line of bf16, 4 ymm)
 * per step. MB = 1 (decode) keeps 4 accumulators, so the 4-cycle FMA chains never wait on
 * each other; MB > 1 has MB independent chains already and keeps 2 per x row (16 ymm
 * registers: 8 accumulators, 4 weights, the x loads). */
#define KERNEL2 static inline __attribute__((always_inline)) AVX2

KERNEL2 __m256 load_bf16x8(const uint16_t *w) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)w));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

KERNEL2 float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* y[m*Nout] = dot(W row, x row m) for m < MB; W (Kin) bf16 or fp32 (BF16 constant at each
 * call site); x (MB, Kin). The last Kin % 8 weights are summed in scalar. */
KERNEL2 void row_avx2(const void *W, int BF16, const float *x, float *y, int64_t Nout,
                      int64_t Kin, int MB) {
    const int NA = MB == 1 ? 4 : 2;
    const uint16_t *wh = (const uint16_t *)W;
    const float *wf = (const float *)W;
    __m256 acc[4][4];
    for (int m = 0; m < MB; m++)
        for (int j = 0; j < NA; j++) acc[m][j] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= Kin; k += 32) {
        __m256 w[4];
        for (int j = 0; j < 4; j++)
            w[j] = BF16 ? load_bf16x8(wh + k + 8 * j) : _mm256_loadu_ps(wf + k + 8 * j);
        for (int m = 0; m < MB; m++)
            for (int j = 0; j < 4; j++)
                acc[m][j % NA] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(x + m * Kin + k + 8 * j),
                                                 acc[m][j % NA]);
    }
    for (; k + 8 <= Kin; k += 8) {
        __m256 w = BF16 ? load_bf16x8(wh + k) : _mm256_loadu_ps(wf + k);
        for (int m = 0; m < MB; m++)
            acc[m][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * Kin + k), acc[m][0]);
    }
    for (int m = 0; m < MB; m++) {
        __m256 a = acc[m][0];
        for (int j = 1; j < NA; j++) a = _mm256_add_ps(a, acc[m][j]);
        float t = 0.0f;
        for (int64_t kk = k; kk < Kin; kk++) {
            float w;
            if (BF16) {
                uint32_t u = (uint32_t)wh[kk] << 16;
                memcpy(&w, &u, 4);
            } else {
                w = wf[kk];
            }
            t += w * x[m * Kin + kk];
        }
        y[m * Nout] = hsum8(a) + t;
    }
}

/* x (M, Kin); W (Nout, Kin) bf16 or fp32 */
AVX2 static void gemv_rows_bf16_avx2(const float *x, const uint16_t *W, float *y, int64_t M,
                                     int64_t Nout, int64_t Kin, int64_t n0, int64_t n1) {
    int64_t n = n0;
#define CALL_BF16(MB) row_avx2(W + n * Kin, 1, x + m * Kin, y + m * Nout + n, Nout, Kin, MB)
    FOR_ROWS_AND_GROUPS(CALL_BF16)
#undef CALL_BF16
}

AVX2 static void gemv_rows_f32_avx2(const float *x, const float *W, float *y, int64_t M,
                                    int64_t Nout, int64_t Kin, int64_t n0, int64_t n1) {
    int64_t n = n0;
#define CALL_F32(MB) row_avx2(W + n * Kin, 0, x + m * Kin, y + m * Nout + n, Nout, Kin, MB)
    FOR_ROWS_AND_GROUPS(CALL_F32)
#undef CALL_F32
}
#endif /* BM_X86 */

/* ---- GEMV driver ------------------------------------------------------------------------ */

static bm_status gemv(const float *x, const void *W, bm_dtype wdtype, float *y, int64_t M,
                      int64_t Nout, int64_t Kin) {
    int nt = Nout * Kin < GEMV_PAR_MIN_ELEMS ? 1 : bm_get_num_threads();
    if (nt > Nout) nt = (int)Nout;
    int level = simd_level();
    const float *xs = x;
    float *xp = NULL;
    int64_t Kp = (Kin + 31) / 32 * 32;
#ifdef BM_X86
    if (level == LEVEL_AVX512 && wdtype == BM_BF16) {
        xp = malloc(sizeof(float) * (size_t)(M * Kp));
        if (!xp) return BM_ERR_NOMEM;
        shuffle_x_bf16(x, xp, M, Kin, Kp);
        xs = xp;
    }
#endif
    /* one contiguous block of output rows per thread: one sequential stream of W each */
    #pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
        int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
        int t = 0, T = 1;
#endif
        int64_t n0 = Nout * t / T, n1 = Nout * (t + 1) / T;
#ifdef BM_X86
        if (level == LEVEL_AVX512 && wdtype == BM_BF16)
            gemv_rows_bf16_avx512(xs, (const uint16_t *)W, y, M, Nout, Kin, Kp, n0, n1);
        else if (level == LEVEL_AVX512)
            gemv_rows_f32_avx512(xs, (const float *)W, y, M, Nout, Kin, n0, n1);
        else if (level == LEVEL_AVX2 && wdtype == BM_BF16)
            gemv_rows_bf16_avx2(xs, (const uint16_t *)W, y, M, Nout, Kin, n0, n1);
        else if (level == LEVEL_AVX2)
            gemv_rows_f32_avx2(xs, (const float *)W, y, M, Nout, Kin, n0, n1);
        else
#endif
            gemv_rows_c(xs, W, wdtype, y, M, Nout, Kin, n0, n1);
    }
    free(xp);
    return BM_OK;
}

/* ---- many rows: one sgemm per thread on its block of output columns ---------------------- */

/* y[m0:m1, n0:n1] = x[m0:m1] @ W[n0:n1]^T on the calling thread. OpenBLAS is single-threaded
 * (cpu.c): our OpenMP team is the only parallel layer, so the cores are never fought over by
 * two thread pools (OpenBLAS's idle workers spin for milliseconds after each call, and ours
 * after each region; alternating the two halved sgemm throughput on 2 cores). bf16 rows are
 * widened panel by panel into this thread's float32 scratch first: O(Nout*Kin) work against
 * the product's O(M*Nout*Kin). x (M, Kin); W (Nout, Kin); y (M, Nout). */
static bm_status gemm_block(const float *x, const void *W, bm_dtype wdtype, float *y, int64_t M,
                            int64_t Nout, int64_t Kin, int64_t m0, int64_t m1, int64_t n0,
                            int64_t n1, int level) {
    const float *xb = x + m0 * Kin;
    float *yb = y + m0 * Nout;
    if (m0 >= m1 || n0 >= n1) return BM_OK;
    if (wdtype == BM_F32) {
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)(m1 - m0), (int)(n1 - n0),
                          (int)Kin, 1.0f, xb, (int)Kin, (const float *)W + n0 * Kin, (int)Kin,
                          0.0f, yb + n0, (int)Nout);
        return BM_OK;
    }
    int64_t P = (int64_t)PANEL_BYTES / (int64_t)(sizeof(float) * Kin);
    if (P < 16) P = 16;
    if (P > n1 - n0) P = n1 - n0;
    float *panel = malloc(sizeof(float) * (size_t)(P * Kin)); /* (P, Kin) */
    if (!panel) return BM_ERR_NOMEM;
    for (int64_t p0 = n0; p0 < n1; p0 += P) {
        int64_t np = min64(P, n1 - p0);
        widen((const uint16_t *)W + p0 * Kin, panel, np * Kin, level); /* rows contiguous */
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)(m1 - m0), (int)np,
                          (int)Kin, 1.0f, xb, (int)Kin, panel, (int)Kin, 0.0f, yb + p0,
                          (int)Nout);
    }
    free(panel);
    return BM_OK;
}

/* Split the output columns (rows of W) across threads when there are enough of them for every
 * thread to run a wide sgemm, else the rows of x. */
static bm_status gemm(const float *x, const void *W, bm_dtype wdtype, float *y, int64_t M,
                      int64_t Nout, int64_t Kin) {
    int nt = bm_get_num_threads();
    if ((double)M * (double)Nout * (double)Kin < GEMM_PAR_MIN_MACS) nt = 1;
    int split_n = Nout >= 64 * (int64_t)nt;
    int level = simd_level();
    bm_status st = BM_OK;
    #pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
        int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
        int t = 0, T = 1;
#endif
        int64_t m0 = 0, m1 = M, n0 = 0, n1 = Nout;
        if (split_n) n0 = Nout * t / T, n1 = Nout * (t + 1) / T;
        else m0 = M * t / T, m1 = M * (t + 1) / T;
        bm_status s = gemm_block(x, W, wdtype, y, M, Nout, Kin, m0, m1, n0, n1, level);
        if (s != BM_OK) {
            #pragma omp critical(bm_gemm_status)
            st = s;
        }
    }
    return st;
}

bm_status bm_linear(const float *x, const void *W, bm_dtype wdtype, const float *bias,
                    float *y, int64_t M, int64_t Nout, int64_t Kin) {
    if (wdtype != BM_F32 && wdtype != BM_BF16) return BM_ERR_ARG;
    if (M <= 0 || Nout <= 0) return BM_OK;
    if (Kin <= 0) {
        memset(y, 0, sizeof(float) * (size_t)(M * Nout));
        add_bias(y, bias, M, Nout);
        return BM_OK;
    }
    bm_status st = BM_OK;
    if (M <= (wdtype == BM_BF16 ? GEMV_MAX_M_BF16 : GEMV_MAX_M_F32))
        st = gemv(x, W, wdtype, y, M, Nout, Kin);
    else
        st = gemm(x, W, wdtype, y, M, Nout, Kin);
    if (st == BM_OK) add_bias(y, bias, M, Nout);
    return st;
}
