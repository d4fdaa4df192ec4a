// common.cuh: what every cuda/*.cu file shares: error checking that returns a status (never
// exits), bf16 conversion, warp/block reductions, fast exp2. Included by the .cu files only.
#pragma once

#include <stdint.h>
#include <stdlib.h>

#include <atomic>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cublas_v2.h>

#include "bm_cuda.h"

// Records "file:line: name: message" in the calling thread's error buffer; returns `code`.
int bm_cuda_fail_(const char *file, int line, int code, const char *name, const char *msg);

/* A cuBLAS call whose failure returns BM_CUDA_ERR_CUBLAS with the status name and text. */
#define BM_CUBLAS_TRY(call)                                                                \
    do {                                                                                   \
        cublasStatus_t s_ = (call);                                                        \
        if (s_ != CUBLAS_STATUS_SUCCESS)                                                   \
            return bm_cuda_fail_(__FILE__, __LINE__, BM_CUDA_ERR_CUBLAS,                   \
                                 cublasGetStatusName(s_), cublasGetStatusString(s_));     \
    } while (0)

static inline int bm_cuda_fail_cuda_(const char *file, int line, cudaError_t e) {
    return bm_cuda_fail_(file, line, (int)e, cudaGetErrorName(e), cudaGetErrorString(e));
}

// Return the status of a failing CUDA runtime call from the enclosing launcher.
#define BM_CUDA_TRY(call)                                                        \
    do {                                                                         \
        cudaError_t e_ = (call);                                                 \
        if (e_ != cudaSuccess) return bm_cuda_fail_cuda_(__FILE__, __LINE__, e_); \
    } while (0)

// After every <<<...>>>: launch-configuration errors (and earlier sticky faults) show here.
#define BM_CUDA_LAUNCHED() BM_CUDA_TRY(cudaGetLastError())

#define BM_CUDA_ARG_FAIL(msg) bm_cuda_fail_(__FILE__, __LINE__, BM_CUDA_ERR_ARG, "BM_CUDA_ERR_ARG", msg)

static inline int64_t bm_cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// An on/off switch from the environment (the BLACKMAMBA_* A/B switches): a value starting
// with '0' turns it off, with '1' on; unset, empty or anything else gives dflt.
static inline bool bm_env_switch(const char *name, bool dflt) {
    const char *e = getenv(name);
    if (e && e[0] == '0') return false;
    if (e && e[0] == '1') return true;
    return dflt;
}

// A whole-number setting from the environment (the BLACKMAMBA_* sizes and modes): the value
// when the variable is a decimal number (nothing after it) in [lo, hi]; unset, empty,
// anything else or out of range gives dflt.
static inline long bm_env_long(const char *name, long lo, long hi, long dflt) {
    const char *e = getenv(name);
    if (!e || !*e) return dflt;
    char *end = nullptr;
    const long v = strtol(e, &end, 10);
    return *end || v < lo || v > hi ? dflt : v;
}

// Multiprocessors of the current device into *sms; returns 0 or, as BM_CUDA_TRY, the failing
// CUDA status (recorded). The one SM-count query of the launchers (one-wave rules, grid caps).
static inline int bm_sm_count(int *sms) {
    int dev = 0;
    BM_CUDA_TRY(cudaGetDevice(&dev));
    BM_CUDA_TRY(cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, dev));
    return 0;
}

