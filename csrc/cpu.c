/* cpu.c: run-time CPU features and the thread count of our kernels (OpenBLAS: 1 thread). */
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

/* The middle level, for the many x86 CPUs without AVX-512 (laptops, desktops, cloud VMs):
 * avx2 + fma. BLACKMAMBA_NO_AVX2=1 turns it off (read at every call). Kernels pick AVX-512
 * first, then this, then the portable C path; so with AVX-512 available this level is only
 * reached under BLACKMAMBA_NO_AVX512=1. */
int bm_cpu_has_avx2(void) {
    const char *off = getenv("BLACKMAMBA_NO_AVX2");
    if (off && off[0] == '1') return 0;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
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
}

/* OpenBLAS runs single-threaded, always: gemm.c calls it from inside our OpenMP regions, one
 * call per thread on its own block. Two thread pools on the same cores fight: each pool's idle
 * workers spin for milliseconds after a call, so alternating OpenBLAS calls with our OpenMP
 * kernels halved throughput on a 2-core machine (and a multi-threaded pthreads OpenBLAS called
 * inside an OpenMP region warns that it may hang). Set when the extension is loaded. */
__attribute__((constructor)) static void bm_blas_single_threaded(void) {
    scipy_openblas_set_num_threads(1);
}
