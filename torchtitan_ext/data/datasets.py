"""Text datasets for torchtitan's registry.

torchtitan's ``HuggingFaceTextDataset`` looks datasets up by name in
``torchtitan.hf_datasets.text_datasets.DATASETS`` and calls
``config.loader(training.dataset_path or config.path)``; each sample is turned
into text by ``config.sample_processor``. This module adds:

``optical_stdlib`` / ``optical_stdlib_validation``
    The embedded offline corpus (``assets/corpus/{train,validation}.jsonl.gz``,
    built by ``scripts/build_corpus.py``). Needs no network. ``dataset_path``
    may point to another directory holding ``<split>.jsonl.gz`` or directly to
    a ``.jsonl[.gz]`` file.
``local``
    Local files given by ``dataset_path``: a file, a directory (searched
    recursively) or a glob, of ``.jsonl``/``.json`` (optionally ``.gz``),
    ``.parquet`` (both need a ``text`` field) or ``.txt`` (one document per
    file). Loaded map-style (cached by ``datasets`` as Arrow once).
``fineweb_edu_10bt``
    ``HuggingFaceFW/fineweb-edu``, config ``sample-10BT``, streamed from the hub
    for users with hub access. If ``dataset_path`` is an existing local path
    (e.g. a mirror of the repo, or a parquet file), it is streamed from disk.

Importing ``torchtitan_ext.data`` calls :func:`register_datasets`.
"""

from __future__ import annotations

import glob
from functools import partial
from pathlib import Path
from typing import Any

from datasets import Value, concatenate_datasets, load_dataset
from torchtitan.hf_datasets import DatasetConfig
from torchtitan.hf_datasets.text_datasets import DATASETS

__all__ = [
    "ASSETS_DIR",
    "CORPUS_DIR",
    "DEFAULT_DATASET",
    "DEFAULT_TOKENIZER_PATH",
    "DEFAULT_VALIDATION_DATASET",
    "FINEWEB_EDU_CONFIG",
    "FINEWEB_EDU_REPO",
    "LOCAL_EXTENSIONS",
    "load_embedded_corpus",
    "load_fineweb_edu",
    "load_local_text_files",
    "register_datasets",
]

# Resolved from this file so it works from a source checkout, an editable
# install and a regular wheel alike (package-data ships data/assets/**).
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
CORPUS_DIR = ASSETS_DIR / "corpus"
DEFAULT_TOKENIZER_PATH = str(ASSETS_DIR / "tokenizer")
DEFAULT_DATASET = "optical_stdlib"
DEFAULT_VALIDATION_DATASET = "optical_stdlib_validation"

FINEWEB_EDU_REPO = "HuggingFaceFW/fineweb-edu"
FINEWEB_EDU_CONFIG = "sample-10BT"
# Where the hub repo keeps that config's parquet shards; used when a local
# mirror of the whole repo is given.
_FINEWEB_EDU_CONFIG_SUBDIR = Path("sample") / "10BT"

# File suffix -> `datasets` packaged builder. No suffix is a suffix of
# another, so at most one matches a file name.
LOCAL_EXTENSIONS: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
    ".txt": "text",
}
TEXT_FIELD = "text"


def _text_field(sample: dict[str, Any]) -> str:
    return sample[TEXT_FIELD]


def _builder_for(path: Path) -> str | None:
    name = path.name.lower()
    for suffix, builder in LOCAL_EXTENSIONS.items():
        if name.endswith(suffix):
            return builder
    return None


def _path_error(dataset: str, path: str | None, problem: str) -> ValueError:
    allowed = ", ".join(LOCAL_EXTENSIONS)
    return ValueError(
        f"Dataset '{dataset}': {problem}. Set training.dataset_path (validation.dataset_path for "
        f"validation) to a file, a directory or a glob of {allowed} files; got {path!r}."
    )


def _resolve_local_files(path: str | None, dataset: str) -> list[Path]:
    """Data files named by a file, directory (recursive) or glob, sorted."""
    if not path:
        raise _path_error(dataset, path, "no path given")
    root = Path(path).expanduser()
    if root.is_dir():
        # Skip hidden entries (.cache/, .git/, ...) below the given directory.
        candidates = [
            f for f in root.rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.relative_to(root).parts)
        ]
    elif root.is_file():
        candidates = [root]
    elif glob.has_magic(str(root)):
        candidates = [Path(f) for f in glob.glob(str(root), recursive=True) if Path(f).is_file()]
    else:
        raise _path_error(dataset, path, "the path does not exist")
    files = sorted((f for f in candidates if _builder_for(f)), key=lambda f: str(f))
    if not files:
        raise _path_error(dataset, path, "no file with a supported extension found there")
    return files


