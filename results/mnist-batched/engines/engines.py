"""The sequential and the batched engine on the same runs of one cell, at a fixed rate.

Usage (from the repository root)::

    python results/mnist-batched/engines/engines.py 64 un exp-decay 8 0,1 > float64.txt
    python results/mnist-batched/engines/engines.py 32 un exp-decay 3 0,1,2 > float32.txt

Arguments: dtype (32 or 64), update, protocol, epochs, comma-separated seeds. Arch2 with
2 layers, rate 1e-2, the full 50,000 training images. Prints the mean cost of every
epoch and the final test error of each run on both engines (the wall times printed are
the machine's at the time, not a benchmark).
"""

import sys
import time

import torch

from manifold_nets.experiments.config import TrainConfig
from manifold_nets.experiments.data import Dataset, load_dataset
from manifold_nets.experiments.engines import train, train_group

torch.set_num_threads(1)
dtype = {"32": torch.float32, "64": torch.float64}[sys.argv[1]]
update, protocol, epochs = sys.argv[2], sys.argv[3], int(sys.argv[4])
seeds = [int(s) for s in sys.argv[5].split(",")]
torch.set_default_dtype(dtype)
d = load_dataset("mnist", "/work/shared/data/mnist" if len(sys.argv) < 7 else sys.argv[6])
data = Dataset(d.name, d.x_train.to(dtype), d.y_train, d.x_test.to(dtype), d.y_test)
cfgs = [TrainConfig(arch="arch2", depth=2, update=update, protocol=protocol, seed=s, lr=0.01,
                    min_epochs=epochs, max_epochs=epochs) for s in seeds]
t = time.time()
b = train_group(cfgs, data)
tb = time.time() - t
for c, rb in zip(cfgs, b, strict=True):
    t = time.time()
    rs = train(c, data, progress=False)
    ts = time.time() - t
    cs = [e["cost"] for e in rs["history"]]
    cb = [e["cost"] for e in rb["history"]]
    print(f"seed {c.seed} {dtype} seq {ts:.0f}s batched {tb:.0f}s(all)")
    print("  seq cost ", " ".join(f"{v:.6f}" for v in cs))
    print("  bat cost ", " ".join(f"{v:.6f}" for v in cb))
    print("  test err seq", rs["test_error"], "bat", rb["test_error"], flush=True)
