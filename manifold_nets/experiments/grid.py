r"""The grid of Table 2 on either engine, with a resumable results store.

The grid is 2 architectures x 2 depths (2, 4) x 2 protocols x 3 updates x ``runs`` (10)
runs; each run is a full run of the protocol (its own learning-rate selection included).
Run ``r`` of every cell uses seed ``seed + r``, so the cells share their data splits and
batch orders run by run (common random numbers).

Engines (:func:`run_grid`)
    ``"sequential"``: one task per run (:func:`~.engines.train`). ``"stacked"``: one task
    per group of runs of one architecture and depth and up to ``seeds_per_group`` seeds,
    every protocol and update (30 runs by default), trained as one stacked model
    (:func:`~.engines.train_group`). Both write the same records.

Results store
    ``<out>/runs/<run id>.json``, one JSON record per finished run, written atomically
    (:class:`~.store.ResultStore`). A killed grid loses at most the work in flight, and
    rerunning the same command skips the finished runs. A stacked group in flight
    checkpoints after every epoch into ``<out>/inflight/`` and resumes from its last
    finished epoch; a sequential run in flight restarts (``manifold-nets train
    --checkpoint`` resumes one run epoch by epoch). Shards (``--shard i/n``) and separate
    machines can write into the same folder (or folders merged by copying the files): a
    run id is one file, so there are never duplicates. Records made with another
    configuration are refused, not mixed.

The report is :mod:`~manifold_nets.experiments.report`.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import ARCHS, PROTOCOLS, UPDATES, TrainConfig
from .engines import group_key, train, train_group
from .progress import tqdm
from .store import ResultStore

__all__ = [
    "DEPTHS",
    "ENGINES",
    "RunSpec",
    "grid",
    "run_grid",
    "shard",
]

#: The depths of Table 2 (hidden layers of Arch1 and Arch2).
DEPTHS = (2, 4)

#: The engines :func:`run_grid` can run the grid on.
ENGINES = ("sequential", "stacked")


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid.

    Parameters
    ----------
    arch : {"arch1", "arch2"}
        The network.
    depth : int
        Hidden layers (2 or 4 in Table 2).
    protocol : {"exp-decay", "bold-driver"}
        The learning-rate protocol.
    update : {"bsgd", "sm", "un"}
        The update of Table 1.
    run : int
        The run's index within its cell (its seed is ``seed + run``).

    Attributes
    ----------
    arch, depth, protocol, update, run
        As given.

    Examples
    --------
    >>> from manifold_nets.experiments.grid import RunSpec
    >>> spec = RunSpec("arch2", 4, "bold-driver", "un", 3)
    >>> spec.cell
    (4, 'bold-driver', 'arch2', 'un')
    >>> spec.run_id("mnist")
    'mnist-arch2-d4-bold-driver-un-r003'
    """

    arch: str
    depth: int
    protocol: str
    update: str
    run: int

    @property
    def cell(self) -> tuple[int, str, str, str]:
        """The cell of Table 2 the run belongs to: ``(depth, protocol, arch, update)``.

        Returns
        -------
        tuple
            ``(depth, protocol, arch, update)``; the runs of one cell differ only in
            ``run``.

        Examples
        --------
        >>> from manifold_nets.experiments.grid import RunSpec
        >>> RunSpec("arch1", 2, "exp-decay", "sm", 0).cell
        (2, 'exp-decay', 'arch1', 'sm')
        """
        return (self.depth, self.protocol, self.arch, self.update)

    def run_id(self, dataset: str) -> str:
        """The run's name in the results store (its file is ``<run id>.json``).

        Parameters
        ----------
        dataset : str
            ``"mnist"`` or ``"fashion-mnist"``.

        Returns
        -------
        str
            ``<dataset>-<arch>-d<depth>-<protocol>-<update>-r<run, 3 digits>``.

        Examples
        --------
        >>> from manifold_nets.experiments.grid import RunSpec
        >>> RunSpec("arch1", 2, "exp-decay", "sm", 12).run_id("fashion-mnist")
        'fashion-mnist-arch1-d2-exp-decay-sm-r012'
        """
        return f"{dataset}-{self.arch}-d{self.depth}-{self.protocol}-{self.update}-r{self.run:03d}"

    def config(self, base: TrainConfig, seed: int = 0) -> TrainConfig:
        """The run's configuration: ``base`` with this architecture, depth, protocol and
        update, and seed ``seed + run``.

        Parameters
        ----------
        base : TrainConfig
            Every other setting of the run.
        seed : int, optional
            The seed of run 0 (default 0).

        Returns
        -------
        TrainConfig
            A new, validated configuration; ``base`` is not modified.

        Examples
        --------
        >>> from manifold_nets.experiments.config import TrainConfig
        >>> from manifold_nets.experiments.grid import RunSpec
        >>> c = RunSpec("arch1", 4, "exp-decay", "sm", 2).config(TrainConfig(), seed=10)
        >>> c.arch, c.depth, c.protocol, c.update, c.seed
        ('arch1', 4, 'exp-decay', 'sm', 12)
        """
        d = base.to_dict()
        d.update(arch=self.arch, depth=self.depth, protocol=self.protocol, update=self.update,
                 seed=seed + self.run)
        return TrainConfig.from_dict(d)


