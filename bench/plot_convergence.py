"""Plots and tables of docs/results.md from the JSON `bench/convergence.py watch` writes.

    python3 bench/plot_convergence.py bench/results/convergence-h200.json --outdir docs/results

Several JSONs are merged in order: a later file's run replaces an earlier one of the same name
(a session's new runs drawn beside an earlier session's).

Needs matplotlib (`pip install matplotlib`); prints the markdown tables to stdout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MAIN = ("digital", "optical")
LEVELS = (("digital", "digital"), ("optical", "256 levels"), ("q64", "64 levels"),
          ("q16", "16 levels"))
ABLATION = (("optical", "recipe"), ("no_warmup", "- digital warm-up"),
            ("no_grad_clip", "- gradient clipping"),
            ("unsmoothed", "range EMA 0.9 -> 0"), ("clipped_grad", "STE -> clipped gradients"))
# Second seeds and issue 16's runs (bench/convergence.py VARIANTS), when the JSON has them.
TWINS = (("digital", "digital, seed 0"), ("digital_seed1", "digital, seed 1"),
         ("optical", "optical, seed 0"), ("optical_seed1", "optical, seed 1"))
QUANTIZERS = (("optical", "256 levels"), ("q256_s64", "256, Q_s at 64"),
              ("q256_p64", "256, Q_p at 64"), *((f"q256_{k}64", f"256, Q_{k} at 64")
                                                for k in ("input", "weight", "output", "q", "k",
                                                          "v", "y")),
              ("q64", "64 levels"), ("q64_p256", "64, Q_p at 256"), ("q64_s256", "64, Q_s at 256"),
              ("q64_input256", "64, Q_input at 256"))
SHOT = (("digital", "digital"), ("optical", "rounding read-out"), ("noise_off", "q_noise: false"),
        ("shot100", "shot, 100 photons/MAC"), ("shot10", "shot, 10 photons/MAC"),
        ("shot1", "shot, 1 photon/MAC"))
CLAMPS = ("linear_x", "linear_w", "linear_out", "attention_q", "attention_k", "attention_v",
          "attention_s", "attention_y")


def smooth(values: list[float], k: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        window = values[max(0, i - k + 1):i + 1]
        out.append(sum(window) / len(window))
    return out


# Runs drawn in several figures: a figure is drawn when the JSON has one of its other runs.
SHARED = {*MAIN, "q64"}
FIGURES = (  # file, runs, with training curves, y limits, title
    ("loss-optical-vs-digital.png", [(n, n) for n in MAIN], True, (2.6, 6.0),
     "60M from scratch: optical (256 levels, recipe) vs digital twin"),
    ("loss-levels.png", LEVELS, False, (2.6, 8.0),
     "Precision: levels per quantizer (recipe otherwise unchanged)"),
    ("loss-ablation.png", ABLATION, False, (2.75, 4.5),
     "Ablation at 256 levels: one part of the recipe changed at a time"),
    ("loss-twins-seeds.png", TWINS, False, (2.7, 5.0), "Twins, two seeds each"),
    ("loss-per-quantizer.png", QUANTIZERS, False, (2.9, 5.0),
     "Per-quantizer levels: one quantizer changed at a time"),
    ("loss-shot-noise.png", SHOT, False, (2.9, 7.5), "Read-out noise"),
)


def _curves(ax, runs: dict, tokens: float, names, train: bool) -> None:
    """Validation (and smoothed training) loss against tokens (M) of the named runs present."""
    import matplotlib

    colors = matplotlib.colormaps["tab20" if len(names) > 10 else "tab10"].colors
    for i, (name, label) in enumerate(names):
        r = runs.get(name)
        if not r:
            continue
        if r["val_steps"]:
            xs = [s * tokens for s in r["val_steps"][1:]]
            # a figure of more than 10 runs: one color each, dashed for the 64-level family
            style = dict(color=colors[i % len(colors)],
                         ls="--" if len(names) > 10 and name.startswith("q64") else "-")
            ax.plot(xs, r["val_loss"][1:], marker="o", ms=2.5, label=f"{label} (validation)",
                    **style)
        if train and r["steps"]:
            xs = [s * tokens for s in r["steps"]]
            ax.plot(xs, smooth(r["loss"]), alpha=0.45, lw=1, label=f"{label} (train)")
    ax.set_xlabel("tokens (M)")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot(data: dict, outdir: Path, prefix: str = "") -> None:
    """The loss figures whose runs the JSON has (beyond the twins), and the clamp figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = data["runs"]
    tokens = data["tokens_per_step"] / 1e6
    outdir.mkdir(parents=True, exist_ok=True)
    for filename, names, train, ylim, title in FIGURES:
        own = [n for n, _ in names if n not in SHARED]
        if own and not any(runs.get(n) and runs[n]["val_steps"] for n in own):
            continue  # a JSON without this figure's own runs
        fig, ax = plt.subplots(figsize=(7, 4.2))
        _curves(ax, runs, tokens, names, train)
        ax.set_ylim(*ylim)
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(outdir / (prefix + filename), dpi=120)
    if runs.get("optical", {}).get("clamp"):
        _clamp_figure(plt, runs, tokens, outdir / (prefix + "clamp-fractions.png"))


