"""DistributedDataParallel with UN and SM parameters: 2 CPU processes, gloo on 127.0.0.1."""

from __future__ import annotations

import geoopt
import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from manifold_nets import DiagScaledEuclidean, ObliqueManifold

from .conftest import run_on_ranks

# UN on models without a normalisation after their filters, on purpose: these tests are
# about the optimiser, not about the model's function (tests/test_declare.py is)
pytestmark_un = pytest.mark.filterwarnings("ignore:declare.+normalising the filters")
pytestmark = pytestmark_un

STEPS = 5
WORLD = 2


def _model(update: str) -> torch.nn.Module:
    """A 2-layer MLP without batch norm, declared by hand with the paper's manifolds."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(12, 8, bias=False), torch.nn.ReLU(), torch.nn.Linear(8, 3, bias=False)
    ).double()
    hidden, classifier = model[0], model[2]
    if update == "un":
        m = ObliqueManifold()
        hidden.weight = geoopt.ManifoldParameter(m.projx(hidden.weight.detach()), manifold=m)
    else:
        hidden.weight = geoopt.ManifoldParameter(
            hidden.weight.detach(), manifold=DiagScaledEuclidean("left"))
        classifier.weight = geoopt.ManifoldParameter(
            classifier.weight.detach(), manifold=DiagScaledEuclidean("right"))
    return model


def _batches():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, WORLD * 6, 12, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (STEPS, WORLD * 6), generator=gen)
    return x, y


def _train(model, x, y, momentum):
    opt = geoopt.optim.RiemannianSGD(model.parameters(), lr=0.1, momentum=momentum)
    history = []
    for xb, yb in zip(x, y, strict=True):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
        history.append([p.detach().clone() for p in model.parameters()])
    return history


CONFIGS = [(update, momentum) for update in ("un", "sm") for momentum in (0.0, 0.9)]


def _worker(rank: int) -> dict:
    out = {}
    for update, momentum in CONFIGS:
        ddp = DistributedDataParallel(_model(update))
        x, y = _batches()
        shard = slice(rank * 6, (rank + 1) * 6)
        history = _train(ddp, x[:, shard], y[:, shard], momentum)
        # The ranks must agree after every step: gather the iterates on every rank.
        gap = 0.0
        for params in history:
            for p in params:
                both = [torch.empty_like(p) for _ in range(WORLD)]
                dist.all_gather(both, p)
                gap = max(gap, (both[0] - both[1]).abs().max().item())
        out[update, momentum] = (gap, [p.numpy() for p in history[-1]])
    return out


@pytest.fixture(scope="module")
def ddp_results():
    """Train every configuration once in 2 spawned processes; every rank's results."""
    return run_on_ranks(_worker, world=WORLD, timeout=180)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
@pytest.mark.parametrize("update,momentum", CONFIGS)
def test_ddp_ranks_agree_and_match_single_process(ddp_results, update, momentum):
    for rank in range(WORLD):
        gap, _ = ddp_results[rank][update, momentum]
        assert gap == 0.0, f"rank {rank} saw the ranks diverge by {gap}"
    # DDP averages the ranks' gradients: with a mean loss per rank and equal shards this is
    # the mean loss over the concatenated batch, trained in one process.
    x, y = _batches()
    single = _train(_model(update), x, y, momentum)[-1]
    final = [torch.from_numpy(a) for a in ddp_results[0][update, momentum][1]]
    for got, want in zip(final, single, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    if update == "un":
        norms = final[0].norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms))
