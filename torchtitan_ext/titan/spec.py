"""TrainSpec "optical_llama3": Llama 3 flavors of the reference CLM family, and their parallelize.

The model is torchtitan's own Llama 3; what makes it optical is the "optical_transformer"
converter (listed in `model.converters`). Without the converter the same flavor trains digitally,
which gives every optical run its digital twin for A/B comparisons.

`parallelize_optical_llama` applies torchtitan's Llama parallelisms (TP + sequence parallel,
activation checkpointing, per-block compile, FSDP/HSDP) and then tells every optical module where
its shards sit in the logical computation (see `ShardContext`), so that noise indices are global
and row-wise linears quantize after the reduction. Pipeline and context parallelism are rejected
with an error: range reduction and attention noise indices are not defined across them yet.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from torch import nn
from torch.distributed.tensor import Shard
from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import build_optimizers
from torchtitan.components.tokenizer import build_hf_tokenizer
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.hf_datasets.text_datasets import build_text_dataloader
from torchtitan.models.llama3 import Transformer, TransformerModelArgs, parallelize_llama
from torchtitan.protocols.train_spec import TrainSpec, register_train_spec
from torchtitan.tools.logging import logger

from torchtitan_ext.titan.hf_adapter import OpticalLlama3StateDictAdapter
from torchtitan_ext.optical.modules import OpticalAttention, OpticalLinear

from .activation_checkpoint import optical_ac
from .cpu_compat import has_accelerator, make_fsdp_gloo_compatible
from .validate import build_fixed_window_validator

__all__ = ["OpticalLlamaArgs", "optical_llama3_args", "parallelize_optical_llama", "SPEC_NAME"]

SPEC_NAME = "optical_llama3"
VOCAB_MULTIPLE = 128


@dataclasses.dataclass
class OpticalLlamaArgs(TransformerModelArgs):
    """Llama 3 args whose vocabulary grows to fit the run's tokenizer.

    The flavors are sized for the embedded 8192-token tokenizer; a run with a larger tokenizer
    (e.g. Llama 3's, for a hub dataset) gets an embedding large enough for it, rounded up to a
    multiple of 128, instead of an index error in the first step.
    """

    def update_from_config(self, job_config: JobConfig, **kwargs) -> None:
        super().update_from_config(job_config, **kwargs)
        vocab = _tokenizer_vocab_size(job_config.model.hf_assets_path)
        if vocab is not None and vocab > self.vocab_size:
            padded = -(-vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
            logger.info(f"vocab_size {self.vocab_size} -> {padded} to fit the tokenizer ({vocab})")
            self.vocab_size = padded


def _tokenizer_vocab_size(path: str) -> int | None:
    f = Path(path) / "tokenizer.json"
    if not f.is_file():
        return None
    data = json.loads(f.read_text())
    vocab = data.get("model", {}).get("vocab", {})
    ids = list(vocab.values()) if isinstance(vocab, dict) else []
    ids += [t["id"] for t in data.get("added_tokens", [])]
    return max(ids) + 1 if ids else None


def _clm(dim: int, n_layers: int, n_heads: int, n_kv_heads: int) -> OpticalLlamaArgs:
    # The reference CLM family: SwiGLU sized by multiple_of 128 and ffn multiplier 1.3, RoPE 1e4.
    return OpticalLlamaArgs(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=8192,
        multiple_of=128, ffn_dim_multiplier=1.3, rope_theta=10000,
    )


optical_llama3_args = {
    # Small enough for 20 CPU steps in well under two minutes; head_dim 64 like the family.
    "debugmodel": _clm(256, 4, 4, 2),
    "60M": _clm(384, 22, 6, 2),
    "200M": _clm(768, 24, 12, 4),
    "400M": _clm(960, 30, 15, 5),
    "600M": _clm(1152, 32, 18, 6),
    "1.1B": _clm(1536, 32, 24, 8),
    # Llama 3 8B's shape (its vocabulary too).
    "8B": OpticalLlamaArgs(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
        ffn_dim_multiplier=1.3, rope_theta=500000,
    ),
}


# `parallelism.<key>` that must be 1 for this spec, and why (run.py's preflight refuses them
# before start-up; `check_supported_parallelism` again for trainers that skip it).
UNSUPPORTED_PARALLELISM = {
    "pipeline_parallel_degree": "range reduction assumes every rank holds every optical module",
    "context_parallel_degree": "the optical attention's noise indices assume whole sequences",
}


def check_supported_parallelism(parallel_dims: ParallelDims) -> None:
    enabled = {"pipeline_parallel_degree": parallel_dims.pp_enabled,
               "context_parallel_degree": parallel_dims.cp_enabled}
    for key, why in UNSUPPORTED_PARALLELISM.items():
        if enabled[key]:
            raise ValueError(f"{SPEC_NAME}: parallelism.{key} must be 1 (not supported: {why})")


def parallelize_optical_llama(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig):
    check_supported_parallelism(parallel_dims)
    # per-op SAC alike to the twin's, and optical.ac_save_attention (titan.activation_checkpoint)
    with optical_ac(save_attention=job_config.optical.ac_save_attention):
        model = parallelize_llama(model, parallel_dims, job_config)
    if not has_accelerator():
        make_fsdp_gloo_compatible(model)  # gloo has no PREMUL_SUM (see cpu_compat)
    dp_rank, dp_size = 0, 1
    if parallel_dims.dp_enabled:
        batch_mesh = parallel_dims.get_mesh("batch")
        dp_rank, dp_size = batch_mesh.get_local_rank(), batch_mesh.size()
    tp_rank, tp_size = 0, 1
    if parallel_dims.tp_enabled:
        tp_mesh = parallel_dims.get_mesh("tp")
        tp_rank, tp_size = tp_mesh.get_local_rank(), tp_mesh.size()
    for name, mod in model.named_modules():
        if isinstance(mod, (OpticalLinear, OpticalAttention)):
            mod.shard.dp_rank, mod.shard.dp_size = dp_rank, dp_size
            mod.shard.tp_rank, mod.shard.tp_size = tp_rank, tp_size
        if isinstance(mod, OpticalLinear) and parallel_dims.tp_enabled:
            # torchtitan's Llama plan: wo and w2 are row-wise with sequence-parallel outputs.
            if name.endswith(("attention.wo", "feed_forward.w2")):
                mod.tp_output_placement = Shard(1)
    return model


def get_train_spec() -> TrainSpec:
    return TrainSpec(
        model_cls=Transformer,
        model_args=optical_llama3_args,
        parallelize_fn=parallelize_optical_llama,
        pipelining_fn=None,
        build_optimizers_fn=build_optimizers,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_text_dataloader,
        build_tokenizer_fn=build_hf_tokenizer,
        build_loss_fn=build_cross_entropy_loss,
        build_validator_fn=build_fixed_window_validator,
        # Llama3StateDictAdapter plus the optical range buffers (HF import/export of optical runs)
        state_dict_adapter=OpticalLlama3StateDictAdapter,
    )


register_train_spec(SPEC_NAME, get_train_spec())
