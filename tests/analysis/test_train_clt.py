"""interp.features.train(..., "clt"): cross-layer transcoders trained on planted cross-layer structure
(which they must recover), from tensors and from a store of the tiny model; JumpReLU (the decoder-norm
weighted tanh penalty) and TopK; the skip term; the normalisation folded back; save/load; seeds,
checkpoints (an interrupted or killed run resumes bit for bit), warnings, memory and the errors.

The planted data and the run the kill test interrupts live in ``train_worker.py``.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import train_worker as tw
from support import TINY, make_model

from interp.data import harvest
from interp.features import CrossLayerTranscoder, evaluate, run_with_dictionaries
from interp.features.training import TrainingError, train
from interp.hooks import NonFiniteError

T = importlib.import_module("interp.features.training")
C = importlib.import_module("interp.features.trainer_clt")
WORKER = Path(tw.__file__).resolve()
PLANTED = dict(d_sae=24, steps=300, batch_size=256, lr=1e-2, progress=False)
N = TINY.n_layers
SITES = [f"blocks.{i}.pre_mlp_norm" for i in range(N)] + [f"blocks.{i}.post_mlp_norm" for i in range(N)]


def decoder_rows(clt: CrossLayerTranscoder, layer: int) -> torch.Tensor:
    """``[w, (n_layers - layer) * d]``: each feature's decoder vectors to every output, concatenated."""
    return torch.stack([clt.decoder(layer, o) for o in range(layer, clt.n_layers)], 1).flatten(1)


def recovery(clt: CrossLayerTranscoder, decoders: list[torch.Tensor]) -> list[float]:
    """Per layer: the mean over the planted features of the best cosine between a planted decoder
    (concatenated over the outputs) and a learned one."""
    out = []
    for i, planted in enumerate(decoders):
        learned = torch.nn.functional.normalize(decoder_rows(clt, i), dim=1)
        true = torch.nn.functional.normalize(planted.flatten(1), dim=1)
        out.append(float((true @ learned.T).max(dim=1).values.mean()))
    return out


def explained_variance(clt: CrossLayerTranscoder, xs, ys) -> float:
    outs = clt(xs)
    err = sum(float((y - p).pow(2).sum()) for y, p in zip(ys, outs))
    return 1 - err / sum(float((y - y.mean(0)).pow(2).sum()) for y in ys)


def state(clt: CrossLayerTranscoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in clt.state_dict().items()}


def assert_identical(a: CrossLayerTranscoder, b: CrossLayerTranscoder) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"
    assert a.training_log.records == b.training_log.records


@pytest.fixture(scope="module")
def planted():
    return tw.planted_clt(n=4096, seed=0)


# ---------------------------------------------------------------------- planted structure
@pytest.mark.parametrize("options", [{}, {"k": 2}], ids=["jumprelu", "topk"])
def test_planted_cross_layer_features_are_recovered(planted, options):
    xs, ys, decoders = planted
    clt = train((xs, ys), "clt", seed=0, **PLANTED, **options)
    assert isinstance(clt, CrossLayerTranscoder)
    assert (clt.n_layers, clt.d_model, clt.widths, clt.k) == (3, 16, [24] * 3, options.get("k"))
    assert (clt.site, clt.site_out) == ("blocks.{layer}.pre_mlp_norm", "blocks.{layer}.post_mlp_norm")
    assert not any(p.requires_grad for p in clt.parameters()) and not clt.has_skip
    scores = recovery(clt, decoders)
    assert min(scores) >= 0.9, scores
    # an untrained CLT of the same shape is far from it: the score measures training
    assert max(recovery(CrossLayerTranscoder.random(3, 16, 24, seed=1), decoders)) < 0.6
    for i, x in enumerate(xs):  # ~2 planted features per layer and vector
        l0 = float((clt.encode(i, x) > 0).sum(-1).float().mean())
        assert 1.5 <= l0 <= 3.0, (i, l0)
    assert explained_variance(clt, xs, ys) > 0.9
    log = clt.training_log
    assert log.kind == "clt" and log.settings["activation"] == ("topk" if options else "jumprelu")
    assert len(log.scale_in) == len(log.scale_out) == 3
    # every feature's decoder, concatenated over its outputs, has unit norm in the training's units
    for i in range(3):
        scale = torch.tensor(log.scale_out[i:]).repeat_interleave(16)
        assert torch.allclose((decoder_rows(clt, i) * scale).norm(dim=1), torch.ones(24), atol=1e-4)
    if not options:
        assert {"sparsity_loss", "sparsity_coefficient"} <= set(log.final)
        assert float(torch.stack([clt.threshold[i] for i in range(3)]).min()) > 0


