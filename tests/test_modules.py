"""Modules, ops and range bookkeeping on the CPU (reference path)."""

import math

import pytest
import torch
from torch import nn

from torchtitan_ext.optical import ops
from torchtitan_ext.optical import reference as R
from torchtitan_ext.optical.config import QuantizerConfig
from torchtitan_ext.optical.modules import OpticalAttention, OpticalLinear
from torchtitan_ext.optical.ranges import optical_modules, reset_ranges, update_ranges


def calibrated_linear(cfg=QuantizerConfig(), bias=True, seed=0):
    torch.manual_seed(seed)
    lin = OpticalLinear(12, 6, bias=bias, config=cfg)
    x = torch.randn(3, 5, 12)
    lin(x)
    update_ranges(lin)
    return lin, x


def test_linear_matches_reference_composition_with_the_drawn_seed():
    lin, x = calibrated_linear(QuantizerConfig(q_levels=16, q_lut_min=0.05))
    lin.eval()
    gen_state = torch.get_rng_state()
    y = lin(x)
    torch.set_rng_state(gen_state)
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
    xr, wr, outr = lin.optical_ranges
    x2 = x.reshape(-1, 12)
    acc = R.quantize(x2, xr, 16).float() @ R.quantize(lin.weight, wr, 16, lut=0.05).float().t()
    u = R.philox_uniform(seed[0], 0, torch.arange(15 * 6).view(15, 6))
    expect = R.quantize(acc, outr, 16, noise=u) + lin.bias
    assert torch.equal(y.reshape(15, 6), expect)


def test_first_forward_is_digital_then_ranges_take_effect_after_update():
    torch.manual_seed(0)
    lin = OpticalLinear(12, 6, config=QuantizerConfig(q_levels=4))
    x = torch.randn(8, 12)
    y0 = lin(x)
    assert torch.allclose(y0, nn.functional.linear(x, lin.weight, lin.bias), atol=1e-6)
    assert torch.isinf(lin.optical_ranges).all()  # not yet applied
    assert torch.equal(lin.optical_observed[0], torch.stack([x.min(), x.max()]))
    update_ranges(lin)
    assert torch.isfinite(lin.optical_ranges).all()
    assert torch.isinf(lin.optical_observed).all()  # pending observations consumed
    y1 = lin(x)
    assert not torch.allclose(y1, y0, atol=1e-3)  # 4 levels: visibly quantized


def test_eval_freezes_ranges_and_ema_moves_them():
    lin, x = calibrated_linear()
    before = lin.optical_ranges.clone()
    lin.eval()
    lin(x * 10)
    update_ranges(lin)
    assert torch.equal(lin.optical_ranges, before)
    lin.train()
    lin(x * 10)
    update_ranges(lin)
    xr = lin.optical_ranges[0]
    expect_hi = 0.9 * before[0, 1] + 0.1 * (x * 10).max()
    assert torch.isclose(xr[1], expect_hi)


def test_state_dict_carries_ranges_not_pending_observations():
    lin, _ = calibrated_linear()
    sd = lin.state_dict()
    assert "optical_ranges" in sd and "optical_observed" not in sd
    fresh = OpticalLinear(12, 6)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.optical_ranges, lin.optical_ranges)


def test_reset_ranges_and_from_linear_keeps_parameters():
    base = nn.Linear(4, 3)
    opt = OpticalLinear.from_linear(base, QuantizerConfig())
    assert opt.weight is base.weight and opt.bias is base.bias
    opt(torch.randn(2, 4))
    update_ranges(opt)
    reset_ranges(opt)
    assert torch.isinf(opt.optical_ranges).all()
    with torch.device("meta"):
        meta = OpticalLinear.from_linear(nn.Linear(4, 3, bias=False), QuantizerConfig())
    assert meta.optical_ranges.is_meta and meta.bias is None


