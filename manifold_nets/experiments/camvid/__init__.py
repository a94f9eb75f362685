r"""CamVid and SegNet-Basic: the paper's Section 6 on the real data.

One module per concern, each name also available from this package:

- :mod:`~manifold_nets.experiments.camvid.data`: CamVid as the SegNet authors distribute
  it, found, verified (SHA-256 of every PNG), downloaded and loaded; the class weights;
- :mod:`~manifold_nets.experiments.camvid.training`: the run's configuration
  (:class:`~manifold_nets.experiments.camvid.training.CamVidConfig`), the loss, training
  and evaluation;
- :mod:`~manifold_nets.experiments.camvid.weights`: weights files of trained runs;
- :mod:`~manifold_nets.experiments.camvid.protocol`: the protocol of one update (the rate
  selected on the validation images, every seed trained and tested), resumable;
- :mod:`~manifold_nets.experiments.camvid.report`: tables and figures of the runs.

``manifold-nets camvid train | evaluate | report`` runs them.

>>> from manifold_nets.experiments.camvid import CLASSES, CamVidConfig
>>> len(CLASSES), CamVidConfig().size
(11, (180, 240))
"""

from . import data, protocol, report, training, weights
from .data import *  # noqa: F403
from .protocol import *  # noqa: F403
from .report import *  # noqa: F403
from .training import *  # noqa: F403
from .weights import *  # noqa: F403

__all__ = [*data.__all__, *training.__all__, *weights.__all__, *protocol.__all__,
           *report.__all__]
