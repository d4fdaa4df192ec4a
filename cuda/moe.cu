// moe.cu: top-1 routing and the expert MLPs of a MoE layer (SPEC 3) on the GPU.
//
//   s = x @ rw^T + rb;  e* = argmax s (ties -> lowest);  g = sigmoid(s[e*])
//   out[t] = g * fc2[e*] @ (act(a[:F]) * a[F:]),  a = fc1[e*] @ x[t]
//
// Prefill, bf16 weights under bf16 math: grouped.cu (two grouped GEMMs, offsets on the
// device, no sync). Otherwise: route -> dispatch (one-block stable counting sort) -> gather
// rows by expert -> per expert two cuBLAS GEMMs around an act*up kernel -> scatter back with
// the gate. The per-expert GEMM sizes come from a host copy of the offsets (one stream sync
// per call).
// Decode: route -> gathered GEMV (gemv.cu) -> act*up -> gathered GEMV with the gate; no sync.
#include <cublas_v2.h>
#include <math.h>

#include "common.cuh"
#include "moe_dispatch.cuh"


namespace {

constexpr int ROUTE_WARPS = 8;   // tokens per block
constexpr int ROUTE_EG = 8;      // experts per pass over a token's row
constexpr int DISPATCH_THREADS = 1024;
constexpr int MAX_EXPERTS = 256;

// ---- routing -----------------------------------------------------------------------------
// One warp per token: lanes stride over d (coalesced x and router rows, 16-byte loads when
// d % 4 == 0; the router, X*d weights, stays in L1/L2), 8 experts per pass, shuffle sums,
// running argmax in lane 0.
template <typename WT>
__device__ __forceinline__ float4 load_w4(const WT *p) {
    if constexpr (sizeof(WT) == 2) {
        const uint2 v = __ldg(reinterpret_cast<const uint2 *>(p));
        const float2 a = bm_w2_to_f32<WT>(v.x), b = bm_w2_to_f32<WT>(v.y);
        return make_float4(a.x, a.y, b.x, b.y);
    } else {
        return __ldg(reinterpret_cast<const float4 *>(p));
    }
}
template <typename WT>
__device__ __forceinline__ float load_w1(const WT *p) {
    if constexpr (sizeof(WT) == 2)
        return bm_w_bits_to_f32<WT>(__ldg(reinterpret_cast<const unsigned short *>(p)));
    else return __ldg(p);
}

template <typename WT, bool VEC>
__global__ __launch_bounds__(ROUTE_WARPS * 32) void route_kernel(
    const float *__restrict__ x,    // (T, d)
    const WT *__restrict__ rw,      // (X, d)
    const float *__restrict__ rb,   // (X) or NULL
    float *__restrict__ logits,     // (T, X) or NULL
    int32_t *__restrict__ ids,      // (T)
    float *__restrict__ gates,      // (T)
    int64_t T, int d, int X) {
    const int lane = threadIdx.x & 31;
    const int64_t t = blockIdx.x * (int64_t)ROUTE_WARPS + (threadIdx.x >> 5);
    if (t >= T) return;  // whole warps leave together
    const float *xr = x + t * d;
    float best = -INFINITY;
    int best_id = 0;
    for (int e0 = 0; e0 < X; e0 += ROUTE_EG) {
        float acc[ROUTE_EG];
#pragma unroll
        for (int j = 0; j < ROUTE_EG; j++) acc[j] = 0.f;
        if (VEC) {
            for (int k = 4 * lane; k < d; k += 128) {
                const float4 xv = __ldg(reinterpret_cast<const float4 *>(xr + k));
#pragma unroll
                for (int j = 0; j < ROUTE_EG; j++) {
                    if (e0 + j < X) {
                        const float4 w = load_w4(rw + (int64_t)(e0 + j) * d + k);
                        acc[j] = fmaf(xv.x, w.x, acc[j]);
                        acc[j] = fmaf(xv.y, w.y, acc[j]);
                        acc[j] = fmaf(xv.z, w.z, acc[j]);
                        acc[j] = fmaf(xv.w, w.w, acc[j]);
                    }
                }
            }
        } else {
            for (int k = lane; k < d; k += 32) {
                const float xv = __ldg(xr + k);
#pragma unroll
                for (int j = 0; j < ROUTE_EG; j++)
                    if (e0 + j < X) acc[j] = fmaf(xv, load_w1(rw + (int64_t)(e0 + j) * d + k), acc[j]);
            }
        }
#pragma unroll
        for (int j = 0; j < ROUTE_EG; j++) {
            if (e0 + j < X) {  // uniform over the warp
                const float s = bm_warp_sum(acc[j]) + (rb ? rb[e0 + j] : 0.f);
                if (lane == 0) {
                    if (logits) logits[t * X + e0 + j] = s;
                    if (s > best) { best = s; best_id = e0 + j; }  // strict: ties keep the lowest
                }
            }
        }
    }
    if (lane == 0) {
        ids[t] = best_id;
        gates[t] = 1.f / (1.f + expf(-best));
    }
}

// ---- dispatch: one block, stable counting sort -------------------------------------------
// Warp w owns the contiguous token segment [w*seg, (w+1)*seg). Pass 1 counts per (warp,
// expert); an exclusive scan in (expert, warp) order gives each warp's first slot per expert;
// pass 2 walks the segment again in order, ranking equal ids inside each 32-token tile with
// __match_any_sync. Tokens of one expert thus land in increasing token order.
__global__ __launch_bounds__(DISPATCH_THREADS) void dispatch_kernel(
    const int32_t *__restrict__ ids,  // (T)
    int T, int X,
    int32_t *__restrict__ counts,     // (X) or NULL
    int32_t *__restrict__ offsets,    // (X+1) or NULL
    int32_t *__restrict__ perm) {     // (T)
    extern __shared__ int sm[];
    constexpr int W = DISPATCH_THREADS / 32;
    int *cnt = sm;            // (W, X): count, then first slot of warp w for expert x
    int *tot = sm + W * X;    // (X + 1): exclusive offsets
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int i = threadIdx.x; i < W * X; i += blockDim.x) cnt[i] = 0;
    __syncthreads();
    const int seg = (int)(((int64_t)T + W - 1) / W);
    const int beg = min(T, warp * seg), end = min(T, beg + seg);
    for (int m0 = beg; m0 < end; m0 += 32) {
        const int m = m0 + lane;
        if (m < end) {
            const int id = ids[m];
            if (id >= 0 && id < X) atomicAdd(&cnt[warp * X + id], 1);
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < X; e += blockDim.x) {
        int run = 0;
        for (int w = 0; w < W; w++) {
            const int c = cnt[w * X + e];
            cnt[w * X + e] = run;
            run += c;
        }
        tot[e] = run;
        if (counts) counts[e] = run;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int run = 0;
        for (int e = 0; e < X; e++) {
            const int c = tot[e];
            tot[e] = run;
            if (offsets) offsets[e] = run;
            run += c;
        }
        tot[X] = run;
        if (offsets) offsets[X] = run;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < W * X; i += blockDim.x) cnt[i] += tot[i % X];
    __syncthreads();
    for (int m0 = beg; m0 < end; m0 += 32) {
        const int m = m0 + lane;
        int id = m < end ? ids[m] : -1;
        const bool ok = id >= 0 && id < X;
        const int key = ok ? id : -1 - lane;  // lanes without a valid id group with nobody
        const unsigned peers = __match_any_sync(0xffffffffu, key);
        const int rank = __popc(peers & ((1u << lane) - 1u));
        int base = 0;
        if (ok) base = cnt[warp * X + id];
        __syncwarp();
        if (ok) {
            perm[base + rank] = m;
            if (lane == 31 - __clz(peers)) cnt[warp * X + id] = base + __popc(peers);  // last peer
        }
        __syncwarp();
    }
}

// ---- dispatch by the last block of a launch (moe_dispatch.cuh) ---------------------------
// What the engine's routing kernel runs after its routing (norm_route_kernel<., NR_PRE_DISP>),
// here on ids written beforehand, for the tests (bm_cuda_moe_dispatch under
// BLACKMAMBA_MOE_DISPATCH_LAST=1): `gridDim.x` blocks of NR's 256 threads draw tickets, the
// last one builds perm / offsets. Counts (when asked) from the offsets afterwards.
__device__ unsigned g_dispatch_ticket;  // 0 at load; 0 again after every launch
std::atomic<long long> g_dispatch_last{0};

__global__ __launch_bounds__(256) void dispatch_last_kernel(const int32_t *__restrict__ ids,
                                                            int T, int X,
                                                            int32_t *__restrict__ counts,
                                                            int32_t *__restrict__ offsets,
                                                            int32_t *__restrict__ perm) {
    extern __shared__ int sm[];
    if (!bm_last_block(&g_dispatch_ticket)) return;
    bm_dispatch_block(ids, T, X, offsets, perm, sm);
    __syncthreads();  // offsets written by thread 0: visible to the block after the barrier
    if (counts)
        for (int e = threadIdx.x; e < X; e += blockDim.x) counts[e] = offsets[e + 1] - offsets[e];
}

// ---- gather / act / scatter --------------------------------------------------------------
// xg[i] = x[perm[i]] for i < offsets[X]; OT float or bf16 bits (the BF16 GEMM path).
// xlo (BF16X2 math, else NULL): xg gets bf16(x) and xlo the low part x - bf16(x), as bf16.
template <typename OT>
__global__ void gather_kernel(const float *__restrict__ x,        // (T, d)
                              const int32_t *__restrict__ perm,   // (T)
                              const int32_t *__restrict__ total,  // (1) = offsets[X]
                              OT *__restrict__ xg,                // (T, d)
                              uint16_t *__restrict__ xlo,         // (T, d) or NULL
                              int d) {
    const int i = blockIdx.x;
    if (i >= *total) return;
    const float *src = x + (int64_t)perm[i] * d;
    OT *dst = xg + (int64_t)i * d;
    for (int k = threadIdx.x; k < d; k += blockDim.x) {
        if constexpr (sizeof(OT) == 2) {
            if (xlo) bm_f32_to_bf16_split(src[k], dst[k], xlo[(int64_t)i * d + k]);
            else dst[k] = bm_f32_to_bf16_bits(src[k]);
        } else {
            dst[k] = src[k];
        }
    }
}


// a[i, f] = act(h[i, f]) * h[i, F + f] for rows i < rows (device count or host count).
// f32 output goes in place into h's gate half (ld 2F): the same thread reads then writes.
// alo (BF16X2, bf16 output only, else NULL): the low part of a, as in gather_kernel.
template <typename OT>
__global__ void act_mul_kernel(float *h,                    // (rows, 2F)
                               OT *a,                       // (rows, lda)
                               int64_t lda, const int32_t *rows_dev, int64_t rows, int F, int act,
                               uint16_t *alo = nullptr) {   // (rows, lda) or NULL
    const int64_t n = (rows_dev ? (int64_t)*rows_dev : rows) * F;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = i / F;
        const int f = (int)(i % F);
        const float v = bm_act_fn(h[r * 2 * F + f], act) * h[r * 2 * F + F + f];
        if constexpr (sizeof(OT) == 2) {
            if (alo) bm_f32_to_bf16_split(v, a[r * lda + f], alo[r * lda + f]);
            else a[r * lda + f] = bm_f32_to_bf16_bits(v);
        } else {
            a[r * lda + f] = v;
        }
    }
}

