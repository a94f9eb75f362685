"""InvariantSGD: parity with geoopt and torch, foreach == for-loop, momentum, state, compile."""

from __future__ import annotations

import copy
import io

import geoopt
import pytest
import torch

from manifold_nets import DiagScaledEuclidean, InvariantSGD, ObliqueManifold
from manifold_nets import math as mm
from manifold_nets.optim import kind_of

# UN on models without a normalisation after their filters, on purpose: these tests are
# about the optimiser, not about the model's function (tests/test_declare.py is)
pytestmark_un = pytest.mark.filterwarnings("ignore:declare.+normalising the filters")
pytestmark = pytestmark_un

F64 = torch.float64
TIGHT = dict(atol=1e-12, rtol=1e-12)


# -- a model with every kind of parameter -----------------------------------------------

def _params(update: str, dtype=F64, seed: int = 0, mixed_dtype: bool = False):
    """Linear and conv filters, a classifier and batch-norm-like vectors for ``update``."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"w1": (6, 9), "w2": (6, 3), "conv": (4, 3, 2, 2), "theta": (3, 3),
              "theta_conv": (5, 4, 2, 2), "gamma": (6,), "beta": (6,)}
    manifolds = {
        "un": {"w1": ObliqueManifold(), "w2": ObliqueManifold(), "conv": ObliqueManifold(3)},
        "sm": {"w1": DiagScaledEuclidean(), "w2": DiagScaledEuclidean(),
               "conv": DiagScaledEuclidean(ndim=3), "theta": DiagScaledEuclidean("right"),
               "theta_conv": DiagScaledEuclidean("right", ndim=4)},
        "bsgd": {},
    }[update]
    params = {}
    for name, shape in shapes.items():
        x = torch.randn(shape, generator=gen, dtype=F64)
        if len(shape) > 1:  # filters of very different norms (the scaled metric matters)
            x = x * torch.exp(0.5 * torch.randn(shape[0], generator=gen, dtype=F64)).reshape(
                (-1,) + (1,) * (len(shape) - 1))
        if name == "theta_conv":  # many entries per column: keep the SM steps stable
            x = 0.3 * x
        if isinstance(manifolds.get(name), ObliqueManifold):
            x = manifolds[name].projx(x)
        t = dtype if not (mixed_dtype and name in ("w2", "beta")) else torch.float32
        x = x.to(t)
        m = manifolds.get(name)
        params[name] = (geoopt.ManifoldParameter(x, manifold=m) if m is not None
                        else torch.nn.Parameter(x))
    return params


def _targets(params, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(p.shape, generator=gen, dtype=F64).to(p.dtype)
            for k, p in params.items()}


def _loss(params, targets):
    """A smooth loss coupling everything; quartic, so gradients change along the path."""
    total = 0
    for k, p in params.items():
        d = p - targets[k]
        total = total + (d.square() + 0.05 * d.square().square()).sum()
    return total + 0.5 * (params["w1"][:, :3] * params["w2"]).sum().square()


def _train(params, opt, targets, steps, skip_grad=None):
    for i in range(steps):
        opt.zero_grad()
        _loss(params, targets).backward()
        if skip_grad is not None and i % 3 == 1:
            params[skip_grad].grad = None  # a parameter without a gradient this step
        opt.step()


UPDATES = ["un", "sm", "bsgd"]


# -- parity with geoopt at momentum 0 ------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("update", UPDATES)
def test_parity_with_geoopt_riemannian_sgd(update, weight_decay, foreach):
    """Momentum 0: the same iterates as RiemannianSGD with our manifolds (float64, 100 steps)."""
    ours, theirs = _params(update), _params(update)
    targets = _targets(ours)
    opt = InvariantSGD(ours.values(), lr=3e-3, weight_decay=weight_decay, foreach=foreach)
    ref = geoopt.optim.RiemannianSGD(theirs.values(), lr=3e-3, weight_decay=weight_decay)
    _train(ours, opt, targets, 100)
    _train(theirs, ref, targets, 100)
    moved = 0.0
    for k in ours:
        torch.testing.assert_close(ours[k].detach(), theirs[k].detach(), **TIGHT)
        moved = max(moved, (ours[k] - _params(update)[k]).abs().max().item())
    assert moved > 0.1  # the test is not vacuous: the parameters travelled


def test_euclidean_parameters_get_torch_sgd():
    """Plain parameters: bit-for-bit torch.optim.SGD, momentum and nesterov included."""
    for kw in (dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
               dict(momentum=0.5, dampening=0.2)):
        for foreach in (False, True):
            ours, theirs = _params("bsgd"), _params("bsgd")
            targets = _targets(ours)
            _train(ours, InvariantSGD(ours.values(), lr=1e-3, foreach=foreach, **kw),
                   targets, 20)
            _train(theirs, torch.optim.SGD(theirs.values(), lr=1e-3, foreach=foreach, **kw),
                   targets, 20)
            for k in ours:
                torch.testing.assert_close(ours[k], theirs[k], atol=0, rtol=0)


# -- foreach == for-loop ---------------------------------------------------------------------

CONFIGS = [
    dict(),
    dict(weight_decay=1e-2),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.3, weight_decay=1e-2),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in
                                                                  c.items()) or "plain")
@pytest.mark.parametrize("update", UPDATES)
def test_foreach_matches_forloop(update, config):
    """float64 (one float32 group mixed in), a parameter without gradient every 3rd step."""
    runs = []
    for foreach in (False, True):
        params = _params(update, mixed_dtype=True)
        opt = InvariantSGD(params.values(), lr=2e-3, foreach=foreach, **config)
        _train(params, opt, _targets(params), 30, skip_grad="w1")
        runs.append((params, opt))
    (a, opt_a), (b, opt_b) = runs
    for k in a:
        tol = TIGHT if a[k].dtype == F64 else dict(atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(a[k], b[k], **tol)
        if config.get("momentum"):
            torch.testing.assert_close(opt_a.state[a[k]]["momentum_buffer"],
                                       opt_b.state[b[k]]["momentum_buffer"], **tol)


@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
@pytest.mark.parametrize("update", UPDATES)
def test_goes_right_direction(update, foreach):
    params = _params(update)
    targets = _targets(params)
    opt = InvariantSGD(params.values(), lr=1e-3, momentum=0.9, foreach=foreach)
    before = _loss(params, targets).item()
    _train(params, opt, targets, 50)
    assert _loss(params, targets).item() < 0.5 * before
    for p in params.values():
        if isinstance(p, geoopt.ManifoldParameter):
            assert p.manifold.check_point_on_manifold(p.detach())


# -- momentum against a reference loop --------------------------------------------------------


def _reference_step(x, g, buf, kind, *, lr, momentum, dampening, weight_decay, nesterov):
    """The class docstring's pseudo-code, written with the pure functions of math.py."""
    m = getattr(x, "manifold", None)
    x = x.detach()
    g = g + weight_decay * x
    if isinstance(m, ObliqueManifold):
        r = mm.oblique_proju(x, g, m.ndim)
    elif isinstance(m, DiagScaledEuclidean):
        r = mm.scaled_egrad2rgrad(x, g, m.side, m.ndim)
    else:
        r = g
    if momentum:
        buf = r.clone() if buf is None else momentum * buf + (1 - dampening) * r
        r = r + momentum * buf if nesterov else buf
    if isinstance(m, ObliqueManifold):
        x_new = mm.oblique_retr(x, -lr * r, m.ndim)
        buf = mm.oblique_proju(x_new, buf, m.ndim) if momentum else buf
    else:
        x_new = x - lr * r
    return x_new, buf


