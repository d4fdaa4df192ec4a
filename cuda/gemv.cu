// gemv.cu: y = W x for a few rows of x (decode), and the gathered form the MoE decode path
// uses (each token multiplies the weights of its own expert).
//
// Memory-bound: the floor is one pass over W (Nout*Kin*2 bytes in bf16 or fp16). A warp owns
// one output row and streams it with 16-byte loads (8 bf16 / fp16 or 4 float32 per lane and
// load), up to GEMV_MT rows of x at a time from L1, fp32 accumulate, then a shuffle
// reduction.
// Gathered form: W is (X, Nout, Kin); block (row block, expert) first collects the tokens
// routed to its expert, so an expert with no tokens costs nothing and a used one is read once
// per GEMV_MT of its tokens.
#include "common.cuh"

namespace {

constexpr int GEMV_WARPS = 8;    // rows per block
constexpr int GEMV_LIST = 1024;  // tokens collected per round
constexpr int GEMV_UNR = 4;      // 16-byte weight loads per lane and stage

// 16-bit weights, bf16 bits (uint16_t) or IEEE half (__half, BM_F16): 8 per 16 bytes,
// converted exactly to float32 (bm_w2_to_f32 / bm_w_bits_to_f32: for uint16_t exactly the
// bf16 conversions).
template <typename WT>
struct WLoad {
    static_assert(sizeof(WT) == 2, "16-bit weights (float32: the specialisation below)");
    static constexpr int VW = 8;
    using Raw = uint4;
    static __device__ __forceinline__ Raw raw(const WT *p) {
        return __ldg(reinterpret_cast<const uint4 *>(p));
    }
    static __device__ __forceinline__ Raw raw_ca(const WT *p) {  // see bm_pdl_trigger
        return __ldca(reinterpret_cast<const uint4 *>(p));
    }
    static __device__ __forceinline__ void load(const WT *p, float (&w)[8]) {
        unpack(raw(p), w);
    }
    static __device__ __forceinline__ void unpack(const uint4 v, float (&w)[8]) {
        float2 a = bm_w2_to_f32<WT>(v.x), b = bm_w2_to_f32<WT>(v.y);
        float2 c = bm_w2_to_f32<WT>(v.z), d = bm_w2_to_f32<WT>(v.w);
        w[0] = a.x; w[1] = a.y; w[2] = b.x; w[3] = b.y;
        w[4] = c.x; w[5] = c.y; w[6] = d.x; w[7] = d.y;
    }
    static __device__ __forceinline__ float one(const WT *p) {
        return bm_w_bits_to_f32<WT>(__ldg(reinterpret_cast<const unsigned short *>(p)));
    }
};
template <>
struct WLoad<float> {  // float32: 4 per 16 bytes
    static constexpr int VW = 4;
    using Raw = float4;
    static __device__ __forceinline__ Raw raw(const float *p) {
        return __ldg(reinterpret_cast<const float4 *>(p));
    }
    static __device__ __forceinline__ Raw raw_ca(const float *p) {
        return __ldca(reinterpret_cast<const float4 *>(p));
    }
    static __device__ __forceinline__ void load(const float *p, float (&w)[4]) {
        unpack(raw(p), w);
    }
    static __device__ __forceinline__ void unpack(const float4 v, float (&w)[4]) {
        w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
    }
    static __device__ __forceinline__ float one(const float *p) { return __ldg(p); }
};

// K-split: KS = 2^ks_log2 warps share a row, each streaming 1/KS of it, partial sums meeting
// in shared memory. Rows that are few or long otherwise leave each warp a serial chain of
// dependent DRAM round trips (out_proj: 1472 rows of 5.9 KB), far from the bandwidth.
// The decode conv step of channel e of row m, on in_proj's output xv = x[m, e] (see
// GemvParams): conv_step_kernel (conv.cu) in the same order of operations.
__device__ __forceinline__ void conv_epilogue(const GemvParams &p, int m, int e, float xv) {
    const int K = p.conv_K, E = p.conv_E;
    float *st = p.conv_state + (int64_t)m * (K - 1) * E + e;   // step E
    const float *w = p.conv_w + (int64_t)e * K;
    float acc = p.conv_b ? p.conv_b[e] : 0.f;
    for (int k = 0; k < K - 1; k++) acc = fmaf(w[k], st[(int64_t)k * E], acc);
    acc = fmaf(w[K - 1], xv, acc);
    for (int k = 0; k < K - 2; k++) st[(int64_t)k * E] = st[(int64_t)(k + 1) * E];
    st[(int64_t)(K - 2) * E] = xv;
    p.conv_y[(int64_t)m * E + e] = bm_silu(acc);
}

// INV (batch-1 graph only, where gemv1_kernel does not apply): behind early kernels, so
// bm_pdl_wait_b1 (the rows of x are read at addresses from shared memory, which ptxas cannot
// move above the wait).
template <typename WT, int MT, bool VEC, bool INV = false>
__global__ __launch_bounds__(GEMV_WARPS * 32) void gemv_kernel(const GemvParams p, int ks_log2) {
    if constexpr (INV) bm_pdl_wait_b1();
    else bm_pdl_wait();
    constexpr int VW = WLoad<WT>::VW;
    __shared__ int list[GEMV_LIST];
    __shared__ int list_n;
    __shared__ float part[GEMV_WARPS][MT];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int KS = 1 << ks_log2;
    const int kpart = warp & (KS - 1);
    // A warp past Nout still takes part in the barriers.
    const int row = blockIdx.x * (GEMV_WARPS >> ks_log2) + (warp >> ks_log2);
    const int expert = blockIdx.y;
    const WT *wrow = reinterpret_cast<const WT *>(p.W) +
                     ((int64_t)expert * p.Nout + (row < p.Nout ? row : 0)) * p.Kin;
    const float bias = (p.bias && row < p.Nout) ? p.bias[row] : 0.f;
    // This warp's slice of the row, in VW-element chunks (VEC) or elements.
    const int units = VEC ? p.Kin / VW : p.Kin;
    const int per = (units + KS - 1) / KS;
    const int u0 = kpart * per, u1 = min(units, u0 + per);

    for (int r0 = 0; r0 < p.M; r0 += GEMV_LIST) {
        const int r1 = min(p.M, r0 + GEMV_LIST);
        if (warp == 0) {
            // Stable compaction of this round's tokens of `expert`.
            int n = 0;
            for (int m0 = r0; m0 < r1; m0 += 32) {
                const int m = m0 + lane;
                const bool mine = m < r1 && (!p.ids || p.ids[m] == expert);
                const unsigned bal = __ballot_sync(0xffffffffu, mine);
                if (mine) list[n + __popc(bal & ((1u << lane) - 1u))] = m;
                n += __popc(bal);
            }
            if (lane == 0) list_n = n;
        }
        __syncthreads();
        const int n = list_n;
        for (int j0 = 0; j0 < n; j0 += MT) {  // uniform over the block
            const int nj = min(MT, n - j0);
            const float *xr[MT];
#pragma unroll
            for (int j = 0; j < MT; j++)
                xr[j] = p.x + (int64_t)list[j0 + (j < nj ? j : 0)] * p.ldx;
            float acc[MT];
#pragma unroll
            for (int j = 0; j < MT; j++) acc[j] = 0.f;
            if (row < p.Nout) {
                if (VEC && MT == 1) {
                    // One row of x: the plain loop (the pipelined one below was slower for
                    // M = 1 on the H200, cuda/NOTES.md gpuperf run 2).
#pragma unroll 4
                    for (int u = u0 + lane; u < u1; u += 32) {
                        const int k = u * VW;
                        float wv[VW];
                        WLoad<WT>::load(wrow + k, wv);
#pragma unroll
                        for (int q = 0; q < VW; q += 4) {
                            const float4 xv = __ldg(reinterpret_cast<const float4 *>(xr[0] + k + q));
                            acc[0] = fmaf(wv[q], xv.x, acc[0]);
                            acc[0] = fmaf(wv[q + 1], xv.y, acc[0]);
                            acc[0] = fmaf(wv[q + 2], xv.z, acc[0]);
                            acc[0] = fmaf(wv[q + 3], xv.w, acc[0]);
                        }
                    }
                } else if (VEC) {
                    // Software-pipelined: the next GEMV_UNR 16-byte weight loads are issued
                    // before this group's FMAs (indices clamped into the slice; past its end the
                    // weights are zeroed, adding exactly 0). A plain unrolled loop let ptxas
                    // place each load next to its FMAs: one or two loads in flight per warp.
                    using Raw = typename WLoad<WT>::Raw;
                    Raw cur[GEMV_UNR];
                    const int ul = max(u1 - 1, u0);
#pragma unroll
                    for (int i = 0; i < GEMV_UNR; i++) cur[i] = WLoad<WT>::raw(wrow + min(u0 + lane + 32 * i, ul) * VW);
                    for (int u = u0 + lane; u < u1; u += 32 * GEMV_UNR) {
                        Raw nxt[GEMV_UNR];
#pragma unroll
                        for (int i = 0; i < GEMV_UNR; i++)
                            nxt[i] = WLoad<WT>::raw(wrow + min(u + 32 * (GEMV_UNR + i), ul) * VW);
#pragma unroll
                        for (int i = 0; i < GEMV_UNR; i++) {
                            const bool in = u + 32 * i < u1;
                            const int k = min(u + 32 * i, ul) * VW;
                            float wv[VW];
                            WLoad<WT>::unpack(cur[i], wv);
#pragma unroll
                            for (int q = 0; q < VW; q++) wv[q] = in ? wv[q] : 0.f;
#pragma unroll
                            for (int j = 0; j < MT; j++) {
#pragma unroll
                                for (int q = 0; q < VW; q += 4) {
                                    const float4 xv = __ldg(reinterpret_cast<const float4 *>(xr[j] + k + q));
                                    acc[j] = fmaf(wv[q], xv.x, acc[j]);
                                    acc[j] = fmaf(wv[q + 1], xv.y, acc[j]);
                                    acc[j] = fmaf(wv[q + 2], xv.z, acc[j]);
                                    acc[j] = fmaf(wv[q + 3], xv.w, acc[j]);
                                }
                            }
                        }
#pragma unroll
                        for (int i = 0; i < GEMV_UNR; i++) cur[i] = nxt[i];
                    }
                } else {
#pragma unroll 4
                    for (int k = u0 + lane; k < u1; k += 32) {
                        const float wv = WLoad<WT>::one(wrow + k);
#pragma unroll
                        for (int j = 0; j < MT; j++)
                            if (j < nj) acc[j] = fmaf(wv, __ldg(xr[j] + k), acc[j]);
                    }
                }
            }
#pragma unroll
            for (int j = 0; j < MT; j++) acc[j] = bm_warp_sum(acc[j]);
            // lane j finishes token j (compile-time indices: a select, no local array)
            float v = acc[0];
#pragma unroll
            for (int j = 1; j < MT; j++)
                if (lane == j) v = acc[j];
            if (KS > 1) {
                if (lane < MT) part[warp][lane] = v;
                __syncthreads();
                if (kpart == 0) {
                    for (int q = 1; q < KS; q++) v += part[warp + q][lane < MT ? lane : 0];
                }
                __syncthreads();  // part is rewritten by the next tile
            }
            if (kpart == 0 && row < p.Nout && lane < nj) {
                const int m = list[j0 + lane];
                const float s = p.scale ? p.scale[m] : 1.f;
                const float out = fmaf(v, s, bias);
                p.y[(int64_t)m * p.ldy + row] = out;
                if (p.conv_w && row < p.conv_E) conv_epilogue(p, m, row, out);
            }
        }
        __syncthreads();  // list is rewritten next round
    }
}

// The batch-1 GEMV (one row of x, no expert ids, vector loads) in the early PDL form
// (bm_pdl_early, GemvParams::w_static): trigger, then this lane's first GEMV1_PRE 16-byte
// weight pieces of its row (and, for the conv epilogue's rows, the conv weights and this
// channel's conv state, which only this kernel writes, one step before), then the wait, then x
// and the FMAs. So the weight bytes move while the kernels before this one finish, instead of
// each kernel paying an HBM round trip, its ramp-up and its tail after the previous one ended.
// The FMAs run in gemv_kernel<WT, 1, true>'s order (pieces u0 + lane + 32 i ascending), the
// conv epilogue in conv_epilogue's: bit-identical outputs. GEMV1_PRE = 6 covers the 2.8B
// shape's rows (in_proj 184 pieces a row, out_proj 368 split in 2, x_proj 368 in 8); a longer
// slice continues after the wait with the plain loop. At most 40 registers (6 blocks of 256
// an SM): the weights held for the wait must leave room for the neighbouring kernels' blocks.
// NORM: the RMSNorm prologue of GemvParams (norm_h ..): after the wait each block sums h + r
// from L2 and normalises it into shared memory (x, Kin floats of dynamic shared memory), in
// rms_norm_kernel<4, true>'s arithmetic and thread layout (256 threads = its block_for(d / 4)
// from d = 1024 on; below, its missing threads are this block's idle ones, which add exact
// zeros to the sums), so x has the bits the norm kernel would have written; block 0 writes the
// residual and x out. It replaces the norm's graph node (at the 2.8B shape ~4.7 us of a
// batch-1 step's critical path a Mamba layer, its L2 reads queued behind in_proj's early
// weight loads) by ~12 KB of reads in each block after the wait. Measured slower (a batch-1
// step 0.684 -> 0.734 ms, with __ldcg or __ldca alike), so the engine takes it only with
// BLACKMAMBA_DECODE_NORM_FUSE=1.
constexpr int GEMV1_PRE = 6;

template <typename WT, bool NORM = false>
__global__ __launch_bounds__(GEMV_WARPS * 32, 6) void gemv1_kernel(const GemvParams p, int ks_log2) {
    bm_pdl_trigger();
    constexpr int VW = WLoad<WT>::VW;
    using Raw = typename WLoad<WT>::Raw;
    __shared__ float part[GEMV_WARPS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int KS = 1 << ks_log2;
    const int kpart = warp & (KS - 1);
    const int row = blockIdx.x * (GEMV_WARPS >> ks_log2) + (warp >> ks_log2);
    const bool live = row < p.Nout;
    const WT *wrow = reinterpret_cast<const WT *>(p.W) + (int64_t)(live ? row : 0) * p.Kin;
    const int units = p.Kin / VW;
    const int per = (units + KS - 1) / KS;
    const int u0 = kpart * per, u1 = min(units, u0 + per);
    // ---- before the wait: weights and this row's own conv state only ----
    Raw w[GEMV1_PRE];
#pragma unroll
    for (int i = 0; i < GEMV1_PRE; i++) {
        const int u = u0 + lane + 32 * i;
        if (live && u < u1) w[i] = WLoad<WT>::raw_ca(wrow + (int64_t)u * VW);
        else w[i] = Raw{};  // never used
    }
    const float bias = (p.bias && live) ? __ldca(p.bias + row) : 0.f;
    // The conv operands of channel `row`, one per lane (warp-uniform condition): lanes k < K
    // conv_w[row, k], lanes K + k (k < K - 1) state k, lane 2K - 1 conv_b[row].
    const int K = p.conv_K, E = p.conv_E;
    const bool conv_sh = p.conv_w && live && row < E && kpart == 0;  // 2 <= K <= 16 (launcher)
    float *st = conv_sh ? p.conv_state + row : nullptr;   // m = 0, step E
    float cv = 0.f;
    if (conv_sh) {
        if (lane < K) cv = __ldca(p.conv_w + (int64_t)row * K + lane);
        else if (lane < 2 * K - 1) cv = __ldca(st + (int64_t)(lane - K) * E);
        else if (lane == 2 * K - 1 && p.conv_b) cv = __ldca(p.conv_b + row);
    }
    bm_pdl_wait_only();
    bm_l1_invalidate_block();
    // ---- after the wait: x (written by the kernel before), or NORM: x from h and r ----
    float *xs = nullptr;  // NORM: (Kin) the normalised row, in dynamic shared memory
    if constexpr (NORM) {
        extern __shared__ __align__(16) float xs_dyn[];
        xs = xs_dyn;
        __shared__ float scratch[32];
        const int nv = p.Kin / 4;
        const float4 *h4 = reinterpret_cast<const float4 *>(p.norm_h);
        const float4 *r4 = reinterpret_cast<const float4 *>(p.norm_r);
        float4 *xs4 = reinterpret_cast<float4 *>(xs);
        float4 *ro = blockIdx.x == 0 ? reinterpret_cast<float4 *>(p.norm_r_out) : nullptr;
        float ss = 0.f;
        // Through L1 (clean since this block's invalidation after the wait): the blocks of an
        // SM share the row's lines instead of each pulling all of them from the same few L2
        // slices (run 8: __ldcg made this launch 17.2 us against the norm + in_proj's 8.5 +
        // 11.0; every one of 736 blocks read the same 96 lines).
        for (int i = threadIdx.x; i < nv; i += GEMV_WARPS * 32) {
            float4 r = __ldca(h4 + i);
            if (r4) {
                const float4 q = __ldca(r4 + i);
                r = make_float4(r.x + q.x, r.y + q.y, r.z + q.z, r.w + q.w);
            }
            xs4[i] = r;
            if (ro) ro[i] = r;
            ss += bm_sumsq4(r);
        }
        ss = bm_block_sum(ss, scratch);
        const float s = rsqrtf(ss / (float)p.Kin + p.norm_eps);
        float4 *xo = blockIdx.x == 0 ? reinterpret_cast<float4 *>(p.norm_x_out) : nullptr;
        for (int i = threadIdx.x; i < nv; i += GEMV_WARPS * 32) {
            const float4 a = xs4[i], nw = __ldca(reinterpret_cast<const float4 *>(p.norm_w) + i);
            const float4 v = make_float4(a.x * s * nw.x, a.y * s * nw.y, a.z * s * nw.z,
                                         a.w * s * nw.w);
            xs4[i] = v;
            if (xo) xo[i] = v;
        }
        __syncthreads();
    }
    float acc = 0.f;
    if (live) {
        // x from shared memory (NORM) or global memory
        const float *xr = NORM ? xs : p.x;
        auto ldx = [&](int k) {
            if constexpr (NORM) return *reinterpret_cast<const float4 *>(xr + k);
            else return __ldca(reinterpret_cast<const float4 *>(xr + k));
        };
#pragma unroll
        for (int i = 0; i < GEMV1_PRE; i++) {
            const int u = u0 + lane + 32 * i;
            if (u < u1) {
                const int k = u * VW;
                float wv[VW];
                WLoad<WT>::unpack(w[i], wv);
#pragma unroll
                for (int q = 0; q < VW; q += 4) {
                    const float4 xv = ldx(k + q);
                    acc = fmaf(wv[q], xv.x, acc);
                    acc = fmaf(wv[q + 1], xv.y, acc);
                    acc = fmaf(wv[q + 2], xv.z, acc);
                    acc = fmaf(wv[q + 3], xv.w, acc);
                }
            }
        }
#pragma unroll 2
        for (int u = u0 + lane + 32 * GEMV1_PRE; u < u1; u += 32) {
            const int k = u * VW;
            float wv[VW];
            WLoad<WT>::load(wrow + k, wv);
#pragma unroll
            for (int q = 0; q < VW; q += 4) {
                const float4 xv = ldx(k + q);
                acc = fmaf(wv[q], xv.x, acc);
                acc = fmaf(wv[q + 1], xv.y, acc);
                acc = fmaf(wv[q + 2], xv.z, acc);
                acc = fmaf(wv[q + 3], xv.w, acc);
            }
        }
    }
    float v = bm_warp_sum(acc);  // every lane holds the sum
    if (KS > 1) {  // every warp gets here: the barrier is unconditional
        if (lane == 0) part[warp] = v;
        __syncthreads();
        if (kpart == 0)
            for (int q = 1; q < KS; q++) v += part[warp + q];
    }
    if (kpart != 0 || !live) return;
    const float out = fmaf(v, 1.f, bias);  // gemv_kernel's fmaf(v, scale 1, bias)
    if (lane == 0) p.y[row] = out;
    if (conv_sh) {
        // conv_epilogue's arithmetic in its order, every lane (the shuffles), lane 0 stores
        float a = __shfl_sync(0xffffffffu, cv, 2 * K - 1);
        for (int k = 0; k < K - 1; k++)
            a = fmaf(__shfl_sync(0xffffffffu, cv, k), __shfl_sync(0xffffffffu, cv, K + k), a);
        a = fmaf(__shfl_sync(0xffffffffu, cv, K - 1), out, a);
        const float next = __shfl_down_sync(0xffffffffu, cv, 1);  // old state k + 1 at lane K + k
        if (lane >= K && lane < 2 * K - 2) st[(int64_t)(lane - K) * E] = next;
        if (lane == 0) {
            st[(int64_t)(K - 2) * E] = out;
            p.conv_y[row] = bm_silu(a);
        }
    }
}

// gemv1_kernel launches with the norm prologue (tests assert the path was taken).
std::atomic<long long> g_gemv1_norm{0};

// The batch-1 graph's long products (the LM head: 50304 rows of 1472 at the 2.8B shape),
// which gemv_kernel ran as one block per 8 rows: 6288 blocks in ~6 waves, 59 us for 148 MB
// (2.5 TB/s), and not PDL-launched (more than one wave). Here a one-wave grid whose warps walk
// rows (row = global warp, + all warps, ..): each lane holds its HEAD_PRE 16-byte pieces of
// the current row and loads the next row's before the current row's FMAs and reduction, so
// two rows' loads are in flight per warp without the block launches and barriers of short
// blocks; the first row's pieces are loaded before the PDL wait. x goes to shared memory
// once per block after the wait (and the L1 invalidation: this kernel runs early). Per row the
// FMAs run in gemv_kernel<WT, 1, true>'s order (pieces lane + 32 i ascending; its clamped
// extra pieces add exact zeros), so the logits are bit-identical.
// BLACKMAMBA_DECODE_HEAD=0: gemv_kernel, as before (read at launch, i.e. at capture).
constexpr int HEAD_PRE = 6;      // pieces a lane holds per row: Kin <= 6 * 32 * VW (1536 bf16)
constexpr int HEAD_THREADS = 256;
std::atomic<long long> g_gemv_head{0};

bool head_on() { return bm_env_switch("BLACKMAMBA_DECODE_HEAD", true); }

template <typename WT>
__global__ __launch_bounds__(HEAD_THREADS) void gemv_head_kernel(const GemvParams p) {
    bm_pdl_trigger();
    constexpr int VW = WLoad<WT>::VW;
    using Raw = typename WLoad<WT>::Raw;
    extern __shared__ __align__(16) float xs[];  // (Kin)
    const int lane = threadIdx.x & 31;
    const int64_t nw = (int64_t)gridDim.x * (HEAD_THREADS / 32);
    int64_t row = (int64_t)blockIdx.x * (HEAD_THREADS / 32) + (threadIdx.x >> 5);
    const int units = p.Kin / VW;
    const WT *W = reinterpret_cast<const WT *>(p.W);
    auto load = [&](int64_t r, Raw (&w)[HEAD_PRE]) {
        const WT *wr = W + (r < p.Nout ? r : 0) * (int64_t)p.Kin;
#pragma unroll
        for (int i = 0; i < HEAD_PRE; i++) {
            const int u = lane + 32 * i;
            w[i] = r < p.Nout && u < units ? WLoad<WT>::raw_ca(wr + (int64_t)u * VW) : Raw{};
        }
    };
    Raw cur[HEAD_PRE];
    load(row, cur);  // weights only before the wait
    bm_pdl_wait_only();
    bm_l1_invalidate_block();
    for (int i = threadIdx.x; i < p.Kin / 4; i += HEAD_THREADS)
        reinterpret_cast<float4 *>(xs)[i] = __ldca(reinterpret_cast<const float4 *>(p.x) + i);
    __syncthreads();
    for (; row < p.Nout; row += nw) {
        Raw nxt[HEAD_PRE];
        load(row + nw, nxt);
        float acc = 0.f;
#pragma unroll
        for (int i = 0; i < HEAD_PRE; i++) {
            const int u = lane + 32 * i;
            if (u < units) {
                float wv[VW];
                WLoad<WT>::unpack(cur[i], wv);
#pragma unroll
                for (int q = 0; q < VW; q += 4) {
                    const float4 xv = *reinterpret_cast<const float4 *>(xs + u * VW + q);
                    acc = fmaf(wv[q], xv.x, acc);
                    acc = fmaf(wv[q + 1], xv.y, acc);
                    acc = fmaf(wv[q + 2], xv.z, acc);
                    acc = fmaf(wv[q + 3], xv.w, acc);
                }
            }
        }
        const float v = bm_warp_sum(acc);
        if (lane == 0) p.y[row] = fmaf(v, 1.f, p.bias ? p.bias[row] : 0.f);  // gemv_kernel's
#pragma unroll
        for (int i = 0; i < HEAD_PRE; i++) cur[i] = nxt[i];
    }
}

template <typename WT, int MT>
int gemv_launch_mt(const GemvParams &p, int X, int ks, cudaStream_t stream) {
    constexpr int VW = WLoad<WT>::VW;
    const bool vec = p.Kin % VW == 0 && p.ldx % 4 == 0 && ((uintptr_t)p.W & 15) == 0 &&
                     ((uintptr_t)p.x & 15) == 0;
    const int64_t units = vec ? p.Kin / VW : p.Kin;
    if (ks <= 0) {
        // Split only while there are few rows (warps), as long as a slice still spans the
        // warp. Measured on the H200 (cuda/NOTES.md): splitting 124 x 2944 by 8 took 9.0 ->
        // 3.3 us and 1472 x 2944 by 4 9.6 -> 7.1 us, but splitting rows that were already
        // many (in_proj, fc1, lm_head) only added the reduction: 55 -> 69 us on lm_head.
        ks = 1;
        while (ks < GEMV_WARPS && (int64_t)p.Nout * ks < 4096 && units >= 64 * ks) ks *= 2;
    }
    int ks_log2 = 0;
    while ((1 << ks_log2) < ks && ks_log2 < 3) ks_log2++;
    dim3 grid((unsigned)bm_cdiv(p.Nout, GEMV_WARPS >> ks_log2), (unsigned)X);
    // The batch-1 graph's products in the early form (gemv1_kernel): the engine's weights, one
    // row of x, and a grid that bm_launch_pdl launches with PDL (one wave; the LM head's 6288
    // blocks are not, and run gemv_kernel as before).
    int sms = 0;
    if (const int st0 = bm_sm_count(&sms)) return st0;
    const bool early = p.w_static && p.M == 1 && X == 1 && !p.ids && bm_pdl_early() &&
                       (int64_t)grid.x * grid.y <= 8 * (int64_t)sms;
    // The norm prologue rides along where its row fits 48 KB of shared memory, float4-wise:
    // the dynamic row plus the kernel's static part[] and scratch[] (176 bytes; 256 kept free),
    // since without an opt-in the launch fails once static + dynamic exceed 48 KB.
    const bool norm = p.norm_h != nullptr;
    const bool norm_in = norm && p.Kin % 4 == 0 && (size_t)p.Kin * 4 + 256 <= 48 * 1024 &&
                         ((uintptr_t)p.norm_h & 15) == 0 && ((uintptr_t)p.norm_r & 15) == 0 &&
                         ((uintptr_t)p.norm_w & 15) == 0 && ((uintptr_t)p.norm_r_out & 15) == 0 &&
                         ((uintptr_t)p.norm_x_out & 15) == 0;
    if (MT == 1 && vec && early && !p.scale && (!p.conv_w || (p.conv_K >= 2 && p.conv_K <= 16)) &&
        (!norm || norm_in)) {
        if (norm) {
            BM_LAUNCH_PDL((gemv1_kernel<WT, true>), grid, dim3(GEMV_WARPS * 32),
                          (size_t)p.Kin * 4, stream, p, ks_log2);
            g_gemv1_norm.fetch_add(1, std::memory_order_relaxed);
        } else {
            BM_LAUNCH_PDL(gemv1_kernel<WT>, grid, dim3(GEMV_WARPS * 32), 0, stream, p, ks_log2);
        }
        bm_pdl_early_count(BM_EARLY_GEMV1);
        return 0;
    }
    if (norm) {  // the prologue as its own kernel (norm_x_out is p.x)
        const int st = bm_rms_norm_static_w(p.norm_h, p.norm_r, p.norm_w, p.norm_eps,
                                            p.norm_x_out, p.norm_r_out, nullptr, nullptr, 1,
                                            p.Kin, stream);
        if (st) return st;
    }
    // The long batch-1 products (the LM head): gemv_head_kernel, one wave, PDL.
    if (MT == 1 && vec && p.w_static && p.M == 1 && X == 1 && !p.ids && !p.scale &&
        !p.conv_w && !p.norm_h && p.Kin % 4 == 0 && p.Kin / VW <= 32 * HEAD_PRE &&
        p.Kin <= 12288 && grid.x > 8 * sms && bm_pdl_early() && head_on()) {
        int per_sm = 0;
        BM_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &per_sm, gemv_head_kernel<WT>, HEAD_THREADS, (size_t)p.Kin * 4));
        const unsigned blocks = (unsigned)std::max(1, per_sm) * (unsigned)sms;
        BM_LAUNCH_PDL(gemv_head_kernel<WT>, dim3(blocks), dim3(HEAD_THREADS),
                      (size_t)p.Kin * 4, stream, p);
        g_gemv_head.fetch_add(1, std::memory_order_relaxed);
        return 0;
    }
    // a wait-first product in the batch-1 graph (behind early kernels: INV), or as before
    auto *k = vec ? (early ? gemv_kernel<WT, MT, true, true> : gemv_kernel<WT, MT, true>)
                  : (early ? gemv_kernel<WT, MT, false, true> : gemv_kernel<WT, MT, false>);
    BM_LAUNCH_PDL(k, grid, dim3(GEMV_WARPS * 32), 0, stream, p, ks_log2);
    return 0;
}

