"""transformers' config of the run's Llama, and what `config.json` of an export holds.

`config.json` keeps `"model_type": "llama"` on purpose: transformers resolves an unknown
`model_type` only through remote code, so a project model_type would make every load without
`trust_remote_code=True` fail (`ValueError: ... does not recognize this architecture`, in 5.17 and
5.24 alike, `AutoConfig.from_pretrained`). An optical folder adds `auto_map` (AutoConfig,
AutoModelForCausalLM -> the two small `.py` files of the folder, which import this
package): with `trust_remote_code=True` transformers takes those classes (the local Llama is not
"explicit local code", so remote code wins), without it the digital `LlamaForCausalLM`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["ffn_hidden_dim", "tokenizer_ids", "hf_config_of", "AUTO_MAP", "config_json",
           "TRAINING_SEQ_LEN", "training_seq_len_of"]

AUTO_MAP = {
    "AutoConfig": "configuration_optical_llama.OpticalLlamaConfig",
    "AutoModelForCausalLM": "modeling_optical_llama.OpticalLlamaForCausalLM",
}
# config.json key: the sequence length the folder's weights were trained at (torchtitan's
# training.seq_len, or run_clm's block size). Readers (evaluate's default window, run_clm's
# default block size) take it instead of max_position_embeddings, which is the RoPE's reach.
TRAINING_SEQ_LEN = "training_seq_len"
# Runtime state of a loaded model that must not reach config.json.
_RUNTIME_KEYS = ("_attn_implementation", "_attn_implementation_internal", "optical_transform",
                 "_name_or_path", "transformers_version")


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """torchtitan's FeedForward hidden size for hidden_dim = 4 * dim (models/llama3/model.py)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def tokenizer_ids(hf_assets_path: str) -> dict[str, int | None]:
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    tok = HuggingFaceTokenizer(hf_assets_path)
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": None}
    cfg_file = Path(hf_assets_path) / "tokenizer_config.json"
    if cfg_file.is_file():
        pad = json.loads(cfg_file.read_text()).get("pad_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
        if isinstance(pad, str):
            ids["pad_token_id"] = tok.tokenizer.token_to_id(pad)
    return ids


def hf_config_of(args, declared_args, token_ids: dict[str, int | None], dtype: torch.dtype,
                 training_seq_len: int | None = None):
    """A transformers LlamaConfig equal to torchtitan's Llama of `args`, recording the run's
    `training_seq_len` (key TRAINING_SEQ_LEN) when given.

    RoPE: torchtitan always applies Llama 3.1 frequency scaling (`rope_scaling_args`), hence
    rope_type "llama3" with the same factors. max_position_embeddings is the flavor's declared
    `max_seq_len` (the positions its RoPE is defined for, 131072 as Llama 3.1), not the run's
    training.seq_len, which only sizes torchtitan's precomputed table.
    """
    from transformers import LlamaConfig

    rs = args.rope_scaling_args
    n_kv = args.n_kv_heads if args.n_kv_heads is not None else args.n_heads
    return LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim,
        intermediate_size=ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier),
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=n_kv, head_dim=args.dim // args.n_heads, hidden_act="silu",
        max_position_embeddings=max(int(declared_args.max_seq_len), int(args.max_seq_len)),
        rms_norm_eps=args.norm_eps,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": float(args.rope_theta),
            "factor": float(rs.scaling_factor), "low_freq_factor": float(rs.low_freq_factor),
            "high_freq_factor": float(rs.high_freq_factor),
            "original_max_position_embeddings": int(rs.original_max_position_embeddings),
        },
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, dtype=dtype,
        architectures=["LlamaForCausalLM"], **token_ids,
        **({} if training_seq_len is None else {TRAINING_SEQ_LEN: int(training_seq_len)}),
    )


def training_seq_len_of(config) -> int | None:
    """The training sequence length a folder's config (a config object, or config.json's dict)
    records (None: not recorded, e.g. a folder exported before the key existed, or not by this
    project). A recorded value that is not a positive integer raises ValueError naming the key."""
    value = config.get(TRAINING_SEQ_LEN) if isinstance(config, dict) \
        else getattr(config, TRAINING_SEQ_LEN, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.json: {TRAINING_SEQ_LEN} must be an integer >= 1, got {value!r}")
    return value


def _add_legacy_rope_keys(data: dict[str, Any]) -> None:
    """Also write RoPE the way transformers 4.x reads it (`rope_theta`, `rope_scaling`): without
    them a 4.x reader would silently use unscaled RoPE. transformers 5 folds them into the same
    `rope_parameters`."""
    rope = dict(data.get("rope_parameters") or {})
    if "rope_theta" not in rope:
        return
    data["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        data["rope_scaling"] = rope


def config_json(config, *, optical: bool) -> dict[str, Any]:
    """The `config.json` of a folder for `config` (a LlamaConfig or OpticalLlamaConfig): a plain
    Llama that loads without this package, plus `auto_map` when the folder is optical."""
    data = config.to_diff_dict()
    for key in _RUNTIME_KEYS:
        data.pop(key, None)
    data["model_type"] = "llama"
    data["use_cache"] = True
    data["architectures"] = ["LlamaForCausalLM"]  # what plain loaders (vLLM, ...) should build
    data.pop("auto_map", None)
    if optical:
        data["auto_map"] = dict(AUTO_MAP)
    _add_legacy_rope_keys(data)
    import transformers

    data["transformers_version"] = transformers.__version__
    return data
