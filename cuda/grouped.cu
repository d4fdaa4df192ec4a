// grouped.cu: the expert MLPs of a top-1 MoE layer (SPEC 3) as two grouped bf16 GEMMs whose
// group (expert) boundaries are read on the device: no host synchronisation, capturable.
//
//   out[t] = g[t] * fc2[e] @ bf16(act(a[:F]) * a[F:]),  a = fc1[e] @ bf16(x[t]),  e = ids[t]
//
// Letters: T tokens, d hidden, X experts, F ffn hidden; slot = a token's place in the
// expert-sorted order of dispatch (perm[slot] = token, experts in order, tokens ascending).
//
// Steps (4 launches):
//   1. dispatch (moe.cu's counting sort): perm (T), offsets (X+1), on the device;
//   2. to_bf16: xb = bf16(x) in token order (and xl = bf16(x - xb) where split); rows of
//      tokens whose id is outside [0, X) are zeroed in out (they are routed nowhere);
//   3. fc1: A rows gathered through perm straight from xb; one CTA owns matching columns of
//      the gate half (fc1 rows [n, n+BN/2)) and the up half (rows F + [n, n+BN/2)), so the
//      epilogue computes act(gate) * up in registers and writes ab = bf16 (and al, the low
//      part) in slot order; the (T, 2F) fp32 hidden never exists;
//   4. fc2: A = ab (slot order); the epilogue multiplies by g[perm[slot]] and writes the fp32
//      row of out[perm[slot]] (top-1: each row has exactly one writer, no atomics).
// Each GEMM launches an upper bound of row tiles (row_tiles(T, X, BM)) per column tile;
// a CTA finds its (expert, row tile) by walking the offsets and leaves if it has none.
// Batched decode (BM_MOE_GROUPED_IDS, up to 256 tokens): no step 1; each CTA of the decode
// tiles derives the offsets and its expert's tokens from the ids itself (ids_list). Where a
// Mamba layer follows, fc2's epilogue may also do that layer's RMSNorm up to its row scale
// (GroupedNorm::res, bm_cuda_moe_grouped_bf16_norm): the residual, in_proj's bf16 input and
// per-row partial sums of squares instead of out.
//
// The GEMM core: mma.sync m16n8k16 bf16 -> fp32, ldmatrix from XOR-swizzled shared memory,
// a STAGES-deep cp.async pipeline over K tiles of 64 (K tails and rows past an expert's end
// are zero-filled by cp.async's src-size). Split (BF16X2, or the small prefills under BF16,
// engine.cu split_x): each weight fragment meets the hi and the lo activation fragments,
// two MMAs into one fp32 accumulator: the activations keep 16 significant bits.
// On a compute capability 9.0 device the unsplit prefill tiles run on the wgmma core instead
// (grouped_wgmma.cuh; BLACKMAMBA_MOE_WGMMA): same walk, loads and epilogues; by default, from
// 512 rows, its tiles fed by the bulk tensor copy engine (grouped_tma.cuh; BLACKMAMBA_MOE_TMA),
// fc1's A rows gathered into slot order first.
//
// Needs bf16 weights, d % 8 == 0 and F % 8 == 0 (16-byte cp.async rows), 16-byte aligned x,
// fc1, fc2 and 8-byte aligned out (bm_cuda_moe_grouped_supported); else moe.cu's cuBLAS path.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cudaTypedefs.h>  // CUtensorMap, PFN_cuTensorMapEncodeTiled (grouped_tma.cuh; no libcuda link)

#include "common.cuh"


namespace {

constexpr int BK = 64;             // K per pipeline stage: 128-byte smem rows, 8 chunks of 16 B
constexpr int MAX_EXPERTS = 256;   // as moe.cu's dispatch

// ---- PTX wrappers ---------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}
// 16 bytes global -> shared; src_bytes 0 writes zeros (rows past the end, K tails).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes));
}
// ... as an evict_first line in L2 (pol: common.cuh bm_evict_first_policy).
__device__ __forceinline__ void cp_async16_pol(uint32_t dst, const void *src, int src_bytes,
                                               uint64_t pol) {
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(dst),
                 "l"(src), "r"(src_bytes), "l"(pol));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
// d (16x8 fp32) += a (16x16 bf16, row) * b (16x8 bf16, col)
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Byte offset of 16-byte chunk c (0..7) of row r in a tile of 128-byte rows. The XOR keeps
// the 8 rows an ldmatrix phase reads (same c) on 8 different bank groups.
__device__ __forceinline__ uint32_t swz(int r, int c) {
    return (uint32_t)(r * 128 + ((c ^ (r & 7)) << 4));
}


__device__ __forceinline__ uint32_t pack_bf16(uint16_t lo, uint16_t hi) {
    return (uint32_t)lo | ((uint32_t)hi << 16);
}

