"""Export a torchtitan checkpoint of an (optical) Llama to a complete Hugging Face folder.

    python -m torchtitan_ext.hf.export --config train_configs/debug_model.toml \\
        --checkpoint outputs/debug_model/checkpoint/step-20 --out exports/debug_model \\
        [--overwrite] [--dtype float32|bfloat16] [--max-shard-size 2GB] [--model.flavor X ...]

Options this tool does not know (`--model.flavor 60M`, `--optical.transform_config f.yaml`, ...)
go to torchtitan's config parser, as for `run.py`. The folder holds:

- `config.json` (LlamaConfig of the flavor), `generation_config.json`;
- `model.safetensors` or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`
  (torchtitan's `Llama3StateDictAdapter.to_hf`, shards of at most --max-shard-size);
- the tokenizer files of `model.hf_assets_path`;
- for optical runs: `optical_transform.yaml` (the run's transform file rewritten for transformers'
  module names and checked to select exactly the corresponding modules) and
  `optical_ranges.safetensors` (the calibrated range buffers under transformers' module names,
  e.g. `model.layers.0.self_attn.q_proj.optical_ranges`,
  `model.layers.0.self_attn.optical_attention.optical_ranges`);
- `README.md`, a short model card.

The DCP checkpoint is read on the CPU without a process group: DCP stores global tensors, so a
checkpoint saved under any FSDP/TP layout exports the same way. The folder is built in a
temporary directory beside `--out` and renamed into place.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .import_hf import (
    RANGE_SUFFIX,
    RANGES_FILE,
    TOKENIZER_FILES,
    TRANSFORM_FILE,
    titan_to_hf_module,
    titan_to_hf_range_key,
)

__all__ = [
    "ExportError",
    "TitanCheckpoint",
    "load_job_config",
    "load_titan_checkpoint",
    "build_titan_model",
    "ffn_hidden_dim",
    "hf_config_of",
    "translate_transform_config",
    "export",
    "main",
]

DEFAULT_MAX_SHARD_SIZE = "2GB"
# Top-level entries of a torchtitan DCP checkpoint that are not model state.
_NON_MODEL_PREFIXES = ("optimizer.", "lr_scheduler.", "dataloader.", "train_state.", "ft_")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ExportError(RuntimeError):
    """A user error (bad path, wrong flavor, existing output, ...): the message says what to fix."""


# ------------------------------------------------------------------------------------------------
# Config and model of the run


def load_job_config(config_path: str | os.PathLike, overrides: Sequence[str] = ()):
    """torchtitan's JobConfig of a TOML, with the [optical] section merged (as run.py does)."""
    from torchtitan_ext.titan.launch import with_custom_config

    import torchtitan_ext.titan  # noqa: F401  (registers the spec, converter, datasets)
    from torchtitan.config import ConfigManager

    if not Path(config_path).is_file():
        raise ExportError(f"--config: file {str(config_path)!r} does not exist")
    argv = with_custom_config(["--job.config_file", str(config_path), *overrides])
    return ConfigManager().parse_args(argv)


def _spec_and_args(job_config):
    from torchtitan.protocols.train_spec import get_train_spec

    try:
        spec = get_train_spec(job_config.model.name)
    except ValueError as e:
        raise ExportError(f"model.name: {e}") from e
    flavor = job_config.model.flavor
    if flavor not in spec.model_args:
        raise ExportError(
            f"model.flavor: {flavor!r} is not a flavor of {job_config.model.name!r}; "
            f"allowed: {sorted(spec.model_args)}"
        )
    declared = spec.model_args[flavor]
    args = copy.deepcopy(declared)
    args.update_from_config(job_config)
    return spec, declared, args


def _is_optical(job_config) -> bool:
    from torchtitan_ext.titan.converter import CONVERTER_NAME

    return CONVERTER_NAME in job_config.model.converters


