"""Declare ManifoldParameters in a model of your own and train it with RiemannianSGD.

The model is a small fully connected network with batch norm (not one of the paper's);
its filter weights are put on one of the paper's geometries by hand (``declare_by_hand``),
with nothing from manifold-nets but the two manifolds, to show what
:func:`manifold_nets.declare` does for any model:

- ``--update un``: every filter on :class:`manifold_nets.ObliqueManifold` (unit norm),
  the output layer Euclidean (Table 1 of the paper, UN column);
- ``--update sm``: filters on ``DiagScaledEuclidean()`` and the output layer on
  ``DiagScaledEuclidean(side="right")`` (SM column);
- ``--update bsgd``: everything Euclidean, for comparison.

The task is MNIST digit classification (real data, pixels scaled to [0, 1]), with the
summed cross-entropy over mini-batches of 100 as in the paper. MNIST is found as
:func:`manifold_nets.experiments.data.load_dataset` finds it (``--data-dir``,
``MANIFOLD_NETS_DATA``, the local mirror ``MANIFOLD_NETS_MIRROR``, the cache, then a download).

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
from manifold_nets.experiments.data import load_dataset


def make_model(in_features: int, width: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Linear(width, out_features, bias=False),
    )


def declare_by_hand(model: nn.Sequential, update: str) -> list[str]:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", choices=["un", "sm", "bsgd"], default="un")
    parser.add_argument("--steps", type=int, default=600, help="mini-batch steps")
    parser.add_argument("--lr", type=float, default=1e-2,
                        help="learning rate for the summed loss (default 1e-2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--quick", action="store_true", help="50 steps (smoke test)")
    args = parser.parse_args(argv)
    steps = 50 if args.quick else args.steps
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    data = load_dataset("mnist", args.data_dir)
    model = make_model(data.in_features, 64, data.num_classes)
    for line in declare_by_hand(model, args.update):
        print(line)
    opt = geoopt.optim.RiemannianSGD(model.parameters(), lr=args.lr)

    perm = torch.randperm(len(data.x_train), generator=gen)
    for step in range(1, steps + 1):
        idx = perm[(step - 1) * 100 % len(perm):][:100]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx],
                                           reduction="sum")
        loss.backward()
        opt.step()
        if step % max(1, steps // 5) == 0 or step == steps:
            print(f"step {step:4d}  mini-batch loss {loss.item():8.3f}")
    model.eval()
    with torch.no_grad():
        wrong = (model(data.x_test).argmax(dim=1) != data.y_test).float().mean().item()
    print(f"test error {wrong:.4f} on {len(data.y_test)} test images after {steps} steps")
    if args.update == "un":
        norms = model[0].weight.detach().norm(dim=1)
        print(f"filter norms of the first layer: min {norms.min():.6f}, max {norms.max():.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
