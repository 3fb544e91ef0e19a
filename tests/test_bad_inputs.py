"""The catalogue of bad inputs: what a user who gets something wrong sees, and the exit code.

Each row is (input, expected exit code, words the one-line message must contain). Extend it
whenever a new bad input is found. Two tables:

- CONFIG_CASES run `run.py`'s `main()` in this process (the checks before any distributed
  state or model weights exist): every row must end with exit code 2 and one line on stderr.
- RUN_CASES start `python run.py` as one process (the torchrun environment variables set by
  hand, so the exit code is run.py's own) against a copy of a 2-step checkpoint of the debug
  model, damaged or resumed differently as the row says. Under torchrun the same worker exit
  code 2 becomes torchrun's exit code 1 with its ChildFailedError summary (one row checks it).
- EXPORT_CASES run the exporter's `main()` (or, for the HF writer, `save_optical_hf`) in this
  process against `trained`'s step-2 and one shared export of it: bad input ends with exit code
  2 and one `error:` line; rows that must fail before the checkpoint is read fail if it is read;
  each row's check says what must be left on disk.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "train_configs/debug_model.toml"
DIGITAL = "train_configs/debug_model_digital.toml"
SMALL = ["--job.config_file", CONFIG, "--training.seq_len", "64",
         "--training.local_batch_size", "2"]

LINEAR_ONLY = """use_regex: true
layer_name_to_config:
  default: null
  'layers\\.[0-9]+\\.attention\\.(wq|wk|wv|wo)|layers\\.[0-9]+\\.feed_forward\\.(w1|w2|w3)': {}
"""
SHADOWED = """use_regex: true
layer_name_to_config:
  default: null
  'layers\\.[0-9]+\\.attention\\.(wq|wk|wv|wo)|layers\\.[0-9]+\\.feed_forward\\.(w1|w2|w3)': {}
  'layers\\.0\\.attention\\.wq': {q_levels: 4}
"""
REPEATED_PATTERN = """use_regex: true
layer_name_to_config:
  'layers\\.[0-9]+\\.attention\\.wq': {q_levels: 4}
  'layers\\.[0-9]+\\.attention\\.wq': {q_levels: 16}
"""
REPEATED_TOP = """use_regex: true
layer_name_to_config:
  'layers\\.[0-9]+\\.attention\\.wq': {}
use_regex: false
"""
REPEATED_SETTING = """layer_name_to_config:
  'layers\\.[0-9]+\\.attention\\.wq': {q_levels: 4, q_levels: 8}
