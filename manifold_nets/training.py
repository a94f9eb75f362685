r"""Training: the paper's protocol (Section 4) around one loop.

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
   :class:`StoppingRule`, and report the error on the 10,000 test images.

Every step of :func:`fit`, in order:

.. math::

    \begin{aligned}
    &\textbf{for } e = 1, 2, \dots \textbf{ do} \\
    &\quad \pi \leftarrow \text{a random permutation of the training images} \\
    &\quad \textbf{for each } \text{slice } B \text{ of } 100 \text{ indices of } \pi
        \textbf{ do} \\
    &\quad\quad L_B \leftarrow \textstyle\sum_{i \in B} \mathrm{CE}(f(x_i), y_i)
        \quad \text{(summed, not averaged)} \\
    &\quad\quad \text{one } \texttt{RiemannianSGD} \text{ step on } L_B
        \text{ with rate } \eta_e \\
    &\quad c_e \leftarrow \text{mean of } L_B \text{ over the epoch};\;
        \text{train error} \leftarrow \text{error of the epoch's mini-batches} \\
    &\quad \eta_{e+1} \leftarrow \text{schedule}(\eta_e, c_e, c_{e-1})
        \quad \text{(possibly undoing the epoch)} \\
    &\quad \text{validation and test error}; \text{divergence, then stopping checks}
    \end{aligned}

Divergence (:class:`Divergence`): a non-finite epoch cost that the schedule does not undo,
or a network that has collapsed towards chance (validation error above ``collapse_error``
= 0.5 at any epoch from ``collapse_epoch`` = 10 on; a dead ReLU network predicting one
class sits near 0.9). A diverged run stops at once, is marked ``diverged`` in its record
and is never saved as weights. Non-finite logits count as errors.

Everything is seeded from ``TrainConfig.seed``: the split, the selection subsets, the
initial weights and the batch order. On CPU the same seed gives the same numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import geoopt
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = [
    "ARCHS",
    "PROTOCOLS",
    "UPDATES",
    "BoldDriver",
    "Divergence",
    "ExpDecay",
    "FitResult",
    "StoppingRule",
    "TrainConfig",
    "bold_driver",
    "build_model",
    "error_rate",
    "exp_decay",
    "fit",
    "make_schedule",
    "select_lr",
    "split_indices",
    "train",
    "unwritable",
]

ARCHS = ("arch1", "arch2")
UPDATES = ("bsgd", "sm", "un")
PROTOCOLS = ("exp-decay", "bold-driver")
STOPPING = ("all", "bold-driver", "none")

# --------------------------------------------------------------------------------------
# Schedules: pure functions, and small frozen objects that call them.


def exp_decay(lr: float, gamma: float = 0.95) -> float:
    r"""Exponential decay, one epoch: :math:`\eta \leftarrow \gamma \eta`."""
    return lr * gamma


def bold_driver(
    lr: float,
    cost: float,
    previous: float | None,
    increase: float = 1.1,
    decrease: float = 0.5,
) -> tuple[float, bool]:
    r"""The bold driver (Hinton, 2008), one epoch.

    .. math::

        \eta \leftarrow \begin{cases}
            \eta & \text{if there is no previous cost (first epoch)} \\
            \text{decrease} \cdot \eta & \text{if } c_e > c_{e-1}
                \text{ or } c_e \text{ is not finite} \\
            \text{increase} \cdot \eta & \text{otherwise}
        \end{cases}

    Parameters
    ----------
    lr : float
        The rate used in the epoch.
    cost : float
        The epoch's mean mini-batch cost :math:`c_e`.
    previous : float or None
        The cost it is compared with: the previous epoch's (released code) or the last
        accepted one (textbook, with undo).

    Returns
    -------
    (float, bool)
        The next rate, and whether the epoch is accepted (``False``: the cost rose).
    """
    if previous is None:
        return lr, math.isfinite(cost)
    if not math.isfinite(cost) or cost > previous:
        return lr * decrease, False
    return lr * increase, True


class Decision(NamedTuple):
    """A schedule's verdict after an epoch: the next rate, and whether to undo the epoch."""

    lr: float
    undo: bool


@dataclass(frozen=True)
class ExpDecay:
    """Exponential decay: multiply the rate by ``gamma`` after every epoch (paper: 0.95)."""

    gamma: float = 0.95

    def __post_init__(self):
        if not 0 < self.gamma <= 1:
            raise ValueError(f"Invalid decay factor gamma: {self.gamma} (need 0 < gamma <= 1)")

    def step(self, lr: float, cost: float, previous: float | None) -> Decision:
        return Decision(exp_decay(lr, self.gamma), False)