@pytest.mark.parametrize("config", CONFIGS[2:], ids=["mom", "mom-damp-wd", "nesterov",
                                                     "nesterov-wd"])
@pytest.mark.parametrize("update", UPDATES)
def test_momentum_matches_reference_loop(update, config):
    params = _params(update)
    targets = _targets(params)
    kw = dict(lr=2e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False)
    kw.update(config)
    opt = InvariantSGD(params.values(), **kw)
    ref = {k: p.detach().clone() for k, p in params.items()}
    bufs = dict.fromkeys(params)
    for _ in range(25):
        opt.zero_grad()
        _loss(params, targets).backward()
        grads = {k: p.grad.clone() for k, p in params.items()}
        for k, p in params.items():
            torch.testing.assert_close(p.detach(), ref[k], **TIGHT)  # same point, same grad
            ref[k], bufs[k] = _reference_step(p, grads[k], bufs[k], kind_of(p), **kw)
        opt.step()
    for k, p in params.items():
        torch.testing.assert_close(p.detach(), ref[k], **TIGHT)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], bufs[k], **TIGHT)


@pytest.mark.parametrize("update", ["un", "sm"])
def test_first_momentum_step_differs_from_geoopt(update):
    """Documented: geoopt starts the buffer at the Euclidean gradient, we at the Riemannian."""
    ours, theirs = _params(update), _params(update)
    targets = _targets(ours)
    _train(ours, InvariantSGD(ours.values(), lr=1e-2, momentum=0.9), targets, 1)
    _train(theirs, geoopt.optim.RiemannianSGD(theirs.values(), lr=1e-2, momentum=0.9),
           targets, 1)
    plain = _params(update)
    _train(plain, InvariantSGD(plain.values(), lr=1e-2), targets, 1)
    for k in ours:  # our first step is the momentum-free step
        torch.testing.assert_close(ours[k], plain[k], **TIGHT)
    assert not torch.allclose(ours["w1"], theirs["w1"], atol=1e-6)


