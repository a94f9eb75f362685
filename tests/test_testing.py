"""The testing toolkit: the negative controls of the documented test file
(``test_my_model.py``), its errors, and the strategies for manifold points."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from manifold_nets import DiagScaledEuclidean, ObliqueManifold
from manifold_nets.testing import (
    assert_loss_invariant,
    assert_update_equivariant,
    oblique_points,
    rescalings,
    scaled_points,
    tangent_vectors,
)

from .test_my_model import inputs, loss_fn, model, momentum_sgd


# -- negative controls: the same checks fail where the theory says they must -------------
@settings(max_examples=3, deadline=None)
@given(g=rescalings(model, inputs, update="sm"))
def test_bsgd_fails_the_same_check(g):
    assert_loss_invariant(model, g, inputs, loss_fn)  # the element is a symmetry ...
    with pytest.raises(AssertionError, match=r"bsgd is not equivariant .* after \d+ steps?"):
        assert_update_equivariant(model, g, inputs, loss_fn, update="bsgd", steps=3,
                                  optimizer=momentum_sgd)  # ... that B-SGD does not respect


unresolved = rescalings(model, inputs, families=["units between 1 and 3"])


@settings(max_examples=3, deadline=None)
@given(g=unresolved)
def test_sm_fails_on_a_family_it_does_not_resolve(g):
    """The ReLU units between the first batch norm and the next conv: a symmetry (the loss
    is invariant), which SM's metric does not see through (it scales the batch norm's
    Euclidean parameters and the conv's columns)."""
    assert unresolved.families[0].resolves == {"un": False, "sm": False}
    assert_loss_invariant(model, g, inputs, loss_fn)
    with pytest.raises(AssertionError, match="sm is not equivariant"):
        assert_update_equivariant(model, g, inputs, loss_fn, update="sm", steps=3,
                                  optimizer=momentum_sgd)


def test_no_family_left_is_a_clear_error():
    with pytest.raises(ValueError, match="no family of symmetries of this model is resolved "
                                         "by bsgd"):
        rescalings(model, inputs, update="bsgd")


def test_a_failing_loss_check_shows_the_gap():
    from manifold_nets.symmetry.groups import Rescaling, ScalingSpace

    g = Rescaling(ScalingSpace(model), {"8.weight": (torch.full((3,), 2.0), None)},
                  label="head rows x2")
    with pytest.raises(AssertionError, match=r"loss not invariant under head rows x2: .*"
                                             r"relative gap \d"):
        assert_loss_invariant(model, g, inputs, loss_fn)


# -- strategies for points and tangent vectors ---------------------------------------------
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_oblique_points_and_tangents(data):
    m = ObliqueManifold(2)
    x = data.draw(oblique_points((4, 3, 2), ndim=2))
    torch.testing.assert_close(x.flatten(1).norm(dim=1), torch.ones(4, dtype=x.dtype))
    u = data.draw(tangent_vectors(m, x))
    assert float((u * x).flatten(1).sum(1).abs().max()) < 1e-12


@settings(max_examples=10, deadline=None)
@given(x=scaled_points((5, 3)))
def test_scaled_points_spread_their_filter_norms(x):
    norms = x.norm(dim=1)
    assert bool((norms > 0).all())
    m = DiagScaledEuclidean("left", 1)
    m.assert_check_point_on_manifold(x)
