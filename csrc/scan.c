/* scan.c: Mamba-1 selective scan (SPEC 2), prefill and one-token decode.
 *
 *   dt[t,e]  = softplus(delta[t,e] + delta_bias[e])          (or delta + bias as is)
 *   h[e,n]   = exp(dt[t,e] * A[e,n]) * h[e,n] + dt[t,e] * B[t,n] * u[t,e]
 *   y[t,e]   = (sum_n h[e,n] * C[t,n] + D[e] * u[t,e]) * silu(z[t,e])
 *
 * Reference: blackmamba/ref.py selective_scan / selective_state_update (float64).
 * Letters: b batch, L tokens, E channels, N state size. Token-major layout: u, delta, z, y
 * are (b, L, E), B and C (b, L, N), A (E, N), the state (b, E, N). Everything float32.
 *
 * Work is split over (batch, block of SCAN_BLOCK channels). Each block walks the L tokens
 * in order with its state in a private buffer; the recurrence is sequential in t, but the
 * blocks are independent, so there is no reduction across threads and the result does not
 * depend on the thread count. The decode step is this same code with L = 1, so stepping
 * token by token gives bit-for-bit the prefill result (and so does chaining two prefills).
 *
 * Three paths, picked at run time (bm_cpu_has_avx512, then bm_cpu_has_avx2):
 *   portable: plain C in the vector paths' layout (16 channels as lanes) and with their
 *            polynomials, written so that gcc vectorises it for the baseline ISA (SSE2 on
 *            x86-64, NEON on aarch64); no FMA, so it rounds a little differently.
 *   AVX-512: 16 channels in one zmm (token-major makes u/delta/z at one t contiguous in e),
 *            the block's state held transposed, h[n] = 16 channels of state n; for N = 16
 *            all of it stays in registers. exp comes from vreduceps/vscalefps plus a
 *            degree-6 polynomial (~1.5 ulp), softplus from that exp and an atanh series.
 *   AVX2:    the same code in 8 lanes, a 16-channel block held as two groups of 8 (so the
 *            work split, and with it the thread independence, is the same). AVX2 has no
 *            vreduceps/vscalefps: x - round(x) is exact anyway, and 2^k is applied as two
 *            exact power-of-two factors, so the twins give the AVX-512 results bit for bit
 *            (the same polynomial, the same FMAs in the same order).
 */
#include "bm.h"

#include <math.h>
#include <string.h>

#include "act.h" /* f_as, u_as, sel: bit casts and a branch-free select */

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SCAN_X86 1
#endif

#define SCAN_BLOCK 16   /* channels per work item = floats in one zmm */
#define SCAN_MAX_N 256  /* largest state size (mamba_ssm's CUDA limit); SPEC needs 64 */
#define SCAN_PREFETCH 4  /* tokens ahead: a block's rows are E floats apart, often a new page
                          * each, which the hardware prefetchers do not follow (2x at L=2048) */

typedef struct {
    const float *u;          /* (b, L, E) */
    const float *delta;      /* (b, L, E) */
    const float *A;          /* (E, N) */
    const float *Bm, *Cm;    /* (b, L, N) */
    const float *D;          /* (E) or NULL */
    const float *z;          /* (b, L, E) or NULL */
    const float *delta_bias; /* (E) or NULL */
    const float *state_in;   /* (b, E, N) or NULL = zeros */
    float *state_out;        /* (b, E, N) or NULL; may equal state_in */
    float *y;                /* (b, L, E) */
    int64_t L, E, N;
    int delta_softplus;
} scan_params;

/* ---- portable path ---------------------------------------------------------------------- */
/* Plain C that gcc -O3 vectorises for the baseline ISA (SSE2 on x86-64, NEON on aarch64),
 * laid out as the vector paths are: a block's 16 channels are the lanes (the state held
 * transposed, h[n][j] = state n of channel e0 + j), so every loop over j is elementwise and
 * each channel's sum over n keeps its sequential order (a sum across lanes would be a
 * reduction that gcc may not reorder). Lanes >= w hold zeros and are never stored.
 * The transcendentals are the vector paths' polynomials in scalar form (libm's expf/log1pf
 * are calls, which block vectorisation), written branch-free with sel() from act.h. No
 * fmaf(): on baseline x86-64 it is a library call; a * b + c is left to the compiler, which
 * under -std=c11 does not contract it, so this path rounds each product and sum separately
 * and differs from the FMA paths in the last bits (each is tested against float64). */
