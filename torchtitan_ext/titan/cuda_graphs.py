"""`optical.cuda_graphs`: replay the compiled transformer blocks as CUDA graphs.

Small models are host-bound: on one H200 the 60M's compiled step keeps the GPU 29% busy
digital and 13% optical, the 1.1B's 93% and 73% (bench/results/README.md, stop 23). Inductor's
CUDA graph trees record each compiled block's forward and backward once and then replay them,
so a step no longer pays Python and launch costs per kernel. The option applies to the digital
twin as well (both arms of an A/B should run the same way).

It is an Inductor setting for the whole process (the loss, when compiled, is captured too) and
it is checked before any GPU work: the graphs come from the compiled blocks, so
`compile.enable` with "model" in `compile.components` and the Inductor backend are required; it
needs a CUDA GPU; and it is limited to one process without gradient accumulation: FSDP
re-allocates the unsharded weights every step, which a recorded graph cannot follow, a
microbatch's replay can reuse the memory of the previous microbatch's outputs (its loss, which the
step keeps until the end), and neither multi-GPU runs nor accumulation have been measured with
it.
"""

from __future__ import annotations

import contextlib

from torchtitan_ext.optical.config import OpticalConfigError

from .job_config import optical_flag

__all__ = ["check_cuda_graphs", "enable_cuda_graphs", "graphs_off"]


def _wanted(job_config) -> bool:
    optical = getattr(job_config, "optical", None)
    return hasattr(optical, "cuda_graphs") and optical_flag(optical, "cuda_graphs")


def check_cuda_graphs(job_config, *, world_size: int, has_cuda: bool) -> None:
    """Raise OpticalConfigError naming the key when `optical.cuda_graphs` cannot apply."""
    if not _wanted(job_config):
        return
    compile_config = job_config.compile
    if not compile_config.enable or "model" not in compile_config.components:
        raise OpticalConfigError(
            "optical.cuda_graphs: the CUDA graphs are recorded from the compiled blocks; needs "
            "compile.enable = true with \"model\" in compile.components (got enable = "
            f"{compile_config.enable}, components = {list(compile_config.components)})")
    if compile_config.backend != "inductor":
        raise OpticalConfigError(
            "optical.cuda_graphs: the graphs are Inductor's; needs compile.backend = "
            f"\"inductor\", got {compile_config.backend!r}")
    if world_size != 1:
        raise OpticalConfigError(
            f"optical.cuda_graphs: one process only (this run has {world_size}; FSDP "
            "re-allocates the unsharded weights every step); allowed: false for multi-GPU runs "
            "(--optical.no-cuda_graphs)")
    training = job_config.training
    if training.global_batch_size > 0 and training.global_batch_size != training.local_batch_size:
        raise OpticalConfigError(
            "optical.cuda_graphs: gradient accumulation (training.global_batch_size "
            f"{training.global_batch_size} with local_batch_size {training.local_batch_size}) is "
            "not supported with CUDA graphs (untested; a microbatch's replay can reuse the "
            "memory of the previous microbatch's outputs, which the step still holds); "
            "allowed: global_batch_size -1 or equal to local_batch_size")
    if not has_cuda:
        raise OpticalConfigError(
            "optical.cuda_graphs: needs a CUDA GPU, and this machine has none; allowed: false "
            "(--optical.no-cuda_graphs)")


def enable_cuda_graphs(job_config) -> None:
    """Switch Inductor's CUDA graph trees on when the job asks for them; `launch.main` calls it
    after the checks, for every model name, before the blocks' first compiled call (which is
    when Inductor reads the setting)."""
    if _wanted(job_config):
        import torch._inductor.config as inductor_config

        inductor_config.triton.cudagraphs = True


@contextlib.contextmanager
def graphs_off():
    """Compile what runs inside without CUDA graphs (and restore the setting after).

    For forwards without a backward (validation): Inductor's graph trees start a new generation
    at every compiled call that has no backward pending, and each transformer block is its own
    compiled call, so block i + 1's replay would overwrite block i's output, its own input
    (H200, stop 27: the 60M's first validation stopped with "accessing tensor output of
    CUDAGraphs that has been overwritten"). Those forwards compile separately anyway (grad mode
    is a Dynamo guard), so their graphs take the setting in force here; Inductor reads it when
    it compiles, never at replay, so the training graphs are untouched."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"triton.cudagraphs": False}):
        yield
