"""The experiment tools in bench/: the convergence driver (log parsing, lanes, stopping, its
flags) on synthetic logs and fake runs, bench/train.py's profile summary and repeats, the
plots' tables and bench/attention.py's flags and as-trained ratio."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _module(script: str, name: str | None = None):
    """bench/<script>.py loaded as a fresh module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name or script, ROOT / f"bench/{script}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _driver():
    return _module("convergence")


LOG = """\
[titan] 2026-11-28 23:14:33,752 - root - INFO - \x1b[31mstep:  1  \x1b[32mloss:  9.43088  \x1b[38;2;180;60;0mgrad_norm:  0.7109  memory:  9.56GiB(6.84%)  \x1b[34mtps: 1,313  tflops: 11.01  mfu: 1.11%\x1b[39m
[titan] 2026-11-28 23:14:34,000 - root - INFO - \x1b[33mvalidate step:  1  \x1b[32mloss:  9.4687  memory:  9.56GiB(6.84%)  tps: 184,519\x1b[39m
[titan] 2026-11-28 23:14:35,143 - root - INFO - step: 10  loss:  3.62289  grad_norm:  0.5084  memory:  9.56GiB(6.84%)  tps: 30,403  tflops: 11.82  mfu: 1.20%
[titan] 2026-11-28 23:14:36,000 - root - INFO - optical clamp fractions step 10: attention_k=1.39e-06  attention_p_zeroed=8.49e-01  linear_out=2.80e-06
[titan] 2026-11-28 23:14:37,000 - root - INFO - validate step: 10  loss:  3.5000  memory:  9.56GiB(6.84%)  tps: 184,519
"""


def test_parse_run_reads_losses_validation_clamps_and_status(tmp_path):
    conv = _driver()
    run = tmp_path / "optical"
    run.mkdir()
    (run / "log.txt").write_text(LOG)
    (run / "command.txt").write_text("-m torch.distributed.run ... run.py\n")
    rec = conv.parse_run(run)
    assert rec["status"] == "running" and rec["returncode"] is None
    assert rec["steps"] == [1, 10] and rec["loss"] == [9.43088, 3.62289]
    assert rec["tps"] == [1313.0, 30403.0]
    assert rec["val_steps"] == [1, 10] and rec["val_loss"] == [9.4687, 3.5]
    assert rec["clamp"] == {"10": {"attention_k": 1.39e-06, "attention_p_zeroed": 0.849,
                                   "linear_out": 2.8e-06}}
    (run / "rc").write_text("1\n")
    failed = conv.parse_run(run)
    assert failed["status"] == "failed" and "log_tail" in failed
    assert set(conv.RUNS) >= {"digital", "optical", "q64", "q16", "no_warmup"}


def _bench_train():
    return _module("train", "bench_train")


def test_profile_summary_unions_overlapping_kernels_within_the_last_step(tmp_path):
    """bench/train.py --profile: GPU busy time is the union of kernel intervals clipped to the
    last ProfilerStep (kernels of two streams overlap; one runs past the step's end)."""
    import json

    events = [
        {"ph": "X", "name": "ProfilerStep#3", "ts": 0, "dur": 100, "cat": "user_annotation"},
        {"ph": "X", "name": "ProfilerStep#4", "ts": 1000, "dur": 1000, "cat": "user_annotation"},
        {"ph": "X", "name": "_linear_fwd_kernel", "ts": 10, "dur": 50, "cat": "kernel"},  # step 3
        {"ph": "X", "name": "_linear_fwd_kernel", "ts": 1100, "dur": 200, "cat": "kernel"},
        {"ph": "X", "name": "nvjet_gemm", "ts": 1200, "dur": 200, "cat": "kernel"},  # overlaps
        {"ph": "X", "name": "_linear_fwd_kernel", "ts": 1900, "dur": 300, "cat": "kernel"},
        {"ph": "X", "name": "cudaLaunchKernel", "ts": 1000, "dur": 900, "cat": "cuda_runtime"},
    ]
    trace = tmp_path / "rank0_trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    p = _bench_train().profile_summary(trace)
    assert p["step_ms"] == 1.0
    assert p["gpu_busy_ms"] == 0.4  # [1100, 1400) and [1900, 2000)
    assert p["gpu_busy_fraction"] == 0.4
    assert p["kernel_launches"] == 3
    assert p["top_kernels_ms"][0] == ["_linear_fwd_kernel", 2, 0.3]


