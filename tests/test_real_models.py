"""Models nobody here wrote: Hugging Face transformers built from small configs (random
weights, no download), tied embeddings, low precision, branches the inputs never run.

``declare(model, update, inputs=x)`` keeps the outputs on ``x`` (float64, 1e-6) on every
one of them, while the Table-1 declaration without inputs changes them (the control);
where the structural analysis cannot trace a model it says so and measures instead. The
predicted ``resolves`` of every family agrees with the measured equivariance.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from manifold_nets import Arch2, declare
from manifold_nets.convert import conv1d_to_linear
from manifold_nets.experiments import zoo
from manifold_nets.symmetry import Rescaling, discover
from manifold_nets.testing import assert_update_equivariant, rescalings


class Logits(nn.Module):
    """``model(x).logits``: how a Hugging Face model is handed to manifold-nets."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


def llama(tied: bool = False) -> nn.Module:
    # RoPE's base 10 (not 10,000) so that 8 positions turn every rotated pair by a
    # measurable angle: with the default, the slowest pairs turn by under 0.01 rad over 8
    # positions, and scaling a pair's two halves apart is nearly a symmetry of such
    # inputs (the dense count then exceeds the model's by those pairs)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=tied, use_cache=False, rms_norm_eps=1e-12, rope_theta=10.0))


def gpt2(convert: bool = True, init: float = 0.02) -> nn.Module:
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4,
                                       n_positions=32, bos_token_id=0, eos_token_id=0,
                                       use_cache=False, layer_norm_epsilon=1e-12,
                                       initializer_range=init))
    if convert:
        conv1d_to_linear(model)
    return model


def bert(init: float = 0.02) -> nn.Module:
    return BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, num_labels=3,
        layer_norm_eps=1e-12, initializer_range=init))


def vit(init: float = 0.02) -> nn.Module:
    return ViTForImageClassification(ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=4, intermediate_size=64, num_labels=3, layer_norm_eps=1e-12,
        initializer_range=init))


TOKENS = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
IMAGES = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0),
                     dtype=torch.float64)
HF = {"llama-gqa": (llama, TOKENS), "llama-tied": (lambda: llama(tied=True), TOKENS),
      "gpt2": (gpt2, TOKENS), "bert": (bert, TOKENS), "vit": (vit, IMAGES)}


def _outputs(model, x):
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        return model(x).reshape(-1)


def _change(model, x, fn) -> float:
    before = _outputs(model, x)
    fn(model)
    return float((_outputs(model, x) - before).norm() / before.norm())


