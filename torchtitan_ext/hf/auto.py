"""The optical model as transformers auto classes (what an export's `auto_map` points at).

An optical export folder holds two tiny files, `configuration_optical_llama.py` and
`modeling_optical_llama.py`, that only import the classes below from the installed package (no
copy of the kernels). `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` thus
builds `OpticalLlamaForCausalLM`: transformers' Llama with the folder's weights, then
`transform_hf_model` with the folder's `optical_transform.yaml` and `optical_ranges.safetensors`.

- `optical_transform=PATH` (a from_pretrained keyword) takes another transform file; the folder's
  ranges are still loaded for the modules it makes optical (others calibrate).
- `optical_transform=None` gives the digital model (`model.optical_report` is None).
- `optical_ranges=PATH` takes another ranges file, `optical_ranges=None` none (every optical
  module calibrates on its first training step); default: the folder's.
- `save_pretrained` writes through the one folder writer (`torchtitan_ext.hf.writer`), with the
  transform and ranges the model has now, so the new folder loads the same way.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

from torchtitan_ext.titan.hf_adapter import RANGES_FILE, TRANSFORM_FILE

__all__ = ["OpticalLlamaConfig", "OpticalLlamaForCausalLM", "FROM_FOLDER", "folder_file",
           "stub_files"]

logger = logging.getLogger(__name__)

FROM_FOLDER = "folder"  # optical_transform's default: the folder's own transform file
_SAVE_NOOPS = {"safe_serialization": True, "save_peft_format": True, "save_original_format": True,
               "token": None, "variant": None, "push_to_hub": False, "distributed_checkpoint": False}


class OpticalLlamaConfig(LlamaConfig):
    """A LlamaConfig; `model_type` stays "llama" (see `torchtitan_ext.hf.hf_config`)."""


class OpticalLlamaForCausalLM(LlamaForCausalLM):
    """transformers' LlamaForCausalLM made optical at load time (module docstring)."""

    config_class = OpticalLlamaConfig
    _keys_to_ignore_on_load_unexpected = [r"^optical_export\."]  # the writer's TRUST_MARKER
    optical_report = None  # HFTransformReport of the transform applied at load (None: digital)
    # A tokenizer folder `save_pretrained` copies into every folder it writes (run_clm sets it,
    # so the Trainer's checkpoint-N folders are complete); None: weights and config only, as
    # transformers' own save_pretrained.
    optical_tokenizer_dir = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, optical_transform=FROM_FOLDER,
                        optical_ranges=FROM_FOLDER, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        folder = str(pretrained_model_name_or_path)
        transform = folder_file(folder, TRANSFORM_FILE) if _is_folder(optical_transform) \
            else optical_transform
        if transform is None:
            logger.warning(f"{folder}: optical_transform=None (or no {TRANSFORM_FILE}): the "
                           "digital Llama")
            return model
        from .transform import format_hf_histogram, transform_hf_model

        ranges = folder_file(folder, RANGES_FILE) if _is_folder(optical_ranges) else optical_ranges
        model.optical_report = transform_hf_model(model, transform, ranges=ranges)
        logger.info(f"{folder}: optical model\n{format_hf_histogram(model.optical_report)}")
        return model

    def save_pretrained(self, save_directory, is_main_process: bool = True, state_dict=None,
                        max_shard_size="2GB", **kwargs):
        """Write an export-style folder through the one writer (loads the same way)."""
        for key, value in kwargs.items():
            if key not in _SAVE_NOOPS or value != _SAVE_NOOPS[key]:
                raise TypeError(f"save_pretrained: {key}={value!r} is not supported by the optical "
                                f"model's writer; supported: {sorted(_SAVE_NOOPS)} at their defaults")
        if not is_main_process:
            return
        from .save import save_optical_hf

        save_optical_hf(self, save_directory, state_dict=state_dict, max_shard_size=max_shard_size,
                        tokenizer_dir=self.optical_tokenizer_dir)


def _is_folder(value) -> bool:
    return isinstance(value, str) and value == FROM_FOLDER


def folder_file(folder: str, name: str) -> str | None:
    """The path of file `name` of a model folder (local, or a hub cache), None if it has none."""
    path = Path(folder) / name
    if path.is_file():
        return str(path)
    if os.path.isdir(folder):
        return None
    from transformers.utils import cached_file

    return cached_file(folder, name, _raise_exceptions_for_missing_entries=False)


def stub_files() -> dict[str, str]:
    """The two `.py` files an optical folder holds (auto_map targets): imports only."""
    head = "# Written by torchtitan-optical: the classes live in the installed package\n" \
           "# (pip install torchtitan-optical[hf]); nothing else is defined here.\n"
    return {
        "configuration_optical_llama.py":
            head + "from torchtitan_ext.hf.auto import OpticalLlamaConfig  # noqa: F401\n",
        "modeling_optical_llama.py":
            head + "from torchtitan_ext.hf.auto import OpticalLlamaForCausalLM  # noqa: F401\n",
    }
