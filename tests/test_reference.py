"""The reference semantics on hand-computed cases (semantics page, sections 1, 2, 4, 5)."""

import math

import pytest
import torch

from torchtitan_ext.optical import reference as R

RNG = torch.tensor([-1.0, 3.0])  # lo = -1, hi = 3


def test_clamp_and_levels():
    # L = 5 over [-1, 3]: grid -1, 0, 1, 2, 3; outside values clamp to the ends.
    x = torch.tensor([-7.0, -1.0, 0.2, 0.49, 0.51, 2.9, 3.0, 10.0])
    y = R.quantize(x, RNG, 5)
    assert y.tolist() == [-1.0, -1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0]


def test_round_half_to_even():
    # t = x + 1 on this grid; t = 0.5 -> 0, 1.5 -> 2, 2.5 -> 2 (half to even, not half up).
    x = torch.tensor([-0.5, 0.5, 1.5])
    assert R.quantize(x, RNG, 5).tolist() == [-1.0, 1.0, 1.0]


def test_two_levels_and_dtype_cast():
    x = torch.tensor([-0.9, 0.9, 1.1, 2.5], dtype=torch.bfloat16)
    y = R.quantize(x, RNG, 2)
    assert y.dtype == torch.bfloat16
    assert y.float().tolist() == [-1.0, -1.0, 3.0, 3.0]


def test_uninitialised_range_passes_through():
    x = torch.randn(100)
    unset = torch.tensor([math.inf, -math.inf])
    assert torch.equal(R.quantize(x, unset, 256), x)


def test_lut_raises_dim_values_to_the_floor_and_keeps_zero():
    rng = torch.tensor([-2.0, 4.0])
    # L = 601 over [-2, 4]: step 0.01, so small values survive quantization unchanged.
    x = torch.tensor([0.0, 0.05, 0.3, -0.01, -0.3, 4.0])
    y = R.quantize(x, rng, 601, lut=0.1)  # floors: +0.4 (0.1 * 4), -0.2 (0.1 * |-2|)
    assert torch.allclose(y, torch.tensor([0.0, 0.4, 0.4, -0.2, -0.3, 4.0]), atol=1e-6)
    assert y[0].item() == 0.0


def test_noisy_is_unbiased_with_uniform_rounding_spread():
    rng = torch.tensor([0.0, 1.0])
    levels = 11
    delta = 0.1
    x = torch.rand(200_000) * 0.98 + 0.01
    u = R.philox_uniform(1234, 0, torch.arange(x.numel()))
    y = R.quantize(x, rng, levels, noise=u)
    err = (y - x).double()
    assert abs(err.mean().item()) < 2e-3 * delta * 10
    # The error of a uniform-dithered rounding spreads like Δ²/6 for (y - x); against the
    # deterministic quantizer it spreads like Δ²/12 around it (semantics page 7).
    det = R.quantize(x, rng, levels)
    dev = (y - det).double()
    assert abs(dev.mean().item()) < 5e-3 * delta
    var_target = delta ** 2 / 6
    assert abs(err.var().item() - var_target) / var_target < 0.05
    # Each output is one of the two grid points around x.
    k = torch.round(y / delta)
    assert torch.all((k - x / delta).abs() < 1.0 + 1e-5)


def test_noise_depends_only_on_seed_and_index():
    idx = torch.arange(1000) + (1 << 33)
    a = R.philox_uniform(7, 3, idx)
    b = R.philox_uniform(torch.tensor(7), 3, idx.flip(0)).flip(0)
    assert torch.equal(a, b)
    assert not torch.equal(a, R.philox_uniform(8, 3, idx))
    assert not torch.equal(a, R.philox_uniform(7, 4, idx))
    assert (a >= 0).all() and (a < 1).all()
    # 64-bit indices: the high word matters.
    assert not torch.equal(R.philox_uniform(7, 3, torch.arange(1000)), a)


