"""The one quantizer and Philox device code every optical kernel uses (semantics page, section 1).

Kept bit-compatible with `torchtitan_ext.optical.reference.quantize` / `philox_uniform`:
- float32 arithmetic in the same order as the reference ((c - lo) / max(hi - lo, 1e-12) * (L-1),
  then k / (L-1) * (hi - lo) + lo); every division is correctly rounded, as torch's is, because
  Triton's plain `/` on float32 may lower to an approximate divide, which would move values that sit
  near a rounding boundary. Both divisors are per-call scalars, so the quotients come from the
  divisor's IEEE reciprocal and a Markstein correction (`div_rn_by`), not from a per-element
  `div_rn` (whose slow-path branches made the quantizer instruction-bound in a memory-bound pass);
- launch kernels that use these functions with `enable_fp_fusion=False`: contracting their
  multiplies and adds into FMAs would round differently from the reference (torch rounds every
  op); the explicit `tl.fma`s below are exact by construction and stay fused;
- round-half-to-even through the 1.5 * 2^23 magic constant, exact for |t| <= 2^22 (t is at most
  L - 1);
- the stochastic rounding's draws: Philox-4x32-7 keyed by (seed, stream); element `idx` (64-bit
  global index) takes half idx & 1 (0: high 16 bits) of word (idx >> 1) & 3 of the block at
  counter idx >> 3 (split in two 32-bit counter words so that index spaces past 2^31 stay
  distinct): one Philox serves eight consecutive elements where a kernel's tile holds them
  together (`philox_bits24_runs`). The shot read-out's Box-Muller words: Philox-4x32-10, word
  idx & 3 of the block at counter idx >> 2 (24 bits each, for the normal's tails). Each mulhilo
  is one 32x32->64-bit product.

One arithmetic, three entry points (they differ only in where the constants come from):
- `quantize`: computes the two reciprocals, RN(1 / max(hi - lo, 1e-12)) and RN(1 / (L - 1)), with
  `div_rn` itself (once per call and thread). For the linear epilogue and pre-passes where the
  cost does not matter.
- `quantize_with`: takes span = max(hi - lo, 1e-12) and both reciprocals precomputed
  (`range_inv_span` once, e.g. in a pre-pass, then `range_consts`; `inv_levels_minus_1` on the
  host): no IEEE-division subroutine call, whose calling convention makes ptxas spill in
  register-bound kernels (fused attention).
- `quantize_with_bits24`: noisy `quantize_with` fed Philox's 24-bit word w (`philox_bits24`)
  instead of u = w * 2^-24, folding "+ u" into one exact fma; also returns the level index k.
All three give the same bits as the reference (and as each other) for the same inputs.
"""

import numpy as np
import triton
import triton.language as tl

# 1.5 * 2^23: for -2^22 <= t <= 2^22, t + C lies in [2^23, 2^24) where float32 spacing is exactly 1,
# so adding and subtracting C rounds t half to even (t goes down to -0.5 in noisy mode).
# A constexpr: compiled (non-interpreted) kernels may read only constexpr globals.
_ROUND_MAGIC = tl.constexpr(12582912.0)
# Triton's interpreter (TRITON_INTERPRET, set before triton is imported) truncates its float32 ->
# bfloat16 conversions; `cast_rne` rounds by hand there only. Read as Triton reads it (1, true,
# yes, on), so that no spelling of the switch skips the hand rounding.
_INTERPRETING = tl.constexpr(bool(triton.knobs.runtime.interpret))


# --------------------------------------------------------------------------------------------
# Philox-4x32-10
# --------------------------------------------------------------------------------------------
@triton.jit
def _mulhilo32(a, b: tl.constexpr):
    # One 32x32->64-bit multiply (IMAD.WIDE.U32) gives both halves: measured faster on an H200
    # than separate mul.hi / mul.lo (~15% fewer instructions in attention's hot loops), same bits.
    # (`a.to(tl.uint64) * b`, with the constant promoted implicitly, compiles to the same PTX.)
    p = a.to(tl.uint64) * tl.full(a.shape, b, tl.uint64)
    return (p >> 32).to(tl.uint32), p.to(tl.uint32)


