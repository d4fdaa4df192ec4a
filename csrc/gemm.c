/* gemm.c: y = x @ W^T for float32 weights (OpenBLAS sgemm/sgemv) and bfloat16 weights
 * (converted tile by tile to float32, then sgemm; a streaming GEMV for few rows). */
#include "bm.h"

#include <cblas.h>
#include <stdlib.h>
#include <string.h>

void bm_bf16_to_f32(const uint16_t *src, float *dst, int64_t n) {
    uint32_t *d = (uint32_t *)dst;
    for (int64_t i = 0; i < n; i++) d[i] = (uint32_t)src[i] << 16;
}

void bm_f32_to_bf16(const float *src, uint16_t *dst, int64_t n) {
    const uint32_t *s = (const uint32_t *)src;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = s[i];
        if ((u & 0x7fffffffu) > 0x7f800000u) dst[i] = (uint16_t)((u >> 16) | 0x40); /* NaN */
        else dst[i] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
}

static void add_bias(float *y, const float *bias, int64_t M, int64_t Nout) {
    if (!bias) return;
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < Nout; n++) y[m * Nout + n] += bias[n];
}

/* Rows of W converted per tile: TILE x Kin floats of scratch. */
#define BF16_TILE 256

static bm_status linear_bf16(const float *x, const uint16_t *W, float *y, int64_t M,
                             int64_t Nout, int64_t Kin) {
    float *tile = malloc(sizeof(float) * BF16_TILE * (size_t)Kin);
    if (!tile) return BM_ERR_NOMEM;
    for (int64_t n0 = 0; n0 < Nout; n0 += BF16_TILE) {
        int64_t nt = Nout - n0 < BF16_TILE ? Nout - n0 : BF16_TILE;
        bm_bf16_to_f32(W + n0 * Kin, tile, nt * Kin);
        /* y[:, n0:n0+nt] = x @ tile^T */
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)M, (int)nt, (int)Kin,
                          1.0f, x, (int)Kin, tile, (int)Kin, 0.0f, y + n0, (int)Nout);
    }
    free(tile);
    return BM_OK;
}

bm_status bm_linear(const float *x, const void *W, bm_dtype wdtype, const float *bias,
                    float *y, int64_t M, int64_t Nout, int64_t Kin) {
    if (M <= 0 || Nout <= 0) return BM_OK;
    if (Kin <= 0) {
        memset(y, 0, sizeof(float) * (size_t)(M * Nout));
        add_bias(y, bias, M, Nout);
        return BM_OK;
    }
    if (wdtype == BM_BF16) {
        bm_status st = linear_bf16(x, (const uint16_t *)W, y, M, Nout, Kin);
        if (st == BM_OK) add_bias(y, bias, M, Nout);
        return st;
    }
    if (wdtype != BM_F32) return BM_ERR_ARG;
    if (M == 1)
        scipy_cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)Nout, (int)Kin, 1.0f,
                          (const float *)W, (int)Kin, x, 1, 0.0f, y, 1);
    else
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)M, (int)Nout, (int)Kin,
                          1.0f, x, (int)Kin, (const float *)W, (int)Kin, 0.0f, y, (int)Nout);
    add_bias(y, bias, M, Nout);
    return BM_OK;
}
