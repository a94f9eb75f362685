"""Symmetry groups, invariance measurements, discover() and the audit.

Every invariance test has a negative control that must fail the same check.
"""

import re

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from manifold_nets import Arch1, Arch2
from manifold_nets.audit import UPDATE_RULES, audit_rows, format_audit
from manifold_nets.experiments.cli import main
from manifold_nets.nets import pair_max_pool
from manifold_nets.symmetry import (
    Rescaling,
    RescalingGroup,
    arch1_full_group,
    arch1_paper_group,
    arch2_group,
    discover,
    loss_invariance,
    orbit_orthogonality,
    predict,
    update_invariance,
)
from manifold_nets.symmetry.groups import ScalingSpace

RULES = {r.name: r for r in UPDATE_RULES}
#: relative gaps: (invariant below, broken above), as in the audit
TOL = {torch.float64: (1e-9, 1e-5), torch.float32: (1e-4, 1e-2)}


def _setup(arch, depth, half, dtype=torch.float64, device="cpu", seed=0, batch=24,
           in_features=6, classes=3):
    gen = torch.Generator().manual_seed(seed)
    if arch == 1:
        net = Arch1(depth, 2 * half, in_features, classes, generator=gen)
    else:
        net = Arch2(depth, 2 * half, in_features, classes, bn_eps=1e-30, generator=gen)
    net = net.to(device=device, dtype=dtype)
    x = torch.randn(batch, in_features, generator=gen, dtype=dtype).to(device)
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    return net, x, y, gen


def _gap(li):
    return max(li["loss_gap"], li["output_gap"])


# -- loss invariance, with controls --------------------------------------------------------
@settings(max_examples=12, deadline=None)
@given(arch=st.sampled_from([1, 2]), depth=st.integers(1, 3), half=st.integers(1, 3),
       log_scale=st.floats(0.01, 4.0), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 100))
