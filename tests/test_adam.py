"""InvariantAdam: AdamW bit for bit on Euclidean parameters, the single- and multi-tensor
paths equal, UN on the sphere, and the invariance measured both ways (float64): at
rounding for InvariantAdam under UN and SM, large for AdamW and geoopt's RiemannianAdam
on the same group elements."""

from __future__ import annotations

import copy

import geoopt
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from manifold_nets import Arch2, DiagScaledEuclidean, InvariantAdam, ObliqueManifold, declare
from manifold_nets.experiments import zoo
from manifold_nets.testing import assert_loss_invariant, assert_update_equivariant, rescalings

from .test_my_model import inputs, loss_fn, model


def _conv_net(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4)).double()


def _train(net, opt, steps=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()


# --------------------------------------------------------------------------------------
# AdamW on Euclidean parameters, bit for bit.

@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("options", [{}, {"amsgrad": True}, {"maximize": True},
                                     {"weight_decay": 0.0, "betas": (0.8, 0.99)}],
                         ids=["default", "amsgrad", "maximize", "no-decay"])
def test_euclidean_parameters_are_adamw_bit_for_bit(foreach, options):
    nets = [_conv_net(), _conv_net()]
    _train(nets[0], torch.optim.AdamW(nets[0].parameters(), lr=3e-3, foreach=foreach,
                                      **options))
    _train(nets[1], InvariantAdam(nets[1].parameters(), lr=3e-3, foreach=foreach, **options))
    for (k, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k


def test_declared_models_euclidean_parameters_are_still_adamw():
    """Under UN, the biases, batch-norm parameters and the classifier stay Euclidean: they
    follow AdamW exactly, as long as the filters' trajectory is the same (here the
    filters are frozen so that only the Euclidean ones move)."""
    ours, ref = _conv_net(), _conv_net()
    declare(ours, "un")
    declare(ref, "un")
    frozen = {"0.weight", "3.weight"}
    for net in (ours, ref):
        for n, p in net.named_parameters():
            p.requires_grad_(n not in frozen)
    _train(ours, InvariantAdam(ours.parameters(), lr=3e-3))
    _train(ref, torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=3e-3))
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


# --------------------------------------------------------------------------------------
# The two implementations, and the manifold.

def _manifold_params(update, second_moment="filter"):
    g = torch.Generator().manual_seed(3)
    if update == "un":
        specs = [(ObliqueManifold(3), (6, 3, 3, 3)), (ObliqueManifold(1), (5, 7))]
    else:
        specs = [(DiagScaledEuclidean(ndim=3), (6, 3, 3, 3)),
                 (DiagScaledEuclidean("right", ndim=2), (4, 5))]
    return [geoopt.ManifoldParameter(m.projx(torch.randn(shape, generator=g,
                                                         dtype=torch.float64)), manifold=m)
            for m, shape in specs]


@pytest.mark.parametrize("update,second_moment", [("un", "filter"), ("un", "entry"),
                                                  ("sm", "filter")])
@pytest.mark.parametrize("options", [{}, {"amsgrad": True, "maximize": True}],
                         ids=["plain", "amsgrad-maximize"])
def test_single_and_multi_tensor_paths_are_equal(update, second_moment, options):
    results = []
    for foreach in (False, True):
        params = _manifold_params(update)
        opt = InvariantAdam(params, lr=1e-2, foreach=foreach, second_moment=second_moment,
                            fused=False, **options)
        g = torch.Generator().manual_seed(5)
        for _ in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            opt.step()
        results.append([p.detach().clone() for p in params])
        if update == "un":
            for p in params:
                norms = p.detach().flatten(1).norm(dim=1) if p.dim() > 2 else p.norm(dim=1)
                torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-12, rtol=0)
                m = opt.state[p]["exp_avg"]
                assert float((m * p.detach()).flatten(1).sum(1).abs().max()) < 1e-12  # tangent
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-12)
    assert not torch.equal(results[0][0], _manifold_params(update)[0])


def test_the_per_filter_second_moment_has_one_entry_per_filter():
    params = _manifold_params("un")
    opt = InvariantAdam(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[params[0]]["exp_avg_sq"].shape == (6, 1, 1, 1)
    assert opt.state[params[1]]["exp_avg_sq"].shape == (5, 1)
    assert opt.state_dict()["state"][0]["manifold"] == "oblique(ndim=3)"


# --------------------------------------------------------------------------------------
# Invariance, both ways (float64). `model` is the documented test file's conv net.

def adam(params):
    return InvariantAdam(params, lr=1e-2, weight_decay=1e-2)


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)