// out[perm[i]] = gate[perm[i]] * og[i]
__global__ void scatter_kernel(const float *__restrict__ og,       // (T, d)
                               const int32_t *__restrict__ perm,   // (T)
                               const int32_t *__restrict__ total,  // (1)
                               const float *__restrict__ gates,    // (T) or NULL
                               float *__restrict__ out,            // (T, d)
                               int d) {
    const int i = blockIdx.x;
    if (i >= *total) return;
    const int t = perm[i];
    const float g = gates ? gates[t] : 1.f;
    const float *src = og + (int64_t)i * d;
    float *dst = out + (int64_t)t * d;
    for (int k = threadIdx.x; k < d; k += blockDim.x) dst[k] = g * src[k];
}

// ---- workspace layout ----------------------------------------------------------------------
struct MoeWs {
    int32_t *perm;      // (T)
    int32_t *offsets;   // (X+1)
    float *xg;          // (T, d) gathered rows; then the fc2 outputs (f32 math)
    uint16_t *xg_bf;    // (T, d) bf16 math only
    uint16_t *xg_lo;    // (T, d) BF16X2 math only: the low parts
    float *h;           // (T, 2F) fc1 outputs; act*up in place in [:, :F] (f32 math)
    uint16_t *a_bf;     // (T, F) bf16 math only
    uint16_t *a_lo;     // (T, F) BF16X2 math only
    float *og;          // (T, d) fc2 outputs (= xg unless bf16 math)
    float *w1f, *w2f;   // (2F, d), (d, F): one expert's weights as f32 (bf16 / fp16 weights,
                        // not bf16 math: fp16 weights always, exact, the activations fp32)
    size_t bytes;
};