def build_titan_model(job_config, device: str | torch.device = "meta", optical: bool | None = None):
    """The run's torchtitan model (transformed when the run is optical), its args, the transform
    config (or None), the transform report (or None) and the candidate names before the swap."""
    from torchtitan_ext.optical.transform import candidate_modules, transform_model
    from torchtitan_ext.titan.converter import transform_config_of

    spec, _, args = _spec_and_args(job_config)
    with torch.device(device):
        model = spec.model_cls(args)
    candidates = list(candidate_modules(model).keys())
    optical = _is_optical(job_config) if optical is None else optical
    tcfg = report = None
    if optical:
        tcfg = transform_config_of(job_config)
        report = transform_model(model, tcfg)
    return model, args, tcfg, report, candidates


# ------------------------------------------------------------------------------------------------
# Reading the checkpoint


@dataclass
class TitanCheckpoint:
    """What an export needs: the run's config and model args, and the model state of a checkpoint."""

    job_config: Any
    args: Any
    declared_args: Any
    path: Path
    state_dict: dict[str, torch.Tensor]
    optical: bool
    transform: Any = None  # TransformConfig of the run (None when digital)
    report: Any = None  # TransformReport on the torchtitan model
    candidates: list[str] = field(default_factory=list)
    ignored_ranges: list[str] = field(default_factory=list)

    @property
    def step(self) -> int | None:
        m = re.fullmatch(r"step-(\d+)", self.path.name)
        return int(m.group(1)) if m else None


def _check_checkpoint_path(path: Path) -> None:
    if not path.exists():
        raise ExportError(f"--checkpoint: {str(path)!r} does not exist")
    if not path.is_dir() or not (path / ".metadata").is_file():
        hint = ""
        steps = sorted(
            (p for p in path.glob("step-*") if (p / ".metadata").is_file()),
            key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else -1,
        ) if path.is_dir() else []
        if steps:
            hint = f"; did you mean {str(steps[-1])!r}?"
        raise ExportError(
            f"--checkpoint: {str(path)!r} is not a torchtitan DCP checkpoint (no .metadata file); "
            f"expected a folder like outputs/<dump>/checkpoint/step-N{hint}"
        )


def _shape(t) -> list[int]:
    return [int(s) for s in t]


