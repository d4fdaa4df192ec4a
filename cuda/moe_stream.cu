// moe_stream.cu: the expert MLPs of a top-1 MoE layer (SPEC 3) at decode batch sizes (a few
// to ~1000 tokens, x already bf16): grouped.cu's math in two launches instead of three, built
// to stream the expert weights at HBM speed.
//
//   out[t] = g[t] * fc2[e] @ bf16(act(a[:F]) * a[F:]),  a = fc1[e] @ xb[t],  e = ids[t]
//
// Letters: T tokens, d hidden, X experts, F ffn hidden; slot = a token's place in the
// expert-sorted order (experts in order, tokens ascending: moe.cu's dispatch order).
//
// What differs from grouped.cu's decode tiles (session 3 measured them at 3.5 / 3.1 TB/s of
// weights at B = 64, with a 3.7 us dispatch launch before them):
//   - no dispatch launch: every CTA sorts the T ids itself into shared memory (a histogram,
//     then one warp ranks equal ids with __match_any_sync, as moe.cu's dispatch does);
//   - programmatic dependent launch, and the first pipeline stages of the CTA's first
//     weight tile are requested BEFORE griddepcontrol.wait: weights do not depend on the
//     kernel before (norm_route, or fc1 for fc2), so the pipeline fill overlaps its tail;
//   - a persistent grid of about one wave: work units (expert, row tile, column tile) are
//     dealt round-robin, units = CT x (row tiles of the used experts), and the cp.async
//     pipeline runs on across a CTA's units (the next unit's weights are in flight while the
//     last k-tiles of the current one are multiplied). The grid is chosen so that the
//     expected unit count (every expert once) divides into whole units per CTA.
// The GEMM core (mma.sync m16n8k16, ldmatrix from XOR-swizzled shared memory, split hi + lo
// activations under BF16X2) is grouped.cu's, copied: one warp row of 32 token rows (BM = 32,
// MI = 2 m16 tiles), WN warps across the weight rows.
//
// Needs what grouped.cu needs (bm_cuda_moe_grouped_supported), x given as bf16 (and its low
// parts when split), every id in [0, X) (norm_route's output), T <= 1024.
//
// Outcome on the H200 (cuda/NOTES.md, session 4 dec64): bit-identical to grouped.cu, but
// SLOWER in all six variants (decode B=64 +0.08 to +0.3 ms/step over 18 layers), so it is off
// by default (BLACKMAMBA_MOE_STREAM=1 takes it). Suspects, not measured: the per-CTA sort
// (~2 us of dependent loads and barriers before the first activation load, paid again by
// fc2), fewer warps per SM than grouped.cu's 4-CTA occupancy in the persistent variants, and
// the early-launched dependent CTAs holding shared memory during the primary's last wave.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>

#include "common.cuh"

namespace {

constexpr int BK = 64;            // K per pipeline stage: 128-byte smem rows, 8 chunks of 16 B
constexpr int MAX_X = 256;
constexpr int MAX_T = 1024;       // ids and perm in shared memory (8 KB)

__device__ __forceinline__ uint32_t smem_u32(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes));
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
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t swz(int r, int c) {
    return (uint32_t)(r * 128 + ((c ^ (r & 7)) << 4));
}
__device__ __forceinline__ uint32_t pack_bf16(uint16_t lo, uint16_t hi) {
    return (uint32_t)lo | ((uint32_t)hi << 16);
}
// PDL halves (common.cuh's bm_pdl_wait does both at once): let the next kernel be scheduled,
// and wait for the previous one's completion and memory.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

enum { MODE_FC1 = 0, MODE_FC2 = 1 };

