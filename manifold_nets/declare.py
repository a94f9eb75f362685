r"""Put a model's weights on the paper's manifolds (Table 1), in place.

:func:`declare` replaces parameters by :class:`geoopt.ManifoldParameter` so that
:class:`geoopt.optim.RiemannianSGD` over ``model.parameters()`` performs the chosen update:

=========  ======================================  =========================================
update     filter weights (``Linear``/``ConvNd``)   classifier :math:`\theta`
=========  ======================================  =========================================
``bsgd``   Euclidean                               Euclidean
``sm``     ``DiagScaledEuclidean("left")``         ``DiagScaledEuclidean("right")``
``un``     ``ObliqueManifold``                     Euclidean (Table 1, released code)
=========  ======================================  =========================================

Every other parameter (biases, batch-norm scale and shift) stays Euclidean, i.e. gets
plain SGD. A ``ConvNd`` weight ``(out, in, *kernel)`` has ``out`` filters of ``ndim =
weight.dim() - 1`` dims each; a convolutional classifier uses
``DiagScaledEuclidean("right", ndim=weight.dim())`` (its columns are input channels).
"""

from __future__ import annotations

from collections.abc import Mapping

import geoopt
import torch
from torch import nn

from .manifolds import DiagScaledEuclidean, ObliqueManifold

__all__ = ["declare", "Declaration", "UPDATES", "filter_modules", "default_classifier"]

#: The updates of Table 1 that :func:`declare` knows.
UPDATES = ("bsgd", "sm", "un")

#: The model attribute that keeps the last :class:`Declaration` (read by
#: :mod:`manifold_nets.distributed` once sharding has replaced the parameters).
DECLARATION_ATTR = "_manifold_nets_declaration"

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class Declaration(dict):
    """What :func:`declare` did: parameter name -> manifold (``geoopt.Euclidean`` if none).

    A plain ``dict`` in ``model.named_parameters()`` order; ``str()`` gives a table and
    :attr:`roles` says why each parameter got its manifold.
    """

    def __init__(self, update: str):
        super().__init__()
        self.update = update
        self.roles: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}

    def __str__(self) -> str:
        rows = [(n, "x".join(map(str, self.shapes[n])) or "scalar", self.roles[n], repr(m))
                for n, m in self.items()]
        head = ("parameter", "shape", "role", "manifold")
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
        lines = [f"update: {self.update}",
                 "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                  for r in rows]
        return "\n".join(lines)


def filter_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs whose weight holds filters: ``Linear`` and ``ConvNd``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, *_CONV))]


