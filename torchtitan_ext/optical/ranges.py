"""Range buffers: what each optical module observed, reduced across ranks, folded in by EMA.

Every optical module carries two float32 [n, 2] buffers, one row (lo, hi) per quantizer:
- `optical_ranges` (persistent, in the state_dict): the ranges the forward quantizes with;
- `optical_observed` (not persistent): the running min/max of what the forwards since the last
  update observed (all micro-batches of a step; recomputation re-observes the same values, which
  min/max absorbs).

When ranges take effect (semantics page, section 4): after the optimizer step. `update_ranges`
gathers the observations of every module into one packed tensor, reduces it with ONE all-reduce
(MIN over (lo, -hi)) across all ranks, then folds it into the buffers by EMA on every rank alike.
So every rank holds identical ranges, the forward never waits on a collective, and nothing is read
on the host.
"""

from __future__ import annotations

import itertools
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .reference import ema_update, unset_observations

__all__ = [
    "RangeState",
    "optical_modules",
    "reset_ranges",
    "update_ranges",
    "merge_observed",
    "assert_ranges_synced",
    "set_optical_enabled",
    "set_clamp_stats",
    "range_statistics",
]


def local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor behind a buffer: tensor-parallel styles replicate a module's buffers as
    DTensors, but ranges are identical on every rank anyway, so all bookkeeping is local."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class RangeState:
    """Mixin for optical modules: owns the two range buffers and the EMA factor.

    List it before the nn.Module base (`class OpticalLinear(RangeState, nn.Linear)`) so its
    `_apply` takes part in the module's dtype and device moves."""

    RANGE_NAMES: tuple[str, ...] = ()
    # Names of the clamp statistics the module reports (see `stats.py`), and the kind of module
    # they are averaged with in `range_statistics` ("linear" or "attention").
    CLAMP_NAMES: tuple[str, ...] = ()
    CLAMP_KIND: str = ""
    smooth: float
    # False: compute digitally while still observing ranges (a recipe's digital warm-up). A
    # plain attribute, switched between steps by the trainer (see `set_optical_enabled`).
    optical_enabled: bool = True
    # True on the steps a trainer wants clamp statistics for (switched between steps, like
    # `optical_enabled`); the forward then adds them to the `optical_clamped` buffer.
    collect_clamp_stats: bool = False

    def _init_range_buffers(self, device=None) -> None:
        n = len(self.RANGE_NAMES)
        self.register_buffer("optical_ranges", unset_observations(n, device), persistent=True)
        self.register_buffer("optical_observed", unset_observations(n, device), persistent=False)
        # (sum of fractions, number of forwards) per clamp statistic, since the last read.
        self.register_buffer("optical_clamped",
                             torch.zeros(len(self.CLAMP_NAMES), 2, dtype=torch.float32,
                                         device=device), persistent=False)

    def _apply(self, fn, recurse=True):
        # Ranges are float32 by contract. A dtype cast of the whole module (module.to(bf16),
        # .half()) would round them to the cast's precision; keep the float32 values, moved.
        saved = {n: self._buffers[n] for n in ("optical_ranges", "optical_observed", "optical_clamped")
                 if self._buffers.get(n) is not None}
        out = super()._apply(fn, recurse)
        for name, orig in saved.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:
                self._buffers[name] = orig.to(device=new.device)
        return out

    def reset_ranges(self) -> None:
        """Back to uninitialised (values pass through until the first update)."""
        n = len(self.RANGE_NAMES)
        with torch.no_grad():
            for buf in (local(self.optical_ranges), local(self.optical_observed)):
                buf.copy_(unset_observations(n, buf.device))
            # Models built on the meta device get this buffer as uninitialised memory.
            local(self.optical_clamped).zero_()

    def ranges(self) -> torch.Tensor:
        """The [n, 2] float32 ranges the forward quantizes with (a plain local tensor; a copy
        only if something cast the module's buffers to another dtype, e.g. `module.to(bf16)`)."""
        return local(self.optical_ranges).float()

    def record(self, obs: torch.Tensor) -> None:
        """Merge one forward's observations (float32 [n, 2]) into the pending ones."""
        observed = local(self.optical_observed)
        with torch.no_grad():
            observed.copy_(merge_observed(observed, obs))

    def record_clamp(self, fractions: torch.Tensor, measured: int | None = None) -> None:
        """Add one forward's clamp fractions (float32 [len(CLAMP_NAMES)]); with `measured`, only
        the first `measured` statistics count (the others this forward could not measure, e.g.
        a row-wise shard's output, which holds partial sums): no zeros that would pass for 0%."""
        acc = local(self.optical_clamped)
        with torch.no_grad():
            counts = torch.ones_like(fractions)
            if measured is not None:
                counts[measured:] = 0
            acc.add_(torch.stack([fractions.to(acc.device), counts.to(acc.device)], -1))

    def take_clamp_stats(self) -> dict[str, float]:
        """Mean fraction per statistic since the last call (forwards that collected), then reset
        (one device-to-host read)."""
        buf = local(self.optical_clamped)
        acc = buf.to("cpu", copy=True)  # a copy also when buf already lives on the CPU
        buf.zero_()
        return {name: float(acc[i, 0] / acc[i, 1]) for i, name in enumerate(self.CLAMP_NAMES)
                if acc[i, 1] > 0}

    def range_dict(self) -> dict[str, torch.Tensor]:
        return {name: self.ranges()[i] for i, name in enumerate(self.RANGE_NAMES)}


def merge_observed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.minimum(a[..., 0], b[..., 0]), torch.maximum(a[..., 1], b[..., 1])], -1)


