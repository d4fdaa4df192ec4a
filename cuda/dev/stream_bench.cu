// How fast can one kernel stream weights from HBM, by the way it loads them? (dev only; not
// part of the package). Standalone: nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/sb
// cuda/dev/stream_bench.cu && /tmp/sb
//
// Questions (cuda/NOTES.md, session 7):
//  1. the chip's read roofline (grid-stride 16-byte loads, many CTAs);
//  2. a persistent kernel (one CTA an SM, its contiguous slice): register loads, cp.async
//     (LDGSTS) rings, and one producer thread's cp.async.bulk (TMA, 1-D) ring with
//     mbarriers, by stage count and chunk size: session 3's `mega` saw ~7 GB/s an SM from
//     its bulk-copy stream and could not tell why;
//  3. the batched-decode fc1 tile pattern (grouped.cu: 64 weight rows of 2944 bytes a CTA,
//     128 bytes of each row a k tile, cp.async, 4 stages, 4 CTAs an SM) against the same
//     bytes laid out tile-major (each stage one contiguous 8 KB).
// Each line: GB/s of bytes read, median of 15 timed launches after 3, CUDA events.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "dev_check.cuh"

__device__ uint32_t g_sink;

__device__ __forceinline__ uint32_t fold(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }
__device__ __forceinline__ uint32_t smem_u32(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

// ---- 1. grid-stride register loads ----------------------------------------------------------
template <int UNR>
__global__ void read_kernel(const uint4 *__restrict__ p, size_t n16) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    uint32_t acc = 0;
    for (; i + (UNR - 1) * stride < n16; i += UNR * stride) {
        uint4 v[UNR];
#pragma unroll
        for (int u = 0; u < UNR; u++) v[u] = __ldcs(p + i + u * stride);
#pragma unroll
        for (int u = 0; u < UNR; u++) acc ^= fold(v[u]);
    }
    for (; i < n16; i += stride) acc ^= fold(__ldcs(p + i));
    if (acc == 0x9e3779b9u) g_sink = acc;
}

// ---- 2a. persistent, contiguous slice a CTA, register loads -------------------------------
template <int UNR>
__global__ void slice_reg_kernel(const uint4 *__restrict__ p, size_t n16) {
    const size_t per = n16 / gridDim.x;  // (n16 divisible in the runs below)
    const uint4 *q = p + blockIdx.x * per;
    uint32_t acc = 0;
    for (size_t i = threadIdx.x; i < per; i += UNR * blockDim.x) {
        uint4 v[UNR];
#pragma unroll
        for (int u = 0; u < UNR; u++) {
            const size_t j = i + u * blockDim.x;
            v[u] = j < per ? __ldcs(q + j) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < UNR; u++) acc ^= fold(v[u]);
    }
    if (acc == 0x9e3779b9u) g_sink = acc;
}

// ---- 2b. persistent, cp.async ring (every thread loads and consumes) ----------------------
__device__ __forceinline__ void cp16(uint32_t dst, const void *src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <int S>
__global__ void slice_cpasync_kernel(const uint4 *__restrict__ p, size_t n16, int chunk16) {
    extern __shared__ uint4 sm[];
    const size_t per = n16 / gridDim.x;
    const uint4 *q = p + blockIdx.x * per;
    const int nch = (int)(per / chunk16);
    uint32_t acc = 0;
    auto issue = [&](int c) {
        if (c < nch) {
            uint4 *dst = sm + (c % S) * chunk16;
            for (int j = threadIdx.x; j < chunk16; j += blockDim.x)
                cp16(smem_u32(dst + j), q + (size_t)c * chunk16 + j);
        }
        cp_commit();
    };
    for (int c = 0; c < S - 1; c++) issue(c);
    for (int c = 0; c < nch; c++) {
        cp_wait<S - 2>();
        __syncthreads();
        const uint4 *src = sm + (c % S) * chunk16;
        for (int j = threadIdx.x; j < chunk16; j += blockDim.x) acc ^= fold(src[j]);
        issue(c + S - 1);  // into the slot consumed at c - 1 (all threads passed the barrier)
    }
    cp_wait<0>();
    if (acc == 0x9e3779b9u) g_sink = acc;
}

// ---- 2c. persistent, one producer thread's bulk copies (TMA 1-D) into an mbarrier ring ----
__device__ __forceinline__ void mbar_init(uint64_t *b, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(b)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t *b, uint32_t bytes) {
    asm volatile(
        "{\n .reg .b64 st;\n mbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(
            smem_u32(b)),
        "r"(bytes));
}
__device__ __forceinline__ void mbar_arrive(uint64_t *b) {
    asm volatile("{\n .reg .b64 st;\n mbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(
        smem_u32(b)));
}
__device__ __forceinline__ void mbar_wait(uint64_t *b, uint32_t parity) {
    asm volatile(
        "{\n .reg .pred P;\n WAIT_%=:\n"
        " mbarrier.try_wait.parity.shared::cta.b64 P, [%0], %1;\n"
        " @!P bra WAIT_%=;\n}\n" ::"r"(smem_u32(b)),
        "r"(parity));
}
// Thread 0 sets up a ring's S full (one arrival: the producer's expect_tx) and S empty (NC
// arrivals: the consumer warps) mbarriers; the whole CTA waits for it.
__device__ __forceinline__ void ring_init(uint64_t *full, uint64_t *empty, int S, int NC) {
    if (threadIdx.x == 0) {
        for (int s = 0; s < S; s++) {
            mbar_init(full + s, 1);
            mbar_init(empty + s, NC);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
}
__device__ __forceinline__ void bulk_g2s(void *dst, const void *src, uint32_t bytes,
                                         uint64_t *bar) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, "
        "[%3];\n" ::"r"(smem_u32(dst)),
        "l"(src), "r"(bytes), "r"(smem_u32(bar))
        : "memory");
}

