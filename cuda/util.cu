// util.cu: small device helpers for the Python bindings (csrc/module.c): expert ids
// narrowed to int32 with a range check, int32 -> int64 widening (the CPU ops return int64
// dispatch tables; the kernels build int32 ones).
#include "common.cuh"

namespace {

// out[i] = ids[i] if 0 <= ids[i] < X else -1; *n_bad += the number outside.
template <typename IT>
__global__ void ids_check_kernel(const IT *__restrict__ ids,  // (n)
                                 int32_t *__restrict__ out,   // (n)
                                 int64_t n, int64_t X,
                                 int32_t *__restrict__ n_bad) {  // (1)
    int bad = 0;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t v = (int64_t)ids[i];
        const bool ok = v >= 0 && v < X;
        out[i] = ok ? (int32_t)v : -1;
        bad += !ok;
    }
    bad = bm_warp_sum(bad);  // one atomic per warp
    if ((threadIdx.x & 31) == 0 && bad) atomicAdd(n_bad, bad);
}

__global__ void i32_to_i64_kernel(const int32_t *__restrict__ src,  // (n)
                                  int64_t *__restrict__ dst,        // (n)
                                  int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = src[i];
}

unsigned grid_for(int64_t n) { return (unsigned)(bm_cdiv(n, 256) < 4096 ? bm_cdiv(n, 256) : 4096); }

}  // namespace

extern "C" int bm_cuda_ids_to_i32(const void *ids, int ids_bits, int64_t n, int64_t X,
                                  int32_t *out, int32_t *n_bad, cudaStream_t stream) {
    if (ids_bits != 32 && ids_bits != 64) return BM_CUDA_ARG_FAIL("ids_to_i32: ids_bits must be 32 or 64");
    BM_CUDA_TRY(cudaMemsetAsync(n_bad, 0, sizeof(int32_t), stream));
    if (n <= 0) return 0;
    if (ids_bits == 32)
        ids_check_kernel<int32_t><<<grid_for(n), 256, 0, stream>>>((const int32_t *)ids, out, n, X, n_bad);
    else
        ids_check_kernel<int64_t><<<grid_for(n), 256, 0, stream>>>((const int64_t *)ids, out, n, X, n_bad);
    BM_CUDA_LAUNCHED();
    return 0;
}

extern "C" int bm_cuda_i32_to_i64(const int32_t *src, int64_t *dst, int64_t n, cudaStream_t stream) {
    if (n <= 0) return 0;
    i32_to_i64_kernel<<<grid_for(n), 256, 0, stream>>>(src, dst, n);
    BM_CUDA_LAUNCHED();
    return 0;
}

// Multiprocessors of the current device, or -1 (tests: the one-wave rules of the early decode
// kernels depend on it).
extern "C" int bm_cuda_sm_count(void) {
    int sms = 0;
    return bm_sm_count(&sms) ? -1 : sms;
}
