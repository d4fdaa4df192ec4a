// The batched decode's dense products at the 2.8B shape (B = 64 rows): every algorithm that
// cublasLt's heuristic offers, timed, against cublasGemm(StridedBatched)Ex's default (what
// engine.cu calls). Dev only, not part of the package. Standalone:
//   nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/lt cuda/dev/lt_sweep.cu -lcublasLt -lcublas && /tmp/lt
// Products (row-major y (M, N) = x (M, K) W^T, W (N, K) bf16, x bf16, y fp32, fp32 compute):
//   in_proj: two of N = E = 2944, K = d = 1472 (x and z halves, strided batched as engine.cu)
//   out_proj: N = d = 1472, K = E = 2944
//   lm_head: N = V = 50304, K = d = 1472 (M = 64 only)
// Each line: us a call (median of 9 runs of 50 calls in a CUDA graph), GB/s of weights.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "dev_check.cuh"
#define CB(x)                                                                  \
    do {                                                                       \
        cublasStatus_t s_ = (x);                                               \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                     \
            printf("cuBLAS status %d at %s line %d\n", (int)s_, #x, __LINE__); \
            exit(1);                                                           \
        }                                                                      \
    } while (0)

static cudaStream_t st;

template <class F>
float graph_us(F enqueue, int inner = 50) {
    for (int i = 0; i < 3; i++) enqueue();
    CK(cudaStreamSynchronize(st));
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < inner; i++) enqueue();
    CK(cudaStreamEndCapture(st, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    CK(cudaGraphLaunch(ge, st));
    CK(cudaStreamSynchronize(st));
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    std::vector<float> v;
    for (int r = 0; r < 9; r++) {
        CK(cudaEventRecord(a, st));
        CK(cudaGraphLaunch(ge, st));
        CK(cudaEventRecord(b, st));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        v.push_back(ms * 1000.f / inner);
    }
    CK(cudaGraphExecDestroy(ge));
    CK(cudaGraphDestroy(g));
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

// Compares y against the reference product ref (same shape): max |diff| / max |ref|.
static float rel_diff(const float *y, const float *ref, size_t n) {
    std::vector<float> a(n), b(n);
    CK(cudaMemcpy(a.data(), y, n * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(b.data(), ref, n * 4, cudaMemcpyDeviceToHost));
    float md = 0, mr = 0;
    for (size_t i = 0; i < n; i++) {
        md = std::max(md, std::fabs(a[i] - b[i]));
        mr = std::max(mr, std::fabs(b[i]));
    }
    return md / (mr > 0 ? mr : 1);
}

static void sweep(const char *name, cublasHandle_t h, cublasLtHandle_t lt, int M, int N, int K,
                  int batch, void *ws, size_t ws_bytes) {
    const size_t wbytes = (size_t)batch * N * K * 2;
    __nv_bfloat16 *W, *x;
    float *y, *ref;
    CK(cudaMalloc(&W, wbytes));
    CK(cudaMalloc(&x, (size_t)M * K * 2));
    CK(cudaMalloc(&y, (size_t)batch * M * N * 4));
    CK(cudaMalloc(&ref, (size_t)batch * M * N * 4));
    {
        std::vector<__nv_bfloat16> hw((size_t)batch * N * K), hx((size_t)M * K);
        uint32_t s = 12345;
        auto rnd = [&] {
            s = s * 1664525u + 1013904223u;
            return ((s >> 8) & 0xffff) / 65536.f - 0.5f;
        };
        for (auto &v : hw) v = __float2bfloat16(rnd() * 0.05f);
        for (auto &v : hx) v = __float2bfloat16(rnd());
        CK(cudaMemcpy(W, hw.data(), wbytes, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(x, hx.data(), (size_t)M * K * 2, cudaMemcpyHostToDevice));
    }
    const float one = 1.f, zero = 0.f;
    CB(cublasSetStream(h, st));
    CB(cublasSetWorkspace(h, ws, ws_bytes));
    auto legacy = [&](float *out) {
        CB(cublasGemmStridedBatchedEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, W, CUDA_R_16BF,
                                      K, (long long)N * K, x, CUDA_R_16BF, K, 0LL, &zero, out,
                                      CUDA_R_32F, N, (long long)M * N, batch, CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT));
    };
    legacy(ref);
    const float t0 = graph_us([&] { legacy(y); });
    printf("%s M=%d N=%d K=%d batch=%d (%.1f MB of weights)\n", name, M, N, K, batch, wbytes / 1e6);
    printf("  cublasGemmStridedBatchedEx default: %7.2f us  %6.0f GB/s\n", t0, wbytes / (t0 * 1e3));

    cublasLtMatmulDesc_t op;
    CB(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    CB(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    CB(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    cublasLtMatrixLayout_t la, lb, lc;
    CB(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, K, N, K));
    CB(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, K, M, K));
    CB(cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, N, M, N));
    if (batch > 1) {
        int64_t sa = (int64_t)N * K, sb = 0, sc = (int64_t)M * N;
        for (auto l : {la, lb, lc})
            CB(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch,
                                                sizeof batch));
        CB(cublasLtMatrixLayoutSetAttribute(la, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &sa, sizeof sa));
        CB(cublasLtMatrixLayoutSetAttribute(lb, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &sb, sizeof sb));
        CB(cublasLtMatrixLayoutSetAttribute(lc, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &sc, sizeof sc));
    }
    cublasLtMatmulPreference_t pref;
    CB(cublasLtMatmulPreferenceCreate(&pref));
    CB(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                            &ws_bytes, sizeof ws_bytes));
    const int want = 64;
    std::vector<cublasLtMatmulHeuristicResult_t> res(want);
    int got = 0;
    CB(cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, want, res.data(), &got));
    printf("  heuristic offered %d algorithms\n", got);
    // One algorithm: its relative difference from the reference and its us a call.
    auto time_algo = [&](const cublasLtMatmulAlgo_t &a, float *err) {
        auto call = [&] {
            CB(cublasLtMatmul(lt, op, &one, W, la, x, lb, &zero, y, lc, y, lc, &a, ws, ws_bytes,
                              st));
        };
        CK(cudaMemset(y, 0, (size_t)batch * M * N * 4));
        call();
        CK(cudaStreamSynchronize(st));
        *err = rel_diff(y, ref, (size_t)batch * M * N);
        return graph_us(call);
    };
    for (int i = 0; i < got; i++) {
        const cublasLtMatmulAlgo_t &al = res[i].algo;
        int id = 0, tile = 0, splitk = 0, red = 0, swz = 0, stages = 0, ctas = 0;
        size_t sz;
        cublasLtMatmulAlgoConfigGetAttribute(&al, CUBLASLT_ALGO_CONFIG_ID, &id, sizeof id, &sz);
        cublasLtMatmulAlgoConfigGetAttribute(&al, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof tile, &sz);
        cublasLtMatmulAlgoConfigGetAttribute(&al, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk, sizeof splitk, &sz);
        cublasLtMatmulAlgoConfigGetAttribute(&al, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &red, sizeof red, &sz);
        cublasLtMatmulAlgoConfigGetAttribute(&al, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, &swz, sizeof swz, &sz);
        cublasLtMatmulAlgoConfigGetAttribute(&al, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages, sizeof stages, &sz);
        cublasLtMatmulAlgoConfigGetAttribute(&al, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &ctas, sizeof ctas, &sz);
        float err = 0.f;
        const float t = time_algo(al, &err);
        printf("  lt %2d: algo %3d tile %3d splitK %2d red %d swz %d stages %3d cluster %2d ws %7zu:"
               " %7.2f us %6.0f GB/s  (%.3fx default) rel diff %.1e\n",
               i, id, tile, splitk, red, swz, stages, ctas, res[i].workspaceSize, t,
               wbytes / (t * 1e3), t / t0, err);
        // The same algorithm with split-K 1..4 under each reduction scheme (1 in place: no
        // separate reduction kernel; 2 compute type; 4 output type), where cuBLASLt accepts it.
        if (i > 2) continue;
        for (int sk = 1; sk <= 4; sk++)
            for (int rs : {1, 2, 4}) {
                if (sk == 1 && rs != 1) continue;
                cublasLtMatmulAlgo_t a2 = al;
                cublasLtMatmulAlgoConfigSetAttribute(&a2, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &sk, sizeof sk);
                const int rsv = sk == 1 ? 0 : rs;
                cublasLtMatmulAlgoConfigSetAttribute(&a2, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &rsv, sizeof rsv);
                cublasLtMatmulHeuristicResult_t chk;
                if (cublasLtMatmulAlgoCheck(lt, op, la, lb, lc, lc, &a2, &chk) != CUBLAS_STATUS_SUCCESS ||
                    chk.workspaceSize > ws_bytes) {
                    printf("    splitK %d red %d: not supported\n", sk, rsv);
                    continue;
                }
                float e2 = 0.f;
                const float t2 = time_algo(a2, &e2);
                printf("    splitK %d red %d: %7.2f us (%.3fx default) rel diff %.1e\n", sk, rsv, t2,
                       t2 / t0, e2);
            }
    }
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(lc);
    cublasLtMatmulDescDestroy(op);
    CK(cudaFree(W));
    CK(cudaFree(x));
    CK(cudaFree(y));
    CK(cudaFree(ref));
}

int main() {
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cublasHandle_t h;
    cublasLtHandle_t lt;
    CB(cublasCreate(&h));
    CB(cublasLtCreate(&lt));
    const size_t ws_bytes = 32u << 20;
    void *ws;
    CK(cudaMalloc(&ws, ws_bytes));
    for (int M : {64, 16}) {
        sweep("in_proj", h, lt, M, 2944, 1472, 2, ws, ws_bytes);
        sweep("out_proj", h, lt, M, 1472, 2944, 1, ws, ws_bytes);
    }
    sweep("lm_head", h, lt, 64, 50304, 1472, 1, ws, ws_bytes);  // the decode's logits at B = 64
    printf("done\n");
    return 0;
}
