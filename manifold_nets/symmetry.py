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

import argparse
import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import geoopt
import torch
from torch import nn
from torch.func import functional_call, jvp, vmap

from .declare import declare

__all__ = [
    "ScalingSpace",
    "Rescaling",
    "RescalingGroup",
    "arch1_paper_group",
    "arch1_full_group",
    "arch2_group",
    "rescale_weight",
    "scaling_tangent",
    "summed_cross_entropy",
    "loss_invariance",
    "update_invariance",
    "orbit_orthogonality",
    "predict",
    "UpdateRule",
    "UPDATE_RULES",
    "Discovery",
    "discover",
    "AuditRow",
    "audit",
    "audit_rows",
    "format_audit",
    "register_cli",
]

_FILTER = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

#: ``(invariant below, broken above)``: relative gaps; in between the verdict is "unclear".
TOLERANCES = {torch.float64: (1e-9, 1e-5), torch.float32: (1e-4, 1e-2)}


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


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The paper's loss: cross-entropy *summed* over the mini-batch."""
    return nn.functional.cross_entropy(logits, targets, reduction="sum")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative gap ``||a - b|| / ||b||`` (``inf`` if anything is not finite)."""
    gap = (a - b).norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny)
    gap = float(gap)
    return gap if math.isfinite(gap) else math.inf


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


class ScalingSpace:
    r"""Coordinates of the rescalings of a model: one log-scale per row and per column.

    Sites are the ``nn.Linear`` and ``nn.ConvNd`` weights, in ``named_modules`` order. A
    vector ``v`` of length :attr:`dim` holds, for every weight, its row log-scales ``r``
    then its column log-scales ``c``; it generates :math:`(r_i + c_j) W_{ij}` and
    :math:`r_i b_i` for the bias.

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
            if not isinstance(mod, _FILTER):
                continue
            rows, cols = mod.weight.shape[:2]
            prefix = f"{name}." if name else ""
            sites.append(_Site(prefix + "weight", name, rows, cols, offset, offset + rows,
                               prefix + "bias" if mod.bias is not None else None,
                               pending.get(name)))
            offset += rows + cols
        if not sites:
            raise ValueError("model has no nn.Linear or nn.ConvNd layer to rescale")
        self.sites = sites
        self.dim = offset
        self._by_weight = {s.weight: s for s in sites}

    def site(self, weight: str) -> _Site:
        try:
            return self._by_weight[weight]
        except KeyError:
            raise ValueError(f"no Linear/ConvNd weight named {weight!r}; weights: "
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
        r"""The parameter-space vector :math:`\xi_v(w)` (weights and biases only)."""
        out = {}
        for s, (r, c) in zip(self.sites, self.split(v).values(), strict=True):
            w = params[s.weight]
            out[s.weight] = scaling_tangent(w, r.to(w.dtype), c.to(w.dtype))
            if s.bias is not None:
                out[s.bias] = r.to(w.dtype) * params[s.bias]
        return out

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
        params = dict(after.named_parameters())
        for name, (a, c) in self.scales.items():
            w = params[name]
            w.copy_(rescale_weight(w, _like(a, w), _like(c, w)))
            bias = self.space.site(name).bias
            if a is not None and bias is not None:
                params[bias].mul_(_like(a, w))
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
            return "1" if x is None else f"[{float(x.min()):.3g}, {float(x.max()):.3g}]"
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


# -- measurements -----------------------------------------------------------------------
def _outputs(model: nn.Module, inputs: torch.Tensor, train: bool) -> torch.Tensor:
    m = copy.deepcopy(model).train(train)
    with torch.no_grad():
        return m(inputs)


def loss_invariance(model: nn.Module, element: Rescaling, inputs: torch.Tensor,
                    targets: torch.Tensor, loss: Callable = summed_cross_entropy) -> dict:
    r"""How much :math:`g` changes the loss and the outputs.

    Returns
    -------
    dict
        ``loss``, ``loss_g``: :math:`L(w)`, :math:`L(g.w)` (train mode, batch statistics);
        ``loss_gap``: :math:`|L(g.w) - L(w)| / |L(w)|`; ``output_gap``: relative gap of the
        logits in eval mode (running statistics) and ``output_gap_train`` in train mode.
        ``model`` is not modified.
    """
    g_model = element.apply(model)
    out, out_g = _outputs(model, inputs, True), _outputs(g_model, inputs, True)
    l0, l1 = float(loss(out, targets)), float(loss(out_g, targets))
    gap = abs(l1 - l0) / max(abs(l0), 1e-300)
    return dict(loss=l0, loss_g=l1, loss_gap=gap if math.isfinite(gap) else math.inf,
                output_gap_train=_rel(out_g, out),
                output_gap=_rel(_outputs(g_model, inputs, False),
                                _outputs(model, inputs, False)))


def _train(model, optimizer, inputs, targets, steps, loss):
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss(model(inputs), targets).backward()
        optimizer.step()


def _flat_params(model, project: bool) -> torch.Tensor:
    parts = []
    for p in model.parameters():
        x = p.detach()
        if project and isinstance(p, geoopt.ManifoldParameter):
            x = p.manifold.projx(x)
        parts.append(x.reshape(-1))
    return torch.cat(parts)


def update_invariance(model: nn.Module, element: Rescaling,
                      make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                      inputs: torch.Tensor, targets: torch.Tensor, steps: int = 3,
                      loss: Callable = summed_cross_entropy) -> dict:
    r"""Run ``steps`` optimiser steps from :math:`w` and from :math:`g.w` and compare.

    ``make_optimizer(net)`` builds the optimiser for a copy of the model; it may call
    :func:`manifold_nets.declare` first, and a UN declaration projects :math:`g.w` onto the
    oblique manifold (this is the UN trajectory "from :math:`g.w`").

    An update is *equivariant* when :math:`\mathrm{steps}(g.w) = g.\mathrm{steps}(w)`. With
    :math:`x_k` the iterates from :math:`w` and :math:`y_k` from :math:`g.w`:

    .. math::

        \text{param\_gap} = \frac{\|P(g.x_k) - y_k\|}{\|y_k\|}, \qquad
        \text{output\_gap} = \frac{\|f_{x_k}(X) - f_{y_k}(X)\|}{\|f_{y_k}(X)\|}

    where :math:`P` projects every ``ManifoldParameter`` of :math:`y_k` onto its manifold
    (the identity for SM, renormalisation for UN), and the outputs are in train mode (batch
    statistics, the function being trained: UN renormalises the filters of :math:`g.w` but
    not the batch-norm running statistics). Both are zero for an equivariant update; the
    output gap is the basis-free one.

    Returns
    -------
    dict
        ``param_gap``, ``output_gap`` after ``steps``; ``start_output_gap`` (before any step,
        non-zero when the declaration itself breaks the symmetry); ``gap``: the larger of
        ``param_gap`` and ``output_gap``.
    """
    a = copy.deepcopy(model)
    b = element.apply(model)
    opt_a, opt_b = make_optimizer(a), make_optimizer(b)
    start = _rel(_outputs(a, inputs, True), _outputs(b, inputs, True))
    _train(a, opt_a, inputs, targets, steps, loss)
    _train(b, opt_b, inputs, targets, steps, loss)
    ga = element.apply_(a)  # a is ours: transform in place
    for p_ga, p_b in zip(ga.parameters(), b.parameters(), strict=True):
        if isinstance(p_b, geoopt.ManifoldParameter):
            with torch.no_grad():
                p_ga.copy_(p_b.manifold.projx(p_ga.detach()))
    pgap = _rel(_flat_params(ga, False), _flat_params(b, False))
    ogap = _rel(_outputs(ga, inputs, True), _outputs(b, inputs, True))
    return dict(param_gap=pgap, output_gap=ogap, start_output_gap=start,
                gap=max(pgap, ogap))


def orbit_orthogonality(model: nn.Module, group: RescalingGroup, inputs: torch.Tensor,
                        targets: torch.Tensor, loss: Callable = summed_cross_entropy
                        ) -> torch.Tensor:
    r"""For every generator :math:`\xi_k`, the cosine between :math:`\nabla L` and the orbit.

    .. math:: c_k = \frac{|\langle \nabla_w L, \xi_k(w) \rangle|}
        {\|\nabla_w L\|\, \|\xi_k(w)\|}

    Zero for a true symmetry (the loss is constant along the orbit); train mode, on a copy.
    """
    net = copy.deepcopy(model).train()
    params = dict(net.named_parameters())
    net.zero_grad()
    loss(net(inputs), targets).backward()
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}
    gnorm = torch.sqrt(sum(g.square().sum() for g in grads.values()))
    out = []
    with torch.no_grad():
        for xi in group.generators():
            t = group.space.tangent(xi.to(next(net.parameters()).device), params)
            dot = sum((grads[n] * v).sum() for n, v in t.items())
            tnorm = torch.sqrt(sum(v.square().sum() for v in t.values()))
            out.append(dot.abs() / (gnorm * tnorm).clamp_min(torch.finfo(gnorm.dtype).tiny))
    return torch.stack(out)