struct DecArgs {
    const uint16_t *A;        // FC1: xb (T, K) token order; FC2: ab (T, K) slot order
    const uint16_t *Alo;      // the low parts, same layout (split only)
    const uint16_t *W;        // FC1: fc1 (X, 2F, d); FC2: fc2 (X, d, F)
    const int32_t *ids;       // (T) expert of each token, all in [0, X)
    const float *gates;       // (T) or NULL (FC2)
    uint16_t *ab;             // (T, F) FC1 output, slot order
    uint16_t *al;             // (T, F) its low parts (split only)
    float *out;               // (T, d) FC2 output, token order
    int T, K, N, X, act;      // K: FC1 d, FC2 F; N output columns: FC1 F, FC2 d
    int pre;                  // 1: first weights before griddepcontrol.wait (else after)
};

// BM token rows and NB weight rows per unit (FC1: NB/2 gate + NB/2 up rows, NB/2 output
// columns), WN warps of BM x NB/WN.
template <int BM, int NB, int WN, int STAGES, int MODE, bool SPLIT>
struct DTile {
    static constexpr int NT = WN * 32;
    static constexpr int WTN = NB / WN;
    static constexpr int MI = BM / 16;
    static constexpr int NI = WTN / 8;
    static constexpr int A_BYTES = BM * 128;
    static constexpr int B_BYTES = NB * 128;
    static constexpr int STAGE = A_BYTES * (SPLIT ? 2 : 1) + B_BYTES;
    static constexpr int PIPE = STAGE * STAGES;
    static constexpr int A_ITERS = BM * 8 / NT;
    static constexpr int B_ITERS = NB * 8 / NT;
    static constexpr int OUT_COLS = MODE == MODE_FC1 ? NB / 2 : NB;
    static_assert(WTN % 16 == 0 && BM % 16 == 0, "warp tile");
    static_assert(MODE != MODE_FC1 || NI % 4 == 0, "FC1: 16-column gate/up pairs per warp");
    static_assert(BM * 8 % NT == 0 && NB * 8 % NT == 0, "loader");
};

