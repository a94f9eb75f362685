r"""InvariantAdam: the UN and SM updates for Adam, exactly AdamW on every other parameter.

Most models are trained with AdamW. Its direction :math:`\hat m / (\sqrt{\hat v} +
\epsilon)` does not change when a gradient is multiplied by a constant, so the step it
takes on a filter has the same size whatever the filter's norm: under the rescaling
:math:`w_i \to a_i w_i` that batch norm (or a ReLU with the next layer) makes a symmetry,
AdamW's trajectory is not the rescaled trajectory. :class:`InvariantAdam` applies the
paper's two geometries to Adam:

- **UN** (:class:`~manifold_nets.ObliqueManifold`): Riemannian Adam on each filter's
  sphere. The gradient is projected on the tangent space,
  :math:`r = \Pi_x(g) = g - \langle x, g \rangle x`; the first moment accumulates
  :math:`r` and is carried to the new tangent space by projection after every step; the
  second moment is one number per filter, :math:`v_i \leftarrow \beta_2 v_i + (1 -
  \beta_2)\, \|r_i\|^2 / n_i` (the mean square of the filter's tangent gradient, so that
  :math:`\epsilon` and the rate keep Adam's per-entry scale); the step
  :math:`x \leftarrow \mathrm{Orth}(x - \gamma\, \hat m / (\sqrt{\hat v} + \epsilon))`
  retracts by normalisation. A per-filter :math:`v` is a scalar on the sphere: it needs no
  transport, keeps the step tangent, and treats every direction of a filter's sphere
  alike; ``second_moment="entry"`` gives Adam's per-entry :math:`v` instead (its
  direction is projected on the tangent space before the retraction).
- **SM** (:class:`~manifold_nets.DiagScaledEuclidean`): Adam in the orthonormal frame of
  the scaled metric (:func:`~manifold_nets.math.scaled_frame`). The Riemannian gradient
  read in that frame is :math:`h_i = \|w_i\|\, g_i` (per column
  :math:`\|\theta_{:,j}\|` for the classifier's right metric); the moments accumulate
  :math:`h`, and the frame's step :math:`d = \hat m / (\sqrt{\hat v} + \epsilon)` is
  taken on the filter as :math:`\|w_i\|\, d_i`. Under :math:`w_i \to a_i w_i` the
  gradient scales by :math:`1/a_i`, so :math:`h`, both moments and :math:`d` are
  unchanged and the step scales by :math:`a_i`: the trajectory from :math:`a w` is
  :math:`a` times the trajectory from :math:`w`, **exactly**, :math:`\epsilon` included
  (it acts on :math:`h`, whose scale does not depend on the filter's). The decoupled
  weight decay :math:`x \leftarrow (1 - \gamma\lambda)\, x` scales with the filter too.
- **Euclidean** parameters (biases, normalisation scales, embeddings, anything not
  declared) take :func:`torch.optim.adam.adam` with ``decoupled_weight_decay=True``, the
  function :class:`torch.optim.AdamW` calls: the same iterates, bit for bit, with the
  same ``foreach`` choice.

Weight decay does nothing on UN filters (a decay :math:`x \to (1 - \gamma\lambda) x` is
undone by the normalisation), so it is not applied to them. The theory page derives the
invariances; ``tests/test_adam.py`` measures them both ways.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam as torch_adam

from .math import (
    column_sqnorm,
    filter_dims,
    filter_sqnorm,
    oblique_proju,
    oblique_projx_,
    scaled_frame,
)
from .optim import (
    Kind,
    ManifoldOptimizer,
    check_fused,
    check_lr,
    check_switches,
    foreach_filter_inner,
    foreach_normalise_,
    grad_problem,
    is_dtensor,
    param_name,
    shard_reducer,
)
from .table1 import KERNEL_KINDS

__all__ = ["InvariantAdam", "invariant_adam"]

#: The second moments of a UN filter :class:`InvariantAdam` offers.
SECOND_MOMENTS = ("filter", "entry")


def _check_adam(lr, betas, eps, weight_decay, second_moment, where: str = "",
                values: bool = True) -> None:
    """The rules of :class:`InvariantAdam`'s arguments (torch's Adam rules, and finite)."""
    try:
        check_lr(lr, values)
        if isinstance(lr, Tensor) and lr.dim() > 0:
            raise ValueError(f"Invalid learning rate: a Tensor of shape {tuple(lr.shape)}; "
                             "InvariantAdam takes a float or a 0-dim Tensor.")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"Invalid betas: {betas!r}; pass two floats in [0, 1).")
        for name, value, high in (("beta parameter at index 0", betas[0], 1.0),
                                  ("beta parameter at index 1", betas[1], 1.0),
                                  ("epsilon value", eps, math.inf),
                                  ("weight_decay value", weight_decay, math.inf)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"Invalid {name}: {value!r}; pass a Python float.")
            if not (0.0 <= value < high and math.isfinite(value)):
                raise ValueError(f"Invalid {name}: {value}")
        if second_moment not in SECOND_MOMENTS:
            raise ValueError(f"Invalid second_moment: {second_moment!r}; choose one of "
                             f"{', '.join(SECOND_MOMENTS)}")
    except (TypeError, ValueError) as err:
        raise type(err)(f"{err}{where}") from None


def _per_filter_zeros(p: Tensor, ndim: int) -> Tensor:
    """Zeros with one entry per filter of ``p`` (its filter dims of size 1); for a sharded
    ``p``, sharded as ``p`` (FSDP2 shards dim 0, so each rank holds its filters')."""
    shape = p.shape[:p.dim() - ndim] + (1,) * ndim
    if not is_dtensor(p):
        return p.new_zeros(shape)
    from torch.distributed.tensor import DTensor

    local = p.to_local()
    zeros = local.new_zeros(local.shape[:local.dim() - ndim] + (1,) * ndim)
    return DTensor.from_local(zeros, p.device_mesh, p.placements, shape=shape,
                              stride=torch.empty(shape, device="meta").stride(),
                              run_check=False)


def _value(lr) -> float:
    return float(lr) if isinstance(lr, Tensor) else lr


class InvariantAdam(ManifoldOptimizer):
    r"""Adam with the UN and SM updates of Table 1; AdamW on every other parameter.

    Each parameter is updated according to its manifold (read once, when it is added;
    again if :func:`~manifold_nets.declare` changed it): UN on
    :class:`~manifold_nets.ObliqueManifold`, SM on
    :class:`~manifold_nets.DiagScaledEuclidean`, :class:`torch.optim.AdamW` (bit for bit)
    on the others. With :math:`t` the parameter's step count and
    :math:`\hat m = m / (1 - \beta_1^t)`, :math:`\hat v = v / (1 - \beta_2^t)`:

    .. math::

        \begin{aligned}
            &\textbf{UN:}\quad r \leftarrow g - \langle x_i, g_i \rangle x_i
                \text{ per filter},\quad m \leftarrow \beta_1 m + (1 - \beta_1) r,\\
            &\qquad v_i \leftarrow \beta_2 v_i + (1 - \beta_2)\, \|r_i\|^2 / n_i,\quad
                x \leftarrow \mathrm{Orth}\big(x - \gamma\, \hat m /
                (\sqrt{\hat v} + \epsilon)\big),\quad
                m \leftarrow \Pi_{x}(m) \\
            &\textbf{SM:}\quad s_i \leftarrow \|x_i\|,\quad h \leftarrow s\, g,\quad
                x \leftarrow (1 - \gamma \lambda)\, x,\quad
                m \leftarrow \beta_1 m + (1 - \beta_1) h,\\
            &\qquad v \leftarrow \beta_2 v + (1 - \beta_2)\, h^2,\quad
                x \leftarrow x - \gamma\, s\, \hat m / (\sqrt{\hat v} + \epsilon)
        \end{aligned}

    (:math:`s` per column of :math:`\theta` for the right SM metric). The module
    docstring explains the choices; the SM trajectory is exactly equivariant under
    :math:`w_i \to a_i w_i`, :math:`\epsilon` and weight decay included.

    Parameters
    ----------
    params : iterable
        parameters or parameter groups (dicts), as for :class:`torch.optim.AdamW`
    lr : float or Tensor
        learning rate :math:`\gamma` (default ``1e-3``); a 0-dim Tensor may change between
        steps
    betas : tuple of float
        :math:`(\beta_1, \beta_2)`, each in ``[0, 1)`` (default ``(0.9, 0.999)``)
    eps : float
        :math:`\epsilon` (default ``1e-8``); for SM it acts in the metric's orthonormal
        frame, so it keeps the invariance
    weight_decay : float
        decoupled weight decay :math:`\lambda` (default ``1e-2``, as AdamW); not applied to
        UN filters, where the normalisation undoes it
    amsgrad : bool
        keep the running maximum of :math:`v` (default False)
    maximize : bool
        maximise the objective (default False)
    foreach : bool, optional
        the multi-tensor implementation, for the UN and SM parameters and (passed on) for
        the Euclidean ones; ``None`` (default): as :class:`torch.optim.AdamW` chooses for
        the Euclidean ones, and the multi-tensor one on CPU and CUDA for the others
    second_moment : {"filter", "entry"}
        UN's second moment: one per filter (default) or one per entry
    fused : bool, optional
        the fused per-filter C++ kernel (:mod:`manifold_nets.fused`) for the UN and SM
        parameters it takes (CPU float32 / float64, each filter a block of memory, a float
        or 0-dim rate). ``None`` (default): where it can, with one warning if the kernel
        cannot be built; ``True``: require it, raising for a UN or SM parameter it cannot
        take; ``False``: never

    Raises
    ------
    ValueError
        a rate, :math:`\epsilon` or weight decay that is negative or not finite; a beta
        outside ``[0, 1)``; an unknown ``second_moment``; a parameter on a manifold it
        cannot update
    TypeError
        a hyper-parameter that is not a number

    Examples
    --------
    >>> import torch
    >>> from manifold_nets import Arch2, InvariantAdam, declare
    >>> net = Arch2(depth=2, width=8, in_features=12, num_classes=3)
    >>> _ = declare(net, "un")
    >>> opt = InvariantAdam(net.parameters(), lr=1e-2)
    >>> x, y = torch.randn(16, 12), torch.randint(3, (16,))
    >>> torch.nn.functional.cross_entropy(net(x), y).backward()
    >>> opt.step()
    >>> torch.allclose(net.layers[0].linear.weight.detach().norm(dim=1), torch.ones(8))
    True
    """

    def __init__(self, params, lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None,
                 second_moment: str = "filter", fused: bool | None = None):
        _check_adam(lr, betas, eps, weight_decay, second_moment)
        check_switches("InvariantAdam", foreach, fused)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                        second_moment=second_moment, fused=fused)
        super().__init__(params, defaults)

    def _gather(self, index: int, group: dict[str, Any]):
        """Group ``index``'s parameters with gradients and their kinds, after checking the
        group's hyper-parameters and every gradient (writes nothing)."""
        lr = group["lr"]
        _check_adam(lr, group["betas"], group["eps"], group["weight_decay"],
                    group["second_moment"], f" (parameter group {index})",
                    values=not (isinstance(lr, Tensor) and lr.device.type != "cpu"))
        kinds = self._group_kinds(index, group)
        rows = []
        for j, (p, kind) in enumerate(zip(group["params"], kinds, strict=True)):
            if p.grad is None:
                continue
            problem = grad_problem(p, p.grad)
            if problem is not None:
                raise RuntimeError(f"InvariantAdam: {param_name(group, index, j, p)}: "
                                   f"{problem}; the step changed nothing.")
            if group.get("fused") and kind.name != "euclidean":
                check_fused("InvariantAdam", group, index, j, p, None, kind)
            rows.append((p, kind))
        return group, rows

    def _state(self, p: Tensor, kind: Kind, group: dict[str, Any]) -> dict:
        """The parameter's state, created on its first step (torch's Adam layout; a UN
        filter's per-filter second moment has one entry per filter)."""
        state = self.state[p]
        if not state:
            from torch.optim.optimizer import _get_scalar_dtype

            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if kind.name == "oblique" and group["second_moment"] == "filter":
                state["exp_avg_sq"] = _per_filter_zeros(p, kind.ndim)
            else:
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns
        the loss, as for :class:`torch.optim.AdamW`.

        Every group's hyper-parameters and every gradient are checked before any parameter
        or state is written: a refused step changes nothing. ``.grad`` is never modified.

        Parameters
        ----------
        closure : callable, optional
            re-evaluates the model (with gradients enabled) and returns the loss

        Returns
        -------
        torch.Tensor or None
            the loss ``closure`` returned, or ``None``

        Raises
        ------
        ValueError, TypeError
            a group's hyper-parameter breaks the constructor's rules
        RuntimeError
            a sparse gradient, or one whose dtype, shape or device is not its parameter's

        Examples
        --------
        SM: a filter twice as long takes a step twice as long in the same direction.

        >>> import torch, geoopt
        >>> from manifold_nets import DiagScaledEuclidean, InvariantAdam
        >>> sm = DiagScaledEuclidean()
        >>> w = geoopt.ManifoldParameter(torch.tensor([[3.0, 4.0]]), manifold=sm)
        >>> v = geoopt.ManifoldParameter(torch.tensor([[6.0, 8.0]]), manifold=sm)
        >>> w.grad, v.grad = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]])
        >>> InvariantAdam([w, v], lr=0.1, weight_decay=0.0).step()
        >>> torch.allclose(2 * w.detach(), v.detach())
        True
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [self._gather(i, g) for i, g in enumerate(self.param_groups)]
        for group, rows in work:
            if not rows:
                continue
            beta1, beta2 = group["betas"]
            hyper = dict(amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
                         weight_decay=group["weight_decay"], eps=group["eps"],
                         maximize=group["maximize"])
            lists: dict[bool, tuple[list, ...]] = {True: ([], [], [], [], [], [], []),
                                                   False: ([], [], [], [], [], [], [])}
            for p, kind in rows:
                state = self._state(p, kind, group)
                euclid = kind.name == "euclidean"
                for lst, item in zip(lists[euclid], (
                        p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                        state.get("max_exp_avg_sq"), state["step"], kind), strict=True):
                    lst.append(item)
            ps, gs, ms, vs, vmaxs, steps, _ = lists[True]
            if ps:
                torch_adam(
                    ps, gs, ms, vs, vmaxs if group["amsgrad"] else [], steps,
                    foreach=group["foreach"], capturable=False, differentiable=False,
                    fused=None, grad_scale=None, found_inf=None,
                    has_complex=any(torch.is_complex(p) for p in ps),
                    decoupled_weight_decay=True, **hyper)
            ps, gs, ms, vs, vmaxs, steps, kinds = lists[False]
            if ps:
                invariant_adam(ps, gs, ms, vs, vmaxs if group["amsgrad"] else [], steps,
                               kinds, foreach=group["foreach"], fused=group.get("fused"),
                               **hyper)
        return loss


