"""``manifold-nets bench`` runs end to end on a few images (a smoke test: no timings are
asserted, only that every optimiser trained and every ratio was computed)."""

from __future__ import annotations

import json
import math

import pytest

from manifold_nets import fused
from manifold_nets.experiments.bench import OPTIMISERS, BenchConfig, format_table, run_bench
from manifold_nets.experiments.cli import main

from .conftest import SHARED, needs_mnist

TINY = dict(repeats=2, blocks=3, mlp_images=400, conv_images=200, step_calls=3,
            grid_images=300, grid_seeds=2, nets=("mlp", "conv", "grid"))


@needs_mnist
def test_bench_measures_every_optimiser():
    cfg = BenchConfig(data_dir=str(SHARED / "mnist"), **TINY)
    result = run_bench(cfg, log=lambda *a: None)
    for net in ("mlp", "conv"):
        rows = result["nets"][net]["optimisers"]
        assert set(rows) == set(OPTIMISERS)
        assert rows["sgd"]["epoch_vs_sgd"]["median"] == 1.0
        for name, row in rows.items():
            assert len(row["epoch_s_all"]) == TINY["repeats"], name
            assert all(t > 0 for t in row["epoch_s_all"]), name
            assert math.isfinite(row["mean_loss_last_epoch"]), name
            assert row["step_us"] > 0 and row["step_vs_sgd_foreach"]["median"] > 0, name
    # the pure-torch UN step allocates its temporaries; SGD and the fused UN step (when the
    # kernel could be built) step in place
    mlp = result["nets"]["mlp"]["optimisers"]
    assert mlp["ours-un-foreach"]["step_peak_bytes"] > 0 == mlp["sgd"]["step_peak_bytes"]
    if fused.available():
        assert mlp["ours-un"]["step_peak_bytes"] == 0
    grid = result["grid"]
    assert grid["runs"] == 12 and grid["images"] == 300
    for engine in ("stacked", "sequential"):
        assert len(grid["run_epoch_s_all"][engine]) == TINY["repeats"]
        assert grid["run_epoch_s"][engine] > 0
    table = format_table(result)
    assert "ours-un" in table and "3 interleaved blocks" in table
    assert "throughput stacked / sequential" in table


@needs_mnist
def test_bench_cli_writes_json(tmp_path, capfd):
    out = tmp_path / "bench.json"
    assert main(["bench", "--nets", "mlp", "--optimisers", "sgd", "sgd-foreach", "ours-un",
                 "--repeats", "1", "--blocks", "2", "--mlp-images", "300",
                 "--data-dir", str(SHARED / "mnist"), "--output", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert set(saved["nets"]["mlp"]["optimisers"]) == {"sgd", "sgd-foreach", "ours-un"}
    captured = capfd.readouterr()
    assert "ours-un" in captured.out
    assert "USDT" not in captured.err  # the profiler's start/stop lines are silenced


def test_bench_options_are_the_fields_of_bench_config(capsys):
    """Every ``bench`` option is a BenchConfig field, of the field's type, with its
    default; no option: the default configuration."""
    import dataclasses

    from manifold_nets.experiments.cli import build_parser, config_from_args

    parser = build_parser()
    args = parser.parse_args(["bench"])
    assert config_from_args(args, BenchConfig, threads=1, data_dir=None) == BenchConfig()
    args = parser.parse_args(["bench", "--nets", "steps", "grid", "--step-threads", "1", "4",
                              "--optimisers", "sgd", "ours-un", "--grid-seeds", "2",
                              "--step-lr", "1e-6", "--threads", "2"])
    cfg = config_from_args(args, BenchConfig, threads=args.threads, data_dir=None)
    assert (cfg.nets, cfg.step_threads, cfg.optimisers, cfg.grid_seeds, cfg.step_lr,
            cfg.threads) == (("steps", "grid"), (1, 4), ("sgd", "ours-un"), 2, 1e-6, 2)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--step-threads", "two"])
    assert "argument --step-threads: invalid integer 'two'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--help"])
    shown = capsys.readouterr().out
    assert "--optimisers NAME [NAME ...]" in shown
    options = {f.name for f in dataclasses.fields(BenchConfig)} - {"extra", "threads",
                                                                   "data_dir"}
    assert all("--" + name.replace("_", "-") in shown for name in options)


def test_step_benchmark_at_given_sizes(monkeypatch):
    """``--nets steps`` times every step optimiser on the weight sets, per thread count,
    and reports the ratio to SGD(foreach) and the step's peak memory."""
    from manifold_nets.experiments import bench

    monkeypatch.setitem(bench.WEIGHT_SETS, "tiny", [(8, 4, 3, 3), (16, 8)])
    cfg = BenchConfig(nets=("steps",), weight_sets=("tiny",), step_threads=(1, 2),
                      step_rounds=2)
    result = run_bench(cfg, log=lambda *a: None)
    res = result["steps"]["tiny"]
    assert res["parameters"] == 8 * 4 * 9 + 16 * 8
    for threads in (1, 2):
        rows = res["threads"][threads]
        assert set(rows) == set(bench.STEP_OPTIMISERS)
        assert rows["sgd-foreach"]["vs_sgd_foreach"]["median"] == 1.0
        assert all(r["step_ms"] > 0 and len(r["step_ms_all"]) == 2 for r in rows.values())
    assert "steps: tiny" in format_table(result)
