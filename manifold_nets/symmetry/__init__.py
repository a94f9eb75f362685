r"""Rescaling symmetries of a network, and whether an update respects them (Sections 2-3).

One module per concept:

- :mod:`~manifold_nets.symmetry.groups`: rescalings and their groups, the paper's
  reparameterisations (eqs. (1)-(3)) as
  :class:`~manifold_nets.symmetry.groups.RescalingGroup` objects;
- :mod:`~manifold_nets.symmetry.invariance`: loss and update invariance, measured
  (:func:`~manifold_nets.symmetry.invariance.loss_invariance`,
  :func:`~manifold_nets.symmetry.invariance.update_invariance`,
  :func:`~manifold_nets.symmetry.invariance.orbit_orthogonality`) and predicted from
  theory (:func:`~manifold_nets.symmetry.invariance.predict`);
- :mod:`~manifold_nets.symmetry.discover`: the rescaling symmetries of any model, found
  numerically (:func:`~manifold_nets.symmetry.discover.discover`), with
  :mod:`~manifold_nets.symmetry.structure` deriving them from the traced graph;
- :mod:`~manifold_nets.symmetry.audit`: every update rule against every group, prediction
  beside measurement (:func:`~manifold_nets.symmetry.audit.audit`).

Every public name is available from this package:

>>> import torch
>>> from manifold_nets.symmetry import discover
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
>>> discover(net, torch.randn(64, 4)).dim  # one scaling per hidden unit
8
"""

from .audit import AuditRow, audit, audit_rows, format_audit
from .discover import Discovery, discover
from .groups import (
    Rescaling,
    RescalingGroup,
    ScalingSpace,
    arch1_full_group,
    arch1_paper_group,
    arch2_group,
    rescale_weight,
    scaling_tangent,
)
from .invariance import (
    TOLERANCES,
    UPDATE_RULES,
    UpdateRule,
    loss_invariance,
    orbit_orthogonality,
    predict,
    summed_cross_entropy,
    update_invariance,
)
from .structure import Family

__all__ = [
    "ScalingSpace",
    "Rescaling",
    "RescalingGroup",
    "arch1_paper_group",
    "arch1_full_group",
    "arch2_group",
    "rescale_weight",
    "scaling_tangent",
    "TOLERANCES",
    "summed_cross_entropy",
    "loss_invariance",
    "update_invariance",
    "orbit_orthogonality",
    "predict",
    "UpdateRule",
    "UPDATE_RULES",
    "Discovery",
    "Family",
    "discover",
    "AuditRow",
    "audit",
    "audit_rows",
    "format_audit",
]
