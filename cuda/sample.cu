// sample.cu: the next token from logits on the device: greedy, temperature, top-k, top-p, one
// draw by inverse CDF from a counter-based uniform. One block per row (B rows of V logits), or
// for up to 16 rows a cluster of 8 blocks a row (sample_cluster_kernel, below).
//
// Semantics: blackmamba/generation.py sample_probs / sample_next_u, the float64 twin.
//   - Only ids < limit are eligible. Any NaN: status SAMPLE_NAN. Any +inf: the choice is
//     among the +inf ids (weight 1 each, every other weight 0). All -inf: SAMPLE_NEG_INF.
//   - temperature 0: argmax, ties -> lowest id.
//   - Else weights w(v) = expf(-((vmax - v) / T)) (the max has weight 1). Order: by logit
//     descending, ties by lower id first (the twin's stable argsort of -p: distinct float32
//     logits never give equal float64 p, so ordering by the float32 logit is the same order).
//   - top_k (1 <= k < limit): keep logits >= the k-th largest (with multiplicity): ties at
//     the threshold kept (np.partition + `lg < kth`).
//   - top_p (< 1): of the kept, the smallest prefix in that order whose mass >= top_p * Z
//     (Z = the kept mass), i.e. np.searchsorted(cumsum, top_p) + 1 of them.
//   - The draw: u in [0, 1) from Philox4x32-10 (Random123's philox4x32, 10 rounds; the twin
//     is generation.philox4x32), key (seed lo, seed hi), counter (step lo, step hi, row, 0),
//     u = (x0 * 2^21 + (x1 >> 11)) * 2^-53; token = the first id (ascending) whose cumulative
//     kept weight exceeds u * W (W = the kept total): rng.choice's rule.
//
// Accuracy: v - vmax and the division by T in float32 (IEEE, no fast math), expf (<= 2 ulp):
// each weight is within about (|x| + 2) * 2.4e-7 relative of the twin's float64 value, x =
// (v - vmax) / T; weights of x < -100 are below 1e-43 and weigh nothing. Every sum, prefix
// and threshold comparison is float64 (per-thread sums, then block scans), so a token can
// differ from the twin's only when u * W, or top_p * Z, lies within ~1e-5 relative of a
// boundary of the cumulative weights (tests/test_cuda_sample.py allows exactly that).
//
// Rows of up to ~53,000 ids (the H200's 227 KB of shared memory per block, less the static
// 17 KB) are copied into shared memory by the first pass (float4 loads where the row is
// 16-byte aligned), and every later pass reads them there; longer rows are read from global
// memory (L2) each pass. Status bit 16 says which.
// Paths (all block-uniform decisions; the path taken is reported in status bits 8..15):
//   1 greedy      one pass (max, argmax, NaN / +inf counts).
//   2 direct      no top-k / top-p: one more pass of weight sums over contiguous id ranges
//                 per thread, a block scan, and the owner thread of u * W walks its range.
//   3 list        top-k and/or top-p, finite logits: a pass counts the logits within
//                 L * T of the max for a few L (and, for top-p alone, sums their weights);
//                 the smallest level that holds the kept set (<= SAMPLE_LIST entries) is
//                 compacted into a list, bitonic-sorted by (logit desc, id asc), cut by k and
//                 p there, re-sorted by id, and drawn.
//   4 generic     everything else (+inf rows, kept sets larger than the list, or forced):
//                 the thresholds by bisection over the 32-bit order keys of the logits, one
//                 block reduction per step (32 for top-k, 32 for top-p), then the draw pass
//                 as in 2 with the cut as a predicate. Slow (~70 passes) but rarely taken.
#include <cooperative_groups.h>

#include "common.cuh"

#include <math.h>

#include <atomic>