def _row_invariant_loss(w, target):
    """Invariant under positive rescaling of the rows of w (the Arch2 symmetry)."""
    return ((w / w.norm(dim=1, keepdim=True)) @ target).square().sum() + (w[:, 0] / w.norm(
        dim=1)).sum()


@pytest.mark.parametrize("make_opt", ["ours", "geoopt"])
def test_sm_momentum_is_equivariant_under_filter_rescaling(make_opt):
    """W -> A W commutes with our SM steps (momentum 0.9); geoopt's breaks it (control)."""
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(5, 4, generator=gen, dtype=F64)
    target = torch.randn(4, 3, generator=gen, dtype=F64)
    a = torch.exp(2 * torch.randn(5, 1, generator=gen, dtype=F64))
    runs = []
    for start in (w0, a * w0):
        p = geoopt.ManifoldParameter(start.clone(), manifold=DiagScaledEuclidean())
        cls = InvariantSGD if make_opt == "ours" else geoopt.optim.RiemannianSGD
        opt = cls([p], lr=1e-2, momentum=0.9)
        for _ in range(10):
            opt.zero_grad()
            _row_invariant_loss(p, target).backward()
            opt.step()
        runs.append(p.detach())
    equivariant = torch.allclose(a * runs[0], runs[1], atol=1e-10, rtol=1e-10)
    assert equivariant == (make_opt == "ours")


# -- state_dict -------------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
@pytest.mark.parametrize("update", UPDATES)
def test_state_dict_round_trip(update, foreach):
    params = _params(update)
    targets = _targets(params)
    opt = InvariantSGD(params.values(), lr=2e-3, momentum=0.9, nesterov=True, foreach=foreach)
    _train(params, opt, targets, 3)
    buf = io.BytesIO()
    torch.save({k: p.detach() for k, p in params.items()} | {"opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    twin = _params(update)
    with torch.no_grad():
        for k, p in twin.items():
            p.copy_(saved[k])
    twin_opt = InvariantSGD(twin.values(), lr=1.0, foreach=foreach)  # hyper-params restored
    twin_opt.load_state_dict(saved["opt"])
    assert twin_opt.param_groups[0]["momentum"] == 0.9
    # torch SGD's format, with each parameter's update recorded beside its buffer
    assert set(twin_opt.state_dict()["state"][0]) == {"momentum_buffer", "manifold"}
    torch.optim.SGD(_params(update).values(), lr=1.0).load_state_dict(saved["opt"])
    _train(params, opt, targets, 3)
    _train(twin, twin_opt, targets, 3)
    for k in params:
        torch.testing.assert_close(twin[k], params[k], atol=0, rtol=0)
    clone = copy.deepcopy(opt)  # __setstate__ re-reads the manifolds of the copied params
    assert [k.name for k in clone._kinds[0]] == [k.name for k in opt._kinds[0]]


# -- torch.compile -----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [InvariantSGD, geoopt.optim.RiemannianSGD],
                         ids=["ours", "geoopt-control"])
def test_compiled_step_is_the_eager_step(cls):
    """A compiled step keeps the manifold update; geoopt's silently goes Euclidean."""
    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):
        params = _params("un")
        opt = cls(params.values(), lr=1e-2, momentum=0.9)
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        targets = _targets(params)
        for _ in range(5):
            opt.zero_grad()
            _loss(params, targets).backward()
            step()
        runs.append(params)
    same = all(torch.allclose(runs[0][k], runs[1][k], atol=1e-12, rtol=1e-12)
               for k in runs[0])
    on_manifold = torch.allclose(runs[1]["w1"].detach().norm(dim=1), torch.ones(6, dtype=F64))
    assert same == on_manifold == (cls is InvariantSGD)
    torch._dynamo.reset()


