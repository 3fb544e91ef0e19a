"""Fused optical attention vs flash SDPA: fwd+bwd time and peak memory, measured in one run.

Command (H200, from the repository root):

    PYTHONPATH=$PWD python bench/attention.py --sweep --out bench/results/attention-h200.json

Cases: B * L = 32768 held constant (B = 32768 // L), L in 2048 ... 32768, H = 16 (`--heads`),
Hkv = 16 (`--hkv`), D = 128 (`--head-dim`), bf16, causal. For each L, in the same process and on
the same inputs:
- `optical`: torchtitan_ext.optical.kernels.attention.attention_forward + attention_backward
  (ranges initialised, observation on, straight-through gradients: what a training step runs);
- `flash`: F.scaled_dot_product_attention(is_causal=True) forced onto the flash backend, with
  autograd (enable_gqa when Hkv < H). `--baseline cudnn` forces cuDNN's attention instead and
  `--baseline default` lets SDPA choose: on the H200 (torch 2.11) the digital twin's training
  step runs cuDNN's kernels, ~1.6x faster than flash at the 1.1B's 32k shape (stop 19's profile).
  The record's `flash_*` keys hold whichever baseline ran, named in `baseline`;
- `reference`: the materialised plain-torch path (reference.OpticalAttentionFunction), where it fits
  in memory (an out-of-memory error is caught and recorded).
Times: CUDA events around each iteration after warm-up, median of the repeats (METHOD.md;
bench/timing.py).
Peak memory: torch.cuda.max_memory_allocated during one fwd+bwd minus what was allocated before it
(the inputs and dY), so the figure counts outputs, saved tensors, temporaries and gradients.
`--sweep` first times a few kernel configurations at L=4096 (`--sweep-len`), at the run's `--heads`
and `--hkv`, and benchmarks with the fastest.
`--deterministic` also times the deterministic backward (semantics 6b: dQ without atomics, what
`torch.use_deterministic_algorithms(True)` selects) on the same inputs: `det_fwdbwd_ratio` (to
flash), `det_vs_atomic` (to the default optical fwd+bwd), its peak memory, and whether two of
its backward calls gave identical bits (`det_bit_identical`).
`as_trained_ratio` weighs the two passes as a training step runs them: layer-selective activation
checkpointing (torchtitan's `selective_ac_option = "2"`) runs the forward again in every second
layer, so a step costs fwdbwd + `--recompute` x fwd (default 0.5; 0 for no checkpointing, for
per-op SAC, or with `optical.ac_save_attention`, on in the 1.1B's configs since stop 24; 1 for
full).
Each record: {case, B, L, H, D, baseline, fwdbwd_ratio, fwd_ratio, as_trained_ratio,
peak_mem_ratio, raw times (ms) and peaks}.

    PYTHONPATH=$PWD python bench/attention.py --deterministic --lengths 2048,8192 \
        --no-reference --out bench/results/attention-h200-deterministic.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import events_median_ms, peak_extra_mib  # noqa: E402
from torchtitan_ext.optical import reference as R  # noqa: E402
from torchtitan_ext.optical.kernels import attention as A  # noqa: E402

LEVELS, LUT, STREAM = 256, 0.05, 3


class Inputs:
    def __init__(self, B, H, HKV, L, D, dtype, seed=0, baseline="flash"):
        g = torch.Generator(device="cuda").manual_seed(seed)
        mk = lambda h: torch.randn(B, h, L, D, device="cuda", dtype=dtype, generator=g)
        self.q, self.k, self.v, self.dy = mk(H), mk(HKV), mk(HKV), mk(H)
        self.B, self.H, self.HKV, self.L, self.D = B, H, HKV, L, D
        self.baseline = baseline
        self.scale = D ** -0.5
        rng = lambda t: torch.stack([t.float().amin(), t.float().amax()]) * 0.95
        self.q_range, self.k_range, self.v_range = rng(self.q), rng(self.k), rng(self.v)
        # |S| ~ sqrt(D) * |q| * |k| for unit normals: a range that clamps only the far tails
        s_hi = 4.5 * math.sqrt(D)
        self.s_range = torch.tensor([-s_hi, s_hi], device="cuda")
        self.y_range = torch.tensor([-2.0, 2.0], device="cuda")
        self.seeds = torch.tensor([12345, 67890], device="cuda", dtype=torch.int64)
        self.kw = dict(levels=LEVELS, lut=LUT, stream=STREAM, scale=self.scale, causal=True,
                       batch_offset=0, batch_global=B, head_offset=0, heads_global=H)

    def optical_fwd(self):
        return A.attention_forward(self.q, self.k, self.v, self.q_range, self.k_range,
                                   self.v_range, self.s_range, self.y_range, self.seeds,
                                   observe=True, **self.kw)

    def optical_fwdbwd(self, deterministic=False):
        y, stats, obs = self.optical_fwd()
        return A.attention_backward(self.dy, self.q, self.k, self.v, y, stats, self.q_range,
                                    self.k_range, self.v_range, self.s_range, self.seeds,
                                    clipped=False, deterministic=deterministic, **self.kw)

    def optical_det_fwdbwd(self):
        return self.optical_fwdbwd(deterministic=True)

    def _leaves(self):
        return [t.detach().requires_grad_(True) for t in (self.q, self.k, self.v)]

    def _sdpa_backend(self):
        """The baseline's SDPA backend context (`default`: SDPA's own choice, as in training)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        if self.baseline == "default":
            return contextlib.nullcontext()
        return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION,
                            "cudnn": SDPBackend.CUDNN_ATTENTION}[self.baseline])

    def flash_fwd(self):
        q, k, v = self._leaves()
        with self._sdpa_backend():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                  enable_gqa=self.HKV != self.H)

    def flash_fwdbwd(self):
        q, k, v = self._leaves()
        with self._sdpa_backend():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                 enable_gqa=self.HKV != self.H)
        out.backward(self.dy)
        return q.grad, k.grad, v.grad

    def reference_fwdbwd(self):
        q, k, v = self._leaves()
        y = R.OpticalAttentionFunction.apply(
            q, k, v, self.q_range, self.k_range, self.v_range, self.s_range, self.y_range, LEVELS,
            LUT, self.seeds, STREAM, self.scale, True, None, None, False)
        y.backward(self.dy)
        return q.grad, k.grad, v.grad


