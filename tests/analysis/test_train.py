"""interp.features.training: JumpReLU and TopK SAEs and transcoders, trained on planted features (which
they must recover), on tensors and on an ActivationStore harvested from the tiny model; seeds,
checkpoints (a killed run resumes bit for bit), the training log, and the errors.

The planted data and the run the kill test interrupts live in ``train_worker.py`` (the process
it kills runs the same code).
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

from interp.data import ActivationStore, harvest
from interp.features import JumpReLUSAE, TopKSAE, Transcoder, run_with_dictionaries
from interp.features.training import TrainingError, TrainingLog, train
from interp.hooks import NonFiniteError

T = importlib.import_module("interp.features.training")
R = importlib.import_module("interp.features.trainer")  # the recipes (estimators, the trainer)
WORKER = Path(tw.__file__).resolve()
PLANTED_JUMPRELU = dict(d_sae=128, steps=300, batch_size=256, lr=1e-2, initial_threshold=0.1, bandwidth=0.05,
                        warmup_steps=100, sparsity_coefficient=1.0, progress=False)
PLANTED_TOPK = dict(d_sae=128, steps=200, batch_size=256, lr=1e-2, k=3, progress=False)
SITE, SITE_IN, SITE_OUT = "blocks.2.resid_post", "blocks.2.pre_mlp_norm", "blocks.2.post_mlp_norm"


def tensors(d) -> dict[str, torch.Tensor]:
    out = {"W_enc": d.W_enc, "W_dec": d.W_dec, "b_enc": d.b_enc, "b_dec": d.b_dec}
    for name in ("threshold", "W_skip"):
        if getattr(d, name, None) is not None:
            out[name] = getattr(d, name)
    return out


def assert_identical(a, b) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs"
    assert a.training_log.records == b.training_log.records


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(1 - (target - pred).pow(2).sum() / (target - target.mean(0)).pow(2).sum())


def recovery(d, directions: torch.Tensor) -> float:
    """Mean over the true directions of the best cosine with a learned decoder row."""
    return float((directions @ d.W_dec.T).max(dim=1).values.mean())


# ---------------------------------------------------------------------- planted features
@pytest.fixture(scope="module")
def planted():
    return tw.planted(n=8192, d=32, m=64, active=3, seed=0)


@pytest.mark.parametrize("kind, settings", [("jumprelu", PLANTED_JUMPRELU), ("topk", PLANTED_TOPK)])
def test_planted_features_are_recovered(planted, kind, settings):
    x, directions = planted
    d = train(x, kind, seed=0, **settings)
    assert isinstance(d, JumpReLUSAE if kind == "jumprelu" else TopKSAE)
    assert (d.d_in, d.d_sae, d.d_out) == (32, 128, 32) and d.site is None
    assert torch.allclose(d.W_dec.norm(dim=1), torch.ones(128), atol=1e-5)
    assert not any(p.requires_grad for p in d.parameters())
    assert recovery(d, directions) >= 0.9
    # an untrained dictionary of the same shape is far from it: the score measures training
    assert recovery(JumpReLUSAE.random(32, 128, seed=123), directions) < 0.6
    acts = d.encode(x)
    l0 = float((acts > 0).sum(-1).float().mean())
    assert 1.5 <= l0 <= 6.0  # ~3 planted features per vector
    assert explained_variance(d(x), x) > 0.85


def test_the_returned_dictionary_works_on_raw_activations(planted):
    """The normalisation is folded into the weights: data scaled by 10 trains the same
    dictionary, up to the scale (encode(10 x) = encode(x), outputs 10x)."""
    x = planted[0][:2048]
    settings = dict(d_sae=32, steps=25, batch_size=128, lr=1e-2, k=4, progress=False)
    d1 = train(x, "topk", **settings)
    d10 = train(10 * x, "topk", **settings)
    assert d1.training_log.scale_in == pytest.approx(10 * d10.training_log.scale_in, rel=1e-5)
    assert torch.allclose(d10.W_dec, d1.W_dec, atol=1e-4)
    assert torch.allclose(d10(10 * x[:64]), 10 * d1(x[:64]), atol=1e-3, rtol=1e-3)
    assert explained_variance(d10(10 * x), 10 * x) == pytest.approx(explained_variance(d1(x), x), abs=1e-3)
    # the factor makes E||x||^2 = d_in during training
    s = d1.training_log.scale_in
    assert float((x * s).pow(2).sum(-1).mean()) == pytest.approx(32, rel=1e-4)


def test_normalize_false_trains_on_the_data_as_given(planted):
    x = planted[0][:1024]
    d = train(x, "topk", d_sae=32, steps=5, batch_size=128, k=4, normalize=False, progress=False)
    assert d.training_log.scale_in == 1.0 and d.training_log.scale_out == 1.0


# ---------------------------------------------------------------------- the JumpReLU estimators
def test_step_and_jumprelu_pseudo_derivatives():
    """The straight-through estimates of arXiv 2407.14435: d/d threshold H(z - t) = -(1/eps) rect((z-t)/eps),
    d/d threshold JumpReLU = -(t/eps) rect(...), d/dz JumpReLU = H(z - t), d/dz H = 0."""
    eps = 0.1
    z = torch.tensor([[0.46, 0.52, 0.9, -1.0], [0.54, 0.2, 1.02, 0.0]], requires_grad=True)
    t = torch.tensor([0.5, 0.5, 1.0, 0.0], requires_grad=True)
    R.StepFunction.apply(z, t, eps).sum().backward()
    # inside the window (|z - t| < eps/2): (0,0) 0.04, (0,1) 0.02, (1,0) 0.04, (1,2) 0.02, (1,3) 0.0
    assert torch.allclose(t.grad, torch.tensor([-2 / eps, -1 / eps, -1 / eps, -1 / eps]))
    assert z.grad is None or not z.grad.any()
    z.grad = t.grad = None
    out = R.JumpReLUFunction.apply(z, t, eps)
    assert torch.equal(out.detach(), torch.tensor([[0.0, 0.52, 0.0, 0.0], [0.54, 0.0, 1.02, 0.0]]))
    out.sum().backward()
    assert torch.equal(z.grad, torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]]))
    assert torch.allclose(t.grad, torch.tensor([-2 * 0.5 / eps, -0.5 / eps, -1.0 / eps, 0.0]))


def test_the_sparsity_penalty_raises_the_thresholds(planted):
    """lambda * L0 reaches the thresholds only through the estimator: with it L0 falls and the
    thresholds rise; without it (coefficient 0) L0 stays high."""
    x = planted[0][:4096]
    settings = {**PLANTED_JUMPRELU, "d_sae": 64, "steps": 120, "warmup_steps": 40}
    sparse = train(x, "jumprelu", **settings)
    dense = train(x, "jumprelu", **{**settings, "sparsity_coefficient": 0.0})
    assert sparse.training_log.l0[-1] < 0.5 * dense.training_log.l0[-1]
    assert sparse.training_log.l0[-1] < sparse.training_log.l0[0]
    scale = 1 / sparse.training_log.scale_in  # thresholds come back in raw units (decoder rows unit norm)
    assert float(sparse.threshold.median()) > 2 * 0.1 * scale
    assert sparse.training_log.sparsity_coefficient[0] < sparse.training_log.sparsity_coefficient[-1] == 1.0


def test_topk_auxk_trains_dead_features_on_the_residual(planted):
    """With more features than planted directions many die; AuxK then fits the error with them
    (its loss falls). Without it (coefficient 0) nothing is reported."""
    x = planted[0][:4096]
    settings = dict(d_sae=128, steps=150, batch_size=256, lr=1e-2, k=3, dead_tokens=512, progress=False)
    d = train(x, "topk", **settings)
    log = d.training_log
    assert max(log.dead) > 0
    aux = [a for a in log.aux_loss if a > 0]
    assert aux and aux[-1] < aux[0]
    off = train(x, "topk", **{**settings, "aux_coefficient": 0.0})
    assert set(off.training_log.aux_loss) == {0.0}
    assert not torch.equal(off.W_dec, d.W_dec)


# ---------------------------------------------------------------------- seeds
def test_same_seed_same_weights_other_seed_other_weights(planted):
    x = planted[0][:2048]
    for kind, extra in (("jumprelu", {"initial_threshold": 0.1, "bandwidth": 0.05}), ("topk", {"k": 4})):
        settings = dict(d_sae=32, steps=30, batch_size=128, lr=1e-2, progress=False, **extra)
        a = train(x, kind, seed=1, **settings)
        b = train(x, kind, seed=1, **settings)
        c = train(x, kind, seed=2, **settings)
        assert_identical(a, b)
        assert not torch.equal(a.W_dec, c.W_dec) and not torch.equal(a.W_enc, c.W_enc)
        assert a.training_log.records != c.training_log.records


# ---------------------------------------------------------------------- checkpoints
def _checkpoint_state(folder: Path) -> dict:
    return json.loads((folder / "train.json").read_text())


@pytest.fixture(scope="module")
def reference():
    """The worker's run, uninterrupted, without checkpoints."""
    return tw.run()


