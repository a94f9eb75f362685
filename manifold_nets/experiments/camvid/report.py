r"""Reports of ``camvid train`` folders: test metrics over seeds beside the SegNet papers',
per-class IoU, the rate selection, Welch's test between updates, the class weights,
training curves and predictions in CamVid's colours (:func:`build_report`).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ...table1 import NAMES
from ..data import DataError
from ..io import atomic_write
from .data import (
    CLASSES,
    COLORS,
    FULL_SIZE,
    PUBLISHED_WEIGHTS,
    SEGNET_BASIC,
    SEGNET_PAPER,
    CamVid,
    find_camvid,
    load_camvid,
    median_frequency_weights,
)
from .protocol import format_metrics, selection_scores
from .training import CamVidConfig, evaluate, predict
from .weights import load_weights

__all__ = ["WeightsScores", "build_report", "colorize", "evaluate_weights"]


def colorize(labels: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(..., H, W)`` labels as ``(..., H, W, 3)`` ``uint8`` RGB in CamVid's
    :data:`~manifold_nets.experiments.camvid.data.COLORS`.

    Parameters
    ----------
    labels : torch.Tensor or numpy.ndarray
        Integer labels 0 .. 11 (:data:`~manifold_nets.experiments.camvid.data.VOID` is
        drawn black).

    Returns
    -------
    numpy.ndarray
        ``uint8`` RGB, one more trailing dimension of size 3.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.experiments.camvid import colorize
    >>> rgb = colorize(torch.tensor([[3, 11]]))  # Road, void
    >>> rgb.shape, rgb[0, 0].tolist(), rgb[0, 1].tolist()
    ((1, 2, 3), [128, 64, 128], [0, 0, 0])
    """
    return np.asarray(COLORS, dtype=np.uint8)[np.asarray(labels)]


_NAMES = NAMES


def _name(update: str, config: dict) -> str:
    """The report's name of a run: the update, and the optimiser where it is torch's."""
    return "torch.optim.SGD" if config.get("optimizer") == "torch-sgd" else _NAMES[update]


def _records(folder: Path) -> dict[str, tuple[dict, list[dict]]]:
    """``{update: (summary, seed records)}`` of a ``camvid train --out`` folder."""
    found = {}
    for update in ("un", "sm", "bsgd"):
        path = folder / update / "summary.json"
        if path.exists():
            summary = json.loads(path.read_text())
            runs = [json.loads((folder / update / r).read_text()) for r in summary["runs"]]
        else:  # still training: the seeds finished so far
            runs = [json.loads(p.read_text()) for p in sorted((folder / update).glob(
                "seed*.json"))]
            if not runs:
                continue
            chosen = [json.loads(p.read_text()) for p in sorted((folder / update).glob(
                "select-lr*.json"))]
            summary = {"update": update, "lr": runs[0]["config"]["lr"],
                       "seeds": [r["config"]["seed"] for r in runs],
                       "selection": selection_scores(chosen),
                       "select_epochs": chosen[0]["config"]["epochs"] if chosen else None,
                       "runs": []}
        found[update] = (summary, runs)
    return found


def _differences(results: dict[str, tuple[dict, list[dict]]]) -> list[str]:
    """Markdown: every pair of updates compared by Welch's test on the seeds' test metrics,
    with how large a difference the seeds could have shown."""
    from ..report import welch

    ok = {u: [r["test"] for r in runs if not r["diverged"]] for u, (_, runs) in results.items()}
    pairs = [(a, b) for a, b in itertools.combinations(results, 2)
             if len(ok[a]) >= 2 and len(ok[b]) >= 2]
    if not pairs:
        return []
    lines = ["", "## Do the updates differ? (Welch's test on the seeds' test metrics)", "",
             "Difference of the means in points, its 95 % interval, the two-sided p-value, "
             "and the interval's half-width: a difference smaller than that cannot be told "
             "from the spread over seeds with this many of them. With two seeds an update's "
             "spread rests on one degree of freedom, so a small p can come from two seeds "
             f"that happened to agree; and {2 * len(pairs)} comparisons are made, so at the "
             f"5 % level one of them looks significant by chance with odds of up to "
             f"{100 * (1 - 0.95 ** (2 * len(pairs))):.0f} % (were they independent).", "",
             "| pair | metric | difference | 95 % interval | p | half-width | seeds |",
             "|---|---|---|---|---|---|---|"]
    for a, b in pairs:
        for key, label in (("global_acc", "global acc."), ("mean_iou", "mean IoU")):
            w = welch([100 * m[key] for m in ok[a]], [100 * m[key] for m in ok[b]])
            name = (f"{_name(a, results[a][1][0]['config'])} - "
                    f"{_name(b, results[b][1][0]['config'])}")
            lines.append(f"| {name} | {label} | {w['diff']:+.1f} | [{w['low']:+.1f}, "
                         f"{w['high']:+.1f}] | {w['p']:.2f} | {(w['high'] - w['low']) / 2:.1f} "
                         f"| {w['n1']} + {w['n2']} |")
    return lines


