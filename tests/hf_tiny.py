"""A tiny optical Llama folder built locally (no torchrun, no hub), for the HF tests."""

from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "torchtitan_ext" / "data" / "assets" / "tokenizer"
TRANSFORM = {"use_regex": True, "layer_name_to_config": {
    "default": {}, "lm_head": None}}


def tiny_config(**kw):
    from transformers import LlamaConfig

    args = dict(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                tie_word_embeddings=False, dtype=torch.float32)
    args.update(kw)
    return LlamaConfig(**args)


def calibrate(model, seq: int = 24, seed: int = 0) -> None:
    """One training-mode forward, then the range update: the optical ranges get first values."""
    from torchtitan_ext.optical.ranges import update_ranges

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 8192, (2, seq), generator=g)
    model.train()
    with torch.no_grad():
        model(tokens)
    update_ranges(model, reduce=False)
    model.eval()


def tiny_optical_folder(out: Path, transform=None, seed: int = 0) -> Path:
    """Random tiny Llama, made optical with `transform`, calibrated, saved by the one writer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from torchtitan_ext.hf.save import save_optical_hf
    from torchtitan_ext.hf.transform import transform_hf_model

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config()).eval()
    transform_hf_model(model, transform or TRANSFORM)
    calibrate(model)
    save_optical_hf(model, out, tokenizer=AutoTokenizer.from_pretrained(TOKENIZER),
                    tokenizer_dir=TOKENIZER)
    return out