class Untraceable(nn.Module):
    """A model behind Python control flow on its inputs' values, which neither torch.fx
    nor torch.export can trace: ``declare`` and ``discover`` must measure instead."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        if float(x.float().abs().sum()) < 0:  # never
            return -self.model(x)
        return self.model(x)


@pytest.mark.parametrize("update", ["un", "sm"])
@pytest.mark.parametrize("name", list(HF))
def test_declare_with_inputs_keeps_a_hugging_face_models_outputs(name, update):
    """On the graph torch.export gives (torch.fx cannot trace these models)."""
    make, x = HF[name]
    torch.manual_seed(0)
    model = Logits(make()).double()  # training mode: dropout on, as users build them
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the graph decides: nothing to warn
        change = _change(model, x, lambda m: declare(m, update, inputs=x))
    assert change <= 1e-6, (name, update, change)


@pytest.mark.parametrize("update", ["un", "sm"])
@pytest.mark.parametrize("name", ["llama-gqa", "bert", "vit"])
def test_where_no_graph_can_be_had_declare_measures_and_keeps_the_outputs(name, update):
    make, x = HF[name]
    torch.manual_seed(0)
    model = Untraceable(Logits(make())).double()
    with pytest.warns(UserWarning, match="unavailable") as record:
        change = _change(model, x, lambda m: declare(m, update, inputs=x))
    assert change <= 1e-6, (name, update, change)
    assert any("measured by forward passes" in str(w.message) for w in record)
    dec = model._manifold_nets_declaration
    for param, manifold in dec.items():  # every declared filter says how it was checked
        if dec.roles[param] == "filters" and type(manifold).__name__ != "Euclidean":
            assert "measured" in dec.reasons[param], (param, dec.reasons[param])


@pytest.mark.parametrize("name", ["llama-gqa", "bert", "vit"])
def test_the_table_1_declaration_changes_them(name):
    """The control: the same models declared without inputs (every filter normalised) do
    not compute what they computed, and the checks above would have failed."""
    make, x = HF[name]
    torch.manual_seed(0)
    model = Logits(make()).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        change = _change(model, x, lambda m: declare(m, "un"))
    assert change > 1e-2, (name, change)


def test_a_filter_whose_scaling_looks_harmless_at_initialisation_is_not_declared():
    """At random initialisation, attention is nearly uniform: scaling a query projection's
    rows changes the outputs about as little as moving them at random. The measured
    fallback compares the two and keeps such a filter Euclidean."""
    torch.manual_seed(0)
    model = Untraceable(Logits(bert())).double().eval()
    with pytest.warns(UserWarning, match="unavailable"):
        dec = declare(model, "un", inputs=TOKENS)
    query = "model.model.bert.encoder.layer.0.attention.self.query.weight"
    assert type(dec[query]).__name__ == "Euclidean"
    assert "moving them as far at random" in dec.reasons[query]


# --------------------------------------------------------------------------------------
# The exported graph: the symmetries of Hugging Face models, counted and verified.

def _random_direction_changes_outputs(model, x, found) -> float:
    """A random direction in the candidates' space, off the found symmetries, applied."""
    g = torch.Generator().manual_seed(5)
    v = torch.randn(found.space.dim, generator=g, dtype=torch.float64)
    if found.dim:
        q, _ = torch.linalg.qr(found.basis.to_dense())
        v = v - q @ (q.T @ v)
    element = Rescaling.from_log(found.space, 0.3 * v / v.abs().max())
    with torch.no_grad():
        before = model(x)
        after = element.apply(model)(x)
    return float((after - before).norm() / before.norm())


def _absent(x, padding: int | None = None) -> int:
    """Embedding rows of tokens absent from ``x``; the padding token's row is zero, so
    scaling it moves nothing and is no direction."""
    return 64 - len(torch.unique(x)) - int(padding is not None and padding not in x)


#: The counts derived by hand for one layer of width 32, 4 heads of 8 dimensions, an
#: MLP of 64 (a function of the inputs: rows of tokens and positions they never use).
DERIVED = {
    # the MLP's up/down units (64; the gate's SiLU pins its own), V/O per KV head
    # dimension (2 x 8; the query heads share them), Q/K per rotated pair of each KV head
    # (2 x 4: RoPE ties d and d + 4), each RMSNorm's weight against the projections that
    # read it (2 x 32), the final RMSNorm against the head (32), the residual stream's one
    # scale, and the rows of the tokens absent from the inputs
    "llama-gqa": lambda x: 64 + 16 + 8 + 2 * 32 + 32 + 1 + _absent(x),
    # tied: the head's columns are the embedding's, so the final RMSNorm is pinned, and so
    # are the absent tokens' rows (their logits)
    "llama-tied": lambda x: 64 + 16 + 8 + 2 * 32 + 1,
    # V/O and Q/K per head dimension (32 + 32; no RoPE), each LayerNorm against the
    # projections that read it (2 x 32), the residual stream (1), the unused positions'
    # rows (32 - 8); the head is tied, and GELU pins the MLP
    "gpt2": lambda x: 32 + 32 + 2 * 32 + 1 + (32 - x.shape[1]),
    # post-LN: V/O and Q/K (32 + 32), one scale of each residual sum before its LayerNorm
    # (the embeddings' sum and the two sub-blocks: 1 + 2), the last LayerNorm against the
    # pooler (32; its tanh pins the rest), unused positions (24), the unused token type
    # (1) and absent tokens
    "bert": lambda x: 32 + 32 + 3 + 32 + (32 - x.shape[1]) + 1 + _absent(x, padding=0),
    # pre-LN: V/O, Q/K, each LayerNorm against what reads it (3 x 32); the residual
    # stream's scale is not a candidate (the class token and the position embeddings
    # are added parameters of more than one dimension)
    "vit": lambda x: 32 + 32 + 3 * 32,
}