@dataclass(frozen=True)
class BoldDriver:
    """The bold driver protocol, :func:`bold_driver` after every epoch.

    The defaults are the authors' released code: ``x1.1`` when the epoch's mean
    mini-batch cost did not rise, ``x0.5`` when it rose (or is NaN), comparing with the
    previous epoch and never undoing it. :meth:`textbook` gives the usual variant: ``x1.05``
    / ``x0.5``, and a rejected epoch is undone (weights restored, compared against the last
    accepted cost).
    """

    increase: float = 1.1
    decrease: float = 0.5
    undo: bool = False

    def __post_init__(self):
        if self.increase < 1:
            raise ValueError(f"Invalid bold-driver increase: {self.increase} (need >= 1)")
        if not 0 < self.decrease < 1:
            raise ValueError(f"Invalid bold-driver decrease: {self.decrease} (need in (0, 1))")

    @classmethod
    def textbook(cls) -> BoldDriver:
        return cls(increase=1.05, decrease=0.5, undo=True)

    def step(self, lr: float, cost: float, previous: float | None) -> Decision:
        new_lr, accepted = bold_driver(lr, cost, previous, self.increase, self.decrease)
        return Decision(new_lr, self.undo and not accepted and previous is not None)


# --------------------------------------------------------------------------------------
# Stopping and divergence: pure rules on the history.


@dataclass(frozen=True)
class StoppingRule:
    """The paper's stopping criteria, checked after each epoch ``e >= min_epochs``.

    In order: (i) the training error is below ``train_error`` (1e-5); (ii) the validation
    error is higher than ``lookback`` (5) epochs earlier; (iii) two successive validation
    errors differ by less than ``val_change`` (1e-5). Training always stops after
    ``max_epochs``. With ``enabled=False`` only ``max_epochs`` applies.
    """

    min_epochs: int = 25
    max_epochs: int = 60
    train_error: float = 1e-5
    val_change: float = 1e-5
    lookback: int = 5
    enabled: bool = True

    def reason(self, train_errors: Sequence[float], val_errors: Sequence[float]) -> str | None:
        """Why to stop after ``len(train_errors)`` epochs, or ``None`` to go on.

        ``val_errors`` holds one error per epoch (or is empty when there is no validation
        set, and then only criterion (i) and ``max_epochs`` apply).
        """
        e = len(train_errors)
        v = val_errors
        if self.enabled and e >= self.min_epochs:
            if train_errors[-1] < self.train_error:
                return "train-error"
            if len(v) > self.lookback and v[-1] > v[-1 - self.lookback]:
                return "val-increase"
            if len(v) >= 2 and abs(v[-1] - v[-2]) < self.val_change:
                return "val-plateau"
        if e >= self.max_epochs:
            return "max-epochs"
        return None


@dataclass(frozen=True)
class Divergence:
    """When a run has diverged: a non-finite cost, or collapse towards chance.

    Collapse: the validation error exceeds ``collapse_error`` at an epoch
    ``e >= collapse_epoch``. ``collapse_error=None`` turns the collapse check off.
    """

    collapse_error: float | None = 0.5
    collapse_epoch: int = 10

    def reason(self, cost: float, val_errors: Sequence[float]) -> str | None:
        if not math.isfinite(cost):
            return "nan"
        if (
            self.collapse_error is not None
            and len(val_errors) >= self.collapse_epoch
            and val_errors[-1] > self.collapse_error
        ):
            return "collapse"
        return None


# --------------------------------------------------------------------------------------
# Configuration.


