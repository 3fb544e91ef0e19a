"""End to end through `torchrun run.py` on the CPU: training, tensor parallel, bad configs, resume.

These start real torchrun jobs (gloo), so they take a minute or two in all.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "train_configs/debug_model.toml"
STEP_RE = re.compile(r"step:\s+(\d+)\s.*?loss:\s+([0-9.naninf]+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")

pytestmark = pytest.mark.slow


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def torchrun(nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_port", str(29500 + (os.getpid() % 1000)), "run.py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def losses(output: str) -> dict[int, float]:
    out = {}
    for line in ANSI.sub("", output).splitlines():
        m = STEP_RE.search(line)
        if m:
            out[int(m.group(1))] = float(m.group(2))
    return out


def test_debug_model_trains_20_steps_and_logs_the_histogram(tmp_path):
    # The shipped config at sequence length 64 instead of its 256: the step cost on the CPU goes
    # with the tokens per step (~9 s a step at 256, ~1.4 s at 64); the loss still falls by ~3.
    r = torchrun(1, "--job.config_file", CONFIG, "--job.dump_folder", str(tmp_path),
                 "--training.seq_len", "64")
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "optical transform: 32 modules made optical" in log
    assert r"layers\.[0-9]+\.attention" in log
    seen = losses(log)
    assert sorted(seen) == list(range(1, 21))
    assert seen[20] < seen[1], seen


def test_tensor_parallel_two_processes(tmp_path):
    r = torchrun(2, "--job.config_file", CONFIG, "--job.dump_folder", str(tmp_path),
                 "--parallelism.tensor_parallel_degree", "2", "--training.steps", "10",
                 "--training.seq_len", "64")
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    seen = losses(log)
    assert len(seen) == 10 and seen[10] < seen[1], seen


# One eager run serves two tests: the warm-up/statistics checks and the eager side of the
# compiled-vs-eager comparison (the TensorBoard writer does not touch the losses).
STATS_RUN = ["--job.config_file", CONFIG, "--training.steps", "6", "--training.seq_len", "64",
             "--training.local_batch_size", "4", "--debug.seed", "3", "--metrics.log_freq", "1",
             "--optical.stats_every", "2", "--optical.quant_warmup_steps", "2"]


@pytest.fixture(scope="module")
def eager_stats_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("eager_stats")
    r = torchrun(1, *STATS_RUN, "--metrics.enable_tensorboard", "--job.dump_folder", str(tmp_path))
    return tmp_path, r


def test_digital_warmup_then_optical_with_range_statistics(eager_stats_run):
    tmp_path, r = eager_stats_run
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "optical simulation on from step 3" in log
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events, list(tmp_path.rglob("*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("optical/layers.0.attention.wq/out_clamp_frac",
                "optical/layers.0.attention.inner_attention/p_zeroed_clamp_frac",
                "optical_clamp/linear_x", "optical_clamp/attention_s"):
        assert tag in tags, (tag, tags[:20])
    line = next(l for l in log.splitlines() if "optical clamp fractions step 4:" in l)
    fractions = {k: float(v) for k, v in (kv.split("=") for kv in line.split(": ", 2)[-1].split())}
    assert set(fractions) >= {"attention_k", "attention_p_zeroed", "linear_out"}, line
    # Buffers of a model built on the meta device start as garbage unless reset at init.
    assert all(0 <= v <= 1 for v in fractions.values()), line
    assert all(0 <= v <= 1 for v in (e.value for e in acc.Scalars("optical_clamp/linear_x")))
    assert "optical/layers.0.attention.inner_attention/s_hi" in tags
    assert [e.step for e in acc.Scalars("optical/layers.0.attention.wq/x_hi")] == [2, 4, 6]


def test_compiled_blocks_train_like_eager_with_statistics_steps(tmp_path, eager_stats_run):
    """torch.compile per block (inductor on the CPU) through the optical ops, including the
    statistics steps (a module flag flips, so the blocks recompile once) and the digital
    warm-up switch: the same losses as eager up to inductor's fused float rounding."""
    compiled = torchrun(1, *STATS_RUN, "--compile.enable", "--job.dump_folder", str(tmp_path / "c"))
    log = compiled.stdout + compiled.stderr
    assert compiled.returncode == 0, log[-4000:]
    assert "optical clamp fractions step 6:" in log
    assert "optical simulation on from step 3" in log
    _, eager = eager_stats_run
    assert eager.returncode == 0, (eager.stdout + eager.stderr)[-4000:]
    got, want = losses(log), losses(eager.stdout + eager.stderr)
    assert sorted(got) == list(range(1, 7)) and sorted(want) == list(range(1, 7)), (got, want)
    for s in got:
        assert abs(got[s] - want[s]) <= 1e-3 * want[s], (s, got, want)


