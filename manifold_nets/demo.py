"""``manifold-nets demo``: the README's main command.

Shows the UN and SM geometries at work on one weight matrix: one
:class:`geoopt.optim.RiemannianSGD` step each, with the quantities the paper cares about.
"""

from __future__ import annotations

import argparse

import geoopt
import torch

from .manifolds import DiagScaledEuclidean, ObliqueManifold


def one_step_report(seed: int = 0) -> list[str]:
    """One UN and one SM step on a random ``8 x 16`` weight; lines describing them."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    target = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    lines = []
    for label, manifold in (("UN", ObliqueManifold()), ("SM", DiagScaledEuclidean())):
        w = geoopt.ManifoldParameter(manifold.projx(w0.clone()), manifold=manifold)
        loss = ((w - target) ** 2).sum()
        loss.backward()
        geoopt.optim.RiemannianSGD([w], lr=1e-2).step()
        after = ((w.detach() - target) ** 2).sum()
        norms = w.detach().norm(dim=1)
        lines.append(
            f"{label}: {manifold!r}; loss {loss.item():.4f} -> {after.item():.4f}; "
            f"filter norms in [{norms.min().item():.6f}, {norms.max().item():.6f}]"
        )
    return lines


def run_demo(args: argparse.Namespace) -> int:
    print("One RiemannianSGD step with each manifold-nets geometry:")
    for line in one_step_report(args.seed):
        print("  " + line)
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("demo", help="a short tour: the updates, invariance and MNIST results")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=run_demo)
