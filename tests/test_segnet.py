"""SegNet on MNIST canvases: shapes, max-unpooling, the data set, UN on conv filters, the
per-filter scaling symmetry (with its negative controls) and a smoke run."""

import os

import numpy as np
import pytest
import torch

from manifold_nets import declare
from manifold_nets.experiments.segmentation import (
    BACKGROUND,
    CanvasConfig,
    SegConfig,
    confusion_matrix,
    fit,
    load_mnist_digits,
    make_canvases,
    make_splits,
    segmentation_metrics,
    symmetry_report,
    train,
)
from manifold_nets.nets import SegNet, SegNetConfig

SMALL = dict(widths=(4, 8), convs_per_block=1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is faster, and much faster on a shared, loaded CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mirror_has_mnist() -> bool:
    root = os.environ.get("MANIFOLD_NETS_MIRROR")
    return bool(root) and os.path.exists(os.path.join(root, "mnist",
                                                      "t10k-images-idx3-ubyte.gz"))


@pytest.fixture(scope="module")
def digits():
    if not _mirror_has_mnist():
        pytest.skip("MNIST mirror not available (set MANIFOLD_NETS_MIRROR)")
    return load_mnist_digits()


def _fake_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        h, w = rng.integers(5, 20, size=2)
        r, c = rng.integers(0, 28 - h), rng.integers(0, 28 - w)
        x[i, r:r + h, c:c + w] = rng.integers(1, 256, size=(h, w))
    return x, rng.integers(0, 10, size=n)


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


# -- the data set ----------------------------------------------------------------------


def test_canvases_are_deterministic_and_labelled_by_ink():
    x, y = _fake_digits(50, 0)
    cfg = CanvasConfig(size=40, digits_per_canvas=2, ink_threshold=0.5)
    pool = np.arange(50)
    a = make_canvases(x, y, pool, 8, cfg, np.random.default_rng(3), "train")
    b = make_canvases(x, y, pool, 8, cfg, np.random.default_rng(3), "train")
    c = make_canvases(x, y, pool, 8, cfg, np.random.default_rng(4), "train")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    fg = a.labels != BACKGROUND
    assert bool((a.images[:, 0][fg] >= 128 / 255).all())
    assert bool((a.images[:, 0][~fg] < 128 / 255).all())
    # each canvas's digit classes are the classes of its pasted digits
    for i in range(8):
        used = a.digits[i][a.digits[i] >= 0]
        assert set(a.labels[i].unique().tolist()) - {BACKGROUND} <= set(y[used].tolist())


def test_splits_are_separate_and_deterministic(digits):
    cfg = CanvasConfig(size=32, digits_per_canvas=2, max_overlap=0.0, train=40, val=20,
                       test=20)
    s1, s2 = make_splits(cfg, digits), make_splits(cfg, digits)
    for k in ("train", "val", "test"):
        assert torch.equal(s1[k].images, s2[k].images)
        assert torch.equal(s1[k].labels, s2[k].labels)
    pools = s1["pools"]
    assert not set(pools["train"]) & set(pools["val"])
    assert len(pools["train"]) + len(pools["val"]) == 60000
    assert s1["train"].source == s1["val"].source == "train" and s1["test"].source == "test"
    for k in ("train", "val"):
        used = s1[k].digits[s1[k].digits >= 0]
        assert set(used.tolist()) <= set(pools[k].tolist())
    # no test digit in the training canvases: every training canvas is rebuilt exactly
    # from MNIST *training* digits alone
    tr = s1["train"]
    for i in range(5):
        used = tr.digits[i][tr.digits[i] >= 0]
        ink = (tr.images[i, 0] * 255).round().to(torch.uint8).numpy()
        total = sum(int(digits["train_x"][d].astype(np.int64).sum()) for d in used)
        assert int(ink.astype(np.int64).sum()) == total


# -- metrics ---------------------------------------------------------------------------


def test_metrics_on_a_known_confusion():
    pred = torch.tensor([0, 0, 1, 1, 1, 2])
    true = torch.tensor([0, 1, 1, 1, 2, 2])
    conf = confusion_matrix(pred, true, num_classes=4)
    m = segmentation_metrics(conf)
    assert m["global_acc"] == pytest.approx(4 / 6)
    assert m["class_avg_acc"] == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)  # class 3 absent
    assert m["mean_iou"] == pytest.approx((1 / 2 + 2 / 4 + 1 / 2) / 3)


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


def test_conv_scaling_symmetry_and_negative_controls():
    gen = torch.Generator().manual_seed(0)
    net = SegNet(**SMALL, bn_eps=1e-30, generator=gen)
    x = torch.rand(4, 1, 16, 16, generator=gen)
    y = torch.randint(0, 11, (4, 16, 16), generator=gen)
    rep = symmetry_report(net, x, y, lr=2.0)
    tol = 1e-9 * rep.loss
    assert rep.loss_gap < tol
    assert rep.grad_alignment < 1e-6
    assert rep.step_gap["sm"] < tol and rep.step_gap["un"] < tol
    # negative controls: Euclidean SGD is not invariant, negative factors change the loss
    assert rep.step_gap["bsgd"] > 1e4 * tol
    assert rep.negative_loss_gap > 1e4 * tol
    assert rep.holds()
    # the batch-norm eps breaks the invariance measurably (loosely held at eps=1e-5)
    eps = symmetry_report(SegNet(**SMALL, generator=torch.Generator().manual_seed(0)), x, y)
    assert 0 < eps.loss_gap < 1e-3 * eps.loss


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap, unpool
def test_discover_finds_exactly_the_per_filter_scalings():
    from manifold_nets.symmetry import discover

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


def test_one_epoch_smoke_train_on_a_tiny_slice():
    x, y = _fake_digits(60, 1)
    cfg = SegConfig(update="un", lr=0.1, epochs=1, batch_size=4,
                    net=SegNetConfig(**SMALL), data=CanvasConfig(size=32, digits_per_canvas=2))
    pool = np.arange(60)
    splits = {k: make_canvases(x, y, pool, n, cfg.data, np.random.default_rng(i), "train")
              for i, (k, n) in enumerate([("train", 16), ("val", 4), ("test", 4)])}
    record, model = train(cfg, splits, examples=2)
    assert not record["diverged"] and len(record["history"]) == 1
    assert np.isfinite(record["history"][0]["cost"])
    for k in ("global_acc", "class_avg_acc", "mean_iou"):
        assert 0.0 <= record["test"][k] <= 1.0
    assert np.asarray(record["examples"]).shape == (2, 32, 32)
    # same seed, same numbers
    again, _ = train(cfg, splits, examples=2)
    assert again["history"][0]["cost"] == record["history"][0]["cost"]
    # SM and B-SGD run too
    for update in ("sm", "bsgd"):
        m = SegNet(**SMALL)
        declare(m, update)
        h = fit(m, SegConfig(update=update, lr=0.01, epochs=1, batch_size=8,
                             net=cfg.net, data=cfg.data), splits["train"])
        assert np.isfinite(h[0]["cost"])


def test_a_report_without_its_negative_control_does_not_hold():
    from manifold_nets.experiments.segmentation import SymmetryReport

    ran = SymmetryReport(9.9, 7e-15, 0.05, 8e-14, {"bsgd": 0.18, "sm": 0.0, "un": 0.0})
    assert ran.holds()
    assert not SymmetryReport(9.9, 7e-15, 0.05, 8e-14, {"sm": 0.0, "un": 0.0}).holds()
