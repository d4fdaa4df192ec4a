/* act.h: branch-free float32 activations of the MLPs (SPEC 3), shared by moe.c and the
 * accuracy/timing harness dev/cpu/act_accuracy.c. Internal to the C core (not part of bm.h).
 *
 * Each activation is one branch-free float32 formula, so that the loops over a row vectorise
 * (libm's erff/expf/tanhf are scalar calls, ~15 ns per element for erff). The same source is
 * compiled three times (moe.c): for AVX-512 (16 lanes), AVX2+FMA (8) and the baseline ISA
 * (SSE2, 4 lanes). All use only IEEE add, multiply, divide and bit operations in the same
 * order (-std=c11 keeps FMA contraction off, also under target("fma")), so they give
 * bit-identical results and the tests on one machine cover the other paths' math.
 *
 * Accuracy (against float64 on dense grids; dev/cpu/act_accuracy.c measures it):
 *   gelu:      |err| <= 1.4e-7 |x| everywhere (libm form 0.5x(1+erff): 1.1e-7 |x|), and
 *              relative error <= 2e-6 in the negative tail, where the libm form loses every
 *              digit to the cancellation in 1 + erf (x < -4).
 *   gelu_tanh: written as x * sigmoid(2u) = x / (1 + e^{-2u}), equal to 0.5x(1 + tanh u)
 *              without its cancellation: |err| <= 1.2e-7 |x|.
 *   silu:      x / (1 + e^-x): <= 2.4 ulp.
 * Non-finite inputs: NaN -> NaN, +inf -> +inf, -inf -> NaN (-inf * 0, as in the reference). */
#ifndef BM_ACT_H
#define BM_ACT_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* Inlined into each caller so that every loop compiles for the caller's ISA. */
#define BM_ACT_INLINE static inline __attribute__((always_inline))

BM_ACT_INLINE float f_as(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
BM_ACT_INLINE uint32_t u_as(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* c ? x : y as a bit select: unlike ?:, gcc if-converts it on every ISA (a ?: between two
 * computed floats stays a branch on SSE2 and blocks vectorisation). Exact, NaN-transparent. */
BM_ACT_INLINE float sel(int c, float x, float y) {
    uint32_t m = (uint32_t)0 - (uint32_t)(c != 0);
    return f_as((u_as(x) & m) | (u_as(y) & ~m));
}

/* e^a, <= 1 ulp (Cephes expf: 2^n e^r, |r| <= ln2/2, degree-6 polynomial). a > 88.72 -> inf
 * (the clamp at 89 still overflows), a < -86.5 -> 0 (results below ~2e-38 are flushed). */
BM_ACT_INLINE float exp_f(float a) {
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float c = sel(a > 89.0f, 89.0f, a);
    c = sel(c < -86.5f, -86.5f, c);
    float t = c * 1.44269504088896341f + magic;
    float n = t - magic; /* round(c / ln 2), in [-125, 128] */
    float r = c - n * 0.693359375f; /* ln 2 split in a short high part (n * hi is exact) */
    r = r - n * -2.12194440e-4f;    /* and the rest */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    /* 2^(n-1) built in the exponent field (n - 1 + 127 in [1, 254]), times 2: n = 128 then
     * overflows to inf in the multiply instead of needing a special case. Unsigned so that
     * a NaN's garbage n shifts without undefined behaviour (p is NaN then anyway). */
    float s = f_as((u_as(t) - u_as(magic) + 126u) << 23);
    return sel(a >= -86.5f, p * s * 2.0f, 0.0f);
}

/* x Phi(x) = 0.5 x (1 + erf(z)), z = |x| / sqrt 2 (the sign is applied at the end). Two
 * pieces, both always computed and one selected:
 *   z <  0.5: erf(z) by its Taylor series to z^13 (truncation < 1e-9);
 *   z >= 0.5: erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z/2), P of degree 9 (Numerical
 *             Recipes erfcc, relative error < 1.2e-7 for all z). Phi(x < 0) = erfc(z) / 2
 *             directly, so the negative tail keeps its relative accuracy. */
BM_ACT_INLINE float gelu_f(float x) {
    float z = fabsf(x) * 0.70710678118654752f;
    float t = 1.0f / (1.0f + 0.5f * z);
    float p = 0.17087277f;
    p = p * t - 0.82215223f;
    p = p * t + 1.48851587f;
    p = p * t - 1.13520398f;
    p = p * t + 0.27886807f;
    p = p * t - 0.18628806f;
    p = p * t + 0.09678418f;
    p = p * t + 0.37409196f;
    p = p * t + 1.00002368f;
    p = p * t - 1.26551223f;
    /* z^2 as (x x) / 2: one rounding instead of two, it sets the tail's relative error */
    float h = 0.5f * t * exp_f(p - 0.5f * (x * x)); /* erfc(z) / 2 */
    float zs = sel(z > 0.5f, 0.5f, z), w = zs * zs; /* clamped: finite for any x */
    float q = 1.0f / 9360.0f;
    q = q * w - 1.0f / 1320.0f;
    q = q * w + 1.0f / 216.0f;
    q = q * w - 1.0f / 42.0f;
    q = q * w + 1.0f / 10.0f;
    q = q * w - 1.0f / 3.0f;
    q = q * w + 1.0f;
    float e = 0.56418958354775628f * zs * q; /* erf(z) / 2 = z (1 - z^2/3 + ...) / sqrt(pi) */
    int small = z < 0.5f;
    float pos = sel(small, 0.5f + e, 1.0f - h); /* Phi(|x|) */
    float neg = sel(small, 0.5f - e, h);        /* Phi(-|x|) */
    return x * sel(x < 0.0f, neg, pos);
}

/* 0.5 x (1 + tanh u) = x / (1 + e^{-2u}), u = sqrt(2/pi) (x + 0.044715 x^3) */
BM_ACT_INLINE float gelu_tanh_f(float x) {
    float u2 = 1.5957691216057308f * (x + 0.044715f * (x * x * x)); /* 2u */
    return x / (1.0f + exp_f(-u2));
}

/* x / (1 + e^-x): for x < -89 e^-x is inf and the quotient -0, the right limit. */
BM_ACT_INLINE float silu_f(float x) { return x / (1.0f + exp_f(-x)); }

BM_ACT_INLINE float ident_f(float x) { return x; }

#endif /* BM_ACT_H */
