"""torchtitan transform patterns -> transformers module names (the export's `optical_transform.yaml`)."""

from __future__ import annotations

import re
from typing import Any, Sequence

from torchtitan_ext.titan.hf_adapter import TRANSFORM_FILE, titan_to_hf_module

from .errors import ExportError

__all__ = ["translate_transform_config", "hf_report_of"]


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


def hf_report_of(report, pattern_map: dict[str, str]):
    """torchtitan's TransformReport under transformers' module names and patterns."""
    from torchtitan_ext.optical.transform import TransformReport

    hf_report = TransformReport()
    for pattern, names in report.by_pattern.items():
        hf_report.by_pattern[pattern_map[pattern]] = [titan_to_hf_module(n) for n in names]
    hf_report.digital = [titan_to_hf_module(n) for n in report.digital]
    return hf_report