"""
REPEATED_JSON = ('{"layer_name_to_config": {"layers\\\\.0\\\\.attention\\\\.wq": {}, '
                 '"layers\\\\.0\\\\.attention\\\\.wq": null}}')
REPEATED_TOML = 'use_regex = true\nuse_regex = false\n[layer_name_to_config]\n"output" = {}\n'
NO_MATCH = "layer_name_to_config:\n  'layers\\.[0-9]+\\.attn\\.wq': {}\n"
BAD_LEVELS = "layer_name_to_config:\n  'output': {q_levels: 1}\n"
UNKNOWN_SETTING = "layer_name_to_config:\n  'output': {q_level: 16}\n"
QUANTILE_ATTENTION = ("layer_name_to_config:\n  'layers\\.[0-9]+\\.attention': "
                      "{q_quantiles: [0.01, 0.99]}\n")

# (id, extra arguments, transform file (suffix, text) or None, exit code, words)
CONFIG_CASES = [
    # fixed by issue 17 (fail on the code before it)
    ("misspelled converter", ["--model.converters", "optical_transfomer"], None, 2,
     ["model.converters", "optical_transfomer", "optical_transformer"]),
    ("tensor parallel 3 on one process", ["--parallelism.tensor_parallel_degree", "3"], None, 2,
     ["parallelism", "tensor_parallel 3", "number of processes, 1"]),
    ("pattern shadowed by an earlier one", [], (".yaml", SHADOWED), 2,
     ["never applies", "layers\\.0\\.attention\\.wq", "layers.0.attention.wq",
      "feed_forward"]),
    ("pattern given twice", [], (".yaml", REPEATED_PATTERN), 2,
     ["given twice", "lines 3 and 4"]),
    ("top-level key given twice", [], (".yaml", REPEATED_TOP), 2,
     ["'use_regex' is given twice"]),
    ("setting given twice", [], (".yaml", REPEATED_SETTING), 2, ["'q_levels' is given twice"]),
    ("JSON key given twice", [], (".json", REPEATED_JSON), 2, ["given twice"]),
    # already rejected before issue 17
    ("TOML key given twice", [], (".toml", REPEATED_TOML), 2, ["does not parse"]),
    ("unknown flavor", ["--model.flavor", "debug"], None, 2, ["model.flavor", "debugmodel"]),
    ("unknown model", ["--model.name", "llama5"], None, 2, ["model.name"]),
    ("missing transform file", ["--optical.transform_config", "no/such.yaml"], None, 2,
     ["optical.transform_config", "does not exist"]),
    ("transform file extension", [], (".txt", "x"), 2, [".txt", "allowed", ".yaml"]),
    ("pattern matching nothing", [], (".yaml", NO_MATCH), 2,
     ["matches no module", "layers.0.attention.wq"]),
    ("levels out of range", [], (".yaml", BAD_LEVELS), 2, ["q_levels", "2 <= q_levels"]),
    ("misspelled setting", [], (".yaml", UNKNOWN_SETTING), 2,
     ["unknown key 'q_level'", "q_levels"]),
    ("quantiles on attention", [], (".yaml", QUANTILE_ATTENTION), 2,
     ["q_quantiles", "attention"]),
    ("kernel mode", ["--optical.kernels", "cuda"], None, 2, ["optical.kernels", "reference"]),
    ("negative warm-up", ["--optical.quant_warmup_steps", "-1"], None, 2,
     ["optical.quant_warmup_steps", ">= 0"]),
    ("cuda graphs without compile", ["--optical.cuda_graphs"], None, 2,
     ["optical.cuda_graphs", "compile.enable = true", "compile.components"]),
    ("attention saving under memory-budget checkpointing",
     ["--optical.ac_save_attention", "--activation_checkpoint.mode", "memory_budget"], None, 2,
     ["optical.ac_save_attention", "mode = 'memory_budget'", "allowed: false"]),
    ("activation checkpointing without rng state",
     ["--activation_checkpoint.mode", "full", "--activation_checkpoint.no-preserve_rng_state"],
     None, 2, ["activation_checkpoint.preserve_rng_state"]),
    # review of the titan layer: each passed preflight and failed after distributed start-up
    # (or at the first step, or the last save), or was silently ignored
    ("pipeline parallelism", ["--parallelism.pipeline_parallel_degree", "2"], None, 2,
     ["parallelism.pipeline_parallel_degree", "optical_llama3", "allowed: 1"]),
    ("context parallelism", ["--parallelism.context_parallel_degree", "2"], None, 2,
     ["parallelism.context_parallel_degree", "optical_llama3", "allowed: 1"]),
    ("seed checkpoint without checkpointing", ["--checkpoint.create_seed_checkpoint"], None, 2,
     ["checkpoint.create_seed_checkpoint", "checkpoint.enable = true"]),
    ("range check without range sync",
     ["--optical.no-sync_ranges", "--optical.check_ranges_synced"], None, 2,
     ["optical.check_ranges_synced", "optical.sync_ranges is false", "allowed:"]),
    ("attention saving without checkpointing", ["--optical.ac_save_attention"], None, 2,
     ["optical.ac_save_attention", "mode = 'none'", "allowed: false", "'full'"]),
    ("attention saving under per-op checkpointing",
     ["--optical.ac_save_attention", "--activation_checkpoint.mode", "selective",
      "--activation_checkpoint.selective_ac_option", "op"], None, 2,
     ["optical.ac_save_attention", "selective_ac_option = 'op'", "allowed: false"]),
    ("memory-budget checkpointing without compile", ["--activation_checkpoint.mode",
                                                      "memory_budget"], None, 2,
     ["activation_checkpoint.mode", "'memory_budget' needs the model compiled",
      "compile.enable = False", "allowed: --compile.enable"]),
    ("float8 linears with optical linears",
     ["--model.converters", "optical_transformer,quantize.linear.float8"], None, 2,
     ["model.converters", "quantize.linear.float8", "optical_transformer"]),
    ("bfloat16 export of an optical run",
     ["--checkpoint.enable", "--checkpoint.last_save_model_only", "--checkpoint.export_dtype",
      "bfloat16"], None, 2,
     ["checkpoint.export_dtype", "'bfloat16'", "allowed with optical layers: 'float32'",
      "torchtitan_ext.hf.export"]),
    ("HF last save of an optical run", ["--checkpoint.last_save_in_hf"], None, 2,
     ["checkpoint.last_save_in_hf", "not supported for optical runs (allowed: false)",
      "python -m torchtitan_ext.hf.export"]),
    # the digital twin's [optical] section is checked too (a twin row names its job file)
    ("digital twin: kernel mode", ["--job.config_file", DIGITAL, "--optical.kernels", "cuda"],
     None, 2, ["optical.kernels", "reference"]),
    ("digital twin: missing transform file",
     ["--job.config_file", DIGITAL, "--optical.transform_config", "no/such.yaml"], None, 2,
     ["optical.transform_config", "does not exist"]),
    ("digital twin: negative warm-up",
     ["--job.config_file", DIGITAL, "--optical.quant_warmup_steps", "-5"], None, 2,
     ["optical.quant_warmup_steps", ">= 0"]),
]


@pytest.mark.parametrize("name,args,transform,code,words", CONFIG_CASES,
                         ids=[c[0] for c in CONFIG_CASES])
def test_config_case(name, args, transform, code, words, tmp_path, capsys, monkeypatch):
    from torchtitan_ext.titan.launch import main

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    # A row may name its own job file (torchtitan reads the first one given).
    small = SMALL[2:] if "--job.config_file" in args else SMALL
    argv = [*small, "--job.dump_folder", str(tmp_path / "run"), *args]
    if transform is not None:
        suffix, text = transform
        path = tmp_path / f"transform{suffix}"
        path.write_text(text)
        argv += ["--optical.transform_config", str(path)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == code, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not (tmp_path / "run").exists()  # stopped before anything was written


def test_cuda_graphs_checks_name_the_key():
    """optical.cuda_graphs beyond the catalogue row: the backend, gradient accumulation, several
    processes, no GPU, not a bool."""
    from types import SimpleNamespace

    from torchtitan_ext.optical.config import OpticalConfigError
    from torchtitan_ext.titan.cuda_graphs import check_cuda_graphs

    def job(value=True, enable=True, components=("model", "loss"), backend="inductor",
            global_batch=-1):
        return SimpleNamespace(optical=SimpleNamespace(cuda_graphs=value),
                               compile=SimpleNamespace(enable=enable, components=list(components),
                                                       backend=backend),
                               training=SimpleNamespace(local_batch_size=4,
                                                        global_batch_size=global_batch))

    check_cuda_graphs(job(), world_size=1, has_cuda=True)
    check_cuda_graphs(job(global_batch=4), world_size=1, has_cuda=True)
    check_cuda_graphs(job(False, enable=False), world_size=8, has_cuda=False)
    cases = [(job(), 2, True, ["one process only", "has 2"]),
             (job(), 1, False, ["needs a CUDA GPU"]),
             (job(components=("loss",)), 1, True, ["compile.components", "['loss']"]),
             (job(backend="aot_eager"), 1, True, ["compile.backend", "'aot_eager'"]),
             (job(global_batch=8), 1, True, ["gradient accumulation", "global_batch_size 8"]),
             (job("yes"), 1, True, ["true or false", "'yes'"])]
    for config, world, cuda, words in cases:
        with pytest.raises(OpticalConfigError) as info:
            check_cuda_graphs(config, world_size=world, has_cuda=cuda)
        for w in ["optical.cuda_graphs", *words]:
            assert w in str(info.value), (w, str(info.value))


def test_ac_save_attention_checks_name_the_key():
    """optical.ac_save_attention beyond the catalogue rows: a model whose parallelize function is
    not the optical spec's, not a bool. Accepted only where blocks are recomputed whole (full AC,
    layer-selective AC); per-op SAC (which saves the attention already) and no checkpointing
    (nothing recomputed) would ignore it."""
    from types import SimpleNamespace

    from torchtitan_ext.optical.config import OpticalConfigError
    from torchtitan_ext.titan.activation_checkpoint import check_ac_save_attention

    def job(value=True, mode="selective", name="optical_llama3", option="2"):
        return SimpleNamespace(optical=SimpleNamespace(ac_save_attention=value),
                               model=SimpleNamespace(name=name),
                               activation_checkpoint=SimpleNamespace(
                                   mode=mode, selective_ac_option=option))

    for ok in (job(), job(option="0"), job(mode="full"), job(False, mode="x", name="llama3"),
               job(False, mode="none"), job(False, option="op")):
        check_ac_save_attention(ok)
    cases = [(job(mode="memory_budget"), ["mode = 'memory_budget'"]),
             (job(mode="none"), ["mode = 'none'", "nothing is recomputed"]),
             (job(option="op"), ["selective_ac_option = 'op'", "saves the attention already"]),
             (job(name="llama3"), ["model.name", "'llama3'"]),
             (job("yes"), ["true or false", "'yes'"])]
    for config, words in cases:
        with pytest.raises(OpticalConfigError) as info:
            check_ac_save_attention(config)
        for w in ["optical.ac_save_attention", *words]:
            assert w in str(info.value), (w, str(info.value))


def test_triton_kernels_without_gpu_or_interpreter(monkeypatch):
    """A catalogue row that depends on the machine (the test session switches the interpreter
    on where there is no GPU), so preflight (an OpticalConfigError: exit code 2 from run.py)
    on a machine made to look GPU-less: 'triton' without the interpreter is refused there, not
    by the converter after distributed start-up."""
    import torch
    import torchtitan_ext.titan  # noqa: F401  (registers the spec, converter, datasets)
    from torchtitan.config import ConfigManager

    from torchtitan_ext.optical.config import OpticalConfigError
    from torchtitan_ext.titan.launch import preflight, with_custom_config

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = ConfigManager().parse_args(with_custom_config([*SMALL, "--optical.kernels",
                                                            "triton"]))
    with pytest.raises(OpticalConfigError) as info:
        preflight(config)
    for w in ["optical.kernels: 'triton' needs a CUDA GPU", "TRITON_INTERPRET=1", "'reference'"]:
        assert w in str(info.value), (w, str(info.value))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    preflight(config)  # the interpreter runs the kernels on the CPU


# ------------------------------------------------------------------------------- run cases


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_py(*args: str, torchrun: bool = False, nproc: int = 1,
           timeout: int = 300) -> subprocess.CompletedProcess:
    """`run.py` as one process, directly (torchrun's variables set by hand), or under torchrun
    with `nproc` processes."""
    env = _env()
    port = str(_free_port())
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_port", port, "run.py", *args]
    else:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                   GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = [sys.executable, "run.py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_py_forked(*argvs: list[str], folder: Path) -> list[subprocess.CompletedProcess]:
    """Each argument list as `run_py(*argv)` (one process, torchrun's variables set by hand),
    one after the other, each in a fresh process forked from one interpreter that imported
    run.py's imports once (tests/run_py_forked.py): the same exit status and output as separate
    launches without paying the ~4 s import for each."""
    from run_py_forked import run_forked

    torchrun_vars = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                         GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    return [subprocess.CompletedProcess(argv, r["returncode"], r["stdout"], r["stderr"])
            for argv, r in zip(argvs, run_forked(list(argvs), folder, _env(),
                                                 case_env=torchrun_vars))]


@pytest.mark.slow
def test_under_torchrun_the_line_comes_once_from_rank_0():
    """Two workers reject the same bad input: rank 0 prints the line, torchrun's summary names
    rank 0's exit code 2 as the root cause, and torchrun itself exits 1."""
    r = run_py(*SMALL, "--model.converters", "optical_transfomer", torchrun=True, nproc=2)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-4000:]
    errors = [ln for ln in out.splitlines() if ln.startswith("error")]
    assert errors == [errors[0]] and errors[0].startswith("error: model.converters"), errors
    root = out.split("Root Cause")[-1]
    assert "rank      : 0" in root and "exitcode  : 2" in root, out[-3000:]


CKPT = [*SMALL, "--checkpoint.enable", "--checkpoint.interval", "1",
        "--checkpoint.no-last-save-model-only", "--debug.seed", "3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A dump folder with complete checkpoints step-1 and step-2 of the optical debug model."""
    dump = tmp_path_factory.mktemp("bad_inputs") / "run"
    r = run_py(*CKPT, "--training.steps", "2", "--job.dump_folder", str(dump))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return dump


@pytest.mark.slow
def test_every_step_folder_records_its_transform_and_checksums(trained):
    from torchtitan_ext.titan.checkpoint_integrity import read_recorded_transform, verify_step

    for s in (1, 2):
        step = trained / "checkpoint" / f"step-{s}"
        assert (step / "optical_manifest.json").is_file()
        assert verify_step(step) is None
        record = read_recorded_transform(step)
        assert len(record["modules"]) == 32
        assert record["modules"]["layers.0.attention"]["kind"] == "attention"
        assert record["modules"]["layers.0.attention.wq"]["q_levels"] == 256


def truncate(path: Path, keep: float = 0.5) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep))


