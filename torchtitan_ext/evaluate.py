"""Validation loss of a trained model under a grid of inference-time optical settings.

    python -m torchtitan_ext.evaluate --config train_configs/debug_model.toml \
        --checkpoint outputs/debug_model/checkpoint/step-20 \
        --levels 256,64,16 --lut 0.02004,none --seeds 0,1,2 --digital --out outputs/eval

or `--hf-folder exports/debug_model` for an export folder. Each grid point replaces the given keys
of every optical module's settings (the trained ranges are kept), runs the validation tokens
once per noise seed (by default 64 windows of the model's training context, spread evenly over
the embedded validation split), and reports the mean loss, its spread over seeds, perplexity
and the energy per token (torchtitan_ext.optical.energy). Writes eval.json, eval.md and, with
matplotlib (extra `report`), loss_vs_levels.png / loss_vs_photons.png.

Grid keys are the transform file's per-layer keys (`QuantizerConfig`); options for keys this
tree's transform config does not have (q_readout, q_photons_per_mac, per-quantizer levels) are
rejected with an error rather than ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from torchtitan_ext.optical.config import (
    ATTENTION_LEVEL_KEYS,
    LINEAR_LEVEL_KEYS,
    OpticalConfigError,
    QuantizerConfig,
    TransformConfig,
)
from torchtitan_ext.optical.energy import (
    HardwareProfile,
    ModelDims,
    estimate_energy,
    load_hardware_profile,
)

__all__ = ["LoadedModel", "load_model_for_eval", "GridPoint", "build_grid", "apply_point",
           "evaluate_grid", "write_reports", "main"]

# Named options -> transform-file keys. Each is accepted only if QuantizerConfig has the key.
FLAG_KEYS = {
    "levels": "q_levels",
    "lut": "q_lut_min",
    "q_noise": "q_noise",
    "readout": "q_readout",
    "photons": "q_photons_per_mac",
}


class EvalError(ValueError):
    """A bad evaluation request: the message names the option and the allowed values."""


# ------------------------------------------------------------------------------------------------
# The one adapter to the loading code (titan/model.py, hf/checkpoint.py, hf/auto.py).


@dataclass
class LoadedModel:
    """A model ready to evaluate: `forward(tokens [B, T]) -> logits [B, T, V]`."""

    model: torch.nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    dims: ModelDims  # with seq_len = the evaluation's
    transform: TransformConfig | None  # as trained; None = digital
    naming: str  # "titan" or "hf": how `transform` names modules
    tokenizer_path: str


def load_model_for_eval(*, config: str | None = None, checkpoint: str | None = None,
                        hf_folder: str | None = None, seq_len: int | None = None,
                        device: str | torch.device = "cpu") -> LoadedModel:
    """Load a torchtitan checkpoint (`config` TOML + `checkpoint` DCP folder) or an export folder
    (`hf_folder`) with its trained ranges, in eval mode on `device`. `dims.seq_len` is `seq_len`,
    or (None) the training context: the run's training.seq_len, or the `training_seq_len` the
    export recorded in config.json (a folder without it needs `seq_len`: EvalError).

    The only place that calls the loading functions of torchtitan_ext.hf and .titan."""
    if hf_folder is not None:
        return _load_export_folder(Path(hf_folder), seq_len, device)
    if config is None or checkpoint is None:
        raise EvalError("give either --hf-folder, or both --config and --checkpoint")
    from torchtitan_ext.hf.checkpoint import load_titan_checkpoint
    from torchtitan_ext.titan.model import build_titan_model

    ck = load_titan_checkpoint(config, checkpoint)
    built = build_titan_model(ck.job_config, device="cpu", optical=ck.optical,
                              transform=ck.transform)
    model = built.model
    model.load_state_dict(ck.state_dict, strict=True)
    model.to(device).eval()
    dims = ModelDims.from_titan_args(built.args, seq_len or ck.job_config.training.seq_len)
    return LoadedModel(model, model, dims, built.transform, "titan",
                       ck.job_config.model.hf_assets_path)


def _load_export_folder(folder: Path, seq_len: int, device) -> LoadedModel:
    """An export folder through the project's loading path (`torchtitan_ext.hf.auto`): the optical
    model with the folder's transform and trained ranges, or the digital Llama."""
    from transformers import AutoModelForCausalLM

    from torchtitan_ext.hf.transform import transform_config_of_model

    if not (folder / "config.json").is_file():
        raise EvalError(f"--hf-folder: {str(folder)!r} is not an export folder (no config.json)")
    seq_len = seq_len or _recorded_seq_len(folder)  # before the (long) load
    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True,
                                                 torch_dtype=torch.float32)
    model.to(device).eval()
    dims = ModelDims.from_hf_config(model.config, seq_len)
    return LoadedModel(model, lambda t: model(input_ids=t).logits, dims,
                       transform_config_of_model(model), "hf", str(folder))


