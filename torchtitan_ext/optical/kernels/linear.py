"""Triton fast path of the optical linear  y = Q_out(Q_x(x) @ Q_w(W)^T) + b  (semantics page s.2).

Design, and why
---------------
Forward = two launches (no fill of the [3, 2] range observations: the operand pass
initialises the output row, the GEMM's program 0 writes the operand rows):

1. ``_quantize_operands_kernel`` over x and W in one launch (a memory-bound pass; a few
   programs per SM loop over x's tiles, then W's, their loads software-pipelined a few tiles
   ahead, `OperandConfig`): Q_x / Q_w in float32,
   rounded back to the *input* dtype (exactly the reference's operand values), written once into
   scratch buffers, with the min/max of the unquantized tensor observed in the same pass (each
   program writes its partial min/max per operand to a [P, 4] buffer; no atomics, so the fold is
   order-independent and run-to-run bitwise). Quantizing inside the GEMM's mainloop
   instead (prologue fusion, what mase-triton does) re-quantizes every operand tile once per
   output tile -- N/BN times for x and M/BM times for W -- and puts IEEE divisions between the
   loads and the tensor cores. A separate pass costs one read and one write of x and W and
   leaves the mainloop a plain, pipelined bf16 GEMM (TMA loads + wgmma on Hopper). One launch
   for both operands, not one each: small models are launch-bound (bench/overhead.py).
2. ``_linear_fwd_kernel``: the GEMM on the quantized operands with float32 accumulation over the
   complete K, and an epilogue that (a) observes min/max of the accumulator (one atomic per tile,
   no extra pass and no extra matmul to initialise the output range), (b) applies Q_out with
   Philox-4x32-7 noise keyed by (seed, stream, 64-bit global index), (c) adds
   the bias, (d) optionally stores the clipped-gradient mask, (e) stores y in the input dtype.
   The accumulator never goes to memory, so the memory footprint is nn.Linear's plus the two
   transient quantized operands.

The noise is the expensive part of the epilogue: a Philox-4x32-7 evaluation is 14 integer
multiplies, of the order of the GEMM's own time at K=2048 if paid per output. Four things keep it
in check:
- one Philox block serves eight neighbouring outputs (`RUNS8`: the global row length and the
  shard's column offset are multiples of 8, so every aligned run of eight columns is one block;
  otherwise one Philox per output, reading its half-word);
- the epilogue runs on column chunks of the tile (``EPI_SPLIT``): Triton emits elementwise code op
  by op over a thread's whole share of the tile, so a Philox over the full tile kept every
  element's state live at once (4 KB of spills per thread); 8 chunks bring that to zero;
- large problems take 128x256 tiles with 8 warps (epilogue in 4 chunks), or, below 1024 output
  columns, 128x128 tiles under a 128-register cap, so that two programs share a multiprocessor
  and one's integer-heavy epilogue overlaps the other's tensor-core mainloop (the measurements:
  bench/results/README.md, stops 12 and 29);
- the quantizer's divisions by a per-call scalar use a reciprocal and a Markstein correction and
  the Philox multiplies are 32x32->64-bit (both bit-identical, in quantizer.py).
The config table (``gemm_config``) and the operand pass's table come from H200 sweeps
(bench/linear.py --sweep / --config / --operand-sweep, bench/linear_decode.py for decoding rows;
the choices and their measurements: bench/results/README.md); they are fixed and keyed on shape
and dtype, so there is no autotuning stall inside a trainer (one compile per dtype/config, cached
by Triton). Measured speed and memory against nn.Linear: the README's performance table (latest
figures) and bench/results/README.md (history, commands, raw files), not repeated here, where
they would go stale.

Host syncs: none. The seed and all ranges are device tensors read inside the kernels; whether a
range is initialised is decided per program on the device (an uninitialised output range skips
the Philox work entirely); the operand observations are per-program partials folded by the
GEMM's program 0, the output observation a min/max atomic per tile (order-independent), all in
a [3, 2] device tensor.

Backward (semantics s.5, straight-through or clipped, on the *unquantized* x and W) is two
cuBLAS matmuls -- nothing optical happens there, and cuBLAS is the fastest GEMM available. The
clipped variant zeroes grad_y outside the saved output mask (one elementwise op) and multiplies
the input gradients by in_range(x) / in_range(W) in place with ``_clip_grad_kernel`` (one pass,
no float32 copies of x or W).

Index arithmetic: the noise index and every pointer offset that scales with M*N or M*K is 64-bit.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from .. import reference as ref
from .quantizer import (box_muller, cast_rne, in_range, philox_bits24_c2, philox_bits24_rows,
                        philox_bits24_rows_c2, philox_uniform, quantize, quantize_shot,
                        quantize_with, range_span)

try:  # host-side TMA descriptors (Triton >= 3.4); the pointer path below is the fallback.
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

__all__ = [
    "DECODE_CONFIG",
    "GemmConfig",
    "OperandConfig",
    "LinearIndex",
    "gemm_config",
    "gpu_has_tma",
    "override_gemm_config",
    "linear_forward",
    "linear_backward",
    "quantize_tensor",
    "observe_minmax",
    "forward_packed",
    "elementwise_tile",
    "operand_config",
    "triton_kernel",
]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------------
# Global flat index of an output element
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearIndex:
    """Global flat index of element (m, n) of a local 2-D [M, N] output:

        ((m // s_local) * s_global + (m % s_local) + row_base) * n_global + n + col_offset

    A 3-D [B, S, N] output whose local block sits at (b_off, s_off, n_off) in the global
    [Bg, Sg, Ng] has s_local=S, s_global=Sg, row_base=b_off*Sg+s_off, n_global=Ng,
    col_offset=n_off; an unsharded 2-D [M, N] is (M, M, 0, N, 0).
    """

    s_local: int
    s_global: int
    row_base: int
    n_global: int
    col_offset: int

    @staticmethod
    def whole(M: int, N: int) -> "LinearIndex":
        return LinearIndex(max(int(M), 1), max(int(M), 1), 0, int(N), 0)

    def args(self) -> tuple[int, int, int, int, int]:
        if self.s_local < 1 or self.s_global < self.s_local:
            raise ValueError(f"LinearIndex: need 1 <= s_local <= s_global, got {self}")
        return (int(self.s_local), int(self.s_global), int(self.row_base), int(self.n_global),
                int(self.col_offset))


@triton.jit
def _global_index(rows, cols, s_local, s_global, row_base, n_global, col_offset):
    """int64 [R, C] global flat indices of local rows [R] x cols [C] (see LinearIndex)."""
    r = rows.to(tl.int64)
    g_row = (r // s_local) * s_global + (r % s_local) + row_base
    return (g_row * n_global)[:, None] + (cols.to(tl.int64) + col_offset)[None, :]


# --------------------------------------------------------------------------------------------
# Elementwise quantizer over a 2-D tensor (operands of the GEMM, and Q_out after a TP reduction)
# --------------------------------------------------------------------------------------------
@triton.jit
def _quantizer_consts(rng_ptr, LEVELS: tl.constexpr):
    """(lo, hi, span, RN(1 / span), RN(1 / (LEVELS - 1))) of the range at `rng_ptr`, for
    `quantize_with` / `quantize_shot`: computed once per program, not per tile (each reciprocal
    is an IEEE-division subroutine call)."""
    lo = tl.load(rng_ptr)
    hi = tl.load(rng_ptr + 1)
    span = range_span(lo, hi)
    one = tl.full([], 1.0, tl.float32)
    return (lo, hi, span, tl.math.div_rn(one, span),
            tl.math.div_rn(one, tl.full([], LEVELS - 1.0, tl.float32)))


@triton.jit
def _quantize_tile(src_ptr, dst_ptr, lo, hi, span, inv_span, inv_lm1, tile, R, C, stride_sr,
                   stride_sc, stride_dr, lut, seed_ptr, stream, s_local, s_global, row_base,
                   n_global, col_offset, LEVELS: tl.constexpr, HAS_LUT: tl.constexpr,
                   NOISY: tl.constexpr, OBSERVE: tl.constexpr, BR: tl.constexpr,
                   BC: tl.constexpr, SHOT: tl.constexpr, nk):
    """dst = Q(src) on one [BR, BC] tile (row-major tile order), the range constants from
    `_quantizer_consts`; returns the min and max of src over the tile (+inf, -inf unless
    OBSERVE), for the caller's observation atomics. SHOT (with NOISY): the shot read-out with
    nk = n * K instead of stochastic rounding."""
    n_cb = tl.cdiv(C, BC)
    rows = (tile // n_cb) * BR + tl.arange(0, BR)
    cols = (tile % n_cb) * BC + tl.arange(0, BC)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    r64 = rows.to(tl.int64)
    x = tl.load(src_ptr + r64[:, None] * stride_sr + cols.to(tl.int64)[None, :] * stride_sc,
                mask=mask, other=0.0)
    tile_min = float("inf")
    tile_max = float("-inf")
    if OBSERVE:
        xf = x.to(tl.float32)
        tile_min = tl.min(tl.where(mask, xf, float("inf")))
        tile_max = tl.max(tl.where(mask, xf, float("-inf")))
    if NOISY and SHOT:
        idx = _global_index(rows, cols, s_local, s_global, row_base, n_global, col_offset)
        seed = tl.load(seed_ptr)
        z = box_muller(philox_bits24_c2(seed, stream, idx, 0),
                       philox_bits24_c2(seed, stream, idx, 1))
        y, _ = quantize_shot(x, lo, hi, span, inv_span, inv_lm1, z, nk, LEVELS)
    else:
        if NOISY:
            idx = _global_index(rows, cols, s_local, s_global, row_base, n_global, col_offset)
            u = philox_uniform(tl.load(seed_ptr), stream, idx)
        else:
            u = 0.0
        y = quantize_with(x, lo, hi, span, inv_span, inv_lm1, LEVELS, lut, HAS_LUT, u, NOISY)
    tl.store(dst_ptr + r64[:, None] * stride_dr + cols[None, :],
             cast_rne(y, dst_ptr.dtype.element_ty), mask=mask)
    return tile_min, tile_max


@triton.jit(do_not_specialize=["stream", "s_local", "s_global", "row_base", "n_global",
                               "col_offset"])
def _quantize_2d_kernel(
    src_ptr, dst_ptr, rng_ptr, seed_ptr, obs_ptr,
    R, C, stride_sr, stride_sc, stride_dr,
    lut, stream, s_local, s_global, row_base, n_global, col_offset, nk,
    LEVELS: tl.constexpr, HAS_LUT: tl.constexpr, NOISY: tl.constexpr, OBSERVE: tl.constexpr,
    BR: tl.constexpr, BC: tl.constexpr, SHOT: tl.constexpr,
):
    rlo, rhi, span, inv_span, inv_lm1 = _quantizer_consts(rng_ptr, LEVELS)
    lo, hi = _quantize_tile(src_ptr, dst_ptr, rlo, rhi, span, inv_span, inv_lm1,
                            tl.program_id(0), R, C, stride_sr, stride_sc, stride_dr, lut,
                            seed_ptr, stream, s_local, s_global, row_base, n_global, col_offset,
                            LEVELS, HAS_LUT, NOISY, OBSERVE, BR, BC, SHOT, nk)
    if OBSERVE:
        tl.atomic_min(obs_ptr, lo)
        tl.atomic_max(obs_ptr + 1, hi)


def shot_nk(photons: float, contraction: int) -> float:
    """float32(n) * float32(K) as a Python float (exact): the reference's `shot_nk`."""
    return float(np.float32(photons) * np.float32(contraction))


def _quantize_into(src, dst, rng, seed, obs_row, *, levels, lut, noisy, stream, index,
                   photons=0.0, contraction=1):
    """dst[:R, :C] = Q(src) (dst row-contiguous, any row stride); obs_row[0:2] gets min/max."""
    R, C = src.shape
    if R == 0 or C == 0:
        return
    BR, BC = elementwise_tile(C, noisy)
    il = index if index is not None else (1, 1, 0, 0, 0)
    grid = (triton.cdiv(R, BR) * triton.cdiv(C, BC),)
    _quantize_2d_kernel[grid](
        src, dst, rng, seed if seed is not None else rng, obs_row if obs_row is not None else rng,
        R, C, src.stride(0), src.stride(1), dst.stride(0),
        float(lut or 0.0), int(stream) & 0xFFFFFFFF, *il, shot_nk(photons, contraction),
        LEVELS=int(levels), HAS_LUT=bool(lut), NOISY=bool(noisy), OBSERVE=obs_row is not None,
        BR=BR, BC=BC, SHOT=bool(noisy) and photons > 0, num_warps=4 if _INTERPRET else 8,
        enable_fp_fusion=False,
    )


def elementwise_tile(C: int, noisy: bool) -> tuple[int, int]:
    """[BR, BC] tile of `quantize_tensor`'s launch for rows of C elements (the noise tests map
    elements to programs with it)."""
    # noisy: 2K elements a program, so that the Philox state of a thread's elements fits in
    # registers (see the GEMM epilogue); det: the operand pass's table entry.
    if noisy and not _INTERPRET:
        return (16, 128) if C >= 128 else (64, 32)
    cfg = _operand_config(C)
    return cfg.BR, cfg.BC


def operand_config(C: int) -> OperandConfig:
    """The operand pass's table entry for operands of row length C (= K), as launched."""
    return _operand_config(C)


def triton_kernel(kind: str):
    """The Triton kernel of a `kind` launch ("fwd": the fused GEMM, "operands": the operand
    pass), for tools that inspect its compiled code (bench/noise_layouts.py, bench/fp_fusion.py).
    Its arguments are this module's business: they change with the kernels."""
    kernels = {"fwd": _linear_fwd_kernel, "operands": _quantize_operands_kernel}
    if kind not in kernels:
        raise ValueError(f"kind: must be one of fwd, operands, got {kind!r}")
    return kernels[kind]


# --------------------------------------------------------------------------------------------
# Both GEMM operands in one launch
# --------------------------------------------------------------------------------------------
@triton.jit
def _quantize_operands_kernel(
    x_ptr, w_ptr, xq_ptr, wq_ptr, rng_ptr, obs_ptr, part_ptr,
    M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_xq, stride_wq, lut,
    LEVELS: tl.constexpr, HAS_LUT: tl.constexpr, OBSERVE: tl.constexpr,
    BR: tl.constexpr, BC: tl.constexpr, LEVELS_W: tl.constexpr, STAGES: tl.constexpr,
):
    """Q_x (LEVELS) over x's tiles, then Q_w (LEVELS_W, with lut) over W's: one launch for both
    operands (each launch costs tens of microseconds of host time, which launch-bound small
    models pay per layer). Of the x tiles then the W tiles, numbered on, program p takes tiles
    p, p + P, p + 2P, ... of the P programs launched (`OperandConfig.programs_per_sm`), in two
    loops whose loads Triton software-pipelines STAGES deep (1: not at all), and stores the
    min/max it saw of each operand, (x min, x max, W min, W max), as row p of `part_ptr` [P, 4]
    (the GEMM folds them into the observations: `_fold_operand_partials`). Ranges are the rows
    0 (x) and 1 (W) of a [3, 2] tensor; program 0 sets the observations' row 2 (the output's)
    to (+inf, -inf) before the GEMM's atomics fold into it. (Operands are deterministic: no
    seed, no noise index.)"""
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    xlo, xhi, x_span, x_inv, x_inv_lm1 = _quantizer_consts(rng_ptr, LEVELS)
    wlo, whi, w_span, w_inv, w_inv_lm1 = _quantizer_consts(rng_ptr + 2, LEVELS_W)
    x_tiles = tl.cdiv(M, BR) * tl.cdiv(K, BC)
    w_tiles = tl.cdiv(N, BR) * tl.cdiv(K, BC)
    x_min = float("inf")
    x_max = float("-inf")
    w_min = float("inf")
    w_max = float("-inf")
    # A tile's min/max skip NaNs unless the whole tile is NaN; then, as with one program per
    # tile, the max observes NaN (propagated here) and the min the other tiles' minimum.
    for tile in tl.range(pid, x_tiles, progs, num_stages=STAGES):
        lo, hi = _quantize_tile(x_ptr, xq_ptr, xlo, xhi, x_span, x_inv, x_inv_lm1, tile, M, K,
                                stride_xm, stride_xk, stride_xq, 0.0, rng_ptr, 0, 1, 1, 0,
                                0, 0, LEVELS, False, False, OBSERVE, BR, BC, False, 1.0)
        x_min = tl.minimum(x_min, lo)
        x_max = tl.maximum(x_max, hi, propagate_nan=tl.PropagateNan.ALL)
    # this program's first W tile: the global tile x_tiles + j with j = pid - x_tiles (mod P)
    first_w = (pid - x_tiles % progs + progs) % progs
    for tile in tl.range(first_w, w_tiles, progs, num_stages=STAGES):
        lo, hi = _quantize_tile(w_ptr, wq_ptr, wlo, whi, w_span, w_inv, w_inv_lm1, tile, N, K,
                                stride_wn, stride_wk, stride_wq, lut, rng_ptr, 0, 1, 1, 0, 0,
                                0, LEVELS_W, HAS_LUT, False, OBSERVE, BR, BC, False, 1.0)
        w_min = tl.minimum(w_min, lo)
        w_max = tl.maximum(w_max, hi, propagate_nan=tl.PropagateNan.ALL)
    if OBSERVE:
        part = part_ptr + pid * 4
        tl.store(part, x_min)
        tl.store(part + 1, x_max)
        tl.store(part + 2, w_min)
        tl.store(part + 3, w_max)
    if pid == 0:
        tl.store(obs_ptr + 4, tl.full([], float("inf"), tl.float32))
        tl.store(obs_ptr + 5, tl.full([], float("-inf"), tl.float32))


@triton.jit
def _max_keep_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _fold_operand_partials(obs_ptr, part_ptr, n_part, BLOCK: tl.constexpr):
    """Observation rows 0 (x) and 1 (W) from the operand pass's n_part partial rows (x min, x
    max, W min, W max); (+inf, -inf) rows for n_part = 0 (nothing observed). One program of the
    GEMM runs it: the stream orders the GEMM after the whole pass, and no row needs a fill
    beforehand. A NaN maximum stays NaN, as the pass's own maxima keep it."""
    x_min = tl.full([BLOCK], float("inf"), tl.float32)
    x_max = tl.full([BLOCK], float("-inf"), tl.float32)
    w_min = tl.full([BLOCK], float("inf"), tl.float32)
    w_max = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, n_part, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        ok = rows < n_part
        p = part_ptr + rows * 4
        x_min = tl.minimum(x_min, tl.load(p, mask=ok, other=float("inf")))
        x_max = _max_keep_nan(x_max, tl.load(p + 1, mask=ok, other=float("-inf")))
        w_min = tl.minimum(w_min, tl.load(p + 2, mask=ok, other=float("inf")))
        w_max = _max_keep_nan(w_max, tl.load(p + 3, mask=ok, other=float("-inf")))
    tl.store(obs_ptr, tl.min(x_min))
    tl.store(obs_ptr + 1, tl.reduce(x_max, 0, _max_keep_nan))
    tl.store(obs_ptr + 2, tl.min(w_min))
    tl.store(obs_ptr + 3, tl.reduce(w_max, 0, _max_keep_nan))


# --------------------------------------------------------------------------------------------
# GEMM with the optical epilogue
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["stream", "s_local", "s_global", "row_base", "n_global",
                               "col_offset", "n_part"])
def _linear_fwd_kernel(
    a_src, b_src, y_ptr, bias_ptr, rng_ptr, seed_ptr, obs_ptr, mask_ptr, part_ptr, n_part,
    M, N, K, stride_am, stride_bn,
    stream, s_local, s_global, row_base, n_global, col_offset, nk,
    LEVELS: tl.constexpr, QUANT_OUT: tl.constexpr, NOISE: tl.constexpr, SHOT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    OBSERVE: tl.constexpr, SAVE_MASK: tl.constexpr, USE_TMA: tl.constexpr,
    IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    EPI_SPLIT: tl.constexpr, RUNS8: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    PART_BLOCK: tl.constexpr,
):
    """One [BM, BN] tile of y: the float32 GEMM of the quantized operands over all of K, then
    _tile_epilogue (observation, Q_out, bias, mask, store); program 0 also folds the operand
    pass's n_part partial observations into obs rows 0 and 1 (`_fold_operand_partials`)."""
    off_m, off_n = _grouped_tile_origin(M, N, BM, BN, GROUP_M)

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if USE_TMA:
        # a_src/b_src are descriptors over the quantized operands; TMA zero-fills out of bounds.
        for k in range(0, tl.cdiv(K, BK)):
            a = a_src.load([off_m, k * BK])
            b = b_src.load([off_n, k * BK])
            if UPCAST_DOT:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE_DOT:
                acc = tl.dot(a, b.T, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b.T, acc)
    else:
        # Rows past M / columns past N wrap around (valid memory, results masked at the store), so
        # only the K tail needs a load mask. The operands are unit-stride along K (we wrote them).
        rm = ((off_m + tl.arange(0, BM)) % M).to(tl.int64)
        rn = ((off_n + tl.arange(0, BN)) % N).to(tl.int64)
        rk = tl.arange(0, BK)
        a_ptrs = a_src + rm[:, None] * stride_am + rk[None, :]
        b_ptrs = b_src + rn[None, :] * stride_bn + rk[:, None]
        for k in range(0, tl.cdiv(K, BK)):
            k_left = K - k * BK
            a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0.0)
            if UPCAST_DOT:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE_DOT:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BK
            b_ptrs += BK

    _tile_epilogue(acc, off_m, off_n, M, N, y_ptr, bias_ptr, rng_ptr, seed_ptr, obs_ptr, mask_ptr,
                   stream, s_local, s_global, row_base, n_global, col_offset, nk, LEVELS,
                   QUANT_OUT, NOISE, SHOT, HAS_BIAS, OBSERVE, SAVE_MASK, EPI_SPLIT, RUNS8, BM, BN)
    if tl.program_id(0) == 0:
        _fold_operand_partials(obs_ptr, part_ptr, n_part, PART_BLOCK)


