/* moe.c: STUB, to be written (see bm.h). */
#include "bm.h"

bm_status bm_route_top1(const float *x, const float *rw, const float *rb, float *logits,
                        int32_t *ids, float *gates, int64_t T, int64_t d, int64_t X) {
    return BM_ERR_INTERNAL;
}

bm_status bm_moe_dispatch(const int32_t *ids, int64_t T, int64_t X, int64_t *counts,
                          int64_t *offsets, int64_t *perm) {
    return BM_ERR_INTERNAL;
}

bm_status bm_moe_experts(const float *x, const int32_t *ids, const float *gates,
                         const void *fc1, const void *fc2, bm_dtype wdtype, bm_act act,
                         float *out, int64_t T, int64_t d, int64_t X, int64_t F) {
    return BM_ERR_INTERNAL;
}

bm_status bm_mlp(const float *x, const void *fc1, const void *fc2, bm_dtype wdtype, bm_act act,
                 int gated, float *out, int64_t T, int64_t d, int64_t F) {
    return BM_ERR_INTERNAL;
}
