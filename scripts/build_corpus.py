#!/usr/bin/env python
"""Build the embedded, offline default training corpus.

The corpus is made of real text and code that every Python installation ships:

1. ``source``: the ``*.py`` files of the standard library,
2. ``doc``: the few ``*.rst`` / ``*.txt`` documents that live next to them,
3. ``pydoc``: the plain-text ``pydoc`` rendering of every importable stdlib
   module (pure-Python ones plus the public builtin/extension modules).

The stdlib files alone are ~12 MB (~3.2M tokens with our 8k tokenizer), short
of the ~10M-token goal, so (3) is added: natural-language-heavy API
documentation, ~10 MB / ~2.4M tokens more (CPython 3.11: ~5.5M train tokens in
all). The test packages add ~19 MB of real code and lift the train split past
10M tokens (~11M), so they are included (``--no-tests`` leaves them out);
site-packages is not (it differs from machine to machine).

Output (``torchtitan_ext/data/assets/corpus/`` by default)::

    train.jsonl.gz        one {"text": ...} object per line
    validation.jsonl.gz
    MANIFEST.json         counts per split, Python version, split rule, ...

Everything is deterministic for a given Python installation: documents are
split by a salted SHA-256 of their *group key* (the source file's relative
path; a module's pydoc text uses its source file as key so that the code and
its documentation always land in the same split), ordered by a hash of the
document id (a fixed pseudo-random order: torchtitan reads map-style datasets
sequentially without shuffling, so a path-sorted file would feed the model one
package at a time) and gzipped with ``mtime=0`` and no file name in the
header, so re-running the script reproduces the files byte for byte.

Token counts in the manifest need the tokenizer, which itself is trained on
the train split. Run this script first, then ``scripts/build_tokenizer.py``,
which trains the tokenizer and fills in the token counts (this script also
fills them in when a tokenizer already exists).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = REPO_ROOT / "torchtitan_ext" / "data" / "assets"
DEFAULT_OUT_DIR = ASSETS_DIR / "corpus"
DEFAULT_TOKENIZER_DIR = ASSETS_DIR / "tokenizer"

# Changing the salt reshuffles the split; bump it only on purpose.
SPLIT_SALT = "torchtitan-optical/corpus-split/v1"
ORDER_SALT = "torchtitan-optical/corpus-order/v1"
VALIDATION_FRACTION = 0.01
VALIDATION_MIN_DOCS = 50
MAX_FILE_BYTES = 1_000_000

# Directory names skipped anywhere in the stdlib tree. Test packages hold
# intentionally broken/odd files; site-packages is machine specific; the
# config-* directory is build machinery, not library code.
TEST_DIR_NAMES = {"test", "tests", "idle_test"}
EXCLUDED_DIR_NAMES = TEST_DIR_NAMES | {"site-packages", "__pycache__", "lib-dynload"}
EXCLUDED_DIR_PREFIXES = ("config-",)
# Generated per build (holds the build machine's paths), not library code.
EXCLUDED_FILE_PREFIXES = ("_sysconfigdata",)
TEXT_DOC_SUFFIXES = (".rst", ".txt")

# Modules that must not be imported for pydoc: they act on import (open a
# browser, print, start a REPL/GUI) or need a display. Matched on the dotted
# name's components.
PYDOC_SKIP_COMPONENTS = {
    "__main__",
    "antigravity",
    "this",
    "__hello__",
    "__phello__",
    "idlelib",
    "turtledemo",
    "tkinter",
    "turtle",
}
# pydoc_data.topics is one giant dict literal: its source is already in the
# corpus and its pydoc rendering is a single truncated repr line.
PYDOC_SKIP_MODULES = {"pydoc_data.topics"}
# Builtin/extension modules whose pydoc output describes the running process
# (sys: argv, path, modules, ...) or that are CPython test helpers.
PYDOC_SKIP_BUILTINS = {"sys", "xxsubtype", "xxlimited", "xxlimited_35"}


@dataclass(frozen=True)
class Document:
    doc_id: str  # unique id, also the first line of the text
    group: str  # split key: documents sharing a group share a split
    kind: str  # "source" | "doc" | "pydoc"
    text: str


def _sha_int(salt: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}\0{key}".encode()).digest()[:8], "big")


def _is_excluded_dir(name: str, include_tests: bool) -> bool:
    if include_tests and name in TEST_DIR_NAMES:
        return False
    return name in EXCLUDED_DIR_NAMES or name.startswith(EXCLUDED_DIR_PREFIXES)


def iter_stdlib_files(stdlib: Path, suffixes: tuple[str, ...], include_tests: bool = False) -> list[Path]:
    """Relative paths of stdlib files with the given suffixes, sorted."""
    found = []
    for root, dirs, files in os.walk(stdlib):
        # Prune in place so os.walk never descends into excluded trees.
        dirs[:] = sorted(d for d in dirs if not _is_excluded_dir(d, include_tests))
        for name in files:
            if name.endswith(suffixes) and not name.startswith(EXCLUDED_FILE_PREFIXES):
                found.append((Path(root) / name).relative_to(stdlib))
    return sorted(found, key=lambda p: p.as_posix())


def read_text_file(path: Path) -> str | None:
    """File text, or None when too large, not UTF-8 or empty."""
    if path.stat().st_size > MAX_FILE_BYTES:
        return None
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.strip() else None


def collect_file_documents(
    stdlib: Path, suffixes: tuple[str, ...], kind: str, skipped: list[str], include_tests: bool = False
) -> list[Document]:
    docs = []
    for rel in iter_stdlib_files(stdlib, suffixes, include_tests):
        text = read_text_file(stdlib / rel)
        if text is None:
            skipped.append(rel.as_posix())
            continue
        header = f"# file: {rel.as_posix()}"
        docs.append(Document(header, rel.as_posix(), kind, f"{header}\n{text}"))
    return docs


def module_name_for(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def pydoc_targets(stdlib: Path, source_files: list[Path]) -> list[tuple[str, str]]:
    """(module name, split group) pairs to render with pydoc."""
    targets = []
    for rel in source_files:
        name = module_name_for(rel)
        if not name or name in PYDOC_SKIP_MODULES:
            continue
        # Test modules are never imported for pydoc, even with --include-tests:
        # importing test suites has side effects and their docs are noise.
        if PYDOC_SKIP_COMPONENTS.intersection(name.split(".")) or TEST_DIR_NAMES.intersection(rel.parts):
            continue
        targets.append((name, rel.as_posix()))
    # Public builtin and extension modules (math, itertools, zlib, ...) have no
    # .py source but carry real documentation.
    extension_names = set(sys.builtin_module_names)
    dynload = stdlib / "lib-dynload"
    if dynload.is_dir():
        extension_names.update(p.name.split(".")[0] for p in dynload.iterdir() if p.suffix in (".so", ".pyd"))
    for name in sorted(extension_names):
        if name.startswith("_") or name in PYDOC_SKIP_BUILTINS:
            continue
        targets.append((name, f"builtin:{name}"))
    return targets


# Runs in a clean child interpreter; writes JSON lines {"module", "text"|"error"}
# to the file named by argv[1], reading module names from argv[2] (one a line).
# stdout/stderr are swallowed per module because some modules print on import.
_PYDOC_WORKER = r"""
import contextlib, importlib, io, json, pydoc, sys, warnings
warnings.simplefilter("ignore")
out_path, names_path = sys.argv[1], sys.argv[2]
with open(names_path, encoding="utf-8") as f:
    names = [line.strip() for line in f if line.strip()]