def default_classifier(model: nn.Module) -> str | None:
    """Name of the default classifier module: the last ``nn.Linear``, else the last ``ConvNd``.

    Fully convolutional networks (segmentation) usually end in a 1x1 convolution that plays
    the role of :math:`\\theta`. Returns ``None`` when the model has neither.
    """
    mods = filter_modules(model)
    linears = [n for n, m in mods if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    return mods[-1][0] if mods else None


def _resolve_classifier(model: nn.Module, classifier) -> str | None:
    modules = dict(model.named_modules())
    if classifier is None:
        return default_classifier(model)
    if isinstance(classifier, nn.Module):
        for name, mod in modules.items():
            if mod is classifier:
                classifier = name
                break
        else:
            raise ValueError("`classifier` is a module that is not part of `model`")
    if not isinstance(classifier, str):
        raise TypeError(f"`classifier` must be a module name or module, got {classifier!r}")
    name = classifier.removesuffix(".weight")
    if name not in modules:
        raise ValueError(
            f"`classifier`: model has no module {classifier!r}; modules with weights: "
            f"{[n for n, _ in filter_modules(model)]}"
        )
    weight = getattr(modules[name], "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"classifier {name!r} has no weight tensor")
    if weight.dim() < 2:
        raise ValueError(
            f"classifier {name!r} has a {weight.dim()}-D weight of shape {tuple(weight.shape)}; "
            "the classifier theta must be a 2-D matrix (num_classes x features) or a "
            "convolution weight (out, in, *kernel). Name the last Linear/ConvNd instead."
        )
    return name


def _plan(model: nn.Module, update: str, classifier: str | None,
          explicit: Mapping) -> dict[str, tuple]:
    """name -> (manifold or None, role) for the parameters the update acts on."""
    plan = {}
    for name, mod in model.named_modules():
        key = f"{name}.weight" if name else "weight"
        if isinstance(mod, _TRANSPOSED) and update != "bsgd" and key not in explicit:
            raise ValueError(
                f"{name!r} is a {type(mod).__name__}: its weight is (in, out, *kernel), so its "
                "filters are not the leading dim. Pass its manifold explicitly with "
                f"manifolds={{'{name}.weight': ...}} or leave it Euclidean."
            )
        if not isinstance(mod, (nn.Linear, *_CONV)):
            continue
        w = mod.weight
        if name == classifier:
            if update == "sm":
                plan[key] = (DiagScaledEuclidean("right", ndim=w.dim()), "classifier")
            else:
                plan[key] = (None, "classifier")
        elif update == "sm":
            plan[key] = (DiagScaledEuclidean("left", ndim=w.dim() - 1), "filters")
        elif update == "un":
            plan[key] = (ObliqueManifold(ndim=w.dim() - 1), "filters")
        else:
            plan[key] = (None, "filters")
    return plan


def declare(
    model: nn.Module,
    update: str,
    classifier: str | nn.Module | None = None,
    manifolds: Mapping[str, geoopt.Manifold | None] | None = None,
) -> Declaration:
    r"""Declare the model's weights as ``ManifoldParameter`` for an update of Table 1.

    Parameters
    ----------
    model : nn.Module
        any module made of ``nn.Linear`` / ``nn.ConvNd`` layers (plus anything else, which
        stays Euclidean). Modified in place: parameters are replaced, so create the
        optimiser *after* calling :func:`declare`.
    update : {"bsgd", "sm", "un"}
        ``"bsgd"``: everything Euclidean (plain SGD). ``"sm"``: the scaled metric, eqs.
        (7)-(8). ``"un"``: unit-norm filters, eq. (9); every filter is normalised
        (``projx``), which changes the function of a network without batch norm.
    classifier : str or nn.Module, optional
        the module (or ``"<module>.weight"``) holding :math:`\theta`. Default: the last
        ``nn.Linear``, or the last ``ConvNd`` if the model has no ``Linear``.
    manifolds : mapping, optional
        explicit ``{parameter name: manifold}``; overrides the choice of ``update`` for the
        names given (``None`` or ``geoopt.Euclidean()`` means Euclidean).

    Returns
    -------
    Declaration
        a ``dict`` parameter name -> manifold for every parameter; print it for a table.

    Raises
    ------
    ValueError
        unknown ``update``; a classifier that is not at least 2-D or not in the model; an
        unknown name in ``manifolds``; a weight that does not fit its manifold, e.g. a zero
        filter under ``"un"`` (the message names the parameter and the filter), or a NaN or
        infinite entry in a weight that gets a manifold.

    Examples
    --------
    >>> import geoopt
    >>> from manifold_nets import Arch1, declare
    >>> net = Arch1(depth=2, width=8, in_features=12, num_classes=3)
    >>> print(declare(net, "sm"))
    update: sm
    parameter               shape  role        manifold
    layers.0.linear.weight  8x12   filters     DiagScaledEuclidean(side='left', ndim=1) manifold
    layers.1.linear.weight  8x4    filters     DiagScaledEuclidean(side='left', ndim=1) manifold
    classifier.weight       3x4    classifier  DiagScaledEuclidean(side='right', ndim=2) manifold
    >>> opt = geoopt.optim.RiemannianSGD(net.parameters(), lr=1e-2)
    """
    if update not in UPDATES:
        raise ValueError(f"unknown update {update!r}; choose one of {', '.join(UPDATES)}")
    classifier = _resolve_classifier(model, classifier)
    plan = _plan(model, update, classifier, manifolds or {})
    params = dict(model.named_parameters())
    for name, manifold in (manifolds or {}).items():
        if name not in params:
            raise ValueError(f"manifolds: model has no parameter {name!r}; parameters: "
                             f"{list(params)}")
        plan[name] = (manifold, "explicit")

    declaration = Declaration(update)
    new = {}
    for name, p in params.items():
        manifold, role = plan.get(name, (None, "other"))
        if isinstance(manifold, geoopt.Euclidean):
            manifold = None
        if manifold is not None:
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
            new[name] = geoopt.ManifoldParameter(data, manifold=manifold,
                                                 requires_grad=p.requires_grad)
        elif isinstance(p, geoopt.ManifoldParameter):
            new[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        declaration[name] = manifold if manifold is not None else geoopt.Euclidean()
        declaration.roles[name] = role
        declaration.shapes[name] = tuple(p.shape)

    # replace every occurrence (shared parameters included)
    by_id = {id(params[n]): q for n, q in new.items()}
    for mod in model.modules():
        for leaf, p in list(mod._parameters.items()):
            if p is not None and id(p) in by_id:
                setattr(mod, leaf, by_id[id(p)])
    object.__setattr__(model, DECLARATION_ATTR, declaration)
    return declaration
