// xdt.cu: the batched decode's two small Mamba products as PDL-launched fp32 kernels of our
// own (engine.cu mamba_step, BLACKMAMBA_XDT_DEC):
//   x_proj   dbc (M, P) = xc (M, E) @ x_w^T,        x_w (P, E),  P = R + 2N
//   dt_proj  delta (M, E) = dbc[:, :R] @ dt_w^T,     dt_w (E, R)
// on the float32 weights (LayerDev::x_wf / dt_wf under bf16 math, the weights themselves for
// float32 weights). Why: at decode batch 64 these are 64 x 2944 @ 2944 x 124 and 64 x 92 @
// 92 x 2944 (~40 MFLOP, 2.5 MB of weights), so the time went to launches and ramps: a cuBLAS
// K-split tf32 GEMM, its reduction kernel and a second tf32 GEMM, 4.3 + 2.3 + 4.3 us a layer
// on the H200, none of them in the decode graph's PDL chain (cuda/NOTES.md, session 6 xdt64).
// Here: two kernels, both launched through programmatic dependent launch, both loading their
// weight tiles (never written after upload) into shared memory BEFORE griddepcontrol.wait,
// while the kernel before still runs, and both in plain fp32 FMAs (more exact than the tf32
// products they replace: 24 against 11 significant bits per operand).
//
// One kernel template, xdt_gemm_kernel<WM, CL, NW>: C (M, Nout) = A (M, K) @ W^T, W (Nout, K).
// A CTA computes a (16 WM rows) x (32 columns) tile over its K columns with NW warps (8; x_proj
// 16 at up to 32 rows: xdt_xproj_warps): WM warps along the rows, NW / WM warps along K (each
// warp every (NW/WM)-th float4 column); a lane holds a 4 x 4 register tile (rows rg + 4i,
// columns cg + 8j of its warp's 16 x 32; rg = lane / 8, cg = lane % 8) and per float4 column
// reads 4 A and 4 W float4 from shared memory for 64 FMAs. The warps' partial tiles are
// summed through shared memory in warp order.
//  - dt_proj (CL false, WM 2): a CTA has the whole K = R; grid (1, cdiv(E, 32), cdiv(M, 32)),
//    184 CTAs at the 2.8B shape, 23.5 KB of shared memory each.
//  - x_proj (CL true, WM 1): K = E is cut into XDT_CS slices, one CTA each, the slices of a
//    tile forming one thread-block cluster; after its own sums each CTA holds its partial
//    tile in shared memory and, after a cluster barrier, rank q sums part q of the tile over
//    the 8 CTAs' shared memory (DSMEM) in rank order and stores it: the K-split without fp32
//    partials in global memory and without a reduction kernel. Grid (8, cdiv(P, 32),
//    cdiv(M, 16)), 128 CTAs at the 2.8B shape (E = 2944: 368 columns a slice), 73 KB each.
// Every sum is in one fixed order (float4 columns ascending within a lane, then warps, then
// cluster ranks), so the results are deterministic.
// Shared-memory tiles are row-major with a row stride of 4 x (an odd number) floats: the 8
// distinct float4 addresses a W read touches (columns cg + 8j, cg = 0..7) then fall into 8
// different bank quads, and the 4 of an A read (rows rg + 4i) as well; the other lanes read
// the same addresses (broadcast).
// Needs K % 4 == 0 and 16-byte aligned rows (lda % 4 == 0, 16-byte aligned A and W: cp.async
// of 16 bytes) and a 9.0 device (clusters); the launchers report BM_CUDA_ERR_ARG otherwise and
// the engine keeps its cuBLAS path (bm_xdt_ok).
#include <algorithm>

#include <cooperative_groups.h>

#include "common.cuh"

namespace cg = cooperative_groups;