// Raise `kernel`'s dynamic shared-memory cap to `bytes` once per device (bit d of `done`), never
// lowering it (bm_pdl_spread_smem may have raised it further for a launch a captured graph
// still holds). Once, not per call: cudaFuncSetAttribute is not a stream operation, and
// launchers must stay capturable into CUDA graphs. Concurrent first calls just set it twice.
template <typename K>
static inline int bm_smem_optin(K kernel, int bytes, std::atomic<unsigned> &done) {
    int dev = 0;
    BM_CUDA_TRY(cudaGetDevice(&dev));
    const unsigned bit = 1u << (dev & 31);
    if (done.load(std::memory_order_acquire) & bit) return 0;
    cudaFuncAttributes fa;
    BM_CUDA_TRY(cudaFuncGetAttributes(&fa, kernel));
    if (bytes > fa.maxDynamicSharedSizeBytes)
        BM_CUDA_TRY(
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    done.fetch_or(bit, std::memory_order_release);
    return 0;
}

// cudaLaunchKernelEx with the launch attributes the engine uses: programmatic stream
// serialization (pdl; see bm_launch_pdl) and, cluster_x > 1, thread-block clusters of
// cluster_x CTAs along x (spread: ask the scheduler to put a cluster's CTAs on distinct SMs).
// One place that builds the launch configuration for bm_launch_pdl, the grouped decode GEMMs
// (grouped.cu launch_grouped) and the x_proj / dt_proj kernels (xdt.cu).
template <typename... KArgs, typename... Args>
static inline cudaError_t bm_launch_ex(void (*kernel)(KArgs...), dim3 grid, dim3 block,
                                       size_t smem, cudaStream_t stream, bool pdl,
                                       unsigned cluster_x, bool spread, Args... args) {
    cudaLaunchAttribute attr[3];
    unsigned n = 0;
    if (cluster_x > 1) {
        attr[n].id = cudaLaunchAttributeClusterDimension;
        attr[n].val.clusterDim.x = cluster_x;
        attr[n].val.clusterDim.y = 1;
        attr[n].val.clusterDim.z = 1;
        n++;
        if (spread) {
            attr[n].id = cudaLaunchAttributeClusterSchedulingPolicyPreference;
            attr[n].val.clusterSchedulingPolicyPreference = cudaClusterSchedulingPolicySpread;
            n++;
        }
    }
    if (pdl) {
        attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[n].val.programmaticStreamSerializationAllowed = 1;
        n++;
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = n;
    return cudaLaunchKernelEx(&cfg, kernel, ((KArgs)args)...);
}

// May a launch carry the programmatic-stream-serialization attribute here? A device of
// compute capability 9.0 or more, and BLACKMAMBA_CUDA_PDL not "0" (it turns PDL off
// everywhere: A/B measurements, or a driver that misbehaves). The one test of both, asked by
// every launcher that sets the attribute (bm_launch_pdl, grouped.cu, xdt.cu). False on errors.
static inline bool bm_pdl_allowed() {
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
        return false;
    return major >= 9 && bm_env_switch("BLACKMAMBA_CUDA_PDL", true);
}

// A grid launched with PDL takes SM slots as the kernel before it frees them, so its blocks
// gather on the SMs that free first (as many as their resources allow) instead of spreading
// over all of them as a plain launch does (cuda/NOTES.md, session 6 moe64 and session 25).
// Padding the dynamic shared memory caps them at ceil(blocks / SMs) an SM (of 220 KB, the
// kernel's static shared memory included): *smem is raised to that where it is more than
// asked for, and the kernel's dynamic cap with it where that is lower (only ever raised: a
// captured graph's launch of a larger pad stays valid after a smaller one). Returns 0 or, as
// BM_CUDA_TRY, the failing CUDA status (recorded). The grouped decode GEMMs' fc2 cap and the
// prefill scan's.
template <typename K>
static inline int bm_pdl_spread_smem(K kernel, dim3 grid, int *smem) {
    int sms = 0;
    const int st = bm_sm_count(&sms);
    if (st) return st;
    const int64_t per = bm_cdiv((int64_t)grid.x * grid.y * grid.z, sms > 0 ? sms : 1);
    cudaFuncAttributes fa;
    BM_CUDA_TRY(cudaFuncGetAttributes(&fa, kernel));
    const int pad =
        (int)((220 * 1024 / (per > 0 ? per : 1) - (int64_t)fa.sharedSizeBytes) & ~(int64_t)127);
    if (pad > *smem) {
        if (pad > fa.maxDynamicSharedSizeBytes)
            BM_CUDA_TRY(
                cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, pad));
        *smem = pad;
    }
    return 0;
}

// Programmatic dependent launch (Hopper): a kernel launched through bm_launch_pdl may start
// while the kernel before it in the stream is still finishing, which removes most of the
// launch gap between the ~160 small kernels of a batch-1 decode graph. Such a kernel must call
// bm_pdl_wait() first, before touching memory: griddepcontrol.wait returns once the previous
// grid has completed and its writes are visible, so the stream order is kept (and, every PDL
// kernel waiting, transitively). On a kernel launched normally the wait is a no-op.
// Returns a cudaError_t like a launch; where bm_pdl_allowed() says no, the attribute is off.
// spread: where the attribute is set, the blocks spread over the SMs (bm_pdl_spread_smem).
template <typename... KArgs, typename... Args>
static inline cudaError_t bm_launch_pdl_spread(bool spread, void (*kernel)(KArgs...), dim3 grid,
                                               dim3 block, size_t smem, cudaStream_t stream,
                                               Args... args) {
    int sms = 0;
    int st = bm_sm_count(&sms);
    if (st) return (cudaError_t)st;
    // Only for grids of at most one full wave (8 blocks per SM): the decode kernels. A large
    // grid (a prefill norm of 16,384 blocks) scheduled early would wait on the SMs behind a
    // GEMM (cuda/NOTES.md, gpuperf run 2).
    const bool small = (int64_t)grid.x * grid.y * grid.z <= 8 * (int64_t)sms;
    const bool pdl = small && bm_pdl_allowed();
    int sm = (int)smem;
    if (pdl && spread && (st = bm_pdl_spread_smem(kernel, grid, &sm))) return (cudaError_t)st;
    return bm_launch_ex(kernel, grid, block, (size_t)sm, stream, pdl, 1, false, args...);
}
template <typename... KArgs, typename... Args>
static inline cudaError_t bm_launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block,
                                        size_t smem, cudaStream_t stream, Args... args) {
    return bm_launch_pdl_spread(false, kernel, grid, block, smem, stream, args...);
}

