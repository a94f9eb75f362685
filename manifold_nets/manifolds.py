r"""The two symmetry-invariant geometries of the paper as :class:`geoopt.Manifold` classes.

Declare a weight as ``geoopt.ManifoldParameter(w, manifold=...)`` with one of these and
:class:`geoopt.optim.RiemannianSGD` (or :class:`geoopt.optim.RiemannianAdam`) performs
the paper's update:

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
#: to count as on the manifold when state is loaded.
UNIT_NORM_TOL = {
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
    torch.float32: 1e-4,
    torch.float64: 1e-10,
}


def unit_norm_violations(w: torch.Tensor, ndim: int) -> tuple[int, int, float]:
    """How many filters of ``w`` (trailing ``ndim`` dims) have a norm further than
    :data:`UNIT_NORM_TOL` from 1: ``(count, first flat filter index or -1, its norm)``."""
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

    Notes
    -----
    ``transp`` projects onto the new tangent space, so momentum works. ``inner`` is the
    Euclidean inner product summed over each filter. ``projx`` refuses zero and non-finite
    filters with a :class:`ValueError` naming the first one; ``retr`` never divides by
    zero for tangent steps (every filter of ``x + u`` has norm at least 1).

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
        return f"ndim={self.ndim}"

    # -- checks -----------------------------------------------------------------------
    def check_point(self, x: torch.Tensor, *, explain=False):
        ok, reason = super().check_point(x, explain=True)
        if ok and x.dtype not in _FLOAT_DTYPES:
            ok, reason = False, f"`x` has unsupported dtype {x.dtype}"
        return (ok, reason) if explain else ok

    def assert_check_point(self, x: torch.Tensor):
        _check_dtype(x)
        super().assert_check_point(x)

    def _check_point_on_manifold(self, x, *, atol=1e-5, rtol=1e-5):
        norm = math.filter_sqnorm(x, self.ndim).sqrt()
        ok = torch.allclose(norm, torch.ones_like(norm), atol=atol, rtol=rtol)
        if not ok:
            return False, f"some filters do not have unit norm (atol={atol}, rtol={rtol})"
        return True, None

    def _check_vector_on_tangent(self, x, u, *, atol=1e-5, rtol=1e-5):
        inner = (x * u).sum(dim=math.filter_dims(self.ndim))
        ok = torch.allclose(inner, torch.zeros_like(inner), atol=atol, rtol=rtol)
        if not ok:
            return False, f"`<x_i, u_i> != 0` for some filters (atol={atol}, rtol={rtol})"
        return True, None

    # -- geometry ---------------------------------------------------------------------
    def projx(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise every filter; raise ``ValueError`` on a zero or non-finite filter."""
        _check_dtype(x)
        self._assert_check_shape(x.shape, "x")
        largest = x.abs().amax(dim=math.filter_dims(self.ndim), keepdim=True)
        _raise_on_degenerate(largest, self.ndim, "filter", "oblique manifold")
        return math.oblique_projx_safe(x, self.ndim)

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        _check_filter_shapes(x, u, self.ndim, "ObliqueManifold")
        return math.oblique_proju(x, u, self.ndim)

    egrad2rgrad = proju

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return math.oblique_retr(x, u, self.ndim)

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return math.oblique_expmap(x, u, self.ndim)

    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return math.oblique_proju(y, v, self.ndim)

    def inner(self, x, u, v=None, *, keepdim=False) -> torch.Tensor:
        if v is None:
            v = u
        inner = (u * v).sum(dim=math.filter_dims(self.ndim), keepdim=keepdim)
        target = torch.broadcast_shapes(
            x.shape[: x.dim() - self.ndim] + (1,) * self.ndim * keepdim, inner.shape
        )
        return inner.expand(target)

    @__scaling__(ScalingInfo(1))
    def dist(self, x: torch.Tensor, y: torch.Tensor, *, keepdim=False) -> torch.Tensor:
        r"""Geodesic distance of every filter pair, :math:`\arccos\langle x_i, y_i\rangle`."""
        d = math.oblique_dist(x, y, self.ndim)
        return d.reshape(d.shape + (1,) * self.ndim) if keepdim else d

    @__scaling__(ScalingInfo.NotCompatible)
    def random(self, *size, dtype=None, device=None, **kwargs) -> geoopt.ManifoldTensor:
        """A random point: a standard Gaussian tensor with every filter normalised.

        This is the paper's initialisation (every filter uniform on its sphere).
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

    Notes
    -----
    ``retr(x, u) = x + u``, ``transp`` and ``proju``/``projx`` are the identity. A zero
    filter (or column) is a degenerate point of the metric: its Riemannian gradient is
    zero, so SM leaves it at zero, and it contributes zero to :meth:`inner`. No NaN arises.

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
        ok, reason = super().check_point(x, explain=True)
        if ok and x.dtype not in _FLOAT_DTYPES:
            ok, reason = False, f"`x` has unsupported dtype {x.dtype}"
        return (ok, reason) if explain else ok

    def assert_check_point(self, x: torch.Tensor):
        _check_dtype(x)
        super().assert_check_point(x)

    def _check_point_on_manifold(self, x, *, atol=1e-5, rtol=1e-5):
        return True, None

    def _check_vector_on_tangent(self, x, u, *, atol=1e-5, rtol=1e-5):
        return True, None

    def egrad2rgrad(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if x.dim() < self.ndim:
            self._assert_check_shape(x.shape, "x")
        _check_filter_shapes(x, u, self.ndim, "DiagScaledEuclidean")
        return math.scaled_egrad2rgrad(x, u, self.side, self.ndim)

    def inner(self, x, u, v=None, *, keepdim=False) -> torch.Tensor:
        if v is None:
            v = u
        inner = math.scaled_inner(x, u, v, self.side, self.ndim, keepdim=keepdim)
        target = torch.broadcast_shapes(
            x.shape[: x.dim() - self.ndim] + (1,) * self.ndim * keepdim, inner.shape
        )
        return inner.expand(target)

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        _check_dtype(x)
        return x

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return u

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return x + u

    expmap = retr

    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v

    @__scaling__(ScalingInfo(std=-1))
    def random(self, *size, std=1.0, dtype=None, device=None, **kwargs):
        """A random point: a Gaussian tensor with standard deviation ``std``."""
        size = torch.Size(size[0] if len(size) == 1 and not isinstance(size[0], int)
                          else size)
        self._assert_check_shape(size, "x")
        x = torch.randn(size, dtype=dtype, device=device) * std
        return geoopt.ManifoldTensor(x, manifold=self)
