// conv.cu: causal depthwise conv1d of the Mamba mixer (SPEC 2), prefill and one-token step.
//
//   y[t,e] = act(bias[e] + sum_{k<K} w[e,k] * x[t-(K-1)+k, e]),  x[<0] from conv_in (or 0)
//
// Prefill: one thread per (batch, channel, chunk of CT steps); the K-1 previous inputs
// slide through registers, so x is read once (plus K-1 steps of overlap per chunk) and y
// written once; a warp's loads at one t are 32 contiguous channels. K and CT are templates
// so the window and the chunk stay in registers. CT = 32, or 8 for small problems (b = 1 at
// the 2.8B shape: with 32 the whole grid is resident at once and every thread loads, then
// stores, so the loads of one block never overlap the stores of another: 21 us for 48 MB on
// the H200, 2.3 TB/s, against 3.4 TB/s for the same kernel at b = 8).
#include <cstdio>

#include "common.cuh"

namespace {

constexpr int CONV_CT = 32;       // steps per thread (>= K-1, so only chunk 0 reads conv_in)
constexpr int CONV_CT_SMALL = 8;  // for problems under CONV_SMALL elements
constexpr int64_t CONV_SMALL = 16 << 20;
constexpr int CONV_THREADS = 128;

// SUM (bm_cuda_conv_forward_sum): x is two products of a split in_proj, rows ld apart, the
// second part elements after the first; the input is their fp32 sum, and the z half (zin, the
// same layout) is summed alike into z (b, L, E). ybf (and ylo), SUM only, or NULL: y also as
// bf16 hi (and lo) parts, (b, L, E), x_proj's split input (bm_f32_to_bf16_split's bits).
template <int K, int CT, bool SUM = false>
__global__ void conv_fwd_kernel(const float *__restrict__ x,      // (b, L, E)
                                const float *__restrict__ w,      // (E, K)
                                const float *__restrict__ bias,   // (E) or NULL
                                const float *conv_in,             // (b, K-1, E) or NULL
                                float *conv_out,                  // (b, K-1, E) or NULL
                                float *__restrict__ y,            // (b, L, E)
                                int silu, int L, int E, int64_t ld, int64_t part,
                                const float *__restrict__ zin, float *__restrict__ z,
                                uint16_t *__restrict__ ybf, uint16_t *__restrict__ ylo) {
    bm_pdl_wait_only();  // (launched with PDL where bm_conv_scan_pdl; else a no-op)
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= E) return;
    const int c = blockIdx.y, bi = blockIdx.z;
    const int t0 = c * CT;
    const int64_t step = SUM ? ld : E;                // x's row stride
    const float *xb = x + (int64_t)bi * L * step + e;  // x[bi, 0, e]
    float *yb = y + (int64_t)bi * L * E + e;
    auto xat = [&](int pos) {  // the input at step pos of this sequence
        const int64_t o = (int64_t)pos * step;
        return SUM ? xb[o] + xb[part + o] : xb[o];
    };

    float wk[K];
#pragma unroll
    for (int k = 0; k < K; k++) wk[k] = w[(int64_t)e * K + k];
    const float bv = bias ? bias[e] : 0.f;

    // win[k] = input at position t0 - (K-1) + k.
    float win[K];
#pragma unroll
    for (int k = 0; k < K - 1; k++) {
        const int pos = t0 - (K - 1) + k;
        float v = 0.f;
        if (pos >= 0) {
            if (pos < L) v = xat(pos);
        } else if (conv_in) {
            v = conv_in[((int64_t)bi * (K - 1) + (K - 1) + pos) * E + e];
        }
        win[k] = v;
    }
    float xs[CT];  // all loads of the chunk issued before the first use
#pragma unroll
    for (int i = 0; i < CT; i++) xs[i] = t0 + i < L ? xat(t0 + i) : 0.f;
    if constexpr (SUM) {  // z = z_hi + z_lo for the scan, this thread's steps
        const float *zb = zin + (int64_t)bi * L * ld + e;
        float *zo = z + (int64_t)bi * L * E + e;
#pragma unroll
        for (int i = 0; i < CT; i++) {
            if (t0 + i >= L) break;
            const int64_t o = (int64_t)(t0 + i) * ld;
            zo[(int64_t)(t0 + i) * E] = zb[o] + zb[part + o];
        }
    }
#pragma unroll
    for (int i = 0; i < CT; i++) {
        if (t0 + i >= L) break;
        win[K - 1] = xs[i];
        float acc = bv;
#pragma unroll
        for (int k = 0; k < K; k++) acc = fmaf(wk[k], win[k], acc);
        if (silu) acc = bm_silu(acc);
        yb[(int64_t)(t0 + i) * E] = acc;
        if (SUM && ybf) bm_store_bf16(acc, ybf, ylo, ((int64_t)bi * L + t0 + i) * E + e);
#pragma unroll
        for (int k = 0; k < K - 1; k++) win[k] = win[k + 1];
    }