def test_checkpoints_do_not_change_the_result_and_hold_no_pickle(tmp_path, reference):
    d = tw.run(tmp_path / "ck")
    assert_identical(d, reference)
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == ["train-000000060.safetensors", "train.json"]  # the older tensor files are removed
    state = _checkpoint_state(tmp_path / "ck")
    assert state["step"] == state["batches_consumed"] == 60
    assert state["settings"]["kind"] == "jumprelu" and state["settings"]["lr"] == 1e-2
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ck" / state["tensors"]), framework="pt") as f:
        keys = set(f.keys())
        W_dec = f.get_tensor("param.W_dec")
    assert {"param.W_enc", "param.log_threshold", "adam.W_dec.exp_avg", "adam.W_dec.exp_avg_sq", "adam.W_dec.step",
            "since_fired"} <= keys
    # the decoder rows are kept at unit norm during training (not only rescaled at the end)
    assert torch.allclose(W_dec.norm(dim=1), torch.ones(32), atol=1e-6)


def test_a_finished_run_reruns_from_its_checkpoint_without_training(tmp_path, reference, monkeypatch):
    tw.run(tmp_path / "ck")
    calls = []
    step = T.Trainer.step
    monkeypatch.setattr(T.Trainer, "step", lambda self, *a: (calls.append(a[0]), step(self, *a))[1])
    again = tw.run(tmp_path / "ck")
    assert calls == []
    assert_identical(again, reference)