def optical_modules(model_parts: nn.Module | Iterable[nn.Module]) -> list[RangeState]:
    """Every optical module under `model_parts`, each once (parts may overlap: a module folded
    twice by `update_ranges` would take two EMA steps and write its rows twice)."""
    parts = [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)
    found = (m for part in parts for m in part.modules() if isinstance(m, RangeState))
    return list(dict.fromkeys(found))


def set_optical_enabled(model_parts: nn.Module | Iterable[nn.Module], enabled: bool) -> int:
    """Switch every optical module between optical and digital (ranges keep being observed)."""
    mods = optical_modules(model_parts)
    for m in mods:
        m.optical_enabled = enabled
    return len(mods)


def set_clamp_stats(model_parts: nn.Module | Iterable[nn.Module], enabled: bool) -> None:
    """Make every optical module's training forwards measure clamp fractions (or stop)."""
    for m in optical_modules(model_parts):
        m.collect_clamp_stats = enabled


@torch.no_grad()
def range_statistics(model_parts: nn.Module | Iterable[nn.Module]) -> dict[str, float]:
    """Per-module ranges and the clamp fractions its forwards measured since the last call
    (while `set_clamp_stats` was on), with their means over modules of a kind.

    Keys look like `optical/<module>/<quantizer>_lo`, `optical/<module>/<name>_clamp_frac` and
    `optical_clamp/<linear|attention>_<name>`; meant for TensorBoard every N steps (it reads
    values on the host).
    """
    parts = [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)
    out: dict[str, float] = {}
    means: dict[str, list[float]] = {}
    for part in parts:
        for name, m in part.named_modules():
            if not isinstance(m, RangeState):
                continue
            # Wrapper names (activation checkpointing, compile) are not part of the layer's name.
            name = name.replace("._checkpoint_wrapped_module", "").replace("._orig_mod", "")
            name = name or type(m).__name__
            r = m.ranges().cpu()
            for i, q in enumerate(m.RANGE_NAMES):
                if r[i, 0] <= r[i, 1]:
                    out[f"optical/{name}/{q}_lo"] = float(r[i, 0])
                    out[f"optical/{name}/{q}_hi"] = float(r[i, 1])
            for q, frac in m.take_clamp_stats().items():
                out[f"optical/{name}/{q}_clamp_frac"] = frac
                means.setdefault(f"optical_clamp/{m.CLAMP_KIND}_{q}", []).append(frac)
    for key, values in means.items():
        out[key] = sum(values) / len(values)
    return out


def reset_ranges(model_parts: nn.Module | Iterable[nn.Module]) -> None:
    for m in optical_modules(model_parts):
        m.reset_ranges()


@torch.no_grad()
def update_ranges(
    model_parts: nn.Module | Iterable[nn.Module],
    group: dist.ProcessGroup | None = None,
    reduce: bool = True,
) -> int:
    """Reduce every module's pending observations across ranks and fold them in by EMA.

    Returns the number of modules updated. Call it on every rank after each optimizer step.
    `reduce=False` keeps each rank's own observations (ranks then drift apart: experiments only).
    """
    mods = optical_modules(model_parts)
    if not mods:
        return 0
    pending = [local(m.optical_observed) for m in mods]
    observed = torch.cat(pending)
    if reduce and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        # One MIN reduction serves both ends: min of minima, and min of negated maxima.
        packed = torch.stack([observed[:, 0], -observed[:, 1]], -1).contiguous()
        dist.all_reduce(packed, op=dist.ReduceOp.MIN, group=group)
        observed = torch.stack([packed[:, 0], -packed[:, 1]], -1)
    # The EMA runs on the packed rows, a few launches per smooth factor, not a few per module:
    # per-module updates cost the 1.1B ~3000 tiny launches a step, and the GPU waited on the host
    # issuing them (bench/results/README.md, stop 26).
    groups: dict[float, list[int]] = {}
    for i, m in enumerate(mods):
        groups.setdefault(float(m.smooth), []).append(i)
    sizes = [p.shape[0] for p in pending]
    starts = [0, *itertools.accumulate(sizes)]
    for smooth, members in groups.items():
        targets = [local(mods[i].optical_ranges) for i in members]
        obs = observed
        if len(groups) > 1:  # this factor's rows of the packed observations
            obs = torch.cat([observed[starts[i]:starts[i + 1]] for i in members])
        new = ema_update(torch.cat(targets).float(), obs, smooth)
        torch._foreach_copy_(targets, list(new.split([sizes[i] for i in members])))
    torch._foreach_copy_(pending, list(unset_observations(sum(sizes), observed.device).split(sizes)))
    return len(mods)


@torch.no_grad()
def assert_ranges_synced(model_parts: nn.Module | Iterable[nn.Module],
                         group: dist.ProcessGroup | None = None) -> None:
    """Raise if any rank's range buffers differ from another's (a debugging aid: it syncs)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    parts = [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)
    names = [n for part in parts for n, m in part.named_modules() if isinstance(m, RangeState)]
    mods = optical_modules(parts)
    if not mods:
        return
    # +-inf (unset ranges) compare equal to themselves; map them to finite sentinels so the
    # MIN/MAX reductions below cannot produce nan.
    packed = torch.nan_to_num(torch.cat([m.ranges() for m in mods]), posinf=3e38, neginf=-3e38)
    lo, hi = packed.clone(), packed.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    differs = (lo != hi).any(-1).cpu()
    if bool(differs.any()):
        rows = torch.cat([torch.full((m.ranges().shape[0],), i) for i, m in enumerate(mods)])
        first = names[int(rows[differs.nonzero()[0, 0]])]
        raise RuntimeError(
            f"optical ranges differ across ranks (first in {first}); every rank must quantize "
            "with identical ranges"
        )
