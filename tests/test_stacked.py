"""The stacked engine: R stacked runs equal R separate runs (float64, tight)."""

from __future__ import annotations

import geoopt
import pytest
import torch
import torch.nn.functional as F

from manifold_nets import Arch1, Arch2, InvariantSGD, declare
from manifold_nets.experiments.cli import main
from manifold_nets.experiments.config import BoldDriver, ExpDecay, StoppingRule, TrainConfig
from manifold_nets.experiments.data import Dataset
from manifold_nets.experiments.engines import error_rate, fit, fit_stacked, train, train_group
from manifold_nets.experiments.grid import grid, run_grid
from manifold_nets.experiments.report import write_report
from manifold_nets.experiments.stacked import StackedNet, error_rates
from manifold_nets.experiments.store import ResultStore

from .conftest import SHARED

# UN on models without a normalisation after their filters, on purpose: these tests are
# about the optimiser, not about the model's function (tests/test_declare.py is)
pytestmark_un = pytest.mark.filterwarnings("ignore:declare.+normalising the filters")
pytestmark = pytestmark_un

TOL64 = dict(atol=1e-11, rtol=1e-11)


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def synthetic(n_train=1500, n_test=300, seed=0, dtype=None) -> Dataset:
    """MNIST-shaped data with labels from a random linear teacher (every class present)."""
    return Dataset.synthetic(n_train, n_test, seed, dtype)


def models(arch, depth, runs, width=8, in_features=784, seed=0):
    """``runs`` different models, batch-norm parameters and statistics perturbed."""
    cls = Arch1 if arch == 1 else Arch2
    out = []
    for r in range(runs):
        g = torch.Generator().manual_seed(seed + r)
        m = cls(depth, width, in_features, 10, generator=g)
        with torch.no_grad():
            for layer in m.layers:
                if layer.bn is not None:
                    layer.bn.weight.add_(0.3 * torch.randn(width, generator=g))
                    layer.bn.bias.add_(0.3 * torch.randn(width, generator=g))
                    layer.bn.running_mean.add_(torch.randn(width, generator=g))
                    layer.bn.running_var.mul_(1 + torch.rand(width, generator=g))
        out.append(m)
    return out


CASES = [(1, 1), (1, 3), (2, 1), (2, 3)]
IDS = [f"arch{a}-depth{d}" for a, d in CASES]


@pytest.mark.parametrize("arch,depth", CASES, ids=IDS)
def test_forward_equals_separate_models(float64, arch, depth):
    ms = models(arch, depth, runs=3, in_features=20)
    net = StackedNet.from_models(ms)
    x = torch.rand(7, 20)
    for r, m in enumerate(ms):
        torch.testing.assert_close(net.forward(x)[r], m.eval()(x), **TOL64)
    train_logits = net.forward(x, train=True)  # also moves the running statistics
    for r, m in enumerate(ms):
        torch.testing.assert_close(train_logits[r], m.train()(x), **TOL64)
        for i, layer in enumerate(m.layers):
            if layer.bn is not None:
                torch.testing.assert_close(net.running_mean[i][r], layer.bn.running_mean, **TOL64)
                torch.testing.assert_close(net.running_var[i][r], layer.bn.running_var, **TOL64)
        torch.testing.assert_close(net.model(r).eval()(x), m.eval()(x), **TOL64)


@pytest.mark.parametrize("arch,depth", CASES, ids=IDS)
def test_gradients_equal_autograd(float64, arch, depth):
    ms = models(arch, depth, runs=3, in_features=20)
    net = StackedNet.from_models(ms)
    x, y = torch.rand(9, 20), torch.randint(0, 10, (9,))
    loss, wrong = net.loss_and_grad(x, y)
    for r, m in enumerate(ms):
        logits = m.train()(x)
        ref = F.cross_entropy(logits, y, reduction="sum")
        ref.backward()
        torch.testing.assert_close(loss[r], ref.detach(), **TOL64)
        assert int(wrong[r]) == int((logits.argmax(1) != y).sum())
        for i, layer in enumerate(m.layers):
            torch.testing.assert_close(net.W[i].grad[r], layer.linear.weight.grad, **TOL64)
            if layer.bn is not None:
                torch.testing.assert_close(net.gamma[i].grad[r], layer.bn.weight.grad, **TOL64)
                torch.testing.assert_close(net.beta[i].grad[r], layer.bn.bias.grad, **TOL64)
        torch.testing.assert_close(net.theta.grad[r], m.classifier.weight.grad, **TOL64)


