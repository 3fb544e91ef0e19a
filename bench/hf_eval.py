"""The 60M export as a transformers model on one GPU: lm-evaluation-harness digital vs optical, and
`generate` with and without the KV cache (issue 15). One command, about 5 minutes on an H200:

    python3 bench/hf_eval.py --out $OUT/hf_eval.json                       # trains 60M briefly
    python3 bench/hf_eval.py --checkpoint outputs/optical_60M/checkpoint/step-2000 --out X.json

1. Without --checkpoint: `torchrun run.py --job.config_file train_configs/optical_60M.toml` for
   --steps steps (default 300: the recipe's 100-step digital warm-up, then optical), with a
   checkpoint at the last step. With --checkpoint: that checkpoint (--config names its TOML).
2. `python -m torchtitan_ext.hf.export` of it (float32 weights).
3. lm-evaluation-harness, `hf` model type, batch size 8 (padded batches), the local tasks of
   tests/lm_eval_tasks (a log-likelihood and a generation task): digital (no trust_remote_code:
   transformers' Llama) and optical (trust_remote_code=True: the folder's auto_map).
4. `generate` of --new-tokens (256) greedy tokens for a batch of 8 left-padded prompts of the
   validation corpus, optical model loaded in each of --dtypes (float32 as saved, bfloat16):
   first with transformers' static cache (compiled by transformers on CUDA: CUDA graphs; its
   compilation counters and a profile of its steps are reported), then use_cache=True vs
   use_cache=False, each after a warm-up call, timed with CUDA synchronisation; the speed-ups
   and whether the tokens agree. --timeline N first clocks N tokens per step (diagnosis:
   compilation stalls vs steady cost).

Everything goes to --out as JSON (and a line per stage to stdout).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import sync  # noqa: E402  (torch is imported on first use)

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["optical_code_ll", "optical_code_gen"]
CONFIG = "train_configs/optical_60M.toml"
DTYPES = ("float32", "bfloat16", "float16")


def _run(cmd: list[str], log: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[:6])} ... failed (exit {r.returncode}); see {log}")


def train(args, work: Path) -> Path:
    dump = work / "run"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
          "run.py", "--job.config_file", args.config, "--training.steps", str(args.steps),
          "--job.dump_folder", str(dump), "--checkpoint.enable", "--checkpoint.interval",
          str(args.steps), "--checkpoint.no-last-save-model-only", "--validation.no-enable",
          "--debug.seed", "0", *shlex.split(args.train_extra)], work / "train.log")
    return dump / "checkpoint" / f"step-{args.steps}"


def export(args, checkpoint: Path, work: Path) -> Path:
    out = work / "export"
    _run([sys.executable, "-m", "torchtitan_ext.hf.export", "--config", args.config,
          "--checkpoint", str(checkpoint), "--out", str(out), "--overwrite"], work / "export.log")
    return out


def harness(folder: Path, optical: bool, batch_size: int, device: str) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(folder), trust_remote_code=optical, dtype="float32",
              batch_size=batch_size, device=device)
    kind = type(lm.model).__name__
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=TASKS, batch_size=batch_size,
                                  task_manager=TaskManager(include_path=str(ROOT / "tests" / "lm_eval_tasks")))
    res = {t: {k: v for k, v in out["results"][t].items() if isinstance(v, (int, float))}
           for t in TASKS}
    return {"model_class": kind, "seconds": time.perf_counter() - t0, "results": res}


def _prompts(tokenizer, n: int, lo: int, hi: int) -> list[str]:
    path = ROOT / "torchtitan_ext" / "data" / "assets" / "corpus" / "validation.jsonl.gz"
    texts = []
    with gzip.open(path, "rt") as f:
        for line in f:
            ids = tokenizer(json.loads(line)["text"])["input_ids"]
            if len(ids) >= hi:
                length = lo + (len(texts) * (hi - lo)) // max(1, n - 1)
                texts.append(tokenizer.decode(ids[:length]))
            if len(texts) == n:
                return texts
    raise SystemExit(f"error: the validation corpus has fewer than {n} documents of {hi} tokens")


def _generate(model, batch, n: int, use_cache: bool, **kw):
    """Greedy generate of exactly n new tokens (the one call every measurement below makes)."""
    return model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          use_cache=use_cache, pad_token_id=model.config.pad_token_id, **kw)


def _timed_generate(model, batch, new_tokens: int, use_cache: bool, device: str, warmup: int,
                    warmup_kw: dict | None = None, **kw):
    """Seconds of a greedy generate of `new_tokens` after an untimed one of `warmup` tokens
    (which also gets `warmup_kw`, e.g. a step clock); returns (seconds, warm-up seconds, ids)."""
    import torch

    def call(n, **extra):
        torch.manual_seed(0)
        return _generate(model, batch, n, use_cache, **kw, **extra)

    print(f"generate use_cache={use_cache} {kw}: {warmup} warm-up tokens, then {new_tokens}",
          flush=True)
    with torch.no_grad():
        t0 = time.perf_counter()
        call(warmup, **(warmup_kw or {}))  # warm-up: kernels compiled, caches allocated
        sync(device)
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = call(new_tokens)
        sync(device)
    s = time.perf_counter() - t0
    # printed at once: a run cut short by a time limit still shows the arms it finished
    print(f"  use_cache={use_cache} {kw}: warm-up {warm_s:.1f} s, timed {s:.2f} s", flush=True)
    return s, warm_s, out


def _timed_static(model, batch, args) -> dict:
    """generate with transformers' static cache: on CUDA, transformers compiles the decoding
    step (torch.compile, mode reduce-overhead: one CUDA graph replayed per step; the optical
    attention reads its position on the device). The warm-up generates as many tokens as the
    timed call, so that the cache (and the graph) has the timed call's shape."""
    from transformers import LogitsProcessorList

    # The warm-up is where compilation happens: its clock prints as it goes, so a run cut short
    # by a time limit still shows whether compiling or stepping took the time.
    clock = _StepClock(args.device, label="static warm-up")
    try:
        s, warm_s, out = _timed_generate(
            model, batch, args.new_tokens, True, args.device, args.new_tokens,
            warmup_kw={"logits_processor": LogitsProcessorList([clock])},
            cache_implementation="static")
    except Exception as e:  # reported, not fatal: the dynamic-cache figures stand on their own
        return {"error": f"{type(e).__name__}: {e}"[:2000], "compile": _compile_report()}
    return {"s": s, "warmup_s": warm_s, "tokens": out, "compile": _compile_report()}


