"""Hugging Face interop of the optical Llama.

- `torchtitan_ext.hf.export`: torchtitan DCP checkpoint -> complete HF folder (weights, config,
  tokenizer, `optical_transform.yaml`, `optical_ranges.safetensors`, model card).
- `torchtitan_ext.hf.import_hf`: module-name mapping and the state-dict adapter with which
  torchtitan's own `checkpoint.initial_load_in_hf` loads such a folder, ranges included.
- `torchtitan_ext.hf.transform`: `transform_hf_model` makes a transformers `LlamaForCausalLM`
  optical with the same core modules (OpticalLinear / OpticalAttention).
- `torchtitan_ext.hf.callbacks`: keep ranges updating in HF training loops.
- `torchtitan_ext.hf.run_clm`: continual pretraining with the HF Trainer.

Submodules are imported on demand: `torchtitan_ext.titan` imports `import_hf`, which must not pull
in transformers.
"""
