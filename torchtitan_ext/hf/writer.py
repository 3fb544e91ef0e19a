"""The one writer of a Hugging Face folder (used by the exporter, `save_optical_hf`/run_clm and
`save_pretrained` of the optical model).

Rules, exactly:

- Everything is first written into a fresh temporary sibling `.NAME.tmp-<pid>-<random>` (mode 755,
  files 644). A new folder is then created by one `rename`: a killed writer leaves no loadable
  half-folder.
- The writer owns these names in the folder ("export files"): `config.json`,
  `generation_config.json`, `model.safetensors`, `model-NNNNN-of-NNNNN.safetensors`,
  `model.safetensors.index.json`, `optical_transform.yaml`, `optical_ranges.safetensors`,
  `configuration_optical_llama.py`, `modeling_optical_llama.py` ("owned"), plus the tokenizer files
  and `README.md`, which it replaces when it writes them but never deletes.
- Into an existing folder it writes file by file: `config.json` is removed first and put back last
  (between the two the folder does not load), each new file replaces its namesake with
  `os.replace`, and every owned file the new model does not have is deleted: saving a digital
  model over an optical export leaves no `optical_transform.yaml`/`optical_ranges.safetensors`/
  modeling code behind, and a re-export with fewer shards leaves no stale shard. Every other entry
  of the folder (a user's eval results, the Trainer's `checkpoint-*`) stays where it is,
  untouched: the writer never moves or deletes anything it does not own.
- `replace="export"` (the exporter): an existing folder is written into only with `overwrite` and
  only if it is recognised as a Hugging Face model folder (it holds `config.json`), or is empty;
  anything else stops with an error before any work. `replace="always"` (`save_pretrained`,
  run_clm's output folder): as transformers' own `save_pretrained`, any folder.
- An optical folder's weights hold one empty marker tensor, `optical_export.needs_trust_remote_code`:
  transformers runs none of this package's code without `trust_remote_code=True`, so this is how
  the digital load says it is digital: transformers' load report (one warning) lists the tensor
  as UNEXPECTED. `OpticalLlamaForCausalLM` ignores it.
- Stale temporaries: before writing, every `.NAME.tmp-<pid>-*` sibling whose process no longer
  runs is removed (those of live writers stay).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from torchtitan_ext.titan.hf_adapter import RANGES_FILE, TOKENIZER_FILES, TRANSFORM_FILE

from .errors import ExportError

__all__ = [
    "HFFolderError",
    "HFFolderContent",
    "CONFIG_MODULE_FILE",
    "MODELING_MODULE_FILE",
    "OPTICAL_FILES",
    "TRUST_MARKER",
    "check_out",
    "write_hf_folder",
    "save_weights",
    "parse_size",
]

CONFIG_MODULE_FILE = "configuration_optical_llama.py"
MODELING_MODULE_FILE = "modeling_optical_llama.py"
OPTICAL_FILES = (TRANSFORM_FILE, RANGES_FILE, CONFIG_MODULE_FILE, MODELING_MODULE_FILE)
_OWNED = ("config.json", "generation_config.json", "model.safetensors",
          "model.safetensors.index.json") + OPTICAL_FILES
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_REPLACE_MODES = ("export", "always")
TRUST_MARKER = "optical_export.needs_trust_remote_code"


class HFFolderError(ExportError):
    """The output folder cannot be written as asked; the message names it and what to do."""


@dataclass
class HFFolderContent:
    """What a folder holds; `write_hf_folder` writes exactly this."""

    weights: dict[str, torch.Tensor]
    config: dict[str, Any]  # config.json
    generation_config: dict[str, Any] | None = None
    tokenizer_dir: str | os.PathLike | None = None  # tokenizer files copied verbatim from here
    tokenizer: Any = None  # else `tokenizer.save_pretrained`
    require_tokenizer: bool = False
    transform_text: str | None = None  # optical_transform.yaml
    ranges: dict[str, torch.Tensor] | None = None  # optical_ranges.safetensors
    ranges_metadata: dict[str, str] = field(default_factory=dict)
    extra_files: dict[str, str] = field(default_factory=dict)  # name -> text (modeling code)
    card: Callable[[list[str]], str] | None = None  # README.md from the list of files
    max_shard_bytes: int = 2 * 10**9


def _is_owned(name: str) -> bool:
    return name in _OWNED or bool(_SHARD_RE.fullmatch(name))


def _remove_stale_temporaries(out: Path) -> None:
    pattern = re.compile(re.escape(f".{out.name}.tmp-") + r"(\d+)-.*")
    if not out.parent.is_dir():
        return
    for p in out.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if not m or not p.is_dir():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # its writer still runs
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            continue  # another user's live process


def check_out(out: str | os.PathLike, *, overwrite: bool, replace: str = "export") -> Path:
    """Check that `out` can be written under the rules above, before any expensive work."""
    if replace not in _REPLACE_MODES:
        raise ValueError(f"replace: must be one of {list(_REPLACE_MODES)}, got {replace!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HFFolderError(f"--out: {str(out)!r} exists and is not a folder")
    if out.is_dir() and replace == "export" and any(out.iterdir()):
        if not overwrite:
            raise HFFolderError(f"--out: {str(out)!r} already exists; pass --overwrite to replace it")
        if not (out / "config.json").is_file():
            raise HFFolderError(
                f"--out: refusing to write into {str(out)!r}: it is not empty and holds no "
                "config.json, so it is not a Hugging Face folder (only those are replaced)")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    target = out if out.is_dir() else parent
    if not target.is_dir():
        raise HFFolderError(f"--out: {str(target)!r} is not a folder")
    if not os.access(target, os.W_OK | os.X_OK):
        raise HFFolderError(f"--out: {str(target)!r} is not writable")
    return out


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '1GiB' or a number of bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise HFFolderError(f"--max-shard-size: cannot read {text!r}; use e.g. 2GB, 500MB or bytes")
    unit = (m.group(2) or "").upper()
    base = 2**10 if "I" in unit else 10**3
    power = "KMGT".find(unit[:1]) + 1 if unit[:1] in ("K", "M", "G", "T") else 0
    return int(float(m.group(1)) * base**power)


def save_weights(weights: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or shards of at most max_shard_bytes plus the index."""
    from safetensors.torch import save_file

    def nbytes(t):
        return t.numel() * t.element_size()

    weights = {k: v.detach().contiguous() for k, v in weights.items()}
    total = sum(nbytes(t) for t in weights.values())
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in weights.items():
        if shards[-1] and size + nbytes(t) > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes(t)
    if len(shards) == 1:
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names + ["model.safetensors.index.json"]