namespace {

constexpr int ST = 1024;            // threads per row block
constexpr int NW = ST / 32;
constexpr int SAMPLE_LIST = 2048;   // list path capacity (2 entries per thread)
constexpr int NLEVEL = 6;           // list path: logits within L * T of the max, L below:
// a first pass tries the coarse levels (peaked rows); if even L = 2 holds too many logits (a
// flat row: high temperature), a second pass tries the fine ones.
__constant__ float kLevels[2 * NLEVEL] = {2.f,    4.f,   8.f,   16.f, 32.f, INFINITY,
                                          0.03125f, 0.0625f, 0.125f, 0.25f, 0.5f, 1.f};

enum { PATH_GREEDY = 1, PATH_DIRECT = 2, PATH_LIST = 3, PATH_GENERIC = 4 };

struct SampleArgs {
    const float *logits;   // (B, V)
    int64_t V;
    int n;                 // eligible ids: [0, n)
    float T;               // temperature
    int top_k;             // 0: off (also when >= n)
    double top_p;          // 1: off
    uint64_t seed;
    int64_t step;
    int row_streams;
    int force_generic;
    int32_t *tokens;       // (B)
    int32_t *status;       // (B) or NULL: |= SAMPLE_* error bits, bits 8..15 = path
    double *u_out;         // (B) or NULL
};

// ---- Philox4x32-10 ------------------------------------------------------------------------
__device__ __forceinline__ double philox_uniform(uint64_t seed, int64_t step, uint32_t row) {
    uint32_t c0 = (uint32_t)(uint64_t)step, c1 = (uint32_t)((uint64_t)step >> 32), c2 = row,
             c3 = 0;
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
#pragma unroll
    for (int r = 0; r < 10; r++) {
        if (r) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const uint32_t lo0 = 0xD2511F53u * c0, hi0 = __umulhi(0xD2511F53u, c0);
        const uint32_t lo1 = 0xCD9E8D57u * c2, hi1 = __umulhi(0xCD9E8D57u, c2);
        const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
    }
    return (double)(((uint64_t)c0 << 21) | (c1 >> 11)) * 0x1p-53;
}

// Order key: a < b as floats <=> okey(a) < okey(b) as unsigned (no NaN here; -0 as +0).
__device__ __forceinline__ uint32_t okey(float v) {
    uint32_t b = __float_as_uint(v);
    if (b == 0x80000000u) b = 0;
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float okey_float(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Shared scratch of a row block.
struct Smem {
    unsigned long long list[SAMPLE_LIST];  // list path entries
    double d[NW];
    long long i[NW];
    int cnt;                               // list fill count
    int res;                               // a broadcast result
};

// ---- block reductions / scans (ST threads; each ends with a barrier) ------------------------
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ long long block_sum_ll(long long v, Smem &sm) { return bm_block_sum(v, sm.i); }
__device__ double block_sum_d(double v, Smem &sm) { return bm_block_sum(v, sm.d); }

// Max over the block (every thread gets it); 64-bit T, scratch = sm.i.
template <typename T>
__device__ T block_max64(T v, Smem &sm) {
    static_assert(sizeof(T) == 8, "64-bit values");
    static_assert(NW == 32, "one warp total per lane");
    T *scratch = reinterpret_cast<T *>(sm.i);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T t = scratch[lane];   // NW == 32: one value per lane
    t = warp_max(t);
    __syncthreads();
    return t;
}
__device__ long long block_max_ll(long long v, Smem &sm) { return block_max64(v, sm); }
__device__ long long block_min_ll(long long v, Smem &sm) { return -block_max_ll(-v, sm); }

// Exclusive prefix sum over threads (in thread order); *total gets the sum. Per warp the
// Hillis-Steele scan, then the warp totals. Values of later threads never enter an earlier
// thread's prefix, and each start is computed once: the callers use it as is.
template <typename T>
__device__ T block_exscan(T v, T *scratch, T *total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    T x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const T y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    T ex = __shfl_up_sync(0xffffffffu, x, 1);
    if (lane == 0) ex = T(0);
    if (lane == 31) scratch[warp] = x;
    __syncthreads();
    if (warp == 0) {
        T t = lane < NW ? scratch[lane] : T(0);
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const T y = __shfl_up_sync(0xffffffffu, t, o);
            if (lane >= o) t += y;
        }
        if (lane < NW) scratch[lane] = t;   // inclusive over warps
    }
    __syncthreads();
    const T base = warp ? scratch[warp - 1] : T(0);
    *total = scratch[NW - 1];
    __syncthreads();
    return base + ex;
}

// N sums over the block at once (every thread gets them in out[]): each warp's shuffle sums,
// then thread j < N adds the NW warp sums of value j in warp order (a fixed order: the same
// bits every run). scratch: NW * N + N entries (the list path's buffer, unused meanwhile).
template <int N, typename T>
__device__ void block_sums(T (&v)[N], T *scratch, T (&out)[N]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int j = 0; j < N; j++) {
        T x = v[j];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
        if (lane == 0) scratch[warp * N + j] = x;
    }
    __syncthreads();
    if (threadIdx.x < N) {
        T t = T(0);
        for (int w = 0; w < NW; w++) t += scratch[w * N + threadIdx.x];
        scratch[NW * N + threadIdx.x] = t;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < N; j++) out[j] = scratch[NW * N + j];
    __syncthreads();
}

// The inverse CDF over items [0, m) in id order: the first item whose cumulative weight
// (float64) exceeds u * W, W the total. Thread t owns the contiguous items [t*c, t*c + c);
// the owner is the last thread with weight whose start <= u * W (the crossing lies in it, or
// beyond every item when rounding put u * W at W: then its last weighted item). Returns the
// item (block-uniform); -1 if every weight is 0.
template <typename WF>
__device__ int inverse_cdf(int m, WF w, double u, Smem &sm) {
    const int c = (m + ST - 1) / ST;
    const int lo = min(m, (int)threadIdx.x * c), hi = min(m, lo + c);
    double loc = 0.0;
    for (int i = lo; i < hi; i++) loc += (double)w(i);
    double tot;
    const double start = block_exscan(loc, sm.d, &tot);
    const double target = u * tot;
    const long long owner =
        block_max_ll(loc > 0.0 && start <= target ? (long long)threadIdx.x : -1LL, sm);
    if (owner < 0) return -1;
    if ((long long)threadIdx.x == owner) {
        double acc = start;
        int pick = -1, last = -1;
        for (int i = lo; i < hi; i++) {
            const float wi = w(i);
            if (wi > 0.f) {
                last = i;
                acc += (double)wi;
                if (acc > target) {
                    pick = i;
                    break;
                }
            }
        }
        sm.res = pick >= 0 ? pick : last;
    }
    __syncthreads();
    const int r = sm.res;
    __syncthreads();
    return r;
}

// Bitonic sort of list[0, P) (P a power of two >= 2), descending or ascending.
__device__ void bitonic(unsigned long long *a, int P, bool descending) {
    for (int k = 2; k <= P; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = threadIdx.x; i < P; i += ST) {
                const int ixj = i ^ j;
                if (ixj > i) {
                    const unsigned long long x = a[i], y = a[ixj];
                    const bool up = ((i & k) == 0) != descending;   // this pair ascending?
                    if (up ? x > y : x < y) {
                        a[i] = y;
                        a[ixj] = x;
                    }
                }
            }
            __syncthreads();
        }
    }
}

__device__ __forceinline__ int pow2_at_least(int m) {
    int p = 2;
    while (p < m) p <<= 1;
    return p;
}