// One BK-deep k tile of a warp's MMAs from shared memory (grouped_gemm_kernel and
// grouped_dec_kernel): its MI A row tiles (and their low parts where SPLIT) and its NI weight
// n8 tiles through ldmatrix, b_base(j) the first shared-memory row of weight pair j, into acc.
template <int MI, int NI, bool SPLIT, typename BBase>
__device__ __forceinline__ void mma_k_tile(float (&acc)[MI][NI][4], uint32_t sA, uint32_t sL,
                                           uint32_t sB, int a_row, int a_chk, int b_row,
                                           int b_chk, const BBase &b_base) {
#pragma unroll
    for (int ks = 0; ks < BK / 16; ks++) {
        uint32_t a[MI][4], al[SPLIT ? MI : 1][4], b[NI][2];
#pragma unroll
        for (int mi = 0; mi < MI; mi++) {
            const uint32_t off = swz(a_row + mi * 16, ks * 2 + a_chk);
            ldmatrix_x4(a[mi], sA + off);
            if constexpr (SPLIT) ldmatrix_x4(al[mi], sL + off);
        }
#pragma unroll
        for (int j = 0; j < NI / 2; j++) {
            uint32_t r[4];
            ldmatrix_x4(r, sB + swz(b_base(j) + b_row, ks * 2 + b_chk));
            b[2 * j][0] = r[0];
            b[2 * j][1] = r[1];
            b[2 * j + 1][0] = r[2];
            b[2 * j + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < MI; mi++)
#pragma unroll
            for (int ni = 0; ni < NI; ni++) {
                mma_bf16(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
                if constexpr (SPLIT) mma_bf16(acc[mi][ni], al[mi], b[ni][0], b[ni][1]);
            }
    }
}

// ---- step 2: x -> bf16 (hi, lo) in token order; zero the rows nobody writes -------------------
__global__ void to_bf16_kernel(const float *__restrict__ x,      // (T, d)
                               const int32_t *__restrict__ ids,  // (T)
                               uint16_t *__restrict__ xb,        // (T, d)
                               uint16_t *__restrict__ xl,        // (T, d) or NULL
                               float *__restrict__ out,          // (T, d)
                               int64_t T, int d, int X) {
    const int64_t t = blockIdx.x;
    const int id = ids[t];
    const float4 *src = reinterpret_cast<const float4 *>(x + t * d);
    uint2 *hi = reinterpret_cast<uint2 *>(xb + t * d);
    uint2 *lo = xl ? reinterpret_cast<uint2 *>(xl + t * d) : nullptr;
    for (int k = threadIdx.x; k < d / 4; k += blockDim.x) {
        const float4 v = src[k];
        uint16_t h[4], l[4];
        bm_f32_to_bf16_split(v.x, h[0], l[0]);
        bm_f32_to_bf16_split(v.y, h[1], l[1]);
        bm_f32_to_bf16_split(v.z, h[2], l[2]);
        bm_f32_to_bf16_split(v.w, h[3], l[3]);
        hi[k] = make_uint2(pack_bf16(h[0], h[1]), pack_bf16(h[2], h[3]));
        if (lo) lo[k] = make_uint2(pack_bf16(l[0], l[1]), pack_bf16(l[2], l[3]));
    }
    if (id < 0 || id >= X)  // after this block's reads of x: out may alias x
        for (int k = threadIdx.x; k < d; k += blockDim.x) out[t * d + k] = 0.f;
}

// ---- steps 3 and 4: the grouped GEMM ---------------------------------------------------------
enum { MODE_FC1 = 0, MODE_FC2 = 1 };

struct GroupedArgs {
    const uint16_t *A;        // FC1: xb (T, K) token order; FC2: ab (T, K) slot order
    const uint16_t *Alo;      // the low parts, same layout (split only)
    const uint16_t *W;        // FC1: fc1 (X, 2F, d); FC2: fc2 (X, d, F)
    const int32_t *perm;      // (T) slot -> token
    const int32_t *offsets;   // (X+1) slot ranges per expert
    const float *gates;       // (T) or NULL (FC2)
    uint16_t *ab;             // (T, F) FC1 output, slot order
    uint16_t *al;             // (T, F) its low parts (split only)
    float *out;               // (T, d) FC2 output, token order
    int K;                    // FC1: d; FC2: F
    int N;                    // output columns: FC1: F; FC2: d
    int X;
    int act;
    // How the launch meets programmatic dependent launch (the decode roles' tiles only, asked
    // for by a decode and, since session 24, a short prefill: BM_MOE_GROUPED_PREFILL;
    // launch_grouped):
    // PDL_NONE a plain launch; PDL_WAIT griddepcontrol.wait first (FC1 then lets the next
    // kernel, fc2, be scheduled); PDL_EARLY (FC2): the first STAGES-1 k tiles of weights
    // requested before the wait (see grouped_gemm_kernel); PDL_EXPERT (FC1 on
    // grouped_gemm_kernel): CTA row blockIdx.y is expert blockIdx.y, which requests its first
    // weight stages before the wait and then runs all of its expert's row tiles.
    // Left out of an initialiser: 0.
    int pdl;
    // Host side (launch_grouped), with pdl: pad the dynamic shared memory so that at most
    // ceil(CTAs / SMs) CTAs fit an SM (BM_MOE_GROUPED_FC2_CAP). 0: no padding.
    int cap;
    // (T, K) scratch for FC1's A gathered into slot order (the TMA core's fc1), or NULL.
    uint16_t *xg;
    // The routing itself (T ids), or NULL: then perm and offsets were not built, and each CTA
    // of the decode tiles derives what it needs of them from the ids (ids_offsets / ids_list;
    // BM_MOE_GROUPED_IDS; T <= IDS_MAX_T, X <= IDS_MAX_X).
    const int32_t *ids;
    int T;
    // The weight loads as evict_first L2 lines (decode roles, unsplit tiles; grouped_wpol):
    // each weight byte is read once a step, so its lines need not displace the evict_last
    // lines that the batched decode's L2 staging brought in for the next MoE layer (engine.cu
    // l2side_fork), and reading a staged line demotes it once used. Values unchanged.
    int wpol;
};
// At most 128 bytes: with nvcc 13.0 a by-value kernel parameter struct of more than 128 bytes
// compiles to other code (the parameter addressed through a register, more integer work), and
// the prefill kernels that take GroupedArgs ran 9-24% slower with it: the TMA core's fc1 at
// B = 8, L = 2048 653 -> 812 us a layer once session 14 added the norm epilogue's four
// pointers here (H200, cuda/NOTES.md session 16). More fields go in another parameter, as
// GroupedNorm does.
static_assert(sizeof(GroupedArgs) <= 128, "GroupedArgs: keep the kernel parameter <= 128 bytes");

// grouped_gemm_kernel's and grouped_dec_kernel's second parameter. FC2 only (the unsplit decode
// tiles of grouped_gemm_kernel, the split ones of grouped_dec_kernel: norm_route_ok):
// the next Mamba layer's RMSNorm moved here (bm_cuda_moe_norm_out): instead of out, res
// (T, N) += g * acc in place, nbf (T, N) = bf16(res * nw) (in_proj's input without the row
// scale) and ssp (T, N / 32) the sums of res^2 over each 32-column group, in a fixed order.
// Every id must be routed (in [0, X)): rows of no expert are not written. res NULL: out as
// usual.
struct GroupedNorm {
    float *res;
    const float *nw;
    uint16_t *nbf;
    float *ssp;
    uint16_t *nlo;  // grouped_dec_kernel: the low parts of res * nw (split), or NULL
};
// The host side's arguments of one grouped GEMM: both parameters.
struct GroupedDecArgs : GroupedArgs {
    GroupedNorm nm;
    int prefill;  // BM_MOE_GROUPED_PREFILL (host side: plain_defaults)
};
// Columns per partial sum of squares of the norm epilogue (GroupedNorm::res): each decode
// fc2 tile's warp covers 32 columns (Tile::WTN; gemm_launch refuses others).
constexpr int NORM_PART_COLS = 32;

// The norm epilogue's operands, requested before the k loop so that they arrive during it
// (grouped_gemm_kernel's unsplit fc2 tiles, every warp; grouped_dec_kernel's, warp 0): the
// norm weights of this lane's columns cb + ni * 8 + 2 (lane & 3), and for each of its rows
// rb + mi * 16 + (lane >> 2) + 8 h below `rows` the token tok(row), its gate and its residual
// values. Rows past `rows` get token -1 and zeros.
template <int MI, int NI, typename Tok>
__device__ __forceinline__ void norm_preload(const GroupedNorm &q, const float *gates, int cb,
                                             int rb, int rows, int N, int lane, Tok tok,
                                             float2 (&rpre)[MI][2][NI], float2 (&wpre)[NI],
                                             int (&tpre)[MI][2], float (&gpre)[MI][2]) {
#pragma unroll
    for (int ni = 0; ni < NI; ni++) {
        const int col = cb + ni * 8 + 2 * (lane & 3);
        wpre[ni] = col < N ? __ldg(reinterpret_cast<const float2 *>(q.nw + col))
                           : make_float2(0.f, 0.f);
    }
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = rb + mi * 16 + (lane >> 2) + 8 * h;
            const int t = r >= rows ? -1 : tok(r);
            tpre[mi][h] = t;
            gpre[mi][h] = t >= 0 && gates ? __ldcg(gates + t) : 1.f;
#pragma unroll
            for (int ni = 0; ni < NI; ni++) {
                const int col = cb + ni * 8 + 2 * (lane & 3);
                rpre[mi][h][ni] = t >= 0 && col < N
                    ? __ldcg(reinterpret_cast<const float2 *>(q.res + (int64_t)t * N + col))
                    : make_float2(0.f, 0.f);
            }
        }
}

// One accumulator row of the norm epilogue (GroupedNorm::res), for the 4 lanes that hold it
// (lane & 3), columns cb + ni * 8 + 2 (lane & 3): res = g * acc + r in place (g * acc rounded
// first, no FMA: the residual's bits are the plain epilogue's out plus r, as the norm kernel
// sums them), nbf = bf16(res * w), with LO the low parts into q.nlo where it is set (split),
// and the row's sum of squares over these columns in a fixed order into part cb / 32 of
// bm_cuda_moe_norm_parts(N) (a warp's columns are one part: WTN = NORM_PART_COLS). Token t.
template <int NI, bool LO>
__device__ __forceinline__ void norm_epilogue_row(const GroupedNorm &q, const float (&acc)[NI][4],
                                                  int h, int t, float g, int cb,
                                                  const float2 (&r)[NI], const float2 (&w)[NI],
                                                  int N, int lane) {
    float *rr = q.res + (int64_t)t * N;
    uint16_t *nb = q.nbf + (int64_t)t * N;
    uint16_t *nl = LO && q.nlo ? q.nlo + (int64_t)t * N : nullptr;
    float ss = 0.f;
#pragma unroll
    for (int ni = 0; ni < NI; ni++) {
        const int col = cb + ni * 8 + 2 * (lane & 3);
        if (col >= N) continue;
        const float v0 = __fmul_rn(g, acc[ni][2 * h]) + r[ni].x;
        const float v1 = __fmul_rn(g, acc[ni][2 * h + 1]) + r[ni].y;
        *reinterpret_cast<float2 *>(rr + col) = make_float2(v0, v1);
        if constexpr (LO) {
            uint16_t h0, h1, l0, l1;
            bm_f32_to_bf16_split(v0 * w[ni].x, h0, l0);
            bm_f32_to_bf16_split(v1 * w[ni].y, h1, l1);
            *reinterpret_cast<uint32_t *>(nb + col) = pack_bf16(h0, h1);
            if (nl) *reinterpret_cast<uint32_t *>(nl + col) = pack_bf16(l0, l1);
        } else {
            *reinterpret_cast<uint32_t *>(nb + col) =
                pack_bf16(bm_f32_to_bf16_bits(v0 * w[ni].x), bm_f32_to_bf16_bits(v1 * w[ni].y));
        }
        ss = fmaf(v0, v0, ss);
        ss = fmaf(v1, v1, ss);
    }
    const unsigned quad = 0xFu << (lane & ~3);
    ss += __shfl_xor_sync(quad, ss, 1);
    ss += __shfl_xor_sync(quad, ss, 2);
    if ((lane & 3) == 0 && cb < N)  // a warp wholly past N has no part
        q.ssp[(int64_t)t * ((N + NORM_PART_COLS - 1) / NORM_PART_COLS) + cb / NORM_PART_COLS] = ss;
}
enum { PDL_NONE = 0, PDL_WAIT = 1, PDL_EARLY = 2, PDL_EXPERT = 3 };

// Tile BM x NB (NB weight rows: FC1 NB/2 gate + NB/2 up, i.e. NB/2 output columns; FC2 NB
// output columns), WM x WN warps of (BM/WM) x (NB/WN).
template <int BM, int NB, int WM, int WN, int STAGES, int MODE, bool SPLIT>
struct Tile {
    static constexpr int NT = WM * WN * 32;
    static constexpr int WTM = BM / WM;          // warp rows
    static constexpr int WTN = NB / WN;          // warp weight rows
    static constexpr int MI = WTM / 16;          // m16 tiles per warp
    static constexpr int NI = WTN / 8;           // n8 tiles per warp
    static constexpr int A_BYTES = BM * 128;     // one K tile of A (hi or lo)
    static constexpr int B_BYTES = NB * 128;
    static constexpr int STAGE = A_BYTES * (SPLIT ? 2 : 1) + B_BYTES;
    static constexpr int SMEM = STAGE * STAGES;
    static constexpr int A_ITERS = BM * 8 / NT;  // 16-byte chunks per thread per K tile
    static constexpr int B_ITERS = NB * 8 / NT;
    static constexpr int OUT_COLS = MODE == MODE_FC1 ? NB / 2 : NB;  // per CTA
    // CTAs per SM to ask of the register allocator: as many as shared memory allows, as
    // long as each thread keeps its accumulators plus ~56 registers (no spills measured).
    static constexpr int SMEM_FIT = 220 * 1024 / SMEM;
    static constexpr int REG_FIT = 65536 / (NT * (MI * NI * 4 + 56));
    static constexpr int MINB_ = SMEM_FIT < REG_FIT ? SMEM_FIT : REG_FIT;
    static constexpr int MINB = MINB_ < 1 ? 1 : MINB_ > 8 ? 8 : MINB_;
    static_assert(WTM % 16 == 0 && WTN % 16 == 0, "warp tile");
    static_assert(MODE != MODE_FC1 || NI % 4 == 0, "FC1: each warp needs 16-column gate/up pairs");
    static_assert(BM * 8 % NT == 0 && NB * 8 % NT == 0, "loader");
};

// Which expert and row tile is this CTA's (both cores)? blockIdx.y counts the row tiles of
// BM rows of the experts in order; walks the offsets (uniform over the block). False when
// blockIdx.y is past the last tile (the grid is an upper bound). The offsets, perm and gates
// are read from L2 (__ldcg), not through L1 or the non-coherent path (__ldg): a PDL launch
// (decode) may start next to the kernel that writes them, this SM's L1 may hold lines of
// them from an earlier layer, and ptxas does not order ld.global.nc against
// griddepcontrol.wait (cuda/common.cuh).
// walk_tile: the walk itself for row tile `tile`, offset i read by off(i) (also the TMA core's,
// from its shared-memory copy of the offsets).
template <typename Off>
__device__ __forceinline__ bool walk_tile(Off off, int X, int BM, int tile, int &e, int &row0,
                                          int &rows) {
    for (e = 0; e < X; e++) {
        const int beg = off(e), end = off(e + 1);
        const int nt = (end - beg + BM - 1) / BM;
        if (tile < nt) {
            row0 = beg + tile * BM;
            rows = min(BM, end - row0);
            return true;
        }
        tile -= nt;
    }
    return false;
}
__device__ __forceinline__ bool find_tile(const GroupedArgs &p, int BM, int &e, int &row0,
                                          int &rows) {
    return walk_tile([&](int i) { return __ldcg(p.offsets + i); }, p.X, BM, (int)blockIdx.y, e,
                     row0, rows);
}

// ---- the dispatch from the ids, inside a CTA (BM_MOE_GROUPED_IDS) ----------------------------
// At decode sizes the routing kernel's last block used to build perm and offsets for the two
// GEMMs (moe_dispatch.cuh), on the critical path between the routing and fc1 (a ticket, a
// fence, one block's counting sort: ~3 us of the 9.9 us routing kernel at B = 64 on the H200).
// Instead each CTA of the decode tiles reads the T ids (one L2 round trip, all loads issued
// at once) and derives, in its shared memory, exactly the values the dispatch would have
// written: the offsets (exclusive prefix counts per expert, ids outside [0, X) counted
// nowhere) and an expert's tokens in increasing order (perm[offsets[e] + i] == list[i]).
// Warp 0 of the block does it; the caller synchronises the block after.
constexpr int IDS_MAX_T = 256;  // tokens (the fc1 expert form runs up to 32 X)
constexpr int IDS_MAX_X = 64;   // experts
constexpr int IDS_CHUNKS = IDS_MAX_T / 32;

// This lane's ids of the T, chunk c = ids[32 c + lane] (-1 past T).
__device__ __forceinline__ void ids_load(const int32_t *ids, int T, int (&id)[IDS_CHUNKS]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int c = 0; c < IDS_CHUNKS; c++) {
        const int m = 32 * c + lane;
        id[c] = m < T ? __ldcg(ids + m) : -1;
    }
}
// soff[0..X] = the dispatch's offsets.
__device__ __forceinline__ void ids_offsets(const int (&id)[IDS_CHUNKS], int X, int *soff) {
    const int lane = threadIdx.x & 31;
    for (int i = lane; i <= X; i += 32) soff[i] = 0;
    __syncwarp();
#pragma unroll
    for (int c = 0; c < IDS_CHUNKS; c++)
        if (id[c] >= 0 && id[c] < X) atomicAdd(&soff[id[c] + 1], 1);
    __syncwarp();
    if (lane == 0)
        for (int i = 1; i <= X; i++) soff[i] += soff[i - 1];
    __syncwarp();
}
// Expert e's tokens in increasing order into list; returns their count (every lane), and in
// *below the tokens of experts before e (its offset).
__device__ __forceinline__ int ids_list(const int (&id)[IDS_CHUNKS], int e, int *list,
                                        int *below) {
    const int lane = threadIdx.x & 31;
    const unsigned lt = (1u << lane) - 1u;
    int run = 0, lo = 0;
#pragma unroll
    for (int c = 0; c < IDS_CHUNKS; c++) {
        const unsigned eq = __ballot_sync(0xffffffffu, id[c] == e);
        if (id[c] == e) list[run + __popc(eq & lt)] = 32 * c + lane;
        run += __popc(eq);
        lo += __popc(__ballot_sync(0xffffffffu, id[c] >= 0 && id[c] < e));
    }
    *below = lo;
    return run;
}

