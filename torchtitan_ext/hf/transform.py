"""Make a Hugging Face `LlamaForCausalLM` optical with the same core modules as torchtitan.

`transform_hf_model(model, config, ranges=None)`:

- every `nn.Linear` whose name the transform config selects becomes an `OpticalLinear`
  (`OpticalLinear.from_linear`: same parameter objects, the same custom ops as in torchtitan);
- every selected attention block (`model.layers.N.self_attn`, the HF counterpart of torchtitan's
  `layers.N.attention`) gets an `OpticalAttention` as attribute `optical_attention`, and the
  model's attention implementation becomes "optical": a function registered on transformers'
  `AttentionInterface` that hands (q, k, v) to that module, and falls back to SDPA for blocks
  without one (those whose pattern is null);
- ranges (a path to `optical_ranges.safetensors` or a dict) are loaded into the range buffers.

Noise order. The noise of an optical linear output is keyed by the element's index in the output
tensor. HF stores the rows of q_proj/k_proj permuted against torchtitan's wq/wk (HF's rotate-half
RoPE layout; torchtitan's `Llama3StateDictAdapter._permute`), so the same element of the
computation sits at another index. The q/k projections are therefore `RopeOrderedOpticalLinear`:
they compute in torchtitan's row order and permute the result, so an exported model draws exactly
the noise it drew in torchtitan (given the same seeds; both frameworks call the optical modules in
the same order: q, k, v, attention, o, gate(w1), up(w3), down(w2) per layer).

The "optical" attention function takes padding masks and transformers' KV caches (dynamic and
static): OpticalAttention's `key_padding_mask` and `q_start` (semantics page, section 3). Its mask
function, `optical_mask`, always gives a mask unless the queries are the whole causal sequence, so
the queries' position never has to be guessed. Masks that are not causal + key padding (packed
sequences) raise ValueError. Attention dropout is not applied (Llama's is 0).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from torchtitan_ext.optical.config import (
    OpticalConfigError,
    TransformConfig,
    load_transform_config,
)
from torchtitan_ext.optical.modules import OpticalAttention, OpticalLinear
from torchtitan_ext.optical.ranges import local
from torchtitan_ext.optical.transform import (
    ModelLayout,
    TransformReport,
    _module_device,
    candidate_modules,
    format_histogram,
    transform_model,
)

from torchtitan_ext.titan.hf_adapter import (
    HF_OPTICAL_ATTENTION,
    RANGE_SUFFIX,
    RANGES_FILE,
)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "HFTransformReport",
    "RopeOrderedOpticalLinear",
    "hf_candidate_modules",
    "transform_hf_model",
    "load_ranges",
    "optical_state_dict",
    "format_hf_histogram",
    "optical_attention_forward",
    "register_optical_attention",
    "key_padding_mask_of",
    "query_start",
    "check_causal_padding_mask",
    "optical_mask",
    "transform_config_of_model",
]

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "optical"


# ------------------------------------------------------------------------------------------------
# The attention function


def _as_bool_mask(m: torch.Tensor) -> torch.Tensor:
    if m.dtype == torch.bool:
        return m
    # additive float masks: 0 = visible, -inf (or min) = hidden
    return m > torch.finfo(m.dtype).min / 2 if m.is_floating_point() else m.bool()


def query_start_of(last_row_keys: torch.Tensor, q_len: int) -> torch.Tensor:
    """0-d int64 device tensor: the absolute position of query row 0 of a cached step, from the
    keys the last query row sees (bool [B, Lk]: `key_padding_mask_of` a 4-D mask). The last
    query row is the newest token, at the position of the newest key it sees; rows of a batch
    share positions, so the maximum over the batch also covers an element whose last row is
    padding. Device ops only: a static cache keeps its position on the device, and a CUDA graph
    of the step must not bake it in as a Python int."""
    k_len = last_row_keys.shape[-1]
    newest = (k_len - 1) - last_row_keys.flip(-1).to(torch.int32).argmax(-1)
    return (newest.amax() - (q_len - 1)).to(torch.int64)


def key_padding_mask_of(attention_mask, batch: int, k_len: int) -> torch.Tensor | None:
    """The 2-D key mask [B, Lk] (True = visible) behind transformers' attention mask.

    transformers (5.17 to 5.25) hands the attention function the 4-D mask of the registered
    mask function (`optical_mask`: bool [B, 1, Lq, Lk], True = attend, or None for a whole
    causal sequence without padding). The keys a causal mask hides from the last query row, which
    sits at the last key's position, are exactly the padded ones; a 2-D mask (from other callers)
    is taken as it is. An all-visible mask computes what no mask computes (semantics page,
    section 3). That a 4-D mask is causal AND key padding at all is `check_causal_padding_mask`'s
    business."""
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dim() == 4:
        m = m[:, 0, -1, :]
    m = _as_bool_mask(m)
    if tuple(m.shape) != (batch, k_len):
        m = m[..., -k_len:].expand(batch, k_len)
    return m.contiguous()  # no `.all()` test: that would read the device once per layer and step


def query_start(attention_mask, kpm, q_len: int, k_len: int) -> "int | torch.Tensor":
    """The absolute position of query row 0 (semantics page, section 3: row r sees keys
    0..q_start + r).

    - A 4-D mask of a cached step (Lq < Lk): from the mask, on the device (`query_start_of`); with
      a static cache (Lk = the cache's capacity) the queries are not the last Lq positions.
    - No mask: what SDPA's `is_causal` computes, which is what transformers means by leaving the
      mask out: one query row sees every key (Lq = 1: q_start = Lk - 1), several rows align at
      the top left (q_start = 0; e.g. the prefill of an empty static cache, whose keys span the
      whole capacity). `optical_mask` gives a mask whenever Lq != Lk, so transformers 5.25 leaves
      it out only for whole sequences (Lq = Lk), where both rules give 0.
    - A 2-D mask (other callers; it covers every key): the queries are the last Lq positions."""
    if attention_mask is None:
        return k_len - 1 if q_len == 1 else 0
    if attention_mask.dim() == 4 and q_len < k_len:
        return query_start_of(kpm, q_len)  # kpm is the mask's last row: what it sees
    return k_len - q_len


_checked_mask = None  # weakref to the last 4-D mask `check_causal_padding_mask` accepted


def _is_causal_padding(given: torch.Tensor, kpm: torch.Tensor, q_start) -> bool:
    """Whether bool [B, 1, Lq, Lk] `given` is the op's own visibility (one host read)."""
    from torchtitan_ext.optical.reference import attention_visibility

    b, _, lq, lk = given.shape
    supported = attention_visibility(b, lq, lk, causal=True, q_start=q_start,
                                     key_padding_mask=kpm, device=given.device)
    return bool((given == supported).all())


def check_causal_padding_mask(attention_mask: torch.Tensor, kpm: torch.Tensor,
                              q_start: "int | torch.Tensor") -> None:
    """Raise ValueError unless a 4-D mask is exactly causal AND key padding, the only visibility
    optical attention computes: a block-diagonal mask (packed sequences: position_ids that
    restart, `DataCollatorWithFlattening`, a custom 4-D mask) would otherwise be read as one
    sequence, silently.

    It compares on the host, so it runs only where a mask with several query rows arrives (a
    single row is always causal + its own key padding), once per mask object (transformers hands
    every layer the same one), and not while torch.compile traces (decoding steps, the only
    compiled calls `generate` makes, have one row)."""
    global _checked_mask
    if attention_mask.shape[-2] == 1 or torch.compiler.is_compiling():
        return
    if _checked_mask is not None and _checked_mask() is attention_mask:
        return
    if not _is_causal_padding(_as_bool_mask(attention_mask), kpm, q_start):
        raise ValueError(
            "attention_mask: optical attention computes causal attention with key padding only "
            "(allowed: a 2-D 0/1 attention_mask, or transformers' causal 4-D mask of one); this "
            "mask hides other keys from some query rows, as packed sequences do (position_ids "
            "that restart within a row, DataCollatorWithFlattening, a block-diagonal 4-D mask). "
            "Give one sequence per batch row, padded, with its attention_mask")
    _checked_mask = weakref.ref(attention_mask)


_PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k")


def optical_attention_forward(module, query, key, value, attention_mask, scaling=None,
                              dropout=0.0, **kwargs):
    """transformers attention function: q [B,H,Lq,D], k/v [B,Hkv,Lk,D] -> ([B,Lq,H,D], None).

    Padding (`attention_mask`) and cached decoding go to OpticalAttention (semantics page,
    section 3): the key mask from `key_padding_mask_of`, the queries' position from
    `query_start`; a mask optical attention cannot compute (packed sequences) raises ValueError
    (`check_causal_padding_mask`)."""
    opt = getattr(module, HF_OPTICAL_ATTENTION, None)
    if opt is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    for name in _PACKING_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}: packed sequences (flash-attention varlen arguments) are "
                             "not supported by optical attention; allowed: None (one sequence "
                             "per batch row, padded, with its attention_mask)")
    q_len, k_len = query.shape[2], key.shape[2]
    kpm = key_padding_mask_of(attention_mask, query.shape[0], k_len)
    q_start = query_start(attention_mask, kpm, q_len, k_len)
    if attention_mask is not None and attention_mask.dim() == 4:
        check_causal_padding_mask(attention_mask, kpm, q_start)
    y = opt(query, key, value, scale=scaling, is_causal=True, key_padding_mask=kpm,
            q_start=q_start)
    return y.transpose(1, 2).contiguous(), None


