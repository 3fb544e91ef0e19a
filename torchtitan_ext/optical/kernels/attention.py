"""Fused optical attention (semantics page, section 3), forward and backward, never L x L in memory.

What is computed, per batch and head (causal or not):
    S = Q_s(Q_q(q) @ Q_k(k)^T)              Q_q det, Q_k det + lut, Q_s noisy (seed seeds[0])
    P = softmax(S * scale + mask)            float32
    Y = Q_y(Q_p(P) @ Q_v(v))                 Q_p det on [0, 1], Q_v det + lut, Q_y noisy (seeds[1])
and the straight-through (optionally clipped) gradients of `reference.optical_attention_backward`.
Speed and memory against flash / cuDNN SDPA (bench/attention.py, bench/attention_parts.py): the
README's performance table (latest figures) and bench/results/README.md (history, raw files).

Why the design looks like this
------------------------------
* The noise, not the matmuls, is the cost. A Philox-4x32-7 block is ~28 integer instructions,
  against 2*D tensor-core FLOPs per S element. When L % 8 == 0 (`RUNS8`) every eight consecutive
  keys of a row share one block (element idx reads half idx & 1 of word (idx >> 1) & 3 of block
  idx >> 3, as the reference), so a tile draws one block per eight elements (quantizer.py's
  `philox_bits24_rows`: the eight draws interleaved into the tile by joins, which the compiler
  lays out through shared memory, bench/noise_layouts.py; `override_configs(draws=
  "broadcasts")` computes each block in every thread that holds one of its elements instead,
  slower on the H200: bench/results/README.md, stop 23);
  otherwise each element runs its own block. Everything
  below minimises how often S is generated and what each generation costs.
* Two passes in the forward. Q_p quantizes the *normalised* P, so the row max and sum must be final
  before any Q_p(P) @ V can be accumulated. Pass 1 generates the S tiles (dot + Philox + Q_s), keeps
  the online max/sum and writes each element's Q_s level index (1 byte for levels <= 256) to a
  per-program scratch; pass 2 reads the codes back, forms P = exp(S - m) / l, quantizes it and
  accumulates Q_p(P) @ Q_v(v): no second S dot and no second Philox, so pass 2 costs ~1/4 of
  pass 1. Both passes and the backward exponentiate the level index itself (`_logit_step`:
  S_q * scale * log2(e) = k * step + a per-call offset, which cancels in P), so no S element is
  ever dequantized. The forward grid is persistent (one or two
  programs per SM, items longest-first) so the scratch is per resident program ([BM, L] codes,
  capped at 512 MiB in all: 69 MB at L=4096) instead of L x L. Past the cap (L > ~64k), with
  more than 32768 levels, or while the S range is unset (S passes through), pass 2 regenerates S.
* One S generation in the backward: a single FlashAttention-2 style kernel (one program per key
  block, looping over the query blocks of every query head of its GQA group) recomputes P, keeps
  dK, dV in registers and adds dQ into a float32 buffer with atomics, instead of the two-kernel form
  (dK/dV, then dQ) that would generate S twice. The atomics add in a run-dependent order, so
  under `torch.use_deterministic_algorithms(True)` (read by `attention_backward` at call time)
  that kernel skips dQ and `_bwd_dq_kernel` computes it instead: one program per query block
  summing over key blocks in increasing order, S regenerated once more (semantics 6b).
* All quantizer and Philox arithmetic is quantizer.py's (one copy for every kernel). The hot loops
  use its `philox_bits24` (Philox with 64-bit products, one IMAD.WIDE per mulhilo instead of
  IMAD.HI + IMAD: ~15% fewer hot-loop instructions, returning the 24-bit word) and
  `quantize_with_bits24`, which folds "+ u" into one exact fma and returns Q_s's level index too.
* The quantizer's two divisions are Markstein-corrected reciprocal multiplies (`div_rn_by`: the
  correctly rounded quotient); the reciprocals RN(1 / (hi - lo)) and RN(1 / (levels - 1)) are
  precomputed once per launch (`range_inv_span` by program 0 of the pre-pass, `range_consts` per
  program, `inv_levels_minus_1` on the host) and handed to `quantize_with`, so no IEEE-division
  subroutine is called in these register-bound kernels (its call makes ptxas spill). The plain
  `quantize` (reciprocals by `div_rn`, same bits) is used where cost does not matter (elementwise
  pre-passes).
* Operands are quantized once, outside the hot loops: a forward pre-pass writes Q_k(k), Q_v(v) to
  temporaries (re-read by every query block) and each program quantizes its Q tile in registers; a
  backward pre-pass writes Q_q(q) (re-read by every key block) and D_i = rowsum(dY * Y), and each
  backward program quantizes its K block in registers.
* Q_p is exact on the tensor cores: Q_p(P) = k / (levels - 1) with an integer k, which bf16
  (levels <= 257) and fp16 (levels <= 2049) hold exactly (larger levels: k = 256 a + b, two dots).
  The accumulator is divided by levels - 1 once at the end, so Q_p(P) @ Q_v(v) matches the
  reference's float32 product up to accumulation order.
* Bit-compatibility with the reference: kernels are launched with mul+add -> fma contraction off
  (Triton contracts by default on the GPU, never in the interpreter). Contracted, the dequantization
  k / (L-1) * (hi - lo) + lo leaves ~1e-8 where the reference computes an exact 0, and the lut then
  raises that to its floor: whole-floor errors in Q_k/Q_v, seen on the H200. The explicit fmas above
  are exact by construction.
* Global noise indices are int64: (((b + b_off) * Hg + h + h_off) * L + i) * L + j for S and
  (... + i) * D + d for Y; pointer offsets of the batch/head/row parts are int64 as well.
* Range observation is fused: each program writes the (min, max) of what it saw (q rows, unmasked S
  before Q_s, y_raw before Q_y; k/v in the pre-pass) to a small partial buffer that device
  reductions fold; no host synchronisation anywhere.
* Padding and cached decoding: a key padding mask (bool [B, Lk], read as bytes) is a HAS_KPM
  constexpr, so the maskless training path compiles as before; with it, the forward and the
  deterministic dQ pass treat every key tile as a masked tile (one [BN] visibility vector per
  tile), the dK/dV kernel folds visibility into its per-key-block column mask. Rows with no
  visible key output 0 and store lse = +inf (P = 0 in the backward). `q_start` (runtime int)
  places query row r at absolute position q_start + r over Lk >= Lq keys: causal limit and noise
  indices are those of row q_start + r of the full attention at key length Lk.
* Per-quantizer levels and the shot read-out (issue 16): `LEVELS` is Q_s's levels (the S
  tiles, their codes and `inv_lm1`); `LEVELS_Q`, `LEVELS_K`, `LEVELS_P`, `LEVELS_Y` (and the
  pre-pass's `LEVELS_V`) are constexprs of their own, whose reciprocals are `inv_lm1` itself when
  they equal `LEVELS` (the default: the same code as before) and one div_rn per item otherwise;
  P_MODE follows Q_p's levels, the code dtype Q_s's. `NOISE` is 0 (q_noise off), 1 (stochastic
  rounding) or 2 (shot read-out): S tiles then draw z by Box-Muller from two Philox-4x32-10
  words, at counter word 2 = 0 and 1 (`philox_bits24_rows_c2`, runs of four under RUNS8)
  with NK_S = float32(n) * float32(D), a runtime float32 argument (a constexpr would compile
  the kernels again for every photon budget of an evaluation sweep); Y takes its per-row n * K
  (K = keys the row sees, >= 1) from a float32 [B, Lq] tensor the host builds with torch ops
  (no sync). The backward's and the deterministic dQ pass's S regeneration run the same code.
* Rows and keys past L are masked; padded keys in the backward get P = 0 so that no inf * 0 can
  reach dQ. Tile configurations are a small table per head dim (chosen by bench/attention.py
  --sweep on an H200), no autotuning: one compile per shape family, no stalls in a trainer.

Under TRITON_INTERPRET=1 (CPU tests) two workarounds are switched on by the INTERP flag: bf16 dots
are done on float32 copies (the interpreter's bf16 dot multiplies raw bit patterns; the upcast is
exact since bf16 products are exact in float32), and float32 -> bf16 casts of matmul operands round
to nearest even (`cast_rne`) instead of truncating.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from .. import reference as ref
from .quantizer import (
    box_muller,
    cast_rne,
    div_rn_by,
    in_range,
    inv_levels_minus_1,
    philox_bits24_c2,
    philox_bits24_rows,
    philox_bits24_rows_c2,
    philox_uniform,
    quantize,
    quantize_shot,
    quantize_level,
    quantize_with,
    range_consts,
    range_inv_span,
    round_half_even,
)

__all__ = ["attention_forward", "attention_backward", "override_configs", "kernel_config",
           "compile_options", "SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
# float32 runs its dots in IEEE precision (FMA units, not tensor cores): for inference of float32
# models (HF exports), where the reference's materialised L x L path would be far slower.
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _store_inv_ranges(INV, r0, r1, r2, r3, r4):
    """INV[i] = RN(1 / max(hi_i - lo_i, 1e-12)) (IEEE division, once per launch, by program 0 of a
    pre-pass kernel where the division subroutine costs nothing), for `range_consts`."""
    tl.store(INV + 0, range_inv_span(r0))
    tl.store(INV + 1, range_inv_span(r1))
    tl.store(INV + 2, range_inv_span(r2))
    tl.store(INV + 3, range_inv_span(r3))
    tl.store(INV + 4, range_inv_span(r4))


@triton.jit
def _inv_of(inv_lm1, LEVELS: tl.constexpr, LEVELS_X: tl.constexpr):
    """RN(1 / (LEVELS_X - 1)) given inv_lm1 = RN(1 / (LEVELS - 1)): inv_lm1 itself when the
    levels agree (the default: the same code as before per-quantizer levels), else by div_rn."""
    if LEVELS_X == LEVELS:
        return inv_lm1
    else:
        return tl.math.div_rn(tl.full([], 1.0, tl.float32), tl.full([], LEVELS_X - 1.0,
                                                                     tl.float32))


@triton.jit
def _dot(a, b, INTERP: tl.constexpr):
    if INTERP:
        # The interpreter's bf16 dot multiplies the raw uint16 bit patterns; float32 is exact here.
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif a.dtype == tl.float32:
        # float32 operands (a float32 model, e.g. an HF export loaded as saved): full-precision
        # products as the reference's float32 matmuls, not TF32's 10-bit mantissas. The branch
        # is resolved at compile time: the 16-bit kernels are unchanged.
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _to_dt(x, DT: tl.constexpr, INTERP: tl.constexpr):
    """float32 -> matmul operand dtype, round to nearest even (by hand under the interpreter)."""
    if INTERP:
        return cast_rne(x, DT)
    else:
        return x.to(DT)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["lut"])
def _prep_kv_kernel(
    K, V, KQ, VQ, PART, INV, q_rng, k_rng, v_rng, s_rng, y_rng,
    skb, skh, skl, skd, svb, svh, svl, svd,
    HKV, L, lut,
    LEVELS: tl.constexpr, HAS_LUT: tl.constexpr, D: tl.constexpr, BLK: tl.constexpr,
    OBSERVE: tl.constexpr, LEVELS_V: tl.constexpr,
):
    """Q_k(k) (LEVELS) and Q_v(v) (LEVELS_V) into contiguous temporaries (input dtype), their
    observed ranges, and the
    range reciprocals of the forward kernel."""
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    if (pid == 0) & (hk == 0) & (b == 0):
        _store_inv_ranges(INV, q_rng, k_rng, v_rng, s_rng, y_rng)
    rows = pid * BLK + tl.arange(0, BLK)
    offs_d = tl.arange(0, D)
    row_ok = rows < L
    m2 = row_ok[:, None]
    r64 = rows.to(tl.int64)[:, None]
    k = tl.load(K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
                + r64 * skl + offs_d[None, :] * skd,
                mask=m2, other=0.0)
    v = tl.load(V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
                + r64 * svl + offs_d[None, :] * svd,
                mask=m2, other=0.0)
    klo = tl.load(k_rng)
    khi = tl.load(k_rng + 1)
    vlo = tl.load(v_rng)
    vhi = tl.load(v_rng + 1)
    kq = cast_rne(quantize(k, klo, khi, LEVELS, lut, HAS_LUT, 0.0, False), KQ.dtype.element_ty)
    vq = cast_rne(quantize(v, vlo, vhi, LEVELS_V, lut, HAS_LUT, 0.0, False), VQ.dtype.element_ty)
    out = ((b * HKV + hk).to(tl.int64) * L + r64) * D + offs_d[None, :]
    tl.store(KQ + out, kq, mask=m2)
    tl.store(VQ + out, vq, mask=m2)
    if OBSERVE:
        kf = k.to(tl.float32)
        vf = v.to(tl.float32)
        part = PART + ((b * HKV + hk) * tl.num_programs(0) + pid).to(tl.int64) * 4
        tl.store(part + 0, tl.min(tl.where(m2, kf, float("inf"))))
        tl.store(part + 1, tl.max(tl.where(m2, kf, float("-inf"))))
        tl.store(part + 2, tl.min(tl.where(m2, vf, float("inf"))))
        tl.store(part + 3, tl.max(tl.where(m2, vf, float("-inf"))))


@triton.jit
def _quantize_s(s_raw, seed, stream, row_idx, start_n, cols, slo, shi, s_rng, s_inv, inv_lm1,
                LEVELS: tl.constexpr, BN: tl.constexpr, RUNS8: tl.constexpr, NOISE: tl.constexpr,
                NK_S, TRANSPOSED: tl.constexpr):
    """Q_s's level index k (float32) of a raw [BM, BN] tile of S, or of its transpose [BN, BM] with
    TRANSPOSED (the backward): the noise of rows whose global index of column 0 is `row_idx`
    [BM], columns `cols` [BN] (start_n + [0, BN)). NOISE 2: shot read-out, K = D, Box-Muller on
    two Philox draws; 1: stochastic rounding; 0: deterministic rounding, no Philox. One code
    for the forward and the backward's regeneration, so both draw the same words. The kernels
    need k only (`_logit_value`, the level codes), never Q_s(S) itself."""
    if NOISE == 2:
        z = box_muller(philox_bits24_rows_c2(seed, stream, row_idx, start_n, cols, BN, RUNS8, 0),
                       philox_bits24_rows_c2(seed, stream, row_idx, start_n, cols, BN, RUNS8, 1))
        if TRANSPOSED:
            z = tl.trans(z)
        _, lvl = quantize_shot(s_raw, slo, shi, s_rng, s_inv, inv_lm1, z,
                               tl.zeros(s_raw.shape, tl.float32) + NK_S, LEVELS)
    else:
        if NOISE:
            w = philox_bits24_rows(seed, stream, row_idx, start_n, cols, BN, RUNS8)
            if TRANSPOSED:
                w = tl.trans(w)
        else:
            w = 0.0
        _, lvl = quantize_level(s_raw, slo, shi, s_rng, s_inv, inv_lm1, w, LEVELS, NOISE)
    return lvl


@triton.jit
def _logit_step(slo, shi, inv_lm1, scale_log2):
    """(step, offset) of the softmax's log2-domain logits S_q * scale * log2(e) = val * step +
    offset, val = `_logit_value`: Q_s's level index k while the S range is set (S_q = lo +
    k (hi - lo) / (L - 1)), raw S while it is unset (S passes through). The offset is one number
    for every element, so the softmax never adds it; only the stored log-sum-exp carries it.
    Exponentiating k * step skips the dequantization of every S element (five instructions in
    each pass and in the backward); P moves by float rounding only (P was exp2-approximate
    already)."""
    is_set = slo <= shi
    step = tl.where(is_set, (shi - slo) * inv_lm1 * scale_log2, scale_log2)
    offset = tl.where(is_set, slo * scale_log2, 0.0)
    return step, offset


@triton.jit
def _logit_value(s_raw, lvl, slo, shi):
    """What the softmax exponentiates, in units of `_logit_step`'s step."""
    return tl.where(slo <= shi, lvl, s_raw)


