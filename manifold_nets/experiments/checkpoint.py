r"""Checkpoints that resume a training run exactly, and refuse to load what does not fit.

A checkpoint is one file written by :func:`save_checkpoint` with :func:`torch.save`: first
to a temporary file beside it, flushed and fsynced, then moved into place with
:func:`os.replace`, so a run killed at any moment leaves either the previous checkpoint or
the new one, never a torn file. It holds

- the model's ``state_dict`` (weights and batch-norm statistics) and a description of the
  architecture: every entry's shape and dtype, and every parameter's manifold;
- the optimiser's ``state_dict`` (geoopt's state and momentum buffers included);
- the schedule's state (current rate, reference cost, base rate), the run's history;
- the state of the batch-order :class:`torch.Generator` and of torch's global CPU RNG;
- the resolved configuration (a :class:`~manifold_nets.experiments.config.TrainConfig` as a dict)
  and anything else the caller wants back (``extra``, e.g. the selected learning rate).

:func:`load_checkpoint` checks the file *before* it touches the model, and refuses with a
:class:`CheckpointError` (a :class:`ValueError`) naming what is wrong:

- the configuration differs from the one given (each differing field is named);
- the architecture differs: a missing or unexpected entry, another shape or dtype, another
  manifold for a parameter (e.g. a checkpoint of an SM run loaded into a UN model);
- a parameter or optimiser buffer is not finite (batch-norm running statistics are not
  checked: they can overflow in a run whose cost is still finite);
- a parameter on an :class:`~manifold_nets.ObliqueManifold` is off the manifold: a filter
  whose norm is not 1 within :data:`~manifold_nets.manifolds.UNIT_NORM_TOL` of its dtype.
  geoopt itself loads such state without a check, and UN would then silently train a
  different network.

On CPU, resuming a run of :func:`~manifold_nets.experiments.engines.fit` from a checkpoint gives
bit-identical iterates compared with the uninterrupted run (``tests/test_checkpoint.py``).

:class:`GroupCheckpoint` is the same policy for a group of runs on the stacked engine: one
file after every epoch of the selection and of the training.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import geoopt
import torch

from ..manifolds import UNIT_NORM_TOL, ObliqueManifold
from ..manifolds import check_unit_norm as check_unit_norm_of
from .config import TrainConfig, config_diff
from .io import atomic_write
from .loop import FitResult, LoopState, Stream
from .stacked import StackedNet

__all__ = [
    "FORMAT",
    "UNIT_NORM_TOL",
    "CheckpointError",
    "GroupCheckpoint",
    "RunCheckpoint",
    "check_config",
    "check_unit_norm",
    "describe",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
]

#: The marker and version stored in every checkpoint; :func:`read_checkpoint` refuses a
#: file without the marker, or with another version.
FORMAT = ("manifold-nets-checkpoint", 2)

class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model, optimiser or
    configuration it is loaded into (the message names the mismatch).

    A subclass of :class:`ValueError`, so that callers that catch bad input in general
    catch it too.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> from manifold_nets.experiments.checkpoint import CheckpointError, read_checkpoint
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "notes.txt"
    >>> _ = path.write_text("not a checkpoint")
    >>> try:
    ...     read_checkpoint(path)
    ... except CheckpointError as err:
    ...     print(isinstance(err, ValueError), "truncated or not a manifold-nets" in str(err))
    True True
    """


def describe(model: torch.nn.Module) -> dict[str, dict]:
    """The architecture as a checkpoint records it: per ``state_dict`` entry, its shape and
    dtype, and for parameters their manifold (``"Euclidean"`` for plain ones).

    Parameters
    ----------
    model : torch.nn.Module
        The model, declared (:func:`manifold_nets.declare`) or not.

    Returns
    -------
    dict
        ``{state_dict key: {"shape": [...], "dtype": "float32", "manifold": ...}}``; buffers
        (e.g. batch-norm running statistics) have no ``"manifold"`` entry. A parameter's
        manifold is the ``repr`` of its manifold, so two checkpoints of the same
        architecture under different updates differ here.

    Examples
    --------
    >>> from manifold_nets import Arch1, declare
    >>> from manifold_nets.experiments.checkpoint import describe
    >>> net = Arch1(depth=1, width=4, in_features=6, num_classes=3)
    >>> describe(net)["classifier.weight"]
    {'shape': [3, 2], 'dtype': 'float32', 'manifold': 'Euclidean'}
    >>> _ = declare(net, "un")
    >>> describe(net)["layers.0.linear.weight"]["manifold"]
    'Oblique(ndim=1) manifold'
    """
    manifolds = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        manifold = getattr(p, "manifold", None)
        manifolds[name] = "Euclidean" if manifold is None or type(manifold) is \
            geoopt.Euclidean else repr(manifold)
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        entry = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        if name in manifolds:
            entry["manifold"] = manifolds[name]
        out[name] = entry
    return out


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor (no geoopt subclass) holding ``t``'s values."""
    t = t.detach()
    return t.as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t