// CACHED: the row is copied into dynamic shared memory (4 n bytes) by the first pass, and
// every later pass reads it there (the generic path's ~70 passes, the walks of one thread);
// else every pass reads global memory (L2: the logits were just written).
template <bool CACHED>
__global__ __launch_bounds__(ST) void sample_kernel(SampleArgs a) {
    __shared__ Smem sm;
    extern __shared__ float4 cache4[];   // (n) floats when CACHED
    float *cache = reinterpret_cast<float *>(cache4);
    const int row = blockIdx.x, tid = threadIdx.x, n = a.n;
    const float *p = a.logits + (int64_t)row * a.V;
    auto ld = [&](int i) -> float {
        if constexpr (CACHED) return cache[i];
        else return __ldg(p + i);
    };

    // ---- pass 1: max, first argmax, NaN and +inf counts (and the copy) ---------------------
    float best = -INFINITY;
    int bi = n;
    int nan = 0, pinf = 0;
    // each thread visits its ids in ascending order: the first max it sees is its lowest
    auto visit = [&](int i, float v) {
        if (v != v) nan++;
        else {
            if (v == INFINITY) pinf++;
            if (v > best) { best = v; bi = i; }
        }
    };
    int done4 = 0;
    if ((reinterpret_cast<uintptr_t>(p) & 15) == 0) {   // float4 loads: 4x the bytes in flight
        const int n4 = n >> 2;
        const float4 *p4 = reinterpret_cast<const float4 *>(p);
#pragma unroll 4
        for (int i4 = tid; i4 < n4; i4 += ST) {
            const float4 q = __ldg(p4 + i4);
            if constexpr (CACHED) cache4[i4] = q;
            visit(4 * i4, q.x);
            visit(4 * i4 + 1, q.y);
            visit(4 * i4 + 2, q.z);
            visit(4 * i4 + 3, q.w);
        }
        done4 = 4 * n4;
    }
#pragma unroll 4
    for (int i = done4 + tid; i < n; i += ST) {
        const float v = __ldg(p + i);
        if constexpr (CACHED) cache[i] = v;
        visit(i, v);
    }
    // (max, lowest id) over the block: pack as a 64-bit key, order key high, ~id low.
    unsigned long long packed =
        bi < n ? ((unsigned long long)okey(best) << 32) | (0x7fffffffu - (uint32_t)bi) : 0ull;
    packed = block_max64(packed, sm);   // 0: no value above -inf (okey(-inf) << 32 > 0)
    const long long nan_pinf = block_sum_ll(((long long)nan << 32) + pinf, sm);
    const int any_nan = (int)(nan_pinf >> 32) > 0;
    const long long npinf = nan_pinf & 0xffffffffLL;
    const float vmax = packed ? okey_float((uint32_t)(packed >> 32)) : -INFINITY;
    const int amax = packed ? (int)(0x7fffffffu - (uint32_t)(packed & 0xffffffffu)) : 0;
    const double u = philox_uniform(a.seed, a.step, a.row_streams ? (uint32_t)row : 0u);

    int err = 0, path = PATH_GREEDY, token = 0;
    if (any_nan) err = BM_CUDA_SAMPLE_NAN;
    else if (vmax == -INFINITY) err = BM_CUDA_SAMPLE_NEG_INF;
    if (err || a.T == 0.f) {
        token = err ? 0 : amax;
        goto done;
    }
    {
        const bool posinf = npinf > 0;
        const float T = a.T;
        // the weight of logit v; exactly 1 at the max, 0 for -inf (and non-+inf in +inf rows)
        auto weight = [&](float v) -> float {
            if (posinf) return v == INFINITY ? 1.f : 0.f;
            return expf(-__fdiv_rn(vmax - v, T));
        };
        const bool use_k = a.top_k > 0 && a.top_k < n;
        const bool use_p = a.top_p < 1.0;
        const int K = a.top_k;

        if (!use_k && !use_p) {   // ---- path 2: the draw over every id -----------------------
            path = PATH_DIRECT;
            token = inverse_cdf(n, [&](int i) { return weight(ld(i)); }, u, sm);
            goto done;
        }

        if (!posinf && !a.force_generic) {   // ---- path 3: the candidate list ---------------
            // counts of logits with vmax - v < L * T (a prefix of the order: monotone in v)
            // and for top-p alone their weights (float32 per thread: only to pick a level)
            const bool p_only = use_p && !use_k;
            int lvl = -1, lvl_count = 0;
            float tau = 0.f;
            double Z = 0.0;
            for (int round = 0; round < 2 && lvl < 0; round++) {
                const float *L = kLevels + round * NLEVEL;
                int cnt[NLEVEL];
                float ms[NLEVEL];
#pragma unroll
                for (int j = 0; j < NLEVEL; j++) cnt[j] = 0, ms[j] = 0.f;
                double z = 0.0;
                for (int i = tid; i < n; i += ST) {
                    const float v = ld(i), d = vmax - v;
                    const float w = p_only ? weight(v) : 0.f;
#pragma unroll
                    for (int j = 0; j < NLEVEL; j++) {
                        const bool in = d < L[j] * T;
                        cnt[j] += in;
                        ms[j] += in ? w : 0.f;
                    }
                    z += (double)w;
                }
                int lvl_cnt[NLEVEL];
                double lvl_mass[NLEVEL];
#pragma unroll
                for (int j = 0; j < NLEVEL; j++) {
                    lvl_cnt[j] = (int)block_sum_ll(cnt[j], sm);
                    lvl_mass[j] = p_only ? block_sum_d((double)ms[j], sm) : 0.0;
                }
                if (round == 0) Z = p_only ? block_sum_d(z, sm) : 0.0;
                // the smallest level that holds the kept set: >= k logits (a prefix of >= k
                // holds every logit >= the k-th), or for top-p alone, a mass >= top_p Z (with
                // a margin for the float32 sums; the cut below checks it exactly); else, for
                // top-p alone, the largest level that fits, as a try.
#pragma unroll
                for (int j = NLEVEL - 1; j >= 0; j--) {
                    const int c = lvl_cnt[j];
                    if (c > SAMPLE_LIST || c < 1) continue;
                    const bool enough =
                        use_k ? c >= K : lvl_mass[j] >= a.top_p * Z * (1.0 + 1e-4);
                    // top-p alone: the largest level that fits, as a try, where its float32
                    // sums leave the mass in doubt (a list whose mass is surely short would
                    // only be sorted to fall through to the generic path: ~30-50 us)
                    const bool try_p =
                        !use_k && lvl < 0 && lvl_mass[j] >= a.top_p * Z * (1.0 - 1e-4);
                    if (enough || try_p) {
                        lvl = j;
                        lvl_count = c;
                        tau = L[j] * T;
                    }
                }
                // the fine levels only help when the coarse ones all hold too many logits
                if (lvl_cnt[0] <= SAMPLE_LIST) break;
            }
            if (lvl >= 0 && (!use_k || lvl_count >= K)) {
                if (tid == 0) sm.cnt = 0;
                __syncthreads();
                // compaction: (key << 32 | ~id) sorts by logit descending, then id ascending
                const int nround = (n + ST - 1) / ST;
                for (int r = 0; r < nround; r++) {
                    const int i = r * ST + tid;
                    const float v = i < n ? ld(i) : -INFINITY;
                    const bool in = i < n && vmax - v < tau;
                    const unsigned bal = __ballot_sync(0xffffffffu, in);
                    int base = 0;
                    if ((tid & 31) == 0 && bal) base = atomicAdd(&sm.cnt, __popc(bal));
                    base = __shfl_sync(0xffffffffu, base, 0);
                    const int at = base + __popc(bal & ((1u << (tid & 31)) - 1u));
                    if (in && at < SAMPLE_LIST)   // always: the same test counted <= LIST above
                        sm.list[at] = ((unsigned long long)okey(v) << 32) | (uint32_t)~(uint32_t)i;
                }
                __syncthreads();
                const int m = min(sm.cnt, SAMPLE_LIST);
                const int P = pow2_at_least(m);
                for (int i = m + tid; i < P; i += ST) sm.list[i] = 0ull;   // sorts last
                __syncthreads();
                bitonic(sm.list, P, true);
                auto key_at = [&](int q) { return (uint32_t)(sm.list[q] >> 32); };
                // top-k with ties: every entry with key >= the k-th key
                int kept = m;
                if (use_k) {
                    const uint32_t kth = key_at(K - 1);
                    long long first_below = m;
                    for (int q = K + tid; q < m; q += ST)
                        if (key_at(q) < kth) { first_below = q; break; }
                    kept = (int)block_min_ll(first_below, sm);
                }
                bool ok = true;
                if (use_p) {
                    // prefix sums in the sorted order over [0, kept): 4 entries per thread
                    const int c = (kept + ST - 1) / ST;
                    const int lo = min(kept, tid * c), hi = min(kept, lo + c);
                    double loc = 0.0;
                    for (int q = lo; q < hi; q++) loc += (double)weight(okey_float(key_at(q)));
                    double tot;
                    const double start = block_exscan(loc, sm.d, &tot);
                    const double target = a.top_p * (use_k ? tot : Z);
                    long long cut = LLONG_MAX;   // first position whose cumulative >= target
                    double acc = start;
                    for (int q = lo; q < hi; q++) {
                        acc += (double)weight(okey_float(key_at(q)));
                        if (acc >= target) { cut = q; break; }
                    }
                    cut = block_min_ll(cut, sm);
                    if (cut == LLONG_MAX) ok = false;   // the list's mass is short: generic
                    else kept = (int)cut + 1;
                }
                if (ok) {
                    path = PATH_LIST;
                    if (kept == 1) {
                        token = (int)~(uint32_t)sm.list[0];
                        goto done;
                    }
                    // re-sort the kept entries by id: (id << 32 | key), ascending
                    const int P2 = pow2_at_least(kept);
                    for (int q = tid; q < P2; q += ST) {
                        const unsigned long long e = sm.list[q];
                        sm.list[q] = q < kept ? ((unsigned long long)(uint32_t)~(uint32_t)e << 32) |
                                                    (e >> 32)
                                              : ~0ull;
                    }
                    __syncthreads();
                    bitonic(sm.list, P2, false);
                    const int q = inverse_cdf(
                        kept, [&](int i) { return weight(okey_float((uint32_t)sm.list[i])); }, u,
                        sm);
                    token = q >= 0 ? (int)(sm.list[q] >> 32) : 0;
                    goto done;
                }
            }
        }

        // ---- path 4: generic, thresholds by a radix search over the order keys -------------
        // The threshold lies in [lo, hi); each pass cuts it into SPLIT parts of 2^sh keys
        // (part b = (key - lo) >> sh) and sums, per thread in id order, the counts (top-k) or
        // weights (top-p) of the keys in [lo, hi) above each cut; one block reduction of those
        // sums (block_sums) picks the part holding the threshold, and `above` carries what
        // lies at or above hi. At most 11 passes for 32-bit keys, each computing the weights
        // of the keys still in range only (the bisection before took 32 passes over every
        // weight: ~400 us a top-p draw of a 50K row on the H200). The result is the
        // bisection's, the largest t with the count / mass at or above t >= the target (the
        // masses are float64 sums in another order: within their rounding).
        path = PATH_GENERIC;
        constexpr int SPLIT = 8;
        // the shift that cuts [lo, lo + len) into at most SPLIT parts of 2^sh keys
        auto shift_for = [](uint32_t len) {
            const int bits = 32 - __clz(len - 1);   // len >= 2
            return bits > 3 ? bits - 3 : 0;
        };
        uint32_t kth = 0;   // keep key >= kth
        // no key lies above the max's: the search starts below okey(vmax) + 1 (<= 0xff800001)
        const uint32_t top = okey(vmax) + 1;
        if (use_k) {
            // the largest t with #(key >= t) >= K: invariant #(key >= lo) >= K > #(key >= hi)
            uint32_t lo = 0, hi = top;
            long long above = 0;   // #(key >= hi)
            while (hi - lo > 1) {
                const uint32_t len = hi - lo;
                const int sh = shift_for(len);
                long long c[SPLIT - 1], tot[SPLIT - 1];
#pragma unroll
                for (int q = 0; q < SPLIT - 1; q++) c[q] = 0;
                for (int i = tid; i < n; i += ST) {
                    const uint32_t d = okey(ld(i)) - lo;   // keys below lo wrap past len
                    if (d >= len) continue;
                    const uint32_t b = d >> sh;
#pragma unroll
                    for (int q = 0; q < SPLIT - 1; q++) c[q] += b > (uint32_t)q;
                }
                block_sums(c, reinterpret_cast<long long *>(sm.list), tot);
                int jj = -1;   // the last cut whose count at or above reaches K
#pragma unroll
                for (int q = 0; q < SPLIT - 1; q++)
                    if (above + tot[q] >= K) jj = q;
                // cuts past hi hold nothing (tot 0): they never pass, and hi stays
                if (jj + 1 < SPLIT - 1 && ((uint64_t)(jj + 2) << sh) < len) {
                    hi = lo + ((uint32_t)(jj + 2) << sh);
                    above += tot[jj + 1];
                }
                if (jj >= 0) lo += (uint32_t)(jj + 1) << sh;
            }
            kth = lo;
        }
        uint32_t pt = 0;        // top-p: keep key > pt, and key == pt with id <= pcut
        int pcut = n;
        if (use_p) {
            // the largest t with mass(key >= t) >= target = top_p * (the kept mass, keys >=
            // kth): invariant mass(key >= lo) >= target > mass(key >= hi) = above. The first
            // pass's range holds every kept key, so its in-range total (s[SPLIT - 1]) is the
            // kept mass; where no pass runs (kth is the max's key), a pass of its own sums it.
            uint32_t lo = kth, hi = top;
            double above = 0.0, target = -1.0;
            if (hi - lo <= 1) {
                double z = 0.0;
                for (int i = tid; i < n; i += ST) {
                    const float v = ld(i);
                    if (okey(v) >= kth) z += (double)weight(v);
                }
                target = a.top_p * block_sum_d(z, sm);
            }
            while (hi - lo > 1) {
                const uint32_t len = hi - lo;
                const int sh = shift_for(len);
                double s[SPLIT], tot[SPLIT];
#pragma unroll
                for (int q = 0; q < SPLIT; q++) s[q] = 0.0;
                for (int i = tid; i < n; i += ST) {
                    const float v = ld(i);
                    const uint32_t d = okey(v) - lo;
                    if (d >= len) continue;
                    const uint32_t b = d >> sh;
                    const double w = (double)weight(v);
                    s[SPLIT - 1] += w;
#pragma unroll
                    for (int q = 0; q < SPLIT - 1; q++)
                        if (b > (uint32_t)q) s[q] += w;
                }
                block_sums(s, reinterpret_cast<double *>(sm.list), tot);
                if (target < 0.0) target = a.top_p * tot[SPLIT - 1];
                int jj = -1;
#pragma unroll
                for (int q = 0; q < SPLIT - 1; q++)
                    if (above + tot[q] >= target) jj = q;
                if (jj + 1 < SPLIT - 1 && ((uint64_t)(jj + 2) << sh) < len) {
                    hi = lo + ((uint32_t)(jj + 2) << sh);
                    above += tot[jj + 1];
                }
                if (jj >= 0) lo += (uint32_t)(jj + 1) << sh;
            }
            pt = lo;
            const double wt = (double)weight(okey_float(pt));
            // ties at pt (same logit, same weight): the first m of them by id
            const int c = (n + ST - 1) / ST;
            const int lo_i = min(n, tid * c), hi_i = min(n, lo_i + c);
            long long loc = 0;
            for (int i = lo_i; i < hi_i; i++) loc += okey(ld(i)) == pt;
            long long ties;
            const long long start = block_exscan(loc, sm.i, &ties);
            long long m = ties;
            if (wt > 0.0) {
                const double need = ceil((target - above) / wt);
                m = need < 1.0 ? 1 : need > (double)ties ? ties : (long long)need;
            }
            if (m < ties) {
                if (start < m && m <= start + loc) {   // the owner of the m-th tie
                    long long seen = start;
                    for (int i = lo_i; i < hi_i; i++)
                        if (okey(ld(i)) == pt && ++seen == m) { sm.res = i; break; }
                }
                __syncthreads();
                pcut = sm.res;
                __syncthreads();
            }
        }
        const int q = inverse_cdf(
            n,
            [&](int i) {
                const float v = ld(i);
                const uint32_t k = okey(v);
                const bool keep = k >= kth && (k > pt || (k == pt && i <= pcut));
                return keep ? weight(v) : 0.f;
            },
            u, sm);
        token = q >= 0 ? q : 0;
    }
done:
    if (tid == 0) {
        a.tokens[row] = token;
        if (a.status)
            a.status[row] = (a.status[row] & 0xff) | err | (path << 8) | ((int)CACHED << 16);
        if (a.u_out) a.u_out[row] = u;
    }
}

