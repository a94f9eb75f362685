"""Bad input, tried systematically: one table row per case, with the error type and message.

The same table is in docs/reliability.rst. Rows that are not errors but documented safe
behaviours (a NaN gradient, a NaN-fed run) have their own tests below the table.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import geoopt
import pytest
import torch

from manifold_nets import (
    Arch1,
    DiagScaledEuclidean,
    InvariantSGD,
    ObliqueManifold,
    declare,
)
from manifold_nets.experiments import data
from manifold_nets.experiments.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from manifold_nets.experiments.cli import main
from manifold_nets.experiments.config import TrainConfig
from manifold_nets.experiments.data import DataError, Dataset, load_dataset
from manifold_nets.experiments.engines import build_model, train
from manifold_nets.symmetry.groups import Rescaling, ScalingSpace

# UN on models without a normalisation after their filters, on purpose: these tests are
# about the optimiser, not about the model's function (tests/test_declare.py is)
pytestmark_un = pytest.mark.filterwarnings("ignore:declare.+normalising the filters")
pytestmark = pytestmark_un

W0 = "layers.0.linear.weight"


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Nothing here may leave 127.0.0.1: no public mirrors, and an empty cache."""
    torch.set_num_threads(1)
    monkeypatch.setattr(data, "DEFAULT_MIRRORS", {k: () for k in data.DEFAULT_MIRRORS})
    monkeypatch.setenv("MANIFOLD_NETS_CACHE", str(tmp_path / "cache"))


