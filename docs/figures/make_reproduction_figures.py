"""The reproduction page's tables and plot, from the committed Table 2 reports.

Reads the report of the batched grid (``results/mnist-batched/table2.csv`` and
``table2.md``), the same grid trained by the previous batched engine
(``results/mnist-batched/previous-engine/table2.md``) and the sequential grid
(``results/mnist/table2.md``), and writes:

- ``docs/figures/verdicts-held.csv``: the paper's findings whose verdict is "holds" in all
  three grids, with the three intervals;
- ``docs/figures/table2-cells.csv``: every cell beside the paper, five columns;
- ``docs/_static/ours-vs-paper.png``: our mean test error against the paper's, cell by
  cell, with one standard deviation each way.

Run from the repository root (a few seconds)::

    .venv/bin/python docs/figures/make_reproduction_figures.py
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BATCHED = ROOT / "results" / "mnist-batched"
GRIDS = {
    "this grid": BATCHED / "table2.md",
    "previous engine": BATCHED / "previous-engine" / "table2.md",
    "sequential": ROOT / "results" / "mnist" / "table2.md",
}
UPDATES = {"bsgd": "B-SGD", "sm": "SM", "un": "UN"}
PROTOCOLS = {"exp-decay": "exp. decay", "bold-driver": "bold driver"}


def findings(path: Path) -> dict[tuple[str, str, str], tuple[str, str]]:
    """The findings table of a report: (finding, first, second) -> (verdict, interval),
    over the runs that did not diverge."""
    out = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[4] in ("holds", "opposite", "not significant"):
            out[(cells[0], cells[1], cells[2])] = (cells[4], cells[3])
    return out


def comparison(first: str, second: str) -> str:
    """What two compared cells share ('2 layers, exp. decay, B-SGD' for Arch1 against
    Arch2 in that cell); 'all cells' when nothing is shared."""
    a, b = first.split(", "), second.split(", ")
    shared = [x for x, y in zip(a, b, strict=False) if x == y]
    return ", ".join(shared) if shared else "all cells"


def write_verdicts(out: Path) -> int:
    grids = {name: findings(path) for name, path in GRIDS.items()}
    first = grids["this grid"]
    rows = []
    for key in first:
        if all(g.get(key, ("",))[0] == "holds" for g in grids.values()):
            rows.append([key[0], comparison(key[1], key[2]) or "all cells"]
                        + [g[key][1] for g in grids.values()])
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["finding", "where", *[f"{n}, 95% CI" for n in grids]])
        writer.writerows(rows)
    return len(rows)


def cells() -> list[dict[str, str]]:
    with (BATCHED / "table2.csv").open() as f:
        return list(csv.DictReader(f))


def write_cells(rows: list[dict[str, str]], out: Path) -> None:
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["cell", "paper", "ours, not diverged", "ours, all runs",
                         "diverged"])
        for r in rows:
            cell = (f"{r['arch'].capitalize()}, {r['depth']} layers, "
                    f"{PROTOCOLS[r['protocol']]}, {UPDATES[r['update']]}")
            writer.writerow([
                cell, f"{float(r['paper_mean']):.4f} ± {float(r['paper_std']):.4f}",
                f"{float(r['mean_ok']):.4f} ± {float(r['std_ok']):.4f}",
                f"{float(r['mean_all']):.4f} ± {float(r['std_all']):.4f}",
                f"{r['n_diverged']} of {r['n']}"])


def plot(rows: list[dict[str, str]], out: Path) -> None:
    colours = {"bsgd": "#7f7f7f", "sm": "#1f77b4", "un": "#d62728"}
    markers = {"arch1": "o", "arch2": "s"}
    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=150)
    lo, hi = 0.014, 0.036
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--", label="ours = paper")
    seen = set()
    for r in rows:
        x, xs = float(r["paper_mean"]), float(r["paper_std"])
        y, ys = float(r["mean_ok"]), float(r["std_ok"])
        label = f"{r['arch'].capitalize()} {UPDATES[r['update']]}"
        ax.errorbar(x, y, xerr=xs, yerr=ys, fmt=markers[r["arch"]],
                    color=colours[r["update"]], ms=5, lw=0.8, capsize=2, alpha=0.85,
                    mfc="white" if r["depth"] == "4" else colours[r["update"]],
                    label=None if label in seen else label)
        seen.add(label)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel("paper: mean test error (± 1 s.d.)")
    ax.set_ylabel("ours: mean test error, runs not diverged (± 1 s.d.)")
    ax.set_title("Table 2 on MNIST, 24 cells, 10 runs each\n"
                 "(filled: 2 layers, open: 4 layers)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    figures = ROOT / "docs" / "figures"
    n = write_verdicts(figures / "verdicts-held.csv")
    rows = cells()
    write_cells(rows, figures / "table2-cells.csv")
    plot(rows, ROOT / "docs" / "_static" / "ours-vs-paper.png")
    print(f"{n} verdicts hold in all three grids; {len(rows)} cells")


if __name__ == "__main__":
    main()
