r"""Benchmarks: what the UN and SM updates cost next to ``torch.optim.SGD`` and geoopt.

``manifold-nets bench`` trains the same network with every optimiser below in one process,
one epoch each per round. Every epoch is cut into ``--blocks`` blocks of mini-batches and
the blocks are interleaved (block 1 of every optimiser, then block 2, ...; the order
rotates every round), so that a change in the machine's load hits every optimiser alike.
It prints the median epoch time, the median of the per-round ratios to
``torch.optim.SGD`` (for-loop, the CPU default), the optimiser step alone, and the
memory a step allocates. Wall-clock and CPU-time (``time.thread_time``, this thread only)
ratios are both reported: on a machine shared with other work the CPU-time ratios are the
steadier ones.

======================  ==================================================================
name                    what runs
======================  ==================================================================
``sgd``                 ``torch.optim.SGD`` (for-loop), every parameter Euclidean (1.00)
``sgd-foreach``         ``torch.optim.SGD(foreach=True)``, Euclidean
``geoopt-euclid``       ``geoopt.optim.RiemannianSGD``, Euclidean (the floor of geoopt's loop)
``geoopt-sphere``       ``RiemannianSGD``, filters on ``geoopt.Sphere`` (geoopt's own UN)
``geoopt-un``           ``RiemannianSGD``, filters on :class:`~manifold_nets.ObliqueManifold`
``geoopt-sm``           ``RiemannianSGD``, :class:`~manifold_nets.DiagScaledEuclidean`
``ours-bsgd``           :class:`~manifold_nets.InvariantSGD`, Euclidean
``ours-un``             ``InvariantSGD`` (the fused kernel where built), UN
``ours-sm``             ``InvariantSGD`` (the fused kernel where built), SM
``ours-un-loop``        ``InvariantSGD(foreach=False, fused=False)``, UN
``ours-un-foreach``     ``InvariantSGD(fused=False)`` (multi-tensor), UN
======================  ==================================================================

Two networks: ``mlp``, the paper's Arch2 (4 hidden layers of 64 filters, batch 100, the
50,000 training images), and ``conv``, a small conv net (two 5x5 conv layers of 16 and 32
filters with batch norm, 2x2 max-pooling, a linear classifier) on the first
``--conv-images`` images. ``geoopt.Sphere`` acts on the *last* dim only, so on a conv
weight it normalises kernel rows, not filters: for ``conv`` its row is a timing, not UN.

``grid`` times the Table 2 grid's two engines on ``--grid-images`` images: one epoch of
30 runs (Arch2, 2 layers, 5 seeds x 3 updates x 2 protocols) trained as one stack by
the stacked engine (:func:`~.engines.fit_stacked`), against runs of the sequential
engine (:func:`~.engines.fit`), as seconds per run-epoch and their ratio.

``steps`` times the optimiser step alone, momentum 0.9, on the weight sets of
``WEIGHT_SETS`` (ResNet-18's conv weights, two 4096 x 4096 Linear weights), against
``torch.optim.SGD(foreach=True, momentum=0.9)``, for every thread count of
``--step-threads`` (``bench_steps``).

These are measurements, not tests: nothing here asserts a time.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import geoopt
import torch
import torch.nn.functional as F
from torch import nn

from ..adam import InvariantAdam
from ..declare import declare
from ..manifolds import ObliqueManifold
from ..nets import Arch2
from ..optim import InvariantSGD
from ..table1 import UPDATES, manifold_for

__all__ = ["NETS", "BenchConfig", "OPTIMISERS", "bench_model", "load_train_images", "run_bench"]


# -- optimisers ------------------------------------------------------------------------------

def _sgd(params, lr, foreach):
    return torch.optim.SGD(params, lr=lr, foreach=foreach)


#: What ``manifold-nets bench`` times: the Arch2 MLP, the small conv net, the Table 2
#: grid's engines and the optimiser step alone.
NETS = ("mlp", "conv", "grid", "steps")
#: name -> (update given to :func:`manifold_nets.declare` or "sphere", optimiser
#: factory(params, lr)): the optimisers of the table above.
OPTIMISERS: dict[str, tuple[str, Callable]] = {
    "sgd": ("bsgd", lambda ps, lr: _sgd(ps, lr, False)),
    "sgd-foreach": ("bsgd", lambda ps, lr: _sgd(ps, lr, True)),
    "geoopt-euclid": ("bsgd", lambda ps, lr: geoopt.optim.RiemannianSGD(ps, lr=lr)),
    "geoopt-sphere": ("sphere", lambda ps, lr: geoopt.optim.RiemannianSGD(ps, lr=lr)),
    "geoopt-un": ("un", lambda ps, lr: geoopt.optim.RiemannianSGD(ps, lr=lr)),
    "geoopt-sm": ("sm", lambda ps, lr: geoopt.optim.RiemannianSGD(ps, lr=lr)),
    "ours-bsgd": ("bsgd", lambda ps, lr: InvariantSGD(ps, lr=lr)),
    "ours-un": ("un", lambda ps, lr: InvariantSGD(ps, lr=lr)),
    "ours-sm": ("sm", lambda ps, lr: InvariantSGD(ps, lr=lr)),
    "ours-un-loop": ("un", lambda ps, lr: InvariantSGD(ps, lr=lr, foreach=False,
                                                       fused=False)),
    "ours-un-foreach": ("un", lambda ps, lr: InvariantSGD(ps, lr=lr, fused=False)),
}

#: The weight sets of the step benchmark (``--nets steps``): the sizes people train.
WEIGHT_SETS = {
    # torchvision's ResNet-18 (BasicBlock layout): every conv weight, 11.2M parameters
    "resnet18": [(64, 3, 7, 7)] + [(64, 64, 3, 3)] * 4
    + [(128, 64, 3, 3), (128, 128, 3, 3), (128, 64, 1, 1)] + [(128, 128, 3, 3)] * 2
    + [(256, 128, 3, 3), (256, 256, 3, 3), (256, 128, 1, 1)] + [(256, 256, 3, 3)] * 2
    + [(512, 256, 3, 3), (512, 512, 3, 3), (512, 256, 1, 1)] + [(512, 512, 3, 3)] * 2,
    # two 4096 x 4096 Linear weights, 33.6M parameters
    "linear4096": [(4096, 4096)] * 2,
}
#: ResNet-18's conv weights in ``channels_last``, as a model converted with
#: ``model.to(memory_format=torch.channels_last)`` holds them (each filter is still one
#: block of memory, so the fused kernel takes them).
WEIGHT_SETS["resnet18-channels-last"] = WEIGHT_SETS["resnet18"]

#: name -> (update, optimiser factory(params)) of the step benchmark, momentum 0.9.
STEP_OPTIMISERS: dict[str, tuple[str, Callable]] = {
    "sgd-foreach": ("bsgd", lambda ps: torch.optim.SGD(ps, lr=1e-7, momentum=0.9,
                                                       foreach=True)),
    "ours-un": ("un", lambda ps: InvariantSGD(ps, lr=1e-7, momentum=0.9)),
    "ours-sm": ("sm", lambda ps: InvariantSGD(ps, lr=1e-7, momentum=0.9)),
    "ours-un-foreach": ("un", lambda ps: InvariantSGD(ps, lr=1e-7, momentum=0.9,
                                                      fused=False)),
    "ours-sm-foreach": ("sm", lambda ps: InvariantSGD(ps, lr=1e-7, momentum=0.9,
                                                      fused=False)),
    "geoopt-un": ("un", lambda ps: geoopt.optim.RiemannianSGD(ps, lr=1e-7, momentum=0.9)),
}
#: name -> (update, optimiser factory(params)) of the Adam step benchmark
#: (``--step-family adam``): torch's AdamW against InvariantAdam and geoopt's RiemannianAdam.
ADAM_STEP_OPTIMISERS: dict[str, tuple[str, Callable]] = {
    "adamw-foreach": ("bsgd", lambda ps: torch.optim.AdamW(ps, lr=1e-7, foreach=True)),
    # torch's own fused AdamW (CPU and CUDA): the fastest AdamW there is
    "adamw-fused": ("bsgd", lambda ps: torch.optim.AdamW(ps, lr=1e-7, fused=True)),
    "ours-adam-un": ("un", lambda ps: InvariantAdam(ps, lr=1e-7)),
    "ours-adam-sm": ("sm", lambda ps: InvariantAdam(ps, lr=1e-7)),
    "ours-adam-un-foreach": ("un", lambda ps: InvariantAdam(ps, lr=1e-7, fused=False)),
    "ours-adam-sm-foreach": ("sm", lambda ps: InvariantAdam(ps, lr=1e-7, fused=False)),
    "geoopt-adam-un": ("un", lambda ps: geoopt.optim.RiemannianAdam(ps, lr=1e-7)),
}


# -- networks --------------------------------------------------------------------------------

class SmallConvNet(nn.Module):
    """Two 5x5 conv layers (16, 32 filters, no bias) with batch norm, ReLU and 2x2 pooling,
    then a bias-free linear classifier: a small conv net for MNIST."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 5, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.classifier = nn.Linear(32 * 4 * 4, 10, bias=False)

    def forward(self, x):
        x = x.view(-1, 1, 28, 28)
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.classifier(x.flatten(1))