def _config_dict(config) -> dict | None:
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config)


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    schedule_state: Mapping | None = None,
    generator: torch.Generator | None = None,
    history: list | None = None,
    config=None,
    extra: Mapping | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file, fsync, :func:`os.replace`).

    Parameters
    ----------
    path : path
        The checkpoint file; its folder must exist.
    model : nn.Module
        Its ``state_dict`` and architecture (:func:`describe`) are saved.
    optimizer : torch.optim.Optimizer, optional
        Its ``state_dict`` (geoopt's and :class:`~manifold_nets.InvariantSGD`'s included).
    schedule_state : mapping, optional
        Plain values (floats, ints, ``None``) that the schedule needs to go on.
    generator : torch.Generator, optional
        The batch-order generator; torch's global CPU RNG state is always saved too.
    history : list, optional
        Per-epoch records so far.
    config : TrainConfig or mapping, optional
        The resolved configuration; :func:`load_checkpoint` compares it.
    extra : mapping, optional
        Anything else to get back (plain values).

    Returns
    -------
    pathlib.Path
        The checkpoint file.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> from manifold_nets import Arch2, InvariantSGD, declare
    >>> from manifold_nets.experiments.checkpoint import read_checkpoint, save_checkpoint
    >>> net = Arch2(depth=1, width=4, in_features=6, num_classes=3)
    >>> _ = declare(net, "un")
    >>> opt = InvariantSGD(net.parameters(), lr=0.1)
    >>> path = save_checkpoint(pathlib.Path(tempfile.mkdtemp()) / "run.pt", model=net,
    ...                        optimizer=opt, history=[{"epoch": 1, "cost": 2.3}],
    ...                        config={"update": "un", "lr": 0.1}, extra={"lr": 0.1})
    >>> path.name, sorted(read_checkpoint(path)["extra"].items())
    ('run.pt', [('lr', 0.1)])
    """
    path = Path(path)
    payload = {
        "format": FORMAT,
        "architecture": describe(model),
        "model": {k: _plain(v) for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "schedule_state": dict(schedule_state or {}),
        "generator": generator.get_state() if generator is not None else None,
        "torch_rng": torch.get_rng_state(),
        "history": list(history or []),
        "config": _config_dict(config),
        "extra": dict(extra or {}),
    }
    return atomic_write(path, lambda fh: torch.save(payload, fh))


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint without applying it (only its format is checked).

    The file is read with ``torch.load(..., weights_only=True)``, so a checkpoint cannot
    run code when it is read.

    Parameters
    ----------
    path : path
        A file written by :func:`save_checkpoint`.
    map_location : str, torch.device or callable, optional
        Where the tensors go, as for :func:`torch.load` (default ``"cpu"``).

    Returns
    -------
    dict
        The whole payload: ``format``, ``architecture`` (:func:`describe`), ``model``,
        ``optimizer``, ``schedule_state``, ``generator``, ``torch_rng``, ``history``,
        ``config`` and ``extra``.

    Raises
    ------
    CheckpointError
        If the file does not exist, cannot be read, is not a manifold-nets checkpoint, or
        has another format version than :data:`FORMAT`.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> from manifold_nets import Arch1
    >>> from manifold_nets.experiments.checkpoint import read_checkpoint, save_checkpoint
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.pt"
    >>> _ = save_checkpoint(path, model=Arch1(depth=1, width=4, in_features=6,
    ...                                       num_classes=3), history=[{"epoch": 1}])
    >>> payload = read_checkpoint(path)
    >>> payload["format"], payload["history"], payload["optimizer"] is None
    (('manifold-nets-checkpoint', 2), [{'epoch': 1}], True)
    >>> read_checkpoint(path.with_name("missing.pt"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    manifold_nets.experiments.checkpoint.CheckpointError: checkpoint ...missing.pt does not exist
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as err:  # torch.load raises many kinds on a torn or foreign file
        raise CheckpointError(
            f"checkpoint {path} could not be read ({type(err).__name__}: "
            f"{str(err).split('. ')[0][:160]}); it is truncated or not a "
            "manifold-nets checkpoint. Fix: delete it to start the run over."
        ) from err
    found = tuple(payload.get("format", ())) if isinstance(payload, dict) else ()
    if len(found) == 2 and found[0] == FORMAT[0] and found != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format version {found[1]}; this version of manifold-nets "
            f"reads version {FORMAT[1]} (the engines' shared loop changed the optimiser "
            "state). Fix: delete it to start the run over, or resume it with the version "
            "that wrote it.")
    if not isinstance(payload, dict) or found != FORMAT:
        raise CheckpointError(
            f"{path} is not a manifold-nets checkpoint (no {FORMAT[0]!r} marker, version "
            f"{FORMAT[1]}); write one with save_checkpoint()."
        )
    return payload


def check_config(payload: dict, config, path: str | os.PathLike = "checkpoint") -> None:
    """Raise :class:`CheckpointError` unless the checkpoint was made with ``config``.

    Parameters
    ----------
    payload : dict
        A checkpoint as :func:`read_checkpoint` returns it.
    config : TrainConfig, mapping or None
        The configuration the checkpoint must have been made with; ``None`` checks
        nothing.
    path : path, optional
        The checkpoint's name in the message.

    Raises
    ------
    CheckpointError
        If a field differs; the message names each differing field with both values
        (:func:`manifold_nets.experiments.config.config_diff`).

    Examples
    --------
    >>> from manifold_nets.experiments.checkpoint import check_config
    >>> payload = {"config": {"update": "un", "lr": 0.1}}
    >>> check_config(payload, {"update": "un", "lr": 0.1})
    >>> check_config(payload, None)
    >>> check_config(payload, {"update": "un", "lr": 0.01})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    manifold_nets.experiments.checkpoint.CheckpointError: ... (lr: checkpoint 0.1, now 0.01)...
    """
    expected = _config_dict(config)
    if expected is None:
        return
    diffs = config_diff(payload.get("config"), expected, ("checkpoint", "now"))
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was made with another configuration ({'; '.join(diffs)}). "
            "Fix: resume with the same configuration, or use another checkpoint path."
        )


def _check_architecture(payload: dict, model: torch.nn.Module, path) -> None:
    stored, now = payload.get("architecture") or {}, describe(model)
    missing = [k for k in now if k not in stored]
    unexpected = [k for k in stored if k not in now]
    problems = []
    if missing:
        problems.append(f"missing entries {missing}")
    if unexpected:
        problems.append(f"unexpected entries {unexpected}")
    for name in now:
        if name not in stored:
            continue
        for key in ("shape", "dtype", "manifold"):
            if stored[name].get(key) != now[name].get(key):
                problems.append(f"`{name}` has {key} {stored[name].get(key)} in the "
                                f"checkpoint, {now[name].get(key)} in the model")
    if problems:
        raise CheckpointError(
            f"checkpoint {path} is from another architecture: {'; '.join(problems)}. "
            "Fix: build the model with the checkpoint's configuration (arch, depth, width, "
            "update), or use another checkpoint path."
        )
    state = payload.get("model") or {}
    for name, t in state.items():
        if name in now and list(t.shape) != now[name]["shape"]:
            raise CheckpointError(f"checkpoint {path}: `{name}` holds a tensor of shape "
                                  f"{tuple(t.shape)}, but its description says "
                                  f"{tuple(now[name]['shape'])}; the file was edited.")


def _tensors(obj, prefix: str):
    """Every tensor in a nested dict/list, with a readable path."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")


