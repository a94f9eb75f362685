r"""A fused symmetry-invariant SGD: the UN and SM updates without geoopt's per-parameter loop.

:class:`InvariantSGD` performs the same step as :class:`geoopt.optim.RiemannianSGD` with the
manifolds of :mod:`manifold_nets.manifolds` (with ``momentum=0`` the same iterates up to
rounding: geoopt rounds :math:`x - \lambda r` in two steps, this step in one), but
groups the parameters by manifold, filter dims, device and dtype and updates every group
with a handful of ``torch._foreach_*`` kernels. Parameters without a manifold (batch-norm
scale and shift, the classifier :math:`\theta` under UN) get plain SGD, exactly as
:class:`torch.optim.SGD` does.

The module follows :mod:`torch.optim.sgd`: the class validates its arguments and gathers
tensors; :func:`invariant_sgd` is the functional core, implemented twice
(``_single_tensor_invariant_sgd`` and ``_multi_tensor_invariant_sgd``), and a float64 test
proves the two equal. Two more paths share the single-tensor arithmetic: the fused C++
kernel (:mod:`manifold_nets.fused`) and the step on sharded parameters
(:mod:`manifold_nets.distributed`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any, NamedTuple

import geoopt
import torch
from torch import Tensor

from .manifolds import DiagScaledEuclidean, ObliqueManifold
from .math import (
    EPS,
    column_dims,
    column_sqnorm,
    filter_dims,
    filter_sqnorm,
    oblique_proju,
    oblique_projx_,
    scaled_egrad2rgrad,
)
from .table1 import KERNEL_KINDS

__all__ = ["InvariantSGD", "Kind", "ManifoldOptimizer", "invariant_sgd", "kind_of", "kind_tag",
           "manifold_kind", "check_lr", "check_switches", "check_fused", "grad_problem",
           "param_name", "foreach_filter_inner", "foreach_normalise_", "shard_reducer"]


class Kind(NamedTuple):
    """How one parameter is updated: ``name`` in ``{"euclidean", "oblique", "sm"}``, the
    dims that one norm (a filter, or a column of :math:`\\theta`) reduces over, and the
    manifold's ``ndim`` and ``side`` (SM).

    :func:`kind_of` reads it from a parameter's manifold; :class:`InvariantSGD` records it
    once per parameter, and :func:`invariant_sgd` groups parameters by it.

    Parameters
    ----------
    name : {"euclidean", "oblique", "sm"}
        the update: plain SGD, UN (:class:`~manifold_nets.ObliqueManifold`) or SM
        (:class:`~manifold_nets.DiagScaledEuclidean`)
    dims : tuple of int
        the dims one norm reduces over: :func:`~manifold_nets.math.filter_dims` for UN and
        the left SM metric, :func:`~manifold_nets.math.column_dims` for the right one;
        ``()`` for Euclidean parameters
    ndim : int
        the manifold's ``ndim`` (trailing dims owned by one point)
    side : {"left", "right"}
        the SM metric's side (``"left"`` for the other kinds)

    Examples
    --------
    >>> from manifold_nets.optim import Kind
    >>> Kind("oblique", (-3, -2, -1), ndim=3)  # the filters of a Conv2d weight under UN
    Kind(name='oblique', dims=(-3, -2, -1), ndim=3, side='left')
    """

    #: The update: ``"euclidean"``, ``"oblique"`` (UN) or ``"sm"``.
    name: str
    #: The dims that one norm (of a filter, or of a column of :math:`\theta`) reduces over.
    dims: tuple[int, ...] = ()
    #: The manifold's ``ndim``: trailing dims owned by one point.
    ndim: int = 1
    #: The SM metric's side, ``"left"`` (filters) or ``"right"`` (columns of
    #: :math:`\theta`); ``"left"`` for the other kinds.
    side: str = "left"


EUCLIDEAN = Kind("euclidean")


def kind_of(param: Tensor) -> Kind:
    """The :class:`Kind` of a parameter, read from its geoopt manifold.

    Plain tensors and :class:`geoopt.Euclidean` parameters are Euclidean. Any other manifold
    raises :class:`ValueError`: use :class:`geoopt.optim.RiemannianSGD` for it.

    Parameters
    ----------
    param : torch.Tensor
        a parameter: a plain tensor, a :class:`geoopt.ManifoldParameter`, or any tensor
        with a ``manifold`` attribute (e.g. a sharded parameter, see
        :mod:`manifold_nets.distributed`)

    Returns
    -------
    Kind
        how :class:`InvariantSGD` updates it

    Raises
    ------
    ValueError
        for a manifold other than :class:`~manifold_nets.ObliqueManifold`,
        :class:`~manifold_nets.DiagScaledEuclidean` and :class:`geoopt.Euclidean`, and for
        a sharded parameter (``DTensor``) that carries no manifold

    Examples
    --------
    >>> import geoopt, torch
    >>> from manifold_nets import ObliqueManifold
    >>> from manifold_nets.optim import kind_of
    >>> w = geoopt.ManifoldParameter(torch.eye(3), manifold=ObliqueManifold())
    >>> kind_of(w)
    Kind(name='oblique', dims=(-1,), ndim=1, side='left')
    >>> kind_of(torch.zeros(3)).name
    'euclidean'
    """
    if is_dtensor(param) and not hasattr(param, "manifold"):
        raise ValueError(
            f"InvariantSGD got a sharded parameter (DTensor) of shape {tuple(param.shape)} "
            "that carries no manifold: torch's fully_shard replaces the parameters that "
            "manifold_nets.declare put on a manifold, and stepping them as Euclidean would "
            "silently turn UN or SM into plain SGD. Fix: shard with "
            "manifold_nets.distributed.fully_shard, or call "
            "manifold_nets.distributed.reattach_manifolds(model) before building the "
            "optimiser."
        )
    manifold = getattr(param, "manifold", None)
    try:
        return manifold_kind(manifold)
    except ValueError:
        raise ValueError(f"InvariantSGD cannot update a parameter of shape "
                         f"{tuple(param.shape)} on {manifold!r}: {_SUPPORTED}") from None


def manifold_kind(manifold) -> Kind:
    """The :class:`Kind` of a manifold (``None`` or :class:`geoopt.Euclidean`: Euclidean).

    Parameters
    ----------
    manifold : geoopt.Manifold or None
        An :class:`~manifold_nets.ObliqueManifold`, a
        :class:`~manifold_nets.DiagScaledEuclidean`, Euclidean, or ``None``.

    Returns
    -------
    Kind
        How :class:`InvariantSGD` updates a parameter on it.

    Raises
    ------
    ValueError
        For any other manifold.

    Examples
    --------
    >>> from manifold_nets import DiagScaledEuclidean
    >>> from manifold_nets.optim import manifold_kind
    >>> manifold_kind(DiagScaledEuclidean("right", ndim=2))
    Kind(name='sm', dims=(-2,), ndim=2, side='right')
    """
    if manifold is None or type(manifold) is geoopt.Euclidean:
        return EUCLIDEAN
    if isinstance(manifold, ObliqueManifold):
        return Kind("oblique", filter_dims(manifold.ndim), manifold.ndim)
    if isinstance(manifold, DiagScaledEuclidean):
        dims = filter_dims(manifold.ndim) if manifold.side == "left" else column_dims(
            manifold.ndim)
        return Kind("sm", dims, manifold.ndim, manifold.side)
    raise ValueError(f"InvariantSGD cannot update {manifold!r}: {_SUPPORTED}")


_SUPPORTED = ("it supports ObliqueManifold, DiagScaledEuclidean and Euclidean (plain) "
              "parameters. Use geoopt.optim.RiemannianSGD for other manifolds.")


def check_lr(lr, values: bool = True) -> None:
    """Raise unless ``lr`` is a learning rate :class:`InvariantSGD` and
    :class:`~manifold_nets.adam.InvariantAdam` take.

    A learning rate is a finite non-negative float, a 0-dim Tensor, or a 1-D Tensor of
    one rate per run.

    Parameters
    ----------
    lr : float or torch.Tensor
        the rate
    values : bool
        ``False``: check a Tensor's type and shape only (reading its values would wait
        for the device)

    Raises
    ------
    TypeError
        neither a real number nor a Tensor
    ValueError
        negative, NaN or infinite, or a Tensor of the wrong shape or dtype

    Examples
    --------
    >>> from manifold_nets.optim import check_lr
    >>> check_lr(0.1)
    >>> check_lr(float("nan"))
    Traceback (most recent call last):
    ...
    ValueError: Invalid learning rate: nan
    """
    if isinstance(lr, Tensor):
        if lr.dim() > 1 or not lr.is_floating_point():
            raise ValueError(
                f"Invalid learning rate: a Tensor of shape {tuple(lr.shape)} and dtype "
                f"{lr.dtype}; pass a float, a 0-dim floating Tensor, or a 1-D one with one "
                "rate per run (the leading dim of every parameter).")
        if values and not bool(((lr >= 0) & torch.isfinite(lr)).all()):
            raise ValueError(f"Invalid learning rate: {lr}")
    elif isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"Invalid learning rate: {lr!r}; pass a float or a Tensor.")
    elif not (lr >= 0.0 and math.isfinite(lr)):  # also rejects NaN
        raise ValueError(f"Invalid learning rate: {lr}")


def _check_hyper(lr, momentum, dampening, weight_decay, nesterov, where: str = "",
                 values: bool = True) -> None:
    """The rules of :class:`InvariantSGD`'s arguments, for the constructor and for every
    group at every step (a scheduler or a hand-edited group may have changed them)."""
    try:
        check_lr(lr, values)
        for name, value in (("momentum value", momentum), ("dampening value", dampening),
                            ("weight_decay value", weight_decay)):
            if isinstance(value, Tensor):
                raise TypeError(f"Invalid {name}: a Tensor ({value!r}); pass a Python float.")
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"Invalid {name}: {value!r}; pass a Python float.")
            if not (value >= 0.0 and math.isfinite(value)):  # also rejects NaN
                raise ValueError(f"Invalid {name}: {value}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(
                f"Nesterov momentum requires a momentum and zero dampening "
                f"(got momentum={momentum}, dampening={dampening})"
            )
    except (TypeError, ValueError) as err:
        raise type(err)(f"{err}{where}") from None


def param_name(group: dict[str, Any], index: int, j: int, p: Tensor) -> str:
    """How an error names parameter ``j`` of group ``index``: by the name the optimiser
    was given (``model.named_parameters()``), else by its place and shape.

    Parameters
    ----------
    group : dict
        the parameter group (its ``"param_names"``, where the optimiser was given names)
    index, j : int
        the group's index and the parameter's index in it
    p : torch.Tensor
        the parameter

    Returns
    -------
    str
        the name in backticks, or the place and shape

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.optim import param_name
    >>> p = torch.zeros(2, 3)
    >>> param_name({"params": [p], "param_names": ["fc.weight"]}, 0, 0, p)
    '`fc.weight`'
    >>> param_name({"params": [p]}, 1, 0, p)
    'parameter 0 of group 1 (shape (2, 3))'
    """
    names = group.get("param_names")
    if names is not None and j < len(names):
        return f"`{names[j]}`"
    return f"parameter {j} of group {index} (shape {tuple(p.shape)})"


def kind_tag(kind: Kind) -> str:
    """A short, stable text for a :class:`Kind`, as checkpoints record it.

    Parameters
    ----------
    kind : Kind
        how a parameter is updated

    Returns
    -------
    str
        ``"euclidean"``, ``"oblique(ndim=N)"`` or ``"sm(SIDE, ndim=N)"``

    Examples
    --------
    >>> from manifold_nets.optim import Kind, kind_tag
    >>> kind_tag(Kind("oblique", (-3, -2, -1), ndim=3)), kind_tag(Kind("euclidean"))
    ('oblique(ndim=3)', 'euclidean')
    """
    if kind.name == "euclidean":
        return "euclidean"
    if kind.name == "oblique":
        return f"oblique(ndim={kind.ndim})"
    return f"sm({kind.side}, ndim={kind.ndim})"


#: The key of each parameter's update in :meth:`ManifoldOptimizer.state_dict`'s state.
_MANIFOLD = "manifold"


class ManifoldOptimizer(torch.optim.Optimizer):
    """The base of :class:`InvariantSGD` and :class:`~manifold_nets.InvariantAdam`: an
    optimiser that knows each parameter's :class:`Kind`.

    It records the kinds when parameters are added (so that a compiled step never tests
    a traced tensor's type), reads them again when a manifold changed (``declare`` after
    the optimiser was built), and writes each parameter's update into its state, which
    :meth:`load_state_dict` checks. Subclasses implement ``step``.

    Parameters
    ----------
    params : iterable
        parameters or parameter groups, as for :class:`torch.optim.Optimizer`
    defaults : dict
        the default options of a group

    Examples
    --------
    >>> import torch
    >>> from manifold_nets import InvariantSGD
    >>> from manifold_nets.optim import ManifoldOptimizer
    >>> isinstance(InvariantSGD([torch.nn.Parameter(torch.zeros(2))]), ManifoldOptimizer)
    True
    """

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, as ``torch.optim.Optimizer.add_param_group``, and
        record the :class:`Kind` of each of its parameters.

        The kinds are read again at the next ``step`` if a parameter's manifold has
        changed since (e.g. :func:`~manifold_nets.declare` called after the optimiser
        was built).

        Parameters
        ----------
        param_group : dict
            ``{"params": ..., **options}``; options not given take the optimiser's defaults

        Raises
        ------
        ValueError
            if a parameter is on a manifold that the optimiser cannot update

        Examples
        --------
        >>> import torch, geoopt
        >>> from manifold_nets import DiagScaledEuclidean, InvariantSGD
        >>> opt = InvariantSGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
        >>> sm = DiagScaledEuclidean("right")
        >>> theta = geoopt.ManifoldParameter(torch.randn(3, 4), manifold=sm)
        >>> opt.add_param_group({"params": [theta], "lr": 0.01})
        >>> [g["lr"] for g in opt.param_groups]
        [0.1, 0.01]
        """
        if "_kinds" not in self.__dict__:
            self._kinds: list[list[Kind]] = []
            self._manifolds: dict[int, list[int]] = {}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._kinds.append([kind_of(p) for p in group["params"]])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._kinds = [[kind_of(p) for p in g["params"]] for g in self.param_groups]
        self._manifolds = {}

    def _group_kinds(self, index: int, group: dict[str, Any]) -> list[Kind]:
        kinds = self._kinds[index]
        manifolds = [id(getattr(p, "manifold", None)) for p in group["params"]]
        if len(kinds) != len(group["params"]) or manifolds != self._manifolds.get(index):
            # params edited by hand, or declared (in place) after this optimiser was built
            kinds = self._kinds[index] = [kind_of(p) for p in group["params"]]
            self._manifolds[index] = manifolds
        return kinds

    def state_dict(self) -> dict[str, Any]:
        """The optimiser's state, as ``torch.optim.Optimizer.state_dict``, with each
        parameter's update recorded beside its momentum buffer (``"manifold"``, as
        :func:`kind_tag` writes it), so that :meth:`load_state_dict` can check it. The
        record is part of each parameter's state, so it travels through
        ``torch.distributed.checkpoint`` too.

        Returns
        -------
        dict
            ``{"state": {index: {"momentum_buffer": ..., "manifold": ...}},
            "param_groups": [...]}``

        Examples
        --------
        >>> import torch, geoopt
        >>> from manifold_nets import InvariantSGD, ObliqueManifold
        >>> w = geoopt.ManifoldParameter(torch.eye(2), manifold=ObliqueManifold())
        >>> opt = InvariantSGD([w], lr=0.1, momentum=0.9)
        >>> w.grad = torch.ones(2, 2)
        >>> opt.step()
        >>> opt.state_dict()["state"][0]["manifold"]
        'oblique(ndim=1)'
        """
        state = super().state_dict()
        tags = [kind_tag(k) for i, g in enumerate(self.param_groups)
                for k in self._group_kinds(i, g)]
        state["state"] = {i: {**v, _MANIFOLD: tags[i]} if isinstance(i, int) and i < len(tags)
                          else v for i, v in state["state"].items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state written by :meth:`state_dict`, after checking that every parameter
        with a state is on the manifold it was on when the state was written.

        A momentum buffer of UN or SM is a tangent vector of its manifold: loaded into a
        parameter that is Euclidean, or on another manifold, it would silently turn the
        run into another update. Nothing is loaded when a parameter differs. A state whose
        buffers carry no record of their manifolds (written by another optimiser) loads with a
        warning.

        Parameters
        ----------
        state_dict : dict
            as returned by :meth:`state_dict`

        Raises
        ------
        ValueError
            naming the parameters whose manifold differs from the recorded one, with the
            fix: declare the model as it was (:func:`~manifold_nets.declare`) before
            building the optimiser and loading its state

        Warns
        -----
        UserWarning
            when buffers record no manifold

        Examples
        --------
        A UN state loaded into an optimiser of the same parameter left Euclidean:

        >>> import torch, geoopt
        >>> from manifold_nets import InvariantSGD, ObliqueManifold
        >>> w = geoopt.ManifoldParameter(torch.eye(2), manifold=ObliqueManifold())
        >>> opt = InvariantSGD([w], lr=0.1, momentum=0.9)
        >>> w.grad = torch.ones(2, 2)
        >>> opt.step()
        >>> plain = torch.nn.Parameter(torch.eye(2))
        >>> InvariantSGD([plain], lr=0.1, momentum=0.9).load_state_dict(opt.state_dict())
        Traceback (most recent call last):
        ...
        ValueError: InvariantSGD.load_state_dict: the state was written for other manifolds: ...
        """
        import warnings

        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        here = [(index, j, p, kind) for index, g in enumerate(self.param_groups)
                for j, (p, kind) in enumerate(zip(g["params"], self._group_kinds(index, g),
                                                  strict=True))]
        wrong, saved_kinds, unrecorded = [], set(), 0
        for saved_id, (index, j, p, kind) in zip(saved_ids, here, strict=False):
            entry = state_dict["state"].get(saved_id)
            if not entry:
                continue
            was = entry.get(_MANIFOLD)
            if was is None:
                unrecorded += 1
            elif was != kind_tag(kind):
                saved_kinds.add(was.split("(")[0])
                wrong.append(f"{param_name(self.param_groups[index], index, j, p)} was "
                             f"{was}, is {kind_tag(kind)}")
        if wrong:
            hint = ", ".join(repr({"oblique": "un", "sm": "sm"}[k])
                             for k in sorted(saved_kinds - {"euclidean"}))
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the state was written for other "
                "manifolds: "
                f"{'; '.join(wrong[:6])}"
                f"{f'; and {len(wrong) - 6} more' if len(wrong) > 6 else ''}. Nothing was "
                "loaded. Fix: declare the model as it was when the state was written "
                f"(manifold_nets.declare(model, {hint or repr('bsgd')}, ...)) before "
                "building the optimiser and loading its state.")
        if unrecorded:
            warnings.warn(
                f"{type(self).__name__}.load_state_dict: {unrecorded} parameter states "
                "record no "
                "manifold (written by another optimiser, e.g. torch.optim.SGD), so it "
                "cannot be checked that each is on the manifold its momentum was "
                "accumulated on.", stacklevel=2)
        state_dict = dict(state_dict)
        state_dict["state"] = {i: {k: v for k, v in entry.items() if k != _MANIFOLD}
                               for i, entry in state_dict["state"].items()}
        super().load_state_dict(state_dict)


class InvariantSGD(ManifoldOptimizer):
    r"""Symmetry-invariant SGD: the UN and SM updates of Table 1, fused across parameters.

    Each parameter is updated according to its manifold (read once, when it is added):
    :class:`~manifold_nets.ObliqueManifold` (UN, eq. (9)),
    :class:`~manifold_nets.DiagScaledEuclidean` (SM, eqs. (7)-(8)), or none (Euclidean
    SGD). With :math:`\mathrm{rgrad}_x(g)` the Riemannian gradient
    (:math:`\Pi_x(g)` for UN, :math:`\mathrm{Diag}(\|w_i\|^2) g` or
    :math:`g\,\mathrm{Diag}(\|\theta_{:,j}\|^2)` for SM, :math:`g` for Euclidean), and
    :math:`R_x(u)` the retraction (:math:`\mathrm{Orth}(x + u)` for UN, :math:`x + u`
    otherwise), one step is

    .. math::

        \begin{aligned}
            &\textbf{input}: \lambda \text{ (lr)},\ x_0 \text{ (params)},
                \ f \text{ (objective)},\ \lambda_{wd} \text{ (weight decay)}, \\
            &\qquad\quad \mu \text{ (momentum)},\ \tau \text{ (dampening)},
                \ \textit{nesterov} \\
            &\textbf{for}\ t = 1 \textbf{ to } \ldots \textbf{ do} \\
            &\quad g_t \leftarrow \nabla_x f_t(x_{t-1}) + \lambda_{wd}\, x_{t-1} \\
            &\quad r_t \leftarrow \mathrm{rgrad}_{x_{t-1}}(g_t) \\
            &\quad \textbf{if}\ \mu \neq 0 \\
            &\quad\quad \textbf{if}\ t > 1:\ b_t \leftarrow \mu\, b_{t-1} + (1 - \tau)\, r_t
                \quad \textbf{else}:\ b_t \leftarrow r_t \\
            &\quad\quad \textbf{if}\ \textit{nesterov}:\ r_t \leftarrow r_t + \mu\, b_t
                \quad \textbf{else}:\ r_t \leftarrow b_t \\
            &\quad x_t \leftarrow R_{x_{t-1}}(-\lambda\, r_t) \\
            &\quad \textbf{if}\ \mu \neq 0:\ b_t \leftarrow \Pi_{x_t}(b_t)
                \quad \text{(UN: transport by projection; else identity)} \\
            &\textbf{return}\ x_t
        \end{aligned}

    This is :class:`torch.optim.SGD`'s heavy-ball recursion with the Riemannian gradient in
    place of the Euclidean one. For Euclidean parameters it *is* ``torch.optim.SGD``.

    Parameters
    ----------
    params : iterable
        parameters or parameter groups (dicts), as for :class:`torch.optim.SGD`
    lr : float or Tensor
        learning rate :math:`\lambda` (default ``1e-3``). A 0-dim Tensor can be changed in
        place between steps (e.g. by a compiled step); a 1-D Tensor gives one rate per
        index of every parameter's leading dim (runs trained as one stacked model).
    momentum : float
        momentum factor :math:`\mu` (default 0)
    dampening : float
        dampening :math:`\tau` for momentum (default 0)
    weight_decay : float
        L2 penalty :math:`\lambda_{wd}`, added to the Euclidean gradient before it is
        turned into a Riemannian one (as geoopt does) (default 0)
    nesterov : bool
        Nesterov momentum (default False)
    maximize : bool
        maximise the objective instead of minimising it (default False), as
        :class:`torch.optim.SGD`
    fused : bool, optional
        take the fused per-filter step (:mod:`manifold_nets.fused`, a C++ kernel that reads
        and writes the parameter, gradient and buffer once) for the parameters it takes:
        contiguous CPU float32 / float64 tensors with a float rate. ``None`` (default): when
        the kernel is available (built on first use), else the pure-torch step with one
        warning; ``True``: require it; ``False``: never
    foreach : bool, optional
        use the multi-tensor (``torch._foreach_*``) implementation. ``None`` (default)
        picks it on CPU and CUDA, as it is faster there for every model we measured.

    Raises
    ------
    ValueError
        a negative or NaN learning rate, momentum, dampening or weight decay; a Tensor
        rate that is not floating or has more than one dim; ``nesterov`` without momentum
        or with dampening; a parameter on a manifold it cannot update (:func:`kind_of`)
    TypeError
        a Tensor ``momentum``, ``dampening`` or ``weight_decay``; ``foreach`` or
        ``fused`` other than ``True``, ``False`` or ``None``
    RuntimeError
        ``fused=True`` when the fused kernel is not available

    Notes
    -----
    **Difference from geoopt's first momentum step.** :class:`geoopt.optim.RiemannianSGD`
    creates the momentum buffer as a copy of the *Euclidean* gradient
    :math:`\nabla_x f_1` and then adds the Riemannian one, so its first step moves along
    :math:`\mu \nabla_x f_1 + (1 - \tau)\, r_1` instead of :math:`r_1`; from the second
    step on both recursions agree, but the extra term lives on in the buffer, decaying as
    :math:`\mu^t`. Consequences:

    - **SM loses its invariance.** Under a filter rescaling :math:`W \to A W` (the Arch2
      symmetry), :math:`r_1` scales as :math:`A r_1` but :math:`\nabla_W f_1` scales as
      :math:`A^{-1} \nabla_W f_1`, so geoopt's SM iterates are no longer the rescaled
      iterates: the update is not equivariant. Ours is (``tests/test_optim.py`` checks
      both, geoopt's as the negative control).
    - **UN's first step is not tangent.** :math:`\nabla_W f_1` has a component along each
      filter, :math:`\langle w_i, \nabla f \rangle w_i`, which rescales the filter before
      the renormalisation; it changes the effective first step size per filter, and flips
      the filter when :math:`\lambda\mu\langle w_i, \nabla f\rangle > 1`.
    - geoopt's buffer also starts from the gradient *before* weight decay, and geoopt adds
      the weight decay to ``param.grad`` in place; this class never modifies ``.grad``.

    With ``momentum=0`` the two optimisers give the same iterates (to rounding).

    **Sharded parameters.** Parameters sharded by FSDP2
    (:func:`manifold_nets.distributed.fully_shard`) are updated on each rank's shard with
    the single-tensor implementation, the right SM metric's column norms summed across the
    ranks: the iterates equal one process's. A sharded parameter without its manifold is
    refused (:func:`kind_of`), never stepped as Euclidean.

    Under :func:`torch.compile` the manifold of every parameter is the one recorded when it
    was added (no ``isinstance`` test on a traced tensor), so a compiled step performs the
    same update as an eager one. geoopt's ``RiemannianSGD`` instead loses the
    ``ManifoldParameter`` type when traced and silently takes the Euclidean path.

    Examples
    --------
    >>> import torch, geoopt
    >>> from manifold_nets import InvariantSGD, ObliqueManifold
    >>> oblique = ObliqueManifold()
    >>> w = geoopt.ManifoldParameter(oblique.random(4, 3), manifold=oblique)
    >>> b = torch.nn.Parameter(torch.zeros(4))
    >>> opt = InvariantSGD([w, b], lr=0.1, momentum=0.9)
    >>> (w.sum(1) + b).square().sum().backward()
    >>> opt.step()
    >>> torch.allclose(w.detach().norm(dim=1), torch.ones(4))
    True
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        _check_hyper(lr, momentum, dampening, weight_decay, nesterov)
        check_switches("InvariantSGD", foreach, fused)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                        foreach=foreach, fused=fused)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step. ``closure`` re-evaluates the model and returns
        the loss, as for :class:`torch.optim.SGD`.

        Every parameter with a gradient is updated in place according to its
        :class:`Kind` (the algorithm is in the class docstring); parameters without one
        are skipped. ``.grad`` is never modified.

        Parameters
        ----------
        closure : callable, optional
            re-evaluates the model (with gradients enabled) and returns the loss

        Returns
        -------
        torch.Tensor or None
            the loss ``closure`` returned, or ``None`` without a closure

        Every group's hyper-parameters and every gradient are checked before any
        parameter or buffer is written: a refused step changes nothing.

        Raises
        ------
        ValueError, TypeError
            a group's hyper-parameter breaks the constructor's rules (a scheduler or a hand
            edit set it since); with ``fused=True``, a UN or SM parameter that the kernel
            cannot take (named, with the reason)
        RuntimeError
            a sparse gradient, or one whose dtype, shape or device is not its parameter's

        Examples
        --------
        The SM step of the :class:`~manifold_nets.DiagScaledEuclidean` example, with a
        closure:

        >>> import torch, geoopt
        >>> from manifold_nets import DiagScaledEuclidean, InvariantSGD
        >>> w = geoopt.ManifoldParameter(torch.tensor([[3.0, 4.0]]), manifold=DiagScaledEuclidean())
        >>> opt = InvariantSGD([w], lr=0.01)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = (w * torch.tensor([[1.0, 0.0]])).sum()
        ...     loss.backward()
        ...     return loss
        >>> float(opt.step(closure).detach()), w.detach().tolist()  # lr * ||w||^2 * grad
        (3.0, [[2.75, 4.0]])
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Every group and gradient is checked before any parameter or buffer is written,
        # so that a refused step changes nothing.
        work = _checked(self._gather(index, group) for index, group in
                        enumerate(self.param_groups))
        for group, params, grads, bufs, kinds in work:
            momentum = group["momentum"]
            invariant_sgd(
                params, grads, bufs, kinds,
                lr=group["lr"], momentum=momentum, dampening=group["dampening"],
                weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                maximize=group.get("maximize", False), foreach=group["foreach"],
                fused=group.get("fused", False),
            )
            if momentum != 0:
                for p, buf in zip(params, bufs, strict=True):
                    self.state[p]["momentum_buffer"] = buf
        return loss

    def _gather(self, index: int, group: dict[str, Any]):
        """Group ``index``'s parameters with gradients, their gradients, buffers and kinds,
        after checking the group's hyper-parameters and every gradient (writes nothing)."""
        where = f" (parameter group {index})"
        lr = group["lr"]
        _check_hyper(lr, group["momentum"], group["dampening"], group["weight_decay"],
                     group["nesterov"], where,
                     values=not (isinstance(lr, Tensor) and lr.device.type != "cpu"))
        all_kinds = self._group_kinds(index, group)
        params, grads, bufs, kinds = [], [], [], []
        momentum = group["momentum"]
        fused = group.get("fused", False)
        for j, (p, kind) in enumerate(zip(group["params"], all_kinds, strict=True)):
            g = p.grad
            if g is None:
                continue
            problem = grad_problem(p, g)
            if problem is not None:
                raise RuntimeError(f"InvariantSGD: {param_name(group, index, j, p)}: "
                                   f"{problem}; the step changed nothing.")
            buf = self.state[p].get("momentum_buffer") if momentum != 0 else None
            if fused and kind.name != "euclidean":
                check_fused("InvariantSGD", group, index, j, p, buf, kind)
            params.append(p)
            grads.append(g)
            kinds.append(kind)
            if momentum != 0:
                bufs.append(buf)
        return group, params, grads, bufs, kinds

def check_switches(owner: str, foreach, fused) -> None:
    """Raise unless ``foreach`` and ``fused`` are ``True``, ``False`` or ``None``, and the
    fused kernel is available where ``fused=True``.

    Parameters
    ----------
    owner : str
        the optimiser's name, for the message
    foreach, fused : bool or None
        the switches

    Raises
    ------
    TypeError
        a switch that is not ``True``, ``False`` or ``None``
    RuntimeError
        ``fused=True`` without the kernel

    Examples
    --------
    >>> from manifold_nets.optim import check_switches
    >>> check_switches("InvariantSGD", None, False)
    >>> check_switches("InvariantSGD", "yes", None)
    Traceback (most recent call last):
    ...
    TypeError: Invalid foreach: 'yes'; pass True, False or None.
    """
    for name, value in (("foreach", foreach), ("fused", fused)):
        if value not in (None, True, False):
            raise TypeError(f"Invalid {name}: {value!r}; pass True, False or None.")
    if fused:
        from . import fused as kernel

        if not kernel.available():
            raise RuntimeError(f"{owner}(fused=True): the fused kernel is not available "
                               f"({kernel.reason()}). Fix: install a C++ compiler and ninja, "
                               "or pass fused=None or False.")


def check_fused(owner: str, group: dict[str, Any], index: int, j: int, p: Tensor,
                 buf: Tensor | None, kind: Kind) -> None:
    """With ``fused=True``: raise, naming the parameter, unless the kernel takes it.

    Parameters
    ----------
    owner : str
        the optimiser's name, for the message
    group : dict
        the parameter's group
    index, j : int
        the group's index and the parameter's index in it, for the message
    p : torch.Tensor
        the parameter, with its gradient
    buf : torch.Tensor or None
        its momentum buffer
    kind : Kind
        how it is updated

    Raises
    ------
    ValueError
        a sharded parameter, or one the kernel refuses (:func:`manifold_nets.fused.refusal`)

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.optim import Kind, check_fused
    >>> p = torch.zeros(2, 3, dtype=torch.float16)
    >>> p.grad = torch.zeros_like(p)
    >>> check_fused("InvariantSGD", {"lr": 0.1, "params": [p]}, 0, 0, p, None,
    ...             Kind("euclidean", (), 0))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: InvariantSGD(fused=True): the fused kernel cannot take ...
    """
    from . import fused as kernel

    why = ("sharded (DTensor) parameters take the sharded step" if is_dtensor(p)
           else kernel.refusal(p, p.grad, buf, group["lr"], kind))
    if why is not None:
        raise ValueError(
            f"{owner}(fused=True): the fused kernel cannot take "
            f"{param_name(group, index, j, p)}: {why}; the step changed nothing. Fix: pass "
            "fused=None to take the pure-torch step for such parameters.")


def grad_problem(p: Tensor, g: Tensor) -> str | None:
    """Why ``g`` cannot be ``p``'s gradient in a step, or ``None``.

    Parameters
    ----------
    p, g : torch.Tensor
        the parameter and its gradient

    Returns
    -------
    str or None
        a sparse gradient, or one of another dtype, shape or device; ``None`` when it fits

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.optim import grad_problem
    >>> p = torch.zeros(2, 3)
    >>> grad_problem(p, torch.zeros(2, 3)) is None
    True
    >>> grad_problem(p, torch.zeros(3, 2))
    'its gradient has shape (3, 2), the parameter (2, 3)'
    """
    if g.is_sparse:
        return "its gradient is sparse, which InvariantSGD does not support (use dense gradients)"
    if g.dtype != p.dtype:
        return f"its gradient is {g.dtype}, the parameter {p.dtype}"
    if g.shape != p.shape:
        return f"its gradient has shape {tuple(g.shape)}, the parameter {tuple(p.shape)}"
    if g.device != p.device:
        return f"its gradient is on {g.device}, the parameter on {p.device}"
    return None


def _checked(gathered) -> list:
    """Every group gathered (and so checked) before the first is stepped."""
    return [w for w in gathered if w[1]]


def invariant_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    kinds: list[Kind],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool = False,
    foreach: bool | None = None,
    fused: bool | None = False,
) -> None:
    r"""Functional core of :class:`InvariantSGD`; see its docstring for the algorithm.

    Updates ``params`` in place. ``momentum_buffer_list`` is read and, where an entry is
    ``None`` and ``momentum != 0``, filled with the new buffer. ``kinds`` gives the
    :class:`Kind` of every parameter (see :func:`kind_of`). ``lr`` is a float, a 0-dim
    Tensor, or a 1-D Tensor of one rate per index of every parameter's leading dim (the
    runs of a stacked model; rate 0 freezes a run). ``fused``: take the fused kernel's
    step (:mod:`manifold_nets.fused`) for the parameters it takes (``None``: if it is
    available; ``False``, the default here: never).

    Parameters
    ----------
    params : list of torch.Tensor
        the parameters, updated in place
    grads : list of torch.Tensor
        their Euclidean gradients (not modified)
    momentum_buffer_list : list of torch.Tensor or None
        one buffer per parameter when ``momentum != 0`` (``None`` entries are filled with
        new buffers); may be empty when ``momentum == 0``
    kinds : list of Kind
        how each parameter is updated
    lr : float or torch.Tensor
        learning rate :math:`\lambda`: a float, a 0-dim Tensor, or a 1-D Tensor of one
        rate per index of the leading dim
    momentum : float
        momentum factor :math:`\mu`
    dampening : float
        dampening :math:`\tau`
    weight_decay : float
        L2 penalty :math:`\lambda_{wd}`, added to the Euclidean gradient
    nesterov : bool
        Nesterov momentum
    maximize : bool
        maximise instead of minimise
    foreach : bool, optional
        the multi-tensor implementation; ``None``: when every parameter is on CPU or CUDA
    fused : bool, optional
        the fused kernel for the parameters it takes; ``None``: when it is available;
        ``False`` (default): never

    Raises
    ------
    NotImplementedError
        for a sharded parameter whose filters span ranks (only the right SM metric's
        columns may)

    The single-tensor path is the reference: it calls the functions of
    :mod:`manifold_nets.math` (:func:`~manifold_nets.math.oblique_proju`,
    :func:`~manifold_nets.math.scaled_egrad2rgrad`,
    :func:`~manifold_nets.math.oblique_projx_`) one parameter at a time. The multi-tensor
    path computes the same with ``torch._foreach_*`` kernels.

    Examples
    --------
    Two runs of one filter bank, stacked, each with its own rate (the second frozen: only
    the renormalisation touches it, at the level of rounding):

    >>> import torch
    >>> from manifold_nets.optim import Kind, invariant_sgd
    >>> w = torch.nn.functional.normalize(torch.randn(2, 3, 4), dim=-1)
    >>> before = w.clone()
    >>> invariant_sgd([w], [torch.randn(2, 3, 4)], [], [Kind("oblique", (-1,))],
    ...               lr=torch.tensor([0.1, 0.0]), momentum=0.0, dampening=0.0,
    ...               weight_decay=0.0, nesterov=False)
    >>> torch.allclose(w[1], before[1], atol=1e-6), torch.allclose(w[0], before[0], atol=1e-6)
    (True, False)
    """
    if foreach is None:
        foreach = all(p.device.type in ("cpu", "cuda") for p in params)
    # Under torch.compile the update runs eagerly: see _EAGER.
    if fused is not False and not any(is_dtensor(p) for p in params):
        rest = _impl("fused")(params, grads, momentum_buffer_list, kinds, lr=lr,
                               momentum=momentum, dampening=dampening,
                               weight_decay=weight_decay, nesterov=nesterov,
                               maximize=maximize)
        if not rest:
            return
        params = [params[i] for i in rest]
        grads = [grads[i] for i in rest]
        bufs = [momentum_buffer_list[i] for i in rest] if momentum != 0 else []
        invariant_sgd(params, grads, bufs, [kinds[i] for i in rest], lr=lr,
                      momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                      nesterov=nesterov, maximize=maximize, foreach=foreach, fused=False)
        for k, i in enumerate(rest):
            if momentum != 0:
                momentum_buffer_list[i] = bufs[k]
        return
    if any(is_dtensor(p) for p in params):
        func = _impl("sharded")
    else:
        func = _impl("multi" if foreach else "single")
    func(params, grads, momentum_buffer_list, kinds, lr=lr, momentum=momentum,
         dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
         maximize=maximize)


