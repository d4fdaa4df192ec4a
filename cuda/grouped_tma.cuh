// grouped_tma.cuh: the prefill grouped GEMMs on the wgmma core with a bulk-tensor-copy (TMA)
// producer (sm_90a). Included by grouped.cu after grouped_wgmma.cuh (its wgmma wrappers,
// descriptors and epilogue layout); no other user.
//
// The same GEMMs, tile (2 x 64 rows, 256 weight rows), k order and epilogues as
// grouped_wgmma_kernel's "66" / "11" variants, so the results are bit-identical to them; what
// changes is how the operands arrive and how the CTAs walk the tiles:
//   - a persistent grid (one CTA an SM) walks the tiles t = blockIdx.x, + gridDim.x, ... (row
//     tile t / ncols over the experts' offsets, column tile t % ncols), so a CTA's next tile's
//     loads overlap its epilogue;
//   - warp-specialised: warpgroup 0 is the producer (one thread issues the copies: three
//     2D bulk tensor copies of 64 x 128 bf16 per k tile, completing on the stage's "full"
//     mbarrier), warpgroups 1 and 2 the consumers (64 rows each, wgmma m64n256k16 from the
//     swizzled stages, one group in flight; each warp hands a stage back on its "empty"
//     mbarrier once the group that read it retired). No CTA-wide barrier in the main loop;
//     setmaxnreg moves registers from the producer to the consumers;
//   - the tensor maps' 128-byte swizzle writes exactly swz()'s layout (grouped.cu), which the
//     descriptors read (wg_desc);
//   - A must be contiguous in slot order: fc2's A (the fc1 output) is; fc1's token rows are
//     gathered through perm into GroupedArgs::xg first (gather_rows_kernel: T d 2 bytes read
//     and written, ~2% of the GEMM's time at the prefill sizes).
// Rows past an expert's end (the next expert's slots, or past T: zeros) and weight rows past
// N (the next rows of the tensor, or zeros past its end) are loaded and multiplied but never
// stored: an output (r, c) depends only on A row r and weight row c. Except (skip, session 24):
// the second consumer warpgroup of a tile with at most 64 rows (an expert's last row tile, half
// the time) only hands the stages back, no wgmma and no epilogue, which leaves the SM's tensor
// cores to the first. K tails are zero-filled
// by the copy engine (the maps' inner extent is K).
#pragma once

#if BM_WGMMA_DEVICE
__device__ __forceinline__ void mbar_init(uint32_t bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar),
                 "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, unsigned parity) {
    uint32_t ok = 0;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(ok)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!ok);
}
// 2D tile (c0 = inner coordinate: K, c1 = row) of the map into shared memory at dst.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap *map, uint32_t bar,
                                            int c0, int c1) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%3, %4}], [%2];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
        : "memory");
}
#endif

constexpr int TM_S = 4;                     // stages
constexpr int TM_BM = 128;                  // rows a tile: 2 consumer warpgroups of 64
constexpr int TM_BN = 256;                  // weight rows a tile (FC1: 128 gate + 128 up)
constexpr int TM_BOX = 128;                 // rows a copy (the copy engine's box: 64 x 128)
constexpr int TM_A = TM_BM * 128;           // one k tile of A: 16 KB
constexpr int TM_STAGE = TM_A + TM_BN * 128;  // + the weights: 48 KB
constexpr int TM_SMEM = TM_STAGE * TM_S + 1024;  // + slack to align the stages to 1024
constexpr int TM_NT = 384;                  // producer warpgroup + 2 consumer warpgroups

// Which expert, first slot and rows has row tile y (grouped.cu's walk_tile over the offsets
// in shared memory)?
__device__ __forceinline__ bool tma_tile(const int *offs, int X, int y, int &e, int &row0,
                                         int &rows) {
    return walk_tile([&](int i) { return offs[i]; }, X, TM_BM, y, e, row0, rows);
}