def _all_kinds(seed: int = 0) -> dict:
    """UN, left and right SM (linear and conv) and Euclidean parameters in one optimiser."""
    un, sm = _params("un", dtype=torch.float32, seed=seed), _params("sm", dtype=torch.float32,
                                                                    seed=seed)
    return {"un_w1": un["w1"], "un_conv": un["conv"], "sm_w1": sm["w1"],
            "sm_conv": sm["conv"], "sm_theta": sm["theta"], "sm_theta_conv": sm["theta_conv"],
            "beta": un["beta"]}


@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
def test_inductor_compiled_step_is_the_eager_step(foreach):
    """The compiled step (inductor, the default backend) with momentum, nesterov and weight
    decay on UN, SM and Euclidean parameters together gives the eager iterates. Regression:
    it failed with ``KeyError: 'buf4'`` before the update ran eagerly under compile."""
    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):
        params = _all_kinds()
        opt = InvariantSGD(params.values(), lr=torch.tensor(1e-2), momentum=0.9,
                           nesterov=True, weight_decay=1e-3, foreach=foreach)
        step = torch.compile(opt.step) if compiled else opt.step
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in params.values():
                p.grad = torch.randn(p.shape, generator=gen)
            step()
        runs.append({k: p.detach().clone() for k, p in params.items()})
    eager, compiled = runs
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], atol=0, rtol=0, msg=k)
    for k in ("un_w1", "un_conv"):
        norms = compiled[k].flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms))
    # control: the same check tells a Euclidean step from the UN step
    assert not torch.allclose(compiled["un_conv"], _all_kinds()["un_conv"].detach(), atol=1e-3)
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.__version__.startswith("2.13"),
                    reason="the inductor failure is known for torch 2.13")
def test_inductor_still_cannot_compile_the_update_itself():
    """Why the update runs eagerly under compile (``optim._eager``): inductor cannot compile
    the single-tensor UN step with momentum. When this fails, torch compiles it; drop the
    wrapper. The control: the same step without momentum compiles."""
    from torch._inductor.exc import InductorError

    from manifold_nets.optim import _single_tensor_invariant_sgd

    @torch.no_grad()
    def step(params, bufs, momentum):
        _single_tensor_invariant_sgd(params, [p.grad for p in params], bufs,
                                     [kind_of(p) for p in params], lr=0.1, momentum=momentum,
                                     dampening=0.0, weight_decay=0.0, nesterov=False,
                                     maximize=False)

    m = ObliqueManifold()
    for momentum, fails in ((0.0, False), (0.9, True)):
        torch._dynamo.reset()
        w = geoopt.ManifoldParameter(m.projx(torch.randn(6, 9)), manifold=m)
        w.grad = torch.randn(6, 9)
        bufs = [torch.randn(6, 9) if momentum else None]
        compiled = torch.compile(step)
        if fails:
            with pytest.raises(InductorError, match="KeyError"):
                compiled([w], bufs, momentum)
        else:
            compiled([w], bufs, momentum)
    torch._dynamo.reset()


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), r"Invalid learning rate: -1.0"),
    (dict(lr=float("nan")), r"Invalid learning rate: nan"),
    (dict(momentum=-0.1), r"Invalid momentum value: -0.1"),
    (dict(dampening=-0.5), r"Invalid dampening value: -0.5"),
    (dict(weight_decay=-1e-4), r"Invalid weight_decay value: -0.0001"),
    (dict(nesterov=True), r"Nesterov momentum requires a momentum and zero dampening "
                          r"\(got momentum=0.0, dampening=0.0\)"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), r"requires a momentum and zero"),
])
def test_invalid_arguments(kwargs, match):
    p = torch.nn.Parameter(torch.randn(3, 2))
    with pytest.raises(ValueError, match=match):
        InvariantSGD([p], **({"lr": 0.1} | kwargs))


def test_invalid_types():
    p = torch.nn.Parameter(torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"Invalid learning rate: a Tensor of shape \(2, 2\)"):
        InvariantSGD([p], lr=torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"Invalid learning rate: tensor\(\[ 0.1000, -1.0000\]\)"):
        InvariantSGD([p], lr=torch.tensor([0.1, -1.0]))
    with pytest.raises(TypeError, match=r"Invalid foreach: 'yes'"):
        InvariantSGD([p], lr=0.1, foreach="yes")