@pytest.mark.parametrize("optimizer", ["RiemannianSGD", "InvariantSGD"])
@pytest.mark.parametrize("arch", [1, 2])
def test_steps_equal_separate_optimisers(float64, optimizer, arch):
    """A stack of B-SGD, SM and UN runs with different rates: 5 steps, each run's iterates
    equal its own optimiser's."""
    updates = ["bsgd", "bsgd", "sm", "sm", "un", "un"]
    lrs = [1e-2, 3e-3, 1e-2, 3e-3, 1e-2, 3e-3]
    ms = models(arch, 2, runs=len(updates), in_features=20)
    for m, u in zip(ms, updates, strict=True):
        declare(m, u)
    net = StackedNet.from_models(ms)
    cls = geoopt.optim.RiemannianSGD if optimizer == "RiemannianSGD" else InvariantSGD
    opts = [cls(m.parameters(), lr=lr) for m, lr in zip(ms, lrs, strict=True)]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = torch.rand(16, 20, generator=g), torch.randint(0, 10, (16,), generator=g)
        net.loss_and_grad(x, y)
        net.step(torch.tensor(lrs))
        for m, opt in zip(ms, opts, strict=True):
            opt.zero_grad()
            F.cross_entropy(m.train()(x), y, reduction="sum").backward()
            opt.step()
    for r, m in enumerate(ms):
        for (name, p), q in zip(m.named_parameters(), net.model(r).parameters(), strict=True):
            torch.testing.assert_close(q, p.detach(), **TOL64, msg=f"run {r} {name}")
    un = net.W[0][4:]  # UN filters stay on the oblique manifold
    torch.testing.assert_close(un.norm(dim=-1), torch.ones(un.shape[:2]), **TOL64)


def test_euclidean_step_is_not_invariant_control(float64):
    """Negative control: the stacked B-SGD step differs from the SM step (the test above
    could not pass with the updates mixed up)."""
    ms = models(2, 1, runs=2, in_features=20)
    declare(ms[1], "sm")
    net = StackedNet.from_models(ms)
    assert net.updates == ["bsgd", "sm"]
    x, y = torch.rand(8, 20), torch.randint(0, 10, (8,))
    net.loss_and_grad(x, y)
    before = net.W[0].detach().clone()
    net.step(torch.tensor([1e-2, 1e-2]))
    step = net.W[0].detach() - before
    assert not torch.allclose(step[0], step[1])


def _fit_setup(data, updates, schedules, max_epochs):
    x, y = data.x_train[:600], data.y_train[:600]
    ms = models(2, 2, runs=len(updates), width=8)
    for m, u in zip(ms, updates, strict=True):
        declare(m, u)
    stops = [StoppingRule(1, e) for e in max_epochs]
    return x, y, ms, stops


def test_finished_runs_leave_the_stack_frozen(float64):
    """Runs that stop after 1, 2 and 3 epochs: each one's final weights and history equal a
    separate ``fit``; the stopped runs are frozen while the others go on."""
    data = synthetic()
    updates = ["bsgd", "sm", "un", "un"]
    schedules = [ExpDecay(), BoldDriver(), BoldDriver.textbook(), ExpDecay()]
    max_epochs = [1, 3, 2, 3]
    lrs = [1e-3, 2e-3, 1e-3, 5e-4]
    x, y, ms, stops = _fit_setup(data, updates, schedules, max_epochs)
    xv, yv = data.x_test, data.y_test
    net = StackedNet.from_models(ms)
    final: dict[int, StackedNet] = {}

    def finish(done, ids):
        for k, i in enumerate(ids):
            final[i] = done.select([k])

    results = fit_stacked(
        net, x, y, lr=lrs, schedules=schedules, stopping=stops,
        generator=torch.Generator().manual_seed(5), finish=finish,
        evaluate=lambda n, ids: {"val_error": error_rates(n, xv, yv)},
    )
    for r, m in enumerate(ms):
        ref = fit(m, x, y, lr=lrs[r], schedule=schedules[r], stopping=stops[r],
                  generator=torch.Generator().manual_seed(5),
                  evaluate=lambda m=m: {"val_error": error_rate(m, xv, yv)})
        assert results[r].stop_reason == ref.stop_reason == "max-epochs"
        assert len(results[r].history) == max_epochs[r]
        for a, b in zip(results[r].history, ref.history, strict=True):
            assert a.keys() == b.keys()
            for k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-11, abs=1e-12), (r, k)
        for p, q in zip(m.parameters(), final[r].model(0).parameters(), strict=True):
            torch.testing.assert_close(q, p.detach(), **TOL64)


TINY = dict(train_size=600, val_size=200, test_size=300, select_train=100, select_val=100,
            select_epochs=2, min_epochs=2, max_epochs=4, lr_grid=(3e-3, 1e-3, 1e-4), width=8)