// bf16 weights used as stored, activations as bf16 (BF16) or bf16 hi + lo (BF16X2).
bool is_bf16_math(bm_dtype wdtype, int math) {
    return wdtype == BM_BF16 && (math == BM_CUDA_MATH_BF16 || math == BM_CUDA_MATH_BF16X2);
}

MoeWs moe_ws(char *base, int64_t T, int64_t d, int64_t X, int64_t F, bm_dtype wdtype, int math) {
    MoeWs w{};
    size_t off = 0;
    auto take = [&](size_t bytes) -> char * {
        char *p = base ? base + off : nullptr;
        off += (bytes + 255) & ~(size_t)255;
        return p;
    };
    const bool bf16_math = is_bf16_math(wdtype, math);
    const bool split = bf16_math && math == BM_CUDA_MATH_BF16X2;
    const bool expand = wdtype != BM_F32 && !bf16_math;
    w.perm = (int32_t *)take(T * 4);
    w.offsets = (int32_t *)take((X + 1) * 4);
    w.xg = bf16_math ? nullptr : (float *)take(T * d * 4);
    w.xg_bf = bf16_math ? (uint16_t *)take(T * d * 2) : nullptr;
    w.xg_lo = split ? (uint16_t *)take(T * d * 2) : nullptr;
    w.h = (float *)take(T * 2 * F * 4);
    w.a_bf = bf16_math ? (uint16_t *)take(T * F * 2) : nullptr;
    w.a_lo = split ? (uint16_t *)take(T * F * 2) : nullptr;
    w.og = bf16_math ? (float *)take(T * d * 4) : w.xg;
    w.w1f = expand ? (float *)take(2 * F * d * 4) : nullptr;
    w.w2f = expand ? (float *)take(d * F * 4) : nullptr;
    w.bytes = off;
    return w;
}

