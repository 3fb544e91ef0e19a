"""Host (CPU) cost per call of the optical layers, against plain PyTorch, in one run.

Small models train launch-bound: at the 60M flavor one optical run alone left most of an H200
idle (nine runs sharing it did 3.5x the optical work of one). This script measures where the
host time of one layer call goes, layer by layer of the stack (kernel launcher, custom op,
module, autograd), on shapes so small that the GPU work is negligible: the wall time per call
is then the host's cost of issuing it.

    python3 bench/overhead.py --out $OUT/overhead-h200.json

``--cprofile`` also writes `<out>.cprofile.txt`: Python's profiler over `--iters` forward+backward
calls of OpticalLinear (functions by own time and by cumulative time), to see which part of
the host path a forward+backward pays for.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import sync  # noqa: E402

ITERS, WARMUP, REPEATS = 300, 30, 5


def per_call_us(fn) -> float:
    for _ in range(WARMUP):
        fn()
    sync()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(ITERS):
            fn()
        sync()
        times.append((time.perf_counter() - start) / ITERS * 1e6)
    return statistics.median(times)


def linear_costs(dev: torch.device, dt: torch.dtype, compile_too: bool) -> dict[str, float]:
    """Microseconds per call of each layer of the optical linear's stack, x [16, 384] -> 1152,
    beside nn.Linear."""
    from torchtitan_ext.optical import ops
    from torchtitan_ext.optical.config import QuantizerConfig
    from torchtitan_ext.optical.kernels import linear as klinear
    from torchtitan_ext.optical.modules import OpticalLinear
    from torchtitan_ext.optical.ranges import update_ranges

    x = torch.randn(16, 384, device=dev, dtype=dt)
    lin = torch.nn.Linear(384, 1152, bias=False, device=dev, dtype=dt)
    opt = OpticalLinear(384, 1152, bias=False, config=QuantizerConfig(), device=dev, dtype=dt)
    opt(x)
    update_ranges(opt)
    ranges = packed = opt.ranges()
    seed = torch.zeros(1, dtype=torch.int64, device=dev)
    index = ops.linear_index(x.shape, 1152)
    xg = x.clone().requires_grad_(True)

    def packed_forward():
        return klinear.forward_packed(x, opt.weight, None, packed, seed, 256, 0.02, 0, index,
                                      True, True, False)

    rec: dict[str, float] = {}
    rec["nn.Linear fwd"] = per_call_us(lambda: lin(x))
    rec["kernels.forward_packed (2 launches)"] = per_call_us(packed_forward)
    rec["kernels.linear_forward (public: ranges stacked, index checked)"] = per_call_us(
        lambda: klinear.linear_forward(
            x, opt.weight, None, ranges[0], ranges[1], ranges[2], seed, levels=256, lut=0.02,
            stream=0, index=klinear.LinearIndex(*index), observe=True))
    rec.update(_host_path_pieces(klinear, x, opt.weight.detach(), ranges, dev, dt))
    if dev.type == "cuda" and klinear.gpu_has_tma(dev):
        # What the host-side TMA descriptors add (against the pointer mainloop of the same tiles).
        for label, tma in (("pointer mainloop", False), ("with TMA descriptors", True)):
            with klinear.override_gemm_config(klinear.GemmConfig(64, 64, 64, 8, 4, 4, tma)):
                rec[f"kernels.forward_packed, {label}"] = per_call_us(packed_forward)
    with torch.no_grad():
        rec["torch.ops.optical.linear (the op alone)"] = per_call_us(
            lambda: torch.ops.optical.linear(x, opt.weight, None, packed, seed, 256, 0.02, 0,
                                             index, True, True, False, None))
    rec["ops.optical_linear (the op with autograd)"] = per_call_us(lambda: ops.optical_linear(
        xg, opt.weight, None, packed, seed, levels=256, lut=0.02, stream=0, index=index,
        observe=True))
    with torch.no_grad():
        opt.eval()
        rec["OpticalLinear fwd (eval, no grad)"] = per_call_us(lambda: opt(x))
        opt.train()
        rec["OpticalLinear fwd (train, no grad: + seed draw, record)"] = per_call_us(lambda: opt(x))
    rec["nn.Linear fwd+bwd"] = per_call_us(lambda: lin(xg).sum().backward())
    rec["OpticalLinear fwd+bwd"] = per_call_us(lambda: opt(xg).sum().backward())
    if compile_too:
        clin = torch.compile(lin, fullgraph=True)
        copt = torch.compile(opt, fullgraph=True)
        rec["compiled nn.Linear fwd+bwd"] = per_call_us(lambda: clin(xg).sum().backward())
        rec["compiled OpticalLinear fwd+bwd"] = per_call_us(lambda: copt(xg).sum().backward())
    return rec


def _host_path_pieces(klinear, x, w, ranges, dev, dt) -> dict[str, float]:
    """Pieces of the host path, one at a time, through the kernels module's public functions:
    one elementwise quantizer launch, the backward with and without its clipped-gradient
    launch (the difference is that launch), the config lookup, and the forward's allocations."""
    g = torch.randn(16, 1152, device=dev, dtype=dt)

    def backward(clipped):
        return klinear.linear_backward(g, x, w, ranges[0], ranges[1], None, clipped=clipped,
                                       has_bias=False, needs_grad=(True, False, False))

    return {
        "  one Triton launch: quantize_tensor (18 args, + its output allocation)": per_call_us(
            lambda: klinear.quantize_tensor(x, ranges[0], None, levels=256, lut=None, stream=0,
                                            noisy=False, index=None)),
        "  linear_backward, grad_x only (one matmul)": per_call_us(lambda: backward(False)),
        "  linear_backward, grad_x only, clipped (+ one clip-grad launch, 8 args)": per_call_us(
            lambda: backward(True)),
        "  config lookup (cached)": per_call_us(
            lambda: klinear.gemm_config(16, 1152, 384, dt, dev)),
        "  allocations as the forward's (obs, y, 2 operand buffers: 4 torch.empty)": per_call_us(
            lambda: (torch.empty(3, 2, device=dev), torch.empty(16, 1152, dtype=dt, device=dev),
                     torch.empty(16, 384, dtype=dt, device=dev),
                     torch.empty(1152, 384, dtype=dt, device=dev))),
    }


def cprofile_linear(dev: torch.device, dt: torch.dtype, path: str, calls: int) -> None:
    """cProfile of `calls` OpticalLinear forward+backward calls (x [16, 384] -> 1152) into
    `path`: the 40 functions with the most own time, then the 40 with the most cumulative."""
    import cProfile
    import io
    import pstats

    from torchtitan_ext.optical.config import QuantizerConfig
    from torchtitan_ext.optical.modules import OpticalLinear
    from torchtitan_ext.optical.ranges import update_ranges

    x = torch.randn(16, 384, device=dev, dtype=dt, requires_grad=True)
    opt = OpticalLinear(384, 1152, bias=False, config=QuantizerConfig(), device=dev, dtype=dt)
    opt(x)
    update_ranges(opt)
    per_call_us(lambda: opt(x).sum().backward())  # warm
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        opt(x).sum().backward()
    sync()
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumulative").print_stats(40)
    with open(path, "w") as f:
        f.write(f"{calls} OpticalLinear forward+backward calls, x [16, 384] {dt} -> 1152\n")
        f.write(buf.getvalue())


def attention_costs(dev: torch.device, dt: torch.dtype) -> dict[str, float]:
    """Microseconds per fwd+bwd call of OpticalAttention beside SDPA, B=1 H=6 Hkv=2 L=64 D=64."""
    from torchtitan_ext.optical.config import QuantizerConfig
    from torchtitan_ext.optical.modules import OpticalAttention
    from torchtitan_ext.optical.ranges import update_ranges

    q = torch.randn(1, 6, 64, 64, device=dev, dtype=dt, requires_grad=True)
    kv = torch.randn(1, 2, 64, 64, device=dev, dtype=dt, requires_grad=True)
    att = OpticalAttention(QuantizerConfig()).to(dev)
    att(q, kv, kv)
    update_ranges(att)
    return {
        "SDPA fwd+bwd (GQA)": per_call_us(lambda: F.scaled_dot_product_attention(
            q, kv, kv, is_causal=True, enable_gqa=True).sum().backward()),
        "OpticalAttention fwd+bwd": per_call_us(lambda: att(q, kv, kv).sum().backward()),
    }


def main() -> None:
    global ITERS, WARMUP, REPEATS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/overhead-h200.json")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run (TRITON_INTERPRET=1)")
    p.add_argument("--iters", type=int, default=ITERS)
    p.add_argument("--cprofile", action="store_true",
                   help="also write <out>.cprofile.txt (cProfile of OpticalLinear fwd+bwd)")
    args = p.parse_args()
    if args.iters != ITERS:
        ITERS, WARMUP, REPEATS = args.iters, max(1, args.iters // 10), 1

    from torchtitan_ext.optical import ops

    dev = torch.device(args.device)
    if dev.type == "cpu":
        ops.set_kernel_mode("triton")
    torch.manual_seed(0)
    rec = {**linear_costs(dev, torch.bfloat16, not args.no_compile),
           **attention_costs(dev, torch.bfloat16)}
    out = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "torch": torch.__version__,
           "shape": "x [16, 384] bf16 -> 1152; attention B=1 H=6 Hkv=2 L=64 D=64",
           "us_per_call": {k: round(v, 1) for k, v in rec.items()}}
    print(json.dumps(out, indent=1))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    if args.cprofile:
        cprofile_linear(dev, torch.bfloat16, args.out + ".cprofile.txt", ITERS)


if __name__ == "__main__":
    main()