// ---- the cluster kernel: CG CTAs a row (B <= SC_MAX_ROWS) -------------------------------------
// sample_kernel runs a row on one SM: at batch 1 its passes (a top-p draw's ~14) run one after
// another there while the other SMs idle. sample_cluster_kernel shares a row among a cluster
// of CG CTAs: thread t of CTA r owns the c contiguous ids from (r * CT + t) * c (c = ceil(n /
// (CG * CT))), which CTA r caches in shared memory, and every reduction is the warps' (lane
// shuffles), the CTA's (warps in order) and the cluster's (CTAs in rank order, over
// distributed shared memory): deterministic. Paths: greedy, direct and generic with
// sample_kernel's arithmetic; no list path (its sort on one SM is slower than the generic
// passes spread over the cluster). The results obey the same twin tolerance; the masses are
// summed in another order than sample_kernel's, so a draw within float64 rounding of a
// boundary may differ between the two kernels.
namespace cgr = cooperative_groups;
constexpr int CG = 8;                 // CTAs a row: the portable cluster size
constexpr int CT = 512;               // threads a CTA
constexpr int CNW = CT / 32;
constexpr int SC_MAX_ROWS = 16;       // rows: CG * 16 = 128 CTAs, one wave
constexpr int SC_MAX_C = 24;          // ids a thread: n <= 98,304, 48 KB a CTA

