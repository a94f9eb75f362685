"""Declare ManifoldParameters in a model of your own and train it with RiemannianSGD.

The model is a small fully connected network with batch norm; its filter weights are put
on one of the paper's geometries by hand, with nothing from manifold-nets but the two
manifolds:

- ``--update un``: every filter on :class:`manifold_nets.ObliqueManifold` (unit norm),
  the output layer Euclidean (Table 1 of the paper, UN column);
- ``--update sm``: filters on ``DiagScaledEuclidean()`` and the output layer on
  ``DiagScaledEuclidean(side="right")`` (SM column);
- ``--update bsgd``: everything Euclidean, for comparison.

The task is a toy regression: inputs are Gaussian, targets come from a fixed random
"teacher" network plus noise. It says nothing about real data.

Run::

    python examples/declare_custom_model.py --update un
    python examples/declare_custom_model.py --update sm --steps 300
"""

from __future__ import annotations

import argparse

import geoopt
import torch
from torch import nn

from manifold_nets import DiagScaledEuclidean, ObliqueManifold


def make_model(in_features: int, width: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Linear(width, out_features, bias=False),
    )


def declare(model: nn.Sequential, update: str) -> list[str]:
    """Put the filter weights of ``model`` on the geometry of ``update``; describe it."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    *hidden, last = linears
    report = []
    for i, layer in enumerate(hidden):
        w = layer.weight.detach()
        if update == "un":
            manifold = ObliqueManifold()
            layer.weight = geoopt.ManifoldParameter(manifold.projx(w), manifold=manifold)
        elif update == "sm":
            manifold = DiagScaledEuclidean()
            layer.weight = geoopt.ManifoldParameter(w, manifold=manifold)
        report.append(f"hidden layer {i} weight {tuple(w.shape)}: "
                      f"{layer.weight.manifold if update != 'bsgd' else 'Euclidean'}")
    if update == "sm":
        last.weight = geoopt.ManifoldParameter(
            last.weight.detach(), manifold=DiagScaledEuclidean(side="right"))
    report.append(f"output layer weight {tuple(last.weight.shape)}: "
                  f"{last.weight.manifold if update == 'sm' else 'Euclidean'}")
    return report


def make_teacher(in_features: int, out_features: int, gen: torch.Generator):
    """A fixed random two-layer tanh network that makes the regression targets."""
    return (torch.randn(32, in_features, generator=gen) / in_features**0.5,
            torch.randn(out_features, 32, generator=gen) / 32**0.5)


def toy_regression(n: int, teacher, gen: torch.Generator):
    """Gaussian inputs; targets from the teacher network plus noise."""
    w1, w2 = teacher
    x = torch.randn(n, w1.shape[1], generator=gen)
    y = torch.tanh(x @ w1.T) @ w2.T
    return x, y + 0.05 * torch.randn(y.shape, generator=gen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", choices=["un", "sm", "bsgd"], default="un")
    parser.add_argument("--steps", type=int, default=600, help="mini-batch steps")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="50 steps (smoke test)")
    args = parser.parse_args(argv)
    steps = 50 if args.quick else args.steps
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    teacher = make_teacher(20, 5, gen)
    x, y = toy_regression(2000, teacher, gen)
    x_test, y_test = toy_regression(500, teacher, gen)
    model = make_model(20, 64, 5)
    for line in declare(model, args.update):
        print(line)
    opt = geoopt.optim.RiemannianSGD(model.parameters(), lr=args.lr)

    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (args.batch_size,), generator=gen)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        if step % max(1, steps // 5) == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                test = nn.functional.mse_loss(model(x_test), y_test).item()
            model.train()
            print(f"step {step:4d}  mini-batch loss {loss.item():.4f}  test loss {test:.4f}")
    if args.update == "un":
        norms = model[0].weight.detach().norm(dim=1)
        print(f"filter norms of the first layer: min {norms.min():.6f}, max {norms.max():.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
