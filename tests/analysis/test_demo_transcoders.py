"""demo_transcoders: harvest, train one transcoder per layer, cache; a rerun loads the cache
without harvesting or training; a half-written layer is never read; they build exact graphs."""

from __future__ import annotations

import pytest
import torch
from harvest_worker import build_model, documents

import interp.data
import interp.features.demo as demo
from interp.circuits import attribution_graph
from interp.features import Transcoder
from interp.features.demo import demo_store, demo_transcoders

SMALL = {"tokens": 512, "d_sae": 32, "k": 4, "steps": 6, "batch_size": 64, "corpus": documents(120)}


@pytest.fixture(scope="module")
def model():
    return build_model()


def test_trains_caches_and_reloads(model, tmp_path, monkeypatch):
    tcs = demo_transcoders(model, [1, 3], folder=tmp_path, progress=False, **SMALL)
    assert [type(t) for t in tcs] == [Transcoder, Transcoder]
    assert [(t.site, t.site_out, t.d_sae, t.k) for t in tcs] == [
        ("blocks.1.pre_mlp_norm", "blocks.1.post_mlp_norm", 32, 4),
        ("blocks.3.pre_mlp_norm", "blocks.3.post_mlp_norm", 32, 4)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer_1", "layer_3", "settings.json", "store"]
    assert demo_store(model, [1, 3], folder=tmp_path, progress=False, **SMALL).sites == [
        "blocks.1.pre_mlp_norm", "blocks.1.post_mlp_norm", "blocks.3.pre_mlp_norm", "blocks.3.post_mlp_norm"]

    def refuse(*a, **k):
        raise AssertionError("a cached set must not be harvested or trained again")

    monkeypatch.setattr(demo, "train", refuse)
    monkeypatch.setattr(interp.data, "harvest", refuse)
    again = demo_transcoders(model, [1, 3], folder=tmp_path, progress=False, **SMALL)
    assert all(torch.equal(a.W_dec, b.W_dec) for a, b in zip(tcs, again))
    g = attribution_graph(model, "Doc 1: the cat", again, progress=False)
    assert g.check() < 1e-5


def test_a_half_written_layer_is_redone(model, tmp_path):
    first = demo_transcoders(model, [2], folder=tmp_path, progress=False, **SMALL)
    (tmp_path / "layer_2" / "cfg.json").unlink()  # as if killed before the layer was complete
    (tmp_path / ".layer_2.partial").mkdir()
    again = demo_transcoders(model, [2], folder=tmp_path, progress=False, **SMALL)
    assert torch.equal(first[0].W_dec, again[0].W_dec)  # deterministic retraining from the kept store


def test_bad_layers(model, tmp_path):
    with pytest.raises(ValueError, match="layer numbers in 0..5"):
        demo_transcoders(model, [9], folder=tmp_path, progress=False, **SMALL)
