r"""UN and SM on sharded models: FSDP2 that keeps every parameter's manifold.

``torch.distributed.fsdp.fully_shard`` (FSDP2) replaces every parameter by a
:class:`~torch.distributed.tensor.DTensor` holding a shard of it: ``Shard(0)``, so every
row (filter) lives whole on one rank. The new parameters do not carry the manifold that
:func:`manifold_nets.declare` gave the old ones, and an optimiser that reads it would take
the Euclidean path in silence. Here:

- :func:`fully_shard` is ``fully_shard`` that puts every parameter's manifold back on its
  sharded parameter (and marks the others Euclidean);
- :func:`reattach_manifolds` does the same for a model sharded by torch's ``fully_shard``
  after :func:`~manifold_nets.declare`;
- :class:`~manifold_nets.InvariantSGD` updates sharded parameters exactly as one process
  updates the whole ones: UN and the left SM metric act row by row on each rank's shard;
  the right SM metric of :math:`\theta` needs the norms of its columns, whose entries are
  spread over the ranks, and sums their squares across the shard group. It refuses a
  sharded parameter whose manifold was lost, rather than step it as Euclidean;
- :func:`check_on_manifold` checks, after loading state (for instance a
  ``torch.distributed.checkpoint`` saved on any number of ranks), that every UN filter
  has unit norm, on every rank at once;
- :func:`lost_manifolds` names the parameters that an optimiser reading
  :class:`geoopt.ManifoldParameter` types (geoopt's ``RiemannianSGD`` and
  ``RiemannianAdam``) or manifold attributes (``InvariantSGD``) would step as Euclidean.
  geoopt's optimisers cannot be fixed from here: on a sharded model use ``InvariantSGD``.

The examples of the functions run in one process, on a process group of one rank
(``gloo``, CPU); on several processes the code is the same.

Examples
--------
Each of two processes (``torchrun --nproc-per-node=2``)::

    model = MyNet()
    declare(model, "un")
    for block in model.blocks:
        manifold_nets.distributed.fully_shard(block)
    manifold_nets.distributed.fully_shard(model)
    opt = InvariantSGD(model.parameters(), lr=1e-2, momentum=0.9)
"""

from __future__ import annotations

import geoopt
import torch
from torch import nn

from .declare import DECLARATION_ATTR
from .optim import is_dtensor

__all__ = ["check_on_manifold", "fully_shard", "lost_manifolds", "reattach_manifolds"]


def _manifold_of(p: torch.Tensor):
    """The non-Euclidean manifold a parameter carries, or ``None``."""
    manifold = getattr(p, "manifold", None)
    return None if manifold is None or type(manifold) is geoopt.Euclidean else manifold


def _reattach(module: nn.Module, manifolds: dict) -> None:
    for name, p in module.named_parameters(remove_duplicate=False):
        if is_dtensor(p):
            p.manifold = manifolds.get(name)


def fully_shard(module: nn.Module, **kwargs):
    """:func:`torch.distributed.fsdp.fully_shard`, keeping every parameter's manifold.

    Parameters
    ----------
    module : nn.Module
        a module (or a block of one) declared with :func:`~manifold_nets.declare`, or with
        :class:`geoopt.ManifoldParameter` weights set by hand; shard the blocks first and
        the root last, as with torch's ``fully_shard``
    **kwargs
        passed to torch's ``fully_shard`` (``mesh``, ``reshard_after_forward``, ...)

    Returns
    -------
    nn.Module
        what torch's ``fully_shard`` returns (the same module, now an ``FSDPModule``).
        Its sharded parameters carry their manifold (``p.manifold``; ``None`` for the
        Euclidean ones), which :class:`~manifold_nets.InvariantSGD` reads.

    Examples
    --------
    >>> import torch
    >>> import torch.distributed as dist
    >>> from manifold_nets import Arch2, InvariantSGD, declare
    >>> from manifold_nets.distributed import fully_shard
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> net = Arch2(depth=1, width=4, in_features=3, num_classes=2)
    >>> _ = declare(net, "un")
    >>> _ = fully_shard(net.layers[0])
    >>> _ = fully_shard(net)
    >>> w = net.layers[0].linear.weight
    >>> type(w).__name__, str(w.manifold)
    ('DTensor', 'Oblique(ndim=1) manifold')
    >>> opt = InvariantSGD(net.parameters(), lr=0.1)
    >>> net(torch.randn(8, 3)).sum().backward()
    >>> opt.step()
    >>> torch.allclose(w.full_tensor().detach().norm(dim=1), torch.ones(4))
    True
    >>> dist.destroy_process_group()
    """
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    manifolds = {name: _manifold_of(p)
                 for name, p in module.named_parameters(remove_duplicate=False)}
    out = torch_fully_shard(module, **kwargs)
    _reattach(module, manifolds)
    return out


