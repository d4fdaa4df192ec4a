// engine.cu: the whole BlackMamba model on the GPU (SPEC 1): weights, workspaces, recurrent
// state, prefill, the decode step as a CUDA graph, greedy decoding on the device.
//
// Letters: B batch, L length, T = B*L tokens, d hidden, E d_inner, N state, K conv width,
// R dt rank, X experts, F ffn hidden, G = 2F (gated) or F, V vocab.
//
// The layer loop is model.py's `_layers` with the ops replaced by the launchers of
// cuda/*.cu (bm_cuda.h); this file adds only glue kernels (embedding gather, B/C split,
// bias add, the fused dt_proj + recurrent scan step, the expert activation, argmax).
//
// Matrix products (`linear` below):
//   - up to GEMV_ROWS rows: the bf16/fp32 GEMV (gemv.cu), fp32 activations, exact; except
//     decode batches of dec_gemm_min() (2) to GEMV_ROWS rows under BF16 / BF16X2 math, which
//     take the batched paths below with split activations (Ws::gv, Ws::dsplit, decode_body:
//     the 8-row GEMVs read the weights at 0.4-1 TB/s, so batch 8 cost more than batch 64),
//     each split product as one GEMM of 2B rows where it can (stack_on), and since session 22
//     prefills of prefill_gv()'s 2 to GEMV_ROWS tokens likewise (the short prompts' stacked
//     forms: stack_in_fill_ok, xproj_stack_ok, prefill_pair_ok);
//   - more rows, bf16 weights, BM_CUDA_MATH_BF16: activations rounded to bf16, cuBLAS bf16
//     GEMM with fp32 accumulate (tensor cores; ~3e-3 relative per product); except prefill
//     products (and MoE layers) of at most cfg.bf16_split_rows rows (default 128), which run
//     as BF16X2, and the two small Mamba products (x_proj, dt_proj) wherever they would round:
//     tf32 on float32 copies of their weights (tf32_small(): no conversion pass, and more
//     exact than bf16);
//   - BM_CUDA_MATH_BF16X2 (every product of more than GEMV_ROWS rows, decode included): the
//     activations split into bf16 hi + bf16 lo (x - hi), two bf16 GEMMs accumulating in fp32:
//     ~1e-5 relative per product, twice the tensor-core work. Why the small prefills split:
//     bf16 rounding noise (~3e-3 per product, ~0.003 RMS on a logit) decides near-ties, and
//     real checkpoints have them: on the tiny-a golden (74 tokens) one top-2 logit gap of
//     0.0036 and one router gap of 0.0037 (tools/bf16_emulate.py); at those sizes the GEMMs are
//     bound by launches and weight reads, so the second GEMM costs little (benchmarks);
//   - more rows, bf16 weights, FP32/TF32 math: GEMV up to GEMV_ROWS_EXACT rows (reads the
//     weights once per 8 rows), else the weights expanded to fp32 into a scratch matrix and a
//     cuBLAS fp32 (or tf32) GEMM;
//   - fp32 weights: cuBLAS fp32 GEMM (tf32 with BM_CUDA_MATH_TF32 or _BF16);
//   - fp16 weights (BM_F16, IEEE half): as bf16 weights under FP32/TF32 math whatever `math`
//     says (the GEMVs and expert rows read the half weights, 8 per 16-byte load; larger
//     products expand them to fp32 exactly, and the MoE prefill per expert, moe.cu): the
//     activations stay fp32, so nothing can overflow fp16's range (|x| <= 65504), and the
//     result is the fp32 model's on the fp16-rounded weights up to summation order.
// MoE / MLP layers (routing: norm_route_kernel, one block per token, fused with the layer's
// RMSNorm; route_small_kernel or moe.cu's route_top1 where the norm is separate):
//   - decode of 2+ rows with BF16 math: gated layers through grouped.cu's grouped GEMMs
//     (bm_cuda_moe_grouped: each expert's weights once, its own tokens only); otherwise (or
//     BLACKMAMBA_MOE_GROUPED=0) every token through all experts with two strided-batched
//     bf16 GEMMs, then each token keeps its expert's rows (expert_all);
//   - prefills of more than MOE_GROUPED_MIN_DEFAULT (4) tokens with BF16 math: grouped.cu
//     (no host sync);
//   - otherwise up to GEMV_ROWS tokens (batch 1, small prefills, non-BF16 math): per-token
//     expert rows (expert_rows_kernel), fp32 activations; up to MOE_GEMV_MAX tokens (and any
//     ungated MLP) the gathered GEMV (gemv.cu); larger prefills bm_cuda_moe_experts's cuBLAS
//     per expert (one host sync per layer).
// Everything on the decode path is free of host synchronisation, so it is captured.
// Measured on the H200 at the 2.8B shape: benchmarks/RESULTS.md (GPU section).
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <new>
#include <vector>

#include <cublas_v2.h>

#include "common.cuh"
#include "moe_dispatch.cuh"

#include <type_traits>

// xdt.cu: the batched decode's x_proj / dt_proj kernels (float32 weights).
bool bm_xdt_ok(int64_t M, int64_t E, int64_t R, int64_t N, const void *xc, const void *x_w,
               const void *dbc, const void *dt_w, const void *delta);
int bm_xdt_xproj(const float *xc, const float *x_w, float *dbc, int64_t M, int64_t P,
                 int64_t E, cudaStream_t stream);
int bm_xdt_dtproj(const float *dbc, int64_t P, const float *dt_w, float *delta, int64_t M,
                  int64_t E, int64_t R, cudaStream_t stream);

#define TRY(call)                     \
    do {                              \
        int st_ = (call);             \
        if (st_) return st_;          \
    } while (0)

namespace {

constexpr float EPS = 1e-5f;            // RMSNorm and final LayerNorm (SPEC 1)
constexpr int64_t GEMV_ROWS = 8;        // the GEMV reads W once for up to 8 rows
constexpr int64_t GEMV_ROWS_EXACT = 64; // bf16 weights, fp32 math: GEMV instead of expansion
constexpr int64_t MOE_GEMV_MAX = 64;    // tokens: gathered GEMV below, cuBLAS experts above
// A prefill of more than this many tokens runs its gated MoE layers through grouped.cu where
// grouped_moe() allows (bf16 math); up to it, expert_gemv. Session 20: 5 (was MOE_GEMV_MAX):
// the gathered GEMV reads every expert's weights once per 8-token tile, so a 32-token prompt
// read them 4 times (fc1 222 us a layer on the H200, 83% of a 9.75 ms prefill of 32 tokens);
// the per-token expert rows (up to 8 tokens) win at 2-4 tokens (grouped.cu +11 / +7 / +5%)
// and lose from 6 (-2% at 6, -6% at 8). Session 23: 4, since the grouped tiles' plain-launch
// defaults (grouped.cu plain_tile): 5 tokens -3.5%, 4 / 3 / 2 still +2.7 / +11 / +13% (H200,
// 2.8B shape, same process). BLACKMAMBA_MOE_GEMV_MAX=<tokens> (1..MOE_GEMV_MAX) for A/B, read
// per forward.
constexpr int64_t MOE_GROUPED_MIN_DEFAULT = 4;
constexpr int64_t LOGIT_ROWS = 1024;    // prefill LM head: rows of logits per block
constexpr size_t BLAS_WS_BYTES = 32u << 20;  // user workspace: no allocation inside capture

std::atomic<uint64_t> g_state_serial{1};  // identifies a state's buffers for graph reuse

int alloc_fail(const char *file, int line, cudaError_t e, size_t bytes, const char *what) {
    char msg[256];
    snprintf(msg, sizeof msg, "cudaMalloc of %zu bytes (%s) failed: %s", bytes, what,
             cudaGetErrorString(e));
    cudaGetLastError();  // clear the (non-sticky) allocation error
    return bm_cuda_fail_(file, line, (int)e, cudaGetErrorName(e), msg);
}

int dev_alloc(void **p, size_t bytes, const char *what) {
    *p = nullptr;
    if (bytes == 0) return 0;
    cudaError_t e = cudaMalloc(p, bytes);
    if (e != cudaSuccess) {
        *p = nullptr;
        return alloc_fail(__FILE__, __LINE__, e, bytes, what);
    }
    return 0;
}

// Hands out 256-byte aligned pieces of one allocation; with base NULL it only counts bytes
// (the sizing pass).
struct Arena {
    char *base;
    size_t off;
    template <typename P>
    P *take(int64_t count) {
        P *p = base ? reinterpret_cast<P *>(base + off) : nullptr;
        off += ((size_t)count * sizeof(P) + 255) & ~(size_t)255;
        return p;
    }
};

// One layer's weights on the device; NULL where the layer has no such part.
struct LayerDev {
    int mamba;              // has a Mamba mixer
    int X;                  // 0 no MLP, 1 dense MLP, >= 2 MoE experts
    float *norm_w;          // (d)
    float *norm_moe_w;      // (d) parallel "rX" only
    void *in_w;             // (2E, d) wdtype
    float *in_b;            // (2E) or NULL
    float *conv_w, *conv_b; // (E, K), (E) or NULL
    void *x_w;              // (R + 2N, E) wdtype
    void *dt_w;             // (E, R) wdtype
    // bf16 weights under BF16 math: float32 copies of the two small projections, for their
    // tf32 products at more than GEMV_ROWS unsplit rows (tf32_small()): no bf16 conversion
    // pass over xc / dbc, and dt_proj's 92-deep rows (184 bytes, no 16-byte alignment in
    // bf16) get cuBLAS's aligned kernels. 2.5 MB a layer at the 2.8B shape.
    float *x_wf;            // (R + 2N, E) or NULL
    float *dt_wf;           // (E, R) or NULL
    float *dt_b;            // (E)
    float *A, *D;           // (E, N) = -exp(A_log), (E)
    void *out_w;            // (d, E) wdtype
    float *out_b;           // (d) or NULL
    float *router_w, *router_b;  // (X, d), (X): float32 like the CPU model
    void *fc1, *fc2;        // (X, G, d), (X, d, F) wdtype, experts contiguous
};

// Activations of one batch size (decode) or one token capacity (prefill).
struct Ws {
    int64_t T;              // token capacity (decode: = B)
    bool decode;
    int64_t gv;             // products of at most gv rows run as GEMVs (GEMV_ROWS; 1 in a
                            // decode of dec_gemm_min() rows or more: see decode_body)
    bool dsplit;            // decode, batched at <= GEMV_ROWS rows: products split (split_x)
    char *base;
    size_t bytes;
    int32_t *tok;           // (T) input ids
    float *h, *r, *xn, *yf; // (T, d): mixer output, residual, normed input, final LN output
    float *r2;              // (1, d) batch-1 decode: the residual's other buffer (NormIn)
    float *xm, *mo;         // (T, d) parallel layers: MLP input and output
    float *xz;              // (2, T, E): x = xz (T, E), z = xz + T*E (T, E)
    float *xc, *y;          // (T, E) conv output, scan output
    float *delta;           // (T, E) prefill, and decode at T > GEMV_ROWS
    float *dbc;             // (T, R + 2N) x_proj output
    float *Bm, *Cm;         // (T, N) prefill: B and C split out of dbc
    char *scan_ws;          // prefill: the sequence-parallel scan's segment states
    size_t scan_ws_bytes;   //   (bm_cuda_scan_workspace)
    float *xpart;           // (xpart_rows, R + 2N) BF16 math: x_proj's K-split partial sums
    int64_t xpart_rows;
    int32_t *ids;           // (T) expert of each token
    float *gates;           // (T)
    float *rlog;            // (T, Xmax) router logits (tracing)
    float *eh;              // (rows, G) expert hidden of the GEMV path
    uint16_t *xbf;          // (T + Ts, max(d, E, R)) bf16 copy of a GEMM input (BF16 math)
    uint16_t *xlo;          // (Ts, max(d, E, R)) its low part (split products), Ts = the
                            // rows that may split (T under BF16X2, else <= bf16_split_rows);
                            // = xbf + T max(d, E, R) (ws_layout)
    int64_t Ts;
    float *hall;            // (X, T, G) decode, BF16 math, T > GEMV_ROWS: every expert's fc1
    uint16_t *abf;          //   (T, F) the chosen expert's act(fc1) as bf16
    uint16_t *alo;          //   (T, F) its low part (BF16X2)
    float *oall;            //   (X, T, d) every expert's fc2
    void *moe;              // bm_cuda_moe_experts workspace (prefill), bm_cuda_moe_grouped
                            // workspace (decode, T > GEMV_ROWS, gated, BF16 math)
    size_t moe_bytes;
    int64_t LB;             // rows of logits per block
    float *logits;          // (logit_rows, V): LB rows, 2T in a decode whose products may
    int64_t logit_rows;     // split (Ts == T): room for the stacked head's lo rows
    int32_t *amax;          // (T)
    unsigned *ticket;       // (1) norm_route_kernel<., NR_PRE_DISP>'s counter, kept 0
    float *hk;              // (2, T, d) decode, T >= 2: out_proj's two K halves (out_ksplit_on);
                            // (2, hk_rows, d) prefill: a split out_proj's two products
    int64_t hk_rows;        //   (prefill_pair_ok; T in decode)
    float *ssp;             // (T, bm_cuda_moe_norm_parts(d)) decode, T >= 2: the norm in fc2
                            // (norm_fc2_on): the residual's partial sums of squares
    float *xzt;             // (xzt_rows, 2E) decode, T >= 2: in_proj's x and z side by side
                            // where the norm ran in fc2, or the hi then lo rows of a stacked
                            // split in_proj (mamba_step)
    int64_t xzt_rows;
    // Decode graphs (decode workspaces; ensure_graph): one a state and switch values (a
    // graph holds the state's buffer addresses), at most dec_graphs_max() kept, the least
    // recently used replaced; exec is the one ensure_graph picked last.
    struct DecGraph {
        uint64_t serial, env, used;  // the state's serial, env_digest(), ensure_graph's clock
        cudaGraphExec_t exec;
    };
    std::vector<DecGraph> graphs;
    uint64_t clock;
    cudaGraphExec_t exec;
};

}  // namespace

extern char **environ;  // the BLACKMAMBA_* switches in the prefill and decode graphs' keys

struct bm_cuda_state {
    int64_t B;
    uint64_t serial;
    char *base;
    size_t bytes;
    std::vector<float *> conv;  // per layer (B, K-1, E) or NULL
    std::vector<float *> ssm;   // per layer (B, E, N) or NULL
};

struct bm_cuda_model {
    bm_cuda_config cfg;
    std::vector<int> mamba_v, experts_v;
    int64_t G;                 // fc1 rows per expert
    int64_t Xmax;              // most experts in a layer (>= 1)
    bool has_parallel, has_gated_mlp, has_mlp;
    char *wbase;
    size_t wbytes;
    void *emb;                 // (V, d) wdtype
    float *final_w, *final_b;  // (d)
    std::vector<LayerDev> layers;
    cudaStream_t stream;
    // The batched decode's L2 staging branch (l2side_fork): its stream, the fork and join
    // events, and whether a branch is open (joined before the step's final norm).
    cudaStream_t side;
    cudaEvent_t side_fork, side_join;
    bool side_open;
    cublasHandle_t blas;
    void *blas_ws;
    float *wf;                 // bf16 -> fp32 expansion scratch (lazy), wf_elems floats
    int64_t wf_elems;
    Ws *pre;                   // prefill workspace (grown on demand)
    std::vector<Ws *> dec;     // decode workspaces, one per batch size
    // Profiling (bm_cuda_bench_profile): an event after each stage while prof_on.
    bool prof_on;
    bool prof_graph;           // capturing: events must be recorded as external nodes
    std::vector<cudaEvent_t> prof_ev;
    std::vector<int> prof_kind;
    size_t prof_n;
    // Prefill graphs (session 25; prefill_graph): the forward of a (B, L) prefill seen before
    // under the same BLACKMAMBA_* switches, captured on a shadow state of that batch size and
    // replayed; `pg_seen` holds the keys seen once (not yet captured), `pg_clock` orders the
    // graphs for eviction. A grown prefill workspace drops them all (prefill_ws).
    struct PrefillGraph {
        int64_t B, L;
        uint64_t env;
        cudaGraphExec_t exec;  // NULL: this key does not capture (runs eagerly)
        uint64_t used;
    };
    std::vector<PrefillGraph> pg, pg_seen;
    std::vector<bm_cuda_state *> pg_shadow;
    uint64_t pg_clock;
};

namespace {

// ---- glue kernels --------------------------------------------------------------------------

// WT: float, uint16_t (bf16 bits) or __half (common.cuh bm_w2_to_f32).
template <typename WT>
__device__ __forceinline__ float ld_w(const WT *p) {
    if constexpr (std::is_same<WT, __half>::value) return __half2float(*p);
    else if constexpr (sizeof(WT) == 2) return bm_bf16_bits_to_f32(*p);
    else return *p;
}
// An activation load of a wait-first kernel: B1 (the batch-1 graph, behind early kernels) a
// plain ld.global.ca, which ptxas keeps after the wait; else __ldg as before (common.cuh).
template <bool B1, typename T>
__device__ __forceinline__ T ld_act(const T *p) {
    if constexpr (B1) return __ldca(p);
    else return __ldg(p);
}
// The same through a plain ld.global.ca (the early kernels' pre-wait loads: common.cuh).
template <typename WT>
__device__ __forceinline__ float ld_w_ca(const WT *p) {
    if constexpr (sizeof(WT) == 2) return bm_w_bits_to_f32<WT>(__ldca(reinterpret_cast<const unsigned short *>(p)));
    else return __ldca(p);
}

// out[t] = emb[ids[t]] as float32. Ids are clamped: a bad id reads a valid row, never past V
// (host ids are validated at the boundary; device ids come from argmax < V).
template <typename WT>
__global__ void embed_kernel(const int32_t *__restrict__ ids,  // (T)
                             const WT *__restrict__ emb,       // (V, d)
                             float *__restrict__ out,          // (T, d)
                             int d, int V) {
    const int64_t t = blockIdx.x;
    int id = ids[t];
    id = id < 0 ? 0 : id >= V ? V - 1 : id;
    const WT *src = emb + (int64_t)id * d;
    for (int k = threadIdx.x; k < d; k += blockDim.x) out[t * d + k] = ld_w(src + k);
}

// Bm[t] = dbc[t, R:R+N], Cm[t] = dbc[t, R+N:R+2N]: the scan reads B, C with stride N.
__global__ void split_bc_kernel(const float *__restrict__ dbc,  // (T, R + 2N)
                                float *__restrict__ Bm,         // (T, N)
                                float *__restrict__ Cm,         // (T, N)
                                int64_t T, int R, int N) {
    const int64_t n = T * N;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = i / N;
        const int k = (int)(i % N);
        const float *row = dbc + t * (R + 2 * N) + R;
        Bm[i] = row[k];
        Cm[i] = row[N + k];
    }
}

// xb (M, K) = bf16(x (M, ldx)[:, :K]): the GEMM input of the BF16 math path; with xlo
// (split products) also xlo (M, K) = bf16(x - bf16(x)).
__global__ void to_bf16_kernel(const float *__restrict__ x, int64_t ldx,
                               uint16_t *__restrict__ xb, int64_t M, int64_t K,
                               uint16_t *__restrict__ xlo = nullptr) {
    const int64_t n = M * K;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const float v = x[(i / K) * ldx + i % K];
        if (xlo) bm_f32_to_bf16_split(v, xb[i], xlo[i]);
        else xb[i] = bm_f32_to_bf16_bits(v);
    }
}

// to_bf16_kernel without its two 64-bit divisions per element (which made it compute-bound:
// ~25 us for the 2048 x 2944 x_proj / out_proj inputs against ~9 us of bytes): one float4 per
// thread and row, rows strided by grid.y. Needs K % 4 == 0, ldx % 4 == 0, x 16-byte aligned,
// xb / xlo 8-byte aligned (K4 = K / 4).
__global__ void to_bf16_vec_kernel(const float *__restrict__ x, int64_t ldx,
                                   uint16_t *__restrict__ xb, int M, int K4,
                                   uint16_t *__restrict__ xlo) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= K4) return;
    for (int r = blockIdx.y; r < M; r += gridDim.y) {
        const float4 v = *reinterpret_cast<const float4 *>(x + (int64_t)r * ldx + 4 * c);
        bm_store_bf16(v, xb, xlo, (int64_t)r * K4 + c);  // float4 units of xb (M, K)
    }
}

// x_proj's K-split: dbc[m, j] = sum_s part[s, m, j] (s ascending), and in prefill also
// Bm[m] = dbc[m, R:R+N], Cm[m] = dbc[m, R+N:] (what split_bc_kernel did). ks * M * P < 2^31.
// stacked (xproj_stack_ok): part is (ks, 2M, P), each slice's hi rows' products then its lo
// rows'; each slice's two are summed first, as the lo GEMM's beta = 1 pass did, so the same
// bits as the two-GEMM form where cuBLAS gives the same products.
__global__ void xproj_reduce_kernel(const float *__restrict__ part,  // (ks, M, P)
                                    int ks, int M, int P,
                                    float *__restrict__ dbc,         // (M, P)
                                    float *__restrict__ Bm,          // (M, N) or NULL
                                    float *__restrict__ Cm,          // (M, N) or NULL
                                    int R, int N, int stacked,
                                    uint16_t *__restrict__ dbf,      // (M, R) or NULL
                                    uint16_t *__restrict__ dlo) {    // (M, R) or NULL
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= M * P) return;
    const int64_t lo = stacked ? (int64_t)M * P : 0, kst = (stacked ? 2 : 1) * (int64_t)M * P;
    float acc = stacked ? part[i] + part[lo + i] : part[i];
    for (int k = 1; k < ks; k++)
        acc += stacked ? part[k * kst + i] + part[k * kst + lo + i] : part[k * kst + i];
    dbc[i] = acc;
    if (Bm || dbf) {
        const int m = i / P, j = i - m * P - R;
        if (j < 0) {  // dt_proj's input, as to_bf16 would write it (dbf: fuse_bf_ok)
            if (dbf) bm_store_bf16(acc, dbf, dlo, m * R + j + R);
        } else if (Bm) {
            if (j < N) Bm[m * N + j] = acc;
            else Cm[m * N + j - N] = acc;
        }
    }
}

// y (M, ldy)[:, :N] += bias (N)
__global__ void add_bias_kernel(float *__restrict__ y, int64_t ldy,
                                const float *__restrict__ bias, int64_t M, int64_t N) {
    const int64_t n = M * N;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        y[(i / N) * ldy + i % N] += bias[i % N];
}

// a (n) += b (n): the parallel layer's mamba(x) + mlp(x).
__global__ void add_kernel(float *__restrict__ a, const float *__restrict__ b, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        a[i] += b[i];
}


// In place on the expert hidden h (T, G): gated h[:, :F] = act(h[:, :F]) * h[:, F:],
// else h = act(h).
// B1: in the batch-1 graph, behind early kernels (common.cuh bm_pdl_wait_b1).
template <bool B1 = false>
__global__ void expert_act_kernel(float *h, int64_t T, int F, int G, int gated, int act) {
    if constexpr (B1) bm_pdl_wait_b1();
    else bm_pdl_wait();
    const int64_t n = T * F;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float *row = h + (i / F) * G;
        const int f = (int)(i % F);
        const float a = bm_act_fn(row[f], act);
        row[f] = gated ? a * row[F + f] : a;
    }
}

// Expert rows for a few tokens: y[t, r] = scale[t] * (W[e_t, r, :] . x[t, :]), e_t = ids[t]
// (ids NULL: 0; scale NULL: 1). Grid (row blocks, T): each token streams its own expert's rows
// and no block exists for an expert nobody uses (the gathered GEMV of gemv.cu launches blocks
// for all X experts). KS warps share a row (K-split), partial sums meet in shared memory.
// B1: in the batch-1 graph, behind early kernels: bm_pdl_wait_b1, and activations through
// __ldca, which ptxas keeps after the wait (common.cuh).
template <typename WT, int KS, bool VEC, bool B1 = false>
__global__ __launch_bounds__(256) void expert_rows_kernel(
    const WT *__restrict__ W,         // (X, Nout, Kin)
    const float *__restrict__ x,      // (T, ldx)
    int64_t ldx,
    const int32_t *__restrict__ ids,  // (T) or NULL
    const float *__restrict__ scale,  // (T) or NULL
    float *__restrict__ y,            // (T, ldy)
    int64_t ldy, int Nout, int Kin) {
    if constexpr (B1) bm_pdl_wait_b1();
    else bm_pdl_wait();
    constexpr int RPB = 8 / KS;                       // rows per block of 8 warps
    constexpr int VW = sizeof(WT) == 2 ? 8 : 4;       // weights per 16-byte load
    __shared__ float part[8];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t t = blockIdx.y;
    const int row = blockIdx.x * RPB + warp / KS;
    const int kp = warp % KS;
    float acc = 0.f;
    if (row < Nout) {
        const int64_t e = ids ? (B1 ? __ldca(ids + t) : ids[t]) : 0;
        const WT *w = W + (e * Nout + row) * (int64_t)Kin;
        const float *xr = x + t * ldx;
        if (VEC) {
            const int units = Kin / VW, per = (units + KS - 1) / KS;
            const int u0 = kp * per, u1 = min(units, u0 + per);
#pragma unroll 4
            for (int u = u0 + lane; u < u1; u += 32) {
                const int k = u * VW;
                if constexpr (sizeof(WT) == 2) {
                    const uint4 v = __ldg(reinterpret_cast<const uint4 *>(w + k));
                    const float4 x0 = ld_act<B1>(reinterpret_cast<const float4 *>(xr + k));
                    const float4 x1 = ld_act<B1>(reinterpret_cast<const float4 *>(xr + k + 4));
                    const float2 a = bm_w2_to_f32<WT>(v.x), b = bm_w2_to_f32<WT>(v.y);
                    const float2 c = bm_w2_to_f32<WT>(v.z), d = bm_w2_to_f32<WT>(v.w);
                    acc = fmaf(a.x, x0.x, acc); acc = fmaf(a.y, x0.y, acc);
                    acc = fmaf(b.x, x0.z, acc); acc = fmaf(b.y, x0.w, acc);
                    acc = fmaf(c.x, x1.x, acc); acc = fmaf(c.y, x1.y, acc);
                    acc = fmaf(d.x, x1.z, acc); acc = fmaf(d.y, x1.w, acc);
                } else {
                    const float4 v = __ldg(reinterpret_cast<const float4 *>(w + k));
                    const float4 x0 = ld_act<B1>(reinterpret_cast<const float4 *>(xr + k));
                    acc = fmaf(v.x, x0.x, acc); acc = fmaf(v.y, x0.y, acc);
                    acc = fmaf(v.z, x0.z, acc); acc = fmaf(v.w, x0.w, acc);
                }
            }
        } else {
            const int per = (Kin + KS - 1) / KS;
            const int k0 = kp * per, k1 = min(Kin, k0 + per);
#pragma unroll 4
            for (int k = k0 + lane; k < k1; k += 32) acc = fmaf(ld_w(w + k), ld_act<B1>(xr + k), acc);
        }
    }
    acc = bm_warp_sum(acc);
    if (KS > 1) {  // every warp gets here: the barrier is unconditional
        if (lane == 0) part[warp] = acc;
        __syncthreads();
        if (kp == 0)
            for (int q = 1; q < KS; q++) acc += part[warp + q];
    }
    if (kp == 0 && lane == 0 && row < Nout) y[t * ldy + row] = scale ? acc * (B1 ? __ldca(scale + t) : scale[t]) : acc;
}

// expert_rows_kernel<WT, KS, true> in the early PDL form (bm_pdl_early), for fc2 only: the
// token's expert id and gate are read BEFORE the wait, from L2 (ld.global.cg: this SM's L1 may
// still hold the previous layer's ids line), and with them this lane's first ROWS_PRE 16-byte
// pieces of its expert row; then the wait, then the hidden row h and the FMAs (same order as
// expert_rows_kernel: bit-identical). Why the early ids read is safe: they were written by the
// routing kernel two launches back, and the kernel in between (fc1: expert_rows_gated_kernel,
// or expert_act_kernel) triggers its dependents only after its own wait, i.e. after the
// routing kernel completed; so this kernel's blocks only start once the ids are in L2.
// ROWS_PRE covers fc2's slices at the 2.8B shape (484 pieces a row in 4 slices: 3.8 a lane);
// at most 40 registers, so that all 736 blocks of that fc2 are resident at once (6 an SM).
constexpr int ROWS_PRE = 4;
template <typename WT, int KS>
__global__ __launch_bounds__(256, 6) void expert_rows_early_kernel(
    const WT *__restrict__ W,         // (X, Nout, Kin)
    const float *__restrict__ x,      // (T, ldx)
    int64_t ldx,
    const int32_t *__restrict__ ids,  // (T) or NULL
    const float *__restrict__ scale,  // (T) or NULL
    float *__restrict__ y,            // (T, ldy)
    int64_t ldy, int Nout, int Kin) {
    bm_pdl_trigger();
    constexpr int RPB = 8 / KS;
    constexpr int VW = sizeof(WT) == 2 ? 8 : 4;
    __shared__ float part[8];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t t = blockIdx.y;
    const int row = blockIdx.x * RPB + warp / KS;
    const int kp = warp % KS;
    const bool live = row < Nout;
    // ---- before the wait: ids / gates (see above) and weights ----
    const int64_t e = ids ? __ldcg(ids + t) : 0;
    const float sc = scale ? __ldcg(scale + t) : 1.f;
    const WT *w = W + (e * Nout + (live ? row : 0)) * (int64_t)Kin;
    const int units = Kin / VW, per = (units + KS - 1) / KS;
    const int u0 = kp * per, u1 = min(units, u0 + per);
    uint4 wr[ROWS_PRE];
#pragma unroll
    for (int i = 0; i < ROWS_PRE; i++) {
        const int u = u0 + lane + 32 * i;
        if (live && u < u1) wr[i] = __ldca(reinterpret_cast<const uint4 *>(w + (int64_t)u * VW));
        else wr[i] = make_uint4(0, 0, 0, 0);  // never used
    }
    bm_pdl_wait_only();
    bm_l1_invalidate_block();
    // ---- after the wait: the hidden row ----
    float acc = 0.f;
    if (live) {
        const float *xr = x + t * ldx;
        auto fma_piece = [&](const uint4 v, int k) {
            if constexpr (sizeof(WT) == 2) {
                const float4 x0 = __ldca(reinterpret_cast<const float4 *>(xr + k));
                const float4 x1 = __ldca(reinterpret_cast<const float4 *>(xr + k + 4));
                const float2 a = bm_w2_to_f32<WT>(v.x), b = bm_w2_to_f32<WT>(v.y);
                const float2 c = bm_w2_to_f32<WT>(v.z), d = bm_w2_to_f32<WT>(v.w);
                acc = fmaf(a.x, x0.x, acc); acc = fmaf(a.y, x0.y, acc);
                acc = fmaf(b.x, x0.z, acc); acc = fmaf(b.y, x0.w, acc);
                acc = fmaf(c.x, x1.x, acc); acc = fmaf(c.y, x1.y, acc);
                acc = fmaf(d.x, x1.z, acc); acc = fmaf(d.y, x1.w, acc);
            } else {
                const float4 x0 = __ldca(reinterpret_cast<const float4 *>(xr + k));
                acc = fmaf(__uint_as_float(v.x), x0.x, acc); acc = fmaf(__uint_as_float(v.y), x0.y, acc);
                acc = fmaf(__uint_as_float(v.z), x0.z, acc); acc = fmaf(__uint_as_float(v.w), x0.w, acc);
            }
        };
#pragma unroll
        for (int i = 0; i < ROWS_PRE; i++) {
            const int u = u0 + lane + 32 * i;
            if (u < u1) fma_piece(wr[i], u * VW);
        }
#pragma unroll 4
        for (int u = u0 + lane + 32 * ROWS_PRE; u < u1; u += 32)
            fma_piece(__ldg(reinterpret_cast<const uint4 *>(w + (int64_t)u * VW)), u * VW);
    }
    acc = bm_warp_sum(acc);
    if (KS > 1) {  // every warp gets here: the barrier is unconditional
        if (lane == 0) part[warp] = acc;
        __syncthreads();
        if (kp == 0)
            for (int q = 1; q < KS; q++) acc += part[warp + q];
    }
    if (kp == 0 && lane == 0 && live) y[t * ldy + row] = scale ? acc * sc : acc;
}

