"""UN's second moment in InvariantAdam: one per filter or one per entry, measured.

A small conv net with batch norm (every conv filter feeds a batch norm, so UN changes
nothing the net computes) is trained on Fashion-MNIST with InvariantAdam UN,
``second_moment="filter"`` against ``"entry"``, and with torch's AdamW as the reference;
the rate 1e-3 (Adam's default) for all, weight decay 0.01 (not applied to UN filters),
batch 128, the last 10,000 training images held out for validation. Reported: the
validation and test error after the last epoch and the training time per epoch, mean and
standard deviation over the seeds.

    python benchmarks/adam_second_moment.py --epochs 4 --seeds 0 1 \
        --out benchmarks/results/adam-second-moment-2026-12-01.txt
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from manifold_nets import InvariantAdam, declare
from manifold_nets.experiments.data import load_dataset
from manifold_nets.experiments.io import atomic_write


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


@torch.no_grad()
def error(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    wrong = sum(int((model(x[i:i + 1000]).argmax(1) != y[i:i + 1000]).sum())
                for i in range(0, len(x), 1000))
    model.train()
    return wrong / len(x)


def run(variant: str, seed: int, data, epochs: int, log) -> dict:
    x, y = data.x_train.view(-1, 1, 28, 28), data.y_train
    xt, yt = data.x_test.view(-1, 1, 28, 28), data.y_test
    train_x, train_y, val_x, val_y = x[:50_000], y[:50_000], x[50_000:], y[50_000:]
    model = net(seed)
    if variant == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    else:
        declare(model, "un", inputs=train_x[:256])
        opt = InvariantAdam(model.parameters(), lr=1e-3, weight_decay=0.01,
                            second_moment=variant)
    order = torch.Generator().manual_seed(seed + 1)
    times = []
    for epoch in range(epochs):
        start = time.perf_counter()
        perm = torch.randperm(len(train_x), generator=order)
        for i in range(0, len(perm), 128):
            idx = perm[i:i + 128]
            opt.zero_grad()
            nn.functional.cross_entropy(model(train_x[idx]), train_y[idx]).backward()
            opt.step()
        times.append(time.perf_counter() - start)
        log(f"{variant} seed {seed} epoch {epoch + 1}: val error "
            f"{100 * error(model, val_x, val_y):.2f} % ({times[-1]:.1f} s)")
    return {"val": error(model, val_x, val_y), "test": error(model, xt, yt),
            "epoch_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist", args.data_dir)
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for variant in ("filter", "entry", "adamw"):
            results.setdefault(variant, []).append(
                run(variant, seed, data, args.epochs, lambda s: print(s, flush=True)))

    def cell(values):
        values = [100 * v for v in values]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {spread:.2f}"

    lines = [f"Fashion-MNIST, conv net with batch norm (3 convs, 32/64/64 filters), "
             f"{args.epochs} epochs, batch 128, lr 1e-3, weight decay 0.01, seeds "
             f"{args.seeds}, {args.threads} torch thread(s), torch {torch.__version__}",
             "",
             "| optimiser | val error (%) | test error (%) | s / epoch |",
             "|---|---|---|---|"]
    names = {"filter": "InvariantAdam UN, per-filter v", "entry": "InvariantAdam UN, "
             "per-entry v", "adamw": "torch AdamW"}
    for variant, rows in results.items():
        lines.append(f"| {names[variant]} | {cell([r['val'] for r in rows])} | "
                     f"{cell([r['test'] for r in rows])} | "
                     f"{statistics.median(r['epoch_s'] for r in rows):.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        atomic_write(Path(args.out), text)


if __name__ == "__main__":
    main()