def test_philox_matches_triton_randint4x():
    """Our counter layouts reduce to tl.randint4x's for indices below 2^34 and stream 0: the
    rounding draw of index 8 c + 2 w + h is half h (0: high 16 bits) of word w of the
    Philox-4x32-7 block at counter c; the shot read-out's draw of index 4 c + j is word j of the
    Philox-4x32-10 block at counter c (docs/semantics-notes.md)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    import triton
    import triton.language as tl

    @triton.jit
    def _randint4x(out_ptr, seed, N: tl.constexpr, ROUNDS: tl.constexpr):
        offs = tl.arange(0, N)
        r0, r1, r2, r3 = tl.randint4x(seed, offs, ROUNDS)
        tl.store(out_ptr + 4 * offs, r0)
        tl.store(out_ptr + 4 * offs + 1, r1)
        tl.store(out_ptr + 4 * offs + 2, r2)
        tl.store(out_ptr + 4 * offs + 3, r3)

    dev = "cuda" if torch.cuda.is_available() else "cpu"

    def words(rounds):
        out = torch.empty(256, dtype=torch.int32, device=dev)
        _randint4x[(1,)](out, 4242, 64, rounds)
        return out.cpu().to(torch.int64) & 0xFFFFFFFF

    w10, w7 = words(10), words(7)
    # shot: w = 2 j + 1 with j the word's top 23 bits
    assert torch.equal((w10 >> 8) | 1, R._philox_bits24(4242, 0, torch.arange(256)))
    # rounding: u = (j + 1/2) 2^-16 with j = 16 bits, two draws per word (b = 16)
    halves = torch.stack([w7 >> 16, w7 & 0xFFFF], dim=1).reshape(-1)  # index 2 w + h
    expect = R.philox_uniform(4242, 0, torch.arange(512))
    assert torch.equal((halves.float() + 0.5) / 65536.0, expect)
    # Elements of one block draw different bits (no repeats inside a block).
    assert (expect.view(64, 8).diff(dim=1) != 0).all()


def test_index_map_global_positions():
    imap = R.IndexMap((1, 0, 2), (3, 4, 5))
    idx = imap.flat_indices((2, 4, 3), "cpu")
    whole = torch.arange(3 * 4 * 5).view(3, 4, 5)
    assert torch.equal(idx, whole[1:3, :, 2:5])
    with pytest.raises(ValueError):
        R.IndexMap((2, 0, 0), (3, 4, 5)).flat_indices((2, 4, 5), "cpu")


def test_ema_update():
    buf = torch.tensor([[math.inf, -math.inf], [0.0, 1.0], [0.0, 1.0]])
    obs = torch.tensor([[-2.0, 2.0], [-1.0, 3.0], [math.inf, -math.inf]])
    new = R.ema_update(buf, obs, 0.9)
    assert torch.allclose(new, torch.tensor([[-2.0, 2.0], [-0.1, 1.2], [0.0, 1.0]]))


def test_linear_forward_is_the_composition():
    torch.manual_seed(0)
    x, w, b = torch.randn(6, 10), torch.randn(7, 10), torch.randn(7)
    xr, wr, outr = torch.tensor([-2.0, 2.0]), torch.tensor([-1.5, 1.5]), torch.tensor([-8.0, 8.0])
    y, acc = R.optical_linear_forward(x, w, b, xr, wr, outr, levels=16, lut=0.05, seed=5, stream=1)
    xq = R.quantize(x, xr, 16)
    wq = R.quantize(w, wr, 16, lut=0.05)
    assert torch.allclose(acc, xq @ wq.t())
    u = R.philox_uniform(5, 1, torch.arange(42).view(6, 7))
    assert torch.equal(y, R.quantize(acc, outr, 16, noise=u) + b)


def test_straight_through_and_clipped_gradients():
    torch.manual_seed(1)
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(5, 8, requires_grad=True)
    xr, wr, outr = torch.tensor([-0.5, 0.5]), torch.tensor([-0.3, 0.3]), torch.tensor([-0.2, 0.2])
    args = (xr, wr, outr, 16, None, 3, 0, None)
    y = R.OpticalLinearFunction.apply(x, w, None, *args, False)
    g = torch.randn_like(y)
    y.backward(g)
    # STE: exactly the digital linear's gradients with unquantized operands.
    assert torch.allclose(x.grad, g @ w.detach())
    assert torch.allclose(w.grad, g.t() @ x.detach())
    x.grad = w.grad = None
    y = R.OpticalLinearFunction.apply(x, w, None, *args, True)
    y.backward(g)
    acc = R.quantize(x.detach(), xr, 16) @ R.quantize(w.detach(), wr, 16).t()
    gm = g * ((acc >= -0.2) & (acc <= 0.2))
    assert torch.allclose(x.grad, (gm @ w.detach()) * ((x.detach().abs() <= 0.5)))
    assert torch.allclose(w.grad, (gm.t() @ x.detach()) * ((w.detach().abs() <= 0.3)))
    assert (x.grad == 0).any()  # the clip really bit somewhere


def test_clipped_bias_gradient_and_operand_masks_without_q_out():
    """The bias is added after Q_out, digitally: its gradient is dL/dy summed even where Q_out
    clamped. Without Q_out in the call (acc None, no out_mask: a row-wise partial sum), clipped
    keeps x's and W's masks only."""
    torch.manual_seed(1)
    x, w, b = torch.randn(4, 8), torch.randn(5, 8), torch.randn(5) * 4
    xr, wr, outr = torch.tensor([-0.5, 0.5]), torch.tensor([-0.3, 0.3]), torch.tensor([-0.2, 0.2])
    xb = x.clone().requires_grad_()
    wb, bb = w.clone().requires_grad_(), b.clone().requires_grad_()
    y = R.OpticalLinearFunction.apply(xb, wb, bb, xr, wr, outr, 16, None, 3, 0, None, True)
    g = torch.randn_like(y)
    y.backward(g)
    acc = R.quantize(x, xr, 16) @ R.quantize(w, wr, 16).t()
    assert not R.clamp_mask(acc, outr).all()
    assert torch.equal(bb.grad, g.sum(0))
    mx, mw = R.clamp_mask(x, xr), R.clamp_mask(w, wr)
    gx, gw, gb = R.optical_linear_backward(g, x, w, None, xr, wr, outr, clipped=True,
                                           has_bias=False)
    assert gb is None and not mx.all() and not mw.all()
    assert torch.allclose(gx, (g @ w) * mx) and torch.allclose(gw, (g.t() @ x) * mw)
    with pytest.raises(ValueError, match="bias must be None with quantize_output=False"):
        R.optical_linear_forward(x, w, b, xr, wr, outr, levels=16, lut=None, seed=0, stream=0,
                                 quantize_output=False)


def test_attention_reference_matches_sdpa_when_ranges_unset_and_levels_fine():
    torch.manual_seed(2)
    q = torch.randn(2, 4, 9, 8)
    k = torch.randn(2, 2, 9, 8)
    v = torch.randn(2, 2, 9, 8)
    unset = torch.tensor([math.inf, -math.inf])
    fwd = R.optical_attention_forward(q, k, v, unset, unset, unset, unset, unset,
                                      levels=1 << 20, lut=None, seeds=(1, 2), stream=0)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(fwd["y"], ref, atol=1e-5)
    # Masked probabilities are exact zeros after Q_p.
    assert (fwd["p"][..., 0, 1:] == 0).all()


def test_attention_backward_matches_autograd_of_digital_attention():
    """With unset ranges and fine levels, the STE backward is the digital attention's."""
    torch.manual_seed(3)
    q = torch.randn(1, 4, 7, 8, requires_grad=True)
    k = torch.randn(1, 2, 7, 8, requires_grad=True)
    v = torch.randn(1, 2, 7, 8, requires_grad=True)
    unset = torch.tensor([math.inf, -math.inf])
    y = R.OpticalAttentionFunction.apply(q, k, v, unset, unset, unset, unset, unset, 1 << 20,
                                         None, (1, 2), 0, 8 ** -0.5, True, None, None, False)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (q, k, v), g)
    y2 = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    grads2 = torch.autograd.grad(y2, (q, k, v), g)
    for a, b in zip(grads, grads2):
        assert torch.allclose(a, b, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Key padding mask and cached decoding (section 3, issue 15)
# --------------------------------------------------------------------------------------------
def _attn_inputs(seed, B=3, H=4, HKV=2, L=13, D=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g)
    k = torch.randn(B, HKV, L, D, generator=g)
    v = torch.randn(B, HKV, L, D, generator=g)
    return q, k, v


def _attn_ranges(q, k, v):
    """Ranges inside the data (so every quantizer is active, some values clamp)."""
    r = lambda t, s=0.9: torch.stack([t.min() * s, t.max() * s])
    kf = R._expand_kv(k, q.shape[1])
    s = q @ kf.transpose(-1, -2)
    y = torch.softmax(s, -1) @ R._expand_kv(v, q.shape[1])
    return r(q), r(k), r(v), r(s, 0.8), r(y)


def _attn(q, k, v, ranges, *, noise=True, seeds=(5, 6), levels=64, **kw):
    return R.optical_attention_forward(q, k, v, *ranges, levels=levels, lut=0.03, seeds=seeds,
                                       stream=9, noise=noise, **kw)


def _close_levels(a, b, level, frac=0.02):
    """Equal up to float accumulation order: a few elements one Q_y level apart at most."""
    d = (a - b).abs()
    assert d.max().item() <= level * 1.001 + 1e-6, d.max().item()
    assert (d > 1e-6).float().mean().item() <= frac


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_unpadded_sequence_noise_off(side):
    """(a) each sequence of a padded batch, at its own positions, is its unpadded forward."""
    L, lens = 13, [13, 9, 4]
    q, k, v = _attn_inputs(20)
    ranges = _attn_ranges(q, k, v)
    pos = torch.arange(L)[None, :]
    n = torch.tensor(lens)[:, None]
    mask = (pos >= L - n) if side == "left" else (pos < n)
    out = _attn(q, k, v, ranges, noise=False, key_padding_mask=mask)
    level = float(ranges[4][1] - ranges[4][0]) / 63
    for b, m in enumerate(lens):
        sl = slice(L - m, L) if side == "left" else slice(0, m)
        own = _attn(q[b:b + 1, :, sl], k[b:b + 1, :, sl], v[b:b + 1, :, sl], ranges, noise=False)
        _close_levels(out["y"][b:b + 1, :, sl], own["y"], level)
        if side == "left" and m < L:  # pad rows see no key: exact zeros
            assert (out["y"][b, :, :L - m] == 0).all()


@pytest.mark.parametrize("causal", [True, False])
def test_masked_token_values_change_no_bit_elsewhere(causal):
    """(b) with the noise on: new values at hidden positions move no bit of the visible rows."""
    q, k, v = _attn_inputs(21)
    ranges = _attn_ranges(q, k, v)
    mask = torch.ones(3, 13, dtype=torch.bool)
    mask[0, :3] = False
    mask[1, 9:] = False
    mask[2, 5:8] = False
    out = _attn(q, k, v, ranges, key_padding_mask=mask, causal=causal)
    hidden = ~mask[:, None, :, None]
    q2 = torch.where(hidden, torch.randn_like(q) * 5, q)
    k2 = torch.where(hidden, torch.randn_like(k) * 5, k)
    v2 = torch.where(hidden, torch.randn_like(v) * 5, v)
    out2 = _attn(q2, k2, v2, ranges, key_padding_mask=mask, causal=causal)
    rows = mask[:, None, :].expand(3, 4, 13)
    assert torch.equal(out["y"][rows], out2["y"][rows])
    # the hidden rows (pad queries) that see a visible key changed with their new queries, on
    # both masks; those that see none (causal: batch 0's first three) output 0 in both runs
    vis = R.attention_visibility(3, 13, 13, causal=causal, q_start=0, key_padding_mask=mask,
                                 device="cpu")
    alive = vis.any(-1).expand(3, 4, 13)
    assert (~rows & alive).any() and (~alive).any() == causal
    assert torch.equal((out["y"] != out2["y"]).any(-1), ~rows & alive)
    assert (out["y"][~alive] == 0).all() and (out2["y"][~alive] == 0).all()
    # hidden keys have probability exactly 0 in every row
    assert (out["p"].masked_select(~mask[:, None, None, :].expand_as(out["p"])) == 0).all()


def test_masked_keys_keep_every_noise_index():
    """The visible elements' noise is that of the unmasked call: with levels so coarse that the
    noise decides, the unmasked positions of S agree bit for bit."""
    q, k, v = _attn_inputs(22)
    ranges = _attn_ranges(q, k, v)
    mask = torch.ones(3, 13, dtype=torch.bool)
    mask[:, ::3] = False
    a = _attn(q, k, v, ranges)
    b = _attn(q, k, v, ranges, key_padding_mask=mask)
    vis = R.attention_visibility(3, 13, 13, causal=True, q_start=0, key_padding_mask=mask,
                                 device="cpu").expand_as(a["s"])
    assert torch.equal(a["s"][vis], b["s"][vis])


def test_cached_decoding_reproduces_full_forward_noise_off():
    """(c) prefix, then one query row at a time (q_start = t): the full forward's rows."""
    q, k, v = _attn_inputs(23, B=2, L=11)
    ranges = _attn_ranges(q, k, v)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, :2] = False  # left padding in the second sequence
    full = _attn(q, k, v, ranges, noise=False, key_padding_mask=mask)
    level = float(ranges[4][1] - ranges[4][0]) / 63
    P = 4
    pre = _attn(q[:, :, :P], k[:, :, :P], v[:, :, :P], ranges, noise=False,
                key_padding_mask=mask[:, :P])
    rows = [pre["y"]]
    for t in range(P, 11):
        step = _attn(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], ranges, noise=False,
                     key_padding_mask=mask[:, :t + 1], q_start=t, seeds=(100 + t, 200 + t))
        rows.append(step["y"])
    _close_levels(torch.cat(rows, 2), full["y"], level)


