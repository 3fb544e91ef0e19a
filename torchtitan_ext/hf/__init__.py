"""Hugging Face interop of the optical Llama.

- `export`: torchtitan DCP checkpoint -> complete HF folder (the CLI), from
  `checkpoint` (reading and checking the DCP state), `names` (transform patterns for transformers'
  module names), `hf_config` (config.json), `model_card` (README.md) and `writer` (the one writer
  of an HF folder: temporary sibling and rename, overwrite rules, stale temporaries).
- `auto`: `OpticalLlamaForCausalLM`, what an export's `auto_map` loads with
  `trust_remote_code=True`; `save`: `save_optical_hf`, a transformed model -> folder.
- `transform`: `transform_hf_model` makes a transformers `LlamaForCausalLM` optical with the same
  core modules (OpticalLinear / OpticalAttention), and the "optical" attention function (padding,
  KV cache).
- `callbacks`: keep ranges updating in HF training loops; `run_clm`: continual pretraining with the
  HF Trainer.

torchtitan's side (module names, the state-dict adapter for `checkpoint.initial_load_in_hf`) is
`torchtitan_ext.titan.hf_adapter`: titan never imports hf/. Submodules are imported on demand.
"""