def invariant_adam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                   exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor],
                   state_steps: list[Tensor], kinds: list[Kind], *, amsgrad: bool,
                   beta1: float, beta2: float, lr: float | Tensor, weight_decay: float,
                   eps: float, maximize: bool, foreach: bool | None = None,
                   fused: bool | None = False) -> None:
    r"""Functional core of :class:`InvariantAdam` for UN and SM parameters (the class
    gives Euclidean ones to :func:`torch.optim.adam.adam`); see the class for the
    algorithm.

    Updates ``params``, the moments and the step counts in place. A UN parameter's
    ``exp_avg_sq`` has the parameter's shape (one second moment per entry) or one entry
    per filter (the filter dims of size 1).

    Parameters
    ----------
    params, grads : list of torch.Tensor
        the parameters (updated in place) and their Euclidean gradients (not modified)
    exp_avgs, exp_avg_sqs : list of torch.Tensor
        the first and second moments
    max_exp_avg_sqs : list of torch.Tensor
        the running maxima of the second moments (``amsgrad``; else empty)
    state_steps : list of torch.Tensor
        0-dim step counts, incremented here
    kinds : list of Kind
        ``"oblique"`` or ``"sm"`` (:func:`~manifold_nets.optim.kind_of`)
    amsgrad, beta1, beta2, lr, weight_decay, eps, maximize
        as for :class:`InvariantAdam`
    foreach : bool, optional
        the multi-tensor implementation; ``None``: when every parameter is on CPU or CUDA
    fused : bool, optional
        the fused kernel for the parameters it takes (``None``: if it is available;
        ``False``, the default here: never)

    Raises
    ------
    ValueError
        for a Euclidean kind (use :func:`torch.optim.adam.adam`)

    Examples
    --------
    One UN step of a single filter: it stays on the sphere, and its moment stays tangent.

    >>> import torch
    >>> from manifold_nets.adam import invariant_adam
    >>> from manifold_nets.optim import Kind
    >>> x = torch.nn.functional.normalize(torch.randn(2, 3, dtype=torch.float64), dim=1)
    >>> m, v, t = torch.zeros_like(x), torch.zeros(2, 1, dtype=torch.float64), torch.tensor(0.)
    >>> invariant_adam([x], [torch.randn(2, 3, dtype=torch.float64)], [m], [v], [], [t],
    ...                [Kind("oblique", (-1,))], amsgrad=False, beta1=0.9, beta2=0.999,
    ...                lr=0.1, weight_decay=0.0, eps=1e-8, maximize=False)
    >>> torch.allclose(x.norm(dim=1), torch.ones(2, dtype=torch.float64)), float(t)
    (True, 1.0)
    >>> bool((x * m).sum(1).abs().max() < 1e-12)
    True
    """
    if any(k.name == "euclidean" for k in kinds):
        raise ValueError("invariant_adam updates UN and SM parameters; give Euclidean ones "
                         "to torch.optim.adam.adam(..., decoupled_weight_decay=True)")
    hyper = dict(amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=_value(lr),
                 weight_decay=weight_decay, eps=eps, maximize=maximize)
    lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, kinds]
    if any(is_dtensor(p) for p in params):
        _impl("sharded")(*lists, **hyper)
        return
    if fused is not False:
        rest = _impl("fused")(*lists, **hyper)
        if not rest:
            return
        lists = [[lst[i] for i in rest] if lst else lst for lst in lists]
    if foreach is None:
        foreach = all(p.device.type in ("cpu", "cuda") for p in lists[0])
    _impl("multi" if foreach else "single")(*lists, **hyper)