#define PORT_INLINE static inline __attribute__((always_inline))
#define ROUND_MAGIC 12582912.0f /* 1.5 * 2^23: x + it - it rounds x to an integer (|x| < 2^22) */

/* exp2_poly_avx512's polynomial: 2^f for f in [-1/2, 1/2] */
PORT_INLINE float exp2_poly_c(float f) {
    float q = 1.535335031803697e-4f;
    q = q * f + 1.3398875016719103e-3f;
    q = q * f + 9.618437848985195e-3f;
    q = q * f + 5.5503323674201965e-2f;
    q = q * f + 2.4022647738456726e-1f;
    q = q * f + 6.931471824645996e-1f;
    return q * f + 1.0f;
}

/* p * 2^k, k integral in [-160, 150] given as the bits of k + ROUND_MAGIC (t): scale2_avx2 in
 * scalar, k = k1 + k2 with 2^k1 and 2^k2 normal, so p * 2^k1 is exact and the second product
 * rounds once (to a denormal, 0 or inf at the ends of the range). Unsigned arithmetic: a NaN's
 * garbage k must not overflow (the result is NaN through p anyway). */
PORT_INLINE float scale2_c(float p, float t) {
    uint32_t k = u_as(t) - u_as(ROUND_MAGIC);
    uint32_t k1 = (uint32_t)((int32_t)k >> 1), k2 = k - k1;
    return p * f_as((k1 + 127u) << 23) * f_as((k2 + 127u) << 23);
}

/* 2^x, exp2_avx2 in scalar: the clamp stands in for vscalefps's saturation (2^-150 rounds to
 * 0, 2^129 is inf); sel() on a comparison keeps a NaN x. */
PORT_INLINE float exp2_c(float x) {
    x = sel(x > 129.0f, 129.0f, x);
    x = sel(x < -150.0f, -150.0f, x);
    float t = x + ROUND_MAGIC;
    return scale2_c(exp2_poly_c(x - (t - ROUND_MAGIC)), t);
}

/* e^v, exp_avx2 in scalar: k = round(v log2 e), r = v - k ln 2 in two parts (k * 0.693359375
 * is exact for |k| < 2^15), e^r = 2^(r log2 e). */
PORT_INLINE float exp_c(float v) {
    v = sel(v < -110.0f, -110.0f, v);
    v = sel(v > 100.0f, 100.0f, v);
    float t = v * 1.44269504088896341f + ROUND_MAGIC;
    float k = t - ROUND_MAGIC;
    float r = v - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    return scale2_c(exp2_poly_c(r * 1.44269504088896341f), t);
}

/* softplus_avx512 in scalar: v for v > 20, else max(v, 0) + log1p(e^-|v|), the log1p as
 * 2 atanh(s), s = w / (2 + w). A NaN v fails both comparisons and stays NaN. */
PORT_INLINE float softplus_c(float v) {
    float w = exp_c(f_as(u_as(v) | 0x80000000u)); /* e^-|v| */
    float s = w / (w + 2.0f);
    float s2 = s * s;
    float q = 0.14006000757217407f;
    q = q * s2 + 0.14000901579856873f;
    q = q * s2 + 0.2001076340675354f;
    q = q * s2 + 0.3333320915699005f;
    float two_s = s + s;
    float l = (two_s * s2) * q + two_s;
    return sel(v > 20.0f, v, sel(v < 0.0f, 0.0f, v) + l);
}

/* z / (1 + e^-z): z = -inf gives -inf / inf = NaN, as the reference's -inf * 0 */
PORT_INLINE float silu_c(float z) { return z / (1.0f + exp_c(-z)); }

/* Channels [e0, e0 + w), w <= 16, of batch bi. N is a compile-time 16 in the specialised
 * caller below (the n loop unrolls); the state and A2 live on the stack, in L1. */
