"""Offline default data for torchtitan_ext: embedded corpus, tokenizer, dataset registry.

Importing this package registers the datasets ("optical_stdlib",
"optical_stdlib_validation", "local", "fineweb_edu_10bt") in torchtitan's
``DATASETS`` registry, so a job config can name them directly.
"""

from torchtitan_ext.data.datasets import (
    ASSETS_DIR,
    CORPUS_DIR,
    DEFAULT_DATASET,
    DEFAULT_TOKENIZER_PATH,
    DEFAULT_VALIDATION_DATASET,
    FINEWEB_EDU_CONFIG,
    FINEWEB_EDU_REPO,
    LOCAL_EXTENSIONS,
    load_embedded_corpus,
    load_fineweb_edu,
    load_local_text_files,
    register_datasets,
)

from . import datasets as _datasets  # noqa: E402

REGISTERED_DATASETS = register_datasets()

__all__ = [*_datasets.__all__, "REGISTERED_DATASETS"]
