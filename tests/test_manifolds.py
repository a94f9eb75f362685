"""Identities, optimiser steps and bad input for ObliqueManifold and DiagScaledEuclidean."""

from __future__ import annotations

import copy
import io
import re

import geoopt
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from manifold_nets import DiagScaledEuclidean, ObliqueManifold
from manifold_nets import math as mm

from .conftest import DEVICES, DTYPES, TOL

# -- strategies ------------------------------------------------------------------------


@st.composite
def cases(draw, kinds=("oblique", "sm-left", "sm-right")):
    """A manifold, a tensor shape it accepts, a dtype, a device and a seed."""
    kind = draw(st.sampled_from(kinds))
    conv = draw(st.booleans())
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    out, inp = draw(st.integers(1, 5)), draw(st.integers(2, 6))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3))) if conv else ()
    weight = (out, inp) + kernel
    if kind == "oblique":
        manifold = ObliqueManifold(ndim=len(weight) - 1)
    elif kind == "sm-left":
        manifold = DiagScaledEuclidean("left", ndim=len(weight) - 1)
    else:
        manifold = DiagScaledEuclidean("right", ndim=len(weight))
    dtype = draw(st.sampled_from(DTYPES))
    device = draw(st.sampled_from(DEVICES))
    seed = draw(st.integers(0, 2**16))
    return manifold, batch + weight, dtype, device, seed


def _tensors(manifold, shape, dtype, device, seed, n=3):
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(shape, generator=gen, dtype=dtype).to(device) for _ in range(n)]
    x = out[0]
    if isinstance(manifold, ObliqueManifold):
        x = manifold.projx(x)
    else:  # a point of the scaled space with filters of very different norms
        scales = torch.exp(2 * torch.randn(shape[: len(shape) - manifold.ndim], generator=gen))
        x = x * scales.to(dtype).to(device).reshape(scales.shape + (1,) * manifold.ndim)
    return [x] + out[1:]


def _close(a, b, dtype, scale=1.0):
    tol = TOL[dtype]
    torch.testing.assert_close(a, b, atol=tol["atol"] * scale, rtol=tol["rtol"] * scale)


# -- identities --------------------------------------------------------------------------


@given(cases())
def test_projx_lands_on_manifold_and_is_idempotent(case):
    manifold, shape, dtype, device, seed = case
    x, _, _ = _tensors(manifold, shape, dtype, device, seed)
    y = manifold.projx(torch.randn_like(x) + 0.1)
    ok, reason = manifold.check_point_on_manifold(y, explain=True, **TOL[dtype])
    assert ok, reason
    _close(manifold.projx(y), y, dtype)


@given(cases())
def test_proju_is_idempotent_and_tangent(case):
    manifold, shape, dtype, device, seed = case
    x, u, _ = _tensors(manifold, shape, dtype, device, seed)
    p = manifold.proju(x, u)
    _close(manifold.proju(x, p), p, dtype)
    ok, reason = manifold.check_vector_on_tangent(x, p, explain=True, **TOL[dtype])
    assert ok, reason


@given(cases(kinds=("oblique",)))
def test_oblique_proju_is_orthogonal_to_every_filter(case):
    manifold, shape, dtype, device, seed = case
    x, u, _ = _tensors(manifold, shape, dtype, device, seed)
    inner = (x * manifold.proju(x, u)).sum(dim=mm.filter_dims(manifold.ndim))
    _close(inner, torch.zeros_like(inner), dtype)


@given(cases(), st.floats(1e-3, 10.0))
def test_retr_lands_on_manifold(case, step):
    manifold, shape, dtype, device, seed = case
    x, u, _ = _tensors(manifold, shape, dtype, device, seed)
    y = manifold.retr(x, step * manifold.proju(x, u))
    ok, reason = manifold.check_point_on_manifold(y, explain=True, **TOL[dtype])
    assert ok, reason
    assert torch.isfinite(y).all()


@given(cases())
def test_transp_lands_in_new_tangent_space(case):
    manifold, shape, dtype, device, seed = case
    x, u, v = _tensors(manifold, shape, dtype, device, seed)
    y = manifold.retr(x, manifold.proju(x, u))
    w = manifold.transp(x, y, manifold.proju(x, v))
    ok, reason = manifold.check_vector_on_tangent(y, w, explain=True, **TOL[dtype])
    assert ok, reason


