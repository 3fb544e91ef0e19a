"""Hugging Face export, import and continual pretraining, end to end on the CPU.

One module-scoped fixture trains the debug model for 4 steps through `torchrun run.py` (with a
full checkpoint at step 4) and exports it with `python -m torchtitan_ext.hf.export`; the tests
then load the folder in transformers, compare logits with torchtitan's model built from the same
checkpoint (digital and optical), round-trip it through torchtitan's own HF import, continue
pretraining with `run_clm`, and check the error messages. No network: HF_HUB_OFFLINE=1.
"""

import contextlib
import gzip
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from torchtitan_ext.hf import export as hf_export  # noqa: E402
from torchtitan_ext.hf import hf_config, names as hf_names  # noqa: E402
from torchtitan_ext.hf.checkpoint import load_titan_checkpoint  # noqa: E402
from torchtitan_ext.titan.hf_adapter import (  # noqa: E402
    RANGES_FILE,
    TRANSFORM_FILE,
    titan_to_hf_module,
    titan_to_hf_range_key,
)
from torchtitan_ext.optical.config import TransformConfig, load_transform_config  # noqa: E402
from torchtitan_ext.optical.modules import OpticalAttention, OpticalLinear  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "train_configs" / "debug_model.toml")
SEQ = 32  # short sequences keep the reference simulation fast on two CPU cores


