r"""Put a model's weights on the paper's manifolds (Table 1), in place.

:func:`declare` replaces parameters by :class:`geoopt.ManifoldParameter` so that
:class:`geoopt.optim.RiemannianSGD` over ``model.parameters()`` performs the chosen update
with the manifolds of Table 1 (:mod:`manifold_nets.table1`): under SM the filters' left
metric and the classifier's right one, under UN the filters on the oblique manifold and the
classifier Euclidean (as in the authors' code). Every other parameter (biases, batch-norm
scale and shift) stays Euclidean, i.e. gets plain SGD. A ``ConvNd`` weight ``(out, in,
*kernel)`` has ``out`` filters of ``ndim = weight.dim() - 1`` dims each; a convolutional
classifier uses ``DiagScaledEuclidean("right", ndim=weight.dim())`` (its columns are input
channels).

Examples
--------
>>> import torch
>>> from manifold_nets import Arch2, InvariantSGD, declare
>>> net = Arch2(depth=1, width=4, in_features=3, num_classes=2)
>>> dec = declare(net, "un")
>>> dec.roles["layers.0.linear.weight"], str(dec["layers.0.linear.weight"])
('filters', 'Oblique(ndim=1) manifold')
>>> opt = InvariantSGD(net.parameters(), lr=0.1)
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping

import geoopt
import torch
from torch import nn

from .convert import refuse_conv1d
from .manifolds import ObliqueManifold
from .optim import is_dtensor
from .roles import FILTER_TYPES, find_classifier
from .roles import plan as table1_plan
from .table1 import check_update

__all__ = ["declare", "Declaration", "check_optimizer", "declaration_of"]

#: The model attribute that keeps the last :class:`Declaration` (read by
#: :mod:`manifold_nets.distributed` once sharding has replaced the parameters).
DECLARATION_ATTR = "_manifold_nets_declaration"



class Declaration(dict):
    """What :func:`declare` did: parameter name -> manifold (``geoopt.Euclidean`` if none).

    A plain ``dict`` in ``model.named_parameters()`` order. ``str()`` gives a table of
    every parameter's manifold, role and the reason for it; :attr:`roles` and
    :attr:`reasons` hold them as data; :meth:`param_groups` gives optimiser groups per
    role. :func:`declare` builds it and keeps the last one on the model, where
    :mod:`manifold_nets.distributed` reads it after sharding.

    Parameters
    ----------
    update : {"bsgd", "sm", "un"}
        the update the model was declared for, kept as the attribute ``update`` (which
        shadows :meth:`dict.update` on instances). The other attributes, :attr:`roles`,
        :attr:`reasons`, :attr:`shapes` and :attr:`function_change`, are filled by
        :func:`declare` and documented below.

    Examples
    --------
    >>> from manifold_nets import Arch2, declare
    >>> net = Arch2(depth=1, width=4, in_features=3, num_classes=2)
    >>> dec = declare(net, "un")
    >>> print(dec)  # doctest: +ELLIPSIS
    update: un
    parameter               shape  role        manifold         why
    layers.0.linear.weight  4x3    filters     Oblique(ndim=1)  Table 1 (no inputs: not checked...
    layers.0.bn.weight      4      other       Euclidean        BatchNorm1d scale/shift: Euclid...
    layers.0.bn.bias        4      other       Euclidean        bias of a BatchNorm1d: Euclidea...
    classifier.weight       2x2    classifier  Euclidean        theta: the layer whose output i...
    >>> dec.update, dec.shapes["classifier.weight"], dec.function_change
    ('un', (2, 2), None)
    """

    def __init__(self, update: str):
        super().__init__()
        self.update = update
        #: Parameter name -> role: ``"filters"``, ``"classifier"``, ``"explicit"`` (given
        #: in ``manifolds=``) or ``"other"`` (biases, batch-norm scale and shift, ...).
        self.roles: dict[str, str] = {}
        #: Parameter name -> why it got its manifold (the last column of ``str(dec)``).
        self.reasons: dict[str, str] = {}
        #: Parameter name -> its shape.
        self.shapes: dict[str, tuple[int, ...]] = {}
        #: With ``inputs``: the relative change of the model's outputs on them that
        #: declaring caused, :math:`\|f_{after} - f_{before}\| / \|f_{before}\|`; ``None``
        #: without inputs.
        self.function_change: float | None = None

    def __str__(self) -> str:
        rows = [(n, "x".join(map(str, self.shapes[n])) or "scalar", self.roles[n],
                 _short(m), self.reasons.get(n, "")) for n, m in self.items()]
        head = ("parameter", "shape", "role", "manifold", "why")
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(5)]
        lines = [f"update: {self.update}",
                 "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                  for r in rows]
        if self.function_change is not None:
            lines.append(f"outputs changed by {self.function_change:.1e} (relative)")
        return "\n".join(lines)

    def param_groups(self, model: nn.Module, weight_decay: float = 0.0,
                     **options) -> list[dict]:
        """Optimiser parameter groups, one per role, with ``weight_decay`` on every group
        but the oblique filters (on the unit sphere a weight decay only fights the
        projection; :doc:`/theory`).

        Parameters
        ----------
        model : nn.Module
            the model that was declared (its parameters are looked up by name)
        weight_decay : float
            weight decay of every group but the oblique filters' (which get 0)
        **options
            further options of every group (``lr``, ``momentum``, ...)

        Returns
        -------
        list of dict
            one group per role, in the order the roles first occur: ``{"params": [...],
            "role": role, "weight_decay": ..., **options}``, ready for any
            :class:`torch.optim.Optimizer`. A role that mixes oblique and other
            parameters (``"explicit"``) gets two groups, without and with decay.

        Examples
        --------
        >>> from manifold_nets import Arch2, InvariantSGD, declare
        >>> net = Arch2(depth=1, width=4, in_features=3, num_classes=2)
        >>> dec = declare(net, "un")
        >>> groups = dec.param_groups(net, weight_decay=5e-4)
        >>> [(g["role"], len(g["params"]), g["weight_decay"]) for g in groups]
        [('filters', 1, 0.0), ('other', 2, 0.0005), ('classifier', 1, 0.0005)]
        >>> opt = InvariantSGD(groups, lr=0.1)
        """
        params = dict(model.named_parameters())
        groups: dict[tuple[str, bool], dict] = {}
        for name, manifold in self.items():
            role, oblique = self.roles[name], isinstance(manifold, ObliqueManifold)
            g = groups.setdefault((role, oblique), {
                "params": [], "role": role, **options,
                "weight_decay": 0.0 if oblique else weight_decay})
            g["params"].append(params[name])
        return list(groups.values())


def _short(m) -> str:
    return "Euclidean" if isinstance(m, geoopt.Euclidean) else repr(m).removesuffix(
        " manifold")


def check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise unless ``optimizer`` holds the model's current parameters (every trainable
    one, and no stale one).

    Parameters
    ----------
    model : nn.Module
        the model
    optimizer : torch.optim.Optimizer
        the optimiser meant to train it

    Raises
    ------
    ValueError
        naming the parameters the optimiser misses and how many stale tensors it holds

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.declare import check_optimizer
    >>> net = torch.nn.Linear(3, 2)
    >>> check_optimizer(net, torch.optim.SGD(net.parameters(), lr=0.1))
    >>> check_optimizer(net, torch.optim.SGD([net.weight], lr=0.1))
    Traceback (most recent call last):
    ...
    ValueError: the optimiser does not hold 1 of the model's trainable parameters (bias); ...
    """
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    current = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for i, n in current.items() if i not in held]
    stale = len(held - set(current))
    if missing or stale:
        raise ValueError(
            f"the optimiser does not hold {len(missing)} of the model's trainable parameters"
            f" ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); it holds "
            f"{stale} tensors that are not the model's. Fix: build the optimiser over "
            "model.parameters() after every change of the model's parameters.")