// The CTA's row tile (blockIdx.y) from the ids: warp 0 reads them and writes the offsets into
// s_ids (X+1) and the tile's expert's tokens into s_list; then the block synchronises (every
// warp calls this), and each thread walks the offsets to the same tile. False: no tile
// (uniform over the block). ebeg: the expert's first slot.
__device__ __forceinline__ bool ids_tile(const GroupedArgs &p, int BM, int *s_ids, int *s_list,
                                         int &e, int &row0, int &rows, int &ebeg) {
    if ((threadIdx.x >> 5) == 0) {
        int id[IDS_CHUNKS];
        ids_load(p.ids, p.T, id);
        ids_offsets(id, p.X, s_ids);
        if (walk_tile([&](int i) { return s_ids[i]; }, p.X, BM, (int)blockIdx.y, e, row0, rows))
            ids_list(id, e, s_list, &ebeg);
    }
    __syncthreads();
    if (!walk_tile([&](int i) { return s_ids[i]; }, p.X, BM, (int)blockIdx.y, e, row0, rows))
        return false;
    ebeg = s_ids[e];
    return true;
}

// The loaders' source rows (both cores; fixed over K): chunk tid & 7 of tile rows
// (tid >> 3) + i NT/8, -1 = none (zeros). Row indices as 32-bit values, the addresses formed
// per load: fewer registers than 64-bit pointers where a thread loads many rows.
// A: the gathered token rows (FC1: through perm) of the tile's `rows`.
// list (BM_MOE_GROUPED_IDS): the expert's tokens from shared memory, slot row0 + r being
// list[row0 + r - beg], instead of perm.
template <int ITERS, int NT, int MODE>
__device__ __forceinline__ void a_sources(const GroupedArgs &p, int row0, int rows,
                                          int (&src)[ITERS], const int *list = nullptr,
                                          int beg = 0) {
#pragma unroll
    for (int i = 0; i < ITERS; i++) {
        const int r = (threadIdx.x >> 3) + i * (NT / 8);
        src[i] = r >= rows          ? -1
                 : MODE != MODE_FC1 ? row0 + r
                 : list             ? list[row0 + r - beg]
                                    : __ldcg(p.perm + row0 + r);
    }
}
// B: NB weight rows from output column n0; FC1: rows [0, NB/2) the gate columns, [NB/2, NB)
// the matching up half.
template <int ITERS, int NT, int NB, int MODE>
__device__ __forceinline__ void b_sources(const GroupedArgs &p, int n0, int (&src)[ITERS]) {
#pragma unroll
    for (int i = 0; i < ITERS; i++) {
        const int r = (threadIdx.x >> 3) + i * (NT / 8);
        if (MODE == MODE_FC1) {
            const int c = n0 + (r % (NB / 2));
            src[i] = c >= p.N ? -1 : r < NB / 2 ? c : p.N + c;
        } else {
            src[i] = n0 + r < p.N ? n0 + r : -1;
        }
    }
}

// XM: the PDL_EXPERT form (FC1, decode tiles), its own instantiation: its row-tile loop
// costs registers and instructions (133 -> 193 registers, 219 -> 233 instructions a k tile
// in the 32x64 fc1 tile), which the other launches need not pay.
template <int BM, int NB, int WM, int WN, int STAGES, int MODE, bool SPLIT, bool XM = false>
__global__ void __launch_bounds__(WM * WN * 32, (Tile<BM, NB, WM, WN, STAGES, MODE, SPLIT>::MINB))
grouped_gemm_kernel(const GroupedArgs p, const GroupedNorm q) {
    static_assert(!XM || MODE == MODE_FC1, "the PDL_EXPERT form is fc1's");
    using C = Tile<BM, NB, WM, WN, STAGES, MODE, SPLIT>;
    extern __shared__ __align__(128) unsigned char smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / WN, wn = warp % WN;

    // PDL (decode): FC1 waits first (its offsets and perm come from the routing kernel just
    // before) and then lets fc2 be scheduled; FC2 waits first, or (PDL_EARLY) after
    // requesting its first weight stages below. Neither FC2 form triggers its successor
    // early: the next layer's norm reads h through L1, which griddepcontrol.wait does not
    // invalidate (cuda/common.cuh); launched at fc2's end, it finds L1 clean as before.
    // PDL_EXPERT (FC1, decode): the expert is blockIdx.y, known before the wait, so the CTA
    // requests its first STAGES-1 weight tiles while the routing kernel still runs, waits,
    // reads its expert's rows from the offsets, and runs every row tile of them (each after
    // the first reloads the weights; the grid has X rows instead of an upper bound of tiles).
    // Each tile's k loop and epilogue are the other forms', so the outputs are bit-identical.
    constexpr bool xm = XM;  // the launcher takes this form exactly where p.pdl == PDL_EXPERT
    if (p.pdl != PDL_NONE && !xm && (MODE == MODE_FC1 || p.pdl == PDL_WAIT)) {
        if (MODE == MODE_FC1) bm_pdl_wait();
        else bm_pdl_wait_only();
    }
    // BM_MOE_GROUPED_IDS (decode tiles; the host takes it only for fc1's expert form and fc2):
    // the offsets and the expert's tokens from the ids (ids_list), not perm and offsets. fc2
    // reads the ids where it read the offsets: before its wait in the PDL_EARLY form (written
    // by the routing kernel two launches back, complete by then: see the early loads below).
    constexpr bool IDS_OK = BM <= 32;  // (split too since session 19: fc1 of the split batches)
    __shared__ int s_ids[IDS_OK ? IDS_MAX_X + 1 + IDS_MAX_T : 1];  // offsets (X+1), tokens
    int *const s_list = s_ids + (IDS_OK ? IDS_MAX_X + 1 : 0);
    const bool by_ids = IDS_OK && p.ids != nullptr;
    int e = 0, row0 = 0, rows = 0, row_end = 0, ebeg = 0;
    if (xm) {
        e = blockIdx.y;
    } else if (by_ids) {
        if (!ids_tile(p, BM, s_ids, s_list, e, row0, rows, ebeg)) return;
    } else if (!find_tile(p, BM, e, row0, rows)) {
        return;
    }
    const int K = p.K, N = p.N;
    const int n0 = blockIdx.x * C::OUT_COLS;  // first output column
    if (n0 >= N) return;
    const int kc = tid & 7;
    int a_row_src[C::A_ITERS], b_row_src[C::B_ITERS];
    b_sources<C::B_ITERS, C::NT, NB, MODE>(p, n0, b_row_src);
    const int64_t wrows = MODE == MODE_FC1 ? 2 * (int64_t)N : N;  // weight rows per expert
    const uint16_t *We = p.W + (int64_t)e * wrows * K + kc * 8;
    const uint16_t *Ak = p.A + kc * 8;
    const uint16_t *Alk = SPLIT ? p.Alo + kc * 8 : nullptr;

    const uint32_t sbase = smem_u32(smem);
    // (Not on the split tiles: with the hint, batch 8's split fc1 stopped with an illegal
    // instruction on the H200; its SASS used a policy descriptor register that the kernel
    // also writes with other values, likely a ptxas fault; cuda/NOTES.md session 13.)
    const bool wpol = !SPLIT && p.wpol;
    const uint64_t pol = wpol ? bm_evict_first_policy() : 0;
    auto load_a = [&](int stage, int kt) {
        const uint32_t sA = sbase + stage * C::STAGE;
        const uint32_t sL = sA + C::A_BYTES;
        const bool k_ok = kt * BK + kc * 8 < K;  // K % 8 == 0: a chunk is all in or all out
#pragma unroll
        for (int i = 0; i < C::A_ITERS; i++) {
            const int r = (tid >> 3) + i * (C::NT / 8);
            const bool ok = a_row_src[i] >= 0 && k_ok;
            const int64_t o = ok ? (int64_t)a_row_src[i] * K + kt * BK : 0;
            cp_async16(sA + swz(r, kc), Ak + o, ok ? 16 : 0);
            if constexpr (SPLIT) cp_async16(sL + swz(r, kc), Alk + o, ok ? 16 : 0);
        }
    };
    auto load_b = [&](int stage, int kt) {
        const uint32_t sB = sbase + stage * C::STAGE + C::A_BYTES * (SPLIT ? 2 : 1);
        const bool k_ok = kt * BK + kc * 8 < K;
#pragma unroll
        for (int i = 0; i < C::B_ITERS; i++) {
            const int r = (tid >> 3) + i * (C::NT / 8);
            const bool ok = b_row_src[i] >= 0 && k_ok;
            const int64_t o = ok ? (int64_t)b_row_src[i] * K + kt * BK : 0;
            if (wpol) cp_async16_pol(sB + swz(r, kc), We + o, ok ? 16 : 0, pol);
            else cp_async16(sB + swz(r, kc), We + o, ok ? 16 : 0);
        }
    };
    auto load_stage = [&](int stage, int kt) {
        load_a(stage, kt);
        load_b(stage, kt);
    };

    const int KT = (K + BK - 1) / BK;
    if (xm) {
#pragma unroll
        for (int s = 0; s < STAGES - 1; s++)
            if (s < KT) load_b(s, s);  // uncommitted: they join the first tile's first group
        bm_pdl_wait();                 // the routing (and dispatch) completed; fc2 may start
        int beg;
        if (by_ids) {
            if (warp == 0) {
                int id[IDS_CHUNKS], below;
                ids_load(p.ids, p.T, id);
                const int n = ids_list(id, e, s_list, &below);
                if (lane == 0) {
                    s_ids[0] = below;
                    s_ids[1] = below + n;
                }
            }
            __syncthreads();
            beg = s_ids[0];
            row_end = s_ids[1];
            ebeg = beg;
        } else {
            beg = __ldcg(p.offsets + e);
            row_end = __ldcg(p.offsets + e + 1);
        }
        if (beg >= row_end) {  // no tokens: let the early copies land before the CTA leaves
            cp_async_commit();
            cp_async_wait<0>();
            return;
        }
        row0 = beg;
        rows = min(BM, row_end - beg);
    }
    // The norm epilogue's residual values (GroupedNorm::res), requested here so that they
    // arrive during the k loop: final before the wait (the routing kernel that wrote them is
    // two launches back, as fc2's early weights argue below), and FC2 has one row tile.
    // The norm weights of the columns and the rows' tokens and gates likewise (the gates:
    // same writer as the residual), so the epilogue issues no load.
    constexpr bool RES = MODE == MODE_FC2 && !SPLIT;
    constexpr int RMI = RES ? C::MI : 1, RNI = RES ? C::NI : 1;
    float2 rpre[RMI][2][RNI], wpre[RNI];
    int tpre[RMI][2];
    float gpre[RMI][2];
    if constexpr (RES) {
        if (q.res)
            norm_preload(q, p.gates, n0 + wn * C::WTN, wm * C::WTM, rows, N, lane,
                         [&](int r) {
                             return by_ids ? s_list[r + row0 - ebeg] : __ldcg(p.perm + row0 + r);
                         },
                         rpre, wpre, tpre, gpre);
    }
    bool first = true;
  for (;;) {  // the row tiles: one, or (xm) every tile of the expert (not re-indented)
    a_sources<C::A_ITERS, C::NT, MODE>(p, row0, rows, a_row_src, by_ids ? s_list : nullptr, ebeg);
    float acc[C::MI][C::NI][4];
#pragma unroll
    for (int mi = 0; mi < C::MI; mi++)
#pragma unroll
        for (int ni = 0; ni < C::NI; ni++)
#pragma unroll
            for (int j = 0; j < 4; j++) acc[mi][ni][j] = 0.f;

    if (xm && first) {  // the weight part of these stages is in flight already
#pragma unroll
        for (int s = 0; s < STAGES - 1; s++) {
            if (s < KT) load_a(s, s);
            cp_async_commit();
        }
    } else if (MODE == MODE_FC2 && p.pdl == PDL_EARLY) {
        // fc2's first STAGES-1 weight tiles before the wait: they depend only on the expert,
        // from the offsets, which are final here: the routing kernel that wrote them is two
        // launches back, and fc1, launched with PDL between, lets this kernel be scheduled
        // only after its own wait, i.e. after that kernel completed (as fc2's expert ids at
        // batch 1, cuda/NOTES.md "Session 4, pdl1"). The ab rows (fc1's output) after it.
        // Left uncommitted, the early loads join the first group (stage 0's A): the group
        // count and the waits below are as in the plain prologue.
#pragma unroll
        for (int s = 0; s < STAGES - 1; s++)
            if (s < KT) load_b(s, s);
        bm_pdl_wait_only();
#pragma unroll
        for (int s = 0; s < STAGES - 1; s++) {
            if (s < KT) load_a(s, s);
            cp_async_commit();
        }
    } else {
#pragma unroll
        for (int s = 0; s < STAGES - 1; s++) {
            if (s < KT) load_stage(s, s);
            cp_async_commit();  // empty groups keep the count uniform
        }
    }

    // Shared-memory rows of this warp's ldmatrix.x4 loads: A row tiles of 16; weight-row
    // pairs of n8 tiles (FC1: the first half of the warp's n8 tiles are gate columns, the
    // second half the matching up columns, NB/2 rows further).
    const int a_row = wm * C::WTM + (lane & 15);
    const int a_chk = lane >> 4;
    const int b_row = (lane & 7) + ((lane >> 4) << 3);
    const int b_chk = (lane >> 3) & 1;
    auto b_base = [&](int j) -> int {  // j: pair of n8 tiles (0 .. NI/2-1)
        if (MODE == MODE_FC1) {
            constexpr int JH = C::NI / 4;  // pairs per half
            const int half = j / JH;
            return half * (NB / 2) + wn * (C::WTN / 2) + (j % JH) * 16;
        }
        return wn * C::WTN + j * 16;
    };

    for (int kt = 0; kt < KT; kt++) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // stage kt landed for all; stage kt-1 is free for the next load
        {
            const int nk = kt + STAGES - 1;
            if (nk < KT) load_stage(nk % STAGES, nk);
            cp_async_commit();
        }
        const uint32_t sA = sbase + (kt % STAGES) * C::STAGE;
        const uint32_t sL = sA + C::A_BYTES;
        const uint32_t sB = sA + C::A_BYTES * (SPLIT ? 2 : 1);
        mma_k_tile<C::MI, C::NI, SPLIT>(acc, sA, sL, sB, a_row, a_chk, b_row, b_chk, b_base);
    }
    cp_async_wait<0>();

    // Epilogue straight from the accumulators: element j of acc[mi][ni] is row
    // (lane >> 2) + 8 (j >> 1), column 2 (lane & 3) + (j & 1) of its 16x8 tile.
#pragma unroll
    for (int mi = 0; mi < C::MI; mi++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = wm * C::WTM + mi * 16 + (lane >> 2) + 8 * h;
            if (r >= rows) continue;
            const int64_t slot = row0 + r;
            if constexpr (MODE == MODE_FC1) {
#pragma unroll
                for (int ni = 0; ni < C::NI / 2; ni++) {
                    const int col = n0 + wn * (C::WTN / 2) + ni * 8 + 2 * (lane & 3);
                    if (col >= N) continue;  // N % 8 == 0: col + 1 < N too
                    const float(&g)[4] = acc[mi][ni], (&u)[4] = acc[mi][ni + C::NI / 2];
                    const float v0 = bm_act_fn(g[2 * h], p.act) * u[2 * h];
                    const float v1 = bm_act_fn(g[2 * h + 1], p.act) * u[2 * h + 1];
                    uint16_t h0, h1, l0, l1;
                    bm_f32_to_bf16_split(v0, h0, l0);
                    bm_f32_to_bf16_split(v1, h1, l1);
                    *reinterpret_cast<uint32_t *>(p.ab + slot * N + col) = pack_bf16(h0, h1);
                    if constexpr (SPLIT)
                        *reinterpret_cast<uint32_t *>(p.al + slot * N + col) = pack_bf16(l0, l1);
                }
            } else if (RES && q.res) {
                // The next layer's norm (GroupedNorm::res; norm_epilogue_row)
                if constexpr (RES)
                    norm_epilogue_row<C::NI, false>(q, acc[mi], h, tpre[mi][h], gpre[mi][h],
                                                    n0 + wn * C::WTN, rpre[mi][h], wpre, N, lane);
            } else {
                const int t = by_ids ? s_list[slot - ebeg] : __ldcg(p.perm + slot);
                const float g = p.gates ? __ldcg(p.gates + t) : 1.f;
                float *dst = p.out + (int64_t)t * N;
#pragma unroll
                for (int ni = 0; ni < C::NI; ni++) {
                    const int col = n0 + wn * C::WTN + ni * 8 + 2 * (lane & 3);
                    if (col >= N) continue;
                    *reinterpret_cast<float2 *>(dst + col) =
                        make_float2(g * acc[mi][ni][2 * h], g * acc[mi][ni][2 * h + 1]);
                }
            }
        }
    }
    if (!xm) break;
    row0 += BM;
    if (row0 >= row_end) break;
    rows = min(BM, row_end - row0);
    first = false;
    __syncthreads();  // every warp done reading the stages before the next tile refills them
  }
}

