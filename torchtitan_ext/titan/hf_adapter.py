"""Hugging Face -> torchtitan: module names and the state-dict adapter that carries optical ranges.

torchtitan imports an HF folder itself (`--checkpoint.initial_load_path DIR
--checkpoint.initial_load_in_hf --model.hf_assets_path DIR`): its checkpointer asks the TrainSpec's
state-dict adapter for the HF names of the model's state_dict (`to_hf`), reads them from every
`*.safetensors` file in DIR with DCP's `HuggingFaceStorageReader`, and maps them back (`from_hf`).

torchtitan's `Llama3StateDictAdapter` knows weights only: an optical model's state_dict also holds
`<module>.optical_ranges` buffers, for which it raises `KeyError` (so stock torchtitan can neither
load an HF folder into an optical model nor save one with `checkpoint.last_save_in_hf`).
`OpticalLlama3StateDictAdapter` maps those buffers to the HF names of `optical_ranges.safetensors`
(written by `torchtitan_ext.hf.export` beside the weights, so the same reader finds them), and asks
for a range only when that file in `model.hf_assets_path` has it; every other range stays
uninitialised (the converter's reset), i.e. the first step calibrates it. For digital models it is
exactly torchtitan's adapter.

Saving an optical model with `checkpoint.last_save_in_hf` is refused at start-up
(`check_last_save_in_hf`, called by run.py's preflight): torchtitan's HF save writes bare
safetensors weights, without the trained ranges, the transform file, config.json or the
tokenizer, i.e. a folder that loads as another model. The HF folder of a run is written by
`python -m torchtitan_ext.hf.export` from a DCP checkpoint.

It lives in `titan/` because `torchtitan_ext.titan.spec` registers it (titan never imports `hf/`);
`hf/` imports the names from here. No transformers import here.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter

__all__ = [
    "RANGES_FILE",
    "TRANSFORM_FILE",
    "TOKENIZER_FILES",
    "RANGE_SUFFIX",
    "HF_OPTICAL_ATTENTION",
    "titan_to_hf_module",
    "hf_to_titan_module",
    "titan_to_hf_range_key",
    "hf_to_titan_range_key",
    "OpticalLlama3StateDictAdapter",
    "LAST_SAVE_IN_HF_ERROR",
    "check_last_save_in_hf",
]

logger = logging.getLogger(__name__)

RANGES_FILE = "optical_ranges.safetensors"
TRANSFORM_FILE = "optical_transform.yaml"
# What an HF folder's tokenizer may consist of (copied verbatim between folders).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
RANGE_SUFFIX = ".optical_ranges"
# The attribute of a transformed HF LlamaAttention that holds its OpticalAttention (the HF
# counterpart of torchtitan's `attention.inner_attention`).
HF_OPTICAL_ATTENTION = "optical_attention"

# Inside a transformer block: torchtitan name -> transformers name.
_BLOCK_TO_HF = {
    "attention": "self_attn",
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention.inner_attention": f"self_attn.{HF_OPTICAL_ATTENTION}",
    "feed_forward": "mlp",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_TO_HF = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_BLOCK_FROM_HF = {v: k for k, v in _BLOCK_TO_HF.items()}
_TOP_FROM_HF = {v: k for k, v in _TOP_TO_HF.items()}


def _map_module(name: str, src_layers: str, dst_layers: str, block: dict[str, str],
                top: dict[str, str]) -> str | None:
    """Rename one module between the two frameworks' Llama layouts (None if unknown)."""
    m = re.fullmatch(re.escape(src_layers) + r"\.(\d+)(?:\.(.+))?", name)
    if m:
        if m.group(2) is None:
            return f"{dst_layers}.{m.group(1)}"
        if m.group(2) in block:
            return f"{dst_layers}.{m.group(1)}.{block[m.group(2)]}"
        return None
    return top.get(name)


def titan_to_hf_module(name: str) -> str:
    """`layers.3.attention.wq` -> `model.layers.3.self_attn.q_proj` (ValueError if unknown)."""
    out = _map_module(name, "layers", "model.layers", _BLOCK_TO_HF, _TOP_TO_HF)
    if out is None:
        raise ValueError(f"no Hugging Face counterpart known for torchtitan Llama module {name!r}")
    return out


