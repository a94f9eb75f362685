"""declare(): which parameter gets which manifold, and that RiemannianSGD then does Table 1."""

import warnings

import geoopt
import pytest
import torch
from torch import nn

from manifold_nets import (
    Arch1,
    Arch2,
    DiagScaledEuclidean,
    InvariantSGD,
    ObliqueManifold,
    declare,
)
from manifold_nets.declare import check_optimizer


def _step(net, x, y, lr):
    loss = nn.functional.cross_entropy(net(x), y, reduction="sum")
    loss.backward()
    geoopt.optim.RiemannianSGD(net.parameters(), lr=lr).step()


def _data(n=6, d=5, k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, k, (n,), generator=gen)


@pytest.mark.parametrize("update", ["bsgd", "sm", "un"])
def test_manifolds_per_update(update):
    net = Arch2(depth=2, width=4, in_features=5, num_classes=3)
    dec = declare(net, update)
    assert list(dec) == [n for n, _ in net.named_parameters()]
    filt = dec["layers.1.linear.weight"]
    theta = dec["classifier.weight"]
    if update == "sm":
        assert isinstance(filt, DiagScaledEuclidean) and filt.side == "left"
        assert isinstance(theta, DiagScaledEuclidean) and theta.side == "right"
    elif update == "un":
        assert isinstance(filt, ObliqueManifold)
        assert isinstance(theta, geoopt.Euclidean)
    else:
        assert isinstance(filt, geoopt.Euclidean) and isinstance(theta, geoopt.Euclidean)
    assert isinstance(dec["layers.0.bn.weight"], geoopt.Euclidean)
    assert dec.roles["classifier.weight"] == "classifier"
    for name, p in net.named_parameters():
        assert isinstance(p, geoopt.ManifoldParameter) == (
            not isinstance(dec[name], geoopt.Euclidean))
        if isinstance(p, geoopt.ManifoldParameter):
            assert p.manifold is dec[name]
    assert "update: " + update in str(dec)


def test_sm_step_is_table_1():
    net = Arch1(depth=2, width=4, in_features=5, num_classes=3).double()
    ref = Arch1(depth=2, width=4, in_features=5, num_classes=3).double()
    ref.load_state_dict(net.state_dict())
    x, y = _data()
    declare(net, "sm")
    _step(net, x, y, lr=0.1)
    nn.functional.cross_entropy(ref(x), y, reduction="sum").backward()
    with torch.no_grad():
        for w, w_ref in zip(net.filters(), ref.filters(), strict=True):
            expect = w_ref - 0.1 * w_ref.square().sum(1, keepdim=True) * w_ref.grad
            torch.testing.assert_close(w, expect)
        t = ref.theta
        expect = t - 0.1 * t.grad * t.square().sum(0, keepdim=True)
        torch.testing.assert_close(net.theta, expect)


def test_un_step_is_table_1():
    net = Arch1(depth=1, width=4, in_features=5, num_classes=3).double()
    ref = Arch1(depth=1, width=4, in_features=5, num_classes=3).double()
    ref.load_state_dict(net.state_dict())
    x, y = _data()
    declare(net, "un")
    _step(net, x, y, lr=0.1)
    nn.functional.cross_entropy(ref(x), y, reduction="sum").backward()
    with torch.no_grad():
        w, g = ref.filters()[0], ref.filters()[0].grad
        step = w - 0.1 * (g - (w * g).sum(1, keepdim=True) * w)
        torch.testing.assert_close(net.filters()[0], step / step.norm(dim=1, keepdim=True))
        torch.testing.assert_close(net.theta, ref.theta - 0.1 * ref.theta.grad)


def test_redeclare_bsgd_restores_plain_parameters():
    net = Arch1(depth=1, width=4, in_features=5, num_classes=3)
    declare(net, "un")
    before = [p.detach().clone() for p in net.parameters()]
    declare(net, "bsgd")
    for p, b in zip(net.parameters(), before, strict=True):
        assert type(p) is nn.Parameter and torch.equal(p, b)