template <typename WT>
int gemv_launch_t(const GemvParams &p, int X, int ks, cudaStream_t stream) {
    // Rows of x per pass: 1 for single-token decode (fewest registers, most warps resident).
    if (p.M == 1 && !p.ids) return gemv_launch_mt<WT, 1>(p, X, ks, stream);
    if (p.M <= 4) return gemv_launch_mt<WT, 4>(p, X, ks, stream);
    return gemv_launch_mt<WT, 8>(p, X, ks, stream);
}

}  // namespace

int bm_gemv_launch(const GemvParams &p, bm_dtype wdtype, int X, int ksplit, cudaStream_t stream) {
    if (p.M <= 0 || p.Nout <= 0 || X <= 0) return 0;
    if (X > 65535) return BM_CUDA_ARG_FAIL("gemv: too many experts");
    // Block 0 writes norm_r_out and norm_x_out while the other blocks still read norm_h and
    // norm_r: neither output may be one of the inputs (the engine's buffers are disjoint).
    if (p.norm_h && (p.M != 1 || X != 1 || p.ids || p.x != p.norm_x_out || !p.norm_w ||
                     !p.norm_r_out || p.norm_r_out == p.norm_r || p.norm_r_out == p.norm_h ||
                     p.norm_x_out == p.norm_h || p.norm_x_out == p.norm_r ||
                     p.norm_x_out == p.norm_r_out))
        return BM_CUDA_ARG_FAIL("gemv: the norm prologue takes one row, x = norm_x_out and "
                                "outputs (x, residual) apart from its inputs and each other");
    if (ksplit != 0 && ksplit != 1 && ksplit != 2 && ksplit != 4 && ksplit != 8)
        return BM_CUDA_ARG_FAIL("gemv: ksplit must be 0 (auto), 1, 2, 4 or 8");
    switch (wdtype) {
        case BM_BF16: return gemv_launch_t<uint16_t>(p, X, ksplit, stream);
        case BM_F16: return gemv_launch_t<__half>(p, X, ksplit, stream);
        case BM_F32: return gemv_launch_t<float>(p, X, ksplit, stream);
    }
    return BM_CUDA_ARG_FAIL("gemv: weights must be float32, bfloat16 or float16");
}