// fc1 of a gated expert with the activation fused (SwiGLU-style, few tokens):
// h[t, f] = act(W[e_t, f, :] . x[t, :]) * (W[e_t, F + f, :] . x[t, :]) for f < F, written to
// h[t, :F]. One warp (or KS warps, K-split) owns output f and streams both of its rows, so
// the act pass over h (one more graph node per MoE layer) disappears and each lane keeps two
// 16-byte weight loads in flight. (The pipelined rows_dot was slower here at B = 1 on the
// H200: cuda/NOTES.md, gpuperf run 2.)
// B1 (the batch-1 graph): behind early kernels (bm_pdl_wait_b1; activations through __ldca,
// kept after the wait: common.cuh), and at most 32 registers, 8 blocks an SM, so that fc1's
// 968 blocks at the 2.8B shape are resident at once instead of in 1.5 waves (44 registers:
// 5 an SM). Larger batches keep the kernel as it was.
template <typename WT, int KS, bool VEC, bool B1 = false>
__global__ __launch_bounds__(256, B1 ? 8 : 0) void expert_rows_gated_kernel(
    const WT *__restrict__ W,         // (X, 2F, Kin)
    const float *__restrict__ x,      // (T, ldx)
    int64_t ldx,
    const int32_t *__restrict__ ids,  // (T) or NULL
    float *__restrict__ h,            // (T, ldh): [:, :F] written
    int64_t ldh, int F, int Kin, int act) {
    // Wait, then trigger: fc2 reads the expert ids before its own wait, relying on that.
    if constexpr (B1) bm_pdl_wait_b1();
    else bm_pdl_wait();
    constexpr int RPB = 8 / KS;
    constexpr int VW = sizeof(WT) == 2 ? 8 : 4;
    __shared__ float part[2][8];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t t = blockIdx.y;
    const int f = blockIdx.x * RPB + warp / KS;
    const int kp = warp % KS;
    float ag = 0.f, au = 0.f;
    if (f < F) {
        const int64_t e = ids ? (B1 ? __ldca(ids + t) : ids[t]) : 0;
        const WT *wg = W + (e * 2 * F + f) * (int64_t)Kin;   // gate row
        const WT *wu = wg + (int64_t)F * Kin;                 // up row
        const float *xr = x + t * ldx;
        if (VEC) {
            const int units = Kin / VW, per = (units + KS - 1) / KS;
            const int u0 = kp * per, u1 = min(units, u0 + per);
#pragma unroll 2
            for (int u = u0 + lane; u < u1; u += 32) {
                const int k = u * VW;
                if constexpr (sizeof(WT) == 2) {
                    const uint4 vg = __ldg(reinterpret_cast<const uint4 *>(wg + k));
                    const uint4 vu = __ldg(reinterpret_cast<const uint4 *>(wu + k));
                    const float4 x0 = ld_act<B1>(reinterpret_cast<const float4 *>(xr + k));
                    const float4 x1 = ld_act<B1>(reinterpret_cast<const float4 *>(xr + k + 4));
                    float2 a = bm_w2_to_f32<WT>(vg.x), b = bm_w2_to_f32<WT>(vg.y);
                    float2 c = bm_w2_to_f32<WT>(vg.z), d = bm_w2_to_f32<WT>(vg.w);
                    ag = fmaf(a.x, x0.x, ag); ag = fmaf(a.y, x0.y, ag);
                    ag = fmaf(b.x, x0.z, ag); ag = fmaf(b.y, x0.w, ag);
                    ag = fmaf(c.x, x1.x, ag); ag = fmaf(c.y, x1.y, ag);
                    ag = fmaf(d.x, x1.z, ag); ag = fmaf(d.y, x1.w, ag);
                    a = bm_w2_to_f32<WT>(vu.x); b = bm_w2_to_f32<WT>(vu.y);
                    c = bm_w2_to_f32<WT>(vu.z); d = bm_w2_to_f32<WT>(vu.w);
                    au = fmaf(a.x, x0.x, au); au = fmaf(a.y, x0.y, au);
                    au = fmaf(b.x, x0.z, au); au = fmaf(b.y, x0.w, au);
                    au = fmaf(c.x, x1.x, au); au = fmaf(c.y, x1.y, au);
                    au = fmaf(d.x, x1.z, au); au = fmaf(d.y, x1.w, au);
                } else {
                    const float4 vg = __ldg(reinterpret_cast<const float4 *>(wg + k));
                    const float4 vu = __ldg(reinterpret_cast<const float4 *>(wu + k));
                    const float4 x0 = ld_act<B1>(reinterpret_cast<const float4 *>(xr + k));
                    ag = fmaf(vg.x, x0.x, ag); ag = fmaf(vg.y, x0.y, ag);
                    ag = fmaf(vg.z, x0.z, ag); ag = fmaf(vg.w, x0.w, ag);
                    au = fmaf(vu.x, x0.x, au); au = fmaf(vu.y, x0.y, au);
                    au = fmaf(vu.z, x0.z, au); au = fmaf(vu.w, x0.w, au);
                }
            }
        } else {
            const int per = (Kin + KS - 1) / KS;
            const int k0 = kp * per, k1 = min(Kin, k0 + per);
#pragma unroll 4
            for (int k = k0 + lane; k < k1; k += 32) {
                const float xv = ld_act<B1>(xr + k);
                ag = fmaf(ld_w(wg + k), xv, ag);
                au = fmaf(ld_w(wu + k), xv, au);
            }
        }
    }
    ag = bm_warp_sum(ag);
    au = bm_warp_sum(au);
    if (KS > 1) {  // every warp gets here: the barrier is unconditional
        if (lane == 0) {
            part[0][warp] = ag;
            part[1][warp] = au;
        }
        __syncthreads();
        if (kp == 0)
            for (int q = 1; q < KS; q++) {
                ag += part[0][warp + q];
                au += part[1][warp + q];
            }
    }
    if (kp == 0 && lane == 0 && f < F) h[t * ldh + f] = bm_act_fn(ag, act) * au;
}

// The all-experts decode path: abf[t] = bf16(act(hall[e_t, t, :F]) * hall[e_t, t, F:])
// (ungated: act(hall[e_t, t, :F])), e_t = ids[t] (ids NULL: 0).
// alo (BF16X2, else NULL) gets the low part of each value.
__global__ void select_act_kernel(const float *__restrict__ hall,   // (X, T, G)
                                  const int32_t *__restrict__ ids,  // (T) or NULL
                                  uint16_t *__restrict__ abf,       // (T, F)
                                  uint16_t *__restrict__ alo,       // (T, F) or NULL
                                  int64_t T, int F, int G, int gated, int act) {
    const int64_t n = T * F;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = i / F;
        const int f = (int)(i % F);
        const float *row = hall + ((ids ? (int64_t)ids[t] : 0) * T + t) * G;
        const float a = bm_act_fn(row[f], act);
        const float v = gated ? a * row[F + f] : a;
        if (alo) bm_f32_to_bf16_split(v, abf[i], alo[i]);
        else abf[i] = bm_f32_to_bf16_bits(v);
    }
}

// out[t] = gates[t] * oall[e_t, t] (gates NULL: 1).
__global__ void select_out_kernel(const float *__restrict__ oall,   // (X, T, d)
                                  const int32_t *__restrict__ ids,  // (T) or NULL
                                  const float *__restrict__ gates,  // (T) or NULL
                                  float *__restrict__ out,          // (T, d)
                                  int64_t T, int d) {
    const int64_t n = T * d;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = i / d;
        const int64_t e = ids ? ids[t] : 0;
        out[i] = (gates ? gates[t] : 1.f) * oall[(e * T + t) * d + i % d];
    }
}

// Thread 0 of a routing block: logits[t] = sl (when traced), the argmax (ties -> lowest
// index) and its sigmoid gate.
// Top-1 routing, one expert logit at a time: v (expert e) replaces the best so far only if
// larger (strict: ties keep the lowest index); then the expert and its sigmoid gate.
__device__ __forceinline__ void route_consider(float v, int e, float &best, int &bi) {
    if (v > best) {
        best = v;
        bi = e;
    }
}
__device__ __forceinline__ void route_store(int64_t t, float best, int bi, int32_t *ids,
                                            float *gates) {
    ids[t] = bi;
    gates[t] = 1.f / (1.f + expf(-best));
}
__device__ __forceinline__ void route_pick(const float *sl, int X, int64_t t, float *logits,
                                           int32_t *ids, float *gates) {
    float best = -INFINITY;
    int bi = 0;
    for (int e = 0; e < X; e++) {
        const float v = sl[e];
        if (logits) logits[t * X + e] = v;
        route_consider(v, e, best, bi);
    }
    route_store(t, best, bi, ids, gates);
}

// Top-1 routing (SPEC 3) for a few tokens (decode): one block per token, one warp per expert
// (moe.cu's route_top1 gives each token a single warp, which walks all X rows in series: 29 us
// per layer at T = 1 on the H200). Then thread 0 takes the argmax (ties -> lowest) and the gate.
constexpr int ROUTE_SMALL_MAX = 64;  // tokens
constexpr int ROUTE_SMALL_MAX_X = 256;  // experts (sl[] of both kernels)
// B1: in the batch-1 graph, behind early kernels (bm_pdl_wait_b1, x through __ldca).
template <bool B1 = false>
__global__ __launch_bounds__(256) void route_small_kernel(
    const float *__restrict__ x,    // (T, d)
    const float *__restrict__ rw,   // (X, d)
    const float *__restrict__ rb,   // (X)
    float *__restrict__ logits,     // (T, X) or NULL
    int32_t *__restrict__ ids,      // (T)
    float *__restrict__ gates,      // (T)
    int d, int X) {
    if constexpr (B1) bm_pdl_wait_b1();
    else bm_pdl_wait();
    __shared__ float sl[ROUTE_SMALL_MAX_X];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t t = blockIdx.x;
    const float *xr = x + t * d;
    const bool vec = (d & 3) == 0 && (((uintptr_t)xr | (uintptr_t)rw) & 15) == 0;
    for (int e = warp; e < X; e += 8) {
        const float *w = rw + (int64_t)e * d;
        float acc = 0.f;
        if (vec) {
            for (int k = 4 * lane; k < d; k += 128) {
                const float4 a = ld_act<B1>(reinterpret_cast<const float4 *>(xr + k));
                const float4 b = __ldg(reinterpret_cast<const float4 *>(w + k));
                acc = fmaf(a.x, b.x, acc);
                acc = fmaf(a.y, b.y, acc);
                acc = fmaf(a.z, b.z, acc);
                acc = fmaf(a.w, b.w, acc);
            }
        } else {
            for (int k = lane; k < d; k += 32) acc = fmaf(ld_act<B1>(xr + k), __ldg(w + k), acc);
        }
        acc = bm_warp_sum(acc);
        if (lane == 0) sl[e] = acc + rb[e];
    }
    __syncthreads();
    if (threadIdx.x == 0) route_pick(sl, X, t, logits, ids, gates);
}

// The prefill's norm + routing (BLACKMAMBA_NORM_ROUTE_WARP): norm_route_kernel's work with one
// warp per token instead of a block. The row stays in registers (NRW_V float4 a lane, so
// d <= 1536; 128 registers, 2 blocks an SM): no shared memory, no block barrier. The sum of
// squares and each router dot are warp sums, in other orders than the block kernel's (not
// bit-identical to it). Lane 0 takes the argmax as route_pick does (ties -> lowest index).
// out (the fp32 normed row) may be NULL: where the grouped experts read the bf16 copy (obf),
// nothing reads it. Each input's loads sit in one loop of independent loads: a warp has only
// its token's row to hide the latency with (a first form that loaded x and the residual
// float4 by float4 was slower than the block kernel). H200, T = 16384 (cuda/NOTES.md session
// 16): 166 -> 111 us a MoE layer; prefill B = 1 -2.1%, B = 8 -0.8%.
constexpr int NRW_V = 12;
template <bool BF>
__global__ __launch_bounds__(256, 2) void norm_route_warp_kernel(
    const float *x, const float *residual, const float *__restrict__ nw, float eps,
    float *out, float *res_out, const float *__restrict__ rw, const float *__restrict__ rb,
    float *__restrict__ logits, int32_t *__restrict__ ids, float *__restrict__ gates, int d,
    int X, uint16_t *__restrict__ obf, uint16_t *__restrict__ olo, const float *x2, int64_t T) {
    bm_pdl_wait();
    const int lane = threadIdx.x & 31;
    const int64_t t = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (t >= T) return;
    const int nv = d / 4;
    const int64_t off = t * d;
    const float4 *xr = reinterpret_cast<const float4 *>(x + off);
    const float4 *rr = residual ? reinterpret_cast<const float4 *>(residual + off) : nullptr;
    const float4 *x2r = x2 ? reinterpret_cast<const float4 *>(x2 + off) : nullptr;
    float4 *ro = reinterpret_cast<float4 *>(res_out + off);
    // Each input's loads in one loop of independent loads (all in flight at once: a warp has
    // one token's row to hide the latency with, where the block kernel had 256 threads).
    float4 v[NRW_V];
    const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int j = 0; j < NRW_V; j++) v[j] = lane + 32 * j < nv ? xr[lane + 32 * j] : zero;
    auto add = [&](const float4 *src) {
        float4 q[NRW_V];
#pragma unroll
        for (int j = 0; j < NRW_V; j++) q[j] = lane + 32 * j < nv ? src[lane + 32 * j] : zero;
#pragma unroll
        for (int j = 0; j < NRW_V; j++)
            v[j] = make_float4(v[j].x + q[j].x, v[j].y + q[j].y, v[j].z + q[j].z,
                               v[j].w + q[j].w);
    };
    if (x2r) add(x2r);
    if (rr) add(rr);
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < NRW_V; j++) {
        const int i = lane + 32 * j;
        if (i < nv) {
            const float4 r = v[j];
            ro[i] = r;
            ss += r.x * r.x + r.y * r.y + r.z * r.z + r.w * r.w;
        }
    }
    ss = bm_warp_sum(ss);
    const float s = rsqrtf(ss / (float)d + eps);
    const float4 *wv = reinterpret_cast<const float4 *>(nw);
    float4 wn[NRW_V];
#pragma unroll
    for (int j = 0; j < NRW_V; j++) wn[j] = lane + 32 * j < nv ? __ldg(wv + lane + 32 * j) : zero;
#pragma unroll
    for (int j = 0; j < NRW_V; j++) {
        const int i = lane + 32 * j;
        if (i < nv) {
            const float4 w4 = wn[j], a = v[j];
            v[j] = make_float4(a.x * s * w4.x, a.y * s * w4.y, a.z * s * w4.z, a.w * s * w4.w);
            if (out) reinterpret_cast<float4 *>(out + off)[i] = v[j];
            if (BF) bm_store_bf16(v[j], obf + off, olo ? olo + off : nullptr, i);
        }
    }
    float best = -INFINITY;
    int bi = 0;
    for (int e = 0; e < X; e++) {
        const float4 *w = reinterpret_cast<const float4 *>(rw + (int64_t)e * d);
        float4 wr[NRW_V];
#pragma unroll
        for (int j = 0; j < NRW_V; j++) wr[j] = lane + 32 * j < nv ? __ldg(w + lane + 32 * j) : zero;
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < NRW_V; j++) {
            const int i = lane + 32 * j;
            if (i < nv) {
                const float4 b = wr[j], a = v[j];
                acc = fmaf(a.x, b.x, acc);
                acc = fmaf(a.y, b.y, acc);
                acc = fmaf(a.z, b.z, acc);
                acc = fmaf(a.w, b.w, acc);
            }
        }
        const float l = bm_warp_sum(acc) + rb[e];
        if (logits && lane == 0) logits[t * X + e] = l;
        route_consider(l, e, best, bi);
    }
    if (lane == 0) route_store(t, best, bi, ids, gates);
}
// BLACKMAMBA_NORM_ROUTE_WARP: the prefill (not the decode graphs) routes through
// norm_route_warp_kernel where d <= 128 NRW_V and it has at least nr_warp_min() tokens; "0":
// norm_route_kernel. Read per call.
bool nr_warp_on() { return bm_env_switch("BLACKMAMBA_NORM_ROUTE_WARP", true); }
// Below NRW_MIN_T tokens the block kernel: a warp walks the X router rows one after another
// (an L2 round trip each), which a short prompt's few warps cannot hide. H200, 2.8B shape,
// batch 1, same process (cuda/NOTES.md session 21): the block kernel's prefill is 3.4-4.2%
// faster at 8-128 tokens and 1.7-1.9% at 256-512; the warp kernel 0.6% at 1024 and 1.3% at
// 2048. BLACKMAMBA_NORM_ROUTE_WARP_MIN=<tokens> moves the line (tests, A/B).
constexpr long NRW_MIN_T = 1024;
int64_t nr_warp_min() { return bm_env_long("BLACKMAMBA_NORM_ROUTE_WARP_MIN", 1, INT32_MAX, NRW_MIN_T); }
std::atomic<long long> g_nr_warp{0};  // norm_route_warp_kernel launches (tests)

// RMSNorm with the residual add, then top-1 routing of the normed row: one block of
// NR_THREADS per token (decode and prefill). The norm is norm.cu's rms_norm_kernel<4> at the
// same block size (same sums, so bit-identical xn and res_out); its output row stays in shared
// memory for route_small_kernel's dot products (same order, so the same logits). One graph node
// instead of two per MoE layer, and the router reads x from shared memory.
// BF: also write the normed rows as bf16 (obf, and olo where given).
// MODE, how the kernel meets programmatic dependent launch (the arithmetic and its order are
// the same in all three: the same xn, residual, logits, ids and gates, bit for bit):
//   NR_PLAIN  wait first (prefill, and decode where neither applies);
//   NR_PRE    this warp's first router row (NR_PRE float4 a lane: d <= 128 NR_PRE, checked by
//             the host) loaded into registers before the wait: batched decode (session 4
//             dec64: 8.3 -> 4.8 us a layer at B = 64, the dots no longer walk the row from L2
//             after the norm); since session 15 also the norm weights (NR_PRE_W float4 a
//             thread, as NR_EARLY) and the router bias of the warp's first expert, which
//             were loads after the row's sum, on the path to fc1's release: norm_route 5.35
//             -> 4.44 us a call, the step at B = 64 / 32 / 16 -0.85 / -0.9 / -1.3%,
//             bit-identical;
//   NR_EARLY  the batch-1 graph's early form (bm_pdl_early): trigger first, then before the
//             wait the norm weights (the first NR_PRE_W float4 of this thread) and the router
//             row and bias as NR_PRE; x and residual after it from L2 (__ldcg: no L1 lines of
//             h / r, common.cuh);
//   NR_PRE_DISP  NR_PRE_ROW, and then the last block to finish its routing builds the grouped
//             experts' dispatch (perm, offsets: moe_dispatch.cuh, dispatch_kernel's result)
//             from every block's ids, through a self-resetting ticket counter: the batched
//             decode's dispatch_kernel launch (3.7 us + a launch a MoE layer at B = 64) goes
//             (BLACKMAMBA_MOE_ROUTE_DISPATCH, session 6 moe64). Since session 12 only where
//             the grouped GEMMs cannot derive the dispatch from the ids themselves
//             (BLACKMAMBA_MOE_IDS, bm_cuda_moe_grouped_ids_ok; there NR_PRE_ROW). The
//             dynamic shared memory then holds max(d, bm_dispatch_smem_ints(X, 8)) values
//             (the row is dead by then).
// The early loads are __ldca, not __ldg: ptxas moves ld.global.nc across griddepcontrol.wait
// (cuda/NOTES.md, session 4 pdl1).
constexpr int NR_THREADS = 256;
constexpr int NR_MAX_D = 12288;  // the row in static-size dynamic smem, <= 48 KB
constexpr int NR_PRE = 12;       // router pieces per lane (d = 1472: 11.5)
constexpr int NR_PRE_W = 2;      // norm-weight float4 per thread (d = 1472: 368 over 256 threads)
enum { NR_PLAIN = 0, NR_PRE_ROW = 1, NR_EARLY = 2, NR_PRE_DISP = 3 };
template <bool BF, int MODE>
__global__ __launch_bounds__(NR_THREADS) void norm_route_kernel(
    const float *x,                   // (T, d)
    const float *residual,            // (T, d) or NULL
    const float *__restrict__ nw,     // (d)
    float eps,
    float *__restrict__ out,          // (T, d) normed
    float *res_out,                   // (T, d): x + residual (may alias x or residual)
    const float *__restrict__ rw,     // (X, d)
    const float *__restrict__ rb,     // (X)
    float *__restrict__ logits,       // (T, X) or NULL
    int32_t *__restrict__ ids,        // (T)
    float *__restrict__ gates,        // (T)
    int d, int X,
    uint16_t *__restrict__ obf,       // (T, d) or NULL: out as bf16 (grouped.cu's GEMM input)
    uint16_t *__restrict__ olo,       // (T, d) or NULL: its low parts (split products)
    int32_t *perm,                    // (T) NR_PRE_DISP: the dispatch (else unused)
    int32_t *offsets,                 // (X+1) NR_PRE_DISP
    unsigned *ticket,                 // (1) NR_PRE_DISP: 0 before and after each launch
    const float *x2) {                // (T, d) or NULL: a second part of x (x + x2), see
                                      // out_ksplit_on
    constexpr bool EARLY = MODE == NR_EARLY, ROW = MODE != NR_PLAIN;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int nv = d / 4;
    const float4 *wv = reinterpret_cast<const float4 *>(nw);
    float4 wpre[ROW ? NR_PRE_W : 1], rpre[ROW ? NR_PRE : 1];
    float rb0 = 0.f;
    if constexpr (EARLY) bm_pdl_trigger();
    if constexpr (ROW) {  // before the wait: the norm weights, the router row and bias
#pragma unroll
        for (int j = 0; j < NR_PRE_W; j++) {
            const int i = threadIdx.x + j * NR_THREADS;
            wpre[j] = i < nv ? __ldca(wv + i) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
        const float *w0 = rw + (int64_t)(warp < X ? warp : 0) * d;
#pragma unroll
        for (int i = 0; i < NR_PRE; i++) {
            const int k = 4 * lane + 128 * i;
            rpre[i] = warp < X && k < d ? __ldca(reinterpret_cast<const float4 *>(w0 + k))
                                        : make_float4(0.f, 0.f, 0.f, 0.f);
        }
        if (warp < X) rb0 = __ldca(rb + warp);
    }
    if constexpr (EARLY) {
        bm_pdl_wait_only();
    } else {
        bm_pdl_wait();
    }
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float4 *srow = reinterpret_cast<float4 *>(smem_raw);
    __shared__ float scratch[32];
    __shared__ float sl[ROUTE_SMALL_MAX_X];
    const int64_t off = (int64_t)blockIdx.x * d;
    const float4 *xr = reinterpret_cast<const float4 *>(x + off);
    const float4 *rr = residual ? reinterpret_cast<const float4 *>(residual + off) : nullptr;
    float4 *ro = reinterpret_cast<float4 *>(res_out + off);
    const float4 *x2r = x2 ? reinterpret_cast<const float4 *>(x2 + off) : nullptr;
    float ss = 0.f;
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        float4 r = EARLY ? __ldcg(xr + i) : xr[i];
        if (x2r) {
            const float4 q = EARLY ? __ldcg(x2r + i) : x2r[i];
            r = make_float4(r.x + q.x, r.y + q.y, r.z + q.z, r.w + q.w);
        }
        if (rr) {
            const float4 q = EARLY ? __ldcg(rr + i) : rr[i];
            r = make_float4(r.x + q.x, r.y + q.y, r.z + q.z, r.w + q.w);
        }
        srow[i] = r;
        ro[i] = r;
        ss += r.x * r.x + r.y * r.y + r.z * r.z + r.w * r.w;
    }
    ss = bm_block_sum(ss, scratch);
    const float s = rsqrtf(ss / (float)d + eps);
    float4 *o = reinterpret_cast<float4 *>(out + off);
    for (int i = threadIdx.x, j = 0; i < nv; i += blockDim.x, j++) {
        float4 w4;
        if constexpr (ROW) {
            w4 = wpre[0];
#pragma unroll
            for (int q = 1; q < NR_PRE_W; q++)
                if (j == q) w4 = wpre[q];
            if (j >= NR_PRE_W) w4 = wv[i];
        } else {
            w4 = wv[i];
        }
        const float4 a = srow[i];
        const float4 v = make_float4(a.x * s * w4.x, a.y * s * w4.y, a.z * s * w4.z, a.w * s * w4.w);
        srow[i] = v;  // the same thread wrote srow[i]: no barrier needed before this
        o[i] = v;
        if (BF) bm_store_bf16(v, obf + off, olo ? olo + off : nullptr, i);
    }
    __syncthreads();
    const float *xs = reinterpret_cast<const float *>(srow);
    // One dot per expert and warp, in the same k order whether its first pieces were loaded
    // early (the warp's first expert) or not.
    auto dot = [&](int e, int k0, float acc) {
        const float *w = rw + (int64_t)e * d;
#pragma unroll 4
        for (int k = k0; k < d; k += 128) {
            const float4 a = *reinterpret_cast<const float4 *>(xs + k);
            const float4 b = __ldg(reinterpret_cast<const float4 *>(w + k));
            acc = fmaf(a.x, b.x, acc);
            acc = fmaf(a.y, b.y, acc);
            acc = fmaf(a.z, b.z, acc);
            acc = fmaf(a.w, b.w, acc);
        }
        return bm_warp_sum(acc);
    };
    int e = warp;
    if constexpr (ROW) {
        if (e < X) {
            float acc = 0.f;
#pragma unroll
            for (int i = 0; i < NR_PRE; i++) {
                const int k = 4 * lane + 128 * i;
                if (k < d) {
                    const float4 a = *reinterpret_cast<const float4 *>(xs + k);
                    acc = fmaf(a.x, rpre[i].x, acc);
                    acc = fmaf(a.y, rpre[i].y, acc);
                    acc = fmaf(a.z, rpre[i].z, acc);
                    acc = fmaf(a.w, rpre[i].w, acc);
                }
            }
            acc = dot(e, 4 * lane + 128 * NR_PRE, acc);
            if (lane == 0) sl[e] = acc + rb0;
        }
        e += NR_THREADS / 32;
    }
    for (; e < X; e += NR_THREADS / 32) {
        const float acc = dot(e, 4 * lane, 0.f);
        if (lane == 0) sl[e] = acc + rb[e];
    }
    __syncthreads();
    if (threadIdx.x == 0) route_pick(sl, X, blockIdx.x, logits, ids, gates);
    if constexpr (MODE == NR_PRE_DISP) {
        if (!bm_last_block(ticket)) return;  // its barrier: every warp is done with srow
        bm_dispatch_block(ids, (int)gridDim.x, X, offsets, perm, reinterpret_cast<int *>(smem_raw));
    }
}

