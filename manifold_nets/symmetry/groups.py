r"""Rescaling symmetries of a network, and whether an update respects them (Sections 2-3).

A *rescaling* multiplies row :math:`i` of a weight :math:`W` (filter :math:`i`, with its
bias) by :math:`a_i` and column :math:`j` by :math:`c_j`:

.. math:: W \mapsto \mathrm{Diag}(a)\, W\, \mathrm{Diag}(c).

The paper's reparameterisations are rescalings:

- Arch1, the paper's group (eqs. (1)-(2)): :math:`W_l \to \alpha_l W_l` for
  :math:`l < L`, :math:`W_L \to \beta W_L` with :math:`\beta` tied within pooling pairs,
  :math:`\theta \to \theta (\prod_l \alpha_l\, \beta_s)^{-1}`;
- Arch1, the full group: :math:`W_l \to A_l W_l A_{l-1,s}^{-1}`,
  :math:`\theta \to \theta A_{L,s}^{-1}` with pair-tied positive diagonals :math:`A_l`;
- Arch2 (eq. (3)): :math:`W_l \to A_l W_l`, any positive diagonal :math:`A_l`.

Every group here is a linear subspace of *log*-scalings: a basis matrix whose columns are
the generators, in the coordinates of a :class:`ScalingSpace` (one coordinate per row and
per column of every ``Linear``/``ConvNd`` weight). A group element is
:math:`\exp` of a combination of generators; :class:`Rescaling` applies it to a copy of a
model, batch-norm running statistics included (mean times :math:`a_i`, variance times
:math:`a_i^2`), so eval mode is covered.

Measurements (numbers, not pass/fail):
:func:`~manifold_nets.symmetry.invariance.loss_invariance`,
:func:`~manifold_nets.symmetry.invariance.update_invariance` (``k`` optimiser steps from
:math:`w` and from :math:`g.w`) and
:func:`~manifold_nets.symmetry.invariance.orbit_orthogonality`
(:math:`\langle \nabla L, \xi(w)\rangle`).
:func:`~manifold_nets.symmetry.invariance.predict` derives from a group's generators whether
an update *should* be equivariant, and :func:`~manifold_nets.audit.audit` compares
the prediction with the measurement. :func:`~manifold_nets.symmetry.discover.discover` finds
the rescaling symmetries of any model numerically.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..convert import refuse_conv1d
from ..roles import FILTER_TYPES

__all__ = [
    "ScalingSpace",
    "Rescaling",
    "RescalingGroup",
    "arch1_paper_group",
    "arch1_full_group",
    "arch1_untied_pair_group",
    "arch2_group",
    "rescale_weight",
    "block_diagonal",
    "scaling_tangent",
    "basis_csr",
]


_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


# -- pure functions ---------------------------------------------------------------------
def _along(v: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return v.reshape(shape)


def rescale_weight(w: torch.Tensor, left: torch.Tensor | None = None,
                   right: torch.Tensor | None = None) -> torch.Tensor:
    r"""Rescale the rows (dim 0) and columns (dim 1) of a weight.

    .. math:: \tilde W = \mathrm{Diag}(a)\, W\, \mathrm{Diag}(c), \quad
        \tilde W_{ij\ldots} = a_i\, W_{ij\ldots}\, c_j

    For a ``ConvNd`` weight ``(out, in, *kernel)`` a row is an output filter and a column an
    input channel. ``None`` means all ones.

    Parameters
    ----------
    w : torch.Tensor
        ``(rows, cols, *kernel)``: a ``Linear`` or ``ConvNd`` weight :math:`W`.
    left : torch.Tensor, optional
        ``(rows,)``: the row scalings :math:`a` (default: all ones).
    right : torch.Tensor, optional
        ``(cols,)``: the column scalings :math:`c` (default: all ones).

    Returns
    -------
    torch.Tensor
        :math:`\tilde W`, a new tensor of the shape of ``w`` (``w`` itself when both scalings
        are ``None``).

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.symmetry import rescale_weight
    >>> w = torch.randn(3, 2)
    >>> a, c = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 4.0])
    >>> torch.allclose(rescale_weight(w, a, c), torch.diag(a) @ w @ torch.diag(c))
    True
    >>> conv = torch.ones(4, 3, 5, 5)  # column j: input channel j of every filter
    >>> rescale_weight(conv, right=torch.tensor([1.0, 2.0, 3.0]))[0, :, 0, 0].tolist()
    [1.0, 2.0, 3.0]
    """
    if left is not None:
        w = w * _along(left, 0, w.dim())
    if right is not None:
        w = w * _along(right, 1, w.dim())
    return w


def scaling_tangent(w: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    r"""Generator of a rescaling at :math:`W`: :math:`\xi(W)_{ij} = (r_i + c_j) W_{ij}`.

    The derivative at :math:`t = 0` of :math:`\mathrm{Diag}(e^{t r}) W \mathrm{Diag}(e^{t c})`.

    Parameters
    ----------
    w : torch.Tensor
        ``(rows, cols, *kernel)``: the weight :math:`W`.
    r : torch.Tensor
        ``(rows,)``: the row log-scales.
    c : torch.Tensor
        ``(cols,)``: the column log-scales.

    Returns
    -------
    torch.Tensor
        :math:`\xi(W)`, of the shape of ``w``.

    Examples
    --------
    The tangent is the derivative of :func:`rescale_weight` along
    :math:`t \mapsto (e^{t r}, e^{t c})`:

    >>> import torch
    >>> from manifold_nets.symmetry.groups import rescale_weight, scaling_tangent
    >>> w = torch.randn(3, 2, dtype=torch.float64)
    >>> r = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    >>> c = torch.tensor([-0.1, 0.4], dtype=torch.float64)
    >>> t0, dt = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
    >>> _, d = torch.func.jvp(lambda t: rescale_weight(w, (t * r).exp(), (t * c).exp()),
    ...                       (t0,), (dt,))
    >>> torch.allclose(d, scaling_tangent(w, r, c))
    True
    """
    return (_along(r, 0, w.dim()) + _along(c, 1, w.dim())) * w



# -- the coordinates of rescalings --------------------------------------------------------
@dataclass(frozen=True)
class _Site:
    weight: str           # parameter name of the weight
    module: str           # module name
    rows: int
    cols: int
    row_offset: int
    col_offset: int
    bias: str | None      # parameter name of the bias, scaled with the rows
    batchnorm: str | None  # module name of the batch norm that normalises the rows
    kind: str = "matrix"  # "matrix" (rows and columns) or "norm" (channels, no columns)
    groups: int = 1       # a grouped conv: its columns are the input channels of all groups


def block_diagonal(w: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv's weight ``(out, in / groups, *kernel)`` as the dense weight
    ``(out, in, *kernel)`` it acts as: group ``g``'s filters on its own input channels,
    zeros elsewhere.

    Parameters
    ----------
    w : torch.Tensor
        The grouped weight.
    groups : int
        The conv's ``groups``.

    Returns
    -------
    torch.Tensor
        The block-diagonal weight (``w`` itself for ``groups=1``).

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.symmetry.groups import block_diagonal
    >>> w = torch.arange(1.0, 5.0).reshape(4, 1)  # depthwise: 4 filters, 1 channel each
    >>> block_diagonal(w, 4).tolist()[1]
    [0.0, 2.0, 0.0, 0.0]
    """
    if groups == 1:
        return w
    out, per = w.shape[:2]
    dense = w.new_zeros(out, per * groups, *w.shape[2:])
    rows = out // groups
    for g in range(groups):
        dense[g * rows:(g + 1) * rows, g * per:(g + 1) * per] = w[g * rows:(g + 1) * rows]
    return dense


