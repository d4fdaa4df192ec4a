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

// One weight element as float32 (exact from any of the three types), and back with round to
// nearest even (__float2half_rn: beyond fp16's range -> +-inf, NaN kept NaN).
template <typename T>
__device__ __forceinline__ float conv_ld(const T *p, int64_t i) {
    if constexpr (std::is_same<T, float>::value) return p[i];
    else if constexpr (std::is_same<T, __half>::value) return __half2float(p[i]);
    else return bm_bf16_bits_to_f32(p[i]);
}
template <typename T>
__device__ __forceinline__ void conv_st(T *p, int64_t i, float v) {
    if constexpr (std::is_same<T, float>::value) p[i] = v;
    else if constexpr (std::is_same<T, __half>::value) p[i] = __float2half_rn(v);
    else p[i] = bm_f32_to_bf16_bits(v);
}
template <typename S, typename D>
static __global__ void convert_kernel(const S *__restrict__ src,  // (n)
                                      D *__restrict__ dst,        // (n)
                                      int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        conv_st(dst, i, conv_ld(src, i));
}
template <typename S>
static int convert_from(const S *src, void *dst, bm_dtype ddt, int64_t n, cudaStream_t stream) {
    switch (ddt) {
        case BM_F32: convert_kernel<<<grid_for(n), 256, 0, stream>>>(src, (float *)dst, n); break;
        case BM_BF16: convert_kernel<<<grid_for(n), 256, 0, stream>>>(src, (uint16_t *)dst, n); break;
        case BM_F16: convert_kernel<<<grid_for(n), 256, 0, stream>>>(src, (__half *)dst, n); break;
        default: return BM_CUDA_ARG_FAIL("convert: unknown destination dtype");
    }
    BM_CUDA_LAUNCHED();
    return 0;
}

extern "C" int bm_cuda_convert(const void *src, bm_dtype sdt, void *dst, bm_dtype ddt,
                               int64_t n, cudaStream_t stream) {
    if (n <= 0) return 0;
    if (sdt == ddt) {
        BM_CUDA_TRY(cudaMemcpyAsync(dst, src, (size_t)n * (sdt == BM_F32 ? 4 : 2),
                                    cudaMemcpyDeviceToDevice, stream));
        return 0;
    }
    switch (sdt) {
        case BM_F32: return convert_from((const float *)src, dst, ddt, n, stream);
        case BM_BF16: return convert_from((const uint16_t *)src, dst, ddt, n, stream);
        case BM_F16: return convert_from((const __half *)src, dst, ddt, n, stream);
    }
    return BM_CUDA_ARG_FAIL("convert: unknown source dtype");
}
