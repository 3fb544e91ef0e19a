"""torch.library custom ops of the optical simulation: the boundary torch.compile sees.

Each op has a real implementation that dispatches to the Triton kernels (CUDA tensors, or CPU
tensors under TRITON_INTERPRET=1 when the kernel mode is "triton") or to the plain-torch reference
(CPU), a fake implementation (shapes only) so the compiler traces through it without graph breaks,
and a straight-through autograd formula whose backward is itself a custom op.

Nothing here reads a tensor value on the host: ranges and seeds travel as device tensors.

Noise indices of linear outputs are described by five integers, `index = (s_local, s_global,
row_base, n_global, col_offset)`: output element (m, n) of the 2-D [M, N] view has the global flat
index ((m // s_local) * s_global + m % s_local + row_base) * n_global + n + col_offset. This covers
an output [B, S, N] whose local block is a data-, sequence- or tensor-parallel shard of the
logical [Bg, Sg, Ng] tensor (row_base = b_offset * Sg + s_offset).
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import reference as ref

__all__ = [
    "KERNEL_MODES",
    "set_kernel_mode",
    "get_kernel_mode",
    "linear_index",
    "optical_linear",
    "optical_quantize",
    "optical_attention",
    "schema_fingerprint",
]

KERNEL_MODES = ("auto", "triton", "reference")
_kernel_mode = "auto"


def set_kernel_mode(mode: str) -> None:
    """"auto": Triton on CUDA tensors, reference on CPU; "triton": Triton everywhere (CPU needs
    TRITON_INTERPRET=1); "reference": the plain-torch reference everywhere (slow on GPU)."""
    global _kernel_mode
    check_kernel_mode(mode)
    _kernel_mode = mode


def check_kernel_mode(mode: str) -> None:
    """Raise ValueError (naming `optical.kernels` and the values allowed on this machine) unless
    `mode` can run here."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"optical.kernels: must be one of {list(KERNEL_MODES)}, got {mode!r}")
    if mode == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "optical.kernels: 'triton' needs a CUDA GPU, or TRITON_INTERPRET=1 to run the "
            "kernels in Triton's interpreter on the CPU; allowed here: 'auto', 'reference'"
        )


def get_kernel_mode() -> str:
    return _kernel_mode


def _use_kernels(t: Tensor) -> bool:
    if _kernel_mode == "reference":
        return False
    if t.is_cuda:
        return True
    return _kernel_mode == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def _use_attention_kernel(q: Tensor) -> bool:
    """The fused attention covers bf16/fp16/fp32 and the usual head dims; anything else (unusual
    heads, float64) takes the materialised reference, which is exact but O(L^2)."""
    if not _use_kernels(q):
        return False
    from .kernels.attention import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS

    return q.dtype in SUPPORTED_DTYPES and q.shape[-1] in SUPPORTED_HEAD_DIMS


def _no_autocast(fn):
    """Run an op's implementation with autocast off: the ops fix their own precisions (float32
    quantizer math and accumulation), and a surrounding autocast region would otherwise lower
    the reference's matmuls to bf16. The modules apply autocast's input casts themselves."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = args[0].device.type
        if not torch.is_autocast_enabled(device_type):  # the usual case: no context to enter
            return fn(*args, **kwargs)
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


# The ops are defined with the low-level torch.library API: `torch.library.custom_op` would wrap
# each call in a Python layer more (an output-aliasing check), and small models are launch-bound
# (bench/overhead.py), every linear of every layer paying it twice per step. Their autograd is
# registered on the op itself (`torch.library.register_autograd`), not put in an autograd.Function
# around it: under torch.compile, an autograd.Function's forward inside an activation-checkpointed
# block was saved instead of recomputed on the GPU (1.1B: +6.6 GiB, bench/results/README.md).
_LIB = torch.library.Library("optical", "FRAGMENT")
_SCHEMAS: list[str] = []  # "name(args) -> out" of every op defined, for schema_fingerprint


class _Op:
    """One `optical::<name>` op: schema inferred from `impl`'s annotations, `impl` registered for
    CPU and CUDA tensors, a fake (shape) implementation added with `register_fake`."""

    def __init__(self, name: str, impl):
        self.name = f"optical::{name}"
        schema = name + torch.library.infer_schema(impl, mutates_args=())
        _LIB.define(schema)
        _SCHEMAS.append(schema)
        kernel = _no_autocast(impl)
        for key in ("CPU", "CUDA"):
            _LIB.impl(name, kernel, key)
        self.impl = impl

    def register_fake(self, fn):
        torch.library.register_fake(self.name, fn, lib=_LIB)
        return fn

    def register_autograd(self, backward, *, setup_context):
        torch.library.register_autograd(self.name, backward, setup_context=setup_context,
                                        lib=_LIB)


def _op(name: str):
    return lambda impl: _Op(name, impl)


def schema_fingerprint() -> str:
    """12 hex digits naming the optical ops' schemas (arguments, defaults, outputs): equal
    across trees whose compiled graphs can call each other's ops."""
    import hashlib

    return hashlib.sha256("\n".join(sorted(_SCHEMAS)).encode()).hexdigest()[:12]