def reattach_manifolds(model: nn.Module) -> list[str]:
    """Put back the manifolds of a model that torch's ``fully_shard`` sharded after
    :func:`~manifold_nets.declare`; returns the names of the parameters given one.

    The manifolds come from the :class:`~manifold_nets.declare.Declaration` that
    :func:`~manifold_nets.declare` kept on the model. Every sharded parameter gets its
    manifold, or ``None`` (Euclidean); parameters that are not sharded are left alone.

    Parameters
    ----------
    model : nn.Module
        the declared model, after torch's ``fully_shard``

    Returns
    -------
    list of str
        the names of the parameters that got a (non-Euclidean) manifold, sorted

    Raises
    ------
    ValueError
        if the model was not declared with :func:`~manifold_nets.declare` (its
        declaration is what says which manifold each parameter had).

    Examples
    --------
    >>> import torch.distributed as dist
    >>> from torch.distributed.fsdp import fully_shard as torch_fully_shard
    >>> from manifold_nets import Arch2, declare
    >>> from manifold_nets.distributed import lost_manifolds, reattach_manifolds
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> net = Arch2(depth=1, width=4, in_features=3, num_classes=2)
    >>> _ = declare(net, "sm")
    >>> _ = torch_fully_shard(net)
    >>> lost_manifolds(net)  # doctest: +NORMALIZE_WHITESPACE
    {'layers.0.linear.weight': 'geoopt, InvariantSGD',
     'classifier.weight': 'geoopt, InvariantSGD'}
    >>> reattach_manifolds(net)
    ['classifier.weight', 'layers.0.linear.weight']
    >>> sorted(set(lost_manifolds(net).values()))  # InvariantSGD finds them again
    ['geoopt']
    >>> dist.destroy_process_group()
    """
    declaration = getattr(model, DECLARATION_ATTR, None)
    if declaration is None:
        raise ValueError(
            "reattach_manifolds: this model was not declared with manifold_nets.declare, so "
            "the manifolds its sharded parameters lost are unknown. Fix: declare the model "
            "before sharding it, and shard with manifold_nets.distributed.fully_shard.")
    manifolds = {name: _manifold_of_declared(m) for name, m in declaration.items()}
    _reattach(model, manifolds)
    return sorted(name for name, m in manifolds.items() if m is not None)


def _manifold_of_declared(manifold):
    return None if manifold is None or type(manifold) is geoopt.Euclidean else manifold


