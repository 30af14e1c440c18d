"""The rows of an attribution graph: the edges into a chunk of targets from the gradients of one
backward pass, and the influence ranking that picks which features get rows under a node budget.

Columns of a row (the *full* node space, every active feature included): token embeddings
``[0, seq)``, active features ``[seq, seq + n)``, errors (layer-major), logits. A source's edge is
its vector dotted with the target's gradient where the source writes: an embedding at the
embedding, an error at its layer's MLP output, a feature at every MLP output it writes (one for
a per-layer transcoder, every later layer for a cross-layer transcoder), times its activation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dictionaries import GraphDictionaries
from .replacement import PromptRun


@dataclass
class Layout:
    """Where each kind of node sits among the columns of a row."""

    seq: int
    n_features: int
    n_layers: int
    n_logits: int

    @property
    def f0(self) -> int:
        return self.seq

    @property
    def e0(self) -> int:
        return self.seq + self.n_features

    @property
    def l0(self) -> int:
        return self.e0 + self.n_layers * self.seq

    @property
    def n_cols(self) -> int:
        return self.l0 + self.n_logits


@dataclass
class Writers:
    """Per output layer ``o``: ``vectors [seq, m, d]`` (float32: each active feature's decoder vector to
    ``o`` times its activation, grouped by position and zero-padded to the busiest position's count
    ``m``) and ``cols [seq, m]`` (the feature's column; padding points at column 0 with a zero vector),
    and the decoder biases."""

    vectors: dict[int, torch.Tensor]
    cols: dict[int, torch.Tensor]
    biases: dict[int, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * 4 + self.cols[o].numel() * 8 for o, v in self.vectors.items())


def _slots(dicts: GraphDictionaries, feats: torch.Tensor, seq: int) -> dict[int, tuple[torch.Tensor, int]]:
    """Per output layer ``o``: the writers' rows of ``feats`` (in layer, then column order) with each
    one's slot among the writers at its position, and the busiest position's count."""
    out = {}
    for o in range(dicts.n_layers):
        layers = [layer for layer in dicts.layers if o in dicts.writes(layer)]
        rows = torch.isin(feats[:, 0], torch.tensor(layers, dtype=torch.long)).nonzero()[:, 0]
        if not len(rows):
            continue
        pos = feats[rows, 1]
        order = pos.argsort(stable=True)
        counts = torch.bincount(pos, minlength=seq)
        slot = torch.empty_like(rows)
        slot[order] = torch.arange(len(rows)) - (counts.cumsum(0) - counts)[pos[order]]
        out[o] = (torch.stack([rows, slot], 1), int(counts.max()))
    return out


def writer_slots(dicts: GraphDictionaries, feats: torch.Tensor, seq: int) -> int:
    """How many padded ``[d]`` slots :func:`writers` will hold (for the memory estimate, before anything
    is allocated): per output layer, ``seq`` times the busiest position's writer count."""
    return sum(seq * m for _, m in _slots(dicts, feats, seq).values())


def writers(dicts: GraphDictionaries, feats: torch.Tensor, run: PromptRun, layout: Layout) -> Writers:
    """The :class:`Writers` of the active features ``feats [n, 3]`` (``(layer, pos, feature)``, in
    column order). Allocated first, then filled one layer's decoder rows at a time (the peak is the
    writers plus one layer's rows)."""
    device, seq = dicts.device, layout.seq
    slots = _slots(dicts, feats, seq)
    d = None
    vectors, cols = {}, {}
    for layer in dicts.layers:
        idx = (feats[:, 0] == layer).nonzero()[:, 0]
        if not len(idx):
            continue
        pos, f = feats[idx, 1].to(device), feats[idx, 2].to(device)
        unique, which = f.unique(return_inverse=True)
        rows = dicts.decoder_rows(layer, unique)  # [u, n_out, d]
        d = rows.shape[-1]
        act = run.acts[layer][pos, f][:, None]
        for j, o in enumerate(dicts.writes(layer)):
            where, m = slots[o]
            if o not in vectors:
                vectors[o] = torch.zeros(seq, m, d, device=device)
                cols[o] = torch.zeros(seq, m, dtype=torch.long, device=device)
            mine = torch.isin(where[:, 0], idx)  # this layer's writers to o, in column order like idx
            slot = where[mine, 1].to(device)
            vectors[o][pos, slot] = rows[which, j] * act
            cols[o][pos, slot] = layout.f0 + idx.to(device)
        del rows
    biases = {o: b for o in range(dicts.n_layers) if (b := dicts.decoder_bias(o)) is not None}
    return Writers(vectors, cols, biases)


def edges(g_embed: torch.Tensor, g_out: dict[int, torch.Tensor], run: PromptRun, w: Writers,
          layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block [c, n_cols], constants [c])`` on the device: each target's edges from every source
    (given its gradients at the embedding and at each MLP output) and what the decoder biases add."""
    c, seq = g_embed.shape[0], layout.seq
    block = torch.zeros(c, layout.n_cols, device=g_embed.device)
    const = torch.zeros(c, device=g_embed.device)
    block[:, :seq] = (g_embed * run.embed.float()[None]).sum(-1)
    for o, g in g_out.items():
        e = layout.e0 + o * seq
        block[:, e:e + seq] = (g * run.errors[o][None]).sum(-1)
        if o in w.biases:
            const += g.sum(1) @ w.biases[o]
        if o in w.vectors:
            # per position: [c, d] @ [d, m] -> the edges from every feature writing there
            out = torch.bmm(g.transpose(0, 1), w.vectors[o].transpose(1, 2))  # [seq, c, m]
            block.index_add_(1, w.cols[o].flatten(), out.permute(1, 0, 2).reshape(c, -1))
    return block, const


def row_block(n_cols: int) -> int:
    """Rows per block when a temporary copy of some rows is made (16 MiB of float32 at most)."""
    return max(1, 2**22 // max(1, n_cols))


def partial_influence(rows: torch.Tensor, row_cols: torch.Tensor, inv_sums: torch.Tensor,
                      seeds: torch.Tensor) -> torch.Tensor:
    """Each column's influence on the logits through the rows computed so far (circuit-tracer's
    partial influence): ``seeds [n_cols]`` (the logits' probabilities at their columns) pushed back
    along ``|rows| / row sums`` until nothing is left; ``row_cols [r]`` is the column of each row's
    node, ``inv_sums [r]`` one over each row's absolute sum.

    Influence only travels on through nodes that have rows, so the powers are taken on the small
    ``[r, r]`` part (rows by row nodes); the full ``[r, n_cols]`` rows are read once, in blocks
    (:func:`row_block`), to push the total onto every column.

    >>> rows = torch.tensor([[0.0, 2.0, 2.0, 0.0], [4.0, 0.0, 0.0, 0.0]])  # node 3 <- 1, 2; node 1 <- 0
    >>> partial_influence(rows, torch.tensor([3, 1]), 1 / rows.abs().sum(1), torch.tensor([0, 0, 0, 1.0])).tolist()
    [0.5, 0.5, 0.5, 0.0]
    """
    square = rows[:, row_cols].abs() * inv_sums[:, None]  # [r, r]: row i's weight on row node j
    reach = seeds[row_cols]
    step = reach
    for _ in range(len(rows) + 1):
        step = step @ square
        if not bool(step.any()):
            break
        reach = reach + step
    else:
        raise ValueError("influence did not vanish: the rows hold a cycle")
    w_rows = reach * inv_sums
    live = w_rows.nonzero()[:, 0]
    total = torch.zeros_like(seeds)
    block = row_block(rows.shape[1])
    for a in range(0, len(live), block):
        part = live[a:a + block]
        total += w_rows[part] @ rows[part].abs_()  # the indexing made a copy: abs in place
    return total


__all__ = ["Layout", "Writers", "writers", "writer_slots", "edges", "partial_influence", "row_block"]