// xlo (BF16X2, else NULL): y += xlo @ W^T after the first product (the low parts of x).
int gemm_rowmajor(cublasHandle_t hdl, const void *W, cudaDataType wt, const void *x,
                  cudaDataType xt, int64_t ldx, float *y, int64_t ldy, int64_t M, int64_t Nout,
                  int64_t Kin, cublasComputeType_t ct, const void *xlo = nullptr) {
    // Row-major y (M, Nout) = x (M, Kin) @ W (Nout, Kin)^T is, column-major,
    // y^T (Nout, M) = W^T ... i.e. op(A) = W^T with A = W viewed (Kin, Nout), B = x^T (Kin, M).
    const float one = 1.f, zero = 0.f;
    BM_CUBLAS_TRY(cublasGemmEx(hdl, CUBLAS_OP_T, CUBLAS_OP_N, (int)Nout, (int)M, (int)Kin, &one,
                               W, wt, (int)Kin, x, xt, (int)ldx, &zero, y, CUDA_R_32F, (int)ldy,
                               ct, CUBLAS_GEMM_DEFAULT));
    if (xlo)
        BM_CUBLAS_TRY(cublasGemmEx(hdl, CUBLAS_OP_T, CUBLAS_OP_N, (int)Nout, (int)M, (int)Kin,
                                   &one, W, wt, (int)Kin, xlo, xt, (int)ldx, &one, y, CUDA_R_32F,
                                   (int)ldy, ct, CUBLAS_GEMM_DEFAULT));
    return 0;
}

}  // namespace