// The recurrent step of SPEC 2 with dt_proj fused in. A group of G lanes (a power of two
// <= 32) per (b, e):
//   delta = softplus(dt_b[e] + dt_w[e, :] . dbc[b, :R])
//   h[n]  = exp(delta * A[e, n]) * h[n] + delta * B[b, n] * x[b, e]      (lanes own n)
//   y     = (sum_n h[n] * C[b, n] + D[e] * x[b, e]) * silu(z[b, e])
// B and C are read in place from dbc (stride R + 2N), so no split and no delta buffer.
// FUSED_DT false: delta (B, E) = dt_r @ dt_w^T was computed before (a GEMM at larger batches,
// where one warp per (b, e) re-reading its dt_w row cost 75 us per layer at B = 64). Then G
// is about N/4 (4 states per lane): a whole warp per (b, e) left half the lanes idle at
// N = 16 and made 188K warps at B = 64 (60 us per layer on the H200).
// EARLY (only with FUSED_DT; bm_pdl_early): trigger first, then load what the graph does not
// write in this step before the wait: dt_w's row slice (the first SCAN_PRE of this lane's
// terms), dt_b, D, A and this layer's ssm state (written only by this kernel, one step
// before); dbc, xc, z after it. Same arithmetic in the same order: bit-identical.
constexpr int SCAN_PRE = 4;  // dt_w terms per lane loaded early (R = 92 at the 2.8B shape: 3)
template <typename WT, bool FUSED_DT, bool EARLY = false>
__global__ void step_scan_kernel(float *__restrict__ ssm,         // (B, E, N) in place
                                 const float *__restrict__ xc,    // (B, E)
                                 const float *__restrict__ z,     // (B, E)
                                 const float *__restrict__ dbc,   // (B, R + 2N)
                                 const WT *__restrict__ dt_w,     // (E, R)
                                 const float *__restrict__ delta, // (B, E) when !FUSED_DT
                                 const float *__restrict__ dt_b,  // (E)
                                 const float *__restrict__ A,     // (E, N)
                                 const float *__restrict__ D,     // (E)
                                 float *__restrict__ y,           // (B, E)
                                 int64_t BE, int E, int N, int R, int g_log2) {
    // Shifts, not divisions by a run-time G (the first version divided by G and ran the
    // batch-8 step 5 us per layer slower); the fused-dt kernel always has G = 32.
    static_assert(!EARLY || FUSED_DT, "step_scan_kernel: EARLY needs FUSED_DT");
    if constexpr (EARLY) bm_pdl_trigger();
    else bm_pdl_wait();
    const int glog = FUSED_DT ? 5 : g_log2, G = 1 << glog;
    const int64_t gt = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    const int64_t wv = gt >> glog;  // (b, e) index
    const int g = (int)(gt & (G - 1));
    // Groups past BE compute on a clamped index and store nothing: every lane of the warp
    // takes part in the shuffles.
    const bool valid = wv < BE;
    const int64_t w = valid ? wv : BE - 1;
    const int64_t b = w / E;
    const int e = (int)(w % E);
    const float *row = dbc + b * (R + 2 * N);
    float acc = 0.f;
    if constexpr (EARLY) {
        // before the wait: weights and the state (see above); plain loads (__ldca), which
        // ptxas keeps on their side of the wait (common.cuh bm_pdl_trigger)
        float dw[SCAN_PRE];
#pragma unroll
        for (int i = 0; i < SCAN_PRE; i++) {
            const int k = g + G * i;
            dw[i] = k < R ? ld_w_ca(dt_w + (int64_t)e * R + k) : 0.f;
        }
        const float dtb = __ldca(dt_b + e), Dv = __ldca(D + e);
        const bool st0 = g < N;  // this lane's first state (N <= 32: its only one)
        const float a0 = st0 ? __ldca(A + (int64_t)e * N + g) : 0.f;
        const float h0 = st0 ? __ldca(ssm + w * N + g) : 0.f;
        bm_pdl_wait_only();
        bm_l1_invalidate_block();  // every thread of the block gets here
#pragma unroll
        for (int i = 0; i < SCAN_PRE; i++) {
            const int k = g + G * i;
            if (k < R) acc = fmaf(dw[i], __ldca(row + k), acc);
        }
        for (int k = g + G * SCAN_PRE; k < R; k += G)
            acc = fmaf(ld_w(dt_w + (int64_t)e * R + k), __ldca(row + k), acc);
        for (int o = G / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        const float dt = bm_softplus(acc + dtb);
        const float xv = __ldca(xc + w);
        const float dx = dt * xv;
        float ya = 0.f;
        if (st0) {
            const float hn = fmaf(expf(dt * a0), h0, dx * __ldca(row + R + g));
            if (valid) ssm[w * N + g] = hn;
            ya = fmaf(hn, __ldca(row + R + N + g), ya);
        }
        for (int n = g + G; n < N; n += G) {
            float *s = ssm + w * N + n;
            const float hn = fmaf(expf(dt * __ldca(A + (int64_t)e * N + n)), *s,
                                  dx * __ldca(row + R + n));
            if (valid) *s = hn;
            ya = fmaf(hn, __ldca(row + R + N + n), ya);
        }
        for (int o = G / 2; o > 0; o >>= 1) ya += __shfl_xor_sync(0xffffffffu, ya, o);
        if (valid && g == 0) y[w] = fmaf(Dv, xv, ya) * bm_silu(__ldca(z + w));
        return;
    }
    if (FUSED_DT) {
        for (int k = g; k < R; k += G) acc = fmaf(ld_w(dt_w + (int64_t)e * R + k), row[k], acc);
        for (int o = G / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    } else {
        acc = delta[w];
    }
    const float dt = bm_softplus(acc + dt_b[e]);
    const float xv = xc[w];
    const float dx = dt * xv;
    float ya = 0.f;
    for (int n = g; n < N; n += G) {
        float *s = ssm + w * N + n;
        const float hn = fmaf(expf(dt * A[(int64_t)e * N + n]), *s, dx * row[R + n]);
        if (valid) *s = hn;
        ya = fmaf(hn, row[R + N + n], ya);
    }
    for (int o = G / 2; o > 0; o >>= 1) ya += __shfl_xor_sync(0xffffffffu, ya, o);
    if (valid && g == 0) y[w] = fmaf(D[e], xv, ya) * bm_silu(z[w]);
}

// The scan state's loads and stores as evict_first L2 lines (BLACKMAMBA_SCAN_EVICT; the policy
// from common.cuh bm_evict_first_policy): a state line the side branch staged as evict_last
// (BLACKMAMBA_L2SIDE_STATE) is demoted once read and written back, so staged state does not
// pile up in L2 across layers.
// (the loads' "memory" clobber keeps them after the PDL wait, as bm_pdl_wait's own does)
__device__ __forceinline__ float4 ld_f4_pol(const float4 *p, uint64_t pol) {
    float4 v;
    asm volatile("ld.global.L2::cache_hint.v4.f32 {%0, %1, %2, %3}, [%4], %5;"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p), "l"(pol) : "memory");
    return v;
}
__device__ __forceinline__ float4 ld_f4_cg_pol(const float4 *p, uint64_t pol) {  // L2 only
    float4 v;
    asm volatile("ld.global.cg.L2::cache_hint.v4.f32 {%0, %1, %2, %3}, [%4], %5;"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p), "l"(pol) : "memory");
    return v;
}
__device__ __forceinline__ void st_f4_pol(float4 *p, float4 v, uint64_t pol) {
    // no "memory" clobber: the state is read by no later load of the kernel
    asm volatile("st.global.L2::cache_hint.v4.f32 [%0], {%1, %2, %3, %4}, %5;" ::"l"(p),
                 "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w), "l"(pol));
}

// One (b, e) lane's update in the float4 step (step_scan4_kernel and its early form, which so
// do the same arithmetic in the same order): the lane's 4 states s -> h = exp(dt A) s + dt x B
// (dt = softplus(dt_raw)) into *dst where valid, y = (C . h summed over the G lanes + D x)
// silu(z) into y[w] (or bf16 yb, yl) by lane 0. ev & 2: the state stored as an evict_first
// line (policy pol; scan_evict_mode).
__device__ __forceinline__ void scan4_item(float4 s, float4 a, float4 bb, float4 cc,
                                           float dt_raw, float xv, float zv, float De, int G,
                                           int g, bool valid, int64_t w, float4 *dst, float *y,
                                           uint16_t *yb, uint16_t *yl, int ev = 0,
                                           uint64_t pol = 0) {
    const float dt = bm_softplus(dt_raw);
    const float dx = dt * xv;
    float4 h;
    // exp(dt A) as 2^(dt A log2 e) on MUFU.EX2, as the prefill scan (scan.cu A2): fewer
    // instructions than expf (session 15: the scan 8.96 -> 8.33 us a call, the step -0.2% at
    // B = 64)
    constexpr float L2E = 1.4426950408889634f;
    h.x = fmaf(bm_ex2(dt * (a.x * L2E)), s.x, dx * bb.x);
    h.y = fmaf(bm_ex2(dt * (a.y * L2E)), s.y, dx * bb.y);
    h.z = fmaf(bm_ex2(dt * (a.z * L2E)), s.z, dx * bb.z);
    h.w = fmaf(bm_ex2(dt * (a.w * L2E)), s.w, dx * bb.w);
    if (valid) {
        if (ev & 2) st_f4_pol(dst, h, pol);
        else *dst = h;
    }
    float ya = h.x * cc.x;
    ya = fmaf(h.y, cc.y, ya);
    ya = fmaf(h.z, cc.z, ya);
    ya = fmaf(h.w, cc.w, ya);
    for (int o = G / 2; o > 0; o >>= 1) ya += __shfl_xor_sync(0xffffffffu, ya, o);
    if (valid && g == 0) {
        const float v = fmaf(De, xv, ya) * bm_silu(zv);
        if (yb) bm_store_bf16(v, yb, yl, w);
        else y[w] = v;
    }
}

// step_scan_kernel's !FUSED_DT case (delta from the dt_proj GEMM: batched decode) with
// G = N/4 lanes per (b, e), each owning 4 consecutive states: one 16-byte load and store of
// the state per lane (the scalar kernel's lanes stride n by G: 4-byte accesses, ~1.6 TB/s on
// the 12 MB state at B = 64), A, B, C as float4. y goes out as float32 (y) or, where
// out_proj is a bf16 GEMM, as its bf16 input (yb, and yl: the low parts when it splits).
// The y sum runs over a lane's 4 states in order, then across lanes (the scalar kernel sums
// n = g, g+G, ..., then across lanes: the same terms in another order).
// Needs N % 4 == 0, N/4 = 2^g4 <= 32, R % 4 == 0, ssm, dbc, A 16-byte aligned.
std::atomic<long long> g_scan4{0};  // launches (tests assert the path)
std::atomic<long long> g_scan4_rows{0};  // launches with RB > 1 (tests)
// RB > 1 (BLACKMAMBA_SCAN4_ROWS): each lane steps RB batch rows b = q RB + j of one (e, g),
// their loads issued together, A / dt_b / D once. Nsight Compute had the RB = 1 kernel at
// 28% of DRAM with one 16-byte state load in flight a lane, but RB = 2 and 4 measured no
// faster at B = 64 (10.0 us a layer either way; cuda/NOTES.md session 5 dec64b), so the
// default stays 1. The arithmetic per (b, e) is the same: results as RB = 1.
//
// FDT (BLACKMAMBA_SCAN4_DT): delta is not read but computed here, delta[b, e] = dbc[b, :R] .
// dtw[e, :] (float32 weights, R % 4 == 0): the G lanes of (b, e) each sum the float4 chunks
// g, g + G, ... in fp32 FMAs, then a butterfly (every lane gets the same sum: each addition
// commutes). This replaces the dt_proj GEMM (two split bf16 GEMMs and a conversion pass at
// B <= 8; tf32 above): fewer launches, and an fp32 product. Default at B <= 8 only (see
// scan4_dt_on: at B = 64 the dot costs more than the tf32 GEMM).
template <int RB, bool FDT = false>
__global__ void __launch_bounds__(256, RB >= 4 ? (FDT ? 3 : 4) : RB >= 2 ? (FDT ? 4 : 5) : (FDT ? 6 : 8)) step_scan4_kernel(
                                  float *__restrict__ ssm,          // (B, E, N) in place
                                  const float *__restrict__ xc,     // (B, E)
                                  const float *__restrict__ z,      // (B, E)
                                  const float *__restrict__ dbc,    // (B, R + 2N)
                                  const float *__restrict__ delta,  // (B, E)
                                  const float *__restrict__ dt_b,   // (E)
                                  const float *__restrict__ A,      // (E, N)
                                  const float *__restrict__ D,      // (E)
                                  float *__restrict__ y,            // (B, E) or NULL
                                  uint16_t *__restrict__ yb,        // (B, E) or NULL
                                  uint16_t *__restrict__ yl,        // (B, E) or NULL
                                  int B, int E, int N, int R, int g4,
                                  const float *__restrict__ dtw = nullptr,  // (E, R), FDT
                                  int ev = 0) {  // scan_evict_mode(): 1 loads, 2 stores hinted
    bm_pdl_wait();
    const uint64_t pol = (ev & 3) ? bm_evict_first_policy() : 0;
    // grid (cdiv(E G, blockDim.x), cdiv(B, RB)): blockIdx.y is the row group (rows qb RB ..
    // qb RB + RB-1), so no lane divides (two 64-bit divisions a lane cost ~40% of the
    // kernel's instructions at B = 64)
    const int G = 1 << g4;
    const int lt = blockIdx.x * blockDim.x + threadIdx.x;
    const int g = lt & (G - 1);
    const bool qvalid = (lt >> g4) < E;  // lanes past E compute on a clamped e, store nothing
    const int e = qvalid ? lt >> g4 : E - 1;
    const int qb = blockIdx.y;
    // The DRAM-bound loads of every row first (state, delta, x, z: RB rows in flight a lane);
    // B and C (one row of dbc shared by the E channels of a batch row: L1 / L2 hits) per row.
    float4 s[RB];
    float dl[RB], xv[RB], zv[RB];
#pragma unroll
    for (int j = 0; j < RB; j++) {
        const int64_t b = min(qb * RB + j, B - 1);
        const int64_t w = b * E + e;
        const float4 *sp = reinterpret_cast<const float4 *>(ssm + w * N) + g;
        s[j] = (ev & 1) ? ld_f4_pol(sp, pol) : *sp;
        if constexpr (!FDT) dl[j] = delta[w];
        xv[j] = xc[w];
        zv[j] = z[w];
    }
    if constexpr (FDT) {  // dt_proj: dl[j] = dbc[b, :R] . dtw[e, :]
        const float4 *wr = reinterpret_cast<const float4 *>(dtw + (int64_t)e * R);
        const int R4 = R / 4;
#pragma unroll
        for (int j = 0; j < RB; j++) {
            const int64_t b = min(qb * RB + j, B - 1);
            const float4 *xr = reinterpret_cast<const float4 *>(dbc + b * (R + 2 * N));
            float acc = 0.f;
#pragma unroll 2
            for (int c = g; c < R4; c += G) {
                const float4 wv = wr[c], xq = xr[c];
                acc = fmaf(wv.x, xq.x, acc);
                acc = fmaf(wv.y, xq.y, acc);
                acc = fmaf(wv.z, xq.z, acc);
                acc = fmaf(wv.w, xq.w, acc);
            }
            for (int o = G / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
            dl[j] = acc;
        }
    }
    const float4 a = reinterpret_cast<const float4 *>(A + (int64_t)e * N)[g];
    const float dtb = dt_b[e], De = D[e];
#pragma unroll
    for (int j = 0; j < RB; j++) {
        const int64_t b = min(qb * RB + j, B - 1);
        const bool valid = qvalid && qb * RB + j < B;
        const int64_t w = b * E + e;
        const float *row = dbc + b * (R + 2 * N);
        const float4 bb = reinterpret_cast<const float4 *>(row + R)[g];
        const float4 cc = reinterpret_cast<const float4 *>(row + R + N)[g];
        scan4_item(s[j], a, bb, cc, dl[j] + dtb, xv[j], zv[j], De, G, g, valid, w,
                   reinterpret_cast<float4 *>(ssm + w * N) + g, y, yb, yl, ev, pol);
    }
}

// step_scan4_kernel<1> in an early PDL form for the batched decode (BLACKMAMBA_SCAN4_EARLY):
// one wave of CTAs (grid-stride, IT (b, e, lane) items a thread), launched with PDL, which
// reads its items' recurrent state (12 MB at B = 64 of the 2.8B shape) BEFORE
// griddepcontrol.wait, i.e. while x_proj and dt_proj (latency-bound: HBM idles) still run,
// then waits and computes and stores as step_scan4_kernel<1> (same arithmetic, same order:
// bit-identical). Why: step_scan4_kernel's 2944 CTAs at B = 64 are more than a wave, so
// bm_launch_pdl launches them plainly and the scan (10-11 us a layer) reads its 12 MB and
// writes them back only after dt_proj completes. The state is written only by this kernel of
// this layer one step before (each engine pass starts with the plainly launched embed_kernel),
// as the batch-1 early scan argues (common.cuh bm_pdl_trigger). After the wait every
// activation is read from L2 (__ldcg: no ld.global.nc, which ptxas may hoist above the wait,
// and no stale L1 lines). The float4 index of lane g of (b, e) is (b E + e) G + g = the item.
std::atomic<long long> g_scan4_early{0};  // launches (tests)
template <int IT>
__global__ void __launch_bounds__(256, IT == 1 ? 8 : IT == 2 ? 6 : 4) step_scan4_early_kernel(
    float *__restrict__ ssm, const float *__restrict__ xc, const float *__restrict__ z,
    const float *__restrict__ dbc, const float *__restrict__ delta, const float *__restrict__ dt_b,
    const float *__restrict__ A, const float *__restrict__ D, float *__restrict__ y,
    uint16_t *__restrict__ yb, uint16_t *__restrict__ yl, int64_t BE, int E, int N, int R,
    int g4, int ev) {  // ev: scan_evict_mode() (1 loads, 2 stores as evict_first lines)
    bm_pdl_trigger();
    const uint64_t pol = (ev & 3) ? bm_evict_first_policy() : 0;
    const int G = 1 << g4;
    const int64_t total = BE << g4, stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t t0 = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    float4 *s4 = reinterpret_cast<float4 *>(ssm);
    float4 s[IT];
#pragma unroll
    for (int k = 0; k < IT; k++) {  // the state: before the wait (items past the end: clamped)
        const int64_t i = min(t0 + k * stride, total - 1);
        s[k] = (ev & 1) ? ld_f4_cg_pol(s4 + i, pol) : __ldcg(s4 + i);
    }
    bm_pdl_wait_only();
#pragma unroll
    for (int k = 0; k < IT; k++) {
        const int64_t iv = t0 + k * stride;
        if (iv - threadIdx.x % 32 >= total) break;  // the whole warp is past the end
        const bool valid = iv < total;               // (total is a multiple of G)
        const int64_t i = valid ? iv : total - 1;
        const int64_t w = i >> g4;
        const int g = (int)(i & (G - 1));
        const int b = (int)w / E;  // 32-bit: the launch has B E G < 2^31 items (v4's rule)
        const int e = (int)w - b * E;
        const float dl = __ldcg(delta + w), xv = __ldcg(xc + w), zv = __ldcg(z + w);
        const float4 a = reinterpret_cast<const float4 *>(A + (int64_t)e * N)[g];
        const float *row = dbc + (int64_t)b * (R + 2 * N);
        const float4 bb = __ldcg(reinterpret_cast<const float4 *>(row + R) + g);
        const float4 cc = __ldcg(reinterpret_cast<const float4 *>(row + R + N) + g);
        scan4_item(s[k], a, bb, cc, dl + dt_b[e], xv, zv, D[e], G, g, valid, w, s4 + i, y, yb,
                   yl, ev, pol);
    }
}

// BLACKMAMBA_SCAN4_EARLY: the batched decode's float4 scan step (one row a lane, delta from
// dt_proj) as step_scan4_early_kernel where one wave of it holds every item with at most IT
// items a thread: unset IT <= 2 (the default), "1" IT <= 6, "0" never (the plain
// step_scan4_kernel). Read at graph capture. Measured on the H200 (2.8B shape, same process,
// bit-identical logits; cuda/NOTES.md session 7): B = 16 (IT 1) 1.937-1.948 -> 1.934-1.936
// ms, B = 32 (IT 2) 2.138-2.140 -> 2.121-2.123, B = 64 (IT 6) 2.325-2.327 -> 2.328-2.330:
// there the six items a thread, each with its L2 loads after the wait, cost what the early
// state reads save.
int scan4_early_max_it() {
    const char *e = getenv("BLACKMAMBA_SCAN4_EARLY");
    return e && e[0] == '0' ? 0 : e && e[0] == '1' ? 6 : 2;
}
// Launches it for `items` (b, e, lane) items if one wave holds them with at most max_it a
// thread: *done = 1, else 0 (the caller takes step_scan4_kernel); returns a CUDA status.
template <typename... Args>
int scan4_early_launch(int64_t items, int max_it, cudaStream_t st, int *done, Args... args) {
    *done = 0;
    int sms = 0;
    TRY(bm_sm_count(&sms));
    if (!bm_pdl_allowed() || sms <= 0) return 0;
    auto go = [&](auto kernel, int it, int bps) -> int {
        const int64_t blocks = bm_cdiv(items, 256 * (int64_t)it);
        if (it > max_it || blocks > (int64_t)sms * bps) return 0;
        BM_CUDA_TRY(bm_launch_ex(kernel, dim3((unsigned)blocks), dim3(256), 0, st, true, 1, false,
                                 args...));
        g_scan4_early.fetch_add(1, std::memory_order_relaxed);
        *done = 1;
        return 0;
    };
    // (IT, CTAs an SM): (1, 8) to B = 22, (2, 6) to 34, (6, 4) to 68 at the 2.8B shape, 132 SMs
    int r = go(step_scan4_early_kernel<1>, 1, 8);
    if (!r && !*done) r = go(step_scan4_early_kernel<2>, 2, 6);
    if (!r && !*done) r = go(step_scan4_early_kernel<6>, 6, 4);
    return r;
}

// BLACKMAMBA_SCAN_EVICT: the float4 scan step's state loads (1), stores (2) or both (3, the
// default) as evict_first L2 lines (bm_evict_first_policy); 0: plain. Read at graph capture.
int scan_evict_mode() { return (int)bm_env_long("BLACKMAMBA_SCAN_EVICT", 0, 3, 3); }
// BLACKMAMBA_L2SIDE_STATE: does the batched decode's side branch stage the Mamba layer's SSM
// state (`bytes`, B E N floats) into L2 before the next MoE layer's fc1 bytes? Unset: where it
// is at least L2SIDE_STATE_MIN (measured: B = 64 -0.4 to -0.9%, 32 -0.2 to -0.5%, but 16
// (3 MB) +0.5 to +0.8% on the 2.8B shape); "0" never, "1" always. Read at graph capture.
std::atomic<long long> g_l2side_state{0};  // stagings of a layer's state (tests)
constexpr int64_t L2SIDE_STATE_MIN = 6 << 20;
bool l2side_state_on(int64_t bytes) {
    return bm_env_switch("BLACKMAMBA_L2SIDE_STATE", bytes >= L2SIDE_STATE_MIN);
}

// BLACKMAMBA_SCAN4_ROWS: batch rows a lane of step_scan4_kernel (1, 2 or 4; default
// SCAN4_ROWS_DEFAULT, from the measurements in cuda/NOTES.md).
constexpr int SCAN4_ROWS_DEFAULT = 1;
int scan4_rows() {
    const char *e = getenv("BLACKMAMBA_SCAN4_ROWS");
    const int v = e && e[0] ? atoi(e) : SCAN4_ROWS_DEFAULT;
    return v == 2 || v == 4 ? v : 1;
}

// Does the batched decode's scan step compute delta itself (FDT) at B rows, instead of the
// dt_proj GEMM before it? BLACKMAMBA_SCAN4_DT: unset = at most GEMV_ROWS rows (measured on
// the H200, session 5 dec64b: at B = 8, where dt_proj is a conversion pass and two split
// bf16 GEMMs, 2.08-2.14 against 2.22 ms/step; at B = 64, where it is one tf32 GEMM, 2.48
// against 2.36: the fp32 dot, ~92 float4 L1 loads a (b, e), costs more than the GEMM there);
// "1" = at every batch (tests, A/B); "0" = never.
std::atomic<long long> g_scan4_dt{0};  // step_scan4_kernel<., true> launches (tests)
bool scan4_dt_on(int64_t B) { return bm_env_switch("BLACKMAMBA_SCAN4_DT", B <= GEMV_ROWS); }

// BLACKMAMBA_XDT_DEC: the batched decode's x_proj and dt_proj through xdt.cu's PDL kernels
// (fp32 FMAs on the float32 weights, one cluster K-split kernel and one dt_proj kernel) instead
// of cuBLAS's tf32 K-split GEMM, its reduction kernel and the tf32 dt_proj GEMM. Unset: at
// every batched decode size (B > Ws::gv: from dec_gemm_min() rows; XDT_DEC_DEFAULT; measured
// on the H200, cuda/NOTES.md session 6 xdt64: B = 16 1.964 against 2.025 ms/step, B = 64
// 2.357 against 2.356; session 18: at B = 8, 4, 2, where it had been off (the FDT scan
// computes delta there, so only x_proj changes: no conversion pass, no split products),
// -5.7 / -5.3 / -6.5% split and -3.4 / -3.6 / -6.0% unsplit); "0": never. (Its variants,
// a PDL trigger at a kernel's end, dt_proj in 64-row tiles, x_proj's clusters spread, all
// measured no faster and removed: cuda/NOTES.md sessions 6 and 7.)
constexpr bool XDT_DEC_DEFAULT = true;
bool xdt_dec_on() { return bm_env_switch("BLACKMAMBA_XDT_DEC", XDT_DEC_DEFAULT); }

std::atomic<long long> g_nr_pre{0};  // norm_route_kernel<., NR_PRE_ROW> launches (tests)
// the same in prefills (NR_PRE_ROW or NR_PRE_DISP), and of those NR_PRE_DISP (tests)
std::atomic<long long> g_nr_pre_fill{0}, g_nr_disp_fill{0};
std::atomic<long long> g_nr_disp{0};  // norm_route_kernel<., NR_PRE_DISP> launches (tests)
// BLACKMAMBA_MOE_ROUTE_DISPATCH=0: the batched decode's routing leaves the dispatch to
// dispatch_kernel (A/B; session 6 moe64).
bool route_dispatch_on() { return bm_env_switch("BLACKMAMBA_MOE_ROUTE_DISPATCH", true); }
// BLACKMAMBA_MOE_DEC_PDL: how the batched decode's grouped expert GEMMs (T rows, X experts)
// meet PDL (grouped.cu launch_grouped): 0 plain launches, 1 both wait first, 2 also fc2's
// first weight stages before its wait, 3 also fc1 one CTA row per expert, its first weight
// stages before its wait; 4 fc1 as 1 and 5 fc1 as 3, fc2 plain. BLACKMAMBA_MOE_DEC_PDL_CAP:
// 1 caps fc2's CTAs an SM (grouped.cu, BM_MOE_GROUPED_FC2_CAP), 0 not. Defaults (session 6
// moe64, runs 1 and 2, same process, cuda/NOTES.md): up to GEMV_ROWS rows 2 uncapped (B = 8:
// 2.173 against 2.210 ms/step with neither); from 2X rows 3 capped (B = 64: 2.318 against
// 2.382 with plain launches; fc1's early tiles lose where experts have no token, ~0.75 us a
// layer for each such expert measured at B = 8, and at 2X rows fewer than one of X is
// expected empty) up to 32X rows (past one 32-row tile an expert on average, fc1's one CTA
// row per expert would run its tiles one after another); otherwise 2 capped. Uncapped, fc2 launched early lost 6-11 us a layer at
// B = 64: its CTAs gathered on the SMs that fc1 freed first. Returns
// bm_cuda_moe_grouped_bf16_ex's flags.
// Mode v's flags, fc2 capped by the rule below (or BLACKMAMBA_MOE_DEC_PDL_CAP).
int moe_pdl_flags_of(int v, int64_t T) {
    // capped also at up to 5 rows (session 18, same process, the stacked split path: B = 2
    // -3.4%, 3 -0.6%, 4 -0.8%, 5 -1.1%; 6, 7, 8 +1.4, +1.3, +1.0%)
    const bool cap = bm_env_switch("BLACKMAMBA_MOE_DEC_PDL_CAP", T > GEMV_ROWS || T <= 5);
    static const int f[6] = {0,
                             BM_MOE_GROUPED_PDL,
                             BM_MOE_GROUPED_PDL_EARLY,
                             BM_MOE_GROUPED_PDL_EXPERT,
                             BM_MOE_GROUPED_PDL | BM_MOE_GROUPED_FC2_PLAIN,
                             BM_MOE_GROUPED_PDL_EXPERT | BM_MOE_GROUPED_FC2_PLAIN};
    return f[v] | (f[v] && cap ? BM_MOE_GROUPED_FC2_CAP : 0);
}
int env_digit05(const char *name) {  // the switch's leading digit 0..5, or -1
    const char *e = getenv(name);
    return e && e[0] >= '0' && e[0] <= '5' ? e[0] - '0' : -1;
}
int moe_dec_pdl_mode(int64_t T, int64_t X) {
    return T <= GEMV_ROWS ? 2 : T >= 2 * X && T <= 32 * X ? 3 : 2;
}
int moe_dec_pdl_flags(int64_t T, int64_t X) {
    const int e = env_digit05("BLACKMAMBA_MOE_DEC_PDL");
    return moe_pdl_flags_of(e >= 0 ? e : moe_dec_pdl_mode(T, X), T);
}
// A prefill's grouped GEMMs with PDL too (session 24), on the prefill's own tiles
// (BM_MOE_GROUPED_PREFILL): split calls (bf16 math up to 128 tokens) by the decode's rule,
// unsplit ones mode 2 from 24 rows an expert on average, plain launches below (the TMA core
// and the large prefill tiles launch plainly anyway). Same process, H200, 2.8B shape, against
// plain launches (cuda/NOTES.md session 24): b = 1, 5 / 8 / 16 / 32 / 64 / 128 tokens -5.6 /
// -4.3 / -1.7 / -4.7 / -2.1 / -0.3%, b = 2 x 16 -5.1%, 4 x 16 -4.1%, 2 x 64 -0.8%; unsplit,
// mode 2: 136 / 160 / 192 / 256 / 300 tokens +2.2 / +1.1 / -0.1 / -2.0 / -3.8%, 4 x 64 -3.0%
// (mode 3, the decode's rule there: +3.6 to +6.3% at 160-256). BLACKMAMBA_PREFILL_MOE_PDL: a
// digit as BLACKMAMBA_MOE_DEC_PDL's ("0": plain launches; A/B, tests).
int moe_prefill_pdl_flags(int64_t T, int64_t X, bool split) {
    const int e = env_digit05("BLACKMAMBA_PREFILL_MOE_PDL");
    const int v = e >= 0 ? e : split ? moe_dec_pdl_mode(T, X) : T >= 24 * X ? 2 : 0;
    return moe_pdl_flags_of(v, T) | BM_MOE_GROUPED_PREFILL;
}
// BLACKMAMBA_MOE_IDS=0: the batched decode's grouped experts read the dispatch built by the
// routing kernel's last block (NR_PRE_DISP) instead of deriving it from the ids in each CTA
// (BM_MOE_GROUPED_IDS, grouped.cu ids_list; read at graph capture). Measured on the H200 (2.8B
// shape, same process): see cuda/NOTES.md session 12.
bool moe_ids_on() { return bm_env_switch("BLACKMAMBA_MOE_IDS", true); }
std::atomic<long long> g_nr_ids{0};  // routing kernels whose layer's GEMMs read the ids (tests)

// BLACKMAMBA_NORM_ROUTE_PRE=0: batched decode uses norm_route_kernel (A/B).
bool nr_pre_on() { return bm_env_switch("BLACKMAMBA_NORM_ROUTE_PRE", true); }

// BLACKMAMBA_SCAN4=0: the batched decode keeps the scalar step and the to_bf16 pass (A/B).
bool scan4_on() { return bm_env_switch("BLACKMAMBA_SCAN4", true); }

// out[row] = argmax_{i < limit} logits[row, i], ties -> lowest index. One block per row.
constexpr int ARGMAX_THREADS = 256;
__global__ __launch_bounds__(ARGMAX_THREADS) void argmax_kernel(
    const float *__restrict__ logits,  // (B, V)
    int64_t V, int limit,
    int32_t *__restrict__ out) {       // (B)
    __shared__ float sv[ARGMAX_THREADS];
    __shared__ int si[ARGMAX_THREADS];
    const float *p = logits + (int64_t)blockIdx.x * V;
    float best = -INFINITY;
    int bi = limit;  // sentinel: larger than every real index
    for (int i = threadIdx.x; i < limit; i += ARGMAX_THREADS) {
        const float v = p[i];
        if (v > best || (v == best && i < bi)) { best = v; bi = i; }
    }
    sv[threadIdx.x] = best;
    si[threadIdx.x] = bi;
    __syncthreads();
    for (int s = ARGMAX_THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            const float v = sv[threadIdx.x + s];
            const int j = si[threadIdx.x + s];
            if (v > sv[threadIdx.x] || (v == sv[threadIdx.x] && j < si[threadIdx.x])) {
                sv[threadIdx.x] = v;
                si[threadIdx.x] = j;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = si[0] < limit ? si[0] : 0;  // all-NaN row -> 0
}

// The early PDL kernels (common.cuh bm_pdl_early) run in the one-token graph only: at batch 8
// they lost to the wait-first ones once made correct (cuda/NOTES.md, Session 4, pdl1), so the
// graphs of larger batches keep exactly the kernels they had.
bool b1_early(int64_t T) { return T == 1 && bm_pdl_early(); }

unsigned grid_for(int64_t n) {
    const int64_t g = bm_cdiv(n, 256);
    return (unsigned)(g < 1 ? 1 : g > 65536 ? 65536 : g);
}

// Stages the profiler attributes time to (bm_cuda_bench_profile; names in bm_cuda.h).
enum { P_START, P_EMBED, P_NORM, P_IN, P_CONV, P_XPROJ, P_DT, P_SCAN, P_OUT, P_ROUTE,
       P_EXPERTS, P_ADD, P_FINAL, P_HEAD, P_COUNT };

static_assert(P_COUNT == BM_CUDA_PROF_STAGES, "profiler stages: engine.cu vs bm_cuda.h");

// Marks the end of a stage: an event on the stream (captured into the graph as an event
// record node when capturing). Nothing unless profiling.
int mark(bm_cuda_model *m, int kind) {
    if (!m->prof_on || m->prof_n >= m->prof_ev.size()) return 0;
    // Inside a capture a plain record only orders work; an external record node is what
    // cudaEventElapsedTime can read after a replay.
    if (m->prof_graph)
        BM_CUDA_TRY(cudaEventRecordWithFlags(m->prof_ev[m->prof_n], m->stream,
                                             cudaEventRecordExternal));
    else
        BM_CUDA_TRY(cudaEventRecord(m->prof_ev[m->prof_n], m->stream));
    m->prof_kind[m->prof_n++] = kind;
    return 0;
}

// ---- matrix products -------------------------------------------------------------------------

size_t wsize(const bm_cuda_model *m) { return m->cfg.wdtype == BM_F32 ? 4 : 2; }
const void *wrows(const bm_cuda_model *m, const void *W, int64_t row0, int64_t Kin) {
    return (const char *)W + (size_t)(row0 * Kin) * wsize(m);
}

// The cuBLAS handle's stream and workspace: set before every eager call and every capture
// (bm_cuda_moe_experts sets the stream, which resets the workspace to cuBLAS's own pool).
int blas_prepare(bm_cuda_model *m) {
    BM_CUBLAS_TRY(cublasSetStream(m->blas, m->stream));
    BM_CUBLAS_TRY(cublasSetWorkspace(m->blas, m->blas_ws, BLAS_WS_BYTES));
    BM_CUBLAS_TRY(cublasSetMathMode(m->blas, CUBLAS_DEFAULT_MATH));
    return 0;
}

// beta 1: y += the product (the low half of a split product).
int gemm(bm_cuda_model *m, const void *W, cudaDataType wt, const void *x, cudaDataType xt,
         int64_t ldx, float *y, int64_t ldy, int64_t M, int64_t Nout, int64_t Kin,
         cublasComputeType_t ct, float beta = 0.f) {
    // Row-major y (M, Nout) = x (M, Kin) W^T is column-major y^T = (W viewed (Kin, Nout))^T x^T.
    const float one = 1.f;
    BM_CUBLAS_TRY(cublasGemmEx(m->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)Nout, (int)M, (int)Kin,
                               &one, W, wt, (int)Kin, x, xt, (int)ldx, &beta, y, CUDA_R_32F,
                               (int)ldy, ct, CUBLAS_GEMM_DEFAULT));
    return 0;
}

// bf16 weights used as stored with bf16 activations (BF16, or BF16X2's hi + lo).
bool bf16_math(const bm_cuda_model *m) {
    return m->cfg.wdtype == BM_BF16 &&
           (m->cfg.math == BM_CUDA_MATH_BF16 || m->cfg.math == BM_CUDA_MATH_BF16X2);
}
// Rows up to which a BF16-math prefill product splits its activations (0: never; BF16X2
// always splits, see split_x).
int64_t split_limit(const bm_cuda_config &c) {
    if (c.wdtype != BM_BF16 || c.math != BM_CUDA_MATH_BF16) return 0;
    if (c.bf16_split_rows < 0) return 0;
    return c.bf16_split_rows ? c.bf16_split_rows : BM_CUDA_BF16_SPLIT_ROWS;
}
// Does a bf16-math product (or MoE layer) of M rows split its activations into hi + lo?
bool split_x(const bm_cuda_model *m, const Ws *ws, int64_t M) {
    if (!bf16_math(m)) return false;
    if (m->cfg.math == BM_CUDA_MATH_BF16X2) return true;
    if (ws->decode) return ws->dsplit;
    return M <= split_limit(m->cfg);
}
// Does a product of M rows expand 16-bit weights (bf16 outside BF16 math; fp16 always) to fp32
// (needs the wf scratch)?
bool needs_wf(const bm_cuda_model *m, int64_t M) {
    return m->cfg.wdtype != BM_F32 && !bf16_math(m) && M > GEMV_ROWS_EXACT;
}
int ensure_wf(bm_cuda_model *m) {
    if (m->wf) return 0;
    const bm_cuda_config &c = m->cfg;
    int64_t n = c.V * c.d;
    n = std::max(n, c.E * c.d);
    n = std::max(n, (c.R + 2 * c.N) * c.E);
    n = std::max(n, c.E * c.R);
    TRY(dev_alloc((void **)&m->wf, (size_t)n * 4, "16-bit -> fp32 weight scratch"));
    m->wf_elems = n;
    return 0;
}

// BLACKMAMBA_MAMBAPATH=0: the Mamba layer's products as before branch mambapath (two in_proj
// GEMMs, x_proj unsplit, the scalar to_bf16, y converted after the scan), for A/B
// measurements in one process (cuda/dev/ab_mambapath.py;
// decode graphs are captured per state, so a new state picks up a change).
bool mp_on() { return bm_env_switch("BLACKMAMBA_MAMBAPATH", true); }

// Decode batches of at least this many rows take the batched paths (decode_body);
// BLACKMAMBA_DECODE_GEMM_MIN overrides (2..9; 9 = the GEMVs up to 8 rows as before), for A/B.
// Default 8 until session 18 (measured at batch 8 only: 2.41 against 3.20 ms/step through the
// GEMVs; cuda/NOTES.md session 4 dec64). Default 2 since session 18, once the split products
// were stacked (stack_on) and x_proj went through xdt.cu at these sizes: the batched path
// against the GEMVs on the H200 (2.8B shape, same process), B = 2 1.281 against 1.563 ms/step,
// 3 1.394 / 1.784, 4 1.471 / 1.939, 6 1.613 / 2.909, 7 1.727 / 3.121 (logits within 8e-5: both
// are fp32-class, the batched path's products split into bf16 hi + lo). The tests run 2..8
// through both paths.
constexpr int64_t DEC_GEMM_MIN_DEFAULT = 2;
int64_t dec_gemm_min() {
    const char *e = getenv("BLACKMAMBA_DECODE_GEMM_MIN");
    const int64_t v = e && e[0] ? atoll(e) : DEC_GEMM_MIN_DEFAULT;
    return std::min<int64_t>(std::max<int64_t>(v, 2), GEMV_ROWS + 1);
}

// The batch-1 Mamba layers' RMSNorm carried by in_proj's early GEMV (GemvParams::norm_h):
// BLACKMAMBA_DECODE_NORM_FUSE=1 only. Off by default: measured slower on the H200 (0.734
// against 0.684 ms a batch-1 step at the 2.8B shape, same process, bit-identical logits;
// cuda/NOTES.md "Session 5, lead"). Read at graph capture.
bool norm_fuse_on() { return bm_env_switch("BLACKMAMBA_DECODE_NORM_FUSE", false); }

// A Mamba layer's input norm handed to mamba_step: xn = RMSNorm(h + r) * w, the sum to r_out.
struct NormIn {
    const float *h, *r, *w;
    float *r_out;
};

// BLACKMAMBA_DECODE_NORM_BF=0: the batched decode converts in_proj's input itself (A/B).
bool norm_bf_on() { return bm_env_switch("BLACKMAMBA_DECODE_NORM_BF", true); }

// BLACKMAMBA_DECODE_NORM_FC2=0: the batched decode keeps the Mamba layer's RMSNorm kernel
// after a MoE layer, instead of fc2's norm epilogue and the scaled conv step (forward();
// read at graph capture).
bool norm_fc2_on() { return bm_env_switch("BLACKMAMBA_DECODE_NORM_FC2", true); }
// BLACKMAMBA_DECODE_NORM_FC2_SPLIT=0: the split decode (2-8 rows) keeps the norm kernel while
// the unsplit batches still norm in fc2 (A/B; session 19). Read at graph capture.
bool norm_fc2_split_on() { return bm_env_switch("BLACKMAMBA_DECODE_NORM_FC2_SPLIT", true); }
std::atomic<long long> g_norm_fc2{0};  // Mamba layers normed in fc2 (the tests)

// xb (M, K) = bf16(x (M, ldx)[:, :K]) (+ xlo, the low parts): the vectorised kernel where
// the layout allows it.
int to_bf16(bm_cuda_model *m, const float *x, int64_t ldx, uint16_t *xb, int64_t M, int64_t K,
            uint16_t *xlo) {
    if (mp_on() && K % 4 == 0 && ldx % 4 == 0 && M < INT32_MAX && K / 4 < INT32_MAX &&
        (((uintptr_t)x & 15) | ((uintptr_t)xb & 7) | ((uintptr_t)xlo & 7)) == 0) {
        const int K4 = (int)(K / 4);
        const dim3 grid((unsigned)bm_cdiv(K4, 128), (unsigned)std::min<int64_t>(M, 1024));
        to_bf16_vec_kernel<<<grid, 128, 0, m->stream>>>(x, ldx, xb, (int)M, K4, xlo);
    } else {
        to_bf16_kernel<<<grid_for(M * K), 256, 0, m->stream>>>(x, ldx, xb, M, K, xlo);
    }
    BM_CUDA_LAUNCHED();
    return 0;
}

// y (M, ldy)[:, :Nout] = x (M, ldx)[:, :Kin] @ W (Nout, Kin)^T (+ bias (Nout)). See the top.
// xbf_ready: ws->xbf already holds bf16(x) (the second in_proj half reuses the first's).
int linear(bm_cuda_model *m, Ws *ws, const float *x, int64_t ldx, const void *W,
           const float *bias, float *y, int64_t ldy, int64_t M, int64_t Nout, int64_t Kin,
           bool xbf_ready = false) {
    if (M <= 0 || Nout <= 0) return 0;
    const bool bf = m->cfg.wdtype != BM_F32;  // 16-bit weights: bf16, or fp16 (never bf16 math)
    const bool bfm = bf16_math(m);
    if (M <= ws->gv || (bf && !bfm && M <= GEMV_ROWS_EXACT)) {
        GemvParams p{W, x, ldx, nullptr, nullptr, bias, y, ldy, (int)M, (int)Nout, (int)Kin};
        p.w_static = 1;  // the model's weights (every engine pass starts with embed_kernel,
                         // a plain launch: nothing before it in the stream overlaps)
        return bm_gemv_launch(p, m->cfg.wdtype, 1, 0, m->stream);
    }
    if (bfm) {
        const bool split = split_x(m, ws, M);
        if (split && (!ws->xlo || M > ws->Ts))
            return BM_CUDA_ARG_FAIL("engine: split-activation scratch missing or too small");
        if (!xbf_ready) TRY(to_bf16(m, x, ldx, ws->xbf, M, Kin, split ? ws->xlo : nullptr));
        TRY(gemm(m, W, CUDA_R_16BF, ws->xbf, CUDA_R_16BF, Kin, y, ldy, M, Nout, Kin,
                 CUBLAS_COMPUTE_32F));
        if (split)  // y += lo @ W^T
            TRY(gemm(m, W, CUDA_R_16BF, ws->xlo, CUDA_R_16BF, Kin, y, ldy, M, Nout, Kin,
                     CUBLAS_COMPUTE_32F, 1.f));
    } else {
        const void *Wf = W;
        if (bf) {
            if (!m->wf || Nout * Kin > m->wf_elems)
                return BM_CUDA_ARG_FAIL("engine: weight scratch missing or too small");
            // exact (bf16 or fp16 -> fp32): the product is then the fp32 one on these weights
            TRY(bm_cuda_convert(W, m->cfg.wdtype, m->wf, BM_F32, Nout * Kin, m->stream));
            Wf = m->wf;
        }
        const cublasComputeType_t ct = m->cfg.math == BM_CUDA_MATH_FP32
                                           ? CUBLAS_COMPUTE_32F
                                           : CUBLAS_COMPUTE_32F_FAST_TF32;
        TRY(gemm(m, Wf, CUDA_R_32F, x, CUDA_R_32F, ldx, y, ldy, M, Nout, Kin, ct));
    }
    if (bias) {
        add_bias_kernel<<<grid_for(M * Nout), 256, 0, m->stream>>>(y, ldy, bias, M, Nout);
        BM_CUDA_LAUNCHED();
    }
    return 0;
}

// ---- layers ----------------------------------------------------------------------------------

std::atomic<long long> g_small_tf32{0};    // tf32 x_proj / dt_proj products (tests)

// x_proj and dt_proj of M rows in tf32 on the float32 weight copies (LayerDev::x_wf, dt_wf)?
// Where BF16 math would round the activations to bf16 without splitting them: tf32 keeps 11
// significant bits of both operands against bf16's 8, so this is never less exact.
bool tf32_small(const bm_cuda_model *m, const Ws *ws, const LayerDev &ly, int64_t M) {
    return ly.x_wf && ly.dt_wf && M > ws->gv && !split_x(m, ws, M) && mp_on();
}

// dt_proj: delta (M, E) = dbc[:, :R] (M, ld P) @ dt_w^T (the bias is added in the scan).
int dt_proj(bm_cuda_model *m, Ws *ws, const LayerDev &ly, int64_t M, bool xbf_ready = false) {
    const bm_cuda_config &c = m->cfg;
    const int64_t E = c.E, R = c.R, P = R + 2 * c.N;
    if (tf32_small(m, ws, ly, M)) {
        g_small_tf32.fetch_add(1, std::memory_order_relaxed);
        return gemm(m, ly.dt_wf, CUDA_R_32F, ws->dbc, CUDA_R_32F, P, ws->delta, E, M, E, R,
                    CUBLAS_COMPUTE_32F_FAST_TF32);
    }
    return linear(m, ws, ws->dbc, P, ly.dt_w, nullptr, ws->delta, E, M, E, R, xbf_ready);
}

// K-split of x_proj (BF16 math, more than GEMV_ROWS rows): the product is 124 outputs long
// and 2944 deep, so cuBLAS gets cdiv(M, 128) output tiles (16 at a 2048-token prefill, 1 at a
// 64-row decode) and walks K serially in each. Cutting K into ks slices (a strided-batched
// GEMM into fp32 partials, then one reduction that also splits out B and C) gives ks times
// the CTAs. ks: the most slices of at least 128 (multiple of 8: 16-byte aligned bf16 slices)
// with ks * cdiv(M, 128) <= 160 (about one wave of CTAs); 1 = no split.
std::atomic<long long> g_xproj_ksplit{0};  // K-split x_proj launches (tests check the path)
int xproj_ks(const bm_cuda_model *m, const Ws *ws, int64_t M, int64_t Nout, int64_t Kin) {
    if (!bf16_math(m) || M <= ws->gv || !ws->xpart || Nout > 256 || !mp_on()) return 1;
    for (int ks = 32; ks >= 2; ks--) {
        if (Kin % ks || (Kin / ks) % 8 || Kin / ks < 128) continue;
        if (ks * bm_cdiv(M, 128) > 160 || ks * M > ws->xpart_rows) continue;
        if ((int64_t)ks * M * Nout >= INT32_MAX) continue;
        return ks;
    }
    return 1;
}

// Does in_proj() run M rows as one batched bf16 GEMM (below)?
bool in_proj_batched(const bm_cuda_model *m, const Ws *ws, int64_t M) {
    return bf16_math(m) && M > ws->gv && mp_on();
}

// in_proj: x = xz[:M] (M, E) and z = xz[M*E:] (M, E) from xn (M, d). Under BF16 math with more
// than GEMV_ROWS rows both halves are one strided-batched GEMM (batch 2: the weight halves E*d
// apart, the outputs M*E apart, the same bf16 input): one launch instead of two and twice the
// CTAs in it.
// xbf_ready: the norm already wrote bf16(xn) (and its low parts when split) into ws->xbf
// (ws->xlo); only where in_proj_batched().
int in_proj(bm_cuda_model *m, Ws *ws, const LayerDev &ly, const float *xn, int64_t M,
            bool xbf_ready = false) {
    const bm_cuda_config &c = m->cfg;
    const int64_t d = c.d, E = c.E;
    float *x = ws->xz, *z = ws->xz + M * E;
    if (!in_proj_batched(m, ws, M)) {
        TRY(linear(m, ws, xn, d, ly.in_w, ly.in_b, x, E, M, E, d));
        return linear(m, ws, xn, d, wrows(m, ly.in_w, E, d), ly.in_b ? ly.in_b + E : nullptr,
                      z, E, M, E, d, true);
    }
    const bool split = split_x(m, ws, M);
    if (split && (!ws->xlo || M > ws->Ts))
        return BM_CUDA_ARG_FAIL("engine: split-activation scratch missing or too small");
    if (!xbf_ready) TRY(to_bf16(m, xn, d, ws->xbf, M, d, split ? ws->xlo : nullptr));
    const float one = 1.f, zero = 0.f;
    for (int h = 0; h < (split ? 2 : 1); h++)  // hi, then (split) lo accumulating
        BM_CUBLAS_TRY(cublasGemmStridedBatchedEx(
            m->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)E, (int)M, (int)d, &one, ly.in_w,
            CUDA_R_16BF, (int)d, (long long)(E * d), h ? ws->xlo : ws->xbf, CUDA_R_16BF,
            (int)d, 0LL, h ? &one : &zero, x, CUDA_R_32F, (int)E, (long long)(M * E), 2,
            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    if (ly.in_b) {
        add_bias_kernel<<<grid_for(M * E), 256, 0, m->stream>>>(x, E, ly.in_b, M, E);
        BM_CUDA_LAUNCHED();
        add_bias_kernel<<<grid_for(M * E), 256, 0, m->stream>>>(z, E, ly.in_b + E, M, E);
        BM_CUDA_LAUNCHED();
    }
    return 0;
}

// A short split prefill's K-split x_proj as one strided batch of its hi and lo rows (session
// 22, as in_proj's stack_in_fill_ok): to_bf16 writes the lo rows right after the hi rows (xbf
// has room for 2M rows of E where M <= Ts), one batch of 2M rows fills the partials (ks, 2M, P),
// and the reduction adds each slice's two rows before the slices. Unset / "1": on; "0": the
// two batches, the second accumulating (A/B, tests). Read per call.
bool prefill_stack_xproj_on() { return bm_env_switch("BLACKMAMBA_PREFILL_STACK_XPROJ", true); }
std::atomic<long long> g_xproj_stack{0};  // x_proj batches of that form (tests)
bool xproj_stack_ok(const bm_cuda_model *m, const Ws *ws, int64_t M, int ks) {
    return !ws->decode && M <= ws->Ts && (int64_t)ks * 2 * M <= ws->xpart_rows &&
           (int64_t)ks * 2 * M * (m->cfg.R + 2 * m->cfg.N) < INT32_MAX &&
           prefill_stack_xproj_on();
}

// A short split prefill's bf16 conversions in the kernels before (session 22): the conv of a
// stacked in_proj writes x_proj's bf16 hi and lo rows of xc, and x_proj's K-split reduction
// writes dt_proj's of dbc (both where fuse_bf_ok), instead of a to_bf16 launch each
// (1.5 us and a launch gap a Mamba layer at 32 tokens). The same bits (bm_f32_to_bf16_split).
// Unset / "1": on; "0": the to_bf16 launches (A/B, tests). Read per call.
bool prefill_fuse_bf_on() { return bm_env_switch("BLACKMAMBA_PREFILL_FUSE_BF", true); }
std::atomic<long long> g_fuse_bf[2];  // conversions done by the conv, by the reduction (tests)
// Does x_proj of M rows run its bf16 K-split on split rows, and dt_proj then linear()'s bf16
// GEMMs (what dt_proj() takes when tf32_small does not), with the conversions fused?
bool fuse_bf_ok(const bm_cuda_model *m, const Ws *ws, const LayerDev &ly, int64_t M) {
    const bm_cuda_config &c = m->cfg;
    return !ws->decode && split_x(m, ws, M) && !tf32_small(m, ws, ly, M) &&
           xproj_ks(m, ws, M, c.R + 2 * c.N, c.E) > 1 && M > ws->gv && ws->xlo &&
           M <= ws->Ts && prefill_fuse_bf_on();
}

// A prefill of 2..XDT_FILL_MAX tokens under BF16 math runs x_proj and dt_proj through xdt.cu's
// fp32 kernels on the float32 weight copies (x_wf, dt_wf), as the batched decode has since
// session 6, then split_bc_kernel: three launches instead of the split path's bf16 K-split
// GEMM, its reduction and dt_proj's two GEMMs, and fp32 products instead of split bf16 ones.
// H200, 2.8B shape, batch 1, same process (cuda/NOTES.md session 22): 2 / 4 / 9 / 32 / 64 /
// 128 tokens -19 / -6.6 / -6.0 / -4.5 / -4.1 / -0.2%; logits within 5e-5. Longer split
// prefills (bf16x2) keep the split path (xproj_stack_ok, fuse_bf_ok). Unset / "1": on; "0":
// the split path (A/B, tests). Read per call.
constexpr int64_t XDT_FILL_MAX = 128;
std::atomic<long long> g_xdt_fill{0};  // prefill Mamba layers that took it (tests)
bool xdt_fill_ok(const bm_cuda_model *m, const Ws *ws, const LayerDev &ly, int64_t T) {
    const bm_cuda_config &c = m->cfg;
    return !ws->decode && T >= 2 && T <= XDT_FILL_MAX && bf16_math(m) && ly.x_wf && ly.dt_wf &&
           bm_env_switch("BLACKMAMBA_PREFILL_XDT", true) &&
           bm_xdt_ok(T, c.E, c.R, c.N, ws->xc, ly.x_wf, ws->dbc, ly.dt_wf, ws->delta);
}

// dbc (M, P) = xc (M, E) @ x_w^T; with Bm (prefill) also Bm, Cm (M, N) split out of it.
// xbf_ready (fuse_bf_ok and a stacked in_proj): the conv wrote bf16(xc) where the K-split
// reads it. dt_bf (fuse_bf_ok, decided once by the caller, which tells dt_proj the same): the
// K-split's reduction also writes dt_proj's bf16 input.
int x_proj(bm_cuda_model *m, Ws *ws, const LayerDev &ly, int64_t M, float *Bm, float *Cm,
           bool xbf_ready = false, bool dt_bf = false) {
    const bm_cuda_config &c = m->cfg;
    const int64_t E = c.E, N = c.N, R = c.R, P = R + 2 * N;
    const int ks = xproj_ks(m, ws, M, P, E);
    if (ks > 1 && tf32_small(m, ws, ly, M)) {
        // The K-split in tf32 straight from the float32 xc and x_wf (no bf16 pass over xc).
        const int64_t Kc = E / ks;
        const float one = 1.f, zero = 0.f;
        BM_CUBLAS_TRY(cublasGemmStridedBatchedEx(
            m->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)P, (int)M, (int)Kc, &one, ly.x_wf,
            CUDA_R_32F, (int)E, (long long)Kc, ws->xc, CUDA_R_32F, (int)E, (long long)Kc, &zero,
            ws->xpart, CUDA_R_32F, (int)P, (long long)(M * P), ks,
            CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT));
        xproj_reduce_kernel<<<(unsigned)bm_cdiv(M * P, 256), 256, 0, m->stream>>>(
            ws->xpart, ks, (int)M, (int)P, ws->dbc, Bm, Cm, (int)R, (int)N, 0, nullptr, nullptr);
        BM_CUDA_LAUNCHED();
        g_xproj_ksplit.fetch_add(1, std::memory_order_relaxed);
        g_small_tf32.fetch_add(1, std::memory_order_relaxed);
        return 0;
    }
    if (ks > 1) {
        const bool split = split_x(m, ws, M);
        if (split && (!ws->xlo || M > ws->Ts))
            return BM_CUDA_ARG_FAIL("engine: split-activation scratch missing or too small");
        // stacked: the lo rows right after the hi rows, one batch of 2M rows (xproj_stack_ok)
        const bool stk = split && xproj_stack_ok(m, ws, M, ks);
        if (!xbf_ready)
            TRY(to_bf16(m, ws->xc, E, ws->xbf, M, E,
                        split ? (stk ? ws->xbf + M * E : ws->xlo) : nullptr));
        const int64_t Kc = E / ks, rows = stk ? 2 * M : M;
        const float one = 1.f, zero = 0.f;
        for (int h = 0; h < (split && !stk ? 2 : 1); h++)  // hi, then (split) lo accumulating
            BM_CUBLAS_TRY(cublasGemmStridedBatchedEx(
                m->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)P, (int)rows, (int)Kc, &one, ly.x_w,
                CUDA_R_16BF, (int)E, (long long)Kc, h ? ws->xlo : ws->xbf, CUDA_R_16BF, (int)E,
                (long long)Kc, h ? &one : &zero, ws->xpart, CUDA_R_32F, (int)P,
                (long long)(rows * P), ks, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        if (stk) g_xproj_stack.fetch_add(1, std::memory_order_relaxed);
        xproj_reduce_kernel<<<(unsigned)bm_cdiv(M * P, 256), 256, 0, m->stream>>>(
            ws->xpart, ks, (int)M, (int)P, ws->dbc, Bm, Cm, (int)R, (int)N, stk ? 1 : 0,
            dt_bf ? ws->xbf : nullptr, dt_bf && split ? ws->xlo : nullptr);
        BM_CUDA_LAUNCHED();
        g_xproj_ksplit.fetch_add(1, std::memory_order_relaxed);
        return 0;
    }
    if (dt_bf) return BM_CUDA_ARG_FAIL("engine: dt_proj's bf16 rows asked of an unsplit x_proj");
    if (tf32_small(m, ws, ly, M)) {  // too few rows or too short a K for the split
        g_small_tf32.fetch_add(1, std::memory_order_relaxed);
        TRY(gemm(m, ly.x_wf, CUDA_R_32F, ws->xc, CUDA_R_32F, E, ws->dbc, P, M, P, E,
                 CUBLAS_COMPUTE_32F_FAST_TF32));
    } else {
        TRY(linear(m, ws, ws->xc, E, ly.x_w, nullptr, ws->dbc, P, M, P, E));
    }
    if (Bm) {
        split_bc_kernel<<<grid_for(M * N), 256, 0, m->stream>>>(ws->dbc, Bm, Cm, M, (int)R,
                                                                 (int)N);
        BM_CUDA_LAUNCHED();
    }
    return 0;
}

int out_pair_prefill(bm_cuda_model *m, Ws *ws, const LayerDev &ly, float *out, int64_t T,
                     bool stacked);
bool prefill_out_one_on();
// Where a split prefill's scan writes the low parts of bf16(y): right after the T hi rows where
// out_proj is one GEMM of both (stacked: prefill_out_one_on; xbf holds the workspace's rows
// plus Ts of max(d, E, R), and T <= Ts), else at xlo.
uint16_t *prefill_ylo(const Ws *ws, int64_t T, int64_t E, bool stacked) {
    return stacked ? ws->xbf + T * E : ws->xlo;
}
int in_proj_xzt(bm_cuda_model *m, Ws *ws, const LayerDev &ly, int64_t rows);
int l2side_fork(bm_cuda_model *m, const void *p, int64_t bytes, const void *p0, int64_t bytes0);

// in_proj_xzt (below), the prefill's form (session 22): a split prefill of at most hk_rows
// tokens (2-128 under BF16 math) ran in_proj as two strided batches (x and z halves) on the
// same 17 MB of weights, hi, then lo accumulating, each as cuBLAS's split-K kernels and
// reductions (8.0 + 6.6 us a layer at 32 tokens on the H200, session 21). Now the norm writes
// the lo rows after the hi rows, one
// GEMM of 2T rows fills xzt (2T, 2E), and the conv adds each row's two products
// (bm_cuda_conv_forward_sum) and writes the summed z for the scan. Unset / "1": on; "0": the
// two batches (A/B, tests). Read per call.
bool prefill_stack_in_on() { return bm_env_switch("BLACKMAMBA_PREFILL_STACK_IN", true); }
std::atomic<long long> g_stack_in_fill{0};  // prefill in_proj launches of that form (tests)
bool stack_in_fill_ok(const bm_cuda_model *m, const Ws *ws, const LayerDev &ly, int64_t T) {
    return !ws->decode && ws->xzt && 2 * T <= ws->xzt_rows && T <= ws->Ts && !ly.in_b &&
           ly.mamba && !ly.X && in_proj_batched(m, ws, T) && split_x(m, ws, T) && ws->xlo &&
           prefill_stack_in_on();
}

// SPEC 2 over a prefill of (B, L): xn (T, d) -> out (T, d); conv, ssm advanced in place.
// pair (prefill_pair_ok): out is (2, T, d) instead, out_proj's hi rows' and lo rows' products,
// which the next layer's routing kernel sums (x + x2) before the residual.
// stk (stack_in_fill_ok): in_proj as one GEMM of the hi and lo rows, summed by the conv.
// stage, stage_bytes: the next MoE layer's first fc1 bytes into L2 from the side branch,
// forked after the conv (prefill_l2side_ok).
int mamba_prefill(bm_cuda_model *m, Ws *ws, const LayerDev &ly, float *conv, float *ssm,
                  const float *xn, float *out, int64_t B, int64_t L, bool xbf_ready,
                  bool pair = false, bool stk = false, const void *stage = nullptr,
                  int64_t stage_bytes = 0) {
    const bm_cuda_config &c = m->cfg;
    const int64_t T = B * L, d = c.d, E = c.E, N = c.N;
    float *x = ws->xz, *z = ws->xz + T * E;
    cudaStream_t st = m->stream;
    const bool xdt = xdt_fill_ok(m, ws, ly, T);
    // fbf (fuse_bf_ok, decided once here): x_proj's reduction writes dt_proj's bf16 input, and
    // with a stacked in_proj (cfuse) the conv writes x_proj's
    const bool fbf = !xdt && fuse_bf_ok(m, ws, ly, T), cfuse = stk && fbf;
    if (stk) {  // stack_in_fill_ok: the norm wrote the lo rows at xbf + T d
        if (!xbf_ready) return BM_CUDA_ARG_FAIL("engine: stacked in_proj without the norm's rows");
        TRY(in_proj_xzt(m, ws, ly, 2 * T));                                  // (2T, 2E)
        g_stack_in_fill.fetch_add(1, std::memory_order_relaxed);
        TRY(mark(m, P_IN));
        // x_proj's split input too (fuse_bf_ok), its lo rows where x_proj reads them
        const int ks = xproj_ks(m, ws, T, c.R + 2 * N, E);
        uint16_t *cbf = cfuse ? ws->xbf : nullptr;
        uint16_t *clo = cfuse ? (xproj_stack_ok(m, ws, T, ks) ? ws->xbf + T * E : ws->xlo)
                              : nullptr;
        TRY(bm_cuda_conv_forward_sum(ws->xzt, ws->xzt + E, 2 * E, T * 2 * E, z, ly.conv_w,
                                     ly.conv_b, conv, conv, ws->xc, cbf, clo, 1, B, L, E, c.K,
                                     st));
        if (cfuse) g_fuse_bf[0].fetch_add(1, std::memory_order_relaxed);
    } else {
        TRY(in_proj(m, ws, ly, xn, T, xbf_ready));                          // x, z
        TRY(mark(m, P_IN));
        TRY(bm_cuda_conv_forward(x, ly.conv_w, ly.conv_b, conv, conv, ws->xc, 1, B, L, E, c.K,
                                 st));
    }
    TRY(mark(m, P_CONV));
    TRY(l2side_fork(m, stage, stage_bytes, nullptr, 0));
    if (xdt) {  // xdt_fill_ok: xdt.cu's fp32 kernels, B and C split out of dbc
        TRY(bm_xdt_xproj(ws->xc, ly.x_wf, ws->dbc, T, c.R + 2 * N, E, st));
        split_bc_kernel<<<grid_for(T * N), 256, 0, st>>>(ws->dbc, ws->Bm, ws->Cm, T, (int)c.R,
                                                         (int)N);
        BM_CUDA_LAUNCHED();
        TRY(mark(m, P_XPROJ));
        TRY(bm_xdt_dtproj(ws->dbc, c.R + 2 * N, ly.dt_wf, ws->delta, T, E, c.R, st));
        g_xdt_fill.fetch_add(1, std::memory_order_relaxed);
    } else {
        TRY(x_proj(m, ws, ly, T, ws->Bm, ws->Cm, cfuse, fbf));              // (T, R + 2N)
        TRY(mark(m, P_XPROJ));
        if (fbf) g_fuse_bf[1].fetch_add(1, std::memory_order_relaxed);
        TRY(dt_proj(m, ws, ly, T, fbf));  // bias in scan; fbf: x_proj's reduction wrote its bf16 rows
    }
    TRY(mark(m, P_DT));
    // Sequence-parallel where the grid is small (b = 1, 2 at the 2.8B shape; cuda/scan.cu).
    // Where out_proj is a bf16 GEMM (linear()'s rule), the scan writes its input directly:
    // bf16(y) (+ the low parts when the product splits) into xbf / xlo, no fp32 y.
    const bool ybf = bf16_math(m) && T > ws->gv && mp_on();
    const bool ysplit = ybf && split_x(m, ws, T);
    if (ysplit && (!ws->xlo || T > ws->Ts))
        return BM_CUDA_ARG_FAIL("engine: split-activation scratch missing or too small");
    const bool one = pair && prefill_out_one_on();  // out_proj's pair as one GEMM
    uint16_t *ylo = ysplit ? prefill_ylo(ws, T, E, one) : nullptr;
    TRY(bm_cuda_scan_forward_ws(ws->xc, ws->delta, ly.A, ws->Bm, ws->Cm, ly.D, z, ly.dt_b, 1,
                                ssm, ssm, ybf ? nullptr : ws->y, ybf ? ws->xbf : nullptr, ylo,
                                B, L, E, N, 0, -1, 0, ws->scan_ws, ws->scan_ws_bytes, st));
    TRY(mark(m, P_SCAN));
    if (pair) {
        if (!ysplit) return BM_CUDA_ARG_FAIL("engine: out_proj pair without split rows");
        TRY(out_pair_prefill(m, ws, ly, out, T, one));
    } else {
        TRY(linear(m, ws, ws->y, E, ly.out_w, ly.out_b, out, d, T, d, E, ybf));
    }
    return mark(m, P_OUT);
}

// BLACKMAMBA_OUT_KSPLIT: in the batched decode, a Mamba layer followed by a MoE layer whose
// norm + routing is norm_route_kernel runs out_proj as two products over the halves of E (a
// strided-batched GEMM into ws->hk, no split-K reduction kernel) and the routing kernel sums
// the two halves (x + x2) before the residual ("1", the default), or as one product ("0":
// cuBLAS's split-K kernel and its reduction kernel). Read at graph capture. Measured on the
// H200 (2.8B shape, same process, 3 rounds, cuda/NOTES.md session 9): B = 64 2.353 -> 2.320
// ms a step, B = 32 2.123 -> 2.096, B = 16 1.930 -> 1.913; logits bit-identical (the same
// partial products, summed in the same order).
constexpr bool OUT_KSPLIT_DEFAULT = true;
bool out_ksplit_on() { return bm_env_switch("BLACKMAMBA_OUT_KSPLIT", OUT_KSPLIT_DEFAULT); }
std::atomic<long long> g_out_ksplit{0};  // out_proj products as two K halves (tests)

// ---- Split products of the batched decode as one GEMM of 2B rows (BLACKMAMBA_DECODE_STACK) --
// A split product (bf16 hi + lo activations: decode batches of up to GEMV_ROWS rows under BF16
// math, every batch under BF16X2) ran as two GEMMs on the same weights, hi, then lo
// accumulating (beta = 1): the weights read twice, and at these sizes cuBLAS's split-K kernels
// with their reduction kernels. Where the lo rows lie right after the hi rows, both are one
// GEMM of 2B rows (the weights read once) and the consumer adds each row's two products in
// fp32, as the beta = 1 pass did: in_proj's in the conv step (bm_cuda_conv_step_sum), out_proj's
// in the next layer's routing kernel, which sums out_pair's two halves anyway. Unset / "1": on;
// "0": the two GEMMs (A/B, tests). Read at graph capture. Measured: cuda/NOTES.md session 18.
std::atomic<long long> g_stack{0};  // stacked split products (tests)
bool stack_on() { return bm_env_switch("BLACKMAMBA_DECODE_STACK", true); }
// BLACKMAMBA_DECODE_STACK_HEAD=0: the split decode's LM head as linear()'s two GEMMs instead of
// head_stacked's one (A/B, tests; session 19). Read at graph capture.
bool stack_head_on() { return bm_env_switch("BLACKMAMBA_DECODE_STACK_HEAD", true); }
// in_proj: the Mamba norm writes the lo rows at xbf + B d (ws_layout: room for 2T rows of d),
// the GEMM writes (2B, 2E) into xzt.
bool stack_in_ok(const bm_cuda_model *m, const Ws *ws, const LayerDev &ly, int64_t B) {
    return ws->decode && B == ws->T && ws->Ts == B && ws->xzt && ws->xzt_rows >= 2 * B &&
           !ly.in_b && B <= 65535 && in_proj_batched(m, ws, B) && split_x(m, ws, B) &&
           stack_on();
}
// out_proj: the scan writes the lo rows at xlo, which must be xbf + B E (ws_layout, where E is
// the widest row); the GEMM writes out_pair's (2, B, d).
bool stack_out_ok(const bm_cuda_model *m, const Ws *ws, int64_t B) {
    return ws->decode && B == ws->T && ws->xlo && ws->xlo == ws->xbf + B * m->cfg.E &&
           split_x(m, ws, B) && stack_on();
}

// out_proj of the batched decode as two K halves: out[h] (B, d) = y_bf16[:, h E/2 : (h+1) E/2]
// @ out_w[:, h E/2 : (h+1) E/2]^T, h = 0, 1, out (2, B, d) (bf16 operands from ws->xbf, fp32
// products and outputs). The caller checked out_pair_ok (E % 16: 16-byte aligned bf16 halves).
// Split products (stack_out_ok): the halves are the hi rows' and the lo rows' products over the
// whole of K instead, one GEMM of 2B rows (the routing kernel sums them alike).
bool out_pair_ok(const bm_cuda_model *m, const Ws *ws, const LayerDev &ly, int64_t B) {
    return bf16_math(m) && B > ws->gv && mp_on() &&
           (!split_x(m, ws, B) || stack_out_ok(m, ws, B)) && ws->hk && !ly.out_b &&
           m->cfg.E % 16 == 0;
}
int out_pair(bm_cuda_model *m, Ws *ws, const LayerDev &ly, float *out, int64_t B) {
    const int64_t d = m->cfg.d, E = m->cfg.E, K2 = E / 2;
    const float one = 1.f, zero = 0.f;
    if (split_x(m, ws, B)) {  // stack_out_ok: out[0] = hi rows' products, out[1] = lo rows'
        BM_CUBLAS_TRY(cublasGemmEx(m->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)d, (int)(2 * B),
                                   (int)E, &one, ly.out_w, CUDA_R_16BF, (int)E, ws->xbf,
                                   CUDA_R_16BF, (int)E, &zero, out, CUDA_R_32F, (int)d,
                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        g_stack.fetch_add(1, std::memory_order_relaxed);
        return 0;
    }
    BM_CUBLAS_TRY(cublasGemmStridedBatchedEx(
        m->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)d, (int)B, (int)K2, &one, ly.out_w, CUDA_R_16BF,
        (int)E, (long long)K2, ws->xbf, CUDA_R_16BF, (int)E, (long long)K2, &zero, out,
        CUDA_R_32F, (int)d, (long long)(B * d), 2, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    g_out_ksplit.fetch_add(1, std::memory_order_relaxed);
    return 0;
}

// ---- A short prefill's split out_proj as one launch (BLACKMAMBA_PREFILL_STACK_OUT) ----------
// Under BF16 math a prefill of at most BM_CUDA_BF16_SPLIT_ROWS tokens splits out_proj's input
// into hi + lo bf16 rows (split_x), and linear() ran two GEMMs on the same 8.7 MB of weights,
// hi, then lo accumulating (beta = 1), each as cuBLAS's split-K kernel and its reduction: four
// launches, ~16 us a layer at 32 tokens on the H200 (session 20's trace). Where the next layer
// routes through a norm_route kernel (which sums a second part of x anyway: the batched
// decode's out_pair), out_proj is one strided-batched GEMM of the two row blocks into
// ws->hk (2, T, d), and that kernel adds each row's two products in fp32, as the beta = 1
// pass did. Unset / "1": on; "0": linear()'s two GEMMs (A/B, tests). Read per call.
bool prefill_stack_out_on() { return bm_env_switch("BLACKMAMBA_PREFILL_STACK_OUT", true); }
std::atomic<long long> g_out_pair_fill{0};  // prefill out_proj launches of that form (tests)
bool prefill_pair_ok(const bm_cuda_model *m, const Ws *ws, const LayerDev &ly, int64_t T) {
    return !ws->decode && ws->hk && T <= ws->hk_rows && bf16_math(m) && T > ws->gv &&
           mp_on() && split_x(m, ws, T) && ws->xlo && !ly.out_b && prefill_stack_out_on() &&
           (((uintptr_t)ws->hk) & 15) == 0;
}
// Session 23: the scan writes the lo rows right after the hi rows (xbf + T E, room that the
// stacked x_proj already uses), and out_proj is one GEMM of 2T rows into the same (2, T, d),
// instead of a strided batch of two. Unset / "1": on; "0": the batch (A/B, tests). Read per
// call.
bool prefill_out_one_on() { return bm_env_switch("BLACKMAMBA_PREFILL_OUT_ONE", true); }
std::atomic<long long> g_out_one_fill{0};  // of those, one GEMM of 2T rows (tests)
// stacked: the scan wrote the low parts after the hi rows (prefill_ylo), and out_proj is one
// GEMM (else the batch's second block, at xlo)
int out_pair_prefill(bm_cuda_model *m, Ws *ws, const LayerDev &ly, float *out, int64_t T,
                     bool stacked) {
    const int64_t d = m->cfg.d, E = m->cfg.E;
    const uint16_t *lo = prefill_ylo(ws, T, E, stacked);
    const float one = 1.f, zero = 0.f;
    if (stacked) {  // rows 0..T-1 hi, T..2T-1 lo: out (2T, d)
        BM_CUBLAS_TRY(cublasGemmEx(m->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)d, (int)(2 * T),
                                   (int)E, &one, ly.out_w, CUDA_R_16BF, (int)E, ws->xbf,
                                   CUDA_R_16BF, (int)E, &zero, out, CUDA_R_32F, (int)d,
                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        g_out_one_fill.fetch_add(1, std::memory_order_relaxed);
    } else {  // out[0] = hi rows (xbf) @ out_w^T, out[1] = lo rows @ out_w^T
        BM_CUBLAS_TRY(cublasGemmStridedBatchedEx(
            m->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)d, (int)T, (int)E, &one, ly.out_w,
            CUDA_R_16BF, (int)E, 0LL, ws->xbf, CUDA_R_16BF, (int)E, (long long)(lo - ws->xbf),
            &zero, out, CUDA_R_32F, (int)d, (long long)(T * d), 2, CUBLAS_COMPUTE_32F,
            CUBLAS_GEMM_DEFAULT));
    }
    g_out_pair_fill.fetch_add(1, std::memory_order_relaxed);
    return 0;
}

// ---- The device's persisting-L2 set-aside (BLACKMAMBA_L2_SET_ASIDE), set at model creation ---
// The H200s we measure on report cudaLimitPersistingL2CacheSize = 11.25 MB before anything
// sets it, and L2 set aside for persisting lines is taken from the normal lines even while no
// persisting access uses it (session 12: 24 MB and up hurt batch 1 and the prefill). Set to 0,
// the decode staging's evict_last lines (l2_side_kernel below) are ordinary lines like the
// rest. Measured (H200, 2.8B shape, one process, the same graphs timed under each limit in
// turn: cuda/dev/ab_l2limit.py, cuda/NOTES.md session 18): 0 against 11.25 MB, B = 64 -0.65%,
// B = 32 -0.55%, B = 16 -0.1 to -1.9%, B = 8 +0.45%, B = 1 and the prefill even; 4 MB (the
// device rounds it up to 7.5) half of that. The limit belongs to the device context, which
// every library in the process shares, so it is set once per model creation, not per call.
// BLACKMAMBA_L2_SET_ASIDE=<MB> sets another size (clamped to the device's maximum), "keep"
// leaves the device's value; anything else means the default, 0. A device without persisting
// L2 (or that refuses the limit) is left as it is: the limit is a hint, never an error.
void l2_set_aside_apply() {
    const char *e = getenv("BLACKMAMBA_L2_SET_ASIDE");
    if (e && !strcmp(e, "keep")) return;
    const long mb = std::min<long>(bm_env_long("BLACKMAMBA_L2_SET_ASIDE", 0, LONG_MAX, 0), 1024);
    int dev = 0, maxp = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&maxp, cudaDevAttrMaxPersistingL2CacheSize, dev) != cudaSuccess ||
        maxp <= 0 ||
        cudaDeviceSetLimit(cudaLimitPersistingL2CacheSize,
                           std::min((size_t)mb << 20, (size_t)maxp)) != cudaSuccess)
        cudaGetLastError();  // not settable here: leave it (see above)
}

// ---- L2 staging from a side branch of the batched decode graph (BLACKMAMBA_L2SIDE) --------
// The batched decode's Mamba half is latency-bound (B = 64 on the H200: ~41 us a layer for
// ~12 us of bytes), so HBM idles there, while the MoE layer after it streams 274 MB of
// expert weights. A 16-block kernel on a parallel branch of the graph, forked from the main
// chain after the conv step, brings the first MB of the next MoE layer's fc1 into L2
// (cp.async.bulk.prefetch.L2, evict_last, so that the lines outlive the scan's state traffic
// until fc1 reads them). Nothing on the chain waits for it: the four earlier L2 experiments
// (NOTES) issued their prefetches from a kernel of the chain, which then completed only once
// its bytes had arrived. The branch joins the chain before the step's final norm.
// Measured (H200, 2.8B shape, same process; cuda/NOTES.md session 10): 16 MB B = 64 2.320 ->
// 2.279 ms, B = 32 -2.1%, B = 16 -2.4%, B = 8 -0.9%; 24 / 32 / 48 MB, no evict_last, or
// forks at other points were slower, and at batch 1 (expert unknown until the routing) the
// same branch staging the next in_proj or out_proj was slower. Logits are bit-identical (a
// hint changes no value). BLACKMAMBA_L2SIDE=<MB> (0: off), read at graph capture.
// Session 13: 32 MB, now that the expert GEMMs load their weights as evict_first lines
// (grouped.cu GroupedArgs::wpol), so that the staged lines are demoted once read and the
// streamed ones do not stay: against 16 MB without the hint, B = 16 -0.7 to -1.8%, B = 32
// -0.6 to -1.1%, B = 64 even (either change alone: at most half of that).
// Session 19: by default none up to L2SIDE_MIN_ROWS rows, where the branch's forks cost more
// than its bytes save (same process, 2.8B shape, H200, split products: off against 32 MB
// B = 2 -1.9%, B = 4 -1.4%, B = 8 +0.3%, B = 16 +1.5%; cuda/NOTES.md session 19). An explicit
// BLACKMAMBA_L2SIDE=<MB> applies at every batched size (A/B).
constexpr int L2SIDE_MB_DEFAULT = 32;
constexpr int64_t L2SIDE_MIN_ROWS = 5;
constexpr int L2SIDE_BLOCKS = 16;
int64_t l2side_bytes(int64_t rows) {
    const long v = bm_env_long("BLACKMAMBA_L2SIDE", 0, LONG_MAX, -1);
    if (v < 0)  // unset, or not a count: the default
        return rows >= L2SIDE_MIN_ROWS ? (int64_t)L2SIDE_MB_DEFAULT << 20 : 0;
    return (int64_t)std::min<long>(v, 1024) << 20;
}
std::atomic<long long> g_l2side{0};  // staging launches (tests)

// bytes at p into L2 as evict_last lines, each block its 1/grid share, one <= 32 KB bulk
// prefetch a lane at a time. The kernel completes once its prefetches have.
__global__ void __launch_bounds__(32) l2_side_kernel(const char *p0, int64_t bytes0,
                                                      const char *p, int64_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    uint64_t pol;
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(pol));
    for (int r = 0; r < 2; r++) {  // range 0 (p0: the SSM state, or empty) first
        const char *q = r ? p : p0;
        const int64_t nb = r ? bytes : bytes0;
        const int64_t share = ((nb + gridDim.x - 1) / gridDim.x + 15) & ~(int64_t)15;
        const int64_t b0 = (int64_t)blockIdx.x * share, b1 = min(nb, b0 + share);
        for (int64_t o = b0 + (int64_t)threadIdx.x * 32768; o < b1; o += 32 * 32768) {
            const unsigned n = (unsigned)min((int64_t)32768, b1 - o);
            asm volatile("cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;"
                         ::"l"(q + o), "r"(n), "l"(pol) : "memory");
        }
    }
#endif
}
// Fork the side branch off m->stream here and stage bytes0 at p0, then bytes at p (each
// 16-byte aligned) into L2.
int l2side_fork(bm_cuda_model *m, const void *p, int64_t bytes, const void *p0,
                int64_t bytes0) {
    bytes &= ~(int64_t)15;
    bytes0 &= ~(int64_t)15;
    if (!p || bytes < 0) bytes = 0;
    if (!p0 || bytes0 < 0) bytes0 = 0;
    if (bytes <= 0 && bytes0 <= 0) return 0;
    if ((((uintptr_t)p | (uintptr_t)p0) & 15) != 0)
        return BM_CUDA_ARG_FAIL("engine: L2 staging needs 16-byte alignment");
    BM_CUDA_TRY(cudaEventRecord(m->side_fork, m->stream));
    BM_CUDA_TRY(cudaStreamWaitEvent(m->side, m->side_fork, 0));
    l2_side_kernel<<<L2SIDE_BLOCKS, 32, 0, m->side>>>((const char *)p0, bytes0,
                                                       (const char *)p, bytes);
    BM_CUDA_LAUNCHED();
    m->side_open = true;
    g_l2side.fetch_add(1, std::memory_order_relaxed);
    return 0;
}
// The side branch back into m->stream (a capture must end with every fork joined).
int l2side_join(bm_cuda_model *m) {
    if (!m->side_open) return 0;
    BM_CUDA_TRY(cudaEventRecord(m->side_join, m->side));
    BM_CUDA_TRY(cudaStreamWaitEvent(m->stream, m->side_join, 0));
    m->side_open = false;
    return 0;
}

// The same staging in a prefill of up to BLACKMAMBA_PREFILL_L2SIDE tokens (session 23; from
// l2side_bytes' L2SIDE_MIN_ROWS unless BLACKMAMBA_L2SIDE names a size): forked
// after each Mamba layer's conv, as in the batched decode (mamba_prefill). A short prompt's
// MoE layer streams every expert's weights through the grouped decode tiles while its Mamba
// half leaves HBM mostly idle. H200, 2.8B shape, batch 1, same process, 5 rounds (cuda/NOTES.md
// session 23): 8 / 16 / 32 / 64 / 128 / 256 / 512 tokens -1.2 / -0.3 / -0.5 / -1.6 / -1.2 /
// -1.3 / -0.8%, 1024 even (+0.2%, the TMA core); logits bit-identical (a hint). Read per
// call; "0": off.
constexpr long PREFILL_L2SIDE_DEFAULT = 512;
bool prefill_l2side_ok(int64_t T) {
    return T >= 2 && T <= bm_env_long("BLACKMAMBA_PREFILL_L2SIDE", 0, LONG_MAX,
                                      PREFILL_L2SIDE_DEFAULT);
}

// in_proj as one GEMM of 2E outputs on `rows` bf16 rows of ws->xbf into ws->xzt (rows, 2E):
// x and z of a row side by side (mamba_step's batched forms).
int in_proj_xzt(bm_cuda_model *m, Ws *ws, const LayerDev &ly, int64_t rows) {
    const int64_t d = m->cfg.d, E = m->cfg.E;
    const float one = 1.f, zero = 0.f;
    BM_CUBLAS_TRY(cublasGemmEx(m->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)(2 * E), (int)rows,
                               (int)d, &one, ly.in_w, CUDA_R_16BF, (int)d, ws->xbf,
                               CUDA_R_16BF, (int)d, &zero, ws->xzt, CUDA_R_32F, (int)(2 * E),
                               CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return 0;
}

// The same for one token per row: xn (B, d) -> out (B, d).
// xbf_ready: the norm wrote bf16(xn) into ws->xbf (ws->xlo) for in_proj (in_proj_batched()).
// nin: the layer's input norm still to do (forward(): batch 1), carried by in_proj's GEMV
// where that is one (it writes xn = ws->xn), else run first.
// pair (out_pair_ok): out_proj as two K halves into out (2, B, d) (the routing sums them).
// stage, stage_bytes: weights of a later kernel to bring into L2 from a side branch forked
// after the conv step (l2side_fork).
int mamba_step(bm_cuda_model *m, Ws *ws, const LayerDev &ly, float *conv, float *ssm,
               const float *xn, float *out, int64_t B, bool xbf_ready,
               const NormIn *nin = nullptr, bool pair = false, const void *stage = nullptr,
               int64_t stage_bytes = 0, bool fc2_normed = false, bool stacked_in = false) {
    const bm_cuda_config &c = m->cfg;
    const int64_t d = c.d, E = c.E, N = c.N, R = c.R;
    float *x = ws->xz, *z = ws->xz + B * E;
    cudaStream_t st = m->stream;
    // Where in_proj runs as a GEMV (linear()'s rule), the conv step rides on its epilogue:
    // one launch fewer per Mamba layer (GemvParams::conv_w).
    const bool bf = c.wdtype != BM_F32;  // 16-bit weights, as in linear()
    const bool conv_fused = B <= ws->gv || (bf && !bf16_math(m) && B <= GEMV_ROWS_EXACT);
    if (nin && (!conv_fused || B != 1 || xn != ws->xn)) {
        TRY(bm_rms_norm_static_w(nin->h, nin->r, nin->w, EPS, ws->xn, nin->r_out, nullptr,
                                 nullptr, B, d, st));
        TRY(mark(m, P_NORM));
        nin = nullptr;
    }
    if (conv_fused) {
        GemvParams p{ly.in_w, xn, d, nullptr, nullptr, ly.in_b, B == 1 ? ws->xz : x,
                     B == 1 ? 2 * E : E, (int)B, (int)(B == 1 ? 2 * E : E), (int)d,
                     ly.conv_w, ly.conv_b, conv, ws->xc, (int)E, (int)c.K};
        p.w_static = 1;  // weights, and the conv state only this launch writes (gemv1_kernel)
        if (nin) {
            p.norm_h = nin->h;
            p.norm_r = nin->r;
            p.norm_w = nin->w;
            p.norm_r_out = nin->r_out;
            p.norm_x_out = ws->xn;
            p.norm_eps = EPS;
        }
        TRY(bm_gemv_launch(p, c.wdtype, 1, 0, st));
        if (B > 1)
            TRY(linear(m, ws, xn, d, wrows(m, ly.in_w, E, d), ly.in_b ? ly.in_b + E : nullptr,
                       z, E, B, E, d, true));
        TRY(mark(m, P_IN));
    } else if (stacked_in) {
        // a split in_proj (stack_in_ok): the norm (or, fc2_normed, a split fc2's epilogue,
        // without the row scale) wrote the bf16 hi rows at xbf and the lo rows right after
        // them (xbf + B d): one GEMM of 2B rows and 2E outputs into xzt (2B, 2E), and the conv
        // step adds each row's hi and lo products (then applies the row scale)
        TRY(in_proj_xzt(m, ws, ly, 2 * B));
        g_stack.fetch_add(1, std::memory_order_relaxed);
        TRY(mark(m, P_IN));
        if (fc2_normed)
            TRY(bm_cuda_conv_step_sum_norm(ws->xzt, ws->xzt + E, 2 * E, B * 2 * E, z, conv,
                                           ly.conv_w, ly.conv_b, ws->xc, 1, B, E, c.K, ws->ssp,
                                           bm_cuda_moe_norm_parts(d), d, EPS, st));
        else
            TRY(bm_cuda_conv_step_sum(ws->xzt, ws->xzt + E, 2 * E, B * 2 * E, z, conv,
                                      ly.conv_w, ly.conv_b, ws->xc, 1, B, E, c.K, st));
    } else if (fc2_normed) {
        // in_proj of bf16(r * w) as fc2's epilogue left it (forward()), as one GEMM of 2E
        // rows into (B, 2E) (x and z of a row side by side); the conv step reads both there,
        // applies the row scale and writes z apart. One GEMM rather than cuBLAS's batch of
        // two: its kernel 7.55 against 7.91 us at B = 64, the step -0.1 / -0.4 / -0.6% at
        // B = 64 / 32 / 16, bit-identical (cuda/NOTES.md session 14).
        TRY(in_proj_xzt(m, ws, ly, B));
        TRY(mark(m, P_IN));
        TRY(bm_cuda_conv_step_norm(ws->xzt, ws->xzt + E, 2 * E, z, conv, ly.conv_w, ly.conv_b,
                                   ws->xc, 1, B, E, c.K, ws->ssp, bm_cuda_moe_norm_parts(d), d,
                                   EPS, st));
    } else {
        TRY(in_proj(m, ws, ly, xn, B, xbf_ready));
        TRY(mark(m, P_IN));
        TRY(bm_cuda_conv_step(x, conv, ly.conv_w, ly.conv_b, ws->xc, 1, B, E, c.K, st));
    }
    TRY(mark(m, P_CONV));
    // Float32 dt_proj weights (the copy under bf16 math, dt_w itself for fp32 weights): the
    // FDT scan's and the xdt kernels'; x_proj's likewise.
    const float *dtw = ly.dt_wf ? ly.dt_wf : c.wdtype == BM_F32 ? (const float *)ly.dt_w
                                                                : nullptr;
    const float *xw32 = ly.x_wf ? ly.x_wf : c.wdtype == BM_F32 ? (const float *)ly.x_w
                                                                : nullptr;
    // The batched decode's x_proj and dt_proj as xdt.cu's PDL kernels (BLACKMAMBA_XDT_DEC).
    const bool xdt = B > ws->gv && xdt_dec_on() && xw32 && dtw &&
                     bm_xdt_ok(B, E, R, N, ws->xc, xw32, ws->dbc, dtw, ws->delta);
    const int64_t BE = B * E;
    const bool fused = B <= ws->gv;  // else dt_proj as a product of B rows first
    // Lanes per (b, e): a warp for the fused dt_proj dot (R terms), else ~4 states per lane.
    int glog = 5;
    if (!fused) {
        glog = 0;
        while (glog < 5 && 4 << glog < N) glog++;
    }
    const unsigned blocks = (unsigned)bm_cdiv(BE << glog, 256);
    const float *dl = ws->delta;
    // Batched decode (delta from the dt_proj GEMM): the float4 step, which also writes
    // out_proj's bf16 input where out_proj is a bf16 GEMM (linear()'s rule): no to_bf16 pass.
    const int nl4 = (int)(N / 4);
    const bool v4 = !fused && scan4_on() && N % 4 == 0 && R % 4 == 0 && (nl4 & (nl4 - 1)) == 0 &&
                    nl4 <= 32 && BE * nl4 < INT32_MAX && B <= 65535 &&  // grid y: rows
                    (((uintptr_t)ssm | (uintptr_t)ws->dbc | (uintptr_t)ly.A) & 15) == 0;
    // ... and delta too (FDT), from float32 dt_proj weights (dtw above)
    const bool fdt = v4 && scan4_dt_on(B) && dtw && ((uintptr_t)dtw & 15) == 0;
    // The side branch (l2side_fork: the next MoE layer's first fc1 bytes) stages first this
    // layer's SSM state, which the scan reads three kernels later (l2side_state_on), where
    // the float4 scan step runs with evict_first state loads and stores (scan_evict_mode),
    // so that the staged lines are demoted once read and do not pile up in L2 across layers.
    const int64_t state_bytes = B * E * N * (int64_t)sizeof(float);
    const int ev = scan_evict_mode();
    const bool stage_state = v4 && !fdt && B > ws->gv && ev == 3 &&
                             l2side_bytes(B) && l2side_state_on(state_bytes);
    if (stage_state) g_l2side_state.fetch_add(1, std::memory_order_relaxed);
    TRY(l2side_fork(m, stage, stage_bytes, ssm, stage_state ? state_bytes : 0));
    if (xdt)
        TRY(bm_xdt_xproj(ws->xc, xw32, ws->dbc, B, R + 2 * N, E, st));
    else TRY(x_proj(m, ws, ly, B, nullptr, nullptr));
    TRY(mark(m, P_XPROJ));
    if (!fused && !fdt) {
        if (xdt)
            TRY(bm_xdt_dtproj(ws->dbc, R + 2 * N, dtw, ws->delta, B, E, R, st));
        else TRY(dt_proj(m, ws, ly, B));
        TRY(mark(m, P_DT));
    }
    if (v4) {
        const bool ybf = bf16_math(m) && B > ws->gv && mp_on();
        const bool ysplit = ybf && split_x(m, ws, B);
        if (ysplit && (!ws->xlo || B > ws->Ts))
            return BM_CUDA_ARG_FAIL("engine: split-activation scratch missing or too small");
        int g4 = 0;
        while ((1 << g4) < nl4) g4++;
        const int rb = scan4_rows();
        const dim3 b4((unsigned)bm_cdiv(E << g4, 256), (unsigned)bm_cdiv(B, rb));
        g_scan4.fetch_add(1, std::memory_order_relaxed);
        if (rb > 1) g_scan4_rows.fetch_add(1, std::memory_order_relaxed);
        if (fdt) g_scan4_dt.fetch_add(1, std::memory_order_relaxed);
        int early = 0;
        const int max_it = scan4_early_max_it();
        if (!fdt && rb == 1 && max_it > 0)
            TRY(scan4_early_launch((B * E) << g4, max_it, st, &early, ssm, (const float *)ws->xc,
                                   (const float *)z, (const float *)ws->dbc, dl, ly.dt_b, ly.A,
                                   ly.D, ybf ? nullptr : ws->y, ybf ? ws->xbf : nullptr,
                                   ysplit ? ws->xlo : nullptr, BE, (int)E, (int)N, (int)R, g4,
                                   ev));
        if (!early) {
            auto *k4 = fdt ? (rb == 4   ? step_scan4_kernel<4, true>
                              : rb == 2 ? step_scan4_kernel<2, true>
                                        : step_scan4_kernel<1, true>)
                           : (rb == 4   ? step_scan4_kernel<4>
                              : rb == 2 ? step_scan4_kernel<2>
                                        : step_scan4_kernel<1>);
            BM_LAUNCH_PDL(k4, b4, dim3(256), 0, st, ssm, ws->xc, z, ws->dbc, dl,
                          ly.dt_b, ly.A, ly.D, ybf ? nullptr : ws->y, ybf ? ws->xbf : nullptr,
                          ysplit ? ws->xlo : nullptr, (int)B, (int)E, (int)N, (int)R, g4,
                          fdt ? dtw : nullptr, ev);
        }
        TRY(mark(m, P_SCAN));
        if (pair && ybf) {  // (split: out_pair_ok checked stack_out_ok)
            TRY(out_pair(m, ws, ly, out, B));
            return mark(m, P_OUT);
        }
        TRY(linear(m, ws, ws->y, E, ly.out_w, ly.out_b, out, d, B, d, E, ybf));
        if (pair)  // the whole product in the first half: the second is zero
            BM_CUDA_TRY(cudaMemsetAsync(out + B * d, 0, (size_t)(B * d) * sizeof(float), st));
        return mark(m, P_OUT);
    }
    if (pair)  // the scalar step paths below write out (B, d): the second half zero
        BM_CUDA_TRY(cudaMemsetAsync(out + B * d, 0, (size_t)(B * d) * sizeof(float), st));
    const bool early = fused && b1_early(B);
    if (early) bm_pdl_early_count(BM_EARLY_SCAN);
    if (c.wdtype == BM_BF16) {
        const uint16_t *dw = (const uint16_t *)ly.dt_w;
        if (early)
            BM_LAUNCH_PDL((step_scan_kernel<uint16_t, true, true>), dim3(blocks), dim3(256), 0, st,
                ssm, ws->xc, z, ws->dbc, dw, dl, ly.dt_b, ly.A, ly.D, ws->y, BE, (int)E, (int)N,
                (int)R, glog);
        else if (fused)
            BM_LAUNCH_PDL((step_scan_kernel<uint16_t, true>), dim3(blocks), dim3(256), 0, st,
                ssm, ws->xc, z, ws->dbc, dw, dl, ly.dt_b, ly.A, ly.D, ws->y, BE, (int)E, (int)N,
                (int)R, glog);
        else
            BM_LAUNCH_PDL((step_scan_kernel<uint16_t, false>), dim3(blocks), dim3(256), 0, st,
                ssm, ws->xc, z, ws->dbc, dw, dl, ly.dt_b, ly.A, ly.D, ws->y, BE, (int)E, (int)N,
                (int)R, glog);
    } else if (c.wdtype == BM_F16) {
        const __half *dw = (const __half *)ly.dt_w;
        if (early)
            BM_LAUNCH_PDL((step_scan_kernel<__half, true, true>), dim3(blocks), dim3(256), 0, st,
                ssm, ws->xc, z, ws->dbc, dw, dl, ly.dt_b, ly.A, ly.D, ws->y, BE, (int)E, (int)N,
                (int)R, glog);
        else if (fused)
            BM_LAUNCH_PDL((step_scan_kernel<__half, true>), dim3(blocks), dim3(256), 0, st,
                ssm, ws->xc, z, ws->dbc, dw, dl, ly.dt_b, ly.A, ly.D, ws->y, BE, (int)E, (int)N,
                (int)R, glog);
        else
            BM_LAUNCH_PDL((step_scan_kernel<__half, false>), dim3(blocks), dim3(256), 0, st,
                ssm, ws->xc, z, ws->dbc, dw, dl, ly.dt_b, ly.A, ly.D, ws->y, BE, (int)E, (int)N,
                (int)R, glog);
    } else {
        const float *dw = (const float *)ly.dt_w;
        if (early)
            BM_LAUNCH_PDL((step_scan_kernel<float, true, true>), dim3(blocks), dim3(256), 0, st,
                ssm, ws->xc, z, ws->dbc, dw, dl, ly.dt_b, ly.A, ly.D, ws->y, BE, (int)E, (int)N,
                (int)R, glog);
        else if (fused)
            BM_LAUNCH_PDL((step_scan_kernel<float, true>), dim3(blocks), dim3(256), 0, st,
                ssm, ws->xc, z, ws->dbc, dw, dl, ly.dt_b, ly.A, ly.D, ws->y, BE, (int)E, (int)N,
                (int)R, glog);
        else
            BM_LAUNCH_PDL((step_scan_kernel<float, false>), dim3(blocks), dim3(256), 0, st,
                ssm, ws->xc, z, ws->dbc, dw, dl, ly.dt_b, ly.A, ly.D, ws->y, BE, (int)E, (int)N,
                (int)R, glog);
    }
    TRY(mark(m, P_SCAN));
    TRY(linear(m, ws, ws->y, E, ly.out_w, ly.out_b, out, d, B, d, E));
    return mark(m, P_OUT);
}

template <typename WT, int KS>
int expert_rows_ks(const void *W, const float *x, int64_t ldx, const int32_t *ids,
                   const float *scale, float *y, int64_t ldy, int64_t T, int64_t Nout,
                   int64_t Kin, bool early_ids, cudaStream_t st) {
    constexpr int VW = sizeof(WT) == 2 ? 8 : 4;
    const bool vec = Kin % VW == 0 && ldx % 4 == 0 && ((uintptr_t)W & 15) == 0 &&
                     ((uintptr_t)x & 15) == 0;
    dim3 grid((unsigned)bm_cdiv(Nout, 8 / KS), (unsigned)T);
    const bool b1 = b1_early(T);
    if (vec && early_ids && b1) {
        BM_LAUNCH_PDL((expert_rows_early_kernel<WT, KS>), grid, dim3(256), 0, st,
                      (const WT *)W, x, ldx, ids, scale, y, ldy, (int)Nout, (int)Kin);
        bm_pdl_early_count(BM_EARLY_ROWS);
    } else {
        auto *k = vec ? (b1 ? expert_rows_kernel<WT, KS, true, true> : expert_rows_kernel<WT, KS, true>)
                      : (b1 ? expert_rows_kernel<WT, KS, false, true> : expert_rows_kernel<WT, KS, false>);
        BM_LAUNCH_PDL(k, grid, dim3(256), 0, st, (const WT *)W, x, ldx, ids, scale, y, ldy,
                      (int)Nout, (int)Kin);
    }
    return 0;
}

// K-split as gemv.cu's rule: split while rows are few (Nout * KS < 4096) and slices long.
// early_ids: ids and scale were written two launches back and the launch in between triggers
// only after its wait (fc2 after fc1 or the act pass; expert_rows_early_kernel).
template <typename WT>
int expert_rows(const void *W, const float *x, int64_t ldx, const int32_t *ids,
                const float *scale, float *y, int64_t ldy, int64_t T, int64_t Nout,
                int64_t Kin, bool early_ids, cudaStream_t st) {
    const int64_t units = Kin / (sizeof(WT) == 2 ? 8 : 4);
    int ks = 1;
    while (ks < 8 && Nout * ks < 4096 && units >= 64 * ks) ks *= 2;
    switch (ks) {
        case 1: return expert_rows_ks<WT, 1>(W, x, ldx, ids, scale, y, ldy, T, Nout, Kin, early_ids, st);
        case 2: return expert_rows_ks<WT, 2>(W, x, ldx, ids, scale, y, ldy, T, Nout, Kin, early_ids, st);
        case 4: return expert_rows_ks<WT, 4>(W, x, ldx, ids, scale, y, ldy, T, Nout, Kin, early_ids, st);
        default: return expert_rows_ks<WT, 8>(W, x, ldx, ids, scale, y, ldy, T, Nout, Kin, early_ids, st);
    }
}

template <typename WT, int KS>
int expert_rows_gated_ks(const void *W, const float *x, int64_t ldx, const int32_t *ids,
                         float *h, int64_t ldh, int64_t T, int64_t F, int64_t Kin, int act,
                         cudaStream_t st) {
    constexpr int VW = sizeof(WT) == 2 ? 8 : 4;
    const bool vec = Kin % VW == 0 && ldx % 4 == 0 && ((uintptr_t)W & 15) == 0 &&
                     ((uintptr_t)x & 15) == 0;
    dim3 grid((unsigned)bm_cdiv(F, 8 / KS), (unsigned)T);
    const bool b1 = b1_early(T);
    auto *k = vec ? (b1 ? expert_rows_gated_kernel<WT, KS, true, true>
                        : expert_rows_gated_kernel<WT, KS, true>)
                  : (b1 ? expert_rows_gated_kernel<WT, KS, false, true>
                        : expert_rows_gated_kernel<WT, KS, false>);
    BM_LAUNCH_PDL(k, grid, dim3(256), 0, st, (const WT *)W, x, ldx, ids, h, ldh, (int)F,
                  (int)Kin, act);
    return 0;
}

// The same K-split rule over the F outputs (each warp streams two rows).
template <typename WT>
int expert_rows_gated(const void *W, const float *x, int64_t ldx, const int32_t *ids, float *h,
                      int64_t ldh, int64_t T, int64_t F, int64_t Kin, int act, cudaStream_t st) {
    const int64_t units = Kin / (sizeof(WT) == 2 ? 8 : 4);
    int ks = 1;
    while (ks < 8 && F * ks < 4096 && units >= 64 * ks) ks *= 2;
    switch (ks) {
        case 1: return expert_rows_gated_ks<WT, 1>(W, x, ldx, ids, h, ldh, T, F, Kin, act, st);
        case 2: return expert_rows_gated_ks<WT, 2>(W, x, ldx, ids, h, ldh, T, F, Kin, act, st);
        case 4: return expert_rows_gated_ks<WT, 4>(W, x, ldx, ids, h, ldh, T, F, Kin, act, st);
        default: return expert_rows_gated_ks<WT, 8>(W, x, ldx, ids, h, ldh, T, F, Kin, act, st);
    }
}

// Experts through the gathered GEMV: out[t] = gates[t] * fc2[e] @ act(fc1[e] @ x[t]),
// e = ids[t] (ids NULL: expert 0, gates NULL: 1). No host synchronisation.
int expert_gemv(bm_cuda_model *m, Ws *ws, const float *x, const int32_t *ids,
                const float *gates, const LayerDev &ly, float *out, int64_t T) {
    const bm_cuda_config &c = m->cfg;
    const int64_t d = c.d, F = c.F, G = m->G;
    cudaStream_t st = m->stream;
    // A few tokens (decode): per-token expert rows, exact fp32 accumulate like the GEMV.
    const bool rows = T <= GEMV_ROWS;
    auto rows_fn = c.wdtype == BM_BF16  ? expert_rows<uint16_t>
                   : c.wdtype == BM_F16 ? expert_rows<__half>
                                        : expert_rows<float>;
    if (rows && c.swiglu) {  // fc1 and the gated act in one kernel
        auto gated_fn = c.wdtype == BM_BF16  ? expert_rows_gated<uint16_t>
                        : c.wdtype == BM_F16 ? expert_rows_gated<__half>
                                             : expert_rows_gated<float>;
        TRY(gated_fn(ly.fc1, x, d, ids, ws->eh, G, T, F, d, (int)c.act, st));
        return rows_fn(ly.fc2, ws->eh, G, ids, gates, out, d, T, d, F, true, st);
    }
    if (rows) {
        TRY(rows_fn(ly.fc1, x, d, ids, nullptr, ws->eh, G, T, G, d, false, st));
    } else {
        GemvParams p1{ly.fc1, x, d, ids, nullptr, nullptr, ws->eh, G, (int)T, (int)G, (int)d};
        TRY(bm_gemv_launch(p1, c.wdtype, ly.X, 0, st));
    }
    BM_LAUNCH_PDL(b1_early(T) ? expert_act_kernel<true> : expert_act_kernel<false>,
                  dim3(grid_for(T * F)), dim3(256), 0, st, ws->eh, T, (int)F, (int)G, c.swiglu,
                  (int)c.act);
    if (rows) return rows_fn(ly.fc2, ws->eh, G, ids, gates, out, d, T, d, F, true, st);
    GemvParams p2{ly.fc2, ws->eh, G, ids, gates, nullptr, out, d, (int)T, (int)d, (int)F};
    return bm_gemv_launch(p2, c.wdtype, ly.X, 0, st);
}

// Decode at more than GEMV_ROWS rows with BF16 math: every token through every expert with
// two strided-batched bf16 GEMMs (each expert's weights read once, at tensor-core rates; the
// X-fold FLOPs are free at decode sizes), then each token keeps its own expert's rows. No
// host synchronisation, so it is captured into the decode graph.
int expert_all(bm_cuda_model *m, Ws *ws, const float *x, const int32_t *ids,
               const float *gates, const LayerDev &ly, float *out, int64_t T) {
    const bm_cuda_config &c = m->cfg;
    const int64_t d = c.d, F = c.F, G = m->G, X = ly.X;
    cudaStream_t st = m->stream;
    const float one = 1.f, zero = 0.f;
    const bool split = split_x(m, ws, T);  // BF16X2: a second pair of GEMMs on the low parts
    if (split && (!ws->xlo || !ws->alo || T > ws->Ts))
        return BM_CUDA_ARG_FAIL("engine: split-activation scratch missing or too small");
    TRY(to_bf16(m, x, d, ws->xbf, T, d, split ? ws->xlo : nullptr));
    // hall[x] (T, G) = xbf (T, d) @ fc1[x]^T for every x (column-major: hall^T = fc1 xbf^T)
    for (int part = 0; part <= (int)split; part++)
        BM_CUBLAS_TRY(cublasGemmStridedBatchedEx(
            m->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)G, (int)T, (int)d, &one, ly.fc1,
            CUDA_R_16BF, (int)d, G * d, part ? ws->xlo : ws->xbf, CUDA_R_16BF, (int)d, 0,
            part ? &one : &zero, ws->hall, CUDA_R_32F, (int)G, T * G, (int)X,
            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    select_act_kernel<<<grid_for(T * F), 256, 0, st>>>(ws->hall, ids, ws->abf,
                                                       split ? ws->alo : nullptr, T, (int)F,
                                                       (int)G, c.swiglu, (int)c.act);
    BM_CUDA_LAUNCHED();
    // oall[x] (T, d) = abf (T, F) @ fc2[x]^T
    for (int part = 0; part <= (int)split; part++)
        BM_CUBLAS_TRY(cublasGemmStridedBatchedEx(
            m->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)d, (int)T, (int)F, &one, ly.fc2,
            CUDA_R_16BF, (int)F, d * F, part ? ws->alo : ws->abf, CUDA_R_16BF, (int)F, 0,
            part ? &one : &zero, ws->oall, CUDA_R_32F, (int)d, T * d, (int)X,
            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    select_out_kernel<<<grid_for(T * d), 256, 0, st>>>(ws->oall, ids, gates, out, T, (int)d);
    BM_CUDA_LAUNCHED();
    return 0;
}

int64_t moe_grouped_min() {
    return bm_env_long("BLACKMAMBA_MOE_GEMV_MAX", 1, MOE_GEMV_MAX, MOE_GROUPED_MIN_DEFAULT);
}

// Does mlp() run this layer's T rows through grouped.cu? Prefills of more than
// moe_grouped_min() rows and decode batches with the all-experts scratch (more than ws->gv
// rows), gated, bf16 weights under BF16 math, sizes and alignments grouped.cu supports.
bool grouped_moe(const bm_cuda_model *m, const Ws *ws, const LayerDev &ly, const float *x,
                 const float *out, int64_t T) {
    const bm_cuda_config &c = m->cfg;
    if (!c.swiglu || !bf16_math(m) || !ws->moe || !bm_cuda_moe_grouped_mode() ||
        !bm_cuda_moe_grouped_supported(x, ly.fc1, ly.fc2, c.wdtype, out, c.d, ly.X, c.F))
        return false;
    return ws->decode ? ws->hall != nullptr && T > ws->gv : T > moe_grouped_min();
}

// Layers run by each of mlp()'s four paths, in this process (the tests assert the path):
// 0 grouped.cu, 1 bm_cuda_moe_experts (cuBLAS), 2 expert_all, 3 expert_gemv.
std::atomic<long long> g_mlp_path[4];

// SPEC 3: x (T, d) -> out (T, d) for layer li (dense MLP or top-1 MoE).
// routed: ws->ids, ws->gates (and ws->rlog when traced) already hold this layer's routing
// (norm_route_kernel).
// xbf_ready: the norm wrote bf16(x) (and its low parts when split) into ws->xbf (ws->xlo);
// only where grouped_moe(). disp (only where grouped_moe()): BM_MOE_GROUPED_DISPATCHED, the
// routing also wrote the grouped path's perm and offsets into ws->moe (norm_route_kernel<.,
// NR_PRE_DISP>); BM_MOE_GROUPED_IDS, the GEMMs derive them from the ids; 0 neither.
int mlp(bm_cuda_model *m, Ws *ws, const LayerDev &ly, int64_t li, const float *x, float *out,
        int64_t T, const bm_cuda_trace *trace, bool routed = false, bool xbf_ready = false,
        int disp = 0, const bm_cuda_moe_norm_out *nout = nullptr) {
    const bm_cuda_config &c = m->cfg;
    cudaStream_t st = m->stream;
    const int32_t *ids = nullptr;
    const float *gates = nullptr;
    if (ly.X >= 2) {
        const bool tr = trace && trace->logits && trace->logits[li];
        if (routed) {
        } else if (T <= ROUTE_SMALL_MAX) {
            BM_LAUNCH_PDL(b1_early(T) ? route_small_kernel<true> : route_small_kernel<false>,
                          dim3((unsigned)T), dim3(256), 0, st, x, ly.router_w, ly.router_b,
                          tr ? ws->rlog : nullptr, ws->ids, ws->gates, (int)c.d, ly.X);
        } else {
            TRY(bm_cuda_route_top1(x, ly.router_w, BM_F32, ly.router_b, tr ? ws->rlog : nullptr,
                                   ws->ids, ws->gates, T, c.d, ly.X, st));
        }
        ids = ws->ids;
        gates = ws->gates;
        TRY(mark(m, P_ROUTE));
        if (tr) {  // pageable host memory: these copies complete before returning
            BM_CUDA_TRY(cudaMemcpyAsync(trace->logits[li], ws->rlog, (size_t)(T * ly.X) * 4,
                                        cudaMemcpyDeviceToHost, st));
            BM_CUDA_TRY(cudaMemcpyAsync(trace->ids[li], ws->ids, (size_t)T * 4,
                                        cudaMemcpyDeviceToHost, st));
            BM_CUDA_TRY(cudaMemcpyAsync(trace->gates[li], ws->gates, (size_t)T * 4,
                                        cudaMemcpyDeviceToHost, st));
        }
    }
    if (grouped_moe(m, ws, ly, x, out, T)) {
        // Each expert's weights read once, only its own tokens computed, no host sync (in
        // decode, expert_all computes every token on every expert).
        if (ly.X == 1) {
            BM_CUDA_TRY(cudaMemsetAsync(ws->ids, 0, (size_t)T * 4, st));
            ids = ws->ids;
        }
        const bool split = split_x(m, ws, T);
        // The decode's GEMMs with PDL (moe_dec_pdl_flags; at capture), and no dispatch launch
        // where the routing built it.
        // (a prefill's too, on its own tiles: moe_prefill_pdl_flags)
        const int flags = disp | (ws->decode ? moe_dec_pdl_flags(T, ly.X)
                                             : moe_prefill_pdl_flags(T, ly.X, split));
        g_mlp_path[0].fetch_add(1, std::memory_order_relaxed);
        TRY(bm_cuda_moe_grouped_bf16_norm(x, xbf_ready ? ws->xbf : nullptr,
                                          xbf_ready && split ? ws->xlo : nullptr, ids, gates,
                                          ly.fc1, ly.fc2, c.act, split, out, T, c.d, ly.X, c.F,
                                          ws->moe, ws->moe_bytes, flags, nout, st));
    } else if (!ws->decode && c.swiglu && T > MOE_GEMV_MAX) {
        if (ly.X == 1) {  // dense: every token on "expert 0", no gate
            BM_CUDA_TRY(cudaMemsetAsync(ws->ids, 0, (size_t)T * 4, st));
            ids = ws->ids;
        }
        g_mlp_path[1].fetch_add(1, std::memory_order_relaxed);
        const int mm = split_x(m, ws, T) ? BM_CUDA_MATH_BF16X2 : c.math;
        TRY(bm_cuda_moe_experts(x, ids, gates, ly.fc1, ly.fc2, c.wdtype, c.act, mm, out, T,
                                c.d, ly.X, c.F, ws->moe, ws->moe_bytes, m->blas, st));
        TRY(blas_prepare(m));
    } else if (ws->hall && T > ws->gv) {
        if (ws->moe && bm_cuda_moe_grouped_mode() == 2)
            return BM_CUDA_ARG_FAIL("engine: BLACKMAMBA_MOE_GROUPED=force but the grouped "
                                    "decode path does not support this layer");
        g_mlp_path[2].fetch_add(1, std::memory_order_relaxed);
        TRY(expert_all(m, ws, x, ids, gates, ly, out, T));
    } else {
        g_mlp_path[3].fetch_add(1, std::memory_order_relaxed);
        TRY(expert_gemv(m, ws, x, ids, gates, ly, out, T));
    }
    return mark(m, P_EXPERTS);
}

// SPEC 1's layer loop over ws->tok (B, L): leaves LayerNorm_final(h + r) in ws->yf (T, d).
int forward(bm_cuda_model *m, Ws *ws, bm_cuda_state *s, int64_t B, int64_t L,
            const bm_cuda_trace *trace) {
    const bm_cuda_config &c = m->cfg;
    const int64_t T = B * L, d = c.d;
    cudaStream_t st = m->stream;
    const unsigned eth = (unsigned)std::min<int64_t>(256, bm_cdiv(d, 32) * 32);
    if (c.wdtype == BM_BF16)
        embed_kernel<uint16_t><<<(unsigned)T, eth, 0, st>>>(ws->tok, (const uint16_t *)m->emb,
                                                            ws->h, (int)d, (int)c.V);
    else if (c.wdtype == BM_F16)
        embed_kernel<__half><<<(unsigned)T, eth, 0, st>>>(ws->tok, (const __half *)m->emb, ws->h,
                                                          (int)d, (int)c.V);
    else
        embed_kernel<float><<<(unsigned)T, eth, 0, st>>>(ws->tok, (const float *)m->emb, ws->h,
                                                         (int)d, (int)c.V);
    BM_CUDA_LAUNCHED();
    TRY(mark(m, P_EMBED));
    // The residual stream's buffer now: ws->r, or ws->r2 after a batch-1 Mamba layer whose
    // norm rode on in_proj (the launch's other blocks still read the old one while block 0
    // writes the sum: so it goes to the other buffer, and the two take turns).
    float *rc = ws->r;
    // A MoE layer: the norm and the routing in one kernel, at every size (at T = 2048 on
    // the H200 the separate rms_norm + route_top1 took 14 + 29 us a layer).
    auto nr_ok = [&](const LayerDev &l, const float *r) {
        return !l.mamba && l.X >= 2 && l.X <= ROUTE_SMALL_MAX_X && T <= INT32_MAX &&
               d % 4 == 0 && d <= NR_MAX_D &&
               (((uintptr_t)ws->h | (uintptr_t)r | (uintptr_t)ws->xn | (uintptr_t)l.norm_w |
                 (uintptr_t)l.router_w) & 15) == 0;
    };
    bool hpair = false;  // the last Mamba layer left its output as two halves in ws->hk
    bool fc2_normed = false;  // the last MoE layer's fc2 did this Mamba layer's norm
    m->side_open = false;
    const int64_t side_bytes = ws->decode ? (T > ws->gv ? l2side_bytes(T) : 0)
                                          : prefill_l2side_ok(T) ? l2side_bytes(T) : 0;
    for (int64_t li = 0; li < c.num_layers; li++) {
        const LayerDev &ly = m->layers[li];
        // r = h + r (r = h for the first layer); xn = RMSNorm(r) * w
        const bool nr = nr_ok(ly, rc);
        // The norm also writes the bf16 input (+ low parts) of the product that follows where
        // that product is a bf16 GEMM that would convert xn itself (grouped_moe, in_proj).
        const bool split = split_x(m, ws, T);
        const bool lo_ok = !split || (ws->xlo && T <= ws->Ts);
        if (nr) {
            const bool tr = trace && trace->logits && trace->logits[li];
            const bool gm = grouped_moe(m, ws, ly, ws->xn, ws->h, T);
            const bool xb = lo_ok && gm;
            const bool early = ws->decode && b1_early(T);
            if (early) bm_pdl_early_count(BM_EARLY_NORM_ROUTE);
            auto *nr_kernel = xb ? (early ? norm_route_kernel<true, NR_EARLY>
                                          : norm_route_kernel<true, NR_PLAIN>)
                                 : (early ? norm_route_kernel<false, NR_EARLY>
                                          : norm_route_kernel<false, NR_PLAIN>);
            // The dispatch in the routing's last block (NR_PRE_DISP) where the grouped
            // experts follow (their workspace holds perm and offsets).
            int32_t *perm = nullptr, *offsets = nullptr;
            int disp = 0;  // the grouped experts' flag: dispatch built here, or from the ids
            size_t smem = (size_t)d * 4;
            // the prefill's warp-per-token kernel (else the block kernel below)
            const bool warp_nr =
                !ws->decode && d <= 128 * NRW_V && T >= nr_warp_min() && nr_warp_on();
            // The router row and the norm weights before the wait (NR_PRE_ROW): the batched
            // decode, and a prefill on the block kernel (short prompts, session 21). Where the
            // grouped experts follow, their dispatch from the ids (decode tiles only) or built
            // in the routing's last block (NR_PRE_DISP) instead of a dispatch_kernel launch (4
            // us + a launch a MoE layer at 32 tokens). The same bits either way.
            const bool dec = ws->decode;
            if (((dec && !early && T > ws->gv) || (!dec && !warp_nr)) && d <= 128 * NR_PRE &&
                nr_pre_on()) {
                nr_kernel = xb ? norm_route_kernel<true, NR_PRE_ROW> : norm_route_kernel<false, NR_PRE_ROW>;
                (dec ? g_nr_pre : g_nr_pre_fill).fetch_add(1, std::memory_order_relaxed);
                if (dec && gm && moe_ids_on() && bm_cuda_moe_grouped_ids_ok(T, ly.X, split)) {
                    // the GEMMs derive the dispatch from the ids: no last-block dispatch
                    disp = BM_MOE_GROUPED_IDS;
                    g_nr_ids.fetch_add(1, std::memory_order_relaxed);
                } else if (gm && ws->ticket && route_dispatch_on()) {
                    disp = BM_MOE_GROUPED_DISPATCHED;
                    nr_kernel = xb ? norm_route_kernel<true, NR_PRE_DISP>
                                   : norm_route_kernel<false, NR_PRE_DISP>;
                    bm_cuda_moe_grouped_dispatch_bufs(ws->moe, T, d, ly.X, c.F, split, &perm,
                                                      &offsets);
                    smem = (size_t)std::max<int64_t>(
                               d, bm_dispatch_smem_ints(ly.X, NR_THREADS / 32)) * 4;
                    (dec ? g_nr_disp : g_nr_disp_fill).fetch_add(1, std::memory_order_relaxed);
                }
            }
            if (warp_nr) {
                // the prefill: a warp per token; no fp32 xn where the experts read xbf
                const int64_t blocks = bm_cdiv(T, NR_THREADS / 32);
                if (blocks > INT32_MAX) return BM_CUDA_ARG_FAIL("engine: too many tokens");
                BM_LAUNCH_PDL(xb ? norm_route_warp_kernel<true> : norm_route_warp_kernel<false>,
                              dim3((unsigned)blocks), dim3(NR_THREADS), 0, st,
                              hpair ? ws->hk : ws->h, li ? rc : nullptr, ly.norm_w, EPS,
                              xb ? nullptr : ws->xn, rc, ly.router_w, ly.router_b,
                              tr ? ws->rlog : nullptr, ws->ids, ws->gates, (int)d, ly.X,
                              xb ? ws->xbf : nullptr, xb && split ? ws->xlo : nullptr,
                              hpair ? ws->hk + T * d : nullptr, T);
                g_nr_warp.fetch_add(1, std::memory_order_relaxed);
            } else {
                BM_LAUNCH_PDL(nr_kernel, dim3((unsigned)T), dim3(NR_THREADS), smem, st,
                              hpair ? ws->hk : ws->h, li ? rc : nullptr, ly.norm_w, EPS, ws->xn,
                              rc, ly.router_w, ly.router_b, tr ? ws->rlog : nullptr, ws->ids,
                              ws->gates, (int)d, ly.X, xb ? ws->xbf : nullptr,
                              xb && split ? ws->xlo : nullptr, perm, offsets, ws->ticket,
                              hpair ? ws->hk + T * d : nullptr);
            }
            hpair = false;
            // The next Mamba layer's RMSNorm in this fc2's epilogue (norm_fc2_on): fc2 adds
            // its rows to the residual rc in place and writes that layer's in_proj input
            // bf16(rc * w) without the row scale, and the sums of squares in parts (ws->ssp),
            // from which its conv step scales x and z (mamba_step). No norm kernel between.
            const LayerDev *nx = li + 1 < c.num_layers ? &m->layers[li + 1] : nullptr;
            // Split (decode batches of up to GEMV_ROWS rows): fc2 on grouped_dec_kernel writes
            // the low parts of rc * w too, right after the hi rows, for the next in_proj's
            // stacked GEMM (stack_in_ok), whose conv step adds the two and scales
            // (bm_cuda_conv_step_sum_norm). BLACKMAMBA_DECODE_NORM_FC2_SPLIT=0: not there (A/B).
            const bool fuse = gm && ws->decode && T > ws->gv && ws->ssp && ws->xzt &&
                              nx && nx->mamba && !nx->X && !nx->in_b && T <= 65535 &&
                              in_proj_batched(m, ws, T) && norm_bf_on() && norm_fc2_on() &&
                              (!split || (stack_in_ok(m, ws, *nx, T) &&
                                          norm_fc2_split_on())) &&
                              bm_cuda_moe_grouped_norm_ok(T, ly.X, split);
            const bm_cuda_moe_norm_out nout{rc, fuse ? nx->norm_w : nullptr, ws->xbf, ws->ssp,
                                            split ? ws->xbf + T * d : nullptr};
            TRY(mlp(m, ws, ly, li, ws->xn, ws->h, T, trace, true, xb, disp,
                    fuse ? &nout : nullptr));
            if (fuse) g_norm_fc2.fetch_add(1, std::memory_order_relaxed);
            fc2_normed = fuse;
            continue;
        }
        const bool xb = lo_ok && ly.mamba && in_proj_batched(m, ws, T) &&
                        (!ws->decode || norm_bf_on());
        if (ly.mamba && !ly.X && ws->decode && T == 1 && !xb && ws->r2 && b1_early(T) &&
            norm_fuse_on()) {
            // batch 1: the norm rides on in_proj's early GEMV (mamba_step, NormIn)
            float *rn = rc == ws->r ? ws->r2 : ws->r;
            const NormIn nin{ws->h, li ? rc : nullptr, ly.norm_w, rn};
            TRY(mamba_step(m, ws, ly, s->conv[li], s->ssm[li], ws->xn, ws->h, B, false, &nin));
            rc = rn;
            continue;
        }
        const bool normed = fc2_normed;
        fc2_normed = false;
        // a split decode in_proj as one GEMM of 2T rows: the lo rows right after the hi rows
        // (a short split prefill's likewise: stack_in_fill_ok)
        const bool stk = xb && split && ly.mamba && !ly.X &&
                         (ws->decode ? stack_in_ok(m, ws, ly, T) : stack_in_fill_ok(m, ws, ly, T));
        if (!normed) {
            // (the prefill's in_proj reads the bf16 row only: no fp32 xn there, 96 MB a
            // layer less at T = 16384)
            TRY(bm_rms_norm_static_w(ws->h, li ? rc : nullptr, ly.norm_w, EPS,
                                     xb && !ws->decode ? nullptr : ws->xn, rc,
                                     xb ? ws->xbf : nullptr,
                                     xb && split ? (stk ? ws->xbf + T * d : ws->xlo) : nullptr,
                                     T, d, st));
            TRY(mark(m, P_NORM));
        }
        if (ly.mamba) {
            // out_proj as two K halves, summed by the next layer's routing kernel
            const bool pair = ws->decode && !ly.X && out_ksplit_on() && li + 1 < c.num_layers &&
                              nr_ok(m->layers[li + 1], rc) && out_pair_ok(m, ws, ly, B) &&
                              (((uintptr_t)ws->hk) & 15) == 0;
            // The next MoE layer's first fc1 bytes into L2 during this step (l2side_fork).
            const LayerDev *nx = li + 1 < c.num_layers ? &m->layers[li + 1] : nullptr;
            const bool stage = side_bytes && !ly.X && nx && !nx->mamba && nx->X >= 2 && nx->fc1;
            const int64_t fc1_bytes = stage ? nx->X * m->G * d * (int64_t)wsize(m) : 0;
            if (ws->decode)
                TRY(mamba_step(m, ws, ly, s->conv[li], s->ssm[li], ws->xn,
                               pair ? ws->hk : ws->h, B, xb, nullptr, pair,
                               stage ? nx->fc1 : nullptr, std::min(side_bytes, fc1_bytes),
                               normed, stk));
            else {
                // a short split prefill: out_proj's two products, summed by the routing
                const bool ppair = !ly.X && li + 1 < c.num_layers &&
                                   nr_ok(m->layers[li + 1], rc) && prefill_pair_ok(m, ws, ly, T);
                TRY(mamba_prefill(m, ws, ly, s->conv[li], s->ssm[li], ws->xn,
                                  ppair ? ws->hk : ws->h, B, L, xb, ppair, stk,
                                  stage ? nx->fc1 : nullptr, std::min(side_bytes, fc1_bytes)));
                hpair = ppair;
            }
            if (ws->decode) hpair = pair;
            if (ly.X) {  // parallel "rX": h = mamba(norm(r)) + mlp(norm_moe(r))
                TRY(bm_cuda_rms_norm(rc, nullptr, ly.norm_moe_w, EPS, ws->xm, nullptr, T, d,
                                     st));
                TRY(mark(m, P_NORM));
                TRY(mlp(m, ws, ly, li, ws->xm, ws->mo, T, trace));
                add_kernel<<<grid_for(T * d), 256, 0, st>>>(ws->h, ws->mo, T * d);
                BM_CUDA_LAUNCHED();
                TRY(mark(m, P_ADD));
            }
        } else {
            TRY(mlp(m, ws, ly, li, ws->xn, ws->h, T, trace));
        }
    }
    TRY(l2side_join(m));
    TRY(bm_cuda_layer_norm(ws->h, rc, m->final_w, m->final_b, EPS, ws->yf, T, d, st));
    return mark(m, P_FINAL);
}

// Logits of rows src (M, d), LB rows at a time through ws->logits, copied to out (M, V).
int head(bm_cuda_model *m, Ws *ws, const float *src, int64_t M, float *out, int out_dev) {
    const int64_t d = m->cfg.d, V = m->cfg.V;
    for (int64_t r0 = 0; r0 < M; r0 += ws->LB) {
        const int64_t n = std::min(ws->LB, M - r0);
        TRY(linear(m, ws, src + r0 * d, d, m->emb, nullptr, ws->logits, V, n, V, d));
        if (out)
            BM_CUDA_TRY(cudaMemcpyAsync(out + r0 * V, ws->logits, (size_t)(n * V) * 4,
                                        out_dev ? cudaMemcpyDeviceToDevice
                                                : cudaMemcpyDeviceToHost,
                                        m->stream));
    }
    return mark(m, P_HEAD);
}

// ---- workspaces ------------------------------------------------------------------------------

void ws_layout(const bm_cuda_model *m, Ws *w, char *base, int64_t T, bool decode) {
    const bm_cuda_config &c = m->cfg;
    const int64_t d = c.d, E = c.E, N = c.N, P = c.R + 2 * c.N, V = c.V, G = m->G;
    Arena a{base, 0};
    w->T = T;
    w->decode = decode;
    w->gv = GEMV_ROWS;
    w->dsplit = false;
    w->tok = a.take<int32_t>(T);
    w->h = a.take<float>(T * d);
    w->r = a.take<float>(T * d);
    w->r2 = decode && T == 1 ? a.take<float>(d) : nullptr;  // only batch 1 fuses (forward())
    w->xn = a.take<float>(T * d);
    w->yf = a.take<float>(T * d);
    w->xm = m->has_parallel ? a.take<float>(T * d) : nullptr;
    w->mo = m->has_parallel ? a.take<float>(T * d) : nullptr;
    w->xz = a.take<float>(2 * T * E);
    w->xc = a.take<float>(T * E);
    w->y = a.take<float>(T * E);
    // Decode buffers of the batched paths from 2 rows on (decode_body picks the path).
    w->delta = (decode && T < 2) ? nullptr : a.take<float>(T * E);
    w->dbc = a.take<float>(T * P);
    w->Bm = decode ? nullptr : a.take<float>(T * N);
    w->Cm = decode ? nullptr : a.take<float>(T * N);
    w->scan_ws_bytes = decode ? 0 : bm_cuda_scan_workspace(E, N);
    w->scan_ws = w->scan_ws_bytes ? a.take<char>((int64_t)w->scan_ws_bytes) : nullptr;
    // rows that may split (split_x): all under BF16X2, the small prefill products under BF16
    w->Ts = !bf16_math(m) ? 0
            : c.math == BM_CUDA_MATH_BF16X2 ? T
            : decode ? (T >= 2 && T <= GEMV_ROWS ? T : 0) : std::min(T, split_limit(c));
    // x_proj's K-split partials (xproj_ks: ks * cdiv(M, 128) <= 160, so ks * M <= 20480)
    // (the prefill's split rows twice: xproj_stack_ok)
    w->xpart_rows = bf16_math(m) && T >= 2
                        ? std::min<int64_t>(20480, 32 * (T + (decode ? 0 : w->Ts))) : 0;
    w->xpart = w->xpart_rows ? a.take<float>(w->xpart_rows * P) : nullptr;
    w->ids = a.take<int32_t>(T);
    w->gates = a.take<float>(T);
    w->rlog = a.take<float>(T * m->Xmax);
    const int64_t eh_rows = (decode || !c.swiglu) ? T : std::min(T, MOE_GEMV_MAX);
    w->eh = m->has_mlp ? a.take<float>(eh_rows * G) : nullptr;
    // xlo right after xbf's T rows: a split product's hi and lo rows of the widest stride are
    // one matrix of 2T rows (stack_out_ok), and xbf has room for 2T rows of d (stack_in_ok)
    const int64_t wmax = std::max({d, E, c.R});
    w->xbf = bf16_math(m) ? a.take<uint16_t>((T + w->Ts) * wmax) : nullptr;
    w->xlo = w->Ts ? w->xbf + T * wmax : nullptr;
    const bool all_experts = decode && bf16_math(m) && m->has_mlp && T >= 2;
    w->hall = all_experts ? a.take<float>(m->Xmax * T * G) : nullptr;
    w->abf = all_experts ? a.take<uint16_t>(T * c.F) : nullptr;
    w->alo = all_experts && w->Ts ? a.take<uint16_t>(T * c.F) : nullptr;
    w->oall = all_experts ? a.take<float>(m->Xmax * T * d) : nullptr;
    w->moe_bytes = 0;
    w->moe = nullptr;
    // grouped.cu from 2 tokens under bf16 math (grouped_moe: moe_grouped_min, set per
    // forward), the cuBLAS experts from MOE_GEMV_MAX otherwise
    const int64_t moe_min = bf16_math(m) ? 1 : MOE_GEMV_MAX;
    if (!decode && m->has_gated_mlp && T > moe_min) {
        // A MoE layer of at most Ts tokens may run split (BF16X2 layout, larger per token).
        w->moe_bytes = std::max(
            bm_cuda_moe_experts_workspace(T, d, m->Xmax, c.F, c.wdtype, c.math),
            w->Ts > moe_min ? bm_cuda_moe_experts_workspace(w->Ts, d, m->Xmax, c.F, c.wdtype,
                                                            BM_CUDA_MATH_BF16X2)
                            : (size_t)0);
        w->moe = a.take<char>((int64_t)w->moe_bytes);
    } else if (all_experts && m->has_gated_mlp) {  // the grouped decode (mlp())
        w->moe_bytes = bm_cuda_moe_grouped_workspace(T, d, m->Xmax, c.F, w->Ts > 0);
        w->moe = a.take<char>((int64_t)w->moe_bytes);
    }
    w->LB = decode ? T : std::min(T, LOGIT_ROWS);
    w->logit_rows = decode && w->Ts == T && T >= 2 ? 2 * T : w->LB;  // stack_head_ok
    w->logits = a.take<float>(w->logit_rows * V);
    w->amax = a.take<int32_t>(T);
    w->ticket = a.take<unsigned>(1);  // (the prefill's short prompts use it too)
    // the prefill: the rows that split under BF16 math (prefill_pair_ok), at most
    // BM_CUDA_BF16_SPLIT_ROWS (BF16X2 splits every length: longer prefills keep linear())
    w->hk_rows = decode ? T : std::min<int64_t>(w->Ts, BM_CUDA_BF16_SPLIT_ROWS);
    w->hk = (decode && T >= 2) || (!decode && w->hk_rows > 0) ? a.take<float>(2 * w->hk_rows * d)
                                                             : nullptr;
    w->ssp = decode && T >= 2 ? a.take<float>(T * bm_cuda_moe_norm_parts(d)) : nullptr;
    // 2T: stack_in_ok; the prefill: a split in_proj's 2 hk_rows (stack_in_fill_ok)
    w->xzt_rows = decode ? (T >= 2 ? (w->Ts == T ? 2 * T : T) : 0) : 2 * w->hk_rows;
    w->xzt = w->xzt_rows ? a.take<float>(w->xzt_rows * 2 * E) : nullptr;
    w->bytes = a.off;
}

void ws_free(Ws *w) {
    if (!w) return;
    for (const Ws::DecGraph &g : w->graphs) cudaGraphExecDestroy(g.exec);
    cudaFree(w->base);
    delete w;
}

int ws_create(bm_cuda_model *m, int64_t T, bool decode, Ws **out) {
    *out = nullptr;
    Ws *w = new (std::nothrow) Ws();
    if (!w) return BM_CUDA_ARG_FAIL("engine: host allocation failed");
    ws_layout(m, w, nullptr, T, decode);
    void *base = nullptr;
    int st = dev_alloc(&base, w->bytes, decode ? "decode workspace" : "prefill workspace");
    if (st) {
        delete w;
        return st;
    }
    w->base = (char *)base;
    ws_layout(m, w, w->base, T, decode);
    w->exec = nullptr;
    w->clock = 0;
    // Tokens start valid (id 0): a benchmark may replay before writing any.
    st = (int)cudaMemsetAsync(w->tok, 0, (size_t)T * 4, m->stream);
    // The routing's ticket counter starts at 0 (and each launch leaves it so).
    if (!st && w->ticket) st = (int)cudaMemsetAsync(w->ticket, 0, sizeof(unsigned), m->stream);
    if (st) {
        ws_free(w);
        return bm_cuda_fail_cuda_(__FILE__, __LINE__, (cudaError_t)st);
    }
    *out = w;
    return 0;
}

// Prefills of 2..GEMV_ROWS tokens under BF16 math (session 22), as the decode batches of those
// sizes since session 18 (dec_gemm_min): the batched products, split into bf16 hi + lo (the
// short prompts' stacked in_proj / x_proj / out_proj and fused conversions), instead of the
// GEMVs, which read the weights at well under the copy rate (an 8-token prompt took longer than
// a 16-token one: 3.3 against 2.6 ms on the H200). BLACKMAMBA_PREFILL_GEMM_MIN=<tokens>
// (2..9; 9: the GEMVs up to 8 as before) moves the line (A/B, tests). Read per call.
constexpr int64_t PREFILL_GEMM_MIN_DEFAULT = 2;

// ---- prefill graphs (session 25) ------------------------------------------------------------
//
// A prefill's host work (~240 launches, ~4-5 us each, cuBLAS's own) leaves the GPU idle at
// every point where the host falls behind: the first layer of every prompt and the Mamba half
// of every short prompt's layers. The same forward captured once as a CUDA graph and replayed
// took 0.17-0.24 ms less from 8 to 128 tokens (-8.6 to -7.1%), 0.33 ms at 512, 0.26 at 2048
// (-3.1%) on the H200, bit-identical (BLACKMAMBA_PREFILL_GRAPH 0 / 1, cuda/NOTES.md session
// 25). A graph is bound to the pointers it was captured with, so:
//   - the key is (B, L) and the BLACKMAMBA_* switches (a digest of their values: A/B runs and
//     tests that flip them get their own graphs, and a switch read at launch keeps its
//     meaning);
//   - the capture and every replay run on a shadow state of the batch size (model-owned):
//     the caller's state is copied in before and out after (one device copy each way, ~4 MB a
//     batch row at the 2.8B shape), so that any state of that size can use the graph;
//   - captured on the prefill workspace of the moment; a grown workspace drops every graph
//     (prefill_ws);
//   - a key is captured the second time it is seen (the first prefill of a shape runs
//     eagerly: a capture costs about as much as one eager prefill), at most PG_MAX graphs are
//     kept (the least recently used goes), and a key whose capture fails stays eager (float32
//     weights from 65 tokens: the cuBLAS expert path reads the routing on the host).
// BLACKMAMBA_PREFILL_GRAPH: "0" every prefill eager (A/B; the tests' references). Read per call.
constexpr size_t PG_MAX = 16, PG_SEEN_MAX = 64;
bool prefill_graph_on() { return bm_env_switch("BLACKMAMBA_PREFILL_GRAPH", true); }

// FNV-1a of every BLACKMAMBA_* variable of the environment, in its order.
uint64_t env_digest() {
    uint64_t h = 1469598103934665603ull;
    for (char **e = environ; e && *e; e++) {
        if (strncmp(*e, "BLACKMAMBA_", 11)) continue;
        for (const char *c = *e; *c; c++) h = (h ^ (unsigned char)*c) * 1099511628211ull;
        h = (h ^ 0xffu) * 1099511628211ull;
    }
    return h;
}

void pg_clear(bm_cuda_model *m) {
    for (auto &g : m->pg)
        if (g.exec) cudaGraphExecDestroy(g.exec);
    m->pg.clear();
    m->pg_seen.clear();
}

// Prefill graphs captured and replayed so far (bm_cuda_prefill_graph_captures / _replays).
std::atomic<long long> g_pg_captures{0}, g_pg_replays{0};

int state_new(bm_cuda_model *m, int64_t B, bm_cuda_state **out);

int pg_shadow(bm_cuda_model *m, int64_t B, bm_cuda_state **out) {
    for (bm_cuda_state *sh : m->pg_shadow)
        if (sh->B == B) {
            *out = sh;
            return 0;
        }
    bm_cuda_state *sh = nullptr;
    TRY(state_new(m, B, &sh));
    try {
        m->pg_shadow.push_back(sh);
    } catch (...) {
        bm_cuda_state_free(sh);
        return BM_CUDA_ARG_FAIL("prefill graph: host allocation failed");
    }
    *out = sh;
    return 0;
}

// Capture forward(B, L) on the shadow state sh into *exec (NULL where the capture failed: the
// key then runs eagerly; the failure is not the caller's).
int pg_capture(bm_cuda_model *m, Ws *ws, bm_cuda_state *sh, int64_t B, int64_t L,
               cudaGraphExec_t *exec) {
    *exec = nullptr;
    cudaStream_t st = m->stream;
    BM_CUDA_TRY(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    const int rc = forward(m, ws, sh, B, L, nullptr);
    cudaGraph_t g = nullptr;
    const cudaError_t e = cudaStreamEndCapture(st, &g);
    if (!rc && e == cudaSuccess && cudaGraphInstantiate(exec, g, 0) != cudaSuccess)
        *exec = nullptr;
    if (g) cudaGraphDestroy(g);
    if (!*exec) {
        cudaGetLastError();  // what the failed capture left
        m->side_open = false;  // (a fork the dead capture never joined)
    }
    if (*exec) g_pg_captures.fetch_add(1, std::memory_order_relaxed);
    return 0;
}

// The prefill's forward through a graph where one is kept or due (see above); *replayed false:
// the caller runs it eagerly.
int prefill_graph(bm_cuda_model *m, Ws *ws, bm_cuda_state *s, int64_t B, int64_t L,
                  bool *replayed) {
    *replayed = false;
    if (!prefill_graph_on()) return 0;
    const uint64_t env = env_digest();
    auto same = [&](const bm_cuda_model::PrefillGraph &g) {
        return g.B == B && g.L == L && g.env == env;
    };
    bm_cuda_model::PrefillGraph *hit = nullptr;
    for (auto &g : m->pg)
        if (same(g)) hit = &g;
    if (!hit) {
        size_t i = 0;
        while (i < m->pg_seen.size() && !same(m->pg_seen[i])) i++;
        try {
            if (i == m->pg_seen.size()) {  // first sight: eager
                if (m->pg_seen.size() >= PG_SEEN_MAX) m->pg_seen.erase(m->pg_seen.begin());
                m->pg_seen.push_back({B, L, env, nullptr, 0});
                return 0;
            }
            m->pg_seen.erase(m->pg_seen.begin() + (ptrdiff_t)i);
            if (m->pg.size() >= PG_MAX) {  // the least recently used goes
                size_t lru = 0;
                for (size_t j = 1; j < m->pg.size(); j++)
                    if (m->pg[j].used < m->pg[lru].used) lru = j;
                if (m->pg[lru].exec) cudaGraphExecDestroy(m->pg[lru].exec);
                m->pg.erase(m->pg.begin() + (ptrdiff_t)lru);
            }
            m->pg.push_back({B, L, env, nullptr, 0});
        } catch (...) {
            return BM_CUDA_ARG_FAIL("prefill graph: host allocation failed");
        }
        hit = &m->pg.back();
        bm_cuda_state *sh = nullptr;
        TRY(pg_shadow(m, B, &sh));
        TRY(pg_capture(m, ws, sh, B, L, &hit->exec));
    }
    hit->used = ++m->pg_clock;
    if (!hit->exec) return 0;
    bm_cuda_state *sh = nullptr;
    TRY(pg_shadow(m, B, &sh));
    cudaStream_t st = m->stream;
    BM_CUDA_TRY(cudaMemcpyAsync(sh->base, s->base, s->bytes, cudaMemcpyDeviceToDevice, st));
    BM_CUDA_TRY(cudaGraphLaunch(hit->exec, st));
    BM_CUDA_TRY(cudaMemcpyAsync(s->base, sh->base, s->bytes, cudaMemcpyDeviceToDevice, st));
    g_pg_replays.fetch_add(1, std::memory_order_relaxed);
    *replayed = true;
    return 0;
}

int64_t prefill_gv(const bm_cuda_model *m, int64_t T) {
    const int64_t lo = bm_env_long("BLACKMAMBA_PREFILL_GEMM_MIN", 2, GEMV_ROWS + 1,
                                   PREFILL_GEMM_MIN_DEFAULT);
    return bf16_math(m) && T >= lo ? 1 : GEMV_ROWS;
}

int prefill_ws(bm_cuda_model *m, int64_t T, Ws **out) {
    if (!m->pre || m->pre->T < T) {
        if (m->pre) {
            BM_CUDA_TRY(cudaStreamSynchronize(m->stream));
            pg_clear(m);  // captured on the old one (a new one may even reuse its address)
            ws_free(m->pre);
            m->pre = nullptr;
        }
        TRY(ws_create(m, T, false, &m->pre));
    }
    *out = m->pre;
    return 0;
}

int decode_ws(bm_cuda_model *m, int64_t B, Ws **out) {
    for (Ws *w : m->dec)
        if (w->T == B) {
            *out = w;
            return 0;
        }
    Ws *w = nullptr;
    TRY(ws_create(m, B, true, &w));
    try {
        m->dec.push_back(w);
    } catch (...) {
        ws_free(w);
        return BM_CUDA_ARG_FAIL("engine: host allocation failed");
    }
    *out = w;
    return 0;
}

// The LM head of a split decode (stack_head_ok) as one GEMM of 2B rows: the final norm's
// output yf as bf16 hi rows in xbf and lo rows right after them, the products into logits
// (2B, V), then the lo rows' products added to the hi rows' in fp32, as linear()'s second
// (beta = 1) GEMM did: the 148 MB of the 2.8B head read once instead of twice.
bool stack_head_ok(const bm_cuda_model *m, const Ws *ws, int64_t B) {
    return ws->decode && B == ws->T && B > ws->gv && ws->Ts == B && ws->xbf &&
           ws->logit_rows >= 2 * B && split_x(m, ws, B) && stack_on() && stack_head_on();
}
int head_stacked(bm_cuda_model *m, Ws *ws, int64_t B) {
    const int64_t d = m->cfg.d, V = m->cfg.V;
    TRY(to_bf16(m, ws->yf, d, ws->xbf, B, d, ws->xbf + B * d));
    TRY(gemm(m, m->emb, CUDA_R_16BF, ws->xbf, CUDA_R_16BF, d, ws->logits, V, 2 * B, V, d,
             CUBLAS_COMPUTE_32F));
    add_kernel<<<grid_for(B * V), 256, 0, m->stream>>>(ws->logits, ws->logits + B * V, B * V);
    BM_CUDA_LAUNCHED();
    g_stack.fetch_add(1, std::memory_order_relaxed);
    return 0;
}

// One decode step of ws->tok into ws->logits (B, V): what the graph holds.
int decode_body(bm_cuda_model *m, Ws *ws, bm_cuda_state *s, const bm_cuda_trace *trace) {
    const int64_t B = ws->T;
    // From dec_gemm_min() rows on (BF16 math), every product and the experts take the batched
    // paths (cuBLAS / tf32 GEMMs, the grouped experts) instead of the 8-row GEMVs: those read
    // the weights at ~0.4-1 TB/s (B = 8 on the H200: in_proj 45 us a layer for 17 MB).
    // Up to GEMV_ROWS rows these products split their activations (bf16 hi + lo, as the
    // small prefills do): the GEMVs they replace are fp32-exact; the golden's batch-2
    // generation keeps its argmax so. Split products cost little once stacked (stack_on: at
    // B = 8 on the H200 1.70 ms/step, unsplit 1.50; the two-GEMM split 1.92).
    // BLACKMAMBA_DECODE_SPLIT=0 rounds them to bf16 instead, as from GEMV_ROWS + 1 rows (A/B).
    ws->gv = bf16_math(m) && B >= dec_gemm_min() ? 1 : GEMV_ROWS;
    ws->dsplit = ws->gv == 1 && B <= GEMV_ROWS && bm_env_switch("BLACKMAMBA_DECODE_SPLIT", true);
    TRY(forward(m, ws, s, B, 1, trace));
    if (stack_head_ok(m, ws, B))
        TRY(head_stacked(m, ws, B));
    else
        TRY(linear(m, ws, ws->yf, m->cfg.d, m->emb, nullptr, ws->logits, m->cfg.V, B, m->cfg.V,
                   m->cfg.d));
    return mark(m, P_HEAD);
}

// Decode graphs kept a batch size (ensure_graph): BLACKMAMBA_DECODE_GRAPHS (1..64, default 8;
// 1 is the single graph of sessions 1-25, captured again whenever another state stepped:
// +0.18 / +0.33 ms a B = 1 step at the 2.8B shape on two H200s, cuda/NOTES.md session 26).
// Read per call.
constexpr long DEC_GRAPHS_DEFAULT = 8;
size_t dec_graphs_max() {
    return (size_t)bm_env_long("BLACKMAMBA_DECODE_GRAPHS", 1, 64, DEC_GRAPHS_DEFAULT);
}
// Decode graphs captured so far (bm_cuda_decode_graph_captures: the tests).
std::atomic<long long> g_dg_captures{0};

// ws->exec := the decode graph of ws for state s under the current BLACKMAMBA_* switches,
// captured where none is kept (a graph holds the state's buffer addresses and the switches
// read at capture). A state's serial is never reused, so a freed state's graph is never
// replayed: it waits for eviction. Beyond dec_graphs_max() graphs the least recently used one
// is replaced (its executable updated in place where the topology allows).
int ensure_graph(bm_cuda_model *m, Ws *ws, bm_cuda_state *s) {
    const uint64_t env = env_digest();
    for (Ws::DecGraph &g : ws->graphs)
        if (g.serial == s->serial && g.env == env) {
            g.used = ++ws->clock;
            ws->exec = g.exec;
            return 0;
        }
    ws->exec = nullptr;
    auto lru = [&]() {
        size_t j = 0;
        for (size_t i = 1; i < ws->graphs.size(); i++)
            if (ws->graphs[i].used < ws->graphs[j].used) j = i;
        return j;
    };
    const size_t cap = dec_graphs_max();
    while (ws->graphs.size() > cap) {  // (the switch lowered)
        const size_t j = lru();
        cudaGraphExecDestroy(ws->graphs[j].exec);
        ws->graphs.erase(ws->graphs.begin() + (ptrdiff_t)j);
    }
    try {
        ws->graphs.reserve(cap);  // (no allocation after the capture)
    } catch (...) {
        return BM_CUDA_ARG_FAIL("decode graph: host allocation failed");
    }
    TRY(blas_prepare(m));
    if (needs_wf(m, ws->T)) TRY(ensure_wf(m));
    BM_CUDA_TRY(cudaStreamBeginCapture(m->stream, cudaStreamCaptureModeThreadLocal));
    const int st = decode_body(m, ws, s, nullptr);
    cudaGraph_t g = nullptr;
    const cudaError_t e = cudaStreamEndCapture(m->stream, &g);
    if (st || e != cudaSuccess) {
        if (g) cudaGraphDestroy(g);
        if (st) return st;  // the launcher's message
        return bm_cuda_fail_cuda_(__FILE__, __LINE__, e);
    }
    cudaGraphExec_t exec = nullptr;
    size_t slot = ws->graphs.size();  // a new entry, or the one replaced
    if (slot == cap) {
        slot = lru();
        exec = ws->graphs[slot].exec;
        cudaGraphExecUpdateResultInfo info;
        if (cudaGraphExecUpdate(exec, g, &info) != cudaSuccess) {
            cudaGetLastError();  // not updatable (topology changed): instantiate anew
            cudaGraphExecDestroy(exec);
            exec = nullptr;
            ws->graphs.erase(ws->graphs.begin() + (ptrdiff_t)slot);
            slot = ws->graphs.size();
        }
    }
    if (!exec) {
        const cudaError_t ei = cudaGraphInstantiate(&exec, g, 0);
        if (ei != cudaSuccess) {
            cudaGraphDestroy(g);
            return bm_cuda_fail_cuda_(__FILE__, __LINE__, ei);
        }
        ws->graphs.push_back({0, 0, 0, exec});  // within the reserved capacity
    }
    cudaGraphDestroy(g);
    ws->graphs[slot] = {s->serial, env, ++ws->clock, exec};
    ws->exec = exec;
    g_dg_captures.fetch_add(1, std::memory_order_relaxed);
    return 0;
}

int upload(bm_cuda_model *m, void *dst, bm_dtype dst_dt, const bm_cuda_host_tensor &src,
           int64_t n, void *staging) {
    if (n <= 0) return 0;
    const size_t sbytes = (size_t)n * (src.dtype == BM_F32 ? 4 : 2);
    if (src.dtype == dst_dt) {
        BM_CUDA_TRY(cudaMemcpyAsync(dst, src.data, sbytes, cudaMemcpyHostToDevice, m->stream));
        return 0;
    }
    // Stream order keeps the staging buffer safe: the next upload's copy into it is queued
    // after this conversion.
    BM_CUDA_TRY(cudaMemcpyAsync(staging, src.data, sbytes, cudaMemcpyHostToDevice, m->stream));
    return bm_cuda_convert(staging, src.dtype, dst, dst_dt, n, m->stream);
}

// The weight layout, shared by the sizing pass (base NULL) and the assigning pass.
void weights_layout(bm_cuda_model *m, Arena &a) {
    const bm_cuda_config &c = m->cfg;
    const int64_t d = c.d, E = c.E, N = c.N, K = c.K, R = c.R, F = c.F, G = m->G;
    const size_t ws_ = wsize(m);
    auto wt = [&](int64_t n) -> void * { return a.take<char>(n * (int64_t)ws_); };
    m->emb = wt(c.V * d);
    m->final_w = a.take<float>(d);
    m->final_b = a.take<float>(d);
    for (int64_t li = 0; li < c.num_layers; li++) {
        LayerDev &ly = m->layers[li];
        ly = LayerDev{};
        ly.mamba = m->mamba_v[li];
        ly.X = m->experts_v[li];
        ly.norm_w = a.take<float>(d);
        if (ly.mamba && ly.X) ly.norm_moe_w = a.take<float>(d);
        if (ly.mamba) {
            ly.in_w = wt(2 * E * d);
            if (c.bias) ly.in_b = a.take<float>(2 * E);
            ly.conv_w = a.take<float>(E * K);
            if (c.conv_bias) ly.conv_b = a.take<float>(E);
            ly.x_w = wt((R + 2 * N) * E);
            ly.dt_w = wt(E * R);
            if (bf16_math(m)) {
                ly.x_wf = a.take<float>((R + 2 * N) * E);
                ly.dt_wf = a.take<float>(E * R);
            }
            ly.dt_b = a.take<float>(E);
            ly.A = a.take<float>(E * N);
            ly.D = a.take<float>(E);
            ly.out_w = wt(d * E);
            if (c.bias) ly.out_b = a.take<float>(d);
        }
        if (ly.X >= 2) {
            ly.router_w = a.take<float>(ly.X * d);
            ly.router_b = a.take<float>(ly.X);
        }
        if (ly.X) {
            ly.fc1 = wt(ly.X * G * d);
            ly.fc2 = wt(ly.X * d * F);
        }
    }
}

int check_cfg(const bm_cuda_config *c) {
    if (c->num_layers < 1 || c->d < 1 || c->E < 1 || c->R < 1 || c->V < 1)
        return BM_CUDA_ARG_FAIL("engine: num_layers, d, E, R, V must be >= 1");
    if (c->N < 1 || c->N > 64) return BM_CUDA_ARG_FAIL("engine: N must be in 1..64");
    if (c->K < 2 || c->K > 8) return BM_CUDA_ARG_FAIL("engine: K must be in 2..8");
    if (c->real_vocab < 1 || c->real_vocab > c->V)
        return BM_CUDA_ARG_FAIL("engine: real_vocab must be in 1..V");
    if (c->wdtype != BM_F32 && c->wdtype != BM_BF16 && c->wdtype != BM_F16)
        return BM_CUDA_ARG_FAIL("engine: weights must be float32, bfloat16 or float16");
    if (c->math < BM_CUDA_MATH_FP32 || c->math > BM_CUDA_MATH_BF16X2)
        return BM_CUDA_ARG_FAIL("engine: math must be BM_CUDA_MATH_FP32, _TF32, _BF16 or _BF16X2");
    if (c->d > INT32_MAX / 8 || 2 * c->E > INT32_MAX / 8 || c->V > INT32_MAX ||
        2 * c->F > INT32_MAX / 8)
        return BM_CUDA_ARG_FAIL("engine: dimensions too large");
    for (int64_t i = 0; i < c->num_layers; i++) {
        if (c->experts[i] < 0 || c->experts[i] > 256)
            return BM_CUDA_ARG_FAIL("engine: experts per layer must be in 0..256");
        if (!c->mamba[i] && !c->experts[i])
            return BM_CUDA_ARG_FAIL("engine: a layer has neither a Mamba mixer nor an MLP");
        if (c->experts[i] && c->F < 1) return BM_CUDA_ARG_FAIL("engine: F must be >= 1");
    }
    return 0;
}

// Names the first missing tensor a layer needs (data NULL), or returns 0.
int check_layer_weights(const bm_cuda_model *m, int64_t li, const bm_cuda_layer_weights &w) {
    const LayerDev &ly = m->layers[li];
    const bm_cuda_config &c = m->cfg;
    struct Need { const bm_cuda_host_tensor *t; bool need; const char *name; };
    const Need needs[] = {
        {&w.norm_w, true, "norm_w"},          {&w.norm_moe_w, ly.mamba && ly.X, "norm_moe_w"},
        {&w.in_w, !!ly.mamba, "in_w"},        {&w.in_b, ly.mamba && c.bias, "in_b"},
        {&w.conv_w, !!ly.mamba, "conv_w"},    {&w.conv_b, ly.mamba && c.conv_bias, "conv_b"},
        {&w.x_w, !!ly.mamba, "x_w"},          {&w.dt_w, !!ly.mamba, "dt_w"},
        {&w.dt_b, !!ly.mamba, "dt_b"},        {&w.A, !!ly.mamba, "A"},
        {&w.D, !!ly.mamba, "D"},              {&w.out_w, !!ly.mamba, "out_w"},
        {&w.out_b, ly.mamba && c.bias, "out_b"},
        {&w.router_w, ly.X >= 2, "router_w"}, {&w.router_b, ly.X >= 2, "router_b"},
    };
    static thread_local char msg[96];
    for (const Need &n : needs) {
        if (n.need && (!n.t->data || (n.t->dtype != BM_F32 && n.t->dtype != BM_BF16 &&
                                      n.t->dtype != BM_F16))) {
            snprintf(msg, sizeof msg, "engine: layer %lld lacks %s", (long long)li, n.name);
            return BM_CUDA_ARG_FAIL(msg);
        }
    }
    if (ly.X) {
        if (!w.fc1 || !w.fc2) return BM_CUDA_ARG_FAIL("engine: a MLP layer lacks fc1/fc2");
        for (int e = 0; e < ly.X; e++)
            if (!w.fc1[e].data || !w.fc2[e].data) {
                snprintf(msg, sizeof msg, "engine: layer %lld lacks expert %d", (long long)li, e);
                return BM_CUDA_ARG_FAIL(msg);
            }
    }
    return 0;
}

int model_create(const bm_cuda_config *cfg, const bm_cuda_weights *w, bm_cuda_model *m) {
    TRY(check_cfg(cfg));
    m->cfg = *cfg;
    m->mamba_v.assign(cfg->mamba, cfg->mamba + cfg->num_layers);
    m->experts_v.assign(cfg->experts, cfg->experts + cfg->num_layers);
    m->cfg.mamba = m->mamba_v.data();
    m->cfg.experts = m->experts_v.data();
    m->G = cfg->swiglu ? 2 * cfg->F : cfg->F;
    m->Xmax = 1;
    for (int64_t i = 0; i < cfg->num_layers; i++) {
        m->Xmax = std::max<int64_t>(m->Xmax, cfg->experts[i]);
        m->has_parallel |= cfg->mamba[i] && cfg->experts[i];
        m->has_mlp |= cfg->experts[i] > 0;
    }
    m->has_gated_mlp = m->has_mlp && cfg->swiglu;
    m->layers.resize((size_t)cfg->num_layers);
    if (!w->emb.data || !w->final_w.data || !w->final_b.data || !w->layers)
        return BM_CUDA_ARG_FAIL("engine: emb, final_w, final_b and layers are required");
    for (int64_t li = 0; li < cfg->num_layers; li++) {
        m->layers[li].mamba = m->mamba_v[li];
        m->layers[li].X = m->experts_v[li];
        TRY(check_layer_weights(m, li, w->layers[li]));
    }

    l2_set_aside_apply();
    BM_CUDA_TRY(cudaStreamCreateWithFlags(&m->stream, cudaStreamNonBlocking));
    BM_CUDA_TRY(cudaStreamCreateWithFlags(&m->side, cudaStreamNonBlocking));
    BM_CUDA_TRY(cudaEventCreateWithFlags(&m->side_fork, cudaEventDisableTiming));
    BM_CUDA_TRY(cudaEventCreateWithFlags(&m->side_join, cudaEventDisableTiming));
    TRY(bm_cuda_cublas_create((void **)&m->blas));
    TRY(dev_alloc(&m->blas_ws, BLAS_WS_BYTES, "cuBLAS workspace"));

    Arena sizing{nullptr, 0};
    weights_layout(m, sizing);
    m->wbytes = sizing.off;
    TRY(dev_alloc((void **)&m->wbase, m->wbytes, "weights"));
    Arena a{m->wbase, 0};
    weights_layout(m, a);

    // Staging for dtype conversions: the largest single tensor in float32.
    const bm_cuda_config &c = m->cfg;
    int64_t big = std::max({c.V * c.d, 2 * c.E * c.d, (c.R + 2 * c.N) * c.E, c.E * c.R,
                            m->G * c.d, c.d * c.F, c.E * c.N});
    void *staging = nullptr;
    TRY(dev_alloc(&staging, (size_t)big * 4, "upload staging"));
    const bm_dtype wd = c.wdtype;
    const int64_t d = c.d, E = c.E, N = c.N, K = c.K, R = c.R, F = c.F, G = m->G;
    int st = 0;
#define UP(dst, dt, src, n) \
    if (!st) st = upload(m, (dst), (dt), (src), (n), staging)
    UP(m->emb, wd, w->emb, c.V * d);
    UP(m->final_w, BM_F32, w->final_w, d);
    UP(m->final_b, BM_F32, w->final_b, d);
    for (int64_t li = 0; li < c.num_layers && !st; li++) {
        const LayerDev &ly = m->layers[li];
        const bm_cuda_layer_weights &lw = w->layers[li];
        UP(ly.norm_w, BM_F32, lw.norm_w, d);
        if (ly.norm_moe_w) UP(ly.norm_moe_w, BM_F32, lw.norm_moe_w, d);
        if (ly.mamba) {
            UP(ly.in_w, wd, lw.in_w, 2 * E * d);
            if (ly.in_b) UP(ly.in_b, BM_F32, lw.in_b, 2 * E);
            UP(ly.conv_w, BM_F32, lw.conv_w, E * K);
            if (ly.conv_b) UP(ly.conv_b, BM_F32, lw.conv_b, E);
            UP(ly.x_w, wd, lw.x_w, (R + 2 * N) * E);
            UP(ly.dt_w, wd, lw.dt_w, E * R);
            if (ly.x_wf) UP(ly.x_wf, BM_F32, lw.x_w, (R + 2 * N) * E);
            if (ly.dt_wf) UP(ly.dt_wf, BM_F32, lw.dt_w, E * R);
            UP(ly.dt_b, BM_F32, lw.dt_b, E);
            UP(ly.A, BM_F32, lw.A, E * N);
            UP(ly.D, BM_F32, lw.D, E);
            UP(ly.out_w, wd, lw.out_w, d * E);
            if (ly.out_b) UP(ly.out_b, BM_F32, lw.out_b, d);
        }
        if (ly.X >= 2) {
            UP(ly.router_w, BM_F32, lw.router_w, ly.X * d);
            UP(ly.router_b, BM_F32, lw.router_b, ly.X);
        }
        for (int e = 0; e < ly.X; e++) {
            UP((char *)ly.fc1 + (size_t)(e * G * d) * wsize(m), wd, lw.fc1[e], G * d);
            UP((char *)ly.fc2 + (size_t)(e * d * F) * wsize(m), wd, lw.fc2[e], d * F);
        }
    }
#undef UP
    const cudaError_t e = cudaStreamSynchronize(m->stream);
    cudaFree(staging);
    if (st) return st;
    if (e != cudaSuccess) return bm_cuda_fail_cuda_(__FILE__, __LINE__, e);
    return 0;
}

int state_layout(const bm_cuda_model *m, bm_cuda_state *s, char *base) {
    const bm_cuda_config &c = m->cfg;
    Arena a{base, 0};
    s->conv.assign((size_t)c.num_layers, nullptr);
    s->ssm.assign((size_t)c.num_layers, nullptr);
    for (int64_t li = 0; li < c.num_layers; li++) {
        if (!m->mamba_v[li]) continue;
        s->conv[li] = a.take<float>(s->B * (c.K - 1) * c.E);
        s->ssm[li] = a.take<float>(s->B * c.E * c.N);
    }
    s->bytes = a.off;
    return 0;
}

int state_new(bm_cuda_model *m, int64_t B, bm_cuda_state **out) {
    *out = nullptr;
    if (B < 1) return BM_CUDA_ARG_FAIL("state: batch size must be >= 1");
    bm_cuda_state *s = new (std::nothrow) bm_cuda_state();
    if (!s) return BM_CUDA_ARG_FAIL("state: host allocation failed");
    s->B = B;
    s->serial = g_state_serial.fetch_add(1);
    try {
        state_layout(m, s, nullptr);
    } catch (...) {
        delete s;
        return BM_CUDA_ARG_FAIL("state: host allocation failed");
    }
    int st = dev_alloc((void **)&s->base, s->bytes, "recurrent state");
    if (st) {
        delete s;
        return st;
    }
    state_layout(m, s, s->base);
    *out = s;
    return 0;
}

size_t conv_row(const bm_cuda_model *m) { return (size_t)((m->cfg.K - 1) * m->cfg.E) * 4; }
size_t ssm_row(const bm_cuda_model *m) { return (size_t)(m->cfg.E * m->cfg.N) * 4; }

}  // namespace

// ---- public API ------------------------------------------------------------------------------

extern "C" long long bm_cuda_xproj_ksplit_calls(void) {
    return g_xproj_ksplit.load(std::memory_order_relaxed);
}

extern "C" long long bm_cuda_decode_stack_calls(void) {
    return g_stack.load(std::memory_order_relaxed);
}
// Layers run by mlp()'s path `path` (0 grouped.cu, 1 cuBLAS experts, 2 expert_all, 3 the
// gathered GEMV) so far in this process; counted at launch (a captured graph counts once).
extern "C" long long bm_cuda_mlp_path_calls(int path) {
    return path >= 0 && path < 4 ? g_mlp_path[path].load(std::memory_order_relaxed) : -1;
}
extern "C" long long bm_cuda_l2side_calls(void) {
    return g_l2side.load(std::memory_order_relaxed);
}
extern "C" long long bm_cuda_l2side_state_calls(void) {
    return g_l2side_state.load(std::memory_order_relaxed);
}

extern "C" long long bm_cuda_out_ksplit_calls(void) {
    return g_out_ksplit.load(std::memory_order_relaxed);
}

extern "C" long long bm_cuda_step_scan4_calls(void) {
    return g_scan4.load(std::memory_order_relaxed);
}

extern "C" long long bm_cuda_step_scan4_rows_calls(void) {
    return g_scan4_rows.load(std::memory_order_relaxed);
}

extern "C" long long bm_cuda_step_scan4_early_calls(void) {
    return g_scan4_early.load(std::memory_order_relaxed);
}

extern "C" long long bm_cuda_step_scan4_dt_calls(void) {
    return g_scan4_dt.load(std::memory_order_relaxed);
}

extern "C" long long bm_cuda_norm_route_dispatch_calls(void) {
    return g_nr_disp.load(std::memory_order_relaxed);
}

extern "C" long long bm_cuda_norm_route_warp_calls(void) {
    return g_nr_warp.load(std::memory_order_relaxed);
}

extern "C" long long bm_cuda_norm_route_pre_calls(void) {
    return g_nr_pre.load(std::memory_order_relaxed);
}
// Prefill Mamba layers whose x_proj and dt_proj ran on xdt.cu's kernels (xdt_fill_ok).
extern "C" long long bm_cuda_prefill_xdt_calls(void) {
    return g_xdt_fill.load(std::memory_order_relaxed);
}
// Prefill bf16 conversions done by the conv (0) and by x_proj's reduction (1) (fuse_bf_ok).
extern "C" long long bm_cuda_prefill_fuse_bf_calls(int which) {
    return which == 0 || which == 1 ? g_fuse_bf[which].load(std::memory_order_relaxed) : -1;
}
// Prefill x_proj batches of the hi and lo rows together (xproj_stack_ok).
extern "C" long long bm_cuda_prefill_stack_xproj_calls(void) {
    return g_xproj_stack.load(std::memory_order_relaxed);
}
// Prefill in_proj launches as one GEMM of the hi and lo rows (stack_in_fill_ok).
extern "C" long long bm_cuda_prefill_stack_in_calls(void) {
    return g_stack_in_fill.load(std::memory_order_relaxed);
}
// Prefill out_proj launches as one strided batch of the hi and lo rows (prefill_pair_ok).
extern "C" long long bm_cuda_prefill_out_pair_calls(void) {
    return g_out_pair_fill.load(std::memory_order_relaxed);
}
// Of those, one GEMM of the 2T stacked rows (prefill_out_one_on).
extern "C" long long bm_cuda_prefill_out_one_calls(void) {
    return g_out_one_fill.load(std::memory_order_relaxed);
}
// Prefill routings with the early router row (NR_PRE_ROW / NR_PRE_DISP; the block kernel
// of short prompts), and of those the ones that built the grouped dispatch in the last block.
extern "C" long long bm_cuda_norm_route_pre_prefill_calls(void) {
    return g_nr_pre_fill.load(std::memory_order_relaxed);
}
extern "C" long long bm_cuda_norm_route_dispatch_prefill_calls(void) {
    return g_nr_disp_fill.load(std::memory_order_relaxed);
}
extern "C" long long bm_cuda_norm_route_ids_calls(void) {
    return g_nr_ids.load(std::memory_order_relaxed);
}
extern "C" long long bm_cuda_norm_fc2_calls(void) {
    return g_norm_fc2.load(std::memory_order_relaxed);
}

extern "C" long long bm_cuda_small_tf32_calls(void) {
    return g_small_tf32.load(std::memory_order_relaxed);
}

// Launches of the early PDL decode kernels of `kind` (common.cuh, bm_pdl_early_counts) so far;
// -1 for an unknown kind.
extern "C" long long bm_cuda_pdl_early_launches(int kind) {
    if (kind < 0 || kind >= BM_EARLY_KINDS) return -1;
    return bm_pdl_early_counts()[kind].load(std::memory_order_relaxed);
}

extern "C" int bm_cuda_model_create(const bm_cuda_config *cfg, const bm_cuda_weights *w,
                                    bm_cuda_model **out) {
    *out = nullptr;
    bm_cuda_model *m = new (std::nothrow) bm_cuda_model();
    if (!m) return BM_CUDA_ARG_FAIL("engine: host allocation failed");
    int st;
    try {
        st = model_create(cfg, w, m);
    } catch (...) {
        st = BM_CUDA_ARG_FAIL("engine: host allocation failed");
    }
    if (st) {
        bm_cuda_model_free(m);
        return st;
    }
    *out = m;
    return 0;
}

extern "C" void bm_cuda_model_free(bm_cuda_model *m) {
    if (!m) return;
    if (m->stream) cudaStreamSynchronize(m->stream);
    pg_clear(m);
    for (bm_cuda_state *sh : m->pg_shadow) bm_cuda_state_free(sh);
    ws_free(m->pre);
    for (Ws *w : m->dec) ws_free(w);
    cudaFree(m->wf);
    cudaFree(m->wbase);
    cudaFree(m->blas_ws);
    if (m->blas) bm_cuda_cublas_destroy(m->blas);
    for (cudaEvent_t e : m->prof_ev) cudaEventDestroy(e);
    if (m->side) {
        cudaStreamSynchronize(m->side);
        cudaStreamDestroy(m->side);
    }
    if (m->side_fork) cudaEventDestroy(m->side_fork);
    if (m->side_join) cudaEventDestroy(m->side_join);
    if (m->stream) cudaStreamDestroy(m->stream);
    cudaGetLastError();  // frees at interpreter exit may find the runtime unloading
    delete m;
}

extern "C" long long bm_cuda_prefill_graph_captures(void) { return g_pg_captures.load(); }
extern "C" long long bm_cuda_decode_graph_captures(void) { return g_dg_captures.load(); }
extern "C" long long bm_cuda_prefill_graph_replays(void) { return g_pg_replays.load(); }

extern "C" long long bm_cuda_l2_set_aside(void) {
    size_t v = 0;
    if (cudaDeviceGetLimit(&v, cudaLimitPersistingL2CacheSize) != cudaSuccess) {
        cudaGetLastError();
        return -1;
    }
    return (long long)v;
}

extern "C" void bm_cuda_model_bytes(const bm_cuda_model *m, size_t *weights, size_t *workspaces,
                                    int *graphs) {
    size_t ws = m->pre ? m->pre->bytes : 0;
    int g = 0;
    for (const Ws *w : m->dec) {
        ws += w->bytes;
        g += (int)w->graphs.size();
    }
    for (const auto &pg : m->pg) g += pg.exec != nullptr;
    for (const bm_cuda_state *sh : m->pg_shadow) ws += sh->bytes;  // the prefill graphs' states
    if (m->wf) ws += (size_t)m->wf_elems * 4;
    if (weights) *weights = m->wbytes;
    if (workspaces) *workspaces = ws + BLAS_WS_BYTES;
    if (graphs) *graphs = g;
}

extern "C" int bm_cuda_model_prefill(bm_cuda_model *m, bm_cuda_state *s, const int32_t *ids,
                                     int ids_on_device, int64_t B, int64_t L, int logits_mode,
                                     float *logits, int logits_on_device,
                                     const bm_cuda_trace *trace) {
    if (!s || s->B != B) return BM_CUDA_ARG_FAIL("prefill: the state's batch size differs from B");
    if (B < 1 || L < 1) return BM_CUDA_ARG_FAIL("prefill: B and L must be >= 1");
    if (logits_mode < BM_CUDA_LOGITS_NONE || logits_mode > BM_CUDA_LOGITS_ALL)
        return BM_CUDA_ARG_FAIL("prefill: bad logits mode");
    if (logits_mode != BM_CUDA_LOGITS_NONE && !logits)
        return BM_CUDA_ARG_FAIL("prefill: logits output missing");
    const int64_t T = B * L, d = m->cfg.d;
    if (T > INT32_MAX) return BM_CUDA_ARG_FAIL("prefill: too many tokens");
    Ws *ws = nullptr;
    TRY(prefill_ws(m, T, &ws));
    ws->gv = prefill_gv(m, T);
    if (needs_wf(m, T)) TRY(ensure_wf(m));  // every product of this call has <= T rows
    cudaStream_t st = m->stream;
    BM_CUDA_TRY(cudaMemcpyAsync(ws->tok, ids, (size_t)T * 4,
                                ids_on_device ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice,
                                st));
    TRY(blas_prepare(m));
    TRY(mark(m, P_START));
    bool replayed = false;
    if (!trace && !m->prof_on) TRY(prefill_graph(m, ws, s, B, L, &replayed));
    if (!replayed) TRY(forward(m, ws, s, B, L, trace));
    if (logits_mode == BM_CUDA_LOGITS_ALL) {
        TRY(head(m, ws, ws->yf, T, logits, logits_on_device));
    } else if (logits_mode == BM_CUDA_LOGITS_LAST) {
        // The last row of each batch row into xn (free after the layer loop): (B, d).
        BM_CUDA_TRY(cudaMemcpy2DAsync(ws->xn, (size_t)d * 4, ws->yf + (L - 1) * d,
                                      (size_t)(L * d) * 4, (size_t)d * 4, (size_t)B,
                                      cudaMemcpyDeviceToDevice, st));
        TRY(head(m, ws, ws->xn, B, logits, logits_on_device));
    }
    BM_CUDA_TRY(cudaStreamSynchronize(st));
    BM_CUDA_LAUNCHED();
    return 0;
}

extern "C" int bm_cuda_model_step(bm_cuda_model *m, bm_cuda_state *s, const int32_t *tokens,
                                  int tokens_on_device, float *logits, int logits_on_device,
                                  int32_t *argmax, int use_graph, const bm_cuda_trace *trace) {
    if (!s) return BM_CUDA_ARG_FAIL("step: no state");
    const int64_t B = s->B, V = m->cfg.V;
    Ws *ws = nullptr;
    TRY(decode_ws(m, B, &ws));
    cudaStream_t st = m->stream;
    BM_CUDA_TRY(cudaMemcpyAsync(ws->tok, tokens, (size_t)B * 4,
                                tokens_on_device ? cudaMemcpyDeviceToDevice
                                                 : cudaMemcpyHostToDevice,
                                st));
    if (use_graph && !trace) {
        TRY(ensure_graph(m, ws, s));
        BM_CUDA_TRY(cudaGraphLaunch(ws->exec, st));
    } else {
        TRY(blas_prepare(m));
        if (needs_wf(m, B)) TRY(ensure_wf(m));
        TRY(decode_body(m, ws, s, trace));
    }
    if (argmax) {
        argmax_kernel<<<(unsigned)B, ARGMAX_THREADS, 0, st>>>(ws->logits, V,
                                                             (int)m->cfg.real_vocab, ws->amax);
        BM_CUDA_LAUNCHED();
        BM_CUDA_TRY(cudaMemcpyAsync(argmax, ws->amax, (size_t)B * 4, cudaMemcpyDeviceToHost, st));
    }
    if (logits)
        BM_CUDA_TRY(cudaMemcpyAsync(logits, ws->logits, (size_t)(B * V) * 4,
                                    logits_on_device ? cudaMemcpyDeviceToDevice
                                                     : cudaMemcpyDeviceToHost,
                                    st));
    BM_CUDA_TRY(cudaStreamSynchronize(st));
    BM_CUDA_LAUNCHED();
    return 0;
}

extern "C" int bm_cuda_model_greedy(bm_cuda_model *m, bm_cuda_state *s, const int32_t *tokens,
                                    int64_t n, int32_t *out) {
    if (!s) return BM_CUDA_ARG_FAIL("greedy: no state");
    if (n < 0) return BM_CUDA_ARG_FAIL("greedy: n must be >= 0");
    if (n == 0) return 0;
    const int64_t B = s->B, V = m->cfg.V;
    Ws *ws = nullptr;
    TRY(decode_ws(m, B, &ws));
    cudaStream_t st = m->stream;
    int32_t *hist = nullptr;  // (n, B) on the device
    TRY(dev_alloc((void **)&hist, (size_t)(n * B) * 4, "greedy token history"));
    int rc = 0;
    std::vector<int32_t> h;
    do {
        if ((rc = (int)cudaMemcpyAsync(ws->tok, tokens, (size_t)B * 4, cudaMemcpyHostToDevice,
                                       st))) {
            rc = bm_cuda_fail_cuda_(__FILE__, __LINE__, (cudaError_t)rc);
            break;
        }
        if ((rc = ensure_graph(m, ws, s))) break;
        for (int64_t k = 0; k < n && !rc; k++) {
            cudaError_t e = cudaGraphLaunch(ws->exec, st);
            // the argmax goes straight into the graph's token buffer: the next step's input
            if (e == cudaSuccess) {
                argmax_kernel<<<(unsigned)B, ARGMAX_THREADS, 0, st>>>(
                    ws->logits, V, (int)m->cfg.real_vocab, ws->tok);
                e = cudaGetLastError();
            }
            if (e == cudaSuccess)
                e = cudaMemcpyAsync(hist + k * B, ws->tok, (size_t)B * 4,
                                    cudaMemcpyDeviceToDevice, st);
            if (e != cudaSuccess) rc = bm_cuda_fail_cuda_(__FILE__, __LINE__, e);
        }
        if (rc) break;
        try {
            h.resize((size_t)(n * B));
        } catch (...) {
            rc = BM_CUDA_ARG_FAIL("greedy: host allocation failed");
            break;
        }
        cudaError_t e = cudaMemcpyAsync(h.data(), hist, (size_t)(n * B) * 4,
                                        cudaMemcpyDeviceToHost, st);
        if (e == cudaSuccess) e = cudaStreamSynchronize(st);
        if (e != cudaSuccess) rc = bm_cuda_fail_cuda_(__FILE__, __LINE__, e);
    } while (0);
    cudaStreamSynchronize(st);
    cudaFree(hist);
    if (rc) return rc;
    for (int64_t b = 0; b < B; b++)
        for (int64_t k = 0; k < n; k++) out[b * n + k] = h[(size_t)(k * B + b)];
    return 0;
}

// Sampled decoding: bm_cuda_model_greedy's loop with bm_cuda_sample (sample.cu) in place of
// the argmax; draw k uses counter step params->step + k, so a run is reproducible from the
// seed whatever the chunking of the calls.
extern "C" int bm_cuda_model_sample(bm_cuda_model *m, bm_cuda_state *s, const float *logits0,
                                    const int32_t *tokens, int64_t n,
                                    const bm_cuda_sampling *params, int32_t *out,
                                    int32_t *status) {
    if (!s) return BM_CUDA_ARG_FAIL("sample: no state");
    if (n < 0) return BM_CUDA_ARG_FAIL("sample: n must be >= 0");
    if (!params) return BM_CUDA_ARG_FAIL("sample: no sampling parameters");
    if (!logits0 && !tokens) return BM_CUDA_ARG_FAIL("sample: neither logits0 nor tokens");
    if (n == 0) return 0;
    const int64_t B = s->B, V = m->cfg.V;
    Ws *ws = nullptr;
    TRY(decode_ws(m, B, &ws));
    cudaStream_t st = m->stream;
    int32_t *hist = nullptr;  // (n, B) tokens, then (B) status, on the device
    TRY(dev_alloc((void **)&hist, (size_t)((n + 1) * B) * 4, "sample token history"));
    int32_t *dstat = hist + n * B;
    int rc = 0;
    std::vector<int32_t> h;
    do {
        cudaError_t e = cudaMemsetAsync(dstat, 0, (size_t)B * 4, st);
        // the first draw reads the graph's logits buffer (the graph overwrites it next step)
        if (e == cudaSuccess)
            e = logits0 ? cudaMemcpyAsync(ws->logits, logits0, (size_t)(B * V) * 4,
                                          cudaMemcpyHostToDevice, st)
                        : cudaMemcpyAsync(ws->tok, tokens, (size_t)B * 4,
                                          cudaMemcpyHostToDevice, st);
        if (e != cudaSuccess) {
            rc = bm_cuda_fail_cuda_(__FILE__, __LINE__, e);
            break;
        }
        if ((!logits0 || n > 1) && (rc = ensure_graph(m, ws, s))) break;
        for (int64_t k = 0; k < n && !rc; k++) {
            if (!logits0 || k > 0) e = cudaGraphLaunch(ws->exec, st);
            if (e != cudaSuccess) {
                rc = bm_cuda_fail_cuda_(__FILE__, __LINE__, e);
                break;
            }
            bm_cuda_sampling pk = *params;
            pk.step = params->step + k;
            // the token goes straight into the graph's token buffer: the next step's input
            if ((rc = bm_cuda_sample(ws->logits, B, V, m->cfg.real_vocab, &pk, ws->tok, dstat,
                                     nullptr, st)))
                break;
            e = cudaMemcpyAsync(hist + k * B, ws->tok, (size_t)B * 4, cudaMemcpyDeviceToDevice,
                                st);
            if (e != cudaSuccess) rc = bm_cuda_fail_cuda_(__FILE__, __LINE__, e);
        }
        if (rc) break;
        try {
            h.resize((size_t)((n + 1) * B));
        } catch (...) {
            rc = BM_CUDA_ARG_FAIL("sample: host allocation failed");
            break;
        }
        cudaError_t e2 = cudaMemcpyAsync(h.data(), hist, (size_t)((n + 1) * B) * 4,
                                         cudaMemcpyDeviceToHost, st);
        if (e2 == cudaSuccess) e2 = cudaStreamSynchronize(st);
        if (e2 != cudaSuccess) rc = bm_cuda_fail_cuda_(__FILE__, __LINE__, e2);
    } while (0);
    cudaStreamSynchronize(st);
    cudaFree(hist);
    if (rc) return rc;
    for (int64_t b = 0; b < B; b++)
        for (int64_t k = 0; k < n; k++) out[b * n + k] = h[(size_t)(k * B + b)];
    if (status)
        for (int64_t b = 0; b < B; b++) status[b] = h[(size_t)(n * B + b)];
    return 0;
}

extern "C" int bm_cuda_state_create(bm_cuda_model *m, int64_t B, bm_cuda_state **out) {
    TRY(state_new(m, B, out));
    bm_cuda_state *s = *out;
    cudaError_t e = cudaSuccess;
    if (s->bytes) e = cudaMemsetAsync(s->base, 0, s->bytes, m->stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(m->stream);
    if (e != cudaSuccess) {
        bm_cuda_state_free(s);
        *out = nullptr;
        return bm_cuda_fail_cuda_(__FILE__, __LINE__, e);
    }
    return 0;
}

extern "C" void bm_cuda_state_free(bm_cuda_state *s) {
    if (!s) return;
    cudaFree(s->base);  // synchronises the device: no graph still reads it
    cudaGetLastError();
    delete s;
}

extern "C" int64_t bm_cuda_state_batch(const bm_cuda_state *s) { return s->B; }

extern "C" int bm_cuda_state_copy(bm_cuda_model *m, const bm_cuda_state *src,
                                  const int64_t *rows, int64_t n, bm_cuda_state **out) {
    *out = nullptr;
    if (rows) {
        if (n < 1) return BM_CUDA_ARG_FAIL("state copy: no rows");
        for (int64_t i = 0; i < n; i++)
            if (rows[i] < 0 || rows[i] >= src->B)
                return BM_CUDA_ARG_FAIL("state copy: row outside the batch");
    }
    bm_cuda_state *s = nullptr;
    TRY(state_new(m, rows ? n : src->B, &s));
    cudaStream_t st = m->stream;
    cudaError_t e = cudaSuccess;
    if (!rows) {
        if (s->bytes)
            e = cudaMemcpyAsync(s->base, src->base, s->bytes, cudaMemcpyDeviceToDevice, st);
    } else {
        const size_t cr = conv_row(m), sr = ssm_row(m);
        for (size_t li = 0; li < s->conv.size() && e == cudaSuccess; li++) {
            if (!s->conv[li]) continue;
            for (int64_t i = 0; i < n && e == cudaSuccess; i++) {
                e = cudaMemcpyAsync((char *)s->conv[li] + i * cr,
                                    (const char *)src->conv[li] + rows[i] * cr, cr,
                                    cudaMemcpyDeviceToDevice, st);
                if (e == cudaSuccess)
                    e = cudaMemcpyAsync((char *)s->ssm[li] + i * sr,
                                        (const char *)src->ssm[li] + rows[i] * sr, sr,
                                        cudaMemcpyDeviceToDevice, st);
            }
        }
    }
    if (e == cudaSuccess) e = cudaStreamSynchronize(st);
    if (e != cudaSuccess) {
        bm_cuda_state_free(s);
        return bm_cuda_fail_cuda_(__FILE__, __LINE__, e);
    }
    *out = s;
    return 0;
}

extern "C" int bm_cuda_state_set_row(bm_cuda_model *m, bm_cuda_state *dst, int64_t i,
                                     const bm_cuda_state *src, int64_t j) {
    if (i < 0 || i >= dst->B || j < 0 || j >= src->B)
        return BM_CUDA_ARG_FAIL("state set_row: row outside the batch");
    if (dst->conv.size() != src->conv.size())
        return BM_CUDA_ARG_FAIL("state set_row: states of different models");
    const size_t cr = conv_row(m), sr = ssm_row(m);
    cudaStream_t st = m->stream;
    for (size_t li = 0; li < dst->conv.size(); li++) {
        if (!dst->conv[li]) continue;
        BM_CUDA_TRY(cudaMemcpyAsync((char *)dst->conv[li] + i * cr,
                                    (const char *)src->conv[li] + j * cr, cr,
                                    cudaMemcpyDeviceToDevice, st));
        BM_CUDA_TRY(cudaMemcpyAsync((char *)dst->ssm[li] + i * sr,
                                    (const char *)src->ssm[li] + j * sr, sr,
                                    cudaMemcpyDeviceToDevice, st));
    }
    BM_CUDA_TRY(cudaStreamSynchronize(st));
    return 0;
}

extern "C" int bm_cuda_state_io(bm_cuda_model *m, bm_cuda_state *s, int64_t layer, int which,
                                float *host, int to_device) {
    if (layer < 0 || layer >= (int64_t)s->conv.size() || !s->conv[layer])
        return BM_CUDA_ARG_FAIL("state io: not a Mamba layer");
    void *dev = which == 0 ? (void *)s->conv[layer] : (void *)s->ssm[layer];
    const size_t bytes = (size_t)s->B * (which == 0 ? conv_row(m) : ssm_row(m));
    cudaStream_t st = m->stream;
    if (to_device)
        BM_CUDA_TRY(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, st));
    else
        BM_CUDA_TRY(cudaMemcpyAsync(host, dev, bytes, cudaMemcpyDeviceToHost, st));
    BM_CUDA_TRY(cudaStreamSynchronize(st));
    return 0;
}

// ---- bench helpers that need the model's internals (bench.cu has the rest) -------------------

extern "C" int bm_cuda_bench_step(bm_cuda_model *m, bm_cuda_state *s, int warmup, int iters,
                                  float *ms) {
    if (iters < 1) return BM_CUDA_ARG_FAIL("bench_step: iters must be >= 1");
    Ws *ws = nullptr;
    TRY(decode_ws(m, s->B, &ws));
    TRY(ensure_graph(m, ws, s));
    cudaStream_t st = m->stream;
    for (int i = 0; i < warmup; i++) BM_CUDA_TRY(cudaGraphLaunch(ws->exec, st));
    std::vector<cudaEvent_t> ev((size_t)iters + 1, nullptr);
    int rc = 0;
    for (auto &e : ev)
        if (!rc && cudaEventCreate(&e) != cudaSuccess) rc = 1;  // reported below
    if (!rc) {
        cudaError_t e = cudaEventRecord(ev[0], st);
        for (int i = 0; i < iters && e == cudaSuccess; i++) {
            e = cudaGraphLaunch(ws->exec, st);
            if (e == cudaSuccess) e = cudaEventRecord(ev[(size_t)i + 1], st);
        }
        if (e == cudaSuccess) e = cudaStreamSynchronize(st);
        for (int i = 0; i < iters && e == cudaSuccess; i++)
            e = cudaEventElapsedTime(&ms[i], ev[(size_t)i], ev[(size_t)i + 1]);
        if (e != cudaSuccess) rc = bm_cuda_fail_cuda_(__FILE__, __LINE__, e);
    } else {
        rc = bm_cuda_fail_cuda_(__FILE__, __LINE__, cudaGetLastError());
    }
    for (auto e : ev)
        if (e) cudaEventDestroy(e);
    return rc;
}

extern "C" int bm_cuda_bench_prefill(bm_cuda_model *m, const int32_t *ids, int64_t B, int64_t L,
                                     int warmup, int iters, float *ms) {
    if (iters < 1) return BM_CUDA_ARG_FAIL("bench_prefill: iters must be >= 1");
    bm_cuda_state *s = nullptr;
    TRY(bm_cuda_state_create(m, B, &s));
    std::vector<float> logits;
    int rc = 0;
    try {
        logits.resize((size_t)(B * m->cfg.V));
    } catch (...) {
        rc = BM_CUDA_ARG_FAIL("bench_prefill: host allocation failed");
    }
    cudaEvent_t e0 = nullptr, e1 = nullptr;
    if (!rc && (cudaEventCreate(&e0) != cudaSuccess || cudaEventCreate(&e1) != cudaSuccess))
        rc = bm_cuda_fail_cuda_(__FILE__, __LINE__, cudaGetLastError());
    for (int i = 0; i < warmup + iters && !rc; i++) {
        cudaError_t e = cudaEventRecord(e0, m->stream);
        if (e == cudaSuccess) {
            rc = bm_cuda_model_prefill(m, s, ids, 0, B, L, BM_CUDA_LOGITS_LAST, logits.data(), 0,
                                       nullptr);
            if (rc) break;
            e = cudaEventRecord(e1, m->stream);
        }
        if (e == cudaSuccess) e = cudaEventSynchronize(e1);
        if (e == cudaSuccess && i >= warmup) e = cudaEventElapsedTime(&ms[i - warmup], e0, e1);
        if (e != cudaSuccess) rc = bm_cuda_fail_cuda_(__FILE__, __LINE__, e);
    }
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    bm_cuda_state_free(s);
    return rc;
}

// Where the time goes: ms per stage (P_* order; bm_cuda.h lists the names), the mean of
// iters - 1 runs after one warm-up. ids NULL: one decode step of s, through a graph captured
// with an event after every stage (the cached decode graph is left alone); else a prefill of
// ids (B, L) (host) with the events on the stream (host waits inside the prefill count).
extern "C" int bm_cuda_bench_profile(bm_cuda_model *m, bm_cuda_state *s, const int32_t *ids,
                                     int64_t L, int iters, double *ms) {
    if (iters < 2) return BM_CUDA_ARG_FAIL("bench_profile: iters must be >= 2");
    for (int k = 0; k < P_COUNT; k++) ms[k] = 0;
    const size_t cap = 64 + 16 * (size_t)m->cfg.num_layers;
    while (m->prof_ev.size() < cap) {
        cudaEvent_t e = nullptr;
        BM_CUDA_TRY(cudaEventCreate(&e));
        try {
            m->prof_ev.push_back(e);
        } catch (...) {
            cudaEventDestroy(e);
            return BM_CUDA_ARG_FAIL("bench_profile: host allocation failed");
        }
    }
    try {
        m->prof_kind.resize(cap);
    } catch (...) {
        return BM_CUDA_ARG_FAIL("bench_profile: host allocation failed");
    }
    cudaStream_t st = m->stream;
    cudaGraphExec_t exec = nullptr;
    Ws *ws = nullptr;
    std::vector<float> logits;
    if (!ids) {
        TRY(decode_ws(m, s->B, &ws));
        TRY(blas_prepare(m));
        if (needs_wf(m, s->B)) TRY(ensure_wf(m));
        BM_CUDA_TRY(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
        m->prof_on = m->prof_graph = true;
        m->prof_n = 0;
        int rc = mark(m, P_START);
        if (!rc) rc = decode_body(m, ws, s, nullptr);
        m->prof_on = m->prof_graph = false;
        cudaGraph_t g = nullptr;
        const cudaError_t e = cudaStreamEndCapture(st, &g);
        if (!rc && e != cudaSuccess) rc = bm_cuda_fail_cuda_(__FILE__, __LINE__, e);
        if (!rc) {
            const cudaError_t ei = cudaGraphInstantiate(&exec, g, 0);
            if (ei != cudaSuccess) rc = bm_cuda_fail_cuda_(__FILE__, __LINE__, ei);
        }
        if (g) cudaGraphDestroy(g);
        if (rc) return rc;
    } else {
        try {
            logits.resize((size_t)(s->B * m->cfg.V));
        } catch (...) {
            return BM_CUDA_ARG_FAIL("bench_profile: host allocation failed");
        }
    }
    int rc = 0;
    for (int it = 0; it < iters && !rc; it++) {
        if (!ids) {
            cudaError_t e = cudaGraphLaunch(exec, st);
            if (e == cudaSuccess) e = cudaStreamSynchronize(st);
            if (e != cudaSuccess) rc = bm_cuda_fail_cuda_(__FILE__, __LINE__, e);
        } else {
            m->prof_on = true;
            m->prof_n = 0;
            rc = bm_cuda_model_prefill(m, s, ids, 0, s->B, L, BM_CUDA_LOGITS_LAST, logits.data(), 0,
                                       nullptr);
            m->prof_on = false;
        }
        for (size_t i = 1; i < m->prof_n && !rc && it > 0; i++) {
            float t = 0.f;
            const cudaError_t e = cudaEventElapsedTime(&t, m->prof_ev[i - 1], m->prof_ev[i]);
            if (e != cudaSuccess) rc = bm_cuda_fail_cuda_(__FILE__, __LINE__, e);
            ms[m->prof_kind[i]] += t / (iters - 1);
        }
    }
    if (exec) cudaGraphExecDestroy(exec);
    return rc;
}
