"""discover() on models it was not written for: the structural count against the dense
measurement and against the theory, families, the numerical check, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from manifold_nets import InvariantSGD
from manifold_nets.experiments.cli import main
from manifold_nets.experiments.zoo import pre_ln_transformer, residual_mlp, small_resnet
from manifold_nets.nets import Arch2
from manifold_nets.symmetry import Rescaling, discover
from manifold_nets.symmetry.discover import _verify
from manifold_nets.symmetry.structure import _null_space, analysis_copy
from manifold_nets.testing import assert_loss_invariant, assert_update_equivariant, rescalings


def _exact_bn(model: nn.Module) -> nn.Module:
    """Normalisations with a negligible eps, so that their invariance is exact to
    round-off and the dense count has a clean gap."""
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
            m.eps = 1e-12
    return model


def _randomize_affine(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial biases and normalisation parameters, as in a trained model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2
                        + (1.0 if name.endswith("weight") else 0.0))
    return model


def _outputs_change(model, found, x, columns=None, log_scale=0.5, seed=0):
    """Relative change of the outputs under a random element of (part of) the group."""
    net = analysis_copy(model, torch.float64, True)
    basis = found.basis.to_dense()
    basis = basis if columns is None else basis[:, columns]
    v = basis @ torch.randn(basis.shape[1], generator=torch.Generator().manual_seed(seed),
                            dtype=torch.float64)
    g = Rescaling.from_log(found.space, v * (log_scale / v.abs().max()))
    xx = x.double() if x.is_floating_point() else x
    with torch.no_grad():
        a, b = net(xx), g.apply(net)(xx)
    return float((a - b).norm() / a.norm())


# Theory: the count of each architecture, derived family by family (docs/symmetries.rst).
def _theory_resnet(m) -> int:
    per_filter = sum(c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d))
    units = sum(b.bn1.num_features for b in m.modules() if hasattr(b, "conv2"))
    stream = sum(stage[0].bn2.num_features for stage in (m.layer1, m.layer2)) + 0
    return per_filter + units + stream


def _theory_transformer(d, mlp, layers) -> int:
    # per block: ln1 and ln2 channels against their readers, the MLP's ReLU units, Q/K
    # and V/O per dimension; then the final norm's channels against the head and the
    # residual stream's one scale (token and position embeddings against every reader)
    return layers * (2 * d + mlp + 2 * d) + d + 1


CASES = {
    "residual MLP": (lambda: _randomize_affine(residual_mlp(d_in=5, d=6, hidden=10,
                                                            blocks=2)),
                     lambda: torch.randn(3000, 5) * 3, 10 + 10 + 6),
    "ResNet": (lambda: _exact_bn(small_resnet()),
               lambda: torch.randn(160, 3, 16, 16), None),
    "pre-LN transformer": (lambda: _exact_bn(_randomize_affine(pre_ln_transformer(
        vocab=11, d=8, heads=2, mlp=16, layers=1, context=5, out=4))),
        lambda: torch.randint(0, 11, (300, 5)), _theory_transformer(8, 16, 1)),
    "Arch2": (lambda: _exact_bn(Arch2(depth=2, width=8, in_features=6, num_classes=3)),
              lambda: torch.randn(300, 6), 2 * (8 + 4)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_structural_count_is_the_dense_count_and_the_theory(name):
    make, inputs, theory = CASES[name]
    torch.manual_seed(0)
    model, x = make(), inputs()
    found = discover(model, x)
    dense = discover(model, x, method="dense")
    assert found.method == "structural" and dense.method == "dense"
    assert dense.gap > 1e6, dense
    assert found.dim == dense.dim, (found, dense)
    assert found.rank == dense.rank  # the span of the candidates, computed two ways
    theory = theory if theory is not None else _theory_resnet(model)
    assert found.dim == theory
    assert sum(f.size for f in found.families) == found.dim
    assert found.verified < 1e-8
    # every family is a symmetry on its own; the negative control breaks the outputs
    for f in found.families:
        assert _outputs_change(model, found, x, f.columns) < 1e-8, f
    control = torch.randn(found.space.dim, 1, generator=torch.Generator().manual_seed(1),
                          dtype=torch.float64)
    broken = discover.__globals__["Discovery"](1, control, torch.empty(0), 0, 0,
                                               found.candidates, found.rank, found.space)
    assert _outputs_change(model, broken, x) > 1e-3


def test_families_name_the_layers_and_the_updates_that_resolve_them():
    torch.manual_seed(0)
    model = _exact_bn(small_resnet())
    found = discover(model, torch.randn(64, 3, 16, 16))
    labels = {f.label: f for f in found.families}
    assert labels["per-filter scaling of layer1.0.conv1"].size == 8
    assert labels["per-filter scaling of layer1.0.conv1"].resolves == {"un": True, "sm": True}
    units = labels["units between layer1.0.bn1 and layer1.0.conv2"]
    assert units.size == 8 and units.resolves == {"un": False, "sm": False}
    stream = [f for f in found.families if f.kind == "stream"]
    assert [f.size for f in stream] == [8, 16]
    assert "layer1.0.bn2" in stream[0].label and "layer2.0.downsample.1" in stream[1].label
    data = found.to_dict()
    assert data["dim"] == found.dim and {f["label"] for f in data["families"]} == set(labels)
    json.dumps(data)
    printed = str(found)
    assert "per-filter scaling of conv1 (8): resolved by UN, resolved by SM" in printed

    t = pre_ln_transformer(vocab=11, d=8, heads=2, mlp=16, layers=1, context=5, out=4)
    found = discover(t, torch.randint(0, 11, (64, 5)))
    kinds = {f.kind: f for f in found.families}
    assert kinds["qk"].label == "Q/K dimensions of blocks.0.attn" and kinds["qk"].size == 8
    assert kinds["vo"].size == 8 and kinds["stream"].size == 1
    assert "units between blocks.0.fc1 and blocks.0.fc2 (16)" in str(found)


class _Cumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.l3(torch.relu(self.l2(torch.cumsum(torch.relu(self.l1(x)), -1))))


def test_unsupported_operations_are_named_and_only_undercount():
    torch.manual_seed(0)
    model, x = _Cumsum(), torch.randn(500, 4)
    found = discover(model, x)
    assert any("cumsum" in u for u in found.unsupported)
    assert "unsupported (treated as breaking scalings): " in str(found)
    # l2's ReLU units are still found; l1's, which pass through cumsum, are not (6 of them
    # are symmetries only if cumsum's scales were tied, which the dense count shows)
    with pytest.warns(UserWarning, match=r"the inputs give 8 directions, the structure of "
                                         r"the model 6: 2 more .*unsupported operations .*"
                                         r"cumsum"):
        assert discover(model, x, method="dense").dim == 8
    assert found.verified < 1e-10


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 2
        return self.l2(torch.relu(self.l1(x)))


def test_an_untraceable_model_falls_back_to_the_dense_method_loudly():
    x = torch.randn(100, 3)
    with pytest.warns(UserWarning, match="structural analysis unavailable"):
        found = discover(_Branchy(), x)
    assert found.method == "dense" and found.dim == 5
    assert any("torch.fx" in n for n in found.notes)
    with pytest.raises(ValueError, match="cannot be traced by torch.fx"):
        discover(_Branchy(), x, method="structural")
    with pytest.raises(ValueError, match="unknown method 'fast'"):
        discover(_Branchy(), x, method="fast")


def test_the_numerical_check_refuses_a_wrong_structure():
    model, x = residual_mlp(), torch.randn(50, 5)
    found = discover(model, x)
    found.basis = torch.randn(found.basis.shape, dtype=torch.float64).to_sparse()  # a wrong rule
    with pytest.raises(ValueError, match="changes the outputs by"):
        _verify(analysis_copy(model, torch.float64, True), found, (x.double(),))


def test_unseen_embedding_rows_are_counted_and_said():
    t = pre_ln_transformer(vocab=50, d=8, heads=2, mlp=16, layers=1, context=5, out=4)
    x = torch.randint(0, 10, (64, 5))  # rows 10 .. 49 never used
    found = discover(t, x)
    assert any("40 of 50 embedding rows are absent" in n for n in found.notes)
    unused = [f for f in found.families if f.kind == "unused"]
    assert sum(f.size for f in unused) == 40
    assert found.dim == _theory_transformer(8, 16, 1) + 40


def test_cli_discover(tmp_path, capsys):
    out = tmp_path / "found.json"
    assert main(["discover", "manifold_nets.experiments.zoo:small_resnet", "--shape", "3",
                 "16", "16", "--batch", "32", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "per-filter scaling of conv1 (8)" in printed
    assert json.loads(out.read_text())["method"] == "structural"
    assert main(["discover", "manifold_nets.experiments.zoo:pre_ln_transformer", "--shape",
                 "16", "--tokens", "100", "--batch", "8"]) == 0
    assert "Q/K dimensions of blocks.1.attn (32)" in capsys.readouterr().out
    assert main(["discover", "manifold_nets.experiments.zoo:nothing", "--shape", "3"]) == 1
    assert "has no attribute 'nothing'" in capsys.readouterr().err
    assert main(["discover", "no_such_module_xyz:f", "--shape", "3"]) == 1
    assert main(["discover", "manifold_nets.experiments.zoo", "--shape", "3"]) == 1
    assert "is not MODULE:NAME" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["discover", "manifold_nets.experiments.zoo:small_resnet"])
    assert exc.value.code == 2


# -- property tests with the toolkit users get (manifold_nets.testing) ---------------------
_TRANSFORMER = _exact_bn(pre_ln_transformer(vocab=11, d=8, heads=2, mlp=16, layers=1,
                                            context=5, out=4))
_TOKENS = torch.randint(0, 11, (32, 5), generator=torch.Generator().manual_seed(0))


@settings(max_examples=4, deadline=None)
@given(g=rescalings(_TRANSFORMER, _TOKENS))
def test_every_family_of_a_transformer_keeps_its_outputs(g):
    assert_loss_invariant(_TRANSFORMER, g, _TOKENS, lambda out: out.square().sum())


@settings(max_examples=3, deadline=None)
@given(g=rescalings(_TRANSFORMER, _TOKENS, families=["Q/K dimensions of blocks.0.attn"]))
def test_qk_rescalings_are_not_resolved_by_sm(g):
    """The packed in-projection is Euclidean under SM: its steps see the Q/K rescaling."""
    with pytest.raises(AssertionError, match="sm is not equivariant"):
        assert_update_equivariant(_TRANSFORMER, g, _TOKENS, lambda out: out.square().mean(),
                                  update="sm", steps=3, rtol=1e-9,
                                  optimizer=lambda p: InvariantSGD(p, lr=0.1))


def test_an_unknown_family_label_is_refused_with_the_labels():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    found = discover(net, torch.randn(64, 4))
    with pytest.raises(ValueError, match="no family is labelled 'nope'.*units between 0 and 2"):
        found.family_group(net, "nope")
    assert found.family_group(net, "units between 0 and 2").dim == 8


def test_a_resnet_with_more_than_four_stages_is_refused():
    from manifold_nets.experiments.zoo import ResNet

    with pytest.raises(ValueError, match="one to four stages, got 5"):
        ResNet((1,) * 5, (4, 4, 4, 4, 8))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(0, 25), n=st.integers(1, 35),
       density=st.floats(0.03, 0.5))
def test_the_sparse_null_space_is_the_null_space(seed, m, n, density):
    """Elimination of defined variables, then SVD of the rest: the same space as a dense
    SVD (dimension n - rank, A N = 0, independent columns), on relations with the small
    coefficients the rules write."""
    import numpy as np
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    A = sp.random(m, n, density=density, random_state=rng, format="csr",
                  data_rvs=lambda k: rng.choice([-2.0, -1.0, 1.0, 1.0, 0.5, 3.0], k))
    N = _null_space(A).toarray()
    dense = A.toarray()
    rank = np.linalg.matrix_rank(dense) if dense.any() else 0
    assert N.shape == (n, n - rank)
    assert np.abs(dense @ N).max(initial=0.0) < 1e-9
    assert np.linalg.matrix_rank(N) == n - rank


def test_the_sparse_null_space_solves_a_chain_of_products_without_a_dense_block(
        monkeypatch):
    """w_k = w_{k-1} + x_k for a chain of 3,000 products (as a gated MLP or attention
    writes them): every relation defines one variable, so nothing is left for the dense
    SVD, and the 3,001 solutions come from the free variables with the rest filled in."""
    import scipy.sparse as sp

    def no_svd(*args, **kwargs):
        raise AssertionError("a dense SVD was taken")

    k = 3000  # variables: w_0 .. w_k (0 .. k), x_1 .. x_k (k+1 .. 2k)
    rows = [i - 1 for i in range(1, k + 1) for _ in range(3)]
    cols = [v for i in range(1, k + 1) for v in (i, i - 1, k + i)]
    vals = [1.0, -1.0, -1.0] * k
    A = sp.csr_matrix((vals, (rows, cols)), shape=(k, 2 * k + 1))
    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    N = _null_space(A)
    assert N.shape == (2 * k + 1, k + 1)
    assert abs(A @ N).max() < 1e-12
    # a cycle (x = y, y = z, z = x + y) is not a chain: its core needs the SVD
    cycle = sp.csr_matrix([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])
    with pytest.raises(AssertionError, match="dense SVD"):
        _null_space(cycle)


def _kernel_models():
    """Weights with and without biases, a zero row, a grouped conv with one dead group, a
    normalisation with a dead channel, a tied weight."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        mlp[0].weight[2] = 0.0
    conv = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2, bias=False), nn.BatchNorm2d(4),
                         nn.Conv2d(4, 2, 1, bias=False))
    with torch.no_grad():
        conv[0].weight[2:] = 0.0
        conv[1].weight[1] = 0.0
        conv[1].bias[1] = 0.0
    tied = nn.Sequential(nn.Embedding(5, 3), nn.LayerNorm(3), nn.Linear(3, 5, bias=False))
    tied[2].weight = tied[0].weight
    return [mlp, conv, tied]


