"""Generation stops at the tokenizer's own ``<end_of_turn>``, not at a number written in the code."""

from __future__ import annotations

import torch
from support import TINY, FakeTokenizer, make_model

from interp.hooks import Site

CFG = TINY.replace(vocab_size=120)


class TurnTokenizer(FakeTokenizer):
    """A fake tokenizer whose ``<end_of_turn>`` is id 110 (Gemma 3's is 106)."""

    stop_ids = frozenset({CFG.eos_token_id, 110})


def forcing(token: int, at: int):
    def hook(x: torch.Tensor, site: Site) -> torch.Tensor:
        x = x.clone()
        x[:, -1, [CFG.eos_token_id, 106, 110]] = -1e4
        if site.offset - 2 == at:
            x[:, -1, token] = 1e4
        return x
    return hook


def test_the_tokenizers_end_of_turn_stops_and_106_does_not():
    m = make_model(CFG, seed=4)
    m.tokenizer = TurnTokenizer(CFG.vocab_size)
    out = m.generate(torch.tensor([[2, 7, 9]]), max_new_tokens=6, hooks={"logits": forcing(110, 2)})
    assert out.stop_reasons == ["end_of_turn"] and out.ids[0, -1] == 110
    out = m.generate(torch.tensor([[2, 7, 9]]), max_new_tokens=6, hooks={"logits": forcing(106, 2)})
    assert out.stop_reasons == ["max_new_tokens"] and 106 in out.ids[0].tolist()