def _recorded_seq_len(folder: Path) -> int:
    """The training context an export recorded in config.json (not max_position_embeddings: the
    RoPE's reach, 131072 for Llama 3.1 flavors, far beyond what the model was trained at)."""
    from torchtitan_ext.hf.hf_config import TRAINING_SEQ_LEN, training_seq_len_of

    try:
        recorded = training_seq_len_of(json.loads((folder / "config.json").read_text()))
    except ValueError as e:
        raise EvalError(f"--hf-folder {str(folder)!r}: {e}; give --seq-len") from e
    if recorded is None:
        raise EvalError(
            f"--seq-len: {str(folder)!r} records no training context (config.json has no "
            f"{TRAINING_SEQ_LEN!r}: exported before it was recorded, or not by "
            "torchtitan_ext.hf.export); give --seq-len N (the run's training.seq_len), or "
            "re-export the checkpoint")
    return recorded


# ------------------------------------------------------------------------------------------------
# The grid


@dataclass(frozen=True)
class GridPoint:
    """One inference-time setting: transform-file keys to replace, or the digital model."""

    overrides: tuple[tuple[str, Any], ...] = ()
    digital: bool = False

    @property
    def label(self) -> str:
        if self.digital:
            return "digital"
        return ", ".join(f"{k}={v}" for k, v in self.overrides) or "as trained"

    def as_dict(self) -> dict[str, Any]:
        return dict(self.overrides)


def _quantizer_keys() -> list[str]:
    return sorted(f.name for f in dataclasses.fields(QuantizerConfig))


def _parse_values(option: str, text: str) -> list[Any]:
    import yaml

    values = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise EvalError(f"{option}: empty value in {text!r}; give comma-separated values")
        values.append(None if item.lower() == "none" else yaml.safe_load(item))
    return values


def build_grid(axes: dict[str, str], digital: bool = False) -> list[GridPoint]:
    """Cartesian product of `axes` ({option: "v1,v2"}, option = a FLAG_KEYS name or `--set`'s
    transform key); each value is validated as the transform file would validate it."""
    keyed: list[tuple[str, list[Any]]] = []
    allowed = _quantizer_keys()
    for option, text in axes.items():
        key = FLAG_KEYS.get(option, option)
        flag = f"--{option.replace('_', '-')}" if option in FLAG_KEYS else f"--set {option}"
        if key not in allowed:
            raise EvalError(
                f"{flag}: the transform config of this tree has no key {key!r}, so it cannot be "
                f"set at inference; allowed keys: {allowed}"
            )
        keyed.append((key, _parse_values(flag, text)))
    points = [GridPoint(tuple(zip([k for k, _ in keyed], combo)))
              for combo in itertools.product(*[v for _, v in keyed])]
    for point in points:
        # Whole points, not single values: some keys only make sense together
        # (q_readout 'shot' needs q_photons_per_mac, which 'rounding' refuses).
        try:
            QuantizerConfig.from_dict(point.as_dict(), where=f"grid point ({point.label})")
        except OpticalConfigError as e:
            raise EvalError(str(e)) from e
    return points + ([GridPoint(digital=True)] if digital else [])