def _analyse(model: nn.Module, inputs, args: tuple, before: torch.Tensor, ran: set[str],
             rtol: float) -> dict:
    """What the symmetries of ``model`` do to its ``Linear``/``ConvNd`` weights:
    ``{"filters": weights whose every row scaling is a symmetry, "rows": weights whose
    rows some symmetry scales, "cols": weights whose columns some symmetry scales,
    "reached": the modules the inputs run, "changes": measured changes, "how": ...}``.

    From the structural analysis of :mod:`manifold_nets.symmetry.structure` where the model
    can be traced; otherwise (with a warning) measured: every filter's rows are scaled by
    random factors and the outputs on ``inputs`` compared (:func:`_scaling_changes`).
    """
    from .symmetry.groups import ScalingSpace
    from .symmetry.structure import analysis_copy, as_inputs, structural_symmetries

    out: dict = {"filters": set(), "rows": set(), "cols": set(), "reached": ran,
                 "changes": {}, "how": "graph"}
    try:
        net = analysis_copy(model, torch.float64, True)
        space = ScalingSpace(net)
        found = structural_symmetries(net, as_inputs(inputs, next(net.parameters()).device,
                                                   torch.float64), space)
    except Exception as err:  # noqa: BLE001 - any failure: measure instead, loudly
        why = f"{type(err).__name__}: {err}" if not isinstance(err, ValueError) else str(err)
        out["how"] = "the structural analysis could not trace the model"
        warnings.warn(f"declare: the structural symmetry analysis is unavailable ({why}); "
                      "each filter's per-filter scaling is measured by forward passes on the "
                      "given inputs instead, and only the filters it keeps the outputs of "
                      "are declared", stacklevel=3)
        names = [f"{n}.weight" if n else "weight" for n, m in model.named_modules()
                 if isinstance(m, FILTER_TYPES) and n in ran]
        measured = _scaling_changes(model, args, before, names)
        out["changes"] = measured
        kept = {k for k, (c, control) in measured.items()
                if c <= rtol and c <= _CONTROL_RATIO * control}
        out["filters"], out["rows"] = kept, set(kept)
        return out
    basis = found.basis.coalesce()
    moved = torch.zeros(space.dim, dtype=torch.bool)
    moved[basis.indices()[0][basis.values() != 0]] = True
    for site in space.sites:
        if site.kind != "matrix":
            continue
        if bool(moved[site.row_offset:site.row_offset + site.rows].any()):
            out["rows"].add(site.weight)
        if bool(moved[site.col_offset:site.col_offset + site.cols].any()):
            out["cols"].add(site.weight)
    for fam in found.families:
        if fam.kind != "per-filter" or len(fam.layers) != 1:
            continue
        site = next((s for s in space.sites if s.module == fam.layers[0]
                     and s.kind == "matrix"), None)
        if site is not None and fam.size == site.rows:
            out["filters"].add(site.weight)
    return out