@pytest.fixture(scope="module", autouse=True)
def _in_repo_root():
    """The TOMLs name their transform file and tokenizer relative to the repository root."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        yield


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
           "--master_port", str(29700 + (os.getpid() % 500)), "run.py", "--job.config_file", CONFIG,
           "--training.seq_len", str(SEQ), "--training.local_batch_size", "2", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Train 4 steps with a full checkpoint at step 4, then export it through the CLI."""
    tmp = tmp_path_factory.mktemp("hf")
    # seeded: the logit comparisons below hold for a given model, so every run tests the same one
    _torchrun("--training.steps", "4", "--checkpoint.enable", "--checkpoint.interval", "4",
              "--checkpoint.no-last-save-model-only", "--job.dump_folder", str(tmp / "run"),
              "--debug.seed", os.environ.get("HF_TEST_SEED", "0"))
    ckpt = tmp / "run" / "checkpoint" / "step-4"
    out = tmp / "export"
    r = subprocess.run(
        [sys.executable, "-m", "torchtitan_ext.hf.export", "--config", CONFIG, "--checkpoint",
         str(ckpt), "--out", str(out)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    ck = load_titan_checkpoint(CONFIG, ckpt)
    return SimpleNamespace(tmp=tmp, ckpt=ckpt, out=out, ck=ck)


def _titan_model(ck, optical: bool):
    from torchtitan_ext.titan.model import build_titan_model

    model = build_titan_model(ck.job_config, device="cpu", optical=optical).model
    sd = {k: v for k, v in ck.state_dict.items() if optical or not k.endswith(".optical_ranges")}
    model.load_state_dict(sd, strict=True)
    return model.eval()


def _hf_model(folder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _tokens(batch=2, seq=SEQ, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 8192, (batch, seq), generator=g)


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------------------


def test_export_writes_a_complete_folder(exported):
    out, ck = exported.out, exported.ck
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", TRANSFORM_FILE, RANGES_FILE, "README.md"):
        assert (out / name).is_file(), name
    assert not (out / "model.safetensors.index.json").exists()  # 31 MB: one file
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".export.")]  # no temp left
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"]) == (256, 4, 4, 2, 8192)
    # FeedForward: int(2 * 4 * 256 / 3) = 682, * 1.3 -> 886, up to a multiple of 128 -> 896
    assert cfg["intermediate_size"] == hf_config.ffn_hidden_dim(256, 128, 1.3) == 896
    assert cfg["intermediate_size"] == ck.state_dict["layers.0.feed_forward.w1.weight"].shape[0]
    assert cfg["tie_word_embeddings"] is False
    assert cfg["rms_norm_eps"] == 1e-5
    rope = cfg["rope_parameters"]
    assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 10000.0
    assert (rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
            rope["original_max_position_embeddings"]) == (8.0, 1.0, 4.0, 8192)
    # transformers 4.x reads these two
    assert cfg["rope_theta"] == 10000.0 and cfg["rope_scaling"]["rope_type"] == "llama3"
    loaded = transformers.AutoConfig.from_pretrained(out)
    assert loaded.rope_parameters == rope
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (0, 1, 2)
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (0, 1)
    card = (out / "README.md").read_text()
    energy = card.split("## Energy per token (estimate)")[1]  # optical export: the energy table
    assert "| **total** |" in energy and "Not estimated" not in energy

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.bos_token_id == 0 and tok.eos_token_id == 1
    assert len(tok("def f(x):\n    return x")["input_ids"]) > 3

    # Ranges: every torchtitan range buffer, under its HF module name, unchanged.
    ranges = safetensors_torch.load_file(str(out / RANGES_FILE))
    want = {titan_to_hf_range_key(k): v for k, v in ck.state_dict.items()
            if k.endswith(".optical_ranges")}
    assert set(ranges) == set(want) and len(ranges) == 32
    assert "model.layers.0.self_attn.q_proj.optical_ranges" in ranges
    assert ranges["model.layers.0.self_attn.optical_attention.optical_ranges"].shape == (5, 2)
    for k, v in want.items():
        assert torch.equal(ranges[k], v), k
    assert torch.isfinite(ranges["model.layers.0.mlp.down_proj.optical_ranges"]).all()

    # The rewritten transform file selects exactly the HF twins of the torchtitan modules.
    hf_cfg = load_transform_config(out / TRANSFORM_FILE)
    assert [p for p, _ in hf_cfg.rules][-1] == "lm_head"
    for name in ck.candidates:
        _, q_tt = ck.transform.match(name)
        _, q_hf = hf_cfg.match(titan_to_hf_module(name))
        assert q_tt == q_hf, name
    assert "optical_llama3 / debugmodel (step 4)" in (out / "README.md").read_text()


def test_transformers_logits_equal_torchtitan_digital(exported):
    tokens = _tokens()
    titan = _titan_model(exported.ck, optical=False)
    hf = _hf_model(exported.out)
    with torch.no_grad():
        a = titan(tokens)
        b = hf(tokens).logits
    assert a.shape == b.shape == (2, SEQ, 8192)
    rel = _rel(a, b)
    print(f"digital logits: max |titan - hf| / max |hf| = {rel:.3g}")
    assert rel < 1e-4


def _call_order(model):
    """Names of the optical modules in the order the forward calls them."""
    order = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n))
             for n, m in model.named_modules() if isinstance(m, (OpticalLinear, OpticalAttention))]
    return order, hooks


