/* norm.c: STUB, to be written (see bm.h). */
#include "bm.h"

bm_status bm_rms_norm(const float *x, const float *residual, const float *w, float eps,
                      float *out, float *res_out, int64_t T, int64_t d) {
    return BM_ERR_INTERNAL;
}

bm_status bm_layer_norm(const float *x, const float *residual, const float *w,
                        const float *bias, float eps, float *out, int64_t T, int64_t d) {
    return BM_ERR_INTERNAL;
}
