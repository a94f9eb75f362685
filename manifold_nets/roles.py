r"""Which role each of a model's parameters plays in Table 1, and the manifold it gets.

The weights of ``nn.Linear`` and ``nn.ConvNd`` (:data:`FILTER_TYPES`) hold filters, one per
row; the classifier :math:`\theta` is the one whose output is the model's output
(:func:`graph_classifier`); every other parameter is Euclidean. :func:`plan` gives every
weight its role, its manifold from :mod:`manifold_nets.table1` and the reason, optionally
from what the model's symmetries do to it; :func:`table1_manifolds` is the plan without
inputs as ``{parameter name: manifold}``. :func:`~manifold_nets.declare.declare` applies
the plan; the symmetry package reads it to predict what an update respects, without
declaring anything.

Examples
--------
>>> from manifold_nets import Arch1
>>> from manifold_nets.roles import table1_manifolds
>>> net = Arch1(depth=1, width=4, in_features=3, num_classes=2)
>>> {n: type(m).__name__ for n, m in table1_manifolds(net, "un").items()}
{'layers.0.linear.weight': 'ObliqueManifold', 'classifier.weight': 'Euclidean'}
"""

from __future__ import annotations

from collections.abc import Mapping

import geoopt
import torch
import torch.fx
from torch import nn

from .convert import refuse_conv1d
from .table1 import check_update, manifold_for

