"""What `run.py` does: register everything, check the configuration, run torchtitan's trainer.

The checks run before torchtitan initialises distributed state or touches a GPU, so a bad
configuration ends within seconds with one line that names the key or pattern (exit code 2).
"""

from __future__ import annotations

import os
import sys

import torch

from torchtitan_ext.optical.config import OpticalConfigError

CUSTOM_CONFIG_MODULE = "torchtitan_ext.titan.job_config"
_CUSTOM_KEYS = ("--job.custom_config_module", "--job.custom-config-module")


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss or gradient; raised before that step's optimizer
    step and checkpoint."""


def with_custom_config(argv: list[str]) -> list[str]:
    """Add `--job.custom_config_module` (the [optical] section) unless the user named one."""
    if any(a.split("=")[0] in _CUSTOM_KEYS for a in argv):
        return argv
    toml_path = _toml_path(argv)
    if toml_path:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            with open(toml_path, "rb") as f:
                job = tomllib.load(f).get("job", {})
            if isinstance(job, dict) and job.get("custom_config_module"):
                return argv
        except (OSError, ValueError):
            pass  # torchtitan reports an unreadable file itself
    return argv + [f"--job.custom_config_module={CUSTOM_CONFIG_MODULE}"]


def _toml_path(argv: list[str]) -> str | None:
    keys = ("--job.config_file", "--job.config-file")
    for i, a in enumerate(argv):
        k, _, v = a.partition("=")
        if k in keys:
            return v if v else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def preflight(job_config) -> None:
    """Validate what torchtitan does not: flavor, [optical], transform file and its patterns,
    and the settings that would fail (or be ignored) only after distributed start-up."""
    from torchtitan_ext.titan.activation_checkpoint import (check_ac_save_attention,
                                                            check_memory_budget)
    from torchtitan_ext.titan.converter import transform_config_of
    from torchtitan_ext.titan.cuda_graphs import check_cuda_graphs
    from torchtitan_ext.titan.model import build_titan_model, is_optical, spec_and_args

    world = int(os.environ.get("WORLD_SIZE", "1"))
    spec_and_args(job_config)  # model name and flavor
    _check_converters(job_config.model.converters)
    _check_parallelism(job_config.parallelism, job_config.model.name, world)
    _check_seed_checkpoint(job_config.checkpoint, world)
    check_cuda_graphs(job_config, world_size=world, has_cuda=torch.cuda.is_available())
    check_ac_save_attention(job_config)
    check_memory_budget(job_config)
    # The [optical] values and the transform file, digital twins included: a digital twin
    # carries the section for its A/B, and a bad value there would be silently ignored.
    transform = transform_config_of(job_config)
    if not is_optical(job_config):
        return
    _check_optical_run(job_config)
    # The whole transform on the meta device: every check it makes fails here, cleanly.
    build_titan_model(job_config, device="meta", optical=True, transform=transform)


# Converters that swap the same nn.Linear modules the optical transform swaps (torchtitan
# 0.2.2 registers "quantize.linear.float8" and "quantize.linear.mx"; the grouped-mm ones touch
# MoE experts only).
_LINEAR_CONVERTER_PREFIX = "quantize.linear."


def _check_optical_run(job_config) -> None:
    """Settings that conflict with the optical layers (a digital twin may use them)."""
    from torchtitan_ext.optical.ops import check_kernel_mode
    from torchtitan_ext.titan.hf_adapter import check_last_save_in_hf

    optical, ckpt = job_config.optical, job_config.checkpoint
    ac = job_config.activation_checkpoint
    if ac.mode != "none" and not ac.preserve_rng_state:
        raise OpticalConfigError(
            "activation_checkpoint.preserve_rng_state: must be true with optical layers (the "
            "recomputed forward must redraw the same noise seeds); allowed: true"
        )
    try:
        check_kernel_mode(optical.kernels)
    except ValueError as e:
        raise OpticalConfigError(str(e)) from None
    swapping = [c for c in job_config.model.converters if c.startswith(_LINEAR_CONVERTER_PREFIX)]
    if swapping:
        raise OpticalConfigError(
            f"model.converters: {swapping} swap the linear layers that 'optical_transformer' "
            "makes optical, so one of the two would silently not apply; allowed with "
            f"'optical_transformer': converters other than {_LINEAR_CONVERTER_PREFIX}*"
        )
    if ckpt.enable and ckpt.last_save_model_only and ckpt.export_dtype != "float32":
        # torchtitan's model-only last save casts the whole model state, the float32 range
        # buffers too (without last_save_model_only it does not cast at all).
        raise OpticalConfigError(
            f"checkpoint.export_dtype: got {ckpt.export_dtype!r} with "
            "checkpoint.last_save_model_only, which would cast the float32 optical range "
            "buffers too; allowed with optical layers: 'float32' (for bfloat16 "
            "weights export the checkpoint: python -m torchtitan_ext.hf.export --dtype bfloat16)"
        )
    check_last_save_in_hf(job_config)


def _check_converters(names: list[str]) -> None:
    """Every `model.converters` entry must be registered (torchtitan raises a bare KeyError)."""
    from torchtitan.protocols.model_converter import _registry_model_converter_cls

    for name in names:
        if name not in _registry_model_converter_cls:
            raise OpticalConfigError(
                f"model.converters: unknown converter {name!r}; allowed: "
                f"{sorted(_registry_model_converter_cls)}"
            )


def _check_seed_checkpoint(ckpt, world: int) -> None:
    """torchtitan's seed-checkpoint conditions, before the trainer is built instead of after."""
    if not ckpt.create_seed_checkpoint:
        return
    if not ckpt.enable:
        raise OpticalConfigError(
            "checkpoint.create_seed_checkpoint: needs checkpoint.enable = true (the seed is "
            "written into the checkpoint folder); allowed: --checkpoint.enable with it")
    if world != 1:
        raise OpticalConfigError(
            "checkpoint.create_seed_checkpoint: run it on a single process (the seed is saved "
            f"unsharded), got {world} processes; allowed: WORLD_SIZE 1")


