r"""The rescaling symmetries of a model from its traced graph (:func:`structural_symmetries`).

The dense method of :func:`~manifold_nets.symmetry.discover` needs more output values than
candidate directions: on a ResNet-18 that is ~14,000 candidates, hundreds of inputs and
days of JVPs. This module derives the same count from the structure of the computation,
traced with :mod:`torch.fx` and run once on two inputs (for the shapes).

**The model of a symmetry.** A candidate direction (the log-scales of
:class:`~manifold_nets.symmetry.groups.ScalingSpace`) changes every value :math:`h` of the
computation, to first order, into :math:`(1 + s) \odot h + \delta`: a *scale*
:math:`s` per element and a *shift* :math:`\delta` that does not depend on the input
sample. It is a symmetry when every output has :math:`s = 0, \delta = 0`. Each operation
constrains its operands and defines its result:

- inputs and constants: :math:`s = 0, \delta = 0`;
- ``Linear``/``ConvNd`` with rows :math:`r`, columns :math:`c` and bias :math:`b`: for
  every position :math:`p` (a pattern of input entries), :math:`s_{x,p,i} + c_i = u_p`
  for every input channel :math:`i` it reads, and the output has
  :math:`s_{y,p,o} = r_o + u_p`, :math:`\delta_y = W \delta_x - u_p b`; a grouped
  (or depthwise) conv is one such rule per group, with its own :math:`u`, and one column
  log-scale per input channel;
- ``Embedding``: :math:`s_{y,p,d} = r_{t_p} + c_d` (the rows of the tokens present are
  tied; rows of absent tokens change nothing);
- batch norm (batch statistics): its input scale is constant per channel and its shift
  is absorbed; layer norm: its input scale is constant over the normalised dims of each
  position and the uniform part of its shift is absorbed; ``nn.RMSNorm`` likewise, with
  no shift absorbed; group norm likewise per group;
  the output of an affine normalisation has :math:`s_k = g_k` (its own candidate);
- ReLU, LeakyReLU, dropout (off): :math:`s` passes, :math:`\delta = 0`; max- and
  average-pooling (modules or ``torch.nn.functional``), means, sums and maxima over
  dimensions: the scales in a window are equal and pass;
- addition: both operands have the same scale, shifts add; a product adds scales;
- attention (``nn.MultiheadAttention``, ``F.scaled_dot_product_attention``): query and
  key dimensions pair, :math:`s_{q,d} + s_{k,d} = 0`; the key's shift is absorbed by the
  soft-max, the query's must vanish; the output has the value's scale;
- soft-max, GELU, tanh and every other non-homogeneous operation: :math:`s = 0` and
  :math:`\delta = 0` on both sides (a soft-max absorbs a shift along its dimension);
- anything else is *unsupported*: it is named, and treated as breaking every scaling
  through it (which can only under-count).

Scales are tracked per element (with the two samples), so reshapes, permutes, slicing and
concatenation are exact. Every relation is linear in the candidates' log-scales: the
symmetries are the solutions, mapped to parameter space. Equalities are merged with a
union-find; the remaining relations (shifts, attention, products, patterns that differ
between positions) are solved sparsely: a relation that defines one variable from others
is eliminated, and what is left is solved densely per connected component. The solutions
are orthonormalised in candidate coordinates by a sparse Gram-Schmidt in the order of the
families (the residual stream's scale, which meets every layer, last); where a family
completes a candidate direction that changes no parameter (a bias-free weight's rows up
and columns down), one of its directions is dropped. Each family's size is what it adds
to the rank in parameter space, and the basis is a sparse matrix: a Gram-Schmidt in the
parameter-space metric would couple every row of a weight to every column and fill it.

The analysis assumes generic weights (no weight column exactly zero) and generic inputs:
a dead ReLU unit or a pooling pair whose winner never changes on some data is a symmetry
of that data only, which the dense method counts and this one does not.
"""

from __future__ import annotations

import copy
import inspect
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .groups import ScalingSpace, block_diagonal

__all__ = ["Family", "StructuralResult", "structural_symmetries"]

_ZERO = 0


@dataclass
class Family:
    """A set of symmetries that act on the same places of a model.

    Parameters
    ----------
    kind, label, size, layers, columns, resolves
        The attributes of the same names (``columns`` and ``resolves`` default to empty).

    Attributes
    ----------
    kind : str
        ``"per-filter"``, ``"units"``, ``"stream"``, ``"qk"``, ``"vo"``, ``"bias"``,
        ``"unused"`` or ``"coupled"``
    label : str
        a sentence naming the layers, e.g. ``"per-filter scaling of layer1.0.conv1"``
    size : int
        independent symmetries (in parameter space) this family adds
    layers : list of str
        the modules whose parameters it rescales
    columns : list of int
        its columns in ``basis`` of :class:`~manifold_nets.symmetry.discover.Discovery`
        (and of :class:`StructuralResult`)
    resolves : dict
        ``{"un": bool, "sm": bool}``: whether that update is equivariant under the family
        (filled by :func:`~manifold_nets.symmetry.discover.discover`); both true for
        parameters that never reach the outputs, which no update moves off a symmetry

    Examples
    --------
    Printed, a family names its layers, its size and what resolves it (the first layer
    has no bias here; with one, the family would also scale that Euclidean bias and SM
    would not resolve it either):

    >>> import torch
    >>> from manifold_nets.symmetry import discover
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False), torch.nn.ReLU(),
    ...                           torch.nn.Linear(8, 3))
    >>> family = discover(net, torch.randn(64, 4)).families[0]
    >>> family.kind, family.size, family.layers
    ('units', 8, ['0', '2'])
    >>> print(family)
    units between 0 and 2 (8): not resolved by UN, resolved by SM
    """

    kind: str
    label: str
    size: int
    layers: list[str]
    columns: list[int] = field(default_factory=list)
    resolves: dict[str, bool] = field(default_factory=dict)

    def __str__(self) -> str:
        res = ", ".join(f"{'resolved' if v else 'not resolved'} by {k.upper()}"
                        for k, v in self.resolves.items())
        return f"{self.label} ({self.size})" + (f": {res}" if res else "")


@dataclass
class StructuralResult:
    """What :func:`structural_symmetries` derived.

    Parameters
    ----------
    dim, basis, families, candidate_rank, unsupported, notes, eps
        The attributes of the same names (``eps`` defaults to 0).

    Attributes
    ----------
    dim : int
        The number of independent symmetries, counted in parameter space.
    basis : torch.Tensor
        ``(space.dim, dim)``, sparse COO: the symmetries in
        :class:`~manifold_nets.symmetry.groups.ScalingSpace` coordinates, family by family.
    families : list of Family
        The symmetries grouped by the places they act on (``resolves`` still empty).
    candidate_rank : int
        The dimension of the span of all candidate directions in parameter space.
    unsupported : list of str
        Operations the analysis does not model, treated as breaking every scaling
        through them.
    notes : list of str
        Remarks on the inputs (e.g. embedding rows never used).
    eps : float
        The largest constant the analysis took as a normalisation's ``eps`` (added to a
        statistic in an exported graph); the symmetries hold up to it.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.symmetry.groups import ScalingSpace
    >>> from manifold_nets.symmetry.structure import structural_symmetries
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
    ...                           torch.nn.Linear(8, 3))
    >>> result = structural_symmetries(net, (torch.randn(2, 4),), ScalingSpace(net))
    >>> result.dim, result.candidate_rank, [f.size for f in result.families]
    (8, 23, [8])
    """

    dim: int
    basis: torch.Tensor
    families: list[Family]
    candidate_rank: int
    unsupported: list[str]
    notes: list[str]
    eps: float = 0.0  # the largest constant taken as a normalisation's eps in the graph


# ----------------------------------------------------------------------------------------
# Variables, equalities and linear relations.