def test_un_normalises_filters_of_any_model():
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    with pytest.warns(UserWarning, match=r"normalising the filters of 0\.weight changed "
                                         "them, and no batch norm is registered after them"):
        dec = declare(net, "un")
    torch.testing.assert_close(net[0].weight.detach().norm(dim=1), torch.ones(4))
    assert isinstance(dec["0.bias"], geoopt.Euclidean)
    assert dec.roles["2.weight"] == "classifier"


class SmallConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 1, bias=False)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn1(self.conv1(x))))


def test_conv_net_filters_and_conv_classifier():
    net = SmallConvNet()
    dec = declare(net, "sm")  # no Linear: the last conv is the classifier
    assert dec["conv1.weight"].ndim == 3 and dec["conv1.weight"].side == "left"
    assert dec["conv2.weight"].side == "right" and dec["conv2.weight"].ndim == 4
    dec = declare(net, "un", classifier="conv2")
    assert isinstance(dec["conv1.weight"], ObliqueManifold) and dec["conv1.weight"].ndim == 3
    torch.testing.assert_close(net.conv1.weight.detach().flatten(1).norm(dim=1), torch.ones(4))
    assert isinstance(dec["conv2.weight"], geoopt.Euclidean)


def test_named_classifier_and_explicit_manifolds():
    net = Arch1(depth=2, width=4, in_features=5, num_classes=3)
    dec = declare(net, "sm", classifier=net.layers[1].linear,
                  manifolds={"classifier.weight": None})
    assert dec["layers.1.linear.weight"].side == "right"
    assert isinstance(dec["classifier.weight"], geoopt.Euclidean)
    assert dec.roles["classifier.weight"] == "explicit"
    dec = declare(net, "bsgd", classifier="classifier.weight",
                  manifolds={"layers.0.linear.weight": ObliqueManifold()})
    assert isinstance(net.layers[0].linear.weight, geoopt.ManifoldParameter)


def test_shared_parameter_replaced_everywhere():
    lin = nn.Linear(3, 4, bias=False)
    net = nn.Sequential(lin, nn.ReLU(), lin.__class__(4, 4, bias=False), nn.ReLU())
    net.append(net[2])
    net.append(nn.Linear(4, 2, bias=False))
    with pytest.warns(UserWarning, match="no batch norm is registered after them"):
        declare(net, "un")
    assert net[2].weight is net[4].weight
    assert isinstance(net[4].weight, geoopt.ManifoldParameter)


def test_unknown_update():
    with pytest.raises(ValueError, match=r"unknown update 'adam'; choose one of bsgd, sm, un"):
        declare(Arch1(depth=1, width=2, in_features=2), "adam")


def test_classifier_not_2d():
    net = Arch2(depth=1, width=2, in_features=2)
    with pytest.raises(ValueError, match=r"classifier 'layers.0.bn' has a 1-D weight"):
        declare(net, "sm", classifier="layers.0.bn")


def test_classifier_not_in_model():
    net = Arch1(depth=1, width=2, in_features=2)
    with pytest.raises(ValueError, match=r"model has no module 'head'"):
        declare(net, "sm", classifier="head")
    with pytest.raises(ValueError, match=r"not part of `model`"):
        declare(net, "sm", classifier=nn.Linear(2, 2))


def test_unknown_explicit_name():
    with pytest.raises(ValueError, match=r"model has no parameter 'W1'"):
        declare(Arch1(depth=1, width=2, in_features=2), "sm", manifolds={"W1": None})


def test_zero_filter_under_un_names_parameter_and_filter():
    net = Arch1(depth=2, width=4, in_features=3)
    with torch.no_grad():
        net.layers[1].linear.weight[2].zero_()
    with pytest.raises(ValueError, match=r"`layers\.1\.linear\.weight` .*filter 2 has zero norm"):
        declare(net, "un")
    assert type(net.layers[0].linear.weight) is nn.Parameter  # nothing was replaced
    declare(net, "sm")  # SM accepts it (the filter stays frozen at zero)


