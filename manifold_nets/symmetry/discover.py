r"""Finding the rescaling symmetries of any model numerically (:func:`discover`)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..roles import table1_manifolds
from .groups import Rescaling, RescalingGroup, ScalingSpace
from .invariance import predict
from .structure import analysis_copy, as_inputs

__all__ = [
    "Discovery",
    "discover",
]


# -- discovering symmetries ---------------------------------------------------------------------
@dataclass
class Discovery:
    """What :func:`discover` found.

    Built by :func:`discover`; the constructor takes the attributes below, in order.

    Parameters
    ----------
    dim, basis, singular_values, threshold, gap, candidates, rank, space
        The attributes of the same names.
    method, families, unsupported, notes, verified
        The attributes of the same names (defaults: ``"dense"``, empty lists, ``nan``).

    Attributes
    ----------
    dim : int
        number of independent rescaling symmetries, counted in parameter space
    basis : torch.Tensor
        ``(space.dim, dim)`` generators in
        :class:`~manifold_nets.symmetry.groups.ScalingSpace` coordinates, independent as
        parameter-space vectors: a sparse COO tensor (float64), as a language model's
        vocabulary makes it hundreds of thousands by tens of thousands (``.to_dense()``
        on small models). The structural method's columns are orthonormal in those
        coordinates; the dense method's are orthonormal in parameter space
    singular_values : torch.Tensor
        dense method: relative singular values (largest 1) of the output Jacobian
        restricted to the candidate directions, ascending (empty for the structural method)
    threshold : float
        dense method: singular values below it count as symmetries
    gap : float
        dense method: ratio of the first singular value above the threshold to the last
        one below it (``inf`` when the last is exactly zero, and for the structural
        method); a large gap means a clean count
    candidates : int
        number of candidate generators (coordinates of
        :class:`~manifold_nets.symmetry.groups.ScalingSpace`)
    rank : int
        dimension of their span in parameter space
    space : ScalingSpace
        the coordinates of ``basis``
    method : str
        ``"structural"`` or ``"dense"``
    families : list of Family
        structural method: the symmetries grouped by the layers they tie, each with its
        size (the sizes add up to ``dim``) and whether UN and SM resolve it
    unsupported : list of str
        structural method: operations it does not model, treated as breaking every
        scaling through them (the count can only be lower than the truth)
    notes : list of str
        structural method: remarks on the inputs (e.g. embedding rows never used)
    verified : float or None
        structural method: relative change of the outputs under a random element of the
        found group (``nan`` when not checked)

    Examples
    --------
    The hidden units of a ReLU network can be scaled one by one, the next layer's columns
    compensating: 8 symmetries, one family.

    >>> import torch
    >>> from manifold_nets.symmetry import discover
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
    ...                           torch.nn.Linear(8, 3))
    >>> found = discover(net, torch.randn(64, 4))
    >>> found.dim, found.method, found.candidates, tuple(found.basis.shape)
    (8, 'structural', 23, (23, 8))
    >>> print(found.families[0])
    units between 0 and 2 (8): not resolved by UN, not resolved by SM
    >>> found.verified < 1e-12
    True
    """

    dim: int
    basis: torch.Tensor
    singular_values: torch.Tensor
    threshold: float
    gap: float
    candidates: int
    rank: int
    space: ScalingSpace
    method: str = "dense"
    families: list = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verified: float = math.nan

    def group(self, model: nn.Module) -> RescalingGroup:
        """The discovered group, acting on ``model`` (or any model with the same names).

        Parameters
        ----------
        model : torch.nn.Module
            The model the group acts on.

        Returns
        -------
        RescalingGroup
            Named ``"discovered"``, with ``basis`` as its generators.

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.symmetry import discover
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
        ...                           torch.nn.Linear(8, 3))
        >>> found = discover(net, torch.randn(64, 4))
        >>> group = found.group(net)
        >>> group.dim
        8
        >>> g = group.sample(0.5, torch.Generator().manual_seed(0))
        >>> x = torch.randn(5, 4)
        >>> torch.allclose(g.apply(net)(x), net(x), atol=1e-5)
        True
        """
        return RescalingGroup(model, self.basis, "discovered", space=self.space)

    def family_group(self, model: nn.Module, family) -> RescalingGroup:
        """The subgroup of one family (a :class:`~manifold_nets.symmetry.structure.Family`
        or its label).

        Parameters
        ----------
        model : torch.nn.Module
            The model the group acts on.
        family : Family or str
            One of ``families``, or its label.

        Returns
        -------
        RescalingGroup
            Named after the family, with its columns of ``basis`` as generators.

        Raises
        ------
        ValueError
            If no family has the label ``family``; the message lists the labels.

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.symmetry import discover
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
        ...                           torch.nn.Linear(8, 3))
        >>> found = discover(net, torch.randn(64, 4))
        >>> found.family_group(net, "units between 0 and 2")
        RescalingGroup('units between 0 and 2', dim=8)
        """
        if isinstance(family, str):
            matches = [f for f in self.families if f.label == family]
            if not matches:
                labels = "; ".join(repr(f.label) for f in self.families) or "none"
                raise ValueError(f"no family is labelled {family!r}; the labels are: {labels}")
            family = matches[0]
        return RescalingGroup(model, self.basis.index_select(
            1, torch.tensor(family.columns, dtype=torch.long)), family.label,
            space=self.space)

    def to_dict(self) -> dict:
        """The result as plain data (without the basis).

        Returns
        -------
        dict
            ``dim``, ``method``, ``candidates``, ``rank``, ``gap``, ``verified``,
            ``families`` (one dict each: ``kind``, ``label``, ``size``, ``layers``,
            ``resolves``), ``unsupported`` and ``notes``; ready for :func:`json.dumps`
            (``gap`` may be ``inf`` and ``verified`` ``nan``).

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.symmetry import discover
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
        ...                           torch.nn.Linear(8, 3))
        >>> found = discover(net, torch.randn(64, 4))
        >>> d = found.to_dict()
        >>> d["dim"], d["families"][0]["layers"], d["families"][0]["resolves"]
        (8, ['0', '2'], {'un': False, 'sm': False})
        """
        return {"dim": self.dim, "method": self.method, "candidates": self.candidates,
                "rank": self.rank, "gap": self.gap, "verified": self.verified,
                "families": [{"kind": f.kind, "label": f.label, "size": f.size,
                              "layers": f.layers, "resolves": f.resolves}
                             for f in self.families],
                "unsupported": self.unsupported, "notes": self.notes}

    def __str__(self) -> str:
        if self.method == "structural":
            lines = [f"{self.dim} symmetries among {self.candidates} candidates (span "
                     f"{self.rank}), from the traced graph; a random element changes the "
                     f"outputs by {self.verified:.1e}"]
            lines += [f"  {f}" for f in self.families]
            lines += [f"  unsupported (treated as breaking scalings): {u}"
                      for u in self.unsupported]
            lines += [f"  note: {n}" for n in self.notes]
            return "\n".join(lines)
        below = self.singular_values[self.dim - 1] if self.dim else float("nan")
        above = (self.singular_values[self.dim] if self.dim < len(self.singular_values)
                 else float("nan"))
        return (f"{self.dim} symmetries among {self.candidates} candidates (span "
                f"{self.rank}); singular values {float(below):.2e} | {float(above):.2e} "
                f"(threshold {self.threshold:.0e}, gap {self.gap:.2e})")


def discover(model: nn.Module, inputs: torch.Tensor, *, method: str = "auto",
             threshold: float = 1e-4, train: bool = True, dtype: torch.dtype = torch.float64,
             chunk: int = 64, verify: bool = True) -> Discovery:
    r"""Find the rescaling symmetries of a model: their number, a basis and their families.

    The candidates are the directions of
    :class:`~manifold_nets.symmetry.groups.ScalingSpace`: the scaling of every row
    (with its bias) and every column of every weight matrix (``Linear``, ``ConvNd``,
    ``Embedding``, ``MultiheadAttention``'s in- and out-projections), and of every
    channel's (weight, bias) pair of every affine normalisation. The count is the
    dimension, in parameter space, of the candidate directions that leave every output
    unchanged to first order: :math:`\mathrm{rank}(C) - \mathrm{rank}(J C)`, for
    :math:`C` the candidate directions and :math:`J` the Jacobian of the outputs.

    Two methods compute it:

    - ``"structural"`` derives it from the traced graph
      (:mod:`manifold_nets.symmetry.structure`): seconds to minutes on a ResNet-18 or a
      GPT-2-sized block, and it names *families* of symmetries. The result is checked
      numerically (``verify``): a random element of the group is applied and the outputs
      compared.
    - ``"dense"`` measures :math:`J C` column by column with forward-mode JVPs
      (:func:`torch.func.jvp`, vectorised with :func:`torch.func.vmap`), whitens :math:`C`
      with its Gram matrix so that dependent candidates are not counted, and counts the
      relative singular values of :math:`J C P` below ``threshold``: exact on the given
      inputs (dead units included), but it needs more output values than candidates.
    - ``"auto"`` (default): structural, or dense where the model cannot be traced.

    Parameters
    ----------
    model : nn.Module
        the model (not modified: a copy in ``dtype`` is used)
    inputs : torch.Tensor or tuple of torch.Tensor
        a batch (several positional inputs as a tuple). Floating inputs are cast to
        ``dtype``; integer inputs (token ids) pass untouched. The dense method needs at
        least as many output values as candidates (else :class:`ValueError`)
    method : {"auto", "structural", "dense"}
        how to count (see above)
    threshold : float
        dense method: relative singular value below which a direction counts as a
        symmetry. Batch norm with ``eps > 0`` is only approximately invariant (relative
        effect about ``eps / var(h)``), hence ``1e-4`` rather than round-off level.
    train : bool
        evaluate batch norm with batch statistics (default; the symmetry of eq. (3)) or
        with its running statistics (dense method only)
    dtype : torch.dtype
        computation dtype (default float64)
    chunk : int
        dense method: JVPs per vectorised batch
    verify : bool
        structural method: apply a random group element and report the relative change
        of the outputs (``verified`` of :class:`Discovery`); a change above ``1e-6`` (plus the
        batch norms' ``eps`` effect) raises

    Returns
    -------
    Discovery
        The count, a basis and, for the structural method, the families.

    Raises
    ------
    ValueError
        on an unknown ``method``, too few output values for the dense method, a model
        that cannot be traced with ``method="structural"``, or a structural result that
        fails its numerical check

    Notes
    -----
    The dense method measures the null space on finite inputs: a dead unit, or a pooling
    pair whose winner never changes, adds directions that are symmetries of these inputs
    only. The structural method assumes generic weights and inputs and does not count
    them; comparing both on a small model shows them.

    Examples
    --------
    A 2-layer ReLU network: each hidden unit can be scaled, the next layer's column
    compensating.

    >>> import torch
    >>> from manifold_nets.symmetry import discover
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
    ...                           torch.nn.Linear(8, 3))
    >>> found = discover(mlp, torch.randn(64, 4))
    >>> found.dim, found.candidates, found.method
    (8, 23, 'structural')
    >>> print(found.families[0])
    units between 0 and 2 (8): not resolved by UN, not resolved by SM

    With a batch norm after the first layer, its rows can also be scaled freely (eq. (3)):

    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
    ...                           torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> found = discover(net, torch.randn(64, 4))
    >>> found.dim
    17
    >>> print(found.families[0])  # the bias's shift is absorbed: its gradient is zero
    per-filter scaling of 0 (8): resolved by UN, resolved by SM
    >>> print(discover(net.eval(), torch.randn(64, 4)).families[0])  # running statistics
    per-filter scaling of 0 (8): resolved by UN, not resolved by SM
    """
    if method not in ("auto", "structural", "dense"):
        raise ValueError(f"unknown method {method!r}; choose auto, structural or dense")
    net = analysis_copy(model, dtype, train)
    space = ScalingSpace(net)
    device = next(net.parameters()).device
    args = as_inputs(inputs, device, dtype)
    if method in ("auto", "structural") and train:
        from .structure import structural_symmetries

        try:
            found = structural_symmetries(net, args, space, dtype=torch.float64)
        except ValueError as err:
            if method == "structural":
                raise
            fallback = f"structural analysis unavailable, measured densely: {err}"
        else:
            result = Discovery(found.dim, found.basis, torch.empty(0, dtype=torch.float64),
                               threshold, math.inf, space.dim, found.candidate_rank, space,
                               method="structural", families=found.families,
                               unsupported=found.unsupported, notes=found.notes)
            _resolves(result, model)
            if verify:
                result.verified = _verify(net, result, args, eps=found.eps)
            return result
    elif method == "structural":
        raise ValueError("the structural method analyses batch norm with batch statistics "
                         "(train=True); use method='dense' for train=False")
    else:
        fallback = None
    result = _dense(net, space, args, threshold, dtype, chunk)
    if fallback and method == "auto":
        result.notes.append(fallback)
        warnings.warn(f"discover: {fallback}", stacklevel=2)
    elif train:  # the generic count, to tell the inputs' own symmetries apart
        from .structure import structural_symmetries

        try:
            structural = structural_symmetries(net, args, space)
        except ValueError:
            structural = None
        if structural is not None and structural.dim != result.dim:
            more = result.dim - structural.dim
            why = ("the structural analysis treats unsupported operations as breaking "
                   f"scalings ({', '.join(structural.unsupported)}), or "
                   if structural.unsupported and more > 0 else "")
            why += ("dead units, or pooling winners that never change, are symmetries of "
                    "these inputs only" if more > 0 else "check Discovery.gap and the "
                    "threshold")
            note = (f"the inputs give {result.dim} directions, the structure of the model "
                    f"{structural.dim}: {abs(more)} {'more' if more > 0 else 'fewer'} on "
                    f"these inputs ({why}; gap {result.gap:.2e})")
            result.notes.append(note)
            warnings.warn(f"discover: {note}", stacklevel=2)
    return result


def _resolves(result: Discovery, model: nn.Module) -> None:
    """Fill every family's ``resolves``: is UN / SM equivariant under it? Parameters that
    never reach the outputs on the inputs (rows of absent tokens, unused positions) get no
    gradient and change nothing, whatever the update: every update resolves them."""
    manifolds = {u: table1_manifolds(model, u) for u in ("un", "sm")}  # once, for all
    for fam in result.families:
        if fam.kind == "unused":
            fam.resolves = {"un": True, "sm": True}
            continue
        group = result.family_group(model, fam)
        fam.resolves = {u: predict(u, group, model, manifolds=manifolds[u])
                        for u in ("un", "sm")}


@torch.no_grad()
def _verify(net: nn.Module, result: Discovery, args: tuple, log_scale: float = 0.3,
            eps: float = 0.0) -> float:
    """Relative change of the outputs under a random element of the found group."""
    if result.dim == 0:
        return 0.0
    gen = torch.Generator().manual_seed(0)
    v = result.basis @ torch.randn(result.dim, generator=gen, dtype=torch.float64)
    element = Rescaling.from_log(result.space, v * (log_scale / v.abs().max()))
    before = _outputs(net(*args))
    after = _outputs(element.apply(net)(*args))
    change = float((after - before).norm() / before.norm().clamp_min(1e-300))
    eps = max([m.eps for m in net.modules() if isinstance(
        m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm))
        and m.eps is not None] + [eps])
    if change > 1e-6 + 1e3 * eps:
        raise ValueError(
            f"discover: the structural analysis found {result.dim} symmetries, but a random "
            f"element of them changes the outputs by {change:.2e} (relative). The model "
            "uses an operation whose rule does not hold here; please report it. "
            "method='dense' measures the count directly on small models.")
    return change


def _outputs(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.reshape(-1)
    if isinstance(out, dict):
        out = list(out.values())
    return torch.cat([_outputs(o) for o in out if o is not None])


def _dense(net, space, args, threshold, dtype, chunk) -> Discovery:
    all_params = {n: p.detach() for n, p in net.named_parameters()}
    keys = [s.weight for s in space.sites] + [s.bias for s in space.sites if s.bias]
    primals = {k: all_params[k] for k in keys}
    device = next(iter(primals.values())).device

    def forward(p):
        # the math attention kernel: the fused CPU kernels have no forward-mode derivative
        with sdpa_kernel([SDPBackend.MATH]):
            return _outputs(functional_call(net, p, args))

    with torch.no_grad():
        n_outputs = forward(primals).numel()
    if n_outputs < space.dim:
        per_input = max(1, n_outputs // len(args[0]))
        raise ValueError(
            f"discover: the inputs give {n_outputs} output values for {space.dim} candidate "
            "directions, so the outputs cannot tell the symmetries apart (the count would be "
            f"too high). Fix: pass at least {-(-space.dim // per_input)} varied inputs, "
            "preferably several times that, and check Discovery.gap; or use "
            "method='structural'.")

    def column(v):
        return jvp(forward, (primals,), (space.tangent(v, primals),))[1]

    eye = torch.eye(space.dim, dtype=dtype, device=device)
    try:
        jc = torch.cat([vmap(column)(eye[i:i + chunk])
                        for i in range(0, space.dim, chunk)]).T
    except (NotImplementedError, RuntimeError) as err:
        raise ValueError(f"discover(method='dense'): the model uses an operation without a "
                         f"forward-mode derivative ({str(err).splitlines()[0][:160]}); use "
                         "method='structural'") from None
    evals, evecs = torch.linalg.eigh(space.gram(primals))
    keep = evals > evals.max() * space.dim * torch.finfo(dtype).eps * 10
    p = evecs[:, keep] / evals[keep].sqrt()
    _, sv, zt = torch.linalg.svd(jc @ p, full_matrices=True)
    r = p.shape[1]
    sv_full = torch.zeros(r, dtype=dtype, device=device)
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
    basis = (p @ z[:, :dim]).to(torch.float64).cpu().to_sparse()
    return Discovery(dim, basis, rel.to(torch.float64).cpu(), threshold, gap, space.dim, r,
                     space, method="dense")
