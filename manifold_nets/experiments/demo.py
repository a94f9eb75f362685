"""``manifold-nets demo``: the README's main command.

Shows the UN and SM geometries at work on one weight matrix: one
:class:`geoopt.optim.RiemannianSGD` step each, with the quantities the paper cares about;
then the invariance audit of :mod:`manifold_nets.symmetry` on small Arch1 and Arch2
networks (which update keeps which symmetry, with the negative controls); then a short
comparison of B-SGD, SM and UN on real MNIST (Arch2, 2 layers, a few epochs on a few
thousand images, one fixed rate; see :func:`mnist_comparison`).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import geoopt
import torch

from ..declare import UPDATES
from ..manifolds import DiagScaledEuclidean, ObliqueManifold


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


def mnist_comparison(
    data,
    *,
    seeds=(0, 1, 2),
    epochs: int = 5,
    train_size: int = 5000,
    val_size: int = 1000,
    lr: float = 1e-2,
    arch: str = "arch2",
    depth: int = 2,
) -> list[dict]:
    """B-SGD, SM and UN on real MNIST: a short, fixed-rate version of the paper's runs.

    Each update trains ``arch`` with ``depth`` layers from the same initial weights for
    ``epochs`` epochs on ``train_size`` training images (exponential decay 0.95, summed
    cross-entropy over mini-batches of 100, no learning-rate selection and no early
    stopping), once per seed; the test error is measured on the 10,000 test images.

    Returns
    -------
    list of dict
        Per update: ``update``, and lists ``train_error``, ``val_error``, ``test_error``,
        ``seconds`` over the seeds.
    """
    from .config import TrainConfig
    from .engines import train

    rows = []
    for update in UPDATES:
        row = {"update": update, "train_error": [], "val_error": [], "test_error": [],
               "seconds": []}
        for seed in seeds:
            config = TrainConfig(
                arch=arch, depth=depth, update=update, protocol="exp-decay", seed=seed, lr=lr,
                train_size=train_size, val_size=val_size, select_train=min(1000, train_size // 2),
                select_val=min(500, train_size // 4), min_epochs=epochs, max_epochs=epochs,
                stopping="none",
            )
            record = train(config, data, progress=False)
            row["train_error"].append(record["history"][-1]["train_error"])
            row["val_error"].append(record["val_error"])
            row["test_error"].append(record["test_error"])
            row["seconds"].append(record["wall_time_s"])
        rows.append(row)
    return rows


def format_comparison(rows: list[dict]) -> list[str]:
    """A Markdown table of :func:`mnist_comparison` (mean +- std over seeds)."""
    names = {"bsgd": "B-SGD", "sm": "SM", "un": "UN"}

    def ms(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.4f} +- {sd:.4f}"

    lines = ["| update | train error (last epoch's batches) | validation error | test error "
             "| seconds per run |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {names[r['update']]} | {ms(r['train_error'])} | {ms(r['val_error'])} "
                     f"| {ms(r['test_error'])} | {statistics.fmean(r['seconds']):.1f} |")
    return lines


def run_demo(args: argparse.Namespace) -> int:
    """``manifold-nets demo``."""
    print("One RiemannianSGD step with each manifold-nets geometry:")
    for line in one_step_report(args.seed):
        print("  " + line)
    from ..symmetry import audit_rows, format_audit

    torch.set_num_threads(args.threads)
    for arch in (1, 2):
        print(f"\nInvariance audit, Arch{arch} with 2 layers of 16 filters, float64 "
              "(`manifold-nets check` runs the full-width version):")
        rows = audit_rows(arch, 2, width=16, seed=args.seed)
        print(format_audit(rows))
        if not all(r.ok for r in rows):
            return 1
    if args.skip_mnist:
        return 0
    from .data import DataError, load_dataset

    try:
        data = load_dataset("mnist", args.data_dir)
    except DataError as err:
        print(f"\nMNIST is not available, so the comparison is skipped:\n{err}", file=sys.stderr)
        return 1
    seeds = tuple(range(args.seed, args.seed + args.runs))
    print(
        f"\nB-SGD, SM and UN on MNIST: Arch2, 2 layers, {args.epochs} epochs on "
        f"{args.train_size} training images, fixed rate 1e-2 with exponential decay, "
        f"seeds {seeds[0]}..{seeds[-1]}; error on the 10,000 test images (mean +- std):"
    )
    rows = mnist_comparison(data, seeds=seeds, epochs=args.epochs, train_size=args.train_size)
    for line in format_comparison(rows):
        print("  " + line)
    print("  (The paper's full protocol, with learning-rate selection and up to 60 epochs on "
          "50,000 images, is `manifold-nets reproduce`.)")
    return 0
