"""The Table 2 grid: sharding, the resumable store (killed and resumed), statistics, report."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from manifold_nets.experiments.cli import main
from manifold_nets.experiments.config import TrainConfig
from manifold_nets.experiments.data import load_dataset
from manifold_nets.experiments.grid import grid, run_grid, shard
from manifold_nets.experiments.report import (
    PAPER_TABLE2,
    cell_summaries,
    comparisons,
    t_quantile,
    welch,
    write_report,
)
from manifold_nets.experiments.store import ConfigMismatch, ResultStore

from .conftest import SHARED, needs_mnist

#: A grid of 6 cells x 2 runs on a few thousand images, each run well under a second.
TINY = dict(train_size=2000, val_size=200, test_size=300, select_train=100, select_val=100,
            select_epochs=2, min_epochs=1, max_epochs=3, lr_grid=(1e-2, 1e-3))
TINY_ARGS = ["--archs", "arch1", "--depths", "2", "--runs", "2"] + [
    a for k, v in TINY.items() for a in
    (["--" + k.replace("_", "-")] + ([str(x) for x in v] if isinstance(v, tuple) else [str(v)]))
]


@pytest.fixture(scope="module")
def mnist():
    torch.set_num_threads(1)
    return load_dataset("mnist", SHARED)


# ---------------------------------------------------------------------------- the grid


def test_full_grid_has_240_runs_in_24_cells():
    specs = grid()
    assert len(specs) == 240 and len({s.cell for s in specs}) == 24
    assert len({s.run_id("mnist") for s in specs}) == 240
    assert set(PAPER_TABLE2) == {s.cell for s in specs}
    assert PAPER_TABLE2[(4, "bold-driver", "arch2", "un")] == (0.0179, 0.0025)
    assert PAPER_TABLE2[(2, "exp-decay", "arch1", "bsgd")] == (0.0263, 0.0079)


def test_shards_partition_the_grid():
    specs = grid(runs=3)
    parts = [shard(specs, i, 4) for i in range(1, 5)]
    assert {s for p in parts for s in p} == set(specs)
    assert sum(len(p) for p in parts) == len(specs)
    with pytest.raises(ValueError, match="Invalid shard 5/4"):
        shard(specs, 5, 4)


def test_run_configs_carry_the_cell_and_seed():
    spec = grid(runs=4)[-1]
    config = spec.config(TrainConfig(max_epochs=30), seed=100)
    assert (config.arch, config.depth, config.protocol, config.update) == (
        spec.arch, spec.depth, spec.protocol, spec.update)
    assert config.seed == 100 + spec.run and config.max_epochs == 30


# ---------------------------------------------------------------------------- statistics


def test_t_quantiles():
    assert t_quantile(0.975, 9) == pytest.approx(2.262157162798205, rel=1e-9)
    assert t_quantile(0.975, 3.5) == pytest.approx(2.9400886379827282, rel=1e-9)
    assert t_quantile(0.05, 2.2) == pytest.approx(-2.7467700534596933, rel=1e-9)
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959966, rel=1e-5)


def test_welch_matches_scipy():
    a = [0.021, 0.019, 0.025, 0.022, 0.020]
    b = [0.018, 0.017, 0.019, 0.016, 0.020, 0.018]
    w = welch(a, b)
    # values from scipy.stats.ttest_ind(a, b, equal_var=False)
    assert w["diff"] == pytest.approx(0.0034, rel=1e-12)
    assert w["low"] == pytest.approx(0.0005553355860397078, rel=1e-9)
    assert w["high"] == pytest.approx(0.006244664413960286, rel=1e-9)
    assert w["df"] == pytest.approx(6.404603936805834, rel=1e-12)
    assert w["p"] == pytest.approx(0.026066398079955512, rel=1e-8)
    assert welch([0.1], b) is None


# ---------------------------------------------------------------------------- report


def _record(arch, depth, protocol, update, run, error, diverged=False, epochs=4):
    config = TrainConfig(arch=arch, depth=depth, protocol=protocol, update=update, seed=run)
    history = [{"epoch": e + 1, "lr": 0.01, "cost": 1.0, "train_error": 0.0,
                "val_error": error, "test_error": error + 0.01 * (epochs - 1 - e)}
               for e in range(epochs)]
    return {"config": config.to_dict(), "lr": 0.01, "selection": {}, "history": history,
            "epochs": epochs, "test_error": error, "val_error": error, "diverged": diverged,
            "stop_reason": "collapse" if diverged else "val-plateau", "wall_time_s": 1.5,
            "run_id": f"{arch}-{depth}-{protocol}-{update}-{run}"}


@pytest.fixture
def synthetic_store(tmp_path) -> ResultStore:
    """Arch2 clearly better than Arch1; one collapsed Arch1 run."""
    store = ResultStore(tmp_path / "out")
    for s in grid(runs=3):
        base = 0.03 if s.arch == "arch1" else 0.02
        error = base + 0.001 * s.run + 0.005 * ("bsgd", "sm", "un").index(s.update)
        diverged = s.cell == (4, "exp-decay", "arch1", "sm") and s.run == 0
        rec = _record(s.arch, s.depth, s.protocol, s.update, s.run,
                      0.9 if diverged else error, diverged, epochs=3 + s.run)
        store.write(rec["run_id"], rec)
    return store


def test_cells_count_diverged_runs_and_report_both_ways(synthetic_store):
    cells = cell_summaries(synthetic_store.records())
    c = cells[(4, "exp-decay", "arch1", "sm")]
    assert (c["n"], c["n_diverged"]) == (3, 1)
    assert c["ok"][0] == pytest.approx((0.036 + 0.037) / 2)
    assert c["all"][0] == pytest.approx((0.9 + 0.036 + 0.037) / 3)
    assert c["paper"] == (0.0256, 0.0038)


def test_comparisons_find_arch2_better(synthetic_store):
    rows = comparisons(synthetic_store.records())
    pooled = rows[0]
    assert pooled["finding"].startswith("Arch2 better than Arch1")
    assert pooled["ok"]["low"] > 0
    sm_vs_bsgd = [r for r in rows if r["finding"] == "SM better than B-SGD"]
    assert sm_vs_bsgd and all(r["ok"]["high"] < 0 for r in sm_vs_bsgd)  # SM is worse here


def test_report_files(synthetic_store, tmp_path):
    paths = write_report(synthetic_store, tmp_path / "report", "mnist")
    md = paths["markdown"].read_text()
    assert "0.0179 +- 0.0025" in md and "72 runs in 24 cells; 1 diverged" in md
    assert "| Arch2 better than Arch1 (all cells pooled) |" in md and "holds" in md
    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert len(rows) == 24
    row = next(r for r in rows if (r["depth"], r["protocol"], r["arch"], r["update"])
               == ("4", "exp-decay", "arch1", "sm"))
    assert (row["n"], row["n_diverged"], row["paper_mean"]) == ("3", "1", "0.0256")
    assert paths["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_only_cli(synthetic_store, capsys):
    assert main(["reproduce", "--out", str(synthetic_store.root), "--report-only"]) == 0
    assert (synthetic_store.root / "table2.md").exists()
    assert "trajectories.png" in capsys.readouterr().out


# ---------------------------------------------------------------------------- store


def test_store_ignores_temporary_and_torn_files(tmp_path):
    store = ResultStore(tmp_path)
    store.write("a", {"x": 1})
    (store.runs / ".b.123.tmp").write_text('{"x": ')
    (store.runs / "c.json").write_text('{"x": 2')  # torn record: treated as missing
    assert store.records() == [{"x": 1}]
    assert store.read("c") is None and store.read("a") == {"x": 1}


def test_store_finished_reuses_refuses_and_reports(tmp_path):
    """A record of the same configuration is reused (the control), one of another
    configuration is refused naming every differing field, a damaged one is said and
    rerun; the flat, indented layout of the CamVid protocol reads the same."""
    store = ResultStore(tmp_path)
    assert store.finished("r1", {"lr": 0.1}) is None
    store.write("r1", {"config": {"lr": 0.1, "seed": 0}, "test_error": 0.5})
    assert store.finished("r1", {"lr": 0.1, "seed": 0})["test_error"] == 0.5
    with pytest.raises(ConfigMismatch, match=r"lr: stored 0\.1, now 0\.01; seed: stored 0, "
                                             r"now 1.*another --out"):
        store.finished("r1", {"lr": 0.01, "seed": 1})
    store.path("r2").write_text('{"config": ')
    with pytest.warns(UserWarning, match="r2.json does not hold JSON"):
        assert store.finished("r2", {"lr": 0.1}) is None
    flat = ResultStore(tmp_path / "sgd", runs=".", indent=1)
    path = flat.write("seed0", {"config": {"lr": 0.1}})
    assert path == tmp_path / "sgd" / "seed0.json"
    assert path.read_text() == '{\n "config": {\n  "lr": 0.1\n }\n}\n'
    assert flat.finished("seed0", {"lr": 0.1}) == {"config": {"lr": 0.1}}


@needs_mnist
def test_rerun_skips_finished_runs_and_refuses_other_configs(mnist, tmp_path):
    store = ResultStore(tmp_path)
    specs = grid(["arch2"], [2], ["bold-driver"], ["sm", "un"], runs=1)
    base = TrainConfig(**TINY)
    assert run_grid(specs, base, store, data=mnist)["ran"] == 2
    first = store.read(specs[0].run_id("mnist"))
    store.path(specs[1].run_id("mnist")).write_text("{")  # damaged: said, and rerun
    with pytest.warns(UserWarning, match="does not hold JSON"):
        summary = run_grid(specs, base, store, data=mnist)
    assert (summary["ran"], summary["skipped"]) == (1, 1)
    assert store.read(specs[0].run_id("mnist")) == first
    with pytest.raises(ConfigMismatch, match="max_epochs: stored 3, now 4.*another --out"):
        run_grid(specs, TrainConfig(**{**TINY, "max_epochs": 4}), store, data=mnist)


def _table(path: Path) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    for r in rows:
        del r["mean_wall_time_s"]
    return rows


@needs_mnist
def test_killed_grid_resumes_to_the_same_table(mnist, tmp_path):
    """Kill a two-worker grid (the whole process group) mid-way, rerun it: the same
    records and table as an uninterrupted run, and no duplicates."""
    reference = ResultStore(tmp_path / "reference")
    specs = grid(["arch1"], [2], runs=2)
    run_grid(specs, TrainConfig(**TINY), reference, data=mnist)
    write_report(reference, reference.root, "mnist")

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "manifold_nets.experiments.cli", "reproduce", "--data-dir",
           str(SHARED), "--out", str(out), "--jobs", "2", *TINY_ARGS]
    env = {**os.environ, "MANIFOLD_NETS_MIRROR": str(SHARED),
           "MANIFOLD_NETS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while len(list(out.glob("runs/*.json"))) < 3:
            assert proc.poll() is None, "the grid ended before it could be killed"
            assert time.time() < deadline, "no records after 120 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    n_killed = len(list(out.glob("runs/*.json")))
    assert 3 <= n_killed < len(specs)

    resume = [*cmd[: cmd.index("--jobs")], *cmd[cmd.index("--jobs") + 2 :]]  # in-process
    done = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{n_killed} already done" in done.stderr

    files = sorted(p.name for p in out.glob("runs/*.json"))
    assert files == sorted(f"{s.run_id('mnist')}.json" for s in specs)
    for s in specs:
        got, want = ResultStore(out).read(s.run_id("mnist")), reference.read(s.run_id("mnist"))
        assert got["run_id"] == s.run_id("mnist")
        assert got["history"] == want["history"] and got["lr"] == want["lr"]
    assert _table(out / "table2.csv") == _table(reference.root / "table2.csv")


# ---------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    "extra",
    [
        ["--shard", "3/2"],
        ["--shard", "0/2"],
        ["--shard", "half"],
        ["--jobs", "0"],
        ["--runs", "0"],
        ["--archs", "arch3"],
        ["--dataset", "cifar10"],
        ["--min-epochs", "5", "--max-epochs", "2"],
        ["--update", "un"],  # the grid's axes are --updates, not --update
    ],
)
def test_reproduce_cli_rejects_bad_arguments(extra, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "--out", str(tmp_path), *extra])
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_records_are_json_with_their_config(synthetic_store):
    path = next(synthetic_store.runs.glob("*.json"))
    record = json.loads(path.read_text())
    assert TrainConfig.from_dict(record["config"]).to_dict() == record["config"]