    if (c == 0 && conv_out) {
        // The last K-1 inputs (combined sequence conv_in ++ x). Read all, then write: conv_out
        // may be conv_in, and only this thread touches (bi, :, e) of either.
        float last[K - 1];
#pragma unroll
        for (int j = 0; j < K - 1; j++) {
            const int q = L - (K - 1) + j;
            float v = 0.f;
            if (q >= 0) v = xat(q);
            else if (conv_in) v = conv_in[((int64_t)bi * (K - 1) + (K - 1) + q) * E + e];
            last[j] = v;
        }
#pragma unroll
        for (int j = 0; j < K - 1; j++) conv_out[((int64_t)bi * (K - 1) + j) * E + e] = last[j];
    }
}

// The step's output for channel e of a row from its window (the K-1 states, then the new
// input): y = act(bias + w . window), and the state shifted in place (s: state k at s + k E).
template <int K>
__device__ __forceinline__ void conv_step_out(const float (&win)[K], const float *__restrict__ w,
                                              const float *__restrict__ bias, int e,
                                              float *__restrict__ y, int64_t be, int silu,
                                              float *__restrict__ s, int E) {
    float acc = bias ? bias[e] : 0.f;
#pragma unroll
    for (int k = 0; k < K; k++) acc = fmaf(w[(int64_t)e * K + k], win[k], acc);
    y[be] = silu ? bm_silu(acc) : acc;
#pragma unroll
    for (int k = 0; k < K - 1; k++) s[(int64_t)k * E] = win[k + 1];
}

template <int K>
__global__ void conv_step_kernel(const float *__restrict__ x,     // (b, E)
                                 float *__restrict__ state,       // (b, K-1, E) in place
                                 const float *__restrict__ w,     // (E, K)
                                 const float *__restrict__ bias,  // (E) or NULL
                                 float *__restrict__ y,           // (b, E)
                                 int silu, int64_t bE, int E) {
    bm_pdl_wait();
    const int64_t be = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (be >= bE) return;
    const int64_t bi = be / E;
    const int e = (int)(be % E);
    float *s = state + bi * (K - 1) * E + e;  // step E
    float win[K];
#pragma unroll
    for (int k = 0; k < K - 1; k++) win[k] = s[(int64_t)k * E];
    win[K - 1] = x[be];
    conv_step_out<K>(win, w, bias, e, y, be, silu, s, E);
}

// bm_cuda_conv_step_norm: x and z lack the RMSNorm's row scale, which comes from the per-row
// partial sums of squares ssp (b, parts). Grid (E / 128, b): a block's channels are of one
// row (no division), and each warp sums that row's parts (lanes strided, then a butterfly:
// the same bits in every warp) while its loads of x, z and the state are in flight; the
// parts through L1 (__ldca), as the E / 32 warps of a row ask for the same two lines (5.1
// against 3.0 us a call with __ldcg and a division per thread, B = 64 of the 2.8B shape). No
// stale line can be in L1: ssp was written two launches back and nothing on this SM read it
// since this kernel started (its loads come after its wait, as x's).
constexpr int CONV_NORM_THREADS = 128;
struct ConvNorm {
    float *z;            // (b, E) out
    const float *zin;    // z's input, row stride ld (= z, ld = E: in place)
    int64_t ld;          // row stride of x and zin
    const float *ssp;    // NULL: no row scale (bm_cuda_conv_step_sum)
    int parts;
    float inv_d, eps;
    int64_t part;        // > 0: x and zin are sums of two parts, the second part elements on
};