def test_gradients_are_straight_through():
    lin, x = calibrated_linear(QuantizerConfig(q_levels=8))
    x = x.clone().requires_grad_(True)
    y = lin(x)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad, g @ lin.weight.detach(), atol=1e-6)
    assert torch.allclose(lin.weight.grad, g.reshape(-1, 6).t() @ x.detach().reshape(-1, 12), atol=1e-5)
    assert torch.allclose(lin.bias.grad, g.reshape(-1, 6).sum(0), atol=1e-5)


def test_clipped_gradients_zero_where_clamped():
    lin, x = calibrated_linear(QuantizerConfig(q_levels=8, q_grad="clipped"))
    x = (x * 3).requires_grad_(True)  # beyond the calibrated x range
    lin(x).sum().backward()
    xr = lin.optical_ranges[0]
    outside = (x.detach() < xr[0]) | (x.detach() > xr[1])
    assert outside.any() and (x.grad[outside] == 0).all()


def test_bypass_is_digital_but_observes():
    lin = OpticalLinear(12, 6, config=QuantizerConfig(q_bypass=True))
    x = torch.randn(4, 12)
    lin(x)
    update_ranges(lin)
    assert torch.equal(lin(x), nn.functional.linear(x, lin.weight, lin.bias))
    assert torch.isfinite(lin.optical_ranges).all()


@pytest.mark.parametrize("digital", ["warm-up", "bypass"])
def test_digital_forward_observes_the_accumulator_before_the_bias(digital):
    """Q_out quantizes the accumulator, and the bias comes after it (section 2): the digital
    warm-up and the bypass observe that range, as the optical path does, not the biased output's
    (a large bias would otherwise shift Q_out's range by its whole size)."""
    torch.manual_seed(0)
    x = torch.randn(4, 12)
    lin = OpticalLinear(12, 6, config=QuantizerConfig(q_bypass=digital == "bypass"))
    with torch.no_grad():
        lin.bias.fill_(5.0)
    lin.optical_enabled = digital != "warm-up"
    y = lin(x)
    assert torch.equal(y, nn.functional.linear(x, lin.weight, lin.bias))
    acc = nn.functional.linear(x, lin.weight)
    assert torch.equal(lin.optical_observed[2], R.observe_range(acc))
    optical = OpticalLinear(12, 6, config=QuantizerConfig())  # uncalibrated: passes through
    optical.load_state_dict(lin.state_dict())
    optical(x)
    torch.testing.assert_close(optical.optical_observed, lin.optical_observed)


def test_attention_module_matches_reference_and_gqa():
    torch.manual_seed(4)
    att = OpticalAttention(QuantizerConfig(q_levels=32))
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    att(q, k, v)
    update_ranges(att)
    assert torch.isfinite(att.optical_ranges).all()
    att.eval()
    state = torch.get_rng_state()
    y = att(q, k, v)
    torch.set_rng_state(state)
    seeds = torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64)
    r = att.optical_ranges
    fwd = R.optical_attention_forward(q, k, v, r[0], r[1], r[2], r[3], r[4], levels=32,
                                      lut=0.02004, seeds=seeds, stream=0)
    assert torch.equal(y, fwd["y"])


def test_q_noise_off_modules_round_deterministically():
    # q_noise: false reaches the ops: outputs equal the det reference whatever the drawn seeds.
    lin, x = calibrated_linear(QuantizerConfig(q_levels=4, q_noise=False))
    lin.eval()
    y = lin(x)
    assert torch.equal(y, lin(x))  # a second forward draws other seeds
    xr, wr, outr = lin.optical_ranges
    acc = R.quantize(x, xr, 4).float() @ R.quantize(lin.weight, wr, 4, lut=0.02004).float().t()
    assert torch.equal(y, R.quantize(acc, outr, 4) + lin.bias)
    torch.manual_seed(4)
    att = OpticalAttention(QuantizerConfig(q_levels=4, q_noise=False))
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    att(q, k, v)
    update_ranges(att)
    att.eval()
    y = att(q, k, v)
    r = att.optical_ranges
    fwd = R.optical_attention_forward(q, k, v, r[0], r[1], r[2], r[3], r[4], levels=4,
                                      lut=0.02004, seeds=(1, 2), stream=0, noise=False)
    assert torch.equal(y, fwd["y"]) and torch.equal(y, att(q, k, v))
    assert "no noise" in repr(att)


