"""Training throughput of optical flavors against their digital twins, measured in one run.

Each case trains the same flavor through `run.py` (torchtitan's trainer) with the
`optical_transformer` converter and without (train_configs/optical_<flavor>.toml vs
digital_<flavor>.toml, identical otherwise), `--repeats` times each (default 3), alternating the
modes (digital, optical, digital, optical, ...) in one machine start so that drift of the machine
(clocks, other tenants) hits both alike, and reads torchtitan's own per-step metrics: tokens/s per
GPU (`tps`) and peak reserved memory. Steps before `--skip` (compilation, warm-up) are left out; a
run's figure is the median over the rest, a mode's the median over its repeats, reported with the
repeats' min and max; the ratio's range is (optical min / digital max, optical max / digital min).

Command used for bench/results/train-h200.json (one H200):

    python3 bench/train.py --flavors 60M 1.1B --steps 40 --out $OUT/train-h200.json

With the repeats (median of 3 per mode, alternating, min/max reported):

    python3 bench/train.py --flavors 60M 1.1B --steps 25 --skip 8 --repeats 3 \
        --out $OUT/train-h200.json

Several GPUs: `--nproc 4 --parallel "--parallelism.data_parallel_shard_degree 4"` (the 60M's job
files turn CUDA graphs on, which need one process: add `--extra=--optical.no-cuda_graphs`).

`--base-tree DIR` adds a third mode, `optical_base`: the optical run from another tree of this
project (run.py, torchtitan_ext and train_configs of DIR, e.g. an earlier commit's), alternating
with the other two, and the record's `optical_over_base_tps` says whether this tree's optical
path regressed (the base tree runs its own job files: at the 60M a tree before stop 27 runs
without the CUDA graphs this tree's job files turn on). A tree for the GPU host (carried as an
ignored folder):

    git archive REV run.py torchtitan_ext train_configs | (mkdir -p .base && tar -x -C .base)
    python3 bench/train.py --flavors 60M --base-tree .base --out $OUT/train-vs-base.json

`--arm NAME=FLAGS` (repeatable) measures variants of both modes in the same alternation: every
repeat runs each arm's digital and optical run (the arms' order reversed on odd repeats), each
with FLAGS added, and each arm gets its own record (`arm`, `arm_flags`); the records after the
first also give each mode's tokens/s over the first arm's (`<mode>_over_arm_<first arm>_tps`,
with its range). E.g. an option of both twins against its absence:

    python3 bench/train.py --flavors 1.1B --steps 16 --skip 6 --repeats 3 \
        --arm "off=--optical.no-ac_save_attention" --arm "on=--optical.ac_save_attention"

`--profile`: torchtitan's profiler records the last step of the last repeat of each mode (at the
60M the job files replay CUDA graphs, whose steps have few launches for the idle attribution to
name: add `--extra=--optical.no-cuda_graphs` to see the host ops); the
record then says how busy the GPU was during that step (the union of its kernels' intervals over
the step's wall time: well under 1 means the step is host-bound) and which kernels took the GPU
time. The profiler adds host time of its own, so read the busy fraction as an upper bound on
host-boundness' absence; the throughput summary leaves profiled repeats out (unless no other
repeat succeeded).
"""

from __future__ import annotations

import argparse
import hashlib
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


def base_tree_cache(tree: Path, workdir: str) -> str:
    """Inductor's cache folder for a base tree's runs, named by a digest of its Python sources.
    Nothing makes Inductor's and AOTAutograd's cache keys cover the optical ops' code or the
    activation-checkpoint policy, so a folder shared by two trees could serve one the other's
    compiled graphs."""
    digest = hashlib.sha256()
    for f in sorted(tree.rglob("*.py")):
        digest.update(str(f.relative_to(tree)).encode() + b"\0" + f.read_bytes())
    return str(Path(workdir).resolve() / f"inductor-cache-base-{digest.hexdigest()[:12]}")