def linear_index(
    x_shape: torch.Size | tuple[int, ...],
    n_local: int,
    *,
    batch_offset: int = 0,
    seq_offset: int = 0,
    seq_global: int | None = None,
    col_offset: int = 0,
    n_global: int | None = None,
) -> list[int]:
    """The five-integer index map of a linear output whose input has shape `x_shape`.

    Leading dims are (batch..., seq); a 2-D input counts every row as its own batch element.
    """
    if len(x_shape) >= 3:
        s_local = int(x_shape[-2])
    else:
        s_local = 1
    s_global = s_local if seq_global is None else int(seq_global)
    return [s_local, s_global, batch_offset * s_global + seq_offset, n_global or n_local, col_offset]


def _linear_noise_index(m: int, n: int, index: List[int], device) -> Tensor:
    s_local, s_global, row_base, n_global, col_offset = index
    rows = torch.arange(m, dtype=torch.int64, device=device)
    grow = (rows // s_local) * s_global + rows % s_local + row_base
    cols = torch.arange(n, dtype=torch.int64, device=device) + col_offset
    return grow[:, None] * n_global + cols[None, :]


def _observe(t: Tensor, quantiles: Optional[List[float]]) -> Tensor:
    return ref.observe_range(t, tuple(quantiles) if quantiles else None)


def _lut(lut: float) -> float | None:
    return lut if lut > 0 else None


def _levels3(levels: int, qlevels: Optional[List[int]]) -> tuple[int, ...]:
    return (levels,) * 3 if not qlevels else tuple(int(v) for v in qlevels)


def _levels6(levels: int, qlevels: Optional[List[int]]) -> tuple[int, ...]:
    return (levels,) * 6 if not qlevels else tuple(int(v) for v in qlevels)


def _qlevels_arg(levels: int, qlevels) -> Optional[List[int]]:
    """None when every quantizer uses `levels` (the op's default), else the list."""
    if qlevels is None or all(int(v) == int(levels) for v in qlevels):
        return None
    return [int(v) for v in qlevels]


# --------------------------------------------------------------------------------------------
# Linear
# --------------------------------------------------------------------------------------------
@_op("linear")
def _linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    ranges: Tensor,
    seed: Tensor,
    levels: int,
    lut: float,
    stream: int,
    index: List[int],
    observe: bool,
    quantize_output: bool,
    clipped: bool,
    quantiles: Optional[List[float]],
    noise: bool = True,
    qlevels: Optional[List[int]] = None,
    photons: float = 0.0,
) -> Tuple[Tensor, Tensor, Tensor]:
    # qlevels: per-quantizer levels (Q_x, Q_w, Q_out) overriding `levels`; photons > 0: the shot
    # read-out of Q_out (n = photons, K = in_features). clipped: the backward masks the
    # gradients of Q_x and Q_w always, and of Q_out where this call applies it (the [M, N] mask
    # returned; without Q_out it is empty: the quantize op after the reduction masks instead).
    ref.check_linear_bias("optical_linear", bias, quantize_output)  # in the op and its fake
    save_mask = clipped and quantize_output
    lv = _levels3(levels, qlevels)
    k = x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if _use_kernels(x) and not quantiles:
        from .kernels import linear as klinear
        if ranges.dtype != torch.float32 or not ranges.is_contiguous():
            ranges = ranges.float().contiguous()
        y, obs, mask = klinear.forward_packed(
            x2, weight, bias if quantize_output else None, ranges, seed, lv, _lut(lut),
            stream, index, observe, quantize_output, save_mask, noise, photons,
        )
        if mask is None:
            mask = x.new_empty((0,), dtype=torch.bool)
        return y.view(*x.shape[:-1], n), obs, mask
    xq = ref.quantize(x2, ranges[0], lv[0]).float()
    wq = ref.quantize(weight, ranges[1], lv[1], lut=_lut(lut)).float()
    acc = xq @ wq.t()
    if observe:
        obs = torch.stack([_observe(x2, quantiles), _observe(weight, quantiles), _observe(acc, quantiles)])
    else:
        obs = ref.unset_observations(3, x.device)
    mask = ref.clamp_mask(acc, ranges[2]) if save_mask else x.new_empty((0,), dtype=torch.bool)
    if not quantize_output:
        return acc.reshape(*x.shape[:-1], n), obs, mask
    y = ref.quantize_readout(
        acc, ranges[2], lv[2], seed=seed.reshape(()), stream=stream,
        index=_linear_noise_index(m, n, index, x.device) if noise else None, photons=photons,
        contraction=k)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n), obs, mask