def test_unsupported_manifold_is_refused():
    p = geoopt.ManifoldParameter(torch.randn(3, 4), manifold=geoopt.Sphere())
    with pytest.raises(ValueError, match=r"shape \(3, 4\) on Sphere.*RiemannianSGD"):
        InvariantSGD([p], lr=0.1)
    q = torch.nn.Parameter(torch.randn(2, 2))
    opt = InvariantSGD([q], lr=0.1)
    with pytest.raises(ValueError, match=r"on Sphere"):
        opt.add_param_group({"params": [p]})
    euclid = geoopt.ManifoldParameter(torch.randn(2, 2))  # geoopt.Euclidean is plain SGD
    assert kind_of(euclid).name == "euclidean"


def test_sparse_gradient_is_refused():
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt = InvariantSGD(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"parameter 0 of group 0 \(shape \(5, 3\)\): its "
                                           r"gradient is sparse"):
        opt.step()


def test_grad_is_not_modified():
    """Unlike geoopt (which adds the weight decay to .grad in place)."""
    params = _params("un")
    opt = InvariantSGD(params.values(), lr=1e-2, momentum=0.9, weight_decay=0.1,
                       nesterov=True)
    _loss(params, _targets(params)).backward()
    grads = {k: p.grad.clone() for k, p in params.items()}
    opt.step()
    for k, p in params.items():
        torch.testing.assert_close(p.grad, grads[k], atol=0, rtol=0)


# -- Tensor learning rates and maximize ---------------------------------------------------

@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
@pytest.mark.parametrize("update", UPDATES)
def test_tensor_lr_equals_float_lr(update, foreach):
    """A 0-dim Tensor rate (as a compiled step or the stacked engine passes it) gives the
    float rate's iterates, momentum included."""
    a, b = _params(update), _params(update)
    targets = _targets(a)
    kw = dict(momentum=0.9, nesterov=True, weight_decay=1e-3, foreach=foreach)
    _train(a, InvariantSGD(a.values(), lr=2e-3, **kw), targets, 10)
    _train(b, InvariantSGD(b.values(), lr=torch.tensor(2e-3, dtype=F64), **kw), targets, 10)
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TIGHT)


@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
@pytest.mark.parametrize("update", UPDATES)
def test_per_run_lr_equals_separate_runs(update, foreach):
    """A 1-D Tensor rate on stacked parameters: run r steps with rate r, as if alone; a
    run with rate 0 stays where it is (to rounding: UN renormalises it)."""
    rates = [2e-3, 5e-4, 0.0]
    runs = [_params(update, seed=s) for s in range(3)]
    targets = _targets(runs[0])
    for r, params in enumerate(runs):
        _train(params, InvariantSGD(params.values(), lr=rates[r], foreach=foreach), targets, 5)
    start = [_params(update, seed=s) for s in range(3)]
    stacked = {}
    for k, p in start[0].items():
        x = torch.stack([s[k].detach() for s in start])
        m = getattr(p, "manifold", None)
        stacked[k] = (geoopt.ManifoldParameter(x, manifold=m) if m is not None
                      else torch.nn.Parameter(x))
    opt = InvariantSGD(stacked.values(), lr=torch.tensor(rates, dtype=F64), foreach=foreach)
    for _ in range(5):
        opt.zero_grad()
        sum(_loss({k: v[r] for k, v in stacked.items()}, targets) for r in range(3)).backward()
        opt.step()
    for r in range(3):
        for k in stacked:
            torch.testing.assert_close(stacked[k][r], runs[r][k], **TIGHT, msg=f"{r} {k}")
    for k in stacked:
        torch.testing.assert_close(stacked[k][2], start[2][k].detach(), **TIGHT)
    assert not torch.allclose(stacked["w1"][0], start[0]["w1"].detach())


@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
@pytest.mark.parametrize("update", UPDATES)
def test_maximize_is_minimizing_the_negated_loss(update, foreach):
    a, b = _params(update), _params(update)
    targets = _targets(a)
    kw = dict(lr=1e-3, momentum=0.9, foreach=foreach)
    opt_a = InvariantSGD(a.values(), maximize=True, **kw)
    opt_b = InvariantSGD(b.values(), **kw)
    for _ in range(5):
        opt_a.zero_grad()
        (-_loss(a, targets)).backward()
        opt_a.step()
        opt_b.zero_grad()
        _loss(b, targets).backward()
        opt_b.step()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TIGHT)
    moved = _params(update)  # control: maximizing the loss itself goes the other way
    opt = InvariantSGD(moved.values(), maximize=True, **kw)
    _train(moved, opt, targets, 5)
    assert not torch.allclose(moved["w1"], b["w1"], atol=1e-6)