def _rate(lr: float | Tensor, param: Tensor) -> float | Tensor:
    """``lr`` shaped to multiply ``param``: one rate per index of its leading dim."""
    if isinstance(lr, Tensor) and lr.dim() == 1:
        return lr.to(param.dtype).view(-1, *([1] * (param.dim() - 1)))
    return lr


def _step_(param: Tensor, direction: Tensor, lr: float | Tensor) -> None:
    r""":math:`x \leftarrow x - \lambda\, d` in place."""
    if isinstance(lr, Tensor):
        param.addcmul_(direction, _rate(lr, param), value=-1)
    else:
        param.add_(direction, alpha=-lr)


def _rgrad(param: Tensor, grad: Tensor, kind: Kind, reduce=None) -> Tensor:
    """The Riemannian gradient of ``kind`` (Table 1): UN, SM or Euclidean. ``reduce``
    sums the SM metric's squared norms across the ranks that hold parts of them."""
    if kind.name == "oblique":
        return oblique_proju(param, grad, kind.ndim)
    if kind.name == "sm":
        if reduce is None:
            return scaled_egrad2rgrad(param, grad, kind.side, kind.ndim)
        sqnorm = filter_sqnorm if kind.side == "left" else column_sqnorm
        return grad * reduce(sqnorm(param, kind.ndim)).clamp_max_(torch.finfo(param.dtype).max)
    return grad


