"""The optical simulation in plain PyTorch: the oracle for every kernel.

This file is `shared/design/optical-semantics.md` written as code, kept deliberately simple
(it materialises everything, including the L x L attention scores). Every Triton kernel is tested
against it, and on the CPU the custom ops run it directly.

Conventions shared with the kernels:
- A *range* is a float32 tensor of shape [2] holding (lo, hi). A range with lo > hi (the initial
  (+inf, -inf)) is *uninitialised* and the quantizer passes values through unchanged.
- Noise (section 1.3) comes from Philox-4x32 (the generator `tl.rand` uses, same constants) with
  key (seed, stream): `seed` is drawn per call from the framework generator, `stream` is the
  layer's `q_init_seed`. The stochastic rounding: element `idx` (its 64-bit global index) takes
  half idx & 1 (0: high) of output word (idx >> 1) & 3 of the 7-round block at counter
  (c_lo, c_hi, 0, 0), c = idx >> 3, so one Philox serves eight consecutive elements; its 16 bits
  j give u = (j + 1/2) * 2^-16 (b = 16), exactly representable in float32, in (0, 1). The shot
  read-out's Box-Muller words: word idx & 3 of the 10-round block at counter idx >> 2, 24 bits
  each (docs/semantics-notes.md says why).
- The global index of an element is described by an `IndexMap`: the local tensor is a block of a
  larger logical tensor (data-, tensor- or sequence-parallel shards), at per-dimension offsets.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

from .config import MAX_LEVELS

__all__ = [
    "IndexMap",
    "philox_uniform",
    "shot_normal",
    "split_levels",
    "check_quantizer_args",
    "check_linear_bias",
    "quantize",
    "clamp_mask",
    "observe_range",
    "unset_observations",
    "ema_update",
    "optical_linear_forward",
    "optical_linear_backward",
    "optical_attention_forward",
    "check_attention_args",
    "attention_visibility",
    "optical_attention_backward",
    "OpticalLinearFunction",
    "OpticalAttentionFunction",
    "P_RANGE",
]

_M32 = 0xFFFFFFFF
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10  # the shot read-out's Box-Muller words (24 bits, four per block)
ROUNDING_ROUNDS = 7  # the stochastic rounding's draws (16 bits, eight per block)


# --------------------------------------------------------------------------------------------
# Global element indices
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexMap:
    """Where a local tensor sits inside the whole, unsharded logical tensor.

    `offsets[d]` is the position of the local block along dimension d, and `global_shape[d]` the
    logical size of that dimension. The global flat index of local element (i_0, ..., i_n) is the
    row-major index of (i_0 + offsets[0], ..., i_n + offsets[n]) in `global_shape`.
    """

    offsets: tuple[int, ...]
    global_shape: tuple[int, ...]

    @staticmethod
    def whole(shape: Sequence[int]) -> "IndexMap":
        return IndexMap(tuple(0 for _ in shape), tuple(int(s) for s in shape))

    def check(self, local_shape: Sequence[int]) -> None:
        if len(local_shape) != len(self.global_shape) or len(self.offsets) != len(self.global_shape):
            raise ValueError(
                f"IndexMap rank mismatch: local shape {tuple(local_shape)}, "
                f"offsets {self.offsets}, global shape {self.global_shape}"
            )
        for d, (n, o, g) in enumerate(zip(local_shape, self.offsets, self.global_shape)):
            if isinstance(o, torch.Tensor):  # a device offset (q_start of a static-cache step):
                continue  # checking its value would read the device
            if o < 0 or o + n > g:
                raise ValueError(
                    f"IndexMap: local dim {d} of size {n} at offset {o} exceeds global size {g}"
                )

    def flat_indices(self, local_shape: Sequence[int], device) -> torch.Tensor:
        """int64 tensor of global flat indices, shaped like the local tensor."""
        self.check(local_shape)
        idx = torch.zeros((), dtype=torch.int64, device=device)
        stride = 1
        nd = len(local_shape)
        for d in reversed(range(nd)):
            view = [1] * nd
            view[d] = local_shape[d]
            pos = torch.arange(local_shape[d], dtype=torch.int64, device=device) + self.offsets[d]
            idx = idx + (pos * stride).view(view)
            stride *= self.global_shape[d]
        return idx.expand(*local_shape)


# --------------------------------------------------------------------------------------------
# Philox-4x32 (7 rounds for the rounding draws, 10 for the shot read-out)
# --------------------------------------------------------------------------------------------
def _mulhilo32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b for uint32 values held in int64.

    Split so no intermediate leaves the int64 range (signed overflow is not something to rely on).
    """
    al = a & 0xFFFF
    ah = a >> 16
    x = al * b  # < 2^48
    y = ah * b  # < 2^48
    s = x + ((y & 0xFFFF) << 16)  # < 2^49
    lo = s & _M32
    hi = ((y >> 16) + (s >> 32)) & _M32
    return hi, lo