def _scaling_changes(model: nn.Module, args: tuple, before: torch.Tensor,
                     names: list[str]) -> dict[str, tuple[float, float]]:
    """For each weight in ``names``: the relative change of the outputs when its rows are
    scaled by random factors in ``[1/2, 2]`` (alone, the batch norm after it following),
    and, as the control, when the same rows move by as much in random directions."""
    net = copy.deepcopy(model)
    params = dict(net.named_parameters(remove_duplicate=False))
    modules = dict(net.named_modules())
    norms = _attached_norms(net)
    g = torch.Generator().manual_seed(0)
    changes = {}
    for name in names:
        p = params[name]
        shape = (-1,) + (1,) * (p.dim() - 1)
        a = torch.exp((2 * torch.rand(p.shape[0], generator=g, dtype=torch.float64) - 1)
                      * 0.6931471805599453).to(p)
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p)
        rows = p.detach().flatten(1).norm(dim=1) * (a - 1).abs()
        noise *= (rows / noise.flatten(1).norm(dim=1).clamp_min(1e-300)).view(shape)
        saved = p.detach().clone()
        bn = modules.get(norms.get(name, ""))
        stats = [t.clone() for t in (bn.running_mean, bn.running_var)] if (
            bn is not None and getattr(bn, "running_mean", None) is not None) else None
        with torch.no_grad():
            p.mul_(a.view(shape))
            if bn is not None:
                _rescale_running_stats(bn, modules[name.rsplit(".", 1)[0]], a)
            scaled = _change(before, _forward(net, args))
            p.copy_(saved)
            if stats is not None:
                bn.running_mean.copy_(stats[0])
                bn.running_var.copy_(stats[1])
            p.add_(noise)
            control = _change(before, _forward(net, args))
            p.copy_(saved)
        changes[name] = (scaled, control)
    return changes


