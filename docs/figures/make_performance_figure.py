"""The Performance page's plot, from a committed ``manifold-nets bench --json`` result.

Draws, for each weight set and thread count of the optimiser-step benchmark, and for the
paper's MLP epoch, every optimiser's median ratio to SGD with its range over the rounds,
on a log scale. Run from the repository root::

    .venv/bin/python docs/figures/make_performance_figure.py \\
        benchmarks/results/cpu-2core-2026-11-29.json docs/_static/performance.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

WEIGHT_SETS = {"resnet18": "ResNet-18 convs (11.2M)", "linear4096": "2 x 4096x4096 (33.6M)"}
COLOURS = {"sgd": "#bbbbbb", "sgd-foreach": "#7f7f7f", "ours-un": "#d62728",
           "ours-sm": "#1f77b4", "ours-un-foreach": "#ff9896", "ours-sm-foreach": "#aec7e8",
           "geoopt-un": "#8c564b", "geoopt-sm": "#c49c94"}


def panels(result: dict) -> list[tuple[str, str, dict[str, dict]]]:
    """(title, baseline, {optimiser: {median, min, max}}) for every panel."""
    out = []
    for key, steps in result.get("steps", {}).items():
        for threads, optimisers in steps["threads"].items():
            ratios = {name: r["vs_sgd_foreach"] for name, r in optimisers.items()}
            out.append((f"step, {WEIGHT_SETS.get(key, key)}, {threads} thread"
                        + ("s" if threads != "1" else ""), "SGD(foreach)", ratios))
    mlp = result.get("nets", {}).get("mlp")
    if mlp:
        ratios = {name: r["epoch_vs_sgd"] for name, r in mlp["optimisers"].items()}
        out.append(("epoch, the paper's MLP (0.3M), 1 thread", "SGD", ratios))
    return out


def main(argv: list[str]) -> None:
    source, target = Path(argv[0]), Path(argv[1])
    result = json.loads(source.read_text())
    found = panels(result)
    fig, axes = plt.subplots(len(found), 1, figsize=(7.2, 1.25 + 1.45 * len(found)),
                             dpi=150, sharex=True)
    for ax, (title, baseline, ratios) in zip(axes, found, strict=True):
        names = list(ratios)
        for i, name in enumerate(names):
            r = ratios[name]
            ax.barh(i, r["median"], color=COLOURS.get(name, "#999999"), height=0.7)
            ax.plot([r["min"], r["max"]], [i, i], color="black", lw=1)
            ax.text(max(r["max"], r["median"]) * 1.06, i, f" {r['median']:.2f}",
                    va="center", fontsize=7)
        ax.axvline(1.0, color="black", lw=0.8, ls="--")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{title}: time / {baseline}", fontsize=8, loc="left")
        ax.set_xscale("log")
        ax.set_xticks([0.5, 1, 2, 5, 10, 20, 50], ["0.5", "1", "2", "5", "10", "20", "50"])
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("ratio to SGD (median over interleaved rounds; bar: range)")
    machine = result["machine"]
    fig.suptitle(f"{machine['cpu_count']}-core CPU, torch {machine['torch']}, "
                 f"geoopt {machine['geoopt']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(target)


if __name__ == "__main__":
    main(sys.argv[1:])
