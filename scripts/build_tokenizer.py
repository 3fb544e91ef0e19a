#!/usr/bin/env python
"""Train the project's default byte-level BPE tokenizer on the embedded corpus.

Reads ``torchtitan_ext/data/assets/corpus/train.jsonl.gz`` (build it first with
``scripts/build_corpus.py``) and writes HF-format files to
``torchtitan_ext/data/assets/tokenizer/``:

* ``tokenizer.json``          the ``tokenizers`` model (GPT-2 style byte-level BPE)
* ``tokenizer_config.json``   what torchtitan's ``HuggingFaceTokenizer`` reads to
                              find BOS/EOS, and what ``transformers`` reads to
                              build a ``PreTrainedTokenizerFast``
* ``special_tokens_map.json`` for older ``transformers`` loaders

Design notes (why, not what):

* Byte-level BPE with the full 256-byte initial alphabet: any UTF-8 input is
  encodable, no ``<unk>`` exists, and decode(encode(x)) == x exactly, which
  matters for code (whitespace is significant).
* No normalizer (NFC etc. would change source text) and no BOS/EOS-adding
  post-processor: torchtitan's ``HuggingFaceTokenizer`` adds BOS/EOS itself when
  ``encode(..., add_bos=True, add_eos=True)`` is called, and it detects a
  tokenizer that already adds them by encoding "" -- keeping the BPE model
  "bare" makes ``add_bos``/``add_eos`` mean exactly what they say.
* Special tokens get the first ids (0, 1, 2) and count towards the 8192 vocab
  (a multiple of 128 keeps embedding/output matmuls nicely tiled).
* ``clean_up_tokenization_spaces: false`` so ``transformers`` decoding does not
  "fix" spaces before punctuation, which would corrupt code.

Training is deterministic (single ordered pass over the train split; the BPE
trainer breaks count ties by pair order), so re-running reproduces
``tokenizer.json`` byte for byte; the script prints its SHA-256.

After saving, the tokenizer is checked with torchtitan's ``HuggingFaceTokenizer``
and with ``transformers.AutoTokenizer`` (if installed), and the corpus
MANIFEST.json token counts are (re)computed with it.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Sibling script: token counting / manifest update lives with the corpus builder.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_corpus import DEFAULT_OUT_DIR as DEFAULT_CORPUS_DIR  # noqa: E402
from build_corpus import DEFAULT_TOKENIZER_DIR, update_manifest_token_counts  # noqa: E402

VOCAB_SIZE = 8192
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]  # ids 0, 1, 2 in this order


def iter_train_texts(corpus_dir: Path):
    with gzip.open(corpus_dir / "train.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def train_tokenizer(corpus_dir: Path, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    assert vocab_size % 128 == 0, "keep the vocab a multiple of 128"
    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    tokenizer.normalizer = None
    # GPT-2 regex split + byte-to-unicode mapping; no leading-space insertion
    # so a document's first token is encoded the same as in the corpus.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    # Only fixes offsets; adds no tokens (BOS/EOS are torchtitan's job).
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(iter_train_texts(corpus_dir), trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"trained vocab has {tokenizer.get_vocab_size()} entries, expected {vocab_size}")
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == expected_id, token
    return tokenizer


def _special_token_entry(token: str) -> dict:
    # normalized=False / special=True: torchtitan re-adds these via
    # AddedToken(**entry) and must not treat them as normal text.
    return {"content": token, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False, "special": True}


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # torchtitan's HuggingFaceTokenizer matches these strings to find bos_id / eos_id.
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        # Default for a bare encode(text): prepend BOS, no EOS (Llama-3 convention).
        # torchtitan's dataset always passes add_bos/add_eos explicitly anyway.
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "added_tokens_decoder": {str(i): _special_token_entry(tok) for i, tok in enumerate(SPECIAL_TOKENS)},
    }


def save(tokenizer: Tokenizer, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=True)
    dump = lambda obj: json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"  # noqa: E731
    (out_dir / "tokenizer_config.json").write_text(dump(tokenizer_config()), encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(
        dump({"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}), encoding="utf-8"
    )


def verify(out_dir: Path) -> None:
    """Load the saved files the way training and HF export will."""
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    sample = "# file: demo.py\ndef f(x):\n    return x ** 2  # ünïcode, tabs\t and 🚀\n"
    tt = HuggingFaceTokenizer(str(out_dir))
    assert tt.get_vocab_size() == VOCAB_SIZE, tt.get_vocab_size()
    assert (tt.bos_id, tt.eos_id) == (0, 1), (tt.bos_id, tt.eos_id)
    assert not tt.hf_adds_bos and not tt.hf_adds_eos
    ids = tt.encode(sample, add_bos=True, add_eos=True)
    assert ids[0] == tt.bos_id and ids[-1] == tt.eos_id
    assert tt.decode(ids) == sample, "round trip failed"
    assert tt.decode(ids, skip_special_tokens=False) == BOS_TOKEN + sample + EOS_TOKEN
    print(f"torchtitan HuggingFaceTokenizer: vocab={tt.get_vocab_size()} bos={tt.bos_id} eos={tt.eos_id} ok")

    try:
        import transformers
    except ImportError:
        print("transformers not installed: skipped AutoTokenizer check")
        return
    # Offline: a local directory must never touch the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf = transformers.AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    assert len(hf) == VOCAB_SIZE, len(hf)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    hf_ids = hf(sample)["input_ids"]
    assert hf.decode(hf_ids, skip_special_tokens=True) == sample
    adds_bos = hf_ids[:1] == [hf.bos_token_id]
    print(f"transformers {transformers.__version__} {type(hf).__name__}: vocab={len(hf)} adds_bos={adds_bos} ok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus-dir", type=Path, default=DEFAULT_CORPUS_DIR)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_TOKENIZER_DIR)
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    parser.add_argument("--no-manifest", action="store_true", help="do not update the corpus MANIFEST token counts")
    args = parser.parse_args()

    tokenizer = train_tokenizer(args.corpus_dir, args.vocab_size)
    save(tokenizer, args.out_dir)
    digest = hashlib.sha256((args.out_dir / "tokenizer.json").read_bytes()).hexdigest()
    print(f"saved {args.out_dir} (tokenizer.json sha256={digest})")
    if args.vocab_size == VOCAB_SIZE:
        verify(args.out_dir)
    if not args.no_manifest:
        manifest = update_manifest_token_counts(args.corpus_dir, args.out_dir)
        for split, info in manifest["splits"].items():
            print(f"{split}: {info['tokens']:,} tokens ({info['text_bytes'] / info['tokens']:.2f} bytes/token)")


if __name__ == "__main__":
    main()