def flip(path: Path, at: float = 0.5) -> None:
    """Invert 64 bytes in the middle of a file (its size unchanged)."""
    with open(path, "r+b") as f:
        n = int(path.stat().st_size * at)
        f.seek(n)
        data = f.read(64)
        f.seek(n)
        f.write(bytes(b ^ 0xFF for b in data))


def _damage_newest(ckpt: Path) -> None:
    truncate(ckpt / "step-2" / "__0_0.distcp")


def _damage_all(ckpt: Path) -> None:
    flip(ckpt / "step-2" / "__0_0.distcp")
    truncate(ckpt / "step-1" / ".metadata", 0.1)


def _no_metadata(ckpt: Path) -> None:
    (ckpt / "step-2" / ".metadata").unlink()
    flip(ckpt / "step-1" / "__0_0.distcp")


def _write_linear_only(ckpt: Path) -> None:
    (ckpt.parent / "linear_only.yaml").write_text(LINEAR_ONLY)


LINEAR_ARGS = ["--optical.transform_config", "{dump}/linear_only.yaml"]

# (id, damage, extra arguments, under torchrun, exit code, words in the output)
RUN_CASES = [
    ("newest step truncated: falls back", _damage_newest, [], False, 0,
     ["skipped newer step folder(s)", "step-2: truncated file __0_0.distcp",
      "Loading the checkpoint from {dump}/checkpoint/step-1."]),
    ("named step damaged: no fallback", _damage_newest, ["--checkpoint.load_step", "2"], False,
     2, ["error: checkpoint.load_step 2: {dump}/checkpoint/step-2: truncated file __0_0.distcp"]),
    ("every step damaged", _damage_all, [], False, 2,
     ["error: checkpoint folder {dump}/checkpoint: no step folder can be loaded",
      "step-2: checksum mismatch in __0_0.distcp", "step-1: damaged .metadata"]),
    ("every step damaged, under torchrun", _no_metadata, [], True, 1,
     ["error: checkpoint folder {dump}/checkpoint: no step folder can be loaded",
      "step-2: no .metadata", "step-1: checksum mismatch", "exitcode  : 2"]),
    ("resume with another transform", _write_linear_only, LINEAR_ARGS, False, 2,
     ["was trained with another optical transform", "--optical.allow_transform_change",
      "layers.0.attention: optical: checkpoint 'optical', given 'digital'"]),
    ("another transform, allowed", _write_linear_only,
     [*LINEAR_ARGS, "--optical.allow_transform_change"], False, 0,
     ["continuing with a different optical transform",
      "range buffers in the checkpoint but not in this model (dropped): 4",
      "layers.0.attention.inner_attention.optical_ranges"]),
]