// The early form of the decode kernels (BLACKMAMBA_CUDA_PDL_EARLY, default on; "0" turns it
// off, for A/B measurements): the kernel calls bm_pdl_trigger() as its first statement, loads
// what no kernel of the graph writes (weights; its own layer's recurrent state, written by
// itself one step before) and only then bm_pdl_wait_only(). Read at launch, i.e. at capture.
static inline bool bm_pdl_early() { return bm_env_switch("BLACKMAMBA_CUDA_PDL_EARLY", true); }

// Launches of the early kernels so far, by kind (tests assert the path was taken; counted at
// launch, so a captured graph counts once): 0 gemv1_kernel, 1 expert_rows_early_kernel,
// 2 step_scan_kernel<.., EARLY>, 3 norm_route_kernel<., NR_EARLY>, 4 rms_norm_kernel<.., EARLY>.
// Not static: one set for the whole library (vague linkage).
enum { BM_EARLY_GEMV1, BM_EARLY_ROWS, BM_EARLY_SCAN, BM_EARLY_NORM_ROUTE, BM_EARLY_RMS_NORM,
       BM_EARLY_KINDS };
inline std::atomic<long long> *bm_pdl_early_counts() {
    static std::atomic<long long> c[BM_EARLY_KINDS];
    return c;
}
static inline void bm_pdl_early_count(int kind) {
    bm_pdl_early_counts()[kind].fetch_add(1, std::memory_order_relaxed);
}

