"""declare(): which parameter gets which manifold, and that RiemannianSGD then does Table 1."""

import geoopt
import pytest
import torch
from torch import nn

from manifold_nets import Arch1, Arch2, DiagScaledEuclidean, ObliqueManifold, declare


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