#: How much less than a random move of the same size a filter's scaling must change the
#: outputs to count, in :func:`declare`'s measured fallback, as a symmetry.
_CONTROL_RATIO = 1e-3


@torch.no_grad()
def _put(p: torch.Tensor, data: torch.Tensor, name: str, norms: dict[str, str],
         modules: dict[str, nn.Module], rtol: float) -> bool:
    """Copy the projected ``data`` into ``p``; where the projection rescaled rows, the batch
    norm after it follows. Returns whether rows changed by more than ``rtol`` with no batch
    norm registered after them."""
    scale = _row_scale(p.detach(), data)
    unattached = False
    if scale is not None:
        if name in norms:
            _rescale_running_stats(modules[norms[name]], modules[name.rsplit(".", 1)[0]],
                                   scale)
        else:
            unattached = bool(((scale - 1).abs() > rtol).any())
    p.copy_(data)
    return unattached


def _function_keepers(model: nn.Module, args: tuple, before: torch.Tensor, targets: dict,
                      candidates: list[str], norms: dict[str, str], rtol: float
                      ) -> dict[str, float]:
    """The ``candidates`` (of ``targets``) to leave off their manifold so that putting the
    rest on it keeps the outputs on ``args`` within ``rtol``, with each one's change.

    All targets are projected on a copy and the outputs compared; if they moved, each
    candidate is tried alone, those that move the outputs are dropped, and then the one
    that moved them most, until the rest keep them.
    """
    def change_with(names) -> float:
        net = copy.deepcopy(model)
        params = dict(net.named_parameters())
        modules = dict(net.named_modules())
        for n in names:
            _put(params[n], targets[n][1], n, norms, modules, rtol)
        return _change(before, _forward(net, args))

    if not candidates or change_with(targets) <= rtol:
        return {}
    alone = {n: change_with([n]) for n in candidates}
    dropped = {n: c for n, c in alone.items() if c > rtol}
    rest = [n for n in candidates if n not in dropped]
    fixed = [n for n in targets if n not in candidates]
    while rest and change_with(fixed + rest) > rtol:
        worst = max(rest, key=lambda n: alone[n])
        dropped[worst] = alone[worst]
        rest.remove(worst)
    return dropped


def _change(before: torch.Tensor, after: torch.Tensor) -> float:
    return float((after - before).norm() / before.norm().clamp_min(1e-300))


def _args(inputs) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


@torch.no_grad()
def _forward(net: nn.Module, args: tuple, ran: set[str] | None = None) -> torch.Tensor:
    """The outputs of ``net(*args)``, flat in float64, with torch's random state fixed for
    the pass (dropout in training mode draws the same masks every time); ``ran`` collects
    the names of the modules that run."""
    handles = [] if ran is None else [
        m.register_forward_pre_hook(lambda m, a, name=name: ran.add(name))
        for name, m in net.named_modules()]
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            out = net(*args)
    finally:
        for h in handles:
            h.remove()
    if hasattr(out, "logits") and not isinstance(out, torch.Tensor):
        out = out.logits
    if isinstance(out, (tuple, list)):
        out = torch.cat([o.reshape(-1) for o in out if isinstance(o, torch.Tensor)])
    return out.detach().reshape(-1).double()


def _outputs(model: nn.Module, inputs, ran: set[str] | None = None) -> torch.Tensor:
    """:func:`_forward` on a copy (train-mode batch norm updates statistics)."""
    return _forward(copy.deepcopy(model), _args(inputs), ran)


