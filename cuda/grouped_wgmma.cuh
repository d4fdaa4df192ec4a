// grouped_wgmma.cuh: the Hopper core of grouped.cu's prefill GEMMs (wgmma, sm_90a).
// Included by grouped.cu after GroupedArgs, MODE_FC1/FC2, swz, cp_async16 and the tile walk
// (find_tile, a_sources, b_sources); no other user.
//
// The same grouped GEMMs as grouped_gemm_kernel (the tile walk over the device-side expert
// offsets, the gathered A rows, the fc1 gate/up pairing and both epilogues), with the inner
// product on wgmma.mma_async m64nBNk16 (bf16 in, fp32 accumulate) instead of mma.sync:
//   - a CTA is WG warpgroups; warpgroup w owns rows [64 w, 64 w + 64) of the BM = 64 WG row
//     tile and all BN weight rows (FC1: BN/2 gate + BN/2 up rows, i.e. BN/2 output columns);
//   - operands come from shared memory through wgmma descriptors. A K tile of 64 bf16 is one
//     128-byte row per matrix row, stored with the 128-byte swizzle (16-byte chunk c of row r
//     at chunk c ^ (r & 7), 8-row atoms of 1024 bytes, 1024-byte aligned): that is swz(), the
//     layout the mma.sync core already used, and the one the descriptor's swizzle mode 1 reads;
//   - loads: every thread, cp.async 16 bytes (rows gathered through perm, zero-filled past an
//     expert's end and past K), S stages. Because wgmma runs asynchronously, the threads
//     issue the next stage's copies while the tensor cores work on this one. With LAG 2, one
//     wgmma group stays in flight across the k-tile barrier (wait_group 1) and a stage is
//     refilled two k-tiles after it was read (loads run S - 2 tiles ahead); with LAG 1 the
//     group is retired before the barrier and loads run S - 1 ahead.
//   - cp.async writes are generic-proxy writes and wgmma reads through the async proxy: each
//     thread fences (fence.proxy.async) after its copies complete, before the barrier.
// Accumulators: for n8 block i, register 4 i + j of a thread holds row 16 (warp % 4) +
// (lane >> 2) + 8 (j >> 1), column 8 i + 2 (lane & 3) + (j & 1) of its warpgroup's 64 x BN
// tile: the mma.sync m16n8 layout, so the epilogues are the old ones.
//
// Only built into SASS for sm_90a (setup.py compiles grouped.cu with
// -gencode=arch=compute_90a,code=sm_90a where its targets include 90, and then defines
// BM_HAVE_SM90A for the host code); any other target gets a kernel that traps, which the host
// never launches (wgmma_usable(): BM_HAVE_SM90A and a device of compute capability 9.0).
#pragma once

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define BM_WGMMA_DEVICE 0  // a device pass without wgmma (sm_90 PTX, other archs): stubs
#else
#define BM_WGMMA_DEVICE 1
#endif

// Default: the wgmma core on for the prefill tiles, and its tile variants (fc1, fc2; see
// wgmma_dispatch) below and from 4096 rows: "66" at both (2 x 256, 4 stages, lag 2, refill
// before the wgmma), the best of the lead's sweep (benchmarks/results/s4-h200/final1: T = 2048
// 0.205 ms, T = 16384 1.333 ms, against "44" 0.215 / 1.366).
constexpr int WGMMA_DEFAULT_ON = 1;
constexpr char WGMMA_DEFAULT_TILES[2][3] = {"66", "66"};

