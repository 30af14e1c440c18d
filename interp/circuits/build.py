"""``attribution_graph``: the graph of one prompt through per-layer transcoders or a cross-layer
transcoder, within a node budget.

Cost: one forward of the real model, one of the replacement model (kept for the backward
passes), then one batched backward per ``batch_size`` targets. The backward passes only run
through the linear part (values, output projections, frozen norms, skip terms; not the MLPs,
queries or keys), and a feature's pass starts at its own layer.

**Node budget** (as circuit-tracer's ``attribute``): the logits' rows come first; then, until
``max_feature_nodes`` features have rows, the features are ranked by their influence on the
logits through the rows computed so far and the next ``update_interval * batch_size`` get theirs
(sorted by layer, so a backward pass covers few layers). Every row computed is exact and every
active feature is a column while rows are computed; at the end the features left out are folded
into the error node of their layer and position (their edges added to its edges), so the graph
stays exact: ``adjacency.sum(1) + constants == values`` for every target. An error node then
stands for what the graph's features leave unexplained at that layer and position: the MLP
output's residual and the features left out there (for a cross-layer transcoder, with what they
write to later layers). ``max_feature_nodes=None`` gives every active feature a row.

Memory is estimated before anything large is allocated, from the budget (rows of
``max_feature_nodes + logits`` over the active features' columns), not from the number of active
features; :class:`GraphTooLargeError` names what fits.

>>> import torch
>>> from interp.model import Gemma3, Gemma3Config
>>> from interp.features import Transcoder
>>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=16, d_mlp=32, n_heads=2, n_kv_heads=1, d_head=8,
...                                     vocab_size=40), seed=0)
>>> tcs = [Transcoder.random(m, layer=i, d_sae=32, seed=i) for i in range(2)]
>>> g = attribution_graph(m, torch.tensor([2, 5, 7, 9]), tcs, progress=False)
>>> g.check() < 1e-6
True
>>> small = attribution_graph(m, torch.tensor([2, 5, 7, 9]), tcs, max_feature_nodes=5, progress=False)
>>> int(small.mask("feature").sum()), small.active_features == g.active_features, small.check() < 1e-6
(5, True, True)
"""

from __future__ import annotations

from typing import Any

import torch

from ..hooks import NonFiniteError
from ..hooks.checks import check_int
from ..model import Gemma3
from ..model.inputs import Prompt
from ..model.memory import CacheTooLargeError, available_memory, format_bytes
from ..progress import progress_bar
from ..tokens import single_prompt, str_tokens, token_ids
from .dictionaries import GraphDictionaries, Transcoders
from .graph import Graph, Node
from .graph_files import neuronpedia_model_id
from .replacement import PromptRun, final_logits, replacement_forward, row_gradients, run_prompt
from .rows import Layout, edges, partial_influence, row_block, writer_slots, writers

MAX_FEATURE_NODES = 4096


class GraphTooLargeError(CacheTooLargeError):
    """An attribution graph would not fit in memory; the message has the estimate and what fits."""


