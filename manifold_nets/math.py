r"""The paper's updates as pure functions on tensors.

Every function here acts *per filter*. A filter is the block formed by the trailing
``ndim`` dimensions of a tensor; all leading dimensions are a batch. For an
``nn.Linear`` weight ``W`` of shape ``(out, in)`` and ``ndim=1`` the filters are the
rows :math:`w_i` of ``W``; for an ``nn.Conv2d`` weight ``(out, in, kh, kw)`` and
``ndim=3`` each output channel is one filter. A leading "runs" dimension (several
networks trained at once) is just more batch.

The functions follow Badrinarayanan, Mishra and Cipolla, *Symmetry-invariant
optimization in deep networks* (ICLR 2016 workshop), Table 1 and eqs. (7)-(9).
:mod:`manifold_nets.manifolds` wraps them in :class:`geoopt.Manifold` classes.

None of these functions synchronises with the device: there are no Python branches on
tensor values. Degenerate points (zero filters) are handled with :func:`torch.where` and
documented per function.
"""

from __future__ import annotations

import torch

__all__ = [
    "filter_dims",
    "filter_index",
    "column_dims",
    "filter_sqnorm",
    "column_sqnorm",
    "oblique_projx",
    "oblique_projx_",
    "oblique_projx_safe",
    "oblique_proju",
    "oblique_retr",
    "oblique_expmap",
    "oblique_dist",
    "scaled_egrad2rgrad",
    "scaled_inner",
    "scaled_sqnorm",
]

#: Norms below this are treated as zero when dividing (per dtype), as in ``geoopt.Sphere``.
EPS = {
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
    torch.float32: 1e-12,
    torch.float64: 1e-30,
}


def filter_dims(ndim: int) -> tuple[int, ...]:
    """Dimensions that form one filter: the trailing ``ndim`` ones."""
    return tuple(range(-ndim, 0))


def filter_index(flat: int, batch_shape: torch.Size) -> int | tuple[int, ...]:
    """The readable index of filter ``flat`` (counted over the batch dims, row-major): an
    ``int`` for one batch dim, else a tuple, as error messages name a filter.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.math import filter_index
    >>> filter_index(5, torch.Size([2, 3]))
    (1, 2)
    """
    if len(batch_shape) <= 1:
        return flat
    idx = []
    for size in reversed(batch_shape):
        idx.append(flat % size)
        flat //= size
    return tuple(reversed(idx))


def column_dims(ndim: int) -> tuple[int, ...]:
    """Dimensions summed over for one *column* of a matrix acting from the right.

    The trailing ``ndim >= 2`` dimensions are ``(out, in, *kernel)``; column ``j`` is
    ``theta[..., :, j, *kernel]``, so the sum runs over ``out`` and the kernel dims.
    """
    return (-ndim,) + tuple(range(-ndim + 2, 0))


def filter_sqnorm(x: torch.Tensor, ndim: int = 1) -> torch.Tensor:
    r"""Squared Euclidean norm of every filter, :math:`\|w_i\|^2`, with kept dims."""
    return torch.linalg.vector_norm(x, dim=filter_dims(ndim), keepdim=True).square_()


def column_sqnorm(x: torch.Tensor, ndim: int = 2) -> torch.Tensor:
    r"""Squared norm of every column, :math:`\|\theta_{:,j}\|^2`, with kept dims."""
    return torch.linalg.vector_norm(x, dim=column_dims(ndim), keepdim=True).square_()


def oblique_projx(x: torch.Tensor, ndim: int = 1) -> torch.Tensor:
    r"""Normalise every filter to unit norm: the paper's :math:`\mathrm{Orth}`.

    .. math::

        \mathrm{Orth}(W)_i = \frac{w_i}{\|w_i\|}

    Parameters
    ----------
    x : torch.Tensor
        weights, filters in the trailing ``ndim`` dims
    ndim : int
        number of trailing dims that form one filter

    Returns
    -------
    torch.Tensor
        a tensor whose every filter has unit norm. A zero filter stays zero (it has no
        direction); :meth:`manifold_nets.ObliqueManifold.projx` refuses such input.
    """
    norm = torch.linalg.vector_norm(x, dim=filter_dims(ndim), keepdim=True)
    return x * norm.clamp_min_(EPS[x.dtype]).reciprocal_()  # multiply: cheaper than divide


