"""Does InvariantAdam help? AdamW, AdamP and InvariantAdam (UN, SM) on Fashion-MNIST.

Each model is trained with each optimiser for ``--epochs`` epochs (batch 128, weight decay
0.01 decoupled as in AdamW, ``--schedule`` cosine: the rate decays to 0 over the run per
step; constant: no decay) on the first 50,000 training images; the last 10,000 are the
validation split. The rate is selected per (model, optimiser) on the validation error of
the first seed over ``--lrs`` (where the best rate is the grid's smallest or largest, the
grid is extended by its own ratio, at most twice); the other seeds are trained at the
selected rate. Reported:
the validation error of every rate, and at the selected rate the test error (mean and
standard deviation over the seeds) and the median training time per epoch.

Optimisers: ``adamw`` (torch's AdamW), ``adamp`` (the ``adamp`` package), ``un`` and
``sm`` (InvariantAdam on the model declared with :func:`manifold_nets.declare` for that
update, with inputs: only what the model's symmetries allow, so the model computes what
it computed), ``un-table1`` (declared without inputs: every filter on the sphere, Table 1,
which changes the model where nothing normalises a filter), ``un-entry`` (UN with one
second moment per entry). Models: ``resnet`` (the zoo's ResNet layout, one block per
stage, widths 16/32/64, on 1-channel images), ``vit`` (the zoo's ViT: 7x7 patches, width
64, 3 pre-LN blocks, GELU), ``bn-convnet`` (3 convs with batch norm).

Every finished run is appended to ``--records`` (JSON lines); a rerun skips the runs found
there, so a killed experiment resumes at the run it was in.

The comparison of the results file adam-help-2026-12-02.md::

    python benchmarks/adam_fashion.py --models resnet --optimisers adamw adamp un sm \\
        --records benchmarks/results/adam-help-2026-12-02.jsonl
    python benchmarks/adam_fashion.py --models vit --optimisers adamw adamp un-table1 sm \\
        --records benchmarks/results/adam-help-2026-12-02.jsonl
    python benchmarks/adam_fashion.py --models resnet vit \\
        --optimisers adamw adamp un un-table1 sm --report-only \\
        --records benchmarks/results/adam-help-2026-12-02.jsonl \\
        --out benchmarks/results/adam-help-2026-12-02.md

(the defaults: 5 epochs, rates 3e-4 1e-3 3e-3 1e-2, seeds 0 1 2, cosine; the last command
trains nothing and writes the table. ``un`` declared with inputs puts nothing of the ViT
on a manifold, so on the ViT it is AdamW; ``un-table1`` is run there instead.)
UN's second moment, adam-second-moment-2026-12-01.txt::

    python benchmarks/adam_fashion.py --models bn-convnet --optimisers un un-entry adamw \\
        --schedule constant --epochs 4 --lrs 1e-3 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from manifold_nets import InvariantAdam, declare
from manifold_nets.experiments import zoo
from manifold_nets.experiments.data import load_dataset
from manifold_nets.experiments.engines import error_rate
from manifold_nets.experiments.io import atomic_write

WEIGHT_DECAY = 0.01
BATCH = 128
#: Steps beyond the grid's edge where the best rate lies.
EXTEND = 2

NAMES = {"adamw": "torch AdamW", "adamp": "AdamP (adamp 0.3)",
         "un": "InvariantAdam UN (declared with inputs)",
         "un-table1": "InvariantAdam UN (Table 1: every filter)",
         "un-entry": "InvariantAdam UN, per-entry v", "sm": "InvariantAdam SM"}


def model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if name == "resnet":
        return zoo.ResNet((1, 1, 1), (16, 32, 64), num_classes=10, in_channels=1)
    if name == "vit":
        return zoo.VisionTransformer(image=28, patch=7, in_channels=1, d=64, heads=4,
                                     mlp=128, layers=3, num_classes=10)
    if name == "bn-convnet":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    raise ValueError(f"unknown model {name!r}")


def optimiser(name: str, net: nn.Module, lr: float, x: torch.Tensor):
    """The optimiser ``name`` on ``net`` (declared first where it needs to be), and the
    number of parameters that went on a manifold."""
    if name == "adamw":
        return torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=WEIGHT_DECAY), 0
    if name == "adamp":
        from adamp import AdamP

        return AdamP(net.parameters(), lr=lr, weight_decay=WEIGHT_DECAY), 0
    update, inputs = {"un": ("un", x), "un-entry": ("un", x), "sm": ("sm", x),
                      "un-table1": ("un", None)}[name]
    with warnings.catch_warnings():  # un-table1 changes the model: that is its point
        warnings.simplefilter("ignore", UserWarning)
        declared = declare(net, update, inputs=inputs)
    on = sum(1 for m in declared.values() if m is not None
             and type(m).__name__ != "Euclidean")
    second = "entry" if name == "un-entry" else "filter"
    return InvariantAdam(net.parameters(), lr=lr, weight_decay=WEIGHT_DECAY,
                         second_moment=second), on


def run(model_name: str, opt_name: str, lr: float, seed: int, data, epochs: int,
        schedule: str, log) -> dict:
    x, y = data.x_train.view(-1, 1, 28, 28), data.y_train
    xt, yt = data.x_test.view(-1, 1, 28, 28), data.y_test
    train_x, train_y, val_x, val_y = x[:50_000], y[:50_000], x[50_000:], y[50_000:]
    net = model(model_name, seed)
    opt, declared = optimiser(opt_name, net, lr, train_x[:256])
    steps = epochs * -(-len(train_x) // BATCH)
    decay = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if schedule == "cosine"
             else None)
    order = torch.Generator().manual_seed(seed + 1)
    times, losses = [], []
    for epoch in range(epochs):
        start = time.perf_counter()
        perm = torch.randperm(len(train_x), generator=order)
        total = 0.0
        for i in range(0, len(perm), BATCH):
            idx = perm[i:i + BATCH]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(train_x[idx]), train_y[idx])
            loss.backward()
            opt.step()
            if decay is not None:
                decay.step()
            total += float(loss.detach()) * len(idx)
        times.append(time.perf_counter() - start)
        losses.append(total / len(train_x))
        log(f"{model_name} {opt_name} lr {lr:g} seed {seed} epoch {epoch + 1}: train loss "
            f"{losses[-1]:.4f}, val error {100 * error_rate(net, val_x, val_y, 1000):.2f} % "
            f"({times[-1]:.1f} s)")
    return {"model": model_name, "optimiser": opt_name, "lr": lr, "seed": seed,
            "epochs": epochs, "schedule": schedule, "declared": declared,
            "train_loss": losses, "val": error_rate(net, val_x, val_y, 1000),
            "test": error_rate(net, xt, yt, 1000), "epoch_s": statistics.median(times)}


def _find(records: list[dict], args, model_name: str, opt_name: str, *,
          seed: int | None = None, lr: float | None = None) -> list[dict]:
    """The records of one model and optimiser under this run's epochs and schedule."""
    return [r for r in records if r["model"] == model_name and r["optimiser"] == opt_name
            and r["epochs"] == args.epochs and r["schedule"] == args.schedule
            and (seed is None or r["seed"] == seed) and (lr is None or r["lr"] == lr)]