def tail_check(x: Inputs, rows: int = 64) -> dict:
    """The kernel's last `rows` query rows of (batch 0, head 0) against the materialised reference
    on that slice alone (IndexMap offsets place it in the global S / Y index spaces): evidence that
    the 64-bit noise indices are right at lengths the full reference cannot hold. The reference
    runs on the CPU: on CUDA, torch divides by a Python scalar as a multiply by the reciprocal, so
    its k / (levels - 1) is 1 ulp off for some k, which moves bf16 roundings of y by one ulp."""
    y, _, _ = x.optical_fwd()
    L, i0 = x.L, x.L - rows
    smap = R.IndexMap((0, 0, i0, 0), (x.B, x.H, L, L))
    ymap = R.IndexMap((0, 0, i0, 0), (x.B, x.H, L, x.D))
    c = lambda t: t.cpu()
    ref = R.optical_attention_forward(
        c(x.q[:1, :1, i0:]), c(x.k[:1, :1]), c(x.v[:1, :1]), c(x.q_range), c(x.k_range),
        c(x.v_range), c(x.s_range), c(x.y_range), levels=LEVELS, lut=LUT, seeds=c(x.seeds),
        stream=STREAM, scale=x.scale, causal=True, s_index_map=smap, y_index_map=ymap,
        q_start=i0)
    level = (x.y_range[1] - x.y_range[0]).item() / (LEVELS - 1)
    d = (y[0, 0, i0:].float().cpu() - ref["y"][0, 0].float()).abs()
    return {"tail_check_mismatch_frac": (d > 0).float().mean().item(),
            "tail_check_max_diff_levels": d.max().item() / level,
            "tail_check_max_s_index": x.B * x.H * L * L - 1}