# -- predictions from theory -----------------------------------------------------------------
@dataclass(frozen=True)
class UpdateRule:
    r"""An update rule for the audit: a Table 1 declaration and a geoopt optimiser.

    ``make(model)`` declares the model and returns the optimiser.

    ``zero_buffer``: start the momentum buffers at zero. geoopt 0.5's ``RiemannianSGD``
    initialises its buffer with the *Euclidean* gradient and then adds the Riemannian one,
    so its first momentum step is :math:`\mu \nabla L + \tilde\nabla L`; a zero buffer
    gives the textbook :math:`\tilde\nabla L`.
    """

    name: str
    update: str
    optimizer: str = "sgd"  # "sgd" (RiemannianSGD) or "adam" (RiemannianAdam)
    lr: float = 1e-2
    options: dict = field(default_factory=dict)
    zero_buffer: bool = False

    def make(self, model: nn.Module) -> torch.optim.Optimizer:
        declare(model, self.update)
        cls = geoopt.optim.RiemannianAdam if self.optimizer == "adam" else \
            geoopt.optim.RiemannianSGD
        opt = cls(model.parameters(), lr=self.lr, **self.options)
        if self.zero_buffer:
            for p in model.parameters():
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return opt


#: The update rules the audit runs.
UPDATE_RULES = (
    UpdateRule("B-SGD", "bsgd"),
    UpdateRule("SM", "sm"),
    UpdateRule("UN", "un"),
    UpdateRule("SM+momentum(geoopt)", "sm", options=dict(momentum=0.9)),
    UpdateRule("SM+momentum0", "sm", options=dict(momentum=0.9), zero_buffer=True),
    UpdateRule("SM+nesterov0", "sm", options=dict(momentum=0.9, nesterov=True),
               zero_buffer=True),
    UpdateRule("SM+wd", "sm", options=dict(weight_decay=1e-2)),
    UpdateRule("UN+nesterov", "un", options=dict(momentum=0.9, nesterov=True)),
    UpdateRule("B-Adam", "bsgd", "adam", lr=1e-3),
    UpdateRule("SM+Adam", "sm", "adam", lr=1e-3),
)


