"""The local replacement model of one prompt, and the backward passes of an attribution graph.

On a fixed prompt, Gemma 3 becomes a *linear* system once three things are frozen at their
values on that prompt:

- every attention pattern (queries and keys then no longer matter; values pass linearly),
- every RMSNorm's data-dependent scale ``rsqrt(mean(x^2) + eps)`` (a norm is then a fixed
  diagonal map; Gemma 3 has four per layer, the q/k norms, and the final one),
- every MLP, replaced by its transcoder: the features' decoder rows times their activations
  (fixed numbers: the features are the graph's nodes), the transcoder's decoder bias, its affine
  skip term if it has one (linear in its input, so it stays part of the system), and an *error*
  (the MLP's true output minus the transcoder's, a fixed vector). A layer without a transcoder
  keeps its whole MLP output as the error.

That system reproduces the model's logits on this prompt (to fp32 rounding), and every node's
input is a sum of the linear effects of the sources upstream (token embeddings, active features,
errors) plus constants (biases). The direct effect of source ``s`` on target ``t`` is
``value_s * (d t / d value_s)`` through the frozen system, read off one backward pass from ``t``;
:func:`backward_rows` runs those passes for many targets at once (a batch of gradient seeds
through one retained forward, ``autograd.grad(..., is_grads_batched=True)``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..features.dictionary import Dictionary
from ..features.io import check_fits
from ..model import Gemma3
from ..model.layers import RMSNorm, rms_factor
from ..model.sites import block_site, split_site

IN_KINDS = ("pre_mlp_norm", "resid_mid")
OUT_KINDS = ("post_mlp_norm", "mlp.out")


def resolve_transcoders(model: Gemma3, transcoders: Sequence[Dictionary] | Mapping[int, Dictionary]
                        ) -> dict[int, Dictionary]:
    """``{layer: transcoder}``, each checked: it reads an MLP's input (``pre_mlp_norm`` or
    ``resid_mid``) and writes that MLP's output (``post_mlp_norm`` or ``mlp.out``) of one layer,
    with matching widths; at most one per layer.

    >>> from interp.model import Gemma3Config
    >>> from interp.features import Transcoder
    >>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=8, d_mlp=16, n_heads=1, n_kv_heads=1,
    ...                                     d_head=8, vocab_size=20))
    >>> sorted(resolve_transcoders(m, [Transcoder.random(m, layer=1, d_sae=16)]))
    [1]
    """
    items = list(transcoders.values()) if isinstance(transcoders, Mapping) else list(transcoders)
    if not items:
        raise ValueError("attribution graphs need at least one transcoder (e.g. Transcoder.random(model, layer=0, "
                         "d_sae=...) or interp.features.load_dictionary(...))")
    out: dict[int, Dictionary] = {}
    for tc in items:
        if not isinstance(tc, Dictionary):
            raise TypeError(f"transcoders must be interp.features dictionaries, got {type(tc).__name__}")
        if tc.site_out is None:
            raise ValueError(f"{tc!r} is an SAE (it writes where it reads); an attribution graph needs transcoders, "
                             "which read an MLP's input and predict its output")
        check_fits(tc, model)
        layer_in, kind_in = _split(model, tc.site)
        layer_out, kind_out = _split(model, tc.site_out)
        if kind_in not in IN_KINDS or kind_out not in OUT_KINDS or layer_in != layer_out:
            raise ValueError(f"{tc!r}: a transcoder in a graph reads blocks.L.pre_mlp_norm (or resid_mid) and writes "
                             "blocks.L.post_mlp_norm (or mlp.out) of the same layer L")
        assert layer_in is not None
        if layer_in in out:
            raise ValueError(f"two transcoders for layer {layer_in}; give one per layer")
        out[layer_in] = tc
    return dict(sorted(out.items()))


def _split(model: Gemma3, name: str | None) -> tuple[int | None, str]:
    layer = model.registry.names.layer_of.get(name or "")
    if layer is None:
        return None, name or ""
    return layer, split_site(name or "")[1]


@dataclass
class PromptRun:
    """What the real model computes on the prompt (batch 1), that the graph's nodes are made of."""

    ids: torch.Tensor  # [seq]
    embed: torch.Tensor  # [seq, d] (the embed site: scaled embeddings)
    x_in: dict[int, torch.Tensor]  # transcoder inputs [seq, d_in]
    acts: dict[int, torch.Tensor]  # feature activations [seq, d_sae]
    pre: dict[int, torch.Tensor]  # feature pre-activations [seq, d_sae]
    errors: dict[int, torch.Tensor]  # every layer: [seq, d] at its output site (whole MLP output without a transcoder)
    logits: torch.Tensor  # [vocab] at the logit position (float32)
    position: int