def _philox4(seed: torch.Tensor | int, stream: int, counter: torch.Tensor, counter_word2: int,
             rounds: int):
    """The four output words (int64 holding uint32) of Philox-4x32-`rounds` at counter
    (counter lo, counter hi, counter_word2, 0), key (seed, stream)."""
    c0 = counter & _M32
    c1 = (counter >> 32) & _M32
    c2 = torch.full_like(c0, counter_word2)
    c3 = torch.zeros_like(c0)
    # Key words given as ints stay Python ints: a device tensor built from one would be a
    # host-to-device copy on every draw.
    if isinstance(seed, torch.Tensor):
        k0 = seed.to(device=counter.device, dtype=torch.int64) & _M32
    else:
        k0 = int(seed) & _M32
    k1 = int(stream) & _M32
    for _ in range(rounds):
        hi_a, lo_a = _mulhilo32(c0, PHILOX_ROUND_A)
        hi_b, lo_b = _mulhilo32(c2, PHILOX_ROUND_B)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _M32
        k1 = (k1 + PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def _pick(words, lane: torch.Tensor) -> torch.Tensor:
    c0, c1, c2, c3 = words
    return torch.where(lane < 2, torch.where(lane == 0, c0, c1), torch.where(lane == 2, c2, c3))


def _philox_bits24(seed: torch.Tensor | int, stream: int, index: torch.Tensor,
                   counter_word2: int = 0) -> torch.Tensor:
    """The shot read-out's odd 24-bit draw 2 j + 1 (int64, j = word >> 9): word index & 3 of the
    Philox-4x32-10 block at counter (index >> 2, counter_word2); `counter_word2` is 0 for
    Box-Muller's first draw, 1 for its second."""
    index = index.to(torch.int64)
    word = _pick(_philox4(seed, stream, index >> 2, counter_word2, PHILOX_ROUNDS), index & 3)
    return (word >> 8) | 1


def _rounding_bits24(seed: torch.Tensor | int, stream: int, index: torch.Tensor) -> torch.Tensor:
    """The stochastic rounding's draw as an odd multiple of 2^7 below 2^24 (int64): (2 j + 1) 2^7
    with j the 16 bits of half (index & 1) (0: high, 1: low) of word (index >> 1) & 3 of the
    Philox-4x32-7 block at counter (index >> 3, 0): eight draws per block."""
    index = index.to(torch.int64)
    word = _pick(_philox4(seed, stream, index >> 3, 0, ROUNDING_ROUNDS), (index >> 1) & 3)
    half = torch.where((index & 1) == 0, word >> 16, word & 0xFFFF)
    return (half << 8) | 0x80


def philox_uniform(seed: torch.Tensor | int, stream: int, index: torch.Tensor) -> torch.Tensor:
    """The stochastic rounding's u = (j + 1/2) 2^-16 in (0, 1), float32, for every int64
    `index`, keyed by (seed, stream): j = 16 bits of the Philox-4x32-7 block at counter
    index >> 3 (`_rounding_bits24`; docs/semantics-notes.md)."""
    return _rounding_bits24(seed, stream, index).to(torch.float32) * (1.0 / 16777216.0)


TWO_PI = 6.2831854820251465  # float32(2 pi)


def shot_normal(seed: torch.Tensor | int, stream: int, index: torch.Tensor) -> torch.Tensor:
    """Standard normal z (float32) per int64 `index` for the shot read-out, by Box-Muller:
    w1 = the 24-bit draw of Philox-4x32-10 at counter (idx >> 2, 0, 0) word idx & 3, w2 = the
    same word of the block at counter word 2 = 1; u1 = 1 - w1 2^-24 in (0, 1), u2 = w2 2^-24;
    z = sqrt(-2 ln u1) * cos(2 pi u2), every op in float32 (docs/semantics-notes.md)."""
    w1 = _philox_bits24(seed, stream, index, 0).to(torch.float32)
    w2 = _philox_bits24(seed, stream, index, 1).to(torch.float32)
    u1 = 1.0 - w1 * (1.0 / 16777216.0)
    u2 = w2 * (1.0 / 16777216.0)
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(u2 * TWO_PI)


def split_levels(levels, n: int) -> tuple[int, ...]:
    """Per-quantizer levels: an int (every quantizer) or a sequence of n ints."""
    if isinstance(levels, int):
        return (int(levels),) * n
    levels = tuple(int(v) for v in levels)
    if len(levels) != n:
        raise ValueError(f"expected {n} per-quantizer levels, got {levels}")
    return levels


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_quantizer_args(where: str, *, levels, qlevels=None, level_names: Sequence[str] = (),
                         lut=None, photons=0.0, contraction=1, readout_lut: bool = False) -> None:
    """Validate an op call's quantizer arguments (section 1) before anything is launched: the
    kernels would otherwise turn a bad value into NaNs, garbage or another read-out silently.

    Python scalars only (no device read). `levels`: an integer 2 <= L <= MAX_LEVELS (the
    kernels' rounding is exact up to there); `qlevels`: None or one such integer per name in
    `level_names`; `lut`: None or a number with 0 <= lut < 1; `photons`: a finite number >= 0
    (0 = the rounding read-out) with `contraction` K an integer >= 1. `readout_lut`: the lut
    would act on the shot read-out's own quantizer (the stand-alone Q), a combination the page
    does not define (the lut is weight-side), so it is refused. Raises ValueError naming `where`,
    the argument and its allowed values."""
    allowed = f"an integer with 2 <= L <= {MAX_LEVELS}"
    if not _is_int(levels) or not 2 <= levels <= MAX_LEVELS:
        raise ValueError(f"{where}: levels must be {allowed}, got {levels!r}")
    if qlevels is not None:
        names = ", ".join(level_names)
        if isinstance(qlevels, (str, bytes)) or not isinstance(qlevels, Sequence) \
                or len(qlevels) != len(level_names):
            raise ValueError(f"{where}: qlevels must be None or {len(level_names)} levels "
                             f"({names}), got {qlevels!r}")
        for name, v in zip(level_names, qlevels):
            if not _is_int(v) or not 2 <= v <= MAX_LEVELS:
                raise ValueError(f"{where}: qlevels ({names}): the level of {name} must be "
                                 f"{allowed}, got {v!r}")
    if lut is not None and (not _is_real(lut) or not 0 <= lut < 1):
        raise ValueError(f"{where}: lut must be None or a number with 0 <= lut < 1, got {lut!r}")
    if not _is_real(photons) or not 0 <= photons < math.inf:
        raise ValueError(f"{where}: photons must be a finite number >= 0 (0 = the rounding "
                         f"read-out), got {photons!r}")
    if photons > 0 and (not _is_int(contraction) or contraction < 1):
        raise ValueError(f"{where}: contraction must be an integer >= 1 with photons > 0, got "
                         f"{contraction!r}")
    if readout_lut and photons > 0 and lut:
        raise ValueError(f"{where}: lut must be None or 0 with the shot read-out (photons > 0): "
                         f"the lut is for weight-side operands; got lut={lut!r}, "
                         f"photons={photons!r}")


def check_linear_bias(where: str, bias, quantize_output: bool) -> None:
    """A bias needs Q_out in the same call: it is added after Q_out (section 2), so without it
    the bias would be dropped silently (and get a gradient it never earned)."""
    if bias is not None and not quantize_output:
        raise ValueError(f"{where}: bias must be None with quantize_output=False (the bias is "
                         "added after Q_out: add it after the reduction and optical_quantize)")


# --------------------------------------------------------------------------------------------
# The quantizer Q (section 1)
# --------------------------------------------------------------------------------------------
def _is_initialised(rng: torch.Tensor) -> torch.Tensor:
    return rng[0] <= rng[1]


def quantize(
    x: torch.Tensor,
    rng: torch.Tensor,
    levels: int,
    *,
    lut: float | None = None,
    noise: torch.Tensor | None = None,
    shot: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Q(x; lo, hi, L, mode, lut): `noise` is u in [0, 1) per element (noisy mode) or None (det).

    `shot` = (z, nK) is the shot read-out (semantics s.1): v = (c - lo) / span,
    v' = v + sqrt(max(v, 0) / nK) * z (float32 nK broadcastable to x), then det rounding of
    clamp(v', 0, 1) * (L - 1). Returns the input dtype. An uninitialised range passes x through.
    """
    if levels < 2:
        raise ValueError(f"levels must be an integer >= 2, got {levels}")
    xf = x.float()
    lo = rng[0].float()
    hi = rng[1].float()
    c = torch.minimum(torch.maximum(xf, lo), hi)
    v = (c - lo) / torch.clamp(hi - lo, min=1e-12)
    if shot is not None:
        z, nk = shot
        v = v + torch.sqrt(torch.clamp(v, min=0.0) / nk) * z
        v = torch.clamp(v, 0.0, 1.0)
    t = v * float(levels - 1)
    if noise is not None:
        t = t + noise - 0.5
    k = torch.round(t)  # round half to even
    # Divide by a tensor, not a Python float: CUDA turns division by a scalar into multiplication
    # by its reciprocal, which is not the IEEE quotient the semantics (and the kernels) use.
    y = k / torch.full_like(k, float(levels - 1)) * (hi - lo) + lo
    if lut is not None and lut > 0:
        pos_floor = lut * hi
        neg_floor = -lut * torch.abs(lo)
        y = torch.where((y > 0) & (y < pos_floor), pos_floor, y)
        y = torch.where((y < 0) & (y > neg_floor), neg_floor, y)
    y = torch.where(_is_initialised(rng), y, xf)
    return y.to(x.dtype)


def shot_nk(photons: float, contraction, device) -> torch.Tensor:
    """n * K in float32 (K an int or an int tensor): the kernels compute the same product."""
    # Filled on the device: a tensor made from a Python number is a host-to-device copy.
    n = torch.full((), float(photons), dtype=torch.float32, device=device)
    if isinstance(contraction, torch.Tensor):
        return n * contraction.to(device=device, dtype=torch.float32)
    return n * torch.full((), float(contraction), dtype=torch.float32, device=device)


def quantize_readout(x: torch.Tensor, rng: torch.Tensor, levels: int, *, seed, stream: int,
                     index: torch.Tensor | None, photons: float = 0.0,
                     contraction=1) -> torch.Tensor:
    """A read-out quantizer (Q_out, Q_s, Q_y): `index` None = det rounding (`q_noise: false`);
    photons == 0: stochastic rounding keyed by `index`; photons > 0: the shot read-out with
    z = `shot_normal` at `index` and K = `contraction` (an int, or a tensor broadcastable to x)."""
    if index is None:
        return quantize(x, rng, levels)
    if photons > 0:
        z = shot_normal(seed, stream, index)
        return quantize(x, rng, levels, shot=(z, shot_nk(photons, contraction, x.device)))
    return quantize(x, rng, levels, noise=philox_uniform(seed, stream, index))


def clamp_mask(x: torch.Tensor, rng: torch.Tensor) -> torch.Tensor:
    """True where x lies inside the range (the gradient passes in `clipped` mode)."""
    xf = x.float()
    inside = (xf >= rng[0]) & (xf <= rng[1])
    return inside | ~_is_initialised(rng)


def observe_range(x: torch.Tensor, quantiles: tuple[float, float] | None = None) -> torch.Tensor:
    """The observed [lo, hi] of x in float32 (min/max, or the given quantiles)."""
    xf = x.detach().float().reshape(-1)
    if quantiles is None:
        return torch.stack([xf.min(), xf.max()])
    # torch.quantile is limited to 2^24 elements: a fixed stride keeps the sample deterministic.
    limit = 1 << 24
    if xf.numel() > limit:
        stride = -(-xf.numel() // limit)
        xf = xf[::stride]
    q = torch.empty(2, dtype=torch.float32, device=xf.device)  # filled on the device: no host copy
    q[0], q[1] = quantiles
    return torch.quantile(xf, q)


def unset_observations(n: int, device=None) -> torch.Tensor:
    """float32 [n, 2] rows (+inf, -inf): an uninitialised range, or the observation of nothing.
    Filled on the device: a tensor built from a Python list would be a host-to-device copy."""
    t = torch.empty(n, 2, dtype=torch.float32, device=device)
    t[:, 0] = float("inf")
    t[:, 1] = float("-inf")
    return t


def ema_update(buf: torch.Tensor, observed: torch.Tensor, smooth: float) -> torch.Tensor:
    """buf = s*buf + (1-s)*observed, row-wise over [..., 2] ranges.

    An uninitialised buffer takes the observation as is; an empty observation (lo > hi: nothing
    was observed since the last update) leaves the buffer unchanged.
    """
    observed_valid = (observed[..., 0] <= observed[..., 1]).unsqueeze(-1)
    buf_valid = (buf[..., 0] <= buf[..., 1]).unsqueeze(-1)
    mixed = smooth * buf + (1.0 - smooth) * observed
    new = torch.where(buf_valid, mixed, observed)
    return torch.where(observed_valid, new, buf)


# --------------------------------------------------------------------------------------------
# Optical linear (section 2)
# --------------------------------------------------------------------------------------------
def optical_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    x_range: torch.Tensor,
    w_range: torch.Tensor,
    out_range: torch.Tensor,
    *,
    levels: int,
    lut: float | None,
    seed: torch.Tensor | int,
    stream: int,
    index_map: IndexMap | None = None,
    quantize_output: bool = True,
    noise: bool = True,
    photons: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = Q_out(Q_x(x) @ Q_w(W)^T) + b, and the float32 accumulator (for ranges and masks).

    `levels`: an int, or (L_x, L_w, L_out). `quantize_output=False` returns the float32
    accumulator as y (a partial sum under row-wise tensor parallelism, to be reduced and then
    quantized by `quantize`). `noise=False` is the read-out noise switch off (`q_noise: false`):
    Q_out rounds deterministically (shot noise off too). `photons` > 0: the shot read-out with
    n = photons and K = in_features (`q_readout: shot`).
    """
    check_linear_bias("optical_linear_forward", bias, quantize_output)
    lx, lw, lout = split_levels(levels, 3)
    xq = quantize(x, x_range, lx).float()
    wq = quantize(weight, w_range, lw, lut=lut).float()
    acc = xq @ wq.t()
    if not quantize_output:
        return acc, acc
    y = quantize_readout(acc, out_range, lout, seed=seed, stream=stream,
                         index=(index_map or IndexMap.whole(acc.shape)).flat_indices(
                             acc.shape, acc.device) if noise else None,
                         photons=photons, contraction=x.shape[-1])
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), acc


def optical_linear_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    acc: torch.Tensor | None,
    x_range: torch.Tensor,
    w_range: torch.Tensor,
    out_range: torch.Tensor,
    *,
    clipped: bool,
    has_bias: bool,
    out_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Straight-through (or clipped) gradients; weight and input gradients use the unquantized
    operands (section 5).

    `clipped` zeroes the gradient where Q_x or Q_w clamped and, where this call applied Q_out,
    where Q_out clamped: `out_mask` (True = inside) if given, else rebuilt from the accumulator
    `acc`. With neither, Q_out ran elsewhere (after a row-wise tensor-parallel reduction, whose
    own quantize op masks) and only the operand masks apply. The bias gradient is never masked:
    the bias is added after Q_out, digitally (section 2), so dL/db = sum of dL/dy."""
    g = grad_y.float()
    grad_b = g.reshape(-1, g.shape[-1]).sum(0) if has_bias else None
    if clipped and out_mask is None and acc is not None:
        out_mask = clamp_mask(acc, out_range)
    if clipped and out_mask is not None:
        g = g * out_mask.reshape(g.shape)
    grad_x = g @ weight.float()
    grad_w = g.reshape(-1, g.shape[-1]).t() @ x.float().reshape(-1, x.shape[-1])
    if clipped:
        grad_x = grad_x * clamp_mask(x, x_range)
        grad_w = grad_w * clamp_mask(weight, w_range)
    return grad_x.to(x.dtype), grad_w.to(weight.dtype), (
        grad_b.to(weight.dtype) if grad_b is not None else None
    )


class OpticalLinearFunction(torch.autograd.Function):
    """Autograd wrapper of the reference linear, for tests and the CPU path."""

    @staticmethod
    def forward(ctx, x, weight, bias, x_range, w_range, out_range, levels, lut, seed, stream,
                index_map, clipped):
        y, acc = optical_linear_forward(
            x, weight, bias, x_range, w_range, out_range,
            levels=levels, lut=lut, seed=seed, stream=stream, index_map=index_map,
        )
        ctx.save_for_backward(x, weight, acc if clipped else None, x_range, w_range, out_range)
        ctx.clipped = clipped
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, acc, x_range, w_range, out_range = ctx.saved_tensors
        gx, gw, gb = optical_linear_backward(
            grad_y, x, weight, acc, x_range, w_range, out_range,
            clipped=ctx.clipped, has_bias=ctx.has_bias,
        )
        return gx, gw, gb, None, None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Optical attention (section 3)
# --------------------------------------------------------------------------------------------
P_RANGE = (0.0, 1.0)


def _expand_kv(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    rep = n_heads // t.shape[1]
    return t if rep == 1 else t.repeat_interleave(rep, dim=1)


def _causal_mask(lq: int, lk: int, device) -> torch.Tensor:
    # Query i sees keys j <= i + (lk - lq): aligned at the end, as SDPA's is_causal does for lq==lk.
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return j <= i + (lk - lq)


def check_attention_args(q: torch.Tensor, k: torch.Tensor, key_padding_mask: torch.Tensor | None,
                         q_start: "int | torch.Tensor", causal: bool) -> None:
    """Validate the padding / cached-decoding arguments of an attention call (section 3).

    q [B, H, Lq, D], k [B, Hkv, Lk, D]; `key_padding_mask` None or bool [B, Lk] (True = visible);
    `q_start` an int >= 0 with q_start + Lq <= Lk (query row r is absolute position q_start + r),
    or the same as a 0-d int64 tensor on q's device (a step of a static KV cache, whose position
    lives on the device: its value is the caller's contract, checking it would read the device).
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, H, L, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    b, _, lq, _ = q.shape
    lk = k.shape[2]
    if isinstance(q_start, torch.Tensor):
        if q_start.dim() != 0 or q_start.dtype != torch.int64 or q_start.device != q.device:
            raise ValueError("q_start as a tensor must be a 0-d torch.int64 tensor on q's device "
                             f"{q.device}, got {q_start.dtype} {list(q_start.shape)} on "
                             f"{q_start.device}")
    elif isinstance(q_start, bool) or not isinstance(q_start, int) or q_start < 0:
        raise ValueError(f"q_start must be an int >= 0 or a 0-d int64 device tensor, got "
                         f"{q_start!r}")
    elif q_start + lq > lk:
        raise ValueError(f"q_start + query length must be <= key length: q_start={q_start}, "
                         f"Lq={lq}, Lk={lk}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise ValueError("key_padding_mask must be None or a torch.bool tensor [B, Lk] "
                             f"(True = visible), got "
                             f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask))}")
        if tuple(key_padding_mask.shape) != (b, lk):
            raise ValueError(f"key_padding_mask must have shape [B, Lk] = {[b, lk]}, got "
                             f"{list(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on q's device {q.device}, got "
                             f"{key_padding_mask.device}")