def _single_tensor_invariant_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    kinds: list[Kind],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    reducers: list | None = None,
) -> None:
    for i, param in enumerate(params):
        kind = kinds[i]
        grad = grads[i] if not maximize else -grads[i]
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        grad = _rgrad(param, grad, kind, None if reducers is None else reducers[i])
        buf = None
        if momentum != 0:
            buf = momentum_buffer_list[i]
            if buf is None:
                buf = momentum_buffer_list[i] = torch.clone(grad).detach()
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        _step_(param, grad, lr)
        if kind.name == "oblique":
            oblique_projx_(param, kind.ndim)
            if buf is not None:  # transport: project the buffer onto the new tangent space
                buf.copy_(oblique_proju(param, buf, kind.ndim))


def foreach_filter_inner(xs: list[Tensor], ys: list[Tensor], dims: tuple[int, ...]) -> list[Tensor]:
    """Per-filter inner products of two lists of tensors, the reduced dims kept.

    Parameters
    ----------
    xs, ys : list of torch.Tensor
        tensors of equal shapes, pairwise
    dims : tuple of int
        the dims one filter spans (:func:`~manifold_nets.math.filter_dims`)

    Returns
    -------
    list of torch.Tensor
        ``(x * y).sum(dims, keepdim=True)`` for each pair

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.optim import foreach_filter_inner
    >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    >>> foreach_filter_inner([x], [x], (1,))[0].flatten().tolist()
    [5.0, 25.0]
    """
    return [t.sum(dim=dims, keepdim=True) for t in torch._foreach_mul(xs, ys)]