@triton.jit
def _fwd_s_tile(qq, kq_base, kvis_base, start_n, offs_m, offs_n, offs_d, row_idx, L, seed, stream,
                slo, shi, s_rng, s_inv, inv_lm1,
                LEVELS: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr,
                MASK: tl.constexpr, HAS_KPM: tl.constexpr, RUNS8: tl.constexpr,
                INTERP: tl.constexpr,
                NOISE: tl.constexpr, NK_S, LEVELS_Q: tl.constexpr,
    LEVELS_K: tl.constexpr, LEVELS_P: tl.constexpr, LEVELS_Y: tl.constexpr):
    """One [BM, BN] tile of S from the operands: raw S (float32 accumulator), the softmax's value
    (`_logit_value`), Q_s's level index k (float32) and the valid-element mask (MASK tiles
    only). `offs_m` are the rows' absolute positions (q_start + r), `L` the key length.
    NOISE=False (`q_noise` off): Q_s rounds deterministically and no Philox runs."""
    cols = start_n + offs_n
    kp = kq_base + cols.to(tl.int64)[:, None] * D + offs_d[None, :]
    if MASK:
        k = tl.load(kp, mask=(cols < L)[:, None], other=0.0)
    else:
        k = tl.load(kp)
    s_raw = _dot(qq, tl.trans(k), INTERP)
    lvl = _quantize_s(s_raw, seed, stream, row_idx, start_n, cols, slo, shi, s_rng, s_inv,
                      inv_lm1, LEVELS, BN, RUNS8, NOISE, NK_S, False)
    valid = _valid(offs_m, cols, L, kvis_base, CAUSAL, MASK, HAS_KPM)
    return s_raw, _logit_value(s_raw, lvl, slo, shi), lvl, valid, cols


@triton.jit
def _valid(rows, cols, L, kvis_base, CAUSAL: tl.constexpr, MASK: tl.constexpr,
           HAS_KPM: tl.constexpr):
    """Unmasked (causal, in-bounds, visible key) positions of a tile; only MASK tiles need one.
    `rows` are absolute query positions; `kvis_base` the batch's key visibility bytes (HAS_KPM:
    one [BN] vector per tile, every tile is a MASK tile then)."""
    if MASK:
        valid = (cols < L)[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None])
        if HAS_KPM:
            vis = tl.load(kvis_base + cols, mask=cols < L, other=0)
            valid = valid & (vis != 0)[None, :]
    else:
        valid = cols[None, :] >= 0  # all true: shape-only placeholder, never used
    return valid


@triton.jit
def _fwd_pass1(m_i, l_i, smin, smax, qq, kq_base, kvis_base, code_base, W, lo, hi, offs_m, offs_n,
               offs_d, row_idx, L, seed, stream, slo, shi, s_rng, s_inv, inv_lm1, step,
               LEVELS: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               CAUSAL: tl.constexpr, MASK: tl.constexpr, HAS_KPM: tl.constexpr,
               OBSERVE: tl.constexpr, CODES: tl.constexpr, RUNS8: tl.constexpr,
               INTERP: tl.constexpr,
               NOISE: tl.constexpr, NK_S, LEVELS_Q: tl.constexpr,
    LEVELS_K: tl.constexpr, LEVELS_P: tl.constexpr, LEVELS_Y: tl.constexpr):
    """Row max / sum of exp2 of the logits without their offset (`_logit_step`) over tiles
    [lo, hi) (online softmax), the S range seen, and (CODES) Q_s's level indices written to this
    program's scratch rows for pass 2. HAS_KPM: a row may have seen no visible key yet (max
    -inf); it keeps l = 0 instead of a NaN."""
    rl = tl.arange(0, BM)
    for start_n in range(lo, hi, BN):
        s_raw, val, lvl, valid, cols = _fwd_s_tile(
            qq, kq_base, kvis_base, start_n, offs_m, offs_n, offs_d, row_idx, L, seed, stream,
            slo, shi, s_rng, s_inv, inv_lm1, LEVELS, D, BN, CAUSAL, MASK, HAS_KPM, RUNS8, INTERP,
            NOISE, NK_S, LEVELS_Q, LEVELS_K, LEVELS_P, LEVELS_Y)
        x = val * step
        if MASK:
            x = tl.where(valid, x, float("-inf"))
        if CODES:
            if INTERP:  # unset S range: the codes are unused; keep numpy's cast warning quiet
                lvl = tl.where(slo <= shi, lvl, 0.0)
            code = lvl.to(code_base.dtype.element_ty)
            tl.store(code_base + rl[:, None] * W + cols[None, :], code)
        if OBSERVE:
            if MASK:
                smin = tl.minimum(smin, tl.min(tl.where(valid, s_raw, float("inf")), 1))
                smax = tl.maximum(smax, tl.max(tl.where(valid, s_raw, float("-inf")), 1))
            else:
                smin = tl.minimum(smin, tl.min(s_raw, 1))
                smax = tl.maximum(smax, tl.max(s_raw, 1))
        m_new = tl.maximum(m_i, tl.max(x, 1))
        if HAS_KPM:
            # -inf - -inf would be NaN: a row with nothing visible so far subtracts 0 instead
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        l_i = l_i * tl.math.exp2(m_i - m_use) + tl.sum(tl.math.exp2(x - m_use[:, None]), 1)
        m_i = m_new
    return m_i, l_i, smin, smax


@triton.jit
def _pv_tile(acc, val, valid, m_i, t_scale, vq_base, cols, offs_d, L, inv_lm1, step,
             LEVELS: tl.constexpr, D: tl.constexpr, MASK: tl.constexpr, P_MODE: tl.constexpr,
             INTERP: tl.constexpr):
    """acc += Q_p(P) @ Q_v(v) for one tile of S (val: `_logit_value`; t_scale: each row's
    (levels - 1) / l, `_fwd_pass2`). P_MODE 0: the integer level indices k (exact in the
    operand dtype), 1: k split as 256 * a + b, two dots with exact operands, 2: k / (levels - 1)
    rounded to the operand dtype (levels > 65536 only)."""
    DT: tl.constexpr = vq_base.dtype.element_ty
    # val * step rounded as pass 1 rounded it (no fma), so the row's maximum gets exp2(0) = 1
    # exactly and equal S values equal terms. Q_p over the fixed range [0, 1] is
    # t = clamp(P, 0, 1) * (levels - 1) (the division by hi - lo = 1 is exact), k = round-half-
    # even(t); 1 / l and levels - 1 enter as one factor per row, t_scale (one multiply per
    # element less), so the maximum's t is RN((levels - 1) / l) as P * (levels - 1) rounds: Q_p's
    # exact ties (two equal keys: 127.5 of 255) round as the reference's. Elsewhere t moves by
    # one rounding (the softmax is approximate anyway: exp2).
    t = tl.math.exp2(val * step - m_i[:, None]) * t_scale[:, None]
    if MASK:
        t = tl.where(valid, t, 0.0)
    kp = round_half_even(tl.minimum(t, LEVELS - 1.0))
    vp = vq_base + cols.to(tl.int64)[:, None] * D + offs_d[None, :]
    if MASK:
        v = tl.load(vp, mask=(cols < L)[:, None], other=0.0)
    else:
        v = tl.load(vp)
    if P_MODE == 0:
        acc += _dot(kp.to(DT), v, INTERP)
    elif P_MODE == 1:
        k_hi = tl.floor(kp * (1.0 / 256.0)) * 256.0
        acc += _dot(k_hi.to(DT), v, INTERP)
        acc += _dot((kp - k_hi).to(DT), v, INTERP)
    else:
        acc += _dot(_to_dt(div_rn_by(kp, LEVELS - 1.0, inv_lm1), DT, INTERP), v, INTERP)
    return acc