def attention_visibility(b: int, lq: int, lk: int, *, causal: bool, q_start: "int | torch.Tensor",
                         key_padding_mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """bool [B or 1, 1, Lq, Lk]: True where query row r may see key j (causal: j <= q_start + r;
    and the key is visible in `key_padding_mask`); None when every key is visible to every row."""
    vis = None
    if causal:
        i = torch.arange(lq, device=device)[:, None] + q_start
        vis = (torch.arange(lk, device=device)[None, :] <= i)[None, None]
    if key_padding_mask is not None:
        kpm = key_padding_mask[:, None, None, :]
        vis = kpm if vis is None else vis & kpm
    return vis


def _attention_maps(b, h, lq, lk, d, q_start, s_index_map, y_index_map):
    """Default index maps: row r of this call is row q_start + r of the full [B, H, Lk, *]."""
    smap = s_index_map or IndexMap((0, 0, q_start, 0), (b, h, lk, lk))
    ymap = y_index_map or IndexMap((0, 0, q_start, 0), (b, h, lk, d))
    return smap, ymap


def optical_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_range: torch.Tensor,
    k_range: torch.Tensor, v_range: torch.Tensor, s_range: torch.Tensor, y_range: torch.Tensor,
    *, levels: int, lut: float | None, seeds: torch.Tensor | tuple[int, int], stream: int,
    scale: float | None = None, causal: bool = True, s_index_map: IndexMap | None = None,
    y_index_map: IndexMap | None = None, key_padding_mask: torch.Tensor | None = None,
    q_start: "int | torch.Tensor" = 0, noise: bool = True, photons: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Section 3 materialised. q: [B, H, Lq, D]; k, v: [B, Hkv, Lk, D] with H % Hkv == 0.

    Query row r is absolute position q_start + r (q_start + Lq <= Lk; an int, or a 0-d int64
    device tensor for a static-cache step); causal: it sees keys
    j <= q_start + r. `key_padding_mask` (bool [B, Lk], True = visible) hides keys: they get
    P = 0 exactly, are left out of S's range observation, and move no other element's noise
    index. A row with no visible key outputs exactly 0 (and is left out of y_raw's observation).
    Q_s and Q_y are two noisy quantizers, each with its own seed: `seeds` holds (seed_s, seed_y).
    By default S element (b, h, r, j) is keyed by the flat index of (b, h, q_start + r, j) in
    [B, H, Lk, Lk], Y elements likewise in [B, H, Lk, D]; explicit maps must place row r at
    q_start + r themselves. `noise=False` (`q_noise: false`) makes Q_s and Q_y deterministic
    (the seeds are then unused; the shot noise is off too). `levels`: an int, or the levels of
    (Q_q, Q_k, Q_s, Q_p, Q_v, Q_y). `photons` > 0: the shot read-out (`q_readout: shot`) for
    Q_s (K = head dim D) and Q_y (K = the number of keys the row sees, >= 1). Returns y (input
    dtype) and the float32 intermediates the
    backward and the ranges need; `s_obs` is the range of S over the visible positions only (the
    only ones a fused kernel computes), (+inf, -inf) when there are none.
    """
    B, H, L, D = q.shape
    if H % k.shape[1] != 0:
        raise ValueError(f"query heads {H} must be a multiple of key/value heads {k.shape[1]}")
    check_attention_args(q, k, key_padding_mask, q_start, causal)
    scale = D ** -0.5 if scale is None else scale
    lk = k.shape[2]
    lq_, lk_, ls_, lp_, lv_, ly_ = split_levels(levels, 6)
    smap, ymap = _attention_maps(B, H, L, lk, D, q_start, s_index_map, y_index_map)
    qq = quantize(q, q_range, lq_).float()
    kq = _expand_kv(quantize(k, k_range, lk_, lut=lut).float(), H)
    s_raw = qq @ kq.transpose(-1, -2)
    s = quantize_readout(s_raw, s_range, ls_, seed=seeds[0], stream=stream,
                         index=smap.flat_indices(s_raw.shape, s_raw.device) if noise else None,
                         photons=photons, contraction=D)
    vis = attention_visibility(B, L, lk, causal=causal, q_start=q_start,
                               key_padding_mask=key_padding_mask, device=q.device)
    p, alive = _masked_softmax(s * scale, vis)
    vq = _expand_kv(quantize(v, v_range, lv_, lut=lut).float(), H)
    p_range = torch.empty(2, dtype=torch.float32, device=p.device)  # no host-to-device copy
    p_range[0], p_range[1] = P_RANGE
    y_raw = quantize(p, p_range, lp_) @ vq
    # Q_y's contraction length: the keys row r sees (at least 1; rows that see none output 0).
    keys_seen = lk if vis is None else \
        vis.expand(B, 1, L, lk).sum(-1, keepdim=True).clamp(min=1)
    y = quantize_readout(y_raw, y_range, ly_, seed=seeds[1], stream=stream,
                         index=ymap.flat_indices(y_raw.shape, y_raw.device) if noise else None,
                         photons=photons, contraction=keys_seen)
    if alive is not None:
        y = torch.where(alive, y, 0.0)
    s_obs = _observe_where(s_raw, vis)
    y_obs = _observe_where(y_raw, alive)
    return {"y": y.to(q.dtype), "s_raw": s_raw, "s": s, "p": p, "y_raw": y_raw, "s_obs": s_obs,
            "y_obs": y_obs}


def _masked_softmax(logits: torch.Tensor, vis: torch.Tensor | None):
    """(P, rows with a visible key [B, H, L, 1] or None): softmax over the visible keys; rows
    that see none get P = 0 (a softmax of an all -inf row would be NaN)."""
    if vis is None:
        return torch.softmax(logits, dim=-1), None
    p = torch.softmax(logits.masked_fill(~vis, float("-inf")), dim=-1)
    alive = vis.any(-1, keepdim=True).expand(*p.shape[:3], 1)
    return torch.where(alive, p, 0.0), alive


def _observe_where(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The min/max observation of x's elements where `keep` (broadcastable to x; None = all),
    (+inf, -inf) when there are none. Masked reductions, not a boolean selection: selecting
    would read the element count back from the device."""
    xf = x.detach().float()
    if x.numel() == 0:
        return unset_observations(1, xf.device)[0]
    if keep is None:
        return observe_range(xf)
    return torch.stack([torch.where(keep, xf, float("inf")).amin(),
                        torch.where(keep, xf, float("-inf")).amax()])


def optical_attention_backward(
    grad_y: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fwd: dict[str, torch.Tensor],
    q_range: torch.Tensor,
    k_range: torch.Tensor,
    s_range: torch.Tensor,
    v_range: torch.Tensor,
    *,
    scale: float | None = None,
    clipped: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Straight-through gradients (section 5), as FlashAttention computes them.

    Every quantizer's Jacobian is the identity and the matmul gradients use the unquantized q, k,
    v and the forward's probabilities P; the softmax delta D_i = sum_j P_ij dP_ij is taken as
    dY_i . Y_i with the forward output Y, as FlashAttention does (it differs from the exact sum by
    the Q_y and Q_p rounding only). Hidden keys have P = 0 in `fwd["p"]`, so they get zero dk, dv
    and add nothing to dq; a row with no visible key (P = 0, Y = 0) gets zero gradients.
    `clipped` zeroes the gradient where Q_q, Q_k, Q_v or Q_s clamped; Q_p and Q_y stay
    straight-through.
    """
    B, H, L, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    g = grad_y.float()
    p = fwd["p"]
    kf = _expand_kv(k.float(), H)
    vf = _expand_kv(v.float(), H)
    dv = p.transpose(-1, -2) @ g
    dp = g @ vf.transpose(-1, -2)
    delta = (g * fwd["y"].float()).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    if clipped:
        ds = ds * clamp_mask(fwd["s_raw"], s_range)
    dq = ds @ kf
    dk = ds.transpose(-1, -2) @ q.float()
    hkv = k.shape[1]
    if hkv != H:
        dk = dk.view(B, hkv, H // hkv, *dk.shape[2:]).sum(2)
        dv = dv.view(B, hkv, H // hkv, *dv.shape[2:]).sum(2)
    if clipped:
        dq = dq * clamp_mask(q, q_range)
        dk = dk * clamp_mask(k, k_range)
        dv = dv * clamp_mask(v, v_range)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class OpticalAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the reference attention, for tests and the CPU path."""

    @staticmethod
    def forward(ctx, q, k, v, q_range, k_range, v_range, s_range, y_range, levels, lut, seeds,
                stream, scale, causal, s_index_map, y_index_map, clipped, key_padding_mask=None,
                q_start=0, noise=True, photons=0.0):
        fwd = optical_attention_forward(
            q, k, v, q_range, k_range, v_range, s_range, y_range, levels=levels, lut=lut,
            seeds=seeds, stream=stream, scale=scale, causal=causal, s_index_map=s_index_map,
            y_index_map=y_index_map, key_padding_mask=key_padding_mask, q_start=q_start,
            noise=noise, photons=photons,
        )
        ctx.save_for_backward(q, k, v, fwd["s_raw"], fwd["p"], fwd["y"], q_range, k_range,
                              s_range, v_range)
        ctx.scale, ctx.clipped = scale, clipped
        return fwd["y"]

    @staticmethod
    def backward(ctx, grad_y):
        q, k, v, s_raw, p, y, q_range, k_range, s_range, v_range = ctx.saved_tensors
        dq, dk, dv = optical_attention_backward(
            grad_y, q, k, v, {"s_raw": s_raw, "p": p, "y": y}, q_range, k_range, s_range,
            v_range, scale=ctx.scale, clipped=ctx.clipped,
        )
        return (dq, dk, dv) + (None,) * 18
