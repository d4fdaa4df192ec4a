// scan.cu: Mamba-1 selective scan (SPEC 2) on the GPU: the prefill scan and the one-token step.
//
//   h_t[e,n] = exp(delta[t,e] * A[e,n]) * h_{t-1}[e,n] + delta[t,e] * B[t,n] * u[t,e]
//   y[t,e]   = (sum_n h_t[e,n] * C[t,n] + D[e] * u[t,e]) * silu(z[t,e])
//
// Prefill layout: token-major (b, L, E), so at each t the channels of a batch row are
// contiguous: a block of CPB channels reads CPB*4 coalesced bytes per tensor and step.
// Each channel's N float32 states live in registers of TPC threads (NT = N/TPC each) for the
// whole sequence. The sequence is walked in chunks of TC steps through a 3-stage cp.async
// pipeline in shared memory (u, delta, z and B, C of two chunks in flight while one is
// computed), so registers hold only the states and the per-step temporaries.
// Cost per (t, e, n): one MUFU.EX2 and three FMAs; per (t, e): 16 bytes of u/delta/z/y.
//
// One-pass variants (VAR, the kernel's template argument; the launcher picks 3 at TPC >= 2):
//   1: each step reads u, delta, z from the stage and does the per-(t, e) work (delta * u, the
//      D skip, the gate) in every one of its TPC threads; y stored per step; two barriers a chunk.
//   2: the packed variant. A prep pass per chunk computes softplus(delta + bias), delta * u,
//      g = silu(z) and D u g once per (t, e) into one float4 (sm.pk), so a step reads one float4
//      and does 40 state instructions plus 9 (49, against 56 in VAR 1); y stays in registers
//      for a full chunk (no shared store between the steps' loads, so the scheduler overlaps
//      steps) and goes over u's slot of the stage; each warp preps, computes and writes out
//      only its own channels, so one __syncthreads per chunk (the copy issue moves after it).
//      32 KB of shared memory at TPC = 2, so 6 blocks per SM, and so up to 168 registers.
//   3: 2 with one MUFU reciprocal for softplus's and silu's divisions (softplus_silu).
//   4: 3 with one state exp in 16 on the FMA pipe (ex2_poly), for N = 16 at TPC = 2.
// At b = 8, L = 2048, E = 2944, N = 16 on the H200: VAR 1 0.419 ms, VAR 3 0.381 (cuda/NOTES.md,
// "Session 4, scan4"). The sequence-parallel passes below use VAR 1's code.
//
// Sequence parallelism for small grids (b = 1: 92 blocks of 32 channels on 132 SMs, where each
// of the 2048 steps costs its serial latency, ~100 ns): L is cut into S segments of seg_len
// steps and the scan runs in two launches (MODE 1, MODE 2 below). The recurrence is linear in
// h, so a segment's end state is P_s * h_in + H_s, with H_s the end state from a zero start and
// P_s[e, n] = prod_t exp(delta_t A[e, n]) = exp(A[e, n] * sum_t delta_t): one float per (s, e)
// carries the whole decay product.
//   pass 1 (MODE 1, segments 0..S-2), "light": no z, no C, no y; segment 0 runs from
//     state_in (so its end state is the true one), segments >= 1 from zero; each keeps H_s in
//     hseg and sum_t delta_t in dsum.
//   pass 2 (MODE 2, segments 0..S-1): each block folds h_in = P_j h_in + H_j over 0 < j < s
//     (starting from segment 0's true end state; segment 0 itself starts from state_in), then
//     reruns its segment from that true initial state, writing y; the last segment writes
//     state_out.
// Both passes' critical paths are one segment: a light one, then a full one (segment 0 used to
// run full in pass 1, so the first pass cost a full segment too).
// Rerunning costs a second pass of exps over (S-1)/S of the steps (light: B only), against
// correcting y afterwards (y_t += silu(z_t) sum_n C_t[n] exp(A cumsum(delta)) h_in[n]), which
// needs the same number of exps plus a read and a rewrite of y; and the rerun's y is the
// sequential y computed from a state that differs only by the rounding of P_s (float32 sum of
// up to a few hundred positive deltas, ~1e-6 relative; |d/dx (x e^-x)| <= 0.37 bounds its
// effect on h to ~4e-7 |h_in|), inside TOL_SCAN (3e-5) by far.
#include "common.cuh"

#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace {

constexpr int SCAN_THREADS = 64;  // 2 warps: small blocks spread the few warps over all SMs
constexpr int SCAN_TC = 16;       // steps per chunk
constexpr int SCAN_STAGES = 3;    // chunks in shared memory: 2 loading while 1 is computed

// u, delta and z are float32, or the bits of bf16 / fp16 values where the kernel's ADT says so
// (ACT_BF16, ACT_F16: the pointers are then reinterpreted as uint16_t; y then goes to ybf / yh).
struct ScanParams {
    const float *u;           // (b, L, E)
    const float *delta;       // (b, L, E)
    const float *A;           // (E, N)
    const float *Bm;          // (b, L, N)
    const float *Cm;          // (b, L, N)
    const float *D;           // (E) or NULL
    const float *z;           // (b, L, E) or NULL
    const float *delta_bias;  // (E) or NULL
    const float *state_in;    // (b, E, N) or NULL
    float *state_out;         // (b, E, N) or NULL; may equal state_in
    float *y;                 // (b, L, E) or NULL (then ybf)
    uint16_t *ybf;            // (b, L, E) or NULL: y rounded to bf16 (a bf16 GEMM's input)
    uint16_t *ylo;            // (b, L, E) or NULL: bf16(y - bf16(y)) (split products)
    uint16_t *yh;             // (b, L, E) or NULL: y rounded to IEEE half (ACT_F16 kernels)
    int L, E, N;
    int softplus;
    int vec;                  // E % 4 == 0 and u, delta, z, y 16-byte aligned: 16-byte copies
    int bcvec;                // N % 4 == 0 and Bm, Cm 16-byte aligned: 16-byte B/C copies
    // Sequence-parallel passes (MODE 1, 2; see the top): segment s covers steps
    // [s * seg_len, min(L, (s + 1) * seg_len)); nseg segments.
    int seg_len, nseg;
    float *hseg;              // (nseg, b, E, N) segment end states (segment 0: the true one);
                              // slot nseg - 1: segment 0's initial state (pass 1 -> pass 2)
    float *dsum;              // (nseg, b, E) sum of the softplus'd delta over each segment
};

// Activation dtypes of u, delta, z and y (the kernel's ADT): the state, A, B, C, D and the
// bias stay float32 in every case (B and C are N / E of the bytes: 0.5% at N = 16, E = 2944).
constexpr int ACT_F32 = 0, ACT_BF16 = 1, ACT_F16 = 2;

template <int ADT>
__device__ __forceinline__ float act_to_f32(uint16_t v) {
    if constexpr (ADT == ACT_BF16) return __uint_as_float((uint32_t)v << 16);
    else return __half2float(__ushort_as_half(v));
}

// cp.async: global -> shared without passing through registers. src_bytes = 0 zero-fills
// (past L, past E, states past N) and reads nothing.
__device__ __forceinline__ void cp_async4(float *dst, const float *src, bool pred) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(pred ? 4 : 0));
}
// 8 bytes (four 16-bit activations), to a shared-window address.
__device__ __forceinline__ void cp_async8s(unsigned d, const void *src, bool pred) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(d), "l"(src), "r"(pred ? 8 : 0));
}
// 16 bytes, to a shared-window address (formed once per thread, not per copy).
__device__ __forceinline__ void cp_async16s(unsigned d, const float *src, bool pred) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <int NT, int TPC>
struct ScanSmem {
    static constexpr int NP = NT * TPC;                // padded states per channel
    static constexpr int CPB = SCAN_THREADS / TPC;     // channels per block
    float act[SCAN_STAGES][3][SCAN_TC][CPB];           // u, delta (softplus'd in place), z (silu'd)
    float bc[SCAN_STAGES][SCAN_TC][2 * NP];            // per step: B row, then C row (zeros past N)
    float y[SCAN_TC][CPB];                             // a chunk's outputs, stored 16 B at a time
};

