r"""The SegNet paper's segmentation metrics, from a confusion matrix.

:math:`C` counts pixels (rows: truth, columns: prediction) over every scored pixel:
global accuracy :math:`\sum_k C_{kk} / \sum C`, class-average accuracy
:math:`\frac{1}{K}\sum_k C_{kk} / \sum_j C_{kj}` and mean intersection over union
:math:`\frac{1}{K}\sum_k C_{kk} / (\sum_j C_{kj} + \sum_j C_{jk} - C_{kk})`, averaging over
the classes present in the ground truth, and the IoU of every class (``None`` where a
class is absent from the ground truth).
"""

from __future__ import annotations

import torch

__all__ = ["confusion_matrix", "segmentation_metrics"]


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor,
                     num_classes: int) -> torch.Tensor:
    """``C[k, j]``: pixels of true class ``k`` predicted as ``j`` (int64).

    Parameters
    ----------
    pred, target : torch.Tensor
        Predicted and true classes, of one shape (any), ``int64`` in
        ``0 .. num_classes - 1``.
    num_classes : int
        :math:`K`.

    Returns
    -------
    torch.Tensor
        ``(K, K)`` counts; rows: truth, columns: prediction.

    Raises
    ------
    ValueError
        If the shapes differ or a class is outside ``0 .. num_classes - 1``.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.experiments.metrics import confusion_matrix
    >>> confusion_matrix(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 0, 1, 1]), 2).tolist()
    [[1, 1], [0, 2]]
    """
    if pred.shape != target.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} and labels "
                         f"{tuple(target.shape)} differ in shape")
    for what, t in (("prediction", pred), ("label", target)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(f"a {what} is outside 0 .. {num_classes - 1}: "
                             f"{int(t.min())} .. {int(t.max())}")
    idx = target.reshape(-1) * num_classes + pred.reshape(-1)
    return torch.bincount(idx, minlength=num_classes ** 2).view(num_classes, num_classes)


def segmentation_metrics(conf: torch.Tensor) -> dict:
    """Global accuracy, class-average accuracy, mean IoU and per-class IoU of a confusion
    matrix (the module docstring).

    Parameters
    ----------
    conf : torch.Tensor
        A ``(K, K)`` confusion matrix (:func:`confusion_matrix`).

    Returns
    -------
    dict
        ``global_acc``, ``class_avg_acc`` and ``mean_iou`` (floats, over the classes
        present) and ``per_class_iou`` (``K`` floats, ``None`` for an absent class).

    Raises
    ------
    ValueError
        If ``conf`` counts no pixel.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.experiments.metrics import segmentation_metrics
    >>> m = segmentation_metrics(torch.tensor([[3, 1, 0], [0, 4, 0], [0, 0, 0]]))
    >>> round(m["global_acc"], 4), round(m["class_avg_acc"], 4), round(m["mean_iou"], 4)
    (0.875, 0.875, 0.775)
    >>> m["per_class_iou"]
    [0.75, 0.8, None]
    """
    conf = conf.double()
    if float(conf.sum()) == 0:
        raise ValueError("the confusion matrix counts no pixel")
    tp = conf.diag()
    truth, predicted = conf.sum(1), conf.sum(0)
    present = truth > 0
    iou = tp / (truth + predicted - tp).clamp_min(1)
    return {
        "global_acc": float(tp.sum() / conf.sum()),
        "class_avg_acc": float((tp[present] / truth[present]).mean()),
        "mean_iou": float(iou[present].mean()),
        "per_class_iou": [float(v) if p else None for v, p in zip(iou, present, strict=True)],
    }
