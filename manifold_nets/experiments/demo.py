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

from ..manifolds import DiagScaledEuclidean, ObliqueManifold
from ..table1 import NAMES, UPDATES


def one_step_report(seed: int = 0) -> list[str]:
    r"""One UN and one SM step on a random ``8 x 16`` weight; lines describing them.

    The loss is :math:`\|W - T\|_F^2` for a random target :math:`T`, in float64; each
    geometry takes one :class:`geoopt.optim.RiemannianSGD` step at rate ``1e-2`` from the
    same weight (projected onto its manifold first). UN (eq. (9)) keeps every filter at
    unit norm; SM (eq. (7)) scales each filter's gradient by its squared norm.

    Parameters
    ----------
    seed : int, optional
        Seeds the weight and the target (default 0).

    Returns
    -------
    list of str
        One line per geometry: the manifold, the loss before and after the step, and the
        range of the filter norms after it.

    Examples
    --------
    >>> from manifold_nets.experiments.demo import one_step_report
    >>> for line in one_step_report():
    ...     print(line)
    UN: Oblique(ndim=1) manifold; loss 134.6302 -> 129.8745; filter norms in [1.000000, 1.000000]
    SM: DiagScaledEuclidean(side='left', ndim=1) manifold; loss 264.4094 -> 118.0297; filter ...
    """
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

    Parameters
    ----------
    data : manifold_nets.experiments.data.Dataset
        MNIST in memory (any data set of 784 features and 10 classes).
    seeds : sequence of int, optional
        One run per seed and update (default ``(0, 1, 2)``).
    epochs : int, optional
        Epochs per run (default 5).
    train_size, val_size : int, optional
        Training and validation images (default 5,000 and 1,000).
    lr : float, optional
        The fixed base rate (default ``1e-2``).
    arch : {"arch1", "arch2"}, optional
        The network (default ``"arch2"``).
    depth : int, optional
        Hidden layers (default 2).

    Returns
    -------
    list of dict
        Per update: ``update``, and lists ``train_error``, ``val_error``, ``test_error``,
        ``seconds`` over the seeds.

    Examples
    --------
    One epoch per update on a tiny random data set (not MNIST):

    >>> from manifold_nets.experiments.data import Dataset
    >>> from manifold_nets.experiments.demo import mnist_comparison
    >>> data = Dataset.synthetic(60, 10)
    >>> rows = mnist_comparison(data, seeds=(0,), epochs=1, train_size=40, val_size=10)
    >>> [(r["update"], len(r["test_error"])) for r in rows]
    [('bsgd', 1), ('sm', 1), ('un', 1)]
    >>> all(0 <= e <= 1 for r in rows for e in r["train_error"] + r["test_error"])
    True
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
    """A Markdown table of :func:`mnist_comparison` (mean +- std over seeds).

    Parameters
    ----------
    rows : list of dict
        What :func:`mnist_comparison` returns.

    Returns
    -------
    list of str
        The table's lines: a header, a rule, and one row per update with the mean and
        standard deviation of each error and the mean seconds per run.

    Examples
    --------
    >>> from manifold_nets.experiments.demo import format_comparison
    >>> rows = [{"update": "un", "train_error": [0.02, 0.04], "val_error": [0.03, 0.03],
    ...          "test_error": [0.031, 0.029], "seconds": [10.0, 12.0]}]
    >>> print(format_comparison(rows)[-1])
    | UN | 0.0300 +- 0.0141 | 0.0300 +- 0.0000 | 0.0300 +- 0.0014 | 11.0 |
    """
    names = NAMES

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
    """``manifold-nets demo``.

    Prints :func:`one_step_report`, then the invariance audit
    (``manifold_nets.audit_rows``) of Arch1 and Arch2 with 2 layers of 16
    filters, then, unless ``args.skip_mnist``, :func:`mnist_comparison` on MNIST as a
    table (:func:`format_comparison`).

    Parameters
    ----------
    args : argparse.Namespace
        The options of ``manifold-nets demo``: ``seed``, ``threads``, ``skip_mnist``,
        ``data_dir``, ``runs``, ``epochs`` and ``train_size``.

    Returns
    -------
    int
        The exit status: 0; 1 when an expectation of the audit fails or MNIST cannot be
        found or downloaded.

    Examples
    --------
    Even without MNIST the audits take seconds, more than a docs build gives an example,
    so this one is not run:

    >>> import argparse
    >>> from manifold_nets.experiments.demo import run_demo
    >>> run_demo(argparse.Namespace(seed=0, threads=1, skip_mnist=True))  # doctest: +SKIP
    One RiemannianSGD step with each manifold-nets geometry:
      UN: Oblique(ndim=1) manifold; loss 134.6302 -> 129.8745; filter norms in [1.000000, ...
    ...
    15/15 expectations hold (13 rows reported without a prediction)
    0
    """
    print("One RiemannianSGD step with each manifold-nets geometry:")
    for line in one_step_report(args.seed):
        print("  " + line)
    from ..audit import audit_rows, format_audit

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
