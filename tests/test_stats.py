"""Clamp statistics (optical/stats.py) against direct counts on the reference computation."""

import torch

from torchtitan_ext.optical import reference as R
from torchtitan_ext.optical.config import QuantizerConfig
from torchtitan_ext.optical.modules import OpticalAttention, OpticalLinear
from torchtitan_ext.optical.ranges import range_statistics, set_clamp_stats, update_ranges
from torchtitan_ext.optical.stats import attention_clamp_fractions, linear_clamp_fractions


def test_linear_fractions_count_values_outside_each_range():
    torch.manual_seed(0)
    x = torch.randn(37, 11)
    w = torch.randn(5, 11)
    ranges = torch.tensor([[-0.5, 0.7], [-1.0, 0.25], [-2.0, 1.5]])
    got = linear_clamp_fractions(x, w, ranges, levels=16, lut=0.05)
    acc = R.quantize(x, ranges[0], 16).float() @ R.quantize(w, ranges[1], 16, lut=0.05).float().t()
    expect = [((t < r[0]) | (t > r[1])).float().mean() for t, r in zip((x, w, acc), ranges)]
    assert torch.allclose(got, torch.stack(expect))
    assert 0.1 < float(got[0]) < 0.9  # the case is not degenerate


def test_unset_ranges_clamp_nothing():
    x = torch.randn(4, 3) * 100
    unset = torch.tensor([[float("inf"), float("-inf")]] * 3)
    assert torch.equal(linear_clamp_fractions(x, torch.randn(2, 3), unset, levels=8, lut=None),
                       torch.zeros(3))


def test_attention_fractions_match_the_materialised_reference():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    ranges = torch.tensor([[-1.0, 1.0], [-0.8, 1.2], [-1.5, 0.5], [-3.0, 2.0], [-0.3, 0.3]])
    got = attention_clamp_fractions(q, k, v, ranges, levels=16, lut=0.02, scale=8 ** -0.5,
                                    causal=True)
    out = R.optical_attention_forward(q[:1], k[:1], v[:1], *ranges, levels=16, lut=0.02,
                                      seeds=(0, 0), stream=0)
    causal = R._causal_mask(9, 9, q.device).expand_as(out["s_raw"])
    s_out = ((out["s_raw"] < -3.0) | (out["s_raw"] > 2.0)) & causal
    assert torch.isclose(got[3], s_out.float().sum() / causal.float().sum())
    # Y is rebuilt with deterministic Q_s: compare with that exact computation.
    s_det = R.quantize(out["s_raw"], ranges[3], 16) * 8 ** -0.5
    p = torch.softmax(s_det.masked_fill(~causal, float("-inf")), -1)
    pq = R.quantize(p, torch.tensor([0.0, 1.0]), 16)
    y_raw = pq @ R._expand_kv(R.quantize(v[:1], ranges[2], 16, lut=0.02).float(), 4)
    assert torch.isclose(got[4], ((y_raw < -0.3) | (y_raw > 0.3)).float().mean())
    assert torch.isclose(got[5], ((p > 0) & (pq == 0)).float().sum() / (p > 0).float().sum())
    assert torch.isclose(got[0], ((q < -1) | (q > 1)).float().mean())
    assert 0 < float(got[3]) < 1 and 0 < float(got[4]) < 1


def test_modules_collect_only_when_asked_and_report_means():
    torch.manual_seed(2)
    lin = OpticalLinear(12, 6, config=QuantizerConfig(q_levels=8))
    att = OpticalAttention(QuantizerConfig(q_levels=8))
    x = torch.randn(2, 5, 12)
    lin(x)
    q = torch.randn(1, 2, 6, 4)
    att(q, q, q)
    update_ranges([lin, att])
    lin(x * 3)
    att(q * 3, q, q)
    assert not any("clamp" in k for k in range_statistics([lin, att]))
    set_clamp_stats([lin, att], True)
    lin(x * 3)
    lin(x)
    att(q * 3, q, q)
    set_clamp_stats([lin, att], False)
    stats = range_statistics([lin, att])
    r = lin.optical_ranges[0]
    frac = lambda t: float(((t < r[0]) | (t > r[1])).float().mean())
    assert abs(stats["optical/OpticalLinear/x_clamp_frac"] - (frac(x * 3) + frac(x)) / 2) < 1e-6
    assert stats["optical/OpticalLinear/x_clamp_frac"] > 0.1
    assert stats["optical_clamp/linear_x"] == stats["optical/OpticalLinear/x_clamp_frac"]
    assert stats["optical/OpticalAttention/q_clamp_frac"] > 0.2
    assert "optical/OpticalAttention/p_zeroed_clamp_frac" in stats
    # Read once: the next statistics start from zero.
    assert not any("clamp" in k for k in range_statistics([lin, att]))


def test_unmeasured_clamp_statistics_are_left_out_not_zero():
    """A row-wise shard measures the operands' clamping only: its output statistic is absent
    (not a 0% that would pull the mean over modules down)."""
    lin = OpticalLinear(4, 4, config=QuantizerConfig(q_levels=16))
    lin.record_clamp(torch.tensor([0.5, 0.25, 0.75]), measured=2)
    lin.record_clamp(torch.tensor([0.25, 0.25, 0.0]), measured=2)
    assert lin.take_clamp_stats() == {"x": 0.375, "w": 0.25}
    lin.record_clamp(torch.tensor([0.5, 0.25, 0.75]))
    assert lin.take_clamp_stats() == {"x": 0.5, "w": 0.25, "out": 0.75}
