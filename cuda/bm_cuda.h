/* bm_cuda.h: launchers of the CUDA kernels (the cuda/ sources). Plain C, no Python.
 *
 * Conventions (the same dimension letters and layouts as csrc/bm.h):
 *   - Every pointer is a DEVICE pointer, except where a comment says host.
 *   - Token-major layout: activations (b, L, channels) C-contiguous, float32; the SSM state
 *     is float32 (b, E, N); weights are float32 or bf16 bits (uint16) where a bm_dtype is
 *     taken, and IEEE half (BM_F16) where a comment says so (the engine, the GEMV, the MoE
 *     paths). Shapes are written next to every pointer.
 *   - Every launcher enqueues its work on `stream` and returns 0, or a nonzero status:
 *     a cudaError_t value (1..999) or one of BM_CUDA_ERR_* below. After a nonzero status,
 *     bm_cuda_last_error() gives "file:line: cudaErrorName: message" for the calling thread.
 *   - No launcher synchronises the stream, except bm_cuda_moe_experts on its cuBLAS path (it
 *     reads the per-expert token counts on the host; see there). Launchers allocate nothing: scratch space is a
 *     caller-owned workspace whose size a *_workspace() function gives.
 *   - Sizes of 0 enqueue nothing and return 0. Launchers are thread-safe (no mutable static
 *     state besides the thread-local error message and once-per-device shared-memory opt-ins)
 *     and, except bm_cuda_moe_experts, can be captured into a CUDA graph.
 *   - Arguments are trusted (the Python boundary validates them), except the few checks that
 *     return BM_CUDA_ERR_ARG (unsupported sizes, too small a workspace).
 */
#ifndef BM_CUDA_H
#define BM_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>   /* cudaStream_t */

#include "bm.h"                 /* bm_dtype, bm_act, bm_sinkhorn_init */

