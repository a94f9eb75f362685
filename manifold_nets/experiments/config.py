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

from ..table1 import UPDATES

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
    "best_rate",
    "bold_driver",
    "config_diff",
    "exp_decay",
    "make_schedule",
    "split_indices",
    "stopping_rule",
    "subseed",
]

#: The networks of Section 4: ``TrainConfig.arch``.
ARCHS = ("arch1", "arch2")
#: The learning-rate protocols: ``TrainConfig.protocol``.
PROTOCOLS = ("exp-decay", "bold-driver")
#: Where the stopping criteria apply: ``TrainConfig.stopping``.
STOPPING = ("all", "bold-driver", "none")

# --------------------------------------------------------------------------------------
# Schedules: pure functions, and small frozen objects that call them.


def exp_decay(lr: float, gamma: float = 0.95) -> float:
    r"""Exponential decay, one epoch: :math:`\eta \leftarrow \gamma \eta`.

    Parameters
    ----------
    lr : float
        The rate :math:`\eta` used in the epoch.
    gamma : float
        The decay factor :math:`\gamma` (paper: 0.95).

    Returns
    -------
    float
        The next epoch's rate.

    Examples
    --------
    >>> from manifold_nets.experiments.config import exp_decay
    >>> round(exp_decay(0.1), 6), round(exp_decay(0.1, gamma=0.5), 6)
    (0.095, 0.05)
    """
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
    increase : float
        The factor when the cost did not rise (released code: 1.1).
    decrease : float
        The factor when the cost rose or is not finite (0.5).

    Returns
    -------
    (float, bool)
        The next rate, and whether the epoch is accepted (``False``: the cost rose).

    Examples
    --------
    >>> from manifold_nets.experiments.config import bold_driver
    >>> bold_driver(0.1, cost=2.0, previous=1.0)  # the cost rose: halve
    (0.05, False)
    >>> lr, accepted = bold_driver(0.1, cost=1.0, previous=2.0)
    >>> round(lr, 6), accepted
    (0.11, True)
    >>> bold_driver(0.1, cost=float("nan"), previous=1.0)
    (0.05, False)
    """
    if previous is None:
        return lr, math.isfinite(cost)
    if not math.isfinite(cost) or cost > previous:
        return lr * decrease, False
    return lr * increase, True


class Decision(NamedTuple):
    """A schedule's verdict after an epoch: the next rate, and whether to undo the epoch.

    Parameters
    ----------
    lr : float
        The next epoch's rate.
    undo : bool
        Whether to restore the weights from before the epoch.

    Examples
    --------
    >>> from manifold_nets.experiments.config import BoldDriver
    >>> lr, undo = BoldDriver.textbook().step(0.1, cost=2.0, previous=1.0)
    >>> lr, undo
    (0.05, True)
    """

    #: The next epoch's rate.
    lr: float
    #: Whether to restore the weights from before the epoch.
    undo: bool


@dataclass(frozen=True)
class ExpDecay:
    """Exponential decay: multiply the rate by ``gamma`` after every epoch (paper: 0.95).

    Parameters
    ----------
    gamma : float
        The decay factor, ``0 < gamma <= 1``.

    Attributes
    ----------
    gamma : float
        The decay factor.

    Raises
    ------
    ValueError
        If ``gamma`` is not in ``(0, 1]``.

    Examples
    --------
    >>> from manifold_nets.experiments.config import ExpDecay
    >>> lr, undo = ExpDecay(0.5).step(0.1, cost=1.0, previous=None)
    >>> lr, undo
    (0.05, False)
    """

    gamma: float = 0.95

    def __post_init__(self):
        if not 0 < self.gamma <= 1:
            raise ValueError(f"Invalid decay factor gamma: {self.gamma} (need 0 < gamma <= 1)")

    def step(self, lr: float, cost: float, previous: float | None) -> Decision:
        """The decision after an epoch: :func:`exp_decay`, never undo.

        Parameters
        ----------
        lr : float
            The rate used in the epoch.
        cost : float
            The epoch's mean mini-batch cost (not used).
        previous : float or None
            The cost compared with (not used).

        Returns
        -------
        Decision
            ``(gamma * lr, False)``.

        Examples
        --------
        >>> from manifold_nets.experiments.config import ExpDecay
        >>> ExpDecay(0.5).step(0.2, cost=3.0, previous=1.0)
        Decision(lr=0.1, undo=False)
        """
        return Decision(exp_decay(lr, self.gamma), False)


@dataclass(frozen=True)
class BoldDriver:
    """The bold driver protocol, :func:`bold_driver` after every epoch.

    The defaults are the authors' released code: ``x1.1`` when the epoch's mean
    mini-batch cost did not rise, ``x0.5`` when it rose (or is NaN), comparing with the
    previous epoch and never undoing it. :meth:`textbook` gives the usual variant: ``x1.05``
    / ``x0.5``, and a rejected epoch is undone (weights restored, compared against the last
    accepted cost).

    Parameters
    ----------
    increase : float
        The factor when the cost did not rise, ``>= 1``.
    decrease : float
        The factor when it rose, in ``(0, 1)``.
    undo : bool
        Undo a rejected epoch.

    Attributes
    ----------
    increase, decrease : float
        The two factors.
    undo : bool
        Whether a rejected epoch is undone.

    Raises
    ------
    ValueError
        If ``increase < 1`` or ``decrease`` is not in ``(0, 1)``.

    Examples
    --------
    >>> from manifold_nets.experiments.config import BoldDriver
    >>> BoldDriver().step(0.1, cost=2.0, previous=1.0)
    Decision(lr=0.05, undo=False)
    >>> BoldDriver.textbook().step(0.1, cost=2.0, previous=1.0)
    Decision(lr=0.05, undo=True)
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
        """The textbook bold driver: ``x1.05`` / ``x0.5``, rejected epochs undone.

        Returns
        -------
        BoldDriver
            ``BoldDriver(increase=1.05, decrease=0.5, undo=True)``.

        Examples
        --------
        >>> from manifold_nets.experiments.config import BoldDriver
        >>> BoldDriver.textbook()
        BoldDriver(increase=1.05, decrease=0.5, undo=True)
        """
        return cls(increase=1.05, decrease=0.5, undo=True)

    def step(self, lr: float, cost: float, previous: float | None) -> Decision:
        """The decision after an epoch: :func:`bold_driver`, and undo a rejected epoch if
        ``undo`` (never the first one, which has nothing to compare with).

        Parameters
        ----------
        lr : float
            The rate used in the epoch.
        cost : float
            The epoch's mean mini-batch cost.
        previous : float or None
            The cost it is compared with (``None`` in the first epoch).

        Returns
        -------
        Decision
            The next rate, and whether to undo the epoch.

        Examples
        --------
        >>> from manifold_nets.experiments.config import BoldDriver
        >>> BoldDriver().step(0.1, cost=1.0, previous=None)
        Decision(lr=0.1, undo=False)
        >>> BoldDriver(undo=True).step(0.1, cost=2.0, previous=1.0)
        Decision(lr=0.05, undo=True)
        """
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

    Parameters
    ----------
    min_epochs, max_epochs, train_error, val_change, lookback, enabled
        The attributes of the same names.

    Attributes
    ----------
    min_epochs : int
        The first epoch at which the criteria apply (25).
    max_epochs : int
        The last epoch (60).
    train_error : float
        Criterion (i): stop when the training error falls below it.
    val_change : float
        Criterion (iii): stop when two successive validation errors differ by less.
    lookback : int
        Criterion (ii): compare the validation error with this many epochs earlier.
    enabled : bool
        Whether the criteria apply at all.

    Examples
    --------
    >>> from manifold_nets.experiments.config import StoppingRule
    >>> rule = StoppingRule(min_epochs=2, max_epochs=5)
    >>> print(rule.reason([0.1], [0.2]))
    None
    >>> rule.reason([0.1, 0.05], [0.2, 0.2])
    'val-plateau'
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

        Parameters
        ----------
        train_errors : sequence of float
            The training error of every epoch so far.
        val_errors : sequence of float
            The validation error of every epoch so far, or empty.

        Returns
        -------
        str or None
            ``"train-error"``, ``"val-increase"``, ``"val-plateau"`` or ``"max-epochs"``,
            the first that applies; ``None`` to go on.

        Examples
        --------
        >>> from manifold_nets.experiments.config import StoppingRule
        >>> rule = StoppingRule(min_epochs=2, max_epochs=5)
        >>> rule.reason([0.1, 1e-6], [0.2, 0.1])
        'train-error'
        >>> rule.reason([0.1] * 5, [])
        'max-epochs'
        >>> StoppingRule(min_epochs=2, enabled=False).reason([0.1, 1e-6], [0.2, 0.1]) is None
        True
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

    Parameters
    ----------
    collapse_error : float or None
        The validation error above which a run has collapsed (0.5; ``None``: never).
    collapse_epoch : int
        The first epoch at which collapse is checked (10).

    Attributes
    ----------
    collapse_error : float or None
        The collapse threshold.
    collapse_epoch : int
        The first epoch checked.

    Examples
    --------
    >>> from manifold_nets.experiments.config import Divergence
    >>> rule = Divergence()
    >>> rule.reason(float("nan"), []), rule.reason(1.0, [0.9] * 10), rule.reason(1.0, [0.1] * 10)
    ('nan', 'collapse', None)
    """

    collapse_error: float | None = 0.5
    collapse_epoch: int = 10

    def reason(self, cost: float, val_errors: Sequence[float]) -> str | None:
        """Why the run has diverged after ``len(val_errors)`` epochs, or ``None``.

        Parameters
        ----------
        cost : float
            The last epoch's mean mini-batch cost.
        val_errors : sequence of float
            The validation error of every epoch so far (or empty).

        Returns
        -------
        str or None
            ``"nan"`` (a non-finite cost), ``"collapse"``, or ``None``.

        Examples
        --------
        >>> from manifold_nets.experiments.config import Divergence
        >>> Divergence(collapse_epoch=2).reason(1.0, [0.6, 0.7])
        'collapse'
        >>> print(Divergence(collapse_error=None).reason(1.0, [0.9] * 20))
        None
        """
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

    Parameters
    ----------
    arch, depth, width, update, protocol, dataset, seed, batch_size, lr
        The attributes of the same names.
    lr_grid, select_train, select_val, select_epochs, train_size, val_size, test_size
        The attributes of the same names.
    min_epochs, max_epochs, decay, bold_increase, bold_decrease, bold_undo, stopping
        The attributes of the same names.
    stop_train_error, stop_val_change, stop_lookback, collapse_error, collapse_epoch
        The attributes of the same names.

    Raises
    ------
    ValueError
        On an unknown ``arch``, ``update``, ``protocol`` or ``stopping``, a count that is
        not a positive integer, ``min_epochs > max_epochs``, a rate that is not positive,
        selection subsets larger than ``train_size``, or invalid schedule factors (the
        message names the field).

    Examples
    --------
    >>> from manifold_nets.experiments.config import TrainConfig
    >>> config = TrainConfig(update="sm", protocol="exp-decay")
    >>> config.arch, config.batch_size, config.lr_grid
    ('arch2', 100, (0.01, 0.001, 0.0001, 1e-05))
    >>> TrainConfig(update="adam")
    Traceback (most recent call last):
    ...
    ValueError: Invalid update: 'adam'; choose one of bsgd, sm, un
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
        """The configuration as plain data (for JSON and checkpoints).

        Returns
        -------
        dict
            Every field by name; ``lr_grid`` as a list.

        Examples
        --------
        >>> from manifold_nets.experiments.config import TrainConfig
        >>> d = TrainConfig().to_dict()
        >>> len(d), d["update"], d["lr_grid"][:2]
        (28, 'un', [0.01, 0.001])
        """
        d = dataclasses.asdict(self)
        d["lr_grid"] = list(self.lr_grid)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The configuration of :meth:`to_dict`'s output (validated again).

        Parameters
        ----------
        d : dict
            Fields by name; missing ones take their defaults.

        Returns
        -------
        TrainConfig
            The configuration.

        Raises
        ------
        TypeError
            On a name that is not a field.
        ValueError
            On an invalid value (see the class).

        Examples
        --------
        >>> from manifold_nets.experiments.config import TrainConfig
        >>> config = TrainConfig(depth=4, seed=3)
        >>> TrainConfig.from_dict(config.to_dict()) == config
        True
        """
        return cls(**d)