PORT_INLINE void scan_block_c_body(const scan_params *p, int64_t bi, int64_t e0, int w,
                                   const int64_t N) {
    enum { W = SCAN_BLOCK };
    const int64_t L = p->L, E = p->E;
    /* A2 = A * log2(e), so that exp(dt A) = 2^(dt A2), as on the vector paths */
    float A2[SCAN_MAX_N][W]; /* (N, 16): A[e0 + j, n] * log2 e */
    float h[SCAN_MAX_N][W];  /* (N, 16): state n of channel e0 + j */
    float Dv[W] = {0}, bias[W] = {0};
    const float *Ablk = p->A + e0 * N;                                        /* (w, N) */
    const float *Sblk = p->state_in ? p->state_in + (bi * E + e0) * N : NULL; /* (w, N) */
    for (int64_t n = 0; n < N; n++)
        for (int j = 0; j < W; j++) {
            A2[n][j] = j < w ? Ablk[j * N + n] * 1.44269504088896341f : 0.0f;
            h[n][j] = j < w && Sblk ? Sblk[j * N + n] : 0.0f;
        }
    if (p->D) memcpy(Dv, p->D + e0, sizeof(float) * (size_t)w);
    if (p->delta_bias) memcpy(bias, p->delta_bias + e0, sizeof(float) * (size_t)w);

    for (int64_t t = 0; t < L; t++) {
        const int64_t row = (bi * L + t) * E + e0;  /* token (bi, t), channel e0 */
        const float *Bt = p->Bm + (bi * L + t) * N; /* (N) */
        const float *Ct = p->Cm + (bi * L + t) * N; /* (N) */
        if (t + SCAN_PREFETCH < L) { /* as on the vector paths: rows E floats apart */
            const int64_t a0 = row + SCAN_PREFETCH * E, a1 = a0 + w - 1;
            __builtin_prefetch(p->u + a0), __builtin_prefetch(p->u + a1);
            __builtin_prefetch(p->delta + a0), __builtin_prefetch(p->delta + a1);
            if (p->z) __builtin_prefetch(p->z + a0), __builtin_prefetch(p->z + a1);
            __builtin_prefetch(p->y + a0, 1), __builtin_prefetch(p->y + a1, 1);
        }
        float uv[W] = {0}, dt[W] = {0}, du[W], acc[W], yv[W];
        memcpy(uv, p->u + row, sizeof(float) * (size_t)w);
        memcpy(dt, p->delta + row, sizeof(float) * (size_t)w);
        for (int j = 0; j < W; j++) dt[j] += bias[j];
        if (p->delta_softplus)
            for (int j = 0; j < W; j++) dt[j] = softplus_c(dt[j]);
        for (int j = 0; j < W; j++) du[j] = dt[j] * uv[j], acc[j] = 0.0f;
        for (int64_t n = 0; n < N; n++) {
            const float bn = Bt[n], cn = Ct[n];
            for (int j = 0; j < W; j++) {
                h[n][j] = exp2_c(dt[j] * A2[n][j]) * h[n][j] + du[j] * bn;
                acc[j] += h[n][j] * cn;
            }
        }
        if (p->D)
            for (int j = 0; j < W; j++) yv[j] = acc[j] + Dv[j] * uv[j];
        else
            memcpy(yv, acc, sizeof(yv));
        if (p->z) {
            float zv[W] = {0};
            memcpy(zv, p->z + row, sizeof(float) * (size_t)w);
            for (int j = 0; j < W; j++) yv[j] *= silu_c(zv[j]);
        }
        memcpy(p->y + row, yv, sizeof(float) * (size_t)w);
    }

    if (p->state_out) {
        float *Oblk = p->state_out + (bi * E + e0) * N; /* (w, N) */
        for (int64_t n = 0; n < N; n++)
            for (int j = 0; j < w; j++) Oblk[j * N + n] = h[n][j];
    }
}

static void scan_block_c_n16(const scan_params *p, int64_t bi, int64_t e0, int w) {
    scan_block_c_body(p, bi, e0, w, 16);
}

static void scan_block_c(const scan_params *p, int64_t bi, int64_t e0, int w) {
    scan_block_c_body(p, bi, e0, w, p->N);
}

/* ---- AVX-512 path ----------------------------------------------------------------------- */
#ifdef SCAN_X86
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define AVX512_INLINE static inline __attribute__((always_inline)) AVX512

/* 2^f on [-1/2, 1/2]: 1 + f*(c1 + f*(c2 + ...)), minimax for relative error (2.0e-9 in exact
 * arithmetic, ~1.4 ulp after float32 Horner). c0 = 1: near f = 0 the result is 1 + a small
 * correction, accurate to ~0.5 ulp, which matters because dt A near 0 (dA near 1, a long
 * memory) is where a biased error would add up over many tokens. */
AVX512_INLINE __m512 exp2_poly(__m512 f) {
    __m512 q = _mm512_set1_ps(1.535335031803697e-4f);
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(1.3398875016719103e-3f));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(9.618437848985195e-3f));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(5.5503323674201965e-2f));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(2.4022647738456726e-1f));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(6.931471824645996e-1f));
    return _mm512_fmadd_ps(q, f, _mm512_set1_ps(1.0f));
}

/* 2^x for any x: 2^(x - k) * 2^k with k = round(x); vreduceps gives x - k exactly and is 0
 * for +-inf, vscalefps saturates (huge negative k -> 0 through the denormals, huge positive
 * -> inf), so no clamping is needed; NaN stays NaN. */