def riemannian_adam(params):
    """geoopt's RiemannianAdam with weight decay, which it adds to the gradient (L2)."""
    return geoopt.optim.RiemannianAdam(params, lr=1e-2, weight_decay=1e-2)


def _equivariant_and_adamw_is_not(net, g, x, loss, update, steps=4):
    """InvariantAdam keeps the start's gap (batch norm's eps) under ``update``; AdamW on the
    same element (the control) is not equivariant."""
    gaps = assert_update_equivariant(net, g, x, loss, update=update, steps=steps,
                                     optimizer=adam)
    assert max(gaps) < max(4 * gaps[0], 1e-12)
    with pytest.raises(AssertionError, match="bsgd is not equivariant"):
        assert_update_equivariant(net, g, x, loss, update="bsgd", steps=steps,
                                  optimizer=adamw)


@settings(max_examples=3, deadline=None)
@given(g=rescalings(model, inputs, update="sm"))
def test_sm_adam_is_equivariant_and_adamw_and_riemannian_adam_are_not(g):
    assert_loss_invariant(model, g, inputs, loss_fn)
    _equivariant_and_adamw_is_not(model, g, inputs, loss_fn, "sm")
    with pytest.raises(AssertionError, match="sm is not equivariant"):
        assert_update_equivariant(model, g, inputs, loss_fn, update="sm", steps=4,
                                  optimizer=riemannian_adam)


def adamp(params):
    """AdamP (the ``adamp`` package): Adam with the radial part of the step projected out
    where a weight looks scale-invariant (a cosine test each step)."""
    from adamp import AdamP

    return AdamP(params, lr=1e-2, weight_decay=1e-2)


@settings(max_examples=3, deadline=None)
@given(g=rescalings(model, inputs, update="sm"))
def test_adamp_is_not_equivariant_either(g):
    """The comparison: AdamP keeps the filters' norms from growing, but its step on a
    filter does not scale with the filter, so the run from g.w is not g applied to the run
    from w (on the same elements that InvariantAdam's SM passes above)."""
    with pytest.raises(AssertionError, match="bsgd is not equivariant"):
        assert_update_equivariant(model, g, inputs, loss_fn, update="bsgd", steps=4,
                                  optimizer=adamp)


@settings(max_examples=3, deadline=None)
@given(g=rescalings(model, inputs, update="un"))
def test_un_adam_is_equivariant_and_adamw_is_not(g):
    _equivariant_and_adamw_is_not(model, g, inputs, loss_fn, "un")