// Warps 0..NC-1 consume, warp NC's lane 0 produces. piece: bytes a bulk copy (chunk split).
template <int S>
__global__ void slice_bulk_kernel(const uint4 *__restrict__ p, size_t n16, int chunk16,
                                  int piece16) {
    extern __shared__ __align__(128) unsigned char smraw[];
    uint64_t *full = (uint64_t *)smraw, *empty = full + S;
    uint4 *ring = (uint4 *)(smraw + 128);
    const int NC = blockDim.x / 32 - 1, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const size_t per = n16 / gridDim.x;
    const uint4 *q = p + blockIdx.x * per;
    const int nch = (int)(per / chunk16);
    ring_init(full, empty, S, NC);
    uint32_t acc = 0;
    if (warp == NC) {
        if (lane == 0) {
            for (int c = 0; c < nch; c++) {
                const int s = c % S;
                if (c >= S) mbar_wait(empty + s, ((c / S) - 1) & 1);
                mbar_expect_tx(full + s, (uint32_t)chunk16 * 16);
                for (int o = 0; o < chunk16; o += piece16)
                    bulk_g2s(ring + s * chunk16 + o, q + (size_t)c * chunk16 + o,
                             (uint32_t)min(piece16, chunk16 - o) * 16, full + s);
            }
        }
    } else {
        for (int c = 0; c < nch; c++) {
            const int s = c % S;
            mbar_wait(full + s, (c / S) & 1);
            const uint4 *src = ring + s * chunk16;
            for (int j = warp * 32 + lane; j < chunk16; j += NC * 32) acc ^= fold(src[j]);
            __syncwarp();
            if (lane == 0) mbar_arrive(empty + s);
        }
    }
    if (acc == 0x9e3779b9u) g_sink = acc;
}

// ---- 2d. the fc1 stream's ring: per chunk `nrows` bulk copies of `rowb` bytes (contiguous in
// global memory), `rs` bytes apart in shared memory; 8 consumer warps wait and release
template <int S>
__global__ void rows_bulk_kernel(const unsigned char *__restrict__ p, size_t bytes, int nrows,
                                 int rowb, int rs) {
    extern __shared__ __align__(128) unsigned char smraw[];
    uint64_t *full = (uint64_t *)smraw, *empty = full + S;
    unsigned char *ring = smraw + 128;
    const int NC = blockDim.x / 32 - 1, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const size_t chunk = (size_t)nrows * rowb;
    const size_t nch_all = bytes / chunk;
    const size_t c0 = nch_all * blockIdx.x / gridDim.x, c1 = nch_all * (blockIdx.x + 1) / gridDim.x;
    const int nch = (int)(c1 - c0);
    ring_init(full, empty, S, NC);
    if (warp == NC) {
        if (lane == 0) {
            for (int c = 0; c < nch; c++) {
                const int s = c % S;
                if (c >= S) mbar_wait(empty + s, ((c / S) - 1) & 1);
                mbar_expect_tx(full + s, (uint32_t)chunk);
                const unsigned char *src = p + (c0 + c) * chunk;
                for (int r = 0; r < nrows; r++)
                    bulk_g2s(ring + (size_t)s * nrows * rs + (size_t)r * rs, src + (size_t)r * rowb,
                             (uint32_t)rowb, full + s);
            }
        }
    } else {
        for (int c = 0; c < nch; c++) {
            const int s = c % S;
            mbar_wait(full + s, (c / S) & 1);
            __syncwarp();
            if (lane == 0) mbar_arrive(empty + s);
        }
    }
}