// ---- the decode tiles: one warp per k slice, row pointers formed once --------------------------
// Decode batches give each expert a few rows (B = 64, X = 8: ~8 tokens), so the GEMMs stream
// weights, and Nsight Compute showed grouped_gemm_kernel's one-warp fc2 CTAs (32x32) issuing
// an instruction every 2.8 cycles at 63% of DRAM with 2.8 warps an SM: bound by each warp's
// own instruction stream, ~263 SASS instructions a k tile of which ~170 were the loader's
// address arithmetic (row index * K per chunk, src-size selects, 32 zero-filled rows).
// This kernel (BLACKMAMBA_MOE_GROUPED_TILES variants 6..9 of the decode roles):
//  - WK warps a CTA, each an independent cp.async pipeline over the k tiles w, w + WK, ...
//    (__syncwarp, no CTA barrier in the loop), their fp32 accumulators summed through shared
//    memory at the end in warp order (deterministic), warp 0 writing the epilogue: WK times
//    the warps in flight for the same grid, the same bytes;
//  - every lane's source rows as 64-bit pointers formed once, a k tile adding one offset and
//    two chunks of a row one pointer (immediates 0 and 64 bytes), the shared-memory slots as
//    two per-lane offsets plus constants; no per-lane predicates: rows past the tile's `rows`
//    (A) and columns past N (B) load a copy of the last valid row, and groups of 8 A rows
//    wholly past `rows` are not loaded (their shared memory keeps garbage, even NaN). Both
//    are harmless: an MMA output element (r, c) reads only A row r and B row c, and the
//    epilogue stores no such r or c. Inside K, the tail chunks are zero-filled in every row.
// Same per-warp tile math, fragments, k order and epilogues as grouped_gemm_kernel: with
// WK = 1 the results are bit-identical to it; with WK > 1 the sum over k runs per warp slice,
// then over the warps, so they differ by fp32 rounding only.
template <int BM, int NB, int WK, int STAGES, int MODE, bool SPLIT>
struct DecTile {
    static constexpr int NT = 32 * WK;
    static constexpr int MI = BM / 16;
    static constexpr int NI = NB / 8;
    static constexpr int A_BYTES = BM * 128;
    static constexpr int B_BYTES = NB * 128;
    static constexpr int SUB = A_BYTES * (SPLIT ? 2 : 1) + B_BYTES;  // one warp's stage
    static constexpr int WARP_SMEM = SUB * STAGES;
    static constexpr int RED = (WK - 1) * MI * NI * 4 * 32 * 4;      // the k-slice sums
    static constexpr int SMEM = WK * WARP_SMEM > RED ? WK * WARP_SMEM : RED;
    static constexpr int A_ROWS = BM / 8;  // rows a lane loads (2 chunks each, see the loader)
    static constexpr int B_ROWS = NB / 8;
    static constexpr int OUT_COLS = MODE == MODE_FC1 ? NB / 2 : NB;
    static constexpr int SMEM_FIT = 220 * 1024 / SMEM;
    static constexpr int MINB = SMEM_FIT < 1 ? 1 : SMEM_FIT > 16 ? 16 : SMEM_FIT;
    static_assert(BM % 16 == 0 && NB % 16 == 0, "tile");
    static_assert(MODE != MODE_FC1 || NI % 4 == 0, "FC1: 16-column gate/up pairs");
};