struct CSmem {
    unsigned long long w[CNW * 8];    // warp partials (8-byte values, up to 8 a warp)
    unsigned long long pub[8];        // this CTA's partials, read by the cluster
    unsigned long long res[8];        // the cluster's results
};

__device__ __forceinline__ void csync() {
#if __CUDA_ARCH__ >= 900
    cgr::this_cluster().sync();
#else
    __syncthreads();
#endif
}
template <typename T>
__device__ __forceinline__ const T *cremote(const T *p, int rank) {
#if __CUDA_ARCH__ >= 900
    return cgr::this_cluster().map_shared_rank(p, rank);
#else
    return p;
#endif
}

// N 8-byte values reduced over the cluster (OP 0: sum, 1: max); every thread gets them.
template <int OP, int N, typename T>
__device__ void creduce(const T (&v)[N], CSmem &sm, T (&out)[N]) {
    static_assert(sizeof(T) == 8 && N <= 8, "up to 8 values of 8 bytes");
    T *w = reinterpret_cast<T *>(sm.w), *pub = reinterpret_cast<T *>(sm.pub);
    T *res = reinterpret_cast<T *>(sm.res);
    auto op = [](T a, T b) { return OP ? (a > b ? a : b) : a + b; };
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int j = 0; j < N; j++) {
        T x = v[j];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) x = op(x, __shfl_xor_sync(0xffffffffu, x, o));
        if (lane == 0) w[warp * N + j] = x;
    }
    __syncthreads();
    if (threadIdx.x < N) {
        T t = w[threadIdx.x];
        for (int q = 1; q < CNW; q++) t = op(t, w[q * N + threadIdx.x]);
        pub[threadIdx.x] = t;
    }
    csync();
    if (threadIdx.x < N) {
        T t = cremote(pub, 0)[threadIdx.x];
        for (int r = 1; r < CG; r++) t = op(t, cremote(pub, r)[threadIdx.x]);
        res[threadIdx.x] = t;
    }
    csync();   // every CTA has read every pub; res is visible