AVX512_INLINE __m512 exp2_avx512(__m512 x) {
    __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 k = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_scalef_ps(exp2_poly(f), k);
}

/* e^v to ~1.5 ulp: k = round(v log2 e), r = v - k ln2 in two parts (Cephes), e^r = 2^(r log2 e).
 * Used once per (t, e), where the extra precision costs nothing. */
AVX512_INLINE __m512 exp_avx512(__m512 v) {
    v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-110.0f)), _mm512_set1_ps(100.0f));
    __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), v);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 f = _mm512_mul_ps(r, _mm512_set1_ps(1.44269504088896341f));
    return _mm512_scalef_ps(exp2_poly(f), k);
}

/* softplus(v) = v for v > 20, else max(v, 0) + log1p(exp(-|v|)). With w = exp(-|v|) in
 * (0, 1], log1p(w) = 2 atanh(s), s = w / (2 + w) in [0, 1/3]: an odd series with no
 * cancellation; the coefficients are minimax (4.5e-9 relative) in s^2. */
AVX512_INLINE __m512 softplus_avx512(__m512 v) {
    __m512 w = exp_avx512(_mm512_or_ps(v, _mm512_set1_ps(-0.0f)));
    __m512 s = _mm512_div_ps(w, _mm512_add_ps(w, _mm512_set1_ps(2.0f)));
    __m512 s2 = _mm512_mul_ps(s, s);
    __m512 q = _mm512_set1_ps(0.14006000757217407f);
    q = _mm512_fmadd_ps(q, s2, _mm512_set1_ps(0.14000901579856873f));
    q = _mm512_fmadd_ps(q, s2, _mm512_set1_ps(0.2001076340675354f));
    q = _mm512_fmadd_ps(q, s2, _mm512_set1_ps(0.3333320915699005f));
    __m512 two_s = _mm512_add_ps(s, s);
    __m512 l = _mm512_fmadd_ps(_mm512_mul_ps(two_s, s2), q, two_s);
    /* max(0, v), not max(v, 0): x86 max returns its second operand when one is NaN */
    __m512 r = _mm512_add_ps(_mm512_max_ps(_mm512_setzero_ps(), v), l);
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, _mm512_set1_ps(20.0f), _CMP_GT_OQ), r, v);
}

