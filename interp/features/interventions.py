"""Dictionaries on the registry: read feature activations, splice reconstructions in, steer with a
feature, ablate or clamp features, at chosen positions, in any run (``generate`` included).

Everything is a hook list (``[(site, fn), ...]``) that composes with other hooks:

- a dictionary's *read* hook (at ``site``) encodes the activation and stores the features;
- its *write* hook (at ``site_out`` for a transcoder, at ``site`` for an SAE) changes what the
  model carries on: ``splice=True`` replaces it by the dictionary's output (``keep_error=True``
  adds the reconstruction error back, so the output is unchanged while the features sit on the
  path); edits change the features and add the change of the output, ``(edited - acts) @ W_dec``,
  so an edit never also removes the reconstruction error.

>>> import torch
>>> from interp.model import Gemma3, Gemma3Config
>>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=16, d_mlp=32, n_heads=2, n_kv_heads=1, d_head=8,
...                                     vocab_size=50))
>>> sae = JumpReLUSAE.random(16, 64, site="blocks.1.resid_post", seed=0)
>>> logits, feats = run_with_dictionaries(m, torch.tensor([[2, 5, 7]]), [sae])
>>> feats["blocks.1.resid_post"].shape
torch.Size([1, 3, 64])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..hooks import ActivationCache, Site, positions_mask
from ..model import Gemma3
from ..model.inputs import Prompt
from .clt import CrossLayerTranscoder
from .dictionary import Dictionary, JumpReLUSAE
from .io import check_fits

Hook = Callable[[torch.Tensor, Site], torch.Tensor | None]


def _flat(x: torch.Tensor, site: Site, width: int) -> torch.Tensor:
    """``x`` as ``[..., width]``: heads x head_dim flattened, as Hugging Face's o_proj input."""
    if x.shape[-1] == width:
        return x
    if site.head_axis == x.dim() - 2 and x.shape[-2] * x.shape[-1] == width:
        return x.flatten(-2)
    raise ValueError(f"the dictionary for {site.name} reads width {width}, but the site has width {x.shape[-1]}")


def _token_mask(x: torch.Tensor, site: Site, positions: Any) -> torch.Tensor | None:
    """Bool ``[1, seq, 1]`` of the tokens selected by ``positions`` (None: every token)."""
    if positions is None:
        return None
    total, held = site.whole_sequence(x.shape[site.seq_axis])
    return positions_mask(positions, total)[held].to(x.device)[None, :, None]


def _add_at(new: torch.Tensor, delta: torch.Tensor, site: Site, positions: Any) -> torch.Tensor:
    """``new + delta`` at the tokens ``positions`` selects (every token when None)."""
    mask = _token_mask(new, site, positions)
    if mask is not None:
        delta = delta * mask.to(delta.dtype)
    return new.to(delta.dtype) + delta


