// norm.cu: RMSNorm with the fused residual add, and LayerNorm (SPEC 1), float32.
//
// One block per row: the row (x + residual) is read once into shared memory, reduced, and
// written back scaled, so each kernel moves the floor's bytes (x, residual in; out, res_out
// out). float4 accesses when d % 4 == 0 and the pointers are 16-byte aligned.
#include "common.cuh"

namespace {

template <int VW>
struct Vec;
template <>
struct Vec<1> {
    using T = float;
    static __device__ __forceinline__ float dot(T a) { return a * a; }
    static __device__ __forceinline__ float sum(T a) { return a; }
};
template <>
struct Vec<4> {
    using T = float4;
    static __device__ __forceinline__ float dot(T a) { return bm_sumsq4(a); }  // (common.cuh)
    static __device__ __forceinline__ float sum(T a) { return (a.x + a.y) + (a.z + a.w); }
};

__device__ __forceinline__ float add(float a, float b) { return a + b; }
__device__ __forceinline__ float4 add(float4 a, float4 b) {
    return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}
__device__ __forceinline__ float sub(float a, float m) { return a - m; }
__device__ __forceinline__ float4 sub(float4 a, float m) {
    return make_float4(a.x - m, a.y - m, a.z - m, a.w - m);
}
// a * s * w (+ b)
__device__ __forceinline__ float scale(float a, float s, float w) { return a * s * w; }
__device__ __forceinline__ float4 scale(float4 a, float s, float4 w) {
    return make_float4(a.x * s * w.x, a.y * s * w.y, a.z * s * w.z, a.w * s * w.w);
}

// x, residual, res_out (T, d); w (d); out (T, d); obf, olo (T, d) or NULL: out also as bf16
// (and its low parts), the input of a bf16 GEMM. No __restrict__ on the row pointers:
// res_out may alias x or residual (each element is read and written by the same thread).
// EARLY (the engine's decode-size norms, bm_rms_norm_static_w): trigger first, load this
// thread's first NORM_PRE pieces of w (the model's weights) before the wait; same arithmetic.
constexpr int NORM_PRE = 2;  // d = 1472: 368 float4 over 256 threads
template <int VW, bool EARLY = false>
__global__ void rms_norm_kernel(const float *x, const float *residual,
                                const float *__restrict__ w, float eps,
                                float *__restrict__ out, float *res_out, int d,
                                uint16_t *__restrict__ obf, uint16_t *__restrict__ olo) {
    using V = typename Vec<VW>::T;
    const V *wv = reinterpret_cast<const V *>(w);
    V wpre[EARLY ? NORM_PRE : 1];
    if constexpr (EARLY) {
        bm_pdl_trigger();
        const int nv0 = d / VW;
#pragma unroll
        for (int j = 0; j < NORM_PRE; j++) {
            const int i = threadIdx.x + j * blockDim.x;
            wpre[j] = i < nv0 ? __ldca(wv + i) : V{};  // plain: kept before the wait (common.cuh)
        }
        bm_pdl_wait_only();
    } else {
        bm_pdl_wait();
    }
    extern __shared__ __align__(16) unsigned char smem_raw[];
    V *srow = reinterpret_cast<V *>(smem_raw);
    __shared__ float scratch[32];
    const int64_t off = (int64_t)blockIdx.x * d;
    const V *xr = reinterpret_cast<const V *>(x + off);
    const V *rr = residual ? reinterpret_cast<const V *>(residual + off) : nullptr;
    V *ro = res_out ? reinterpret_cast<V *>(res_out + off) : nullptr;
    const int nv = d / VW;

    float ss = 0.f;
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        // EARLY: from L2 (__ldcg: ordered after the wait, and no L1 lines of h / r)
        V r = EARLY ? __ldcg(xr + i) : xr[i];
        if (rr) r = add(r, EARLY ? __ldcg(rr + i) : rr[i]);
        srow[i] = r;
        if (ro) ro[i] = r;
        ss += Vec<VW>::dot(r);
    }
    ss = bm_block_sum(ss, scratch);
    const float s = rsqrtf(ss / (float)d + eps);
    V *o = reinterpret_cast<V *>(out + off);
    for (int i = threadIdx.x, j = 0; i < nv; i += blockDim.x, j++) {
        V wi;
        if constexpr (EARLY) {
            wi = wpre[0];
#pragma unroll
            for (int q = 1; q < NORM_PRE; q++)
                if (j == q) wi = wpre[q];
            if (j >= NORM_PRE) wi = wv[i];
        } else {
            wi = wv[i];
        }
        const V v = scale(srow[i], s, wi);
        if (out) o[i] = v;
        if (obf) bm_store_bf16(v, obf + off, olo ? olo + off : nullptr, i);
    }
}