def _filter_norm(xs: list[Tensor], dims: tuple[int, ...]) -> list[Tensor]:
    return [torch.linalg.vector_norm(x, dim=dims, keepdim=True) for x in xs]


def foreach_normalise_(xs: list[Tensor], dims: tuple[int, ...], dtype: torch.dtype) -> None:
    """Normalise every filter of every tensor of ``xs`` in place (eq. (9)'s retraction).

    Parameters
    ----------
    xs : list of torch.Tensor
        the tensors
    dims : tuple of int
        the dims one filter spans
    dtype : torch.dtype
        their dtype: the norms are clamped at its ``manifold_nets.math.EPS``

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.optim import foreach_normalise_
    >>> x = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    >>> foreach_normalise_([x], (1,), torch.float32)
    >>> x.tolist()
    [[0.6000000238418579, 0.800000011920929], [0.0, 1.0]]
    """
    norms = _filter_norm(xs, dims)
    torch._foreach_clamp_min_(norms, EPS[dtype])
    torch._foreach_reciprocal_(norms)
    torch._foreach_mul_(xs, norms)


def _multi_tensor_invariant_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    kinds: list[Kind],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((kinds[i], p.device, p.dtype), []).append(i)
    tensor_lr = isinstance(lr, Tensor)
    for (kind, _, dtype), idx in groups.items():
        name, dims = kind.name, kind.dims
        ps = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        fresh = False  # whether gs are temporaries of ours (safe to modify in place)
        if maximize:
            gs = torch._foreach_neg(gs)
            fresh = True
        if weight_decay != 0:
            if fresh:
                torch._foreach_add_(gs, ps, alpha=weight_decay)
            else:
                gs = torch._foreach_add(gs, ps, alpha=weight_decay)
            fresh = True
        if name == "oblique":
            inners = foreach_filter_inner(ps, gs, dims)
            gs = torch._foreach_addcmul(gs, inners, ps, value=-1)
            fresh = True
        elif name == "sm":
            scales = _filter_norm(ps, dims)
            torch._foreach_mul_(scales, scales)
            torch._foreach_clamp_max_(scales, torch.finfo(dtype).max)
            gs = torch._foreach_mul(gs, scales)
            fresh = True
        bufs: list[Tensor] = []
        if momentum != 0:
            if all(momentum_buffer_list[i] is not None for i in idx):
                bufs = [momentum_buffer_list[i] for i in idx]  # type: ignore[misc]
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, gs, alpha=1 - dampening)
            else:
                for j, i in enumerate(idx):
                    buf = momentum_buffer_list[i]
                    if buf is None:
                        buf = momentum_buffer_list[i] = torch.clone(gs[j]).detach()
                    else:
                        buf.mul_(momentum).add_(gs[j], alpha=1 - dampening)
                    bufs.append(buf)
            if nesterov:
                if fresh:
                    torch._foreach_add_(gs, bufs, alpha=momentum)
                else:
                    gs = torch._foreach_add(gs, bufs, alpha=momentum)
            else:
                gs = bufs
        if tensor_lr:
            for p, g in zip(ps, gs, strict=True):
                _step_(p, g, lr)
        else:
            torch._foreach_add_(ps, gs, alpha=-lr)
        if name == "oblique":
            foreach_normalise_(ps, dims, dtype)
            if bufs:
                torch._foreach_addcmul_(bufs, foreach_filter_inner(ps, bufs, dims), ps, value=-1)