def _constant(x: torch.Tensor, tol: float) -> bool:
    return x.numel() == 0 or float(x.max() - x.min()) <= tol


def predict(rule: UpdateRule, group: RescalingGroup, model: nn.Module, tol: float = 1e-6
            ) -> bool:
    r"""Does the theory say that ``rule`` is equivariant under ``group``?

    With each generator acting on a weight as :math:`(r_i + c_j) W_{ij}`:

    - **SM** (eqs. (7)-(8)): the row metric :math:`\mathrm{Diag}(\|w_i\|^2)^{-1}` is
      invariant iff the columns of every filter weight are scaled by one common factor
      (:math:`c` constant); the column metric of :math:`\theta` iff its rows are
      (:math:`r` constant); every Euclidean parameter must be left alone. Momentum and
      Nesterov keep this (the buffer transforms like the gradient); RiemannianAdam too
      (its second moment is the per-filter norm :math:`\|w_i\|^2 \|\nabla_{w_i}\|^2`).
    - **UN**: the projection removes row scalings of the oblique weights, so the start
      :math:`P(g.w) = w` iff every oblique weight has :math:`c` constant and every
      Euclidean parameter (:math:`\theta`) is left alone; then every optimiser follows the
      same trajectory.
    - **B-SGD**, **B-Adam** and any weight decay: only the trivial group. So is SM with
      geoopt's momentum buffer (its first step adds :math:`\mu \nabla L`, see
      :class:`UpdateRule`), unless ``zero_buffer``.
    """
    dec = declare(copy.deepcopy(model), rule.update)
    euclidean_mixed = rule.options.get("weight_decay", 0) > 0 or (
        rule.options.get("momentum", 0) > 0 and not rule.zero_buffer)
    trivial_only = rule.update == "bsgd" or (rule.update == "sm" and euclidean_mixed)
    for xi in group.generators():
        for name, (r, c) in group.space.split(xi).items():
            site, manifold = group.space.site(name), dec[name]
            if site.bias is not None and float(r.abs().max()) > tol:
                return False  # biases are Euclidean: their rows must not be scaled
            moves = not (_constant(r, tol) and _constant(c, tol)
                         and abs(float(r[0] + c[0])) <= tol)
            if trivial_only or isinstance(manifold, geoopt.Euclidean):
                if moves:
                    return False
            elif getattr(manifold, "side", "left") == "right":
                if not _constant(r, tol):
                    return False
            elif not _constant(c, tol):
                return False
    return True