def bench_model(net: str, update: str, seed: int = 0) -> nn.Module:
    """The network ``net`` ("mlp" or "conv") declared for ``update`` (or "sphere").

    Parameters
    ----------
    net : {"mlp", "conv"}
        The paper's Arch2 (4 hidden layers of 64 filters, 784 inputs, 10 classes) or the
        small conv net (its filters scaled to unit norm first, the paper's
        initialisation).
    update : {"bsgd", "sm", "un", "sphere"}
        The update of :func:`manifold_nets.declare`; ``"sphere"``: the filters of ``"un"``
        on ``geoopt.Sphere`` instead of :class:`~manifold_nets.ObliqueManifold`.
    seed : int, optional
        Seeds torch's global generator before the model is built (default 0).

    Returns
    -------
    torch.nn.Module
        The declared model.

    Examples
    --------
    >>> import geoopt
    >>> from manifold_nets.experiments.bench import bench_model
    >>> model = bench_model("conv", "sphere")
    >>> type(model.conv1.weight.manifold).__name__, tuple(model.conv1.weight.shape)
    ('Sphere', (16, 1, 5, 5))
    >>> model(torch.rand(2, 784)).shape
    torch.Size([2, 10])
    >>> type(bench_model("mlp", "un").layers[0].linear.weight.manifold).__name__
    'ObliqueManifold'
    """
    torch.manual_seed(seed)
    model = Arch2(depth=4, width=64) if net == "mlp" else SmallConvNet()
    if net == "conv":  # the paper's initialisation: unit-norm filters
        with torch.no_grad():
            for m in (model.conv1, model.conv2, model.classifier):
                m.weight.div_(m.weight.flatten(1).norm(dim=1).view(-1, *[1] * (m.weight.dim()
                                                                              - 1)))
    decl = declare(model, "un" if update == "sphere" else update)
    if update == "sphere":  # the same filters, on geoopt's own Sphere
        for name, manifold in decl.items():
            if isinstance(manifold, ObliqueManifold):
                module = model.get_submodule(name.rsplit(".", 1)[0])
                module.weight = geoopt.ManifoldParameter(module.weight.detach().clone(),
                                                         manifold=geoopt.Sphere())
    return model


