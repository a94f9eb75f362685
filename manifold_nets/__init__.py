"""manifold-nets: symmetry-invariant optimisation of deep networks on PyTorch and geoopt.

The two geometries of Badrinarayanan, Mishra and Cipolla (2016) as geoopt manifolds:

- :class:`ObliqueManifold`: unit-norm filters (the UN update, eq. (9));
- :class:`DiagScaledEuclidean`: the scaled metric (the SM update, eqs. (7)-(8)).

Declare a model's weights with :func:`declare` and train them with
:class:`InvariantSGD` or ``geoopt.optim.RiemannianSGD``. :mod:`manifold_nets.symmetry`
finds and measures rescaling symmetries. The paper's experiments live apart, in
:mod:`manifold_nets.experiments`, which imports the library and is never imported by it;
``import manifold_nets`` loads none of it. The experiment names that used to live here
(``train``, ``load_dataset``, ``TrainConfig``, ...) are still reachable as attributes,
and importing them loads the experiments on first use.
"""

import importlib

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
    "__version__",
]

#: Experiment names reachable from the top level, loaded on first use.
_EXPERIMENTS = {
    "Dataset": "data",
    "load_dataset": "data",
    "TrainConfig": "config",
    "BoldDriver": "config",
    "ExpDecay": "config",
    "StoppingRule": "config",
    "train": "engines",
}


def __getattr__(name: str):
    if name in _EXPERIMENTS:
        module = importlib.import_module(f".experiments.{_EXPERIMENTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