def report_tables(results: dict[str, tuple[dict, list[dict]]]) -> str:
    """Markdown: test metrics over seeds beside the SegNet paper's, per-class IoU, and the
    rate selection."""
    from ..report import mean_std

    def cell(values):
        m, sd = mean_std([100 * v for v in values])
        return f"{m:.1f} ± {sd:.1f}" if len(values) > 1 else f"{m:.1f} (one seed)"

    lines = ["## Test metrics, % (mean ± std over seeds)", "",
             "| update | lr | seeds | resolution | global acc. | class-avg. acc. | mean IoU |",
             "|---|---|---|---|---|---|---|"]
    for update, (summary, runs) in results.items():
        ok = [r["test"] for r in runs if not r["diverged"]]
        c = runs[0]["config"]
        cells = ([cell([m[k] for m in ok]) for k in ("global_acc", "class_avg_acc", "mean_iou")]
                 if ok else ["diverged"] * 3)
        lines.append(f"| {_name(update, c)} | {summary['lr']:g} | {len(ok)}/{len(runs)} | "
                     f"{c['height']}x{c['width']} | " + " | ".join(cells) + " |")
    b, p = SEGNET_BASIC, SEGNET_PAPER
    lines.append(f"| SegNet-Basic, published (64 filters) | - | - | 360x480 | "
                 f"{b['global_acc']} | {b['class_avg_acc']} | {b['mean_iou']} |")
    lines.append(f"| SegNet paper (VGG16 encoder) | - | - | 360x480 | {p['global_acc']} | "
                 f"{p['class_avg_acc']} | {p['mean_iou']} |")
    if any("test_full" in r for _, runs in results.values() for r in runs):
        lines += ["", "## The same runs scored at CamVid's 360x480, % (predictions upsampled "
                  "by nearest neighbour)", "",
                  "| update | seeds | global acc. | class-avg. acc. | mean IoU |",
                  "|---|---|---|---|---|"]
        for update, (_, runs) in results.items():
            full = [r["test_full"] for r in runs if "test_full" in r]
            if full:
                lines.append(f"| {_name(update, runs[0]['config'])} | {len(full)} | " + " | ".join(
                    cell([m[k] for m in full])
                    for k in ("global_acc", "class_avg_acc", "mean_iou")) + " |")
        lines.append(f"| SegNet-Basic, published | - | {b['global_acc']} | "
                     f"{b['class_avg_acc']} | {b['mean_iou']} |")
    lines += ["", "## Per-class test IoU, % (mean over seeds)", "",
              "| class | " + " | ".join(_name(u, runs[0]["config"])
                                        for u, (_, runs) in results.items()) + " |",
              "|---|" + "---|" * len(results)]
    for k, name in enumerate(CLASSES):
        row = []
        for _, runs in results.values():
            vals = [r["test"]["per_class_iou"][k] for r in runs if not r["diverged"]
                    and r["test"]["per_class_iou"][k] is not None]
            row.append(f"{100 * float(np.mean(vals)):.1f}" if vals else "-")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lrs = sorted({lr for s, _ in results.values() for lr in s["selection"]}, key=float,
                 reverse=True)
    if lrs:
        lines += ["", "## Rate selection: validation mean IoU, % (first seed)", "",
                  "| update | epochs | " + " | ".join(f"lr {lr}" for lr in lrs) + " |",
                  "|---|---|" + "---|" * len(lrs)]
        for update, (summary, _) in results.items():
            cells = [("-" if lr not in summary["selection"] else "diverged"
                      if summary["selection"][lr] is None
                      else f"{100 * summary['selection'][lr]:.1f}") for lr in lrs]
            lines.append(f"| {_NAMES[update]} | {summary['select_epochs']} | "
                         + " | ".join(cells) + " |")
    lines += _differences(results)
    lines += ["", "## Time per run", "",
              "| update | seed | epochs | wall time (min) | CPU time (min) | torch threads |",
              "|---|---|---|---|---|---|"]
    for update, (_, runs) in results.items():
        for r in runs:
            cpu = f"{r['cpu_time_s'] / 60:.1f}" if "cpu_time_s" in r else "not recorded"
            wall = f"{r['wall_time_s'] / 60:.1f}"
            if r.get("time_from_epoch", 1) > 1:  # resumed before checkpoints kept the time
                part = f" (epochs {r['time_from_epoch']}-{r['config']['epochs']} only)"
                wall, cpu = wall + part, cpu + part
            lines.append(f"| {_name(update, r['config'])} | {r['config']['seed']} | "
                         f"{len(r['history'])} | "
                         f"{wall} | {cpu} | {r['torch_threads']} |")
    return "\n".join(lines)