// VAR 2, 3 (one-pass only): the per-(t, e) values of a step packed once per chunk, so a step
// reads one float4 and does no per-(t, e) arithmetic but its y epilogue; a chunk's y goes over
// u's slot of the stage (u is in pk by then), so there is no y array: 32 KB at TPC = 2.
// With 16-bit activations (ADT != 0) a stage's act holds u, delta, z as uint16_t [3][TC][CPB]
// in its first 1.5 slots (act16 below), and the chunk's y goes over z's float slot (act[s][2]),
// which no 16-bit data reaches: u's slot would not do, since a warp's float y of its own
// channels would land on 16-bit u values of the other warp's channels before their prep.
template <int NT, int TPC>
struct ScanSmemP {
    static constexpr int NP = NT * TPC;
    static constexpr int CPB = SCAN_THREADS / TPC;
    float act[SCAN_STAGES][3][SCAN_TC][CPB];           // u (then y), delta, z; 16-bit: act16, y in z's slot
    float bc[SCAN_STAGES][SCAN_TC][2 * NP];            // as ScanSmem
    float4 pk[SCAN_TC][CPB];                           // delta, delta * u, g = silu(z), D * u * g
};

__device__ __forceinline__ float rcp_approx(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// 2^x on the FMA pipe (VAR 4: part of the state exps, where the MUFU pipe is the bound):
// 2^j p(f), j = rint(x) by the 1.5 * 2^23 rounding trick (j lands in the low mantissa bits of
// r, so r's bits << 23 are j's exponent increment), f = x - j in [-0.5, 0.5], p a degree-5
// fit of 2^f for the relative error (1.9e-7 at most in a float32 NumPy model, about
// ex2.approx's 2 ulp). x is clamped to [-125, 127] so that j + p's exponent stays a normal
// exponent: for x < -125 it returns about 2^-125 where ex2.approx gives 0 or a denormal
// flushed to 0 (a state decayed to 1e-38 either way); past 127 both overflow a state anyway.
// 12 instructions (FMNMX 2, FADD 3, FFMA 5, SHL, IADD) against one MUFU.EX2.
__device__ __forceinline__ float ex2_poly(float x) {
    x = fminf(fmaxf(x, -125.f), 127.f);
    const float r = __fadd_rn(x, 12582912.f);
    const float f = __fsub_rn(x, __fsub_rn(r, 12582912.f));
    float p = fmaf(0.001326472731307149f, f, 0.009671512991189957f);
    p = fmaf(p, f, 0.05550733581185341f);
    p = fmaf(p, f, 0.24022242426872253f);
    p = fmaf(p, f, 0.6931470036506653f);
    p = fmaf(p, f, 1.f);
    return __int_as_float(__float_as_int(p) + (__float_as_int(r) << 23));
}

// bm_store_bf16 (float4) with the conversions in hardware (cvt.rn.bf16x2.f32, two values an
// instruction): round to nearest even like bm_f32_to_bf16_bits, so every non-NaN value gets the
// same bits (a NaN y comes out as the canonical 0x7fff rather than with its payload); lo =
// bf16(f - hi), 0 where hi is not finite, as bm_f32_to_bf16_split. About 10 instructions per
// four values against ~40 (the bf16 write-out cost VAR 3 7% at b=8 in run 1).
__device__ __forceinline__ uint32_t bf16x2_rn(float first, float second) {
    uint32_t r;  // first in the low half (the lower address), second in the high half
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(second), "f"(first));
    return r;
}
__device__ __forceinline__ void store_bf16_hw(float4 v, uint16_t *hb, uint16_t *lb, int64_t i4) {
    const uint32_t h01 = bf16x2_rn(v.x, v.y), h23 = bf16x2_rn(v.z, v.w);
    reinterpret_cast<uint2 *>(hb)[i4] = make_uint2(h01, h23);
    if (lb) {
        auto rest = [](float f, uint32_t hbits) {  // f - hi, exact (Sterbenz), or 0
            const float h = __uint_as_float(hbits);
            return fabsf(h) < INFINITY ? f - h : 0.f;
        };
        reinterpret_cast<uint2 *>(lb)[i4] =
            make_uint2(bf16x2_rn(rest(v.x, h01 << 16), rest(v.y, h01 & 0xffff0000u)),
                       bf16x2_rn(rest(v.z, h23 << 16), rest(v.w, h23 & 0xffff0000u)));
    }
}

// Four floats to IEEE half, round to nearest even (cvt.rn.f16x2.f32: overflow gives inf, as
// __float2half_rn), 8 bytes at element 4 * i4.
__device__ __forceinline__ void store_f16_hw(float4 v, uint16_t *h, int64_t i4) {
    uint32_t a, b;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(a) : "f"(v.y), "f"(v.x));
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(b) : "f"(v.w), "f"(v.z));
    reinterpret_cast<uint2 *>(h)[i4] = make_uint2(a, b);
}

// softplus(v) (bm_softplus's formula) and silu(z) with one MUFU reciprocal between them (VAR
// 3): s = w / (2 + w) and z / (1 + e), e = exp(-z), are w (1 + e) r and z (2 + w) r with r =
// 1 / ((2 + w)(1 + e)): three MUFU operations for the pair instead of four, the prefill scan's
// only MUFU work besides its one ex2 per state. e is capped at 2^100 so that the product stays
// finite and r normal (silu(z) for z < -69 then reads z 2^-100 instead of about z e^z: both
// below 1e-28 |z|). Three more roundings than the two divisions: ~2e-7 relative.
__device__ __forceinline__ void softplus_silu(float v, float z, float &sp, float &g) {
    const float w = bm_ex2(-fabsf(v) * 1.4426950408889634f);
    const float ez = bm_ex2(fminf(-z * 1.4426950408889634f, 100.f));
    const float a = 2.f + w, bz = 1.f + ez;
    const float r = rcp_approx(a * bz);
    const float s = (w * bz) * r;
    g = (z * a) * r;
    // bm_softplus's "v > 20 ? v" is left out: there s q < 5e-9 is below half an ulp of v, so
    // the sum is v already (and v = inf gives s = 0, inf).
    sp = bm_softplus_series(s, v);
}

// VAR 0, 1: at most 128 registers (8 blocks, 16 warps per SM): TPC = 4 at b=8, E=2944 needs
// ~22 warps per SM to run in one wave. VAR 0: the step loop as the compiler unrolls it; VAR 1:
// full chunks fully unrolled (VAR 2..4: see the top). Measured on the H200 at b=8, L=2048, E=2944, N=16 (cuda/NOTES.md):
// with the per-thread copy addressing and the cheaper softplus, VAR 1 wins at every TPC
// (TPC = 2: 0.4045 vs 0.4225 ms; before them VAR 0 won at TPC = 2, 0.520 vs 0.563).
// MODE 0: the whole sequence (grid.z = 1). MODE 1 / 2: pass 1 / pass 2 of the sequence-
// parallel scan (see the top), grid.z = nseg - 1 / nseg segments.
// The packed variants (VAR >= 2) take 32 KB of shared memory a block at TPC = 2, so at most 6
// blocks fit an SM anyway: their bound of 6 blocks gives up to 168 registers. At 128 (the bound
// of 8) VAR 3 spilled 16 bytes, whose reloads in the copy issue of every chunk cost it its gain
// (ncu, run 1: long-scoreboard stalls 0.02 -> 0.52 cycles per instruction, 0.424 ms; at 168:
// 0.04, 0.383 ms).
// ADT (ACT_*): the activations' dtype; 16-bit activations only in the packed variants.
// One-pass launches of the packed variants (VAR 2..4): tests assert the path was taken.
std::atomic<long long> g_scan_packed{0};