def _closed_port() -> int:
    """A 127.0.0.1 port that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- inputs


def _with(x: torch.Tensor, index, value) -> torch.Tensor:
    x = x.clone()
    x[index] = value
    return x


def _net(update: str | None = None, width: int = 4, **edits) -> Arch1:
    net = Arch1(2, width, 3, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for (row, col), value in edits.get("w0", {}).items():
            net.layers[0].linear.weight[row, col] = value
    if update:
        declare(net, update)
    return net


def _rescale(a) -> Rescaling:
    net = _net()
    return Rescaling(ScalingSpace(net), {W0: (a, None)})


def _checkpoint(tmp: Path, update="un", width=4, edit=None, config=None) -> Path:
    net = _net(update, width)
    if edit is not None:
        with torch.no_grad():
            edit(net)
    path = tmp / "ck.pt"
    save_checkpoint(path, model=net, config=config)
    return path


def _load(path: Path, update="un", width=4, config=None):
    return load_checkpoint(path, model=_net(update, width), config=config)


def _scale_filter(net):
    net.layers[0].linear.weight[2] *= 1.5


def _nan_weight(net):
    net.layers[1].linear.weight[0, 1] = float("nan")


def _truncated(tmp: Path) -> Path:
    path = _checkpoint(tmp)
    path.write_bytes(path.read_bytes()[:100])
    return path


def _foreign(tmp: Path) -> Path:
    torch.save({"weights": torch.zeros(3)}, tmp / "ck.pt")
    return tmp / "ck.pt"


def _missing_data(tmp: Path):
    return load_dataset("mnist", tmp / "no-such-folder",
                        mirrors=[f"http://127.0.0.1:{_closed_port()}/"])


x34 = torch.randn(3, 4)

#: (id, call taking tmp_path, error type, message regex)
TABLE = [
    # -- manifolds: degenerate points, shapes, dtypes
    ("oblique-zero-filter", lambda t: ObliqueManifold().projx(_with(x34, 1, 0.0)),
     ValueError, r"filter 1 has zero norm and cannot lie on the oblique manifold"),
    ("oblique-nan-filter", lambda t: ObliqueManifold().projx(_with(x34, (2, 0), float("nan"))),
     ValueError, r"filter 2 has non-finite norm"),
    ("oblique-inf-filter", lambda t: ObliqueManifold().projx(_with(x34, (0, 3), float("inf"))),
     ValueError, r"filter 0 has non-finite norm"),
    ("oblique-conv-zero-filter",
     lambda t: ObliqueManifold(3).projx(_with(torch.randn(5, 3, 2, 2), 4, 0.0)),
     ValueError, r"filter 4 has zero norm"),
    ("oblique-too-few-dims", lambda t: ObliqueManifold(3).projx(x34),
     ValueError, r"'x' on the Oblique\(ndim=3\) manifold requires more than 3 dim"),
    ("oblique-vector-shape", lambda t: ObliqueManifold().proju(x34, torch.randn(3, 5)),
     ValueError, r"ObliqueManifold: `u` has shape \(3, 5\), `x` has shape \(3, 4\)"),
    ("oblique-retr-vector-shape", lambda t: ObliqueManifold().retr(x34, torch.randn(3, 5)),
     ValueError, r"ObliqueManifold: `u` has shape \(3, 5\), `x` has shape \(3, 4\)"),
    ("oblique-expmap-vector-shape", lambda t: ObliqueManifold().expmap(x34, torch.randn(3, 3)),
     ValueError, r"ObliqueManifold: `u` has shape \(3, 3\), `x` has shape \(3, 4\)"),
    ("oblique-inner-vector-shape",
     lambda t: ObliqueManifold().inner(x34, torch.randn(3, 4), torch.randn(3, 2)),
     ValueError, r"ObliqueManifold: `u` has shape \(3, 2\)"),
    ("oblique-dist-point-shape", lambda t: ObliqueManifold().dist(x34, torch.randn(3, 5)),
     ValueError, r"ObliqueManifold: `u` has shape \(3, 5\)"),
    ("oblique-int-dtype", lambda t: ObliqueManifold().projx(torch.ones(3, 4, dtype=torch.int64)),
     TypeError, r"`x` has dtype torch.int64; .* need a real floating dtype"),
    ("oblique-complex-dtype",
     lambda t: ObliqueManifold().projx(torch.ones(3, 4, dtype=torch.complex64)),
     TypeError, r"`x` has dtype torch.complex64"),
    ("oblique-ndim-0", lambda t: ObliqueManifold(0),
     ValueError, r"ObliqueManifold: ndim must be an integer >= 1, got 0"),
    ("sm-int-dtype", lambda t: DiagScaledEuclidean().projx(torch.ones(3, 4, dtype=torch.int32)),
     TypeError, r"`x` has dtype torch.int32"),
    ("sm-right-needs-matrix",
     lambda t: DiagScaledEuclidean("right").egrad2rgrad(torch.randn(4), torch.randn(4)),
     ValueError, r"side='right' needs the classifier matrix theta"),
    ("sm-vector-shape",
     lambda t: DiagScaledEuclidean().egrad2rgrad(x34, torch.randn(3, 5)),
     ValueError, r"DiagScaledEuclidean: `u` has shape \(3, 5\), `x` has shape \(3, 4\)"),
    ("sm-unknown-side", lambda t: DiagScaledEuclidean("up"),
     ValueError, r"side must be 'left' or 'right', got 'up'"),
    # -- declaring a model
    ("declare-un-zero-filter", lambda t: _net("un", w0={(3, c): 0.0 for c in range(3)}),
     ValueError, r"`layers.0.linear.weight` cannot be declared .* filter 3 has zero norm"),
    ("declare-sm-nan-weight", lambda t: _net("sm", w0={(1, 2): float("nan")}),
     ValueError, r"`layers.0.linear.weight` has 1 non-finite entries \(the first at index "
                 r"\(1, 2\)\)"),
    ("declare-un-inf-weight", lambda t: _net("un", w0={(0, 0): float("inf")}),
     ValueError, r"`layers.0.linear.weight` has 1 non-finite entries"),
    ("declare-unknown-update", lambda t: _net("adam"),
     ValueError, r"unknown update 'adam'; choose one of bsgd, sm, un"),
    ("config-unknown-update", lambda t: TrainConfig(update="adam"),
     ValueError, r"Invalid update: 'adam'; choose one of bsgd, sm, un"),
    ("invariant-sgd-other-manifold",
     lambda t: InvariantSGD([geoopt.ManifoldParameter(torch.ones(3) / 3**0.5,
                                                      manifold=geoopt.Sphere())]),
     ValueError, r"InvariantSGD cannot update a parameter of shape \(3,\) on Sphere"),
    # -- the symmetry module
    ("rescaling-zero", lambda t: _rescale([1.0, 0.0, 2.0, 1.0]),
     ValueError, r"layers.0.linear.weight row scaling 1 is 0.0: .* not invertible"),
    ("rescaling-negative", lambda t: _rescale([1.0, 1.0, -2.0, 1.0]),
     ValueError, r"row scaling 2 is -2.0: .* negative scalings are not symmetries"),
    ("rescaling-nan", lambda t: _rescale([float("nan"), 1.0, 1.0, 1.0]),
     ValueError, r"row scaling 0 is nan: scalings must be positive; scalings must be finite"),
    ("rescaling-wrong-length", lambda t: _rescale([1.0, 2.0]),
     ValueError, r"row scalings have 2 entries, the weight has 4 rows"),
    # -- checkpoints
    ("checkpoint-off-manifold", lambda t: _load(_checkpoint(t, edit=_scale_filter)),
     CheckpointError, r"filter 2 of `layers.0.linear.weight` has norm 1.5, not 1 .* off the "
                      r"oblique manifold"),
    ("checkpoint-other-width", lambda t: _load(_checkpoint(t, width=4), width=6),
     CheckpointError, r"from another architecture: .*`layers.0.linear.weight` has shape "
                      r"\[4, 3\] in the checkpoint, \[6, 3\] in the model"),
    ("checkpoint-other-update", lambda t: _load(_checkpoint(t, update="sm"), update="un"),
     CheckpointError, r"`layers.0.linear.weight` has manifold DiagScaledEuclidean.* in the "
                      r"checkpoint, Oblique"),
    ("checkpoint-other-config",
     lambda t: _load(_checkpoint(t, config=TrainConfig(width=4)), config=TrainConfig(width=5)),
     CheckpointError, r"another configuration \(width: checkpoint 4, now 5\)"),
    ("checkpoint-nan-weight", lambda t: _load(_checkpoint(t, edit=_nan_weight)),
     CheckpointError, r"model\['layers.1.linear.weight'\] has 1 non-finite values"),
    ("checkpoint-truncated", lambda t: _load(_truncated(t)),
     CheckpointError, r"could not be read .* truncated or not a manifold-nets checkpoint"),
    ("checkpoint-foreign-file", lambda t: _load(_foreign(t)),
     CheckpointError, r"is not a manifold-nets checkpoint"),
    ("checkpoint-missing", lambda t: _load(t / "none.pt"),
     CheckpointError, r"checkpoint .*none.pt does not exist"),
    # -- data
    ("data-missing-no-network", _missing_data,
     DataError, r"(?s)Could not download mnist file 'train-images-idx3-ubyte' into "
                r".*no-such-folder/mnist.*127.0.0.1.*Fix: .* pass it as --data-dir"),
]


@pytest.mark.parametrize("call,error,message", [r[1:] for r in TABLE], ids=[r[0] for r in TABLE])
def test_bad_input_table(call, error, message, tmp_path):
    with pytest.raises(error, match=message):
        call(tmp_path)


def test_refused_checkpoint_leaves_the_model_untouched(tmp_path):
    path = _checkpoint(tmp_path, edit=_scale_filter)
    net = _net("un")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError):
        load_checkpoint(path, model=net)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_missing_data_leaves_no_partial_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MANIFOLD_NETS_MIRROR", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(DataError):
        load_dataset("mnist", tmp_path / "data")
    assert [p for p in (tmp_path / "data").rglob("*") if p.is_file()] == []


# ---------------------------------------------------------------------------- NaN: behaviours


STEPPERS = {
    "geoopt": lambda p: geoopt.optim.RiemannianSGD([p], lr=0.1),
    "invariant-sgd": lambda p: InvariantSGD([p], lr=0.1),
}
MANIFOLDS = {
    "bsgd": None,
    "un": ObliqueManifold(),
    "sm-left": DiagScaledEuclidean("left"),
    "sm-right": DiagScaledEuclidean("right"),
}


@pytest.mark.parametrize("opt", STEPPERS)
@pytest.mark.parametrize("kind", MANIFOLDS)
def test_nan_gradient_poisons_only_its_filter_and_raises_nothing(opt, kind):
    """No per-step check (it would cost a device sync). B-SGD: the entry. UN: the filter
    holding the NaN becomes NaN (projection and normalisation mix its entries). SM: only the
    entry (the metric scales the gradient by the weight's norms); at the next step that
    entry's filter (left) or column (right) follows, through its norm. Everything else steps
    normally."""
    manifold = MANIFOLDS[kind]
    w0 = torch.randn(4, 5, dtype=torch.float64)
    w = (torch.nn.Parameter(w0) if manifold is None else
         geoopt.ManifoldParameter(manifold.projx(w0), manifold=manifold))
    w.grad = _with(torch.randn(4, 5, dtype=torch.float64), (1, 2), float("nan"))
    opt = STEPPERS[opt](w)
    opt.step()
    expected = torch.zeros(4, 5, dtype=torch.bool)
    expected[1 if kind == "un" else (1, 2)] = True
    assert torch.equal(torch.isnan(w.detach()), expected)
    w.grad = torch.randn(4, 5, dtype=torch.float64)
    opt.step()
    if kind == "sm-right":
        expected[:, 2] = True
    elif kind != "bsgd":  # plain SGD: the entry stays the only NaN
        expected[1] = True
    assert torch.equal(torch.isnan(w.detach()), expected)


def test_nan_fed_run_is_diverged_and_writes_no_weights(tmp_path):
    """The safety net: a non-finite epoch cost ends the run as diverged; no weights file,
    and the checkpoint keeps the last finite state (here the initial one)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(400, 784, generator=gen)
    x[17, 3] = float("nan")
    y = torch.randint(0, 10, (400,), generator=gen)
    ds = Dataset("mnist", x, y, torch.rand(50, 784, generator=gen),
                 torch.randint(0, 10, (50,), generator=gen))
    config = TrainConfig(arch="arch2", update="un", width=8, lr=1e-2, train_size=300,
                         val_size=100, test_size=50, select_train=100, select_val=100,
                         min_epochs=1, max_epochs=3)
    weights, ck = tmp_path / "w.pt", tmp_path / "run.ckpt"
    r = train(config, ds, save_path=weights, checkpoint=ck)
    assert r["diverged"] and r["stop_reason"] == "nan" and r["epochs"] == 1
    assert r["saved"] is None and not weights.exists()
    state = load_checkpoint(ck, model=build_model(config))  # finite, on the manifold
    assert state["epoch"] == 0


# ---------------------------------------------------------------------------- command line

CLI_BAD = [
    (["check", "--arch", "3"], r"argument --arch: invalid choice: '3'"),
    (["check", "--depth", "0"], r"argument --depth: must be at least 1, got 0"),
    (["check", "--bn-eps", "0"], r"argument --bn-eps: must be a finite number > 0"),
    (["check", "--no-such-option"], r"unrecognized arguments: --no-such-option"),
    (["train", "--update", "adam"], r"argument --update: invalid choice: 'adam'"),
    (["train", "--depth", "two"], r"argument --depth: invalid integer 'two'"),
    (["train", "--threads", "0"], r"argument --threads: must be at least 1"),
    (["train", "--min-epochs", "9", "--max-epochs", "2"], r"min_epochs=9 > max_epochs=2"),
    (["train", "--no-such-option"], r"unrecognized arguments: --no-such-option"),
    (["reproduce", "--runs", "0"], r"argument --runs: must be at least 1, got 0"),
    (["reproduce", "--updates", "adam"], r"argument --updates: invalid choice: 'adam'"),
    (["reproduce", "--no-such-option"], r"unrecognized arguments: --no-such-option"),
    (["camvid", "train", "--update", "adam"], r"argument --update: invalid choice: 'adam'"),
    (["camvid", "train", "--epochs", "-1"], r"argument --epochs: must be at least 1, got -1"),
    (["camvid", "train", "--lr-grid", "fast"], r"argument --lr-grid: invalid number 'fast'"),
    (["camvid", "train", "--lr-grid", "0.1,0.03"],
     r"argument --lr-grid: invalid number '0.1,0.03'"),
    (["train", "--lr-grid", "0"], r"argument --lr-grid: must be a finite number > 0"),
    (["check", "--arch", "2"],
     r"argument --arch: invalid choice: '2' \(choose from 'arch1', 'arch2'\)"),
    (["camvid", "train", "--out", "x", "--no-such-option"],
     r"unrecognized arguments: --no-such-option"),
    (["bench", "--nets", "resnet"], r"argument --nets: invalid choice: 'resnet'"),
    (["bench", "--repeats", "0"], r"argument --repeats: must be at least 1, got 0"),
    (["bench", "--optimisers", "adam"], r"argument --optimisers: invalid choice: 'adam'"),
    (["bench", "--no-such-option"], r"unrecognized arguments: --no-such-option"),
    (["demo", "--epochs", "two"], r"argument --epochs: invalid integer 'two'"),
    (["demo", "--runs", "0"], r"argument --runs: must be at least 1, got 0"),
    (["demo", "--no-such-option"], r"unrecognized arguments: --no-such-option"),
    ([], r"the following arguments are required: COMMAND"),
    (["fit"], r"argument COMMAND: invalid choice: 'fit'"),
]


@pytest.mark.parametrize("argv,message", CLI_BAD, ids=[" ".join(a) or "none" for a, _ in CLI_BAD])
def test_invalid_cli_argument_exits_2_with_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith("usage: manifold-nets")
    assert re.search(message, err.strip().splitlines()[-1]), err


def _not_a_folder(tmp: Path) -> Path:
    (tmp / "file").write_text("a file, not a folder\n")
    return tmp / "file" / "sub"


UNWRITABLE = [
    (["train"], "--out", "run.json"),
    (["train"], "--save", "w.pt"),
    (["train"], "--checkpoint", "run.ckpt"),
    (["reproduce"], "--out", ""),
    (["camvid", "train"], "--out", ""),
    (["bench", "--nets", "mlp"], "--output", "bench.json"),
]


@pytest.mark.parametrize("argv,option,name", UNWRITABLE,
                         ids=[f"{a[0]} {o}" for a, o, _ in UNWRITABLE])
def test_unwritable_output_is_refused_before_any_work(argv, option, name, tmp_path, capsys,
                                                      monkeypatch):
    """Refused at once: the data folder does not exist and no mirror answers, so any
    attempt to load data or train would fail with another message."""
    monkeypatch.setenv("MANIFOLD_NETS_MIRROR", f"http://127.0.0.1:{_closed_port()}")
    target = _not_a_folder(tmp_path) / name if name else _not_a_folder(tmp_path)
    extra = ["--data-dir", str(tmp_path / "no-data")]
    assert main([*argv, *extra, option, str(target)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {option} {target}: Not a directory")
    assert "Fix: pass a" in err
    assert not (tmp_path / "no-data").exists()


@pytest.mark.parametrize("command", ["train", "reproduce"])
def test_missing_data_folder_without_network_cli(command, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MANIFOLD_NETS_MIRROR", f"http://127.0.0.1:{_closed_port()}")
    folder = tmp_path / "data"
    argv = [command, "--data-dir", str(folder)]
    if command == "reproduce":
        argv += ["--out", str(tmp_path / "out"), "--runs", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"into {folder / 'mnist'}" in err and "Connection refused" in err
    assert "Fix:" in err and "--data-dir" in err
    assert [p for p in folder.rglob("*") if p.is_file()] == []
