"""The fused per-filter kernel equals the pure-torch reference step, and its absence is
said once and costs nothing but speed."""

from __future__ import annotations

import warnings

import pytest
import torch

from manifold_nets import InvariantSGD, declare
from manifold_nets import fused as kernel

from .test_optim import CONFIGS, TIGHT, UPDATES, _loss, _params, _targets

# UN on models without a normalisation after their filters, on purpose: these tests are
# about the optimiser, not about the model's function (tests/test_declare.py is)
pytestmark_un = pytest.mark.filterwarnings("ignore:declare.+normalising the filters")

with warnings.catch_warnings():  # conftest built it; a failed build has warned there
    warnings.simplefilter("ignore", RuntimeWarning)
    pytestmark = [pytestmark_un, pytest.mark.skipif(
        not kernel.available(), reason=f"the fused kernel is not available: {kernel.reason()}")]

IDS = ["plain", "wd", "mom", "mom-damp-wd", "nesterov", "nesterov-wd"]


def _run(update, fused, dtype=torch.float64, steps=25, maximize=False, **config):
    params = _params(update, dtype=dtype)
    opt = InvariantSGD(params.values(), lr=2e-3, foreach=False, fused=fused,
                       maximize=maximize, **config)
    targets = _targets(params)
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(params, targets)
        (-loss if maximize else loss).backward()
        opt.step()
    return params, opt


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("update", UPDATES)
def test_fused_equals_the_reference_step(update, config):
    """float64, 25 steps: UN (linear and conv filters), SM (left and right, linear and
    conv), Euclidean vectors; the iterates and momentum buffers agree to 1e-12."""
    a, opt_a = _run(update, False, **config)
    b, opt_b = _run(update, True, **config)
    for k in a:
        torch.testing.assert_close(b[k], a[k], **TIGHT, msg=k)
        if config.get("momentum"):
            torch.testing.assert_close(opt_b.state[b[k]]["momentum_buffer"],
                                       opt_a.state[a[k]]["momentum_buffer"], **TIGHT)


@pytest.mark.parametrize("update", UPDATES)
def test_fused_float32_and_maximize(update):
    a, _ = _run(update, False, dtype=torch.float32, maximize=True, momentum=0.9)
    b, _ = _run(update, True, dtype=torch.float32, maximize=True, momentum=0.9)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5, msg=k)


def test_fused_step_takes_the_kernel_path():
    """The control: the fused step is not the reference step in disguise (the sums run in
    another order, so the float32 iterates differ in their last bits), and an SM step is
    not a UN step."""
    a, _ = _run("un", False, dtype=torch.float32, steps=5, momentum=0.9)
    b, _ = _run("un", True, dtype=torch.float32, steps=5, momentum=0.9)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    c, _ = _run("sm", True, steps=5, momentum=0.9)
    assert not torch.allclose(c["w1"], b["w1"].double(), atol=1e-3)


def test_ineligible_parameters_take_the_reference_step():
    """A non-contiguous parameter and a per-run (1-D) rate go the pure-torch way."""
    w = torch.nn.Parameter(torch.randn(9, 6, dtype=torch.float64).t())  # not contiguous
    ref = torch.nn.Parameter(w.detach().clone())
    for p, fused in ((w, True), (ref, False)):
        p.grad = torch.ones_like(p)
        InvariantSGD([p], lr=0.1, momentum=0.9, fused=fused).step()
    torch.testing.assert_close(w, ref, atol=0, rtol=0)


def test_without_the_kernel_one_warning_and_the_reference_step(monkeypatch):
    monkeypatch.setattr(kernel, "_STATE", {"module": None, "reason": None, "tried": False})
    monkeypatch.setenv("MANIFOLD_NETS_FUSED", "0")
    with pytest.raises(RuntimeError, match=r"fused=True\): the fused kernel is not available "
                                           r"\(MANIFOLD_NETS_FUSED=0\)"):
        InvariantSGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, fused=True)
    a, _ = _run("sm", False, steps=3, momentum=0.9)
    b, _ = _run("sm", None, steps=3, momentum=0.9)  # falls back: the same arithmetic
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0)
    # a build that fails warns once, naming the cause, and falls back too
    monkeypatch.setattr(kernel, "_STATE", {"module": None, "reason": None, "tried": False})
    monkeypatch.delenv("MANIFOLD_NETS_FUSED")
    monkeypatch.setattr("torch.utils.cpp_extension.load", _failing_build)
    with pytest.warns(RuntimeWarning, match=r"not available \(the build failed: RuntimeError: "
                                            r"no space left\).*pure-torch step"):
        c, _ = _run("sm", None, steps=3, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        _run("sm", None, steps=1)
    for k in a:
        torch.testing.assert_close(c[k], a[k], atol=0, rtol=0)


@pytest.mark.parametrize("cause,match", [
    ("source", r"the kernel source .*missing\.cpp is missing from the installed package.*"
               r"Fix: reinstall manifold-nets"),
    ("compiler", r"no C\+\+ compiler: 'no-such-c\+\+' is not on PATH.*Fix: install one"),
])
def test_the_fallback_warning_names_the_real_cause(monkeypatch, cause, match):
    """A package without its kernel source, and a machine without a compiler, are told
    apart from a failed build, each with its own fix; the build is not attempted."""
    monkeypatch.setattr(kernel, "_STATE", {"module": None, "reason": None, "tried": False})
    monkeypatch.delenv("MANIFOLD_NETS_FUSED", raising=False)
    monkeypatch.setattr("torch.utils.cpp_extension.load", _failing_build)
    if cause == "source":
        monkeypatch.setattr(kernel, "_SOURCE", kernel._SOURCE.with_name("missing.cpp"))
    else:
        monkeypatch.setenv("CXX", "no-such-c++")
    with pytest.warns(RuntimeWarning, match=match):
        assert kernel.load() is None
    assert "build failed" not in kernel.reason()


def _failing_build(*args, **kwargs):
    raise RuntimeError("no space left")


class _ResBlock(torch.nn.Module):
    """A BasicBlock with a downsampling shortcut, biases everywhere."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.down = torch.nn.Conv2d(3, 8, 1, stride=2)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)) + self.down(x))
        return self.fc(h.mean(dim=(2, 3)))


class _PreLN(torch.nn.Module):
    """Token embedding, a pre-LN attention and MLP block, a final LayerNorm and a head."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(30, 16)
        self.ln1 = torch.nn.LayerNorm(16)
        self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)
        self.ln2 = torch.nn.LayerNorm(16)
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 16)
        self.ln3 = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 30)

    def forward(self, t):
        h = self.emb(t)
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.down(torch.relu(self.up(self.ln2(h))))
        return self.head(self.ln3(h))


@pytest.mark.parametrize("update", ["un", "sm"])
@pytest.mark.parametrize("make,inputs", [
    (_ResBlock, lambda g: torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64)),
    (_PreLN, lambda g: torch.randint(0, 30, (4, 6), generator=g)),
], ids=["resnet-block", "pre-ln-transformer"])
def test_fused_on_models_written_elsewhere(make, inputs, update):
    """Models the paper does not have: the fused step follows the reference step (float64,
    momentum and weight decay) on every parameter, declared or not."""
    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = make().double()
        declare(model, update)
        opt = InvariantSGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-4,
                           foreach=False, fused=fused)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            x = inputs(g)
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        runs.append(dict(model.named_parameters()))
    for name, p in runs[0].items():
        torch.testing.assert_close(runs[1][name], p, **TIGHT, msg=name)
