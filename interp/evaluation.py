"""Language-model evaluation: cross-entropy over texts (also with hooks, for ablation or
splicing effects on loss), and how a prompt ranks a given answer.

>>> import torch
>>> from interp.model import Gemma3, Gemma3Config
>>> m = Gemma3.from_config(Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=1, n_kv_heads=1, d_head=8,
...                                     vocab_size=9))
>>> loss = lm_loss(m, torch.tensor([[2, 5, 6, 7]]), progress=False)
>>> loss.n_tokens, round(loss.mean, 1) > 0
(3, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .hooks import HookSpec, NonFiniteError
from .hooks.checks import is_int
from .model import Gemma3
from .model.finite import raise_non_finite
from .model.memory import available_memory
from .progress import progress_bar
from .tokens import str_tokens

LOGITS_BUDGET = 1 << 28  # bytes of float32 logits per unembedding chunk


@dataclass
class LMLoss:
    """What :func:`lm_loss` returns (losses in nats).

    ``mean`` is the mean cross-entropy over every predicted token (each text's tokens after the
    first), ``per_text`` the mean of each text ``[n_texts]``. With ``per_token=True``,
    ``per_token[i][t]`` is the loss of predicting token ``t + 1`` of text ``i`` from tokens
    ``0..t``, and ``tokens[i]`` are that text's tokens (so ``tokens[i][t + 1]`` is what was predicted).
    """

    mean: float
    per_text: torch.Tensor
    n_tokens: int
    per_token: list[torch.Tensor] = field(default_factory=list)
    tokens: list[list[str]] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"LMLoss(mean={self.mean:.4f} nats over {self.n_tokens} tokens, {len(self.per_text)} texts)"


def _rows(model: Gemma3, texts: Any) -> list[torch.Tensor]:
    """Each text as a 1-D LongTensor of ids (BOS first for strings)."""
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(texts, torch.Tensor):
        ids = model.to_tokens(texts)
        return [row for row in ids.cpu()]
    rows = []
    for t in texts:
        ids = model.to_tokens(t)
        rows.append(ids[0].cpu())
    if not rows:
        raise ValueError("lm_loss needs at least one text")
    return rows


@torch.no_grad()
def lm_loss(model: Gemma3, texts: str | Sequence[str] | torch.Tensor | Sequence[Sequence[int]], *,
            per_token: bool = False, hooks: HookSpec = None, batch_size: int = 8, progress: bool = True) -> LMLoss:
    """Mean next-token cross-entropy of ``model`` on ``texts`` (a text, texts, or token ids
    ``[n, s]``), in batches, with ``hooks`` active (e.g. an ablation: compare with and without).

    Each text is scored on its own tokens only (right padding in a batch is masked out). The
    unembedding runs in chunks, so long texts and the 262k vocabulary do not need all logits at
    once (a hook on ``final_norm`` or ``logits`` makes it run the plain forward instead).

    >>> clean = lm_loss(model, ["The capital of France is Paris."])  # doctest: +SKIP
    >>> ablated = lm_loss(model, ["The capital of France is Paris."],
    ...                   hooks={"blocks.5.mlp.out": interp.zero_ablate()})  # doctest: +SKIP
    """
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    rows = _rows(model, texts)
    short = [i for i, r in enumerate(rows) if r.numel() < 2]
    if short:
        raise ValueError(f"text {short[0]} has fewer than 2 tokens: nothing to predict")
    losses: list[torch.Tensor] = []
    bar = progress_bar(sum(r.numel() - 1 for r in rows), "lm_loss", "tok", progress)
    try:
        with model.hooks(hooks):
            for start in range(0, len(rows), batch_size):
                batch = rows[start:start + batch_size]
                losses += _batch_losses(model, batch)
                bar.update(sum(r.numel() - 1 for r in batch))
    finally:
        bar.close()
    per_text = torch.stack([x.mean() for x in losses])
    n = sum(x.numel() for x in losses)
    mean = float(torch.cat(losses).sum() / n)
    return LMLoss(mean, per_text, n, losses if per_token else [],
                  [str_tokens(model, r) for r in rows] if per_token else [])


def _batch_losses(model: Gemma3, batch: list[torch.Tensor]) -> list[torch.Tensor]:
    width = max(r.numel() for r in batch)
    ids = torch.full((len(batch), width), model.cfg.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(batch):
        ids[i, :r.numel()], mask[i, :r.numel()] = r, 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    attention = None if bool(mask.all()) else mask
    plain = any(model.registry.is_hooked(n) for n in ("final_norm", "logits"))
    if plain:
        logp = model(ids, attention).float().log_softmax(-1)
        nll = -logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    else:
        resid = model(ids, attention, stop_at_layer=model.cfg.n_layers)
        flat = resid[:, :-1].reshape(-1, resid.shape[-1])
        target = ids[:, 1:].reshape(-1)
        free = available_memory(model.device) or LOGITS_BUDGET * 4
        chunk = max(1, min(LOGITS_BUDGET, free // 4) // (8 * model.cfg.vocab_size))
        parts = []
        for a in range(0, flat.shape[0], chunk):
            logits = model.unembed(flat[a:a + chunk]).float()
            parts.append(torch.logsumexp(logits, -1) - logits.gather(-1, target[a:a + chunk, None])[:, 0])
        nll = torch.cat(parts).view(len(batch), width - 1)
    out = [nll[i, :r.numel() - 1].cpu() for i, r in enumerate(batch)]
    if not all(bool(torch.isfinite(x).all()) for x in out):
        raise_non_finite("lm_loss: the losses", lambda: model(ids, attention))
    return out


@dataclass
class AnswerRank:
    """One answer token's place in the model's prediction (rank 1 = the top token)."""

    token: str
    rank: int
    prob: float
    logit: float
    top: list[tuple[str, float, float]]  # (token, prob, logit) of the top k


@torch.no_grad()
def test_prompt(model: Gemma3, prompt: str, answer: str, k: int = 5, print_results: bool = True) -> list[AnswerRank]:
    """How ``model`` ranks each token of ``answer`` after ``prompt`` (and the answer's earlier
    tokens): rank (1 = top), probability and logit, with the top ``k`` alternatives; prints a
    table unless ``print_results=False``.

    >>> interp.test_prompt(model, "The capital of France is", " Paris")  # doctest: +SKIP
    Tokenized prompt: ['<bos>', 'The', ' capital', ' of', ' France', ' is']
    Tokenized answer: [' Paris']
    ...
    """
    if model.tokenizer is None:
        raise ValueError("test_prompt needs the model's tokenizer")
    if not answer:
        raise ValueError("answer must not be empty")
    prompt_ids = model.tokenizer.encode(prompt)
    answer_ids = model.tokenizer.encode(answer, bos=False)
    ids = torch.tensor([prompt_ids + answer_ids], device=model.device)
    positions = list(range(len(prompt_ids) - 1, ids.shape[1] - 1))
    logits = model(ids, logits_at=positions)[0].float()  # [answer tokens, vocab]
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteError("test_prompt: the logits hold NaN or inf; run logit_lens or set m.check_finite = True "
                             "to find the first non-finite site")
    probs = logits.softmax(-1)
    out = []
    for j, t in enumerate(answer_ids):
        rank = int((logits[j] > logits[j, t]).sum()) + 1
        values, idx = probs[j].topk(k)
        names = str_tokens(model, idx.tolist())
        top = [(n, float(v), float(logits[j, i])) for n, v, i in zip(names, values, idx.tolist())]
        out.append(AnswerRank(str_tokens(model, [t])[0], rank, float(probs[j, t]), float(logits[j, t]), top))
    if print_results:
        print("Tokenized prompt:", str_tokens(model, prompt_ids))
        print("Tokenized answer:", str_tokens(model, answer_ids))
        for a in out:
            print(f"answer {a.token!r}: rank {a.rank}, prob {a.prob:.2%}, logit {a.logit:.2f}")
            for i, (tok, p, lg) in enumerate(a.top):
                print(f"  top {i + 1}: {tok!r:20} prob {p:6.2%}  logit {lg:.2f}")
        ranks = [a.rank for a in out]
        print("Ranks of the answer tokens:", list(zip([a.token for a in out], ranks)))
    return out


test_prompt.__test__ = False  # type: ignore[attr-defined]  # (not a pytest test, despite its name)


__all__ = ["lm_loss", "LMLoss", "test_prompt", "AnswerRank"]
