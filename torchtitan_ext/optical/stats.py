"""Clamp statistics: what fraction of the values each quantizer sees falls outside its range.

A quantizer clamps everything outside [lo, hi] (semantics page, section 1.2). How much it clamps
is the first thing to look at when optical training degrades: a range that lags behind growing
activations clips them, a range stretched by outliers wastes levels. These functions measure it
on the values a forward actually quantizes, with the ranges that forward uses.

They are diagnostics, run only on the steps a trainer asks for (`collect_clamp_stats` on the
modules): plain torch, no host reads, no data-dependent shapes (so they trace under
`torch.compile(fullgraph=True)`), and bounded in cost (a prefix of rows for the linear's
accumulator; the first batch element and a causal prefix for attention, which is exact for
those positions because causal attention never looks ahead).
"""

from __future__ import annotations

import torch

from . import reference as ref

__all__ = [
    "LINEAR_CLAMP_NAMES",
    "ATTENTION_CLAMP_NAMES",
    "linear_clamp_fractions",
    "attention_clamp_fractions",
]

LINEAR_CLAMP_NAMES = ("x", "w", "out")
# `p_zeroed`: fraction of the non-zero attention probabilities that Q_p rounds to exactly zero
# (the fixed [0, 1] range has a first level of 1/(L-1); long contexts spread P below it).
ATTENTION_CLAMP_NAMES = ("q", "k", "v", "s", "y", "p_zeroed")

ACC_ROWS = 4096  # rows of the linear's accumulator that are rebuilt for the `out` fraction
ATTN_PREFIX = 2048  # causal positions of the first sequence rebuilt for `s`, `y`, `p_zeroed`


def _outside(x: torch.Tensor, rng: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of x (where `valid`) outside rng; 0 for an unset range (it passes values)."""
    xf = x.float()
    out = (xf < rng[0]) | (xf > rng[1])
    if valid is None:
        frac = out.float().mean()
    else:
        frac = (out & valid).float().sum() / valid.float().sum().clamp(min=1.0)
    return torch.where(rng[0] <= rng[1], frac, torch.zeros_like(frac))


@torch.no_grad()
def linear_clamp_fractions(x: torch.Tensor, weight: torch.Tensor, ranges: torch.Tensor, *,
                           levels, lut: float | None) -> torch.Tensor:
    """float32 [3]: fractions of x, W and the accumulator Q_x(x) @ Q_w(W)^T outside their ranges
    (`ranges` [3, 2] float32 as the module holds them). `levels`: an int or (L_x, L_w, L_out)."""
    lx, lw, _ = ref.split_levels(levels, 3)
    x2 = x.detach().reshape(-1, x.shape[-1])
    rows = x2[:ACC_ROWS]
    acc = ref.quantize(rows, ranges[0], lx).float() @ \
        ref.quantize(weight.detach(), ranges[1], lw, lut=lut).float().t()
    return torch.stack([_outside(x2, ranges[0]), _outside(weight.detach(), ranges[1]),
                        _outside(acc, ranges[2])])


@torch.no_grad()
def attention_clamp_fractions(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              ranges: torch.Tensor, *, levels, lut: float | None,
                              scale: float, causal: bool) -> torch.Tensor:
    """float32 [6]: fractions of q, k, v, S (causal positions), Y outside their ranges
    (`ranges` [5, 2]) and the fraction of non-zero probabilities Q_p zeroes.

    S and Y are rebuilt on the first sequence's first ATTN_PREFIX positions with deterministic
    rounding of S (the noise moves a value by less than one level, which does not decide
    whether the value before Q_y lies outside its range by more than noise; likewise the shot
    read-out). `levels`: an int or the levels of (Q_q, Q_k, Q_s, Q_p, Q_v, Q_y)."""
    lq, lk, ls, lp, lv, _ = ref.split_levels(levels, 6)
    h = q.shape[1]
    n = min(q.shape[2], ATTN_PREFIX)
    q1, k1, v1 = (t.detach()[:1, :, :n] for t in (q, k, v))
    qq = ref.quantize(q1, ranges[0], lq).float()
    kq = ref._expand_kv(ref.quantize(k1, ranges[1], lk, lut=lut).float(), h)
    vq = ref._expand_kv(ref.quantize(v1, ranges[2], lv, lut=lut).float(), h)
    s_raw = qq @ kq.transpose(-1, -2)
    mask = ref._causal_mask(n, n, q.device) if causal else torch.ones(
        n, n, dtype=torch.bool, device=q.device)
    mask = mask.expand_as(s_raw)
    logits = (ref.quantize(s_raw, ranges[3], ls) * scale).masked_fill(~mask, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    pq = ref.quantize(p, torch.tensor(ref.P_RANGE, device=p.device), lp)
    y_raw = pq @ vq
    nonzero = p > 0
    p_zeroed = (nonzero & (pq == 0)).float().sum() / nonzero.float().sum().clamp(min=1.0)
    return torch.stack([
        _outside(q.detach(), ranges[0]), _outside(k.detach(), ranges[1]),
        _outside(v.detach(), ranges[2]), _outside(s_raw, ranges[3], mask),
        _outside(y_raw, ranges[4]), p_zeroed,
    ])
