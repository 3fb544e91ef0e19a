"""Continual pretraining of an exported (optical) Llama with the Hugging Face Trainer.

    python -m torchtitan_ext.hf.run_clm --model_name_or_path exports/debug_model \\
        --dataset_name optical_stdlib --output_dir outputs/hf_continue --max_steps 100 \\
        --per_device_train_batch_size 4 --block_size 256 --learning_rate 2e-4

The flags are those of transformers' `run_clm.py` (every `TrainingArguments` flag works, e.g.
`--bf16`, `--seed`, `--logging_steps`, `--save_steps`, `--gradient_accumulation_steps`) plus:

- `--dataset_name`: a dataset registered in `torchtitan_ext.data` (`optical_stdlib`, `local`,
  `fineweb_edu_10bt`), with `--dataset_path` as its `training.dataset_path`; or `--train_file`
  (and `--validation_file`): .jsonl/.json(.gz), .parquet (field `text`) or .txt, a file, folder or
  glob. Nothing is downloaded unless a hub dataset is named.
- `--transform_config`: which modules are optical (transformers' module names); default: the
  model folder's `optical_transform.yaml` if present, `none` = digital.
- `--ranges`: the calibrated ranges; default: the folder's `optical_ranges.safetensors` if
  present, `none` = calibrate from scratch.

Documents are tokenized with the folder's tokenizer, wrapped in BOS/EOS as torchtitan's text
datasets do, concatenated and cut into blocks of `--block_size` tokens (the remainder is dropped;
default: the training context the folder records, `training_seq_len`, else
min(1024, max_position_embeddings)). Ranges are updated after every optimizer step
(`OpticalRangesCallback`). The model is loaded through the optical auto class
(`torchtitan_ext.hf.auto`), so the output folder and the Trainer's `checkpoint-N` folders are
written by the one writer: export-style folders again (weights, config with `training_seq_len` =
the block size, `optical_transform.yaml`, `optical_ranges.safetensors`), usable by this script,
by `from_pretrained(..., trust_remote_code=True)` and by torchtitan's HF import; the output folder
also holds the tokenizer, `log_history.json` and `all_results.json`.
"""

import json
import logging
import math
import sys
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Optional

logger = logging.getLogger("torchtitan_ext.hf.run_clm")

NONE = "none"


def _arg(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "A local Hugging Face folder (e.g. written by torchtitan_ext.hf.export)."}
    )
    tokenizer_name: Optional[str] = _arg(None, "Tokenizer folder (default: --model_name_or_path).")
    transform_config: Optional[str] = _arg(
        None, "Transform file with transformers' module names (default: the model "
              "folder's optical_transform.yaml if present; 'none': digital).")
    ranges: Optional[str] = _arg(
        None, "optical_ranges.safetensors to start from (default: the model folder's, "
              "if present; 'none': uninitialised, the first step calibrates).")
    kernels: str = _arg(
        "auto", "Optical kernels: auto (Triton on GPUs, reference on CPU), triton, reference.")
    sync_ranges: bool = _arg(True, "Reduce observed ranges across ranks after every step.")
    torch_dtype: str = _arg(
        "float32", "Parameter dtype: float32 (use --bf16 for bf16 compute), bfloat16, auto.")


@dataclass
class DataArguments:
    dataset_name: Optional[str] = _arg(
        None, "A dataset registered in torchtitan_ext.data: optical_stdlib, local, "
              "fineweb_edu_10bt (the last needs the hub or --dataset_path).")
    dataset_path: Optional[str] = _arg(None, "Path for --dataset_name (as training.dataset_path).")
    validation_dataset_name: Optional[str] = _arg(
        None, "Registered validation dataset (default with optical_stdlib: "
              "optical_stdlib_validation when --do_eval).")
    train_file: Optional[str] = _arg(
        None, "Training text: .jsonl/.json(.gz)/.parquet/.txt, folder or glob.")
    validation_file: Optional[str] = _arg(None, "Validation text, as --train_file.")
    text_column: str = _arg("text", "Field holding the text.")
    block_size: Optional[int] = _arg(
        None, "Tokens per training block (default: the folder's recorded training_seq_len, "
              "else min(1024, max_position_embeddings)).")
    max_train_samples: Optional[int] = _arg(None, "Use only the first N training documents.")
    max_eval_samples: Optional[int] = _arg(None, "Use only the first N validation documents.")
    preprocessing_num_workers: Optional[int] = _arg(
        None, "Processes for tokenization (map-style datasets).")


