"""The energy table of a torchtitan job (torchtitan_ext.optical.energy applied to its model).

`energy_table_for_job(job_config)` is what the converter logs at model build; it never raises
through `log_energy_table`, which logs why an estimate could not be made instead.
"""

from __future__ import annotations

from pathlib import Path

from torchtitan.tools.logging import logger

from torchtitan_ext.optical.energy import (
    EnergyReport,
    HardwareProfile,
    ModelDims,
    estimate_energy,
    load_hardware_profile,
)

__all__ = ["energy_report_for_job", "energy_table_for_job", "log_energy_table"]


def energy_report_for_job(job_config, transform=None, *,
                          profile: HardwareProfile | str | Path | None = None,
                          photons_per_mac: float | None = None) -> EnergyReport:
    """EnergyReport of the job's model at `training.seq_len` under `transform` (default: the
    job's transform config when the optical converter is listed, else the model is digital)."""
    from .converter import transform_config_of
    from .model import is_optical, spec_and_args

    if transform is None and is_optical(job_config):
        transform = transform_config_of(job_config)
    _, _, args = spec_and_args(job_config)
    dims = ModelDims.from_titan_args(args, job_config.training.seq_len)
    if not isinstance(profile, HardwareProfile):
        profile = load_hardware_profile(profile)
    return estimate_energy(dims, transform, profile, photons_per_mac)


def energy_table_for_job(job_config, transform=None, **kwargs) -> str:
    """Markdown energy table of the job (see `energy_report_for_job` for the arguments)."""
    return energy_report_for_job(job_config, transform, **kwargs).to_markdown()


def log_energy_table(job_config, transform=None) -> bool:
    """Log the job's energy table once, on rank 0; on any failure log why and return False."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return False
    try:
        table = energy_table_for_job(job_config, transform)
    except Exception as e:  # an estimate must never stop training
        logger.warning(f"optical energy estimate not made: {type(e).__name__}: {e}")
        return False
    logger.info("optical energy estimate (docs/energy.md):\n" + table)
    return True