def _scaled_runs(make, weight_decay: float) -> float:
    """One SM filter bank trained from x and from 3x on gradients that scale by 1/3 (as
    a loss invariant under the scaling gives): the largest gap of the unscaled runs."""
    sm = DiagScaledEuclidean(ndim=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    grads = [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(4)]
    runs = []
    for scale in (1.0, 3.0):
        p = geoopt.ManifoldParameter(x * scale, manifold=sm)
        opt = make([p], weight_decay)
        for grad in grads:
            p.grad = grad / scale
            opt.step()
        runs.append(p.detach() / scale)
    return float((runs[0] - runs[1]).abs().max())


def test_where_geoopts_riemannian_adam_keeps_the_sm_invariance_and_where_not():
    """geoopt's RiemannianAdam with this package's SM manifold keeps the invariance
    without weight decay (its second moment is the metric's component_inner, h^2 here),
    and loses it with weight decay, which it adds to the Euclidean gradient; InvariantAdam
    decouples the decay and keeps it either way."""
    ours = lambda ps, wd: InvariantAdam(ps, lr=0.1, weight_decay=wd)  # noqa: E731
    theirs = lambda ps, wd: geoopt.optim.RiemannianAdam(ps, lr=0.1, weight_decay=wd)  # noqa: E731
    assert _scaled_runs(ours, 0.0) < 1e-14 and _scaled_runs(ours, 0.1) < 1e-14
    assert _scaled_runs(theirs, 0.0) < 1e-14
    assert _scaled_runs(theirs, 0.1) > 1e-3
    adamw = lambda ps, wd: torch.optim.AdamW(ps, lr=0.1, weight_decay=wd)  # noqa: E731
    assert _scaled_runs(adamw, 0.0) > 1e-3


# The paper's Arch2 (batch norm before each ReLU and pooling pair), in float64.
torch.manual_seed(0)
arch2 = Arch2(depth=2, width=8, in_features=10, num_classes=3, bn_eps=1e-12).double()
arch2_x = torch.randn(32, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
arch2_y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(5))


def arch2_loss(out):
    return nn.functional.cross_entropy(out, arch2_y)


@settings(max_examples=3, deadline=None)
@given(g=rescalings(arch2, arch2_x, update="sm"))
def test_on_arch2_sm_adam_is_equivariant_and_adamw_is_not(g):
    _equivariant_and_adamw_is_not(arch2, g, arch2_x, arch2_loss, "sm")


# Families that discover finds on models of the zoo: a ResNet and a pre-LN transformer.
resnet = zoo.small_resnet(num_classes=3).double()
resnet_inputs = torch.randn(4, 3, 16, 16, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(1))
resnet_labels = torch.randint(0, 3, (4,), generator=torch.Generator().manual_seed(2))


def resnet_loss(out):
    return nn.functional.cross_entropy(out, resnet_labels)


@pytest.mark.slow
@settings(max_examples=2, deadline=None)
@given(g=rescalings(resnet, resnet_inputs, update="sm"))
def test_on_a_resnet_sm_adam_is_equivariant_and_adamw_is_not(g):
    _equivariant_and_adamw_is_not(resnet, g, resnet_inputs, resnet_loss, "sm", steps=3)


transformer = zoo.pre_ln_transformer(vocab=20, d=16, heads=2, mlp=32, layers=1,
                                     context=6).double()
tokens = torch.randint(0, 20, (3, 6), generator=torch.Generator().manual_seed(3))


def lm_loss(out):
    return nn.functional.cross_entropy(out.flatten(0, 1), tokens.flatten())


mlp_units = rescalings(transformer, tokens, families=["units between blocks.0.fc1 and "
                                                     "blocks.0.fc2"])


@pytest.mark.slow
@settings(max_examples=2, deadline=None)
@given(g=mlp_units)
def test_on_a_transformer_the_prediction_holds_for_adam_too(g):
    """On a pre-LN transformer discover finds no family that UN or SM resolves (for SGD);
    InvariantAdam agrees: the MLP's hidden units, a symmetry of the loss, are not one of
    its SM trajectory either (SM scales fc1's rows but not fc2's columns)."""
    assert mlp_units.families[0].resolves == {"un": False, "sm": False}
    assert_loss_invariant(transformer, g, tokens, lm_loss)
    with pytest.raises(AssertionError, match="sm is not equivariant"):
        assert_update_equivariant(transformer, g, tokens, lm_loss, update="sm", steps=3,
                                  optimizer=adam)
# --------------------------------------------------------------------------------------
# The contract: refused steps, bad arguments, checkpoints.

@pytest.mark.parametrize("kwargs,error,match", [
    ({"lr": -1.0}, ValueError, r"Invalid learning rate: -1\.0"),
    ({"betas": (1.0, 0.999)}, ValueError, r"Invalid beta parameter at index 0: 1\.0"),
    ({"betas": (0.9,)}, ValueError, r"Invalid betas"),
    ({"eps": float("nan")}, ValueError, r"Invalid epsilon value: nan"),
    ({"weight_decay": -0.1}, ValueError, r"Invalid weight_decay value"),
    ({"second_moment": "row"}, ValueError, r"Invalid second_moment: 'row'"),
    ({"foreach": "yes"}, TypeError, r"Invalid foreach"),
    ({"lr": torch.tensor([1e-3, 1e-2])}, ValueError, r"a Tensor of shape \(2,\); InvariantAdam "
                                                    r"takes a float or a 0-dim Tensor"),
])
def test_bad_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        InvariantAdam(_conv_net().parameters(), **kwargs)


def test_a_refused_step_changes_nothing():
    net = _conv_net()
    declare(net, "un")
    params = dict(net.named_parameters())
    opt = InvariantAdam([{"params": [params["0.weight"], params["0.bias"]]},
                         {"params": [p for n, p in params.items()
                                     if n not in ("0.weight", "0.bias")]}], lr=1e-2)
    _train(net, opt, steps=1)
    nn.functional.cross_entropy(net(torch.randn(4, 3, 6, 6, dtype=torch.float64)),
                                torch.randint(0, 4, (4,))).backward()
    opt.param_groups[1]["betas"] = (0.9, 1.5)
    before = copy.deepcopy((net.state_dict(), opt.state_dict()))
    with pytest.raises(ValueError, match=r"beta parameter at index 1: 1\.5 \(parameter group "
                                         r"1\)"):
        opt.step()
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[0][k]), k
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            assert torch.equal(v, before[1]["state"][i][k]) if torch.is_tensor(v) else True


