"""Training: schedules, stopping, divergence, learning-rate selection, reproducibility, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from manifold_nets.experiments.cli import main
from manifold_nets.experiments.config import (
    BoldDriver,
    Decision,
    Divergence,
    ExpDecay,
    StoppingRule,
    TrainConfig,
    bold_driver,
    exp_decay,
    split_indices,
)
from manifold_nets.experiments.data import Dataset, load_dataset
from manifold_nets.experiments.engines import build_model, fit, select_lr, train

from .conftest import SHARED, needs_mnist

#: A run on a few hundred images, for tests.
SMALL = dict(
    train_size=300, val_size=100, test_size=200, select_train=100, select_val=100,
    select_epochs=2, min_epochs=1, max_epochs=2,
)


@pytest.fixture(scope="module")
def small_mnist() -> Dataset:
    torch.set_num_threads(1)
    ds = load_dataset("mnist", SHARED)
    return Dataset("mnist", ds.x_train[:1000].clone(), ds.y_train[:1000].clone(),
                   ds.x_test[:200].clone(), ds.y_test[:200].clone())


# ---------------------------------------------------------------------------- schedules


def test_exp_decay_multiplies_by_gamma_every_epoch():
    lr, sched = 1e-2, ExpDecay()
    for _ in range(3):
        lr, undo = sched.step(lr, cost=1.0, previous=None)
        assert not undo
    assert lr == pytest.approx(1e-2 * 0.95**3, rel=1e-15)
    assert exp_decay(2.0, 0.5) == 1.0


def test_bold_driver_released_code_arithmetic():
    """x1.1 when the epoch cost did not rise, x0.5 when it rose or is NaN; first epoch
    unchanged; never undone."""
    sched = BoldDriver()
    lr, previous, lrs = 1.0, None, []
    for cost in [5.0, 4.0, 4.5, 4.5, 3.0, float("nan"), 2.0]:
        lr, undo = sched.step(lr, cost, previous)
        assert undo is False
        previous = cost
        lrs.append(lr)
    expected = [1.0, 1.1, 0.55, 0.605, 0.6655, 0.33275, 0.33275 * 1.1]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_bold_driver_textbook_variant_undoes_rejected_epochs():
    sched = BoldDriver.textbook()
    assert (sched.increase, sched.decrease, sched.undo) == (1.05, 0.5, True)
    assert sched.step(1.0, 5.0, None) == Decision(1.0, False)
    assert sched.step(1.0, 4.0, 5.0) == Decision(1.05, False)
    assert sched.step(1.0, 6.0, 5.0) == Decision(0.5, True)
    assert bold_driver(1.0, float("inf"), 5.0, 1.05, 0.5) == (0.5, False)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ExpDecay(1.5), "Invalid decay factor"),
        (lambda: BoldDriver(increase=0.9), "Invalid bold-driver increase"),
        (lambda: BoldDriver(decrease=1.0), "Invalid bold-driver decrease"),
        (lambda: TrainConfig(update="adam"), "Invalid update: 'adam'"),
        (lambda: TrainConfig(lr=-1.0), "Invalid learning rate"),
        (lambda: TrainConfig(min_epochs=30, max_epochs=20), "min_epochs=30 > max_epochs=20"),
        (lambda: TrainConfig(train_size=1200), "do not fit in train_size"),
    ],
)
def test_invalid_settings(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---------------------------------------------------------------------------- stopping


def _curve(n: int, value: float = 0.05, step: float = -1e-3) -> list[float]:
    return [value + step * i for i in range(n)]


def test_no_early_stop_before_min_epochs():
    rule = StoppingRule(min_epochs=25, max_epochs=60)
    flat = [0.02] * 24
    assert rule.reason([0.0] * 24, flat) is None
    assert rule.reason([0.0] * 25, [0.02] * 25) == "train-error"


def test_training_error_criterion():
    rule = StoppingRule(min_epochs=3, max_epochs=60)
    val = _curve(3)
    assert rule.reason([0.1, 0.01, 1e-5], val) is None  # not below 1e-5
    assert rule.reason([0.1, 0.01, 0.0], val) == "train-error"


def test_validation_increase_against_five_epochs_earlier():
    rule = StoppingRule(min_epochs=6, max_epochs=60)
    train = [0.1] * 7
    falling = [0.10, 0.09, 0.08, 0.07, 0.06, 0.05, 0.04]
    assert rule.reason(train, falling) is None
    bumpy = [0.10, 0.03, 0.08, 0.07, 0.06, 0.05, 0.04]  # higher than 5 epochs earlier (0.03)
    assert rule.reason(train, bumpy) == "val-increase"
    # a rise relative to the previous epoch alone does not stop training
    assert rule.reason(train, [0.10, 0.09, 0.08, 0.07, 0.06, 0.04, 0.05]) is None


def test_validation_plateau():
    rule = StoppingRule(min_epochs=2, max_epochs=60)
    assert rule.reason([0.1, 0.1], [0.0300, 0.0300]) == "val-plateau"
    assert rule.reason([0.1, 0.1], [0.0300, 0.0301]) is None


def test_max_epochs_and_disabled_rule():
    rule = StoppingRule(min_epochs=1, max_epochs=4, enabled=False)
    assert rule.reason([0.0] * 3, [0.1] * 3) is None
    assert rule.reason([0.0] * 4, [0.1] * 4) == "max-epochs"


def test_divergence_rule():
    rule = Divergence(collapse_error=0.5, collapse_epoch=3)
    assert rule.reason(float("nan"), []) == "nan"
    assert rule.reason(float("inf"), [0.1]) == "nan"
    assert rule.reason(10.0, [0.9, 0.9]) is None  # too early to call it
    assert rule.reason(10.0, [0.9, 0.9, 0.9]) == "collapse"
    assert rule.reason(10.0, [0.9, 0.9, 0.4]) is None
    assert Divergence(collapse_error=None).reason(1.0, [0.9] * 20) is None


def test_stopping_applies_to_both_protocols_by_default():
    from manifold_nets.experiments.config import stopping_rule

    assert stopping_rule(TrainConfig(protocol="exp-decay")).enabled
    assert not stopping_rule(TrainConfig(protocol="exp-decay", stopping="bold-driver")).enabled
    assert stopping_rule(TrainConfig(protocol="bold-driver", stopping="bold-driver")).enabled


# ---------------------------------------------------------------------------- the loop


class _AlwaysUndo:
    undo = True

    def step(self, lr, cost, previous):
        return Decision(lr * 0.5, True)


def test_undo_restores_the_weights(small_mnist):
    config = TrainConfig(arch="arch2", **SMALL)
    model = build_model(config, torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fit(model, small_mnist.x_train[:200], small_mnist.y_train[:200], lr=1e-2,
                 schedule=_AlwaysUndo(), stopping=StoppingRule(1, 2))
    assert [h["lr"] for h in result.history] == [1e-2, 5e-3]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fit_reduces_the_cost(small_mnist):
    config = TrainConfig(arch="arch1", update="un", **SMALL)
    model = build_model(config, torch.Generator().manual_seed(0))
    result = fit(model, small_mnist.x_train, small_mnist.y_train, lr=1e-2, schedule=ExpDecay(),
                 stopping=StoppingRule(1, 3), generator=torch.Generator().manual_seed(0))
    costs = [h["cost"] for h in result.history]
    assert costs[-1] < costs[0] and result.stop_reason == "max-epochs"
    assert [h["lr"] for h in result.history] == pytest.approx([1e-2, 9.5e-3, 9.025e-3])


def test_split_is_disjoint_and_seeded():
    config = TrainConfig(**SMALL)
    s = split_indices(config, 1000)
    assert [len(s[k]) for k in ("train", "val", "select_train", "select_val")] == [300, 100,
                                                                                   100, 100]
    assert len(set(s["train"].tolist()) | set(s["val"].tolist())) == 400
    assert set(s["select_train"].tolist()) <= set(s["train"].tolist())
    assert not set(s["select_train"].tolist()) & set(s["select_val"].tolist())
    assert torch.equal(s["train"], split_indices(config, 1000)["train"])
    other = split_indices(TrainConfig(seed=1, **SMALL), 1000)
    assert not torch.equal(s["train"], other["train"])


def test_lr_selection_picks_the_lowest_error(small_mnist):
    config = TrainConfig(arch="arch2", update="sm", lr_grid=(1e-2, 1e-4), **SMALL)
    best, errors = select_lr(config, small_mnist)
    assert set(errors) == {1e-2, 1e-4}
    assert errors[best] == min(errors.values())


def test_lr_selection_ties_go_to_the_smaller_rate(small_mnist):
    # rates this small change nothing: both candidates make exactly the same errors
    config = TrainConfig(arch="arch1", update="bsgd", lr_grid=(1e-20, 1e-21), **SMALL)
    best, errors = select_lr(config, small_mnist)
    assert errors[1e-20] == errors[1e-21] and best == 1e-21


def test_same_seed_same_numbers(small_mnist):
    config = TrainConfig(arch="arch2", update="un", protocol="bold-driver", **SMALL)
    a, b = train(config, small_mnist), train(config, small_mnist)
    assert a["history"] == b["history"] and a["selection"] == b["selection"]
    c = train(TrainConfig(arch="arch2", update="un", seed=1, **SMALL), small_mnist)
    assert c["history"] != a["history"]


def test_run_record(small_mnist):
    config = TrainConfig(arch="arch1", update="sm", protocol="exp-decay", **SMALL)
    r = train(config, small_mnist)
    assert r["config"] == config.to_dict()
    assert r["lr"] in config.lr_grid and len(r["selection"]) == len(config.lr_grid)
    assert 1 <= r["epochs"] == len(r["history"]) <= 2
    assert set(r["history"][0]) == {"epoch", "lr", "cost", "train_error", "val_error",
                                    "test_error"}
    assert r["test_error"] == r["history"][-1]["test_error"]
    assert r["stop_reason"] in ("max-epochs", "train-error", "val-plateau", "val-increase")
    json.dumps(r)


def test_divergence_is_marked_and_never_saved(small_mnist, tmp_path):
    config = TrainConfig(arch="arch1", update="bsgd", lr=1e4, **SMALL, collapse_epoch=1)
    weights = tmp_path / "w.pt"
    r = train(config, small_mnist, save_path=weights)
    assert r["diverged"] and r["stop_reason"] in ("nan", "collapse")
    assert r["test_error"] > 0.5
    assert r["saved"] is None and not weights.exists()


def test_healthy_run_is_saved(small_mnist, tmp_path):
    config = TrainConfig(arch="arch2", update="un", lr=1e-2, **SMALL)
    weights = tmp_path / "w.pt"
    r = train(config, small_mnist, save_path=weights)
    assert not r["diverged"] and r["saved"] == str(weights)
    model = build_model(config)
    model.load_state_dict(torch.load(weights))
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--update", "adam"],
        ["train", "--depth", "two"],
        ["train", "--min-epochs", "30", "--max-epochs", "20"],
        ["train", "--lr", "-1"],
        ["train", "--protocol", "cosine"],
    ],
)
def test_train_cli_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


@needs_mnist
def test_train_cli_small_run(tmp_path, capsys):
    out = tmp_path / "run.json"
    argv = ["train", "--data-dir", str(SHARED), "--arch", "arch2", "--update", "sm",
            "--lr-grid", "1e-2", "1e-3", "--out", str(out)]
    for key, value in SMALL.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    assert main(argv) == 0
    record = json.loads(out.read_text())
    assert record["config"]["update"] == "sm" and record["config"]["lr_grid"] == [1e-2, 1e-3]
    assert "final: train" in capsys.readouterr().out


# ---------------------------------------------------------------------------- demo


def test_demo_mnist_comparison(small_mnist):
    from manifold_nets.experiments.demo import format_comparison, mnist_comparison

    rows = mnist_comparison(small_mnist, seeds=(0,), epochs=1, train_size=300, val_size=100)
    assert [r["update"] for r in rows] == ["bsgd", "sm", "un"]
    assert all(0 <= r["test_error"][0] <= 1 for r in rows)
    lines = format_comparison(rows)
    assert lines[0].startswith("| update |") and lines[-1].startswith("| UN |")


def test_one_rate_selection_rule_for_table2_and_camvid():
    from manifold_nets.experiments import engines
    from manifold_nets.experiments.camvid import protocol
    from manifold_nets.experiments.config import best_rate

    nan = float("nan")
    errors = {0.1: nan, 0.01: 0.5, 0.001: 0.5}
    assert best_rate(errors) == 0.001  # a diverged (NaN) rate is never chosen; ties: smaller
    # the control: a plain min over (error, rate) keys takes the NaN that comes first
    assert min(errors, key=lambda r: (errors[r], r)) == 0.1
    assert best_rate({0.1: 0.3, 0.01: 0.4}, lower_is_better=False) == 0.01  # mean IoU
    with pytest.raises(ValueError, match="every candidate rate diverged: 0.1, 0.01"):
        best_rate({0.1: None, 0.01: nan})
    with pytest.raises(ValueError, match="no candidate rates"):
        best_rate({})
    assert engines.best_rate is best_rate and protocol.best_rate is best_rate


def test_the_loop_refuses_rates_the_optimisers_refuse():
    from manifold_nets.experiments.config import ExpDecay, StoppingRule
    from manifold_nets.experiments.loop import ModuleRuns, Stream, fit_runs

    x, y = torch.rand(8, 3), torch.randint(0, 2, (8,))

    def run(lr):
        model = torch.nn.Linear(3, 2)
        return fit_runs(ModuleRuns(model), x, y, lr=[lr], schedules=[ExpDecay(1.0)],
                        stopping=[StoppingRule(1, 1, enabled=False)],
                        streams=[Stream(torch.arange(8), torch.Generator().manual_seed(0))],
                        stream_of_run=[0], batch_size=4)

    for bad in (float("nan"), -0.1, float("inf")):
        with pytest.raises(ValueError, match="fit_runs: run 0: Invalid learning rate"):
            run(bad)
    assert len(run(0.1)[0].history) == 1  # the control