def test_loss_invariance_under_every_group(arch, depth, half, log_scale, dtype, seed):
    if dtype == torch.float32:
        log_scale = min(log_scale, 1.5)
    net, x, y, gen = _setup(arch, depth, half, dtype, seed=seed)
    groups = [arch1_paper_group(net), arch1_full_group(net)] if arch == 1 else [
        arch2_group(net)]
    for group in groups:
        g = group.sample(log_scale, gen)
        assert _gap(loss_invariance(net, g, x, y)) < TOL[dtype][0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_invariance_on_device(device, dtype):
    net, x, y, gen = _setup(2, 2, 2, dtype, device=device)
    g = arch2_group(net).sample(1.0, gen)
    assert _gap(loss_invariance(net, g, x, y)) < TOL[dtype][0]
    neg = Rescaling(g.space, {"layers.0.linear.weight": (-torch.ones(4), None)},
                    allow_negative=True)
    assert _gap(loss_invariance(net, neg, x, y)) > TOL[dtype][1]


def test_negative_scalings_break_arch2():
    net, x, y, _ = _setup(2, 2, 3, batch=40)
    space = ScalingSpace(net)
    signs = torch.tensor([1.0, -1.0] * 3)
    g = Rescaling(space, {"layers.0.linear.weight": (signs, None)}, allow_negative=True)
    assert _gap(loss_invariance(net, g, x, y)) > 1e-3


def test_unequal_pair_entries_break_arch1():
    net, x, y, _ = _setup(1, 2, 3, batch=40)
    space = ScalingSpace(net)
    tied = torch.tensor([2.0, 2.0, 0.5, 0.5, 3.0, 3.0])
    untied = torch.tensor([2.0, 1.0, 0.5, 0.25, 3.0, 1.0])
    theta = (None, 1 / torch.tensor([2.0, 0.5, 3.0], dtype=torch.float64))
    ok = Rescaling(space, {"layers.1.linear.weight": (tied, None), "classifier.weight": theta})
    bad = Rescaling(space, {"layers.1.linear.weight": (untied, None),
                            "classifier.weight": theta})
    assert _gap(loss_invariance(net, ok, x, y)) < 1e-12
    assert _gap(loss_invariance(net, bad, x, y)) > 1e-3


def test_bn_eps_breaks_invariance_at_small_scales():
    net, x, y, _ = _setup(2, 1, 3, batch=40)
    g = Rescaling(ScalingSpace(net), {"layers.0.linear.weight": (torch.full((6,), 1e-3), None)})
    assert _gap(loss_invariance(net, g, x, y)) < 1e-12  # eps = 1e-30
    net.layers[0].bn.eps = 1e-5
    assert _gap(loss_invariance(net, g, x, y)) > 1e-2


def test_running_statistics_are_transformed():
    net, x, y, gen = _setup(2, 2, 2)
    net.train()
    with torch.no_grad():
        net(x)  # non-trivial running statistics
    g = arch2_group(net).sample(2.0, gen)
    gn = g.apply(net)
    for layer, glayer, a in zip(net.layers, gn.layers,
                                [g.scales[n][0] for n, _ in net.named_filters()], strict=True):
        torch.testing.assert_close(glayer.bn.running_mean, layer.bn.running_mean * a)
        torch.testing.assert_close(glayer.bn.running_var, layer.bn.running_var * a**2)
    assert loss_invariance(net, g, x, y)["output_gap"] < 1e-12  # eval mode


# -- orbit orthogonality ----------------------------------------------------------------------
def test_orbit_orthogonality_and_control():
    net, x, y, _ = _setup(1, 2, 3)
    for group in (arch1_paper_group(net), arch1_full_group(net)):
        assert float(orbit_orthogonality(net, group, x, y).max()) < 1e-12
    space = ScalingSpace(net)
    single_row = torch.zeros(space.dim, 1, dtype=torch.float64)
    single_row[space.rows("layers.0.linear.weight", 0)] = 1.0
    control = RescalingGroup(net, single_row, "one row of W_1")
    assert float(orbit_orthogonality(net, control, x, y).max()) > 1e-3


# -- update invariance ------------------------------------------------------------------------
@settings(max_examples=8, deadline=None)
@given(arch=st.sampled_from([1, 2]), depth=st.integers(1, 3), half=st.integers(1, 3),
       log_scale=st.floats(0.1, 2.0), seed=st.integers(0, 100))
def test_sm_equivariant_and_bsgd_not(arch, depth, half, log_scale, seed):
    # With one pooled unit per layer (half=1), every filter after the first has a single
    # entry, so at unit norm they are all +-1: equal rows give exactly tied features, and
    # max-pooling splits the gradient of a tie, which a rescaling (rounding apart the two
    # features) does not. A measure-zero degenerate case, excluded.
    assume(depth == 1 or half >= 2)
    net, x, y, gen = _setup(arch, depth, half, seed=seed)
    # A tiny net whose every unit is dead on x has a zero gradient: no update moves it, so
    # the negative control below would have nothing to detect.
    nn.functional.cross_entropy(net(x), y, reduction="sum").backward()
    assume(all(p.grad is not None and p.grad.abs().max() > 0 for p in net.filters()))
    net.zero_grad(set_to_none=True)
    group = arch1_paper_group(net) if arch == 1 else arch2_group(net)
    g = group.sample(log_scale, gen)
    sm = update_invariance(net, g, RULES["SM"].make, x, y, steps=2)
    assert sm["gap"] < 1e-9
    bsgd = update_invariance(net, g, RULES["B-SGD"].make, x, y, steps=2)
    assert bsgd["gap"] > 1e-5  # the negative control


def test_sm_not_equivariant_under_full_group_beyond_depth_1():
    for depth, equivariant in ((1, True), (2, False), (3, False)):
        net, x, y, gen = _setup(1, depth, 3)
        g = arch1_full_group(net).sample(1.0, gen)
        gap = update_invariance(net, g, RULES["SM"].make, x, y)["gap"]
        assert (gap < 1e-9) if equivariant else (gap > 1e-5), (depth, gap)


def test_un_arch2_invariant_arch1_not():
    net, x, y, gen = _setup(2, 2, 3)
    g = arch2_group(net).sample(1.0, gen)
    assert update_invariance(net, g, RULES["UN"].make, x, y)["gap"] < 1e-9
    net, x, y, gen = _setup(1, 2, 3)
    un = update_invariance(net, arch1_paper_group(net).sample(1.0, gen), RULES["UN"].make, x, y)
    # theta stays Euclidean: the projected start is already another network
    assert un["start_output_gap"] > 1e-3 and un["gap"] > 1e-3


def test_momentum_adam_and_weight_decay():
    net, x, y, gen = _setup(1, 2, 3)
    g = arch1_paper_group(net).sample(1.0, gen)
    gaps = {name: update_invariance(net, g, RULES[name].make, x, y)["gap"]
            for name in ("SM+momentum0", "SM+nesterov0", "SM+Adam", "SM+momentum(geoopt)",
                         "SM+wd", "B-Adam")}
    assert gaps["SM+momentum0"] < 1e-9 and gaps["SM+nesterov0"] < 1e-9
    assert gaps["SM+Adam"] < 1e-9
    # geoopt seeds its momentum buffer with the Euclidean gradient; weight decay; Adam
    assert gaps["SM+momentum(geoopt)"] > 1e-5 and gaps["SM+wd"] > 1e-5
    assert gaps["B-Adam"] > 1e-5


def test_predict():
    net1 = Arch1(depth=2, width=4, in_features=3)
    net2 = Arch2(depth=2, width=4, in_features=3)
    paper, full, a2 = arch1_paper_group(net1), arch1_full_group(net1), arch2_group(net2)
    assert predict("sm", paper, net1) and predict("sm", a2, net2)
    assert not predict("sm", full, net1)
    assert predict("un", a2, net2) and not predict("un", paper, net1)
    for group, net in ((paper, net1), (full, net1), (a2, net2)):
        assert not predict("bsgd", group, net)
        assert not predict("sm", group, net, options=dict(weight_decay=1e-2))
    assert predict("sm", arch1_full_group(Arch1(depth=1, width=4, in_features=3)),
                   Arch1(depth=1, width=4, in_features=3))
    # geoopt's momentum buffer starts at the Euclidean gradient: only a zero buffer keeps SM
    momentum = dict(momentum=0.9)
    assert not predict("sm", paper, net1, options=momentum)
    assert predict("sm", paper, net1, options=momentum, zero_buffer=True)
    # an update outside Table 1 is refused, also where the manifolds are given
    with pytest.raises(ValueError, match="unknown update 'UN'"):
        predict("UN", paper, net1, manifolds={})


def test_a_rule_predicts_with_its_own_update_and_options():
    net = Arch1(depth=2, width=4, in_features=3)
    paper = arch1_paper_group(net)
    for rule in UPDATE_RULES:
        assert rule.predict(paper, net) == predict(
            rule.update, paper, net, options=rule.options, zero_buffer=rule.zero_buffer)
    assert RULES["SM"].predict(paper, net) and not RULES["SM+wd"].predict(paper, net)


# -- discovery -------------------------------------------------------------------------------
def _degenerate_pairs(net, x):
    """Pairs whose pooling winner never changes on ``x`` (+2 for a pair dead throughout)."""
    extra, m = 0, x
    with torch.no_grad():
        for layer in net.layers:
            r = torch.relu(layer.linear(m))
            a, b = r[:, 0::2], r[:, 1::2]
            dead = ((a == 0) & (b == 0)).all(0)
            fixed = ((a >= b).all(0) | (b >= a).all(0)) & ~dead
            extra += int(fixed.sum()) + 2 * int(dead.sum())
            m = pair_max_pool(r)
    return extra


@pytest.mark.parametrize("arch, depth, seed", [(1, 1, 0), (1, 2, 6), (2, 1, 0), (2, 2, 0)])
def test_discover_counts(arch, depth, seed):
    gen = torch.Generator().manual_seed(seed)
    cls = Arch1 if arch == 1 else Arch2
    net = cls(depth=depth, width=64, in_features=16, num_classes=10, generator=gen)
    x = torch.randn(256, 16, generator=gen)
    assert _degenerate_pairs(net, x) == 0 or arch == 2
    found = discover(net, x, method="dense")
    assert discover(net, x).dim == found.dim
    # Arch1: a scale per pooling pair per layer. Arch2: a scale per filter (batch norm),
    # plus the batch norm's (gamma, beta) per pooling pair against the next layer's columns.
    assert found.dim == (32 if arch == 1 else 64 + 32) * depth
    assert found.gap > 1e3
    assert found.basis.shape == (found.space.dim, found.dim)


@pytest.mark.parametrize("seed", [0, 1])
def test_discover_counts_data_dependent_directions(seed):
    """A pair whose winner never changes on the data is a symmetry *of that data*."""
    gen = torch.Generator().manual_seed(seed)
    net = Arch1(depth=2, width=64, in_features=16, num_classes=10, generator=gen)
    x = torch.randn(256, 16, generator=gen)
    extra = _degenerate_pairs(net, x)
    assert extra > 0
    with pytest.warns(UserWarning, match=rf"the inputs give {64 + extra} directions, the "
                                         r"structure of the model 64: \d+ more .*dead units"):
        assert discover(net, x, method="dense").dim == 64 + extra
    assert discover(net, x).dim == 64  # the structural count is the generic one


class ConvBN(nn.Module):
    """A small conv net that is not ours: conv-BN-ReLU, 1x1 conv-ReLU, average, linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(4, eps=1e-30)
        self.conv2 = nn.Conv2d(4, 3, 1, bias=False)
        self.fc = nn.Linear(3, 5, bias=False)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(h.mean((2, 3)))


def test_discover_conv_net_with_batchnorm():
    torch.manual_seed(0)
    net = ConvBN().double()
    x = torch.randn(32, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (32,))
    found = discover(net, x, method="dense")
    # 4 conv1 filters (BN), 4 bn1 channels against conv2's columns, 3 conv2 filters
    # compensated by columns of fc
    assert found.dim == 11 and found.gap > 1e6
    assert discover(net, x).dim == 11  # the structural count agrees
    group = found.group(net)
    assert float(orbit_orthogonality(net, group, x, y).max()) < 1e-10
    gen = torch.Generator().manual_seed(1)
    g = group.sample(1.0, gen).calibrate(net, x)
    assert _gap(loss_invariance(net, g, x, y)) < 1e-9
    # SM is equivariant under the per-filter scalings of conv1, not under the whole group
    # (batch-norm parameters are Euclidean)
    filters = discover(net, x).family_group(net, "per-filter scaling of conv1")
    assert predict("sm", filters, net) and not predict("sm", group, net)
    g = filters.sample(1.0, gen).calibrate(net, x)
    assert update_invariance(net, g, RULES["SM"].make, x, y)["gap"] < 1e-9
    assert update_invariance(net, g, RULES["B-SGD"].make, x, y)["gap"] > 1e-5


# -- audit and CLI ------------------------------------------------------------------------------
def test_audit_rows_small():
    rows = audit_rows(2, 1, width=4, in_features=5, batch=24)
    assert rows and all(r.ok for r in rows), format_audit([r for r in rows if not r.ok])
    assert any(r.expected is False for r in rows)  # negative controls are in the audit


def test_cli_check(capsys):
    status = main(["check", "--arch", "arch1", "--depth", "2", "--width", "4",
                   "--in-features", "5", "--batch", "24"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert re.search(r"(\d+)/\1 expectations hold", out)
    assert "untied pairs (control)" in out


def test_cli_check_fails_when_an_expectation_fails(capsys):
    # PyTorch's default eps breaks the exact invariance the audit expects for Arch2
    status = main(["check", "--arch", "arch2", "--depth", "1", "--width", "4",
                   "--in-features", "5", "--batch", "24", "--bn-eps", "1e-1"])
    assert status == 1
    assert "do NOT" in capsys.readouterr().out


# -- bad input --------------------------------------------------------------------------------
def test_bad_scalings():
    net = Arch1(depth=2, width=4, in_features=3)
    space = ScalingSpace(net)
    with pytest.raises(ValueError, match=r"row scaling 1 is -2.0: scalings must be positive"):
        Rescaling(space, {"layers.0.linear.weight": ([1.0, -2.0, 1.0, 1.0], None)})
    with pytest.raises(ValueError, match=r"scaling 0 is 0.0: .*zero scaling is not invertible"):
        Rescaling(space, {"layers.0.linear.weight": ([0.0, 1.0, 1.0, 1.0], None)},
                  allow_negative=True)
    with pytest.raises(ValueError, match=r"row scalings have 3 entries, the weight has 4"):
        Rescaling(space, {"layers.0.linear.weight": ([1.0] * 3, None)})
    with pytest.raises(ValueError, match=r"no rescalable weight named 'W1'"):
        Rescaling(space, {"W1": (None, None)})
    group = arch1_paper_group(net)
    with pytest.raises(ValueError, match=r"beta_s scaling 1 is -1.0"):
        group.element(alpha=[1.0], beta_s=[1.0, -1.0])
    with pytest.raises(ValueError, match=r"alpha needs 1 entries, got 2"):
        group.element(alpha=[1.0, 2.0], beta_s=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"A\[0\] scaling 0 is 0.0"):
        arch2_group(Arch2(depth=1, width=2, in_features=3)).element([[0.0, 1.0]])


def test_paper_groups_need_paper_nets():
    with pytest.raises(ValueError, match=r"need an Arch1/Arch2 model; use discover"):
        arch1_paper_group(nn.Sequential(nn.Linear(3, 2)))


def test_elements_from_scales_match_the_paper():
    net = Arch1(depth=2, width=4, in_features=3)
    g = arch1_paper_group(net).element(alpha=[2.0], beta_s=[3.0, 0.5])
    torch.testing.assert_close(g.scales["layers.0.linear.weight"][0], torch.full((4,), 2.0,
                               dtype=torch.float64))
    torch.testing.assert_close(g.scales["layers.1.linear.weight"][0],
                               torch.tensor([3.0, 3.0, 0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(g.scales["classifier.weight"][1],
                               torch.tensor([1 / 6, 1.0], dtype=torch.float64))
    full = arch1_full_group(net).element([[2.0, 3.0], [5.0, 7.0]])
    torch.testing.assert_close(full.scales["layers.1.linear.weight"][1],
                               torch.tensor([0.5, 1 / 3], dtype=torch.float64))


def test_discover_with_biases_everywhere():
    """Regression: a Linear with a bias before a batch norm crashed inside torch.func (the
    tangent's keys were in another order than the primals'). With biases, train-mode batch
    norm also makes the first layer's bias irrelevant, so one more direction (all of its
    biases scaled together) is a symmetry: 17 against 16 without biases (the control)."""
    torch.manual_seed(0)
    counts = {}
    for bias in (True, False):
        model = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=bias), torch.nn.BatchNorm1d(8),
                                    torch.nn.ReLU(), torch.nn.Linear(8, 3, bias=bias))
        x = torch.randn(256, 4)
        found = discover(model, x, method="dense")
        assert found.gap > 1e10
        assert discover(model, x).dim == found.dim
        counts[bias] = found.dim
    assert counts == {True: 17, False: 16}


class _TokenNet(torch.nn.Module):
    """Token ids -> embedding -> Linear -> LayerNorm -> ReLU -> dropout -> Linear."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.l1 = torch.nn.Linear(8, 16)
        self.ln = torch.nn.LayerNorm(16)
        self.drop = torch.nn.Dropout(0.1)
        self.l2 = torch.nn.Linear(16, 5)

    def forward(self, tokens, scale=None):
        h = self.drop(torch.relu(self.ln(self.l1(self.emb(tokens)))))
        return self.l2(h if scale is None else h * scale)


def test_discover_token_inputs_dropout_and_tuples():
    """Integer token ids pass untouched (an Embedding would fail on floats), dropout is off,
    several inputs go as a tuple. 25 symmetries: the layer norm's 16 channels against l2
    (through the ReLU), l1's rows all together (the layer norm removes a common scale), and
    the 8 embedding dimensions against l1's columns."""
    torch.manual_seed(0)
    net = _TokenNet()
    tokens = torch.randint(0, 20, (64, 6))
    for method in ("dense", "structural"):
        found = discover(net, tokens, method=method)
        assert found.dim == 25, method
        assert discover(net, (tokens, torch.rand(64, 6, 16) + 0.5), method=method).dim == 25
    assert found.gap == float("inf")


def test_discover_refuses_too_few_inputs():
    """Fewer output values than candidates cannot determine the dense count: a clear error
    with the numbers, not a confident wrong answer."""
    net = _TokenNet()
    with pytest.raises(ValueError, match=r"5 output values for 89 candidate directions.*"
                                         r"at least 18 varied inputs"):
        discover(net, torch.randint(0, 20, (1, 1)), method="dense")