// ---- 3. the decode fc1 tile pattern ------------------------------------------------------
// W: X experts of NR rows x K bf16 (row-major), or the same bytes tile-major (TM: tile
// (e, nt, kt) = 64 rows x 64 k, contiguous 8 KB). CTA = (nt, e), 64 threads, S stages;
// stage kt: 64 rows x 128 bytes = 512 16-byte pieces, 8 a thread.
template <bool TM, int S>
__global__ void fc1_pattern_kernel(const uint4 *__restrict__ W, int NR, int K) {
    extern __shared__ uint4 sm[];
    const int nt = blockIdx.x, e = blockIdx.y, KT = K / 64, NT = NR / 64;
    const size_t row16 = K / 8;  // 16-byte pieces a row
    const uint4 *base = W + ((size_t)e * NR + (size_t)nt * 64) * row16;
    uint32_t acc = 0;
    auto issue = [&](int kt) {
        if (kt < KT) {
            uint4 *dst = sm + (kt % S) * 512;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const int j = threadIdx.x + 64 * i;  // piece j: row j / 8, 16 bytes j % 8
                const uint4 *src =
                    TM ? W + (((size_t)e * NT + nt) * KT + kt) * 512 + j
                       : base + (size_t)(j / 8) * row16 + (size_t)kt * 8 + (j % 8);
                cp16(smem_u32(dst + j), src);
            }
        }
        cp_commit();
    };
    for (int kt = 0; kt < S - 1; kt++) issue(kt);
    for (int kt = 0; kt < KT; kt++) {
        cp_wait<S - 2>();
        __syncthreads();
        const uint4 *src = sm + (kt % S) * 512;
#pragma unroll
        for (int i = 0; i < 8; i++) acc ^= fold(src[threadIdx.x + 64 * i]);
        issue(kt + S - 1);
    }
    cp_wait<0>();
    if (acc == 0x9e3779b9u) g_sink = acc;
}

// ---- driver --------------------------------------------------------------------------------
template <class F>
float time_ms(F launch) {
    for (int i = 0; i < 3; i++) launch();
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    std::vector<float> ms;
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    for (int r = 0; r < 15; r++) {
        CK(cudaEventRecord(a));
        launch();
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        float t;
        CK(cudaEventElapsedTime(&t, a, b));
        ms.push_back(t);
    }
    CK(cudaGetLastError());
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
}