def _dtensor_class() -> type | None:
    if "cls" not in _DTENSOR:
        _DTENSOR["cls"] = None
        if torch.distributed.is_available():
            from torch.distributed.tensor import DTensor

            _DTENSOR["cls"] = DTensor
    return _DTENSOR["cls"]


_DTENSOR: dict = {}


def is_dtensor(t) -> bool:
    """Is ``t`` a ``torch.distributed.tensor.DTensor`` (a parameter sharded by FSDP2)?

    Parameters
    ----------
    t : object
        Usually a parameter.

    Returns
    -------
    bool
        ``False`` also where torch has no distributed support.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.optim import is_dtensor
    >>> is_dtensor(torch.zeros(3))
    False
    """
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def shard_reducer(param: Tensor, kind: Kind):
    """For a sharded parameter, the function that sums a per-filter (or per-column) squared
    norm across the ranks holding parts of it; ``None`` when every norm is local.

    Parameters
    ----------
    param : torch.distributed.tensor.DTensor
        the sharded parameter
    kind : Kind
        how it is updated

    Returns
    -------
    callable or None
        ``reduce(t)``: ``t`` all-reduced (summed) in place over the shard groups that
        split the norm's dims

    Raises
    ------
    NotImplementedError
        a filter (UN, left SM) split across ranks: only the right SM metric's columns may

    Examples
    --------
    FSDP2 shards dim 0, which keeps each filter on one rank (a one-rank mesh here):

    >>> import socket, torch, torch.distributed as dist
    >>> from torch.distributed.device_mesh import init_device_mesh
    >>> from torch.distributed.tensor import Shard, distribute_tensor
    >>> from manifold_nets.optim import Kind, shard_reducer
    >>> with socket.socket() as s:
    ...     _ = s.bind(("127.0.0.1", 0))
    ...     port = s.getsockname()[1]
    >>> dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
    ...                         world_size=1)
    >>> p = distribute_tensor(torch.ones(4, 3), init_device_mesh("cpu", (1,)), [Shard(0)])
    >>> shard_reducer(p, Kind("oblique", (-1,), 1)) is None
    True
    >>> dist.destroy_process_group()
    """
    import torch.distributed as dist

    reduced = {d % param.dim() for d in kind.dims}
    groups = [param.device_mesh.get_group(mesh_dim)
              for mesh_dim, placement in enumerate(param.placements)
              if placement.is_shard() and placement.dim % param.dim() in reduced]
    if not groups:
        return None
    if not (kind.name == "sm" and kind.side == "right"):
        raise NotImplementedError(
            f"InvariantSGD: a {kind.name} parameter of shape {tuple(param.shape)} is sharded "
            f"along the dims of its filters (placements {param.placements}); only the "
            "columns of the right SM metric may span ranks. FSDP2's fully_shard shards dim 0, "
            "which keeps every filter on one rank.")

    def reduce(t: Tensor) -> Tensor:
        for group in groups:
            dist.all_reduce(t, group=group)
        return t

    return reduce


