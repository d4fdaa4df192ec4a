/* bm.h: the C core's whole interface. Plain C11, no Python.
 *
 * Dimension letters, used in every shape comment of the core:
 *   b batch, L sequence length, T tokens (= b*L, row-major (batch, position)),
 *   d hidden size, E d_inner (channels of the Mamba mixer), N SSM state size,
 *   K conv width, X experts, F ffn hidden size, M/Nout/Kin the generic matrix dims.
 * Layout is token-major everywhere: (b, L, channels), C-contiguous, float32 unless said.
 * Functions return a bm_status; they never exit or abort. Callers (csrc/module.c) validate
 * shapes and dtypes; inside, the data is trusted. Every function may be called from several
 * threads at once on different data; work inside is split with OpenMP.
 */
#ifndef BM_H
#define BM_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    BM_OK = 0,
    BM_ERR_ARG = 1,       /* invalid argument value (caller should have caught it) */
    BM_ERR_NOMEM = 2,     /* a scratch allocation failed */
    BM_ERR_INTERNAL = 3,
} bm_status;

const char *bm_status_str(bm_status s);

/* Activations of the expert / dense MLPs (SPEC 3). */
typedef enum { BM_ACT_GELU = 0, BM_ACT_GELU_TANH = 1, BM_ACT_SILU = 2, BM_ACT_NONE = 3 } bm_act;

/* Storage type of a weight matrix. Activations are always float32. BM_F16 (IEEE half) is
 * taken by the CUDA engine and its GEMV / expert kernels only; the CPU kernels return
 * BM_ERR_ARG for it. */
typedef enum { BM_F32 = 0, BM_BF16 = 1, BM_F16 = 2 } bm_dtype;

/* ---- cpu.c: features and threads ------------------------------------------------------- */
int bm_cpu_has_avx512(void);      /* avx512f + bw + vl + dq at run time */
int bm_cpu_has_avx512bf16(void);
int bm_cpu_has_avx2(void);        /* avx2 + fma at run time; the level below AVX-512 */
int bm_get_num_threads(void);
void bm_set_num_threads(int n);   /* OpenMP threads of our kernels; OpenBLAS runs 1 thread inside them */
/* Kernels parallelise with `#pragma omp parallel for num_threads(bm_get_num_threads())`. */

/* ---- gemm.c: matrix products (BLAS for fp32; bf16 weights streamed with fp32 accumulate) - */
/* y (M, Nout) = x (M, Kin) @ W^T + bias; W (Nout, Kin) stored as `wdtype` (bf16 = uint16
 * holding the top half of a float32). bias (Nout) float32 or NULL. M small -> GEMV path. */
bm_status bm_linear(const float *x, const void *W, bm_dtype wdtype, const float *bias,
                    float *y, int64_t M, int64_t Nout, int64_t Kin);
/* float32 <-> bfloat16 (round to nearest even; NaN stays NaN). */
void bm_bf16_to_f32(const uint16_t *src, float *dst, int64_t n);
void bm_f32_to_bf16(const float *src, uint16_t *dst, int64_t n);

/* ---- scan.c: Mamba-1 selective scan (SPEC 2) ------------------------------------------- */
/* u, delta, z, y: (b, L, E); A: (E, N) (= -exp(A_log)); Bm, Cm: (b, L, N);
 * D, delta_bias: (E) or NULL; z NULL -> no gate; state_in (b, E, N) or NULL for zeros;
 * state_out (b, E, N) receives the state after the last token (may equal state_in).
 * delta_softplus: delta <- softplus(delta + delta_bias) (softplus(v) = v for v > 20).
 * y = (sum_n h*C + D*u) * silu(z). */
bm_status bm_scan_forward(const float *u, const float *delta, const float *A, const float *Bm,
                          const float *Cm, const float *D, const float *z,
                          const float *delta_bias, int delta_softplus, const float *state_in,
                          float *state_out, float *y, int64_t b, int64_t L, int64_t E,
                          int64_t N);
/* One token for a batch: state (b, E, N) updated in place; x, delta, z, y: (b, E);
 * Bm, Cm: (b, N); other arguments as above. */
bm_status bm_scan_step(float *state, const float *x, const float *delta, const float *A,
                       const float *Bm, const float *Cm, const float *D, const float *z,
                       const float *delta_bias, int delta_softplus, float *y, int64_t b,
                       int64_t E, int64_t N);

