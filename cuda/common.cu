// common.cu: the thread-local error message, the cuBLAS handle pair, bf16 <-> f32 on device.
#include <stdio.h>

#include <cublas_v2.h>

#include "common.cuh"

// One message per host thread: launchers on different threads don't overwrite each other's.
static thread_local char bm_cuda_err_[512];

int bm_cuda_fail_(const char *file, int line, int code, const char *name, const char *msg) {
    const char *base = file;
    for (const char *p = file; *p; p++)
        if (*p == '/') base = p + 1;
    snprintf(bm_cuda_err_, sizeof bm_cuda_err_, "%s:%d: %s: %s", base, line, name, msg);
    return code;
}

extern "C" const char *bm_cuda_last_error(void) { return bm_cuda_err_; }

extern "C" int bm_cuda_cublas_create(void **handle) {
    cublasHandle_t h = nullptr;
    cublasStatus_t s = cublasCreate(&h);
    if (s != CUBLAS_STATUS_SUCCESS)
        return bm_cuda_fail_(__FILE__, __LINE__, BM_CUDA_ERR_CUBLAS, cublasGetStatusName(s),
                             cublasGetStatusString(s));
    *handle = (void *)h;
    return 0;
}

extern "C" int bm_cuda_cublas_destroy(void *handle) {
    if (!handle) return 0;
    cublasStatus_t s = cublasDestroy((cublasHandle_t)handle);
    if (s != CUBLAS_STATUS_SUCCESS)
        return bm_cuda_fail_(__FILE__, __LINE__, BM_CUDA_ERR_CUBLAS, cublasGetStatusName(s),
                             cublasGetStatusString(s));
    return 0;
}

static __global__ void bf16_to_f32_kernel(const uint16_t *__restrict__ src,  // (n)
                                          float *__restrict__ dst,           // (n)
                                          int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = bm_bf16_bits_to_f32(src[i]);
}

static __global__ void f32_to_bf16_kernel(const float *__restrict__ src,  // (n)
                                          uint16_t *__restrict__ dst,     // (n)
                                          int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = bm_f32_to_bf16_bits(src[i]);
}

static __global__ void f32_to_bf16_split_kernel(const float *__restrict__ src,  // (n)
                                                uint16_t *__restrict__ hi,       // (n)
                                                uint16_t *__restrict__ lo,       // (n)
                                                int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        bm_f32_to_bf16_split(src[i], hi[i], lo[i]);
}

static int grid_for(int64_t n) { return (int)(bm_cdiv(n, 256) < 8192 ? bm_cdiv(n, 256) : 8192); }

extern "C" int bm_cuda_bf16_to_f32(const uint16_t *src, float *dst, int64_t n,
                                   cudaStream_t stream) {
    if (n <= 0) return 0;
    bf16_to_f32_kernel<<<grid_for(n), 256, 0, stream>>>(src, dst, n);
    BM_CUDA_LAUNCHED();
    return 0;
}

extern "C" int bm_cuda_f32_to_bf16(const float *src, uint16_t *dst, int64_t n,
                                   cudaStream_t stream) {
    if (n <= 0) return 0;
    f32_to_bf16_kernel<<<grid_for(n), 256, 0, stream>>>(src, dst, n);
    BM_CUDA_LAUNCHED();
    return 0;
}

extern "C" int bm_cuda_f32_to_bf16_split(const float *src, uint16_t *hi, uint16_t *lo, int64_t n,
                                         cudaStream_t stream) {
    if (n <= 0) return 0;
    f32_to_bf16_split_kernel<<<grid_for(n), 256, 0, stream>>>(src, hi, lo, n);
    BM_CUDA_LAUNCHED();
    return 0;
}