def make_schedule(config: TrainConfig) -> ExpDecay | BoldDriver:
    """The schedule object of ``config.protocol``.

    Parameters
    ----------
    config : TrainConfig
        The run; ``decay`` or the ``bold_*`` fields give the factors.

    Returns
    -------
    ExpDecay or BoldDriver
        An object whose ``step(lr, cost, previous)`` returns a :class:`Decision`.

    Raises
    ------
    ValueError
        If the factors are invalid.

    Examples
    --------
    >>> from manifold_nets.experiments.config import TrainConfig, make_schedule
    >>> make_schedule(TrainConfig(protocol="exp-decay"))
    ExpDecay(gamma=0.95)
    >>> make_schedule(TrainConfig(protocol="bold-driver"))
    BoldDriver(increase=1.1, decrease=0.5, undo=False)
    """
    if config.protocol == "exp-decay":
        return ExpDecay(config.decay)
    return BoldDriver(config.bold_increase, config.bold_decrease, config.bold_undo)


def stopping_rule(config: TrainConfig) -> StoppingRule:
    """The stopping rule of a run.

    The criteria apply when ``config.stopping`` is ``"all"``, or ``"bold-driver"`` under
    the bold-driver protocol; otherwise only ``max_epochs`` does.

    Parameters
    ----------
    config : TrainConfig
        The run.

    Returns
    -------
    StoppingRule
        From ``min_epochs``, ``max_epochs`` and the ``stop_*`` fields.

    Examples
    --------
    >>> from manifold_nets.experiments.config import TrainConfig, stopping_rule
    >>> stopping_rule(TrainConfig(stopping="bold-driver", protocol="exp-decay")).enabled
    False
    >>> stopping_rule(TrainConfig()).lookback
    5
    """
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