def _compile_report() -> dict:
    """What torch.compile did so far: graphs, recompilations, graph breaks, and its own
    per-phase seconds (where a long warm-up went)."""
    from torch._dynamo.utils import compile_times, counters

    report = {"unique_graphs": counters["stats"]["unique_graphs"],
              "recompiles": sum(counters["recompiles"].values()),
              "graph_breaks": sum(counters["graph_break"].values()),
              "compile_times": compile_times(repr="str")}
    print("  compile:", json.dumps({k: v for k, v in report.items() if k != "compile_times"}),
          "\n" + report["compile_times"], flush=True)
    return report


class _StepClock:
    """A logits processor that records the wall time of every decoding step (synchronising the
    device first): the per-token timeline shows compilation stalls apart from steady cost."""

    def __init__(self, device: str, label: str = ""):
        self.device, self.times, self.label = device, [time.perf_counter()], label

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.times.append(time.perf_counter())
        n = len(self.times) - 1
        if self.label and n & (n - 1) == 0:  # steps 1, 2, 4, 8, ...: where a stall sits
            print(f"  {self.label}: step {n} after {self.times[-1] - self.times[0]:.1f} s",
                  flush=True)
        return scores

    def steps_ms(self) -> list[float]:
        return [1e3 * (b - a) for a, b in zip(self.times, self.times[1:])]


def _timeline(model, batch, tokens: int, use_cache: bool, device: str) -> dict:
    """Clocked greedy generate of `tokens` tokens: per-step milliseconds (first = prefill)."""
    import torch
    from transformers import LogitsProcessorList

    clock = _StepClock(device)
    with torch.no_grad():
        _generate(model, batch, tokens, use_cache, logits_processor=LogitsProcessorList([clock]))
    ms = clock.steps_ms()
    print(f"timeline use_cache={use_cache}: " + " ".join(f"{x:.0f}" for x in ms), flush=True)
    return {"use_cache": use_cache, "step_ms": [round(x, 2) for x in ms]}