template <int K>
__global__ void conv_step_norm_kernel(const float *__restrict__ x, float *__restrict__ state,
                                      const float *__restrict__ w,
                                      const float *__restrict__ bias, float *__restrict__ y,
                                      int silu, int E, ConvNorm nm) {
    bm_pdl_wait();
    const int e0 = blockIdx.x * CONV_NORM_THREADS + threadIdx.x;
    if (e0 - (int)(threadIdx.x & 31) >= E) return;  // whole warps past E; the rest shuffle
    const bool valid = e0 < E;
    const int e = valid ? e0 : E - 1;
    const int64_t row = blockIdx.y, be = row * E + e, bl = row * nm.ld + e;
    float *s = state + row * (K - 1) * E + e;
    float win[K];
#pragma unroll
    for (int k = 0; k < K - 1; k++) win[k] = s[(int64_t)k * E];
    win[K - 1] = x[bl];
    float zv = nm.zin[bl];
    if (nm.part) {  // (uniform over the grid) the second part: hi + lo products
        win[K - 1] += x[bl + nm.part];
        zv += nm.zin[bl + nm.part];
    }
    if (nm.ssp) {   // (uniform over the grid: the shuffles below see every lane)
        const float *q = nm.ssp + row * nm.parts;
        float a = 0.f;
#pragma unroll 2
        for (int i = threadIdx.x & 31; i < nm.parts; i += 32) a += __ldca(q + i);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
        const float sc = rsqrtf(a * nm.inv_d + nm.eps);
        win[K - 1] *= sc;
        zv *= sc;
    }
    if (!valid) return;
    nm.z[be] = zv;
    conv_step_out<K>(win, w, bias, e, y, be, silu, s, E);
}

template <int K>
int conv_fwd_launch(const float *x, const float *w, const float *bias, const float *conv_in,
                    float *conv_out, float *y, int silu, int64_t b, int64_t L, int64_t E,
                    cudaStream_t stream, int64_t ld = 0, int64_t part = 0,
                    const float *zin = nullptr, float *z = nullptr, uint16_t *ybf = nullptr,
                    uint16_t *ylo = nullptr) {
    const bool small = b * L * E < CONV_SMALL && bm_cdiv(L, CONV_CT_SMALL) <= 65535;
    const int ct = small ? CONV_CT_SMALL : CONV_CT;
    dim3 grid((unsigned)bm_cdiv(E, CONV_THREADS), (unsigned)bm_cdiv(L, ct), (unsigned)b);
    const bool pdl = bm_conv_scan_pdl();
    if (z) {  // SUM
        auto *kernel = small ? conv_fwd_kernel<K, CONV_CT_SMALL, true>
                             : conv_fwd_kernel<K, CONV_CT, true>;
        BM_CUDA_TRY(bm_launch_maybe_pdl(pdl, false, kernel, grid, dim3(CONV_THREADS), 0, stream, x, w,
                                        bias, conv_in, conv_out, y, silu, (int)L, (int)E, ld,
                                        part, zin, z, ybf, ylo));
    } else {
        auto *kernel = small ? conv_fwd_kernel<K, CONV_CT_SMALL> : conv_fwd_kernel<K, CONV_CT>;
        BM_CUDA_TRY(bm_launch_maybe_pdl(pdl, false, kernel, grid, dim3(CONV_THREADS), 0, stream, x, w,
                                        bias, conv_in, conv_out, y, silu, (int)L, (int)E,
                                        (int64_t)0, (int64_t)0, (const float *)nullptr,
                                        (float *)nullptr, (uint16_t *)nullptr,
                                        (uint16_t *)nullptr));
    }
    return 0;
}

template <int K>
int conv_step_launch(const float *x, float *state, const float *w, const float *bias, float *y,
                     int silu, int64_t b, int64_t E, cudaStream_t stream) {
    BM_LAUNCH_PDL(conv_step_kernel<K>, dim3((unsigned)bm_cdiv(b * E, 256)), dim3(256), 0, stream,
                  x, state, w, bias, y, silu, b * E, (int)E);
    return 0;
}

template <int K>
int conv_step_norm_launch(const float *x, float *state, const float *w, const float *bias,
                          float *y, int silu, int64_t b, int64_t E, ConvNorm nm,
                          cudaStream_t stream) {
    BM_LAUNCH_PDL(conv_step_norm_kernel<K>,
                  dim3((unsigned)bm_cdiv(E, CONV_NORM_THREADS), (unsigned)b),
                  dim3(CONV_NORM_THREADS), 0, stream, x, state, w, bias, y, silu, (int)E, nm);
    return 0;
}

int conv_step_norm_switch(const float *x, float *conv_state, const float *w, const float *bias,
                          float *y, int silu, int64_t b, int64_t E, int64_t K, const ConvNorm &nm,
                          cudaStream_t stream) {
    switch (K) {
        case 2: return conv_step_norm_launch<2>(x, conv_state, w, bias, y, silu, b, E, nm, stream);
        case 3: return conv_step_norm_launch<3>(x, conv_state, w, bias, y, silu, b, E, nm, stream);
        case 4: return conv_step_norm_launch<4>(x, conv_state, w, bias, y, silu, b, E, nm, stream);
        case 5: return conv_step_norm_launch<5>(x, conv_state, w, bias, y, silu, b, E, nm, stream);
        case 6: return conv_step_norm_launch<6>(x, conv_state, w, bias, y, silu, b, E, nm, stream);
        case 7: return conv_step_norm_launch<7>(x, conv_state, w, bias, y, silu, b, E, nm, stream);
        default: return conv_step_norm_launch<8>(x, conv_state, w, bias, y, silu, b, E, nm, stream);
    }
}

