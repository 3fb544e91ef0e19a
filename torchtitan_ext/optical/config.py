"""Per-layer optical settings: which modules become optical, with which quantizer parameters.

The file format is the reference system's transform YAML, loaded unchanged:

    use_regex: true
    layer_name_to_config:
      default: null                     # modules no pattern matches (null = stay digital)
      'layers\\.[0-9]+\\.attention\\.(wq|wk|wv|wo)': {q_levels: 256, q_lut_min: 0.02004, ...}
      'layers\\.[0-9]+\\.attention': {...}   # a block's inner attention becomes optical
      output: null

Patterns are matched against fully-qualified module names with `re.fullmatch` (or compared
exactly when `use_regex` is false); the first pattern in file order that matches wins.
Everything is validated before a model is built, with errors that name the key and the allowed
values.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = [
    "OpticalConfigError",
    "QuantizerConfig",
    "TransformConfig",
    "load_transform_config",
    "DEFAULT_TRANSFORM_CONFIG",
    "transform_diff",
    "format_transform_diff",
    "transform_config_from_record",
]

MAX_LEVELS = 1 << 22  # the kernels' round-half-even trick is exact up to 2^22 levels
GRAD_MODES = ("ste", "clipped")
READOUT_MODES = ("rounding", "shot")
# Per-quantizer level overrides (semantics s.1), in the order the ops take them.
LINEAR_LEVEL_KEYS = ("q_levels_input", "q_levels_weight", "q_levels_output")
ATTENTION_LEVEL_KEYS = ("q_levels_q", "q_levels_k", "q_levels_s", "q_levels_p", "q_levels_v",
                        "q_levels_y")


class OpticalConfigError(ValueError):
    """A bad optical configuration: the message names the offending key or pattern."""


@dataclass(frozen=True)
class QuantizerConfig:
    """Settings of one optical layer (every quantizer in it shares them).

    q_levels: levels L of every quantizer (integer >= 2; 256 = 8 bits).
    q_lut_min: weight-modulator floor as a fraction of the range (0 <= v < 1; null/0 = off).
    q_quantiles: (lo_q, hi_q) with 0 < lo_q < hi_q < 1 to observe quantile ranges instead of
        min/max (null = min/max).
    q_smooth_factor: EMA factor s of the range buffers (0 <= s < 1).
    q_init_seed: noise stream of this layer (integer >= 0): the second Philox key word, so layers
        with different streams never share noise even when their per-call seeds coincide.
    q_bypass: true = the module is swapped (ranges are observed and carried) but computes
        digitally, for calibration and A/B runs.
    q_grad: "ste" (straight-through, default) or "clipped" (zero gradient where clamped).
    q_noise: read-out noise switch (semantics s.1), true (default) or false: false turns every
        noisy quantizer of the layer (linear Q_out, attention Q_s and Q_y) into deterministic
        rounding, to study quantization apart from read-out noise.
    q_levels_input, q_levels_weight, q_levels_output: linear layers only; levels of Q_x, Q_w,
        Q_out (integer >= 2, or null = q_levels).
    q_levels_q, q_levels_k, q_levels_s, q_levels_p, q_levels_v, q_levels_y: attention only;
        levels of Q_q, Q_k, Q_s, Q_p, Q_v, Q_y (integer >= 2, or null = q_levels). A key of the
        other module kind in a rule that matches a module is an error when the transform is
        applied.
    q_readout: "rounding" (default: stochastic rounding of Q_out / Q_s / Q_y) or "shot"
        (photodetector shot noise: v' = v + sqrt(v / (n K)) z, then deterministic rounding).
    q_photons_per_mac: n, photons per multiply-accumulate (number > 0): required with
        q_readout "shot", not allowed with "rounding".
    """

    q_levels: int = 256
    q_lut_min: float | None = 0.02004
    q_quantiles: tuple[float, float] | None = None
    q_smooth_factor: float = 0.9
    q_init_seed: int = 0
    q_bypass: bool = False
    q_grad: str = "ste"
    q_noise: bool = True
    q_levels_input: int | None = None
    q_levels_weight: int | None = None
    q_levels_output: int | None = None
    q_levels_q: int | None = None
    q_levels_k: int | None = None
    q_levels_s: int | None = None
    q_levels_p: int | None = None
    q_levels_v: int | None = None
    q_levels_y: int | None = None
    q_readout: str = "rounding"
    q_photons_per_mac: float | None = None

    @property
    def lut(self) -> float | None:
        return self.q_lut_min if self.q_lut_min else None

    def _levels_of(self, keys: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(self.q_levels if getattr(self, k) is None else getattr(self, k)
                     for k in keys)

    @property
    def linear_levels(self) -> tuple[int, int, int]:
        """Levels of (Q_x, Q_w, Q_out)."""
        return self._levels_of(LINEAR_LEVEL_KEYS)

    @property
    def attention_levels(self) -> tuple[int, int, int, int, int, int]:
        """Levels of (Q_q, Q_k, Q_s, Q_p, Q_v, Q_y)."""
        return self._levels_of(ATTENTION_LEVEL_KEYS)

    @property
    def photons(self) -> float:
        """n of the shot read-out, 0.0 for the rounding read-out (what the ops take)."""
        return float(self.q_photons_per_mac) if self.q_readout == "shot" else 0.0

    def level_keys_set(self, keys: tuple[str, ...]) -> list[str]:
        return [k for k in keys if getattr(self, k) is not None]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> "QuantizerConfig":
        if not isinstance(data, Mapping):
            raise OpticalConfigError(
                f"{where}: expected a mapping of quantizer settings or null, got {data!r}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise OpticalConfigError(
                f"{where}: unknown key {unknown[0]!r}; allowed keys: {sorted(known)}"
            )
        values = dict(data)
        # Checked in this order, so the first bad key named is always the same one.
        _check_levels(values.get("q_levels", cls.q_levels), f"{where}.q_levels")
        _normalise_range_keys(values, where, cls)
        _check_switch_keys(values, where, cls)
        for key in LINEAR_LEVEL_KEYS + ATTENTION_LEVEL_KEYS:
            if values.get(key) is not None:
                _check_levels(values[key], f"{where}.{key}", key)
        _normalise_readout_keys(values, where, cls)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if d["q_quantiles"] is not None:
            d["q_quantiles"] = list(d["q_quantiles"])
        return d


def _check_levels(levels: Any, where: str, key: str = "q_levels") -> None:
    if isinstance(levels, bool) or not isinstance(levels, int) or not 2 <= levels <= MAX_LEVELS:
        raise OpticalConfigError(
            f"{where}: must be an integer with 2 <= {key} <= {MAX_LEVELS}"
            + (" (or null = q_levels)" if key != "q_levels" else "") + f", got {levels!r}"
        )


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _normalise_range_keys(values: dict[str, Any], where: str, cls) -> None:
    """q_lut_min, q_quantiles, q_smooth_factor: checked, and stored as floats in `values`."""
    lut = values.get("q_lut_min", cls.q_lut_min)
    if lut is not None:
        if not _is_number(lut) or not 0 <= lut < 1:
            raise OpticalConfigError(
                f"{where}.q_lut_min: must be a number with 0 <= q_lut_min < 1 "
                f"(or null for no floor), got {lut!r}"
            )
        values["q_lut_min"] = float(lut)
    quantiles = values.get("q_quantiles")
    if quantiles is not None:
        ok = (
            isinstance(quantiles, (list, tuple))
            and len(quantiles) == 2
            and all(_is_number(q) for q in quantiles)
            and 0 < quantiles[0] < quantiles[1] < 1
        )
        if not ok:
            raise OpticalConfigError(
                f"{where}.q_quantiles: must be null or [lo, hi] with 0 < lo < hi < 1, "
                f"got {quantiles!r}"
            )
        values["q_quantiles"] = (float(quantiles[0]), float(quantiles[1]))
    smooth = values.get("q_smooth_factor", cls.q_smooth_factor)
    if not _is_number(smooth) or not 0 <= smooth < 1:
        raise OpticalConfigError(
            f"{where}.q_smooth_factor: must be a number with 0 <= q_smooth_factor < 1, "
            f"got {smooth!r}"
        )
    values["q_smooth_factor"] = float(smooth)


def _check_switch_keys(values: dict[str, Any], where: str, cls) -> None:
    """q_init_seed, q_bypass, q_grad, q_noise."""
    seed = values.get("q_init_seed", cls.q_init_seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise OpticalConfigError(
            f"{where}.q_init_seed: must be an integer with 0 <= q_init_seed < 2^32, got {seed!r}"
        )
    bypass = values.get("q_bypass", cls.q_bypass)
    if not isinstance(bypass, bool):
        raise OpticalConfigError(f"{where}.q_bypass: must be true or false, got {bypass!r}")
    grad = values.get("q_grad", cls.q_grad)
    if grad not in GRAD_MODES:
        raise OpticalConfigError(
            f"{where}.q_grad: must be one of {list(GRAD_MODES)}, got {grad!r}"
        )
    noise = values.get("q_noise", cls.q_noise)
    if not isinstance(noise, bool):
        raise OpticalConfigError(
            f"{where}.q_noise: must be true or false (read-out noise on/off), got {noise!r}"
        )


def _normalise_readout_keys(values: dict[str, Any], where: str, cls) -> None:
    """q_readout and q_photons_per_mac (required with "shot", stored as a float)."""
    readout = values.get("q_readout", cls.q_readout)
    if readout not in READOUT_MODES:
        raise OpticalConfigError(
            f"{where}.q_readout: must be one of {list(READOUT_MODES)}, got {readout!r}"
        )
    photons = values.get("q_photons_per_mac")
    if readout == "shot":
        if photons is None:
            raise OpticalConfigError(
                f"{where}.q_photons_per_mac: required with q_readout 'shot' (photons per "
                "multiply-accumulate, a number > 0)"
            )
        if not _is_number(photons) or not photons > 0 or photons == float("inf"):
            raise OpticalConfigError(
                f"{where}.q_photons_per_mac: must be a finite number > 0, got {photons!r}"
            )
        values["q_photons_per_mac"] = float(photons)
    elif photons is not None:
        raise OpticalConfigError(
            f"{where}.q_photons_per_mac: only allowed with q_readout 'shot' (got "
            f"q_readout {readout!r}); allowed here: null"
        )


@dataclass(frozen=True)
class TransformConfig:
    """Parsed transform file: ordered (pattern, settings-or-None) rules and a default."""

    rules: tuple[tuple[str, QuantizerConfig | None], ...]
    default: QuantizerConfig | None = None
    use_regex: bool = True
    source: str = "<dict>"
    _compiled: tuple = field(default=(), repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> "TransformConfig":
        if not isinstance(data, Mapping):
            raise OpticalConfigError(
                f"{source}: the transform config must be a mapping with keys "
                f"'use_regex' and 'layer_name_to_config', got {type(data).__name__}"
            )
        unknown = sorted(set(data) - {"use_regex", "layer_name_to_config"})
        if unknown:
            raise OpticalConfigError(
                f"{source}: unknown top-level key {unknown[0]!r}; allowed keys: "
                "['layer_name_to_config', 'use_regex']"
            )
        use_regex = data.get("use_regex", True)
        if not isinstance(use_regex, bool):
            raise OpticalConfigError(f"{source}: use_regex must be true or false, got {use_regex!r}")
        layers = data.get("layer_name_to_config")
        if not isinstance(layers, Mapping) or not layers:
            raise OpticalConfigError(
                f"{source}: 'layer_name_to_config' must be a non-empty mapping of "
                "module-name patterns to quantizer settings (or null)"
            )
        rules: list[tuple[str, QuantizerConfig | None]] = []
        compiled = []
        default = None
        for pattern, entry in layers.items():
            where = f"{source}: layer_name_to_config['{pattern}']"
            if not isinstance(pattern, str):
                raise OpticalConfigError(f"{where}: patterns must be strings")
            qcfg = None if entry is None else QuantizerConfig.from_dict(entry, where)
            if pattern == "default":
                default = qcfg
                continue
            if use_regex:
                try:
                    compiled.append(re.compile(pattern))
                except re.error as e:
                    raise OpticalConfigError(f"{where}: not a valid regular expression: {e}") from e
            rules.append((pattern, qcfg))
        return cls(tuple(rules), default, use_regex, source, tuple(compiled))

    def match(self, name: str) -> tuple[str, QuantizerConfig | None]:
        """The (pattern, settings) that apply to module `name` ('default' when none matches)."""
        for i, (pattern, qcfg) in enumerate(self.rules):
            hit = self._compiled[i].fullmatch(name) if self.use_regex else pattern == name
            if hit:
                return pattern, qcfg
        return "default", self.default

    def check_patterns(self, candidate_names: Iterable[str]) -> None:
        """Every pattern must match at least one candidate module (naming real ones if not) and
        must win at least one: a pattern whose matches all go to earlier patterns never applies,
        which would otherwise pass silently. `default` is not a pattern and is never checked."""
        names = list(candidate_names)
        for i, (pattern, _) in enumerate(self.rules):
            if self.use_regex:
                hits = [n for n in names if self._compiled[i].fullmatch(n)]
            else:
                hits = [n for n in names if n == pattern]
            if not hits:
                sample = _sample_names(names)
                raise OpticalConfigError(
                    f"{self.source}: pattern '{pattern}' matches no module that can be made "
                    f"optical (linear layers and attention blocks). Some real module names: "
                    f"{sample}"
                )
            winners = {n: self.match(n)[0] for n in hits}
            if all(w != pattern for w in winners.values()):
                earlier = sorted(set(winners.values()), key=lambda p: self._index(p))
                shown = ", ".join(hits[:4]) + (f", ... ({len(hits) - 4} more)" if len(hits) > 4
                                               else "")
                raise OpticalConfigError(
                    f"{self.source}: pattern '{pattern}' never applies: every module it matches "
                    f"({shown}) is taken by earlier pattern(s) "
                    f"{', '.join(repr(p) for p in earlier)} (the first matching pattern wins); "
                    "move it above them or narrow them"
                )

    def _index(self, pattern: str) -> int:
        return next(i for i, (p, _) in enumerate(self.rules) if p == pattern)

    def to_dict(self) -> dict[str, Any]:
        layers: dict[str, Any] = {"default": self.default.to_dict() if self.default else None}
        for pattern, qcfg in self.rules:
            layers[pattern] = qcfg.to_dict() if qcfg else None
        return {"use_regex": self.use_regex, "layer_name_to_config": layers}


def _sample_names(names: list[str], k: int = 12) -> list[str]:
    """One name of each kind (names that differ only in layer numbers count as one kind)."""
    seen: dict[str, str] = {}
    for n in names:
        seen.setdefault(re.sub(r"\d+", "N", n), n)
    return list(seen.values())[:k]


def load_transform_config(path: str | Path, key: str = "optical.transform_config") -> TransformConfig:
    """Read a transform file (.yaml/.yml, .json or .toml) and validate it."""
    p = Path(path)
    if not p.is_file():
        raise OpticalConfigError(f"{key}: file {str(path)!r} does not exist")
    text = p.read_text()
    suffix = p.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.load(text, Loader=_unique_key_loader())
        elif suffix == ".json":
            data = json.loads(text, object_pairs_hook=_unique_json_object)
        elif suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            raise OpticalConfigError(
                f"{key}: {str(path)!r} has extension {suffix!r}; allowed: .yaml, .yml, .json, .toml"
            )
    except OpticalConfigError:
        raise
    except _DuplicateKey as e:
        raise OpticalConfigError(f"{key}: file {str(path)!r}: {e}") from e
    except Exception as e:  # the parsers' own error types differ; all mean "does not parse"
        raise OpticalConfigError(f"{key}: file {str(path)!r} does not parse: {e}") from e
    return TransformConfig.from_dict(data, source=str(path))


class _DuplicateKey(ValueError):
    pass


def _unique_key_loader():
    """A yaml SafeLoader that refuses a mapping with a repeated key at any level (plain
    `safe_load` keeps the last value without a word, so a pattern given twice would silently
    lose its first settings)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _DuplicateKey(f"key {key!r} is given twice (lines {seen[key]} and "
                                        f"{line}); each key may appear once per mapping")
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _unique_json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"key {key!r} is given twice in one object; each key may appear "
                                "once per object")
        out[key] = value
    return out