def test_cached_step_takes_the_noise_of_row_t_at_the_current_length():
    """With the noise on, step t (same seeds) is bit for bit row t of the forward over the first
    t + 1 positions: its S and Y rows carry the indices of row t of [B, H, t+1, *]."""
    q, k, v = _attn_inputs(24, B=2, L=9)
    ranges = _attn_ranges(q, k, v)
    for t in (0, 4, 8):
        full = _attn(q[:, :, :t + 1], k[:, :, :t + 1], v[:, :, :t + 1], ranges)
        step = _attn(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], ranges, q_start=t)
        assert torch.equal(step["s"], full["s"][:, :, t:t + 1])
        assert torch.equal(step["y"], full["y"][:, :, t:t + 1])
    chunk = _attn(q[:, :, 3:7], k[:, :, :7], v[:, :, :7], ranges, q_start=3)
    full = _attn(q[:, :, :7], k[:, :, :7], v[:, :, :7], ranges)
    assert torch.equal(chunk["y"], full["y"][:, :, 3:7])


def test_all_masked_rows_output_zero_with_zero_gradients():
    q, k, v = (t.requires_grad_() for t in _attn_inputs(25, B=2))
    ranges = _attn_ranges(q.detach(), k.detach(), v.detach())
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[0] = False  # nothing visible in sequence 0
    mask[1, :5] = False
    y = R.OpticalAttentionFunction.apply(q, k, v, *ranges, 64, 0.03, (5, 6), 9, None, True, None,
                                         None, False, mask)
    assert torch.isfinite(y).all() and (y[0] == 0).all() and (y[1, :, :5] == 0).all()
    y.square().sum().backward()
    assert (q.grad[0] == 0).all() and (q.grad[1, :, :5] == 0).all()
    assert (k.grad[0] == 0).all() and (v.grad[1, :, :5] == 0).all()
    assert q.grad[1, :, 5:].abs().sum() > 0


