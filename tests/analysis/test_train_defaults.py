"""interp.features.training with its DEFAULT recipe: planted features recovered at data scales
0.01, 1 and 100, several sparsities and widths, both kinds (no coefficient, threshold, bandwidth or
lr tuned to the data); the ``l0=`` target controller (and its checkpointed state); the end-of-run
warnings.

The fast cases are small (32 directions in 16 dimensions, 2,000-3,000 steps of 128 vectors); the
sparsity and width grid is ``slow``; the issue's full-size case (512 directions in 64 dimensions,
4,000 steps of 1,024) is ``bench/train_planted.py``.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
import train_worker as tw

from interp.features.training import train

T = importlib.import_module("interp.features.training")
BATCH = 128


def recovery(d, directions: torch.Tensor) -> float:
    """Mean over the true directions of the best cosine with a learned decoder row."""
    return float((directions @ d.W_dec.T).max(dim=1).values.mean())


def l0_of(d, x: torch.Tensor) -> float:
    return float((d.encode(x) > 0).sum(-1).float().mean())


@pytest.fixture(scope="module")
def data():
    """x [8192, 16]: 2 of 32 planted directions per vector, and the directions."""
    return tw.planted(n=8192, d=16, m=32, active=2, seed=1)


@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
def test_jumprelu_defaults_recover_planted_features_at_any_scale(data, scale):
    x, directions = data
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a good run warns of nothing
        d = train(x * scale, "jumprelu", d_sae=64, steps=2000, batch_size=BATCH, progress=False)
    assert recovery(d, directions) >= 0.93
    assert 1.2 <= l0_of(d, x * scale) <= 3.0  # 2 planted per vector
    assert d.training_log.warnings == []
    # the old defaults (lr 2e-4, threshold and bandwidth 0.001) left the thresholds far below the
    # pre-activations: L0 in the tens. The thresholds now sit at the data's scale
    assert float(d.threshold.median()) > 0.1 * float((x * scale).norm(dim=-1).mean())


@pytest.mark.parametrize("scale", [1.0, pytest.param(0.01, marks=pytest.mark.slow),
                                   pytest.param(100.0, marks=pytest.mark.slow)])
def test_topk_defaults_recover_planted_features(data, scale):
    x, directions = data
    d = train(x * scale, "topk", d_sae=64, steps=3000, batch_size=BATCH, k=4, progress=False)
    assert recovery(d, directions) >= 0.8  # 0.84 measured (an untrained dictionary: < 0.6)
    assert d.training_log.warnings == []


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["jumprelu", "topk"])
@pytest.mark.parametrize("d, m, active, d_sae", [(16, 32, 4, 64), (24, 48, 3, 48), (24, 48, 3, 192)])
def test_defaults_recover_planted_features_across_sparsities_and_widths(kind, d, m, active, d_sae):
    x, directions = tw.planted(n=16384, d=d, m=m, active=active, seed=2)
    extra = {"k": 2 * active} if kind == "topk" else {}
    sae = train(x, kind, d_sae=d_sae, steps=4000, batch_size=256, progress=False, **extra)
    # TopK's default lr (2e-4) is slow on these small problems: 0.73 measured for 4 of 32 in 16
    # dimensions, 0.83 at d_sae = m = 48; JumpReLU passed 0.85 on all three
    assert recovery(sae, directions) >= (0.85 if kind == "jumprelu" else 0.7)


# ---------------------------------------------------------------------- the l0 target
@pytest.mark.parametrize("target", [1.0])
def test_an_l0_target_is_reached(data, target):
    """The default coefficient gives L0 ~1.8 here (2 planted per vector); the target 1.0 needs a
    larger one, which the controller finds."""
    x, directions = data
    d = train(x, "jumprelu", d_sae=64, steps=2000, batch_size=BATCH, l0=target, progress=False)
    log = d.training_log
    # measured: 0.81 here (19% low); 5.96 for a target of 6 on 128 directions in 32 dimensions
    assert abs(log.final["l0"] - target) <= 0.3 * target
    assert abs(l0_of(d, x) - target) <= 0.3 * target
    assert log.sparsity_coefficient[-1] > 1.0  # the controller raised lambda from its start, 1.0
    assert log.warnings == []


def test_the_controller_state_is_checkpointed_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    x = tw.data()
    settings = dict(d_sae=32, steps=60, batch_size=64, l0=3.0, warmup_steps=10, progress=False, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 60 steps are too few to reach the target; that warns
        reference = train(x, "jumprelu", **settings)
        assert reference.training_log.sparsity_coefficient[-1] != 1.0
        step = T.Trainer.step

        def crash(self, t, *a):
            if t == 35:
                raise KeyboardInterrupt
            return step(self, t, *a)

        monkeypatch.setattr(T.Trainer, "step", crash)
        with pytest.raises(KeyboardInterrupt):
            train(x, "jumprelu", checkpoint_dir=tmp_path, checkpoint_every=10, **settings)
        monkeypatch.setattr(T.Trainer, "step", step)
        resumed = train(x, "jumprelu", checkpoint_dir=tmp_path, checkpoint_every=10, **settings)
    assert torch.equal(resumed.threshold, reference.threshold) and torch.equal(resumed.W_dec, reference.W_dec)
    assert resumed.training_log.records == reference.training_log.records


def test_l0_is_checked_and_is_not_a_topk_option(data):
    x = data[0][:512]
    with pytest.raises(T.TrainingError, match="l0=64.0 must be below d_sae=64"):
        train(x, "jumprelu", d_sae=64, steps=1, l0=64, progress=False)
    with pytest.raises(T.TrainingError, match="l0 must be a finite number > 0"):
        train(x, "jumprelu", d_sae=64, steps=1, l0=0, progress=False)
    with pytest.raises(TypeError, match=r"a TopK SAE's L0 is k \(k=...\)"):
        train(x, "topk", d_sae=64, steps=1, l0=4, progress=False)


# ---------------------------------------------------------------------- warnings
def test_most_features_dead_warns_and_is_logged(data):
    x = data[0][:4096]
    with pytest.warns(UserWarning, match=r"of 32 features are dead") as caught:
        d = train(x, "jumprelu", d_sae=32, steps=150, batch_size=BATCH, sparsity_coefficient=1e4, warmup_steps=0,
                  lr=0.1, dead_tokens=1024, progress=False)
    assert d.training_log.final["dead"] > 16
    assert [str(w.message) for w in caught] == d.training_log.warnings
    assert d.training_log.to_dict()["warnings"] == d.training_log.warnings


def test_an_l0_far_from_its_target_warns(data):
    x = data[0][:4096]
    with pytest.warns(UserWarning, match=r"the L0 ended at .*, far from the target l0=8: train longer") as caught:
        d = train(x, "jumprelu", d_sae=64, steps=10, batch_size=BATCH, l0=8, progress=False)
    assert len(caught) == 1 and d.training_log.warnings == [str(caught[0].message)]