def grid(
    archs: Sequence[str] = ARCHS,
    depths: Sequence[int] = DEPTHS,
    protocols: Sequence[str] = PROTOCOLS,
    updates: Sequence[str] = UPDATES,
    runs: int = 10,
) -> list[RunSpec]:
    """All runs, run index outermost (so a partial grid covers every cell evenly).

    Parameters
    ----------
    archs, depths, protocols, updates : sequence
        The values of each axis (default: all of Table 2).
    runs : int, optional
        Runs per cell (default 10).

    Returns
    -------
    list of RunSpec
        ``runs x len(depths) x len(protocols) x len(archs) x len(updates)`` runs: every
        cell's run 0 first, then every cell's run 1, and so on.

    Examples
    --------
    >>> from manifold_nets.experiments.grid import grid
    >>> len(grid())
    240
    >>> specs = grid(archs=("arch1",), depths=(2,), runs=2)
    >>> [(s.protocol, s.update, s.run) for s in specs][:3]
    [('exp-decay', 'bsgd', 0), ('exp-decay', 'sm', 0), ('exp-decay', 'un', 0)]
    >>> len(specs), specs[6].run
    (12, 1)
    """
    return [
        RunSpec(a, d, p, u, r)
        for r in range(runs)
        for d in depths
        for p in protocols
        for a in archs
        for u in updates
    ]


def shard(specs: Sequence[RunSpec], index: int, count: int) -> list[RunSpec]:
    """Shard ``index`` (1-based) of ``count``: every ``count``-th run of the grid.

    The shards are disjoint and together hold every run, so ``count`` machines can each
    run one (``--shard i/n``) into the same results store.

    Parameters
    ----------
    specs : sequence of RunSpec
        The runs (see :func:`grid`).
    index : int
        Which shard, from 1 to ``count``.
    count : int
        The number of shards.

    Returns
    -------
    list of RunSpec
        ``specs[index - 1 :: count]``.

    Raises
    ------
    ValueError
        If ``index`` is not between 1 and ``count``.

    Examples
    --------
    >>> from manifold_nets.experiments.grid import grid, shard
    >>> specs = grid()
    >>> [len(shard(specs, i, 7)) for i in range(1, 8)]
    [35, 35, 34, 34, 34, 34, 34]
    >>> set().union(*(shard(specs, i, 7) for i in range(1, 8))) == set(specs)
    True
    >>> shard(specs, 0, 7)
    Traceback (most recent call last):
    ...
    ValueError: Invalid shard 0/7: need 1 <= i <= n
    """
    if not 1 <= index <= count:
        raise ValueError(f"Invalid shard {index}/{count}: need 1 <= i <= n")
    return list(specs[index - 1 :: count])


# --------------------------------------------------------------------------------------
# Running.

_WORKER_DATA = None


def _init_worker(dataset: str, data_dir: str | None, threads: int) -> None:
    global _WORKER_DATA
    torch.set_num_threads(threads)
    from .data import load_dataset

    _WORKER_DATA = load_dataset(dataset, data_dir)


def _finished(store: ResultStore, run_id: str, record: dict) -> None:
    record["run_id"] = run_id
    record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    store.write(run_id, record)


def _run_one(task: tuple[dict, str, str, bool]) -> dict:
    config_dict, run_id, root, progress = task
    record = train(TrainConfig.from_dict(config_dict), _WORKER_DATA, progress=progress)
    _finished(ResultStore(root), run_id, record)
    return {"runs": 1, "label": run_id, "test_error": record["test_error"],
            "wall_time_s": record["wall_time_s"]}


