r"""The paper's protocol (Section 4) as data: the run configuration, the schedules, the
stopping and divergence rules, and the random split.

A run is defined by a :class:`TrainConfig` (defaults: the paper's protocol) and seeded
from ``TrainConfig.seed``: the split (:func:`split_indices`), the selection subsets, the
initial weights and the batch order each draw from their own stream (:func:`subseed`).
The schedules are pure functions (:func:`exp_decay`, :func:`bold_driver`) with small
frozen objects around them; the rules (:class:`StoppingRule`, :class:`Divergence`) are
pure functions of the history. :mod:`manifold_nets.experiments.loop` applies them after
every epoch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..declare import UPDATES

__all__ = [
    "ARCHS",
    "PROTOCOLS",
    "STOPPING",
    "UPDATES",
    "BoldDriver",
    "Decision",
    "Divergence",
    "ExpDecay",
    "StoppingRule",
    "TrainConfig",
    "bold_driver",
    "config_diff",
    "exp_decay",
    "make_schedule",
    "split_indices",
    "stopping_rule",
    "subseed",
]

ARCHS = ("arch1", "arch2")
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

    Defaults are the paper's protocol (Section 4).

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
# The random split.


def split_indices(config: TrainConfig, n_available: int) -> dict[str, torch.Tensor]:
    """Disjoint random index sets into the training file: train, val, select_train,
    select_val (the last two drawn from the train part)."""
    need = config.train_size + config.val_size
    if need > n_available:
        raise ValueError(
            f"train_size + val_size = {need} images, but the training file has {n_available}"
        )
    gen = torch.Generator().manual_seed(subseed(config.seed, 1))
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


def subseed(seed: int, stream: int) -> int:
    """Independent seeds for the streams of one run (split, init, batch order)."""
    return (seed * 1_000_003 + stream * 7919) % (2**63 - 1)



def config_diff(stored: Mapping | None, expected: Mapping, labels: tuple[str, str] = (
        "stored", "now")) -> list[str]:
    """The fields where two configurations (as dicts) differ, one readable line each.

    Examples
    --------
    >>> from manifold_nets.experiments.config import config_diff
    >>> config_diff({"lr": 0.1, "seed": 0}, {"lr": 0.01, "seed": 0})
    ['lr: stored 0.1, now 0.01']
    """
    stored = stored or {}
    a, b = labels
    return [f"{k}: {a} {stored.get(k)!r}, {b} {expected.get(k)!r}"
            for k in sorted(set(stored) | set(expected)) if stored.get(k) != expected.get(k)]
