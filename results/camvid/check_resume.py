"""Retrain the first epochs of a committed CamVid run, killed and resumed from its
checkpoint after every epoch, and compare them with the committed record.

Usage (repository root, one torch thread, as the committed runs were trained)::

    python results/camvid/check_resume.py [RECORD] [--epochs N] [--data-dir DIR]

``RECORD`` defaults to ``results/camvid/runs-100/un/seed0.json``. The run is the record's
configuration (all its epochs are planned, so the schedule and every random stream are
those of the committed run); the process stops it after each epoch, just after the
checkpoint is written, and starts it again from the checkpoint, ``N`` times (default 2).
Every epoch's rate, cost and training error are then compared with the record's, bit for
bit. Exit status 0 when all are equal.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from manifold_nets.experiments.camvid import CamVidConfig, find_camvid, load_camvid, train
from manifold_nets.experiments.checkpoint import read_checkpoint


class _Stop(Exception):
    """Raised from the epoch log, after the checkpoint of that epoch is written."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("record", nargs="?", default="results/camvid/runs-100/un/seed0.json")
    p.add_argument("--epochs", type=int, default=2, help="epochs to retrain (default: 2)")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    record = json.loads(Path(args.record).read_text())
    config = CamVidConfig(**record["config"])
    folder = find_camvid(args.data_dir, download=False)
    data = {s: load_camvid(s, config.size, folder=folder) for s in ("train", "val")}
    ckpt = Path(tempfile.mkdtemp()) / "run.ckpt"
    history = []
    for target in range(1, args.epochs + 1):
        start = time.perf_counter()

        def log(line: str, target=target) -> None:
            if line.startswith(f"epoch {target} "):
                raise _Stop

        try:
            train(config, data, checkpoint=ckpt, log=log, progress=False)
        except _Stop:
            pass
        saved = read_checkpoint(ckpt)
        history = saved["history"]
        print(f"epoch {target}: trained in {time.perf_counter() - start:.1f} s"
              f"{' after resuming' if target > 1 else ''}; the checkpoint holds "
              f"{len(history)} epochs", flush=True)
    print("\n| epoch | field | committed | retrained | equal |\n|---|---|---|---|---|")
    equal = True
    for now, then in zip(history, record["history"], strict=False):
        for key in ("lr", "cost", "train_error"):
            same = now[key] == then[key]
            equal &= same
            print(f"| {now['epoch']} | {key} | {then[key]!r} | {now[key]!r} | "
                  f"{'yes' if same else 'NO'} |")
    print(f"\n{'all equal' if equal else 'DIFFERENT'}: {len(history)} epochs of {args.record}")
    return 0 if equal and len(history) == args.epochs else 1


if __name__ == "__main__":
    sys.exit(main())