def _sharded_invariant_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    kinds: list[Kind],
    **hyper,
) -> None:
    """The single-tensor step on each rank's shard of sharded (DTensor) parameters.

    UN and the left SM metric act filter by filter, and FSDP2 keeps every filter on one
    rank: the step on the shard is the step on those rows. The right SM metric's column
    norms are summed across the shard group first. New momentum buffers are sharded like
    their parameter.
    """
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    momentum = hyper["momentum"]
    bufs = [None if b is None else local(b) for b in momentum_buffer_list] if momentum else []
    reducers = [shard_reducer(p, k) if isinstance(p, DTensor) else None
                for p, k in zip(params, kinds, strict=True)]
    _single_tensor_invariant_sgd([local(p) for p in params], [local(g) for g in grads], bufs,
                                 kinds, reducers=reducers, **hyper)
    for i, p in enumerate(params):
        if momentum and momentum_buffer_list[i] is None and isinstance(p, DTensor):
            momentum_buffer_list[i] = DTensor.from_local(
                bufs[i], p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                run_check=False)
        elif momentum and momentum_buffer_list[i] is None:
            momentum_buffer_list[i] = bufs[i]


def _fused_invariant_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    kinds: list[Kind],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> list[int]:
    """The fused kernel's step for every parameter it takes; returns the indices of the
    others (all of them when the kernel is not available)."""
    from . import fused as kernel

    if not any(p.device.type == "cpu" for p in params):
        return list(range(len(params)))  # the kernel is for CPU tensors: do not build it
    module = kernel.load()
    if module is None or (isinstance(lr, Tensor) and lr.dim() > 0):
        return list(range(len(params)))
    rate = float(lr)
    rest = []
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        buf = momentum_buffer_list[i] if momentum != 0 else None
        key = (kinds[i].name, kinds[i].side)
        if key not in KERNEL_KINDS or not kernel.eligible(p, g, buf, lr, kinds[i]):
            rest.append(i)
            continue
        init = momentum != 0 and buf is None
        if init:
            buf = momentum_buffer_list[i] = torch.empty_like(  # laid out as p
                p, memory_format=torch.preserve_format)
        module.fused_step(p.detach(), g, buf if buf is not None else p.detach(),
                          KERNEL_KINDS[key], kinds[i].ndim, rate, momentum, dampening,
                          weight_decay, nesterov, maximize, init)
    return rest