def _single_tensor_invariant_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                  state_steps, kinds, *, amsgrad, beta1, beta2, lr,
                                  weight_decay, eps, maximize, reducers=None) -> None:
    for i, x in enumerate(params):
        kind = kinds[i]
        g = grads[i] if not maximize else -grads[i]
        m, v, t = exp_avgs[i], exp_avg_sqs[i], state_steps[i]
        t += 1
        step = float(t)
        bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
        if kind.name == "oblique":
            r = oblique_proju(x, g, kind.ndim)
            m.lerp_(r, 1 - beta1)
            if v.shape == x.shape:
                v.mul_(beta2).addcmul_(r, r, value=1 - beta2)
            else:
                v.mul_(beta2).add_(r.square().mean(filter_dims(kind.ndim), keepdim=True),
                                   alpha=1 - beta2)
        else:
            reduce = None if reducers is None else reducers[i]
            if reduce is None:
                s = scaled_frame(x, kind.side, kind.ndim)
            else:  # the squared norms summed over the ranks that hold parts of them
                sqnorm = filter_sqnorm if kind.side == "left" else column_sqnorm
                s = reduce(sqnorm(x, kind.ndim)).clamp_max_(torch.finfo(x.dtype).max).sqrt_()
            h = g * s
            if weight_decay != 0:
                x.mul_(1 - lr * weight_decay)
            m.lerp_(h, 1 - beta1)
            v.mul_(beta2).addcmul_(h, h, value=1 - beta2)
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], v, out=max_exp_avg_sqs[i])
            v = max_exp_avg_sqs[i]
        denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
        d = m / denom
        if kind.name == "oblique":
            if v.shape == x.shape:  # a per-entry second moment bends d off the tangent
                d = oblique_proju(x, d, kind.ndim)
            x.add_(d, alpha=-lr / bias1)
            oblique_projx_(x, kind.ndim)
            m.copy_(oblique_proju(x, m, kind.ndim))  # transport by projection
        else:
            x.addcmul_(d, s, value=-lr / bias1)