def estimate_bytes(model: Gemma3, seq: int, active_features: int, max_feature_nodes: int, n_logits: int,
                   batch_size: int, writer_slots: int = 0) -> dict[str, int]:
    """Bytes a graph needs (float32), from the model's shapes and the budget: ``rows`` (the
    ``max_feature_nodes + n_logits`` rows over every active feature's column), ``adjacency`` (the
    final square graph), ``forward`` (the retained replacement forward), ``writers`` (the active
    features' decoder vectors, ``writer_slots`` of ``[d_model]``, and one layer's decoder rows while
    they are read), ``chunk`` (one backward pass of ``batch_size`` targets and its edges) and
    ``blocks`` (the temporary copy of a block of rows, :func:`~interp.circuits.rows.row_block`), and
    ``slack``, a quarter of the rest: what the allocator holds beyond the tensors (freed blocks it
    keeps, small temporaries). A test measures the peak resident memory a graph adds against this
    sum; the peak came within 1% of the sum without the slack once, so the slack is not optional."""
    c = model.cfg
    budget = min(max_feature_nodes, active_features)
    cols = seq + active_features + c.n_layers * seq + n_logits
    nodes = seq + budget + c.n_layers * seq + n_logits
    per_token_layer = 24 * c.d_model + 6 * c.d_mlp + 6 * c.n_heads * c.d_head + 3 * c.n_heads * seq
    grads = seq * (c.n_layers + 1) * (4 * c.d_model + 2 * c.n_heads * c.d_head + c.n_heads * seq)
    need = {"rows": 4 * (budget + n_logits) * cols, "adjacency": 4 * nodes * nodes,
            "forward": 4 * seq * c.n_layers * per_token_layer, "writers": 4 * writer_slots * (c.d_model + 2) * 3 // 2,
            "chunk": 4 * batch_size * (grads + 3 * cols + c.n_layers * seq * c.d_model),
            "blocks": 4 * min(2**22, (budget + n_logits) * cols)}
    need["slack"] = sum(need.values()) // 4  # the allocator's fragmentation and small temporaries (measured)
    return need


def _check_fits(need: Any, budget: int, batch_size: int, active: int, limit: int | None) -> None:
    """Raise :class:`GraphTooLargeError` unless ``need(budget, batch_size)`` (a dict of bytes) fits in
    ``limit``, naming the largest ``batch_size`` or else the largest ``max_feature_nodes`` that fits."""
    now = need(budget, batch_size)
    total = sum(now.values())
    if limit is None or total <= limit:
        return
    parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in now.items())
    head = (f"this graph needs {format_bytes(total)} ({parts}; {active} active features, budget {budget}) but "
            f"{format_bytes(limit)} is available")

    def largest(fits: Any, hi: int) -> int:
        lo = 0
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo
    b = largest(lambda v: sum(need(budget, v).values()) <= limit, batch_size)
    if b >= 1:
        raise GraphTooLargeError(f"{head}: set batch_size={b} (targets per backward pass; now {batch_size})")
    f = largest(lambda v: sum(need(v, 1).values()) <= limit, budget)
    if f >= 1:
        raise GraphTooLargeError(f"{head}: set max_feature_nodes={f} and batch_size=1, or free memory")
    raise GraphTooLargeError(f"{head}, even with one feature node: use a shorter prompt or sparser transcoders")


def _logit_tokens(model: Gemma3, probs: torch.Tensor, logits: Any, max_n_logits: int, desired_logit_prob: float
                  ) -> list[int]:
    if logits is not None:
        tokens = token_ids(model, logits)
        if not tokens:
            raise ValueError("logits= names no token; give token strings or ids, or None for the most likely ones")
        return list(dict.fromkeys(tokens))
    if max_n_logits < 1 or not 0 < desired_logit_prob <= 1:
        raise ValueError(f"max_n_logits must be >= 1 and desired_logit_prob in (0, 1]; got {max_n_logits}, "
                         f"{desired_logit_prob}")
    p, idx = probs.sort(descending=True)
    n = int((p.cumsum(0) < desired_logit_prob).sum()) + 1
    return idx[:min(n, max_n_logits)].tolist()