def test_profile_idle_summary_attributes_host_late_gaps_to_the_open_host_ops():
    """bench/train.py --profile: a GPU gap whose next kernel was launched after the gap began is
    host-late and goes to the host ops open at that launch (innermost, outermost); a gap whose
    kernel was launched earlier (a dependency) and the step's tail are other idle time."""
    def x(name, cat, ts, dur, corr=None, tid=1):
        e = {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "pid": 1, "tid": tid}
        if corr is not None:
            e["args"] = {"correlation": corr}
        return e

    events = [
        x("ProfilerStep#2", "user_annotation", 0, 1000),
        x("optical::linear", "cpu_op", 100, 300), x("aten::empty", "cpu_op", 150, 10),
        x("aten::mm", "cpu_op", 500, 20),
        x("cudaLaunchKernel", "cuda_runtime", 50, 2, corr=1),
        x("cuLaunchKernel", "cuda_driver", 155, 2, corr=2),
        x("cudaLaunchKernel", "cuda_runtime", 200, 2, corr=4),
        x("cudaLaunchKernel", "cuda_runtime", 505, 2, corr=3),
        x("k1", "kernel", 60, 40, corr=1, tid=7), x("k2", "kernel", 300, 50, corr=2, tid=7),
        x("k3", "kernel", 510, 390, corr=3, tid=7), x("k4", "kernel", 950, 30, corr=4, tid=7),
    ]
    idle = _bench_train().idle_summary(events, 0.0, 1000.0)
    assert idle["idle_ms"] == 0.49  # [0, 60) [100, 300) [350, 510) [900, 950) [980, 1000)
    assert idle["host_late_ms"] == 0.42 and idle["other_idle_ms"] == 0.07
    assert idle["host_late_by_innermost_op"] == [["aten::empty", 1, 0.2], ["aten::mm", 1, 0.16],
                                                 ["(none)", 1, 0.06]]
    assert idle["host_late_by_outermost_op"] == [["optical::linear", 1, 0.2],
                                                 ["aten::mm", 1, 0.16], ["(none)", 1, 0.06]]


def test_train_bench_alternates_modes_and_reports_median_and_spread(tmp_path, monkeypatch):
    """bench/train.py --repeats: runs alternate digital/optical within each repeat, a mode's
    figure is the median of its repeats' medians with min/max, profiled and failed repeats are
    left out of the throughput (a profiled one only while another succeeded)."""
    import json
    import sys

    bt = _bench_train()
    assert bt.schedule(["digital", "optical"], 3, True) == [
        (0, "digital", False), (0, "optical", False), (1, "digital", False),
        (1, "optical", False), (2, "digital", True), (2, "optical", True)]
    tps = {("digital", 0): 100.0, ("optical", 0): 60.0, ("digital", 1): 110.0,
           ("optical", 1): 50.0, ("digital", 2): 90.0, ("optical", 2): 1.0}  # optical 2 profiled
    order = []

    def fake_run(flavor, mode, args, repeat=0, profile=False, arm=("", "")):
        order.append((mode, repeat, profile))
        if (mode, repeat) == ("digital", 1) and flavor == "bad":
            return {"mode": mode, "repeat": repeat, "profiled": profile, "error_tail": "x"}
        return {"mode": mode, "repeat": repeat, "profiled": profile,
                "tps_per_gpu_median": tps[mode, repeat], "peak_memory_gib": 2.0 + repeat}

    monkeypatch.setattr(bt, "run_case", fake_run)
    out = tmp_path / "train.json"
    monkeypatch.setattr(sys, "argv", ["train.py", "--flavors", "60M", "bad", "--profile",
                                      "--out", str(out)])
    bt.main()
    assert order[:6] == [("digital", 0, False), ("optical", 0, False), ("digital", 1, False),
                         ("optical", 1, False), ("digital", 2, True), ("optical", 2, True)]
    good, bad = json.loads(out.read_text())
    d, o = good["digital"], good["optical"]
    # profiled repeats (2) are not timed: digital median of 100, 110; optical of 60, 50
    assert d["tps_per_gpu_runs"] == [100.0, 110.0] and d["tps_per_gpu_median"] == 105.0
    assert (o["tps_per_gpu_min"], o["tps_per_gpu_max"], o["tps_per_gpu_median"]) == (50, 60, 55)
    assert good["optical_over_digital_tps"] == 55 / 105
    assert good["optical_over_digital_tps_range"] == [50 / 110, 60 / 100]
    assert d["peak_memory_gib"] == 4.0 and good["optical_over_digital_memory"] == 1.0
    assert bad["digital"]["repeats_ok"] == 2 and bad["digital"]["tps_per_gpu_runs"] == [100.0]
    assert len(good["runs"]["optical"]) == 3
    # only profiled runs succeeded: they are used rather than nothing
    only = bt.summarize_mode([{"tps_per_gpu_median": 7.0, "profiled": True,
                               "peak_memory_gib": 1.0}, {"error_tail": "x"}])
    assert only["tps_per_gpu_median"] == 7.0 and only["repeats_timed"] == 1


