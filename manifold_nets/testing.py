r"""Hypothesis strategies and assertions for invariance tests of your own models.

Property tests that users write for their models, in a few lines::

    from hypothesis import given
    from manifold_nets import declare, InvariantSGD
    from manifold_nets.testing import (rescalings, assert_loss_invariant,
                                       assert_update_equivariant)

    @given(g=rescalings(model, inputs, update="sm"))   # elements that SM resolves
    def test_sm_is_update_invariant(g):
        assert_loss_invariant(model, g, inputs, loss_fn)      # loss_fn(outputs) -> scalar
        assert_update_equivariant(model, g, inputs, loss_fn, update="sm", steps=3,
                                  optimizer=lambda params: InvariantSGD(params, lr=1e-2,
                                                                        momentum=0.9))

:func:`rescalings` draws group elements from the families that
:func:`~manifold_nets.symmetry.discover` finds (all of them, or those an update resolves).
:func:`assert_loss_invariant` checks :math:`L(g \cdot w) = L(w)`;
:func:`assert_update_equivariant` runs ``steps`` optimiser steps from :math:`w` and from
:math:`g \cdot w` and checks that the two models compute the same outputs all along. With
the same elements, ``update="bsgd"`` fails (the negative control), and so does SM on a
family it does not resolve. Everything is computed on float64 copies; the tolerances
depend on the model's dtype and on its normalisations' ``eps`` (which makes per-filter
scaling a symmetry only up to about ``eps / var``), and failures print the measured gap.

:func:`oblique_points`, :func:`scaled_points` and :func:`tangent_vectors` are strategies
for points and tangent vectors of the two manifolds.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

try:
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis comes with the dev and testing extras
    raise ImportError("manifold_nets.testing needs hypothesis: pip install "
                      "'manifold-nets[testing]' (or pip install hypothesis)") from None

from .declare import declare
from .manifolds import DiagScaledEuclidean, ObliqueManifold
from .symmetry import Rescaling, discover
from .symmetry.structure import as_inputs

__all__ = [
    "assert_loss_invariant",
    "assert_update_equivariant",
    "oblique_points",
    "rescalings",
    "scaled_points",
    "tangent_vectors",
    "tolerance",
]


def tolerance(model: nn.Module) -> float:
    """The relative tolerance of the assertions for ``model``: round-off of its dtype
    (``1e-9`` for float64, ``1e-4`` for float32, computed in float64 either way) plus
    ``100 * eps`` of its normalisations.

    Parameters
    ----------
    model : nn.Module
        the model; its first parameter's dtype and the largest ``eps`` of its batch,
        layer and group norms are read

    Returns
    -------
    float
        the default ``rtol`` of :func:`assert_loss_invariant` and
        :func:`assert_update_equivariant`

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.testing import tolerance
    >>> tolerance(torch.nn.Linear(3, 2)), tolerance(torch.nn.Linear(3, 2).double())
    (0.0001, 1e-09)
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    >>> round(tolerance(net), 6)  # 1e-4 + 100 * 1e-5
    0.0011
    """
    p = next(model.parameters())
    eps = max([m.eps for m in model.modules() if isinstance(
        m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm))] + [0.0])
    return (1e-9 if p.dtype == torch.float64 else 1e-4) + 100 * eps


def rescalings(model: nn.Module, inputs, update: str | None = None, *,
               families: Sequence[str] | None = None, log_scale: float = 1.0,
               method: str = "auto") -> st.SearchStrategy[Rescaling]:
    """A strategy of rescalings of ``model``: random elements of its symmetry group.

    Parameters
    ----------
    model : nn.Module
        the model whose symmetries are drawn
    inputs : torch.Tensor or tuple
        example inputs for :func:`~manifold_nets.symmetry.discover` (run once, here)
    update : {"un", "sm"}, optional
        only the families that this update resolves (the ``resolves`` of
        :class:`~manifold_nets.symmetry.structure.Family`)
    families : sequence of str, optional
        only the families with these labels
    log_scale : float
        the largest log-scale of any row, column or channel (default 1: factors in
        ``[1/e, e]``)
    method : str
        passed to :func:`~manifold_nets.symmetry.discover`

    Returns
    -------
    hypothesis.strategies.SearchStrategy
        a strategy of :class:`~manifold_nets.symmetry.groups.Rescaling` elements: a random
        combination of the chosen families' directions, its largest log-scale drawn in
        ``[log_scale / 4, log_scale]``. Its attribute ``families`` lists the families it
        draws from, ``discovery`` the whole result of
        :func:`~manifold_nets.symmetry.discover`.

    Raises
    ------
    ValueError
        if no family is left to draw from

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.testing import rescalings
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4, bias=False), torch.nn.BatchNorm1d(4),
    ...                           torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> strategy = rescalings(net, torch.randn(32, 3), update="un")
    >>> [f.label for f in strategy.families]
    ['per-filter scaling of 0']
    """
    found = discover(model, inputs, method=method)
    chosen = [f for f in found.families
              if (update is None or f.resolves.get(update))
              and (families is None or f.label in families)]
    if not chosen:
        raise ValueError(
            f"rescalings: no family of symmetries of this model "
            f"{'is resolved by ' + update if update else 'matches'} (found: "
            f"{[str(f) for f in found.families] or 'none'})")
    columns = [c for f in chosen for c in f.columns]
    basis = found.basis.index_select(1, torch.tensor(columns, dtype=torch.long)).coalesce()
    # every generator at the same weight: its largest log-scale 1
    largest = torch.zeros(len(columns), dtype=torch.float64).scatter_reduce(
        0, basis.indices()[1], basis.values().abs(), "amax").clamp_min(1e-300)
    label = ", ".join(f.label for f in chosen)

    def element(seed_and_size) -> Rescaling:
        seed, size = seed_and_size
        t = torch.randn(len(columns), generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64)
        v = basis @ (t / largest)
        return Rescaling.from_log(found.space, v * (size / v.abs().max().clamp_min(1e-300)),
                                  label=label)

    strategy = st.tuples(st.integers(0, 2**32 - 1),
                         st.floats(log_scale / 4, log_scale)).map(element)
    strategy.families = chosen  # what it draws from, for messages and docs
    strategy.discovery = found
    return strategy


@torch.no_grad()
def _loss(net: nn.Module, args: tuple, loss_fn: Callable) -> float:
    return float(loss_fn(net(*args)))


def assert_loss_invariant(model: nn.Module, g: Rescaling, inputs, loss_fn: Callable, *,
                          rtol: float | None = None) -> float:
    """Assert :math:`L(g \\cdot w) = L(w)` on ``inputs``, in float64; returns the gap.

    Parameters
    ----------
    model : nn.Module
        not modified (copies are used; batch norms as the model has them)
    g : Rescaling
        the group element (:class:`~manifold_nets.symmetry.groups.Rescaling`), e.g. drawn
        from :func:`rescalings`
    inputs : torch.Tensor or tuple
        the model's inputs (floating ones are converted to float64)
    loss_fn : callable
        ``loss_fn(outputs) -> scalar``
    rtol : float, optional
        default :func:`tolerance`

    Returns
    -------
    float
        the relative gap :math:`|L(w) - L(g \\cdot w)| / |L(w)|`

    Raises
    ------
    AssertionError
        with the two losses and the relative gap

    Examples
    --------
    Batch norm makes the loss invariant under the scaling of the filters before it:

    >>> import torch
    >>> from hypothesis import given, settings
    >>> from manifold_nets.testing import assert_loss_invariant, rescalings
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4, bias=False), torch.nn.BatchNorm1d(4),
    ...                           torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> x = torch.randn(32, 3)
    >>> @settings(max_examples=5, deadline=None, database=None)
    ... @given(g=rescalings(net, x))
    ... def test_loss_is_invariant(g):
    ...     assert_loss_invariant(net, g, x, lambda out: out.square().mean())
    >>> test_loss_is_invariant()
    """
    rtol = tolerance(model) if rtol is None else rtol
    net = copy.deepcopy(model).double()
    args = as_inputs(inputs, dtype=torch.float64)
    a = _loss(net, args, loss_fn)
    b = _loss(g.apply(net), args, loss_fn)
    gap = abs(a - b) / max(abs(a), 1e-300)
    assert gap <= rtol, (f"loss not invariant under {g.label or 'the rescaling'}: L(w) = "
                         f"{a!r}, L(g.w) = {b!r}, relative gap {gap:.2e} > {rtol:.1e}")
    return gap


def assert_update_equivariant(model: nn.Module, g: Rescaling, inputs, loss_fn: Callable, *,
                              update: str, steps: int = 3,
                              optimizer: Callable | None = None,
                              rtol: float | None = None) -> list[float]:
    """Assert that ``steps`` updates from :math:`w` and from :math:`g \\cdot w` give models
    with the same outputs on ``inputs`` after every step; returns the gaps.

    Both copies are declared for ``update`` (:func:`~manifold_nets.declare`, as the
    ``resolves`` of :class:`~manifold_nets.symmetry.structure.Family` assumes), in float64,
    and stepped on ``loss_fn(model(*inputs))``.

    Parameters
    ----------
    model : nn.Module
        not modified
    g : Rescaling
        the group element (:class:`~manifold_nets.symmetry.groups.Rescaling`), e.g. drawn
        from :func:`rescalings`
    inputs : torch.Tensor or tuple
        the model's inputs (floating ones are converted to float64)
    loss_fn : callable
        ``loss_fn(outputs) -> scalar``
    update : {"bsgd", "sm", "un"}
        the update both copies are declared for
    steps : int
        number of optimiser steps (default 3)
    optimizer : callable, optional
        ``optimizer(params) -> torch.optim.Optimizer`` (default:
        :class:`~manifold_nets.InvariantSGD` with ``lr=1e-2``)
    rtol : float, optional
        default :func:`tolerance`

    Returns
    -------
    list of float
        the relative gap of the two models' outputs before the first step and after each
        step (``steps + 1`` values)

    Raises
    ------
    AssertionError
        naming the first step at which the outputs part, with the measured gap

    Examples
    --------
    UN is equivariant under the filter scaling that batch norm makes a symmetry; B-SGD,
    the negative control, is not:

    >>> import torch
    >>> from hypothesis import find
    >>> from manifold_nets import InvariantSGD
    >>> from manifold_nets.testing import assert_update_equivariant, rescalings
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4, bias=False), torch.nn.BatchNorm1d(4),
    ...                           torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> x = torch.randn(32, 3)
    >>> g = find(rescalings(net, x, update="un"), lambda g: True)  # the simplest element
    >>> loss_fn = lambda out: out.square().mean()
    >>> sgd = lambda params: InvariantSGD(params, lr=0.1)
    >>> gaps = assert_update_equivariant(net, g, x, loss_fn, update="un", optimizer=sgd)
    >>> len(gaps), max(gaps) < 1e-12
    (4, True)
    >>> assert_update_equivariant(net, g, x, loss_fn, update="bsgd", optimizer=sgd)
    Traceback (most recent call last):
    ...
    AssertionError: bsgd is not equivariant under per-filter scaling of 0: after 1 step ...
    """
    from .optim import InvariantSGD

    rtol = tolerance(model) if rtol is None else rtol
    make = optimizer or (lambda params: InvariantSGD(params, lr=1e-2))
    args = as_inputs(inputs, dtype=torch.float64)
    nets = [copy.deepcopy(model).double()]
    nets.append(g.apply(nets[0]))
    opts = []
    for net in nets:
        with warnings.catch_warnings():  # the start's change is measured below
            warnings.simplefilter("ignore", UserWarning)
            declare(net, update)
        opts.append(make(net.parameters()))
    gaps = []
    for step in range(steps + 1):
        with torch.no_grad():
            outs = [net(*args) for net in nets]
        gap = float((outs[0] - outs[1]).norm() / outs[0].norm().clamp_min(1e-300))
        gaps.append(gap)
        assert gap <= rtol, (
            f"{update} is not equivariant under {g.label or 'the rescaling'}: after "
            f"{step} step{'s' * (step != 1)} the outputs from w and from g.w differ by "
            f"{gap:.2e} (relative) > {rtol:.1e}; gaps so far {[f'{x:.1e}' for x in gaps]}")
        if step == steps:
            break
        for net, opt in zip(nets, opts, strict=True):
            opt.zero_grad()
            loss_fn(net(*args)).backward()
            opt.step()
    return gaps


def _seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**32 - 1)


def oblique_points(shape: Sequence[int], ndim: int = 1,
                   dtype: torch.dtype = torch.float64) -> st.SearchStrategy[torch.Tensor]:
    """Points of :class:`~manifold_nets.ObliqueManifold` (``ndim`` trailing dims per
    filter, each of unit norm).

    Parameters
    ----------
    shape : sequence of int
        the points' shape, at least ``ndim`` dims
    ndim : int
        number of trailing dims that form one filter
    dtype : torch.dtype
        the points' dtype (default float64)

    Returns
    -------
    hypothesis.strategies.SearchStrategy
        a strategy of tensors: Gaussian draws (from a seed that hypothesis chooses and
        shrinks) with every filter normalised

    Examples
    --------
    >>> import torch
    >>> from hypothesis import given, settings
    >>> from manifold_nets.testing import oblique_points
    >>> @settings(max_examples=5, database=None)
    ... @given(w=oblique_points((8, 3, 5, 5), ndim=3))
    ... def test_unit_filters(w):
    ...     assert torch.allclose(w.flatten(1).norm(dim=1), torch.ones(8, dtype=w.dtype))
    >>> test_unit_filters()
    """
    manifold = ObliqueManifold(ndim)

    def point(seed: int) -> torch.Tensor:
        x = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed),
                        dtype=dtype)
        return manifold.projx(x)
    return _seeds().map(point)


def scaled_points(shape: Sequence[int], side: str = "left", ndim: int = 1,
                  dtype: torch.dtype = torch.float64) -> st.SearchStrategy[torch.Tensor]:
    """Points of :class:`~manifold_nets.DiagScaledEuclidean`: weights whose filters (or
    columns, ``side="right"``) have norms spread over two orders of magnitude.

    A Gaussian tensor whose filters (``"left"``) or whose slices along the last dim
    (``"right"``) are scaled by factors :math:`e^{s}`, :math:`s` uniform in
    :math:`[-2.3, 2.3]` (about 0.1 to 10). For ``"right"`` with ``ndim=2`` the last dim
    indexes the columns of :math:`\\theta`; for ``ndim > 2`` (a convolutional
    :math:`\\theta`) it is the last kernel dim instead.

    Parameters
    ----------
    shape : sequence of int
        the points' shape, at least ``ndim`` dims
    side : {"left", "right"}
        which metric the points are for
    ndim : int
        the manifold's ``ndim``; at least 2 for ``"right"`` (the default 1 is refused
        there)
    dtype : torch.dtype
        the points' dtype (default float64)

    Returns
    -------
    hypothesis.strategies.SearchStrategy
        a strategy of tensors

    Raises
    ------
    ValueError
        if ``side`` and ``ndim`` do not make a :class:`~manifold_nets.DiagScaledEuclidean`

    Examples
    --------
    >>> import torch
    >>> from hypothesis import given, settings
    >>> from manifold_nets import DiagScaledEuclidean
    >>> from manifold_nets.testing import scaled_points
    >>> sm = DiagScaledEuclidean("right")
    >>> @settings(max_examples=5, database=None)
    ... @given(theta=scaled_points((3, 4), side="right", ndim=2))
    ... def test_rgrad_identity(theta):
    ...     g, v = torch.randn(2, 3, 4, dtype=theta.dtype).unbind()
    ...     assert torch.allclose(sm.inner(theta, sm.egrad2rgrad(theta, g), v), (g * v).sum())
    >>> test_rgrad_identity()
    """
    DiagScaledEuclidean(side, ndim)  # validates the arguments

    def point(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(tuple(shape), generator=gen, dtype=dtype)
        if side == "left":  # one scale per filter: the leading (batch) dims
            size = x.shape[:x.dim() - ndim]
        else:  # one per column of theta: the second of the trailing ndim dims
            size = x.shape[x.dim() - ndim + 1:x.dim() - ndim + 2]
        scale = torch.exp(torch.empty(size, dtype=dtype).uniform_(-2.3, 2.3, generator=gen))
        trailing = ndim if side == "left" else ndim - 2
        return x * scale.reshape(*scale.shape, *([1] * trailing))
    return _seeds().map(point)


def tangent_vectors(manifold, point: torch.Tensor) -> st.SearchStrategy[torch.Tensor]:
    """Tangent vectors of ``manifold`` at ``point`` (Gaussian, projected).

    Parameters
    ----------
    manifold : geoopt.Manifold
        the manifold; its ``proju`` projects the Gaussian draw
    point : torch.Tensor
        a point of ``manifold``; the vectors have its shape and dtype

    Returns
    -------
    hypothesis.strategies.SearchStrategy
        a strategy of tangent vectors at ``point``

    Examples
    --------
    >>> import torch
    >>> from hypothesis import given, settings
    >>> from manifold_nets import ObliqueManifold
    >>> from manifold_nets.testing import tangent_vectors
    >>> oblique = ObliqueManifold()
    >>> w = oblique.projx(torch.randn(4, 3, dtype=torch.float64))
    >>> @settings(max_examples=5, database=None)
    ... @given(u=tangent_vectors(oblique, w))
    ... def test_tangent(u):
    ...     assert float((w * u).sum(dim=1).abs().max()) < 1e-12
    >>> test_tangent()
    """
    def vector(seed: int) -> torch.Tensor:
        u = torch.randn(point.shape, generator=torch.Generator().manual_seed(seed),
                        dtype=point.dtype)
        return manifold.proju(point, u)
    return _seeds().map(vector)
