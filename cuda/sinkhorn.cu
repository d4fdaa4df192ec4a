// sinkhorn.cu: Sinkhorn balancing of router logits (SPEC 3.2) in one launch of one block.
//
//   C = exp(2 S) (BlackMamba) or exp(S) (uniform);  d1 = 1/(X colsum C) or ones
//   repeat: d0 = (1/T) / (C d1 + 1e-8);  d1 = (1/X) / (C^T d0 + 1e-8)
//           until mean |d1 - d1_prev| <= tol
//   P = diag(d0) C diag(d1)
//
// Each iteration is one pass over C: a group of G = pow2ceil(X) lanes takes a row, forms
// d0[t] with a shuffle sum and adds C[t, :] * d0[t] into per-lane column partials; the block
// then sums the partials per column. d0 is never stored (the last one is recomputed for P).
// Sums and d0/d1 are float64 (the reference is float64, and the stopping test compares tiny
// differences); C is float32, in shared memory when it fits, else in P itself.
#include "common.cuh"

namespace {

constexpr int SK_THREADS = 1024;
constexpr int SK_MAX_X = 64;
constexpr int SK_SMEM_C = 50000;  // floats of C kept in shared memory (200 KB)

__global__ __launch_bounds__(SK_THREADS) void sinkhorn_kernel(
    const float *__restrict__ S,  // (T, X)
    float *P,                     // (T, X); holds C during the iterations if !c_in_smem
    int T, int X, float tol, int init, int max_iters,
    int *__restrict__ iters,      // (1)
    int c_in_smem) {
    extern __shared__ float smem_c[];
    __shared__ double part[SK_THREADS][2];  // per-thread column partials (columns g, g+G)
    __shared__ double d1[SK_MAX_X], d1_prev[SK_MAX_X], diff[SK_MAX_X];
    __shared__ int done;
    float *C = c_in_smem ? smem_c : P;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int G = 1;
    while (G < X && G < 32) G *= 2;
    const int g = lane % G;             // column g (and g + G) of the row
    const int rpw = 32 / G;             // rows a warp takes at once
    const int rsub = lane / G;
    const int stride = (SK_THREADS / 32) * rpw;
    const bool col0 = g < X, col1 = g + G < X;
    const double invT = 1.0 / T, invX = 1.0 / X;

    const float sc = init == BM_SINKHORN_BLACKMAMBA ? 2.f : 1.f;
    for (int64_t i = tid; i < (int64_t)T * X; i += SK_THREADS) C[i] = expf(sc * S[i]);
    __syncthreads();

    // One pass over C: column sums of C * d0 (d0 from d1, or d0 = 1 when use_d1 is false).
    // Leaves colsum of column i (i < X) in thread i's return value.
    auto col_pass = [&](bool use_d1) -> double {
        double p0 = 0.0, p1 = 0.0;
        for (int t0 = warp * rpw; t0 < T; t0 += stride) {
            const int t = t0 + rsub;
            const bool ok = t < T;
            const float c0 = (ok && col0) ? C[(int64_t)t * X + g] : 0.f;
            const float c1 = (ok && col1) ? C[(int64_t)t * X + g + G] : 0.f;
            double d0 = 1.0;
            if (use_d1) {
                double s = (col0 ? c0 * d1[g] : 0.0) + (col1 ? c1 * d1[g + G] : 0.0);
                for (int o = G / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
                d0 = invT / (s + 1e-8);
            }
            if (ok) {
                p0 += c0 * d0;
                p1 += c1 * d0;
            }
        }
        part[tid][0] = p0;
        part[tid][1] = p1;
        __syncthreads();
        double cs = 0.0;
        if (tid < X) {
            const int k = tid / G;  // which of the lane's two columns
            for (int j = tid % G; j < SK_THREADS; j += G) cs += part[j][k];
        }
        return cs;
    };

    if (tid < SK_MAX_X) d1[tid] = 1.0;
    __syncthreads();
    if (init == BM_SINKHORN_BLACKMAMBA) {
        const double cs = col_pass(false);
        __syncthreads();  // everyone done reading part
        if (tid < X) d1[tid] = 1.0 / (X * cs);
        __syncthreads();
    }

    int it = 0;
    while (it < max_iters) {
        it++;
        const double cs = col_pass(true);
        if (tid < X) {
            const double nd1 = invX / (cs + 1e-8);
            diff[tid] = fabs(nd1 - d1[tid]);
            d1_prev[tid] = d1[tid];
        }
        __syncthreads();  // all reads of d1 and part done
        if (tid < X) d1[tid] = invX / (cs + 1e-8);
        if (tid == 0) {
            double s = 0.0;
            for (int i = 0; i < X; i++) s += diff[i];
            done = s / X <= (double)tol;
        }
        __syncthreads();
        if (done) break;
    }

    // P = d0 C d1 with the d0 of the last iteration (computed from d1_prev), or d0 = 1.
    for (int t0 = warp * rpw; t0 < T; t0 += stride) {
        const int t = t0 + rsub;
        const bool ok = t < T;
        const float c0 = (ok && col0) ? C[(int64_t)t * X + g] : 0.f;
        const float c1 = (ok && col1) ? C[(int64_t)t * X + g + G] : 0.f;
        double d0 = 1.0;
        if (it > 0) {
            double s = (col0 ? c0 * d1_prev[g] : 0.0) + (col1 ? c1 * d1_prev[g + G] : 0.0);
            for (int o = G / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            d0 = invT / (s + 1e-8);
        }
        if (ok && col0) P[(int64_t)t * X + g] = (float)(d0 * c0 * d1[g]);
        if (ok && col1) P[(int64_t)t * X + g + G] = (float)(d0 * c1 * d1[g + G]);
    }
    if (tid == 0 && iters) *iters = it;
}

}  // namespace

extern "C" int bm_cuda_sinkhorn(const float *S, float *P, int64_t T, int64_t X, float tol,
                                bm_sinkhorn_init init, int max_iters, int *iters,
                                cudaStream_t stream) {
    if (X < 1 || X > SK_MAX_X) return BM_CUDA_ARG_FAIL("sinkhorn: X must be in 1..64");
    if (T > INT32_MAX / SK_MAX_X) return BM_CUDA_ARG_FAIL("sinkhorn: T too large");
    if (T <= 0) {
        if (iters) BM_CUDA_TRY(cudaMemsetAsync(iters, 0, sizeof(int), stream));
        return 0;
    }
    const int c_in_smem = T * X <= SK_SMEM_C;
    const size_t smem = c_in_smem ? (size_t)(T * X) * sizeof(float) : 0;
    static std::atomic<unsigned> optin_done{0};
    if (smem > 48 * 1024) {
        const int st = bm_smem_optin(sinkhorn_kernel, SK_SMEM_C * (int)sizeof(float), optin_done);
        if (st) return st;
    }
    sinkhorn_kernel<<<1, SK_THREADS, smem, stream>>>(S, P, (int)T, (int)X, tol, (int)init,
                                                     max_iters, iters, c_in_smem);
    BM_CUDA_LAUNCHED();
    return 0;
}
