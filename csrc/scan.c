/* scan.c: STUB, to be written (see bm.h). */
#include "bm.h"

bm_status bm_scan_forward(const float *u, const float *delta, const float *A, const float *Bm,
                          const float *Cm, const float *D, const float *z,
                          const float *delta_bias, int delta_softplus, const float *state_in,
                          float *state_out, float *y, int64_t b, int64_t L, int64_t E,
                          int64_t N) {
    return BM_ERR_INTERNAL;
}

bm_status bm_scan_step(float *state, const float *x, const float *delta, const float *A,
                       const float *Bm, const float *Cm, const float *D, const float *z,
                       const float *delta_bias, int delta_softplus, float *y, int64_t b,
                       int64_t E, int64_t N) {
    return BM_ERR_INTERNAL;
}
