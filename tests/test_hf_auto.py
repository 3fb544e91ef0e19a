"""The export folder as a transformers model by name (auto classes, trust_remote_code), and the
one writer of HF folders. CPU, a tiny model built locally, offline."""

import json
import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from hf_tiny import TOKENIZER, tiny_optical_folder  # noqa: E402

from torchtitan_ext.hf.writer import (  # noqa: E402
    TRUST_MARKER,
    HFFolderContent,
    write_hf_folder,
)
from torchtitan_ext.titan.hf_adapter import RANGES_FILE, TRANSFORM_FILE  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_optical_folder(tmp_path_factory.mktemp("auto") / "tiny")


def _tokens(batch=2, seq=20, seed=3):
    return torch.randint(3, 8192, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, tokens, seed=1234):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(tokens).logits


def _auto(folder, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kw).eval()


def _by_hand(folder):
    from transformers import LlamaForCausalLM

    from torchtitan_ext.hf.transform import transform_hf_model

    model = LlamaForCausalLM.from_pretrained(folder).eval()
    transform_hf_model(model, folder / TRANSFORM_FILE, ranges=folder / RANGES_FILE)
    return model


def test_folder_has_auto_map_and_stub_code_only(folder):
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama"  # loads without trust_remote_code (see hf_config.py)
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_optical_llama.OpticalLlamaForCausalLM"
    for name in ("modeling_optical_llama.py", "configuration_optical_llama.py"):
        code = [ln for ln in (folder / name).read_text().splitlines() if not ln.startswith("#")]
        assert code and all(ln.startswith("from torchtitan_ext.hf.auto import") for ln in code)


def test_from_pretrained_trust_remote_code_is_the_optical_model(folder):
    from torchtitan_ext.hf.auto import OpticalLlamaForCausalLM

    model = _auto(folder)
    assert isinstance(model, OpticalLlamaForCausalLM)
    assert model.optical_report.count == 16 and len(model.optical_report.ranges_loaded) == 16
    tokens = _tokens()
    a, b = _logits(model, tokens), _logits(_by_hand(folder), tokens)
    assert torch.equal(a, b)  # bitwise, same seed
    assert not torch.equal(a, _logits(model, tokens, seed=99))  # the noise is live
    digital = _auto(folder, optical_transform=None)
    assert digital.optical_report is None
    assert not torch.equal(_logits(digital, tokens), a)


@pytest.mark.gpu
def test_gpu_from_pretrained_bitwise_equals_transform_by_hand(folder):
    """On the GPU (Triton kernels) the auto-class load and the hand transform draw the same noise."""
    tokens = _tokens().cuda()
    model = _auto(folder).cuda()
    a, b = _logits(model, tokens), _logits(_by_hand(folder).cuda(), tokens)
    assert torch.equal(a, b)
    assert not torch.equal(a, _logits(model, tokens, seed=99))


def test_without_trust_remote_code_digital_llama_and_one_log_line(folder, caplog):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    transformers.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            model = AutoModelForCausalLM.from_pretrained(folder)
    finally:
        transformers.logging.disable_propagation()
    assert type(model) is LlamaForCausalLM
    assert not any(hasattr(m, "optical_ranges") for m in model.modules())
    lines = [r for r in caplog.records if TRUST_MARKER in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]


def test_other_transform_at_load_time(folder, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text("use_regex: true\nlayer_name_to_config:\n"
                     "  'model\\.layers\\.0\\.mlp\\.down_proj': {q_levels: 16}\n")
    model = _auto(folder, optical_transform=str(other))
    assert model.optical_report.names() == ["model.layers.0.mlp.down_proj"]
    assert model.model.layers[0].mlp.down_proj.config.q_levels == 16
    assert model.optical_report.ranges_loaded == ["model.layers.0.mlp.down_proj"]


def test_save_pretrained_round_trip(folder, tmp_path):
    """(A digital save into an optical folder: a row of tests/test_bad_inputs.py.)"""
    model = _auto(folder)
    out = tmp_path / "again"
    model.save_pretrained(out)
    tokens = _tokens(seed=5)
    assert torch.equal(_logits(_auto(out), tokens), _logits(model, tokens))
    with pytest.raises(TypeError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)


def _content(optical: bool, shard_bytes=10**9) -> HFFolderContent:
    weights = {f"w{i}": torch.full((64, 64), float(i)) for i in range(4)}
    return HFFolderContent(weights=weights, config={"model_type": "llama"},
                           tokenizer_dir=TOKENIZER, transform_text="x: 1\n" if optical else None,
                           ranges={"a.optical_ranges": torch.zeros(3, 2)} if optical else None,
                           max_shard_bytes=shard_bytes)


def test_writer_shards(tmp_path):
    """(Overwrite rules, stale temporaries and --out checks: rows of tests/test_bad_inputs.py.)"""
    out = tmp_path / "f"
    write_hf_folder(out, _content(True, shard_bytes=20000))
    assert len(list(out.glob("model-*-of-*.safetensors"))) == 4
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]