template <int NT, int TPC, int VAR, int MODE, int ADT = ACT_F32>
__global__ __launch_bounds__(SCAN_THREADS, VAR >= 2 ? 6 : 8) void scan_fwd_kernel(const ScanParams p) {
    bm_pdl_wait_only();  // (launched with PDL where bm_conv_scan_pdl; else a no-op)
    constexpr int TC = SCAN_TC;
    static_assert(VAR < 2 || (MODE == 0 && TPC >= 2), "packed variants: one pass, TPC 2 or 4");
    static_assert(ADT == ACT_F32 || VAR >= 2, "16-bit activations: packed variants only");
    using Smem = std::conditional_t<(VAR >= 2), ScanSmemP<NT, TPC>, ScanSmem<NT, TPC>>;
    constexpr int NP = Smem::NP, CPB = Smem::CPB;
    __shared__ __align__(16) Smem sm;

    const int L = p.L, E = p.E, N = p.N;
    // This block's steps [tb, te) and whether it is a light pass-1 segment (uniform per block).
    const int seg = MODE == 0 ? 0 : (int)blockIdx.z;
    const int tb = MODE == 0 ? 0 : seg * p.seg_len;
    const int te = MODE == 0 ? L : min(L, tb + p.seg_len);
    const bool light = MODE == 1;
    const int tid = threadIdx.x;
    const int sub = tid % TPC;        // which NT states of the channel
    const int ch = tid / TPC;         // channel inside the block
    const int bi = blockIdx.y;
    const int e0 = blockIdx.x * CPB;
    // Threads past E compute on channel E-1 and store nothing: every lane takes part in the
    // shuffles and barriers.
    const bool active = e0 + ch < E;
    const int e = active ? e0 + ch : E - 1;
    const bool has_z = p.z != nullptr;
    const bool zcopy = has_z && !light;                // light segments need no gate
    const int64_t rowb = (int64_t)bi * L;              // (bi, 0) in (b, L)
    const float *zsrc = has_z ? p.z : p.u;             // any valid address when there is no z

    float A2[NT], h[NT];  // A * log2(e), so exp(delta*A) = 2^(delta*A2); states
#pragma unroll
    for (int j = 0; j < NT; j++) {
        const int n = sub * NT + j;
        A2[j] = n < N ? p.A[(int64_t)e * N + n] * 1.4426950408889634f : 0.f;
    }
    if (MODE == 2 && seg > 0) {
        // True initial state of segment seg: segment 0's end state, then j2 = 1..seg-1:
        // h = exp(A * dsum_j2) h + H_j2. Written by pass 1 (the previous launch). The segments
        // outside, the states inside: a segment's NT + 1 loads go out together, one load
        // latency a segment (session 24: the states outside, each state's loads one after
        // another, cost NT latencies a segment, ~12 us of pass 2 at 7 segments).
        const int64_t be = (int64_t)bi * E + e, bE = (int64_t)gridDim.y * E;
        const float *hs0 = p.hseg + be * N + sub * NT;
#pragma unroll
        for (int j = 0; j < NT; j++) h[j] = sub * NT + j < N ? hs0[j] : 0.f;
#pragma unroll 2
        for (int j2 = 1; j2 < seg; j2++) {
            const float ds = p.dsum[j2 * bE + be];
            const float *hs = hs0 + j2 * bE * N;
            float hn[NT];
#pragma unroll
            for (int j = 0; j < NT; j++) hn[j] = sub * NT + j < N ? hs[j] : 0.f;
#pragma unroll
            for (int j = 0; j < NT; j++) h[j] = fmaf(bm_ex2(ds * A2[j]), h[j], hn[j]);
        }
    } else {
#pragma unroll
        for (int j = 0; j < NT; j++) {
            const int n = sub * NT + j;
            if (MODE == 2) {
                // Segment 0's initial state, as pass 1 saved it in the (otherwise unused) slot
                // nseg - 1: state_in itself may already hold the last segment's state_out here
                // (in place, written by another block of this launch).
                const int64_t be = ((int64_t)(p.nseg - 1) * gridDim.y + bi) * E + e;
                h[j] = n < N ? p.hseg[be * N + n] : 0.f;
            } else {
                // MODE 0, and segment 0 of pass 1: the given initial state; other pass-1
                // segments start from zero.
                h[j] = (n < N && p.state_in && seg == 0)
                           ? p.state_in[((int64_t)bi * E + e) * N + n] : 0.f;
                if (MODE == 1 && seg == 0 && active && n < N)  // for pass 2's segment 0 (above)
                    p.hseg[(((int64_t)(p.nseg - 1) * gridDim.y + bi) * E + e) * N + n] = h[j];
            }
        }
    }
    float dsum = 0.f;  // light segments: sum of the softplus'd delta
    const float Dv = p.D ? p.D[e] : 0.f;
    const float dbias = p.delta_bias ? p.delta_bias[e] : 0.f;

    // Copy addressing, formed once per thread (the copies of a chunk then cost a pointer add
    // and a compare each, not the index divisions and 64-bit products of every copy).
    // 16-byte path (p.vec): item i of tensor w (u, delta, z) is the float4 q of step
    // tr + i * ARPI, the same q and steps in every chunk.
    constexpr int Q = CPB / 4;                         // float4s per (tensor, step)
    constexpr int ARPI = SCAN_THREADS / Q;             // steps apart of a thread's items
    constexpr int AITEMS = TC / ARPI;                  // items per tensor and chunk
    static_assert(SCAN_THREADS % Q == 0 && TC % ARPI == 0, "act copy layout");
    const int aq = tid % Q, atr = tid / Q;
    const bool aok = e0 + 4 * aq < E;
    const int64_t aoff0 = (rowb + atr) * E + e0 + 4 * aq;        // + t0 * E per chunk
    const int64_t astep = (int64_t)ARPI * E;
    const unsigned asm0 = (unsigned)__cvta_generic_to_shared(&sm.act[0][0][atr][4 * aq]);
    constexpr unsigned ASTAGE = sizeof(sm.act[0]), ATENS = sizeof(sm.act[0][0]),
                       AROW = ARPI * CPB * 4;
    // 16-bit activations (ADT != 0): the same items, 8 bytes each, into act16's layout.
    constexpr unsigned ATENS16 = TC * CPB * 2, AROW16 = ARPI * CPB * 2;
    const unsigned asm16 = (unsigned)__cvta_generic_to_shared(&sm.act[0][0][0][0]) +
                           (unsigned)((atr * CPB + 4 * aq) * 2);
    // B/C, 16-byte path (p.bcvec): per step 2 * NP / 4 float4s (B's, then C's); item i is
    // float4 r of step tr + i * BRPI.
    constexpr int BQ = 2 * NP / 4;
    constexpr int BRPI = BQ >= SCAN_THREADS ? 1 : SCAN_THREADS / BQ;
    constexpr int BITEMS4 = (TC * BQ + SCAN_THREADS - 1) / SCAN_THREADS;
    const int br = tid % BQ, btr = tid / BQ;
    const int bcol = 4 * (br % (NP / 4 > 0 ? NP / 4 : 1));
    // A thread copies only into slots of the stage: a predicated-off cp.async still writes
    // its 16 zero bytes, and at NP = 4 (B and C one float4 each per step: TC * BQ = 32 slots
    // for 64 threads) the spare threads' slots lay past the stage, in the next stage's B/C or
    // in sm.y, racing with the chunk being computed (wrong y past step 16 for N <= 4 and L >
    // 32: found by test_selective_scan_bf16_outputs[1-50-33-4-1]; every other NP fills all
    // slots).
    const bool bslot = tid < TC * BQ;
    const bool bok = bslot && bcol < N;                // N % 4 == 0: whole float4s
    const float *bsrc0 = (br < NP / 4 ? p.Bm : p.Cm) + (rowb + btr) * N + bcol;
    const int64_t bstep = (int64_t)BRPI * N;
    const unsigned bsm0 = (unsigned)__cvta_generic_to_shared(&sm.bc[0][0][0]) +
                          (unsigned)((btr * 2 * NP + 4 * br) * 4);
    constexpr unsigned BSTAGE = sizeof(sm.bc[0]), BROW = BRPI * 2 * NP * 4;
    static_assert(BQ >= SCAN_THREADS || SCAN_THREADS % BQ == 0, "B/C copy layout");

    // Start copying chunk c (steps c*TC ..) into stage s. Always commits a group, possibly
    // empty, so that wait_group counts stay in step.
    auto issue = [&](int c, int s) {
        const int t0 = tb + c * TC;
        if (t0 < te) {
            if constexpr (ADT != ACT_F32) {
                const uint16_t *u16 = reinterpret_cast<const uint16_t *>(p.u);
                const uint16_t *d16 = reinterpret_cast<const uint16_t *>(p.delta);
                const uint16_t *z16 = reinterpret_cast<const uint16_t *>(zsrc);
                if (p.vec) {  // E % 4 == 0, 8-byte aligned tensors
                    const int64_t off = aoff0 + (int64_t)t0 * E;
                    const unsigned d0 = asm16 + s * ASTAGE;
#pragma unroll
                    for (int i = 0; i < AITEMS; i++) {
                        const bool ok = aok && t0 + atr + i * ARPI < te;
                        const int64_t o = off + i * astep;
                        cp_async8s(d0 + i * AROW16, ok ? u16 + o : u16, ok);
                        cp_async8s(d0 + ATENS16 + i * AROW16, ok ? d16 + o : u16, ok);
                        cp_async8s(d0 + 2 * ATENS16 + i * AROW16, ok && zcopy ? z16 + o : u16,
                                   ok && zcopy);
                    }
                } else {
                    // cp.async has no 2-byte copy: plain loads and shared stores (this stage is
                    // read after the barrier of chunk c's iteration, which publishes them).
                    uint16_t *a16 = reinterpret_cast<uint16_t *>(&sm.act[s][0][0][0]);
                    constexpr int ITEMS = 3 * TC * CPB;
#pragma unroll 4
                    for (int k = tid; k < ITEMS; k += SCAN_THREADS) {
                        const int which = k / (TC * CPB), t = (k / CPB) % TC, c2 = k % CPB;
                        const uint16_t *src = which == 0 ? u16 : which == 1 ? d16 : z16;
                        const bool ok = t0 + t < te && e0 + c2 < E && (which < 2 || zcopy);
                        a16[k] = ok ? src[(rowb + t0 + t) * E + e0 + c2] : (uint16_t)0;
                    }
                }
            } else if (p.vec) {
                const int64_t off = aoff0 + (int64_t)t0 * E;
                const unsigned d0 = asm0 + s * ASTAGE;
#pragma unroll
                for (int i = 0; i < AITEMS; i++) {
                    const bool ok = aok && t0 + atr + i * ARPI < te;
                    const int64_t o = off + i * astep;
                    cp_async16s(d0 + i * AROW, ok ? p.u + o : p.u, ok);
                    cp_async16s(d0 + ATENS + i * AROW, ok ? p.delta + o : p.u, ok);
                    cp_async16s(d0 + 2 * ATENS + i * AROW, ok && zcopy ? zsrc + o : p.u,
                                ok && zcopy);
                }
            } else {
                constexpr int ITEMS = 3 * TC * CPB;
#pragma unroll 4
                for (int k = tid; k < ITEMS; k += SCAN_THREADS) {
                    const int which = k / (TC * CPB), t = (k / CPB) % TC, c2 = k % CPB;
                    const float *src = which == 0 ? p.u : which == 1 ? p.delta : zsrc;
                    const bool ok = t0 + t < te && e0 + c2 < E && (which < 2 || zcopy);
                    cp_async4(&sm.act[s][which][t][c2], ok ? src + (rowb + t0 + t) * E + e0 + c2 : p.u, ok);
                }
            }
            if (p.bcvec) {
                const float *src = bsrc0 + (int64_t)t0 * N;
                const unsigned d0 = bsm0 + s * BSTAGE;
#pragma unroll
                for (int i = 0; i < BITEMS4; i++) {
                    if (!bslot || btr + i * BRPI >= TC) continue;  // no such slot
                    const bool ok = bok && t0 + btr + i * BRPI < te;
                    cp_async16s(d0 + i * BROW, ok ? src + i * bstep : p.Bm, ok);
                }
            } else {
                constexpr int BITEMS = TC * 2 * NP;
#pragma unroll
                for (int k = tid; k < BITEMS; k += SCAN_THREADS) {
                    const int t = k / (2 * NP), r = k % (2 * NP), n = r % NP;
                    const bool ok = t0 + t < te && n < N;
                    const float *src = (r < NP ? p.Bm : p.Cm) + (rowb + t0 + t) * N + n;
                    cp_async4(&sm.bc[s][t][r], ok ? src : p.Bm, ok);
                }
            }
        }
        cp_async_commit();
    };

    const bool store = sub == 0;   // one thread of the channel writes y to shared memory
    const int nchunks = (te - tb + TC - 1) / TC;
#pragma unroll
    for (int s = 0; s < SCAN_STAGES - 1; s++) issue(s, s);

    if constexpr (VAR >= 2) {
        // One barrier per chunk: a warp preps, computes and writes out only its own channels
        // (so __syncwarp orders those), and chunk c+2 is issued after the barrier into chunk
        // c-1's stage, which every thread has finished with (its y included) by then.
        constexpr int WCH = 32 / TPC;  // channels of a warp
        static_assert(WCH % 4 == 0, "a warp's channels are whole float4s");
        const int warp = tid / 32, lane = tid % 32;
        constexpr int WQ = WCH / 4, WROWS = 32 / WQ;  // float4s per step; steps per warp pass
        const int wt = lane / WQ, wc = warp * WCH + 4 * (lane % WQ);
        const bool wok = e0 + wc < E;
        for (int c = 0; c < nchunks; c++) {
            const int s = c % SCAN_STAGES;
            cp_async_wait<SCAN_STAGES - 2>();  // this thread's copies of chunk c have landed
            __syncthreads();                    // everyone's have; chunk c-1 is done everywhere
            issue(c + SCAN_STAGES - 1, (c + SCAN_STAGES - 1) % SCAN_STAGES);

            // Per (t, e), once: delta = softplus(delta + bias), g = silu(z), delta * u and
            // D * u * g into pk; the TPC threads of a channel each take 1/TPC of the steps.
            float(*act)[TC][CPB] = sm.act[s];
            // All loads first: a store into pk between them would keep the scheduler from
            // overlapping the TC/TPC independent softplus chains (it cannot tell pk from act).
            auto prep = [&](auto SP, auto ZZ) {
                constexpr bool sp = decltype(SP)::value, zz = decltype(ZZ)::value;
                constexpr int K = TC / TPC;
                float uv[K], v[K], zv[K];
#pragma unroll
                for (int k = 0; k < K; k++) {
                    const int t = k * TPC + sub;
                    if constexpr (ADT != ACT_F32) {
                        const uint16_t *a16 = reinterpret_cast<const uint16_t *>(&act[0][0][0]);
                        uv[k] = act_to_f32<ADT>(a16[t * CPB + ch]);
                        v[k] = act_to_f32<ADT>(a16[(TC + t) * CPB + ch]) + dbias;
                        zv[k] = zz ? act_to_f32<ADT>(a16[(2 * TC + t) * CPB + ch]) : 0.f;
                    } else {
                        uv[k] = act[0][t][ch];
                        v[k] = act[1][t][ch] + dbias;
                        zv[k] = zz ? act[2][t][ch] : 0.f;
                    }
                }
#pragma unroll
                for (int k = 0; k < K; k++) {
                    float dt = v[k], g = 1.f;
                    if constexpr (sp && zz && VAR >= 3) {
                        softplus_silu(v[k], zv[k], dt, g);
                    } else {
                        if constexpr (sp) dt = bm_softplus(v[k]);
                        if constexpr (zz) g = bm_silu(zv[k]);
                    }
                    sm.pk[k * TPC + sub][ch] = make_float4(dt, dt * uv[k], g, Dv * (uv[k] * g));
                }
            };
            if (p.softplus) {
                if (zcopy) prep(std::true_type{}, std::true_type{});
                else prep(std::true_type{}, std::false_type{});
            } else {
                if (zcopy) prep(std::false_type{}, std::true_type{});
                else prep(std::false_type{}, std::false_type{});
            }
            __syncwarp();

            const int steps = min(TC, te - tb - c * TC);
            const float *bc = &sm.bc[s][0][0];
            auto step = [&](int i) {
                const float4 q = sm.pk[i][ch];
                const float4 *b4 = reinterpret_cast<const float4 *>(bc + i * 2 * NP + sub * NT);
                const float4 *c4 = reinterpret_cast<const float4 *>(bc + i * 2 * NP + NP + sub * NT);
                float acc[2] = {0.f, 0.f};
#pragma unroll
                for (int qi = 0; qi < NT / 4; qi++) {
                    const float4 bq = b4[qi], cq = c4[qi];
                    const float bv[4] = {bq.x, bq.y, bq.z, bq.w};
                    const float cv[4] = {cq.x, cq.y, cq.z, cq.w};
#pragma unroll
                    for (int r = 0; r < 4; r++) {
                        const int j = 4 * qi + r;
                        // VAR 4: one exp in 16 on the FMA pipe (ex2_poly) when MUFU binds
                        const float x = q.x * A2[j];
                        const float ex = VAR == 4 && j == NT - 1 && (i & 1) ? ex2_poly(x)
                                                                            : bm_ex2(x);
                        h[j] = fmaf(ex, h[j], q.y * bv[r]);
                        acc[r & 1] = fmaf(h[j], cv[r], acc[r & 1]);
                    }
                }
                float yv = acc[0] + acc[1];
#pragma unroll
                for (int o = 1; o < TPC; o <<= 1) yv += __shfl_xor_sync(0xffffffffu, yv, o);
                return fmaf(yv, q.z, q.w);  // (sum + D u) g
            };
            // y over u's slot. A full chunk keeps its y in registers until every step is done:
            // no shared store between the steps' loads, so the scheduler may hoist step i+1's
            // loads and exps into step i.
            float(*ys)[CPB] = ADT == ACT_F32 ? act[0] : act[2];  // (see ScanSmemP)
            if (steps == TC) {
                float yr[TC];
#pragma unroll
                for (int i = 0; i < TC; i++) yr[i] = step(i);
                if (store) {
#pragma unroll
                    for (int i = 0; i < TC; i++) ys[i][ch] = yr[i];
                }
            } else {
                for (int i = 0; i < steps; i++) {
                    const float yv = step(i);
                    if (store) ys[i][ch] = yv;
                }
            }
            __syncwarp();

            // The warp's y (steps x WCH) to global memory, 16 bytes a lane where aligned: lane
            // (wt, wc) takes steps wt, wt + WROWS, .. of channels wc .. wc + 3.
            const int64_t yrow = (rowb + tb + (int64_t)c * TC) * E + e0;
            if (p.vec) {
                if (wok) {
                    for (int t = wt; t < steps; t += WROWS) {
                        const int64_t o = yrow + (int64_t)t * E + wc;
                        const float4 v = *reinterpret_cast<const float4 *>(&ys[t][wc]);
                        if (p.y) *reinterpret_cast<float4 *>(p.y + o) = v;
                        if (p.ybf) store_bf16_hw(v, p.ybf, p.ylo, o / 4);  // o % 4 == 0 (vec)
                        if constexpr (ADT == ACT_F16) store_f16_hw(v, p.yh, o / 4);
                    }
                }
            } else {
                for (int k = lane; k < steps * WCH; k += 32) {
                    const int t = k / WCH, c2 = warp * WCH + k % WCH;
                    if (e0 + c2 < E) {
                        const int64_t o = yrow + (int64_t)t * E + c2;
                        const float v = ys[t][c2];
                        if (p.y) p.y[o] = v;
                        if (p.ybf) bm_store_bf16(v, p.ybf, p.ylo, o);
                        if constexpr (ADT == ACT_F16) p.yh[o] = __half_as_ushort(__float2half_rn(v));
                    }
                }
            }
        }
    } else {
        for (int c = 0; c < nchunks; c++) {
            const int s = c % SCAN_STAGES;
            // Stage (c-1)%S, read during chunk c-1, is free since the barrier that ended it.
            issue(c + SCAN_STAGES - 1, (c + SCAN_STAGES - 1) % SCAN_STAGES);
            cp_async_wait<SCAN_STAGES - 1>();  // this thread's copies of chunk c have landed
            __syncthreads();                    // everyone's have

            // softplus(delta + bias) and silu(z), in place: the TPC threads of a channel each take
            // 1/TPC of the steps (these are MUFU work too), then meet at a warp barrier. Loops with
            // a compile-time trip count: the TC/TPC long softplus chains overlap instead of running
            // one after another.
            float(*act)[TC][CPB] = sm.act[s];
            if (p.softplus) {
    #pragma unroll
                for (int k = 0; k < TC / TPC; k++) {
                    const int t = k * TPC + sub;
                    act[1][t][ch] = bm_softplus(act[1][t][ch] + dbias);
                }
            } else if (p.delta_bias) {
    #pragma unroll
                for (int k = 0; k < TC / TPC; k++) act[1][k * TPC + sub][ch] += dbias;
            }
            if (zcopy) {
    #pragma unroll
                for (int k = 0; k < TC / TPC; k++) {
                    const int t = k * TPC + sub;
                    act[2][t][ch] = bm_silu(act[2][t][ch]);
                }
            }
            __syncwarp();

            const int steps = min(TC, te - tb - c * TC);
            const float *bc = &sm.bc[s][0][0];
            auto step = [&](int i) {
                const float dt = act[1][i][ch];
                const float uv = act[0][i][ch];
                const float du = dt * uv;
                const float4 *b4 = reinterpret_cast<const float4 *>(bc + i * 2 * NP + sub * NT);
                const float4 *c4 = reinterpret_cast<const float4 *>(bc + i * 2 * NP + NP + sub * NT);
                float acc[2] = {0.f, 0.f};  // two chains: the y sum is not one long dependency
    #pragma unroll
                for (int q = 0; q < NT / 4; q++) {
                    const float4 bq = b4[q], cq = c4[q];
                    const float bv[4] = {bq.x, bq.y, bq.z, bq.w};
                    const float cv[4] = {cq.x, cq.y, cq.z, cq.w};
    #pragma unroll
                    for (int r = 0; r < 4; r++) {
                        const int j = 4 * q + r;
                        h[j] = fmaf(bm_ex2(dt * A2[j]), h[j], du * bv[r]);
                        acc[r & 1] = fmaf(h[j], cv[r], acc[r & 1]);
                    }
                }
                float yv = acc[0] + acc[1];
    #pragma unroll
                for (int o = 1; o < TPC; o <<= 1) yv += __shfl_xor_sync(0xffffffffu, yv, o);
                yv = fmaf(Dv, uv, yv);
                if (has_z) yv *= act[2][i][ch];
                if (store) sm.y[i][ch] = yv;
            };
            // Pass 1: the state recurrence only (the segment's end state and its delta sum).
            auto lstep = [&](int i) {
                const float dt = act[1][i][ch];
                const float du = dt * act[0][i][ch];
                dsum += dt;
                const float4 *b4 = reinterpret_cast<const float4 *>(bc + i * 2 * NP + sub * NT);
    #pragma unroll
                for (int q = 0; q < NT / 4; q++) {
                    const float4 bq = b4[q];
                    const float bv[4] = {bq.x, bq.y, bq.z, bq.w};
    #pragma unroll
                    for (int r = 0; r < 4; r++)
                        h[4 * q + r] = fmaf(bm_ex2(dt * A2[4 * q + r]), h[4 * q + r], du * bv[r]);
                }
            };
            if (light) {
                if (VAR == 1 && steps == TC) {
    #pragma unroll
                    for (int i = 0; i < TC; i++) lstep(i);
                } else {
                    for (int i = 0; i < steps; i++) lstep(i);
                }
                __syncthreads();  // stage s is rewritten by the issue of chunk c+1's iteration
                continue;
            }
            if (VAR == 1 && steps == TC) {
                // Whole chunk unrolled: the scheduler can start step i+1's exps (independent of
                // the state) during step i's reduction.
    #pragma unroll
                for (int i = 0; i < TC; i++) step(i);
            } else {
                for (int i = 0; i < steps; i++) step(i);
            }
            __syncthreads();  // stage s is rewritten by the issue of chunk c+1's iteration
            // The chunk's y (steps x CPB) to global memory, 16 bytes a thread where aligned. sm.y
            // is written again only after the next chunk's first barrier.
            const int64_t yrow = (rowb + tb + (int64_t)c * TC) * E + e0;
            // ybf / ylo: the bf16 conversion of the engine's out_proj input done here, where y
            // is in shared memory anyway (saves reading y back: bm_f32_to_bf16_* as to_bf16).
            if (p.vec) {
                for (int k = tid; k < steps * Q; k += SCAN_THREADS) {
                    const int t = k / Q, q = k % Q;
                    if (e0 + 4 * q < E) {
                        const int64_t o = yrow + (int64_t)t * E + 4 * q;
                        const float4 v = *reinterpret_cast<const float4 *>(&sm.y[t][4 * q]);
                        if (p.y) *reinterpret_cast<float4 *>(p.y + o) = v;
                        if (p.ybf) bm_store_bf16(v, p.ybf, p.ylo, o / 4);  // o % 4 == 0 (vec)
                    }
                }
            } else {
                for (int k = tid; k < steps * CPB; k += SCAN_THREADS) {
                    const int t = k / CPB, c2 = k % CPB;
                    if (e0 + c2 < E) {
                        const int64_t o = yrow + (int64_t)t * E + c2;
                        const float v = sm.y[t][c2];
                        if (p.y) p.y[o] = v;
                        if (p.ybf) bm_store_bf16(v, p.ybf, p.ylo, o);
                    }
                }
            }
        }
    }
    cp_async_wait<0>();  // leave no copies in flight (the trailing groups are empty)

    if (MODE == 1) {
        // Segment seg's end state (from zero unless seg = 0) and its delta sum, for pass 2
        // (segment 0's delta sum is never read).
        const int64_t be = ((int64_t)seg * gridDim.y + bi) * E + e;
        if (active) {
#pragma unroll
            for (int j = 0; j < NT; j++) {
                const int n = sub * NT + j;
                if (n < N) p.hseg[be * N + n] = h[j];
            }
            if (sub == 0) p.dsum[be] = dsum;
        }
    } else if (active && p.state_out && (MODE == 0 || seg == p.nseg - 1)) {
#pragma unroll
        for (int j = 0; j < NT; j++) {
            const int n = sub * NT + j;
            if (n < N) p.state_out[((int64_t)bi * E + e) * N + n] = h[j];
        }
    }
}


