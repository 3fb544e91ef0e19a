"""Cost of the checkpoint checksum manifest: save wall time and step time with and without it.

Trains one flavor twice through `run.py` (train_configs/optical_<flavor>.toml), saving a full
checkpoint every `--interval` steps, once with the manifest (the default) and once with
`--optical.no-checkpoint-manifest`, and reads from the logs:

- `save_s`: torchtitan's own "Finished saving the checkpoint ... in X seconds", the time the
  training thread is blocked by a save (the acceptance figure: growth <= 10%);
- `manifest_s`: the background hashing time of each step folder ("checksum manifest of ...");
- `tps_after_first_save_median` vs `tps_before_first_save_median`: tokens/s once saves (and
  their background hashing) happen vs before (whether the background work slows training).

Command for bench/results/checkpoint-manifest-h200.json (one H200, the 1.1B):

    python3 bench/checkpoint_manifest.py --flavor 1.1B --steps 16 --interval 5 \\
        --workdir /tmp/manifest_bench --out $OUT/checkpoint-manifest-h200.json

The full checkpoint of the 1.1B (weights and AdamW state, fp32) is about 13 GB per step;
`--checkpoint.keep_latest_k 2` bounds the disk used, and each run's folder is removed after it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
SAVE = re.compile(r"Finished saving the checkpoint.*?in ([0-9.]+) seconds")
MANIFEST = re.compile(r"checksum manifest of step-(\d+): (\d+) files, ([0-9.]+) GB hashed in "
                      r"([0-9.]+) seconds")
STEP = re.compile(r"step:\s+(\d+)\s+loss:.*?tps:\s+([0-9,]+)")


def parse(log: str, interval: int) -> dict:
    """Save times, manifest times and tokens/s after saves vs elsewhere, from one run's log."""
    log = ANSI.sub("", log)
    saves = [float(x) for x in SAVE.findall(log)]
    manifests = [{"step": int(s), "files": int(n), "gb": float(gb), "seconds": float(t)}
                 for s, n, gb, t in MANIFEST.findall(log)]
    tps = {int(s): float(t.replace(",", "")) for s, t in STEP.findall(log)}
    # Step 1 (compilation, warm-up) and each step right after a save (its logged time
    # includes the save) are left out; "other" is the first interval, before any save.
    after = [v for s, v in tps.items() if s > interval and s % interval != 1]
    other = [v for s, v in tps.items() if 2 < s <= interval]
    median = statistics.median
    return {
        "save_s": saves,
        "save_s_median": median(saves) if saves else None,
        "manifest": manifests,
        "tps_after_first_save_median": median(after) if after else None,
        "tps_before_first_save_median": median(other) if other else None,
    }


def run(flavor: str, manifest: bool, args) -> dict:
    dump = Path(args.workdir) / f"{flavor}_{'with' if manifest else 'without'}"
    shutil.rmtree(dump, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           "run.py", "--job.config_file", args.config,
           "--training.steps", str(args.steps), "--metrics.log_freq", "1",
           "--metrics.no-enable-tensorboard", "--validation.no-enable",
           "--optical.quant_warmup_steps", "0", "--optical.stats_every", "0",
           "--checkpoint.enable", "--checkpoint.interval", str(args.interval),
           "--checkpoint.no-last-save-model-only", "--checkpoint.keep_latest_k", "2",
           "--job.dump_folder", str(dump)]
    if not manifest:
        cmd.append("--optical.no-checkpoint-manifest")
    begin = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - begin
    shutil.rmtree(dump, ignore_errors=True)
    if r.returncode != 0:
        sys.exit(f"run failed ({r.returncode}): {' '.join(cmd)}\n{(r.stdout + r.stderr)[-4000:]}")
    return {"with_manifest": manifest, "wall_s": wall, **parse(r.stdout + r.stderr, args.interval)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flavor", default="1.1B", help="a flavor with train_configs/optical_<it>.toml")
    ap.add_argument("--config", default=None,
                    help="train config (default train_configs/optical_<flavor>.toml)")
    ap.add_argument("--steps", type=int, default=31, help="training steps per run (> 2 intervals)")
    ap.add_argument("--interval", type=int, default=10, help="checkpoint every N steps (>= 3)")
    ap.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run")
    ap.add_argument("--repeats", type=int, default=1,
                    help="pairs of runs (without, with), alternating")
    ap.add_argument("--workdir", default="/tmp/checkpoint_manifest_bench",
                    help="where the runs' dump folders go (removed after each run)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args()
    args.config = args.config or f"train_configs/optical_{args.flavor}.toml"
    if not (ROOT / args.config).is_file():
        ap.error(f"--flavor/--config: no file {args.config}")
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.interval < 3 or args.steps <= 2 * args.interval:
        ap.error("--interval must be >= 3 and --steps > 2 x --interval (at least two saves)")
    try:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).touch()
    except OSError as e:
        ap.error(f"--out: cannot write {args.out}: {e}")
    runs: list[dict] = []
    for i in range(args.repeats):  # alternating arms, one machine start
        for manifest in (False, True):
            runs.append({"repeat": i, **run(args.flavor, manifest, args)})
            print(json.dumps({k: runs[-1][k] for k in ("repeat", "with_manifest", "save_s")}),
                  flush=True)
            write(args, runs)  # partial results survive a cut-off


def write(args, runs: list[dict]) -> None:
    """The JSON of the runs so far: every save time per arm, their medians and spreads."""
    arms = {}
    for manifest in (False, True):
        saves = [t for r in runs if r["with_manifest"] == manifest for t in r["save_s"]]
        arms["with_manifest" if manifest else "without_manifest"] = {
            "save_s": saves, "save_s_median": statistics.median(saves) if saves else None,
            "save_s_min_max": [min(saves), max(saves)] if saves else None}
    a, b = arms["without_manifest"]["save_s_median"], arms["with_manifest"]["save_s_median"]
    result = {"flavor": args.flavor, "steps": args.steps, "interval": args.interval,
              "nproc": args.nproc, "repeats": args.repeats,
              "save_growth": b / a - 1 if a and b else None, **arms, "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")

if __name__ == "__main__":
    main()
