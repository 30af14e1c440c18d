"""Transcoders for a model in a few minutes on a CPU: harvest the MLPs' inputs and outputs from an
offline corpus (the standard library's docstrings), train a small TopK transcoder per layer
(:func:`demo_transcoders`) or one small cross-layer transcoder over every layer (:func:`demo_clt`),
and keep the result in a cache folder (a rerun, or another notebook, loads them in a second).

They are small and briefly trained (by default 512 features, 150 steps on 8192 tokens per
transcoder; the CLT 64 features per layer, TopK 16, 300 steps): enough to build and read attribution
graphs of the demo model, not a substitute for Gemma Scope 2's. Every step is kill-safe: the
harvest and each training resume where they stopped, and a result is in place only once its files
are complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..model import Gemma3
from ..model.demo import cache_root
from ..model.sites import block_site
from .clt import CrossLayerTranscoder
from .dictionary import Dictionary
from .io import load_dictionary, save_dictionary
from .training import TrainingLog, train


def _plan(model: Gemma3, layers: Sequence[int] | None, tokens: int, d_sae: int, k: int, steps: int, batch_size: int,
          lr: float, seed: int, folder: str | os.PathLike | None, corpus: Any) -> tuple[dict[str, Any], Path]:
    from ..data import model_fingerprint

    n = model.cfg.n_layers
    chosen = list(range(n)) if layers is None else sorted(set(int(i) for i in layers))
    if not chosen or not all(0 <= i < n for i in chosen):
        raise ValueError(f"layers must be layer numbers in 0..{n - 1}, got {layers!r}")
    settings = {"tokens": tokens, "d_sae": d_sae, "k": k, "steps": steps, "batch_size": batch_size, "lr": lr,
                "seed": seed, "layers": chosen, "model": model_fingerprint(model)}
    if corpus is not None:  # the default corpus is not named, so caches made before this option still match
        settings["corpus"] = getattr(corpus, "name", repr(corpus))
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return settings, Path(folder) if folder is not None else cache_root() / "transcoders" / key


def demo_transcoders(model: Gemma3, layers: Sequence[int] | None = None, *, tokens: int = 8192, d_sae: int = 512,
                     k: int = 16, steps: int = 150, batch_size: int = 256, lr: float = 1e-3, seed: int = 0,
                     folder: str | os.PathLike | None = None, corpus: Any = None,
                     progress: bool = True) -> list[Dictionary]:
    """One TopK transcoder per layer in ``layers`` (default all), reading ``blocks.L.pre_mlp_norm``
    and predicting ``blocks.L.post_mlp_norm``, trained on ``tokens`` tokens of
    ``corpus`` (default :func:`interp.data.stdlib_corpus`; anything
    :class:`~interp.data.Corpus` takes). Cached in ``folder`` (default: a folder under
    :func:`interp.model.demo.cache_root` named by the model's fingerprint and these settings); the harvested store
    stays there too (``folder/store``, about ``tokens * layers * 2 * d_model * 2`` bytes) for
    dashboards and graph hovers.

    >>> tcs = demo_transcoders(interp.load("demo"))  # doctest: +SKIP
    """
    from ..data import harvest, stdlib_corpus

    settings, root = _plan(model, layers, tokens, d_sae, k, steps, batch_size, lr, seed, folder, corpus)
    chosen = settings["layers"]
    done = {i: root / f"layer_{i}" for i in chosen}
    if not all((p / "cfg.json").is_file() for p in done.values()):
        root.mkdir(parents=True, exist_ok=True)
        (root / "settings.json").write_text(json.dumps(settings, indent=1), encoding="utf-8")
        sites = [block_site(i, kind) for i in chosen for kind in ("pre_mlp_norm", "post_mlp_norm")]
        store = harvest(model, stdlib_corpus() if corpus is None else corpus, sites, root / "store", context=128,
                        max_tokens=tokens, model_source="demo", progress=progress)
        for i in chosen:
            if (done[i] / "cfg.json").is_file():
                continue
            tc = train((store, block_site(i, "pre_mlp_norm"), block_site(i, "post_mlp_norm")), "topk", d_sae=d_sae,
                       steps=steps, k=k, batch_size=batch_size, lr=lr, seed=seed + i, progress=progress,
                       checkpoint_dir=root / f".train_{i}")
            partial = root / f".layer_{i}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            save_dictionary(tc, partial, saelens_readable=False)  # a TopK transcoder: SAELens has none
            shutil.rmtree(done[i], ignore_errors=True)  # an incomplete one, left by hand
            os.replace(partial, done[i])  # a layer is done only once its files are complete
            shutil.rmtree(root / f".train_{i}", ignore_errors=True)
    loaded: list[Dictionary] = []
    for i in chosen:
        found = load_dictionary(done[i], model=model)
        assert isinstance(found, Dictionary), f"{done[i]} holds a {type(found).__name__}, not a transcoder"
        loaded.append(found)
    return loaded


def demo_store(model: Gemma3, layers: Sequence[int] | None = None, *, tokens: int = 8192, d_sae: int = 512,
               k: int = 16, steps: int = 150, batch_size: int = 256, lr: float = 1e-3, seed: int = 0,
               folder: str | os.PathLike | None = None, corpus: Any = None, progress: bool = True) -> Any:
    """The :class:`~interp.data.ActivationStore` that :func:`demo_transcoders` (same arguments)
    harvests, training the transcoders first if they are not cached yet."""
    from ..data import ActivationStore

    demo_transcoders(model, layers, tokens=tokens, d_sae=d_sae, k=k, steps=steps, batch_size=batch_size, lr=lr,
                     seed=seed, folder=folder, corpus=corpus, progress=progress)
    return ActivationStore(_plan(model, layers, tokens, d_sae, k, steps, batch_size, lr, seed, folder, corpus)[1]
                           / "store")


def _clt_plan(model: Gemma3, settings: dict[str, Any], folder: str | os.PathLike | None,
              corpus: Any) -> tuple[dict[str, Any], Path]:
    from ..data import model_fingerprint

    settings = {**settings, "model": model_fingerprint(model)}
    if corpus is not None:
        settings["corpus"] = getattr(corpus, "name", repr(corpus))
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return settings, Path(folder) if folder is not None else cache_root() / "clt" / key


def demo_clt(model: Gemma3, *, tokens: int = 8192, d_sae: int = 64, steps: int = 300, batch_size: int = 256,
             lr: float = 2e-3, k: int | None = 16, l0: float | None = None, skip: bool = True, seed: int = 0,
             folder: str | os.PathLike | None = None, corpus: Any = None,
             progress: bool = True) -> CrossLayerTranscoder:
    """A cross-layer transcoder over every layer of ``model`` (``d_sae`` features per layer; TopK,
    the ``k`` largest of each layer, after a ReLU; with ``k=None`` JumpReLU, steered to ``l0``
    features per layer and token when given; ``skip`` adds the affine skip term), trained by
    :func:`~interp.features.training.train` (``kind="clt"``) on ``tokens`` tokens of ``corpus``
    (default :func:`interp.data.stdlib_corpus`). Cached in ``folder`` (default: a folder under
    :func:`interp.model.demo.cache_root` named by the model's fingerprint and these settings) in
    Gemma Scope 2's ``clt/`` layout (``folder/clt``; load it elsewhere with
    :meth:`CrossLayerTranscoder.load`); the harvested store stays in ``folder/store`` (about
    ``tokens * n_layers * 2 * d_model * 2`` bytes, 377 MB for the demo model at the default) for
    :func:`interp.features.evaluate` and dashboards. Returned in memory (``lazy=False``), sites
    resolved through ``model``, with the run's ``training_log``.

    The defaults (TopK with the skip term, lr 2e-3, batches of 256) are what reconstructed the demo
    model's MLP outputs best among the short runs tried on a CPU; the JumpReLU recipe needs far more
    steps than a demo has to bring its L0 and error down.

    Kill-safe like :func:`demo_transcoders`: the harvest resumes, the training resumes from its
    checkpoint (``folder/.train``), and ``folder/clt`` appears only once complete.

    >>> model = interp.load("demo")  # doctest: +SKIP
    >>> clt = demo_clt(model)  # doctest: +SKIP
    >>> interp.features.evaluate(model, clt, demo_clt_store(model), ce_tokens=4096)  # doctest: +SKIP
    """
    from ..data import harvest, stdlib_corpus

    settings, root = _clt_plan(model, {"tokens": tokens, "d_sae": d_sae, "steps": steps, "batch_size": batch_size,
                                       "lr": lr, "l0": l0, "k": k, "skip": skip, "seed": seed}, folder, corpus)
    done = root / "clt"
    if not (done / "config.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        (root / "settings.json").write_text(json.dumps(settings, indent=1), encoding="utf-8")
        n = model.cfg.n_layers
        sites = [block_site(i, kind) for kind in ("pre_mlp_norm", "post_mlp_norm") for i in range(n)]
        store = harvest(model, stdlib_corpus() if corpus is None else corpus, sites, root / "store", context=128,
                        max_tokens=tokens, model_source="demo", progress=progress)
        options: dict[str, Any] = {"k": k} if k is not None else {"l0": l0}
        clt = train(store, "clt", d_sae=d_sae, steps=steps, batch_size=batch_size, lr=lr, skip=skip, seed=seed,
                    progress=progress, checkpoint_dir=root / ".train", **options)
        partial = root / ".clt.partial"
        shutil.rmtree(partial, ignore_errors=True)
        clt.save(partial)
        log: TrainingLog = getattr(clt, "training_log")  # noqa: B009 (nn.Module's types say tensors)
        (partial / "training_log.json").write_text(json.dumps(log.to_dict(), indent=1),
                                                   encoding="utf-8")
        shutil.rmtree(done, ignore_errors=True)  # an incomplete one, left by hand
        os.replace(partial, done)  # done only once its files are complete
        shutil.rmtree(root / ".train", ignore_errors=True)
    out = CrossLayerTranscoder.load(done, lazy=False, model=model)
    saved = json.loads((done / "training_log.json").read_text(encoding="utf-8"))
    setattr(out, "training_log", TrainingLog(**saved))  # noqa: B010 (a plain attribute, as train sets it)
    return out


def demo_clt_store(model: Gemma3, *, tokens: int = 8192, d_sae: int = 64, steps: int = 300, batch_size: int = 256,
                   lr: float = 2e-3, k: int | None = 16, l0: float | None = None, skip: bool = True, seed: int = 0,
                   folder: str | os.PathLike | None = None, corpus: Any = None, progress: bool = True) -> Any:
    """The :class:`~interp.data.ActivationStore` that :func:`demo_clt` (same arguments) harvests,
    training the CLT first if it is not cached yet."""
    from ..data import ActivationStore

    chosen: dict[str, Any] = {"tokens": tokens, "d_sae": d_sae, "steps": steps, "batch_size": batch_size, "lr": lr,
                              "l0": l0, "k": k, "skip": skip, "seed": seed}
    demo_clt(model, folder=folder, corpus=corpus, progress=progress, **chosen)
    return ActivationStore(_clt_plan(model, chosen, folder, corpus)[1] / "store")


__all__ = ["demo_transcoders", "demo_store", "demo_clt", "demo_clt_store"]