def _clamp_figure(plt, runs: dict, tokens: float, path: Path) -> None:
    """Left: the recipe's clamp fraction per quantizer; right: Q_p's zeroed probabilities."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    r = runs["optical"]
    steps = sorted(int(s) for s in r["clamp"])
    for key in CLAMPS:
        ys = [max(r["clamp"][str(s)].get(key, 0.0), 1e-9) for s in steps]
        axes[0].semilogy([s * tokens for s in steps], ys, label=key, lw=1)
    axes[0].set_title("recipe, 256 levels: fraction clamped per quantizer\n(mean over layers)")
    axes[0].set_xlabel("tokens (M)")
    axes[0].set_ylabel("fraction outside the range")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    for name, label in LEVELS[1:] + (("no_warmup", "256 levels, no warm-up"),):
        rr = runs.get(name)
        if not rr:
            continue
        st = sorted(int(s) for s in rr["clamp"])
        axes[1].plot([s * tokens for s in st],
                     [rr["clamp"][str(s)]["attention_p_zeroed"] for s in st], label=label)
    axes[1].set_title("attention: fraction of non-zero probabilities\nthat Q_p rounds to zero")
    axes[1].set_xlabel("tokens (M)")
    axes[1].set_ylim(0.5, 1.0)
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def tables(data: dict) -> str:
    """One row per run: its last validation loss against the digital twin's at the same step
    (runs cut short compare at equal tokens, not against the twin's final loss); "n/a" where
    the JSONs hold no digital run (a session that trained optical variants only)."""
    runs = data["runs"]
    tokens = data["tokens_per_step"]
    twin = runs.get("digital") or {"val_steps": [], "val_loss": []}
    digital = dict(zip(twin["val_steps"], twin["val_loss"]))
    lines = ["| run | what | tokens | last val loss (step) | vs digital at that step "
             "| best val loss after step 100 | NaN/stop | tok/s (shared GPU) |",
             "|---|---|---|---|---|---|---|---|"]
    order = ["digital", "optical", "q64", "q16", "no_warmup", "no_grad_clip", "unsmoothed",
             "clipped_grad", "q16_no_warmup"]
    for name in order + sorted(set(runs) - set(order)):
        r = runs.get(name)
        if not r or not r["val_loss"]:
            continue
        step, last = r["val_steps"][-1], r["val_loss"][-1]
        vs = f"{(last / digital[step] - 1) * 100:+.1f}%" if step in digital else "n/a"
        best = min((v for s, v in zip(r["val_steps"], r["val_loss"]) if s > 100),
                   default=float("nan"))
        nan = any(v != v for v in r["loss"] + r["val_loss"]) or r["nonfinite_stop"]
        lines.append(
            f"| `{name}` | {r['what']} | {r['steps'][-1] * tokens / 1e6:.1f}M | "
            f"{last:.4f} ({step}) | {vs} | {best:.4f} | {'yes' if nan else 'none'} | "
            f"{r.get('tps_median', 0) / 1000:.1f}k |")
    return "\n".join(lines)


def merge(datas: list[dict]) -> dict:
    """One watch JSON from several: runs by name, a later file's replacing an earlier one's."""
    if len({d["tokens_per_step"] for d in datas}) > 1:
        raise SystemExit("plot_convergence.py: the JSONs differ in tokens_per_step")
    return {"tokens_per_step": datas[0]["tokens_per_step"],
            "runs": {name: run for d in datas for name, run in d["runs"].items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="watch JSONs, merged in order")
    p.add_argument("--outdir", default="docs/results")
    p.add_argument("--prefix", default="", help="prepended to every plot's file name")
    args = p.parse_args()
    data = merge([json.loads(Path(f).read_text()) for f in args.json])
    plot(data, Path(args.outdir), args.prefix)
    print(tables(data))


if __name__ == "__main__":
    main()