def _registered(name: str, path: Optional[str]):
    import torchtitan_ext.data  # noqa: F401  (registers the datasets)
    from torchtitan.hf_datasets.text_datasets import DATASETS

    key = name.lower()
    if key not in DATASETS:
        raise ValueError(f"--dataset_name: {name!r} is not registered; known: {sorted(DATASETS)}")
    cfg = DATASETS[key]
    ds = cfg.loader(path or cfg.path)
    return ds, cfg.sample_processor


def _limit(ds, n: Optional[int]):
    if n is None:
        return ds
    if hasattr(ds, "select") and hasattr(ds, "__len__"):
        return ds.select(range(min(n, len(ds))))
    return ds.take(n)


def load_texts(data_args: DataArguments, split: str):
    """A datasets (Iterable)Dataset with one column `text`, or None."""
    from torchtitan_ext.data import load_local_text_files

    if split == "train":
        if data_args.train_file:
            ds, proc = load_local_text_files(data_args.train_file, "--train_file"), None
        elif data_args.dataset_name:
            ds, proc = _registered(data_args.dataset_name, data_args.dataset_path)
        else:
            raise ValueError("give --dataset_name or --train_file")
        limit = data_args.max_train_samples
    else:
        if data_args.validation_file:
            ds, proc = load_local_text_files(data_args.validation_file, "--validation_file"), None
        elif data_args.validation_dataset_name:
            ds, proc = _registered(data_args.validation_dataset_name, None)
        else:
            return None
        limit = data_args.max_eval_samples
    ds = _limit(ds, limit)
    column = data_args.text_column
    if proc is not None or column != "text":
        fn = proc or (lambda sample: sample[column])
        ds = ds.map(lambda s: {"text": fn(s)})
    cols = getattr(ds, "column_names", None)
    if cols:
        ds = ds.select_columns(["text"])
    return ds


def tokenize_and_group(ds, tokenizer, block_size: int, num_proc: Optional[int] = None):
    """BOS + tokens + EOS per document (as torchtitan), concatenated, cut into blocks."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [([bos] if bos is not None else []) + x + ([eos] if eos is not None else [])
                              for x in ids]}

    def group(batch):
        flat = list(chain.from_iterable(batch["input_ids"]))
        n = (len(flat) // block_size) * block_size
        blocks = [flat[i:i + block_size] for i in range(0, n, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    kwargs = {"num_proc": num_proc} if num_proc and hasattr(ds, "__len__") else {}
    ds = ds.map(tokenize, batched=True, remove_columns=["text"], **kwargs)
    # Big map batches: few dropped remainders.
    return ds.map(group, batched=True, batch_size=1000, **kwargs)


def _given(value: Optional[str]):
    """A --transform_config / --ranges value as the optical auto class's keyword."""
    from .auto import FROM_FOLDER

    if value is None:
        return FROM_FOLDER
    return None if value.lower() == NONE else value


