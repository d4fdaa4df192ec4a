/* cpu.c: run-time CPU features and the thread count shared by our kernels and OpenBLAS. */
#include "bm.h"

#include <cblas.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

const char *bm_status_str(bm_status s) {
    switch (s) {
    case BM_OK: return "ok";
    case BM_ERR_ARG: return "invalid argument";
    case BM_ERR_NOMEM: return "out of memory";
    default: return "internal error";
    }
}

/* BLACKMAMBA_NO_AVX512=1 forces the portable paths (read at every call, so tests can
 * compare both paths in one process). */
int bm_cpu_has_avx512(void) {
    const char *off = getenv("BLACKMAMBA_NO_AVX512");
    if (off && off[0] == '1') return 0;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
    return 0;
#endif
}

int bm_cpu_has_avx512bf16(void) {
#if defined(__x86_64__) && defined(__GNUC__) && __GNUC__ >= 11
    __builtin_cpu_init();
    return bm_cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

/* One process-wide count (0 = not set yet: all cores). OpenMP's own setting is per calling
 * thread, so kernels ask here and pass num_threads(bm_get_num_threads()) explicitly. */
static volatile int g_threads = 0;

int bm_get_num_threads(void) {
    int n = g_threads;
    if (n > 0) return n;
#ifdef _OPENMP
    return omp_get_num_procs();
#else
    return 1;
#endif
}

void bm_set_num_threads(int n) {
    if (n < 1) n = 1;
    g_threads = n;
    scipy_openblas_set_num_threads(n);
}