def test_module_forward_compiles_without_graph_breaks():
    torch._dynamo.reset()
    lin, x = calibrated_linear()
    att = OpticalAttention(QuantizerConfig())

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.att = lin, att

        def forward(self, x):
            h = self.lin(x)  # [3, 5, 6]
            q = h.view(3, 5, 1, 6).transpose(1, 2).expand(3, 2, 5, 6)
            return self.att(q, q[:, :1], q[:, :1]).sum()

    block = Block()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.backward()
    assert lin.weight.grad is not None
    assert torch.isfinite(att.optical_observed).all()


def test_ops_fake_shapes_for_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 8)
        w = torch.empty(5, 8)
        ranges = torch.empty(3, 2)
        seed = torch.empty(1, dtype=torch.int64)
        y, obs = ops.optical_linear(x, w, None, ranges, seed, levels=16, lut=None, stream=0,
                                    index=ops.linear_index(x.shape, 5), observe=True)
        assert y.shape == (2, 3, 5) and obs.shape == (3, 2)


def test_noise_index_covers_sharded_layouts():
    """A [B, S, N] output's index map equals the IndexMap of its block in the global tensor."""
    idx = ops._linear_noise_index(2 * 3, 4, ops.linear_index((2, 3, 8), 4, batch_offset=2,
                                                             seq_offset=1, seq_global=5,
                                                             col_offset=4, n_global=8), "cpu")
    expect = R.IndexMap((2, 1, 4), (4, 5, 8)).flat_indices((2, 3, 4), "cpu").reshape(6, 4)
    assert torch.equal(idx, expect)


def test_update_ranges_handles_many_modules_at_once():
    model = nn.Sequential(OpticalLinear(4, 4), nn.ReLU(), OpticalLinear(4, 2))
    model(torch.randn(3, 4))
    assert update_ranges(model) == 2
    assert all(torch.isfinite(m.optical_ranges).all() for m in optical_modules(model))


def test_update_ranges_folds_every_module_as_its_own_ema_would():
    """The packed update (a few launches per smooth factor) gives each module's ranges what
    `reference.ema_update` gives them one module at a time: mixed factors, modules of several
    ranges, an uninitialised buffer, a module that observed nothing; pending rows reset."""
    torch.manual_seed(5)
    lins = [OpticalLinear(6, 5, config=QuantizerConfig(q_smooth_factor=s)) for s in (0.9, 0.5, 0.9)]
    att = OpticalAttention(QuantizerConfig(q_smooth_factor=0.75))
    model = nn.ModuleList([*lins, att])
    for m in lins:
        m(torch.randn(4, 6))
    update_ranges(model)  # lins initialised; att observed nothing and stays unset
    for m in lins[:2]:
        m(torch.randn(4, 6) * 3)
    q = torch.randn(1, 2, 8, 16)
    att(q, q.clone(), q.clone())
    mods = optical_modules(model)
    want = [R.ema_update(m.optical_ranges.clone(), m.optical_observed.clone(), m.smooth)
            for m in mods]
    assert update_ranges(model) == 4
    for m, w in zip(mods, want):
        assert torch.equal(m.optical_ranges, w)
        assert (m.optical_observed[:, 0] == float("inf")).all()
        assert (m.optical_observed[:, 1] == float("-inf")).all()
    assert torch.isfinite(att.optical_ranges).all()  # took its first observation as is
    assert torch.equal(lins[2].optical_ranges, want[2])  # observed nothing: unchanged