def weights_table(train_labels: torch.Tensor) -> str:
    """Markdown: the published class weights beside
    :func:`~manifold_nets.experiments.camvid.data.median_frequency_weights` of
    ``train_labels``."""
    computed = median_frequency_weights(train_labels).tolist()
    lines = ["| class | published | computed | ratio |", "|---|---|---|---|"]
    for name, p, c in zip(CLASSES, PUBLISHED_WEIGHTS, computed, strict=True):
        lines.append(f"| {name} | {p:.4f} | {c:.4f} | {c / p:.2f} |")
    return "\n".join(lines)


def plot_predictions(folder: Path, test: CamVid, path: str | os.PathLike,
                     updates: Sequence[str] = ("un", "bsgd"),
                     index: Sequence[int] = (0, 60, 120, 200), seed: int = 0) -> list[str]:
    """Test images, ground truth and each update's predictions (weights of ``seed``) in
    CamVid's colours; returns the updates whose weights were missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    preds, missing = {}, []
    index = [i for i in index if i < len(test)]
    for u in updates:
        w = folder / u / f"seed{seed}.pt"
        if not w.exists():
            missing.append(u)
            continue
        model, config, _ = load_weights(w)
        preds[u] = predict(model, test.images[index])
    cols = 2 + len(preds)
    fig, axes = plt.subplots(len(index), cols, figsize=(2.6 * cols, 2.0 * len(index)),
                             squeeze=False)
    for row, i in enumerate(index):
        panels = [(test.images[i].permute(1, 2, 0).numpy(), "test image"),
                  (colorize(test.labels[i]), "ground truth")]
        panels += [(colorize(p[row]), f"{_NAMES[u]} prediction") for u, p in preds.items()]
        for ax, (img, title) in zip(axes[row], panels, strict=True):
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
    handles = [matplotlib.patches.Patch(color=np.asarray(COLORS[k]) / 255,
                                        label=(CLASSES + ("void",))[k]) for k in range(12)]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)
    return missing


def plot_curves(results: dict[str, tuple[dict, list[dict]]], path: str | os.PathLike) -> None:
    """Training cost and validation mean IoU per epoch, every seed, every update."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    colors = {"un": "tab:blue", "sm": "tab:green", "bsgd": "tab:red"}
    for update, (_, runs) in results.items():
        for j, r in enumerate(runs):
            e = [h["epoch"] for h in r["history"]]
            label = _name(update, r["config"]) if j == 0 else None
            a.plot(e, [h["cost"] for h in r["history"]], color=colors[update], label=label,
                   alpha=0.8)
            val = [h for h in r["history"] if "val_mean_iou" in h]
            if val:
                b.plot([h["epoch"] for h in val], [100 * h["val_mean_iou"] for h in val],
                       color=colors[update], label=label, alpha=0.8, marker="." if
                       len(val) < len(e) else None)
    a.set(xlabel="epoch", ylabel="training loss (weighted CE)", title="training loss")
    b.set(xlabel="epoch", ylabel="validation mean IoU (%)", title="validation mean IoU")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)


