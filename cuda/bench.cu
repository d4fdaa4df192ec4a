// bench.cu: the two ceilings that benchmarks/bench_gpu.py compares the model against,
// measured in the same process with CUDA events (METHOD.md): device-to-device copy bandwidth
// (bytes read + written) and the cuBLAS bf16 GEMM rate on random data (not zeros: a matrix
// product of zeros runs faster than one of real data).
#include <algorithm>
#include <vector>

#include <cublas_v2.h>

#include "common.cuh"

namespace {

// Pseudo-random bf16 values in about [-1, 1) from a hash of the index.
__global__ void fill_random_bf16(uint16_t *p, int64_t n, uint32_t seed) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        uint32_t x = (uint32_t)i * 2654435761u ^ seed;
        x ^= x >> 16;
        x *= 0x7feb352du;
        x ^= x >> 15;
        x *= 0x846ca68bu;
        x ^= x >> 16;
        const float v = (float)(x >> 8) * (2.f / 16777216.f) - 1.f;
        p[i] = bm_f32_to_bf16_bits(v);
    }
}

double median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// ms of each of `iters` runs of fn() (after 2 warm-up runs), timed with events on `st`.
template <typename Fn>
int time_runs(cudaStream_t st, int iters, Fn fn, std::vector<float> &ms) {
    cudaEvent_t a = nullptr, b = nullptr;
    int rc = 0;
    if (cudaEventCreate(&a) != cudaSuccess || cudaEventCreate(&b) != cudaSuccess)
        rc = bm_cuda_fail_cuda_(__FILE__, __LINE__, cudaGetLastError());
    for (int i = 0; i < iters + 2 && !rc; i++) {
        cudaError_t e = cudaEventRecord(a, st);
        if (e == cudaSuccess) {
            if ((rc = fn())) break;
            e = cudaEventRecord(b, st);
        }
        if (e == cudaSuccess) e = cudaEventSynchronize(b);
        float t = 0.f;
        if (e == cudaSuccess) e = cudaEventElapsedTime(&t, a, b);
        if (e != cudaSuccess) rc = bm_cuda_fail_cuda_(__FILE__, __LINE__, e);
        if (i >= 2) ms.push_back(t);
    }
    if (a) cudaEventDestroy(a);
    if (b) cudaEventDestroy(b);
    return rc;
}

}  // namespace

extern "C" int bm_cuda_bench_copy(size_t bytes, int iters, double *gbps) {
    if (iters < 1 || bytes < 1024) return BM_CUDA_ARG_FAIL("bench_copy: iters >= 1, bytes >= 1K");
    void *src = nullptr, *dst = nullptr;
    cudaStream_t st = nullptr;
    int rc = 0;
    cudaError_t e = cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
    if (e == cudaSuccess) e = cudaMalloc(&src, bytes);
    if (e == cudaSuccess) e = cudaMalloc(&dst, bytes);
    if (e == cudaSuccess) {
        const int64_t n = (int64_t)(bytes / 2);
        fill_random_bf16<<<4096, 256, 0, st>>>((uint16_t *)src, n, 12345u);
        e = cudaGetLastError();
    }
    std::vector<float> ms;
    if (e != cudaSuccess) {
        rc = bm_cuda_fail_cuda_(__FILE__, __LINE__, e);
    } else {
        rc = time_runs(st, iters, [&]() -> int {
            BM_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, st));
            return 0;
        }, ms);
    }
    if (!rc) *gbps = 2.0 * (double)bytes / (median(ms) * 1e-3) / 1e9;
    cudaFree(src);
    cudaFree(dst);
    if (st) cudaStreamDestroy(st);
    return rc;
}

extern "C" int bm_cuda_bench_gemm_bf16(int64_t m, int64_t n, int64_t k, int iters,
                                       double *tflops) {
    if (iters < 1 || m < 1 || n < 1 || k < 1 || m > INT32_MAX || n > INT32_MAX || k > INT32_MAX)
        return BM_CUDA_ARG_FAIL("bench_gemm: bad sizes");
    uint16_t *A = nullptr, *B = nullptr, *C = nullptr;
    cudaStream_t st = nullptr;
    void *h = nullptr;
    int rc = 0;
    cudaError_t e = cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
    if (e == cudaSuccess) e = cudaMalloc((void **)&A, (size_t)(m * k) * 2);
    if (e == cudaSuccess) e = cudaMalloc((void **)&B, (size_t)(k * n) * 2);
    if (e == cudaSuccess) e = cudaMalloc((void **)&C, (size_t)(m * n) * 2);
    if (e == cudaSuccess) {
        fill_random_bf16<<<4096, 256, 0, st>>>(A, m * k, 1u);
        fill_random_bf16<<<4096, 256, 0, st>>>(B, k * n, 2u);
        e = cudaGetLastError();
    }
    if (e != cudaSuccess) rc = bm_cuda_fail_cuda_(__FILE__, __LINE__, e);
    if (!rc) rc = bm_cuda_cublas_create(&h);
    std::vector<float> ms;
    if (!rc) {
        cublasHandle_t hdl = (cublasHandle_t)h;
        rc = time_runs(st, iters, [&]() -> int {
            const float one = 1.f, zero = 0.f;
            cublasStatus_t s = cublasSetStream(hdl, st);
            if (s == CUBLAS_STATUS_SUCCESS)
                s = cublasGemmEx(hdl, CUBLAS_OP_T, CUBLAS_OP_N, (int)n, (int)m, (int)k, &one, B,
                                 CUDA_R_16BF, (int)k, A, CUDA_R_16BF, (int)k, &zero, C,
                                 CUDA_R_16BF, (int)n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
            if (s != CUBLAS_STATUS_SUCCESS)
                return bm_cuda_fail_(__FILE__, __LINE__, BM_CUDA_ERR_CUBLAS,
                                     cublasGetStatusName(s), cublasGetStatusString(s));
            return 0;
        }, ms);
    }
    if (!rc) *tflops = 2.0 * (double)m * (double)n * (double)k / (median(ms) * 1e-3) / 1e12;
    if (h) bm_cuda_cublas_destroy(h);
    cudaFree(A);
    cudaFree(B);
    cudaFree(C);
    if (st) cudaStreamDestroy(st);
    return rc;
}
