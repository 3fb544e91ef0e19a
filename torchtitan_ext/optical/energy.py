"""Energy per token of a Llama model on a simulated optical core, against a digital baseline.

A bookkeeping model after the Optical Transformers paper (Anderson et al., TMLR 2024,
arXiv 2302.10360): an optical matrix-vector multiplier spends
- optical energy: `photons_per_mac` photons of energy h*c/lambda per multiply-accumulate, divided by
  the laser, transmission and detector efficiencies;
- electronic energy: one DAC conversion per input element (fanned out optically to every output),
  one ADC conversion per output element (after the whole sum over K), and one modulator load per
  weight element, amortised over the tokens that reuse a loaded weight;
and everything the transform leaves digital (output head, norms, softmax, digital layers) costs
`digital_j_per_mac` per MAC, as does the digital baseline (all MACs of the model).

Conversions cost `fom * 2**bits` (Walden's figure of merit), bits = ceil(log2(levels)) of the
quantizer that feeds the converter. Every constant lives in `HardwareProfile` (YAML:
`train_configs/hardware/optical_transformers.yaml`) with its source; a constant whose value could
not be found is `None` and its part of the energy is reported as not estimated (never guessed).
Assumptions and sources: docs/energy.md. Counts are per token of a forward pass over a causal
sequence of `seq_len` tokens (teacher-forced evaluation or training's forward, not cached decoding).

This module imports neither torchtitan nor transformers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from .config import OpticalConfigError, QuantizerConfig, TransformConfig

__all__ = [
    "PLANCK_J_S",
    "SPEED_OF_LIGHT_M_S",
    "DEFAULT_PROFILE_PATH",
    "HardwareProfile",
    "ModelDims",
    "EnergyRow",
    "EnergyReport",
    "photon_energy_j",
    "conversion_energy_j",
    "levels_to_bits",
    "load_hardware_profile",
    "estimate_energy",
    "energy_markdown",
]

# Exact by the definition of the SI (2019 redefinition, BIPM SI Brochure, 9th edition).
PLANCK_J_S = 6.62607015e-34
SPEED_OF_LIGHT_M_S = 299_792_458.0

DEFAULT_PROFILE_PATH = (
    Path(__file__).resolve().parents[2] / "train_configs" / "hardware" / "optical_transformers.yaml"
)

# Roles of each quantizer (semantics page, section 1): per-quantizer levels are read from
# `q_levels_<role>` when the transform config has such a key, else from `q_levels`.
LINEAR_ROLES = ("input", "weight", "output")
ATTENTION_ROLES = ("q", "k", "s", "p", "v", "y")


@dataclass(frozen=True)
class HardwareProfile:
    """Constants of the optical core and of the digital baseline (see docs/energy.md).

    wavelength_m: optical wavelength (photon energy h*c/lambda).
    laser_efficiency, transmission, detector_efficiency: fractions in (0, 1]; the optical energy
        is detected photons / (their product).
    photons_per_mac: detected photons per MAC used when neither the call nor the transform
        (`q_photons_per_mac`) gives one.
    adc_fom_j_per_step, dac_fom_j_per_step: Walden figure of merit (J per conversion step) of the
        ADC / DAC: E(b) = fom * 2**b per conversion. None = not known (not estimated).
    modulator_load_j: energy to write one weight element into the modulator, on top of its DAC
        conversion. None = not known.
    weight_reuse_tokens: tokens that share one load of a linear's weights (None = seq_len).
    digital_j_per_mac: energy per MAC of the digital accelerator (baseline and digital parts).
    sources: free text per constant: where the number comes from.
    """

    name: str = "optical_transformers"
    wavelength_m: float = 1.55e-6
    laser_efficiency: float = 1.0
    transmission: float = 1.0
    detector_efficiency: float = 1.0
    photons_per_mac: float = 3.2
    adc_fom_j_per_step: float | None = None
    dac_fom_j_per_step: float | None = None
    modulator_load_j: float | None = None
    weight_reuse_tokens: int | None = None
    digital_j_per_mac: float = 300e-15
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        _check_positive(self, "wavelength_m", self.wavelength_m)
        for key in ("laser_efficiency", "transmission", "detector_efficiency"):
            value = getattr(self, key)
            if not _is_number(value) or not 0 < value <= 1:
                raise OpticalConfigError(f"hardware.{key}: must be a number in (0, 1], got {value!r}")
        _check_positive(self, "photons_per_mac", self.photons_per_mac)
        _check_positive(self, "digital_j_per_mac", self.digital_j_per_mac)
        for key in ("adc_fom_j_per_step", "dac_fom_j_per_step", "modulator_load_j"):
            value = getattr(self, key)
            if value is not None and (not _is_number(value) or value < 0):
                raise OpticalConfigError(
                    f"hardware.{key}: must be a number >= 0 (joules) or null (unknown), got {value!r}"
                )
        reuse = self.weight_reuse_tokens
        if reuse is not None and (isinstance(reuse, bool) or not isinstance(reuse, int) or reuse < 1):
            raise OpticalConfigError(
                f"hardware.weight_reuse_tokens: must be an integer >= 1 or null (= seq_len), got {reuse!r}"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "hardware") -> "HardwareProfile":
        """Build from a mapping of the YAML's keys: each is either a value or {value, source}."""
        if not isinstance(data, Mapping):
            raise OpticalConfigError(f"{where}: expected a mapping of constants, got {data!r}")
        known = {f.name for f in fields(cls)} - {"sources"}
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for key, entry in data.items():
            if key not in known:
                raise OpticalConfigError(
                    f"{where}: unknown key {key!r}; allowed keys: {sorted(known)}"
                )
            if isinstance(entry, Mapping):
                if "value" not in entry:
                    raise OpticalConfigError(f"{where}.{key}: a mapping needs 'value' (and 'source')")
                values[key] = entry["value"]
                sources[key] = str(entry.get("source", ""))
            else:
                values[key] = entry
        return cls(**values, sources=sources)

    def with_overrides(self, **overrides: Any) -> "HardwareProfile":
        """A copy with some constants replaced (validated like the YAML)."""
        known = {f.name for f in fields(self)} - {"sources"}
        for key in overrides:
            if key not in known:
                raise OpticalConfigError(f"hardware: unknown key {key!r}; allowed keys: {sorted(known)}")
        return replace(self, **overrides)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_positive(obj: Any, key: str, value: Any) -> None:
    if not _is_number(value) or value <= 0:
        raise OpticalConfigError(f"hardware.{key}: must be a number > 0, got {value!r}")


