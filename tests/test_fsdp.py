"""FSDP2 (``fully_shard``) with UN and SM: 2 CPU processes, gloo on 127.0.0.1, float64.

The sharded run must equal one process training on the whole batch; torch's own
``fully_shard`` after ``declare`` must be refused, not trained as Euclidean; geoopt's
optimiser on the sharded model is the negative control (it does go Euclidean)."""

from __future__ import annotations

import geoopt
import pytest
import torch
import torch.distributed as dist

from manifold_nets import InvariantSGD, declare

from .conftest import run_on_ranks

# UN on models without a normalisation after their filters, on purpose: these tests are
# about the optimiser, not about the model's function (tests/test_declare.py is)
pytestmark_un = pytest.mark.filterwarnings("ignore:declare.+normalising the filters")
pytestmark = [pytestmark_un,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]

WORLD, STEPS, BATCH = 2, 5, 6
UPDATES = ("un", "sm")


def _model(update: str) -> torch.nn.Module:
    """Biases everywhere; the classifier's 3 rows split 2 + 1 over the ranks."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 6),
                                torch.nn.ReLU(), torch.nn.Linear(6, 3)).double()
    declare(model, update)
    return model


def _batches():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, WORLD * BATCH, 12, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (STEPS, WORLD * BATCH), generator=gen)
    return x, y


def _train(model, opt, x, y) -> None:
    for xb, yb in zip(x, y, strict=True):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()


def _optimizer(model, cls=InvariantSGD):
    return cls(model.parameters(), lr=0.1, momentum=0.9)


def _full(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def _worker(rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    from manifold_nets import distributed as mnd

    x, y = _batches()
    shard = slice(rank * BATCH, (rank + 1) * BATCH)
    out = {}
    for update in UPDATES:
        for optimiser in ("ours", "geoopt"):
            model = _model(update)
            for layer in (model[0], model[2], model[4]):
                mnd.fully_shard(layer)
            mnd.fully_shard(model)
            cls = InvariantSGD if optimiser == "ours" else geoopt.optim.RiemannianSGD
            _train(model, _optimizer(model, cls), x[:, shard], y[:, shard])
            out[update, optimiser] = {k: v.numpy() for k, v in _full(model).items()}
        out[update, "lost"] = mnd.lost_manifolds(model)
        if update == "sm":  # control: without the column norms summed across ranks
            from manifold_nets import optim

            reducer, optim.shard_reducer = optim.shard_reducer, lambda p, k: None
            try:
                model = _model(update)
                mnd.fully_shard(model)
                _train(model, _optimizer(model), x[:, shard], y[:, shard])
                out[update, "local-norms"] = {k: v.numpy() for k, v in _full(model).items()}
            finally:
                optim.shard_reducer = reducer
        # torch's own fully_shard drops the manifolds: InvariantSGD refuses the model
        plain = _model(update)
        torch_fully_shard(plain)
        out[update, "plain-lost"] = mnd.lost_manifolds(plain)
        try:
            _optimizer(plain)
            out[update, "plain"] = "accepted"
        except ValueError as err:
            out[update, "plain"] = str(err)
        out[update, "reattached"] = mnd.reattach_manifolds(plain)
        _optimizer(plain)  # accepted once the manifolds are back
    return out


@pytest.fixture(scope="module")
def fsdp_results():
    return run_on_ranks(_worker, world=WORLD)


def _single(update: str, cls=InvariantSGD) -> dict[str, torch.Tensor]:
    model = _model(update)
    x, y = _batches()
    _train(model, _optimizer(model, cls), x, y)
    return _full(model)


@pytest.mark.parametrize("update", UPDATES)
def test_sharded_invariant_sgd_equals_one_process(fsdp_results, update):
    """UN, and SM with the right metric's column norms summed across ranks: the sharded
    iterates equal one process's on the whole batch (float64, momentum 0.9)."""
    want = _single(update)
    for rank in range(WORLD):
        got = {k: torch.from_numpy(v) for k, v in fsdp_results[rank][update, "ours"].items()}
        for name in want:
            gap = (got[name] - want[name]).abs().max().item()
            assert gap <= 1e-10, f"rank {rank} {name}: {gap:.2e}"
    if update == "un":
        norms = got["0.weight"].norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-12, rtol=0)


@pytest.mark.parametrize("update", UPDATES)
def test_geoopt_on_the_sharded_model_goes_euclidean(fsdp_results, update):
    """The negative control: the same comparison fails for geoopt's RiemannianSGD, which
    reads the ManifoldParameter type that sharding removes."""
    want = _single(update, geoopt.optim.RiemannianSGD)
    got = {k: torch.from_numpy(v) for k, v in fsdp_results[0][update, "geoopt"].items()}
    assert max((got[n] - want[n]).abs().max().item() for n in want) > 1e-4
    assert set(fsdp_results[0][update, "lost"]) == {
        n for n, m in declare(_model(update), update).items()
        if not isinstance(m, geoopt.Euclidean)}