def test_transposed_conv_refused():
    net = nn.Sequential(nn.ConvTranspose2d(2, 3, 2), nn.Conv2d(3, 1, 1))
    with pytest.raises(ValueError, match=r"'0' is a ConvTranspose2d"):
        declare(net, "un")
    declare(net, "bsgd")
    dec = declare(net, "un", manifolds={"0.weight": None})
    assert isinstance(dec["1.weight"], geoopt.Euclidean)  # the classifier


# -- declare never silently changes a model ----------------------------------------------


def test_un_with_inputs_keeps_the_function_of_a_residual_mlp():
    """Nothing normalises a residual MLP's filters: with inputs, UN leaves them Euclidean
    and says why; without inputs it warns (the control)."""
    from manifold_nets.experiments.zoo import residual_mlp

    torch.manual_seed(0)
    net, x = residual_mlp().double(), torch.randn(200, 5, dtype=torch.float64)
    before = net(x)
    dec = declare(net, "un", inputs=x)
    assert not any(isinstance(m, ObliqueManifold) for m in dec.values())
    assert "not a symmetry" in dec.reasons["blocks.0.0.weight"]
    assert dec.function_change < 1e-12 and torch.equal(net(x), before)
    assert "why" in str(dec) and "outputs changed by" in str(dec)
    with pytest.warns(UserWarning, match="no batch norm is registered after them"):
        declare(residual_mlp(), "un")


def _trained_resnet():
    from manifold_nets.experiments.zoo import small_resnet

    torch.manual_seed(0)
    net = small_resnet().double()
    for m in net.modules():  # exact invariance: batch norm's eps is the only deviation
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-12
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(5):  # running statistics away from their initial values
        x = torch.randn(16, 3, 16, 16, dtype=torch.float64) * 2 + 0.5
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), torch.randint(0, 10, (16,))).backward()
        opt.step()
    with torch.no_grad():  # filters far from unit norm
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(torch.rand(m.weight.shape[0], 1, 1, 1, dtype=torch.float64) * 3
                              + 0.2)
    return net