#pragma unroll
    for (int j = 0; j < N; j++) out[j] = res[j];
}
template <int OP, typename T>
__device__ T creduce1(T v, CSmem &sm) {
    const T in[1] = {v};
    T out[1];
    creduce<OP, 1>(in, sm, out);
    return out[0];
}

// Exclusive prefix of v over the cluster's threads in (rank, thread) order; *total the sum.
template <typename T>
__device__ T cscan(T v, int rank, CSmem &sm, T *total) {
    static_assert(sizeof(T) == 8, "8-byte values");
    T *w = reinterpret_cast<T *>(sm.w), *pub = reinterpret_cast<T *>(sm.pub);
    T *res = reinterpret_cast<T *>(sm.res);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    T x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const T y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    T ex = __shfl_up_sync(0xffffffffu, x, 1);
    if (lane == 0) ex = T(0);
    if (lane == 31) w[warp] = x;
    __syncthreads();
    if (threadIdx.x == 0) {
        T t = T(0);
        for (int q = 0; q < CNW; q++) {   // exclusive over warps, in place
            const T y = w[q];
            w[q] = t;
            t += y;
        }
        pub[0] = t;
    }
    csync();
    if (threadIdx.x == 0) {
        T before = T(0), all = T(0);
        for (int r = 0; r < CG; r++) {
            const T y = cremote(pub, r)[0];
            if (r < rank) before += y;
            all += y;
        }
        res[0] = before;
        res[1] = all;
    }
    csync();
    *total = res[1];
    return res[0] + w[warp] + ex;
}

// The inverse CDF over the ids [0, n) of the row (the cluster's contiguous ranges [lo, hi) a
// thread): sample_kernel's inverse_cdf across the cluster. Returns the id (every thread), -1
// where every weight is 0.
template <typename WF>
__device__ int cinverse_cdf(int lo, int hi, WF w, double u, int rank, CSmem &sm) {
    double loc = 0.0;
    for (int i = lo; i < hi; i++) loc += (double)w(i);
    double tot;
    const double start = cscan(loc, rank, sm, &tot);
    const double target = u * tot;
    const long long g = (long long)rank * CT + threadIdx.x;
    const long long owner = creduce1<1>(loc > 0.0 && start <= target ? g : -1LL, sm);
    if (owner < 0) return -1;
    long long pick = -1;
    if (g == owner) {
        double acc = start;
        int last = -1;
        for (int i = lo; i < hi; i++) {
            const float wi = w(i);
            if (wi > 0.f) {
                last = i;
                acc += (double)wi;
                if (acc > target) {
                    pick = i;
                    break;
                }
            }
        }
        if (pick < 0) pick = last;
    }
    return (int)creduce1<1>(pick, sm);
}

