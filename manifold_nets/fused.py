r"""The fused per-filter step of :class:`~manifold_nets.InvariantSGD` (a C++ kernel).

The UN and SM steps need per-filter reductions (inner products, norms). Written with
torch's (foreach) kernels they take a dozen passes over the parameters; the kernel in
``manifold_nets/csrc/fused_step.cpp`` finishes one filter at a time while it is in cache,
so the parameter, its gradient and its momentum buffer are each read and written once,
as for SGD with momentum. It is built with torch's extension tools the first time it is
needed (a C++ compiler and ninja; about a minute, cached under
``~/.cache/torch_extensions``) and runs on CPU tensors of float32 or float64 whose
filters are contiguous blocks (contiguous tensors, and ``channels_last`` conv weights;
see :func:`refusal`).

Without a compiler, or when the build fails, :class:`~manifold_nets.InvariantSGD` warns
once and takes its pure-torch step (the same iterates, to rounding, slower). Set
``MANIFOLD_NETS_FUSED=0`` to never build or use the kernel.

Examples
--------
Whether this machine has the kernel, and why not if it does not:

>>> from manifold_nets import fused
>>> fused.available() == (fused.reason() is None)
True
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

__all__ = ["available", "eligible", "load", "reason", "refusal"]

_SOURCE = Path(__file__).parent / "csrc" / "fused_step.cpp"
#: Reassociation lets the compiler vectorise the per-filter sums (in another order than
#: torch's, which changes the last bits); NaN and inf keep their IEEE meaning. OpenMP is
#: how ``at::parallel_for`` spreads the filters over torch's threads.
_CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math",
           "-fno-signed-zeros", "-fno-trapping-math", "-fopenmp"]
_STATE: dict = {"module": None, "reason": None, "tried": False}


def load():
    """The compiled kernel module, building it on first use; ``None`` if it cannot be had
    (then :func:`reason` says why, and a warning was issued once).

    The first call in a process compiles ``csrc/fused_step.cpp`` with torch's C++
    extension tools, or loads it from torch's extension cache; later calls return the
    same answer at once. Nothing is built when ``MANIFOLD_NETS_FUSED=0``.

    Returns
    -------
    module or None
        the extension module, whose ``fused_step`` performs one parameter's step; ``None``
        when the kernel is disabled or could not be built

    Warns
    -----
    RuntimeWarning
        once, when the build fails (not when it is disabled)

    Examples
    --------
    >>> from manifold_nets import fused
    >>> module = fused.load()
    >>> module is None or hasattr(module, "fused_step")
    True
    >>> (module is None) == (not fused.available())
    True
    """
    if _STATE["tried"]:
        return _STATE["module"]
    _STATE["tried"] = True
    if os.environ.get("MANIFOLD_NETS_FUSED", "1") == "0":
        _STATE["reason"] = "MANIFOLD_NETS_FUSED=0"
        return None
    if shutil.which("ninja") is None:  # the ninja wheel installs next to the interpreter
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent),
                                              os.environ.get("PATH", "")])
    cause, fix = _missing()
    if cause is None:
        try:
            from torch.utils import cpp_extension

            _STATE["module"] = cpp_extension.load(
                name="manifold_nets_fused", sources=[str(_SOURCE)],
                extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"], verbose=False)
            return _STATE["module"]
        except Exception as err:  # a failed build: say so, go on
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            cause = f"the build failed: {type(err).__name__}: {first}"
            fix = ("see the compiler's messages with `python -c \"import "
                   "torch.utils.cpp_extension as c; c.load('manifold_nets_fused', "
                   f"['{_SOURCE}'], extra_cflags={_CFLAGS}, extra_ldflags=['-fopenmp'], "
                   "verbose=True)\"`")
    _STATE["reason"] = cause
    warnings.warn(
        f"manifold-nets: the fused UN/SM step is not available ({cause}); InvariantSGD "
        f"takes its pure-torch step instead (the same iterates, slower). Fix: {fix}, or "
        "set MANIFOLD_NETS_FUSED=0 to use the pure-torch step without this warning.",
        RuntimeWarning, stacklevel=3)
    return _STATE["module"]


def _missing() -> tuple[str | None, str | None]:
    """What the build lacks, checked before it starts: ``(cause, fix)``, or ``(None,
    None)``."""
    if not _SOURCE.is_file():
        return (f"the kernel source {_SOURCE} is missing from the installed package",
                "reinstall manifold-nets from a wheel or sdist that ships csrc/fused_step.cpp")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return (f"no C++ compiler: {compiler!r} is not on PATH",
                "install one (e.g. `apt-get install g++`) or point CXX at it")
    if shutil.which("ninja") is None:
        return ("ninja is not on PATH", "`pip install ninja` (a dependency of manifold-nets)")
    return None, None


def available() -> bool:
    """Whether the fused kernel can be used (builds it on first call).

    Returns
    -------
    bool
        ``True`` when :func:`load` gives the kernel module

    Examples
    --------
    >>> from manifold_nets import fused
    >>> fused.available() in (True, False)
    True
    """
    return load() is not None


def reason() -> str | None:
    """Why the kernel is not available, or ``None``.

    Returns
    -------
    str or None
        ``"MANIFOLD_NETS_FUSED=0"``, or the first line of the build error, prefixed by its
        type; ``None`` when the kernel is available

    Examples
    --------
    >>> from manifold_nets import fused
    >>> (fused.reason() is None) == fused.available()
    True
    """
    load()
    return _STATE["reason"]


def eligible(param: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor | None, lr,
             kind=None) -> bool:
    """Whether one parameter can take the fused step (:func:`refusal` gives no reason).

    Parameters
    ----------
    param : torch.Tensor
        the parameter
    grad : torch.Tensor
        its gradient (dense, of the parameter's dtype)
    buf : torch.Tensor or None
        its momentum buffer, or ``None`` (no momentum, or not created yet)
    lr : float or torch.Tensor
        the learning rate; a 1-D Tensor (one rate per run) is not taken
    kind : manifold_nets.optim.Kind, optional
        the parameter's update (default: UN on the last dim)

    Returns
    -------
    bool
        whether :class:`~manifold_nets.InvariantSGD` may give this parameter to the kernel;
        the others take the pure-torch step

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.fused import eligible
    >>> w, g = torch.randn(4, 3), torch.randn(4, 3)
    >>> eligible(w, g, None, 0.1)
    True
    >>> eligible(w.t(), g.t(), None, 0.1), eligible(w, g, None, torch.tensor([0.1, 0.2]))
    (False, False)
    """
    return refusal(param, grad, buf, lr, kind) is None


def refusal(param: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor | None, lr,
            kind=None) -> str | None:
    """Why the fused kernel cannot take one parameter's step, or ``None`` if it can.

    The kernel takes CPU float32 / float64 tensors with a float or 0-dim
    Tensor rate, where each filter is one contiguous block of memory and the gradient
    and momentum buffer are laid out as the parameter. Every contiguous tensor qualifies,
    and so does a ``channels_last`` conv weight under UN or SM's left metric (each filter
    ``(in, kh, kw)`` is still one block, its entries in another order, which per-filter
    sums do not see). SM's right metric reduces over columns and needs contiguous tensors.

    Parameters
    ----------
    param, grad, buf, lr
        as for :func:`eligible`
    kind : manifold_nets.optim.Kind, optional
        the parameter's update (default: UN on the last dim)

    Returns
    -------
    str or None
        the reason, in words, or ``None``

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.fused import refusal
    >>> from manifold_nets.optim import Kind
    >>> un = Kind("oblique", (-3, -2, -1), ndim=3)
    >>> w = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    >>> refusal(w, torch.randn_like(w), None, 0.1, un) is None
    True
    >>> refusal(w.bfloat16(), torch.randn_like(w).bfloat16(), None, 0.1, un)
    'the kernel takes float32 and float64 parameters, not torch.bfloat16'
    """
    ndim = kind.ndim if kind is not None else 1
    right = kind is not None and kind.name == "sm" and kind.side == "right"
    if load() is None:
        return f"the kernel is not available ({reason()})"
    if param.device.type != "cpu":
        return f"the kernel runs on the CPU, the parameter is on {param.device}"
    if param.dtype not in (torch.float32, torch.float64):
        return f"the kernel takes float32 and float64 parameters, not {param.dtype}"
    if isinstance(lr, torch.Tensor) and lr.dim() > 0:
        return "a 1-D Tensor rate (one rate per run) is not taken"
    if grad.is_sparse or grad.dtype != param.dtype:
        return "the gradient is sparse or of another dtype"
    if right and not (param.is_contiguous() and grad.is_contiguous()
                      and (buf is None or buf.is_contiguous())):
        return "SM's right metric needs contiguous tensors"
    if not _filter_blocks(param, ndim):
        return (f"its filters are not contiguous blocks of memory (strides "
                f"{param.stride()}); call .contiguous() on it")
    for name, t in (("gradient", grad), ("momentum buffer", buf)):
        if t is not None and not _same_layout(param, t):
            return (f"its {name} is laid out otherwise (strides {t.stride()}, the "
                    f"parameter's {param.stride()})")
    return None


def _filter_blocks(t: torch.Tensor, ndim: int) -> bool:
    """Whether every filter (the last ``ndim`` dims) of ``t`` is one contiguous block of
    memory, the blocks in the row-major order of the leading dims."""
    if not _dense(t):
        return False
    lead = max(t.dim() - ndim, 0)
    expected = 1
    for d in range(lead, t.dim()):
        expected *= t.size(d)
    for d in reversed(range(lead)):
        if t.size(d) != 1 and t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s entries fill a block of memory without gaps or overlaps (in any
    order of its dims)."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride(), strict=True)
                               if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``b`` has ``a``'s shape and its entries in the same places in memory."""
    return a.shape == b.shape and a.stride() == b.stride()
