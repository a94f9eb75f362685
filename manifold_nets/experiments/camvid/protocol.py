r"""The protocol of one update on CamVid: select the rate, train every seed, test.

With several candidate rates, each trains a short run on the first seed and
:func:`~manifold_nets.experiments.config.best_rate` picks the one with the best validation
mean IoU (the rule Table 2 applies to its errors); then every seed trains at that rate, is
tested at the model's resolution and at CamVid's 360 x 480, and its weights are written.
Every run's record is a file of the output folder, so a killed protocol continues where it
stopped and a finished run is never trained twice (:func:`train_update`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..config import best_rate
from ..io import atomic_write
from ..store import ResultStore
from .data import FULL_SIZE, CamVid, find_camvid, load_camvid
from .training import CamVidConfig, evaluate, train
from .weights import save_weights

__all__ = ["format_metrics", "selection_scores", "train_update"]


def format_metrics(m: dict | None) -> str:
    """One line of the three summary metrics, in percent (``"diverged"`` for ``None``).

    Parameters
    ----------
    m : dict or None
        What :func:`~manifold_nets.experiments.camvid.training.evaluate` returns, or
        ``None`` for a run that diverged.

    Returns
    -------
    str
        Global accuracy, class-average accuracy and mean IoU.

    Examples
    --------
    >>> from manifold_nets.experiments.camvid.protocol import format_metrics
    >>> format_metrics({"global_acc": 0.673, "class_avg_acc": 0.538, "mean_iou": 0.338})
    'global 67.3  class-avg 53.8  mIoU 33.8'
    >>> format_metrics(None)
    'diverged'
    """
    if m is None:
        return "diverged"
    return (f"global {100 * m['global_acc']:.1f}  class-avg {100 * m['class_avg_acc']:.1f}  "
            f"mIoU {100 * m['mean_iou']:.1f}")


def _run(config: CamVidConfig, data: dict[str, CamVid], out: Path, name: str, *,
         test: CamVid | None = None, full_labels: torch.Tensor | None = None,
         weights: bool = False, device: str = "cpu",
         log: Callable[[str], None] = print) -> dict:
    """One run, resumable: its record is ``out/name.json`` once done (then reused)."""
    store = ResultStore(out, runs=".", indent=1)
    record = store.finished(name, config.to_dict())
    if record is not None:
        log(f"{name}: done earlier ({store.path(name)})")
        return record
    ckpt = out / f"{name}.ckpt"
    record, model = train(config, data, checkpoint=ckpt, device=device,
                          log=lambda s: log(f"  {name}: {s}"))
    if test is not None and not record["diverged"]:
        record["test"] = evaluate(model, test)
        if full_labels is not None:
            record["test_full"] = evaluate(model, test, labels=full_labels)
    if weights and not record["diverged"]:
        save_weights(out / f"{name}.pt", model, config, record.get("test"))
    store.write(name, record)
    ckpt.unlink(missing_ok=True)
    return record


def selection_scores(records: Sequence[dict]) -> dict[str, float | None]:
    """The validation mean IoU of each selection run, by its rate as text (``None``: the
    run diverged), as ``summary.json`` records it.

    Parameters
    ----------
    records : sequence of dict
        The selection runs' records (``config``, ``diverged``, ``val``).

    Returns
    -------
    dict
        ``{f"{lr:g}": mean IoU or None}``.

    Examples
    --------
    >>> from manifold_nets.experiments.camvid.protocol import selection_scores
    >>> selection_scores([{"config": {"lr": 0.1}, "diverged": True, "val": None},
    ...                   {"config": {"lr": 0.01}, "diverged": False, "val": {"mean_iou": 0.4}}])
    {'0.1': None, '0.01': 0.4}
    """
    return {f"{r['config']['lr']:g}": None if r["diverged"] else r["val"]["mean_iou"]
            for r in records}


def train_update(config: CamVidConfig, out: str | Path, *,
                 lr_grid: Sequence[float] | None = None, seeds: Sequence[int] = (0,),
                 select_epochs: int = 2, data_dir=None, device: str = "cpu",
                 command: str | None = None, log: Callable[[str], None] = print) -> dict:
    """The protocol of one update: select the rate on the validation images, train every
    seed at it, test; resumable.

    Parameters
    ----------
    config : CamVidConfig
        The full runs' configuration; its ``lr`` is the rate when ``lr_grid`` holds fewer
        than two rates, its ``seed`` is replaced by each of ``seeds``.
    out : path
        The folder of the update's records, weights and checkpoints (``out/<update>`` is
        written).
    lr_grid : sequence of float, optional
        The candidate rates; each trains ``select_epochs`` epochs on the first seed.
    seeds : sequence of int
        The seeds of the full runs; the first also seeds the selection.
    select_epochs : int
        Epochs of each selection run.
    data_dir : path, optional
        Where to look for CamVid first
        (:func:`~manifold_nets.experiments.camvid.data.find_camvid`).
    device : str
        Where the runs train.
    command : str, optional
        The command line, recorded in the summary.
    log : callable
        Receives one line per event (runs, epochs, the selection).

    Returns
    -------
    dict
        The summary, also written to ``out/<update>/summary.json``: ``update``, ``lr``,
        ``seeds``, ``selection`` (:func:`selection_scores`), ``select_epochs``, ``runs``
        (the seeds' record files) and ``command``.

    Raises
    ------
    ValueError
        No seeds, ``select_epochs`` below 1, a rate the configuration refuses, a record of
        another configuration in ``out``, or every candidate rate diverged.
    manifold_nets.experiments.data.DataError
        If CamVid cannot be found or fails its checksums.

    Examples
    --------
    The arguments are checked before any data is read:

    >>> from manifold_nets.experiments.camvid import CamVidConfig
    >>> from manifold_nets.experiments.camvid.protocol import train_update
    >>> train_update(CamVidConfig(), "out", lr_grid=(0.1, -1.0))
    Traceback (most recent call last):
    ...
    ValueError: Invalid learning rate: -1.0
    """
    if not seeds:
        raise ValueError("train_update: give at least one seed")
    if select_epochs < 1:
        raise ValueError(f"select_epochs must be >= 1, got {select_epochs}")
    grid = list(lr_grid) if lr_grid else [config.lr]
    selecting = [dataclasses.replace(config, lr=lr, epochs=select_epochs, seed=seeds[0])
                 for lr in grid]
    runs = [dataclasses.replace(config, seed=s) for s in seeds]  # checked before the data
    folder = Path(out) / config.update
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    found = find_camvid(data_dir)
    data = {s: load_camvid(s, config.size, folder=found) for s in ("train", "val")}
    log(f"CamVid at {config.height}x{config.width}: {len(data['train'])} train, "
        f"{len(data['val'])} val ({time.perf_counter() - start:.1f} s)")
    selection: dict[str, float | None] = {}
    if len(grid) > 1:
        records = []
        for c in selecting:
            r = _run(c, data, folder, f"select-lr{c.lr:g}", device=device, log=log)
            records.append(r)
            log(f"{config.update} lr {c.lr:g}: {select_epochs} epochs, val "
                f"{format_metrics(r['val'])}")
        selection = selection_scores(records)
        best = best_rate({float(k): v for k, v in selection.items()}, lower_is_better=False)
        log(f"selected lr {best:g} (best validation mean IoU)")
    else:
        best = grid[0]
    test = load_camvid("test", config.size, folder=found)
    full = load_camvid("test", None, folder=found).labels if config.size != FULL_SIZE else None
    for c in runs:
        c = dataclasses.replace(c, lr=best)
        r = _run(c, data, folder, f"seed{c.seed}", test=test, full_labels=full, weights=True,
                 device=device, log=log)
        log(f"{config.update} lr {best:g} seed {c.seed}: test {format_metrics(r.get('test'))} "
            f"({r['wall_time_s'] / 60:.1f} min)")
    summary = {"update": config.update, "lr": best, "seeds": list(seeds),
               "selection": selection, "select_epochs": select_epochs,
               "runs": [f"seed{s}.json" for s in seeds], "command": command}
    atomic_write(folder / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary
