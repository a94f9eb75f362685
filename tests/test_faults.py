"""Fault injection: SIGKILL ``manifold-nets reproduce`` at several moments, rerun, compare.

Every kill hits the whole process group of a real ``manifold-nets reproduce`` subprocess:
twice inside a results write (through the ``MANIFOLD_NETS_FAULT_WRITE_PAUSE`` hook of
:meth:`ResultStore.write`: once with the temporary file half written, once with it complete
but not yet renamed), and once at a random moment while runs are going on. After the last
rerun the records and the table must equal an uninterrupted run with the same seeds: no
finished run lost, no duplicate or torn record, and no temporary file taken for a record.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from manifold_nets.experiments.config import TrainConfig
from manifold_nets.experiments.data import load_dataset
from manifold_nets.experiments.grid import grid, run_grid
from manifold_nets.experiments.report import write_report
from manifold_nets.experiments.store import ResultStore

from .conftest import SHARED

pytestmark = pytest.mark.skipif(
    not (SHARED / "mnist").is_dir(), reason=f"no local MNIST mirror at {SHARED}"
)

#: 6 cells x 2 runs, each run a fraction of a second.
TINY = dict(train_size=1000, val_size=100, test_size=200, select_train=100, select_val=100,
            select_epochs=1, min_epochs=1, max_epochs=2, lr_grid=(1e-2, 1e-3))
AXES = ["--archs", "arch1", "--depths", "2", "--runs", "2"]
TIMING = ("wall_time_s", "select_time_s", "finished_at")


def _args() -> list[str]:
    out = list(AXES)
    for k, v in TINY.items():
        out += ["--" + k.replace("_", "-"), *(map(str, v) if isinstance(v, tuple) else [str(v)])]
    return out


def _strip(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING}


def _table(path: Path) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    for r in rows:
        del r["mean_wall_time_s"]
    return rows


class Grid:
    """The reproduce command on one results folder, started and killed as a subprocess."""

    def __init__(self, out: Path, tmp: Path, extra: Sequence[str] = ()):
        self.out = out
        self.cmd = [sys.executable, "-m", "manifold_nets.experiments.cli", "reproduce",
                    "--data-dir", str(SHARED), "--out", str(out), *_args(), *extra]
        # No public mirror can be reached from here: the data come from the local folder.
        self.env = {**os.environ, "MANIFOLD_NETS_MIRROR": str(SHARED),
                    "MANIFOLD_NETS_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
        self.env.pop("MANIFOLD_NETS_FAULT_WRITE_PAUSE", None)

    def records(self) -> list[Path]:
        return sorted(self.out.glob("runs/*.json"))

    def temporaries(self) -> list[Path]:
        return sorted(self.out.glob("runs/.*.tmp"))

    def kill_when(self, ready, pause: float = 0.0, timeout: float = 60.0) -> None:
        """Start the grid, SIGKILL its process group as soon as ``ready()`` holds."""
        env = {**self.env, "MANIFOLD_NETS_FAULT_WRITE_PAUSE": str(pause)} if pause else self.env
        proc = subprocess.Popen(self.cmd, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        try:
            while not ready():
                if proc.poll() is not None:
                    pytest.fail(f"the grid ended before it could be killed: "
                                f"{proc.stderr.read().decode()[-2000:]}")
                assert time.monotonic() < deadline, "the moment to kill never came"
                time.sleep(0.01)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL


def _check_records(g: Grid, reference: dict[str, dict]) -> int:
    """Every record present is whole and equals the uninterrupted run's; returns the count."""
    names = [p.stem for p in g.records()]
    for p in g.records():
        record = json.loads(p.read_text())  # a torn record would fail here
        assert record["run_id"] == p.stem
        assert _strip(record) == reference[p.stem], p.stem
    assert len(set(names)) == len(names)
    return len(names)


def test_sigkilled_grid_reruns_to_the_uninterrupted_results(tmp_path):
    torch.set_num_threads(1)
    specs = grid(["arch1"], [2], runs=2)
    ref_store = ResultStore(tmp_path / "reference")
    run_grid(specs, TrainConfig(**TINY), ref_store, data=load_dataset("mnist", SHARED))
    write_report(ref_store, ref_store.root, "mnist")
    reference = {r["run_id"]: _strip(r) for r in ref_store.records()}
    assert len(reference) == len(specs) == 12

    g = Grid(tmp_path / "killed", tmp_path)
    counts = [0]

    # 1. Inside a write, the temporary file half written.
    g.kill_when(lambda: bool(g.temporaries()), pause=2.0)
    torn = g.temporaries()
    assert len(torn) == 1, torn
    assert not torn[0].read_text().endswith("\n"), "the kill came after the write"
    counts.append(_check_records(g, reference))

    # 2. Inside a write, the temporary file complete but not renamed yet: wait for the
    #    second half of the text (the hook pauses again before os.replace).
    def complete_tmp():
        for p in g.temporaries():
            try:
                if p not in torn and p.read_text().endswith("\n"):
                    return True
            except FileNotFoundError:  # renamed between the listing and the read
                pass
        return False

    g.kill_when(complete_tmp, pause=1.0)
    counts.append(_check_records(g, reference))
    leftover = g.temporaries()
    assert len(leftover) == 2, leftover  # both kills left their temporary file behind

    # 3. At a random moment while runs are going on (after this process's first new
    #    record, so that the rerun makes progress). One, to keep the test short: every
    #    kill costs a process start (importing torch), a few seconds.
    rng = random.Random(8)
    for _ in range(1):
        before, start, delay = len(g.records()), [], rng.uniform(0.0, 0.3)

        def at_random_moment(before=before, start=start, delay=delay):
            if not start and len(g.records()) > before:
                start.append(time.monotonic())
            return bool(start) and time.monotonic() - start[0] >= delay

        g.kill_when(at_random_moment)
        counts.append(_check_records(g, reference))
    assert counts == sorted(counts), f"a finished run was lost: {counts}"
    assert counts[-1] < len(specs), "the kills came too late to interrupt anything"

    # 4. The rerun finishes the grid, skipping every finished run.
    killed_temporaries = g.temporaries()  # the random kill may have hit a write too
    assert set(leftover) <= set(killed_temporaries)
    done = subprocess.run(g.cmd, env=g.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"ran {len(specs) - counts[-1]} runs" in done.stderr
    assert f"{counts[-1]} already done" in done.stderr
    assert _check_records(g, reference) == len(specs)
    assert sorted(p.stem for p in g.records()) == sorted(reference)
    # The killed writes' temporary files stay, never read as records; the finishing
    # process left none of its own.
    assert g.temporaries() == killed_temporaries
    assert len(ResultStore(g.out).records()) == len(specs)
    assert _table(g.out / "table2.csv") == _table(ref_store.root / "table2.csv")
    md = (g.out / "table2.md").read_text()
    assert f"{len(specs)} runs in 6 cells" in md


def _training_checkpoint(g: Grid) -> bool:
    """A stacked group's checkpoint holds at least one finished training epoch."""
    for path in g.out.glob("inflight/*.pt"):
        try:
            payload = torch.load(path, weights_only=True)
        except Exception:  # replaced while being read: look again
            continue
        if payload["phase"] == "train" and payload["loop"]["epoch"] >= 1:
            return True
    return False


def test_sigkilled_stacked_grid_resumes_its_group(tmp_path):
    """``reproduce --engine stacked`` killed inside a group's training resumes the group
    from its last finished epoch and writes the uninterrupted group's records."""
    torch.set_num_threads(1)
    tiny = {**TINY, "min_epochs": 6, "max_epochs": 6}
    specs = grid(["arch1"], [2], runs=2)
    ref_store = ResultStore(tmp_path / "reference")
    run_grid(specs, TrainConfig(**tiny), ref_store, engine="stacked",
             data=load_dataset("mnist", SHARED))
    skip = (*TIMING, "group_wall_time_s")
    reference = {r["run_id"]: {k: v for k, v in r.items() if k not in skip}
                 for r in ref_store.records()}
    g = Grid(tmp_path / "killed", tmp_path,
             ["--engine", "stacked", "--min-epochs", "6", "--max-epochs", "6"])
    g.kill_when(lambda: _training_checkpoint(g))
    assert not g.records() and len(list(g.out.glob("inflight/*.pt"))) == 1
    done = subprocess.run(g.cmd, env=g.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "resuming the group of" in done.stderr
    records = ResultStore(g.out).records()
    assert {r["run_id"]: {k: v for k, v in r.items() if k not in skip}
            for r in records} == reference
    assert not list(g.out.glob("inflight/*.pt"))  # the finished group cleaned up
