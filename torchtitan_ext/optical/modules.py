"""OpticalLinear and OpticalAttention: drop-in modules over the custom ops.

- `OpticalLinear` is an `nn.Linear` (so tensor-parallel styles accept it) whose forward is the
  optical linear. It knows its own sharding: with a DTensor weight it computes on local shards,
  keeps Q_out local for column-wise splits, and for row-wise splits reduces the float32 partial
  sums first and quantizes after the reduction, never a partial sum.
- `OpticalAttention` replaces the inner scaled-dot-product call of a Llama attention block
  (signature of torchtitan's `ScaledDotProductAttentionWrapper`), so wq/wk/wv/wo stay linears.

Parallelize functions describe a module's place in the whole computation through `shard`
(a `ShardContext`): the data-parallel rank owns a slice of the global batch and the
tensor-parallel rank a slice of the heads, which makes noise indices global (semantics 1.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from . import stats as clamp_stats
from .config import QuantizerConfig
from .ranges import RangeState, local

__all__ = ["ShardContext", "OpticalLinear", "OpticalAttention"]

_SEED_HIGH = 2**31 - 1


def _draw_seeds(n: int, device) -> torch.Tensor:
    # From the framework generator on the device, as dropout does: no host sync, and activation
    # checkpointing (which restores the generator) redraws the same seeds when it recomputes.
    return torch.randint(0, _SEED_HIGH, (n,), device=device, dtype=torch.int64)


@dataclass
class ShardContext:
    """Where this rank's tensors sit in the logical (unsharded) computation."""

    dp_rank: int = 0  # batch shards: data parallel (FSDP / HSDP / DDP) rank and degree
    dp_size: int = 1
    tp_rank: int = 0  # head shards of attention under tensor parallelism
    tp_size: int = 1


