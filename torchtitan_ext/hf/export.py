"""Export a torchtitan checkpoint of an (optical) Llama to a complete Hugging Face folder.

    python -m torchtitan_ext.hf.export --config train_configs/debug_model.toml \\
        --checkpoint outputs/debug_model/checkpoint/step-20 --out exports/debug_model \\
        [--overwrite] [--dtype float32|bfloat16] [--max-shard-size 2GB] [--model.flavor X ...]

Options this tool does not know (`--model.flavor 60M`, `--optical.transform_config f.yaml`, ...)
go to torchtitan's config parser, as for `run.py`. The folder holds:

- `config.json` (LlamaConfig of the flavor, plus `training_seq_len`: the run's training.seq_len;
  for optical runs with an `auto_map`, see `torchtitan_ext.hf.auto`), `generation_config.json`;
- `model.safetensors` or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`
  (torchtitan's `Llama3StateDictAdapter.to_hf`, shards of at most --max-shard-size);
- the tokenizer files of `model.hf_assets_path`;
- for optical runs: `optical_transform.yaml` (the run's transform file rewritten for transformers'
  module names and checked to select exactly the corresponding modules),
  `optical_ranges.safetensors` (the calibrated range buffers under transformers' module names),
  and `configuration_optical_llama.py` / `modeling_optical_llama.py` (imports of this package);
- `README.md`, a short model card.

Reading: `torchtitan_ext.hf.checkpoint`; names: `torchtitan_ext.hf.names`; config:
`torchtitan_ext.hf.hf_config`; writing (temporary sibling, rename, overwrite rules):
`torchtitan_ext.hf.writer`. `--out` is checked before the checkpoint is read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from torchtitan_ext.titan.hf_adapter import RANGE_SUFFIX, titan_to_hf_range_key

from .checkpoint import TitanCheckpoint, check_checkpoint_path, load_titan_checkpoint
from .errors import ExportError
from .hf_config import config_json, hf_config_of, tokenizer_ids
from .model_card import model_card
from .names import hf_report_of, translate_transform_config
from .writer import HFFolderContent, check_out, parse_size, write_hf_folder

__all__ = ["ExportError", "export", "main"]

DEFAULT_MAX_SHARD_SIZE = "2GB"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _hf_weights(ck: TitanCheckpoint, dtype: torch.dtype, hf_config) -> dict[str, torch.Tensor]:
    from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter

    weights = {k: v for k, v in ck.state_dict.items() if not k.endswith(RANGE_SUFFIX)}
    hf_sd = Llama3StateDictAdapter(ck.args, None).to_hf(weights)
    hf_sd = {k: v.to(dtype).contiguous() for k, v in hf_sd.items()}
    if hf_sd["model.layers.0.mlp.gate_proj.weight"].shape[0] != hf_config.intermediate_size:
        raise ExportError("internal: intermediate_size differs from the checkpoint's w1; please report")
    return hf_sd


def _optical_parts(ck: TitanCheckpoint, log) -> tuple[dict, str | None, list[str]]:
    """Content fields of the optical files, the histogram and notes (empty for digital runs)."""
    import yaml

    from torchtitan_ext.optical.transform import format_histogram

    from .auto import stub_files

    if not ck.optical:
        if ck.ignored_ranges:
            log(f"warning: the checkpoint has {len(ck.ignored_ranges)} optical range buffers but "
                "the config is digital; exported the weights only")
        return {}, None, []
    data, notes, pattern_map = translate_transform_config(ck.transform, ck.candidates)
    header = (f"# Written by torchtitan_ext.hf.export from {ck.transform.source}: the same "
              "settings for transformers' module names.\n")
    ranges = {titan_to_hf_range_key(k): v for k, v in ck.state_dict.items() if k.endswith(RANGE_SUFFIX)}
    if ck.ignored_ranges:
        log(f"warning: {len(ck.ignored_ranges)} range buffers of the checkpoint belong to modules "
            f"this transform config keeps digital; not exported: {ck.ignored_ranges[:3]}")
    parts = {"transform_text": header + yaml.safe_dump(data, sort_keys=False), "ranges": ranges,
             "ranges_metadata": {"source": str(ck.path)}, "extra_files": stub_files()}
    return parts, format_histogram(hf_report_of(ck.report, pattern_map)), notes


def export(config, checkpoint, out, *, overwrite: bool = False, dtype: str = "float32",
           max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, overrides: Sequence[str] = (),
           log=print) -> Path:
    """Write the HF folder `out` (see the module docstring); return its path."""
    from transformers import GenerationConfig

    if dtype not in _DTYPES:
        raise ExportError(f"--dtype: must be one of {list(_DTYPES)}, got {dtype!r}")
    max_shard_bytes = parse_size(max_shard_size)
    out = Path(out)
    check_checkpoint_path(Path(checkpoint))
    ckpt = Path(checkpoint).resolve()
    if ckpt == out.resolve() or out.resolve() in ckpt.parents:
        raise ExportError(f"--out: {str(out)!r} holds the checkpoint; choose another folder")
    check_out(out, overwrite=overwrite, replace="export")  # before the expensive read

    ck = load_titan_checkpoint(config, checkpoint, overrides)
    job = ck.job_config
    hf_config = hf_config_of(ck.args, ck.declared_args, tokenizer_ids(job.model.hf_assets_path),
                             _DTYPES[dtype], training_seq_len=job.training.seq_len)
    parts, histogram, notes = _optical_parts(ck, log)
    gen = GenerationConfig(bos_token_id=hf_config.bos_token_id, eos_token_id=hf_config.eos_token_id,
                           pad_token_id=hf_config.pad_token_id).to_diff_dict()
    gen.pop("transformers_version", None)
    content = HFFolderContent(
        weights=_hf_weights(ck, _DTYPES[dtype], hf_config),
        config=config_json(hf_config, optical=ck.optical), generation_config=gen,
        tokenizer_dir=job.model.hf_assets_path, require_tokenizer=True,
        card=lambda files: model_card(ck, hf_config, files, histogram, notes, dtype,
                                      ck.transform_change),
        max_shard_bytes=max_shard_bytes, **parts,
    )
    write_hf_folder(out, content, overwrite=overwrite, replace="export")
    for n in notes:
        log(f"note: {n}")
    if histogram:
        log(histogram)
    log(f"exported {ck.path} ({job.model.name}/{job.model.flavor}"
        + (", optical" if ck.optical else ", digital") + f") to {out}")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m torchtitan_ext.hf.export",
        description="Export a torchtitan (optical) Llama checkpoint to a Hugging Face folder. "
        "Unknown options (e.g. --model.flavor) go to torchtitan's config parser.",
    )
    parser.add_argument("--config", required=True, help="the run's torchtitan TOML")
    parser.add_argument("--checkpoint", required=True, help="outputs/<dump>/checkpoint/step-N")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the files of an existing export folder (others stay)")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    parser.add_argument("--max-shard-size", "--max_shard_size", default=DEFAULT_MAX_SHARD_SIZE,
                        help="largest weight file before sharding (default 2GB)")
    args, overrides = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    from torchtitan_ext.optical.config import OpticalConfigError

    try:
        export(args.config, args.checkpoint, args.out, overwrite=args.overwrite, dtype=args.dtype,
               max_shard_size=args.max_shard_size, overrides=overrides)
    except (ExportError, OpticalConfigError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