with open(out_path, "w", encoding="utf-8") as out:
    for name in names:
        sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                module = importlib.import_module(name)
                text = pydoc.render_doc(module, renderer=pydoc.plaintext)
            record = {"module": name, "text": text}
        except BaseException as exc:  # SystemExit/KeyboardInterrupt from odd modules too
            record = {"module": name, "error": type(exc).__name__}
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
"""


def _path_sanitizer():
    """Replace installation paths in pydoc output with stable placeholders.

    pydoc prints FILE locations and reprs of module constants, which embed the
    interpreter's install prefix (also in truncated form, e.g. "'/opt/py/3.1..."
    because pydoc cuts long reprs). Normalising them keeps the corpus
    independent of where Python is installed and leaks nothing about the host.
    """
    stdlib = sysconfig.get_paths()["stdlib"]
    replacements = [(stdlib, "<stdlib>")]
    for prefix in sorted({sys.prefix, sys.base_prefix, sys.exec_prefix}, key=len, reverse=True):
        replacements.append((prefix, "<prefix>"))
    longest = max((p for p, _ in replacements), key=len)
    # Any leading fragment (>= 6 chars) of an install path followed by pydoc's
    # truncation marker.
    fragments = sorted({longest[:k] for k in range(6, len(longest) + 1)}, key=len, reverse=True)
    truncated = re.compile("(?:" + "|".join(re.escape(f) for f in fragments) + r")\.\.\.")
    # Object addresses / native handles differ on every run
    # ("<object object at 0x7f...>", "<PyDLL 'None', handle 7f...>").
    address = re.compile(r"( at 0x|, handle )[0-9a-fA-F]+")

    def sanitize(text: str) -> str:
        for old, new in replacements:
            text = text.replace(old, new)
        text = truncated.sub("<prefix>...", text)
        return address.sub(r"\1...", text)

    return sanitize


def collect_pydoc_documents(stdlib: Path, source_files: list[Path], failures: list[str]) -> list[Document]:
    targets = pydoc_targets(stdlib, source_files)
    groups = dict(targets)
    # A minimal, fixed environment: no user env vars can leak into reprs
    # (os.environ appears in os/posix docs), hash seed fixed so set reprs are
    # ordered the same on every run, TZ fixed for time.tzname, -S/-s keep
    # site-packages and user site out of the child's sys.path.
    env = {
        "PATH": os.defpath,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TZ": "UTC",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONSAFEPATH": "1",
        "PYTHONIOENCODING": "utf-8",
        "HOME": "/nonexistent",
        "TERM": "dumb",
    }
    with tempfile.TemporaryDirectory() as tmp:
        names_path = Path(tmp) / "names.txt"
        out_path = Path(tmp) / "pydoc.jsonl"
        names_path.write_text("\n".join(name for name, _ in targets) + "\n", encoding="utf-8")
        subprocess.run(
            [sys.executable, "-S", "-s", "-c", _PYDOC_WORKER, str(out_path), str(names_path)],
            env=env,
            cwd=tmp,
            check=True,
            timeout=1800,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        records = [json.loads(line) for line in out_path.read_text(encoding="utf-8").splitlines()]

    sanitize = _path_sanitizer()
    docs = []
    for record in records:
        name = record["module"]
        if "error" in record:
            failures.append(f"{name} ({record['error']})")
            continue
        text = sanitize(record["text"])
        if not text.strip() or len(text.encode()) > MAX_FILE_BYTES:
            failures.append(f"{name} (empty or too large)")
            continue
        header = f"# pydoc: {name}"
        docs.append(Document(header, groups[name], "pydoc", f"{header}\n{text}"))
    return docs


def collect_topic_documents() -> list[Document]:
    """The Language Reference sections that ``help('assert')`` etc. show.

    pydoc_data/topics.py stores them as escaped string literals; rendered as
    plain text they are real prose about the language. They share the split
    of topics.py so the same text never sits in both splits.
    """
    from pydoc_data.topics import topics

    return [
        Document(f"# pydoc topic: {name}", "pydoc_data/topics.py", "doc", f"# pydoc topic: {name}\n{topics[name]}")
        for name in sorted(topics)
        if topics[name].strip()
    ]


def split_documents(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """Deterministic group-wise split.

    Groups are ranked by a salted hash; the lowest-ranked groups go to
    validation until it holds max(VALIDATION_MIN_DOCS, 1% of documents).
    """
    by_group: dict[str, list[Document]] = {}
    for doc in docs:
        by_group.setdefault(doc.group, []).append(doc)
    target = max(VALIDATION_MIN_DOCS, math.ceil(VALIDATION_FRACTION * len(docs)))
    validation_groups = set()
    n_val = 0
    for group in sorted(by_group, key=lambda g: (_sha_int(SPLIT_SALT, g), g)):
        if n_val >= target:
            break
        validation_groups.add(group)
        n_val += len(by_group[group])
    train = [d for d in docs if d.group not in validation_groups]
    validation = [d for d in docs if d.group in validation_groups]
    order = lambda d: (_sha_int(ORDER_SALT, d.doc_id), d.doc_id)  # noqa: E731
    return sorted(train, key=order), sorted(validation, key=order)


def write_jsonl_gz(path: Path, docs: list[Document]) -> None:
    """gzip with mtime=0 and an empty file name: byte-reproducible output."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        for doc in docs:
            gz.write((json.dumps({"text": doc.text}, ensure_ascii=False) + "\n").encode("utf-8"))
    tmp.replace(path)