# -- data ------------------------------------------------------------------------------------

def load_train_images(data_dir: str | os.PathLike | None, n: int = 50_000,
                      ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first ``n`` MNIST training images (float32 in [0, 1], flattened) and labels,
    read by :func:`~.data.load_dataset` from ``data_dir`` (or where it looks; no download),
    checksums verified. Returns ``(x, y, source)``.

    Parameters
    ----------
    data_dir : path or None
        A folder holding the MNIST IDX files; ``None``: where
        :func:`~.data.load_dataset` looks by default.
    n : int, optional
        How many images (default 50,000).

    Returns
    -------
    (torch.Tensor, torch.Tensor, str)
        ``(n, 784)`` images, ``(n,)`` labels, and the folder they were read from.

    Raises
    ------
    manifold_nets.experiments.data.DataError
        If the files are missing (they are not downloaded) or corrupted.

    Examples
    --------
    It needs the MNIST files on disk, which a docs build does not have, so this example
    is not run:

    >>> x, y, source = load_train_images(None, n=1000)  # doctest: +SKIP
    >>> x.shape, y.shape  # doctest: +SKIP
    (torch.Size([1000, 784]), torch.Size([1000]))
    """
    from .data import load_dataset

    ds = load_dataset("mnist", data_dir, download=False)
    return ds.x_train[:n].contiguous(), ds.y_train[:n].contiguous(), ds.source


# -- measurements ----------------------------------------------------------------------------

def _train_epoch(model, opt, x, y, batch, gen) -> float:
    perm = torch.randperm(len(x), generator=gen)
    return _train_batches(model, opt, x, y, perm, range(0, len(x), batch), batch) / len(x)


def _train_batches(model, opt, x, y, perm, starts, batch) -> float:
    """Train on the mini-batches ``perm[s:s + batch]`` for ``s`` in ``starts``; summed loss."""
    total = 0.0
    for i in starts:
        idx = perm[i:i + batch]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx], reduction="sum")
        loss.backward()
        opt.step()
        total += float(loss.detach())
    return total


@contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop lines) for a moment."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _step_peak_bytes(fn) -> int:
    """Peak of the bytes ``fn`` allocates on the CPU, from the profiler's memory events
    (net allocation per op, in the order the ops end)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU],
                                  profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.end)
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def _state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