extern "C" int bm_cuda_gemv_ks(const float *x, const void *W, bm_dtype wdtype, const float *bias,
                               float *y, int64_t M, int64_t Nout, int64_t Kin, int ksplit,
                               cudaStream_t stream) {
    if (M <= 0 || Nout <= 0) return 0;
    if (M > INT32_MAX || Nout > INT32_MAX || Kin > INT32_MAX)
        return BM_CUDA_ARG_FAIL("gemv: size too large");
    if (Kin <= 0) return BM_CUDA_ARG_FAIL("gemv: Kin must be >= 1");
    GemvParams p{W, x, Kin, nullptr, nullptr, bias, y, Nout, (int)M, (int)Nout, (int)Kin};
    return bm_gemv_launch(p, wdtype, 1, ksplit, stream);
}

extern "C" int bm_cuda_gemv(const float *x, const void *W, bm_dtype wdtype, const float *bias,
                            float *y, int64_t M, int64_t Nout, int64_t Kin, cudaStream_t stream) {
    return bm_cuda_gemv_ks(x, W, wdtype, bias, y, M, Nout, Kin, 0, stream);
}

extern "C" long long bm_cuda_gemv1_norm_calls(void) {
    return g_gemv1_norm.load(std::memory_order_relaxed);
}

extern "C" long long bm_cuda_gemv_head_calls(void) {
    return g_gemv_head.load(std::memory_order_relaxed);
}
