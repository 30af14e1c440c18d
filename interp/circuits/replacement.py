"""The local replacement model of one prompt, and the backward passes of an attribution graph.

On a fixed prompt, Gemma 3 becomes a *linear* system once three things are frozen at their
values on that prompt:

- every attention pattern (queries and keys then no longer matter; values pass linearly),
- every RMSNorm's data-dependent scale ``rsqrt(mean(x^2) + eps)`` (a norm is then a fixed
  diagonal map; Gemma 3 has four per layer, the q/k norms, and the final one),
- every MLP, replaced by its transcoder: the features' decoder rows times their activations
  (fixed numbers: the features are the graph's nodes; with a cross-layer transcoder, the
  features of every layer up to this one), the decoder bias, the affine skip term if there is
  one (linear in the MLP's input, so it stays part of the system), and an *error* (the MLP's true
  output minus the transcoder's, a fixed vector). A layer without a transcoder keeps its whole
  MLP output as the error.

That system reproduces the model's logits on this prompt (to fp32 rounding), and every node's
input is a sum of the linear effects of the sources upstream (token embeddings, active features,
errors) plus constants (biases). The direct effect of source ``s`` on target ``t`` is
``value_s * (d t / d value_s)`` through the frozen system, read off one backward pass from ``t``;
:func:`row_gradients` runs those passes for many targets at once (a batch of gradient seeds
through one retained forward, ``autograd.grad(..., is_grads_batched=True)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..model import Gemma3
from ..model.layers import RMSNorm, rms_factor
from ..model.sites import block_site
from .dictionaries import GraphDictionaries, layer_kind


@dataclass
class PromptRun:
    """What the real model computes on the prompt (batch 1), that the graph's nodes are made of."""

    ids: torch.Tensor  # [seq]
    embed: torch.Tensor  # [seq, d] (the embed site: scaled embeddings)
    acts: dict[int, torch.Tensor]  # feature activations [seq, w] (float32), per layer with features
    pre: dict[int, torch.Tensor]  # feature pre-activations [seq, w] (float32)
    errors: dict[int, torch.Tensor]  # every layer: [seq, d] at its output site (whole MLP output without features)
    logits: torch.Tensor  # [vocab] at the logit position (float32)
    position: int


@torch.no_grad()
def run_prompt(model: Gemma3, ids: torch.Tensor, dicts: GraphDictionaries, position: int,
               bos_features: bool = True) -> PromptRun:
    """One forward of the real model, caching what the replacement model is built from. With
    ``bos_features=False`` the features at a leading BOS token are left out (set to 0): what
    they wrote joins that position's error."""
    n = model.cfg.n_layers
    names = ["embed"] + [dicts.site_in(i) for i in dicts.layers] + [dicts.site_out(i) for i in range(n)]
    logits, cache = model.run_with_cache(ids[None], names=sorted(set(names)))
    acts, pre = {}, {}
    for layer in dicts.layers:
        pre[layer], acts[layer] = dicts.encode(layer, cache[dicts.site_in(layer)][0])
        if not bos_features and int(ids[0]) == model.cfg.bos_token_id:
            acts[layer][0] = 0.0
    recon = dicts.reconstruction(acts)
    errors = {}
    for layer in range(n):
        actual = cache[dicts.site_out(layer)][0].float()
        if layer not in recon:
            errors[layer] = actual
            continue
        skip = dicts.skip(layer, cache[dicts.site_in(layer)][0]) if layer in dicts.layers else None
        errors[layer] = actual - (recon[layer] if skip is None else recon[layer] + skip.float())
    return PromptRun(ids, cache["embed"][0], acts, pre, errors, logits[0, position].float(), position)


def linear_norm(x: torch.Tensor, norm: RMSNorm, factor: torch.Tensor | None = None) -> torch.Tensor:
    """``norm(x)`` with its scale frozen: at ``factor`` if given, else at its value for ``x``
    (then the same numbers as ``norm(x)``; gradients see a fixed diagonal map)."""
    factor = rms_factor(x, norm.eps).detach() if factor is None else factor
    return (x.float() * factor * (1.0 + norm.weight.float())).type_as(x)


@dataclass
class Trace:
    """The replacement forward (batch 1) with what backward passes read: the embedding leaf, one
    zero leaf per layer at its MLP output site (its gradient is the gradient there), and the
    feature layers' inputs (targets' pre-activations are read from them)."""

    embed: torch.Tensor
    probes: dict[int, torch.Tensor]
    x_in: dict[int, torch.Tensor] = field(default_factory=dict)
    final: torch.Tensor | None = None
    frozen: dict[str, torch.Tensor] = field(default_factory=dict)  # patterns and norm scales, by site