def test_variants_are_valid_transforms_that_change_only_their_keys():
    """Issue 16's experiment matrix: every variant loads through the transform loader, differs
    from its base transform exactly by its added keys, in the right module kind, and trains on
    its own file (the command names it)."""
    import yaml

    from torchtitan_ext.optical.config import TransformConfig

    conv = _driver()
    assert set(conv.DEFAULT_RUNS).isdisjoint(conv.VARIANTS)  # named on demand only
    for name, (base, lin, att, _) in conv.VARIANTS.items():
        doc = yaml.safe_load(conv.variant_transform(name))
        TransformConfig.from_dict(doc)
        ref = yaml.safe_load((ROOT / conv.T / base).read_text())["layer_name_to_config"]
        for pattern, cfg in doc["layer_name_to_config"].items():
            added = lin if "wq" in pattern else att if pattern.endswith("attention") else {}
            assert cfg == (None if ref[pattern] is None else {**ref[pattern], **added}), name
        assert lin or att, name
        args = conv.parse_args(["start", "--workdir", "/w", "--steps", "10"])
        cmd = conv.command(name, args)
        assert cmd[cmd.index("--optical.transform_config") + 1] == f"/w/{name}/transform.yaml"
        assert "--checkpoint.no-enable" in cmd
    assert conv.command("optical_seed1", args).count("--debug.seed") == 1
    assert conv.command("optical", args)[-2:] == ["--debug.seed", "0"]
    args.checkpoint_runs = ["optical"]  # a run evaluated afterwards keeps its last checkpoints
    cmd = conv.command("optical", args)
    assert "--checkpoint.no-enable" not in cmd
    assert cmd[cmd.index("--checkpoint.interval") + 1] == "100"


def test_start_runs_in_lanes_and_clears_a_previous_attempt(tmp_path, monkeypatch):
    """`start --max-parallel 2` with three runs: two lanes, the third run queued behind the
    first in lane 0 (same process group), each reaching its own exit status; a stale `rc` of an
    earlier attempt is removed before anything runs (it once showed live runs as failed)."""
    import sys
    import time

    conv = _driver()
    monkeypatch.setattr(conv, "command", lambda name, args: [
        sys.executable, "-c",
        f"print('step: 1  loss: 1.0  tps: 5'); raise SystemExit({name!r} == 'q16')"])
    (tmp_path / "digital").mkdir()
    (tmp_path / "digital" / "rc").write_text("1\n")
    args = conv.parse_args(["start", "--workdir", str(tmp_path), "--max-parallel", "2",
                            "--runs", "digital", "optical", "q16"])
    conv.start(args)
    pid = {n: (tmp_path / n / "pid").read_text() for n in args.runs}
    assert pid["digital"] == pid["q16"] != pid["optical"]
    deadline = time.time() + 60
    while time.time() < deadline and not all((tmp_path / n / "rc").exists() for n in args.runs):
        time.sleep(0.2)
    runs = conv.collect(args)["runs"]
    assert {n: r["status"] for n, r in runs.items()} == {
        "digital": "done", "optical": "done", "q16": "failed"}
    assert runs["optical"]["steps"] == [1]