def run_case(flavor: str, mode: str, args, repeat: int = 0, profile: bool = False,
             arm: tuple[str, str] = ("", "")) -> dict:
    """One trainer run (with the arm's flags); its per-step metrics and the median tokens/s
    after `--skip`."""
    name = f"{arm[0]}_" if arm[0] else ""
    dump = Path(args.workdir) / f"{name}{mode}_{flavor}_{args.nproc}_r{repeat}"
    optical = mode in ("optical", "optical_base")
    tree = Path(args.base_tree).resolve() if mode == "optical_base" else ROOT
    config = f"train_configs/{'optical' if optical else mode}_{flavor}.toml"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           "run.py", "--job.config_file", config,
           "--training.steps", str(args.steps), "--metrics.log_freq", "1",
           "--metrics.no-enable-tensorboard", "--checkpoint.no-enable",
           "--validation.no-enable", "--job.dump_folder", str(dump),
           # Throughput of the optical path itself: no digital warm-up, no statistics steps.
           *(["--optical.quant_warmup_steps", "0", "--optical.stats_every", "0"]
             if optical else []),
           *(["--profiling.enable_profiling", "--profiling.profile_freq", str(args.steps),
              "--profiling.profiler_warmup", "1", "--profiling.profiler_active", "1"]
             if profile else []),
           *shlex.split(args.parallel), *shlex.split(args.extra), *shlex.split(arm[1])]
    start = time.time()
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]))
    if mode == "optical_base":
        env["TORCHINDUCTOR_CACHE_DIR"] = base_tree_cache(tree, args.workdir)
    r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True,
                       timeout=args.timeout)
    wall = time.time() - start
    log = r.stdout + r.stderr
    steps = parse(log)
    rec = {"flavor": flavor, "mode": mode, "arm": arm[0], "repeat": repeat, "profiled": profile,
           "nproc": args.nproc, "parallel": args.parallel, "tree": str(tree),
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
    if profile:
        traces = sorted(dump.glob("profile_traces/iteration_*/rank0_trace.json"),
                        key=lambda t: int(t.parent.name.split("_")[1]))
        rec["profile"] = profile_summary(traces[-1]) if traces else "no trace written"
    return rec


_GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
_LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
_HOST_CATS = ("cpu_op", "user_annotation", "python_function")


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
        if e.get("ph") != "X" or e.get("cat") not in _GPU_CATS:
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
        "gpu_idle": idle_summary(events, t0, t1, top),
    }


def idle_summary(events: list, t0: float, t1: float, top: int = 12) -> dict:
    """Where the GPU waits within [t0, t1] (one profiled step, trace microseconds), and on what.

    Each gap between the union of the GPU's intervals ends when its next kernel (or copy)
    starts; that kernel's launch (matched by correlation id) was issued by the host at some
    time. A gap whose launch came after the gap began is host-late: the GPU waited for the host
    to issue work. Host-late time is summed by the host ops open on the launching thread at the
    launch: the innermost one, and the outermost below the step's own annotation. The rest of
    the idle time (launch issued earlier: the GPU waited on a dependency) is reported as one
    sum."""
    gpu = sorted([(float(e["ts"]), float(e["ts"]) + float(e["dur"]),
                   (e.get("args") or {}).get("correlation"))
                  for e in events if e.get("ph") == "X" and e.get("cat") in _GPU_CATS
                  and float(e["ts"]) + float(e["dur"]) > t0 and float(e["ts"]) < t1],
                 key=lambda t: t[:2])  # the correlation id may be None: never compare it
    launches = {(e.get("args") or {}).get("correlation"): e for e in events
                if e.get("ph") == "X" and e.get("cat") in _LAUNCH_CATS
                and (e.get("args") or {}).get("correlation") is not None}
    gaps, end = [], t0  # (gap start, gap end, correlation of the kernel that ends it)
    for a, b, corr in gpu:
        if a > end:
            gaps.append((end, a, corr))
        end = max(end, b)
    if end < t1:
        gaps.append((end, t1, None))
    late = []  # (launch ts, thread, gap microseconds)
    other = 0.0
    for g0, g1, corr in gaps:
        ev = launches.get(corr)
        if ev is not None and float(ev["ts"]) > g0:
            late.append((float(ev["ts"]), (ev.get("pid"), ev.get("tid")), g1 - g0))
        else:
            other += g1 - g0
    inner, outer = _attribute(events, late, t0, t1)
    rank = lambda d: [[k, n, round(v / 1e3, 2)]  # noqa: E731
                      for k, (n, v) in sorted(d.items(), key=lambda kv: -kv[1][1])[:top]]
    return {"idle_ms": round(sum(g1 - g0 for g0, g1, _ in gaps) / 1e3, 2),
            "host_late_ms": round(sum(g for _, _, g in late) / 1e3, 2),
            "other_idle_ms": round(other / 1e3, 2),
            "host_late_by_innermost_op": rank(inner),
            "host_late_by_outermost_op": rank(outer)}


