"""Dev: the batched decode with and without fc2's norm epilogue (BLACKMAMBA_DECODE_NORM_FC2)
on test_cuda_moe64's small model, against the CPU model, under other switches: which path
disagrees. python3 cuda/dev/diag_norm_fc2.py"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
from conftest import decode_steps as steps, rel_err  # noqa: E402
from test_cuda_moe64 import make  # noqa: E402

SETS = [{}, {"BLACKMAMBA_CUDA_PDL": "0"}, {"BLACKMAMBA_MOE_DEC_PDL": "3"},
        {"BLACKMAMBA_MOE_DEC_PDL": "2"}, {"BLACKMAMBA_SCAN4_EARLY": "0"},
        {"BLACKMAMBA_MOE_GROUPED_TILES": "0004"}, {"BLACKMAMBA_MOE_GROUPED_TILES": "0001"},
        {"BLACKMAMBA_L2SIDE": "0"}, {"BLACKMAMBA_XDT_DEC": "0"}]
for B in (9, 12, 16, 24, 32, 64):
    g, c = make(600 + B)
    ids = np.random.default_rng(B + 13).integers(0, g.vocab_size, (B, 5))
    for kv in SETS:
        res = []
        for on in ("0", "1"):
            for k in ["BLACKMAMBA_DECODE_NORM_FC2"] + [k for s in SETS for k in s]:
                os.environ.pop(k, None)
            os.environ.update(kv)
            os.environ["BLACKMAMBA_DECODE_NORM_FC2"] = on
            got, want = steps(g, c, ids, 3)
            res.append((got, want))
        (old, want), (new, _) = res
        print(f"B={B:3d} {str(kv):45s} old {rel_err(old, want):.2e} new {rel_err(new, want):.2e} "
              f"new-old {rel_err(new, old):.2e}", flush=True)