def test_the_l0_target_steers_the_penalty_per_layer(planted):
    """l0= counts features per layer and token: with 2 planted per layer, a target of 1 makes the
    controller raise lambda until about one fires per layer."""
    xs, ys, _ = planted
    clt = train((xs, ys), "clt", seed=0, l0=1.0, **PLANTED)
    log = clt.training_log
    assert 1 / 1.5 <= log.l0[-1] <= 1.5 and not log.warnings
    assert log.sparsity_coefficient[-1] > 2.0  # raised from 1.0 by the controller
    per_layer = [float((clt.encode(i, x) > 0).sum(-1).float().mean()) for i, x in enumerate(xs)]
    assert sum(per_layer) / 3 == pytest.approx(log.l0[-1], abs=0.3)


def test_the_penalty_weights_activations_by_the_concatenated_decoder_norm(planted):
    """The loss's penalty term is sum tanh(c * ||W_dec_f|| * f) with the norm over every output the
    feature writes, concatenated (checked against a hand computation on one batch)."""
    xs, ys, _ = planted
    settings = T._settings("clt", 8, 10, 0, T.make_clt_source((xs, ys)), {"batch_size": 64, "tanh_scale": 3.0})
    trainer = C.CLTTrainer(settings, T.make_clt_source((xs, ys)), torch.device("cpu"))
    trainer.initialise()
    with torch.no_grad():
        for i in range(3):  # decoders of unequal norms, so the weighting shows
            trainer.P[f"W_dec.{i}"].mul_(torch.linspace(0.5, 2.0, 8)[:, None, None])
    x = torch.stack([t[:64] for t in xs], 1) * trainer.scale_in[:, None]
    acts = trainer.forward(x)["acts"].detach()
    norms = [torch.cat([trainer.P[f"W_dec.{i}"][f, o] for o in range(3 - i)]).norm()
             for i in range(3) for f in range(8)]
    by_hand = sum(torch.tanh(3.0 * norms[i * 8 + f] * acts[:, i, f]) for i in range(3) for f in range(8)).mean()
    assert torch.allclose(torch.tanh(3.0 * trainer.decoder_norms() * acts).sum((-1, -2)).mean(), by_hand)
    assert torch.allclose(trainer.decoder_norms()[1], torch.linspace(0.5, 2.0, 8), atol=1e-5)


def test_the_normalisation_is_folded_back_per_layer(planted):
    """Each layer's input and output is scaled by its own factor during training; data scaled per
    layer trains the same CLT up to those scales, so the returned CLT reads raw activations."""
    xs, ys = [x[:2048] for x in planted[0]], [y[:2048] for y in planted[1]]
    fx, fy = [1.0, 10.0, 0.1], [3.0, 0.5, 20.0]
    settings = dict(d_sae=16, steps=30, batch_size=128, lr=1e-2, k=3, skip=True, progress=False)
    a = train((xs, ys), "clt", **settings)
    b = train(([x * f for x, f in zip(xs, fx)], [y * f for y, f in zip(ys, fy)]), "clt", **settings)
    for i in range(3):
        assert b.training_log.scale_in[i] == pytest.approx(a.training_log.scale_in[i] / fx[i], rel=1e-5)
        assert b.training_log.scale_out[i] == pytest.approx(a.training_log.scale_out[i] / fy[i], rel=1e-5)
    outs_a = a([x[:64] for x in xs])
    outs_b = b([x[:64] * f for x, f in zip(xs, fx)])
    for o in range(3):
        assert torch.allclose(outs_b[o], fy[o] * outs_a[o], rtol=1e-3, atol=1e-3 * fy[o])
    # during training E||x_i||^2 = d at every layer
    for i, x in enumerate(xs):
        assert float((x * a.training_log.scale_in[i]).pow(2).sum(-1).mean()) == pytest.approx(16, rel=1e-4)