@dataclass
class BenchConfig:
    """What ``manifold-nets bench`` measures; saved with the results.

    Parameters
    ----------
    nets, optimisers, repeats, blocks, mlp_images, conv_images, batch, lr, step_calls, \
step_lr, grid_images, grid_arch, grid_depth, grid_seeds, threads, seed, data_dir, \
weight_sets, step_threads, step_rounds, device, step_family, extra
        The attributes below.

    Attributes
    ----------
    nets : tuple of str
        What to time: ``"mlp"``, ``"conv"``, ``"grid"``, ``"steps"`` (default: all).
    optimisers : tuple of str
        Names of :data:`OPTIMISERS` for ``mlp`` and ``conv`` (default: all).
    repeats : int
        Interleaved rounds (5).
    blocks : int
        Blocks per epoch, interleaved across optimisers (10).
    mlp_images, conv_images, grid_images : int
        Images per epoch of each network (50,000, 5,000, 10,000).
    batch : int
        Mini-batch size (100).
    lr : float
        The learning rate of the timed epochs (1e-4).
    step_calls : int
        Optimiser steps per timing of the step alone (200).
    step_lr : float
        The learning rate of those steps (1e-7: the weights barely move).
    grid_arch, grid_depth, grid_seeds
        The runs of the grid benchmark: ``grid_seeds`` seeds x 3 updates x 2 protocols
        of ``grid_arch`` with ``grid_depth`` layers (Arch2, 2, 5: 30 runs).
    threads : int
        Torch threads (1).
    seed : int
        Seeds the models and the batch orders.
    data_dir : str or None
        Where the MNIST files are (:func:`~manifold_nets.experiments.data.load_dataset`).
    weight_sets, step_threads, step_rounds, device
        The step benchmark: weight sets (``"resnet18"``, ``"linear4096"``), thread
        counts, interleaved rounds, and ``"cpu"`` or ``"cuda"``.
    step_family : {"sgd", "adam"}
        The step benchmark's optimisers: ``STEP_OPTIMISERS`` against
        ``torch.optim.SGD(foreach=True, momentum=0.9)``, or ``ADAM_STEP_OPTIMISERS``
        against ``torch.optim.AdamW(foreach=True)``.
    extra : dict
        Anything else to save with the results.

    Examples
    --------
    >>> from manifold_nets.experiments.bench import BenchConfig
    >>> cfg = BenchConfig(nets=("mlp",), optimisers=("sgd", "ours-un"), repeats=3)
    >>> cfg.nets, cfg.optimisers, cfg.repeats, cfg.batch, cfg.mlp_images
    (('mlp',), ('sgd', 'ours-un'), 3, 100, 50000)
    >>> BenchConfig().nets
    ('mlp', 'conv', 'grid', 'steps')
    """

    nets: tuple[str, ...] = NETS
    optimisers: tuple[str, ...] = tuple(OPTIMISERS)
    repeats: int = 5
    blocks: int = 10
    mlp_images: int = 50_000
    conv_images: int = 5_000
    batch: int = 100
    lr: float = 1e-4
    step_calls: int = 200
    step_lr: float = 1e-7
    grid_images: int = 10_000
    grid_arch: str = "arch2"
    grid_depth: int = 2
    grid_seeds: int = 5
    threads: int = 1
    seed: int = 0
    data_dir: str | None = None
    weight_sets: tuple[str, ...] = tuple(WEIGHT_SETS)
    step_threads: tuple[int, ...] = (1, 2)
    step_rounds: int = 7
    device: str = "cpu"
    step_family: str = "sgd"
    extra: dict = field(default_factory=dict)


