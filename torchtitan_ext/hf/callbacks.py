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

from torch import nn

from torchtitan_ext.optical.ranges import optical_modules, update_ranges

__all__ = ["OpticalRangesCallback", "attach_range_updates"]

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
        # Under data parallelism each rank holds one slice of the global batch: place its noise
        # indices there (semantics 1.3), as torchtitan's parallelize does.
        if model is not None and args.world_size > 1:
            for m in optical_modules(model):
                m.shard.dp_rank, m.shard.dp_size = args.process_index, args.world_size
        return control

    def on_optimizer_step(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if model is not None and optical_modules(model):
            update_ranges(model, reduce=self.sync)
            self.updates += 1
        return control


def attach_range_updates(optimizer, model: nn.Module, sync: bool = True):
    """Call `update_ranges(model)` after every `optimizer.step()`; returns the hook handle
    (`handle.remove()` detaches it)."""

    def hook(opt, args, kwargs):
        update_ranges(model, reduce=sync)

    return optimizer.register_step_post_hook(hook)