// ---- wgmma PTX wrappers ------------------------------------------------------------------------
// Shared-memory matrix descriptor: start address >> 4, leading byte offset 16 (unused by
// swizzled K-major operands), stride byte offset 1024 (one 8-row atom to the next), 128-byte
// swizzle. The k16 steps inside a 64-wide K tile add 32 bytes to the start address.
__device__ __forceinline__ uint64_t wg_desc(uint32_t saddr) {
    return (uint64_t)((saddr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) |
           ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}
__device__ __forceinline__ void wg_fence() {
#if BM_WGMMA_DEVICE
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wg_commit() {
#if BM_WGMMA_DEVICE
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wg_wait() {
#if BM_WGMMA_DEVICE
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
__device__ __forceinline__ void fence_proxy_async() {
#if BM_WGMMA_DEVICE
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Keeps the compiler from moving accumulator reads or writes across the asynchronous wgmma:
// it sees every accumulator register read and written here.
template <int R>
__device__ __forceinline__ void wg_fence_acc(float (&d)[R]) {
#pragma unroll
    for (int i = 0; i < R; i++) asm volatile("" : "+f"(d[i])::"memory");
}

// d (64 x N fp32, this warpgroup) += A (64 x 16 bf16, descriptor da) * B (N x 16, db)^T
template <int N>
__device__ __forceinline__ void wgmma_bf16(float (&d)[N / 2], uint64_t da, uint64_t db);

#if BM_WGMMA_DEVICE
template <>
__device__ __forceinline__ void wgmma_bf16<64>(float (&d)[32], uint64_t da, uint64_t db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(1));
}

template <>
__device__ __forceinline__ void wgmma_bf16<128>(float (&d)[64], uint64_t da, uint64_t db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(1));
}

template <>
__device__ __forceinline__ void wgmma_bf16<192>(float (&d)[96], uint64_t da, uint64_t db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n192k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63,"
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79,"
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, %96, %97, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
        : "l"(da), "l"(db), "r"(1));
}

template <>
__device__ __forceinline__ void wgmma_bf16<256>(float (&d)[128], uint64_t da, uint64_t db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63,"
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79,"
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95,"
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111,"
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(da), "l"(db), "r"(1));
}
#else
template <int N>
__device__ __forceinline__ void wgmma_bf16(float (&)[N / 2], uint64_t, uint64_t) {}
#endif

// One k tile (64 wide) of a warpgroup's 64 x BN product from the swizzled stage (A rows at sA,
// weight rows at sB) as one committed wgmma group (both wgmma cores).
template <int BN>
__device__ __forceinline__ void wg_k_tile(float (&acc)[BN / 2], uint32_t sA, uint32_t sB) {
    wg_fence();
    wg_fence_acc(acc);
#pragma unroll
    for (int ks = 0; ks < BK / 16; ks++)
        wgmma_bf16<BN>(acc, wg_desc(sA + ks * 32), wg_desc(sB + ks * 32));
    wg_commit();
    wg_fence_acc(acc);
}

// ---- the epilogue (both wgmma cores: this kernel and grouped_tma.cuh's) --------------------------
// FC2's two output rows of this thread (rbase, rbase + 8 of the tile): their tokens and gates.
struct WgRows {
    int tok[2];
    float g[2];
};
template <int MODE>
__device__ __forceinline__ WgRows wg_rows(const GroupedArgs &p, int rbase, int rows, int row0) {
    WgRows w{{0, 0}, {1.f, 1.f}};
    if constexpr (MODE == MODE_FC2) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            if (rbase + 8 * h >= rows) continue;
            w.tok[h] = __ldg(p.perm + row0 + rbase + 8 * h);
            if (p.gates) w.g[h] = __ldg(p.gates + w.tok[h]);
        }
    }
    return w;
}
// A 64 x BN warpgroup tile's accumulators (acc layout above) out: FC1 act(gate) * up as bf16
// into ab (slot order), FC2 gate * row into out[token]; rows past `rows` and columns past N
// are not stored. rbase = this thread's first tile row (warpgroup, warp and lane).
template <int BN, int MODE>
__device__ __forceinline__ void wg_epilogue(const float (&acc)[BN / 2], const GroupedArgs &p,
                                            const WgRows &w, int rbase, int rows, int row0,
                                            int n0) {
    const int lane = threadIdx.x & 31, N = p.N;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int r = rbase + 8 * h;
        if (r >= rows) continue;
        const int64_t slot = row0 + r;
        if constexpr (MODE == MODE_FC1) {
#pragma unroll
            for (int i = 0; i < BN / 16; i++) {  // gate block i, up block i + BN/16
                const int col = n0 + i * 8 + 2 * (lane & 3);
                if (col >= N) continue;  // N % 8 == 0: col + 1 < N too
                const int gi = 4 * i + 2 * h, ui = 4 * (i + BN / 16) + 2 * h;
                const float v0 = bm_act_fn(acc[gi], p.act) * acc[ui];
                const float v1 = bm_act_fn(acc[gi + 1], p.act) * acc[ui + 1];
                uint16_t h0, h1, l0, l1;
                bm_f32_to_bf16_split(v0, h0, l0);
                bm_f32_to_bf16_split(v1, h1, l1);
                *reinterpret_cast<uint32_t *>(p.ab + slot * N + col) = pack_bf16(h0, h1);
            }
        } else {
            const float g = w.g[h];
            float *dst = p.out + (int64_t)w.tok[h] * N;
#pragma unroll
            for (int i = 0; i < BN / 8; i++) {
                const int col = n0 + i * 8 + 2 * (lane & 3);
                if (col >= N) continue;
                *reinterpret_cast<float2 *>(dst + col) =
                    make_float2(g * acc[4 * i + 2 * h], g * acc[4 * i + 2 * h + 1]);
            }
        }
    }
}