def _optical_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from torchtitan_ext.optical.modules import OpticalAttention, OpticalLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, (OpticalLinear, OpticalAttention))}


def apply_point(model: torch.nn.Module, point: GridPoint,
                trained: dict[str, QuantizerConfig]) -> None:
    """Set every optical module's settings to its trained ones with `point`'s keys replaced
    (digital: computed digitally, q_bypass). Range buffers are not touched."""
    modules = _optical_modules(model)
    _check_point_reaches_modules(point, modules)
    for name, mod in modules.items():
        base = trained[name]
        values = {"q_bypass": True} if point.digital else _values_for(mod, point)
        merged = {**base.to_dict(), **values}
        mod.config = QuantizerConfig.from_dict(merged, where=name)


def _values_for(mod: torch.nn.Module, point: GridPoint) -> dict[str, Any]:
    """`point`'s keys that this module's kind has: a per-quantizer level key of the other
    kind (q_levels_p on a linear, q_levels_input on attention) would be refused there."""
    from torchtitan_ext.optical.modules import OpticalLinear

    other = ATTENTION_LEVEL_KEYS if isinstance(mod, OpticalLinear) else LINEAR_LEVEL_KEYS
    return {k: v for k, v in point.as_dict().items() if k not in other}


def _check_point_reaches_modules(point: GridPoint, modules: dict[str, torch.nn.Module]) -> None:
    """A per-quantizer level key that no optical module of its kind takes would be ignored."""
    from torchtitan_ext.optical.modules import OpticalLinear

    kinds = {isinstance(m, OpticalLinear) for m in modules.values()}
    for key in point.as_dict():
        if (key in LINEAR_LEVEL_KEYS and True not in kinds) or (
                key in ATTENTION_LEVEL_KEYS and False not in kinds):
            raise EvalError(f"{key}: this model has no optical "
                            f"{'linear' if key in LINEAR_LEVEL_KEYS else 'attention'} module to "
                            "apply it to (the setting would be ignored)")


def point_transform(tcfg: TransformConfig | None, point: GridPoint) -> TransformConfig | None:
    """The trained transform with `point`'s keys replaced in every optical rule (for energy)."""
    if tcfg is None or point.digital:
        return None

    def swap(q: QuantizerConfig | None) -> QuantizerConfig | None:
        return None if q is None else QuantizerConfig.from_dict({**q.to_dict(), **point.as_dict()},
                                                                where="grid")

    rules = tuple((p, swap(q)) for p, q in tcfg.rules)
    return dataclasses.replace(tcfg, rules=rules, default=swap(tcfg.default))


# ------------------------------------------------------------------------------------------------
# Data