def _median_ratio(times: dict[str, list[float]], name: str, base: str) -> dict[str, float]:
    ratios = [a / b for a, b in zip(times[name], times[base], strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def bench_net(net: str, x: torch.Tensor, y: torch.Tensor, cfg: BenchConfig,
              log=print) -> dict:
    """Epoch and step timings of every optimiser on one network (interleaved repeats)."""
    n_images = cfg.mlp_images if net == "mlp" else cfg.conv_images
    x, y = x[:n_images], y[:n_images]
    runs = {}
    for name in cfg.optimisers:
        update, factory = OPTIMISERS[name]
        model = bench_model(net, update, cfg.seed)
        runs[name] = (model, factory(model.parameters(), cfg.lr))
    gen = torch.Generator().manual_seed(cfg.seed)
    # warm-up: one epoch on 10 batches each (first-call allocations, momentum-free here)
    for model, opt in runs.values():
        _train_epoch(model, opt, x[: 10 * cfg.batch], y[: 10 * cfg.batch], cfg.batch, gen)
    epoch: dict[str, list[float]] = {k: [] for k in runs}
    epoch_cpu: dict[str, list[float]] = {k: [] for k in runs}
    losses: dict[str, float] = {}
    names = list(runs)
    # Each round trains one epoch per optimiser, cut into ``cfg.blocks`` blocks of
    # mini-batches; the blocks are interleaved (block k of every optimiser, then block
    # k + 1), so that optimisers compared in one round ran within seconds of each other.
    starts = list(range(0, len(x), cfg.batch))
    cuts = [starts[k * len(starts) // cfg.blocks:(k + 1) * len(starts) // cfg.blocks]
            for k in range(cfg.blocks)]
    for r in range(cfg.repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate the order
        perms = {name: torch.randperm(len(x), generator=gen) for name in order}
        wall = dict.fromkeys(order, 0.0)
        cpu = dict.fromkeys(order, 0.0)
        total = dict.fromkeys(order, 0.0)
        for block in cuts:
            for name in order:
                model, opt = runs[name]
                t0, c0 = time.perf_counter(), time.thread_time()
                total[name] += _train_batches(model, opt, x, y, perms[name], block, cfg.batch)
                cpu[name] += time.thread_time() - c0
                wall[name] += time.perf_counter() - t0
        for name in order:
            epoch[name].append(wall[name])
            epoch_cpu[name].append(cpu[name])
            losses[name] = total[name] / len(x)
        log(f"  {net} epoch round {r + 1}/{cfg.repeats}: "
            + ", ".join(f"{k} {epoch[k][-1]:.3f}s" for k in names))
    # the optimiser step alone: fixed gradients from one batch, a tiny lr, many calls
    step: dict[str, list[float]] = {k: [] for k in runs}
    step_cpu: dict[str, list[float]] = {k: [] for k in runs}
    for model, opt in runs.values():
        for g in opt.param_groups:
            g["lr"] = cfg.step_lr
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[: cfg.batch]), y[: cfg.batch], reduction="sum").backward()
        for _ in range(20):
            opt.step()
    for r in range(max(cfg.repeats, 5)):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            opt = runs[name][1]
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(cfg.step_calls):
                opt.step()
            step_cpu[name].append((time.thread_time() - c0) / cfg.step_calls)
            step[name].append((time.perf_counter() - t0) / cfg.step_calls)
    memory = {}
    for name, (model, opt) in runs.items():
        memory[name] = {
            "step_peak_bytes": _step_peak_bytes(opt.step),
            "state_bytes": _state_bytes(opt),
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        }
    result = {"images": n_images, "steps_per_epoch": -(-n_images // cfg.batch),
              "optimisers": {}}
    for name in names:
        row = {
            "epoch_s": statistics.median(epoch[name]),
            "epoch_s_all": epoch[name],
            "epoch_vs_sgd": _median_ratio(epoch, name, "sgd") if "sgd" in epoch else None,
            "epoch_vs_sphere": (_median_ratio(epoch, name, "geoopt-sphere")
                                if "geoopt-sphere" in epoch else None),
            "epoch_cpu_s": statistics.median(epoch_cpu[name]),
            "epoch_cpu_s_all": epoch_cpu[name],
            "epoch_cpu_vs_sgd": (_median_ratio(epoch_cpu, name, "sgd")
                                 if "sgd" in epoch else None),
            "epoch_cpu_vs_sphere": (_median_ratio(epoch_cpu, name, "geoopt-sphere")
                                    if "geoopt-sphere" in epoch else None),
            "step_us": 1e6 * statistics.median(step[name]),
            "step_cpu_us": 1e6 * statistics.median(step_cpu[name]),
            "step_cpu_vs_sgd": (_median_ratio(step_cpu, name, "sgd")
                                if "sgd" in step else None),
            "step_cpu_vs_sgd_foreach": (_median_ratio(step_cpu, name, "sgd-foreach")
                                        if "sgd-foreach" in step else None),
            "step_vs_sgd": _median_ratio(step, name, "sgd") if "sgd" in step else None,
            "step_vs_sgd_foreach": (_median_ratio(step, name, "sgd-foreach")
                                    if "sgd-foreach" in step else None),
            "mean_loss_last_epoch": losses[name],
            **memory[name],
        }
        result["optimisers"][name] = row
    return result


def bench_grid(x: torch.Tensor, y: torch.Tensor, cfg: BenchConfig, log=print) -> dict:
    """Training throughput of the Table 2 grid's two engines, in run-epochs per second.

    ``cfg.grid_seeds`` seeds x 3 updates x 2 protocols of ``cfg.grid_arch`` with
    ``cfg.grid_depth`` layers (30 runs by default, as ``reproduce --engine stacked`` stacks them)
    train one epoch on ``cfg.grid_images`` images, each seed with its own batch order:
    once as one stack (:func:`~.engines.fit_stacked`) and, for one run of each update, one
    after another with :func:`~.engines.fit` (the sequential engine); the rounds alternate
    the two.
    """
    from .config import StoppingRule, TrainConfig, make_schedule
    from .engines import build_model, fit, fit_stacked
    from .loop import Stream
    from .stacked import StackedNet

    x, y = x[: cfg.grid_images], y[: cfg.grid_images]
    configs = [TrainConfig(arch=cfg.grid_arch, depth=cfg.grid_depth, update=u, protocol=p,
                           seed=s)
               for s in range(cfg.grid_seeds) for u in UPDATES
               for p in ("exp-decay", "bold-driver")]
    sequential = [c for c in configs if c.seed == 0 and c.protocol == "exp-decay"]

    def model(c):
        return build_model(c, torch.Generator().manual_seed(c.seed))

    def once() -> StoppingRule:
        return StoppingRule(1, 1, enabled=False)

    times: dict[str, list[float]] = {"stacked": [], "sequential": []}
    for r in range(cfg.repeats):
        for engine in (("stacked", "sequential") if r % 2 == 0 else ("sequential", "stacked")):
            gens = [torch.Generator().manual_seed(1000 * r + s) for s in range(cfg.grid_seeds)]
            if engine == "stacked":
                net = StackedNet.from_models([model(c) for c in configs])
                t0 = time.perf_counter()
                fit_stacked(net, x, y, lr=[cfg.lr] * len(configs),
                            schedules=[make_schedule(c) for c in configs],
                            stopping=[once() for _ in configs], batch_size=cfg.batch,
                            streams=[Stream(torch.arange(len(x)), g) for g in gens],
                            stream_of_run=[c.seed for c in configs])
                times[engine].append((time.perf_counter() - t0) / len(configs))
            else:
                ms = [model(c) for c in sequential]
                t0 = time.perf_counter()
                for c, m in zip(sequential, ms, strict=True):
                    fit(m, x, y, lr=cfg.lr, schedule=make_schedule(c), stopping=once(),
                        batch_size=cfg.batch, generator=gens[0])
                times[engine].append((time.perf_counter() - t0) / len(sequential))
        log(f"  grid round {r + 1}/{cfg.repeats}: s per run-epoch: stacked "
            f"{times['stacked'][-1]:.3f}, sequential {times['sequential'][-1]:.3f}")
    speedup = [s / b for s, b in zip(times["sequential"], times["stacked"], strict=True)]
    return {
        "images": len(x), "runs": len(configs), "arch": cfg.grid_arch,
        "depth": cfg.grid_depth, "seeds": cfg.grid_seeds,
        "run_epoch_s": {k: statistics.median(v) for k, v in times.items()},
        "run_epoch_s_all": times,
        "speedup": {"median": statistics.median(speedup), "min": min(speedup),
                    "max": max(speedup)},
    }


def _step_params(shapes, update: str, seed: int = 0, device: str = "cpu",
                 channels_last: bool = False) -> list[torch.Tensor]:
    """Parameters of the given shapes, declared as Table 1's filters for ``update`` (every
    dim after the first), with fixed random gradients; 4-D ones in ``channels_last`` if
    asked."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        fmt = (torch.channels_last if channels_last and len(shape) == 4
               else torch.contiguous_format)
        w = torch.randn(shape, generator=gen).to(device).contiguous(memory_format=fmt)
        m = manifold_for(update, "filters", len(shape))
        p = nn.Parameter(w) if m is None else geoopt.ManifoldParameter(m.projx(w), manifold=m)
        p.grad = torch.randn(shape, generator=gen).to(device).contiguous(memory_format=fmt)
        out.append(p)
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _cuda_peak_bytes(fn) -> int:
    """The CUDA memory ``fn`` allocates beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def bench_steps(cfg: BenchConfig, log=print) -> dict:
    """The optimiser step alone at the sizes people train, momentum 0.9, side by side.

    For every weight set of ``cfg.weight_sets`` and thread count of ``cfg.step_threads``,
    the optimisers of :data:`STEP_OPTIMISERS` step the same shapes with fixed gradients,
    in ``cfg.step_rounds`` interleaved rounds (the order rotates); reported: the median
    step time, the median of the per-round ratios to ``torch.optim.SGD(foreach=True,
    momentum=0.9)``, and the peak memory one step allocates. The memory floor: SGD with
    momentum reads the weight, the gradient and the buffer and writes the weight and the
    buffer once each (5 passes of the weight's bytes).
    """
    out: dict = {}
    threads_before = torch.get_num_threads()
    for wset in cfg.weight_sets:
        shapes = WEIGHT_SETS[wset]
        numel = sum(math.prod(s) for s in shapes)
        out[wset] = {"parameters": numel, "threads": {}}
        runs = {}
        adam = cfg.step_family == "adam"
        optimisers = dict(ADAM_STEP_OPTIMISERS if adam else STEP_OPTIMISERS)
        base = "adamw-foreach" if adam else "sgd-foreach"
        key = f"vs_{base.replace('-', '_')}"
        out[wset]["base"] = base
        if cfg.device == "cuda" and not adam:  # torch's fused CUDA SGD, the GPU's floor
            optimisers["sgd-fused"] = ("bsgd", lambda ps: torch.optim.SGD(
                ps, lr=1e-7, momentum=0.9, fused=True))
        for name, (update, factory) in optimisers.items():
            params = _step_params(shapes, update, cfg.seed, cfg.device,
                                  channels_last=wset.endswith("-channels-last"))
            opt = factory(params)
            opt.step()  # the momentum buffers exist from here on
            runs[name] = opt
        memory = ({name: _step_peak_bytes(opt.step) for name, opt in runs.items()}
                  if cfg.device == "cpu" else {name: _cuda_peak_bytes(opt.step)
                                               for name, opt in runs.items()})
        for threads in cfg.step_threads:
            torch.set_num_threads(threads)
            times: dict[str, list[float]] = {k: [] for k in runs}
            names = list(runs)
            calls = 3
            for r in range(cfg.step_rounds):
                order = names[r % len(names):] + names[: r % len(names)]
                for name in order:
                    opt = runs[name]
                    opt.step()  # warm
                    _sync(cfg.device)
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        opt.step()
                    _sync(cfg.device)
                    times[name].append((time.perf_counter() - t0) / calls)
            rows = {name: {"step_ms": 1e3 * statistics.median(t),
                           key: _median_ratio(times, name, base),
                           "step_ms_all": [1e3 * v for v in t],
                           "step_peak_bytes": memory[name]}
                    for name, t in times.items()}
            out[wset]["threads"][threads] = rows
            log(f"  steps {wset} ({numel / 1e6:.1f}M parameters), {threads} thread(s): "
                + ", ".join(f"{k} {v[key]['median']:.2f}x"
                            for k, v in rows.items()))
    torch.set_num_threads(threads_before)
    return out


def run_bench(cfg: BenchConfig, log=print) -> dict:
    """Run every benchmark of ``cfg``; returns a JSON-ready dict (config, machine, results).

    Parameters
    ----------
    cfg : BenchConfig
        What to measure. The MNIST training images are read (no download) when ``mlp``,
        ``conv`` or ``grid`` is among ``cfg.nets``.
    log : callable, optional
        Called with a line of progress after every round (default :func:`print`).

    Returns
    -------
    dict
        ``config`` (``cfg`` as a dict), ``machine`` (platform, CPUs, threads, versions,
        load average before and after, peak RSS), ``data`` (the images' folder or
        ``None``), ``nets`` (per network, the timings of every optimiser), and ``grid``
        and ``steps`` when measured.

    Examples
    --------
    A real benchmark runs for minutes; with no network to time, the call only records
    the configuration and the machine:

    >>> from manifold_nets.experiments.bench import BenchConfig, run_bench
    >>> out = run_bench(BenchConfig(nets=()))
    >>> sorted(out), out["nets"], out["config"]["repeats"]
    (['config', 'data', 'machine', 'nets'], {}, 5)
    >>> out["machine"]["threads"]
    1
    """
    torch.set_num_threads(cfg.threads)
    n = max(cfg.mlp_images if "mlp" in cfg.nets else 0,
            cfg.conv_images if "conv" in cfg.nets else 0,
            cfg.grid_images if "grid" in cfg.nets else 0)
    x, y, source = load_train_images(cfg.data_dir, n) if n else (None, None, None)
    out = {
        "config": asdict(cfg),
        "machine": {
            "platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "geoopt": geoopt.__version__,
            "python": platform.python_version(),
            "load_avg_before": os.getloadavg(),
        },
        "data": source,
        "nets": {},
    }
    for net in cfg.nets:
        if net == "grid":
            out["grid"] = bench_grid(x, y, cfg, log)
        elif net == "steps":
            out["steps"] = bench_steps(cfg, log)
        else:
            out["nets"][net] = bench_net(net, x, y, cfg, log)
    out["machine"]["load_avg_after"] = os.getloadavg()
    out["machine"]["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _fmt_ratio(r) -> str:
    return "-" if r is None else f"{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]"


def format_table(result: dict) -> str:
    """The results as plain-text tables, one per network."""
    lines = []
    cfg = result["config"]
    m = result["machine"]
    lines.append(f"torch {m['torch']}, geoopt {m['geoopt']}, {m['threads']} thread(s), "
                 f"{m['cpu_count']} CPUs, load average {m['load_avg_before'][0]:.1f} -> "
                 f"{m['load_avg_after'][0]:.1f}; {cfg['repeats']} rounds of interleaved "
                 f"epochs, each cut into {cfg.get('blocks', 1)} interleaved blocks; "
                 "ratios: median [min-max] of per-round ratios; 'cpu:' columns use this "
                 "thread's CPU time (time.thread_time), less sensitive to other processes")
    head = ("optimiser", "epoch s", "epoch / sgd", "epoch / sphere", "cpu: epoch / sgd",
            "cpu: epoch / sphere", "step us", "step / sgd-foreach", "cpu: step / sgd",
            "cpu: step / sgd-foreach", "step peak KiB")
    for net, res in result["nets"].items():
        lines.append("")
        lines.append(f"{net}: {res['images']} images, batch {cfg['batch']}, "
                     f"{res['steps_per_epoch']} steps per epoch")
        rows = [head]
        for name, r in res["optimisers"].items():
            rows.append((name, f"{r['epoch_s']:.3f}", _fmt_ratio(r["epoch_vs_sgd"]),
                         _fmt_ratio(r["epoch_vs_sphere"]), _fmt_ratio(r["epoch_cpu_vs_sgd"]),
                         _fmt_ratio(r["epoch_cpu_vs_sphere"]), f"{r['step_us']:.1f}",
                         _fmt_ratio(r["step_vs_sgd_foreach"]), _fmt_ratio(r["step_cpu_vs_sgd"]),
                         _fmt_ratio(r["step_cpu_vs_sgd_foreach"]),
                         f"{r['step_peak_bytes'] / 1024:.0f}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        for row in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if "grid" in result:
        g = result["grid"]
        t, sp = g["run_epoch_s"], g["speedup"]
        lines.append("")
        lines.append(f"grid: {g['runs']} runs ({g['arch']}, {g['depth']} layers, "
                     f"{g['seeds']} seeds x 3 updates x 2 protocols), one epoch of "
                     f"{g['images']} images; s per run-epoch: stacked {t['stacked']:.3f}, "
                     f"sequential {t['sequential']:.3f}; throughput stacked / sequential "
                     f"{_fmt_ratio(sp)}")
    for wset, res in result.get("steps", {}).items():
        base = res.get("base", "sgd-foreach")
        key = f"vs_{base.replace('-', '_')}"
        for threads, rows in res["threads"].items():
            lines.append("")
            lines.append(f"steps: {wset} ({res['parameters'] / 1e6:.1f}M parameters), "
                         + ("AdamW's moments" if base.startswith("adamw") else
                            "momentum 0.9") + f", {threads} thread(s)"
                         + ("" if base.startswith("adamw") else "; floor: 1.0 (SGD's 5 "
                                                                  "passes)"))
            table = [("optimiser", "step ms", f"step / {base}", "step peak MiB")]
            table += [(name, f"{r['step_ms']:.2f}", _fmt_ratio(r[key]),
                       f"{r['step_peak_bytes'] / 2**20:.1f}") for name, r in rows.items()]
            widths = [max(len(row[i]) for row in table) for i in range(4)]
            for row in table:
                lines.append("  ".join(c.ljust(w)
                                       for c, w in zip(row, widths, strict=True)).rstrip())
    lines.append("")
    lines.append(f"peak RSS of the process: {m['max_rss_mib']:.0f} MiB")
    return "\n".join(lines)
