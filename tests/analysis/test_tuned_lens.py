"""The tuned lens: untrained it is exactly the logit lens; a short fit on a harvest lowers the
held-out KL to the model's output; the last layer stays the model's output; fits are seeded;
files round-trip and refuse other shapes; logit_lens(lens=...) reads through the translators."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch
from safetensors.torch import save_file
from support import TINY, make_model

from interp.data import Corpus, harvest, stdlib_docstrings
from interp.lens import logit_lens
from interp.model import Gemma3Config
from interp.tuned_lens import LensKL, TunedLens, TunedLensError, _aligned_batches

PROMPT = "The cat sat on the mat."
L = TINY.n_layers


class CharTokenizer:
    """One token per character: id ``3 + (ord(c) - 32) % 90`` (BOS 2, padding 0)."""

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([2] if bos else []) + [3 + (ord(c) - 32) % 90 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(32 + (int(i) - 3)) if i >= 3 else "" for i in ids)

    def to_str_tokens(self, ids) -> list[str]:
        return [self.decode([i]) for i in ids]


@pytest.fixture(scope="module")
def model():
    m = make_model(TINY, seed=0, tokenizer=CharTokenizer())
    yield m
    assert not m.registry.active


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return stdlib_docstrings(max_docs=120)


@pytest.fixture(scope="module")
def store(model, docs, tmp_path_factory):
    return harvest(model, Corpus(docs[:80]), "blocks.*.resid_post", tmp_path_factory.mktemp("tl") / "train",
                   context=64, max_tokens=8192, dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def tuned(model, store) -> TunedLens:
    return TunedLens.fit(model, store, steps=120, lr=3e-3, batch_size=256, seed=0, progress=False)


def assert_same_lens(a, b):
    assert torch.equal(a.top_ids, b.top_ids) and torch.equal(a.top_probs, b.top_probs)
    assert torch.equal(a.target_probs, b.target_probs) and torch.equal(a.target_ranks, b.target_ranks)


# ---------------------------------------------------------------------- identity
def test_untrained_lens_is_exactly_the_logit_lens(model):
    lens = TunedLens.identity(model)
    assert (lens.n_layers, lens.d_model) == (L, TINY.d_model)
    targets = list(range(3, 40))
    assert_same_lens(logit_lens(model, PROMPT, targets=targets, lens=lens), logit_lens(model, PROMPT, targets=targets))
    resid = torch.randn(L + 1, 2, 3, TINY.d_model).to(torch.bfloat16)
    out = lens.translate(resid)
    assert out.dtype == torch.bfloat16 and torch.equal(out, resid)


def test_translate_maps_each_stage_through_its_translator(model):
    gen = torch.Generator().manual_seed(0)
    lens = TunedLens.identity(model)
    with torch.no_grad():
        lens.weight.copy_(torch.randn(lens.weight.shape, generator=gen) * 0.1)
        lens.bias.copy_(torch.randn(lens.bias.shape, generator=gen))
    resid = torch.randn(L + 1, 1, 4, TINY.d_model, generator=gen)
    out = lens.translate(resid)
    assert torch.equal(out[0], resid[0])  # the embedding is read as it is
    for i in range(L):
        h = resid[i + 1]
        torch.testing.assert_close(out[i + 1], h + h @ lens.weight[i].T + lens.bias[i])
        torch.testing.assert_close(lens.translate_layer(h, i), out[i + 1])
    with pytest.raises(TunedLensError, match=r"takes the residual after every stage, \[7, \.\.\., 32\]"):
        lens.translate(resid[1:])
    with pytest.raises(IndexError, match="layer 6 is outside the lens's 6 layers"):
        lens.translate_layer(resid[0], 6)


# ---------------------------------------------------------------------- fitting
def test_fit_lowers_the_held_out_kl(model, tuned, docs):
    assert len(tuned.history) == 120 and tuned.history[-1] < tuned.history[0]
    result = tuned.kl_per_layer(model, docs[100:110], max_tokens=3000)
    assert isinstance(result, LensKL) and result.n_tokens == 3000
    assert result.labels == ["L0", "L1", "L2", "L3", "L4", "L5 (global)"]
    better = (result.tuned[:-1] < result.logit[:-1]).sum()
    assert int(better) >= L - 2  # most layers
    assert float(result.tuned.mean()) < 0.8 * float(result.logit.mean())  # and on average
    assert float(result.tuned[-1]) == 0.0 and float(result.logit[-1]) == 0.0  # the last layer is the output
    fig = result.plot()
    assert isinstance(fig, go.Figure) and [t.name for t in fig.data] == ["tuned lens", "logit lens"]
    assert fig.layout.yaxis.type == "log"
    assert [row[0] for row in result.table()] == result.labels
    assert "mean KL tuned" in repr(result)


def test_last_translator_stays_zero_and_last_row_is_the_output(model, tuned):
    assert torch.equal(tuned.weight[-1], torch.zeros(TINY.d_model, TINY.d_model))
    assert torch.equal(tuned.bias[-1], torch.zeros(TINY.d_model))
    assert bool(tuned.weight[:-1].abs().sum() > 0) and bool(tuned.bias[:-1].abs().sum() > 0)
    targets = list(range(3, 40))
    plain = logit_lens(model, PROMPT, targets=targets)
    through = logit_lens(model, PROMPT, targets=targets, lens=tuned)
    assert torch.equal(through.top_ids[-1], plain.top_ids[-1])
    assert torch.equal(through.top_probs[-1], plain.top_probs[-1])
    assert torch.equal(through.top_ids[0], plain.top_ids[0])  # the embedding row too
    assert not torch.equal(through.target_probs[1:-1], plain.target_probs[1:-1])
    # every other row is the translated residual through the final norm and unembedding
    _, cache = model.run_with_cache(PROMPT, names="blocks.*.resid_post")
    for i in range(L):
        with torch.no_grad():
            probs = model.unembed(tuned.translate_layer(cache[f"blocks.{i}.resid_post"], i))[0].softmax(-1)
        torch.testing.assert_close(through.target_probs[i + 1], probs[:, targets], atol=1e-6, rtol=1e-5)


def test_fit_is_deterministic_with_a_seed(model, store):
    a = TunedLens.fit(model, store, steps=15, seed=3, progress=False)
    b = TunedLens.fit(model, store, steps=15, seed=3, progress=False)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and a.history == b.history
    c = TunedLens.fit(model, store, steps=15, seed=4, progress=False)
    assert not torch.equal(a.weight, c.weight)


def test_fit_reads_the_store_again_when_it_runs_out(model, store):
    steps_per_pass = -(-store.manifest["n_tokens"] // 4096)  # 2 batches of 4096 tokens
    lens = TunedLens.fit(model, store, steps=steps_per_pass * 2 + 1, batch_size=4096, progress=False)
    assert len(lens.history) == steps_per_pass * 2 + 1


def test_aligned_batches_hold_the_same_tokens(model, tmp_path):
    """The fit zips one shuffled stream per layer: they must yield the same tokens in step
    (blocks.0.resid_post and blocks.1.resid_pre are the same tensor)."""
    s = harvest(model, Corpus(["one document of text " * 30, "and another one, different " * 20]),
                ["blocks.0.resid_post", "blocks.1.resid_pre"], tmp_path / "h", context=32, dtype=torch.float32,
                progress=False, shard_tokens=64)
    assert len(s.manifest["shards"]) > 2
    n = 0
    for a, b in _aligned_batches(s, ["blocks.0.resid_post", "blocks.1.resid_pre"], 40, 7, "cpu", forever=False):
        assert torch.equal(a, b)
        n += a.shape[0]
    assert n == s.manifest["n_tokens"]


def test_kl_per_layer_on_a_store_matches_a_hand_computation(model, store):
    lens = TunedLens.identity(model)
    result = lens.kl_per_layer(model, store, batch_size=1000)
    assert result.n_tokens == store.manifest["n_tokens"]
    torch.testing.assert_close(result.tuned, result.logit)  # an untrained lens
    valid = store.valid()
    final = store[f"blocks.{L - 1}.resid_post"][:][valid]
    with torch.no_grad():
        target = model.unembed(final).log_softmax(-1)
        for layer in (0, 3):
            h = store[f"blocks.{layer}.resid_post"][:][valid]
            kl = (target.exp() * (target - model.unembed(h).log_softmax(-1))).sum(-1).mean()
            assert float(result.logit[layer]) == pytest.approx(float(kl), rel=1e-4)


# ---------------------------------------------------------------------- files
def test_save_load_round_trip(model, tuned, tmp_path):
    path = tmp_path / "lens.safetensors"
    tuned.save(path)
    loaded = TunedLens.load(path, model)
    assert torch.equal(loaded.weight, tuned.weight) and torch.equal(loaded.bias, tuned.bias)
    assert loaded.config == model.cfg.to_dict() and loaded.site_kind == "resid_post"
    targets = list(range(3, 40))
    assert_same_lens(logit_lens(model, PROMPT, targets=targets, lens=loaded),
                     logit_lens(model, PROMPT, targets=targets, lens=tuned))
    assert torch.equal(TunedLens.load(path).weight, tuned.weight)  # without a model: no checks


def test_load_refuses_other_shapes_and_other_files(model, tuned, tmp_path):
    path = tmp_path / "lens.safetensors"
    tuned.save(path)
    small = make_model(Gemma3Config(n_layers=2, d_model=16, d_mlp=32, n_heads=2, n_kv_heads=1, d_head=8,
                                    vocab_size=TINY.vocab_size))
    with pytest.raises(TunedLensError, match="this tuned lens has 6 layers of width 32, but the model has 2 layers "
                                             "of width 16"):
        TunedLens.load(path, small)
    base = small(torch.tensor([[2, 5, 7]]))
    with pytest.raises(TunedLensError, match="6 layers of width 32, but the model has 2"):
        logit_lens(small, torch.tensor([[2, 5, 7]]), lens=tuned)
    assert not small.registry.active and torch.equal(small(torch.tensor([[2, 5, 7]])), base)

    other = make_model(Gemma3Config(**dict(TINY.to_dict(), vocab_size=120)))
    with pytest.warns(UserWarning, match=r"configuration differs in \['vocab_size'\]"):
        TunedLens.load(path, other)

    plain = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(plain))
    with pytest.raises(TunedLensError, match="plain.safetensors is not a tuned lens file"):
        TunedLens.load(plain)
    lying = tmp_path / "lying.safetensors"
    save_file({"weight": torch.zeros(6, 32, 32), "bias": torch.zeros(6, 32)}, str(lying),
              metadata={"kind": "TunedLens", "n_layers": "5", "d_model": "32"})
    with pytest.raises(TunedLensError, match=r"do not match the 5 layers of width 32 its metadata names"):
        TunedLens.load(lying)
    extra = tmp_path / "extra.safetensors"
    save_file({"weight": torch.zeros(6, 32, 32), "bias": torch.zeros(6, 32), "x": torch.zeros(1)}, str(extra),
              metadata={"kind": "TunedLens", "n_layers": "6", "d_model": "32"})
    with pytest.raises(TunedLensError, match=r"holds tensors \['bias', 'weight', 'x'\]"):
        TunedLens.load(extra)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(TunedLensError, match="is not a readable safetensors file"):
        TunedLens.load(truncated)
    with pytest.raises(TunedLensError, match="is not a readable safetensors file"):
        TunedLens.load(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------- errors
def test_fit_errors(model, tmp_path):
    base = model(PROMPT)
    partial = harvest(model, Corpus(["some text to read " * 10]), "blocks.{0,1}.resid_post", tmp_path / "p",
                      context=32, dtype=torch.float32, progress=False)
    with pytest.raises(TunedLensError, match=r"the store lacks \['blocks.2.resid_post', 'blocks.3.resid_post', "
                                             r"'blocks.4.resid_post'\]\.\.\.: a tuned lens needs every layer"):
        TunedLens.fit(model, partial, steps=1, progress=False)
    with pytest.raises(TunedLensError, match="fitted on an ActivationStore, got dict"):
        TunedLens.fit(model, {}, steps=1, progress=False)
    with pytest.raises(TunedLensError, match="steps must be a positive int"):
        TunedLens.fit(model, partial, steps=0, progress=False)
    with pytest.raises(TunedLensError, match="data must be an ActivationStore or a non-empty list of texts"):
        TunedLens.identity(model).kl_per_layer(model, [])
    assert not model.registry.active and torch.equal(model(PROMPT), base)


def test_fit_warns_for_a_store_of_another_model(model, store):
    other = make_model(TINY, seed=9, tokenizer=CharTokenizer())
    with pytest.warns(UserWarning, match="harvested from a model with other weights"):
        TunedLens.fit(other, store, steps=1, progress=False)


def test_plots_name_the_tuned_lens(model, tuned):
    through = logit_lens(model, PROMPT, targets=[5], lens=tuned)
    assert through.plot().layout.title.text.startswith("Tuned lens")
    assert through.plot_targets().layout.title.text.startswith("Tuned lens")
    assert logit_lens(model, PROMPT).plot().layout.title.text.startswith("Logit lens")