def test_watch_stops_a_run_at_its_validation_step_and_its_lane_goes_on(tmp_path, monkeypatch):
    """`watch --stop-at-step 100`: a run that has validated step 100 is ended (its status then
    "stopped", not "failed"), and the run queued behind it in the same lane still trains."""
    import sys

    conv = _driver()
    script = {"digital": "print('validate step: 100  loss: 2.5', flush=True); "
                         "import time; time.sleep(120)",
              "optical": "print('step: 1  loss: 1.0  tps: 5')"}
    monkeypatch.setattr(conv, "command", lambda name, args: [sys.executable, "-c", script[name]])
    args = conv.parse_args(["watch", "--workdir", str(tmp_path), "--max-parallel", "1",
                            "--seconds", "60", "--interval", "0.5", "--stop-at-step", "100",
                            "--runs", "digital", "optical"])
    conv.start(args)
    conv.watch(args)  # returns once nothing runs or waits
    runs = conv.collect(args)["runs"]
    assert runs["digital"]["status"] == "stopped" and runs["digital"]["val_steps"] == [100]
    assert runs["optical"]["status"] == "done"


@pytest.mark.parametrize("argv,words", [
    (["--max-parallel", "0"], "--max-parallel must be >= 1, got 0"),
    (["--checkpoint-interval", "0"], "--checkpoint-interval must be >= 1, got 0"),
    (["--stop-at-step", "-1"], "--stop-at-step must be >= 0, got -1"),
    (["--runs", "digital", "--checkpoint-runs", "optical"],
     "--checkpoint-runs: optical not in --runs (digital)"),
])
def test_bad_driver_flags_exit_naming_the_flag(argv, words, capsys):
    """Bad values of the driver's flags stop it before anything starts, naming the flag; a
    checkpoint run that is not among the runs would otherwise be silently ignored."""
    with pytest.raises(SystemExit) as e:
        _driver().parse_args(["start", *argv])
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_train_bench_base_tree_runs_optical_from_that_tree(tmp_path, monkeypatch):
    """bench/train.py --base-tree DIR: a third mode alternates with the other two, runs run.py
    and the optical config from DIR (cwd and PYTHONPATH), and the record gives this tree's
    optical tokens/s over DIR's with its range; a folder without run.py is refused."""
    import json
    import os
    import subprocess
    import sys

    bt = _bench_train()
    base = tmp_path / "base"
    base.mkdir()
    monkeypatch.setattr(sys, "argv", ["train.py", "--base-tree", str(tmp_path), "--out", "x"])
    with pytest.raises(SystemExit):
        bt.main()
    (base / "run.py").write_text("")
    seen = []

    def fake_subprocess_run(cmd, cwd, env, **kw):
        seen.append((cmd, cwd, env["PYTHONPATH"]))
        mode = "base" if cwd == base.resolve() else "head"
        tps = {"base": 80, "head": 100}[mode] if "optical" in " ".join(cmd) else 200
        log = "".join(f"step: {s}  loss: 1.0  memory: 2.0GiB  tps: {tps}\n" for s in range(1, 6))
        return subprocess.CompletedProcess(cmd, 0, log, "")

    monkeypatch.setattr(bt.subprocess, "run", fake_subprocess_run)
    out = tmp_path / "train.json"
    monkeypatch.setattr(sys, "argv", ["train.py", "--flavors", "60M", "--repeats", "1",
                                      "--skip", "1", "--base-tree", str(base), "--out", str(out)])
    bt.main()
    (rec,) = json.loads(out.read_text())
    assert [r[0]["mode"] for r in rec["runs"].values()] == ["digital", "optical", "optical_base"]
    assert rec["optical_over_base_tps"] == 1.25
    assert rec["optical_over_base_tps_range"] == [1.25, 1.25]
    cmd, cwd, path = seen[2]
    assert cwd == base.resolve() and path.split(os.pathsep)[0] == str(base.resolve())
    assert "train_configs/optical_60M.toml" in cmd and "--optical.quant_warmup_steps" in cmd
    assert seen[1][1] == bt.ROOT and "train_configs/digital_60M.toml" in seen[0][0]