template <int BM, int NB, int WK, int STAGES, int MODE, bool SPLIT>
__global__ void __launch_bounds__(32 * WK, (DecTile<BM, NB, WK, STAGES, MODE, SPLIT>::MINB))
grouped_dec_kernel(const GroupedArgs p, const GroupedNorm q) {
    using C = DecTile<BM, NB, WK, STAGES, MODE, SPLIT>;
    extern __shared__ __align__(128) unsigned char smem[];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;

    // PDL (decode): as grouped_gemm_kernel's prologue.
    if (p.pdl != PDL_NONE && (MODE == MODE_FC1 || p.pdl == PDL_WAIT)) {
        if (MODE == MODE_FC1) bm_pdl_wait();
        else bm_pdl_wait_only();
    }
    // BM_MOE_GROUPED_IDS: the offsets and the expert's tokens from the ids (ids_tile), as
    // grouped_gemm_kernel's
    constexpr bool IDS_OK = BM <= 32;
    __shared__ int s_ids[IDS_OK ? IDS_MAX_X + 1 + IDS_MAX_T : 1];  // offsets (X+1), tokens
    int *const s_list = s_ids + (IDS_OK ? IDS_MAX_X + 1 : 0);
    const bool by_ids = IDS_OK && p.ids != nullptr;
    int e = 0, row0 = 0, rows = 0, ebeg = 0;
    if (by_ids) {
        if (!ids_tile(p, BM, s_ids, s_list, e, row0, rows, ebeg)) return;  // uniform
    } else if (!find_tile(p, BM, e, row0, rows)) {
        return;  // uniform over the block
    }
    // slot -> token (FC1's A rows, FC2's output rows)
    auto token = [&](int slot) { return by_ids ? s_list[slot - ebeg] : __ldcg(p.perm + slot); };
    const int K = p.K, N = p.N;
    const int n0 = blockIdx.x * C::OUT_COLS;
    if (n0 >= N) return;

    // The loader: lane -> rows lane/4 + 8i, chunks c_j = lane%4 + 4j (j = 0, 1) of each k tile:
    // 4 lanes read 64 contiguous bytes (two full sectors) of a row, and one row's two chunks
    // are one pointer plus the immediates 0 and 64 bytes. Shared slots: swz(r, c) with
    // r & 7 = lane/4 for every i, so two per-lane offsets q_j plus the immediates 1024 i.
    // Source rows, fixed over K, as pointers at chunk c_0 of k tile 0. Rows past the tile's
    // end (A) and columns past N (B) repeat the last valid one: loaded, never stored (an MMA
    // output (r, c) reads only A row r and B row c), so no per-lane predicates; a group of 8
    // A rows wholly past `rows` is not loaded at all (uniform test).
    const int lr = lane >> 2, lc = lane & 3;
    const uint16_t *a_src[C::A_ROWS];
#pragma unroll
    for (int i = 0; i < C::A_ROWS; i++) {
        const int r = min(lr + 8 * i, rows - 1);
        const int src = MODE == MODE_FC1 ? token(row0 + r) : row0 + r;
        a_src[i] = p.A + (int64_t)src * K + lc * 8;
    }
    const int64_t a_lo = SPLIT ? p.Alo - p.A : 0;  // the low parts: same layout, other buffer
    const int64_t wrows = MODE == MODE_FC1 ? 2 * (int64_t)N : N;
    const uint16_t *We = p.W + (int64_t)e * wrows * K + lc * 8;
    const uint16_t *b_src[C::B_ROWS];
#pragma unroll
    for (int i = 0; i < C::B_ROWS; i++) {
        const int r = lr + 8 * i;
        int src;
        if (MODE == MODE_FC1) {
            const int c = min(n0 + (r % (NB / 2)), N - 1);
            src = r < NB / 2 ? c : N + c;
        } else {
            src = min(n0 + r, N - 1);
        }
        b_src[i] = We + (int64_t)src * K;
    }
    const uint32_t q0 = lr * 128 + ((lc ^ lr) << 4), q1 = lr * 128 + (((lc + 4) ^ lr) << 4);

    // The norm epilogue's operands (GroupedNorm::res: grouped_gemm_kernel's, for warp 0, which
    // alone runs the epilogue), requested here to arrive during the k loop: the residual and
    // the gates were written by the routing kernel two launches back, as perm (read above).
    constexpr bool RES = MODE == MODE_FC2;
    constexpr int RMI = RES ? C::MI : 1, RNI = RES ? C::NI : 1;
    float2 rpre[RMI][2][RNI], wpre[RNI];
    int tpre[RMI][2];
    float gpre[RMI][2];
    if constexpr (RES) {
        if (q.res && w == 0)
            norm_preload(q, p.gates, n0, 0, rows, N, lane, [&](int r) { return token(row0 + r); },
                         rpre, wpre, tpre, gpre);
    }

    const uint32_t wbase = smem_u32(smem) + w * C::WARP_SMEM;
    // parts: 1 the A rows, 2 the weight rows, 3 both (a constant at every call).
    auto load = [&](int stage, int kt, int parts) {
        const bool la = parts & 1, lb = parts & 2;
        const uint32_t sW = wbase + stage * C::SUB;
        const uint32_t s0 = sW + q0, s1 = sW + q1;
        constexpr uint32_t BOFF = C::A_BYTES * (SPLIT ? 2 : 1);
        const int k0 = kt * BK;
        if (k0 + BK <= K) {  // a full k tile (uniform)
#pragma unroll
            for (int i = 0; i < C::A_ROWS; i++)
                if (la && 8 * i < rows) {
                    const uint16_t *g = a_src[i] + k0;
                    cp_async16(s0 + 1024 * i, g, 16);
                    cp_async16(s1 + 1024 * i, g + 32, 16);
                    if constexpr (SPLIT) {
                        cp_async16(s0 + C::A_BYTES + 1024 * i, g + a_lo, 16);
                        cp_async16(s1 + C::A_BYTES + 1024 * i, g + a_lo + 32, 16);
                    }
                }
#pragma unroll
            for (int i = 0; i < C::B_ROWS; i++) {
                if (!lb) break;
                const uint16_t *g = b_src[i] + k0;
                cp_async16(s0 + BOFF + 1024 * i, g, 16);
                cp_async16(s1 + BOFF + 1024 * i, g + 32, 16);
            }
        } else {  // the K tail: chunks past K zero-filled (K % 8 == 0: all in or all out)
            const bool in0 = k0 + lc * 8 < K, in1 = k0 + lc * 8 + 32 < K;
            const int o0 = in0 ? k0 : 0, o1 = in1 ? k0 + 32 : 0;
            const int n0b = in0 ? 16 : 0, n1b = in1 ? 16 : 0;
#pragma unroll
            for (int i = 0; i < C::A_ROWS; i++)
                if (la && 8 * i < rows) {
                    cp_async16(s0 + 1024 * i, a_src[i] + o0, n0b);
                    cp_async16(s1 + 1024 * i, a_src[i] + o1, n1b);
                    if constexpr (SPLIT) {
                        cp_async16(s0 + C::A_BYTES + 1024 * i, a_src[i] + a_lo + o0, n0b);
                        cp_async16(s1 + C::A_BYTES + 1024 * i, a_src[i] + a_lo + o1, n1b);
                    }
                }
#pragma unroll
            for (int i = 0; i < C::B_ROWS; i++) {
                if (!lb) break;
                cp_async16(s0 + BOFF + 1024 * i, b_src[i] + o0, n0b);
                cp_async16(s1 + BOFF + 1024 * i, b_src[i] + o1, n1b);
            }
        }
    };

    float acc[C::MI][C::NI][4];
#pragma unroll
    for (int mi = 0; mi < C::MI; mi++)
#pragma unroll
        for (int ni = 0; ni < C::NI; ni++)
#pragma unroll
            for (int j = 0; j < 4; j++) acc[mi][ni][j] = 0.f;

    const int KT = (K + BK - 1) / BK;
    const int nk = KT > w ? (KT - w + WK - 1) / WK : 0;  // this warp's k tiles w, w + WK, ...
    if (MODE == MODE_FC2 && p.pdl == PDL_EARLY) {  // as grouped_gemm_kernel's prologue
#pragma unroll
        for (int s = 0; s < STAGES - 1; s++)
            if (s < nk) load(s, w + s * WK, 2);
        bm_pdl_wait_only();
#pragma unroll
        for (int s = 0; s < STAGES - 1; s++) {
            if (s < nk) load(s, w + s * WK, 1);
            cp_async_commit();
        }
    } else {
#pragma unroll
        for (int s = 0; s < STAGES - 1; s++) {
            if (s < nk) load(s, w + s * WK, 3);
            cp_async_commit();  // empty groups keep the count uniform
        }
    }
    const int a_row = lane & 15, a_chk = lane >> 4;
    const int b_row = (lane & 7) + ((lane >> 4) << 3), b_chk = (lane >> 3) & 1;
    auto b_base = [&](int j) -> int {  // as grouped_gemm_kernel's, one warp over the tile
        if (MODE == MODE_FC1) {
            constexpr int JH = C::NI / 4;
            return (j / JH) * (NB / 2) + (j % JH) * 16;
        }
        return j * 16;
    };
    int rs = 0, ws = STAGES - 1;  // the stage read, the stage refilled
    for (int j = 0; j < nk; j++) {
        cp_async_wait<STAGES - 2>();
        __syncwarp();  // stage rs landed for every lane; every lane is done with stage ws
        {
            const int jn = j + STAGES - 1;
            if (jn < nk) load(ws, w + jn * WK, 3);
            cp_async_commit();
            ws = ws + 1 == STAGES ? 0 : ws + 1;
        }
        const uint32_t sA = wbase + rs * C::SUB;
        const uint32_t sL = sA + C::A_BYTES;
        const uint32_t sB = sA + C::A_BYTES * (SPLIT ? 2 : 1);
        rs = rs + 1 == STAGES ? 0 : rs + 1;
        mma_k_tile<C::MI, C::NI, SPLIT>(acc, sA, sL, sB, a_row, a_chk, b_row, b_chk, b_base);
    }
    cp_async_wait<0>();

    if constexpr (WK > 1) {  // warps 1.. hand their sums to warp 0 (the pipelines' smem reused)
        __syncthreads();     // every warp done reading its stages
        float *red = reinterpret_cast<float *>(smem);  // (WK-1, MI, NI, 4, 32)
        if (w > 0) {
#pragma unroll
            for (int mi = 0; mi < C::MI; mi++)
#pragma unroll
                for (int ni = 0; ni < C::NI; ni++)
#pragma unroll
                    for (int j = 0; j < 4; j++)
                        red[((((w - 1) * C::MI + mi) * C::NI + ni) * 4 + j) * 32 + lane] =
                            acc[mi][ni][j];
        }
        __syncthreads();
        if (w > 0) return;
#pragma unroll
        for (int v = 0; v < WK - 1; v++)
#pragma unroll
            for (int mi = 0; mi < C::MI; mi++)
#pragma unroll
                for (int ni = 0; ni < C::NI; ni++)
#pragma unroll
                    for (int j = 0; j < 4; j++)
                        acc[mi][ni][j] += red[(((v * C::MI + mi) * C::NI + ni) * 4 + j) * 32 + lane];
    }

    // Epilogue (warp 0): grouped_gemm_kernel's with WM = WN = 1.
#pragma unroll
    for (int mi = 0; mi < C::MI; mi++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = mi * 16 + (lane >> 2) + 8 * h;
            if (r >= rows) continue;
            const int64_t slot = row0 + r;
            if constexpr (MODE == MODE_FC1) {
#pragma unroll
                for (int ni = 0; ni < C::NI / 2; ni++) {
                    const int col = n0 + ni * 8 + 2 * (lane & 3);
                    if (col >= N) continue;
                    const float(&g)[4] = acc[mi][ni], (&u)[4] = acc[mi][ni + C::NI / 2];
                    const float v0 = bm_act_fn(g[2 * h], p.act) * u[2 * h];
                    const float v1 = bm_act_fn(g[2 * h + 1], p.act) * u[2 * h + 1];
                    uint16_t h0, h1, l0, l1;
                    bm_f32_to_bf16_split(v0, h0, l0);
                    bm_f32_to_bf16_split(v1, h1, l1);
                    *reinterpret_cast<uint32_t *>(p.ab + slot * N + col) = pack_bf16(h0, h1);
                    if constexpr (SPLIT)
                        *reinterpret_cast<uint32_t *>(p.al + slot * N + col) = pack_bf16(l0, l1);
                }
            } else if (RES && q.res) {
                // the next layer's norm, as grouped_gemm_kernel's, with the low parts of
                // res * w where q.nlo (split); part n0 / 32 (OUT_COLS = NORM_PART_COLS)
                if constexpr (RES)
                    norm_epilogue_row<C::NI, true>(q, acc[mi], h, tpre[mi][h], gpre[mi][h], n0,
                                                   rpre[mi][h], wpre, N, lane);
            } else {
                const int t = token((int)slot);
                const float g = p.gates ? __ldcg(p.gates + t) : 1.f;
                float *dst = p.out + (int64_t)t * N;
#pragma unroll
                for (int ni = 0; ni < C::NI; ni++) {
                    const int col = n0 + ni * 8 + 2 * (lane & 3);
                    if (col >= N) continue;
                    *reinterpret_cast<float2 *>(dst + col) =
                        make_float2(g * acc[mi][ni][2 * h], g * acc[mi][ni][2 * h + 1]);
                }
            }
        }
    }
}

std::atomic<long long> dec_launches{0};  // grouped_dec_kernel launches (the tests)
std::atomic<long long> pdl_launches{0};  // decode GEMMs launched with PDL (the tests)
std::atomic<long long> expert_launches{0};  // fc1 launches in the PDL_EXPERT form (the tests)
std::atomic<long long> ids_calls{0};  // layers whose GEMMs read the ids (BM_MOE_GROUPED_IDS)
std::atomic<long long> norm_calls{0};  // calls with the norm epilogue (GroupedNorm::res)