def out_site(layer: int, transcoders: Mapping[int, Dictionary]) -> str:
    """Where layer ``layer``'s MLP output is replaced (its transcoder's ``site_out``, else ``post_mlp_norm``)."""
    tc = transcoders.get(layer)
    return tc.site_out if tc is not None and tc.site_out else block_site(layer, "post_mlp_norm")


@torch.no_grad()
def run_prompt(model: Gemma3, ids: torch.Tensor, transcoders: Mapping[int, Dictionary], position: int,
               bos_features: bool = True) -> PromptRun:
    """One forward of the real model, caching what the replacement model is built from. With
    ``bos_features=False`` the features at a leading BOS token are left out (set to 0): what
    they wrote joins that position's error."""
    n = model.cfg.n_layers
    names = ["embed"] + [tc.site for tc in transcoders.values() if tc.site] + [out_site(i, transcoders)
                                                                             for i in range(n)]
    logits, cache = model.run_with_cache(ids[None], names=sorted(set(names)))
    x_in, acts, pre, errors = {}, {}, {}, {}
    for layer in range(n):
        actual = cache[out_site(layer, transcoders)][0].float()
        tc = transcoders.get(layer)
        if tc is None:
            errors[layer] = actual
            continue
        assert tc.site is not None
        x = cache[tc.site][0]
        x_in[layer] = x
        pre[layer] = tc.pre_acts(x).float()
        acts[layer] = tc.activation(tc.pre_acts(x)).float()
        if not bos_features and int(ids[0]) == model.cfg.bos_token_id:
            acts[layer][0] = 0.0
        recon = (acts[layer].to(tc.W_dec.dtype) @ tc.W_dec + tc.b_dec).float()
        skip = tc.skip(x)
        errors[layer] = actual - (recon if skip is None else recon + skip.float())
    return PromptRun(ids, cache["embed"][0], x_in, acts, pre, errors, logits[0, position].float(), position)


def linear_norm(x: torch.Tensor, norm: RMSNorm, factor: torch.Tensor | None = None) -> torch.Tensor:
    """``norm(x)`` with its scale frozen: at ``factor`` if given, else at its value for ``x``
    (then the same numbers as ``norm(x)``; gradients see a fixed diagonal map)."""
    factor = rms_factor(x, norm.eps).detach() if factor is None else factor
    return (x.float() * factor * (1.0 + norm.weight.float())).type_as(x)


@dataclass
class Trace:
    """The replacement forward (batch 1) with what backward passes read: the embedding leaf, one
    zero leaf per layer at its MLP output site (its gradient is the gradient there), and the
    transcoders' inputs (targets' pre-activations are read from them)."""

    embed: torch.Tensor
    probes: dict[int, torch.Tensor]
    x_in: dict[int, torch.Tensor] = field(default_factory=dict)
    final: torch.Tensor | None = None
    frozen: dict[str, torch.Tensor] = field(default_factory=dict)  # patterns and norm scales, by site


