"""The batched decode's out_proj as two K halves summed by the next layer's routing kernel
(BLACKMAMBA_OUT_KSPLIT, session 9): no split-K reduction kernel between out_proj and the MoE
layer's norm + routing. The whole batched decode with the switch on and off, against each other
and the CPU model, with the products counted (native counter, at graph capture) so that the path
is asserted taken where it applies (a Mamba layer followed by a MoE layer, bf16 math, unsplit
activations) and not elsewhere.

Tolerances: the two halves are the same fp32 partial products cuBLAS's split-K form sums in its
reduction kernel, here summed by the routing kernel before the residual; a last-bit difference
in h may move a later bf16 rounding of the MoE input: 1e-3 between the two paths, 1e-2 against
the CPU model (bf16 math), as tests/test_cuda_xdt.py.
"""
import numpy as np
import pytest

from blackmamba import model_cuda
from blackmamba.model import Model, random_tensors

from conftest import decode_steps as steps, native_count, rel_err, small_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not model_cuda.is_available(),
                                 reason="no CUDA device, or blackmamba built without CUDA")]

SWITCHES = ("BLACKMAMBA_OUT_KSPLIT",)


def calls():
    return native_count("bm_cuda_out_ksplit_calls")


# (B, hidden, layers, math, pairs): the 2.8B width; the small config; a Mamba layer followed by
# a Mamba layer (not paired) then one followed by MoE (paired); bf16x2 (split activations: not
# paired); 8 rows (batched, but its products split: not paired)
CASES = [(64, 1472, ("r", "2"), "bf16", 1), (16, 1472, ("r", "2"), "bf16", 1),
         (40, 64, ("r", "8", "r", "3"), "bf16", 2), (12, 64, ("r", "r", "8"), "bf16", 1),
         (8, 64, ("r", "8", "r", "3"), "bf16", 0), (24, 64, ("r", "8", "r", "3"), "bf16x2", 0)]


@pytest.mark.parametrize("B,hidden,layers,math,pairs", CASES)
def test_out_ksplit_decode(env, B, hidden, layers, math, pairs):
    cfg = small_config(hidden_size=hidden, mamba_moe_layers=list(layers))
    t = random_tensors(cfg, seed=B + hidden)
    g = model_cuda.CudaModel(cfg, t, dtype="bfloat16", math=math)
    c = Model(cfg, t, dtype="bfloat16")
    ids = np.random.default_rng(B).integers(0, g.vocab_size, (B, 5))
    env(BLACKMAMBA_OUT_KSPLIT=1)
    n0 = calls()
    new, want = steps(g, c, ids, 3)
    assert calls() == n0 + pairs              # one product a paired layer, captured once
    assert np.isfinite(new).all()
    assert rel_err(new, want) < (1e-4 if math == "bf16x2" else 1e-2)
    again, _ = steps(g, None, ids, 3)
    np.testing.assert_array_equal(again, new)  # deterministic
    env(BLACKMAMBA_OUT_KSPLIT=0)
    n1 = calls()
    old, _ = steps(g, None, ids, 3)
    assert calls() == n1
    if pairs:
        assert rel_err(new, old) < 1e-3
    else:
        np.testing.assert_array_equal(new, old)
    env()  # unset: the default, on
    n2 = calls()
    dflt, _ = steps(g, None, ids, 3)
    assert calls() == n2 + pairs
    np.testing.assert_array_equal(dflt, new)