// Row tiles a launch needs at most: tokens T' <= T over m <= min(X, T) experts with tokens
// make sum_e ceil(n_e / BM) = m + sum_e floor((n_e - 1) / BM) <= m + floor((T - m) / BM),
// which grows with m: so min(X, T) + floor((T - min(X, T)) / BM) (at T = 64, X = 8: 9 tiles
// of 32 rows, 11 of 16, against the 10 and 12 of the earlier ceil(T / BM) + min(X, T)).
int64_t row_tiles(int64_t T, int64_t X, int BM) {
    const int64_t m = X < T ? X : T;
    return m + (T - m) / BM;
}

// Launch a grouped GEMM, with the programmatic-stream-serialization attribute where p.pdl
// asks for it (the decode roles' tiles; BLACKMAMBA_CUDA_PDL=0 and devices below 9.0: never).
// Not through bm_launch_pdl: its one-wave rule (grids of <= 8 blocks an SM) would drop fc1's
// at T = 64 (121 x 9 CTAs of which ~20% leave at once, 4 resident an SM); these kernels wait
// before they read what the kernel before writes, whatever the grid, and the rule is about
// large prefill grids waiting behind a GEMM (cuda/NOTES.md, gpuperf run 2), which keep plain
// launches.
template <typename K, typename... More>
int launch_grouped(K kernel, dim3 grid, int nt, int smem, cudaStream_t stream,
                   const GroupedArgs &p, const More &...more) {
    if (p.pdl == PDL_NONE || !bm_pdl_allowed()) {
        kernel<<<grid, nt, smem, stream>>>(p, more...);
        BM_CUDA_LAUNCHED();
        return 0;
    }
    // fc2's CTAs at most ceil(CTAs / SMs) an SM (up to the shared-memory limit, 9 of its
    // 24 KB CTAs at T = 64, would gather on the SMs that free first)
    if (p.cap) {
        const int st = bm_pdl_spread_smem(kernel, grid, &smem);
        if (st) return st;
    }
    BM_CUDA_TRY(bm_launch_ex(kernel, grid, dim3(nt), (size_t)smem, stream, true, 1, false, p,
                             more...));
    pdl_launches.fetch_add(1, std::memory_order_relaxed);
    return 0;
}

template <int BM, int NB, int WK, int STAGES, int MODE, bool SPLIT>
int dec_launch(const GroupedDecArgs &pd, int64_t T, cudaStream_t stream) {
    using C = DecTile<BM, NB, WK, STAGES, MODE, SPLIT>;
    // the norm epilogue's partial sums are per 32 columns: one a CTA
    if (pd.nm.res && (MODE != MODE_FC2 || C::OUT_COLS != NORM_PART_COLS))
        return BM_CUDA_ARG_FAIL("moe_grouped: the norm epilogue needs fc2's 32-column tiles");
    GroupedArgs p = pd;
    if (p.pdl == PDL_EXPERT) p.pdl = PDL_WAIT;  // grouped_gemm_kernel's form only
    auto kernel = grouped_dec_kernel<BM, NB, WK, STAGES, MODE, SPLIT>;
    static std::atomic<unsigned> optin{0};
    int st = bm_smem_optin(kernel, C::SMEM, optin);
    if (st) return st;
    const int64_t ytiles = row_tiles(T, p.X, BM);
    if (ytiles > 65535) return BM_CUDA_ARG_FAIL("moe_grouped: too many tokens for one launch");
    const dim3 grid((unsigned)bm_cdiv(p.N, C::OUT_COLS), (unsigned)ytiles);
    if ((st = launch_grouped(kernel, grid, C::NT, C::SMEM, stream, p, pd.nm))) return st;
    dec_launches.fetch_add(1, std::memory_order_relaxed);
    return 0;
}

#include "grouped_wgmma.cuh"  // the Hopper (wgmma) core of the prefill tiles
// Default: the TMA core (grouped_tma.cuh) where the wgmma core would run.
constexpr int TMA_DEFAULT_ON = 1;
constexpr int64_t TMA_MIN_ROWS = 512;  // ... and from this many rows (gemm_dispatch)
#include "grouped_tma.cuh"    // ... with a bulk-tensor-copy producer

// Launch one grouped GEMM of this configuration over an upper bound of row tiles.
template <int BM, int NB, int WM, int WN, int STAGES, int MODE, bool SPLIT>
int gemm_launch(const GroupedDecArgs &p_in, int64_t T, cudaStream_t stream) {
    using C = Tile<BM, NB, WM, WN, STAGES, MODE, SPLIT>;
    GroupedDecArgs p = p_in;
    // The PDL_EXPERT form is instantiated for the decode fc1 tiles (at most 32 rows) only;
    // elsewhere it is the wait-first form (as on grouped_dec_kernel).
    constexpr bool XM_OK = MODE == MODE_FC1 && BM <= 32;
    if (!XM_OK && p.pdl == PDL_EXPERT) p.pdl = PDL_WAIT;
    // the norm epilogue's partial sums are per 32 columns (bm_cuda_moe_norm_out)
    if (p.nm.res && (MODE != MODE_FC2 || SPLIT || C::WTN != NORM_PART_COLS))
        return BM_CUDA_ARG_FAIL("moe_grouped: the norm epilogue needs fc2's unsplit decode tiles");
    const bool xm = XM_OK && p.pdl == PDL_EXPERT;
    auto kernel = grouped_gemm_kernel<BM, NB, WM, WN, STAGES, MODE, SPLIT, false>;
    static std::atomic<unsigned> optin{0}, optin_xm{0};
    int st;
    if (xm) {
        kernel = grouped_gemm_kernel<BM, NB, WM, WN, STAGES, MODE, SPLIT, XM_OK>;
        st = bm_smem_optin(kernel, C::SMEM, optin_xm);
    } else {
        st = bm_smem_optin(kernel, C::SMEM, optin);
    }
    if (st) return st;
    // PDL_EXPERT: one CTA row per expert (FC1); else an upper bound of row tiles
    const int64_t ytiles = xm ? p.X : row_tiles(T, p.X, BM);
    if (ytiles > 65535) return BM_CUDA_ARG_FAIL("moe_grouped: too many tokens for one launch");
    const dim3 grid((unsigned)bm_cdiv(p.N, C::OUT_COLS), (unsigned)ytiles);
    if ((st = launch_grouped(kernel, grid, C::NT, C::SMEM, stream, p, p.nm))) return st;
    if (xm) expert_launches.fetch_add(1, std::memory_order_relaxed);
    return 0;
}

// Tile choice. Many rows per expert (prefill, T >= 1024 and >= 64 X): 64..128-row tiles;
// few (decode batches, small prefills): the GEMMs stream weights, so 16..32-row tiles (an
// expert with <= 32 tokens reads each weight once), deeper pipelines and narrow column tiles
// to have enough CTAs. Variants per role (prefill fc1, prefill fc2, decode fc1, decode fc2),
// numbered 1..5, and for the decode roles 6..9 on grouped_dec_kernel; `tiles` holds one digit
// per role (0 = the default, DEFAULT_TILES except the decode fc2 below), from
// BLACKMAMBA_MOE_GROUPED_TILES (dev: measurements; the tests run every variant).
// Measured on the H200 (cuda/NOTES.md, session 3 grouped), all within ~5% of each other
// except the 64-row prefill fc2 tiles (worse) and variant 5 (worse): 4-warp 64x64 warp
// tiles for prefill, 32x64 tiles for decode. Session 5 (dec64b): at T = 64 the decode fc2
// variants all land within 1 us (84.4..85.5 us for the layer), so the fc2 there is not
// bound by the kernel's instruction stream as Nsight Compute suggested; the one-warp decode
// fc1 variants 6..9 were 5-9 us slower than 32x64 two-warp tiles.
constexpr char DEFAULT_TILES[] = "2222";

// The decode tiles launched plainly, in stream order (short prefills, ops calls: no PDL, no
// graph, no norm epilogue, no routing from the ids), take their own defaults (session 23), and
// so do a prefill's with PDL flags (BM_MOE_GROUPED_PREFILL, session 24).
// The decode's above were chosen in the captured decode step, where fc1 and fc2 meet PDL and
// the L2 staging; a short prefill's same-process sweep of every variant (H200, 2.8B shape,
// batch 1, 8 to 384 tokens; cuda/NOTES.md session 23) found smaller fc1 tiles and other fc2
// tiles faster there, and the TMA core faster from TMA_MIN_ROWS_PLAIN rows (unsplit) instead
// of TMA_MIN_ROWS. Rows an expert on average r = T / X. BLACKMAMBA_MOE_PLAIN_TILES=0: the
// decode's defaults and TMA_MIN_ROWS (A/B). A variant digit in BLACKMAMBA_MOE_GROUPED_TILES
// wins over both.
bool plain_tiles_on() { return bm_env_switch("BLACKMAMBA_MOE_PLAIN_TILES", true); }
bool plain_defaults(const GroupedDecArgs &p) {
    return (p.pdl == PDL_NONE || p.prefill) && !p.nm.res && !p.ids && plain_tiles_on();
}
// 320 tokens at X = 8 -0.9%, 384 -2.3%, 448 -7.5%, 2 x 192 -3.1%; 256 +5%, 129 +15%
constexpr int64_t TMA_MIN_ROWS_PLAIN = 320;
std::atomic<long long> plain_calls{0};  // GEMMs that took plain_tile (tests)
int plain_tile(int role, bool split, int64_t T, int64_t X) {
    if (role == 2) return T <= 8 * X ? 5 : T <= 16 * X ? 1 : 2;  // fc1: 16x64, 32x128, 32x64
    if (T <= 6 * X) return 1;                                    // fc2: 16x32, 8 stages
    return split && T <= 16 * X ? 2 : 3;                         // 32x32 x 4, 32x64 x 6
}

// The prefill roles (many rows per expert) against the decode roles: the tile choice's split,
// which ids_route_ok and norm_route_ok follow.
bool big_call(int64_t T, int64_t X) { return T >= 64 * X && T >= 1024; }

