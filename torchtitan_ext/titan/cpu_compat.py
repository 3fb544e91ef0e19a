"""Make stock torchtitan 0.2.2 train on a machine without an accelerator.

torchtitan assumes a GPU-like device everywhere.  On a CPU-only host with
torch 2.13 it breaks in these places (line numbers refer to torchtitan 0.2.2):

1. ``tools/utils.py:37`` -- ``get_device_info()`` falls back to ``"cuda"``
   when no accelerator exists, and line 42 freezes the result into the
   module globals ``device_type`` / ``device_module``.  Those values are
   imported *by value* into ``components/metrics.py``,
   ``distributed/utils.py``, ``distributed/parallel_dims.py``,
   ``tools/profiling.py`` (and ``distributed/dual_pipe_v.py``), and read as
   ``utils.device_type`` in ``train.py:86`` / ``components/validate.py:171``.
   The first failure is ``train.py:90`` ``torch.cuda.set_device`` ->
   ``AttributeError: torch._C has no attribute _cuda_setDevice``; after that
   the process group would be created with NCCL (``distributed/utils.py:328``)
   and the device mesh on "cuda" (``parallel_dims.py:141``).
2. ``components/metrics.py:42-95`` (``DeviceMemoryMonitor``) calls
   ``get_device_name``, ``current_device``, ``get_device_properties(..)
   .total_memory``, ``memory_stats``, ``reset_peak_memory_stats`` and
   ``empty_cache`` on ``device_module``; ``torch.cpu`` has none of the
   memory APIs.
3. ``distributed/utils.py:386-387`` (``set_pg_timeouts``, run after step 1)
   calls ``barrier(device_ids=[device_module.current_device()])`` and
   ``device_module.synchronize()``.  Measured on torch 2.13 + gloo:
   ``barrier(device_ids=[0])`` is accepted, but with ``torch.cpu`` as the
   device module ``current_device()`` is the string ``"cpu"`` and the barrier
   raises ``TypeError`` (BarrierOptions wants ints).  The replacement drops
   the device ids so it does not depend on what ``current_device`` returns
   or on gloo's handling of device ids.
4. FSDP2 on gloo: torchtitan's ``apply_fsdp`` ends with
   ``disable_fsdp_gradient_division`` (``models/llama3/infra/parallelize.py:
   284``: ``set_gradient_divide_factor(1.0)``).  A custom factor that differs
   from the shard-group size makes torch's
   ``fsdp/_fully_shard/_fsdp_collectives.py::_get_gradient_divide_factors``
   pick ``ReduceOp.PREMUL_SUM(1 / factor)`` for the reduce-scatter, and the
   backward fails in ``foreach_reduce`` with ``RuntimeError: Cannot use
   ReduceOp.PREMUL_SUM with Gloo`` (gloo in torch 2.13 does support SUM and
   AVG).  The public ``FSDPModule.set_force_sum_reduction_for_comms(True)``
   makes FSDP reduce with plain ``ReduceOp.SUM`` and apply the factor as a
   local divide (skipped for 1.0): the same gradients.  ``Trainer.__init__``
   has no hook after ``parallelize_fn``, so the parallelize function calls
   :func:`make_fsdp_gloo_compatible` at its end (``titan/spec.py``'s
   ``parallelize_optical_llama`` does, on hosts without an accelerator).
5. ``tools/profiling.py:67-78`` builds ``activities=[CPU, None]`` when
   neither CUDA nor XPU exists; torch 2.13's profiler rejects the ``None``
   (``TypeError: Expected ProfilerActivity or dict, got NoneType``), so
   ``profiling.enable_profiling`` crashes.  ``maybe_enable_profiling`` is
   replaced by a CPU-only equivalent in ``tools/profiling`` and in the
   modules that imported it by value (``train.py:34-37``).

Fixes 1-3 and 5 are in :func:`apply_cpu_compat`; it must run *before*
``torchtitan.train.Trainer`` is constructed (importing torchtitan first is
fine -- stale module globals are rebound).  ``titan/launch.py``'s ``main``
(what ``run.py`` runs) calls it first; fix 4 is in the optical spec's
parallelize function (its digital twins included).

Things this module deliberately leaves to the job config:
``training.mixed_precision_param`` -- for single-device/DDP runs torchtitan
wraps the forward in ``torch.autocast("cpu", dtype)`` (distributed/utils.py:
243-263; TP/PP without FSDP get no autocast); "bfloat16" (the default) runs
bf16 CPU autocast, "float32" makes torch warn "CPU Autocast only supports
bfloat16/float16 ... Disabling autocast" and run plain fp32.  With FSDP it is
the all-gathered parameter dtype.  Both work on CPU; "float32" is the
predictable choice.
``compile.enable`` works if a C++ compiler is installed (inductor's CPU
backend), but RoPE's complex ops fall back to eager.
``training.dataloader.pin_memory = true`` is ignored with a warning ("no
accelerator is found"); leave it false.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
from datetime import timedelta
from types import ModuleType, SimpleNamespace
from typing import Any, Iterator

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

__all__ = [
    "CpuDeviceModule",
    "apply_cpu_compat",
    "has_accelerator",
    "make_fsdp_gloo_compatible",
]

# Modules that copy ``device_type`` / ``device_module`` out of
# ``torchtitan.tools.utils`` at import time (fix 1).  They are imported here so
# they can be rebound; any other loaded torchtitan module holding the stale
# values is found by the sweep in ``_rebind_device_globals``.
_DEVICE_GLOBAL_IMPORTERS = (
    "torchtitan.components.metrics",
    "torchtitan.distributed.utils",
    "torchtitan.distributed.parallel_dims",
    "torchtitan.tools.profiling",
)

_applied = False


def has_accelerator() -> bool:
    """True when torch (or torchtitan's own probe) sees a non-CPU device."""
    from torch._utils import _get_available_device_type

    # ``_get_available_device_type`` is exactly what torchtitan's
    # get_device_info() consults; ``torch.accelerator`` covers newer backends.
    return torch.accelerator.is_available() or (
        _get_available_device_type() is not None
    )


# --------------------------------------------------------------------------
# Fix 2: a device module that answers torchtitan's calls for the CPU.
# --------------------------------------------------------------------------


def _read_vm_hwm_bytes() -> int | None:
    """Peak resident set size of this process (Linux ``VmHWM``), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # value is in kB
    except OSError:
        pass
    return None


def _peak_rss_bytes() -> int:
    hwm = _read_vm_hwm_bytes()
    if hwm is not None:
        return hwm
    # Non-Linux fallback: ru_maxrss is kB on Linux, bytes on macOS, and can
    # not be reset.
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        # Never 0: DeviceMemoryMonitor._to_pct divides by the capacity.
        return 1


class _CpuMemoryNamespace:
    """``device_module.memory`` as used by ``tools/profiling.py:108,135``.

    CPU has no caching allocator to record, so memory snapshots are empty
    (``profiling.enable_memory_snapshot`` produces empty pickles on CPU).
    """

    @staticmethod
    def _record_memory_history(*args: Any, **kwargs: Any) -> None:
        return None

    @staticmethod
    def _snapshot(*args: Any, **kwargs: Any) -> dict[str, list]:
        return {"segments": [], "device_traces": []}


class CpuDeviceModule:
    """Stand-in for ``torch.cuda`` covering what torchtitan calls on it.

    Memory numbers are process-wide peak RSS, which includes Python and
    library overhead, so they are an upper bound on tensor memory.  Peak
    reset uses Linux's ``/proc/self/clear_refs`` ("5" resets VmHWM); where
    that is unavailable the peak is simply never reset.
    """

    memory = _CpuMemoryNamespace()

    # -- device selection / sync: the CPU is one implicit device ----------
    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def set_device(device: Any) -> None:  # train.py:90
        return None

    @staticmethod
    def current_device() -> int:  # metrics.py:46, distributed/utils.py:386
        return 0

    @staticmethod
    def synchronize(device: Any = None) -> None:  # distributed/utils.py:387
        return None

    @staticmethod
    def empty_cache() -> None:  # metrics.py:53
        return None

    # -- what DeviceMemoryMonitor reads (metrics.py:45-95) ------------------
    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return platform.processor() or platform.machine() or "CPU"

    @classmethod
    def get_device_properties(cls, device: Any = None) -> SimpleNamespace:
        return SimpleNamespace(
            name=cls.get_device_name(device),
            total_memory=_physical_memory_bytes(),
        )

    @staticmethod
    def memory_stats(device: Any = None) -> dict[str, int]:
        peak = _peak_rss_bytes()
        return {
            "active_bytes.all.peak": peak,
            "reserved_bytes.all.peak": peak,
            "num_alloc_retries": 0,
            "num_ooms": 0,
        }

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def __repr__(self) -> str:
        return "<torchtitan_ext CpuDeviceModule>"


# --------------------------------------------------------------------------
# Fix 3: gloo-safe set_pg_timeouts.
# --------------------------------------------------------------------------


def _set_pg_timeouts_gloo(timeout: timedelta, parallel_dims: Any) -> None:
    """``torchtitan.distributed.utils.set_pg_timeouts`` without device ids.

    Same semantics as the original (distributed/utils.py:367-395): barrier so
    no rank starts using the shorter timeout while another is still in the
    slow first step, then set the timeout on every 1-D mesh group and on the
    default group.  Only the barrier differs: gloo raises on
    ``barrier(device_ids=...)``, and there is no device to synchronize.
    """
    logger.info("Synchronizing and adjusting timeout for all ProcessGroups to %s", timeout)
    torch.distributed.barrier()
    groups: list[torch.distributed.ProcessGroup | None] = [
        mesh.get_group()
        for mesh in parallel_dims.get_all_one_dimensional_meshes().values()
    ] + [None]
    for group in groups:
        torch.distributed.distributed_c10d._set_pg_timeout(timeout, group)


# --------------------------------------------------------------------------
# Fix 5: CPU-only torch profiler.
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _maybe_enable_profiling_cpu(
    profiling_config: Any,
    *,
    global_step: int = 0,
    base_folder: str = "",
    leaf_folder: str = "",
) -> Iterator[Any]:
    """Drop-in for ``torchtitan.tools.profiling.maybe_enable_profiling``.

    Same config fields, schedule and trace layout
    (``<dump>/<save_traces_folder>/iteration_<N>/<leaf>/rank<R>_trace.json``)
    but only ``ProfilerActivity.CPU``, which is all there is on this host.
    """
    if not profiling_config.enable_profiling:
        yield None
        return

    trace_dir = os.path.join(base_folder, profiling_config.save_traces_folder)
    warmup = profiling_config.profiler_warmup
    active = profiling_config.profiler_active
    wait = profiling_config.profile_freq - (warmup + active)
    if wait < 0:
        raise ValueError("profile_freq must be >= profiler_warmup + profiler_active")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    def on_trace_ready(prof: torch.profiler.profile) -> None:
        out_dir = os.path.join(trace_dir, f"iteration_{prof.step_num}", leaf_folder)
        os.makedirs(out_dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(out_dir, f"rank{rank}_trace.json"))

    os.makedirs(trace_dir, exist_ok=True)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU],
        schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active),
        on_trace_ready=on_trace_ready,
        record_shapes=True,
    ) as prof:
        prof.step_num = global_step  # resume numbering like torchtitan does
        yield prof


# --------------------------------------------------------------------------
# apply_cpu_compat: fixes 1-3 and 5.
# --------------------------------------------------------------------------


def _loaded_torchtitan_modules() -> list[ModuleType]:
    return [
        mod
        for name, mod in list(sys.modules.items())
        if mod is not None and (name == "torchtitan" or name.startswith("torchtitan."))
    ]


def _rebind_device_globals(device_module: CpuDeviceModule) -> list[str]:
    """Point every torchtitan copy of device_type/device_module at the CPU."""
    import importlib

    import torchtitan.tools.utils as tt_utils

    stale_type, stale_module = tt_utils.device_type, tt_utils.device_module

    # Source of truth first, so modules imported *later* copy the CPU values,
    # and get_device_info() for late callers (dual_pipe_v.py:187).
    tt_utils.device_type = "cpu"
    tt_utils.device_module = device_module
    tt_utils.get_device_info = lambda: ("cpu", device_module)

    for name in _DEVICE_GLOBAL_IMPORTERS:
        importlib.import_module(name)

    rebound = []
    for mod in _loaded_torchtitan_modules():
        changed = False
        if getattr(mod, "device_module", None) is stale_module:
            mod.device_module = device_module
            changed = True
        if getattr(mod, "device_type", None) == stale_type and isinstance(
            getattr(mod, "device_type", None), str
        ):
            mod.device_type = "cpu"
            changed = True
        if changed:
            rebound.append(mod.__name__)
    return rebound


def apply_cpu_compat(force: bool = False) -> bool:
    """Patch torchtitan so it trains on CPU with the gloo backend.

    Idempotent.  Does nothing (returns False) when an accelerator is present,
    unless ``force=True`` (or env ``TORCHTITAN_EXT_FORCE_CPU=1``), which is
    only meant for testing the CPU path on a GPU host.  Returns True when the
    CPU patches are active.
    """
    global _applied
    if _applied:
        return True
    force = force or os.environ.get("TORCHTITAN_EXT_FORCE_CPU") == "1"
    if has_accelerator() and not force:
        return False

    shim = CpuDeviceModule()
    rebound = _rebind_device_globals(shim)  # fixes 1 and 2

    # Fix 3.  Trainer.train() calls it as ``dist_utils.set_pg_timeouts`` (an
    # attribute lookup, train.py:700), so rebinding the module attribute is
    # enough; torchtitan offers no extension point for it.
    import torchtitan.distributed.utils as tt_dist_utils

    tt_dist_utils.set_pg_timeouts = _set_pg_timeouts_gloo

    # Fix 5.  ``train.py:34-37`` imports maybe_enable_profiling by value, so
    # every loaded copy is swapped; later importers read the patched source.
    import torchtitan.tools.profiling as tt_profiling

    stale_profiling = tt_profiling.maybe_enable_profiling
    for mod in _loaded_torchtitan_modules():
        if getattr(mod, "maybe_enable_profiling", None) is stale_profiling:
            mod.maybe_enable_profiling = _maybe_enable_profiling_cpu

    _applied = True
    logger.info("torchtitan CPU compat applied (rebound: %s)", ", ".join(rebound))
    return True


# --------------------------------------------------------------------------
# Fix 4: FSDP2 over gloo.
# --------------------------------------------------------------------------


def make_fsdp_gloo_compatible(model: nn.Module) -> int:
    """Make every FSDP2 module under ``model`` reduce gradients with SUM only.

    Call it at the end of a ``parallelize_fn``, after the last
    ``fully_shard`` (FSDP modules created later are not covered); the order
    relative to ``set_gradient_divide_factor`` does not matter.

    Why: torchtitan sets ``set_gradient_divide_factor(1.0)``; FSDP then
    reduce-scatters with ``ReduceOp.PREMUL_SUM(1.0)``
    (``_fsdp_collectives.py::_get_gradient_divide_factors``) and gloo raises
    ``RuntimeError: Cannot use ReduceOp.PREMUL_SUM with Gloo``.  With
    ``set_force_sum_reduction_for_comms(True)`` FSDP reduces with
    ``ReduceOp.SUM`` and applies the divide factor as a local ``div_``
    (skipped for 1.0), which gives the same gradients.  Harmless on NCCL
    (it only forgoes NCCL's fused pre-multiply).  Returns the number of FSDP
    modules changed.
    """
    from torch.distributed.fsdp import FSDPModule

    count = 0
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
            count += 1
    return count
