"""The README.md model card of an export."""

from __future__ import annotations

from torchtitan_ext.titan.hf_adapter import RANGES_FILE, TRANSFORM_FILE

__all__ = ["model_card"]


def _header(ck, hf_config, dtype_name: str) -> list[str]:
    job = ck.job_config
    step = f" (step {ck.step})" if ck.step is not None else ""
    kind = (", with its linear layers and attention simulated as an optical matrix multiplier "
            "(quantized intensities, modulator floor, noisy read-out)." if ck.optical
            else " (digital run).")
    return [
        "---", "library_name: transformers", "pipeline_tag: text-generation",
        "tags: [llama, torchtitan, optical-computing, torchtitan-optical]", "---", "",
        f"# {job.model.name} / {job.model.flavor}{step}", "",
        "A Llama model trained with [torchtitan](https://github.com/pytorch/torchtitan) and the "
        "torchtitan-optical extension" + kind, "",
        f"- exported from `{ck.path}` with config `{getattr(job.job, 'config_file', '')}`",
        f"- {hf_config.num_hidden_layers} layers, hidden {hf_config.hidden_size}, "
        f"{hf_config.num_attention_heads} heads ({hf_config.num_key_value_heads} kv), "
        f"ffn {hf_config.intermediate_size}, vocab {hf_config.vocab_size}; weights in {dtype_name}",
        f"- trained with sequence length {job.training.seq_len} on `{job.training.dataset}`",
    ]


def _use(optical: bool) -> list[str]:
    lines = ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer"]
    if optical:
        lines += [
            "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)  # optical",
            "model = AutoModelForCausalLM.from_pretrained(PATH)  # digital Llama",
            "tokenizer = AutoTokenizer.from_pretrained(PATH)", "```", "",
            "With `trust_remote_code=True` (needs `pip install torchtitan-optical[hf]`; the folder's "
            "two `.py` files only import it) the model is the optical model it was trained as: the "
            "same modules, ranges and noise as in torchtitan. "
            "`optical_transform=OTHER.yaml` picks another transform, `optical_transform=None` the "
            "digital model.", "",
            f"`{TRANSFORM_FILE}` says which modules are optical (transformers' module names); "
            f"`{RANGES_FILE}` holds their calibrated `[lo, hi]` ranges (rows: linear x, w, out; "
            "attention q, k, v, s, y).",
        ]
    else:
        lines += ["model = AutoModelForCausalLM.from_pretrained(PATH)",
                  "tokenizer = AutoTokenizer.from_pretrained(PATH)", "```"]
    return lines


def _energy(ck) -> list[str]:
    """The energy-per-token table of an optical export (torchtitan_ext.optical.energy) at the
    training sequence length; any failure gives a line saying why, never a failed export."""
    if not ck.optical:
        return []
    from torchtitan_ext.optical.energy import energy_markdown

    try:
        return ["", energy_markdown(ck.args, ck.transform, ck.job_config.training.seq_len)]
    except Exception as e:  # an estimate must never stop an export
        return ["", "## Energy per token (estimate)", "",
                f"Not estimated: {type(e).__name__}: {e}"]


def model_card(ck, hf_config, files: list[str], histogram: str | None, notes: list[str],
               dtype_name: str, transform_change: list[tuple] | None = None) -> str:
    """The card: what the model is, how to load it, its transform histogram, its energy per
    token (optical exports), how to continue."""
    lines = _header(ck, hf_config, dtype_name) + _use(ck.optical)
    if transform_change:
        lines += ["", "## Transform changed at export", "",
                  "The checkpoint was trained with another transform than the one exported "
                  "(`--optical.allow_transform_change`): module, key, checkpoint value, exported value:",
                  ""] + [f"- `{m}` {k}: checkpoint {a!r}, exported {b!r}" for m, k, a, b in transform_change]
    if histogram:
        lines += ["", "```", histogram, "```"]
    if notes:
        lines += [""] + [f"- note: {n}" for n in notes]
    lines += _energy(ck)
    lines += [
        "", "## Continue pretraining", "",
        "- Hugging Face Trainer: `python -m torchtitan_ext.hf.run_clm --model_name_or_path PATH "
        "--dataset_name optical_stdlib --output_dir OUT --max_steps N`",
        "- torchtitan: `torchrun --nproc_per_node=1 run.py --job.config_file CONFIG.toml "
        "--model.hf_assets_path PATH --checkpoint.enable --checkpoint.initial_load_path PATH "
        "--checkpoint.initial_load_in_hf`",
        "", "Files: " + ", ".join(f"`{f}`" for f in files), "",
    ]
    return "\n".join(lines)
