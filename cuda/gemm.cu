// gemm.cu: y = x W^T + bias for any number of rows x (the GPU side of ops.linear).
//
// Few rows (decode): bm_cuda_gemv, which streams W once per 8 rows of x. Many rows: cuBLAS,
// which reads W about once. bf16 weights under exact float32 math are first expanded to
// float32 in the caller's workspace (cuBLAS has no bf16 x f32 product), which costs
// 2 + 4 + 4 bytes per weight: against 2 bytes per 8 rows through the GEMV, the GEMV stays
// cheaper up to about 40 rows, hence the larger threshold for that case.
#include <cublas_v2.h>

#include "common.cuh"


namespace {

// y[m, n] = bias[n]: the GEMM then accumulates onto it (beta = 1).
__global__ void bias_rows_kernel(const float *__restrict__ bias,  // (Nout)
                                 float *__restrict__ y,           // (M, Nout)
                                 int64_t n, int64_t Nout) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] = bias[i % Nout];
}

__global__ void fill_kernel(float *__restrict__ y, int64_t n, float v) {  // (n)
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] = v;
}

unsigned grid_for(int64_t n) { return (unsigned)(bm_cdiv(n, 256) < 8192 ? bm_cdiv(n, 256) : 8192); }

bool bf16_math(bm_dtype wdtype, int math) {
    return wdtype == BM_BF16 && (math == BM_CUDA_MATH_BF16 || math == BM_CUDA_MATH_BF16X2);
}

size_t align256(size_t b) { return (b + 255) & ~(size_t)255; }

}  // namespace

extern "C" int bm_cuda_linear_gemv_rows(bm_dtype wdtype, int math) {
    return (wdtype != BM_F32 && !bf16_math(wdtype, math)) ? 32 : 8;  // bf16 or fp16 (BM_F16)
}

extern "C" size_t bm_cuda_linear_workspace(int64_t M, int64_t Nout, int64_t Kin,
                                           bm_dtype wdtype, int math) {
    if (M <= bm_cuda_linear_gemv_rows(wdtype, math)) return 0;
    if (bf16_math(wdtype, math))  // x as bf16 (and its low part under BF16X2)
        return align256((size_t)(M * Kin) * 2) * (math == BM_CUDA_MATH_BF16X2 ? 2 : 1);
    if (wdtype != BM_F32) return align256((size_t)(Nout * Kin) * 4);     // W as float32
    return 0;
}

extern "C" int bm_cuda_linear(const float *x, const void *W, bm_dtype wdtype, const float *bias,
                              float *y, int64_t M, int64_t Nout, int64_t Kin, int math,
                              void *workspace, size_t workspace_bytes, void *cublas_handle,
                              cudaStream_t stream) {
    if (M <= 0 || Nout <= 0) return 0;
    if (M > INT32_MAX || Nout > INT32_MAX || Kin > INT32_MAX)
        return BM_CUDA_ARG_FAIL("linear: matrix dimensions must be below 2**31");
    if (math < BM_CUDA_MATH_FP32 || math > BM_CUDA_MATH_BF16X2)
        return BM_CUDA_ARG_FAIL("linear: math must be BM_CUDA_MATH_FP32, TF32, BF16 or BF16X2");
    if (Kin == 0) {  // an empty sum: y = bias (or 0)
        if (bias) bias_rows_kernel<<<grid_for(M * Nout), 256, 0, stream>>>(bias, y, M * Nout, Nout);
        else fill_kernel<<<grid_for(M * Nout), 256, 0, stream>>>(y, M * Nout, 0.f);
        BM_CUDA_LAUNCHED();
        return 0;
    }
    if (M <= bm_cuda_linear_gemv_rows(wdtype, math))
        return bm_cuda_gemv(x, W, wdtype, bias, y, M, Nout, Kin, stream);

    if (!cublas_handle) return BM_CUDA_ARG_FAIL("linear: no cuBLAS handle");
    const size_t need = bm_cuda_linear_workspace(M, Nout, Kin, wdtype, math);
    if (need && (!workspace || workspace_bytes < need))
        return BM_CUDA_ARG_FAIL("linear: workspace too small (bm_cuda_linear_workspace)");
    cublasHandle_t hdl = (cublasHandle_t)cublas_handle;
    BM_CUBLAS_TRY(cublasSetStream(hdl, stream));
    BM_CUBLAS_TRY(cublasSetMathMode(hdl, CUBLAS_DEFAULT_MATH));

    float beta = 0.f;
    if (bias) {
        bias_rows_kernel<<<grid_for(M * Nout), 256, 0, stream>>>(bias, y, M * Nout, Nout);
        BM_CUDA_LAUNCHED();
        beta = 1.f;
    }
    const void *A = W, *B = x;
    cudaDataType at = CUDA_R_32F, bt = CUDA_R_32F;
    cublasComputeType_t ct = math == BM_CUDA_MATH_FP32 ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_FAST_TF32;
    int st;
    const uint16_t *xlo = nullptr;  // BF16X2: the low part of x, the second GEMM's input
    if (bf16_math(wdtype, math)) {
        // bf16 x bf16 -> fp32 accumulate: x rounded to bf16 once (BF16X2: hi and lo parts).
        uint16_t *xb = (uint16_t *)workspace;  // (M, Kin)
        if (math == BM_CUDA_MATH_BF16X2) {
            uint16_t *lo = (uint16_t *)((char *)workspace + align256((size_t)(M * Kin) * 2));
            if ((st = bm_cuda_f32_to_bf16_split(x, xb, lo, M * Kin, stream))) return st;
            xlo = lo;
        } else if ((st = bm_cuda_f32_to_bf16(x, xb, M * Kin, stream))) {
            return st;
        }
        A = W; at = CUDA_R_16BF;
        B = xb; bt = CUDA_R_16BF;
        ct = CUBLAS_COMPUTE_32F;
    } else if (wdtype != BM_F32) {  // bf16 (not bf16 math) or fp16: expanded exactly
        float *wf = (float *)workspace;  // (Nout, Kin)
        if ((st = bm_cuda_convert(W, wdtype, wf, BM_F32, Nout * Kin, stream))) return st;
        A = wf;
    }
    // Row-major y (M, Nout) = x (M, Kin) @ W (Nout, Kin)^T is, read column-major,
    // y^T (Nout, M) = op(A) B with A = W seen as (Kin, Nout) transposed, B = x^T (Kin, M).
    const float one = 1.f;
    BM_CUBLAS_TRY(cublasGemmEx(hdl, CUBLAS_OP_T, CUBLAS_OP_N, (int)Nout, (int)M, (int)Kin, &one,
                               A, at, (int)Kin, B, bt, (int)Kin, &beta, y, CUDA_R_32F, (int)Nout,
                               ct, CUBLAS_GEMM_DEFAULT));
    if (xlo) {  // y += lo @ W^T: the part of x that bf16 rounding dropped
        BM_CUBLAS_TRY(cublasGemmEx(hdl, CUBLAS_OP_T, CUBLAS_OP_N, (int)Nout, (int)M, (int)Kin,
                                   &one, A, at, (int)Kin, xlo, bt, (int)Kin, &one, y, CUDA_R_32F,
                                   (int)Nout, ct, CUBLAS_GEMM_DEFAULT));
    }
    return 0;
}