__global__ __launch_bounds__(CT) void sample_cluster_kernel(SampleArgs a, int c) {
    __shared__ CSmem sm;
    extern __shared__ float4 ccache4[];   // (CT * c) floats: this CTA's ids
    float *cache = reinterpret_cast<float *>(ccache4);
#if __CUDA_ARCH__ >= 900
    const int rank = (int)cgr::this_cluster().block_rank();
#else
    const int rank = 0;
#endif
    const int row = blockIdx.y, tid = threadIdx.x, n = a.n;
    const float *p = a.logits + (int64_t)row * a.V;
    const int base = rank * CT * c;                    // this CTA's first id
    const int cnt = max(0, min(n, base + CT * c) - base);
    for (int i = tid; i < cnt; i += CT) cache[i] = __ldg(p + base + i);
    __syncthreads();
    // this thread's ids [lo, hi), read through ld(i)
    const int lo = min(n, base + tid * c), hi = min(n, lo + c);
    auto ld = [&](int i) { return cache[i - base]; };

    // ---- pass 1: max, first argmax, NaN and +inf counts ----------------------------------
    float best = -INFINITY;
    int bi = n;
    long long nan = 0, pinf = 0;
    for (int i = lo; i < hi; i++) {
        const float v = ld(i);
        if (v != v) nan++;
        else {
            if (v == INFINITY) pinf++;
            if (v > best) { best = v; bi = i; }
        }
    }
    const unsigned long long key =
        bi < n ? ((unsigned long long)okey(best) << 32) | (0x7fffffffu - (uint32_t)bi) : 0ull;
    const unsigned long long packed = creduce1<1>(key, sm);
    const long long nan_pinf = creduce1<0>((nan << 32) + pinf, sm);
    const int any_nan = (int)(nan_pinf >> 32) > 0;
    const long long npinf = nan_pinf & 0xffffffffLL;
    const float vmax = packed ? okey_float((uint32_t)(packed >> 32)) : -INFINITY;
    const int amax = packed ? (int)(0x7fffffffu - (uint32_t)(packed & 0xffffffffu)) : 0;
    const double u = philox_uniform(a.seed, a.step, a.row_streams ? (uint32_t)row : 0u);

    int err = 0, path = PATH_GREEDY, token = 0;
    if (any_nan) err = BM_CUDA_SAMPLE_NAN;
    else if (vmax == -INFINITY) err = BM_CUDA_SAMPLE_NEG_INF;
    if (err || a.T == 0.f) {
        token = err ? 0 : amax;
    } else {
        const bool posinf = npinf > 0;
        const float T = a.T;
        auto weight = [&](float v) -> float {
            if (posinf) return v == INFINITY ? 1.f : 0.f;
            return expf(-__fdiv_rn(vmax - v, T));
        };
        const bool use_k = a.top_k > 0 && a.top_k < n;
        const bool use_p = a.top_p < 1.0;
        if (!use_k && !use_p) {
            path = PATH_DIRECT;
            const int q = cinverse_cdf(lo, hi, [&](int i) { return weight(ld(i)); }, u, rank, sm);
            token = q >= 0 ? q : 0;
        } else {
            // sample_kernel's generic path (the radix search; see there)
            path = PATH_GENERIC;
            constexpr int SPLIT = 8;
            auto shift_for = [](uint32_t len) {
                const int bits = 32 - __clz(len - 1);
                return bits > 3 ? bits - 3 : 0;
            };
            const long long K = a.top_k;
            uint32_t kth = 0;
            const uint32_t top = okey(vmax) + 1;
            if (use_k) {
                uint32_t klo = 0, khi = top;
                long long above = 0;
                while (khi - klo > 1) {
                    const uint32_t len = khi - klo;
                    const int sh = shift_for(len);
                    long long cc[SPLIT - 1], tot[SPLIT - 1];
#pragma unroll
                    for (int q = 0; q < SPLIT - 1; q++) cc[q] = 0;
                    for (int i = lo; i < hi; i++) {
                        const uint32_t d = okey(ld(i)) - klo;   // keys below klo wrap past len
                        if (d >= len) continue;
                        const uint32_t b = d >> sh;
#pragma unroll
                        for (int q = 0; q < SPLIT - 1; q++) cc[q] += b > (uint32_t)q;
                    }
                    creduce<0>(cc, sm, tot);
                    int jj = -1;
#pragma unroll
                    for (int q = 0; q < SPLIT - 1; q++)
                        if (above + tot[q] >= K) jj = q;
                    if (jj + 1 < SPLIT - 1 && ((uint64_t)(jj + 2) << sh) < len) {
                        khi = klo + ((uint32_t)(jj + 2) << sh);
                        above += tot[jj + 1];
                    }
                    if (jj >= 0) klo += (uint32_t)(jj + 1) << sh;
                }
                kth = klo;
            }
            uint32_t pt = 0;
            int pcut = n;
            if (use_p) {
                uint32_t plo = kth, phi = top;
                double above = 0.0, target = -1.0;
                if (phi - plo <= 1) {
                    double z = 0.0;
                    for (int i = lo; i < hi; i++) {
                        const float v = ld(i);
                        if (okey(v) >= kth) z += (double)weight(v);
                    }
                    target = a.top_p * creduce1<0>(z, sm);
                }
                while (phi - plo > 1) {
                    const uint32_t len = phi - plo;
                    const int sh = shift_for(len);
                    double sv[SPLIT], tot[SPLIT];
#pragma unroll
                    for (int q = 0; q < SPLIT; q++) sv[q] = 0.0;
                    for (int i = lo; i < hi; i++) {
                        const float v = ld(i);
                        const uint32_t d = okey(v) - plo;
                        if (d >= len) continue;
                        const uint32_t b = d >> sh;
                        const double wv = (double)weight(v);
                        sv[SPLIT - 1] += wv;
#pragma unroll
                        for (int q = 0; q < SPLIT - 1; q++)
                            if (b > (uint32_t)q) sv[q] += wv;
                    }
                    creduce<0>(sv, sm, tot);
                    if (target < 0.0) target = a.top_p * tot[SPLIT - 1];
                    int jj = -1;
#pragma unroll
                    for (int q = 0; q < SPLIT - 1; q++)
                        if (above + tot[q] >= target) jj = q;
                    if (jj + 1 < SPLIT - 1 && ((uint64_t)(jj + 2) << sh) < len) {
                        phi = plo + ((uint32_t)(jj + 2) << sh);
                        above += tot[jj + 1];
                    }
                    if (jj >= 0) plo += (uint32_t)(jj + 1) << sh;
                }
                pt = plo;
                const double wt = (double)weight(okey_float(pt));
                // ties at pt: the first m of them by id
                long long loc = 0;
                for (int i = lo; i < hi; i++) loc += okey(ld(i)) == pt;
                long long ties;
                const long long start = cscan(loc, rank, sm, &ties);
                long long m = ties;
                if (wt > 0.0) {
                    const double need = ceil((target - above) / wt);
                    m = need < 1.0 ? 1 : need > (double)ties ? ties : (long long)need;
                }
                if (m < ties) {
                    long long id = -1;
                    if (start < m && m <= start + loc) {   // the owner of the m-th tie
                        long long seen = start;
                        for (int i = lo; i < hi; i++)
                            if (okey(ld(i)) == pt && ++seen == m) { id = i; break; }
                    }
                    pcut = (int)creduce1<1>(id, sm);
                }
            }
            const int q = cinverse_cdf(
                lo, hi,
                [&](int i) {
                    const float v = ld(i);
                    const uint32_t k = okey(v);
                    const bool keep = k >= kth && (k > pt || (k == pt && i <= pcut));
                    return keep ? weight(v) : 0.f;
                },
                u, rank, sm);
            token = q >= 0 ? q : 0;
        }
    }
    if (rank == 0 && tid == 0) {
        a.tokens[row] = token;
        if (a.status)
            a.status[row] = (a.status[row] & 0xff) | err | (path << 8) | (1 << 16) | (1 << 17);
        if (a.u_out) a.u_out[row] = u;
    }
}