def test_un_on_a_resnet_keeps_train_and_eval_outputs():
    net = _trained_resnet()
    x = torch.randn(32, 3, 16, 16, dtype=torch.float64)
    eval_before = net.eval()(x)
    net.train()
    dec = declare(net, "un", inputs=x)
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    assert all(isinstance(dec[f"{c}.weight"], ObliqueManifold) for c in convs)
    assert dec.roles["fc.weight"] == "classifier"
    assert dec.function_change < 1e-9
    torch.testing.assert_close(net.eval()(x), eval_before, rtol=1e-9, atol=1e-9)
    # the control: normalising without rescaling the running statistics changes eval
    control = _trained_resnet().eval()
    with torch.no_grad():
        for m in control.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.div_(m.weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
    with torch.no_grad():
        assert float((control(x) - eval_before).norm() / eval_before.norm()) > 0.1


class _HeadFirst(nn.Module):
    """The head is registered before the body."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(6, 3)
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())

    def forward(self, x):
        return self.head(self.body(x))


def test_the_classifier_comes_from_the_graph():
    dec = declare(_HeadFirst(), "sm")
    assert dec.roles["head.weight"] == "classifier"
    assert dec.roles["body.0.weight"] == "filters"
    assert "output is the model's output" in dec.reasons["head.weight"]
    dec = declare(_HeadFirst(), "sm", classifier=None)  # no classifier at all
    assert dec.roles["head.weight"] == "filters"


def test_tied_weights_are_reported():
    from manifold_nets.experiments.zoo import pre_ln_transformer

    net = pre_ln_transformer(vocab=20, d=8, heads=2, mlp=16, layers=1, context=4)
    net.head.weight = net.tok.weight  # weight tying, as in GPT-2
    dec = declare(net, "sm")
    assert "head.weight" not in dec  # one tensor, one entry, under its first name
    assert dec.roles["tok.weight"] == "classifier"
    assert dec.reasons["tok.weight"].startswith("as head.weight: theta")
    assert "tied with tok.weight" in dec.reasons["tok.weight"]
    assert dec["tok.weight"].side == "right"


@pytest.mark.parametrize("make", [
    lambda params: InvariantSGD(params, lr=0.1, momentum=0.9),
    lambda params: geoopt.optim.RiemannianSGD(params, lr=0.1),
])
def test_an_optimiser_built_before_declare_keeps_working(make):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
                        nn.Linear(8, 3))
    opt = make(net.parameters())
    x = torch.randn(64, 5)
    declare(net, "un", inputs=x)
    check_optimizer(net, opt)  # the parameters are the same objects
    start = net[0].weight.detach().clone()
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), torch.randint(0, 3, (64,))).backward()
        opt.step()
    w = net[0].weight.detach()
    assert float((w - start).abs().max()) > 1e-3  # it trained
    torch.testing.assert_close(w.norm(dim=1), torch.ones(8))  # on the manifold


def test_check_optimizer_and_param_groups():
    net = Arch2(depth=1, width=4, in_features=3, num_classes=2)
    other = Arch2(depth=1, width=4, in_features=3, num_classes=2)
    dec = declare(net, "un")
    with pytest.raises(ValueError, match="does not hold 4 of the model's trainable"):
        check_optimizer(net, InvariantSGD(other.parameters(), lr=0.1))
    groups = dec.param_groups(net, weight_decay=1e-4)
    by_role = {g["role"]: g for g in groups}
    assert by_role["filters"]["weight_decay"] == 0.0
    assert by_role["classifier"]["weight_decay"] == 1e-4
    check_optimizer(net, InvariantSGD(groups, lr=0.1))


def test_an_override_that_changes_the_function_warns_with_the_change():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    x = torch.randn(50, 4)
    with pytest.warns(UserWarning, match=r"outputs on the given inputs changed by \d"):
        dec = declare(net, "un", inputs=x, manifolds={"0.weight": ObliqueManifold()})
    assert dec.function_change > 0.1 and dec.roles["0.weight"] == "explicit"


def test_sm_with_inputs_places_its_metrics_where_the_symmetries_act():
    """Left metric where symmetries scale the rows (ReLU units), right where they scale
    only the columns (the classifier), none where no symmetry acts (before a GELU)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 5), nn.ReLU(),
                        nn.Linear(5, 3))
    dec = declare(net, "sm", inputs=torch.randn(64, 4))
    assert isinstance(dec["0.weight"], geoopt.Euclidean)
    assert "no rescaling symmetry acts on it" in dec.reasons["0.weight"]
    assert dec["2.weight"].side == "left" and dec["4.weight"].side == "right"
    assert dec.roles["4.weight"] == "classifier"
    assert dec.function_change == 0.0
    dec = declare(net, "sm")  # without inputs: Table 1, the control
    assert dec["0.weight"].side == "left"


def test_the_layer_before_a_final_softmax_is_the_classifier():
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False),
                          nn.Softmax(dim=1))
    dec = declare(model, "sm")
    assert dec.roles["2.weight"] == "classifier"
    assert model[2].weight.manifold.side == "right"


def test_no_classifier_found_is_said_not_guessed():
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False),
                          nn.Sigmoid())
    with pytest.warns(UserWarning, match="no classifier found.*pass classifier="):
        dec = declare(model, "sm")
    assert dec.roles["2.weight"] == "filters"
    quiet = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False),
                          nn.Sigmoid())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        declare(quiet, "sm", classifier=None)   # said explicitly: no warning


def test_param_groups_put_no_decay_on_any_oblique_filter():
    from manifold_nets import ObliqueManifold

    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False))
    dec = declare(model, "bsgd", classifier=None,
                  manifolds={"2.weight": DiagScaledEuclidean(), "0.weight": ObliqueManifold()})
    groups = dec.param_groups(model, weight_decay=1e-3)
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(model[0].weight)] == 0.0        # explicit, oblique
    assert decay[id(model[2].weight)] == 1e-3       # explicit, not oblique
    assert {g["role"] for g in groups} == {"explicit"}
