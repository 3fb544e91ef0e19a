"""Optical linear (Triton fast path) vs nn.Linear vs mase-triton's OpticalTransformerLinear.

Command (GPU host, repository root; the wheels in .whl are mase-triton 0.0.7 and colorlog, see
below):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site || exit; \
    PYTHONUNBUFFERED=1 python3 bench/linear.py --sweep --out $OUT/linear-h200.json

``--operand-sweep`` times only the operand quantization pass, per configuration of
OPERAND_CONFIGS (how its table entry was chosen; bench/results/README.md, stop 24).
``--sweep`` first times a few GEMM configs of the forward kernel at the large shapes (how the
config table in kernels/linear.py was chosen), uses the best for the records, and writes
{records, sweep, ...} instead of the plain list of records; bench/results/linear-h200.json holds
the records of that run and linear-h200-sweep2.json its sweep. ``--no-mase`` skips mase-triton.
``--shapes 1.1B`` times (and with ``--sweep`` sweeps) the 1.1B flavor's four linear shapes instead
(bench/results/linear-h200-1.1B-sweep-stop27-*.json). ``--config NAME`` forces one of the sweep's
candidates (SWEEP_CONFIGS) where the table gives its large-shape entry: alternating runs with and
without it are an A/B against the table.
Wheels: ``python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
--implementation cp --platform any -d .whl mase-triton==0.0.7 colorlog`` (both pure Python).

Every ratio is measured in the same process, on the same inputs: medians of CUDA-event timings
(triton.testing.do_bench, which flushes L2 between runs) after warm-up. Times are milliseconds.
- fwd_ratio: optical forward / F.linear forward.
- fwdbwd_ratio: optical forward+backward (grads of x, W, b) / the same for F.linear.
- peak_mem_ratio: torch.cuda.max_memory_allocated over one forward+backward (after reset, with
  inputs and grad_output resident) for optical / for F.linear.
- graphs_fwd_ratio, graphs_fwdbwd_ratio (with ``--graphs``): the same four calls each captured in
  a CUDA graph and replayed (triton.testing.do_bench_cudagraph: no host time, no L2 flush), as
  the 60M's compiled blocks run with `optical.cuda_graphs`: what the GPU itself pays. Times in
  `times_ms_graphs`.
- mase_fwdbwd_ratio_vs_linear, speedup_vs_mase: mase-triton's layer in training mode (it updates
  its ranges with host syncs, as in training) fwd+bwd / F.linear's, and over ours.
The optical layer is `OpticalLinear` itself, in training mode (`OpticalLinear.from_linear` over
the same weight and bias parameters as F.linear's; 256 levels, lut 0.02004, EMA 0.9, read-out
noise on): its forward draws a seed on the device, runs the shipped op (ops.optical_linear) and
merges the observed ranges into the pending buffer (device ops, no sync). Its ranges are
calibrated before timing by one training call and `update_ranges` (steady state: every quantizer
active). Timing helpers: bench/timing.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import graph_median_ms, peak_bytes  # noqa: E402
from torchtitan_ext.optical.config import QuantizerConfig  # noqa: E402
from torchtitan_ext.optical.kernels import linear as klinear  # noqa: E402
from torchtitan_ext.optical.modules import OpticalLinear  # noqa: E402
from torchtitan_ext.optical.ranges import update_ranges  # noqa: E402

LARGE = [(16384, 2048, 8192), (16384, 4096, 4096), (8192, 4096, 14336)]
SMALL = [(2048, 384, 1024), (2048, 768, 2048)]
# The 1.1B flavor's linears at its 8 x 2048 rows (dim 1536, 24/8 heads of 64, ffn 5376): wq / wo,
# wk / wv and the feed-forward's two shapes. Its training step runs 336 of these forwards.
FLAVOR_1P1B = [(16384, 1536, 1536), (16384, 1536, 512), (16384, 1536, 5376),
               (16384, 5376, 1536)]
SHAPE_SETS = {"large": LARGE, "small": SMALL, "1.1B": FLAVOR_1P1B}
LEVELS, LUT, SMOOTH = 256, 0.02004, 0.9
_G = klinear.GemmConfig
# --sweep's candidates for the large shapes: (BM, BN, BK, GROUP_M, warps, stages, TMA, epilogue
# chunks, maxnreg). The first run (bench/results/linear-h200-sweep1.json) ruled out 4-warp tiles
# and 4 stages and showed the TMA mainloop ahead of the pointer one; these are the survivors.
SWEEP_CONFIGS = {
    "128x128x64 w8 s3 r128": _G(128, 128, 64, 8, 8, 3, True, 8, 128),
    "128x256x64 w16 s3 r128": _G(128, 256, 64, 8, 16, 3, True, 8, 128),
    "256x128x64 w16 s3 r128": _G(256, 128, 64, 8, 16, 3, True, 8, 128),
    "128x256x64 w8 s3": _G(128, 256, 64, 8, 8, 3, True, 8),
    # Since stop 12 a Philox block serves four outputs: fewer, wider epilogue chunks and
    # larger tiles hold less noise state per thread than before.
    "128x128x64 w8 s3 r128 e4": _G(128, 128, 64, 8, 8, 3, True, 4, 128),
    "128x128x64 w8 s3 r128 e2": _G(128, 128, 64, 8, 8, 3, True, 2, 128),
    "128x256x64 w8 s3 e4": _G(128, 256, 64, 8, 8, 3, True, 4),
    # stop 27, for the 1.1B's shorter K (1536: 24 mainloop steps): deeper and wider variants
    "128x128x64 w8 s2 r128": _G(128, 128, 64, 8, 8, 2, True, 8, 128),
    "256x128x64 w8 s3 e4": _G(256, 128, 64, 8, 8, 3, True, 4),
    "128x64x64 w4 s4": _G(128, 64, 64, 8, 4, 4, True, 4),
}
SWEEP_NONOISE = {"128x128x64 w8 s3 r128", "128x256x64 w16 s3 r128"}  # also timed without noise

_O = klinear.OperandConfig
# --operand-sweep's candidates for the operand pass: (BR, BC, warps, programs per SM -- 0 = one
# program per tile -- and pipelining stages). None is the table's entry.
OPERAND_CONFIGS = {
    "table": None,
    "32x256 w8 (one per tile)": _O(32, 256, 8),  # the table entry before stop 24
    "32x256 w8 p4": _O(32, 256, 8, 4),
    "32x256 w8 p8": _O(32, 256, 8, 8),
    "64x256 w8": _O(64, 256, 8),
    "64x256 w8 p4": _O(64, 256, 8, 4),
    "16x512 w4 p8": _O(16, 512, 4, 8),
    "64x512 w16 p2": _O(64, 512, 16, 2),
    # loads software-pipelined (stop 26): 2 or 3 tiles in flight per program
    "32x256 w8 p4 s2": _O(32, 256, 8, 4, 2),
    "32x256 w8 p4 s3": _O(32, 256, 8, 4, 3),
    "32x256 w8 p2 s3": _O(32, 256, 8, 2, 3),
    "16x512 w4 p8 s2": _O(16, 512, 4, 8, 2),
    "64x256 w8 p2 s2": _O(64, 256, 8, 2, 2),
    "32x256 w8 p2 s4": _O(32, 256, 8, 2, 4),
    "32x256 w8 p1 s4": _O(32, 256, 8, 1, 4),
    "16x512 w4 p4 s3": _O(16, 512, 4, 4, 3),
    "32x512 w8 p2 s3": _O(32, 512, 8, 2, 3),
}
# bench/linear.py's large shapes and, at the 1.1B's 8 x 2048 rows, its wq / wo (1536 -> 1536),
# wk / wv (1536 -> 512) and feed-forward (1536 -> 5376, 5376 -> 1536) shapes. (Stop 24's sweep,
# linear-operands-h200-stop24.json, ran 1536 -> 1536 / 4096 and 4096 -> 1536 instead.)
OPERAND_SHAPES = LARGE + FLAVOR_1P1B
OPERAND_KERNEL = klinear.triton_kernel("operands").__name__  # its name in profiler traces


def _optical_layer(w: torch.nn.Parameter, b: torch.nn.Parameter) -> OpticalLinear:
    """OpticalLinear over the parameters `w` [N, K] and `b` [N] (the same objects F.linear
    times), in training mode, with this benchmark's quantizer settings."""
    N, K = w.shape
    linear = torch.nn.Linear(K, N, bias=True, device="meta")
    linear.weight, linear.bias = w, b
    config = QuantizerConfig(q_levels=LEVELS, q_lut_min=LUT, q_smooth_factor=SMOOTH)
    return OpticalLinear.from_linear(linear, config).train()