// The one-pass variant taken by default (var = -1): 3 (packed per-(t, e) values, one shared
// reciprocal) where it exists (TPC >= 2), else 1. Measured on the H200 at L = 2048, E = 2944,
// N = 16 (run 2, cuda/NOTES.md "Session 4, scan4"), VAR 1 -> 3: b = 8 0.419 -> 0.381 ms (bf16 y
// 0.450 -> 0.381), b = 4 0.319 -> 0.299, b = 1 one pass 0.254 -> 0.145. Until session 5 the
// default was 3 only where the grid runs in one wave of its 6 blocks per SM (b <= 8 at E =
// 2944): VAR 3 at 128 registers had lost at b = 16 (0.82 against 0.79 ms, session 4 run 1); at
// 168 registers it wins there (session 5 final check, 4_scan.log: b = 16 VAR 1 0.7935 / 0.7928,
// VAR 3 0.7393 / 0.7402 ms), so the condition is gone. VAR 4 measured 0.3-0.5% under VAR 3 at
// b = 8, within the rounds' spread: not the default. BLACKMAMBA_SCAN_VAR=0..4 overrides the
// default, for same-process A/B measurements of the whole model.
int default_var(int tpc) {
    static const int env = [] {
        const char *v = getenv("BLACKMAMBA_SCAN_VAR");
        return v && v[0] >= '0' && v[0] <= '4' && v[1] == 0 ? v[0] - '0' : -1;
    }();
    if (env >= 0) return env;
    return tpc >= 2 ? 3 : 1;
}

