"""``attribution_graph``: build the graph of one prompt through per-layer transcoders.

Cost: one forward of the real model, one of the replacement model (kept for the backward
passes), then one batched backward per ``batch`` targets (features and logits). The backward
passes only run through the linear part (values, output projections, frozen norms, skip terms;
not the MLPs, queries or keys). Memory: the ``[nodes, nodes]`` float32 adjacency, the retained
forward, and per chunk ``batch`` gradients of every layer's residual; all are estimated before
anything large is allocated (:class:`GraphTooLargeError` names what fits).

>>> import torch
>>> from interp.model import Gemma3, Gemma3Config
>>> from interp.features import Transcoder
>>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=16, d_mlp=32, n_heads=2, n_kv_heads=1, d_head=8,
...                                     vocab_size=40), seed=0)
>>> tcs = [Transcoder.random(m, layer=i, d_sae=32, seed=i) for i in range(2)]
>>> g = attribution_graph(m, torch.tensor([2, 5, 7, 9]), tcs, progress=False)
>>> g.check() < 1e-6
True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..features.dictionary import Dictionary
from ..hooks import NonFiniteError
from ..model import Gemma3
from ..model.inputs import Prompt
from ..model.runs import CacheTooLargeError, available_memory, format_bytes
from ..progress import progress_bar
from ..tokens import single_prompt, str_tokens, token_ids
from .graph import Graph, Node
from .graph_files import neuronpedia_model_id
from .replacement import Targets, backward_rows, replacement_forward, resolve_transcoders, run_prompt, target_values


class GraphTooLargeError(CacheTooLargeError):
    """An attribution graph would not fit in memory; the message has the estimate and what fits."""


def estimate_bytes(model: Gemma3, seq: int, n_nodes: int, batch: int) -> dict[str, int]:
    """Bytes the graph needs: ``adjacency``, the retained replacement ``forward`` and each
    backward ``chunk`` (float32 estimates, from the model's shapes)."""
    c = model.cfg
    per_token_layer = 24 * c.d_model + 6 * c.d_mlp + 6 * c.n_heads * c.d_head + 3 * c.n_heads * seq
    chunk = batch * seq * (c.n_layers + 1) * (4 * c.d_model + 2 * c.n_heads * c.d_head + c.n_heads * seq)
    return {"adjacency": 4 * n_nodes * n_nodes, "forward": 4 * seq * c.n_layers * per_token_layer,
            "chunk": 4 * chunk}


def _check_fits(model: Gemma3, seq: int, n_nodes: int, batch: int, max_bytes: int | None) -> None:
    need = estimate_bytes(model, seq, n_nodes, batch)
    limit = max_bytes if max_bytes is not None else available_memory(model.device)
    if limit is None or sum(need.values()) <= limit:
        return
    fixed = need["adjacency"] + need["forward"]
    parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in need.items())
    if fixed < limit:
        fits = max(1, int(batch * (limit - fixed) / max(need["chunk"], 1)))
        raise GraphTooLargeError(f"this graph needs {format_bytes(sum(need.values()))} ({parts}; {n_nodes} nodes) "
                                 f"but {format_bytes(limit)} is available: set batch={fits} (targets per backward "
                                 f"pass; now {batch})")
    raise GraphTooLargeError(f"this graph needs {format_bytes(sum(need.values()))} ({parts}; {n_nodes} nodes) but "
                             f"{format_bytes(limit)} is available, even with batch=1: use a shorter prompt, fewer "
                             "transcoder layers, or sparser transcoders")


def _logit_tokens(model: Gemma3, probs: torch.Tensor, logits: Any, max_logits: int, logit_probability: float
                  ) -> list[int]:
    if logits is not None:
        tokens = token_ids(model, logits)
        if not tokens:
            raise ValueError("logits= names no token; give token strings or ids, or None for the most likely ones")
        return list(dict.fromkeys(tokens))
    if max_logits < 1 or not 0 < logit_probability <= 1:
        raise ValueError(f"max_logits must be >= 1 and logit_probability in (0, 1]; got {max_logits}, "
                         f"{logit_probability}")
    p, idx = probs.sort(descending=True)
    n = int((p.cumsum(0) < logit_probability).sum()) + 1
    return idx[:min(n, max_logits)].tolist()