def optical_mask(*args, allow_is_causal_skip: bool = True, **kwargs):
    """The "optical" mask function: transformers' `sdpa_mask`, allowed to leave the mask out
    (None) only for a whole causal sequence without padding (Lq = Lk). SDPA may also leave it out
    for an unpadded prefill of an empty static cache (its `is_causal` aligns rows at the top
    left); giving the mask there too keeps the queries' position explicit."""
    from transformers.masking_utils import sdpa_mask

    q_length = kwargs.get("q_length", args[1] if len(args) > 1 else None)
    kv_length = kwargs.get("kv_length", args[2] if len(args) > 2 else None)
    skip = allow_is_causal_skip and q_length == kv_length
    return sdpa_mask(*args, allow_is_causal_skip=skip, **kwargs)


def register_optical_attention() -> None:
    """Register "optical" on transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(ATTN_IMPLEMENTATION, optical_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, optical_mask)


# ------------------------------------------------------------------------------------------------
# q/k projections in torchtitan's row order


def _rope_permutation(n_heads: int, head_dim: int) -> torch.Tensor:
    """perm with W_hf = W_titan[perm] (torchtitan's `Llama3StateDictAdapter._permute`)."""
    return torch.arange(n_heads * head_dim).view(n_heads, head_dim // 2, 2).transpose(1, 2).reshape(-1)


class RopeOrderedOpticalLinear(OpticalLinear):
    """An OpticalLinear for HF q_proj/k_proj that numbers output elements as torchtitan's wq/wk.

    `OpticalLinear.forward` runs unchanged (warm-up switch, clamp statistics, bypass, range
    recording); only its optical matmul (`_linear`) gets torchtitan's row order:
    y_titan = optical_linear(x, W_hf[inv]) with torchtitan's noise indices; y_hf = y_titan[..., perm].
    Ranges are per tensor, so the permutation changes nothing else. A tensor-parallel shard (fewer
    rows than the module) keeps its own order, as before.
    """

    @classmethod
    def from_linear_heads(cls, linear: nn.Linear, config, n_heads: int, head_dim: int):
        new = cls.from_linear(linear, config)
        perm = _rope_permutation(n_heads, head_dim).to(linear.weight.device)
        new.register_buffer("hf_rows", perm, persistent=False)
        new.register_buffer("titan_rows", torch.argsort(perm), persistent=False)
        return new

    def _linear(self, x, weight, bias, index, seed, *, quantize_output, record=True):
        if weight.shape[0] != self.titan_rows.numel():
            return super()._linear(x, weight, bias, index, seed, quantize_output=quantize_output,
                                   record=record)
        w = weight.index_select(0, self.titan_rows)
        b = None if bias is None else bias.index_select(0, self.titan_rows)
        y, obs = super()._linear(x, w, b, index, seed, quantize_output=quantize_output,
                                 record=record)
        return y.index_select(-1, self.hf_rows), obs


# ------------------------------------------------------------------------------------------------
# Transform


@dataclass
class HFTransformReport(TransformReport):
    """TransformReport plus what happened to the ranges."""

    ranges_loaded: list[str] = field(default_factory=list)
    ranges_missing: list[str] = field(default_factory=list)  # optical, but no range given
    ranges_unused: list[str] = field(default_factory=list)  # given, but the module is not optical
    ranges_source: str | None = None


def _is_attention_block(mod: nn.Module) -> bool:
    return all(hasattr(mod, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"))


class HFLlamaLayout(ModelLayout):
    """transformers' Llama: attention blocks are `self_attn` (they get an `optical_attention`
    attribute that the "optical" attention function calls); q/k projections keep torchtitan's
    noise order (see the module docstring)."""

    def is_attention_block(self, mod: nn.Module) -> bool:
        return _is_attention_block(mod) and getattr(mod, HF_OPTICAL_ATTENTION, None) is None

    def optical_linear(self, model, name, linear, config):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if child in ("q_proj", "k_proj") and _is_attention_block(parent):
            n_heads = linear.out_features // parent.head_dim
            return RopeOrderedOpticalLinear.from_linear_heads(linear, config, n_heads,
                                                              parent.head_dim)
        return OpticalLinear.from_linear(linear, config)

    def attach_attention(self, block, config):
        opt = OpticalAttention(config, device=_module_device(block))
        opt.train(block.training)
        setattr(block, HF_OPTICAL_ATTENTION, opt)


HF_LLAMA = HFLlamaLayout()


def hf_candidate_modules(model: nn.Module) -> "OrderedDict[str, nn.Module]":
    """What can be made optical, in model order: linears and attention blocks (by block name)."""
    return candidate_modules(model, HF_LLAMA)


def _as_transform_config(config) -> TransformConfig:
    if isinstance(config, TransformConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        return load_transform_config(config, key="transform_config")
    return TransformConfig.from_dict(config)


def transform_hf_model(model: nn.Module, config, ranges=None, *,
                       set_attn_implementation: bool = True) -> HFTransformReport:
    """Swap the modules the transform config selects, in place; load `ranges` if given.

    config: a TransformConfig, a path (.yaml/.yml/.json/.toml) or a dict of the transform format
        with transformers' module names (`model\\.layers\\.[0-9]+\\.self_attn\\.(q|k|v|o)_proj`, ...).
    ranges: a path to an `optical_ranges.safetensors`, or a dict {key: float32 [n, 2]} keyed
        `<optical module>.optical_ranges` (an attention block's own name is accepted for its
        `optical_attention`). Modules it has no range for stay uninitialised (calibration).
    Raises `OpticalConfigError` for a pattern that matches no candidate, before any change.
    """
    tcfg = _as_transform_config(config)
    report = transform_model(model, tcfg, HF_LLAMA, report=HFTransformReport())
    any_attention = any(getattr(m, HF_OPTICAL_ATTENTION, None) is not None
                        for m in model.modules())
    if any_attention and set_attn_implementation:
        _use_optical_attention(model)
    model.optical_transform_config = tcfg  # what save_optical_hf writes back
    if ranges is not None:
        load_ranges(model, ranges, report)
    return report


def _use_optical_attention(model: nn.Module) -> None:
    register_optical_attention()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if getattr(model, "config", None) is not None:
        model.config._attn_implementation = ATTN_IMPLEMENTATION
    for mod in model.modules():  # attention blocks read their own (usually shared) config
        cfg = getattr(mod, "config", None)
        if _is_attention_block(mod) and cfg is not None and cfg._attn_implementation != ATTN_IMPLEMENTATION:
            cfg._attn_implementation = ATTN_IMPLEMENTATION


def _optical_range_modules(model: nn.Module) -> "OrderedDict[str, nn.Module]":
    return OrderedDict(
        (name, mod) for name, mod in model.named_modules()
        if isinstance(mod, (OpticalLinear, OpticalAttention))
    )


def _canonical_range_key(key: str) -> str:
    if key.endswith(".self_attn" + RANGE_SUFFIX):  # the block's name for its optical_attention
        return key[: -len(RANGE_SUFFIX)] + f".{HF_OPTICAL_ATTENTION}{RANGE_SUFFIX}"
    return key


def load_ranges(model: nn.Module, ranges, report: HFTransformReport | None = None) -> HFTransformReport:
    """Copy range buffers into the model's optical modules (see `transform_hf_model`)."""
    report = report if report is not None else HFTransformReport()
    if isinstance(ranges, (str, os.PathLike)):
        path = Path(ranges)
        if path.is_dir():
            path = path / RANGES_FILE
        if not path.is_file():
            raise FileNotFoundError(f"ranges: {str(path)!r} does not exist")
        from safetensors.torch import load_file

        data = load_file(str(path))
        report.ranges_source = str(path)
    elif isinstance(ranges, Mapping):
        data = dict(ranges)
        report.ranges_source = "<dict>"
    else:
        raise TypeError(f"ranges: expected a path or a dict of tensors, got {type(ranges).__name__}")
    given = {_canonical_range_key(k): v for k, v in data.items()}
    modules = _optical_range_modules(model)
    with torch.no_grad():
        for name, mod in modules.items():
            key = name + RANGE_SUFFIX
            if key not in given:
                report.ranges_missing.append(name)
                continue
            value = given[key]
            target = local(mod.optical_ranges)
            if tuple(value.shape) != tuple(target.shape):
                raise OpticalConfigError(
                    f"ranges: {key} has shape {list(value.shape)}, the module "
                    f"({type(mod).__name__}, rows {list(mod.RANGE_NAMES)}) needs {list(target.shape)}"
                )
            target.copy_(value.to(target))
            report.ranges_loaded.append(name)
    wanted = {n + RANGE_SUFFIX for n in modules}
    report.ranges_unused = [k for k in given if k not in wanted]
    if report.ranges_missing:
        logger.warning(
            f"optical ranges: no range for {len(report.ranges_missing)} optical modules (they "
            f"calibrate on the first training step): {report.ranges_missing[:4]}"
        )
    if report.ranges_unused:
        logger.warning(
            f"optical ranges: {len(report.ranges_unused)} ranges in {report.ranges_source} belong to "
            f"no optical module and were ignored: {report.ranges_unused[:4]}"
        )
    return report


def optical_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The range buffers of a transformed model, keyed as in `optical_ranges.safetensors`."""
    return {n + RANGE_SUFFIX: m.ranges().detach().float().cpu().clone()
            for n, m in _optical_range_modules(model).items()}


def format_hf_histogram(report: TransformReport) -> str:
    """`format_histogram` plus, for an HFTransformReport, a line on the ranges."""
    text = format_histogram(report)
    if isinstance(report, HFTransformReport) and report.ranges_source is not None:
        text += (
            f"\n  ranges from {report.ranges_source}: {len(report.ranges_loaded)} loaded, "
            f"{len(report.ranges_missing)} uninitialised (calibrate), "
            f"{len(report.ranges_unused)} unused"
        )
    return text


def transform_config_of_model(model: nn.Module) -> TransformConfig | None:
    """The TransformConfig `transform_hf_model` applied to `model` (None: digital)."""
    return getattr(model, "optical_transform_config", None)
