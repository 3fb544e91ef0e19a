"""Read the model state of a torchtitan DCP checkpoint on the CPU, checked against the run's flavor
and transform (the exporter's input).

The checkpoint is read without a process group: DCP stores global tensors, so a checkpoint saved
under any FSDP/TP layout reads the same way.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from torchtitan_ext.titan.hf_adapter import RANGE_SUFFIX

from .errors import ExportError

__all__ = ["TitanCheckpoint", "load_job_config", "check_checkpoint_path", "verify_checkpoint",
           "checkpoint_transform", "load_titan_checkpoint"]
_TRANSFORM_FLAGS = ("--optical.transform_config", "--optical.transform-config")

# Top-level entries of a torchtitan DCP checkpoint that are not model state.
_NON_MODEL_PREFIXES = ("optimizer.", "lr_scheduler.", "dataloader.", "train_state.", "ft_")


@dataclass
class TitanCheckpoint:
    """What an export needs: the run's config and model args, and the model state of a checkpoint."""

    job_config: Any
    args: Any
    declared_args: Any
    path: Path
    state_dict: dict[str, torch.Tensor]
    optical: bool
    transform: Any = None  # TransformConfig of the run (None when digital)
    report: Any = None  # TransformReport on the torchtitan model
    candidates: list[str] = field(default_factory=list)
    ignored_ranges: list[str] = field(default_factory=list)
    # (module, key, checkpoint value, exported value) when --optical.allow_transform_change let
    # an explicit transform differ from the one recorded in the checkpoint
    transform_change: list[tuple] = field(default_factory=list)

    @property
    def step(self) -> int | None:
        m = re.fullmatch(r"step-(\d+)", self.path.name)
        return int(m.group(1)) if m else None


def load_job_config(config_path: str | os.PathLike, overrides: Sequence[str] = ()):
    """torchtitan's JobConfig of a TOML, with the [optical] section merged (as run.py does)."""
    from torchtitan_ext.titan.launch import with_custom_config

    import torchtitan_ext.titan  # noqa: F401  (registers the spec, converter, datasets)
    from torchtitan.config import ConfigManager

    if not Path(config_path).is_file():
        raise ExportError(f"--config: file {str(config_path)!r} does not exist")
    argv = with_custom_config(["--job.config_file", str(config_path), *overrides])
    return ConfigManager().parse_args(argv)


def _step_number(p: Path) -> int:
    tail = p.name.split("-")[-1]
    return int(tail) if tail.isdigit() else -1


def check_checkpoint_path(path: Path) -> None:
    if not path.exists():
        raise ExportError(f"--checkpoint: {str(path)!r} does not exist")
    if path.is_dir() and (path / ".metadata").is_file():
        return
    steps = sorted((p for p in path.glob("step-*") if (p / ".metadata").is_file()),
                   key=_step_number) if path.is_dir() else []
    hint = f"; did you mean {str(steps[-1])!r}?" if steps else ""
    raise ExportError(
        f"--checkpoint: {str(path)!r} is not a torchtitan DCP checkpoint (no .metadata file); "
        f"expected a folder like outputs/<dump>/checkpoint/step-N{hint}"
    )


def verify_checkpoint(path: Path) -> None:
    """The step folder's structure and checksum manifest (`titan.checkpoint_integrity`), before
    anything is loaded."""
    from torchtitan_ext.titan.checkpoint_integrity import verify_step

    reason = verify_step(path)
    if reason is not None:
        raise ExportError(f"--checkpoint: {str(path)!r} cannot be loaded: {reason}")


def _explicit_transform(overrides: Sequence[str]) -> bool:
    return any(a.split("=")[0] in _TRANSFORM_FLAGS for a in overrides)


def checkpoint_transform(path: Path, job_config, overrides: Sequence[str]):
    """(TransformConfig to export with or None for the job config's, diff rows).

    The transform recorded in the checkpoint is the default. An explicit
    `--optical.transform_config` that resolves to other module settings stops (ExportError with
    the differences) unless `--optical.allow_transform_change`; then the rows are returned for
    the model card. Checkpoints without a record (older runs) use the job config's transform."""
    from torchtitan_ext.optical.config import TransformConfig, format_transform_diff, transform_diff
    from torchtitan_ext.optical.transform import resolve_transform
    from torchtitan_ext.titan.checkpoint_integrity import RECORD_FILE, read_recorded_transform
    from torchtitan_ext.titan.model import build_titan_model, is_optical

    recorded = read_recorded_transform(path)
    if recorded is None or not recorded.get("transform") or not is_optical(job_config):
        return None, []
    if not _explicit_transform(overrides):
        return TransformConfig.from_dict(recorded["transform"], source=str(path / RECORD_FILE)), []
    built = build_titan_model(job_config, device="meta", optical=True)
    rows = [r for r in transform_diff(recorded, resolve_transform(built.model, built.transform))
            if r[0] != "<options>"]  # run options (warm-up, range sync) do not reach an export
    if rows and not getattr(job_config.optical, "allow_transform_change", False):
        raise ExportError(
            f"--optical.transform_config: {built.transform.source} differs from the transform "
            f"checkpoint {str(path)!r} was trained with (module, key, checkpoint, given):\n"
            f"{format_transform_diff(rows)}\nexport without --optical.transform_config to use the "
            "checkpoint's, or pass --optical.allow_transform_change")
    return built.transform, rows