def sweep(D=128, L=4096, H=16, HKV=16, dtype=torch.bfloat16, log=print):
    """Time candidate (BM, BN, warps, stages) configurations at H query and HKV key/value heads;
    return the fastest fwd and bwd."""
    B = 32768 // L
    x = Inputs(B, H, HKV, L, D, dtype, seed=1)
    fwd_cands = [(64, 32, 4, 4), (64, 32, 4, 2), (64, 32, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3)]
    bwd_cands = [(32, 128, 8, 2), (64, 64, 4, 2), (32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 2)]
    res = {"fwd": {}, "bwd": {}}
    y, stats, _ = x.optical_fwd()
    for cfg in fwd_cands:
        try:
            with A.override_configs(fwd=cfg):
                t = events_median_ms(x.optical_fwd, 2, 5)
        except Exception as e:  # a config that does not compile or fit: skip it
            log(f"sweep fwd {cfg}: failed {type(e).__name__}: {str(e)[:200]}")
            continue
        res["fwd"][cfg] = t
        log(f"sweep fwd {cfg}: {t:.3f} ms")
    for cfg in bwd_cands:
        def bwd():
            return A.attention_backward(x.dy, x.q, x.k, x.v, y, stats, x.q_range, x.k_range,
                                        x.v_range, x.s_range, x.seeds, clipped=False, **x.kw)
        try:
            with A.override_configs(bwd=cfg):
                t = events_median_ms(bwd, 2, 5)
        except Exception as e:
            log(f"sweep bwd {cfg}: failed {type(e).__name__}: {str(e)[:200]}")
            continue
        res["bwd"][cfg] = t
        log(f"sweep bwd {cfg}: {t:.3f} ms")
    best = {k: min(v, key=v.get) for k, v in res.items() if v}
    log(f"sweep best: {best}")
    return best, {k: {str(c): t for c, t in v.items()} for k, v in res.items()}


def det_case(x, rec, warmup, reps):
    """The deterministic backward's cost next to the atomic one, and its reproducibility."""
    rec["optical_det_fwdbwd_ms"] = events_median_ms(x.optical_det_fwdbwd, warmup, reps)
    rec["optical_det_peak_extra_mib"] = peak_extra_mib(x.optical_det_fwdbwd)
    rec["det_fwdbwd_ratio"] = rec["optical_det_fwdbwd_ms"] / rec["flash_fwdbwd_ms"]
    rec["det_vs_atomic"] = rec["optical_det_fwdbwd_ms"] / rec["optical_fwdbwd_ms"]
    g1, g2 = x.optical_det_fwdbwd(), x.optical_det_fwdbwd()
    rec["det_bit_identical"] = all(torch.equal(a, b) for a, b in zip(g1, g2))
    fast = x.optical_fwdbwd()
    rec["det_dq_relerr_to_atomic"] = ((g1[0].float() - fast[0].float()).norm()
                                      / fast[0].float().norm()).item()


def as_trained_ratio(rec: dict, recompute: float) -> float:
    """Optical / baseline time of the attention work in one training step: each layer's fwd+bwd
    plus `recompute` (the fraction of layers that activation checkpointing re-runs) forwards."""
    return ((rec["optical_fwdbwd_ms"] + recompute * rec["optical_fwd_ms"])
            / (rec["flash_fwdbwd_ms"] + recompute * rec["flash_fwd_ms"]))