def _default_rtol(model: nn.Module) -> float:
    """1e-3, or four units of rounding of the model's coarsest floating dtype."""
    eps = [torch.finfo(p.dtype).eps for p in model.parameters() if p.is_floating_point()]
    return max([1e-3] + [4 * e for e in eps])


def _attached_norms(model: nn.Module) -> dict[str, str]:
    """``{weight name: batch-norm module name}`` for convs/linears followed by a batch
    norm of their width (:class:`~manifold_nets.symmetry.groups.ScalingSpace`'s rule)."""
    from .symmetry.groups import ScalingSpace

    try:
        space = ScalingSpace(model)
    except ValueError:
        return {}
    return {s.weight: s.batchnorm for s in space.sites if s.batchnorm}


def declare(
    model: nn.Module,
    update: str,
    classifier: str | nn.Module | None = "auto",
    manifolds: Mapping[str, geoopt.Manifold | None] | None = None,
    *,
    inputs=None,
    rtol: float | None = None,
) -> Declaration:
    r"""Declare the model's weights on the manifolds of an update of Table 1, in place.

    Every parameter keeps its identity: a parameter that gets a manifold becomes a
    :class:`geoopt.ManifoldParameter` *in place* (its class changes, the tensor object is
    the same), so an optimiser built before :func:`declare` holds the declared parameters
    and steps them on their manifolds (:class:`~manifold_nets.InvariantSGD` re-reads the
    manifolds when they change; geoopt's optimisers read them every step).

    Parameters
    ----------
    model : nn.Module
        any model; its ``nn.Linear`` / ``nn.ConvNd`` weights are the filters and the
        classifier, everything else stays Euclidean (listed with the reason).
    update : {"bsgd", "sm", "un"}
        ``"bsgd"``: everything Euclidean (plain SGD). ``"sm"``: the scaled metric, eqs.
        (7)-(8) (a metric: it changes nothing the model computes): the left metric on the
        filters, the right one on the classifier; with ``inputs``, the left metric where
        some symmetry scales a weight's rows, the right one where symmetries scale only
        its columns (as :math:`\theta`), and none where no symmetry acts on it.
        ``"un"``: unit-norm filters, eq. (9). With ``inputs``, only the
        filters whose per-filter scaling is a symmetry of the model
        (:func:`~manifold_nets.symmetry.discover`) go on the oblique manifold, so the
        model's function is unchanged; the others stay Euclidean with the reason. Without
        ``inputs``, every filter (Table 1), and a warning names the filters that
        normalising changed and that no batch norm follows.

        With ``inputs``, the outputs on them are kept: where the structural analysis
        cannot trace the model, each filter's per-filter scaling is measured by forward
        passes instead (with a warning); a filter whose normalisation still moves the
        outputs by more than ``rtol`` stays Euclidean with the measured change; filters
        that the inputs never run stay Euclidean, named as such. Comparisons fix torch's
        random state for each pass, so dropout in training mode draws the same masks.
    classifier : "auto", str, nn.Module or None
        the module (or ``"<module>.weight"``) holding :math:`\theta`. ``"auto"``
        (default): the ``Linear``/``ConvNd`` whose output is the model's output in the
        traced graph (:func:`~manifold_nets.roles.graph_classifier`). ``None``: no classifier.
    manifolds : mapping, optional
        explicit ``{parameter name: manifold}``; overrides the choice of ``update`` for the
        names given (``None`` or ``geoopt.Euclidean()`` means Euclidean). With ``inputs``,
        an override that changes the outputs warns with the measured change.
    inputs : torch.Tensor or tuple, optional
        example inputs: the symmetry analysis for ``"un"`` and ``"sm"``, and the measured
        change of the outputs (:attr:`Declaration.function_change`).
    rtol : float, optional
        relative change of the outputs that counts as a change: with ``inputs``, a filter
        whose normalisation changes the outputs by more stays Euclidean, and an explicit
        manifold that does warns. Default: 1e-3 (room for batch norm's ``eps``, which makes
        per-filter scaling a symmetry only up to about ``eps / var``), or four units of
        rounding of the model's coarsest dtype where that is larger (bfloat16, float16).

    Returns
    -------
    Declaration
        a ``dict`` parameter name -> manifold for every parameter; print it for a table
        with each parameter's role and the reason.

    Raises
    ------
    ValueError
        unknown ``update``; a classifier that is not at least 2-D or not in the model; an
        unknown name in ``manifolds``; a transposed convolution or a ``transformers``
        ``Conv1D`` (GPT-2's layers: convert them with
        :func:`~manifold_nets.convert.conv1d_to_linear`) under ``"sm"`` or ``"un"``
        without an explicit manifold; a weight that does not fit its manifold, e.g. a zero
        filter under ``"un"`` (the message names the parameter and the filter), or a NaN or
        infinite entry in a weight that gets a manifold.
    TypeError
        a ``classifier`` that is neither a name nor a module

    Notes
    -----
    Normalising a filter that feeds a batch norm rescales that batch norm's running
    statistics to match (mean and variance of the filter's scaled output), so the model
    in eval mode computes what it computed before.

    Examples
    --------
    >>> import geoopt
    >>> from manifold_nets import Arch1, declare
    >>> net = Arch1(depth=2, width=8, in_features=12, num_classes=3)
    >>> dec = declare(net, "sm")
    >>> {name: str(m) for name, m in dec.items()}  # doctest: +NORMALIZE_WHITESPACE
    {'layers.0.linear.weight': "DiagScaledEuclidean(side='left', ndim=1) manifold",
     'layers.1.linear.weight': "DiagScaledEuclidean(side='left', ndim=1) manifold",
     'classifier.weight': "DiagScaledEuclidean(side='right', ndim=2) manifold"}
    >>> dec.reasons["classifier.weight"]
    "theta: the layer whose output is the model's output; SM's right metric (eq. (8))"
    >>> opt = geoopt.optim.RiemannianSGD(net.parameters(), lr=1e-2)
    """
    check_update(update)
    classifier, how = find_classifier(model, classifier)
    if classifier is None and how != "given" and update in ("un", "sm") and inputs is None:
        warnings.warn(
            f"declare(..., {update!r}): no classifier found ({how}), so every Linear "
            f"and ConvNd weight is treated as filters; pass classifier= to name the "
            f"layer holding theta, or classifier=None to say there is none",
            stacklevel=2)
    explicit = dict(manifolds or {})
    if update != "bsgd":
        refuse_conv1d(model, f"declare(..., {update!r})",
                      skip={k.rsplit(".", 1)[0] for k in explicit if k.endswith(".weight")})
    rtol = _default_rtol(model) if rtol is None else rtol
    ran: set[str] = set()
    before = _outputs(model, inputs, ran) if inputs is not None else None
    symmetric = _analyse(model, inputs, _args(inputs), before, ran, rtol) if (
        inputs is not None and update in ("un", "sm")) else None
    plan = table1_plan(model, update, classifier, how, explicit, symmetric)
    params = dict(model.named_parameters())

    # check every weight that gets a manifold first: nothing changes unless all fit
    targets = {}
    for name, p in params.items():
        manifold = plan.get(name, (None,))[0]
        if isinstance(manifold, geoopt.Euclidean):
            manifold = None
        if manifold is None:
            continue
        with torch.no_grad():
            bad = ~torch.isfinite(p.detach())
            if bool(bad.any()):
                first = tuple(int(i) for i in bad.nonzero()[0])
                raise ValueError(
                    f"`{name}` has {int(bad.sum())} non-finite entries (the first at index "
                    f"{first}) and cannot be declared on {manifold!r} for update "
                    f"{update!r}; re-initialise it with finite values."
                )
            try:
                data = manifold.projx(p.detach().clone())
                manifold.assert_check_point_on_manifold(data)
            except ValueError as err:
                raise ValueError(f"`{name}` cannot be declared on {manifold!r} for "
                                 f"update {update!r}: {err}") from err
        targets[name] = (manifold, data)

    norms = _attached_norms(model)
    if before is not None:  # the outputs are kept: a filter that changes them stays off
        moved = [n for n, (_, data) in targets.items()  # SM's metrics change no value
                 if n not in explicit and not torch.equal(params[n].detach(), data)]
        for name, change in _function_keepers(model, _args(inputs), before, targets, moved,
                                              norms, rtol).items():
            del targets[name]
            plan[name] = (None, plan[name][1], f"normalising it changed the outputs on the "
                          f"given inputs by {change:.1e} (relative, > rtol {rtol:.0e}): UN "
                          f"would change the function; Euclidean")
    modules = dict(model.named_modules())
    changed_unattached = []
    declaration = Declaration(update)
    for name, p in params.items():
        manifold, role, why = plan.get(name, (None, "other", _other_reason(name, modules)))
        if name in targets:
            manifold, data = targets[name]
            if _put(p, data, name, norms, modules, rtol):
                changed_unattached.append(name)
            p.__class__ = geoopt.ManifoldParameter
            p.manifold = manifold
        elif isinstance(p, geoopt.ManifoldParameter):
            p.__class__ = nn.Parameter
            del p.manifold
        declaration[name] = manifold if name in targets else geoopt.Euclidean()
        declaration.roles[name] = role
        declaration.reasons[name] = why
        declaration.shapes[name] = tuple(p.shape)
    object.__setattr__(model, DECLARATION_ATTR, declaration)
    if not getattr(model, _HOOKED, False):
        model.register_state_dict_post_hook(_record_declaration)
        model.register_load_state_dict_pre_hook(_check_declaration)
        object.__setattr__(model, _HOOKED, True)

    if before is not None:
        change = _change(before, _outputs(model, inputs))
        declaration.function_change = change
        if change > rtol:
            warnings.warn(f"declare(..., {update!r}): the model's outputs on the given inputs "
                          f"changed by {change:.2e} (relative); the explicit manifolds "
                          f"{sorted(explicit)} or the filters {sorted(targets)} do not "
                          "preserve the function.", stacklevel=2)
    elif changed_unattached and update == "un":
        warnings.warn(
            f"declare(..., 'un'): normalising the filters of {', '.join(changed_unattached)} "
            "changed them, and no batch norm is registered after them: unless a "
            "normalisation follows each filter, the model now computes another function. "
            "Pass inputs= to put only the filters whose scaling is a symmetry on the "
            "oblique manifold (and to measure the change), or manifolds= to choose.",
            stacklevel=2)
    return declaration