@triton.jit
def _fwd_pass2_recompute(acc, m_i, t_scale, qq, kq_base, kvis_base, vq_base, lo, hi, offs_m,
                         offs_n, offs_d, row_idx, L, seed, stream, slo, shi, s_rng, s_inv, inv_lm1,
                         step,
                         LEVELS: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                         CAUSAL: tl.constexpr, MASK: tl.constexpr, HAS_KPM: tl.constexpr,
                         P_MODE: tl.constexpr, RUNS8: tl.constexpr, INTERP: tl.constexpr,
                         NOISE: tl.constexpr, NK_S, LEVELS_Q: tl.constexpr,
    LEVELS_K: tl.constexpr, LEVELS_P: tl.constexpr, LEVELS_Y: tl.constexpr):
    """Pass 2 regenerating S (dot + Philox), for when no level codes are kept (passthrough S
    range, levels > 65536, or no room for the scratch)."""
    for start_n in range(lo, hi, BN):
        s_raw, val, lvl, valid, cols = _fwd_s_tile(
            qq, kq_base, kvis_base, start_n, offs_m, offs_n, offs_d, row_idx, L, seed, stream,
            slo, shi, s_rng, s_inv, inv_lm1, LEVELS, D, BN, CAUSAL, MASK, HAS_KPM, RUNS8, INTERP,
            NOISE, NK_S, LEVELS_Q, LEVELS_K, LEVELS_P, LEVELS_Y)
        acc = _pv_tile(acc, val, valid, m_i, t_scale, vq_base, cols, offs_d, L,
                       _inv_of(inv_lm1, LEVELS, LEVELS_P), step, LEVELS_P, D, MASK, P_MODE,
                       INTERP)
    return acc


@triton.jit
def _fwd_pass2_codes(acc, m_i, t_scale, code_base, W, vq_base, kvis_base, lo, hi, offs_m, offs_n,
                     offs_d, L, inv_lm1, step,
                     LEVELS: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     CAUSAL: tl.constexpr, MASK: tl.constexpr, HAS_KPM: tl.constexpr,
                     P_MODE: tl.constexpr, INTERP: tl.constexpr, LEVELS_P: tl.constexpr):
    """Pass 2 from the level codes pass 1 wrote (read only while the S range is set, so the
    softmax's value is the level index itself: the same bits as `_fwd_pass2_recompute`),
    without the S dot or Philox."""
    rl = tl.arange(0, BM)
    for start_n in range(lo, hi, BN):
        cols = start_n + offs_n
        lvl = tl.load(code_base + rl[:, None] * W + cols[None, :]).to(tl.float32)
        valid = _valid(offs_m, cols, L, kvis_base, CAUSAL, MASK, HAS_KPM)
        acc = _pv_tile(acc, lvl, valid, m_i, t_scale, vq_base, cols, offs_d, L,
                       _inv_of(inv_lm1, LEVELS, LEVELS_P), step, LEVELS_P, D, MASK, P_MODE,
                       INTERP)
    return acc


@triton.jit
def _fwd_q_tile(Q, b, h, offs_m, offs_d, row_ok, sqb, sqh, sql, sqd, qlo, qhi, q_w, q_inv,
                inv_lm1, DT: tl.constexpr, LEVELS: tl.constexpr, LEVELS_Q: tl.constexpr,
                OBSERVE: tl.constexpr):
    """The item's Q tile, quantized once in registers: (Q_q(q) in DT, and (OBSERVE) the min and
    max of its in-bounds rows, else 0.0 placeholders that are never read)."""
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
                + offs_m.to(tl.int64)[:, None] * sql + offs_d[None, :] * sqd,
                mask=row_ok[:, None], other=0.0)
    qq = cast_rne(quantize_with(q, qlo, qhi, q_w, q_inv, _inv_of(inv_lm1, LEVELS, LEVELS_Q),
                                LEVELS_Q, 0.0, False, 0.0, False), DT)
    if OBSERVE:
        qf = q.to(tl.float32)
        q_min = tl.min(tl.where(row_ok[:, None], qf, float("inf")))
        q_max = tl.max(tl.where(row_ok[:, None], qf, float("-inf")))
    else:
        q_min = 0.0
        q_max = 0.0
    return qq, q_min, q_max


