"""Training throughput of optical flavors against their digital twins, measured in one run.

Each case trains the same flavor twice through `run.py` (torchtitan's trainer), once with the
`optical_transformer` converter and once without (train_configs/optical_<flavor>.toml vs
digital_<flavor>.toml, identical otherwise), and reads torchtitan's own per-step metrics:
tokens/s per GPU (`tps`) and peak reserved memory. Steps before `--skip` (compilation, warm-up)
are left out; the figure is the median over the rest.

Command used for bench/results/train-h200.json (one H200):

    python3 bench/train.py --flavors 60M 1.1B --steps 40 --out $OUT/train-h200.json

Several GPUs: `--nproc 4 --parallel "--parallelism.data_parallel_shard_degree 4"`.

`--profile`: torchtitan's profiler records the last step of each run; the record then says how
busy the GPU was during that step (the union of its kernels' intervals over the step's wall time:
well under 1 means the step is host-bound) and which kernels took the GPU time. The profiler adds
host time of its own, so read the busy fraction as an upper bound on host-boundness' absence, and
take throughput from runs without it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
STEP = re.compile(
    r"step:\s+(\d+)\s+loss:\s+([0-9.naninf]+).*?memory:\s+([0-9.]+)GiB.*?tps:\s+([0-9,]+)"
)


def parse(log: str) -> dict[int, tuple[float, float, float]]:
    out = {}
    for line in ANSI.sub("", log).splitlines():
        m = STEP.search(line)
        if m:
            out[int(m.group(1))] = (float(m.group(2)), float(m.group(3)),
                                    float(m.group(4).replace(",", "")))
    return out


def run_case(flavor: str, mode: str, args) -> dict:
    dump = Path(args.workdir) / f"{mode}_{flavor}_{args.nproc}"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           "run.py", "--job.config_file", f"train_configs/{mode}_{flavor}.toml",
           "--training.steps", str(args.steps), "--metrics.log_freq", "1",
           "--metrics.no-enable-tensorboard", "--checkpoint.no-enable",
           "--validation.no-enable", "--job.dump_folder", str(dump),
           # Throughput of the optical path itself: no digital warm-up, no statistics steps.
           *(["--optical.quant_warmup_steps", "0", "--optical.stats_every", "0"]
             if mode == "optical" else []),
           *(["--profiling.enable_profiling", "--profiling.profile_freq", str(args.steps),
              "--profiling.profiler_warmup", "1", "--profiling.profiler_active", "1"]
             if args.profile else []),
           *shlex.split(args.parallel), *shlex.split(args.extra)]
    start = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    wall = time.time() - start
    log = r.stdout + r.stderr
    steps = parse(log)
    rec = {"flavor": flavor, "mode": mode, "nproc": args.nproc, "parallel": args.parallel,
           "command": " ".join(cmd[1:]), "returncode": r.returncode, "wall_s": round(wall, 1)}
    if r.returncode != 0 or not steps:
        rec["error_tail"] = log[-3000:]
        return rec
    timed = [v for s, v in sorted(steps.items()) if s > args.skip]
    rec.update({
        "steps_logged": len(steps),
        "tps_per_gpu_median": statistics.median(v[2] for v in timed) if timed else None,
        "peak_memory_gib": max(v[1] for v in steps.values()),
        "loss_first": steps[min(steps)][0],
        "loss_last": steps[max(steps)][0],
        # step: [loss, peak reserved GiB so far, tokens/s]
        "steps": {s: list(v) for s, v in sorted(steps.items())},
    })
    if args.profile:
        traces = sorted(dump.glob("profile_traces/iteration_*/rank0_trace.json"),
                        key=lambda t: int(t.parent.name.split("_")[1]))
        rec["profile"] = profile_summary(traces[-1]) if traces else "no trace written"
    return rec


def profile_summary(trace: Path, top: int = 12) -> dict:
    """GPU busy fraction of the profiled step and its largest kernels (Chrome trace of
    torch.profiler, as torchtitan writes it)."""
    events = json.loads(trace.read_text())["traceEvents"]
    steps = [e for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith("ProfilerStep#")]
    if not steps:
        return {"trace": str(trace), "error": "no ProfilerStep event"}
    step = max(steps, key=lambda e: e["ts"])
    t0, t1 = float(step["ts"]), float(step["ts"]) + float(step["dur"])
    spans, by_name = [], {}
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        a, b = max(float(e["ts"]), t0), min(float(e["ts"]) + float(e["dur"]), t1)
        if b <= a:
            continue
        spans.append((a, b))
        name = str(e.get("name", ""))[:90]
        n, d = by_name.get(name, (0, 0.0))
        by_name[name] = (n + 1, d + (b - a))
    busy, end = 0.0, t0
    for a, b in sorted(spans):  # union of the intervals (kernels of several streams overlap)
        if b > end:
            busy += b - max(a, end)
            end = b
    kernels = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "step_ms": round((t1 - t0) / 1e3, 2),
        "gpu_busy_ms": round(busy / 1e3, 2),
        "gpu_busy_fraction": round(busy / (t1 - t0), 3),
        "kernel_launches": sum(n for n, _ in by_name.values()),
        "top_kernels_ms": [[name, n, round(d / 1e3, 2)] for name, (n, d) in kernels],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flavors", nargs="+", default=["60M", "1.1B"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=10, help="steps left out of the median")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--parallel", default="", help="extra torchtitan parallelism flags")
    p.add_argument("--extra", default="", help="any other torchtitan flags for both modes")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--workdir", default="/tmp/optical-bench-train")
    p.add_argument("--modes", nargs="+", default=["digital", "optical"],
                   choices=["digital", "optical"])
    p.add_argument("--profile", action="store_true",
                   help="profile the last step: GPU busy fraction and top kernels")
    p.add_argument("--out", default="bench/results/train-h200.json")
    args = p.parse_args()
    records = []
    for flavor in args.flavors:
        pair = {mode: run_case(flavor, mode, args) for mode in args.modes}
        d = pair.get("digital", {}).get("tps_per_gpu_median")
        o = pair.get("optical", {}).get("tps_per_gpu_median")
        summary = {"case": f"{flavor} x{args.nproc} {args.parallel}".strip(), "flavor": flavor,
                   "nproc": args.nproc, "optical_over_digital_tps": (o / d) if o and d else None,
                   "optical_over_digital_memory": (
                       pair.get("optical", {}).get("peak_memory_gib", 0)
                       / pair["digital"]["peak_memory_gib"])
                   if pair.get("digital", {}).get("peak_memory_gib") else None,
                   "runs": pair}
        records.append(summary)
        print(json.dumps({k: v for k, v in summary.items() if k != "runs"}), flush=True)
        for mode, rec in pair.items():
            if "error_tail" in rec:
                print(f"--- {mode} {flavor} failed:\n{rec['error_tail']}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(records, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