def attribution_graph(model: Gemma3, prompt: Prompt, transcoders: Sequence[Dictionary] | Mapping[int, Dictionary], *,
                      logits: Any = None, max_logits: int = 10, logit_probability: float = 0.95,
                      position: int = -1, bos_features: bool = False, batch: int = 64,
                      max_bytes: int | None = None, progress: bool = True) -> Graph:
    """The attribution graph of ``prompt`` (text or token ids, one prompt) through ``transcoders``
    (a list, or ``{layer: transcoder}``; at most one per layer, each reading an MLP's input and
    writing its output; layers without one keep their MLP whole, as error nodes).

    Logit nodes: the tokens ``logits`` (strings or ids), or by default the most likely next
    tokens at ``position`` until their probabilities add up to ``logit_probability`` (at most
    ``max_logits``). Features at a leading BOS token are left out unless ``bos_features``: BOS is
    the attention sink, its activations are huge and the same for every prompt, and they would
    dominate the graph; what they write joins that position's error node (the graph stays
    exact). ``batch`` targets share a backward pass. ``max_bytes`` caps the memory
    estimate (default: what the device has free).

    >>> g = attribution_graph(model, "The capital of France is", transcoders)  # doctest: +SKIP
    >>> g.prune().plot()  # doctest: +SKIP
    """
    ids = single_prompt(model, prompt)[0]
    seq = len(ids)
    if not -seq <= position < seq:
        raise IndexError(f"position={position} is outside the prompt's {seq} tokens")
    position %= seq
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int (targets per backward pass), got {batch!r}")
    tcs = resolve_transcoders(model, transcoders)
    was_training = model.training
    model.eval()
    try:
        run = run_prompt(model, ids, tcs, position, bos_features)
        for name, t in [("logits", run.logits), *((f"layer {i} features", a) for i, a in run.acts.items())]:
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"the model's {name} on this prompt hold NaN or inf; no graph can be built "
                                     "(run model.check_finite = True to find the first site)")
        tokens = _logit_tokens(model, torch.softmax(run.logits, -1), logits, max_logits, logit_probability)
        with torch.enable_grad():  # also inside torch.no_grad(), as notebooks often run
            graph = _build(model, run, tcs, tokens, batch, max_bytes, progress)
        graph.bos_features = bos_features
        graph.model_id = neuronpedia_model_id(getattr(model, "source", ""))
        return graph
    finally:
        model.train(was_training)