_HOOKED = "_manifold_nets_hooked"
#: The key of a declared model's entry in its state dict's metadata.
_META = "manifold_nets"


def _record(model: nn.Module) -> dict | None:
    from .optim import kind_of, kind_tag

    declaration = getattr(model, DECLARATION_ATTR, None)
    if declaration is None:
        return None
    return {"update": declaration.update,
            "manifolds": {n: kind_tag(kind_of(p)) for n, p in model.named_parameters()}}


def _record_declaration(module, state_dict, prefix, local_metadata) -> None:
    """State-dict hook of a declared model: its declaration in the metadata."""
    record = _record(module)
    if record is not None:
        local_metadata[_META] = record


def _check_declaration(module, state_dict, prefix, local_metadata, strict, missing_keys,
                       unexpected_keys, error_msgs) -> None:
    """Load-state-dict pre-hook of a declared model: refuse, before anything is copied,
    weights written by a model declared otherwise, and, from an undeclared model, oblique
    filters that are not on their manifold."""
    now = _record(module)
    if now is None:
        return
    saved = local_metadata.get(_META)
    name = type(module).__name__
    if saved is not None:
        wrong = [f"`{n}` was {t}, is {now['manifolds'][n]}"
                 for n, t in saved["manifolds"].items()
                 if n in now["manifolds"] and now["manifolds"][n] != t]
        if saved["update"] != now["update"] or wrong:
            raise RuntimeError(
                f"{name}.load_state_dict: the state dict was written by a model declared "
                f"{saved['update']!r}; this one is declared {now['update']!r}"
                f"{': ' + '; '.join(wrong[:6]) if wrong else ''}. Fix: declare this model "
                f"with manifold_nets.declare(model, {saved['update']!r}, ...) before "
                "loading, or load into an undeclared model and declare it afterwards.")
        return
    params = dict(module.named_parameters())
    for n, p in params.items():
        manifold = getattr(p, "manifold", None)
        value = state_dict.get(prefix + n)
        if (isinstance(manifold, ObliqueManifold) and isinstance(value, torch.Tensor)
                and value.shape == p.shape and not is_dtensor(value)):
            ok, why = manifold.check_point_on_manifold(value.to(p.dtype), explain=True)
            if not ok:
                raise RuntimeError(
                    f"{name}.load_state_dict: `{n}`: its filters are not unit-norm ({why}), "
                    "so the state dict was not written by a model declared 'un', and this "
                    "model is. Fix: load into an undeclared model and declare it afterwards "
                    "(declare projects the filters and keeps what the model computes).")


