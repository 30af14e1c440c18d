"""Sparse autoencoders on the registry: JumpReLU SAEs (the Gemma Scope architecture), loaded
from safetensors or npz, read at a site or spliced into the model.

An SAE reads one site (``blocks.12.resid_post``; Hugging Face spellings such as
``model.layers.12`` resolve through the registry's aliases), encodes it into sparse feature
activations, and decodes them back. :func:`run_with_saes` caches the feature activations and,
with ``splice=True``, replaces the site by the reconstruction (``keep_error=True`` adds the
reconstruction error back, so the output is unchanged but gradients and interventions flow
through the features).

>>> import torch
>>> from interp.model import Gemma3, Gemma3Config
>>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=16, d_mlp=32, n_heads=2,
...     n_kv_heads=1, d_head=8, vocab_size=50))
>>> sae = JumpReLUSAE.random(d_in=16, d_sae=64, site="blocks.1.resid_post", seed=0)
>>> logits, feats = run_with_saes(m, torch.tensor([[2, 5, 7]]), [sae])
>>> feats["blocks.1.resid_post"].shape
torch.Size([1, 3, 64])
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .hooks import ActivationCache, Site
from .model import Gemma3
from .tokens import Top

_KEYS = ("w_enc", "w_dec", "b_enc", "b_dec", "threshold")


class JumpReLUSAE(nn.Module):
    """``acts = JumpReLU(x @ W_enc + b_enc)`` (a feature fires only above its threshold);
    ``x_hat = acts @ W_dec + b_dec``.

    ``site`` is the registry name the SAE reads (it may be set later).

    >>> sae = JumpReLUSAE.random(d_in=4, d_sae=8, seed=0)
    >>> x = torch.randn(2, 4)
    >>> sae.decode(sae.encode(x)).shape
    torch.Size([2, 4])
    """

    def __init__(self, w_enc: torch.Tensor, w_dec: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                 threshold: torch.Tensor, site: str | None = None):
        super().__init__()
        d_in, d_sae = w_enc.shape
        expected = {"w_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
        for name, tensor in (("w_dec", w_dec), ("b_enc", b_enc), ("b_dec", b_dec), ("threshold", threshold)):
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"SAE tensor {name} has shape {tuple(tensor.shape)}; with w_enc {tuple(w_enc.shape)} "
                                 f"it must be {expected[name]}")
        self.w_enc, self.w_dec = nn.Parameter(w_enc, requires_grad=False), nn.Parameter(w_dec, requires_grad=False)
        self.b_enc, self.b_dec = nn.Parameter(b_enc, requires_grad=False), nn.Parameter(b_dec, requires_grad=False)
        self.threshold = nn.Parameter(threshold, requires_grad=False)
        self.site = site

    @property
    def d_in(self) -> int:
        """Width of the site the SAE reads."""
        return self.w_enc.shape[0]

    @property
    def d_sae(self) -> int:
        """Number of features."""
        return self.w_enc.shape[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``[..., d_sae]`` (zero below each feature's threshold)."""
        pre = x.to(self.w_enc.dtype) @ self.w_enc + self.b_enc
        return pre * (pre > self.threshold)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``[..., d_in]``."""
        return acts @ self.w_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``x``: ``decode(encode(x))``."""
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ construction
    @classmethod
    def random(cls, d_in: int, d_sae: int, site: str | None = None, seed: int = 0) -> JumpReLUSAE:
        """Random weights (for tests and shapes; real SAEs come from :meth:`from_file`)."""
        gen = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(d_sae, d_in, generator=gen)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        return cls(w_dec.T.clone(), w_dec, torch.zeros(d_sae), torch.zeros(d_in),
                   torch.rand(d_sae, generator=gen) * 0.1, site)

    @classmethod
    def from_file(cls, path: str | Path, site: str | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> JumpReLUSAE:
        """Load ``params.safetensors`` or ``params.npz`` (Gemma Scope layouts: keys ``w_enc``,
        ``w_dec``, ``b_enc``, ``b_dec``, ``threshold`` in any letter case). ``site`` defaults to
        the hook point named in a ``config.json`` beside the file, if there is one.

        npz files are read with ``allow_pickle=False``: nothing in them is executed.
        """
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path))
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                raw = {k: torch.from_numpy(data[k]) for k in data.files}
        else:
            raise ValueError(f"{path.name}: an SAE is read from .safetensors or .npz")
        by_key = {k.lower(): v for k, v in raw.items()}
        missing = [k for k in _KEYS if k not in by_key]
        if missing:
            raise KeyError(f"{path.name} lacks SAE tensors {missing} (has {sorted(raw)}); expected "
                           "w_enc [d_in, d_sae], w_dec [d_sae, d_in], b_enc, b_dec, threshold")
        if site is None:
            site = _site_from_config(path.parent / "config.json")
        tensors = {k: by_key[k].to(device=device, dtype=dtype) for k in _KEYS}
        return cls(**tensors, site=site)

    @classmethod
    def from_hub(cls, repo_id: str, filename: str, site: str | None = None, **kwargs: Any) -> JumpReLUSAE:
        """Download one SAE file with huggingface_hub and load it, for example
        ``JumpReLUSAE.from_hub("google/gemma-scope-2-1b-pt",
        "resid_post_all/layer_12_width_16k_l0_big/params.safetensors", site="blocks.12.resid_post")``.
        """
        try:
            from huggingface_hub import hf_hub_download
        except ImportError as e:
            raise ImportError("loading SAEs from the hub needs huggingface_hub: "
                              "pip install 'gemma3-interp[hub]'") from e
        path = Path(hf_hub_download(repo_id, filename))
        try:  # the config beside it names the hook point, when the release has one
            hf_hub_download(repo_id, str(Path(filename).with_name("config.json")))
        except Exception:  # noqa: BLE001 - optional file
            pass
        return cls.from_file(path, site=site, **kwargs)