def load_hardware_profile(path: str | Path | None = None, **overrides: Any) -> HardwareProfile:
    """Read a hardware-profile YAML (default: the Optical Transformers profile) and apply overrides."""
    p = Path(path) if path is not None else DEFAULT_PROFILE_PATH
    if not p.is_file():
        raise OpticalConfigError(f"hardware profile: file {str(p)!r} does not exist")
    import yaml

    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise OpticalConfigError(f"hardware profile: {str(p)!r} does not parse: {e}") from e
    return HardwareProfile.from_dict(data or {}, where=f"{p}").with_overrides(**overrides)


def photon_energy_j(wavelength_m: float) -> float:
    """Energy of one photon, h*c/lambda, in joules."""
    if not _is_number(wavelength_m) or wavelength_m <= 0:
        raise OpticalConfigError(f"wavelength_m: must be a number > 0, got {wavelength_m!r}")
    return PLANCK_J_S * SPEED_OF_LIGHT_M_S / wavelength_m


def levels_to_bits(levels: int) -> int:
    """Converter resolution for `levels` quantization levels: ceil(log2(levels))."""
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise OpticalConfigError(f"levels: must be an integer >= 2, got {levels!r}")
    return max(1, math.ceil(math.log2(levels)))


def conversion_energy_j(fom_j_per_step: float | None, bits: int) -> float | None:
    """Walden scaling: energy of one conversion at `bits` = fom * 2**bits (None if fom unknown)."""
    return None if fom_j_per_step is None else fom_j_per_step * 2.0 ** bits