class Hidden(nn.Module):
    """``model(x).last_hidden_state``: an encoder's every output, not a classifier's few.
    BERT gets both token types (odd tokens type 1): with one type only, its embedding row
    is a constant added before a LayerNorm, and scaling the row's entries so that the
    change is the same in every feature is a symmetry (the LayerNorm subtracts it) that
    depends on the row's values, which the graph analysis does not see."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        if isinstance(self.model, BertModel):
            return self.model(x, token_type_ids=x % 2).last_hidden_state
        return self.model(x).last_hidden_state


def _encoders():
    """BERT's and ViT's encoders, whose outputs tell the dense count enough: a classifier
    reads three logits off one token. BERT at initializer range 0.5 (not 0.02, where its
    post-LN blocks add so little to the residual stream that the dense spectrum has no
    gap), on tokens other than its padding token: its embedding row is zero, and the
    dense method, which cannot tell a used zero row from an unused one, would count it.
    """
    g = torch.Generator().manual_seed(1)
    bert_encoder = BertModel(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, layer_norm_eps=1e-12,
        initializer_range=0.5), add_pooling_layer=False)
    vit_encoder = ViTModel(ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=4, intermediate_size=64, layer_norm_eps=1e-12),
        add_pooling_layer=False)
    return {"bert-encoder": (lambda: bert_encoder, torch.randint(1, 64, (16, 8), generator=g)),
            "vit-encoder": (lambda: vit_encoder, torch.randn(8, 3, 16, 16, generator=g,
                                                             dtype=torch.float64))}


# BERT's and ViT's encoders as above: no pooler or classifier, and the last LayerNorm is
# the output, so it is pinned; BERT uses both token types
DERIVED["bert-encoder"] = lambda x: 32 + 32 + 3 + (32 - x.shape[1]) + _absent(x, padding=0)
DERIVED["vit-encoder"] = lambda x: 32 + 32 + 2 * 32


@pytest.mark.parametrize("name", list(HF))
def test_hugging_face_models_are_analysed_on_their_exported_graph(name):
    """The structural count is the count derived by hand, verified, and a random
    direction off it changes the outputs (the control)."""
    make, x = HF[name]
    torch.manual_seed(0)
    model = Logits(make()).double().eval()
    found = discover(model, x, method="structural")  # verified: raises if a rule is wrong
    assert found.verified <= 1e-6  # the normalisations' eps (1e-12) against tiny activations
    assert found.dim == DERIVED[name](x), [str(f) for f in found.families]
    assert _random_direction_changes_outputs(model, x, found) > 1e-3  # the control
    if name.startswith("llama"):  # every RMSNorm's weight against the layers reading it
        norms = [n for n, m in model.named_modules() if type(m).__name__ == "LlamaRMSNorm"
                 and not (name == "llama-tied" and n == "model.model.norm")]
        labels = [f.label for f in found.families if f.kind == "units"]
        assert norms and all(any(label.startswith(f"units between {n} and ")
                                 for label in labels) for n in norms), labels


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-gqa", "llama-tied", "gpt2", "bert-encoder",
                                  "vit-encoder"])
def test_the_structural_count_of_hugging_face_models_is_the_dense_count(name):
    make, x = {**HF, **_encoders()}[name]
    torch.manual_seed(0)
    model = (Hidden if name.endswith("encoder") else Logits)(make()).double().eval()
    found = discover(model, x, method="structural")
    assert found.dim == DERIVED[name](x), [str(f) for f in found.families]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the two counts agree: no warning
        dense = discover(model, x, method="dense")
    assert dense.dim == found.dim and dense.gap > 1e3  # a clear gap in its spectrum


def test_gpt2s_conv1d_is_refused_until_converted_and_conversion_keeps_the_outputs():
    torch.manual_seed(0)
    model = Logits(gpt2(convert=False)).double().eval()
    for call in (lambda: discover(model, TOKENS), lambda: declare(model, "un"),
                 lambda: declare(model, "sm", inputs=TOKENS)):
        with pytest.raises(ValueError, match="conv1d_to_linear"):
            call()
    assert not hasattr(model, "_manifold_nets_declaration")  # nothing was changed
    declare(model, "bsgd")  # Euclidean: nothing to refuse
    names = []
    change = _change(model, TOKENS, lambda m: names.extend(conv1d_to_linear(m)))
    assert change <= 1e-12
    assert names == ["model.transformer.h.0.attn.c_attn", "model.transformer.h.0.attn.c_proj",
                     "model.transformer.h.0.mlp.c_fc", "model.transformer.h.0.mlp.c_proj"]
    fc = model.model.transformer.h[0].mlp.c_fc
    assert isinstance(fc, nn.Linear) and fc.weight.shape == (128, 32)
    assert conv1d_to_linear(model) == []  # nothing left to convert


class Branchy(nn.Module):
    """A conv-BN net that fx cannot trace (data-dependent control flow), with a branch
    that the inputs never run and a layer that no normalisation follows."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6, eps=1e-12)
        self.rare = nn.Sequential(nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6, eps=1e-12))
        self.plain = nn.Conv2d(6, 6, 1)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        if float(x.sum()) > 1e9:  # never, on these inputs
            h = self.rare(h)
        return self.head(torch.relu(self.plain(h)).mean((2, 3)))


