"""One Arch2 epoch (4 layers of 64 filters, batch 100) on a GPU: torch.optim.SGD against
InvariantSGD's UN and SM steps, interleaved, momentum 0.9.

The images are random MNIST-shaped tensors (the device machine has no data set; the
timing does not depend on the pixels). Prints one JSON line.

Usage::

    python benchmarks/gpu_epoch.py [--rounds 5] [--images 50000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from manifold_nets import Arch2, InvariantSGD, declare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=50_000)
    args = parser.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.images, 784, generator=gen).to(device)
    y = torch.randint(0, 10, (args.images,), generator=gen).to(device)
    runs = {}
    for name, update in (("sgd", "bsgd"), ("sgd-fused", "bsgd"), ("ours-un", "un"),
                         ("ours-sm", "sm")):
        torch.manual_seed(0)
        model = Arch2(depth=4, width=64)
        declare(model, update)
        model = model.to(device)
        opt = (torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9,
                               fused=name == "sgd-fused") if name.startswith("sgd")
               else InvariantSGD(model.parameters(), lr=1e-3, momentum=0.9))
        runs[name] = (model, opt)
    times = {k: [] for k in runs}
    for r in range(args.rounds + 1):
        for name, (model, opt) in runs.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(0, args.images, 100):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x[i:i + 100]), y[i:i + 100], reduction="sum").backward()
                opt.step()
            torch.cuda.synchronize()
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "epoch_s": {k: statistics.median(v) for k, v in times.items()},
           "epoch_vs_sgd": {k: statistics.median(a / b for a, b in zip(v, times["sgd"],
                                                                       strict=True))
                            for k, v in times.items()}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