// The prefill's conv and selective scan launched through bm_launch_pdl (session 24), at every
// length since session 25. Both call bm_pdl_wait_only() first: no early trigger, so the kernel
// after them starts as their blocks exit, not parked beside them. The scan pads its shared
// memory so that its blocks spread over the SMs (bm_pdl_spread_smem; without that, 128 tokens
// lost +3.3%: its blocks gathered beside dt_proj's and took ~26 against ~12 us). Same process,
// H200, 2.8B shape, b = 1, against plain launches (cuda/NOTES.md session 25): 8 / 32 / 64 /
// 128 / 256 / 512 / 1024 / 2048 tokens -3.7 / -3.2 / -3.6 / -2.5 / -2.5 / -1.9 / -1.3 / -0.4%,
// b = 8 x 2048 -0.3%. BLACKMAMBA_CONV_SCAN_PDL: "0" plain launches (A/B, tests). Read per launch.
static inline bool bm_conv_scan_pdl() { return bm_env_switch("BLACKMAMBA_CONV_SCAN_PDL", true); }
// pdl false: a plain launch; else bm_launch_pdl_spread's (spread: the scan's blocks).
template <typename... KArgs, typename... Args>
static inline cudaError_t bm_launch_maybe_pdl(bool pdl, bool spread, void (*kernel)(KArgs...),
                                              dim3 grid, dim3 block, size_t smem,
                                              cudaStream_t stream, Args... args) {
    if (pdl) return bm_launch_pdl_spread(spread, kernel, grid, block, smem, stream, args...);
    return bm_launch_ex(kernel, grid, block, smem, stream, false, 1, false, args...);
}

// Launch `kernel` through bm_launch_pdl and return its status from the enclosing launcher.
#define BM_LAUNCH_PDL(kernel, grid, block, smem, stream, ...) \
    BM_CUDA_TRY(bm_launch_pdl(kernel, grid, block, smem, stream, __VA_ARGS__))

// ---- device helpers ----------------------------------------------------------------------

// First statement of every kernel launched through bm_launch_pdl (see there). After the wait,
// the kernel lets the next one be scheduled: its blocks only take free slots and wait in turn.
__device__ __forceinline__ void bm_pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// This SM's L1 invalidated (CCTL.IVALL). ptxas emits that instruction for an acquire load at
// gpu scope (so that later weak loads see what the releasing side wrote); from a shared
// variable the load itself is one LDS. griddepcontrol.wait compiles to ACQBULK alone, with no
// L1 invalidation (checked in the SASS, nvcc 13.0).
__device__ __forceinline__ void bm_l1_invalidate() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
    __shared__ int bm_l1_dummy;
    int v;
    asm volatile("ld.acquire.gpu.shared.b32 %0, [%1];"
                 : "=r"(v) : "r"((unsigned)__cvta_generic_to_shared(&bm_l1_dummy)) : "memory");
    asm volatile("" ::"r"(v));
#endif
}

// The halves of bm_pdl_wait, for the early decode kernels (bm_pdl_early). Triggering first
// lets the next kernel's blocks take free SM slots (and issue their own weight loads) while
// this one waits, and so on down the stream as far as slots allow. Stream order is still
// kept: every kernel waits before it reads activations or writes anything, and a kernel only
// completes after its own wait returned (its predecessor completed, and so on back).
// What this costs, and how it is paid (cuda/NOTES.md "Session 4, pdl1"):
//  - before its wait a kernel may run next to ANY earlier kernel still in flight, so a
//    pre-wait read must not touch anything the graph writes in this step (weights, and a
//    layer's own recurrent state; fc2's expert ids are the one argued exception);
//  - a kernel resident early shares its SM's L1 with earlier kernels that may read a buffer
//    this one reads after a later kernel rewrote it (in_proj and fc1 both read the normed
//    row): stale L1 lines. Hence the L1 invalidation after the wait where a kernel then reads
//    activations through L1 (bm_l1_invalidate_block; bm_pdl_wait_b1 for the wait-first
//    kernels that may follow an early one); the norms read theirs from L2 (__ldcg) instead;
//  - ptxas does not order ld.global.nc (__ldg, const __restrict__ loads) against
//    griddepcontrol.wait: it hoisted a post-wait activation load above it and sank pre-wait
//    weight loads below it (SASS of the first version). So in these kernels both the
//    early weight loads and the activation loads are plain ld.global.ca (__ldca) or .cg
//    (__ldcg), which it keeps on their side of the wait.
__device__ __forceinline__ void bm_pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// The wait alone (the early kernels: their trigger came first).
__device__ __forceinline__ void bm_pdl_wait_only() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// After the wait: this SM's L1 invalidated once for the block (thread 0, then a barrier that
// every thread of the block must reach), where the block then reads activations through L1.
// One invalidation per block, not per warp: each one also drops the lines that the other
// warps on the SM are reading (the first version invalidated per thread; the batch-1 LM head,
// 50K warps each re-reading its x from L2, went 54 -> 64 us).
__device__ __forceinline__ void bm_l1_invalidate_block() {
    if (threadIdx.x == 0) bm_l1_invalidate();
    __syncthreads();
}
// bm_pdl_wait, then bm_l1_invalidate_block(): the wait-first decode kernels that may run
// behind an early one (their batch-1 variants; larger batches keep bm_pdl_wait).
__device__ __forceinline__ void bm_pdl_wait_b1() {
    bm_pdl_wait();
    bm_l1_invalidate_block();
}

