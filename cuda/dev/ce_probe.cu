// Can the copy engine warm L2 for the batch-1 decode? (dev only; not part of the package.)
// Standalone: nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/ce cuda/dev/ce_probe.cu -lcuda && /tmp/ce
//
// At batch 1 a side *kernel* that prefetches weights into L2 does not run when asked: the early
// PDL kernels of the chain hold every SM's slots (cuda/NOTES.md, session 10). A device-to-device
// cudaMemcpyAsync needs no SM if the driver gives it to a copy engine. Questions:
//  1. does a D2D copy progress while a kernel holds every SM (copy engine, not a kernel)?
//  2. its bandwidth, alone and beside a kernel streaming HBM (and what it costs that kernel);
//  3. after the copy, are the source's lines (or the destination's) L2 hits for a kernel?
//     Also an in-place copy (dst == src) and a copy followed by 34 MB of evict_first reads
//     (the MoE experts' stream) before the read.
// Each line: the median of 9 timed runs (CUDA events), L2 flushed (256 MB read) before each.
//
// Answers (H200, cuda/NOTES.md session 19; logs in benchmarks/results/s19-h200/ce/): a copy's
// source lines are L2 hits afterwards (3.), and survive 34 MB of evict_first reads, but no
// form of device-to-device copy ran beside a kernel that holds every SM: a stream copy, the
// batch API with cudaMemcpyFlagPreferOverlapWithCompute (not capturable), a graph's copy
// node each finished only after the hog's first wave (run 5), and the engine's trace shows
// the graph's copies as a kernel (memcpy128). Runs 1-4 used a hog of one CTA an SM, which
// left room for the copy kernel's CTAs, hence their "runs beside" lines.
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "dev_check.cuh"

__device__ uint32_t g_sink;

__device__ __forceinline__ uint32_t fold(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

// mode 0: plain loads (ld.global), 1: evict_first policy loads
template <int MODE>
__global__ void read_kernel(const uint4 *__restrict__ p, size_t n16) {
    uint64_t pol = 0;
    if (MODE == 1) asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    uint32_t acc = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n16; i += stride) {
        uint4 v;
        if (MODE == 1) {
            asm volatile("ld.global.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;"
                         : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                         : "l"(p + i), "l"(pol));
        } else {
            v = p[i];
        }
        acc ^= fold(v);
    }
    if (acc == 0x9e3779b9u) g_sink = acc;
}

// Holds every SM: two CTAs of 1024 threads an SM (every thread slot) with half the shared
// memory each, spinning ns nanoseconds (run 4's hog, one CTA an SM, left room for a copy
// kernel's CTAs). Block 0 sets *flag = 1 after flag_ns (section 9).
__global__ void hog_kernel(uint64_t ns, unsigned *flag = nullptr, uint64_t flag_ns = 0) {
    extern __shared__ char sm[];
    uint64_t t0, t;
    bool set = false;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        if (flag && !set && blockIdx.x == 0 && threadIdx.x == 0 && t - t0 >= flag_ns) {
            *(volatile unsigned *)flag = 1;
            __threadfence_system();
            set = true;
        }
    } while (t - t0 < ns);
    if (threadIdx.x == 0 && sm[0] == 123) g_sink = 1;
}

static int g_sms;
static void read(const void *p, size_t bytes, int mode, cudaStream_t s) {
    const size_t n16 = bytes / 16;
    if (mode == 1)
        read_kernel<1><<<g_sms * 8, 256, 0, s>>>((const uint4 *)p, n16);
    else
        read_kernel<0><<<g_sms * 8, 256, 0, s>>>((const uint4 *)p, n16);
    CK(cudaGetLastError());
}