def _attribute(events: list, late: list, t0: float, t1: float) -> tuple[dict, dict]:
    """{op name: (gaps, microseconds)} of the host-late gaps `late` by the innermost and the
    outermost host op (below the step's annotation) open on the launching thread at each
    launch; "(none)" where no op was open."""
    by_thread: dict = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in _HOST_CATS:
            a, b = float(e["ts"]), float(e["ts"]) + float(e["dur"])
            name = str(e.get("name", ""))
            if b > t0 and a < t1 and not name.startswith("ProfilerStep#"):
                by_thread.setdefault((e.get("pid"), e.get("tid")), []).append((a, -b, name[:80]))
    inner: dict = {}
    outer: dict = {}
    for thread in {t for _, t, _ in late}:
        ops = sorted(by_thread.get(thread, []))
        queries = sorted((ts, g) for ts, t, g in late if t == thread)
        stack: list = []  # open ops, outermost first: (end, name)
        i = 0
        for ts, g in queries:
            while i < len(ops) and ops[i][0] <= ts:
                a, neg_b, name = ops[i]
                while stack and stack[-1][0] < a:
                    stack.pop()
                stack.append((-neg_b, name))
                i += 1
            while stack and stack[-1][0] < ts:
                stack.pop()
            open_ops = [name for b, name in stack if b >= ts]
            for d, name in ((inner, open_ops[-1] if open_ops else "(none)"),
                            (outer, open_ops[0] if open_ops else "(none)")):
                n, v = d.get(name, (0, 0.0))
                d[name] = (n + 1, v + g)
    return inner, outer


def schedule(modes: list[str], repeats: int, profile: bool) -> list[tuple[int, str, bool]]:
    """(repeat, mode, profiled) in run order: the modes alternate within every repeat; only the
    last repeat is profiled (with --profile). `arm_schedule` with one arm."""
    return [(r, m, p) for r, _, m, p in arm_schedule([("", "")], modes, repeats, profile)]


def arm_schedule(arms: list[tuple[str, str]], modes: list[str], repeats: int,
                 profile: bool) -> list[tuple[int, tuple[str, str], str, bool]]:
    """(repeat, arm, mode, profiled) in run order: within every repeat each arm runs the modes
    in turn, the arms in the given order on even repeats and reversed on odd ones; only the
    last repeat is profiled (with --profile)."""
    return [(r, arm, m, profile and r == repeats - 1) for r in range(repeats)
            for arm in (arms if r % 2 == 0 else arms[::-1]) for m in modes]


def parse_arms(values: list[str]) -> list[tuple[str, str]]:
    """[(name, flags)] of the --arm NAME=FLAGS values; one unnamed arm without flags when none.
    Raises ValueError on a missing name or a name given twice."""
    arms = []
    for v in values:
        name, sep, flags = v.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"--arm: expected NAME=FLAGS with NAME of letters, digits, _ . -"
                             f" (it names the runs' folders), got {v!r}")
        arms.append((name, flags))
    names = [n for n, _ in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"--arm: each name once, got {names}")
    return arms or [("", "")]


def summarize_mode(runs: list[dict]) -> dict:
    """Median, min and max over the repeats of one mode's per-run median tokens/s (profiled
    repeats left out unless nothing else succeeded), and the largest peak memory."""
    ok = [r for r in runs if r.get("tps_per_gpu_median")]
    timed = [r for r in ok if not r.get("profiled")] or ok
    tps = [r["tps_per_gpu_median"] for r in timed]
    return {"repeats": len(runs), "repeats_ok": len(ok), "repeats_timed": len(tps),
            "tps_per_gpu_median": statistics.median(tps) if tps else None,
            "tps_per_gpu_min": min(tps) if tps else None,
            "tps_per_gpu_max": max(tps) if tps else None,
            "tps_per_gpu_runs": tps,
            "peak_memory_gib": max(r["peak_memory_gib"] for r in ok) if ok else None}