@pytest.mark.parametrize("arch", ["arch1", "arch2"])
def test_train_group_equals_train(float64, arch):
    """The protocol (selection, schedules, stopping) for a group of two seeds: the same
    records as ``train`` run by run, textbook bold driver (undo) included."""
    data = synthetic(n_train=1000)
    configs = [TrainConfig(arch=arch, depth=2, update=u, protocol=p, seed=seed, **TINY)
               for seed in (3, 4) for p, u in (("bold-driver", "un"), ("bold-driver", "sm"),
                                               ("exp-decay", "bsgd"))]
    configs.append(TrainConfig(arch=arch, depth=2, update="sm", protocol="bold-driver",
                               seed=4, bold_increase=1.05, bold_undo=True,
                               **{**TINY, "max_epochs": 3}))
    records = train_group(configs, data)
    for c, rec in zip(configs, records, strict=True):
        ref = train(c, data, progress=False)
        assert rec["config"] == ref["config"]
        assert rec["lr"] == ref["lr"]
        assert rec["selection"].keys() == ref["selection"].keys()
        for k, v in ref["selection"].items():
            assert rec["selection"][k] == pytest.approx(v, abs=1e-12)
        assert (rec["stop_reason"], rec["diverged"], rec["epochs"]) == (
            ref["stop_reason"], ref["diverged"], ref["epochs"])
        for a, b in zip(rec["history"], ref["history"], strict=True):
            for k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-11, abs=1e-12), k
        assert set(ref) <= set(rec)


def test_group_must_share_network_and_sizes():
    a = TrainConfig(depth=2, **TINY)
    b = TrainConfig(depth=4, **TINY)
    with pytest.raises(ValueError, match=r"differ in depth"):
        train_group([a, b], synthetic(n_train=1000, dtype=torch.float32))


def test_stacked_grid_writes_records_the_report_accepts(tmp_path):
    data = synthetic(n_train=1000, dtype=torch.float32)
    base = TrainConfig(**{**TINY, "select_epochs": 1, "max_epochs": 2, "min_epochs": 1})
    store = ResultStore(tmp_path / "grid")
    specs = grid(archs=("arch1", "arch2"), depths=(2,), runs=2)
    summary = run_grid(specs, base, store, engine="stacked", data=data, progress=False,
                       seeds_per_group=1)
    assert (summary["ran"], summary["tasks"]) == (len(specs), 4)
    records = store.records()
    assert len(records) == len(specs)
    assert {r["engine"] for r in records} == {"stacked"}
    assert not list(store.inflight.iterdir())  # finished groups leave no checkpoint
    again = run_grid(specs, base, store, engine="stacked", data=data, progress=False)
    assert (again["ran"], again["skipped"]) == (0, len(specs))
    paths = write_report(store, tmp_path / "grid", "mnist")
    text = paths["markdown"].read_text()
    assert f"{len(specs)} runs in 12 cells" in text


@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason=f"no local MNIST mirror at {SHARED}")
def test_reproduce_stacked_cli(tmp_path, capsys):
    """``manifold-nets reproduce --engine stacked`` on real MNIST, a tiny slice: records, report."""
    tiny = ["--train-size", "1000", "--val-size", "200", "--test-size", "300",
            "--select-train", "100", "--select-val", "100", "--select-epochs", "1",
            "--min-epochs", "1", "--max-epochs", "2", "--lr-grid", "1e-2", "1e-3"]
    out = tmp_path / "grid"
    argv = ["reproduce", "--engine", "stacked", "--data-dir", str(SHARED), "--out", str(out),
            "--archs", "arch2", "--depths", "2", "--runs", "2", *tiny]
    assert main(argv) == 0
    records = ResultStore(out).records()
    assert len(records) == 12 and {r["engine"] for r in records} == {"stacked"}
    assert (out / "table2.md").is_file()


TIMING = ("select_time_s", "wall_time_s", "group_wall_time_s")


@pytest.mark.parametrize("kill_at", [1, 2, 4], ids=["mid-selection", "selection-end",
                                                     "mid-training"])
