r"""Weights files of trained CamVid runs: the model, its configuration and its test
metrics in one file (:func:`save_weights`, :func:`load_weights`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ...nets import SegNet
from ..io import atomic_write
from .training import CamVidConfig, build_model

__all__ = ["load_weights", "save_weights"]


def save_weights(path: str | os.PathLike, model: SegNet, config: CamVidConfig,
                 metrics: dict | None = None) -> Path:
    """Write a run's final weights (``state_dict`` in float32, its configuration and, if
    given, its test metrics) atomically.

    Parameters
    ----------
    path : path
        The file to write (replaced atomically).
    model : SegNet
        The trained model.
    config : CamVidConfig
        Its configuration.
    metrics : dict, optional
        Its test metrics, stored beside the weights.

    Returns
    -------
    pathlib.Path
        ``path``.

    Examples
    --------
    >>> import os
    >>> import tempfile
    >>> import torch
    >>> from manifold_nets.experiments.camvid import (CamVidConfig, build_model, load_weights,
    ...                                               save_weights)
    >>> config = CamVidConfig(filters=2, height=16, width=16)
    >>> path = save_weights(os.path.join(tempfile.mkdtemp(), "un.pt"), build_model(config),
    ...                     config, {"mean_iou": 0.5})
    >>> model, loaded, metrics = load_weights(path)
    >>> loaded == config, metrics
    (True, {'mean_iou': 0.5})
    """
    payload = {"format": ("manifold-nets-camvid-weights", 1), "config": config.to_dict(),
               "model": {k: v.detach().as_subclass(torch.Tensor).clone()
                         for k, v in model.state_dict().items()},
               "metrics": metrics}
    return atomic_write(path, lambda fh: torch.save(payload, fh))


def load_weights(path: str | os.PathLike) -> tuple[SegNet, CamVidConfig, dict | None]:
    """The model, configuration and stored test metrics of :func:`save_weights`'s file.

    Parameters
    ----------
    path : path
        A file written by :func:`save_weights`.

    Returns
    -------
    model : SegNet
        The model (declared for ``config.update``) with the stored weights.
    config : CamVidConfig
        Its configuration.
    metrics : dict or None
        The stored test metrics.

    Raises
    ------
    ValueError
        If the file is unreadable or not such a file.

    Examples
    --------
    >>> import os
    >>> import tempfile
    >>> import torch
    >>> from manifold_nets.experiments.camvid import (CamVidConfig, build_model, load_weights,
    ...                                               save_weights)
    >>> config = CamVidConfig(update="sm", filters=2, height=16, width=16)
    >>> saved = build_model(config)
    >>> path = save_weights(os.path.join(tempfile.mkdtemp(), "sm.pt"), saved, config)
    >>> model, _, metrics = load_weights(path)
    >>> state = saved.state_dict()
    >>> all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), metrics
    (True, None)
    >>> try:
    ...     load_weights(os.path.join(tempfile.mkdtemp(), "missing.pt"))
    ... except ValueError as err:
    ...     print(str(err).endswith("does not exist"))
    True
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"weights file {path} does not exist") from None
    except Exception as err:
        raise ValueError(f"weights file {path} could not be read ({type(err).__name__}); it "
                         "is truncated or not a manifold-nets CamVid weights file") from None
    if not isinstance(payload, dict) or tuple(payload.get("format", ())) != (
            "manifold-nets-camvid-weights", 1):
        raise ValueError(f"{path} is not a manifold-nets CamVid weights file")
    config = CamVidConfig(**payload["config"])
    model = build_model(config)
    with torch.no_grad():
        model.load_state_dict(payload["model"])
    return model, config, payload.get("metrics")