@given(cases())
def test_riemannian_gradient_identity(case):
    """inner(x, egrad2rgrad(x, g), v) == <g, v> for every tangent v."""
    manifold, shape, dtype, device, seed = case
    x, g, v = _tensors(manifold, shape, dtype, device, seed)
    v = manifold.proju(x, v)
    lhs = manifold.inner(x, manifold.egrad2rgrad(x, g), v)
    rhs = (g * v).sum(dim=mm.filter_dims(manifold.ndim))
    _close(lhs, rhs, dtype, scale=10.0)


@given(cases(kinds=("sm-left", "sm-right")))
def test_negative_control_euclidean_gradient_fails_the_identity(case):
    """The plain gradient is not the Riemannian gradient of the scaled metric."""
    manifold, shape, dtype, device, seed = case
    x, g, v = _tensors(manifold, shape, dtype, device, seed)
    x = x * 3.0  # norms far from one, so the metric differs from the Euclidean one
    lhs = manifold.inner(x, g, v)
    rhs = (g * v).sum(dim=mm.filter_dims(manifold.ndim))
    assert not torch.allclose(lhs, rhs, **TOL[dtype])


@given(cases())
def test_batch_equals_loop(case):
    """geoopt's broadcasting semantics: a stacked batch acts element by element."""
    manifold, shape, dtype, device, seed = case
    x, u, g = _tensors(manifold, (3,) + shape, dtype, device, seed)
    for i in range(3):
        _close(manifold.proju(x, u)[i], manifold.proju(x[i], u[i]), dtype)
        _close(manifold.egrad2rgrad(x, g)[i], manifold.egrad2rgrad(x[i], g[i]), dtype)
        _close(manifold.retr(x, u)[i], manifold.retr(x[i], u[i]), dtype)
        _close(manifold.inner(x, u, g)[i], manifold.inner(x[i], u[i], g[i]), dtype, 10.0)


@pytest.mark.parametrize("kind", ["oblique", "sm-left", "sm-right"])
def test_scaled_wrapper(kind, dtype):
    """Both manifolds work inside geoopt.Scaled (declared __scaling__ behaviour)."""
    base = {"oblique": ObliqueManifold(), "sm-left": DiagScaledEuclidean(),
            "sm-right": DiagScaledEuclidean("right")}[kind]
    scaled = geoopt.Scaled(base, scale=2.0)
    x = base.projx(torch.randn(4, 5, dtype=dtype) * 2)
    u = base.proju(x, torch.randn(4, 5, dtype=dtype))
    _close(scaled.retr(x, u), base.retr(x, u / 2.0), dtype)
    assert scaled.check_point_on_manifold(scaled.retr(x, u), **TOL[dtype])
    p = geoopt.ManifoldParameter(x.clone(), manifold=scaled)
    (p * torch.randn_like(p)).sum().backward()
    geoopt.optim.RiemannianSGD([p], lr=1e-2).step()
    assert base.check_point_on_manifold(p.detach(), **TOL[dtype])


def test_oblique_expmap_and_dist(dtype):
    m = ObliqueManifold()
    x = m.projx(torch.randn(6, 4, dtype=dtype))
    u = m.proju(x, torch.randn(6, 4, dtype=dtype)) * 0.5
    y = m.expmap(x, u)
    assert m.check_point_on_manifold(y, **TOL[dtype])
    # The exponential map travels exactly ||u_i|| along the geodesic of every filter.
    _close(m.dist(x, y), u.norm(dim=-1), dtype, scale=100.0)
    _close(m.expmap(x, torch.zeros_like(u)), x, dtype)
    assert m.dist(x, y, keepdim=True).shape == (6, 1)


# -- optimiser steps against the paper's formulas (float64, tight) -------------------------