AVX512_INLINE __m512 silu_avx512(__m512 z) {
    __m512 e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), z));
    return _mm512_div_ps(z, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

/* Channels [e0, e0 + w), w <= 16, of batch bi. N is a compile-time 16 in the specialised
 * caller below, which lets the compiler fully unroll the n loop and keep h[] in registers
 * (12% faster than the generic loop at N = 16); elsewhere h[] lives on the stack, in L1. */
AVX512_INLINE void scan_block_avx512_body(const scan_params *p, int64_t bi, int64_t e0, int w,
                                          const int64_t N) {
    const int64_t L = p->L, E = p->E;
    const __mmask16 m = (__mmask16)((1u << w) - 1u);
    /* A2[n] = A[e0:e0+16, n] * log2(e), so that exp(dt A) = 2^(dt A2): one multiply less in
     * the hot loop for one extra rounding of A (relative 2^-24). Lanes >= w are 0. */
    __m512 A2[SCAN_MAX_N]; /* (N) x 16 lanes */
    __m512 h[SCAN_MAX_N];  /* (N) x 16 lanes: state n of the 16 channels */
    /* the block's rows of A and of the state are (16, N): gather column n (stride N) */
    const __m512i col = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32((int)N));
    const float *Ablk = p->A + e0 * N;                                   /* (16, N) */
    const float *Sblk = p->state_in ? p->state_in + (bi * E + e0) * N : NULL; /* (16, N) */
    for (int64_t n = 0; n < N; n++) {
        A2[n] = _mm512_mul_ps(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, col, Ablk + n, 4),
                              _mm512_set1_ps(1.44269504088896341f));
        h[n] = Sblk ? _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, col, Sblk + n, 4)
                    : _mm512_setzero_ps();
    }
    const __m512 Dv = p->D ? _mm512_maskz_loadu_ps(m, p->D + e0) : _mm512_setzero_ps();
    const __m512 biasv =
        p->delta_bias ? _mm512_maskz_loadu_ps(m, p->delta_bias + e0) : _mm512_setzero_ps();

    for (int64_t t = 0; t < L; t++) {
        const int64_t row = (bi * L + t) * E + e0;  /* token (bi, t), channel e0 */
        const float *Bt = p->Bm + (bi * L + t) * N; /* (N) */
        const float *Ct = p->Cm + (bi * L + t) * N; /* (N) */
        if (t + SCAN_PREFETCH < L) {
            /* first and last channel: 16 floats span two cache lines unless 64-byte aligned */
            const int64_t a0 = row + SCAN_PREFETCH * E, a1 = a0 + w - 1;
            _mm_prefetch((const char *)(p->u + a0), _MM_HINT_T0);
            _mm_prefetch((const char *)(p->u + a1), _MM_HINT_T0);
            _mm_prefetch((const char *)(p->delta + a0), _MM_HINT_T0);
            _mm_prefetch((const char *)(p->delta + a1), _MM_HINT_T0);
            if (p->z) {
                _mm_prefetch((const char *)(p->z + a0), _MM_HINT_T0);
                _mm_prefetch((const char *)(p->z + a1), _MM_HINT_T0);
            }
            _mm_prefetch((const char *)(p->y + a0), _MM_HINT_ET0);
            _mm_prefetch((const char *)(p->y + a1), _MM_HINT_ET0);
        }
        const __m512 uv = _mm512_maskz_loadu_ps(m, p->u + row);
        __m512 dt = _mm512_maskz_loadu_ps(m, p->delta + row);
        if (p->delta_bias) dt = _mm512_add_ps(dt, biasv);
        if (p->delta_softplus) dt = softplus_avx512(dt);
        const __m512 du = _mm512_mul_ps(dt, uv);
        /* two accumulators halve the fma latency chain of the sum over n */
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        int64_t n = 0;
#pragma GCC unroll 8
        for (; n + 1 < N; n += 2) {
            __m512 dA0 = exp2_avx512(_mm512_mul_ps(dt, A2[n]));
            __m512 dA1 = exp2_avx512(_mm512_mul_ps(dt, A2[n + 1]));
            h[n] = _mm512_fmadd_ps(dA0, h[n], _mm512_mul_ps(du, _mm512_set1_ps(Bt[n])));
            h[n + 1] =
                _mm512_fmadd_ps(dA1, h[n + 1], _mm512_mul_ps(du, _mm512_set1_ps(Bt[n + 1])));
            acc0 = _mm512_fmadd_ps(h[n], _mm512_set1_ps(Ct[n]), acc0);
            acc1 = _mm512_fmadd_ps(h[n + 1], _mm512_set1_ps(Ct[n + 1]), acc1);
        }
        if (n < N) {
            __m512 dA0 = exp2_avx512(_mm512_mul_ps(dt, A2[n]));
            h[n] = _mm512_fmadd_ps(dA0, h[n], _mm512_mul_ps(du, _mm512_set1_ps(Bt[n])));
            acc0 = _mm512_fmadd_ps(h[n], _mm512_set1_ps(Ct[n]), acc0);
        }
        __m512 yv = _mm512_add_ps(acc0, acc1);
        if (p->D) yv = _mm512_fmadd_ps(Dv, uv, yv);
        if (p->z) yv = _mm512_mul_ps(yv, silu_avx512(_mm512_maskz_loadu_ps(m, p->z + row)));
        _mm512_mask_storeu_ps(p->y + row, m, yv);
    }

    if (p->state_out) {
        float *Oblk = p->state_out + (bi * E + e0) * N; /* (16, N) */
        for (int64_t n = 0; n < N; n++) _mm512_mask_i32scatter_ps(Oblk + n, m, col, h[n], 4);
    }
}

static AVX512 void scan_block_avx512_n16(const scan_params *p, int64_t bi, int64_t e0, int w) {
    scan_block_avx512_body(p, bi, e0, w, 16);
}

static AVX512 void scan_block_avx512(const scan_params *p, int64_t bi, int64_t e0, int w) {
    scan_block_avx512_body(p, bi, e0, w, p->N);
}

/* ---- AVX2 path: the AVX-512 code in 8 lanes --------------------------------------------- */
#define AVX2 __attribute__((target("avx2,fma")))
#define AVX2_INLINE static inline __attribute__((always_inline)) AVX2

AVX2_INLINE __m256 exp2_poly8(__m256 f) {
    __m256 q = _mm256_set1_ps(1.535335031803697e-4f);
    q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(1.3398875016719103e-3f));
    q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(9.618437848985195e-3f));
    q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(5.5503323674201965e-2f));
    q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(2.4022647738456726e-1f));
    q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(6.931471824645996e-1f));
    return _mm256_fmadd_ps(q, f, _mm256_set1_ps(1.0f));
}