template <int MODE>
__global__ void __launch_bounds__(TM_NT, 1)
    grouped_tma_kernel(const __grid_constant__ CUtensorMap map_a,
                       const __grid_constant__ CUtensorMap map_w, const GroupedArgs p,
                       int ncols, int ntiles, int skip) {
#if !BM_WGMMA_DEVICE
    __trap();
#else
    extern __shared__ unsigned char tm_smem[];
    __shared__ __align__(8) uint64_t bars[2 * TM_S];  // full[s], then empty[s]
    __shared__ int offs[MAX_EXPERTS + 1];
    const uint32_t sbase = (smem_u32(tm_smem) + 1023u) & ~1023u;
    // the warpgroup as a warp-uniform value (a shuffle from lane 0): with the plain division
    // ptxas takes the consumer branch for divergent and serialises its wgmma (C7518)
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);
    const uint32_t full0 = smem_u32(&bars[0]), empty0 = smem_u32(&bars[TM_S]);
    const int X = p.X, K = p.K, N = p.N;
    for (int i = tid; i <= X; i += TM_NT) offs[i] = __ldg(p.offsets + i);
    if (tid == 0) {
        for (int s = 0; s < TM_S; s++) {
            mbar_init(full0 + 8 * s, 1);   // the producer's arrive (+ the copies' bytes)
            mbar_init(empty0 + 8 * s, 8);  // one arrive per consumer warp
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    }
    __syncthreads();
    const int KT = (K + BK - 1) / BK;
    constexpr int OUT_COLS = MODE == MODE_FC1 ? TM_BN / 2 : TM_BN;
    const int64_t wrows = MODE == MODE_FC1 ? 2 * (int64_t)N : N;  // weight rows per expert

    if (wg == 0) {  // producer
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (warp == 0 && lane == 0) {
            int it = 0;
            for (int t = blockIdx.x; t < ntiles; t += gridDim.x) {
                int e, row0, rows;
                if (!tma_tile(offs, X, t / ncols, e, row0, rows)) continue;
                const int n0 = (t % ncols) * OUT_COLS;
                // weight rows of the two boxes: FC1 gate n0.. and up N + n0..; FC2 n0.., n0 + 128..
                const int w0 = (int)(e * wrows + n0);
                const int w1 = MODE == MODE_FC1 ? w0 + N : w0 + TM_BOX;
                for (int kt = 0; kt < KT; kt++, it++) {
                    const int s = it % TM_S;
                    const unsigned ph = (unsigned)(it / TM_S) & 1u;
                    mbar_wait(empty0 + 8 * s, ph ^ 1u);  // the first pass finds it free
                    const uint32_t fb = full0 + 8 * s, sA = sbase + s * TM_STAGE;
                    mbar_expect_tx(fb, TM_STAGE);
                    tma_load_2d(sA, &map_a, fb, kt * BK, row0);
                    tma_load_2d(sA + TM_A, &map_w, fb, kt * BK, w0);
                    tma_load_2d(sA + TM_A + TM_BOX * 128, &map_w, fb, kt * BK, w1);
                }
            }
        }
    } else {  // consumers: warpgroup cw owns rows [64 cw, 64 cw + 64) of each tile
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
        const int cw = wg - 1;
        int it = 0;
        for (int t = blockIdx.x; t < ntiles; t += gridDim.x) {
            int e, row0, rows;
            if (!tma_tile(offs, X, t / ncols, e, row0, rows)) continue;
            const int n0 = (t % ncols) * OUT_COLS;
            // skip: none of this warpgroup's rows is in the tile (warpgroup-uniform)
            const bool idle = skip && cw * 64 >= rows;
            const int rbase = cw * 64 + (warp & 3) * 16 + (lane >> 2);
            // FC2: this thread's two rows' tokens and gates, in flight during the k loop
            const WgRows w = wg_rows<MODE>(p, rbase, rows, row0);
            float acc[TM_BN / 2];
#pragma unroll
            for (int i = 0; i < TM_BN / 2; i++) acc[i] = 0.f;
            int prev = -1;  // the stage whose wgmma group is still in flight
            for (int kt = 0; kt < KT; kt++, it++) {
                const int s = it % TM_S;
                mbar_wait(full0 + 8 * s, (unsigned)(it / TM_S) & 1u);
                if (idle) {  // the stage back at once (after its fill: the phases stay in step)
                    if (lane == 0) mbar_arrive(empty0 + 8 * s);
                    continue;
                }
                // (without skip, a warpgroup past the tile's rows multiplies rows nobody stores)
                wg_k_tile<TM_BN>(acc, sbase + s * TM_STAGE + cw * (64 * 128),
                                 sbase + s * TM_STAGE + TM_A);
                wg_wait<1>();  // the group of the previous k tile retired
                wg_fence_acc(acc);
                if (prev >= 0 && lane == 0) mbar_arrive(empty0 + 8 * prev);
                prev = s;
            }
            wg_wait<0>();
            wg_fence_acc(acc);
            if (prev >= 0 && lane == 0) mbar_arrive(empty0 + 8 * prev);

            // Epilogue: grouped_wgmma_kernel's (its accumulator layout), BN = 256.
            if (!idle) wg_epilogue<TM_BN, MODE>(acc, p, w, rbase, rows, row0, n0);
        }
    }
#endif
}

// xg[slot] = xb[perm[slot]] for the routed slots (slot < offsets[X]): fc1's A in slot order.
__global__ void gather_rows_kernel(const uint16_t *__restrict__ xb, const int32_t *__restrict__ perm,
                                   const int32_t *__restrict__ offsets, int X, int d,
                                   uint16_t *__restrict__ xg) {
    const int slot = blockIdx.x;
    if (slot >= __ldg(offsets + X)) return;
    const uint4 *src = reinterpret_cast<const uint4 *>(xb + (int64_t)__ldg(perm + slot) * d);
    uint4 *dst = reinterpret_cast<uint4 *>(xg + (int64_t)slot * d);
    for (int i = threadIdx.x; i < d / 8; i += blockDim.x) dst[i] = __ldg(src + i);
}