def test_train_bench_arms_alternate_and_compare_with_the_first(tmp_path, monkeypatch):
    """bench/train.py --arm NAME=FLAGS: every repeat runs each arm's modes (arm order reversed
    on odd repeats), the arm's flags reach its command, each arm gets a record, and the later
    arms' give each mode over the first arm's; a malformed or repeated name is refused."""
    import json
    import subprocess
    import sys

    bt = _bench_train()
    seen = []

    def fake_subprocess_run(cmd, cwd, env, **kw):
        line = " ".join(cmd)
        seen.append(line)
        tps = (100 if "optical" in line.split("--job.config_file ")[1][:30] else 200) * \
            (1.1 if "--fast" in line else 1.0)
        log = "".join(f"step: {s}  loss: 1.0  memory: 2.0GiB  tps: {tps:.0f}\n"
                      for s in range(1, 6))
        return subprocess.CompletedProcess(cmd, 0, log, "")

    monkeypatch.setattr(bt.subprocess, "run", fake_subprocess_run)
    out = tmp_path / "train.json"
    monkeypatch.setattr(sys, "argv", ["train.py", "--flavors", "60M", "--repeats", "2",
                                      "--skip", "1", "--arm", "base=", "--arm", "fast=--fast",
                                      "--workdir", str(tmp_path), "--out", str(out)])
    bt.main()
    arms = ["fast" if "--fast" in line else "base" for line in seen]
    assert arms == ["base", "base", "fast", "fast", "fast", "fast", "base", "base"]
    assert all(f"/{a}_" in line for a, line in zip(arms, seen))  # own dump folders
    base, fast = json.loads(out.read_text())
    assert (base["arm"], fast["arm"], fast["arm_flags"]) == ("base", "fast", "--fast")
    assert "optical_over_arm_base_tps" not in base
    assert fast["optical_over_arm_base_tps"] == 1.1 and fast["digital_over_arm_base_tps"] == 1.1
    assert base["optical_over_digital_tps"] == fast["optical_over_digital_tps"] == 0.5
    for bad in (["--arm", "noflags"], ["--arm", "a=", "--arm", "a=--x"], ["--arm", "=--x"],
                ["--arm", "/x=--y"]):
        monkeypatch.setattr(sys, "argv", ["train.py", *bad, "--out", str(out)])
        with pytest.raises(SystemExit):
            bt.main()


def test_plot_merges_sessions_later_runs_win():
    """plot_convergence.py draws several sessions' JSONs as one: a later file's run replaces an
    earlier one of the same name; JSONs of different step sizes are refused."""
    plot = _module("plot_convergence")
    a = {"tokens_per_step": 16384, "runs": {"optical": {"v": 1}, "q64": {"v": 2}}}
    b = {"tokens_per_step": 16384, "runs": {"optical": {"v": 3}, "q256_input64": {"v": 4}}}
    merged = plot.merge([a, b])
    assert merged["runs"] == {"optical": {"v": 3}, "q64": {"v": 2}, "q256_input64": {"v": 4}}
    with pytest.raises(SystemExit, match="tokens_per_step"):
        plot.merge([a, {"tokens_per_step": 8192, "runs": {}}])


def test_plot_tables_without_a_digital_run_say_n_a():
    """A session that trained optical variants only (stop 19) still gets its table."""
    run = {"what": "64 levels", "steps": [1, 1400], "loss": [9.4, 4.7], "val_steps": [1400],
           "val_loss": [4.7598], "nonfinite_stop": False, "tps_median": 80000.0}
    table = _module("plot_convergence").tables({"tokens_per_step": 16384, "runs": {"q64": run}})
    assert "| `q64` | 64 levels | 22.9M | 4.7598 (1400) | n/a |" in table