// bf16 bits -> float32: the top half of the float.
__device__ __forceinline__ float bm_bf16_bits_to_f32(uint16_t h) {
    return __uint_as_float(((uint32_t)h) << 16);
}
// Two packed bf16 (low half first in memory) -> two floats.
__device__ __forceinline__ float2 bm_bf16x2_to_f32(uint32_t v) {
    return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
}
// A 16-bit weight type's conversions, for the kernels templated on the weight type WT:
// uint16_t holds bf16 bits (the convention everywhere), __half IEEE half (BM_F16), float
// float32. For uint16_t they are exactly bm_bf16_bits_to_f32 / bm_bf16x2_to_f32 (so the bf16
// instantiations compile as before); half -> float is exact too (fp16 weights, fp32 math).
template <typename WT>
__device__ __forceinline__ float bm_w_bits_to_f32(uint16_t h) {
    if constexpr (std::is_same<WT, __half>::value) return __half2float(__ushort_as_half(h));
    else return bm_bf16_bits_to_f32(h);
}
// Two packed 16-bit weights (low half first in memory) -> two floats.
template <typename WT>
__device__ __forceinline__ float2 bm_w2_to_f32(uint32_t v) {
    if constexpr (std::is_same<WT, __half>::value) {
        __half2_raw r;
        r.x = (unsigned short)(v & 0xffffu);
        r.y = (unsigned short)(v >> 16);
        return __half22float2(__half2(r));
    } else {
        return bm_bf16x2_to_f32(v);
    }
}
// float32 -> bf16 bits, round to nearest even, NaN stays NaN (same as ref.f32_to_bf16).
__device__ __forceinline__ uint16_t bm_f32_to_bf16_bits(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
// float32 f -> bf16 hi + bf16 lo with hi = bf16(f), lo = bf16(f - hi): hi + lo carries 16
// significant bits (|f - hi - lo| <= 2^-17 |f|), so two bf16 GEMMs, hi and lo, accumulated
// in fp32 give a product about as exact as fp32 (BM_CUDA_MATH_BF16X2). f - hi is exact in
// float32 (Sterbenz: hi is within a factor 2 of f). Inf/NaN: lo = 0, hi keeps them.
__device__ __forceinline__ void bm_f32_to_bf16_split(float f, uint16_t &hi, uint16_t &lo) {
    hi = bm_f32_to_bf16_bits(f);
    const float h = bm_bf16_bits_to_f32(hi);
    lo = isfinite(h) ? bm_f32_to_bf16_bits(f - h) : (uint16_t)0;
}
// The MLP activations (SPEC 3) in fp32: exact erf GELU (the default), tanh GELU, SiLU; used
// by every expert kernel (engine.cu, moe.cu, grouped.cu), so all paths agree bit for bit.
__device__ __forceinline__ float bm_act_fn(float v, int act) {
    switch (act) {
        case BM_ACT_GELU: return 0.5f * v * (1.f + erff(v * 0.7071067811865476f));
        case BM_ACT_GELU_TANH:
            return 0.5f * v * (1.f + tanhf(0.7978845608028654f * fmaf(0.044715f * v, v * v, v)));
        // the fast exp and divide: ~5 instructions instead of ~25 (expf's range reduction,
        // the IEEE division), a few ulp (the outputs are rounded to bf16 or summed in fp32);
        // in the prefill fc1 epilogues -5.5% for the whole MoE layer at T = 16384 (s11)
        case BM_ACT_SILU: return __fdividef(v, 1.f + __expf(-v));
        default: return v;
    }
}
// hb[i], (lb[i]) = bf16(v) (and its low part: split products) for one value, or for the four
// values of float4 number i4 (8-byte stores: hb, lb 8-byte aligned). lb NULL: no low part.
__device__ __forceinline__ void bm_store_bf16(float v, uint16_t *hb, uint16_t *lb, int64_t i) {
    if (lb) bm_f32_to_bf16_split(v, hb[i], lb[i]);
    else hb[i] = bm_f32_to_bf16_bits(v);
}
__device__ __forceinline__ void bm_store_bf16(float4 v, uint16_t *hb, uint16_t *lb, int64_t i4) {
    const float f[4] = {v.x, v.y, v.z, v.w};
    uint16_t h[4], l[4];
#pragma unroll
    for (int k = 0; k < 4; k++) {
        if (lb) bm_f32_to_bf16_split(f[k], h[k], l[k]);
        else h[k] = bm_f32_to_bf16_bits(f[k]);
    }
    reinterpret_cast<uint2 *>(hb)[i4] =
        make_uint2(h[0] | (uint32_t)h[1] << 16, h[2] | (uint32_t)h[3] << 16);
    if (lb)
        reinterpret_cast<uint2 *>(lb)[i4] =
            make_uint2(l[0] | (uint32_t)l[1] << 16, l[2] | (uint32_t)l[3] << 16);
}

// An L2 cache policy (createpolicy) that marks the lines an access touches evict_first: for
// the `.L2::cache_hint` forms of ld / st / cp.async (grouped.cu's decode weight tiles,
// engine.cu's scan state). A line staged evict_last and then read this way is demoted.
__device__ __forceinline__ uint64_t bm_evict_first_policy() {
    uint64_t h = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(h));
#endif
    return h;
}

