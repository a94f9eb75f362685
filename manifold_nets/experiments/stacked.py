r"""Many networks of one architecture trained at once, as one stacked model.

:class:`StackedNet` holds ``R`` runs of :class:`~manifold_nets.Arch1` /
:class:`~manifold_nets.Arch2` (same depth and width, any seed, update and rate) with a
leading run dimension on every tensor:

- :math:`W_l`: ``(R, width, in)``; :math:`\theta`: ``(R, K, width/2)``; batch-norm scale,
  shift and running statistics: ``(R, width)``; activations are laid out
  ``(R, features, B)`` so that per-run batch statistics reduce over the innermost dim;
- runs that share a mini-batch share its first-layer product: one matrix product per
  range of runs (:meth:`StackedNet.loss_and_grad`);
- the forward and backward passes are written out (:meth:`StackedNet.loss_and_grad`):
  batch norm per run over its mini-batch (torch's native kernels on a
  ``(1, R x width, B)`` view), ReLU, pair max-pooling, summed cross-entropy per run, so
  each run's gradient is its own. Autograd through the same stacked operations is slower:
  1.26x the hand-written pass for 30 Arch2 runs of 2 x 64 filters and a batch of 100 on
  one thread (``python benchmarks/stacked_backward.py``, output in
  ``benchmarks/results/stacked-backward-2026-11-29.txt``). ``tests/test_stacked.py`` pins
  the forward and backward passes to autograd on separate :mod:`manifold_nets.nets`
  models in float64;
- the update (:meth:`StackedNet.step`) is :func:`manifold_nets.optim.invariant_sgd` on
  each slice of runs with one update (a leading run dimension is just more batch), with a
  Tensor of per-run learning rates.

It is an engine of :func:`manifold_nets.experiments.loop.fit_runs`; in float64 a run
trained in a stack equals the same run trained alone to rounding. In float32 the stacked
products sum in another order than one run's, the last bits differ, and over thousands
of steps runs drift apart: results agree in distribution, not digit by digit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .. import table1
from ..nets import Arch1, Arch2
from ..optim import EUCLIDEAN, invariant_sgd, manifold_kind
from ..table1 import UPDATES

__all__ = ["StackedNet", "error_rates", "update_of"]


def update_of(model: torch.nn.Module) -> str:
    """The update a paper net was declared for (:func:`manifold_nets.declare`), read from
    the manifold of its first filter bank: ``"un"``, ``"sm"`` or ``"bsgd"``.

    Parameters
    ----------
    model : Arch1 or Arch2
        A paper net, declared or not.

    Returns
    -------
    str
        ``"un"`` (an :class:`~manifold_nets.ObliqueManifold`), ``"sm"`` (a
        :class:`~manifold_nets.DiagScaledEuclidean`) or ``"bsgd"`` (anything else, e.g. an
        undeclared net).

    Examples
    --------
    >>> from manifold_nets import Arch1, declare
    >>> from manifold_nets.experiments.stacked import update_of
    >>> nets = [Arch1(depth=1, width=4, in_features=6, num_classes=3) for _ in range(3)]
    >>> _ = declare(nets[0], "un"), declare(nets[1], "sm")
    >>> [update_of(net) for net in nets]
    ['un', 'sm', 'bsgd']
    """
    return table1.update_of(getattr(model.layers[0].linear.weight, "manifold", None))


#: The kinds of the filters and of theta under each update (Table 1, for the 2-D weights
#: of the paper's nets).
_KINDS = {u: tuple(manifold_kind(table1.manifold_for(u, role, 2)) for role in table1.ROLES)
          for u in table1.UPDATES}

@dataclass
class StackedNet:
    r"""``R`` networks of one architecture and depth, every tensor with a leading run dim.

    Build one with :meth:`from_models` (or :meth:`from_state_dict`) rather than from its
    tensors.

    Parameters
    ----------
    W, theta, gamma, beta, running_mean, running_var, bn_eps, bn_momentum, updates
        The attributes below.

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
    updates : list of str
        every run's update, ``"bsgd"``, ``"sm"`` or ``"un"`` (default: all ``"bsgd"``)

    Raises
    ------
    ValueError
        If ``updates`` is not one label of ``"bsgd"``, ``"sm"`` and ``"un"`` per run.

    Examples
    --------
    Three Arch2 nets declared for the three updates of Table 1, as one stack; every run
    computes what its own net computes:

    >>> from manifold_nets import Arch2, declare
    >>> from manifold_nets.experiments.stacked import StackedNet
    >>> models = [Arch2(depth=2, width=4, in_features=6, num_classes=3) for _ in range(3)]
    >>> for m, u in zip(models, ["un", "sm", "bsgd"]):
    ...     _ = declare(m, u)
    >>> net = StackedNet.from_models(models)
    >>> net.runs, net.updates, [tuple(W.shape) for W in net.W], tuple(net.theta.shape)
    (3, ['un', 'sm', 'bsgd'], [(3, 4, 6), (3, 4, 2)], (3, 3, 2))
    >>> x = torch.rand(5, 6)
    >>> logits = net.forward(x)
    >>> all(torch.allclose(logits[r], m.eval()(x), atol=1e-6) for r, m in enumerate(models))
    True
    """

    W: list[torch.Tensor]
    theta: torch.Tensor
    gamma: list[torch.Tensor] = field(default_factory=list)
    beta: list[torch.Tensor] = field(default_factory=list)
    running_mean: list[torch.Tensor] = field(default_factory=list)
    running_var: list[torch.Tensor] = field(default_factory=list)
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    updates: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.updates:
            self.updates = ["bsgd"] * self.runs
        bad = sorted(set(self.updates) - set(UPDATES))
        if bad or len(self.updates) != self.runs:
            raise ValueError(f"StackedNet: updates must be {self.runs} labels in "
                             f"{UPDATES}, got {self.updates}")

    @property
    def runs(self) -> int:
        """The number of runs ``R`` (the leading dim of every tensor).

        Returns
        -------
        int
            ``theta.shape[0]``.

        Examples
        --------
        >>> from manifold_nets import Arch1
        >>> from manifold_nets.experiments.stacked import StackedNet
        >>> StackedNet.from_models([Arch1(1, 4, 6, 3) for _ in range(5)]).runs
        5
        """
        return self.theta.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the stack's tensors (and of the rates :meth:`step` takes).

        Returns
        -------
        torch.dtype
            ``theta.dtype``.

        Examples
        --------
        >>> from manifold_nets import Arch1
        >>> from manifold_nets.experiments.stacked import StackedNet
        >>> StackedNet.from_models([Arch1(1, 4, 6, 3).double()]).dtype
        torch.float64
        """
        return self.theta.dtype

    @property
    def batch_norm(self) -> bool:
        """Whether the runs have batch norm (Arch2) or not (Arch1).

        Returns
        -------
        bool
            ``True`` when ``gamma`` is not empty.

        Examples
        --------
        >>> from manifold_nets import Arch1, Arch2
        >>> from manifold_nets.experiments.stacked import StackedNet
        >>> [StackedNet.from_models([cls(1, 4, 6, 3)]).batch_norm for cls in (Arch1, Arch2)]
        [False, True]
        """
        return bool(self.gamma)

    @classmethod
    def from_models(cls, models: Sequence[torch.nn.Module]) -> StackedNet:
        """Stack :class:`~manifold_nets.Arch1` / :class:`~manifold_nets.Arch2` models.

        The models must share architecture, depth and width; their weights are copied, and
        every run's update is the one its model was declared for (:func:`update_of`).

        Parameters
        ----------
        models : sequence of Arch1 or Arch2
            The runs, in order; one model may appear several times (e.g. the same initial
            weights for several candidate rates).

        Returns
        -------
        StackedNet
            A new stack; the models are not modified or shared.

        Raises
        ------
        ValueError
            If ``models`` is empty or the models differ in configuration.

        Examples
        --------
        >>> from manifold_nets import Arch1, Arch2
        >>> from manifold_nets.experiments.stacked import StackedNet
        >>> a = Arch1(depth=1, width=4, in_features=6, num_classes=3)
        >>> net = StackedNet.from_models([a, a])
        >>> net.runs, torch.equal(net.W[0][1], a.layers[0].linear.weight)
        (2, True)
        >>> StackedNet.from_models([a, Arch2(depth=1, width=4, in_features=6, num_classes=3)])
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: cannot stack models of different configurations: ...
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
            updates=[update_of(m) for m in models],
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
        """Every trained tensor: the filters, batch-norm scale and shift, the classifier.

        Returns
        -------
        list of torch.Tensor
            ``[*W, *gamma, *beta, theta]``, leaf tensors that require grad.

        Examples
        --------
        >>> from manifold_nets import Arch2
        >>> from manifold_nets.experiments.stacked import StackedNet
        >>> net = StackedNet.from_models([Arch2(2, 4, 6, 3)] * 2)
        >>> [tuple(p.shape) for p in net.parameters()]
        [(2, 4, 6), (2, 4, 2), (2, 4), (2, 4), (2, 4), (2, 4), (2, 3, 2)]
        """
        return [*self.W, *self.gamma, *self.beta, self.theta]

    def tensors(self) -> list[torch.Tensor]:
        """The parameters, then the running statistics: everything a run's state holds.

        Returns
        -------
        list of torch.Tensor
            :meth:`parameters`, then ``[*running_mean, *running_var]``.

        Examples
        --------
        >>> from manifold_nets import Arch1, Arch2
        >>> from manifold_nets.experiments.stacked import StackedNet
        >>> [len(StackedNet.from_models([cls(2, 4, 6, 3)]).tensors()) for cls in (Arch1, Arch2)]
        [3, 11]
        """
        return [*self.parameters(), *self.running_mean, *self.running_var]

    def _rebuild(self, tensors: list[torch.Tensor], updates: list[str]) -> StackedNet:
        return self._assemble(tensors, len(self.W), self.batch_norm, self.bn_eps,
                              self.bn_momentum, updates)

    @classmethod
    def _assemble(cls, tensors, depth: int, bn: bool, bn_eps: float, bn_momentum: float,
                  updates: list[str]) -> StackedNet:
        """A stack from its tensors in the order of :meth:`tensors`."""
        it = iter(tensors)
        W = [next(it) for _ in range(depth)]
        gamma = [next(it) for _ in range(depth)] if bn else []
        beta = [next(it) for _ in range(depth)] if bn else []
        theta = next(it)
        rm = [next(it) for _ in range(depth)] if bn else []
        rv = [next(it) for _ in range(depth)] if bn else []
        return cls(W, theta, gamma, beta, rm, rv, bn_eps, bn_momentum, list(updates))

    def select(self, index: Sequence[int]) -> StackedNet:
        """A new stack holding runs ``index`` (in that order), copied.

        Parameters
        ----------
        index : sequence of int
            The runs to keep, in their new order (a run may be repeated).

        Returns
        -------
        StackedNet
            A new stack of ``len(index)`` runs with copies of their tensors and their
            updates; this stack is not modified.

        Examples
        --------
        >>> from manifold_nets import Arch2, declare
        >>> from manifold_nets.experiments.stacked import StackedNet
        >>> models = [Arch2(depth=1, width=4, in_features=6, num_classes=3) for _ in range(3)]
        >>> for m, u in zip(models, ["un", "sm", "bsgd"]):
        ...     _ = declare(m, u)
        >>> net = StackedNet.from_models(models)
        >>> sub = net.select([2, 0])
        >>> sub.runs, sub.updates, torch.equal(sub.theta[1], net.theta[0])
        (2, ['bsgd', 'un'], True)
        """
        idx = torch.as_tensor(list(index), dtype=torch.long)
        n_par = len(self.parameters())
        out = []
        for k, t in enumerate(self.tensors()):
            s = t.detach().index_select(0, idx)
            out.append(s.requires_grad_() if k < n_par else s)
        return self._rebuild(out, [self.updates[i] for i in index])

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of every tensor (for the bold driver's undo).

        Returns
        -------
        list of torch.Tensor
            Detached clones of :meth:`tensors`, for :meth:`restore`.

        Examples
        --------
        >>> from manifold_nets import Arch1
        >>> from manifold_nets.experiments.stacked import StackedNet
        >>> net = StackedNet.from_models([Arch1(1, 4, 6, 3)] * 2)
        >>> saved = net.snapshot()
        >>> len(saved) == len(net.tensors()), saved[0] is net.W[0]
        (True, False)
        """
        return [t.detach().clone() for t in self.tensors()]

    @torch.no_grad()
    def restore(self, snapshot: list[torch.Tensor], runs: Sequence[int]) -> None:
        """Put runs ``runs`` back to ``snapshot``; the other runs keep their state.

        Parameters
        ----------
        snapshot : list of torch.Tensor
            What :meth:`snapshot` returned (for a stack of the same runs).
        runs : sequence of int
            The runs to put back.

        Examples
        --------
        >>> from manifold_nets import Arch1
        >>> from manifold_nets.experiments.stacked import StackedNet
        >>> net = StackedNet.from_models([Arch1(1, 4, 6, 3)] * 2)
        >>> saved = net.snapshot()
        >>> with torch.no_grad():
        ...     _ = net.theta.add_(1.0)
        >>> net.restore(saved, [1])
        >>> torch.equal(net.theta[0], saved[-1][0]), torch.equal(net.theta[1], saved[-1][1])
        (False, True)
        """
        idx = torch.as_tensor(list(runs), dtype=torch.long)
        for t, s in zip(self.tensors(), snapshot, strict=True):
            t.index_copy_(0, idx, s.index_select(0, idx))

    def model(self, run: int) -> Arch1 | Arch2:
        """Run ``run`` as an ordinary (undeclared) :class:`~manifold_nets.Arch1` /
        :class:`~manifold_nets.Arch2` module.

        Parameters
        ----------
        run : int
            The run's index in the stack.

        Returns
        -------
        Arch1 or Arch2
            A new module with copies of the run's weights and running statistics, in the
            stack's dtype; declare it (:func:`manifold_nets.declare`) to train it on.

        Examples
        --------
        >>> from manifold_nets import Arch2, declare
        >>> from manifold_nets.experiments.stacked import StackedNet
        >>> models = [Arch2(depth=1, width=4, in_features=6, num_classes=3) for _ in range(3)]
        >>> for m, u in zip(models, ["un", "sm", "bsgd"]):
        ...     _ = declare(m, u)
        >>> net = StackedNet.from_models(models)
        >>> model = net.model(1)
        >>> type(model).__name__, torch.equal(model.theta, net.theta[1])
        ('Arch2', True)
        >>> x = torch.rand(4, 6)
        >>> torch.allclose(model.eval()(x), net.forward(x)[1], atol=1e-6)
        True
        """
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

        Parameters
        ----------
        x : torch.Tensor
            ``(B, in)`` images, the same for every run.
        train : bool, optional
            Training-mode batch norm (default ``False``).

        Returns
        -------
        torch.Tensor
            ``(R, B, K)`` logits.

        Examples
        --------
        >>> from manifold_nets import Arch2, declare
        >>> from manifold_nets.experiments.stacked import StackedNet
        >>> models = [Arch2(depth=1, width=4, in_features=6, num_classes=3) for _ in range(3)]
        >>> for m, u in zip(models, ["un", "sm", "bsgd"]):
        ...     _ = declare(m, u)
        >>> net = StackedNet.from_models(models)
        >>> x = torch.rand(5, 6)
        >>> logits = net.forward(x)
        >>> logits.shape, torch.allclose(logits[0], models[0].eval()(x), atol=1e-6)
        (torch.Size([3, 5, 3]), True)
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

        Sets ``.grad`` of every parameter to the gradient of its own run's loss
        :math:`L_r = \sum_{b} \mathrm{CE}(f_r(x_b), y_b)` (back-propagation written out
        for this network: the result equals autograd's, ``tests/test_stacked.py``) and
        updates the batch-norm running statistics.

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

        Returns
        -------
        (torch.Tensor, torch.Tensor)
            ``(R,)`` losses and ``(R,)`` numbers of misclassified images of the batch.

        Raises
        ------
        ValueError
            If a 3-D ``x`` without ``groups`` does not hold one mini-batch per run, or if
            ``groups`` does not split the runs in order.

        Examples
        --------
        Each run's gradient is the gradient of its own model's summed loss:

        >>> import torch.nn.functional as F
        >>> from manifold_nets import Arch2
        >>> from manifold_nets.experiments.stacked import StackedNet
        >>> models = [Arch2(depth=2, width=4, in_features=6, num_classes=3) for _ in range(2)]
        >>> net = StackedNet.from_models(models)
        >>> x, y = torch.rand(8, 6), torch.randint(0, 3, (8,))
        >>> loss, wrong = net.loss_and_grad(x, y)
        >>> loss.shape, wrong.shape
        (torch.Size([2]), torch.Size([2]))
        >>> F.cross_entropy(models[1].train()(x), y, reduction="sum").backward()
        >>> torch.allclose(net.W[0].grad[1], models[1].layers[0].linear.weight.grad, atol=1e-5)
        True

        Two mini-batches, one per range of runs:

        >>> xs, ys = torch.rand(2, 8, 6), torch.randint(0, 3, (2, 8))
        >>> net.loss_and_grad(xs, ys, groups=[(0, 1), (1, 2)])[0].shape
        torch.Size([2])
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

    @torch.no_grad()
    def step(self, rate: torch.Tensor) -> None:
        r"""One symmetry-invariant SGD step of every run, from the gradients in ``.grad``.

        Run ``r`` (rate :math:`\eta_r` = ``rate[r]``; 0 freezes it) gets the update
        ``updates[r]`` of Table 1, exactly as :class:`~manifold_nets.InvariantSGD` (and
        :class:`geoopt.optim.RiemannianSGD`) applies it to a model declared with
        :func:`manifold_nets.declare` (momentum 0):

        .. math::

            \begin{aligned}
            &\texttt{bsgd}: && W \leftarrow W - \eta_r \nabla_W L, \quad
                \theta \leftarrow \theta - \eta_r \nabla_\theta L \\
            &\texttt{sm}: && W \leftarrow W - \eta_r\,\mathrm{Diag}(\|w_i\|^2)
                \nabla_W L,\quad \theta \leftarrow \theta - \eta_r \nabla_\theta L\,
                \mathrm{Diag}(\|\theta_{:,j}\|^2) \quad \text{(eqs. (7)-(8))} \\
            &\texttt{un}: && W \leftarrow \mathrm{Orth}(W - \eta_r \Pi_W(\nabla_W L)),
                \quad \theta \leftarrow \theta - \eta_r \nabla_\theta L
                \quad \text{(eq. (9))}
            \end{aligned}

        and batch-norm scale and shift get Euclidean SGD under every update. Each maximal
        slice of runs with one update is one call of
        :func:`manifold_nets.optim.invariant_sgd` with the slice's rates; keep the runs of
        one update side by side so that there are few slices.

        Parameters
        ----------
        rate : torch.Tensor
            ``(R,)`` learning rates, one per run.

        Examples
        --------
        After a step at rate 0.1 the UN run's filters still have unit norm, and a run at
        rate 0 has not moved:

        >>> from manifold_nets import Arch2, declare
        >>> from manifold_nets.experiments.stacked import StackedNet
        >>> models = [Arch2(depth=1, width=4, in_features=6, num_classes=3) for _ in range(3)]
        >>> for m, u in zip(models, ["un", "sm", "bsgd"]):
        ...     _ = declare(m, u)
        >>> net = StackedNet.from_models(models)
        >>> before = net.snapshot()
        >>> _ = net.loss_and_grad(torch.rand(8, 6), torch.randint(0, 3, (8,)))
        >>> net.step(torch.tensor([0.1, 0.1, 0.0]))
        >>> torch.allclose(net.W[0][0].norm(dim=1), torch.ones(4))
        True
        >>> torch.equal(net.W[0][2], before[0][2]), torch.equal(net.W[0][1], before[0][1])
        (True, False)
        """
        rate = rate.to(self.dtype)
        for update, a, b in _segments(self.updates):
            w_kind, theta_kind = _KINDS[update]
            params = [*self.W, self.theta, *self.gamma, *self.beta]
            kinds = [w_kind] * len(self.W) + [theta_kind] + [EUCLIDEAN] * (
                len(self.gamma) + len(self.beta))
            invariant_sgd([p.detach()[a:b] for p in params], [p.grad[a:b] for p in params],
                          [], kinds, lr=rate[a:b], momentum=0.0, dampening=0.0,
                          weight_decay=0.0, nesterov=False, foreach=False)

    def state_dict(self) -> dict:
        """Every tensor and setting, to rebuild the stack with :meth:`from_state_dict`.

        Returns
        -------
        dict
            ``tensors`` (copies of :meth:`tensors`), ``depth``, ``batch_norm``, ``bn_eps``,
            ``bn_momentum`` and ``updates``; :func:`torch.save` writes it as it is.

        Examples
        --------
        >>> from manifold_nets import Arch2, declare
        >>> from manifold_nets.experiments.stacked import StackedNet
        >>> models = [Arch2(depth=1, width=4, in_features=6, num_classes=3) for _ in range(3)]
        >>> for m, u in zip(models, ["un", "sm", "bsgd"]):
        ...     _ = declare(m, u)
        >>> net = StackedNet.from_models(models)
        >>> state = net.state_dict()
        >>> state["depth"], state["batch_norm"], state["updates"], len(state["tensors"])
        (1, True, ['un', 'sm', 'bsgd'], 6)
        """
        return {"tensors": [t.detach().clone() for t in self.tensors()],
                "depth": len(self.W), "batch_norm": self.batch_norm,
                "bn_eps": self.bn_eps, "bn_momentum": self.bn_momentum,
                "updates": list(self.updates)}

    @classmethod
    def from_state_dict(cls, state: dict) -> StackedNet:
        """The stack that :meth:`state_dict` saved.

        Parameters
        ----------
        state : dict
            What :meth:`state_dict` returned.

        Returns
        -------
        StackedNet
            A new stack with copies of the saved tensors (the parameters require grad).

        Examples
        --------
        >>> from manifold_nets import Arch2, declare
        >>> from manifold_nets.experiments.stacked import StackedNet
        >>> models = [Arch2(depth=1, width=4, in_features=6, num_classes=3) for _ in range(3)]
        >>> for m, u in zip(models, ["un", "sm", "bsgd"]):
        ...     _ = declare(m, u)
        >>> net = StackedNet.from_models(models)
        >>> again = StackedNet.from_state_dict(net.state_dict())
        >>> again.updates, all(torch.equal(a, b) for a, b in zip(again.tensors(), net.tensors()))
        (['un', 'sm', 'bsgd'], True)
        """
        L, bn = state["depth"], state["batch_norm"]
        n_par = L * (3 if bn else 1) + 1
        tensors = [t.clone().requires_grad_() if k < n_par else t.clone()
                   for k, t in enumerate(state["tensors"])]
        return cls._assemble(tensors, L, bn, state["bn_eps"], state["bn_momentum"],
                             state["updates"])


def _segments(updates: Sequence[str]) -> list[tuple[str, int, int]]:
    """Maximal slices ``(update, start, stop)`` of runs with the same update."""
    out: list[tuple[str, int, int]] = []
    for i, u in enumerate(updates):
        if out and out[-1][0] == u:
            out[-1] = (u, out[-1][1], i + 1)
        else:
            out.append((u, i, i + 1))
    return out


# --------------------------------------------------------------------------------------
# Evaluation and the loop.


@torch.no_grad()
def error_rates(net: StackedNet, x: torch.Tensor, y: torch.Tensor,
                chunk: int | None = None) -> list[float]:
    """Per run, the fraction of misclassified images (evaluation mode), as
    :func:`~manifold_nets.experiments.engines.error_rate`: non-finite logits count as
    errors. All runs see the same images; ``chunk`` images at a time (default: about 16 MB
    of activations).

    Parameters
    ----------
    net : StackedNet
        The runs.
    x, y : torch.Tensor
        ``(n, in)`` images and ``(n,)`` labels.
    chunk : int, optional
        Images per forward pass.

    Returns
    -------
    list of float
        One error rate per run, in the order of ``net``.

    Examples
    --------
    >>> from manifold_nets import Arch1
    >>> from manifold_nets.experiments.engines import error_rate
    >>> from manifold_nets.experiments.stacked import StackedNet, error_rates
    >>> models = [Arch1(depth=1, width=4, in_features=6, num_classes=3) for _ in range(2)]
    >>> x, y = torch.rand(50, 6), torch.randint(0, 3, (50,))
    >>> rates = error_rates(StackedNet.from_models(models), x, y, chunk=16)
    >>> rates == [error_rate(m, x, y) for m in models]
    True
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