// ---- the kernel ---------------------------------------------------------------------------------
// Tile: WG warpgroups (BM = 64 WG rows), BN weight rows, S stages refilled LAG k-tiles after
// they were read (loads run S - LAG tiles ahead), MINB CTAs per SM; EARLY: a k-tile's refill
// is issued before its wgmma (else after).
template <int WG, int BN, int S, int LAG, int MINB, int MODE, bool EARLY = false>
struct WgTile {
    static constexpr int NT = WG * 128;
    static constexpr int BM = WG * 64;
    static constexpr int A_BYTES = BM * 128;  // one K tile of A (multiple of 1024)
    static constexpr int B_BYTES = BN * 128;
    static constexpr int STAGE = A_BYTES + B_BYTES;
    static constexpr int SMEM = STAGE * S + 1024;  // + slack to align the base to 1024
    static constexpr int A_ITERS = BM * 8 / NT;    // 16-byte chunks per thread per K tile
    static constexpr int B_ITERS = BN * 8 / NT;
    static constexpr int OUT_COLS = MODE == MODE_FC1 ? BN / 2 : BN;
    static constexpr int ACC = BN / 2;              // fp32 accumulators per thread
    static_assert(BN % 8 == 0 && BN >= 64 && BN <= 256, "wgmma N");
    static_assert(MODE != MODE_FC1 || BN % 16 == 0, "FC1: gate and up halves of n8 blocks");
    static_assert(BN * 8 % NT == 0, "loader");
    static_assert(LAG == 1 || LAG == 2, "wgmma groups left in flight: LAG - 1");
    static_assert(S >= LAG + 1, "a stage loading beside the LAG ones being read");
};

