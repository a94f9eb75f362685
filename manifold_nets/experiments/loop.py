r"""The one epoch loop of the experiments, for ``R`` runs at once.

:func:`fit_runs` trains ``R`` runs of the paper's protocol side by side: ``R = 1`` is the
sequential engine (one :class:`torch.nn.Module`, :class:`ModuleRuns`), ``R > 1`` the
stacked one (:class:`~manifold_nets.experiments.stacked.StackedNet`). Every epoch, in
order:

.. math::

    \begin{aligned}
    &\pi_r \leftarrow \text{a random permutation of run } r\text{'s images
        (its stream's generator)} \\
    &\textbf{for each } \text{slice } B \text{ of } 100 \text{ indices} \textbf{ do} \\
    &\quad L_{B,r} \leftarrow \textstyle\sum_{i \in B} \mathrm{CE}(f_r(x_i), y_i)
        \quad \text{(summed, not averaged; every run its own gradient)} \\
    &\quad \text{one } \texttt{invariant\_sgd} \text{ step of every run with its rate }
        \eta_{e,r} \\
    &c_{e,r} \leftarrow \text{mean of } L_{B,r};\;
        \text{train error} \leftarrow \text{error of the epoch's mini-batches} \\
    &\eta_{e+1,r} \leftarrow \text{schedule}_r(\eta_{e,r}, c_{e,r}, c_{e-1,r})
        \quad \text{(possibly undoing run } r\text{'s epoch)} \\
    &\text{validation and test error}; \text{divergence, then stopping, run by run}
    \end{aligned}

A run that stops leaves the stack: its final state goes to ``finish`` and it costs
nothing from then on.

The engines hold the networks; the loop holds everything else (rates, schedules'
references, histories). An engine offers:

- ``runs``: the number of runs ``R`` it holds;
- ``loss_and_grad(x, y, groups)``: one training-mode pass of summed cross-entropy per run,
  setting every parameter's ``.grad`` to its own run's gradient; returns ``(R,)`` losses
  and ``(R,)`` numbers of misclassified images;
- ``step(rate)``: one update of every run through
  :func:`manifold_nets.optim.invariant_sgd` with the ``(R,)`` Tensor of rates;
- ``snapshot()``, ``restore(snapshot, runs)`` (the bold driver's undo) and
  ``select(index)`` (a new engine holding the runs ``index``).

The loop's own state after an epoch (:class:`LoopState`) is plain data, so an engine's
caller can checkpoint it with the engine's tensors and resume with ``start=``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..optim import InvariantSGD, check_lr
from .config import Divergence, StoppingRule
from .progress import tqdm

__all__ = ["FitResult", "LoopState", "ModuleRuns", "Stream", "fit_runs"]


@dataclass
class FitResult:
    """One run's outcome: per-epoch history, why it stopped, whether it diverged, and what
    ``finish`` returned for it (``final``).

    Parameters
    ----------
    history, stop_reason, diverged, final
        The attributes below (all empty by default: a run that has not started).

    Attributes
    ----------
    history : list of dict
        One record per epoch: ``epoch``, ``lr``, ``cost`` (the mean summed loss of the
        epoch's mini-batches), ``train_error``, and what ``evaluate`` returned (e.g.
        ``val_error``, ``test_error``).
    stop_reason : str
        Why the run stopped: a reason of
        :class:`~manifold_nets.experiments.config.StoppingRule` (``"max-epochs"``,
        ``"train-error"``, ``"val-increase"``, ``"val-plateau"``) or of
        :class:`~manifold_nets.experiments.config.Divergence` (``"nan"``,
        ``"collapse"``); ``""`` while it trains.
    diverged : bool
        Whether the run stopped because it diverged.
    final : dict
        What ``finish`` returned for the run when it stopped (e.g. its selection error).

    Examples
    --------
    >>> from manifold_nets.experiments.loop import FitResult
    >>> r = FitResult(history=[{"epoch": 1, "lr": 0.01, "cost": 2.3, "train_error": 0.9}],
    ...               stop_reason="max-epochs")
    >>> len(r.history), r.stop_reason, r.diverged, r.final
    (1, 'max-epochs', False, {})
    """

    history: list[dict] = field(default_factory=list)
    stop_reason: str = ""
    diverged: bool = False
    final: dict = field(default_factory=dict)


class Stream(NamedTuple):
    """The images one run trains on: indices into the image store, and the generator
    of its per-epoch permutations.

    Parameters
    ----------
    index : torch.Tensor
        ``(n,)`` indices into the image store ``x`` of :func:`fit_runs`.
    generator : torch.Generator
        Draws the stream's permutation of ``index`` at every epoch; runs of one stream
        see the same mini-batches.

    Examples
    --------
    >>> from manifold_nets.experiments.loop import Stream
    >>> stream = Stream(torch.arange(10, 20), torch.Generator().manual_seed(0))
    >>> order = stream.index[torch.randperm(10, generator=stream.generator)]
    >>> sorted(order.tolist()) == list(range(10, 20))
    True
    """

    index: torch.Tensor
    generator: torch.Generator


Stream.index.__doc__ = """The ``(n,)`` indices into the image store (field 0).

