"""interp.features.evaluate on a cross-layer transcoder: per-layer L0 and FVU and the whole-model
CE loss recovered, against hand computations on a harvested store of the tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from support import TINY
from test_feature_eval import copying_model, documents, hand_ce, store_rows, tokens

from interp.data import harvest
from interp.features import CrossLayerTranscoder, evaluate
from interp.features.quality import compare_dictionaries
from interp.features.quality_clt import CLTEval

N = TINY.n_layers
SITES = [f"blocks.{i}.pre_mlp_norm" for i in range(N)] + [f"blocks.{i}.post_mlp_norm" for i in range(N)]


@pytest.fixture(scope="module")
def model():
    return copying_model()


@pytest.fixture(scope="module")
def store(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("clt_eval") / "store"
    return harvest(model, documents(), SITES, out, context=16, batch_size=4, shard_tokens=64, dtype=torch.float32,
                   progress=False)


def test_per_layer_numbers_and_ce_recovered_equal_a_hand_computation(model, store):
    clt = CrossLayerTranscoder.random(N, TINY.d_model, [12, 9, 14, 8, 11, 10], seed=2, skip=True)
    result = evaluate(model, clt, store, batch_size=37, progress=False)
    assert isinstance(result, CLTEval) and len(result.layers) == N
    xs = [tokens(store, f"blocks.{i}.pre_mlp_norm").double() for i in range(N)]
    ys = [tokens(store, f"blocks.{i}.post_mlp_norm").double() for i in range(N)]
    c64 = clt.to(torch.float64)
    acts = [c64.encode(i, xs[i]) for i in range(N)]
    for o in range(N):
        recon = sum(acts[i] @ c64.decoder(i, o) for i in range(o + 1)) + c64.bias(o) + xs[o] @ c64.skip_weight(o)
        err = (ys[o] - recon).pow(2).sum()
        fvu = float(err / (ys[o] - ys[o].mean(0)).pow(2).sum())
        e = result.layers[o]
        assert e.site == f"blocks.{o}.pre_mlp_norm" and e.site_out == f"blocks.{o}.post_mlp_norm"
        assert math.isclose(e.fvu, fvu, rel_tol=1e-5)
        assert math.isclose(e.l0, float((acts[o] > 0).sum(-1).double().mean()), rel_tol=1e-9)
    clt.to(torch.float32)
    rows = store_rows(store)

    def by_hand(layer_out):  # the published math with plain hooks, on fresh state per forward
        state = {}

        def read(i):
            return lambda x, s: state.__setitem__(i, (x, clt.encode(i, x))) or None

        def write(o):
            return lambda y, s: (sum(state[i][1] @ clt.decoder(i, o) for i in range(o + 1)) + clt.bias(o)
                                 + state[o][0] @ clt.skip_weight(o))
        return [(f"blocks.{i}.pre_mlp_norm", read(i)) for i in range(N)] + [
            (f"blocks.{o}.post_mlp_norm", write(o)) for o in range(layer_out)]

    spliced = hand_ce(model, rows, by_hand(N))
    zero = hand_ce(model, rows, [(f"blocks.{o}.post_mlp_norm", lambda y, s: torch.zeros_like(y)) for o in range(N)])
    clean = hand_ce(model, rows)
    assert math.isclose(result.ce_spliced, spliced, rel_tol=1e-5)
    assert math.isclose(result.ce_zero, zero, rel_tol=1e-5) and math.isclose(result.ce_clean, clean, rel_tol=1e-5)
    assert math.isclose(result.ce_recovered, (zero - spliced) / (zero - clean), rel_tol=1e-4)
    assert "CE clean" in repr(result) and result.table()[0] == ("layer", "L0", "FVU", "dead")


def test_a_store_without_every_layer_is_refused(model, store, tmp_path):
    partial = harvest(model, documents(2), SITES[:3], tmp_path / "s", context=16, batch_size=4, shard_tokens=64,
                      dtype=torch.float32, progress=False)
    clt = CrossLayerTranscoder.random(N, TINY.d_model, 8)
    with pytest.raises(KeyError, match="this store lacks.*harvest 'blocks.\\*.pre_mlp_norm'"):
        evaluate(model, clt, partial, progress=False)
    with pytest.raises(TypeError, match="evaluate a CLT alone"):
        compare_dictionaries(model, [clt], store, ce=False, progress=False)


@pytest.mark.slow
def test_a_clt_of_the_270m_shape_splices_into_the_demo_model_as_the_published_math(demo_model, tmp_path):
    """The real Gemma 3 270M (18 layers, d_model 640) with a narrow CLT in the released layout,
    read through Hugging Face hook names: the spliced logits equal the math done by hand."""
    from test_gemma_scope2 import hand_clt_hooks, write_clt

    cfg = demo_model.cfg
    folder = tmp_path / "clt" / "width_576_l0_big_affine"
    layers = write_clt(folder, cfg.n_layers, cfg.d_model, [32] * cfg.n_layers, True)
    clt = CrossLayerTranscoder.load(folder, model=demo_model)
    ids = torch.tensor([[2, 651, 6037, 576, 9405, 603]])
    from interp.features import run_with_dictionaries

    logits, _ = run_with_dictionaries(demo_model, ids, [clt], splice=True)
    assert torch.equal(logits, demo_model.run_with_hooks(ids, hand_clt_hooks(layers, True)))
