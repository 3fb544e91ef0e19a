"""The `[optical]` section, merged into torchtitan's JobConfig.

torchtitan merges this dataclass into its own when `job.custom_config_module` names this module
(`run.py` adds that argument itself, so TOML files need not). CLI overrides then work as for any
section: `--optical.transform_config path.yaml`.
"""


from dataclasses import dataclass, field  # no `from __future__ import annotations`: tyro resolves these types at runtime

__all__ = ["Optical", "JobConfig", "validate_optical", "optical_flag"]


@dataclass
class Optical:
    transform_config: str = ""
    """Path of the transform file (.yaml/.yml/.json/.toml, the reference system's format) that
    says which modules become optical and with which quantizer settings. Empty: the built-in
    default (every linear of the transformer blocks and every block's attention at 8 bits;
    embeddings and the output head digital). Used only when `model.converters` lists
    "optical_transformer"; without it the same flavor trains digitally (the A/B twin)."""

    kernels: str = "auto"
    """"auto": Triton kernels on GPUs, the plain-torch reference on the CPU; "triton": kernels
    everywhere (on the CPU only under TRITON_INTERPRET=1); "reference": reference everywhere."""

    sync_ranges: bool = True
    """Reduce observed ranges across all ranks after every optimizer step (one packed
    all-reduce) so every rank quantizes with identical ranges. Turn off only for experiments."""

    quant_warmup_steps: int = 100
    """Recipe (docs/results.md): the first N steps compute digitally while the ranges
    calibrate; the optical simulation switches on at step N+1. 0 = optical from the start (the
    very first step still passes values through, as the ranges start unset); at 60M that cost
    +0.41 nats of validation loss after 33M tokens."""

    stats_every: int = 0
    """Every N steps, log each optical module's ranges and the fraction of the values each of
    its quantizers clamps (attention also: the fraction of probabilities Q_p zeroes) to
    TensorBoard (`optical/<module>/...`, means in `optical_clamp/...`) and a one-line summary
    to the log; 0 = off. Those steps rebuild a bounded part of the forward in plain torch and
    read values on the host."""

    check_ranges_synced: bool = False
    """Debug: after every range update, verify that every rank holds bit-identical ranges (two
    extra all-reduces and a host read per step); raise naming the first differing module. Needs
    `sync_ranges` (unsynced ranks differ by design); on one process there is nothing to check."""

    stop_on_nonfinite: bool = True
    """Stop training with the step number when the loss or a gradient is not finite, before that
    step's optimizer update and checkpoint (costs one fused gradient norm, one scalar all-reduce
    and one device-to-host read per step)."""

    allow_transform_change: bool = False
    """Resume from a checkpoint trained with a different optical transform (the resolved
    transform recorded in each step folder). Off: such a resume stops with exit code 2 and the
    differences (module, key, checkpoint value, given value). On: it continues with this run's
    transform and logs the differences and which range buffers were dropped or freshly
    initialised."""

    checkpoint_manifest: bool = True
    """Write a checksum manifest (size and SHA-256 of every file) into each checkpoint step
    folder, on a background thread after the save has finished; a resume verifies it and skips
    a damaged step folder. Turn off only to measure its cost (bench/checkpoint_manifest.py):
    without it a flipped byte in a data file goes unnoticed."""

    cuda_graphs: bool = False
    """Record each compiled transformer block's forward and backward as CUDA graphs and replay
    them (Inductor's CUDA graph trees), for the optical run and its digital twin alike. For
    host-bound runs (small models: see bench/results/README.md). Needs `compile.enable` with
    "model" in `compile.components` and the Inductor backend, a CUDA GPU, a single process and
    no gradient accumulation (titan/cuda_graphs.py)."""

    ac_save_attention: bool = False
    """In the blocks that activation checkpointing recomputes (`activation_checkpoint.mode`
    "full", or "selective" every N-th layer), save the attention's output instead of
    recomputing it, in the optical run and its digital twin alike: the backward then runs no
    second optical attention forward, for one attention output per checkpointed block of
    memory (titan/activation_checkpoint.py). Refused with any other AC setting (mode "none",
    per-op SAC, memory budget), where it would do nothing."""


@dataclass
class JobConfig:
    optical: Optical = field(default_factory=Optical)


def validate_optical(optical: Optical) -> None:
    """Value checks of the section (the transform file is checked by the converter's loader).
    Digital twins carry the section too and get the same checks (launch.preflight)."""
    from torchtitan_ext.optical.config import OpticalConfigError
    from torchtitan_ext.optical.ops import KERNEL_MODES

    if optical.kernels not in KERNEL_MODES:
        raise OpticalConfigError(
            f"optical.kernels: must be one of {list(KERNEL_MODES)}, got {optical.kernels!r}"
        )
    for key in ("quant_warmup_steps", "stats_every"):
        value = getattr(optical, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise OpticalConfigError(f"optical.{key}: must be an integer >= 0, got {value!r}")
    for key in ("sync_ranges", "check_ranges_synced", "stop_on_nonfinite",
                "allow_transform_change", "checkpoint_manifest", "cuda_graphs",
                "ac_save_attention"):
        optical_flag(optical, key)
    if optical.check_ranges_synced and not optical.sync_ranges:
        # Without the reduction the ranks' ranges differ by design: the check would stop the
        # run at its first step instead of finding a bug.
        raise OpticalConfigError(
            "optical.check_ranges_synced: checks that optical.sync_ranges kept every rank's "
            "ranges identical, but optical.sync_ranges is false; allowed: "
            "check_ranges_synced = true only with sync_ranges = true"
        )


def optical_flag(optical, key: str) -> bool:
    """The bool value of `optical.<key>`; anything else raises naming the key."""
    from torchtitan_ext.optical.config import OpticalConfigError

    value = getattr(optical, key)
    if not isinstance(value, bool):
        raise OpticalConfigError(f"optical.{key}: must be true or false, got {value!r}")
    return value