def _score_at_full_size(folder: Path, results: dict, data: Path) -> None:
    """Add ``test_full`` to the records that lack it and whose weights are in ``folder``
    (runs recorded before the training command scored them at 360 x 480)."""
    full = None
    for update, (_, runs) in results.items():
        for r in runs:
            path = folder / update / f"seed{r['config']['seed']}.pt"
            if "test_full" in r or r["diverged"] or not path.exists():
                continue
            model, config, _ = load_weights(path)
            if config.size == FULL_SIZE:
                continue
            if full is None:
                full = load_camvid("test", None, folder=data).labels
            test = load_camvid("test", config.size, folder=data)
            r["test_full"] = evaluate(model, test, labels=full)


class WeightsScores(NamedTuple):
    """What :func:`evaluate_weights` measured of a weights file, and its lines of text.

    Parameters
    ----------
    config : CamVidConfig
        The configuration the weights were trained with.
    split : str
        The split evaluated.
    images : int
        Its number of images.
    metrics : dict
        :func:`~manifold_nets.experiments.camvid.training.evaluate` at the trained
        resolution.
    full : dict or None
        The same at CamVid's 360 x 480 (predictions upsampled by nearest neighbour);
        ``None`` where the model was trained at it.
    stored : dict or None
        The test metrics stored in the file, if any.

    Examples
    --------
    >>> from manifold_nets.experiments.camvid import CamVidConfig, WeightsScores
    >>> m = {"global_acc": 0.7, "class_avg_acc": 0.5, "mean_iou": 0.3}
    >>> WeightsScores(CamVidConfig(), "test", 233, m, None, None).images
    233
    """

    #: The configuration the weights were trained with.
    config: CamVidConfig
    #: The split evaluated.
    split: str
    #: The number of images evaluated.
    images: int
    #: The metrics at the trained resolution.
    metrics: dict
    #: The metrics at 360 x 480, or ``None``.
    full: dict | None
    #: The test metrics stored with the weights, or ``None``.
    stored: dict | None

    @property
    def matches(self) -> bool | None:
        """Whether the test metrics equal those stored with the weights, to 1e-6
        (``None``: none stored, or another split).

        Returns
        -------
        bool or None
            The answer.

        Examples
        --------
        >>> from manifold_nets.experiments.camvid import CamVidConfig, WeightsScores
        >>> m = {"global_acc": 0.7, "class_avg_acc": 0.5, "mean_iou": 0.3}
        >>> WeightsScores(CamVidConfig(), "test", 233, m, None, m).matches
        True
        """
        if self.stored is None or self.split != "test":
            return None
        return all(abs(self.metrics[k] - self.stored[k]) < 1e-6
                   for k in ("global_acc", "class_avg_acc", "mean_iou"))

    def lines(self) -> list[str]:
        """The scores as ``manifold-nets camvid evaluate`` prints them.

        Returns
        -------
        list of str
            One line of summary metrics and one of per-class IoU per resolution, then
            the comparison with the stored metrics.

        Examples
        --------
        >>> from manifold_nets.experiments.camvid import CamVidConfig, WeightsScores
        >>> m = {"global_acc": 0.7, "class_avg_acc": 0.5, "mean_iou": 0.3,
        ...      "per_class_iou": [0.5] * 10 + [None]}
        >>> print("\\n".join(WeightsScores(CamVidConfig(), "test", 233, m, None, m).lines()))
        ... # doctest: +ELLIPSIS
        test (233 images): global 70.0  class-avg 50.0  mIoU 30.0
        per-class IoU: Sky 50.0, Building 50.0, ..., Bicyclist -
        matches the metrics stored with the weights
        """
        out = []
        for m, where in ((self.metrics, f"{self.split} ({self.images} images)"),
                         (self.full, f"{self.split} at CamVid's {FULL_SIZE[0]}x{FULL_SIZE[1]} "
                          "(predictions upsampled by nearest neighbour)")):
            if m is not None:
                out.append(f"{where}: {format_metrics(m)}")
                out.append("per-class IoU: " + ", ".join(
                    f"{c} {'-' if v is None else f'{100 * v:.1f}'}"
                    for c, v in zip(CLASSES, m["per_class_iou"], strict=True)))
        if self.matches is not None:
            out.append("matches the metrics stored with the weights" if self.matches else
                       "differs from the metrics stored with the weights: "
                       f"{format_metrics(self.stored)}")
        return out