// 2^x on the special-function unit (MUFU.EX2, ~2 ulp; subnormal results flush to 0, which is
// what a decaying SSM state wants anyway).
__device__ __forceinline__ float bm_ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// max(v, 0) + log1p(w) for s = w / (2 + w), w = exp(-|v|): log1p(w) = 2 atanh(s) as the odd
// series to s^11 (bm_softplus below; scan.cu's softplus_silu, which forms s its own way).
__device__ __forceinline__ float bm_softplus_series(float s, float v) {
    const float s2 = s * s;
    float q = fmaf(s2, 0.18181818181818182f, 0.22222222222222222f);
    q = fmaf(q, s2, 0.2857142857142857f);
    q = fmaf(q, s2, 0.4f);
    q = fmaf(q, s2, 0.6666666666666666f);
    q = fmaf(q, s2, 2.f);
    return fmaf(s, q, fmaxf(v, 0.f));
}

__device__ __forceinline__ float bm_softplus(float v) {
    // softplus(v) = v for v > 20 (mamba_ssm's threshold), else max(v, 0) + log1p(w) with
    // w = exp(-|v|) in (0, 1] from MUFU.EX2 and log1p(w) = 2 atanh(s), s = w / (2 + w) in
    // [0, 1/3], as the odd series to s^11 (truncation < 1.5e-7 relative). About 16
    // instructions (two MUFU) against ~35 for log1pf(expf(v)), which the prefill scan runs
    // once per (token, channel). Relative error against float64: <= 6.2e-7 for v >= -10,
    // <= 1.8e-6 below (where softplus < 5e-5; ex2's argument rounding), measured over
    // [-30, 30] in a NumPy float32 model of these operations.
    const float w = bm_ex2(-fabsf(v) * 1.4426950408889634f);
    const float sp = bm_softplus_series(__fdividef(w, 2.f + w), v);
    return v > 20.f ? v : sp;
}

__device__ __forceinline__ float bm_silu(float v) {
    // __fdividef(v, inf) = 0 for v << 0, which is silu's limit.
    return __fdividef(v, 1.f + __expf(-v));
}