@pytest.mark.subprocess
def test_a_killed_run_resumes_bit_for_bit(tmp_path, reference, monkeypatch):
    folder = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, str(WORKER), str(folder), "--sleep", "0.05"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
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
    state = _checkpoint_state(folder)
    assert 10 <= state["step"] < 60 and state["step"] % tw.CHECKPOINT_EVERY == 0
    done = state["step"]
    calls = []
    step = T.Trainer.step
    monkeypatch.setattr(T.Trainer, "step", lambda self, *a: (calls.append(a[0]), step(self, *a))[1])
    resumed = tw.run(folder)
    assert calls == list(range(done, 60))  # resumed where the checkpoint was, not from the start
    assert_identical(resumed, reference)
    assert sorted(p.name for p in folder.iterdir()) == ["train-000000060.safetensors", "train.json"]


def test_an_interrupted_transcoder_run_resumes_bit_for_bit(tmp_path, monkeypatch):
    """In-process interruption of a TopK transcoder with a skip term and AuxK active (the dead
    counters and Adam's momentum must come back exactly), interrupted mid-way between checkpoints
    and in the second epoch."""
    x, _ = tw.planted(n=640, d=16, m=24, seed=5)
    y = torch.tanh(x @ torch.randn(16, 12, generator=torch.Generator().manual_seed(0)))
    settings = dict(d_sae=48, steps=40, batch_size=32, lr=5e-3, k=3, dead_tokens=64, skip=True, progress=False,
                    log_every=3)
    reference = train((x, y), "topk", **settings)
    assert isinstance(reference, Transcoder) and reference.W_skip is not None and reference.k == 3
    assert max(reference.training_log.dead) > 0  # AuxK was in play
    step = T.Trainer.step

    def interrupted(self, t, *a):
        if t == 27:
            raise KeyboardInterrupt
        return step(self, t, *a)

    monkeypatch.setattr(T.Trainer, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train((x, y), "topk", checkpoint_dir=tmp_path / "ck", checkpoint_every=7, **settings)
    assert _checkpoint_state(tmp_path / "ck")["step"] == 21  # the 20 batches of epoch 0, then 1 of epoch 1
    monkeypatch.setattr(T.Trainer, "step", step)
    resumed = train((x, y), "topk", checkpoint_dir=tmp_path / "ck", checkpoint_every=7, **settings)
    assert_identical(resumed, reference)


def test_a_checkpoint_with_other_settings_is_refused(tmp_path):
    folder = tmp_path / "ck"
    tw.run(folder, steps=20)
    before = (folder / "train.json").read_text()
    with pytest.raises(TrainingError, match=r"other settings: lr \(0\.01 there, 0\.02 now\).*another checkpoint_dir"):
        tw.run(folder, steps=20, lr=2e-2)
    with pytest.raises(TrainingError, match=r"other settings: .*kind \('jumprelu' there, 'topk' now\)"):
        train(tw.data(), "topk", d_sae=32, steps=20, seed=3, batch_size=64, lr=1e-2, progress=False,
              checkpoint_dir=folder)
    with pytest.raises(TrainingError, match=r"other settings: source\.x"):  # other data
        train(tw.data() * 2, **{**tw.SETTINGS, "steps": 20}, checkpoint_dir=folder)
    assert (folder / "train.json").read_text() == before  # a refusal leaves the checkpoint as it was
    (folder / "train.json").write_text("{not json")
    with pytest.raises(TrainingError, match="is not valid JSON"):
        tw.run(folder, steps=20)


# ---------------------------------------------------------------------- the training log
def test_the_log_reports_loss_l0_and_explained_variance(planted):
    x = planted[0][:4096]
    d = train(x, "topk", d_sae=64, steps=60, batch_size=128, lr=1e-2, k=3, log_every=10, progress=False)
    log = d.training_log
    assert isinstance(log, TrainingLog) and len(log) == 6
    assert log.step == [10, 20, 30, 40, 50, 60] and log["step"] == log.step
    assert set(log.final) == {"step", "loss", "mse", "l0", "explained_variance", "dead", "lr", "aux_loss"}
    assert log.explained_variance[-1] > log.explained_variance[0]
    assert all(2.5 <= v <= 3.0 for v in log.l0)  # k = 3 (a ReLU may zero one)
    # the log's explained variance (on the last training batches) agrees with the returned dictionary's
    assert explained_variance(d(x), x) == pytest.approx(log.final["explained_variance"], abs=0.05)
    assert log.settings["k"] == 3 and log.settings["d_sae"] == 64
    assert "explained variance" in repr(log)
    with pytest.raises(AttributeError, match="no column 'nope'"):
        log.nope
    jr = train(x, "jumprelu", d_sae=32, steps=7, batch_size=128, initial_threshold=0.1, progress=False)
    assert jr.training_log.step == [1, 2, 3, 4, 5, 6, 7]  # log_every defaults to steps // 100, at least 1
    assert "sparsity_coefficient" in jr.training_log.final and "aux_loss" not in jr.training_log.final


def test_the_progress_bar_shows_loss_l0_and_explained_variance(planted, capsys):
    train(planted[0][:1024], "topk", d_sae=16, steps=5, batch_size=128, k=2, progress=True)
    err = capsys.readouterr().err
    assert "train topk" in err and "5/5" in err
    assert "loss=" in err and "l0=" in err and "ev=" in err


# ---------------------------------------------------------------------- an activation store
class CharTokenizer:
    """One token per character (printable ASCII c -> 3 + ord(c) - 32); BOS is 2."""

    bos_id, pad_id, eos_id = 2, 0, 1

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([2] if bos else []) + [3 + (ord(c) - 32) % 95 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(int(i) - 3 + 32) for i in ids if int(i) >= 3)

    def to_str_tokens(self, ids) -> list[str]:
        return [self.decode([i]) or "<bos>" for i in ids]


DOCS = [f"Doc {i}: " + " ".join(["alpha", "beta", "river", "stone", "x=1;", "orbit"][(i * j) % 6]
                                   for j in range(3 + i % 7)) for i in range(40)]


@pytest.fixture(scope="module")
def model():
    m = make_model(TINY, seed=0, tokenizer=CharTokenizer())
    yield m
    assert not m.registry.active


@pytest.fixture(scope="module")
def store(model, tmp_path_factory) -> ActivationStore:
    """About 400 tokens of the tiny model's layer 2 (float32)."""
    out = tmp_path_factory.mktemp("harvest") / "h"
    return harvest(model, DOCS, [SITE, SITE_IN, SITE_OUT], out, context=16, batch_size=8, shard_tokens=128,
                   max_tokens=400, dtype=torch.float32, progress=False)


def _all(store: ActivationStore, site: str) -> torch.Tensor:
    return torch.cat(list(store.batches(site, 1 << 20, shuffle=False)))


def test_an_sae_and_a_transcoder_from_a_store_splice_into_the_model(model, store):
    assert store.manifest["n_tokens"] >= 300
    sae = train((store, SITE), "topk", d_sae=64, steps=150, batch_size=64, lr=1e-2, k=6, progress=False)
    tc = train((store, SITE_IN, SITE_OUT), "jumprelu", d_sae=64, steps=300, batch_size=64, lr=1e-2,
               initial_threshold=0.05, bandwidth=0.05, warmup_steps=100, sparsity_coefficient=0.1, progress=False)
    assert isinstance(sae, TopKSAE) and sae.site == SITE and sae.site_out is None
    assert isinstance(tc, Transcoder) and (tc.site, tc.site_out) == (SITE_IN, SITE_OUT) and tc.threshold is not None
    for d in (sae, tc):
        assert torch.allclose(d.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    x, x_in, x_out = _all(store, SITE), _all(store, SITE_IN), _all(store, SITE_OUT)
    assert explained_variance(sae(x), x) > 0.8
    ev = explained_variance(tc(x_in), x_out)
    assert ev > 0.7, f"the transcoder explains {ev:.3f} of the MLP output's variance"
    assert ev == pytest.approx(tc.training_log.final["explained_variance"], abs=0.1)
    # in the model: reading both, splicing with the error kept leaves the logits as they were
    ids = torch.tensor([CharTokenizer().encode("Doc 3: alpha river stone")])
    clean = model(ids)
    logits, feats = run_with_dictionaries(model, ids, [sae, tc], splice=True, keep_error=True)
    assert not model.registry.active
    assert torch.allclose(logits, clean, atol=1e-5, rtol=1e-5)
    assert feats[SITE].shape == (1, ids.shape[1], 64) and bool((feats[SITE] > 0).any())
    assert bool((feats[SITE_IN] > 0).any())
    spliced, _ = run_with_dictionaries(model, ids, [sae, tc], splice=True)  # the errors removed: logits move
    assert not torch.allclose(spliced, clean, atol=1e-4)
    assert torch.equal(model(ids), clean)


def test_store_training_is_seeded_and_batches_stay_aligned(store):
    settings = dict(d_sae=32, steps=12, batch_size=64, lr=1e-2, k=4, progress=False)
    a = train((store, SITE_IN, SITE_OUT), "topk", seed=4, **settings)
    b = train((store, SITE_IN, SITE_OUT), "topk", seed=4, **settings)
    c = train((store, SITE_IN, SITE_OUT), "topk", seed=5, **settings)
    assert_identical(a, b)
    assert not torch.equal(a.W_dec, c.W_dec)
    # the (input, output) batches a transcoder trains on are rows of the same tokens
    x_in, x_out = _all(store, SITE_IN), _all(store, SITE_OUT)
    src = T.make_source((store, SITE_IN, SITE_OUT))
    xb, yb = next(src.epoch(0, 64, 4, torch.device("cpu")))
    rows = [int((x_in == r).all(-1).nonzero()[0]) for r in xb[:8]]
    assert torch.equal(x_out[rows], yb[:8])


# ---------------------------------------------------------------------- errors
def test_bad_arguments_are_refused(planted):
    x = planted[0][:256]
    with pytest.raises(TrainingError, match=r"d_sae must be an int >= 1, got 0"):
        train(x, d_sae=0, steps=10)
    with pytest.raises(TrainingError, match=r"steps must be an int >= 1, got 0"):
        train(x, d_sae=8, steps=0)
    with pytest.raises(TrainingError, match=r"unknown kind 'relu'; train knows 'jumprelu', 'topk'"):
        train(x, "relu", d_sae=8, steps=10)
    with pytest.raises(TypeError, match=r"unknown option\(s\) bandwidth for kind 'topk' \(bandwidth belong"):
        train(x, "topk", d_sae=8, steps=10, bandwidth=0.1)
    with pytest.raises(TypeError, match=r"unknown option\(s\) learning_rate"):
        train(x, d_sae=8, steps=10, learning_rate=0.1)
    with pytest.raises(TrainingError, match=r"k must be an int in 1..d_sae=8, got 9"):
        train(x, "topk", d_sae=8, steps=10, k=9)
    with pytest.raises(TrainingError, match=r"skip=True is for transcoders"):
        train(x, d_sae=8, steps=10, skip=True)
    with pytest.raises(TrainingError, match=r"checkpoint_every needs checkpoint_dir"):
        train(x, d_sae=8, steps=10, checkpoint_every=5)


def test_sources_of_the_wrong_shape_are_refused(store):
    with pytest.raises(TrainingError, match=r"must be \[n, d\].*x has shape \(32,\)"):
        train(torch.randn(32), d_sae=8, steps=10)
    with pytest.raises(TrainingError, match=r"x has shape \(4, 8, 2\)"):
        train(torch.randn(4, 8, 2), d_sae=8, steps=10)
    with pytest.raises(TrainingError, match=r"x has shape \(0, 8\)"):
        train(torch.randn(0, 8), d_sae=8, steps=10)
    with pytest.raises(TrainingError, match=r"x_in has 10 rows and x_out 9"):
        train((torch.randn(10, 4), torch.randn(9, 4)), d_sae=8, steps=10)
    with pytest.raises(TrainingError, match=r"x_in must hold floats"):
        train((torch.ones(10, 4, dtype=torch.long), torch.randn(10, 4)), d_sae=8, steps=10)
    with pytest.raises(TrainingError, match=r"a tensor pair is \(x_in, x_out\).*got 3"):
        train((torch.randn(10, 4),) * 3, d_sae=8, steps=10)
    with pytest.raises(TypeError, match=r"source must be \(ActivationStore, site\).*got str"):
        train("harvest/", d_sae=8, steps=10)
    with pytest.raises(TrainingError, match=r"'blocks.9.resid_post' was not harvested; this store has"):
        train((store, "blocks.9.resid_post"), d_sae=8, steps=10)
    with pytest.raises(TrainingError, match=r"a store source is \(store, site\) or \(store, site_in, site_out\)"):
        train((store, SITE, SITE_IN, SITE_OUT), d_sae=8, steps=10)
    with pytest.raises(TrainingError, match=r"zero in every sampled row"):
        train(torch.zeros(64, 4), d_sae=8, steps=10, progress=False)


def test_non_finite_data_is_refused_naming_where(store, monkeypatch):
    x = torch.randn(100, 8)
    x[17, 3] = float("nan")
    x[40, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"x holds nan at row 17, column 3 \(2 non-finite values in all\)"):
        train(x, d_sae=8, steps=10)
    y = torch.randn(100, 8)
    y[5, 6] = float("-inf")
    with pytest.raises(NonFiniteError, match=r"x_out holds -inf at row 5, column 6"):
        train((torch.randn(100, 8), y), d_sae=8, steps=10)
    batches = ActivationStore.batches

    def poisoned(self, site, *a, **k):
        for i, b in enumerate(batches(self, site, *a, **k)):
            if site == SITE_OUT and i == 2:
                b = b.clone()
                b[7, 5] = float("nan")
            yield b

    monkeypatch.setattr(ActivationStore, "batches", poisoned)
    with pytest.raises(NonFiniteError, match=r"blocks.2.post_mlp_norm: batch 2 of epoch 0 .* holds nan at row 7, "
                                             r"column 5.*the store holds NaN or inf"):
        train((store, SITE_IN, SITE_OUT), d_sae=8, steps=10, batch_size=32, progress=False)


def test_a_diverging_run_is_reported(planted):
    with pytest.raises(NonFiniteError, match=r"training diverged by step \d+"):
        train(planted[0][:512], "topk", d_sae=16, steps=20, batch_size=64, k=2, lr=1e30, log_every=1,
              progress=False)


def test_trains_with_gradients_switched_off_globally():
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae = train(x, "topk", d_sae=16, steps=5, k=2, batch_size=128, progress=False)
    assert torch.equal(sae.W_dec, train(x, "topk", d_sae=16, steps=5, k=2, batch_size=128, progress=False).W_dec)


def test_a_checkpoint_from_before_the_l0_controller_resumes_bit_for_bit(tmp_path, monkeypatch):
    """Checkpoints written before ``log_mult`` existed (the demo transcoders' cache, a user's long
    run) resume exactly: without an ``l0=`` target the factor was always 1."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    x, _ = tw.planted(n=320, d=16, m=24, seed=6)
    settings = dict(d_sae=32, steps=20, batch_size=32, lr=5e-3, k=3, progress=False)
    reference = train(x, "topk", **settings)
    step = T.Trainer.step

    def interrupted(self, t, *a):
        if t == 13:
            raise KeyboardInterrupt
        return step(self, t, *a)

    monkeypatch.setattr(T.Trainer, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(x, "topk", checkpoint_dir=tmp_path / "ck", checkpoint_every=5, **settings)
    monkeypatch.setattr(T.Trainer, "step", step)
    for f in (tmp_path / "ck").glob("train-*.safetensors"):  # as the old trainer wrote them
        with safe_open(str(f), "pt") as handle:
            meta = handle.metadata()
        tensors = load_file(str(f))
        assert tensors.pop("log_mult") is not None
        save_file(tensors, str(f), metadata=meta)
    resumed = train(x, "topk", checkpoint_dir=tmp_path / "ck", checkpoint_every=5, **settings)
    assert_identical(resumed, reference)