template <int BM, int NB, int WN, int STAGES, int MODE, bool SPLIT>
__global__ void __launch_bounds__(WN * 32) moe_dec_kernel(const DecArgs p) {
    using C = DTile<BM, NB, WN, STAGES, MODE, SPLIT>;
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ int off_s[MAX_X + 1];  // exclusive slot offsets per expert
    __shared__ int base_s[MAX_X];     // histogram, then running slot per expert
    int *perm_s = reinterpret_cast<int *>(smem + C::PIPE);  // (T) slot -> token
    int *ids_s = perm_s + p.T;                               // (T) the ids
    const int tid = threadIdx.x, lane = tid & 31, wn = tid >> 5;
    const int K = p.K, N = p.N, X = p.X, T = p.T;
    const int CT = (N + C::OUT_COLS - 1) / C::OUT_COLS;  // column tiles
    const int KT = (K + BK - 1) / BK;
    const int kc = tid & 7;
    const int64_t wrows = MODE == MODE_FC1 ? 2 * (int64_t)N : N;  // weight rows per expert
    const uint32_t sbase = smem_u32(smem);

    // Loader state for one unit: source rows (-1: none) of this thread's A and B chunks.
    int a_src[C::A_ITERS], b_src[C::B_ITERS];
    const uint16_t *We = nullptr;
    auto set_b = [&](int e, int c) {
        const int n0 = c * C::OUT_COLS;
#pragma unroll
        for (int i = 0; i < C::B_ITERS; i++) {
            const int r = (tid >> 3) + i * (C::NT / 8);
            if (MODE == MODE_FC1) {  // rows [0, NB/2): gate columns; [NB/2, NB): the up half
                const int col = n0 + (r % (NB / 2));
                b_src[i] = col >= N ? -1 : r < NB / 2 ? col : N + col;
            } else {
                b_src[i] = n0 + r < N ? n0 + r : -1;
            }
        }
        We = p.W + (int64_t)e * wrows * K + kc * 8;
    };
    auto load_b = [&](int stage, int kt) {
        const uint32_t sB = sbase + stage * C::STAGE + C::A_BYTES * (SPLIT ? 2 : 1);
        const bool k_ok = kt * BK + kc * 8 < K;
#pragma unroll
        for (int i = 0; i < C::B_ITERS; i++) {
            const int r = (tid >> 3) + i * (C::NT / 8);
            const bool ok = b_src[i] >= 0 && k_ok;
            const int64_t o = ok ? (int64_t)b_src[i] * K + kt * BK : 0;
            cp_async16(sB + swz(r, kc), We + o, ok ? 16 : 0);
        }
    };
    auto load_a = [&](int stage, int kt) {
        const uint32_t sA = sbase + stage * C::STAGE;
        const bool k_ok = kt * BK + kc * 8 < K;
#pragma unroll
        for (int i = 0; i < C::A_ITERS; i++) {
            const int r = (tid >> 3) + i * (C::NT / 8);
            const bool ok = a_src[i] >= 0 && k_ok;
            const int64_t o = ok ? (int64_t)a_src[i] * K + kt * BK + kc * 8 : 0;
            cp_async16(sA + swz(r, kc), p.A + o, ok ? 16 : 0);
            if constexpr (SPLIT) cp_async16(sA + C::A_BYTES + swz(r, kc), p.Alo + o, ok ? 16 : 0);
        }
    };

    // ---- before the wait: the guessed first unit's weights (every expert one row tile:
    // unit blockIdx.x is expert blockIdx.x / CT). Weights are never written by a kernel.
    const int g_e = blockIdx.x / CT, g_c = blockIdx.x % CT;
    const int npre = p.pre && g_e < X ? min(STAGES - 1, KT) : 0;
    if (!p.pre) pdl_wait();
    if (npre) {
        set_b(g_e, g_c);
        for (int s = 0; s < npre; s++) load_b(s, s);
    }
    cp_async_commit();
    pdl_launch_dependents();
    if (p.pre) pdl_wait();

    // ---- routing: offsets and the slot -> token order, in shared memory.
    for (int i = tid; i < X; i += C::NT) base_s[i] = 0;
    for (int m = tid; m < T; m += C::NT) ids_s[m] = p.ids[m];
    __syncthreads();
    for (int m = tid; m < T; m += C::NT) {
        const int id = ids_s[m];
        if (id >= 0 && id < X) atomicAdd(&base_s[id], 1);
    }
    __syncthreads();
    if (tid == 0) {
        int run = 0;
        for (int e = 0; e < X; e++) {
            const int c = base_s[e];
            off_s[e] = run;
            base_s[e] = run;
            run += c;
        }
        off_s[X] = run;
    }
    __syncthreads();
    if (wn == 0) {
        for (int m0 = 0; m0 < T; m0 += 32) {
            const int m = m0 + lane;
            const int id = m < T ? ids_s[m] : -1;
            const bool ok = id >= 0 && id < X;
            const unsigned peers = __match_any_sync(0xffffffffu, ok ? id : -1 - lane);
            const int rank = __popc(peers & ((1u << lane) - 1u));
            const int base = ok ? base_s[id] : 0;
            __syncwarp();
            if (ok) {
                perm_s[base + rank] = m;
                if (lane == 31 - __clz(peers)) base_s[id] = base + __popc(peers);
            }
            __syncwarp();
        }
    }
    __syncthreads();

    // Units: u -> (row tile index tix = u / CT over the used experts' row tiles, column tile
    // c = u % CT). This CTA's units are blockIdx.x + i * gridDim.x.
    int tiles = 0;
    for (int e = 0; e < X; e++) tiles += (off_s[e + 1] - off_s[e] + BM - 1) / BM;
    const int U = tiles * CT;
    const int nunits = (int)blockIdx.x < U ? (U - 1 - (int)blockIdx.x) / (int)gridDim.x + 1 : 0;
    struct Unit { int e, c, row0, rows; };
    auto unit = [&](int i) -> Unit {
        const int u = (int)blockIdx.x + i * (int)gridDim.x;
        int tix = u / CT;
        const int c = u - tix * CT;
        int e = 0;
        for (; e < X - 1; e++) {
            const int nt = (off_s[e + 1] - off_s[e] + BM - 1) / BM;
            if (tix < nt) break;
            tix -= nt;
        }
        const int row0 = off_s[e] + tix * BM;
        return Unit{e, c, row0, min(BM, off_s[e + 1] - row0)};
    };
    int ld_i = -1;  // the unit whose rows the loader state holds
    auto set_unit = [&](int i) {
        const Unit q = unit(i);
#pragma unroll
        for (int k = 0; k < C::A_ITERS; k++) {
            const int r = (tid >> 3) + k * (C::NT / 8);
            a_src[k] = r >= q.rows ? -1 : MODE == MODE_FC1 ? perm_s[q.row0 + r] : q.row0 + r;
        }
        set_b(q.e, q.c);
        ld_i = i;
    };
    const int total = nunits * KT;  // this CTA's k-tiles, units one after the other
    auto load = [&](int j, bool a_only) {
        const int i = j / KT, kt = j - i * KT;
        if (i != ld_i) set_unit(i);
        load_a(j % STAGES, kt);
        if (!a_only) load_b(j % STAGES, kt);
    };
    if (nunits == 0) {
        cp_async_wait<0>();
        return;
    }
    const Unit u0 = unit(0);
    const bool guessed = npre > 0 && u0.e == g_e && u0.c == g_c && u0.row0 == off_s[g_e];
    if (!guessed) cp_async_wait<0>();  // the guessed stages land before they are reloaded
    for (int s = 0; s < STAGES - 1; s++)
        if (s < total) load(s, guessed && s < npre);
    cp_async_commit();
    cp_async_wait<0>();

    float acc[C::MI][C::NI][4];
#pragma unroll
    for (int mi = 0; mi < C::MI; mi++)
#pragma unroll
        for (int ni = 0; ni < C::NI; ni++)
#pragma unroll
            for (int j = 0; j < 4; j++) acc[mi][ni][j] = 0.f;

    const int a_row = lane & 15;
    const int a_chk = lane >> 4;
    const int b_row = (lane & 7) + ((lane >> 4) << 3);
    const int b_chk = (lane >> 3) & 1;
    auto b_base = [&](int j) -> int {  // j: pair of n8 tiles (0 .. NI/2-1)
        if (MODE == MODE_FC1) {
            constexpr int JH = C::NI / 4;
            const int half = j / JH;
            return half * (NB / 2) + wn * (C::WTN / 2) + (j % JH) * 16;
        }
        return wn * C::WTN + j * 16;
    };

    Unit cu = u0;
    int ci = 0, ckt = 0;
    for (int j = 0; j < total; j++) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // stage j landed for all; stage j-1 is free for the next load
        if (j + STAGES - 1 < total) load(j + STAGES - 1, false);
        cp_async_commit();
        const uint32_t sA = sbase + (j % STAGES) * C::STAGE;
        const uint32_t sL = sA + C::A_BYTES;
        const uint32_t sB = sA + C::A_BYTES * (SPLIT ? 2 : 1);
#pragma unroll
        for (int ks = 0; ks < BK / 16; ks++) {
            uint32_t a[C::MI][4], al[SPLIT ? C::MI : 1][4], b[C::NI][2];
#pragma unroll
            for (int mi = 0; mi < C::MI; mi++) {
                const uint32_t off = swz(a_row + mi * 16, ks * 2 + a_chk);
                ldmatrix_x4(a[mi], sA + off);
                if constexpr (SPLIT) ldmatrix_x4(al[mi], sL + off);
            }
#pragma unroll
            for (int jj = 0; jj < C::NI / 2; jj++) {
                uint32_t r[4];
                ldmatrix_x4(r, sB + swz(b_base(jj) + b_row, ks * 2 + b_chk));
                b[2 * jj][0] = r[0];
                b[2 * jj][1] = r[1];
                b[2 * jj + 1][0] = r[2];
                b[2 * jj + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < C::MI; mi++)
#pragma unroll
                for (int ni = 0; ni < C::NI; ni++) {
                    mma_bf16(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
                    if constexpr (SPLIT) mma_bf16(acc[mi][ni], al[mi], b[ni][0], b[ni][1]);
                }
        }
        if (++ckt < KT) continue;
        // ---- the unit's last k-tile: epilogue from the accumulators (element q of
        // acc[mi][ni]: row (lane >> 2) + 8 (q >> 1), column 2 (lane & 3) + (q & 1)).
        const int n0 = cu.c * C::OUT_COLS;
#pragma unroll
        for (int mi = 0; mi < C::MI; mi++) {
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int r = mi * 16 + (lane >> 2) + 8 * h;
                if (r >= cu.rows) continue;
                const int64_t slot = cu.row0 + r;
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
                } else {
                    const int t = perm_s[slot];
                    const float g = p.gates ? __ldg(p.gates + t) : 1.f;
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
#pragma unroll
        for (int mi = 0; mi < C::MI; mi++)
#pragma unroll
            for (int ni = 0; ni < C::NI; ni++)
#pragma unroll
                for (int q = 0; q < 4; q++) acc[mi][ni][q] = 0.f;
        ckt = 0;
        if (++ci < nunits) cu = unit(ci);
    }
    cp_async_wait<0>();
}

// Grid: the expected units (every expert used, one row tile each: U = CT * min(X, T)), one
// per CTA (persist 0), or about one wave of CTAs sized so that the expected units split into
// whole units per CTA (persist 1).
template <int BM, int NB, int WN, int STAGES, int MODE, bool SPLIT>
int dec_launch(const DecArgs &p, bool persist, cudaStream_t stream) {
    using C = DTile<BM, NB, WN, STAGES, MODE, SPLIT>;
    auto kernel = moe_dec_kernel<BM, NB, WN, STAGES, MODE, SPLIT>;
    // The pipeline, then ids and perm (T ints each): sized to T (3 fc1 CTAs on an SM).
    const int smem = C::PIPE + (int)bm_cdiv(p.T * 8, 128) * 128;
    static std::atomic<unsigned> optin{0};
    int st = bm_smem_optin(kernel, C::PIPE + MAX_T * 8, optin);
    if (st) return st;
    // Host calls only (also inside a graph capture: nothing goes on the stream).
    int dev = 0, sms = 0, per_sm = 0;
    BM_CUDA_TRY(cudaGetDevice(&dev));
    BM_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    BM_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, C::NT, smem));
    const int64_t slots = (int64_t)sms * (per_sm < 1 ? 1 : per_sm);
    const int64_t CT = bm_cdiv(p.N, C::OUT_COLS);
    const int64_t expect = CT * (p.X < p.T ? p.X : p.T);
    const int64_t per = persist ? bm_cdiv(expect, slots) : 1;
    const int64_t grid = bm_cdiv(expect, per);
    BM_LAUNCH_PDL(kernel, dim3((unsigned)grid), dim3(C::NT), (size_t)smem, stream, p);
    return 0;
}