def _check_parallelism(p, model_name: str, world: int) -> None:
    """The degrees must multiply to the number of processes (torchtitan asserts it bare); the
    optical spec takes no pipeline or context parallelism."""
    from torchtitan_ext.titan.spec import SPEC_NAME, UNSUPPORTED_PARALLELISM

    fixed = {"data_parallel_replicate_degree": p.data_parallel_replicate_degree,
             "context_parallel_degree": p.context_parallel_degree,
             "tensor_parallel_degree": p.tensor_parallel_degree,
             "pipeline_parallel_degree": p.pipeline_parallel_degree}
    for key, value in fixed.items():
        if not isinstance(value, int) or value < 1:
            raise OpticalConfigError(f"parallelism.{key}: must be an integer >= 1, got {value!r}")
    for key, why in UNSUPPORTED_PARALLELISM.items():
        if model_name == SPEC_NAME and fixed[key] != 1:
            raise OpticalConfigError(
                f"parallelism.{key}: {fixed[key]} is not supported by model.name "
                f"{SPEC_NAME!r} ({why}), its digital twin included; allowed: 1")
    shard = p.data_parallel_shard_degree
    if not isinstance(shard, int) or not (shard == -1 or shard >= 1):
        raise OpticalConfigError("parallelism.data_parallel_shard_degree: must be -1 (the rest "
                                 f"of the processes) or an integer >= 1, got {shard!r}")
    others = 1
    for value in fixed.values():
        others *= value
    total = others * (shard if shard != -1 else 1)
    if (shard == -1 and world % others) or (shard != -1 and total != world):
        named = " x ".join(f"{k.replace('_degree', '')} {v}" for k, v in fixed.items() if v > 1)
        raise OpticalConfigError(
            f"parallelism: the degrees ({named or 'all 1'}"
            f"{f' x data_parallel_shard {shard}' if shard != -1 else ''}) must multiply to the "
            f"number of processes, {world} (WORLD_SIZE = torchrun's --nnodes x "
            f"--nproc_per_node); allowed: degrees whose product is {world}"
            + (" with data_parallel_shard_degree -1 taking the rest" if shard == -1 else ""))


def _install_checkpoint_checks(trainer) -> None:
    """Record this run's resolved transform in every step folder and check it on resume."""
    from torchtitan_ext.optical.transform import resolve_transform
    from torchtitan_ext.titan.checkpointing import install
    from torchtitan_ext.titan.converter import CONVERTER_NAME, transform_config_of
    from torchtitan_ext.titan.job_config import Optical

    job = trainer.job_config
    optical = getattr(job, "optical", None) or Optical()
    if CONVERTER_NAME in job.model.converters:
        config = transform_config_of(job)
        # Run options that change the numerics of a resumed run beyond the modules' settings.
        options = {"quant_warmup_steps": optical.quant_warmup_steps,
                   "sync_ranges": optical.sync_ranges}
    else:
        config, options = None, {}
    record = resolve_transform(trainer.model_parts, config, options)
    # Recorded for the reader, not compared: the kernels and the reference compute the same
    # values, so a GPU checkpoint may continue on the CPU.
    record["info"] = {"kernels": optical.kernels, "flavor": job.model.flavor}
    install(trainer.checkpointer, record, optical.allow_transform_change,
            manifest=optical.checkpoint_manifest)


def _check_finite(trainer) -> bool:
    """Whether the trainer stops before an optimizer step on a non-finite loss or gradient."""
    optical = getattr(trainer.job_config, "optical", None)
    return optical is None or optical.stop_on_nonfinite