// An argument error naming the entry point (`what`: conv_step_fused's callers).
int arg_fail(const char *what, const char *need) {
    char msg[160];
    snprintf(msg, sizeof msg, "%s: needs %s", what, need);
    return BM_CUDA_ARG_FAIL(msg);
}

// The three fused conv-step entry points below share their checks and launch: zin (row
// stride ld) holds the z half, part (> 0) is the distance to the second product's rows (the
// hi + lo split; 0: one product), ssp (non-null: parts partial sums of squares a row over d
// columns) the Mamba norm's row scale. `what` names the entry point in the error.
int conv_step_fused(const char *what, const float *x, const float *zin, int64_t ld,
                    int64_t part, float *z, float *conv_state, const float *w,
                    const float *bias, float *y, int silu, int64_t b, int64_t E, int64_t K,
                    const float *ssp, int64_t parts, int64_t d, float eps,
                    cudaStream_t stream) {
    if (K < 2 || K > 8) return BM_CUDA_ARG_FAIL("conv_step: K must be in 2..8");
    if (E < 1 || E > INT32_MAX - CONV_NORM_THREADS || b > 65535)
        return arg_fail(what, "1 <= E < 2^31 - 128 and b <= 65535");
    if (!z || !zin || ld < E) return arg_fail(what, "z, zin and ld >= E");
    if (part && part < (b - 1) * ld + E)
        return arg_fail(what, "part past the rows");
    if (ssp && (parts < 1 || parts > INT32_MAX || d < 1))
        return arg_fail(what, "parts >= 1 and d >= 1");
    if (b <= 0) return 0;
    const ConvNorm nm = ssp ? ConvNorm{z, zin, ld, ssp, (int)parts, 1.f / (float)d, eps, part}
                            : ConvNorm{z, zin, ld, nullptr, 1, 0.f, 0.f, part};
    return conv_step_norm_switch(x, conv_state, w, bias, y, silu, b, E, K, nm, stream);
}

}  // namespace

namespace {
// bm_cuda_conv_forward and its _sum form (z non-NULL: x and zin as described there).
int conv_forward(const char *what, const float *x, const float *w, const float *bias,
                 const float *conv_in, float *conv_out, float *y, int silu, int64_t b, int64_t L,
                 int64_t E, int64_t K, cudaStream_t stream, int64_t ld = 0, int64_t part = 0,
                 const float *zin = nullptr, float *z = nullptr, uint16_t *ybf = nullptr,
                 uint16_t *ylo = nullptr) {
    char msg[160];
    if (K < 2 || K > 8) {
        snprintf(msg, sizeof msg, "%s: K must be in 2..8", what);
        return BM_CUDA_ARG_FAIL(msg);
    }
    if (b > 65535 || bm_cdiv(L, CONV_CT) > 65535 || E > INT32_MAX / 2) {
        snprintf(msg, sizeof msg, "%s: size too large (b <= 65535, L <= 2M)", what);
        return BM_CUDA_ARG_FAIL(msg);
    }
    if (b <= 0 || E <= 0) return 0;
    if (L == 0) {
        // No new inputs: the state passes through.
        if (!conv_out || conv_out == conv_in) return 0;
        const size_t bytes = (size_t)(b * (K - 1) * E) * sizeof(float);
        if (conv_in) BM_CUDA_TRY(cudaMemcpyAsync(conv_out, conv_in, bytes, cudaMemcpyDeviceToDevice, stream));
        else BM_CUDA_TRY(cudaMemsetAsync(conv_out, 0, bytes, stream));
        return 0;
    }
#define BM_CONV_FWD(KK)                                                                     \
    conv_fwd_launch<KK>(x, w, bias, conv_in, conv_out, y, silu, b, L, E, stream, ld, part, zin, \
                        z, ybf, ylo)
    switch (K) {
        case 2: return BM_CONV_FWD(2);
        case 3: return BM_CONV_FWD(3);
        case 4: return BM_CONV_FWD(4);
        case 5: return BM_CONV_FWD(5);
        case 6: return BM_CONV_FWD(6);
        case 7: return BM_CONV_FWD(7);
        default: return BM_CONV_FWD(8);
    }
#undef BM_CONV_FWD
}
}  // namespace