def declaration_of(state_dict: Mapping) -> dict | None:
    """The declaration that a model's state dict records, or ``None`` if the model that
    wrote it was not declared.

    :func:`declare` makes the model record ``{"update": ..., "manifolds": {name: kind}}``
    in its state dict's metadata (kept by :func:`torch.save`), and refuse, in
    ``load_state_dict``, weights written by a model declared otherwise, or oblique filters
    that are not unit-norm.

    Parameters
    ----------
    state_dict : Mapping
        a model's ``state_dict()``, as saved

    Returns
    -------
    dict or None
        ``{"update": "un" | "sm" | "bsgd", "manifolds": {parameter name: kind}}``, the
        kinds as :func:`~manifold_nets.optim.kind_tag` writes them

    Examples
    --------
    >>> from manifold_nets import Arch2, declare
    >>> from manifold_nets.declare import declaration_of
    >>> net = Arch2(depth=1, width=4, in_features=3, num_classes=2)
    >>> declaration_of(net.state_dict()) is None
    True
    >>> _ = declare(net, "un")
    >>> record = declaration_of(net.state_dict())
    >>> record["update"], record["manifolds"]["layers.0.linear.weight"]
    ('un', 'oblique(ndim=1)')
    """
    meta = getattr(state_dict, "_metadata", None) or {}
    return (meta.get("") or {}).get(_META)


