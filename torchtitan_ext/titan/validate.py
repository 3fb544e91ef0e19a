"""The validator of the `optical_llama3` TrainSpec: torchtitan's, scoring the same tokens every time.

torchtitan's validation loader is infinite when `validation.steps` is set, and its text dataset
carries its position from one validation to the next, so successive validations would score
different windows of the split. Rewinding before each validation makes every validation of a run
(and of every run with the same data settings) score exactly the same tokens, so validation losses
compare across steps and across runs (docs/results.md). Validation forwards run without CUDA
graphs (titan/cuda_graphs.py).
"""

from __future__ import annotations

import torch
from torchtitan.components.validate import Validator

from .cuda_graphs import graphs_off

__all__ = ["FixedWindowValidator", "build_fixed_window_validator", "rewind_validation_data"]


def rewind_validation_data(dataloader) -> None:
    """Put the loader's text dataset back at the start of its split (datasets without that
    position state are left alone)."""
    dataset = getattr(dataloader, "dataset", None)
    if dataset is not None and hasattr(dataset, "_sample_idx") and hasattr(dataset, "_token_buffer"):
        dataset._sample_idx = 0
        dataset._token_buffer = []


class FixedWindowValidator(Validator):
    """torchtitan's validator, rewound before each validation, run without CUDA graphs
    (`optical.cuda_graphs` records the training blocks only: see `cuda_graphs.graphs_off`),
    and leaving the random generators as it found them.

    The optical layers draw their noise seeds from the default generators, and torchtitan
    validates after a step's checkpoint is written: a validation that advanced them would make
    the steps after a checkpoint differ from those of a run resumed from it (semantics 6b; a
    validation at every checkpoint step is the shipped recipe's case)."""

    def validate(self, model_parts, step):
        rewind_validation_data(self.validation_dataloader)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with graphs_off(), torch.random.fork_rng(devices=devices, device_type="cuda"):
            return super().validate(model_parts, step)


def build_fixed_window_validator(**kwargs) -> FixedWindowValidator:
    """`build_validator_fn` of the TrainSpec (the arguments of torchtitan's `build_validator`)."""
    assert kwargs.get("metrics_processor") is not None
    return FixedWindowValidator(**kwargs)
