"""The optical linear forward at decoding shapes (`generate` with a KV cache: a few rows per
step) under candidate GEMM configs, as GPU time per call inside a CUDA graph (how the
static-cache decoding step runs it), against F.linear in the same graph mode. Issue 15: the
static-cache step of the 60M export is GPU-bound on these calls.

    python3 bench/linear_decode.py --out $OUT/linear-decode-h200.json

Shapes: the 60M's linears (K, N): q/o 384->384, k/v 384->128, w1/w3 384->1024, w2 1024->384;
rows M = batch (8, 32, 64); float32 (the export as saved) and bfloat16. For each config the
figure of merit is one decoding step's linears: the sum over the 60M's seven linears per layer
of (time per call), as a ratio to F.linear's sum. "table" is the configuration
`kernels.linear.gemm_config` gives today. Medians of triton.testing.do_bench_cudagraph.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import graph_median_ms  # noqa: E402
from torchtitan_ext.optical.kernels import linear as klinear  # noqa: E402

# (K, N, calls per layer) of the 60M (dim 384, 2 KV heads of 64, FFN 1024)
SHAPES = [(384, 384, 2), (384, 128, 2), (384, 1024, 2), (1024, 384, 1)]
ROWS = (8, 32, 64)
_G = klinear.GemmConfig
CANDIDATES = {
    "table": None,
    "16x32x64 w4 s2 e2": _G(16, 32, 64, 1, 4, 2, False, 2),
    "16x32x32 w2 s2 e1": _G(16, 32, 32, 1, 2, 2, False, 1),
    "16x64x64 w4 s2 e4": _G(16, 64, 64, 1, 4, 2, False, 4),
    "16x16x64 w2 s2 e1": _G(16, 16, 64, 1, 2, 2, False, 1),
    "32x32x64 w4 s2 e2": _G(32, 32, 64, 1, 4, 2, False, 2),
    "64x32x32 w4 s2 e2": _G(64, 32, 32, 1, 4, 2, False, 2),
}


def _graph_ms(fn) -> float:
    # the first call compiles and allocates outside the capture
    return graph_median_ms(fn, rep=50, call_first=True)


def time_shape(M: int, K: int, N: int, dtype) -> dict:
    """Milliseconds per call of F.linear and of the optical forward under each candidate."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(M * 7919 + N)
    x = torch.randn(M, K, device=dev, dtype=dtype, generator=g)
    w = torch.randn(N, K, device=dev, dtype=dtype, generator=g) * K ** -0.5
    b = torch.randn(N, device=dev, dtype=dtype, generator=g) * 0.1
    ranges = torch.tensor([[-4.0, 4.0], [-0.1, 0.1], [-3.0, 3.0]], device=dev)
    seed = torch.tensor([12345], device=dev)
    index = klinear.LinearIndex.whole(M, N)
    row = {"linear": _graph_ms(lambda: F.linear(x, w, b))}
    for name, cfg in CANDIDATES.items():
        def fn():
            return klinear.linear_forward(x, w, b, *ranges, seed, levels=256, lut=0.02, stream=0,
                                          index=index, observe=False)
        try:
            with klinear.override_gemm_config(cfg):
                row[name] = _graph_ms(fn)
        except Exception as e:  # noqa: BLE001  (a config that does not compile is reported)
            row[name] = f"error: {type(e).__name__}: {str(e)[:160]}"
    row["table_config"] = repr(klinear.gemm_config(M, N, K, dtype, dev))
    return row


def step_ratios(rows: dict) -> dict:
    """Per candidate: one decoding step's linears (calls per layer weighted) over F.linear's."""
    out = {}
    for name in ["linear", *CANDIDATES]:
        vals = [rows[(K, N)][name] for K, N, _ in SHAPES]
        if all(isinstance(v, float) for v in vals):
            out[name] = sum(v * c for v, (_, _, c) in zip(vals, SHAPES))
    lin = out.pop("linear")
    return {"linear_ms_per_layer": lin, **{k: v / lin for k, v in out.items()}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "cases": []}
    t0 = time.time()
    for dtype in (torch.float32, torch.bfloat16):
        for M in ROWS:
            rows = {(K, N): time_shape(M, K, N, dtype) for K, N, _ in SHAPES}
            case = {"dtype": str(dtype).split(".")[-1], "M": M, "step_ratio": step_ratios(rows),
                    "shapes": {f"{K}->{N}": r for (K, N), r in rows.items()}}
            report["cases"].append(case)
            print(json.dumps({k: case[k] for k in ("dtype", "M", "step_ratio")}), flush=True)
    report["seconds"] = time.time() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
