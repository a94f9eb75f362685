"""Data-parallel training with UN on several processes: DDP, started by ``torchrun``.

Each process holds a whole Arch2 (two layers of 64 filters with batch norm), declared for
UN, wrapped in ``DistributedDataParallel``, and trains on its own part of every MNIST
mini-batch (``DistributedSampler``) with :class:`~manifold_nets.InvariantSGD` (momentum
0.9). DDP averages the gradients over the processes in ``backward()``; the UN step then
runs on every process on the same averaged gradient, so the replicas stay identical. The
script checks that at the end: the largest difference between the processes' weights,
and the filter norms.

On GPUs (NCCL) batch norm is converted to ``SyncBatchNorm``, which normalises with the
statistics of the whole mini-batch; torch's ``SyncBatchNorm`` refuses CPU modules, so on
CPU (gloo) each process normalises with its own part's statistics.

Run, on one machine with 2 processes::

    torchrun --standalone --nproc-per-node=2 examples/train_ddp.py
    torchrun --standalone --nproc-per-node=2 examples/train_ddp.py --quick
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from manifold_nets import Arch2, InvariantSGD, declare
from manifold_nets.experiments.data import load_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps (default 200)")
    parser.add_argument("--batch", type=int, default=100,
                        help="mini-batch over all processes (default 100)")
    parser.add_argument("--lr", type=float, default=1e-2, help="learning rate (default 1e-2)")
    parser.add_argument("--data-dir", default=None, help="folder holding the MNIST IDX files")
    parser.add_argument("--quick", action="store_true", help="20 steps")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if args.batch % dist.get_world_size():
        parser.error(f"--batch {args.batch} is not divisible by the "
                     f"{dist.get_world_size()} processes")
    try:
        ok = _train(args, 20 if args.quick else args.steps, cuda)
        dist.barrier()
    finally:
        # The model (its DDP reducer holds the process group) is gone by now: torch 2.13's
        # gloo group can deadlock when the last reference to it dies with the interpreter.
        dist.destroy_process_group()
    return 0 if ok else 1


def _train(args: argparse.Namespace, steps: int, cuda: bool) -> bool:
    """Train, then say whether the processes' weights agree and the filters are unit-norm."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(1)

    data = load_dataset("mnist", args.data_dir)
    torch.manual_seed(0)  # the same initial weights in every process
    model = Arch2(depth=2, width=64)
    declare(model, "un")  # before wrapping, and before the optimiser
    if cuda:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = DistributedDataParallel(model.to(device))
    opt = InvariantSGD(model.parameters(), lr=args.lr, momentum=0.9)

    dataset = TensorDataset(data.x_train, data.y_train)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, seed=0)
    loader = DataLoader(dataset, batch_size=args.batch // world, sampler=sampler)
    step, epoch = 0, 0
    while step < steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            loss.backward()
            opt.step()
            step += 1
            if rank == 0 and (step % 50 == 0 or step == steps):
                print(f"step {step}: loss {loss.item():.4f} (process 0's part of the batch)")
            if step == steps:
                break
        epoch += 1

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    every = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(every, flat)
    gap = max((w - every[0]).abs().max().item() for w in every)
    norms = model.module.layers[0].linear.weight.detach().norm(dim=1)
    if rank == 0:
        print(f"{world} processes, {steps} steps: largest difference between the processes' "
              f"weights {gap:.1e}; filter norms in [{norms.min():.6f}, {norms.max():.6f}]")
    return gap == 0.0 and bool(((norms - 1).abs() < 1e-5).all())


if __name__ == "__main__":
    raise SystemExit(main())