extern "C" int bm_cuda_route_top1(const float *x, const void *rw, bm_dtype wdtype,
                                  const float *rb, float *logits, int32_t *ids, float *gates,
                                  int64_t T, int64_t d, int64_t X, cudaStream_t stream) {
    if (X < 1 || X > MAX_EXPERTS) return BM_CUDA_ARG_FAIL("route_top1: X must be in 1..256");
    if (d > INT32_MAX) return BM_CUDA_ARG_FAIL("route_top1: d too large");
    if (T <= 0) return 0;
    const unsigned grid = (unsigned)bm_cdiv(T, ROUTE_WARPS);
    const bool vec = d % 4 == 0 && ((uintptr_t)x & 15) == 0 && ((uintptr_t)rw & 15) == 0;
    if (wdtype == BM_BF16) {
        const uint16_t *w = (const uint16_t *)rw;
        if (vec) route_kernel<uint16_t, true><<<grid, ROUTE_WARPS * 32, 0, stream>>>(x, w, rb, logits, ids, gates, T, (int)d, (int)X);
        else route_kernel<uint16_t, false><<<grid, ROUTE_WARPS * 32, 0, stream>>>(x, w, rb, logits, ids, gates, T, (int)d, (int)X);
    } else if (wdtype == BM_F16) {
        const __half *w = (const __half *)rw;
        if (vec) route_kernel<__half, true><<<grid, ROUTE_WARPS * 32, 0, stream>>>(x, w, rb, logits, ids, gates, T, (int)d, (int)X);
        else route_kernel<__half, false><<<grid, ROUTE_WARPS * 32, 0, stream>>>(x, w, rb, logits, ids, gates, T, (int)d, (int)X);
    } else {
        const float *w = (const float *)rw;
        if (vec) route_kernel<float, true><<<grid, ROUTE_WARPS * 32, 0, stream>>>(x, w, rb, logits, ids, gates, T, (int)d, (int)X);
        else route_kernel<float, false><<<grid, ROUTE_WARPS * 32, 0, stream>>>(x, w, rb, logits, ids, gates, T, (int)d, (int)X);
    }
    BM_CUDA_LAUNCHED();
    return 0;
}

extern "C" int bm_cuda_moe_dispatch(const int32_t *ids, int64_t T, int64_t X, int32_t *counts,
                                    int32_t *offsets, int32_t *perm, cudaStream_t stream) {
    if (X < 1 || X > MAX_EXPERTS) return BM_CUDA_ARG_FAIL("moe_dispatch: X must be in 1..256");
    if (T > INT32_MAX) return BM_CUDA_ARG_FAIL("moe_dispatch: T too large");
    if (T <= 0) {
        // Nothing routed: zero counts and offsets.
        if (counts) BM_CUDA_TRY(cudaMemsetAsync(counts, 0, X * sizeof(int32_t), stream));
        if (offsets) BM_CUDA_TRY(cudaMemsetAsync(offsets, 0, (X + 1) * sizeof(int32_t), stream));
        return 0;
    }
    if (bm_env_switch("BLACKMAMBA_MOE_DISPATCH_LAST", false)) {  // a few blocks, so that the ticket really picks one of several
        int32_t *off = offsets;
        if (!off) return BM_CUDA_ARG_FAIL("moe_dispatch: the last-block form needs offsets");
        const unsigned blocks = 1 + (unsigned)(T % 7);
        const size_t smem = (size_t)bm_dispatch_smem_ints((int)X, 256 / 32) * sizeof(int);
        dispatch_last_kernel<<<blocks, 256, smem, stream>>>(ids, (int)T, (int)X, counts, off, perm);
        BM_CUDA_LAUNCHED();
        g_dispatch_last.fetch_add(1, std::memory_order_relaxed);
        return 0;
    }
    const size_t smem = (size_t)((DISPATCH_THREADS / 32) * X + X + 1) * sizeof(int);
    dispatch_kernel<<<1, DISPATCH_THREADS, smem, stream>>>(ids, (int)T, (int)X, counts, offsets, perm);
    BM_CUDA_LAUNCHED();
    return 0;
}

extern "C" long long bm_cuda_moe_dispatch_last_calls(void) {
    return g_dispatch_last.load(std::memory_order_relaxed);
}

extern "C" size_t bm_cuda_moe_experts_workspace(int64_t T, int64_t d, int64_t X, int64_t F,
                                                bm_dtype wdtype, int math) {
    return moe_ws(nullptr, T, d, X, F, wdtype, math).bytes;
}

