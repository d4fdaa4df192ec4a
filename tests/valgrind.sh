#!/usr/bin/env bash
# valgrind memcheck over a small generate: the tiny-a golden model (float32 and bfloat16
# weights, batch of 2, greedy and sampled, chunked prefill) plus the ops the model does not
# call and a few calls that fail validation (their error paths). The C core is built with -g
# in a scratch copy (CPU only). Fails on any memcheck error not in tests/valgrind.supp, and on
# any definite leak whose allocation stack passes through our extension (CPython and NumPy
# leak a little at exit by design; those stacks do not reach blackmamba/_C).
#
# Under valgrind the CPU reports no AVX-512 (valgrind does not emulate it) but does report
# AVX2+FMA, so the driver runs everything twice: on the AVX2 paths, then with
# BLACKMAMBA_NO_AVX2=1 on the portable C paths; tests/sanitize.sh (ASan + UBSan) runs the
# AVX-512 ones.
#
#   bash tests/valgrind.sh            # ~1 min on 2 cores
#   VALGRIND_SELFTEST=1 bash tests/valgrind.sh   # plants an invalid read: must fail
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
if ! command -v valgrind >/dev/null; then
    echo "valgrind.sh: valgrind is not installed (apt-get install valgrind)" >&2
    exit 2
fi
export BLACKMAMBA_SHARED="${BLACKMAMBA_SHARED:-$(cd "$here/.." && pwd)/shared}"
golden="$BLACKMAMBA_SHARED/golden/tiny-a"
test -f "$golden/pytorch_model.bin" || { echo "valgrind.sh: no $golden" >&2; exit 2; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cp -r "$here/setup.py" "$here/pyproject.toml" "$here/csrc" "$here/blackmamba" "$here/tests" "$tmp/"
rm -f "$tmp"/blackmamba/*.so
cd "$tmp"
CFLAGS="-g" BLACKMAMBA_CUDA=0 BLACKMAMBA_STRICT_BUILD=1 \
    python3 setup.py -q build_ext --inplace 2>&1 | grep -E "error|warning: " || true
test -n "$(ls blackmamba/_C*.so)"
py="$(python3 -c 'import sys; print(sys.executable)')"      # the binary, not a shim script

cat > drive.py <<'PY'
import os, sys
import numpy as np
import blackmamba as bm
from blackmamba import ops

golden = sys.argv[1]


def run():
    for dtype in ("float32", "bfloat16"):
        m = bm.load(golden, dtype=dtype, tokenizer=False)
        st = m.new_state(2)
        logits = m.prefill(np.array([[1, 2, 3, 4, 5], [9, 8, 7, 6, 5]]), st, logits="last")
        toks = []
        for _ in range(10):                        # greedy, no EOS stop: exactly 10 steps
            nxt = logits.argmax(-1)
            toks.append(nxt)
            logits = m.step(nxt, st)
        print(dtype, "greedy", np.stack(toks, 1).tolist())
        print(dtype, "sampled", m.generate([[3, 1, 4], [1, 5, 9, 2, 6]], max_new_tokens=10,
                                           temperature=0.8, top_k=20, seed=1, return_tokens=True))
        full = m(np.array([[7, 7, 1, 2, 3, 4, 5]]))
        st = m.new_state(1)
        chunked = m.prefill(np.array([[7, 7, 1, 2, 3, 4, 5]]), st, chunk_size=3)
        assert np.allclose(full, chunked, atol=1e-4)

    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    x, rw, rb, fc1, fc2 = f(7, 13), f(3, 13), f(3), f(3, 10, 13), f(3, 13, 5)
    out = ops.moe(x, rw, rb, fc1, fc2, return_routing=True)
    ops.moe_experts(x, out[1], out[2], ops.f32_to_bf16(fc1), ops.f32_to_bf16(fc2), "silu")
    ops.sinkhorn(f(7, 3), init="uniform")
    ops.sinkhorn(f(7, 3))
    ops.layer_norm(f(3, 33), f(33), None, f(3, 33))
    # the vector kernels at sizes with tails: Kin = 32 + 8 + 5, E = 13 and 19 channels
    for M in (1, 3, 6, 20):
        ops.linear(f(M, 45), ops.f32_to_bf16(f(5, 45)), f(5))
        ops.linear(f(M, 45), f(5, 45))
    for b, L, E, N in ((2, 9, 13, 5), (1, 3, 19, 16)):
        ops.selective_scan(f(b, L, E), f(b, L, E), -np.exp(f(E, N)), f(b, L, N), f(b, L, N),
                           f(E), f(b, L, E), f(E), state=f(b, E, N))
        ops.selective_state_update(f(b, E, N), f(b, E), f(b, E), -np.exp(f(E, N)), f(b, N),
                                   f(b, N), f(E), f(b, E), f(E))
    ops.causal_conv1d(f(2, 5, 13), f(13, 4), f(13), f(2, 3, 13))
    ops.bf16_to_f32(ops.f32_to_bf16(f(21)))
    for bad in (lambda: ops.linear(x, np.zeros((4, 13), np.int32)),
                lambda: ops.moe_experts(x, out[1] + 3, out[2], fc1, fc2),
                lambda: ops.mlp(x, fc1[0], ops.f32_to_bf16(fc2[0])),
                lambda: ops.selective_scan(f(1, 2, 3), f(1, 2, 3), f(3, 4), f(1, 2, 5), f(1, 2, 4))):
        try:
            bad()
        except (TypeError, ValueError):
            pass


for no_avx2 in ("0", "1"):                       # the AVX2 paths, then the portable ones
    os.environ["BLACKMAMBA_NO_AVX2"] = no_avx2
    print("cpu:", ops.cpu_info())
    run()
if os.environ.get("VALGRIND_SELFTEST"):        # an invalid read valgrind must report
    import ctypes
    p = ctypes.CDLL(None).malloc
    p.restype = ctypes.c_void_p
    ctypes.string_at(p(8), 64)
print("done")
PY

set +e
PYTHONMALLOC=malloc PYTHONPATH="$tmp" OMP_NUM_THREADS=2 valgrind --tool=memcheck \
    --error-exitcode=1 --suppressions="$tmp/tests/valgrind.supp" --num-callers=40 \
    --leak-check=full --show-leak-kinds=definite --errors-for-leak-kinds=none \
    --log-file="$tmp/valgrind.log" "$py" drive.py "$golden"
rc=$?
set -e
python3 - "$tmp/valgrind.log" "$rc" <<'PY'
import re, sys
log, rc = open(sys.argv[1]).read(), int(sys.argv[2])
ours = re.compile(r"blackmamba/_C|csrc/|\b(act|conv|cpu|gemm|moe|module|norm|scan|sinkhorn)\.c:")
blocks = re.split(r"\n==\d+== \n", log)
errors = [b for b in blocks if re.search(r"==\d+== (Invalid|Conditional|Use of|Syscall|"
                                         r"Mismatched|Source and|Argument|Jump)", b)]
leaks = [b for b in blocks if "definitely lost in loss record" in b and ours.search(b)]
summary = re.findall(r"ERROR SUMMARY: .*", log)
print("valgrind:", summary[-1] if summary else "no summary", "| exit status", rc,
      "| definite leaks through blackmamba._C:", len(leaks))
for b in (errors + leaks)[:5]:
    print(re.sub(r"==\d+== ", "", b)[:3000], "\n")
sys.exit(1 if rc or leaks or not summary else 0)
PY