template <int MODE, bool SPLIT>
int gemm_dispatch(GroupedDecArgs p, int64_t T, const char *tiles, cudaStream_t stream) {
    const bool big = big_call(T, p.X);
    if (big) p.pdl = PDL_NONE;  // PDL only on the decode roles' tiles (decode, short prefill)
    const bool plain = plain_defaults(p);  // a plain launch: plain_tile and TMA_MIN_ROWS_PLAIN
    if constexpr (!SPLIT) {  // prefill tiles on the wgmma core where built and enabled
        const int wm = wgmma_mode(), tm = tma_mode();
        if (wm && wgmma_usable()) {
            // the TMA core also below the prefill size, from TMA_MIN_ROWS (short prompts: at
            // T = 512 0.117 against the decode tiles' 0.151 ms for the layer, at 256 0.114
            // against 0.108; H200, s11)
            if (p.ids && (big || wm == 2 || tm == 2))
                return BM_CUDA_ARG_FAIL("moe_grouped: the routing from ids needs the decode tiles");
            const int64_t tma_min = plain ? TMA_MIN_ROWS_PLAIN : TMA_MIN_ROWS;
            const bool try_tma = tm && (big || T >= tma_min || tm == 2);
            const bool wgmma = big || wm == 2;  // where the TMA core declines or is off
            // (the norm epilogue lives on the decode tiles only: norm_route_ok keeps it off
            // these two cores)
            if (p.nm.res && (try_tma || wgmma))
                return BM_CUDA_ARG_FAIL("moe_grouped: the norm epilogue needs the decode tiles");
            if (try_tma) {
                GroupedArgs pt = p;
                pt.pdl = PDL_NONE;  // plain launches (stream order), as the wgmma core's
                bool taken = false;
                const int st = tma_launch<MODE>(pt, T, stream, &taken);
                if (st || taken) return st;
            }
            if (wgmma) {
                p.pdl = PDL_NONE;
                return wgmma_dispatch<MODE>(p, T, stream);
            }
        }
    }
    const int role = (big ? 0 : 2) + (MODE == MODE_FC2 ? 1 : 0);
    int v = tiles[role] - '0';
    // Default: DEFAULT_TILES, except the prefill fc1 below 4096 tokens: 64-row tiles (variant
    // 4) waste half as many padding rows at each expert's end (~32 of ~256 rows an expert at
    // T = 2048, X = 8): 0.2763 against 0.2840 ms for the layer at T = 2048 on the H200; at
    // T = 16384, where the padding is 3%, the 128-row tiles win (1.736 against 1.944 ms).
    // Decode fc2 at up to 16 rows an expert on average (decode batches; cuda/NOTES.md session 5
    // dec64b, same-process A/B on the H200): split (batch 8) variant 7, grouped_dec_kernel on
    // 2-warp k slices, 74 against 80 us for the layer's experts and 2.34-2.45 against 2.54-2.58
    // ms/step; unsplit (batch 64) variant 5, the 16-row tiles, 84.4 against 85.5 us and
    // 2.467-2.473 against 2.484-2.493 ms/step. More rows: variant 2 as before.
    // Session 12 (cuda/NOTES.md; same process, whole step in the graph, fc2 launched early
    // with PDL and capped, the routing from the ids): deeper fc2 pipelines win, unsplit: up to
    // 4 rows an expert on average (B = 16, 32 at X = 8) variant 1, 16-row tiles with 7 k tiles
    // in flight (1.840 -> 1.770 ms at B = 16 against variant 5, 2.016 -> 1.961 at 32); up to
    // 32 rows variant 4, 32-row tiles with 5 (2.281 -> 2.197 at B = 64: a 16-row tile reads an
    // expert's weights twice once it has more than 16 tokens). Logits bit-identical (the same
    // k order per output).
    if (v < 1 || v > (role >= 2 ? 9 : 5)) {  // no variant digit: the defaults
        if (role >= 2 && plain) {
            v = plain_tile(role, SPLIT, T, p.X);
            plain_calls.fetch_add(1, std::memory_order_relaxed);
        } else if (role == 3 && SPLIT && T <= 16 * (int64_t)p.X) v = 7;
        else if (role == 3 && !SPLIT && T <= 4 * (int64_t)p.X) v = 1;
        else if (role == 3 && !SPLIT && T <= 32 * (int64_t)p.X) v = 4;
        else v = role == 0 && T < 4096 ? 4 : DEFAULT_TILES[role] - '0';
    }
    if (p.ids && role < 2)  // ids_route_ok() keeps this from happening
        return BM_CUDA_ARG_FAIL("moe_grouped: the routing from ids needs the decode tiles");
#define BM_GROUPED_LAUNCH(BM, NB, WM, WN, ST) return gemm_launch<BM, NB, WM, WN, ST, MODE, SPLIT>(p, T, stream)
#define BM_DEC_LAUNCH(BM, NB, WK, ST) return dec_launch<BM, NB, WK, ST, MODE, SPLIT>(p, T, stream)
    switch (role * 10 + v) {
        case 0 * 10 + 1: BM_GROUPED_LAUNCH(128, 128, 2, 4, 3);  // 8 warps of 64 x 32, 2 per SM
        case 0 * 10 + 2: BM_GROUPED_LAUNCH(128, 128, 2, 2, 3);  // 4 warps of 64 x 64, 2 per SM
        case 0 * 10 + 3: BM_GROUPED_LAUNCH(128, 256, 2, 4, 3);  // 8 warps of 64 x 64, 1 per SM
        case 0 * 10 + 4: BM_GROUPED_LAUNCH(64, 128, 2, 2, 3);   // 4 warps of 32 x 64, 3 per SM
        case 0 * 10 + 5: BM_GROUPED_LAUNCH(128, 128, 2, 2, 4);  // 4 stages, 1 per SM
        case 1 * 10 + 1: BM_GROUPED_LAUNCH(128, 128, 2, 4, 3);
        case 1 * 10 + 2: BM_GROUPED_LAUNCH(128, 128, 2, 2, 3);
        case 1 * 10 + 3: BM_GROUPED_LAUNCH(64, 128, 2, 2, 3);
        case 1 * 10 + 4: BM_GROUPED_LAUNCH(64, 64, 2, 2, 4);    // 4 warps of 32 x 32, 3 per SM
        case 1 * 10 + 5: BM_GROUPED_LAUNCH(128, 64, 2, 2, 4);   // 4 warps of 64 x 32
        case 2 * 10 + 1: BM_GROUPED_LAUNCH(32, 128, 1, 4, 4);   // 2 per SM
        case 2 * 10 + 2: BM_GROUPED_LAUNCH(32, 64, 1, 2, 4);    // twice the CTAs, 4 per SM
        case 2 * 10 + 3: BM_GROUPED_LAUNCH(16, 128, 1, 4, 4);
        case 2 * 10 + 4: BM_GROUPED_LAUNCH(32, 64, 1, 2, 6);    // deeper, 3 per SM
        case 2 * 10 + 5: BM_GROUPED_LAUNCH(16, 64, 1, 2, 4);
        case 3 * 10 + 1: BM_GROUPED_LAUNCH(16, 32, 1, 1, 8);    // one warp, 7 k tiles in flight
        case 3 * 10 + 2: BM_GROUPED_LAUNCH(32, 32, 1, 1, 4);    // one warp, up to 6 per SM
        case 3 * 10 + 3: BM_GROUPED_LAUNCH(32, 64, 1, 2, 6);
        case 3 * 10 + 4: BM_GROUPED_LAUNCH(32, 32, 1, 1, 6);
        case 3 * 10 + 5: BM_GROUPED_LAUNCH(16, 32, 1, 1, 4);
        // grouped_dec_kernel (BM, NB, WK warps on k slices, stages): decode fc1 ...
        case 2 * 10 + 6: BM_DEC_LAUNCH(16, 64, 1, 4);
        case 2 * 10 + 7: BM_DEC_LAUNCH(32, 64, 1, 4);
        case 2 * 10 + 8: BM_DEC_LAUNCH(16, 64, 2, 4);
        case 2 * 10 + 9: BM_DEC_LAUNCH(16, 128, 1, 4);
        // ... and decode fc2
        case 3 * 10 + 6: BM_DEC_LAUNCH(16, 32, 1, 6);
        case 3 * 10 + 7: BM_DEC_LAUNCH(16, 32, 2, 4);
        case 3 * 10 + 8: BM_DEC_LAUNCH(16, 32, 4, 3);
        default: BM_DEC_LAUNCH(32, 32, 2, 4);  // 3 * 10 + 9
    }
#undef BM_GROUPED_LAUNCH
#undef BM_DEC_LAUNCH
}

// BLACKMAMBA_MOE_GROUPED_TILES: one variant digit per role ("0" the default), into t[0..3].
void grouped_tiles(char (&t)[5]) {
    const char *e = getenv("BLACKMAMBA_MOE_GROUPED_TILES");
    memcpy(t, "0000", 5);
    for (int i = 0; e && i < 4 && e[i]; i++) t[i] = e[i];
}

// BLACKMAMBA_MOE_WPOL: "0" (a leading '0', as the other switches) loads the decode roles'
// weights without the evict_first hint (GroupedArgs::wpol); unset or anything else: with it. Read per call (decode: at capture).
// Measured (H200, same process, with the staging at 32 MB against 16 MB and no hint;
// cuda/NOTES.md session 13): B = 16 -0.7 to -1.8%, B = 32 -0.6 to -1.1%, B = 64 even.
std::atomic<long long> wpol_calls{0};
int grouped_wpol() { return bm_env_switch("BLACKMAMBA_MOE_WPOL", true) ? 1 : 0; }

// Can both GEMMs of a call take their routing from the ids (BM_MOE_GROUPED_IDS)? Where
// gemm_dispatch picks decode tiles (BM <= 32: grouped_gemm_kernel's or grouped_dec_kernel's,
// split or not) for both roles: not big, not a forced wgmma / TMA core, and the sizes the
// in-CTA dispatch holds.
bool ids_route_ok(int64_t T, int64_t X, bool split, const char *tiles) {
    if (big_call(T, X) || T < 1 || T > IDS_MAX_T || X < 1 || X > IDS_MAX_X) return false;
    const int wm = wgmma_mode(), tm = tma_mode();
    if (!split && wm && (wm == 2 || tm == 2) && wgmma_usable()) return false;
    // every decode tile holds at most 32 rows: grouped_gemm_kernel's variants 1..5 and
    // (session 19, split or not) grouped_dec_kernel's 6..9
    for (int role = 2; role < 4; role++)
        if (tiles[role] < '0' || tiles[role] > '9') return false;
    return true;
}

// Does fc2 of a call of these sizes run on decode tiles that have the norm epilogue
// (GroupedNorm::res)? Unsplit: grouped_gemm_kernel's (not big, no wgmma / TMA core that could
// take it (conservative: the TMA core may still decline), a decode fc2 tile variant 1..5 or
// the default). Split: grouped_dec_kernel's (below).
bool norm_route_ok(int64_t T, int64_t X, bool split, const char *tiles) {
    if (big_call(T, X) || T < 1 || X < 1) return false;
    // split: fc2 on grouped_dec_kernel (gemm_dispatch's variant 7 by default up to 16 rows an
    // expert, or a forced 6..9: all 32-column tiles)
    if (split) return (tiles[3] == '0' && T <= 16 * X) || (tiles[3] >= '6' && tiles[3] <= '9');
    const int wm = wgmma_mode(), tm = tma_mode();
    if (wm && wgmma_usable() && (wm == 2 || (tm && (T >= TMA_MIN_ROWS || tm == 2))))
        return false;
    return tiles[3] >= '0' && tiles[3] <= '5';
}

// Workspace: perm (T) | offsets (X+1) | xb (T, d) | ab (T, F) | then split: xl (T, d) |
// al (T, F), unsplit: xg (T, d); each 256-byte aligned.
struct GroupedWs {
    int32_t *perm, *offsets;
    uint16_t *xb, *ab, *xl, *al, *xg;
    size_t bytes;
};
GroupedWs grouped_ws(char *base, int64_t T, int64_t d, int64_t X, int64_t F, bool split) {
    GroupedWs w{};
    size_t off = 0;
    auto take = [&](size_t bytes) -> char * {
        char *q = base ? base + off : nullptr;
        off += (bytes + 255) & ~(size_t)255;
        return q;
    };
    w.perm = (int32_t *)take(T * 4);
    w.offsets = (int32_t *)take((X + 1) * 4);
    w.xb = (uint16_t *)take(T * d * 2);
    w.ab = (uint16_t *)take(T * F * 2);
    w.xl = split ? (uint16_t *)take(T * d * 2) : nullptr;
    // unsplit: fc1's A gathered in slot order for the TMA core (the same bytes as xl)
    w.xg = split ? nullptr : (uint16_t *)take(T * d * 2);
    w.al = split ? (uint16_t *)take(T * F * 2) : nullptr;
    w.bytes = off;
    return w;
}

}  // namespace

extern "C" int bm_cuda_moe_grouped_mode(void) {
    const char *v = getenv("BLACKMAMBA_MOE_GROUPED");
    if (!v || !v[0]) return 1;
    if (v[0] == '0') return 0;
    return strcmp(v, "force") == 0 ? 2 : 1;
}

// How many GEMMs ran on the wgmma core (grouped_wgmma.cuh) in this process: for the tests.
extern "C" long long bm_cuda_moe_grouped_wgmma_launches(void) {
    return wgmma_launches.load(std::memory_order_relaxed);
}

// How many GEMMs ran on the TMA core (grouped_tma.cuh) in this process: for the tests.
extern "C" long long bm_cuda_moe_grouped_tma_launches(void) {
    return tma_launches.load(std::memory_order_relaxed);
}

