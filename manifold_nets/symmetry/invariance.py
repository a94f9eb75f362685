r"""Whether a loss and an update respect a rescaling: measured, and predicted by theory.

Measurements (numbers, not pass/fail): :func:`loss_invariance`,
:func:`update_invariance` (``k`` optimiser steps from :math:`w` and from :math:`g.w`) and
:func:`orbit_orthogonality` (:math:`\langle \nabla L, \xi(w)\rangle`). :func:`predict`
derives from a group's generators whether an update *should* be equivariant.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import geoopt
import numpy as np
import torch
from torch import nn

from ..roles import table1_manifolds
from ..table1 import check_update
from .groups import Rescaling, RescalingGroup, basis_csr

__all__ = [
    "TOLERANCES",
    "summed_cross_entropy",
    "loss_invariance",
    "update_invariance",
    "orbit_orthogonality",
    "predict",
]


#: ``(invariant below, broken above)``: relative gaps; in between the verdict is "unclear".
TOLERANCES = {torch.float64: (1e-9, 1e-5), torch.float32: (1e-4, 1e-2)}


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The paper's loss: cross-entropy *summed* over the mini-batch.

    Parameters
    ----------
    logits : torch.Tensor
        ``(N, C)`` (or ``(N, C, ...)``) unnormalised scores.
    targets : torch.Tensor
        ``(N,)`` (or ``(N, ...)``) class indices.

    Returns
    -------
    torch.Tensor
        The 0-d sum of the per-sample cross-entropies.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.symmetry import summed_cross_entropy
    >>> loss = summed_cross_entropy(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))
    >>> round(float(loss), 4)  # 4 log 2
    2.7726
    """
    return nn.functional.cross_entropy(logits, targets, reduction="sum")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative gap ``||a - b|| / ||b||`` (``inf`` if anything is not finite)."""
    gap = (a - b).norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny)
    gap = float(gap)
    return gap if math.isfinite(gap) else math.inf


# -- measurements -----------------------------------------------------------------------
def _outputs(model: nn.Module, inputs: torch.Tensor, train: bool) -> torch.Tensor:
    m = copy.deepcopy(model).train(train)
    with torch.no_grad():
        return m(inputs)


def loss_invariance(model: nn.Module, element: Rescaling, inputs: torch.Tensor,
                    targets: torch.Tensor, loss: Callable = summed_cross_entropy) -> dict:
    r"""How much :math:`g` changes the loss and the outputs.

    Returns
    -------
    dict
        ``loss``, ``loss_g``: :math:`L(w)`, :math:`L(g.w)` (train mode, batch statistics);
        ``loss_gap``: :math:`|L(g.w) - L(w)| / |L(w)|`; ``output_gap``: relative gap of the
        logits in eval mode (running statistics) and ``output_gap_train`` in train mode.
        ``model`` is not modified.

    Parameters
    ----------
    model : torch.nn.Module
        The model at :math:`w` (not modified).
    element : Rescaling
        The group element :math:`g`.
    inputs : torch.Tensor
        A batch :math:`X`.
    targets : torch.Tensor
        Its labels.
    loss : callable
        ``loss(outputs, targets)`` (default :func:`summed_cross_entropy`).

    Examples
    --------
    The paper's group of eqs. (1)-(2) leaves the loss of Arch1 unchanged:

    >>> import torch
    >>> from manifold_nets import Arch1
    >>> from manifold_nets.symmetry import arch1_paper_group, loss_invariance
    >>> net = Arch1(depth=2, width=4, in_features=3, num_classes=2).double()
    >>> x = torch.randn(8, 3, dtype=torch.float64)
    >>> y = torch.randint(0, 2, (8,))
    >>> g = arch1_paper_group(net).element(alpha=[3.0], beta_s=[0.5, 2.0])
    >>> gaps = loss_invariance(net, g, x, y)
    >>> gaps["loss_gap"] < 1e-12, gaps["output_gap"] < 1e-12
    (True, True)
    """
    g_model = element.apply(model)
    out, out_g = _outputs(model, inputs, True), _outputs(g_model, inputs, True)
    l0, l1 = float(loss(out, targets)), float(loss(out_g, targets))
    gap = abs(l1 - l0) / max(abs(l0), 1e-300)
    return dict(loss=l0, loss_g=l1, loss_gap=gap if math.isfinite(gap) else math.inf,
                output_gap_train=_rel(out_g, out),
                output_gap=_rel(_outputs(g_model, inputs, False),
                                _outputs(model, inputs, False)))


def _train(model, optimizer, inputs, targets, steps, loss):
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss(model(inputs), targets).backward()
        optimizer.step()


def _flat_params(model, project: bool) -> torch.Tensor:
    parts = []
    for p in model.parameters():
        x = p.detach()
        if project and isinstance(p, geoopt.ManifoldParameter):
            x = p.manifold.projx(x)
        parts.append(x.reshape(-1))
    return torch.cat(parts)


def update_invariance(model: nn.Module, element: Rescaling,
                      make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                      inputs: torch.Tensor, targets: torch.Tensor, steps: int = 3,
                      loss: Callable = summed_cross_entropy) -> dict:
    r"""Run ``steps`` optimiser steps from :math:`w` and from :math:`g.w` and compare.

    ``make_optimizer(net)`` builds the optimiser for a copy of the model; it may call
    :func:`manifold_nets.declare` first, and a UN declaration projects :math:`g.w` onto the
    oblique manifold (this is the UN trajectory "from :math:`g.w`").

    An update is *equivariant* when :math:`\mathrm{steps}(g.w) = g.\mathrm{steps}(w)`. With
    :math:`x_k` the iterates from :math:`w` and :math:`y_k` from :math:`g.w`:

    .. math::

        \text{param\_gap} = \frac{\|P(g.x_k) - y_k\|}{\|y_k\|}, \qquad
        \text{output\_gap} = \frac{\|f_{x_k}(X) - f_{y_k}(X)\|}{\|f_{y_k}(X)\|}

    where :math:`P` projects every ``ManifoldParameter`` of :math:`y_k` onto its manifold
    (the identity for SM, renormalisation for UN), and the outputs are in train mode (batch
    statistics, the function being trained: UN renormalises the filters of :math:`g.w` but
    not the batch-norm running statistics). Both are zero for an equivariant update; the
    output gap is the basis-free one.

    Returns
    -------
    dict
        ``param_gap``, ``output_gap`` after ``steps``; ``start_output_gap`` (before any step,
        non-zero when the declaration itself breaks the symmetry); ``gap``: the larger of
        ``param_gap`` and ``output_gap``.

    Parameters
    ----------
    model : torch.nn.Module
        The model at :math:`w` (not modified: both runs start from copies).
    element : Rescaling
        The group element :math:`g`.
    make_optimizer : callable
        ``make_optimizer(net)`` returns the optimiser of ``net`` (e.g.
        :meth:`manifold_nets.audit.UpdateRule.make`, which declares ``net`` first).
    inputs : torch.Tensor
        The batch every step uses (full-batch steps, no randomness).
    targets : torch.Tensor
        Its labels.
    steps : int
        Optimiser steps from each start.
    loss : callable
        ``loss(outputs, targets)`` (default :func:`summed_cross_entropy`).

    Examples
    --------
    SM is equivariant under the paper's group; Euclidean SGD is not (Table 1):

    >>> import torch
    >>> from manifold_nets import Arch1
    >>> from manifold_nets.symmetry import arch1_paper_group, update_invariance
    >>> net = Arch1(depth=2, width=4, in_features=3, num_classes=2).double()
    >>> x = torch.randn(8, 3, dtype=torch.float64)
    >>> y = torch.randint(0, 2, (8,))
    >>> import geoopt
    >>> from manifold_nets import declare
    >>> def sgd(update):  # declare a copy for the update, then plain geoopt SGD
    ...     return lambda m: (declare(m, update),
    ...                       geoopt.optim.RiemannianSGD(m.parameters(), lr=1e-2))[1]
    >>> g = arch1_paper_group(net).element(alpha=[3.0], beta_s=[0.5, 2.0])
    >>> update_invariance(net, g, sgd("sm"), x, y, steps=2)["gap"] < 1e-12
    True
    >>> update_invariance(net, g, sgd("bsgd"), x, y, steps=2)["gap"] > 1e-3
    True
    """
    a = copy.deepcopy(model)
    b = element.apply(model)
    opt_a, opt_b = make_optimizer(a), make_optimizer(b)
    start = _rel(_outputs(a, inputs, True), _outputs(b, inputs, True))
    _train(a, opt_a, inputs, targets, steps, loss)
    _train(b, opt_b, inputs, targets, steps, loss)
    ga = element.apply_(a)  # a is ours: transform in place
    for p_ga, p_b in zip(ga.parameters(), b.parameters(), strict=True):
        if isinstance(p_b, geoopt.ManifoldParameter):
            with torch.no_grad():
                p_ga.copy_(p_b.manifold.projx(p_ga.detach()))
    pgap = _rel(_flat_params(ga, False), _flat_params(b, False))
    ogap = _rel(_outputs(ga, inputs, True), _outputs(b, inputs, True))
    return dict(param_gap=pgap, output_gap=ogap, start_output_gap=start,
                gap=max(pgap, ogap))


def orbit_orthogonality(model: nn.Module, group: RescalingGroup, inputs: torch.Tensor,
                        targets: torch.Tensor, loss: Callable = summed_cross_entropy
                        ) -> torch.Tensor:
    r"""For every generator :math:`\xi_k`, the cosine between :math:`\nabla L` and the orbit.

    .. math:: c_k = \frac{|\langle \nabla_w L, \xi_k(w) \rangle|}
        {\|\nabla_w L\|\, \|\xi_k(w)\|}

    Zero for a true symmetry (the loss is constant along the orbit); train mode, on a copy.

    Parameters
    ----------
    model : torch.nn.Module
        The model at :math:`w` (not modified).
    group : RescalingGroup
        The group whose generators :math:`\xi_k` are tested.
    inputs : torch.Tensor
        A batch.
    targets : torch.Tensor
        Its labels.
    loss : callable
        ``loss(outputs, targets)`` (default :func:`summed_cross_entropy`).

    Returns
    -------
    torch.Tensor
        ``(group.dim,)``: the cosines :math:`c_k`, in the model's dtype.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets import Arch1
    >>> from manifold_nets.symmetry import arch1_paper_group, orbit_orthogonality
    >>> net = Arch1(depth=2, width=4, in_features=3, num_classes=2).double()
    >>> x = torch.randn(8, 3, dtype=torch.float64)
    >>> y = torch.randint(0, 2, (8,))
    >>> c = orbit_orthogonality(net, arch1_paper_group(net), x, y)
    >>> tuple(c.shape), bool(c.max() < 1e-12)
    ((3,), True)
    """
    net = copy.deepcopy(model).train()
    params = dict(net.named_parameters())
    net.zero_grad()
    loss(net(inputs), targets).backward()
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}
    gnorm = torch.sqrt(sum(g.square().sum() for g in grads.values()))
    out = []
    with torch.no_grad():
        for xi in group.generators():
            t = group.space.tangent(xi.to(next(net.parameters()).device), params)
            dot = sum((grads[n] * v).sum() for n, v in t.items())
            tnorm = torch.sqrt(sum(v.square().sum() for v in t.values()))
            out.append(dot.abs() / (gnorm * tnorm).clamp_min(torch.finfo(gnorm.dtype).tiny))
    return torch.stack(out)


# -- predictions from theory -----------------------------------------------------------------
def predict(update: str, group: RescalingGroup, model: nn.Module, tol: float = 1e-6,
            manifolds: dict | None = None, *, options: dict | None = None,
            zero_buffer: bool = False) -> bool:
    r"""Does the theory say that ``update`` is equivariant under ``group``?

    With each generator acting on a weight as :math:`(r_i + c_j) W_{ij}`:

    - **SM** (eqs. (7)-(8)): the row metric :math:`\mathrm{Diag}(\|w_i\|^2)^{-1}` is
      invariant iff the columns of every filter weight are scaled by one common factor
      (:math:`c` constant); the column metric of :math:`\theta` iff its rows are
      (:math:`r` constant); every Euclidean parameter must be left alone. Momentum and
      Nesterov keep this (the buffer transforms like the gradient); RiemannianAdam too
      (its second moment is the per-filter norm :math:`\|w_i\|^2 \|\nabla_{w_i}\|^2`).
    - Under UN, a Euclidean parameter may be scaled where it is zero (a bias at its usual
      initial value): the scaled zero is still zero and the projection undoes the rows,
      so the start from :math:`g.w` is the start from :math:`w`. Not under SM: there the
      zero's gradient is scaled too, and its first Euclidean step differs.
    - A Euclidean bias may be scaled with its rows where a batch norm on batch statistics
      follows its layer: the normalisation absorbs its shift, so its gradient is zero and
      it never moves. Under UN also where the batch norm uses running statistics: only
      the bias less the running mean counts, and the projection, which moves the running
      mean with the filter, makes it the same from :math:`w` and from :math:`g.w`.
    - **UN**: the projection removes row scalings of the oblique weights, so the start
      :math:`P(g.w) = w` iff every oblique weight has :math:`c` constant and every
      Euclidean parameter (:math:`\theta`) is left alone; then every optimiser follows the
      same trajectory.
    - **B-SGD**, **B-Adam** and any weight decay: only the trivial group. So is SM with
      geoopt's momentum buffer (its first step adds :math:`\mu \nabla L`, see
      :class:`manifold_nets.audit.UpdateRule`), unless ``zero_buffer``.

    Parameters
    ----------
    update : {"bsgd", "sm", "un"}
        The update of Table 1, as :func:`~manifold_nets.declare.declare` declares it.
    group : RescalingGroup
        The group; each generator is read weight by weight.
    model : torch.nn.Module
        The model (a copy is declared to read the manifold of every weight).
    tol : float
        Entries of a generator within ``tol`` of each other (or of zero) count as equal.
    manifolds : dict, optional
        ``{parameter name: manifold}``, as :func:`~manifold_nets.roles.table1_manifolds`
        gives it (computed here when not given); pass it when predicting many groups of
        one model, so that it is planned once.
    options : dict, optional
        The optimiser's options that matter: ``momentum`` and ``weight_decay``
        (geoopt's ``RiemannianSGD`` and ``RiemannianAdam``).
    zero_buffer : bool
        The momentum buffers start at zero (not at geoopt's Euclidean gradient).

    Returns
    -------
    bool
        ``True`` when the update is predicted to be equivariant under every element (every
        condition is checked on all generators at once, weight by weight).

    Examples
    --------
    Table 1: SM resolves the paper's group of Arch1 but not the full group:

    >>> from manifold_nets import Arch1
    >>> from manifold_nets.symmetry import arch1_full_group, arch1_paper_group, predict
    >>> net = Arch1(depth=2, width=4, in_features=3, num_classes=2)
    >>> predict("sm", arch1_paper_group(net), net), predict("sm", arch1_full_group(net), net)
    (True, False)
    >>> predict("sm", arch1_paper_group(net), net, options=dict(weight_decay=1e-2))
    False
    """
    check_update(update)
    options = options or {}
    if manifolds is None:
        manifolds = table1_manifolds(model, update)
    euclidean_mixed = options.get("weight_decay", 0) > 0 or (
        options.get("momentum", 0) > 0 and not zero_buffer)
    trivial_only = update == "bsgd" or (update == "sm" and euclidean_mixed)
    # a batch norm on batch statistics absorbs the shift of the bias before it: that
    # bias's gradient is zero, it never moves, and scaling it breaks nothing. On running
    # statistics, only the bias less the running mean counts, and UN's projection (which
    # moves the running mean with the filter) makes that the same from w and from g.w
    absorbing = {name for name, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 and (update == "un" or m.training or not m.track_running_stats)}
    params = dict(model.named_parameters(remove_duplicate=False))

    def scales(name: str | None, r) -> bool:
        """Does some generator scale entries of the Euclidean ``name`` that matter (``r``:
        its rows' log-scales, one column per generator, sparse)? Under UN only nonzero
        ones do (see above)."""
        if name is None:
            return False
        moved = np.asarray(abs(r).max(1).toarray()).reshape(-1) > tol
        if update != "un":
            return bool(moved.any())
        return bool(params[name].detach()[torch.from_numpy(moved)].ne(0).any())

    def constant(x) -> bool:  # in every generator (column)
        return x.shape[0] == 0 or x.nnz == 0 or float(
            (x.max(0) - x.min(0)).toarray().max()) <= tol

    if group.dim == 0:
        return True
    # each condition must hold for every generator: checked on all columns at once,
    # on the sparse rows of each weight (a vocabulary's rows would not fit densely)
    basis = basis_csr(group.basis)
    for site in group.space.sites:
        r = basis[site.row_offset:site.row_offset + site.rows]
        c = basis[site.col_offset:site.col_offset + site.cols]
        manifold = manifolds[site.weight]
        if site.kind == "norm":
            if scales(site.weight, r) or scales(site.bias, r):
                return False  # normalisation parameters are Euclidean
            continue
        if site.batchnorm not in absorbing and scales(site.bias, r):
            return False  # biases are Euclidean: their rows must not be scaled
        moves = not (constant(r) and constant(c)
                     and (c.shape[0] == 0 or float(abs(r[0] + c[0]).max()) <= tol))
        if trivial_only or isinstance(manifold, geoopt.Euclidean):
            if moves:
                return False
        elif getattr(manifold, "side", "left") == "right":
            if not constant(r):
                return False
        elif not constant(c):
            return False
    return True