def _autocast(*tensors):
    """Apply autocast's input cast by hand: the custom ops are opaque to autocast, but under
    torchtitan's mixed precision (AMP) the layers they replace would run in the autocast dtype."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t if t is None or not t.is_floating_point() else t.to(dtype) for t in tensors)


def _row_wise(weight) -> bool:
    """Whether `weight` is a row-wise tensor-parallel shard (each rank holds a partial sum)."""
    from torch.distributed.tensor import DTensor, Shard

    return isinstance(weight, DTensor) and weight.placements[-1] == Shard(1)


def _batch_extent(shape: torch.Size) -> int:
    return int(torch.Size(shape[:-2]).numel()) if len(shape) >= 3 else int(shape[0])


class OpticalLinear(RangeState, nn.Linear):
    """y = Q_out(Q_x(x) @ Q_w(W)^T) + b (semantics page, section 2)."""

    RANGE_NAMES = ("x", "w", "out")
    CLAMP_NAMES = clamp_stats.LINEAR_CLAMP_NAMES
    CLAMP_KIND = "linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 config: QuantizerConfig | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(config or QuantizerConfig(), self.weight.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantizerConfig) -> "OpticalLinear":
        """Wrap an existing linear, keeping its parameter objects (works on the meta device)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features = linear.in_features
        new.out_features = linear.out_features
        new.weight = linear.weight
        new.register_parameter("bias", linear.bias)
        new._setup(config, linear.weight.device)
        new.train(linear.training)
        return new

    def _setup(self, config: QuantizerConfig, device) -> None:
        self.config = config
        self.smooth = config.q_smooth_factor
        self.shard = ShardContext()
        # Placement the row-wise tensor-parallel style wants for the output (set by parallelize):
        # reducing straight into it lets Q_out run on the reduced, already-sharded tensor.
        self.tp_output_placement = None
        self._init_range_buffers(device)

    def extra_repr(self) -> str:
        c = self.config
        return (f"{super().extra_repr()}, levels={c.q_levels}, lut={c.lut}, grad={c.q_grad}"
                + (", bypass" if c.q_bypass else "") + ("" if c.q_noise else ", no noise"))

    # ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.collect_clamp_stats:
            self._measure_clamping(x)
        if self.config.q_bypass or not self.optical_enabled:
            return self._forward_bypass(x)
        from torch.distributed.tensor import DTensor

        if isinstance(self.weight, DTensor):
            return self._forward_tensor_parallel(x)
        x, weight, bias = _autocast(x, self.weight, self.bias)
        index = ops.linear_index(
            x.shape, self.out_features, batch_offset=self.shard.dp_rank * _batch_extent(x.shape)
        )
        y, obs = self._linear(x, weight, bias, index, _draw_seeds(1, x.device),
                              quantize_output=True)
        return y

    def _linear(self, x, weight, bias, index, seed, *, quantize_output, record=True):
        c = self.config
        y, obs = ops.optical_linear(
            x, weight, bias, self.ranges(), seed,
            levels=c.q_levels, lut=c.lut, stream=c.q_init_seed, index=index,
            observe=self.training, quantize_output=quantize_output,
            clipped=c.q_grad == "clipped", quantiles=c.q_quantiles, noise=c.q_noise,
            qlevels=c.linear_levels, photons=c.photons,
        )
        if self.training and record:
            self.record(obs)
        return y, obs

    def _measure_clamping(self, x: torch.Tensor) -> None:
        w = self.weight
        row_wise = _row_wise(w)
        x_local, w_local = local(x), local(w)
        if not row_wise:
            x_local, w_local = _autocast(x_local, w_local)
        fr = clamp_stats.linear_clamp_fractions(x_local, w_local, self.ranges(),
                                                levels=self.config.linear_levels,
                                                lut=self.config.lut)
        # Row-wise shards hold partial sums: only the operands' fractions mean anything.
        self.record_clamp(fr, measured=2 if row_wise else None)

    def _forward_bypass(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.linear(x, self.weight, self.bias)
        # Observe what Q_out would quantize, as the optical path does: the accumulator before
        # the bias (added after Q_out, section 2) and, under row-wise tensor parallelism, the
        # reduced sum, never a rank's partial sum (reduced into the placement the row-wise
        # style wants, so its output hook has nothing left to do).
        acc = F.linear(x, self.weight)
        if _row_wise(self.weight):
            from torch.distributed.tensor import Replicate

            acc = acc.redistribute(acc.device_mesh, [self.tp_output_placement or Replicate()])
        q = self.config.q_quantiles
        self.record(torch.stack([
            ops.ref.observe_range(local(x), q),
            ops.ref.observe_range(local(self.weight), q),
            ops.ref.observe_range(local(acc), q),
        ]))
        return acc if self.bias is None else acc + self.bias.to(acc.dtype)

    def _forward_tensor_parallel(self, x):
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        w = self.weight
        mesh = w.device_mesh
        placement = w.placements[-1]
        x_local = x.to_local() if isinstance(x, DTensor) else x
        w_local = w.to_local()
        # One seed per call whatever the sharding, so every layout draws the same sequence.
        seed = _draw_seeds(1, x_local.device)
        b_local = self.bias.to_local() if isinstance(self.bias, DTensor) else self.bias
        batch_offset = self.shard.dp_rank * _batch_extent(x_local.shape)
        if placement == Shard(0):
            # Column-wise: each rank owns whole output columns, so Q_out stays local; the noise
            # index places the columns at their global offset.
            _, offset = compute_local_shape_and_global_offset(w.shape, mesh, w.placements)
            index = ops.linear_index(x_local.shape, w_local.shape[0], batch_offset=batch_offset,
                                     col_offset=int(offset[0]), n_global=self.out_features)
            y, _ = self._linear(x_local, w_local, b_local, index, seed, quantize_output=True)
            return DTensor.from_local(y, mesh, [Shard(y.dim() - 1)], run_check=False)
        if placement == Shard(1):
            # Row-wise: each rank holds a partial sum over its K slice. Reduce the float32 partial
            # sums first (straight into the placement the output wants), then Q_out.
            unused_index = ops.linear_index(x_local.shape, w_local.shape[0])  # no noise here
            acc_local, obs = self._linear(x_local, w_local, None, unused_index, seed,
                                          quantize_output=False, record=False)
            out_placement = self.tp_output_placement or Replicate()
            acc = DTensor.from_local(acc_local, mesh, [Partial()], run_check=False)
            acc = acc.redistribute(mesh, [out_placement])
            acc_r = acc.to_local()
            _, offset = compute_local_shape_and_global_offset(acc.shape, mesh, [out_placement])
            seq_offset = int(offset[-2]) if acc_r.dim() >= 3 else 0
            index = ops.linear_index(acc_r.shape, acc_r.shape[-1], batch_offset=batch_offset,
                                     seq_offset=seq_offset, seq_global=int(acc.shape[-2])
                                     if acc_r.dim() >= 3 else None)
            c = self.config
            y, obs_out = ops.optical_quantize(
                acc_r, self.ranges()[2], seed, levels=c.linear_levels[2],
                stream=c.q_init_seed, noisy=c.q_noise, index=index, observe=self.training,
                clipped=c.q_grad == "clipped", quantiles=c.q_quantiles,
                photons=c.photons, contraction=self.in_features,
            )
            if self.training:
                # The accumulator row of `obs` saw partial sums: replace it with the reduced one.
                self.record(torch.cat([obs[:2], obs_out[None]]))
            y = DTensor.from_local(y, mesh, [out_placement], run_check=False)
            if self.bias is not None:
                # As a DTensor: with the output sharded along the sequence, each rank's bias
                # gradient is a partial sum that DTensor reduces (a local add would not).
                b = self.bias if isinstance(self.bias, DTensor) else \
                    DTensor.from_local(self.bias, mesh, [Replicate()], run_check=False)
                y = y + b.float()
            return y.to(x_local.dtype)
        raise NotImplementedError(
            f"OpticalLinear: weight placement {w.placements} is not supported; tensor parallel "
            "styles must shard the weight column-wise (Shard(0)) or row-wise (Shard(1))"
        )


class OpticalAttention(RangeState, nn.Module):
    """Drop-in for the inner scaled-dot-product attention call (semantics page, section 3)."""

    RANGE_NAMES = ("q", "k", "v", "s", "y")
    CLAMP_NAMES = clamp_stats.ATTENTION_CLAMP_NAMES
    CLAMP_KIND = "attention"

    def __init__(self, config: QuantizerConfig | None = None, device=None):
        super().__init__()
        self.config = config or QuantizerConfig()
        self.smooth = self.config.q_smooth_factor
        self.shard = ShardContext()
        self._init_range_buffers(device)

    def extra_repr(self) -> str:
        c = self.config
        return (f"levels={c.q_levels}, lut={c.lut}, grad={c.q_grad}"
                + (", bypass" if c.q_bypass else "") + ("" if c.q_noise else ", no noise"))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                scale: float | None = None, enable_gqa: bool = False,
                is_causal: bool = True, key_padding_mask: torch.Tensor | None = None,
                q_start: "int | torch.Tensor" = 0) -> torch.Tensor:
        """q [B, H, Lq, D], k/v [B, Hkv, Lk, D] (H % Hkv == 0, grouped-query attention).

        `key_padding_mask`: None or bool [B, Lk], True = key visible (Hugging Face's 2-D
        attention_mask `.bool()`). `q_start`: absolute position of query row 0, q_start + Lq <=
        Lk (a KV-cache step: q_start = Lk - Lq; a 0-d int64 device tensor for a static-cache
        step, forward only). Causal: row r sees visible keys j <= q_start + r.
        Rows with no visible key output 0. Semantics page, section 3; bad arguments raise
        ValueError."""
        q, k, v = _autocast(q, k, v)
        b, h, lq, d = q.shape
        ops.ref.check_attention_args(q, k, key_padding_mask, q_start, is_causal)
        scale = d ** -0.5 if scale is None else scale
        c = self.config
        whole = lq == k.shape[2] and isinstance(q_start, int) and q_start == 0
        if self.training and self.collect_clamp_stats and whole:
            # the clamp statistics sample whole-sequence causal attention (padding ignored)
            self.record_clamp(clamp_stats.attention_clamp_fractions(
                q, k, v, self.ranges(), levels=c.attention_levels, lut=c.lut, scale=scale,
                causal=is_causal))
        if c.q_bypass or not self.optical_enabled:
            y = _sdpa(q, k, v, scale, is_causal, key_padding_mask, q_start)
            if self.training:
                observed = torch.stack([ops.ref.observe_range(q), ops.ref.observe_range(k),
                                        ops.ref.observe_range(v)])
                self.record(torch.cat([observed, ops.ref.unset_observations(2, q.device)]))
            return y
        sh = self.shard
        index = [sh.dp_rank * b, sh.dp_size * b, sh.tp_rank * h, sh.tp_size * h]
        y, obs = ops.optical_attention(
            q, k, v, self.ranges(), _draw_seeds(2, q.device), levels=c.q_levels,
            lut=c.lut, stream=c.q_init_seed, scale=scale, causal=is_causal, index=index,
            observe=self.training, clipped=c.q_grad == "clipped", noise=c.q_noise,
            key_padding_mask=key_padding_mask, q_start=q_start,
            qlevels=c.attention_levels, photons=c.photons,
        )
        if self.training:
            self.record(obs)
        return y


def _sdpa(q, k, v, scale, is_causal, key_padding_mask, q_start):
    """The electronic attention of the bypass, with the same mask semantics (rows with no visible
    key output 0, where SDPA would give NaN)."""
    gqa = k.shape[1] != q.shape[1]
    if key_padding_mask is None and isinstance(q_start, int) and q_start == 0 \
            and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=is_causal,
                                              enable_gqa=gqa)
    vis = ops.ref.attention_visibility(q.shape[0], q.shape[2], k.shape[2], causal=is_causal,
                                       q_start=q_start, key_padding_mask=key_padding_mask,
                                       device=q.device)
    if vis is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=vis, scale=scale, enable_gqa=gqa)
    return torch.where(vis.any(-1, keepdim=True), y, 0.0).to(q.dtype)