struct DecWs {
    uint16_t *ab, *al;
    size_t bytes;
};
DecWs dec_ws(char *base, int64_t T, int64_t F, bool split) {
    DecWs w{};
    size_t off = 0;
    auto take = [&](size_t bytes) -> char * {
        char *q = base ? base + off : nullptr;
        off += (bytes + 255) & ~(size_t)255;
        return q;
    };
    w.ab = (uint16_t *)take(T * F * 2);
    w.al = split ? (uint16_t *)take(T * F * 2) : nullptr;
    w.bytes = off;
    return w;
}

std::atomic<long long> g_calls{0};

// BLACKMAMBA_MOE_STREAM_VAR (dev, A/B): 1 persistent 32-row units 6/8 stages, 2 the same one
// unit a CTA, 3 one unit a CTA 4/6 stages, 4 = 3 without the early weights, 5 16-row units
// 5/8 stages one unit a CTA, 6 = 5 persistent.
constexpr int DEFAULT_VARIANT = 6;  // the least slow on the H200 (run 2)
int variant() {
    const char *v = getenv("BLACKMAMBA_MOE_STREAM_VAR");
    const int k = v && v[0] ? atoi(v) : DEFAULT_VARIANT;
    return k >= 1 && k <= 6 ? k : DEFAULT_VARIANT;
}

}  // namespace