extern "C" int bm_cuda_conv_forward(const float *x, const float *w, const float *bias,
                                    const float *conv_in, float *conv_out, float *y, int silu,
                                    int64_t b, int64_t L, int64_t E, int64_t K,
                                    cudaStream_t stream) {
    return conv_forward("conv", x, w, bias, conv_in, conv_out, y, silu, b, L, E, K, stream);
}

extern "C" int bm_cuda_conv_forward_sum(const float *x, const float *zin, int64_t ld,
                                        int64_t part, float *z, const float *w,
                                        const float *bias, const float *conv_in, float *conv_out,
                                        float *y, uint16_t *ybf, uint16_t *ylo, int silu,
                                        int64_t b, int64_t L, int64_t E, int64_t K,
                                        cudaStream_t stream) {
    if (!x || !zin || !z || ld < E || part < b * L * ld || (ylo && !ybf))
        return BM_CUDA_ARG_FAIL("conv_forward_sum: needs x, zin, z, ld >= E, the second part "
                                "past the first (part >= b L ld), and ybf wherever ylo");
    return conv_forward("conv_forward_sum", x, w, bias, conv_in, conv_out, y, silu, b, L, E, K,
                        stream, ld, part, zin, z, ybf, ylo);
}

extern "C" int bm_cuda_conv_step(const float *x, float *conv_state, const float *w,
                                 const float *bias, float *y, int silu, int64_t b, int64_t E,
                                 int64_t K, cudaStream_t stream) {
    if (K < 2 || K > 8) return BM_CUDA_ARG_FAIL("conv_step: K must be in 2..8");
    if (E > INT32_MAX) return BM_CUDA_ARG_FAIL("conv_step: E too large");
    if (b <= 0 || E <= 0) return 0;
    switch (K) {
        case 2: return conv_step_launch<2>(x, conv_state, w, bias, y, silu, b, E, stream);
        case 3: return conv_step_launch<3>(x, conv_state, w, bias, y, silu, b, E, stream);
        case 4: return conv_step_launch<4>(x, conv_state, w, bias, y, silu, b, E, stream);
        case 5: return conv_step_launch<5>(x, conv_state, w, bias, y, silu, b, E, stream);
        case 6: return conv_step_launch<6>(x, conv_state, w, bias, y, silu, b, E, stream);
        case 7: return conv_step_launch<7>(x, conv_state, w, bias, y, silu, b, E, stream);
        default: return conv_step_launch<8>(x, conv_state, w, bias, y, silu, b, E, stream);
    }
}

extern "C" int bm_cuda_conv_step_norm(const float *x, const float *zin, int64_t ld, float *z,
                                      float *conv_state, const float *w, const float *bias,
                                      float *y, int silu, int64_t b, int64_t E, int64_t K,
                                      const float *ssp, int64_t parts, int64_t d, float eps,
                                      cudaStream_t stream) {
    if (!ssp) return BM_CUDA_ARG_FAIL("conv_step_norm: needs ssp");
    return conv_step_fused("conv_step_norm", x, zin, ld, 0, z, conv_state, w, bias, y, silu, b,
                           E, K, ssp, parts, d, eps, stream);
}

extern "C" int bm_cuda_conv_step_sum(const float *x, const float *zin, int64_t ld, int64_t part,
                                     float *z, float *conv_state, const float *w,
                                     const float *bias, float *y, int silu, int64_t b, int64_t E,
                                     int64_t K, cudaStream_t stream) {
    if (part <= 0) return BM_CUDA_ARG_FAIL("conv_step_sum: needs part past the rows");
    return conv_step_fused("conv_step_sum", x, zin, ld, part, z, conv_state, w, bias, y, silu,
                           b, E, K, nullptr, 1, 1, 0.f, stream);
}

extern "C" int bm_cuda_conv_step_sum_norm(const float *x, const float *zin, int64_t ld,
                                          int64_t part, float *z, float *conv_state,
                                          const float *w, const float *bias, float *y, int silu,
                                          int64_t b, int64_t E, int64_t K, const float *ssp,
                                          int64_t parts, int64_t d, float eps,
                                          cudaStream_t stream) {
    if (part <= 0 || !ssp)
        return BM_CUDA_ARG_FAIL("conv_step_sum_norm: needs part past the rows and ssp");
    return conv_step_fused("conv_step_sum_norm", x, zin, ld, part, z, conv_state, w, bias, y,
                           silu, b, E, K, ssp, parts, d, eps, stream);
}
