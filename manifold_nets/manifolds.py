r"""The two symmetry-invariant geometries of the paper as :class:`geoopt.Manifold` classes.

Declare a weight as ``geoopt.ManifoldParameter(w, manifold=...)`` with one of these and
:class:`geoopt.optim.RiemannianSGD` (with ``momentum=0``) performs the paper's update
(:class:`geoopt.optim.RiemannianAdam` also runs on them, but is not the paper's update):

================================  ==========================================  ===========
update                            manifold                                    paper
================================  ==========================================  ===========
UN, filters :math:`W_l`           ``ObliqueManifold(ndim)``                   eq. (9)
SM, filters :math:`W_l`           ``DiagScaledEuclidean("left", ndim)``       eqs. (7)-(8)
SM, classifier :math:`\theta`     ``DiagScaledEuclidean("right")``            eqs. (7)-(8)
================================  ==========================================  ===========

Both follow geoopt's shape convention: a manifold owns the trailing ``ndim`` dimensions of
a tensor and every leading dimension is a batch. The math lives in
:mod:`manifold_nets.math`; these classes validate input and delegate.

Examples
--------
>>> import torch
>>> from manifold_nets.manifolds import DiagScaledEuclidean, ObliqueManifold
>>> conv = torch.randn(8, 3, 5, 5)  # a Conv2d weight: 8 filters of shape (3, 5, 5)
>>> w = ObliqueManifold(ndim=3).projx(conv)
>>> torch.allclose(w.flatten(1).norm(dim=1), torch.ones(8))
True
>>> DiagScaledEuclidean("right")  # the classifier theta of a Linear layer
DiagScaledEuclidean(side='right', ndim=2) manifold
"""

from __future__ import annotations

import geoopt
import torch
from geoopt.manifolds.base import Manifold, ScalingInfo

from . import math

__all__ = [
    "ObliqueManifold",
    "DiagScaledEuclidean",
    "UNIT_NORM_TOL",
    "check_unit_norm",
    "unit_norm_violations",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_dtype(x: torch.Tensor, name: str = "x") -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"`{name}` has dtype {x.dtype}; manifold-nets manifolds need a real floating "
            f"dtype ({', '.join(str(d) for d in _FLOAT_DTYPES)}). Convert it with .float()."
        )


def _tolerances(x: torch.Tensor, atol: float, rtol: float) -> tuple[float, float]:
    """The checks' tolerances, never finer than four units of rounding in ``x``'s dtype
    (geoopt's 1e-5 is finer than bfloat16 and float16 can hold a unit norm)."""
    floor = 4 * torch.finfo(x.dtype).eps if x.is_floating_point() else 0.0
    return max(atol, floor), max(rtol, floor)


def _check_ndim(ndim: int, minimum: int, cls: str) -> int:
    if not isinstance(ndim, int) or isinstance(ndim, bool) or ndim < minimum:
        raise ValueError(f"{cls}: ndim must be an integer >= {minimum}, got {ndim!r}")
    return ndim


def _check_filter_shapes(x: torch.Tensor, u: torch.Tensor, ndim: int, cls: str) -> None:
    """Refuse a vector whose filters do not have the point's filter shape (no device sync).

    Leading (batch) dims may broadcast, as in geoopt; the trailing ``ndim`` may not: the
    scaled metric would otherwise broadcast a norm over a vector of another size silently.
    """
    if x.shape[-ndim:] != u.shape[-ndim:] or u.dim() < ndim:
        raise ValueError(
            f"{cls}: `u` has shape {tuple(u.shape)}, `x` has shape {tuple(x.shape)}; their "
            f"trailing {ndim} dim(s) (one filter) must be equal"
        )


def _raise_on_degenerate(size: torch.Tensor, ndim: int, what: str, cls: str) -> None:
    """Raise a ValueError naming the first zero or non-finite filter (one device sync).

    ``size`` is any per-filter magnitude with kept dims (e.g. the largest absolute entry).
    """
    batch = size.shape[: size.dim() - ndim]
    flat = size.reshape(-1)
    finite = torch.isfinite(flat)
    bad = ~finite | (flat <= 0)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        n_bad = int(bad.sum())
        kind = "zero" if bool(finite[first]) else "non-finite"
        raise ValueError(
            f"{what} {math.filter_index(first, batch)} has {kind} norm and cannot lie on the "
            f"{cls} ({n_bad} such {what}s among {flat.numel()}, batch shape {tuple(batch)}); "
            f"re-initialise it with a non-zero, finite {what}."
        )


#: How far from 1 a filter norm of an oblique-manifold parameter may be, per dtype, for it
#: to count as on the manifold when state is loaded (:func:`check_unit_norm`,
#: :func:`manifold_nets.distributed.check_on_manifold`). Other dtypes use ``1e-4``.
UNIT_NORM_TOL = {
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
    torch.float32: 1e-4,
    torch.float64: 1e-10,
}