def summarize_case(flavor: str, args, runs: dict[str, list[dict]]) -> dict:
    """The record of one flavor: per-mode summaries, the optical/digital ratios with their range
    (and optical over optical_base with --base-tree)."""
    modes = {m: summarize_mode(rs) for m, rs in runs.items()}
    d, o = modes.get("digital", {}), modes.get("optical", {})
    base = _ratio(o, modes["optical_base"], "optical_over_base_tps") \
        if "optical_base" in modes else {}
    return {
        "case": f"{flavor} x{args.nproc} {args.parallel}".strip(), "flavor": flavor,
        "nproc": args.nproc, "repeats": args.repeats, **{f"{m}": s for m, s in modes.items()},
        **_ratio(o, d, "optical_over_digital_tps"),
        "optical_over_digital_memory": o["peak_memory_gib"] / d["peak_memory_gib"]
        if d.get("peak_memory_gib") and o.get("peak_memory_gib") else None,
        **base,
        "runs": runs,
    }


def summarize_arms(flavor: str, args, arms: list[tuple[str, str]], runs: dict) -> list[dict]:
    """One `summarize_case` record per arm (printed as it is made); named arms' records also
    name their arm and, after the first, give each mode over the first arm's."""
    records = []
    for i, arm in enumerate(arms):
        rec = summarize_case(flavor, args, runs[arm])
        if arm[0]:
            rec = {"arm": arm[0], "arm_flags": arm[1], **rec}
            for m in args.modes if i else []:
                rec.update(_ratio(rec[m], records[0][m], f"{m}_over_arm_{arms[0][0]}_tps"))
        records.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "runs"}), flush=True)
    return records


def _ratio(a: dict, b: dict, key: str) -> dict:
    """{key: median ratio a/b of tokens/s, key_range: [a min / b max, a max / b min]}, both
    None when either mode has no figure."""
    if not (a.get("tps_per_gpu_median") and b.get("tps_per_gpu_median")):
        return {key: None, f"{key}_range": None}
    return {key: a["tps_per_gpu_median"] / b["tps_per_gpu_median"],
            f"{key}_range": [a["tps_per_gpu_min"] / b["tps_per_gpu_max"],
                             a["tps_per_gpu_max"] / b["tps_per_gpu_min"]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flavors", nargs="+", default=["60M", "1.1B"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=10, help="steps left out of the median")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs per mode, alternating the modes (>= 3 for a meaningful spread)")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--parallel", default="", help="extra torchtitan parallelism flags")
    p.add_argument("--extra", default="", help="any other torchtitan flags for both modes")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--workdir", default="/tmp/optical-bench-train")
    p.add_argument("--modes", nargs="+", default=["digital", "optical"],
                   choices=["digital", "optical"])
    p.add_argument("--base-tree", help="also run optical from this tree (mode optical_base)")
    p.add_argument("--profile", action="store_true",
                   help="profile the last step of each mode's last repeat: GPU busy fraction "
                        "and top kernels")
    p.add_argument("--arm", action="append", default=[], metavar="NAME=FLAGS",
                   help="a variant of both modes, alternating with the other arms (repeatable)")
    p.add_argument("--out", default="bench/results/train-h200.json")
    args = p.parse_args()
    if args.repeats < 1:
        p.error(f"--repeats must be an integer >= 1 (3 or more for a spread), got {args.repeats}")
    try:
        arms = parse_arms(args.arm)
    except ValueError as e:
        p.error(str(e))
    if args.base_tree:
        if not (Path(args.base_tree) / "run.py").is_file():
            p.error(f"--base-tree: {args.base_tree} holds no run.py (a tree of this project)")
        args.modes = [*args.modes, "optical_base"]
    records = []
    for flavor in args.flavors:
        runs = {arm: {m: [] for m in args.modes} for arm in arms}
        for repeat, arm, mode, profiled in arm_schedule(arms, args.modes, args.repeats,
                                                        args.profile):
            rec = run_case(flavor, mode, args, repeat, profiled, arm)
            runs[arm][mode].append(rec)
            print(json.dumps({k: rec.get(k) for k in ("flavor", "mode", "arm", "repeat",
                                                        "profiled", "returncode",
                                                        "tps_per_gpu_median")}), flush=True)
            if "error_tail" in rec:
                print(f"--- {mode} {flavor} {arm[0]} repeat {repeat} failed:\n"
                      f"{rec['error_tail']}", flush=True)
        records += summarize_arms(flavor, args, arms, runs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(records, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
