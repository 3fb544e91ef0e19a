"""The validator of the `optical_llama3` TrainSpec: torchtitan's, scoring the same tokens every time.

torchtitan's validation loader is infinite when `validation.steps` is set, and its text dataset
carries its position from one validation to the next, so successive validations would score
different windows of the split. Rewinding before each validation makes every validation of a run
(and of every run with the same data settings) score exactly the same tokens, so validation losses
compare across steps and across runs (docs/results.md).
"""

from __future__ import annotations

from torchtitan.components.validate import Validator

__all__ = ["FixedWindowValidator", "build_fixed_window_validator", "rewind_validation_data"]


def rewind_validation_data(dataloader) -> None:
    """Put the loader's text dataset back at the start of its split (datasets without that
    position state are left alone)."""
    dataset = getattr(dataloader, "dataset", None)
    if dataset is not None and hasattr(dataset, "_sample_idx") and hasattr(dataset, "_token_buffer"):
        dataset._sample_idx = 0
        dataset._token_buffer = []


class FixedWindowValidator(Validator):
    def validate(self, model_parts, step):
        rewind_validation_data(self.validation_dataloader)
        return super().validate(model_parts, step)


def build_fixed_window_validator(**kwargs) -> FixedWindowValidator:
    """`build_validator_fn` of the TrainSpec (the arguments of torchtitan's `build_validator`)."""
    assert kwargs.get("metrics_processor") is not None
    return FixedWindowValidator(**kwargs)