def unit_norm_violations(w: torch.Tensor, ndim: int) -> tuple[int, int, float]:
    """How many filters of ``w`` (trailing ``ndim`` dims) have a norm further than
    :data:`UNIT_NORM_TOL` from 1: ``(count, first flat filter index or -1, its norm)``.

    The norms are computed in float64, so the count does not depend on rounding in ``w``'s
    dtype; the tolerance is that of ``w``'s dtype.

    Parameters
    ----------
    w : torch.Tensor
        weights, filters in the trailing ``ndim`` dims
    ndim : int
        number of trailing dims that form one filter

    Returns
    -------
    tuple of (int, int, float)
        the number of filters off the unit sphere, the flat index (row-major over the
        leading dims, see :func:`manifold_nets.math.filter_index`) of the first of them,
        and its norm; ``(0, -1, 1.0)`` when every filter has unit norm

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.manifolds import unit_norm_violations
    >>> unit_norm_violations(torch.eye(3), 1)
    (0, -1, 1.0)
    >>> unit_norm_violations(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), 1)
    (1, 1, 2.0)
    """
    tol = UNIT_NORM_TOL.get(w.dtype, 1e-4)
    norm = math.filter_sqnorm(w.detach().to(torch.float64), ndim).sqrt().reshape(-1)
    off = (norm - 1).abs() > tol
    count = int(off.sum())
    if not count:
        return 0, -1, 1.0
    first = int(off.nonzero()[0, 0])
    return count, first, float(norm[first])


def check_unit_norm(w: torch.Tensor, ndim: int, name: str) -> None:
    """Raise :class:`ValueError` unless every filter of ``w`` has norm 1 within
    :data:`UNIT_NORM_TOL` of its dtype; the message names ``name`` and the first filter
    that is off (state loaded from elsewhere: geoopt loads it without a look, and UN would
    then train another network).

    Parameters
    ----------
    w : torch.Tensor
        weights, filters in the trailing ``ndim`` dims
    ndim : int
        number of trailing dims that form one filter
    name : str
        the parameter's name, for the message

    Raises
    ------
    ValueError
        if some filter's norm is further than :data:`UNIT_NORM_TOL` from 1; the message
        names ``name``, the first such filter, its norm and how many filters are off

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.manifolds import check_unit_norm
    >>> check_unit_norm(torch.eye(3), 1, "w")
    >>> check_unit_norm(2 * torch.eye(3), 1, "w")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: filter 0 of `w` has norm 2, not 1 (tolerance 0.0001 for torch.float32; ...
    """
    count, first, norm = unit_norm_violations(w, ndim)
    if count:
        batch = w.shape[: w.dim() - ndim]
        raise ValueError(
            f"filter {math.filter_index(first, batch)} of `{name}` has norm {norm:.6g}, not 1 "
            f"(tolerance {UNIT_NORM_TOL.get(w.dtype, 1e-4):g} for {w.dtype}; {count} of "
            f"{batch.numel()} filters are off): its weights are off the oblique manifold.")