def oblique_projx_(x: torch.Tensor, ndim: int = 1) -> torch.Tensor:
    r""":func:`oblique_projx` in place: :math:`w_i \leftarrow w_i / \|w_i\|` for every
    filter of ``x``, which is returned. A zero filter stays zero."""
    norm = torch.linalg.vector_norm(x, dim=filter_dims(ndim), keepdim=True)
    return x.mul_(norm.clamp_min_(EPS[x.dtype]).reciprocal_())


def oblique_projx_safe(x: torch.Tensor, ndim: int = 1) -> torch.Tensor:
    r""":func:`oblique_projx` that neither overflows nor underflows.

    .. math::

        \mathrm{Orth}(W)_i = \frac{w_i / m_i}{\|w_i / m_i\|}, \qquad m_i = \max_k |w_{ik}|

    Dividing by the largest entry first keeps the squared norm representable for any
    finite filter, so filters of norm ``1e30`` or ``1e-40`` in float32 are normalised
    exactly. It costs two more passes over ``x`` than :func:`oblique_projx`, which the
    UN step uses: there every filter of ``x + u`` has norm :math:`\ge 1`.
    """
    m = x.abs().amax(dim=filter_dims(ndim), keepdim=True)
    y = x / torch.where(m > 0, m, torch.ones_like(m))
    return oblique_projx(y, ndim)


def oblique_proju(x: torch.Tensor, u: torch.Tensor, ndim: int = 1) -> torch.Tensor:
    r"""Project ``u`` onto the tangent space at ``x``: the paper's :math:`\Pi_W`.

    .. math::

        \Pi_W(U)_i = u_i - \langle w_i, u_i \rangle \, w_i

    For ``x`` on the oblique manifold this is the orthogonal projection; applied to a
    Euclidean gradient it gives the Riemannian gradient of Table 1 (UN column).
    """
    inner = (x * u).sum(dim=filter_dims(ndim), keepdim=True)
    return torch.addcmul(u, inner, x, value=-1)


def oblique_retr(x: torch.Tensor, u: torch.Tensor, ndim: int = 1) -> torch.Tensor:
    r"""Retraction of the UN update: step, then renormalise every filter.

    .. math::

        R_W(U) = \mathrm{Orth}(W + U)

    For tangent ``u`` every filter of ``x + u`` has norm :math:`\sqrt{1 + \|u_i\|^2} \ge 1`,
    so the division is always well defined.
    """
    return oblique_projx_(x + u, ndim)  # a fresh temporary: normalise it in place


def oblique_expmap(x: torch.Tensor, u: torch.Tensor, ndim: int = 1) -> torch.Tensor:
    r"""Exponential map of the product of spheres, filter by filter.

    .. math::

        \mathrm{Exp}_W(U)_i = \cos(\|u_i\|)\, w_i + \sin(\|u_i\|) \frac{u_i}{\|u_i\|}

    Falls back to :func:`oblique_retr` for filters with a (near) zero step.
    """
    norm_u = torch.linalg.vector_norm(u, dim=filter_dims(ndim), keepdim=True)
    eps = EPS[x.dtype]
    exp = x * torch.cos(norm_u) + u * (torch.sin(norm_u) / norm_u.clamp_min(eps))
    retr = oblique_retr(x, u, ndim)
    return torch.where(norm_u > eps**0.5, exp, retr)


