"""The transform swaps exactly the matched modules of a torchtitan Llama (on the meta device)."""

import copy

import pytest
import torch
from torch import nn

from torchtitan_ext.optical.config import DEFAULT_TRANSFORM_CONFIG, OpticalConfigError, TransformConfig
from torchtitan_ext.optical.modules import OpticalAttention, OpticalLinear
from torchtitan_ext.optical.transform import candidate_modules, format_histogram, transform_model


def debug_llama():
    from torchtitan.models.llama3 import Transformer

    from torchtitan_ext.titan.spec import optical_llama3_args

    with torch.device("meta"):
        return Transformer(copy.deepcopy(optical_llama3_args["debugmodel"]))


def test_default_config_swaps_block_linears_and_attention_only():
    model = debug_llama()
    n_layers = len(model.layers)
    report = transform_model(model, TransformConfig.from_dict(DEFAULT_TRANSFORM_CONFIG))
    optical_lin = [n for n, m in model.named_modules() if isinstance(m, OpticalLinear)]
    optical_att = [n for n, m in model.named_modules() if isinstance(m, OpticalAttention)]
    assert len(optical_lin) == 7 * n_layers
    assert optical_att == [f"layers.{i}.attention.inner_attention" for i in range(n_layers)]
    assert type(model.output) is nn.Linear  # digital head
    assert report.count == 8 * n_layers
    assert report.digital == ["output"]
    text = format_histogram(report)
    assert f"[{7 * n_layers:4d}]" in text and "layers.0.attention.wq" in text
    # Parameters kept on the meta device, buffers created there too.
    assert model.layers["0"].attention.wq.optical_ranges.is_meta


def test_only_matched_modules_change():
    model = debug_llama()
    cfg = TransformConfig.from_dict({"layer_name_to_config": {
        r"layers\.1\.feed_forward\.w2": {"q_levels": 16},
        r"layers\.0\.attention": {},
    }})
    report = transform_model(model, cfg)
    assert report.names() == ["layers.0.attention", "layers.1.feed_forward.w2"]
    assert isinstance(model.layers["1"].feed_forward.w2, OpticalLinear)
    assert model.layers["1"].feed_forward.w2.config.q_levels == 16
    assert type(model.layers["1"].feed_forward.w1) is nn.Linear
    assert isinstance(model.layers["0"].attention.inner_attention, OpticalAttention)
    assert not isinstance(model.layers["1"].attention.inner_attention, OpticalAttention)
    assert type(model.layers["0"].attention.wq) is nn.Linear


def test_first_matching_pattern_wins_and_null_keeps_digital():
    model = debug_llama()
    cfg = TransformConfig.from_dict({"layer_name_to_config": {
        r"layers\.0\.attention\.wq": None,
        r"layers\.[0-9]+\.attention\.(wq|wk)": {"q_levels": 8},
    }})
    transform_model(model, cfg)
    assert type(model.layers["0"].attention.wq) is nn.Linear
    assert isinstance(model.layers["1"].attention.wq, OpticalLinear)


def test_unmatched_pattern_fails_before_changing_anything():
    model = debug_llama()
    cfg = TransformConfig.from_dict({"layer_name_to_config": {
        r"layers\.0\.attention\.wq": {}, r"model\.layers\.[0-9]+\.mlp": {}}})
    with pytest.raises(OpticalConfigError, match=r"model\\.layers"):
        transform_model(model, cfg)
    assert type(model.layers["0"].attention.wq) is nn.Linear


def test_candidates_name_linears_and_attention_blocks():
    names = list(candidate_modules(debug_llama()))
    assert "layers.0.attention" in names and "layers.0.feed_forward.w3" in names
    assert "output" in names and "layers.0" not in names


@pytest.mark.slow
def test_transformed_llama_block_compiles_with_inductor_fullgraph():
    """torch.compile(fullgraph=True) with inductor through a whole optical block (CPU): the fake
    implementations must agree with the real ops, strides included."""
    from torchtitan.models.llama3 import Transformer

    from torchtitan_ext.optical.ranges import update_ranges
    from torchtitan_ext.titan.spec import optical_llama3_args

    torch._dynamo.reset()
    args = copy.deepcopy(optical_llama3_args["debugmodel"])
    args.n_layers, args.max_seq_len = 1, 64
    torch.manual_seed(0)
    model = Transformer(args)
    with torch.no_grad():
        model.init_weights()
    transform_model(model, TransformConfig.from_dict(DEFAULT_TRANSFORM_CONFIG))
    tokens = torch.randint(0, 8192, (2, 64))
    model(tokens).sum().backward()
    update_ranges(model)
    block = model.layers["0"]
    h = model.tok_embeddings(tokens).detach().requires_grad_(True)
    out = torch.compile(block, fullgraph=True)(h, model.freqs_cis, None)
    torch.manual_seed(1)
    out.sum().backward()
    assert torch.isfinite(h.grad).all()
    # The compiled block computes what the eager block computes, noise included, once inductor
    # draws the seeds as eager does (by default it has its own generator for random ops).
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    torch.manual_seed(2)
    eager = block(h, model.freqs_cis, None)
    with inductor_config.patch(fallback_random=True):
        torch.manual_seed(2)
        compiled = torch.compile(block, fullgraph=True)(h, model.freqs_cis, None)
    assert torch.allclose(eager, compiled, atol=1e-4, rtol=1e-4)


def test_quantile_ranges_on_attention_are_refused_by_name():
    model = debug_llama()
    cfg = TransformConfig.from_dict({"layer_name_to_config": {
        r"layers\.0\.attention": {"q_quantiles": [0.01, 0.99]}}})
    with pytest.raises(OpticalConfigError, match=r"q_quantiles.*layers\.0\.attention"):
        transform_model(model, cfg)


@pytest.mark.parametrize("pattern, key, kind", [
    (r"layers\.0\.attention", "q_levels_input", "attention"),
    (r"layers\.0\.attention", "q_levels_output", "attention"),
    (r"layers\.[0-9]+\.attention\.wq", "q_levels_s", "linear"),
    (r"layers\.[0-9]+\.(attention|feed_forward\.w1)", "q_levels_y", "linear"),
])
def test_level_key_of_the_other_module_kind_is_refused(pattern, key, kind):
    model = debug_llama()
    cfg = TransformConfig.from_dict({"layer_name_to_config": {pattern: {key: 16}}})
    with pytest.raises(OpticalConfigError) as e:
        transform_model(model, cfg)
    msg = str(e.value)
    assert pattern in msg and key in msg and f"{kind} module" in msg
    # nothing was swapped
    assert type(model.layers["0"].attention.wq) is nn.Linear
    assert not isinstance(getattr(model.layers["0"].attention, "sdpa", None), OpticalAttention)


def test_level_keys_of_the_right_kind_reach_the_modules():
    model = debug_llama()
    cfg = TransformConfig.from_dict({"layer_name_to_config": {
        r"layers\.[0-9]+\.attention\.(wq|wk|wv|wo)": {"q_levels_output": 16},
        r"layers\.[0-9]+\.attention": {"q_levels_s": 32, "q_readout": "shot",
                                       "q_photons_per_mac": 4}}})
    transform_model(model, cfg)
    assert model.layers["0"].attention.wq.config.linear_levels == (256, 256, 16)
    attn = [m for m in model.modules() if isinstance(m, OpticalAttention)][0]
    assert attn.config.attention_levels == (256, 256, 32, 256, 256, 256)
    assert attn.config.photons == 4.0