@dataclass
class TrainConfig:
    """Everything that defines a run; saved, resolved, with its results.

    Defaults are the paper's protocol (Section 4) as NOTES.md reads it.

    Attributes
    ----------
    arch, depth, width, update, protocol
        The network (``"arch1"``/``"arch2"``, hidden layers, filters per layer), the update
        (``"bsgd"``, ``"sm"``, ``"un"``) and the protocol (``"exp-decay"``,
        ``"bold-driver"``).
    dataset : str
        ``"mnist"`` or ``"fashion-mnist"``.
    seed : int
        Seeds the split, the selection subsets, the initial weights and the batch order.
    batch_size : int
        Mini-batch size (100); the loss is summed over it.
    lr : float or None
        A fixed base rate; ``None`` selects it over ``lr_grid``.
    lr_grid, select_train, select_val, select_epochs
        The learning-rate selection.
    train_size, val_size, test_size
        Images for training, validation (both from the training file) and testing (the
        first ``test_size`` of the test file).
    min_epochs, max_epochs
        Bounds on the number of epochs of full training.
    decay
        Exponential-decay factor per epoch.
    bold_increase, bold_decrease, bold_undo
        Bold driver (released-code defaults; textbook: 1.05, 0.5, True).
    stopping : str
        Where the stopping criteria apply: ``"all"`` (both protocols, as the released code
        appears to do; the default), ``"bold-driver"`` (the paper's text) or ``"none"``
        (always ``max_epochs``).
    stop_train_error, stop_val_change, stop_lookback
        The thresholds of :class:`StoppingRule`.
    collapse_error, collapse_epoch
        :class:`Divergence`.
    """

    arch: str = "arch2"
    depth: int = 2
    width: int = 64
    update: str = "un"
    protocol: str = "bold-driver"
    dataset: str = "mnist"
    seed: int = 0
    batch_size: int = 100
    lr: float | None = None
    lr_grid: tuple[float, ...] = (1e-2, 1e-3, 1e-4, 1e-5)
    select_train: int = 1000
    select_val: int = 500
    select_epochs: int = 50
    train_size: int = 50000
    val_size: int = 10000
    test_size: int = 10000
    min_epochs: int = 25
    max_epochs: int = 60
    decay: float = 0.95
    bold_increase: float = 1.1
    bold_decrease: float = 0.5
    bold_undo: bool = False
    stopping: str = "all"
    stop_train_error: float = 1e-5
    stop_val_change: float = 1e-5
    stop_lookback: int = 5
    collapse_error: float | None = 0.5
    collapse_epoch: int = 10

    def __post_init__(self):
        self.lr_grid = tuple(float(v) for v in self.lr_grid)
        choices = {"arch": ARCHS, "update": UPDATES, "protocol": PROTOCOLS, "stopping": STOPPING}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"Invalid {name}: {getattr(self, name)!r}; choose one of {', '.join(allowed)}"
                )
        positive = (
            "depth width batch_size select_train select_val select_epochs train_size val_size "
            "test_size min_epochs max_epochs stop_lookback"
        ).split()
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r} (need a positive integer)")
        if self.min_epochs > self.max_epochs:
            raise ValueError(
                f"Invalid epochs: min_epochs={self.min_epochs} > max_epochs={self.max_epochs}"
            )
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"Invalid learning rate: {self.lr}")
        if not self.lr_grid or any(not v > 0 for v in self.lr_grid):
            raise ValueError(f"Invalid learning-rate grid: {self.lr_grid}")
        if self.select_train + self.select_val > self.train_size:
            raise ValueError(
                f"select_train + select_val = {self.select_train + self.select_val} images "
                f"do not fit in train_size = {self.train_size}"
            )
        # Validates the schedule's own parameters.
        make_schedule(self)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lr_grid"] = list(self.lr_grid)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**d)


def make_schedule(config: TrainConfig) -> ExpDecay | BoldDriver:
    """The schedule object of ``config.protocol``."""
    if config.protocol == "exp-decay":
        return ExpDecay(config.decay)
    return BoldDriver(config.bold_increase, config.bold_decrease, config.bold_undo)


def stopping_rule(config: TrainConfig) -> StoppingRule:
    enabled = config.stopping == "all" or (
        config.stopping == "bold-driver" and config.protocol == "bold-driver"
    )
    return StoppingRule(
        config.min_epochs,
        config.max_epochs,
        config.stop_train_error,
        config.stop_val_change,
        config.stop_lookback,
        enabled,
    )


# --------------------------------------------------------------------------------------
# Model, data split, evaluation.


def build_model(config: TrainConfig, generator: torch.Generator | None = None):
    """The network of ``config``, initialised from ``generator`` and declared for its update.

    Returns the model; create the optimiser afterwards (``declare`` replaces parameters).
    """
    from .declare import declare
    from .nets import Arch1, Arch2

    cls = Arch1 if config.arch == "arch1" else Arch2
    model = cls(config.depth, config.width, 784, 10, generator=generator)
    declare(model, config.update)
    return model


