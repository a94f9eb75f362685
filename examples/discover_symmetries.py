"""Discover the rescaling symmetries of a small conv net, then check them.

:func:`manifold_nets.symmetry.discover` measures the null space of the network's output
Jacobian along every row and column rescaling of every weight. For the conv net below
(two conv layers of ``--channels`` filters, each followed by batch norm, ReLU and 2x2
max-pooling, then a bias-free linear classifier) the theory predicts one symmetry per
batch-normalised filter: ``2 * channels``. The example prints what it finds, the
singular-value gap that separates the symmetries from the rest, and then uses the
discovered group: the loss at ``g.w`` for a random element ``g``, and a few SM and B-SGD
steps from ``w`` and from ``g.w``.

The inputs are random images (uniform in [0, 1]): the count depends on the network, not
on the data, as long as the inputs are varied enough to move every unit.

Run::

    python examples/discover_symmetries.py
    python examples/discover_symmetries.py --channels 8 --size 12 --inputs 100
"""

from __future__ import annotations

import argparse
import time

import geoopt
import torch
from torch import nn

from manifold_nets import declare
from manifold_nets.symmetry import discover, loss_invariance, update_invariance


def conv_net(channels: int, size: int, num_classes: int = 10) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
        nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(channels * (size // 4) ** 2, num_classes, bias=False),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=8, help="filters per conv layer")
    parser.add_argument("--size", type=int, default=12, help="image side (multiple of 4)")
    parser.add_argument("--inputs", type=int, default=100, help="random images to probe with")
    parser.add_argument("--log-scale", type=float, default=0.5,
                        help="log-scales of the random group element ~ N(0, s^2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="4 channels, 8x8 images, 60 inputs (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.channels, args.size, args.inputs = 4, 8, 60
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    model = conv_net(args.channels, args.size)
    x = torch.rand(args.inputs, 1, args.size, args.size)
    y = torch.randint(0, 10, (args.inputs,))

    start = time.perf_counter()
    found = discover(model, x)
    print(f"discover: {found}")
    print(f"expected: {2 * args.channels} (one per batch-normalised filter); "
          f"took {time.perf_counter() - start:.1f} s")

    group = found.group(model)
    model64, x64 = model.double(), x.double()
    g = group.sample(args.log_scale, generator=torch.Generator().manual_seed(args.seed))
    g = g.calibrate(model64, x64)  # batch-norm running statistics follow g exactly
    inv = loss_invariance(model64, g, x64, y)
    print(f"loss at w {inv['loss']:.6f}, at g.w {inv['loss_g']:.6f} "
          f"(relative gap {inv['loss_gap']:.1e}, batch-norm eps 1e-5)")

    def optimiser(update):
        def make(net):
            declare(net, update)
            return geoopt.optim.RiemannianSGD(net.parameters(), lr=1e-3)
        return make

    for update, label in (("sm", "SM"), ("bsgd", "B-SGD")):
        gap = update_invariance(model64, g, optimiser(update), x64, y, steps=5)["gap"]
        print(f"{label:5s}: 5 steps from w and from g.w differ by {gap:.1e} (relative)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