namespace {

constexpr int XDT_THREADS = 256;  // 8 warps (NW); x_proj takes 16 at up to 32 rows
constexpr int XDT_TN = 32;  // output columns a CTA
constexpr int XDT_CS = 8;   // x_proj: CTAs of a cluster, = K slices

std::atomic<long long> g_xdt[2];  // launches: 0 x_proj, 1 dt_proj (tests)

// Shared-memory row stride (floats) of a tile of kc columns: kc rounded up to a float4,
// then to an odd number of float4 (bank quads; see the top).
__host__ __device__ inline int xdt_stride(int kc) { return 4 * (((kc + 3) / 4) | 1); }

__device__ __forceinline__ uint32_t xdt_smem_u32(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}
// 16 bytes global -> shared through L2 only (.cg: no L1 line, so no stale L1 reads for the
// activations after the PDL wait); src_bytes 0 writes zeros (rows and columns past the end).
__device__ __forceinline__ void xdt_cp16(uint32_t dst, const void *src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void xdt_cp_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void xdt_cp_wait_all() {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

// Floats of shared memory for a CTA of xdt_gemm_kernel<WM, CL, NW> with kc columns of K.
__host__ __device__ inline int xdt_smem_floats(int WM, bool CL, int kc, int NW = 8) {
    const int S = xdt_stride(kc), TM = 16 * WM, WK = NW / WM;
    const int tiles = (XDT_TN + TM) * S, red = WK * TM * XDT_TN;
    return (tiles > red ? tiles : red) + (CL ? TM * XDT_TN : 0);
}

template <int WM, bool CL, int NW = 8>
__global__ void __launch_bounds__(32 * NW, 16 / NW) xdt_gemm_kernel(
    const float *A,   // (M, lda): activations written by the kernel before (read after the wait)
    int64_t lda,
    const float *W,   // (Nout, K) float32 weights, never written after upload (read before it)
    float *C,         // (M, ldc)
    int64_t ldc, int M, int Nout, int K,
    int kc) {         // K columns a CTA: CL, slice blockIdx.x; else all of K
    constexpr int NT = 32 * NW; // threads
    constexpr int WK = NW / WM; // warps along K
    constexpr int TM = 16 * WM; // rows a CTA
    constexpr int TO = TM * XDT_TN;
    static_assert(WM == 1 || WM == 2 || WM == 4, "xdt_gemm_kernel: WM");
    extern __shared__ float4 xdt_smem4[];
    float *sm = reinterpret_cast<float *>(xdt_smem4);
    const int S = xdt_stride(kc), S4 = S / 4;
    float *Ws = sm;                // (XDT_TN, S)
    float *As = sm + XDT_TN * S;   // (TM, S)
    const int tid = threadIdx.x;
    const int k0 = CL ? (int)blockIdx.x * kc : 0;
    const int kl4 = max(0, min(kc, K - k0)) / 4;  // float4 columns of this CTA's K slice
    const int n0 = (int)blockIdx.y * XDT_TN, m0 = (int)blockIdx.z * TM;
    // Trigger first: the next kernel's CTAs may take free slots and load their own weights
    // (the dt_proj CTAs behind x_proj, the scan behind dt_proj); each waits on this grid's
    // completion before reading what it writes (common.cuh bm_pdl_trigger). (Triggering at
    // the end instead measured slower: cuda/NOTES.md sessions 6 and 7.)
    bm_pdl_trigger();
    // rows [r0, r0 + nrows) of src (leading dimension ld), this CTA's K slice, into dst (rows
    // of S floats); rows past `lim` zero-filled. cp.async.cg: from L2.
    auto load_tile = [&](float *dst, const float *src, int64_t ld, int nrows, int r0, int lim) {
        for (int i = tid; i < nrows * kl4; i += NT) {
            const int r = i / kl4, c4 = i - r * kl4;
            const bool ok = r0 + r < lim;
            xdt_cp16(xdt_smem_u32(dst + r * S + 4 * c4),
                     src + (int64_t)(ok ? r0 + r : 0) * ld + k0 + 4 * c4, ok ? 16 : 0);
        }
        xdt_cp_commit();
    };
    load_tile(Ws, W, K, XDT_TN, n0, Nout);  // before the wait: the weight tile
    bm_pdl_wait_only();
    load_tile(As, A, lda, TM, m0, M);       // after it: the activation tile
    xdt_cp_wait_all();
    __syncthreads();

    const int warp = tid >> 5, lane = tid & 31;
    const int wm = warp % WM, wk = warp / WM;
    const int rg = lane >> 3, cgp = lane & 7;
    const float4 *A4 = reinterpret_cast<const float4 *>(As) + (wm * 16 + rg) * S4;  // row + 4i
    const float4 *W4 = reinterpret_cast<const float4 *>(Ws) + cgp * S4;             // col + 8j
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.f;
#pragma unroll 2
    for (int k4 = wk; k4 < kl4; k4 += WK) {
        float4 a[4], w[4];
#pragma unroll
        for (int i = 0; i < 4; i++) a[i] = A4[4 * i * S4 + k4];
#pragma unroll
        for (int j = 0; j < 4; j++) w[j] = W4[8 * j * S4 + k4];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                float t = fmaf(a[i].x, w[j].x, acc[i][j]);
                t = fmaf(a[i].y, w[j].y, t);
                t = fmaf(a[i].z, w[j].z, t);
                acc[i][j] = fmaf(a[i].w, w[j].w, t);
            }
    }
    // The warps' partial tiles, summed in warp order; red (WK, TM, TN) aliases the tiles.
    __syncthreads();
    float *red = sm;
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
            red[(wk * TM + wm * 16 + rg + 4 * i) * XDT_TN + cgp + 8 * j] = acc[i][j];
    __syncthreads();
    if constexpr (!CL) {
        for (int o = tid; o < TO; o += NT) {
            float v = red[o];
#pragma unroll
            for (int q = 1; q < WK; q++) v += red[q * TO + o];
            const int m = m0 + o / XDT_TN, n = n0 + o % XDT_TN;
            if (m < M && n < Nout) C[(int64_t)m * ldc + n] = v;
        }
    } else {
        // This CTA's sums over its K slice, then the cluster's: rank q owns outputs
        // [q TO/CS, (q+1) TO/CS) of the tile and sums them over ranks 0..CS-1 in order.
        float *cpart = sm + xdt_smem_floats(WM, false, kc, NW);  // (TO)
        for (int o = tid; o < TO; o += NT) {
            float v = red[o];
#pragma unroll
            for (int q = 1; q < WK; q++) v += red[q * TO + o];
            cpart[o] = v;
        }
        cg::cluster_group cl = cg::this_cluster();
        cl.sync();  // every rank's cpart written and visible cluster-wide
        constexpr int PER = TO / XDT_CS;
        static_assert(TO % XDT_CS == 0 && PER <= NT, "xdt_gemm_kernel: cluster split");
        const int q = (int)cl.block_rank();
        if (tid < PER) {
            const int o = q * PER + tid;
            float v = cl.map_shared_rank(cpart, 0u)[o];
#pragma unroll
            for (int s = 1; s < XDT_CS; s++) v += cl.map_shared_rank(cpart, (unsigned)s)[o];
            const int m = m0 + o / XDT_TN, n = n0 + o % XDT_TN;
            if (m < M && n < Nout) C[(int64_t)m * ldc + n] = v;
        }
        cl.sync();  // no CTA leaves (freeing its shared memory) while others still read it
    }
}

std::atomic<unsigned> g_xdt_optin_x{0}, g_xdt_optin_x16{0}, g_xdt_optin_d{0};

// The launch: cluster dimension (x_proj) and programmatic stream serialization together
// (bm_launch_pdl sets only the latter); BLACKMAMBA_CUDA_PDL=0 turns PDL off as there.
template <typename... KArgs, typename... Args>
cudaError_t xdt_launch(void (*kernel)(KArgs...), dim3 grid, int threads, int cluster_x,
                       size_t smem, cudaStream_t stream, Args... args) {
    return bm_launch_ex(kernel, grid, dim3(threads), smem, stream, bm_pdl_allowed(),
                        (unsigned)cluster_x, false, args...);
}

// x_proj's warps a CTA at M rows, 8 or 16 (16: the K slice split over twice the warps, half
// the FMAs a thread). BLACKMAMBA_XDT_WARPS=8 / 16 forces one; unset: 16 up to 32 rows, else
// 8 (measured on the H200, 2.8B shape, same process, 3 rounds, cuda/NOTES.md session 9:
// B = 16 1.953 -> 1.935 ms a step, B = 32 2.147 -> 2.128; B = 64 2.354 -> 2.418, x_proj 9.0
// -> 12.3 us a call). Read at launch, i.e. at graph capture.
int xdt_xproj_warps(int64_t M) {
    const char *e = getenv("BLACKMAMBA_XDT_WARPS");
    const int v = e ? atoi(e) : 0;
    return v == 8 || v == 16 ? v : M <= 32 ? 16 : 8;
}

// A 9.0 device with `smem` bytes of shared memory a block; *optin: the device's most.
int xdt_check_dev(size_t smem, int *optin_out) {
    int dev = 0, major = 0, optin = 0;
    BM_CUDA_TRY(cudaGetDevice(&dev));
    BM_CUDA_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    BM_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    if (major < 9) return BM_CUDA_ARG_FAIL("xdt: needs a 9.0 device (thread-block clusters)");
    if (smem > (size_t)optin) return BM_CUDA_ARG_FAIL("xdt: tile too large for shared memory");
    *optin_out = optin;
    return 0;
}

int64_t xdt_kc(int64_t E) { return bm_cdiv(bm_cdiv(E, XDT_CS), 4) * 4; }

}  // namespace

// Can the xdt kernels run these shapes and pointers (else the engine keeps cuBLAS)?
bool bm_xdt_ok(int64_t M, int64_t E, int64_t R, int64_t N, const void *xc, const void *x_w,
               const void *dbc, const void *dt_w, const void *delta) {
    const int64_t P = R + 2 * N;
    if (M < 1 || E < 4 || R < 4 || E % 4 || R % 4 || P % 4) return false;
    if (M > 65535 * 16 || E > (1 << 24) || P > (1 << 24)) return false;
    if ((((uintptr_t)xc | (uintptr_t)x_w | (uintptr_t)dbc | (uintptr_t)dt_w) & 15) ||
        ((uintptr_t)delta & 3))
        return false;
    int dev = 0, major = 0, optin = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) !=
            cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    return major >= 9 && (size_t)xdt_smem_floats(1, true, (int)xdt_kc(E)) * 4 <= (size_t)optin &&
           (size_t)xdt_smem_floats(2, false, (int)R) * 4 <= (size_t)optin;
}

