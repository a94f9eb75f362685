r"""Table 1 of the paper, in one place: which manifold each update gives each role.

==========  ==========================================  ==========================================
update      filters (a weight's rows, :math:`W_l`)      classifier (:math:`\theta`)
==========  ==========================================  ==========================================
``bsgd``    Euclidean                                   Euclidean
``sm``      ``DiagScaledEuclidean("left")``, eq. (7)    ``DiagScaledEuclidean("right")``, eq. (8)
``un``      ``ObliqueManifold()``, eq. (9)              Euclidean
==========  ==========================================  ==========================================

:func:`~manifold_nets.declare` puts a model's weights on these manifolds,
:func:`manifold_for` builds them for a weight's number of dims, :func:`update_of` reads
the update back from a manifold, :func:`check_update` refuses any other name and
:data:`NAMES` gives the paper's names for tables, and :data:`KERNEL_KINDS` numbers the
manifolds for the fused CPU kernel (:mod:`manifold_nets.fused`), keyed by
:class:`~manifold_nets.optim.Kind` name and side. Every other module reads the table from
here: an update is one of the names of :data:`UPDATES` from the command line to the
kernel, checked where it enters (:func:`check_update`, the configurations, the CLI's
choices).
"""

from __future__ import annotations

import geoopt

from .manifolds import DiagScaledEuclidean, ObliqueManifold

__all__ = ["UPDATES", "NAMES", "ROLES", "KERNEL_KINDS", "check_update", "manifold_for",
           "update_of"]

#: The updates of Table 1: B-SGD (plain SGD), SM (the scaled metric, eqs. (7)-(8)) and UN
#: (unit-norm filters, eq. (9)).
UPDATES = ("bsgd", "sm", "un")

#: How tables and figures name each update: the paper's names.
NAMES = {"bsgd": "B-SGD", "sm": "SM", "un": "UN"}

#: The roles a weight plays in Table 1: a bank of filters (its rows), or the classifier.
ROLES = ("filters", "classifier")

#: The fused kernel's numbers for the manifolds it steps, by
#: :class:`~manifold_nets.optim.Kind` name and side. Euclidean parameters keep torch's
#: SGD arithmetic (``InvariantSGD`` is ``torch.optim.SGD`` on them, bit for bit), so the
#: kernel's Euclidean branch (kind 0) is not used.
KERNEL_KINDS = {("oblique", "left"): 1, ("sm", "left"): 2, ("sm", "right"): 3}


def manifold_for(update: str, role: str, weight_dim: int) -> geoopt.Manifold | None:
    """The manifold of Table 1 for a weight of ``weight_dim`` dims (``None``: Euclidean).

    A filter is one row with its trailing dims (``ndim = weight_dim - 1``); the
    classifier's right metric acts on whole columns (``ndim = weight_dim``).

    Parameters
    ----------
    update : {"bsgd", "sm", "un"}
        The update.
    role : {"filters", "classifier"}
        What the weight is.
    weight_dim : int
        Its number of dims (2 for ``Linear``, 4 for ``Conv2d``).

    Returns
    -------
    geoopt.Manifold or None
        The manifold, or ``None`` where Table 1 keeps the weight Euclidean.

    Raises
    ------
    ValueError
        For an unknown update or role, or a weight of fewer than 2 dims.

    Examples
    --------
    >>> from manifold_nets.table1 import manifold_for
    >>> print(manifold_for("un", "filters", 4), manifold_for("un", "classifier", 2))
    Oblique(ndim=3) manifold None
    >>> print(manifold_for("sm", "classifier", 2))
    DiagScaledEuclidean(side='right', ndim=2) manifold
    """
    check_update(update)
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if weight_dim < 2:
        raise ValueError(f"Table 1 is for weights of 2 or more dims, got {weight_dim}")
    if update == "sm":
        return (DiagScaledEuclidean("left", ndim=weight_dim - 1) if role == "filters" else
                DiagScaledEuclidean("right", ndim=weight_dim))
    if update == "un" and role == "filters":
        return ObliqueManifold(ndim=weight_dim - 1)
    return None


def update_of(manifold: geoopt.Manifold | None) -> str:
    """The update whose Table 1 gives ``manifold``: ``"un"``, ``"sm"`` or ``"bsgd"``.

    Parameters
    ----------
    manifold : geoopt.Manifold or None
        A weight's manifold (``None`` or :class:`geoopt.Euclidean`: Euclidean).

    Returns
    -------
    str
        ``"un"`` for an :class:`~manifold_nets.ObliqueManifold`, ``"sm"`` for a
        :class:`~manifold_nets.DiagScaledEuclidean`, ``"bsgd"`` otherwise.

    Examples
    --------
    >>> from manifold_nets import ObliqueManifold
    >>> from manifold_nets.table1 import update_of
    >>> update_of(ObliqueManifold()), update_of(None)
    ('un', 'bsgd')
    """
    if isinstance(manifold, ObliqueManifold):
        return "un"
    if isinstance(manifold, DiagScaledEuclidean):
        return "sm"
    return "bsgd"


def check_update(update: str) -> str:
    """``update`` if it is one of :data:`UPDATES`.

    Parameters
    ----------
    update : str
        the name of an update

    Returns
    -------
    str
        ``update``

    Raises
    ------
    ValueError
        an update that is not in Table 1, with the ones that are

    Examples
    --------
    >>> from manifold_nets.table1 import check_update
    >>> check_update("un")
    'un'
    >>> check_update("UN")
    Traceback (most recent call last):
    ...
    ValueError: unknown update 'UN'; choose one of bsgd, sm, un
    """
    if update not in UPDATES:
        raise ValueError(f"unknown update {update!r}; choose one of {', '.join(UPDATES)}")
    return update
