"""Step-folder checks without training: manifests, damage detection, transform records and diffs.

A small DCP checkpoint is written without a process group; every check is then applied to
copies of it damaged in one way each.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from torchtitan_ext.optical.config import TransformConfig, transform_diff
from torchtitan_ext.titan import checkpoint_integrity as ci


@pytest.fixture(scope="module")
def step(tmp_path_factory) -> Path:
    import torch.distributed.checkpoint as dcp

    folder = tmp_path_factory.mktemp("ckpt") / "checkpoint" / "step-2"
    state = {"w": torch.arange(4096, dtype=torch.float32), "b": torch.ones(3),
             "train_state": {"step": 2}}
    ci.write_recorded_transform(folder, {"format": 1, "modules": {}, "options": {}})
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    ci.write_manifest(folder)
    return folder


def _copy(step: Path, tmp_path: Path, name: str = "step-2") -> Path:
    dst = tmp_path / "checkpoint" / name
    shutil.copytree(step, dst)
    return dst


def _data_file(folder: Path) -> Path:
    return next(folder.glob("*.distcp"))


def test_intact_folder_verifies(step):
    assert ci.verify_step(step) is None
    manifest = json.loads((step / ci.MANIFEST_FILE).read_text())
    assert set(manifest["files"]) >= {".metadata", ci.RECORD_FILE, _data_file(step).name}


@pytest.mark.parametrize("damage,reason", [
    ("truncate", "truncated file"),
    ("flip", "checksum mismatch"),
    ("no_metadata", "no .metadata"),
    ("metadata", "damaged .metadata"),
    ("missing", "missing file"),
    ("manifest", "damaged optical_manifest.json"),
])
def test_each_kind_of_damage_is_named(step, tmp_path, damage, reason):
    folder = _copy(step, tmp_path)
    data = _data_file(folder)
    if damage == "truncate":
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)
    elif damage == "flip":
        with open(data, "r+b") as f:
            f.seek(100)
            b = f.read(8)
            f.seek(100)
            f.write(bytes(x ^ 0xFF for x in b))
    elif damage == "no_metadata":
        (folder / ".metadata").unlink()
    elif damage == "metadata":
        (folder / ".metadata").write_bytes(b"\x80\x04garbage")
    elif damage == "missing":
        data.unlink()
    else:
        (folder / ci.MANIFEST_FILE).write_text("{not json")
    assert reason in (ci.verify_step(folder) or ""), ci.verify_step(folder)


def test_flipped_bytes_pass_without_checksums_but_not_with(step, tmp_path):
    folder = _copy(step, tmp_path)
    data = _data_file(folder)
    with open(data, "r+b") as f:
        f.seek(64)
        f.write(b"\x01\x02\x03\x04")
    assert ci.verify_step(folder, checksums=False) is None
    assert "checksum mismatch" in ci.verify_step(folder)


def test_newest_loadable_step_skips_damaged_folders(step, tmp_path):
    _copy(step, tmp_path, "step-2")
    newer = _copy(step, tmp_path, "step-4")
    (newer / ".metadata").unlink()
    (tmp_path / "checkpoint" / "step-6").mkdir()  # a save that had just begun
    chosen, skipped = ci.newest_loadable_step(tmp_path / "checkpoint")
    assert chosen == 2
    assert [s for s, _ in skipped] == [6, 4]
    assert all("no .metadata" in r for _, r in skipped)
    assert ci.newest_loadable_step(tmp_path / "nothing") == (None, [])
    # What the resume passes after a DCP error in step-2: the rest, without repeating reasons.
    assert ci.newest_loadable_step(tmp_path / "checkpoint", exclude={2, 6}) == (
        None, [(4, skipped[1][1])])


def test_a_crash_while_writing_the_manifest_leaves_none(step, tmp_path, monkeypatch):
    folder = _copy(step, tmp_path)
    (folder / ci.MANIFEST_FILE).unlink()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process died between writing and renaming

    monkeypatch.setattr(ci.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        ci.write_manifest(folder)
    assert not (folder / ci.MANIFEST_FILE).exists()
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]
    assert ci.verify_step(folder) is None  # structure alone still vouches for it


def test_a_stale_temporary_manifest_is_ignored(step, tmp_path):
    folder = _copy(step, tmp_path)
    (folder / f".{ci.MANIFEST_FILE}.tmp-abc").write_text("{half")
    assert ci.verify_step(folder) is None
    manifest = ci.write_manifest(folder)
    assert not [f for f in manifest["files"] if ".tmp-" in f]


def test_recorded_transform_round_trip_and_damage(step, tmp_path):
    assert ci.read_recorded_transform(step) == {"format": 1, "modules": {}, "options": {}}
    assert ci.read_recorded_transform(tmp_path) is None
    (tmp_path / ci.RECORD_FILE).write_text("[1,")
    with pytest.raises(ci.CheckpointLoadError, match=ci.RECORD_FILE):
        ci.read_recorded_transform(tmp_path)


def _record(levels: int, attention: bool = True) -> dict:
    from torchtitan.models.llama3 import llama3_args, Transformer

    from torchtitan_ext.optical.transform import resolve_transform, transform_model

    layers = {"default": None,
              r"layers\.[0-9]+\.attention\.(wq|wk|wv|wo)": {"q_levels": levels}}
    if attention:
        layers[r"layers\.[0-9]+\.attention"] = {}
    config = TransformConfig.from_dict({"layer_name_to_config": layers})
    with torch.device("meta"):
        model = Transformer(llama3_args["debugmodel"])
    transform_model(model, config)
    return resolve_transform(model, config, {"quant_warmup_steps": 0})


def test_transform_diff_names_module_key_and_both_values():
    a = _record(256)
    assert a["modules"]["layers.0.attention.wq"]["kind"] == "linear"
    assert a["modules"]["layers.0.attention"]["kind"] == "attention"
    assert transform_diff(a, json.loads(json.dumps(a))) == []
    rows = transform_diff(a, _record(16))
    assert ("layers.0.attention.wq", "q_levels", 256, 16) in rows
    assert all(key == "q_levels" for _, key, _, _ in rows)
    from torchtitan.models.llama3 import llama3_args

    n_layers = llama3_args["debugmodel"].n_layers  # the expected rows, not the rows' own count
    rows = transform_diff(a, _record(256, attention=False))
    assert n_layers > 0 and len(rows) == n_layers, rows
    assert rows == [(f"layers.{i}.attention", "optical", "optical", "digital")
                    for i in range(n_layers)]
    rows = transform_diff(a, {**a, "options": {"quant_warmup_steps": 100}})
    assert rows == [("<options>", "quant_warmup_steps", 0, 100)]


def test_a_purged_folder_is_not_recreated_by_its_manifest(step, tmp_path):
    folder = _copy(step, tmp_path)
    shutil.rmtree(folder)
    writer = ci.ManifestWriter()
    writer.submit(folder)
    writer.join()
    assert not folder.exists()


def test_the_recorded_transform_rebuilds_its_config():
    from torchtitan_ext.optical.config import transform_config_from_record

    record = _record(16)
    config = transform_config_from_record(json.loads(json.dumps(record)))
    assert config.match("layers.1.attention.wk")[1].q_levels == 16
    assert config.match("output") == ("default", None)
    assert transform_config_from_record({"transform": None}) is None


# ------------------------------------------------- checkpoint.initial_load_path (first load)

RANGES = "layers.0.attention.inner_attention.optical_ranges"


@pytest.fixture
def initial_loader(tmp_path, monkeypatch):
    """make(initial folder, run's record, allow, in_hf) -> the run's checkpoint manager before
    its first step folder exists; torchtitan's own load is replaced by one that records its
    calls in `loads` (what reaches it was checked first)."""
    from types import SimpleNamespace

    from torchtitan.components.checkpoint import CheckpointManager

    from torchtitan_ext.titan.checkpointing import OpticalCheckpointManager

    loads = []
    monkeypatch.setattr(CheckpointManager, "load",
                        lambda self, step=-1: loads.append(step) or True)

    def make(initial, record, allow=False, in_hf=False):
        m = OpticalCheckpointManager.__new__(OpticalCheckpointManager)
        m.enable, m.folder = True, str(tmp_path / "run" / "checkpoint")  # no step folder yet
        m.initial_load_path, m.initial_load_in_hf = str(initial), in_hf
        m._optical_record, m._allow_transform_change = record, allow
        m._missing_ranges = set()
        m.states = {"model": SimpleNamespace(state_dict=lambda: {"w": None, RANGES: None})}
        m.close = lambda: None  # nothing was started; torchtitan's __del__ calls close()
        return m

    make.loads = loads
    return make


ATTENTION_RECORD = {"format": 1, "modules": {"layers.0.attention": {"kind": "attention"}},
                    "options": {}}


def test_initial_load_path_is_verified_like_a_resume(step, tmp_path, initial_loader):
    """The folder of `checkpoint.initial_load_path` gets a resume's integrity check (no
    fallback: the user named it) before torchtitan reads it."""
    same = {"format": 1, "modules": {}, "options": {}}
    assert initial_loader(step, same).load() is True and initial_loader.loads == [-1]
    damaged = _copy(step, tmp_path)
    with open(_data_file(damaged), "r+b") as f:
        f.truncate(100)
    with pytest.raises(ci.CheckpointLoadError,
                       match=re.escape(f"checkpoint.initial_load_path {damaged}: truncated file")):
        initial_loader(damaged, same).load()
    with pytest.raises(ci.CheckpointLoadError, match="not a folder"):
        initial_loader(tmp_path / "nope", same).load()
    assert initial_loader.loads == [-1]


def test_initial_load_path_compares_the_transform(step, initial_loader):
    """A different recorded transform stops the first load as it stops a resume; with
    allow_transform_change it loads, and the run's range buffers the checkpoint lacks start
    fresh."""
    with pytest.raises(ci.CheckpointLoadError, match="another optical transform") as info:
        initial_loader(step, ATTENTION_RECORD).load()
    assert "layers.0.attention: optical: checkpoint 'digital', given 'optical'" in str(info.value)
    assert initial_loader.loads == []
    allowed = initial_loader(step, ATTENTION_RECORD, allow=True)
    assert allowed.load() is True and initial_loader.loads == [-1]
    assert allowed._missing_ranges == {RANGES}


def test_initial_load_errors_and_hf_folders(step, tmp_path, initial_loader, monkeypatch):
    """An error while torchtitan reads the named folder is one CheckpointLoadError naming it;
    an HF folder (initial_load_in_hf: no DCP metadata, no JSON record) goes to torchtitan's HF
    import unchecked."""
    from torchtitan.components.checkpoint import CheckpointManager

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(b"")
    assert initial_loader(hf, ATTENTION_RECORD, in_hf=True).load() is True

    def fail(self, step=-1):
        raise RuntimeError("Missing key in checkpoint state_dict: tok_embeddings.weight")

    monkeypatch.setattr(CheckpointManager, "load", fail)
    with pytest.raises(ci.CheckpointLoadError, match=r"initial_load_path .* cannot be loaded: "
                                                     r"RuntimeError: Missing key"):
        initial_loader(step, {"format": 1, "modules": {}, "options": {}}).load()
