/* sinkhorn.c: STUB, to be written (see bm.h). */
#include "bm.h"

bm_status bm_sinkhorn(const float *S, float *P, int64_t T, int64_t X, float tol,
                      bm_sinkhorn_init init, int max_iters, int *iters) {
    return BM_ERR_INTERNAL;
}
