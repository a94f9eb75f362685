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

from .data import (
    ARCHIVE_URL,
    CLASSES,
    COLORS,
    FULL_SIZE,
    PUBLISHED_WEIGHTS,
    SEGNET_BASIC,
    SEGNET_PAPER,
    SHA256SUMS_SHA256,
    SPLITS,
    VOID,
    CamVid,
    class_weights,
    download_camvid,
    find_camvid,
    load_camvid,
    median_frequency_weights,
    verify_camvid,
)
from .protocol import format_metrics, selection_scores, train_update
from .report import (
    build_report,
    colorize,
    plot_curves,
    plot_predictions,
    report_tables,
    weights_table,
)
from .training import (
    OPTIMIZERS,
    CamVidConfig,
    bn_statistics,
    build_model,
    evaluate,
    pixel_errors,
    predict,
    seg_loss,
    train,
)
from .weights import load_weights, save_weights

__all__ = [
    "ARCHIVE_URL",
    "CLASSES",
    "COLORS",
    "FULL_SIZE",
    "PUBLISHED_WEIGHTS",
    "SEGNET_BASIC",
    "SEGNET_PAPER",
    "SHA256SUMS_SHA256",
    "SPLITS",
    "VOID",
    "CamVid",
    "class_weights",
    "download_camvid",
    "find_camvid",
    "load_camvid",
    "median_frequency_weights",
    "verify_camvid",
    "build_report",
    "colorize",
    "plot_curves",
    "plot_predictions",
    "report_tables",
    "weights_table",
    "OPTIMIZERS",
    "CamVidConfig",
    "bn_statistics",
    "build_model",
    "evaluate",
    "pixel_errors",
    "predict",
    "seg_loss",
    "train",
    "format_metrics",
    "selection_scores",
    "train_update",
    "load_weights",
    "save_weights",
]