template <int VW>
__global__ void layer_norm_kernel(const float *__restrict__ x, const float *__restrict__ residual,
                                  const float *__restrict__ w, const float *__restrict__ bias,
                                  float eps, float *__restrict__ out, int d) {
    bm_pdl_wait();
    using V = typename Vec<VW>::T;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    V *srow = reinterpret_cast<V *>(smem_raw);
    __shared__ float scratch[32];
    const int64_t off = (int64_t)blockIdx.x * d;
    const V *xr = reinterpret_cast<const V *>(x + off);
    const V *rr = residual ? reinterpret_cast<const V *>(residual + off) : nullptr;
    const int nv = d / VW;

    float s1 = 0.f;
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        V r = xr[i];
        if (rr) r = add(r, rr[i]);
        srow[i] = r;
        s1 += Vec<VW>::sum(r);
    }
    const float mean = bm_block_sum(s1, scratch) / (float)d;
    // Two passes over the row in shared memory: the centred variance, no cancellation.
    float s2 = 0.f;
    for (int i = threadIdx.x; i < nv; i += blockDim.x) s2 += Vec<VW>::dot(sub(srow[i], mean));
    const float rstd = rsqrtf(bm_block_sum(s2, scratch) / (float)d + eps);
    const V *wv = reinterpret_cast<const V *>(w);
    const V *bv = bias ? reinterpret_cast<const V *>(bias) : nullptr;
    V *o = reinterpret_cast<V *>(out + off);
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        V v = scale(sub(srow[i], mean), rstd, wv[i]);
        if (bv) v = add(v, bv[i]);
        o[i] = v;
    }
}

bool aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

int block_for(int64_t nv) {
    const int64_t t = bm_cdiv(nv, 32) * 32;
    return (int)(t < 32 ? 32 : t > 256 ? 256 : t);
}

constexpr int NORM_MAX_D = 50000;  // a row in shared memory: up to 200 KB (opt-in above 48 KB)
std::atomic<unsigned> optin_done[4];  // per kernel: devices whose cap is raised (see bm_smem_optin)

}  // namespace