@contextlib.contextmanager
def _one_thread():
    """One intra-op thread: a multi-threaded CPU GEMM may split its sums differently from call
    to call on a loaded machine (seen once in CI: logits one quantizer level apart, 8e-4), which
    is not what the comparisons here are about."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_optical_logits_equal_torchtitan_optical(exported):
    from torchtitan_ext.hf.transform import transform_hf_model

    tokens = _tokens(seed=1)
    titan = _titan_model(exported.ck, optical=True)
    hf = _hf_model(exported.out)
    report = transform_hf_model(hf, exported.out / TRANSFORM_FILE, ranges=exported.out / RANGES_FILE)
    assert report.count == 32 and len(report.ranges_loaded) == 32
    assert not report.ranges_missing and not report.ranges_unused
    assert report.digital == ["lm_head"]
    assert hf.config._attn_implementation == "optical"

    order_tt, h1 = _call_order(titan)
    order_hf, h2 = _call_order(hf)
    with torch.no_grad(), _one_thread():
        torch.manual_seed(1234)
        a = titan(tokens)
        torch.manual_seed(1234)
        b = hf(tokens).logits
        for h in h1 + h2:
            h.remove()
        torch.manual_seed(4321)
        c = hf(tokens).logits
        digital = _titan_model(exported.ck, optical=False)(tokens)
    # Both frameworks call the optical modules in the same order, so they draw the same seeds.
    assert [titan_to_hf_module(n) for n in order_tt] == order_hf
    assert len(order_hf) == 32
    rel = _rel(a, b)
    print(f"optical logits: max |titan - hf| / max |hf| = {rel:.3g} "
          f"(exactly equal: {torch.equal(a, b)}); other seed: {_rel(c, b):.3g}; "
          f"vs digital: {_rel(digital, b):.3g}")
    assert rel < 1e-4
    # The folder by name (auto_map, trust_remote_code) is the same optical model, bit for bit.
    by_name = transformers.AutoModelForCausalLM.from_pretrained(exported.out, trust_remote_code=True,
                                                               dtype=torch.float32).eval()
    with torch.no_grad(), _one_thread():
        torch.manual_seed(1234)
        assert torch.equal(by_name(tokens).logits, b)
    assert _rel(c, b) > 1e-4  # the noise is live: another seed gives other logits
    assert _rel(digital, b) > 1e-4  # and the model is optical


def test_sharded_export_loads(exported):
    out = exported.tmp / "sharded"
    hf_export.export(CONFIG, exported.ckpt, out, max_shard_size="8MB", dtype="bfloat16",
                     log=lambda *_: None)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((out / s).is_file() for s in shards)
    assert all((out / s).stat().st_size <= 8_000_000 for s in shards)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    single = safetensors_torch.load_file(str(exported.out / "model.safetensors"))
    for k, v in hf.state_dict().items():
        assert torch.equal(v, single[k].to(torch.bfloat16).float()), k


def test_transform_config_rewrite_is_exact():
    from torchtitan_ext.optical.transform import candidate_modules
    from torchtitan.models.llama3 import Transformer

    from torchtitan_ext.titan.spec import optical_llama3_args

    with torch.device("meta"):
        model = Transformer(optical_llama3_args["debugmodel"])
    names = list(candidate_modules(model))
    cases = {
        "linear only": {"default": None,
                        r"layers\.[0-9]+\.attention\.(wq|wk|wv|wo)|layers\.[0-9]+\.feed_forward\.(w1|w2|w3)": {"q_levels": 16},
                        "output": None},
        "char class": {r"layers\.[0-9]+\.feed_forward\.w[13]": {}, r"layers\.1\.attention": {"q_levels": 64},
                       r".*output": {"q_levels": 32}},
        "layer zero": {r"layers\.0\..*": {}, "default": {"q_levels": 8}},
    }
    for label, layers in cases.items():
        tcfg = TransformConfig.from_dict({"use_regex": True, "layer_name_to_config": layers})
        data, notes, _ = hf_names.translate_transform_config(tcfg, names)
        hf_cfg = TransformConfig.from_dict(data)
        for n in names:
            assert tcfg.match(n)[1] == hf_cfg.match(titan_to_hf_module(n))[1], (label, n)
        assert bool(notes) == (label == "char class"), (label, notes)
    exact = TransformConfig.from_dict({"use_regex": False, "layer_name_to_config": {
        "layers.2.attention.wk": {}, "layers.3.attention": {}, "output": {"q_levels": 4}}})
    data, _, _ = hf_names.translate_transform_config(exact, names)
    assert list(data["layer_name_to_config"])[1:] == [
        "model.layers.2.self_attn.k_proj", "model.layers.3.self_attn", "lm_head"]


def test_hf_attention_falls_back_to_sdpa_and_ranges_update(exported):
    from torchtitan_ext.hf.callbacks import attach_range_updates
    from torchtitan_ext.hf.transform import format_hf_histogram, transform_hf_model

    hf = _hf_model(exported.out)
    cfg = {"use_regex": True, "layer_name_to_config": {
        r"model\.layers\.0\.self_attn": {}, r"model\.layers\.0\.mlp\.down_proj": {}}}
    report = transform_hf_model(hf, cfg)
    assert report.names() == ["model.layers.0.self_attn", "model.layers.0.mlp.down_proj"]
    assert "2 modules made optical" in format_hf_histogram(report)
    calls = []
    hf.model.layers[0].self_attn.optical_attention.register_forward_hook(lambda *a: calls.append(1))
    hf.train()
    opt = torch.optim.SGD(hf.parameters(), lr=0.0)
    handle = attach_range_updates(opt, hf)
    tokens = _tokens(batch=1, seq=16)
    hf(tokens, labels=tokens).loss.backward()
    opt.step()
    handle.remove()
    assert calls == [1]  # layer 0 optical, layers 1-3 through SDPA
    r = hf.model.layers[0].self_attn.optical_attention.optical_ranges
    assert torch.isfinite(r[[0, 1, 2, 3, 4]]).all()  # calibrated by the first step
    with pytest.raises(Exception, match="matches no module"):
        transform_hf_model(_hf_model(exported.out), {"layer_name_to_config": {r"layers\.0\.attention": {}}})


@pytest.mark.slow
def test_hf_folder_round_trips_through_torchtitan(exported):
    """torchtitan's own HF import (initial_load_in_hf) loads weights and ranges; one step with
    lr 0 and a re-export give the same weights."""
    from torchtitan_ext.optical.reference import ema_update

    out = exported.out
    dump = exported.tmp / "continue"
    r = _torchrun("--training.steps", "1", "--optimizer.lr", "0", "--checkpoint.enable",
                  "--checkpoint.interval", "1", "--checkpoint.no-last-save-model-only",
                  "--checkpoint.initial_load_path", str(out), "--checkpoint.initial_load_in_hf",
                  "--model.hf_assets_path", str(out), "--job.dump_folder", str(dump))
    assert "optical ranges: 32 range buffers" in r.stdout + r.stderr
    again = exported.tmp / "export-again"
    hf_export.export(CONFIG, dump / "checkpoint" / "step-1", again, log=lambda *_: None)
    w0 = safetensors_torch.load_file(str(out / "model.safetensors"))
    w1 = safetensors_torch.load_file(str(again / "model.safetensors"))
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    # The weight ranges moved by one EMA step from the exported ones (not from scratch, which
    # would give the weights' min/max itself): the ranges were loaded.
    r0 = safetensors_torch.load_file(str(out / RANGES_FILE))
    r1 = safetensors_torch.load_file(str(again / RANGES_FILE))
    checked = 0
    for key, old in r0.items():
        weight_key = key.replace(".optical_ranges", ".weight")
        if weight_key in w0:
            w = w0[weight_key].float()
            want = ema_update(old[1:2], torch.stack([w.min(), w.max()])[None], 0.9)
            torch.testing.assert_close(r1[key][1:2], want, rtol=1e-6, atol=0)
            assert not torch.equal(r1[key][1], torch.stack([w.min(), w.max()]))
            checked += 1
    assert checked == 28


def _corpus_docs(n: int, chars: int) -> list[str]:
    path = ROOT / "torchtitan_ext" / "data" / "assets" / "corpus" / "validation.jsonl.gz"
    docs = []
    with gzip.open(path, "rt") as f:
        for line in f:
            text = json.loads(line)["text"]
            if len(text) >= chars:
                docs.append(text[:chars])
            if len(docs) == n:
                return docs
    return docs


@contextlib.contextmanager
def _bare_root_logger():
    """The root logger without handlers inside the block (what a CLI's basicConfig adds there
    is dropped on exit), its own handlers back afterwards."""
    root = logging.getLogger()
    saved, root.handlers = root.handlers, []
    try:
        yield
    finally:
        root.handlers = saved


@pytest.mark.slow
def test_run_clm_continues_pretraining_and_loss_falls(exported, capsys):
    from torchtitan_ext.hf import run_clm

    data = exported.tmp / "clm_data"
    data.mkdir()
    with open(data / "train.jsonl", "w") as f:
        for doc in _corpus_docs(2, 400):
            f.write(json.dumps({"text": doc}) + "\n")
    out = exported.tmp / "clm_out"
    # Outside pytest's output capture: under it (sys- or fd-level alike) these 5 Trainer steps
    # take about two minutes on two CPU cores instead of ~5 s. Nothing here reads the output.
    # Root logging is set aside meanwhile: torchtitan's init_logger, run by earlier in-process
    # tests, bound a root handler to a capture stream that is closed by now.
    with capsys.disabled(), _bare_root_logger():
        result = run_clm.main([
            "--model_name_or_path", str(exported.out), "--train_file", str(data / "train.jsonl"),
            "--output_dir", str(out), "--max_steps", "5", "--block_size", "32",
            # every block in one fixed batch, a large constant learning rate: a reliable fall
            "--per_device_train_batch_size", "64", "--learning_rate", "3e-3",
            "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--logging_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--seed", "0",
            "--dataloader_pin_memory", "false", "--disable_tqdm", "true",
        ])
    losses = [e["loss"] for e in result["log_history"] if "loss" in e]
    print(f"run_clm losses: {losses}")
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.5, losses
    history = json.loads((out / "log_history.json").read_text())
    assert [e["loss"] for e in history if "loss" in e] == losses
    # An export-style folder again, with the ranges moved by the callback.
    for name in ("config.json", "model.safetensors", "tokenizer.json", TRANSFORM_FILE, RANGES_FILE):
        assert (out / name).is_file(), name
    before = safetensors_torch.load_file(str(exported.out / RANGES_FILE))
    after = safetensors_torch.load_file(str(out / RANGES_FILE))
    assert before.keys() == after.keys()
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.optical_ranges"],
                           after["model.layers.0.self_attn.q_proj.optical_ranges"])
    weights = safetensors_torch.load_file(str(out / "model.safetensors"))
    assert not any(k.endswith("optical_ranges") for k in weights)
    saved = json.loads((out / "config.json").read_text())
    assert saved.get("_attn_implementation") in (None, "sdpa") and saved["use_cache"] is True
    assert saved["rope_scaling"]["rope_type"] == "llama3"
    _hf_model(out)  # plain transformers loads it


# ------------------------------------------------------------------------------------------------
# The exporter's and the HF writer's bad inputs are rows of tests/test_bad_inputs.py (EXPORT_CASES).


def test_export_with_an_allowed_transform_change_says_so_in_the_card(exported, tmp_path):
    from torchtitan_ext.titan.checkpoint_integrity import read_recorded_transform

    assert read_recorded_transform(exported.ckpt)["transform"]  # the run recorded its transform
    other = str(ROOT / "train_configs" / "transforms" / "optical_16levels.yaml")
    hf_export.main(["--config", CONFIG, "--checkpoint", str(exported.ckpt), "--out",
                    str(tmp_path / "y"), "--optical.transform_config", other,
                    "--optical.allow_transform_change"])
    card = (tmp_path / "y" / "README.md").read_text()
    assert "Transform changed at export" in card and "checkpoint 256, exported 16" in card
    assert "q_levels: 16" in (tmp_path / "y" / TRANSFORM_FILE).read_text()


def test_model_card_energy_section_never_fails_an_export(monkeypatch):
    import torchtitan_ext.optical.energy as energy
    from torchtitan_ext.hf.model_card import _energy

    def boom(*a, **k):
        raise KeyError("adc_pj_per_sample")

    monkeypatch.setattr(energy, "energy_markdown", boom)
    ck = SimpleNamespace(optical=True, args=None, transform=None,
                         job_config=SimpleNamespace(training=SimpleNamespace(seq_len=8)))
    lines = _energy(ck)
    assert "## Energy per token (estimate)" in lines
    assert lines[-1] == "Not estimated: KeyError: 'adc_pj_per_sample'"
    assert _energy(SimpleNamespace(optical=False)) == []  # digital exports: no table