/* ---- conv.c: causal depthwise conv1d (SPEC 2) ------------------------------------------ */
/* x, y: (b, L, E); w: (E, K); bias: (E) or NULL; conv_in (b, K-1, E): the K-1 inputs before
 * x[:, 0] in time order, or NULL for zeros; conv_out (b, K-1, E) receives the last K-1
 * inputs (from conv_in when L < K-1) or NULL. silu: apply SiLU to the output. */
bm_status bm_conv_forward(const float *x, const float *w, const float *bias,
                          const float *conv_in, float *conv_out, float *y, int silu, int64_t b,
                          int64_t L, int64_t E, int64_t K);
/* One token: x, y (b, E); conv_state (b, K-1, E) shifted in place. */
bm_status bm_conv_step(const float *x, float *conv_state, const float *w, const float *bias,
                       float *y, int silu, int64_t b, int64_t E, int64_t K);

/* ---- norm.c ---------------------------------------------------------------------------- */
/* res_out = x + residual (residual NULL -> x); out = RMSNorm(res_out) * w. All (T, d).
 * res_out may alias residual. */
bm_status bm_rms_norm(const float *x, const float *residual, const float *w, float eps,
                      float *out, float *res_out, int64_t T, int64_t d);
/* out = LayerNorm(x + residual) * w + bias; residual and bias may be NULL. (T, d). */
bm_status bm_layer_norm(const float *x, const float *residual, const float *w,
                        const float *bias, float eps, float *out, int64_t T, int64_t d);

/* ---- moe.c: top-1 routing and the expert path (SPEC 3) --------------------------------- */
/* logits (T, X) = x (T, d) @ rw (X, d)^T + rb (X); ids (T) argmax (ties -> lowest);
 * gates (T) = sigmoid(logits[t, ids[t]]). logits may be NULL (scratch used). */
bm_status bm_route_top1(const float *x, const float *rw, const float *rb, float *logits,
                        int32_t *ids, float *gates, int64_t T, int64_t d, int64_t X);
/* counts (X), offsets (X+1) exclusive prefix sums, perm (T): token indices grouped by
 * expert, in increasing token order inside each expert (stable). Returns BM_ERR_ARG if an
 * id is outside [0, X). */
bm_status bm_moe_dispatch(const int32_t *ids, int64_t T, int64_t X, int64_t *counts,
                          int64_t *offsets, int64_t *perm);
/* out (T, d) = gates[t] * fc2[e] @ (act(a[:F]) * a[F:]), a = fc1[e] @ x[t], e = ids[t];
 * fc1 (X, 2F, d), fc2 (X, d, F) stored as wdtype; gates NULL -> scale 1. Uses
 * bm_moe_dispatch internally and BLAS/bm_linear per expert on the gathered rows. */
bm_status bm_moe_experts(const float *x, const int32_t *ids, const float *gates,
                         const void *fc1, const void *fc2, bm_dtype wdtype, bm_act act,
                         float *out, int64_t T, int64_t d, int64_t X, int64_t F);
/* Dense gated MLP ("1" layers): out (T, d) = fc2 @ (act(a[:F]) * a[F:]), a = fc1 @ x;
 * fc1 (2F, d), fc2 (d, F). gated = 0: out = fc2 @ act(fc1 @ x) with fc1 (F, d). */
bm_status bm_mlp(const float *x, const void *fc1, const void *fc2, bm_dtype wdtype, bm_act act,
                 int gated, float *out, int64_t T, int64_t d, int64_t F);

/* ---- sinkhorn.c (SPEC 3.2) ------------------------------------------------------------- */
typedef enum { BM_SINKHORN_BLACKMAMBA = 0, BM_SINKHORN_UNIFORM = 1 } bm_sinkhorn_init;
/* P (T, X) = diag(d0) C diag(d1) after iterating to mean|d1 - d1_prev| <= tol or max_iters;
 * *iters receives the number of iterations run. BLACKMAMBA: C = exp(2 S), d1 = 1/(X colsum C);
 * UNIFORM (vanilla Megatron): C = exp(S), d1 = ones. Reference: blackmamba/ref.py sinkhorn. */
bm_status bm_sinkhorn(const float *S, float *P, int64_t T, int64_t X, float tol,
                      bm_sinkhorn_init init, int max_iters, int *iters);

#endif /* BM_H */
