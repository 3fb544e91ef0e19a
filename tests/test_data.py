"""Offline data pipeline: embedded corpus, tokenizer and torchtitan dataset registry.

CPU only, no network: every dataset is read from the repository or tmp_path.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS_DIR = REPO_ROOT / "scripts"

if importlib.util.find_spec("torchtitan_ext") is None:  # plain `pytest` without an install
    sys.path.insert(0, str(REPO_ROOT))

import torchtitan_ext.data as ext_data  # noqa: E402  (registers the datasets)
from torchtitan.components.tokenizer import HuggingFaceTokenizer  # noqa: E402
from torchtitan.hf_datasets.text_datasets import DATASETS, HuggingFaceTextDataset  # noqa: E402

CORPUS_DIR = Path(ext_data.CORPUS_DIR)
TOKENIZER_DIR = Path(ext_data.DEFAULT_TOKENIZER_PATH)
SEQ_LEN = 64
VOCAB_SIZE = 8192
# Real figure of the committed corpus (CPython 3.11.7 stdlib without test
# packages + pydoc text): 5,473,996 train tokens. The ~10M goal is not reached
# without the stdlib test suites (see scripts/build_corpus.py --include-tests).
MIN_TRAIN_TOKENS = 5_400_000
MAX_COMPRESSED_BYTES = 15 * 1024 * 1024


def _load_script(name: str):
    """Import a scripts/*.py file as a module (scripts/ is not a package)."""
    if str(SCRIPTS_DIR) not in sys.path:
        sys.path.insert(0, str(SCRIPTS_DIR))
    return importlib.import_module(name)


def _read_texts(split: str) -> list[str]:
    with gzip.open(CORPUS_DIR / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((CORPUS_DIR / "MANIFEST.json").read_text())


@pytest.fixture(scope="module")
def splits() -> dict[str, list[str]]:
    return {split: _read_texts(split) for split in ("train", "validation")}


@pytest.fixture(scope="module")
def tokenizer() -> HuggingFaceTokenizer:
    return HuggingFaceTokenizer(str(TOKENIZER_DIR))


@pytest.fixture(autouse=True)
def _isolated_datasets_cache(tmp_path_factory, monkeypatch):
    """Keep `datasets`' Arrow caches of test files out of ~/.cache and forbid hub access."""
    import datasets.config

    cache = tmp_path_factory.getbasetemp() / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def _take_samples(name: str, path: str | None, tokenizer, n: int = 2):
    ds = HuggingFaceTextDataset(name, path, tokenizer, seq_len=SEQ_LEN)
    samples = list(islice(iter(ds), n))
    assert len(samples) == n, f"{name} yielded {len(samples)} samples"
    for inputs, labels in samples:
        assert inputs["input"].shape == (SEQ_LEN,) and labels.shape == (SEQ_LEN,)
        # Labels are the inputs shifted by one token.
        assert inputs["input"][1:].tolist() == labels[:-1].tolist()
        assert int(inputs["input"].max()) < VOCAB_SIZE
    return samples


# --------------------------------------------------------------------- corpus


def test_corpus_files_and_manifest(manifest, splits):
    assert manifest["python_version"].count(".") == 2
    total_compressed = 0
    for split, texts in splits.items():
        info = manifest["splits"][split]
        path = CORPUS_DIR / info["file"]
        assert info["documents"] == len(texts)
        assert info["documents_by_kind"] and sum(info["documents_by_kind"].values()) == len(texts)
        assert info["text_bytes"] == sum(len(t.encode("utf-8")) for t in texts)
        assert info["compressed_bytes"] == path.stat().st_size
        assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert info["tokens"] > 0
        total_compressed += info["compressed_bytes"]
        # Every document starts with its id line.
        assert all(t.startswith(("# file: ", "# pydoc: ", "# pydoc topic: ")) for t in texts)
    assert manifest["splits"]["train"]["tokens"] >= MIN_TRAIN_TOKENS
    assert manifest["splits"]["validation"]["documents"] >= 50
    assert total_compressed < MAX_COMPRESSED_BYTES
    assert manifest["total_tokens"] == sum(info["tokens"] for info in manifest["splits"].values())
    tok_sha = hashlib.sha256((TOKENIZER_DIR / "tokenizer.json").read_bytes()).hexdigest()
    assert manifest["tokenizer"]["tokenizer_json_sha256"] == tok_sha, "MANIFEST token counts are stale"


def test_manifest_token_count_matches_torchtitan_encoding(manifest, splits, tokenizer):
    # The validation split is small enough to recount with torchtitan's own encode path.
    counted = sum(len(tokenizer.encode(t, add_bos=True, add_eos=True)) for t in splits["validation"])
    assert counted == manifest["splits"]["validation"]["tokens"]


def _group_of(doc_id: str, file_ids: set[str]) -> str:
    """Split group of a document, mirroring build_corpus (pydoc shares its source file's group)."""
    if doc_id.startswith("# file: "):
        return doc_id[len("# file: ") :]
    if doc_id.startswith("# pydoc topic: "):
        return "pydoc_data/topics.py"
    module = doc_id[len("# pydoc: ") :]
    for candidate in (module.replace(".", "/") + ".py", module.replace(".", "/") + "/__init__.py"):
        if candidate in file_ids:
            return candidate
    return f"builtin:{module}"


def test_split_is_deterministic_and_disjoint(splits):
    build_corpus = _load_script("build_corpus")
    ids = {split: [t.split("\n", 1)[0] for t in texts] for split, texts in splits.items()}
    assert len(set(ids["train"])) == len(ids["train"]) and len(set(ids["validation"])) == len(ids["validation"])
    assert not set(ids["train"]) & set(ids["validation"])

    file_ids = {i[len("# file: ") :] for split_ids in ids.values() for i in split_ids if i.startswith("# file: ")}
    docs = [
        build_corpus.Document(doc_id, _group_of(doc_id, file_ids), "?", text)
        for split, texts in splits.items()
        for doc_id, text in zip(ids[split], texts)
    ]
    groups = {split: {d.group for d in docs if d.doc_id in set(ids[split])} for split in ids}
    # A module's source and its pydoc page never straddle the split.
    assert not groups["train"] & groups["validation"]
    # Re-running the split rule on the same documents (in any input order)
    # reproduces the committed split and order exactly.
    for shuffled in (docs, list(reversed(docs))):
        train, validation = build_corpus.split_documents(shuffled)
        assert [d.doc_id for d in train] == ids["train"]
        assert [d.doc_id for d in validation] == ids["validation"]


def test_corpus_writer_is_byte_reproducible(tmp_path):
    build_corpus = _load_script("build_corpus")
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        # Files only (pydoc rendering is the slow part and has its own determinism guards).
        build_corpus.build(out, tokenizer_dir=None, include_pydoc=False)
        digests.append({f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())})
    assert digests[0] == digests[1]
    with gzip.open(tmp_path / "a" / "train.jsonl.gz", "rb") as f:
        assert f.read(1)  # non-empty, valid gzip


# ------------------------------------------------------------------ tokenizer


def test_tokenizer_loads_in_torchtitan_and_round_trips(tokenizer):
    assert tokenizer.get_vocab_size() == VOCAB_SIZE and VOCAB_SIZE % 128 == 0
    assert tokenizer.bos_token == "<|begin_of_text|>" and tokenizer.eos_token == "<|end_of_text|>"
    assert (tokenizer.bos_id, tokenizer.eos_id) == (0, 1)
    assert tokenizer.token_to_id("<|pad|>") == 2
    # The BPE model adds nothing by itself; torchtitan adds BOS/EOS on request.
    assert not tokenizer.hf_adds_bos and not tokenizer.hf_adds_eos
    text = "# file: x.py\nclass Foo:\n\tdef bar(self):  # naïve → ✓\n        return {'a': [1, 2]}\n"
    ids = tokenizer.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.bos_id not in ids[1:-1] and tokenizer.eos_id not in ids[1:-1]
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>" + text + "<|end_of_text|>"
    # Config default (add_bos_token=true, add_eos_token=false).
    assert tokenizer.encode("x")[0] == tokenizer.bos_id and tokenizer.encode("x")[-1] != tokenizer.eos_id
    # Special-token text in the input is one token, not split into pieces.
    assert tokenizer.encode("<|end_of_text|>", add_bos=False, add_eos=False) == [tokenizer.eos_id]


def test_tokenizer_loads_with_transformers_offline(monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)
    assert len(hf) == VOCAB_SIZE
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    text = "def f(x):\n    return x  ,  y\n"
    ids = hf(text)["input_ids"]
    # clean_up_tokenization_spaces must be off: code spacing survives decode.
    assert hf.decode(ids, skip_special_tokens=True) == text


# ------------------------------------------------------------------- registry


def test_register_datasets_is_idempotent():
    before = {name: DATASETS[name] for name in ext_data.REGISTERED_DATASETS}
    assert ext_data.register_datasets() == ext_data.register_datasets() == ext_data.REGISTERED_DATASETS
    assert {name: DATASETS[name] for name in ext_data.REGISTERED_DATASETS} == before
    assert set(ext_data.REGISTERED_DATASETS) == {
        "optical_stdlib",
        "optical_stdlib_validation",
        "local",
        "fineweb_edu_10bt",
    }
    assert "c4" in DATASETS  # torchtitan's own entries are left alone
    assert ext_data.DEFAULT_DATASET == "optical_stdlib"
    assert (Path(ext_data.DEFAULT_TOKENIZER_PATH) / "tokenizer.json").is_file()


@pytest.mark.parametrize("name", ["optical_stdlib", "optical_stdlib_validation"])
def test_embedded_corpus_through_torchtitan(name, tokenizer, splits):
    (first_input, _), _ = _take_samples(name, None, tokenizer)
    assert first_input["input"][0].item() == tokenizer.bos_id
    split = "train" if name == "optical_stdlib" else "validation"
    # The stream starts with the split's first document.
    expected = splits[split][0]
    decoded = tokenizer.decode(first_input["input"].tolist())
    assert expected.startswith(decoded) or decoded.startswith(expected)


def test_embedded_corpus_path_override(tmp_path, tokenizer):
    # dataset_path may name a corpus file directly.
    src = CORPUS_DIR / "validation.jsonl.gz"
    alt = tmp_path / "mine.jsonl.gz"
    alt.write_bytes(src.read_bytes())
    _take_samples("optical_stdlib", str(alt), tokenizer)
    with pytest.raises(FileNotFoundError, match="build_corpus"):
        ext_data.load_embedded_corpus(str(tmp_path / "empty_dir_missing_train"), split="train")


def _docs(n: int, tag: str) -> list[str]:
    return [f"{tag} document {i}: " + " ".join(f"word{j}" for j in range(60)) + "\n" for i in range(n)]


def test_local_jsonl_parquet_txt(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "meta": 1}) + "\n" for t in _docs(3, "jsonl")))
    parquet = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": _docs(3, "parquet"), "score": [1.0, 2.0, 3.0]}), parquet)
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i, doc in enumerate(_docs(2, "txt")):
        (txt_dir / f"doc{i}.txt").write_text(f"line one of {i}\n" + doc)

    for path, tag in ((jsonl, "jsonl"), (parquet, "parquet"), (txt_dir, "txt")):
        (first, _), _ = _take_samples("local", str(path), tokenizer)
        assert tokenizer.decode(first["input"].tolist()).startswith(("line one" if tag == "txt" else tag))

    # .txt: one document per file, line breaks kept.
    txt = ext_data.load_local_text_files(str(txt_dir))
    assert len(txt) == 2 and txt[0]["text"].startswith("line one of 0\ntxt document 0")
    # Directory of mixed formats (+ an unsupported file that is ignored) and a glob.
    (tmp_path / "notes.csv").write_text("a,b\n")
    everything = ext_data.load_local_text_files(str(tmp_path))
    assert len(everything) == 3 + 3 + 2 and everything.column_names == ["text"]
    assert len(ext_data.load_local_text_files(str(tmp_path / "*.jsonl"))) == 3


def test_local_bad_paths_name_the_config_option(tmp_path, tokenizer):
    (tmp_path / "table.csv").write_text("text\nhello\n")
    for bad in (None, "", str(tmp_path / "missing.jsonl"), str(tmp_path), str(tmp_path / "table.csv")):
        with pytest.raises(ValueError, match=r"training\.dataset_path") as excinfo:
            HuggingFaceTextDataset("local", bad, tokenizer, seq_len=SEQ_LEN)
        assert ".parquet" in str(excinfo.value) and ".jsonl" in str(excinfo.value)
    (tmp_path / "no_text.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match="no 'text' field"):
        ext_data.load_local_text_files(str(tmp_path / "no_text.jsonl"))


def test_fineweb_edu_local_stand_in(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Laid out like the hub repo: the sample-10BT shards live in sample/10BT/.
    shard_dir = tmp_path / "fineweb-edu" / "sample" / "10BT"
    shard_dir.mkdir(parents=True)
    pq.write_table(pa.table({"text": _docs(4, "fineweb"), "id": ["a", "b", "c", "d"]}), shard_dir / "000_00000.parquet")
    other = tmp_path / "fineweb-edu" / "data" / "CC-MAIN-2024-10"
    other.mkdir(parents=True)
    pq.write_table(pa.table({"text": _docs(1, "wrong-config")}), other / "000_00000.parquet")

    (first, _), _ = _take_samples("fineweb_edu_10bt", str(tmp_path / "fineweb-edu"), tokenizer)
    assert tokenizer.decode(first["input"].tolist()).startswith("fineweb document 0")
    # A single parquet file works too; the result is streamed like the hub dataset.
    ds = ext_data.load_fineweb_edu(str(shard_dir / "000_00000.parquet"))
    assert [row["text"] for row in ds] == _docs(4, "fineweb")


def test_fineweb_edu_hub_call(monkeypatch):
    # A hub id (the registered default) goes to the hub with the right config.
    import torchtitan_ext.data.datasets as mod

    calls = []
    monkeypatch.setattr(mod, "load_dataset", lambda *a, **k: calls.append((a, k)) or "sentinel")
    assert DATASETS["fineweb_edu_10bt"].path == "HuggingFaceFW/fineweb-edu"
    assert DATASETS["fineweb_edu_10bt"].loader(DATASETS["fineweb_edu_10bt"].path) == "sentinel"
    assert calls == [(("HuggingFaceFW/fineweb-edu",), {"name": "sample-10BT", "split": "train", "streaming": True})]


def test_every_validation_scores_the_same_tokens(tokenizer):
    """The spec's validator rewinds the validation data before each validation (validate.py)."""
    from torchtitan.components.dataloader import ParallelAwareDataloader
    from torchtitan.protocols.train_spec import get_train_spec

    import torchtitan_ext.titan  # noqa: F401  (registers the spec)
    from torchtitan_ext.titan.validate import build_fixed_window_validator, rewind_validation_data

    assert get_train_spec("optical_llama3").build_validator_fn is build_fixed_window_validator
    ds = HuggingFaceTextDataset("optical_stdlib_validation", None, tokenizer, seq_len=SEQ_LEN,
                                infinite=True)
    loader = ParallelAwareDataloader(ds, dp_rank=0, dp_world_size=1, batch_size=2)

    def one_validation():
        # As torchtitan's validator: a fresh `for` over the loader, stopped after 3 batches.
        return [labels.clone() for _, labels in islice(iter(loader), 3)]

    first = one_validation()
    drifted = one_validation()
    assert not torch.equal(first[0], drifted[0])  # without the rewind the window moves on
    rewind_validation_data(loader)
    again = one_validation()
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_validation_compiles_without_cuda_graphs_and_keeps_the_generators(monkeypatch):
    """With `optical.cuda_graphs` on, the validator's forwards compile without graphs (graph
    trees would let each block's replay overwrite the previous block's output in a no-grad
    forward: cuda_graphs.graphs_off), and the training setting is back afterwards; the random
    generators are left as validation found them."""
    import torch._inductor.config as inductor_config
    from torchtitan.components.validate import Validator

    from torchtitan_ext.titan.validate import FixedWindowValidator

    seen = []

    def validate(self, parts, step):  # what torchtitan's does, as far as this test can see
        seen.append((inductor_config.triton.cudagraphs, step))
        torch.rand(3)  # validation forwards draw noise seeds from the default generator

    monkeypatch.setattr(Validator, "validate", validate)
    before = torch.get_rng_state()
    monkeypatch.setattr(inductor_config.triton, "cudagraphs", True)
    validator = object.__new__(FixedWindowValidator)  # only the loader is read before super()
    validator.validation_dataloader = object()
    validator.validate([], step=7)
    assert seen == [(False, 7)] and inductor_config.triton.cudagraphs is True
    # the generators as validation found them: a resume from this step's checkpoint (written
    # before validation) continues with the same noise
    assert torch.equal(torch.get_rng_state(), before)