# -- discovering symmetries ---------------------------------------------------------------------
@dataclass
class Discovery:
    """What :func:`discover` found.

    Attributes
    ----------
    dim : int
        number of independent rescaling symmetries, counted in parameter space
    basis : torch.Tensor
        ``(space.dim, dim)`` generators in :class:`ScalingSpace` coordinates, orthonormal as
        parameter-space vectors
    singular_values : torch.Tensor
        relative singular values (largest 1) of the output Jacobian restricted to the
        candidate directions, ascending
    threshold : float
        singular values below it count as symmetries
    gap : float
        ratio of the first singular value above the threshold to the last one below it
        (``inf`` when the last is exactly zero); a large gap means a clean count
    candidates : int
        number of candidate generators (rows and columns of every weight)
    rank : int
        dimension of their span in parameter space
    space : ScalingSpace
    """

    dim: int
    basis: torch.Tensor
    singular_values: torch.Tensor
    threshold: float
    gap: float
    candidates: int
    rank: int
    space: ScalingSpace

    def group(self, model: nn.Module) -> RescalingGroup:
        """The discovered group, acting on ``model`` (or any model with the same names)."""
        return RescalingGroup(model, self.basis, "discovered", space=self.space)

    def __str__(self) -> str:
        below = self.singular_values[self.dim - 1] if self.dim else float("nan")
        above = (self.singular_values[self.dim] if self.dim < len(self.singular_values)
                 else float("nan"))
        return (f"{self.dim} symmetries among {self.candidates} candidates (span "
                f"{self.rank}); singular values {float(below):.2e} | {float(above):.2e} "
                f"(threshold {self.threshold:.0e}, gap {self.gap:.2e})")


