r"""The resumable results store: one JSON record per finished run, written atomically.

A record is ``<root>/runs/<run id>.json`` (for the CamVid protocol, ``<out>/<update>/<run
name>.json``), written by :func:`~.io.atomic_write`, so a killed experiment loses at most
the work in flight. Before a run trains, :meth:`ResultStore.finished` looks for its record:
a record of the same configuration is reused (the run is never trained twice), a record of
another configuration is refused (:class:`ConfigMismatch`), and a damaged one is reported
and replaced. The grid of Table 2 (:mod:`~manifold_nets.experiments.grid`) and the CamVid
protocol (:mod:`~manifold_nets.experiments.camvid.protocol`) both keep their records here.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from .config import config_diff
from .io import atomic_write

__all__ = ["ConfigMismatch", "ResultStore"]


class ResultStore:
    """One JSON file per finished run in ``<root>/<runs>/``, written atomically.

    Parameters
    ----------
    root : path
        The store's folder (the grid's or the CamVid protocol's ``--out``); created on the
        first write.
    runs : str, default "runs"
        The subfolder of the records; ``"."`` keeps them in ``root`` itself (the CamVid
        protocol's layout, ``<out>/<update>/<run>.json``).
    indent : int, optional
        The indentation of the JSON records; ``None`` (the default) writes each record as
        one compact line.

    Attributes
    ----------
    root : pathlib.Path
        The store's folder.
    runs : pathlib.Path
        ``<root>/<runs>``: one ``<run id>.json`` per finished run.
    inflight : pathlib.Path
        ``<root>/inflight``: the checkpoints of stacked groups in flight.

    Examples
    --------
    >>> import tempfile
    >>> from manifold_nets.experiments.store import ResultStore
    >>> store = ResultStore(tempfile.mkdtemp())
    >>> _ = store.write("mnist-arch1-d2-exp-decay-un-r000", {"test_error": 0.02})
    >>> store.read("mnist-arch1-d2-exp-decay-un-r000")
    {'test_error': 0.02}
    >>> store.read("mnist-arch1-d2-exp-decay-sm-r000") is None
    True
    """

    def __init__(self, root: str | os.PathLike, runs: str = "runs",
                 indent: int | None = None):
        self.root = Path(root)
        self.runs = self.root / runs
        self.inflight = self.root / "inflight"
        self.indent = indent

    def path(self, run_id: str) -> Path:
        """The file of ``run_id``'s record (whether it exists or not).

        Parameters
        ----------
        run_id : str
            A run id (:meth:`~.grid.RunSpec.run_id`).

        Returns
        -------
        pathlib.Path
            ``<root>/<runs>/<run_id>.json``.

        Examples
        --------
        >>> from manifold_nets.experiments.store import ResultStore
        >>> ResultStore("out").path("mnist-arch1-d2-exp-decay-un-r000").as_posix()
        'out/runs/mnist-arch1-d2-exp-decay-un-r000.json'
        """
        return self.runs / f"{run_id}.json"

    def write(self, run_id: str, record: dict) -> Path:
        """Write ``run_id``'s record as JSON (one line unless the store has an ``indent``),
        atomically (:func:`~manifold_nets.experiments.io.atomic_write`).

        Parameters
        ----------
        run_id : str
            A run id (:meth:`~.grid.RunSpec.run_id`).
        record : dict
            A JSON-ready record (e.g. what
            :func:`~manifold_nets.experiments.engines.train` returns).

        Returns
        -------
        pathlib.Path
            The record's file.

        Examples
        --------
        >>> import tempfile
        >>> from manifold_nets.experiments.store import ResultStore
        >>> store = ResultStore(tempfile.mkdtemp())
        >>> store.write("r1", {"test_error": 0.5}).read_text()
        '{"test_error":0.5}\\n'
        """
        self.runs.mkdir(parents=True, exist_ok=True)
        if self.indent is None:
            text = json.dumps(record, separators=(",", ":")) + "\n"
        else:
            text = json.dumps(record, indent=self.indent) + "\n"
        return atomic_write(self.path(run_id), text)

    def read(self, run_id: str) -> dict | None:
        """The record of ``run_id``, or ``None`` if it is missing or unreadable.

        Parameters
        ----------
        run_id : str
            A run id (:meth:`~.grid.RunSpec.run_id`).

        Returns
        -------
        dict or None
            The record; ``None`` if there is no file or it does not hold JSON (then the
            run counts as not finished and runs again).

        Examples
        --------
        >>> import tempfile
        >>> from manifold_nets.experiments.store import ResultStore
        >>> store = ResultStore(tempfile.mkdtemp())
        >>> _ = store.write("r1", {"test_error": 0.5})
        >>> store.read("r1"), store.read("r2")
        ({'test_error': 0.5}, None)
        """
        try:
            return json.loads(self.path(run_id).read_text())
        except (OSError, ValueError):
            return None

    def finished(self, run_id: str, config: dict) -> dict | None:
        """The record of ``run_id`` if the run finished with ``config``; ``None`` if it has
        to run (again).

        A record that is not JSON (a file damaged outside the store: the store's own
        writes are atomic) is reported with a warning and the run runs again; a record of
        another configuration is refused, never mixed with this one's.

        Parameters
        ----------
        run_id : str
            A run id (:meth:`~.grid.RunSpec.run_id`).
        config : dict
            The run's configuration as the record stores it under ``"config"`` (e.g.
            :meth:`~manifold_nets.experiments.config.TrainConfig.to_dict`).

        Returns
        -------
        dict or None
            The stored record, or ``None`` if there is none or it does not hold JSON.

        Raises
        ------
        ConfigMismatch
            If the record was made with another configuration; the message names every
            differing field and the fix.

        Warns
        -----
        UserWarning
            If the record's file does not hold JSON.

        Examples
        --------
        >>> import tempfile
        >>> from manifold_nets.experiments.store import ConfigMismatch, ResultStore
        >>> store = ResultStore(tempfile.mkdtemp())
        >>> store.finished("r1", {"lr": 0.1}) is None
        True
        >>> _ = store.write("r1", {"config": {"lr": 0.1}, "test_error": 0.5})
        >>> store.finished("r1", {"lr": 0.1})["test_error"]
        0.5
        >>> try:
        ...     store.finished("r1", {"lr": 0.01})
        ... except ConfigMismatch as err:
        ...     print("lr: stored 0.1, now 0.01" in str(err))
        True
        """
        path = self.path(run_id)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            warnings.warn(f"{path} does not hold JSON (a damaged record); the run runs "
                          f"again and replaces it", stacklevel=2)
            return None
        diffs = config_diff(record.get("config", {}), config)
        if diffs:
            raise ConfigMismatch(
                f"{path} was made with another configuration ({'; '.join(diffs)}). "
                f"Fix: use another --out, or delete {self.runs} to start over."
            )
        return record

    def records(self) -> list[dict]:
        """Every readable record in the store, sorted by run id.

        Files that do not hold JSON and hidden files (an atomic write in flight) are
        left out.

        Returns
        -------
        list of dict
            The records, in the order of their run ids; empty if the store has none.

        Examples
        --------
        >>> import tempfile
        >>> from manifold_nets.experiments.store import ResultStore
        >>> store = ResultStore(tempfile.mkdtemp())
        >>> store.records()
        []
        >>> _ = store.write("r2", {"run": 2})
        >>> _ = store.write("r1", {"run": 1})
        >>> store.records()
        [{'run': 1}, {'run': 2}]
        """
        if not self.runs.is_dir():
            return []
        out = []
        for p in sorted(self.runs.glob("*.json")):
            if p.name.startswith("."):
                continue
            try:
                out.append(json.loads(p.read_text()))
            except ValueError:
                continue
        return out

    def group_checkpoint(self, run_ids: Sequence[str]) -> Path:
        """The checkpoint file of a stacked group of these runs (in ``inflight/``).

        Creates ``inflight/`` if needed. The name depends on the set of run ids only, so
        a rerun of the same group finds the checkpoint whatever the order of its runs.

        Parameters
        ----------
        run_ids : sequence of str
            The run ids of the group.

        Returns
        -------
        pathlib.Path
            ``<root>/inflight/group-<16 hex digits>.pt``.

        Examples
        --------
        >>> import tempfile
        >>> from manifold_nets.experiments.store import ResultStore
        >>> store = ResultStore(tempfile.mkdtemp())
        >>> path = store.group_checkpoint(["r1", "r2"])
        >>> path.parent.name, path.suffix, path == store.group_checkpoint(["r2", "r1"])
        ('inflight', '.pt', True)
        """
        self.inflight.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha256("\n".join(sorted(run_ids)).encode()).hexdigest()[:16]
        return self.inflight / f"group-{key}.pt"


class ConfigMismatch(ValueError):
    """The store holds a record of a run made with another configuration.

    A subclass of :class:`ValueError`; :meth:`ResultStore.finished` raises it, so
    :func:`~.grid.run_grid` and the CamVid protocol refuse before they train anything, and
    the message names the record, every differing field, and the fix.

    Examples
    --------
    >>> import tempfile
    >>> from manifold_nets.experiments.config import TrainConfig
    >>> from manifold_nets.experiments.grid import grid, run_grid
    >>> from manifold_nets.experiments.store import ConfigMismatch, ResultStore
    >>> spec = grid(archs=("arch1",), depths=(2,), protocols=("exp-decay",),
    ...             updates=("un",), runs=1)[0]
    >>> store = ResultStore(tempfile.mkdtemp())
    >>> _ = store.write(spec.run_id("mnist"),
    ...                 {"config": spec.config(TrainConfig(lr=0.1)).to_dict()})
    >>> try:
    ...     run_grid([spec], TrainConfig(lr=0.01), store)
    ... except ConfigMismatch as err:
    ...     print("lr: stored 0.1, now 0.01" in str(err))
    True
    """