def test_rope_ordered_q_proj_runs_optical_linear_forward(folder):
    """The q/k wrapper goes through OpticalLinear.forward: warm-up switch and clamp statistics."""
    from torchtitan_ext.hf.transform import RopeOrderedOpticalLinear

    q = _auto(folder).model.layers[0].self_attn.q_proj
    assert isinstance(q, RopeOrderedOpticalLinear)
    x = torch.randn(2, 5, 64)
    q.optical_enabled = False  # the digital warm-up: plain F.linear
    assert torch.equal(q(x), torch.nn.functional.linear(x, q.weight))
    q.optical_enabled = True
    assert not torch.equal(q(x), torch.nn.functional.linear(x, q.weight))
    q.train()
    q.collect_clamp_stats = True
    with torch.no_grad():
        q(x)
    assert set(q.take_clamp_stats()) == set(q.CLAMP_NAMES)


def _run_clm_model(folder, **kw):
    from torchtitan_ext.hf import run_clm

    return run_clm._load_model(run_clm.ModelArguments(model_name_or_path=str(folder), **kw))


def test_run_clm_trainer_checkpoints_are_written_by_the_one_writer(folder, tmp_path):
    """run_clm loads through the optical auto class, so a Trainer checkpoint (`Trainer._save`:
    save_pretrained(dir, state_dict=..., is_main_process=...) into the folder it made) is an
    optical folder with the model's ranges, and loads as the same optical model."""
    from safetensors.torch import load_file

    from torchtitan_ext.hf.transform import optical_state_dict

    model, _, transform = _run_clm_model(folder)
    assert transform == str(folder / TRANSFORM_FILE)
    with torch.no_grad():
        for m in model.modules():  # ranges moved by training: the checkpoint must keep them
            if hasattr(m, "optical_ranges"):
                m.optical_ranges.mul_(1.5)
    out = tmp_path / "checkpoint-1"
    out.mkdir()
    model.save_pretrained(out, state_dict=model.state_dict(), is_main_process=True)
    for name in (TRANSFORM_FILE, RANGES_FILE, "modeling_optical_llama.py", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert "auto_map" in json.loads((out / "config.json").read_text())
    saved = load_file(str(out / RANGES_FILE))
    assert saved.keys() == optical_state_dict(model).keys()
    assert all(torch.equal(saved[k], v) for k, v in optical_state_dict(model).items())
    tokens = _tokens(seed=7)
    assert torch.equal(_logits(_auto(out), tokens), _logits(model.eval(), tokens))


def test_run_clm_ranges_and_transform_none(folder):
    """--ranges none: optical, the folder's ranges not loaded (the first step calibrates);
    --transform_config none: digital."""
    from safetensors.torch import load_file

    from torchtitan_ext.hf.transform import optical_state_dict

    model, _, _ = _run_clm_model(folder, ranges="none")
    assert model.optical_report.count == 16 and model.optical_report.ranges_loaded == []
    folder_ranges = load_file(str(folder / RANGES_FILE))
    assert not any(torch.equal(folder_ranges[k], v) for k, v in optical_state_dict(model).items())
    digital, _, transform = _run_clm_model(folder, transform_config="none")
    assert transform is None and digital.optical_report is None


def test_run_clm_default_block_size_is_the_recorded_training_context():
    from transformers import LlamaConfig

    from torchtitan_ext.hf.run_clm import DataArguments, block_size_of

    recorded = LlamaConfig(max_position_embeddings=131072, training_seq_len=256)
    assert block_size_of(DataArguments(), recorded) == 256
    assert block_size_of(DataArguments(block_size=64), recorded) == 64
    assert block_size_of(DataArguments(), LlamaConfig(max_position_embeddings=131072)) == 1024
    assert block_size_of(DataArguments(), LlamaConfig(max_position_embeddings=512)) == 512
    with pytest.raises(ValueError, match="--block_size: must be an integer >= 1"):
        block_size_of(DataArguments(block_size=0), recorded)


@pytest.mark.parametrize("resume", ["folder", "newest"])
def test_trainer_resume_restores_the_checkpoints_ranges(folder, tmp_path, resume):
    """A Trainer resume loads the weights file only; the callback loads the checkpoint's own
    ranges file (`resume_from_checkpoint` a folder, or True: the newest in output_dir)."""
    from types import SimpleNamespace

    from safetensors.torch import load_file

    from torchtitan_ext.hf.callbacks import OpticalRangesCallback
    from torchtitan_ext.hf.transform import optical_state_dict

    model = _auto(folder)
    with torch.no_grad():
        for m in model.modules():  # the checkpoint's ranges: moved by training
            if hasattr(m, "optical_ranges"):
                m.optical_ranges.mul_(1.5)
    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    model.save_pretrained(ckpt, state_dict=model.state_dict(), is_main_process=True)
    started = _auto(folder).train()  # the run restarts from the folder it started from
    args = SimpleNamespace(world_size=1, process_index=0, output_dir=str(tmp_path),
                           resume_from_checkpoint=str(ckpt) if resume == "folder" else True)
    OpticalRangesCallback().on_train_begin(args, None, None, model=started)
    saved = load_file(str(ckpt / RANGES_FILE))
    got = optical_state_dict(started)
    assert got.keys() == saved.keys()
    assert all(torch.equal(saved[k], v) for k, v in got.items())
    args.resume_from_checkpoint = None  # no resume: the ranges stay
    fresh = _auto(folder).train()
    OpticalRangesCallback().on_train_begin(args, None, None, model=fresh)
    assert not any(torch.equal(saved[k], v) for k, v in optical_state_dict(fresh).items())