def best_rate(scores: Mapping[float, float | None], *, lower_is_better: bool = True
              ) -> float:
    """The rate selection's rule, for Table 2 and CamVid alike: the candidate rate with the
    best score; ties go to the smaller rate.

    Parameters
    ----------
    scores : mapping
        ``{rate: score}``; ``None`` or NaN marks a rate whose run diverged, which is never
        selected
    lower_is_better : bool
        ``True`` for an error (Table 2), ``False`` for a mean IoU (CamVid)

    Returns
    -------
    float
        the selected rate

    Raises
    ------
    ValueError
        no candidates, or every candidate diverged

    Examples
    --------
    >>> from manifold_nets.experiments.config import best_rate
    >>> best_rate({0.1: 0.05, 0.01: 0.03, 0.001: 0.03})  # errors: the tie goes to 0.001
    0.001
    >>> best_rate({0.1: None, 0.01: 0.41}, lower_is_better=False)  # mean IoU; 0.1 diverged
    0.01
    >>> best_rate({0.1: float("nan")})
    Traceback (most recent call last):
    ...
    ValueError: every candidate rate diverged: 0.1
    """
    if not scores:
        raise ValueError("no candidate rates to select from")
    ok = {float(r): float(v) for r, v in scores.items()
          if v is not None and not math.isnan(v)}
    if not ok:
        raise ValueError("every candidate rate diverged: "
                         + ", ".join(f"{float(r):g}" for r in scores))
    sign = 1.0 if lower_is_better else -1.0
    return min(ok, key=lambda r: (sign * ok[r], r))