def test_the_measured_fallback_declares_what_is_a_symmetry_and_names_the_rest():
    torch.manual_seed(0)
    model = Branchy().double()
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    with pytest.warns(UserWarning, match="unavailable"):
        change = _change(model, x, lambda m: declare(m, "un", inputs=x))
    assert change <= 1e-6
    dec = model._manifold_nets_declaration
    assert type(dec["conv.weight"]).__name__ == "ObliqueManifold"
    assert type(dec["plain.weight"]).__name__ == "Euclidean"  # the control
    assert "never run" in dec.reasons["rare.0.weight"]
    assert type(dec["rare.0.weight"]).__name__ == "Euclidean"


def test_a_branch_the_inputs_never_run_is_named_in_the_graph_analysis_too():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8))
            self.b = nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8))
            self.head = nn.Linear(8, 2)
            self.use_b = False

        def forward(self, x):
            return self.head(torch.relu(self.b(x) if self.use_b else self.a(x)))

    model = Gated().double()
    dec = declare(model, "un", inputs=torch.randn(16, 4, dtype=torch.float64))
    assert type(dec["a.0.weight"]).__name__ == "ObliqueManifold"
    assert "never run" in dec.reasons["b.0.weight"]


# --------------------------------------------------------------------------------------
# Tied weights: one tensor, one set of candidates.

def _tied_transformer():
    torch.manual_seed(0)
    model = zoo.pre_ln_transformer(vocab=20, d=16, heads=2, mlp=32, layers=1,
                                   context=8).double()
    model.head.weight = model.tok.weight
    return model


def test_tied_embeddings_structural_count_equals_the_dense_count():
    model = _tied_transformer()
    x = torch.randint(0, 20, (24, 8), generator=torch.Generator().manual_seed(1))
    structural = discover(model, x, method="structural").dim
    assert structural == discover(model, x, method="dense").dim == 97
    untied = zoo.pre_ln_transformer(vocab=20, d=16, heads=2, mlp=32, layers=1,
                                    context=8).double()
    assert discover(untied, x, method="structural").dim == 113  # the tie removes 16