int main() {
    int dev = 0, sms = 0;
    CK(cudaSetDevice(dev));
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    cudaDeviceProp pr;
    CK(cudaGetDeviceProperties(&pr, dev));
    printf("%s, %d SMs, L2 %d MB\n", pr.name, sms, pr.l2CacheSize >> 20);
    // 132 * 2^23 bytes = 1.03 GiB: every slice a whole number of chunks up to 256 KB
    const size_t bytes = (size_t)sms << 23, n16 = bytes / 16;
    uint4 *buf;
    CK(cudaMalloc(&buf, bytes));
    CK(cudaMemset(buf, 1, bytes));
    auto gbs = [&](float ms, size_t by) { return by / (ms * 1e6); };
    auto report = [&](const char *what, float ms, size_t by) {
        printf("%-62s %8.3f ms %7.0f GB/s (%5.1f GB/s an SM)\n", what, ms, gbs(ms, by),
               gbs(ms, by) / sms);
        fflush(stdout);
    };
    char name[128];
    // copy, for the README's number
    {
        uint4 *dst;
        CK(cudaMalloc(&dst, bytes / 2));
        float ms = time_ms([&] { CK(cudaMemcpyAsync(dst, buf, bytes / 2, cudaMemcpyDeviceToDevice)); });
        report("cudaMemcpy d2d 0.5 GiB (read + write counted)", ms, bytes);
        CK(cudaFree(dst));
    }
    // 1
    for (int blocks_per_sm : {4, 8, 16}) {
        float ms = time_ms([&] { read_kernel<4><<<sms * blocks_per_sm, 256>>>(buf, n16); });
        snprintf(name, sizeof name, "1 grid-stride ldcs, 4 x 16 B a thread, %d x 256 an SM", blocks_per_sm);
        report(name, ms, bytes);
    }
    // 2a
    for (int thr : {512, 1024}) {
        float ms = time_ms([&] { slice_reg_kernel<4><<<sms, thr>>>(buf, n16); });
        snprintf(name, sizeof name, "2a slice, registers, 1 CTA x %d, 4 x 16 B a thread", thr);
        report(name, ms, bytes);
        ms = time_ms([&] { slice_reg_kernel<8><<<sms, thr>>>(buf, n16); });
        snprintf(name, sizeof name, "2a slice, registers, 1 CTA x %d, 8 x 16 B a thread", thr);
        report(name, ms, bytes);
    }
    // 2b
    for (int chunk_kb : {8, 16, 32}) {
        const int c16 = chunk_kb * 64;
        auto run = [&](auto kern, int S) {
            const size_t smem = (size_t)S * c16 * 16;
            if (smem > 200 * 1024) return;
            CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
            float ms = time_ms([&] { kern<<<sms, 512, smem>>>(buf, n16, c16); });
            snprintf(name, sizeof name, "2b slice, cp.async ring, 512 thr, %d x %d KB", S, chunk_kb);
            report(name, ms, bytes);
        };
        run(slice_cpasync_kernel<4>, 4);
        run(slice_cpasync_kernel<6>, 6);
    }
    // 2c
    for (int chunk_kb : {16, 32, 64}) {
        const int c16 = chunk_kb * 64;
        for (int piece_kb : {4, 16, chunk_kb}) {
            if (piece_kb > chunk_kb) continue;
            auto run = [&](auto kern, int S) {
                const size_t smem = 128 + (size_t)S * c16 * 16;
                if (smem > 220 * 1024) return;
                CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
                float ms = time_ms([&] { kern<<<sms, 288, smem>>>(buf, n16, c16, piece_kb * 64); });
                snprintf(name, sizeof name, "2c slice, bulk ring, 8+1 warps, %d x %d KB, pieces %d KB",
                         S, chunk_kb, piece_kb);
                report(name, ms, bytes);
            };
            run(slice_bulk_kernel<2>, 2);
            run(slice_bulk_kernel<4>, 4);
            run(slice_bulk_kernel<8>, 8);
        }
    }
    // 3: fc1 of the 2.8B shape: X = 8 experts, 2F = 7744 rows, K = 1472 (182 MB)
    {
        const int X = 8, NR = 7744, K = 1472;
        const size_t fb = (size_t)X * NR * K * 2;
        dim3 grid(NR / 64, X);
        for (int ctas : {4, 6}) {
            // shared memory to cap the CTAs an SM (the real tile: 4 an SM)
            const int smem = std::max(227 * 1024 / ctas - 1024, 4 * 8192);
            auto run = [&](auto kern, const char *lay) {
                CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
                float ms = time_ms([&] { kern<<<grid, 64, smem>>>(buf, NR, K); });
                snprintf(name, sizeof name, "3 fc1 tiles 64x64, 4 stages, %d CTAs an SM, %s", ctas, lay);
                report(name, ms, fb);
            };
            run(fc1_pattern_kernel<false, 4>, "row-major");
            run(fc1_pattern_kernel<true, 4>, "tile-major");
        }
        // the same bytes with a plain stream for comparison
        float ms = time_ms([&] { read_kernel<4><<<sms * 8, 256>>>(buf, fb / 16); });
        report("3 the same 182 MB, grid-stride", ms, fb);
    }
    // 2d: the fc1 stream's geometry, 182 MB over one CTA an SM
    {
        const size_t fb = (size_t)8 * 7744 * 1472 * 2;
        struct G { int nrows, rowb, rs; const char *what; };
        const G gs[] = {{16, 2944, 2960, "16 rows of 2944 B, rows 2960 apart (the kernel)"},
                        {16, 2944, 3072, "16 rows of 2944 B, rows 3072 apart (128-aligned)"},
                        {2, 23552, 23552, "2 copies of 23 KB"},
                        {1, 47104, 47104, "1 copy of 46 KB"},
                        {32, 1472, 1536, "32 rows of 1472 B, 1536 apart"}};
        for (const G &g : gs) {
            auto run = [&](auto kern, int S) {
                const size_t smem = 128 + (size_t)S * g.nrows * g.rs;
                if (smem > 227 * 1024) return;
                CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
                float ms = time_ms([&] {
                    kern<<<sms, 288, smem>>>((const unsigned char *)buf, fb, g.nrows, g.rowb, g.rs);
                });
                snprintf(name, sizeof name, "2d 182 MB, %d stages, %s", S, g.what);
                report(name, ms, fb);
            };
            run(rows_bulk_kernel<2>, 2);
            run(rows_bulk_kernel<4>, 4);
        }
        float ms = time_ms([&] { slice_bulk_kernel<4><<<sms, 288, 128 + 4 * 32768>>>(buf, fb / 16 / sms * sms, 2048, 2048); });
        report("2d 182 MB, 2c's ring 4 x 32 KB", ms, fb / 16 / sms * sms * 16);
    }
    CK(cudaFree(buf));
    printf("done\n");
    return 0;
}