@triton.jit
def _key_tile_split(q_start, start_m, LK, BM: tl.constexpr, BN: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr):
    """(n_full, n_end) for query rows [start_m, start_m + BM) at absolute position q_start + r:
    key tiles [0, n_full) need no mask, [n_full, n_end) do (n_full a BN multiple below the
    diagonal; 0 with a key mask, which every tile needs). Shared by the forward and the
    deterministic dQ pass, which walk S alike."""
    if CAUSAL:
        n_full = ((q_start + start_m) // BN) * BN  # keys j < q_start + start_m: no mask needed
        n_end = tl.minimum(q_start + start_m + BM, LK)
    else:
        n_full = (LK // BN) * BN
        n_end = LK
    if HAS_KPM:
        n_full = 0  # every tile needs the key mask
    return n_full, n_end


@triton.jit
def _fwd_row_stats(qq, kq_base, kvis_base, CODES, W, n_full, n_end, pos, offs_n, offs_d, row_idx,
                   LK, seed_s, stream, slo, shi, s_rng, s_inv, inv_lm1, step,
                   LEVELS: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, OBSERVE: tl.constexpr,
                   USE_CODES: tl.constexpr, RUNS8: tl.constexpr, INTERP: tl.constexpr,
                   NOISE: tl.constexpr, NK_S, LEVELS_Q: tl.constexpr,
                   LEVELS_K: tl.constexpr, LEVELS_P: tl.constexpr, LEVELS_Y: tl.constexpr):
    """Pass 1 over the item's key tiles, unmasked [0, n_full) then masked [n_full, n_end):
    (row max m, row sum l of exp2, S min, S max), each [BM] float32 (see `_fwd_pass1`)."""
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    smin = tl.full([BM], float("inf"), tl.float32)
    smax = tl.full([BM], float("-inf"), tl.float32)
    m_i, l_i, smin, smax = _fwd_pass1(
        m_i, l_i, smin, smax, qq, kq_base, kvis_base, CODES, W, 0, n_full, pos, offs_n, offs_d,
        row_idx, LK, seed_s, stream, slo, shi, s_rng, s_inv, inv_lm1, step,
        LEVELS, D, BM, BN, CAUSAL, False, HAS_KPM, OBSERVE, USE_CODES, RUNS8, INTERP,
        NOISE, NK_S, LEVELS_Q, LEVELS_K, LEVELS_P, LEVELS_Y)
    m_i, l_i, smin, smax = _fwd_pass1(
        m_i, l_i, smin, smax, qq, kq_base, kvis_base, CODES, W, n_full, n_end, pos, offs_n,
        offs_d, row_idx, LK, seed_s, stream, slo, shi, s_rng, s_inv, inv_lm1, step,
        LEVELS, D, BM, BN, CAUSAL, True, HAS_KPM, OBSERVE, USE_CODES, RUNS8, INTERP,
        NOISE, NK_S, LEVELS_Q, LEVELS_K, LEVELS_P, LEVELS_Y)
    return m_i, l_i, smin, smax


@triton.jit
def _fwd_softmax_norm(m_i, l_i, HAS_KPM: tl.constexpr):
    """(m, 1 / l, alive) from pass 1's row statistics, for P = exp2(val * step - m) / l
    (`_logit_step`). HAS_KPM: a row that saw no visible key (l = 0) is not alive and gets m = 0,
    1 / l = 0, hence P = 0 without a NaN; without a key mask every row sees a key (alive is
    True, never read)."""
    if HAS_KPM:
        alive = l_i > 0.0  # the row saw a visible key (its max term contributes exp2(0) = 1)
        inv_l = tl.where(alive, 1.0 / tl.where(alive, l_i, 1.0), 0.0)
        m_i = tl.where(alive, m_i, 0.0)  # P = exp2(val * step - m) * 0 = 0 in dead rows, no NaN
    else:
        alive = True
        inv_l = 1.0 / l_i
    return m_i, inv_l, alive


@triton.jit
def _fwd_quantize_y(acc, bh_g, b, pos, offs_m, offs_d, row_ok, LQ, LK, NKY, seed_y, stream, ylo,
                    yhi, y_w, y_inv, inv_lm1, LEVELS: tl.constexpr, D: tl.constexpr,
                    BM: tl.constexpr, P_MODE: tl.constexpr, NOISE: tl.constexpr,
                    LEVELS_P: tl.constexpr, LEVELS_Y: tl.constexpr):
    """(Q_y(y_raw), y_raw) of a [BM, D] output tile: y_raw = acc / (LEVELS_P - 1) (P_MODE < 2:
    acc holds level indices; 2: it is y_raw already); Q_y's noise index of element (row, d) is
    that of row `pos` of the full [.., LK, D] output."""
    if P_MODE < 2:
        y_raw = div_rn_by(acc, LEVELS_P - 1.0, _inv_of(inv_lm1, LEVELS, LEVELS_P))
    else:
        y_raw = acc

    inv_ly = _inv_of(inv_lm1, LEVELS, LEVELS_Y)
    if NOISE == 2:  # shot read-out of Y: K = the keys each row sees (host-computed n * K)
        y_idx = (bh_g * LK + pos)[:, None] * D + offs_d[None, :]
        z_y = box_muller(philox_bits24_c2(seed_y, stream, y_idx, 0),
                         philox_bits24_c2(seed_y, stream, y_idx, 1))
        nk_y = tl.load(NKY + b.to(tl.int64) * LQ + offs_m, mask=row_ok, other=1.0)
        y, _ = quantize_shot(y_raw, ylo, yhi, y_w, y_inv, inv_ly, z_y,
                             nk_y[:, None] + tl.zeros([BM, D], tl.float32), LEVELS_Y)
    else:
        if NOISE:
            u_y = philox_uniform(seed_y, stream,
                                 (bh_g * LK + pos)[:, None] * D + offs_d[None, :])
        else:
            u_y = 0.0
        y = quantize_with(y_raw, ylo, yhi, y_w, y_inv, inv_ly, LEVELS_Y, 0.0, False, u_y, NOISE)
    return y, y_raw


@triton.jit
def _fwd_store_rows(Y, LSE, y, m_i, l_i, offset, alive, bh, offs_m, offs_d, row_ok, LQ,
                    DT: tl.constexpr, D: tl.constexpr, HAS_KPM: tl.constexpr):
    """Stores the item's output rows (y cast to DT) and their log2-domain log-sum-exp (pass 1's
    m + log2(l) plus the logits' `_logit_step` offset); returns the rows whose y_raw counts as
    observed: in bounds and (HAS_KPM) alive."""
    y_ok = row_ok
    if HAS_KPM:
        l_i = tl.where(alive, l_i, 1.0)  # log2(0) would be computed, then discarded
    lse = (m_i + offset) + tl.math.log2(l_i)
    if HAS_KPM:
        # no visible key: output exactly 0; lse = +inf makes the backward's P = 0 there
        y = tl.where(alive[:, None], y, 0.0)
        lse = tl.where(alive, lse, float("inf"))
        y_ok = row_ok & alive
    row_lin = bh.to(tl.int64) * LQ + offs_m
    tl.store(Y + row_lin[:, None] * D + offs_d[None, :], cast_rne(y, DT), mask=row_ok[:, None])
    tl.store(LSE + row_lin, lse, mask=row_ok)
    return y_ok


@triton.jit
def _fwd_store_observed(part, q_min, q_max, smin, smax, y_raw, row_ok, y_ok):
    """The item's six observed extrema at `part`: (min, max) of q, of S over in-bounds rows and
    of y_raw over `y_ok` rows."""
    tl.store(part + 0, q_min)
    tl.store(part + 1, q_max)
    tl.store(part + 2, tl.min(tl.where(row_ok, smin, float("inf"))))
    tl.store(part + 3, tl.max(tl.where(row_ok, smax, float("-inf"))))
    tl.store(part + 4, tl.min(tl.where(y_ok[:, None], y_raw, float("inf"))))
    tl.store(part + 5, tl.max(tl.where(y_ok[:, None], y_raw, float("-inf"))))


@triton.jit
def _fwd_item(t, Q, KQ, VQ, Y, LSE, PART, CODES, KPM, sqb, sqh, sql, sqd,
              H, HKV, LQ, LK, q_start, W, num_m, BH, stream, b_off, h_off, Hg, step, offset,
              inv_lm1, qlo, qhi, q_w, q_inv, slo, shi, s_rng, s_inv, ylo, yhi, y_w, y_inv,
              seed_s, seed_y, NKY,
              LEVELS: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, OBSERVE: tl.constexpr,
              P_MODE: tl.constexpr, USE_CODES: tl.constexpr, RUNS8: tl.constexpr,
              INTERP: tl.constexpr, NOISE: tl.constexpr, NK_S, LEVELS_Q: tl.constexpr,
    LEVELS_K: tl.constexpr, LEVELS_P: tl.constexpr, LEVELS_Y: tl.constexpr):
    """One work item: query rows [start_m, start_m + BM) of one (batch, head). Items are numbered
    longest first (the last causal row block of every head, then the one before, ...). Row r is
    absolute position q_start + r of the full attention over LK keys (its noise indices too)."""
    pid_m = num_m - 1 - t // BH
    bh = t % BH
    b = bh // H
    h = bh % H
    hk = h // (H // HKV)
    start_m = pid_m * BM
    offs_m = start_m + tl.arange(0, BM)
    pos = q_start + offs_m  # absolute positions
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < LQ
    DT: tl.constexpr = KQ.dtype.element_ty

    qq, q_min, q_max = _fwd_q_tile(Q, b, h, offs_m, offs_d, row_ok, sqb, sqh, sql, sqd, qlo, qhi,
                                   q_w, q_inv, inv_lm1, DT, LEVELS, LEVELS_Q, OBSERVE)
    bh_g = (b + b_off).to(tl.int64) * Hg + (h + h_off)
    row_idx = (bh_g * LK + pos) * LK  # global S index of (q_start + r, 0), int64
    kv_off = (b * HKV + hk).to(tl.int64) * LK * D
    kq_base = KQ + kv_off
    vq_base = VQ + kv_off
    kvis_base = KPM + b.to(tl.int64) * LK  # read only when HAS_KPM
    n_full, n_end = _key_tile_split(q_start, start_m, LK, BM, BN, CAUSAL, HAS_KPM)

    m_i, l_i, smin, smax = _fwd_row_stats(
        qq, kq_base, kvis_base, CODES, W, n_full, n_end, pos, offs_n, offs_d, row_idx, LK,
        seed_s, stream, slo, shi, s_rng, s_inv, inv_lm1, step, LEVELS, D, BM, BN, CAUSAL,
        HAS_KPM, OBSERVE, USE_CODES, RUNS8, INTERP, NOISE, NK_S, LEVELS_Q, LEVELS_K, LEVELS_P,
        LEVELS_Y)
    m_p, inv_l, alive = _fwd_softmax_norm(m_i, l_i, HAS_KPM)
    acc = _fwd_pass2(m_p, inv_l, qq, kq_base, kvis_base, vq_base, CODES, W, n_full, n_end, pos,
                     offs_n, offs_d, row_idx, LK, seed_s, stream, slo, shi, s_rng, s_inv,
                     inv_lm1, step, LEVELS, D, BM, BN, CAUSAL, HAS_KPM, P_MODE, USE_CODES,
                     RUNS8, INTERP, NOISE, NK_S, LEVELS_Q, LEVELS_K, LEVELS_P, LEVELS_Y)
    y, y_raw = _fwd_quantize_y(acc, bh_g, b, pos, offs_m, offs_d, row_ok, LQ, LK, NKY, seed_y,
                               stream, ylo, yhi, y_w, y_inv, inv_lm1, LEVELS, D, BM, P_MODE,
                               NOISE, LEVELS_P, LEVELS_Y)
    y_ok = _fwd_store_rows(Y, LSE, y, m_p, l_i, offset, alive, bh, offs_m, offs_d, row_ok, LQ,
                           DT, D, HAS_KPM)
    if OBSERVE:
        _fwd_store_observed(PART + (bh * num_m + pid_m).to(tl.int64) * 6, q_min, q_max, smin,
                            smax, y_raw, row_ok, y_ok)


@triton.jit
def _fwd_pass2(m_i, inv_l, qq, kq_base, kvis_base, vq_base, CODES, W, n_full, n_end, pos,
               offs_n, offs_d, row_idx, LK, seed_s, stream, slo, shi, s_rng, s_inv, inv_lm1,
               step, LEVELS: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
               BN: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
               P_MODE: tl.constexpr, USE_CODES: tl.constexpr, RUNS8: tl.constexpr,
               INTERP: tl.constexpr,
               NOISE: tl.constexpr, NK_S, LEVELS_Q: tl.constexpr,
    LEVELS_K: tl.constexpr, LEVELS_P: tl.constexpr, LEVELS_Y: tl.constexpr):
    """acc = Q_p(P) @ Q_v(v) (unscaled level indices) over the tiles pass 1 saw, from the level
    codes when kept, else regenerating S."""
    acc = tl.zeros([BM, D], tl.float32)
    t_scale = inv_l * (LEVELS_P - 1.0)  # Q_p's t = P * (levels - 1) = exp2(...) * t_scale
    if USE_CODES:
        # Pass 2 reads codes other threads of this program wrote (the load layout is not the MMA
        # layout of the stores): a CTA barrier orders those global writes before the reads.
        tl.debug_barrier()
    # Codes hold Q_s's level index, meaningless when the S range is unset (S passes through):
    # then, and when no codes are kept, S is regenerated.
    if USE_CODES and (slo <= shi):
        acc = _fwd_pass2_codes(
            acc, m_i, t_scale, CODES, W, vq_base, kvis_base, 0, n_full, pos, offs_n, offs_d, LK,
            inv_lm1, step, LEVELS, D, BM, BN, CAUSAL, False, HAS_KPM, P_MODE,
            INTERP, LEVELS_P)
        acc = _fwd_pass2_codes(
            acc, m_i, t_scale, CODES, W, vq_base, kvis_base, n_full, n_end, pos, offs_n, offs_d,
            LK, inv_lm1, step, LEVELS, D, BM, BN, CAUSAL, True, HAS_KPM, P_MODE,
            INTERP, LEVELS_P)
    else:
        acc = _fwd_pass2_recompute(
            acc, m_i, t_scale, qq, kq_base, kvis_base, vq_base, 0, n_full, pos, offs_n, offs_d,
            row_idx, LK, seed_s, stream, slo, shi, s_rng, s_inv, inv_lm1, step,
            LEVELS, D, BN, CAUSAL, False, HAS_KPM, P_MODE, RUNS8, INTERP,
            NOISE, NK_S, LEVELS_Q, LEVELS_K, LEVELS_P, LEVELS_Y)
        acc = _fwd_pass2_recompute(
            acc, m_i, t_scale, qq, kq_base, kvis_base, vq_base, n_full, n_end, pos, offs_n, offs_d,
            row_idx, LK, seed_s, stream, slo, shi, s_rng, s_inv, inv_lm1, step,
            LEVELS, D, BN, CAUSAL, True, HAS_KPM, P_MODE, RUNS8, INTERP,
            NOISE, NK_S, LEVELS_Q, LEVELS_K, LEVELS_P, LEVELS_Y)
    return acc


@triton.jit(do_not_specialize=["stream", "b_off", "h_off", "q_start"])
def _fwd_kernel(
    Q, KQ, VQ, Y, LSE, PART, CODES, KPM, INV, q_rng, s_rng_ptr, y_rng, seeds, NKY, QSTART,
    sqb, sqh, sql, sqd,
    H, HKV, LQ, LK, q_start, W, num_m, BH, stream, b_off, h_off, Hg, scale_log2, inv_lm1,
    LEVELS: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, OBSERVE: tl.constexpr, P_MODE: tl.constexpr,
    USE_CODES: tl.constexpr, RUNS8: tl.constexpr, INTERP: tl.constexpr,
    NOISE: tl.constexpr, NK_S, LEVELS_Q: tl.constexpr,
    LEVELS_K: tl.constexpr, LEVELS_P: tl.constexpr, LEVELS_Y: tl.constexpr,
    QSTART_PTR: tl.constexpr,
):
    """Persistent forward: program `pid` takes items pid, pid + P, ... (P programs, longest items
    first), and owns scratch rows CODES[pid] ([BM, W] level codes) for pass 1 -> pass 2.
    KPM: uint8 [B, LK] key visibility (read only when HAS_KPM). QSTART_PTR: q_start is read from
    QSTART (int64 [1]) instead of the argument, so that a CUDA graph of a static-cache decoding
    step replays at every position."""
    if QSTART_PTR:
        q_start = tl.load(QSTART).to(tl.int32)
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    qlo, qhi, q_w, q_inv = range_consts(q_rng, INV + 0)
    slo, shi, s_rng, s_inv = range_consts(s_rng_ptr, INV + 3)
    ylo, yhi, y_w, y_inv = range_consts(y_rng, INV + 4)
    seed_s = tl.load(seeds)
    seed_y = tl.load(seeds + 1)
    step, offset = _logit_step(slo, shi, inv_lm1, scale_log2)
    code_base = CODES + pid.to(tl.int64) * BM * W
    for t in range(pid, BH * num_m, n_prog):
        if USE_CODES:
            # no thread may overwrite the scratch (pass 1 of this item) while another still
            # reads the previous item's codes (its pass 2)
            tl.debug_barrier()
        _fwd_item(t, Q, KQ, VQ, Y, LSE, PART, code_base, KPM, sqb, sqh, sql, sqd,
                  H, HKV, LQ, LK, q_start, W, num_m, BH, stream, b_off, h_off, Hg, step, offset,
                  inv_lm1, qlo, qhi, q_w, q_inv, slo, shi, s_rng, s_inv, ylo, yhi, y_w, y_inv,
                  seed_s, seed_y, NKY, LEVELS, D, BM, BN, CAUSAL, HAS_KPM, OBSERVE, P_MODE,
                  USE_CODES,
                  RUNS8, INTERP, NOISE, NK_S, LEVELS_Q, LEVELS_K, LEVELS_P, LEVELS_Y)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _prep_bwd_kernel(
    Q, DY, Y, QQ, DELTA, INV, q_rng, k_rng, v_rng, s_rng,
    sqb, sqh, sql, sqd, sdb, sdh, sdl, sdd,
    H, L,
    LEVELS: tl.constexpr, D: tl.constexpr, BLK: tl.constexpr,
):
    """Q_q(q) into a contiguous temporary, D_i = rowsum(dY_i * Y_i) in float32, and the range
    reciprocals of the backward kernel."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    if (pid == 0) & (h == 0) & (b == 0):
        _store_inv_ranges(INV, q_rng, k_rng, v_rng, s_rng, s_rng)
    rows = pid * BLK + tl.arange(0, BLK)
    offs_d = tl.arange(0, D)
    row_ok = rows < L
    m2 = row_ok[:, None]
    r64 = rows.to(tl.int64)[:, None]
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
                + r64 * sql + offs_d[None, :] * sqd,
                mask=m2, other=0.0)
    qlo = tl.load(q_rng)
    qhi = tl.load(q_rng + 1)
    row_lin = (b * H + h).to(tl.int64) * L + rows
    qq = cast_rne(quantize(q, qlo, qhi, LEVELS, 0.0, False, 0.0, False), QQ.dtype.element_ty)
    tl.store(QQ + row_lin[:, None] * D + offs_d[None, :], qq, mask=m2)
    dy = tl.load(DY + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
                 + r64 * sdl + offs_d[None, :] * sdd,
                 mask=m2, other=0.0)
    y = tl.load(Y + row_lin[:, None] * D + offs_d[None, :], mask=m2, other=0.0)
    tl.store(DELTA + row_lin, tl.sum(dy.to(tl.float32) * y.to(tl.float32), 1), mask=row_ok)


@triton.jit
def _bwd_st_tile(kq, qq, r64, row_idx0, q_start, LK, start_n, offs_n, seed, stream, slo, shi,
                 s_rng, s_inv, inv_lm1, LEVELS: tl.constexpr, BN: tl.constexpr,
                 RUNS8: tl.constexpr, INTERP: tl.constexpr, NOISE: tl.constexpr,
                 NK_S):
    """One [BN, BM] tile of S^T from the key block and a query block: (raw S^T as the float32
    accumulator, the softmax's value `_logit_value`), drawing the forward's noise words of the
    [BM, BN] tile of S (query rows r64 at absolute positions q_start + r64, keys offs_n),
    transposed."""
    s_raw = _dot(kq, tl.trans(qq), INTERP)  # S^T: [BN, BM]
    # S^T's words: those of the [BM, BN] tile of S, transposed.
    lvl = _quantize_s(s_raw, seed, stream, row_idx0 + (q_start + r64) * LK, start_n, offs_n,
                      slo, shi, s_rng, s_inv, inv_lm1, LEVELS, BN, RUNS8, NOISE, NK_S, True)
    return s_raw, _logit_value(s_raw, lvl, slo, shi)


@triton.jit
def _bwd_tiles(dk, dv, kq, k, v, QQ_h, Q_h, DY_h, LSE_h, DELTA_h, DQA_h, lo, hi, row_idx0, LQ, LK,
               q_start, sql, sqd, sdl, sdd, start_n, offs_n, col_ok, offs_d, seed, stream,
               slo, shi, s_rng, s_inv, inv_lm1, step, offset,
               LEVELS: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               CAUSAL: tl.constexpr, MASK: tl.constexpr, CLIPPED: tl.constexpr,
               RUNS8: tl.constexpr, INTERP: tl.constexpr,
               NOISE: tl.constexpr, NK_S, LEVELS_Q: tl.constexpr,
    LEVELS_K: tl.constexpr, LEVELS_P: tl.constexpr, LEVELS_Y: tl.constexpr,
               DQ: tl.constexpr):
    """For query blocks [lo, hi) of one head: recompute P^T (transposed tiles [BN, BM]) and
    accumulate dV += P^T dY, dK += dS^T q (unscaled), and (DQ) dQ (atomically) += dS k
    (unscaled); without DQ the deterministic dQ pass `_bwd_dq_kernel` computes dQ.
    `col_ok`: keys in bounds and visible (hidden keys get P = 0 in every tile); query row r is
    absolute position q_start + r (its causal limit and its S noise row)."""
    DT: tl.constexpr = kq.dtype
    for start_m in range(lo, hi, BM):
        rows = start_m + tl.arange(0, BM)
        row_ok = rows < LQ
        r64 = rows.to(tl.int64)
        m2 = row_ok[:, None]
        qq = tl.load(QQ_h + r64[:, None] * D + offs_d[None, :], mask=m2, other=0.0)
        q = tl.load(Q_h + r64[:, None] * sql + offs_d[None, :] * sqd, mask=m2, other=0.0)
        dy = tl.load(DY_h + r64[:, None] * sdl + offs_d[None, :] * sdd, mask=m2, other=0.0)
        # Rows past Lq (and rows with no visible key) get lse = +inf, hence P = 0: they add
        # nothing to dK, dV.
        lse = tl.load(LSE_h + r64, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA_h + r64, mask=row_ok, other=0.0)

        s_raw, val = _bwd_st_tile(kq, qq, r64, row_idx0, q_start, LK, start_n, offs_n, seed,
                                  stream, slo, shi, s_rng, s_inv, inv_lm1, LEVELS, BN, RUNS8,
                                  INTERP, NOISE, NK_S)
        # P = exp2(logit - lse), the logit val * step + offset (`_logit_step`)
        p = tl.math.exp2(tl.fma(val, step, (offset - lse)[None, :]))
        if MASK:
            valid = col_ok[:, None]
            if CAUSAL:
                valid = valid & (offs_n[:, None] <= (q_start + rows)[None, :])
            p = tl.where(valid, p, 0.0)
        else:
            p = tl.where(col_ok[:, None], p, 0.0)

        dv += _dot(_to_dt(p, DT, INTERP), dy, INTERP)
        dp = _dot(v, tl.trans(dy), INTERP)
        ds = p * (dp - delta[None, :])
        if CLIPPED:
            ds = tl.where(in_range(s_raw, slo, shi), ds, 0.0)
        ds_c = _to_dt(ds, DT, INTERP)
        dk += _dot(ds_c, q, INTERP)
        if DQ:
            dq = _dot(tl.trans(ds_c), k, INTERP)  # [BM, D]
            tl.atomic_add(DQA_h + r64[:, None] * D + offs_d[None, :], dq, mask=m2,
                          sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["stream", "b_off", "h_off", "lut", "q_start"])
def _bwd_kernel(
    QQ, Q, K, V, DY, LSE, DELTA, DQA, DK, DV, KPM, INV, k_rng, v_rng, s_rng_ptr, seeds,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sdb, sdh, sdl, sdd,
    H, HKV, LQ, L, q_start, stream, b_off, h_off, Hg, scale, scale_log2, inv_lm1, lut,
    LEVELS: tl.constexpr, HAS_LUT: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    CLIPPED: tl.constexpr, RUNS8: tl.constexpr, INTERP: tl.constexpr,
    NOISE: tl.constexpr, NK_S, LEVELS_Q: tl.constexpr,
    LEVELS_K: tl.constexpr, LEVELS_P: tl.constexpr, LEVELS_Y: tl.constexpr,
    DQ: tl.constexpr,
):
    """One program per key block [start_n, start_n + BN) of one (batch, kv head): dK, dV of its
    keys over every query row of its GQA group, dQ by atomics. L is the key length, LQ the
    query length (row r at absolute position q_start + r); KPM uint8 [B, L] (HAS_KPM)."""
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    start_n = pid_n * BN
    offs_n = start_n + tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    col_ok = offs_n < L
    col_vis = col_ok
    if HAS_KPM:
        kvis = tl.load(KPM + b.to(tl.int64) * L + offs_n, mask=col_ok, other=0)
        col_vis = col_ok & (kvis != 0)
    n64 = offs_n.to(tl.int64)[:, None]
    k = tl.load(K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
                + n64 * skl + offs_d[None, :] * skd,
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
                + n64 * svl + offs_d[None, :] * svd,
                mask=col_ok[:, None], other=0.0)
    DT: tl.constexpr = k.dtype
    klo, khi, k_w, k_inv = range_consts(k_rng, INV + 1)
    kq = cast_rne(quantize_with(k, klo, khi, k_w, k_inv, _inv_of(inv_lm1, LEVELS, LEVELS_K),
                                LEVELS_K, lut, HAS_LUT, 0.0, False), DT)

    slo, shi, s_rng, s_inv = range_consts(s_rng_ptr, INV + 3)
    seed_s = tl.load(seeds)
    step, offset = _logit_step(slo, shi, inv_lm1, scale_log2)

    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    diag_lo, diag_end, full_lo = _bwd_row_blocks(start_n, LQ, q_start, BM, BN, CAUSAL)
    for g in range(GROUP):
        dk, dv = _bwd_head(
            dk, dv, kq, k, v, QQ, Q, DY, LSE, DELTA, DQA, b, hk * GROUP + g, H, LQ, L, q_start,
            b_off, h_off, Hg, sqb, sqh, sql, sqd, sdb, sdh, sdl, sdd, start_n, offs_n, col_vis,
            offs_d, diag_lo, diag_end, full_lo, seed_s, stream, slo, shi, s_rng, s_inv, inv_lm1,
            step, offset, LEVELS, D, BM, BN, CAUSAL, CLIPPED, RUNS8, INTERP, NOISE, NK_S,
            LEVELS_Q, LEVELS_K, LEVELS_P, LEVELS_Y, DQ)
    _bwd_store_dk_dv(DK, DV, dk, dv, k, v, klo, khi, v_rng, scale, b, hk, HKV, L, n64, offs_d,
                     col_ok, D, CLIPPED)


@triton.jit
def _bwd_head(dk, dv, kq, k, v, QQ, Q, DY, LSE, DELTA, DQA, b, h, H, LQ, L, q_start, b_off, h_off,
              Hg, sqb, sqh, sql, sqd, sdb, sdh, sdl, sdd, start_n, offs_n, col_vis, offs_d,
              diag_lo, diag_end, full_lo, seed_s, stream, slo, shi, s_rng, s_inv, inv_lm1,
              step, offset, LEVELS: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
              BN: tl.constexpr, CAUSAL: tl.constexpr, CLIPPED: tl.constexpr,
              RUNS8: tl.constexpr, INTERP: tl.constexpr, NOISE: tl.constexpr,
              NK_S, LEVELS_Q: tl.constexpr, LEVELS_K: tl.constexpr,
              LEVELS_P: tl.constexpr, LEVELS_Y: tl.constexpr, DQ: tl.constexpr):
    """(dk, dv) plus the contributions of query head h of batch b to the key block: its
    diagonal row blocks [diag_lo, diag_end) under the causal mask, then [full_lo, LQ) without
    (see `_bwd_row_blocks`); (DQ) its dQ rows by atomics."""
    bh = (b * H + h).to(tl.int64)
    QQ_h = QQ + bh * LQ * D
    Q_h = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    DY_h = DY + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
    LSE_h = LSE + bh * LQ
    DELTA_h = DELTA + bh * LQ
    DQA_h = DQA + bh * LQ * D
    row_idx0 = ((b + b_off).to(tl.int64) * Hg + (h + h_off)) * L * L
    dk, dv = _bwd_tiles(
        dk, dv, kq, k, v, QQ_h, Q_h, DY_h, LSE_h, DELTA_h, DQA_h, diag_lo, diag_end,
        row_idx0, LQ, L, q_start, sql, sqd, sdl, sdd, start_n, offs_n, col_vis, offs_d,
        seed_s, stream, slo, shi, s_rng, s_inv, inv_lm1, step, offset, LEVELS, D, BM, BN,
        CAUSAL, True, CLIPPED, RUNS8, INTERP,
        NOISE, NK_S, LEVELS_Q, LEVELS_K, LEVELS_P, LEVELS_Y, DQ)
    dk, dv = _bwd_tiles(
        dk, dv, kq, k, v, QQ_h, Q_h, DY_h, LSE_h, DELTA_h, DQA_h, full_lo, LQ, row_idx0,
        LQ, L, q_start, sql, sqd, sdl, sdd, start_n, offs_n, col_vis, offs_d, seed_s, stream,
        slo, shi, s_rng, s_inv, inv_lm1, step, offset, LEVELS, D, BM, BN, CAUSAL, False,
        CLIPPED, RUNS8, INTERP, NOISE, NK_S, LEVELS_Q, LEVELS_K, LEVELS_P, LEVELS_Y, DQ)
    return dk, dv


@triton.jit
def _bwd_store_dk_dv(DK, DV, dk, dv, k, v, klo, khi, v_rng, scale, b, hk, HKV, L, n64, offs_d,
                     col_ok, D: tl.constexpr, CLIPPED: tl.constexpr):
    """Stores the key block's dk = scale * dk and dv in k's dtype, zeroed (CLIPPED) where k, v
    were clamped by their quantizer's range."""
    DT: tl.constexpr = k.dtype
    dk = dk * scale
    if CLIPPED:
        vlo = tl.load(v_rng)
        vhi = tl.load(v_rng + 1)
        dk = tl.where(in_range(k, klo, khi), dk, 0.0)
        dv = tl.where(in_range(v, vlo, vhi), dv, 0.0)
    out = ((b * HKV + hk).to(tl.int64) * L + n64) * D + offs_d[None, :]
    tl.store(DK + out, cast_rne(dk, DT), mask=col_ok[:, None])
    tl.store(DV + out, cast_rne(dv, DT), mask=col_ok[:, None])


@triton.jit
def _bwd_row_blocks(start_n, LQ, q_start, BM: tl.constexpr, BN: tl.constexpr,
                    CAUSAL: tl.constexpr):
    """Query row blocks (multiples of BM) a key block [start_n, start_n + BN) meets: diagonal
    blocks [diag_lo, diag_end) need the causal mask, blocks from full_lo on see every key of it.
    Row r is absolute position q_start + r; with q_start = 0 and BN % BM == 0 this is
    [start_n, min(start_n + BN, LQ)) and start_n + BN, as before cached decoding existed."""
    if CAUSAL:
        first = tl.maximum(start_n - q_start, 0)  # first row that sees key start_n
        diag_lo = (first // BM) * BM
        last = tl.maximum(start_n + BN - q_start, 0)  # rows from here see the whole block
        full_lo = ((last + BM - 1) // BM) * BM
        diag_end = tl.minimum(full_lo, LQ)
    else:
        diag_lo = 0
        diag_end = 0
        full_lo = 0
    return diag_lo, diag_end, full_lo


@triton.jit
def _dq_finish_kernel(DQA, Q, DQ, q_rng, sqb, sqh, sql, sqd, H, L, scale,
                      D: tl.constexpr, BLK: tl.constexpr, CLIPPED: tl.constexpr):
    """dq = scale * accumulated dS k (zeroed where q was clamped in `clipped` mode), cast."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    rows = pid * BLK + tl.arange(0, BLK)
    offs_d = tl.arange(0, D)
    m2 = (rows < L)[:, None]
    row_lin = (b * H + h).to(tl.int64) * L + rows
    dq = tl.load(DQA + row_lin[:, None] * D + offs_d[None, :], mask=m2, other=0.0) * scale
    if CLIPPED:
        q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
                    + rows.to(tl.int64)[:, None] * sql + offs_d[None, :] * sqd, mask=m2, other=0.0)
        qlo = tl.load(q_rng)
        qhi = tl.load(q_rng + 1)
        dq = tl.where(in_range(q, qlo, qhi), dq, 0.0)
    tl.store(DQ + row_lin[:, None] * D + offs_d[None, :], cast_rne(dq, DQ.dtype.element_ty),
             mask=m2)


# Deterministic dQ (semantics 6b): with `torch.use_deterministic_algorithms(True)` the dQ atomics
# above (whose float additions land in a run-dependent order) are replaced by one program per
# query block that sums over the key blocks itself, in increasing order. It regenerates every S
# tile once more (the forward's `_fwd_s_tile`, same Philox words): the price of bitwise
# reproducibility, measured by bench/attention.py --deterministic.
@triton.jit
def _dq_tiles(dq, qq, dy, c_row, delta, kq_base, kvis_base, K_h, V_h, skl, skd, svl, svd, lo,
              hi, offs_m, offs_n, offs_d, row_idx, L, seed, stream, slo, shi, s_rng, s_inv,
              inv_lm1, step, LEVELS: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
              CAUSAL: tl.constexpr, MASK: tl.constexpr, HAS_KPM: tl.constexpr,
              CLIPPED: tl.constexpr, RUNS8: tl.constexpr, INTERP: tl.constexpr,
              NOISE: tl.constexpr, NK_S, LEVELS_Q: tl.constexpr,
    LEVELS_K: tl.constexpr, LEVELS_P: tl.constexpr, LEVELS_Y: tl.constexpr):
    """dq += dS @ k (unscaled, unquantized k) over key tiles [lo, hi), in increasing order.
    `offs_m` are absolute query positions, L the key length (as in `_fwd_s_tile`); P =
    exp2(val * step + c_row), c_row = the `_logit_step` offset minus the row's lse."""
    DT: tl.constexpr = kq_base.dtype.element_ty
    for start_n in range(lo, hi, BN):
        s_raw, val, lvl, valid, cols = _fwd_s_tile(
            qq, kq_base, kvis_base, start_n, offs_m, offs_n, offs_d, row_idx, L, seed, stream,
            slo, shi, s_rng, s_inv, inv_lm1, LEVELS, D, BN, CAUSAL, MASK, HAS_KPM, RUNS8, INTERP,
            NOISE, NK_S, LEVELS_Q, LEVELS_K, LEVELS_P, LEVELS_Y)
        # rows past Lq and rows with no visible key have lse = +inf (c_row -inf), hence P = 0
        p = tl.math.exp2(tl.fma(val, step, c_row[:, None]))
        c64 = cols.to(tl.int64)[:, None]
        if MASK:
            p = tl.where(valid, p, 0.0)  # also zero on padded keys: no inf * 0 below
            k = tl.load(K_h + c64 * skl + offs_d[None, :] * skd, mask=(cols < L)[:, None],
                        other=0.0)
            v = tl.load(V_h + c64 * svl + offs_d[None, :] * svd, mask=(cols < L)[:, None],
                        other=0.0)
        else:
            k = tl.load(K_h + c64 * skl + offs_d[None, :] * skd)
            v = tl.load(V_h + c64 * svl + offs_d[None, :] * svd)
        ds = p * (_dot(dy, tl.trans(v), INTERP) - delta[:, None])
        if CLIPPED:
            ds = tl.where(in_range(s_raw, slo, shi), ds, 0.0)
        dq += _dot(_to_dt(ds, DT, INTERP), k, INTERP)
    return dq


@triton.jit(do_not_specialize=["stream", "b_off", "h_off", "q_start"])
def _bwd_dq_kernel(
    QQ, KQ, Q, K, V, DY, LSE, DELTA, DQ, KPM, INV, q_rng, s_rng_ptr, seeds,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sdb, sdh, sdl, sdd,
    H, HKV, LQ, L, q_start, stream, b_off, h_off, Hg, scale, scale_log2, inv_lm1,
    LEVELS: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, CLIPPED: tl.constexpr, RUNS8: tl.constexpr,
    INTERP: tl.constexpr, NOISE: tl.constexpr, NK_S, LEVELS_Q: tl.constexpr,
    LEVELS_K: tl.constexpr, LEVELS_P: tl.constexpr, LEVELS_Y: tl.constexpr,
):
    """dq of query rows [pid * BM, pid * BM + BM) of one (batch, head), scaled, clipped, cast.
    L is the key length; row r is absolute position q_start + r; KPM uint8 [B, L] (HAS_KPM)."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    start_m = tl.program_id(0) * BM
    offs_m = start_m + tl.arange(0, BM)
    pos = q_start + offs_m
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < LQ
    r64 = offs_m.to(tl.int64)
    row_lin = (b * H + h).to(tl.int64) * LQ + r64
    qq = tl.load(QQ + row_lin[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    dy = tl.load(DY + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + r64[:, None] * sdl
                 + offs_d[None, :] * sdd, mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + row_lin, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row_lin, mask=row_ok, other=0.0)
    slo, shi, s_rng, s_inv = range_consts(s_rng_ptr, INV + 3)
    seed_s = tl.load(seeds)
    step, offset = _logit_step(slo, shi, inv_lm1, scale_log2)
    c_row = offset - lse
    hk = h // (H // HKV)
    row_idx = (((b + b_off).to(tl.int64) * Hg + (h + h_off)) * L + pos) * L  # as the forward
    kq_base = KQ + (b * HKV + hk).to(tl.int64) * L * D
    kvis_base = KPM + b.to(tl.int64) * L
    K_h = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    V_h = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    n_full, n_end = _key_tile_split(q_start, start_m, L, BM, BN, CAUSAL, HAS_KPM)
    dq = tl.zeros([BM, D], tl.float32)
    dq = _dq_tiles(dq, qq, dy, c_row, delta, kq_base, kvis_base, K_h, V_h, skl, skd, svl, svd,
                   0, n_full, pos, offs_n, offs_d, row_idx, L, seed_s, stream, slo, shi, s_rng,
                   s_inv, inv_lm1, step, LEVELS, D, BN, CAUSAL, False, HAS_KPM, CLIPPED,
                   RUNS8, INTERP, NOISE, NK_S, LEVELS_Q, LEVELS_K, LEVELS_P, LEVELS_Y)
    dq = _dq_tiles(dq, qq, dy, c_row, delta, kq_base, kvis_base, K_h, V_h, skl, skd, svl, svd,
                   n_full, n_end, pos, offs_n, offs_d, row_idx, L, seed_s, stream, slo, shi,
                   s_rng, s_inv, inv_lm1, step, LEVELS, D, BN, CAUSAL, True, HAS_KPM,
                   CLIPPED, RUNS8, INTERP, NOISE, NK_S, LEVELS_Q, LEVELS_K, LEVELS_P, LEVELS_Y)
    dq = dq * scale
    if CLIPPED:
        q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + r64[:, None] * sql
                    + offs_d[None, :] * sqd, mask=row_ok[:, None], other=0.0)
        dq = tl.where(in_range(q, tl.load(q_rng), tl.load(q_rng + 1)), dq, 0.0)
    tl.store(DQ + row_lin[:, None] * D + offs_d[None, :], cast_rne(dq, DQ.dtype.element_ty),
             mask=row_ok[:, None])


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------
# (BM, BN, num_warps, num_stages) per head dim. Forward: BM query rows per program, BN keys per
# tile (any pair works; BM % BN == 0 keeps the unmasked/diagonal split exact). Backward: BN
# keys per program, BM queries per tile (BN % BM == 0).
# The per-element Philox and quantizer work (~75 instructions per S element and pass) lives in
# registers next to the accumulators; these shapes keep the hot loops free of spills on sm_90
# (checked in the SASS: no local loads/stores inside the loops). bench/attention.py --sweep times
# the alternatives on the GPU.
_FWD_CFG = {
    16: (64, 64, 4, 2),
    32: (64, 64, 4, 2),
    # Four stages: pass 2's loop is short and waits on its code and V tiles from HBM (ncu, stop
    # 20); a deeper prefetch hides it. bench/results/attention-parts-h200-*.json
    64: (64, 32, 4, 4),  # H200, 1.1B shape at 32k: 46.8 ms vs 57.1 (2 stages), 50.7 (3)
    128: (64, 32, 4, 4),  # H200, L=4096: 6.71 ms vs 7.61 (2 stages), 6.96 (3), 7.32 (128, 64, 8, 3)
}
_BWD_CFG = {
    16: (32, 64, 4, 2),
    32: (32, 64, 4, 2),
    64: (64, 64, 4, 2),  # H200, 1.1B shape, 32k: 55.6 ms vs 58.8 (64, 128, 8, 2); 2k: 2.87 vs 2.92
    128: (64, 128, 8, 2),  # H200, L=4096: 7.54 ms vs 8.13 (32, 128, 8, 3), 9.69 (64, 64, 8, 2)
}
# Decoding and short chunks (Lq <= 16 query rows): 16-row programs instead of 64 mostly-empty rows.
# The forward handles any BM, BN (its unmasked tiles end at a BN multiple below the diagonal).
_DECODE_FWD_CFG = {16: (16, 64, 4, 2), 32: (16, 64, 4, 2), 64: (16, 64, 4, 2),
                   128: (16, 32, 4, 2)}
_DECODE_MAX_LQ = 16
# Under the interpreter: small tiles so that tiny test shapes still span several tiles.
_INTERP_FWD_CFG = (32, 16, 4, 1)
_INTERP_DECODE_FWD_CFG = (16, 32, 4, 1)
_INTERP_BWD_CFG = (16, 32, 4, 1)
# The deterministic dQ pass walks S like the forward (BM query rows, BN keys per tile): it uses
# the forward's table (not swept on its own yet).
_KINDS = ("fwd", "bwd", "dq")  # the launches a configuration is picked for
_OVERRIDE: dict[str, object] = {
    "fwd": None, "bwd": None, "dq": None, "code_scratch_bytes": None, "maxnreg": None,
    "fwd_programs_per_sm": None, "draws": None}
# How a tile's runs of eight rounding draws are laid into it (quantizer.philox_bits24_rows):
# "joins" interleaves one Philox block per eight elements (layout conversions through shared
# memory: bench/noise_layouts.py), "broadcasts" computes each block in every thread that holds
# one of its elements. Same bits; the default is the one measured on the GPU so far.
_DRAWS = {"joins": 1, "broadcasts": 2}
_DEFAULT_DRAWS = {"fwd": "joins", "bwd": "joins", "dq": "joins"}


@contextlib.contextmanager
def override_configs(fwd: tuple[int, int, int, int] | None = None,
                     bwd: tuple[int, int, int, int] | None = None,
                     dq: tuple[int, int, int, int] | None = None,
                     code_scratch_bytes: int | None = None,
                     maxnreg: dict[str, int] | None = None,
                     fwd_programs_per_sm: int | None = None,
                     draws: dict[str, str] | None = None):
    """Temporarily force (BM, BN, num_warps, num_stages) of the forward / backward / deterministic
    dQ pass, the cap on the forward's saved-code scratch (0: pass 2 always regenerates S), a
    register cap per kernel kind (`maxnreg`, e.g. {"bwd": 168}: ptxas spills past it; GPU only),
    the forward's persistent programs per SM (default 2 for 4 warps, 1 for 8) and how the S
    tiles' rounding draws are laid out per kernel kind (`draws`, e.g. {"fwd": "broadcasts"};
    "joins" or "broadcasts", same bits).
    The one way benchmarks and tests pick a configuration; not thread-safe."""
    if maxnreg is not None and set(maxnreg) - set(_KINDS):
        raise ValueError(f"maxnreg: keys must be among fwd, bwd, dq, got {sorted(maxnreg)}")
    if fwd_programs_per_sm is not None and fwd_programs_per_sm < 1:
        raise ValueError(f"fwd_programs_per_sm: must be >= 1, got {fwd_programs_per_sm}")
    if draws is not None and (set(draws) - set(_KINDS) or set(draws.values()) - set(_DRAWS)):
        raise ValueError(f"draws: keys must be among fwd, bwd, dq and values among "
                         f"{sorted(_DRAWS)}, got {draws!r}")
    old = dict(_OVERRIDE)
    _OVERRIDE.update(fwd=fwd, bwd=bwd, dq=dq, code_scratch_bytes=code_scratch_bytes,
                     maxnreg=maxnreg, fwd_programs_per_sm=fwd_programs_per_sm, draws=draws)
    try:
        yield
    finally:
        _OVERRIDE.update(old)


def compile_options(kind: str) -> dict:
    """Compile options of a `kind` launch: no fp contraction (see _OPTS), plus an overridden
    register cap (never under the interpreter, which has no registers)."""
    cap = (_OVERRIDE["maxnreg"] or {}).get(kind)
    if cap is None or _interpreting():
        return _OPTS
    return {**_OPTS, "maxnreg": int(cap)}


def triton_kernel(kind: str):
    """The Triton kernel of a `kind` launch ("fwd", "bwd" or "dq"), for tools that inspect its
    compiled code (bench/noise_layouts.py). Its arguments are this module's business: they
    change with the kernels."""
    kernels = {"fwd": _fwd_kernel, "bwd": _bwd_kernel, "dq": _bwd_dq_kernel}
    if kind not in kernels:
        raise ValueError(f"kind: must be one of fwd, bwd, dq, got {kind!r}")
    return kernels[kind]


def runs8(kind: str, length: int) -> int:
    """RUNS8, as a `kind` launch runs at this key length: 0 (one Philox block per element) unless
    the length is a multiple of 8, else 1 (joins) or 2 (broadcasts: `override_configs(draws=)`)."""
    if length % 8:
        return 0
    return _DRAWS[(_OVERRIDE["draws"] or {}).get(kind, _DEFAULT_DRAWS[kind])]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_config(kind: str, head_dim: int, *, lq: int | None = None,
                  dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages) that `kind` ("fwd", "bwd" or "dq") launches at this head
    dim, query length `lq` (None: as many queries as keys) and operand dtype, overrides
    included."""
    if kind not in _KINDS:
        raise ValueError(f"kind: must be one of fwd, bwd, dq, got {kind!r}")
    return _config(kind, head_dim, _interpreting(), lq, dtype)


def _config(kind: str, D: int, interp: bool, lq: int | None = None,
            dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages); the forward of at most _DECODE_MAX_LQ query rows (`lq`)
    takes the small-row decode table; float32 operands take the 16-bit table with D=128's key
    blocks halved and one stage (twice the bytes per tile in registers and shared memory)."""
    decode = kind != "bwd" and lq is not None and lq <= _DECODE_MAX_LQ
    if _OVERRIDE[kind] is not None:
        cfg = _OVERRIDE[kind]
    elif interp:
        cfg = _INTERP_BWD_CFG if kind == "bwd" else (
            _INTERP_DECODE_FWD_CFG if decode else _INTERP_FWD_CFG)
    else:
        cfg = (_BWD_CFG if kind == "bwd" else _DECODE_FWD_CFG if decode else _FWD_CFG)[D]
    if dtype == torch.float32 and not interp and _OVERRIDE[kind] is None:
        bn = cfg[1] // 2 if D == 128 and cfg[1] // 2 >= cfg[0] else cfg[1]
        cfg = (cfg[0], bn, cfg[2], 1)
    bm, bn = cfg[0], cfg[1]
    if kind == "bwd" and bn % bm:
        raise ValueError(f"backward config needs BN % BM == 0, got {cfg}")
    return cfg


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
# Pass 1 of the forward stores Q_s's level index of every S element it computes into a per-program
# scratch ([BM, W] codes, reused by the program's next item) so that pass 2 reads S back instead of
# regenerating it (no second S dot, no second Philox: pass 2 costs ~5x less). The scratch of all
# resident programs is capped; past the cap (very long L) pass 2 regenerates S instead.
_CODE_SCRATCH_CAP = 512 * 2**20
# Every launch disables Triton's mul+add -> fma contraction (on by default on the GPU, absent in
# the interpreter): the reference rounds k / (levels-1) * (hi - lo) and "+ lo" separately, and a
# fused version leaves 1e-8 where the reference gets an exact 0, which the lut then raises to its
# floor (seen on the H200: whole lut-floor errors in Q_k, Q_v). Explicit tl.fma stays fused.
_OPTS = {"enable_fp_fusion": False}
_SM_COUNT: dict[int, int] = {}


def _fwd_grid(n_items: int, codes_per_prog: int, levels: int, warps: int, dev: torch.device,
              interp: bool):
    """(number of persistent programs, level-code dtype or None when pass 2 regenerates S)."""
    code_dtype = torch.uint8 if levels <= 256 else (torch.int16 if levels <= 32768 else None)
    if interp:  # a few programs, so that tests run the persistent loop over several items
        return min(n_items, 3), code_dtype
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    # one 8-warp program or two 4-warp programs per SM (registers allow no more, unless capped)
    resident = _SM_COUNT[idx] * (_OVERRIDE["fwd_programs_per_sm"] or max(1, 8 // warps))
    n_prog = min(n_items, resident)
    if code_dtype is not None:
        per_prog = codes_per_prog * (1 if code_dtype == torch.uint8 else 2)
        cap = _OVERRIDE["code_scratch_bytes"]
        fit = (_CODE_SCRATCH_CAP if cap is None else cap) // per_prog
        if fit >= n_prog:
            pass
        elif fit * 2 >= resident:  # keeping at least half the machine busy beats regenerating S
            n_prog = fit
        else:
            code_dtype = None
    return n_prog, code_dtype


def _p_mode(levels: int, dtype: torch.dtype) -> int:
    """How Q_p(P) enters the P @ V product (see `_fwd_pass2`): 0 when every level index
    0..levels-1 is exact in the operand dtype, 1 when it is after a split in two bytes, else 2."""
    exact = {torch.bfloat16: 256, torch.float16: 2048, torch.float32: 2**24}[dtype]
    if levels - 1 <= exact:
        return 0
    return 1 if levels - 1 <= 65535 else 2


def _check(q, k, v, levels, lut, batch_offset, batch_global, head_offset, heads_global,
           key_padding_mask=None, q_start=0, causal=True):
    """Validate a launch; returns (B, H, Hkv, Lq, Lk, D)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, H, L, D]")
    B, H, L, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k/v shape {tuple(k.shape)}/{tuple(v.shape)} do not match q "
                         f"{tuple(q.shape)}"
                         " (same batch and head dim required)")
    ref.check_attention_args(q, k, key_padding_mask, q_start, causal)
    if H % k.shape[1] != 0:
        raise ValueError(f"query heads {H} must be a multiple of key/value heads {k.shape[1]}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {D} not supported by the fused optical attention "
                         f"(supported: {SUPPORTED_HEAD_DIMS})")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"fused optical attention supports {SUPPORTED_DTYPES}, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError("q, k, v must share a dtype")
    lv = (levels,) * 6 if isinstance(levels, int) else tuple(levels)
    if len(lv) != 6 or not all(isinstance(x, int) and x >= 2 for x in lv):
        raise ValueError(f"levels must be an integer >= 2 or six of them (q, k, s, p, v, y), "
                         f"got {levels}")
    if lut is not None and not (0.0 <= lut < 1.0):
        raise ValueError(f"lut must be in [0, 1), got {lut}")
    if batch_offset < 0 or batch_offset + B > batch_global:
        raise ValueError(f"batch shard [{batch_offset}, {batch_offset + B}) exceeds {batch_global}")
    if head_offset < 0 or head_offset + H > heads_global:
        raise ValueError(f"head shard [{head_offset}, {head_offset + H}) exceeds {heads_global}")
    return B, H, k.shape[1], L, k.shape[2], D


def _levels6(levels) -> tuple[int, int, int, int, int, int]:
    return (int(levels),) * 6 if isinstance(levels, int) else tuple(int(x) for x in levels)


def _level_kw(lv, noise: bool, photons: float, D: int) -> dict:
    """The per-quantizer-level and read-out arguments shared by the S-generating kernels: the
    constexprs LEVELS*, NOISE (0 off, 1 stochastic rounding, 2 shot read-out) and the runtime
    float NK_S = float32(n) * float32(D)."""
    shot = bool(noise) and photons > 0
    return dict(LEVELS=lv[2], LEVELS_Q=lv[0], LEVELS_K=lv[1], LEVELS_P=lv[3], LEVELS_Y=lv[5],
                NOISE=2 if shot else bool(noise),
                NK_S=ref.shot_nk(photons, D, "cpu").item() if shot else 1.0)


def _nk_y(B, LQ, LK, causal, q_start, key_padding_mask, photons, dev):
    """float32 [B, LQ]: n * K of Q_y's shot read-out, K = the keys row r sees (>= 1), as the
    reference computes it (device ops, no host sync)."""
    vis = ref.attention_visibility(B, LQ, LK, causal=causal, q_start=q_start,
                                   key_padding_mask=key_padding_mask, device=dev)
    if vis is None:
        seen = torch.full((B, LQ), LK, dtype=torch.int64, device=dev)
    else:
        seen = vis.expand(B, 1, LQ, LK).sum(-1).reshape(B, LQ).clamp(min=1)
    return ref.shot_nk(photons, seen, dev).contiguous()


def _key_mask_arg(key_padding_mask, dev):
    """(HAS_KPM, uint8 [B, Lk] pointer argument): the bool mask reinterpreted as bytes (no copy
    when contiguous), or a 1-byte dummy that the kernels never read."""
    if key_padding_mask is None:
        return False, torch.zeros(1, dtype=torch.uint8, device=dev)
    return True, key_padding_mask.contiguous().view(torch.uint8)


def attention_forward(q, k, v, q_range, k_range, v_range, s_range, y_range, seeds, *, levels: int,
                      lut: float | None, stream: int, scale: float, causal: bool, batch_offset: int,
                      batch_global: int, head_offset: int, heads_global: int, observe: bool,
                      noise: bool = True, key_padding_mask: torch.Tensor | None = None,
                      q_start: int = 0, photons: float = 0.0):
    """q [B,H,Lq,D], k/v [B,Hkv,Lk,D] (any strides); *_range float32 [2] device tensors (lo > hi =
    uninitialised -> passthrough); seeds int64 device tensor [2] (never read on the host);
    key_padding_mask None or bool [B, Lk] (True = visible); q_start: absolute position of query
    row 0 (q_start + Lq <= Lk), whose noise indices are those of row q_start + r of the full
    [.., Lk, Lk] / [.., Lk, D] tensors; an int, or a 0-d int64 device tensor read in-kernel (a
    static-cache decoding step: one CUDA graph serves every position). noise=False
    (`q_noise: false`): Q_s and Q_y round deterministically, no Philox runs. levels: an int or
    the levels of (Q_q, Q_k, Q_s, Q_p, Q_v, Q_y). photons > 0: the shot read-out of Q_s (K = D)
    and Q_y (K = the keys the row sees).

    Returns (y [B,H,Lq,D] in q's dtype (0 in rows with no visible key), stats float32 [B,H,Lq] =
    log2-domain log-sum-exp of the scaled logits (the backward's P = exp2(Q_s(S) * scale * log2 e
    - stats); +inf in rows with no visible key), obs float32 [5,2]: observed (min, max) of q, k,
    v, S (visible positions, before Q_s), y_raw (rows with a visible key, before Q_y); rows are
    (+inf, -inf) when not `observe`).
    """
    B, H, HKV, LQ, L, D = _check(q, k, v, levels, lut, batch_offset, batch_global, head_offset,
                                 heads_global, key_padding_mask, q_start, causal)
    dev = q.device
    interp = _interpreting()
    # decode table only for cached steps: the training path (Lq == Lk) keeps its tiles and bits
    BM, BN, warps, stages = _config("fwd", D, interp, LQ if LQ < L else None, q.dtype)
    has_kpm, kpm = _key_mask_arg(key_padding_mask, dev)
    lv = _levels6(levels)
    lkw = _level_kw(lv, noise, photons, D)
    nky = _nk_y(B, LQ, L, causal, q_start, key_padding_mask, photons, dev) \
        if lkw["NOISE"] == 2 else None

    kq, vq, part_kv, inv = _quantize_kv(k, v, (q_range, k_range, v_range, s_range, y_range),
                                        lv, lut, observe)
    y = torch.empty((B, H, LQ, D), dtype=q.dtype, device=dev)
    lse = torch.empty((B, H, LQ), dtype=torch.float32, device=dev)
    num_m = triton.cdiv(LQ, BM)
    n_items = B * H * num_m
    part = torch.empty((n_items, 6) if observe else (1, 6), dtype=torch.float32, device=dev)
    W = triton.cdiv(L, BN) * BN  # row length of the level-code scratch
    n_prog, code_dtype = _fwd_grid(n_items, BM * W, lv[2], warps, dev, interp)
    codes = torch.empty((n_prog * BM * W,) if code_dtype is not None else (1,),
                        dtype=code_dtype or torch.uint8, device=dev)
    q_start_dev = isinstance(q_start, torch.Tensor)
    _fwd_kernel[(n_prog,)](
        q, kq, vq, y, lse, part, codes, kpm, inv, q_range, s_range, y_range, seeds,
        nky if nky is not None else inv,  # never read unless NOISE == 2
        q_start if q_start_dev else seeds,  # never read unless QSTART_PTR
        *q.stride(),
        H, HKV, LQ, L, 0 if q_start_dev else int(q_start), W, num_m, B * H, int(stream),
        int(batch_offset),
        int(head_offset), int(heads_global), float(scale) * _LOG2E, inv_levels_minus_1(lv[2]),
        D=D, BM=BM, BN=BN, CAUSAL=bool(causal), HAS_KPM=has_kpm, OBSERVE=observe,
        P_MODE=_p_mode(lv[3], q.dtype), USE_CODES=code_dtype is not None,
        RUNS8=runs8("fwd", L),
        INTERP=interp, **lkw, QSTART_PTR=q_start_dev,
        num_warps=warps, num_stages=stages, **compile_options("fwd"))
    del codes, kq, vq
    return y, lse, _observations(part, part_kv, observe, dev)


def _quantize_kv(k, v, ranges, lv, lut, observe: bool):
    """The forward's pre-pass: (Q_k(k), Q_v(v) as contiguous [B, Hkv, L, D] temporaries, the
    partial (min, max) of k and v per program, the five range reciprocals). `ranges`: the
    (q, k, v, s, y) range tensors."""
    B, HKV, L, D = k.shape
    dev = k.device
    has_lut = lut is not None and lut > 0
    kq = torch.empty((B, HKV, L, D), dtype=k.dtype, device=dev)
    vq = torch.empty((B, HKV, L, D), dtype=v.dtype, device=dev)
    blk = 32  # elementwise pre-pass: small blocks keep register use (and occupancy) sane
    n_prep = triton.cdiv(L, blk)
    part_kv = torch.empty((max(B * HKV * n_prep, 1), 4) if observe else (1, 4),
                          dtype=torch.float32, device=dev)
    inv = torch.empty(5, dtype=torch.float32, device=dev)
    _prep_kv_kernel[(n_prep, HKV, B)](
        k, v, kq, vq, part_kv, inv, *ranges, *k.stride(), *v.stride(), HKV, L,
        float(lut) if has_lut else 0.0,
        LEVELS=lv[1], LEVELS_V=lv[4], HAS_LUT=has_lut, D=D, BLK=blk, OBSERVE=observe,
        num_warps=4, **_OPTS)
    return kq, vq, part_kv, inv


def _observations(part, part_kv, observe: bool, dev) -> torch.Tensor:
    """float32 [5, 2]: (min, max) of q, k, v, S, y_raw folded from the programs' partials by
    device reductions; (+inf, -inf) rows when not observing."""
    if observe:
        fwd_mm = torch.stack([part[:, 0::2].amin(0), part[:, 1::2].amax(0)], dim=1)  # q, s, y
        kv_mm = torch.stack([part_kv[:, 0::2].amin(0), part_kv[:, 1::2].amax(0)], dim=1)  # k, v
        return torch.cat([fwd_mm[:1], kv_mm, fwd_mm[1:]])
    # Built with fills, not from a host list: no host-to-device copy.
    obs = torch.empty((5, 2), dtype=torch.float32, device=dev)
    obs[:, 0].fill_(float("inf"))
    obs[:, 1].fill_(float("-inf"))
    return obs


def attention_backward(dy, q, k, v, y, stats, q_range, k_range, v_range, s_range, seeds, *, levels,
                       lut, stream, scale, causal, batch_offset, batch_global, head_offset,
                       heads_global, clipped: bool, noise: bool = True,
                       deterministic: bool | None = None,
                       key_padding_mask: torch.Tensor | None = None, q_start: int = 0,
                       photons: float = 0.0):
    """Straight-through (or `clipped`) gradients of `attention_forward` (same mask, q_start and
    `noise`: S is recomputed with the same rounding), as
    `reference.optical_attention_backward` defines them. Returns (dq, dk, dv), input dtypes;
    hidden keys get dk = dv = 0, rows with no visible key dq = 0.

    deterministic: None (default) follows `torch.are_deterministic_algorithms_enabled()` at call
    time; True computes dq without atomics (`_bwd_dq_kernel`: bitwise reproducible, slower),
    False with the dQ atomics of the fast path. dk and dv never use atomics."""
    B, H, HKV, LQ, L, D = _check_backward(dy, q, k, v, y, levels, lut, batch_offset, batch_global,
                                          head_offset, heads_global, key_padding_mask, q_start,
                                          causal)
    dev = q.device
    interp = _interpreting()
    BM, BN, warps, stages = _config("bwd", D, interp, dtype=q.dtype)
    has_lut = lut is not None and lut > 0
    has_kpm, kpm = _key_mask_arg(key_padding_mask, dev)
    lv = _levels6(levels)
    lkw = _level_kw(lv, noise, photons, D)
    if dy.dtype != q.dtype:
        dy = dy.to(q.dtype)
    stats = stats.contiguous()
    qq, delta, inv = _prepare_backward(q, dy, y.contiguous(), (q_range, k_range, v_range, s_range),
                                       lv[0])

    if deterministic is None:  # a host-side flag, not a tensor value: no synchronisation
        deterministic = torch.are_deterministic_algorithms_enabled()
    dk = torch.empty((B, HKV, L, D), dtype=k.dtype, device=dev)
    dv = torch.empty((B, HKV, L, D), dtype=v.dtype, device=dev)
    dqa = dk if deterministic else torch.zeros((B, H, LQ, D), dtype=torch.float32, device=dev)
    _bwd_kernel[(triton.cdiv(L, BN), HKV, B)](
        qq, q, k, v, dy, stats, delta, dqa, dk, dv, kpm, inv, k_range, v_range, s_range, seeds,
        *q.stride(), *k.stride(), *v.stride(), *dy.stride(),
        H, HKV, LQ, L, int(q_start), int(stream), int(batch_offset), int(head_offset),
        int(heads_global), float(scale), float(scale) * _LOG2E, inv_levels_minus_1(lv[2]),
        float(lut) if has_lut else 0.0,
        HAS_LUT=has_lut, D=D, BM=BM, BN=BN, GROUP=H // HKV, CAUSAL=bool(causal),
        HAS_KPM=has_kpm, CLIPPED=bool(clipped), RUNS8=runs8("bwd", L), INTERP=interp,
        **lkw, DQ=not deterministic, num_warps=warps, num_stages=stages,
        **compile_options("bwd"))
    if deterministic:
        dq = _dq_deterministic(q, k, v, dy, qq, delta, stats, inv, q_range, k_range, v_range,
                               s_range, seeds, kpm, levels=levels, lut=lut, stream=stream,
                               scale=scale, causal=causal, batch_offset=batch_offset,
                               head_offset=head_offset, heads_global=heads_global,
                               clipped=clipped, noise=noise, has_kpm=has_kpm, q_start=q_start,
                               photons=photons)
        return dq, dk, dv
    del qq, delta  # free before dq is allocated: lowers the peak by one [B, H, L, D] tensor
    return _dq_from_atomics(dqa, q, q_range, scale, clipped), dk, dv


def _check_backward(dy, q, k, v, y, levels, lut, batch_offset, batch_global, head_offset,
                    heads_global, key_padding_mask, q_start, causal):
    """`_check` plus what only the backward requires (an int q_start; dy and y of q's shape);
    returns (B, H, Hkv, Lq, Lk, D)."""
    dims = _check(q, k, v, levels, lut, batch_offset, batch_global, head_offset, heads_global,
                  key_padding_mask, q_start, causal)
    if isinstance(q_start, torch.Tensor):
        raise ValueError("q_start as a device tensor is for inference (static-cache decoding); "
                         "the backward takes an int q_start")
    if dy.shape != q.shape or y.shape != q.shape:
        raise ValueError("dy and y must have q's shape")
    return dims


def _dq_from_atomics(dqa, q, q_range, scale, clipped: bool):
    """dq from the float32 dS @ k that `_bwd_kernel`'s atomics summed into `dqa`: scaled, zeroed
    where q was clamped (`clipped`) and cast to q's dtype by `_dq_finish_kernel`."""
    B, H, LQ, D = q.shape
    dq = torch.empty((B, H, LQ, D), dtype=q.dtype, device=q.device)
    blk = 32
    _dq_finish_kernel[(triton.cdiv(LQ, blk), H, B)](
        dqa, q, dq, q_range, *q.stride(), H, LQ, float(scale), D=D, BLK=blk, CLIPPED=bool(clipped),
        num_warps=4, **_OPTS)
    return dq


def _prepare_backward(q, dy, y, ranges, levels_q: int):
    """The backward's pre-pass: (Q_q(q) as a contiguous temporary, D_i = rowsum(dY * Y) float32
    [B, H, Lq], the five range reciprocals). `ranges`: the (q, k, v, s) range tensors."""
    B, H, LQ, D = q.shape
    qq = torch.empty((B, H, LQ, D), dtype=q.dtype, device=q.device)
    delta = torch.empty((B, H, LQ), dtype=torch.float32, device=q.device)
    inv = torch.empty(5, dtype=torch.float32, device=q.device)
    blk = 32
    _prep_bwd_kernel[(triton.cdiv(LQ, blk), H, B)](
        q, dy, y, qq, delta, inv, *ranges, *q.stride(), *dy.stride(), H, LQ,
        LEVELS=levels_q, D=D, BLK=blk, num_warps=4, **_OPTS)
    return qq, delta, inv


def _dq_deterministic(q, k, v, dy, qq, delta, stats, inv, q_range, k_range, v_range, s_range,
                      seeds, kpm, *, levels, lut, stream, scale, causal, batch_offset, head_offset,
                      heads_global, clipped, noise, has_kpm, q_start, photons=0.0):
    """dq by `_bwd_dq_kernel` (no atomics): Q_k(k) into a temporary by the forward's pre-pass
    (its Q_v(v) output is unused), then one program per query block. `qq`, `delta`, `inv` are
    the backward pre-pass's outputs."""
    B, H, LQ, D = q.shape
    HKV, L = k.shape[1], k.shape[2]
    dev = q.device
    interp = _interpreting()
    BM, BN, warps, stages = _config("dq", D, interp, LQ if LQ < L else None, q.dtype)
    lv = _levels6(levels)
    lkw = _level_kw(lv, noise, photons, D)
    kq, vq, _, _ = _quantize_kv(k, v, (q_range, k_range, v_range, s_range, s_range), lv, lut,
                                False)
    del vq
    dq = torch.empty((B, H, LQ, D), dtype=q.dtype, device=dev)
    _bwd_dq_kernel[(triton.cdiv(LQ, BM), H, B)](
        qq, kq, q, k, v, dy, stats, delta, dq, kpm, inv, q_range, s_range, seeds,
        *q.stride(), *k.stride(), *v.stride(), *dy.stride(),
        H, HKV, LQ, L, int(q_start), int(stream), int(batch_offset), int(head_offset),
        int(heads_global), float(scale), float(scale) * _LOG2E, inv_levels_minus_1(lv[2]),
        D=D, BM=BM, BN=BN, CAUSAL=bool(causal), HAS_KPM=has_kpm,
        CLIPPED=bool(clipped),
        RUNS8=runs8("dq", L), INTERP=interp, **lkw, num_warps=warps,
        num_stages=stages, **compile_options("dq"))
    return dq
