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
    """Our counter layout reduces to tl.randint4x's for indices below 2^34 and stream 0: index
    4 c + j takes word j of the Philox block at counter c."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    import triton
    import triton.language as tl

    @triton.jit
    def _randint4x(out_ptr, seed, N: tl.constexpr):
        offs = tl.arange(0, N)
        r0, r1, r2, r3 = tl.randint4x(seed, offs)
        tl.store(out_ptr + 4 * offs, r0)
        tl.store(out_ptr + 4 * offs + 1, r1)
        tl.store(out_ptr + 4 * offs + 2, r2)
        tl.store(out_ptr + 4 * offs + 3, r3)

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.empty(256, dtype=torch.int32, device=dev)
    _randint4x[(1,)](out, 4242, 64)
    words = out.cpu().to(torch.int64) & 0xFFFFFFFF
    expect = R.philox_uniform(4242, 0, torch.arange(256))
    assert torch.equal((words >> 8).float() / 16777216.0, expect)
    # Elements of one block draw different words (no repeats inside a block).
    assert (expect.view(64, 4).diff(dim=1) != 0).all()


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