def _prepare_run_case(trained: Path, dump: Path, damage, args: list[str]) -> list[str]:
    shutil.copytree(trained, dump)
    damage(dump / "checkpoint")
    args = [a.format(dump=dump) for a in args]
    return [*CKPT, "--training.steps", "3", "--job.dump_folder", str(dump), *args]


@pytest.fixture(scope="module")
def single_process_run_cases(trained, tmp_path_factory):
    """The rows not under torchrun, each on its own damaged copy, run in one batch of forked
    processes (run_py_forked): name -> (dump folder, completed process)."""
    tmp = tmp_path_factory.mktemp("run_cases")
    rows = [(i, c) for i, c in enumerate(RUN_CASES) if not c[3]]
    dumps = {name: tmp / f"case{i}" / "run" for i, (name, *_) in rows}
    argvs = [_prepare_run_case(trained, dumps[name], damage, args)
             for _, (name, damage, args, *_) in rows]
    results = run_py_forked(*argvs, folder=tmp / "forked")
    return {name: (dumps[name], r) for (_, (name, *_)), r in zip(rows, results)}


@pytest.mark.slow
@pytest.mark.parametrize("name,damage,args,under_torchrun,code,words", RUN_CASES,
                         ids=[c[0] for c in RUN_CASES])
def test_run_case(name, damage, args, under_torchrun, code, words, trained, tmp_path, request):
    if under_torchrun:
        dump = tmp_path / "run"
        r = run_py(*_prepare_run_case(trained, dump, damage, args), torchrun=True)
    else:
        dump, r = request.getfixturevalue("single_process_run_cases")[name]
    out = r.stdout + r.stderr
    assert r.returncode == code, out[-4000:]
    for w in words:
        assert w.format(dump=dump) in out, (w, out[-4000:])
    errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert len(errors) == (0 if code == 0 else 1), errors
    # No traceback of the worker; under torchrun, the agent's own (ChildFailedError) only.
    assert out.count("Traceback (most recent call last)") == int(under_torchrun), out[-4000:]