__all__ = ["FILTER_TYPES", "filter_modules", "default_classifier", "graph_classifier",
           "find_classifier", "plan", "table1_manifolds"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: The modules whose weight holds filters, one per row: ``Linear`` and ``ConvNd``
#: (transposed convolutions hold theirs in the second dim and are not included).
FILTER_TYPES = (nn.Linear, *_CONV)


def filter_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs whose weight holds filters: ``Linear`` and ``ConvNd``.

    Parameters
    ----------
    model : nn.Module
        any model

    Returns
    -------
    list of (str, nn.Module)
        every ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d`` with its name,
        in ``model.named_modules()`` order (transposed convolutions are not included)

    Examples
    --------
    >>> from manifold_nets import Arch1
    >>> from manifold_nets.roles import filter_modules
    >>> [name for name, _ in filter_modules(Arch1(depth=2, width=4, in_features=3))]
    ['layers.0.linear', 'layers.1.linear', 'classifier']
    """
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FILTER_TYPES)]


def default_classifier(model: nn.Module) -> str | None:
    """Name of the default classifier module: the last ``nn.Linear``, else the last ``ConvNd``.

    Fully convolutional networks (segmentation) usually end in a 1x1 convolution that plays
    the role of :math:`\\theta`.

    Parameters
    ----------
    model : nn.Module
        any model

    Returns
    -------
    str or None
        the module's name, or ``None`` when the model has neither

    See Also
    --------
    graph_classifier : the classifier as the traced graph says, which
        :func:`~manifold_nets.declare.declare` uses

    Examples
    --------
    >>> from manifold_nets.roles import default_classifier
    >>> from manifold_nets.nets import SegNet
    >>> default_classifier(SegNet(widths=(4, 8)))
    'classifier'
    """
    mods = filter_modules(model)
    linears = [n for n, m in mods if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    return mods[-1][0] if mods else None


_THROUGH = {"flatten", "view", "reshape", "squeeze", "contiguous", "float", "transpose",
            "permute", "dropout", "getitem", "softmax", "log_softmax"}


def graph_classifier(model: nn.Module) -> tuple[str | None, str]:
    """The classifier as the executed graph says: the ``Linear``/``ConvNd`` whose output is
    the model's output (through reshapes, dropout and a final soft-max, which :math:`\theta`
    feeds in the paper's networks). Returns ``(name, how)``, ``how``
    saying where the answer came from; when :mod:`torch.fx` cannot trace the model, the
    last registered ``Linear`` (else ``ConvNd``), and ``how`` says so.

    Parameters
    ----------
    model : nn.Module
        any model; it is traced with ``torch.fx.symbolic_trace``, not run

    Returns
    -------
    name : str or None
        the classifier module's name; ``None`` when some other operation (an activation,
        a sum, ...) produces the model's output
    how : str
        where the answer came from, for
        :class:`~manifold_nets.declare.Declaration`'s reasons

    Examples
    --------
    >>> import torch
    >>> from manifold_nets import Arch1
    >>> from manifold_nets.roles import graph_classifier
    >>> graph_classifier(Arch1(depth=1, width=4, in_features=3))
    ('classifier', "the layer whose output is the model's output")
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Softmax(dim=1))
    >>> graph_classifier(net)
    ('0', "the layer whose output is the model's output")
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Sigmoid())
    >>> graph_classifier(net)
    (None, "no Linear/ConvNd produces the model's output")
    """
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as err:  # fx raises many kinds on dynamic control flow
        return default_classifier(model), (
            f"the last registered Linear/ConvNd (the graph could not be traced: "
            f"{type(err).__name__})")
    modules = dict(gm.named_modules())
    out = next(n for n in gm.graph.nodes if n.op == "output")
    node = out.args[0]
    while isinstance(node, (tuple, list)) and len(node) == 1:
        node = node[0]
    while isinstance(node, torch.fx.Node):
        if node.op == "call_module":
            mod = modules[node.target]
            if isinstance(mod, FILTER_TYPES):
                return node.target, "the layer whose output is the model's output"
            if not isinstance(mod, (nn.Flatten, nn.Identity, nn.modules.dropout._DropoutNd,
                                    nn.Softmax, nn.LogSoftmax)):
                break
        elif node.op in ("call_method", "call_function"):
            name = node.target if isinstance(node.target, str) else node.target.__name__
            if name not in _THROUGH:
                break
        else:
            break
        node = node.args[0] if node.args else None
    return None, "no Linear/ConvNd produces the model's output"


def _named_classifier(model: nn.Module, classifier) -> str | None:
    modules = dict(model.named_modules())
    if classifier is None:
        return None
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


def _weights(model: nn.Module, update: str, classifier: str | None, classifier_how: str,
             explicit: Mapping, symmetric: dict | None, tied: dict[str, str]
             ) -> dict[str, tuple]:
    """The rows of :func:`plan` for every ``Linear``/``ConvNd`` weight, under its
    registered name (tied aliases included)."""
    plan = {}
    measured = symmetric is not None and symmetric["how"] != "graph"
    for name, mod in model.named_modules():
        key = f"{name}.weight" if name else "weight"
        if isinstance(mod, _TRANSPOSED) and update != "bsgd" and key not in explicit:
            raise ValueError(
                f"{name!r} is a {type(mod).__name__}: its weight is (in, out, *kernel), so its "
                "filters are not the leading dim. Pass its manifold explicitly with "
                f"manifolds={{'{name}.weight': ...}} or leave it Euclidean."
            )
        if not isinstance(mod, FILTER_TYPES):
            continue
        w = mod.weight
        tie = f"; tied with {tied[key]}" if key in tied else ""
        if symmetric is not None and name not in symmetric["reached"] and name != classifier:
            plan[key] = (None, "filters", "the given inputs never run it, so nothing about "
                         f"its symmetries is known: Euclidean{tie}")
            continue
        change = symmetric["changes"].get(key) if measured else None
        if name == classifier:
            why = f"theta: {classifier_how}{tie}"
            if update == "sm":
                plan[key] = (manifold_for("sm", "classifier", w.dim()), "classifier",
                             why + "; SM's right metric (eq. (8))")
            else:
                plan[key] = (None, "classifier", why + ("; Table 1: UN leaves theta "
                                                        "Euclidean" if update == "un" else ""))
        elif update == "sm":
            if symmetric is None or key in symmetric["rows"]:
                plan[key] = (manifold_for("sm", "filters", w.dim()), "filters",
                             f"SM's left metric on the rows (eq. (7)){tie}"
                             + (f"; {_measured(change, symmetric)}" if measured else ""))
            elif measured:
                plan[key] = (None, "filters", f"{_measured(change, symmetric)}: "
                             f"Euclidean{tie}")
            elif key in symmetric["cols"]:
                plan[key] = (manifold_for("sm", "classifier", w.dim()), "filters",
                             "symmetries scale its columns only: SM's right metric "
                             f"(eq. (8)){tie}")
            else:
                plan[key] = (None, "filters", "no rescaling symmetry acts on it: "
                             f"Euclidean{tie}")
        elif update == "un":
            if symmetric is None:
                plan[key] = (manifold_for("un", "filters", w.dim()), "filters",
                             f"Table 1 (no inputs: not checked that its per-filter scaling "
                             f"is a symmetry){tie}")
            elif key in symmetric["filters"]:
                plan[key] = (manifold_for("un", "filters", w.dim()), "filters",
                             (_measured(change, symmetric) if measured else
                              "its per-filter scaling is a symmetry") +
                             f": UN changes nothing{tie}")
            elif measured:
                plan[key] = (None, "filters", f"{_measured(change, symmetric)}: UN would "
                             f"change the function; force it with manifolds={{'{key}': "
                             f"ObliqueManifold()}}{tie}")
            else:
                plan[key] = (None, "filters",
                             "its per-filter scaling is not a symmetry (nothing normalises "
                             "its outputs): UN would change the function; force it with "
                             f"manifolds={{'{key}': ObliqueManifold()}}{tie}")
        else:
            plan[key] = (None, "filters", f"B-SGD{tie}")
    return plan


def _measured(change: tuple[float, float], symmetric: dict) -> str:
    return (f"scaling its filters by random factors changed the outputs on the given "
            f"inputs by {change[0]:.1e} (relative), moving them as far at random by "
            f"{change[1]:.1e} (measured: {symmetric['how']})")




def _tied(model: nn.Module) -> dict[str, str]:
    """Parameter names that share their tensor with another registered name."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first and first[id(p)] != name:
            tied[name] = first[id(p)]
            tied.setdefault(first[id(p)], name)
        else:
            first.setdefault(id(p), name)
    return tied