def _calibrate(layer: OpticalLinear, x: torch.Tensor) -> None:
    """One training call, then the ranges take its observation (update_ranges' first step)."""
    with torch.no_grad():
        layer(x)
    update_ranges(layer)


def _median_ms(fn, rep_ms=150):
    return triton.testing.do_bench(fn, warmup=30, rep=rep_ms, return_mode="median")


def _mase_layer(K, N, w, b):
    try:
        from mase_triton.optical_compute.layers import OpticalTransformerLinear
    except Exception as e:  # noqa: BLE001
        print(f"mase-triton unavailable: {e!r}")
        return None
    layer = OpticalTransformerLinear(K, N, bias=True, device="cuda", dtype=w.dtype,
                                     q_levels=LEVELS, q_lut_min=LUT)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    layer.train()
    return layer


def _interleaved_medians(fns: dict, timer=None) -> dict:
    """Milliseconds per call of each function: the functions interleaved, twice, and the median
    of the two medians kept (every arm sees the same clocks); `<name>_runs` holds both. `timer`
    (fn -> ms) defaults to `_median_ms`."""
    timer = timer or _median_ms
    runs = {k: [] for k in fns}
    for _ in range(2):
        for k, fn in fns.items():
            runs[k].append(timer(fn))
    t = {}
    for k, v in runs.items():
        t[k] = statistics.median(v)
        t[k + "_runs"] = v
    return t