def test_attention_bench_weighs_the_forward_as_training_runs_it():
    """as_trained_ratio counts the forward that activation checkpointing re-runs: stop 19's
    32k profile of the 1.1B (per call: optical fwd 56.8 / bwd 58.5 ms, cuDNN 7.56 / 20.5 ms,
    half the layers recomputed) gives 4.5x where fwd+bwd alone gives 4.1x."""
    rec = {"optical_fwdbwd_ms": 115.3, "optical_fwd_ms": 56.8,
           "flash_fwdbwd_ms": 28.06, "flash_fwd_ms": 7.56}
    bench = _module("attention")
    assert bench.as_trained_ratio(rec, 0.0) == pytest.approx(115.3 / 28.06)
    assert bench.as_trained_ratio(rec, 0.5) == pytest.approx(4.513, abs=1e-3)


@pytest.mark.parametrize("argv,words", [
    (["--heads", "24", "--hkv", "7"], "--heads must be a positive multiple of --hkv, got 24 / 7"),
    (["--recompute", "1.5"], "--recompute must be in [0, 1], got 1.5"),
    (["--baseline", "math"], "invalid choice: 'math'"),
])
def test_attention_bench_bad_flags_exit_naming_the_flag(argv, words, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["attention.py", *argv])
    with pytest.raises(SystemExit) as e:
        _module("attention").main()
    assert e.value.code == 2 and words in capsys.readouterr().err


NCU_SOURCE = '''"Kernel Name","_fwd_kernel",
"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed","stall_long_sb","stall_wait"
"0x0","      MOV R1, c[0x0][0x28]","1","10","0","1"
"0x10","      FADD R2, R3, R4","5","400","1","4"
"0x20","      FADD R5, R2, R4","3","400","0","3"
"0x30","      BAR.SYNC.DEFER_BLOCKING 0x0","90","400","88","2"
"0x40","  @P0 BRA 0x10","1","10","0","1"
'''


def test_ncu_summary_finds_the_hot_loop_and_the_stalled_instruction(capsys):
    """bench/ncu_summary.py: opcode shares count executions (not rows), the three instructions
    run 400 times form one hot block, and the barrier leads the stalls with its top reason."""
    summ = _module("ncu_summary")
    for name, rows in summ.kernels(NCU_SOURCE):
        summ.summary(name, rows)
    out = capsys.readouterr().out
    assert "== _fwd_kernel: 1220 warp instructions, 100 stall samples" in out
    assert "FADD        65.6" in out  # 800 of 1220
    assert "  1-3 400 3 98.4 98.0" in out  # rows 1-3: 3 x 400 of 1220 executions, 98 of 100 samples
    stalls = out.split("most stalled instructions")[1].splitlines()
    assert "BAR.SYNC" in stalls[-2] and "(88, 'long_sb')" in stalls[-2]


@pytest.mark.parametrize("argv,words", [
    (["--fwd-configs", "64x32x4"], "--fwd-configs: want BMxBNxWxS (four integers"),
    (["--bwd-configs", "64x64xfourx2"], "--bwd-configs: want BMxBNxWxS"),
    (["--reg-variants", "bwd:64x64x4x2:128:3"], "programs_per_sm: fwd only"),
    (["--reg-variants", "dq:64x32x4x4:128"], "with kind fwd or bwd"),
    (["--reg-variants", "fwd:64x32x4x4:lots"], "--reg-variants: want"),
])
def test_attention_parts_bad_flags_exit_before_gpu_work(argv, words, monkeypatch):
    """bench/attention_parts.py parses every variant before it allocates inputs on the GPU; a
    programs-per-SM count on a backward variant (which has no persistent grid) is refused rather
    than ignored."""
    monkeypatch.setattr("sys.argv", ["attention_parts.py", *argv])
    with pytest.raises(SystemExit, match=re.escape(words)):
        _module("attention_parts").main()


