"""The one path that builds the run's torchtitan model from a JobConfig.

Used by `launch.preflight` (on the meta device, to check the flavor and transform before torchtitan
starts) and by the Hugging Face exporter (to know the tensors a checkpoint must hold, and to build
the model the export tests compare against).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from torchtitan_ext.optical.config import OpticalConfigError

__all__ = ["BuiltModel", "spec_and_args", "is_optical", "build_titan_model"]


@dataclass
class BuiltModel:
    model: Any
    args: Any  # the flavor's model args updated from the job config
    declared_args: Any  # the flavor's model args as declared
    transform: Any = None  # TransformConfig (None when digital)
    report: Any = None  # TransformReport (None when digital)
    candidates: list[str] = field(default_factory=list)  # optical candidates before the swap


def spec_and_args(job_config):
    """(train spec, declared flavor args, args updated from the job config); clear errors for an
    unknown model name or flavor."""
    from torchtitan.protocols.train_spec import get_train_spec

    try:
        spec = get_train_spec(job_config.model.name)
    except ValueError as e:
        raise OpticalConfigError(f"model.name: {e}") from e
    flavor = job_config.model.flavor
    if flavor not in spec.model_args:
        raise OpticalConfigError(
            f"model.flavor: {flavor!r} is not a flavor of {job_config.model.name!r}; "
            f"allowed: {sorted(spec.model_args)}"
        )
    declared = spec.model_args[flavor]
    args = copy.deepcopy(declared)
    args.update_from_config(job_config)
    return spec, declared, args


def is_optical(job_config) -> bool:
    from torchtitan_ext.titan.converter import CONVERTER_NAME

    return CONVERTER_NAME in job_config.model.converters


def build_titan_model(job_config, device: str | torch.device = "meta",
                      optical: bool | None = None, transform=None) -> BuiltModel:
    """The run's model on `device`, transformed when the run is optical (or `optical=True`),
    with `transform` (a TransformConfig) instead of the job config's when given."""
    from torchtitan_ext.optical.transform import candidate_modules, transform_model
    from torchtitan_ext.titan.converter import transform_config_of

    spec, declared, args = spec_and_args(job_config)
    optical = is_optical(job_config) if optical is None else optical
    tcfg = (transform or transform_config_of(job_config)) if optical else None
    with torch.device(device):
        model = spec.model_cls(args)
        candidates = list(candidate_modules(model).keys())
        report = transform_model(model, tcfg) if optical else None
    return BuiltModel(model=model, args=args, declared_args=declared, transform=tcfg,
                      report=report, candidates=candidates)
