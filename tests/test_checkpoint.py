"""Checkpoints: a run stopped after j epochs and resumed gives bit-identical iterates on CPU.

The refusals (off-manifold weights, another architecture, NaN, a torn file) are rows of the
table in tests/test_bad_input.py.
"""

from __future__ import annotations

import json

import geoopt
import pytest
import torch

from manifold_nets import InvariantSGD
from manifold_nets.experiments import engines as training
from manifold_nets.experiments.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from manifold_nets.experiments.cli import main
from manifold_nets.experiments.config import (
    BoldDriver,
    Divergence,
    ExpDecay,
    StoppingRule,
    TrainConfig,
)
from manifold_nets.experiments.data import Dataset, load_dataset
from manifold_nets.experiments.engines import build_model, error_rate, fit, train

from .conftest import SHARED, needs_mnist

# UN on models without a normalisation after their filters, on purpose: these tests are
# about the optimiser, not about the model's function (tests/test_declare.py is)
pytestmark_un = pytest.mark.filterwarnings("ignore:declare.+normalising the filters")
pytestmark = pytestmark_un

SMALL = dict(train_size=300, val_size=100, test_size=200, select_train=100, select_val=100,
             select_epochs=2, min_epochs=1, max_epochs=4, lr_grid=(1e-2, 1e-3))


@pytest.fixture(scope="module")
def small_mnist() -> Dataset:
    torch.set_num_threads(1)
    if not (SHARED / "mnist").is_dir():
        pytest.skip(f"no local MNIST mirror at {SHARED}")
    ds = load_dataset("mnist", SHARED)
    return Dataset("mnist", ds.x_train[:1000].clone(), ds.y_train[:1000].clone(),
                   ds.x_test[:200].clone(), ds.y_test[:200].clone())


class Interrupted(Exception):
    """Stands for a kill: raised after the checkpoint of epoch ``j`` was written."""


def _fit(config: TrainConfig, ds: Dataset, schedule, checkpoint=None, stop_after=None):
    model = build_model(config, torch.Generator().manual_seed(0))
    x, y = ds.x_train[:300], ds.y_train[:300]
    xv, yv = ds.x_train[300:400], ds.y_train[300:400]
    calls = []

    def evaluate():
        calls.append(1)
        if stop_after is not None and len(calls) > stop_after:
            raise Interrupted
        return {"val_error": error_rate(model, xv, yv)}

    result = fit(model, x, y, lr=1e-2, schedule=schedule, stopping=StoppingRule(4, 4),
                 divergence=Divergence(collapse_error=None), generator=torch.Generator()
                 .manual_seed(1), evaluate=evaluate, checkpoint=checkpoint,
                 checkpoint_info={"config": config.to_dict(), "note": "test"})
    return model, result


CASES = [
    ("arch2", "un", BoldDriver.textbook()),  # undo: the reference cost is state too
    ("arch2", "sm", BoldDriver()),
    ("arch1", "bsgd", ExpDecay()),
]


@pytest.mark.parametrize("arch,update,schedule", CASES, ids=[f"{a}-{u}" for a, u, _ in CASES])
@pytest.mark.parametrize("stop_after", [0, 2])
def test_resumed_fit_is_bit_identical(small_mnist, tmp_path, arch, update, schedule,
                                      stop_after):
    config = TrainConfig(arch=arch, update=update, width=16, **SMALL)
    ref_model, ref = _fit(config, small_mnist, schedule)

    path = tmp_path / "run.ckpt"
    with pytest.raises(Interrupted):
        _fit(config, small_mnist, schedule, checkpoint=path, stop_after=stop_after)
    assert read_checkpoint(path)["history"] == ref.history[:stop_after]
    torch.manual_seed(12345)  # the global RNG is part of the checkpoint: resuming restores it
    model, result = _fit(config, small_mnist, schedule, checkpoint=path)

    assert result.history == ref.history and result.stop_reason == ref.stop_reason
    for (name, got), want in zip(model.state_dict().items(), ref_model.state_dict().values(),
                                 strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=name)
    # A finished run resumes to its end at once, with the same weights.
    again, result = _fit(config, small_mnist, schedule, checkpoint=path, stop_after=0)
    assert result.history == ref.history
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                  ref_model.state_dict().values(), strict=True))


