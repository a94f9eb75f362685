"""The paper's thesis at a glance: ``docs/_static/thesis.png`` from a real MNIST run.

Trains Arch2 (depth 2, width 64) on real MNIST with B-SGD, SM and UN, each twice: from
the paper's initialisation ``w`` and from a reparameterised ``g.w`` (``g`` a random
element of Arch2's rescaling group, eq. (3)), with the same mini-batches and the same
learning rate, in float64. One row of panels per batch-norm ``eps``: PyTorch's default
``1e-5``, and ``1e-12``, where eq. (3) holds to rounding. Each panel's title and the
printed table give the measured gap between the two curves.

Run from the repository root (single thread, about a minute)::

    .venv/bin/python docs/figures/make_thesis_figure.py

MNIST is read as :func:`manifold_nets.experiments.data.load_dataset` finds it (``--data-dir``, then
``MANIFOLD_NETS_DATA``, the local mirror ``MANIFOLD_NETS_MIRROR``, the cache).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import geoopt
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from manifold_nets import Arch2, declare  # noqa: E402
from manifold_nets.experiments.data import load_dataset  # noqa: E402
from manifold_nets.symmetry import arch2_group  # noqa: E402

UPDATES = (("bsgd", "B-SGD"), ("sm", "SM"), ("un", "UN"))
OUT = Path(__file__).resolve().parent.parent / "_static" / "thesis.png"


def train(model, update: str, x, y, batches, lr: float) -> list[float]:
    """Declare ``model`` for ``update`` and run RiemannianSGD over ``batches``."""
    declare(model, update)
    opt = geoopt.optim.RiemannianSGD(model.parameters(), lr=lr)
    losses = []
    for idx in batches:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="sum")
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-2,
                        help="learning rate for the summed loss (default 1e-2)")
    parser.add_argument("--log-scale", type=float, default=1.0,
                        help="g's log-scales are N(0, log_scale^2) (default 1)")
    parser.add_argument("--eps", type=float, nargs="+", default=[1e-5, 1e-12],
                        help="batch-norm eps, one row of panels each")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()

    data = load_dataset("mnist", args.data_dir)
    x, y = data.x_train.to(dtype), data.y_train
    fig, axes = plt.subplots(len(args.eps), 3, figsize=(12, 3.3 * len(args.eps)),
                             sharey=True, squeeze=False)
    print(f"{'bn eps':>6s}  {'update':6s}  {'final loss from w':>17s}  {'from g.w':>9s}  "
          f"{'largest gap':>11s}")
    for row, eps in zip(axes, args.eps, strict=True):
        gen = torch.Generator().manual_seed(args.seed)
        net = Arch2(depth=2, width=64, bn_eps=eps, generator=gen).to(dtype)
        g = arch2_group(net).sample(args.log_scale, generator=gen)
        gnet = g.apply(net)
        perm = torch.randperm(len(x), generator=gen)
        batches = [perm[i * 100:(i + 1) * 100] for i in range(args.steps)]
        for ax, (update, label) in zip(row, UPDATES, strict=True):
            a = train(copy.deepcopy(net), update, x, y, batches, args.lr)
            b = train(copy.deepcopy(gnet), update, x, y, batches, args.lr)
            gap = max(abs(p - q) for p, q in zip(a, b, strict=True))
            print(f"{eps:6.0e}  {label:6s}  {a[-1]:17.3f}  {b[-1]:9.3f}  {gap:11.3g}",
                  flush=True)
            steps = range(1, len(a) + 1)
            ax.plot(steps, a, color="C0", lw=1.2, label="from $w$")
            ax.plot(steps, b, color="C3", lw=1.2, ls="--", label="from $g\\cdot w$")
            ax.set_title(f"{label}, BN eps {eps:.0e}: largest gap {gap:.2g}", fontsize=10)
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        row[0].set_ylabel("training loss\n(summed cross-entropy)")
    for ax in axes[-1]:
        ax.set_xlabel("step (mini-batch of 100)")
    axes[0, 0].legend()
    fig.suptitle(f"Arch2, 2 layers, real MNIST, {args.dtype}, same mini-batches, lr "
                 f"{args.lr:g}; $g$: random Arch2 rescaling, log-scales ~ "
                 f"N(0, {args.log_scale:g}$^2$)", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