def test_the_skip_term_learns_a_dense_linear_part(planted):
    """An MLP output with a dense linear map of its own input (which sparse features cannot cover):
    skip=True learns it (W_skip per layer, in raw units) and explains far more."""
    xs, ys = [x[:2048] for x in planted[0]], [y[:2048] for y in planted[1]]
    g = torch.Generator().manual_seed(3)
    maps = [torch.randn(16, 16, generator=g) * 0.5 for _ in range(3)]
    ys = [y + x @ m for x, y, m in zip(xs, ys, maps)]
    settings = dict(d_sae=24, steps=200, batch_size=256, lr=1e-2, k=2, progress=False)
    with_skip = train((xs, ys), "clt", skip=True, **settings)
    without = train((xs, ys), "clt", **settings)
    assert with_skip.has_skip and not without.has_skip
    assert explained_variance(with_skip, xs, ys) > explained_variance(without, xs, ys) + 0.05
    assert explained_variance(with_skip, xs, ys) > 0.9
    assert all(with_skip.skip_weight(i).shape == (16, 16) for i in range(3))


def test_topk_keeps_k_per_layer_and_round_trips_through_files(planted, tmp_path):
    xs, ys = [x[:1024] for x in planted[0]], [y[:1024] for y in planted[1]]
    clt = train((xs, ys), "clt", d_sae=16, steps=20, batch_size=128, lr=1e-2, k=3, progress=False)
    assert clt.k == 3 and "TopK k=3" in repr(clt)
    for i, x in enumerate(xs):
        assert int((clt.encode(i, x) > 0).sum(-1).max()) <= 3
    assert clt.training_log.l0[-1] <= 3.0 and "aux_loss" in clt.training_log.final
    folder = clt.save(tmp_path / "clt")
    config = json.loads((folder / "config.json").read_text())
    assert (config["architecture"], config["k"], config["type"], config["width"]) == ("topk", 3, "clt", 48)
    from interp.features import load_dictionary

    assert load_dictionary(folder).k == 3
    for lazy in (True, False):
        back = CrossLayerTranscoder.load(folder, lazy=lazy)
        assert back.k == 3
        for a, b in zip(clt(xs), back(xs)):
            assert torch.equal(a, b)