// dbc (M, P) = xc (M, E) @ x_w^T, x_w (P, E) float32: the cluster K-split kernel.
int bm_xdt_xproj(const float *xc, const float *x_w, float *dbc, int64_t M, int64_t P,
                 int64_t E, cudaStream_t stream) {
    if (E % 4 || (((uintptr_t)xc | (uintptr_t)x_w) & 15))
        return BM_CUDA_ARG_FAIL("xdt x_proj: needs E % 4 == 0 and 16-byte aligned rows");
    const int kc = (int)xdt_kc(E);
    const int nw = xdt_xproj_warps(M);
    const size_t smem = (size_t)xdt_smem_floats(1, true, kc, nw) * 4;
    int optin = 0;
    if (int st = xdt_check_dev(smem, &optin)) return st;
    auto *k = nw == 16 ? xdt_gemm_kernel<1, true, 16> : xdt_gemm_kernel<1, true>;
    // the device's most, once (bm_smem_optin sets it once per device, whatever E comes later)
    if (int st = bm_smem_optin(k, optin, nw == 16 ? g_xdt_optin_x16 : g_xdt_optin_x)) return st;
    g_xdt[0].fetch_add(1, std::memory_order_relaxed);
    const dim3 grid(XDT_CS, (unsigned)bm_cdiv(P, XDT_TN), (unsigned)bm_cdiv(M, 16));
    BM_CUDA_TRY(xdt_launch(k, grid, 32 * nw, XDT_CS, smem, stream, xc, (int64_t)E, x_w, dbc,
                           (int64_t)P, (int)M, (int)P, (int)E, kc));
    return 0;
}