def test_autocast_casts_inputs_like_the_layers_replaced_and_keeps_float32_inside():
    lin, x = calibrated_linear(QuantizerConfig(q_levels=64))
    lin.eval()
    torch.manual_seed(9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    # Same as calling it on bf16 operands outside autocast: the quantizers and the float32
    # accumulation inside the op are not lowered by the surrounding autocast region.
    bf16 = OpticalLinear(12, 6, config=QuantizerConfig(q_levels=64))
    bf16.load_state_dict(lin.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    assert bf16.optical_ranges.dtype == torch.float32  # ranges stay float32 through dtype casts
    assert torch.equal(bf16.optical_ranges, lin.optical_ranges)
    bf16.eval()
    torch.manual_seed(9)
    assert torch.equal(y, bf16(x.to(torch.bfloat16)))


def test_digital_warmup_switch_observes_ranges_and_computes_digitally():
    from torchtitan_ext.optical.ranges import range_statistics, set_optical_enabled

    lin, x = calibrated_linear(QuantizerConfig(q_levels=4))
    att = OpticalAttention(QuantizerConfig(q_levels=4))
    q = torch.randn(1, 2, 5, 8)
    assert set_optical_enabled([lin, att], False) == 2
    assert torch.equal(lin(x), nn.functional.linear(x, lin.weight, lin.bias))
    assert torch.allclose(att(q, q, q), nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))
    assert torch.isfinite(lin.optical_observed).all()  # still calibrating
    set_optical_enabled([lin, att], True)
    assert not torch.allclose(lin(x), nn.functional.linear(x, lin.weight, lin.bias), atol=1e-3)
    stats = range_statistics(lin)
    assert {"optical/OpticalLinear/x_lo", "optical/OpticalLinear/w_hi"} <= set(stats)
    assert not any("clamp" in k for k in stats)  # nothing collected: no clamp statistics


# --------------------------------------------------------------------------------------------
# Key padding mask and KV-cache decoding through the module (issue 15)
# --------------------------------------------------------------------------------------------
def _calibrated_attention(cfg, q, k, v):
    att = OpticalAttention(cfg)
    att(q, k, v)
    update_ranges(att)
    return att.eval()


def test_attention_module_padding_and_cache_match_reference():
    torch.manual_seed(6)
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    att = _calibrated_attention(QuantizerConfig(q_levels=32), q, k, v)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :3] = False
    state = torch.get_rng_state()
    y = att(q[:, :, 6:], k, v, key_padding_mask=mask, q_start=6)
    torch.set_rng_state(state)
    seeds = torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64)
    r = att.optical_ranges
    fwd = R.optical_attention_forward(q[:, :, 6:], k, v, *r, levels=32, lut=0.02004, seeds=seeds,
                                      stream=0, key_padding_mask=mask, q_start=6)
    assert torch.equal(y, fwd["y"])


def test_attention_module_cached_decoding_equals_full_forward_with_q_noise_off():
    torch.manual_seed(7)
    q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    att = _calibrated_attention(QuantizerConfig(q_levels=64, q_noise=False), q, k, v)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :4] = False  # left padding
    full = att(q, k, v, key_padding_mask=mask)
    steps = [att(q[:, :, :3], k[:, :, :3], v[:, :, :3], key_padding_mask=mask[:, :3])]
    for t in range(3, 10):
        steps.append(att(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1],
                         key_padding_mask=mask[:, :t + 1], q_start=t))
    cached = torch.cat(steps, 2)
    level = float(att.optical_ranges[4, 1] - att.optical_ranges[4, 0]) / 63
    assert (cached - full).abs().max() <= level * 1.001
    assert (full[1, :, :4] == 0).all() and (cached[1, :, :4] == 0).all()