// Launches of the TMA core (bm_cuda_moe_grouped_tma_launches): the tests assert the path.
std::atomic<long long> tma_launches{0};
// BLACKMAMBA_MOE_TMA_SKIP (session 24): unset / "1" a tile's idle second consumer warpgroup
// skips its wgmma (see the top); "0" it multiplies as before (A/B, tests). Read per call.
bool tma_skip_on() { return bm_env_switch("BLACKMAMBA_MOE_TMA_SKIP", true); }

// cuTensorMapEncodeTiled from the driver, through the runtime (no link to libcuda); NULL if
// the driver does not offer it.
PFN_cuTensorMapEncodeTiled_v12000 tma_encoder() {
    static std::atomic<int> state{0};  // 0 unknown, 1 found, 2 not
    static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
    int s = state.load(std::memory_order_acquire);
    if (s == 0) {
        void *f = nullptr;
        cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
        const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000,
                                                               cudaEnableDefault, &q);
#else  // toolkits 12.0-12.4 (13.0 has only the versioned form)
        const cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f,
                                                      cudaEnableDefault, &q);
#endif
        const bool ok = e == cudaSuccess && q == cudaDriverEntryPointSuccess && f;
        (void)cudaGetLastError();
        if (ok) fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
        state.store(ok ? 1 : 2, std::memory_order_release);
        s = ok ? 1 : 2;
    }
    return s == 1 ? fn : nullptr;
}

// A (rows, K) bf16 row-major matrix as a map of 64 x 128 boxes with the 128-byte swizzle.
bool tma_map(PFN_cuTensorMapEncodeTiled_v12000 enc, CUtensorMap *map, const void *base,
             int64_t rows, int64_t K) {
    const cuuint64_t dims[2] = {(cuuint64_t)K, (cuuint64_t)rows};
    const cuuint64_t strides[1] = {(cuuint64_t)K * 2};
    const cuuint32_t box[2] = {(cuuint32_t)BK, (cuuint32_t)TM_BOX};
    const cuuint32_t estr[2] = {1, 1};
    return enc(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void *>(base), dims, strides,
               box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
               CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) ==
           CUDA_SUCCESS;
}

// BLACKMAMBA_MOE_TMA: "0" off (the cp.async wgmma core), "1" or unset: the TMA core where
// the wgmma core would run, "force": as the wgmma core's "force" (every unsplit call). Read
// per call (tests flip it).
int tma_mode() {
    const char *v = getenv("BLACKMAMBA_MOE_TMA");
    if (!v || !v[0]) return TMA_DEFAULT_ON;
    if (v[0] == '0') return 0;
    return strcmp(v, "force") == 0 ? 2 : 1;
}

// Launch one grouped GEMM on the TMA core: returns 0 or an error status; *taken false (and
// nothing launched) where it cannot run (no encoder, K or alignment the copy engine refuses,
// no gather buffer for FC1, sizes past 32-bit coordinates): the caller then takes the
// cp.async core.
template <int MODE>
int tma_launch(const GroupedArgs &p, int64_t T, cudaStream_t stream, bool *taken) {
    *taken = false;
    PFN_cuTensorMapEncodeTiled_v12000 enc = tma_encoder();
    if (!enc || (MODE == MODE_FC1 && !p.xg) || p.K % 8 || T > INT32_MAX / 2) return 0;
    const int64_t wrows = (MODE == MODE_FC1 ? 2 * (int64_t)p.N : p.N) * p.X;
    if (wrows > INT32_MAX / 2) return 0;
    const int out_cols = MODE == MODE_FC1 ? TM_BN / 2 : TM_BN;
    const int64_t ncols = bm_cdiv(p.N, out_cols);
    const int64_t ntiles = ncols * row_tiles(T, p.X, TM_BM);
    if (ntiles > INT32_MAX) return 0;
    CUtensorMap ma, mw;
    const void *a = MODE == MODE_FC1 ? (const void *)p.xg : (const void *)p.A;
    if ((((uintptr_t)a | (uintptr_t)p.W) & 15) || !tma_map(enc, &ma, a, T, p.K) ||
        !tma_map(enc, &mw, p.W, wrows, p.K))
        return 0;
    static std::atomic<unsigned> optin{0};
    int st = bm_smem_optin(grouped_tma_kernel<MODE>, TM_SMEM, optin);
    if (st) return st;
    int sms = 0;
    if ((st = bm_sm_count(&sms))) return st;
    if (MODE == MODE_FC1) {  // A in slot order
        gather_rows_kernel<<<(unsigned)T, 128, 0, stream>>>(p.A, p.perm, p.offsets, p.X, p.K,
                                                           p.xg);
        BM_CUDA_LAUNCHED();
    }
    const unsigned grid = (unsigned)(ntiles < sms ? ntiles : sms);
    grouped_tma_kernel<MODE><<<grid, TM_NT, TM_SMEM, stream>>>(ma, mw, p, (int)ncols, (int)ntiles,
                                                               tma_skip_on() ? 1 : 0);
    BM_CUDA_LAUNCHED();
    tma_launches.fetch_add(1, std::memory_order_relaxed);
    *taken = true;
    return 0;
}