extern "C" int bm_cuda_moe_experts(const float *x, const int32_t *ids, const float *gates,
                                   const void *fc1, const void *fc2, bm_dtype wdtype, bm_act act,
                                   int math, float *out, int64_t T, int64_t d, int64_t X,
                                   int64_t F, void *workspace, size_t workspace_bytes,
                                   void *cublas_handle, cudaStream_t stream) {
    if (X < 1 || X > MAX_EXPERTS) return BM_CUDA_ARG_FAIL("moe_experts: X must be in 1..256");
    if (T > INT32_MAX || d > INT32_MAX || 2 * F > INT32_MAX)
        return BM_CUDA_ARG_FAIL("moe_experts: size too large");
    if (T <= 0 || d <= 0) return 0;
    if (F <= 0) {
        BM_CUDA_TRY(cudaMemsetAsync(out, 0, (size_t)(T * d) * sizeof(float), stream));
        return 0;
    }
    const MoeWs ws = moe_ws((char *)workspace, T, d, X, F, wdtype, math);
    if (!workspace || workspace_bytes < ws.bytes)
        return BM_CUDA_ARG_FAIL("moe_experts: workspace too small (bm_cuda_moe_experts_workspace)");
    if (!cublas_handle) return BM_CUDA_ARG_FAIL("moe_experts: no cuBLAS handle");
    cublasHandle_t hdl = (cublasHandle_t)cublas_handle;
    if (math < BM_CUDA_MATH_FP32 || math > BM_CUDA_MATH_BF16X2)
        return BM_CUDA_ARG_FAIL("moe_experts: math must be BM_CUDA_MATH_FP32, TF32, BF16 or BF16X2");
    const bool bf16_math = is_bf16_math(wdtype, math);
    const int gmode = bm_cuda_moe_grouped_mode();
    if (bf16_math && gmode) {
        const bool ok = bm_cuda_moe_grouped_supported(x, fc1, fc2, wdtype, out, d, X, F);
        if (ok) {  // the workspace above is a superset of the grouped one (moe_ws)
            const int split = math == BM_CUDA_MATH_BF16X2;
            if (workspace_bytes < bm_cuda_moe_grouped_workspace(T, d, X, F, split))
                return BM_CUDA_ARG_FAIL("moe_experts: workspace too small for the grouped path");
            return bm_cuda_moe_grouped(x, ids, gates, fc1, fc2, act, split, out, T, d, X, F,
                                       workspace, workspace_bytes, stream);
        }
        if (gmode == 2)
            return BM_CUDA_ARG_FAIL("moe_experts: BLACKMAMBA_MOE_GROUPED=force but the grouped "
                                    "path does not support these sizes or alignments");
    }
    const cublasComputeType_t ct =
        (math == BM_CUDA_MATH_FP32) ? CUBLAS_COMPUTE_32F
        : bf16_math                 ? CUBLAS_COMPUTE_32F
                                    : CUBLAS_COMPUTE_32F_FAST_TF32;
    int st;

    if ((st = bm_cuda_moe_dispatch(ids, T, X, nullptr, ws.offsets, ws.perm, stream))) return st;
    const int32_t *total = ws.offsets + X;
    if (bf16_math) gather_kernel<uint16_t><<<(unsigned)T, 128, 0, stream>>>(x, ws.perm, total, ws.xg_bf, ws.xg_lo, (int)d);
    else gather_kernel<float><<<(unsigned)T, 128, 0, stream>>>(x, ws.perm, total, ws.xg, nullptr, (int)d);
    BM_CUDA_LAUNCHED();

    // The GEMM sizes: the one host sync of this path.
    int32_t off[MAX_EXPERTS + 1];
    BM_CUDA_TRY(cudaMemcpyAsync(off, ws.offsets, (X + 1) * sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
    BM_CUDA_TRY(cudaStreamSynchronize(stream));
    const int64_t rows = off[X];

    BM_CUBLAS_TRY(cublasSetStream(hdl, stream));
    BM_CUBLAS_TRY(cublasSetMathMode(hdl, CUBLAS_DEFAULT_MATH));
    const size_t wsz = wdtype == BM_F32 ? 4 : 2;
    const cudaDataType wt = bf16_math ? CUDA_R_16BF : CUDA_R_32F;
    for (int64_t e = 0; e < X; e++) {
        const int64_t n = off[e + 1] - off[e];
        if (n == 0) continue;
        const void *w1 = (const char *)fc1 + e * 2 * F * d * wsz;
        if (ws.w1f) {
            if ((st = bm_cuda_convert(w1, wdtype, ws.w1f, BM_F32, 2 * F * d, stream))) return st;
            w1 = ws.w1f;
        }
        if (bf16_math)
            st = gemm_rowmajor(hdl, w1, wt, ws.xg_bf + off[e] * d, CUDA_R_16BF, d,
                               ws.h + off[e] * 2 * F, 2 * F, n, 2 * F, d, ct,
                               ws.xg_lo ? ws.xg_lo + off[e] * d : nullptr);
        else
            st = gemm_rowmajor(hdl, w1, wt, ws.xg + off[e] * d, CUDA_R_32F, d,
                               ws.h + off[e] * 2 * F, 2 * F, n, 2 * F, d, ct);
        if (st) return st;
    }
    {
        const int64_t n = rows * F;
        const unsigned grid = (unsigned)(bm_cdiv(n, 256) < 65536 ? bm_cdiv(n, 256) : 65536);
        if (n > 0) {
            if (bf16_math)
                act_mul_kernel<uint16_t><<<grid, 256, 0, stream>>>(ws.h, ws.a_bf, F, nullptr, rows, (int)F, (int)act, ws.a_lo);
            else
                act_mul_kernel<float><<<grid, 256, 0, stream>>>(ws.h, ws.h, 2 * F, nullptr, rows, (int)F, (int)act);
            BM_CUDA_LAUNCHED();
        }
    }
    for (int64_t e = 0; e < X; e++) {
        const int64_t n = off[e + 1] - off[e];
        if (n == 0) continue;
        const void *w2 = (const char *)fc2 + e * d * F * wsz;
        if (ws.w2f) {
            if ((st = bm_cuda_convert(w2, wdtype, ws.w2f, BM_F32, d * F, stream))) return st;
            w2 = ws.w2f;
        }
        if (bf16_math)
            st = gemm_rowmajor(hdl, w2, wt, ws.a_bf + off[e] * F, CUDA_R_16BF, F,
                               ws.og + off[e] * d, d, n, d, F, ct,
                               ws.a_lo ? ws.a_lo + off[e] * F : nullptr);
        else
            st = gemm_rowmajor(hdl, w2, wt, ws.h + off[e] * 2 * F, CUDA_R_32F, 2 * F,
                               ws.og + off[e] * d, d, n, d, F, ct);
        if (st) return st;
    }
    // Tokens with an id outside [0, X) were routed nowhere: their rows stay zero.
    if (rows < T) BM_CUDA_TRY(cudaMemsetAsync(out, 0, (size_t)(T * d) * sizeof(float), stream));
    scatter_kernel<<<(unsigned)T, 128, 0, stream>>>(ws.og, ws.perm, total, gates, out, (int)d);
    BM_CUDA_LAUNCHED();
    return 0;
}

extern "C" size_t bm_cuda_moe_decode_workspace(int64_t T, int64_t F) {
    return (size_t)(T * 2 * F) * sizeof(float);
}

extern "C" int bm_cuda_moe_experts_decode(const float *x, const int32_t *ids, const float *gates,
                                          const void *fc1, const void *fc2, bm_dtype wdtype,
                                          bm_act act, float *out, int64_t T, int64_t d, int64_t X,
                                          int64_t F, void *workspace, size_t workspace_bytes,
                                          cudaStream_t stream) {
    if (X < 1 || X > 65535) return BM_CUDA_ARG_FAIL("moe_experts_decode: X must be in 1..65535");
    if (T > INT32_MAX || d > INT32_MAX || 2 * F > INT32_MAX)
        return BM_CUDA_ARG_FAIL("moe_experts_decode: size too large");
    if (T <= 0 || d <= 0) return 0;
    if (F <= 0) {
        BM_CUDA_TRY(cudaMemsetAsync(out, 0, (size_t)(T * d) * sizeof(float), stream));
        return 0;
    }
    if (!workspace || workspace_bytes < bm_cuda_moe_decode_workspace(T, F))
        return BM_CUDA_ARG_FAIL("moe_experts_decode: workspace too small (bm_cuda_moe_decode_workspace)");
    float *h = (float *)workspace;  // (T, 2F)
    int st;
    GemvParams p1{fc1, x, d, ids, nullptr, nullptr, h, 2 * F, (int)T, (int)(2 * F), (int)d};
    if ((st = bm_gemv_launch(p1, wdtype, (int)X, 0, stream))) return st;
    const int64_t n = T * F;
    act_mul_kernel<float><<<(unsigned)bm_cdiv(n, 256), 256, 0, stream>>>(h, h, 2 * F, nullptr, T, (int)F, (int)act);
    BM_CUDA_LAUNCHED();
    // Tokens whose id is outside [0, X) match no block: zero out first so they read 0.
    BM_CUDA_TRY(cudaMemsetAsync(out, 0, (size_t)(T * d) * sizeof(float), stream));
    GemvParams p2{fc2, h, 2 * F, ids, gates, nullptr, out, d, (int)T, (int)d, (int)F};
    return bm_gemv_launch(p2, wdtype, (int)X, 0, stream);
}