@_linear.register_fake
def _linear_fake(x, weight, bias, ranges, seed, levels, lut, stream, index, observe,
                 quantize_output, clipped, quantiles, noise=True, qlevels=None, photons=0.0):
    ref.check_linear_bias("optical_linear", bias, quantize_output)  # in the op and its fake
    n = weight.shape[0]
    m = x.numel() // x.shape[-1]
    y = x.new_empty((*x.shape[:-1], n), dtype=x.dtype if quantize_output else torch.float32)
    obs = x.new_empty((3, 2), dtype=torch.float32)
    mask = x.new_empty((m, n) if clipped and quantize_output else (0,), dtype=torch.bool)
    return y, obs, mask


@_op("linear_backward")
def _linear_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    ranges: Tensor,
    out_mask: Tensor,
    clipped: bool,
    has_bias: bool,
    needs_x: bool,
    needs_w: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    k = x.shape[-1]
    n = weight.shape[0]
    g2 = grad_y.reshape(-1, n)
    x2 = x.reshape(-1, k)
    # The forward saved an [M, N] mask where it applied Q_out; an empty one (no Q_out here: a
    # row-wise tensor-parallel partial sum) leaves Q_x's and Q_w's masks only.
    mask = out_mask if clipped and out_mask.dim() == 2 else None
    if _use_kernels(x):
        from .kernels import linear as klinear

        gx, gw, gb = klinear.linear_backward(  # the ranges matter to the clipped mode only
            g2, x2, weight, ranges[0] if clipped else None, ranges[1] if clipped else None,
            mask, clipped=clipped, has_bias=has_bias, needs_grad=(needs_x, needs_w, has_bias),
        )
    else:
        gx, gw, gb = ref.optical_linear_backward(g2, x2, weight, None, ranges[0], ranges[1],
                                                 ranges[2], clipped=clipped, has_bias=has_bias,
                                                 out_mask=mask)
    gx = gx.reshape(x.shape).contiguous() if (needs_x and gx is not None) else x.new_empty((0,))
    gw = gw.contiguous() if (needs_w and gw is not None) else weight.new_empty((0,))
    gb = gb if (has_bias and gb is not None) else weight.new_empty((0,))
    return gx, gw, gb


@_linear_backward.register_fake
def _linear_backward_fake(grad_y, x, weight, ranges, out_mask, clipped, has_bias, needs_x, needs_w):
    # Every op returns contiguous tensors; the fakes say so (inductor checks the strides).
    gx = x.new_empty(x.shape) if needs_x else x.new_empty((0,))
    gw = weight.new_empty(weight.shape) if needs_w else weight.new_empty((0,))
    gb = weight.new_empty((weight.shape[0],) if has_bias else (0,))
    return gx, gw, gb


