"""InvariantSGD keeps the contract torch.optim users rely on: a refused step changes
nothing, ``fused=True`` is strict, ``fused=None`` takes the kernel wherever each filter is
one block of memory, optimiser states and model state dicts know their manifolds, and the
documented resume recipe is exact while the wrong orders fail loudly."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import geoopt
import pytest
import torch

from manifold_nets import InvariantSGD, ObliqueManifold, declare
from manifold_nets import fused as kernel
from manifold_nets.optim import Kind

needs_kernel = pytest.mark.skipif(not kernel.available(),
                                  reason=f"the fused kernel is not available: {kernel.reason()}")


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(8, 4)).double()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (6,), generator=g))


def _train(model, opt, steps: range) -> None:
    for t in steps:
        x, y = _batch(t)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _snapshot(model, opt) -> tuple[dict, dict]:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            copy.deepcopy(opt.state_dict()))


def _assert_unchanged(before, model, opt) -> None:
    params, state = before
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    now = opt.state_dict()
    assert now["state"].keys() == state["state"].keys()
    for i, s in state["state"].items():
        for k, v in s.items():
            same = torch.equal(now["state"][i][k], v) if torch.is_tensor(v) else (
                now["state"][i][k] == v)
            assert same, (i, k)


def _stepped_once(update: str = "un"):
    """A declared model, its optimiser after one step (momentum buffers exist), and a new
    gradient ready for the next step."""
    model = _net()
    declare(model, update)
    opt = InvariantSGD([{"params": [model[0].weight, model[1].weight]},
                        {"params": [p for n, p in model.named_parameters()
                                    if n not in ("0.weight", "1.weight")]}],
                       lr=0.05, momentum=0.9, weight_decay=1e-4)
    _train(model, opt, range(1))
    x, y = _batch(1)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return model, opt


# --------------------------------------------------------------------------------------
# A refused step changes nothing.

def _set(key, value):
    def edit(model, opt):
        opt.param_groups[1][key] = value
    return edit


def _grad(make):
    def edit(model, opt):
        p = model[8].weight  # in the second group: the first group is checked and valid
        p.grad_dtype = None  # torch then lets a gradient of another dtype be assigned
        p.grad = make(p)
    return edit


def _grad_data(make):
    def edit(model, opt):  # torch refuses p.grad of another shape, not p.grad.data
        model[8].weight.grad.data = make(model[8].weight)
    return edit


REFUSALS = [
    ("nan-lr", _set("lr", float("nan")), ValueError, r"Invalid learning rate: nan \(parameter "
                                                     r"group 1\)"),
    ("negative-lr", _set("lr", -0.1), ValueError, r"Invalid learning rate: -0\.1"),
    ("inf-lr", _set("lr", math.inf), ValueError, r"Invalid learning rate: inf"),
    ("tensor-lr-nan", _set("lr", torch.tensor(float("nan"))), ValueError,
     r"Invalid learning rate"),
    ("string-lr", _set("lr", "0.1"), TypeError, r"Invalid learning rate: '0\.1'"),
    ("negative-momentum", _set("momentum", -1.0), ValueError, r"Invalid momentum value: -1"),
    ("nan-weight-decay", _set("weight_decay", float("nan")), ValueError,
     r"Invalid weight_decay value: nan"),
    ("tensor-dampening", _set("dampening", torch.tensor(0.1)), TypeError,
     r"Invalid dampening value: a Tensor"),
    ("nesterov-with-dampening", lambda m, o: o.param_groups[1].update(nesterov=True,
                                                                      dampening=0.5),
     ValueError, r"Nesterov momentum requires"),
    ("sparse-grad", _grad(lambda p: torch.zeros_like(p).to_sparse()), RuntimeError,
     r"parameter 0 of group 1 \(shape \(4, 8\)\)|gradient is sparse"),
    ("dtype", _grad(lambda p: torch.zeros_like(p, dtype=torch.float32)), RuntimeError,
     r"its gradient is torch\.float32, the parameter torch\.float64"),
    ("shape", _grad_data(lambda p: torch.zeros(8, 4, dtype=p.dtype)), RuntimeError,
     r"its gradient has shape \(8, 4\), the parameter \(4, 8\)"),
]


@pytest.mark.parametrize("edit,error,match", [r[1:] for r in REFUSALS],
                         ids=[r[0] for r in REFUSALS])
def test_a_refused_step_changes_nothing(edit, error, match):
    """The bad group or gradient is in the second group: the first one, valid, must not
    have been stepped when the step is refused."""
    model, opt = _stepped_once()
    edit(model, opt)
    before = _snapshot(model, opt)
    with pytest.raises(error, match=match):
        opt.step()
    _assert_unchanged(before, model, opt)


def test_the_refusal_check_can_fail():
    """The control: a valid step on the same set-up does change the first group's
    parameters and buffers, so the check above would see a partial step."""
    model, opt = _stepped_once()
    before = _snapshot(model, opt)
    opt.step()
    with pytest.raises(AssertionError):
        _assert_unchanged(before, model, opt)


def test_a_scheduler_that_sets_a_bad_rate_is_refused_at_the_step():
    model, opt = _stepped_once()
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: -1.0 if epoch else 1.0)
    opt.step()
    scheduler.step()  # sets every group's rate to -0.05
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"Invalid learning rate: -0\.05 \(parameter group 0\)"):
        opt.step()
    _assert_unchanged(before, model, opt)


def test_named_parameters_name_the_parameter_in_the_error():
    model = _net()
    opt = InvariantSGD(model.named_parameters(), lr=0.1)
    model[0].weight.grad_dtype = None
    model[0].weight.grad = torch.zeros(8, 3, 3, 3)  # float32 for a float64 weight
    with pytest.raises(RuntimeError, match=r"`0\.weight`: its gradient is torch\.float32"):
        opt.step()


# --------------------------------------------------------------------------------------
# fused=True is strict; fused=None takes channels_last.

def _filters(dtype=torch.float64, memory_format=torch.contiguous_format):
    oblique = ObliqueManifold(ndim=3)
    w = oblique.projx(torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0),
                                  dtype=torch.float64))
    w = geoopt.ManifoldParameter(w.to(dtype).to(memory_format=memory_format),
                                 manifold=oblique)
    return w


@needs_kernel
@pytest.mark.parametrize("make,why", [
    (lambda: _filters(torch.bfloat16), r"float32 and float64 parameters, not torch\.bfloat16"),
    (lambda: geoopt.ManifoldParameter(_filters().detach().transpose(0, 1),
                                      manifold=ObliqueManifold(ndim=3)),
     r"its filters are not contiguous blocks of memory"),
])
def test_fused_true_raises_naming_the_parameter_and_the_reason(make, why):
    w = make()
    w.grad = torch.randn_like(w)
    before = w.detach().clone()
    opt = InvariantSGD([w], lr=0.1, momentum=0.9, fused=True)
    with pytest.raises(ValueError, match=r"fused=True\): the fused kernel cannot take "
                                         r"parameter 0 of group 0 .*" + why):
        opt.step()
    assert torch.equal(w.detach(), before) and not opt.state[w]
    # fused=None takes the pure-torch step for it
    InvariantSGD([w], lr=0.1, momentum=0.9, fused=None).step()
    assert not torch.equal(w.detach(), before)


@needs_kernel
@pytest.mark.parametrize("manifold", ["un", "sm"])
def test_channels_last_filters_take_the_kernel_and_match_the_reference(manifold, monkeypatch):
    from manifold_nets import DiagScaledEuclidean

    man = ObliqueManifold(ndim=3) if manifold == "un" else DiagScaledEuclidean(ndim=3)
    results = {}
    for fused, fmt in ((None, torch.channels_last), (False, torch.contiguous_format)):
        x = man.projx(torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0),
                                  dtype=torch.float64)) * 0.5
        w = geoopt.ManifoldParameter(x.to(memory_format=fmt), manifold=man)
        opt = InvariantSGD([w], lr=0.02, momentum=0.9, weight_decay=1e-3, fused=fused)
        g = torch.Generator().manual_seed(1)
        calls: list = []
        if fused is None:
            monkeypatch.setattr(kernel, "load", _counting(kernel.load(), calls))
        for _ in range(6):
            w.grad = torch.randn(16, 8, 3, 3, generator=g, dtype=torch.float64).to(
                memory_format=fmt)
            opt.step()
        monkeypatch.undo()
        if fused is None:  # every step went through the kernel, on channels_last memory
            assert calls == [w.stride()] * 6 and w.is_contiguous(
                memory_format=torch.channels_last)
            assert opt.state[w]["momentum_buffer"].stride() == w.stride()
        results[fused] = w.detach().contiguous()
    torch.testing.assert_close(results[None], results[False], atol=0, rtol=1e-12)


def _counting(module, calls: list):
    """A stand-in for the kernel module that records the strides of every parameter it
    steps."""

    class Counting:
        def fused_step(self, *args):
            calls.append(args[0].stride())
            return module.fused_step(*args)

    counting = Counting()
    return lambda: counting


def test_refusal_reasons():
    un = Kind("oblique", (-3, -2, -1), ndim=3)
    right = Kind("sm", (-2,), ndim=2, side="right")
    w = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    if not kernel.available():
        assert "not available" in kernel.refusal(w, w, None, 0.1, un)
        return
    assert kernel.refusal(w, torch.randn_like(w), None, 0.1, un) is None
    assert "laid out otherwise" in kernel.refusal(w, torch.randn(8, 4, 3, 3), None, 0.1, un)
    theta = torch.randn(5, 6)
    assert kernel.refusal(theta, theta, None, 0.1, right) is None
    assert "contiguous" in kernel.refusal(theta.t(), theta.t(), None, 0.1, right)
    assert "1-D Tensor rate" in kernel.refusal(theta, theta, None, torch.ones(5), un)


# --------------------------------------------------------------------------------------
# Checkpoints know their manifolds; the resume recipe.

def test_the_documented_resume_recipe_is_bit_identical():
    """Declare, build the optimiser, load the model's and the optimiser's states: the
    resumed run equals the uninterrupted one, bit for bit."""
    whole = _net()
    declare(whole, "un")
    opt = InvariantSGD(whole.parameters(), lr=0.05, momentum=0.9)
    _train(whole, opt, range(6))

    first = _net()
    declare(first, "un")
    opt1 = InvariantSGD(first.parameters(), lr=0.05, momentum=0.9)
    _train(first, opt1, range(3))
    saved = {"model": copy.deepcopy(first.state_dict()),
             "optimizer": copy.deepcopy(opt1.state_dict())}

    resumed = _net(seed=1)  # other initial weights: everything must come from the files
    declare(resumed, "un")
    opt2 = InvariantSGD(resumed.parameters(), lr=0.05, momentum=0.9)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optimizer"])
    _train(resumed, opt2, range(3, 6))
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k


def _un_checkpoint():
    model = _net()
    declare(model, "un")
    opt = InvariantSGD(model.parameters(), lr=0.05, momentum=0.9)
    _train(model, opt, range(2))
    return model.state_dict(), opt.state_dict()


def test_un_momentum_into_an_undeclared_model_is_refused():
    _, state = _un_checkpoint()
    fresh = _net()
    opt = InvariantSGD(fresh.named_parameters(), lr=0.05, momentum=0.9)
    with pytest.raises(ValueError, match=r"written for other manifolds: `0\.weight` was "
                                         r"oblique\(ndim=3\), is euclidean.*Fix: declare the "
                                         r"model .*declare\(model, 'un'"):
        opt.load_state_dict(state)
    assert not opt.state  # nothing was loaded


def test_a_un_state_into_an_sm_declared_model_is_refused():
    _, state = _un_checkpoint()
    fresh = _net()
    declare(fresh, "sm")
    opt = InvariantSGD(fresh.parameters(), lr=0.05, momentum=0.9)
    with pytest.raises(ValueError, match=r"was oblique\(ndim=3\), is sm\(left, ndim=3\)"):
        opt.load_state_dict(state)


def test_declaring_after_loading_the_optimiser_is_caught():
    """The wrong order: optimiser built and loaded before declare."""
    _, state = _un_checkpoint()
    fresh = _net()
    opt = InvariantSGD(fresh.parameters(), lr=0.05, momentum=0.9)
    with pytest.raises(ValueError, match="written for other manifolds"):
        opt.load_state_dict(state)


def test_a_state_without_a_record_loads_with_a_warning():
    _, state = _un_checkpoint()
    for entry in state["state"].values():
        del entry["manifold"]
    fresh = _net()
    declare(fresh, "un")
    opt = InvariantSGD(fresh.parameters(), lr=0.05, momentum=0.9)
    with pytest.warns(UserWarning, match="parameter states record no manifold"):
        opt.load_state_dict(state)
    assert opt.state


def test_a_model_state_dict_records_its_declaration():
    from manifold_nets.declare import declaration_of

    model = _net()
    assert declaration_of(model.state_dict()) is None
    declare(model, "un")
    record = declaration_of(model.state_dict())
    assert record["update"] == "un"
    assert record["manifolds"]["0.weight"] == "oblique(ndim=3)"
    assert record["manifolds"]["8.weight"] == "euclidean"


def test_a_un_state_dict_into_an_sm_declared_model_is_refused():
    weights, _ = _un_checkpoint()
    fresh = _net()
    declare(fresh, "sm")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"written by a model declared 'un'; this one is "
                                           r"declared 'sm'"):
        fresh.load_state_dict(weights)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_weights_off_the_manifold_into_a_un_declared_model_are_refused():
    plain = _net(seed=3)  # undeclared: filters of any norm
    fresh = _net()
    declare(fresh, "un")
    with pytest.raises(RuntimeError, match=r"`0\.weight`: its filters are not unit-norm"):
        fresh.load_state_dict(plain.state_dict())
    # the same weights, declared, load
    declare(plain, "un")
    fresh.load_state_dict(plain.state_dict())


# --------------------------------------------------------------------------------------
# A quiet import.

def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code],
                          capture_output=True, text=True)


def test_import_is_quiet_under_deprecation_errors():
    result = _python("import manifold_nets, manifold_nets.experiments.cli, manifold_nets.symmetry")
    assert result.returncode == 0, result.stderr


def test_the_users_own_deprecation_warnings_are_not_hidden():
    result = _python("import manifold_nets, warnings\n"
                     "warnings.warn('mine', DeprecationWarning)")
    assert result.returncode != 0 and "DeprecationWarning: mine" in result.stderr


def test_geoopt_alone_is_not_quiet():
    """The control: what the import silences is there (skipped once geoopt stops using
    torch.jit.script)."""
    result = _python("import geoopt")
    if result.returncode == 0:
        pytest.skip("this geoopt imports quietly: nothing left to silence")
    assert "torch.jit.script` is deprecated" in result.stderr
