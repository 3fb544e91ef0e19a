"""torchtitan's CheckpointManager with the checks of `checkpoint_integrity`.

- save: rank 0 records the resolved optical transform in the step folder before DCP writes it,
  and hashes the folder in a background thread once the save (or async save) has finished.
- load: the newest step folder that verifies is loaded (one warning names each newer one that
  was skipped and why; a DCP error while loading counts as damage too); none: one-line error
  naming the folder. The recorded transform is compared with the run's: a difference stops the
  run with the diff unless `optical.allow_transform_change`; with it, the range buffers that
  were dropped or freshly initialised are logged. A first load from
  `checkpoint.initial_load_path` (a DCP step folder) gets the same checks, without fallback.

Installed on the trainer's manager by `install` (a class swap of the one instance, so
torchtitan's construction and all its other behaviour are untouched).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.tools.logging import logger

from torchtitan_ext.optical.config import format_transform_diff, transform_diff

from .checkpoint_integrity import (
    MANIFEST_FILE,
    CheckpointLoadError,
    ManifestWriter,
    newest_loadable_step,
    read_recorded_transform,
    verify_step,
    write_recorded_transform,
)

__all__ = ["OpticalCheckpointManager", "install"]

RANGE_KEY = "optical_ranges"


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _broadcast(obj: Any) -> Any:
    """Rank 0's value on every rank (so all ranks load the same step)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def install(checkpointer: CheckpointManager, record: dict[str, Any],
            allow_transform_change: bool, manifest: bool = True) -> None:
    """Give the trainer's manager the optical checks: `record` is this run's resolved
    transform (what a step folder must match); `manifest` False skips the checksum manifests
    (for measuring their cost only)."""
    checkpointer.__class__ = OpticalCheckpointManager
    checkpointer._optical_record = record
    checkpointer._allow_transform_change = allow_transform_change
    checkpointer._manifests = ManifestWriter(logger) if manifest else None
    checkpointer._missing_ranges = set()