def test_a_jumprelu_clt_with_skip_round_trips_through_files(planted, tmp_path):
    xs, ys = [x[:1024] for x in planted[0]], [y[:1024] for y in planted[1]]
    clt = train((xs, ys), "clt", d_sae=16, steps=20, batch_size=128, lr=1e-2, skip=True, progress=False)
    back = CrossLayerTranscoder.load(clt.save(tmp_path / "clt"), lazy=False)
    assert back.k is None and back.has_skip
    for a, b in zip(clt(xs), back(xs)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------- seeds, checkpoints
def test_same_seed_same_weights_other_seed_other_weights(planted):
    xs, ys = [x[:1024] for x in planted[0]], [y[:1024] for y in planted[1]]
    settings = dict(d_sae=16, steps=15, batch_size=128, lr=1e-2, progress=False)
    a = train((xs, ys), "clt", seed=1, **settings)
    b = train((xs, ys), "clt", seed=1, **settings)
    c = train((xs, ys), "clt", seed=2, **settings)
    assert_identical(a, b)
    assert not torch.equal(a.W_enc[0], c.W_enc[0])


NOISY = pytest.mark.filterwarnings("ignore:the L0 ended")  # short runs with l0= end off target: not what they test


@pytest.fixture(scope="module")
def reference():
    """The worker's CLT run, uninterrupted, without checkpoints."""
    return tw.run_clt()


@NOISY
def test_checkpoints_do_not_change_the_result(tmp_path, reference):
    clt = tw.run_clt(tmp_path / "ck")
    assert_identical(clt, reference)
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == ["train-000000060.safetensors", "train.json"]
    saved = json.loads((tmp_path / "ck" / "train.json").read_text())
    assert saved["settings"]["kind"] == "clt" and saved["settings"]["n_layers"] == 3


@NOISY
@pytest.mark.parametrize("options", [{}, {"k": 2, "dead_tokens": 64}], ids=["jumprelu", "topk"])
def test_an_interrupted_clt_run_resumes_bit_for_bit(planted, tmp_path, monkeypatch, options):
    """Interrupted mid-way between checkpoints and in the second epoch: parameters, Adam, the dead
    counters, the l0 controller's factor (JumpReLU) and AuxK (TopK) come back exactly."""
    xs, ys = [x[:640] for x in planted[0]], [y[:640] for y in planted[1]]
    settings = dict(d_sae=16, steps=40, batch_size=32, lr=5e-3, skip=True, progress=False, log_every=3, **options)
    if not options:
        settings["l0"] = 1.5
    reference = train((xs, ys), "clt", **settings)
    if options:
        assert max(reference.training_log.dead) > 0 and max(reference.training_log.aux_loss) > 0  # AuxK in play
    step = C.CLTTrainer.step

    def interrupted(self, t, *a):
        if t == 27:
            raise KeyboardInterrupt
        return step(self, t, *a)

    monkeypatch.setattr(C.CLTTrainer, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train((xs, ys), "clt", checkpoint_dir=tmp_path / "ck", checkpoint_every=7, **settings)
    assert json.loads((tmp_path / "ck" / "train.json").read_text())["step"] == 21
    calls = []
    monkeypatch.setattr(C.CLTTrainer, "step", lambda self, t, *a: (calls.append(t), step(self, t, *a))[1])
    resumed = train((xs, ys), "clt", checkpoint_dir=tmp_path / "ck", checkpoint_every=7, **settings)
    assert calls == list(range(21, 40))
    assert_identical(resumed, reference)


@NOISY
@pytest.mark.subprocess
def test_a_killed_clt_run_resumes_bit_for_bit(tmp_path, reference, monkeypatch):
    folder = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, str(WORKER), str(folder), "--clt", "--sleep", "0.05"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (folder / "train.json").is_file():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.01)
        time.sleep(0.12)  # a few steps past the checkpoint, which the kill loses
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = json.loads((folder / "train.json").read_text())["step"]
    assert 10 <= done < 60 and done % tw.CHECKPOINT_EVERY == 0
    calls = []
    step = C.CLTTrainer.step
    monkeypatch.setattr(C.CLTTrainer, "step", lambda self, t, *a: (calls.append(t), step(self, t, *a))[1])
    resumed = tw.run_clt(folder)
    assert calls == list(range(done, 60))
    assert_identical(resumed, reference)


@NOISY
def test_a_checkpoint_of_another_clt_is_refused(tmp_path):
    tw.run_clt(tmp_path / "ck", steps=10)
    with pytest.raises(TrainingError, match=r"other settings: .*d_sae \(16 there, 8 now\)"):
        tw.run_clt(tmp_path / "ck", steps=10, d_sae=8)


# ---------------------------------------------------------------------- log, warnings
def test_the_log_progress_bar_and_warnings(planted, capsys):
    xs, ys = [x[:1024] for x in planted[0]], [y[:1024] for y in planted[1]]
    train((xs, ys), "clt", d_sae=8, steps=4, batch_size=128, progress=True)
    err = capsys.readouterr().err
    assert "train jumprelu CLT" in err and "4/4" in err and "l0=" in err
    with pytest.warns(UserWarning, match=r"the L0 ended at .*far from the target l0=6"):
        off = train((xs, ys), "clt", d_sae=8, steps=6, batch_size=128, l0=6.0, progress=False)
    assert off.training_log.warnings and "l0=6" in off.training_log.warnings[0]
    with pytest.warns(UserWarning, match=r"24 of 24 features are dead"):  # 3 layers x 8: every layer's counted
        train((xs, ys), "clt", d_sae=8, steps=4, batch_size=128, initial_threshold=100.0, dead_tokens=256,
              progress=False)


# ---------------------------------------------------------------------- memory
def test_a_run_that_would_not_fit_is_refused_naming_what_fits(planted, monkeypatch):
    xs, ys = [x[:512] for x in planted[0]], [y[:512] for y in planted[1]]
    monkeypatch.setattr("interp.features.training.available_memory", lambda device: 2_000_000)
    with pytest.raises(TrainingError, match=r"a CLT of 4,096 features per layer over 3 layers needs about .* "
                                            r"of the 1.9 MiB free: d_sae=(\d+) fits at batch_size=64") as e:
        train((xs, ys), "clt", d_sae=4096, steps=5, batch_size=64, progress=False)
    fits = int(str(e.value).split("d_sae=")[1].split(" ")[0].replace(",", ""))
    settings = T._settings("clt", fits, 5, 0, T.make_clt_source((xs, ys)), {"batch_size": 64})
    assert T._memory_needed(settings, T.make_clt_source((xs, ys)), fits) <= 0.8 * 2_000_000
    assert T._memory_needed(settings, T.make_clt_source((xs, ys)), fits + 1) > 0.8 * 2_000_000
    train((xs, ys), "clt", d_sae=fits, steps=2, batch_size=64, progress=False)  # the suggestion runs
    with pytest.raises(TrainingError, match=r"training 100,000 features needs about .*: d_sae=\d+ fits"):
        train(xs[0], "topk", d_sae=100_000, steps=2, batch_size=64, k=2)  # every kind is checked
    with pytest.raises(TrainingError, match=r"not even d_sae=1 fits at this batch_size: lower batch_size"):
        train(torch.randn(4096, 64), "topk", d_sae=8, steps=2, batch_size=4096, k=2)  # 8 MiB of batch alone


# ---------------------------------------------------------------------- a store of the tiny model
@pytest.fixture(scope="module")
def model():
    m = make_model(TINY, seed=0, tokenizer=tw_tokenizer())
    yield m
    assert not m.registry.active


def tw_tokenizer():
    from harvest_worker import CharTokenizer

    return CharTokenizer()


@pytest.fixture(scope="module")
def store(model, tmp_path_factory):
    from harvest_worker import documents

    out = tmp_path_factory.mktemp("clt_store") / "s"
    return harvest(model, documents(40), SITES, out, context=16, batch_size=8, shard_tokens=128, max_tokens=480,
                   dtype=torch.float32, progress=False)


def test_a_clt_from_a_store_splices_into_the_model_and_evaluates(model, store):
    clt = train(store, "clt", d_sae=32, steps=150, batch_size=64, lr=1e-2, k=4, skip=True, progress=False)
    assert clt.n_layers == N and clt.sites_in == SITES[:N] and clt.sites_out == SITES[N:]
    clt.check_fits(model)
    result = evaluate(model, clt, store, progress=False)
    assert len(result.layers) == N and all(e.l0 <= 4 for e in result.layers)
    assert max(e.fvu for e in result.layers) < 0.5, result
    assert result.ce_recovered is not None and result.ce_recovered > 0.5, result
    ids = torch.tensor([tw_tokenizer().encode("Doc 3: alpha river stone")])
    clean = model(ids)
    logits, _ = run_with_dictionaries(model, ids, [clt], splice=True)
    assert logits.shape == clean.shape and not torch.equal(logits, clean)
    assert not model.registry.active


# ---------------------------------------------------------------------- errors
def test_bad_sources_are_refused(model, store, tmp_path, planted):
    from harvest_worker import documents

    partial = harvest(model, documents(4), [s for s in SITES if s != "blocks.3.post_mlp_norm"], tmp_path / "p",
                      context=16, batch_size=4, shard_tokens=64, dtype=torch.float32, progress=False)
    with pytest.raises(TrainingError, match=r"every layer's MLP input and output; the store at .* lacks "
                                            r"blocks.3.post_mlp_norm: harvest 'blocks.\*.pre_mlp_norm'"):
        train(partial, "clt", d_sae=8, steps=5)
    only_pre = harvest(model, documents(4), SITES[:N], tmp_path / "q", context=16, batch_size=4, shard_tokens=64,
                       dtype=torch.float32, progress=False)
    with pytest.raises(TrainingError, match=r"lacks blocks.0.post_mlp_norm, .* and 2 more"):
        train(only_pre, "clt", d_sae=8, steps=5)
    xs, ys = [x[:64] for x in planted[0]], [y[:64] for y in planted[1]]
    with pytest.raises(TrainingError, match=r"one width at every layer; the widths differ: .*inputs\[1\] 8"):
        train(([xs[0], xs[1][:, :8], xs[2]], ys), "clt", d_sae=8, steps=5)
    with pytest.raises(TrainingError, match=r"outputs\[2\] 12"):
        train((xs, [ys[0], ys[1], ys[2][:, :12]]), "clt", d_sae=8, steps=5)
    with pytest.raises(TrainingError, match=r"got 3 inputs and 2 outputs"):
        train((xs, ys[:2]), "clt", d_sae=8, steps=5)
    with pytest.raises(TrainingError, match=r"outputs\[1\] has 63 rows and inputs\[0\] 64"):
        train((xs, [ys[0], ys[1][:63], ys[2]]), "clt", d_sae=8, steps=5)
    with pytest.raises(TrainingError, match=r"inputs\[0\] has shape \(64,\)"):
        train(([xs[0][:, 0], xs[1], xs[2]], ys), "clt", d_sae=8, steps=5)
    bad = ys[1].clone()
    bad[5, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"outputs\[1\] holds nan at row 5, column 2"):
        train((xs, [ys[0], bad, ys[2]]), "clt", d_sae=8, steps=5)
    with pytest.raises(TypeError, match=r"a CLT's source is an ActivationStore .* got tuple"):
        train((store, "blocks.0.pre_mlp_norm"), "clt", d_sae=8, steps=5)
    with pytest.raises(TypeError, match=r"a CLT's source is .* got Tensor"):
        train(xs[0], "clt", d_sae=8, steps=5)
    zero = [torch.zeros_like(ys[0]), ys[1], ys[2]]
    with pytest.raises(TrainingError, match=r"layer 0's MLP output is zero in every sampled row"):
        train((xs, zero), "clt", d_sae=8, steps=5, progress=False)


def test_bad_options_are_refused(planted):
    xs, ys = [x[:64] for x in planted[0]], [y[:64] for y in planted[1]]
    with pytest.raises(TypeError, match=r"unknown option\(s\) bandwidth for kind 'clt' \(bandwidth belong to a "
                                        r"JumpReLU CLT \(no k=\)\)"):
        train((xs, ys), "clt", d_sae=8, steps=5, k=2, bandwidth=0.1)
    with pytest.raises(TypeError, match=r"unknown option\(s\) k_aux for kind 'clt' \(k_aux belong to a TopK CLT"):
        train((xs, ys), "clt", d_sae=8, steps=5, k_aux=4)
    with pytest.raises(TypeError, match=r"unknown option\(s\) l0 .*a TopK CLT's L0 is k"):
        train((xs, ys), "clt", d_sae=8, steps=5, k=2, l0=3.0)
    with pytest.raises(TrainingError, match=r"k must be an int in 1..d_sae=8, got 9"):
        train((xs, ys), "clt", d_sae=8, steps=5, k=9)
    with pytest.raises(TrainingError, match=r"tanh_scale must be a finite number > 0.0, got 0"):
        train((xs, ys), "clt", d_sae=8, steps=5, tanh_scale=0)
    with pytest.raises(TrainingError, match=r"l0=8.0 must be below d_sae=8"):
        train((xs, ys), "clt", d_sae=8, steps=5, l0=8.0)


def test_a_topk_clt_config_is_checked(tmp_path):
    from interp.features import DictionaryFileError

    folder = CrossLayerTranscoder.random(2, 8, 6, k=2).save(tmp_path / "clt")
    config = json.loads((folder / "config.json").read_text())
    assert CrossLayerTranscoder.load(folder).k == 2
    for change, message in (({"k": 0}, r"a TopK CLT needs k .* got k=0"),
                            ({"k": None}, r"a TopK CLT needs k"),
                            ({"architecture": "jump_relu"}, r"k=2 is for TopK CLTs .* remove it"),
                            ({"type": "transcoder"}, r"architecture='topk' is not supported")):
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(DictionaryFileError, match=message):
            CrossLayerTranscoder.load(folder)
