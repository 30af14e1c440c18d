"""demo_clt: harvest every layer's MLP input and output, train one cross-layer transcoder, cache it in
Gemma Scope 2's layout; a rerun loads the cache without harvesting or training; a half-written result
is never read; a killed training resumes from its checkpoint. The slow test trains the real one."""

from __future__ import annotations

import json
import math

import pytest
import torch
from harvest_worker import build_model, documents

import interp.data
import interp.features.demo as demo
from interp.features import CrossLayerTranscoder, demo_clt, demo_clt_store, evaluate
from interp.features.training import TrainingLog

SMALL = {"tokens": 512, "d_sae": 16, "steps": 8, "batch_size": 64, "lr": 1e-2, "k": None, "l0": 3.0, "skip": False,
         "corpus": documents(120)}


@pytest.fixture(scope="module")
def model():
    return build_model()


@pytest.mark.filterwarnings("ignore:the L0 ended")
def test_trains_caches_and_reloads(model, tmp_path, monkeypatch):
    clt = demo_clt(model, folder=tmp_path, progress=False, **SMALL)
    n = model.cfg.n_layers
    assert isinstance(clt, CrossLayerTranscoder) and not clt.lazy
    assert (clt.n_layers, clt.widths, clt.k, clt.has_skip) == (n, [16] * n, None, False)
    assert clt.sites_in == [f"blocks.{i}.pre_mlp_norm" for i in range(n)]
    assert isinstance(clt.training_log, TrainingLog) and clt.training_log.final["step"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clt", "settings.json", "store"]  # no checkpoint left
    assert json.loads((tmp_path / "clt" / "config.json").read_text())["type"] == "clt"
    store = demo_clt_store(model, folder=tmp_path, progress=False, **SMALL)
    assert len(store.sites) == 2 * n

    def refuse(*a, **k):
        raise AssertionError("a cached CLT must not be harvested or trained again")

    monkeypatch.setattr(demo, "train", refuse)
    monkeypatch.setattr(interp.data, "harvest", refuse)
    again = demo_clt(model, folder=tmp_path, progress=False, **SMALL)
    xs = [torch.randn(4, model.cfg.d_model) for _ in range(n)]
    assert all(torch.equal(a, b) for a, b in zip(clt(xs), again(xs)))
    assert again.training_log.records == clt.training_log.records
    result = evaluate(model, again, store, progress=False)
    assert len(result.layers) == n and math.isfinite(result.ce_recovered)


@pytest.mark.filterwarnings("ignore:the L0 ended")
def test_a_half_written_result_is_redone_and_training_resumes(model, tmp_path, monkeypatch):
    settings = {**SMALL, "k": 2}
    first = demo_clt(model, folder=tmp_path, progress=False, **settings)
    assert first.k == 2
    (tmp_path / "clt" / "config.json").unlink()  # as if killed before the result was complete
    (tmp_path / ".clt.partial").mkdir()
    calls = []
    train = demo.train
    monkeypatch.setattr(demo, "train", lambda *a, **k: (calls.append(k["checkpoint_dir"]), train(*a, **k))[1])
    again = demo_clt(model, folder=tmp_path, progress=False, **settings)
    assert calls == [tmp_path / ".train"]  # training goes through its checkpoint folder (resumable)
    xs = [torch.randn(4, model.cfg.d_model) for _ in range(model.cfg.n_layers)]
    assert all(torch.equal(a, b) for a, b in zip(first(xs), again(xs)))  # deterministic, from the kept store
    assert not (tmp_path / ".clt.partial").exists()


@pytest.mark.slow
def test_the_demo_clt_of_the_270m_model(demo_model, tmp_path):
    """The default demo CLT (cached after the first run; a few minutes to train): every layer's
    features fire (at most k=16), its reconstruction explains most of each MLP output's variance
    (measured: FVU 0.02..0.24 per layer), and it round-trips through Gemma Scope 2's layout."""
    clt = demo_clt(demo_model, progress=False)
    assert (clt.n_layers, clt.d_model, clt.k, clt.has_skip) == (18, 640, 16, True)
    store = demo_clt_store(demo_model, progress=False)
    result = evaluate(demo_model, clt, store, max_tokens=4096, ce=False, progress=False)
    assert all(0 < e.l0 <= 16 for e in result.layers), result
    assert max(e.fvu for e in result.layers) < 0.4, result
    back = CrossLayerTranscoder.load(clt.save(tmp_path / "clt"), model=demo_model)
    xs = [next(iter(store.batches(s, 64, shuffle=False, dtype=torch.float32))) for s in clt.sites_in]
    assert all(torch.equal(a, b) for a, b in zip(clt(xs), back(xs)))