def _best(records: list[dict], args, model_name: str, opt_name: str) -> float:
    """The rate of the lowest validation error of the first seed (ties: the smaller)."""
    first = {r["lr"]: r["val"] for r in _find(records, args, model_name, opt_name,
                                               seed=args.seeds[0])}
    return min(first, key=lambda lr: (first[lr], lr))


def _cell(values: list[float]) -> str:
    values = [100 * v for v in values]
    spread = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def table(records: list[dict], args) -> str:
    lines = [f"Fashion-MNIST, {args.epochs} epochs, batch {BATCH}, {args.schedule} rate, "
             f"weight decay {WEIGHT_DECAY}, rates {args.lrs} selected on the validation "
             f"error of seed {args.seeds[0]} (extended at the edges), seeds {args.seeds}, "
             f"{args.threads} torch thread(s), torch {torch.__version__}", "",
             "| model | optimiser | on a manifold | val error (%) per rate | selected | "
             "test error (%) | s / epoch |", "|---|---|---|---|---|---|---|"]
    incomplete: list[str] = []
    for m in args.models:
        for o in args.optimisers:
            first = {r["lr"]: r for r in _find(records, args, m, o, seed=args.seeds[0])}
            if not first:
                continue
            best = _best(records, args, m, o)
            chosen = [r for r in _find(records, args, m, o, lr=best)
                      if r["seed"] in args.seeds]
            if len(chosen) < len(args.seeds):
                incomplete.append(f"{m} {o} ({len(first)} rates, {len(chosen)} seeds)")
                continue
            per_rate = " ".join(f"{lr:g}: {100 * first[lr]['val']:.2f}"
                                for lr in sorted(first))
            lines.append(f"| {m} | {NAMES[o]} | {first[best]['declared']} | {per_rate} | "
                         f"{best:g} | {_cell([r['test'] for r in chosen])} (n={len(chosen)})"
                         f" | {statistics.median(r['epoch_s'] for r in chosen):.1f} |")
    if incomplete:
        lines += ["", "Not finished (left out of the table): " + "; ".join(incomplete)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet", "vit"],
                        choices=["resnet", "vit", "bn-convnet"])
    parser.add_argument("--optimisers", nargs="+", default=["adamw", "adamp", "un", "sm"],
                        choices=list(NAMES))
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--records", default=None, help="JSON lines of the finished runs")
    parser.add_argument("--out", default=None)
    parser.add_argument("--report-only", action="store_true",
                        help="write the table from --records, train nothing")
    args = parser.parse_args()
    if args.report_only and not args.records:
        parser.error("--report-only needs --records")
    torch.set_num_threads(args.threads)
    data = None if args.report_only else load_dataset("fashion-mnist", args.data_dir)
    records_path = Path(args.records) if args.records else None
    records = ([json.loads(line) for line in records_path.read_text().splitlines() if line]
               if records_path and records_path.exists() else [])

    def train(m, o, lr, seed):
        if not _find(records, args, m, o, seed=seed, lr=lr):
            records.append(run(m, o, lr, seed, data, args.epochs, args.schedule,
                               lambda s: print(s, flush=True)))
            if records_path:
                atomic_write(records_path, "".join(json.dumps(r) + "\n" for r in records))

    for m in args.models if not args.report_only else []:
        for o in args.optimisers:
            for lr in args.lrs:
                train(m, o, lr, args.seeds[0])
            for _ in range(EXTEND):  # a best rate at the grid's edge: one step beyond
                tried = sorted(r["lr"] for r in _find(records, args, m, o, seed=args.seeds[0]))
                best = _best(records, args, m, o)
                if best not in (tried[0], tried[-1]) or len(tried) < 2:
                    break
                step = tried[-1] / tried[-2] if best == tried[-1] else tried[0] / tried[1]
                train(m, o, float(f"{best * step:.3g}"), args.seeds[0])
            best = _best(records, args, m, o)
            for seed in args.seeds[1:]:
                train(m, o, best, seed)
    text = table(records, args)
    print(text)
    if args.out:
        atomic_write(Path(args.out), text)


if __name__ == "__main__":
    main()