#ifdef __cplusplus
extern "C" {
#endif

enum {
    BM_CUDA_OK = 0,
    BM_CUDA_ERR_ARG = 10001,      /* unsupported size or argument, workspace too small */
    BM_CUDA_ERR_CUBLAS = 10002,   /* a cuBLAS call failed (its status is in the message) */
};

/* "file:line: cudaErrorName: message" of the last failure on this host thread ("" if none). */
const char *bm_cuda_last_error(void);

/* ---- common.cu ------------------------------------------------------------------------- */
/* cuBLAS handle for bm_cuda_moe_experts (opaque cublasHandle_t). Create once per host thread
 * (or guard it): a handle must not be used by two threads at once. */
int bm_cuda_cublas_create(void **handle);
int bm_cuda_cublas_destroy(void *handle);
/* bf16 bits <-> float32 on the device (round to nearest even, NaN kept NaN). (n) each. */
int bm_cuda_bf16_to_f32(const uint16_t *src, float *dst, int64_t n, cudaStream_t stream);
int bm_cuda_f32_to_bf16(const float *src, uint16_t *dst, int64_t n, cudaStream_t stream);
/* dst (n) = src (n) between the weight types (float32, bf16 bits, IEEE half): to float32
 * exactly, to bf16 / fp16 rounding to nearest even (fp16: a value beyond its range becomes
 * +-inf; the Python boundary rejects such weights first). sdt == ddt: a device copy. */
int bm_cuda_convert(const void *src, bm_dtype sdt, void *dst, bm_dtype ddt, int64_t n,
                    cudaStream_t stream);
/* src (n) -> hi = bf16(src), lo = bf16(src - hi) (n each): hi + lo keeps 16 significant bits,
 * the operand split of BM_CUDA_MATH_BF16X2. */
int bm_cuda_f32_to_bf16_split(const float *src, uint16_t *hi, uint16_t *lo, int64_t n,
                              cudaStream_t stream);

/* ---- scan.cu: Mamba-1 selective scan (SPEC 2), float32 state in registers --------------- */
/* u, delta, z, y: (b, L, E); A: (E, N) (= -exp(A_log)); Bm, Cm: (b, L, N);
 * D, delta_bias: (E) or NULL; z NULL -> no gate; state_in (b, E, N) or NULL for zeros;
 * state_out (b, E, N) (may equal state_in, may be NULL). delta_softplus: delta <-
 * softplus(delta + delta_bias). y = (sum_n h*C + D*u) * silu(z). 1 <= N <= 64. */
int bm_cuda_scan_forward(const float *u, const float *delta, const float *A, const float *Bm,
                         const float *Cm, const float *D, const float *z,
                         const float *delta_bias, int delta_softplus, const float *state_in,
                         float *state_out, float *y, int64_t b, int64_t L, int64_t E,
                         int64_t N, cudaStream_t stream);
/* The same with a chosen kernel, for benchmarks and tests: threads_per_channel 0 (auto), 1, 2
 * or 4 (each thread then owns N/threads_per_channel of a channel's states); variant -1
 * (default), 0 (step loop rolled), 1 (chunks of steps unrolled), 2 (per-(t, e) values packed
 * once per chunk), 3 (2 with one reciprocal for softplus and silu: the default where
 * threads_per_channel >= 2) or 4 (3 with one state exp in 16 on the FMA pipe; N = 16,
 * threads_per_channel 2 only, else 3). 2..4 fall back to 1 at threads_per_channel 1. */
int bm_cuda_scan_forward_variant(const float *u, const float *delta, const float *A,
                                 const float *Bm, const float *Cm, const float *D,
                                 const float *z, const float *delta_bias, int delta_softplus,
                                 const float *state_in, float *state_out, float *y, int64_t b,
                                 int64_t L, int64_t E, int64_t N, int threads_per_channel,
                                 int variant, cudaStream_t stream);
/* The same with the sequence-parallel option (cuda/scan.cu) and bf16 outputs: y may be NULL
 * when y_bf16 is given; y_bf16 (b, L, E) gets bf16(y), y_lo (or NULL) bf16(y - bf16(y)) (the
 * input of a bf16 GEMM, split or not). segments 0 (auto: used when the
 * grid is under about a wave, e.g. b <= 2 at E = 2944), 1 (off) or >= 2 (forced, at most one
 * segment per 16 steps); ws: scratch of ws_bytes (bm_cuda_scan_workspace(E, N) covers the
 * auto rule at any b, L; a forced S needs S * b * E * (N + 1) floats), or NULL to take it from
 * the stream-ordered pool. threads_per_channel and variant as above (segmented runs use
 * variant 1). bm_cuda_scan_forward is this with segments 0 and ws NULL. */
int bm_cuda_scan_forward_ws(const float *u, const float *delta, const float *A, const float *Bm,
                            const float *Cm, const float *D, const float *z,
                            const float *delta_bias, int delta_softplus, const float *state_in,
                            float *state_out, float *y, uint16_t *y_bf16, uint16_t *y_lo,
                            int64_t b, int64_t L, int64_t E, int64_t N, int threads_per_channel,
                            int variant, int segments, void *ws, size_t ws_bytes,
                            cudaStream_t stream);
/* bm_cuda_scan_forward with 16-bit activations: u, delta, z and y in act_dtype, 0 float32, 1
 * bf16 (uint16_t bits), 2 IEEE fp16; A, Bm, Cm, D, delta_bias and the states float32 in every
 * case. The 16-bit kernels widen the activations to float32 in shared memory and run the
 * packed one-pass variant (3) in one pass; y is rounded to nearest even. */
int bm_cuda_scan_forward_act(const void *u, const void *delta, const float *A, const float *Bm,
                             const float *Cm, const float *D, const void *z,
                             const float *delta_bias, int delta_softplus, const float *state_in,
                             float *state_out, void *y, int act_dtype, int64_t b, int64_t L,
                             int64_t E, int64_t N, cudaStream_t stream);
size_t bm_cuda_scan_workspace(int64_t E, int64_t N);
/* How many scans ran sequence-parallel in this process (tests check the path was taken). */
long long bm_cuda_scan_segmented_calls(void);
/* How many one-pass scans ran a packed variant (2..4, the default where TPC >= 2). */
long long bm_cuda_scan_packed_calls(void);
/* One token: state (b, E, N) updated in place; x, delta, z, y: (b, E); Bm, Cm: (b, N). */
int bm_cuda_scan_step(float *state, const float *x, const float *delta, const float *A,
                      const float *Bm, const float *Cm, const float *D, const float *z,
                      const float *delta_bias, int delta_softplus, float *y, int64_t b,
                      int64_t E, int64_t N, cudaStream_t stream);

/* ---- conv.cu: causal depthwise conv1d (SPEC 2), 2 <= K <= 8 ----------------------------- */
/* x, y: (b, L, E); w: (E, K); bias: (E) or NULL; conv_in (b, K-1, E) or NULL for zeros;
 * conv_out (b, K-1, E) or NULL receives the last K-1 inputs (may equal conv_in). */
int bm_cuda_conv_forward(const float *x, const float *w, const float *bias,
                         const float *conv_in, float *conv_out, float *y, int silu, int64_t b,
                         int64_t L, int64_t E, int64_t K, cudaStream_t stream);
/* bm_cuda_conv_forward on the sum of two parts (a split prefill's in_proj as one GEMM of 2T
 * rows, engine.cu): input x[t, e] = x[t ld + e] + x[part + t ld + e], and z[t, e] = zin[t ld +
 * e] + zin[part + t ld + e] written (b, L, E) for the scan; t over the b L rows in order.
 * ybf (and ylo) or NULL: y also as bf16 hi (and lo = bf16(y - hi)) parts, (b, L, E). */
int bm_cuda_conv_forward_sum(const float *x, const float *zin, int64_t ld, int64_t part,
                             float *z, const float *w, const float *bias, const float *conv_in,
                             float *conv_out, float *y, uint16_t *ybf, uint16_t *ylo, int silu,
                             int64_t b, int64_t L, int64_t E, int64_t K, cudaStream_t stream);
/* One token: x, y (b, E); conv_state (b, K-1, E) shifted in place. */
int bm_cuda_conv_step(const float *x, float *conv_state, const float *w, const float *bias,
                      float *y, int silu, int64_t b, int64_t E, int64_t K, cudaStream_t stream);
/* The same where x and z (b, E) are a batched decode's in_proj outputs without the RMSNorm's
 * row scale (bm_cuda_moe_norm_out): each row's s = rsqrt(sum(ssp[row, :parts]) / d + eps)
 * (the parts summed in a fixed order) multiplies x before the conv (the state keeps scaled
 * inputs) and z: z = zin * s (zin may be z). x and zin have row stride ld (>= E), z E.
 * b <= 65535. */
int bm_cuda_conv_step_norm(const float *x, const float *zin, int64_t ld, float *z,
                           float *conv_state, const float *w, const float *bias, float *y,
                           int silu, int64_t b, int64_t E, int64_t K, const float *ssp,
                           int64_t parts, int64_t d, float eps, cudaStream_t stream);
/* The conv step where x and z (b, E) are each the sum of two parts, the hi and lo products of
 * a split in_proj run as one GEMM of 2b rows: x[r] = x[r * ld] + x[r * ld + part] (and zin
 * likewise), the two added in fp32 as a GEMM's beta = 1 pass would; z = that sum (E stride),
 * no row scale. part >= (b - 1) * ld + E; b <= 65535. */
int bm_cuda_conv_step_sum(const float *x, const float *zin, int64_t ld, int64_t part, float *z,
                          float *conv_state, const float *w, const float *bias, float *y,
                          int silu, int64_t b, int64_t E, int64_t K, cudaStream_t stream);
/* Both: x and z the sums of two parts (bm_cuda_conv_step_sum), then the row scale from ssp
 * (bm_cuda_conv_step_norm): a split in_proj stacked on the rows that a split fc2's norm
 * epilogue left without the scale (bm_cuda_moe_norm_out::xlo). */
int bm_cuda_conv_step_sum_norm(const float *x, const float *zin, int64_t ld, int64_t part,
                               float *z, float *conv_state, const float *w, const float *bias,
                               float *y, int silu, int64_t b, int64_t E, int64_t K,
                               const float *ssp, int64_t parts, int64_t d, float eps,
                               cudaStream_t stream);

/* ---- norm.cu: one block per row, float32 ------------------------------------------------ */
/* res_out = x + residual (residual NULL -> x); out = RMSNorm(res_out) * w. All (T, d).
 * res_out may alias residual or x; res_out NULL -> not written. */
int bm_cuda_rms_norm(const float *x, const float *residual, const float *w, float eps,
                     float *out, float *res_out, int64_t T, int64_t d, cudaStream_t stream);
/* The same, and out also as bf16 bits in out_bf16 (T, d) (with out_lo: the low parts
 * bf16(out - bf16(out)) of a split product), the input of a bf16 GEMM (engine.cu). */
int bm_cuda_rms_norm_bf16(const float *x, const float *residual, const float *w, float eps,
                          float *out, float *res_out, uint16_t *out_bf16, uint16_t *out_lo,
                          int64_t T, int64_t d, cudaStream_t stream);
/* out = LayerNorm(x + residual) * w + bias; residual, bias may be NULL. (T, d). */
int bm_cuda_layer_norm(const float *x, const float *residual, const float *w,
                       const float *bias, float eps, float *out, int64_t T, int64_t d,
                       cudaStream_t stream);

/* ---- gemv.cu: y = W x for small M (decode) ---------------------------------------------- */
/* y (M, Nout) = x (M, Kin) @ W (Nout, Kin)^T + bias (Nout, or NULL); W float32, bf16 or fp16
 * (BM_F16), fp32 accumulate. Reads W once per 8 rows of x (once for M <= 8); meant for small M. */
int bm_cuda_gemv(const float *x, const void *W, bm_dtype wdtype, const float *bias, float *y,
                 int64_t M, int64_t Nout, int64_t Kin, cudaStream_t stream);
/* The same with a chosen K-split (warps sharing one row): 0 (auto), 1, 2, 4 or 8. For tests. */
int bm_cuda_gemv_ks(const float *x, const void *W, bm_dtype wdtype, const float *bias, float *y,
                    int64_t M, int64_t Nout, int64_t Kin, int ksplit, cudaStream_t stream);

/* ---- moe.cu: top-1 routing and the expert path (SPEC 3) --------------------------------- */
/* logits (T, X) = x (T, d) @ rw (X, d)^T (rw float32, bf16 or fp16) + rb (X) (rb may be NULL; logits may be NULL);
 * ids (T) argmax (ties -> lowest); gates (T) = sigmoid(logits[t, ids[t]]). X <= 256. */
int bm_cuda_route_top1(const float *x, const void *rw, bm_dtype wdtype, const float *rb,
                       float *logits, int32_t *ids, float *gates, int64_t T, int64_t d,
                       int64_t X, cudaStream_t stream);
/* counts (X), offsets (X+1) exclusive prefix sums, perm (T): token indices grouped by expert,
 * in increasing token order inside each expert (stable). One block (a counting sort).
 * int32 everywhere (bm.h's CPU version uses int64). ids outside [0, X) are counted nowhere
 * (perm then has offsets[X] < T valid entries). */
int bm_cuda_moe_dispatch(const int32_t *ids, int64_t T, int64_t X, int32_t *counts,
                         int32_t *offsets, int32_t *perm, cudaStream_t stream);
/* Calls of bm_cuda_moe_dispatch that ran the last-block form (BLACKMAMBA_MOE_DISPATCH_LAST=1,
 * read per call; dev/tests only: one ticket counter for the process, so no concurrent calls):
 * the code of the engine's fused routing + dispatch (cuda/moe_dispatch.cuh). */
long long bm_cuda_moe_dispatch_last_calls(void);

/* Math of the expert GEMMs (cuBLAS). */
enum {
    BM_CUDA_MATH_FP32 = 0,  /* exact float32 (bf16 weights expanded to fp32 per expert) */
    BM_CUDA_MATH_TF32 = 1,  /* tensor cores, tf32 inputs, fp32 accumulate (~3e-4 rel.) */
    BM_CUDA_MATH_BF16 = 2,  /* bf16 weights as stored, activations rounded to bf16, fp32
                               accumulate (~3e-3 rel.); float32 weights fall back to TF32 */
    BM_CUDA_MATH_BF16X2 = 3, /* bf16 weights as stored, activations split into bf16 hi + lo,
                               two bf16 GEMMs accumulating in fp32 (~1e-5 rel., twice the
                               tensor-core work of BF16); float32 weights fall back to TF32 */
};
/* Bytes of workspace bm_cuda_moe_experts needs. */
size_t bm_cuda_moe_experts_workspace(int64_t T, int64_t d, int64_t X, int64_t F,
                                     bm_dtype wdtype, int math);
/* Prefill path: out (T, d) = gates[t] * fc2[e] @ (act(a[:F]) * a[F:]), a = fc1[e] @ x[t],
 * e = ids[t]; fc1 (X, 2F, d), fc2 (X, d, F) stored as wdtype (fp16 weights: expanded to
 * float32 per expert as bf16 ones under FP32/TF32 math); gates (T) or NULL (scale 1).
 * Dispatch, gather, act and scatter run on the device; the expert GEMMs go through cuBLAS,
 * one pair per expert with tokens, so the X+1 offsets are copied to the host: this launcher
 * SYNCHRONISES `stream` once (after the dispatch). Except bf16 weights under BF16 or BF16X2
 * math where bm_cuda_moe_grouped_supported (and bm_cuda_moe_grouped_mode() != 0): then it
 * runs bm_cuda_moe_grouped in the same workspace, without cuBLAS and without a sync. cublas_handle from bm_cuda_cublas_create
 * (its stream is set to `stream`). Dense "1" layers: X = 1, ids all 0, gates NULL. */
int bm_cuda_moe_experts(const float *x, const int32_t *ids, const float *gates,
                        const void *fc1, const void *fc2, bm_dtype wdtype, bm_act act, int math,
                        float *out, int64_t T, int64_t d, int64_t X, int64_t F,
                        void *workspace, size_t workspace_bytes, void *cublas_handle,
                        cudaStream_t stream);
/* Bytes of workspace bm_cuda_moe_experts_decode needs: T * 2F floats. */
size_t bm_cuda_moe_decode_workspace(int64_t T, int64_t F);
/* Decode path, no host synchronisation: the same math through a gathered GEMV that reads
 * each used expert's weights once (fp32 accumulate); meant for small T (decode batches).
 * Arguments as bm_cuda_moe_experts. */
int bm_cuda_moe_experts_decode(const float *x, const int32_t *ids, const float *gates,
                               const void *fc1, const void *fc2, bm_dtype wdtype, bm_act act,
                               float *out, int64_t T, int64_t d, int64_t X, int64_t F,
                               void *workspace, size_t workspace_bytes, cudaStream_t stream);

/* ---- grouped.cu: the expert MLPs as two grouped bf16 GEMMs, no host synchronisation ----- */
/* BLACKMAMBA_MOE_GROUPED, read at every call: unset or "1" -> 1 (bm_cuda_moe_experts and the
 * engine's decode of more than 8 rows use bm_cuda_moe_grouped where it is supported), "0" -> 0
 * (the cuBLAS paths, for A/B measurements), "force" -> 2 (as 1, but an unsupported case
 * fails instead of falling back: tests assert the path so). */
int bm_cuda_moe_grouped_mode(void);
/* Nonzero if bm_cuda_moe_grouped takes these arguments: bf16 weights, d % 8 == 0,
 * F % 8 == 0, 1 <= X <= 256, x, fc1, fc2 16-byte aligned, out 8-byte aligned. */
int bm_cuda_moe_grouped_supported(const float *x, const void *fc1, const void *fc2,
                                  bm_dtype wdtype, const float *out, int64_t d, int64_t X,
                                  int64_t F);
/* Bytes of workspace bm_cuda_moe_grouped needs (split: the low parts too). */
size_t bm_cuda_moe_grouped_workspace(int64_t T, int64_t d, int64_t X, int64_t F, int split);
/* GEMMs run on grouped.cu's decode kernel (grouped_dec_kernel) so far, and on its wgmma
 * core: the tests assert the paths. */
long long bm_cuda_moe_grouped_dec_launches(void);
long long bm_cuda_moe_grouped_wgmma_launches(void);
/* bm_cuda_moe_experts's math for bf16 weights (fc1 (X, 2F, d), fc2 (X, d, F) bf16 bits) under
 * BM_CUDA_MATH_BF16 (split 0: x and the hidden rounded to bf16) or BF16X2 (split 1: both
 * split into bf16 hi + lo, two MMAs per weight fragment), fp32 accumulate: dispatch, x to
 * bf16, then fc1 (+ the gated act) and fc2 (+ the gate, written to the token's row) as
 * grouped GEMMs whose expert offsets stay on the device. Does not synchronise; capturable.
 * Rows of tokens whose id is outside [0, X) are zero. Fails (BM_CUDA_ERR_ARG) where
 * bm_cuda_moe_grouped_supported is 0. */
int bm_cuda_moe_grouped(const float *x, const int32_t *ids, const float *gates,
                        const void *fc1, const void *fc2, bm_act act, int split, float *out,
                        int64_t T, int64_t d, int64_t X, int64_t F, void *workspace,
                        size_t workspace_bytes, cudaStream_t stream);
/* The same with x already as bf16 bits xb (T, d) (and, when split, its low parts xl): no
 * conversion pass (engine.cu: the norm that produced x wrote them). Every id must be in
 * [0, X) (the conversion pass is also what zeroes the rows of unrouted tokens). */
int bm_cuda_moe_grouped_bf16(const float *x, const uint16_t *xb, const uint16_t *xl,
                             const int32_t *ids, const float *gates, const void *fc1,
                             const void *fc2, bm_act act, int split, float *out, int64_t T,
                             int64_t d, int64_t X, int64_t F, void *workspace,
                             size_t workspace_bytes, cudaStream_t stream);
/* bm_cuda_moe_grouped_bf16 with flags (the engine's batched decode, session 6 moe64):
 * BM_MOE_GROUPED_DISPATCHED: perm and offsets are already in the workspace (where
 * bm_cuda_moe_grouped_dispatch_bufs says; engine.cu's routing kernel builds them), so no
 * dispatch launch; BM_MOE_GROUPED_PDL: the decode-size GEMMs launched with programmatic
 * dependent launch (each waits before reading what the kernel before wrote);
 * BM_MOE_GROUPED_PDL_EARLY (implies PDL): fc2 also requests its first weight stages before
 * its wait; BM_MOE_GROUPED_PDL_EXPERT (implies PDL): fc1 runs one CTA row per expert, which
 * requests its first weight stages before its wait (on the mma.sync tiles, not the decode
 * kernel's variants 6..9). Large (prefill) sizes ignore the PDL flags. */
enum { BM_MOE_GROUPED_DISPATCHED = 1, BM_MOE_GROUPED_PDL = 2, BM_MOE_GROUPED_PDL_EARLY = 4,
       BM_MOE_GROUPED_PDL_EXPERT = 8,
       /* with a PDL flag: fc2 launched plainly all the same (the PDL forms of fc1 alone) */
       BM_MOE_GROUPED_FC2_PLAIN = 16,
       /* fc2 launched with PDL: its dynamic shared memory padded so that at most
        * ceil(CTAs / SMs) of its CTAs fit an SM (they gather where fc1's leave first) */
       BM_MOE_GROUPED_FC2_CAP = 32,
       /* the routing from ids alone: no perm / offsets built or read where both GEMMs run on
        * the decode tiles that derive them per CTA (bm_cuda_moe_grouped_ids_ok: unsplit, at
        * most 256 tokens and 64 experts, the default tile choice); elsewhere the dispatch is
        * launched as without the flag. Overrides BM_MOE_GROUPED_DISPATCHED where taken. */
       BM_MOE_GROUPED_IDS = 64,
       /* a prefill's call (session 24): the plain-launch tile defaults and TMA threshold
        * (grouped.cu plain_tile) even with PDL flags, and no evict_first weight loads */
       BM_MOE_GROUPED_PREFILL = 128 };
int bm_cuda_moe_grouped_bf16_ex(const float *x, const uint16_t *xb, const uint16_t *xl,
                                const int32_t *ids, const float *gates, const void *fc1,
                                const void *fc2, bm_act act, int split, float *out, int64_t T,
                                int64_t d, int64_t X, int64_t F, void *workspace,
                                size_t workspace_bytes, int flags, cudaStream_t stream);
/* The same with the next Mamba layer's RMSNorm in fc2's epilogue (batched decode; the
 * engine's BLACKMAMBA_DECODE_NORM_FC2): instead of writing out, fc2 adds g * fc2(..) to the
 * residual res (T, d) in place, writes xbf (T, d) = bf16(res * w), in_proj's input without
 * the row scale, and ssp (T, bm_cuda_moe_norm_parts(d)) the sums of res^2 over each 32
 * columns; the row scale rsqrt(sum(ssp row) / d + eps) is applied after in_proj
 * (bm_cuda_conv_step_norm). Only where bm_cuda_moe_grouped_norm_ok; every id in [0, X)
 * (the rows of tokens routed nowhere are not written). A split call (the decode fc2 of
 * grouped_dec_kernel) also writes xlo (T, d), the low parts of res * w (bf16 hi + lo, as the
 * split products take them; required there, NULL otherwise). */
typedef struct {
    float *res;
    const float *w;
    uint16_t *xbf;
    float *ssp;
    uint16_t *xlo;
} bm_cuda_moe_norm_out;
int bm_cuda_moe_grouped_bf16_norm(const float *x, const uint16_t *xb, const uint16_t *xl,
                                  const int32_t *ids, const float *gates, const void *fc1,
                                  const void *fc2, bm_act act, int split, float *out, int64_t T,
                                  int64_t d, int64_t X, int64_t F, void *workspace,
                                  size_t workspace_bytes, int flags,
                                  const bm_cuda_moe_norm_out *norm, cudaStream_t stream);
int64_t bm_cuda_moe_norm_parts(int64_t d);
/* Whether a call of these sizes can take the norm epilogue (fc2 on the unsplit decode tiles of
 * grouped_gemm_kernel, or split on grouped_dec_kernel's). */
int bm_cuda_moe_grouped_norm_ok(int64_t T, int64_t X, int split);
long long bm_cuda_moe_grouped_norm_calls(void);
void bm_cuda_moe_grouped_dispatch_bufs(void *workspace, int64_t T, int64_t d, int64_t X,
                                       int64_t F, int split, int32_t **perm, int32_t **offsets);
long long bm_cuda_moe_grouped_pdl_launches(void);
long long bm_cuda_moe_grouped_plain_tile_calls(void);  // GEMMs on the plain-launch tile defaults
/* ... of them fc1 in the one-row-per-expert form (BM_MOE_GROUPED_PDL_EXPERT). */
long long bm_cuda_moe_grouped_expert_launches(void);
/* Calls that took BM_MOE_GROUPED_IDS, and whether a call of these sizes would. */
long long bm_cuda_moe_grouped_ids_calls(void);
/* Grouped calls whose decode tiles load the weights as evict_first L2 lines (BLACKMAMBA_MOE_WPOL). */
long long bm_cuda_moe_grouped_wpol_calls(void);
int bm_cuda_moe_grouped_ids_ok(int64_t T, int64_t X, int split);

/* ---- sinkhorn.cu (SPEC 3.2): one block, all iterations in one launch -------------------- */
/* P (T, X) = diag(d0) C diag(d1) after iterating to mean|d1 - d1_prev| <= tol or max_iters
 * (sums in float64); iters (1 int, device) receives the number of iterations. X <= 64.
 * C lives in shared memory when T*X*4 bytes fit (T*X <= 50000), else in P itself. */
int bm_cuda_sinkhorn(const float *S, float *P, int64_t T, int64_t X, float tol,
                     bm_sinkhorn_init init, int max_iters, int *iters, cudaStream_t stream);

/* ---- gemm.cu: y = x W^T + bias for any M (the GPU ops.linear) --------------------------- */
/* Rows of x up to which bm_cuda_linear takes the GEMV (no cuBLAS handle, no workspace). */
int bm_cuda_linear_gemv_rows(bm_dtype wdtype, int math);
/* Bytes of workspace bm_cuda_linear needs (0 on the GEMV path). */
size_t bm_cuda_linear_workspace(int64_t M, int64_t Nout, int64_t Kin, bm_dtype wdtype, int math);
/* y (M, Nout) = x (M, Kin) @ W (Nout, Kin)^T + bias (Nout, or NULL); W float32, bf16 or fp16.
 * math: BM_CUDA_MATH_FP32 (exact float32; bf16 / fp16 W expanded in the workspace), TF32, BF16
 * (bf16 W as stored, x rounded to bf16; float32 and fp16 W fall back to TF32) or BF16X2 (x
 * split into bf16 hi + lo, two GEMMs; float32 and fp16 W fall back to TF32). M up to
 * bm_cuda_linear_gemv_rows: bm_cuda_gemv (fp32 accumulate, whatever `math`); beyond: cuBLAS
 * through cublas_handle (its stream is set to `stream`). Kin = 0 gives y = bias (or 0). */
int bm_cuda_linear(const float *x, const void *W, bm_dtype wdtype, const float *bias, float *y,
                   int64_t M, int64_t Nout, int64_t Kin, int math, void *workspace,
                   size_t workspace_bytes, void *cublas_handle, cudaStream_t stream);

/* ---- util.cu: helpers of the Python bindings -------------------------------------------- */
/* out (n) int32 = ids (n, int32 or int64 as ids_bits), -1 where outside [0, X);
 * n_bad (1 int, device) = how many were outside (zeroed here first). */
int bm_cuda_ids_to_i32(const void *ids, int ids_bits, int64_t n, int64_t X, int32_t *out,
                       int32_t *n_bad, cudaStream_t stream);
/* dst (n) int64 = src (n) int32. */
int bm_cuda_i32_to_i64(const int32_t *src, int64_t *dst, int64_t n, cudaStream_t stream);

/* ---- sample.cu: the next token on the device (greedy, temperature, top-k, top-p) ---------- */
/* Per-row status bits (|= into status[row]; bits 8..15 = the path taken, see sample.cu). */
enum { BM_CUDA_SAMPLE_NAN = 1,      /* a logit among ids < vocab_limit is NaN */
       BM_CUDA_SAMPLE_NEG_INF = 2   /* every logit among ids < vocab_limit is -inf */ };
typedef struct {
    float temperature;   /* finite, >= 0; 0 = greedy (argmax, ties -> lowest id) */
    int64_t top_k;       /* 0 = off; k >= 1 keeps the logits >= the k-th largest */
    double top_p;        /* (0, 1]; 1 = off */
    uint64_t seed;       /* Philox4x32-10 key */
    int64_t step;        /* counter words 0-1: which draw of the stream */
    int row_streams;     /* 1: row r draws at counter word 2 = r; 0: every row at 0 */
    int path;            /* 0 = auto; tests: | 1 forces the generic (radix search) path,
                            | 2 the uncached kernel (global-memory reads), | 4 one block a
                            row at every batch (no cluster kernel) */
} bm_cuda_sampling;
/* tokens (B) int32 = one draw per row of logits (B, V) among ids < vocab_limit, with the
 * semantics of blackmamba/generation.py sample_probs + sample_next_u (sample.cu says how).
 * status (B) or NULL: error bits |= BM_CUDA_SAMPLE_* (the row's token is then 0), bits 8..15
 * the path, bit 16 set when the row was cached in shared memory, bit 17 when it ran on the
 * cluster kernel; u_out (B) or NULL: each row's uniform. Up to 16 rows (of up to 98,304 ids,
 * on compute capability 9+): a cluster of 8 blocks a row; else one block per row. No
 * workspace; capturable once called outside a capture
 * (the first call per device raises the kernel's shared-memory cap). A bad argument returns
 * BM_CUDA_ERR_ARG naming it. */
int bm_cuda_sample(const float *logits, int64_t B, int64_t V, int64_t vocab_limit,
                   const bm_cuda_sampling *params, int32_t *tokens, int32_t *status,
                   double *u_out, cudaStream_t stream);

/* ---- engine.cu: the whole model on the GPU (SPEC 1) -------------------------------------
 * Weights live in one device allocation handed out as pointers; matrices (embedding, in/x/
 * dt/out projections, expert fc1/fc2) in the model's wdtype, everything else float32 (norms,
 * biases, conv, A = -exp(A_log), D, router). Residual stream, activations and the recurrent
 * state are float32. One stream and one cuBLAS handle per model: a model must not be used by
 * two host threads at once (the Python wrapper holds a lock).
 * Decode (bm_cuda_model_step) is captured into a CUDA graph per batch size the first time it
 * runs for a state and replayed afterwards; prefill runs eagerly (its MoE layers synchronise
 * the host once each, see bm_cuda_moe_experts). Errors: a nonzero status as above; a failed
 * cudaMalloc returns cudaErrorMemoryAllocation (2) with the byte count in the message. */
typedef struct bm_cuda_model bm_cuda_model;  /* opaque */
typedef struct bm_cuda_state bm_cuda_state;  /* opaque: per Mamba layer conv (B, K-1, E) and
                                                ssm (B, E, N), float32, on the device */

typedef struct {
    int64_t num_layers, d, E, N, K, R, F, V;
    int64_t real_vocab;      /* argmax (greedy) looks at ids < real_vocab only */
    const int *mamba;        /* host (num_layers): 1 if the layer has a Mamba mixer */
    const int *experts;      /* host (num_layers): 0 none, 1 dense MLP, 2..256 MoE experts */
    int conv_bias;           /* conv1d.bias present */
    int bias;                /* in_proj.bias and out_proj.bias present */
    int swiglu;              /* gated MLP: fc1 (2F, d), act(a[:F]) * a[F:]; else fc1 (F, d) */
    bm_act act;
    bm_dtype wdtype;         /* storage of the matrices on the device: BM_F32, BM_BF16 or
                                BM_F16 (IEEE half: products in fp32 as bf16 weights under
                                FP32/TF32 math; BF16/BF16X2 math then act as TF32) */
    int math;                /* BM_CUDA_MATH_*: GEMMs of more than 8 rows (see engine.cu) */
    int64_t bf16_split_rows; /* under BM_CUDA_MATH_BF16, prefill products (and MoE layers) of
                                at most this many rows (tokens) run as BF16X2: 0 = the default
                                (BM_CUDA_BF16_SPLIT_ROWS), negative = never */
} bm_cuda_config;
#define BM_CUDA_BF16_SPLIT_ROWS 128

/* A HOST array: float32, bf16 bits (uint16) or IEEE half (BM_F16); converted on the device
 * where needed (to fp16 with round to nearest even: out-of-range values become inf, so the
 * caller checks them first, as model_cuda.py does). */
typedef struct { const void *data; bm_dtype dtype; } bm_cuda_host_tensor;

typedef struct {                       /* any field of a part the layer lacks: data NULL */
    bm_cuda_host_tensor norm_w;        /* (d) */
    bm_cuda_host_tensor norm_moe_w;    /* (d), parallel "rX" layers only */
    bm_cuda_host_tensor in_w, in_b;    /* (2E, d), (2E) or NULL */
    bm_cuda_host_tensor conv_w, conv_b;  /* (E, K), (E) or NULL */
    bm_cuda_host_tensor x_w;           /* (R + 2N, E) */
    bm_cuda_host_tensor dt_w, dt_b;    /* (E, R), (E) */
    bm_cuda_host_tensor A, D;          /* (E, N) = -exp(A_log) float32, (E) */
    bm_cuda_host_tensor out_w, out_b;  /* (d, E), (d) or NULL */
    bm_cuda_host_tensor router_w, router_b;  /* (X, d), (X); MoE only */
    const bm_cuda_host_tensor *fc1;    /* host (X): each (G, d), G = swiglu ? 2F : F */
    const bm_cuda_host_tensor *fc2;    /* host (X): each (d, F) */
} bm_cuda_layer_weights;

typedef struct {
    bm_cuda_host_tensor emb;           /* (V, d): embedding and tied LM head */
    bm_cuda_host_tensor final_w, final_b;  /* (d), (d) */
    const bm_cuda_layer_weights *layers;   /* host (num_layers) */
} bm_cuda_weights;

/* Per-MoE-layer routing of one call, copied to HOST arrays (tracing). Entries of layers
 * without a router are NULL. logits[l] (T, X), ids[l] (T), gates[l] (T); T = B*L. */
typedef struct { float **logits; int32_t **ids; float **gates; } bm_cuda_trace;

enum { BM_CUDA_LOGITS_NONE = 0, BM_CUDA_LOGITS_LAST = 1, BM_CUDA_LOGITS_ALL = 2 };

/* How many x_proj products ran K-split (engine.cu x_proj; tests check the path was taken). */
long long bm_cuda_xproj_ksplit_calls(void);
// x_proj / dt_proj products run in tf32 on float32 weight copies (engine.cu tf32_small()).
long long bm_cuda_small_tf32_calls(void);
/* Launches of the early PDL decode kernels of one kind (0 batch-1 GEMV, 1 fc2 rows, 2 step
 * scan, 3 norm + route, 4 RMSNorm; cuda/common.cuh bm_pdl_early); -1 for another kind. */
long long bm_cuda_pdl_early_launches(int kind);
/* Batched-decode out_proj products run as two K halves summed by the routing kernel
 * (BLACKMAMBA_OUT_KSPLIT). */
long long bm_cuda_out_ksplit_calls(void);
/* Split decode products run as one GEMM of 2B rows (engine.cu stack_on), counted at launch
 * (graph capture): in_proj and out_proj each count one. */
long long bm_cuda_decode_stack_calls(void);
/* Layers run by the engine's MLP path `path` (0 grouped.cu, 1 cuBLAS experts, 2 every token on
 * every expert, 3 the gathered GEMV), counted at launch; -1 for another path. */
long long bm_cuda_mlp_path_calls(int path);
/* Batched-decode L2 staging launches: the next MoE layer's first fc1 bytes brought into L2
 * from a side branch of the graph (BLACKMAMBA_L2SIDE). */
long long bm_cuda_l2side_calls(void);
/* ... of them that also stage the Mamba layer's SSM state first (BLACKMAMBA_L2SIDE_STATE). */
long long bm_cuda_l2side_state_calls(void);
/* Multiprocessors of the current device, or -1 (util.cu). */
int bm_cuda_sm_count(void);
/* Batched decode steps through the float4 scan step (engine.cu step_scan4_kernel). */
long long bm_cuda_step_scan4_calls(void);
/* ... of them with more than one batch row a lane (BLACKMAMBA_SCAN4_ROWS). */
long long bm_cuda_step_scan4_rows_calls(void);
/* ... of them in the early PDL form (BLACKMAMBA_SCAN4_EARLY: step_scan4_early_kernel) */
long long bm_cuda_step_scan4_early_calls(void);
/* ... of them computing delta themselves (no dt_proj GEMM; BLACKMAMBA_SCAN4_DT). */
long long bm_cuda_step_scan4_dt_calls(void);
/* Batch-1 in_proj launches that carried the Mamba RMSNorm (gemv.cu, GemvParams::norm_h). */
long long bm_cuda_gemv1_norm_calls(void);
/* Batch-1 LM-head-sized GEMVs through the one-wave row-walking kernel (gemv.cu). */
long long bm_cuda_gemv_head_calls(void);
/* Batched decode MoE norms through norm_route_pre_kernel (engine.cu). */
long long bm_cuda_norm_route_pre_calls(void);
long long bm_cuda_norm_route_warp_calls(void);  /* prefill norm+route launches, a warp per token (BLACKMAMBA_NORM_ROUTE_WARP) */
/* Prefill norm+route launches of the block kernel with the router row loaded before the wait
 * (short prompts), and of those the ones that built the grouped experts' dispatch. */
long long bm_cuda_norm_route_pre_prefill_calls(void);
long long bm_cuda_norm_route_dispatch_prefill_calls(void);
/* Prefill out_proj launches as one strided batch of the split hi and lo rows, summed by the
 * next routing kernel (engine.cu prefill_pair_ok, BLACKMAMBA_PREFILL_STACK_OUT). */
long long bm_cuda_prefill_out_pair_calls(void);
long long bm_cuda_prefill_out_one_calls(void);  // of those, one GEMM of the 2T stacked rows
/* Prefill in_proj launches as one GEMM of the split hi and lo rows, summed by the conv
 * (engine.cu stack_in_fill_ok, BLACKMAMBA_PREFILL_STACK_IN). */
long long bm_cuda_prefill_stack_in_calls(void);
/* Prefill x_proj batches of the split hi and lo rows together (engine.cu xproj_stack_ok,
 * BLACKMAMBA_PREFILL_STACK_XPROJ). */
long long bm_cuda_prefill_stack_xproj_calls(void);
/* Prefill bf16 conversions done by the conv (which = 0: x_proj's input) and by x_proj's
 * K-split reduction (1: dt_proj's input) instead of a launch (BLACKMAMBA_PREFILL_FUSE_BF). */
long long bm_cuda_prefill_fuse_bf_calls(int which);
/* Prefill Mamba layers whose x_proj and dt_proj ran on xdt.cu's fp32 kernels (2..128 tokens
 * under bf16 math; engine.cu xdt_fill_ok, BLACKMAMBA_PREFILL_XDT). */
long long bm_cuda_prefill_xdt_calls(void);
long long bm_cuda_norm_route_ids_calls(void);  /* ... whose GEMMs read the ids (BM_MOE_GROUPED_IDS) */
long long bm_cuda_norm_fc2_calls(void);  /* Mamba layers whose norm ran in the MoE fc2 before (BLACKMAMBA_DECODE_NORM_FC2) */
/* Launches of cuda/xdt.cu's batched-decode x_proj (kind 0) and dt_proj (kind 1) kernels;
 * -1 for another kind. */
long long bm_cuda_xdt_launches(int kind);
/* xdt.cu's two products on device arrays, synchronising `stream` (tests): dbc (M, R + 2N) =
 * xc (M, E) @ x_w^T, delta (M, E) = dbc[:, :R] @ dt_w^T, float32 everywhere. BM_CUDA_ERR_ARG
 * where the kernels do not support the shape, alignment or device. */
int bm_cuda_xdt_products(const float *xc, const float *x_w, const float *dt_w, float *dbc,
                         float *delta, int64_t M, int64_t E, int64_t R, int64_t N, void *stream);
/* norm_route_kernel launches that also built the grouped experts' dispatch (the last block;
 * BLACKMAMBA_MOE_ROUTE_DISPATCH), counted at launch (graph capture). */
long long bm_cuda_norm_route_dispatch_calls(void);
/* Uploads the weights (synchronously; the host arrays may be freed on return). */
int bm_cuda_model_create(const bm_cuda_config *cfg, const bm_cuda_weights *w,
                         bm_cuda_model **out);
void bm_cuda_model_free(bm_cuda_model *m);
/* The current device's persisting-L2 set-aside in bytes (cudaLimitPersistingL2CacheSize;
 * model creation sets it: BLACKMAMBA_L2_SET_ASIDE), -1 where it cannot be read. */
long long bm_cuda_l2_set_aside(void);
/* Device bytes held: weights, and workspaces (prefill + every decode batch size + the prefill
 * graphs' shadow states); graphs: the decode graphs and the prefill graphs kept. */
void bm_cuda_model_bytes(const bm_cuda_model *m, size_t *weights, size_t *workspaces,
                         int *graphs);

/* Run ids (B, L) from `s` (advanced in place). ids: int32, host (ids_on_device 0) or device.
 * logits: (B, L, V) for ALL, (B, V) for LAST, unused for NONE; host or device memory.
 * trace: NULL, or host arrays receiving the routing of each MoE layer (T = B*L). */
int bm_cuda_model_prefill(bm_cuda_model *m, bm_cuda_state *s, const int32_t *ids,
                          int ids_on_device, int64_t B, int64_t L, int logits_mode,
                          float *logits, int logits_on_device, const bm_cuda_trace *trace);
/* One token per row: tokens (B) int32 (host or device); logits (B, V) (host or device) or
 * NULL; argmax (B) host int32 or NULL (greedy over ids < real_vocab, ties -> lowest).
 * use_graph: replay the decode graph of this batch size (captured when missing, or when it was
 * captured for another state). A trace forces the eager path. */
int bm_cuda_model_step(bm_cuda_model *m, bm_cuda_state *s, const int32_t *tokens,
                       int tokens_on_device, float *logits, int logits_on_device,
                       int32_t *argmax, int use_graph, const bm_cuda_trace *trace);
/* Greedy decoding on the device: feed tokens (B) (host), then n-1 more steps each fed the
 * argmax of the previous one; out (B, n) host receives the n argmaxes (no host round trip
 * per token: graph replay, device argmax, device copy into the graph's token buffer). */
int bm_cuda_model_greedy(bm_cuda_model *m, bm_cuda_state *s, const int32_t *tokens, int64_t n,
                         int32_t *out);
/* Sampled decoding on the device (bm_cuda_sample after each graph replay; no host round trip
 * per token). logits0 (B, V) host or NULL: the first of the n tokens is drawn from it (and
 * the state advances n - 1 steps); else tokens (B) host are fed first (n steps). Draw k uses
 * counter step = params->step + k. out (B, n) host; status (B) host or NULL: the OR of the
 * rows' BM_CUDA_SAMPLE_* bits over the n draws (bits 8..15: the last draw's path). */
int bm_cuda_model_sample(bm_cuda_model *m, bm_cuda_state *s, const float *logits0,
                         const int32_t *tokens, int64_t n, const bm_cuda_sampling *params,
                         int32_t *out, int32_t *status);

/* States. create: zeros. copy: rows (host, n of them, each < src batch) or NULL for all. */
int bm_cuda_state_create(bm_cuda_model *m, int64_t B, bm_cuda_state **out);
void bm_cuda_state_free(bm_cuda_state *s);
int64_t bm_cuda_state_batch(const bm_cuda_state *s);
int bm_cuda_state_copy(bm_cuda_model *m, const bm_cuda_state *src, const int64_t *rows,
                       int64_t n, bm_cuda_state **out);
/* Row i of dst <- row j of src. */
int bm_cuda_state_set_row(bm_cuda_model *m, bm_cuda_state *dst, int64_t i,
                          const bm_cuda_state *src, int64_t j);
/* One layer's conv (which 0: (B, K-1, E)) or ssm (which 1: (B, E, N)) to / from HOST. */
int bm_cuda_state_io(bm_cuda_model *m, bm_cuda_state *s, int64_t layer, int which,
                     float *host, int to_device);

/* ---- bench.cu: ceilings and timings with CUDA events (benchmarks/bench_gpu.py) --------- */
/* Device-to-device copy of `bytes`, median over iters: GB/s counting read + write. */
int bm_cuda_bench_copy(size_t bytes, int iters, double *gbps);
/* bf16 GEMM (m, n, k) through cuBLAS, fp32 accumulate, random data: median TFLOP/s. */
int bm_cuda_bench_gemm_bf16(int64_t m, int64_t n, int64_t k, int iters, double *tflops);
/* ms of each of `iters` decode-graph replays of one step for state s (after `warmup`). */
int bm_cuda_bench_step(bm_cuda_model *m, bm_cuda_state *s, int warmup, int iters, float *ms);
/* ms of each of `iters` prefills of ids (B, L) (host) from a zero state, logits LAST. */
int bm_cuda_bench_prefill(bm_cuda_model *m, const int32_t *ids, int64_t B, int64_t L,
                          int warmup, int iters, float *ms);
/* Prefill graphs (engine.cu prefill_graph) captured / replayed so far. */
long long bm_cuda_prefill_graph_captures(void);
long long bm_cuda_prefill_graph_replays(void);
/* Decode graphs (engine.cu ensure_graph: one a state and switch values) captured so far. */
long long bm_cuda_decode_graph_captures(void);
/* Time per stage, ms, mean of iters - 1 runs after a warm-up: ids NULL -> one decode step of
 * s (a graph captured with an event after every stage); else a prefill of ids (B, L) (host,
 * B = the state's batch; host waits count). ms has BM_CUDA_PROF_STAGES entries in the order
 * of BM_CUDA_PROF_NAMES. */
#define BM_CUDA_PROF_STAGES 14
#define BM_CUDA_PROF_NAMES "start", "embed", "norm", "in_proj", "conv", "x_proj", "dt_proj", \
    "scan", "out_proj", "route", "experts", "add", "final_norm", "head"
int bm_cuda_bench_profile(bm_cuda_model *m, bm_cuda_state *s, const int32_t *ids, int64_t L,
                          int iters, double *ms);

#ifdef __cplusplus
}
#endif

#endif /* BM_CUDA_H */