def _other_reason(name: str, modules: dict) -> str:
    owner = modules.get(name.rsplit(".", 1)[0] if "." in name else "")
    leaf = name.rsplit(".", 1)[-1]
    kind = type(owner).__name__ if owner is not None else "parameter"
    if leaf == "bias":
        return f"bias of a {kind}: Euclidean (Table 1)"
    if isinstance(owner, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
        return f"{kind} scale/shift: Euclidean (Table 1)"
    if isinstance(owner, nn.Embedding):
        return "embedding table: rows are tokens, not filters; Euclidean"
    if isinstance(owner, nn.MultiheadAttention):
        return "attention projection (packed q/k/v): not a filter bank; Euclidean"
    return f"{leaf} of a {kind}: not a Linear/ConvNd filter bank; Euclidean"


def _row_scale(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor | None:
    """Per-row factor ``new = a * old`` if the projection only rescaled rows."""
    if old.dim() < 2:
        return None
    o, n = old.flatten(1).double(), new.flatten(1).double()
    norm = o.norm(dim=1)
    a = n.norm(dim=1) / norm.clamp_min(1e-300)
    tol = max(1e-6, 4 * torch.finfo(old.dtype).eps)
    if not torch.allclose(n, a[:, None] * o, rtol=tol, atol=1e-12):
        return None
    return a


def _rescale_running_stats(bn: nn.Module, layer: nn.Module, a: torch.Tensor) -> None:
    """The running statistics of the batch norm after a layer whose weight rows were
    scaled by ``a`` (its bias unchanged): mean ``a (m - b) + b``, variance ``a^2 v``."""
    if getattr(bn, "running_mean", None) is None:
        return
    a = a.to(bn.running_mean)
    b = layer.bias.detach().to(bn.running_mean) if getattr(layer, "bias", None) is not None \
        else torch.zeros_like(bn.running_mean)
    bn.running_mean.copy_(a * (bn.running_mean - b) + b)
    bn.running_var.mul_(a.square())