@pytest.mark.parametrize("argv,words", [
    (["--bwd-config", "64x64"], "--bwd-config: want BMxBNxWxS (four integers"),
    (["--fwd-config", "64x32x4xfour"], "--fwd-config: want BMxBNxWxS"),
])
def test_attention_bench_bad_config_flags_exit_before_gpu_work(argv, words, monkeypatch):
    """bench/attention.py's forced configurations are parsed before any GPU work."""
    monkeypatch.setattr("sys.argv", ["attention.py", *argv])
    with pytest.raises(SystemExit, match=re.escape(words)):
        _module("attention").main()


def test_attention_bench_refuses_a_forced_config_with_sweep(monkeypatch, capsys):
    """--sweep would silently replace a forced configuration: the pair is refused."""
    monkeypatch.setattr("sys.argv", ["attention.py", "--sweep", "--bwd-config", "64x64x4x2"])
    with pytest.raises(SystemExit):
        _module("attention").main()
    assert "--sweep picks the configs itself" in capsys.readouterr().err


@pytest.mark.parametrize("argv,words", [
    (["--config", "128x128x64 w8 s3 r128", "--sweep"], "--sweep and --operand-sweep pick"),
    (["--config", "128x128x64 w8 s3 r128", "--operand-sweep"], "--sweep and --operand-sweep pick"),
    (["--config", "128x999"], "--config: invalid choice: '128x999'"),
])
def test_linear_bench_bad_config_flags_exit_before_gpu_work(argv, words, monkeypatch, capsys):
    """bench/linear.py's forced configuration names one of the sweep's candidates, and is
    refused beside a sweep (which would silently replace it), before any GPU work."""
    monkeypatch.setattr("sys.argv", ["linear.py", *argv])
    with pytest.raises(SystemExit):
        _module("linear").main()
    assert words in capsys.readouterr().err


def test_attention_parts_config_agreement_flags_a_wrong_config():
    """`--configs-only` compares each candidate tile configuration's outputs with the shipped
    one's: a candidate that agrees reports ~0, one whose y or gradients differ reports it."""
    parts = _module("attention_parts")
    g = torch.Generator().manual_seed(0)
    y, lse = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, generator=g)
    grads = tuple(torch.randn(4, 8, generator=g) for _ in range(3))
    fns = {"fwd": lambda: (y, lse, None), "bwd": lambda: grads,
           "fwd_cfg_64x32x4x4": lambda: (y.clone(), lse.clone(), None),
           "fwd_cfg_128x32x8x4": lambda: (y.flip(-1), lse + 0.5, None),
           "bwd_cfg_64x64x4x2": lambda: tuple(t.clone() for t in grads),
           "bwd_cfg_32x128x8x3": lambda: (grads[0], grads[1] * 2, grads[2]),
           "cudnn_fwd": lambda: None}
    out = parts.config_agreement(fns)
    assert set(out) == {"fwd_cfg_64x32x4x4", "fwd_cfg_128x32x8x4", "bwd_cfg_64x64x4x2",
                        "bwd_cfg_32x128x8x3"}
    assert out["fwd_cfg_64x32x4x4"] == {"y_differ_frac": 0.0, "lse_max_diff": 0.0}
    assert out["fwd_cfg_128x32x8x4"]["y_differ_frac"] > 0.5
    assert out["fwd_cfg_128x32x8x4"]["lse_max_diff"] == pytest.approx(0.5)
    assert out["bwd_cfg_64x64x4x2"] == {"dq": 0.0, "dk": 0.0, "dv": 0.0}
    assert out["bwd_cfg_32x128x8x3"]["dk"] == pytest.approx(1.0)
    assert out["bwd_cfg_32x128x8x3"]["dq"] == 0.0


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDL R8, [R1+0x9c] ;
        /*0020*/              @!P0 FFMA R2, R3, R4, R5 ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, R136, gdesc[UR32], RZ, !UPT ;
        /*0040*/               @P1 BRA `(.L_x_1) ;
        /*0050*/                   STL [R1+0x9c], R8 ;
.L_x_1:
        /*0060*/                   FADD R2, R2, 1 ;
        /*0070*/               @P2 BRA `(.L_x_0) ;
        /*0080*/                   EXIT ;