def _linear_setup_context(ctx, inputs, output):
    (x, weight, bias, ranges, seed, levels, lut, stream, index, observe, qout, clipped,
     quantiles, noise, qlevels, photons) = inputs
    _, _, mask = output
    ctx.save_for_backward(x, weight, ranges, mask)
    ctx.has_bias = bias is not None
    ctx.clipped = clipped


def _linear_autograd_backward(ctx, grad_y, _grad_obs, _grad_mask):
    x, weight, ranges, mask = ctx.saved_tensors
    needs_x, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx, gw, gb = torch.ops.optical.linear_backward(
        grad_y, x, weight, ranges, mask, ctx.clipped, ctx.has_bias, needs_x, needs_w
    )
    return (
        gx if needs_x else None,
        gw if needs_w else None,
        gb if ctx.has_bias else None,
        None, None, None, None, None, None, None, None, None, None, None, None, None,
    )


_linear.register_autograd(_linear_autograd_backward, setup_context=_linear_setup_context)


def optical_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    ranges: Tensor,
    seed: Tensor,
    *,
    levels: int,
    lut: float | None,
    stream: int,
    index: list[int],
    observe: bool,
    quantize_output: bool = True,
    clipped: bool = False,
    quantiles: tuple[float, float] | None = None,
    noise: bool = True,
    qlevels: tuple[int, int, int] | None = None,
    photons: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """y = Q_out(Q_x(x) @ Q_w(W)^T) + b and the observed ranges [3, 2] (x, W, accumulator).

    noise=False (`q_noise: false`): Q_out rounds deterministically (`seed` is then unused).
    qlevels: levels of (Q_x, Q_w, Q_out), overriding `levels` (None = `levels` for all).
    photons > 0: shot read-out of Q_out with n = photons, K = in_features (`q_readout: shot`).
    quantize_output=False: the float32 accumulator (a row-wise tensor-parallel partial sum, for
    `optical_quantize` after the reduction); the bias must then be None (it is added after
    Q_out, so the caller adds it after the reduction); `clipped` still masks Q_x's and Q_w's
    gradients. Bad arguments raise ValueError naming them, before any launch."""
    ref.check_quantizer_args("optical_linear", levels=levels, qlevels=qlevels,
                             level_names=("x", "w", "out"), lut=lut, photons=photons)
    y, obs, _ = torch.ops.optical.linear(
        x, weight, bias, ranges, seed, levels, float(lut or 0.0), stream, index, observe,
        quantize_output, bool(clipped), list(quantiles) if quantiles else None,
        bool(noise), _qlevels_arg(levels, qlevels), float(photons),
    )
    return y, obs


# --------------------------------------------------------------------------------------------
# Stand-alone quantizer (Q_out after a tensor-parallel reduction)
# --------------------------------------------------------------------------------------------
@_op("quantize")
def _quantize(
    x: Tensor,
    rng: Tensor,
    seed: Tensor,
    levels: int,
    lut: float,
    stream: int,
    noisy: bool,
    index: List[int],
    observe: bool,
    save_mask: bool,
    quantiles: Optional[List[float]],
    photons: float = 0.0,
    contraction: int = 1,
) -> Tuple[Tensor, Tensor, Tensor]:
    # photons > 0 (with noisy): the shot read-out with n = photons, K = contraction.
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    m = x2.shape[0]
    obs = _observe(x2, quantiles) if observe else ref.unset_observations(1, x.device)[0]
    mask = ref.clamp_mask(x2, rng) if save_mask else x.new_empty((0,), dtype=torch.bool)
    if _use_kernels(x):
        from .kernels import linear as klinear
        y = klinear.quantize_tensor(
            x2, rng, seed, levels=levels, lut=_lut(lut), stream=stream, noisy=noisy,
            index=klinear.LinearIndex(*index) if noisy else None, photons=photons,
            contraction=contraction,
        )
    elif noisy and photons > 0:
        z = ref.shot_normal(seed.reshape(()), stream, _linear_noise_index(m, n, index, x.device))
        y = ref.quantize(x2, rng, levels, lut=_lut(lut),
                         shot=(z, ref.shot_nk(photons, contraction, x.device)))
    else:
        u = ref.philox_uniform(seed.reshape(()), stream, _linear_noise_index(m, n, index, x.device)) if noisy else None
        y = ref.quantize(x2, rng, levels, lut=_lut(lut), noise=u)
    return y.reshape(x.shape).contiguous(), obs, mask


