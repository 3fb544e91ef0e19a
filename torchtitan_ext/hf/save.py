"""Save a (transformed) transformers model as an export-style folder, through the one writer.

Used by run_clm (`save_optical_hf`) and by `OpticalLlamaForCausalLM.save_pretrained`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from torchtitan_ext.titan.hf_adapter import RANGE_SUFFIX

from .hf_config import config_json
from .writer import HFFolderContent, parse_size, write_hf_folder

__all__ = ["save_optical_hf", "transform_text"]


def transform_text(transform) -> str | None:
    """The text of `optical_transform.yaml` for a path, a TransformConfig or a dict (None: none)."""
    import yaml

    if transform is None:
        return None
    if isinstance(transform, (str, os.PathLike)):
        return Path(transform).read_text()
    data = transform.to_dict() if hasattr(transform, "to_dict") else dict(transform)
    return yaml.safe_dump(data, sort_keys=False)


def save_optical_hf(model: nn.Module, out_dir: str | os.PathLike, *, transform_config: Any = "model",
                    tokenizer: Any = None, tokenizer_dir: str | os.PathLike | None = None,
                    state_dict: dict | None = None, max_shard_size: str | int = "2GB") -> Path:
    """Save `model` into `out_dir`: plain HF weights and config, and for an optical model
    `optical_ranges.safetensors`, `optical_transform.yaml` and the auto_map code; the tokenizer
    (files copied from `tokenizer_dir`, else `tokenizer.save_pretrained`). transform_config
    "model" (default) takes the transform the model was made optical with; None saves digitally.
    Any folder may be written into; only the writer's own files are replaced or removed
    (`torchtitan_ext.hf.writer`)."""
    from .auto import stub_files
    from .transform import optical_state_dict, transform_config_of_model

    if transform_config == "model":
        transform_config = transform_config_of_model(model)
    optical = transform_config is not None
    state = model.state_dict() if state_dict is None else state_dict
    content = HFFolderContent(
        weights={k: v.detach().clone() for k, v in state.items() if not k.endswith(RANGE_SUFFIX)},
        config=config_json(model.config, optical=optical),
        generation_config=_generation_config(model),
        tokenizer_dir=tokenizer_dir, tokenizer=tokenizer,
        transform_text=transform_text(transform_config),
        ranges=optical_state_dict(model) if optical else None,
        extra_files=stub_files() if optical else {},
        max_shard_bytes=parse_size(max_shard_size),
    )
    write_hf_folder(out_dir, content, overwrite=True, replace="always")
    return Path(out_dir)


def _generation_config(model) -> dict | None:
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return None
    data = gen.to_diff_dict()
    data.pop("transformers_version", None)
    data["use_cache"] = True
    return data