def split_indices(config: TrainConfig, n_available: int) -> dict[str, torch.Tensor]:
    """Disjoint random index sets into the training file: train, val, select_train,
    select_val (the last two drawn from the train part)."""
    need = config.train_size + config.val_size
    if need > n_available:
        raise ValueError(
            f"train_size + val_size = {need} images, but the training file has {n_available}"
        )
    gen = torch.Generator().manual_seed(_subseed(config.seed, 1))
    perm = torch.randperm(n_available, generator=gen)
    train_idx = perm[: config.train_size]
    val_idx = perm[config.train_size : need]
    inner = train_idx[torch.randperm(config.train_size, generator=gen)]
    return {
        "train": train_idx,
        "val": val_idx,
        "select_train": inner[: config.select_train],
        "select_val": inner[config.select_train : config.select_train + config.select_val],
    }


def _subseed(seed: int, stream: int) -> int:
    """Independent seeds for the streams of one run (split, init, batch order)."""
    return (seed * 1_000_003 + stream * 7919) % (2**63 - 1)


@torch.no_grad()
def error_rate(model, x: torch.Tensor, y: torch.Tensor, chunk: int = 10000) -> float:
    """Fraction of misclassified images (eval mode); non-finite logits count as errors."""
    was_training = model.training
    model.eval()
    wrong = 0
    for i in range(0, x.shape[0], chunk):
        logits = model(x[i : i + chunk])
        bad = (logits.argmax(1) != y[i : i + chunk]) | ~torch.isfinite(logits).all(1)
        wrong += int(bad.sum())
    model.train(was_training)
    return wrong / max(1, x.shape[0])


# --------------------------------------------------------------------------------------
# The loop.