def discover(model: nn.Module, inputs: torch.Tensor, *, threshold: float = 1e-4,
             train: bool = True, dtype: torch.dtype = torch.float64, chunk: int = 64
             ) -> Discovery:
    r"""Find the rescaling symmetries of any ``Linear``/``ConvNd`` (+BN) model numerically.

    Candidates are the scalings of every row (filter, with its bias) and every column of
    every weight. With :math:`C` the matrix of candidate generators in parameter space and
    :math:`J` the Jacobian of the outputs on ``inputs``, the symmetries are the parameter-space
    vectors :math:`C v` with :math:`J C v = 0`. :math:`J C` is computed column by column with
    forward-mode JVPs (:func:`torch.func.jvp`, vectorised with :func:`torch.func.vmap`);
    :math:`C` is whitened with its Gram matrix so that dependent candidates (scaling every
    row of a matrix equals scaling every column) are not counted. Then

    .. math:: J C P = U \Sigma Z^T, \quad P^T C^T C P = I,

    and the symmetries are :math:`P z_k` for the singular values
    :math:`\sigma_k / \sigma_{\max} <` ``threshold``.

    Parameters
    ----------
    model : nn.Module
        the model (not modified: a copy in ``dtype`` is used)
    inputs : torch.Tensor
        a batch; ``len(inputs) * outputs`` should exceed the number of candidates
    threshold : float
        relative singular value below which a direction counts as a symmetry. Batch norm
        with ``eps > 0`` is only approximately invariant (relative effect about
        ``eps / var(h)``), hence the default ``1e-4`` rather than round-off level.
    train : bool
        evaluate batch norm with batch statistics (default; the symmetry of eq. (3)) or with
        its running statistics
    dtype : torch.dtype
        computation dtype (default float64)
    chunk : int
        JVPs per vectorised batch

    Notes
    -----
    The null space is measured on finite inputs: a dead unit, or a pooling pair whose
    winner never changes, adds spurious directions. Use enough, varied inputs (e.g. a few
    hundred random images), and check :attr:`Discovery.gap`.
    """
    net = copy.deepcopy(model).to(dtype=dtype).train(train).requires_grad_(False)
    for mod in net.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and train:
            mod.track_running_stats = False
            mod.running_mean = mod.running_var = mod.num_batches_tracked = None
    space = ScalingSpace(net)
    all_params = {n: p.detach() for n, p in net.named_parameters()}
    keys = [s.weight for s in space.sites] + [s.bias for s in space.sites if s.bias]
    primals = {k: all_params[k] for k in keys}
    x = inputs.to(dtype=dtype, device=next(iter(primals.values())).device)

    def forward(p):
        return functional_call(net, p, (x,))

    def column(v):
        return jvp(forward, (primals,), (space.tangent(v, primals),))[1].reshape(-1)

    eye = torch.eye(space.dim, dtype=dtype, device=x.device)
    jc = torch.cat([vmap(column)(eye[i:i + chunk]) for i in range(0, space.dim, chunk)]).T
    evals, evecs = torch.linalg.eigh(space.gram(primals))
    keep = evals > evals.max() * space.dim * torch.finfo(dtype).eps * 10
    p = evecs[:, keep] / evals[keep].sqrt()
    _, sv, zt = torch.linalg.svd(jc @ p, full_matrices=True)
    r = p.shape[1]
    sv_full = torch.zeros(r, dtype=dtype, device=x.device)
    sv_full[: sv.numel()] = sv[:r]
    order = torch.argsort(sv_full)
    rel = sv_full[order] / sv_full.max()
    z = zt.T[:, order]
    dim = int((rel < threshold).sum())
    if dim < r:
        lo = float(rel[dim - 1]) if dim else 0.0
        gap = float(rel[dim]) / lo if lo > 0 else math.inf
    else:
        gap = math.nan
    basis = (p @ z[:, :dim]).to(torch.float64).cpu()
    return Discovery(dim, basis, rel.to(torch.float64).cpu(), threshold, gap, space.dim, r,
                     space)


# -- the audit ---------------------------------------------------------------------------------
@dataclass
class AuditRow:
    """One line of the invariance audit.

    ``measured`` is the relative gap (loss/output, orbit cosine or update gap); ``expected``
    is what the theory predicts (``True``: invariant; ``None``: reported, no prediction);
    ``verdict`` is ``"invariant"``, ``"broken"`` or ``"unclear"`` from the dtype's
    tolerances; ``ok`` says whether the verdict matches the expectation (always true
    without one).
    """

    arch: str
    group: str
    check: str
    measured: float
    expected: bool | None
    verdict: str
    ok: bool
    detail: str = ""


