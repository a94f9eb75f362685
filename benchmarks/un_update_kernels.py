"""What the UN update of the MLP's four filter banks costs, kernel by kernel.

Times, per call, on the shapes of Arch2 with 4 layers of 64 filters (one thread):

- ``foreach``: the update as :class:`manifold_nets.InvariantSGD` runs it (per-filter inner
  product, projected step, per-filter norm and rescale: 14 kernel launches);
- ``vecdot``: the same with ``torch.linalg.vecdot`` for the inner products;
- ``compiled``: the same update written per tensor and compiled by ``torch.compile``
  (inductor; needs a C++ compiler; the compile time is printed);
- ``sgd``: one ``torch._foreach_add_``, the whole of a ``foreach`` SGD step's arithmetic.

Usage::

    python benchmarks/un_update_kernels.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = [(64, 784), (64, 32), (64, 32), (64, 32)]
LR = 1e-7


def un_per_tensor(ps, gs, lr):
    for p, g in zip(ps, gs, strict=True):
        inner = (p * g).sum(-1, keepdim=True)
        p.sub_((g - inner * p) * lr)
        p.mul_(p.norm(dim=-1, keepdim=True).clamp_min(1e-30).reciprocal())


def _step_and_normalise(ps, gs, inners):
    step = torch._foreach_addcmul(gs, inners, ps, value=-1)
    torch._foreach_add_(ps, step, alpha=-LR)
    norms = [torch.linalg.vector_norm(p, dim=-1, keepdim=True) for p in ps]
    torch._foreach_clamp_min_(norms, 1e-30)
    torch._foreach_reciprocal_(norms)
    torch._foreach_mul_(ps, norms)


def un_foreach(ps, gs, lr):
    _step_and_normalise(ps, gs, [t.sum(-1, keepdim=True) for t in torch._foreach_mul(ps, gs)])


def un_vecdot(ps, gs, lr):
    _step_and_normalise(
        ps, gs, [torch.linalg.vecdot(p, g).unsqueeze_(-1) for p, g in zip(ps, gs, strict=True)])


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
    compiled = torch.compile(un_per_tensor, fullgraph=True, dynamic=False)
    compiled(ps, gs, lr)
    print(f"torch.compile: {time.time() - start:.1f} s for the first call")
    fns = {"foreach": un_foreach, "vecdot": un_vecdot, "compiled": compiled,
           "sgd": sgd_foreach}
    for r in range(args.rounds):
        times = {k: time_us(f, ps, gs, lr) for k, f in fns.items()}
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f} us" for k, v in times.items()))


if __name__ == "__main__":
    main()
