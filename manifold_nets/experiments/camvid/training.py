r"""SegNet-Basic trained on CamVid with an update of Table 1: the run's configuration, the
loss, training and evaluation.

**Training** (:func:`train`) follows SegNet-Basic's reference set-up (SegNet-Tutorial's
``segnet_basic_train.prototxt`` and solver): :func:`~manifold_nets.nets.segnet_basic`, a
class-weighted cross-entropy that ignores void (averaged over the non-void pixels of the
mini-batch, as Caffe's ``SoftmaxWithLoss`` normalises), momentum 0.9, weight decay
:math:`5 \cdot 10^{-4}`, batch 4, a constant rate, and a horizontal flip of each training
image with probability 1/2 (the original data layer's ``mirror``). The update is one of
Table 1 through :func:`manifold_nets.declare` and :class:`~manifold_nets.InvariantSGD`: under
UN every conv filter (each feeds a batch norm) lies on the oblique manifold. A checkpoint
after every epoch lets a killed run continue where it was. Before every evaluation the
batch-norm statistics are recomputed over the training images (:func:`bn_statistics`), as
SegNet's own test procedure does.

**Metrics** (:func:`evaluate`): global accuracy, class-average accuracy, mean IoU and the
per-class IoU, over every non-void test pixel at the evaluated resolution
(:func:`~manifold_nets.experiments.metrics.segmentation_metrics`).

The protocol of one update (rate selection, every seed) is
:func:`~manifold_nets.experiments.camvid.protocol.train_update`.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ...declare import declare
from ...nets import SegNet, SegNetConfig
from ...table1 import check_update
from ..metrics import confusion_matrix, segmentation_metrics
from .data import CLASS_WEIGHTS, CLASSES, VOID, CamVid, class_weights

__all__ = [
    "OPTIMIZERS",
    "CamVidConfig",
    "bn_statistics",
    "build_model",
    "evaluate",
    "pixel_errors",
    "predict",
    "seg_loss",
    "train",
]

#: The optimisers a CamVid run can take: :class:`~manifold_nets.InvariantSGD`, or
#: :class:`torch.optim.SGD` as the control of the training pipeline (``update="bsgd"``).
OPTIMIZERS = ("invariant", "torch-sgd")


@dataclass
class CamVidConfig:
    """Everything that defines a CamVid run; saved with its results and weights.

    Attributes
    ----------
    update : {"bsgd", "sm", "un"}
        the update of Table 1
    lr : float
        the constant rate
    epochs, batch_size, momentum, weight_decay
        SGD as SegNet-Basic's solver (momentum 0.9, weight decay 5e-4, batch 4)
    height, width : int
        the resolution of training and evaluation (CamVid is 360 x 480)
    filters : int
        filters of every 7x7 conv (64 in SegNet-Basic)
    class_weights : {"published", "computed", "none"}
        see :func:`~manifold_nets.experiments.camvid.data.class_weights`
    flip : bool
        horizontal flips of the training images
    seed : int
        initial weights, batch order and flips
    val_every : int
        validate after every ``val_every``-th epoch and after the last (validation
        recomputes the batch-norm statistics over the training images, so it costs about
        half an epoch)
    optimizer : {"invariant", "torch-sgd"}
        :class:`~manifold_nets.InvariantSGD` (default), or plain
        :class:`torch.optim.SGD` on the same net (``update="bsgd"`` only): the
        control that checks the training pipeline against torch's own optimiser

    Parameters
    ----------
    update, lr, epochs, batch_size, momentum, weight_decay
        The attributes of the same names.
    height, width, filters, class_weights, flip, seed, val_every, optimizer
        The attributes of the same names.

    Raises
    ------
    ValueError
        On an unknown ``update``, ``class_weights`` or ``optimizer``, ``"torch-sgd"`` with
        another update than ``"bsgd"``, a rate that is not positive, a count below 1, or
        a side below 16 (SegNet-Basic pools four times).

    Examples
    --------
    >>> from manifold_nets.experiments.camvid import CamVidConfig
    >>> config = CamVidConfig(update="sm", lr=0.01)
    >>> config.size, config.filters, config.class_weights
    ((180, 240), 32, 'published')
    >>> CamVidConfig(height=8)
    Traceback (most recent call last):
    ...
    ValueError: SegNet-Basic pools 4 times: height and width must be >= 16, got 8 x 240
    """

    update: str = "un"
    lr: float = 0.1
    epochs: int = 10
    batch_size: int = 4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    height: int = 180
    width: int = 240
    filters: int = 32
    class_weights: str = "published"
    flip: bool = True
    seed: int = 0
    val_every: int = 1
    optimizer: str = "invariant"

    def __post_init__(self):
        check_update(self.update)
        if not self.lr > 0:
            raise ValueError(f"Invalid learning rate: {self.lr}")
        for name in ("epochs", "batch_size", "height", "width", "filters", "val_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.height < 16 or self.width < 16:
            raise ValueError(f"SegNet-Basic pools 4 times: height and width must be >= 16, "
                             f"got {self.height} x {self.width}")
        if self.class_weights not in CLASS_WEIGHTS:
            raise ValueError(f"unknown class_weights {self.class_weights!r}; choose one of "
                             f"{', '.join(CLASS_WEIGHTS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of "
                             f"{', '.join(OPTIMIZERS)}")
        if self.optimizer == "torch-sgd" and self.update != "bsgd":
            raise ValueError(f"optimizer 'torch-sgd' is Euclidean SGD: it runs only with "
                             f"update 'bsgd', not {self.update!r}")

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)``, the resolution of training and evaluation.

        Examples
        --------
        >>> from manifold_nets.experiments.camvid import CamVidConfig
        >>> CamVidConfig(height=360, width=480).size
        (360, 480)
        """
        return (self.height, self.width)

    @property
    def net(self) -> SegNetConfig:
        """The network: SegNet-Basic with ``filters`` per conv and the 11 classes.

        Examples
        --------
        >>> from manifold_nets.experiments.camvid import CamVidConfig
        >>> net = CamVidConfig(filters=16).net
        >>> net.widths, net.num_classes, net.kernel_size
        ((16, 16, 16, 16), 11, 7)
        """
        return SegNetConfig.basic(self.filters, len(CLASSES))

    def to_dict(self) -> dict:
        """The configuration as plain data (saved with results and weights).

        Returns
        -------
        dict
            Every field by name, ``optimizer`` only where it is not the default (so
            that the records and checkpoints of the runs made before it existed still
            match); ``CamVidConfig(**d)`` rebuilds it.

        Examples
        --------
        >>> from manifold_nets.experiments.camvid import CamVidConfig
        >>> d = CamVidConfig(seed=3).to_dict()
        >>> len(d), d["seed"], CamVidConfig(**d) == CamVidConfig(seed=3)
        (13, 3, True)
        """
        d = asdict(self)
        if d["optimizer"] == "invariant":
            del d["optimizer"]
        return d