def _mase_ratios(x, w, b, gy, t: dict) -> dict:
    """mase-triton's optical layer on the same tensors: its times go into `t`; returns its
    ratios to nn.Linear and ours to it (empty when mase-triton is not installed)."""
    N, K = w.shape
    layer = _mase_layer(K, N, w.detach(), b.detach())
    if layer is None:
        return {}
    xm = x.detach().clone().requires_grad_()

    def mase_fwd():
        with torch.no_grad():
            return layer(xm)

    def mase_fwdbwd():
        return torch.autograd.grad(layer(xm), (xm, layer.weight, layer.bias), gy)

    mase_fwdbwd()  # autotune + initialise its ranges
    torch.cuda.synchronize()
    t["mase_fwd"] = _median_ms(mase_fwd)
    t["mase_fwdbwd"] = _median_ms(mase_fwdbwd)
    return {"mase_fwd_ratio_vs_linear": t["mase_fwd"] / t["lin_fwd"],
            "mase_fwdbwd_ratio_vs_linear": t["mase_fwdbwd"] / t["lin_fwdbwd"],
            "speedup_vs_mase": t["mase_fwdbwd"] / t["opt_fwdbwd"],
            "speedup_vs_mase_fwd": t["mase_fwd"] / t["opt_fwd"]}


def bench_shape(M, K, N, dtype, with_mase, case, graphs=False):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(M + K + N)
    x = torch.randn(M, K, device=dev, dtype=dtype, generator=g).requires_grad_()
    w = torch.nn.Parameter(torch.randn(N, K, device=dev, dtype=dtype, generator=g) * K ** -0.5)
    b = torch.nn.Parameter(torch.randn(N, device=dev, dtype=dtype, generator=g) * 0.1)
    gy = torch.randn(M, N, device=dev, dtype=dtype, generator=g)
    optical = _optical_layer(w, b)

    def opt_fwd():
        with torch.no_grad():
            return optical(x)

    def lin_fwd():
        with torch.no_grad():
            return F.linear(x, w, b)

    def opt_fwdbwd():
        return torch.autograd.grad(optical(x), (x, w, b), gy)

    def lin_fwdbwd():
        return torch.autograd.grad(F.linear(x, w, b), (x, w, b), gy)

    _calibrate(optical, x)  # steady state: every quantizer is active
    opt_fwdbwd()  # compile
    torch.cuda.synchronize()
    ranges = optical.ranges()
    assert bool((ranges[:, 0] <= ranges[:, 1]).all()), ranges
    rec = {"case": case, "M": M, "K": K, "N": N, "dtype": str(dtype).replace("torch.", "")}
    calls = {"lin_fwd": lin_fwd, "opt_fwd": opt_fwd, "lin_fwdbwd": lin_fwdbwd,
             "opt_fwdbwd": opt_fwdbwd}
    t = _interleaved_medians(calls)
    if graphs:
        tg = _interleaved_medians(calls, graph_median_ms)
        rec.update(graphs_fwd_ratio=tg["opt_fwd"] / tg["lin_fwd"],
                   graphs_fwdbwd_ratio=tg["opt_fwdbwd"] / tg["lin_fwdbwd"], times_ms_graphs=tg)
    lin_peak, base = peak_bytes(lin_fwdbwd, empty_cache=True)
    opt_peak, _ = peak_bytes(opt_fwdbwd, empty_cache=True)
    rec.update(
        fwd_ratio=t["opt_fwd"] / t["lin_fwd"],
        fwdbwd_ratio=t["opt_fwdbwd"] / t["lin_fwdbwd"],
        peak_mem_ratio=opt_peak / lin_peak,
        peak_mem_bytes={"linear": lin_peak, "optical": opt_peak, "resident_inputs": base},
    )
    if with_mase:
        rec.update(_mase_ratios(x, w, b, gy, t))
    rec["times_ms"] = t
    flop = 2.0 * M * N * K
    rec["tflops"] = {"linear_fwd": flop / t["lin_fwd"] * 1e-9,
                     "optical_fwd": flop / t["opt_fwd"] * 1e-9}
    del x, w, b, gy, optical
    return rec