def evaluate_weights(path: str | os.PathLike, split: str = "test", *, data_dir=None,
                     device: str = "cpu") -> WeightsScores:
    """Score a weights file of ``camvid train`` on a split, at its resolution and at
    CamVid's 360 x 480, and compare with the test metrics stored in it.

    Parameters
    ----------
    path : path
        A file written by :func:`~manifold_nets.experiments.camvid.weights.save_weights`.
    split : {"train", "val", "test"}
        The split scored.
    data_dir : path, optional
        The CamVid folder (:func:`~manifold_nets.experiments.camvid.data.find_camvid`);
        it is verified once.
    device : str
        Where the model runs.

    Returns
    -------
    WeightsScores
        The scores; :meth:`WeightsScores.lines` gives them as text.

    Raises
    ------
    ValueError
        If the weights file cannot be read.
    ~manifold_nets.experiments.data.DataError
        If CamVid cannot be found or does not verify.

    Examples
    --------
    >>> import os
    >>> import tempfile
    >>> from manifold_nets.experiments.camvid import evaluate_weights
    >>> try:
    ...     evaluate_weights(os.path.join(tempfile.mkdtemp(), "missing.pt"))
    ... except ValueError as err:
    ...     print(str(err).endswith("does not exist"))
    True
    """
    model, config, stored = load_weights(path)
    model.to(device)
    folder = find_camvid(data_dir)  # verified once, read at both resolutions
    data = load_camvid(split, config.size, folder=folder)
    metrics = evaluate(model, data)
    full = None
    if config.size != FULL_SIZE:
        full = evaluate(model, data, labels=load_camvid(split, None, folder=folder).labels)
    return WeightsScores(config, split, len(data), metrics, full, stored)


def build_report(folder: str | os.PathLike, *, data_dir=None, figure=None, curves=None
                 ) -> tuple[str, list[str]]:
    """The report of a ``camvid train --out`` folder, and the figures it asks for.

    Parameters
    ----------
    folder : path
        The ``--out`` folder (one sub-folder per update).
    data_dir : path, optional
        Where CamVid is (:func:`~manifold_nets.experiments.camvid.data.find_camvid`, no
        download); without it the report has no full-size scores, no class-weight table
        and no predictions figure, and says so.
    figure, curves : path, optional
        Write the predictions figure and the training curves (PNG) here.

    Returns
    -------
    text : str
        The report (Markdown): the tables of every update, and the class weights beside the
        computed ones where the data is at hand.
    notes : list of str
        What was written, and what could not be made.

    Raises
    ------
    ValueError
        If ``folder`` holds no ``camvid train`` results.

    Examples
    --------
    >>> import tempfile
    >>> from manifold_nets.experiments.camvid.report import build_report
    >>> build_report(tempfile.mkdtemp())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: ... holds no `camvid train` results (no <update>/summary.json)
    """
    folder = Path(folder)
    results = _records(folder)
    if not results:
        raise ValueError(f"{folder} holds no `camvid train` results (no <update>/summary.json)")
    notes, text = [], []
    try:
        data = find_camvid(data_dir, download=False)
    except DataError as err:
        text.append(f"(no CamVid folder, so no full-size scores, class-weight table or "
                    f"figure: {err})\n")
        data = None
    if data is not None:
        _score_at_full_size(folder, results, data)
    text.append(report_tables(results))
    if data is not None:
        train_labels = load_camvid("train", None, folder=data).labels
        text.append("\n## Class weights: published beside computed from the training "
                    "labels\n")
        text.append(weights_table(train_labels))
    if curves:
        plot_curves(results, curves)
        notes.append(f"curves written to {curves}")
    if figure and data is not None:
        c = next(iter(results.values()))[1][0]["config"]
        test = load_camvid("test", (c["height"], c["width"]), folder=data)
        missing = plot_predictions(folder, test, figure)
        notes.append(f"figure written to {figure}"
                     + (f" (no weights of {', '.join(missing)})" if missing else ""))
    return "\n".join(text), notes