@pytest.mark.slow
def test_allowed_change_initialises_range_buffers_the_checkpoint_lacks(tmp_path):
    """A linear-only checkpoint resumed with attention made optical too: without the override
    it stops with the diff; with it the four attention range buffers start fresh (torchtitan
    alone fails in DCP with 'Missing key in checkpoint state_dict')."""
    dump = tmp_path / "run"
    (tmp_path / "linear_only.yaml").write_text(LINEAR_ONLY)
    # Three launches one after the other on the same dump folder (run_py_forked).
    first, refused, allowed = run_py_forked(
        [*CKPT, "--training.steps", "1", "--job.dump_folder", str(dump),
         "--optical.transform_config", str(tmp_path / "linear_only.yaml")],
        [*CKPT, "--training.steps", "2", "--job.dump_folder", str(dump)],
        [*CKPT, "--training.steps", "2", "--job.dump_folder", str(dump),
         "--optical.allow_transform_change"],
        folder=tmp_path / "forked")
    r = first
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    r = refused
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-4000:]
    assert "layers.3.attention: optical: checkpoint 'digital', given 'optical'" in out
    r = allowed
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "(freshly initialised): 4 ['layers.0.attention.inner_attention.optical_ranges'" in out
    assert "(dropped): 0 []" in out


# ----------------------------------------------------------------- exporter and HF writer cases


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """`trained`'s step-2 exported once (optical, in this process); the rows copy what they
    change."""
    from torchtitan_ext.hf.export import export

    out = tmp_path_factory.mktemp("bad_inputs_export") / "export"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # the TOML names its tokenizer relative to the repository root
        export(CONFIG, trained / "checkpoint" / "step-2", out, log=lambda *_: None)
    return out


