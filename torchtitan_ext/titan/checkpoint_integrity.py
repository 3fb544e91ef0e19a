"""Checkpoint step folders that say what they hold and whether they are whole.

Every step folder `<checkpoint.folder>/step-N` written by `run.py` gets two small files:

- `optical_transform.json`: the resolved optical transform the model was trained with
  (`resolve_transform`), written by rank 0 *before* DCP writes the step, with a temporary file
  and a rename. DCP writes `.metadata` last, so a folder with `.metadata` always has it.
- `optical_manifest.json`: size and SHA-256 of every other file of the folder, written by
  rank 0 in a background thread *after* the save completed (after the async save's future for
  torchtrain's async modes), again with a temporary file and a rename: a crash while it is
  being written leaves no manifest, never one that claims files it has not hashed.

`verify_step` checks a folder before it is loaded: `.metadata` readable, every file it
references present and long enough, and, when the manifest exists, every size and checksum.
`newest_loadable_step` picks the newest folder that passes (the resume in `checkpointing`).
The exporter, which is given one step folder, checks it with `verify_step` and compares
`read_recorded_transform` with `torchtitan_ext.optical.config.transform_diff`.

The folder must be on a file system every rank sees (as DCP itself requires).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Container

from torchtitan_ext.optical.config import OpticalConfigError

__all__ = [
    "CheckpointLoadError",
    "MANIFEST_FILE",
    "RECORD_FILE",
    "ManifestWriter",
    "newest_loadable_step",
    "read_recorded_transform",
    "step_folders",
    "verify_step",
    "write_manifest",
    "write_recorded_transform",
]

RECORD_FILE = "optical_transform.json"
MANIFEST_FILE = "optical_manifest.json"
_STEP_RE = re.compile(r"step-(\d+)")
_CHUNK = 16 << 20


class CheckpointLoadError(OpticalConfigError):
    """No step folder of the checkpoint can be loaded, or its transform differs from the run's:
    the message names the folder (exit code 2 from run.py, like a bad configuration)."""


def _write_json_atomically(path: Path, data: Any, create_folder: bool = True) -> None:
    """Write JSON to a temporary sibling, fsync it, rename it over `path`: readers see the old
    file, no file, or the complete new one. Without `create_folder` a missing folder raises
    FileNotFoundError (a manifest must not resurrect a folder that keep_latest_k purged)."""
    if create_folder:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the folder's other files are 0644
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_recorded_transform(step_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    """Store the resolved transform (`resolve_transform`) in `step_dir` (created if needed)."""
    _write_json_atomically(Path(step_dir) / RECORD_FILE, record)


def read_recorded_transform(step_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The resolved transform recorded in `step_dir`, or None when it records none (a digital
    run's folder has one with no modules; folders saved before this existed have none).
    Raises `CheckpointLoadError` naming the file when it is not valid JSON."""
    path = Path(step_dir) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointLoadError(f"{path}: unreadable recorded transform: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointLoadError(f"{path}: recorded transform is not a JSON object")
    return data


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        # hashlib and file reads release the GIL on large chunks: training keeps running.
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _payload_files(step_dir: Path) -> list[Path]:
    """Every file of the folder except the manifest and temporary files (names with .tmp-)."""
    out = []
    for p in sorted(step_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST_FILE and ".tmp-" not in p.name:
            out.append(p)
    return out


def write_manifest(step_dir: str | os.PathLike) -> dict[str, Any]:
    """Hash every file of a completed step folder and store the manifest atomically; returns
    it. Call only once the save has finished (the files are final)."""
    step_dir = Path(step_dir)
    files = {str(p.relative_to(step_dir)): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in _payload_files(step_dir)}
    manifest = {"format": 1, "algorithm": "sha256", "files": files}
    _write_json_atomically(step_dir / MANIFEST_FILE, manifest, create_folder=False)
    return manifest


def _check_dcp_structure(step_dir: Path) -> str | None:
    """`.metadata` unpickles and every byte range it references exists."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(step_dir)).read_metadata()
    except Exception as e:  # unpickling damaged bytes raises many types
        return f"damaged .metadata ({type(e).__name__}: {e})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for rel, end in sorted(needed.items()):
        f = step_dir / rel
        if not f.is_file():
            return f"missing file {rel}"
        size = f.stat().st_size
        if size < end:
            return f"truncated file {rel} ({size} bytes, the metadata needs {end})"
    return None


def _check_manifest(step_dir: Path, checksums: bool) -> str | None:
    path = step_dir / MANIFEST_FILE
    if not path.is_file():
        return None  # the manifest thread had not finished: the structure check stands alone
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"damaged {MANIFEST_FILE} ({type(e).__name__}: {e})"
    for rel, entry in sorted(files.items()):
        f = step_dir / rel
        if not f.is_file():
            return f"missing file {rel} (listed in {MANIFEST_FILE})"
        if f.stat().st_size != entry.get("size"):
            return f"file {rel} has {f.stat().st_size} bytes, {MANIFEST_FILE} says {entry.get('size')}"
        if checksums and _sha256(f) != entry.get("sha256"):
            return f"checksum mismatch in {rel} (damaged since it was saved)"
    return None


def verify_step(step_dir: str | os.PathLike, checksums: bool = True) -> str | None:
    """None when the step folder can be loaded, else the reason in a few words: no
    `.metadata` (the save did not finish), damaged `.metadata`, a missing or truncated file, a
    size or checksum (`checksums=True`) that differs from the manifest. Reads every byte when
    checksums are checked; changes nothing."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        return "not a folder"
    if not (step_dir / ".metadata").is_file():
        if (step_dir / "model.safetensors.index.json").is_file():
            return _check_manifest(step_dir, checksums)  # a model-only HF save of torchtitan
        return "no .metadata (the save did not finish)"
    return _check_dcp_structure(step_dir) or _check_manifest(step_dir, checksums)


def step_folders(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every `step-N` folder under `folder`, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in folder.iterdir()
           if p.is_dir() and (m := _STEP_RE.fullmatch(p.name))]
    return sorted(out, reverse=True)


def newest_loadable_step(folder: str | os.PathLike, checksums: bool = True,
                         exclude: Container[int] = ()
                         ) -> tuple[int | None, list[tuple[int, str]]]:
    """(newest step whose folder passes `verify_step`, or None; the (step, reason) of every
    newer folder that was skipped, newest first). Steps in `exclude` (already found
    unloadable by the caller) are passed over without a reason."""
    skipped: list[tuple[int, str]] = []
    for step, path in step_folders(folder):
        if step in exclude:
            continue
        reason = verify_step(path, checksums=checksums)
        if reason is None:
            return step, skipped
        skipped.append((step, reason))
    return None, skipped


class ManifestWriter:
    """Writes step manifests on background threads, each after its save has finished (after
    `wait_for.result()` for an async save). `join()` waits for all of them (at close, so the
    last step of a run gets its manifest before the process exits)."""

    def __init__(self, log=None):
        self._threads: list[threading.Thread] = []
        self._log = log

    def submit(self, step_dir: str | os.PathLike, wait_for=None) -> None:
        t = threading.Thread(target=self._run, args=(Path(step_dir), wait_for), daemon=True,
                             name=f"optical-manifest-{Path(step_dir).name}")
        t.start()
        self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _run(self, step_dir: Path, wait_for) -> None:
        try:
            if wait_for is not None:
                wait_for.result()
            begin = time.monotonic()
            files = write_manifest(step_dir)["files"]
            if self._log is not None:
                size = sum(f["size"] for f in files.values())
                self._log.info(f"checksum manifest of {step_dir.name}: {len(files)} files, "
                               f"{size / 1e9:.2f} GB hashed in {time.monotonic() - begin:.2f} "
                               "seconds (background)")
        except FileNotFoundError:
            pass  # purged by keep_latest_k while hashing: nothing to vouch for
        except Exception as e:  # a manifest is an aid; its failure must not stop training
            if self._log is not None:
                self._log.warning(f"no checksum manifest for {step_dir}: {type(e).__name__}: {e}")

    def join(self) -> None:
        for t in self._threads:
            t.join()
        self._threads = []
