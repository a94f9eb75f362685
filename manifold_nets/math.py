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
tensor values. Degenerate points (zero filters) are handled with ``torch.where`` and
documented per function.

Examples
--------
The rows of a ``Linear`` weight are its filters (``ndim=1``); the UN step keeps them on
the unit sphere:

>>> import torch
>>> from manifold_nets import math
>>> w = math.oblique_projx(torch.randn(4, 3))
>>> u = math.oblique_proju(w, torch.randn(4, 3))
>>> torch.allclose(math.oblique_retr(w, -0.1 * u).norm(dim=1), torch.ones(4))
True
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
    "scaled_frame",
]

#: Norms below this are treated as zero when dividing (per dtype), as in ``geoopt.Sphere``.
EPS = {
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
    torch.float32: 1e-12,
    torch.float64: 1e-30,
}


def filter_dims(ndim: int) -> tuple[int, ...]:
    """Dimensions that form one filter: the trailing ``ndim`` ones.

    Parameters
    ----------
    ndim : int
        number of trailing dims that form one filter (``1`` for the rows of a ``Linear``
        weight, ``3`` for the output filters of a ``Conv2d`` weight)

    Returns
    -------
    tuple of int
        ``(-ndim, ..., -1)``, the ``dim`` argument of a per-filter reduction

    Examples
    --------
    >>> from manifold_nets.math import filter_dims
    >>> filter_dims(1), filter_dims(3)
    ((-1,), (-3, -2, -1))
    """
    return tuple(range(-ndim, 0))


def filter_index(flat: int, batch_shape: torch.Size) -> int | tuple[int, ...]:
    """The readable index of filter ``flat`` (counted over the batch dims, row-major): an
    ``int`` for one batch dim, else a tuple, as error messages name a filter.

    Parameters
    ----------
    flat : int
        index of the filter among all filters, counted row-major over the batch dims
    batch_shape : torch.Size
        the batch (leading) dims of the tensor, i.e. its shape without the filter dims

    Returns
    -------
    int or tuple of int
        ``flat`` itself when there is at most one batch dim, else its multi-index in
        ``batch_shape``

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.math import filter_index
    >>> filter_index(5, torch.Size([2, 3]))
    (1, 2)
    >>> filter_index(5, torch.Size([8]))
    5
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

    Parameters
    ----------
    ndim : int
        number of trailing dims that form the matrix :math:`\theta`, at least 2
        (``2`` for a ``Linear`` classifier, ``4`` for a ``Conv2d`` one)

    Returns
    -------
    tuple of int
        the ``out`` dim ``-ndim`` and the kernel dims ``-ndim + 2, ..., -1``

    Examples
    --------
    >>> from manifold_nets.math import column_dims
    >>> column_dims(2), column_dims(4)
    ((-2,), (-4, -2, -1))
    """
    return (-ndim,) + tuple(range(-ndim + 2, 0))


def filter_sqnorm(x: torch.Tensor, ndim: int = 1) -> torch.Tensor:
    r"""Squared Euclidean norm of every filter, :math:`\|w_i\|^2`, with kept dims.

    Parameters
    ----------
    x : torch.Tensor
        weights, filters in the trailing ``ndim`` dims
    ndim : int
        number of trailing dims that form one filter

    Returns
    -------
    torch.Tensor
        the squared norms, shaped like ``x`` with the filter dims of size 1 (so that they
        broadcast against ``x``)

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.math import filter_sqnorm
    >>> n = filter_sqnorm(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    >>> tuple(n.shape), n.flatten().tolist()
    ((2, 1), [25.0, 4.0])
    """
    return torch.linalg.vector_norm(x, dim=filter_dims(ndim), keepdim=True).square_()


