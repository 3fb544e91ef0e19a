"""The catalogue of bad inputs: what a user who gets something wrong sees, and the exit code.

Each row is (input, expected exit code, words the one-line message must contain). Extend it
whenever a new bad input is found. Two tables:

- CONFIG_CASES run `run.py`'s `main()` in this process (the checks before any distributed
  state or model weights exist): every row must end with exit code 2 and one line on stderr.
- RUN_CASES start `python run.py` as one process (the torchrun environment variables set by
  hand, so the exit code is run.py's own) against a copy of a 2-step checkpoint of the debug
  model, damaged or resumed differently as the row says. Under torchrun the same worker exit
  code 2 becomes torchrun's exit code 1 with its ChildFailedError summary (one row checks it).
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
    ("activation checkpointing without rng state",
     ["--activation_checkpoint.mode", "full", "--activation_checkpoint.no-preserve_rng_state"],
     None, 2, ["activation_checkpoint.preserve_rng_state"]),
]


@pytest.mark.parametrize("name,args,transform,code,words", CONFIG_CASES,
                         ids=[c[0] for c in CONFIG_CASES])
def test_config_case(name, args, transform, code, words, tmp_path, capsys, monkeypatch):
    from torchtitan_ext.titan.launch import main

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    argv = [*SMALL, "--job.dump_folder", str(tmp_path / "run"), *args]
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


def run_py(*args: str, torchrun: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
    """`run.py` as one process: directly (torchrun's variables set by hand) or under torchrun."""
    env = _env()
    port = str(_free_port())
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
               "--master_port", port, "run.py", *args]
    else:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                   GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = [sys.executable, "run.py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


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


@pytest.mark.slow
@pytest.mark.parametrize("name,damage,args,under_torchrun,code,words", RUN_CASES,
                         ids=[c[0] for c in RUN_CASES])
def test_run_case(name, damage, args, under_torchrun, code, words, trained, tmp_path):
    dump = tmp_path / "run"
    shutil.copytree(trained, dump)
    damage(dump / "checkpoint")
    args = [a.format(dump=dump) for a in args]
    r = run_py(*CKPT, "--training.steps", "3", "--job.dump_folder", str(dump), *args,
               torchrun=under_torchrun)
    out = r.stdout + r.stderr
    assert r.returncode == code, out[-4000:]
    for w in words:
        assert w.format(dump=dump) in out, (w, out[-4000:])
    errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert len(errors) == (0 if code == 0 else 1), errors
    # No traceback of the worker; under torchrun, the agent's own (ChildFailedError) only.
    assert out.count("Traceback (most recent call last)") == int(under_torchrun), out[-4000:]