def attribution_graph(model: Gemma3, prompt: Prompt, transcoders: Transcoders, *, logits: Any = None,
                      max_n_logits: int = 10, desired_logit_prob: float = 0.95,
                      max_feature_nodes: int | None = MAX_FEATURE_NODES, position: int = -1,
                      bos_features: bool = False, batch_size: int = 64, update_interval: int = 4,
                      max_bytes: int | None = None, progress: bool = True) -> Graph:
    """The attribution graph of ``prompt`` (text or token ids, one prompt) through ``transcoders``:
    per-layer transcoders (a list, or ``{layer: transcoder}``; at most one per layer, each reading an
    MLP's input and writing its output; layers without one keep their MLP whole, as error nodes), or
    one :class:`~interp.features.CrossLayerTranscoder` (layer ``L``'s features write every MLP
    output from ``L`` on, so their edges reach every later layer).

    Logit nodes: the tokens ``logits`` (strings or ids), or by default the most likely next
    tokens at ``position`` until their probabilities add up to ``desired_logit_prob`` (at most
    ``max_n_logits``). Feature nodes: at most ``max_feature_nodes`` (None: all), the most
    influential on the logits (see the module docstring: the rows are exact, the features left out
    join the error nodes). Features at a leading BOS token are left out unless ``bos_features``:
    BOS is the attention sink, its activations are huge and the same for every prompt, and they
    would dominate the graph; what they write joins that position's error node. ``batch_size``
    targets share a backward pass; the ranking is updated every ``update_interval`` passes.
    ``max_bytes`` caps the memory estimate (default: what the device has free).

    >>> g = attribution_graph(model, "The capital of France is", transcoders)  # doctest: +SKIP
    >>> g.prune().plot()  # doctest: +SKIP
    """
    ids = single_prompt(model, prompt)[0]
    seq = len(ids)
    if not -seq <= position < seq:
        raise IndexError(f"position={position} is outside the prompt's {seq} tokens")
    position %= seq
    check_int("batch_size", batch_size, low=1)
    check_int("update_interval", update_interval, low=1)
    check_int("max_feature_nodes", max_feature_nodes, low=1, allow_none=True)
    dicts = GraphDictionaries(model, transcoders)
    was_training = model.training
    model.eval()
    try:
        run = run_prompt(model, ids, dicts, position, bos_features)
        for name, t in [("logits", run.logits), *((f"layer {i} features", a) for i, a in run.acts.items())]:
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"the model's {name} on this prompt hold NaN or inf; no graph can be built "
                                     "(run model.check_finite = True to find the first site)")
        tokens = _logit_tokens(model, torch.softmax(run.logits, -1), logits, max_n_logits, desired_logit_prob)
        with torch.enable_grad():  # also inside torch.no_grad(), as notebooks often run
            graph = _build(model, run, dicts, tokens, max_feature_nodes, batch_size, update_interval, max_bytes,
                           progress)
        graph.bos_features = bos_features
        graph.model_id = neuronpedia_model_id(getattr(model, "source", ""))
        return graph
    finally:
        model.train(was_training)


