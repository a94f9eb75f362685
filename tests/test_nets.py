"""Arch1 / Arch2: shapes, the paper's initialisation, pooling, and bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from manifold_nets import Arch1, Arch2, NetConfig
from manifold_nets.nets import build_net, pair_max_pool

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@settings(max_examples=15, deadline=None)
@given(arch=st.sampled_from([Arch1, Arch2]), depth=st.integers(1, 4),
       half=st.integers(1, 6), in_features=st.integers(1, 9), classes=st.integers(1, 5))
def test_shapes_and_unit_norm_init(arch, depth, half, in_features, classes):
    width = 2 * half
    net = arch(depth=depth, width=width, in_features=in_features, num_classes=classes)
    assert len(net.layers) == depth and len(net.filters()) == depth
    shapes = [tuple(w.shape) for w in net.filters()]
    assert shapes == [(width, in_features)] + [(width, half)] * (depth - 1)
    assert tuple(net.theta.shape) == (classes, half)
    for w in net.filters() + [net.theta]:
        torch.testing.assert_close(w.detach().norm(dim=1), torch.ones(w.shape[0]))
    assert all(layer.linear.bias is None for layer in net.layers)
    assert net.classifier.bias is None
    assert all((layer.bn is not None) == (arch is Arch2) for layer in net.layers)
    assert net(torch.rand(3, in_features)).shape == (3, classes)


def test_named_filters_match_named_parameters():
    net = Arch2(depth=3, width=4, in_features=5, num_classes=2)
    params = dict(net.named_parameters())
    for name, w in net.named_filters():
        assert params[name] is w
    assert params["classifier.weight"] is net.theta


def test_forward_is_the_papers_formula():
    gen = torch.Generator().manual_seed(0)
    net = Arch1(depth=2, width=6, in_features=5, num_classes=3, generator=gen).double()
    x = torch.rand(4, 5, dtype=torch.float64)
    m = x
    for w in net.filters():
        r = torch.relu(m @ w.T)
        m = torch.maximum(r[:, 0::2], r[:, 1::2])
    torch.testing.assert_close(net(x), m @ net.theta.T)
    # images are flattened
    torch.testing.assert_close(net(x.view(4, 1, 5)), net(x))


def test_pair_max_pool():
    r = torch.tensor([[1.0, 3.0, -2.0, -5.0]])
    assert pair_max_pool(r).tolist() == [[3.0, -2.0]]


def test_generator_makes_init_reproducible():
    a = Arch2(depth=2, width=4, in_features=3, generator=torch.Generator().manual_seed(5))
    b = Arch2(depth=2, width=4, in_features=3, generator=torch.Generator().manual_seed(5))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_to_dtype_and_device(device, dtype):
    net = Arch2(depth=2, width=4, in_features=3, num_classes=2).to(device=device, dtype=dtype)
    out = net(torch.rand(5, 3, device=device, dtype=dtype))
    assert out.dtype == dtype and out.device.type == device


def test_build_net_from_config():
    cfg = NetConfig(arch=2, depth=1, width=4, in_features=3, num_classes=2, bn_eps=1e-30)
    net = build_net(cfg)
    assert isinstance(net, Arch2) and net.layers[0].bn.eps == 1e-30
    assert net.config == cfg and cfg.to_dict()["arch"] == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(width=7), r"width must be even .* width=7"),
    (dict(depth=0), r"depth must be a positive integer, got 0"),
    (dict(num_classes=0), r"num_classes must be a positive integer"),
])
def test_bad_config(kwargs, match):
    for arch in (Arch1, Arch2):
        with pytest.raises(ValueError, match=match):
            arch(**kwargs)


def test_bad_bn_eps():
    with pytest.raises(ValueError, match=r"bn_eps must be > 0"):
        Arch2(bn_eps=0.0)


def test_bad_arch():
    with pytest.raises(ValueError, match=r"arch must be 1 or 2, got 3"):
        NetConfig(arch=3)