def replacement_hooks(model: Gemma3, prompt: PromptRun, transcoders: Mapping[int, Dictionary],
                      acts: Mapping[int, torch.Tensor] | None = None, errors: bool = True,
                      frozen: Mapping[str, torch.Tensor] | None = None) -> tuple[dict[str, Any], Trace]:
    """Hooks that turn a forward of ``prompt`` into its local replacement model, and the
    :class:`Trace` they fill. ``acts`` overrides feature activations (interventions);
    ``errors=False`` drops the error terms (the transcoders alone). Attention patterns and norm
    scales are those of this forward (recorded in ``trace.frozen``), or ``frozen``'s (a
    previous trace's: then an intervention changes nothing else)."""
    acts = prompt.acts if acts is None else acts
    dtype = model.dtype
    embed = prompt.embed[None].detach().clone().requires_grad_(True)
    trace = Trace(embed, {})

    def held(name: str, value: torch.Tensor) -> torch.Tensor:
        out = value.detach() if frozen is None else frozen[name]
        trace.frozen[name] = out
        return out
    stash: dict[str, torch.Tensor] = {}
    hooks: dict[str, Any] = {"embed": lambda x, site: embed}

    def capture(key: str, also_in: int | None = None) -> Any:
        def fn(x: torch.Tensor, site: Any) -> None:
            stash[key] = x
            if also_in is not None:
                trace.x_in[also_in] = x
        return fn

    def linear(key: str, norm: RMSNorm, also_in: int | None = None) -> Any:
        def fn(x: torch.Tensor, site: Any) -> torch.Tensor:
            y = linear_norm(stash[key], norm, held(site.name, rms_factor(stash[key], norm.eps)))
            if also_in is not None:
                trace.x_in[also_in] = y
            return y
        return fn

    def replaced(layer: int) -> Any:
        tc = transcoders.get(layer)
        const = prompt.errors[layer] if errors else torch.zeros_like(prompt.errors[layer])
        if tc is not None:
            const = const + (acts[layer].to(tc.W_dec.dtype) @ tc.W_dec + tc.b_dec).float()
        probe = torch.zeros((1, *const.shape), dtype=dtype, device=const.device, requires_grad=True)
        trace.probes[layer] = probe

        def fn(x: torch.Tensor, site: Any) -> torch.Tensor:
            out = const[None].to(dtype) + probe
            skip = None if tc is None else tc.skip(trace.x_in[layer])
            out = out if skip is None else out + skip.to(dtype)
            stash[f"mlp{layer}"] = out
            return out
        return fn

    for layer in range(model.cfg.n_layers):
        b = model.block(layer)
        tc = transcoders.get(layer)
        kind_in = None if tc is None else _split(model, tc.site)[1]
        kind_out = _split(model, out_site(layer, transcoders))[1]
        hooks[block_site(layer, "resid_pre")] = capture("pre")
        hooks[block_site(layer, "input_norm")] = linear("pre", b.input_norm)
        hooks[block_site(layer, "attn.pattern")] = lambda x, site: held(site.name, x)
        hooks[block_site(layer, "attn.out")] = capture("attn")
        hooks[block_site(layer, "post_attn_norm")] = linear("attn", b.post_attn_norm)
        hooks[block_site(layer, "resid_mid")] = capture("mid", layer if kind_in == "resid_mid" else None)
        hooks[block_site(layer, "pre_mlp_norm")] = linear("mid", b.pre_mlp_norm,
                                                          layer if kind_in == "pre_mlp_norm" else None)
        if kind_out == "mlp.out":
            hooks[block_site(layer, "mlp.out")] = replaced(layer)
            hooks[block_site(layer, "post_mlp_norm")] = linear(f"mlp{layer}", b.post_mlp_norm)
        else:
            hooks[block_site(layer, "post_mlp_norm")] = replaced(layer)
    return hooks, trace


def replacement_forward(model: Gemma3, prompt: PromptRun, transcoders: Mapping[int, Dictionary],
                        acts: Mapping[int, torch.Tensor] | None = None, errors: bool = True,
                        frozen: Mapping[str, torch.Tensor] | None = None) -> Trace:
    """Run the local replacement model on the prompt (gradients on); ``trace.final`` is the
    final residual stream ``[1, seq, d]`` (see :func:`replacement_hooks` for the options)."""
    hooks, trace = replacement_hooks(model, prompt, transcoders, acts, errors, frozen)
    with torch.enable_grad(), model.hooks(hooks):
        trace.final = model(prompt.ids[None], stop_at_layer=model.cfg.n_layers)
    assert trace.final is not None
    final = trace.final.detach()
    trace.frozen["final_norm"] = (rms_factor(final, model.final_norm.eps) if frozen is None
                                  else frozen["final_norm"])
    return trace