@_quantize.register_fake
def _quantize_fake(x, rng, seed, levels, lut, stream, noisy, index, observe, save_mask, quantiles,
                   photons=0.0, contraction=1):
    m = x.numel() // x.shape[-1]
    return (
        x.new_empty(x.shape),
        x.new_empty((2,), dtype=torch.float32),
        x.new_empty((m, x.shape[-1]) if save_mask else (0,), dtype=torch.bool),
    )


def _quantize_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[2])
    ctx.clipped = inputs[9]


def _quantize_autograd_backward(ctx, grad_y, _grad_obs, _grad_mask):
    (mask,) = ctx.saved_tensors
    g = grad_y * mask.reshape(grad_y.shape) if ctx.clipped else grad_y
    return (g,) + (None,) * 12


_quantize.register_autograd(_quantize_autograd_backward, setup_context=_quantize_setup_context)


def optical_quantize(
    x: Tensor,
    rng: Tensor,
    seed: Tensor,
    *,
    levels: int,
    lut: float | None = None,
    stream: int = 0,
    noisy: bool = False,
    index: list[int] | None = None,
    observe: bool = False,
    clipped: bool = False,
    quantiles: tuple[float, float] | None = None,
    photons: float = 0.0,
    contraction: int = 1,
) -> tuple[Tensor, Tensor]:
    """Q(x) over the last-dim-major 2-D view of x, straight-through; returns (y, observed [2]).

    photons > 0 with noisy: the shot read-out (n = photons, K = contraction), which takes no
    lut. Bad arguments raise ValueError naming them, before any launch."""
    ref.check_quantizer_args("optical_quantize", levels=levels, lut=lut,
                             photons=photons if noisy else 0.0, contraction=contraction,
                             readout_lut=True)
    if index is None:
        index = linear_index(x.shape, x.shape[-1])
    y, obs, _ = torch.ops.optical.quantize(
        x, rng, seed, levels, float(lut or 0.0), stream, noisy, index, observe, clipped,
        list(quantiles) if quantiles else None, float(photons), int(contraction),
    )
    return y, obs


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
def _attn_maps(q: Tensor, k: Tensor, index: List[int], q_start: int):
    """Row r of this call is row q_start + r of the full [Bg, Hg, Lk, Lk] / [Bg, Hg, Lk, D]."""
    d = q.shape[3]
    lk = k.shape[2]
    b_off, b_glob, h_off, h_glob = index
    s_map = ref.IndexMap((b_off, h_off, q_start, 0), (b_glob, h_glob, lk, lk))
    y_map = ref.IndexMap((b_off, h_off, q_start, 0), (b_glob, h_glob, lk, d))
    return s_map, y_map


def _ref_attention(q, k, v, ranges, seeds, levels, lut, stream, scale, causal, index, noise,
                   key_mask, q_start, photons=0.0):
    s_map, y_map = _attn_maps(q, k, index, q_start)
    return ref.optical_attention_forward(
        q, k, v, ranges[0], ranges[1], ranges[2], ranges[3], ranges[4], levels=levels,
        photons=photons,
        lut=_lut(lut), seeds=seeds, stream=stream, scale=scale, causal=causal,
        s_index_map=s_map, y_index_map=y_map, noise=noise, key_padding_mask=key_mask,
        q_start=q_start,
    )