// delta (M, E) = dbc[:, :R] (M, ld P) @ dt_w^T, dt_w (E, R) float32: 32-row tiles
// (xdt_gemm_kernel<2, false>; 64-row tiles measured slower, cuda/NOTES.md session 7).
int bm_xdt_dtproj(const float *dbc, int64_t P, const float *dt_w, float *delta, int64_t M,
                  int64_t E, int64_t R, cudaStream_t stream) {
    if (R % 4 || P % 4 || (((uintptr_t)dbc | (uintptr_t)dt_w) & 15))
        return BM_CUDA_ARG_FAIL("xdt dt_proj: needs R, P % 4 == 0 and 16-byte aligned rows");
    constexpr int WM = 2;
    const size_t smem = (size_t)xdt_smem_floats(WM, false, (int)R) * 4;
    int optin = 0;
    if (int st = xdt_check_dev(smem, &optin)) return st;
    auto *k = xdt_gemm_kernel<WM, false>;
    if (smem > 48 * 1024)
        if (int st = bm_smem_optin(k, optin, g_xdt_optin_d)) return st;
    g_xdt[1].fetch_add(1, std::memory_order_relaxed);
    const dim3 grid(1, (unsigned)bm_cdiv(E, XDT_TN), (unsigned)bm_cdiv(M, 16 * WM));
    BM_CUDA_TRY(xdt_launch(k, grid, XDT_THREADS, 1, smem, stream, dbc, P, dt_w, delta, E,
                           (int)M, (int)E, (int)R, (int)R));
    return 0;
}

// Tests: both products on device arrays (eager, on `stream`), as the engine runs them.
extern "C" int bm_cuda_xdt_products(const float *xc, const float *x_w, const float *dt_w,
                                    float *dbc, float *delta, int64_t M, int64_t E, int64_t R,
                                    int64_t N, void *stream) {
    if (!bm_xdt_ok(M, E, R, N, xc, x_w, dbc, dt_w, delta))
        return BM_CUDA_ARG_FAIL("xdt: shape, alignment or device not supported");
    cudaStream_t st = (cudaStream_t)stream;
    const int64_t P = R + 2 * N;
    if (int s = bm_xdt_xproj(xc, x_w, dbc, M, P, E, st)) return s;
    if (int s = bm_xdt_dtproj(dbc, P, dt_w, delta, M, E, R, st)) return s;
    BM_CUDA_TRY(cudaStreamSynchronize(st));
    return 0;
}

// Launches so far of the x_proj (kind 0) and dt_proj (kind 1) kernels (counted at launch,
// so a captured graph counts once); -1 for another kind.
extern "C" long long bm_cuda_xdt_launches(int kind) {
    if (kind < 0 || kind > 1) return -1;
    return g_xdt[kind].load(std::memory_order_relaxed);
}