def bench_case(L, H=16, HKV=16, D=128, dtype=torch.bfloat16, reference=True, warmup=3, reps=10,
               log=print, deterministic=False, baseline="flash", recompute=0.5):
    B = 32768 // L
    x = Inputs(B, H, HKV, L, D, dtype, baseline=baseline)
    rec = {"case": f"B{B}-L{L}-H{H}-Hkv{HKV}-D{D}-{str(dtype).split('.')[-1]}", "B": B, "L": L,
           "H": H, "Hkv": HKV, "D": D, "baseline": baseline, "recompute": recompute}
    rec["optical_fwdbwd_ms"] = events_median_ms(x.optical_fwdbwd, warmup, reps)
    rec["flash_fwdbwd_ms"] = events_median_ms(x.flash_fwdbwd, warmup, reps)
    rec["optical_fwd_ms"] = events_median_ms(x.optical_fwd, warmup, reps)
    rec["flash_fwd_ms"] = events_median_ms(x.flash_fwd, warmup, reps)
    rec["optical_peak_extra_mib"] = peak_extra_mib(x.optical_fwdbwd)
    rec["flash_peak_extra_mib"] = peak_extra_mib(x.flash_fwdbwd)
    inputs_mib = sum(t.numel() * t.element_size() for t in (x.q, x.k, x.v, x.dy)) / 2**20
    rec["inputs_mib"] = inputs_mib
    rec["fwdbwd_ratio"] = rec["optical_fwdbwd_ms"] / rec["flash_fwdbwd_ms"]
    rec["fwd_ratio"] = rec["optical_fwd_ms"] / rec["flash_fwd_ms"]
    rec["as_trained_ratio"] = as_trained_ratio(rec, recompute)
    rec["peak_mem_ratio"] = rec["optical_peak_extra_mib"] / rec["flash_peak_extra_mib"]
    rec["peak_total_ratio"] = ((rec["optical_peak_extra_mib"] + inputs_mib)
                               / (rec["flash_peak_extra_mib"] + inputs_mib))
    # causal fwd+bwd FLOPs of the flash algorithm (fwd 2 matmuls, bwd 5 incl. recompute) / 2
    flops = 7 * 2 * B * H * L * L * D / 2
    rec["flash_fwdbwd_tflops"] = flops / rec["flash_fwdbwd_ms"] / 1e9
    rec["s_elements_per_ns_optical"] = B * H * L * (L + 1) / 2 / rec["optical_fwdbwd_ms"] / 1e6
    rec.update(tail_check(x))
    if deterministic:
        det_case(x, rec, warmup, reps)
    if reference:
        try:
            rec["reference_fwdbwd_ms"] = events_median_ms(x.reference_fwdbwd, 1, 2)
            rec["reference_peak_extra_mib"] = peak_extra_mib(x.reference_fwdbwd)
            rec["reference_fwdbwd_ratio"] = rec["reference_fwdbwd_ms"] / rec["flash_fwdbwd_ms"]
            rec["reference_peak_mem_ratio"] = (rec["reference_peak_extra_mib"]
                                               / rec["flash_peak_extra_mib"])
        except torch.OutOfMemoryError as e:
            rec["reference_fwdbwd_ms"] = "OOM"
            rec["reference_error"] = str(e).splitlines()[0][:200]
        gc.collect()
        torch.cuda.empty_cache()
    log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}))
    return rec


def _print_table(records: list[dict]) -> None:
    print("\n L      B   fwd+bwd ratio  fwd ratio  as trained  peak-mem ratio  optical ms  "
          "baseline ms  reference")
    for r in records:
        if "L" not in r:
            continue
        ref = r.get("reference_fwdbwd_ratio", r.get("reference_fwdbwd_ms", "-"))
        ref = f"{ref:.1f}x" if isinstance(ref, float) else ref
        print(f" {r['L']:<6} {r['B']:<3} {r['fwdbwd_ratio']:>10.2f}x {r['fwd_ratio']:>9.2f}x "
              f"{r['as_trained_ratio']:>9.2f}x {r['peak_mem_ratio']:>12.2f}x "
              f"{r['optical_fwdbwd_ms']:>11.2f} {r['flash_fwdbwd_ms']:>11.2f}  {ref}")
        if "det_fwdbwd_ratio" in r:
            print(f"        deterministic: fwd+bwd {r['det_fwdbwd_ratio']:.2f}x the baseline, "
                  f"{r['det_vs_atomic']:.2f}x the atomic path, "
                  f"bit-identical: {r['det_bit_identical']}")


