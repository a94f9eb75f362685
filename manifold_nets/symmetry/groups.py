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

Measurements (numbers, not pass/fail): :func:`loss_invariance`,
:func:`update_invariance` (``k`` optimiser steps from :math:`w` and from :math:`g.w`) and
:func:`orbit_orthogonality` (:math:`\langle \nabla L, \xi(w)\rangle`). :func:`predict`
derives from a group's generators whether an update *should* be equivariant, and
:func:`audit` compares the prediction with the measurement. :func:`discover` finds the
rescaling symmetries of any model numerically.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ScalingSpace",
    "Rescaling",
    "RescalingGroup",
    "arch1_paper_group",
    "arch1_full_group",
    "arch2_group",
    "rescale_weight",
    "scaling_tangent",
]


_FILTER = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


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
    """
    if left is not None:
        w = w * _along(left, 0, w.dim())
    if right is not None:
        w = w * _along(right, 1, w.dim())
    return w


def scaling_tangent(w: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    r"""Generator of a rescaling at :math:`W`: :math:`\xi(W)_{ij} = (r_i + c_j) W_{ij}`.

    The derivative at :math:`t = 0` of :math:`\mathrm{Diag}(e^{t r}) W \mathrm{Diag}(e^{t c})`.
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


class ScalingSpace:
    r"""Coordinates of the rescalings of a model: one log-scale per row and per column of
    every weight matrix, one per channel of every affine normalisation.

    Sites, in ``named_modules`` order:

    - **matrices**: the weights of ``nn.Linear``, ``nn.ConvNd`` and ``nn.Embedding``, and
      the packed ``in_proj_weight`` of ``nn.MultiheadAttention`` (its ``out_proj`` is a
      ``Linear``). A vector ``v`` holds row log-scales ``r`` then column log-scales ``c``;
      it generates :math:`(r_i + c_j) W_{ij}` and :math:`r_i b_i` for the row's bias
      (``bias``, or ``in_proj_bias``).
    - **normalisations**: ``BatchNorm*``, ``LayerNorm`` and ``GroupNorm`` with an affine
      weight: one log-scale :math:`g_k` per channel, generating :math:`g_k \gamma_k` and
      :math:`g_k \beta_k` (the pair scaled together); no columns.

    A batch norm is attached to the closest preceding ``Linear``/``ConvNd`` whose number of
    outputs equals its ``num_features`` (true for ``conv -> bn`` blocks and for Arch2);
    its running statistics follow that weight's row scalings.
    """

    def __init__(self, model: nn.Module):
        sites, offset, last = [], 0, None
        pending: dict[str, str] = {}
        for name, mod in model.named_modules():
            if isinstance(mod, _TRANSPOSED):
                raise ValueError(f"{name!r} is a {type(mod).__name__}; transposed "
                                 "convolutions are not supported by ScalingSpace")
            if isinstance(mod, _FILTER):
                last = (name, mod)
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm) and last is not None:
                lname, lmod = last
                if lmod.weight.shape[0] == mod.num_features and lname not in pending:
                    pending[lname] = name
        for name, mod in model.named_modules():
            prefix = f"{name}." if name else ""
            if isinstance(mod, _FILTER + (nn.Embedding,)):
                rows, cols = mod.weight.shape[:2]
                bias = getattr(mod, "bias", None)
                sites.append(_Site(prefix + "weight", name, rows, cols, offset, offset + rows,
                                   prefix + "bias" if bias is not None else None,
                                   pending.get(name)))
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
        if not any(s.kind == "matrix" for s in sites):
            raise ValueError("model has no nn.Linear, nn.ConvNd, nn.Embedding or "
                             "nn.MultiheadAttention weight to rescale")
        self.sites = sites
        self.dim = offset
        self._by_weight = {s.weight: s for s in sites}

    def site(self, weight: str) -> _Site:
        try:
            return self._by_weight[weight]
        except KeyError:
            raise ValueError(f"no rescalable weight named {weight!r}; weights: "
                             f"{list(self._by_weight)}") from None

    def split(self, v: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{weight name: (r, c)}`` from a coordinate vector."""
        return {s.weight: (v[s.row_offset:s.row_offset + s.rows],
                           v[s.col_offset:s.col_offset + s.cols]) for s in self.sites}

    def rows(self, weight: str, index=slice(None)) -> torch.Tensor:
        """Indices (in ``v``) of rows ``index`` of ``weight``."""
        s = self.site(weight)
        return torch.arange(s.row_offset, s.row_offset + s.rows)[index]

    def cols(self, weight: str, index=slice(None)) -> torch.Tensor:
        """Indices (in ``v``) of columns ``index`` of ``weight``."""
        s = self.site(weight)
        return torch.arange(s.col_offset, s.col_offset + s.cols)[index]

    def tangent(self, v: torch.Tensor, params: dict[str, torch.Tensor]) -> dict:
        r"""The parameter-space vector :math:`\xi_v(w)` (weights and biases only), with the
        keys in the order of ``params`` (the structure :func:`torch.func.jvp` compares)."""
        out = {}
        for s, (r, c) in zip(self.sites, self.split(v).values(), strict=True):
            w = params[s.weight]
            r = r.to(w.dtype)
            if s.kind == "norm":
                out[s.weight] = r.view(w.shape) * w
                if s.bias is not None:
                    out[s.bias] = r.view(w.shape) * params[s.bias]
                continue
            out[s.weight] = scaling_tangent(w, r, c.to(w.dtype))
            if s.bias is not None:
                out[s.bias] = r * params[s.bias]
        return {k: out[k] for k in params if k in out}

    def gram(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        r"""Gram matrix :math:`C^T C` of the candidate generators in parameter space.

        Per weight, with :math:`Q_{ij} = \sum_k W_{ijk}^2`:
        :math:`\begin{pmatrix} \mathrm{Diag}(Q 1 + b^2) & Q \\ Q^T & \mathrm{Diag}(Q^T 1)
        \end{pmatrix}`; different weights are orthogonal.
        """
        w0 = params[self.sites[0].weight]
        g = torch.zeros(self.dim, self.dim, dtype=w0.dtype, device=w0.device)
        for s in self.sites:
            w = params[s.weight]
            if s.kind == "norm":
                r = slice(s.row_offset, s.row_offset + s.rows)
                d = w.square().reshape(-1)
                if s.bias:
                    d = d + params[s.bias].square().reshape(-1)
                g[r, r] = torch.diag(d)
                continue
            q = w.square().flatten(2).sum(-1) if w.dim() > 2 else w.square()
            rd = q.sum(1) + (params[s.bias].square() if s.bias else 0)
            r = slice(s.row_offset, s.row_offset + s.rows)
            c = slice(s.col_offset, s.col_offset + s.cols)
            g[r, r] = torch.diag(rd)
            g[c, c] = torch.diag(q.sum(0))
            g[r, c] = q
            g[c, r] = q.T
        return g


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

    Notes
    -----
    :meth:`apply` returns a transformed deep copy: weights, biases (times :math:`a`) and
    the running statistics of the attached batch norm (mean times :math:`a`, variance times
    :math:`a^2`).
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
        """The element :math:`\\exp(v)` for a coordinate vector ``v``."""
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
        """Transform ``model`` in place (see :meth:`apply`)."""
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
            w.copy_(rescale_weight(w, _like(a, w), _like(c, w)))
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
        """A transformed deep copy of ``model``: :math:`g.w`."""
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
        ``(space.dim, d)``: the generators, columns in :class:`ScalingSpace` coordinates
    name : str
        a short name for tables
    labels : sequence of str, optional
        one name per generator

    Examples
    --------
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
        self.basis = basis
        self.name = name
        self.labels = list(labels) if labels is not None else [
            f"xi_{i}" for i in range(basis.shape[1])]

    @property
    def dim(self) -> int:
        return self.basis.shape[1]

    def __repr__(self) -> str:
        return f"RescalingGroup({self.name!r}, dim={self.dim})"

    def from_coords(self, coords: torch.Tensor, label: str = "") -> Rescaling:
        """The element :math:`\\exp(\\sum_k t_k \\xi_k)` for group coordinates ``t``."""
        coords = torch.as_tensor(coords, dtype=torch.float64).reshape(-1)
        return Rescaling.from_log(self.space, self.basis @ coords, label or self.name)

    def sample(self, log_scale: float = 1.0, generator: torch.Generator | None = None
               ) -> Rescaling:
        """A random element: coordinates ``log_scale * N(0, 1)`` (scales ``e^{+-log_scale}``)."""
        t = torch.randn(self.dim, generator=generator, dtype=torch.float64) * log_scale
        return self.from_coords(t, f"{self.name}, log-scale {log_scale:g}")

    def generators(self) -> list[torch.Tensor]:
        """The generator vectors (columns of :attr:`basis`)."""
        return list(self.basis.T)


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


def arch2_group(model) -> RescalingGroup:
    r"""Arch2's group, eq. (3): every row of every :math:`W_l` scaled independently.

    A symmetry thanks to batch norm, up to its ``eps`` (exact for ``eps = 0``), and for
    *positive* scalings only.
    """
    names, _, width = _paper_net(model)
    cols, labels = [], []
    for l, name in enumerate(names):
        for i in range(width):
            cols.append([("row", name, i, 1.0)])
            labels.append(f"A_{l + 1},{i + 1}")
    return _make(_Arch2, model, cols, "Arch2 group", labels, len(names), width // 2)


