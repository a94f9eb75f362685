r"""Many runs of the Table 2 protocol trained at once, as one stacked model.

A *group* of runs, same architecture, depth and data sizes but any seed, update, protocol
and learning rate, is trained as one network whose every tensor carries a leading run
dimension ``R``:

- :math:`W_l`: ``(R, width, in)``; :math:`\theta`: ``(R, K, width/2)``; batch-norm scale,
  shift and running statistics: ``(R, width)``; activations are laid out
  ``(R, features, B)`` so that per-run batch statistics reduce over the innermost dim;
- every run draws its own split, initial weights and batch order from its seed, exactly as
  :func:`manifold_nets.training.train` does. Runs of one seed share them (``reproduce``
  gives run ``r`` of every cell the seed ``seed + r``): their mini-batch is gathered once;
  when the whole group has one seed, the first layer is one matrix product of the shared
  mini-batch with all ``R`` filter banks, otherwise a batched product (:func:`torch.bmm`);
- the forward and backward passes are written out (:meth:`StackedNet.loss_and_grad`):
  batch norm per run over its mini-batch, ReLU, pair max-pooling, summed cross-entropy
  per run, so each run's gradient is its own; the tests check them against autograd on
  separate :class:`~manifold_nets.Arch1` / :class:`~manifold_nets.Arch2` models;
- the update (:func:`stacked_sgd_step`) applies B-SGD, SM (eqs. (7)-(8)) or UN (eq. (9))
  to each run's slice with the per-filter functions of :mod:`manifold_nets.math` (a
  leading run dimension is just more batch), with a per-run learning rate;
- schedules, stopping and divergence are the objects of :mod:`manifold_nets.training`,
  evaluated run by run after every epoch; a run that stops leaves the stack (the others
  are compacted), so finished runs are frozen and cost nothing.

Every step of :func:`fit_batched` is the step of :func:`manifold_nets.training.fit`, in the
same order, for every run at once. In float64 a run's record equals the sequential one to
rounding (``tests/test_batched.py``). In float32 the stacked products sum in another order
than one run's, the last bits differ, and over thousands of steps runs drift apart (the
learning-rate selection can flip where two rates are close): results agree in
distribution, not digit by digit.

:func:`train_group` is :func:`manifold_nets.training.train` for a group, including the
learning-rate selection, which trains ``runs x len(lr_grid)`` networks on the
``select_train`` images at once. :func:`run_grid_batched` is
:func:`manifold_nets.reproduce.run_grid` with one group per task (one architecture and
depth, ``seeds_per_group`` seeds, every protocol and update: 30 runs by default); it writes
the same records into the same :class:`~manifold_nets.reproduce.ResultStore`
(``manifold-nets reproduce --batched``).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from .math import oblique_projx_, scaled_egrad2rgrad
from .nets import Arch1, Arch2
from .training import (
    Divergence,
    FitResult,
    StoppingRule,
    TrainConfig,
    _subseed,
    build_model,
    make_schedule,
    split_indices,
    stopping_rule,
)

__all__ = [
    "StackedNet",
    "error_rates",
    "fit_batched",
    "group_key",
    "run_grid_batched",
    "select_lr_batched",
    "stacked_sgd_step",
    "train_group",
]


# --------------------------------------------------------------------------------------
# The stacked network.


@dataclass
class StackedNet:
    r"""``R`` networks of one architecture and depth, every tensor with a leading run dim.

    Attributes
    ----------
    W : list of torch.Tensor
        :math:`W_1 .. W_L`, each ``(R, width, in)`` (leaf tensors that require grad)
    theta : torch.Tensor
        the classifiers, ``(R, K, width/2)``
    gamma, beta : list of torch.Tensor
        batch-norm scale and shift per layer, ``(R, width)`` (empty for Arch1)
    running_mean, running_var : list of torch.Tensor
        batch-norm running statistics, ``(R, width)`` (empty for Arch1)
    bn_eps, bn_momentum : float
        batch-norm settings (as in ``nn.BatchNorm1d``)
    """

    W: list[torch.Tensor]
    theta: torch.Tensor
    gamma: list[torch.Tensor] = field(default_factory=list)
    beta: list[torch.Tensor] = field(default_factory=list)
    running_mean: list[torch.Tensor] = field(default_factory=list)
    running_var: list[torch.Tensor] = field(default_factory=list)
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1

    @property
    def runs(self) -> int:
        return self.theta.shape[0]

    @property
    def batch_norm(self) -> bool:
        return bool(self.gamma)

    @classmethod
    def from_models(cls, models: Sequence[torch.nn.Module]) -> StackedNet:
        """Stack :class:`~manifold_nets.Arch1` / :class:`~manifold_nets.Arch2` models.

        The models must share architecture, depth and width; their weights are copied.
        """
        if not models:
            raise ValueError("StackedNet.from_models needs at least one model")
        configs = {m.config for m in models}
        if len(configs) != 1:
            raise ValueError(f"cannot stack models of different configurations: {configs}")
        first = models[0]

        def stack(get) -> torch.Tensor:
            return torch.stack([get(m).detach() for m in models]).requires_grad_()

        def stack_buffer(get) -> torch.Tensor:
            return torch.stack([get(m).detach() for m in models]).clone()

        depth = len(first.layers)
        bn = first.layers[0].bn is not None
        net = cls(
            W=[stack(lambda m, i=i: m.layers[i].linear.weight) for i in range(depth)],
            theta=stack(lambda m: m.classifier.weight),
        )
        if bn:
            b = first.layers[0].bn
            net.bn_eps, net.bn_momentum = b.eps, b.momentum
            net.gamma = [stack(lambda m, i=i: m.layers[i].bn.weight) for i in range(depth)]
            net.beta = [stack(lambda m, i=i: m.layers[i].bn.bias) for i in range(depth)]
            net.running_mean = [stack_buffer(lambda m, i=i: m.layers[i].bn.running_mean)
                                for i in range(depth)]
            net.running_var = [stack_buffer(lambda m, i=i: m.layers[i].bn.running_var)
                               for i in range(depth)]
        return net

    def parameters(self) -> list[torch.Tensor]:
        """Every trained tensor: the filters, batch-norm scale and shift, the classifier."""
        return [*self.W, *self.gamma, *self.beta, self.theta]

    def tensors(self) -> list[torch.Tensor]:
        """The parameters, then the running statistics: everything a run's state holds."""
        return [*self.parameters(), *self.running_mean, *self.running_var]

    def _rebuild(self, tensors: list[torch.Tensor]) -> StackedNet:
        L, bn = len(self.W), self.batch_norm
        it = iter(tensors)
        W = [next(it) for _ in range(L)]
        gamma = [next(it) for _ in range(L)] if bn else []
        beta = [next(it) for _ in range(L)] if bn else []
        theta = next(it)
        rm = [next(it) for _ in range(L)] if bn else []
        rv = [next(it) for _ in range(L)] if bn else []
        return StackedNet(W, theta, gamma, beta, rm, rv, self.bn_eps, self.bn_momentum)

    def select(self, index: Sequence[int]) -> StackedNet:
        """A new stack holding runs ``index`` (in that order), copied."""
        idx = torch.as_tensor(list(index), dtype=torch.long)
        n_par = len(self.parameters())
        out = []
        for k, t in enumerate(self.tensors()):
            s = t.detach().index_select(0, idx)
            out.append(s.requires_grad_() if k < n_par else s)
        return self._rebuild(out)

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of every tensor (for the bold driver's undo)."""
        return [t.detach().clone() for t in self.tensors()]

    @torch.no_grad()
    def restore(self, snapshot: list[torch.Tensor], runs: Sequence[int]) -> None:
        """Put runs ``runs`` back to ``snapshot``; the other runs keep their state."""
        idx = torch.as_tensor(list(runs), dtype=torch.long)
        for t, s in zip(self.tensors(), snapshot, strict=True):
            t.index_copy_(0, idx, s.index_select(0, idx))

    def model(self, run: int) -> Arch1 | Arch2:
        """Run ``run`` as an ordinary (undeclared) :class:`Arch1` / :class:`Arch2` module."""
        width, in_features = self.W[0].shape[1:]
        K = self.theta.shape[1]
        kw = dict(bn_eps=self.bn_eps, bn_momentum=self.bn_momentum) if self.batch_norm else {}
        cls = Arch2 if self.batch_norm else Arch1
        m = cls(len(self.W), width, in_features, K, **kw).to(self.theta.dtype)
        with torch.no_grad():
            for i, layer in enumerate(m.layers):
                layer.linear.weight.copy_(self.W[i][run])
                if layer.bn is not None:
                    layer.bn.weight.copy_(self.gamma[i][run])
                    layer.bn.bias.copy_(self.beta[i][run])
                    layer.bn.running_mean.copy_(self.running_mean[i][run])
                    layer.bn.running_var.copy_(self.running_var[i][run])
            m.classifier.weight.copy_(self.theta[run])
        return m

    def _bn_eval(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Batch norm with the running statistics, ``h`` ``(R, width, B)``."""
        scale = torch.rsqrt(self.running_var[layer] + self.bn_eps) * self.gamma[layer]
        shift = self.beta[layer] - self.running_mean[layer] * scale
        return torch.addcmul(shift.unsqueeze(-1), h, scale.unsqueeze(-1))

    @staticmethod
    def _pool(h: torch.Tensor) -> torch.Tensor:
        """ReLU and pair max-pooling over the filters of ``h`` ``(R, width, B)``."""
        return torch.maximum(h[:, 0::2], h[:, 1::2]).relu_()

    @torch.no_grad()
    def forward(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Logits ``(R, B, K)`` of images ``x`` ``(B, in)`` shared by all runs.

        ``train=False`` (the default): batch norm with the running statistics, as a model
        in ``eval()`` mode. ``train=True``: batch statistics, and the running statistics are
        updated, as a model in ``train()`` mode. No gradients: see :meth:`loss_and_grad`.
        """
        if train:
            return self._forward_train(*self._groups(x, None))[0].transpose(1, 2)
        R = self.runs
        m = None
        for i, W in enumerate(self.W):
            if i == 0:
                h = (W.detach().reshape(R * W.shape[1], -1) @ x.T).view(R, W.shape[1], -1)
            else:
                h = torch.bmm(W.detach(), m)
            if self.batch_norm:
                h = self._bn_eval(h, i)
            m = self._pool(h)
        return torch.bmm(self.theta.detach(), m).transpose(1, 2).contiguous()

    def _first_layer(self, x: torch.Tensor, groups: Sequence[tuple[int, int, int]]
                     ) -> torch.Tensor:
        """:math:`W_1 x` for every run, ``(R, width, B)``: one matrix product per range
        ``(start, stop, s)`` of runs that share the mini-batch ``x[s]``."""
        W = self.W[0].detach()
        R, width, n_in = W.shape
        h = W.new_empty(R, width, x.shape[-2])
        for a, b, s in groups:
            if b > a:
                torch.mm(W[a:b].reshape(-1, n_in), x[s].T, out=h[a:b].view(-1, x.shape[-2]))
        return h

    def _first_layer_grad(self, dh: torch.Tensor, x: torch.Tensor,
                          groups: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        r""":math:`\nabla_{W_1} L = \delta_1 x^T` for every run, group by group."""
        W = self.W[0]
        grad = torch.empty_like(W, requires_grad=False)
        for a, b, s in groups:
            if b > a:
                torch.mm(dh[a:b].reshape(-1, dh.shape[-1]), x[s],
                         out=grad[a:b].view(-1, W.shape[-1]))
        return grad

    def _groups(self, x: torch.Tensor, groups: Sequence[tuple[int, ...]] | None):
        """``x`` as ``(S, B, in)``, and for each range of runs ``(start, stop, s)``: the
        runs ``start:stop`` train on ``x[s]``."""
        R = self.runs
        if x.dim() == 2:
            return x.unsqueeze(0), [(0, R, 0)]
        if groups is None:
            if x.shape[0] != R:
                raise ValueError(f"x has {x.shape[0]} mini-batches for {R} runs; give groups")
            return x, [(r, r + 1, r) for r in range(R)]
        out = [(g[0], g[1], g[2] if len(g) > 2 else k) for k, g in enumerate(groups)]
        starts, stops = [g[0] for g in out], [g[1] for g in out]
        if starts[0] != 0 or stops[-1] != R or starts[1:] != stops[:-1] or not all(
                0 <= g[2] < x.shape[0] for g in out):
            raise ValueError(f"groups {list(groups)} must split the {R} runs in order into "
                             f"ranges (start, stop[, batch]) of the {x.shape[0]} mini-batches")
        return x, out

    def _forward_train(self, x: torch.Tensor, groups: Sequence[tuple[int, int, int]]):
        """Training-mode forward in the layout ``(R, features, B)``; keeps what the
        backward pass needs and updates the running statistics."""
        R = self.runs
        m = None
        saved = []
        for i, W in enumerate(self.W):
            h = self._first_layer(x, groups) if i == 0 else torch.bmm(W.detach(), m)
            bn = None
            if self.batch_norm:  # per run and filter over the batch: channels R * width
                width, n = h.shape[1:]
                flat = h.view(1, R * width, n)
                out, mean, invstd = torch.native_batch_norm(
                    flat, self.gamma[i].detach().view(-1), self.beta[i].detach().view(-1),
                    self.running_mean[i].view(-1), self.running_var[i].view(-1), True,
                    self.bn_momentum, self.bn_eps)
                bn = (flat, mean, invstd)
                h = out.view(R, width, n)
            # odd minus even filter of every pair: positive where the odd one won the
            # pooling (ties go to the even one), all the backward pass needs
            m_in, m, odd_won = m, self._pool(h), h[:, 1::2] - h[:, 0::2]
            saved.append((m_in, m, odd_won, bn))
        logits = torch.bmm(self.theta.detach(), m)
        return logits, m, saved

    @torch.no_grad()
    def loss_and_grad(self, x: torch.Tensor, y: torch.Tensor,
                      groups: Sequence[tuple[int, ...]] | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""One training-mode forward and backward pass of summed cross-entropy, per run.

        Parameters
        ----------
        x : torch.Tensor
            ``(B, in)`` images shared by all runs; or ``(S, B, in)``, ``S`` mini-batches,
            where ``x[s]`` is the batch of the runs ``groups[s]``
        y : torch.Tensor
            labels, ``(B,)`` shared or ``(R, B)`` one row per run
        groups : sequence of (int, int) or (int, int, int), optional
            with a 3-D ``x``: consecutive ranges ``(start, stop, s)`` of runs, covering
            all ``R`` in order, where runs ``start:stop`` train on ``x[s]`` (``s``
            defaults to the range's position). Without it a 3-D ``x`` holds one
            mini-batch per run (``S = R``). Each range's first layer is one matrix
            product.

        Sets ``.grad`` of every parameter to the gradient of its own run's loss
        :math:`L_r = \sum_{b} \mathrm{CE}(f_r(x_b), y_b)` (back-propagation written out
        for this network: the result equals autograd's, ``tests/test_batched.py``) and
        updates the batch-norm running statistics.

        Returns
        -------
        (torch.Tensor, torch.Tensor)
            ``(R,)`` losses and ``(R,)`` numbers of misclassified images of the batch.
        """
        x, groups = self._groups(x, groups)
        logits, m, saved = self._forward_train(x, groups)  # logits (R, K, B)
        logp = torch.log_softmax(logits, dim=1)
        target = y.view(-1, 1, y.shape[-1]).expand(logits.shape[0], 1, -1)
        loss = -logp.gather(1, target).squeeze(1).sum(1)
        wrong = (logits.transpose(1, 2).contiguous().argmax(-1) != y.view(-1, y.shape[-1])
                 ).sum(1)
        d = logp.exp_().scatter_add_(1, target, torch.full_like(logp[:, :1], -1.0))
        self.theta.grad = torch.bmm(d, m.transpose(1, 2))
        dm = torch.bmm(self.theta.detach().transpose(1, 2), d)
        threshold_backward = torch.ops.aten.threshold_backward
        for i in reversed(range(len(self.W))):
            m_in, m_out, odd_won, bn = saved[i]
            # through the ReLU (where the pooled value is positive), then to the winner
            # of each pair: the odd filter where it is strictly larger, else the even one
            dm = threshold_backward(dm, m_out, 0)
            d_odd = threshold_backward(dm, odd_won, 0)
            dh = torch.stack((dm - d_odd, d_odd), dim=2).view(m_out.shape[0], -1,
                                                               m_out.shape[-1])
            if bn is not None:
                flat, mean, invstd = bn
                gamma, beta = self.gamma[i], self.beta[i]
                dflat, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
                    dh.view_as(flat), flat, gamma.detach().view(-1),
                    self.running_mean[i].view(-1), self.running_var[i].view(-1), mean,
                    invstd, True, self.bn_eps, [True, True, True])
                gamma.grad, beta.grad = dgamma.view_as(gamma), dbeta.view_as(beta)
                dh = dflat.view_as(dh)
            W = self.W[i]
            if i == 0:
                W.grad = self._first_layer_grad(dh, x, groups)
            else:
                W.grad = torch.bmm(dh, m_in.transpose(1, 2))
                dm = torch.bmm(W.detach().transpose(1, 2), dh)
        return loss, wrong


# --------------------------------------------------------------------------------------
# The update.


def _segments(updates: Sequence[str]) -> list[tuple[str, int, int]]:
    """Maximal slices ``(update, start, stop)`` of runs with the same update."""
    bad = sorted(set(updates) - {"bsgd", "sm", "un"})
    if bad:
        raise ValueError(f"unknown updates {bad}: use 'bsgd', 'sm' or 'un'")
    out: list[tuple[str, int, int]] = []
    for i, u in enumerate(updates):
        if out and out[-1][0] == u:
            out[-1] = (u, out[-1][1], i + 1)
        else:
            out.append((u, i, i + 1))
    return out


@torch.no_grad()
def stacked_sgd_step(net: StackedNet, lr: torch.Tensor, updates: Sequence[str]) -> None:
    r"""One symmetry-invariant SGD step of every run, from the gradients in ``.grad``.

    Run ``r`` (rate :math:`\eta_r` = ``lr[r]``) gets the update ``updates[r]`` of Table 1,
    exactly as :class:`geoopt.optim.RiemannianSGD` applies it to a model declared with
    :func:`manifold_nets.declare` (momentum 0):

    .. math::

        \begin{aligned}
        &\texttt{bsgd}: && W \leftarrow W - \eta_r \nabla_W L, \quad
            \theta \leftarrow \theta - \eta_r \nabla_\theta L \\
        &\texttt{sm}: && W \leftarrow W - \eta_r\,\mathrm{Diag}(\|w_i\|^2) \nabla_W L,\quad
            \theta \leftarrow \theta - \eta_r \nabla_\theta L\,
            \mathrm{Diag}(\|\theta_{:,j}\|^2) \quad \text{(eqs. (7)-(8))} \\
        &\texttt{un}: && W \leftarrow \mathrm{Orth}(W - \eta_r \Pi_W(\nabla_W L)),\quad
            \theta \leftarrow \theta - \eta_r \nabla_\theta L \quad \text{(eq. (9))}
        \end{aligned}

    and batch-norm scale and shift get Euclidean SGD under every update.

    Each maximal slice of runs with one update is updated at once, in place, with the
    projection of :func:`manifold_nets.math.oblique_proju`,
    :func:`~manifold_nets.math.oblique_projx_` and
    :func:`~manifold_nets.math.scaled_egrad2rgrad`; keep the runs of one update side
    by side (:func:`fit_batched` does) so that there are few slices.

    Parameters
    ----------
    net : StackedNet
        the runs; their tensors hold gradients
    lr : torch.Tensor
        ``(R,)`` learning rates (0 freezes a run)
    updates : sequence of str
        ``R`` labels in ``{"bsgd", "sm", "un"}``
    """
    rate = lr.to(net.theta.dtype).view(-1, 1, 1)
    for update, start, stop in _segments(updates):
        a = rate[start:stop]
        for W in net.W:
            x, g = W.detach()[start:stop], W.grad[start:stop]
            if update == "un":  # x <- Orth(x - a Pi_x(g)), eq. (9); Pi_x(g) as in
                # oblique_proju, with the inner products in one pass (vecdot)
                inner = torch.linalg.vecdot(x, g).unsqueeze_(-1)
                oblique_projx_(x.addcmul_(torch.addcmul(g, inner, x, value=-1), a, value=-1))
            elif update == "sm":  # x <- x - a Diag(|w_i|^2) g, eqs. (7)-(8)
                x.addcmul_(scaled_egrad2rgrad(x, g, "left", 1), a, value=-1)
            else:
                x.addcmul_(g, a, value=-1)
        x, g = net.theta.detach()[start:stop], net.theta.grad[start:stop]
        if update == "sm":
            g = scaled_egrad2rgrad(x, g, "right", 2)
        x.addcmul_(g, a, value=-1)
    rate2 = rate.view(-1, 1)
    for p in (*net.gamma, *net.beta):
        p.detach().addcmul_(p.grad, rate2, value=-1)


# --------------------------------------------------------------------------------------
# Evaluation and the loop.


@torch.no_grad()
def error_rates(net: StackedNet, x: torch.Tensor, y: torch.Tensor,
                chunk: int | None = None) -> list[float]:
    """Per run, the fraction of misclassified images (evaluation mode), as
    :func:`manifold_nets.training.error_rate`: non-finite logits count as errors. All runs
    see the same images; ``chunk`` images at a time (default: about 16 MB of activations).
    """
    if chunk is None:
        chunk = min(10000, max(256, 2**22 // (net.runs * net.W[0].shape[1])))
    wrong = torch.zeros(net.runs, dtype=torch.int64)
    for i in range(0, x.shape[0], chunk):
        logits = net.forward(x[i : i + chunk], train=False)
        bad = (logits.argmax(-1) != y[i : i + chunk]) | ~torch.isfinite(logits).all(-1)
        wrong += bad.sum(1)
    n = max(1, x.shape[0])
    return [w / n for w in wrong.tolist()]


class Stream(NamedTuple):
    """The images one run trains on: indices into the image store, and the generator
    of its per-epoch permutations (the sequential path's ``generator`` of ``fit``)."""

    index: torch.Tensor
    generator: torch.Generator


def fit_batched(
    net: StackedNet,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: Sequence[float],
    updates: Sequence[str],
    schedules: Sequence,
    stopping: Sequence[StoppingRule],
    divergence: Sequence[Divergence | None] | None = None,
    batch_size: int = 100,
    generator: torch.Generator | None = None,
    streams: Sequence[Stream] | None = None,
    stream_of_run: Sequence[int] | None = None,
    evaluate: Callable[[StackedNet, list[int]], dict[str, list[float]]] | None = None,
    finish: Callable[[StackedNet, list[int]], None] | None = None,
) -> list[FitResult]:
    """:func:`manifold_nets.training.fit` for the ``R`` runs of ``net`` at once.

    Parameters
    ----------
    net : StackedNet
        the runs (not modified: the loop works on copies as runs leave it)
    x, y : torch.Tensor
        the image store
    lr, updates, schedules, stopping, divergence
        one entry per run, as the arguments of :func:`~manifold_nets.training.fit`
    batch_size : int
        images per mini-batch
    generator : torch.Generator, optional
        without ``streams``: every run trains on all of ``x`` in the order of this
        generator's permutations (one mini-batch shared by all runs)
    streams, stream_of_run : optional
        several data streams (:class:`Stream`, all of one length) and the stream of each
        run; run ``r`` sees ``x[streams[s].index[perm]]`` in the order its stream's
        generator draws, exactly as ``fit`` would for that run alone
    evaluate : callable, optional
        ``evaluate(net, ids)`` after every epoch, where ``net`` holds the active runs and
        ``ids`` are their indices among the ``R``; returns, per key, one value per run
        (``"val_error"`` feeds stopping and collapse, as in ``fit``)
    finish : callable, optional
        ``finish(net, ids)`` with the runs that stop after an epoch, before they leave
        the stack

    Returns
    -------
    list of FitResult
        One per run, as :func:`~manifold_nets.training.fit` returns it.
    """
    R = net.runs
    if streams is None:
        streams = [Stream(torch.arange(x.shape[0]), generator or torch.Generator())]
        stream_of_run = [0] * R
    if stream_of_run is None or len(stream_of_run) != R:
        raise ValueError("fit_batched: give stream_of_run, one stream index per run")
    n = len(streams[0].index)
    if any(len(s.index) != n for s in streams):
        raise ValueError("fit_batched: every stream must hold the same number of images")
    lr = [float(v) for v in lr]
    divergence = [d or Divergence(collapse_error=None) for d in (divergence or [None] * R)]
    for name, seq in (("updates", updates), ("schedules", schedules),
                      ("stopping", stopping), ("divergence", divergence)):
        if len(seq) != R:
            raise ValueError(f"fit_batched: {name} has {len(seq)} entries for {R} runs")
    results = [FitResult() for _ in range(R)]
    train_errors: list[list[float]] = [[] for _ in range(R)]
    val_errors: list[list[float]] = [[] for _ in range(R)]
    reference: list[float | None] = [None] * R
    # runs of one update side by side (few slices to update), and within them the runs of
    # one stream: each stream's mini-batch is then one matrix product per update
    active = sorted(range(R), key=lambda i: (updates[i], stream_of_run[i]))
    if active != list(range(R)):
        net = net.select(active)
    epoch = 0
    while active:
        epoch += 1
        undo = [getattr(schedules[i], "undo", False) for i in active]
        snapshot = net.snapshot() if any(undo) else None
        run_updates = [updates[i] for i in active]
        rate = torch.tensor([lr[i] for i in active], dtype=net.theta.dtype)
        order = torch.stack([s.index[torch.randperm(n, generator=s.generator)]
                             for s in streams])
        shared = len(streams) == 1
        if shared:  # one contiguous copy per epoch; every run sees the same mini-batch
            xe, ye = x[order[0]], y[order[0]]
        else:  # ranges of consecutive runs of one stream, and the stream of each range
            run_stream = [stream_of_run[i] for i in active]
            used = sorted(set(run_stream))
            groups: list[tuple[int, int, int]] = []
            for j, s in enumerate(run_stream):
                if groups and run_stream[j - 1] == s:
                    groups[-1] = (groups[-1][0], j + 1, groups[-1][2])
                else:
                    groups.append((j, j + 1, used.index(s)))
            order = order[used]
            label_row = torch.as_tensor([used.index(s) for s in run_stream])
        total = torch.zeros(len(active), dtype=torch.float64)
        wrong = torch.zeros(len(active), dtype=torch.int64)
        batches = 0
        for start in range(0, n, batch_size):
            if shared:
                xb, yb = xe[start : start + batch_size], ye[start : start + batch_size]
                loss, bad = net.loss_and_grad(xb, yb)
            else:  # one mini-batch per range of runs, its labels copied to its runs
                idx = order[:, start : start + batch_size]
                loss, bad = net.loss_and_grad(x[idx], y[idx].index_select(0, label_row),
                                              groups)
            stacked_sgd_step(net, rate, run_updates)
            total += loss
            wrong += bad
            batches += 1
        costs = (total / batches).tolist()
        wrongs = wrong.tolist()

        decisions, restore = [], []
        for j, i in enumerate(active):
            decision = schedules[i].step(lr[i], costs[j], reference[i])
            if decision.undo and snapshot is not None:
                restore.append(j)
            else:
                reference[i] = costs[j]
            decisions.append(decision)
        if restore:
            net.restore(snapshot, restore)
        evals = evaluate(net, list(active)) if evaluate is not None else {}

        stopped, keep = [], []
        for j, i in enumerate(active):
            cost, decision = costs[j], decisions[j]
            train_error = wrongs[j] / n if math.isfinite(cost) else 1.0
            record = {"epoch": epoch, "lr": lr[i], "cost": cost, "train_error": train_error}
            lr[i] = decision.lr
            record.update({k: v[j] for k, v in evals.items()})
            results[i].history.append(record)
            train_errors[i].append(train_error)
            if "val_error" in record:
                val_errors[i].append(record["val_error"])
            undone_nan = decision.undo and not math.isfinite(cost)
            reason = None if undone_nan else divergence[i].reason(cost, val_errors[i])
            if reason is not None:
                results[i].stop_reason, results[i].diverged = reason, True
            else:
                reason = stopping[i].reason(train_errors[i], val_errors[i])
                if reason is not None:
                    results[i].stop_reason = reason
            (stopped if reason is not None else keep).append(j)
        if stopped:
            if finish is not None:
                finish(net.select(stopped), [active[j] for j in stopped])
            net = net.select(keep) if keep else net
            active = [active[j] for j in keep]
    return results


# --------------------------------------------------------------------------------------
# The protocol for a group of runs.

#: Fields that runs trained as one stack must share (the network and the data sizes).
#: Runs of different seeds can share a stack: each keeps its own split and batch order.
_SHARED = ("arch", "depth", "width", "dataset", "batch_size", "lr_grid", "select_train",
           "select_val", "select_epochs", "train_size", "val_size", "test_size")


def group_key(config: TrainConfig) -> tuple:
    """Runs with equal keys can be trained as one stack by :func:`train_group`."""
    return tuple(getattr(config, k) for k in _SHARED)


def _check_group(configs: Sequence[TrainConfig]) -> None:
    if not configs:
        raise ValueError("a group needs at least one run")
    keys = {group_key(c) for c in configs}
    if len(keys) != 1:
        diff = [k for i, k in enumerate(_SHARED) if len({key[i] for key in keys}) > 1]
        raise ValueError(
            f"runs trained as one stack must share {', '.join(_SHARED)}; these differ in "
            f"{', '.join(diff)}. Group them with batched.group_key first."
        )


def _stack(configs: Sequence[TrainConfig], repeat: int = 1) -> StackedNet:
    models, cache = [], {}
    for c in configs:
        if (c.seed, c.update) not in cache:
            cache[(c.seed, c.update)] = build_model(
                c, torch.Generator().manual_seed(_subseed(c.seed, 2)))
        models += [cache[(c.seed, c.update)]] * repeat
    return StackedNet.from_models(models)


def _by_seed(configs: Sequence[TrainConfig], ids: Sequence[int]) -> dict[int, list[int]]:
    """Positions in ``ids`` grouped by the seed of the run ``configs[ids[k]]``."""
    out: dict[int, list[int]] = {}
    for k, i in enumerate(ids):
        out.setdefault(configs[i].seed, []).append(k)
    return out


def _splits(configs: Sequence[TrainConfig], data) -> dict[int, dict[str, torch.Tensor]]:
    seeds = sorted({c.seed for c in configs})
    first = {c.seed: c for c in reversed(configs)}
    return {s: split_indices(first[s], data.x_train.shape[0]) for s in seeds}


def _streams(configs, splits, part: str) -> tuple[list[Stream], list[int]]:
    seeds = sorted(splits)
    streams = [Stream(splits[s][part], torch.Generator().manual_seed(_subseed(s, 3)))
               for s in seeds]
    return streams, [seeds.index(c.seed) for c in configs]


def select_lr_batched(
    configs: Sequence[TrainConfig], data, splits: dict[int, dict] | None = None
) -> list[tuple[float, dict[float, float]]]:
    """:func:`manifold_nets.training.select_lr` for every run of a group, all candidate
    rates of all runs in one stack (``len(configs) x len(lr_grid)`` networks).

    ``splits``: the :func:`~manifold_nets.training.split_indices` of every seed.
    """
    _check_group(configs)
    splits = splits or _splits(configs, data)
    grid = configs[0].lr_grid
    L = len(grid)
    runs = [c for c in configs for _ in grid]
    net = _stack(configs, repeat=L)
    errors = [math.nan] * net.runs

    def finish(done: StackedNet, ids: list[int]) -> None:
        for seed, pos in _by_seed(runs, ids).items():
            idx = splits[seed]["select_val"]
            errs = error_rates(done.select(pos), data.x_train[idx], data.y_train[idx])
            for k, e in zip(pos, errs, strict=True):
                errors[ids[k]] = e

    streams, stream_of_run = _streams(runs, splits, "select_train")
    fit_batched(
        net, data.x_train, data.y_train,
        lr=[r for _ in configs for r in grid],
        updates=[c.update for c in runs],
        schedules=[make_schedule(c) for c in runs],
        stopping=[StoppingRule(c.select_epochs, c.select_epochs, enabled=False) for c in runs],
        batch_size=configs[0].batch_size,
        streams=streams,
        stream_of_run=stream_of_run,
        finish=finish,
    )
    out = []
    for k in range(len(configs)):
        errs = {r: errors[k * L + j] for j, r in enumerate(grid)}
        out.append((min(errs, key=lambda r: (errs[r], r)), errs))
    return out


def train_group(configs: Sequence[TrainConfig], data=None, *, data_dir=None) -> list[dict]:
    """:func:`manifold_nets.training.train` for a group of runs trained as one stack.

    The configurations must share :func:`group_key` (architecture, depth, data sizes);
    seed, update, protocol, schedule, stopping and rate may differ. Returns one record per
    configuration, in order, in the format of :func:`~manifold_nets.training.train`, with
    ``engine: "batched"``. Timings are the group's, divided evenly among its runs
    (``wall_time_s``, ``select_time_s``); ``group_wall_time_s`` and ``group_runs`` give
    the whole. Trained weights are not saved (``saved`` is ``None``).
    """
    configs = list(configs)
    _check_group(configs)
    if data is None:
        from .data import load_dataset

        data = load_dataset(configs[0].dataset, data_dir)
    start = time.perf_counter()
    c0 = configs[0]
    splits = _splits(configs, data)
    order = sorted(range(len(configs)), key=lambda k: (configs[k].update, configs[k].seed))
    ordered = [configs[k] for k in order]
    lrs = [c.lr for c in ordered]
    selection: list[dict] = [{} for _ in ordered]
    need = [k for k, c in enumerate(ordered) if c.lr is None]
    if need:
        chosen = select_lr_batched([ordered[k] for k in need], data, splits)
        for k, (best, errs) in zip(need, chosen, strict=True):
            lrs[k], selection[k] = best, errs
    select_time = time.perf_counter() - start
    xt, yt = data.x_test[: c0.test_size], data.y_test[: c0.test_size]

    def evaluate(net: StackedNet, ids: list[int]) -> dict[str, list[float]]:
        out = {"val_error": [math.nan] * len(ids), "test_error": [math.nan] * len(ids)}
        for seed, pos in _by_seed(ordered, ids).items():
            sub = net.select(pos) if len(pos) < net.runs else net
            idx = splits[seed]["val"]
            val = error_rates(sub, data.x_train[idx], data.y_train[idx])
            test = error_rates(sub, xt, yt)
            for k, v, t in zip(pos, val, test, strict=True):
                out["val_error"][k], out["test_error"][k] = v, t
        return out

    streams, stream_of_run = _streams(ordered, splits, "train")
    results = fit_batched(
        _stack(ordered), data.x_train, data.y_train,
        lr=lrs,
        updates=[c.update for c in ordered],
        schedules=[make_schedule(c) for c in ordered],
        stopping=[stopping_rule(c) for c in ordered],
        divergence=[Divergence(c.collapse_error, c.collapse_epoch) for c in ordered],
        batch_size=c0.batch_size,
        streams=streams,
        stream_of_run=stream_of_run,
        evaluate=evaluate,
    )
    wall = time.perf_counter() - start
    n = len(configs)
    records: list[dict] = [{}] * n
    for k, c, lr, sel, res in zip(order, ordered, lrs, selection, results, strict=True):
        last = res.history[-1]
        records[k] = {
            "config": c.to_dict(),
            "lr": lr,
            "selection": {repr(r): v for r, v in sel.items()},
            "history": res.history,
            "epochs": len(res.history),
            "test_error": last["test_error"],
            "val_error": last["val_error"],
            "stop_reason": res.stop_reason,
            "diverged": res.diverged,
            "saved": None,
            "select_time_s": round(select_time / n, 3),
            "wall_time_s": round(wall / n, 3),
            "torch": torch.__version__,
            "engine": "batched",
            "group_runs": n,
            "group_wall_time_s": round(wall, 3),
        }
    return records


# --------------------------------------------------------------------------------------
# The grid.

def _run_group(task: tuple[list[dict], list[str], str]) -> dict:
    from . import reproduce

    config_dicts, run_ids, root = task
    start = time.perf_counter()
    records = train_group([TrainConfig.from_dict(d) for d in config_dicts],
                          reproduce._WORKER_DATA)
    store = reproduce.ResultStore(root)
    for run_id, record in zip(run_ids, records, strict=True):
        record["run_id"] = run_id
        record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        store.write(run_id, record)
    c = config_dicts[0]
    seeds = sorted({d["seed"] for d in config_dicts})
    return {"runs": len(records), "wall_time_s": round(time.perf_counter() - start, 1),
            "label": f"{c['arch']} d{c['depth']} seeds {seeds[0]}-{seeds[-1]}"}


def _cost(configs: Sequence[TrainConfig]) -> float:
    """Rough relative cost of a group, to start the longest ones first."""
    c = configs[0]
    per_run = c.width * 784 + c.depth * c.width**2 * (8 if c.arch == "arch2" else 4)
    return len(configs) * per_run


def run_grid_batched(
    specs,
    base: TrainConfig,
    store,
    *,
    seed: int = 0,
    jobs: int = 1,
    data_dir: str | None = None,
    threads: int = 1,
    progress: bool | None = None,
    data=None,
    seeds_per_group: int = 5,
) -> dict:
    """:func:`manifold_nets.reproduce.run_grid` with the runs of one architecture and depth
    and up to ``seeds_per_group`` seeds trained as one stack (:func:`train_group`), one
    group per task (``jobs`` worker processes).

    Skips runs the store holds (refusing records made with another configuration) and
    writes the same records. Returns counts, the number of groups and the wall time.
    """
    from .reproduce import _map_in_workers, _pending_runs

    pending_configs, done = _pending_runs(specs, base, store, seed)
    by_key: dict[tuple, list[tuple[TrainConfig, str]]] = {}
    for config, run_id in pending_configs:
        by_key.setdefault(group_key(config), []).append((config, run_id))
    groups = []
    for members in by_key.values():
        seeds = sorted({c.seed for c, _ in members})
        for k in range(0, len(seeds), seeds_per_group):
            chunk = set(seeds[k : k + seeds_per_group])
            groups.append([(c, r) for c, r in members if c.seed in chunk])
    groups.sort(key=lambda g: -_cost([c for c, _ in g]))
    pending = [([c.to_dict() for c, _ in g], [r for _, r in g], str(store.root))
               for g in groups]
    summary = {"skipped": done, "ran": 0, "groups": len(pending), "wall_time_s": 0.0}
    if not pending:
        return summary
    start = time.perf_counter()
    bar = tqdm(total=sum(len(t[1]) for t in pending), desc="grid (batched)", unit="run",
               disable=None if progress is None else not progress, file=sys.stderr)

    def report(out: dict) -> None:
        summary["ran"] += out["runs"]
        bar.update(out["runs"])
        bar.write(f"{out['label']}: {out['runs']} runs in {out['wall_time_s']} s "
                  f"(at {time.perf_counter() - start:.0f} s)", file=sys.stderr)

    with bar:
        for out in _map_in_workers(_run_group, pending, jobs=jobs, dataset=base.dataset,
                                  data_dir=data_dir, threads=threads, data=data):
            report(out)
    summary["wall_time_s"] = round(time.perf_counter() - start, 1)
    return summary