def load_titan_checkpoint(
    config_path: str | os.PathLike | None,
    checkpoint: str | os.PathLike,
    overrides: Sequence[str] = (),
    job_config=None,
) -> TitanCheckpoint:
    """Read the model state of a DCP checkpoint on the CPU (no process group), after checking that
    it holds exactly the tensors of the configured flavor (and ranges of the transform)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(checkpoint)
    _check_checkpoint_path(path)
    if job_config is None:
        job_config = load_job_config(config_path, overrides)
    _, declared, args = _spec_and_args(job_config)
    model, args, tcfg, report, candidates = build_titan_model(job_config)
    expected = {k: v for k, v in model.state_dict().items()}
    flavor, name = job_config.model.flavor, job_config.model.name

    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    stored = {
        k: v for k, v in metadata.items()
        if not k.startswith(_NON_MODEL_PREFIXES) and isinstance(v, TensorStorageMetadata)
    }

    def mismatch(detail: str) -> ExportError:
        return ExportError(
            f"checkpoint {str(path)!r} does not match model.flavor {flavor!r} of {name!r}: {detail}. "
            "Export with the config (or --model.flavor) the checkpoint was trained with."
        )

    stored_ranges = [k for k in stored if k.endswith(RANGE_SUFFIX)]
    for key, tensor in expected.items():
        if key not in stored:
            if key.endswith(RANGE_SUFFIX):
                if not stored_ranges:
                    raise ExportError(
                        f"checkpoint {str(path)!r} has no optical range buffers (e.g. {key!r}): it "
                        "was trained digitally. Export it with a digital config (model.converters "
                        "without 'optical_transformer', e.g. train_configs/debug_model_digital.toml)"
                    )
                raise ExportError(
                    f"checkpoint {str(path)!r} has no {key!r}: the transform config "
                    f"({tcfg.source}) makes a module optical that was digital in training; export "
                    "with the transform file the checkpoint was trained with (--optical.transform_config)"
                )
            raise mismatch(f"{key} (shape {_shape(tensor.shape)}) is missing from the checkpoint")
        if _shape(stored[key].size) != _shape(tensor.shape):
            raise mismatch(
                f"{key} has shape {_shape(stored[key].size)} in the checkpoint, the flavor expects "
                f"{_shape(tensor.shape)}"
            )
    extra = [k for k in stored if k not in expected]
    extra_weights = [k for k in extra if not k.endswith(RANGE_SUFFIX)]
    if extra_weights:
        raise mismatch(
            f"the checkpoint has {extra_weights[0]} (shape {_shape(stored[extra_weights[0]].size)}), "
            f"which the flavor does not ({len(extra_weights)} such tensors)"
        )
    ignored_ranges = [k for k in extra if k.endswith(RANGE_SUFFIX)]

    state_dict = {k: torch.empty(_shape(stored[k].size), dtype=stored[k].properties.dtype) for k in expected}
    with warnings.catch_warnings():
        # "torch.distributed is ... uninitialized, assuming ... a single process": what we want.
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state_dict, storage_reader=FileSystemReader(str(path)))
    return TitanCheckpoint(
        job_config=job_config, args=args, declared_args=declared, path=path, state_dict=state_dict,
        optical=tcfg is not None, transform=tcfg, report=report, candidates=candidates,
        ignored_ranges=ignored_ranges,
    )


# ------------------------------------------------------------------------------------------------
# HF config, names, transform file


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """torchtitan's FeedForward hidden size for hidden_dim = 4 * dim (models/llama3/model.py)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _tokenizer_ids(hf_assets_path: str) -> dict[str, int | None]:
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


def hf_config_of(args, declared_args, token_ids: dict[str, int | None], dtype: torch.dtype):
    """A transformers LlamaConfig equal to torchtitan's Llama of `args`.

    RoPE: torchtitan always applies Llama 3.1 frequency scaling (`rope_scaling_args`), hence
    rope_type "llama3" with the same factors. max_position_embeddings is the flavor's declared
    `max_seq_len` (the positions its RoPE is defined for, 131072 as Llama 3.1), not the run's
    training.seq_len, which only sizes torchtitan's precomputed table.
    """
    from transformers import LlamaConfig

    rs = args.rope_scaling_args
    n_kv = args.n_kv_heads if args.n_kv_heads is not None else args.n_heads
    return LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier),
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=n_kv,
        head_dim=args.dim // args.n_heads,
        hidden_act="silu",
        max_position_embeddings=max(int(declared_args.max_seq_len), int(args.max_seq_len)),
        rms_norm_eps=args.norm_eps,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": float(args.rope_theta),
            "factor": float(rs.scaling_factor),
            "low_freq_factor": float(rs.low_freq_factor),
            "high_freq_factor": float(rs.high_freq_factor),
            "original_max_position_embeddings": int(rs.original_max_position_embeddings),
        },
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        dtype=dtype,
        architectures=["LlamaForCausalLM"],
        **token_ids,
    )