def hf_to_titan_module(name: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `layers.3.attention.wq` (ValueError if unknown)."""
    out = _map_module(name, "model.layers", "layers", _BLOCK_FROM_HF, _TOP_FROM_HF)
    if out is None:
        raise ValueError(f"no torchtitan counterpart known for Hugging Face Llama module {name!r}")
    return out


def _split_range_key(key: str) -> str:
    if not key.endswith(RANGE_SUFFIX):
        raise ValueError(f"{key!r} is not a range buffer key (must end with {RANGE_SUFFIX!r})")
    return key[: -len(RANGE_SUFFIX)]


def titan_to_hf_range_key(key: str) -> str:
    """`layers.0.attention.inner_attention.optical_ranges` ->
    `model.layers.0.self_attn.optical_attention.optical_ranges`."""
    return titan_to_hf_module(_split_range_key(key)) + RANGE_SUFFIX


def hf_to_titan_range_key(key: str) -> str:
    module = _split_range_key(key)
    if module.endswith(".self_attn"):  # the attention block's own name is accepted too
        module += f".{HF_OPTICAL_ATTENTION}"
    return hf_to_titan_module(module) + RANGE_SUFFIX


def _range_keys_in(folder: str | None) -> frozenset[str]:
    if not folder:
        return frozenset()
    path = os.path.join(folder, RANGES_FILE)
    if not os.path.isfile(path):
        return frozenset()
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return frozenset(f.keys())


LAST_SAVE_IN_HF_ERROR = (
    "checkpoint.last_save_in_hf: not supported for optical runs (allowed: false). torchtitan's "
    "HF save writes the weights only, without the trained optical ranges, the transform file, "
    "config.json or the tokenizer: a folder that would load as another model. Keep "
    "checkpoint.last_save_in_hf = false (the last step is saved as a DCP checkpoint) and export "
    "it: python -m torchtitan_ext.hf.export --config <the run's toml> --checkpoint "
    "<dump_folder>/checkpoint/step-N --out <folder>")


def check_last_save_in_hf(job_config) -> None:
    """Raise OpticalConfigError if an optical run asks for `checkpoint.last_save_in_hf` (to call
    at start-up, before training: the adapter itself can only refuse at the last save)."""
    from torchtitan_ext.optical.config import OpticalConfigError
    from torchtitan_ext.titan.converter import CONVERTER_NAME

    if CONVERTER_NAME in job_config.model.converters and job_config.checkpoint.last_save_in_hf:
        raise OpticalConfigError(LAST_SAVE_IN_HF_ERROR)


class OpticalLlama3StateDictAdapter(Llama3StateDictAdapter):
    """torchtitan's Llama 3 adapter plus the optical range buffers (see the module docstring)."""

    def __init__(self, model_args, hf_assets_path: str | None):
        super().__init__(model_args, hf_assets_path)
        self.hf_range_keys = _range_keys_in(hf_assets_path)
        if self.hf_range_keys:
            logger.info(
                f"optical ranges: {len(self.hf_range_keys)} range buffers in "
                f"{os.path.join(hf_assets_path, RANGES_FILE)} (loaded with checkpoint.initial_load_in_hf)"
            )

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        weights = {k: v for k, v in state_dict.items() if not k.endswith(RANGE_SUFFIX)}
        hf_state_dict = super().to_hf(weights)
        for key, value in state_dict.items():
            if key.endswith(RANGE_SUFFIX):
                hf_key = titan_to_hf_range_key(key)
                # Ask only for what the folder has: DCP fails on a key it cannot find, and a range
                # the folder lacks simply stays uninitialised (the first step calibrates it).
                if hf_key in self.hf_range_keys:
                    hf_state_dict[hf_key] = value
        return hf_state_dict

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        weights = {k: v for k, v in hf_state_dict.items() if not k.endswith(RANGE_SUFFIX)}
        state_dict = super().from_hf(weights)
        for key, value in hf_state_dict.items():
            if key.endswith(RANGE_SUFFIX):
                state_dict[hf_to_titan_range_key(key)] = value
        return state_dict