def _truncated_copy(ctx) -> None:
    shutil.copytree(ctx.step, ctx.tmp / "step-2")
    truncate(sorted((ctx.tmp / "step-2").glob("*.distcp"))[0])


def _user_folder(ctx) -> None:
    (ctx.tmp / "z").mkdir()
    (ctx.tmp / "z" / "notes.txt").write_text("mine")


def _export_with_user_file(ctx) -> None:
    shutil.copytree(ctx.export, ctx.tmp / "y")
    (ctx.tmp / "y" / "eval_results.json").write_text("mine")


def _read_only_parent(ctx) -> None:
    (ctx.tmp / "ro").mkdir()
    (ctx.tmp / "ro").chmod(0o555)


def _stale_temporaries(ctx) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (ctx.tmp / f".x.tmp-{dead.pid}-abc").mkdir()
    (ctx.tmp / f".x.tmp-{os.getpid()}-xyz").mkdir()  # a live writer's: kept


def _save_digital_into_export(ctx) -> None:
    """save_optical_hf of the digital model into a folder that held an optical export."""
    from transformers import LlamaForCausalLM

    from torchtitan_ext.hf.save import save_optical_hf

    _export_with_user_file(ctx)
    model = LlamaForCausalLM.from_pretrained(ctx.tmp / "y")  # digital: no trust_remote_code
    save_optical_hf(model, ctx.tmp / "y", tokenizer_dir=ctx.export)


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _only_user_file_left(ctx) -> None:
    assert (ctx.tmp / "z" / "notes.txt").read_text() == "mine"
    assert _names(ctx.tmp / "z") == {"notes.txt"}