def test_tied_embeddings_declare_with_inputs():
    model = _tied_transformer()
    x = torch.randint(0, 20, (8, 8), generator=torch.Generator().manual_seed(1))
    change = _change(model, x, lambda m: declare(m, "sm", inputs=x))
    assert change <= 1e-12
    assert "tied with" in model._manifold_nets_declaration.reasons["tok.weight"]


# --------------------------------------------------------------------------------------
# Low precision.

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_model_declares_un_with_its_dtypes_tolerance(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(),
                          nn.Linear(16, 3)).to(dtype)
    x = torch.randn(64, 12).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the change is within rounding
        dec = declare(model, "un", inputs=x)
    assert type(dec["0.weight"]).__name__ == "ObliqueManifold"
    assert dec.function_change <= 4 * torch.finfo(dtype).eps
    norms = model[0].weight.float().norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=4 * torch.finfo(dtype).eps)
    with pytest.raises(ValueError, match="unit norm"):  # the check still checks
        dec["0.weight"].assert_check_point_on_manifold(2 * model[0].weight.detach())


# --------------------------------------------------------------------------------------
# The predicted resolves agrees with the measurement, for every family.

def _models():
    torch.manual_seed(0)
    yield "linear-bn-biases", nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double(), \
        torch.randn(32, 6, dtype=torch.float64)
    yield "arch2", Arch2(depth=2, width=6, in_features=5, num_classes=3).double(), \
        torch.randn(32, 5, dtype=torch.float64)
    yield "small-resnet", zoo.small_resnet(num_classes=3).double(), \
        torch.randn(4, 3, 12, 12, dtype=torch.float64)
    yield "relu-mlp", nn.Sequential(nn.Linear(5, 8, bias=False), nn.ReLU(),
                                    nn.Linear(8, 3)).double(), \
        torch.randn(32, 5, dtype=torch.float64)


def _exact(models):
    """Normalisations with ``eps`` 1e-12, so that the float64 checks are tight (1e-9)."""
    for name, model, x in models:
        for m in model.modules():
            if hasattr(m, "eps") and isinstance(m.eps, float):
                m.eps = 1e-12
        yield name, model, x


def _measured(model, g, x, update) -> bool:
    def loss(out):
        return out.square().mean()
    try:
        assert_update_equivariant(model, g, x, loss, update=update, steps=2)
    except AssertionError:
        return False
    return True


@pytest.mark.parametrize("name, model, x", list(_exact(_models())), ids=lambda v: v
                         if isinstance(v, str) else "")
