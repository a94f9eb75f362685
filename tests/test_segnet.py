"""SegNet, the network: shapes, max-unpooling, UN on conv filters, the per-filter scaling
symmetry (with its negative controls), and the segmentation metrics."""

import pytest
import torch

from manifold_nets import declare
from manifold_nets.experiments.metrics import confusion_matrix, segmentation_metrics
from manifold_nets.nets import SegNet, SegNetConfig
from manifold_nets.symmetry import Rescaling, RescalingGroup, discover
from manifold_nets.testing import assert_loss_invariant, assert_update_equivariant

SMALL = dict(widths=(4, 8), convs_per_block=1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is faster, and much faster on a shared, loaded CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the network -----------------------------------------------------------------------


@pytest.mark.parametrize("widths,convs", [((4,), 1), ((4, 8), 2), ((3, 5, 6), 1)])
def test_shapes_and_unit_norm_init(widths, convs):
    net = SegNet(widths, convs, num_classes=11)
    n_pool = 2 ** len(widths)
    out = net(torch.rand(2, 1, 3 * n_pool, 2 * n_pool))
    assert out.shape == (2, 11, 3 * n_pool, 2 * n_pool)
    assert len(net.filters()) == 2 * convs * len(widths)
    assert tuple(net.theta.shape) == (11, widths[0], 1, 1)
    for w in net.filters() + [net.theta]:
        torch.testing.assert_close(w.detach().flatten(1).norm(dim=1), torch.ones(w.shape[0]))
    params = dict(net.named_parameters())
    assert all(params[n] is w for n, w in net.named_filters())
    assert all(m.conv.bias is None for m in net.conv_layers()) and net.classifier.bias is None


def test_bad_input_size_is_named():
    with pytest.raises(ValueError, match="at least 4"):
        SegNet(widths=(4, 4))(torch.rand(1, 1, 10, 3))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        SegNet(widths=(4, 4))(torch.rand(1, 10, 8))
    # a side that pooling halves with a remainder comes back at its size
    assert SegNet(widths=(4, 4))(torch.rand(1, 1, 10, 7)).shape == (1, 11, 10, 7)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        SegNetConfig(kernel_size=2)


def test_max_unpool_puts_values_back_where_they_were_pooled():
    net = SegNet(widths=(2,), convs_per_block=1)
    x = torch.randn(3, 2, 6, 8)
    pooled, idx = net.pool(x)
    up = net.unpool(pooled, idx, output_size=x.shape)
    # every pooled maximum is at its arg-max position, zeros elsewhere
    blocks = x.unfold(2, 2, 2).unfold(3, 2, 2).reshape(3, 2, 3, 4, 4)
    ublocks = up.unfold(2, 2, 2).unfold(3, 2, 2).reshape(3, 2, 3, 4, 4)
    arg = blocks.argmax(-1, keepdim=True)
    torch.testing.assert_close(ublocks.gather(-1, arg), blocks.gather(-1, arg))
    assert int((ublocks != 0).sum(-1).max()) == 1
    torch.testing.assert_close(up.sum(), pooled.sum())


def test_decoder_uses_the_encoder_indices():
    torch.manual_seed(0)
    net = SegNet(widths=(3, 4), convs_per_block=1).eval()
    seen = []
    net.unpool.register_forward_hook(lambda m, a, out: seen.append((a[1].clone(), out)))
    idx = []
    net.pool.register_forward_hook(lambda m, a, out: idx.append(out[1].clone()))
    net(torch.rand(2, 1, 8, 8))
    assert [i.shape for i, _ in seen] == [idx[1].shape, idx[0].shape]
    assert torch.equal(seen[0][0], idx[1]) and torch.equal(seen[1][0], idx[0])


# -- metrics ---------------------------------------------------------------------------


def test_metrics_on_a_known_confusion():
    pred = torch.tensor([0, 0, 1, 1, 1, 2])
    true = torch.tensor([0, 1, 1, 1, 2, 2])
    conf = confusion_matrix(pred, true, num_classes=4)
    m = segmentation_metrics(conf)
    assert m["global_acc"] == pytest.approx(4 / 6)
    assert m["class_avg_acc"] == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)  # class 3 absent
    assert m["mean_iou"] == pytest.approx((1 / 2 + 2 / 4 + 1 / 2) / 3)
    assert m["per_class_iou"] == pytest.approx([1 / 2, 2 / 4, 1 / 2, None])