def sweep(dtype, shapes=LARGE):
    """Forward-only timings of GEMM configs at `shapes` (ratios to F.linear's forward; the
    SWEEP_NONOISE ones also without the read-out noise), and the device time of the table
    forward's operand pass (`operand_pass_ms`, `operand_pass_GBps`: x and W read and written
    once)."""
    dev = torch.device("cuda")
    out = []
    for (M, K, N) in shapes:
        x = torch.randn(M, K, device=dev, dtype=dtype)
        w = torch.randn(N, K, device=dev, dtype=dtype) * K ** -0.5
        b = torch.randn(N, device=dev, dtype=dtype) * 0.1
        ranges = torch.tensor([[-4.0, 4.0], [-0.1, 0.1], [-3.0, 3.0]], device=dev)
        seed = torch.tensor([12345], device=dev)
        lin = _median_ms(lambda: F.linear(x, w, b))
        row = {"M": M, "K": K, "N": N, "linear_ms": lin}
        for name, cfg in SWEEP_CONFIGS.items():
            for noise in (True, False):
                key = name + ("" if noise else " nonoise")
                if not noise and name not in SWEEP_NONOISE:
                    continue
                try:
                    fn = lambda: klinear.linear_forward(  # noqa: E731
                        x, w, b, *ranges, seed, levels=LEVELS, lut=LUT, stream=0,
                        index=klinear.LinearIndex.whole(M, N), observe=True, noise=noise)
                    with klinear.override_gemm_config(cfg):
                        fn()
                        ms = _median_ms(fn, rep_ms=100)
                    row[key] = ms / lin
                except Exception as e:  # noqa: BLE001
                    row[key] = f"error: {type(e).__name__}: {str(e)[:120]}"
        # the memory-bound operand pass (Q_x and Q_w in one launch) as the table's forward runs
        # it: its kernel's device time, from the profiler
        us = _kernel_us(lambda: klinear.linear_forward(
            x, w, b, *ranges, seed, levels=LEVELS, lut=LUT, stream=0,
            index=klinear.LinearIndex.whole(M, N), observe=True), OPERAND_KERNEL)
        row["operand_pass_ms"] = us * 1e-3
        row["operand_pass_GBps"] = 2 * (M + N) * K * x.element_size() / (us * 1e-6) / 1e9
        print(json.dumps(row), flush=True)
        out.append(row)
        del x, w, b
        torch.cuda.empty_cache()
    return out


