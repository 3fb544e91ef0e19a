"""python -m torchtitan_ext.evaluate on a random debug-model checkpoint: 2x2 grid x 2 seeds."""

import json
import math
from pathlib import Path

import pytest
import torch

from torchtitan_ext import evaluate as ev

CONFIG = "train_configs/debug_model.toml"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A DCP checkpoint of the optical debug model with random weights and calibrated ranges."""
    import torch.distributed.checkpoint as dcp

    from torchtitan_ext.hf.checkpoint import load_job_config
    from torchtitan_ext.titan.model import build_titan_model
    from torchtitan_ext.optical.ranges import update_ranges

    torch.manual_seed(0)
    job = load_job_config(CONFIG)
    model = build_titan_model(job, device="cpu").model
    with torch.no_grad():
        model.init_weights()
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 8192, (1, 16)))  # uninitialised ranges observe and pass through
    update_ranges(model, reduce=False)
    path = tmp_path_factory.mktemp("ck") / "step-1"
    dcp.save(model.state_dict(), checkpoint_id=str(path))
    return path


def test_grid_of_levels_and_lut_with_seeds(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    results = ev.run([
        "--config", CONFIG, "--checkpoint", str(checkpoint), "--levels", "256,4",
        "--lut", "0.02004,none", "--seeds", "0,1", "--digital", "--seq-len", "16",
        "--sequences", "2", "--batch-size", "2", "--device", "cpu", "--out", str(out),
    ])
    assert [r["label"] for r in results][-1] == "digital" and len(results) == 5
    optical = results[:4]
    assert all(len(r["losses"]) == 2 for r in optical) and len(results[-1]["losses"]) == 1
    assert any(r["losses"][0] != r["losses"][1] for r in optical)  # the seeds draw other noise
    by = {(r["settings"]["q_levels"], r["settings"]["q_lut_min"]): r for r in optical}
    # 4 levels is coarser than 256: the loss moves away from the digital model's
    digital = results[-1]["loss_mean"]
    assert abs(by[(4, None)]["loss_mean"] - digital) > abs(by[(256, None)]["loss_mean"] - digital)
    # energy: the digital point costs its digital baseline; optical points report theirs
    assert results[-1]["energy_known_pj_per_token"] == pytest.approx(
        results[-1]["digital_baseline_pj_per_token"])
    saved = json.loads((out / "eval.json").read_text())
    assert saved["meta"]["seeds"] == [0, 1] and len(saved["results"]) == 5
    md = (out / "eval.md").read_text()
    assert "| q_levels=4, q_lut_min=None |" in md and "digital" in md


def test_grid_restores_the_trained_settings(checkpoint):
    loaded = ev.load_model_for_eval(config=CONFIG, checkpoint=str(checkpoint), seq_len=16)
    before = {n: m.config for n, m in ev._optical_modules(loaded.model).items()}
    ranges = {n: m.optical_ranges.clone() for n, m in ev._optical_modules(loaded.model).items()}
    assert all(torch.isfinite(r).all() for r in ranges.values())  # trained ranges loaded
    tokens = torch.randint(0, 8192, (2, 17))
    ev.evaluate_grid(loaded, ev.build_grid({"levels": "8"}), tokens, [0], progress=False)
    after = ev._optical_modules(loaded.model)
    assert {n: m.config for n, m in after.items()} == before
    assert all(torch.equal(m.optical_ranges, ranges[n]) for n, m in after.items())


def test_export_folder_loads_the_optical_model_with_its_ranges(checkpoint, tmp_path):
    """--hf-folder goes through hf/auto.py: the same optical modules and trained ranges as the
    checkpoint, and the grid runs on it."""
    from torchtitan_ext.hf.export import export
    from torchtitan_ext.titan.hf_adapter import titan_to_hf_module

    folder = export(CONFIG, checkpoint, tmp_path / "export", log=lambda *_: None)
    titan = ev.load_model_for_eval(config=CONFIG, checkpoint=str(checkpoint), seq_len=16)
    hf = ev.load_model_for_eval(hf_folder=str(folder), seq_len=16)
    assert hf.naming == "hf" and hf.transform is not None and hf.dims == titan.dims
    hf_mods = ev._optical_modules(hf.model)
    for name, mod in ev._optical_modules(titan.model).items():
        twin = hf_mods[titan_to_hf_module(name)]
        assert twin.config == mod.config and torch.equal(twin.optical_ranges, mod.optical_ranges)
    results = ev.run(["--hf-folder", str(folder), "--levels", "256", "--seeds", "0", "--digital",
                      "--seq-len", "16", "--sequences", "2", "--batch-size", "2", "--device",
                      "cpu", "--no-progress", "--out", str(tmp_path / "eval")])
    assert [r["label"] for r in results] == ["q_levels=256", "digital"]
    assert all(math.isfinite(r["loss_mean"]) for r in results)


@pytest.mark.parametrize("argv, message", [
    (["--readout", "bogus"], "q_readout: must be one of ['rounding', 'shot']"),
    (["--readout", "shot"], "q_photons_per_mac: required with q_readout 'shot'"),
    (["--photons", "1,10"], "q_photons_per_mac"),  # refused with the rounding read-out
    (["--q-noise", "maybe"], "q_noise: must be true or false"),
    (["--levels", "1"], "q_levels: must be an integer with 2 <= q_levels"),
    (["--set", "q_levels_p=1"], "q_levels_p"),
    (["--set", "q_levels_pp=256"], "--set q_levels_pp: the transform config of this tree has no key"),
    (["--set", "oops"], "--set: expected KEY=V1,V2"),
    ([], "give either --hf-folder, or both --config and --checkpoint"),
])
def test_errors_name_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(argv + ["--out", "/nonexistent/never"])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_reports_plot_loss_vs_levels_and_photons(tmp_path):
    pytest.importorskip("matplotlib")
    results = [
        {"label": f"L={lv}, n={n}", "settings": {"q_levels": lv, "q_photons_per_mac": n},
         "digital": False, "loss_mean": 3.0 + 1 / lv + 1 / n, "loss_std": 0.01, "perplexity": 20.0,
         "energy_pj_per_token": None, "energy_known_pj_per_token": 5.0,
         "digital_baseline_pj_per_token": 9.0}
        for lv in (16, 256) for n in (1, 10)
    ] + [{"label": "digital", "settings": {}, "digital": True, "loss_mean": 3.0, "loss_std": 0.0,
          "perplexity": 20.0, "energy_pj_per_token": 9.0, "energy_known_pj_per_token": 9.0,
          "digital_baseline_pj_per_token": 9.0}]
    meta = {"source": "x", "tokens": 1, "sequences": 1, "seq_len": 1, "seeds": [0], "profile": "p"}
    files = ev.write_reports(results, meta, tmp_path)
    assert {f.name for f in files} == {"eval.json", "eval.md", "loss_vs_levels.png",
                                       "loss_vs_photons.png"}
    assert "| >= 5 |" in (tmp_path / "eval.md").read_text()


def test_grid_validates_whole_points_and_level_keys_reach_their_kind_only():
    """shot + photons are valid together (each alone is not); q_levels_p reaches attention only,
    and a level key that no module of its kind takes is refused instead of ignored."""
    from torchtitan_ext.optical.modules import OpticalAttention, OpticalLinear

    points = ev.build_grid({"readout": "shot", "photons": "1,10"})
    assert [p.as_dict() for p in points] == [
        {"q_readout": "shot", "q_photons_per_mac": 1},
        {"q_readout": "shot", "q_photons_per_mac": 10}]
    model = torch.nn.ModuleDict({"lin": OpticalLinear(8, 8), "att": OpticalAttention()})
    trained = {n: m.config for n, m in model.items()}
    ev.apply_point(model, ev.build_grid({"q_levels_p": "64"})[0], trained)
    assert model["att"].config.q_levels_p == 64
    assert model["lin"].config == trained["lin"]
    linear_only = torch.nn.ModuleDict({"lin": OpticalLinear(8, 8)})
    with pytest.raises(ev.EvalError, match="no optical attention module"):
        ev.apply_point(linear_only, ev.build_grid({"q_levels_p": "64"})[0],
                       {"lin": linear_only["lin"].config})


def test_validation_windows_are_spread_over_the_split():
    """The default windows sample the whole split evenly (its first documents are atypical), and
    the training context is the default window length."""
    from torchtitan_ext.data import DEFAULT_TOKENIZER_PATH

    every = ev.validation_tokens(DEFAULT_TOKENIZER_PATH, 64, 10**9)
    n = every.shape[0]
    assert n > 100  # the whole split, not the first n windows
    few = ev.validation_tokens(DEFAULT_TOKENIZER_PATH, 64, 4)
    assert torch.equal(few, every[[0, n // 4, n // 2, 3 * n // 4]])


def test_default_window_is_the_training_context(checkpoint):
    from torchtitan_ext.hf.checkpoint import load_job_config

    loaded = ev.load_model_for_eval(config=CONFIG, checkpoint=str(checkpoint))
    assert loaded.dims.seq_len == load_job_config(CONFIG).training.seq_len


def test_export_folder_default_window_is_the_recorded_training_context(checkpoint, tmp_path):
    """The export records training.seq_len in config.json; --hf-folder without --seq-len takes
    it (not max_position_embeddings, the RoPE's reach); a folder without it is refused, naming
    --seq-len."""
    import shutil

    from torchtitan_ext.hf.checkpoint import load_job_config
    from torchtitan_ext.hf.export import export

    trained = load_job_config(CONFIG).training.seq_len
    folder = export(CONFIG, checkpoint, tmp_path / "export", log=lambda *_: None)
    config = json.loads((folder / "config.json").read_text())
    assert config["training_seq_len"] == trained < config["max_position_embeddings"]
    assert ev.load_model_for_eval(hf_folder=str(folder)).dims.seq_len == trained
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    del config["training_seq_len"]
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(ev.EvalError, match="--seq-len: .* records no training context"):
        ev.load_model_for_eval(hf_folder=str(old))
    (old / "config.json").write_text(json.dumps({**config, "training_seq_len": "256"}))
    with pytest.raises(ev.EvalError, match="training_seq_len must be an integer >= 1, got '256'"):
        ev.load_model_for_eval(hf_folder=str(old))
    (old / "config.json").write_text(json.dumps(config))
    assert ev.load_model_for_eval(hf_folder=str(old), seq_len=16).dims.seq_len == 16


def test_documents_are_joined_with_the_training_tokenizers_bos_and_eos(tmp_path):
    """BOS/EOS come from the tokenizer as training reads it, not only from
    special_tokens_map.json: a folder without that file joins documents the same way."""
    import shutil

    from torchtitan_ext.data import DEFAULT_TOKENIZER_PATH
    from torchtitan_ext.hf.hf_config import tokenizer_ids

    bare = tmp_path / "tok"
    bare.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(DEFAULT_TOKENIZER_PATH) / name, bare / name)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("first doc", "second one")))
    full = ev.validation_tokens(DEFAULT_TOKENIZER_PATH, 3, 1, str(data))
    assert torch.equal(ev.validation_tokens(str(bare), 3, 1, str(data)), full)
    assert int(full[0, 0]) == tokenizer_ids(DEFAULT_TOKENIZER_PATH)["bos_token_id"]