def test_killed_group_resumes_from_its_last_epoch(tmp_path, monkeypatch, kill_at):
    """A group killed after its k-th checkpoint resumes from it: the same records as an
    uninterrupted group, bit for bit (float32), and no epoch is trained twice."""
    from manifold_nets.experiments.checkpoint import GroupCheckpoint

    data = synthetic(n_train=1000, dtype=torch.float32)
    tiny = {**TINY, "select_epochs": 2, "max_epochs": 3}
    configs = [TrainConfig(arch="arch2", depth=2, update=u, protocol=p, seed=seed,
                           bold_undo=True, **tiny)
               for seed in (0, 1) for p, u in (("bold-driver", "un"), ("exp-decay", "sm"),
                                               ("bold-driver", "bsgd"))]
    reference = train_group(configs, data)
    saves, epochs = [0], [0]
    saver, step = GroupCheckpoint.saver, StackedNet.step

    def killing_saver(self, *args, **kw):
        save = saver(self, *args, **kw)

        def kill(net, state):
            save(net, state)
            saves[0] += 1
            if saves[0] == kill_at:
                raise KeyboardInterrupt
        return kill

    monkeypatch.setattr(GroupCheckpoint, "saver", killing_saver)
    path = tmp_path / "group.pt"
    with pytest.raises(KeyboardInterrupt):
        train_group(configs, data, checkpoint=path)
    monkeypatch.undo()
    batches = -(-tiny["select_train"] // 100)  # steps per selection epoch (all rates at once)

    def counting_step(net, rate):
        epochs[0] += 1
        return step(net, rate)

    monkeypatch.setattr(StackedNet, "step", counting_step)
    resumed = train_group(configs, data, checkpoint=path)
    for a, b in zip(resumed, reference, strict=True):
        assert {k: v for k, v in a.items() if k not in TIMING} == {
            k: v for k, v in b.items() if k not in TIMING}
    selection_steps = max(0, 2 - kill_at) * batches
    training_steps = (3 - max(0, kill_at - 2)) * -(-tiny["train_size"] // 100)
    assert epochs[0] == selection_steps + training_steps


def test_group_checkpoint_of_other_runs_is_refused(tmp_path):
    from manifold_nets.experiments.checkpoint import CheckpointError

    data = synthetic(n_train=1000, dtype=torch.float32)
    tiny = {**TINY, "select_epochs": 1, "max_epochs": 1, "min_epochs": 1}
    path = tmp_path / "group.pt"
    train_group([TrainConfig(update="un", **tiny)], data, checkpoint=path)
    with pytest.raises(CheckpointError, match=r"holds another group of runs \(update: "
                                              r"checkpoint 'un', now 'sm'\)"):
        train_group([TrainConfig(update="sm", **tiny)], data, checkpoint=path)


def test_group_checkpoint_off_the_manifold_is_refused(tmp_path):
    from manifold_nets.experiments.checkpoint import CheckpointError

    data = synthetic(n_train=1000, dtype=torch.float32)
    tiny = {**TINY, "select_epochs": 1, "max_epochs": 2, "min_epochs": 1}
    path = tmp_path / "group.pt"
    train_group([TrainConfig(update="un", **tiny)], data, checkpoint=path)
    payload = torch.load(path, weights_only=True)
    payload["net"]["tensors"][0][0, 3] *= 2.0  # filter 3 of W_1 of run 0
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"filter 3 of `W\[0\] of stacked run 0` has "
                                              r"norm 2"):
        train_group([TrainConfig(update="un", **tiny)], data, checkpoint=path)


def test_fit_stacked_resumes_a_reordered_stack(float64):
    """Runs given in another order than the stack trains them (updates mixed): a loop
    stopped after its first epoch and resumed from what on_epoch saw ends where the
    uninterrupted loop ends, each run in its own place."""
    from manifold_nets.experiments.loop import LoopState

    data = synthetic()
    updates = ["un", "bsgd", "sm", "bsgd"]
    x, y = data.x_train[:600], data.y_train[:600]
    ms = models(2, 2, runs=4, width=8)
    for m, u in zip(ms, updates, strict=True):
        declare(m, u)
    kw = dict(lr=[1e-3, 2e-3, 1e-3, 5e-4], schedules=[BoldDriver()] * 4,
              stopping=[StoppingRule(1, 3)] * 4)
    whole = fit_stacked(StackedNet.from_models(ms), x, y,
                        generator=torch.Generator().manual_seed(5), **kw)
    saved = {}

    class Stop(Exception):
        pass

    def on_epoch(engine, state):
        saved.update(net=engine.state_dict(), state=state.to_dict(), gen=gen.get_state())
        raise Stop

    gen = torch.Generator().manual_seed(5)
    with pytest.raises(Stop):
        fit_stacked(StackedNet.from_models(ms), x, y, generator=gen, on_epoch=on_epoch, **kw)
    assert saved["state"]["order"] != [0, 1, 2, 3]  # the stack was reordered
    gen = torch.Generator().manual_seed(0)
    gen.set_state(saved["gen"])
    resumed = fit_stacked(StackedNet.from_state_dict(saved["net"]), x, y, generator=gen,
                          start=LoopState.from_dict(saved["state"]), **kw)
    for a, b in zip(resumed, whole, strict=True):
        assert a.history == b.history and a.stop_reason == b.stop_reason