class ObliqueManifold(Manifold):
    r"""The oblique manifold: every filter has unit Euclidean norm (UN, eq. (9)).

    .. math::

        \mathcal{OB} = \{ W : \|w_i\| = 1 \ \forall i \}

    It is a product of unit spheres, one per filter. With a Euclidean gradient
    :math:`\nabla_W L`, one step of :class:`geoopt.optim.RiemannianSGD` is the UN row of
    Table 1:

    .. math::

        \begin{aligned}
        \tilde\nabla_W L &= \Pi_W(\nabla_W L),
            \quad \Pi_W(U)_i = u_i - \langle w_i, u_i\rangle w_i \\
        W^{t+1} &= \mathrm{Orth}(W^t - \lambda \tilde\nabla_W L),
            \quad \mathrm{Orth}(W)_i = w_i / \|w_i\|
        \end{aligned}

    Parameters
    ----------
    ndim : int
        number of trailing dimensions forming one filter. ``1`` (default) for the rows of
        an ``nn.Linear`` weight ``(out, in)``; ``k + 1`` for the output filters
        ``(in, *kernel)`` of an ``nn.ConvNd`` weight (``3`` for ``Conv2d``).

    Raises
    ------
    ValueError
        if ``ndim`` is not an integer of at least 1

    Notes
    -----
    The methods, filter by filter (all delegate to :mod:`manifold_nets.math`):

    - :meth:`projx`: :math:`\mathrm{Orth}`; refuses zero and non-finite filters with a
      :class:`ValueError` naming the first one;
    - :meth:`proju` (also bound as :meth:`egrad2rgrad`): :math:`\Pi_W`, the projection
      onto the tangent space, which turns the Euclidean gradient into the Riemannian one;
    - :meth:`retr`: :math:`\mathrm{Orth}(W + U)`, the UN step; it never divides by zero
      for tangent steps (every filter of ``x + u`` has norm at least 1);
    - :meth:`expmap`: the true exponential map of the sphere (cos / sin along a great
      circle); geoopt's optimisers step with :meth:`retr`, not with it;
    - :meth:`transp`: projection onto the new tangent space, so momentum works;
    - :meth:`inner`: the Euclidean inner product summed over each filter (the metric the
      sphere inherits);
    - :meth:`dist`: the geodesic (great-circle) distance of every filter pair;
    - :meth:`random`: Gaussian filters, normalised.

    Examples
    --------
    >>> import torch, geoopt
    >>> from manifold_nets import ObliqueManifold
    >>> oblique = ObliqueManifold()
    >>> w = geoopt.ManifoldParameter(oblique.projx(torch.randn(4, 3)), manifold=oblique)
    >>> w.sum().backward()
    >>> geoopt.optim.RiemannianSGD([w], lr=0.1).step()
    >>> torch.allclose(w.detach().norm(dim=1), torch.ones(4))
    True
    """

    __scaling__ = Manifold.__scaling__.copy()
    name = "Oblique"
    reversible = False

    def __init__(self, ndim: int = 1):
        super().__init__()
        self.ndim = _check_ndim(ndim, 1, "ObliqueManifold")

    def extra_repr(self) -> str:
        """The arguments shown in the manifold's ``repr``.

        Returns
        -------
        str
            ``"ndim=<ndim>"``

        Examples
        --------
        >>> from manifold_nets import ObliqueManifold
        >>> ObliqueManifold(3).extra_repr()
        'ndim=3'
        >>> ObliqueManifold(3)
        Oblique(ndim=3) manifold
        """
        return f"ndim={self.ndim}"

    # -- checks -----------------------------------------------------------------------
    def check_point(self, x: torch.Tensor, *, explain=False):
        """Whether ``x`` can be a point of this manifold: its shape (at least ``ndim``
        dims) and a real floating dtype. The unit norms are not checked here; use
        ``check_point_on_manifold`` for them.

        Parameters
        ----------
        x : torch.Tensor
            the candidate point
        explain : bool
            also return the reason when it cannot

        Returns
        -------
        bool or tuple of (bool, str or None)
            the answer, or ``(answer, reason)`` with ``explain=True``

        Examples
        --------
        >>> import torch
        >>> from manifold_nets import ObliqueManifold
        >>> ObliqueManifold().check_point(torch.randn(4, 3))
        True
        >>> ObliqueManifold().check_point(torch.zeros(4, 3, dtype=torch.int64), explain=True)
        (False, '`x` has unsupported dtype torch.int64')
        """
        ok, reason = super().check_point(x, explain=True)
        if ok and x.dtype not in _FLOAT_DTYPES:
            ok, reason = False, f"`x` has unsupported dtype {x.dtype}"
        return (ok, reason) if explain else ok

    def assert_check_point(self, x: torch.Tensor):
        """Raise unless ``x`` can be a point of this manifold (shape and dtype, as
        :meth:`check_point`).

        Parameters
        ----------
        x : torch.Tensor
            the candidate point

        Raises
        ------
        TypeError
            if ``x`` does not have a real floating dtype
        ValueError
            if ``x`` has fewer dims than the manifold owns

        Examples
        --------
        >>> import torch
        >>> from manifold_nets import ObliqueManifold
        >>> ObliqueManifold().assert_check_point(torch.randn(4, 3))
        >>> ObliqueManifold().assert_check_point(torch.zeros(4, 3, dtype=torch.int64))
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: `x` has dtype torch.int64; manifold-nets manifolds need a real floating ...
        """
        _check_dtype(x)
        super().assert_check_point(x)

    def _check_point_on_manifold(self, x, *, atol=1e-5, rtol=1e-5):
        atol, rtol = _tolerances(x, atol, rtol)
        norm = math.filter_sqnorm(x.float() if x.itemsize < 4 else x, self.ndim).sqrt()
        ok = torch.allclose(norm, torch.ones_like(norm), atol=atol, rtol=rtol)
        if not ok:
            return False, f"some filters do not have unit norm (atol={atol}, rtol={rtol})"
        return True, None

    def _check_vector_on_tangent(self, x, u, *, atol=1e-5, rtol=1e-5):
        atol, rtol = _tolerances(x, atol, rtol)
        if x.itemsize < 4:
            x, u = x.float(), u.float()
        inner = (x * u).sum(dim=math.filter_dims(self.ndim))
        ok = torch.allclose(inner, torch.zeros_like(inner), atol=atol, rtol=rtol)
        if not ok:
            return False, f"`<x_i, u_i> != 0` for some filters (atol={atol}, rtol={rtol})"
        return True, None

    # -- geometry ---------------------------------------------------------------------
    def projx(self, x: torch.Tensor) -> torch.Tensor:
        r"""Normalise every filter; raise ``ValueError`` on a zero or non-finite filter.

        .. math::

            \mathrm{Orth}(W)_i = \frac{w_i}{\|w_i\|}

        computed by :func:`manifold_nets.math.oblique_projx_safe`, so filters whose squared
        norm would overflow or underflow are normalised too.

        Parameters
        ----------
        x : torch.Tensor
            weights, filters in the trailing ``ndim`` dims

        Returns
        -------
        torch.Tensor
            a new tensor whose every filter has unit norm

        Raises
        ------
        TypeError
            if ``x`` does not have a real floating dtype
        ValueError
            if ``x`` has fewer than ``ndim`` dims, or a filter is zero or has a non-finite
            entry (the message names the first such filter)

        Examples
        --------
        >>> import torch
        >>> from manifold_nets import ObliqueManifold
        >>> w = ObliqueManifold().projx(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
        >>> [round(n, 4) for n in w.norm(dim=1).tolist()]
        [1.0, 1.0]
        >>> ObliqueManifold().projx(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: filter 1 has zero norm and cannot lie on the oblique manifold ...
        """
        _check_dtype(x)
        self._assert_check_shape(x.shape, "x")
        largest = x.abs().amax(dim=math.filter_dims(self.ndim), keepdim=True)
        _raise_on_degenerate(largest, self.ndim, "filter", "oblique manifold")
        return math.oblique_projx_safe(x, self.ndim)

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""Project ``u`` onto the tangent space at ``x``, filter by filter; also bound as
        ``egrad2rgrad``.

        .. math::

            \Pi_W(U)_i = u_i - \langle w_i, u_i \rangle\, w_i,
            \qquad \text{i.e.} \quad \Pi_W(U) = U - \mathrm{Diag}(\mathrm{diag}(U W^T))\, W

        for the rows :math:`w_i` of :math:`W`. The sphere's metric is the Euclidean one,
        so the Riemannian gradient is the projected Euclidean gradient:
        ``egrad2rgrad(x, g) = proju(x, g)``, the UN column of Table 1
        (:math:`\tilde\nabla_W L = \Pi_W(\nabla_W L)`).

        Parameters
        ----------
        x : torch.Tensor
            a point: every filter (trailing ``ndim`` dims) of unit norm
        u : torch.Tensor
            a vector (e.g. the Euclidean gradient); its leading dims may broadcast against
            those of ``x``, its trailing ``ndim`` must equal theirs

        Returns
        -------
        torch.Tensor
            the tangent vector :math:`\Pi_W(U)`: every filter orthogonal to that of ``x``

        Raises
        ------
        ValueError
            if the filters of ``u`` and ``x`` have different shapes

        Examples
        --------
        >>> import torch
        >>> from manifold_nets import ObliqueManifold
        >>> oblique = ObliqueManifold()
        >>> w = oblique.random(4, 3)
        >>> rgrad = oblique.egrad2rgrad(w, torch.randn(4, 3))
        >>> round(float((w * rgrad).sum(dim=1).abs().max()), 5)  # <w_i, rgrad_i> = 0
        0.0
        >>> torch.allclose(oblique.proju(w, rgrad), rgrad)
        True
        """
        _check_filter_shapes(x, u, self.ndim, "ObliqueManifold")
        return math.oblique_proju(x, u, self.ndim)

    egrad2rgrad = proju

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""The retraction of the UN update: step, then renormalise every filter.

        .. math::

            R_W(U) = \mathrm{Orth}(W + U), \qquad
            \mathrm{Orth}(W)_i = \frac{w_i}{\|w_i\|}

        With :math:`U = -\lambda \tilde\nabla_W L` this is eq. (9). It is what
        :class:`geoopt.optim.RiemannianSGD` calls (``retr``, or ``retr_transp`` with
        momentum). It agrees with :meth:`expmap` to first order in :math:`U`.

        Parameters
        ----------
        x : torch.Tensor
            a point: every filter (trailing ``ndim`` dims) of unit norm
        u : torch.Tensor
            a tangent vector at ``x``

        Returns
        -------
        torch.Tensor
            a new point: every filter of unit norm

        Examples
        --------
        >>> import torch
        >>> from manifold_nets import ObliqueManifold
        >>> oblique = ObliqueManifold()
        >>> w = oblique.random(4, 3)
        >>> y = oblique.retr(w, oblique.proju(w, torch.randn(4, 3)))
        >>> torch.allclose(y.norm(dim=1), torch.ones(4))
        True
        """
        _check_filter_shapes(x, u, self.ndim, "ObliqueManifold")
        return math.oblique_retr(x, u, self.ndim)

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""The exponential map of the product of spheres, filter by filter.

        .. math::

            \mathrm{Exp}_W(U)_i = \cos(\|u_i\|)\, w_i
                + \sin(\|u_i\|)\, \frac{u_i}{\|u_i\|}

        This is the true exponential map (each filter moves a distance :math:`\|u_i\|`
        along a great circle), not the retraction: filters with a (near) zero step use
        :meth:`retr`, which agrees with it to rounding there
        (:func:`manifold_nets.math.oblique_expmap`). The UN update of the paper and
        geoopt's optimisers use :meth:`retr`; this map is for code that needs geodesics.

        Parameters
        ----------
        x : torch.Tensor
            a point: every filter (trailing ``ndim`` dims) of unit norm
        u : torch.Tensor
            a tangent vector at ``x``

        Returns
        -------
        torch.Tensor
            a new point: every filter of unit norm, at geodesic distance
            :math:`\|u_i\|` (for :math:`\|u_i\| \le \pi`) from :math:`w_i`

        Examples
        --------
        >>> import torch
        >>> from manifold_nets import ObliqueManifold
        >>> oblique = ObliqueManifold()
        >>> w = oblique.random(4, 3)
        >>> u = 0.5 * oblique.proju(w, torch.randn(4, 3))
        >>> torch.allclose(oblique.dist(w, oblique.expmap(w, u)), u.norm(dim=1), atol=1e-5)
        True
        """
        _check_filter_shapes(x, u, self.ndim, "ObliqueManifold")
        return math.oblique_expmap(x, u, self.ndim)

    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r"""Vector transport by projection: :math:`\mathcal{T}_{x \to y}(v) = \Pi_y(v)`.

        Moves a tangent vector at ``x`` (e.g. the momentum buffer) to the tangent space at
        ``y``: :math:`v_i - \langle y_i, v_i \rangle\, y_i` per filter. ``x`` is not used.

        Parameters
        ----------
        x : torch.Tensor
            the point ``v`` is tangent at
        y : torch.Tensor
            the point to transport to: every filter of unit norm
        v : torch.Tensor
            a tangent vector at ``x``

        Returns
        -------
        torch.Tensor
            a tangent vector at ``y``

        Examples
        --------
        >>> import torch
        >>> from manifold_nets import ObliqueManifold
        >>> oblique = ObliqueManifold()
        >>> x = oblique.random(4, 3)
        >>> v = oblique.proju(x, torch.randn(4, 3))
        >>> y = oblique.retr(x, v)
        >>> round(float((y * oblique.transp(x, y, v)).sum(dim=1).abs().max()), 5)
        0.0
        """
        return math.oblique_proju(y, v, self.ndim)

    def inner(self, x, u, v=None, *, keepdim=False) -> torch.Tensor:
        r"""The sphere's metric: the Euclidean inner product of every filter pair.

        .. math::

            \langle U, V \rangle_W = \langle u_i, v_i \rangle \quad \text{per filter } i

        Parameters
        ----------
        x : torch.Tensor
            the point (only its shape is used: the result broadcasts to its batch dims)
        u : torch.Tensor
            a tangent vector at ``x``
        v : torch.Tensor, optional
            a second tangent vector; ``u`` if not given (the squared norm)
        keepdim : bool
            keep the filter dims (of size 1)

        Returns
        -------
        torch.Tensor
            one inner product per filter: the batch (leading) dims of ``x``, plus ``ndim``
            dims of size 1 with ``keepdim=True``

        Examples
        --------
        >>> import torch
        >>> from manifold_nets import ObliqueManifold
        >>> x = ObliqueManifold().random(4, 3)
        >>> u = torch.ones(4, 3)
        >>> ObliqueManifold().inner(x, u).tolist()
        [3.0, 3.0, 3.0, 3.0]
        >>> ObliqueManifold().inner(x, u, keepdim=True).shape
        torch.Size([4, 1])
        """
        if v is None:
            v = u
        _check_filter_shapes(x, u, self.ndim, "ObliqueManifold")
        _check_filter_shapes(x, v, self.ndim, "ObliqueManifold")
        inner = (u * v).sum(dim=math.filter_dims(self.ndim), keepdim=keepdim)
        target = torch.broadcast_shapes(
            x.shape[: x.dim() - self.ndim] + (1,) * self.ndim * keepdim, inner.shape
        )
        return inner.expand(target)

    @__scaling__(ScalingInfo(1))
    def dist(self, x: torch.Tensor, y: torch.Tensor, *, keepdim=False) -> torch.Tensor:
        r"""Geodesic distance of every filter pair, :math:`\arccos\langle x_i, y_i\rangle`.

        Parameters
        ----------
        x, y : torch.Tensor
            two points: every filter (trailing ``ndim`` dims) of unit norm
        keepdim : bool
            keep the filter dims (of size 1)

        Returns
        -------
        torch.Tensor
            one great-circle distance in :math:`[0, \pi]` per filter (the inner product
            is clamped to :math:`[-1, 1]`, so rounding never gives NaN)

        Examples
        --------
        >>> import torch
        >>> from manifold_nets import ObliqueManifold
        >>> x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        >>> y = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
        >>> [round(d, 4) for d in ObliqueManifold().dist(x, y).tolist()]  # pi/2 and pi
        [1.5708, 3.1416]
        >>> ObliqueManifold().dist(x, y, keepdim=True).shape
        torch.Size([2, 1])
        """
        _check_filter_shapes(x, y, self.ndim, "ObliqueManifold")
        d = math.oblique_dist(x, y, self.ndim)
        return d.reshape(d.shape + (1,) * self.ndim) if keepdim else d

    @__scaling__(ScalingInfo.NotCompatible)
    def random(self, *size, dtype=None, device=None, **kwargs) -> geoopt.ManifoldTensor:
        """A random point: a standard Gaussian tensor with every filter normalised.

        This is the paper's initialisation (every filter uniform on its sphere).

        Parameters
        ----------
        *size : int or tuple of int
            the shape, at least ``ndim`` dims (``random(4, 3)`` or ``random((4, 3))``)
        dtype : torch.dtype, optional
            floating dtype (default: torch's default)
        device : torch.device, optional
            device (default: torch's default)
        **kwargs
            accepted for geoopt's signature and ignored

        Returns
        -------
        geoopt.ManifoldTensor
            the point, on this manifold

        Raises
        ------
        ValueError
            if ``size`` has fewer than ``ndim`` dims

        Examples
        --------
        >>> import torch
        >>> from manifold_nets import ObliqueManifold
        >>> w = ObliqueManifold(ndim=3).random(8, 3, 5, 5)
        >>> type(w).__name__, torch.allclose(w.flatten(1).norm(dim=1), torch.ones(8))
        ('ManifoldTensor', True)
        """
        size = torch.Size(size[0] if len(size) == 1 and not isinstance(size[0], int)
                          else size)
        self._assert_check_shape(size, "x")
        x = torch.randn(size, dtype=dtype, device=device)
        return geoopt.ManifoldTensor(math.oblique_projx(x, self.ndim), manifold=self)


class DiagScaledEuclidean(Manifold):
    r"""Euclidean space with the paper's scaled metric (SM, eqs. (7)-(8)).

    For filters :math:`W` (``side="left"``) the metric is
    :math:`G_W = \mathrm{Diag}(\mathrm{diag}(W W^T))^{-1}`; for the soft-max classifier
    :math:`\theta` (``side="right"``) it acts on the columns,
    :math:`G_\theta = \mathrm{Diag}(\mathrm{diag}(\theta^T \theta))^{-1}`. One step of
    :class:`geoopt.optim.RiemannianSGD` is the SM row of Table 1:

    .. math::

        \begin{aligned}
        W^{t+1} &= W^t - \lambda\, \mathrm{Diag}(\|w_i\|^2)\, \nabla_W L \\
        \theta^{t+1} &= \theta^t - \lambda\, \nabla_\theta L\,
            \mathrm{Diag}(\|\theta_{:,j}\|^2)
        \end{aligned}

    The metric is invariant under positive rescalings of the filters (left) or columns
    (right), which makes the update equivariant under the paper's reparameterisations.

    Parameters
    ----------
    side : {"left", "right"}
        ``"left"`` (default): the metric scales filters. ``"right"``: the trailing
        ``ndim >= 2`` dims form the matrix :math:`\theta` ``(out, in, *kernel)`` and the
        metric scales its columns ``theta[:, j]``.
    ndim : int, optional
        trailing dims owned by one point. Defaults to ``1`` for ``"left"`` (rows of a
        ``Linear`` weight) and ``2`` for ``"right"``. Use ``k + 1`` (left) or ``k + 2``
        (right) for ``ConvNd`` weights.

    Raises
    ------
    ValueError
        if ``side`` is not ``"left"`` or ``"right"``, or ``ndim`` is not an integer of at
        least 1 (left) or 2 (right)

    Notes
    -----
    The methods (the math is in :mod:`manifold_nets.math`):

    - :meth:`egrad2rgrad`: :math:`G^{-1}` times the Euclidean gradient, eq. (8): the SM
      update's direction;
    - :meth:`inner`: the scaled metric :math:`\mathrm{Tr}(U^T G_W V)` (left) or
      :math:`\mathrm{Tr}(U G_\theta V^T)` (right);
    - :meth:`retr` (also bound as :meth:`expmap`): ``x + u``, the retraction of the SM
      update. It is *not* the exponential map of the scaled metric, whose geodesics are
      not straight lines (see :meth:`retr`);
    - :meth:`projx`, :meth:`proju` and :meth:`transp`: the identity (every tensor is a
      point, every tensor a tangent vector);
    - :meth:`random`: a Gaussian tensor;
    - ``dist`` is not implemented (geoopt's ``NotImplementedError``).

    A zero filter (or column) is a degenerate point of the metric: its Riemannian gradient
    is zero, so SM leaves it at zero, and it contributes zero to :meth:`inner`. No NaN
    arises.

    Examples
    --------
    >>> import torch, geoopt
    >>> from manifold_nets import DiagScaledEuclidean
    >>> w = geoopt.ManifoldParameter(torch.tensor([[3.0, 4.0]]), manifold=DiagScaledEuclidean())
    >>> (w * torch.tensor([[1.0, 0.0]])).sum().backward()
    >>> geoopt.optim.RiemannianSGD([w], lr=0.01).step()  # step = lr * ||w||^2 * grad
    >>> w.detach()
    tensor([[2.7500, 4.0000]])
    """

    __scaling__ = Manifold.__scaling__.copy()
    name = "DiagScaledEuclidean"
    reversible = True

    def __init__(self, side: str = "left", ndim: int | None = None):
        super().__init__()
        if side not in ("left", "right"):
            raise ValueError(f"DiagScaledEuclidean: side must be 'left' or 'right', got {side!r}")
        self.side = side
        minimum = 2 if side == "right" else 1
        self.ndim = _check_ndim(minimum if ndim is None else ndim, minimum,
                                f"DiagScaledEuclidean(side={side!r})")

    def extra_repr(self) -> str:
        """The arguments shown in the manifold's ``repr``.

        Returns
        -------
        str
            ``"side=<side>, ndim=<ndim>"``

        Examples
        --------
        >>> from manifold_nets import DiagScaledEuclidean
        >>> DiagScaledEuclidean("right", ndim=4).extra_repr()
        "side='right', ndim=4"
        """
        return f"side={self.side!r}, ndim={self.ndim}"

    def _check_shape(self, shape, name):
        ok, reason = super()._check_shape(shape, name)
        if not ok and self.side == "right":
            reason = (
                f"`{name}` has shape {tuple(shape)}, but side='right' needs the classifier "
                f"matrix theta in its trailing {self.ndim} dims (at least 2-D)"
            )
        return ok, reason

    def check_point(self, x: torch.Tensor, *, explain=False):
        """Whether ``x`` can be a point of this manifold: its shape (at least ``ndim``
        dims) and a real floating dtype. Every such tensor is a point: the scaled metric
        lives on all of Euclidean space.

        Parameters
        ----------
        x : torch.Tensor
            the candidate point
        explain : bool
            also return the reason when it cannot

        Returns
        -------
        bool or tuple of (bool, str or None)
            the answer, or ``(answer, reason)`` with ``explain=True``

        Examples
        --------
        >>> import torch
        >>> from manifold_nets import DiagScaledEuclidean
        >>> DiagScaledEuclidean("right").check_point(torch.randn(3, 4))
        True
        >>> DiagScaledEuclidean("right").check_point(torch.randn(4), explain=True)[0]
        False
        """
        ok, reason = super().check_point(x, explain=True)
        if ok and x.dtype not in _FLOAT_DTYPES:
            ok, reason = False, f"`x` has unsupported dtype {x.dtype}"
        return (ok, reason) if explain else ok

    def assert_check_point(self, x: torch.Tensor):
        """Raise unless ``x`` can be a point of this manifold (shape and dtype, as
        :meth:`check_point`).

        Parameters
        ----------
        x : torch.Tensor
            the candidate point

        Raises
        ------
        TypeError
            if ``x`` does not have a real floating dtype
        ValueError
            if ``x`` has fewer dims than the manifold owns

        Examples
        --------
        >>> import torch
        >>> from manifold_nets import DiagScaledEuclidean
        >>> DiagScaledEuclidean().assert_check_point(torch.randn(4, 3))
        >>> DiagScaledEuclidean().assert_check_point(torch.zeros(4, 3, dtype=torch.int64))
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: `x` has dtype torch.int64; manifold-nets manifolds need a real floating ...
        """
        _check_dtype(x)
        super().assert_check_point(x)

    def _check_point_on_manifold(self, x, *, atol=1e-5, rtol=1e-5):
        return True, None

    def _check_vector_on_tangent(self, x, u, *, atol=1e-5, rtol=1e-5):
        return True, None

    def egrad2rgrad(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""The Riemannian gradient of the scaled metric: the SM direction, eq. (8).

        .. math::

            \begin{aligned}
            \text{left:}\quad \tilde\nabla_W L &= G_W^{-1} \nabla_W L
                = \mathrm{Diag}(\|w_i\|^2)\, \nabla_W L \\
            \text{right:}\quad \tilde\nabla_\theta L &= \nabla_\theta L\, G_\theta^{-1}
                = \nabla_\theta L\, \mathrm{Diag}(\|\theta_{:,j}\|^2)
            \end{aligned}

        It is the vector that represents the Euclidean gradient under the metric:
        ``inner(x, egrad2rgrad(x, g), v) == (g * v).sum()`` for every ``v``. See
        :func:`manifold_nets.math.scaled_egrad2rgrad` for zero and huge filters.

        Parameters
        ----------
        x : torch.Tensor
            the point :math:`W` or :math:`\theta`
        u : torch.Tensor
            the Euclidean gradient at ``x``; its leading dims may broadcast against those
            of ``x``, its trailing ``ndim`` must equal theirs

        Returns
        -------
        torch.Tensor
            the Riemannian gradient, of the shape of ``u``

        Raises
        ------
        ValueError
            if ``x`` has fewer than ``ndim`` dims, or the trailing ``ndim`` dims of ``u``
            and ``x`` differ

        Examples
        --------
        >>> import torch
        >>> from manifold_nets import DiagScaledEuclidean
        >>> x = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
        >>> DiagScaledEuclidean().egrad2rgrad(x, torch.ones(2, 2)).tolist()  # rows: 25, 4
        [[25.0, 25.0], [4.0, 4.0]]
        >>> DiagScaledEuclidean("right").egrad2rgrad(x, torch.ones(2, 2)).tolist()  # 9, 20
        [[9.0, 20.0], [9.0, 20.0]]
        """
        if x.dim() < self.ndim:
            self._assert_check_shape(x.shape, "x")
        _check_filter_shapes(x, u, self.ndim, "DiagScaledEuclidean")
        return math.scaled_egrad2rgrad(x, u, self.side, self.ndim)

    def inner(self, x, u, v=None, *, keepdim=False) -> torch.Tensor:
        r"""The scaled metric of eq. (8).

        .. math::

            \begin{aligned}
            \text{left:}\quad \langle U, V \rangle_W &= \mathrm{Tr}(U^T G_W V)
                = \frac{\langle u_i, v_i \rangle}{\|w_i\|^2}
                \quad \text{per filter } i \\
            \text{right:}\quad \langle U, V \rangle_\theta &= \mathrm{Tr}(U G_\theta V^T)
                = \sum_j \frac{\langle u_{:,j}, v_{:,j} \rangle}{\|\theta_{:,j}\|^2}
            \end{aligned}

        A zero filter (or column) contributes zero
        (:func:`manifold_nets.math.scaled_inner`).

        Parameters
        ----------
        x : torch.Tensor
            the point :math:`W` or :math:`\theta`
        u : torch.Tensor
            a tangent vector at ``x``
        v : torch.Tensor, optional
            a second tangent vector; ``u`` if not given (the squared norm)
        keepdim : bool
            keep the summed dims (of size 1)

        Returns
        -------
        torch.Tensor
            one inner product per point (per filter for ``"left"``, per matrix for
            ``"right"``), broadcast to the batch dims of ``x``; plus ``ndim`` dims of
            size 1 with ``keepdim=True``

        Examples
        --------
        >>> import torch
        >>> from manifold_nets import DiagScaledEuclidean
        >>> sm = DiagScaledEuclidean()
        >>> x, g, v = torch.randn(3, 4, 5, dtype=torch.float64).unbind()
        >>> torch.allclose(sm.inner(x, sm.egrad2rgrad(x, g), v), (g * v).sum(dim=1))
        True
        >>> sm.inner(x, v, keepdim=True).shape
        torch.Size([4, 1])
        """
        if v is None:
            v = u
        inner = math.scaled_inner(x, u, v, self.side, self.ndim, keepdim=keepdim)
        target = torch.broadcast_shapes(
            x.shape[: x.dim() - self.ndim] + (1,) * self.ndim * keepdim, inner.shape
        )
        return inner.expand(target)

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        """The identity: every tensor of a real floating dtype is a point.

        Parameters
        ----------
        x : torch.Tensor
            weights

        Returns
        -------
        torch.Tensor
            ``x`` itself

        Raises
        ------
        TypeError
            if ``x`` does not have a real floating dtype

        Examples
        --------
        >>> import torch
        >>> from manifold_nets import DiagScaledEuclidean
        >>> x = torch.randn(4, 3)
        >>> DiagScaledEuclidean().projx(x) is x
        True
        """
        _check_dtype(x)
        return x

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The identity: every tensor is a tangent vector.

        The scaled metric changes the Riemannian gradient (:meth:`egrad2rgrad`), not the
        tangent space, which is all of Euclidean space.

        Parameters
        ----------
        x : torch.Tensor
            the point (not used)
        u : torch.Tensor
            a vector

        Returns
        -------
        torch.Tensor
            ``u`` itself

        Examples
        --------
        >>> import torch
        >>> from manifold_nets import DiagScaledEuclidean
        >>> x, u = torch.randn(2, 4, 3).unbind()
        >>> DiagScaledEuclidean().proju(x, u) is u
        True
        """
        return u

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""The retraction of the SM update, :math:`R_x(u) = x + u`; also bound as
        ``expmap``.

        With :math:`u = -\lambda\, \tilde\nabla L` (:meth:`egrad2rgrad`) it gives the SM
        row of Table 1, :math:`W^{t+1} = W^t - \lambda\, \mathrm{Diag}(\|w_i\|^2)
        \nabla_W L`, the update of the paper.

        ``expmap`` is this same function, so it is a retraction, *not* the exponential map
        of the scaled metric: that metric, :math:`\|u_i\|^2 / \|w_i\|^2` per filter, makes
        the log of a filter's norm and its direction move independently, so its geodesics
        scale the norm exponentially and turn the direction along a great circle;
        :math:`x + u` agrees with them to first order in :math:`u` only. The paper's
        update is the first-order step, so both names give it, whichever of them a caller
        uses (geoopt's optimisers call ``retr`` / ``retr_transp``).

        Parameters
        ----------
        x : torch.Tensor
            the point :math:`W` or :math:`\theta`
        u : torch.Tensor
            the step, e.g. :math:`-\lambda\, \tilde\nabla L`

        Returns
        -------
        torch.Tensor
            ``x + u``

        Examples
        --------
        >>> import torch
        >>> from manifold_nets import DiagScaledEuclidean
        >>> sm = DiagScaledEuclidean()
        >>> w = torch.tensor([[3.0, 4.0]])
        >>> step = -0.01 * sm.egrad2rgrad(w, torch.tensor([[1.0, 0.0]]))  # lr 0.01
        >>> sm.retr(w, step).tolist(), sm.expmap(w, step).tolist()
        ([[2.75, 4.0]], [[2.75, 4.0]])
        """
        return x + u

    expmap = retr

    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Vector transport: the identity (every tangent space is all of Euclidean space).

        The momentum buffer of geoopt's optimisers is carried over unchanged, as in
        :class:`manifold_nets.InvariantSGD`.

        Parameters
        ----------
        x : torch.Tensor
            the point ``v`` is tangent at (not used)
        y : torch.Tensor
            the point to transport to (not used)
        v : torch.Tensor
            a tangent vector at ``x``

        Returns
        -------
        torch.Tensor
            ``v`` itself

        Examples
        --------
        >>> import torch
        >>> from manifold_nets import DiagScaledEuclidean
        >>> x, y, v = torch.randn(3, 4, 2).unbind()
        >>> DiagScaledEuclidean().transp(x, y, v) is v
        True
        """
        return v

    @__scaling__(ScalingInfo(std=-1))
    def random(self, *size, std=1.0, dtype=None, device=None, **kwargs):
        """A random point: a Gaussian tensor with standard deviation ``std``.

        Parameters
        ----------
        *size : int or tuple of int
            the shape, at least ``ndim`` dims (``random(4, 3)`` or ``random((4, 3))``)
        std : float
            standard deviation of every entry (default 1)
        dtype : torch.dtype, optional
            floating dtype (default: torch's default)
        device : torch.device, optional
            device (default: torch's default)
        **kwargs
            accepted for geoopt's signature and ignored

        Returns
        -------
        geoopt.ManifoldTensor
            the point, on this manifold

        Raises
        ------
        ValueError
            if ``size`` has fewer than ``ndim`` dims

        Examples
        --------
        >>> from manifold_nets import DiagScaledEuclidean
        >>> theta = DiagScaledEuclidean("right").random(10, 32, std=0.1)
        >>> type(theta).__name__, tuple(theta.shape), theta.manifold.side
        ('ManifoldTensor', (10, 32), 'right')
        """
        size = torch.Size(size[0] if len(size) == 1 and not isinstance(size[0], int)
                          else size)
        self._assert_check_shape(size, "x")
        x = torch.randn(size, dtype=dtype, device=device) * std
        return geoopt.ManifoldTensor(x, manifold=self)