def test_attention_argument_errors_name_the_argument():
    q, k, v = _attn_inputs(26, B=1, L=6)
    ranges = _attn_ranges(q, k, v)
    with pytest.raises(ValueError, match="q_start"):
        _attn(q[:, :, :3], k, v, ranges, q_start=4)
    with pytest.raises(ValueError, match="q_start"):
        _attn(q, k, v, ranges, q_start=-1)
    with pytest.raises(ValueError, match="key_padding_mask"):
        _attn(q, k, v, ranges, key_padding_mask=torch.ones(1, 6))
    with pytest.raises(ValueError, match="key_padding_mask"):
        _attn(q, k, v, ranges, key_padding_mask=torch.ones(2, 6, dtype=torch.bool))


# --- issue 16: per-quantizer levels and the shot read-out -------------------------------------
def _lin_case(seed=0, M=9, K=33, N=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) * 0.2
    xr, wr = R.observe_range(x), R.observe_range(w)
    acc = R.quantize(x, xr, 256).float() @ R.quantize(w, wr, 256, lut=0.02).float().t()
    return x, w, xr, wr, R.observe_range(acc)


def test_linear_levels_tuple_default_is_bitwise_the_int_path():
    x, w, xr, wr, orng = _lin_case()
    kw = dict(lut=0.02, seed=3, stream=1)
    a, _ = R.optical_linear_forward(x, w, None, xr, wr, orng, levels=256, **kw)
    b, _ = R.optical_linear_forward(x, w, None, xr, wr, orng, levels=(256, 256, 256),
                                    photons=0.0, **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_linear_lowering_one_quantizer_is_that_quantizer(which):
    x, w, xr, wr, orng = _lin_case(1)
    lv = [256, 256, 256]
    lv[which] = 5
    kw = dict(lut=0.02, seed=3, stream=1, noise=False)
    y, _ = R.optical_linear_forward(x, w, None, xr, wr, orng, levels=tuple(lv), **kw)
    y256, _ = R.optical_linear_forward(x, w, None, xr, wr, orng, levels=256, **kw)
    assert not torch.equal(y, y256)
    xq = R.quantize(x, xr, lv[0]).float()
    wq = R.quantize(w, wr, lv[1], lut=0.02).float()
    assert torch.equal(y, R.quantize(xq @ wq.t(), orng, lv[2]))


@pytest.mark.parametrize("which", range(6))
def test_attention_lowering_one_quantizer_changes_only_through_it(which):
    q, k, v = _attn_inputs(2)
    ranges = _attn_ranges(q, k, v)
    lv = [256] * 6
    lv[which] = 3
    base = _attn(q, k, v, ranges, noise=False, levels=256)["y"]
    low = _attn(q, k, v, ranges, noise=False, levels=tuple(lv))["y"]
    assert not torch.equal(base, low)
    same = _attn(q, k, v, ranges, noise=False, levels=(256,) * 6)["y"]
    assert torch.equal(base, same)


def test_shot_normal_is_box_muller_of_the_documented_words():
    idx = torch.arange(2**33, 2**33 + 4096, dtype=torch.int64)
    w1 = R._philox_bits24(9, 4, idx, 0).float()
    w2 = R._philox_bits24(9, 4, idx, 1).float()
    assert not torch.equal(w1, w2)
    u1, u2 = 1 - w1 * 2**-24, w2 * 2**-24
    z = torch.sqrt(-2 * torch.log(u1)) * torch.cos(u2 * R.TWO_PI)
    assert torch.equal(R.shot_normal(9, 4, idx), z)
    assert torch.isfinite(z).all()


def test_shot_readout_formula_by_hand():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 50, generator=g)
    rng = torch.tensor([-1.5, 2.0])
    idx = torch.arange(300, dtype=torch.int64).view(6, 50)
    y = R.quantize_readout(x, rng, 16, seed=11, stream=2, index=idx, photons=3.0, contraction=7)
    z = R.shot_normal(11, 2, idx)
    v = (x.clamp(-1.5, 2.0) + 1.5) / 3.5
    v2 = (v + torch.sqrt(v / 21.0) * z).clamp(0, 1)
    expect = torch.round(v2 * 15) / 15 * 3.5 - 1.5
    assert (y - expect).abs().max() < 1e-5
    # noise off: det rounding
    det = R.quantize_readout(x, rng, 16, seed=11, stream=2, index=None, photons=3.0)
    assert torch.equal(det, R.quantize(x, rng, 16))