def _run_group(task: tuple[list[dict], list[str], str, bool]) -> dict:
    config_dicts, run_ids, root, _ = task
    start = time.perf_counter()
    store = ResultStore(root)
    checkpoint = store.group_checkpoint(run_ids)
    if checkpoint.exists():
        print(f"resuming the group of {', '.join(run_ids[:2])}, ... from {checkpoint}",
              file=sys.stderr, flush=True)
    records = train_group([TrainConfig.from_dict(d) for d in config_dicts], _WORKER_DATA,
                          checkpoint=checkpoint)
    for run_id, record in zip(run_ids, records, strict=True):
        _finished(store, run_id, record)
    checkpoint.unlink(missing_ok=True)
    c = config_dicts[0]
    seeds = sorted({d["seed"] for d in config_dicts})
    return {"runs": len(records), "wall_time_s": round(time.perf_counter() - start, 1),
            "label": f"{c['arch']} d{c['depth']} seeds {seeds[0]}-{seeds[-1]}"}


def _pending_runs(specs: Sequence[RunSpec], base: TrainConfig, store: ResultStore,
                  seed: int = 0) -> tuple[list[tuple[TrainConfig, str]], int]:
    """The ``(config, run id)`` of every spec the store does not hold yet, and the number
    it holds.

    Raises
    ------
    ConfigMismatch
        If the store holds a record of one of these runs made with another configuration.
    """
    pending, done = [], 0
    for spec in specs:
        config = spec.config(base, seed)
        run_id = spec.run_id(base.dataset)
        if store.finished(run_id, config.to_dict()) is not None:
            done += 1
        else:
            pending.append((config, run_id))
    return pending, done


def _groups(pending: list[tuple[TrainConfig, str]], seeds_per_group: int
            ) -> list[list[tuple[TrainConfig, str]]]:
    """The pending runs as stacked groups: one architecture and depth (one
    :func:`~.engines.group_key`), up to ``seeds_per_group`` seeds; the costliest first."""
    by_key: dict[tuple, list[tuple[TrainConfig, str]]] = {}
    for config, run_id in pending:
        by_key.setdefault(group_key(config), []).append((config, run_id))
    groups = []
    for members in by_key.values():
        seeds = sorted({c.seed for c, _ in members})
        for k in range(0, len(seeds), seeds_per_group):
            chunk = set(seeds[k : k + seeds_per_group])
            groups.append([(c, r) for c, r in members if c.seed in chunk])

    def cost(g) -> float:
        c = g[0][0]
        return len(g) * (c.width * 784 + c.depth * c.width**2 * (8 if c.arch == "arch2" else 4))

    return sorted(groups, key=lambda g: -cost(g))