def seg_loss(logits: torch.Tensor, labels: torch.Tensor,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """Class-weighted cross-entropy over the non-void pixels, divided by their number (as
    Caffe's ``SoftmaxWithLoss`` with ``ignore_label: 11`` normalises).

    Parameters
    ----------
    logits : torch.Tensor
        ``(N, 11, H, W)`` scores.
    labels : torch.Tensor
        ``(N, H, W)`` labels; void pixels are ignored.
    weight : torch.Tensor, optional
        ``(11,)`` class weights (:func:`~manifold_nets.experiments.camvid.data.class_weights`).

    Returns
    -------
    torch.Tensor
        The 0-dim loss.

    Examples
    --------
    >>> import math, torch
    >>> from manifold_nets.experiments.camvid import VOID, seg_loss
    >>> labels = torch.tensor([[[0, VOID]]])
    >>> round(seg_loss(torch.zeros(1, 11, 1, 2), labels).item() - math.log(11), 6)
    0.0
    """
    loss = F.cross_entropy(logits, labels, weight=weight, ignore_index=VOID, reduction="sum")
    return loss / (labels != VOID).sum().clamp_min(1)


def pixel_errors(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image, the fraction of its non-void pixels misclassified, summed over the batch.

    Parameters
    ----------
    logits : torch.Tensor
        ``(N, 11, H, W)`` scores.
    labels : torch.Tensor
        ``(N, H, W)`` labels; void pixels do not count.

    Returns
    -------
    torch.Tensor
        The 0-dim sum, float64.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.experiments.camvid import VOID, pixel_errors
    >>> logits = torch.zeros(1, 11, 1, 3)
    >>> logits[0, 0] = 1.0  # class 0 everywhere
    >>> pixel_errors(logits, torch.tensor([[[0, 1, VOID]]])).item()
    0.5
    """
    valid = labels != VOID
    wrong = (logits.argmax(1) != labels) & valid
    return (wrong.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)).double().sum()


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Per-pixel classes of ``uint8`` images, in eval mode (the mode is restored).

    Parameters
    ----------
    model : torch.nn.Module
        The network.
    images : torch.Tensor
        ``uint8 (N, 3, H, W)``.
    chunk : int
        Images per forward pass.

    Returns
    -------
    torch.Tensor
        ``(N, H, W)`` classes, on the CPU.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.experiments.camvid import CamVidConfig, build_model, predict
    >>> model = build_model(CamVidConfig(filters=2, height=16, width=16))
    >>> predict(model, torch.zeros(3, 3, 16, 16, dtype=torch.uint8)).shape
    torch.Size([3, 16, 16])
    """
    was = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        return torch.cat([model(images[i:i + chunk].to(device).float()).argmax(1).cpu()
                          for i in range(0, len(images), chunk)])
    finally:
        model.train(was)


@torch.no_grad()
def bn_statistics(model: torch.nn.Module, images: torch.Tensor, chunk: int = 8) -> None:
    """Set every batch norm's running statistics to their average over ``images`` (in
    training mode, batch by batch), as SegNet's ``compute_bn_statistics.py`` does before
    testing: the running averages of training (momentum 0.1 over batches of 4 correlated
    road scenes) are far from the data's statistics.

    The model is restored to its mode and the batch norms to their momentum afterwards.

    Parameters
    ----------
    model : torch.nn.Module
        The model; its batch norms' running statistics are replaced in place.
    images : torch.Tensor
        ``uint8 (N, 3, H, W)`` images (converted to float batch by batch).
    chunk : int
        Images per forward pass.

    Examples
    --------
    With equal chunks the running mean is the mean over all images:

    >>> import torch
    >>> from manifold_nets.experiments.camvid import bn_statistics
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.BatchNorm2d(2))
    >>> images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    >>> bn_statistics(model, images, chunk=2)
    >>> with torch.no_grad():
    ...     mean = model[0](images.float()).mean((0, 2, 3))
    >>> torch.allclose(model[1].running_mean, mean, atol=1e-4), model[1].momentum
    (True, 0.1)
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    was = model.training
    momenta = [m.momentum for m in norms]
    device = next(model.parameters()).device
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
        model.train()
        for i in range(0, len(images), chunk):
            model(images[i:i + chunk].to(device).float())
    finally:
        for m, mom in zip(norms, momenta, strict=True):
            m.momentum = mom
        model.train(was)


def evaluate(model: torch.nn.Module, data: CamVid, labels: torch.Tensor | None = None) -> dict:
    """Global accuracy, class-average accuracy, mean IoU and ``per_class_iou`` (a list,
    ``None`` for a class absent from the ground truth) over the non-void pixels of
    ``data``, with the model's batch-norm statistics as they are (see
    :func:`bn_statistics`).

    With ``labels`` (the same images' labels at another resolution, e.g. CamVid's own
    360 x 480), the predictions made at ``data``'s resolution are upsampled to theirs by
    nearest neighbour and scored against them: the figures then sit on the same pixels
    as published ones.

    Parameters
    ----------
    model : torch.nn.Module
        Maps float ``(N, 3, H, W)`` images to ``(N, 11, H, W)`` scores; run in eval mode,
        8 images at a time, on the device of its parameters.
    data : CamVid
        The images and labels.
    labels : torch.Tensor, optional
        ``(N, H, W)`` labels of the same images at the resolution to score at.

    Returns
    -------
    dict
        ``global_acc``, ``class_avg_acc`` and ``mean_iou`` (fractions, over the classes
        present; see
        :func:`~manifold_nets.experiments.metrics.segmentation_metrics`) and
        ``per_class_iou``.

    Examples
    --------
    A "model" that calls every pixel Road (class 3), on 7 non-void pixels of which 5
    are Road and 2 Sky:

    >>> import torch
    >>> from manifold_nets.experiments.camvid import VOID, CamVid, evaluate
    >>> road = torch.nn.Conv2d(3, 11, 1)
    >>> with torch.no_grad():
    ...     _ = road.weight.zero_(), road.bias.zero_(), road.bias[3].fill_(1.0)
    >>> labels = torch.tensor([[[0, 0, 3, 3], [3, 3, 3, VOID]]])
    >>> m = evaluate(road, CamVid(torch.zeros(1, 3, 2, 4, dtype=torch.uint8), labels, ["a"]))
    >>> round(m["global_acc"], 4), m["class_avg_acc"], round(m["mean_iou"], 4)
    (0.7143, 0.5, 0.3571)
    >>> [None if v is None else round(v, 4) for v in m["per_class_iou"][:4]]
    [0.0, None, None, 0.7143]
    """

    pred, target = predict(model, data.images), data.labels
    if labels is not None:
        if labels.shape[0] != pred.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {pred.shape[0]} images")
        pred = F.interpolate(pred[:, None].float(), size=tuple(labels.shape[-2:]),
                             mode="nearest")[:, 0].long()
        target = labels
    keep = target != VOID
    return segmentation_metrics(confusion_matrix(pred[keep], target[keep], len(CLASSES)))


def build_model(config: CamVidConfig) -> SegNet:
    """The initial SegNet-Basic of a run (seeded by ``config.seed``), declared for
    ``config.update``.

    Parameters
    ----------
    config : CamVidConfig
        The run.

    Returns
    -------
    SegNet
        The declared model.

    Examples
    --------
    >>> from manifold_nets.experiments.camvid import CamVidConfig, build_model
    >>> model = build_model(CamVidConfig(update="un", filters=2, height=16, width=16))
    >>> type(next(model.parameters())).__name__
    'ManifoldParameter'
    """
    model = SegNet.from_config(config.net, generator=torch.Generator().manual_seed(config.seed))
    declare(model, config.update)
    return model


class _Flips:
    """Horizontal flips of a mini-batch, each image with probability 1/2, from its own
    generator (checkpointed with the run); ``uint8`` images become float."""

    def __init__(self, generator: torch.Generator | None, device: torch.device | str = "cpu"):
        self.generator = generator
        self.device = torch.device(device)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        if self.generator is not None:
            flip = torch.rand(len(x), generator=self.generator) < 0.5
            if flip.any():
                x, y = x.clone(), y.clone()
                x[flip] = x[flip].flip(-1)
                y[flip] = y[flip].flip(-1)
        return x.to(self.device), y.to(self.device)


def _spent(spent: dict, start: float, cpu_start: float) -> dict:
    """The run's time so far: the earlier processes' and this one's."""
    return {"wall": spent["wall"] + time.perf_counter() - start,
            "cpu": spent["cpu"] + time.process_time() - cpu_start,
            "from_epoch": spent["from_epoch"]}


def train(config: CamVidConfig, data: dict[str, CamVid], *,
          checkpoint: str | os.PathLike | None = None, evaluate_val: bool = True,
          log: Callable[[str], None] | None = None, progress: bool = True,
          device: torch.device | str = "cpu") -> tuple[dict, SegNet]:
    """Train one run; return its record and the trained model.

    Parameters
    ----------
    config : CamVidConfig
        The run.
    data : dict
        ``{"train": CamVid, "val": CamVid}`` at ``config.size`` (``"val"`` optional).
    checkpoint : path, optional
        Saved after every epoch that did not diverge
        (:class:`~manifold_nets.experiments.checkpoint.RunCheckpoint`); if it exists, the
        run continues from it (refused, naming the difference, if it was made with
        another configuration).
    evaluate_val : bool
        The validation metrics after every epoch (``val_*`` in the history).
    log : callable, optional
        Receives one line per epoch.
    progress : bool
        A progress bar over the epochs.
    device : torch.device or str
        Where the model trains (the data stays on the CPU; each mini-batch moves).

    Returns
    -------
    record : dict
        ``config``, per-epoch ``history``, ``diverged``, final ``val`` metrics,
        ``wall_time_s`` and ``cpu_time_s`` (summed over every process that trained the
        run, carried in the checkpoint; CPU time of every thread of each process),
        ``time_from_epoch`` (1, or the first epoch they cover where the run was resumed
        from a checkpoint that did not carry the time yet), ``torch_threads``.
    model : SegNet
        The trained model, with its batch-norm statistics recomputed over the training
        images (:func:`bn_statistics`) unless the run diverged.

    Raises
    ------
    ValueError
        If the training images are not at ``config.size``, or the checkpoint was made with
        another configuration.

    Examples
    --------
    One epoch of a 2-filter SegNet-Basic on four random 16 x 16 images (a real run takes
    hours):

    >>> import torch
    >>> from manifold_nets.experiments.camvid import CamVid, CamVidConfig, train
    >>> config = CamVidConfig(filters=2, height=16, width=16, epochs=1, batch_size=2)
    >>> def split(n):
    ...     return CamVid(torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8),
    ...                   torch.randint(0, 12, (n, 16, 16)), [f"{i}.png" for i in range(n)])
    >>> record, model = train(config, {"train": split(4), "val": split(2)}, progress=False)
    >>> record["diverged"], len(record["history"]), sorted(record["val"])
    (False, 1, ['class_avg_acc', 'global_acc', 'mean_iou', 'per_class_iou'])
    """
    from ...optim import InvariantSGD
    from ..checkpoint import RunCheckpoint
    from ..config import ExpDecay, StoppingRule
    from ..loop import LoopState, ModuleRuns, Stream, fit_runs
    from ..progress import tqdm

    train_set, val_set = data["train"], data.get("val")
    if tuple(train_set.images.shape[-2:]) != config.size:
        raise ValueError(f"the training images are {tuple(train_set.images.shape[-2:])}, the "
                         f"configuration says {config.size}")
    start, cpu_start = time.perf_counter(), time.process_time()
    model = build_model(config).to(device)
    make = InvariantSGD if config.optimizer == "invariant" else torch.optim.SGD
    # the rate is the loop's alone (fit_runs' lr, set before every step): none here
    optimizer = make(model.parameters(), lr=0.0, momentum=config.momentum,
                     weight_decay=config.weight_decay,
                     **({"fused": False} if make is InvariantSGD else {}))
    weight = class_weights(config.class_weights, train_set)
    weight = weight.to(device) if weight is not None else None
    flips = torch.Generator().manual_seed(config.seed + 2) if config.flip else None
    engine = ModuleRuns(model, loss=lambda z, t: seg_loss(z, t, weight), optimizer=optimizer,
                        errors=pixel_errors, augment=_Flips(flips, device))
    order = torch.Generator().manual_seed(config.seed + 1)
    ck = RunCheckpoint(checkpoint, model=model, optimizer=optimizer, generator=order,
                       lr=config.lr, config=config)
    stopping = StoppingRule(config.epochs, config.epochs, enabled=False)
    state = ck.resume(stopping)
    spent = {"wall": 0.0, "cpu": 0.0, "from_epoch": 1}  # by earlier processes of this run
    if state is not None:
        spent = ck.saved_extra.get("time") or {"wall": 0.0, "cpu": 0.0,
                                               "from_epoch": state.epoch + 1}
        if flips is not None:
            flips.set_state(ck.saved_extra["flips"])
        if log is not None:
            log(f"resumed from {checkpoint} after epoch {state.epoch}")

    epochs = itertools.count((state.epoch if state is not None else 0) + 1)

    def validate(_, ids):
        epoch = next(epochs)  # the epoch that just ended; the last one is always validated
        if epoch % config.val_every and epoch != config.epochs:
            return {}
        bn_statistics(model, train_set.images)
        m = evaluate(model, val_set)
        return {f"val_{k}": [v] for k, v in m.items() if k != "per_class_iou"}

    def on_epoch(_, st: LoopState) -> None:
        if not st.results[0].diverged:
            ck.save(st, flips=flips.get_state() if flips is not None else None,
                    time=_spent(spent, start, cpu_start))
        if log is not None:
            row = st.results[0].history[-1]
            log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in row.items()))

    bar = tqdm(total=config.epochs, desc=f"{config.update} lr {config.lr:g} seed "
               f"{config.seed}", unit="epoch", disable=not progress, leave=False)
    with bar:
        result = fit_runs(
            engine, train_set.images, train_set.labels, lr=[config.lr],
            schedules=[ExpDecay(1.0)],
            stopping=[stopping],
            streams=[Stream(torch.arange(len(train_set)), order)], stream_of_run=[0],
            batch_size=config.batch_size,
            evaluate=validate if evaluate_val and val_set is not None else None,
            progress=bar, start=state, on_epoch=on_epoch)[0]
    if not result.diverged:
        bn_statistics(model, train_set.images)
    total = _spent(spent, start, cpu_start)
    record = {
        "config": config.to_dict(),
        "history": result.history,
        "diverged": result.diverged,
        "val": evaluate(model, val_set) if val_set is not None and not result.diverged
        else None,
        "wall_time_s": total["wall"],
        "cpu_time_s": total["cpu"],
        "time_from_epoch": total["from_epoch"],
        "torch_threads": torch.get_num_threads(),
    }
    return record, model