class _Rows:
    """The rows computed so far (on the CPU): edges over the full columns, constants, each row's
    node column and one over its absolute sum (for the ranking), which features have a row."""

    def __init__(self, n_rows: int, lay: Layout, n_features: int):
        self.rows = torch.zeros(n_rows, lay.n_cols)
        self.consts = torch.zeros(n_rows)
        self.cols = torch.zeros(n_rows, dtype=torch.long)
        self.inv_sums = torch.zeros(n_rows)
        self.visited = torch.zeros(n_features, dtype=torch.bool)
        self.n = 0
        self.n_visited = 0
        self.lay = lay

    def add(self, block: torch.Tensor, const: torch.Tensor, features: torch.Tensor, n_tokens: int) -> None:
        a, b = self.n, self.n + len(block)
        first_token = a - self.n_visited  # logit rows come first, in token order
        self.rows[a:b] = block
        self.consts[a:b] = const
        self.cols[a:b] = torch.cat([self.lay.f0 + features, self.lay.l0 + first_token + torch.arange(n_tokens)])
        self.inv_sums[a:b] = 1.0 / block.abs().sum(1).clamp_min(1e-30)
        self.visited[features] = True
        self.n, self.n_visited = b, self.n_visited + len(features)

    def filled(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.rows[:self.n], self.cols[:self.n], self.inv_sums[:self.n]


def _build(model: Gemma3, run: PromptRun, dicts: GraphDictionaries, tokens: list[int], max_feature_nodes: int | None,
           batch_size: int, update_interval: int, max_bytes: int | None, progress: bool) -> Graph:
    feats = torch.cat([torch.cat((torch.full((len(nz), 1), layer), nz), 1)
                       for layer, a in run.acts.items() for nz in [a.nonzero().cpu()]] or
                      [torch.zeros(0, 3, dtype=torch.long)])
    buf, logit_error = _rows(model, run, dicts, feats, tokens, max_feature_nodes, batch_size, update_interval,
                             max_bytes, progress)
    return _assemble(model, run, dicts, feats, buf, tokens, logit_error)


def _rows(model: Gemma3, run: PromptRun, dicts: GraphDictionaries, feats: torch.Tensor, tokens: list[int],
          max_feature_nodes: int | None, batch_size: int, update_interval: int, max_bytes: int | None,
          progress: bool) -> tuple[_Rows, float]:
    """Every row the budget allows (the trace and the decoder vectors are freed on return)."""
    n_layers, seq, device = model.cfg.n_layers, len(run.ids), model.device
    n_act, k = len(feats), len(tokens)
    budget = n_act if max_feature_nodes is None else min(max_feature_nodes, n_act)
    lay = Layout(seq, n_act, n_layers, k)
    slots = writer_slots(dicts, feats, seq)
    _check_fits(lambda nodes, chunk: estimate_bytes(model, seq, n_act, nodes, k, chunk, slots), budget, batch_size,
                n_act, max_bytes if max_bytes is not None else available_memory(device))
    w = writers(dicts, feats, run, lay)
    trace = replacement_forward(model, run, dicts)
    token_t = torch.tensor(tokens, device=device)
    logit_error = float((final_logits(model, trace, run.position, token_t).detach()
                         - run.logits[token_t]).abs().max())

    buf = _Rows(k + budget, lay, n_act)
    bar = progress_bar(k + budget, "attribution graph", unit="node", enabled=progress)

    def compute(chosen: torch.Tensor, chunk_tokens: torch.Tensor) -> None:
        f = feats[chosen].to(device)
        order = f[:, 0].argsort(stable=True)  # grouped by layer, as the encoder vectors are read
        chosen, f = chosen[order.cpu()], f[order]
        layers = f[:, 0].unique().tolist()
        enc = (torch.cat([dicts.encoder_columns(layer, f[f[:, 0] == layer, 2]) for layer in layers]) if len(f)
               else torch.zeros(0, 1, device=device))
        g_embed, g_out = row_gradients(model, trace, f, enc, chunk_tokens, run.position)
        block, const = edges(g_embed, g_out, run, w, lay)
        for layer in layers:
            mine = (f[:, 0] == layer).nonzero()[:, 0]
            const[mine] += dicts.encoder_bias(layer, f[mine, 2])
        if not (bool(torch.isfinite(block).all()) and bool(torch.isfinite(const).all())):
            raise NonFiniteError("the attribution graph holds NaN or inf edges (the transcoders or the model "
                                 "overflow on this prompt; run model.check_finite = True to find the first site)")
        buf.add(block.cpu(), const.cpu(), chosen, len(chunk_tokens))
        bar.update(len(block))

    none = torch.zeros(0, dtype=torch.long)
    for a in range(0, k, batch_size):
        compute(none, token_t[a:a + batch_size])
    seeds = torch.zeros(lay.n_cols)
    seeds[lay.l0:] = torch.softmax(run.logits, -1)[token_t].cpu()
    while buf.n_visited < budget:
        if budget == n_act:
            pending = (~buf.visited).nonzero()[:, 0]
        else:
            score = partial_influence(*buf.filled(), seeds)[lay.f0:lay.e0]
            rank = score.argsort(descending=True, stable=True)
            pending = rank[~buf.visited[rank]][:min(budget - buf.n_visited, update_interval * batch_size)]
        pending = pending[feats[pending, 0].argsort(stable=True)]  # by layer: short backward passes
        for a in range(0, len(pending), batch_size):
            compute(pending[a:a + batch_size], torch.zeros(0, dtype=torch.long, device=device))
    bar.close()
    return buf, logit_error


def _assemble(model: Gemma3, run: PromptRun, dicts: GraphDictionaries, feats: torch.Tensor, buf: _Rows,
              tokens: list[int], logit_error: float) -> Graph:
    """The square graph over the chosen features: the others folded into their error nodes."""
    lay, visited, rows, consts, row_cols = buf.lay, buf.visited, buf.rows, buf.consts, buf.cols
    seq, n_layers = lay.seq, lay.n_layers
    chosen, dropped = visited.nonzero()[:, 0], (~visited).nonzero()[:, 0]
    err_vecs = {layer: e.clone() for layer, e in run.errors.items()}
    if len(dropped):
        src = lay.f0 + dropped
        dst = lay.e0 + feats[dropped, 0] * seq + feats[dropped, 1]
        step = row_block(len(dropped))
        for a in range(0, len(rows), step):
            part = rows[a:a + step]
            part.index_add_(1, dst, part[:, src])
        for layer in feats[dropped, 0].unique().tolist():  # what a dropped feature writes at its own layer
            mine = dropped[feats[dropped, 0] == layer]
            pos, f = feats[mine, 1].to(dicts.device), feats[mine, 2].to(dicts.device)
            vec = dicts.decoder_rows(layer, f)[:, 0] * run.acts[layer][pos, f][:, None]
            err_vecs[layer] = err_vecs[layer].index_add(0, pos, vec)
    col_map = torch.cat([torch.arange(seq), lay.f0 + chosen, torch.arange(lay.e0, lay.n_cols)])
    n = len(col_map)
    node_of_col = torch.full((lay.n_cols,), -1, dtype=torch.long)
    node_of_col[col_map] = torch.arange(n)
    adjacency = torch.zeros(n, n)
    target_nodes = node_of_col[row_cols]
    step = row_block(n)
    for a in range(0, len(rows), step):
        adjacency[target_nodes[a:a + step]] = rows[a:a + step][:, col_map]
    constants = torch.zeros(n)
    constants[target_nodes] = consts

    words = str_tokens(model, run.ids.tolist())
    probs = torch.softmax(run.logits, -1)
    kept = feats[chosen]
    nodes = [Node("embedding", -1, p, int(run.ids[p]), words[p]) for p in range(seq)]
    nodes += [Node("feature", layer, pos, f, f"L{layer} F{f} @ {words[pos]!r}", float(run.acts[layer][pos, f]))
              for layer, pos, f in kept.tolist()]
    nodes += [Node("error", layer, p, -1, f"error L{layer} @ {words[p]!r}") for layer in range(n_layers)
              for p in range(seq)]
    nodes += [Node("logit", n_layers, run.position, t, f"logit {w!r}", float(probs[t]))
              for t, w in zip(tokens, str_tokens(model, tokens))]
    values = torch.zeros(n)
    values[:seq] = run.embed.float().norm(dim=-1).cpu()
    f1 = seq + len(kept)
    if len(kept):
        values[seq:f1] = torch.stack([run.pre[layer][pos, f] for layer, pos, f in kept.tolist()]).cpu()
    values[f1:f1 + n_layers * seq] = torch.stack([err_vecs[layer].norm(dim=-1) for layer in range(n_layers)]
                                                 ).flatten().cpu()
    values[f1 + n_layers * seq:] = run.logits[torch.tensor(tokens, device=run.logits.device)].cpu()
    text = model.tokenizer.decode(run.ids.tolist()) if model.tokenizer is not None else ""
    return Graph(adjacency, values, constants, nodes, run.ids.cpu(), words, n_layers, text, logit_error,
                 list(dicts.names), active_features=len(feats))


__all__ = ["attribution_graph", "estimate_bytes", "GraphTooLargeError", "MAX_FEATURE_NODES"]