def _install_nonfinite_guard(trainer) -> None:
    """Collect each microbatch's loss flag and check it, with the gradients, before each
    optimizer step (see `_stop_if_nonfinite`)."""
    trainer._finite_flags = []
    if _check_finite(trainer):
        trainer.optimizers.register_step_pre_hook(
            lambda *args, **kwargs: _stop_if_nonfinite(trainer)
        )


def _record_loss_finite(trainer, loss) -> None:
    if _check_finite(trainer):
        from torchtitan_ext.optical.ranges import local

        # Under loss parallelism the loss is a replicated DTensor.
        trainer._finite_flags.append(torch.isfinite(local(loss.detach())).all())


def _stop_if_nonfinite(trainer) -> None:
    """Runs before each optimizer step: one fused norm over the gradients, one all-reduce so
    that every rank stops together (the others would hang in the next collective otherwise),
    one host read."""
    from torchtitan_ext.optical.ranges import local

    flags, trainer._finite_flags = trainer._finite_flags, []
    grads = [local(p.grad) for m in trainer.model_parts for p in m.parameters()
             if p.grad is not None]
    if grads:
        norms = torch._foreach_norm([g.float() if g.dtype == torch.float64 else g
                                     for g in grads])
        flags.append(torch.isfinite(torch.stack(norms)).all())
    if not flags:
        return
    ok = torch.stack([f.to(trainer.device) for f in flags]).all().to(torch.int32)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    if not bool(ok.item()):
        raise NonFiniteLossError(
            f"training stopped: the loss or the gradients are not finite at step "
            f"{trainer.step}; the optimizer step was not taken and no checkpoint of step "
            f"{trainer.step} was written, so the last checkpoint saved holds finite state"
        )


def _train_exiting_on_config_error(trainer, trainer_cls):
    """torchtitan's train() carries torchelastic's @record, which copies an escaping
    exception's traceback into torchrun's failure summary. Bad input found here (no loadable
    checkpoint, a transform mismatch) leaves as one line and SystemExit(2) instead, which
    @record passes through; every other error keeps @record."""
    from torch.distributed.elastic.multiprocessing.errors import record

    unrecorded = getattr(trainer_cls.train, "__wrapped__", trainer_cls.train)

    @record
    def run():
        try:
            return unrecorded(trainer)
        except OpticalConfigError as e:
            _exit_with_error(e)

    return run()


def _apply_quant_warmup(trainer, optical) -> None:
    """The recipe's digital warm-up: decided from the step alone, so a resumed run switches at
    the same step as an uninterrupted one. A model without optical modules (a digital twin)
    has nothing to switch, and logs no switch."""
    from torchtitan.tools.logging import logger
    from torchtitan_ext.optical.ranges import set_optical_enabled

    if optical is None or not optical.quant_warmup_steps:
        return
    enabled = trainer.step > optical.quant_warmup_steps
    if enabled != getattr(trainer, "_optical_enabled", True):
        if not set_optical_enabled(trainer.model_parts, enabled):
            return  # no optical module: nothing switched
        trainer._optical_enabled = enabled
        logger.info(f"optical simulation {'on' if enabled else 'off (digital warm-up)'}"
                    f" from step {trainer.step}")


def _is_stats_step(trainer, optical) -> bool:
    return bool(optical is not None and optical.stats_every
                and trainer.step % optical.stats_every == 0)


def _log_range_statistics(trainer) -> None:
    from torchtitan.tools.logging import logger
    from torchtitan_ext.optical.ranges import range_statistics

    stats = range_statistics(trainer.model_parts)
    if stats:
        trainer.metrics_processor.logger.log(stats, trainer.step)
        summary = "  ".join(f"{k.split('/', 1)[1]}={v:.2e}" for k, v in
                            sorted(stats.items()) if k.startswith("optical_clamp/"))
        logger.info(f"optical clamp fractions step {trainer.step}: {summary}")


def _restore_pending_rng(trainer) -> None:
    """Apply the generator states a resume loaded (see `load_state_dict`), once."""
    pending = getattr(trainer, "_pending_rng", None)
    if pending is None:
        return
    cpu_state, cuda_state = pending
    if cpu_state is not None:
        torch.set_rng_state(cpu_state)
    if cuda_state is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_state)
    trainer._pending_rng = None