def dictionary_hooks(d: Dictionary | CrossLayerTranscoder, *, features: dict[str, torch.Tensor] | None = None,
                     splice: bool = False, keep_error: bool = False, ablate: Sequence[Any] = (),
                     clamp: Mapping[Any, float] | None = None, steer: Mapping[Any, float] | None = None,
                     positions: Any = None) -> list[tuple[str, Hook]]:
    """Hooks that run dictionary ``d`` in the model (sites resolved already, e.g. by :func:`check_fits`).

    ``features`` (a dict) receives the activations ``[..., d_sae]`` under ``d.site``. ``ablate``
    (feature indices) sets features to 0, ``clamp`` ({feature: value}) to a value, ``steer``
    ({feature: scale}) adds ``scale * W_dec[feature]`` to the output; all only at ``positions``
    (the position rule of :mod:`interp.hooks.positions`; default every token).

    A :class:`CrossLayerTranscoder` reads every layer's MLP input and writes every MLP output; its
    features are addressed ``(layer, index)`` (``ablate=[(3, 17)]``, ``steer={(3, 17): 4.0}``) and
    ``features`` receives each layer's activations under that layer's input site.
    """
    if isinstance(d, CrossLayerTranscoder):
        return clt_hooks(d, features=features, splice=splice, keep_error=keep_error, ablate=ablate, clamp=clamp,
                         steer=steer, positions=positions)
    if d.site is None:
        raise ValueError("this dictionary names no site; set .site (e.g. 'blocks.6.resid_post')")
    clamp = dict(clamp or {})
    steer = dict(steer or {})
    edits = bool(ablate or clamp)
    for f in [*ablate, *clamp, *steer]:
        if not 0 <= int(f) < d.d_sae:
            raise IndexError(f"feature {f} is outside the dictionary's {d.d_sae} features")
    state: dict[str, torch.Tensor] = {}
    writes = d.writes
    assert writes is not None

    def read(x: torch.Tensor, site: Site) -> torch.Tensor | None:
        flat = _flat(x, site, d.d_in)
        acts = d.encode(flat)
        if features is not None:
            features[d.site or site.name] = acts
        state["acts"] = acts
        state["x"] = flat
        if writes == site.name:
            return write(x, site)
        return None

    def write(y: torch.Tensor, site: Site) -> torch.Tensor | None:
        if "acts" not in state:
            raise RuntimeError(f"{writes} fired before the dictionary read {d.site}; a transcoder must read an "
                               "earlier site than it writes")
        acts, flat_in = state["acts"], state["x"]
        out = _flat(y, site, d.d_out) if writes == d.site else y.reshape(*y.shape[:-1], -1)
        new = out
        if splice:
            recon = d(flat_in)
            new = recon + (out.to(recon.dtype) - recon).detach() if keep_error else recon
        delta = None
        if edits:
            edited = acts.clone()
            if ablate:
                edited[..., list(ablate)] = 0
            for f, value in clamp.items():
                edited[..., f] = value
            delta = (edited - acts) @ d.W_dec
        if steer:
            fs = torch.tensor(list(steer), device=d.W_dec.device)
            scales = torch.tensor(list(steer.values()), dtype=d.W_dec.dtype, device=d.W_dec.device)
            add = (scales[:, None] * d.W_dec[fs]).sum(0)
            delta = add if delta is None else delta + add
        if delta is not None:
            new = _add_at(new, delta, site, positions)
        if new is out:
            return None
        return new.to(y.dtype).reshape(y.shape)

    hooks: list[tuple[str, Hook]] = [(d.site, read)]
    if writes != d.site and (splice or edits or steer):
        hooks.append((writes, write))
    return hooks


def _clt_feature(clt: CrossLayerTranscoder, key: Any) -> tuple[int, int]:
    if not (isinstance(key, tuple) and len(key) == 2):
        raise TypeError(f"a CLT's features are addressed (layer, index); got {key!r}")
    layer, index = int(key[0]), int(key[1])
    if not 0 <= layer < clt.n_layers or not 0 <= index < clt.widths[layer]:
        raise IndexError(f"feature {key!r} is outside the CLT (layers 0..{clt.n_layers - 1}, layer widths "
                         f"{clt.widths[:4]}{'...' if clt.n_layers > 4 else ''})")
    return layer, index


