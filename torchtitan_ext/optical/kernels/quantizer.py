"""The one quantizer device function every optical kernel uses (semantics page, section 1).

Kept bit-compatible with `torchtitan_ext.optical.reference.quantize` / `philox_uniform`:
- float32 arithmetic in the same order as the reference ((c - lo) / max(hi - lo, 1e-12) * (L-1));
  every division is correctly rounded, as torch's is, because Triton's plain `/` on float32 may
  lower to an approximate divide, which would move values that sit near a rounding boundary.
  Both divisors are per-call scalars, so the quotients come from one IEEE reciprocal per thread
  and a Markstein correction (`_div_rn_by`), not from a per-element `div_rn` (whose slow-path
  branches made the quantizer instruction-bound in a memory-bound pass);
- launch kernels that use `quantize` with `enable_fp_fusion=False`: contracting its multiplies
  and adds into FMAs would round differently from the reference (torch rounds every op);
- round-half-to-even through the 1.5 * 2^23 magic constant, exact for |t| <= 2^22 (t is at most L-1);
- Philox-4x32-10 keyed by (seed, stream) on the 64-bit global element index, the index split in
  two 32-bit counter words so that index spaces past 2^31 (long attention) stay distinct.
"""

import triton
import triton.language as tl

# 1.5 * 2^23: for -2^22 <= t <= 2^22, t + C lies in [2^23, 2^24) where float32 spacing is exactly 1,
# so adding and subtracting C rounds t half to even (t goes down to -0.5 in noisy mode).
# A constexpr: compiled (non-interpreted) kernels may read only constexpr globals.
_ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _mulhilo32(a, b: tl.constexpr):
    # One 32x32->64-bit multiply (IMAD.WIDE.U32) gives both halves: measured faster on an H200
    # than separate mul.hi / mul.lo, with the same bits.
    p = a.to(tl.uint64) * tl.full(a.shape, b, tl.uint64)
    return (p >> 32).to(tl.uint32), p.to(tl.uint32)


@triton.jit
def philox_uniform(seed, stream, index):
    """u in [0, 1) (float32) for int64 `index`, keyed by (seed, stream); same as the reference."""
    idx = index.to(tl.int64)
    c0 = (idx & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((idx >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = tl.zeros(c0.shape, tl.uint32)
    c3 = tl.zeros(c0.shape, tl.uint32)
    k0 = (seed.to(tl.int64) & 0xFFFFFFFF).to(tl.uint32)
    k1 = (stream.to(tl.int64) & 0xFFFFFFFF).to(tl.uint32)
    for _ in tl.static_range(10):
        hi_a, lo_a = _mulhilo32(c0, 0xD2511F53)
        hi_b, lo_b = _mulhilo32(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return (c0 >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _div_rn_by(a, d, r):
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
def quantize(x, lo, hi, LEVELS: tl.constexpr, lut, HAS_LUT: tl.constexpr, u,
             NOISY: tl.constexpr):
    """Q(x) in float32. lo/hi are float32 scalars; an uninitialised range (lo > hi) passes x.

    `u` (noisy mode) is the per-element uniform from `philox_uniform`; ignored when not NOISY.
    """
    xf = x.to(tl.float32)
    c = tl.minimum(tl.maximum(xf, lo), hi)
    span = tl.maximum(hi - lo, 1e-12)
    t = _div_rn_by(c - lo, span, tl.math.div_rn(1.0, span)) * (LEVELS - 1.0)
    if NOISY:
        t = t + u - 0.5
    k = (t + _ROUND_MAGIC) - _ROUND_MAGIC
    y = _div_rn_by(k, LEVELS - 1.0, tl.math.div_rn(1.0, LEVELS - 1.0)) * (hi - lo) + lo
    if HAS_LUT:
        pos_floor = lut * hi
        neg_floor = -lut * tl.abs(lo)
        y = tl.where((y > 0) & (y < pos_floor), pos_floor, y)
        y = tl.where((y < 0) & (y > neg_floor), neg_floor, y)
    return tl.where(lo <= hi, y, xf)


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

    bfloat16 is rounded by hand: Triton's interpreter (the CPU test path) truncates in its own
    float32 -> bfloat16 conversion, which would make CPU tests disagree with the GPU. The integer
    trick is exact for finite values and costs a few integer ops in an epilogue.
    """
    if dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(dtype)
