r"""SegNet on a segmentation task built from real MNIST digits (the paper's Section 6).

CamVid cannot be had here, so the capability the paper shows (conv filters on the oblique
manifold, a SegNet trained with UN against B-SGD) is shown on **MNIST canvases**:

- a canvas is a ``size x size`` black image holding ``digits_per_canvas`` real MNIST digits,
  each cropped to its ink bounding box and pasted (pixel-wise maximum) at a random position
  where its box covers at most ``max_overlap`` of the area of any box already placed, or
  of its own (a placement that fails 100 times is dropped);
- a pixel's label is the class ``0 .. 9`` of the brightest digit there where that
  intensity is at least ``ink_threshold``, and :data:`BACKGROUND` (``10``) elsewhere: 11
  classes;
- the MNIST training digits are split once (``data_seed``) into a training pool and a
  validation pool of ``val_digits``; training canvases use only the training pool,
  validation canvases only the validation pool, test canvases only the MNIST *test* digits.

Everything is drawn from :class:`numpy.random.Generator` streams seeded by ``data_seed``
(the data, fixed across runs) and ``seed`` (initial weights and batch order), so a
configuration gives the same numbers every time on a CPU.

Training (:func:`fit`) is SGD through :class:`~manifold_nets.InvariantSGD` (momentum
``SegConfig.momentum``: 0.9, SegNet's, by default; 0 is the paper's plain SGD) after
:func:`manifold_nets.declare.declare`, i.e. the updates of Table 1 with every
``Conv2d`` filter ``weight[o]`` as one filter and the 1x1 classifier as :math:`\theta`:

.. math::

    \begin{aligned}
    &\textbf{for } e = 0, 1, \dots, E-1 \textbf{ do} \\
    &\quad \eta_e = \eta_0 \gamma^e \quad \text{(exponential decay, the paper's 0.95)} \\
    &\quad \textbf{for each } \text{mini-batch } B \text{ of a fresh permutation}
        \textbf{ do} \\
    &\quad\quad L_B = \textstyle\sum_{n \in B} \frac{1}{HW} \sum_{p}
        \mathrm{CE}(f(x_n)_p, y_{n,p})
        \quad \text{(per-image mean, summed over the batch)} \\
    &\quad\quad \text{one InvariantSGD step on } L_B \text{ with rate } \eta_e
    \end{aligned}

Metrics (:func:`segmentation_metrics`), those of the SegNet paper, from the confusion
matrix :math:`C` (rows: truth, columns: prediction) over every test pixel:
global accuracy :math:`\sum_k C_{kk} / \sum C`, class-average accuracy
:math:`\frac{1}{K}\sum_k C_{kk} / \sum_j C_{kj}` and mean intersection over union
:math:`\frac{1}{K}\sum_k C_{kk} / (\sum_j C_{kj} + \sum_j C_{jk} - C_{kk})`, averaging over
the classes present in the ground truth.

Symmetry (:func:`symmetry_report`): every conv of :class:`~manifold_nets.nets.SegNet` but
the classifier is followed by batch norm, so (the conv form of Arch2's eq. (3))

.. math:: W_l \to A_l W_l, \quad A_l = \mathrm{Diag}(\alpha_{l,1}, \dots) > 0

acting on the output filters leaves the loss unchanged (up to the batch-norm ``eps``).
SM is equivariant and UN is invariant under it; Euclidean SGD (B-SGD) is not, which is the
negative control. This check is specific to SegNet; :func:`manifold_nets.symmetry.discover`
finds the same group on it numerically, one generator per filter before a batch norm.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import geoopt
import numpy as np
import torch
import torch.nn.functional as F

from ..declare import UPDATES, declare
from ..nets import SegNet, SegNetConfig
from ..symmetry import Rescaling, ScalingSpace
from .io import atomic_write
from .report import mean_std

__all__ = [
    "BACKGROUND",
    "NUM_CLASSES",
    "CanvasConfig",
    "CanvasSet",
    "SegConfig",
    "SymmetryReport",
    "confusion_matrix",
    "evaluate",
    "filter_scaling",
    "fit",
    "pixel_errors",
    "load_mnist_digits",
    "make_canvases",
    "make_splits",
    "median_frequency_weights",
    "segment",
    "segmentation_metrics",
    "symmetry_report",
    "train",
]

#: Label of the background pixels; digits are ``0 .. 9``.
#:
#: Examples
#: --------
#: >>> from manifold_nets.experiments.segmentation import BACKGROUND
#: >>> BACKGROUND
#: 10
BACKGROUND = 10
#: Per-pixel classes: ten digits and the background.
#:
#: Examples
#: --------
#: >>> from manifold_nets.experiments.segmentation import BACKGROUND, NUM_CLASSES
#: >>> NUM_CLASSES == BACKGROUND + 1
#: True
NUM_CLASSES = 11

# --------------------------------------------------------------------------------------
# Data: MNIST digits on canvases.


def load_mnist_digits(data_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The MNIST digits as ``uint8`` arrays: ``{"train_x": (60000, 28, 28), "train_y",
    "test_x": (10000, 28, 28), "test_y"}``, read with :func:`~.data.load_dataset` (local
    mirror ``MANIFOLD_NETS_MIRROR`` first; see :mod:`manifold_nets.experiments.data`).

    Parameters
    ----------
    data_dir : path, optional
        A folder holding the MNIST IDX files; missing files are downloaded (with their
        checksums verified).

    Returns
    -------
    dict of str to numpy.ndarray
        ``train_x`` ``(60000, 28, 28)`` and ``test_x`` ``(10000, 28, 28)`` ``uint8``
        images, ``train_y`` and ``test_y`` ``int64`` labels.

    Raises
    ------
    manifold_nets.experiments.data.DataError
        If MNIST cannot be found or downloaded.

    Examples
    --------
    It needs the MNIST files (or a download), which a docs build does not have, so this
    example is not run:

    >>> digits = load_mnist_digits()  # doctest: +SKIP
    >>> digits["train_x"].shape, digits["train_x"].dtype, digits["test_y"][:3]  # doctest: +SKIP
    ((60000, 28, 28), dtype('uint8'), array([7, 2, 1]))
    """
    from .data import load_dataset

    ds = load_dataset("mnist", data_dir)

    def u8(x: torch.Tensor) -> np.ndarray:
        return np.rint(x.numpy().reshape(-1, 28, 28) * 255.0).astype(np.uint8)

    return {"train_x": u8(ds.x_train), "train_y": ds.y_train.numpy(),
            "test_x": u8(ds.x_test), "test_y": ds.y_test.numpy()}