def _kernel_us(fn, kernel: str, reps: int = 10) -> float:
    """Mean device time (us) of `kernel` per call of fn, from torch's profiler over reps calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = [r for r in prof.key_averages() if r.key == kernel]
    return rows[0].device_time_total / rows[0].count if rows else math.nan


def operand_sweep(dtype, rounds: int = 5) -> list[dict]:
    """Device time of the operand quantization pass (`_quantize_operands_kernel`) per
    configuration of OPERAND_CONFIGS, in interleaved rounds (median, min, max), with its
    effective bandwidth (x and W read and written once); each configuration's outputs and
    observations are checked against the table's, bit for bit."""
    dev = torch.device("cuda")
    out = []
    for (M, K, N) in OPERAND_SHAPES:
        x = torch.randn(M, K, device=dev, dtype=dtype)
        w = torch.randn(N, K, device=dev, dtype=dtype) * K ** -0.5
        ranges = torch.tensor([[-4.0, 4.0], [-0.1, 0.1], [-3.0, 3.0]], device=dev)
        seed = torch.tensor([12345], device=dev)

        def forward():
            return klinear.linear_forward(x, w, None, *ranges, seed, levels=LEVELS, lut=LUT,
                                          stream=0, index=klinear.LinearIndex.whole(M, N),
                                          observe=True)

        want = forward()
        times = {name: [] for name in OPERAND_CONFIGS}
        for name, cfg in OPERAND_CONFIGS.items():
            with klinear.override_gemm_config(operands=cfg):
                got = forward()
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), name
        for _ in range(rounds):
            for name, cfg in OPERAND_CONFIGS.items():
                with klinear.override_gemm_config(operands=cfg):
                    times[name].append(_kernel_us(forward, OPERAND_KERNEL))
        moved = 2 * (M + N) * K * x.element_size()
        row = {"M": M, "K": K, "N": N, "bytes": moved}
        for name, t in times.items():
            med = statistics.median(t)
            row[name] = {"us": med, "min": min(t), "max": max(t), "TBps": moved / med * 1e-6}
        print(json.dumps(row), flush=True)
        out.append(row)
        del x, w, want
        torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/linear-h200.json")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-mase", action="store_true")
    ap.add_argument("--shapes", default="all", choices=["all", *SHAPE_SETS],
                    help="all = large and small; --sweep sweeps the large ones, or the 1.1B's")
    ap.add_argument("--operand-sweep", action="store_true",
                    help="only time the operand pass's configurations (OPERAND_CONFIGS)")
    ap.add_argument("--graphs", action="store_true",
                    help="also time every call replayed from a CUDA graph (graphs_*_ratio)")
    ap.add_argument("--config", choices=list(SWEEP_CONFIGS), metavar="NAME",
                    help="force one of --sweep's candidates where the table gives its "
                         "large-shape entry (an A/B against the table); one of: "
                         + "; ".join(SWEEP_CONFIGS))
    args = ap.parse_args()
    if args.config and (args.sweep or args.operand_sweep):
        ap.error("--config: --sweep and --operand-sweep pick the configs themselves; "
                 "drop one of the two")
    dtype = torch.bfloat16
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}", flush=True)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": triton.__version__, "records": []}
    t0 = time.time()
    if args.operand_sweep:
        results["operand_sweep"] = operand_sweep(dtype)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"operand sweep done in {time.time() - t0:.0f}s; wrote {args.out}")
        return
    large = SWEEP_CONFIGS[args.config] if args.config else None  # else the table's, or the sweep's
    if args.sweep:
        rows = sweep(dtype, FLAVOR_1P1B if args.shapes == "1.1B" else LARGE)
        results["sweep"] = rows
        # pick the config with the best worst-case forward ratio over the swept shapes
        names = [k for k in SWEEP_CONFIGS if isinstance(rows[0].get(k), float)]
        worst = {k: max(r[k] if isinstance(r[k], float) else math.inf for r in rows)
                 for k in names}
        best = min(worst, key=worst.get)
        results["sweep_worst_fwd_ratio"] = worst
        results["sweep_choice"] = best
        large = SWEEP_CONFIGS[best]
        print(f"sweep done in {time.time() - t0:.0f}s; worst fwd ratio per config: "
              f"{json.dumps(worst)}; using {best}", flush=True)
    sets = ["large", "small"] if args.shapes == "all" else [args.shapes]
    shapes = [(name, s) for name in sets for s in SHAPE_SETS[name]]
    with klinear.override_gemm_config(large=large):
        M, K, N = shapes[0][1]
        results["large_config"] = repr(klinear.gemm_config(M, N, K, dtype, torch.device("cuda")))
        for case, (M, K, N) in shapes:
            rec = bench_shape(M, K, N, dtype, not args.no_mase, f"{case} {M}x{K}->{N}",
                              graphs=args.graphs)
            results["records"].append(rec)
            print(json.dumps(rec), flush=True)
            torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results if args.sweep else results["records"], f, indent=1)
    print(f"\n{'case':28s} {'fwd':>6s} {'fwd+bwd':>8s} {'mem':>6s} {'mase/lin':>9s} "
          f"{'vs mase':>8s} {'graphs fwd':>10s} {'fwd+bwd':>8s}")
    for r in results["records"]:
        print(f"{r['case']:28s} {r['fwd_ratio']:6.3f} {r['fwdbwd_ratio']:8.3f} "
              f"{r['peak_mem_ratio']:6.3f} "
              f"{r.get('mase_fwdbwd_ratio_vs_linear', float('nan')):9.3f} "
              f"{r.get('speedup_vs_mase', float('nan')):8.2f} "
              f"{r.get('graphs_fwd_ratio', float('nan')):10.3f} "
              f"{r.get('graphs_fwdbwd_ratio', float('nan')):8.3f}")
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