@triton.jit
def _grouped_tile_origin(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(off_m, off_n): first row and column of this program's [BM, BN] output tile.

    Grouped tile order: GROUP_M row-tiles sweep the columns together so the W tiles they share
    stay in L2 (the last group may hold fewer row-tiles)."""
    pid = tl.program_id(0)
    n_pm = tl.cdiv(M, BM)
    n_pn = tl.cdiv(N, BN)
    per_group = GROUP_M * n_pn
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(n_pm - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    off_m = pid_m * BM
    off_n = pid_n * BN
    return off_m, off_n


@triton.jit
def _tile_epilogue(acc, off_m, off_n, M, N, y_ptr, bias_ptr, rng_ptr, seed_ptr, obs_ptr, mask_ptr,
                   stream, s_local, s_global, row_base, n_global, col_offset, nk,
                   LEVELS: tl.constexpr, QUANT_OUT: tl.constexpr, NOISE: tl.constexpr,
                   SHOT: tl.constexpr, HAS_BIAS: tl.constexpr, OBSERVE: tl.constexpr,
                   SAVE_MASK: tl.constexpr, EPI_SPLIT: tl.constexpr, RUNS8: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr):
    """Everything after the mainloop for the [BM, BN] accumulator at (off_m, off_n): min/max of
    its in-bounds elements into obs[2] (if OBSERVE), then Q_out, bias, mask and the store of y,
    in EPI_SPLIT column chunks (see _epilogue_chunks)."""
    rows = off_m + tl.arange(0, BM)
    row_ok = rows < M
    if OBSERVE:
        cols = off_n + tl.arange(0, BN)
        ok = row_ok[:, None] & (cols < N)[None, :]
        tl.atomic_min(obs_ptr + 4, tl.min(tl.where(ok, acc, float("inf"))))
        tl.atomic_max(obs_ptr + 5, tl.max(tl.where(ok, acc, float("-inf"))))
    r64 = rows.to(tl.int64)
    # Row part of the global noise index, once per row: ((m // S) * Sg + m % S + base) * Ng.
    g_row = ((r64 // s_local) * s_global + (r64 % s_local) + row_base) * n_global
    lo = tl.load(rng_ptr + 4)  # row 2 of the [3, 2] ranges: the output's
    hi = tl.load(rng_ptr + 5)
    seed = tl.load(seed_ptr)
    _epilogue_chunks(acc, r64, row_ok, g_row, off_n, y_ptr, bias_ptr, mask_ptr, N, col_offset,
                     lo, hi, seed, stream, LEVELS, QUANT_OUT, NOISE, SHOT, nk, HAS_BIAS,
                     SAVE_MASK, RUNS8, EPI_SPLIT, BM, BN)


@triton.jit
def _epilogue_chunks(acc, r64, row_ok, g_row, col0, y_ptr, bias_ptr, mask_ptr, N, col_offset,
                     lo, hi, seed, stream, LEVELS: tl.constexpr, QUANT_OUT: tl.constexpr,
                     NOISE: tl.constexpr, SHOT: tl.constexpr, nk, HAS_BIAS: tl.constexpr,
                     SAVE_MASK: tl.constexpr, RUNS8: tl.constexpr, EPI_SPLIT: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr):
    """_epilogue on the [BM, BN] accumulator starting at column col0, split into EPI_SPLIT
    (1, 2, 4 or 8; anything else means 8) column chunks of BN // EPI_SPLIT columns each."""
    # Triton emits elementwise code op by op over a thread's whole share of the tile, so a
    # Philox over the full tile keeps every element's 4-word state live at once (hundreds of
    # spilled registers). Splitting the tile into column chunks bounds that to one chunk.
    if EPI_SPLIT == 1:
        _epilogue(acc, r64, row_ok, g_row, col0, y_ptr, bias_ptr, mask_ptr, N, col_offset,
                  lo, hi, seed, stream, LEVELS, QUANT_OUT, NOISE, SHOT, nk, HAS_BIAS,
                  SAVE_MASK, RUNS8, BN)
    elif EPI_SPLIT == 2:
        a0, a1 = _halves(acc, BM, BN)
        _epilogue(a0, r64, row_ok, g_row, col0, y_ptr, bias_ptr, mask_ptr, N, col_offset,
                  lo, hi, seed, stream, LEVELS, QUANT_OUT, NOISE, SHOT, nk, HAS_BIAS,
                  SAVE_MASK, RUNS8, BN // 2)
        _epilogue(a1, r64, row_ok, g_row, col0 + BN // 2, y_ptr, bias_ptr, mask_ptr, N,
                  col_offset, lo, hi, seed, stream, LEVELS, QUANT_OUT, NOISE, SHOT, nk, HAS_BIAS,
                  SAVE_MASK, RUNS8, BN // 2)
    elif EPI_SPLIT == 4:
        _epilogue_quarters(acc, r64, row_ok, g_row, col0, y_ptr, bias_ptr, mask_ptr, N,
                           col_offset, lo, hi, seed, stream, LEVELS, QUANT_OUT, NOISE, SHOT, nk,
                           HAS_BIAS, SAVE_MASK, RUNS8, BM, BN)
    else:  # 8 chunks
        a0, a1 = _halves(acc, BM, BN)
        _epilogue_quarters(a0, r64, row_ok, g_row, col0, y_ptr, bias_ptr, mask_ptr, N,
                           col_offset, lo, hi, seed, stream, LEVELS, QUANT_OUT, NOISE, SHOT, nk,
                           HAS_BIAS, SAVE_MASK, RUNS8, BM, BN // 2)
        _epilogue_quarters(a1, r64, row_ok, g_row, col0 + BN // 2, y_ptr, bias_ptr, mask_ptr,
                           N, col_offset, lo, hi, seed, stream, LEVELS, QUANT_OUT, NOISE, SHOT, nk,
                           HAS_BIAS, SAVE_MASK, RUNS8, BM, BN // 2)


@triton.jit
def _epilogue_quarters(acc, r64, row_ok, g_row, col0, y_ptr, bias_ptr, mask_ptr, N, col_offset,
                       lo, hi, seed, stream, LEVELS: tl.constexpr, QUANT_OUT: tl.constexpr,
                       NOISE: tl.constexpr, SHOT: tl.constexpr, nk, HAS_BIAS: tl.constexpr,
                       SAVE_MASK: tl.constexpr,
                       RUNS8: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """_epilogue on the four column quarters of an [R, C] tile starting at column col0."""
    a0, a1 = _halves(acc, R, C)
    a00, a01 = _halves(a0, R, C // 2)
    a10, a11 = _halves(a1, R, C // 2)
    _epilogue(a00, r64, row_ok, g_row, col0, y_ptr, bias_ptr, mask_ptr, N, col_offset,
              lo, hi, seed, stream, LEVELS, QUANT_OUT, NOISE, SHOT, nk,
              HAS_BIAS, SAVE_MASK, RUNS8, C // 4)
    _epilogue(a01, r64, row_ok, g_row, col0 + C // 4, y_ptr, bias_ptr, mask_ptr, N,
              col_offset, lo, hi, seed, stream, LEVELS, QUANT_OUT, NOISE, SHOT, nk, HAS_BIAS,
              SAVE_MASK, RUNS8, C // 4)
    _epilogue(a10, r64, row_ok, g_row, col0 + C // 2, y_ptr, bias_ptr, mask_ptr, N,
              col_offset, lo, hi, seed, stream, LEVELS, QUANT_OUT, NOISE, SHOT, nk, HAS_BIAS,
              SAVE_MASK, RUNS8, C // 4)
    _epilogue(a11, r64, row_ok, g_row, col0 + 3 * (C // 4), y_ptr, bias_ptr, mask_ptr,
              N, col_offset, lo, hi, seed, stream, LEVELS, QUANT_OUT, NOISE, SHOT, nk, HAS_BIAS,
              SAVE_MASK, RUNS8, C // 4)


@triton.jit
def _halves(t, R: tl.constexpr, C: tl.constexpr):
    """Columns [0, C/2) and [C/2, C) of an [R, C] tile (a register-level split)."""
    return tl.split(tl.permute(tl.reshape(t, (R, 2, C // 2)), (0, 2, 1)))


@triton.jit
def _epilogue(acc, r64, row_ok, g_row, col0, y_ptr, bias_ptr, mask_ptr, N, col_offset,
              lo, hi, seed, stream, LEVELS: tl.constexpr, QUANT_OUT: tl.constexpr,
              NOISE: tl.constexpr, SHOT: tl.constexpr, nk, HAS_BIAS: tl.constexpr,
              SAVE_MASK: tl.constexpr,
              RUNS8: tl.constexpr, W: tl.constexpr):
    """Q_out (noisy), bias, mask and store for the accumulator columns [col0, col0 + W)."""
    cols = col0 + tl.arange(0, W)
    col_ok = cols < N
    ok = row_ok[:, None] & col_ok[None, :]
    y = acc
    if QUANT_OUT:
        if SAVE_MASK:
            tl.store(mask_ptr + r64[:, None] * N + cols[None, :], in_range(acc, lo, hi), mask=ok)
        # An uninitialised range passes through (calibration): skip the Philox work there.
        if lo <= hi:
            if NOISE and SHOT:  # shot read-out (q_readout: shot): Box-Muller on two draws
                gcols = cols.to(tl.int64) + col_offset
                z = box_muller(
                    philox_bits24_rows_c2(seed, stream, g_row, col0 + col_offset, gcols, W,
                                          RUNS8, 0),
                    philox_bits24_rows_c2(seed, stream, g_row, col0 + col_offset, gcols, W,
                                          RUNS8, 1))
                y, _ = quantize_shot(acc, lo, hi, None, None, None, z, nk, LEVELS)
            elif NOISE:
                u = philox_bits24_rows(seed, stream, g_row, col0 + col_offset,
                                       cols.to(tl.int64) + col_offset, W, RUNS8)
                u = u * (1.0 / 16777216.0)  # as philox_uniform
                y = quantize(acc, lo, hi, LEVELS, 0.0, False, u, True)
            else:  # read-out noise off (q_noise: false): det rounding, no Philox
                y = quantize(acc, lo, hi, LEVELS, 0.0, False, 0.0, False)
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + r64[:, None] * N + cols[None, :], cast_rne(y, y_ptr.dtype.element_ty),
             mask=ok)


@dataclass(frozen=True)
class GemmConfig:
    """One launch configuration of the fused linear forward: tiles, grouping, warps, pipeline
    stages, TMA operand loads, epilogue column chunks and an optional register cap."""

    BM: int
    BN: int
    BK: int
    GROUP_M: int
    num_warps: int
    num_stages: int
    use_tma: bool
    epi_split: int = 8  # column chunks of the epilogue (1, 2, 4 or 8)
    maxnreg: int | None = None  # register cap: 128 lets two 8-warp programs share an SM


@dataclass(frozen=True)
class OperandConfig:
    """Launch configuration of the operand quantization pass: [BR, BC] tiles, warps, and
    `programs_per_sm` programs per multiprocessor that loop over the tiles (0: one program per
    tile), and `num_stages` deep software pipelining of those loops' loads (1: none). Every
    configuration computes the same bits."""

    BR: int
    BC: int
    num_warps: int
    programs_per_sm: int = 0
    num_stages: int = 1


def gpu_has_tma(device: torch.device) -> bool:
    """Whether `device` can take the TMA operand loads (a CUDA GPU of compute capability 9+ and a
    Triton with host tensor descriptors)."""
    if TensorDescriptor is None or device.type != "cuda":
        return False
    return _capability_major(device.index if device.index is not None
                             else torch.cuda.current_device()) >= 9


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; 1 for the CPU (the interpreter), so that tests can run
    a few looping programs."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability_major(index: int) -> int:
    # Asked once per device: the query costs ~12 us of host time per call on the H200 host,
    # which small, launch-bound linears pay on every forward (bench/overhead.py).
    return torch.cuda.get_device_capability(index)[0]


@functools.lru_cache(maxsize=None)
def _gemm_config(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> GemmConfig:
    """Fixed config table (measured on an H200 with bench/linear.py --sweep)."""
    if _INTERPRET or device.type != "cuda":
        # The interpreter runs each program in numpy: small tiles keep the tests' padding cheap.
        return GemmConfig(32, 32, 32, 4, 4, 1, False)
    if M <= 64:
        # Decoding (`generate` with a KV cache: a few rows per step): 64-wide tiles left most SMs
        # idle (2-16 programs per linear of the 60M); narrow ones spread the rows' work.
        return DECODE_CONFIG
    tma = gpu_has_tma(device)
    if dtype == torch.float32:
        return GemmConfig(64, 64, 32, 8, 4, 3, False)
    if M * N <= 2048 * 2048:
        return GemmConfig(128, 64, 64, 8, 4, 4, tma)
    if not tma:
        return GemmConfig(128, 128, 64, 8, 8, 3, False, maxnreg=128)
    return _LARGE_CONFIG_NARROW if N < 1024 else _LARGE_CONFIG


# Chosen by the H200 sweeps (bench/linear.py --sweep, bench/linear_decode.py; bench/results/).
DECODE_CONFIG = GemmConfig(16, 16, 64, 1, 2, 2, False, 1)
# 128x256 tiles, one 8-warp program per SM: 1-6% faster forwards than 128x128 (two programs per
# SM under a 128-register cap) at the three large shapes and the 1.1B's N = 1536 / 5376, in two
# alternating runs (stop 29); at N = 512 (the 1.1B's wk / wv) 9% slower: 256-wide tiles leave
# two columns of tiles, under two waves on 132 SMs. Same bits either way.
_LARGE_CONFIG = GemmConfig(128, 256, 64, 8, 8, 3, True, 4)
_LARGE_CONFIG_NARROW = GemmConfig(128, 128, 64, 8, 8, 3, True, maxnreg=128)


def _operand_config(C: int) -> OperandConfig:
    """Fixed table of the operand pass, by the operands' row length C (= K)."""
    if _INTERPRET:
        return OperandConfig(32, 64, 4)
    # 8K-element tiles (32 a thread), two looping programs per SM whose loads run three tiles
    # ahead: 1.2-1.35x the bandwidth of four unpipelined programs (stop 24's entry) at every
    # shape of bench/linear.py --operand-sweep on an H200 (stop 26)
    return OperandConfig(32, 256, 8, 2, 3) if C >= 256 else OperandConfig(128, 64, 8, 4)


# What override_gemm_config forces: every problem's config ("all"), the large shapes' ("large"),
# the operand pass's ("operands").
_OVERRIDE: dict = {"all": None, "large": None, "operands": None}


@contextlib.contextmanager
def override_gemm_config(config: GemmConfig | None = None, *, large: GemmConfig | None = None,
                         operands: OperandConfig | None = None):
    """Temporarily force the forward's configuration: `config` for every problem, or `large`
    for the problems the table gives a large-shape entry (either width; what
    bench/linear.py --sweep chooses); `operands` for the operand pass of every problem. The one way benchmarks and
    tests pick a configuration; not thread-safe."""
    old = dict(_OVERRIDE)
    _OVERRIDE.update(all=config, large=large, operands=operands)
    try:
        yield
    finally:
        _OVERRIDE.update(old)


def gemm_config(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> GemmConfig:
    """The configuration the forward launches for an [M, K] x [K, N] problem: an override of
    `override_gemm_config` if one applies, else the fixed table."""
    if _OVERRIDE["all"] is not None:
        return _OVERRIDE["all"]
    cfg = _gemm_config(M, N, K, dtype, device)
    large = cfg is _LARGE_CONFIG or cfg is _LARGE_CONFIG_NARROW
    return _OVERRIDE["large"] if large and _OVERRIDE["large"] else cfg


def _operand_buffer(R: int, C: int, dtype: torch.dtype, device, align: int) -> torch.Tensor:
    """[R, C] view of a buffer whose row stride is a multiple of `align` elements (TMA needs
    16-byte aligned strides)."""
    cp = -(-C // align) * align if C > 0 else 0
    buf = torch.empty((R, cp), dtype=dtype, device=device)
    return buf[:, :C]


def _new_obs(device) -> torch.Tensor:
    """(+inf, -inf) rows [3, 2] on `device`: the observations of a call that launches no
    operand pass (K == 0 or an empty output), or a starting point for atomic min/max.
    Built on every call, not cloned from a cached template: a template first made while
    Inductor's CUDA graph trees warm a graph up would live on in the graph's memory pool, which
    they refuse (`optical.cuda_graphs`)."""
    return ref.unset_observations(3, device)


def linear_forward(x2d, weight, bias, x_range, w_range, out_range, seed, *, levels: int,
                   lut: float | None, stream: int, index: LinearIndex, observe: bool,
                   quantize_output: bool = True, save_out_mask: bool = False, noise: bool = True,
                   photons: float = 0.0):
    """x2d [M, K] (any strides), weight [N, K], bias [N] or None; *_range float32 [2] device
    tensors (lo, hi), lo > hi means uninitialised (passthrough); seed: int64 device tensor of shape
    [] or [1] (read in-kernel, never .item()).

    Returns (y [M, N] in x dtype -- or the float32 accumulator (no Q_out, no bias) when
    quantize_output=False, obs float32 [3, 2]: observed (min, max) of x, of W, of the float32
    accumulator -- all computed only if observe, else (+inf, -inf) rows, out_mask: bool [M, N] (True
    where the accumulator lay inside out_range, or everywhere if it is uninitialised) if
    save_out_mask else None). With quantize_output=False the mask refers to the local accumulator.
    noise=False (`q_noise: false`): Q_out rounds deterministically and no Philox runs.
    levels: an int or (L_x, L_w, L_out). photons > 0: the shot read-out of Q_out (n = photons,
    K = in_features; `q_readout: shot`).
    """
    if x2d.dim() != 2 or weight.dim() != 2 or x2d.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_forward: x {tuple(x2d.shape)} and weight {tuple(weight.shape)}")
    if x2d.dtype != weight.dtype:
        raise ValueError(f"linear_forward: x dtype {x2d.dtype} != weight dtype {weight.dtype}")
    if seed is None and quantize_output:
        raise ValueError("linear_forward: a seed tensor is required for Q_out")
    ranges = torch.stack([x_range, w_range, out_range]).float()
    if index is None:
        index = LinearIndex.whole(x2d.shape[0], weight.shape[0])
    il = index.args()
    return forward_packed(x2d, weight, bias, ranges, seed, levels, lut, stream, il, observe,
                          quantize_output, save_out_mask, noise, photons)


def _launch_quantize_operands(x2d, weight, xq, wq, ranges, obs, lut, lx, lw, observe):
    """xq = Q_x(x2d) at lx levels and wq = Q_w(weight) at lw levels (with lut), in one launch
    of _quantize_operands_kernel, which also sets obs row 2 to (+inf, -inf). Returns (partials,
    their count): each program's min/max of x and W if observe (0 partials otherwise), for the
    GEMM to fold into obs rows 0 and 1. Needs K = x2d.shape[1] > 0."""
    M, K = x2d.shape
    N = weight.shape[0]
    cfg = _OVERRIDE["operands"] or _operand_config(K)
    BR, BC = cfg.BR, cfg.BC
    programs = (triton.cdiv(M, BR) + triton.cdiv(N, BR)) * triton.cdiv(K, BC)
    if cfg.programs_per_sm:
        programs = min(programs, cfg.programs_per_sm * _sm_count(x2d.device))
    part = torch.empty((programs, 4), dtype=torch.float32, device=x2d.device) if observe else obs
    _quantize_operands_kernel[(programs,)](
        x2d, weight, xq, wq, ranges, obs, part,
        M, N, K, x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1),
        xq.stride(0), wq.stride(0), float(lut or 0.0),
        LEVELS=int(lx), HAS_LUT=bool(lut), OBSERVE=bool(observe), BR=BR, BC=BC,
        LEVELS_W=int(lw), STAGES=cfg.num_stages, num_warps=cfg.num_warps,
        enable_fp_fusion=False,
    )
    return part, programs if observe else 0


def _gemm_operand_sources(xq, wq, cfg: GemmConfig, use_tma: bool):
    """(a_src, b_src) for _linear_fwd_kernel: TMA descriptors over the quantized operands xq
    [M, K] and wq [N, K] with cfg's block shapes if use_tma, else the tensors themselves."""
    if not use_tma:
        return xq, wq
    (M, K), N = xq.shape, wq.shape[0]
    return (TensorDescriptor(xq, [M, K], [xq.stride(0), 1], [cfg.BM, cfg.BK]),
            TensorDescriptor(wq, [N, K], [wq.stride(0), 1], [cfg.BN, cfg.BK]))


def forward_packed(x2d, weight, bias, ranges, seed, levels, lut, stream, index, observe,
                   quantize_output, save_out_mask, noise=True, photons=0.0):
    """`linear_forward` on the operands the op already holds: ranges a contiguous float32
    [3, 2] tensor (x, W, output), index the five integers of `LinearIndex.args()` (unchecked).

    The host path is kept short on purpose: small models are launch-bound (bench/overhead.py),
    so each view, allocation and launch here is paid once per linear per step."""
    M, K = x2d.shape
    N = weight.shape[0]
    dev = x2d.device
    dtype = x2d.dtype
    lx, lw, lout = (levels,) * 3 if isinstance(levels, int) else levels
    shot = bool(noise) and photons > 0
    y = torch.empty((M, N), dtype=dtype if quantize_output else torch.float32, device=dev)
    mask = torch.empty((M, N), dtype=torch.bool, device=dev) if save_out_mask else None
    if M == 0 or N == 0:
        return y, _new_obs(dev), mask
    cfg = gemm_config(M, N, K, dtype, dev)
    align = max(16 // x2d.element_size(), 1)
    xq = _operand_buffer(M, K, dtype, dev, align)
    wq = _operand_buffer(N, K, dtype, dev, align)
    if K > 0:
        # No fill launch: the operand pass sets row 2, the GEMM's program 0 rows 0 and 1.
        obs = torch.empty((3, 2), dtype=torch.float32, device=dev)
        part, n_part = _launch_quantize_operands(x2d, weight, xq, wq, ranges, obs, lut, lx, lw,
                                                 observe)
    else:
        obs = _new_obs(dev)
        part, n_part = obs, 0
    use_tma = cfg.use_tma and K > 0
    a_src, b_src = _gemm_operand_sources(xq, wq, cfg, use_tma)
    grid = (triton.cdiv(M, cfg.BM) * triton.cdiv(N, cfg.BN),)
    _linear_fwd_kernel[grid](
        a_src, b_src, y, bias if bias is not None else y, ranges,
        seed if seed is not None else obs,  # loaded by the kernel, never used without Q_out
        obs, mask if mask is not None else y, part, n_part,
        M, N, K, xq.stride(0), wq.stride(0),
        int(stream) & 0xFFFFFFFF, *index, shot_nk(photons, K) if shot else 1.0,
        LEVELS=int(lout), QUANT_OUT=bool(quantize_output), NOISE=bool(noise), SHOT=shot,
        HAS_BIAS=bias is not None and quantize_output, OBSERVE=bool(observe),
        SAVE_MASK=mask is not None and quantize_output, USE_TMA=use_tma,
        EPI_SPLIT=cfg.epi_split, RUNS8=index[3] % 8 == 0 and index[4] % 8 == 0,
        # The interpreter's 16-bit dot is broken (Triton 3.9 reads the raw bits); 16-bit
        # products are exact in float32, so upcasting there computes the same sums.
        IEEE_DOT=dtype == torch.float32 or _INTERPRET, UPCAST_DOT=_INTERPRET,
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M, PART_BLOCK=256,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
        **({"maxnreg": cfg.maxnreg} if cfg.maxnreg and not _INTERPRET else {}),
    )
    if mask is not None and not quantize_output:
        # No Q_out here (partial sums under TP): the mask of the local accumulator, by torch ops.
        lo, hi = ranges[2, 0], ranges[2, 1]
        mask.copy_(((y >= lo) & (y <= hi)) | (lo > hi))
    return y, obs, mask


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _clip_grad_kernel(grad_ptr, src_ptr, rng_ptr, R, C, stride_gr, stride_sr, stride_sc,
                      BR: tl.constexpr, BC: tl.constexpr):
    """grad[r, c] = 0 where src[r, c] lies outside the range (in place; grad row-contiguous)."""
    pid = tl.program_id(0)
    n_cb = tl.cdiv(C, BC)
    rows = ((pid // n_cb) * BR + tl.arange(0, BR)).to(tl.int64)
    cols = (pid % n_cb) * BC + tl.arange(0, BC)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    x = tl.load(src_ptr + rows[:, None] * stride_sr + cols.to(tl.int64)[None, :] * stride_sc,
                mask=mask, other=0.0)
    g_ptrs = grad_ptr + rows[:, None] * stride_gr + cols[None, :]
    g = tl.load(g_ptrs, mask=mask, other=0.0)
    keep = in_range(x, tl.load(rng_ptr), tl.load(rng_ptr + 1))
    tl.store(g_ptrs, tl.where(keep, g, tl.zeros_like(g)), mask=mask)


def _clip_grad_(grad: torch.Tensor, src: torch.Tensor, rng: torch.Tensor) -> torch.Tensor:
    R, C = src.shape
    if R == 0 or C == 0:
        return grad
    if grad.stride(1) != 1:
        grad = grad.contiguous()
    BR, BC = (32, 64) if _INTERPRET else (16, 256)
    grid = (triton.cdiv(R, BR) * triton.cdiv(C, BC),)
    _clip_grad_kernel[grid](grad, src, rng, R, C, grad.stride(0), src.stride(0), src.stride(1),
                            BR=BR, BC=BC, num_warps=4)
    return grad


def linear_backward(grad_y2d, x2d, weight, x_range, w_range, out_mask, *, clipped: bool,
                    has_bias: bool, needs_grad: tuple[bool, bool, bool]):
    """Straight-through (clipped=False) or clipped gradients, using the UNQUANTIZED x and W
    (semantics s.5): g = grad_y * out_mask if clipped (out_mask None: Q_out ran elsewhere);
    grad_x = g @ W (* in_range(x) if clipped); grad_w = g^T @ x (* in_range(W) if clipped);
    grad_b = grad_y.sum(0), never masked: the bias is added after Q_out, digitally (s.2).

    Returns (grad_x [M, K] in x dtype or None, grad_w [N, K] in W dtype or None, grad_b or None).
    """
    need_x, need_w, need_b = needs_grad
    g = grad_y2d
    if g.dtype != x2d.dtype:
        g = g.to(x2d.dtype)
    grad_x = grad_w = grad_b = None
    if need_b and has_bias:
        grad_b = g.sum(0, dtype=torch.float32).to(weight.dtype)
    if clipped and out_mask is not None:
        zero = torch.zeros((), dtype=g.dtype, device=g.device)
        g = torch.where(out_mask.reshape(g.shape), g, zero)
    if need_x:
        grad_x = g @ weight  # cuBLAS, float32 accumulation
        if clipped:
            grad_x = _clip_grad_(grad_x, x2d, x_range)
    if need_w:
        grad_w = g.t() @ x2d
        if clipped:
            grad_w = _clip_grad_(grad_w, weight, w_range)
        grad_w = grad_w.to(weight.dtype)
    return grad_x, grad_w, grad_b


# --------------------------------------------------------------------------------------------
# Stand-alone pieces
# --------------------------------------------------------------------------------------------
def quantize_tensor(x, rng, seed, *, levels: int, lut: float | None, stream: int, noisy: bool,
                    index: LinearIndex | None, photons: float = 0.0,
                    contraction: int = 1) -> torch.Tensor:
    """Elementwise Q on a 2-D [M, N] tensor (index only for noisy; default: the whole tensor);
    used for Q_out after a TP reduction. Returns x's dtype. photons > 0 (with noisy): the shot
    read-out with n = photons, K = contraction (no lut)."""
    if noisy and photons > 0 and lut:
        raise ValueError("quantize_tensor: the shot read-out (photons > 0) takes no lut")
    if x.dim() != 2:
        raise ValueError(f"quantize_tensor: expected a 2-D tensor, got {tuple(x.shape)}")
    M, N = x.shape
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if noisy:
        if seed is None:
            raise ValueError("quantize_tensor: noisy mode needs a seed tensor")
        index = index if index is not None else LinearIndex.whole(M, N)
    _quantize_into(x, out, rng, seed, None, levels=levels, lut=lut, noisy=noisy, stream=stream,
                   index=index.args() if noisy else None, photons=photons,
                   contraction=contraction)
    return out


def observe_minmax(x) -> torch.Tensor:
    """float32 [2] (min, max) of x, a sync-free device reduction; (+inf, -inf) for an empty x."""
    if x.numel() == 0:
        return _new_obs(x.device)[0]
    mn, mx = torch.aminmax(x.detach())
    return torch.stack([mn, mx]).float()