def _check_finite(payload: dict, model: torch.nn.Module, path) -> None:
    # Parameters and optimiser state only: batch-norm running statistics can overflow in a
    # run that goes on training (train mode normalises with the batch statistics), and
    # refusing them would break exact resumption of such a run.
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    weights = {k: v for k, v in (payload.get("model") or {}).items() if k in params}
    for where, obj in (("model", weights), ("optimizer", payload.get("optimizer"))):
        for name, t in _tensors(obj, where):
            if t.is_floating_point() or t.is_complex():
                bad = ~torch.isfinite(t)
                if bool(bad.any()):
                    raise CheckpointError(
                        f"checkpoint {path}: {name} has {int(bad.sum())} non-finite values "
                        f"(of {t.numel()}); refusing to resume a diverged run. Fix: delete "
                        "the checkpoint to start over, or resume from an earlier one."
                    )


def check_unit_norm(w: torch.Tensor, ndim: int, name: str, path) -> None:
    """Raise :class:`CheckpointError` unless every filter of ``w`` (the trailing ``ndim``
    dims) has norm 1 within :data:`~manifold_nets.manifolds.UNIT_NORM_TOL` of its dtype
    (:func:`manifold_nets.manifolds.check_unit_norm`); the message names the first filter
    that is off.

    Parameters
    ----------
    w : torch.Tensor
        The stored weight of a parameter on an :class:`~manifold_nets.ObliqueManifold`.
    ndim : int
        The number of trailing dims that make one filter (the manifold's ``ndim``).
    name : str
        The parameter's name in the message.
    path : path
        The checkpoint's name in the message.

    Raises
    ------
    CheckpointError
        If a filter's norm is further than the tolerance from 1.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.experiments.checkpoint import check_unit_norm
    >>> check_unit_norm(torch.eye(3), 1, "layers.0.linear.weight", "run.pt")
    >>> check_unit_norm(2 * torch.eye(3), 1, "w", "run.pt")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    manifold_nets.experiments.checkpoint.CheckpointError: checkpoint run.pt: filter 0 of `w` ...
    """
    try:
        check_unit_norm_of(w, ndim, name)
    except ValueError as err:
        raise CheckpointError(
            f"checkpoint {path}: {err} This is not the state of a UN run of this model. "
            "Fix: use the checkpoint of a UN run, or declare the model with the update the "
            "checkpoint was made with.") from None


