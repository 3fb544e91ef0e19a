"""Swap a model's linears and inner attentions for optical modules, by the transform config.

Candidates are every `nn.Linear` (by its fully-qualified name) and every module that owns an
`inner_attention` child (a Llama attention block, by the block's name: a matching pattern makes
its inner scaled-dot-product attention optical while its projections stay linears that their own
patterns govern). Works on any device, the meta device included, and keeps parameter objects.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from torch import nn

from .config import (ATTENTION_LEVEL_KEYS, LINEAR_LEVEL_KEYS, OpticalConfigError,
                     QuantizerConfig, TransformConfig)
from .modules import OpticalAttention, OpticalLinear

__all__ = [
    "ModelLayout",
    "TORCHTITAN_LLAMA",
    "TransformReport",
    "candidate_modules",
    "transform_model",
    "format_histogram",
    "resolve_transform",
]

INNER_ATTENTION = "inner_attention"


@dataclass
class TransformReport:
    """What was made optical: pattern -> module names (in model order)."""

    by_pattern: "OrderedDict[str, list[str]]" = field(default_factory=OrderedDict)
    digital: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.by_pattern.values())

    def names(self) -> list[str]:
        return [n for v in self.by_pattern.values() for n in v]


class ModelLayout:
    """How a model family exposes what can be made optical (torchtitan's Llama by default).

    Subclass it for another model family: say which modules are attention blocks, how a linear
    becomes optical, and how a block's attention is routed to an `OpticalAttention`.
    """

    def is_attention_block(self, mod: nn.Module) -> bool:
        return hasattr(mod, INNER_ATTENTION) and not isinstance(
            getattr(mod, INNER_ATTENTION), OpticalAttention
        )

    def optical_linear(self, model: nn.Module, name: str, linear: nn.Linear,
                       config: QuantizerConfig) -> nn.Module:
        return OpticalLinear.from_linear(linear, config)

    def attach_attention(self, block: nn.Module, config: QuantizerConfig) -> None:
        setattr(block, INNER_ATTENTION, OpticalAttention(config, device=_module_device(block)))


def _check_level_keys(name: str, pattern: str, config: QuantizerConfig, kind: str) -> None:
    """A per-quantizer levels key of the other module kind is bad input, never ignored."""
    wrong = config.level_keys_set(ATTENTION_LEVEL_KEYS if kind == "linear" else LINEAR_LEVEL_KEYS)
    if wrong:
        allowed = LINEAR_LEVEL_KEYS if kind == "linear" else ATTENTION_LEVEL_KEYS
        raise OpticalConfigError(
            f"layer_name_to_config['{pattern}'].{wrong[0]}: a per-quantizer levels key of "
            f"{'attention' if kind == 'linear' else 'linear'} modules, but the pattern matches "
            f"{kind} module {name}; allowed for {kind} modules: {list(allowed)}"
        )


def _check_attention_config(name: str, pattern: str, config: QuantizerConfig) -> None:
    _check_level_keys(name, pattern, config, "attention")
    if config.q_quantiles is not None:
        raise OpticalConfigError(
            f"layer_name_to_config['{pattern}'].q_quantiles: quantile ranges are supported for "
            f"linear layers only, but the pattern matches attention block {name}; allowed for "
            "attention: null"
        )


TORCHTITAN_LLAMA = ModelLayout()


def candidate_modules(model: nn.Module,
                      layout: ModelLayout = TORCHTITAN_LLAMA) -> "OrderedDict[str, nn.Module]":
    """What can be made optical, in model order: linears, and attention blocks by block name."""
    out: "OrderedDict[str, nn.Module]" = OrderedDict()
    for name, mod in model.named_modules():
        if not name:
            continue
        if isinstance(mod, nn.Linear) and not isinstance(mod, OpticalLinear):
            out[name] = mod
        elif layout.is_attention_block(mod):
            out[name] = mod
    return out


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def transform_model(model: nn.Module, config: TransformConfig,
                    layout: ModelLayout = TORCHTITAN_LLAMA,
                    report: TransformReport | None = None) -> TransformReport:
    """Swap the matched modules in place; raise `OpticalConfigError` for a pattern that matches
    nothing, before anything is changed."""
    candidates = candidate_modules(model, layout)
    config.check_patterns(candidates.keys())
    report = report if report is not None else TransformReport()
    for name, mod in candidates.items():  # validate every match before changing anything
        pattern, qcfg = config.match(name)
        if qcfg is not None:
            if isinstance(mod, nn.Linear):
                _check_level_keys(name, pattern, qcfg, "linear")
            else:
                _check_attention_config(name, pattern, qcfg)
    for name, mod in candidates.items():
        pattern, qcfg = config.match(name)
        if qcfg is None:
            report.digital.append(name)
            continue
        if isinstance(mod, nn.Linear):
            new = layout.optical_linear(model, name, mod, qcfg)
            new.train(mod.training)
            _set_submodule(model, name, new)
        else:
            layout.attach_attention(mod, qcfg)
        report.by_pattern.setdefault(pattern, []).append(name)
    return report


def _module_device(mod: nn.Module):
    for t in list(mod.parameters()) + list(mod.buffers()):
        return t.device
    return None


def _compress(names: list[str], limit: int = 6) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    head = ", ".join(names[: limit // 2])
    tail = ", ".join(names[-(limit // 2):])
    return f"{head}, ... ({len(names) - limit} more) ..., {tail}"


def format_histogram(report: TransformReport) -> str:
    """A start-up log block: per pattern, how many modules and which, and what stayed digital."""
    lines = [f"optical transform: {report.count} modules made optical"]
    for pattern, names in report.by_pattern.items():
        lines.append(f"  [{len(names):4d}] {pattern}")
        lines.append(f"         {_compress(names)}")
    lines.append(f"  [{len(report.digital):4d}] digital (null / default): {_compress(report.digital)}")
    return "\n".join(lines)


# Wrappers that torchtitan puts around blocks (torch.compile, activation checkpointing, FSDP1)
# add a path component; the recorded names are the plain model's.
_WRAPPER_PARTS = re.compile(r"(^|\.)(_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)(?=\.|$)")


def _plain_name(name: str) -> str:
    return _WRAPPER_PARTS.sub("", name).lstrip(".")


def resolve_transform(model_parts: nn.Module | Iterable[nn.Module],
                      config: TransformConfig | None,
                      options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a transformed model really is, as a JSON-ready record: per optical module (by its
    plain name; attention by its block's name) its kind ("linear"/"attention"), the pattern
    that chose it and every quantizer setting, plus the transform file's content (`transform`,
    enough to rebuild a `TransformConfig`) and the run `options` that change the numerics.
    Read from the modules themselves, so it holds whatever the model was built with."""
    parts = [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)
    modules: dict[str, dict[str, Any]] = {}
    for part in parts:
        for name, mod in part.named_modules():
            if isinstance(mod, OpticalLinear):
                kind, plain = "linear", _plain_name(name)
            elif isinstance(mod, OpticalAttention):
                kind, plain = "attention", _plain_name(name.rpartition(".")[0])
            else:
                continue
            pattern = config.match(plain)[0] if config is not None else None
            modules[plain] = {"kind": kind, "pattern": pattern, **mod.config.to_dict()}
    return {
        "format": 1,
        "transform": config.to_dict() if config is not None else None,
        "source": config.source if config is not None else None,
        "modules": modules,
        "options": dict(options or {}),
    }