@triton.jit
def _philox4_c2(seed, stream, counter, C2: tl.constexpr, ROUNDS: tl.constexpr):
    """The four 32-bit output words of Philox-4x32-ROUNDS for int64 `counter` (counter words
    (lo, hi, C2, 0)), key (seed, stream). C2 = 0: the rounding noise (7 rounds) and Box-Muller's
    first draw (10 rounds); 1: Box-Muller's second draw."""
    c = counter.to(tl.int64)
    c0 = (c & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((c >> 32) & 0xFFFFFFFF).to(tl.uint32)
    if C2 == 0:
        c2 = tl.zeros(c0.shape, tl.uint32)
    else:
        c2 = tl.full(c0.shape, C2, tl.uint32)
    c3 = tl.zeros(c0.shape, tl.uint32)
    k0 = (seed.to(tl.int64) & 0xFFFFFFFF).to(tl.uint32)
    k1 = (stream.to(tl.int64) & 0xFFFFFFFF).to(tl.uint32)
    for _ in tl.static_range(ROUNDS):
        hi_a, lo_a = _mulhilo32(c0, 0xD2511F53)
        hi_b, lo_b = _mulhilo32(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _bits24(word):
    # (word >> 8) | 1 = 2 j + 1 with j = word >> 9 (23 random bits): u = (2 j + 1) 2^-24 =
    # (j + 1/2) 2^-23, the page's unbiased draw with b = 23, exact in float32 (section 1.3)
    return ((word >> 8) | 1).to(tl.float32)


@triton.jit
def _half24(word, HALF: tl.constexpr):
    # 16 bits j of a word (HALF 0: high, 1: low) as (2 j + 1) 2^7, an odd multiple of 2^7 below
    # 2^24: u = that * 2^-24 = (j + 1/2) 2^-16, the page's unbiased draw with b = 16, exact in
    # float32 and in the hot loops' fma with 2^-24 (section 1.3)
    if HALF == 0:
        h = word >> 16
    else:
        h = word & 0xFFFF
    return ((h << 8) | 0x80).to(tl.float32)


@triton.jit
def _pick_word(w0, w1, w2, w3, lane):
    # output word `lane` (0-3) of a Philox block, per element (the reference's `_pick`)
    return tl.where(lane < 2, tl.where(lane == 0, w0, w1), tl.where(lane == 2, w2, w3))


@triton.jit
def _element_draw(w0, w1, w2, w3, idx):
    # the draw of element `idx` of a Philox-4x32-7 block's eight: half idx & 1 (0: high) of
    # word (idx >> 1) & 3 (any integer idx whose low three bits are the element's)
    w = _pick_word(w0, w1, w2, w3, (idx >> 1) & 3)
    return tl.where((idx & 1) == 0, _half24(w, 0), _half24(w, 1))


@triton.jit
def philox_bits24(seed, stream, index):
    """The stochastic rounding's draw w behind `philox_uniform` = w * 2^-24, for any int64
    `index` tensor: w = (2 j + 1) 2^7, j the 16 bits of half (index & 1) (0: high) of word
    (index >> 1) & 3 of the Philox-4x32-7 block at counter index >> 3, key (seed, stream), as the
    reference. One Philox per element (seven of its eight draws thrown away): for index sets
    without aligned runs of eight; hot loops whose indices come in aligned runs use
    `philox_bits24_runs`. Returning w lets a hot loop fold "+ u" into one exact fma
    (`quantize_with_bits24`)."""
    idx = index.to(tl.int64)
    w0, w1, w2, w3 = _philox4_c2(seed, stream, idx >> 3, 0, 7)
    return _element_draw(w0, w1, w2, w3, idx)


@triton.jit
def philox_bits24_c2(seed, stream, index, C2: tl.constexpr):
    """The shot read-out's Box-Muller word (odd, 24 bits, as float32): word index & 3 of the
    Philox-4x32-10 block at counter (index >> 2, C2), key (seed, stream), shifted right by 8
    with its lowest bit set, as the reference's `_philox_bits24`."""
    idx = index.to(tl.int64)
    w0, w1, w2, w3 = _philox4_c2(seed, stream, idx >> 2, C2, 10)
    w = _pick_word(w0, w1, w2, w3, idx & 3)
    return _bits24(w)


@triton.jit
def philox_bits24_runs(seed, stream, block):
    """`philox_bits24` of an [R, 8 * C] tile whose element (r, 8 c + e) has global index
    8 * block[r, c] + e (block: int64 [R, C]), from one Philox-4x32-7 per eight elements: the
    tile's indices run along its columns in aligned groups of eight, each group one block,
    element e reading half e & 1 of word e >> 1."""
    w0, w1, w2, w3 = _philox4_c2(seed, stream, block, 0, 7)
    # join adds a minor dim: join(join(join(a, b), join(c, d)), join(join(p, q), join(r, s)))
    # [.., i, j, k] is leaf (k: first or second group, j: pair, i: member), which the row-major
    # reshape puts at column 8 c + 4 i + 2 j + k. Element e = 4 i + 2 j + k is half e & 1 of
    # word e >> 1: the leaves in order are elements 0, 4, 2, 6, 1, 5, 3, 7.
    h0, l0 = _half24(w0, 0), _half24(w0, 1)
    h1, l1 = _half24(w1, 0), _half24(w1, 1)
    h2, l2 = _half24(w2, 0), _half24(w2, 1)
    h3, l3 = _half24(w3, 0), _half24(w3, 1)
    w = tl.join(tl.join(tl.join(h0, h2), tl.join(h1, h3)),
                tl.join(tl.join(l0, l2), tl.join(l1, l3)))
    return tl.reshape(w, (block.shape[0], 8 * block.shape[1]))


@triton.jit
def philox_bits24_runs_c2(seed, stream, block, C2: tl.constexpr):
    """`philox_bits24_c2` (the shot read-out's words) of an [R, 4 * C] tile whose element
    (r, 4 c + j) has global index 4 * block[r, c] + j, from one Philox-4x32-10 per four
    elements."""
    w0, w1, w2, w3 = _philox4_c2(seed, stream, block, C2, 10)
    # join(x, y) adds a minor dim selecting x or y: join(join(a, b), join(c, d))[r, c, i, j] is
    # (a, b)[i] at j = 0 and (c, d)[i] at j = 1. With (a, b, c, d) = words (0, 2, 1, 3) that is
    # word 2 i + j, which the row-major reshape puts at column 4 c + 2 i + j.
    w = tl.join(tl.join(_bits24(w0), _bits24(w2)), tl.join(_bits24(w1), _bits24(w3)))
    return tl.reshape(w, (block.shape[0], 4 * block.shape[1]))


@triton.jit
def _over_columns(w, W: tl.constexpr):
    # [R, W // 8] -> [R, W]: each block's word repeated over the block's eight columns
    R: tl.constexpr = w.shape[0]
    return tl.reshape(tl.broadcast_to(w[:, :, None], (R, W // 8, 8)), (R, W))


@triton.jit
def philox_bits24_spread(seed, stream, block, W: tl.constexpr):
    """`philox_bits24_runs` of the same [R, W] tile (block: int64 [R, W // 8]) by broadcasting
    each Philox word over its block's eight columns and picking, per column, the word and half
    of its element, instead of interleaving the eight draws with joins. Same bits. The compiler
    then derives the draws' register layout from the consumer's (the MMA accumulator's) and
    needs no layout conversion through shared memory, at the price of computing a block's Philox
    in every thread that holds one of its elements (4 threads in a Hopper MMA tile)."""
    w0, w1, w2, w3 = _philox4_c2(seed, stream, block, 0, 7)
    return _element_draw(_over_columns(w0, W), _over_columns(w1, W), _over_columns(w2, W),
                         _over_columns(w3, W), (tl.arange(0, W) & 7)[None, :])


@triton.jit
def philox_bits24_rows(seed, stream, row_index, col0, cols, W: tl.constexpr, RUNS: tl.constexpr):
    """`philox_bits24` (the rounding draws) of an [R, W] tile of a row-major index space:
    `row_index` [R] is the global index of each row's column 0, `cols` [W] = col0 + [0, W) the
    tile's global columns. RUNS (0, 1 or 2): with 1 or 2 the row indices and col0 are multiples
    of 8, so (with W % 8 == 0) every aligned eight columns share one Philox block, expanded
    into the tile by joins (1, `philox_bits24_runs`) or by broadcasts (2,
    `philox_bits24_spread`); 0, or W % 8 != 0: one block per element. All give the same bits."""
    if RUNS and (W % 8 == 0):
        blocks = (col0 // 8 + tl.arange(0, W // 8)).to(tl.int64)
        block = (row_index // 8)[:, None] + blocks[None, :]
        if RUNS == 2:
            return philox_bits24_spread(seed, stream, block, W)
        else:
            return philox_bits24_runs(seed, stream, block)
    else:
        return philox_bits24(seed, stream, row_index[:, None] + cols[None, :])


@triton.jit
def philox_bits24_rows_c2(seed, stream, row_index, col0, cols, W: tl.constexpr,
                          RUNS: tl.constexpr, C2: tl.constexpr):
    """`philox_bits24_c2` (the shot read-out's words) of such a tile: with RUNS (row indices and
    col0 multiples of 8, hence of 4) and W % 4 == 0, one block per aligned four columns."""
    if RUNS and (W % 4 == 0):
        blocks = (col0 // 4 + tl.arange(0, W // 4)).to(tl.int64)
        return philox_bits24_runs_c2(seed, stream, (row_index // 4)[:, None] + blocks[None, :],
                                     C2)
    else:
        return philox_bits24_c2(seed, stream, row_index[:, None] + cols[None, :], C2)


@triton.jit
def philox_uniform(seed, stream, index):
    """The stochastic rounding's u = (j + 1/2) 2^-16 in (0, 1) (float32) for int64 `index`,
    keyed by (seed, stream); same as the reference."""
    return philox_bits24(seed, stream, index) * (1.0 / 16777216.0)


# --------------------------------------------------------------------------------------------
# Division and range constants
# --------------------------------------------------------------------------------------------
@triton.jit
def div_rn_by(a, d, r):
    """a / d correctly rounded (as `div_rn`), for d > 0 finite and r = div_rn(1, d).

    Markstein's theorem: with r the correctly rounded reciprocal, q0 = RN(a * r) lies within one
    ulp of a / d, the remainder a - q0 * d is exact in one FMA, and RN(q0 + remainder * r) is the
    correctly rounded quotient (barring underflow, which only quotients below ~2^-100 meet, and
    those all round to level 0 alike). tests/test_kernels_linear.py checks it against torch's
    division on many values.
    """
    q0 = a * r
    rem = tl.fma(-q0, d, a)
    return tl.fma(rem, r, q0)


@triton.jit
def range_span(lo, hi):
    """max(hi - lo, 1e-12): the quantizer's first divisor."""
    return tl.maximum(hi - lo, 1e-12)


@triton.jit
def range_inv_span(rng_ptr):
    """RN(1 / max(hi - lo, 1e-12)) of the (lo, hi) range at `rng_ptr`, by an IEEE division: compute
    it once (e.g. in a pre-pass) and hand it to `quantize_with` through `range_consts`."""
    one = tl.full([], 1.0, tl.float32)
    hi = tl.load(rng_ptr + 1)
    lo = tl.load(rng_ptr)
    return tl.math.div_rn(one, range_span(lo, hi))


@triton.jit
def range_consts(rng_ptr, inv_ptr):
    """(lo, hi, span, inv_span) of a range for `quantize_with`; `inv_ptr` holds the precomputed
    `range_inv_span(rng_ptr)`."""
    lo = tl.load(rng_ptr)
    hi = tl.load(rng_ptr + 1)
    return lo, hi, range_span(lo, hi), tl.load(inv_ptr)


def inv_levels_minus_1(levels: int) -> float:
    """Host side: RN(1 / (levels - 1)) in float32 (what `quantize` computes with div_rn), exactly
    representable as a Python float, so passing it as a kernel argument keeps it exact."""
    return float(np.float32(1.0) / np.float32(levels - 1))


# --------------------------------------------------------------------------------------------
# The quantizer
# --------------------------------------------------------------------------------------------
@triton.jit
def round_half_even(t):
    """t rounded half to even (|t| <= 2^22), in float32."""
    return (t + _ROUND_MAGIC) - _ROUND_MAGIC


@triton.jit
def _unit_position(xf, lo, hi, span, inv_span):
    """v = (clamp(x, lo, hi) - lo) / span in [0, 1], the position shared by both read-outs.
    span = None (with inv_span = None): both computed here, after the clamp, by `quantize`."""
    c = tl.minimum(tl.maximum(xf, lo), hi)
    # The None branch keeps `quantize`'s instruction order (the division emitted after the clamp):
    # its kernels compile to the same PTX as the H200-verified code did before this was shared.
    if span is None:
        span = range_span(lo, hi)
        v = div_rn_by(c - lo, span, tl.math.div_rn(1.0, span))
    else:
        v = div_rn_by(c - lo, span, inv_span)
    return v


@triton.jit
def _level_position(xf, lo, hi, span, inv_span, LEVELS: tl.constexpr):
    """t = (clamp(x, lo, hi) - lo) / span * (L - 1), before noise and rounding (see
    `_unit_position` for span = None)."""
    return _unit_position(xf, lo, hi, span, inv_span) * (LEVELS - 1.0)


@triton.jit
def dequantize(k, lo, hi, inv_lm1, LEVELS: tl.constexpr):
    """y = k / (L - 1) * (hi - lo) + lo for level index k (float32), inv_lm1 = RN(1 / (L - 1))
    (None: computed here by div_rn). The only dequantization expression, so every quantizer
    entry point gives the same bits."""
    if inv_lm1 is None:
        q = div_rn_by(k, LEVELS - 1.0, tl.math.div_rn(1.0, LEVELS - 1.0))
    else:
        q = div_rn_by(k, LEVELS - 1.0, inv_lm1)
    return q * (hi - lo) + lo


@triton.jit
def quantize_with(x, lo, hi, span, inv_span, inv_lm1, LEVELS: tl.constexpr, lut,
                  HAS_LUT: tl.constexpr, u, NOISY: tl.constexpr):
    """Q(x) in float32 with the range constants precomputed: span = max(hi - lo, 1e-12),
    inv_span = RN(1 / span), inv_lm1 = RN(1 / (LEVELS - 1)); span, inv_span = None, None and
    inv_lm1 = None compute them here (that is `quantize`). An uninitialised range (lo > hi) passes
    x. `u` (noisy mode) is the per-element uniform from `philox_uniform`; ignored when not NOISY."""
    xf = x.to(tl.float32)
    t = _level_position(xf, lo, hi, span, inv_span, LEVELS)
    if NOISY:
        t = t + u - 0.5
    k = round_half_even(t)
    y = dequantize(k, lo, hi, inv_lm1, LEVELS)
    if HAS_LUT:
        pos_floor = lut * hi
        neg_floor = -lut * tl.abs(lo)
        y = tl.where((y > 0) & (y < pos_floor), pos_floor, y)
        y = tl.where((y < 0) & (y > neg_floor), neg_floor, y)
    return tl.where(lo <= hi, y, xf)


@triton.jit
def quantize(x, lo, hi, LEVELS: tl.constexpr, lut, HAS_LUT: tl.constexpr, u,
             NOISY: tl.constexpr):
    """Q(x) in float32. lo/hi are float32 scalars; an uninitialised range (lo > hi) passes x.

    `quantize_with` with its range constants computed inside, the reciprocals by `div_rn` (the
    same values as the precomputed ones). `u` (noisy mode) is the per-element uniform from
    `philox_uniform`; ignored when not NOISY.
    """
    return quantize_with(x, lo, hi, None, None, None, LEVELS, lut, HAS_LUT, u, NOISY)


@triton.jit
def quantize_with_bits24(x, lo, hi, span, inv_span, inv_lm1, w, LEVELS: tl.constexpr):
    """Noisy Q of float32 x (no lut) given the Philox word w = `philox_bits24(...)`: returns
    (Q(x), its level index k as float32). The same bits as `quantize_with(..., u, NOISY=True)`
    with u = w * 2^-24: since w * 2^-24 is exact, fma(w, 2^-24, t) is t + u with one rounding,
    as the reference's "t + u"; it saves the multiply (and the u register) in hot loops."""
    t = _level_position(x, lo, hi, span, inv_span, LEVELS)
    t = tl.fma(w, 1.0 / 16777216.0, t) - 0.5
    k = round_half_even(t)
    return tl.where(lo <= hi, dequantize(k, lo, hi, inv_lm1, LEVELS), x), k


@triton.jit
def quantize_level(x, lo, hi, span, inv_span, inv_lm1, w, LEVELS: tl.constexpr,
                   NOISY: tl.constexpr):
    """`quantize_with_bits24` (noisy, Philox word w) when NOISY, else deterministic rounding with
    its level index (w ignored: the read-out noise switch `q_noise: false`). Returns (Q(x), k);
    the det result has the same bits as `quantize_with(..., NOISY=False)` without lut."""
    if NOISY:
        return quantize_with_bits24(x, lo, hi, span, inv_span, inv_lm1, w, LEVELS)
    else:
        k = round_half_even(_level_position(x, lo, hi, span, inv_span, LEVELS))
        return tl.where(lo <= hi, dequantize(k, lo, hi, inv_lm1, LEVELS), x), k


# --------------------------------------------------------------------------------------------
# Shot-noise read-out (semantics s.1, `q_readout: shot`)
# --------------------------------------------------------------------------------------------
_TWO_PI = tl.constexpr(6.2831854820251465)  # float32(2 pi), as reference.TWO_PI


@triton.jit
def box_muller(w1, w2):
    """Standard normal z from the two 24-bit Philox words (float32, as `philox_bits24` returns):
    u1 = 1 - w1 2^-24 in (0, 1) (exact), u2 = w2 2^-24, z = sqrt(-2 ln u1) cos(u2 2 pi), the
    reference's `shot_normal` op for op (sqrt correctly rounded; log and cos are the platform's
    float32 functions, within a few ulp of torch's)."""
    u1 = 1.0 - w1 * (1.0 / 16777216.0)
    u2 = w2 * (1.0 / 16777216.0)
    r = tl.sqrt_rn(-2.0 * tl.log(u1))
    return r * tl.cos(u2 * _TWO_PI)


@triton.jit
def quantize_shot(x, lo, hi, span, inv_span, inv_lm1, z, nk, LEVELS: tl.constexpr):
    """The shot read-out Q of x (no lut): v = (clamp(x) - lo) / span, v' = v + sqrt(max(v, 0) /
    nk) z (IEEE division and sqrt), then deterministic rounding of clamp(v', 0, 1) * (L - 1) and
    the usual dequantization. nk = n * K in float32 (a scalar or a tensor broadcastable to x);
    span, inv_span, inv_lm1 = None: computed here (as `quantize`). Returns (Q(x), k)."""
    xf = x.to(tl.float32)
    v = _unit_position(xf, lo, hi, span, inv_span)
    v = v + tl.sqrt_rn(tl.math.div_rn(tl.maximum(v, 0.0), nk)) * z
    v = tl.minimum(tl.maximum(v, 0.0), 1.0)
    k = round_half_even(v * (LEVELS - 1.0))
    return tl.where(lo <= hi, dequantize(k, lo, hi, inv_lm1, LEVELS), xf), k


# --------------------------------------------------------------------------------------------
# Gradient mask and output cast
# --------------------------------------------------------------------------------------------
@triton.jit
def in_range(x, lo, hi):
    """True where the gradient passes in `clipped` mode (inside the range, or range unset)."""
    xf = x.to(tl.float32)
    # Same as `inside | (lo > hi)`, written as a select on the scalar condition: Triton's
    # interpreter (3.9) splats a scalar comparison result with the wrong dtype and fails on `|`.
    return tl.where(lo <= hi, (xf >= lo) & (xf <= hi), True)


@triton.jit
def cast_rne(y, dtype: tl.constexpr):
    """float32 -> `dtype` with round-to-nearest-even, the rounding torch's `.to()` uses.

    Compiled, that is the plain conversion (one cvt.rn per element). Under Triton's interpreter
    (the CPU test path), which truncates in its own float32 -> bfloat16 conversion, bfloat16 is
    rounded by hand: the integer trick gives the same bits for finite values, so CPU tests and
    the GPU agree. (A NaN stays a NaN in both; the trick on the GPU had turned the GPU's
    canonical NaN 0x7FFFFFFF into -0.0.)
    """
    if _INTERPRETING and dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(dtype)