def test_metrics_refuse_what_they_cannot_score():
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="outside 0 .. 1"):
        confusion_matrix(torch.tensor([0, 2]), torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="no pixel"):
        segmentation_metrics(torch.zeros(3, 3, dtype=torch.long))


# -- UN on conv filters and the symmetry -----------------------------------------------


def test_un_steps_keep_every_conv_filter_unit_norm():
    import geoopt

    torch.manual_seed(0)
    net = SegNet(**SMALL)
    decl = declare(net, "un")
    assert decl.roles["classifier.weight"] == "classifier"
    assert isinstance(decl["classifier.weight"], geoopt.Euclidean)
    opt = geoopt.optim.RiemannianSGD(net.parameters(), lr=0.5, momentum=0.9)
    x, y = torch.rand(4, 1, 16, 16), torch.randint(0, 11, (4, 16, 16))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    for name, w in net.named_filters():
        assert w.manifold.ndim == 3, name
        torch.testing.assert_close(w.detach().flatten(1).norm(dim=1), torch.ones(w.shape[0]),
                                   atol=1e-6, rtol=0)


def _per_filter_group(net, x):
    """The per-filter scalings that discover finds (one per conv that feeds a batch
    norm), as one group."""
    found = discover(net, x)
    columns = [c for f in found.families if f.kind == "per-filter" for c in f.columns]
    assert sum(w.shape[0] for w in net.filters()) == len(columns)
    basis = found.basis.index_select(1, torch.tensor(columns))
    return RescalingGroup(net, basis, "per-filter", space=found.space)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap, unpool
@pytest.mark.parametrize("config", [
    SegNetConfig(widths=(4, 8), convs_per_block=1, bn_eps=1e-30),
    SegNetConfig((3,) * 4, 1, 3, 11, 3, bn_eps=1e-30, decoder_relu=False, input_lrn=True),
], ids=["small", "segnet-basic"])
def test_conv_scaling_symmetry_and_negative_controls(config):
    """Per-filter scalings keep the loss, and SM's and UN's steps; B-SGD's steps and
    negative factors are the negative controls, failing the same assertions."""
    gen = torch.Generator().manual_seed(0)
    net = SegNet.from_config(config, generator=gen)
    scale = 255.0 if config.input_lrn else 1.0  # SegNet-Basic normalises raw pixels
    x = torch.rand(2, config.in_channels, 16, 16, generator=gen) * scale
    y = torch.randint(0, 11, (2, 16, 16), generator=gen)

    def loss(out):
        return torch.nn.functional.cross_entropy(out, y)

    g = _per_filter_group(net, x).sample(0.7, torch.Generator().manual_seed(1))
    assert_loss_invariant(net, g, x, loss)
    for update in ("sm", "un"):
        assert_update_equivariant(net, g, x, loss, update=update, steps=2)
    with pytest.raises(AssertionError):
        assert_update_equivariant(net, g, x, loss, update="bsgd", steps=2)
    negative = Rescaling(g.space, {n: (-a, c) for n, (a, c) in g.scales.items()},
                         allow_negative=True)
    with pytest.raises(AssertionError):
        assert_loss_invariant(net, negative, x, loss)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap, unpool
def test_discover_finds_exactly_the_per_filter_scalings():
    gen = torch.Generator().manual_seed(0)
    net = SegNet(widths=(3, 4), convs_per_block=1, bn_eps=1e-30, generator=gen)
    x = torch.rand(6, 1, 8, 8, generator=gen)
    found = discover(net, x)
    # one symmetry per filter of every conv followed by batch norm, none for theta; the
    # rest are batch-norm channels against the next conv (through ReLU and pooling)
    per_filter = [f for f in found.families if f.kind == "per-filter"]
    assert sum(f.size for f in per_filter) == sum(w.shape[0] for w in net.filters()) == 13
    assert all(f.resolves == {"un": True, "sm": True} for f in per_filter)
    assert not any(f.resolves["un"] for f in found.families if f.kind != "per-filter")
    assert found.dim == discover(net, x, method="dense").dim