def _verdict(value: float, dtype: torch.dtype) -> str:
    inv, broken = TOLERANCES[dtype]
    if value <= inv:
        return "invariant"
    return "broken" if value >= broken or not math.isfinite(value) else "unclear"


def _row(arch, group, check, value, expected, dtype, detail=""):
    verdict = _verdict(value, dtype)
    ok = verdict == ("invariant" if expected else "broken")
    return AuditRow(arch, group, check, value, expected, verdict, ok, detail)


def audit(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
          groups: Sequence[RescalingGroup], rules: Sequence[UpdateRule] = UPDATE_RULES, *,
          controls: Sequence[tuple[str, Rescaling, bool]] = (), steps: int = 3,
          log_scale: float = 1.0, seed: int = 0, arch: str = "model") -> list[AuditRow]:
    r"""Measure every group against every update rule; compare with :func:`predict`.

    For each group, one random element (log-scale ``log_scale``) is drawn and measured for:
    loss and output invariance (expected: invariant), orbit orthogonality over all
    generators (expected: zero), and ``steps`` steps of every rule
    (:func:`update_invariance`, expected: :func:`predict`). ``controls`` are extra
    ``(label, element, expected_invariant)`` loss checks, e.g. negative scalings.
    """
    dtype = inputs.dtype
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for group in groups:
        g = group.sample(log_scale, gen).calibrate(model, inputs)
        li = loss_invariance(model, g, inputs, targets)
        rows.append(_row(arch, group.name, "loss+outputs", max(li["loss_gap"], li["output_gap"]),
                         True, dtype, f"loss {li['loss']:.4g} -> {li['loss_g']:.4g}"))
        orth = orbit_orthogonality(model, group, inputs, targets)
        rows.append(_row(arch, group.name, "<grad L, xi(w)>", float(orth.max()), True, dtype,
                         f"max over {group.dim} generators"))
        for rule in rules:
            ui = update_invariance(model, g, rule.make, inputs, targets, steps)
            rows.append(_row(arch, group.name, f"update {rule.name}", ui["gap"],
                             predict(rule, group, model), dtype,
                             f"params {ui['param_gap']:.1e} outputs {ui['output_gap']:.1e} "
                             f"(start {ui['start_output_gap']:.1e})"))
    for label, element, expected in controls:
        li = loss_invariance(model, element, inputs, targets)
        rows.append(_row(arch, label, "loss+outputs", max(li["loss_gap"], li["output_gap"]),
                         expected, dtype, f"loss {li['loss']:.4g} -> {li['loss_g']:.4g}"))
    return rows


def _untied_pair_group(model) -> RescalingGroup:
    """Not a symmetry of Arch1: the first row of every pooling pair of W_L scaled, the
    columns of theta compensating (one pair whose winner changes suffices to break it)."""
    names, theta, _ = _paper_net(model)
    return _make(RescalingGroup, model, [[("row", names[-1], slice(0, None, 2), 1.0),
                                          ("col", theta, slice(None), -1.0)]],
                 "untied pairs (control)", ["even rows of W_L"], len(names), 0)


