"""Bitwise determinism of optical training end to end (semantics 6b), on one GPU.

Three runs of the same flavor through `run.py` (torchtitan's trainer) with `--debug.deterministic`
(torch.use_deterministic_algorithms(True): the attention backward then sums dQ without atomics)
and the same `--debug.seed`:
  a: STEPS steps, a checkpoint at RESUME_STEP;
  b: the same again, in a fresh dump folder;
  resumed: a fresh dump folder holding only a copy of a's `checkpoint/step-RESUME_STEP`, run to
     STEPS: torchtitan loads it and trains steps RESUME_STEP+1 .. STEPS;
  fallback (unless --no-fallback): a copy of a's step-RESUME_STEP and of its newest step folder
     with its largest data file truncated to half (a damaged newest checkpoint): the resume
     skips the damaged folder with a warning, loads step-RESUME_STEP, and must repeat a's
     steps after it as `resumed` does (issue 17's fallback, on the GPU).
Losses are read at full float32 precision from TensorBoard (`loss_metrics/global_avg_loss`), not
from the 5-digit log line. The verdict: a == b at every step, and resumed == a at every step after
RESUME_STEP, bit for bit. Validation runs every `--validation-freq` steps (one right after the
checkpoint, as in the shipped recipes; stop 27 found that it broke resumes). The digital warm-up
is off (optical from the first step, which calibrates the ranges) so that every step runs the
optical kernels.

Command for the lead (one H200, from the repository root):

    PYTHONPATH=$PWD python3 bench/determinism.py --out bench/results/determinism-h200.json

The fallback run answers issue 17 on the GPU: a damaged newest checkpoint is skipped and the
resume still repeats the uninterrupted run.

`--config train_configs/debug_model.toml --extra "--training.seq_len 64 ..."` runs the same check
on the CPU debug model (tests/test_determinism.py does that in CI). Exit status 0 when
deterministic, 1 when not, 2 when a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOSS_TAG = "loss_metrics/global_avg_loss"


def tb_scalars(folder: Path, tag: str = LOSS_TAG) -> dict[int, float]:
    """{step: value} of a TensorBoard scalar over every event file under `folder` (float32 as
    stored: exact, unlike the log line)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[int, float] = {}
    for events in sorted(Path(folder).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            out.update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def compare(a: dict[int, float], b: dict[int, float], resumed: dict[int, float], steps: int,
            resume_step: int) -> dict:
    """The verdict on three loss records (see the module docstring). Losses must be present for
    every expected step: a missing step is a failure, not a pass."""
    want = list(range(1, steps + 1))
    want_resumed = list(range(resume_step + 1, steps + 1))
    runs_equal = sorted(a) == want and sorted(b) == want and all(a[s] == b[s] for s in want)
    resume_equal = (sorted(resumed) == want_resumed and sorted(a) == want
                    and all(resumed[s] == a[s] for s in want_resumed))
    first_diff = next((s for s in want if a.get(s) != b.get(s)), None)
    first_resume_diff = next((s for s in want_resumed if resumed.get(s) != a.get(s)), None)
    return {"deterministic": runs_equal and resume_equal, "runs_identical": runs_equal,
            "resume_identical": resume_equal, "first_differing_step": first_diff,
            "first_differing_resumed_step": first_resume_diff}


def _command(args, dump: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
            "--master_port", str(args.port), "run.py", "--job.config_file", args.config,
            "--job.dump_folder", str(dump), "--training.steps", str(args.steps),
            "--debug.deterministic", "--debug.seed", str(args.seed),
            "--checkpoint.enable", "--checkpoint.interval", str(args.resume_step),
            "--metrics.log_freq", "1", "--metrics.enable_tensorboard",
            *(["--validation.enable", "--validation.freq", str(args.validation_freq),
               "--validation.steps", "2"] if args.validation_freq else ["--validation.no-enable"]),
            "--optical.quant_warmup_steps", "0",
            "--optical.stats_every", "0", *shlex.split(args.extra)]


def run(args, dump: Path) -> dict:
    """One trainer run; its losses from TensorBoard, or the log tail on failure."""
    cmd = _command(args, dump)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=args.timeout)
    rec = {"command": shlex.join(cmd[1:]), "returncode": r.returncode,
           "wall_s": round(time.time() - start, 1)}
    if r.returncode != 0:
        rec["error_tail"] = (r.stdout + r.stderr)[-3000:]
        return rec
    rec["resumed_from_checkpoint"] = "Loading the checkpoint" in r.stdout + r.stderr
    rec["losses"] = tb_scalars(dump)
    rec["skipped_damaged_checkpoint"] = ("skipped newer step folder(s) that cannot be loaded"
                                         in r.stdout + r.stderr)
    return rec


