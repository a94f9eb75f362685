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
  :mod:`~manifold_nets.symmetry.structure` deriving them from the traced graph.

The package sits below :func:`manifold_nets.declare`, which reads its analysis: it
predicts from an update's name (:func:`~manifold_nets.symmetry.invariance.predict`) and
measures with any optimiser factory, and never declares a model itself. The audit of
update rules against groups, which declares, is :mod:`manifold_nets.audit`.

The names most code needs are available from this package (the building blocks, such as
:class:`~manifold_nets.symmetry.groups.ScalingSpace`, from their modules):

>>> import torch
>>> from manifold_nets.symmetry import discover
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
>>> discover(net, torch.randn(64, 4)).dim  # one scaling per hidden unit
8
"""

from .discover import Discovery, discover
from .groups import (
    Rescaling,
    RescalingGroup,
    arch1_full_group,
    arch1_paper_group,
    arch1_untied_pair_group,
    arch2_group,
    rescale_weight,
)
from .invariance import (
    loss_invariance,
    orbit_orthogonality,
    predict,
    summed_cross_entropy,
    update_invariance,
)
from .structure import Family

__all__ = [
    "Rescaling",
    "RescalingGroup",
    "arch1_paper_group",
    "arch1_full_group",
    "arch1_untied_pair_group",
    "arch2_group",
    "rescale_weight",
    "summed_cross_entropy",
    "loss_invariance",
    "update_invariance",
    "orbit_orthogonality",
    "predict",
    "Discovery",
    "Family",
    "discover",
]