class OpticalCheckpointManager(CheckpointManager):
    _optical_record: dict[str, Any]
    _allow_transform_change: bool
    _manifests: ManifestWriter
    _missing_ranges: set

    # ------------------------------------------------------------------------------ saving

    def save(self, curr_step: int, last_step: bool = False) -> None:
        checks = (self._should_save(curr_step, last_step) and not self.ft_manager
                  and _rank() == 0)
        # Only a manager that saves has a folder (torchtitan's disabled one has none).
        step_dir = self._create_checkpoint_id(curr_step) if checks else None
        if checks:
            # A manifest of an earlier save into this folder would vouch for other bytes.
            (Path(step_dir) / MANIFEST_FILE).unlink(missing_ok=True)
            # Before DCP writes `.metadata` (its last file): a complete folder always has it.
            write_recorded_transform(step_dir, self._optical_record)
        super().save(curr_step, last_step)
        if checks and self._manifests is not None:
            # The last step's save is synchronous in torchtitan whatever the async mode.
            future = None if last_step else self.save_future
            self._manifests.submit(step_dir, wait_for=future)

    def close(self) -> None:
        manifests = getattr(self, "_manifests", None)
        if manifests is not None:
            manifests.join()
        super().close()

    # ----------------------------------------------------------------------------- loading

    def load(self, step: int = -1) -> bool:
        if not self.enable:
            return super().load(step)
        if not Path(self.folder).is_dir():
            # No step folder of this run yet: torchtitan loads `initial_load_path` if given.
            return self._load_initial(step)
        tried: list[tuple[int, str]] = []
        while True:
            chosen, skipped = _broadcast(self._choose_step(step, {s for s, _ in tried}))
            tried += skipped
            if chosen is None:
                return self._nothing_loadable(tried, step)
            if tried and _rank() == 0:
                why = "; ".join(f"step-{s}: {r}" for s, r in tried)
                logger.warning(f"checkpoint: skipped newer step folder(s) that cannot be "
                               f"loaded ({why}); loading step-{chosen}")
            self._check_transform(Path(self._create_checkpoint_id(chosen)))
            try:
                return super().load(step=chosen)
            except CheckpointLoadError:
                raise
            except Exception as e:  # DCP reports damage it finds while reading as anything
                if step != -1:
                    raise CheckpointLoadError(
                        f"checkpoint step-{chosen} in {self.folder} cannot be loaded: "
                        f"{type(e).__name__}: {e}") from e
                tried.append((chosen, f"{type(e).__name__} while loading: {e}"))
                self._missing_ranges = set()

    def _choose_step(self, step: int, exclude: set[int]) -> tuple[int | None, list]:
        """On rank 0: the step to load (the requested one, or the newest that verifies, not in
        `exclude`) and the skipped (step, reason) pairs. Other ranks return a placeholder that
        the broadcast replaces."""
        if _rank() != 0:
            return None, []
        if step != -1:
            # A step the user named: no fallback to another one.
            reason = verify_step(self._create_checkpoint_id(step))
            return (step, []) if reason is None else (None, [(step, reason)])
        return newest_loadable_step(self.folder, exclude=exclude)

    def _load_initial(self, step: int) -> bool:
        """torchtitan's load from `checkpoint.initial_load_path`, after the checks a resume
        makes: the folder verifies, and its recorded transform matches the run's (or
        `allow_transform_change`). An HF folder (`initial_load_in_hf`) holds no DCP metadata
        or JSON record: torchtitan's HF import reads it as it is."""
        path = self.initial_load_path
        if not path or self.initial_load_in_hf:
            return super().load(step)
        where = f"checkpoint.initial_load_path {path}"
        reason = _broadcast(verify_step(path) if _rank() == 0 else None)
        if reason is not None:
            raise CheckpointLoadError(f"{where}: {reason}")
        self._check_transform(Path(path))
        try:
            return super().load(step)
        except CheckpointLoadError:
            raise
        except Exception as e:  # damage DCP finds while reading, or another model's state
            raise CheckpointLoadError(
                f"{where} cannot be loaded: {type(e).__name__}: {e}") from e

    def _nothing_loadable(self, tried: list[tuple[int, str]], step: int) -> bool:
        if not tried:
            return super().load(step)  # no step folder: torchtitan's own behaviour
        if step != -1:
            raise CheckpointLoadError(f"checkpoint.load_step {step}: "
                                      f"{self._create_checkpoint_id(step)}: {tried[-1][1]}")
        why = "; ".join(f"step-{s}: {r}" for s, r in tried)
        raise CheckpointLoadError(f"checkpoint folder {self.folder}: no step folder can be "
                                  f"loaded ({why})")

    def _check_transform(self, step_dir: Path) -> None:
        """Stop on a transform that differs from the recorded one (unless allowed); with the
        override, note which range buffers the load will drop or leave freshly initialised."""
        recorded = read_recorded_transform(step_dir)
        if recorded is None:
            logger.warning(f"{step_dir} records no optical transform (saved before records "
                           "existed): not compared with this run's")
            return
        rows = transform_diff(recorded, self._optical_record)
        if not rows:
            return
        diff = format_transform_diff(rows)
        if not self._allow_transform_change:
            raise CheckpointLoadError(
                f"{step_dir} was trained with another optical transform; pass "
                f"--optical.allow_transform_change to continue with this run's:\n{diff}")
        logger.warning(f"{step_dir}: continuing with a different optical transform "
                       f"(optical.allow_transform_change):\n{diff}")
        self._report_ranges(step_dir)

    def _report_ranges(self, step_dir: Path) -> None:
        from torch.distributed.checkpoint import FileSystemReader

        saved = {k for k in FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
                 if k.endswith(RANGE_KEY)}
        model = {k for k in self.states["model"].state_dict() if k.endswith(RANGE_KEY)}
        dropped, fresh = sorted(saved - model), sorted(model - saved)
        self._missing_ranges = set(fresh)
        if _rank() == 0:
            logger.warning(f"range buffers in the checkpoint but not in this model (dropped): "
                           f"{len(dropped)} {dropped}")
            logger.warning(f"range buffers of this model not in the checkpoint (freshly "
                           f"initialised): {len(fresh)} {fresh}")

    def _states_to_load(self, model_only: bool) -> dict[str, Any]:
        # Range buffers the checkpoint lacks keep their initial (unset) value instead of
        # failing DCP's strict key check; only reached with allow_transform_change.
        states = super()._states_to_load(model_only)
        return {k: v for k, v in states.items() if k not in self._missing_ranges}