#: The two implementations, run eagerly under :func:`torch.compile` (a graph break around
#: them). Inductor's CPU code generation (torch 2.13) cannot compile the UN and SM steps
#: with momentum: a per-filter reduction of the parameter, then an in-place update of the
#: momentum buffer, then of the parameter, fails in its outer-loop fusion with
#: ``KeyError: 'bufN'`` for almost every shape; rewritings tried (functional updates with a
#: final copy, the inner product as a matrix product, filters viewed as rows, a graph
#: break between the buffer and the parameter) failed too, and one that compiled
#: (``torch._foreach_copy_`` of both results) gave wrong buffer values.
#: ``tests/test_optim.py`` fails once torch compiles the step itself (then this can go).
#: Compiling a training step that calls the optimiser still compiles the model; the update
#: runs eagerly, with the eager step's exact arithmetic.
_IMPLS = {
    "single": _single_tensor_invariant_sgd,
    "multi": _multi_tensor_invariant_sgd,
    "sharded": _sharded_invariant_sgd,
    "fused": _fused_invariant_sgd,
}
_EAGER = {
    "single": torch.compiler.disable(_single_tensor_invariant_sgd, recursive=True),
    "multi": torch.compiler.disable(_multi_tensor_invariant_sgd, recursive=True),
    "sharded": torch.compiler.disable(_sharded_invariant_sgd, recursive=True),
    "fused": torch.compiler.disable(_fused_invariant_sgd, recursive=True),
}


def _impl(name: str):
    """The implementation ``name``: as it is when run eagerly (no wrapper to pay for), run
    eagerly inside a graph that :func:`torch.compile` traces."""
    return _EAGER[name] if torch.compiler.is_compiling() else _IMPLS[name]