/* p * 2^k for integral k in [-160, 150] (callers clamp), as vscalefps does it: k = k1 + k2
 * with both 2^k1 and 2^k2 normal floats, so p * 2^k1 is exact and the second product rounds
 * once, to a denormal, 0 or inf where the result leaves the normal range. */
AVX2_INLINE __m256 scale2_avx2(__m256 p, __m256 k) {
    __m256i ki = _mm256_cvtps_epi32(k);
    __m256i k1 = _mm256_srai_epi32(ki, 1), k2 = _mm256_sub_epi32(ki, k1);
    const __m256i bias = _mm256_set1_epi32(127);
    __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, bias), 23));
    __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k2, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

/* 2^x, the twin of exp2_avx512: the clamp stands in for vscalefps's saturation (2^-150
 * rounds to 0, 2^129 is inf); max(lo, x) and min(hi, .) keep a NaN x (x86 min/max return
 * their second operand when one is NaN), and a NaN p makes the product NaN. */
AVX2_INLINE __m256 exp2_avx2(__m256 x) {
    x = _mm256_min_ps(_mm256_set1_ps(129.0f), _mm256_max_ps(_mm256_set1_ps(-150.0f), x));
    __m256 k = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return scale2_avx2(exp2_poly8(_mm256_sub_ps(x, k)), k);
}

/* the twin of exp_avx512 (its clamp keeps k in [-159, 145]) */
AVX2_INLINE __m256 exp_avx2(__m256 v) {
    v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-110.0f)), _mm256_set1_ps(100.0f));
    __m256 k = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), v);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 f = _mm256_mul_ps(r, _mm256_set1_ps(1.44269504088896341f));
    return scale2_avx2(exp2_poly8(f), k);
}

AVX2_INLINE __m256 softplus_avx2(__m256 v) {
    __m256 w = exp_avx2(_mm256_or_ps(v, _mm256_set1_ps(-0.0f)));
    __m256 s = _mm256_div_ps(w, _mm256_add_ps(w, _mm256_set1_ps(2.0f)));
    __m256 s2 = _mm256_mul_ps(s, s);
    __m256 q = _mm256_set1_ps(0.14006000757217407f);
    q = _mm256_fmadd_ps(q, s2, _mm256_set1_ps(0.14000901579856873f));
    q = _mm256_fmadd_ps(q, s2, _mm256_set1_ps(0.2001076340675354f));
    q = _mm256_fmadd_ps(q, s2, _mm256_set1_ps(0.3333320915699005f));
    __m256 two_s = _mm256_add_ps(s, s);
    __m256 l = _mm256_fmadd_ps(_mm256_mul_ps(two_s, s2), q, two_s);
    __m256 r = _mm256_add_ps(_mm256_max_ps(_mm256_setzero_ps(), v), l);
    return _mm256_blendv_ps(r, v, _mm256_cmp_ps(v, _mm256_set1_ps(20.0f), _CMP_GT_OQ));
}