@dataclass(frozen=True)
class CanvasConfig:
    """How canvases are made (one :class:`CanvasSet` per split).

    Attributes
    ----------
    size : int
        canvas height and width in pixels (divisible by ``2 ** len(widths)`` of the net)
    digits_per_canvas : int
        digits pasted on each canvas (fewer if a non-overlapping spot is not found)
    ink_threshold : float
        a digit pixel of intensity ``>= ink_threshold`` (in ``[0, 1]``) gets its class
    max_overlap : float
        largest fraction of a digit's ink box (or of an earlier box) that the two boxes may
        share; ``0`` means disjoint boxes
    train, val, test : int
        canvases per split
    val_digits : int
        MNIST training digits held out for the validation canvases
    data_seed : int
        seeds the pool split and the canvases (fixed across runs)

    Parameters
    ----------
    size, digits_per_canvas, ink_threshold, max_overlap, train, val, test, val_digits, \
data_seed
        The attributes above.

    Raises
    ------
    ValueError
        If a count is not a positive integer, ``size < 28``, ``max_overlap`` is not in
        ``[0, 1)``, ``ink_threshold`` not in ``(0, 1]``, or ``val_digits`` leaves no
        training digits.

    Examples
    --------
    >>> from manifold_nets.experiments.segmentation import CanvasConfig
    >>> c = CanvasConfig(train=100)
    >>> c.size, c.digits_per_canvas, c.train, c.val, c.test
    (32, 2, 100, 300, 500)
    >>> CanvasConfig(size=16)
    Traceback (most recent call last):
    ...
    ValueError: CanvasConfig.size must be >= 28 to hold a digit, got 16
    """

    size: int = 32
    digits_per_canvas: int = 2
    ink_threshold: float = 0.5
    max_overlap: float = 0.3
    train: int = 3000
    val: int = 300
    test: int = 500
    val_digits: int = 10000
    data_seed: int = 0

    def __post_init__(self):
        for name in ("size", "digits_per_canvas", "train", "val", "test", "val_digits"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CanvasConfig.{name} must be a positive integer, got {value!r}")
        if self.size < 28:
            raise ValueError(f"CanvasConfig.size must be >= 28 to hold a digit, got {self.size}")
        if not 0.0 <= self.max_overlap < 1.0:
            raise ValueError(f"max_overlap must be in [0, 1), got {self.max_overlap!r}")
        if not 0.0 < self.ink_threshold <= 1.0:
            raise ValueError(f"ink_threshold must be in (0, 1], got {self.ink_threshold!r}")
        if self.val_digits >= 60000:
            raise ValueError(f"val_digits must leave training digits (< 60000), got "
                             f"{self.val_digits}")


@dataclass
class CanvasSet:
    """A split of canvases in memory.

    Attributes
    ----------
    images : torch.Tensor
        ``(N, 1, size, size)`` float32 in ``[0, 1]``
    labels : torch.Tensor
        ``(N, size, size)`` int64 in ``0 .. 10``
    digits : np.ndarray
        ``(N, digits_per_canvas)`` index of every pasted digit in its MNIST file
        (``-1``: dropped), for provenance
    source : str
        ``"train"`` or ``"test"``: the MNIST file the digits come from

    Parameters
    ----------
    images, labels, digits, source
        The attributes above.

    Examples
    --------
    >>> import numpy as np
    >>> from manifold_nets.experiments.segmentation import BACKGROUND, CanvasSet
    >>> s = CanvasSet(torch.zeros(3, 1, 32, 32), torch.full((3, 32, 32), BACKGROUND),
    ...               np.full((3, 2), -1), "train")
    >>> len(s), tuple(s.labels.shape)
    (3, (3, 32, 32))
    """

    images: torch.Tensor
    labels: torch.Tensor
    digits: np.ndarray
    source: str

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _ink_box(digit: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(digit.any(axis=1))
    cols = np.flatnonzero(digit.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _shared(top: int, left: int, h: int, w: int, box: tuple[int, int, int, int]) -> int:
    """Area shared by the box ``(top, left, h, w)`` and ``box = (r0, r1, c0, c1)``."""
    rows = min(top + h, box[1]) - max(top, box[0])
    cols = min(left + w, box[3]) - max(left, box[2])
    return max(rows, 0) * max(cols, 0)


def make_canvases(x: np.ndarray, y: np.ndarray, pool: np.ndarray, n: int,
                  config: CanvasConfig, rng: np.random.Generator, source: str) -> CanvasSet:
    """Draw ``n`` canvases from the digits ``x[pool]`` (``uint8``, ``(N, 28, 28)``).

    Each canvas draws ``digits_per_canvas`` digits from ``pool`` without replacement and
    pastes each, cropped to its ink box, with a pixel-wise maximum at a uniformly random
    spot whose box shares at most ``max_overlap`` of its own area, and of every earlier
    box's, with the earlier boxes (100 tries, then the digit is dropped). Where inked
    digits overlap, the brighter one gives the label.

    Parameters
    ----------
    x : numpy.ndarray
        ``(N, 28, 28)`` ``uint8`` digits.
    y : numpy.ndarray
        ``(N,)`` their classes.
    pool : numpy.ndarray
        The indices of ``x`` to draw from (at least ``digits_per_canvas`` of them).
    n : int
        Canvases to draw.
    config : CanvasConfig
        Size, digits per canvas, ink threshold and overlap.
    rng : numpy.random.Generator
        The source of the digits and their spots.
    source : str
        Stored in the result (``"train"`` or ``"test"``).

    Returns
    -------
    CanvasSet
        ``n`` canvases, their labels and the digits used.

    Examples
    --------
    >>> from manifold_nets.experiments.segmentation import (BACKGROUND, CanvasConfig,
    ...                                                     make_canvases)
    >>> import numpy as np
    >>> x = np.zeros((30, 28, 28), np.uint8)
    >>> x[:, 8:20, 10:18] = 255  # a 12 x 8 block of ink stands in for a digit
    >>> digits = {"train_x": x[:20], "train_y": np.arange(20) % 10,
    ...           "test_x": x[20:], "test_y": np.arange(10)}
    >>> rng = np.random.default_rng(0)
    >>> s = make_canvases(digits["train_x"], digits["train_y"], np.arange(20), 5,
    ...                   CanvasConfig(), rng, "train")
    >>> tuple(s.images.shape), tuple(s.labels.shape), s.digits.shape
    ((5, 1, 32, 32), (5, 32, 32), (5, 2))
    >>> labelled = s.labels != BACKGROUND  # every pasted digit inks 12 x 8 pixels
    >>> bool((labelled.sum((1, 2)) >= 96).all()), bool((s.images[:, 0][labelled] == 1).all())
    (True, True)
    """
    s, k = config.size, config.digits_per_canvas
    thresh = int(np.ceil(config.ink_threshold * 255))
    images = np.zeros((n, s, s), np.uint8)
    labels = np.full((n, s, s), BACKGROUND, np.int64)
    used = np.full((n, k), -1, np.int64)
    for i in range(n):
        boxes: list[tuple[int, int, int, int]] = []
        for j, d in enumerate(rng.choice(pool, size=k, replace=False)):
            r0, r1, c0, c1 = _ink_box(x[d])
            h, w = r1 - r0, c1 - c0
            for _ in range(100):
                top, left = int(rng.integers(0, s - h + 1)), int(rng.integers(0, s - w + 1))
                if all(_shared(top, left, h, w, b) <= config.max_overlap
                       * min(h * w, (b[1] - b[0]) * (b[3] - b[2])) for b in boxes):
                    break
            else:
                continue
            boxes.append((top, top + h, left, left + w))
            patch = x[d, r0:r1, c0:c1]
            region = images[i, top:top + h, left:left + w]
            mine = (patch >= thresh) & (patch >= region)
            labels[i, top:top + h, left:left + w][mine] = int(y[d])
            np.maximum(region, patch, out=region)
            used[i, j] = d
    return CanvasSet(torch.from_numpy(images).float().div_(255.0).unsqueeze(1),
                     torch.from_numpy(labels), used, source)


def make_splits(config: CanvasConfig, digits: dict[str, np.ndarray] | None = None
                ) -> dict[str, CanvasSet]:
    """The ``train``, ``val`` and ``test`` canvases of ``config``, and the digit pools.

    Returns ``{"train", "val", "test": CanvasSet, "pools": {"train", "val", "test":
    indices}}``; the pools are disjoint: ``train`` and ``val`` index the MNIST training
    file, ``test`` the test file.

    Parameters
    ----------
    config : CanvasConfig
        The canvases.
    digits : dict, optional
        Digits as :func:`load_mnist_digits` returns them (read from MNIST if not given).

    Returns
    -------
    dict
        The three :class:`CanvasSet` and the three pools (sorted index arrays).

    Examples
    --------
    Tiny stand-ins for MNIST's digits, so that the example needs no data:

    >>> from manifold_nets.experiments.segmentation import CanvasConfig, make_splits
    >>> import numpy as np
    >>> x = np.zeros((30, 28, 28), np.uint8)
    >>> x[:, 8:20, 10:18] = 255  # a 12 x 8 block of ink stands in for a digit
    >>> digits = {"train_x": x[:20], "train_y": np.arange(20) % 10,
    ...           "test_x": x[20:], "test_y": np.arange(10)}
    >>> canvases = CanvasConfig(train=8, val=4, test=4, val_digits=5)
    >>> splits = make_splits(canvases, digits)
    >>> [len(splits[k]) for k in ("train", "val", "test")]
    [8, 4, 4]
    >>> pools = splits["pools"]
    >>> len(pools["val"]), len(pools["train"]), set(pools["val"]) & set(pools["train"])
    (5, 15, set())
    >>> set(splits["val"].digits.ravel()) <= set(pools["val"]) | {-1}
    True
    """
    digits = load_mnist_digits() if digits is None else digits
    seq = np.random.SeedSequence(config.data_seed)
    split_rng, train_rng, val_rng, test_rng = (np.random.default_rng(s) for s in seq.spawn(4))
    perm = split_rng.permutation(len(digits["train_x"]))
    pools = {"train": np.sort(perm[config.val_digits:]), "val": np.sort(perm[:config.val_digits]),
             "test": np.arange(len(digits["test_x"]))}
    tx, ty, vx, vy = digits["train_x"], digits["train_y"], digits["test_x"], digits["test_y"]
    return {
        "train": make_canvases(tx, ty, pools["train"], config.train, config, train_rng, "train"),
        "val": make_canvases(tx, ty, pools["val"], config.val, config, val_rng, "train"),
        "test": make_canvases(vx, vy, pools["test"], config.test, config, test_rng, "test"),
        "pools": pools,
    }


# --------------------------------------------------------------------------------------
# Metrics.


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor,
                     num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """``C[k, j]``: pixels of true class ``k`` predicted as ``j`` (int64).

    Parameters
    ----------
    pred, target : torch.Tensor
        Predicted and true classes, of one shape (any), ``int64`` in
        ``0 .. num_classes - 1``.
    num_classes : int, optional
        :math:`K` (default :data:`NUM_CLASSES`).

    Returns
    -------
    torch.Tensor
        ``(K, K)`` counts; rows: truth, columns: prediction.

    Examples
    --------
    >>> from manifold_nets.experiments.segmentation import confusion_matrix
    >>> confusion_matrix(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 0, 1, 1]), 2).tolist()
    [[1, 1], [0, 2]]
    """
    idx = target.reshape(-1) * num_classes + pred.reshape(-1)
    return torch.bincount(idx, minlength=num_classes ** 2).view(num_classes, num_classes)


def segmentation_metrics(conf: torch.Tensor) -> dict[str, float]:
    """Global accuracy, class-average accuracy and mean IoU of a confusion matrix.

    Class averages run over the classes present in the ground truth.

    Parameters
    ----------
    conf : torch.Tensor
        A ``(K, K)`` confusion matrix (:func:`confusion_matrix`).

    Returns
    -------
    dict of str to float
        ``global_acc``, ``class_avg_acc`` and ``mean_iou`` (see the module docstring).

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.experiments.segmentation import segmentation_metrics
    >>> m = segmentation_metrics(torch.tensor([[3, 1], [0, 4]]))
    >>> {k: round(v, 4) for k, v in m.items()}
    {'global_acc': 0.875, 'class_avg_acc': 0.875, 'mean_iou': 0.775}
    """
    conf = conf.double()
    tp = conf.diag()
    truth, predicted = conf.sum(1), conf.sum(0)
    present = truth > 0
    return {
        "global_acc": float(tp.sum() / conf.sum()),
        "class_avg_acc": float((tp[present] / truth[present]).mean()),
        "mean_iou": float((tp[present] / (truth + predicted - tp)[present]).mean()),
    }


@torch.no_grad()
def segment(model: torch.nn.Module, images: torch.Tensor, chunk: int = 100) -> torch.Tensor:
    """Per-pixel arg-max class ``(N, H, W)`` in eval mode (running batch-norm statistics).

    The model is put back in the mode it was in.

    Parameters
    ----------
    model : torch.nn.Module
        A segmentation net returning ``(N, K, H, W)`` logits.
    images : torch.Tensor
        ``(N, C, H, W)`` images.
    chunk : int, optional
        Images per forward pass (default 100).

    Returns
    -------
    torch.Tensor
        ``(N, H, W)`` ``int64`` classes.

    Examples
    --------
    >>> from manifold_nets.experiments.segmentation import segment
    >>> from manifold_nets.nets import SegNet
    >>> model = SegNet(widths=(4, 8))
    >>> segment(model, torch.rand(3, 1, 32, 32), chunk=2).shape, model.training
    (torch.Size([3, 32, 32]), True)
    """
    was = model.training
    model.eval()
    try:
        return torch.cat([model(images[i:i + chunk]).argmax(1)
                          for i in range(0, len(images), chunk)])
    finally:
        model.train(was)


def evaluate(model: torch.nn.Module, data: CanvasSet) -> dict[str, float]:
    """:func:`segmentation_metrics` of ``model`` on ``data``.

    Parameters
    ----------
    model : torch.nn.Module
        A segmentation net (evaluated in eval mode, :func:`segment`).
    data : CanvasSet
        The canvases and their labels.

    Returns
    -------
    dict of str to float
        ``global_acc``, ``class_avg_acc`` and ``mean_iou``.

    Examples
    --------
    >>> from manifold_nets.experiments.segmentation import CanvasSet, evaluate
    >>> class Oracle(torch.nn.Module):  # predicts class 3 everywhere, with certainty
    ...     def forward(self, x):
    ...         return torch.nn.functional.one_hot(torch.full(x.shape[:1] + x.shape[2:], 3),
    ...                                            11).permute(0, 3, 1, 2).float()
    >>> data = CanvasSet(torch.rand(2, 1, 4, 4), torch.full((2, 4, 4), 3), None, "test")
    >>> evaluate(Oracle(), data)
    {'global_acc': 1.0, 'class_avg_acc': 1.0, 'mean_iou': 1.0}
    """
    return segmentation_metrics(confusion_matrix(segment(model, data.images), data.labels))


# --------------------------------------------------------------------------------------
# Training.


@dataclass
class SegConfig:
    """Everything that defines a SegNet run; saved, resolved, with its results.

    Attributes
    ----------
    update : {"bsgd", "sm", "un"}
        the update of Table 1
    lr : float
        base rate :math:`\\eta_0` (the loss is a per-image mean, summed over the batch)
    epochs, batch_size, decay, momentum
        the SGD schedule (``lr * decay ** epoch``); ``momentum`` 0 would be the paper's
        plain SGD, 0.9 (the default) is SegNet's
    class_balance : bool
        weight the loss by :func:`median_frequency_weights` of the training labels (as the
        SegNet paper does on CamVid; the default); the metrics are never weighted
    seed : int
        initial weights and batch order
    net : SegNetConfig
        the network
    data : CanvasConfig
        the canvases

    Parameters
    ----------
    update, lr, epochs, batch_size, decay, momentum, class_balance, seed, net, data
        The attributes above; ``net`` and ``data`` may be given as dicts (as
        :meth:`to_dict` writes them).

    Raises
    ------
    ValueError
        On an unknown update, a rate that is not positive, fewer than one epoch or image
        per batch, or a canvas size that the net's pooling does not divide.

    Examples
    --------
    >>> from manifold_nets.experiments.segmentation import SegConfig
    >>> from manifold_nets.nets import SegNetConfig
    >>> c = SegConfig(update="sm", net=SegNetConfig(widths=(4, 8)))
    >>> c.update, c.lr, c.momentum, c.net.widths, c.data.size
    ('sm', 0.03, 0.9, (4, 8), 32)
    >>> SegConfig(**c.to_dict()) == c
    True
    >>> SegConfig(net=SegNetConfig(widths=(4, 8, 16, 32, 64, 128)))
    Traceback (most recent call last):
    ...
    ValueError: canvas size 32 is not divisible by 64 (the net pools 6 times)
    """

    update: str = "un"
    lr: float = 0.03
    epochs: int = 5
    batch_size: int = 10
    decay: float = 0.95
    momentum: float = 0.9
    class_balance: bool = True
    seed: int = 0
    net: SegNetConfig = field(default_factory=SegNetConfig)
    data: CanvasConfig = field(default_factory=CanvasConfig)

    def __post_init__(self):
        if self.update not in UPDATES:
            raise ValueError(f"unknown update {self.update!r}; choose one of {UPDATES}")
        if not self.lr > 0:
            raise ValueError(f"Invalid learning rate: {self.lr}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, "
                             f"{self.batch_size}")
        if isinstance(self.net, dict):
            self.net = SegNetConfig(**self.net)
        if isinstance(self.data, dict):
            self.data = CanvasConfig(**self.data)
        levels = 2 ** len(self.net.widths)
        if self.data.size % levels:
            raise ValueError(f"canvas size {self.data.size} is not divisible by {levels} "
                             f"(the net pools {len(self.net.widths)} times)")

    def to_dict(self) -> dict:
        """The configuration as plain, nested dicts (what a record saves).

        Returns
        -------
        dict
            Every field; ``net`` and ``data`` as dicts. ``SegConfig(**d)`` rebuilds it.

        Examples
        --------
        >>> from manifold_nets.experiments.segmentation import SegConfig
        >>> d = SegConfig().to_dict()
        >>> d["update"], d["net"]["widths"], d["data"]["size"]
        ('un', (16, 32, 64), 32)
        """
        return asdict(self)


def seg_loss(logits: torch.Tensor, labels: torch.Tensor,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel cross-entropy (class-weighted if ``weight``), averaged over each image's
    pixels, summed over the batch."""
    return F.cross_entropy(logits, labels, weight=weight, reduction="sum") / labels[0].numel()


def median_frequency_weights(labels: torch.Tensor,
                             num_classes: int = NUM_CLASSES) -> torch.Tensor:
    r"""SegNet's median frequency balancing: :math:`w_k = \mathrm{median}(f) / f_k`, with
    :math:`f_k` the pixel frequency of class ``k`` in ``labels`` (absent classes get 0).

    The median runs over the classes present.

    Parameters
    ----------
    labels : torch.Tensor
        ``int64`` labels of any shape.
    num_classes : int, optional
        :math:`K` (default :data:`NUM_CLASSES`).

    Returns
    -------
    torch.Tensor
        ``(K,)`` float32 weights.

    Examples
    --------
    >>> from manifold_nets.experiments.segmentation import median_frequency_weights
    >>> labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    >>> median_frequency_weights(labels, 4).tolist()
    [0.6666666865348816, 2.0, 1.0, 0.0]
    """
    freq = torch.bincount(labels.reshape(-1), minlength=num_classes).double()
    freq = freq / freq.sum()
    present = freq > 0
    w = torch.zeros(num_classes, dtype=torch.float64)
    w[present] = freq[present].median() / freq[present]
    return w.float()


def build_segnet(config: SegConfig) -> SegNet:
    """The initial :class:`SegNet` of a run (seeded by ``config.seed``), declared for
    ``config.update``."""
    gen = torch.Generator().manual_seed(config.seed)
    model = SegNet.from_config(config.net, generator=gen)
    declare(model, config.update)
    return model


def pixel_errors(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per canvas, the fraction of misclassified pixels, summed over the batch (the loop
    divides by the number of canvases: the training error is the pixel error rate).

    Parameters
    ----------
    logits : torch.Tensor
        ``(N, K, H, W)`` logits.
    labels : torch.Tensor
        ``(N, H, W)`` classes.

    Returns
    -------
    torch.Tensor
        A float64 scalar: the sum over the ``N`` canvases of their pixel error rates.

    Examples
    --------
    >>> from manifold_nets.experiments.segmentation import pixel_errors
    >>> logits = torch.zeros(2, 3, 2, 2)
    >>> logits[:, 1] = 1.0  # class 1 everywhere
    >>> labels = torch.tensor([[[1, 1], [1, 0]], [[0, 0], [1, 1]]])
    >>> pixel_errors(logits, labels).item()  # 1/4 + 2/4
    0.75
    """
    return (logits.argmax(1) != labels).double().mean(dim=(1, 2)).sum()


def fit(model: torch.nn.Module, config: SegConfig, train_set: CanvasSet,
        val_set: CanvasSet | None = None, log=None) -> list[dict]:
    r"""Train ``model`` (already declared) in place; returns the per-epoch history.

    The epoch loop of the experiments (:func:`~.loop.fit_runs`, one run) with
    :class:`~manifold_nets.InvariantSGD` (momentum ``config.momentum``), the rate
    :math:`\eta_0 \gamma^e` of :class:`~.config.ExpDecay`, ``config.epochs`` epochs and
    the loss ``seg_loss`` (per-pixel cross-entropy, class-weighted by
    :func:`median_frequency_weights` with ``config.class_balance``, averaged over each
    image, summed over the batch). Each epoch's record holds its rate, ``cost`` (the mean
    mini-batch loss), ``train_error`` (pixel error of the epoch's mini-batches) and, with
    ``val_set``, the validation metrics as ``val_*``; a run whose cost is not finite stops
    there, marked ``diverged``.

    Parameters
    ----------
    model : torch.nn.Module
        A SegNet declared with :func:`manifold_nets.declare` for ``config.update``.
    config : SegConfig
        The run's rate, schedule, momentum, batch size, epochs and class balancing.
    train_set : CanvasSet
        The training canvases.
    val_set : CanvasSet, optional
        Canvases evaluated after every epoch.
    log : callable, optional
        Called with one line per epoch.

    Returns
    -------
    list of dict
        One record per epoch.

    Examples
    --------
    >>> from manifold_nets import declare
    >>> from manifold_nets.experiments.segmentation import CanvasConfig, SegConfig, fit, make_splits
    >>> from manifold_nets.nets import SegNet, SegNetConfig
    >>> import numpy as np
    >>> x = np.zeros((30, 28, 28), np.uint8)
    >>> x[:, 8:20, 10:18] = 255  # a 12 x 8 block of ink stands in for a digit
    >>> digits = {"train_x": x[:20], "train_y": np.arange(20) % 10,
    ...           "test_x": x[20:], "test_y": np.arange(10)}
    >>> canvases = CanvasConfig(train=8, val=4, test=4, val_digits=5)
    >>> splits = make_splits(canvases, digits)
    >>> config = SegConfig(epochs=2, batch_size=4, net=SegNetConfig(widths=(4, 8)))
    >>> model = SegNet.from_config(config.net)
    >>> _ = declare(model, "un")
    >>> history = fit(model, config, splits["train"], splits["val"])
    >>> [(h["epoch"], round(h["lr"], 4)) for h in history]
    [(1, 0.03), (2, 0.0285)]
    >>> sorted(k for k in history[-1] if k.startswith("val_"))
    ['val_class_avg_acc', 'val_global_acc', 'val_mean_iou']
    """
    from ..optim import InvariantSGD
    from .config import ExpDecay, StoppingRule
    from .loop import ModuleRuns, Stream, fit_runs

    weight = median_frequency_weights(train_set.labels) if config.class_balance else None
    engine = ModuleRuns(
        model, loss=lambda logits, labels: seg_loss(logits, labels, weight),
        optimizer=InvariantSGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               fused=False),
        errors=pixel_errors)

    def validate(_, ids):
        return {f"val_{k}": [v] for k, v in evaluate(model, val_set).items()}

    def report(_, state) -> None:
        if log is not None:
            row = state.results[0].history[-1]
            log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in row.items()))

    gen = torch.Generator().manual_seed(config.seed + 1)
    result = fit_runs(
        engine, train_set.images, train_set.labels, lr=[config.lr],
        schedules=[ExpDecay(config.decay)],
        stopping=[StoppingRule(config.epochs, config.epochs, enabled=False)],
        streams=[Stream(torch.arange(len(train_set)), gen)], stream_of_run=[0],
        batch_size=config.batch_size, evaluate=validate if val_set is not None else None,
        on_epoch=report)[0]
    if result.diverged:
        result.history[-1]["diverged"] = True
    return result.history


def train(config: SegConfig, splits: dict | None = None, log=None,
          examples: int = 4) -> tuple[dict, SegNet]:
    """One run: build, declare, :func:`fit`, evaluate on validation and test canvases.

    Returns the run's record (config, history, ``val``/``test`` metrics, wall time, and the
    predicted labels of the first ``examples`` test canvases) and the trained model.

    Parameters
    ----------
    config : SegConfig
        The run.
    splits : dict, optional
        :func:`make_splits` of ``config.data`` (made, from MNIST, if not given).
    log : callable, optional
        Called with one line per epoch.
    examples : int, optional
        Test canvases whose predictions the record keeps (default 4).

    Returns
    -------
    (dict, SegNet)
        The record (``config``, ``history``, ``diverged``, ``val``, ``test`` (``None``
        if diverged), ``wall_time_s``, ``torch_threads``, ``examples``) and the model.

    Examples
    --------
    One epoch on tiny stand-in canvases:

    >>> from manifold_nets.experiments.segmentation import (CanvasConfig, SegConfig,
    ...                                                     make_splits, train)
    >>> from manifold_nets.nets import SegNetConfig
    >>> import numpy as np
    >>> x = np.zeros((30, 28, 28), np.uint8)
    >>> x[:, 8:20, 10:18] = 255  # a 12 x 8 block of ink stands in for a digit
    >>> digits = {"train_x": x[:20], "train_y": np.arange(20) % 10,
    ...           "test_x": x[20:], "test_y": np.arange(10)}
    >>> canvases = CanvasConfig(train=8, val=4, test=4, val_digits=5)
    >>> splits = make_splits(canvases, digits)
    >>> config = SegConfig(epochs=1, batch_size=4, net=SegNetConfig(widths=(4, 8)),
    ...                    data=canvases)
    >>> record, model = train(config, splits, examples=2)
    >>> record["diverged"], sorted(record["test"]), len(record["history"])
    (False, ['class_avg_acc', 'global_acc', 'mean_iou'], 1)
    >>> np.array(record["examples"]).shape
    (2, 32, 32)
    """
    splits = make_splits(config.data) if splits is None else splits
    start = time.perf_counter()
    model = build_segnet(config)
    history = fit(model, config, splits["train"], splits["val"], log=log)
    diverged = bool(history[-1].get("diverged", False))
    record = {
        "config": config.to_dict(),
        "history": history,
        "diverged": diverged,
        "val": evaluate(model, splits["val"]) if not diverged else None,
        "test": evaluate(model, splits["test"]) if not diverged else None,
        "wall_time_s": time.perf_counter() - start,
        "torch_threads": torch.get_num_threads(),
        "examples": segment(model, splits["test"].images[:examples]).tolist(),
    }
    return record, model


# --------------------------------------------------------------------------------------
# Symmetry: per-filter positive scalings before batch norm.


def filter_scaling(model: SegNet, generator: torch.Generator, low: float = 0.2,
                   high: float = 5.0, sign: float = 1.0) -> Rescaling:
    r"""Random per-filter factors :math:`\alpha_{l,o}` (log-uniform in ``[low, high]``,
    times ``sign``) for every conv followed by batch norm: a
    :class:`~manifold_nets.symmetry.groups.Rescaling` of :mod:`manifold_nets.symmetry`
    (``sign=-1`` gives the negative control, which is no symmetry).

    Parameters
    ----------
    model : SegNet
        The net; its ``named_filters()`` are scaled.
    generator : torch.Generator
        The source of the factors.
    low, high : float, optional
        The range of the factors (default 0.2 and 5).
    sign : float, optional
        1 (a symmetry) or -1 (the negative control).

    Returns
    -------
    Rescaling
        The group element; ``.apply(model)`` gives the scaled copy.

    Examples
    --------
    >>> from manifold_nets.experiments.segmentation import filter_scaling
    >>> from manifold_nets.nets import SegNet
    >>> model = SegNet(widths=(4, 8), bn_eps=1e-30).double()
    >>> element = filter_scaling(model, torch.Generator().manual_seed(0))
    >>> tuple(element.scales["encoder.1.0.conv.weight"][0].shape)  # one factor per filter
    (8,)
    >>> x = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    >>> torch.allclose(element.apply(model)(x), model(x))  # batch norm in training mode
    True
    """
    scales = {}
    for name, w in model.named_filters():
        u = torch.rand(w.shape[0], generator=generator, dtype=torch.float64)
        a = np.log(low) + u * (np.log(high) - np.log(low))
        scales[name] = (sign * a.exp(), None)
    return Rescaling(ScalingSpace(model), scales, allow_negative=sign < 0,
                     label="per-filter scaling" + (" (negative)" if sign < 0 else ""))


@dataclass
class SymmetryReport:
    """What :func:`symmetry_report` measured (all float64).

    Attributes
    ----------
    loss : float
        training-mode loss at ``W``
    loss_gap : float
        ``|L(A W) - L(W)|`` (invariance: ~0)
    negative_loss_gap : float
        ``|L(-A W) - L(W)|`` with negative factors (must be large: BN and ReLU do not
        commute with the sign; the paper's "any real number" is wrong)
    grad_alignment : float
        ``max_o |<grad w_o, w_o>| / (|grad w_o| |w_o|)``: the gradient is orthogonal to the
        orbit of every filter (~0)
    step_gap : dict
        per update, ``|L(step(A W)) - L(step(W))|`` after one step on the same batch
        (~0 for ``sm`` and ``un``, large for ``bsgd``: the negative control)

    Parameters
    ----------
    loss, loss_gap, negative_loss_gap, grad_alignment, step_gap
        The attributes above.

    Examples
    --------
    >>> from manifold_nets.experiments.segmentation import SymmetryReport
    >>> r = SymmetryReport(loss=9.9, loss_gap=7e-15, negative_loss_gap=0.05,
    ...                    grad_alignment=8e-14, step_gap={"bsgd": 0.18, "sm": 2e-15, "un": 0.0})
    >>> r.holds()
    True
    """

    loss: float
    loss_gap: float
    negative_loss_gap: float
    grad_alignment: float
    step_gap: dict[str, float]

    def holds(self, atol: float = 1e-8) -> bool:
        """Loss invariance and SM/UN update invariance hold, and both negative controls
        fail, with tolerance ``atol`` relative to the loss.

        The gradient alignment must be below ``sqrt(atol)``; a negative control "fails"
        when its gap exceeds ``1000`` times the tolerance. SM or UN missing from
        ``step_gap`` is not checked; B-SGD, the negative control, must be there: without
        it the report does not hold.

        Parameters
        ----------
        atol : float, optional
            The tolerance, relative to ``max(1, |loss|)`` (default ``1e-8``).

        Returns
        -------
        bool
            Whether every check passes.

        Examples
        --------
        >>> from manifold_nets.experiments.segmentation import SymmetryReport
        >>> r = SymmetryReport(loss=9.9, loss_gap=7e-15, negative_loss_gap=0.05,
        ...                    grad_alignment=8e-14, step_gap={"bsgd": 0.18, "un": 1e-3})
        >>> r.holds()  # the UN step is not invariant here
        False
        >>> SymmetryReport(9.9, 7e-15, 0.05, 8e-14, {"bsgd": 0.18, "un": 0.0}).holds()
        True
        >>> SymmetryReport(9.9, 7e-15, 0.05, 8e-14, {"un": 0.0}).holds()  # no control run
        False
        """
        tol = atol * max(1.0, abs(self.loss))
        return (self.loss_gap < tol and self.grad_alignment < atol ** 0.5
                and self.negative_loss_gap > 1e3 * tol
                and all(self.step_gap[u] < tol for u in ("sm", "un") if u in self.step_gap)
                and self.step_gap.get("bsgd", 0.0) > 1e3 * tol)


def symmetry_report(model: SegNet, images: torch.Tensor, labels: torch.Tensor, *,
                    lr: float = 0.1, seed: int = 0,
                    updates: Sequence[str] = UPDATES) -> SymmetryReport:
    """Check the per-filter scaling symmetry of ``model`` on one batch, in float64.

    The model is copied (never modified). Batch norm runs in training mode (batch
    statistics), where the invariance holds up to its ``eps``; set ``bn_eps=1e-30`` for an
    exact check in float64.

    Parameters
    ----------
    model : SegNet
        The net (not modified).
    images, labels : torch.Tensor
        One batch: ``(N, 1, H, W)`` images and ``(N, H, W)`` classes.
    lr : float, optional
        The rate of the one step of every update (default 0.1).
    seed : int, optional
        Seeds the scaling factors (:func:`filter_scaling`).
    updates : sequence of str, optional
        The updates to step (default all three of Table 1).

    Returns
    -------
    SymmetryReport
        The measured gaps; :meth:`SymmetryReport.holds` says whether the symmetry and its
        negative controls behave as the paper says.

    Examples
    --------
    >>> from manifold_nets.experiments.segmentation import symmetry_report
    >>> from manifold_nets.nets import SegNet
    >>> model = SegNet(widths=(4, 8), bn_eps=1e-30)
    >>> x, y = torch.rand(2, 1, 32, 32), torch.randint(0, 11, (2, 32, 32))
    >>> report = symmetry_report(model, x, y, updates=("bsgd", "un"))
    >>> report.loss_gap < 1e-10, report.step_gap["un"] < 1e-10, report.step_gap["bsgd"] > 1e-4
    (True, True, True)
    >>> report.holds()
    True
    """
    base = copy.deepcopy(model).double().train()
    x, y = images.double(), labels
    gen = torch.Generator().manual_seed(seed)
    element = filter_scaling(base, gen)
    negative = Rescaling(element.space, {n: (-a, c) for n, (a, c) in element.scales.items()},
                         allow_negative=True)

    def loss_of(m):
        with torch.no_grad():
            return float(seg_loss(m(x), y))

    l0 = loss_of(base)
    gap = abs(loss_of(element.apply(base)) - l0)
    neg = abs(loss_of(negative.apply(base)) - l0)

    probe = copy.deepcopy(base)
    seg_loss(probe(x), y).backward()
    align = 0.0
    for _, w in probe.named_filters():
        g, v = w.grad.flatten(1), w.detach().flatten(1)
        cos = (g * v).sum(1).abs() / (g.norm(dim=1) * v.norm(dim=1)).clamp_min(1e-300)
        align = max(align, float(cos.max()))

    def one_step(m, update):
        declare(m, update)
        opt = geoopt.optim.RiemannianSGD(m.parameters(), lr=lr)
        seg_loss(m(x), y).backward()
        opt.step()
        return loss_of(m)

    steps = {u: abs(one_step(element.apply(base), u) - one_step(copy.deepcopy(base), u))
             for u in updates}
    return SymmetryReport(l0, gap, neg, align, steps)


# --------------------------------------------------------------------------------------
# Command line.


def _config_from_args(args: argparse.Namespace, update: str, lr: float, seed: int) -> SegConfig:
    net = SegNetConfig(widths=tuple(args.widths), convs_per_block=args.convs_per_block,
                       bn_eps=args.bn_eps)
    data = CanvasConfig(size=args.size, digits_per_canvas=args.digits,
                        max_overlap=args.max_overlap, train=args.train,
                        val=args.val, test=args.test, data_seed=args.data_seed)
    return SegConfig(update=update, lr=lr, epochs=args.epochs, batch_size=args.batch_size,
                     decay=args.decay, momentum=args.momentum,
                     class_balance=args.class_balance, seed=seed, net=net, data=data)


def _fmt(m: dict | None) -> str:
    if m is None:
        return "diverged"
    return (f"global {m['global_acc']:.4f}  class-avg {m['class_avg_acc']:.4f}  "
            f"mIoU {m['mean_iou']:.4f}")


def run_cli(args: argparse.Namespace) -> int:
    """``manifold-nets segnet``."""
    torch.set_num_threads(args.threads)
    try:
        grid = list(args.lr_grid) if args.lr_grid else [args.lr]
        seeds = list(args.seeds)
        configs = {lr: _config_from_args(args, args.update, lr, seeds[0]) for lr in grid}
    except ValueError as err:
        args.parser.error(str(err))
    if args.out:
        from .io import unwritable

        problem = unwritable(args.out, "--out")
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 1
    start = time.perf_counter()
    splits = make_splits(configs[grid[0]].data)
    print(f"canvases: {len(splits['train'])} train, {len(splits['val'])} val, "
          f"{len(splits['test'])} test ({time.perf_counter() - start:.1f} s)", flush=True)
    log = (lambda s: print("  " + s, flush=True)) if args.verbose else None

    selection, runs = {}, []
    for lr in grid:
        record, _ = train(configs[lr], splits, log=log)
        selection[lr] = record
        print(f"{args.update} lr {lr:g} seed {seeds[0]}: val {_fmt(record['val'])} "
              f"({record['wall_time_s']:.1f} s)", flush=True)
    ok = {lr: r for lr, r in selection.items() if not r["diverged"]}
    best = max(ok, key=lambda lr: ok[lr]["val"]["mean_iou"]) if ok else grid[0]
    runs.append(selection[best])
    if len(grid) > 1:
        print(f"selected lr {best:g} (best validation mean IoU)", flush=True)
    for seed in seeds[1:]:
        record, _ = train(_config_from_args(args, args.update, best, seed), splits, log=log)
        runs.append(record)
    for r in runs:
        print(f"{args.update} lr {best:g} seed {r['config']['seed']}: test {_fmt(r['test'])} "
              f"({r['wall_time_s']:.1f} s)", flush=True)
    result = {
        "update": args.update, "lr": best, "seeds": seeds,
        "selection": {str(lr): {"val": r["val"], "diverged": r["diverged"]}
                      for lr, r in selection.items()},
        "runs": runs, "wall_time_s": time.perf_counter() - start,
        "command": "manifold-nets " + " ".join(sys.argv[1:]) if args.record_argv else None,
    }
    if args.out:
        atomic_write(args.out, json.dumps(result, indent=1) + "\n")
        print(f"record written to {args.out}")
    return 0


def _fmt_mean_std(values: list[float]) -> str:
    m, sd = mean_std(values)
    return f"{m:.4f} +- {sd:.4f}"


def report_table(results: list[dict]) -> str:
    """A markdown table of test metrics (mean +- std over seeds) from ``segnet`` records."""
    lines = ["| update | lr | runs | global acc. | class-avg. acc. | mean IoU |",
             "|---|---|---|---|---|---|"]
    for res in results:
        ok = [r["test"] for r in res["runs"] if not r["diverged"]]
        n = f"{len(ok)}/{len(res['runs'])}"
        if not ok:
            lines.append(f"| {res['update'].upper()} | {res['lr']:g} | {n} | - | - | - |")
            continue
        cells = [_fmt_mean_std([m[k] for m in ok]) for k in ("global_acc", "class_avg_acc",
                                                          "mean_iou")]
        name = {"bsgd": "B-SGD"}.get(res["update"], res["update"].upper())
        lines.append(f"| {name} | {res['lr']:g} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def selection_table(results: list[dict]) -> str:
    """A markdown table of the validation mean IoU of every rate tried (first seed)."""
    lrs = sorted({lr for res in results for lr in res["selection"]}, key=float, reverse=True)
    lines = ["| update | " + " | ".join(f"lr {float(lr):g}" for lr in lrs) + " |",
             "|---|" + "---|" * len(lrs)]
    for res in results:
        cells = []
        for lr in lrs:
            s = res["selection"].get(lr)
            cells.append("-" if s is None else "diverged" if s["diverged"]
                         else f"{s['val']['mean_iou']:.4f}")
        name = {"bsgd": "B-SGD"}.get(res["update"], res["update"].upper())
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_examples(results: list[dict], path: str | os.PathLike, n: int = 4) -> None:
    """Input, ground truth and each update's prediction (first seed) for ``n`` test canvases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    data = CanvasConfig(**results[0]["runs"][0]["config"]["data"])
    test = make_splits(data)["test"]
    colors = list(plt.get_cmap("tab10").colors) + [(0.0, 0.0, 0.0)]
    cmap = ListedColormap(colors)
    names = [{"bsgd": "B-SGD"}.get(r["update"], r["update"].upper()) for r in results]
    cols = 2 + len(results)
    fig, axes = plt.subplots(n, cols, figsize=(1.8 * cols, 1.8 * n), squeeze=False)
    for i in range(n):
        panels = [(test.images[i, 0].numpy(), "gray", "input"),
                  (test.labels[i].numpy(), cmap, "ground truth")]
        panels += [(np.asarray(r["runs"][0]["examples"][i]), cmap, f"{name} prediction")
                   for r, name in zip(results, names, strict=True)]
        for ax, (img, cm, title) in zip(axes[i], panels, strict=True):
            ax.imshow(img, cmap=cm, vmin=0, vmax=1 if cm == "gray" else NUM_CLASSES - 1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
    handles = [matplotlib.patches.Patch(color=colors[k], label=str(k) if k < 10 else "bg")
               for k in range(NUM_CLASSES)]
    fig.legend(handles=handles, loc="lower center", ncol=NUM_CLASSES, fontsize=7,
               frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)


def run_report_cli(args: argparse.Namespace) -> int:
    """``manifold-nets segnet-report``."""
    results = [json.loads(Path(p).read_text()) for p in args.records]
    print("## Test metrics (mean +- std over seeds)\n")
    print(report_table(results))
    print("\n## Learning-rate selection: validation mean IoU (first seed)\n")
    print(selection_table(results))
    if args.figure:
        chosen = [r for r in results if r["update"] in args.figure_updates]
        plot_examples(chosen, args.figure)
        print(f"\nfigure written to {args.figure}")
    return 0