def _load_files(files: list[Path], dataset: str, streaming: bool):
    """Load files grouped by builder and concatenate them into one `text` dataset."""
    by_builder: dict[str, list[str]] = {}
    for f in files:
        by_builder.setdefault(_builder_for(f), []).append(str(f))
    parts = []
    for builder, data_files in sorted(by_builder.items()):
        # .txt: one row per file, line breaks kept, i.e. one document per file.
        extra = {"sample_by": "document", "keep_linebreaks": True} if builder == "text" else {}
        ds = load_dataset(builder, data_files=data_files, split="train", streaming=streaming, **extra)
        # Streaming json has unknown columns until read; then the processor's
        # KeyError on the first sample is the check.
        if ds.column_names is not None:
            if TEXT_FIELD not in ds.column_names:
                raise ValueError(
                    f"Dataset '{dataset}': {builder} files {data_files[:3]}... have no '{TEXT_FIELD}' "
                    f"field (columns: {ds.column_names})"
                )
            ds = ds.select_columns([TEXT_FIELD])
            # Parquet may store large_string; concatenation needs one type.
            if len(by_builder) > 1 and ds.features[TEXT_FIELD] != Value("string"):
                ds = ds.cast_column(TEXT_FIELD, Value("string"))
        parts.append(ds)
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def load_embedded_corpus(path: str, split: str = "train"):
    """The embedded corpus split: ``path`` is a corpus directory or a jsonl(.gz) file."""
    root = Path(path).expanduser()
    data_file = root / f"{split}.jsonl.gz" if root.is_dir() else root
    if not data_file.is_file():
        raise FileNotFoundError(
            f"Embedded corpus file {data_file} not found (training.dataset_path={path!r}); "
            "build it with `python scripts/build_corpus.py`"
        )
    # Map-style: known length and resumable by sample index; the packaged json
    # builder reads the local file only (no hub access).
    return load_dataset("json", data_files=str(data_file), split="train")


def load_local_text_files(path: str | None, dataset: str = "local"):
    """Map-style dataset of the ``text`` of local .jsonl/.json/.parquet/.txt files."""
    return _load_files(_resolve_local_files(path, dataset), dataset, streaming=False)


def _is_local_path(path: str) -> bool:
    p = Path(path).expanduser()
    return p.exists() or (glob.has_magic(path) and bool(glob.glob(str(p), recursive=True)))


def load_fineweb_edu(path: str):
    """FineWeb-Edu sample-10BT, streamed; from disk if ``path`` exists locally.

    A hub id (the default) streams from the Hugging Face hub. An existing local
    path -- a parquet/jsonl file, a glob, a directory of shards, or a mirror of
    the hub repo (its ``sample/10BT`` shards are picked) -- is streamed from
    disk instead, so tests and air-gapped users can stand in for the hub.
    Streaming in both cases keeps the dataset type (and checkpoint state
    format) the same and avoids an Arrow copy of a multi-GB dataset.
    """
    if _is_local_path(path):
        root = Path(path).expanduser()
        if root.is_dir() and (root / _FINEWEB_EDU_CONFIG_SUBDIR).is_dir():
            root = root / _FINEWEB_EDU_CONFIG_SUBDIR
        return _load_files(_resolve_local_files(str(root), "fineweb_edu_10bt"), "fineweb_edu_10bt", streaming=True)
    return load_dataset(path, name=FINEWEB_EDU_CONFIG, split="train", streaming=True)


_REGISTRATIONS: dict[str, DatasetConfig] = {
    DEFAULT_DATASET: DatasetConfig(
        path=str(CORPUS_DIR),
        loader=partial(load_embedded_corpus, split="train"),
        sample_processor=_text_field,
    ),
    DEFAULT_VALIDATION_DATASET: DatasetConfig(
        path=str(CORPUS_DIR),
        loader=partial(load_embedded_corpus, split="validation"),
        sample_processor=_text_field,
    ),
    # No default path: "" makes the loader raise the explanatory ValueError.
    "local": DatasetConfig(
        path="",
        loader=load_local_text_files,
        sample_processor=_text_field,
    ),
    "fineweb_edu_10bt": DatasetConfig(
        path=FINEWEB_EDU_REPO,
        loader=load_fineweb_edu,
        sample_processor=_text_field,
    ),
}


def register_datasets() -> tuple[str, ...]:
    """Add this package's datasets to torchtitan's registry; idempotent.

    Re-registering assigns the same config objects again, so calling it any
    number of times (e.g. once per import path) leaves the registry unchanged.
    Returns the registered names (lower case, as torchtitan looks them up).
    """
    for name, config in _REGISTRATIONS.items():
        DATASETS[name] = config
    return tuple(_REGISTRATIONS)