def _compiled_ac_step_calls(tmp_path, config: str, ac_option: str, *extra: str):
    """Counter of the op names in torchtitan's profiler trace of step 4 of a compiled run of
    `config` with selective AC `ac_option` (seq_len 64, batch 2)."""
    import collections
    import json

    r = torchrun(1, "--job.config_file", config, "--training.steps", "4", "--training.seq_len",
                 "64", "--training.local_batch_size", "2", "--metrics.log_freq", "1",
                 "--compile.enable", "--activation_checkpoint.mode", "selective",
                 "--activation_checkpoint.selective_ac_option", ac_option, *extra,
                 "--profiling.enable_profiling", "--profiling.profile_freq", "4",
                 "--profiling.profiler_warmup", "1", "--profiling.profiler_active", "1",
                 "--job.dump_folder", str(tmp_path))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    (trace,) = tmp_path.glob("profile_traces/iteration_4/rank0_trace.json")
    return collections.Counter(
        e["name"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X")


@pytest.mark.parametrize("option", ["2", "op", "2-save-attention"])
def test_selective_ac_recomputes_the_optical_ops_of_checkpointed_layers(tmp_path, option):
    """Selective AC on compiled blocks. Every 2nd layer ("2"): the optical ops of the
    checkpointed layers run again in the backward, so the layers keep no activations; with
    `optical.ac_save_attention`, all but their attention. Per op ("op", every layer): the
    optical attention is saved like SDPA in the digital twin, and every second linear like the
    twin's mms (titan.activation_checkpoint). Counted from torchtitan's
    own profiler trace of step 4. (An autograd.Function around the ops lost the recompute on
    the GPU while keeping it here, bench/results/train-profile-h200.json; there the check is
    `bench/train.py --profile`, which counts the kernel launches.)"""
    calls = _compiled_ac_step_calls(
        tmp_path, CONFIG, option.split("-")[0], "--optical.quant_warmup_steps", "0",
        "--optical.stats_every", "0",
        *(["--optical.ac_save_attention"] if option.endswith("save-attention") else []))
    layers = 4
    # linears / attentions that run again in the backward: all those of every second layer
    # ("2"); per op, the 2nd, 4th and 6th linear of each layer (wk, wo, w3: every second matmul,
    # as the twin's mms), and no attention
    linears_again, attention_again = {"2": (7 * 2, 2), "op": (3 * layers, 0),
                                      "2-save-attention": (7 * 2, 0)}[option]
    assert calls["optical::linear"] == 7 * layers + linears_again, calls
    assert calls["optical::attention"] == layers + attention_again, calls
    assert calls["optical::linear_backward"] == 7 * layers, calls
    assert calls["optical::attention_backward"] == layers, calls


@pytest.mark.parametrize("save", [False, True], ids=["recomputed", "saved"])
def test_twin_saves_its_sdpa_under_ac_save_attention(tmp_path, save):
    """The digital twin's side of `optical.ac_save_attention`, compiled: with every-2nd-layer
    AC its SDPA (the CPU's flash op here) runs again in the two checkpointed layers' backward,
    and with the option it does not. Counted from torchtitan's profiler trace of step 4."""
    calls = _compiled_ac_step_calls(tmp_path, "train_configs/debug_model_digital.toml", "2",
                                    *(["--optical.ac_save_attention"] if save else []))
    sdpa = calls["aten::_scaled_dot_product_flash_attention_for_cpu"]
    assert sdpa == 4 + (0 if save else 2), {k: v for k, v in calls.items() if "attention" in k}


BAD = {
    "warmup": (["--optical.quant_warmup_steps", "-1"], "optical.quant_warmup_steps"),
    "missing file": (["--optical.transform_config", "nope/missing.yaml"], "does not exist"),
    "kernels": (["--optical.kernels", "cuda"], "optical.kernels"),
    "flavor": (["--model.flavor", "3B"], "model.flavor"),
}


def _bad_yaml(tmp_path: Path, name: str, text: str) -> list[str]:
    p = tmp_path / name
    p.write_text(text)
    return ["--optical.transform_config", str(p)]


BAD_CASES = ["missing file", "kernels", "warmup", "flavor", "unparsable", "levels", "lut",
             "quantiles", "smooth", "unknown key", "no match"]
YAML_CASES = {
    "unparsable": ("use_regex: [true\n", "does not parse"),
    "levels": ("layer_name_to_config:\n  'layers\\.0\\.attention': {q_levels: 1}\n", "q_levels"),
    "lut": ("layer_name_to_config:\n  'layers\\.0\\.attention': {q_lut_min: 1.5}\n", "q_lut_min"),
    "quantiles": ("layer_name_to_config:\n  'layers\\.0\\.attention': {q_quantiles: [0.9, 0.1]}\n",
                  "q_quantiles"),
    "smooth": ("layer_name_to_config:\n  'layers\\.0\\.attention': {q_smooth_factor: 1}\n",
               "q_smooth_factor"),
    "unknown key": ("layer_name_to_config:\n  'layers\\.0\\.attention': {q_bits: 8}\n", "q_bits"),
    "no match": ("layer_name_to_config:\n  'model\\.layers\\.[0-9]+\\.mlp': {}\n",
                 "matches no module"),
}


@pytest.fixture(scope="module")
def bad_config_runs(tmp_path_factory):
    """Every case as `python run.py --job.config_file CONFIG ...`, each in a fresh process forked
    from one interpreter that imported run.py's imports once (tests/run_py_forked.py): the same
    exit status and output as separate launches, without paying the ~4 s import 11 times."""
    from run_py_forked import run_forked

    tmp = tmp_path_factory.mktemp("bad_config")
    argvs = []
    for i, case in enumerate(BAD_CASES):
        if case in BAD:
            extra = BAD[case][0]
        else:
            extra = _bad_yaml(tmp, f"bad{i}.yaml", YAML_CASES[case][0])
        argvs.append(["--job.config_file", CONFIG, *extra])
    results = run_forked(argvs, tmp / "forked", _env(), timeout=60)
    return {case: (r["returncode"], r["stderr"], r["elapsed"])
            for case, r in zip(BAD_CASES, results)}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_config_exits_fast_naming_the_key(bad_config_runs, case):
    needle = BAD[case][1] if case in BAD else YAML_CASES[case][1]
    returncode, stderr, elapsed = bad_config_runs[case]
    assert returncode == 2, stderr[-3000:]
    assert needle in stderr, stderr[-3000:]
    assert "Traceback" not in stderr
    assert elapsed < 60
    if case == "no match":
        assert "layers.0.attention.wq" in stderr  # shows real module names


def test_checkpoint_resume_continues_the_same_run(tmp_path):
    common = ["--job.config_file", CONFIG, "--training.steps", "6", "--checkpoint.enable",
              "--checkpoint.interval", "3", "--debug.seed", "7", "--training.seq_len", "64",
              "--training.local_batch_size", "2"]
    a = torchrun(1, *common, "--job.dump_folder", str(tmp_path / "a"))
    assert a.returncode == 0, (a.stdout + a.stderr)[-4000:]
    full = losses(a.stdout + a.stderr)
    (tmp_path / "b" / "checkpoint").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoint" / "step-3", tmp_path / "b" / "checkpoint" / "step-3")
    b = torchrun(1, *common, "--job.dump_folder", str(tmp_path / "b"))
    log = b.stdout + b.stderr
    assert b.returncode == 0, log[-4000:]
    assert "Loading the checkpoint" in log
    resumed = losses(log)
    assert sorted(resumed) == [4, 5, 6]
    # Weights, optimizer, data position, range buffers and the noise generators all resume.
    assert all(resumed[s] == full[s] for s in (4, 5, 6)), (full, resumed)