// BLACKMAMBA_SCAN_PDL_SPREAD (session 25): unset / "1" a scan launched with PDL pads its
// shared memory so that its blocks spread over the SMs (bm_pdl_spread_smem: ceil(blocks / SMs)
// an SM) instead of gathering beside dt_proj's on the SMs that free first; "0" not (A/B).
// At b = 1, L = 128 (184 blocks) the scan with PDL took ~26 against ~12 us unspread.
bool scan_pdl_spread_on() { return bm_env_switch("BLACKMAMBA_SCAN_PDL_SPREAD", true); }

template <int NT, int TPC>
int scan_fwd_launch(const ScanParams &p, int b, int var, int adt, cudaStream_t stream) {
    constexpr int CPB = SCAN_THREADS / TPC;
    static_assert(sizeof(ScanSmem<NT, TPC>) <= 48 * 1024, "static shared memory limit");
    static_assert(sizeof(ScanSmemP<NT, TPC>) <= 48 * 1024 || TPC < 2, "static shared memory limit");
    dim3 grid((unsigned)bm_cdiv(p.E, CPB), (unsigned)b);
    // with PDL where the grid is small (bm_conv_scan_pdl, bm_launch_pdl's one-wave rule; the
    // kernel waits first), its blocks spread over the SMs (scan_pdl_spread_on)
    const bool pdl = bm_conv_scan_pdl(), spread = scan_pdl_spread_on();
    auto go = [&](void (*k)(const ScanParams)) {
        return bm_launch_maybe_pdl(pdl, spread, k, grid, dim3(SCAN_THREADS), 0, stream, p);
    };
    if (adt != ACT_F32) {
        // 16-bit activations: VAR 3, one pass (scan_forward made TPC >= 2 and nseg = 1).
        if constexpr (TPC >= 2) {
            if (p.nseg == 1) {
                g_scan_packed.fetch_add(1, std::memory_order_relaxed);
                if (adt == ACT_BF16)
                    BM_CUDA_TRY(go(scan_fwd_kernel<NT, TPC, 3, 0, ACT_BF16>));
                else
                    BM_CUDA_TRY(go(scan_fwd_kernel<NT, TPC, 3, 0, ACT_F16>));
                return 0;
            }
        }
        return BM_CUDA_ARG_FAIL("scan: 16-bit activations need one pass at threads_per_channel >= 2");
    }
    if (var < 0) var = default_var(TPC);
    if (var >= 2 && TPC < 2) var = 1;  // the packed layout does not fit 48 KB at TPC = 1
    if (p.nseg > 1) {  // sequence-parallel: the two passes (VAR 1 only)
        grid.z = (unsigned)(p.nseg - 1);
        BM_CUDA_TRY(go(scan_fwd_kernel<NT, TPC, 1, 1>));
        grid.z = (unsigned)p.nseg;
        BM_CUDA_TRY(go(scan_fwd_kernel<NT, TPC, 1, 2>));
        return 0;
    }
    if (var == 4 && !(NT == 8 && TPC == 2)) var = 3;  // VAR 4 is built for b=8's shape only
    if (var >= 2) g_scan_packed.fetch_add(1, std::memory_order_relaxed);
    if constexpr (NT == 8 && TPC == 2) {
        if (var == 4) BM_CUDA_TRY(go(scan_fwd_kernel<NT, TPC, 4, 0>));
    }
    if constexpr (TPC >= 2) {
        if (var == 3) BM_CUDA_TRY(go(scan_fwd_kernel<NT, TPC, 3, 0>));
        else if (var == 2) BM_CUDA_TRY(go(scan_fwd_kernel<NT, TPC, 2, 0>));
    }
    if (var == 1) BM_CUDA_TRY(go(scan_fwd_kernel<NT, TPC, 1, 0>));
    else if (var == 0) BM_CUDA_TRY(go(scan_fwd_kernel<NT, TPC, 0, 0>));
    return 0;
}

