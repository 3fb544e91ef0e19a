"""Convergence experiments of docs/results.md: optical 60M against its digital twin, a precision
sweep and a recipe ablation, each a plain `run.py` training run on the same tokens.

Every run is `torchrun --standalone --nproc_per_node=1 run.py --job.config_file
train_configs/<digital|optical>_60M.toml` plus the overrides listed in RUNS (nothing else
differs: same data order, same seed, same validation tokens). Runs execute concurrently on
one GPU: a 60M model leaves most of an H200 idle, so sharing it costs each run little.

    python3 bench/convergence.py start --workdir /tmp/conv            # returns at once
    python3 bench/convergence.py watch --workdir /tmp/conv --seconds 500 --out $OUT/convergence.json
    python3 bench/convergence.py stop --workdir /tmp/conv --runs q16  # end early, lane too

Without --runs, the report's runs (digital, optical, precision sweep, recipe ablation). Named
with --runs: issue 16's variants (VARIANTS: shot-noise read-out at 1/10/100 photons per MAC,
`q_noise: false`, per-quantizer levels; each trains on a transform written into its run folder)
and second seeds of the twins (`digital_seed1`, `optical_seed1`), e.g.

    python3 bench/convergence.py start --runs digital optical digital_seed1 optical_seed1 \
        shot1 shot10 shot100 noise_off

`start` launches the runs in their own process sessions (they outlive the command); `watch`
prints progress and writes what the logs hold so far: train loss, validation loss, clamp
fractions, tokens/s, and each run's exit status. `bench/plot_convergence.py` turns the JSON
into the plots and tables of the report.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T = "train_configs/transforms/"

# name -> (mode, overrides, what it tests). The recipe is optical_60M.toml as committed.
RUNS: dict[str, tuple[str, list[str], str]] = {
    "digital": ("digital", [], "digital twin"),
    "optical": ("optical", [], "optical recipe, 256 levels"),
    "q64": ("optical", ["--optical.transform_config", T + "optical_64levels.yaml"],
            "optical recipe, 64 levels"),
    "q16": ("optical", ["--optical.transform_config", T + "optical_16levels.yaml"],
            "optical recipe, 16 levels"),
    "no_warmup": ("optical", ["--optical.quant_warmup_steps", "0"],
                  "recipe without the digital warm-up"),
    "no_grad_clip": ("optical", ["--training.max_norm", "1e9"],
                     "recipe without gradient-norm clipping"),
    "unsmoothed": ("optical", ["--optical.transform_config", T + "optical_8bit_unsmoothed.yaml"],
                   "recipe without range smoothing (EMA factor 0)"),
    "clipped_grad": ("optical", ["--optical.transform_config", T + "optical_8bit_clipped.yaml"],
                     "recipe with clipped instead of straight-through gradients"),
    "q16_no_warmup": ("optical", ["--optical.transform_config", T + "optical_16levels.yaml",
                                  "--optical.quant_warmup_steps", "0"],
                      "16 levels without the digital warm-up"),
}

DEFAULT_RUNS = list(RUNS)  # the report's runs; the ones below are named with --runs

# Issue 16's experiments: the recipe's transform (optical_8bit.yaml, or optical_64levels.yaml)
# with keys added to its linear and attention entries; `start` writes the variant into the run's
# folder and trains on it. name -> (base transform, linear keys, attention keys, what it tests).
VARIANTS: dict[str, tuple[str, dict, dict, str]] = {
    **{f"shot{n}": ("optical_8bit.yaml", {"q_readout": "shot", "q_photons_per_mac": float(n)},
                    {"q_readout": "shot", "q_photons_per_mac": float(n)},
                    f"shot-noise read-out, {n} photons per MAC, 256 levels")
       for n in (1, 10, 100)},
    "noise_off": ("optical_8bit.yaml", {"q_noise": False}, {"q_noise": False},
                  "read-out noise off (q_noise: false), 256 levels"),
    "q64_p256": ("optical_64levels.yaml", {}, {"q_levels_p": 256}, "64 levels, Q_p at 256"),
    "q64_s256": ("optical_64levels.yaml", {}, {"q_levels_s": 256}, "64 levels, Q_s at 256"),
    # stop 17: the linears' Q_input alone at 64 cost 0.21 nats, every other quantizer < 0.05
    "q64_input256": ("optical_64levels.yaml", {"q_levels_input": 256}, {},
                     "64 levels, the linears' Q_input at 256"),
    **{f"q256_{k}64": ("optical_8bit.yaml", {f"q_levels_{k}": 64}, {},
                       f"256 levels, the linears' Q_{k} alone at 64")
       for k in ("input", "weight", "output")},
    **{f"q256_{k}64": ("optical_8bit.yaml", {}, {f"q_levels_{k}": 64},
                       f"256 levels, attention's Q_{k} alone at 64")
       for k in ("q", "k", "s", "p", "v", "y")},
}
for _name, (_base, _lin, _att, _what) in VARIANTS.items():
    RUNS[_name] = ("optical", [], _what)
# Second seeds of the twins (issue 18: the gap after a change of the noise bits, within seeds).
RUNS["digital_seed1"] = ("digital", ["--debug.seed", "1"], "digital twin, seed 1")
RUNS["optical_seed1"] = ("optical", ["--debug.seed", "1"], "optical recipe, 256 levels, seed 1")


def variant_transform(name: str) -> str:
    """The YAML of VARIANTS[name]: its base transform with the keys added to the linear entry
    (the pattern naming wq) and the attention entry (the pattern ending in 'attention')."""
    import yaml

    base, lin, att, _ = VARIANTS[name]
    doc = yaml.safe_load((ROOT / T / base).read_text())
    for pattern, cfg in doc["layer_name_to_config"].items():
        if cfg is None:
            continue
        cfg.update(lin if "wq" in pattern else att if pattern.endswith("attention") else {})
    return f"# bench/convergence.py variant {name}: {base} + {lin} (linears), {att} (attention)\n" \
        + yaml.safe_dump(doc, sort_keys=False)


ANSI = re.compile(r"\x1b\[[0-9;]*m")
STEP = re.compile(r"\bstep:\s+(\d+)\s+loss:\s+([-0-9.naninf]+).*?tps:\s+([0-9,]+)")
VAL = re.compile(r"validate step:\s+(\d+)\s+loss:\s+([-0-9.naninf]+)")
CLAMP = re.compile(r"optical clamp fractions step (\d+): (.*)")


def command(name: str, args) -> list[str]:
    mode, overrides, _ = RUNS[name]
    run_dir = Path(args.workdir) / name
    if name in VARIANTS:
        overrides = ["--optical.transform_config", str(run_dir / "transform.yaml"), *overrides]
    seed = [] if "--debug.seed" in overrides else ["--debug.seed", "0"]  # one, named once
    # Checkpoints only where asked (a run evaluated afterwards): the others skip the disk writes.
    ckpt = ["--checkpoint.no-enable"] if name not in args.checkpoint_runs else [
        "--checkpoint.interval", str(args.checkpoint_interval), "--checkpoint.keep_latest_k", "2"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            "run.py", "--job.config_file", f"train_configs/{mode}_60M.toml",
            "--training.steps", str(args.steps), "--job.dump_folder", str(run_dir),
            *ckpt, *seed, *overrides, *shlex.split(args.extra)]


def start(args) -> None:
    """Launch the runs in --max-parallel lanes: each lane is one detached shell that trains its
    runs one after another (a 60M run holds ~10 GiB on an H200: 20 at once ran out of memory)."""
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    lanes: list[list[str]] = [[] for _ in range(min(args.max_parallel, len(args.runs)))]
    for i, name in enumerate(args.runs):
        run_dir = work / name
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("rc", "log.txt", "pid", "stopped"):  # no status of an earlier attempt
            (run_dir / stale).unlink(missing_ok=True)
        if name in VARIANTS:
            (run_dir / "transform.yaml").write_text(variant_transform(name))
        cmd = command(name, args)
        (run_dir / "command.txt").write_text(shlex.join(cmd[1:]) + "\n")
        lanes[i % len(lanes)].append(
            f"{shlex.join(cmd)} > {shlex.quote(str(run_dir / 'log.txt'))} 2>&1; "
            f"echo $? > {shlex.quote(str(run_dir / 'rc'))}")
    # Several runs share the host: one CPU thread each for ops, a few compile workers.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "4"}
    for i, lane in enumerate(lanes):
        proc = subprocess.Popen(["bash", "-c", "; ".join(lane)], cwd=ROOT, start_new_session=True,
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        for name in args.runs[i::len(lanes)]:
            (work / name / "pid").write_text(str(proc.pid))
        print(f"lane {i}: {' then '.join(args.runs[i::len(lanes)])}", flush=True)


def parse_run(run_dir: Path) -> dict:
    name = run_dir.name
    log = ANSI.sub("", (run_dir / "log.txt").read_text(errors="replace")) \
        if (run_dir / "log.txt").exists() else ""
    rec: dict = {"name": name, "what": RUNS.get(name, ("", [], ""))[2],
                 "command": (run_dir / "command.txt").read_text().strip()
                 if (run_dir / "command.txt").exists() else None,
                 "steps": [], "loss": [], "tps": [], "val_steps": [], "val_loss": [],
                 "clamp": {}}
    for line in log.splitlines():
        if m := VAL.search(line):
            rec["val_steps"].append(int(m.group(1)))
            rec["val_loss"].append(float(m.group(2)))
        elif m := STEP.search(line):
            rec["steps"].append(int(m.group(1)))
            rec["loss"].append(float(m.group(2)))
            rec["tps"].append(float(m.group(3).replace(",", "")))
        elif m := CLAMP.search(line):
            rec["clamp"][m.group(1)] = {k: float(v) for k, v in
                                        (kv.split("=") for kv in m.group(2).split())}
    rc = run_dir / "rc"
    rec["returncode"] = int(rc.read_text()) if rc.exists() and rc.read_text().strip() else None
    started = (run_dir / "log.txt").exists()
    rec["status"] = ("stopped" if (run_dir / "stopped").exists()
                     else "queued" if rec["returncode"] is None and not started
                     else "running" if rec["returncode"] is None
                     else "done" if rec["returncode"] == 0 else "failed")
    rec["nonfinite_stop"] = "training stopped: the loss or the gradients are not finite" in log
    if rec["tps"][2:]:
        rec["tps_median"] = statistics.median(rec["tps"][2:])
    if rec["status"] == "failed":
        rec["log_tail"] = log[-2500:]
    return rec


def collect(args) -> dict:
    work = Path(args.workdir)
    runs = {d.name: parse_run(d) for d in sorted(work.iterdir()) if (d / "command.txt").exists()}
    return {"tokens_per_step": 16 * 1024, "runs": runs}


def watch(args) -> None:
    deadline = time.time() + args.seconds
    while True:
        data = collect(args)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(data, indent=1))
        line = []
        for name, r in data["runs"].items():
            step = r["steps"][-1] if r["steps"] else 0
            val = f"{r['val_loss'][-1]:.3f}" if r["val_loss"] else "-"
            tps = f"{r['tps'][-1] / 1000:.0f}k" if r["tps"] else "-"
            line.append(f"{name}:{r['status'][0]}{step}/v{val}/{tps}")
        print(time.strftime("%H:%M:%S"), " ".join(line), flush=True)
        for name, r in data["runs"].items():
            if args.stop_at_step and r["status"] == "running" and \
                    max(r["val_steps"], default=0) >= args.stop_at_step:
                _stop_run(Path(args.workdir) / name, f"validated step {args.stop_at_step}")
                r["status"] = "stopped"
                print(f"stopped {name} at its validation of step {args.stop_at_step}", flush=True)
        busy = any(r["status"] in ("running", "queued") for r in data["runs"].values())
        if not busy or time.time() >= deadline:
            break
        time.sleep(min(args.interval, max(1.0, deadline - time.time())))
    for name, r in data["runs"].items():
        if r["status"] == "failed":
            print(f"--- {name} failed:\n{r['log_tail']}", flush=True)
    if args.archive:
        # TensorBoard event files (per-layer ranges and clamp fractions) and the logs.
        import tarfile

        work = Path(args.workdir)
        with tarfile.open(args.archive, "w:gz") as tar:
            for f in sorted(work.glob("*/tb/**/events.out.tfevents.*")) + sorted(work.glob("*/log.txt")):
                tar.add(f, arcname=str(f.relative_to(work)))
        print(f"wrote {args.archive}", flush=True)


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(stat.parent.name))
    return out


def _stop_run(run_dir: Path, why: str) -> None:
    """SIGTERM to the run's training process (its lane's child) only: the lane goes on with its
    queued runs, and the marker file keeps the run's status "stopped" rather than "failed"."""
    (run_dir / "stopped").write_text(why + "\n")
    for child in _children(int((run_dir / "pid").read_text())):
        try:
            os.kill(child, signal.SIGTERM)
        except ProcessLookupError:
            pass