class _System:
    """Integer variables (log-scales), a union-find of equalities, and linear rows."""

    def __init__(self):
        self.parent = [0]
        self.origin: list[tuple] = [("zero", "", -1)]
        self.rows: list[dict[int, float]] = []

    def new(self, kind: str, node: str, n: int = 1) -> torch.Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.origin.extend((kind, node, k) for k in range(n))
        return torch.arange(start, start + n)

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union(self, a: int, b: int) -> None:
        if a < 0 or b < 0:
            return
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb == _ZERO:
            ra, rb = rb, ra
        self.parent[rb] = ra  # the zero class keeps its root

    def union_pairs(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Union ``a[k]`` with ``b[k]`` for every k (ids < 0 are exact zeros: skipped)."""
        a, b = a.reshape(-1), b.reshape(-1)
        keep = (a != b) & (a >= 0) & (b >= 0)
        if not bool(keep.any()):
            return
        pairs = torch.unique(torch.stack([a[keep], b[keep]], 1), dim=0).tolist()
        for x, y in pairs:
            self.union(x, y)

    def union_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Union the entries of every row of a 2-D id matrix; returns one id per row (the
        first non-negative entry, -1 for an all-negative row)."""
        if ids.numel() == 0:
            return torch.full((ids.shape[0],), -1, dtype=torch.long)
        valid = ids >= 0
        first_pos = torch.where(valid.any(1), valid.float().argmax(1), torch.zeros_like(
            valid[:, 0], dtype=torch.long))
        first = ids.gather(1, first_pos[:, None]).squeeze(1)
        first = torch.where(valid.any(1), first, torch.full_like(first, -1))
        self.union_pairs(ids, first[:, None].expand_as(ids))
        return first

    def pin(self, ids: torch.Tensor) -> None:
        u = torch.unique(ids)
        for a in u[u > 0].tolist():
            self.union(a, _ZERO)

    def row(self, terms: dict[int, float]) -> None:
        terms = {k: v for k, v in terms.items() if v != 0 and k != _ZERO}
        if terms:
            self.rows.append(terms)


def _add_form(*parts: tuple[float, dict[int, float] | int]) -> dict[int, float]:
    out: dict[int, float] = {}
    for coef, f in parts:
        if isinstance(f, int):
            f = {f: 1.0}
        for k, v in f.items():
            out[k] = out.get(k, 0.0) + coef * v
    return {k: v for k, v in out.items() if v != 0}


# ----------------------------------------------------------------------------------------
# Symbolic values.


@dataclass
class _Sym:
    """The scale ids of a tensor (its shape) and its shift terms ``(form, coefficients)``."""

    ids: torch.Tensor
    shifts: list[tuple[dict[int, float], torch.Tensor]] = field(default_factory=list)

    def map(self, fn) -> _Sym:
        return _Sym(fn(self.ids), [(f, fn(c)) for f, c in self.shifts])


@dataclass
class _Param:
    """A weight with candidates, read by ``get_attr`` in an exported graph: the op that
    uses it (linear, conv, embedding, a normalisation) applies its site's rule."""

    name: str
    value: torch.Tensor


def _zero_like(t: torch.Tensor) -> _Sym:
    return _Sym(torch.zeros(t.shape, dtype=torch.long))


def _merge(shifts):
    merged: dict[tuple, list] = {}
    for form, coef in shifts:
        key = tuple(sorted(form.items()))
        if key in merged:
            merged[key][1] = merged[key][1] + coef
        else:
            merged[key] = [form, coef]
    return [(f, c) for f, c in merged.values() if bool(c.abs().max() > 0)]


class _Analysis(torch.fx.Interpreter):
    """Runs the traced graph on real tensors and propagates :class:`_Sym` beside them."""

    def __init__(self, gm: torch.fx.GraphModule, space: ScalingSpace):
        super().__init__(gm)
        self.space = space
        self.sys = _System()
        self.forms: dict[int, dict[int, float]] = {}  # candidate coordinate -> form
        self.sym: dict[torch.fx.Node, object] = {}
        self.unsupported: list[str] = []
        self.notes: list[str] = []
        self.modules = dict(gm.named_modules())
        self.module_names: set[str] = set()  # the model's (an exported graph's labels)
        self.called: set[str] = set()
        self.dtype = torch.float64
        self.absorbed: set[int] = set()  # variables whose scale a normalisation removes
        self.consumers: dict[int, set[str]] = {}  # variable -> layers reading it
        # the scales of both operands along the contracted dim of every product of two
        # activations (Q K^T: a family on both sides is a Q/K scaling)
        self.contracted: list[tuple[torch.Tensor, torch.Tensor]] = []
        # weights and biases of the sites (what an exported graph reads by get_attr)
        self.eps = 0.0  # the largest constant taken as a normalisation's eps
        self.node_label: dict[torch.fx.Node, str] = {}  # an ATen op -> its module
        self.site_params = {k for site in space.sites for k in (site.weight, site.bias) if k}
        self.site_params |= set(space.names)

    # -- bookkeeping ----------------------------------------------------------------------
    def label(self, n: torch.fx.Node) -> str:
        """The module a node belongs to (an exported op: the innermost module that ran
        it, so that a family names ``norm`` rather than ``rsqrt_2``), else the node."""
        if n in self.node_label:
            return self.node_label[n]
        if n.op == "call_module":
            return n.target
        stack = n.meta.get("nn_module_stack")
        if stack:
            path = list(stack.values())[-1][0]
            if isinstance(path, str) and path in self.module_names:
                return path
        return n.name

    def assign(self, coords: torch.Tensor, forms: Sequence[dict[int, float]]) -> None:
        for k, f in zip(coords.tolist(), forms, strict=True):
            if k in self.forms:
                self.sys.row(_add_form((1.0, self.forms[k]), (-1.0, f)))
            else:
                self.forms[k] = f

    def kill(self, shifts, center=None) -> None:
        """The shifts must vanish (after ``center``, which removes what is absorbed)."""
        shifts = _merge(shifts)
        if not shifts:
            return
        coefs = torch.stack([(center(c) if center else c).reshape(-1) for _, c in shifts], 1)
        gram = coefs.T @ coefs
        if float(gram.abs().max()) == 0:
            return
        w, v = torch.linalg.eigh(gram)
        keep = w > w.max() * 1e-10
        for col in v[:, keep].T:
            self.sys.row(_add_form(*[(float(a), f) for a, (f, _) in
                                     zip(col, shifts, strict=True)]))

    def pin(self, s: _Sym) -> None:
        self.sys.pin(s.ids)
        self.kill(s.shifts)

    def fail(self, node: torch.fx.Node, why: str, syms) -> None:
        syms = list(syms)  # read three times below
        owns = node.op == "call_module" and any(
            True for _ in self.modules[node.target].parameters())
        if not owns and not any(isinstance(s, _Param) for s in syms) and all(
                not isinstance(s, _Sym) or (not s.shifts and not bool(s.ids.any()))
                for s in syms):
            return  # an op on constants only (masks, positions, guards): a constant
        self.unsupported.append(f"{node.name} ({why})")
        for s in syms:
            if isinstance(s, _Sym):
                self.pin(s)
        for s in syms:
            if isinstance(s, _Param):
                site = self.space.find(s.name)
                if site is not None:
                    idx = torch.arange(site.row_offset, site.col_offset + site.cols)
                    self.assign(idx, [{}] * len(idx))
        # parameters of an unsupported module keep their scale
        if node.op == "call_module":
            for site in self.space.sites:
                if site.module == node.target or site.module.startswith(f"{node.target}."):
                    idx = torch.arange(site.row_offset, site.col_offset + site.cols)
                    self.assign(idx, [{}] * len(idx))

    # -- the interpreter ------------------------------------------------------------------
    def run_node(self, n: torch.fx.Node):
        self.current = n
        result = super().run_node(n)
        args = torch.fx.node.map_arg(n.args, lambda a: self.sym.get(a))
        kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: self.sym.get(a))
        self.sym[n] = self.rule(n, result, args, kwargs)
        return result

    def rule(self, n, result, args, kwargs):
        if n.op == "placeholder":
            return _zero_like(result) if isinstance(result, torch.Tensor) else None
        if n.op == "get_attr":
            if isinstance(n.target, str) and n.target in self.space.vectors:
                return self.vector(n, result)
            if isinstance(n.target, str) and n.target in self.site_params:
                return _Param(n.target, result)
            return _zero_like(result) if isinstance(result, torch.Tensor) else None
        if n.op == "output":
            for s in _flatten(args):
                if isinstance(s, _Sym):
                    self.pin(s)
            return None
        if n.op == "call_module":
            return self.module_rule(n, self.modules[n.target], result, args, kwargs)
        return self.function_rule(n, result, args, kwargs)

    # -- modules --------------------------------------------------------------------------
    def module_rule(self, n, mod, result, args, kwargs):
        x = args[0] if args else None
        name = n.target
        self.called.add(name)
        if isinstance(mod, nn.Linear):
            return self.linear(n, name, x, mod.weight, mod.bias, f"{name}.weight")
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return self.conv(n, name, mod, x, result)
        if isinstance(mod, nn.Embedding):
            return self.embedding(n, name, mod, self.args_value(n, 0), result)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            return self.norm(n, name, mod, x, result, kind="batch")
        if isinstance(mod, nn.LayerNorm):
            return self.norm(n, name, mod, x, result, kind="layer")
        if isinstance(mod, _RMS_NORM):
            return self.norm(n, name, mod, x, result, kind="rms")
        if isinstance(mod, nn.GroupNorm):
            return self.norm(n, name, mod, x, result, kind="group")
        if isinstance(mod, (nn.ReLU, nn.LeakyReLU, nn.PReLU)):
            return _Sym(x.ids.clone()) if self.kill(x.shifts) is None else None
        if isinstance(mod, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                            nn.AlphaDropout, nn.Identity)):
            return x
        if isinstance(mod, nn.Flatten):
            return x.map(lambda t: t.flatten(mod.start_dim, mod.end_dim))
        if isinstance(mod, nn.Unflatten):
            return x.map(lambda t: t.unflatten(mod.dim, mod.unflattened_size))
        if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)):
            return self.pool(n, mod, x, result)
        if isinstance(mod, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d,
                            nn.AdaptiveMaxPool2d)):
            return self.adaptive_pool(n, mod, x, result)
        if isinstance(mod, nn.MultiheadAttention):
            return self.mha(n, name, mod, args, kwargs, result)
        if isinstance(mod, nn.MaxUnpool2d):
            return self.unpool(n, x, self.env[n.args[1]], result)
        if isinstance(mod, nn.Softmax):
            return self.softmax(x, mod.dim, result)
        if isinstance(mod, _NONHOMOGENEOUS):
            self.pin(x)
            return _zero_like(result)
        return self.fail(n, f"unsupported module {type(mod).__name__}",
                         _flatten(args)) or _zero_out(result)

    def args_value(self, n, i):
        return self.env[n.args[i]]

    # -- functions ------------------------------------------------------------------------
    def function_rule(self, n, result, args, kwargs):
        t = n.target
        name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
        if isinstance(t, torch._ops.OpOverload):  # an exported graph's ATen op
            name = t.overloadpacket.__name__
            out = self.aten_rule(n, name, result, args, kwargs)
            if out is not _NO_RULE:
                return out
        params = [a for a in _flatten((args, kwargs)) if isinstance(a, _Param)]
        if params:  # a weight used in a way no rule knows: its candidates stay put
            return self.fail(n, f"{name} of the weight {params[0].name}",
                             _flatten((args, kwargs))) or _zero_out(result)
        if not any(isinstance(s, _Sym) for s in _flatten((args, kwargs))):
            return _zero_out(result)  # constants
        if not any(isinstance(r, torch.Tensor) for r in _flatten(result)):
            return None  # shapes, sizes and other plain values carry no scale
        x = args[0]
        if name in _PASS or t in (F.dropout, torch.nn.functional.dropout):
            if isinstance(x, _Sym) and isinstance(result, torch.Tensor) and \
                    result.shape == x.ids.shape:
                return x
        if name in ("relu", "relu_", "leaky_relu") or t in (F.relu, torch.relu, F.leaky_relu):
            self.kill(x.shifts)
            return _Sym(x.ids.clone())
        if name in _SHAPE_OPS or t in (torch.flatten, torch.reshape, torch.permute,
                                       torch.transpose, torch.squeeze, torch.unsqueeze,
                                       torch.t, torch.movedim):
            return self.shape_op(n, result, args, kwargs)
        if t is operator.getitem:
            if isinstance(x, (tuple, list)):
                return x[args[1]]
            if isinstance(x, _Sym):
                return self.shape_op(n, result, args, kwargs)
        if name in ("add", "iadd", "__add__", "__radd__", "sub", "isub", "__sub__", "rsub") \
                or t in (operator.add, operator.iadd, operator.sub, operator.isub,
                         torch.add, torch.sub):
            return self.add(n, result, args, sub=("sub" in name))
        if name in ("mul", "imul", "__mul__", "__rmul__") or t in (operator.mul, operator.imul,
                                                                   torch.mul):
            return self.mul(n, result, args, divide=False)
        if name in ("truediv", "div", "__truediv__", "itruediv") or t in (
                operator.truediv, operator.itruediv, torch.div):
            return self.mul(n, result, args, divide=True)
        if name in ("neg", "__neg__") or t in (operator.neg, torch.neg):
            return _Sym(x.ids, [(f, -c) for f, c in x.shifts])
        if t in (torch.cat, torch.concat, torch.stack) or name in ("cat", "stack", "concat"):
            return self.cat(n, result, args, kwargs, stack=(name == "stack"))
        if name in ("mean", "sum", "amax", "max", "amin", "min") or t in (
                torch.mean, torch.sum, torch.amax, torch.max, torch.amin, torch.min):
            return self.reduce(n, name, result, args, kwargs)
        pool = _POOL_MODULES.get(t)
        if pool is not None and isinstance(x, _Sym):
            pos, kw = torch.fx.node.map_arg((n.args[1:], n.kwargs), lambda a: self.env[a])
            try:
                mod = _pool_module(pool, pos, kw)
            except TypeError as err:
                return self.fail(n, f"functional {name} ({err})", _flatten(args)) or \
                    _zero_out(result)
            if isinstance(mod, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                                nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)):
                return self.adaptive_pool(n, mod, x, result)
            return self.pool(n, mod, x, result)
        if name in ("matmul", "bmm", "__matmul__") or t in (torch.matmul, torch.bmm,
                                                           operator.matmul):
            return self.matmul(n, result, args)
        if t is F.scaled_dot_product_attention or name == "scaled_dot_product_attention":
            return self.sdpa(n, result, args, kwargs)
        if name == "softmax" or t in (F.softmax, torch.softmax):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            return self.softmax(x, dim, result)
        if name in _NONHOMOGENEOUS_FN or t in (F.gelu, torch.tanh, torch.sigmoid, F.silu,
                                               torch.exp, F.softplus, F.elu, F.log_softmax):
            for s in _flatten(args):
                if isinstance(s, _Sym):
                    self.pin(s)
            return _zero_out(result)
        if name in ("float", "double", "to", "type_as", "clone", "detach"):
            return x
        return self.fail(n, f"unsupported operation {name}", _flatten((args, kwargs))) or \
            _zero_out(result)

    # -- ATen ops (torch.export) ----------------------------------------------------------
    def _site_of(self, p: _Param, kind: str = "matrix"):
        site = self.space.find(p.name)
        if site is None or site.kind != kind:
            return None
        self.node_label[self.current] = site.module  # families name modules, not ops
        return site

    def _affine_site(self, args):
        """The site of ``op(x, weight, bias)`` and its bias, or ``(None, None)`` where the
        input is constant or the bias is not the site's."""
        site = self._site_of(args[1])
        bias = args[2] if len(args) > 2 else None
        if site is None or not isinstance(args[0], _Sym) or (
                bias is not None and (not isinstance(bias, _Param) or bias.name != site.bias)):
            return None, None
        return site, bias

    def aten_rule(self, n, name, result, args, kwargs):
        """The rules of the ops an exported graph holds where they differ from the
        functional ones; :data:`_NO_RULE` hands the op to those."""
        values = torch.fx.node.map_arg(n.args, lambda a: self.env[a])
        x = args[0] if args else None
        if name in ("linear", "conv1d", "conv2d") and isinstance(args[1], _Param):
            site, bias = self._affine_site(args)
            if site is None:
                return self.fail(n, f"{name} with {args[1].name}", _flatten(args)) or \
                    _zero_out(result)
        if name == "linear" and isinstance(args[1], _Param):
            return self.linear(n, site.module, x, args[1].value,
                               None if bias is None else bias.value, site.weight)
        if name == "embedding" and isinstance(args[0], _Param):
            site = self._site_of(args[0])
            if site is None:
                return self.fail(n, f"embedding of {args[0].name}", _flatten(args)) or \
                    _zero_out(result)
            return self.embedding(n, site.module, None, values[1], result)
        if name in ("conv1d", "conv2d") and isinstance(args[1], _Param):
            w = args[1].value
            nd = w.dim() - 2
            opts = dict(zip(("stride", "padding", "dilation", "groups"), values[3:],
                            strict=False))
            mod = SimpleNamespace(
                weight=w, bias=None if bias is None else bias.value,
                kernel_size=tuple(w.shape[2:]), stride=opts.get("stride", 1),
                padding=opts.get("padding", 0), dilation=opts.get("dilation", 1),
                groups=opts.get("groups", 1), in_channels=values[0].shape[1],
                out_channels=w.shape[0], padding_mode="zeros")
            if nd == 1:
                mod.stride, mod.padding, mod.dilation = (
                    tuple(v) if isinstance(v, (list, tuple)) else v
                    for v in (mod.stride, mod.padding, mod.dilation))
            return self.conv(n, site.module, mod, x, result)
        if name in ("layer_norm", "rms_norm", "batch_norm", "group_norm"):
            return self._aten_norm(n, name, values, args, x, result)
        if name in ("pow", "rsqrt", "sqrt", "reciprocal") and isinstance(x, _Sym):
            k = {"rsqrt": -0.5, "sqrt": 0.5, "reciprocal": -1.0}.get(name)
            if k is None:
                k = values[1] if isinstance(values[1], (int, float)) else None
            if k is None:
                return _NO_RULE
            return self.power(n, x, float(k), result)
        if name in ("max_pool2d", "max_pool1d", "avg_pool2d", "avg_pool1d",
                    "adaptive_avg_pool2d", "adaptive_avg_pool1d", "max_pool2d_with_indices"):
            cls = _POOL_MODULES.get(getattr(F, name.replace("_with_indices", ""), None))
            if cls is None or not isinstance(x, _Sym):
                return _NO_RULE
            mod = _pool_module(cls, values[1:], {})
            if "adaptive" in name:
                return self.adaptive_pool(n, mod, x, result)
            return self.pool(n, mod, x, result)
        if name in ("_softmax", "softmax", "_safe_softmax"):
            return self.softmax(x, values[1], result)
        if name in ("add", "sub") and isinstance(x, _Sym) and len(values) > 1 and \
                isinstance(values[1], (int, float)) and 0 < abs(values[1]) <= _EPS:
            self.eps = max(self.eps, abs(float(values[1])))
            return x  # a normalisation's eps: the scaling is a symmetry up to it
        if name in ("slice", "select", "alias", "expand", "unsqueeze", "squeeze",
                    "clone", "contiguous", "_to_copy", "to", "lift_fresh_copy", "detach",
                    "detach_", "dropout", "view", "reshape", "permute", "transpose", "t",
                    "flatten", "unflatten", "split", "chunk", "unbind", "repeat"):
            if not isinstance(x, _Sym):
                return _NO_RULE
            if name in ("_to_copy", "to", "lift_fresh_copy", "detach", "detach_", "alias",
                        "clone", "contiguous", "dropout") and \
                    isinstance(result, torch.Tensor) and result.shape == x.ids.shape:
                return x
            return self.shape_op(n, result, args, kwargs)
        return _NO_RULE

    def _aten_norm(self, n, name, values, args, x, result):
        """``layer_norm(x, shape, w, b, eps)``, ``rms_norm(x, shape, w, eps)``,
        ``batch_norm(x, w, b, mean, var, training, ...)``, ``group_norm(x, G, w, b)``."""
        if not isinstance(x, _Sym):
            return _NO_RULE
        w_at = {"layer_norm": 2, "rms_norm": 2, "batch_norm": 1, "group_norm": 2}[name]
        w = args[w_at] if len(args) > w_at else None
        site = self._site_of(w, "norm") if isinstance(w, _Param) else None
        if w is not None and site is None:
            return self.fail(n, f"{name} with the weight {getattr(w, 'name', w)}",
                             _flatten(args)) or _zero_out(result)
        module = site.module if site is not None else n.name
        weight = w.value if site is not None else None
        if name == "batch_norm":
            mod = SimpleNamespace(training=bool(values[5]),
                                  track_running_stats=values[3] is not None, weight=weight)
            return self.norm(n, module, mod, x, result, kind="batch")
        if name == "group_norm":
            mod = SimpleNamespace(num_groups=int(values[1]), weight=weight)
            return self.norm(n, module, mod, x, result, kind="group")
        mod = SimpleNamespace(normalized_shape=tuple(values[1]), weight=weight)
        return self.norm(n, module, mod, x, result,
                         kind="layer" if name == "layer_norm" else "rms")

    def vector(self, n, value):
        """A 1-D weight read into the computation: its entries are its candidates."""
        g = self.sys.new("vector", self.space.site(n.target).module or n.target, value.numel())
        self.assign(self.space.rows(n.target), [{int(v): 1.0} for v in g])
        return _Sym(g.reshape(value.shape))

    def power(self, n, x, k, result):
        """``x ** k``: the scale times ``k``; a shift must vanish."""
        self.kill(x.shifts)
        ids, inverse = torch.unique(x.ids, return_inverse=True)
        out = torch.empty(len(ids), dtype=torch.long)
        for j, v in enumerate(ids.tolist()):
            if v <= _ZERO:
                out[j] = v
            else:
                w = int(self.sys.new("pow", self.label(n))[0])
                out[j] = w
                self.sys.row({w: 1.0, v: -k})
        return _Sym(out[inverse].reshape(result.shape))

    # -- rules ----------------------------------------------------------------------------
    def shape_op(self, n, result, args, kwargs):
        """Apply the same view/permute/index to the ids and the shift coefficients."""
        rest = torch.fx.node.map_arg(n.args[1:], lambda a: self.env[a])
        kw = torch.fx.node.map_arg(n.kwargs, lambda a: self.env[a])

        def apply(t):
            if n.op == "call_method":
                return getattr(t, n.target)(*rest, **kw)
            return n.target(t, *rest, **kw)
        out_ids = apply(args[0].ids)
        if isinstance(out_ids, (tuple, list)):
            parts = [apply(c) for _, c in args[0].shifts]
            return tuple(_Sym(i.clone(), [(f, p[k]) for (f, _), p in
                                          zip(args[0].shifts, parts, strict=True)])
                         for k, i in enumerate(out_ids))
        return _Sym(out_ids, [(f, apply(c)) for f, c in args[0].shifts])

    def add(self, n, result, args, sub):
        a, b = args[0], args[1]
        if not isinstance(b, _Sym) or not isinstance(a, _Sym):
            s, other = (a, b) if isinstance(a, _Sym) else (b, a)
            if isinstance(other, (int, float)) and other == 0:
                return s
            ids = s.ids if isinstance(other, (int, float)) else s.ids
            self.sys.pin(ids)  # adding a constant: the scale must vanish
            return _Sym(torch.zeros(result.shape, dtype=torch.long), s.shifts)
        ia, ib = torch.broadcast_tensors(a.ids, b.ids)
        self.sys.union_pairs(ia, ib)
        shape = result.shape
        shifts = [(f, c.expand(shape)) for f, c in a.shifts] + \
                 [(f, (-c if sub else c).expand(shape)) for f, c in b.shifts]
        return _Sym(ia.clone(), _merge(shifts))

    def mul(self, n, result, args, divide):
        a, b = args[0], args[1]
        if not isinstance(a, _Sym) or not isinstance(b, _Sym):
            i = 0 if not isinstance(a, _Sym) else 1
            v, s = args[i], args[1 - i]
            if divide and i == 0:
                return self.fail(n, "a constant divided by a tensor", [s]) or \
                    _zero_out(result)
            if not isinstance(v, (int, float)):
                return self.fail(n, "product with a non-tensor", [s]) or _zero_out(result)
            scale = 1 / v if divide else v
            return _Sym(s.ids, [(f, c * scale) for f, c in s.shifts])
        # shifts survive only a product with a constant tensor (a parameter or buffer)
        shifts = []
        for s, other in ((a, n.args[1]), (b, n.args[0])):
            if not s.shifts:
                continue
            if isinstance(other, torch.fx.Node) and other.op == "get_attr" and not divide:
                val = self.env[other].detach().to(self.dtype)
                shifts += [(f, (c * val).expand(result.shape)) for f, c in s.shifts]
            else:
                self.kill(s.shifts)
        ia, ib = torch.broadcast_tensors(a.ids, b.ids)
        pairs, inverse = torch.unique(torch.stack([ia.reshape(-1), ib.reshape(-1)], 1),
                                      dim=0, return_inverse=True)
        out = torch.empty(len(pairs), dtype=torch.long)
        sign = -1.0 if divide else 1.0
        for k, (x, y) in enumerate(pairs.tolist()):
            if y <= _ZERO:
                out[k] = x
            elif x <= _ZERO and not divide:
                out[k] = y
            else:
                w = int(self.sys.new("mul", self.label(n))[0])
                out[k] = w
                self.sys.row(_add_form((1.0, w), (-1.0, x), (-sign, y)))
        return _Sym(out[inverse].reshape(ia.shape), _merge(shifts))

    def cat(self, n, result, args, kwargs, stack):
        parts = args[0]
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        if not all(isinstance(p, _Sym) for p in parts):
            return self.fail(n, "concatenation with non-tensors", parts) or _zero_out(result)
        fn = torch.stack if stack else torch.cat
        ids = fn([p.ids for p in parts], dim)
        shifts = []
        for j, p in enumerate(parts):
            for f, c in p.shifts:
                pieces = [c if k == j else torch.zeros_like(q.ids, dtype=self.dtype)
                          for k, q in enumerate(parts)]
                shifts.append((f, fn(pieces, dim)))
        return _Sym(ids, _merge(shifts))

    def reduce(self, n, name, result, args, kwargs):
        x = args[0]
        vals = result[0] if isinstance(result, tuple) else result
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        if isinstance(args[1] if len(args) > 1 else None, _Sym):
            return self.fail(n, f"{name} of two tensors", args[:2]) or _zero_out(result)
        dims = list(range(x.ids.dim())) if dim is None else \
            [dim] if isinstance(dim, int) else list(dim)
        dims = [d % x.ids.dim() for d in dims]
        rest = [d for d in range(x.ids.dim()) if d not in dims]
        perm = x.ids.permute(rest + dims)
        flat = perm.reshape(-1, math.prod(x.ids.shape[d] for d in dims) or 1)
        first = self.sys.union_rows(flat).reshape([x.ids.shape[d] for d in rest])
        if keepdim:
            for d in sorted(dims):
                first = first.unsqueeze(d)
        ids = first.reshape(vals.shape)
        shifts = []
        if name in ("mean", "sum"):
            fn = torch.mean if name == "mean" else torch.sum
            shifts = [(f, fn(c, dim=dims, keepdim=keepdim).reshape(vals.shape))
                      for f, c in x.shifts]
        elif x.shifts:
            for f, c in x.shifts:
                spread = c.amax(dim=dims, keepdim=True) - c.amin(dim=dims, keepdim=True)
                if float(spread.abs().max()) > 0:
                    self.kill(x.shifts)
                    shifts = []
                    break
                shifts.append((f, c.amax(dim=dims, keepdim=keepdim).reshape(vals.shape)))
        out = _Sym(ids, shifts)
        return (out, None) if isinstance(result, tuple) else out

    def softmax(self, x, dim, result):
        self.sys.pin(x.ids)
        self.kill(x.shifts, center=lambda c: c - c.mean(dim, keepdim=True))
        return _zero_like(result)

    # -- layers with candidates -------------------------------------------------------------
    def _affine(self, n, site_weight, patterns, inverse, channel_of, rows_idx, shift_fn,
                x_shifts, tag="out", cols_idx=None):
        """The rule of a Linear/ConvNd/in-projection on input patterns.

        ``patterns`` ``(P, E)``: input scale ids per entry (``-1``: padding), ``channel_of``
        ``(E,)``: the weight column of each entry, ``inverse``: the pattern of every
        output position. Returns the output ids ``(*positions, rows)``, the propagated
        shifts, and the ``u`` variable of every pattern (for the bias shift ``-u b``).
        """
        space, sys = self.space, self.sys
        cols_idx = space.cols(site_weight) if cols_idx is None else cols_idx
        n_in = len(cols_idx)
        # entries of one channel in one pattern share a scale
        P, E = patterns.shape
        order = torch.argsort(channel_of, stable=True)
        counts = torch.bincount(channel_of, minlength=n_in)
        a = torch.full((P, n_in), -1, dtype=torch.long)
        if bool((counts == counts[0]).all()) and int(counts[0]) > 0:
            grouped = patterns[:, order].reshape(P * n_in, int(counts[0]))
            a = sys.union_rows(grouped).reshape(P, n_in)
        else:
            for i in range(n_in):
                cols = (channel_of == i).nonzero().reshape(-1)
                if len(cols):
                    a[:, i] = sys.union_rows(patterns[:, cols])
        present = a >= 0
        p0 = int(present.sum(1).argmax())
        roots = torch.tensor([sys.find(int(v)) if v >= 0 else -1 for v in a.reshape(-1)]
                             ).reshape(a.shape)
        u0 = int(sys.new("u", self.label(n))[0])
        for v in a[p0][a[p0] > 0].tolist():
            self.consumers.setdefault(v, set()).add(self.label(n))
        self.assign(cols_idx, [{u0: 1.0, int(roots[p0, i]): -1.0} if roots[p0, i] > 0
                               else {u0: 1.0} if roots[p0, i] == 0 else {}
                               for i in range(n_in)])
        u = [u0] * P
        for p in range(P):
            if p == p0:
                continue
            both = present[p] & present[p0]
            same = both & (roots[p] == roots[p0])
            if bool(both.any()) and bool(same.any()):
                sys.union_pairs(a[p][both], a[p0][both])
            elif bool(both.any()):
                up = int(sys.new("u", self.label(n))[0])
                u[p] = up
                for i in both.nonzero().reshape(-1).tolist():
                    sys.row(_add_form((1.0, int(a[p, i])), (-1.0, int(a[p0, i])),
                                      (-1.0, up), (1.0, u0)))
        n_out = len(rows_idx)
        v0 = sys.new(tag, self.label(n), n_out)
        self.assign(rows_idx, [{int(v): 1.0, u0: -1.0} for v in v0])
        outs = torch.empty(P, n_out, dtype=torch.long)
        for p in range(P):
            if u[p] == u0:
                outs[p] = v0
            else:
                vp = sys.new(tag, self.label(n), n_out)
                outs[p] = vp
                for o in range(n_out):
                    sys.row({int(vp[o]): 1.0, int(v0[o]): -1.0, u0: 1.0, u[p]: -1.0})
        ids = outs[inverse]  # (*positions, n_out)
        shifts = [(f, shift_fn(c)) for f, c in x_shifts]
        return ids, shifts, torch.tensor(u)[inverse]

    def _bias_shifts(self, u_at: torch.Tensor, bias, channel_dim: int, shape) -> list:
        """``-u b`` at every position (``u_at``: the ``u`` of each position)."""
        if bias is None or not bool(bias.abs().max() > 0):
            return []
        b = bias.detach().to(self.dtype)
        view = [1] * len(shape)
        view[channel_dim] = -1
        out = []
        for uv in torch.unique(u_at).tolist():
            mask = (u_at == uv).to(self.dtype).unsqueeze(channel_dim)
            out.append(({uv: -1.0}, (mask * b.view(view)).expand(shape)))
        return out

    def linear(self, n, name, x, weight, bias, site_weight, rows=None, tag="out"):
        space = self.space
        lead = x.ids.shape[:-1]
        flat = x.ids.reshape(-1, x.ids.shape[-1])
        patterns, inverse = torch.unique(flat, dim=0, return_inverse=True)
        site = space.site(site_weight)
        rows = rows if rows is not None else slice(0, site.rows)
        w = weight.detach()[rows].to(self.dtype)
        b = None if bias is None else bias.detach()[rows]
        rows_idx = space.rows(site_weight)[rows]
        ids, shifts, u_at = self._affine(
            n, site_weight, patterns, inverse.reshape(lead), torch.arange(flat.shape[1]),
            rows_idx, lambda c: c @ w.T, x.shifts, tag)
        shifts += self._bias_shifts(u_at, b, -1, ids.shape)
        return _Sym(ids, _merge(shifts))

    def conv(self, n, name, mod, x, result):
        nd = mod.weight.dim() - 2
        if nd not in (1, 2):
            return self.fail(n, "Conv3d", [x]) or _zero_like(result)
        if mod.padding_mode != "zeros":
            return self.fail(n, f"padding mode {mod.padding_mode!r}", [x]) or \
                _zero_like(result)

        k, st, dl = (_as_2d(v, nd, 1) for v in (mod.kernel_size, mod.stride, mod.dilation))
        if isinstance(mod.padding, str):
            if mod.padding == "same" and any(dl[i] * (k[i] - 1) % 2 for i in range(2)):
                return self.fail(n, "asymmetric 'same' padding", [x]) or _zero_like(result)
            pad = [(dl[i] * (k[i] - 1)) // 2 for i in range(2)] if mod.padding == "same" \
                else [0, 0]
        else:
            pad = list(_as_2d(mod.padding, nd, 0))
        ids = x.ids if nd == 2 else x.ids.unsqueeze(-2)
        N = ids.shape[0]
        G = mod.groups  # a grouped conv is G convs side by side; the columns are shared
        c_in, c_out = mod.in_channels // G, mod.out_channels // G
        w = mod.weight.detach().to(self.dtype)
        fn = F.conv2d if nd == 2 else F.conv1d
        rows = self.space.rows(f"{name}.weight")
        out_ids, shifts = [], []
        for g in range(G):
            ins, outs = slice(g * c_in, (g + 1) * c_in), slice(g * c_out, (g + 1) * c_out)
            padded = F.pad(ids[:, ins].to(self.dtype), (pad[1], pad[1], pad[0], pad[0]),
                           value=-1.0)
            cols = F.unfold(padded, k, dilation=dl, stride=st)  # (N, c_in*K, L)
            L = cols.shape[-1]
            flat = cols.transpose(1, 2).reshape(N * L, -1).round().long()
            patterns, inverse = torch.unique(flat, dim=0, return_inverse=True)
            channel_of = torch.arange(c_in).repeat_interleave(k[0] * k[1])

            def shift_fn(c, ins=ins, outs=outs):
                return fn(c[:, ins], w[outs], None, mod.stride, mod.padding, mod.dilation)
            ids_o, sh, u_at = self._affine(n, f"{name}.weight", patterns,
                                           inverse.reshape(N, L), channel_of, rows[outs],
                                           shift_fn, x.shifts,
                                           cols_idx=self.space.cols(f"{name}.weight", ins))
            shape_g = (result.shape[0], c_out, *result.shape[2:])
            out_ids.append(ids_o.movedim(-1, 1).reshape(shape_g))
            u_at = u_at.reshape(N, *result.shape[2:])
            bias = None if mod.bias is None else mod.bias[outs]
            for f, c in sh + self._bias_shifts(u_at, bias, 1, shape_g):
                full = torch.zeros(result.shape, dtype=self.dtype)
                full[:, outs] = c
                shifts.append((f, full))
        return _Sym(torch.cat(out_ids, 1), _merge(shifts))

    def embedding(self, n, name, mod, tokens, result):
        space, sys = self.space, self.sys
        site = space.site(f"{name}.weight")
        seen = self.seen.get(name, torch.unique(tokens))
        rho = int(sys.new("emb-row", self.label(n))[0])
        w = sys.new("emb", self.label(n), site.cols)
        self.assign(space.rows(site.weight, seen), [{rho: 1.0}] * len(seen))
        self.assign(space.cols(site.weight), [{int(v): 1.0, rho: -1.0} for v in w])
        unseen = site.rows - len(seen)
        if unseen:
            self.notes.append(f"{name}: {unseen} of {site.rows} embedding rows are absent "
                              "from the inputs; their scalings change nothing on them")
        return _Sym(w.expand(*result.shape[:-1], site.cols).clone())

    def norm(self, n, name, mod, x, result, kind):
        sys = self.sys
        if kind == "batch":
            if not mod.training and mod.track_running_stats:
                return self.fail(n, "batch norm with running statistics (use train=True)",
                                 [x]) or _zero_like(result)
            C = x.ids.shape[1]
            first = sys.union_rows(x.ids.transpose(0, 1).reshape(C, -1))
            self.absorbed.update(first.tolist())
            for v in first[first > 0].tolist():
                self.consumers.setdefault(v, set()).add(self.label(n))
            shape_g = [1, C] + [1] * (x.ids.dim() - 2)
        elif kind in ("layer", "rms"):
            k = len(mod.normalized_shape)
            flat = x.ids.reshape(-1, math.prod(mod.normalized_shape))
            for v in torch.unique(sys.union_rows(flat)).tolist():
                if v > 0:
                    self.consumers.setdefault(v, set()).add(self.label(n))
            dims = list(range(x.ids.dim() - k, x.ids.dim()))
            if kind == "rms":  # no centring: every shift must vanish
                self.kill(x.shifts)
            else:
                self.kill(x.shifts, center=lambda c: c - c.mean(dims, keepdim=True))
            shape_g = [1] * (x.ids.dim() - k) + list(mod.normalized_shape)
        else:
            N, C = x.ids.shape[:2]
            G = mod.num_groups
            for v in torch.unique(sys.union_rows(x.ids.reshape(N * G, -1))).tolist():
                if v > 0:
                    self.consumers.setdefault(v, set()).add(self.label(n))

            def center(c, N=N, G=G):
                g = c.reshape(N, G, -1)
                return (g - g.mean(-1, keepdim=True)).reshape(c.shape)
            self.kill(x.shifts, center=center)
            shape_g = [1, C] + [1] * (x.ids.dim() - 2)
        weight = getattr(mod, "weight", None)
        if weight is None:
            return _zero_like(result)
        g = sys.new("norm", self.label(n), weight.numel())
        site = self.space.site(f"{name}.weight")
        self.assign(self.space.rows(site.weight), [{int(v): 1.0} for v in g])
        return _Sym(g.reshape(shape_g).expand(result.shape).clone())

    def pool(self, n, mod, x, result):
        nd = 2 if isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d)) else 1
        if getattr(mod, "ceil_mode", False):
            return self.fail(n, "ceil_mode pooling", [x]) or _zero_out(result)

        k = _as_2d(mod.kernel_size, nd, 1)
        st = _as_2d(mod.stride if mod.stride is not None else mod.kernel_size, nd, 1)
        pd = _as_2d(mod.padding, nd, 0)
        dl = _as_2d(getattr(mod, "dilation", 1), nd, 1)
        ids = x.ids if nd == 2 else x.ids.unsqueeze(-2)
        N, C = ids.shape[:2]
        padded = F.pad(ids.to(self.dtype), (pd[1], pd[1], pd[0], pd[0]), value=-1.0)
        cols = F.unfold(padded, k, dilation=dl, stride=st).round().long()  # (N, C*K, L)
        K = k[0] * k[1]
        L = cols.shape[-1]
        windows = cols.reshape(N, C, K, L).permute(0, 1, 3, 2).reshape(-1, K)
        first = self.sys.union_rows(windows).reshape(N, C, L)
        vals = result[0] if isinstance(result, tuple) else result
        out_ids = first.reshape(vals.shape)

        def run(c):
            out = mod(c)
            return out[0] if isinstance(out, tuple) else out
        shifts = []
        is_max = isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d))
        for f, c in x.shifts:
            if is_max and not torch.equal(run(c), -run(-c)):
                self.kill(x.shifts)  # a shift that varies within a window
                shifts = []
                break
            shifts.append((f, run(c)))
        out = _Sym(out_ids, shifts)
        return (out, None) if isinstance(result, tuple) else out

    def unpool(self, n, x, indices, result):
        """Max-unpooling: every value goes back to where it was pooled from, with its
        scale; the other positions hold exact zeros (any scale). A shift must vanish."""
        N, C = x.ids.shape[:2]
        out = torch.full((N, C, result.shape[2] * result.shape[3]), -1, dtype=torch.long)
        out.scatter_(2, indices.reshape(N, C, -1), x.ids.reshape(N, C, -1))
        self.kill(x.shifts)
        return _Sym(out.reshape(result.shape))

    def adaptive_pool(self, n, mod, x, result):
        out_size = result.shape[2:]
        in_size = x.ids.shape[2:]
        if any(i % o for i, o in zip(in_size, out_size, strict=True)):
            return self.fail(n, "adaptive pooling with uneven windows", [x]) or \
                _zero_out(result)
        k = tuple(i // o for i, o in zip(in_size, out_size, strict=True))
        twod = len(in_size) == 2
        cls = (nn.MaxPool2d if "Max" in type(mod).__name__ else nn.AvgPool2d) if twod else \
            (nn.MaxPool1d if "Max" in type(mod).__name__ else nn.AvgPool1d)
        return self.pool(n, cls(k if twod else k[0]), x, result)

    def mha(self, n, name, mod, args, kwargs, result):
        q_in, k_in, v_in = (args + (None,) * 3)[:3]
        if (mod.in_proj_weight is None or mod.bias_k is not None or mod.add_zero_attn
                or not all(isinstance(s, _Sym) for s in (q_in, k_in, v_in))):
            return self.fail(n, "MultiheadAttention with separate projections, bias_k/"
                                "bias_v or add_zero_attn", [q_in, k_in, v_in]) or \
                (_zero_out(result[0]), None)
        E = mod.embed_dim
        site = f"{name}.in_proj_weight"
        bias = mod.in_proj_bias
        W = mod.in_proj_weight
        parts = []
        for j, s in enumerate((q_in, k_in, v_in)):
            rows = slice(j * E, (j + 1) * E)
            parts.append(self.linear(n, name, s, W, bias, site, rows=rows, tag="qkv"[j]))
        q, k, v = parts
        if not mod.batch_first:  # (T, N, E) -> (N, T, E)
            q, k, v = (p.map(lambda t: t.transpose(0, 1)) for p in (q, k, v))
        self._attention(n, q, k, v)
        out = self._attend(q, k, v)
        if not mod.batch_first:
            out = out.map(lambda t: t.transpose(0, 1))
        o = self.linear(n, name, out, mod.out_proj.weight, mod.out_proj.bias,
                        f"{name}.out_proj.weight", tag="o")
        self.called.add(f"{name}.out_proj")
        weights = None if result[1] is None else _zero_like(result[1])
        return (o, weights)

    def _attention(self, n, q, k, v):
        """Scores unchanged: query and key scales pair per dimension, the query shift
        vanishes (the key's adds a constant per query row, which the soft-max absorbs)."""
        # per leading index (batch, head) and dimension: the queries' and keys' scales
        lead = torch.broadcast_shapes(q.ids.shape[:-2], k.ids.shape[:-2])
        qd = q.ids.expand(*lead, *q.ids.shape[-2:]).reshape(-1, *q.ids.shape[-2:])
        kd = k.ids.expand(*lead, *k.ids.shape[-2:]).reshape(-1, *k.ids.shape[-2:])
        self.contracted.append((torch.unique(qd), torch.unique(kd)))
        done = set()
        for i in range(qd.shape[0]):
            for d in range(qd.shape[-1]):
                for a in torch.unique(qd[i, :, d]).tolist():
                    for b in torch.unique(kd[i, :, d]).tolist():
                        if a >= 0 and b >= 0 and (a, b) not in done:
                            done.add((a, b))
                            self.sys.row(_add_form((1.0, a), (1.0, b)))
        self.kill(q.shifts)

    def _attend(self, q, k, v):
        """The output: per dimension, the value's scale (constant over keys)."""
        lead = v.ids.shape[:-2]
        per_dim = self.sys.union_rows(v.ids.reshape(math.prod(lead), v.ids.shape[-2],
                                                    -1).transpose(1, 2).reshape(
            -1, v.ids.shape[-2])).reshape(*lead, v.ids.shape[-1])
        out_shape = (*q.ids.shape[:-1], v.ids.shape[-1])
        ids = per_dim.unsqueeze(-2).expand(out_shape).clone()
        shifts = []
        for f, c in v.shifts:
            spread = c.amax(-2, keepdim=True) - c.amin(-2, keepdim=True)
            if float(spread.abs().max()) > 0:
                self.kill(v.shifts)
                return _Sym(ids)
            shifts.append((f, c[..., :1, :].expand(out_shape)))
        return _Sym(ids, shifts)

    def sdpa(self, n, result, args, kwargs):
        q, k, v = args[:3]
        if not all(isinstance(s, _Sym) for s in (q, k, v)):
            return self.fail(n, "attention with constant operands", [q, k, v]) or \
                _zero_out(result)
        self._attention(n, q, k, v)
        return self._attend(q, k, v)

    def matmul(self, n, result, args):
        a, b = args[0], args[1]
        if not (isinstance(a, _Sym) and isinstance(b, _Sym)) or a.ids.dim() < 2 or \
                b.ids.dim() < 2:
            return self.fail(n, "matmul with a constant or a vector", args[:2]) or \
                _zero_out(result)
        self.kill(a.shifts)
        self.kill(b.shifts)
        # scales of a constant along its rows, of b along its columns
        ra = self.sys.union_rows(a.ids.transpose(-1, -2).reshape(-1, a.ids.shape[-2]))
        rb = self.sys.union_rows(b.ids.reshape(-1, b.ids.shape[-1]))
        ra = ra.reshape(*a.ids.shape[:-2], a.ids.shape[-1])  # (..., k)
        rb = rb.reshape(*b.ids.shape[:-2], b.ids.shape[-2])  # (..., k)
        ra, rb = torch.broadcast_tensors(ra, rb)
        self.contracted.append((torch.unique(ra), torch.unique(rb)))
        pairs = torch.unique(torch.stack([ra.reshape(-1, ra.shape[-1]),
                                          rb.reshape(-1, rb.shape[-1])], -1).reshape(
            -1, ra.shape[-1], 2), dim=0)
        out_vars = []
        for pat in pairs:
            x0, y0 = (int(v) for v in pat[0])
            w = int(self.sys.new("mul", self.label(n))[0])
            self.sys.row(_add_form((1.0, w), (-1.0, x0), (-1.0, y0)))
            for x, y in pat[1:].tolist():
                self.sys.row(_add_form((1.0, x), (1.0, y), (-1.0, x0), (-1.0, y0)))
            out_vars.append(w)
        if len(out_vars) > 1:
            for w in out_vars[1:]:
                self.sys.row({w: 1.0, out_vars[0]: -1.0})
        return _Sym(torch.full(result.shape, out_vars[0], dtype=torch.long))


_NO_RULE = object()  # aten_rule: no rule of its own, the functional ones apply
_EPS = 1e-5  # a constant this small added to a statistic is a normalisation's eps (as
# large as the usual defaults; larger ones would widen the verification by 1e3 x eps)

# the functional pooling of torch.nn.functional, as the module with the same arguments
_POOL_MODULES = {
    F.max_pool1d: nn.MaxPool1d, F.max_pool2d: nn.MaxPool2d,
    F.avg_pool1d: nn.AvgPool1d, F.avg_pool2d: nn.AvgPool2d,
    F.adaptive_avg_pool1d: nn.AdaptiveAvgPool1d, F.adaptive_avg_pool2d: nn.AdaptiveAvgPool2d,
    F.adaptive_max_pool1d: nn.AdaptiveMaxPool1d, F.adaptive_max_pool2d: nn.AdaptiveMaxPool2d,
    torch.max_pool1d: nn.MaxPool1d, torch.max_pool2d: nn.MaxPool2d,
    torch.avg_pool1d: nn.AvgPool1d, torch.adaptive_avg_pool1d: nn.AdaptiveAvgPool1d,
}
_POOL_ARGS = {  # the functionals' positional arguments after the input
    "MaxPool": ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "AvgPool": ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                "divisor_override"),
    "AdaptiveAvgPool": ("output_size",), "AdaptiveMaxPool": ("output_size", "return_indices"),
}