// Sequence-parallel scan: the launches that took it (tests assert the path was taken).
std::atomic<long long> g_scan_segmented{0};

// Threads per channel of the sequence-parallel scan: at most 8 states per thread, the
// throughput winner at b = 8 (TPC = 2 at N = 16); the segments, not more threads per channel,
// fill the machine.
int seg_tpc(int64_t N) { return N > 16 ? 4 : N > 8 ? 2 : 1; }

// Segments the auto rule picks: enough blocks for about one full wave (8 blocks of 64
// threads per SM: 1056 on the H200), each segment at least 64 steps, at most 64 segments;
// fewer than 3 segments is not worth the second pass (b = 8 at E = 2944 already has 736
// blocks and stays unsegmented). Session 23: none below SEG_MIN_L steps, where the two
// passes' fixed cost (~25 us at the 2.8B shape: pass 2's fold and VAR 1 steps) outweighs the
// one pass's ~70 ns a step. The model's prefill (H200, 2.8B shape, same process, one pass
// against the segments; cuda/NOTES.md session 23): b = 1, L = 192 / 256 / 320 / 448 / 512
// -8.6 / -7.4 / -4.8 / -4.2 / -1.5%, L = 1024 / 2048 +3.6 / +9.1%; b = 2, L = 256 -5%, 1024 even.
// Session 24: pass 2's fold took ~12 us (the NT states' loads one after another, now one load
// latency a segment), after which segments win from 384 steps at b = 1: the segments against
// one pass, L = 256 / 320 / 384 / 512 / 640 / 1024 +2.9 / -0.8 / -1.2 / -3.1 / -4.5 / -7.7%;
// at b = 2 and 3 even (+-1%) at 768-1536 steps, so 768 stays there. (The passes on the packed
// kernel, VAR 3 at 8 segments, measured even with VAR 1's at 320-2048 steps: not kept.)
// min_l: SEG_MIN_L1 / SEG_MIN_L, or 3 * 64 under BLACKMAMBA_SCAN_SEGMENTS=any (A/B).
constexpr int64_t SEG_MIN_L1 = 384, SEG_MIN_L = 768;
int64_t auto_segments(int64_t b, int64_t L, int64_t E, int tpc, int sms, int64_t min_l) {
    if (L < min_l) return 1;
    const int64_t nblk = bm_cdiv(E, SCAN_THREADS / tpc) * b;
    int64_t S = 8 * (int64_t)sms / nblk;
    S = std::min<int64_t>(std::min<int64_t>(S, L / 64), 64);
    return S < 3 ? 1 : S;
}