def _multi_tensor_invariant_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                 state_steps, kinds, *, amsgrad, beta1, beta2, lr,
                                 weight_decay, eps, maximize) -> None:
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        per_entry = exp_avg_sqs[i].shape == p.shape
        groups.setdefault((kinds[i], p.device, p.dtype, per_entry), []).append(i)
    for (kind, _, dtype, per_entry), idx in groups.items():
        xs = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        ms = [exp_avgs[i] for i in idx]
        vs = [exp_avg_sqs[i] for i in idx]
        ts = [state_steps[i] for i in idx]
        torch._foreach_add_(ts, 1)
        steps = [float(t) for t in ts]
        if maximize:
            gs = torch._foreach_neg(gs)
        dims = kind.dims
        if kind.name == "oblique":
            rs = torch._foreach_addcmul(gs, foreach_filter_inner(xs, gs, dims), xs, value=-1)
            torch._foreach_lerp_(ms, rs, 1 - beta1)
            torch._foreach_mul_(vs, beta2)
            if per_entry:
                torch._foreach_addcmul_(vs, rs, rs, value=1 - beta2)
            else:
                torch._foreach_add_(vs, [r.square().mean(dims, keepdim=True) for r in rs],
                                    alpha=1 - beta2)
        else:
            ss = [scaled_frame(x, kind.side, kind.ndim) for x in xs]
            hs = torch._foreach_mul(gs, ss)
            if weight_decay != 0:
                torch._foreach_mul_(xs, 1 - lr * weight_decay)
            torch._foreach_lerp_(ms, hs, 1 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, hs, hs, value=1 - beta2)
        if amsgrad:
            vmax = [max_exp_avg_sqs[i] for i in idx]
            torch._foreach_maximum_(vmax, vs)
            vs = vmax
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** s) for s in steps])
        torch._foreach_add_(denom, eps)
        ds = torch._foreach_div(ms, denom)
        rates = [-lr / (1 - beta1 ** s) for s in steps]
        if kind.name == "oblique":
            if per_entry:
                ds = torch._foreach_addcmul(ds, foreach_filter_inner(xs, ds, dims), xs, value=-1)
            torch._foreach_mul_(ds, rates)
            torch._foreach_add_(xs, ds)
            foreach_normalise_(xs, dims, dtype)
            torch._foreach_addcmul_(ms, foreach_filter_inner(xs, ms, dims), xs, value=-1)
        else:
            torch._foreach_mul_(ds, ss)
            torch._foreach_mul_(ds, rates)
            torch._foreach_add_(xs, ds)


