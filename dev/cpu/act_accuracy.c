/* act_accuracy.c: accuracy and speed of the activations in csrc/act.h against float64, and
 * against the libm forms they replace (0.5x(1+erff), 0.5x(1+tanhf), x/(1+expf)).
 *
 *   gcc -std=c11 -O3 -fopenmp -fno-math-errno -Icsrc dev/cpu/act_accuracy.c -o /tmp/act -lm
 *   /tmp/act
 *
 * Columns: "ulp" = worst error in float32 ulps of the exact value; "err/|x|" = worst absolute
 * error divided by |x| (for x Phi(x) it is the absolute error of Phi: the natural scale, since
 * the product with x is exact to 0.5 ulp); ns per element on one thread.
 */
#define _POSIX_C_SOURCE 199309L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "act.h"

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define LOOP(name, expr)                                                                    \
    AVX512 static void name##_avx512(const float *a, float *h, int n) {                    \
        _Pragma("omp simd") for (int i = 0; i < n; i++) { float x = a[i]; h[i] = (expr); } \
    }                                                                                       \
    static void name##_generic(const float *a, float *h, int n) {                           \
        _Pragma("omp simd") for (int i = 0; i < n; i++) { float x = a[i]; h[i] = (expr); } \
    }                                                                                       \
    static void name##_libm(const float *a, float *h, int n);

LOOP(gelu, gelu_f(x))
LOOP(gelu_tanh, gelu_tanh_f(x))
LOOP(silu, silu_f(x))
LOOP(exp, exp_f(x))
__attribute__((unused)) static void (*const keep_exp_generic)(const float *, float *, int) =
    exp_generic; /* only the AVX-512 exp is measured */

static void gelu_libm(const float *a, float *h, int n) {
    for (int i = 0; i < n; i++) h[i] = 0.5f * a[i] * (1.0f + erff(a[i] * 0.70710678118654752f));
}
static void gelu_tanh_libm(const float *a, float *h, int n) {
    for (int i = 0; i < n; i++) {
        float v = a[i];
        h[i] = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    }
}
static void silu_libm(const float *a, float *h, int n) {
    for (int i = 0; i < n; i++) h[i] = a[i] / (1.0f + expf(-a[i]));
}
static void exp_libm(const float *a, float *h, int n) {
    for (int i = 0; i < n; i++) h[i] = expf(a[i]);
}

/* float64 truths; erfc avoids the cancellation of 1 + erf in the negative tail */
static double gelu_ref(double x) { return 0.5 * x * erfc(-x / sqrt(2.0)); }
static double gelu_tanh_ref(double x) {
    return x / (1.0 + exp(-2.0 * sqrt(2.0 / 3.14159265358979323846) * (x + 0.044715 * x * x * x)));
}
static double silu_ref(double x) { return x / (1.0 + exp(-x)); }

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

typedef void (*kern)(const float *, float *, int);

static void check(const char *name, kern f, double (*ref)(double), float lo, float hi) {
    const int n = 4000001;
    float *a = malloc(sizeof(float) * n), *h = malloc(sizeof(float) * n);
    for (int i = 0; i < n; i++) a[i] = lo + (hi - lo) * (float)i / (float)(n - 1);
    f(a, h, n);
    double worst_ulp = 0, worst_abs = 0;
    float at_ulp = 0, at_abs = 0;
    for (int i = 0; i < n; i++) {
        double r = ref(a[i]), e = fabs(h[i] - r);
        float ar = (float)fabs(r);
        if (ar > 1e-30f) {
            double ulp = e / (nextafterf(ar, INFINITY) - ar);
            if (ulp > worst_ulp) { worst_ulp = ulp; at_ulp = a[i]; }
        }
        double rel = e / (a[i] != 0.0f ? fabs(a[i]) : 1.0);
        if (rel > worst_abs) { worst_abs = rel; at_abs = a[i]; }
    }
    /* timed on a row that stays in L1, as the MLP rows (F floats) do */
    double t0 = now();
    for (int k = 0; k < 2000; k++) f(a + (k % 16) * 4096, h, 4096);
    double ns = (now() - t0) / 2000 / 4096 * 1e9;
    printf("%-18s [%6g, %5g]  ulp %10.2f at %-9.4g err/|x| %.2e at %-9.4g %6.2f ns\n", name, lo,
           hi, worst_ulp, at_ulp, worst_abs, at_abs, ns);
    free(a);
    free(h);
}

static void same(const char *name, kern f1, kern f2) {
    const int n = 1000003;
    float *a = malloc(sizeof(float) * n), *h1 = malloc(sizeof(float) * n),
          *h2 = malloc(sizeof(float) * n);
    for (int i = 0; i < n; i++) a[i] = -100.0f + 200.0f * (float)i / (float)(n - 1);
    f1(a, h1, n);
    f2(a, h2, n);
    printf("%-10s avx512 and generic bit-identical: %s\n", name,
           memcmp(h1, h2, sizeof(float) * n) ? "NO" : "yes");
    free(a);
    free(h1);
    free(h2);
}

int main(void) {
    same("gelu", gelu_avx512, gelu_generic);
    same("gelu_tanh", gelu_tanh_avx512, gelu_tanh_generic);
    same("silu", silu_avx512, silu_generic);
    check("exp avx512", exp_avx512, exp, -86, 88.7f);
    check("exp libm", exp_libm, exp, -86, 88.7f);
    const float range[][2] = {{-3, 3}, {-14, 30}};
    for (int r = 0; r < 2; r++) {
        float lo = range[r][0], hi = range[r][1];
        check("gelu avx512", gelu_avx512, gelu_ref, lo, hi);
        check("gelu generic", gelu_generic, gelu_ref, lo, hi);
        check("gelu libm", gelu_libm, gelu_ref, lo, hi);
        check("gelu_tanh avx512", gelu_tanh_avx512, gelu_tanh_ref, lo, hi);
        check("gelu_tanh libm", gelu_tanh_libm, gelu_tanh_ref, lo, hi);
        check("silu avx512", silu_avx512, silu_ref, lo, hi);
        check("silu libm", silu_libm, silu_ref, lo, hi);
    }
    return 0;
}