def _write_tokenizer(content: HFFolderContent, folder: Path) -> list[str]:
    copied = []
    src = Path(content.tokenizer_dir) if content.tokenizer_dir is not None else None
    if src is not None and src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, folder / name)
                copied.append(name)
    if not copied and content.tokenizer is not None:
        content.tokenizer.save_pretrained(folder)
        copied = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
    if content.require_tokenizer and not any(
            n in copied for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise HFFolderError(
            f"model.hf_assets_path: {str(src)!r} holds no tokenizer (tokenizer.json, "
            "tokenizer.model or vocab.json); the export needs the run's tokenizer")
    return copied


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _ranges_rows() -> dict[str, str]:
    from torchtitan_ext.optical.modules import OpticalAttention, OpticalLinear

    return {"format": "pt", "rows.OpticalLinear": ",".join(OpticalLinear.RANGE_NAMES),
            "rows.OpticalAttention": ",".join(OpticalAttention.RANGE_NAMES)}


def _write_content(content: HFFolderContent, tmp: Path) -> list[str]:
    from safetensors.torch import save_file

    weights = dict(content.weights)
    if content.transform_text is not None:
        weights[TRUST_MARKER] = torch.zeros(0)
    files = save_weights(weights, tmp, content.max_shard_bytes)
    _write_json(tmp / "config.json", content.config)
    files.append("config.json")
    if content.generation_config is not None:
        _write_json(tmp / "generation_config.json", content.generation_config)
        files.append("generation_config.json")
    files += _write_tokenizer(content, tmp)
    if content.transform_text is not None:
        (tmp / TRANSFORM_FILE).write_text(content.transform_text)
        files.append(TRANSFORM_FILE)
    if content.ranges:
        ranges = {k: v.detach().float().contiguous().cpu() for k, v in content.ranges.items()}
        save_file(ranges, str(tmp / RANGES_FILE), metadata={**_ranges_rows(), **content.ranges_metadata})
        files.append(RANGES_FILE)
    for name, text in content.extra_files.items():
        (tmp / name).write_text(text)
        files.append(name)
    if content.card is not None:
        (tmp / "README.md").write_text(content.card(files + ["README.md"]))
        files.append("README.md")
    return files


def _merge_into(tmp: Path, out: Path) -> None:
    """Move tmp's files into the existing `out` (rules in the module docstring)."""
    new = {p.name for p in tmp.iterdir()}
    (out / "config.json").unlink(missing_ok=True)  # the folder does not load from here ...
    for p in out.iterdir():
        if _is_owned(p.name) and p.name not in new and p.is_file():
            p.unlink()
    for name in sorted(new - {"config.json"}):
        os.replace(tmp / name, out / name)
    os.replace(tmp / "config.json", out / "config.json")  # ... to here
    tmp.rmdir()


def write_hf_folder(out: str | os.PathLike, content: HFFolderContent, *, overwrite: bool = False,
                    replace: str = "export") -> list[str]:
    """Write `content` as the folder `out` under the rules of the module docstring; return the
    names of the files written."""
    out = check_out(out, overwrite=overwrite, replace=replace)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        files = _write_content(content, tmp)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)  # safetensors writes 0600 files
        if out.is_dir():
            _merge_into(tmp, out)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files
