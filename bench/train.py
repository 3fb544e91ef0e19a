"""Training throughput of optical flavors against their digital twins, measured in one run.

Each case trains the same flavor twice through `run.py` (torchtitan's trainer), once with the
`optical_transformer` converter and once without (train_configs/optical_<flavor>.toml vs
digital_<flavor>.toml, identical otherwise), and reads torchtitan's own per-step metrics:
tokens/s per GPU (`tps`) and peak reserved memory. Steps before `--skip` (compilation, warm-up)
are left out; the figure is the median over the rest.

Command used for bench/results/train-h200.json (one H200):

    python3 bench/train.py --flavors 60M 1.1B --steps 40 --out $OUT/train-h200.json

Several GPUs: `--nproc 4 --parallel "--parallelism.data_parallel_shard_degree 4"`.
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
    })
    return rec


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
    p.add_argument("--out", default="bench/results/train-h200.json")
    args = p.parse_args()
    records = []
    for flavor in args.flavors:
        pair = {mode: run_case(flavor, mode, args) for mode in ("digital", "optical")}
        d, o = pair["digital"].get("tps_per_gpu_median"), pair["optical"].get("tps_per_gpu_median")
        summary = {"case": f"{flavor} x{args.nproc} {args.parallel}".strip(), "flavor": flavor,
                   "nproc": args.nproc, "optical_over_digital_tps": (o / d) if o and d else None,
                   "optical_over_digital_memory": (
                       pair["optical"].get("peak_memory_gib", 0)
                       / pair["digital"]["peak_memory_gib"])
                   if pair["digital"].get("peak_memory_gib") else None,
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
