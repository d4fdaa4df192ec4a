"""Timing helpers of the dev benchmarks (torch's CUDA graphs and events on the current device).

Not part of the package. One copy for bench_grouped, bench_scanvar, bench_scanseg and
bench_kernels, which each had their own.
"""
import statistics

import torch


def graph_ms(fn, inner=3, reps=11):
    """Median ms of one fn() (fn enqueues work on the current stream): `inner` calls captured
    into one CUDA graph (after 3 eager warm-up calls), replayed `reps` times between events."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for _ in range(inner):
            fn()
    g.replay()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(reps)]
    for a, b in ev:
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev) / inner


def events_ms(fn, inner=10, reps=7, sleep_cycles=1_000_000):
    """Median ms of one fn() launched eagerly (work that cannot be captured, e.g. with host
    synchronisation): a GPU sleep first lets the host queue the launches ahead of the GPU."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(sleep_cycles)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / inner)
    return statistics.median(ts)
