"""Why :class:`~manifold_nets.experiments.stacked.StackedNet` writes its backward pass out.

Times one training-mode forward and backward pass of 30 stacked Arch2 runs (2 layers of
64 filters, a mini-batch of 100 MNIST-sized inputs, one thread) two ways, interleaved:
``StackedNet.loss_and_grad`` (the hand-written backward), and autograd through the same
stacked operations (one matrix product per layer, torch's batch norm on the
``(1, R x width, B)`` view, pair max-pooling, summed cross-entropy).

Usage::

    python benchmarks/stacked_backward.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from manifold_nets import Arch2, declare
from manifold_nets.experiments.stacked import StackedNet

R, DEPTH, WIDTH, BATCH = 30, 2, 64, 100


def main() -> None:
    torch.set_num_threads(1)
    models = []
    for r in range(R):
        m = Arch2(DEPTH, WIDTH, 784, 10, generator=torch.Generator().manual_seed(r))
        declare(m, "un")
        models.append(m)
    net = StackedNet.from_models(models)
    x, y = torch.rand(BATCH, 784), torch.randint(0, 10, (BATCH,))

    def autograd_step() -> None:
        m = None
        for i, W in enumerate(net.W):
            h = ((W.reshape(R * WIDTH, -1) @ x.T).view(R, WIDTH, BATCH) if i == 0
                 else torch.bmm(W, m))
            h = F.batch_norm(h.reshape(1, R * WIDTH, BATCH), net.running_mean[i].view(-1),
                             net.running_var[i].view(-1), net.gamma[i].view(-1),
                             net.beta[i].view(-1), True, 0.1, 1e-5).view(R, WIDTH, BATCH)
            m = torch.maximum(h[:, 0::2], h[:, 1::2]).relu()
        logits = torch.bmm(net.theta, m)
        loss = F.cross_entropy(logits.transpose(1, 2).reshape(R * BATCH, 10), y.repeat(R),
                               reduction="sum")
        for p in net.parameters():
            p.grad = None
        loss.backward()

    def hand_step() -> None:
        net.loss_and_grad(x, y)

    steps = {"hand-written": hand_step, "autograd": autograd_step}
    for f in steps.values():
        for _ in range(5):
            f()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(7):
        for name, f in steps.items():
            start = time.perf_counter()
            for _ in range(50):
                f()
            times[name].append((time.perf_counter() - start) / 50)
    ratios = sorted(a / h for a, h in zip(times["autograd"], times["hand-written"], strict=True))
    print(f"R={R} depth={DEPTH} width={WIDTH} batch={BATCH}, one thread, 7 interleaved "
          f"rounds of 50 passes: hand-written {statistics.median(times['hand-written']) * 1e3:.2f}"
          f" ms, autograd {statistics.median(times['autograd']) * 1e3:.2f} ms per forward and "
          f"backward; autograd / hand-written {statistics.median(ratios):.2f} "
          f"[{ratios[0]:.2f}-{ratios[-1]:.2f}]")


if __name__ == "__main__":
    main()
