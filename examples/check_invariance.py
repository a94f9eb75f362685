"""Check whether an optimiser respects the symmetries of your own model.

Three steps, none of which needs the symmetry written by hand:

1. :func:`manifold_nets.symmetry.discover` finds the rescaling symmetries of the model
   (here a small batch-normalised MLP of the user's, not one of the paper's networks);
2. :func:`manifold_nets.audit.audit` draws a random element ``g`` of the discovered
   group and measures, for every update rule, the gap between ``k`` steps from ``g.w``
   and ``g`` applied to ``k`` steps from ``w``;
3. each measured gap is compared with what the theory predicts
   (:func:`manifold_nets.symmetry.predict`): SM and UN are invariant, B-SGD, weight decay
   and geoopt's first momentum step are not.

The check runs in float64 with random Gaussian inputs and labels.

Run::

    python examples/check_invariance.py
    python examples/check_invariance.py --width 32 --steps 5
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from manifold_nets.audit import UPDATE_RULES, audit, format_audit
from manifold_nets.symmetry import discover


def my_model(in_features: int, width: int, num_classes: int) -> nn.Sequential:
    """A model of the user's: two batch-normalised hidden layers and a linear read-out."""
    return nn.Sequential(
        nn.Linear(in_features, width, bias=False), nn.BatchNorm1d(width, eps=1e-30),
        nn.ReLU(),
        nn.Linear(width, width, bias=False), nn.BatchNorm1d(width, eps=1e-30), nn.ReLU(),
        nn.Linear(width, num_classes, bias=False),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16, help="units per hidden layer")
    parser.add_argument("--steps", type=int, default=3, help="optimiser steps compared")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="width 8 (smoke test)")
    args = parser.parse_args(argv)
    width = 8 if args.quick else args.width
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    model = my_model(12, width, 5).double()
    x = torch.randn(200, 12, dtype=torch.float64)
    y = torch.randint(0, 5, (200,))

    found = discover(model, x)
    print(f"discovered: {found}")
    print(f"expected:   {2 * width} (one per batch-normalised unit)\n")

    rows = audit(model, x, y, [found.group(model)], UPDATE_RULES, steps=args.steps,
                 seed=args.seed, arch="my model")
    print(format_audit(rows))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