@pytest.mark.parametrize("model", _kernel_models(), ids=["mlp", "grouped-conv", "tied"])
def test_the_candidate_kernel_is_what_changes_no_parameter(model):
    """Its columns move no parameter, and its size is the candidates' rank deficiency in
    parameter space, measured on the dense map from log-scales to parameter tangents."""
    from manifold_nets.symmetry.groups import ScalingSpace
    from manifold_nets.symmetry.structure import _candidate_kernel

    space = ScalingSpace(model)
    params = dict(model.named_parameters())
    P = torch.stack([torch.cat([t.detach().reshape(-1) for t in space.tangent(e, params).values()])
                     for e in torch.eye(space.dim, dtype=torch.float32)], 1).double()
    Z = torch.tensor(_candidate_kernel(space, params).toarray())
    assert Z.shape[1] > 0  # every model here has a bias-free weight
    assert torch.linalg.matrix_rank(P) == space.dim - Z.shape[1]
    assert float((P @ Z).abs().max()) < 1e-6
    assert torch.linalg.matrix_rank(Z) == Z.shape[1]


def test_the_sparse_null_space_reads_a_repeated_entry_once_and_a_stored_zero_as_none():
    import numpy as np
    import scipy.sparse as sp

    # x0 + x0 - x1 = 0 written as two entries, and a stored zero for x2 in a second row
    A = sp.csr_matrix((np.array([1.0, 1.0, -1.0, 0.0, 1.0, -1.0]),
                       (np.array([0, 0, 0, 1, 1, 1]), np.array([0, 0, 1, 2, 1, 3]))),
                      shape=(2, 4))
    N = _null_space(A).toarray()
    dense = np.array([[2.0, -1.0, 0.0, 0.0], [0.0, 1.0, 0.0, -1.0]])
    assert N.shape == (4, 2) and np.abs(dense @ N).max() < 1e-12
    assert np.linalg.matrix_rank(N) == 2


