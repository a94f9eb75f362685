r"""The invariance audit: every update rule against every group, prediction beside
measurement (:func:`audit`, :func:`audit_rows`, :func:`format_audit`).

An update rule (:class:`UpdateRule`) is a declaration of Table 1 and a geoopt optimiser,
so this module sits above :mod:`manifold_nets.declare`; the symmetry package below it
measures and predicts from an update's name and options alone.

The prediction is :func:`~manifold_nets.symmetry.invariance.predict`; the measurements are
:func:`~manifold_nets.symmetry.invariance.loss_invariance`,
:func:`~manifold_nets.symmetry.invariance.orbit_orthogonality` and
:func:`~manifold_nets.symmetry.invariance.update_invariance`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import geoopt
import torch
from torch import nn

from .declare import declare
from .symmetry import (
    Rescaling,
    RescalingGroup,
    arch1_full_group,
    arch1_paper_group,
    arch1_untied_pair_group,
    arch2_group,
    discover,
    loss_invariance,
    orbit_orthogonality,
    predict,
    update_invariance,
)
from .symmetry.groups import ScalingSpace
from .symmetry.invariance import TOLERANCES

__all__ = [
    "UpdateRule",
    "UPDATE_RULES",
    "AuditRow",
    "audit",
    "audit_rows",
    "format_audit",
]


# -- the update rules --------------------------------------------------------------------------
@dataclass(frozen=True)
class UpdateRule:
    r"""An update rule for the audit: a Table 1 declaration and a geoopt optimiser.

    ``make(model)`` declares the model and returns the optimiser.

    ``zero_buffer``: start the momentum buffers at zero. geoopt 0.5's ``RiemannianSGD``
    initialises its buffer with the *Euclidean* gradient and then adds the Riemannian one,
    so its first momentum step is :math:`\mu \nabla L + \tilde\nabla L`; a zero buffer
    gives the textbook :math:`\tilde\nabla L`.

    Parameters
    ----------
    name, update, optimizer, lr, options, zero_buffer
        The fields of the same names (see Attributes).

    Attributes
    ----------
    name : str
        The rule's name in the audit's tables, e.g. ``"SM+momentum0"``.
    update : str
        The declaration of :func:`manifold_nets.declare`: ``"bsgd"``, ``"sm"`` or ``"un"``.
    optimizer : str
        ``"sgd"`` (:class:`geoopt.optim.RiemannianSGD`) or ``"adam"``
        (:class:`geoopt.optim.RiemannianAdam`).
    lr : float
        The learning rate.
    options : dict
        Further keyword arguments of the optimiser (``momentum``, ``nesterov``,
        ``weight_decay``, ...).
    zero_buffer : bool
        Start the momentum buffers at zero.

    Examples
    --------
    >>> from manifold_nets.audit import UpdateRule
    >>> rule = UpdateRule("SM+momentum0", "sm", options=dict(momentum=0.9), zero_buffer=True)
    >>> rule.optimizer, rule.lr
    ('sgd', 0.01)
    """

    name: str
    update: str
    optimizer: str = "sgd"  # "sgd" (RiemannianSGD) or "adam" (RiemannianAdam)
    lr: float = 1e-2
    options: dict = field(default_factory=dict)
    zero_buffer: bool = False

    def make(self, model: nn.Module) -> torch.optim.Optimizer:
        """Declare ``model`` for ``update`` and build its optimiser.

        Parameters
        ----------
        model : torch.nn.Module
            The model; its parameters are declared in place (a UN declaration projects
            the filters onto the oblique manifold; the warning about the changed start is
            silenced, since the audit measures exactly that).

        Returns
        -------
        torch.optim.Optimizer
            A :class:`geoopt.optim.RiemannianSGD` or :class:`geoopt.optim.RiemannianAdam` over
            ``model.parameters()``.

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.audit import UpdateRule
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
        ...                           torch.nn.Linear(4, 2))
        >>> opt = UpdateRule("SM", "sm").make(net)
        >>> type(opt).__name__, type(net[0].weight).__name__
        ('RiemannianSGD', 'ManifoldParameter')
        """
        with warnings.catch_warnings():  # a changed start is what the audit measures
            warnings.simplefilter("ignore", UserWarning)
            declare(model, self.update)
        cls = geoopt.optim.RiemannianAdam if self.optimizer == "adam" else \
            geoopt.optim.RiemannianSGD
        opt = cls(model.parameters(), lr=self.lr, **self.options)
        if self.zero_buffer:
            for p in model.parameters():
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return opt

    def predict(self, group: RescalingGroup, model: nn.Module, **kwargs) -> bool:
        """:func:`~manifold_nets.symmetry.invariance.predict` for this rule's update and
        options.

        Parameters
        ----------
        group : RescalingGroup
            The group.
        model : torch.nn.Module
            The model (not modified).
        **kwargs
            ``tol`` and ``manifolds`` of :func:`~manifold_nets.symmetry.invariance.predict`.

        Returns
        -------
        bool
            Whether the theory says this rule is equivariant under ``group``.

        Examples
        --------
        >>> from manifold_nets import Arch1
        >>> from manifold_nets.audit import UPDATE_RULES
        >>> from manifold_nets.symmetry import arch1_paper_group
        >>> net = Arch1(depth=2, width=4, in_features=3, num_classes=2)
        >>> {r.name: r.predict(arch1_paper_group(net), net) for r in UPDATE_RULES[:3]}
        {'B-SGD': False, 'SM': True, 'UN': False}
        """
        return predict(self.update, group, model, options=self.options,
                       zero_buffer=self.zero_buffer, **kwargs)


#: The update rules the audit runs.
UPDATE_RULES = (
    UpdateRule("B-SGD", "bsgd"),
    UpdateRule("SM", "sm"),
    UpdateRule("UN", "un"),
    UpdateRule("SM+momentum(geoopt)", "sm", options=dict(momentum=0.9)),
    UpdateRule("SM+momentum0", "sm", options=dict(momentum=0.9), zero_buffer=True),
    UpdateRule("SM+nesterov0", "sm", options=dict(momentum=0.9, nesterov=True),
               zero_buffer=True),
    UpdateRule("SM+wd", "sm", options=dict(weight_decay=1e-2)),
    UpdateRule("UN+nesterov", "un", options=dict(momentum=0.9, nesterov=True)),
    UpdateRule("B-Adam", "bsgd", "adam", lr=1e-3),
    UpdateRule("SM+Adam", "sm", "adam", lr=1e-3),
)


# -- the audit ---------------------------------------------------------------------------------
@dataclass
class AuditRow:
    """One line of the invariance audit.

    ``measured`` is the relative gap (loss/output, orbit cosine or update gap); ``expected``
    is what the theory predicts (``True``: invariant; ``None``: reported, no prediction);
    ``verdict`` is ``"invariant"``, ``"broken"`` or ``"unclear"`` from the dtype's
    tolerances; ``ok`` says whether the verdict matches the expectation (always true
    without one).

    Parameters
    ----------
    arch, group, check, measured, expected, verdict, ok, detail
        The attributes of the same names (``detail`` defaults to ``""``).

    Attributes
    ----------
    arch : str
        The network, e.g. ``"Arch1 L=2"``.
    group : str
        The group's name (or a control's label).
    check : str
        ``"loss+outputs"``, ``"<grad L, xi(w)>"``, ``"update <rule>"`` or ``"dimension"``.
    measured : float
        The relative gap (or, for ``"dimension"``, the discovered count).
    expected : bool or None
        The prediction: ``True`` invariant, ``False`` broken, ``None`` none.
    verdict : str
        ``"invariant"``, ``"broken"`` or ``"unclear"``
        (:data:`~manifold_nets.symmetry.invariance.TOLERANCES` of the dtype).
    ok : bool
        Whether the verdict matches the expectation.
    detail : str
        The numbers behind the gap, for the table.

    Examples
    --------
    >>> from manifold_nets.audit import AuditRow
    >>> row = AuditRow("Arch1 L=2", "Arch1 paper group", "update SM", 1e-16, True,
    ...                "invariant", True)
    >>> row.ok, row.detail
    (True, '')
    """

    arch: str
    group: str
    check: str
    measured: float
    expected: bool | None
    verdict: str
    ok: bool
    detail: str = ""


def _verdict(value: float, dtype: torch.dtype) -> str:
    inv, broken = TOLERANCES[dtype]
    if value <= inv:
        return "invariant"
    return "broken" if value >= broken or not math.isfinite(value) else "unclear"


def _row(arch, group, check, value, expected, dtype, detail=""):
    verdict = _verdict(value, dtype)
    ok = verdict == ("invariant" if expected else "broken")
    return AuditRow(arch, group, check, value, expected, verdict, ok, detail)


def audit(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
          groups: Sequence[RescalingGroup], rules: Sequence[UpdateRule] = UPDATE_RULES, *,
          controls: Sequence[tuple[str, Rescaling, bool]] = (), steps: int = 3,
          log_scale: float = 1.0, seed: int = 0, arch: str = "model") -> list[AuditRow]:
    r"""Measure every group against every update rule; compare with
    :func:`~manifold_nets.symmetry.invariance.predict`.

    For each group, one random element (log-scale ``log_scale``) is drawn and measured for:
    loss and output invariance (expected: invariant), orbit orthogonality over all
    generators (expected: zero), and ``steps`` steps of every rule
    (:func:`~manifold_nets.symmetry.invariance.update_invariance`, expected:
    :func:`~manifold_nets.symmetry.invariance.predict`). ``controls`` are extra
    ``(label, element, expected_invariant)`` loss checks, e.g. negative scalings.

    Parameters
    ----------
    model : torch.nn.Module
        The model (not modified).
    inputs : torch.Tensor
        The batch of every check; its dtype selects the verdict tolerances.
    targets : torch.Tensor
        Its labels.
    groups : sequence of RescalingGroup
        The groups to measure.
    rules : sequence of UpdateRule
        The update rules (default: all of
        :data:`UPDATE_RULES`).
    controls : sequence of (str, Rescaling, bool)
        Extra loss checks: a label, an element and whether the loss should be invariant.
    steps : int
        Optimiser steps per update check.
    log_scale : float
        The group elements have log-scales ``log_scale * N(0, 1)``.
    seed : int
        Seeds the group elements.
    arch : str
        The model's name in the rows.

    Returns
    -------
    list of AuditRow
        Per group: one loss row, one orbit row and one row per rule; then one row per
        control.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets import Arch1
    >>> from manifold_nets.audit import UPDATE_RULES, audit
    >>> from manifold_nets.symmetry import arch1_paper_group
    >>> _ = torch.manual_seed(0)
    >>> net = Arch1(depth=2, width=4, in_features=3, num_classes=2).double()
    >>> x = torch.randn(16, 3, dtype=torch.float64)
    >>> y = torch.randint(0, 2, (16,))
    >>> rules = [r for r in UPDATE_RULES if r.name in ("B-SGD", "SM")]
    >>> rows = audit(net, x, y, [arch1_paper_group(net)], rules)
    >>> [(r.check, r.verdict, r.ok) for r in rows]  # doctest: +NORMALIZE_WHITESPACE
    [('loss+outputs', 'invariant', True), ('<grad L, xi(w)>', 'invariant', True),
     ('update B-SGD', 'broken', True), ('update SM', 'invariant', True)]
    """
    dtype = inputs.dtype
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for group in groups:
        g = group.sample(log_scale, gen).calibrate(model, inputs)
        li = loss_invariance(model, g, inputs, targets)
        rows.append(_row(arch, group.name, "loss+outputs", max(li["loss_gap"], li["output_gap"]),
                         True, dtype, f"loss {li['loss']:.4g} -> {li['loss_g']:.4g}"))
        orth = orbit_orthogonality(model, group, inputs, targets)
        rows.append(_row(arch, group.name, "<grad L, xi(w)>", float(orth.max()), True, dtype,
                         f"max over {group.dim} generators"))
        for rule in rules:
            ui = update_invariance(model, g, rule.make, inputs, targets, steps)
            rows.append(_row(arch, group.name, f"update {rule.name}", ui["gap"],
                             rule.predict(group, model), dtype,
                             f"params {ui['param_gap']:.1e} outputs {ui['output_gap']:.1e} "
                             f"(start {ui['start_output_gap']:.1e})"))
    for label, element, expected in controls:
        li = loss_invariance(model, element, inputs, targets)
        rows.append(_row(arch, label, "loss+outputs", max(li["loss_gap"], li["output_gap"]),
                         expected, dtype, f"loss {li['loss']:.4g} -> {li['loss_g']:.4g}"))
    return rows


def audit_rows(arch: int = 1, depth: int = 2, *, width: int = 64, in_features: int = 784,
               num_classes: int = 10, batch: int = 100, steps: int = 3,
               dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu",
               seed: int = 0, log_scale: float = 1.0, bn_eps: float = 1e-30,
               discover_inputs: int = 0, rules: Sequence[UpdateRule] = UPDATE_RULES
               ) -> list[AuditRow]:
    r"""The invariance audit of Arch1 or Arch2 on random Gaussian data.

    Groups: Arch1's paper group and full group, or Arch2's group; plus the group found by
    :func:`~manifold_nets.symmetry.discover.discover`. Controls that must *break* the
    loss: an untied pooling pair and a negative :math:`\beta` (Arch1); negative row
    scalings and, with ``eps = 1e-5``, rows scaled by ``1e-3`` (Arch2), beside the same
    scaling with ``eps = 1e-30`` (invariant).

    Parameters
    ----------
    arch, depth, width, in_features, num_classes
        the network (:class:`manifold_nets.Arch1` / :class:`manifold_nets.Arch2`)
    batch : int
        mini-batch size of the checks (standard Gaussian inputs, random labels). Gaussian
        rather than pixel-like inputs: all-positive inputs make each pooling pair's winner
        almost constant, which adds spurious directions to
        :func:`~manifold_nets.symmetry.discover.discover`.
    steps : int
        optimiser steps per update check
    dtype, device
        where to compute; the verdict tolerances depend on ``dtype``
    seed : int
        seeds the network, the data and the group elements
    log_scale : float
        group elements have log-scales ``log_scale * N(0, 1)``
    bn_eps : float
        Arch2's batch-norm ``eps`` for the group checks. Default ``1e-30``: torch refuses
        ``eps = 0`` in training, and PyTorch's ``1e-5`` already moves the outputs by about
        ``3e-4`` (relative) for log-scales of order 1, which is a real but small breaking
        of eq. (3). The ``eps`` rows use ``1e-5`` and ``1e-30``.
    discover_inputs : int
        inputs for :func:`~manifold_nets.symmetry.discover.discover` (default: enough for
        the candidate count)
    rules : sequence of UpdateRule
        the update rules (default: all of
        :data:`UPDATE_RULES`)

    Returns
    -------
    list of AuditRow
        The rows of :func:`audit` for every group and control, the ``eps`` rows (Arch2)
        and a last ``"dimension"`` row: the discovered count beside the theory's.

    Raises
    ------
    ValueError
        If ``arch`` is neither 1 nor 2.

    Notes
    -----
    With few inputs or a small ``in_features``, a pooling pair's winner may never change
    on the batch; the untied-pair control is then a symmetry of that batch and its rows
    are not ``ok``. Keep ``batch`` and ``in_features`` large enough (the defaults are).

    Examples
    --------
    A tiny Arch1 against two rules; every expectation holds:

    >>> from manifold_nets.audit import UPDATE_RULES, audit_rows, format_audit
    >>> rules = [r for r in UPDATE_RULES if r.name in ("B-SGD", "SM")]
    >>> rows = audit_rows(1, 2, width=4, in_features=8, num_classes=3, batch=64, rules=rules)
    >>> print(format_audit(rows).splitlines()[-1])
    15/15 expectations hold (1 rows reported without a prediction)
    """
    from .nets import Arch1, Arch2

    gen = torch.Generator().manual_seed(seed)
    if arch == 1:
        net = Arch1(depth, width, in_features, num_classes, generator=gen)
    elif arch == 2:
        net = Arch2(depth, width, in_features, num_classes, bn_eps=bn_eps, generator=gen)
    else:
        raise ValueError(f"arch must be 1 or 2, got {arch!r}")
    net = net.to(device=device, dtype=dtype)
    x = torch.randn(batch, in_features, generator=gen, dtype=dtype).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    label = f"Arch{arch} L={depth}"
    if arch == 1:
        groups = [arch1_paper_group(net), arch1_full_group(net)]
    else:
        groups = [arch2_group(net)]
        groups[0].name += f" (eps={bn_eps:g})"
    n_disc = discover_inputs or 2 * ScalingSpace(net).dim // num_classes + 64
    xd = torch.randn(n_disc, in_features, generator=gen, dtype=dtype).to(device)
    # Discover on the audit batch too: a direction that is a symmetry only of other data
    # (a pooling pair whose winner never changes there) would fail the checks on ``x``.
    found = discover(net, torch.cat([x, xd]))
    disc = found.group(net)
    disc.name = f"discovered (dim {found.dim})"
    groups.append(disc)
    rows = audit(net, x, y, groups, rules, steps=steps, log_scale=log_scale, seed=seed,
                 arch=label)
    # controls: loss and orbit must break
    names, theta = [n for n, _ in net.named_filters()], "classifier.weight"
    space = ScalingSpace(net)
    controls = []
    if arch == 1:
        untied = arch1_untied_pair_group(net)
        controls.append((untied.name, untied.from_coords([1.0]), False))
        orth = orbit_orthogonality(net, untied, x, y)
        rows.append(_row(label, untied.name, "<grad L, xi(w)>", float(orth.max()), False,
                         dtype, "one generator"))
        beta = torch.ones(width, dtype=torch.float64)
        beta[:2] = -1.0
        theta_c = torch.ones(width // 2, dtype=torch.float64)
        theta_c[0] = -1.0
        controls.append(("negative beta_1 (control)",
                         Rescaling(space, {names[-1]: (beta, None), theta: (None, theta_c)},
                                   allow_negative=True), False))
    else:
        signs = torch.ones(width, dtype=torch.float64)
        signs[::2] = -1.0
        controls.append(("negative A entries (control)",
                         Rescaling(space, {n: (signs, None) for n in names},
                                   allow_negative=True), False))
    rows += audit(net, x, y, [], rules=(), controls=controls, arch=label)
    if arch == 2:
        small = Rescaling(space, {n: (torch.full((width,), 1e-3), None) for n in names})
        for eps, expected in ((1e-5, False), (1e-30, True)):
            net_eps = Arch2(depth, width, in_features, num_classes, bn_eps=eps)
            net_eps.load_state_dict(net.state_dict())
            net_eps = net_eps.to(device=device, dtype=dtype)
            li = loss_invariance(net_eps, small, x, y)
            rows.append(_row(label, f"rows x 1e-3, eps={eps:g}", "loss+outputs",
                             max(li["loss_gap"], li["output_gap"]), expected, dtype,
                             f"loss {li['loss']:.4g} -> {li['loss_g']:.4g}"))
    # Arch1: one scale per pooling pair and layer (the full group). Arch2: one per filter,
    # and its batch norms' channels per pooling pair against the next layer's columns.
    theory = depth * (width // 2 if arch == 1 else width + width // 2)
    local = found.dim - theory
    for r in rows:
        if "discovered" in r.group:
            r.detail = r.detail or str(found)
            if local:
                # Directions that are symmetries of these inputs only to first order (a
                # pooling pair whose winner never changes on them, a dead unit): finite
                # group elements along them may change the loss, so no prediction is made.
                r.expected, r.ok = None, True
                r.detail += f"; not counted: {local:+d} data-local directions"
    rows.append(AuditRow(label, disc.name, "dimension", float(found.dim), None,
                         f"{found.dim} vs {theory}", True,
                         f"theory {theory}; {found}"))
    return rows


def format_audit(rows: Sequence[AuditRow]) -> str:
    """The audit as a fixed-width table, one line per row, with a summary line.

    Parameters
    ----------
    rows : sequence of AuditRow
        The rows of :func:`audit` or :func:`audit_rows`.

    Returns
    -------
    str
        A header, one line per row (``ok`` is ``yes``, ``NO`` or ``-`` without a
        prediction) and ``"<held>/<predicted> expectations hold ..."``.

    Examples
    --------
    >>> from manifold_nets.audit import AuditRow, format_audit
    >>> rows = [AuditRow("Arch1 L=2", "paper", "update SM", 1e-16, True, "invariant", True),
    ...         AuditRow("Arch1 L=2", "paper", "update B-SGD", 0.5, False, "broken", True)]
    >>> print(format_audit(rows))
    arch       group  check         gap      expected   measured   ok   detail
    Arch1 L=2  paper  update SM     1.0e-16  invariant  invariant  yes
    Arch1 L=2  paper  update B-SGD  5.0e-01  broken     broken     yes
    2/2 expectations hold (0 rows reported without a prediction)
    """
    head = ("arch", "group", "check", "gap", "expected", "measured", "ok", "detail")
    cells = [(r.arch, r.group, r.check, f"{r.measured:.1e}",
              {True: "invariant", False: "broken", None: "-"}[r.expected], r.verdict,
              "-" if r.expected is None else "yes" if r.ok else "NO", r.detail)
             for r in rows]
    widths = [max(len(c[i]) for c in cells + [head]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)).rstrip()
              for cell in cells]
    counted = [r for r in rows if r.expected is not None]
    bad = sum(not r.ok for r in counted)
    lines.append(f"{len(counted) - bad}/{len(counted)} expectations hold"
                 + ("" if not bad else f"; {bad} do NOT")
                 + f" ({len(rows) - len(counted)} rows reported without a prediction)")
    return "\n".join(lines)


