r"""The paper's protocol (Section 4) on the two engines of :func:`~.loop.fit_runs`.

A run (:func:`train`) is

1. **split** the 60,000 training images at random into ``train_size`` (50,000) for
   training and ``val_size`` (10,000) for validation; draw ``select_train`` (1,000) and
   ``select_val`` (500) other images from the training part for the learning-rate
   selection;
2. **select the learning rate** (:func:`select_lr`): from the same initial weights, train
   for ``select_epochs`` (50) epochs with every rate of ``lr_grid``
   (:math:`10^{-2} .. 10^{-5}`) under the run's protocol, and keep the rate with the
   lowest final error on the ``select_val`` images (ties go to the smaller rate);
3. **train** from those initial weights with the selected rate (:func:`fit`) for
   ``min_epochs`` (25) to ``max_epochs`` (60) epochs, with the stopping criteria of
   :class:`~.config.StoppingRule`, and report the error on the 10,000 test images.

Divergence (:class:`~.config.Divergence`): a non-finite epoch cost that the schedule does
not undo, or a network that has collapsed towards chance (validation error above
``collapse_error`` = 0.5 at any epoch from ``collapse_epoch`` = 10 on; a dead ReLU network
predicting one class sits near 0.9). A diverged run stops at once, is marked ``diverged``
in its record and is never saved as weights. Non-finite logits count as errors.

Two engines run the same loop (:func:`~.loop.fit_runs`):

- **sequential** (:func:`train`, :func:`fit`): one :class:`~manifold_nets.Arch1` /
  :class:`~manifold_nets.Arch2` module per run, autograd and
  :class:`~manifold_nets.InvariantSGD` (:class:`~.loop.ModuleRuns`);
- **stacked** (:func:`train_group`, :func:`fit_stacked`): a group of runs of one
  architecture and depth (any seed, update, protocol and rate) as one
  :class:`~.stacked.StackedNet`; the learning-rate selection trains
  ``runs x len(lr_grid)`` networks at once. A group can checkpoint after every epoch and
  resume from it.

Each protocol step is written once for both engines: what it trains on, its schedule,
stopping rule and divergence check, and where its errors are measured (the selection's
candidate rates, the training), and one rule picks the rate
(:func:`~.config.best_rate`). The engines differ only in how they run a step, one network
after the other or all at once, and in how they checkpoint it.

Everything is seeded from ``TrainConfig.seed``: the split, the selection subsets, the
initial weights and the batch order. On CPU the same seed gives the same numbers; in
float64 the two engines give the same records to rounding.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from ..declare import declare
from ..nets import Arch1, Arch2
from .checkpoint import GroupCheckpoint
from .config import (
    Divergence,
    StoppingRule,
    TrainConfig,
    best_rate,
    make_schedule,
    split_indices,
    stopping_rule,
    subseed,
)
from .loop import FitResult, LoopState, ModuleRuns, Stream, fit_runs
from .progress import tqdm
from .stacked import StackedNet, error_rates

__all__ = [
    "build_model",
    "error_rate",
    "fit",
    "fit_stacked",
    "group_key",
    "select_lr",
    "select_lr_stacked",
    "train",
    "train_group",
]


# --------------------------------------------------------------------------------------
# Model and evaluation.


def build_model(config: TrainConfig, generator: torch.Generator | None = None):
    """The network of ``config``, initialised from ``generator`` and declared for its update.

    Create the optimiser afterwards (:func:`manifold_nets.declare` turns the declared
    parameters into :class:`geoopt.ManifoldParameter` in place).

    Parameters
    ----------
    config : TrainConfig
        Its ``arch``, ``depth``, ``width`` and ``update`` are used; the net has 784 inputs
        and 10 classes (MNIST and Fashion-MNIST).
    generator : torch.Generator, optional
        The source of the Gaussian initial weights (default: torch's global generator).

    Returns
    -------
    Arch1 or Arch2
        The declared model.

    Examples
    --------
    >>> from manifold_nets.experiments.config import TrainConfig
    >>> from manifold_nets.experiments.engines import build_model
    >>> net = build_model(TrainConfig(arch="arch1", depth=2, width=8, update="un"),
    ...                   torch.Generator().manual_seed(0))
    >>> type(net).__name__, net(torch.rand(3, 784)).shape
    ('Arch1', torch.Size([3, 10]))
    >>> w = net.filters()[0]
    >>> type(w.manifold).__name__, torch.allclose(w.norm(dim=1), torch.ones(8))
    ('ObliqueManifold', True)
    """
    cls = Arch1 if config.arch == "arch1" else Arch2
    model = cls(config.depth, config.width, 784, 10, generator=generator)
    declare(model, config.update)
    return model


def _init_generator(config: TrainConfig) -> torch.Generator:
    return torch.Generator().manual_seed(subseed(config.seed, 2))


def _order_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(subseed(seed, 3))


@torch.no_grad()
def error_rate(model, x: torch.Tensor, y: torch.Tensor, chunk: int = 10000) -> float:
    """Fraction of misclassified images (eval mode); non-finite logits count as errors.

    The model is put in eval mode for the pass and back in the mode it was in.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier returning ``(n, classes)`` logits.
    x, y : torch.Tensor
        Images and labels.
    chunk : int, optional
        Images per forward pass (default 10000).

    Returns
    -------
    float
        The fraction of images whose arg-max logit is not the label, or whose logits are
        not all finite (0 for no images).

    Examples
    --------
    >>> from manifold_nets.experiments.engines import error_rate
    >>> model = torch.nn.Linear(2, 2, bias=False)
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.eye(2))
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [float("nan"), 0.0]])
    >>> error_rate(model, x, torch.tensor([0, 1, 1, 0]))
    0.5
    """
    was_training = model.training
    model.eval()
    wrong = 0
    for i in range(0, x.shape[0], chunk):
        logits = model(x[i : i + chunk])
        bad = (logits.argmax(1) != y[i : i + chunk]) | ~torch.isfinite(logits).all(1)
        wrong += int(bad.sum())
    model.train(was_training)
    return wrong / max(1, x.shape[0])


def _record(config: TrainConfig, lr: float, selection: dict, result: FitResult,
            select_time: float, wall: float) -> dict:
    """The JSON-ready record of one run, the same for both engines."""
    last = result.history[-1]
    return {
        "config": config.to_dict(),
        "lr": lr,
        "selection": {repr(k): v for k, v in selection.items()},
        "history": result.history,
        "epochs": len(result.history),
        "test_error": last["test_error"],
        "val_error": last["val_error"],
        "stop_reason": result.stop_reason,
        "diverged": result.diverged,
        "saved": None,
        "select_time_s": round(select_time, 3),
        "wall_time_s": round(wall, 3),
        "torch": torch.__version__,
    }


# --------------------------------------------------------------------------------------
# The protocol's steps, written once for both engines.


class _Step(NamedTuple):
    """One protocol step of one run: what :func:`~.loop.fit_runs` needs besides its rate."""

    name: str  # "select" or "train" (the stacked engine's checkpoint phase)
    stream: str  # the part of the run's split it trains on
    schedule: object
    stopping: StoppingRule
    divergence: Divergence | None
    measured: tuple[str, ...]  # where its errors are measured: parts of the split, "test"
    every_epoch: bool  # measured after every epoch; else once, when the run stops


def _selection(config: TrainConfig) -> _Step:
    """Step 2, one candidate rate: ``select_epochs`` epochs on the ``select_train`` images
    without early stopping or divergence check, then the error on ``select_val``."""
    stopping = StoppingRule(config.select_epochs, config.select_epochs, enabled=False)
    return _Step("select", "select_train", make_schedule(config), stopping, None,
                 ("select_val",), every_epoch=False)


def _training(config: TrainConfig) -> _Step:
    """Step 3: the ``train`` images with the stopping rule and the divergence check, and
    the validation and test errors after every epoch."""
    return _Step("train", "train", make_schedule(config), stopping_rule(config),
                 Divergence(config.collapse_error, config.collapse_epoch), ("val", "test"),
                 every_epoch=True)


def _images(part: str, config: TrainConfig, data, split: dict) -> tuple:
    if part == "test":
        return data.x_test[: config.test_size], data.y_test[: config.test_size]
    return data.x_train[split[part]], data.y_train[split[part]]


def _measurer(runs: Sequence[TrainConfig], parts: Sequence[str], data, splits: dict,
              errors: Callable) -> Callable:
    """``measure(engine, ids)``: the errors of the runs ``ids`` (held by ``engine``) on
    ``parts``, ``{"<part>_error": [one per id]}``, as ``evaluate`` of
    :func:`~.loop.fit_runs` returns them; ``errors(engine, x, y)`` is one engine's count,
    one error per run it holds."""

    def measure(engine, ids: list[int]) -> dict[str, list[float]]:
        out = {f"{p}_error": [math.nan] * len(ids) for p in parts}
        for seed, pos in _by_seed(runs, ids).items():
            sub = engine.select(pos) if len(pos) < len(ids) else engine
            for p in parts:
                x, y = _images(p, runs[ids[pos[0]]], data, splits[seed])
                for k, e in zip(pos, errors(sub, x, y), strict=True):
                    out[f"{p}_error"][k] = e
        return out

    return measure


def _model_errors(model, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    return [error_rate(model, x, y)]


def _fit_one(step: _Step, run: TrainConfig, lr: float, data, splits: dict, **kw) -> tuple:
    """A step of one run on the sequential engine: its model and :class:`~.loop.FitResult`."""
    model = build_model(run, _init_generator(run))
    measure = _measurer([run], step.measured, data, splits, _model_errors)

    def once() -> dict[str, float]:
        return {k: v[0] for k, v in measure(model, [0]).items()}

    result = fit(model, data.x_train, data.y_train, lr=lr, schedule=step.schedule,
                 stopping=step.stopping, divergence=step.divergence,
                 batch_size=run.batch_size, generator=_order_generator(run.seed),
                 stream=splits[run.seed][step.stream],
                 evaluate=once if step.every_epoch else None, **kw)
    if not step.every_epoch:
        result.final = once()
    return model, result


def _fit_each(step_of: Callable, runs: Sequence[TrainConfig], rates: Sequence[float], data,
              splits: dict, **kw) -> list[tuple]:
    """The step ``step_of`` of ``runs`` on the sequential engine, one run after the other;
    ``kw`` goes to :func:`fit` (a checkpoint only for one run)."""
    if kw.get("checkpoint") is not None and len(runs) != 1:
        raise ValueError("a sequential checkpoint holds one run")
    return [_fit_one(step_of(run), run, lr, data, splits, **kw)
            for run, lr in zip(runs, rates, strict=True)]


def _fit_stack(step_of: Callable, runs: Sequence[TrainConfig], rates: Sequence[float], data,
               splits: dict, checkpoint: GroupCheckpoint, **extra) -> list[FitResult]:
    """The step ``step_of`` of ``runs`` as one stack, resumed from ``checkpoint``'s phase
    of that step if it holds one and saved to it after every epoch (with ``extra``)."""
    steps = [step_of(run) for run in runs]
    first = steps[0]
    streams, stream_of_run = _streams(runs, splits, first.stream)
    measure = _measurer(runs, first.measured, data, splits, error_rates)

    def finish(engine, ids: list[int]) -> list[dict]:
        errors = measure(engine, ids)
        return [{k: v[i] for k, v in errors.items()} for i in range(len(ids))]

    saved = checkpoint.phase(first.name)
    net, start = (checkpoint.resume(saved, streams) if saved is not None and "loop" in saved
                  else (_stack(runs), None))
    return fit_stacked(
        net, data.x_train, data.y_train, lr=rates,
        schedules=[s.schedule for s in steps], stopping=[s.stopping for s in steps],
        divergence=[s.divergence for s in steps], batch_size=runs[0].batch_size,
        streams=streams, stream_of_run=stream_of_run,
        evaluate=measure if first.every_epoch else None,
        finish=None if first.every_epoch else finish,
        start=start, on_epoch=checkpoint.saver(first.name, streams, **extra),
    )


def _select(configs: Sequence[TrainConfig], run_step: Callable
            ) -> list[tuple[float, dict[float, float]]]:
    """Step 2 for every run of ``configs``: every rate of the grid trained from the run's
    initial weights, and the rate of :func:`~.config.best_rate`. ``run_step(step_of, runs,
    rates)`` is the engine: :func:`_fit_each` or :func:`_fit_stack`, returning the results."""
    grid = configs[0].lr_grid
    results = run_step(_selection, [c for c in configs for _ in grid],
                       [r for _ in configs for r in grid])
    out = []
    for k in range(len(configs)):
        errors = {r: results[k * len(grid) + j].final.get("select_val_error", math.nan)
                  for j, r in enumerate(grid)}
        out.append((best_rate(errors), errors))
    return out


# --------------------------------------------------------------------------------------
# The sequential engine.


def fit(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    schedule,
    stopping: StoppingRule,
    divergence: Divergence | None = None,
    batch_size: int = 100,
    generator: torch.Generator | None = None,
    stream: torch.Tensor | None = None,
    evaluate: Callable[[], dict[str, float]] | None = None,
    progress: tqdm | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_info: dict | None = None,
) -> FitResult:
    """Train ``model`` with :class:`~manifold_nets.InvariantSGD` on summed cross-entropy:
    :func:`~.loop.fit_runs` with one run.

    Parameters
    ----------
    model
        A model whose parameters were declared with :func:`manifold_nets.declare`.
    x, y : torch.Tensor
        Images and labels, in memory.
    lr : float
        The base rate.
    schedule
        :class:`~.config.ExpDecay` or :class:`~.config.BoldDriver`, applied after every
        epoch.
    stopping : StoppingRule
        When to stop (``stopping.max_epochs`` bounds the epochs).
    divergence : Divergence, optional
        When the run has diverged; a non-finite cost always ends the run.
    batch_size : int
        Images per mini-batch (the last one may be smaller).
    generator : torch.Generator, optional
        Source of the per-epoch permutations (default: torch's global generator).
    stream : torch.Tensor, optional
        The indices of ``x`` to train on (default: all).
    evaluate : callable, optional
        Called after every epoch; returns errors to log (``"val_error"`` feeds the stopping
        and collapse checks; without it, only ``max_epochs`` and NaN stop the run).
    progress : tqdm, optional
        A bar to advance by one per epoch.
    checkpoint : path, optional
        A checkpoint file (:mod:`~.checkpoint`). If it exists, the run resumes from it
        (model, optimiser, schedule, history, ``generator`` and torch's global RNG), after
        checking that it fits the model and ``checkpoint_info["config"]``; a run that had
        already stopped returns at once. Otherwise it is written before the first epoch.
        Either way it is rewritten after every epoch that did not diverge, so on CPU a
        resumed run gives bit-identical iterates to an uninterrupted one.
    checkpoint_info : dict, optional
        ``"config"``: the configuration the checkpoint must match (any mapping); every
        other key is saved as the checkpoint's ``extra``.

    Returns
    -------
    FitResult
        The run's history (one record per epoch: ``epoch``, ``lr``, ``cost``,
        ``train_error`` and what ``evaluate`` returned), why it stopped and whether it
        diverged.

    Raises
    ------
    CheckpointError
        If ``checkpoint`` exists but does not fit the model or the configuration, or was
        made with another base rate ``lr``.

    Examples
    --------
    Two epochs on random images with a checkpoint; running again finds the finished run
    in the checkpoint and returns at once:

    >>> import pathlib, tempfile
    >>> from manifold_nets import Arch1, declare
    >>> from manifold_nets.experiments.config import ExpDecay, StoppingRule
    >>> from manifold_nets.experiments.engines import fit
    >>> x, y = torch.rand(40, 12), torch.randint(0, 3, (40,))
    >>> def model():
    ...     net = Arch1(depth=1, width=4, in_features=12, num_classes=3,
    ...                 generator=torch.Generator().manual_seed(0))
    ...     _ = declare(net, "un")
    ...     return net
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.pt"
    >>> kw = dict(lr=0.01, schedule=ExpDecay(0.95), stopping=StoppingRule(1, 2),
    ...           batch_size=20, checkpoint=path)
    >>> result = fit(model(), x, y, generator=torch.Generator().manual_seed(0), **kw)
    >>> result.stop_reason, [h["epoch"] for h in result.history], path.exists()
    ('max-epochs', [1, 2], True)
    >>> [round(h["lr"], 4) for h in result.history]
    [0.01, 0.0095]
    >>> again = fit(model(), x, y, generator=torch.Generator(), **kw)
    >>> again.history == result.history
    True
    """
    from .checkpoint import RunCheckpoint

    engine = ModuleRuns(model)
    generator = generator if generator is not None else torch.default_generator
    stream = torch.arange(x.shape[0]) if stream is None else stream
    info = dict(checkpoint_info or {})
    config = info.pop("config", None)
    ck = RunCheckpoint(checkpoint, model=model, optimizer=engine.optimizer,
                       generator=generator, lr=lr, config=config, extra=info)
    start = ck.resume(stopping)
    if start is None:
        ck.save(LoopState(0, [0], [lr], [None], [FitResult()]))
    elif not start.active:  # it had stopped before the process was
        if progress is not None:
            progress.update(start.epoch)
        return start.results[0]

    def on_epoch(_, state: LoopState) -> None:
        if not state.results[0].diverged:
            ck.save(state)

    return fit_runs(
        engine, x, y, lr=[lr], schedules=[schedule], stopping=[stopping],
        divergence=[divergence], batch_size=batch_size,
        streams=[Stream(stream, generator)], stream_of_run=[0],
        evaluate=None if evaluate is None else lambda _, ids: {
            k: [v] for k, v in evaluate().items()},
        progress=progress, start=start,
        on_epoch=on_epoch if checkpoint is not None else None,
    )[0]


def select_lr(
    config: TrainConfig,
    data,
    splits: dict[str, torch.Tensor] | None = None,
    progress: tqdm | None = None,
) -> tuple[float, dict[float, float]]:
    """The paper's learning-rate selection, one candidate rate after the other.

    For every rate of ``config.lr_grid``, train a fresh network (the run's initial weights)
    on the ``select_train`` images for ``select_epochs`` epochs under the run's protocol,
    without early stopping, and measure the error on the ``select_val`` images.

    Parameters
    ----------
    config : TrainConfig
        The run (its ``lr`` is ignored here).
    data : manifold_nets.experiments.data.Dataset
        The data set in memory.
    splits : dict, optional
        The run's :func:`~manifold_nets.experiments.config.split_indices` (computed from
        ``config`` if not given).
    progress : tqdm, optional
        A bar to advance by one per epoch.

    Returns
    -------
    (float, dict)
        The rate with the lowest error (ties: the smaller rate), and the error of every
        rate.

    Examples
    --------
    A tiny random data set (784 features, as the nets expect) and two candidate rates of
    two epochs each:

    >>> from manifold_nets.experiments.config import TrainConfig
    >>> from manifold_nets.experiments.data import Dataset
    >>> from manifold_nets.experiments.engines import select_lr
    >>> data = Dataset.synthetic(60, 10)
    >>> config = TrainConfig(width=4, depth=1, batch_size=20, train_size=40, val_size=10,
    ...                      test_size=10, select_train=20, select_val=10, select_epochs=2,
    ...                      lr_grid=(0.1, 0.01), min_epochs=1, max_epochs=2)
    >>> lr, errors = select_lr(config, data)
    >>> lr in config.lr_grid, sorted(errors)
    (True, [0.01, 0.1])
    >>> errors[lr] == min(errors.values())
    True
    """
    splits = splits or split_indices(config, data.x_train.shape[0])
    splits = {config.seed: splits}
    return _select([config], lambda step_of, runs, rates: [
        result for _, result in _fit_each(step_of, runs, rates, data, splits, progress=progress)
    ])[0]


def train(
    config: TrainConfig,
    data=None,
    *,
    data_dir: str | os.PathLike | None = None,
    save_path: str | os.PathLike | None = None,
    progress: bool | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> dict:
    """One full run on the sequential engine: split, learning-rate selection (unless
    ``config.lr``), training, test.

    Parameters
    ----------
    config : TrainConfig
        The run.
    data : manifold_nets.experiments.data.Dataset, optional
        The data set in memory; loaded from ``config.dataset`` if not given.
    data_dir : path, optional
        Where to find the data set (see :func:`~.data.load_dataset`).
    save_path : path, optional
        Where to save the trained ``state_dict``; not written if the run diverged.
    progress : bool or None
        Show a progress bar; ``None``: only when stderr is a terminal.
    checkpoint : path, optional
        Checkpoint the training after the learning-rate selection and after every epoch
        (see :func:`fit`); if the file exists, resume from it: the selection is not redone
        and the epochs continue where the checkpoint left them, with bit-identical results
        on CPU. A checkpoint made with another configuration is refused
        (:class:`~.checkpoint.CheckpointError`). The file is kept when the run ends, so
        running again returns the finished run's results at once.

    Returns
    -------
    dict
        A JSON-ready record: ``config`` (resolved), ``lr`` (the base rate used),
        ``selection`` (error per candidate rate), ``history`` (per-epoch rate, cost and
        train / validation / test error), ``test_error`` (final), ``epochs``,
        ``stop_reason``, ``diverged``, ``saved``, and wall times in seconds (of this
        process only). With a ``checkpoint``, also ``checkpoint`` (its path) and
        ``resumed_at_epoch`` (epochs it held when the run started, ``None`` if new).

    Raises
    ------
    CheckpointError
        If ``checkpoint`` exists but was made with another configuration or model.

    Examples
    --------
    A whole run on a tiny random data set (784 features, as the nets expect): a
    selection over two rates of two epochs each, then at most two epochs of training.

    >>> from manifold_nets.experiments.config import TrainConfig
    >>> from manifold_nets.experiments.data import Dataset
    >>> from manifold_nets.experiments.engines import train
    >>> data = Dataset.synthetic(60, 10)
    >>> config = TrainConfig(width=4, depth=1, batch_size=20, train_size=40, val_size=10,
    ...                      test_size=10, select_train=20, select_val=10, select_epochs=2,
    ...                      lr_grid=(0.1, 0.01), min_epochs=1, max_epochs=2)
    >>> record = train(config, data, progress=False)
    >>> record["lr"] in config.lr_grid, sorted(record["selection"])
    (True, ['0.01', '0.1'])
    >>> record["epochs"] == len(record["history"]) <= 2, record["diverged"]
    (True, False)
    >>> record["config"]["update"], 0 <= record["test_error"] <= 1
    ('un', True)
    """
    from .checkpoint import check_config, read_checkpoint
    from .io import atomic_write

    resumed = None
    if checkpoint is not None and Path(checkpoint).exists():
        payload = read_checkpoint(checkpoint)
        check_config(payload, config, checkpoint)
        resumed = payload
    if data is None:
        from .data import load_dataset

        data = load_dataset(config.dataset, data_dir)
    start = time.perf_counter()
    splits = split_indices(config, data.x_train.shape[0])
    n_select = 0 if config.lr is not None else len(config.lr_grid) * config.select_epochs
    label = f"{config.arch} d{config.depth} {config.protocol} {config.update} s{config.seed}"
    bar = tqdm(total=n_select + config.max_epochs, desc=label, unit="ep", leave=False,
               disable=None if progress is None else not progress, file=sys.stderr)
    with bar:
        if resumed is not None:
            lr, selection = resumed["extra"]["lr"], resumed["extra"]["selection"]
            bar.update(n_select)
        elif config.lr is None:
            lr, selection = select_lr(config, data, splits, progress=bar)
        else:
            lr, selection = config.lr, {}
        select_time = time.perf_counter() - start

        model, result = _fit_each(
            _training, [config], [lr], data, {config.seed: splits}, progress=bar,
            checkpoint=checkpoint,
            checkpoint_info={"config": config.to_dict(), "lr": lr, "selection": selection},
        )[0]
    record = _record(config, lr, selection, result, select_time, time.perf_counter() - start)
    if save_path is not None and not result.diverged:
        state = {k: v.detach() for k, v in model.state_dict().items()}
        atomic_write(save_path, lambda fh: torch.save(state, fh))
        record["saved"] = str(save_path)
    if checkpoint is not None:
        record["checkpoint"] = str(checkpoint)
        record["resumed_at_epoch"] = None if resumed is None else len(resumed["history"])
    return record


# --------------------------------------------------------------------------------------
# The stacked engine.


def fit_stacked(
    net: StackedNet,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: Sequence[float],
    schedules: Sequence,
    stopping: Sequence[StoppingRule],
    divergence: Sequence[Divergence | None] | None = None,
    batch_size: int = 100,
    generator: torch.Generator | None = None,
    streams: Sequence[Stream] | None = None,
    stream_of_run: Sequence[int] | None = None,
    evaluate: Callable[[StackedNet, list[int]], dict[str, list[float]]] | None = None,
    finish: Callable[[StackedNet, list[int]], list[dict] | None] | None = None,
    start: LoopState | None = None,
    on_epoch: Callable[[StackedNet, LoopState], None] | None = None,
) -> list[FitResult]:
    """:func:`fit` for the ``R`` runs of ``net`` at once: :func:`~.loop.fit_runs` on the
    stacked engine.

    The runs are trained with the runs of one update side by side (few slices to update)
    and, within them, the runs of one stream (each stream's mini-batch is then one matrix
    product per update); results come back in the order of ``net``.

    Parameters
    ----------
    net : StackedNet
        the runs, each with its update (``net.updates``); not modified while runs are
        reordered or leave (the loop works on copies then)
    x, y : torch.Tensor
        the image store
    lr, schedules, stopping, divergence
        one entry per run, as the arguments of :func:`fit`
    batch_size : int
        images per mini-batch
    generator : torch.Generator, optional
        without ``streams``: every run trains on all of ``x`` in the order of this
        generator's permutations (one mini-batch shared by all runs)
    streams, stream_of_run : optional
        the data streams and the stream of each run (see :func:`~.loop.fit_runs`)
    evaluate, finish, start, on_epoch
        as for :func:`~.loop.fit_runs`, with run ids in the order of ``net``; the states
        ``on_epoch`` receives (and ``start`` resumes) are in the training order, which they
        record (the ``order`` of :class:`~.loop.LoopState`)

    Returns
    -------
    list of FitResult
        One per run, in the order of ``net``.

    Raises
    ------
    ValueError
        If ``streams`` is given without one ``stream_of_run`` entry per run, or if an
        argument of one entry per run has another length (:func:`~.loop.fit_runs`).

    Examples
    --------
    A UN run and an SM run of Arch1, stacked, on one shared stream of random images:

    >>> from manifold_nets import Arch1, declare
    >>> from manifold_nets.experiments.config import ExpDecay, StoppingRule
    >>> from manifold_nets.experiments.engines import fit_stacked
    >>> from manifold_nets.experiments.stacked import StackedNet
    >>> models = [Arch1(depth=1, width=4, in_features=12, num_classes=3) for _ in range(2)]
    >>> _ = declare(models[0], "un"), declare(models[1], "sm")
    >>> net = StackedNet.from_models(models)
    >>> x, y = torch.rand(40, 12), torch.randint(0, 3, (40,))
    >>> results = fit_stacked(net, x, y, lr=[0.01, 0.001], schedules=[ExpDecay(0.95)] * 2,
    ...                       stopping=[StoppingRule(1, 2), StoppingRule(1, 3)],
    ...                       batch_size=20, generator=torch.Generator().manual_seed(0))
    >>> [(r.stop_reason, len(r.history), r.history[0]["lr"]) for r in results]
    [('max-epochs', 2, 0.01), ('max-epochs', 3, 0.001)]
    """
    R = net.runs if start is None else len(start.results)
    if streams is None:
        streams = [Stream(torch.arange(x.shape[0]), generator or torch.Generator())]
        stream_of_run = [0] * R
    if stream_of_run is None or len(stream_of_run) != R:
        raise ValueError("fit_stacked: give stream_of_run, one stream index per run")
    if start is None:
        order = sorted(range(R), key=lambda i: (net.updates[i], stream_of_run[i]))
        if order != list(range(R)):
            net = net.select(order)
    else:  # the resumed stack is in the order the interrupted loop used
        order = start.order if start.order is not None else list(range(R))

    def perm(seq):
        return None if seq is None else [seq[i] for i in order]

    def wrap(fn):
        if fn is None:
            return None
        return lambda engine, ids: fn(engine, [order[i] for i in ids])

    results = fit_runs(
        net, x, y, lr=perm(lr), schedules=perm(schedules), stopping=perm(stopping),
        divergence=perm(divergence), batch_size=batch_size, streams=streams,
        stream_of_run=perm(stream_of_run), evaluate=wrap(evaluate), finish=wrap(finish),
        start=start, on_epoch=None if on_epoch is None else lambda engine, state: on_epoch(
            engine, dataclasses.replace(state, order=order)))
    out: list[FitResult] = [FitResult()] * R
    for k, i in enumerate(order):
        out[i] = results[k]
    return out


#: Fields that runs trained as one stack must share (the network and the data sizes).
#: Runs of different seeds can share a stack: each keeps its own split and batch order.
_SHARED = ("arch", "depth", "width", "dataset", "batch_size", "lr_grid", "select_train",
           "select_val", "select_epochs", "train_size", "val_size", "test_size")


def group_key(config: TrainConfig) -> tuple:
    """Runs with equal keys can be trained as one stack by :func:`train_group`.

    Parameters
    ----------
    config : TrainConfig
        A run.

    Returns
    -------
    tuple
        The fields that the runs of one stack must share: architecture, depth, width,
        data set and every data size. Seed, update, protocol, schedule, stopping and rate
        are not part of it.

    Examples
    --------
    >>> from manifold_nets.experiments.config import TrainConfig
    >>> from manifold_nets.experiments.engines import group_key
    >>> a = TrainConfig(update="un", protocol="exp-decay", seed=0)
    >>> b = TrainConfig(update="sm", protocol="bold-driver", seed=7, lr=0.01)
    >>> group_key(a) == group_key(b), group_key(a) == group_key(TrainConfig(depth=4))
    (True, False)
    """
    return tuple(getattr(config, k) for k in _SHARED)


def _check_group(configs: Sequence[TrainConfig]) -> None:
    if not configs:
        raise ValueError("a group needs at least one run")
    keys = {group_key(c) for c in configs}
    if len(keys) != 1:
        diff = [k for i, k in enumerate(_SHARED) if len({key[i] for key in keys}) > 1]
        raise ValueError(
            f"runs trained as one stack must share {', '.join(_SHARED)}; these differ in "
            f"{', '.join(diff)}. Group them with engines.group_key first."
        )


def _stack(configs: Sequence[TrainConfig], repeat: int = 1) -> StackedNet:
    models, cache = [], {}
    for c in configs:
        if (c.seed, c.update) not in cache:
            cache[(c.seed, c.update)] = build_model(c, _init_generator(c))
        models += [cache[(c.seed, c.update)]] * repeat
    return StackedNet.from_models(models)


def _by_seed(configs: Sequence[TrainConfig], ids: Sequence[int]) -> dict[int, list[int]]:
    """Positions in ``ids`` grouped by the seed of the run ``configs[ids[k]]``."""
    out: dict[int, list[int]] = {}
    for k, i in enumerate(ids):
        out.setdefault(configs[i].seed, []).append(k)
    return out


def _splits(configs: Sequence[TrainConfig], data) -> dict[int, dict[str, torch.Tensor]]:
    seeds = sorted({c.seed for c in configs})
    first = {c.seed: c for c in reversed(configs)}
    return {s: split_indices(first[s], data.x_train.shape[0]) for s in seeds}


def _streams(configs, splits, part: str) -> tuple[list[Stream], list[int]]:
    seeds = sorted(splits)
    streams = [Stream(splits[s][part], _order_generator(s)) for s in seeds]
    return streams, [seeds.index(c.seed) for c in configs]


def select_lr_stacked(
    configs: Sequence[TrainConfig], data, splits: dict[int, dict] | None = None, *,
    checkpoint: GroupCheckpoint | None = None,
) -> list[tuple[float, dict[float, float]]]:
    """:func:`select_lr` for every run of a group, all candidate rates of all runs in one
    stack (``len(configs) x len(lr_grid)`` networks).

    Parameters
    ----------
    configs : sequence of TrainConfig
        The runs; they must share :func:`group_key`.
    data : manifold_nets.experiments.data.Dataset
        The data set in memory.
    splits : dict, optional
        ``{seed: split_indices}``, the :func:`~.config.split_indices` of every seed
        (computed if not given).
    checkpoint : optional
        The group's :class:`~.checkpoint.GroupCheckpoint` (as :func:`train_group` passes
        it); ``None``: none.

    Returns
    -------
    list of (float, dict)
        For every run, in order, what :func:`select_lr` returns: the selected rate and
        the error of every rate.

    Raises
    ------
    ValueError
        If ``configs`` is empty or its runs do not share :func:`group_key`.

    Examples
    --------
    >>> import dataclasses
    >>> from manifold_nets.experiments.config import TrainConfig
    >>> from manifold_nets.experiments.data import Dataset
    >>> from manifold_nets.experiments.engines import select_lr, select_lr_stacked
    >>> data = Dataset.synthetic(60, 10)
    >>> config = TrainConfig(width=4, depth=1, batch_size=20, train_size=40, val_size=10,
    ...                      test_size=10, select_train=20, select_val=10, select_epochs=2,
    ...                      lr_grid=(0.1, 0.01), min_epochs=1, max_epochs=2)
    >>> configs = [dataclasses.replace(config, update=u) for u in ("sm", "un")]
    >>> chosen = select_lr_stacked(configs, data)
    >>> [(lr in config.lr_grid, sorted(errors)) for lr, errors in chosen]
    [(True, [0.01, 0.1]), (True, [0.01, 0.1])]
    >>> select_lr_stacked([config, dataclasses.replace(config, width=8)], data)
    Traceback (most recent call last):
    ...
    ValueError: runs trained as one stack must share ...; these differ in width. ...
    """
    _check_group(configs)
    splits = splits or _splits(configs, data)
    checkpoint = checkpoint or GroupCheckpoint(None, configs)
    return _select(configs, lambda step_of, runs, rates: _fit_stack(
        step_of, runs, rates, data, splits, checkpoint))


def train_group(configs: Sequence[TrainConfig], data=None, *, data_dir=None,
                checkpoint: str | os.PathLike | None = None) -> list[dict]:
    """:func:`train` for a group of runs on the stacked engine.

    The configurations must share :func:`group_key` (architecture, depth, data sizes);
    seed, update, protocol, schedule, stopping and rate may differ. Returns one record per
    configuration, in order, in the format of :func:`train`, with ``engine: "stacked"``.
    Timings are the group's, divided evenly among its runs (``wall_time_s``,
    ``select_time_s``); ``group_wall_time_s`` and ``group_runs`` give the whole. Trained
    weights are not saved (``saved`` is ``None``).

    With ``checkpoint`` (a file path), the group's state is saved after every epoch of
    the selection and of the training; if the file exists the group resumes from it, at
    the last finished epoch, with the same results on CPU as an uninterrupted group. A
    checkpoint of other runs is refused; the file is left for the caller to delete.

    Parameters
    ----------
    configs : sequence of TrainConfig
        The runs; they must share :func:`group_key`.
    data : manifold_nets.experiments.data.Dataset, optional
        The data set in memory; loaded from ``configs[0].dataset`` if not given.
    data_dir : path, optional
        Where to find the data set (see :func:`~.data.load_dataset`).
    checkpoint : path, optional
        The group's checkpoint file (see above).

    Returns
    -------
    list of dict
        One record per configuration, in the order of ``configs``.

    Raises
    ------
    ValueError
        If ``configs`` is empty or its runs do not share :func:`group_key`.
    CheckpointError
        If ``checkpoint`` exists but holds another group of runs.

    Examples
    --------
    A UN run and an SM run of one seed as one stack, on a tiny random data set:

    >>> import dataclasses
    >>> from manifold_nets.experiments.config import TrainConfig
    >>> from manifold_nets.experiments.data import Dataset
    >>> from manifold_nets.experiments.engines import train_group
    >>> data = Dataset.synthetic(60, 10)
    >>> config = TrainConfig(width=4, depth=1, batch_size=20, train_size=40, val_size=10,
    ...                      test_size=10, select_train=20, select_val=10, select_epochs=2,
    ...                      lr_grid=(0.1, 0.01), min_epochs=1, max_epochs=2)
    >>> configs = [dataclasses.replace(config, update=u) for u in ("un", "sm")]
    >>> records = train_group(configs, data)
    >>> [(r["config"]["update"], r["engine"], r["group_runs"]) for r in records]
    [('un', 'stacked', 2), ('sm', 'stacked', 2)]
    >>> all(r["lr"] in config.lr_grid and r["epochs"] <= 2 for r in records)
    True
    """
    configs = list(configs)
    _check_group(configs)
    if data is None:
        from .data import load_dataset

        data = load_dataset(configs[0].dataset, data_dir)
    splits = _splits(configs, data)
    order = sorted(range(len(configs)), key=lambda k: (configs[k].update, configs[k].seed))
    ordered = [configs[k] for k in order]
    ck = GroupCheckpoint(checkpoint, ordered)
    saved = ck.phase("train")
    if saved is not None:
        lrs, select_time = saved["lrs"], saved["select_time"]
        selection = [{float(k): v for k, v in s.items()} for s in saved["selection"]]
    else:
        lrs = [c.lr for c in ordered]
        selection: list[dict] = [{} for _ in ordered]
        need = [k for k, c in enumerate(ordered) if c.lr is None]
        if need:
            chosen = select_lr_stacked([ordered[k] for k in need], data, splits,
                                       checkpoint=ck)
            for k, (best, errs) in zip(need, chosen, strict=True):
                lrs[k], selection[k] = best, errs
        select_time = ck.elapsed()
    results = _fit_stack(_training, ordered, lrs, data, splits, ck, lrs=lrs,
                         select_time=select_time,
                         selection=[{repr(k): v for k, v in s.items()} for s in selection])
    wall = ck.elapsed()
    n = len(configs)
    records: list[dict] = [{}] * n
    for k, c, lr, sel, res in zip(order, ordered, lrs, selection, results, strict=True):
        records[k] = _record(c, lr, sel, res, select_time / n, wall / n) | {
            "engine": "stacked", "group_runs": n, "group_wall_time_s": round(wall, 3)}
    return records
