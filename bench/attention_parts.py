"""Where the optical attention's time goes, by leaving one stage out: variants of one shape.

Command (H200, from the repository root; the 1.1B flavor's attention at 32k, batch 1):

    PYTHONPATH=$PWD python bench/attention_parts.py --batch 1 --heads 24 --hkv 8 \
        --head-dim 64 --length 32768 --out bench/results/attention-parts-h200.json

Without hardware counters, a stage's cost is the difference between two variants (H200.md):
- forward: shipped (noise, range observation, pass 2 from the level codes); `noise=False` (no
  Philox: Q_s and Q_y round deterministically); `observe=False` (eval mode); pass 2
  regenerating S (`override_configs(code_scratch_bytes=0)`: one more S generation instead of the
  code round trip); the S draws laid out by broadcasts
  (`override_configs(draws={"fwd": "broadcasts"})`, same bits, no layout conversion:
  bench/noise_layouts.py); and each candidate tile configuration of `--fwd-configs`;
- backward: shipped; `noise=False`; the deterministic dQ path; the draws by broadcasts; each of
  `--bwd-configs`;
- the baselines: SDPA forced onto cuDNN and onto flash, forward and forward+backward.
`--configs-only` times just the shipped kernels, the candidate configurations and the baselines
(a tile sweep without the stage variants' compiles), and checks each candidate's outputs against
the shipped configuration's (`agreement_with_shipped`).
Times: CUDA events, warm-up, median of `--reps` (METHOD.md); the variants alternate in rounds
(`--rounds`), and each record keeps the per-round medians, so drift shows as spread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import attention as bench_attention  # noqa: E402  (its Inputs and config parser)
from timing import events_median_ms  # noqa: E402
from torchtitan_ext.optical.kernels import attention as A  # noqa: E402


def _reg_variant(text: str):
    """"kind:BMxBNxWxS:maxnreg[:programs_per_sm]" -> (kind, config, maxnreg, programs or None);
    programs per SM apply to the persistent forward only."""
    want = ("--reg-variants: want kind:BMxBNxWxS:maxnreg[:programs_per_sm] with kind fwd or bwd "
            "(programs_per_sm: fwd only)")
    parts = text.split(":")
    if (len(parts) not in (3, 4) or parts[0] not in ("fwd", "bwd")
            or (len(parts) == 4 and parts[0] != "fwd")
            or not all(p.isdigit() for p in parts[2:])):
        raise SystemExit(f"{want}, got {text!r}")
    return (parts[0], bench_attention.parse_config(parts[1], "--reg-variants"), int(parts[2]),
            int(parts[3]) if len(parts) == 4 else None)


def variants(x, fwd_cfgs, bwd_cfgs, reg_variants=(), scratch_bytes=None, stages=True):
    """name -> zero-argument callable, each one kernel path of the same inputs; stages=False
    leaves out the stage variants (noise off, observation off, ...), for a tile sweep."""
    def fwd(**kw):
        return A.attention_forward(x.q, x.k, x.v, x.q_range, x.k_range, x.v_range, x.s_range,
                                   x.y_range, x.seeds, **{**x.kw, "observe": True, **kw})
    y, stats, _ = fwd()

    def bwd(**kw):
        return A.attention_backward(x.dy, x.q, x.k, x.v, y, stats, x.q_range, x.k_range,
                                    x.v_range, x.s_range, x.seeds, clipped=False,
                                    **{**x.kw, "deterministic": False, **kw})

    def under(ctx_kw, fn, **kw):
        def run():
            with A.override_configs(**ctx_kw):
                return fn(**kw)
        return run

    v = {"fwd": fwd, "bwd": bwd}
    if stages:
        v.update({"fwd_noise_off": lambda: fwd(noise=False),
                  "fwd_observe_off": lambda: fwd(observe=False),
                  "fwd_pass2_regenerates": under({"code_scratch_bytes": 0}, fwd),
                  "fwd_draws_broadcasts": under({"draws": {"fwd": "broadcasts"}}, fwd),
                  "bwd_noise_off": lambda: bwd(noise=False),
                  "bwd_deterministic": lambda: bwd(deterministic=True),
                  "bwd_draws_broadcasts": under({"draws": {"bwd": "broadcasts"}}, bwd)})
    for c in fwd_cfgs:
        v["fwd_cfg_" + "x".join(map(str, c))] = under({"fwd": c}, fwd)
    for c in bwd_cfgs:
        v["bwd_cfg_" + "x".join(map(str, c))] = under({"bwd": c}, bwd)
    for kind, c, nreg, progs in reg_variants:
        name = f"{kind}_cfg_{'x'.join(map(str, c))}_maxnreg{nreg}" + (f"_p{progs}" if progs else "")
        ctx = {kind: c, "maxnreg": {kind: nreg}, "fwd_programs_per_sm": progs,
               "code_scratch_bytes": scratch_bytes}
        v[name] = under(ctx, fwd if kind == "fwd" else bwd)
    for base in ("cudnn", "flash"):
        v[f"{base}_fwd"] = _bound(x.flash_fwd, x, base)
        v[f"{base}_fwdbwd"] = _bound(x.flash_fwdbwd, x, base)
    return v


def config_agreement(fns: dict) -> dict:
    """For each tile-configuration variant, how far its outputs are from the shipped
    configuration's: forward, the fraction of y elements that differ (accumulation order may
    move a few across a Q_y level) and the largest lse difference; backward, the relative norm
    error of each gradient (dQ adds by atomics in any order). A wrong kernel shows as a large
    figure, a sound one as ~0."""
    def rel(a, b):
        a, b = a.double(), b.double()
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    ref_fwd = fns["fwd"]() if "fwd" in fns else None  # absent: the shipped kernel failed
    ref_bwd = fns["bwd"]() if "bwd" in fns else None
    out = {}
    for name, fn in fns.items():
        if name.startswith("fwd_cfg_") and ref_fwd is not None:
            y, lse, _ = fn()
            out[name] = {"y_differ_frac": (y != ref_fwd[0]).float().mean().item(),
                         "lse_max_diff": (lse - ref_fwd[1]).abs().max().item()}
        elif name.startswith("bwd_cfg_") and ref_bwd is not None:
            out[name] = {g: rel(a.float(), b.float())
                         for g, a, b in zip(("dq", "dk", "dv"), fn(), ref_bwd)}
    return out


def _bound(fn, x, baseline):
    def run():
        x.baseline = baseline
        return fn()
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--fwd-configs", default="64x64x4x2,128x64x8x2,128x32x8x2,64x32x4x3")
    ap.add_argument("--bwd-configs", default="64x64x4x2,32x128x8x2,128x128x8x2,64x128x8x3")
    ap.add_argument("--reg-variants", default="",
                    help="comma-separated kind:BMxBNxWxS:maxnreg[:programs_per_sm] (register cap, "
                         "and for fwd the persistent programs per SM)")
    ap.add_argument("--scratch-bytes", type=int, default=None,
                    help="code-scratch cap for the --reg-variants (more programs need more)")
    ap.add_argument("--configs-only", action="store_true",
                    help="time the shipped kernels, the candidate configurations and the "
                         "baselines only (no stage variants), and check each candidate's "
                         "outputs against the shipped configuration's")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench/results/attention-parts-h200.json")
    args = ap.parse_args()
    parse = bench_attention.parse_config
    fwd_cfgs = [parse(c, "--fwd-configs") for c in args.fwd_configs.split(",") if c]
    bwd_cfgs = [parse(c, "--bwd-configs") for c in args.bwd_configs.split(",") if c]
    reg_variants = [_reg_variant(t) for t in args.reg_variants.split(",") if t]
    x = bench_attention.Inputs(args.batch, args.heads, args.hkv, args.length, args.head_dim,
                               torch.bfloat16)
    fns = variants(x, fwd_cfgs, bwd_cfgs, reg_variants, args.scratch_bytes,
                   stages=not args.configs_only)
    times: dict[str, list[float]] = {k: [] for k in fns}
    failed = {}
    for r in range(args.rounds):
        for name, fn in fns.items():
            if name in failed:
                continue
            try:
                times[name].append(events_median_ms(fn, 2 if r == 0 else 1, args.reps))
            except Exception as e:  # a tile config that does not compile or fit
                failed[name] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"round {r} {name}: {times[name][-1] if times[name] else failed[name]}",
                  flush=True)
    rec = {"shape": {"B": args.batch, "H": args.heads, "Hkv": args.hkv, "D": args.head_dim,
                     "L": args.length, "dtype": "bfloat16", "causal": True},
           "shipped_configs": {k: A.kernel_config(k, args.head_dim) for k in ("fwd", "bwd")},
           "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "median_ms": {k: statistics.median(v) for k, v in times.items() if v},
           "rounds_ms": times, "failed": failed}
    if args.configs_only:
        rec["agreement_with_shipped"] = config_agreement(
            {k: f for k, f in fns.items() if k not in failed})
    med = rec["median_ms"]
    # forward variants against cuDNN's forward; backward variants as fwd + that bwd against
    # cuDNN's fwd+bwd
    rec["ratios_to_cudnn"] = {k: med[k] / med["cudnn_fwd"] for k in med if k.startswith("fwd")}
    rec["ratios_to_cudnn"].update({k: (med["fwd"] + med[k]) / med["cudnn_fwdbwd"]
                                   for k in med if k.startswith("bwd")})
    print(json.dumps(rec, indent=1))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