@dataclass(frozen=True)
class ModelDims:
    """Shape of a Llama model: what the MAC counts need."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    seq_len: int

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise OpticalConfigError(f"model.{f.name}: must be an integer >= 1, got {v!r}")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise OpticalConfigError(
                f"model: dim ({self.dim}) must divide by n_heads ({self.n_heads}) and n_heads by "
                f"n_kv_heads ({self.n_kv_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_titan_args(cls, args: Any, seq_len: int) -> "ModelDims":
        """From torchtitan Llama-3 model args (duck-typed: dim, n_layers, ..., multiple_of)."""
        hidden = int(2 * (4 * args.dim) / 3)
        if getattr(args, "ffn_dim_multiplier", None) is not None:
            hidden = int(args.ffn_dim_multiplier * hidden)
        hidden = args.multiple_of * ((hidden + args.multiple_of - 1) // args.multiple_of)
        n_kv = args.n_kv_heads if args.n_kv_heads is not None else args.n_heads
        return cls(args.dim, args.n_layers, args.n_heads, n_kv, hidden, args.vocab_size, seq_len)

    @classmethod
    def from_hf_config(cls, config: Any, seq_len: int) -> "ModelDims":
        """From a transformers LlamaConfig (duck-typed)."""
        n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.hidden_size, config.num_hidden_layers, config.num_attention_heads, n_kv,
                   config.intermediate_size, config.vocab_size, seq_len)


# Module names of one block, in torchtitan's and transformers' naming.
_NAMES = {
    "titan": {
        "attn_proj": ("attention.wq", "attention.wk", "attention.wv", "attention.wo"),
        "ffn": ("feed_forward.w1", "feed_forward.w3", "feed_forward.w2"),
        "attention": "attention", "prefix": "layers.{i}.", "output": "output",
    },
    "hf": {
        "attn_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
        "ffn": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        "attention": "self_attn", "prefix": "model.layers.{i}.", "output": "lm_head",
    },
}


@dataclass
class EnergyRow:
    """One kind of computation, per token: MACs and joules (None = not estimated)."""

    kind: str
    mode: str  # "optical" or "digital"
    modules: int = 0
    macs: float = 0.0
    optical_j: float = 0.0
    dac_j: float | None = 0.0
    adc_j: float | None = 0.0
    weight_load_j: float | None = 0.0
    digital_j: float = 0.0
    baseline_j: float = 0.0

    @property
    def total_j(self) -> float | None:
        parts = (self.optical_j, self.dac_j, self.adc_j, self.weight_load_j, self.digital_j)
        return None if any(p is None for p in parts) else sum(parts)

    def add(self, other: "EnergyRow") -> None:
        self.modules += other.modules
        for key in ("macs", "optical_j", "dac_j", "adc_j", "weight_load_j", "digital_j", "baseline_j"):
            a, b = getattr(self, key), getattr(other, key)
            setattr(self, key, None if a is None or b is None else a + b)


def _fmt(value: float | None, scale: float = 1e12) -> str:
    return "n/a" if value is None else f"{value * scale:.4g}"


@dataclass
class EnergyReport:
    """Energy per token by kind of computation; `to_markdown()` renders the table.

    Joules per token. `total_j` is None when a constant the estimate needs is unknown (see
    `missing`); `known_j` then sums what could be estimated (a lower bound).
    """

    rows: list[EnergyRow]
    dims: ModelDims
    profile: HardwareProfile
    photons_per_mac: float
    weight_reuse_tokens: int
    missing: list[str] = field(default_factory=list)

    @property
    def macs(self) -> float:
        return sum(r.macs for r in self.rows)

    @property
    def optical_macs(self) -> float:
        return sum(r.macs for r in self.rows if r.mode == "optical")

    @property
    def total_j(self) -> float | None:
        totals = [r.total_j for r in self.rows]
        return None if any(t is None for t in totals) else sum(totals)

    @property
    def known_j(self) -> float:
        return sum(
            (getattr(r, k) or 0.0)
            for r in self.rows
            for k in ("optical_j", "dac_j", "adc_j", "weight_load_j", "digital_j")
        )

    @property
    def baseline_j(self) -> float:
        return sum(r.baseline_j for r in self.rows)

    @property
    def advantage(self) -> float | None:
        """Digital baseline energy / optical-system energy (None when the total is unknown)."""
        total = self.total_j
        return None if not total else self.baseline_j / total

    def to_dict(self) -> dict[str, Any]:
        return {
            "per_token_j": {"total": self.total_j, "known_parts": self.known_j,
                            "digital_baseline": self.baseline_j},
            "macs_per_token": self.macs, "optical_macs_per_token": self.optical_macs,
            "advantage": self.advantage, "photons_per_mac": self.photons_per_mac,
            "weight_reuse_tokens": self.weight_reuse_tokens, "missing_constants": self.missing,
            "dims": asdict(self.dims), "profile": self.profile.name,
            "rows": [dict(asdict(r), total_j=r.total_j) for r in self.rows],
        }

    def to_markdown(self) -> str:
        """A Markdown table in picojoules per token, with a header line and notes."""
        d = self.dims
        lines = [
            f"Energy per token (pJ), profile `{self.profile.name}`: dim {d.dim}, {d.n_layers} "
            f"layers, {d.n_heads}/{d.n_kv_heads} heads, ffn {d.ffn_dim}, vocab {d.vocab_size}, "
            f"context {d.seq_len}; {self.photons_per_mac:g} photons/MAC, weights reused over "
            f"{self.weight_reuse_tokens} tokens; digital {self.profile.digital_j_per_mac * 1e15:g} fJ/MAC.",
            "",
            "| kind | mode | modules | MACs/token | optical | DAC | ADC | weight loads | digital "
            "| total | digital baseline |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.kind} | {r.mode} | {r.modules} | {r.macs:.4g} | {_fmt(r.optical_j)} | "
                f"{_fmt(r.dac_j)} | {_fmt(r.adc_j)} | {_fmt(r.weight_load_j)} | {_fmt(r.digital_j)} "
                f"| {_fmt(r.total_j)} | {_fmt(r.baseline_j)} |"
            )
        adv = self.advantage
        lines.append(
            f"| **total** | | | {self.macs:.4g} | | | | | | **{_fmt(self.total_j)}** | "
            f"**{_fmt(self.baseline_j)}** |"
        )
        lines.append("")
        lines.append(
            f"Optical share of MACs: {self.optical_macs / max(self.macs, 1):.1%}. "
            + (f"Digital baseline / optical system: {adv:.3g}x." if adv else
               f"Total not estimated: unknown constants {self.missing} (set them in the hardware "
               f"profile); the known parts sum to {_fmt(self.known_j)} pJ/token (a lower bound).")
        )
        return "\n".join(lines)


class _Costs:
    """Per-element costs for one quantizer config: resolves levels -> bits -> joules."""

    def __init__(self, profile: HardwareProfile, qcfg: QuantizerConfig, photons: float | None,
                 missing: list[str]):
        self.p, self.q, self.missing = profile, qcfg, missing
        n = photons if photons is not None else getattr(qcfg, "q_photons_per_mac", None)
        self.photons = float(n if n is not None else profile.photons_per_mac)
        eff = profile.laser_efficiency * profile.transmission * profile.detector_efficiency
        self.optical_per_mac = self.photons * photon_energy_j(profile.wavelength_m) / eff

    def bits(self, role: str) -> int:
        levels = getattr(self.q, f"q_levels_{role}", None) or self.q.q_levels
        return levels_to_bits(levels)

    def _conv(self, key: str, role: str, count: float) -> float | None:
        e = conversion_energy_j(getattr(self.p, key), self.bits(role))
        if e is None:
            self._miss(key)
            return None
        return count * e

    def dac(self, role: str, count: float) -> float | None:
        return self._conv("dac_fom_j_per_step", role, count)

    def adc(self, role: str, count: float) -> float | None:
        return self._conv("adc_fom_j_per_step", role, count)

    def load(self, role: str, count: float) -> float | None:
        """`count` weight elements written into the modulator: a DAC conversion plus the write."""
        dac = self.dac(role, count)
        if self.p.modulator_load_j is None:
            self._miss("modulator_load_j")
            return None
        return None if dac is None else dac + count * self.p.modulator_load_j

    def _miss(self, key: str) -> None:
        if key not in self.missing:
            self.missing.append(key)


def _sum(*parts: float | None) -> float | None:
    return None if any(p is None for p in parts) else sum(parts)


def _digital_row(kind: str, macs: float, modules: int, profile: HardwareProfile) -> EnergyRow:
    e = macs * profile.digital_j_per_mac
    return EnergyRow(kind, "digital", modules, macs, digital_j=e, baseline_j=e)


def _linear_row(kind: str, k: int, n: int, costs: _Costs | None, reuse: int,
                profile: HardwareProfile) -> EnergyRow:
    """One token through a K->N linear: optical when `costs` is given, else digital."""
    macs = float(k * n)
    if costs is None:
        return _digital_row(kind, macs, 1, profile)
    return EnergyRow(
        kind, "optical", 1, macs, optical_j=macs * costs.optical_per_mac,
        dac_j=costs.dac("input", k), adc_j=costs.adc("output", n),
        weight_load_j=_div(costs.load("weight", k * n), reuse),
        baseline_j=macs * profile.digital_j_per_mac,
    )


def _div(v: float | None, d: float) -> float | None:
    return None if v is None else v / d


def _attention_rows(d: ModelDims, costs: _Costs | None, profile: HardwareProfile) -> list[EnergyRow]:
    """One token's two attention matmuls in one layer, averaged over a causal sequence: a token
    sees m = (seq_len + 1) / 2 keys on average; each key and value vector is loaded into the
    modulator once per sequence (one per kv head per token on average)."""
    h, kv, hd = d.n_heads, d.n_kv_heads, d.head_dim
    m = (d.seq_len + 1) / 2
    macs = h * hd * m
    if costs is None:
        return [_digital_row("attention S = QK^T", macs, 1, profile),
                _digital_row("attention Y = PV", macs, 1, profile)]
    base = macs * profile.digital_j_per_mac
    optical = macs * costs.optical_per_mac
    s = EnergyRow("attention S = QK^T", "optical", 1, macs, optical_j=optical,
                  dac_j=costs.dac("q", h * hd), adc_j=costs.adc("s", h * m),
                  weight_load_j=costs.load("k", kv * hd), baseline_j=base)
    y = EnergyRow("attention Y = PV", "optical", 1, macs, optical_j=optical,
                  dac_j=costs.dac("p", h * m), adc_j=costs.adc("y", h * hd),
                  weight_load_j=costs.load("v", kv * hd), baseline_j=base)
    return [s, y]


def _optical_config(tcfg: TransformConfig | None, name: str) -> QuantizerConfig | None:
    """The settings that make `name` optical, or None when it stays (or computes) digital."""
    if tcfg is None:
        return None
    qcfg = tcfg.match(name)[1]
    return None if qcfg is None or qcfg.q_bypass else qcfg


def _elementwise_macs(d: ModelDims) -> float:
    """MAC-equivalents of the elementwise digital work per token: RMSNorms (2 per block + the
    final one, 2*dim each: squares and scale), softmax (one per attention score seen) and the
    SwiGLU product (ffn_dim per block). Embedding lookups count no MACs."""
    norms = (2 * d.n_layers + 1) * 2 * d.dim
    softmax = d.n_layers * d.n_heads * (d.seq_len + 1) / 2
    return float(norms + softmax + d.n_layers * d.ffn_dim)


def estimate_energy(
    dims: ModelDims,
    transform: TransformConfig | None,
    profile: HardwareProfile | None = None,
    photons_per_mac: float | None = None,
    naming: str = "titan",
) -> EnergyReport:
    """Energy per token of one forward pass of `dims` under `transform` on `profile`'s hardware.

    transform: which modules are optical and at which levels (None = the whole model digital).
        Module names are matched as torchtitan (`naming="titan"`: layers.N.attention.wq, output)
        or transformers (`naming="hf"`: model.layers.N.self_attn.q_proj, lm_head) names them.
    photons_per_mac: detected photons per MAC for every optical module; None = each module's
        `q_photons_per_mac` when the transform has that key, else `profile.photons_per_mac`.
    Returns rows per (kind, mode) summed over layers; unknown constants leave their columns None.
    """
    if naming not in _NAMES:
        raise OpticalConfigError(f"naming: must be one of {sorted(_NAMES)}, got {naming!r}")
    if photons_per_mac is not None and (not _is_number(photons_per_mac) or photons_per_mac <= 0):
        raise OpticalConfigError(f"photons_per_mac: must be a number > 0, got {photons_per_mac!r}")
    profile = profile or load_hardware_profile()
    names, missing = _NAMES[naming], []
    reuse = profile.weight_reuse_tokens or dims.seq_len
    rows: dict[tuple[str, str], EnergyRow] = {}

    def costs(name: str) -> _Costs | None:
        qcfg = _optical_config(transform, name)
        return None if qcfg is None else _Costs(profile, qcfg, photons_per_mac, missing)

    def add(row: EnergyRow) -> None:
        key = (row.kind, row.mode)
        if key in rows:
            rows[key].add(row)
        else:
            rows[key] = row

    kvd = dims.n_kv_heads * dims.head_dim
    proj_shapes = ((dims.dim, dims.dim), (dims.dim, kvd), (dims.dim, kvd), (dims.dim, dims.dim))
    ffn_shapes = ((dims.dim, dims.ffn_dim), (dims.dim, dims.ffn_dim), (dims.ffn_dim, dims.dim))
    for i in range(dims.n_layers):
        prefix = names["prefix"].format(i=i)
        for leaf, (k, n) in zip(names["attn_proj"], proj_shapes):
            add(_linear_row("attention projections", k, n, costs(prefix + leaf), reuse, profile))
        for leaf, (k, n) in zip(names["ffn"], ffn_shapes):
            add(_linear_row("feed-forward", k, n, costs(prefix + leaf), reuse, profile))
        for row in _attention_rows(dims, costs(prefix + names["attention"]), profile):
            add(row)
    add(_linear_row("output head", dims.dim, dims.vocab_size, costs(names["output"]), reuse, profile))
    add(_digital_row("embeddings (lookup)", 0.0, 1, profile))
    add(_digital_row("norms, softmax, SwiGLU (MAC-eq.)", _elementwise_macs(dims), 0, profile))
    photons = photons_per_mac if photons_per_mac is not None else _typical_photons(transform, profile)
    return EnergyReport(list(rows.values()), dims, profile, photons, reuse, missing)


def _typical_photons(transform: TransformConfig | None, profile: HardwareProfile) -> float:
    """The photons per MAC to print in the header: the first optical rule's, else the profile's."""
    for qcfg in ([transform.default] + [q for _, q in transform.rules]) if transform else []:
        n = getattr(qcfg, "q_photons_per_mac", None) if qcfg is not None else None
        if n is not None:
            return float(n)
    return profile.photons_per_mac


def energy_markdown(
    model_args: Any,
    transform: TransformConfig | None,
    seq_len: int,
    *,
    profile: HardwareProfile | str | Path | None = None,
    photons_per_mac: float | None = None,
    naming: str = "titan",
) -> str:
    """The energy table for a model card: Markdown with a heading line and the table.

    model_args: torchtitan Llama args (`dim`, `n_layers`, ..., `multiple_of`) or a transformers
        LlamaConfig (`hidden_size`, ...); transform: the run's TransformConfig (None = digital),
        named as `naming` says; profile: a HardwareProfile, a YAML path, or None (default profile).
    """
    if hasattr(model_args, "hidden_size"):
        dims = ModelDims.from_hf_config(model_args, seq_len)
    else:
        dims = ModelDims.from_titan_args(model_args, seq_len)
    if not isinstance(profile, HardwareProfile):
        profile = load_hardware_profile(profile)
    report = estimate_energy(dims, transform, profile, photons_per_mac, naming)
    return "## Energy per token (estimate)\n\n" + report.to_markdown() + (
        "\n\nModel, assumptions and sources: docs/energy.md of torchtitan-optical."
    )