def test_state_round_trip_and_the_manifold_check():
    net = _conv_net()
    declare(net, "sm")
    opt = InvariantAdam(net.parameters(), lr=1e-2)
    _train(net, opt, steps=3)
    saved = copy.deepcopy((net.state_dict(), opt.state_dict()))
    twin = _conv_net(seed=5)
    declare(twin, "sm")
    twin_opt = InvariantAdam(twin.parameters(), lr=1e-2)
    twin.load_state_dict(saved[0])
    twin_opt.load_state_dict(saved[1])
    _train(net, opt, steps=2, seed=9)
    _train(twin, twin_opt, steps=2, seed=9)
    for (k, a), b in zip(net.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    plain = InvariantAdam(_conv_net().parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=r"was sm\(left, ndim=3\), is euclidean"):
        plain.load_state_dict(saved[1])


# --------------------------------------------------------------------------------------
# The fused kernel.

from manifold_nets import fused as kernel  # noqa: E402

needs_kernel = pytest.mark.skipif(not kernel.available(),
                                  reason=f"the fused kernel is not available: {kernel.reason()}")


def _counting(module, calls: list):
    """A stand-in for the kernel module that records the shape of every parameter its
    Adam step takes."""

    class Counting:
        def fused_adam_step(self, *args):
            calls.append(args[0].shape)
            return module.fused_adam_step(*args)

    counting = Counting()
    return lambda: counting


@needs_kernel
@pytest.mark.parametrize("update,second_moment", [("un", "filter"), ("un", "entry"),
                                                  ("sm", "filter")])
@pytest.mark.parametrize("options", [{}, {"amsgrad": True, "maximize": True}],
                         ids=["plain", "amsgrad-maximize"])
def test_the_fused_kernel_equals_the_reference(update, second_moment, options, monkeypatch):
    results = []
    for fused in (True, False):
        params = _manifold_params(update)
        opt = InvariantAdam(params, lr=1e-2, fused=fused, foreach=False,
                            second_moment=second_moment, weight_decay=0.05, **options)
        calls: list = []
        if fused:
            monkeypatch.setattr(kernel, "load", _counting(kernel.load(), calls))
        g = torch.Generator().manual_seed(5)
        for _ in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            opt.step()
        monkeypatch.undo()
        if fused:  # every parameter, every step, went through the kernel
            assert calls == [p.shape for p in params] * 6
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-12)


@needs_kernel
def test_fused_true_refuses_what_the_kernel_cannot_take():
    oblique = ObliqueManifold(ndim=1)
    w = geoopt.ManifoldParameter(oblique.projx(torch.randn(4, 3)).bfloat16(), manifold=oblique)
    w.grad = torch.randn_like(w)
    before = w.detach().clone()
    opt = InvariantAdam([w], lr=1e-2, fused=True)
    with pytest.raises(ValueError, match=r"InvariantAdam\(fused=True\): the fused kernel "
                                         r"cannot take parameter 0 .*bfloat16"):
        opt.step()
    assert torch.equal(w.detach(), before) and not opt.state[w]
    InvariantAdam([w], lr=1e-2).step()  # fused=None: the pure-torch step
    assert not torch.equal(w.detach(), before)


# --------------------------------------------------------------------------------------
# torch.compile of the step.

def test_compiled_step_is_the_eager_step():
    """The compiled step (inductor) on UN, SM (left and right) and Euclidean parameters
    together: the UN and SM updates run eagerly inside it (as InvariantSGD's), the
    Euclidean ones through torch's compiled Adam; the iterates equal the eager ones."""
    from .test_optim import _all_kinds

    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):
        params = _all_kinds()
        opt = InvariantAdam(params.values(), lr=1e-2, weight_decay=1e-3)
        step = torch.compile(opt.step) if compiled else opt.step
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params.values():
                p.grad = torch.randn(p.shape, generator=gen)
            step()
        runs.append({k: p.detach().clone() for k, p in params.items()})
    eager, compiled = runs
    for k in eager:
        if k == "beta":  # torch's compiled Adam fuses its arithmetic: rounding differs
            torch.testing.assert_close(compiled[k], eager[k], atol=1e-6, rtol=1e-5, msg=k)
        else:
            torch.testing.assert_close(compiled[k], eager[k], atol=0, rtol=0, msg=k)
    norms = compiled["un_conv"].flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert not torch.allclose(compiled["un_conv"], _all_kinds()["un_conv"].detach(), atol=1e-3)
    torch._dynamo.reset()
