"""Transcoders for a model in a few minutes on a CPU: harvest the MLPs' inputs and outputs from an
offline corpus (the standard library's docstrings), train a small TopK transcoder per layer, and
keep the result in a cache folder (a rerun, or another notebook, loads them in a second).

They are small and briefly trained (by default 512 features, 150 steps on 8192 tokens): enough to
build and read attribution graphs of the demo model, not a substitute for Gemma Scope 2's. Every
step is kill-safe: the harvest and each layer's training resume where they stopped.
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
from .dictionary import Dictionary
from .io import load_dictionary, save_dictionary
from .training import train


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


__all__ = ["demo_transcoders", "demo_store"]