template <int WG, int BN, int S, int LAG, int MINB, int MODE, bool EARLY>
__global__ void __launch_bounds__(WG * 128, MINB) grouped_wgmma_kernel(const GroupedArgs p) {
#if !BM_WGMMA_DEVICE
    __trap();
#else
    using C = WgTile<WG, BN, S, LAG, MINB, MODE, EARLY>;
    constexpr int BM = C::BM;
    extern __shared__ unsigned char wg_smem[];
    const uint32_t sbase = (smem_u32(wg_smem) + 1023u) & ~1023u;  // swizzle atoms: 1024-aligned
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

    int e = 0, row0 = 0, rows = 0;
    if (!find_tile(p, BM, e, row0, rows)) return;  // grouped.cu, as grouped_gemm_kernel
    const int K = p.K, N = p.N;
    const int n0 = blockIdx.x * C::OUT_COLS;
    if (n0 >= N) return;
    const int kc = tid & 7;
    int a_row_src[C::A_ITERS], b_row_src[C::B_ITERS];
    a_sources<C::A_ITERS, C::NT, MODE>(p, row0, rows, a_row_src);
    b_sources<C::B_ITERS, C::NT, BN, MODE>(p, n0, b_row_src);
    const int64_t wrows = MODE == MODE_FC1 ? 2 * (int64_t)N : N;  // weight rows per expert
    const uint16_t *We = p.W + (int64_t)e * wrows * K + kc * 8;
    const uint16_t *Ak = p.A + kc * 8;
    auto load_stage = [&](int stage, int kt) {
        const uint32_t sA = sbase + stage * C::STAGE;
        const uint32_t sB = sA + C::A_BYTES;
        const bool k_ok = kt * BK + kc * 8 < K;  // K % 8 == 0: a chunk is all in or all out
#pragma unroll
        for (int i = 0; i < C::A_ITERS; i++) {
            const int r = (tid >> 3) + i * (C::NT / 8);
            const bool ok = a_row_src[i] >= 0 && k_ok;
            const int64_t o = ok ? (int64_t)a_row_src[i] * K + kt * BK : 0;
            cp_async16(sA + swz(r, kc), Ak + o, ok ? 16 : 0);
        }
#pragma unroll
        for (int i = 0; i < C::B_ITERS; i++) {
            const int r = (tid >> 3) + i * (C::NT / 8);
            const bool ok = b_row_src[i] >= 0 && k_ok;
            const int64_t o = ok ? (int64_t)b_row_src[i] * K + kt * BK : 0;
            cp_async16(sB + swz(r, kc), We + o, ok ? 16 : 0);
        }
    };

    float acc[C::ACC];
#pragma unroll
    for (int i = 0; i < C::ACC; i++) acc[i] = 0.f;

    // Pipeline, LAG = 2 (one wgmma group left in flight at the end of an iteration) or 1 (none).
    // Before iteration kt, groups for tiles 0 .. kt + S - LAG - 1 are committed (S - LAG in the
    // prologue, one per iteration, empty ones past KT keeping the count uniform), so
    // wait_group S - LAG - 1 leaves tile kt complete. Iteration kt refills the stage of tile
    // kt - LAG: every thread passed wg_wait<LAG - 1> of iteration kt - 1 (tile kt - LAG's
    // wgmma complete in its warpgroup) before the barrier of iteration kt, so the refill may
    // go before this tile's wgmma (EARLY) or after it. (Measured in helper wgmma's runs: the
    // lag-2 variants 7-20% slower at T = 16384 with the refill after, probably because the
    // wgmma issue waits for the tensor pipe and so delays the copies.)
    // A warpgroup whose 64 rows are all past the expert's end (the last tile of an expert)
    // issues no wgmma: the other one then has the tensor cores to itself.
    const int KT = (K + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < S - LAG; s++) {
        if (s < KT) load_stage(s, s);
        cp_async_commit();
    }
    const int wg = warp >> 2;
    const bool active = wg * 64 < rows;  // uniform over the warpgroup
    for (int kt = 0; kt < KT; kt++) {
        cp_async_wait<S - LAG - 1>();
        fence_proxy_async();  // this thread's copies of tile kt, before wgmma's async reads
        __syncthreads();
        const int nk = kt + S - LAG;
        if (EARLY) {
            if (nk < KT) load_stage(nk % S, nk);
            cp_async_commit();
        }
        if (active) {
            wg_k_tile<BN>(acc, sbase + (kt % S) * C::STAGE + wg * (64 * 128),
                          sbase + (kt % S) * C::STAGE + C::A_BYTES);
        }
        if (!EARLY) {
            if (nk < KT) load_stage(nk % S, nk);
            cp_async_commit();
        }
        if (active) {
            wg_wait<LAG - 1>();
            wg_fence_acc(acc);
        }
    }
    wg_wait<0>();
    wg_fence_acc(acc);
    cp_async_wait<0>();  // only empty groups are left; nothing may be in flight at exit

    // Epilogue from the accumulators (layout above); as grouped_gemm_kernel's.
    const int rbase = wg * 64 + (warp & 3) * 16 + (lane >> 2);
    wg_epilogue<BN, MODE>(acc, p, wg_rows<MODE>(p, rbase, rows, row0), rbase, rows, row0, n0);
#endif
}

// Launches of the wgmma core (bm_cuda_moe_grouped_wgmma_launches): the tests assert the path.
std::atomic<long long> wgmma_launches{0};

template <int WG, int BN, int S, int LAG, int MINB, int MODE, bool EARLY = false>
int wgmma_launch(const GroupedArgs &p, int64_t T, cudaStream_t stream) {
    using C = WgTile<WG, BN, S, LAG, MINB, MODE, EARLY>;
    auto kernel = grouped_wgmma_kernel<WG, BN, S, LAG, MINB, MODE, EARLY>;
    static std::atomic<unsigned> optin{0};
    int st = bm_smem_optin(kernel, C::SMEM, optin);
    if (st) return st;
    const int64_t ytiles = row_tiles(T, p.X, C::BM);
    if (ytiles > 65535) return BM_CUDA_ARG_FAIL("moe_grouped: too many tokens for one launch");
    const dim3 grid((unsigned)bm_cdiv(p.N, C::OUT_COLS), (unsigned)ytiles);
    kernel<<<grid, C::NT, C::SMEM, stream>>>(p);
    BM_CUDA_LAUNCHED();
    wgmma_launches.fetch_add(1, std::memory_order_relaxed);
    return 0;
}