def audit_rows(arch: int = 1, depth: int = 2, *, width: int = 64, in_features: int = 784,
               num_classes: int = 10, batch: int = 100, steps: int = 3,
               dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu",
               seed: int = 0, log_scale: float = 1.0, bn_eps: float = 1e-30,
               discover_inputs: int = 0, rules: Sequence[UpdateRule] = UPDATE_RULES
               ) -> list[AuditRow]:
    r"""The invariance audit of Arch1 or Arch2 on random Gaussian data.

    Groups: Arch1's paper group and full group, or Arch2's group; plus the group found by
    :func:`discover`. Controls that must *break* the loss: an untied pooling pair and a
    negative :math:`\beta` (Arch1); negative row scalings and, with ``eps = 1e-5``, rows
    scaled by ``1e-3`` (Arch2), beside the same scaling with ``eps = 1e-30`` (invariant).

    Parameters
    ----------
    arch, depth, width, in_features, num_classes
        the network (:class:`manifold_nets.Arch1` / :class:`manifold_nets.Arch2`)
    batch : int
        mini-batch size of the checks (standard Gaussian inputs, random labels). Gaussian
        rather than pixel-like inputs: all-positive inputs make each pooling pair's winner
        almost constant, which adds spurious directions to :func:`discover`.
    steps : int
        optimiser steps per update check
    dtype, device
        where to compute; the verdict tolerances depend on ``dtype``
    seed : int
        seeds the network, the data and the group elements
    log_scale : float
        group elements have log-scales ``log_scale * N(0, 1)``
    bn_eps : float
        Arch2's batch-norm ``eps`` for the group checks. Default ``1e-30``: torch refuses
        ``eps = 0`` in training, and PyTorch's ``1e-5`` already moves the outputs by about
        ``3e-4`` (relative) for log-scales of order 1, which is a real but small breaking
        of eq. (3). The ``eps`` rows use ``1e-5`` and ``1e-30``.
    discover_inputs : int
        inputs for :func:`discover` (default: enough for the candidate count)

    Returns
    -------
    list of AuditRow
    """
    from .nets import Arch1, Arch2

    gen = torch.Generator().manual_seed(seed)
    if arch == 1:
        net = Arch1(depth, width, in_features, num_classes, generator=gen)
    elif arch == 2:
        net = Arch2(depth, width, in_features, num_classes, bn_eps=bn_eps, generator=gen)
    else:
        raise ValueError(f"arch must be 1 or 2, got {arch!r}")
    net = net.to(device=device, dtype=dtype)
    x = torch.randn(batch, in_features, generator=gen, dtype=dtype).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    label = f"Arch{arch} L={depth}"
    if arch == 1:
        groups = [arch1_paper_group(net), arch1_full_group(net)]
    else:
        groups = [arch2_group(net)]
        groups[0].name += f" (eps={bn_eps:g})"
    n_disc = discover_inputs or 2 * ScalingSpace(net).dim // num_classes + 64
    xd = torch.randn(n_disc, in_features, generator=gen, dtype=dtype).to(device)
    # Discover on the audit batch too: a direction that is a symmetry only of other data
    # (a pooling pair whose winner never changes there) would fail the checks on ``x``.
    found = discover(net, torch.cat([x, xd]))
    disc = found.group(net)
    disc.name = f"discovered (dim {found.dim})"
    groups.append(disc)
    rows = audit(net, x, y, groups, rules, steps=steps, log_scale=log_scale, seed=seed,
                 arch=label)
    # controls: loss and orbit must break
    names, theta, _ = _paper_net(net)
    space = ScalingSpace(net)
    controls = []
    if arch == 1:
        untied = _untied_pair_group(net)
        controls.append((untied.name, untied.from_coords([1.0]), False))
        orth = orbit_orthogonality(net, untied, x, y)
        rows.append(_row(label, untied.name, "<grad L, xi(w)>", float(orth.max()), False,
                         dtype, "one generator"))
        beta = torch.ones(width, dtype=torch.float64)
        beta[:2] = -1.0
        theta_c = torch.ones(width // 2, dtype=torch.float64)
        theta_c[0] = -1.0
        controls.append(("negative beta_1 (control)",
                         Rescaling(space, {names[-1]: (beta, None), theta: (None, theta_c)},
                                   allow_negative=True), False))
    else:
        signs = torch.ones(width, dtype=torch.float64)
        signs[::2] = -1.0
        controls.append(("negative A entries (control)",
                         Rescaling(space, {n: (signs, None) for n in names},
                                   allow_negative=True), False))
    rows += audit(net, x, y, [], rules=(), controls=controls, arch=label)
    if arch == 2:
        small = Rescaling(space, {n: (torch.full((width,), 1e-3), None) for n in names})
        for eps, expected in ((1e-5, False), (1e-30, True)):
            net_eps = Arch2(depth, width, in_features, num_classes, bn_eps=eps)
            net_eps.load_state_dict(net.state_dict())
            net_eps = net_eps.to(device=device, dtype=dtype)
            li = loss_invariance(net_eps, small, x, y)
            rows.append(_row(label, f"rows x 1e-3, eps={eps:g}", "loss+outputs",
                             max(li["loss_gap"], li["output_gap"]), expected, dtype,
                             f"loss {li['loss']:.4g} -> {li['loss_g']:.4g}"))
    theory = depth * (width // 2 if arch == 1 else width)
    local = found.dim - theory
    for r in rows:
        if "discovered" in r.group:
            r.detail = r.detail or str(found)
            if local:
                # Directions that are symmetries of these inputs only to first order (a
                # pooling pair whose winner never changes on them, a dead unit): finite
                # group elements along them may change the loss, so no prediction is made.
                r.expected, r.ok = None, True
                r.detail += f"; not counted: {local:+d} data-local directions"
    rows.append(AuditRow(label, disc.name, "dimension", float(found.dim), None,
                         f"{found.dim} vs {theory}", True,
                         f"theory {theory}; {found}"))
    return rows


def format_audit(rows: Sequence[AuditRow]) -> str:
    """The audit as a fixed-width table, one line per row, with a summary line."""
    head = ("arch", "group", "check", "gap", "expected", "measured", "ok", "detail")
    cells = [(r.arch, r.group, r.check, f"{r.measured:.1e}",
              {True: "invariant", False: "broken", None: "-"}[r.expected], r.verdict,
              "-" if r.expected is None else "yes" if r.ok else "NO", r.detail)
             for r in rows]
    widths = [max(len(c[i]) for c in cells + [head]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)).rstrip()
              for cell in cells]
    counted = [r for r in rows if r.expected is not None]
    bad = sum(not r.ok for r in counted)
    lines.append(f"{len(counted) - bad}/{len(counted)} expectations hold"
                 + ("" if not bad else f"; {bad} do NOT")
                 + f" ({len(rows) - len(counted)} rows reported without a prediction)")
    return "\n".join(lines)


def _run_check(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    if args.device == "cuda" and not torch.cuda.is_available():
        print("manifold-nets check: --device cuda but CUDA is not available")
        return 2
    if not args.bn_eps > 0:
        args.parser.error(f"argument --bn-eps: must be > 0, got {args.bn_eps!r}")
    rows = audit_rows(args.arch, args.depth, width=args.width, in_features=args.in_features,
                      batch=args.batch, steps=args.steps, dtype=dtype, device=args.device,
                      seed=args.seed, bn_eps=args.bn_eps)
    print(f"Invariance audit: Arch{args.arch}, depth {args.depth}, width {args.width}, "
          f"{args.dtype} on {args.device}, seed {args.seed}, {args.steps} steps, "
          f"tolerances invariant <= {TOLERANCES[dtype][0]:g}, broken >= "
          f"{TOLERANCES[dtype][1]:g}")
    print(format_audit(rows))
    return 0 if all(r.ok for r in rows) else 1


def register_cli(sub) -> None:
    p = sub.add_parser("check", help="audit loss and update invariance under the rescaling "
                                     "groups (exit 0 iff every expectation holds)")
    p.add_argument("--arch", type=int, choices=(1, 2), default=1)
    from .cli import positive_int

    p.add_argument("--depth", type=positive_int, default=2)
    p.add_argument("--width", type=positive_int, default=64)
    p.add_argument("--in-features", type=positive_int, default=784)
    p.add_argument("--batch", type=positive_int, default=100)
    p.add_argument("--steps", type=positive_int, default=3)
    p.add_argument("--bn-eps", type=float, default=1e-30,
                   help="Arch2 batch-norm eps for the group checks (default 1e-30: "
                        "effectively exact; torch refuses 0)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_check, parser=p)