def final_logits(model: Gemma3, trace: Trace, position: int, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``[len(tokens)]`` (float32) of the replacement model at ``position``: the final
    norm with its scale frozen, then those rows of the unembedding."""
    assert trace.final is not None
    factor = trace.frozen["final_norm"][0, position]
    normed = linear_norm(trace.final[0, position], model.final_norm, factor).float()
    return normed @ model.embed.weight[tokens].float().T


@dataclass
class Targets:
    """The graph's target nodes in order: features ``(layer, pos, feature)``, then logit tokens."""

    features: torch.Tensor  # [n, 3] long
    tokens: torch.Tensor  # [k] long

    def __len__(self) -> int:
        return len(self.features) + len(self.tokens)


def target_values(model: Gemma3, trace: Trace, transcoders: Mapping[int, Dictionary], targets: Targets,
                  position: int) -> list[torch.Tensor]:
    """Each target's value in the replacement forward, without constants (a feature's
    pre-activation minus its encoder bias, a logit), as consecutive segments in target order:
    one float32 ``[n_L]`` per layer with targets, then ``[k]`` logits. Separate segments let a
    backward pass from one layer's targets skip every later layer."""
    feats = targets.features  # sorted by layer (node order), so per-layer parts concatenate in order
    parts = []
    for layer in feats[:, 0].unique().tolist():
        rows = feats[feats[:, 0] == layer]
        tc = transcoders[layer]
        x = trace.x_in[layer][0].float()  # [seq, d_in]
        # no indexing on the differentiable path (its batched backward is slow): one matmul with the
        # targets' encoder columns, then each column's own position by a one-hot mask
        at = torch.zeros(x.shape[0], len(rows), device=x.device)
        at[rows[:, 1], torch.arange(len(rows), device=x.device)] = 1.0
        parts.append(((x @ tc.W_enc[:, rows[:, 2]].float()) * at).sum(0))
    return parts + [final_logits(model, trace, position, targets.tokens)]


def backward_rows(segments: list[torch.Tensor], trace: Trace, batch: int
                  ) -> Iterator[tuple[slice, torch.Tensor, dict[int, torch.Tensor]]]:
    """For each chunk of ``batch`` targets (in the order of ``segments``, see :func:`target_values`):
    ``(chunk, d target / d embed [c, seq, d], {layer: d target / d MLP output [c, seq, d]})``,
    from one batched backward each, starting only from the segments the chunk covers (a layer
    no target of the chunk depends on is not in the dict: its gradient is zero)."""
    layers = sorted(trace.probes)
    inputs = [trace.embed] + [trace.probes[i] for i in layers]
    bounds = []
    start = 0
    for seg in segments:
        bounds.append((start, start + len(seg)))
        start += len(seg)
    n = start
    for lo in range(0, n, batch):
        chunk = slice(lo, min(n, lo + batch))
        c = chunk.stop - chunk.start
        outputs, seeds = [], []
        for seg, (a, b) in zip(segments, bounds):
            first, last = max(a, chunk.start), min(b, chunk.stop)
            if first >= last:
                continue
            seed = torch.zeros(c, b - a, dtype=seg.dtype, device=seg.device)
            rows = torch.arange(first, last)
            seed[rows - chunk.start, rows - a] = 1.0
            outputs.append(seg)
            seeds.append(seed)
        grads = torch.autograd.grad(outputs, inputs, grad_outputs=seeds, is_grads_batched=True, retain_graph=True,
                                    allow_unused=True)
        g_embed = grads[0] if grads[0] is not None else torch.zeros(c, *inputs[0].shape, dtype=inputs[0].dtype,
                                                                    device=inputs[0].device)
        # layers after the chunk's targets get no gradient: left out (their edges are 0), not zero-filled
        yield chunk, g_embed[:, 0].float(), {layer: g[:, 0].float() for layer, g in zip(layers, grads[1:])
                                             if g is not None}


__all__ = ["resolve_transcoders", "run_prompt", "replacement_forward", "replacement_hooks", "final_logits",
           "linear_norm", "backward_rows", "target_values", "PromptRun", "Trace", "Targets", "out_site",
           "IN_KINDS", "OUT_KINDS"]
