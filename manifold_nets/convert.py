"""Layers that hold their filters in another layout, converted to the ones manifold-nets
rescales and declares.

Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's projections, and those of
the models built on it) computes ``x @ W + b`` with ``W`` of shape ``(in, out)``: an
output unit's filter is a *column* of ``W``, where :class:`torch.nn.Linear` keeps it as a
row. :func:`conv1d_to_linear` replaces every such layer by the ``nn.Linear`` that computes
the same function, after which :func:`~manifold_nets.declare`,
:func:`~manifold_nets.symmetry.discover` and the optimisers treat it like any other
linear layer. :func:`is_conv1d` is how the rest of the library recognises the layer
(without importing ``transformers``) to refuse it with a pointer here.
"""

from __future__ import annotations

from torch import nn

__all__ = ["is_conv1d", "conv1d_to_linear", "refuse_conv1d"]


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers`` ``Conv1D``: weight ``(in, out)``.

    Recognised by its class name, its ``nf`` (the number of outputs) and its weight's
    shape, so that ``transformers`` need not be installed.

    Parameters
    ----------
    module : torch.nn.Module
        Any module.

    Returns
    -------
    bool
        True for a ``Conv1D``-like layer whose weight is ``(in, nf)``.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.convert import is_conv1d
    >>> is_conv1d(torch.nn.Linear(3, 4))
    False
    """
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)
            and isinstance(w, nn.Parameter) and w.dim() == 2 and w.shape[1] == module.nf)


def refuse_conv1d(model: nn.Module, what: str, skip=()) -> None:
    """Raise if ``model`` holds a ``Conv1D`` (other than the modules named in ``skip``):
    its filters are columns, which would be rescaled or normalised as rows.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    what : str
        What refuses it, for the message (e.g. ``"declare(update='un')"``).
    skip : collection of str, optional
        Module names to leave alone (their manifolds were given explicitly).

    Raises
    ------
    ValueError
        Naming the ``Conv1D`` modules and :func:`conv1d_to_linear`.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.convert import refuse_conv1d
    >>> refuse_conv1d(torch.nn.Linear(3, 4), "this")  # nothing to refuse
    """
    found = [name for name, mod in model.named_modules() if is_conv1d(mod) and name not in skip]
    if found:
        shown = ", ".join(repr(n) for n in found[:3]) + (
            f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise ValueError(
            f"{what}: {shown} {'is a' if len(found) == 1 else 'are'} transformers Conv1D "
            "(weight (in, out): each output unit's filter is a column, not a row). "
            "Convert them first with manifold_nets.convert.conv1d_to_linear(model), which "
            "keeps the model's outputs.")


def conv1d_to_linear(model: nn.Module) -> list[str]:
    """Replace every ``Conv1D`` of ``model`` by the ``nn.Linear`` that computes the same
    function, in place.

    The new layer's weight is ``W.T`` (so ``linear(x) = x @ W + b`` up to the rounding of
    a different matrix-product kernel), its bias the same tensor, on the same device and
    dtype, with the same ``requires_grad``. Module names, and so parameter names, are
    kept: ``transformer.h.0.attn.c_attn.weight`` is still the fused QKV projection, now
    ``(out, in)``. A weight that several ``Conv1D`` share stays shared.

    Convert before building the optimiser (its parameters are new tensors) and before
    :func:`~manifold_nets.declare`. A state dict saved afterwards holds these weights
    transposed with respect to the ``transformers`` checkpoint layout: transpose them back
    (``state[name] = state[name].T`` for every returned name's ``.weight``) to load it into
    the original model class.

    Parameters
    ----------
    model : torch.nn.Module
        The model; changed in place.

    Returns
    -------
    list of str
        The names of the converted modules, in ``named_modules`` order (empty when there
        is none).

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.convert import conv1d_to_linear
    >>> class Conv1D(torch.nn.Module):  # transformers.pytorch_utils.Conv1D's layout
    ...     def __init__(self, nf, nx):
    ...         super().__init__()
    ...         self.nf = nf
    ...         self.weight = torch.nn.Parameter(torch.randn(nx, nf))
    ...         self.bias = torch.nn.Parameter(torch.randn(nf))
    ...     def forward(self, x):
    ...         return x @ self.weight + self.bias
    >>> net = torch.nn.Sequential(Conv1D(4, 3), torch.nn.ReLU())
    >>> x = torch.randn(2, 3)
    >>> before = net(x)
    >>> conv1d_to_linear(net)
    ['0']
    >>> net[0]
    Linear(in_features=3, out_features=4, bias=True)
    >>> torch.allclose(net(x), before)
    True
    """
    targets = [(name, mod) for name, mod in model.named_modules() if is_conv1d(mod)]
    if targets and not targets[0][0]:
        raise ValueError("the model itself is a Conv1D: wrap it in a module first")
    made: dict[int, nn.Parameter] = {}
    for name, mod in targets:
        w = mod.weight
        weight = made.get(id(w))
        if weight is None:
            weight = nn.Parameter(w.detach().T.contiguous(), requires_grad=w.requires_grad)
            made[id(w)] = weight
        linear = nn.Linear(w.shape[0], w.shape[1], bias=mod.bias is not None,
                           device="meta")
        linear.weight = weight
        if mod.bias is not None:
            linear.bias = mod.bias
        linear.train(mod.training)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, linear)
    return [name for name, _ in targets]
