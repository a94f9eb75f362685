"""What the UN update of the MLP's four filter banks costs, path by path.

Times, per call, on the shapes of Arch2 with 4 layers of 64 filters (one thread), the
library's own step, :func:`manifold_nets.optim.invariant_sgd` (momentum 0):

- ``fused``: the fused per-filter kernel (:mod:`manifold_nets.fused`), which
  :class:`manifold_nets.InvariantSGD` takes by default where it is built;
- ``foreach``: the multi-tensor path (``InvariantSGD(fused=False)``);
- ``loop``: the single-tensor path (the reference, which calls :mod:`manifold_nets.math`);
- ``compiled``: the single-tensor path compiled by ``torch.compile`` (inductor; needs a
  C++ compiler; the compile time is printed). It compiles without momentum only
  (``manifold_nets.optim._EAGER`` says why), so ``InvariantSGD`` itself runs its update
  eagerly inside compiled code;
- ``sgd``: one ``torch._foreach_add_``, the whole of a ``foreach`` SGD step's arithmetic.

Usage::

    python benchmarks/un_update_kernels.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from manifold_nets.optim import Kind, _single_tensor_invariant_sgd, invariant_sgd

SHAPES = [(64, 784), (64, 32), (64, 32), (64, 32)]
LR = 1e-7
UN = Kind("oblique", (-1,), 1)


def un_step(ps, gs, lr, foreach: bool, fused: bool = False):
    invariant_sgd(ps, gs, [], [UN] * len(ps), lr=lr, momentum=0.0, dampening=0.0,
                  weight_decay=0.0, nesterov=False, foreach=foreach, fused=fused)


def sgd_foreach(ps, gs, lr):
    torch._foreach_add_(ps, gs, alpha=-LR)


def time_us(fn, ps, gs, lr, calls=2000) -> float:
    for _ in range(50):
        fn(ps, gs, lr)
    start = time.perf_counter()
    for _ in range(calls):
        fn(ps, gs, lr)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ps = [torch.nn.functional.normalize(torch.randn(s), dim=-1) for s in SHAPES]
    gs = [torch.randn(s) for s in SHAPES]
    lr = torch.tensor(LR)
    start = time.time()
    def raw_step(ps, gs, lr):
        _single_tensor_invariant_sgd(ps, gs, [], [UN] * len(ps), lr=lr, momentum=0.0,
                                     dampening=0.0, weight_decay=0.0, nesterov=False,
                                     maximize=False)

    compiled = torch.compile(raw_step, fullgraph=True, dynamic=False)
    compiled(ps, gs, lr)
    print(f"torch.compile: {time.time() - start:.1f} s for the first call")
    fns = {"fused": functools.partial(un_step, foreach=False, fused=True),
           "foreach": functools.partial(un_step, foreach=True),
           "loop": functools.partial(un_step, foreach=False), "compiled": compiled,
           "sgd": sgd_foreach}
    for r in range(args.rounds):
        times = {k: time_us(f, ps, gs, lr) for k, f in fns.items()}
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f} us" for k, v in times.items()))


if __name__ == "__main__":
    main()