// BLACKMAMBA_MOE_WGMMA: "0" off (the mma.sync core everywhere), unset or "1": the wgmma core
// for the prefill tiles (grouped.cu gemm_dispatch's big role, unsplit), "force": for every
// unsplit call (the tests use it to run the core on small T). Read per call (tests flip it).
int wgmma_mode() {
    const char *v = getenv("BLACKMAMBA_MOE_WGMMA");
    if (!v || !v[0]) return WGMMA_DEFAULT_ON;
    if (v[0] == '0') return 0;
    return strcmp(v, "force") == 0 ? 2 : 1;
}

// Built for sm_90a and running on a compute capability 9.0 device (asked once per device).
bool wgmma_usable() {
#ifndef BM_HAVE_SM90A
    return false;
#else
    static std::atomic<unsigned> known{0}, yes{0};
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return false;
    const unsigned bit = 1u << (dev & 31);
    if (!(known.load(std::memory_order_acquire) & bit)) {
        int major = 0, minor = 0;
        if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
            return false;
        if (major == 9 && minor == 0) yes.fetch_or(bit, std::memory_order_relaxed);
        known.fetch_or(bit, std::memory_order_release);
    }
    return (yes.load(std::memory_order_relaxed) & bit) != 0;
#endif
}

// Tile variants per role, BLACKMAMBA_MOE_WGMMA_TILES = two digits (fc1, fc2; 0 = default),
// for dev measurements; the tests run each. WG x BN (weight rows), stages, LAG, CTAs per SM:
//   1: 2 x 256, 4 stages (192 KB), lag 2, 1 per SM   2: 2 x 128, 3 stages (96 KB), lag 2, 2 per SM
//   3: 2 x 128, 3 stages, lag 1, 2 per SM            4: 2 x 256, 4 stages, lag 1, 1 per SM
//   5: 2 x 192, 4 stages (160 KB), lag 2, 1 per SM
//   6, 7, 8, 9: 1, 2, 3, 4 with each k-tile's refill issued before its wgmma (EARLY)
// Measured on the H200 (cuda/NOTES.md, session 4 wgmma, run 3), ms of the expert layer at
// T = 2048 / 16384: "44" 0.209 / 1.375, "11" 0.213 / 1.375, "31" 0.212 / 1.583, "21" 0.245 /
// 1.477, fc2 varied (fc1 = 1): "12" 0.243 / 1.466, "13" 0.230 / 1.466, "15" 0.252 / 1.481.
// In run 1, before the refill moved behind the wgmma issue, variants 1 and 2 were faster
// (0.201 / 1.284 and 0.209 / 1.228): see NOTES, what is left.
template <int MODE>
int wgmma_dispatch(const GroupedArgs &p, int64_t T, cudaStream_t stream) {
    const char *env = getenv("BLACKMAMBA_MOE_WGMMA_TILES");
    const int role = MODE == MODE_FC2 ? 1 : 0;
    int v = env && (int)strlen(env) > role ? env[role] - '0' : 0;
    if (v < 1 || v > 9) v = WGMMA_DEFAULT_TILES[T >= 4096][role] - '0';
    switch (v) {
        case 6: return wgmma_launch<2, 256, 4, 2, 1, MODE, true>(p, T, stream);
        case 7: return wgmma_launch<2, 128, 3, 2, 2, MODE, true>(p, T, stream);
        case 8: return wgmma_launch<2, 128, 3, 1, 2, MODE, true>(p, T, stream);
        case 9: return wgmma_launch<2, 256, 4, 1, 1, MODE, true>(p, T, stream);
        case 1: return wgmma_launch<2, 256, 4, 2, 1, MODE>(p, T, stream);
        case 2: return wgmma_launch<2, 128, 3, 2, 2, MODE>(p, T, stream);
        case 3: return wgmma_launch<2, 128, 3, 1, 2, MODE>(p, T, stream);
        case 4: return wgmma_launch<2, 256, 4, 1, 1, MODE>(p, T, stream);
        default: return wgmma_launch<2, 192, 4, 2, 1, MODE>(p, T, stream);
    }
}