def split_indices(config: TrainConfig, n_available: int) -> dict[str, torch.Tensor]:
    """Disjoint random index sets into the training file: train, val, select_train,
    select_val (the last two drawn from the train part).

    Seeded by ``subseed(config.seed, 1)``: the same configuration gives the same split.

    Parameters
    ----------
    config : TrainConfig
        The sizes (``train_size``, ``val_size``, ``select_train``, ``select_val``) and
        the seed.
    n_available : int
        Images in the training file (60000 for MNIST).

    Returns
    -------
    dict of str to torch.Tensor
        ``"train"``, ``"val"``, ``"select_train"`` and ``"select_val"`` index tensors.

    Raises
    ------
    ValueError
        If ``train_size + val_size`` exceeds ``n_available``.

    Examples
    --------
    >>> from manifold_nets.experiments.config import TrainConfig, split_indices
    >>> config = TrainConfig(train_size=100, val_size=20, select_train=50, select_val=20)
    >>> parts = split_indices(config, n_available=150)
    >>> {k: len(v) for k, v in parts.items()}
    {'train': 100, 'val': 20, 'select_train': 50, 'select_val': 20}
    >>> set(parts["select_val"].tolist()) <= set(parts["train"].tolist())
    True
    >>> set(parts["train"].tolist()) & set(parts["val"].tolist())
    set()
    """
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
    """Independent seeds for the streams of one run (split, init, batch order).

    Parameters
    ----------
    seed : int
        The run's seed (``TrainConfig.seed``).
    stream : int
        The stream's number (1 is the split).

    Returns
    -------
    int
        ``(seed * 1000003 + stream * 7919) mod (2**63 - 1)``, a valid
        ``torch.Generator.manual_seed`` seed.

    Examples
    --------
    >>> from manifold_nets.experiments.config import subseed
    >>> subseed(0, 1), subseed(1, 1), subseed(0, 2)
    (7919, 1007922, 15838)
    """
    return (seed * 1_000_003 + stream * 7919) % (2**63 - 1)



def config_diff(stored: Mapping | None, expected: Mapping, labels: tuple[str, str] = (
        "stored", "now")) -> list[str]:
    """The fields where two configurations (as dicts) differ, one readable line each.

    Parameters
    ----------
    stored : mapping or None
        The configuration found (e.g. in a checkpoint); ``None`` counts as empty.
    expected : mapping
        The configuration of the current run.
    labels : (str, str)
        How the two are named in the lines.

    Returns
    -------
    list of str
        ``"<field>: <label> <value>, <label> <value>"`` for every field that differs,
        sorted by field; empty when they agree.

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
