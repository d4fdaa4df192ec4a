/* conv.c: STUB, to be written (see bm.h). */
#include "bm.h"

bm_status bm_conv_forward(const float *x, const float *w, const float *bias,
                          const float *conv_in, float *conv_out, float *y, int silu, int64_t b,
                          int64_t L, int64_t E, int64_t K) {
    return BM_ERR_INTERNAL;
}

bm_status bm_conv_step(const float *x, float *conv_state, const float *w, const float *bias,
                       float *y, int silu, int64_t b, int64_t E, int64_t K) {
    return BM_ERR_INTERNAL;
}