def stop(args) -> None:
    """SIGTERM to each named run's lane: the run and the runs queued after it in its lane."""
    for name in args.runs:
        pid_file = Path(args.workdir) / name / "pid"
        if pid_file.exists():
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGTERM)
                print(f"stopped {name}")
            except ProcessLookupError:
                pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, validated: a bad value exits with the flag's name and what it allows."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("start", "watch", "stop"))
    p.add_argument("--workdir", default="/tmp/optical-convergence")
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, choices=list(RUNS))
    p.add_argument("--steps", type=int, default=2000, help="16384 tokens each (2000: 32.8M)")
    p.add_argument("--max-parallel", type=int, default=10,
                   help="runs training at once (lanes); the others queue")
    p.add_argument("--checkpoint-runs", nargs="*", default=[], choices=list(RUNS),
                   help="runs (of --runs) that keep checkpoints (every --checkpoint-interval "
                        "steps, the last 2)")
    p.add_argument("--checkpoint-interval", type=int, default=100,
                   help="steps between the checkpoints of --checkpoint-runs")
    p.add_argument("--extra", default="", help="more torchtitan flags for every run")
    p.add_argument("--seconds", type=float, default=500, help="watch: how long")
    p.add_argument("--interval", type=float, default=60, help="watch: seconds between reports")
    p.add_argument("--stop-at-step", type=int, default=0,
                   help="watch: stop each run once it has validated this step (0: never); its "
                        "schedule stays that of --steps, so runs compare at equal steps")
    p.add_argument("--out", default="", help="watch: JSON of everything parsed so far")
    p.add_argument("--archive", default="", help="watch: .tar.gz of the TensorBoard logs and logs")
    args = p.parse_args(argv)
    for flag, value, least in (("--max-parallel", args.max_parallel, 1),
                               ("--checkpoint-interval", args.checkpoint_interval, 1),
                               ("--stop-at-step", args.stop_at_step, 0)):
        if value < least:
            p.error(f"{flag} must be >= {least}, got {value}")
    stray = sorted(set(args.checkpoint_runs) - set(args.runs))
    if args.action == "start" and stray:  # would be silently ignored
        p.error(f"--checkpoint-runs: {', '.join(stray)} not in --runs ({' '.join(args.runs)})")
    return args


def main() -> None:
    args = parse_args()
    {"start": start, "watch": watch, "stop": stop}[args.action](args)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