static float med(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

int main() {
    CK(cudaDeviceGetAttribute(&g_sms, cudaDevAttrMultiProcessorCount, 0));
    int maxsm = 0;
    CK(cudaDeviceGetAttribute(&maxsm, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0));
    CK(cudaFuncSetAttribute(hog_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, maxsm));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("device %s, %d SMs, L2 %d MB, async engines %d\n", prop.name, g_sms,
           prop.l2CacheSize >> 20, prop.asyncEngineCount);
    const size_t W = 17334272;  // in_proj at the 2.8B shape: 5888 x 1472 bf16
    const size_t BIG = 64u << 20, FLUSH = 256u << 20, OTHER = 34u << 20;
    char *src, *dst, *flush, *other, *big, *bigd;
    CK(cudaMalloc(&src, W));
    CK(cudaMalloc(&dst, W));
    CK(cudaMalloc(&flush, FLUSH));
    CK(cudaMalloc(&other, OTHER));
    CK(cudaMalloc(&big, BIG));
    CK(cudaMalloc(&bigd, BIG));
    CK(cudaMemset(src, 1, W));
    CK(cudaMemset(flush, 2, FLUSH));
    CK(cudaMemset(other, 3, OTHER));
    CK(cudaMemset(big, 4, BIG));
    cudaStream_t s0, s1;
    CK(cudaStreamCreateWithFlags(&s0, cudaStreamNonBlocking));
    CK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
    cudaEvent_t a, b, c, d;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    CK(cudaEventCreate(&c));
    CK(cudaEventCreate(&d));
    auto el = [](cudaEvent_t x, cudaEvent_t y) {
        float ms;
        CK(cudaEventElapsedTime(&ms, x, y));
        return ms * 1000.f;
    };
    const int R = 9;

    // 1. copy engine or kernel: a hog of 200 us on s0, the copy on s1 started with it
    {
        std::vector<float> hog_t, cp_t, alone;
        for (int r = 0; r < R + 2; r++) {
            read(flush, FLUSH, 0, s0);
            CK(cudaEventRecord(a, s0));
            hog_kernel<<<2 * g_sms, 1024, maxsm / 2, s0>>>(200000);
            CK(cudaGetLastError());
            CK(cudaEventRecord(b, s0));
            CK(cudaStreamWaitEvent(s1, a));
            CK(cudaMemcpyAsync(dst, src, W, cudaMemcpyDeviceToDevice, s1));
            CK(cudaEventRecord(c, s1));
            CK(cudaStreamSynchronize(s0));
            CK(cudaStreamSynchronize(s1));
            if (r >= 2) hog_t.push_back(el(a, b)), cp_t.push_back(el(a, c));
            read(flush, FLUSH, 0, s0);
            CK(cudaEventRecord(a, s0));
            CK(cudaMemcpyAsync(dst, src, W, cudaMemcpyDeviceToDevice, s0));
            CK(cudaEventRecord(b, s0));
            CK(cudaStreamSynchronize(s0));
            if (r >= 2) alone.push_back(el(a, b));
        }
        printf("1. hog (every SM, 200 us a wave) %.1f us; 17.3 MB D2D copy started with it done "
               "after %.1f us (%s); the copy alone %.1f us = %.0f GB/s read\n",
               med(hog_t), med(cp_t), med(cp_t) < 0.8f * med(hog_t) ? "ran beside the hog" : "waited for SMs",
               med(alone), W / med(alone) / 1e3);
    }
    // 2. bandwidth: 64 MB copy alone; a 64 MB read kernel alone; both together
    {
        std::vector<float> cp, rd, both_rd, both_cp;
        for (int r = 0; r < R + 2; r++) {
            read(flush, FLUSH, 0, s0);
            CK(cudaEventRecord(a, s0));
            CK(cudaMemcpyAsync(bigd, big, BIG, cudaMemcpyDeviceToDevice, s0));
            CK(cudaEventRecord(b, s0));
            read(flush, FLUSH, 0, s0);
            CK(cudaEventRecord(c, s0));
            read(big, BIG, 0, s0);
            CK(cudaEventRecord(d, s0));
            CK(cudaStreamSynchronize(s0));
            if (r >= 2) cp.push_back(el(a, b)), rd.push_back(el(c, d));
            read(flush, FLUSH, 0, s0);
            CK(cudaEventRecord(a, s0));
            CK(cudaStreamWaitEvent(s1, a));
            CK(cudaMemcpyAsync(dst, src, W, cudaMemcpyDeviceToDevice, s1));
            CK(cudaEventRecord(c, s1));
            read(big, BIG, 0, s0);
            CK(cudaEventRecord(b, s0));
            CK(cudaStreamSynchronize(s0));
            CK(cudaStreamSynchronize(s1));
            if (r >= 2) both_rd.push_back(el(a, b)), both_cp.push_back(el(a, c));
        }
        printf("2. 64 MB copy %.1f us (%.0f GB/s read); 64 MB read kernel %.1f us (%.0f GB/s); "
               "the read beside a 17.3 MB copy %.1f us (+%.1f us), the copy done after %.1f us\n",
               med(cp), BIG / med(cp) / 1e3, med(rd), BIG / med(rd) / 1e3, med(both_rd),
               med(both_rd) - med(rd), med(both_cp));
    }
    // 3. L2 warming: read src (17.3 MB) after: nothing (cold), a read (warm), a copy src->dst,
    //    (read dst), an in-place copy, a copy then 34 MB of evict_first / plain reads
    {
        const char *names[] = {"cold",
                               "after a read of it (L2-warm)",
                               "after copy src->dst, reading src",
                               "after copy src->dst, reading dst",
                               "after an in-place copy src->src",
                               "after copy src->dst + 34 MB evict_first reads, reading src",
                               "after copy src->dst + 34 MB plain reads, reading src",
                               "after a read of it + 34 MB evict_first reads"};
        for (int k = 0; k < 8; k++) {
            std::vector<float> t;
            for (int r = 0; r < R + 2; r++) {
                read(flush, FLUSH, 0, s0);
                const char *tgt = src;
                if (k == 1 || k == 7) read(src, W, 0, s0);
                if (k == 2 || k == 3 || k == 5 || k == 6)
                    CK(cudaMemcpyAsync(dst, src, W, cudaMemcpyDeviceToDevice, s0));
                if (k == 3) tgt = dst;
                if (k == 4) CK(cudaMemcpyAsync(src, src, W, cudaMemcpyDeviceToDevice, s0));
                if (k == 5 || k == 7) read(other, OTHER, 1, s0);
                if (k == 6) read(other, OTHER, 0, s0);
                CK(cudaEventRecord(a, s0));
                read(tgt, W, 0, s0);
                CK(cudaEventRecord(b, s0));
                CK(cudaStreamSynchronize(s0));
                if (r >= 2) t.push_back(el(a, b));
            }
            printf("3. read 17.3 MB %-60s %6.2f us (%5.0f GB/s)\n", names[k], med(t),
                   W / med(t) / 1e3);
        }
    }
    // A graph's replay on s0 after an L2 flush (after_launch: more work queued after it;
    // after_sync(kept): called once both streams are idle), to the end of s0's work: the
    // median of R after 2.
    auto none = [] {};
    auto none_sync = [](bool) {};
    auto time_graph = [&](cudaGraphExec_t ge, auto &&after_launch, auto &&after_sync) {
        std::vector<float> t;
        for (int r = 0; r < R + 2; r++) {
            read(flush, FLUSH, 0, s0);
            CK(cudaStreamSynchronize(s0));
            CK(cudaEventRecord(a, s0));
            CK(cudaGraphLaunch(ge, s0));
            after_launch();
            CK(cudaEventRecord(b, s0));
            CK(cudaStreamSynchronize(s0));
            CK(cudaStreamSynchronize(s1));
            if (r >= 2) t.push_back(el(a, b));
            after_sync(r >= 2);
        }
        return med(t);
    };

    // 4. the same copies captured into a graph (the decode's form): copy node after a kernel
    {
        cudaGraph_t g;
        cudaGraphExec_t ge;
        CK(cudaStreamBeginCapture(s0, cudaStreamCaptureModeGlobal));
        CK(cudaEventRecord(a, s0));
        CK(cudaStreamWaitEvent(s1, a));
        CK(cudaMemcpyAsync(dst, src, W, cudaMemcpyDeviceToDevice, s1));
        hog_kernel<<<2 * g_sms, 1024, maxsm / 2, s0>>>(30000);
        CK(cudaEventRecord(c, s1));
        CK(cudaStreamWaitEvent(s0, c));
        read(src, W, 0, s0);
        CK(cudaStreamEndCapture(s0, &g));
        CK(cudaGraphInstantiate(&ge, g, 0));
        printf("4. graph: [copy 17.3 MB on a branch | hog 30 us] -> read src: %.1f us\n",
               time_graph(ge, none, none_sync));
    }
    // 5. ways to keep the copy on a copy engine next to a graph
    {
        cudaGraph_t g;
        cudaGraphExec_t ge_hog, ge_hogread, ge_copyonly, ge_ext;
        // hog 30 us alone; hog then read src (cold)
        CK(cudaStreamBeginCapture(s0, cudaStreamCaptureModeGlobal));
        hog_kernel<<<2 * g_sms, 1024, maxsm / 2, s0>>>(30000);
        CK(cudaStreamEndCapture(s0, &g));
        CK(cudaGraphInstantiate(&ge_hog, g, 0));
        CK(cudaStreamBeginCapture(s0, cudaStreamCaptureModeGlobal));
        hog_kernel<<<2 * g_sms, 1024, maxsm / 2, s0>>>(30000);
        read(src, W, 0, s0);
        CK(cudaStreamEndCapture(s0, &g));
        CK(cudaGraphInstantiate(&ge_hogread, g, 0));
        CK(cudaStreamBeginCapture(s0, cudaStreamCaptureModeGlobal));
        CK(cudaMemcpyAsync(dst, src, W, cudaMemcpyDeviceToDevice, s0));
        CK(cudaStreamEndCapture(s0, &g));
        CK(cudaGraphInstantiate(&ge_copyonly, g, 0));
        // an external event recorded at the graph's start; the copy issued outside the graph
        cudaEvent_t ev;
        CK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
        CK(cudaStreamBeginCapture(s0, cudaStreamCaptureModeGlobal));
        CK(cudaEventRecordWithFlags(ev, s0, cudaEventRecordExternal));
        hog_kernel<<<2 * g_sms, 1024, maxsm / 2, s0>>>(30000);
        read(src, W, 0, s0);
        CK(cudaStreamEndCapture(s0, &g));
        CK(cudaGraphInstantiate(&ge_ext, g, 0));
        printf("5. graph hog 30 us: %.1f; hog -> read src (cold): %.1f; copy node alone: %.1f\n",
               time_graph(ge_hog, none, none_sync), time_graph(ge_hogread, none, none_sync),
               time_graph(ge_copyonly, none, none_sync));
        printf("5. graph [ext event -> hog 30 -> read src] + outside: wait event, copy 17.3 MB "
               "on s1: %.1f\n",
               time_graph(
                   ge_ext,
                   [&] {
                       CK(cudaStreamWaitEvent(s1, ev));
                       CK(cudaMemcpyAsync(dst, src, W, cudaMemcpyDeviceToDevice, s1));
                   },
                   none_sync));
        // the batch API with the overlap hint: not capturable (cudaErrorStreamCaptureUnsupported
        // in run 2), so only outside a graph
        cudaMemcpyAttributes at = {};
        at.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
        at.flags = cudaMemcpyFlagPreferOverlapWithCompute;
        void *dl[1] = {dst};
        const void *sl[1] = {src};
        size_t sz[1] = {W}, ai[1] = {0};
        // does the outside wait order the copy after the event node? graph [hog 30 -> ext
        // event -> hog 30]; outside: wait, 4 KB copy, record c
        cudaGraphExec_t ge_mid;
        CK(cudaStreamBeginCapture(s0, cudaStreamCaptureModeGlobal));
        hog_kernel<<<2 * g_sms, 1024, maxsm / 2, s0>>>(30000);
        CK(cudaEventRecordWithFlags(ev, s0, cudaEventRecordExternal));
        hog_kernel<<<2 * g_sms, 1024, maxsm / 2, s0>>>(30000);
        CK(cudaStreamEndCapture(s0, &g));
        CK(cudaGraphInstantiate(&ge_mid, g, 0));
        {
            std::vector<float> t;
            for (int r = 0; r < R + 2; r++) {
                CK(cudaEventRecord(a, s0));
                CK(cudaGraphLaunch(ge_mid, s0));
                CK(cudaStreamWaitEvent(s1, ev));
                CK(cudaMemcpyAsync(dst, src, 4096, cudaMemcpyDeviceToDevice, s1));
                CK(cudaEventRecord(c, s1));
                CK(cudaStreamSynchronize(s0));
                CK(cudaStreamSynchronize(s1));
                if (r >= 2) t.push_back(el(a, c));
            }
            printf("5. graph [hog 30 -> ext event -> hog 30]; the outside copy done after %.1f us "
                   "(ordered if >= 30)\n", med(t));
        }
        // the batch API outside a graph, beside the hog
        {
            std::vector<float> t;
            for (int r = 0; r < R + 2; r++) {
                read(flush, FLUSH, 0, s0);
                CK(cudaEventRecord(a, s0));
                hog_kernel<<<2 * g_sms, 1024, maxsm / 2, s0>>>(200000);
                CK(cudaStreamWaitEvent(s1, a));
                CK(cudaMemcpyBatchAsync(dl, sl, sz, 1, &at, ai, 1, s1));
                CK(cudaEventRecord(c, s1));
                CK(cudaStreamSynchronize(s0));
                CK(cudaStreamSynchronize(s1));
                if (r >= 2) t.push_back(el(a, c));
            }
            printf("5. batch copy beside a 200 us hog (stream): done after %.1f us\n", med(t));
        }
        {
            char *small;
            CK(cudaMalloc(&small, 1 << 20));
            std::vector<void *> bd;
            std::vector<const void *> bs;
            std::vector<size_t> bz;
            for (size_t o = 0; o < W; o += (1 << 20))
                bd.push_back(small), bs.push_back(src + o),
                    bz.push_back(std::min((size_t)1 << 20, W - o));
            std::vector<float> t, t2;
            for (int r = 0; r < R + 2; r++) {
                read(flush, FLUSH, 0, s0);
                CK(cudaEventRecord(a, s0));
                hog_kernel<<<2 * g_sms, 1024, maxsm / 2, s0>>>(200000);
                CK(cudaStreamWaitEvent(s1, a));
                CK(cudaMemcpyBatchAsync(bd.data(), bs.data(), bz.data(), bd.size(), &at, ai, 1, s1));
                CK(cudaEventRecord(c, s1));
                CK(cudaStreamSynchronize(s0));
                CK(cudaStreamSynchronize(s1));
                if (r >= 2) t.push_back(el(a, c));
                auto h0 = std::chrono::steady_clock::now();
                CK(cudaMemcpyBatchAsync(bd.data(), bs.data(), bz.data(), bd.size(), &at, ai, 1, s1));
                auto h1 = std::chrono::steady_clock::now();
                CK(cudaStreamSynchronize(s1));
                if (r >= 2) t2.push_back(std::chrono::duration<float, std::micro>(h1 - h0).count());
            }
            printf("5. batch of 17 x 1 MB into one 1 MB dst beside a 200 us hog: done after %.1f us;"
                   " host call %.1f us\n", med(t), med(t2));
        }
    }
    // 6. write-back: the 256 MB flush read after the copies (dirty lines go back to HBM)
    {
        char *small;
        CK(cudaMalloc(&small, 1 << 20));
        const size_t CH = 1 << 20;
        const char *names[] = {"after nothing", "after a 17.3 MB read", "after copy src->dst",
                               "after in-place src->src", "after 17 x 1 MB copies into one 1 MB dst",
                               "after one batch of 17 x 1 MB into one 1 MB dst"};
        std::vector<void *> bd;
        std::vector<const void *> bs;
        std::vector<size_t> bz;
        for (size_t o = 0; o < W; o += CH)
            bd.push_back(small), bs.push_back(src + o), bz.push_back(std::min(CH, W - o));
        cudaMemcpyAttributes at = {};
        at.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
        at.flags = cudaMemcpyFlagPreferOverlapWithCompute;
        size_t ai0 = 0;
        for (int k = 0; k < 6; k++) {
            std::vector<float> t, rs;
            for (int r = 0; r < R + 2; r++) {
                read(flush, FLUSH, 0, s0);
                if (k == 1) read(src, W, 0, s0);
                if (k == 2) CK(cudaMemcpyAsync(dst, src, W, cudaMemcpyDeviceToDevice, s0));
                if (k == 3) CK(cudaMemcpyAsync(src, src, W, cudaMemcpyDeviceToDevice, s0));
                if (k == 4)
                    for (size_t o = 0; o < W; o += CH)
                        CK(cudaMemcpyAsync(small, src + o, std::min(CH, W - o),
                                           cudaMemcpyDeviceToDevice, s0));
                if (k == 5)
                    CK(cudaMemcpyBatchAsync(bd.data(), bs.data(), bz.data(), bd.size(), &at,
                                            &ai0, 1, s0));
                CK(cudaEventRecord(c, s0));
                read(src, W, 0, s0);
                CK(cudaEventRecord(a, s0));
                read(flush, FLUSH, 0, s0);
                CK(cudaEventRecord(b, s0));
                CK(cudaStreamSynchronize(s0));
                if (r >= 2) t.push_back(el(a, b)), rs.push_back(el(c, a));
            }
            printf("6. %-42s read src %.2f us; then a 256 MB read %.1f us\n", names[k], med(rs),
                   med(t));
        }
    }
    // 7. host cost of a wait + copy call pair
    {
        const int N = 200;
        CK(cudaEventRecord(a, s0));
        auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < N; i++) {
            CK(cudaStreamWaitEvent(s1, a));
            CK(cudaMemcpyAsync(dst, src, 4096, cudaMemcpyDeviceToDevice, s1));
        }
        auto t1 = std::chrono::steady_clock::now();
        CK(cudaStreamSynchronize(s1));
        printf("7. host: wait + 4 KB copy call pair %.2f us\n",
               std::chrono::duration<double, std::micro>(t1 - t0).count() / N);
    }
    // 8. a graph of copies only, launched on s1 beside the hog on s0: copy engine or kernel?
    {
        char *small;
        CK(cudaMalloc(&small, 1 << 20));
        cudaEvent_t ev;
        CK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
        cudaGraph_t g;
        cudaGraphExec_t g1, g17, gw, gmain;
        CK(cudaStreamBeginCapture(s1, cudaStreamCaptureModeGlobal));
        CK(cudaMemcpyAsync(dst, src, W, cudaMemcpyDeviceToDevice, s1));
        CK(cudaStreamEndCapture(s1, &g));
        CK(cudaGraphInstantiate(&g1, g, 0));
        CK(cudaStreamBeginCapture(s1, cudaStreamCaptureModeGlobal));
        for (size_t o = 0; o < W; o += (1 << 20))
            CK(cudaMemcpyAsync(small, src + o, std::min((size_t)1 << 20, W - o),
                               cudaMemcpyDeviceToDevice, s1));
        CK(cudaStreamEndCapture(s1, &g));
        CK(cudaGraphInstantiate(&g17, g, 0));
        // waits for an external event recorded in the middle of the main graph, then copies
        CK(cudaStreamBeginCapture(s1, cudaStreamCaptureModeGlobal));
        CK(cudaStreamWaitEvent(s1, ev, cudaEventWaitExternal));
        for (size_t o = 0; o < W; o += (1 << 20))
            CK(cudaMemcpyAsync(small, src + o, std::min((size_t)1 << 20, W - o),
                               cudaMemcpyDeviceToDevice, s1));
        CK(cudaStreamEndCapture(s1, &g));
        CK(cudaGraphInstantiate(&gw, g, 0));
        CK(cudaStreamBeginCapture(s0, cudaStreamCaptureModeGlobal));
        hog_kernel<<<2 * g_sms, 1024, maxsm / 2, s0>>>(30000);
        CK(cudaEventRecordWithFlags(ev, s0, cudaEventRecordExternal));
        hog_kernel<<<2 * g_sms, 1024, maxsm / 2, s0>>>(30000);
        read(src, W, 0, s0);
        CK(cudaStreamEndCapture(s0, &g));
        CK(cudaGraphInstantiate(&gmain, g, 0));
        const char *names[] = {"one 17.3 MB copy node", "17 x 1 MB copy nodes into one 1 MB dst"};
        cudaGraphExec_t gs[] = {g1, g17};
        for (int k = 0; k < 2; k++) {
            std::vector<float> t, alone;
            for (int r = 0; r < R + 2; r++) {
                read(flush, FLUSH, 0, s0);
                CK(cudaStreamSynchronize(s0));
                CK(cudaEventRecord(a, s0));
                hog_kernel<<<2 * g_sms, 1024, maxsm / 2, s0>>>(200000);
                CK(cudaStreamWaitEvent(s1, a));
                CK(cudaGraphLaunch(gs[k], s1));
                CK(cudaEventRecord(c, s1));
                CK(cudaStreamSynchronize(s0));
                CK(cudaStreamSynchronize(s1));
                if (r >= 2) t.push_back(el(a, c));
                read(flush, FLUSH, 0, s1);
                CK(cudaEventRecord(a, s1));
                CK(cudaGraphLaunch(gs[k], s1));
                CK(cudaEventRecord(c, s1));
                CK(cudaStreamSynchronize(s1));
                if (r >= 2) alone.push_back(el(a, c));
            }
            printf("8. graph of %-40s on s1 beside a 200 us hog: done after %.1f us (alone %.1f)\n",
                   names[k], med(t), med(alone));
        }
        std::vector<float> tc;
        const float with = time_graph(
            gmain,
            [&] {
                CK(cudaGraphLaunch(gw, s1));
                CK(cudaEventRecord(c, s1));
            },
            [&](bool kept) {
                if (kept) tc.push_back(el(a, c));
            });
        printf("8. main graph [hog 30 -> ext event -> hog 30 -> read src] %.1f us alone, %.1f with "
               "the waiting copy graph on s1 (its copies done after %.1f)\n",
               time_graph(gmain, none, none_sync), with, med(tc));
    }
    // 9. a copy started by a flag that a kernel writes (cuStreamWaitValue32 on s1: the
    //    stream's front end waits, no event node in the kernel's graph), then a batch copy
    //    with the overlap hint
    {
        unsigned *flag;
        CK(cudaMalloc(&flag, 4));
        cudaMemcpyAttributes at = {};
        at.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
        at.flags = cudaMemcpyFlagPreferOverlapWithCompute;
        void *dl[1] = {dst};
        const void *sl[1] = {src};
        size_t sz[1] = {W}, ai[1] = {0};
        std::vector<float> t, h;
        for (int r = 0; r < R + 2; r++) {
            CK(cudaMemsetAsync(flag, 0, 4, s0));
            read(flush, FLUSH, 0, s0);
            CK(cudaStreamSynchronize(s0));
            CK(cudaEventRecord(a, s0));
            hog_kernel<<<2 * g_sms, 1024, maxsm / 2, s0>>>(200000, flag, 30000);
            CK(cudaGetLastError());
            auto h0 = std::chrono::steady_clock::now();
            CUresult cr = cuStreamWaitValue32((CUstream)s1, (CUdeviceptr)flag, 1,
                                              CU_STREAM_WAIT_VALUE_GEQ);
            if (cr != CUDA_SUCCESS) {
                printf("9. cuStreamWaitValue32 failed: %d\n", (int)cr);
                break;
            }
            CK(cudaMemcpyBatchAsync(dl, sl, sz, 1, &at, ai, 1, s1));
            auto h1 = std::chrono::steady_clock::now();
            CK(cudaEventRecord(c, s1));
            CK(cudaStreamSynchronize(s0));
            CK(cudaStreamSynchronize(s1));
            if (r >= 2)
                t.push_back(el(a, c)),
                    h.push_back(std::chrono::duration<float, std::micro>(h1 - h0).count());
        }
        if (!t.empty())
            printf("9. hog 200 us setting a flag at 30 us; wait-value + batch copy on s1 done "
                   "after %.1f us (expect ~41 if a copy engine); host %.1f us for both calls\n",
                   med(t), med(h));
    }
    CK(cudaDeviceSynchronize());
    return 0;
}