def _grad_of(weight, target):
    return 2 * (weight - target)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_un_step_matches_table1(device, momentum):
    """UN: W+ = Orth(W - lr Pi_W(grad)), with geoopt's momentum semantics."""
    torch.manual_seed(0)
    m = ObliqueManifold()
    w0 = m.projx(torch.randn(5, 7, dtype=torch.float64, device=device))
    target = torch.randn_like(w0)
    p = geoopt.ManifoldParameter(w0.clone(), manifold=m)
    opt = geoopt.optim.RiemannianSGD([p], lr=0.05, momentum=momentum)
    w, buf = w0.clone(), None
    for _ in range(5):
        opt.zero_grad()
        ((p - target) ** 2).sum().backward()
        opt.step()
        g = _grad_of(w, target)
        rg = g - (w * g).sum(1, keepdim=True) * w
        if momentum:
            # geoopt starts the buffer at the Euclidean gradient, then adds rg once.
            buf = g.clone() if buf is None else buf
            buf = momentum * buf + rg
            w_new = w - 0.05 * buf
            w_new = w_new / w_new.norm(dim=1, keepdim=True)
            buf = buf - (w_new * buf).sum(1, keepdim=True) * w_new
            w = w_new
        else:
            w = w - 0.05 * rg
            w = w / w.norm(dim=1, keepdim=True)
        torch.testing.assert_close(p.detach(), w, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sm_step_matches_table1(device, momentum):
    """SM: W+ = W - lr Diag(||w_i||^2) grad_W; theta+ = theta - lr grad Diag(||theta_j||^2)."""
    torch.manual_seed(1)
    w0 = torch.randn(5, 7, dtype=torch.float64, device=device) * 3
    t0 = torch.randn(4, 5, dtype=torch.float64, device=device) * 0.3
    tw, tt = torch.randn_like(w0), torch.randn_like(t0)
    pw = geoopt.ManifoldParameter(w0.clone(), manifold=DiagScaledEuclidean("left"))
    pt = geoopt.ManifoldParameter(t0.clone(), manifold=DiagScaledEuclidean("right"))
    opt = geoopt.optim.RiemannianSGD([pw, pt], lr=1e-3, momentum=momentum)
    w, t, bw, bt = w0.clone(), t0.clone(), None, None
    for _ in range(5):
        opt.zero_grad()
        (((pw - tw) ** 2).sum() + ((pt - tt) ** 2).sum()).backward()
        opt.step()
        gw, gt = _grad_of(w, tw), _grad_of(t, tt)
        rw = torch.diag((w * w).sum(1)) @ gw
        rt = gt @ torch.diag((t * t).sum(0))
        if momentum:
            bw = gw.clone() if bw is None else bw
            bt = gt.clone() if bt is None else bt
            bw, bt = momentum * bw + rw, momentum * bt + rt
            rw, rt = bw, bt
        w, t = w - 1e-3 * rw, t - 1e-3 * rt
        torch.testing.assert_close(pw.detach(), w, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(pt.detach(), t, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_parity_with_geoopt_sphere(device, momentum, nesterov):
    """On 2-D weights UN is geoopt's Sphere: the same iterates to 1e-12 in float64."""
    torch.manual_seed(2)
    w0 = geoopt.Sphere().projx(torch.randn(6, 9, dtype=torch.float64, device=device))
    target = torch.randn_like(w0)
    params = [geoopt.ManifoldParameter(w0.clone(), manifold=m)
              for m in (ObliqueManifold(), geoopt.Sphere())]
    opts = [geoopt.optim.RiemannianSGD([p], lr=0.03, momentum=momentum, nesterov=nesterov,
                                       weight_decay=1e-3) for p in params]
    for _ in range(20):
        for p, opt in zip(params, opts, strict=True):
            opt.zero_grad()
            ((p - target) ** 2).sum().backward()
            opt.step()
        torch.testing.assert_close(params[0].detach(), params[1].detach(),
                                   atol=1e-12, rtol=1e-12)


def test_negative_control_geoopt_sphere_is_wrong_for_conv():
    """geoopt's Sphere normalises the kernel-width axis of a conv weight, not the filter."""
    w = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    per_filter = lambda x: x.flatten(1).norm(dim=1)  # noqa: E731
    assert not torch.allclose(per_filter(geoopt.Sphere().projx(w)), torch.ones(4,
                                                                               dtype=w.dtype))
    torch.testing.assert_close(per_filter(ObliqueManifold(ndim=3).projx(w)),
                               torch.ones(4, dtype=w.dtype))


@pytest.mark.parametrize("kind", ["oblique", "sm"])
def test_riemannian_adam_trains(kind, dtype, device):
    torch.manual_seed(3)
    m = ObliqueManifold() if kind == "oblique" else DiagScaledEuclidean()
    p = geoopt.ManifoldParameter(m.projx(torch.randn(5, 8, dtype=dtype, device=device)),
                                 manifold=m)
    target = m.projx(torch.randn_like(p))
    opt = geoopt.optim.RiemannianAdam([p], lr=5e-2)
    losses = []
    for _ in range(50):
        opt.zero_grad()
        loss = ((p - target) ** 2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert m.check_point_on_manifold(p.detach(), **TOL[dtype])


# -- numerics --------------------------------------------------------------------------


def test_one_un_step_float32_keeps_unit_norm():
    torch.manual_seed(4)
    m = ObliqueManifold()
    p = geoopt.ManifoldParameter(m.random(64, 784), manifold=m)
    (p * torch.randn_like(p)).sum().mul(100).backward()
    geoopt.optim.RiemannianSGD([p], lr=1.0).step()
    assert (p.detach().norm(dim=1) - 1).abs().max() <= 1e-6


def test_un_does_not_drift_over_1e5_steps():
    torch.manual_seed(5)
    x = mm.oblique_projx(torch.randn(8, 32))
    steps = torch.randn(1000, 8, 32) * 0.1
    for i in range(100_000):
        x = mm.oblique_retr(x, mm.oblique_proju(x, steps[i % 1000]))
    assert (x.norm(dim=1) - 1).abs().max() <= 1e-6


def test_sm_zero_filter_is_frozen_without_nan(dtype):
    m = DiagScaledEuclidean()
    x = torch.randn(3, 4, dtype=dtype)
    x[1] = 0
    g = torch.randn_like(x)
    r = m.egrad2rgrad(x, g)
    assert torch.isfinite(r).all() and (r[1] == 0).all()
    assert torch.isfinite(m.inner(x, g, g)).all()
    right = DiagScaledEuclidean("right")
    x[:, 2] = 0
    assert (right.egrad2rgrad(x, g)[:, 2] == 0).all()
    assert torch.isfinite(right.inner(x, g, g)).all()


# -- torch plumbing ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["oblique", "sm"])
def test_state_dict_deepcopy_and_to(kind):
    torch.manual_seed(6)
    m = ObliqueManifold() if kind == "oblique" else DiagScaledEuclidean()
    model = torch.nn.Linear(6, 4, bias=False)
    model.weight = geoopt.ManifoldParameter(m.projx(model.weight.detach()), manifold=m)
    opt = geoopt.optim.RiemannianSGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(10, 6)

    def step(model, opt):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()

    step(model, opt)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    twin = copy.deepcopy(model)
    assert isinstance(twin.weight, geoopt.ManifoldParameter)
    assert repr(twin.weight.manifold) == repr(m)
    twin_opt = geoopt.optim.RiemannianSGD(twin.parameters(), lr=0.1, momentum=0.9)
    buf.seek(0)
    state = torch.load(buf)
    twin.load_state_dict(state["model"])
    twin_opt.load_state_dict(state["opt"])
    step(model, opt)
    step(twin, twin_opt)
    torch.testing.assert_close(twin.weight, model.weight, atol=0, rtol=0)
    model64 = copy.deepcopy(model).to(torch.float64)
    assert model64.weight.dtype == torch.float64
    assert isinstance(model64.weight, geoopt.ManifoldParameter)


# -- bad input ---------------------------------------------------------------------------


def test_zero_filter_is_refused_with_its_index():
    x = torch.randn(5, 4)
    x[3] = 0
    with pytest.raises(ValueError, match=r"filter 3 has zero norm .*oblique manifold"):
        ObliqueManifold().projx(x)
    conv = torch.randn(2, 6, 3, 2, 2)
    conv[1, 4] = 0
    with pytest.raises(ValueError, match=re.escape("filter (1, 4) has zero norm")):
        ObliqueManifold(ndim=3).projx(conv)


def test_nonfinite_filter_is_refused():
    x = torch.randn(5, 4)
    x[2, 1] = float("inf")
    with pytest.raises(ValueError, match="filter 2 has non-finite norm"):
        ObliqueManifold().projx(x)


def test_right_side_needs_a_matrix():
    with pytest.raises(ValueError, match="side='right' needs the classifier matrix"):
        geoopt.ManifoldParameter(torch.randn(5), manifold=DiagScaledEuclidean("right"))
    with pytest.raises(ValueError, match="side='right' needs the classifier matrix"):
        DiagScaledEuclidean("right").egrad2rgrad(torch.randn(5), torch.randn(5))


@pytest.mark.parametrize("manifold", [ObliqueManifold(), DiagScaledEuclidean()],
                         ids=["oblique", "sm"])
@pytest.mark.parametrize("bad", [torch.int64, torch.complex64, torch.bool])
def test_unsupported_dtype_is_refused(manifold, bad):
    x = torch.ones(3, 4).to(bad)
    with pytest.raises(TypeError, match="need a real floating dtype"):
        manifold.projx(x)
    with pytest.raises(TypeError, match="need a real floating dtype"):
        geoopt.ManifoldParameter(x, manifold=manifold)


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError, match="side must be 'left' or 'right'"):
        DiagScaledEuclidean("up")
    with pytest.raises(ValueError, match=r"ndim must be an integer >= 1"):
        ObliqueManifold(ndim=0)
    with pytest.raises(ValueError, match=r"ndim must be an integer >= 2"):
        DiagScaledEuclidean("right", ndim=1)