// How many GEMMs ran on the decode kernel (grouped_dec_kernel) in this process: for the tests.
extern "C" long long bm_cuda_moe_grouped_dec_launches(void) {
    return dec_launches.load(std::memory_order_relaxed);
}

// How many GEMMs took the plain-launch tile defaults (plain_tile) in this process: the tests.
extern "C" long long bm_cuda_moe_grouped_plain_tile_calls(void) {
    return plain_calls.load(std::memory_order_relaxed);
}

// How many GEMMs were launched with PDL (BM_MOE_GROUPED_PDL) in this process: for the tests.
extern "C" long long bm_cuda_moe_grouped_pdl_launches(void) {
    return pdl_launches.load(std::memory_order_relaxed);
}

// How many fc1 GEMMs ran in the one-row-per-expert form (BM_MOE_GROUPED_PDL_EXPERT).
extern "C" long long bm_cuda_moe_grouped_expert_launches(void) {
    return expert_launches.load(std::memory_order_relaxed);
}
// How many calls ran both GEMMs on the routing from the ids (BM_MOE_GROUPED_IDS taken).
extern "C" long long bm_cuda_moe_grouped_ids_calls(void) {
    return ids_calls.load(std::memory_order_relaxed);
}
extern "C" long long bm_cuda_moe_grouped_wpol_calls(void) {
    return wpol_calls.load(std::memory_order_relaxed);
}
extern "C" int bm_cuda_moe_grouped_ids_ok(int64_t T, int64_t X, int split) {
    char tiles[5];
    grouped_tiles(tiles);
    return ids_route_ok(T, X, split != 0, tiles);
}

// perm and offsets inside a bm_cuda_moe_grouped workspace of these sizes: where a caller
// that builds the dispatch itself (engine.cu's routing kernel) writes it for
// bm_cuda_moe_grouped_bf16_ex(.., BM_MOE_GROUPED_DISPATCHED, ..).
extern "C" void bm_cuda_moe_grouped_dispatch_bufs(void *workspace, int64_t T, int64_t d,
                                                  int64_t X, int64_t F, int split,
                                                  int32_t **perm, int32_t **offsets) {
    const GroupedWs ws = grouped_ws((char *)workspace, T, d, X, F, split != 0);
    *perm = ws.perm;
    *offsets = ws.offsets;
}

extern "C" int bm_cuda_moe_grouped_supported(const float *x, const void *fc1, const void *fc2,
                                             bm_dtype wdtype, const float *out, int64_t d,
                                             int64_t X, int64_t F) {
    return wdtype == BM_BF16 && d % 8 == 0 && F % 8 == 0 && d > 0 && F > 0 && X >= 1 &&
           X <= MAX_EXPERTS && d <= INT32_MAX / 2 && F <= INT32_MAX / 2 &&
           (((uintptr_t)x | (uintptr_t)fc1 | (uintptr_t)fc2) & 15) == 0 &&
           ((uintptr_t)out & 7) == 0;
}

extern "C" size_t bm_cuda_moe_grouped_workspace(int64_t T, int64_t d, int64_t X, int64_t F,
                                                int split) {
    return grouped_ws(nullptr, T, d, X, F, split != 0).bytes;
}

extern "C" int bm_cuda_moe_grouped_norm_ok(int64_t T, int64_t X, int split) {
    char tiles[5];
    grouped_tiles(tiles);
    return norm_route_ok(T, X, split != 0, tiles);
}

extern "C" int64_t bm_cuda_moe_norm_parts(int64_t d) {
    return (d + NORM_PART_COLS - 1) / NORM_PART_COLS;
}

extern "C" long long bm_cuda_moe_grouped_norm_calls(void) {
    return norm_calls.load(std::memory_order_relaxed);
}

extern "C" int bm_cuda_moe_grouped_bf16_ex(const float *x, const uint16_t *xb_in,
                                           const uint16_t *xl_in, const int32_t *ids,
                                           const float *gates, const void *fc1,
                                           const void *fc2, bm_act act, int split, float *out,
                                           int64_t T, int64_t d, int64_t X, int64_t F,
                                           void *workspace, size_t workspace_bytes, int flags,
                                           cudaStream_t stream) {
    return bm_cuda_moe_grouped_bf16_norm(x, xb_in, xl_in, ids, gates, fc1, fc2, act, split, out,
                                         T, d, X, F, workspace, workspace_bytes, flags, nullptr,
                                         stream);
}

extern "C" int bm_cuda_moe_grouped_bf16_norm(const float *x, const uint16_t *xb_in,
                                             const uint16_t *xl_in, const int32_t *ids,
                                             const float *gates, const void *fc1,
                                             const void *fc2, bm_act act, int split, float *out,
                                             int64_t T, int64_t d, int64_t X, int64_t F,
                                             void *workspace, size_t workspace_bytes, int flags,
                                             const bm_cuda_moe_norm_out *norm,
                                             cudaStream_t stream) {
    if (T <= 0 || d <= 0) return 0;
    if (norm && (!norm->res || !norm->w || !norm->xbf || !norm->ssp ||
                 (((uintptr_t)norm->res | (uintptr_t)norm->w) & 7) ||
                 (((uintptr_t)norm->xbf | (uintptr_t)norm->xlo) & 3) ||
                 (split != 0) != (norm->xlo != nullptr)))
        return BM_CUDA_ARG_FAIL("moe_grouped: the norm epilogue needs res, w (8-byte aligned), "
                                "xbf (4-byte aligned), ssp, and xlo (4-byte aligned) exactly "
                                "where split");
    if (xb_in && ((split && !xl_in) || (((uintptr_t)xb_in | (uintptr_t)xl_in) & 15)))
        return BM_CUDA_ARG_FAIL("moe_grouped: given bf16 x needs 16-byte alignment and, split, "
                                "its low parts");
    if (T > INT32_MAX) return BM_CUDA_ARG_FAIL("moe_grouped: T too large");
    if (!bm_cuda_moe_grouped_supported(x, fc1, fc2, BM_BF16, out, d, X, F))
        return BM_CUDA_ARG_FAIL("moe_grouped: needs d % 8 == 0, F % 8 == 0, X <= 256 and "
                                "16-byte aligned x, fc1, fc2 (bm_cuda_moe_grouped_supported)");
    const GroupedWs ws = grouped_ws((char *)workspace, T, d, X, F, split != 0);
    if (!workspace || workspace_bytes < ws.bytes)
        return BM_CUDA_ARG_FAIL("moe_grouped: workspace too small (bm_cuda_moe_grouped_workspace)");
    char tiles[5];
    grouped_tiles(tiles);
    // BM_MOE_GROUPED_IDS: no perm / offsets at all where both GEMMs run on the decode tiles
    // that derive them from the ids; elsewhere the dispatch launch, as without the flag.
    const bool by_ids = (flags & BM_MOE_GROUPED_IDS) && ids_route_ok(T, X, split != 0, tiles);
    if (norm && !norm_route_ok(T, X, split != 0, tiles))
        return BM_CUDA_ARG_FAIL("moe_grouped: the norm epilogue needs fc2 on the decode tiles "
                                "(bm_cuda_moe_grouped_norm_ok)");
    int st;
    if (!by_ids && !(flags & BM_MOE_GROUPED_DISPATCHED) &&
        (st = bm_cuda_moe_dispatch(ids, T, X, nullptr, ws.offsets, ws.perm, stream)))
        return st;
    if (by_ids) ids_calls.fetch_add(1, std::memory_order_relaxed);
    const uint16_t *xb = xb_in, *xl = xl_in;
    if (!xb) {
        to_bf16_kernel<<<(unsigned)T, 128, 0, stream>>>(x, ids, ws.xb, split ? ws.xl : nullptr,
                                                        out, T, (int)d, (int)X);
        BM_CUDA_LAUNCHED();
        xb = ws.xb;
        xl = split ? ws.xl : nullptr;
    }
    const bool pdl =
        flags & (BM_MOE_GROUPED_PDL | BM_MOE_GROUPED_PDL_EARLY | BM_MOE_GROUPED_PDL_EXPERT);
    GroupedDecArgs p1{{xb, xl, (const uint16_t *)fc1, ws.perm, ws.offsets, nullptr,
                   ws.ab, ws.al, nullptr, (int)d, (int)F, (int)X, (int)act,
                   !pdl ? PDL_NONE : (flags & BM_MOE_GROUPED_PDL_EXPERT) ? PDL_EXPERT : PDL_WAIT}};
    p1.xg = ws.xg;
    p1.ids = by_ids ? ids : nullptr;
    p1.T = (int)T;
    const bool prefill = flags & BM_MOE_GROUPED_PREFILL;
    p1.prefill = prefill;
    p1.wpol = pdl && !split && !prefill ? grouped_wpol() : 0;
    if (p1.wpol) wpol_calls.fetch_add(1, std::memory_order_relaxed);
    st = split ? gemm_dispatch<MODE_FC1, true>(p1, T, tiles, stream)
               : gemm_dispatch<MODE_FC1, false>(p1, T, tiles, stream);
    if (st) return st;
    // fc2's early weights need fc1 launched with PDL in front of it (gemm_dispatch keeps
    // both off or both on: the same `big` rule for both at the same T)
    GroupedDecArgs p2{{ws.ab, ws.al, (const uint16_t *)fc2, ws.perm, ws.offsets, gates,
                   nullptr, nullptr, out, (int)F, (int)d, (int)X, (int)act,
                   !pdl || (flags & BM_MOE_GROUPED_FC2_PLAIN) ? PDL_NONE
                   : (flags & (BM_MOE_GROUPED_PDL_EARLY | BM_MOE_GROUPED_PDL_EXPERT))
                       ? PDL_EARLY
                       : PDL_WAIT,
                   (flags & BM_MOE_GROUPED_FC2_CAP) ? 1 : 0}};
    p2.ids = by_ids ? ids : nullptr;
    p2.T = (int)T;
    p2.wpol = p1.wpol;
    p2.prefill = prefill;
    if (norm) {
        p2.nm.res = norm->res;
        p2.nm.nw = norm->w;
        p2.nm.nbf = norm->xbf;
        p2.nm.ssp = norm->ssp;
        p2.nm.nlo = norm->xlo;
        norm_calls.fetch_add(1, std::memory_order_relaxed);
    }
    return split ? gemm_dispatch<MODE_FC2, true>(p2, T, tiles, stream)
                 : gemm_dispatch<MODE_FC2, false>(p2, T, tiles, stream);
}

extern "C" int bm_cuda_moe_grouped_bf16(const float *x, const uint16_t *xb_in,
                                        const uint16_t *xl_in, const int32_t *ids,
                                        const float *gates, const void *fc1, const void *fc2,
                                        bm_act act, int split, float *out, int64_t T, int64_t d,
                                        int64_t X, int64_t F, void *workspace,
                                        size_t workspace_bytes, cudaStream_t stream) {
    return bm_cuda_moe_grouped_bf16_ex(x, xb_in, xl_in, ids, gates, fc1, fc2, act, split, out,
                                       T, d, X, F, workspace, workspace_bytes, 0, stream);
}

extern "C" int bm_cuda_moe_grouped(const float *x, const int32_t *ids, const float *gates,
                                   const void *fc1, const void *fc2, bm_act act, int split,
                                   float *out, int64_t T, int64_t d, int64_t X, int64_t F,
                                   void *workspace, size_t workspace_bytes, cudaStream_t stream) {
    return bm_cuda_moe_grouped_bf16(x, nullptr, nullptr, ids, gates, fc1, fc2, act, split, out,
                                    T, d, X, F, workspace, workspace_bytes, stream);
}
