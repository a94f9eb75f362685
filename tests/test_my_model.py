"""Invariance tests of a small conv net with batch norm, written with manifold_nets.testing
(the Testing page of the docs shows this file)."""

import torch
from hypothesis import given, settings
from torch import nn

from manifold_nets import InvariantSGD
from manifold_nets.testing import assert_loss_invariant, assert_update_equivariant, rescalings

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6, eps=1e-12),
                      nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1, bias=False),
                      nn.BatchNorm2d(4, eps=1e-12), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(4, 3)).double()   # float64: tight checks
inputs = torch.randn(16, 3, 8, 8, dtype=torch.float64)
labels = torch.randint(0, 3, (16,))


def loss_fn(outputs):
    return nn.functional.cross_entropy(outputs, labels)


def momentum_sgd(params):
    return InvariantSGD(params, lr=1e-2, momentum=0.9)


@settings(max_examples=5, deadline=None)
@given(g=rescalings(model, inputs, update="sm"))   # symmetry-group elements that SM resolves
def test_sm_is_update_invariant(g):
    assert_loss_invariant(model, g, inputs, loss_fn)      # loss_fn(outputs) -> scalar
    assert_update_equivariant(model, g, inputs, loss_fn, update="sm", steps=3,
                              optimizer=momentum_sgd)


@settings(max_examples=5, deadline=None)
@given(g=rescalings(model, inputs, update="un"))
def test_un_is_update_invariant(g):
    assert_update_equivariant(model, g, inputs, loss_fn, update="un", steps=3,
                              optimizer=momentum_sgd)