AVX2_INLINE __m256 silu_avx2(__m256 z) {
    __m256 e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), z));
    return _mm256_div_ps(z, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

/* dt of one token for 8 channels: delta (+ bias), softplus */
AVX2_INLINE __m256 dt_avx2(const scan_params *p, const float *delta, __m256 biasv, __m256i m) {
    __m256 d = _mm256_maskload_ps(delta, m);
    if (p->delta_bias) d = _mm256_add_ps(d, biasv);
    if (p->delta_softplus) d = softplus_avx2(d);
    return d;
}

/* Channels [e0, e0 + w), w <= 16, of batch bi, as two groups of 8 lanes (g), both walked in
 * the same token loop: twice the independent work per token for the out-of-order core, which
 * this loop needs more than AVX-512 does (with dt one token ahead: 1.5 -> 1.8 G/s per thread at N = 16 on Zen 4).
 * Lanes >= w load zeros (vmaskmovps) and are never stored. N is a compile-time 16 in the
 * specialised caller; h[] and A2[] live on the stack (16 ymm registers hold neither). */
AVX2_INLINE void scan_block_avx2_body(const scan_params *p, int64_t bi, int64_t e0, int w,
                                      const int64_t N) {
    const int64_t L = p->L, E = p->E;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i m[2] = {_mm256_cmpgt_epi32(_mm256_set1_epi32(w), lane),
                          _mm256_cmpgt_epi32(_mm256_set1_epi32(w - 8), lane)};
    __m256 A2[SCAN_MAX_N][2]; /* (N, 2) x 8 lanes: A[e0:e0+16, n] * log2(e), as for AVX-512 */
    __m256 h[SCAN_MAX_N][2];  /* (N, 2) x 8 lanes: state n of the 16 channels */
    const float *Ablk = p->A + e0 * N;                                        /* (w, N) */
    const float *Sblk = p->state_in ? p->state_in + (bi * E + e0) * N : NULL; /* (w, N) */
    for (int64_t n = 0; n < N; n++) { /* transpose the (w, N) rows into lanes */
        float a[16] = {0}, st[16] = {0};
        for (int j = 0; j < w; j++) {
            a[j] = Ablk[j * N + n];
            if (Sblk) st[j] = Sblk[j * N + n];
        }
        for (int g = 0; g < 2; g++) {
            A2[n][g] = _mm256_mul_ps(_mm256_loadu_ps(a + 8 * g),
                                     _mm256_set1_ps(1.44269504088896341f));
            h[n][g] = _mm256_loadu_ps(st + 8 * g);
        }
    }
    __m256 Dv[2], biasv[2], dt_next[2];
    for (int g = 0; g < 2; g++) {
        Dv[g] = p->D ? _mm256_maskload_ps(p->D + e0 + 8 * g, m[g]) : _mm256_setzero_ps();
        biasv[g] = p->delta_bias ? _mm256_maskload_ps(p->delta_bias + e0 + 8 * g, m[g])
                                 : _mm256_setzero_ps();
        /* dt one token ahead: softplus is ~80 cycles of dependent latency, and a token's n
         * loop is more than the out-of-order window holds, so computed at the top of its
         * own token it would stall every token */
        dt_next[g] = L > 0 ? dt_avx2(p, p->delta + bi * L * E + e0 + 8 * g, biasv[g], m[g])
                           : _mm256_setzero_ps();
    }

    for (int64_t t = 0; t < L; t++) {
        const int64_t row = (bi * L + t) * E + e0;  /* token (bi, t), channel e0 */
        const float *Bt = p->Bm + (bi * L + t) * N; /* (N) */
        const float *Ct = p->Cm + (bi * L + t) * N; /* (N) */
        if (t + SCAN_PREFETCH < L) {
            const int64_t a0 = row + SCAN_PREFETCH * E, a1 = a0 + w - 1;
            _mm_prefetch((const char *)(p->u + a0), _MM_HINT_T0);
            _mm_prefetch((const char *)(p->u + a1), _MM_HINT_T0);
            _mm_prefetch((const char *)(p->delta + a0), _MM_HINT_T0);
            _mm_prefetch((const char *)(p->delta + a1), _MM_HINT_T0);
            if (p->z) {
                _mm_prefetch((const char *)(p->z + a0), _MM_HINT_T0);
                _mm_prefetch((const char *)(p->z + a1), _MM_HINT_T0);
            }
            _mm_prefetch((const char *)(p->y + a0), _MM_HINT_T0);
            _mm_prefetch((const char *)(p->y + a1), _MM_HINT_T0);
        }
        __m256 uv[2], dt[2], du[2], acc0[2], acc1[2];
        for (int g = 0; g < 2; g++) {
            uv[g] = _mm256_maskload_ps(p->u + row + 8 * g, m[g]);
            dt[g] = dt_next[g];
            if (t + 1 < L) dt_next[g] = dt_avx2(p, p->delta + row + E + 8 * g, biasv[g], m[g]);
            du[g] = _mm256_mul_ps(dt[g], uv[g]);
            acc0[g] = acc1[g] = _mm256_setzero_ps();
        }
        int64_t n = 0;
#pragma GCC unroll 8
        for (; n + 1 < N; n += 2) {
            const __m256 b0 = _mm256_set1_ps(Bt[n]), b1 = _mm256_set1_ps(Bt[n + 1]);
            const __m256 c0 = _mm256_set1_ps(Ct[n]), c1 = _mm256_set1_ps(Ct[n + 1]);
            for (int g = 0; g < 2; g++) {
                __m256 dA0 = exp2_avx2(_mm256_mul_ps(dt[g], A2[n][g]));
                __m256 dA1 = exp2_avx2(_mm256_mul_ps(dt[g], A2[n + 1][g]));
                h[n][g] = _mm256_fmadd_ps(dA0, h[n][g], _mm256_mul_ps(du[g], b0));
                h[n + 1][g] = _mm256_fmadd_ps(dA1, h[n + 1][g], _mm256_mul_ps(du[g], b1));
                acc0[g] = _mm256_fmadd_ps(h[n][g], c0, acc0[g]);
                acc1[g] = _mm256_fmadd_ps(h[n + 1][g], c1, acc1[g]);
            }
        }
        if (n < N)
            for (int g = 0; g < 2; g++) {
                __m256 dA0 = exp2_avx2(_mm256_mul_ps(dt[g], A2[n][g]));
                h[n][g] = _mm256_fmadd_ps(dA0, h[n][g], _mm256_mul_ps(du[g], _mm256_set1_ps(Bt[n])));
                acc0[g] = _mm256_fmadd_ps(h[n][g], _mm256_set1_ps(Ct[n]), acc0[g]);
            }
        for (int g = 0; g < 2; g++) {
            __m256 yv = _mm256_add_ps(acc0[g], acc1[g]);
            if (p->D) yv = _mm256_fmadd_ps(Dv[g], uv[g], yv);
            if (p->z)
                yv = _mm256_mul_ps(yv, silu_avx2(_mm256_maskload_ps(p->z + row + 8 * g, m[g])));
            _mm256_maskstore_ps(p->y + row + 8 * g, m[g], yv);
        }
    }

    if (p->state_out) {
        float *Oblk = p->state_out + (bi * E + e0) * N; /* (w, N) */
        for (int64_t n = 0; n < N; n++) {
            float st[16];
            _mm256_storeu_ps(st, h[n][0]);
            _mm256_storeu_ps(st + 8, h[n][1]);
            for (int j = 0; j < w; j++) Oblk[j * N + n] = st[j];
        }
    }
}

static AVX2 void scan_block_avx2_n16(const scan_params *p, int64_t bi, int64_t e0, int w) {
    scan_block_avx2_body(p, bi, e0, w, 16);
}

static AVX2 void scan_block_avx2(const scan_params *p, int64_t bi, int64_t e0, int w) {
    scan_block_avx2_body(p, bi, e0, w, p->N);
}
#endif /* SCAN_X86 */

/* ---- entry points ----------------------------------------------------------------------- */

typedef void (*scan_block_fn)(const scan_params *, int64_t, int64_t, int);

static bm_status scan_run(const scan_params *p, int64_t b) {
    const int64_t E = p->E, N = p->N;
    if (b < 0 || p->L < 0 || E < 0 || N < 0 || N > SCAN_MAX_N) return BM_ERR_ARG;
    scan_block_fn fn = N == 16 ? scan_block_c_n16 : scan_block_c;
#ifdef SCAN_X86
    if (bm_cpu_has_avx512()) fn = N == 16 ? scan_block_avx512_n16 : scan_block_avx512;
    else if (bm_cpu_has_avx2()) fn = N == 16 ? scan_block_avx2_n16 : scan_block_avx2;
#endif
    const int64_t nblk = (E + SCAN_BLOCK - 1) / SCAN_BLOCK;
    const int64_t nwork = b * nblk;
    /* below ~64k state updates a parallel region costs more than it saves */
    const int par = b * (p->L > 0 ? p->L : 1) * E * (N > 0 ? N : 1) >= 65536;
#pragma omp parallel for schedule(static) num_threads(bm_get_num_threads()) if (par)
    for (int64_t i = 0; i < nwork; i++) {
        const int64_t bi = i / nblk, e0 = (i % nblk) * SCAN_BLOCK;
        fn(p, bi, e0, (int)(E - e0 < SCAN_BLOCK ? E - e0 : SCAN_BLOCK));
    }
    return BM_OK;
}

bm_status bm_scan_forward(const float *u, const float *delta, const float *A, const float *Bm,
                          const float *Cm, const float *D, const float *z,
                          const float *delta_bias, int delta_softplus, const float *state_in,
                          float *state_out, float *y, int64_t b, int64_t L, int64_t E,
                          int64_t N) {
    const scan_params p = {u, delta, A, Bm, Cm, D, z, delta_bias, state_in, state_out, y,
                           L, E, N, delta_softplus};
    return scan_run(&p, b);
}

/* x, delta, z, y (b, E) are (b, 1, E) and Bm, Cm (b, N) are (b, 1, N): one token of the
 * prefill, whose state goes in and out of the same array. */
bm_status bm_scan_step(float *state, const float *x, const float *delta, const float *A,
                       const float *Bm, const float *Cm, const float *D, const float *z,
                       const float *delta_bias, int delta_softplus, float *y, int64_t b,
                       int64_t E, int64_t N) {
    const scan_params p = {x, delta, A, Bm, Cm, D, z, delta_bias, state, state, y,
                           1, E, N, delta_softplus};
    return scan_run(&p, b);
}
