"""Epoch and optimiser-step benchmark: InvariantSGD vs torch.optim.SGD and geoopt.

A thin script around :mod:`manifold_nets.experiments.bench` (the same code as
``manifold-nets bench``)::

    python benchmarks/bench_epoch.py --data-dir /path/to/mnist --repeats 5 --output bench.json

Prints one table per network (Arch2 4x64 on 50,000 MNIST images; a small conv net on
5,000), with the median epoch and step times and the median of the per-round ratios to
``torch.optim.SGD``. Timings are interleaved repeats in one process, one thread. These are
measurements, not assertions; the correctness of InvariantSGD is in ``tests/test_optim.py``.
"""

from __future__ import annotations

import sys

from manifold_nets.experiments.cli import main as cli


def main(argv: list[str] | None = None) -> int:
    return cli(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
