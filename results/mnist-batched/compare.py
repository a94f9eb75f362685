"""Compare the batched grid with the sequential one, cell by cell and run by run.

Usage: python results/mnist-batched/compare.py [BATCHED_DIR] [SEQUENTIAL_DIR] > compare.md
       python results/mnist-batched/compare.py DIR_A DIR_B LABEL_A LABEL_B > other.md

The second form compares any two stores of the same grid under the given labels (the first
is called "batched" and the second "sequential" otherwise).

Cells: mean +- std of the test error over all runs of each engine and Welch's 95% interval
for the difference (batched minus sequential), using only the seeds present in both
folders, so that both sides hold the same runs. Runs: the same run id (same seed, hence
the same split, initial weights and batch order) on both engines: whether the same
learning rate was selected, and the test-error difference.
"""

from __future__ import annotations

import statistics
import sys

from manifold_nets.experiments.report import t_quantile, welch
from manifold_nets.experiments.store import ResultStore


def main(batched: str = "results/mnist-batched", sequential: str = "results/mnist",
         name_b: str = "batched", name_s: str = "sequential") -> None:
    b = {r["run_id"]: r for r in ResultStore(batched).records()}
    s = {r["run_id"]: r for r in ResultStore(sequential).records()}
    common = sorted(set(b) & set(s))
    print(f"# {name_b.capitalize()} vs {name_s}: {len(b)} {name_b} runs, {len(s)} {name_s} "
          f"runs, {len(common)} run ids in both\n")
    cells: dict[tuple, list[str]] = {}
    for rid in common:
        c = s[rid]["config"]
        cells.setdefault((c["depth"], c["protocol"], c["arch"], c["update"]), []).append(rid)
    print("## Cells (only the run ids present in both)\n")
    print(f"| depth | protocol | arch | update | n | {name_s} | {name_b} | {name_b} - {name_s} "
          "[95% CI] |")
    print("|---|---|---|---|---|---|---|---|")
    inside = tested = 0
    for key in sorted(cells):
        ids = cells[key]
        se = [s[i]["test_error"] for i in ids]
        be = [b[i]["test_error"] for i in ids]

        def ms(v):
            return f"{statistics.fmean(v):.4f} +- {statistics.stdev(v) if len(v) > 1 else 0:.4f}"

        w = welch(be, se)
        ci = "-" if w is None else f"{w['diff']:+.4f} [{w['low']:+.4f}, {w['high']:+.4f}]"
        if w is not None:
            tested += 1
            inside += w["low"] <= 0 <= w["high"]
        print(f"| {' | '.join(map(str, key))} | {len(ids)} | {ms(se)} | {ms(be)} | {ci} |")
    print(f"\n{inside} of {tested} cells with at least two runs on each side: the interval "
          "contains 0.\n")
    print("## Run by run (same run id, same seed)\n")
    same_lr = [i for i in common if b[i]["lr"] == s[i]["lr"]]
    print(f"- same selected learning rate: {len(same_lr)} of {len(common)}")
    for group, ids in (("same rate", same_lr),
                       ("different rate", [i for i in common if i not in same_lr])):
        if not ids:
            continue
        d = [abs(b[i]["test_error"] - s[i]["test_error"]) for i in ids]
        same_div = sum(b[i]["diverged"] == s[i]["diverged"] for i in ids)
        print(f"- {group}: |test error difference| median {statistics.median(d):.4f}, "
              f"max {max(d):.4f}; same diverged flag in {same_div} of {len(ids)}")
    sel = [abs(b[i]["selection"][k] - s[i]["selection"][k]) for i in common
           for k in s[i]["selection"] if k in b[i]["selection"]]
    if sel:
        print(f"- selection errors (500 images, every candidate rate): |difference| median "
              f"{statistics.median(sel):.4f}, max {max(sel):.4f}, identical in "
              f"{sum(v == 0 for v in sel)} of {len(sel)}")
    for label, ids in (("all common runs", common),
                       ("runs that diverged on neither side",
                        [i for i in common if not (b[i]["diverged"] or s[i]["diverged"])])):
        d = [b[i]["test_error"] - s[i]["test_error"] for i in ids]
        if len(d) > 1:
            m, sd = statistics.fmean(d), statistics.stdev(d)
            h = t_quantile(0.975, len(d) - 1) * sd / len(d) ** 0.5
            print(f"- paired difference, {name_b} - {name_s}, {label} (n={len(d)}): "
                  f"{m:+.4f} [{m - h:+.4f}, {m + h:+.4f}] (95% t interval)")
    total_b = sum(b[i]["diverged"] for i in b)
    print(f"- diverged: {name_b} {total_b} of {len(b)}; {name_s} "
          f"{sum(s[i]['diverged'] for i in s)} of {len(s)}")


if __name__ == "__main__":
    main(*sys.argv[1:5])
