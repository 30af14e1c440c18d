"""Steering vectors by contrastive activation addition: the difference of the mean activations
at one site between prompts that have a property and prompts that lack it, added back while the
model runs.

``steering_vector(model, positives, negatives, site)`` reads ``site`` at one position of every
prompt (the last token by default; prompts may differ in length), and returns a
:class:`SteeringVector` whose :meth:`~SteeringVector.hook` plugs into every ``hooks=``:

>>> import torch
>>> from interp.model import Gemma3, Gemma3Config
>>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=16, d_mlp=32, n_heads=2,
...     n_kv_heads=1, d_head=8, vocab_size=50))
>>> sv = steering_vector(m, [[2, 5, 7], [2, 9]], [[2, 5, 8], [2, 11, 4, 3]], site="blocks.1.resid_pre")
>>> sv.vector.shape, sv.n_pairs
(torch.Size([16]), 2)
>>> steered = m.run_with_hooks(torch.tensor([[2, 5, 7]]), sv.hook(scale=4.0))
>>> torch.equal(m.run_with_hooks(torch.tensor([[2, 5, 7]]), sv.hook(scale=0.0)), m(torch.tensor([[2, 5, 7]])))
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go
import torch

from .hooks import PositionError, Site, add, partial_run
from .hooks.checks import is_int
from .model import Gemma3
from .model.finite import check_finite
from .model.sites import kind_of
from .plots import bars, escape_text

Hook = Callable[[torch.Tensor, Site], torch.Tensor | None]


@dataclass
class SteeringVector:
    """A direction at ``site``: ``vector = mean(positives) - mean(negatives)`` (float32, on the
    CPU; the site's shape without batch and sequence, ``[d]`` for the residual stream).

    ``positive_mean``/``negative_mean`` are the two means; ``n_positive``/``n_negative`` how many
    prompts each came from; ``position`` the token read in each prompt.
    """

    vector: torch.Tensor
    site: str
    position: int
    positive_mean: torch.Tensor
    negative_mean: torch.Tensor
    n_positive: int
    n_negative: int

    @property
    def n_pairs(self) -> int:
        """Contrastive pairs behind the vector (the shorter list's length, when they differ)."""
        return min(self.n_positive, self.n_negative)

    @property
    def norm(self) -> float:
        """The vector's L2 norm (what ``scale=1`` adds)."""
        return float(self.vector.norm())

    @property
    def unit(self) -> torch.Tensor:
        """The vector scaled to norm 1."""
        return self.vector / self.vector.norm().clamp_min(1e-30)

    def __repr__(self) -> str:
        return (f"SteeringVector({self.site!r}, position {self.position}, {self.n_positive} positive / "
                f"{self.n_negative} negative prompts, norm {self.norm:.4g})")

    def hook(self, scale: float = 1.0, positions: Any = None) -> list[tuple[str, Hook]]:
        """``[(site, interp.add(vector, scale, positions=positions))]``, for any ``hooks=``:
        ``model.generate(prompt, hooks=sv.hook(4.0))`` adds ``4 * vector`` at every position
        (``positions`` by the rule of :mod:`interp.hooks.positions`; ``slice(p, None)`` steers
        from position ``p`` on, generated tokens included). ``scale=0`` changes nothing.

        >>> sv = SteeringVector(torch.ones(4), "blocks.0.resid_pre", -1, torch.ones(4), torch.zeros(4), 1, 1)
        >>> [name for name, _ in sv.hook(2.0)]
        ['blocks.0.resid_pre']
        """
        return [(self.site, add(self.vector, float(scale), positions=positions))]

    def projections(self, model: Gemma3, prompts: Sequence[Any], position: int | None = None) -> torch.Tensor:
        """Each prompt's activation at ``site`` (at ``position``, default the vector's) projected on
        the unit vector, measured from the midpoint of the two means: positive on the positive
        side. ``[len(prompts)]``."""
        acts = site_activations(model, prompts, self.site, self.position if position is None else position)
        mid = (self.positive_mean + self.negative_mean) / 2
        return (acts - mid).flatten(1) @ self.unit.flatten()

    def plot_projection(self, model: Gemma3, prompts: Sequence[Any], position: int | None = None,
                        title: str | None = None) -> go.Figure:
        """Bars of :meth:`projections`, one per prompt (labelled by its text, escaped)."""
        values = self.projections(model, prompts, position)
        labels = [p if isinstance(p, str) else f"prompt {i}" for i, p in enumerate(prompts)]
        labels = [(t[:40] + "…") if len(t) > 41 else t for t in labels]
        return bars(values, labels, y_title="projection on the steering vector",
                    title=title or escape_text(f"Projection on the steering vector at {self.site}"))


def _layer_stop(model: Gemma3, site: str) -> int | None:
    """The layer a run can stop before and still fire ``site`` (None: it needs the whole model)."""
    if site in ("final_norm", "logits"):
        return None
    layer = model.registry.names.layer_of[site]
    return 0 if layer is None else layer + 1


@torch.no_grad()
def site_activations(model: Gemma3, prompts: Sequence[Any], site: str, position: int = -1,
                     batch_size: int = 16) -> torch.Tensor:
    """The activation of one site at ``position`` of each prompt, ``[len(prompts), *dims]``
    (float32, CPU). Texts run in left-padded batches of ``batch_size``; ``position`` counts the
    prompt's own tokens (``0`` = BOS, ``-1`` = the last), whatever the padding. Other prompts
    (token ids) run one at a time.

    >>> site_activations(model, ["I love it", "So bad"], "blocks.6.resid_pre").shape   # doctest: +SKIP
    torch.Size([2, 640])
    """
    if not is_int(position):
        raise TypeError(f"position must be an int, got {type(position).__name__}")
    if isinstance(prompts, (str, torch.Tensor)) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of prompts (texts or token ids)")
    stop = _layer_stop(model, site)
    kwargs: dict[str, Any] = {"stop_at_layer": stop} if stop is not None else {}
    out: list[torch.Tensor | None] = [None] * len(prompts)
    texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    groups = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
    groups += [[i] for i, p in enumerate(prompts) if not isinstance(p, str)]
    for group in groups:
        is_text = isinstance(prompts[group[0]], str)
        ids, mask = model.to_tokens_and_mask([prompts[i] for i in group] if is_text else prompts[group[0]])
        if not is_text and ids.shape[0] != 1:
            raise ValueError(f"prompt {group[0]} is a batch of {ids.shape[0]}; pass one prompt per entry")
        lengths = mask.sum(1).tolist() if mask is not None else [ids.shape[1]] * ids.shape[0]
        seq = ids.shape[1]
        cols = []
        for j, length in enumerate(lengths):
            if not -length <= position < length:
                raise PositionError(f"position {position} is outside prompt {group[j]} of {length} tokens "
                                    f"(valid: 0..{length - 1}, or -{length}..-1 from the end)")
            cols.append(seq - length + position if position >= 0 else seq + position)

        def run(ids: torch.Tensor = ids, mask: torch.Tensor | None = mask) -> Any:
            return model.run_with_cache(ids, names=[site], attention_mask=mask, device="cpu", dtype=torch.float32,
                                        **kwargs)

        with partial_run():
            _, cache = run()
        acts = cache[site][torch.arange(len(cols)), torch.tensor(cols)]  # [rows, *dims]
        check_finite(acts, f"steering: the activations at {site}", run)
        for j, i in enumerate(group):
            out[i] = acts[j]
    return torch.stack([a for a in out if a is not None])


def steering_vector(model: Gemma3, positives: Sequence[Any], negatives: Sequence[Any],
                    site: str, position: int = -1, *, batch_size: int = 16) -> SteeringVector:
    """Contrastive activation addition: ``mean(act(positives)) - mean(act(negatives))`` at
    ``site``, reading each prompt at ``position`` (``-1``: its last token; prompts may have
    different lengths). ``site`` is one per-token site (a name or alias; the residual stream
    ``blocks.L.resid_pre`` is the usual choice).

    >>> pos = ["I love this. It is wonderful and", "What a delight. I am so happy and"]   # doctest: +SKIP
    >>> neg = ["I hate this. It is terrible and", "What a mess. I am so sad and"]         # doctest: +SKIP
    >>> sv = steering_vector(model, pos, neg, "blocks.6.resid_pre")                     # doctest: +SKIP
    >>> model.generate("I think the movie was", hooks=sv.hook(4.0)).text               # doctest: +SKIP
    """
    names = model.registry.resolve(site)
    if len(names) != 1:
        raise ValueError(f"a steering vector lives at one site; {site!r} matches {len(names)}: {names[:4]}")
    name = names[0]
    if kind_of(name).seq_axis != 1:
        raise ValueError(f"{name} holds one value per pair of tokens; steer a per-token site "
                         "(e.g. blocks.L.resid_pre)")
    for what, prompts in (("positives", positives), ("negatives", negatives)):
        if isinstance(prompts, (str, torch.Tensor)) or not len(prompts):
            raise ValueError(f"{what} must be a non-empty list of prompts, got {type(prompts).__name__}"
                             + ("" if isinstance(prompts, (str, torch.Tensor)) else " of length 0"))
    means = []
    for what, prompts in (("positives", positives), ("negatives", negatives)):
        try:
            means.append(site_activations(model, prompts, name, position, batch_size).mean(0))
        except PositionError as e:
            raise PositionError(f"{what}: {e}") from None
    p_mean, n_mean = means
    return SteeringVector(vector=p_mean - n_mean, site=name, position=position, positive_mean=p_mean,
                          negative_mean=n_mean, n_positive=len(positives), n_negative=len(negatives))


__all__ = ["steering_vector", "SteeringVector", "site_activations"]