def clt_hooks(clt: CrossLayerTranscoder, *, features: dict[str, torch.Tensor] | None = None, splice: bool = False,
              keep_error: bool = False, ablate: Sequence[Any] = (), clamp: Mapping[Any, float] | None = None,
              steer: Mapping[Any, float] | None = None, positions: Any = None) -> list[tuple[str, Hook]]:
    """Hooks running a cross-layer transcoder (see :func:`dictionary_hooks`): layer ``i``'s MLP
    input is encoded into ``f_i``; MLP output ``o`` becomes ``sum_{i<=o} f_i @ W_dec_i[:, o] + b_dec_o``
    (+ the skip term) when spliced, and moves by the edited features' decoder vectors when edited.

    >>> from interp.model import Gemma3, Gemma3Config
    >>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=8, d_mlp=16, n_heads=1, n_kv_heads=1, d_head=8,
    ...                                     vocab_size=20))
    >>> clt = CrossLayerTranscoder.random(2, 8, 16)
    >>> check_fits(clt, m)
    >>> [name for name, _ in clt_hooks(clt, splice=True, ablate=[(0, 3)])]
    ['blocks.0.pre_mlp_norm', 'blocks.1.pre_mlp_norm', 'blocks.0.post_mlp_norm', 'blocks.1.post_mlp_norm']
    """
    edits: dict[int, list[tuple[int, float]]] = {}
    for key in ablate:
        layer, index = _clt_feature(clt, key)
        edits.setdefault(layer, []).append((index, 0.0))
    for key, value in (clamp or {}).items():
        layer, index = _clt_feature(clt, key)
        edits.setdefault(layer, []).append((index, float(value)))
    steers = [(*_clt_feature(clt, key), float(scale)) for key, scale in (steer or {}).items()]
    state: dict[int, dict[str, torch.Tensor]] = {}

    def read(layer: int) -> Hook:
        def hook(x: torch.Tensor, site: Site) -> None:
            acts = clt.encode(layer, x)
            if features is not None:
                features[clt.sites_in[layer]] = acts
            state[layer] = {"x": x, "acts": acts}
        return hook

    def write(o: int) -> Hook:
        def hook(y: torch.Tensor, site: Site) -> torch.Tensor | None:
            if any(i not in state for i in range(o + 1)):
                raise RuntimeError(f"{site.name} fired before the CLT read the MLP inputs of layers 0..{o}")
            new = y
            if splice:
                recon = clt.decode([state[i]["acts"] for i in range(o + 1)], o)
                skip = clt.skip(o, state[o]["x"])
                recon = recon if skip is None else recon + skip
                new = recon + (y.to(recon.dtype) - recon).detach() if keep_error else recon
            delta = None
            for i, changes in edits.items():
                if i > o:
                    continue
                acts = state[i]["acts"]
                edited = acts.clone()
                for index, value in changes:
                    edited[..., index] = value
                d = (edited - acts) @ clt.decoder(i, o)
                delta = d if delta is None else delta + d
            for i, index, scale in steers:
                if i <= o:
                    d = scale * clt.decoder_rows(i, [index])[0, o - i]
                    delta = d if delta is None else delta + d
            if delta is not None:
                new = _add_at(new, delta, site, positions)
            return None if new is y else new.to(y.dtype)
        return hook

    hooks: list[tuple[str, Hook]] = [(clt.sites_in[i], read(i)) for i in range(clt.n_layers)]
    if splice or edits or steers:
        hooks += [(clt.sites_out[o], write(o)) for o in range(clt.n_layers)]
    return hooks


def run_with_dictionaries(model: Gemma3, prompt: Prompt, dictionaries: Sequence[Dictionary | CrossLayerTranscoder], *,
                          splice: bool = False, keep_error: bool = False,
                          ablate: Mapping[int, Sequence[Any]] | None = None,
                          clamp: Mapping[int, Mapping[Any, float]] | None = None,
                          steer: Mapping[int, Mapping[Any, float]] | None = None, positions: Any = None,
                          **kwargs: Any) -> tuple[torch.Tensor, ActivationCache]:
    """Run ``model`` with ``dictionaries`` (SAEs, transcoders, cross-layer transcoders) reading their sites; returns
    ``(logits, feature activations by site)``. ``splice``/``keep_error`` as in
    :func:`dictionary_hooks`; ``ablate``, ``clamp`` and ``steer`` are keyed by the dictionary's
    index in ``dictionaries`` (e.g. ``steer={0: {123: 4.0}}``). Other keywords go to ``forward``.
    """
    feats: dict[str, torch.Tensor] = {}
    hooks: list[tuple[str, Hook]] = []
    for i, d in enumerate(dictionaries):
        check_fits(d, model)
        hooks += dictionary_hooks(d, features=feats, splice=splice, keep_error=keep_error,
                                  ablate=(ablate or {}).get(i, ()), clamp=(clamp or {}).get(i),
                                  steer=(steer or {}).get(i), positions=positions)
    logits = model.run_with_hooks(prompt, hooks, **kwargs)
    return logits, ActivationCache(feats, layer_format=model.registry.names.layer_format)


def run_with_saes(model: Gemma3, prompt: Prompt, saes: Sequence[Dictionary], **kwargs: Any) -> tuple[torch.Tensor,
                                                                                             ActivationCache]:
    """:func:`run_with_dictionaries` (the name SAELens users know)."""
    return run_with_dictionaries(model, prompt, saes, **kwargs)


__all__ = ["dictionary_hooks", "clt_hooks", "run_with_dictionaries", "run_with_saes", "JumpReLUSAE"]