def _build(model: Gemma3, run: Any, tcs: Mapping[int, Dictionary], tokens: list[int], batch: int,
           max_bytes: int | None, progress: bool) -> Graph:
    n_layers, seq = model.cfg.n_layers, len(run.ids)
    feats = torch.cat([torch.cat((torch.full((len(nz), 1), layer), nz), 1)
                       for layer, a in run.acts.items() for nz in [a.nonzero().cpu()]] or
                      [torch.zeros(0, 3, dtype=torch.long)])
    n_feat, n_tok = len(feats), len(tokens)
    n = seq + n_feat + n_layers * seq + n_tok
    _check_fits(model, seq, n, min(batch, n_feat + n_tok), max_bytes)
    words = str_tokens(model, run.ids.tolist())
    probs = torch.softmax(run.logits, -1)
    nodes = [Node("embedding", -1, p, int(run.ids[p]), words[p]) for p in range(seq)]
    nodes += [Node("feature", layer, pos, f, f"L{layer} F{f} @ {words[pos]!r}", float(run.acts[layer][pos, f]))
              for layer, pos, f in feats.tolist()]
    nodes += [Node("error", layer, p, -1, f"error L{layer} @ {words[p]!r}") for layer in range(n_layers)
              for p in range(seq)]
    out_words = str_tokens(model, tokens)
    nodes += [Node("logit", n_layers, run.position, t, f"logit {w!r}", float(probs[t]))
              for t, w in zip(tokens, out_words)]

    adjacency = torch.zeros(n, n)
    constants = torch.zeros(n)
    f0, e0, l0 = seq, seq + n_feat, seq + n_feat + n_layers * seq
    targets = Targets(feats.to(model.device), torch.tensor(tokens, device=model.device))
    trace = replacement_forward(model, run, tcs)
    segments = target_values(model, trace, tcs, targets, run.position)
    logit_error = float((segments[-1].detach() - run.logits[targets.tokens]).abs().max())
    # where each layer's active features sit: columns of W_dec to read, and their graph columns
    by_layer = {layer: (feats[:, 0] == layer).nonzero()[:, 0] for layer in tcs}
    bar = progress_bar(len(targets), "attribution graph", unit="node", enabled=progress)
    for chunk, g_embed, g_out in backward_rows(segments, trace, batch):
        rows = torch.arange(chunk.start, chunk.stop)
        node_rows = torch.where(rows < n_feat, f0 + rows, l0 + rows - n_feat)
        block = torch.zeros(len(rows), n)
        block[:, :seq] = (g_embed * run.embed.float()[None]).sum(-1).cpu()
        const = torch.zeros(len(rows))
        for layer, g in g_out.items():
            block[:, e0 + layer * seq:e0 + (layer + 1) * seq] = (g * run.errors[layer][None]).sum(-1).cpu()
            tc = tcs.get(layer)
            if tc is None:
                continue
            const += (g.sum(1) @ tc.b_dec.float()).cpu()
            cols = by_layer[layer]
            if len(cols):
                pos, f = feats[cols, 1].to(g.device), feats[cols, 2].to(g.device)
                unique, which = f.unique(return_inverse=True)
                read = (g @ tc.W_dec[unique].float().T)[:, pos, which]  # [c, n_layer_feats]
                block[:, f0 + cols] = (read * run.acts[layer][pos, f][None]).cpu()
        is_feat = rows < n_feat
        if bool(is_feat.any()):
            fr = feats[rows[is_feat]]
            const[is_feat] += torch.stack([tcs[int(layer)].b_enc[int(f)].float().cpu() for layer, _, f in fr.tolist()])
        # checked chunk by chunk: a check of the whole adjacency at the end allocated its size
        # again in temporaries (abs and two masks), the largest part of a graph's peak memory
        if not (bool(torch.isfinite(block).all()) and bool(torch.isfinite(const).all())):
            raise NonFiniteError("the attribution graph holds NaN or inf edges (the transcoders or the model "
                                 "overflow on this prompt; run model.check_finite = True to find the first site)")
        adjacency[node_rows] = block
        constants[node_rows] = const
        bar.update(len(rows))
    bar.close()
    del trace, segments
    node_values = torch.zeros(n)
    node_values[:seq] = run.embed.float().norm(dim=-1).cpu()
    if n_feat:
        node_values[f0:e0] = torch.stack([run.pre[layer][pos, f] for layer, pos, f in feats.tolist()]).cpu()
    node_values[e0:l0] = torch.stack([run.errors[layer].norm(dim=-1) for layer in range(n_layers)]).flatten().cpu()
    node_values[l0:] = run.logits[targets.tokens].cpu()
    names = [f"{tc.site}->{tc.site_out}" for tc in tcs.values()]
    text = model.tokenizer.decode(run.ids.tolist()) if model.tokenizer is not None else ""
    return Graph(adjacency, node_values, constants, nodes, run.ids.cpu(), words, n_layers, text, logit_error, names)


__all__ = ["attribution_graph", "estimate_bytes", "GraphTooLargeError"]