def read_jsonl_gz_texts(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def count_tokens(texts: list[str], tokenizer_dir: Path) -> int:
    """Tokens as torchtitan's HuggingFaceTextDataset produces them.

    The dataset calls ``encode(text, add_bos=True, add_eos=True)``; our
    tokenizer.json has no post-processor, so that is the raw BPE length plus
    one BOS and one EOS per document.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    total = 0
    for start in range(0, len(texts), 256):
        batch = texts[start : start + 256]
        total += sum(len(enc.ids) + 2 for enc in tok.encode_batch(batch))
    return total


def update_manifest_token_counts(out_dir: Path, tokenizer_dir: Path) -> dict:
    """Fill token counts in MANIFEST.json using the tokenizer in tokenizer_dir."""
    manifest_path = out_dir / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    for split, info in manifest["splits"].items():
        info["tokens"] = count_tokens(read_jsonl_gz_texts(out_dir / info["file"]), tokenizer_dir)
    tok_json = tokenizer_dir / "tokenizer.json"
    manifest["tokenizer"] = {
        "path": os.path.relpath(tokenizer_dir, out_dir),
        "tokenizer_json_sha256": _sha256_file(tok_json),
        "token_count_definition": "per document: BPE tokens + BOS + EOS (as torchtitan's HuggingFaceTextDataset encodes)",
    }
    manifest["total_tokens"] = sum(info["tokens"] for info in manifest["splits"].values())
    _write_json(manifest_path, manifest)
    return manifest


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def build(out_dir: Path, tokenizer_dir: Path | None, include_pydoc: bool = True, include_tests: bool = False) -> dict:
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    skipped_files: list[str] = []
    pydoc_failures: list[str] = []

    source_docs = collect_file_documents(stdlib, (".py",), "source", skipped_files, include_tests)
    text_docs = collect_file_documents(stdlib, TEXT_DOC_SUFFIXES, "doc", skipped_files, include_tests)
    pydoc_docs: list[Document] = []
    if include_pydoc:
        # Only modules whose source made it into the corpus get a pydoc page,
        # so every pydoc document has a source file to share its split with.
        source_files = [Path(d.group) for d in source_docs]
        pydoc_docs = collect_topic_documents() + collect_pydoc_documents(stdlib, source_files, pydoc_failures)

    docs = source_docs + text_docs + pydoc_docs
    ids = [d.doc_id for d in docs]
    assert len(ids) == len(set(ids)), "document ids must be unique"
    train, validation = split_documents(docs)

    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, split_docs in (("train", train), ("validation", validation)):
        path = out_dir / f"{split}.jsonl.gz"
        write_jsonl_gz(path, split_docs)
        kinds: dict[str, int] = {}
        for d in split_docs:
            kinds[d.kind] = kinds.get(d.kind, 0) + 1
        splits[split] = {
            "file": path.name,
            "documents": len(split_docs),
            "documents_by_kind": kinds,
            "text_bytes": sum(len(d.text.encode("utf-8")) for d in split_docs),
            "compressed_bytes": path.stat().st_size,
            "sha256": _sha256_file(path),
            "tokens": None,
        }

    manifest = {
        "description": "Offline default corpus: CPython standard library sources, bundled docs and pydoc text.",
        "builder": "scripts/build_corpus.py",
        "python_version": ".".join(map(str, sys.version_info[:3])),
        "python_implementation": sys.implementation.name,
        "platform": sysconfig.get_platform(),
        "sources": {
            "source": "stdlib *.py files",
            "doc": f"stdlib {', '.join(TEXT_DOC_SUFFIXES)} files",
            "pydoc": "pydoc plaintext of importable stdlib modules (+ pydoc_data topics as 'doc')"
            if include_pydoc
            else "disabled",
        },
        "include_tests": include_tests,
        "excluded_dirs": sorted(EXCLUDED_DIR_NAMES - (TEST_DIR_NAMES if include_tests else set()))
        + [p + "*" for p in EXCLUDED_DIR_PREFIXES],
        "max_file_bytes": MAX_FILE_BYTES,
        "skipped_files": skipped_files,
        "skipped_files_rule": "empty, larger than max_file_bytes, or not valid UTF-8",
        "pydoc_failures": pydoc_failures,
        "split_rule": (
            f"groups (source path; pydoc uses its module's source path) ranked by sha256('{SPLIT_SALT}\\0'+group); "
            f"lowest go to validation until it has max({VALIDATION_MIN_DOCS}, ceil({VALIDATION_FRACTION}*docs)) documents"
        ),
        "order_rule": f"within a split, sorted by sha256('{ORDER_SALT}\\0'+first line of text)",
        "splits": splits,
        "total_tokens": None,
        "tokenizer": None,
    }
    _write_json(out_dir / "MANIFEST.json", manifest)
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").exists():
        manifest = update_manifest_token_counts(out_dir, tokenizer_dir)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument(
        "--tokenizer-dir",
        type=Path,
        default=DEFAULT_TOKENIZER_DIR,
        help="tokenizer used for the manifest's token counts (skipped if it does not exist yet)",
    )
    parser.add_argument("--no-pydoc", action="store_true", help="only stdlib files, no pydoc text")
    parser.add_argument(
        "--no-tests",
        action="store_true",
        help="leave out the stdlib test packages' *.py files (~19 MB of code; the committed corpus "
        "includes them, which is what lifts it past 10M train tokens)",
    )
    args = parser.parse_args()
    manifest = build(args.out_dir, args.tokenizer_dir, include_pydoc=not args.no_pydoc, include_tests=not args.no_tests)
    for split, info in manifest["splits"].items():
        print(
            f"{split}: {info['documents']} docs {info['documents_by_kind']}, "
            f"{info['text_bytes'] / 1e6:.1f} MB text, {info['compressed_bytes'] / 1e6:.1f} MB gz, tokens={info['tokens']}"
        )
    if manifest["pydoc_failures"]:
        print(f"pydoc skipped {len(manifest['pydoc_failures'])} modules: {', '.join(manifest['pydoc_failures'])}")


if __name__ == "__main__":
    main()
