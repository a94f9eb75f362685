r"""The Table 2 report: cell statistics, Welch comparisons of the paper's findings, the
table beside the paper's values, and the trajectories figure.

:func:`write_report` reads every record of a :class:`~.store.ResultStore` and writes
``table2.md`` (Table 2 beside the paper's values, diverged runs counted, every cell over
all runs and over the runs that did not diverge, Welch comparisons with 95% intervals for
the paper's findings), ``table2.csv`` (one row per cell) and ``trajectories.png`` (mean
test error per epoch with a one-standard-deviation band, depth 4).
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..table1 import NAMES
from .config import ARCHS, PROTOCOLS, UPDATES
from .io import atomic_write

__all__ = [
    "PAPER_TABLE2",
    "cell_summaries",
    "comparisons",
    "mean_std",
    "plot_trajectories",
    "t_quantile",
    "welch",
    "write_report",
]

#: Table 2 of the paper: (depth, protocol, arch, update) -> (mean, std) test error.
#:
#: The MNIST test errors of the paper's 24 cells (2 depths x 2 protocols x 2 architectures
#: x 3 updates), mean and standard deviation over its runs.
PAPER_TABLE2: dict[tuple[int, str, str, str], tuple[float, float]] = {}
_PAPER_ROWS = {
    (2, "exp-decay"): "0.0263 0.0079 0.0283 0.0062 0.0220 0.0057 0.0216 0.0038 0.0228 0.0051 "
    "0.0230 0.0036",
    (2, "bold-driver"): "0.0240 0.0026 0.0271 0.0076 0.0228 0.0038 0.0206 0.0024 0.0186 0.0024 "
    "0.0199 0.0046",
    (4, "exp-decay"): "0.0277 0.0045 0.0256 0.0038 0.0215 0.0049 0.0218 0.0028 0.0204 0.0050 "
    "0.0224 0.0065",
    (4, "bold-driver"): "0.0253 0.0060 0.0264 0.0056 0.0244 0.0101 0.0204 0.0027 0.0188 0.0033 "
    "0.0179 0.0025",
}
for (_d, _p), _row in _PAPER_ROWS.items():
    _vals = [float(v) for v in _row.split()]
    for _k, (_a, _u) in enumerate((a, u) for a in ARCHS for u in UPDATES):
        PAPER_TABLE2[(_d, _p, _a, _u)] = (_vals[2 * _k], _vals[2 * _k + 1])

_NAMES = {"arch1": "Arch1", "arch2": "Arch2", **NAMES, "exp-decay": "exp. decay",
          "bold-driver": "bold driver"}



# --------------------------------------------------------------------------------------
# Statistics.


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(c) > tiny else 1.0 + aa / tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(c) > tiny else 1.0 + aa / tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function :math:`I_x(a, b)`."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t distribution with ``df`` (real, > 0) degrees of freedom."""
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2, 0.5, x)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t distribution (bisection on its CDF, ``t_cdf``).

    Parameters
    ----------
    p : float
        The probability, in ``(0, 1)``.
    df : float
        The degrees of freedom (real, > 0; Welch's are not integers).

    Returns
    -------
    float
        The ``t`` with ``P(T <= t) = p`` (bisection on ``[-1000, 1000]``; the CDF is
        accurate to about ``1e-8`` near the median).

    Raises
    ------
    ValueError
        If ``p`` is not strictly between 0 and 1.

    Examples
    --------
    >>> from manifold_nets.experiments.report import t_quantile
    >>> round(t_quantile(0.975, 10), 4), round(t_quantile(0.975, 1e6), 3)
    (2.2281, 1.96)
    >>> round(t_quantile(0.025, 10), 4), abs(t_quantile(0.5, 3)) < 1e-6
    (-2.2281, True)
    """
    if not 0 < p < 1:
        raise ValueError(f"Invalid probability: {p}")
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def welch(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict | None:
    r"""Welch's comparison of two means: :math:`\bar a - \bar b` with a ``level`` interval.

    The interval is :math:`\bar a - \bar b \pm t_{(1 + \text{level})/2,\,\nu}\,
    \sqrt{s_a^2/n_a + s_b^2/n_b}` with the Welch-Satterthwaite degrees of freedom
    :math:`\nu`, and ``p`` is the two-sided p-value of the difference.

    Parameters
    ----------
    a, b : sequence of float
        The two samples (e.g. the test errors of two cells).
    level : float, optional
        The confidence level of the interval (default 0.95).

    Returns
    -------
    dict or None
        ``diff``, ``low``, ``high``, ``df``, ``p``, ``n1`` and ``n2``; ``None`` when
        either sample has fewer than two values. With no variance at all the interval is
        the difference itself (``df`` infinite).

    Examples
    --------
    >>> from manifold_nets.experiments.report import welch
    >>> w = welch([0.030, 0.032, 0.031], [0.020, 0.021, 0.019])
    >>> round(w["diff"], 4), round(w["low"], 4), round(w["high"], 4), w["df"]
    (0.011, 0.0087, 0.0133, 4.0)
    >>> w["p"] < 0.001, welch([0.03], [0.02, 0.021]) is None
    (True, True)
    """
    n1, n2 = len(a), len(b)
    if n1 < 2 or n2 < 2:
        return None
    m1, m2 = statistics.fmean(a), statistics.fmean(b)
    v1, v2 = statistics.variance(a), statistics.variance(b)
    se2 = v1 / n1 + v2 / n2
    diff = m1 - m2
    if se2 == 0:
        return {"diff": diff, "low": diff, "high": diff, "df": float("inf"), "p": 0.0 if diff
                else 1.0, "n1": n1, "n2": n2}
    df = se2**2 / ((v1 / n1) ** 2 / (n1 - 1) + (v2 / n2) ** 2 / (n2 - 1))
    q = t_quantile(0.5 + level / 2, df)
    se = math.sqrt(se2)
    p = 2 * (1 - t_cdf(abs(diff) / se, df))
    return {"diff": diff, "low": diff - q * se, "high": diff + q * se, "df": df, "p": p,
            "n1": n1, "n2": n2}


# --------------------------------------------------------------------------------------
# The report.


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN for none).

    Parameters
    ----------
    values : sequence of float
        The sample.

    Returns
    -------
    (float, float)
        The mean and the sample standard deviation (``n - 1`` in the denominator).

    Examples
    --------
    >>> from manifold_nets.experiments.report import mean_std
    >>> mean_std([1.0, 2.0, 3.0])
    (2.0, 1.0)
    """
    if not values:
        return (float("nan"), float("nan"))
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell_key(record: dict) -> tuple[int, str, str, str]:
    c = record["config"]
    return (c["depth"], c["protocol"], c["arch"], c["update"])


def cell_summaries(records: Iterable[dict]) -> dict[tuple, dict]:
    """Per cell: test errors over all runs and over non-diverged runs, and counts.

    Parameters
    ----------
    records : iterable of dict
        Records of runs (:func:`~manifold_nets.experiments.engines.train`): each needs
        ``config`` (``depth``, ``protocol``, ``arch``, ``update``, ``dataset``),
        ``test_error``, ``diverged``, ``epochs``, ``wall_time_s`` and ``lr``.

    Returns
    -------
    dict
        ``(depth, protocol, arch, update) ->`` a dict of ``n``, ``n_diverged``, ``all``
        and ``ok`` (:func:`mean_std` of the test error over all runs and over the runs
        that did not diverge), ``epochs`` and ``wall_time_s`` (means), ``lrs`` (the
        selected rates) and ``paper`` (the cell of :data:`PAPER_TABLE2` on MNIST, else
        ``None``), in the order of Table 2.

    Examples
    --------
    >>> from manifold_nets.experiments.config import TrainConfig
    >>> def record(update, error, seed, depth=4):
    ...     config = TrainConfig(depth=depth, update=update, seed=seed).to_dict()
    ...     return {"config": config, "test_error": error, "diverged": False, "epochs": 2,
    ...             "wall_time_s": 1.0, "lr": 0.01, "stop_reason": "max-epochs",
    ...             "history": [{"test_error": error + 0.01}, {"test_error": error}]}
    >>> records = [record("bsgd", 0.030, 0), record("bsgd", 0.032, 1), record("bsgd", 0.031, 2),
    ...            record("un", 0.020, 0), record("un", 0.021, 1), record("un", 0.019, 2)]
    >>> from manifold_nets.experiments.report import cell_summaries
    >>> cells = cell_summaries(records)
    >>> list(cells)
    [(4, 'bold-driver', 'arch2', 'bsgd'), (4, 'bold-driver', 'arch2', 'un')]
    >>> un = cells[(4, "bold-driver", "arch2", "un")]
    >>> un["n"], un["n_diverged"], [round(v, 4) for v in un["ok"]], un["paper"]
    (3, 0, [0.02, 0.001], (0.0179, 0.0025))
    """
    cells: dict[tuple, list[dict]] = {}
    for r in records:
        cells.setdefault(_cell_key(r), []).append(r)
    out = {}
    for key in sorted(cells, key=_sort_key):
        rs = cells[key]
        all_err = [r["test_error"] for r in rs]
        ok_err = [r["test_error"] for r in rs if not r["diverged"]]
        out[key] = {
            "n": len(rs),
            "n_diverged": len(rs) - len(ok_err),
            "all": mean_std(all_err),
            "ok": mean_std(ok_err),
            "epochs": statistics.fmean(r["epochs"] for r in rs),
            "wall_time_s": statistics.fmean(r["wall_time_s"] for r in rs),
            "lrs": sorted({r["lr"] for r in rs}),
            "paper": PAPER_TABLE2.get(key) if rs[0]["config"]["dataset"] == "mnist" else None,
        }
    return out


def _sort_key(key: tuple) -> tuple:
    d, p, a, u = key
    return (d, PROTOCOLS.index(p), ARCHS.index(a), UPDATES.index(u))


def _errors(records, *, ok_only: bool, **where) -> list[float]:
    out = []
    for r in records:
        c = r["config"]
        if all(c[k] == v for k, v in where.items()) and not (ok_only and r["diverged"]):
            out.append(r["test_error"])
    return out


def comparisons(records: Sequence[dict]) -> list[dict]:
    """Welch comparisons for the paper's findings (Section 5).

    Each row: the finding, the two groups, and the difference ``mean(first) -
    mean(second)`` of test error with a 95% interval, over non-diverged runs and over all
    runs. A positive difference means the second group has the lower error.

    Parameters
    ----------
    records : sequence of dict
        Records of runs (see :func:`cell_summaries`).

    Returns
    -------
    list of dict
        One row per finding that the records can test: ``finding``, ``first`` and
        ``second`` (the groups, as ``{config field: value}``), ``ok`` and ``all``
        (:func:`welch` over non-diverged and over all runs, or ``None``).

    Examples
    --------
    >>> from manifold_nets.experiments.config import TrainConfig
    >>> def record(update, error, seed, depth=4):
    ...     config = TrainConfig(depth=depth, update=update, seed=seed).to_dict()
    ...     return {"config": config, "test_error": error, "diverged": False, "epochs": 2,
    ...             "wall_time_s": 1.0, "lr": 0.01, "stop_reason": "max-epochs",
    ...             "history": [{"test_error": error + 0.01}, {"test_error": error}]}
    >>> records = [record("bsgd", 0.030, 0), record("bsgd", 0.032, 1), record("bsgd", 0.031, 2),
    ...            record("un", 0.020, 0), record("un", 0.021, 1), record("un", 0.019, 2)]
    >>> from manifold_nets.experiments.report import comparisons
    >>> [row] = comparisons(records)
    >>> row["finding"], row["second"]["update"], round(row["ok"]["diff"], 4)
    ('UN better than B-SGD', 'un', 0.011)
    """
    rows = []
    depths = sorted({r["config"]["depth"] for r in records})

    def add(finding: str, first: dict, second: dict) -> None:
        row = {"finding": finding, "first": first, "second": second}
        for label, ok in (("ok", True), ("all", False)):
            row[label] = welch(_errors(records, ok_only=ok, **first),
                               _errors(records, ok_only=ok, **second))
        rows.append(row)

    add("Arch2 better than Arch1 (all cells pooled)", {"arch": "arch1"}, {"arch": "arch2"})
    for d in depths:
        for p in PROTOCOLS:
            for u in UPDATES:
                add("Arch2 better than Arch1", dict(depth=d, protocol=p, arch="arch1", update=u),
                    dict(depth=d, protocol=p, arch="arch2", update=u))
    for a in ARCHS:
        for d in depths:
            for p in PROTOCOLS:
                for u in ("sm", "un"):
                    add(f"{_NAMES[u]} better than B-SGD",
                        dict(depth=d, protocol=p, arch=a, update="bsgd"),
                        dict(depth=d, protocol=p, arch=a, update=u))
    for d in depths:
        for u in UPDATES:
            add("bold driver better than exp. decay (Arch2)",
                dict(depth=d, protocol="exp-decay", arch="arch2", update=u),
                dict(depth=d, protocol="bold-driver", arch="arch2", update=u))
    return [r for r in rows if r["ok"] is not None or r["all"] is not None]


def _fmt(ms: tuple[float, float] | None, digits: int = 4) -> str:
    if ms is None or math.isnan(ms[0]):
        return "-"
    return f"{ms[0]:.{digits}f} +- {ms[1]:.{digits}f}"


def _group(g: dict) -> str:
    parts = []
    if "arch" in g:
        parts.append(_NAMES[g["arch"]])
    if "depth" in g:
        parts.append(f"{g['depth']} layers")
    if "protocol" in g:
        parts.append(_NAMES[g["protocol"]])
    if "update" in g:
        parts.append(_NAMES[g["update"]])
    return ", ".join(parts)


def _verdict(w: dict | None) -> str:
    if w is None:
        return "-"
    if w["low"] > 0:
        return "holds"
    if w["high"] < 0:
        return "opposite"
    return "not significant"


def _ci(w: dict | None) -> str:
    if w is None:
        return "-"
    return f"{w['diff']:+.4f} [{w['low']:+.4f}, {w['high']:+.4f}]"


def table_csv(cells: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["depth", "protocol", "arch", "update", "n", "n_diverged", "mean_all", "std_all",
                "mean_ok", "std_ok", "paper_mean", "paper_std", "mean_epochs",
                "mean_wall_time_s"])
    for (d, p, a, u), c in cells.items():
        paper = c["paper"] or ("", "")
        w.writerow([d, p, a, u, c["n"], c["n_diverged"],
                    *(f"{v:.6f}" if not math.isnan(v) else "" for v in (*c["all"], *c["ok"])),
                    *paper, f"{c['epochs']:.2f}", f"{c['wall_time_s']:.1f}"])
    return buf.getvalue()


def table_markdown(cells: dict, records: Sequence[dict], dataset: str) -> str:
    lines = [f"# Table 2 reproduced: {dataset}", ""]
    n_runs = len(records)
    n_div = sum(r["diverged"] for r in records)
    test_images = ", ".join(sorted({f"{r['config']['test_size']:,}" for r in records})) or "-"
    lines += [
        f"{n_runs} runs in {len(cells)} cells; {n_div} diverged (they are counted, not "
        f"dropped). Test error on the {test_images} test images at the last epoch, mean +- "
        "standard deviation over runs.",
        "",
    ]
    if records:
        c = records[0]["config"]
        stopping = {"all": "with both protocols", "bold-driver": "with the bold driver only",
                    "none": "never"}[c["stopping"]]
        collapse = (f"or a validation error above {c['collapse_error']} at any epoch from "
                    f"{c['collapse_epoch']} on (a network collapsed towards chance)"
                    if c["collapse_error"] is not None else "(collapse check off)")
        lines += [
            f"Protocol: learning rate selected per run from {c['lr_grid']} after "
            f"{c['select_epochs']} epochs on {c['select_train']:,} images, by the error on "
            f"{c['select_val']:,} others; then {c['min_epochs']} to {c['max_epochs']} epochs "
            f"on {c['train_size']:,} images with {c['val_size']:,} for validation, mini-batches "
            f"of {c['batch_size']} (summed cross-entropy); exponential decay x{c['decay']}; bold "
            f"driver x{c['bold_increase']} / x{c['bold_decrease']}"
            f"{' with undo' if c['bold_undo'] else ', no undo'}; early stopping {stopping}. "
            f"Diverged: a non-finite cost {collapse}.",
            "",
        ]
        reasons: dict[str, int] = {}
        for r in records:
            reasons[r["stop_reason"]] = reasons.get(r["stop_reason"], 0) + 1
        lines += ["Stop reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
                  + ".", ""]
        wall = [r["wall_time_s"] for r in records]
        lines.append(f"Wall time per run (one torch thread each): mean "
                     f"{statistics.fmean(wall):.1f} s, median {statistics.median(wall):.1f} s, "
                     f"sum {sum(wall) / 3600:.2f} h.")
        stamps = sorted(r["finished_at"] for r in records if r.get("finished_at"))
        if stamps:
            lines.append(f"Runs finished between {stamps[0]} and {stamps[-1]}.")
        lines.append("")
    depths = sorted({k[0] for k in cells})
    paper = dataset == "mnist"
    for label, which in (("non-diverged runs", "ok"), ("all runs", "all")):
        lines += [f"## Ours, paper layout ({label})", ""]
        head = ["depth", "protocol"] + [f"{_NAMES[a]} {_NAMES[u]}" for a in ARCHS
                                        for u in UPDATES]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for d in depths:
            for p in [q for q in PROTOCOLS if any(k[:2] == (d, q) for k in cells)]:
                row = [str(d), _NAMES[p]]
                for a in ARCHS:
                    for u in UPDATES:
                        c = cells.get((d, p, a, u))
                        row.append(_fmt(c[which]) if c else "-")
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += ["## Every cell beside the paper", ""]
    head = ["depth", "protocol", "arch", "update"] + (["paper"] if paper else []) + [
        "ours, non-diverged", "ours, all runs", "runs", "diverged", "mean epochs",
        "selected rates"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (d, p, a, u), c in cells.items():
        row = [str(d), _NAMES[p], _NAMES[a], _NAMES[u]]
        if paper:
            row.append(_fmt(c["paper"]))
        row += [_fmt(c["ok"]), _fmt(c["all"]), str(c["n"]), str(c["n_diverged"]),
                f"{c['epochs']:.1f}", ", ".join(f"{v:g}" for v in c["lrs"])]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "## The paper's findings, tested",
        "",
        "Welch's t interval (95%) for the difference of mean test error, first group minus "
        "second; a positive difference means the second group is better. 'holds': the "
        "interval lies above 0; 'opposite': below 0; otherwise not significant. No "
        "correction for multiple comparisons.",
        "",
        "| finding | first | second | difference, non-diverged [95% CI] | verdict | "
        "difference, all runs [95% CI] | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in comparisons(records):
        lines.append(
            f"| {row['finding']} | {_group(row['first'])} | {_group(row['second'])} | "
            f"{_ci(row['ok'])} | {_verdict(row['ok'])} | {_ci(row['all'])} | "
            f"{_verdict(row['all'])} |"
        )
    lines.append("")
    return "\n".join(lines)


def _trajectory(records: Sequence[dict], length: int) -> list[list[float]]:
    """Test error per epoch, each run carried forward at its final value after it stopped."""
    out = []
    for r in records:
        errs = [h["test_error"] for h in r["history"]]
        out.append(errs + [errs[-1]] * (length - len(errs)))
    return out


def plot_trajectories(records: Sequence[dict], path: str | os.PathLike, depth: int = 4) -> bool:
    """Mean test error per epoch with a one-standard-deviation band (non-diverged runs).

    One panel per architecture (columns) and protocol (rows), one line per update; a run
    that stopped early keeps its final error. Returns ``False`` if there is nothing to plot.
    Needs matplotlib.

    Parameters
    ----------
    records : sequence of dict
        Records of runs with their ``history`` (a ``test_error`` per epoch).
    path : path
        The PNG file to write (atomically).
    depth : int, optional
        The depth whose runs are plotted (default 4).

    Returns
    -------
    bool
        Whether a figure was written: ``False`` when no run of ``depth`` converged.

    Examples
    --------
    >>> from manifold_nets.experiments.config import TrainConfig
    >>> def record(update, error, seed, depth=4):
    ...     config = TrainConfig(depth=depth, update=update, seed=seed).to_dict()
    ...     return {"config": config, "test_error": error, "diverged": False, "epochs": 2,
    ...             "wall_time_s": 1.0, "lr": 0.01, "stop_reason": "max-epochs",
    ...             "history": [{"test_error": error + 0.01}, {"test_error": error}]}
    >>> records = [record("bsgd", 0.030, 0), record("bsgd", 0.032, 1), record("bsgd", 0.031, 2),
    ...            record("un", 0.020, 0), record("un", 0.021, 1), record("un", 0.019, 2)]
    >>> import pathlib, tempfile
    >>> from manifold_nets.experiments.report import plot_trajectories
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "trajectories.png"
    >>> plot_trajectories(records, path, depth=2), path.exists()
    (False, False)
    >>> plot_trajectories(records, path), path.read_bytes()[:4] == b"\\x89PNG"
    (True, True)
    """
    from matplotlib.figure import Figure

    chosen = [r for r in records if r["config"]["depth"] == depth and not r["diverged"]]
    if not chosen:
        return False
    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(len(PROTOCOLS), len(ARCHS), sharex=True, sharey=True, squeeze=False)
    length = max(len(r["history"]) for r in chosen)
    for i, p in enumerate(PROTOCOLS):
        for j, a in enumerate(ARCHS):
            ax = axes[i][j]
            for u in UPDATES:
                rs = [r for r in chosen if (r["config"]["protocol"], r["config"]["arch"],
                                            r["config"]["update"]) == (p, a, u)]
                if not rs:
                    continue
                t = torch.tensor(_trajectory(rs, length), dtype=torch.float64)
                mean = t.mean(0)
                std = t.std(0) if len(rs) > 1 else torch.zeros_like(mean)
                ep = range(1, length + 1)
                line = ax.plot(ep, mean.tolist(), label=f"{_NAMES[u]} (n={len(rs)})")[0]
                ax.fill_between(ep, (mean - std).tolist(), (mean + std).tolist(),
                                color=line.get_color(), alpha=0.2, linewidth=0)
            ax.set_title(f"{_NAMES[a]}, {depth} layers, {_NAMES[p]}")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            if i == len(PROTOCOLS) - 1:
                ax.set_xlabel("epoch")
            if j == 0:
                ax.set_ylabel("test error")
            if ax.has_data():
                ax.legend()
    fig.suptitle(f"{records[0]['config']['dataset']}: mean test error +- 1 std "
                 "(non-diverged runs; stopped runs keep their final error)")
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    return True


def write_report(store, out: str | os.PathLike, dataset: str) -> dict[str, Path]:
    """Write ``table2.md``, ``table2.csv`` and ``trajectories.png`` from every record.

    Parameters
    ----------
    store : ResultStore
        The results store (:class:`~manifold_nets.experiments.store.ResultStore`); its
        records of ``dataset`` are reported.
    out : path
        The folder to write into (created if needed).
    dataset : str
        ``"mnist"`` (reported beside the paper's values) or ``"fashion-mnist"``.

    Returns
    -------
    dict of str to pathlib.Path
        ``markdown`` and ``csv``, and ``figure`` when a figure was drawn (matplotlib is
        installed and the store holds non-diverged runs of depth 4).

    Examples
    --------
    Two cells of depth 2 (the figure is of depth 4, so it is not drawn):

    >>> from manifold_nets.experiments.config import TrainConfig
    >>> def record(update, error, seed, depth=4):
    ...     config = TrainConfig(depth=depth, update=update, seed=seed).to_dict()
    ...     return {"config": config, "test_error": error, "diverged": False, "epochs": 2,
    ...             "wall_time_s": 1.0, "lr": 0.01, "stop_reason": "max-epochs",
    ...             "history": [{"test_error": error + 0.01}, {"test_error": error}]}
    >>> records = [record(u, e, s, depth=2) for s, (u, e) in enumerate(
    ...     [("bsgd", 0.030), ("bsgd", 0.032), ("un", 0.020), ("un", 0.021)])]
    >>> import pathlib, tempfile
    >>> from manifold_nets.experiments.store import ResultStore
    >>> from manifold_nets.experiments.report import write_report
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> store = ResultStore(root / "grid")
    >>> for k, r in enumerate(records):
    ...     _ = store.write(f"run-{k}", r)
    >>> paths = write_report(store, root / "report", "mnist")
    >>> sorted(paths)
    ['csv', 'markdown']
    >>> paths["csv"].read_text().splitlines()[1]
    '2,bold-driver,arch2,bsgd,2,0,0.031000,0.001414,0.031000,0.001414,0.0206,0.0024,2.00,1.0'
    >>> paths["markdown"].read_text().splitlines()[0]
    '# Table 2 reproduced: mnist'
    """
    records = [r for r in store.records() if r["config"]["dataset"] == dataset]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cells = cell_summaries(records)
    paths = {"markdown": out / "table2.md", "csv": out / "table2.csv"}
    atomic_write(paths["markdown"], table_markdown(cells, records, dataset))
    atomic_write(paths["csv"], table_csv(cells))
    png = out / "trajectories.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed, so trajectories.png is not drawn; pip install "
              "'manifold-nets[experiments]', then rerun with --report-only", file=sys.stderr)
        return paths
    if records and plot_trajectories(records, png):
        paths["figure"] = png
    return paths