def _grouped(dense: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of :func:`block_diagonal`: the blocks on the diagonal."""
    if groups == 1:
        return dense
    out, per = dense.shape[0], dense.shape[1] // groups
    rows = out // groups
    return torch.cat([dense[g * rows:(g + 1) * rows, g * per:(g + 1) * per]
                      for g in range(groups)])


class ScalingSpace:
    r"""Coordinates of the rescalings of a model: one log-scale per row and per column of
    every weight matrix, one per channel of every affine normalisation.

    Sites, in ``named_modules`` order:

    - **matrices**: the weights of ``nn.Linear``, ``nn.ConvNd`` and ``nn.Embedding``, and
      the packed ``in_proj_weight`` of ``nn.MultiheadAttention`` (its ``out_proj`` is a
      ``Linear``). A vector ``v`` holds row log-scales ``r`` then column log-scales ``c``;
      it generates :math:`(r_i + c_j) W_{ij}` and :math:`r_i b_i` for the row's bias
      (``bias``, or ``in_proj_bias``).
    - **vectors**: every other 1-D parameter (the weight of a hand-written RMSNorm such
      as Llama's, a layer scale), one log-scale per entry, as a normalisation without a
      shift (listed in ``vectors``).
    - **normalisations**: ``BatchNorm*``, ``LayerNorm`` and ``GroupNorm`` with an affine
      weight: one log-scale :math:`g_k` per channel, generating :math:`g_k \gamma_k` and
      :math:`g_k \beta_k` (the pair scaled together); no columns.

    A batch norm is attached to the closest preceding ``Linear``/``ConvNd`` whose number of
    outputs equals its ``num_features`` (true for ``conv -> bn`` blocks and for Arch2);
    its running statistics follow that weight's row scalings.

    A grouped convolution (``groups > 1``, depthwise ones included) has one column
    log-scale per input channel, as the dense block-diagonal weight it acts as
    (:func:`~manifold_nets.symmetry.groups.block_diagonal`).

    A weight tensor that several modules share (tied input and output embeddings) is one
    site, under its first name, with one set of log-scales; :meth:`site` answers to every
    name.

    Parameters
    ----------
    model : torch.nn.Module
        The model whose weights are rescaled; only its structure and shapes are read.

    Attributes
    ----------
    sites : list
        One record per weight, in ``named_modules`` order: the parameter names of the
        weight and of its bias, the number of rows and columns, the offsets of its row and
        column log-scales in a coordinate vector, the attached batch norm and the kind
        (``"matrix"`` or ``"norm"``).
    dim : int
        The number of coordinates: the sum of rows and columns over all sites.

    Raises
    ------
    ValueError
        If the model holds a transposed convolution (not supported), a ``transformers``
        ``Conv1D`` (convert it with :func:`~manifold_nets.convert.conv1d_to_linear`), or
        no ``Linear``, ``ConvNd``, ``Embedding`` or ``MultiheadAttention`` weight at all.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.symmetry.groups import ScalingSpace
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
    ...                           torch.nn.Linear(4, 2))
    >>> space = ScalingSpace(net)
    >>> space.dim  # (4 rows + 3 columns) + (2 rows + 4 columns)
    13
    >>> [(s.weight, s.rows, s.cols) for s in space.sites]
    [('0.weight', 4, 3), ('2.weight', 2, 4)]
    """

    def __init__(self, model: nn.Module):
        refuse_conv1d(model, "ScalingSpace")
        sites, offset, last = [], 0, None
        pending: dict[str, str] = {}
        for name, mod in model.named_modules():
            if isinstance(mod, _TRANSPOSED):
                raise ValueError(f"{name!r} is a {type(mod).__name__}; transposed "
                                 "convolutions are not supported by ScalingSpace")
            if isinstance(mod, FILTER_TYPES):
                last = (name, mod)
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm) and last is not None:
                lname, lmod = last
                if lmod.weight.shape[0] == mod.num_features and lname not in pending:
                    pending[lname] = name
        first: dict[int, int] = {}  # id of a weight tensor -> its site's index
        aliases: dict[str, int] = {}  # a tied weight's second name -> the site's index
        for name, mod in model.named_modules():
            prefix = f"{name}." if name else ""
            if isinstance(mod, (*FILTER_TYPES, nn.Embedding)):
                rows, cols = mod.weight.shape[:2]
                groups = getattr(mod, "groups", 1)
                cols *= groups
                bias = getattr(mod, "bias", None)
                bias_name = prefix + "bias" if bias is not None else None
                k = first.get(id(mod.weight))
                if k is not None:  # tied: one tensor, one set of log-scales
                    if sites[k].bias is not None and bias_name is not None:
                        raise ValueError(
                            f"{prefix}weight is tied with {sites[k].weight} and both uses "
                            "have a bias; ScalingSpace supports a tied weight with at most "
                            "one bias")
                    if bias_name is not None:
                        sites[k] = replace(sites[k], bias=bias_name)
                    aliases[prefix + "weight"] = k
                    continue
                first[id(mod.weight)] = len(sites)
                sites.append(_Site(prefix + "weight", name, rows, cols, offset, offset + rows,
                                   bias_name, pending.get(name), groups=groups))
                offset += rows + cols
            elif isinstance(mod, nn.MultiheadAttention):
                packed = [("in_proj_weight", "in_proj_bias")] if mod.in_proj_weight is not None \
                    else [(f"{k}_proj_weight", None) for k in "qkv"]
                for wname, bname in packed:
                    w = getattr(mod, wname)
                    has_bias = bname is not None and getattr(mod, bname) is not None
                    sites.append(_Site(prefix + wname, name, w.shape[0], w.shape[1], offset,
                                       offset + w.shape[0],
                                       prefix + bname if has_bias else None, None))
                    offset += w.shape[0] + w.shape[1]
            elif isinstance(mod, _NORMS) and getattr(mod, "weight", None) is not None:
                n = mod.weight.numel()
                sites.append(_Site(prefix + "weight", name, n, 0, offset, offset + n,
                                   prefix + "bias" if getattr(mod, "bias", None) is not None
                                   else None, None, "norm"))
                offset += n
        # every other 1-D weight (an RMSNorm written by hand, a layer scale) that the
        # model multiplies into its activations: one log-scale per entry
        covered = {k for site in sites for k in (site.weight, site.bias) if k}
        covered |= set(aliases)
        self.vectors: set[str] = set()
        for name, p in model.named_parameters():
            if p.dim() == 1 and p.is_floating_point() and name not in covered:
                owner = name.rsplit(".", 1)[0] if "." in name else ""
                sites.append(_Site(name, owner, p.numel(), 0, offset, offset + p.numel(),
                                   None, None, "norm"))
                self.vectors.add(name)
                offset += p.numel()
        if not any(s.kind == "matrix" for s in sites):
            raise ValueError("model has no nn.Linear, nn.ConvNd, nn.Embedding or "
                             "nn.MultiheadAttention weight to rescale")
        self.sites = sites
        self.dim = offset
        self._by_weight = {s.weight: s for s in sites}
        self._by_weight.update({alias: sites[k] for alias, k in aliases.items()})

    def find(self, weight: str) -> _Site | None:
        """The record of ``weight`` (any name of a tied weight), or ``None`` where it is no
        rescalable weight of the model.

        Parameters
        ----------
        weight : str
            A parameter name.

        Returns
        -------
        object or None
            As :meth:`site`.

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.symmetry.groups import ScalingSpace
        >>> space = ScalingSpace(torch.nn.Sequential(torch.nn.Linear(3, 4)))
        >>> space.find("0.weight").rows, space.find("0.bias")
        (4, None)
        """
        return self._by_weight.get(weight)

    @property
    def names(self) -> list[str]:
        """Every name a site answers to: each weight's, and the second names of tied ones.

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.symmetry.groups import ScalingSpace
        >>> ScalingSpace(torch.nn.Sequential(torch.nn.Linear(3, 4))).names
        ['0.weight']
        """
        return list(self._by_weight)

    def site(self, weight: str) -> _Site:
        """The record of one weight: its shape, its offsets in ``v``, its bias and batch norm.

        Parameters
        ----------
        weight : str
            The parameter name of the weight, e.g. ``"0.weight"``.

        Returns
        -------
        object
            A frozen record with the fields ``weight``, ``module``, ``rows``, ``cols``,
            ``row_offset``, ``col_offset``, ``bias``, ``batchnorm`` and ``kind``.

        Raises
        ------
        ValueError
            If ``weight`` is not a rescalable weight of the model (the message lists them).

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.symmetry.groups import ScalingSpace
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
        ...                           torch.nn.Linear(4, 2))
        >>> s = ScalingSpace(net).site("2.weight")
        >>> s.rows, s.cols, s.row_offset, s.col_offset, s.bias
        (2, 4, 7, 9, '2.bias')
        """
        try:
            return self._by_weight[weight]
        except KeyError:
            raise ValueError(f"no rescalable weight named {weight!r}; weights: "
                             f"{list(self._by_weight)}") from None

    def split(self, v: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{weight name: (r, c)}`` from a coordinate vector.

        Parameters
        ----------
        v : torch.Tensor
            ``(dim,)``: log-scales in the coordinates of this space.

        Returns
        -------
        dict
            ``{weight name: (r, c)}``: views of ``v`` holding the row log-scales ``r`` and
            the column log-scales ``c`` of every weight (``c`` is empty for a
            normalisation).

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.symmetry.groups import ScalingSpace
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
        ...                           torch.nn.Linear(4, 2))
        >>> space = ScalingSpace(net)
        >>> r, c = space.split(torch.arange(13.0))["2.weight"]
        >>> r.tolist(), c.tolist()
        ([7.0, 8.0], [9.0, 10.0, 11.0, 12.0])
        """
        return {s.weight: (v[s.row_offset:s.row_offset + s.rows],
                           v[s.col_offset:s.col_offset + s.cols]) for s in self.sites}

    def rows(self, weight: str, index=slice(None)) -> torch.Tensor:
        """Indices (in ``v``) of rows ``index`` of ``weight``.

        Parameters
        ----------
        weight : str
            The parameter name of the weight.
        index : int, slice or sequence of int
            Which rows (default: all).

        Returns
        -------
        torch.Tensor
            The coordinates of those rows' log-scales (a 0-d tensor for an ``int``).

        Raises
        ------
        ValueError
            If ``weight`` is not a rescalable weight of the model.

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.symmetry.groups import ScalingSpace
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
        ...                           torch.nn.Linear(4, 2))
        >>> ScalingSpace(net).rows("0.weight").tolist()
        [0, 1, 2, 3]
        >>> ScalingSpace(net).rows("2.weight", slice(0, 1)).tolist()
        [7]
        """
        s = self.site(weight)
        return torch.arange(s.row_offset, s.row_offset + s.rows)[index]

    def cols(self, weight: str, index=slice(None)) -> torch.Tensor:
        """Indices (in ``v``) of columns ``index`` of ``weight``.

        Parameters
        ----------
        weight : str
            The parameter name of the weight.
        index : int, slice or sequence of int
            Which columns (default: all).

        Returns
        -------
        torch.Tensor
            The coordinates of those columns' log-scales (a 0-d tensor for an ``int``).

        Raises
        ------
        ValueError
            If ``weight`` is not a rescalable weight of the model.

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.symmetry.groups import ScalingSpace
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
        ...                           torch.nn.Linear(4, 2))
        >>> ScalingSpace(net).cols("2.weight").tolist()
        [9, 10, 11, 12]
        """
        s = self.site(weight)
        return torch.arange(s.col_offset, s.col_offset + s.cols)[index]

    def tangent(self, v: torch.Tensor, params: dict[str, torch.Tensor]) -> dict:
        r"""The parameter-space vector :math:`\xi_v(w)` (weights and biases only), with the
        keys in the order of ``params`` (the structure :func:`torch.func.jvp` compares).

        Per matrix weight :math:`\xi_v(W)_{ij} = (r_i + c_j) W_{ij}` (see
        :func:`scaling_tangent`) and :math:`\xi_v(b)_i = r_i b_i`; per affine normalisation
        :math:`g_k \gamma_k` and :math:`g_k \beta_k`.

        Parameters
        ----------
        v : torch.Tensor
            ``(dim,)``: a direction in the coordinates of this space.
        params : dict of str to torch.Tensor
            The model's parameters by name (e.g. ``dict(model.named_parameters())``).

        Returns
        -------
        dict
            ``{parameter name: tensor}`` for every weight and bias that ``v`` can move, in
            the order of ``params``.

        Examples
        --------
        Scaling all rows of the first layer by :math:`e^t` moves its weight and bias along
        themselves:

        >>> import torch
        >>> from manifold_nets.symmetry.groups import ScalingSpace
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
        ...                           torch.nn.Linear(4, 2))
        >>> space = ScalingSpace(net)
        >>> params = {k: p.detach() for k, p in net.named_parameters()}
        >>> v = torch.zeros(space.dim)
        >>> v[space.rows("0.weight")] = 1.0
        >>> xi = space.tangent(v, params)
        >>> list(xi)
        ['0.weight', '0.bias', '2.weight', '2.bias']
        >>> torch.equal(xi["0.weight"], params["0.weight"]), float(xi["2.weight"].abs().max())
        (True, 0.0)
        """
        out = {}
        for s, (r, c) in zip(self.sites, self.split(v).values(), strict=True):
            w = params[s.weight]
            r = r.to(w.dtype)
            if s.kind == "norm":
                out[s.weight] = r.view(w.shape) * w
                if s.bias is not None:
                    out[s.bias] = r.view(w.shape) * params[s.bias]
                continue
            out[s.weight] = _grouped(scaling_tangent(block_diagonal(w, s.groups), r,
                                                     c.to(w.dtype)), s.groups)
            if s.bias is not None:
                out[s.bias] = r * params[s.bias]
        return {k: out[k] for k in params if k in out}

    def gram(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        r"""Gram matrix :math:`C^T C` of the candidate generators in parameter space.

        Per weight, with :math:`Q_{ij} = \sum_k W_{ijk}^2`:
        :math:`\begin{pmatrix} \mathrm{Diag}(Q 1 + b^2) & Q \\ Q^T & \mathrm{Diag}(Q^T 1)
        \end{pmatrix}`; different weights are orthogonal.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            The model's parameters by name.

        Returns
        -------
        torch.Tensor
            ``(dim, dim)``: the inner products of the generators :math:`\xi_{e_k}(w)` in
            parameter space, in the dtype and on the device of the parameters.

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.symmetry.groups import ScalingSpace
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
        ...                           torch.nn.Linear(4, 2))
        >>> space = ScalingSpace(net)
        >>> params = {k: p.detach() for k, p in net.named_parameters()}
        >>> g = space.gram(params)
        >>> e = torch.zeros(space.dim)
        >>> e[0] = 1.0  # row 0 of the first weight, with its bias
        >>> xi = torch.cat([t.reshape(-1) for t in space.tangent(e, params).values()])
        >>> tuple(g.shape), torch.allclose(g[0, 0], xi @ xi)
        ((13, 13), True)
        """
        w0 = params[self.sites[0].weight]
        g = torch.zeros(self.dim, self.dim, dtype=w0.dtype, device=w0.device)
        for s, rd, q, cd in self.gram_terms(params):
            r = slice(s.row_offset, s.row_offset + s.rows)
            g[r, r] = torch.diag(rd)
            if q is None:
                continue
            c = slice(s.col_offset, s.col_offset + s.cols)
            g[c, c] = torch.diag(cd)
            g[r, c] = q
            g[c, r] = q.T
        return g

    def gram_terms(self, params: dict[str, torch.Tensor], dtype: torch.dtype | None = None):
        r"""The blocks of :meth:`gram`, site by site, without forming it.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            The model's parameters by name.
        dtype : torch.dtype, optional
            Compute in this dtype (each weight converted as it is reached); default: the
            parameters' own.

        Yields
        ------
        tuple
            ``(site, rd, q, cd)``: the row diagonal :math:`Q 1 + b^2`, the cross block
            :math:`Q` and the column diagonal :math:`Q^T 1` of a weight; ``(site, d, None,
            None)`` for a normalisation or a vector, :math:`d = \gamma^2 + \beta^2`.

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.symmetry.groups import ScalingSpace
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4, bias=False))
        >>> space = ScalingSpace(net)
        >>> site, rd, q, cd = next(space.gram_terms(dict(net.named_parameters())))
        >>> tuple(q.shape), torch.allclose(rd, net[0].weight.detach().square().sum(1))
        ((4, 3), True)
        """
        for s in self.sites:
            w = params[s.weight].detach().to(dtype or params[s.weight].dtype)
            b = params[s.bias].detach().to(w.dtype) if s.bias else None
            if s.kind == "norm":
                d = w.square().reshape(-1)
                yield s, (d + b.square().reshape(-1) if b is not None else d), None, None
                continue
            w = block_diagonal(w, s.groups)
            q = w.square().flatten(2).sum(-1) if w.dim() > 2 else w.square()
            yield s, q.sum(1) + (b.square() if b is not None else 0), q, q.sum(0)


class Rescaling:
    r"""One group element: positive (or, if allowed, signed) row and column scalings.

    Parameters
    ----------
    space : ScalingSpace
        the model's coordinates
    scales : dict
        ``{weight name: (a, c)}``: row scalings ``a`` and column scalings ``c`` (``None``
        means ones)
    allow_negative : bool
        accept negative entries (never zeros). Negative scalings are *not* symmetries of
        Arch1/Arch2; this exists to show it.
    label : str
        a description for printing

    Attributes
    ----------
    space : ScalingSpace
        The coordinates, as given.
    scales : dict
        ``{weight name: (a, c)}`` as float64 vectors (or ``None``), checked.
    bn_scales : dict
        ``{batch-norm name: d}``: per-feature factors measured by :meth:`calibrate`
        (empty until then).
    label : str
        The description.

    Raises
    ------
    ValueError
        If a name is not a rescalable weight, a vector has the wrong length, or an entry
        is zero, not finite, or negative without ``allow_negative`` (the message names
        the weight and the entry).

    Notes
    -----
    :meth:`apply` returns a transformed deep copy: weights, biases (times :math:`a`) and
    the running statistics of the attached batch norm (mean times :math:`a`, variance times
    :math:`a^2`).

    Examples
    --------
    Scaling the hidden units of a ReLU network by 2 and the next layer's columns by 1/2
    changes nothing:

    >>> import torch
    >>> from manifold_nets.symmetry.groups import Rescaling, ScalingSpace
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
    ...                           torch.nn.Linear(4, 2))
    >>> g = Rescaling(ScalingSpace(net), {"0.weight": (torch.full((4,), 2.0), None),
    ...                                   "2.weight": (None, torch.full((4,), 0.5))})
    >>> x = torch.randn(5, 3)
    >>> torch.allclose(g.apply(net)(x), net(x), atol=1e-6)
    True
    >>> Rescaling(ScalingSpace(net), {"0.weight": (-torch.ones(4), None)})
    Traceback (most recent call last):
    ...
    ValueError: 0.weight row scaling 0 is -1.0: scalings must be positive; ...
    """

    def __init__(self, space: ScalingSpace, scales: dict, *, allow_negative: bool = False,
                 label: str = ""):
        self.space = space
        self.label = label
        self.scales = {}
        for name, (a, c) in scales.items():
            site = space.site(name)
            a = None if a is None else torch.as_tensor(a, dtype=torch.float64).reshape(-1)
            c = None if c is None else torch.as_tensor(c, dtype=torch.float64).reshape(-1)
            for what, vec, n in (("row", a, site.rows), ("column", c, site.cols)):
                if vec is None:
                    continue
                if vec.numel() != n:
                    raise ValueError(f"{name}: {what} scalings have {vec.numel()} entries, "
                                     f"the weight has {n} {what}s")
                _check_scales(vec, f"{name} {what}", allow_negative)
            self.scales[name] = (a, c)
        self.bn_scales: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def calibrate(self, model: nn.Module, inputs: torch.Tensor) -> Rescaling:
        r"""Measure how every batch norm's input features scale under this element.

        By default the running statistics of a batch norm follow the row scalings
        :math:`a` of the weight before it, which is right for the paper's groups. When
        column scalings also change that weight's output (e.g. an element of a discovered
        group written with an arbitrary split between rows and columns), the per-feature
        factor :math:`d_k` is measured instead, as the least-squares slope of the
        transformed batch-norm input against the original one (train mode, on copies), and
        used by :meth:`apply`. Returns ``self``.

        Parameters
        ----------
        model : torch.nn.Module
            The model the element will be applied to (not modified).
        inputs : torch.Tensor
            A batch to run through copies of ``model`` before and after the element.

        Returns
        -------
        Rescaling
            ``self``, with ``bn_scales`` filled (unchanged when the model has no batch
            norm).

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.symmetry.groups import Rescaling, ScalingSpace
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
        ...                           torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> g = Rescaling(ScalingSpace(net), {"0.weight": (torch.full((4,), 3.0), None)})
        >>> g = g.calibrate(net, torch.randn(16, 3))
        >>> [round(d, 4) for d in g.bn_scales["1"].tolist()]
        [3.0, 3.0, 3.0, 3.0]
        """
        names = {m: n for n, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        if not names:
            return self
        before, after = copy.deepcopy(model).train(), copy.deepcopy(model).train()
        after = self.apply_(after)
        captured: dict[str, list] = {}
        handles = []
        for net, key in ((before, 0), (after, 1)):
            for n, m in net.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    handles.append(m.register_forward_pre_hook(_Slot(captured, n, key)))
            net(inputs)
        for h in handles:
            h.remove()
        for n, (h0, h1) in captured.items():
            h0 = h0 - h0.mean(1, keepdim=True)
            h1 = h1 - h1.mean(1, keepdim=True)
            d = (h0 * h1).sum(1) / h0.square().sum(1).clamp_min(torch.finfo(h0.dtype).tiny)
            self.bn_scales[n] = d.to(torch.float64).cpu()
        return self

    @classmethod
    def from_log(cls, space: ScalingSpace, v: torch.Tensor, label: str = "") -> Rescaling:
        """The element :math:`\\exp(v)` for a coordinate vector ``v``.

        Parameters
        ----------
        space : ScalingSpace
            The coordinates of ``v``.
        v : torch.Tensor
            ``(space.dim,)``: log-scales.
        label : str
            A description for printing.

        Returns
        -------
        Rescaling
            Rows scaled by :math:`e^{r}`, columns by :math:`e^{c}`.

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.symmetry.groups import Rescaling, ScalingSpace
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
        ...                           torch.nn.Linear(4, 2))
        >>> space = ScalingSpace(net)
        >>> v = torch.zeros(space.dim)
        >>> v[space.rows("2.weight")] = torch.tensor([0.0, 1.0])
        >>> [round(a, 4) for a in Rescaling.from_log(space, v).scales["2.weight"][0].tolist()]
        [1.0, 2.7183]
        """
        v = v.to(torch.float64)
        return cls(space, {n: (r.exp(), c.exp()) for n, (r, c) in space.split(v).items()},
                   label=label)

    def __repr__(self) -> str:
        def rng(x):
            if x is None or x.numel() == 0:
                return "1"
            return f"[{float(x.min()):.3g}, {float(x.max()):.3g}]"
        parts = [f"{n}: rows {rng(a)} cols {rng(c)}" for n, (a, c) in self.scales.items()]
        return f"Rescaling({self.label!r}; " + "; ".join(parts) + ")"

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> nn.Module:
        """Transform ``model`` in place (see :meth:`apply`).

        Parameters
        ----------
        model : torch.nn.Module
            A model with the weight names of ``space``; modified in place.

        Returns
        -------
        torch.nn.Module
            ``model`` itself, now :math:`g.w`.

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.symmetry.groups import Rescaling, ScalingSpace
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
        ...                           torch.nn.Linear(4, 2))
        >>> w0 = net[0].weight.detach().clone()
        >>> g = Rescaling(ScalingSpace(net), {"0.weight": (torch.full((4,), 2.0), None)})
        >>> g.apply_(net) is net, torch.allclose(net[0].weight, 2 * w0)
        (True, True)
        """
        params = dict(model.named_parameters())
        modules = dict(model.named_modules())
        for name, (a, c) in self.scales.items():
            site = self.space.site(name)
            w = params[name]
            if site.kind == "norm":
                if a is not None:
                    w.mul_(_like(a, w).view(w.shape))
                    if site.bias is not None:
                        params[site.bias].mul_(_like(a, w).view(w.shape))
                continue
            w.copy_(_grouped(rescale_weight(block_diagonal(w, site.groups), _like(a, w),
                                            _like(c, w)), site.groups))
            if a is None:
                continue
            if site.bias is not None:
                params[site.bias].mul_(_like(a, w))
            if site.batchnorm and site.batchnorm not in self.bn_scales:
                self._scale_bn(modules.get(site.batchnorm), a)
        for name, d in self.bn_scales.items():
            self._scale_bn(modules.get(name), d)
        return model

    @staticmethod
    def _scale_bn(bn, d):
        if bn is not None and bn.running_mean is not None:
            bn.running_mean.mul_(_like(d, bn.running_mean))
            bn.running_var.mul_(_like(d, bn.running_var).square())

    def apply(self, model: nn.Module) -> nn.Module:
        """A transformed deep copy of ``model``: :math:`g.w`.

        Parameters
        ----------
        model : torch.nn.Module
            A model with the weight names of ``space``; not modified.

        Returns
        -------
        torch.nn.Module
            The copy, with weights, biases and batch-norm running statistics transformed.

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.symmetry.groups import Rescaling, ScalingSpace
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
        ...                           torch.nn.Linear(4, 2))
        >>> g = Rescaling(ScalingSpace(net), {"0.weight": (torch.full((4,), 2.0), None),
        ...                                   "2.weight": (None, torch.full((4,), 0.5))})
        >>> moved = g.apply(net)
        >>> torch.allclose(moved[0].weight, 2 * net[0].weight)
        True
        """
        return self.apply_(copy.deepcopy(model))


class _Slot:
    """A forward pre-hook storing a batch norm's input (channels first, flattened)."""

    def __init__(self, store: dict, name: str, key: int):
        self.store, self.name, self.key = store, name, key

    def __call__(self, module, args):
        slot = self.store.setdefault(self.name, [None, None])
        slot[self.key] = args[0].detach().transpose(0, 1).flatten(1)


def _like(x, ref):
    return None if x is None else x.to(dtype=ref.dtype, device=ref.device)


def _check_scales(vec: torch.Tensor, what: str, allow_negative: bool) -> None:
    bad = ~torch.isfinite(vec) | (vec == 0) | ((vec < 0) & (not allow_negative))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        value = float(vec[i])
        why = ("a zero scaling is not invertible" if value == 0 else
               "negative scalings are not symmetries (ReLU does not commute with the "
               "sign; pass allow_negative=True to apply one anyway)" if value < 0 else
               "scalings must be finite")
        raise ValueError(f"{what} scaling {i} is {value!r}: scalings must be positive; {why}")


class RescalingGroup:
    r"""A connected group of rescalings: ``exp`` of the span of generator vectors.

    Parameters
    ----------
    model : nn.Module
        the model whose weights the group acts on
    basis : torch.Tensor
        ``(space.dim, d)``: the generators, columns in :class:`ScalingSpace` coordinates;
        dense, or a sparse COO tensor (as :func:`~manifold_nets.symmetry.discover`
        gives, which on a language model's vocabulary would not fit densely)
    name : str
        a short name for tables
    labels : sequence of str, optional
        one name per generator
    space : ScalingSpace, optional
        the coordinates of ``basis``, if already built on ``model`` (default: built here)

    Attributes
    ----------
    space : ScalingSpace
        The coordinates of the generators.
    basis : torch.Tensor
        ``(space.dim, d)`` float64: the generators, one per column (dense or sparse COO,
        as given).
    name : str
        The short name.
    labels : list of str
        One name per generator (default ``xi_0``, ``xi_1``, ...).

    Raises
    ------
    ValueError
        If ``basis`` is not a matrix with ``space.dim`` rows.

    Examples
    --------
    The paper's groups (:func:`arch1_paper_group` and the others) build their basis from
    the model; ``element`` takes the paper's parameters:

    >>> from manifold_nets import Arch1
    >>> from manifold_nets.symmetry import arch1_paper_group
    >>> net = Arch1(depth=2, width=4, in_features=3, num_classes=2)
    >>> group = arch1_paper_group(net)
    >>> group.dim, group.labels
    (3, ['alpha_1', 'beta_1', 'beta_2'])
    >>> g = group.element(alpha=[2.0], beta_s=[1.0, 0.5])
    >>> g.scales["classifier.weight"][1].tolist()
    [0.5, 1.0]
    """

    def __init__(self, model: nn.Module, basis: torch.Tensor, name: str,
                 labels: Sequence[str] | None = None, space: ScalingSpace | None = None):
        self.space = space or ScalingSpace(model)
        basis = torch.as_tensor(basis, dtype=torch.float64)
        if basis.dim() != 2 or basis.shape[0] != self.space.dim:
            raise ValueError(f"basis must be ({self.space.dim}, d), got {tuple(basis.shape)}")
        self.basis = basis.coalesce() if basis.is_sparse else basis
        self.name = name
        self.labels = list(labels) if labels is not None else [
            f"xi_{i}" for i in range(basis.shape[1])]

    @property
    def dim(self) -> int:
        """The dimension of the group: the number of generators ``d``.

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.symmetry.groups import RescalingGroup, ScalingSpace
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
        ...                           torch.nn.Linear(4, 2))
        >>> RescalingGroup(net, torch.zeros(ScalingSpace(net).dim, 2), "two").dim
        2
        """
        return self.basis.shape[1]

    def __repr__(self) -> str:
        return f"RescalingGroup({self.name!r}, dim={self.dim})"

    def from_coords(self, coords: torch.Tensor, label: str = "") -> Rescaling:
        """The element :math:`\\exp(\\sum_k t_k \\xi_k)` for group coordinates ``t``.

        Parameters
        ----------
        coords : torch.Tensor or sequence of float
            ``(d,)``: the coordinates :math:`t_k`, one per generator.
        label : str
            A description for printing (default: the group's name).

        Returns
        -------
        Rescaling
            The group element.

        Examples
        --------
        >>> from manifold_nets import Arch1
        >>> from manifold_nets.symmetry import arch1_paper_group
        >>> group = arch1_paper_group(Arch1(depth=2, width=4, in_features=3, num_classes=2))
        >>> g = group.from_coords([0.0, 1.0, 0.0])  # beta_1 = e
        >>> [round(c, 4) for c in g.scales["classifier.weight"][1].tolist()]
        [0.3679, 1.0]
        """
        coords = torch.as_tensor(coords, dtype=torch.float64).reshape(-1)
        return Rescaling.from_log(self.space, self.basis @ coords, label or self.name)

    def sample(self, log_scale: float = 1.0, generator: torch.Generator | None = None
               ) -> Rescaling:
        """A random element: coordinates ``log_scale * N(0, 1)`` (scales ``e^{+-log_scale}``).

        Parameters
        ----------
        log_scale : float
            The standard deviation of the coordinates.
        generator : torch.Generator, optional
            The source of randomness (default: torch's global one).

        Returns
        -------
        Rescaling
            The element, labelled with the group's name and ``log_scale``.

        Examples
        --------
        >>> import torch
        >>> from manifold_nets import Arch1
        >>> from manifold_nets.symmetry import arch1_paper_group
        >>> net = Arch1(depth=2, width=4, in_features=3, num_classes=2)
        >>> g = arch1_paper_group(net).sample(0.5, torch.Generator().manual_seed(0))
        >>> x = torch.randn(6, 3)
        >>> torch.allclose(g.apply(net)(x), net(x), atol=1e-5)
        True
        """
        t = torch.randn(self.dim, generator=generator, dtype=torch.float64) * log_scale
        return self.from_coords(t, f"{self.name}, log-scale {log_scale:g}")

    def generators(self) -> list[torch.Tensor]:
        """The generator vectors (columns of ``basis``).

        Returns
        -------
        list of torch.Tensor
            ``d`` vectors of length ``space.dim``.

        Examples
        --------
        >>> from manifold_nets import Arch1
        >>> from manifold_nets.symmetry import arch1_paper_group
        >>> group = arch1_paper_group(Arch1(depth=2, width=4, in_features=3, num_classes=2))
        >>> [tuple(xi.shape) for xi in group.generators()]
        [(17,), (17,), (17,)]
        """
        if not self.basis.is_sparse:
            return list(self.basis.T)
        (rows, cols), values = self.basis.indices(), self.basis.values()
        out = torch.zeros(self.dim, self.space.dim, dtype=torch.float64)
        out[cols, rows] = values
        return list(out)


def basis_csr(basis: torch.Tensor):
    """A basis (dense or sparse COO, ``(candidates, d)``) as a SciPy sparse CSR matrix,
    float64: rows are cheap to slice weight by weight.

    Parameters
    ----------
    basis : torch.Tensor
        The generators, one per column (the ``basis`` of a :class:`RescalingGroup`).

    Returns
    -------
    scipy.sparse.csr_matrix
        The same matrix.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.symmetry.groups import basis_csr
    >>> basis_csr(torch.eye(3)[:, :2].to_sparse()).toarray().tolist()
    [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
    """
    import scipy.sparse as sp

    if not basis.is_sparse:
        return sp.csr_matrix(basis.detach().to(torch.float64).cpu().numpy())
    basis = basis.detach().coalesce().cpu()
    rows, cols = basis.indices().numpy()
    return sp.csr_matrix((basis.values().to(torch.float64).numpy(), (rows, cols)),
                         shape=tuple(basis.shape))


# -- the paper's groups -----------------------------------------------------------------
def _paper_net(model) -> tuple[list[str], str, int]:
    if not (hasattr(model, "named_filters") and hasattr(model, "classifier")):
        raise ValueError("the paper's groups need an Arch1/Arch2 model; use discover() "
                         "for other models")
    names = [n for n, _ in model.named_filters()]
    return names, "classifier.weight", model.config.width


class _PaperGroup(RescalingGroup):
    def _log(self, scales, n: int, what: str) -> torch.Tensor:
        s = torch.as_tensor(scales, dtype=torch.float64).reshape(-1)
        if s.numel() != n:
            raise ValueError(f"{what} needs {n} entries, got {s.numel()}")
        _check_scales(s, what, allow_negative=False)
        return s.log()


class _Arch1Paper(_PaperGroup):
    def element(self, alpha, beta_s) -> Rescaling:
        r"""The element of eqs. (1)-(2): ``alpha`` (``L - 1`` scalars), ``beta_s`` (pairs)."""
        depth, half = self._depth, self._half
        t = torch.cat([self._log(alpha, depth - 1, "alpha"),
                       self._log(beta_s, half, "beta_s")])
        return self.from_coords(t, "paper group element")


class _Arch1Full(_PaperGroup):
    def element(self, A_s: Sequence) -> Rescaling:
        r"""The element :math:`W_l \to A_l W_l A_{l-1,s}^{-1}` from the ``L`` vectors
        :math:`A_{l,s}` (one entry per pooling pair)."""
        if len(A_s) != self._depth:
            raise ValueError(f"A_s needs {self._depth} vectors (one per layer), got {len(A_s)}")
        t = torch.cat([self._log(a, self._half, f"A_s[{i}]") for i, a in enumerate(A_s)])
        return self.from_coords(t, "full group element")


class _Arch2(_PaperGroup):
    def element(self, A: Sequence) -> Rescaling:
        r"""The element of eq. (3), :math:`W_l \to A_l W_l`, from ``L`` vectors :math:`A_l`."""
        if len(A) != self._depth:
            raise ValueError(f"A needs {self._depth} vectors (one per layer), got {len(A)}")
        t = torch.cat([self._log(a, 2 * self._half, f"A[{i}]") for i, a in enumerate(A)])
        return self.from_coords(t, "Arch2 group element")


def _make(cls, model, columns, name, labels, depth, half):
    space = ScalingSpace(model)
    basis = torch.zeros(space.dim, len(columns), dtype=torch.float64)
    for k, entries in enumerate(columns):
        for kind, weight, index, value in entries:
            idx = (space.rows if kind == "row" else space.cols)(weight, index)
            basis[idx, k] = value
    group = cls(model, basis, name, labels, space)
    group._depth, group._half = depth, half
    return group


def arch1_paper_group(model) -> RescalingGroup:
    r"""The paper's Arch1 group, eqs. (1)-(2), at any depth :math:`L`.

    Generators: :math:`\alpha_l` (:math:`l = 1 .. L-1`) scales all rows of :math:`W_l`
    and inversely all columns of :math:`\theta`; :math:`\beta_k` scales rows
    :math:`2k, 2k+1` of :math:`W_L` and inversely column :math:`k` of :math:`\theta`.
    The scaled metric (SM) is exactly equivariant under it.

    Parameters
    ----------
    model : manifold_nets.Arch1
        The network (any depth; ``width`` even).

    Returns
    -------
    RescalingGroup
        :math:`L - 1 + \mathrm{width}/2` generators labelled ``alpha_l`` and ``beta_k``;
        its ``element(alpha, beta_s)`` builds the element of eqs. (1)-(2) from the
        :math:`L - 1` scalars :math:`\alpha_l` and the ``width/2`` pair scalings
        :math:`\beta_s`.

    Raises
    ------
    ValueError
        If ``model`` is not an Arch1/Arch2 network (use
        :func:`~manifold_nets.symmetry.discover.discover` for other models).

    Examples
    --------
    >>> import torch
    >>> from manifold_nets import Arch1
    >>> from manifold_nets.symmetry import arch1_paper_group
    >>> net = Arch1(depth=2, width=4, in_features=3, num_classes=2)
    >>> group = arch1_paper_group(net)
    >>> group.labels
    ['alpha_1', 'beta_1', 'beta_2']
    >>> g = group.element(alpha=[3.0], beta_s=[0.5, 2.0])
    >>> x = torch.randn(6, 3)
    >>> torch.allclose(g.apply(net)(x), net(x), atol=1e-5)
    True
    """
    names, theta, width = _paper_net(model)
    depth, half = len(names), width // 2
    cols, labels = [], []
    for l in range(depth - 1):
        cols.append([("row", names[l], slice(None), 1.0), ("col", theta, slice(None), -1.0)])
        labels.append(f"alpha_{l + 1}")
    for k in range(half):
        cols.append([("row", names[-1], slice(2 * k, 2 * k + 2), 1.0),
                     ("col", theta, k, -1.0)])
        labels.append(f"beta_{k + 1}")
    return _make(_Arch1Paper, model, cols, "Arch1 paper group", labels, depth, half)


def arch1_full_group(model) -> RescalingGroup:
    r"""Arch1's full rescaling group: :math:`W_l \to A_l W_l A_{l-1,s}^{-1}`,
    :math:`\theta \to \theta A_{L,s}^{-1}`.

    Generator :math:`(l, k)` scales rows :math:`2k, 2k+1` of :math:`W_l` and inversely
    column :math:`k` of :math:`W_{l+1}` (of :math:`\theta` for :math:`l = L`): ``width/2``
    per layer. SM is *not* equivariant under it at depth >= 2 (column scalings change the
    row norms of :math:`W_{l+1}`).

    Parameters
    ----------
    model : manifold_nets.Arch1
        The network (any depth; ``width`` even).

    Returns
    -------
    RescalingGroup
        :math:`L \cdot \mathrm{width}/2` generators labelled ``A_l,k``; its
        ``element(A_s)`` takes the :math:`L` vectors :math:`A_{l,s}` (one entry per pooling
        pair).

    Raises
    ------
    ValueError
        If ``model`` is not an Arch1/Arch2 network.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets import Arch1
    >>> from manifold_nets.symmetry import arch1_full_group
    >>> net = Arch1(depth=2, width=4, in_features=3, num_classes=2)
    >>> group = arch1_full_group(net)
    >>> group.dim, group.labels[:2]
    (4, ['A_1,1', 'A_1,2'])
    >>> g = group.element([[2.0, 0.5], [1.0, 3.0]])
    >>> x = torch.randn(6, 3)
    >>> torch.allclose(g.apply(net)(x), net(x), atol=1e-5)
    True
    """
    names, theta, width = _paper_net(model)
    depth, half = len(names), width // 2
    nxt = names[1:] + [theta]
    cols, labels = [], []
    for l in range(depth):
        for k in range(half):
            cols.append([("row", names[l], slice(2 * k, 2 * k + 2), 1.0),
                         ("col", nxt[l], k, -1.0)])
            labels.append(f"A_{l + 1},{k + 1}")
    return _make(_Arch1Full, model, cols, "Arch1 full group", labels, depth, half)


def arch1_untied_pair_group(model) -> RescalingGroup:
    r"""A control that is *not* a symmetry of Arch1: the first row of every pooling pair
    of :math:`W_L` scaled, the columns of :math:`\theta` compensating.

    Max-pooling ties a pair's two rows: scaling one of them changes which one wins, so
    the loss changes wherever some pair's winner does. Invariance checks that pass on
    the paper's group must fail on this one.

    Parameters
    ----------
    model : manifold_nets.Arch1
        The network.

    Returns
    -------
    RescalingGroup
        One generator, labelled ``"even rows of W_L"``.

    Raises
    ------
    ValueError
        If ``model`` is not an Arch1/Arch2 network.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets import Arch1
    >>> from manifold_nets.symmetry import arch1_untied_pair_group
    >>> net = Arch1(depth=1, width=4, in_features=3, num_classes=2)
    >>> g = arch1_untied_pair_group(net).from_coords([1.0])
    >>> x = torch.randn(64, 3)
    >>> torch.allclose(g.apply(net)(x), net(x), atol=1e-5)
    False
    """
    names, theta, _ = _paper_net(model)
    return _make(RescalingGroup, model, [[("row", names[-1], slice(0, None, 2), 1.0),
                                          ("col", theta, slice(None), -1.0)]],
                 "untied pairs (control)", ["even rows of W_L"], len(names), 0)


def arch2_group(model) -> RescalingGroup:
    r"""Arch2's group, eq. (3): every row of every :math:`W_l` scaled independently.

    A symmetry thanks to batch norm, up to its ``eps`` (exact for ``eps = 0``), and for
    *positive* scalings only.

    Parameters
    ----------
    model : manifold_nets.Arch2
        The network (any depth; ``width`` even).

    Returns
    -------
    RescalingGroup
        :math:`L \cdot \mathrm{width}` generators labelled ``A_l,i``; its ``element(A)``
        takes the :math:`L` positive diagonals :math:`A_l` as vectors.

    Raises
    ------
    ValueError
        If ``model`` is not an Arch1/Arch2 network.

    Examples
    --------
    With a negligible batch-norm ``eps`` the outputs (train mode) do not change:

    >>> import torch
    >>> from manifold_nets import Arch2
    >>> from manifold_nets.symmetry import arch2_group
    >>> net = Arch2(depth=2, width=4, in_features=3, num_classes=2, bn_eps=1e-30)
    >>> group = arch2_group(net)
    >>> group.dim
    8
    >>> g = group.element([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 2.0, 2.0]])
    >>> x = torch.randn(6, 3)
    >>> torch.allclose(g.apply(net)(x), net(x), atol=1e-5)
    True
    """
    names, _, width = _paper_net(model)
    cols, labels = [], []
    for l, name in enumerate(names):
        for i in range(width):
            cols.append([("row", name, i, 1.0)])
            labels.append(f"A_{l + 1},{i + 1}")
    return _make(_Arch2, model, cols, "Arch2 group", labels, len(names), width // 2)