@pytest.mark.parametrize("update", UPDATES)
def test_torch_fully_shard_after_declare_is_refused(fsdp_results, update):
    out = fsdp_results[0]
    assert "carries no manifold" in out[update, "plain"]
    assert "manifold_nets.distributed.fully_shard" in out[update, "plain"]
    assert set(out[update, "plain-lost"].values()) == {"geoopt, InvariantSGD"}
    assert out[update, "reattached"] == sorted(out[update, "plain-lost"])


def test_right_metric_needs_the_column_norms_of_all_ranks(fsdp_results):
    """The control of the SM comparison: each rank's own column norms give other iterates
    (the classifier's columns span both ranks), so the check above can fail."""
    want = _single("sm")
    got = {k: torch.from_numpy(v) for k, v in fsdp_results[0]["sm", "local-norms"].items()}
    assert (got["4.weight"] - want["4.weight"]).abs().max().item() > 1e-6


# -- InvariantAdam on the sharded model ----------------------------------------------------

def _adam(model, amsgrad=False):
    from manifold_nets import InvariantAdam

    return InvariantAdam(model.parameters(), lr=1e-2, weight_decay=1e-2, amsgrad=amsgrad)


def _adam_worker(rank: int) -> dict:
    from manifold_nets import distributed as mnd

    x, y = _batches()
    shard = slice(rank * BATCH, (rank + 1) * BATCH)
    out = {}
    for update in UPDATES:
        model = _model(update)
        for layer in (model[0], model[2], model[4]):
            mnd.fully_shard(layer)
        mnd.fully_shard(model)
        _train(model, _adam(model, amsgrad=update == "sm"), x[:, shard], y[:, shard])
        out[update] = {k: v.numpy() for k, v in _full(model).items()}
    return out


@pytest.fixture(scope="module")
def adam_results():
    return run_on_ranks(_adam_worker, world=WORLD)


@pytest.mark.parametrize("update", UPDATES)
def test_sharded_invariant_adam_equals_one_process(adam_results, update):
    """InvariantAdam on FSDP2 shards (UN with its per-filter second moment, SM with the
    right metric's column norms summed across ranks, AdamW on the biases): the iterates
    equal one process's on the whole batch (float64)."""
    model = _model(update)
    x, y = _batches()
    _train(model, _adam(model, amsgrad=update == "sm"), x, y)
    want = _full(model)
    for rank in range(WORLD):
        got = {k: torch.from_numpy(v) for k, v in adam_results[rank][update].items()}
        for name in want:
            gap = (got[name] - want[name]).abs().max().item()
            assert gap <= 1e-10, f"rank {rank} {name}: {gap:.2e}"
    assert (want["4.weight"] - _full(_model(update))["4.weight"]).abs().max() > 1e-3


# -- distributed checkpoints ----------------------------------------------------------------

SAVED_AT = 3  # steps before the checkpoint; the rest of the 5 follow it


def _shard(model):
    from manifold_nets import distributed as mnd

    for layer in (model[0], model[2], model[4]):
        mnd.fully_shard(layer)
    mnd.fully_shard(model)
    return model


def _save(path, model, opt) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))


def _load(path, model, opt) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _dcp_worker(rank: int, root: str) -> dict:
    from pathlib import Path

    from manifold_nets import distributed as mnd

    x, y = _batches()
    shard = slice(rank * BATCH, (rank + 1) * BATCH)
    out = {}
    for update in UPDATES:
        path = Path(root) / update
        model = _shard(_model(update))
        opt = _optimizer(model)
        _train(model, opt, x[:SAVED_AT, shard], y[:SAVED_AT, shard])
        _save(path, model, opt)
        _train(model, opt, x[SAVED_AT:, shard], y[SAVED_AT:, shard])
        out[update, "uninterrupted"] = {k: v.numpy() for k, v in _full(model).items()}
        resumed = _shard(_model(update))
        opt = _optimizer(resumed)
        _load(path, resumed, opt)
        mnd.check_on_manifold(resumed)
        _train(resumed, opt, x[SAVED_AT:, shard], y[SAVED_AT:, shard])
        out[update, "resumed"] = {k: v.numpy() for k, v in _full(resumed).items()}
    # a UN checkpoint with one filter off the manifold (on rank 1's shard) is refused
    model = _shard(_model("un"))
    opt = _optimizer(model)
    _train(model, opt, x[:1, shard], y[:1, shard])
    if rank == 1:
        with torch.no_grad():
            model[0].weight.to_local()[0].mul_(2.0)
    _save(Path(root) / "off", model, opt)
    loaded = _shard(_model("un"))
    _load(Path(root) / "off", loaded, _optimizer(loaded))
    try:
        mnd.check_on_manifold(loaded)
        out["off"] = "accepted"
    except ValueError as err:
        out["off"] = str(err)
    return out


