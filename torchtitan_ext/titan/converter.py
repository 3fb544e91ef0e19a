"""ModelConverter "optical_transformer": swaps modules for optical ones and keeps ranges in step.

torchtitan builds the model on the meta device, runs the converters, parallelizes, then
materialises the weights with `init_weights`. The converter therefore
1. swaps modules by the transform config (on the meta device, before any GPU work),
2. makes `init_weights` also reset the range buffers, which `to_empty` leaves uninitialised,
3. after every optimizer step reduces the observed ranges across ranks and applies them.
"""

from __future__ import annotations

import torch
from torch import nn
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.protocols.model_converter import register_model_converter
from torchtitan.tools.logging import logger

from torchtitan_ext.optical.config import (
    DEFAULT_TRANSFORM_CONFIG,
    TransformConfig,
    load_transform_config,
)
from torchtitan_ext.optical.ops import set_kernel_mode
from torchtitan_ext.optical.ranges import assert_ranges_synced, reset_ranges, update_ranges
from torchtitan_ext.optical.transform import format_histogram, transform_model

from .energy import log_energy_table
from .job_config import Optical, validate_optical

__all__ = ["OpticalTransformerConverter", "CONVERTER_NAME", "transform_config_of"]

CONVERTER_NAME = "optical_transformer"


def transform_config_of(job_config: JobConfig) -> TransformConfig:
    optical = getattr(job_config, "optical", None) or Optical()
    validate_optical(optical)
    if optical.transform_config:
        return load_transform_config(optical.transform_config)
    return TransformConfig.from_dict(DEFAULT_TRANSFORM_CONFIG, source="<built-in default>")


class OpticalTransformerConverter:
    def __init__(self, job_config: JobConfig, parallel_dims: ParallelDims):
        self.optical = getattr(job_config, "optical", None) or Optical()
        self.config = transform_config_of(job_config)
        set_kernel_mode(self.optical.kernels)
        self.report = None
        self._job_config = job_config
        self._energy_logged = False

    def convert(self, model: nn.Module) -> None:
        self.report = transform_model(model, self.config)
        logger.info(format_histogram(self.report))
        _reset_ranges_after_init(model)
        if not self._energy_logged:  # one table per run, rank 0; never fails the build
            self._energy_logged = True
            log_energy_table(self._job_config, self.config)

    def post_optimizer_hook(self, model: nn.Module | list[nn.Module]) -> None:
        update_ranges(model, reduce=self.optical.sync_ranges)
        if self.optical.check_ranges_synced:
            assert_ranges_synced(model)


def _reset_ranges_after_init(model: nn.Module) -> None:
    init = model.init_weights

    def init_weights(*args, **kwargs):
        init(*args, **kwargs)
        reset_ranges(model)
        # Noise seeds come from the default generators. torchtitan seeds them identically on
        # every rank, but initialising DTensor weights can move them by rank-dependent amounts;
        # re-seeding with the common initial seed makes every rank draw the same noise seeds
        # from here on (semantics page, section 6).
        torch.manual_seed(torch.initial_seed())

    # An instance attribute, so it survives FSDP's class swap and works for any model class.
    model.init_weights = init_weights


register_model_converter(OpticalTransformerConverter, CONVERTER_NAME)
