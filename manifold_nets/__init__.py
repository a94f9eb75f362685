"""manifold-nets: symmetry-invariant optimisation of deep networks on PyTorch and geoopt.

The two geometries of Badrinarayanan, Mishra and Cipolla (2016) as geoopt manifolds:

- :class:`~manifold_nets.ObliqueManifold`: unit-norm filters (the UN update, eq. (9));
- :class:`~manifold_nets.DiagScaledEuclidean`: the scaled metric (the SM update,
  eqs. (7)-(8)).

Declare a model's weights with :func:`~manifold_nets.declare` (which returns a
:class:`~manifold_nets.Declaration`) and train them with
:class:`~manifold_nets.InvariantSGD`, :class:`~manifold_nets.InvariantAdam` or
:class:`geoopt.optim.RiemannianSGD`. The paper's
networks are :class:`~manifold_nets.Arch1` and :class:`~manifold_nets.Arch2` (configured by
:class:`~manifold_nets.NetConfig`); SegNet is in :mod:`manifold_nets.nets`. The formulas
are plain functions in :mod:`manifold_nets.math`; :mod:`manifold_nets.symmetry` finds and
measures rescaling symmetries, :mod:`manifold_nets.testing` turns them into property tests,
and :mod:`manifold_nets.distributed` keeps the manifolds through FSDP2 sharding.

The paper's experiments live apart, in :mod:`manifold_nets.experiments`, which imports the
library and is never imported by it; ``import manifold_nets`` loads none of it (import
``train`` from :mod:`manifold_nets.experiments.engines`, the data from
:mod:`manifold_nets.experiments.data`).

Examples
--------
>>> import torch
>>> import manifold_nets as mn
>>> net = mn.Arch2(depth=2, width=8, in_features=12, num_classes=3)
>>> _ = mn.declare(net, "un")
>>> opt = mn.InvariantSGD(net.parameters(), lr=0.1, momentum=0.9)
>>> torch.nn.functional.cross_entropy(net(torch.randn(16, 12)), torch.randint(3, (16,))).backward()
>>> opt.step()
>>> torch.allclose(net.layers[0].linear.weight.detach().norm(dim=1), torch.ones(8))
True
"""

import warnings

# geoopt 0.5 decorates its helpers with torch.jit.script, which torch deprecates since
# 2.10: importing it emits dozens of DeprecationWarnings (an error under
# ``-W error::DeprecationWarning``). They are geoopt's, not the user's, so they are
# silenced for this one import; every other warning filter is left as it was.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script(_method)?` is deprecated",
                            category=DeprecationWarning)
    import geoopt  # noqa: F401

from .adam import InvariantAdam
from .declare import Declaration, declare
from .manifolds import DiagScaledEuclidean, ObliqueManifold
from .nets import Arch1, Arch2, NetConfig
from .optim import InvariantSGD

__version__ = "0.1.0"

__all__ = [
    "ObliqueManifold",
    "DiagScaledEuclidean",
    "Arch1",
    "Arch2",
    "NetConfig",
    "declare",
    "Declaration",
    "InvariantSGD",
    "InvariantAdam",
    "__version__",
]