def _check_on_manifold(payload: dict, model: torch.nn.Module, path) -> None:
    state = payload["model"]
    for name, p in model.named_parameters():
        manifold = getattr(p, "manifold", None)
        if isinstance(manifold, ObliqueManifold) and name in state:
            check_unit_norm(state[name], manifold.ndim, name, path)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
    config=None,
    restore_rng: bool = True,
    map_location="cpu",
) -> dict:
    """Check a checkpoint against ``model`` (and ``config``), then load it in place.

    Nothing is modified unless every check passes (see the module docstring).

    Parameters
    ----------
    path : path
        A file written by :func:`save_checkpoint`.
    model : nn.Module
        Receives the weights; it must have the checkpoint's architecture and manifolds.
    optimizer : torch.optim.Optimizer, optional
        Receives the optimiser state (create it over ``model.parameters()`` first).
    generator : torch.Generator, optional
        Receives the saved batch-order generator state.
    config : TrainConfig or mapping, optional
        The configuration the checkpoint must have been made with.
    restore_rng : bool
        Also restore torch's global CPU RNG state (default).
    map_location : str, torch.device or callable, optional
        Where the tensors go, as for :func:`torch.load` (default ``"cpu"``).

    Returns
    -------
    dict
        ``history``, ``schedule_state``, ``config``, ``extra`` and ``epoch`` (the number
        of epochs in the history).

    Raises
    ------
    CheckpointError
        On an unreadable file or any mismatch; the message names it and how to fix it.

    Examples
    --------
    A round trip: the weights, the optimiser and the history come back, and a UN
    checkpoint is refused by an SM model (its filters have another manifold).

    >>> import pathlib, tempfile
    >>> from manifold_nets import Arch2, InvariantSGD, declare
    >>> from manifold_nets.experiments.checkpoint import load_checkpoint, save_checkpoint
    >>> def model(update, seed):
    ...     net = Arch2(depth=1, width=4, in_features=6, num_classes=3,
    ...                 generator=torch.Generator().manual_seed(seed))
    ...     _ = declare(net, update)
    ...     return net
    >>> net = model("un", 0)
    >>> path = save_checkpoint(pathlib.Path(tempfile.mkdtemp()) / "run.pt", model=net,
    ...                        optimizer=InvariantSGD(net.parameters(), lr=0.1),
    ...                        history=[{"epoch": 1}], config={"update": "un"})
    >>> other = model("un", 1)
    >>> state = load_checkpoint(path, model=other,
    ...                         optimizer=InvariantSGD(other.parameters(), lr=0.1),
    ...                         config={"update": "un"})
    >>> state["epoch"], torch.equal(other.theta, net.theta)
    (1, True)
    >>> load_checkpoint(path, model=model("sm", 0))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    manifold_nets.experiments.checkpoint.CheckpointError: ... from another architecture: ...
    """
    payload = read_checkpoint(path, map_location=map_location)
    check_config(payload, config, path)
    _check_architecture(payload, model, path)
    _check_finite(payload, model, path)
    _check_on_manifold(payload, model, path)
    if optimizer is not None and payload.get("optimizer") is None:
        raise CheckpointError(f"checkpoint {path} holds no optimiser state")
    if generator is not None and payload.get("generator") is None:
        raise CheckpointError(f"checkpoint {path} holds no generator state")
    if optimizer is not None:
        saved = [len(g["params"]) for g in payload["optimizer"].get("param_groups", [])]
        now = [len(g["params"]) for g in optimizer.param_groups]
        if saved != now:
            raise CheckpointError(
                f"checkpoint {path}: the optimiser state has parameter groups of sizes {saved}, "
                f"this optimiser {now}; create the optimiser over model.parameters() as the "
                "run that saved it did."
            )
    with torch.no_grad():
        model.load_state_dict(payload["model"], strict=True)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(payload["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint {path}: the optimiser state does not fit this "
                                  f"optimiser ({err})") from err
    if generator is not None:
        generator.set_state(payload["generator"])
    if restore_rng:
        torch.set_rng_state(payload["torch_rng"])
    history = payload.get("history") or []
    return {
        "history": history,
        "schedule_state": payload.get("schedule_state") or {},
        "config": payload.get("config"),
        "extra": payload.get("extra") or {},
        "epoch": len(history),
    }


class RunCheckpoint:
    """The checkpoint policy of one run (:func:`~manifold_nets.experiments.engines.fit`
    for Table 2, :func:`~manifold_nets.experiments.camvid.training.train` for CamVid):
    after every epoch that did not diverge, the model, the optimiser, the schedule's state
    (the next rate, the reference cost, the base rate), the history, the permutations'
    generator, torch's RNG and the caller's ``extra``, written atomically to one file
    (:func:`save_checkpoint`). A diverged epoch is not saved: a resumed run trains it
    again from the epoch before, to the same result.

    Reading refuses a file that does not fit the model, the configuration or the base
    rate (:class:`CheckpointError`; CamVid's checkpoints of before this policy carry no
    base rate, their configuration does).

    Parameters
    ----------
    path : path or None
        The file; ``None``: no checkpoint (every method is then a no-op).
    model : torch.nn.Module
        The run's model.
    optimizer : torch.optim.Optimizer
        Its optimiser.
    generator : torch.Generator
        The source of the run's permutations.
    lr : float
        The run's base rate.
    config : mapping, optional
        The configuration the file must match.
    extra : dict, optional
        Saved as the checkpoint's ``extra`` (with what :meth:`save` adds); after
        :meth:`resume`, the saved one is ``saved_extra``.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.experiments.checkpoint import RunCheckpoint
    >>> net = torch.nn.Linear(3, 2)
    >>> ck = RunCheckpoint(None, model=net, optimizer=torch.optim.SGD(net.parameters()),
    ...                    generator=torch.Generator(), lr=0.1)
    >>> ck.resume() is None
    True
    """

    def __init__(self, path: str | os.PathLike | None, *, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, generator: torch.Generator, lr: float,
                 config=None, extra: dict | None = None):
        self.path = None if path is None else Path(path)
        self.model, self.optimizer, self.generator = model, optimizer, generator
        self.lr, self.config, self.extra = lr, config, extra or {}
        #: The ``extra`` of the file :meth:`resume` read (``{}`` before, or without one).
        self.saved_extra: dict = {}

    def resume(self, stopping=None) -> LoopState | None:
        """Put the model, the optimiser, the generator and torch's RNG back to the saved
        epoch, if the file exists.

        Parameters
        ----------
        stopping : StoppingRule, optional
            The run's stopping rule: a run that had already stopped by it (killed before
            its caller was done with it) comes back stopped, with no run active and its
            ``stop_reason`` set, so the loop trains no further epoch.

        Returns
        -------
        LoopState or None
            The loop's state to pass to ``fit_runs(start=...)``; ``None`` without a file.

        Raises
        ------
        CheckpointError
            If the file does not fit (see the class).

        Examples
        --------
        ``tests/test_checkpoint.py`` checks that a resumed run is bit-identical to one
        that was never stopped.

        >>> from manifold_nets.experiments.checkpoint import RunCheckpoint
        >>> callable(RunCheckpoint.resume)
        True
        """
        if self.path is None or not self.path.exists():
            return None
        state = load_checkpoint(self.path, model=self.model, optimizer=self.optimizer,
                                generator=self.generator, config=self.config)
        self.saved_extra = state["extra"]
        if "loop" in self.saved_extra:  # CamVid's form before its runs took this policy
            return LoopState.from_dict(self.saved_extra["loop"])
        sched = state["schedule_state"]
        if not sched:
            raise CheckpointError(f"checkpoint {self.path} holds no schedule state, so it "
                                  "was not written for one run. Fix: delete it to start the "
                                  "run over.")
        if sched.get("base_lr") != self.lr:
            raise CheckpointError(f"checkpoint {self.path} was made with base rate "
                                  f"{sched.get('base_lr')!r}, now {self.lr!r}")
        result = FitResult(history=list(state["history"]))
        if stopping is not None and result.history:
            result.stop_reason = stopping.reason(
                [h["train_error"] for h in result.history],
                [h["val_error"] for h in result.history if "val_error" in h]) or ""
        return LoopState(len(result.history), [] if result.stop_reason else [0],
                         [sched["lr"]], [sched["reference"]], [result])

    def save(self, state: LoopState, **extra) -> None:
        """Write the run after an epoch (or before the first).

        Parameters
        ----------
        state : LoopState
            The loop's state of the one run.
        **extra
            Saved in the checkpoint's ``extra`` beside the constructor's.

        Examples
        --------
        >>> import os
        >>> import tempfile
        >>> import torch
        >>> from manifold_nets.experiments.checkpoint import RunCheckpoint
        >>> from manifold_nets.experiments.loop import FitResult, LoopState
        >>> net = torch.nn.Linear(3, 2)
        >>> path = os.path.join(tempfile.mkdtemp(), "run.pt")
        >>> ck = RunCheckpoint(path, model=net, optimizer=torch.optim.SGD(net.parameters()),
        ...                    generator=torch.Generator(), lr=0.1)
        >>> ck.save(LoopState(0, [0], [0.1], [None], [FitResult()]))
        >>> ck.resume().lr
        [0.1]
        """
        if self.path is None:
            return
        save_checkpoint(self.path, model=self.model, optimizer=self.optimizer,
                        generator=self.generator,
                        schedule_state={"lr": state.lr[0], "reference": state.reference[0],
                                        "base_lr": self.lr},
                        history=state.results[0].history, config=self.config,
                        extra={**self.extra, **extra})


class GroupCheckpoint:
    """The checkpoint policy of a group of runs on the stacked engine
    (:func:`~manifold_nets.experiments.engines.train_group`): after every epoch, the phase
    (``"select"`` or ``"train"``), the loop's state, the stacked tensors of the runs in
    flight, the streams' generators and torch's RNG, written atomically to one file.

    Reading refuses a file of another group of runs, and a UN run whose filters are off
    the unit sphere (:class:`CheckpointError`).

    Parameters
    ----------
    path : path or None
        The file; ``None``: no checkpoint (every method is then a no-op).
    configs : sequence of TrainConfig
        The group's runs, in the order the group trains them.

    Examples
    --------
    >>> from manifold_nets.experiments.checkpoint import GroupCheckpoint
    >>> from manifold_nets.experiments.config import TrainConfig
    >>> ck = GroupCheckpoint(None, [TrainConfig()])
    >>> ck.phase("select") is None, ck.saver("select", []) is None
    (True, True)
    """

    def __init__(self, path: str | os.PathLike | None, configs: Sequence[TrainConfig]):
        self.path = None if path is None else Path(path)
        self.configs = [c.to_dict() for c in configs]
        self.payload: dict | None = None
        if self.path is not None and self.path.exists():
            self.payload = self._read()
        self._started = time.perf_counter()
        self._prior = (self.payload or {}).get("elapsed", 0.0)

    def elapsed(self) -> float:
        """Seconds spent on the group, in this process and in those that saved before.

        Returns
        -------
        float
            The seconds.

        Examples
        --------
        >>> from manifold_nets.experiments.checkpoint import GroupCheckpoint
        >>> from manifold_nets.experiments.config import TrainConfig
        >>> GroupCheckpoint(None, [TrainConfig()]).elapsed() >= 0
        True
        """
        return self._prior + time.perf_counter() - self._started

    def _read(self) -> dict:
        payload = read_checkpoint(self.path)
        stored = payload.get("configs")
        if stored != self.configs:
            diffs = [d for a, b in zip(stored or [], self.configs, strict=False)
                     for d in config_diff(a, b, ("checkpoint", "now"))]
            raise CheckpointError(
                f"checkpoint {self.path} holds another group of runs "
                f"({'; '.join(diffs) or 'other runs'}). Fix: delete it to start the "
                "group over.")
        net = payload.get("net")
        if net is not None:
            stack = StackedNet.from_state_dict(net)
            for r, update in enumerate(stack.updates):
                if update == "un":
                    for i, W in enumerate(stack.W):
                        check_unit_norm(W[r].detach(), 1, f"W[{i}] of stacked run {r}",
                                        self.path)
        return payload

    def phase(self, name: str) -> dict | None:
        """The saved state of phase ``name``, if the file holds that phase.

        Parameters
        ----------
        name : {"select", "train"}
            The phase.

        Returns
        -------
        dict or None
            The payload, or ``None``.

        Examples
        --------
        >>> from manifold_nets.experiments.checkpoint import GroupCheckpoint
        >>> from manifold_nets.experiments.config import TrainConfig
        >>> GroupCheckpoint(None, [TrainConfig()]).phase("train") is None
        True
        """
        if self.payload is None or self.payload["phase"] != name:
            return None
        return self.payload

    def resume(self, state: dict, streams: Sequence[Stream]
               ) -> tuple[StackedNet, LoopState]:
        """Put the streams' generators and torch's RNG back to the saved moment.

        Parameters
        ----------
        state : dict
            What :meth:`phase` returned.
        streams : sequence of Stream
            The phase's data streams, in the saved order.

        Returns
        -------
        (StackedNet, LoopState)
            The runs in flight and the loop's state, to pass to ``fit_runs(start=...)``.

        Examples
        --------
        :func:`~manifold_nets.experiments.engines.train_group` resumes a killed group
        this way; ``tests/test_stacked.py`` checks that the records are bit-identical.

        >>> from manifold_nets.experiments.checkpoint import GroupCheckpoint
        >>> callable(GroupCheckpoint.resume)
        True
        """
        for s, g in zip(streams, state["generators"], strict=True):
            s.generator.set_state(g)
        torch.set_rng_state(state["torch_rng"])
        return (StackedNet.from_state_dict(state["net"]),
                LoopState.from_dict(state["loop"]))

    def saver(self, phase: str, streams: Sequence[Stream], **extra):
        """The ``on_epoch`` callback of ``fit_runs`` that saves the group after each epoch.

        Parameters
        ----------
        phase : {"select", "train"}
            The phase being trained.
        streams : sequence of Stream
            Its data streams (their generators are saved).
        **extra
            Saved beside the state (e.g. the selected rates).

        Returns
        -------
        callable or None
            ``save(net, state)``; ``None`` without a path.

        Examples
        --------
        >>> from manifold_nets.experiments.checkpoint import GroupCheckpoint
        >>> from manifold_nets.experiments.config import TrainConfig
        >>> GroupCheckpoint(None, [TrainConfig()]).saver("train", []) is None
        True
        """
        if self.path is None:
            return None

        def save(net: StackedNet, state: LoopState) -> None:
            payload = {"format": FORMAT, "phase": phase, "configs": self.configs,
                       "loop": state.to_dict(), "net": net.state_dict(),
                       "generators": [s.generator.get_state() for s in streams],
                       "torch_rng": torch.get_rng_state(), "elapsed": self.elapsed(),
                       **extra}
            atomic_write(self.path, lambda fh: torch.save(payload, fh))

        return save