def _map_in_workers(func, tasks: Sequence, *, jobs: int, dataset: str,
                    data_dir: str | None, threads: int, data=None):
    """Yield ``func(task)`` for every task, in this process (``jobs=1``, on ``data`` if
    given) or in ``jobs`` spawned worker processes, in the order they finish. Every
    process loads the data set once; ``func`` reads it from ``_WORKER_DATA``."""
    global _WORKER_DATA
    if jobs == 1:
        if data is None:
            _init_worker(dataset, data_dir, threads)
        else:
            torch.set_num_threads(threads)
            _WORKER_DATA = data
        for task in tasks:
            yield func(task)
        return
    import multiprocessing as mp

    # tqdm's default lock is a multiprocessing semaphore that the spawn resource tracker
    # reports as leaked; the bars live in this process only.
    tqdm.set_lock(threading.RLock())
    pool = mp.get_context("spawn").Pool(jobs, _init_worker, (dataset, data_dir, threads))
    try:
        yield from pool.imap_unordered(func, tasks, chunksize=1)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def run_grid(
    specs: Sequence[RunSpec],
    base: TrainConfig,
    store: ResultStore,
    *,
    engine: str = "sequential",
    seed: int = 0,
    jobs: int = 1,
    data_dir: str | None = None,
    threads: int = 1,
    progress: bool | None = None,
    data=None,
    seeds_per_group: int = 5,
) -> dict:
    """Run every spec that the store does not hold yet; return counts and timings.

    Parameters
    ----------
    specs : sequence of RunSpec
        the runs (see :func:`grid` and :func:`shard`)
    base : TrainConfig
        every run's configuration but architecture, depth, protocol, update and seed
    store : ResultStore
        where the records go (and where finished runs are found)
    engine : {"sequential", "stacked"}
        one task per run, or one task per group of runs trained as one stacked model
        (one architecture and depth, up to ``seeds_per_group`` seeds)
    seed : int
        run ``r`` of every cell uses seed ``seed + r``
    jobs, threads : int
        worker processes (``jobs=1``: this process, on ``data`` if given), and torch
        threads in each
    data_dir : str, optional
        where the workers find the data set
    progress : bool or None
        a progress bar (``None``: when stderr is a terminal)
    data : manifold_nets.experiments.data.Dataset, optional
        with ``jobs=1``: the data set in memory (otherwise this process loads it from
        ``data_dir``); worker processes always load it themselves
    seeds_per_group : int
        with ``engine="stacked"``: the most seeds a group holds (default 5, i.e. 30 runs)

    Returns
    -------
    dict
        ``skipped`` (runs the store held), ``ran``, ``tasks``, ``wall_time_s``.

    Raises
    ------
    ValueError
        If ``engine`` is not one of :data:`ENGINES`.
    ConfigMismatch
        If the store holds a record of one of these runs made with another configuration.

    Examples
    --------
    Two runs of the grid on a tiny random data set (784 features, as the nets of the
    grid expect), for one epoch each, then the same command again, which finds them
    finished:

    >>> import tempfile
    >>> from manifold_nets.experiments.config import TrainConfig
    >>> from manifold_nets.experiments.data import Dataset
    >>> from manifold_nets.experiments.grid import grid, run_grid
    >>> from manifold_nets.experiments.store import ResultStore
    >>> data = Dataset.synthetic(60, 10)
    >>> base = TrainConfig(width=4, lr=0.01, batch_size=20, train_size=40, val_size=10,
    ...                    test_size=10, select_train=20, select_val=10, min_epochs=1,
    ...                    max_epochs=1)
    >>> specs = grid(archs=("arch1",), depths=(2,), protocols=("exp-decay",),
    ...              updates=("sm", "un"), runs=1)
    >>> store = ResultStore(tempfile.mkdtemp())
    >>> out = run_grid(specs, base, store, data=data, progress=False)
    >>> out["ran"], out["tasks"], len(store.records())
    (2, 2, 2)
    >>> out = run_grid(specs, base, store, data=data, progress=False)
    >>> out["skipped"], out["ran"]
    (2, 0)
    >>> run_grid(specs, base, store, engine="parallel")
    Traceback (most recent call last):
    ...
    ValueError: unknown engine 'parallel'; choose one of sequential, stacked
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    pending, done = _pending_runs(specs, base, store, seed)
    summary = {"skipped": done, "ran": 0, "tasks": 0, "wall_time_s": 0.0}
    if not pending:
        return summary
    start = time.perf_counter()
    bar = tqdm(total=len(pending), desc=f"grid ({engine})", unit="run",
               disable=None if progress is None else not progress, file=sys.stderr)
    root = str(store.root)
    if engine == "sequential":
        # a run's own bar only when the runs happen here, under a visible grid bar
        run_bar = None if jobs == 1 and bar.disable is False else False
        func, tasks = _run_one, [(c.to_dict(), r, root, run_bar) for c, r in pending]
    else:
        func, tasks = _run_group, [([c.to_dict() for c, _ in g], [r for _, r in g], root,
                                    False) for g in _groups(pending, seeds_per_group)]
    summary["tasks"] = len(tasks)
    with bar:
        for out in _map_in_workers(func, tasks, jobs=jobs, dataset=base.dataset,
                                   data_dir=data_dir, threads=threads, data=data):
            summary["ran"] += out["runs"]
            bar.update(out["runs"])
            if engine == "sequential":
                bar.set_postfix_str(f"last test {out['test_error']:.4f}", refresh=False)
            else:
                bar.write(f"{out['label']}: {out['runs']} runs in {out['wall_time_s']} s "
                          f"(at {time.perf_counter() - start:.0f} s)", file=sys.stderr)
    summary["wall_time_s"] = round(time.perf_counter() - start, 1)
    return summary
