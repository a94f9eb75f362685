r"""Finding the rescaling symmetries of any model numerically (:func:`discover`)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, jvp, vmap

from .groups import RescalingGroup, ScalingSpace

__all__ = [
    "Discovery",
    "discover",
]


# -- discovering symmetries ---------------------------------------------------------------------
@dataclass
class Discovery:
    """What :func:`discover` found.

    Attributes
    ----------
    dim : int
        number of independent rescaling symmetries, counted in parameter space
    basis : torch.Tensor
        ``(space.dim, dim)`` generators in :class:`ScalingSpace` coordinates, orthonormal as
        parameter-space vectors
    singular_values : torch.Tensor
        relative singular values (largest 1) of the output Jacobian restricted to the
        candidate directions, ascending
    threshold : float
        singular values below it count as symmetries
    gap : float
        ratio of the first singular value above the threshold to the last one below it
        (``inf`` when the last is exactly zero); a large gap means a clean count
    candidates : int
        number of candidate generators (rows and columns of every weight)
    rank : int
        dimension of their span in parameter space
    space : ScalingSpace
    """

    dim: int
    basis: torch.Tensor
    singular_values: torch.Tensor
    threshold: float
    gap: float
    candidates: int
    rank: int
    space: ScalingSpace

    def group(self, model: nn.Module) -> RescalingGroup:
        """The discovered group, acting on ``model`` (or any model with the same names)."""
        return RescalingGroup(model, self.basis, "discovered", space=self.space)

    def __str__(self) -> str:
        below = self.singular_values[self.dim - 1] if self.dim else float("nan")
        above = (self.singular_values[self.dim] if self.dim < len(self.singular_values)
                 else float("nan"))
        return (f"{self.dim} symmetries among {self.candidates} candidates (span "
                f"{self.rank}); singular values {float(below):.2e} | {float(above):.2e} "
                f"(threshold {self.threshold:.0e}, gap {self.gap:.2e})")


def discover(model: nn.Module, inputs: torch.Tensor, *, threshold: float = 1e-4,
             train: bool = True, dtype: torch.dtype = torch.float64, chunk: int = 64
             ) -> Discovery:
    r"""Find the rescaling symmetries of any ``Linear``/``ConvNd`` (+BN) model numerically.

    Candidates are the scalings of every row (filter, with its bias) and every column of
    every weight. With :math:`C` the matrix of candidate generators in parameter space and
    :math:`J` the Jacobian of the outputs on ``inputs``, the symmetries are the parameter-space
    vectors :math:`C v` with :math:`J C v = 0`. :math:`J C` is computed column by column with
    forward-mode JVPs (:func:`torch.func.jvp`, vectorised with :func:`torch.func.vmap`);
    :math:`C` is whitened with its Gram matrix so that dependent candidates (scaling every
    row of a matrix equals scaling every column) are not counted. Then

    .. math:: J C P = U \Sigma Z^T, \quad P^T C^T C P = I,

    and the symmetries are :math:`P z_k` for the singular values
    :math:`\sigma_k / \sigma_{\max} <` ``threshold``.

    Parameters
    ----------
    model : nn.Module
        the model (not modified: a copy in ``dtype`` is used)
    inputs : torch.Tensor or tuple of torch.Tensor
        a batch (several positional inputs as a tuple). Floating inputs are cast to
        ``dtype``; integer inputs (token ids) pass untouched. The outputs must have at least
        as many values as there are candidates (else :class:`ValueError`), and should have
        several times as many
    threshold : float
        relative singular value below which a direction counts as a symmetry. Batch norm
        with ``eps > 0`` is only approximately invariant (relative effect about
        ``eps / var(h)``), hence the default ``1e-4`` rather than round-off level.
    train : bool
        evaluate batch norm with batch statistics (default; the symmetry of eq. (3)) or with
        its running statistics
    dtype : torch.dtype
        computation dtype (default float64)
    chunk : int
        JVPs per vectorised batch

    Notes
    -----
    The null space is measured on finite inputs: a dead unit, or a pooling pair whose
    winner never changes, adds spurious directions. Use enough, varied inputs (e.g. a few
    hundred random images), and check :attr:`Discovery.gap`.
    """
    net = copy.deepcopy(model).to(dtype=dtype).train(train).requires_grad_(False)
    for mod in net.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and train:
            mod.track_running_stats = False
            mod.running_mean = mod.running_var = mod.num_batches_tracked = None
        if isinstance(mod, nn.modules.dropout._DropoutNd):
            mod.eval()  # dropout off: the function, not one random draw of it
    space = ScalingSpace(net)
    all_params = {n: p.detach() for n, p in net.named_parameters()}
    keys = [s.weight for s in space.sites] + [s.bias for s in space.sites if s.bias]
    primals = {k: all_params[k] for k in keys}
    device = next(iter(primals.values())).device
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    # floating inputs in the computation dtype; token ids and masks stay as they are
    args = tuple(a.to(device=device, dtype=dtype) if a.is_floating_point() else a.to(device)
                 for a in args)

    def forward(p):
        return functional_call(net, p, args)

    with torch.no_grad():
        n_outputs = forward(primals).numel()
    if n_outputs < space.dim:
        raise ValueError(
            f"discover: the inputs give {n_outputs} output values for {space.dim} candidate "
            "directions, so the outputs cannot tell the symmetries apart (the count would be "
            f"too high). Fix: pass at least {-(-space.dim // max(1, n_outputs // len(args[0])))} "
            "varied inputs, preferably several times that, and check Discovery.gap.")

    def column(v):
        return jvp(forward, (primals,), (space.tangent(v, primals),))[1].reshape(-1)

    eye = torch.eye(space.dim, dtype=dtype, device=device)
    jc = torch.cat([vmap(column)(eye[i:i + chunk]) for i in range(0, space.dim, chunk)]).T
    evals, evecs = torch.linalg.eigh(space.gram(primals))
    keep = evals > evals.max() * space.dim * torch.finfo(dtype).eps * 10
    p = evecs[:, keep] / evals[keep].sqrt()
    _, sv, zt = torch.linalg.svd(jc @ p, full_matrices=True)
    r = p.shape[1]
    sv_full = torch.zeros(r, dtype=dtype, device=device)
    sv_full[: sv.numel()] = sv[:r]
    order = torch.argsort(sv_full)
    rel = sv_full[order] / sv_full.max()
    z = zt.T[:, order]
    dim = int((rel < threshold).sum())
    if dim < r:
        lo = float(rel[dim - 1]) if dim else 0.0
        gap = float(rel[dim]) / lo if lo > 0 else math.inf
    else:
        gap = math.nan
    basis = (p @ z[:, :dim]).to(torch.float64).cpu()
    return Discovery(dim, basis, rel.to(torch.float64).cpu(), threshold, gap, space.dim, r,
                     space)