namespace {
int rms_norm_launch(const float *x, const float *residual, const float *w, float eps,
                    float *out, float *res_out, uint16_t *out_bf16, uint16_t *out_lo, int64_t T,
                    int64_t d, bool static_w, cudaStream_t stream) {
    if (T <= 0 || d <= 0) return 0;
    if (T > INT32_MAX || d > NORM_MAX_D) return BM_CUDA_ARG_FAIL("rms_norm: d > 50000 or T too large");
    if (out_lo && !out_bf16) return BM_CUDA_ARG_FAIL("rms_norm: out_lo needs out_bf16");
    // out NULL: the bf16 row only (the engine's prefill, where in_proj reads nothing else)
    if (!out && !out_bf16) return BM_CUDA_ARG_FAIL("rms_norm: no output");
    const size_t smem = (size_t)d * sizeof(float);
    const bool vec = d % 4 == 0 && aligned16(x) && aligned16(w) && aligned16(out) &&
                     (!residual || aligned16(residual)) && (!res_out || aligned16(res_out)) &&
                     (((uintptr_t)out_bf16 | (uintptr_t)out_lo) & 7) == 0;
    int st;
    if (vec && static_w && T == 1 && smem <= 48 * 1024 && bm_pdl_early()) {
        BM_LAUNCH_PDL((rms_norm_kernel<4, true>), dim3((unsigned)T), dim3(block_for(d / 4)), smem, stream, x, residual, w, eps, out, res_out, (int)d, out_bf16, out_lo);
        bm_pdl_early_count(BM_EARLY_RMS_NORM);
    } else if (vec) {
        if (smem > 48 * 1024 && (st = bm_smem_optin(rms_norm_kernel<4>, NORM_MAX_D * 4, optin_done[0]))) return st;
        BM_LAUNCH_PDL(rms_norm_kernel<4>, dim3((unsigned)T), dim3(block_for(d / 4)), smem, stream, x, residual, w, eps, out, res_out, (int)d, out_bf16, out_lo);
    } else {
        if (smem > 48 * 1024 && (st = bm_smem_optin(rms_norm_kernel<1>, NORM_MAX_D * 4, optin_done[1]))) return st;
        BM_LAUNCH_PDL(rms_norm_kernel<1>, dim3((unsigned)T), dim3(block_for(d)), smem, stream, x, residual, w, eps, out, res_out, (int)d, out_bf16, out_lo);
    }
    BM_CUDA_LAUNCHED();
    return 0;
}
}  // namespace

extern "C" int bm_cuda_rms_norm_bf16(const float *x, const float *residual, const float *w,
                                     float eps, float *out, float *res_out, uint16_t *out_bf16,
                                     uint16_t *out_lo, int64_t T, int64_t d,
                                     cudaStream_t stream) {
    return rms_norm_launch(x, residual, w, eps, out, res_out, out_bf16, out_lo, T, d, false,
                           stream);
}

int bm_rms_norm_static_w(const float *x, const float *residual, const float *w, float eps,
                         float *out, float *res_out, uint16_t *out_bf16, uint16_t *out_lo,
                         int64_t T, int64_t d, cudaStream_t stream) {
    return rms_norm_launch(x, residual, w, eps, out, res_out, out_bf16, out_lo, T, d, true,
                           stream);
}

extern "C" int bm_cuda_rms_norm(const float *x, const float *residual, const float *w,
                                float eps, float *out, float *res_out, int64_t T, int64_t d,
                                cudaStream_t stream) {
    return bm_cuda_rms_norm_bf16(x, residual, w, eps, out, res_out, nullptr, nullptr, T, d,
                                 stream);
}

extern "C" int bm_cuda_layer_norm(const float *x, const float *residual, const float *w,
                                  const float *bias, float eps, float *out, int64_t T, int64_t d,
                                  cudaStream_t stream) {
    if (T <= 0 || d <= 0) return 0;
    if (T > INT32_MAX || d > NORM_MAX_D) return BM_CUDA_ARG_FAIL("layer_norm: d > 50000 or T too large");
    const size_t smem = (size_t)d * sizeof(float);
    const bool vec = d % 4 == 0 && aligned16(x) && aligned16(w) && aligned16(out) &&
                     (!residual || aligned16(residual)) && (!bias || aligned16(bias));
    int st;
    if (vec) {
        if (smem > 48 * 1024 && (st = bm_smem_optin(layer_norm_kernel<4>, NORM_MAX_D * 4, optin_done[2]))) return st;
        BM_LAUNCH_PDL(layer_norm_kernel<4>, dim3((unsigned)T), dim3(block_for(d / 4)), smem, stream, x, residual, w, bias, eps, out, (int)d);
    } else {
        if (smem > 48 * 1024 && (st = bm_smem_optin(layer_norm_kernel<1>, NORM_MAX_D * 4, optin_done[3]))) return st;
        BM_LAUNCH_PDL(layer_norm_kernel<1>, dim3((unsigned)T), dim3(block_for(d)), smem, stream, x, residual, w, bias, eps, out, (int)d);
    }
    BM_CUDA_LAUNCHED();
    return 0;
}
