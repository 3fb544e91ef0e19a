"""Per-op selective activation checkpointing of optical Llama blocks, alike to the digital twin's.

torchtitan's op SAC (`--activation_checkpoint.selective_ac_option op`) saves the outputs of the
ops in its Llama `_op_sac_save_list` (SDPA, ...) and of every second `aten.mm`, and recomputes
the rest. The optical ops take those ops' places, so without help an optical block would save
no attention output and recompute all its linears, where its twin saves SDPA and half its mms.
`_apply_optical_op_sac` makes the two policies match:
- the optical attention op is saved as SDPA is;
- an optical linear counts as the matmul it replaces: one alternation runs over `aten.mm` and
  `optical.linear` together, and the odd-numbered calls of a block's forward are saved;
- `per_op_sac_force_recompute_mm_shapes_by_fqns` applies to optical linears too (by their
  global or, under tensor parallelism, local weight shape);
- a device-to-host copy is saved (torchtitan's rule for offloaded tensors).
On clamp-statistics steps (`optical.stats_every`) the statistics' own `aten.mm`s join the
alternation, so those steps save other matmuls than the rest (same results, other speed).

`optical.ac_save_attention` (for both twins) keeps the attention of blocks that full or
every-N-th-layer AC checkpoints: those blocks save the attention op's outputs (the optical
attention, or SDPA's cuDNN / flash / efficient op in the twin) and recompute the rest. The
optical attention's forward costs 5.7x cuDNN's (bench/results/README.md, stop 23), so
recomputing it is what a checkpointed optical block pays most for; the cost is one attention
output (and its log-sum-exp) per checkpointed block. Without checkpointing, or under per-op
SAC (which saves the attention already), the option would have nothing to do: run.py refuses
it there (`check_ac_save_attention`).

torchtitan 0.2.2 has no hook for the policies: `optical_ac` swaps its private `_apply_op_sac`
(and, to save the attention, `_apply_layer_sac` and `_apply_full_ac`) while
`parallelize_llama` wraps the blocks, and puts them back after. This module is the only place
that does so; a port to a torchtitan with policy registries replaces it.
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

__all__ = ["optical_ac", "op_sac_policy", "forced_recompute_shapes", "ATTENTION_OPS",
           "check_ac_save_attention"]

_TO_COPY = torch.ops.aten._to_copy.default
_MATMULS = (torch.ops.aten.mm.default, torch.ops.optical.linear.default)
_SDPA_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_fused_attention_overrideable")
# The SDPA backends the twin's attention dispatches to as one op, and the optical attention.
# SDPA's math fallback is composite (it reaches a policy as its elementwise ops and matmuls), so
# a twin on that backend (e.g. float32 on a GPU) recomputes its attention as before.
ATTENTION_OPS = frozenset(
    [getattr(torch.ops.aten, name).default for name in _SDPA_OPS if hasattr(torch.ops.aten, name)]
    + [torch.ops.optical.attention.default])


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
    return _selective_checkpoint(module, ac_config,
                                 lambda: op_sac_policy(save_ops, recompute_shapes))


def _selective_checkpoint(module: nn.Module, ac_config, make_policy) -> nn.Module:
    """`module` checkpointed with torchtitan's AC settings, under the policy `make_policy()`
    returns for each checkpointed call."""
    return checkpoint_wrapper(
        module,
        context_fn=lambda: create_selective_checkpoint_contexts(make_policy()),
        preserve_rng_state=ac_config.preserve_rng_state,
        determinism_check=ac_config.determinism_check,
        early_stop=ac_config.early_stop,
        debug=ac_config.debug,
    )


def _save_attention_policy(ctx, func, *args, **kwargs):
    save = func in ATTENTION_OPS
    return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE


def _saving_attention(apply_ac):
    """torchtitan's `apply_ac(module, ac_config)` (full, or every N-th layer), with each block it
    checkpoints checkpointed as it does except that the attention ops' outputs are saved;
    torchtitan still decides which blocks (its layer counter runs as before; the wrapper it
    returns is dropped)."""

    def apply(module: nn.Module, ac_config) -> nn.Module:
        if apply_ac(module, ac_config) is module:
            return module
        return _selective_checkpoint(module, ac_config, lambda: _save_attention_policy)

    return apply


def check_ac_save_attention(job_config) -> None:
    """`optical.ac_save_attention` applies to the blocks that full or layer-selective AC
    checkpoints in the optical spec. Anywhere else it would be silently ignored: without
    checkpointing (mode "none") nothing is recomputed, per-op SAC saves the attention already,
    memory-budget AC leaves the choice to the compiler, another model's parallelize function
    does not wrap the blocks. Raise naming the keys and the allowed combinations."""
    from torchtitan_ext.optical.config import OpticalConfigError

    from .job_config import optical_flag
    from .spec import SPEC_NAME

    if not optical_flag(job_config.optical, "ac_save_attention"):
        return
    if job_config.model.name != SPEC_NAME:
        raise OpticalConfigError(
            f"optical.ac_save_attention: applies to model.name {SPEC_NAME!r} (its parallelize "
            f"function wraps the blocks); got {job_config.model.name!r}; allowed: false")
    ac = job_config.activation_checkpoint
    option = str(ac.selective_ac_option)
    if ac.mode == "full" or (ac.mode == "selective" and option.isdigit()):
        return
    why = {"none": "nothing is recomputed",
           "memory_budget": "the compiler chooses what to save"}.get(ac.mode, "no blocks")
    got = f"activation_checkpoint.mode = {ac.mode!r}"
    if ac.mode == "selective":
        got += f", selective_ac_option = {option!r}"
        why = "per-op SAC saves the attention already" if option == "op" else why
    raise OpticalConfigError(
        "optical.ac_save_attention: saves the attention of the blocks that activation "
        f"checkpointing recomputes; with {got} it would be ignored ({why}); allowed: false, "
        "or activation_checkpoint.mode 'full', or 'selective' with selective_ac_option a "
        "layer frequency (e.g. '2')")


@contextlib.contextmanager
def optical_ac(save_attention: bool = False) -> Iterator[None]:
    """Within the block, torchtitan's per-op SAC wraps blocks with the optical policy above, and
    with `save_attention` its full and layer AC save the attention outputs."""
    from torchtitan.distributed import activation_checkpoint as titan_ac

    swaps = {"_apply_op_sac": _apply_optical_op_sac}
    if save_attention:
        swaps["_apply_full_ac"] = _saving_attention(titan_ac._apply_full_ac)
        swaps["_apply_layer_sac"] = _saving_attention(titan_ac._apply_layer_sac)
    originals = {name: getattr(titan_ac, name) for name in swaps}
    try:
        for name, fn in swaps.items():
            setattr(titan_ac, name, fn)
        yield
    finally:
        for name, fn in originals.items():
            setattr(titan_ac, name, fn)


def check_memory_budget(job_config) -> None:
    """Memory-budget AC leaves what to save to the compiler, so torchtitan asserts (bare, after
    start-up) that the model is compiled: refuse it here, naming the keys."""
    from torchtitan_ext.optical.config import OpticalConfigError

    compiled = job_config.compile.enable and "model" in job_config.compile.components
    if job_config.activation_checkpoint.mode == "memory_budget" and not compiled:
        raise OpticalConfigError(
            "activation_checkpoint.mode: 'memory_budget' needs the model compiled (the "
            "compiler chooses what to save); got compile.enable = "
            f"{job_config.compile.enable}, compile.components = "
            f"{list(job_config.compile.components)}; allowed: --compile.enable with 'model' in "
            "compile.components, or another activation_checkpoint.mode")