@pytest.mark.parametrize("opt_cls", [geoopt.optim.RiemannianSGD, InvariantSGD])
def test_optimiser_state_with_momentum_resumes_exactly(tmp_path, opt_cls):
    """Momentum buffers (geoopt's and ours) travel in the checkpoint."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 20, 12, generator=gen), torch.randint(0, 3, (8, 20), generator=gen)

    def run(steps, checkpoint=None, resume=False):
        config = TrainConfig(arch="arch2", update="un", width=6, depth=2)
        torch.manual_seed(0)
        from manifold_nets import Arch2, declare

        model = Arch2(2, 6, 12, 3, generator=torch.Generator().manual_seed(0))
        declare(model, "un")
        opt = opt_cls(model.parameters(), lr=0.1, momentum=0.9)
        start = 0
        if resume:
            start = load_checkpoint(checkpoint, model=model, optimizer=opt,
                                    config=config)["extra"]["step"]
        for t in range(start, steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[t]), y[t]).backward()
            opt.step()
        if checkpoint is not None and not resume:
            save_checkpoint(checkpoint, model=model, optimizer=opt, config=config,
                            extra={"step": steps})
        return model

    ref = run(8)
    path = tmp_path / "m.ckpt"
    run(3, checkpoint=path)
    resumed = run(8, checkpoint=path, resume=True)
    for a, b in zip(resumed.state_dict().values(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def _strip(record: dict) -> dict:
    return {k: v for k, v in record.items()
            if k not in ("wall_time_s", "select_time_s", "checkpoint", "resumed_at_epoch")}


def test_train_resumes_after_selection_and_epochs(small_mnist, tmp_path, monkeypatch):
    """train(): killed during epoch 3 of 4, resumed without redoing the lr selection."""
    config = TrainConfig(arch="arch2", update="un", width=16, **SMALL)
    ref = train(config, small_mnist)
    path = tmp_path / "run.ckpt"

    calls = []

    def failing_error_rate(*args, **kw):
        calls.append(1)  # 2 selection candidates, then validation + test per epoch
        if len(calls) > 2 + 2 * 2:
            raise Interrupted
        return error_rate(*args, **kw)

    monkeypatch.setattr(training, "error_rate", failing_error_rate)
    with pytest.raises(Interrupted):
        train(config, small_mnist, checkpoint=path)
    monkeypatch.setattr(training, "error_rate", error_rate)
    monkeypatch.setattr(training, "select_lr", None)  # must not be called on resume
    got = train(config, small_mnist, checkpoint=path)
    assert got["resumed_at_epoch"] == 2 and got["checkpoint"] == str(path)
    assert _strip(got) == _strip(ref)


def test_train_refuses_a_checkpoint_of_another_configuration(small_mnist, tmp_path):
    config = TrainConfig(arch="arch1", update="sm", width=8, lr=1e-2,
                         **{**SMALL, "max_epochs": 1})
    path = tmp_path / "run.ckpt"
    train(config, small_mnist, checkpoint=path)
    other = TrainConfig(arch="arch1", update="sm", width=8, lr=1e-2, **{**SMALL, "max_epochs": 2})
    with pytest.raises(ValueError, match=r"another configuration \(max_epochs: checkpoint 1, "
                                         r"now 2\)"):
        train(other, small_mnist, checkpoint=path)


@needs_mnist
def test_train_cli_checkpoint_resumes(tmp_path, capsys):
    argv = ["train", "--data-dir", str(SHARED), "--arch", "arch1", "--update", "un",
            "--width", "8", "--lr", "0.01", "--max-epochs", "2"]
    for key, value in SMALL.items():
        if key not in ("max_epochs", "lr_grid"):
            argv += ["--" + key.replace("_", "-"), str(value)]
    ck = tmp_path / "ck" / "run.ckpt"
    assert main([*argv, "--out", str(tmp_path / "a.json"), "--checkpoint", str(ck)]) == 0
    assert ck.exists() and not list(ck.parent.glob(".*.tmp"))
    assert main([*argv, "--out", str(tmp_path / "b.json"), "--checkpoint", str(ck)]) == 0
    assert "resuming from" in capsys.readouterr().err
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert (a["resumed_at_epoch"], b["resumed_at_epoch"]) == (None, 2)
    assert _strip(a) == _strip(b)


def test_checkpoint_of_an_older_format_is_refused_with_its_version(tmp_path):
    from manifold_nets.experiments.checkpoint import FORMAT, CheckpointError

    path = tmp_path / "old.ckpt"
    torch.save({"format": (FORMAT[0], 1), "model": {}}, path)
    with pytest.raises(CheckpointError, match=r"has format version 1; .* reads version 2"):
        read_checkpoint(path)
    torch.save({"format": ("something-else", 2)}, path)  # control: a foreign file
    with pytest.raises(CheckpointError, match=r"is not a manifold-nets checkpoint"):
        read_checkpoint(path)