@_op("attention")
def _attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ranges: Tensor,
    seeds: Tensor,
    levels: int,
    lut: float,
    stream: int,
    scale: float,
    causal: bool,
    index: List[int],
    observe: bool,
    clipped: bool,
    noise: bool = True,
    key_mask: Optional[Tensor] = None,
    q_start: int = 0,
    qlevels: Optional[List[int]] = None,
    photons: float = 0.0,
    q_start_dev: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    # `clipped` changes only the backward; it is an argument so the autograd context sees it.
    # qlevels: levels of (Q_q, Q_k, Q_s, Q_p, Q_v, Q_y) overriding `levels`; photons > 0: shot
    # read-out of Q_s and Q_y. q_start_dev: q_start as a 0-d int64 device tensor (replaces the
    # int; a static-cache decoding step, forward only).
    levels = _levels6(levels, qlevels)
    if q_start_dev is not None:
        q_start = q_start_dev
    if _use_attention_kernel(q):
        from .kernels import attention as kattn
        b_off, b_glob, h_off, h_glob = index
        y, stats, obs = kattn.attention_forward(
            q, k, v, ranges[0], ranges[1], ranges[2], ranges[3], ranges[4], seeds,
            levels=levels, lut=_lut(lut), stream=stream, scale=scale, causal=causal,
            batch_offset=b_off, batch_global=b_glob, head_offset=h_off, heads_global=h_glob,
            observe=observe, noise=noise, key_padding_mask=key_mask, q_start=q_start,
            photons=photons,
        )
        return y.contiguous(), stats, obs
    fwd = _ref_attention(q, k, v, ranges, seeds, levels, lut, stream, scale, causal, index, noise,
                         key_mask, q_start, photons)
    if observe:
        obs = torch.stack([
            ref.observe_range(q), ref.observe_range(k), ref.observe_range(v), fwd["s_obs"],
            fwd["y_obs"],
        ])
    else:
        obs = ref.unset_observations(5, q.device)
    # The reference recomputes everything in the backward, so it keeps no statistics.
    return fwd["y"].contiguous(), q.new_empty((0,), dtype=torch.float32), obs


@_attention.register_fake
def _attention_fake(q, k, v, ranges, seeds, levels, lut, stream, scale, causal, index, observe,
                    clipped, noise=True, key_mask=None, q_start=0, qlevels=None, photons=0.0,
                    q_start_dev=None):
    b, h, lq, _ = q.shape
    # The kernels keep per-row statistics [B, H, L] (float32); the reference keeps none. The
    # compiler must know the real size, which depends on the path the eager op will take.
    stats_shape = (b, h, lq) if _use_attention_kernel(q) else (0,)
    return (
        q.new_empty(q.shape),
        q.new_empty(stats_shape, dtype=torch.float32),
        q.new_empty((5, 2), dtype=torch.float32),
    )


@_op("attention_backward")
def _attention_backward(
    grad_y: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    y: Tensor,
    stats: Tensor,
    ranges: Tensor,
    seeds: Tensor,
    levels: int,
    lut: float,
    stream: int,
    scale: float,
    causal: bool,
    index: List[int],
    clipped: bool,
    noise: bool = True,
    key_mask: Optional[Tensor] = None,
    q_start: int = 0,
    qlevels: Optional[List[int]] = None,
    photons: float = 0.0,
) -> Tuple[Tensor, Tensor, Tensor]:
    levels = _levels6(levels, qlevels)
    if _use_attention_kernel(q):
        from .kernels import attention as kattn
        b_off, b_glob, h_off, h_glob = index
        grads = kattn.attention_backward(
            grad_y, q, k, v, y, stats, ranges[0], ranges[1], ranges[2], ranges[3], seeds,
            levels=levels, lut=_lut(lut), stream=stream, scale=scale, causal=causal,
            batch_offset=b_off, batch_global=b_glob, head_offset=h_off, heads_global=h_glob,
            clipped=clipped, noise=noise, key_padding_mask=key_mask, q_start=q_start,
            photons=photons,
        )
    else:
        fwd = _ref_attention(q, k, v, ranges, seeds, levels, lut, stream, scale, causal, index,
                             noise, key_mask, q_start, photons)
        fwd["y"] = y
        grads = ref.optical_attention_backward(
            grad_y, q, k, v, fwd, ranges[0], ranges[1], ranges[3], ranges[2], scale=scale,
            clipped=clipped,
        )
    return tuple(g.contiguous() for g in grads)