// One token. A group of G = pow2ceil(N) (<= 32) lanes per (batch, channel); lane g owns states
// g and g+32 (N <= 64): consecutive threads read consecutive states (coalesced), the y sum is a
// shuffle reduction inside the group.
__global__ void scan_step_kernel(float *state,              // (b, E, N) in place
                                 const float *__restrict__ x,      // (b, E)
                                 const float *__restrict__ delta,  // (b, E)
                                 const float *__restrict__ A,      // (E, N)
                                 const float *__restrict__ Bm,     // (b, N)
                                 const float *__restrict__ Cm,     // (b, N)
                                 const float *__restrict__ D,      // (E) or NULL
                                 const float *__restrict__ z,      // (b, E) or NULL
                                 const float *__restrict__ delta_bias,  // (E) or NULL
                                 int softplus, float *__restrict__ y,   // (b, E)
                                 int64_t bE, int E, int N, int G) {
    const int64_t gtid = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    const int64_t be = gtid / G;  // (batch, channel) index
    const int g = (int)(gtid % G);
    const bool valid = be < bE;
    const int64_t bec = valid ? be : bE - 1;
    const int bi = (int)(bec / E), e = (int)(bec % E);

    float dt = delta[bec] + (delta_bias ? delta_bias[e] : 0.f);
    if (softplus) dt = bm_softplus(dt);
    const float xv = x[bec];
    const float dx = dt * xv;
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < 2; k++) {
        const int n = g + k * G;
        if (n < N) {
            float *s = state + bec * N + n;
            const float hn = fmaf(expf(dt * A[(int64_t)e * N + n]), *s, dx * Bm[(int64_t)bi * N + n]);
            if (valid) *s = hn;
            acc = fmaf(hn, Cm[(int64_t)bi * N + n], acc);
        }
    }
    for (int o = G / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (valid && g == 0) {
        float yv = fmaf(D ? D[e] : 0.f, xv, acc);
        if (z) yv *= bm_silu(z[bec]);
        y[bec] = yv;
    }
}

}  // namespace

// The launcher behind the three entry points below. segments: 0 auto, 1 off, >= 2 forced (a
// cap: each segment is a whole number of chunks). ws: scratch of ws_bytes for the segment
// states, or NULL (then taken from the stream-ordered pool when a segmented run needs it).
static int scan_forward(const float *u, const float *delta, const float *A, const float *Bm,
                        const float *Cm, const float *D, const float *z,
                        const float *delta_bias, int delta_softplus, const float *state_in,
                        float *state_out, float *y, uint16_t *ybf, uint16_t *ylo, int64_t b,
                        int64_t L, int64_t E, int64_t N, int tpc, int var, int segments,
                        void *ws, size_t ws_bytes, cudaStream_t stream, int adt = ACT_F32,
                        uint16_t *yh = nullptr) {
    if (N < 1 || N > 64) return BM_CUDA_ARG_FAIL("scan: N must be in 1..64");
    if (b > 65535 || L > INT32_MAX || E > INT32_MAX) return BM_CUDA_ARG_FAIL("scan: size too large");
    if (segments < 0) return BM_CUDA_ARG_FAIL("scan: segments must be >= 0");
    if (var < -1 || var > 4) return BM_CUDA_ARG_FAIL("scan: variant must be -1..4");
    if (ylo && !ybf) return BM_CUDA_ARG_FAIL("scan: y_lo needs y_bf16");
    if (b <= 0 || E <= 0) return 0;
    // 16-byte copies of float32 activations; 8-byte ones (four values) of 16-bit ones.
    const uintptr_t amask = adt == ACT_F32 ? 15 : 7;
    const bool vec = E % 4 == 0 && ((uintptr_t)u & amask) == 0 &&
                     ((uintptr_t)delta & amask) == 0 && ((uintptr_t)z & amask) == 0 &&
                     ((uintptr_t)y & 15) == 0 &&
                     (((uintptr_t)ybf | (uintptr_t)ylo | (uintptr_t)yh) & 7) == 0;
    const bool bcvec = N % 4 == 0 && ((uintptr_t)Bm & 15) == 0 && ((uintptr_t)Cm & 15) == 0;
    ScanParams p{u, delta, A, Bm, Cm, D, z, delta_bias, state_in, state_out, y, ybf, ylo, yh,
                 (int)L, (int)E, (int)N, delta_softplus, vec ? 1 : 0, bcvec ? 1 : 0,
                 (int)L, 1, nullptr, nullptr};
    if (L == 0) {
        // No tokens: the state passes through unchanged (zeros without state_in).
        if (!state_out) return 0;
        if (state_in && state_in != state_out)
            BM_CUDA_TRY(cudaMemcpyAsync(state_out, state_in, (size_t)(b * E * N) * sizeof(float),
                                        cudaMemcpyDeviceToDevice, stream));
        else if (!state_in)
            BM_CUDA_TRY(cudaMemsetAsync(state_out, 0, (size_t)(b * E * N) * sizeof(float), stream));
        return 0;
    }
    if (!y && !ybf && !yh) return BM_CUDA_ARG_FAIL("scan: no output for y");  // (L = 0: may be NULL)
    if (adt != ACT_F32 && (y || ylo || (adt == ACT_BF16) != (ybf != nullptr) ||
                           (adt == ACT_F16) != (yh != nullptr)))
        return BM_CUDA_ARG_FAIL("scan: 16-bit activations write y in their own dtype only");
    int sms = 132;
    {
        const int st0 = bm_sm_count(&sms);
        if (st0) return st0;
    }
    // Sequence parallelism (see the top of the file).
    int64_t S = 1;
    // BLACKMAMBA_SCAN_SEGMENTS (A/B measurements, where the caller leaves the count to the
    // auto rule): "1" one pass; "any" the auto rule without SEG_MIN_L; a count n >= 2 that
    // many segments (one pass where the caller's workspace has no room for them).
    const char *env = getenv("BLACKMAMBA_SCAN_SEGMENTS");
    int64_t env_n = 0, min_l = b == 1 ? SEG_MIN_L1 : SEG_MIN_L;
    if (segments == 0 && env) {
        const long v = bm_env_long("BLACKMAMBA_SCAN_SEGMENTS", 1, LONG_MAX, 0);
        if (!strcmp(env, "any")) min_l = 3 * 64;
        else if (v == 1) segments = 1;
        else if (v >= 2) env_n = std::min<long>(v, 64);
    }
    // 16-bit activations run one pass (the packed kernel; the segmented passes are VAR 1's).
    if (adt != ACT_F32) segments = 1;
    if (segments == 0 && env_n) S = std::min<int64_t>(env_n, bm_cdiv(L, SCAN_TC));
    else if (segments == 0) S = auto_segments(b, L, E, tpc ? tpc : seg_tpc(N), sms, min_l);
    else if (segments >= 2) S = std::min<int64_t>(segments, bm_cdiv(L, SCAN_TC));
    void *buf = nullptr;
    if (S >= 2) {
        const int64_t seg_len = bm_cdiv(bm_cdiv(L, S), SCAN_TC) * SCAN_TC;
        S = bm_cdiv(L, seg_len);
        const size_t need = (size_t)(S * b * E * (N + 1)) * sizeof(float);
        if (S >= 2 && ws && ws_bytes < need && segments >= 2)
            return BM_CUDA_ARG_FAIL("scan: workspace too small for the segments asked for");
        if (S >= 2 && !ws) {
            if (cudaMallocAsync(&buf, need, stream) != cudaSuccess) {
                cudaGetLastError();  // no pool: run unsegmented
                buf = nullptr;
                if (segments >= 2) return BM_CUDA_ARG_FAIL("scan: no memory for the segments");
            }
            ws = buf;
            ws_bytes = buf ? need : 0;
        }
        if (S >= 2 && ws && ws_bytes >= need) {
            p.seg_len = (int)seg_len;
            p.nseg = (int)S;
            p.hseg = (float *)ws;
            p.dsum = (float *)ws + S * b * E * N;
            if (tpc == 0) tpc = seg_tpc(N);
            g_scan_segmented.fetch_add(1, std::memory_order_relaxed);
        }
    }
    if (tpc == 0) {
        // At most 8 states per thread: TPC = 1 with 16 states ran at half the speed of TPC = 2
        // on the H200 (0.98 vs 0.52 ms at b=8, E=2944, N=16). Then, while there are fewer than
        // ~2 warps per scheduler (b=1: 92 warps at TPC = 1), split further (b=1: TPC = 4,
        // 0.21 ms against 0.64 at TPC = 1).
        const int64_t warps1 = bm_cdiv(b * E, 32);
        tpc = N > 16 ? 4 : N > 8 ? 2 : 1;
        while (tpc < 4 && N > 4 * tpc && warps1 * tpc < (int64_t)sms * 4 * 2) tpc *= 2;
        if (adt != ACT_F32 && tpc < 2) tpc = 2;  // the packed layout needs TPC >= 2
    }
    int st = -1;
    if (tpc != 1 && tpc != 2 && tpc != 4) {
        st = BM_CUDA_ARG_FAIL("scan: threads_per_channel must be 1, 2 or 4");
    } else if (bm_cdiv(N, tpc) > 16) {
        st = BM_CUDA_ARG_FAIL("scan: N > 16 * threads_per_channel");
    } else {
        const int64_t per = bm_cdiv(N, tpc);  // states per thread
        const int nt = per <= 4 ? 4 : per <= 8 ? 8 : 16;
        switch (tpc * 100 + nt) {
            case 104: st = scan_fwd_launch<4, 1>(p, (int)b, var, adt, stream); break;
            case 108: st = scan_fwd_launch<8, 1>(p, (int)b, var, adt, stream); break;
            case 116: st = scan_fwd_launch<16, 1>(p, (int)b, var, adt, stream); break;
            case 204: st = scan_fwd_launch<4, 2>(p, (int)b, var, adt, stream); break;
            case 208: st = scan_fwd_launch<8, 2>(p, (int)b, var, adt, stream); break;
            case 216: st = scan_fwd_launch<16, 2>(p, (int)b, var, adt, stream); break;
            case 404: st = scan_fwd_launch<4, 4>(p, (int)b, var, adt, stream); break;
            case 408: st = scan_fwd_launch<8, 4>(p, (int)b, var, adt, stream); break;
            case 416: st = scan_fwd_launch<16, 4>(p, (int)b, var, adt, stream); break;
        }
        if (st == -1) st = BM_CUDA_ARG_FAIL("scan: no kernel for this N");
    }
    if (buf) {  // stream-ordered: freed after the two passes
        cudaError_t e = cudaFreeAsync(buf, stream);
        if (!st && e != cudaSuccess) return bm_cuda_fail_cuda_(__FILE__, __LINE__, e);
    }
    return st;
}