def find_classifier(model: nn.Module, classifier="auto") -> tuple[str | None, str]:
    """The module that holds :math:`\\theta`, and where the answer came from.

    Parameters
    ----------
    model : nn.Module
        any model
    classifier : "auto", str, nn.Module or None
        ``"auto"``: :func:`graph_classifier`. A module of ``model``, or its name (with or
        without ``".weight"``): that module. ``None``: no classifier.

    Returns
    -------
    name : str or None
        the module's name
    how : str
        ``"given"``, or what :func:`graph_classifier` says

    Raises
    ------
    ValueError
        a module that is not part of ``model``, an unknown name, a module without a weight
        or with a weight of fewer than 2 dims
    TypeError
        a ``classifier`` that is neither a name nor a module

    Examples
    --------
    >>> from manifold_nets import Arch1
    >>> from manifold_nets.roles import find_classifier
    >>> net = Arch1(depth=1, width=4, in_features=3)
    >>> find_classifier(net), find_classifier(net, "classifier.weight")
    (('classifier', "the layer whose output is the model's output"), ('classifier', 'given'))
    """
    if isinstance(classifier, str) and classifier == "auto":
        return graph_classifier(model)
    return _named_classifier(model, classifier), "given"


def plan(model: nn.Module, update: str, classifier: str | None, how: str = "given",
         manifolds: Mapping | None = None, symmetric: dict | None = None
         ) -> dict[str, tuple]:
    """The role, the manifold of Table 1 and the reason for each weight an update acts on.

    Parameters
    ----------
    model : nn.Module
        any model (not modified)
    update : {"bsgd", "sm", "un"}
        the update of Table 1
    classifier : str or None
        the classifier's module name (:func:`find_classifier`)
    how : str
        where the classifier came from, for the reasons
    manifolds : mapping, optional
        explicit ``{parameter name: manifold}``; overrides the update's choice
    symmetric : dict, optional
        what the model's symmetries do to its weights (as
        :func:`~manifold_nets.declare.declare` measures it from ``inputs``): the sets
        ``"filters"``, ``"rows"``, ``"cols"`` and ``"reached"``, ``"changes"`` and
        ``"how"``. ``None``: Table 1 as it stands.

    Returns
    -------
    dict
        ``{parameter name: (manifold or None, role, reason)}``; ``None`` means Euclidean.
        A tied weight appears under its first registered name. Parameters not listed
        (biases, normalisation parameters, embeddings) are Euclidean.

    Raises
    ------
    ValueError
        an update not in Table 1, a transposed convolution under ``"sm"`` or ``"un"``
        without an explicit manifold, or an unknown name in ``manifolds``

    Examples
    --------
    >>> from manifold_nets import Arch1
    >>> from manifold_nets.roles import plan
    >>> rows = plan(Arch1(depth=1, width=4, in_features=3), "sm", "classifier")
    >>> {name: role for name, (_, role, _) in rows.items()}
    {'layers.0.linear.weight': 'filters', 'classifier.weight': 'classifier'}
    """
    check_update(update)
    explicit = dict(manifolds or {})
    tied = _tied(model)
    rows = _weights(model, update, classifier, how, explicit, symmetric, tied)
    params = dict(model.named_parameters())
    for key in [k for k in rows if k not in params and k in tied]:  # a tied alias
        manifold, role, why = rows.pop(key)
        canonical = tied[key]
        if canonical not in rows or role == "classifier":
            rows[canonical] = (manifold, role, f"as {key}: {why}")
    for name, manifold in explicit.items():
        if name not in params:
            raise ValueError(f"manifolds: model has no parameter {name!r}; parameters: "
                             f"{list(params)}")
        rows[name] = (manifold, "explicit", "given in manifolds=")
    return rows


def table1_manifolds(model: nn.Module, update: str, classifier="auto") -> dict:
    """The manifold that :func:`~manifold_nets.declare.declare` without inputs gives every
    parameter of ``model`` for ``update``, without declaring anything.

    Parameters
    ----------
    model : nn.Module
        any model (not modified)
    update : {"bsgd", "sm", "un"}
        the update of Table 1
    classifier : "auto", str, nn.Module or None
        as :func:`find_classifier`

    Returns
    -------
    dict
        ``{parameter name: manifold}`` for every parameter, ``geoopt.Euclidean()`` where
        the update leaves it Euclidean.

    Raises
    ------
    ValueError
        an unknown update, or what :func:`plan` and
        :func:`~manifold_nets.convert.refuse_conv1d` refuse. The weights' values are not
        checked: a zero filter, which ``declare(..., "un")`` refuses, gets its Table 1
        manifold here.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.roles import table1_manifolds
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
    ...                           torch.nn.Linear(4, 2))
    >>> sorted(type(m).__name__ for m in table1_manifolds(net, "un").values())
    ['Euclidean', 'Euclidean', 'Euclidean', 'ObliqueManifold']
    """
    check_update(update)
    if update != "bsgd":
        refuse_conv1d(model, f"declare(..., {update!r})")
    name, how = find_classifier(model, classifier)
    rows = plan(model, update, name, how)
    out = {}
    for key, _ in model.named_parameters():
        manifold = rows.get(key, (None,))[0]
        out[key] = geoopt.Euclidean() if manifold is None else manifold
    return out

