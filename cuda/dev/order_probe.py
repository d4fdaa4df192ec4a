"""Does the batch-64 decode time depend on what the process ran before it (dev)? Each run is
a fresh process that loads bench_gpu's random 2.8B model, then for each batch size of its
list (in order) prefills a 32-token prompt, captures the graph and times 50 replays after 10
(cuda_bench_step, as bench_gpu.py). Prints the median ms of each batch size.

    python3 cuda/dev/order_probe.py 64 1,8,64 8,64 copy:64 gemm:64 copy,gemm:1,8,64

A prefix "copy:" / "gemm:" / "copy,gemm:" first runs bench_gpu.py's ceilings in the same
process (cuda_bench_copy of 2 GiB, cuda_bench_gemm of 8192^3), as bench_gpu.py does; "alloc"
allocates and frees 4 GiB instead; "sleep" waits 20 s before the model; "after" times the
batch sizes again after running the ceilings (same model, states and graphs); "pf" runs
three batch-8 prefills of 2048 tokens after loading the model; "l2p0" sets the device's
persisting-L2 set-aside (cudaLimitPersistingL2CacheSize) to 0 before the model, and every run
prints the set-aside it found.
"""
import os
import subprocess
import sys

CHILD = r"""
import sys, os
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import numpy as np
from statistics import median
from bench_gpu import SHAPE_2_8B, random_bf16_tensors
from blackmamba import _lib, model_cuda
from blackmamba.config import Config
C = _lib.C()
pre, _, order = sys.argv[1].rpartition(":")
import ctypes
rt = next(ctypes.CDLL(l.split()[-1]) for l in open("/proc/self/maps") if "libcudart.so" in l)
lim = ctypes.c_size_t(0)
rt.cudaDeviceGetLimit(ctypes.byref(lim), 6)      # cudaLimitPersistingL2CacheSize
found = lim.value
if "l2p0" in pre:
    assert rt.cudaDeviceSetLimit(6, ctypes.c_size_t(0)) == 0
if "copy" in pre:
    C.cuda_bench_copy(2 << 30, 20)
if "gemm" in pre:
    C.cuda_bench_gemm(8192, 8192, 8192, 10)
if "alloc" in pre:
    from blackmamba import cuda as bmc
    a = bmc.to_device(np.zeros(1 << 30, np.float32))
    del a
if "sleep" in pre:
    import time
    time.sleep(20)
cfg = Config.from_dict(dict(SHAPE_2_8B))
model = model_cuda.CudaModel(cfg, random_bf16_tensors(cfg), dtype="bfloat16")
rng = np.random.default_rng(0)
if "pf" in pre:  # a batch-8 prefill of 2048 tokens, 3 times (as bench_gpu's prefill section)
    C.cuda_bench_prefill(model._eng, np.random.default_rng(1).integers(0, cfg.real_vocab_size, (8, 2048)).astype(np.int64), 1, 3)
out, states = [], []
for B in [int(b) for b in order.split(",")]:
    st = model.new_state(B)
    model.prefill(rng.integers(0, cfg.real_vocab_size, (B, 32)), st, logits=None)
    model.step(rng.integers(0, cfg.real_vocab_size, B), st)
    states.append((B, st))
    out.append(f"B={B} {median(C.cuda_bench_step(model._eng, st._h, 10, 50)):.4f}")
if "after" in pre:
    C.cuda_bench_copy(2 << 30, 20)
    C.cuda_bench_gemm(8192, 8192, 8192, 10)
    for B, st in states:
        out.append(f"after B={B} {median(C.cuda_bench_step(model._eng, st._h, 10, 50)):.4f}")
print(sys.argv[1] + f" (persisting L2 set-aside found {found / 2**20:.2f} MB): " + "  ".join(out), flush=True)
"""


def main():
    for order in sys.argv[1:]:
        subprocess.run([sys.executable, "-c", CHILD, order], check=True, env=os.environ)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