def transform_diff(recorded: Mapping[str, Any],
                   given: Mapping[str, Any]) -> list[tuple[str, str, Any, Any]]:
    """Differences between two resolved transforms (`resolve_transform` records), as rows
    (module, key, recorded value, given value), modules in recorded-then-given order.

    A module optical on one side only gives one row with key "optical" and values "optical" /
    "digital"; the per-module keys compared are "kind" and every quantizer setting. Rows under
    module "<options>" compare the recorded run options. Pure: reads nothing, changes nothing.
    """
    rows: list[tuple[str, str, Any, Any]] = []
    rec_mods = dict(recorded.get("modules") or {})
    giv_mods = dict(given.get("modules") or {})
    for name in list(rec_mods) + [n for n in giv_mods if n not in rec_mods]:
        a, b = rec_mods.get(name), giv_mods.get(name)
        if a is None or b is None:
            rows.append((name, "optical", "digital" if a is None else "optical",
                         "digital" if b is None else "optical"))
            continue
        for key in list(a) + [k for k in b if k not in a]:
            if key != "pattern" and a.get(key) != b.get(key):
                rows.append((name, key, a.get(key), b.get(key)))
    rec_opt, giv_opt = dict(recorded.get("options") or {}), dict(given.get("options") or {})
    for key in list(rec_opt) + [k for k in giv_opt if k not in rec_opt]:
        if rec_opt.get(key) != giv_opt.get(key):
            rows.append(("<options>", key, rec_opt.get(key), giv_opt.get(key)))
    return rows


def transform_config_from_record(recorded: Mapping[str, Any],
                                 source: str = "<checkpoint>") -> "TransformConfig | None":
    """The `TransformConfig` a recorded transform was built from (its `transform` entry), or
    None for a digital run's record. Validated as a transform file is."""
    data = recorded.get("transform")
    return None if data is None else TransformConfig.from_dict(data, source=source)


def format_transform_diff(rows: list[tuple[str, str, Any, Any]], limit: int = 12) -> str:
    """The rows of `transform_diff` as one line per difference (at most `limit`)."""
    lines = [f"  {m}: {k}: checkpoint {a!r}, given {b!r}" for m, k, a, b in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"  ... ({len(rows) - limit} more differences)")
    return "\n".join(lines)


# The default when `[optical] transform_config` is empty: every linear of the transformer blocks
# and every block's inner attention optical at 8 bits; embeddings and the output head digital.
DEFAULT_TRANSFORM_CONFIG = {
    "use_regex": True,
    "layer_name_to_config": {
        "default": None,
        r"layers\.[0-9]+\.attention\.(wq|wk|wv|wo)|layers\.[0-9]+\.feed_forward\.(w1|w2|w3)": {},
        r"layers\.[0-9]+\.attention": {},
        "output": None,
    },
}