def _user_file_kept(ctx) -> None:
    assert (ctx.tmp / "y" / "eval_results.json").read_text() == "mine"
    assert (ctx.tmp / "y" / "config.json").is_file()


def _no_optical_files(ctx) -> None:
    from torchtitan_ext.titan.hf_adapter import RANGES_FILE, TRANSFORM_FILE

    _user_file_kept(ctx)
    assert not _names(ctx.tmp / "y") & {TRANSFORM_FILE, RANGES_FILE, "modeling_optical_llama.py",
                                         "configuration_optical_llama.py"}
    assert "auto_map" not in (ctx.tmp / "y" / "config.json").read_text()


def _stale_removed(ctx) -> None:
    assert _names(ctx.tmp) == {"x", f".x.tmp-{os.getpid()}-xyz"}


def _nothing_written(ctx) -> None:
    assert not (ctx.tmp / "x").exists()


OTHER_TRANSFORM = "train_configs/transforms/optical_16levels.yaml"
NOT_AS_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")

# (id, export arguments or a callable(ctx), prepare(ctx) or None, reads the checkpoint,
#  exit code, words, check(ctx) or None). Arguments name {step} (trained step-2), {ckpts} (its
#  checkpoint folder), {run} (the dump folder), {export} (an export of step-2), {tmp}.
EXPORT_CASES = [
    ("export: checkpoint does not exist", ["--checkpoint", "{tmp}/nope"], None, False, 2,
     ["--checkpoint", "does not exist"], _nothing_written),
    ("export: the checkpoint folder, not a step", ["--checkpoint", "{ckpts}"], None, False, 2,
     ["not a torchtitan DCP checkpoint", "step-2"], _nothing_written),
    ("export: missing config", ["--config", "{tmp}/missing.toml"], None, True, 2, ["--config"],
     _nothing_written),
    ("export: flavor of another size", ["--model.flavor", "60M"], None, True, 2,
     ["60M", "tok_embeddings.weight", "[8192, 256]"], _nothing_written),
    ("export: truncated checkpoint", ["--checkpoint", "{tmp}/step-2"], _truncated_copy, True, 2,
     ["--checkpoint", "cannot be loaded"], _nothing_written),
    ("export: explicit other transform", ["--optical.transform_config", OTHER_TRANSFORM], None,
     True, 2, ["differs from the transform", "--optical.allow_transform_change", "q_levels",
               "256", "16"], _nothing_written),
    ("export: --out exists", ["--out", "{export}"], None, False, 2,
     ["already exists", "--overwrite"], None),
    ("export: --out holds the checkpoint", ["--out", "{run}", "--overwrite"], None, False, 2,
     ["holds the checkpoint"], None),
    ("export: --out below a file", ["--out", "{tmp}/afile/out"],
     lambda ctx: (ctx.tmp / "afile").write_text(""), False, 2, ["--out", "is not a folder"], None),
    pytest.param("export: --out not writable", ["--out", "{tmp}/ro/out"], _read_only_parent,
                 False, 2, ["--out", "not writable"], None, marks=NOT_AS_ROOT),
    ("export --overwrite: a folder that is not an export", ["--out", "{tmp}/z", "--overwrite"],
     _user_folder, False, 2, ["--out", "not a Hugging Face folder"], _only_user_file_left),
    ("export --overwrite: a user's file stays", ["--out", "{tmp}/y", "--overwrite"],
     _export_with_user_file, True, 0, ["exported", "optical"], _user_file_kept),
    ("export: stale temporary of a dead writer", [], _stale_temporaries, True, 0, ["exported"],
     _stale_removed),
    ("save_optical_hf: digital model into an optical export", _save_digital_into_export, None,
     False, 0, [], _no_optical_files),
]


