"""manifold-nets: symmetry-invariant optimisation of deep networks on PyTorch and geoopt.

The two geometries of Badrinarayanan, Mishra and Cipolla (2016) as geoopt manifolds:

- :class:`ObliqueManifold`: unit-norm filters (the UN update, eq. (9));
- :class:`DiagScaledEuclidean`: the scaled metric (the SM update, eqs. (7)-(8)).

Declare a weight as ``geoopt.ManifoldParameter(w, manifold=...)`` and train it with
``geoopt.optim.RiemannianSGD``.
"""

from .data import Dataset, load_dataset
from .declare import Declaration, declare
from .manifolds import DiagScaledEuclidean, ObliqueManifold
from .nets import Arch1, Arch2, NetConfig
from .optim import InvariantSGD
from .training import BoldDriver, ExpDecay, StoppingRule, TrainConfig, train

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
    "load_dataset",
    "Dataset",
    "TrainConfig",
    "train",
    "BoldDriver",
    "ExpDecay",
    "StoppingRule",
    "__version__",
]