@dataclass
class FitResult:
    """What :func:`fit` returns: per-epoch history, why it stopped, and whether it diverged."""

    history: list[dict] = field(default_factory=list)
    stop_reason: str = ""
    diverged: bool = False


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def fit(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    schedule: ExpDecay | BoldDriver,
    stopping: StoppingRule,
    divergence: Divergence | None = None,
    batch_size: int = 100,
    generator: torch.Generator | None = None,
    evaluate: Callable[[], dict[str, float]] | None = None,
    progress: tqdm | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_info: dict | None = None,
) -> FitResult:
    """Train ``model`` with :class:`geoopt.optim.RiemannianSGD` on summed cross-entropy.

    Parameters
    ----------
    model
        A model whose parameters were declared with :func:`manifold_nets.declare`.
    x, y : torch.Tensor
        Training images and labels, in memory.
    lr : float
        The base rate.
    schedule
        :class:`ExpDecay` or :class:`BoldDriver`, applied after every epoch.
    stopping : StoppingRule
        When to stop (``stopping.max_epochs`` bounds the epochs).
    divergence : Divergence, optional
        When the run has diverged; a non-finite cost always ends the run.
    batch_size : int
        Images per mini-batch (the last one may be smaller).
    generator : torch.Generator, optional
        Source of the per-epoch permutations.
    evaluate : callable, optional
        Called after every epoch; returns errors to log (``"val_error"`` feeds the stopping
        and collapse checks; without it, only ``max_epochs`` and NaN stop the run).
    progress : tqdm, optional
        A bar to advance by one per epoch.
    checkpoint : path, optional
        A checkpoint file (:mod:`manifold_nets.checkpoint`). If it exists, the run resumes
        from it (model, optimiser, schedule, history, ``generator`` and torch's global RNG),
        after checking that it fits the model and ``checkpoint_info["config"]``; a run that
        had already stopped returns at once. Otherwise it is written before the first
        epoch. Either way it is rewritten after every epoch that did not diverge, so on CPU
        a resumed run gives bit-identical iterates to an uninterrupted one.
    checkpoint_info : dict, optional
        ``"config"``: the configuration the checkpoint must match (any mapping); every
        other key is saved as the checkpoint's ``extra``.
    """
    opt = geoopt.optim.RiemannianSGD(model.parameters(), lr=lr)
    divergence = divergence or Divergence(collapse_error=None)
    n = x.shape[0]
    result = FitResult()
    train_errors: list[float] = []
    val_errors: list[float] = []
    reference: float | None = None
    base_lr = lr
    info = dict(checkpoint_info or {})
    ck_config = info.pop("config", None)

    def save() -> None:
        from .checkpoint import save_checkpoint

        save_checkpoint(checkpoint, model=model, optimizer=opt, generator=generator,
                        schedule_state={"lr": lr, "reference": reference, "base_lr": base_lr},
                        history=result.history, config=ck_config, extra=info)

    if checkpoint is not None and Path(checkpoint).exists():
        from .checkpoint import CheckpointError, load_checkpoint

        state = load_checkpoint(checkpoint, model=model, optimizer=opt, generator=generator,
                                config=ck_config)
        sched = state["schedule_state"]
        if sched.get("base_lr") != base_lr:
            raise CheckpointError(f"checkpoint {checkpoint} was made with base rate "
                                  f"{sched.get('base_lr')!r}, now {base_lr!r}")
        lr, reference = sched["lr"], sched["reference"]
        result.history = list(state["history"])
        train_errors = [h["train_error"] for h in result.history]
        val_errors = [h["val_error"] for h in result.history if "val_error" in h]
        if progress is not None:
            progress.update(len(result.history))
        reason = stopping.reason(train_errors, val_errors) if result.history else None
        if reason is not None:
            result.stop_reason = reason
            return result
    elif checkpoint is not None:
        save()
    model.train()
    while True:
        epoch = len(result.history) + 1
        snapshot = (
            {k: v.detach().clone() for k, v in model.state_dict().items()}
            if getattr(schedule, "undo", False)
            else None
        )
        perm = torch.randperm(n, generator=generator)
        total = torch.zeros((), dtype=torch.float64)
        wrong = torch.zeros((), dtype=torch.int64)
        batches = 0
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            xb, yb = x[idx], y[idx]
            opt.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, reduction="sum")
            loss.backward()
            opt.step()
            with torch.no_grad():
                total += loss.detach()
                wrong += (logits.argmax(1) != yb).sum()
            batches += 1
        cost = float(total) / batches
        train_error = int(wrong) / n
        if not math.isfinite(cost):
            train_error = 1.0
        decision = schedule.step(lr, cost, reference)
        if decision.undo and snapshot is not None:
            model.load_state_dict(snapshot)
        else:
            reference = cost
        record = {"epoch": epoch, "lr": lr, "cost": cost, "train_error": train_error}
        lr = decision.lr
        _set_lr(opt, lr)
        if evaluate is not None:
            record.update(evaluate())
        result.history.append(record)
        train_errors.append(train_error)
        if "val_error" in record:
            val_errors.append(record["val_error"])
        if progress is not None:
            progress.update(1)
            progress.set_postfix_str(
                f"lr={record['lr']:.2e} val={record.get('val_error', float('nan')):.4f}",
                refresh=False,
            )
        undone_nan = decision.undo and not math.isfinite(cost)
        reason = None if undone_nan else divergence.reason(cost, val_errors)
        if reason is not None:
            result.stop_reason, result.diverged = reason, True
            return result
        if checkpoint is not None:
            save()
        reason = stopping.reason(train_errors, val_errors)
        if reason is not None:
            result.stop_reason = reason
            return result


