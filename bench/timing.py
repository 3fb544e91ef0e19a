"""Timing and memory helpers shared by the benchmarks in bench/ (one copy of each).

The scripts import it as `timing` (bench/ is not a package; each script puts its own folder on
sys.path first). torch and triton are imported on first use, so that a script which imports
this module before it needs torch (bench/hf_eval.py) does not pay for them earlier.

- `sync(device)`: wait for the GPU's queued work (nothing on the CPU);
- `events_median_ms(fn, warmup, reps)`: CUDA events around each call after warm-up, median;
- `graph_median_ms(fn, rep)`: `fn` replayed from a CUDA graph (no host time, no L2 flush);
- `peak_bytes(fn)` / `peak_extra_mib(fn)`: the allocator's peak during one call of `fn`.
"""

from __future__ import annotations

import gc
import statistics

__all__ = ["sync", "events_median_ms", "graph_median_ms", "peak_bytes", "peak_extra_mib"]


def sync(device=None) -> None:
    """torch.cuda.synchronize() when `device` is a CUDA device (a torch.device or a string such
    as "cuda:0"); with no device, whenever a CUDA GPU is available."""
    import torch

    if device is None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    elif str(device).startswith("cuda"):
        torch.cuda.synchronize()


def events_median_ms(fn, warmup: int, reps: int) -> float:
    """Milliseconds per call of `fn`: `warmup` untimed calls, then `reps` calls each between two
    CUDA events (synchronised after each); the median."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_median_ms(fn, rep: int = 100, *, call_first: bool = False) -> float:
    """Milliseconds per call of `fn` captured in a CUDA graph and replayed
    (triton.testing.do_bench_cudagraph over `rep` ms, median: no host time, no L2 flush).
    call_first: call `fn` once on the current stream and synchronise before (compiles and
    allocates outside the capture)."""
    import torch
    import triton

    if call_first:
        fn()
        torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def peak_bytes(fn, *, empty_cache: bool = False) -> tuple[int, int]:
    """(peak, base): torch.cuda.max_memory_allocated during one call of `fn` (its result held
    until the peak is read) and what was allocated before it; the peak statistics are reset
    first, after a garbage collection and, with empty_cache, torch.cuda.empty_cache()."""
    import torch

    torch.cuda.synchronize()
    gc.collect()
    if empty_cache:
        torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return peak, base


def peak_extra_mib(fn, *, empty_cache: bool = False) -> float:
    """MiB that one call of `fn` allocated at its peak above what was allocated before it
    (outputs, saved tensors, temporaries, gradients): `peak_bytes`' peak - base."""
    peak, base = peak_bytes(fn, empty_cache=empty_cache)
    return (peak - base) / 2**20