def oblique_dist(x: torch.Tensor, y: torch.Tensor, ndim: int = 1) -> torch.Tensor:
    r"""Geodesic distance of every filter pair, :math:`\arccos\langle x_i, y_i\rangle`.

    Returns one value per filter (the filter dims are removed).
    """
    inner = (x * y).sum(dim=filter_dims(ndim))
    return torch.acos(inner.clamp(-1.0, 1.0))


def _scale(x: torch.Tensor, side: str, ndim: int) -> torch.Tensor:
    """:math:`\\|w_i\\|^2` (left) or :math:`\\|\\theta_{:,j}\\|^2` (right), saturated at the
    dtype's largest finite value so that a zero gradient entry never becomes ``0 * inf``."""
    scale = filter_sqnorm(x, ndim) if side == "left" else column_sqnorm(x, ndim)
    return scale.clamp_max_(torch.finfo(x.dtype).max)


def scaled_egrad2rgrad(
    x: torch.Tensor, g: torch.Tensor, side: str = "left", ndim: int = 1
) -> torch.Tensor:
    r"""Riemannian gradient under the scaled metric (SM), eqs. (7)-(8) and Table 1.

    .. math::

        \text{left:}\quad \tilde\nabla_W L = G_W^{-1} \nabla_W L
            = \mathrm{Diag}(\|w_i\|^2)\, \nabla_W L

        \text{right:}\quad \tilde\nabla_\theta L = \nabla_\theta L \, G_\theta^{-1}
            = \nabla_\theta L \, \mathrm{Diag}(\|\theta_{:,j}\|^2)

    Parameters
    ----------
    x : torch.Tensor
        the point :math:`W` or :math:`\theta`
    g : torch.Tensor
        the Euclidean gradient at ``x``
    side : {"left", "right"}
        ``"left"`` scales filters (rows) of ``W``; ``"right"`` scales the columns of the
        classifier :math:`\theta` (trailing ``ndim >= 2`` dims ``(out, in, *kernel)``)
    ndim : int
        number of trailing dims owned by one point

    Notes
    -----
    A zero filter (or column) has :math:`\|w_i\|^2 = 0`: its Riemannian gradient is zero
    and the SM update leaves it at zero. This is the limit of the formula, never NaN.
    Where :math:`\|w_i\|^2` overflows the dtype (norms above about ``1.8e19`` in
    float32) it saturates at the largest finite value: the result stays finite, and zero
    gradient entries stay zero.
    """
    return g * _scale(x, side, ndim)


def scaled_inner(
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    side: str = "left",
    ndim: int = 1,
    keepdim: bool = False,
) -> torch.Tensor:
    r"""The scaled metric of eq. (8).

    .. math::

        \langle U, V \rangle_W = \mathrm{Tr}(U^T G_W V)
            = \sum_i \frac{\langle u_i, v_i \rangle}{\|w_i\|^2},
        \qquad
        \langle U, V \rangle_\theta = \mathrm{Tr}(U G_\theta V^T)
            = \sum_j \frac{\langle u_{:,j}, v_{:,j} \rangle}{\|\theta_{:,j}\|^2}

    It satisfies ``scaled_inner(x, scaled_egrad2rgrad(x, g), v) == (g * v).sum()`` for
    every ``v``: the defining identity of the Riemannian gradient.

    Notes
    -----
    At a zero filter (or column) the metric is degenerate. That filter contributes zero to
    the inner product, consistently with :func:`scaled_egrad2rgrad` freezing it.
    """
    scale = _scale(x, side, ndim)
    tiny = torch.finfo(scale.dtype).tiny
    inv = torch.where(scale > tiny, scale.reciprocal(), torch.zeros_like(scale))
    return (u * v).mul_(inv).sum(dim=filter_dims(ndim), keepdim=keepdim)


def scaled_sqnorm(x: torch.Tensor, u: torch.Tensor, side: str = "left", ndim: int = 1):
    """Squared norm of ``u`` under the scaled metric, :math:`\\langle u, u\\rangle_x`."""
    return scaled_inner(x, u, u, side=side, ndim=ndim)