def _pool_module(cls: type, positional, keywords: dict) -> nn.Module:
    """The pooling module ``cls`` with a functional's arguments after its input."""
    names = _POOL_ARGS[cls.__name__.replace("1d", "").replace("2d", "")]
    return cls(**dict(zip(names, positional, strict=False)), **keywords)


_RMS_NORM = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()

_PASS = {"contiguous", "clone", "detach", "float", "double", "to", "type_as", "dropout",
         "identity"}
_SHAPE_OPS = {"view", "reshape", "permute", "transpose", "flatten", "unflatten", "squeeze",
              "unsqueeze", "expand", "expand_as", "chunk", "split", "unbind", "t", "mT",
              "movedim", "narrow", "repeat", "view_as", "reshape_as", "swapaxes"}
_NONHOMOGENEOUS = (nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.ELU, nn.SELU,
                   nn.CELU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.ReLU6,
                   nn.LogSoftmax, nn.Softsign, nn.Tanhshrink)
_NONHOMOGENEOUS_FN = {"gelu", "tanh", "sigmoid", "silu", "exp", "softplus", "elu", "log",
                      "log_softmax", "sqrt", "rsqrt", "pow", "erf", "sin", "cos"}


def _as_2d(v, nd: int, fill: int) -> tuple:
    """A 1-d or 2-d window parameter as two values (a 1-d one padded in front with
    ``fill``), to run 1-d and 2-d convolutions and pooling through 2-d unfolding."""
    v = tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd
    return v if nd == 2 else (fill,) + v