def parse_config(text: str, flag: str) -> tuple[int, int, int, int]:
    """"BMxBNxWxS" -> (BM, BN, num_warps, num_stages); a malformed one exits naming `flag`."""
    try:
        bm, bn, w, s = (int(v) for v in text.split("x"))
    except ValueError:
        raise SystemExit(f"{flag}: want BMxBNxWxS (four integers, e.g. 64x32x4x2), "
                         f"got {text!r}") from None
    return bm, bn, w, s


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/attention-h200.json")
    ap.add_argument("--lengths", default="2048,4096,8192,16384,32768")
    ap.add_argument("--heads", type=int, default=16, help="query heads H (the 1.1B: 24)")
    ap.add_argument("--hkv", type=int, default=16, help="key/value heads (the 1.1B: 8)")
    ap.add_argument("--baseline", choices=("flash", "cudnn", "default"), default="flash",
                    help="SDPA backend of the baseline: flash (the issue targets), cudnn, or "
                         "default (SDPA's own choice, what training runs)")
    ap.add_argument("--recompute", type=float, default=0.5,
                    help="fraction of layers whose forward activation checkpointing re-runs "
                         "(as_trained_ratio; 0.5: selective every 2nd layer)")
    ap.add_argument("--sweep", action="store_true", help="pick the kernel configs by timing first")
    ap.add_argument("--fwd-config", help="force the forward's BMxBNxWxS (instead of --sweep)")
    ap.add_argument("--bwd-config", help="force the backward's BMxBNxWxS (instead of --sweep)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--reference-max-len", type=int, default=4096,
                    help="skip the materialised reference above this L (O(B H L^2) memory)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--deterministic", action="store_true",
                    help="also time the deterministic backward (dQ without atomics)")
    ap.add_argument("--head-dim", type=int, default=128, choices=A.SUPPORTED_HEAD_DIMS,
                    help="head dim D of every case and of the sweep")
    ap.add_argument("--sweep-len", type=int, default=4096,
                    help="length L that --sweep times configs at (1..32768; B = 32768 // L)")
    args = ap.parse_args()
    if not 1 <= args.sweep_len <= 32768:
        ap.error(f"--sweep-len must be in 1..32768 (B = 32768 // L), got {args.sweep_len}")
    if args.heads < 1 or args.hkv < 1 or args.heads % args.hkv:
        ap.error(f"--heads must be a positive multiple of --hkv, got {args.heads} / {args.hkv}")
    if not 0.0 <= args.recompute <= 1.0:
        ap.error(f"--recompute must be in [0, 1], got {args.recompute}")
    if args.sweep and (args.fwd_config or args.bwd_config):
        ap.error("--sweep picks the configs itself: leave out --fwd-config / --bwd-config")
    fwd_cfg = parse_config(args.fwd_config, "--fwd-config") if args.fwd_config else None
    bwd_cfg = parse_config(args.bwd_config, "--bwd-config") if args.bwd_config else None
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    torch.backends.cuda.matmul.allow_tf32 = False
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__}
    print(json.dumps(meta))
    sweep_res = None
    if args.sweep:
        best, sweep_res = sweep(D=args.head_dim, L=args.sweep_len, H=args.heads, HKV=args.hkv)
        fwd_cfg, bwd_cfg = best.get("fwd"), best.get("bwd")
    records = []
    with A.override_configs(fwd=fwd_cfg, bwd=bwd_cfg):
        for L in [int(s) for s in args.lengths.split(",")]:
            rec = bench_case(L, H=args.heads, HKV=args.hkv, D=args.head_dim, reps=args.reps,
                             baseline=args.baseline, recompute=args.recompute,
                             reference=not args.no_reference and L <= args.reference_max_len,
                             deterministic=args.deterministic)
            rec.update(meta)
            rec["fwd_config"] = list(A.kernel_config("fwd", args.head_dim))
            rec["bwd_config"] = list(A.kernel_config("bwd", args.head_dim))
            records.append(rec)
            gc.collect()
            torch.cuda.empty_cache()
    if sweep_res is not None:
        records.append({"case": f"sweep-L{args.sweep_len}-D{args.head_dim}", "H": args.heads,
                        "Hkv": args.hkv, **sweep_res})
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)
    _print_table(records)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