extern "C" int bm_cuda_scan_forward_variant(const float *u, const float *delta, const float *A,
                                            const float *Bm, const float *Cm, const float *D,
                                            const float *z, const float *delta_bias,
                                            int delta_softplus, const float *state_in,
                                            float *state_out, float *y, int64_t b, int64_t L,
                                            int64_t E, int64_t N, int tpc, int var,
                                            cudaStream_t stream) {
    return scan_forward(u, delta, A, Bm, Cm, D, z, delta_bias, delta_softplus, state_in,
                        state_out, y, nullptr, nullptr, b, L, E, N, tpc, var, 1, nullptr, 0,
                        stream);
}

extern "C" int bm_cuda_scan_forward_ws(const float *u, const float *delta, const float *A,
                                       const float *Bm, const float *Cm, const float *D,
                                       const float *z, const float *delta_bias,
                                       int delta_softplus, const float *state_in,
                                       float *state_out, float *y, uint16_t *y_bf16,
                                       uint16_t *y_lo, int64_t b, int64_t L, int64_t E,
                                       int64_t N, int tpc, int var, int segments, void *ws,
                                       size_t ws_bytes, cudaStream_t stream) {
    return scan_forward(u, delta, A, Bm, Cm, D, z, delta_bias, delta_softplus, state_in,
                        state_out, y, y_bf16, y_lo, b, L, E, N, tpc, var, segments, ws,
                        ws_bytes, stream);
}

extern "C" int bm_cuda_scan_forward_act(const void *u, const void *delta, const float *A,
                                        const float *Bm, const float *Cm, const float *D,
                                        const void *z, const float *delta_bias,
                                        int delta_softplus, const float *state_in,
                                        float *state_out, void *y, int act_dtype, int64_t b,
                                        int64_t L, int64_t E, int64_t N, cudaStream_t stream) {
    if (act_dtype != ACT_F32 && act_dtype != ACT_BF16 && act_dtype != ACT_F16)
        return BM_CUDA_ARG_FAIL("scan: act_dtype must be 0 (float32), 1 (bf16) or 2 (fp16)");
    const float *uf = static_cast<const float *>(u), *df = static_cast<const float *>(delta),
                *zf = static_cast<const float *>(z);
    if (act_dtype == ACT_F32)
        return scan_forward(uf, df, A, Bm, Cm, D, zf, delta_bias, delta_softplus, state_in,
                            state_out, static_cast<float *>(y), nullptr, nullptr, b, L, E, N, 0,
                            -1, 0, nullptr, 0, stream);
    uint16_t *y16 = static_cast<uint16_t *>(y);
    return scan_forward(uf, df, A, Bm, Cm, D, zf, delta_bias, delta_softplus, state_in, state_out,
                        nullptr, act_dtype == ACT_BF16 ? y16 : nullptr, nullptr, b, L, E, N, 0,
                        -1, 1, nullptr, 0, stream, act_dtype,
                        act_dtype == ACT_F16 ? y16 : nullptr);
}

extern "C" size_t bm_cuda_scan_workspace(int64_t E, int64_t N) {
    // The auto rule's S * b is at most 8 * sms / (blocks per batch row) for any b and L.
    int sms = 132;
    if (E <= 0 || N < 1 || bm_sm_count(&sms)) return 0;
    const int64_t nblk1 = bm_cdiv(E, SCAN_THREADS / seg_tpc(N));
    return (size_t)(8 * (int64_t)sms / nblk1 * E * (N + 1)) * sizeof(float);
}

extern "C" long long bm_cuda_scan_segmented_calls(void) {
    return g_scan_segmented.load(std::memory_order_relaxed);
}

extern "C" long long bm_cuda_scan_packed_calls(void) {
    return g_scan_packed.load(std::memory_order_relaxed);
}

extern "C" int bm_cuda_scan_forward(const float *u, const float *delta, const float *A,
                                    const float *Bm, const float *Cm, const float *D,
                                    const float *z, const float *delta_bias, int delta_softplus,
                                    const float *state_in, float *state_out, float *y,
                                    int64_t b, int64_t L, int64_t E, int64_t N,
                                    cudaStream_t stream) {
    return scan_forward(u, delta, A, Bm, Cm, D, z, delta_bias, delta_softplus, state_in,
                        state_out, y, nullptr, nullptr, b, L, E, N, 0, -1, 0, nullptr, 0, stream);
}

extern "C" int bm_cuda_scan_step(float *state, const float *x, const float *delta,
                                 const float *A, const float *Bm, const float *Cm,
                                 const float *D, const float *z, const float *delta_bias,
                                 int delta_softplus, float *y, int64_t b, int64_t E, int64_t N,
                                 cudaStream_t stream) {
    if (N < 1 || N > 64) return BM_CUDA_ARG_FAIL("scan_step: N must be in 1..64");
    if (E > INT32_MAX) return BM_CUDA_ARG_FAIL("scan_step: E too large");
    if (b <= 0 || E <= 0) return 0;
    int G = 1;
    while (G < N && G < 32) G *= 2;
    const int64_t threads = b * E * G;
    scan_step_kernel<<<(unsigned)bm_cdiv(threads, 256), 256, 0, stream>>>(
        state, x, delta, A, Bm, Cm, D, z, delta_bias, delta_softplus, y, b * E, (int)E, (int)N, G);
    BM_CUDA_LAUNCHED();
    return 0;
}