def fallback_run(args, work: Path, ckpt: Path) -> dict:
    """A resume whose newest step folder is damaged (its largest file cut to half): it must warn,
    skip that folder and load `ckpt` instead."""
    newest = max((d for d in ckpt.parent.glob("step-*") if d.is_dir()),
                 key=lambda d: int(d.name.split("-")[1]))
    dest = work / "fallback" / "checkpoint"
    shutil.copytree(ckpt, dest / ckpt.name)
    if newest == ckpt:
        return {"error_tail": f"no step folder newer than {ckpt.name} to damage"}
    shutil.copytree(newest, dest / newest.name)
    victim = max((dest / newest.name).rglob("*.distcp"), key=lambda f: f.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    return {**run(args, work / "fallback"), "damaged": str(victim.relative_to(work))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="train_configs/optical_60M.toml")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--resume-step", type=int, default=10)
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--extra", default="", help="any other torchtitan flags for all three runs")
    p.add_argument("--validation-freq", type=int, default=5,
                   help="validate every N steps (2 batches; 0: off). The shipped recipes validate "
                        "at every checkpoint step, right after the save: the resume must not "
                        "see the validation's noise draws")
    p.add_argument("--workdir", default="/tmp/optical-bench-determinism")
    p.add_argument("--port", type=int, default=29613)
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--out", default="bench/results/determinism-h200.json")
    p.add_argument("--no-fallback", dest="fallback", action="store_false",
                   help="skip the damaged-newest-checkpoint resume")
    args = p.parse_args()
    if not 1 <= args.resume_step < args.steps:
        p.error(f"--resume-step must be in 1..{args.steps - 1}, got {args.resume_step}")
    if args.validation_freq < 0 or (args.validation_freq
                                    and args.resume_step % args.validation_freq):
        p.error(f"--validation-freq must be 0 (off) or divide --resume-step {args.resume_step} "
                f"(a validation right after the resume checkpoint), got {args.validation_freq}")
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    runs = {"a": run(args, work / "a"), "b": run(args, work / "b")}
    ckpt = work / "a" / "checkpoint" / f"step-{args.resume_step}"
    if ckpt.is_dir():
        shutil.copytree(ckpt, work / "resumed" / "checkpoint" / ckpt.name)
        runs["resumed"] = run(args, work / "resumed")
    if ckpt.is_dir() and args.fallback:
        runs["fallback"] = fallback_run(args, work, ckpt)
    failed = [k for k, r in runs.items() if "losses" not in r] or ([] if ckpt.is_dir()
                                                                  else ["no checkpoint"])
    record = {"config": args.config, "steps": args.steps, "resume_step": args.resume_step,
              "seed": args.seed, "extra": args.extra, "failed_runs": failed, "runs": runs}
    try:
        import torch

        record.update(torch=torch.__version__, device=(torch.cuda.get_device_name()
                                                       if torch.cuda.is_available() else "cpu"))
    except Exception:  # noqa: BLE001 - the metadata is optional
        pass
    if not failed:
        record.update(compare(runs["a"]["losses"], runs["b"]["losses"],
                              runs["resumed"]["losses"], args.steps, args.resume_step))
        record["deterministic"] = record["deterministic"] and runs["resumed"][
            "resumed_from_checkpoint"]
        if "fallback" in runs:
            fb = compare(runs["a"]["losses"], runs["a"]["losses"], runs["fallback"]["losses"],
                         args.steps, args.resume_step)
            record["fallback_identical"] = (fb["resume_identical"]
                                            and runs["fallback"]["skipped_damaged_checkpoint"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k != "runs"}))
    print(f"wrote {args.out}")
    ok = record.get("deterministic") and record.get("fallback_identical", True)
    return 2 if failed else (0 if ok else 1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
