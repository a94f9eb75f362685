"""Fuzzing the manifolds with extreme values: no NaN or inf appears silently.

Each function either returns a finite, correct result or, where the exact result is not
representable in the dtype, behaves as documented. Huge and tiny norms are drawn on a
log scale over the whole range of each dtype.
"""

from __future__ import annotations

import geoopt
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from manifold_nets import DiagScaledEuclidean, InvariantSGD, ObliqueManifold

# UN on models without a normalisation after their filters, on purpose: these tests are
# about the optimiser, not about the model's function (tests/test_declare.py is)
pytestmark_un = pytest.mark.filterwarnings("ignore:declare.+normalising the filters")
pytestmark = pytestmark_un

#: log10 of the largest and smallest positive normal number per dtype, with headroom.
LOG_RANGE = {torch.float32: (-36, 36), torch.float64: (-300, 300)}


@st.composite
def extreme(draw, dtype=None):
    dtype = dtype or draw(st.sampled_from([torch.float32, torch.float64]))
    lo, hi = LOG_RANGE[dtype]
    out, inp = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**16))
    x = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    log_scales = torch.tensor(draw(st.lists(st.floats(lo, hi), min_size=out, max_size=out)),
                              dtype=torch.float64)
    return (x * 10.0 ** log_scales[:, None]).to(dtype)


@given(extreme())
def test_oblique_projx_is_exact_for_any_finite_nonzero_filter(x):
    y = ObliqueManifold().projx(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double().norm(dim=1), torch.ones(x.shape[0], dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_negative_control_plain_normalisation_fails_on_extreme_norms():
    """The naive ``w / ||w||`` loses huge and tiny filters: the safe path is needed."""
    x = torch.tensor([[1e30, 1e30], [1e-30, 1e-30]], dtype=torch.float32)
    naive = x / x.norm(dim=1, keepdim=True)
    assert not torch.allclose(naive.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(ObliqueManifold().projx(x).norm(dim=1), torch.ones(2))


@given(extreme(), st.floats(-12, 12), st.sampled_from([torch.float32, torch.float64]))
def test_un_step_stays_finite_and_on_the_manifold(w, log_grad, dtype):
    """An UN step with gradients from 1e-12 to 1e12 keeps every filter unit-norm."""
    m = ObliqueManifold()
    p = geoopt.ManifoldParameter(m.projx(w).to(dtype), manifold=m)
    gen = torch.Generator().manual_seed(int(abs(log_grad) * 1000))
    p.grad = torch.randn(p.shape, generator=gen, dtype=dtype) * 10.0**log_grad
    for opt in (geoopt.optim.RiemannianSGD([p], lr=1.0), InvariantSGD([p], lr=1.0)):
        opt.step()
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach().double().norm(dim=1),
                                   torch.ones(p.shape[0], dtype=torch.float64), atol=1e-6, rtol=0)


@given(extreme(dtype=torch.float64), st.sampled_from(["left", "right"]))
def test_sm_gradient_finite_when_representable(x, side):
    """SM's ``||w_i||^2 g_i`` is finite whenever the exact value is representable."""
    m = DiagScaledEuclidean(side)
    g = torch.randn_like(x)
    g[..., 0] = 0.0  # exact zeros must stay zeros, never 0 * inf = NaN
    exact_scale = (x.double() ** 2).sum(dim=1 if side == "left" else 0).max()
    r = m.egrad2rgrad(x, g)
    assert not torch.isnan(r).any()
    if exact_scale * g.abs().max() < torch.finfo(x.dtype).max / 10:
        assert torch.isfinite(r).all()
    assert torch.isfinite(m.inner(x, g, g)).all() or exact_scale == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("factor", [4.0, 1e10])
def test_sm_gradient_overflow_saturates_never_nan(dtype, factor):
    """Where ``||w_i||^2`` overflows, SM's scale saturates: finite, and zeros stay zero."""
    big = torch.finfo(dtype).max ** 0.5 * factor
    x = torch.tensor([[big, big]], dtype=dtype)
    g = torch.tensor([[1.0, 0.0]], dtype=dtype)
    r = DiagScaledEuclidean().egrad2rgrad(x, g)
    assert r[0, 0] == torch.finfo(dtype).max and r[0, 1] == 0
    p = geoopt.ManifoldParameter(x.clone(), manifold=DiagScaledEuclidean())
    p.grad = g.clone()
    InvariantSGD([p], lr=1e-3).step()
    assert torch.isfinite(p).all() and p[0, 1] == x[0, 1]


def test_un_step_with_a_huge_gradient_keeps_the_tangent_direction():
    """Projecting before stepping: ``(1 + lr<x,g>) x - lr g`` would cancel ``x`` in float32."""
    m = ObliqueManifold()
    x = torch.tensor([[1.0, 0.0]])
    g = torch.tensor([[1e8, 1.0]])
    want = torch.tensor([[1.0, -1.0]]) / 2**0.5  # Orth(x - lr (g - <x,g> x)), lr = 1
    for make in (lambda p: geoopt.optim.RiemannianSGD([p], lr=1.0),
                 lambda p: InvariantSGD([p], lr=1.0, foreach=False),
                 lambda p: InvariantSGD([p], lr=1.0, foreach=True)):
        p = geoopt.ManifoldParameter(x.clone(), manifold=m)
        p.grad = g.clone()
        make(p).step()
        torch.testing.assert_close(p.detach(), want)