def _profile(model, batch, tokens: int, device: str, out: Path, **kw) -> dict:
    """torch.profiler of a cached generate of `tokens` tokens (`kw`: e.g. the static cache):
    kernel launches, wall and device time per step (where the time of a decode step goes),
    its top operators written to `out`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch.no_grad(), profile(activities=acts) as prof:
        t0 = time.perf_counter()
        _generate(model, batch, tokens, True, **kw)
        sync(device)
        wall = time.perf_counter() - t0
    ev = prof.key_averages()
    launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                     "cuLaunchKernelEx", "cudaLaunchKernelExC"))
    device_us = sum(getattr(e, "self_device_time_total", 0) for e in ev)
    sort = "self_device_time_total" if kw else "self_cpu_time_total"
    out.write_text(ev.table(sort_by=sort, row_limit=30))
    return {"tokens": tokens, "wall_ms_per_step": 1e3 * wall / tokens,
            "kernel_launches_per_step": launches / tokens,
            "device_busy_ms_per_step": device_us / 1e3 / tokens, "table": out.name}


def generate_timing(folder: Path, args, dtype: str) -> dict:
    """Cached vs uncached greedy generate of the optical export loaded in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                 dtype=getattr(torch, dtype))
    model = model.to(args.device).eval()
    prompts = _prompts(tok, args.batch, args.prompt_min, args.prompt_max)
    batch = tok(prompts, return_tensors="pt", padding=True).to(args.device)
    timelines = [_timeline(model, batch, args.timeline, c, args.device)
                 for c in (True, False) for _ in range(2)] if args.timeline else []
    # The static arm first: its compilation is the long, uncertain part of a time-limited call.
    static = _timed_static(model, batch, args) if args.static_cache else {"skipped": True}
    cached_s, cached_warm_s, cached = _timed_generate(model, batch, args.new_tokens, True,
                                                      args.device, args.warmup_tokens)
    uncached_s, uncached_warm_s, uncached = _timed_generate(model, batch, args.new_tokens, False,
                                                            args.device, args.warmup_tokens)
    new = cached.shape[1] - batch["input_ids"].shape[1]
    prof = _profile(model, batch, 8, args.device, Path(args.out).with_suffix(f".{dtype}.prof.txt"))
    if "s" in static:  # the compiled steps (same shapes as the timed call: no recompilation)
        static["profile"] = _profile(model, batch, args.new_tokens, args.device,
                                     Path(args.out).with_suffix(f".{dtype}.static.prof.txt"),
                                     cache_implementation="static")
    result = {
        "dtype": dtype, "model_class": type(model).__name__, "batch": args.batch,
        "new_tokens": int(new), "prompt_tokens": [int(x) for x in batch["attention_mask"].sum(1)],
        "use_cache_true_s": cached_s, "use_cache_false_s": uncached_s,
        "ms_per_step": {"use_cache_true": 1e3 * cached_s / new,
                        "use_cache_false": 1e3 * uncached_s / new},
        "warmup_tokens": args.warmup_tokens, "warmup_s": {"use_cache_true": cached_warm_s,
                                                           "use_cache_false": uncached_warm_s},
        "speedup": uncached_s / cached_s, "acceptance_10x": uncached_s / cached_s >= 10.0,
        "same_tokens_fraction": float((cached == uncached).float().mean()),
        "static_cache": {k: v for k, v in static.items() if k != "tokens"},
        "static_speedup": uncached_s / static["s"] if "s" in static else None,
        "acceptance_10x_static": "s" in static and uncached_s / static["s"] >= 10.0,
        "timelines": timelines, "profile_cached_8_tokens": prof,
        "note": "with read-out noise the two runs draw different noise, so tokens may differ",
    }
    del model
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--checkpoint", help="a DCP step folder (default: train --steps steps)")
    p.add_argument("--config", default=CONFIG, help=f"its TOML (default {CONFIG})")
    p.add_argument("--steps", type=int, default=300, help="training steps without --checkpoint")
    p.add_argument("--workdir", default="/tmp/hf_eval", help="run, export and logs go here")
    p.add_argument("--train-extra", default="", help="more run.py options for the training run")
    p.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke test)")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="generate: prompts per batch")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--warmup-tokens", type=int, default=16,
                   help="generate this many tokens untimed first, per mode (--new-tokens: full)")
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help="generate: load the export in these dtypes in turn (float32: as saved)")
    p.add_argument("--no-static-cache", dest="static_cache", action="store_false",
                   help="skip the static-cache (compiled, CUDA-graph) generate")
    p.add_argument("--timeline", type=int, default=0,
                   help="first clock this many tokens per step, twice per mode (diagnosis)")
    p.add_argument("--skip-harness", action="store_true", help="generate timing only")
    p.add_argument("--prompt-min", type=int, default=64)
    p.add_argument("--prompt-max", type=int, default=192)
    args = p.parse_args(argv)
    bad = sorted(set(args.dtypes.split(",")) - set(DTYPES))
    if bad:
        p.error(f"--dtypes: {', '.join(bad)} not allowed; allowed: {', '.join(DTYPES)}")
    if args.timeline < 0:
        p.error(f"--timeline must be >= 0 (0: off), got {args.timeline}")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"config": args.config, "t0": time.time()}
    checkpoint = Path(args.checkpoint) if args.checkpoint else train(args, work)
    report["checkpoint"], report["train_steps"] = str(checkpoint), None if args.checkpoint else args.steps
    folder = export(args, checkpoint, work)
    print(f"exported {checkpoint} to {folder} ({time.time() - report['t0']:.0f} s in)", flush=True)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        lm_eval = None
    if args.skip_harness:
        report["harness_skipped"] = "--skip-harness"
    elif lm_eval is None:
        report["harness_skipped"] = "lm_eval is not installed here (pip install -e '.[eval]')"
        print(f"warning: {report['harness_skipped']}: harness not run", flush=True)
    else:
        for kind in ("digital", "optical"):
            report[f"harness_{kind}"] = harness(folder, kind == "optical", args.eval_batch_size,
                                                args.device)
            print(kind, json.dumps(report[f"harness_{kind}"]["results"]), flush=True)
    report["generate"] = []
    for dtype in args.dtypes.split(","):
        report["generate"].append(generate_timing(folder, args, dtype))
        print("generate", json.dumps({k: v for k, v in report["generate"][-1].items()
                                      if k != "timelines"}), flush=True)
    report["seconds"] = time.time() - report.pop("t0")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
