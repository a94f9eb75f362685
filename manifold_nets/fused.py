r"""The fused per-filter step of :class:`~manifold_nets.InvariantSGD` (a C++ kernel).

The UN and SM steps need per-filter reductions (inner products, norms). Written with
torch's (foreach) kernels they take a dozen passes over the parameters; the kernel in
``manifold_nets/csrc/fused_step.cpp`` finishes one filter at a time while it is in cache,
so the parameter, its gradient and its momentum buffer are each read and written once,
as for SGD with momentum. It is built with torch's extension tools the first time it is
needed (a C++ compiler and ninja; about a minute, cached under
``~/.cache/torch_extensions``) and runs on contiguous CPU tensors of float32 or float64.

Without a compiler, or when the build fails, :class:`~manifold_nets.InvariantSGD` warns
once and takes its pure-torch step (the same iterates, to rounding, slower). Set
``MANIFOLD_NETS_FUSED=0`` to never build or use the kernel.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

__all__ = ["KINDS", "available", "eligible", "load", "reason"]

#: The kernel's kinds, by :class:`~manifold_nets.optim.Kind` name and side. Euclidean
#: parameters keep torch's SGD arithmetic (``InvariantSGD`` is ``torch.optim.SGD`` on them,
#: bit for bit), which is already a few streaming passes, so the kernel's Euclidean branch
#: (kind 0) is not used.
KINDS = {("oblique", "left"): 1, ("sm", "left"): 2, ("sm", "right"): 3}

_SOURCE = Path(__file__).parent / "csrc" / "fused_step.cpp"
#: Reassociation lets the compiler vectorise the per-filter sums (in another order than
#: torch's, which changes the last bits); NaN and inf keep their IEEE meaning. OpenMP is
#: how ``at::parallel_for`` spreads the filters over torch's threads.
_CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math",
           "-fno-signed-zeros", "-fno-trapping-math", "-fopenmp"]
_STATE: dict = {"module": None, "reason": None, "tried": False}


def load():
    """The compiled kernel module, building it on first use; ``None`` if it cannot be had
    (then :func:`reason` says why, and a warning was issued once)."""
    if _STATE["tried"]:
        return _STATE["module"]
    _STATE["tried"] = True
    if os.environ.get("MANIFOLD_NETS_FUSED", "1") == "0":
        _STATE["reason"] = "MANIFOLD_NETS_FUSED=0"
        return None
    try:
        from torch.utils import cpp_extension

        if shutil.which("ninja") is None:  # the ninja wheel installs next to the interpreter
            os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent),
                                                  os.environ.get("PATH", "")])
        _STATE["module"] = cpp_extension.load(
            name="manifold_nets_fused", sources=[str(_SOURCE)],
            extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # no compiler, no ninja, a failed build: say so, go on
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        _STATE["reason"] = f"{type(err).__name__}: {first}"
        warnings.warn(
            f"manifold-nets: the fused UN/SM step could not be built ({_STATE['reason']}); "
            "InvariantSGD takes its pure-torch step instead (the same iterates, slower). "
            "Fix: install a C++ compiler and ninja, or set MANIFOLD_NETS_FUSED=0 to use "
            "the pure-torch step without this warning.", RuntimeWarning, stacklevel=3)
    return _STATE["module"]


def available() -> bool:
    """Whether the fused kernel can be used (builds it on first call)."""
    return load() is not None


def reason() -> str | None:
    """Why the kernel is not available, or ``None``."""
    load()
    return _STATE["reason"]


def eligible(param: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor | None, lr) -> bool:
    """Whether one parameter can take the fused step: contiguous CPU float32 / float64
    tensors (no sharded ones) and a float (or 0-dim Tensor) rate."""
    return (param.device.type == "cpu" and param.dtype in (torch.float32, torch.float64)
            and param.is_contiguous()
            and grad.is_contiguous() and grad.dtype == param.dtype and not grad.is_sparse
            and (buf is None or buf.is_contiguous())
            and not (isinstance(lr, torch.Tensor) and lr.dim() > 0))