def test_shot_attention_k_of_q_y_counts_visible_keys():
    q, k, v = _attn_inputs(3, L=12)
    ranges = _attn_ranges(q, k, v)
    kpm = torch.ones(q.shape[0], 12, dtype=torch.bool)
    kpm[0, :4] = False
    out = _attn(q, k, v, ranges, photons=2.0, key_padding_mask=kpm, levels=(256,) * 6)
    y_raw = out["y_raw"]
    vis = R.attention_visibility(q.shape[0], 12, 12, causal=True, q_start=0,
                                 key_padding_mask=kpm, device=q.device)
    kseen = vis.expand(q.shape[0], 1, 12, 12).sum(-1, keepdim=True).clamp(min=1)
    smap, ymap = R._attention_maps(*q.shape[:3], 12, q.shape[3], 0, None, None)
    idx = ymap.flat_indices(y_raw.shape, y_raw.device)
    expect = R.quantize(y_raw, ranges[4], 256,
                        shot=(R.shot_normal(6, 9, idx), R.shot_nk(2.0, kseen, "cpu")))
    alive = vis.any(-1, keepdim=True)
    expect = torch.where(alive, expect, 0.0)
    assert torch.equal(out["y"], expect.to(out["y"].dtype))
    # a different K would give a different result (K is not ignored)
    wrong = R.quantize(y_raw, ranges[4], 256, shot=(R.shot_normal(6, 9, idx),
                                                    R.shot_nk(2.0, 12, "cpu")))
    assert not torch.equal(torch.where(alive, wrong, 0.0), expect)