def replacement_hooks(model: Gemma3, prompt: PromptRun, dicts: GraphDictionaries,
                      acts: Mapping[int, torch.Tensor] | None = None, errors: bool = True,
                      frozen: Mapping[str, torch.Tensor] | None = None) -> tuple[dict[str, Any], Trace]:
    """Hooks that turn a forward of ``prompt`` into its local replacement model, and the
    :class:`Trace` they fill. ``acts`` overrides feature activations (interventions);
    ``errors=False`` drops the error terms (the transcoders alone). Attention patterns and norm
    scales are those of this forward (recorded in ``trace.frozen``), or ``frozen``'s (a
    previous trace's: then an intervention changes nothing else)."""
    recon = dicts.reconstruction(prompt.acts if acts is None else acts)
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
        const = prompt.errors[layer] if errors else torch.zeros_like(prompt.errors[layer])
        if layer in recon:
            const = const + recon[layer]
        probe = torch.zeros((1, *const.shape), dtype=dtype, device=const.device, requires_grad=True)
        trace.probes[layer] = probe
        has_skip = layer in dicts.layers

        def fn(x: torch.Tensor, site: Any) -> torch.Tensor:
            out = const[None].to(dtype) + probe
            skip = dicts.skip(layer, trace.x_in[layer]) if has_skip else None
            out = out if skip is None else out + skip.to(dtype)
            stash[f"mlp{layer}"] = out
            return out
        return fn

    for layer in range(model.cfg.n_layers):
        b = model.block(layer)
        kind_in = dicts.kinds_in.get(layer)
        kind_out = layer_kind(model, dicts.site_out(layer))[1]
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


def replacement_forward(model: Gemma3, prompt: PromptRun, dicts: GraphDictionaries,
                        acts: Mapping[int, torch.Tensor] | None = None, errors: bool = True,
                        frozen: Mapping[str, torch.Tensor] | None = None) -> Trace:
    """Run the local replacement model on the prompt (gradients on); ``trace.final`` is the
    final residual stream ``[1, seq, d]`` (see :func:`replacement_hooks` for the options)."""
    hooks, trace = replacement_hooks(model, prompt, dicts, acts, errors, frozen)
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


def row_gradients(model: Gemma3, trace: Trace, features: torch.Tensor, encoders: torch.Tensor,
                  tokens: torch.Tensor, position: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One batched backward pass for the targets of one chunk: feature targets ``features [c_f, 3]``
    (``(layer, pos, feature)``, their encoder vectors ``encoders [c_f, d_in]``: a feature's value
    without its bias is ``x_in[layer][pos] . encoder``), then logit targets ``tokens [c_l]``.
    Returns ``d target / d embed [c, seq, d]`` and ``{layer: d target / d MLP output [c, seq, d]}``
    (float32; a layer that no target of the chunk depends on is left out: its gradient is zero).

    The gradient of a feature target is seeded straight at its layer's input (the encoder vector
    at its position), so the backward starts there and never runs through later layers."""
    c_f, c = len(features), len(features) + len(tokens)
    outputs: list[torch.Tensor] = []
    seeds: list[torch.Tensor] = []
    rows = torch.arange(c_f, device=features.device)
    for layer in features[:, 0].unique().tolist():
        x = trace.x_in[layer]  # [1, seq, d_in]
        mine = features[:, 0] == layer
        seed = torch.zeros(c, *x.shape, dtype=x.dtype, device=x.device)
        seed[rows[mine], 0, features[mine, 1]] = encoders[mine].to(x.dtype)
        outputs.append(x)
        seeds.append(seed)
    if len(tokens):
        out = final_logits(model, trace, position, tokens)
        seed = torch.zeros(c, len(tokens), dtype=out.dtype, device=out.device)
        seed[torch.arange(c_f, c), torch.arange(len(tokens))] = 1.0
        outputs.append(out)
        seeds.append(seed)
    layers = sorted(trace.probes)
    inputs = [trace.embed] + [trace.probes[i] for i in layers]
    grads = torch.autograd.grad(outputs, inputs, grad_outputs=seeds, is_grads_batched=True, retain_graph=True,
                                allow_unused=True)
    g_embed = grads[0] if grads[0] is not None else torch.zeros(c, *inputs[0].shape, dtype=inputs[0].dtype,
                                                                device=inputs[0].device)
    return g_embed[:, 0].float(), {layer: g[:, 0].float() for layer, g in zip(layers, grads[1:]) if g is not None}


__all__ = ["run_prompt", "replacement_forward", "replacement_hooks", "final_logits", "linear_norm",
           "row_gradients", "PromptRun", "Trace"]