def _read_texts(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    texts = []
    with opener(path, "rt", encoding="utf-8") as f:
        if ".jsonl" in path.name or ".json" in path.name:
            for line in f:
                if line.strip():
                    texts.append(json.loads(line)["text"])
        else:
            texts.append(f.read())
    return texts


SPREAD_TOKENS = 1 << 22  # tokens read at most to spread the windows over (the split: ~180k)


def validation_tokens(tokenizer_path: str, seq_len: int, n_sequences: int,
                      data_file: str | None = None) -> torch.Tensor:
    """[n, seq_len + 1] token windows of the validation text: the embedded validation split, or
    `data_file` (.jsonl(.gz) with a `text` field, or .txt). Documents are joined as in training
    (BOS + text + EOS). The windows are spread evenly over the text's first max(n windows,
    SPREAD_TOKENS) tokens, not its first n windows: on the split's first 64 x 256 tokens the
    trained 60M scored 2.08, against 3.14 in training's validation of the whole split (stop
    17). Fewer windows than asked when the text runs out."""
    from tokenizers import Tokenizer

    from torchtitan_ext.data import CORPUS_DIR

    path = Path(data_file) if data_file else CORPUS_DIR / "validation.jsonl.gz"
    if not path.is_file():
        raise EvalError(f"--data-file: {str(path)!r} does not exist")
    tok_file = Path(tokenizer_path) / "tokenizer.json"
    if not tok_file.is_file():
        raise EvalError(f"tokenizer: {str(tok_file)!r} does not exist")
    tok = Tokenizer.from_file(str(tok_file))
    specials = _special_ids(Path(tokenizer_path))
    need = max(n_sequences * (seq_len + 1), SPREAD_TOKENS)
    stream: list[int] = []
    for text in _read_texts(path):
        stream += specials[:1] + tok.encode(text, add_special_tokens=False).ids + specials[1:]
        if len(stream) >= need:
            break
    windows = len(stream) // (seq_len + 1)
    if windows == 0:
        raise EvalError(f"{str(path)!r} has fewer than seq_len + 1 = {seq_len + 1} tokens")
    n = min(n_sequences, windows)
    all_windows = torch.tensor(stream[: windows * (seq_len + 1)], dtype=torch.long)
    return all_windows.view(windows, seq_len + 1)[[i * windows // n for i in range(n)]]


def _special_ids(folder: Path) -> list[int]:
    """[bos, eos] ids that exist, as training's tokenizer (torchtitan's HuggingFaceTokenizer,
    through `hf_config.tokenizer_ids`) finds them, to join documents as in training."""
    from torchtitan_ext.hf.hf_config import tokenizer_ids

    ids = tokenizer_ids(str(folder))
    return [i for i in (ids["bos_token_id"], ids["eos_token_id"]) if i is not None]


# ------------------------------------------------------------------------------------------------
# Evaluation


class _Progress:
    """tqdm when installed, else a counter on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.n, self.bar = total, 0, None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="evaluate", unit="batch", file=sys.stderr)
            except ImportError:
                pass

    def update(self, label: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label[:40], refresh=False)
            self.bar.update(1)
        elif self.enabled:
            print(f"\revaluate {self.n}/{self.total} [{label[:40]}]", end="", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


@torch.no_grad()
def _loss(loaded: LoadedModel, tokens: torch.Tensor, batch_size: int, device, progress,
          label: str) -> float:
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        batch = tokens[i:i + batch_size].to(device)
        logits = loaded.forward(batch[:, :-1]).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                               reduction="sum")
        total += float(loss)
        count += batch[:, 1:].numel()
        progress.update(label)
    return total / count


def evaluate_grid(loaded: LoadedModel, points: Sequence[GridPoint], tokens: torch.Tensor,
                  seeds: Sequence[int], *, batch_size: int = 8, device="cpu",
                  profile: HardwareProfile | None = None, progress: bool = True) -> list[dict]:
    """Loss of `loaded` on `tokens` at every grid point and seed; one result dict per point with
    the losses per seed, mean, spread (std over seeds), perplexity and energy per token.
    The digital point runs once (it has no noise); the model's own settings are restored."""
    trained = {n: m.config for n, m in _optical_modules(loaded.model).items()}
    if not trained and any(not p.digital for p in points):
        raise EvalError("the model has no optical modules: only --digital can be evaluated")
    profile = profile or load_hardware_profile()
    n_batches = -(-tokens.shape[0] // batch_size)
    runs = sum(1 if p.digital else len(seeds) for p in points)
    bar = _Progress(runs * n_batches, progress)
    results = []
    try:
        for point in points:
            apply_point(loaded.model, point, trained)
            losses = []
            for seed in seeds[:1] if point.digital else seeds:
                torch.manual_seed(seed)
                losses.append(_loss(loaded, tokens, batch_size, device, bar, point.label))
            results.append(_result(loaded, point, list(seeds), losses, profile))
    finally:
        bar.close()
        for name, mod in _optical_modules(loaded.model).items():
            mod.config = trained[name]
    return results


def _result(loaded: LoadedModel, point: GridPoint, seeds: list[int], losses: list[float],
            profile: HardwareProfile) -> dict:
    mean = sum(losses) / len(losses)
    std = math.sqrt(sum((x - mean) ** 2 for x in losses) / (len(losses) - 1)) if len(losses) > 1 else 0.0
    energy = estimate_energy(loaded.dims, point_transform(loaded.transform, point), profile,
                             naming=loaded.naming)
    return {
        "label": point.label, "settings": point.as_dict(), "digital": point.digital,
        "seeds": seeds[: len(losses)], "losses": losses, "loss_mean": mean, "loss_std": std,
        "perplexity": math.exp(mean),
        "energy_pj_per_token": None if energy.total_j is None else energy.total_j * 1e12,
        "energy_known_pj_per_token": energy.known_j * 1e12,
        "digital_baseline_pj_per_token": energy.baseline_j * 1e12,
        "energy_missing_constants": energy.missing,
        "photons_per_mac": energy.photons_per_mac if not point.digital else None,
    }


# ------------------------------------------------------------------------------------------------
# Reports


def _energy_cell(r: dict) -> str:
    if r["energy_pj_per_token"] is not None:
        return f"{r['energy_pj_per_token']:.4g}"
    return f">= {r['energy_known_pj_per_token']:.4g}"


def results_markdown(results: list[dict], meta: dict) -> str:
    """Markdown table: one row per grid point (loss mean ± std over seeds, ppl, energy)."""
    lines = [
        f"Validation loss of `{meta['source']}` on {meta['tokens']} tokens "
        f"({meta['sequences']} x {meta['seq_len']}), seeds {meta['seeds']}; energy per token "
        f"in pJ (profile `{meta['profile']}`; '>=' = unknown constants, lower bound).",
        "",
        "| setting | loss (mean ± std) | perplexity | energy pJ/token | digital baseline pJ/token |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['loss_mean']:.4f} ± {r['loss_std']:.4f} | {r['perplexity']:.3f} "
            f"| {_energy_cell(r)} | {r['digital_baseline_pj_per_token']:.4g} |"
        )
    return "\n".join(lines) + "\n"


def _plot(results: list[dict], key: str, xlabel: str, path: Path) -> bool:
    """Loss vs one grid key, a line per combination of the other keys; digital dashed."""
    points = [r for r in results if key in r["settings"] and r["settings"][key] is not None]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[str, list[dict]] = {}
    for r in points:
        rest = ", ".join(f"{k}={v}" for k, v in r["settings"].items() if k != key)
        groups.setdefault(rest or "optical", []).append(r)
    for name, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["settings"][key])
        ax.errorbar([r["settings"][key] for r in rs], [r["loss_mean"] for r in rs],
                    yerr=[r["loss_std"] for r in rs], marker="o", capsize=3, label=name)
    for r in results:
        if r["digital"]:
            ax.axhline(r["loss_mean"], color="k", linestyle="--", label="digital")
    ax.set_xscale("log", base=2 if key == "q_levels" else 10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_reports(results: list[dict], meta: dict, out: str | Path) -> list[Path]:
    """eval.json, eval.md and (with matplotlib) the plots in `out`; returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "eval.json", out / "eval.md"]
    files[0].write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    files[1].write_text(results_markdown(results, meta))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("evaluate: matplotlib is not installed (pip install -e '.[report]'): no plots",
              file=sys.stderr)
        return files
    for key, xlabel, name in (("q_levels", "levels", "loss_vs_levels.png"),
                              ("q_photons_per_mac", "photons per MAC", "loss_vs_photons.png")):
        if _plot(results, key, xlabel, out / name):
            files.append(out / name)
    return files


# ------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m torchtitan_ext.evaluate", description=__doc__.split("\n")[0])
    src = p.add_argument_group("model (a torchtitan checkpoint or an export folder)")
    src.add_argument("--config", help="the run's TOML (with --checkpoint)")
    src.add_argument("--checkpoint", help="a DCP checkpoint folder, e.g. outputs/x/checkpoint/step-N")
    src.add_argument("--hf-folder", help="an export folder (python -m torchtitan_ext.hf.export)")
    grid = p.add_argument_group("grid (comma-separated values; the product is evaluated)")
    grid.add_argument("--levels", help="q_levels of every optical quantizer, e.g. 256,64,16")
    grid.add_argument("--lut", help="q_lut_min, e.g. 0.02004,none")
    grid.add_argument("--q-noise", dest="q_noise", help="read-out noise on/off: true,false")
    grid.add_argument("--readout", help="q_readout: rounding,shot")
    grid.add_argument("--photons", help="q_photons_per_mac, e.g. 1,10,100")
    grid.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                      help="any other transform-file key, e.g. a per-quantizer level key")
    grid.add_argument("--digital", action="store_true", help="add the digital model as a point")
    p.add_argument("--seeds", default="0,1,2", help="noise seeds per point (default 0,1,2)")
    p.add_argument("--data-file", help="validation text (.jsonl(.gz) with 'text', or .txt); "
                   "default: the embedded validation split")
    p.add_argument("--seq-len", type=int, help="tokens per window (default: the model's training "
                   "context: training.seq_len, or the training_seq_len an export recorded)")
    p.add_argument("--sequences", type=int, default=64, help="validation windows (default 64)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--hardware", help="hardware-profile YAML (default: the Optical Transformers one)")
    p.add_argument("--out", default="outputs/eval", help="folder for eval.json, eval.md, plots")
    p.add_argument("--no-progress", action="store_true")
    return p


def _axes(args) -> dict[str, str]:
    axes = {opt: getattr(args, opt) for opt in FLAG_KEYS if getattr(args, opt) is not None}
    for item in args.set:
        key, sep, values = item.partition("=")
        if not sep or not key.strip():
            raise EvalError(f"--set: expected KEY=V1,V2, got {item!r}")
        axes[key.strip()] = values
    return axes


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise EvalError(f"--{name}: must be an integer >= 1, got {value}")


def run(argv: Sequence[str] | None = None) -> list[dict]:
    """The command: parse, load, evaluate, write; returns the result dicts."""
    args = _parser().parse_args(argv)
    for name in ("seq_len", "sequences", "batch_size"):
        if getattr(args, name) is not None:
            _positive(name.replace("_", "-"), getattr(args, name))
    seeds = [int(s) for s in _parse_values("--seeds", args.seeds)]
    points = build_grid(_axes(args), args.digital) or [GridPoint()]
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    profile = load_hardware_profile(args.hardware)
    loaded = load_model_for_eval(config=args.config, checkpoint=args.checkpoint,
                                 hf_folder=args.hf_folder, seq_len=args.seq_len, device=device)
    tokens = validation_tokens(loaded.tokenizer_path, loaded.dims.seq_len, args.sequences,
                               args.data_file)
    start = time.time()
    results = evaluate_grid(loaded, points, tokens, seeds, batch_size=args.batch_size,
                            device=device, profile=profile, progress=not args.no_progress)
    meta = {
        "source": args.hf_folder or args.checkpoint, "config": args.config,
        "tokens": int(tokens[:, 1:].numel()), "sequences": int(tokens.shape[0]),
        "seq_len": loaded.dims.seq_len, "seeds": seeds, "device": str(device),
        "profile": profile.name, "seconds": round(time.time() - start, 2),
        "data": args.data_file or "embedded validation split",
    }
    files = write_reports(results, meta, args.out)
    print(results_markdown(results, meta))
    print("wrote " + ", ".join(str(f) for f in files))
    return results


def main(argv: Sequence[str] | None = None) -> None:
    try:
        run(argv)
    except (EvalError, OpticalConfigError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