def test_every_familys_predicted_resolves_is_what_is_measured(name, model, x):
    found = discover(model, x)
    outcomes = set()
    for k, fam in enumerate(found.families):
        v = found.basis.to_dense()[:, fam.columns] @ torch.randn(
            len(fam.columns), generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        g = Rescaling.from_log(found.space, v / v.abs().max(), label=fam.label)
        for update in ("un", "sm"):
            measured = _measured(model, g, x, update)
            assert measured == fam.resolves[update], (name, str(fam), update)
            outcomes.add(measured)
    assert outcomes == {True, False}  # both answers occur: the comparison can fail


def _trained_biases(model: nn.Module) -> nn.Module:
    """Nonzero biases, as a trained model has (Hugging Face initialises them to zero)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.mark.parametrize("name, biases", [(name, "trained") for name in HF] +
                         [("gpt2", "initial")])
def test_every_hugging_face_familys_predicted_resolves_is_what_is_measured(name, biases):
    """Parameters that never reach the outputs are resolved by every update; Q/K scalings
    by UN where the projections' biases are zero or absent (the projection undoes a row
    scaling, and a scaled zero is zero), by SM only where there are none; the other
    families, which scale a filter's columns, a normalisation's weight or a nonzero bias,
    by neither Table-1 manifold. Prediction and measurement agree on every one."""
    make, x = HF[name]
    if name in ("gpt2", "bert", "vit"):
        # weights of a trained scale: at 0.02 attention is so nearly uniform that two
        # steps of SM barely move the query biases, and the measured gap stays below the
        # tolerance although the update is not equivariant (also with zero biases)
        make = {"gpt2": lambda: gpt2(init=0.3), "bert": lambda: bert(init=0.3),
                "vit": lambda: vit(init=0.3)}[name]
    torch.manual_seed(0)
    model = Logits(make()).double().eval()
    if biases == "trained":
        _trained_biases(model)
    found = discover(model, x)
    assert found.families
    unused = [f for f in found.families if f.kind == "unused"]
    assert all(f.resolves == {"un": True, "sm": True} for f in unused)
    resolved = {u: {f.kind for f in found.families if f.kind != "unused" and f.resolves[u]}
                for u in ("un", "sm")}
    # Q/K scalings move only the projections' rows: UN resolves them where the biases are
    # zero or absent (Llama has none, GPT-2's are zero at initialisation), SM only where
    # there are none (a zero bias's gradient is scaled, and SM steps it as Euclidean)
    qk = {"qk"} if name.startswith("llama") or biases == "initial" else set()
    assert resolved == {"un": qk, "sm": {"qk"} if name.startswith("llama") else set()}
    for k, fam in enumerate(found.families):
        v = found.basis.to_dense()[:, fam.columns] @ torch.randn(
            len(fam.columns), generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        g = Rescaling.from_log(found.space, v / v.abs().max(), label=fam.label)
        for update in ("un", "sm"):
            assert _measured(model, g, x, update) == fam.resolves[update], (str(fam), update)


def test_in_eval_mode_un_still_resolves_a_biased_filter_and_sm_does_not():
    """On running statistics the bias matters, but only less the running mean, which UN's
    projection moves with the filter (discover analyses training mode, so the family is
    taken from there and measured on the model in eval mode)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, eps=1e-12), nn.ReLU(),
                        nn.Linear(8, 3)).double()
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(32, 6, dtype=torch.float64)
    fam = next(f for f in discover(net.eval(), x).families if f.kind == "per-filter")
    assert fam.resolves == {"un": True, "sm": False}
    found = discover(net, x)
    v = found.basis.to_dense()[:, fam.columns] @ torch.randn(len(fam.columns), dtype=torch.float64)
    g = Rescaling.from_log(found.space, v / v.abs().max(), label=fam.label)
    assert _measured(net, g, x, "un") and not _measured(net, g, x, "sm")


def test_the_testing_toolkit_takes_the_most_ordinary_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(),
                          nn.Linear(8, 3)).double()
    x = torch.randn(32, 6, dtype=torch.float64)
    strategy = rescalings(model, x, update="sm")
    assert "per-filter scaling of 0" in [f.label for f in strategy.families]


# --------------------------------------------------------------------------------------
# Depthwise and grouped convolutions, functional pooling, RMSNorm: the structural count
# equals the dense one.

class FunctionalResNet(zoo.ResNet):
    """torchvision's ResNet layout with the pooling written functionally."""

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, channels-last layer norm, an inverted MLP, layer scale."""

    def __init__(self, d: int = 8, activation: type[nn.Module] = nn.GELU):
        super().__init__()
        self.dw = nn.Conv2d(d, d, 7, padding=3, groups=d)
        self.norm = nn.LayerNorm(d)
        self.pw1 = nn.Linear(d, 4 * d)
        self.act = activation()
        self.pw2 = nn.Linear(4 * d, d)
        self.gamma = nn.Parameter(0.1 * torch.ones(d))

    def forward(self, x):
        h = self.pw2(self.act(self.pw1(self.norm(self.dw(x).permute(0, 2, 3, 1)))))
        return x + (h * self.gamma).permute(0, 3, 1, 2)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, depthwise 3x3, 1x1 projection, batch norms,
    ReLU6, the residual."""

    def __init__(self, d: int = 8, t: int = 3):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(d, t * d, 1, bias=False),
                                    nn.BatchNorm2d(t * d), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(t * d, t * d, 3, padding=1, groups=t * d,
                                          bias=False), nn.BatchNorm2d(t * d), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(t * d, d, 1, bias=False), nn.BatchNorm2d(d))

    def forward(self, x):
        return x + self.project(self.dw(self.expand(x)))