@_attention_backward.register_fake
def _attention_backward_fake(grad_y, q, k, v, y, stats, ranges, seeds, levels, lut, stream, scale,
                             causal, index, clipped, noise=True, key_mask=None, q_start=0,
                             qlevels=None, photons=0.0):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    (q, k, v, ranges, seeds, levels, lut, stream, scale, causal, index, observe, clipped, noise,
     key_mask, q_start, qlevels, photons, q_start_dev) = inputs
    y, stats, _ = output
    ctx.save_for_backward(q, k, v, y, stats, ranges, seeds, key_mask)
    ctx.args = (levels, lut, stream, scale, causal, index)
    ctx.clipped, ctx.noise = clipped, noise
    ctx.q_start, ctx.q_start_on_device = q_start, q_start_dev is not None
    ctx.qlevels, ctx.photons = qlevels, photons


def _attention_autograd_backward(ctx, grad_y, _grad_stats, _grad_obs):
    if ctx.q_start_on_device:
        raise RuntimeError("optical attention: q_start as a device tensor is for inference "
                           "(static-cache decoding); training passes an int q_start")
    q, k, v, y, stats, ranges, seeds, key_mask = ctx.saved_tensors
    levels, lut, stream, scale, causal, index = ctx.args
    dq, dk, dv = torch.ops.optical.attention_backward(
        grad_y, q, k, v, y, stats, ranges, seeds, levels, lut, stream, scale, causal, index,
        ctx.clipped, ctx.noise, key_mask, ctx.q_start, ctx.qlevels, ctx.photons,
    )
    return (dq, dk, dv) + (None,) * 16


_attention.register_autograd(_attention_autograd_backward, setup_context=_attention_setup_context)


def optical_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ranges: Tensor,
    seeds: Tensor,
    *,
    levels: int,
    lut: float | None,
    stream: int,
    scale: float,
    causal: bool = True,
    index: list[int] | None = None,
    observe: bool = False,
    clipped: bool = False,
    noise: bool = True,
    key_padding_mask: Tensor | None = None,
    q_start: int | Tensor = 0,
    qlevels: tuple[int, ...] | None = None,
    photons: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Section 3 of the semantics page; returns (y, observed ranges [5, 2]: q, k, v, S, y_raw).

    q [B, H, Lq, D], k/v [B, Hkv, Lk, D]. `key_padding_mask`: None or bool [B, Lk], True = key
    visible. `q_start`: absolute position of query row 0 (q_start + Lq <= Lk; a KV-cache step
    has q_start = Lk - Lq); row r takes the noise indices of row q_start + r of the full
    attention at key length Lk and, causal, sees keys j <= q_start + r; a 0-d int64 device
    tensor instead of an int is read on the device (static-cache decoding under a CUDA graph;
    forward only, its value unchecked). Rows with no visible key
    output 0. noise=False (`q_noise: false`): Q_s and Q_y round deterministically (`seeds`
    unused). qlevels: levels of (Q_q, Q_k, Q_s, Q_p, Q_v, Q_y) overriding `levels`. photons > 0:
    shot read-out of Q_s (K = head dim) and Q_y (K = keys the row sees). Bad arguments raise
    ValueError naming them.
    """
    if index is None:
        index = [0, q.shape[0], 0, q.shape[1]]
    ref.check_quantizer_args("optical_attention", levels=levels, qlevels=qlevels,
                             level_names=("q", "k", "s", "p", "v", "y"), lut=lut,
                             photons=photons)
    ref.check_attention_args(q, k, key_padding_mask, q_start, causal)
    on_device = isinstance(q_start, Tensor)
    y, _, obs = torch.ops.optical.attention(
        q, k, v, ranges, seeds, levels, float(lut or 0.0), stream, float(scale), causal, index,
        observe, clipped, bool(noise), key_padding_mask, 0 if on_device else int(q_start),
        _qlevels_arg(levels, qlevels), float(photons), q_start if on_device else None,
    )
    return y, obs