// Off by default: slower than grouped.cu in every variant measured (cuda/NOTES.md, session 4
// dec64); BLACKMAMBA_MOE_STREAM=1 takes it.
extern "C" int bm_cuda_moe_stream_mode(void) {
    const char *v = getenv("BLACKMAMBA_MOE_STREAM");
    return v && v[0] == '1';
}

extern "C" int bm_cuda_moe_stream_supported(int64_t T, int64_t X) {
    return T >= 1 && T <= MAX_T && X >= 1 && X <= MAX_X;
}

extern "C" size_t bm_cuda_moe_stream_workspace(int64_t T, int64_t F, int split) {
    return dec_ws(nullptr, T, F, split != 0).bytes;
}

extern "C" long long bm_cuda_moe_stream_calls(void) { return g_calls.load(); }

extern "C" int bm_cuda_moe_stream_bf16(const uint16_t *xb, const uint16_t *xl,
                                       const int32_t *ids, const float *gates, const void *fc1,
                                       const void *fc2, bm_act act, int split, float *out,
                                       int64_t T, int64_t d, int64_t X, int64_t F,
                                       void *workspace, size_t workspace_bytes,
                                       cudaStream_t stream) {
    if (T <= 0 || d <= 0) return 0;
    if (!bm_cuda_moe_stream_supported(T, X) || d % 8 || F % 8 || d > INT32_MAX / 2 ||
        F > INT32_MAX / 2 || !xb || (split && !xl) ||
        (((uintptr_t)xb | (uintptr_t)xl | (uintptr_t)fc1 | (uintptr_t)fc2) & 15) ||
        ((uintptr_t)out & 7))
        return BM_CUDA_ARG_FAIL("moe_stream: needs T <= 1024, X <= 256, d % 8 == 0, "
                                "F % 8 == 0, bf16 x given, 16-byte aligned x, fc1, fc2");
    const DecWs ws = dec_ws((char *)workspace, T, F, split != 0);
    if (!workspace || workspace_bytes < ws.bytes)
        return BM_CUDA_ARG_FAIL("moe_stream: workspace too small (bm_cuda_moe_stream_workspace)");
    g_calls.fetch_add(1, std::memory_order_relaxed);
    const int v = variant();
    const bool persist = v == 1 || v == 6, pre = v != 4;
    const DecArgs p1{xb, xl, (const uint16_t *)fc1, ids, nullptr, ws.ab, ws.al, nullptr,
                     (int)T, (int)d, (int)F, (int)X, (int)act, (int)pre};
    const DecArgs p2{ws.ab, ws.al, (const uint16_t *)fc2, ids, gates, nullptr, nullptr, out,
                     (int)T, (int)F, (int)d, (int)X, (int)act, (int)pre};
    // fc1: 64 weight rows (32 output columns) a unit, 2 warps; fc2: 32 weight rows, 1 warp.
#define BM_STREAM(BM, S1, S2)                                                              \
    do {                                                                                   \
        int st = split ? dec_launch<BM, 64, 2, S1, MODE_FC1, true>(p1, persist, stream)    \
                       : dec_launch<BM, 64, 2, S1, MODE_FC1, false>(p1, persist, stream);  \
        if (st) return st;                                                                 \
        return split ? dec_launch<BM, 32, 1, S2, MODE_FC2, true>(p2, persist, stream)      \
                     : dec_launch<BM, 32, 1, S2, MODE_FC2, false>(p2, persist, stream);    \
    } while (0)
    switch (v) {
        case 1: case 2: BM_STREAM(32, 6, 8);  // 72 / 64 KB: 3 CTAs per SM
        case 3: case 4: BM_STREAM(32, 4, 6);  // 48 / 48 KB: 4 per SM (grouped.cu's occupancy)
        default: BM_STREAM(16, 5, 8);         // 16-row units: 50 / 48 KB, 4 per SM
    }
#undef BM_STREAM
}
