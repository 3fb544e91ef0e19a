"""Keep optical ranges updating during Hugging Face training.

The optical modules record what each training forward observed; `update_ranges` folds the
observations into the range buffers (after one all-reduce across ranks when distributed), and it
must run once after every optimizer step, as torchtitan's converter does in `post_optimizer_hook`.

- With the HF `Trainer`: `trainer.add_callback(OpticalRangesCallback())` (run_clm does this).
- Any other loop (accelerate, plain PyTorch): `attach_range_updates(optimizer, model)` registers an
  optimizer step post-hook, so nothing else has to remember it.

Use one of the two, not both (each call is one EMA step).
"""

from __future__ import annotations

import os

from torch import nn

from torchtitan_ext.optical.ranges import optical_modules, update_ranges
from torchtitan_ext.titan.hf_adapter import RANGES_FILE

__all__ = ["OpticalRangesCallback", "attach_range_updates", "resumed_ranges_file"]

try:
    from transformers import TrainerCallback
except ImportError:  # transformers is optional for attach_range_updates
    TrainerCallback = object  # type: ignore[misc,assignment]


class OpticalRangesCallback(TrainerCallback):
    """After each optimizer step: reduce the observed ranges across ranks and apply them (EMA).

    sync: reduce across all ranks of the default process group (False: keep per-rank ranges,
    experiments only; ranks then drift apart).
    """

    def __init__(self, sync: bool = True):
        self.sync = sync
        self.updates = 0

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if model is None or not optical_modules(model):
            return control
        # Under data parallelism each rank holds one slice of the global batch: place its noise
        # indices there (semantics 1.3), as torchtitan's parallelize does.
        if args.world_size > 1:
            for m in optical_modules(model):
                m.shard.dp_rank, m.shard.dp_size = args.process_index, args.world_size
        # The Trainer's resume loads the weights file only; the one writer keeps the ranges in
        # their own file, which would otherwise stay those of the folder training started from.
        ranges = resumed_ranges_file(args)
        if ranges is not None:
            from .transform import load_ranges

            load_ranges(model, ranges)
        return control

    def on_optimizer_step(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if model is not None and optical_modules(model):
            update_ranges(model, reduce=self.sync)
            self.updates += 1
        return control


def resumed_ranges_file(args) -> str | None:
    """The ranges file of the checkpoint folder a Trainer resumes from (`resume_from_checkpoint`:
    a folder, or True for the newest in `output_dir`), or None: no resume, or a folder without
    one (written by another writer: its weights file then carries the ranges)."""
    resume = getattr(args, "resume_from_checkpoint", None)
    if resume is None or resume is False:
        return None
    if resume is True:
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(args.output_dir)
    path = os.path.join(resume, RANGES_FILE) if resume else None
    return path if path and os.path.isfile(path) else None


def attach_range_updates(optimizer, model: nn.Module, sync: bool = True):
    """Call `update_ranges(model)` after every `optimizer.step()`; returns the hook handle
    (`handle.remove()` detaches it)."""

    def hook(opt, args, kwargs):
        update_ranges(model, reduce=sync)

    return optimizer.register_step_post_hook(hook)
