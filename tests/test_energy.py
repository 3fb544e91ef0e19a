"""Energy model (torchtitan_ext/optical/energy.py): counts, scaling laws, cited constants, errors."""

import math
from types import SimpleNamespace

import pytest

from torchtitan_ext.optical.config import (
    DEFAULT_TRANSFORM_CONFIG,
    OpticalConfigError,
    QuantizerConfig,
    TransformConfig,
)
from torchtitan_ext.optical.energy import (
    HardwareProfile,
    ModelDims,
    _Costs,
    conversion_energy_j,
    estimate_energy,
    levels_to_bits,
    load_hardware_profile,
    photon_energy_j,
)

DEFAULT = TransformConfig.from_dict(DEFAULT_TRANSFORM_CONFIG)
KNOWN = dict(adc_fom_j_per_step=2e-15, dac_fom_j_per_step=1e-15, modulator_load_j=1e-15)


def test_photon_energy_reproduces_wang_2022_abstract():
    # Wang et al., Nat. Commun. 13, 123 (2022), abstract: "~0.64 photons (~2.4e-19 J of optical
    # energy) per weight multiplication" -- two significant figures, green light (532 nm).
    assert f"{0.64 * photon_energy_j(532e-9):.1e}" == "2.4e-19"
    # and a wrong wavelength does not: 1550 nm gives 8.2e-20 J.
    assert f"{0.64 * photon_energy_j(1550e-9):.1e}" == "8.2e-20"


def test_default_profile_cites_the_papers_digital_baseline():
    p = load_hardware_profile()
    assert p.digital_j_per_mac == pytest.approx(300e-15)  # Optical Transformers, abstract
    assert "2302.10360" in p.sources["digital_j_per_mac"]
    for key in ("adc_fom_j_per_step", "dac_fom_j_per_step", "modulator_load_j"):
        assert getattr(p, key) is None and "NOT FOUND" in p.sources[key]


def test_mac_counts_by_kind():
    d = ModelDims(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=100, seq_len=7)
    r = estimate_energy(d, DEFAULT, HardwareProfile(**KNOWN))
    rows = {row.kind: row for row in r.rows}
    assert rows["attention projections"].macs == 2 * (64 * 64 * 2 + 64 * 32 * 2)
    assert rows["feed-forward"].macs == 2 * 3 * 64 * 96
    assert rows["attention S = QK^T"].macs == 2 * 4 * 16 * 4  # mean keys seen (7+1)/2 = 4
    assert rows["output head"].macs == 64 * 100 and rows["output head"].mode == "digital"
    assert rows["attention projections"].modules == 8


def test_linear_energy_by_hand():
    d = ModelDims(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16, vocab_size=10, seq_len=4)
    tc = TransformConfig.from_dict({"layer_name_to_config": {
        "layers.0.feed_forward.w2": {"q_levels": 16}}})
    p = HardwareProfile(wavelength_m=1e-6, weight_reuse_tokens=2, **KNOWN)
    row = next(r for r in estimate_energy(d, tc, p, photons_per_mac=5).rows
               if r.kind == "feed-forward" and r.mode == "optical")
    assert row.modules == 1 and row.macs == 16 * 8
    assert row.optical_j == pytest.approx(128 * 5 * 6.62607015e-34 * 299792458 / 1e-6)
    assert row.dac_j == pytest.approx(16 * 1e-15 * 2**4)  # 16 inputs at 4 bits
    assert row.adc_j == pytest.approx(8 * 2e-15 * 2**4)
    assert row.weight_load_j == pytest.approx(128 * (1e-15 * 16 + 1e-15) / 2)