def _shape(t) -> list[int]:
    return [int(s) for s in t]


def _stored_model_tensors(path: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as e:  # a truncated or damaged .metadata: EOFError, UnpicklingError, ...
        raise ExportError(f"--checkpoint: {str(path)!r} is damaged: its .metadata cannot be read "
                          f"({type(e).__name__}: {e})") from e
    return {k: v for k, v in metadata.items()
            if not k.startswith(_NON_MODEL_PREFIXES) and isinstance(v, TensorStorageMetadata)}


def _missing_range_error(path: Path, key: str, stored: dict, tcfg) -> ExportError:
    if not any(k.endswith(RANGE_SUFFIX) for k in stored):
        return ExportError(
            f"checkpoint {str(path)!r} has no optical range buffers (e.g. {key!r}): it was trained "
            "digitally. Export it with a digital config (model.converters without "
            "'optical_transformer', e.g. train_configs/debug_model_digital.toml)")
    return ExportError(
        f"checkpoint {str(path)!r} has no {key!r}: the transform config ({tcfg.source}) makes a "
        "module optical that was digital in training; export with the transform file the "
        "checkpoint was trained with (--optical.transform_config)")


def _check_tensors(path: Path, job_config, expected: dict, stored: dict, tcfg) -> list[str]:
    """Raise on a tensor the flavor needs that the checkpoint lacks or shapes otherwise; return the
    checkpoint's range buffers that the transform does not use."""
    flavor, name = job_config.model.flavor, job_config.model.name

    def mismatch(detail: str) -> ExportError:
        return ExportError(
            f"checkpoint {str(path)!r} does not match model.flavor {flavor!r} of {name!r}: {detail}. "
            "Export with the config (or --model.flavor) the checkpoint was trained with.")

    for key, tensor in expected.items():
        if key not in stored and key.endswith(RANGE_SUFFIX):
            raise _missing_range_error(path, key, stored, tcfg)
        if key not in stored:
            raise mismatch(f"{key} (shape {_shape(tensor.shape)}) is missing from the checkpoint")
        if _shape(stored[key].size) != _shape(tensor.shape):
            raise mismatch(f"{key} has shape {_shape(stored[key].size)} in the checkpoint, the "
                           f"flavor expects {_shape(tensor.shape)}")
    extra = [k for k in stored if k not in expected]
    extra_weights = [k for k in extra if not k.endswith(RANGE_SUFFIX)]
    if extra_weights:
        raise mismatch(f"the checkpoint has {extra_weights[0]} (shape "
                       f"{_shape(stored[extra_weights[0]].size)}), which the flavor does not "
                       f"({len(extra_weights)} such tensors)")
    return [k for k in extra if k.endswith(RANGE_SUFFIX)]


def _read(path: Path, state_dict: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    with warnings.catch_warnings():
        # "torch.distributed is ... uninitialized, assuming ... a single process": what we want.
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        try:
            dcp.load(state_dict, storage_reader=FileSystemReader(str(path)))
        except Exception as e:  # truncated .distcp files and the like
            raise ExportError(f"--checkpoint: {str(path)!r} is damaged and cannot be read "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                              ) from e


def load_titan_checkpoint(config_path: str | os.PathLike | None, checkpoint: str | os.PathLike,
                          overrides: Sequence[str] = (), job_config=None) -> TitanCheckpoint:
    """Read the model state of a DCP checkpoint on the CPU (no process group), after checking that
    it holds exactly the tensors of the configured flavor (and ranges of the transform)."""
    from torchtitan_ext.titan.model import build_titan_model

    path = Path(checkpoint)
    check_checkpoint_path(path)
    verify_checkpoint(path)
    if job_config is None:
        job_config = load_job_config(config_path, overrides)
    transform, change = checkpoint_transform(path, job_config, overrides)
    built = build_titan_model(job_config, transform=transform)
    expected = dict(built.model.state_dict())
    stored = _stored_model_tensors(path)
    ignored = _check_tensors(path, job_config, expected, stored, built.transform)
    state_dict = {k: torch.empty(_shape(stored[k].size), dtype=stored[k].properties.dtype)
                  for k in expected}
    _read(path, state_dict)
    return TitanCheckpoint(
        job_config=job_config, args=built.args, declared_args=built.declared_args, path=path,
        state_dict=state_dict, optical=built.transform is not None, transform=built.transform,
        report=built.report, candidates=built.candidates, ignored_ranges=ignored,
        transform_change=change,
    )
