"""Host-side cost of one GPU op call through the bindings (blackmamba.ops -> _C.cuda_<op>):
argument parsing, CAI/DLPack import, validation, output allocation, launch. Small shapes, so
the GPU work is negligible next to the host path; the GPU is synchronised once per batch.

    python3 cuda/dev/bench_bind.py        (on the GPU machine, from the repository root)
"""
import time

import numpy as np

from blackmamba import _lib, cuda, ops


def per_call_us(fn, n=2000):
    for _ in range(50):
        fn()
    cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def main():
    C = _lib.C()
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 2560)).astype(np.float32), np.ones(2560, np.float32)
    W = rng.standard_normal((2560, 2560)).astype(np.float32)
    dx, dw, dW = cuda.to_device(x), cuda.to_device(w), cuda.to_device(W)
    print(f"allocator: {C.cuda_allocator()}")
    rows = [("_C.cuda_rms_norm(DeviceArray)", lambda: C.cuda_rms_norm(dx, dw)),
            ("ops.rms_norm(DeviceArray)", lambda: ops.rms_norm(dx, dw)),
            ("ops.rms_norm numpy (CPU op)", lambda: ops.rms_norm(x, w)),
            ("ops.linear M=1 (GEMV, 26 MB W)", lambda: ops.linear(dx, dW)),
            ("to_device 10 KB + numpy()", lambda: cuda.to_device(x).numpy())]
    try:
        import cupy as cp
        cx, cw = cp.asarray(x), cp.asarray(w)
        rows.append(("ops.rms_norm(cupy) via CAI", lambda: ops.rms_norm(cx, cw)))
    except ImportError:
        pass
    try:
        import torch
        tx, tw = torch.from_numpy(x).cuda(), torch.from_numpy(w).cuda()

        class DL:
            def __init__(self, a):
                self.a = a

            def __dlpack__(self, stream=None):
                return self.a.__dlpack__(stream=stream)

            def __dlpack_device__(self):
                return self.a.__dlpack_device__()
        rows.append(("ops.rms_norm(torch) via CAI", lambda: ops.rms_norm(tx, tw)))
        rows.append(("ops.rms_norm(torch) via DLPack", lambda: ops.rms_norm(DL(tx), DL(tw))))
        rows.append(("torch.from_dlpack(DeviceArray)", lambda: torch.from_dlpack(dx)))
    except ImportError:
        pass
    for m in ("sync", "async"):
        rows.append((f"ops.rms_norm(DeviceArray), {m} alloc", lambda: ops.rms_norm(dx, dw)))
    mode = C.cuda_allocator()
    print(f"{'call':44s} {'us/call':>8s}")
    for name, fn in rows:
        if name.endswith(" alloc"):
            C.cuda_allocator(name.split()[-2])
        print(f"{name:44s} {per_call_us(fn):8.2f}")
    C.cuda_allocator(mode)


if __name__ == "__main__":
    main()