template <typename T>
__device__ __forceinline__ T bm_warp_sum(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block; `scratch` holds >= 32 values; every thread gets the total. Blocks of a
// multiple of 32 threads. Ends with a barrier so scratch can be reused right after.
template <typename T>
__device__ __forceinline__ T bm_block_sum(T v, T *scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = bm_warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T t = lane < nwarps ? scratch[lane] : T(0);
    t = bm_warp_sum(t);
    __syncthreads();
    return t;
}

// a.x^2 + a.y^2 + a.z^2 + a.w^2 in one fixed order of fused operations, so that every kernel
// that sums squares through it gets the same bits (rms_norm_kernel and gemv1_kernel's norm
// prologue), whatever contraction the compiler would choose for the plain expression.
__device__ __forceinline__ float bm_sumsq4(float4 a) {
    return __fmaf_rn(a.w, a.w, __fmaf_rn(a.z, a.z, __fmaf_rn(a.y, a.y, __fmul_rn(a.x, a.x))));
}

// ---- shared between gemv.cu and moe.cu ----------------------------------------------------
// y[m, r] = scale[m] * (W[e_m, r, :] . x[m, :]) + bias[r], e_m = ids ? ids[m] : 0.
struct GemvParams {
    const void *W;         // (X, Nout, Kin), float32, bf16 bits or IEEE half (BM_F16)
    const float *x;        // (M, ldx): row m's Kin inputs at x + m*ldx
    int64_t ldx;
    const int32_t *ids;    // (M) expert of each row of x, or NULL (all 0)
    const float *scale;    // (M) or NULL
    const float *bias;     // (Nout) or NULL
    float *y;              // (M, ldy)
    int64_t ldy;
    int M, Nout, Kin;
    // Optional epilogue: the Mamba decode conv step (SPEC 2) fused onto in_proj's x rows.
    // Output rows e < conv_E also advance conv_state (M, K-1, E) by y[m, e] and write
    // conv_y[m, e] = SiLU(conv_b[e] + sum_k conv_w[e, k] * window_k): conv_step_kernel's
    // arithmetic in its order, so the result is bit-identical. NULL conv_w: no epilogue.
    const float *conv_w;   // (E, K) or NULL
    const float *conv_b;   // (E) or NULL
    float *conv_state;     // (M, K-1, E) in place
    float *conv_y;         // (M, E)
    int conv_E, conv_K;
    // The engine's weights (never written after upload): the batch-1 kernel may load W (and
    // the conv weights and state) before its PDL wait (gemv.cu, gemv1_kernel). 0 for the ops
    // entry points, whose W may come from the kernel just before. Left out of an initialiser: 0.
    int w_static;
    // Optional prologue (M = 1): x = RMSNorm(norm_h + norm_r) * norm_w (norm_r NULL: norm_h
    // alone), with the sum also written to norm_r_out and x to norm_x_out (= x). gemv1_kernel
    // computes it in every block from L2, in rms_norm_kernel's arithmetic (the same bits), and
    // block 0 writes the two outputs; elsewhere the launcher runs the norm kernel first.
    // norm_r_out must not alias norm_r: other blocks of the launch still read that. The
    // engine's batch-1 Mamba layers (one graph node fewer a layer). NULL norm_h: off.
    const float *norm_h;   // (Kin)
    const float *norm_r;   // (Kin) or NULL
    const float *norm_w;   // (Kin) model weights
    float *norm_r_out;     // (Kin)
    float *norm_x_out;     // (Kin): the x this GEMV reads
    float norm_eps;
};
// X experts (grid.y); X = 1 with ids NULL is the plain GEMV. ksplit 0 = auto (gemv.cu).
int bm_gemv_launch(const GemvParams &p, bm_dtype wdtype, int X, int ksplit, cudaStream_t stream);
// norm.cu: bm_cuda_rms_norm_bf16 for the engine, whose norm weights w are never written after
// upload: where bm_pdl_early() and T == 1 the kernel loads w before its PDL wait.
int bm_rms_norm_static_w(const float *x, const float *residual, const float *w, float eps,
                         float *out, float *res_out, uint16_t *out_bf16, uint16_t *out_lo,
                         int64_t T, int64_t d, cudaStream_t stream);