class Stem(nn.Module):
    def __init__(self, block: nn.Module, d: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, d, 3, padding=1)
        self.block = block
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def _counts(model, x) -> tuple[int, int]:
    structural = discover(model, x, method="structural")
    assert not structural.unsupported, structural.unsupported
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dense = discover(model, x, method="dense")
    assert dense.gap > 1e2, dense.gap  # a clean count
    return structural.dim, dense.dim


def _images(n, size=8):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3),
                       dtype=torch.float64)


def test_functional_pooling_counts_as_the_modules_do():
    torch.manual_seed(0)
    functional = FunctionalResNet((1, 1), (8, 16), 3).double()
    modules = zoo.ResNet((1, 1), (8, 16), 3).double()
    modules.load_state_dict(functional.state_dict())
    x = _images(96, 16)
    assert _counts(functional, x) == (120, 120)
    assert discover(modules, x, method="structural").dim == 120


@pytest.mark.parametrize("groups, expected", [(2, 26), (8, 32)])
def test_grouped_convolutions(groups, expected):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=groups), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 3)).double()
    assert _counts(model, _images(256, 6)) == (expected, expected)


def test_a_convnext_block():
    """With ReLU, the dense method gives a clean count to compare with (the layer scale is
    a candidate: its channels against pw2's rows); with GELU (whose near-linear regime
    leaves the dense method without a gap) the 32 MLP units go, as derived."""
    torch.manual_seed(0)
    relu = Stem(ConvNeXtBlock(activation=nn.ReLU)).double()
    assert _counts(relu, _images(256)) == (58, 58)
    gelu = Stem(ConvNeXtBlock()).double()
    found = discover(gelu, _images(64), method="structural")
    assert found.dim == 58 - 32 and not found.unsupported


def test_a_mobilenet_v2_inverted_residual():
    """Batch-norm scales large enough that ReLU6 saturates on the data (where it does
    not, ReLU6 acts as a ReLU there and the dense method counts that data's symmetries)."""
    torch.manual_seed(0)
    model = Stem(InvertedResidual()).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(4.0, 8.0)
    assert _counts(model, _images(256)) == (64, 64)


def test_rms_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.RMSNorm(8), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 3)).double()
    x = torch.randn(128, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert _counts(model, x) == (17, 17)


class EncoderViT(nn.Module):
    """A ViT-like model on torch's own ``nn.TransformerEncoderLayer`` (pre-LN)."""

    def __init__(self, activation: str = "relu", d: int = 16):
        super().__init__()
        self.embed = nn.Linear(12, d)
        self.layers = nn.ModuleList([nn.TransformerEncoderLayer(
            d, 2, 32, dropout=0.0, activation=activation, batch_first=True,
            norm_first=True)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(1))


@pytest.mark.parametrize("activation, expected", [("relu", 4 * 16 + 32 + 16 + 1),
                                                  ("gelu", 4 * 16 + 16 + 1)])
def test_torchs_transformer_encoder_layer(activation, expected):
    """The derived count of the pre-LN transformer, L (4 d + d_mlp) + d + 1 (no MLP units
    with GELU), on torch's own layer, whose fused fast path is off while tracing."""
    torch.manual_seed(0)
    model = EncoderViT(activation).double()
    x = torch.randn(256, 5, 12, generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64)
    assert _counts(model, x) == (expected, expected)
    assert torch.backends.mha.get_fastpath_enabled()  # restored after tracing
