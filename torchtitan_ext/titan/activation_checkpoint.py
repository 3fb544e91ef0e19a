"""Per-op selective activation checkpointing of optical Llama blocks, alike to the digital twin's.

torchtitan's op SAC (`--activation_checkpoint.selective_ac_option op`) saves the outputs of the
ops in its Llama `_op_sac_save_list` (SDPA, ...) and of every second `aten.mm`, and recomputes
the rest. The optical ops take those ops' places, so without help an optical block would save
no attention output and recompute all its linears, where its twin saves SDPA and half its mms.
`optical_op_sac` makes the two policies match:
- the optical attention op is saved as SDPA is;
- an optical linear counts as the matmul it replaces: one alternation runs over `aten.mm` and
  `optical.linear` together, and the odd-numbered calls of a block's forward are saved;
- `per_op_sac_force_recompute_mm_shapes_by_fqns` applies to optical linears too (by their
  global or, under tensor parallelism, local weight shape);
- a device-to-host copy is saved (torchtitan's rule for offloaded tensors).
On clamp-statistics steps (`optical.stats_every`) the statistics' own `aten.mm`s join the
alternation, so those steps save other matmuls than the rest (same results, other speed).

torchtitan 0.2.2 has no hook for the policy: `optical_op_sac` swaps its private `_apply_op_sac`
while `parallelize_llama` wraps the blocks, and puts it back after. This module is the only
place that does so; a port to a torchtitan with policy registries replaces it.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterator

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from torchtitan_ext.optical import ops as _ops  # noqa: F401  (registers torch.ops.optical)

__all__ = ["optical_op_sac", "op_sac_policy", "forced_recompute_shapes"]

_TO_COPY = torch.ops.aten._to_copy.default
_MATMULS = (torch.ops.aten.mm.default, torch.ops.optical.linear.default)


def _rhs_shape(func, args) -> tuple[int, int]:
    """(in_features, out_features) of a matmul call: mm(x, W^T) or optical.linear(x, W, ...)."""
    if func is torch.ops.aten.mm.default:
        return tuple(args[1].shape)
    out_f, in_f = args[1].shape
    return (in_f, out_f)


def forced_recompute_shapes(block: nn.Module, fqn_filters: list[str],
                            base_fqn: str | None) -> set[tuple[int, int]]:
    """(in, out) shapes of the block's linears named by `fqn_filters`; their matmuls are always
    recomputed and stay out of the alternation. A tensor-parallel weight gives its global and
    its local shape (the optical op sees the local shard). A filter naming a non-linear module
    is an error, as in torchtitan."""
    shapes = set()
    for name, sub in block.named_modules():
        fqn = f"{base_fqn}.{name}" if base_fqn is not None else name
        if not any(f in fqn for f in fqn_filters):
            continue
        if not isinstance(sub, nn.Linear):  # OpticalLinear is an nn.Linear
            raise ValueError(
                "activation_checkpoint.per_op_sac_force_recompute_mm_shapes_by_fqns: expected "
                f"names of linear layers, but {fqn!r} is a {type(sub).__name__}")
        local = sub.weight.to_local() if isinstance(sub.weight, DTensor) else sub.weight
        for out_f, in_f in (sub.weight.shape, local.shape):
            shapes.add((in_f, out_f))
    return shapes


def op_sac_policy(save_ops: set, recompute_shapes: set[tuple[int, int]]):
    """A fresh policy for one checkpointed call of a block: save `save_ops` and every second
    matmul (`aten.mm` or `optical.linear`, counted together per forward and per recompute),
    recompute the rest."""
    matmul_count: dict[str, int] = defaultdict(int)

    def policy(ctx, func, *args, **kwargs):
        if (func is _TO_COPY and args[0].device.type != "cpu"
                and str(kwargs.get("device", "")) == "cpu"):
            return CheckpointPolicy.MUST_SAVE
        if func in _MATMULS:
            if _rhs_shape(func, args) in recompute_shapes:
                return CheckpointPolicy.PREFER_RECOMPUTE
            # older torch calls the policy in the recompute too; newer replays the forward's
            key = "recompute" if ctx.is_recompute else "forward"
            matmul_count[key] += 1
            save = matmul_count[key] % 2 == 1
        else:
            save = func in save_ops
        return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _apply_optical_op_sac(module: nn.Module, ac_config, *, base_fqn: str | None = None,
                          op_sac_save_list: set) -> nn.Module:
    """torchtitan's `_apply_op_sac` (same signature) for optical blocks: `module` wrapped for
    per-op SAC that saves `op_sac_save_list`, the optical attention and every second matmul
    (`aten.mm` or `optical.linear`, whether or not the list names `aten.mm`), and recomputes
    the rest. Each checkpointed call gets a fresh policy, hence a fresh alternation."""
    save_ops = set(op_sac_save_list) | {torch.ops.optical.attention.default}
    recompute_shapes = forced_recompute_shapes(
        module, list(ac_config.per_op_sac_force_recompute_mm_shapes_by_fqns), base_fqn)
    return checkpoint_wrapper(
        module,
        context_fn=lambda: create_selective_checkpoint_contexts(
            op_sac_policy(save_ops, recompute_shapes)),
        preserve_rng_state=ac_config.preserve_rng_state,
        determinism_check=ac_config.determinism_check,
        early_stop=ac_config.early_stop,
        debug=ac_config.debug,
    )


@contextlib.contextmanager
def optical_op_sac() -> Iterator[None]:
    """Within the block, torchtitan's per-op SAC wraps blocks with the optical policy above."""
    from torchtitan.distributed import activation_checkpoint as titan_ac

    original = titan_ac._apply_op_sac
    titan_ac._apply_op_sac = _apply_optical_op_sac
    try:
        yield
    finally:
        titan_ac._apply_op_sac = original
