"""Train the paper's Arch2 on real MNIST with the UN update, with the paper's protocol.

A short version of one run of the paper's Section 4: Arch2 (two hidden layers of 64
filters with batch norm, pair max-pooling, soft-max), every filter on the oblique
manifold, summed cross-entropy over mini-batches of 100, the bold-driver schedule, and a
learning-rate selection on a small subset first. The defaults are shrunk so that it runs
in under a minute on one CPU thread; every field of
:class:`manifold_nets.experiments.config.TrainConfig` can be changed here or with
``manifold-nets train``.

MNIST is found as :func:`manifold_nets.experiments.data.load_dataset` finds it (``--data-dir``,
``MANIFOLD_NETS_DATA``, the local mirror ``MANIFOLD_NETS_MIRROR``, the cache, then a
download).

Run::

    python examples/train_arch2_un.py
    python examples/train_arch2_un.py --update sm --epochs 5
"""

from __future__ import annotations

import argparse

import torch

from manifold_nets.experiments.config import TrainConfig
from manifold_nets.experiments.engines import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", choices=["un", "sm", "bsgd"], default="un")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--quick", action="store_true",
                        help="2,000 training images, 1 epoch, a 2-rate selection")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    train_size, epochs = (2000, 1) if args.quick else (args.train_size, args.epochs)
    config = TrainConfig(
        arch="arch2", depth=2, width=64, update=args.update, protocol="bold-driver",
        seed=args.seed,
        lr_grid=(1e-2, 1e-3) if args.quick else (1e-2, 1e-3, 1e-4),
        select_train=500, select_val=500, select_epochs=2 if args.quick else 5,
        train_size=train_size, val_size=2000, test_size=10000,
        min_epochs=epochs, max_epochs=epochs,
    )
    record = train(config, data_dir=args.data_dir, progress=False)

    print(f"Arch2, 2 layers, update {args.update}, bold driver, seed {args.seed}")
    print("learning-rate selection (error on the selection images):")
    for lr, err in record["selection"].items():
        print(f"  lr {lr:>6s}: {err:.4f}")
    print(f"selected lr {record['lr']:g}")
    print(f"{'epoch':>5s}  {'lr':>8s}  {'train err':>9s}  {'val err':>8s}  {'test err':>8s}")
    for e, h in enumerate(record["history"], start=1):
        print(f"{e:5d}  {h['lr']:8.2g}  {h['train_error']:9.4f}  {h['val_error']:8.4f}  "
              f"{h['test_error']:8.4f}")
    print(f"test error {record['test_error']:.4f} on 10,000 test images after "
          f"{record['epochs']} epoch(s) on {train_size} training images "
          f"({record['wall_time_s']:.1f} s)")
    return 1 if record["diverged"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