def _add_legacy_rope_keys(config_json: Path) -> None:
    """Also write RoPE the way transformers 4.x reads it (`rope_theta`, `rope_scaling`): without
    them a 4.x reader would silently use unscaled RoPE. transformers 5 folds them into the same
    `rope_parameters`."""
    data = json.loads(config_json.read_text())
    rope = dict(data.get("rope_parameters") or {})
    if "rope_theta" not in rope:
        return
    data["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        data["rope_scaling"] = rope
    config_json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# Words of torchtitan module names and their transformers counterparts, for rewriting patterns.
_PATTERN_WORDS = {
    "layers": r"model\.layers",
    "attention": "self_attn",
    "feed_forward": "mlp",
    "wq": "q_proj",
    "wk": "k_proj",
    "wv": "v_proj",
    "wo": "o_proj",
    "w1": "gate_proj",
    "w3": "up_proj",
    "w2": "down_proj",
    "output": "lm_head",
    "tok_embeddings": r"model\.embed_tokens",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_WORD_RE = re.compile(
    r"(?<![A-Za-z0-9_])(" + "|".join(sorted(_PATTERN_WORDS, key=len, reverse=True)) + r")(?![A-Za-z0-9_])"
)


def _rewrite_pattern(pattern: str) -> str:
    return _WORD_RE.sub(lambda m: _PATTERN_WORDS[m.group(1)], pattern)


def translate_transform_config(
    tcfg, titan_candidates: Sequence[str]
) -> tuple[dict, list[str], dict[str, str]]:
    """The transform config for transformers' module names (a dict), notes, and the map
    torchtitan pattern -> transformers pattern.

    Each regex is rewritten word by word (layers -> model\\.layers, attention -> self_attn,
    wq -> q_proj, feed_forward.w1 -> mlp.gate_proj, output -> lm_head, ...), then checked: on the
    candidates of the model, the rewritten pattern must select exactly the HF counterparts of the
    modules the original selected. A pattern the word rewrite cannot carry (e.g. `w[13]`) is
    replaced by the explicit alternation of those HF names, which is exact by construction.
    """
    from torchtitan_ext.optical.config import TransformConfig

    hf_of = {n: titan_to_hf_module(n) for n in titan_candidates}
    hf_names = list(hf_of.values())
    layers: dict[str, Any] = {"default": tcfg.default.to_dict() if tcfg.default else None}
    notes: list[str] = []
    pattern_map: dict[str, str] = {"default": "default"}
    for i, (pattern, qcfg) in enumerate(tcfg.rules):
        if tcfg.use_regex:
            compiled = tcfg._compiled[i]
            want = [hf_of[n] for n in titan_candidates if compiled.fullmatch(n)]
            new = _rewrite_pattern(pattern)
            try:
                got = [h for h in hf_names if re.fullmatch(new, h)]
            except re.error:
                got = None
            if got != want:
                new = "|".join(re.escape(h) for h in want)
                notes.append(
                    f"pattern {pattern!r} cannot be rewritten word by word; it is replaced by the "
                    f"explicit list of the {len(want)} modules it selects"
                )
        else:
            new = titan_to_hf_module(pattern)
        if new in layers:
            raise ExportError(f"transform config: two patterns become {new!r} for transformers")
        layers[new] = qcfg.to_dict() if qcfg else None
        pattern_map[pattern] = new
    data = {"use_regex": tcfg.use_regex, "layer_name_to_config": layers}
    # The result must parse, and select what the original selected, module for module.
    hf_cfg = TransformConfig.from_dict(data, source=TRANSFORM_FILE)
    for n in titan_candidates:
        p_tt, q_tt = tcfg.match(n)
        p_hf, q_hf = hf_cfg.match(hf_of[n])
        if q_tt != q_hf:
            raise ExportError(
                f"transform config rewrite: {n!r} ({p_tt!r}) and {hf_of[n]!r} ({p_hf!r}) got "
                "different settings; please report this"
            )
    return data, notes, pattern_map


# ------------------------------------------------------------------------------------------------
# Writing


def _parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ExportError(f"--max-shard-size: cannot read {text!r}; use e.g. 2GB, 500MB or bytes")
    unit = (m.group(2) or "").upper().rstrip("B").rstrip("I")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[unit]
    if "I" in (m.group(2) or "").upper():
        scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def _save_weights(hf_sd: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> list[str]:
    from safetensors.torch import save_file

    def nbytes(t):
        return t.numel() * t.element_size()

    total = sum(nbytes(t) for t in hf_sd.values())
    if total <= max_shard_bytes:
        save_file(hf_sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in hf_sd.items():
        if shards[-1] and size + nbytes(t) > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes(t)
    n = len(shards)
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def _copy_tokenizer(hf_assets_path: str, folder: Path) -> list[str]:
    src = Path(hf_assets_path)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, folder / name)
            copied.append(name)
    if not any(n in copied for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ExportError(
            f"model.hf_assets_path: {hf_assets_path!r} holds no tokenizer (tokenizer.json, "
            "tokenizer.model or vocab.json); the export needs the run's tokenizer"
        )
    return copied


def _model_card(ck: TitanCheckpoint, hf_config, files: list[str], histogram: str | None,
                notes: list[str], dtype_name: str) -> str:
    job = ck.job_config
    step = ck.step
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [llama, torchtitan, optical-computing, torchtitan-optical]",
        "---",
        "",
        f"# {job.model.name} / {job.model.flavor}"
        + (f" (step {step})" if step is not None else ""),
        "",
        "A Llama model trained with [torchtitan](https://github.com/pytorch/torchtitan) and the "
        "torchtitan-optical extension"
        + (", with its linear layers and attention simulated as an optical matrix multiplier "
           "(quantized intensities, modulator floor, noisy read-out)." if ck.optical else
           " (digital run)."),
        "",
        f"- exported from `{ck.path}` with config `{getattr(job.job, 'config_file', '')}`",
        f"- {hf_config.num_hidden_layers} layers, hidden {hf_config.hidden_size}, "
        f"{hf_config.num_attention_heads} heads ({hf_config.num_key_value_heads} kv), "
        f"ffn {hf_config.intermediate_size}, vocab {hf_config.vocab_size}; weights in {dtype_name}",
        f"- trained with sequence length {job.training.seq_len} on `{job.training.dataset}`",
        "",
        "## Use",
        "",
        "Digital inference with plain transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        "```",
    ]
    if ck.optical:
        lines += [
            "",
            "As the optical model it was trained as (same modules and ranges as in torchtitan):",
            "",
            "```python",
            "from torchtitan_ext.hf.transform import transform_hf_model",
            f"report = transform_hf_model(model, PATH + '/{TRANSFORM_FILE}', ranges=PATH + '/{RANGES_FILE}')",
            "```",
            "",
            f"`{TRANSFORM_FILE}` says which modules are optical (transformers' module names); "
            f"`{RANGES_FILE}` holds their calibrated `[lo, hi]` ranges (rows: linear x, w, out; "
            "attention q, k, v, s, y).",
            "",
            "```",
            histogram or "",
            "```",
        ]
        if notes:
            lines += [""] + [f"- note: {n}" for n in notes]
    lines += [
        "",
        "## Continue pretraining",
        "",
        "- Hugging Face Trainer: `python -m torchtitan_ext.hf.run_clm --model_name_or_path PATH "
        "--dataset_name optical_stdlib --output_dir OUT --max_steps N`",
        "- torchtitan: `torchrun --nproc_per_node=1 run.py --job.config_file CONFIG.toml "
        "--model.hf_assets_path PATH --checkpoint.enable --checkpoint.initial_load_path PATH "
        "--checkpoint.initial_load_in_hf`",
        "",
        "Files: " + ", ".join(f"`{f}`" for f in files),
        "",
    ]
    return "\n".join(lines)


def export(
    config: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    dtype: str = "float32",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    overrides: Sequence[str] = (),
    log=print,
) -> Path:
    """Write the HF folder `out` (see the module docstring); return its path."""
    import yaml
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter

    from torchtitan_ext.optical.modules import OpticalAttention, OpticalLinear
    from torchtitan_ext.optical.transform import TransformReport, format_histogram

    if dtype not in _DTYPES:
        raise ExportError(f"--dtype: must be one of {list(_DTYPES)}, got {dtype!r}")
    torch_dtype = _DTYPES[dtype]
    max_shard_bytes = _parse_size(max_shard_size)
    out = Path(out)
    _check_checkpoint_path(Path(checkpoint))
    if out.exists() and not overwrite:
        raise ExportError(f"--out: {str(out)!r} already exists; pass --overwrite to replace it")
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"--out: {str(out)!r} exists and is not a folder")
        ckpt = Path(checkpoint).resolve()
        if ckpt == out.resolve() or out.resolve() in ckpt.parents:
            raise ExportError(f"--out: {str(out)!r} holds the checkpoint; choose another folder")
        if any(out.iterdir()) and not (out / "config.json").is_file():
            raise ExportError(
                f"--out: refusing to replace {str(out)!r}: it is not empty and has no config.json, "
                "so it does not look like a Hugging Face folder"
            )

    ck = load_titan_checkpoint(config, checkpoint, overrides)
    job, args = ck.job_config, ck.args
    weights = {k: v for k, v in ck.state_dict.items() if not k.endswith(RANGE_SUFFIX)}
    ranges = {k: v for k, v in ck.state_dict.items() if k.endswith(RANGE_SUFFIX)}
    hf_sd = Llama3StateDictAdapter(args, None).to_hf(weights)
    hf_sd = {k: v.to(torch_dtype).contiguous() for k, v in hf_sd.items()}
    hf_config = hf_config_of(args, ck.declared_args, _tokenizer_ids(job.model.hf_assets_path), torch_dtype)
    if hf_sd["model.layers.0.mlp.gate_proj.weight"].shape[0] != hf_config.intermediate_size:
        raise ExportError("internal: intermediate_size differs from the checkpoint's w1; please report")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        files = _save_weights(hf_sd, tmp, max_shard_bytes)
        hf_config.save_pretrained(tmp)
        _add_legacy_rope_keys(tmp / "config.json")
        gen = GenerationConfig(
            bos_token_id=hf_config.bos_token_id, eos_token_id=hf_config.eos_token_id,
            pad_token_id=hf_config.pad_token_id,
        )
        gen.save_pretrained(tmp)
        files += ["config.json", "generation_config.json"]
        files += _copy_tokenizer(job.model.hf_assets_path, tmp)
        histogram, notes = None, []
        if ck.optical:
            data, notes, pattern_map = translate_transform_config(ck.transform, ck.candidates)
            header = (
                f"# Written by torchtitan_ext.hf.export from {ck.transform.source}: the same "
                "settings for transformers' module names.\n"
            )
            (tmp / TRANSFORM_FILE).write_text(header + yaml.safe_dump(data, sort_keys=False))
            hf_ranges = {titan_to_hf_range_key(k): v.float().contiguous() for k, v in ranges.items()}
            save_file(hf_ranges, str(tmp / RANGES_FILE), metadata={
                "format": "pt",
                "rows.OpticalLinear": ",".join(OpticalLinear.RANGE_NAMES),
                "rows.OpticalAttention": ",".join(OpticalAttention.RANGE_NAMES),
                "source": str(ck.path),
            })
            files += [TRANSFORM_FILE, RANGES_FILE]
            hf_report = TransformReport()
            for pattern, names in ck.report.by_pattern.items():
                hf_report.by_pattern[pattern_map[pattern]] = [titan_to_hf_module(n) for n in names]
            hf_report.digital = [titan_to_hf_module(n) for n in ck.report.digital]
            histogram = format_histogram(hf_report)
            if ck.ignored_ranges:
                log(f"warning: {len(ck.ignored_ranges)} range buffers of the checkpoint belong to "
                    f"modules this transform config keeps digital; not exported: {ck.ignored_ranges[:3]}")
        elif ck.ignored_ranges:
            log(f"warning: the checkpoint has {len(ck.ignored_ranges)} optical range buffers but the "
                "config is digital; exported the weights only")
        (tmp / "README.md").write_text(_model_card(ck, hf_config, files + ["README.md"], histogram,
                                                   notes, dtype))
        for f in tmp.iterdir():
            os.chmod(f, 0o644)  # safetensors writes 0600 files
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
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