"""


def test_kernel_sass_finds_loops_and_spills():
    """bench/kernel_sass.py: a branch back to an earlier label closes a loop (a forward branch
    does not), opcodes lose predicates and modifiers, spills count in the loop's mix."""
    ks = _module("kernel_sass")
    ins, loops = ks.parse_sass(SASS)
    assert len(ins) == 9 and ins[0].startswith("MOV")
    assert loops == [(1, 7)]  # .L_x_0 at instruction 1, the backward BRA at 7
    assert [ks.opcode(t) for t in ins[1:5]] == ["LDL", "FFMA", "HGMMA", "BRA"]
    (line,) = ks.describe(ins, loops, min_len=1)
    assert line == "  loop [1, 7], 7 instructions: LDL 1, STL 1, HGMMA 1, FFMA 1, FADD 1"
    assert ks.describe(ins, loops) == []  # shorter than the default 40


class _Stop(Exception):
    """Raised by a stand-in to end a benchmark's main() before any GPU work."""


def test_attention_bench_sweeps_at_the_requested_heads(monkeypatch):
    """bench/attention.py --sweep times its candidates at the run's --heads / --hkv (it swept at
    H = Hkv = 16 whatever GQA shape the run then measured), and its inputs take both."""
    bench = _module("attention")
    real_sweep = bench.sweep
    seen = {}

    def fake_sweep(**kw):
        seen.update(kw)
        raise _Stop

    monkeypatch.setattr(bench, "sweep", fake_sweep)
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda *a: "fake GPU")
    monkeypatch.setattr("sys.argv", ["attention.py", "--sweep", "--heads", "24", "--hkv", "8",
                                     "--head-dim", "64", "--sweep-len", "2048"])
    with pytest.raises(_Stop):
        bench.main()
    assert seen == {"D": 64, "L": 2048, "H": 24, "HKV": 8}

    def fake_inputs(*args, **kw):
        raise _Stop(args)

    monkeypatch.setattr(bench, "Inputs", fake_inputs)
    with pytest.raises(_Stop) as e:
        real_sweep(D=64, L=2048, H=24, HKV=8)
    assert e.value.args[0][:5] == (16, 24, 8, 2048, 64)  # B = 32768 // L, H, Hkv, L, D


def test_ncu_summary_has_a_usage_and_names_its_argument(capsys):
    """bench/ncu_summary.py parses its arguments: --help prints the usage, a missing CSV exits 2
    naming the argument (was: a traceback from sys.argv[1])."""
    summ = _module("ncu_summary")
    with pytest.raises(SystemExit) as e:
        summ.main(["--help"])
    assert e.value.code == 0 and "source_csv" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        summ.main([])
    assert e.value.code == 2 and "source_csv" in capsys.readouterr().err


def test_linear_bench_times_the_optical_linear_module_itself():
    """bench/linear.py's optical arm is OpticalLinear (not a copy of its forward): built over the
    very parameters F.linear is timed with, in training mode, with the benchmark's quantizer
    settings, and calibrated by one training call and update_ranges (the x range is then x's
    min/max), after which forward and backward run."""
    from torchtitan_ext.optical.modules import OpticalLinear

    bench = _module("linear")
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(24, 16, generator=g) * 0.25)
    b = torch.nn.Parameter(torch.randn(24, generator=g) * 0.1)
    x = torch.randn(8, 16, generator=g, requires_grad=True)
    layer = bench._optical_layer(w, b)
    assert isinstance(layer, OpticalLinear) and layer.training
    assert layer.weight is w and layer.bias is b
    c = layer.config
    assert (c.q_levels, c.q_lut_min, c.q_smooth_factor, c.q_noise, c.q_grad,
            c.q_quantiles) == (bench.LEVELS, bench.LUT, bench.SMOOTH, True, "ste", None)
    assert not bool((layer.ranges()[:, 0] <= layer.ranges()[:, 1]).any())  # uncalibrated
    bench._calibrate(layer, x)
    r = layer.ranges()
    assert bool((r[:, 0] < r[:, 1]).all())
    assert torch.equal(r[0], torch.stack([x.min(), x.max()]).detach())
    gx, gw, gb = torch.autograd.grad(layer(x), (x, w, b), torch.ones(8, 24))
    assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == b.shape