@pytest.fixture(scope="module")
def dcp_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp")
    return root, run_on_ranks(_dcp_worker, str(root), world=WORLD)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # 1 process
@pytest.mark.parametrize("update", UPDATES)
def test_checkpoint_on_two_ranks_resumes_on_two_and_on_one(dcp_results, update):
    """Sharded model and InvariantSGD state (momentum buffers) saved with
    torch.distributed.checkpoint on 2 ranks: resumed on 2 ranks the run is bit for bit the
    uninterrupted one; resumed in one process on the whole batches, equal to 1e-10."""
    root, results = dcp_results
    want = {k: torch.from_numpy(v) for k, v in results[0][update, "uninterrupted"].items()}
    for rank in range(WORLD):
        got = results[rank][update, "resumed"]
        for name in want:
            torch.testing.assert_close(torch.from_numpy(got[name]), want[name], atol=0, rtol=0)
    from manifold_nets.distributed import check_on_manifold

    model = _model(update)
    opt = _optimizer(model)
    _load(root / update, model, opt)
    check_on_manifold(model)
    assert all(len(s) for s in opt.state.values())  # the momentum buffers were loaded
    x, y = _batches()
    _train(model, opt, x[SAVED_AT:], y[SAVED_AT:])
    for name, p in model.named_parameters():
        gap = (p.detach() - want[name]).abs().max().item()
        assert gap <= 1e-10, f"{name}: {gap:.2e}"
    control = _model(update)  # a fresh optimiser (no buffers) cannot reach the same point
    _load(root / update, control, InvariantSGD(control.parameters(), lr=0.1))
    fresh = _optimizer(control)
    _train(control, fresh, x[SAVED_AT:], y[SAVED_AT:])
    assert max((p.detach() - want[n]).abs().max().item()
               for n, p in control.named_parameters()) > 1e-6


def test_checkpoint_off_the_manifold_is_refused_on_every_rank(dcp_results):
    _, results = dcp_results
    assert "filter 0 of `0.weight` (rank 1's shard) has norm 2" in results[1]["off"]
    assert "1 filters on other ranks are off the oblique manifold" in results[0]["off"]


def _adam_dcp_worker(rank: int, root: str) -> dict:
    from pathlib import Path

    x, y = _batches()
    shard = slice(rank * BATCH, (rank + 1) * BATCH)
    out = {}
    for update in UPDATES:
        path = Path(root) / f"adam-{update}"
        model = _shard(_model(update))
        opt = _adam(model)
        _train(model, opt, x[:SAVED_AT, shard], y[:SAVED_AT, shard])
        _save(path, model, opt)
        _train(model, opt, x[SAVED_AT:, shard], y[SAVED_AT:, shard])
        out[update, "uninterrupted"] = {k: v.numpy() for k, v in _full(model).items()}
        resumed = _shard(_model(update))
        opt = _adam(resumed)
        _load(path, resumed, opt)
        _train(resumed, opt, x[SAVED_AT:, shard], y[SAVED_AT:, shard])
        out[update, "resumed"] = {k: v.numpy() for k, v in _full(resumed).items()}
    return out


@pytest.fixture(scope="module")
def adam_dcp_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp-adam")
    return root, run_on_ranks(_adam_dcp_worker, str(root), world=WORLD)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # 1 process
@pytest.mark.parametrize("update", UPDATES)
def test_invariant_adam_checkpoint_resumes_on_two_ranks_and_on_one(adam_dcp_results, update):
    """InvariantAdam's state (moments, per-filter second moments, step counts, the
    manifold record) through torch.distributed.checkpoint: resumed on 2 ranks, bit for bit;
    in one process on the whole batches, equal to 1e-10; a fresh optimiser cannot."""
    root, results = adam_dcp_results
    want = {k: torch.from_numpy(v) for k, v in results[0][update, "uninterrupted"].items()}
    for rank in range(WORLD):
        got = results[rank][update, "resumed"]
        for name in want:
            torch.testing.assert_close(torch.from_numpy(got[name]), want[name], atol=0, rtol=0)
    model = _model(update)
    opt = _adam(model)
    _load(root / f"adam-{update}", model, opt)
    assert all(len(s) >= 3 for s in opt.state.values())  # step, exp_avg, exp_avg_sq
    x, y = _batches()
    _train(model, opt, x[SAVED_AT:], y[SAVED_AT:])
    for name, p in model.named_parameters():
        gap = (p.detach() - want[name]).abs().max().item()
        assert gap <= 1e-10, f"{name}: {gap:.2e}"
    control = _model(update)
    _load(root / f"adam-{update}", control, _adam(control))
    _train(control, _adam(control), x[SAVED_AT:], y[SAVED_AT:])
    assert max((p.detach() - want[n]).abs().max().item()
               for n, p in control.named_parameters()) > 1e-6