def lost_manifolds(model: nn.Module) -> dict[str, str]:
    """The parameters of a declared model that some optimiser would step as Euclidean.

    Parameters
    ----------
    model : nn.Module
        a model declared with :func:`~manifold_nets.declare`, sharded or not

    Returns
    -------
    dict
        parameter name -> who loses its manifold: ``"geoopt"`` (the parameter carries its
        manifold, but is no :class:`geoopt.ManifoldParameter`: geoopt's optimisers read the
        type, so they step it as Euclidean), or ``"geoopt, InvariantSGD"`` (it carries no
        manifold at all: :class:`~manifold_nets.InvariantSGD` refuses it when it is
        sharded). Empty when every declared manifold is where both look for it.

    Raises
    ------
    ValueError
        if the model was not declared with :func:`~manifold_nets.declare`.

    Examples
    --------
    >>> from manifold_nets import Arch2, declare
    >>> from manifold_nets.distributed import lost_manifolds
    >>> net = Arch2(depth=1, width=4, in_features=3, num_classes=2)
    >>> _ = declare(net, "un")
    >>> lost_manifolds(net)
    {}
    """
    declaration = getattr(model, DECLARATION_ATTR, None)
    if declaration is None:
        raise ValueError("lost_manifolds: this model was not declared with "
                         "manifold_nets.declare; there is nothing to compare with.")
    params = dict(model.named_parameters(remove_duplicate=False))
    out = {}
    for name, manifold in declaration.items():
        if _manifold_of_declared(manifold) is None or name not in params:
            continue
        p = params[name]
        if isinstance(p, (geoopt.ManifoldParameter, geoopt.ManifoldTensor)):
            continue
        out[name] = "geoopt" if _manifold_of(p) is not None else "geoopt, InvariantSGD"
    return out


def check_on_manifold(model: nn.Module) -> None:
    """Raise :class:`ValueError` unless every filter of every parameter on an
    :class:`~manifold_nets.ObliqueManifold` has unit norm (within
    :data:`~manifold_nets.manifolds.UNIT_NORM_TOL`).

    Call it after loading state into a model, sharded or not: geoopt and
    ``torch.distributed.checkpoint`` load weights without a look, and UN would then train
    another network. On a sharded model every rank checks its own filters and the counts
    are summed over the default process group, so every rank raises (a collective: call it
    on every rank).

    Parameters
    ----------
    model : nn.Module
        the model, sharded or not; only parameters that carry an
        :class:`~manifold_nets.ObliqueManifold` are checked

    Raises
    ------
    ValueError
        naming each parameter (and, when sharded, the rank's shard) whose filters are off
        the unit sphere, with the first such filter, its norm and how many are off; or
        how many filters on other ranks are off

    Examples
    --------
    >>> import torch
    >>> from manifold_nets import Arch2, declare
    >>> from manifold_nets.distributed import check_on_manifold
    >>> net = Arch2(depth=1, width=4, in_features=3, num_classes=2)
    >>> _ = declare(net, "un")
    >>> check_on_manifold(net)
    >>> with torch.no_grad():
    ...     net.layers[0].linear.weight[2] *= 3
    >>> check_on_manifold(net)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: filter 2 of `layers.0.linear.weight` has norm 3, not 1 ...
    """
    import torch.distributed as dist

    from .manifolds import ObliqueManifold, check_unit_norm, unit_norm_violations

    problems, counts, sharded = [], [], False
    for name, p in model.named_parameters():
        manifold = _manifold_of(p)
        if not isinstance(manifold, ObliqueManifold):
            continue
        w = p.to_local() if is_dtensor(p) else p
        sharded = sharded or is_dtensor(p)
        count = unit_norm_violations(w, manifold.ndim)[0]
        counts.append(count)
        if count:
            where = f" (rank {dist.get_rank()}'s shard)" if is_dtensor(p) else ""
            try:
                check_unit_norm(w, manifold.ndim, name)
            except ValueError as err:
                problems.append(str(err).replace(f"`{name}`", f"`{name}`{where}", 1))
    if sharded and dist.is_available() and dist.is_initialized():
        total = torch.tensor(counts, dtype=torch.int64)
        dist.all_reduce(total)
        if int(total.sum()) and not problems:
            problems.append(f"{int(total.sum())} filters on other ranks are off the oblique "
                            "manifold (their ranks name them).")
    if problems:
        raise ValueError(" ".join(problems) + " Fix: load the state of a UN run of this "
                         "model, or declare the model with the update the state was made "
                         "with.")