def _site_from_config(path: Path) -> str | None:
    if not path.exists():
        return None
    config = json.loads(path.read_text())
    for key in ("hf_hook_point_in", "hook_point", "hook_name", "site"):
        value = config.get(key)
        if isinstance(value, str):
            return value.removesuffix(".output")
    return None


def run_with_saes(model: Gemma3, prompt: Any, saes: Sequence[JumpReLUSAE], *, splice: bool = False,
                  keep_error: bool = False, **kwargs: Any) -> tuple[torch.Tensor, ActivationCache]:
    """Run ``model`` with ``saes`` reading their sites; return ``(logits, feature activations)``,
    the activations an :class:`~interp.hooks.ActivationCache` by canonical site name.

    With ``splice=True`` each site is replaced by its SAE's reconstruction (the model then runs
    on what the SAE understood); ``keep_error=True`` adds the reconstruction error back, so the
    logits are unchanged while the features sit on the path. Other keywords go to ``forward``.
    """
    feats: dict[str, torch.Tensor] = {}
    pairs = []
    for sae in saes:
        if sae.site is None:
            raise ValueError("this SAE has no site: pass site='blocks.L.resid_post' (or set sae.site)")
        names = model.registry.resolve(sae.site)
        if len(names) != 1:
            raise ValueError(f"an SAE reads one site; {sae.site!r} matches {len(names)}")
        pairs.append((names[0], _sae_hook(sae, feats, splice, keep_error)))
    logits = model.run_with_hooks(prompt, pairs, **kwargs)
    return logits, ActivationCache(feats, layer_format=model.registry.names.layer_format)


def _sae_hook(sae: JumpReLUSAE, feats: dict[str, torch.Tensor], splice: bool,
              keep_error: bool) -> Callable[[torch.Tensor, Site], torch.Tensor | None]:
    def hook(x: torch.Tensor, site: Site) -> torch.Tensor | None:
        flat = x
        if x.shape[-1] != sae.d_in and site.head_axis == x.dim() - 2 and x.shape[-2] * x.shape[-1] == sae.d_in:
            flat = x.flatten(-2)  # heads x head_dim, as Hugging Face's o_proj input: [b, s, h * hd]
        if flat.shape[-1] != sae.d_in:
            raise ValueError(f"SAE for {site.name} reads width {sae.d_in}, but the site has width {x.shape[-1]}")
        acts = sae.encode(flat)
        feats[site.name] = acts
        if not splice:
            return None
        recon = sae.decode(acts)
        if keep_error:
            recon = recon + (flat.to(recon.dtype) - recon).detach()
        return recon.to(x.dtype).view_as(x)

    return hook


def top_features(acts: torch.Tensor, k: int = 10, position: int = -1, row: int = 0) -> list[Top]:
    """The ``k`` most active features at one position (only those that fire), largest first.

    >>> [(t.index, t.value) for t in top_features(torch.tensor([[[0.0, 3.0, 1.0]]]), k=2)]
    [((1,), 3.0), ((2,), 1.0)]
    """
    values, idx = acts[row, position].float().topk(min(k, acts.shape[-1]))
    return [Top((int(i),), float(v), f"F{int(i)}") for i, v in zip(idx, values) if v > 0]