def test_attention_module_bypass_honours_the_mask():
    torch.manual_seed(8)
    att = OpticalAttention(QuantizerConfig(q_bypass=True))
    q, k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :6] = False  # row 4 (q_start 4) of sequence 0 sees nothing visible
    y = att(q, k, v, key_padding_mask=mask, q_start=4)
    assert torch.isfinite(y).all() and (y[0, :, 0] == 0).all()
    vis = R.attention_visibility(2, 3, 7, causal=True, q_start=4, key_padding_mask=mask,
                                 device="cpu")
    logits = (q @ k.transpose(-1, -2) * 8 ** -0.5).masked_fill(~vis, float("-inf"))
    ref = torch.softmax(logits, -1).nan_to_num(0.0) @ v
    assert torch.allclose(y, ref, atol=1e-5)


def test_attention_module_argument_errors():
    att = OpticalAttention(QuantizerConfig())
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="q_start"):
        att(q, k, k, q_start=3)
    with pytest.raises(ValueError, match="key_padding_mask"):
        att(q, k, k, q_start=2, key_padding_mask=torch.ones(1, 5, dtype=torch.long))


def test_attention_module_with_mask_compiles_without_graph_breaks():
    torch._dynamo.reset()
    att = OpticalAttention(QuantizerConfig())
    q = torch.randn(2, 2, 3, 8, requires_grad=True)
    k, v = torch.randn(2, 1, 6, 8), torch.randn(2, 1, 6, 8)
    mask = torch.tensor([[False, True, True, True, True, True], [True] * 6])
    fn = torch.compile(lambda q, k, v, m: att(q, k, v, key_padding_mask=m, q_start=3).sum(),
                       fullgraph=True, backend="aot_eager")
    fn(q, k, v, mask).backward()
    assert torch.isfinite(q.grad).all()


def test_per_quantizer_levels_and_shot_reach_the_ops():
    """QuantizerConfig's per-quantizer levels and shot read-out reach the modules' ops: eval
    outputs equal the reference with the drawn seed; clamp statistics use each quantizer's
    levels."""
    cfg = QuantizerConfig(q_levels=16, q_levels_weight=8, q_levels_output=32, q_readout="shot",
                          q_photons_per_mac=0.5)
    lin, x = calibrated_linear(cfg)
    lin.eval()
    gen = torch.get_rng_state()
    y = lin(x)
    torch.set_rng_state(gen)
    seed = torch.randint(0, 2**31 - 1, (1,))
    xr, wr, outr = lin.optical_ranges
    yr, _ = R.optical_linear_forward(x, lin.weight, lin.bias, xr, wr, outr, levels=(16, 8, 32),
                                     lut=cfg.lut, seed=seed[0], stream=0, photons=0.5)
    assert torch.equal(y, yr)
    y_round, _ = R.optical_linear_forward(x, lin.weight, lin.bias, xr, wr, outr,
                                          levels=(16, 8, 32), lut=cfg.lut, seed=seed[0], stream=0)
    assert not torch.equal(y, y_round)
    torch.manual_seed(4)
    acfg = QuantizerConfig(q_levels=64, q_levels_s=16, q_levels_p=3, q_readout="shot",
                           q_photons_per_mac=0.2)
    att = OpticalAttention(acfg)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    att(q, k, v)
    update_ranges(att)
    att.eval()
    gen = torch.get_rng_state()
    y = att(q, k, v)
    torch.set_rng_state(gen)
    seeds = torch.randint(0, 2**31 - 1, (2,))
    r = att.optical_ranges
    fwd = R.optical_attention_forward(q, k, v, r[0], r[1], r[2], r[3], r[4],
                                      levels=(64, 64, 16, 3, 64, 64), lut=acfg.lut,
                                      seeds=seeds, stream=0, photons=0.2)
    assert torch.equal(y, fwd["y"])
    from torchtitan_ext.optical import stats as S
    fr = S.attention_clamp_fractions(q, k, v, r, levels=acfg.attention_levels, lut=acfg.lut,
                                     scale=8 ** -0.5, causal=True)
    fr1 = S.attention_clamp_fractions(q, k, v, r, levels=64, lut=acfg.lut, scale=8 ** -0.5,
                                      causal=True)
    assert fr[5] != fr1[5]  # p_zeroed depends on Q_p's levels (3 vs 64)