def _sharded_invariant_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                            state_steps, kinds, **hyper) -> None:
    """The single-tensor step on each rank's shard of sharded (DTensor) parameters: UN,
    its per-filter second moment and SM's left metric act filter by filter, and FSDP2
    keeps every filter on one rank; the right metric's column norms are summed across the
    shard group first (:class:`~manifold_nets.InvariantSGD`'s rule)."""
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    reducers = [shard_reducer(p, k) if isinstance(p, DTensor) else None
                for p, k in zip(params, kinds, strict=True)]
    _single_tensor_invariant_adam(
        [local(p) for p in params], [local(g) for g in grads], [local(m) for m in exp_avgs],
        [local(v) for v in exp_avg_sqs], [local(v) for v in max_exp_avg_sqs], state_steps,
        kinds, reducers=reducers, **hyper)


def _fused_invariant_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                          kinds, *, amsgrad, beta1, beta2, lr, weight_decay, eps,
                          maximize) -> list[int]:
    """The fused kernel's step for every parameter it takes; returns the indices of the
    others (all of them when the kernel is not available)."""
    from . import fused as kernel

    if not any(p.device.type == "cpu" for p in params):
        return list(range(len(params)))  # the kernel is for CPU tensors: do not build it
    module = kernel.load()
    if module is None:
        return list(range(len(params)))
    rest = []
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        kind, v = kinds[i], exp_avg_sqs[i]
        key = (kind.name, kind.side)
        per_entry = v.shape == p.shape
        if (key not in KERNEL_KINDS or kernel.refusal(p, g, exp_avgs[i], lr, kind) is not None
                or not (v.stride() == p.stride() if per_entry else v.is_contiguous())):
            rest.append(i)
            continue
        t = state_steps[i]
        t += 1
        step = float(t)
        module.fused_adam_step(p.detach(), g, exp_avgs[i], v,
                               max_exp_avg_sqs[i] if amsgrad else v, KERNEL_KINDS[key],
                               kind.ndim, lr, beta1, beta2, eps, weight_decay, amsgrad,
                               maximize, 1 - beta1 ** step, math.sqrt(1 - beta2 ** step))
    return rest


_IMPLS = {"single": _single_tensor_invariant_adam, "multi": _multi_tensor_invariant_adam,
          "sharded": _sharded_invariant_adam, "fused": _fused_invariant_adam}
#: Under :func:`torch.compile` the UN and SM updates run eagerly (a graph break around
#: them), as :class:`~manifold_nets.InvariantSGD`'s do; Euclidean parameters take torch's
#: compilable Adam.
_EAGER = {k: torch.compiler.disable(f, recursive=True) for k, f in _IMPLS.items()}


def _impl(name: str):
    return _EAGER[name] if torch.compiler.is_compiling() else _IMPLS[name]