def test_per_mac_energy_scales_as_one_over_d():
    # The paper's scaling law (abstract): optical energy per MAC ~ 1/d, when the photons per
    # output (photons per MAC x d) stay fixed; conversions are amortised over d as well.
    per_mac = []
    for dim in (256, 512, 1024):
        d = ModelDims(dim, 1, 4, 4, dim, 10, 1)
        p = HardwareProfile(**KNOWN, weight_reuse_tokens=10**9)
        r = estimate_energy(d, DEFAULT, p, photons_per_mac=1000 / dim)
        row = next(x for x in r.rows if x.kind == "attention projections")
        per_mac.append((row.optical_j / row.macs, (row.dac_j + row.adc_j) / row.macs))
    for (o1, e1), (o2, e2) in zip(per_mac, per_mac[1:]):
        assert o2 == pytest.approx(o1 / 2)
        assert e2 == pytest.approx(e1 / 2)


def test_digital_model_equals_baseline_and_missing_constants_say_so():
    d = ModelDims(64, 2, 4, 2, 96, 100, 16)
    digital = estimate_energy(d, None, HardwareProfile())
    assert digital.total_j == pytest.approx(digital.baseline_j) and digital.advantage == 1
    unknown = estimate_energy(d, DEFAULT, HardwareProfile())
    assert unknown.total_j is None and "adc_fom_j_per_step" in unknown.missing
    md = unknown.to_markdown()
    assert "n/a" in md and "lower bound" in md
    known = estimate_energy(d, DEFAULT, HardwareProfile(**KNOWN))
    assert known.total_j < known.baseline_j and "| **total** |" in known.to_markdown()


def test_levels_bits_and_walden_scaling():
    assert [levels_to_bits(v) for v in (2, 255, 256, 257)] == [1, 8, 8, 9]
    assert conversion_energy_j(1e-15, 9) == pytest.approx(2 * conversion_energy_j(1e-15, 8))
    assert conversion_energy_j(None, 8) is None
    costs = _Costs(HardwareProfile(**KNOWN), SimpleNamespace(q_levels=256, q_levels_output=16), None, [])
    assert costs.bits("output") == 4 and costs.bits("input") == 8  # per-quantizer key wins


def test_photons_from_the_transform_when_it_has_the_key():
    q = SimpleNamespace(q_levels=256, q_photons_per_mac=7.0)
    assert _Costs(HardwareProfile(), q, None, []).photons == 7.0
    assert _Costs(HardwareProfile(), q, 2.0, []).photons == 2.0
    assert _Costs(HardwareProfile(), QuantizerConfig(), None, []).photons == 3.2


def test_errors_name_the_key(tmp_path):
    with pytest.raises(OpticalConfigError, match="detector_efficiency"):
        HardwareProfile(detector_efficiency=1.5)
    bad = tmp_path / "hw.yaml"
    bad.write_text("wavelenght_m: 1e-6\n")
    with pytest.raises(OpticalConfigError, match="unknown key 'wavelenght_m'.*allowed"):
        load_hardware_profile(bad)
    with pytest.raises(OpticalConfigError, match="naming"):
        estimate_energy(ModelDims(8, 1, 2, 1, 8, 8, 2), None, HardwareProfile(), naming="x")
    with pytest.raises(OpticalConfigError, match="n_heads"):
        ModelDims(10, 1, 3, 1, 8, 8, 2)


def test_hf_naming_selects_the_same_modules():
    d = ModelDims(64, 2, 4, 2, 96, 100, 16)
    hf = TransformConfig.from_dict({"layer_name_to_config": {
        r"model\.layers\.[0-9]+\.self_attn\.(q|k|v|o)_proj|model\.layers\.[0-9]+\.mlp\.\w+_proj": {},
        r"model\.layers\.[0-9]+\.self_attn": {}, "lm_head": None}})
    a = estimate_energy(d, DEFAULT, HardwareProfile(**KNOWN)).to_dict()
    b = estimate_energy(d, hf, HardwareProfile(**KNOWN), naming="hf").to_dict()
    assert a["per_token_j"] == b["per_token_j"] and math.isfinite(a["advantage"])
