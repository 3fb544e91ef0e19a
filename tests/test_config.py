"""Transform-config loading and validation: every bad input names its key or pattern."""

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from torchtitan_ext.optical.config import (
    OpticalConfigError,
    QuantizerConfig,
    TransformConfig,
    load_transform_config,
)

SEED_YAML = textwrap.dedent(r"""
    use_regex: true
    layer_name_to_config:
      default: null
      'layers\.[0-9]+\.attention\.(wq|wk|wv|wo)|layers\.[0-9]+\.feed_forward\.(w1|w2|w3)': {q_levels: 256, q_lut_min: 0.02004, q_quantiles: null, q_smooth_factor: 0.9, q_init_seed: 0, q_bypass: false}
      'layers\.[0-9]+\.attention': {q_levels: 256, q_lut_min: 0.02004, q_quantiles: null, q_smooth_factor: 0.9, q_init_seed: 0, q_bypass: false}
      output: null
""")

ENTRY = "{q_levels: 256, q_lut_min: 0.02004, q_quantiles: null, q_smooth_factor: 0.9, q_init_seed: 0, q_bypass: false}"


def write(tmp_path, text, name="t.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_seed_format_loads_unchanged(tmp_path):
    cfg = load_transform_config(write(tmp_path, SEED_YAML))
    assert cfg.use_regex and cfg.default is None
    assert [p for p, _ in cfg.rules][-1] == "output"
    pat, q = cfg.match("layers.3.feed_forward.w2")
    assert q == QuantizerConfig(q_levels=256, q_lut_min=0.02004, q_smooth_factor=0.9)
    assert cfg.match("layers.3.attention")[1] is not None
    assert cfg.match("output") == ("output", None)
    assert cfg.match("tok_embeddings") == ("default", None)
    # fullmatch, not search: a prefix match is not a match
    assert cfg.match("layers.3.attention.wq.extra") == ("default", None)


def test_shipped_transform_files_load():
    from pathlib import Path

    files = sorted(Path("train_configs/transforms").glob("*.yaml"))
    assert files
    for f in files:
        load_transform_config(f)


@pytest.mark.parametrize(
    "entry, needle",
    [
        ("{q_levels: 1}", "q_levels"),
        ("{q_levels: 2.5}", "q_levels"),
        ("{q_levels: true}", "q_levels"),
        ("{q_lut_min: 1.0}", "q_lut_min"),
        ("{q_lut_min: -0.1}", "q_lut_min"),
        ("{q_quantiles: [0.9, 0.1]}", "q_quantiles"),
        ("{q_quantiles: [0.0, 0.5]}", "q_quantiles"),
        ("{q_quantiles: [0.1]}", "q_quantiles"),
        ("{q_smooth_factor: 1.0}", "q_smooth_factor"),
        ("{q_smooth_factor: -0.5}", "q_smooth_factor"),
        ("{q_init_seed: -1}", "q_init_seed"),
        ("{q_bypass: 3}", "q_bypass"),
        ("{q_grad: sign}", "q_grad"),
        ("{q_noise: 1}", "q_noise"),
        ("{q_noise: 'off'}", "q_noise"),
        ("{q_levelz: 8}", "q_levelz"),
    ],
)
def test_bad_values_name_the_key(tmp_path, entry, needle):
    text = f"use_regex: true\nlayer_name_to_config:\n  'layers\\.0\\.attention': {entry}\n"
    with pytest.raises(OpticalConfigError) as e:
        load_transform_config(write(tmp_path, text))
    assert needle in str(e.value)
    assert "layers" in str(e.value)  # and where


def test_q_noise_key(tmp_path):
    text = "layer_name_to_config:\n  a: {q_noise: false}\n  b: {}\n"
    cfg = load_transform_config(write(tmp_path, text))
    assert cfg.match("a")[1].q_noise is False and cfg.match("b")[1].q_noise is True
    assert cfg.to_dict()["layer_name_to_config"]["a"]["q_noise"] is False
    with pytest.raises(OpticalConfigError, match=r"q_noise: must be true or false"):
        load_transform_config(
            write(tmp_path, "layer_name_to_config:\n  x: {q_noise: yes please}\n"))


def test_allowed_values_are_spelled_out(tmp_path):
    with pytest.raises(OpticalConfigError, match=r"2 <= q_levels"):
        load_transform_config(write(tmp_path, "layer_name_to_config:\n  x: {q_levels: 0}\n"))
    with pytest.raises(OpticalConfigError, match=r"allowed keys: \[.*q_levels"):
        load_transform_config(write(tmp_path, "layer_name_to_config:\n  x: {bits: 8}\n"))


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(OpticalConfigError, match="does not exist"):
        load_transform_config(tmp_path / "nope.yaml")
    with pytest.raises(OpticalConfigError, match="does not parse"):
        load_transform_config(write(tmp_path, "use_regex: [true\nlayer: {"))
    with pytest.raises(OpticalConfigError, match="extension"):
        load_transform_config(write(tmp_path, "x", name="t.ini"))
    with pytest.raises(OpticalConfigError, match="unknown top-level key 'layers'"):
        load_transform_config(write(tmp_path, "layers: {}\n"))
    with pytest.raises(OpticalConfigError, match="not a valid regular expression"):
        load_transform_config(write(tmp_path, "layer_name_to_config:\n  'layers\\.(': null\n"))


def test_toml_and_json_formats(tmp_path):
    toml = 'use_regex = true\n[layer_name_to_config]\n"layers\\\\.[0-9]+\\\\.attention" = {q_levels = 16}\n'
    cfg = load_transform_config(write(tmp_path, toml, "t.toml"))
    assert cfg.match("layers.1.attention")[1].q_levels == 16
    cfg = load_transform_config(write(tmp_path, '{"layer_name_to_config": {"a": {"q_levels": 4}}}', "t.json"))
    assert cfg.match("a")[1].q_levels == 4


def test_pattern_matching_no_module_names_it_and_shows_real_names():
    cfg = TransformConfig.from_dict({"layer_name_to_config": {r"blocks\.[0-9]+\.mlp": {}}})
    with pytest.raises(OpticalConfigError) as e:
        cfg.check_patterns(["layers.0.attention.wq", "layers.0.feed_forward.w1", "output"])
    msg = str(e.value)
    assert r"blocks\.[0-9]+\.mlp" in msg and "layers.0.attention.wq" in msg


def test_exact_names_without_regex():
    cfg = TransformConfig.from_dict({"use_regex": False, "layer_name_to_config": {"a.b": {}, "default": None}})
    assert cfg.match("a.b")[1] is not None
    assert cfg.match("a.bb") == ("default", None)


def test_round_trip_to_dict():
    cfg = TransformConfig.from_dict({"layer_name_to_config": {"default": {"q_levels": 8},
                                                              "x": {"q_quantiles": [0.01, 0.99]}}})
    again = TransformConfig.from_dict(cfg.to_dict())
    assert again.rules == cfg.rules and again.default == cfg.default


@pytest.mark.parametrize("toml", sorted(Path("train_configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_train_config_passes_preflight(toml):
    """Each committed job file parses in torchtitan's config manager with the [optical] section
    and passes run.py's checks (the whole transform on the meta device)."""
    import torchtitan_ext.titan  # noqa: F401  (registers the spec, converter, datasets)
    from torchtitan.config import ConfigManager

    from torchtitan_ext.titan.launch import preflight, with_custom_config

    config = ConfigManager().parse_args(with_custom_config(["--job.config_file", str(toml)]))
    if config.optical.cuda_graphs and not torch.cuda.is_available():
        # A single-GPU job file (the 60M twins): refused on a machine without CUDA, naming the
        # key and the switch; the rest is checked with the switch given.
        with pytest.raises(OpticalConfigError, match=r"optical.cuda_graphs: needs a CUDA GPU.*"
                           r"--optical.no-cuda_graphs"):
            preflight(config)
        config = ConfigManager().parse_args(with_custom_config(
            ["--job.config_file", str(toml), "--optical.no-cuda_graphs"]))
    preflight(config)
    optical = "optical_transformer" in config.model.converters
    assert optical == toml.name.startswith(("optical_", "debug_model.toml"))
    if toml.name.startswith("optical_"):
        assert config.optical.quant_warmup_steps == 100  # the recipe (docs/results.md)


@pytest.mark.parametrize("toml", sorted(Path("train_configs").glob("optical_*.toml")),
                         ids=lambda p: p.name)
def test_shipped_twins_run_the_same_way(toml):
    """An optical job file and its digital twin differ only in the converter and the optical
    recipe's keys: the same CUDA-graph and checkpointing choices, so their A/B measures the
    optics (bench/train.py)."""
    import tomllib

    twin = toml.with_name(toml.name.replace("optical_", "digital_"))
    a, b = (tomllib.loads(p.read_text()) for p in (toml, twin))
    assert a["optical"].get("cuda_graphs", False) == b["optical"].get("cuda_graphs", False)
    assert a.get("activation_checkpoint") == b.get("activation_checkpoint")
    assert a.get("compile") == b.get("compile") and a.get("training") == b.get("training")


def test_warmup_switches_optical_modules_only(caplog):
    """The warm-up switch of `quant_warmup_steps` (fast, no training): an optical model is
    digital up to step N and optical from N+1, with one log line each time it switches; a
    model without optical modules (a digital twin) switches nothing and logs nothing."""
    import logging
    from types import SimpleNamespace

    from torch import nn

    from torchtitan_ext.optical.modules import OpticalLinear
    from torchtitan_ext.titan.launch import _apply_quant_warmup

    optical = SimpleNamespace(quant_warmup_steps=2)
    linear = OpticalLinear(4, 4)
    twin = SimpleNamespace(step=1, model_parts=[nn.Sequential(nn.Linear(4, 4))])
    trainer = SimpleNamespace(step=1, model_parts=[nn.Sequential(linear)])
    with caplog.at_level(logging.INFO):
        for step in (1, 2, 3, 4):
            twin.step = trainer.step = step
            _apply_quant_warmup(twin, optical)
            _apply_quant_warmup(trainer, optical)
            assert linear.optical_enabled == (step > 2)
    switches = [r.getMessage() for r in caplog.records if "optical simulation" in r.getMessage()]
    assert switches == ["optical simulation off (digital warm-up) from step 1",
                        "optical simulation on from step 3"], switches
    assert not hasattr(twin, "_optical_enabled")


# --- issue 16: per-quantizer levels and the shot read-out -------------------------------------
LEVEL_KEYS = ["q_levels_input", "q_levels_weight", "q_levels_output", "q_levels_q", "q_levels_k",
              "q_levels_s", "q_levels_p", "q_levels_v", "q_levels_y"]


@pytest.mark.parametrize("key", LEVEL_KEYS)
@pytest.mark.parametrize("value", ["1", "2.5", "true", "'8'", str(2**23)])
def test_bad_per_quantizer_levels_name_the_key(tmp_path, key, value):
    text = f"layer_name_to_config:\n  x: {{{key}: {value}}}\n"
    with pytest.raises(OpticalConfigError) as e:
        load_transform_config(write(tmp_path, text))
    assert f"{key}: must be an integer with 2 <= {key}" in str(e.value)
    assert "layer_name_to_config['x']" in str(e.value)


@pytest.mark.parametrize(
    "entry, needle",
    [
        ("{q_readout: photon}", r"q_readout: must be one of \['rounding', 'shot'\]"),
        ("{q_readout: 1}", "q_readout: must be one of"),
        ("{q_readout: shot}", "q_photons_per_mac: required with q_readout 'shot'"),
        ("{q_readout: shot, q_photons_per_mac: 0}",
         "q_photons_per_mac: must be a finite number > 0"),
        ("{q_readout: shot, q_photons_per_mac: -3}", "q_photons_per_mac: must be a finite number"),
        ("{q_readout: shot, q_photons_per_mac: true}", "q_photons_per_mac: must be a finite"),
        ("{q_readout: shot, q_photons_per_mac: '10'}", "q_photons_per_mac: must be a finite"),
        ("{q_readout: shot, q_photons_per_mac: .inf}", "q_photons_per_mac: must be a finite"),
        ("{q_photons_per_mac: 10}", "q_photons_per_mac: only allowed with q_readout 'shot'"),
        ("{q_readout: rounding, q_photons_per_mac: 10}", "only allowed with q_readout 'shot'"),
    ],
)
def test_bad_readout_keys(tmp_path, entry, needle):
    text = f"layer_name_to_config:\n  'layers\\.0\\.attention': {entry}\n"
    with pytest.raises(OpticalConfigError, match=needle) as e:
        load_transform_config(write(tmp_path, text))
    assert "layers" in str(e.value)


def test_new_keys_defaults_and_resolution(tmp_path):
    text = textwrap.dedent("""\
        layer_name_to_config:
          a: {q_levels: 64, q_levels_output: 16}
          b: {q_levels_p: 1024, q_levels_y: 32, q_readout: shot, q_photons_per_mac: 2.5}
          c: {}
    """)
    cfg = load_transform_config(write(tmp_path, text))
    a, b, c = (cfg.match(n)[1] for n in "abc")
    assert a.linear_levels == (64, 64, 16) and a.attention_levels == (64,) * 6
    assert b.attention_levels == (256, 256, 256, 1024, 256, 32)
    assert b.photons == 2.5 and isinstance(b.q_photons_per_mac, float) and b.q_readout == "shot"
    assert c == QuantizerConfig() and c.photons == 0.0 and c.q_readout == "rounding"
    assert c.linear_levels == (256, 256, 256) and c.attention_levels == (256,) * 6
    # to_dict round-trips
    again = TransformConfig.from_dict(cfg.to_dict())
    assert [q for _, q in again.rules] == [q for _, q in cfg.rules]


def test_seed_format_defaults_unchanged(tmp_path):
    cfg = load_transform_config(write(tmp_path, SEED_YAML))
    q = cfg.match("layers.0.attention")[1]
    assert q.q_readout == "rounding" and q.q_photons_per_mac is None and q.photons == 0.0
    assert all(getattr(q, k) is None for k in LEVEL_KEYS)


def test_compile_cache_folder_is_named_after_the_op_schemas(monkeypatch):
    """run.py keeps Inductor's cache apart per optical-op schema (a graph cached by a tree whose
    op had other arguments failed at its first call in another); a folder the user set wins."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from torchtitan_ext.optical import ops
    from torchtitan_ext.titan.launch import separate_compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # restored (or removed) after the test
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    folder = separate_compile_cache()
    assert folder == str(Path(default_cache_dir()) / f"optical-ops-{ops.schema_fingerprint()}")
    fingerprint = ops.schema_fingerprint()
    monkeypatch.setattr(ops, "_SCHEMAS", [*ops._SCHEMAS, "linear2(Tensor x) -> Tensor"])
    assert ops.schema_fingerprint() != fingerprint
    # Inductor writes its default into the variable when first asked (cpu_compat's imports
    # did so before this ran, and the op was compiled into the shared folder again: stop 18).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert separate_compile_cache() == str(
        Path(default_cache_dir()) / f"optical-ops-{ops.schema_fingerprint()}")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    assert separate_compile_cache() == "/somewhere/else"