// The largest dynamic shared memory of sample_kernel<true> on the current device (its opt-in
// limit less its static shared memory), raised to that once per device (bm_smem_optin).
std::atomic<unsigned> g_optin_done{0};
int g_max_dyn[32];

int cached_smem_limit(int *out) {
    int dev = 0, optin = 0;
    BM_CUDA_TRY(cudaGetDevice(&dev));
    const unsigned bit = 1u << (dev & 31);
    if (g_optin_done.load(std::memory_order_acquire) & bit) {
        *out = g_max_dyn[dev & 31];
        return 0;
    }
    BM_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    cudaFuncAttributes fa;
    BM_CUDA_TRY(cudaFuncGetAttributes(&fa, sample_kernel<true>));
    const int lim = optin - (int)fa.sharedSizeBytes;
    BM_CUDA_TRY(cudaFuncSetAttribute(sample_kernel<true>,
                                     cudaFuncAttributeMaxDynamicSharedMemorySize, lim));
    g_max_dyn[dev & 31] = lim;   // written before the bit is published
    g_optin_done.fetch_or(bit, std::memory_order_release);
    *out = lim;
    return 0;
}

// Thread block clusters on the current device (compute capability >= 9), cached per device.
bool cluster_ok() {
    static std::atomic<int> ok[32];   // 0 unknown, 1 yes, 2 no
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    int v = ok[dev & 31].load(std::memory_order_relaxed);
    if (!v) {
        int major = 0;
        if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
            cudaGetLastError();
            major = 0;
        }
        v = major >= 9 ? 1 : 2;
        ok[dev & 31].store(v, std::memory_order_relaxed);
    }
    return v == 1;
}

}  // namespace

extern "C" int bm_cuda_sample(const float *logits, int64_t B, int64_t V, int64_t vocab_limit,
                              const bm_cuda_sampling *sp, int32_t *tokens, int32_t *status,
                              double *u_out, cudaStream_t stream) {
    if (!sp) return BM_CUDA_ARG_FAIL("sample: no sampling parameters");
    if (B < 0 || B > INT32_MAX) return BM_CUDA_ARG_FAIL("sample: B must be in [0, 2**31)");
    if (vocab_limit < 1 || vocab_limit > V || vocab_limit > INT32_MAX - ST)
        return BM_CUDA_ARG_FAIL("sample: vocab_limit must be in [1, V] (and below 2**31)");
    if (!(sp->temperature >= 0.f) || isinf(sp->temperature))
        return BM_CUDA_ARG_FAIL("sample: temperature must be a finite number >= 0");
    if (sp->top_k < 0) return BM_CUDA_ARG_FAIL("sample: top_k must be >= 0 (0: off)");
    if (!(sp->top_p > 0.0 && sp->top_p <= 1.0))
        return BM_CUDA_ARG_FAIL("sample: top_p must be in (0, 1] (1: off)");
    if (B == 0) return 0;
    SampleArgs a;
    a.logits = logits;
    a.V = V;
    a.n = (int)vocab_limit;
    a.T = sp->temperature;
    a.top_k = sp->top_k >= vocab_limit ? 0 : (int)sp->top_k;
    a.top_p = sp->top_p;
    a.seed = sp->seed;
    a.step = sp->step;
    a.row_streams = sp->row_streams;
    a.force_generic = sp->path & 1;
    a.tokens = tokens;
    a.status = status;
    a.u_out = u_out;
    // small batches: a cluster of CG CTAs a row (sample_cluster_kernel), unless a test asks
    // for the one-block kernel (path | 4) or its uncached form (path | 2), or a top-k of at
    // most SAMPLE_LIST: there the one-block kernel's list path is as fast alone and faster
    // with a top-p (H200, B = 1, V = 50,304: top_k 50 39-42 us against 38-44, with top_p 0.9
    // 41-43 against 64-71; cuda/NOTES.md session 26)
    const int64_t c = bm_cdiv(vocab_limit, (int64_t)CG * CT);
    const bool list_k = a.top_k > 0 && a.top_k <= SAMPLE_LIST;
    if (B <= SC_MAX_ROWS && c <= SC_MAX_C && !list_k && !(sp->path & 6) && cluster_ok()) {
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = dim3(CG, (unsigned)B);
        cfg.blockDim = dim3(CT);
        cfg.dynamicSmemBytes = (size_t)(CT * c) * 4;
        cfg.stream = stream;
        cudaLaunchAttribute attr[1];
        attr[0].id = cudaLaunchAttributeClusterDimension;
        attr[0].val.clusterDim.x = CG;
        attr[0].val.clusterDim.y = 1;
        attr[0].val.clusterDim.z = 1;
        cfg.attrs = attr;
        cfg.numAttrs = 1;
        BM_CUDA_TRY(cudaLaunchKernelEx(&cfg, sample_cluster_kernel, a, (int)c));
        return 0;
    }
    int max_dyn = 0;   // dynamic shared memory the cached kernel may take on this device
    if (int rc = cached_smem_limit(&max_dyn)) return rc;
    if (!(sp->path & 2) && (int64_t)vocab_limit * 4 <= max_dyn)
        sample_kernel<true><<<(unsigned)B, ST, (size_t)vocab_limit * 4, stream>>>(a);
    else
        sample_kernel<false><<<(unsigned)B, ST, 0, stream>>>(a);
    BM_CUDA_LAUNCHED();
    return 0;
}