def column_sqnorm(x: torch.Tensor, ndim: int = 2) -> torch.Tensor:
    r"""Squared norm of every column, :math:`\|\theta_{:,j}\|^2`, with kept dims.

    Parameters
    ----------
    x : torch.Tensor
        the classifier :math:`\theta`, a matrix ``(out, in, *kernel)`` in the trailing
        ``ndim`` dims
    ndim : int
        number of trailing dims that form :math:`\theta`, at least 2 (see
        :func:`column_dims`)

    Returns
    -------
    torch.Tensor
        the squared column norms, shaped like ``x`` with the ``out`` and kernel dims of
        size 1

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.math import column_sqnorm
    >>> n = column_sqnorm(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    >>> tuple(n.shape), n.flatten().tolist()
    ((1, 2), [9.0, 20.0])
    """
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

    See Also
    --------
    oblique_projx_ : the same, in place
    oblique_projx_safe : the same, for filters whose squared norm overflows or underflows

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.math import oblique_projx
    >>> w = oblique_projx(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    >>> [[round(v, 4) for v in row] for row in w.tolist()]
    [[0.6, 0.8], [0.0, 1.0]]
    >>> oblique_projx(torch.zeros(1, 2)).tolist()  # a zero filter stays zero
    [[0.0, 0.0]]
    """
    norm = torch.linalg.vector_norm(x, dim=filter_dims(ndim), keepdim=True)
    return x * norm.clamp_min_(EPS[x.dtype]).reciprocal_()  # multiply: cheaper than divide


def oblique_projx_(x: torch.Tensor, ndim: int = 1) -> torch.Tensor:
    r""":func:`oblique_projx` in place: :math:`w_i \leftarrow w_i / \|w_i\|` for every
    filter of ``x``, which is returned. A zero filter stays zero.

    Parameters
    ----------
    x : torch.Tensor
        weights, filters in the trailing ``ndim`` dims; overwritten
    ndim : int
        number of trailing dims that form one filter

    Returns
    -------
    torch.Tensor
        ``x`` itself, every filter now of unit norm

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.math import oblique_projx_
    >>> w = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    >>> oblique_projx_(w) is w, torch.allclose(w.norm(dim=1), torch.ones(2))
    (True, True)
    """
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

    Parameters
    ----------
    x : torch.Tensor
        weights, filters in the trailing ``ndim`` dims
    ndim : int
        number of trailing dims that form one filter

    Returns
    -------
    torch.Tensor
        a new tensor whose every finite non-zero filter has unit norm; a zero filter stays
        zero

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.math import oblique_projx, oblique_projx_safe
    >>> w = torch.tensor([[3e30, 4e30], [3e-40, 4e-40]])
    >>> oblique_projx_safe(w).norm(dim=1).tolist()
    [1.0, 1.0]
    >>> oblique_projx(w).norm(dim=1).tolist()  # the squared norms overflow and underflow
    [0.0, 0.0]
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

    Parameters
    ----------
    x : torch.Tensor
        a point: every filter (trailing ``ndim`` dims) of unit norm
    u : torch.Tensor
        any tensor of the shape of ``x``, e.g. the Euclidean gradient
        :math:`\nabla_W L`
    ndim : int
        number of trailing dims that form one filter

    Returns
    -------
    torch.Tensor
        :math:`\Pi_W(U)`: every filter orthogonal to the filter of ``x``

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.math import oblique_projx, oblique_proju
    >>> w = oblique_projx(torch.randn(4, 3))
    >>> v = oblique_proju(w, torch.randn(4, 3))
    >>> round(float((w * v).sum(dim=1).abs().max()), 5)  # tangent: <w_i, v_i> = 0
    0.0
    >>> torch.allclose(oblique_proju(w, v), v)  # a projection
    True
    """
    inner = (x * u).sum(dim=filter_dims(ndim), keepdim=True)
    return torch.addcmul(u, inner, x, value=-1)


def oblique_retr(x: torch.Tensor, u: torch.Tensor, ndim: int = 1) -> torch.Tensor:
    r"""Retraction of the UN update: step, then renormalise every filter.

    .. math::

        R_W(U) = \mathrm{Orth}(W + U)

    For tangent ``u`` every filter of ``x + u`` has norm :math:`\sqrt{1 + \|u_i\|^2} \ge 1`,
    so the division is always well defined.

    Parameters
    ----------
    x : torch.Tensor
        a point: every filter (trailing ``ndim`` dims) of unit norm
    u : torch.Tensor
        a tangent vector at ``x``, e.g. :math:`-\lambda \tilde\nabla_W L`
    ndim : int
        number of trailing dims that form one filter

    Returns
    -------
    torch.Tensor
        a new point: every filter of unit norm

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.math import oblique_projx, oblique_proju, oblique_retr
    >>> w = oblique_projx(torch.randn(4, 3))
    >>> u = oblique_proju(w, torch.randn(4, 3))
    >>> torch.allclose(oblique_retr(w, u).norm(dim=1), torch.ones(4))
    True
    """
    return oblique_projx_(x + u, ndim)  # a fresh temporary: normalise it in place


def oblique_expmap(x: torch.Tensor, u: torch.Tensor, ndim: int = 1) -> torch.Tensor:
    r"""Exponential map of the product of spheres, filter by filter.

    .. math::

        \mathrm{Exp}_W(U)_i = \cos(\|u_i\|)\, w_i + \sin(\|u_i\|) \frac{u_i}{\|u_i\|}

    This is the true exponential map of the sphere, per filter: the filter moves a
    geodesic distance :math:`\|u_i\|` along a great circle. It falls back to
    :func:`oblique_retr` for filters with a (near) zero step (:math:`\|u_i\|` below the
    square root of the dtype's ``EPS``), where the two agree to rounding.

    Parameters
    ----------
    x : torch.Tensor
        a point: every filter (trailing ``ndim`` dims) of unit norm
    u : torch.Tensor
        a tangent vector at ``x``
    ndim : int
        number of trailing dims that form one filter

    Returns
    -------
    torch.Tensor
        a new point: every filter of unit norm

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.math import oblique_dist, oblique_expmap
    >>> w = torch.tensor([[1.0, 0.0]])
    >>> y = oblique_expmap(w, torch.tensor([[0.0, 0.5]]))  # half a radian along the circle
    >>> [round(v, 4) for v in y.flatten().tolist()], round(float(oblique_dist(w, y)), 4)
    ([0.8776, 0.4794], 0.5)
    """
    norm_u = torch.linalg.vector_norm(u, dim=filter_dims(ndim), keepdim=True)
    eps = EPS[x.dtype]
    exp = x * torch.cos(norm_u) + u * (torch.sin(norm_u) / norm_u.clamp_min(eps))
    retr = oblique_retr(x, u, ndim)
    return torch.where(norm_u > eps**0.5, exp, retr)


def oblique_dist(x: torch.Tensor, y: torch.Tensor, ndim: int = 1) -> torch.Tensor:
    r"""Geodesic distance of every filter pair, :math:`\arccos\langle x_i, y_i\rangle`.

    Parameters
    ----------
    x, y : torch.Tensor
        two points: every filter (trailing ``ndim`` dims) of unit norm
    ndim : int
        number of trailing dims that form one filter

    Returns
    -------
    torch.Tensor
        one angle in :math:`[0, \pi]` per filter (the filter dims are removed). The inner
        product is clamped to :math:`[-1, 1]` first, so rounding never gives NaN.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.math import oblique_dist
    >>> x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    >>> y = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    >>> [round(d, 4) for d in oblique_dist(x, y).tolist()]  # pi / 2 and 0
    [1.5708, 0.0]
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

    Returns
    -------
    torch.Tensor
        the Riemannian gradient, of the shape of ``g``: every filter (or column) of ``g``
        multiplied by the squared norm of that filter (or column) of ``x``

    Notes
    -----
    A zero filter (or column) has :math:`\|w_i\|^2 = 0`: its Riemannian gradient is zero
    and the SM update leaves it at zero. This is the limit of the formula, never NaN.
    Where :math:`\|w_i\|^2` overflows the dtype (norms above about ``1.8e19`` in
    float32) it saturates at the largest finite value: the result stays finite, and zero
    gradient entries stay zero.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.math import scaled_egrad2rgrad
    >>> x = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    >>> g = torch.ones(2, 2)
    >>> scaled_egrad2rgrad(x, g).tolist()  # rows scaled by 25 and 4
    [[25.0, 25.0], [4.0, 4.0]]
    >>> scaled_egrad2rgrad(x, g, side="right", ndim=2).tolist()  # columns by 9 and 20
    [[9.0, 20.0], [9.0, 20.0]]
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

        \begin{aligned}
        \langle U, V \rangle_W &= \mathrm{Tr}(U^T G_W V)
            = \sum_i \frac{\langle u_i, v_i \rangle}{\|w_i\|^2} \\
        \langle U, V \rangle_\theta &= \mathrm{Tr}(U G_\theta V^T)
            = \sum_j \frac{\langle u_{:,j}, v_{:,j} \rangle}{\|\theta_{:,j}\|^2}
        \end{aligned}

    It satisfies ``scaled_inner(x, scaled_egrad2rgrad(x, g), v) == (g * v).sum()`` for
    every ``v``: the defining identity of the Riemannian gradient.

    Parameters
    ----------
    x : torch.Tensor
        the point :math:`W` or :math:`\theta`
    u, v : torch.Tensor
        two tangent vectors at ``x`` (any tensors of its shape)
    side : {"left", "right"}
        ``"left"``: the metric of the filters (rows); ``"right"``: the metric of the
        columns of :math:`\theta` (trailing ``ndim >= 2`` dims ``(out, in, *kernel)``)
    ndim : int
        number of trailing dims owned by one point
    keepdim : bool
        keep the summed dims (of size 1)

    Returns
    -------
    torch.Tensor
        one inner product per point: the batch (leading) dims of ``x``, plus the summed
        dims of size 1 with ``keepdim=True``. With ``side="right"`` the sum runs over
        the trailing ``ndim`` dims, so one value per matrix :math:`\theta`.

    Notes
    -----
    At a zero filter (or column) the metric is degenerate. That filter contributes zero to
    the inner product, consistently with :func:`scaled_egrad2rgrad` freezing it.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.math import scaled_egrad2rgrad, scaled_inner
    >>> x, g, v = torch.randn(3, 2, 4, dtype=torch.float64).unbind()
    >>> rgrad = scaled_egrad2rgrad(x, g)
    >>> torch.allclose(scaled_inner(x, rgrad, v).sum(), (g * v).sum())
    True
    >>> scaled_inner(x, rgrad, v).shape, scaled_inner(x, rgrad, v, keepdim=True).shape
    (torch.Size([2]), torch.Size([2, 1]))
    """
    scale = _scale(x, side, ndim)
    tiny = torch.finfo(scale.dtype).tiny
    inv = torch.where(scale > tiny, scale.reciprocal(), torch.zeros_like(scale))
    return (u * v).mul_(inv).sum(dim=filter_dims(ndim), keepdim=keepdim)


def scaled_sqnorm(x: torch.Tensor, u: torch.Tensor, side: str = "left", ndim: int = 1):
    r"""Squared norm of ``u`` under the scaled metric, :math:`\langle u, u\rangle_x`.

    Parameters
    ----------
    x : torch.Tensor
        the point :math:`W` or :math:`\theta`
    u : torch.Tensor
        a tangent vector at ``x``
    side : {"left", "right"}
        which metric, as for :func:`scaled_inner`
    ndim : int
        number of trailing dims owned by one point

    Returns
    -------
    torch.Tensor
        :func:`scaled_inner` ``(x, u, u)``: one value per row (``"left"``) or per matrix
        (``"right"``)

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.math import scaled_sqnorm
    >>> x = torch.tensor([[3.0, 4.0]])
    >>> scaled_sqnorm(x, x).tolist()  # a filter has scaled length 1 at itself
    [1.0]
    """
    return scaled_inner(x, u, u, side=side, ndim=ndim)


def scaled_frame(x: torch.Tensor, side: str = "left", ndim: int = 1) -> torch.Tensor:
    r"""The factor that maps the SM metric's orthonormal frame at ``x`` to the parameter's
    coordinates: :math:`\|w_i\|` per filter (left) or :math:`\|\theta_{:,j}\|` per
    column of the classifier (right), shaped to broadcast against ``x``.

    The scaled metric :math:`\langle u, v \rangle_W = \sum_i u_i^\top v_i / \|w_i\|^2`
    (eq. (7)) has the orthonormal frame :math:`e = u_i / \|w_i\|`. In it the Riemannian
    gradient :math:`\mathrm{Diag}(\|w_i\|^2) \nabla_W L` reads

    .. math::

        h_i = \|w_i\|\, \nabla_{w_i} L,

    which is unchanged by the rescaling :math:`w_i \to a_i w_i` (the gradient scales by
    :math:`1 / a_i`); a step :math:`d` taken in the frame is the step
    :math:`\|w_i\|\, d_i` on :math:`W`, which scales by :math:`a_i`. Any update computed
    from :math:`h` alone (Adam's moments, its :math:`\epsilon` included) is therefore
    equivariant under the SM group; :class:`~manifold_nets.InvariantAdam` is built on it.

    Parameters
    ----------
    x : torch.Tensor
        the point :math:`W` or :math:`\theta`
    side : {"left", "right"}
        filters (rows) or the classifier's columns (trailing ``ndim >= 2`` dims)
    ndim : int
        number of trailing dims owned by one point

    Returns
    -------
    torch.Tensor
        the norms, with kept dims, saturated at the dtype's largest finite value

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.math import scaled_frame
    >>> x = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    >>> scaled_frame(x).tolist(), scaled_frame(x, "right", 2).tolist()
    ([[5.0], [2.0]], [[3.0, 4.4721360206604]])
    """
    return _scale(x, side, ndim).sqrt_()