def build_trainer_class():
    from torchtitan.train import Trainer
    from torchtitan_ext.optical.ranges import set_clamp_stats

    class OpticalTrainer(Trainer):
        """torchtitan's Trainer, stopping before an optimizer step that would apply a non-finite
        loss or gradient, with the step number (so every checkpoint written holds finite state)."""

        def __init__(self, job_config):
            super().__init__(job_config)
            _install_checkpoint_checks(self)
            _install_nonfinite_guard(self)

        def train(self):
            return _train_exiting_on_config_error(self, Trainer)

        def forward_backward_step(self, *args, **kwargs):
            _restore_pending_rng(self)
            loss = super().forward_backward_step(*args, **kwargs)
            _record_loss_finite(self, loss)
            return loss

        def train_step(self, data_iterator):
            optical = getattr(self.job_config, "optical", None)
            _apply_quant_warmup(self, optical)
            stats_step = _is_stats_step(self, optical)
            if stats_step:
                set_clamp_stats(self.model_parts, True)
            try:
                super().train_step(data_iterator)
            finally:
                if stats_step:
                    set_clamp_stats(self.model_parts, False)
            if stats_step:
                _log_range_statistics(self)

        # The noise seeds are drawn from the default generators, so a resumed run continues the
        # same noise only if their states are checkpointed with the step (every rank's are equal).
        def state_dict(self):
            sd = super().state_dict()
            sd["rng_state"] = torch.get_rng_state()
            if torch.cuda.is_available():
                sd["cuda_rng_state"] = torch.cuda.get_rng_state()
            return sd

        def load_state_dict(self, state_dict):
            super().load_state_dict(state_dict)
            # Applied when the next step's first forward starts, not now: until then the trainer
            # creates its data iterator (lazily, at the first batch), which draws from the CPU
            # generator; the saved state is the one the uninterrupted run had at that point.
            self._pending_rng = (state_dict.get("rng_state"), state_dict.get("cuda_rng_state"))

    return OpticalTrainer


def separate_compile_cache() -> str:
    """Inductor's cache folder for this run: TORCHINDUCTOR_CACHE_DIR if the user set it to a
    folder of their own, else one named after the optical ops' schemas under Inductor's
    default. Returns the folder.

    Inductor's cache key does not cover a custom op's schema: a graph compiled by a tree whose
    op had three more (defaulted) arguments was loaded by an older tree, and its first call
    failed ("optical::linear() expected at most 13 argument(s) but received 16"; stops 17 and
    18 in bench/results/README.md). A folder per schema keeps such trees apart, and each reuses
    its own compilations. Inductor writes its default into the variable the first time it asks
    for the folder (an import may do so before this runs, in this process or a parent), so
    the default itself counts as unset."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    default = os.path.abspath(default_cache_dir())
    if not chosen or os.path.abspath(chosen) == default:
        from torchtitan_ext.optical.ops import schema_fingerprint

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
            default, f"optical-ops-{schema_fingerprint()}")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def main(argv: list[str] | None = None) -> None:
    from torchtitan_ext.titan.cpu_compat import apply_cpu_compat
    from torchtitan_ext.titan.cuda_graphs import enable_cuda_graphs

    separate_compile_cache()
    apply_cpu_compat()
    import torchtitan_ext.titan  # noqa: F401  (registers the spec, converter, datasets)
    from torchtitan.config import ConfigManager
    from torchtitan.tools.logging import init_logger, logger

    init_logger()
    argv = with_custom_config(list(sys.argv[1:] if argv is None else argv))
    try:
        config = ConfigManager().parse_args(argv)
        preflight(config)
    except OpticalConfigError as e:
        _exit_with_error(e)
    enable_cuda_graphs(config)  # checked by preflight
    # torchtitan's own `main` parses sys.argv itself (its default argument is bound at import
    # time), so the extension drives the same steps with the config it already parsed.
    trainer = None
    try:
        trainer = build_trainer_class()(config)
        if config.checkpoint.create_seed_checkpoint:  # its conditions: checked by preflight
            trainer.checkpointer.save(curr_step=0, last_step=True)
            logger.info("Created seed checkpoint")
        else:
            trainer.train()
    except OpticalConfigError as e:  # e.g. a transform mismatch found while building
        if trainer is not None:
            trainer.close()
        _exit_with_error(e)
    except BaseException:  # SystemExit(2) from OpticalTrainer.train included
        if trainer is not None:
            trainer.close()
        raise
    trainer.close()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    logger.info("Process group destroyed")


def _exit_with_error(e: Exception) -> None:
    """One line (plus a diff, where there is one) on stderr, from rank 0 only (every rank
    reaches the same error), and exit code 2. Under torchrun the agent then prints its own
    failure summary and exits 1."""
    rank = os.environ.get("RANK", "0")
    if rank != "0":
        # Every rank reaches the same error; rank 0 prints it. torchrun stops the other workers
        # as soon as one exits, so the others wait: were one to exit first, rank 0 could be
        # stopped before printing. Still alive after the wait, the error was this rank's alone.
        import time

        time.sleep(_QUIET_RANK_WAIT_S)
        print(f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


_QUIET_RANK_WAIT_S = 10.0