def _load_model(model_args):
    """The model, its tokenizer and its transform file (None: digital). The model comes through
    the optical auto class (`torchtitan_ext.hf.auto`), made optical by the folder's or the given
    transform file, with the folder's or the given ranges; its `save_pretrained` (the Trainer's
    checkpoint-N folders) is the one writer's, so every checkpoint loads as the optical model."""
    import torch
    from transformers import AutoTokenizer

    from torchtitan_ext.optical.ops import set_kernel_mode
    from torchtitan_ext.titan.hf_adapter import TRANSFORM_FILE

    from .auto import FROM_FOLDER, OpticalLlamaForCausalLM, folder_file
    from .transform import format_hf_histogram

    folder = model_args.model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or folder)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}[model_args.torch_dtype]
    set_kernel_mode(model_args.kernels)
    transform = _given(model_args.transform_config)
    if transform == FROM_FOLDER:
        transform = folder_file(folder, TRANSFORM_FILE)
    model = OpticalLlamaForCausalLM.from_pretrained(
        folder, dtype=dtype, optical_transform=transform, optical_ranges=_given(model_args.ranges))
    model.optical_tokenizer_dir = model_args.tokenizer_name or folder  # in checkpoint-N too
    if model.optical_report is not None:
        logger.info("\n" + format_hf_histogram(model.optical_report))
    else:
        logger.info("no transform config: training digitally")
    return model, tokenizer, transform


def block_size_of(data_args, config) -> int:
    """--block_size, else the training context the folder records (`training_seq_len`), else
    transformers' run_clm default min(1024, max_position_embeddings)."""
    from .hf_config import training_seq_len_of

    if data_args.block_size is not None:
        if data_args.block_size < 1:
            raise ValueError(f"--block_size: must be an integer >= 1, got {data_args.block_size}")
        return data_args.block_size
    return training_seq_len_of(config) or min(1024, config.max_position_embeddings)


def _datasets(data_args, training_args, tokenizer, block_size: int):
    train_ds = eval_ds = None
    if training_args.do_train or not training_args.do_eval:
        train_ds = tokenize_and_group(load_texts(data_args, "train"), tokenizer, block_size,
                                      data_args.preprocessing_num_workers)
    if data_args.validation_dataset_name is None and data_args.dataset_name == "optical_stdlib" \
            and training_args.do_eval and not data_args.validation_file:
        data_args.validation_dataset_name = "optical_stdlib_validation"
    raw_eval = load_texts(data_args, "validation")
    if raw_eval is not None:
        eval_ds = tokenize_and_group(raw_eval, tokenizer, block_size, data_args.preprocessing_num_workers)
    if train_ds is not None and hasattr(train_ds, "__len__") and len(train_ds) == 0:
        raise ValueError(f"the training data holds fewer than --block_size={block_size} tokens")
    return train_ds, eval_ds


def _train_and_evaluate(trainer, training_args, train_ds, eval_ds) -> dict:
    results: dict = {}
    if train_ds is not None:
        out = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        results.update(out.metrics)
    if eval_ds is not None:
        metrics = trainer.evaluate()
        if "eval_loss" in metrics:
            metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        results.update(metrics)
    return results


def main(argv: Optional[list] = None) -> dict:
    from transformers import (HfArgumentParser, Trainer, TrainingArguments, default_data_collator,
                              set_seed)

    from .callbacks import OpticalRangesCallback
    from .hf_config import TRAINING_SEQ_LEN
    from .save import save_optical_hf

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    args = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=args)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        level=logging.INFO if training_args.should_log else logging.WARN)
    set_seed(training_args.seed)
    model, tokenizer, transform_path = _load_model(model_args)
    block_size = block_size_of(data_args, model.config)
    train_ds, eval_ds = _datasets(data_args, training_args, tokenizer, block_size)
    if train_ds is not None:  # what the saved folders' weights are trained at from now on
        setattr(model.config, TRAINING_SEQ_LEN, block_size)
    optical = model.optical_report is not None
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=default_data_collator,
        callbacks=[OpticalRangesCallback(sync=model_args.sync_ranges)] if optical else None,
    )
    results = _train_and_evaluate(trainer, training_args, train_ds, eval_ds)
    if trainer.is_world_process_zero():
        out_dir = Path(training_args.output_dir)
        save_optical_hf(model, out_dir, transform_config=transform_path, tokenizer=tokenizer,
                        tokenizer_dir=model_args.tokenizer_name or model_args.model_name_or_path)
        (out_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
        (out_dir / "all_results.json").write_text(json.dumps(results, indent=2))
        logger.info(f"saved to {out_dir}")
    return {"results": results, "log_history": trainer.state.log_history}

if __name__ == "__main__":
    main()
