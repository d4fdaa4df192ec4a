// moe_dispatch.cuh: the MoE dispatch (SPEC 3: tokens grouped by expert) done by the LAST block
// of a launch that wrote the ids, instead of a kernel of its own (moe.cu's dispatch_kernel).
// Included by engine.cu (norm_route_kernel's batched-decode form: the routing's last block
// builds perm / offsets, one launch fewer a MoE layer) and moe.cu (bm_cuda_moe_dispatch under
// BLACKMAMBA_MOE_DISPATCH_LAST=1: the same code on arbitrary ids, for the tests).
//
// The result is dispatch_kernel's: offsets (X+1) exclusive prefix sums of the per-expert
// counts, perm (T) the tokens of expert 0 in increasing order, then expert 1's, ...; ids
// outside [0, X) are counted nowhere (perm then has offsets[X] < T valid entries).
#pragma once

#include "common.cuh"

// Is this block the last of the launch to get here? Every thread of the block must call it,
// after the block's own global writes that the last block will read (the ids). The usual
// last-block pattern: each block's writes, a fence, then one atomic ticket; the block that
// draws gridDim - 1 knows every other block's writes were fenced before their tickets, and
// fences again before reading them. atomicInc wraps to 0 after gridDim - 1, so the counter is
// 0 again after every launch (self-resetting: it must be 0 before the first one, and launches
// sharing it must not overlap: a stream's kernels, each finished before the next one's blocks
// get here, which the PDL wait at their start ensures).
__device__ __forceinline__ bool bm_last_block(unsigned *ticket) {
    __shared__ bool last;
    __syncthreads();  // every thread's writes of this block issued
    if (threadIdx.x == 0) {
        __threadfence();
        const unsigned n = gridDim.x * gridDim.y * gridDim.z;
        last = atomicInc(ticket, n - 1) == n - 1;
    }
    __syncthreads();
    if (last) __threadfence();
    return last;
}

// Bytes of shared memory bm_dispatch_block needs for X experts and NW warps a block.
__host__ __device__ constexpr int bm_dispatch_smem_ints(int X, int NW) { return (NW + 2) * X; }

// perm / offsets from ids (T), by one whole block (every thread calls it; blockDim a multiple
// of 32, NW = blockDim / 32 warps); `s` holds bm_dispatch_smem_ints(X, NW) ints of shared
// memory. The ids are read from L2 (__ldcg): other blocks of the launch wrote them, and this
// SM's L1 may hold lines of the buffer from an earlier kernel.
// Pass 1 counts per expert (shared atomics), thread 0 scans the counts into offsets. Pass 2
// walks the tokens in rounds of blockDim, token m0 + tid on thread tid: its rank among the
// equal ids of its warp by __match_any_sync, plus the counts of the same id in the warps
// before it in this round, plus the running start of the id (cur) over earlier rounds: so
// the tokens of one expert land in increasing order, as dispatch_kernel's.
__device__ __forceinline__ void bm_dispatch_block(const int32_t *ids, int T, int X,
                                                  int32_t *offsets,  // (X+1)
                                                  int32_t *perm,     // (T)
                                                  int *s) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, NW = blockDim.x >> 5;
    int *cnt = s;           // (X): counts, then the running first slot of each expert
    int *wc = s + X;        // (NW, X): this round's count of each expert in each warp
    for (int i = tid; i < X + NW * X; i += blockDim.x) s[i] = 0;
    __syncthreads();
    for (int m = tid; m < T; m += blockDim.x) {
        const int id = __ldcg(ids + m);
        if (id >= 0 && id < X) atomicAdd(&cnt[id], 1);
    }
    __syncthreads();
    if (tid == 0) {
        int run = 0;
        for (int e = 0; e < X; e++) {
            const int c = cnt[e];
            cnt[e] = run;
            offsets[e] = run;
            run += c;
        }
        offsets[X] = run;
    }
    __syncthreads();
    for (int m0 = 0; m0 < T; m0 += blockDim.x) {
        const int m = m0 + tid;
        const int id = m < T ? __ldcg(ids + m) : -1;
        const bool ok = id >= 0 && id < X;
        const int key = ok ? id : -1 - lane;  // lanes without a valid id group with nobody
        const unsigned peers = __match_any_sync(0xffffffffu, key);
        const int rank = __popc(peers & ((1u << lane) - 1u));
        if (ok && lane == 31 - __clz(peers)) wc[warp * X + id] = __popc(peers);  // last peer
        __syncthreads();
        if (ok) {
            int base = cnt[id] + rank;
            for (int w = 0; w < warp; w++) base += wc[w * X + id];
            perm[base] = m;
        }
        __syncthreads();  // every thread has read cnt and wc
        for (int e = tid; e < X; e += blockDim.x) {
            int add = 0;
            for (int w = 0; w < NW; w++) {
                add += wc[w * X + e];
                wc[w * X + e] = 0;
            }
            cnt[e] += add;
        }
        __syncthreads();
    }
}