Examples
--------
>>> from manifold_nets.experiments.loop import Stream
>>> Stream(torch.arange(3), torch.Generator()).index.tolist()
[0, 1, 2]
"""
Stream.generator.__doc__ = """The generator of the per-epoch permutations (field 1).

Examples
--------
>>> from manifold_nets.experiments.loop import Stream
>>> g = torch.Generator().manual_seed(0)
>>> Stream(torch.arange(3), g).generator is g
True
"""


@dataclass
class LoopState:
    """The loop's state after a finished epoch: enough, with the engine's tensors and the
    streams' generators, to go on exactly where it was.

    Parameters
    ----------
    epoch, active, lr, reference, results, order
        The attributes below.

    Attributes
    ----------
    epoch : int
        epochs finished
    active : list of int
        the runs still training, in the order the engine holds them
    lr : list of float
        every run's rate for its next epoch
    reference : list of float or None
        every run's reference cost for its schedule
    results : list of FitResult
        every run's results so far
    order : list of int, optional
        for a caller that trains its runs in another order than it lists them: the caller's
        index of each of the loop's runs (kept so that a resumed loop maps them the same way)

    Examples
    --------
    The state is plain data; it goes through a checkpoint as a dict and comes back:

    >>> from manifold_nets.experiments.loop import FitResult, LoopState
    >>> state = LoopState(epoch=3, active=[1], lr=[0.01, 0.005], reference=[2.1, 1.7],
    ...                   results=[FitResult(stop_reason="val-plateau"), FitResult()])
    >>> d = state.to_dict()
    >>> d["results"][0]["stop_reason"], LoopState.from_dict(d) == state
    ('val-plateau', True)
    """

    epoch: int
    active: list[int]
    lr: list[float]
    reference: list[float | None]
    results: list[FitResult]
    order: list[int] | None = None

    def to_dict(self) -> dict:
        """The state as plain, nested dicts and lists (what a checkpoint stores).

        Returns
        -------
        dict
            The fields, with every :class:`FitResult` as a dict.

        Examples
        --------
        >>> from manifold_nets.experiments.loop import FitResult, LoopState
        >>> LoopState(1, [0], [0.1], [None], [FitResult()]).to_dict()["results"]
        [{'history': [], 'stop_reason': '', 'diverged': False, 'final': {}}]
        """
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LoopState:
        """The state that :meth:`to_dict` gave ``d``.

        Parameters
        ----------
        d : dict
            What :meth:`to_dict` returned (``order`` may be missing).

        Returns
        -------
        LoopState
            A new state equal to the one saved.

        Examples
        --------
        >>> from manifold_nets.experiments.loop import FitResult, LoopState
        >>> state = LoopState(1, [0], [0.1], [None], [FitResult()])
        >>> LoopState.from_dict(state.to_dict()) == state
        True
        """
        return cls(d["epoch"], list(d["active"]), list(d["lr"]), list(d["reference"]),
                   [FitResult(**r) for r in d["results"]], d.get("order"))


def _groups_of(run_stream: list[int]) -> tuple[list[tuple[int, int, int]], list[int]]:
    """Ranges ``(start, stop, s)`` of consecutive runs of one stream, ``s`` the position of
    the stream among the streams used, and those streams."""
    used = sorted(set(run_stream))
    groups: list[tuple[int, int, int]] = []
    for j, s in enumerate(run_stream):
        if groups and run_stream[j - 1] == s:
            groups[-1] = (groups[-1][0], j + 1, groups[-1][2])
        else:
            groups.append((j, j + 1, used.index(s)))
    return groups, used


def fit_runs(
    engine,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: Sequence[float],
    schedules: Sequence,
    stopping: Sequence[StoppingRule],
    streams: Sequence[Stream],
    stream_of_run: Sequence[int],
    divergence: Sequence[Divergence | None] | None = None,
    batch_size: int = 100,
    evaluate: Callable[[object, list[int]], dict[str, list[float]]] | None = None,
    finish: Callable[[object, list[int]], list[dict] | None] | None = None,
    progress: tqdm | None = None,
    start: LoopState | None = None,
    on_epoch: Callable[[object, LoopState], None] | None = None,
) -> list[FitResult]:
    """Train the ``R`` runs of ``engine`` under the paper's protocol, epoch by epoch.

    Parameters
    ----------
    engine
        :class:`ModuleRuns` (``R = 1``) or a
        :class:`~manifold_nets.experiments.stacked.StackedNet`; it is trained in place
        while all its runs are active (a new one replaces it as runs leave).
    x, y : torch.Tensor
        the image store and its labels
    lr, schedules, stopping, divergence
        one entry per run: base rate, :class:`~manifold_nets.experiments.config.ExpDecay`
        or :class:`~manifold_nets.experiments.config.BoldDriver`,
        :class:`~manifold_nets.experiments.config.StoppingRule` and
        :class:`~manifold_nets.experiments.config.Divergence` (``None``: only a
        non-finite cost ends the run)
    streams, stream_of_run
        the data streams (:class:`Stream`, all of one length) and the stream of each run:
        run ``r`` sees ``x[streams[s].index[perm]]`` in the order its stream's generator
        draws. Runs of one stream share their mini-batches.
    batch_size : int
        images per mini-batch (the last one may be smaller)
    evaluate : callable, optional
        ``evaluate(engine, ids)`` after every epoch, with the active runs and their indices
        among the ``R``; returns, per key, one value per active run (``"val_error"`` feeds
        the stopping and collapse checks)
    finish : callable, optional
        ``finish(engine, ids)`` with the runs that stop after an epoch, before they leave;
        may return one dict per run, kept as the ``final`` of its :class:`FitResult`
    progress : tqdm, optional
        a bar to advance by one per epoch
    start : LoopState, optional
        resume from this state (the engine, the streams' generators and torch's RNG must
        hold the state of the same moment)
    on_epoch : callable, optional
        ``on_epoch(engine, state)`` after every epoch, once the runs that stopped have
        left: the moment to checkpoint

    Returns
    -------
    list of FitResult
        One per run.

    Raises
    ------
    ValueError
        If the streams differ in length, an argument of one entry per run has another
        length, or the engine does not hold the active runs of ``start``.

    Examples
    --------
    One declared Arch1 (:class:`ModuleRuns`, ``R = 1``) for two epochs on random images,
    with an evaluation after every epoch:

    >>> from manifold_nets import Arch1, declare
    >>> from manifold_nets.experiments.config import ExpDecay, StoppingRule
    >>> from manifold_nets.experiments.loop import ModuleRuns, Stream, fit_runs
    >>> net = Arch1(depth=1, width=4, in_features=12, num_classes=3)
    >>> _ = declare(net, "un")
    >>> x, y = torch.rand(40, 12), torch.randint(0, 3, (40,))
    >>> def evaluate(engine, ids):
    ...     return {"val_error": [0.5 for _ in ids]}
    >>> results = fit_runs(ModuleRuns(net), x, y, lr=[0.01], schedules=[ExpDecay(0.5)],
    ...                    stopping=[StoppingRule(1, 2)], batch_size=20,
    ...                    streams=[Stream(torch.arange(40), torch.Generator().manual_seed(0))],
    ...                    stream_of_run=[0], evaluate=evaluate)
    >>> [(h["epoch"], h["lr"], h["val_error"]) for h in results[0].history]
    [(1, 0.01, 0.5), (2, 0.005, 0.5)]
    >>> results[0].stop_reason
    'val-plateau'
    """
    R = engine.runs if start is None else len(start.results)
    n = len(streams[0].index)
    if any(len(s.index) != n for s in streams):
        raise ValueError("fit_runs: every stream must hold the same number of images")
    divergence = [d or Divergence(collapse_error=None) for d in (divergence or [None] * R)]
    for name, seq in (("lr", lr), ("schedules", schedules), ("stopping", stopping),
                      ("divergence", divergence), ("stream_of_run", stream_of_run)):
        if len(seq) != R:
            raise ValueError(f"fit_runs: {name} has {len(seq)} entries for {R} runs")
    for r, v in enumerate(lr):  # the optimisers' own rule: the loop sets their rates
        try:
            check_lr(v)
        except (TypeError, ValueError) as err:
            raise ValueError(f"fit_runs: run {r}: {err}") from None
    if start is None:
        state = LoopState(0, list(range(R)), [float(v) for v in lr], [None] * R,
                          [FitResult() for _ in range(R)])
    else:
        state = start
    if state.active and engine.runs != len(state.active):
        raise ValueError(f"fit_runs: the engine holds {engine.runs} runs, the state "
                         f"{len(state.active)} active ones")
    results = state.results
    train_errors = [[h["train_error"] for h in r.history] for r in results]
    val_errors = [[h["val_error"] for h in r.history if "val_error" in h] for r in results]
    if progress is not None and state.epoch:
        progress.update(state.epoch)
    while state.active:
        active, lr_now = state.active, state.lr
        state.epoch += 1
        undo = [getattr(schedules[i], "undo", False) for i in active]
        snapshot = engine.snapshot() if any(undo) else None
        rate = torch.tensor([lr_now[i] for i in active], dtype=engine.dtype)
        order = torch.stack([s.index[torch.randperm(n, generator=s.generator)]
                             for s in streams])
        run_stream = [stream_of_run[i] for i in active]
        shared = len(set(run_stream)) == 1
        if shared:  # one contiguous copy per epoch; every run sees the same mini-batch
            xe, ye = x[order[run_stream[0]]], y[order[run_stream[0]]]
        else:  # ranges of consecutive runs of one stream, and the stream of each range
            groups, used = _groups_of(run_stream)
            order = order[used]
            label_row = torch.as_tensor([used.index(s) for s in run_stream])
        total = torch.zeros(len(active), dtype=torch.float64)
        wrong = torch.zeros(len(active), dtype=torch.float64)
        batches = 0
        for b in range(0, n, batch_size):
            if shared:
                loss, bad = engine.loss_and_grad(xe[b : b + batch_size],
                                                 ye[b : b + batch_size])
            else:  # one mini-batch per range of runs, its labels copied to its runs
                idx = order[:, b : b + batch_size]
                loss, bad = engine.loss_and_grad(x[idx], y[idx].index_select(0, label_row),
                                                 groups)
            engine.step(rate)
            total += loss
            wrong += bad
            batches += 1
        costs = (total / batches).tolist()
        wrongs = wrong.tolist()

        decisions, restore = [], []
        for j, i in enumerate(active):
            decision = schedules[i].step(lr_now[i], costs[j], state.reference[i])
            if decision.undo and snapshot is not None:
                restore.append(j)
            else:
                state.reference[i] = costs[j]
            decisions.append(decision)
        if restore:
            engine.restore(snapshot, restore)
        evals = evaluate(engine, list(active)) if evaluate is not None else {}

        stopped, keep = [], []
        for j, i in enumerate(active):
            cost, decision = costs[j], decisions[j]
            train_error = wrongs[j] / n if math.isfinite(cost) else 1.0
            record = {"epoch": state.epoch, "lr": lr_now[i], "cost": cost,
                      "train_error": train_error}
            lr_now[i] = decision.lr
            record.update({k: v[j] for k, v in evals.items()})
            results[i].history.append(record)
            train_errors[i].append(train_error)
            if "val_error" in record:
                val_errors[i].append(record["val_error"])
            undone_nan = decision.undo and not math.isfinite(cost)
            reason = None if undone_nan else divergence[i].reason(cost, val_errors[i])
            if reason is not None:
                results[i].stop_reason, results[i].diverged = reason, True
            else:
                reason = stopping[i].reason(train_errors[i], val_errors[i])
                if reason is not None:
                    results[i].stop_reason = reason
            (stopped if reason is not None else keep).append(j)
        if progress is not None:
            progress.update(1)
            if len(active) == 1:
                last = results[active[0]].history[-1]
                val = {k: v for k, v in last.items() if k in ("val_error", "val_mean_iou")}
                progress.set_postfix_str(
                    f"lr={last['lr']:.2e}"
                    + "".join(f" {k}={v:.4f}" for k, v in val.items()), refresh=False)
        if stopped:
            if finish is not None:
                done = [active[j] for j in stopped]
                finals = finish(engine.select(stopped), done)
                for i, final in zip(done, finals or [{}] * len(done), strict=True):
                    results[i].final.update(final)
            engine = engine.select(keep) if keep else engine
            state.active = [active[j] for j in keep]
        if on_epoch is not None:
            on_epoch(engine, state)
    return results


class ModuleRuns:
    """One :class:`torch.nn.Module` as an engine of :func:`fit_runs` (``R = 1``).

    The model is trained in place with autograd and :class:`~manifold_nets.InvariantSGD`
    (plain SGD steps of the parameters' manifolds: UN, SM or Euclidean, as
    :func:`manifold_nets.declare` set them; the single-tensor reference path, which the
    stacked engine takes too),
    whose rate :func:`fit_runs` sets every step.

    Parameters
    ----------
    model : nn.Module
        declared with :func:`manifold_nets.declare` (or plain: Euclidean SGD)
    loss : callable
        ``loss(logits, targets)``, summed over the mini-batch (default: cross-entropy)
    optimizer : InvariantSGD, optional
        built over ``model.parameters()`` if not given (momentum 0: the paper's SGD)
    errors : callable, optional
        ``errors(logits, targets)``: the misclassified samples of a mini-batch (default:
        arg-max mismatches), summed; the loop divides by the number of samples
    augment : callable, optional
        ``augment(x, y) -> (x, y)`` applied to every training mini-batch before the
        forward pass (e.g. random flips; its randomness is the caller's to checkpoint)

    Attributes
    ----------
    runs : int
        Always 1.
    model, optimizer, loss, errors, augment
        As given (with the defaults filled in).
    dtype : torch.dtype
        The dtype of the model's first parameter (the dtype of the rates).

    Examples
    --------
    One step of the engine as :func:`fit_runs` takes it: a summed loss and its gradient,
    then an update with a rate given as a Tensor.

    >>> from manifold_nets import Arch1, declare
    >>> from manifold_nets.experiments.loop import ModuleRuns
    >>> net = Arch1(depth=1, width=4, in_features=12, num_classes=3)
    >>> _ = declare(net, "un")
    >>> engine = ModuleRuns(net)
    >>> loss, wrong = engine.loss_and_grad(torch.rand(8, 12), torch.randint(0, 3, (8,)))
    >>> loss.shape, wrong.shape
    (torch.Size([1]), torch.Size([1]))
    >>> engine.step(torch.tensor([0.1]))
    >>> w = net.filters()[0]
    >>> torch.allclose(w.norm(dim=1), torch.ones(4))
    True
    """

    runs = 1

    def __init__(self, model: torch.nn.Module, loss: Callable | None = None,
                 optimizer: InvariantSGD | None = None, errors: Callable | None = None,
                 augment: Callable | None = None):
        self.model = model
        self.augment = augment
        self.loss = loss or (lambda z, t: F.cross_entropy(z, t, reduction="sum"))
        self.errors = errors or (lambda z, t: (z.argmax(1) != t).sum())
        self.optimizer = optimizer or InvariantSGD(model.parameters(), lr=0.0,
                                                   foreach=False, fused=False)
        self.dtype = next(model.parameters()).dtype

    def loss_and_grad(self, x: torch.Tensor, y: torch.Tensor, groups=None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """One training-mode pass: the summed loss of the mini-batch and its gradient.

        Parameters
        ----------
        x, y : torch.Tensor
            The mini-batch (augmented first, with ``augment``).
        groups : optional
            Ignored (one run has one stream).

        Returns
        -------
        (torch.Tensor, torch.Tensor)
            The ``(1,)`` summed loss and the ``(1,)`` number of misclassified samples, on
            the CPU; every parameter's ``.grad`` holds the gradient.

        Examples
        --------
        >>> from manifold_nets.experiments.loop import ModuleRuns
        >>> model = torch.nn.Linear(3, 2, bias=False)
        >>> torch.nn.init.zeros_(model.weight)  # doctest: +ELLIPSIS
        Parameter containing:
        ...
        >>> loss, wrong = ModuleRuns(model).loss_and_grad(torch.rand(4, 3),
        ...                                               torch.tensor([0, 1, 0, 1]))
        >>> round(loss.item() / 4, 4), model.weight.grad.shape  # log 2 per sample
        (0.6931, torch.Size([2, 3]))
        """
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.augment is not None:
            x, y = self.augment(x, y)
        logits = self.model(x)
        loss = self.loss(logits, y)
        loss.backward()
        with torch.no_grad():
            wrong = self.errors(logits, y)
        # the loop accumulates on the CPU, whatever device the model is on
        return loss.detach().view(1).cpu(), wrong.view(1).cpu()

    def step(self, rate: torch.Tensor) -> None:
        """One update of the model with rate ``rate``.

        Parameters
        ----------
        rate : torch.Tensor
            The ``(1,)`` rate; it becomes every parameter group's ``lr`` (a Tensor), on
            the model's device.

        Examples
        --------
        >>> from manifold_nets.experiments.loop import ModuleRuns
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> engine = ModuleRuns(model)
        >>> before = model.weight.detach().clone()
        >>> model.weight.grad = torch.ones(1, 2)
        >>> engine.step(torch.tensor([0.5]))
        >>> torch.allclose(model.weight, before - 0.5)
        True
        """
        rate = rate.reshape(()).to(next(self.model.parameters()).device)
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        self.optimizer.step()

    def snapshot(self) -> dict:
        """A copy of the model's state, for the bold driver's undo (:meth:`restore`).

        Returns
        -------
        dict
            A detached clone of ``model.state_dict()``.

        Examples
        --------
        >>> from manifold_nets.experiments.loop import ModuleRuns
        >>> sorted(ModuleRuns(torch.nn.Linear(2, 1)).snapshot())
        ['bias', 'weight']
        """
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def restore(self, snapshot: dict, runs: Sequence[int]) -> None:
        """Undo the epoch: load ``snapshot`` back if ``runs`` names the run.

        Parameters
        ----------
        snapshot : dict
            What :meth:`snapshot` returned.
        runs : sequence of int
            The runs to restore: ``[0]`` or empty (nothing happens).

        Examples
        --------
        >>> from manifold_nets.experiments.loop import ModuleRuns
        >>> model = torch.nn.Linear(2, 1)
        >>> engine = ModuleRuns(model)
        >>> saved = engine.snapshot()
        >>> with torch.no_grad():
        ...     _ = model.weight.add_(1.0)
        >>> engine.restore(saved, [0])
        >>> torch.equal(model.weight, saved["weight"])
        True
        """
        if list(runs):
            self.model.load_state_dict(snapshot)

    def select(self, index: Sequence[int]) -> ModuleRuns:
        """The engine of the runs ``index``: this engine itself, its one run.

        Parameters
        ----------
        index : sequence of int
            Must be ``[0]``.

        Returns
        -------
        ModuleRuns
            ``self``.

        Raises
        ------
        ValueError
            If ``index`` is not ``[0]``.

        Examples
        --------
        >>> from manifold_nets.experiments.loop import ModuleRuns
        >>> engine = ModuleRuns(torch.nn.Linear(2, 1))
        >>> engine.select([0]) is engine
        True
        >>> engine.select([1])
        Traceback (most recent call last):
        ...
        ValueError: ModuleRuns holds one run; cannot select [1]
        """
        if list(index) != [0]:
            raise ValueError(f"ModuleRuns holds one run; cannot select {list(index)}")
        return self
