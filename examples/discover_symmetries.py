"""Discover the rescaling symmetries of a ResNet and of a transformer, then check them.

:func:`manifold_nets.symmetry.discover` derives, from the traced graph, every direction
among the row, column and channel scalings of a model's weights that leaves its outputs
unchanged, and groups them into families ("per-filter scaling of layer1.0.conv1",
"Q/K dimensions of blocks.0.attn", ...), each with the updates that resolve it. The
example runs it on a ResNet with torchvision's BasicBlock layout and on a pre-LN
transformer (token and position embeddings, multi-head attention, a ReLU MLP), prints the
families, and checks two of them numerically: a random element of a family leaves the
outputs unchanged, while B-SGD steps from ``w`` and from ``g.w`` part ways and SM steps do
not (for a family that SM resolves).

Run::

    python examples/discover_symmetries.py                  # ResNet-18 and a 2-block transformer
    python examples/discover_symmetries.py --quick          # small models (smoke test)
"""

from __future__ import annotations

import argparse
import time

import geoopt
import torch

from manifold_nets import declare
from manifold_nets.experiments.zoo import pre_ln_transformer, resnet18, small_resnet
from manifold_nets.symmetry import discover, loss_invariance, update_invariance


def show(name: str, model: torch.nn.Module, x: torch.Tensor) -> None:
    start = time.perf_counter()
    found = discover(model, x)
    params = sum(p.numel() for p in model.parameters())
    print(f"\n{name} ({params:,} parameters, inputs {tuple(x.shape)}), "
          f"{time.perf_counter() - start:.1f} s:")
    print(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small models (smoke test)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    resnet = small_resnet() if args.quick else resnet18()
    images = torch.randn(32 if args.quick else 256, 3, 16 if args.quick else 32,
                         16 if args.quick else 32)
    show("ResNet" if args.quick else "ResNet-18", resnet, images)

    width = 8 if args.quick else 64
    transformer = pre_ln_transformer(vocab=50, d=width, heads=2, mlp=2 * width, layers=2,
                                     context=8)
    tokens = torch.randint(0, 50, (64, 8))
    show("pre-LN transformer", transformer, tokens)

    # A family on its own: its elements leave the loss unchanged; SM steps commute with
    # them where the family says "resolved by SM", B-SGD steps do not.
    small = small_resnet().double()
    for m in small.modules():  # batch norm's eps makes the invariance approximate
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = 1e-12
    x = torch.randn(64, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (64,))
    found = discover(small, x)
    family = found.families[0]
    g = found.family_group(small, family).sample(0.5, torch.Generator().manual_seed(1))
    g = g.calibrate(small, x)
    inv = loss_invariance(small, g, x, y)
    print(f"\n{family}: loss at w {inv['loss']:.6f}, at g.w {inv['loss_g']:.6f}")

    def optimiser(update):
        def make(net):
            declare(net, update)
            return geoopt.optim.RiemannianSGD(net.parameters(), lr=1e-3)
        return make

    for update, label in (("sm", "SM"), ("bsgd", "B-SGD")):
        gap = update_invariance(small, g, optimiser(update), x, y, steps=5)["gap"]
        print(f"{label:5s}: 5 steps from w and from g.w differ by {gap:.1e} (relative)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