def _export_argv(args: list[str], ctx) -> list[str]:
    """The row's arguments after the defaults it does not name (--config, --checkpoint {step},
    --out {tmp}/x)."""
    defaults = {"--config": CONFIG, "--checkpoint": "{step}", "--out": "{tmp}/x"}
    argv = [x for k, v in defaults.items() if k not in args for x in (k, v)] + list(args)
    return [a.format(**vars(ctx)) for a in argv]


def _run_row(action, ctx) -> int:
    """Run the row as its command line does: exit code; ExportError -> 'error: ...', exit 2."""
    from torchtitan_ext.hf import export as hf_export
    from torchtitan_ext.hf.errors import ExportError

    try:
        if callable(action):
            action(ctx)
        else:
            hf_export.main(_export_argv(action, ctx))
    except SystemExit as e:
        return e.code
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


@pytest.mark.slow
@pytest.mark.parametrize("name,action,prepare,reads,code,words,check", EXPORT_CASES,
                         ids=[getattr(c, "values", c)[0] for c in EXPORT_CASES])
def test_export_case(name, action, prepare, reads, code, words, check, trained, exported,
                     tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    from torchtitan_ext.hf import export as hf_export

    monkeypatch.chdir(ROOT)
    ctx = SimpleNamespace(tmp=tmp_path, step=trained / "checkpoint" / "step-2",
                          ckpts=trained / "checkpoint", run=trained, export=exported)
    if prepare is not None:
        prepare(ctx)
    if not reads:  # checked before the (expensive) read
        monkeypatch.setattr(hf_export, "load_titan_checkpoint",
                            lambda *a, **k: pytest.fail("read the checkpoint first"))
    got = _run_row(action, ctx)
    out, err = capsys.readouterr()
    assert got == code, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == (0 if code == 0 else 1), err[-3000:]
    for w in words:
        assert w in (err if code else out), (w, err[-3000:] if code else out[-3000:])
    if code and "differs" not in err:
        assert len(err.strip().splitlines()) == 1, err  # one line (a transform diff follows it)
    if check is not None:
        check(ctx)


def test_export_cli_process_exits_2(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "torchtitan_ext.hf.export", "--config", CONFIG, "--checkpoint",
         str(tmp_path / "missing"), "--out", str(tmp_path / "out")],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 2 and "error: --checkpoint" in r.stderr, r.stderr