def _data_tensors(data, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return data.x_train[idx], data.y_train[idx]


def select_lr(
    config: TrainConfig,
    data,
    splits: dict[str, torch.Tensor] | None = None,
    progress: tqdm | None = None,
) -> tuple[float, dict[float, float]]:
    """The paper's learning-rate selection.

    For every rate of ``config.lr_grid``, train a fresh network (the run's initial weights)
    on the ``select_train`` images for ``select_epochs`` epochs under the run's protocol,
    without early stopping, and measure the error on the ``select_val`` images.

    Returns
    -------
    (float, dict)
        The rate with the lowest error (ties: the smaller rate), and the error of every
        rate.
    """
    splits = splits or split_indices(config, data.x_train.shape[0])
    x, y = _data_tensors(data, splits["select_train"])
    xv, yv = _data_tensors(data, splits["select_val"])
    errors: dict[float, float] = {}
    for lr in config.lr_grid:
        model = build_model(config, torch.Generator().manual_seed(_subseed(config.seed, 2)))
        fit(
            model,
            x,
            y,
            lr=lr,
            schedule=make_schedule(config),
            stopping=StoppingRule(config.select_epochs, config.select_epochs, enabled=False),
            batch_size=config.batch_size,
            generator=torch.Generator().manual_seed(_subseed(config.seed, 3)),
            progress=progress,
        )
        errors[lr] = error_rate(model, xv, yv)
    best = min(errors, key=lambda r: (errors[r], r))
    return best, errors


def train(
    config: TrainConfig,
    data=None,
    *,
    data_dir: str | os.PathLike | None = None,
    save_path: str | os.PathLike | None = None,
    progress: bool | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> dict:
    """One full run: split, learning-rate selection (unless ``config.lr``), training, test.

    Parameters
    ----------
    config : TrainConfig
        The run.
    data : manifold_nets.data.Dataset, optional
        The data set in memory; loaded from ``config.dataset`` if not given.
    data_dir : path, optional
        Where to find the data set (see :func:`manifold_nets.data.load_dataset`).
    save_path : path, optional
        Where to save the trained ``state_dict``; not written if the run diverged.
    progress : bool or None
        Show a progress bar; ``None``: only when stderr is a terminal.
    checkpoint : path, optional
        Checkpoint the training after the learning-rate selection and after every epoch
        (see :func:`fit`); if the file exists, resume from it: the selection is not redone
        and the epochs continue where the checkpoint left them, with bit-identical results
        on CPU. A checkpoint made with another configuration is refused
        (:class:`manifold_nets.checkpoint.CheckpointError`). The file is kept when the run
        ends, so running again returns the finished run's results at once.

    Returns
    -------
    dict
        A JSON-ready record: ``config`` (resolved), ``lr`` (the base rate used),
        ``selection`` (error per candidate rate), ``history`` (per-epoch rate, cost and
        train / validation / test error), ``test_error`` (final), ``epochs``,
        ``stop_reason``, ``diverged``, ``saved``, and wall times in seconds (of this
        process only). With a ``checkpoint``, also ``checkpoint`` (its path) and
        ``resumed_at_epoch`` (epochs it held when the run started, ``None`` if new).
    """
    resumed = None
    if checkpoint is not None and Path(checkpoint).exists():
        from .checkpoint import check_config, read_checkpoint

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
    bar = tqdm(
        total=n_select + config.max_epochs,
        desc=label,
        unit="ep",
        leave=False,
        disable=None if progress is None else not progress,
        file=sys.stderr,
    )
    with bar:
        if resumed is not None:
            lr, selection = resumed["extra"]["lr"], resumed["extra"]["selection"]
            bar.update(n_select)
        elif config.lr is None:
            lr, selection = select_lr(config, data, splits, progress=bar)
        else:
            lr, selection = config.lr, {}
        select_time = time.perf_counter() - start

        x, y = _data_tensors(data, splits["train"])
        xv, yv = _data_tensors(data, splits["val"])
        xt, yt = data.x_test[: config.test_size], data.y_test[: config.test_size]
        model = build_model(config, torch.Generator().manual_seed(_subseed(config.seed, 2)))

        def evaluate() -> dict[str, float]:
            return {"val_error": error_rate(model, xv, yv), "test_error": error_rate(model, xt, yt)}

        result = fit(
            model,
            x,
            y,
            lr=lr,
            schedule=make_schedule(config),
            stopping=stopping_rule(config),
            divergence=Divergence(config.collapse_error, config.collapse_epoch),
            batch_size=config.batch_size,
            generator=torch.Generator().manual_seed(_subseed(config.seed, 3)),
            evaluate=evaluate,
            progress=bar,
            checkpoint=checkpoint,
            checkpoint_info={"config": config.to_dict(), "lr": lr, "selection": selection},
        )
    saved = None
    if save_path is not None and not result.diverged:
        torch.save(model.state_dict(), save_path)
        saved = str(save_path)
    last = result.history[-1]
    record = {
        "config": config.to_dict(),
        "lr": lr,
        "selection": {repr(k): v for k, v in selection.items()},
        "history": result.history,
        "epochs": len(result.history),
        "test_error": last["test_error"],
        "val_error": last["val_error"],
        "stop_reason": result.stop_reason,
        "diverged": result.diverged,
        "saved": saved,
        "select_time_s": round(select_time, 3),
        "wall_time_s": round(time.perf_counter() - start, 3),
        "torch": torch.__version__,
    }
    if checkpoint is not None:
        record["checkpoint"] = str(checkpoint)
        record["resumed_at_epoch"] = None if resumed is None else len(resumed["history"])
    return record


# --------------------------------------------------------------------------------------
# Command line: every TrainConfig field is an option.


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, exclude: Sequence[str] = ()) -> None:
    """Add one option per :class:`TrainConfig` field (defaults: ``None`` = the config's)."""
    group = parser.add_argument_group("run configuration (defaults: the paper's protocol)")
    defaults = TrainConfig()
    choices = {"arch": ARCHS, "update": UPDATES, "protocol": PROTOCOLS, "stopping": STOPPING}
    for f in dataclasses.fields(TrainConfig):
        if f.name in exclude:
            continue
        default = getattr(defaults, f.name)
        kw: dict = {"default": None, "dest": f.name}
        if f.name in choices:
            kw["choices"] = choices[f.name]
        if f.name == "lr_grid":
            kw.update(type=float, nargs="+", metavar="LR")
        elif f.name == "bold_undo":
            kw["action"] = argparse.BooleanOptionalAction
        elif f.name in ("lr", "collapse_error"):
            kw["type"] = float
        else:
            kw["type"] = type(default)
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        kw["help"] = f"(default: {shown})"
        group.add_argument(_option(f.name), **kw)
    group.add_argument(
        "--textbook-bold-driver",
        action="store_true",
        help="bold driver x1.05 / x0.5 with undo (instead of the released code's x1.1 / x0.5)",
    )


def config_from_args(args: argparse.Namespace, **fixed) -> TrainConfig:
    """A :class:`TrainConfig` from parsed options (unset ones keep their defaults)."""
    values = {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = tuple(value) if f.name == "lr_grid" else value
    if getattr(args, "textbook_bold_driver", False):
        tb = BoldDriver.textbook()
        values.update(bold_increase=tb.increase, bold_decrease=tb.decrease, bold_undo=tb.undo)
    values.update(fixed)
    return TrainConfig(**values)


def unwritable(path: str | os.PathLike, option: str, *, folder: bool = False) -> str | None:
    """Why ``path`` (a file, or a folder with ``folder=True``) cannot be written, or ``None``.

    Creates the folder if needed and writes and removes a probe file in it, so that a
    command fails before any training rather than after it.
    """
    import tempfile

    target = Path(path) if folder else Path(path).parent
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".probe-"):
            pass
    except OSError as err:
        return (f"cannot write {option} {path}: {err.strerror or err} ({err.filename or target}). "
                f"Fix: pass a {option} in a folder you can write to.")
    if not folder and Path(path).is_dir():
        return f"cannot write {option} {path}: it is a folder. Fix: pass a file name."
    return None


def _run_train(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    try:
        config = config_from_args(args)
    except ValueError as err:
        args.parser.error(str(err))
    from .checkpoint import CheckpointError
    from .data import DataError

    for option, value in (("--out", args.out), ("--save", args.save),
                          ("--checkpoint", args.checkpoint)):
        problem = value and unwritable(value, option)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 1
    if args.checkpoint and Path(args.checkpoint).exists():
        print(f"resuming from {args.checkpoint}", file=sys.stderr)
    try:
        record = train(config, data_dir=args.data_dir, save_path=args.save,
                       checkpoint=args.checkpoint)
    except (DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    h = record["history"]
    print(f"config: {json.dumps(record['config'])}")
    if record["selection"]:
        sel = ", ".join(f"{k}: {v:.4f}" for k, v in record["selection"].items())
        print(f"learning-rate selection (error on {config.select_val} images): {sel}")
    print(f"base rate {record['lr']:g}; {record['epochs']} epochs; stop: {record['stop_reason']}")
    print(
        f"final: train {h[-1]['train_error']:.4f}  val {record['val_error']:.4f}  "
        f"test {record['test_error']:.4f}{'  (DIVERGED)' if record['diverged'] else ''}"
    )
    print(f"wall time {record['wall_time_s']:.1f} s (selection {record['select_time_s']:.1f} s)")
    if args.save and not record["saved"]:
        print(f"not saved to {args.save}: the run diverged", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        print(f"record written to {args.out}")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser(
        "train",
        allow_abbrev=False,
        help="one run: learning-rate selection, training and test error",
        description="One run of the paper's protocol (Section 4) for one configuration.",
    )
    p.add_argument("--data-dir", default=None, help="folder holding the IDX files")
    p.add_argument("--out", default=None, help="write the run's JSON record here")
    p.add_argument("--save", default=None, help="save the trained weights (state_dict) here")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="checkpoint after every epoch to PATH; resume from PATH if it exists")
    from .cli import positive_int

    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (default: 1)")
    add_config_arguments(p)
    p.set_defaults(func=_run_train, parser=p)