def test_a_family_drops_only_what_it_adds_to_the_kernel_intersection():
    """A first direction within the tolerance of a kernel direction is dropped; a second
    that moves the intersection by nothing keeps its column (it was dropped too when the
    count came from the singular values of the remainder)."""
    import numpy as np
    import scipy.sparse as sp

    from manifold_nets.symmetry.structure import _drop_kernel

    n, s, x = 5, 1e-5, 4e-5
    Z = np.zeros((n, 2))
    Z[0, 0] = Z[1, 1] = 1.0
    w = np.sqrt(2e-9 - x * x)
    y = np.sqrt(1 - x * x - w * w)
    E = np.eye(n)
    a = np.sqrt(1 - s * s) * E[0] + s * E[2]
    b = x * (-s * E[0] + np.sqrt(1 - s * s) * E[2]) + y * E[1] + w * E[3]
    TQ, fams = _drop_kernel(sp.csc_matrix(np.stack([a, b], 1)), sp.csc_matrix(Z),
                            {0: [0], 1: [1]}, [0, 1])
    assert TQ.shape[1] == 1 and fams == {1: [0]}
    # the control: a direction far from the kernel is never dropped
    c = (E[2] + E[3]) / np.sqrt(2)
    TQ, fams = _drop_kernel(sp.csc_matrix(np.stack([a, c], 1)), sp.csc_matrix(Z),
                            {0: [0], 1: [1]}, [0, 1])
    assert fams == {1: [0]}


def test_discover_predicts_without_declaring_so_a_dead_filter_does_not_stop_it():
    """``resolves`` reads Table 1's manifolds without declaring the model: a zero filter,
    which ``declare(..., "un")`` refuses, no longer makes discover fail."""
    from torch import nn

    from manifold_nets import declare
    from manifold_nets.symmetry import discover

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight[1] = 0
    found = discover(net, torch.randn(64, 3))
    assert found.families and all(set(f.resolves) == {"un", "sm"} for f in found.families)
    with pytest.raises(ValueError, match="filter 1 has zero norm"):  # the control
        declare(net, "un")