def _flatten(obj):
    if isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _flatten(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _flatten(o)
    else:
        yield obj


def _zero_out(result):
    if isinstance(result, torch.Tensor):
        return _zero_like(result)
    if isinstance(result, (tuple, list)):
        return tuple(_zero_out(r) for r in result)
    return None


# ----------------------------------------------------------------------------------------
# Solving.


def analysis_copy(model: nn.Module, dtype: torch.dtype, train: bool) -> nn.Module:
    """The copy of ``model`` that the symmetry analyses run (``discover`` and
    ``declare(inputs=)``): in ``dtype``, without gradients, batch norms on batch statistics
    if ``train``, everything else in eval mode: dropout off, also where a module reads its
    own ``training`` (the attention dropout of Hugging Face models).

    Parameters
    ----------
    model : nn.Module
        Left as it is.
    dtype : torch.dtype
        Of the copy (float64 for the analyses).
    train : bool
        Batch norms on batch statistics (their running statistics dropped).

    Returns
    -------
    nn.Module
        The copy.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.symmetry.structure import analysis_copy
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5))
    >>> copy = analysis_copy(net.train(), torch.float64, True)
    >>> copy[0].weight.dtype, copy[1].training, net[1].training
    (torch.float64, False, True)
    """
    net = copy.deepcopy(model).to(dtype=dtype).eval().requires_grad_(False)
    for mod in net.modules():  # torch's fused inference kernels have no forward AD
        if isinstance(mod, (nn.MultiheadAttention, nn.TransformerEncoderLayer,
                            nn.TransformerDecoderLayer, nn.TransformerEncoder,
                            nn.TransformerDecoder)):
            mod.train()
    for mod in net.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and train:
            mod.track_running_stats = False
            mod.running_mean = mod.running_var = mod.num_batches_tracked = None
        if isinstance(mod, nn.modules.dropout._DropoutNd):
            mod.eval()  # dropout off: the function, not one random draw of it
        if isinstance(mod, nn.MultiheadAttention):
            mod.dropout = 0.0
    return net


def as_inputs(inputs, device=None, dtype=None) -> tuple:
    """The positional inputs of a model as a tuple on ``device``: floating ones in
    ``dtype``, token ids and masks as they are.

    Parameters
    ----------
    inputs : torch.Tensor or tuple of torch.Tensor
        One input or several.
    device : torch.device or str, optional
        Where the model is (default: each input stays where it is).
    dtype : torch.dtype, optional
        The model's floating dtype (default: each input keeps its own).

    Returns
    -------
    tuple of torch.Tensor

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.symmetry.structure import as_inputs
    >>> x, ids = as_inputs((torch.zeros(2), torch.zeros(2, dtype=torch.long)), "cpu",
    ...                    torch.float64)
    >>> x.dtype, ids.dtype
    (torch.float64, torch.int64)
    """
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    # floating inputs in the computation dtype; token ids and masks stay as they are
    return tuple(a.to(device=device, dtype=dtype) if a.is_floating_point()
                 else a.to(device=device) for a in args)


# the order of the Gram-Schmidt: a family keeps its own directions where none comes
# before it, so those that touch only rows (what UN and SM can resolve) come first
_FAMILY_ORDER = ("unused", "per-filter", "qk", "vo", "units", "coupled", "bias", "stream")


def _names(nodes) -> str:
    nodes = sorted(nodes)
    return ", ".join(nodes) if len(nodes) <= 3 else \
        f"{nodes[0]}, ... {nodes[-1]} ({len(nodes)} layers)"


def _family_of(origins: set[tuple[str, str]], absorbed: bool,
               consumers: set[str], qk: bool = False) -> tuple[str, str]:
    """``(kind, label)`` of a set of variable classes from where they were created, the
    layers that read them, and whether they are contracted against each other in a
    product of two activations (``qk``: attention's scores)."""
    kinds = {k for k, _ in origins} - {"u"} or {k for k, _ in origins}
    nodes = sorted({nd for k, nd in origins if k in kinds})
    where = _names(nodes)
    if qk and kinds != {"unused"}:
        return "qk", f"Q/K dimensions of {where}"
    readers = _names(consumers - set(nodes)) if consumers - set(nodes) else "the outputs"
    if kinds == {"out"} and len(nodes) == 1:
        return (("per-filter", f"per-filter scaling of {nodes[0]}") if absorbed else
                ("units", f"units between {nodes[0]} and {readers}"))
    if kinds == {"u"}:
        return "bias", f"rows with their biases against the columns of {where}"
    if kinds == {"unused"}:
        return "unused", f"parameters that never reach the outputs: {where}"
    if kinds <= {"q", "k"} and len(nodes) == 1:
        return "qk", f"Q/K dimensions of {nodes[0]}"
    if kinds == {"v"} and len(nodes) == 1:
        return "vo", f"V/O dimensions of {nodes[0]}"
    if kinds in ({"norm"}, {"vector", "mul"}) and len(nodes) == 1:
        # a normalisation's weight against the layers that read it (an RMSNorm written as
        # weight * x, as Hugging Face's, is a vector multiplied into an activation)
        return "units", f"units between {nodes[0]} and {readers}"
    if kinds <= {"emb", "emb-row"}:
        return "units", f"embedding dimensions of {where}"
    if len(nodes) > 1:
        return "stream", f"residual stream through {where} (read by {readers})"
    return "coupled", f"coupled scalings of {where}"


def _null_space(A, tol: float = 1e-10):
    r"""The null space of a sparse matrix ``A`` (relations by variables): the columns of a
    sparse (variables by solutions) matrix, linearly independent, each of unit norm.

    Most relations define one variable from others (a product's scale :math:`w = x + y`):
    a variable that appears in one relation only, with a pivot at least a tenth of the
    relation's largest coefficient, is solved from it and the relation is dropped, which
    can free further variables. What remains is solved densely (SVD) per connected
    component, and the solved variables are filled in backwards. The dimension is that of
    the null space of ``A``; a dense SVD of the whole, which a Llama's attention and
    gated MLP make a block of about 7,000 relations, is never needed.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> A = sp.csr_matrix(np.array([[1.0, -1.0, -1.0, 0.0], [0.0, 0.0, 1.0, 1.0]]))
    >>> N = _null_space(A)
    >>> N.shape, bool(abs(A @ N).max() < 1e-12)
    ((4, 2), True)
    """
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    A = sp.csr_matrix(A, copy=True)
    A.sum_duplicates()  # a repeated entry is one coefficient; a stored zero is none
    A.eliminate_zeros()
    m, n = A.shape
    rows = [dict(zip(A.indices[A.indptr[i]:A.indptr[i + 1]].tolist(),
                     A.data[A.indptr[i]:A.indptr[i + 1]].tolist(), strict=True))
            for i in range(m)]
    rows_of: list[set[int]] = [set() for _ in range(n)]
    for i, r in enumerate(rows):
        for v in r:
            rows_of[v].add(i)
    alive = np.ones(m, bool)
    solved: list[tuple[int, dict[int, float]]] = []
    stack = [v for v in range(n) if len(rows_of[v]) == 1]
    while stack:
        v = stack.pop()
        if len(rows_of[v]) != 1:
            continue
        (i,) = rows_of[v]
        r = rows[i]
        if abs(r[v]) < 0.1 * max(abs(c) for c in r.values()):
            continue
        solved.append((v, r))
        alive[i] = False
        for u in r:
            rows_of[u].discard(i)
            if len(rows_of[u]) == 1:
                stack.append(u)
    done = {v for v, _ in solved}

    # what remains: free variables, and the dense null space per component of the core
    cols: list[dict[int, float]] = [{v: 1.0} for v in range(n)
                                    if not rows_of[v] and v not in done]
    core = A[np.nonzero(alive)[0]]
    if core.nnz:
        _, comp = connected_components(abs(core).T @ abs(core), directed=False)
        members: dict[int, list[int]] = {}
        for v in np.unique(core.indices).tolist():
            members.setdefault(int(comp[v]), []).append(v)
        core = core.tocsc()
        for mem in members.values():
            sub = core[:, mem]
            sub = sub[np.unique(sub.indices)]
            _, sv, vh = torch.linalg.svd(torch.tensor(sub.toarray()), full_matrices=True)
            rank = int((sv > sv.max() * tol).sum())
            for vec in vh[rank:].tolist():
                cols.append({mem[j]: c for j, c in enumerate(vec) if abs(c) > 1e-12})

    # the solved variables, backwards: each depends only on variables solved after it
    values: dict[int, dict[int, float]] = {}  # variable -> {solution: value}
    for j, col in enumerate(cols):
        for v, c in col.items():
            values.setdefault(v, {})[j] = c
    for v, r in reversed(solved):
        out: dict[int, float] = {}
        for u, c in r.items():
            if u != v:
                for j, x in values.get(u, {}).items():
                    out[j] = out.get(j, 0.0) - c * x / r[v]
        values[v] = {j: x for j, x in out.items() if abs(x) > 1e-15}
    ii = [v for v, d in values.items() for _ in d]
    jj = [j for d in values.values() for j in d]
    xx = [x for d in values.values() for x in d.values()]
    N = sp.csc_matrix((xx, (ii, jj)), shape=(n, len(cols)))
    norms = np.sqrt(np.asarray(N.multiply(N).sum(0))).reshape(-1)
    return sp.csc_matrix(N @ sp.diags(1.0 / np.where(norms > 0, norms, 1.0)))


def _drop_kernel(TQ, kernel, fam_cols: dict, order: list, tol: float = 1e-9):
    r"""Remove, family by family, the directions that change no parameter.

    ``TQ`` (candidates x directions) is orthonormal in candidate coordinates and ``kernel``
    spans the candidate directions that change nothing (:func:`_candidate_kernel`). The
    dimension in parameter space of the first families is their number of directions
    less :math:`\dim(\mathrm{span} \cap \ker)`, the null space of
    :math:`Z^\top Z - C^\top C` with :math:`C = (TQ)^\top Z` restricted to their
    columns. Where a family raises it by ``d``, ``d`` of its columns go: those on which
    the new kernel directions have the largest independent components (pivoted QR), so
    that what is left meets the kernel in nothing. A family's size is what it adds to
    the rank in parameter space, as a Gram-Schmidt in the parameter-space metric would
    give, which would instead fill every family with the rows and columns it meets.

    Returns ``(TQ, family columns)`` without the removed columns.
    """
    import scipy.linalg

    k = kernel.shape[1]
    if k == 0 or TQ.shape[1] == 0:
        return TQ, fam_cols
    C = np.asarray((TQ.T @ kernel).todense())  # (directions, k)
    G = np.asarray((kernel.T @ kernel).todense())
    acc = np.zeros((k, k))
    found = np.zeros((k, 0))  # the kernel directions inside the span so far (orthonormal)
    drop: list[int] = []
    for key in order:
        cols = fam_cols.get(key, [])
        if not cols:
            continue
        Cf = C[cols]
        acc += Cf.T @ Cf
        w, V = np.linalg.eigh(G - acc)
        inside = V[:, w < tol * max(1.0, float(np.abs(G).max()))]
        d = inside.shape[1] - found.shape[1]  # what this family adds to the intersection
        if d <= 0:
            continue
        # its directions: the part of the intersection not found before
        U = np.linalg.svd(inside - found @ (found.T @ inside), full_matrices=False)[0][:, :d]
        # the new directions' coordinates on this family's columns, and a pivot for each
        _, _, piv = scipy.linalg.qr((Cf @ U).T, pivoting=True, mode="economic")
        drop += [cols[j] for j in piv[:d]]
        found = np.hstack([found, U])
    if not drop:
        return TQ, fam_cols
    keep = np.setdiff1d(np.arange(TQ.shape[1]), drop)
    new_index = -np.ones(TQ.shape[1], int)
    new_index[keep] = np.arange(len(keep))
    fam_cols = {key: [int(new_index[c]) for c in cols if new_index[c] >= 0]
                for key, cols in fam_cols.items()}
    return TQ[:, keep].tocsc(), {key: c for key, c in fam_cols.items() if c}


def _orthonormalise(K, keys: list, rank_of: dict, tol: float):
    """Gram-Schmidt of the solutions in the metric ``K`` (sparse), one family at a time in
    family order, each family's new directions orthogonal to all earlier ones.

    Everything stays sparse: the directions found so far are the columns of a sparse
    matrix, and a family's solutions are orthogonalised against the directions they meet
    through ``K`` only (every other one is ``K``-orthogonal to them already). A direction
    that runs through the whole model (a residual stream's scale) meets every earlier one
    but is one column; nothing of size (solutions)^2 is formed.

    Returns ``(Q, family columns)``: ``Q`` (solutions x directions, sparse CSC) holds the
    orthonormal directions, ``{family key: their columns}``.
    """
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    n = K.shape[0]
    K = ((K + K.T) / 2).tocsc()
    kmax = float(K.diagonal().max()) if n else 0.0  # directions below 1e-12 of it are 0
    diag = K.diagonal()
    by_family: dict[tuple, list[int]] = {}
    for j in range(n):
        by_family.setdefault(keys[j], []).append(j)
    Q = sp.csc_matrix((n, 0))
    fam_cols: dict[tuple, list[int]] = {}
    for key in sorted(by_family, key=rank_of.get):
        cols = np.asarray(by_family[key])
        m = len(cols)
        E = sp.csc_matrix((np.ones(m), (cols, np.arange(m))), shape=(n, m))
        KE = K @ E
        if Q.shape[1]:
            met = np.unique((abs(Q).T @ abs(KE)).tocoo().row)  # directions it meets
            Qm = Q[:, met]
            X = E - Qm @ (Qm.T @ KE)
            X = X - Qm @ (Qm.T @ (K @ X))  # once more
            KX = K @ X
        else:
            X, KX = E, KE
        gram = (X.T @ KX).tocsr()  # (m, m), sparse: dense only group by group
        gram = (gram + gram.T) / 2
        _, label = connected_components(abs(gram), directed=False)
        pieces, k0 = [], Q.shape[1]
        sizes = np.bincount(label)
        alone = np.nonzero(sizes[label] == 1)[0]  # a solution that meets no other: scaled
        gd = gram.diagonal()
        keep = alone[gd[alone] > np.maximum(tol * diag[cols[alone]], 1e-12 * kmax)]
        if len(keep):
            pieces.append(X[:, keep] @ sp.diags(1 / np.sqrt(gd[keep])))
        for g in np.nonzero(sizes > 1)[0]:
            own = np.nonzero(label == g)[0]
            w, V = np.linalg.eigh(gram[own][:, own].toarray())
            keep = w > max(tol * float(diag[cols[own]].max()), 1e-12 * kmax)
            if keep.any():
                pieces.append(X[:, own] @ sp.csc_matrix(V[:, keep] / np.sqrt(w[keep])))
        if pieces:
            new = sp.hstack(pieces).tocsc()
            new.eliminate_zeros()
            fam_cols[key] = list(range(k0, k0 + new.shape[1]))
            Q = sp.hstack([Q, new]).tocsc()
    return Q, fam_cols


def structural_symmetries(model: nn.Module, inputs, space: ScalingSpace, *,
                          dtype: torch.dtype = torch.float64,
                          tol: float = 1e-9) -> StructuralResult:
    """The rescaling symmetries of ``model`` from its traced graph (module docstring).

    Parameters
    ----------
    model : nn.Module
        in the state to analyse (batch norms in training mode, dropout off)
    inputs : tuple of torch.Tensor
        example inputs, in the dtype of ``model``; only the first two samples are run
    space : ScalingSpace
        the candidates (built on ``model``)
    dtype : torch.dtype
        of the returned basis
    tol : float
        relative threshold of the Gram-Schmidt that counts directions

    Returns
    -------
    StructuralResult
        The count, the basis and the families (whose ``resolves`` is left empty:
        :func:`~manifold_nets.symmetry.discover.discover` fills it).

    Raises
    ------
    ValueError
        if the model cannot be traced by :mod:`torch.fx`, or a rule does not fit one of its
        operations (the message says why and where)

    Examples
    --------
    Most users call :func:`~manifold_nets.symmetry.discover.discover`, which prepares the
    model and checks the result; called directly:

    >>> import torch
    >>> from manifold_nets.symmetry.groups import ScalingSpace
    >>> from manifold_nets.symmetry.structure import structural_symmetries
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
    ...                           torch.nn.Linear(8, 3))
    >>> result = structural_symmetries(net, (torch.randn(2, 4),), ScalingSpace(net))
    >>> result.dim, tuple(result.basis.shape)
    (8, (23, 8))
    >>> print(result.families[0])
    units between 0 and 2 (8)
    """

    import scipy.sparse as sp

    try:
        # arguments not given keep their defaults (e.g. an optional mask left at None)
        sig = list(inspect.signature(model.forward).parameters.values())
        concrete = {p.name: p.default for p in sig[len(inputs):]
                    if p.default is not inspect.Parameter.empty}
        gm = _trace(model, concrete or None)
    except Exception as err:  # fx raises many kinds on dynamic control flow
        fx_error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        try:  # the graph torch itself produces, where Python control flow stops fx
            gm = torch.export.export(model, tuple(a[:2] for a in inputs),
                                     strict=False).module()
        except Exception as err2:  # noqa: BLE001 - both tracers failed: say both
            raise ValueError(
                f"the model cannot be traced by torch.fx ({fx_error}) nor exported by "
                f"torch.export ({type(err2).__name__}: "
                f"{str(err2).splitlines()[0][:200]}); use method='dense'") from None
    analysis = _Analysis(gm, space)
    analysis.module_names = {name for name, _ in model.named_modules()}
    analysis.seen = _seen_tokens(model, inputs)
    try:
        with torch.no_grad():
            analysis.run(*(a[:2] for a in inputs))
    except Exception as err:  # a rule that does not fit this model: say where, never crash
        node = getattr(analysis, "current", None)
        where = f" at {node.op} {node.target}" if node is not None else ""
        raise ValueError(f"the structural analysis failed{where} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200] if str(err) else ''}); use "
                         "method='dense'") from err
    sys = analysis.sys
    site_of = _site_lookup(space)

    # every candidate coordinate as a form over class roots; untouched ones are free
    for k in range(space.dim):
        if k not in analysis.forms:
            analysis.forms[k] = {int(sys.new("unused", site_of(k))[0]): 1.0}
    roots = [sys.find(v) for v in range(len(sys.parent))]

    def on_roots(form):
        g: dict[int, float] = {}
        for v, c in form.items():
            rv = roots[v]
            if rv != _ZERO:
                g[rv] = g.get(rv, 0.0) + c
        return {v: c for v, c in g.items() if abs(c) > 1e-12}
    cand = {k: on_roots(f) for k, f in analysis.forms.items()}
    rows = [r for r in (on_roots(row) for row in sys.rows) if r]
    used = sorted({v for f in cand.values() for v in f} | {v for r in rows for v in r})
    col_of = {v: i for i, v in enumerate(used)}
    nv = len(used)

    # the solutions: the null space of the rows (free classes are its unit vectors)
    R = sp.csr_matrix(([c for r in rows for c in r.values()],
                       ([i for i, r in enumerate(rows) for _ in r],
                        [col_of[v] for r in rows for v in r])), shape=(len(rows), nv))
    B = _null_space(R)
    supports = [B.indices[B.indptr[j]:B.indptr[j + 1]].tolist() for j in range(B.shape[1])]

    ks = [k for k, f in cand.items() for _ in f]
    M = sp.csr_matrix(([c for f in cand.values() for c in f.values()],
                       (ks, [col_of[v] for f in cand.values() for v in f])),
                      shape=(space.dim, nv))
    T = (M @ B).tocsr()  # candidate coordinates of every solution

    # the solutions' Gram matrix in candidate coordinates (sparse: solutions of different
    # families share few coordinates), and the candidate directions that change nothing
    params = dict(model.named_parameters())
    kernel = _candidate_kernel(space, params)
    candidate_rank = space.dim - kernel.shape[1]
    K = (T.T @ T).tocsr()

    # the family of every solution, from where its variables were created
    members_of: dict[int, list[int]] = {}
    for v, rv in enumerate(roots):
        members_of.setdefault(rv, []).append(v)
    absorbed_roots = {roots[v] for v in analysis.absorbed if v >= 0}
    readers: dict[int, set[str]] = {}
    for v, names in analysis.consumers.items():
        readers.setdefault(roots[v], set()).update(names)
    products = [({roots[v] for v in a.tolist() if v >= 0}, {roots[v] for v in b.tolist() if v >= 0})
                for a, b in analysis.contracted]
    keys = []
    for support in supports:
        origins, absorbed, consumers = set(), False, set()
        mine = {used[i] for i in support}
        for root in mine:
            absorbed |= root in absorbed_roots
            consumers |= readers.get(root, set())
            for v in members_of.get(root, [root]):
                kind, node, _ = sys.origin[v]
                if kind != "zero":
                    origins.add((kind, node))
        qk = any(mine & a and mine & b for a, b in products)
        keys.append(_family_of(origins, absorbed, consumers, qk))
    order = sorted(set(keys), key=lambda k: (_FAMILY_ORDER.index(k[0]), k[1]))
    rank_of = {k: i for i, k in enumerate(order)}

    # Gram-Schmidt in candidate coordinates, family by family in family order; then,
    # where a family completes a direction that changes no parameter, one of its
    # directions goes: what is left is independent in parameter space
    Q, fam_cols = _orthonormalise(K, keys, rank_of, tol)
    TQ = sp.csc_matrix(T @ Q)
    TQ, fam_cols = _drop_kernel(TQ, kernel, fam_cols, order)
    TQ.eliminate_zeros()
    dim = TQ.shape[1]
    coo = TQ.tocoo()
    basis = torch.sparse_coo_tensor(np.vstack([coo.row, coo.col]), coo.data, TQ.shape,
                                    dtype=dtype, check_invariants=True).coalesce()
    families = []
    for key in order:
        cols = fam_cols.get(key, [])
        if cols:
            touched = np.unique(TQ[:, cols].indices).tolist()
            layers = sorted({site_of(k) for k in touched})
            families.append(Family(key[0], key[1], len(cols), layers, cols))
    return StructuralResult(dim, basis, families, candidate_rank, analysis.unsupported,
                            analysis.notes, analysis.eps)


class _Tracer(torch.fx.Tracer):
    """fx's tracer, entering torch's transformer layers (whose parts have rules)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            return False
        return super().is_leaf_module(m, qualname)


def _trace(model: nn.Module, concrete: dict | None) -> torch.fx.GraphModule:
    """The model's graph; torch's fused transformer fast path is off while tracing (its
    checks are control flow on the inputs), so the layers trace into their modules."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        graph = _Tracer().trace(model, concrete_args=concrete)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    name = type(model).__name__
    return torch.fx.GraphModule(model, graph, name)


def _candidate_kernel(space: ScalingSpace, params: dict):
    """The candidate directions that change no parameter: a sparse (candidates x k)
    matrix whose columns, of unit norm and on disjoint coordinates, span the kernel of the
    map from log-scales to parameter space; its rank is ``space.dim - k``.

    Per weight matrix: one column for every connected component of the bipartite graph of
    its nonzero entries (its rows against its columns) in which no row has a nonzero bias
    (scaling those rows up and those columns down changes nothing). Per normalisation:
    its channels whose weight and bias are both zero.
    """
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    ii: list[np.ndarray] = []
    vv: list[np.ndarray] = []
    jj: list[np.ndarray] = []
    k = 0

    def add(coords: np.ndarray, values: np.ndarray, label: np.ndarray | None = None):
        nonlocal k
        label = np.zeros(len(coords), int) if label is None else label
        for c in np.unique(label):
            sel = label == c
            ii.append(coords[sel])
            vv.append(values[sel] / np.sqrt(sel.sum()))
            jj.append(np.full(int(sel.sum()), k))
            k += 1

    for s in space.sites:
        w = block_diagonal(params[s.weight].detach(), s.groups)
        b = params[s.bias].detach().reshape(-1) if s.bias else None
        if s.kind == "norm":
            dead = (w.reshape(-1) == 0) & ((b == 0) if b is not None else True)
            idx = dead.nonzero().reshape(-1).numpy()
            if len(idx):
                add(s.row_offset + idx, np.ones(len(idx)), np.arange(len(idx)))
            continue
        n = s.rows + s.cols
        coords = np.concatenate([s.row_offset + np.arange(s.rows),
                                 s.col_offset + np.arange(s.cols)])
        signs = np.concatenate([np.ones(s.rows), -np.ones(s.cols)])
        q = (w.flatten(2).abs().sum(-1) if w.dim() > 2 else w.abs()) > 0
        if bool(q.all()):  # dense: one component, free unless a row has a bias
            if b is None or not bool((b != 0).any()):
                add(coords, signs)
            continue
        rows, cols = q.nonzero(as_tuple=True)
        adj = sp.coo_matrix((np.ones(len(rows)), (rows.numpy(), cols.numpy() + s.rows)),
                            shape=(n, n))
        _, label = connected_components(adj, directed=False)
        free = np.ones(label.max() + 1, bool)
        if b is not None:
            free[np.unique(label[:s.rows][(b != 0).numpy()])] = False
        keep = free[label]
        if keep.any():
            add(coords[keep], signs[keep], label[keep])
    if not k:
        return sp.csc_matrix((space.dim, 0))
    return sp.csc_matrix((np.concatenate(vv), (np.concatenate(ii), np.concatenate(jj))),
                         shape=(space.dim, k))


@torch.no_grad()
def _seen_tokens(model: nn.Module, inputs) -> dict[str, torch.Tensor]:
    """The rows of every embedding that the whole batch uses (the analysis itself runs on
    two samples)."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            def hook(m, args, name=name):
                seen[name] = torch.unique(torch.cat([seen.get(name, args[0].new_empty(0)),
                                                     args[0].reshape(-1)]))
            handles.append(mod.register_forward_pre_hook(hook))
    if handles:
        try:
            model(*inputs)
        finally:
            for h in handles:
                h.remove()
    return seen


def _site_lookup(space: ScalingSpace):
    starts = [s.row_offset for s in space.sites]
    names = [s.module for s in space.sites]

    def find(k: int) -> str:
        return names[int(np.searchsorted(starts, k, side="right")) - 1]
    return find
