"""The site-name contract (the table in ``model/sites.py``, printed in the README): which names
fire, how often, with which shapes, and the algebra that ties them together (residual
decomposition, head and neuron sums, fused vs explicit attention agreeing, hooks that must not
switch attention paths, the cache, HF aliases).

The expected names and shapes come from the table, and the actual ones from running the model:
the table is the one place the contract is written (the README's copy is checked against it in
``tests/test_readme_and_install.py``). Everything runs a tiny random model in fp32 on the CPU.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from interp.hooks import ActivationCache
from interp.model import Gemma3, Gemma3Config
from interp.model.sites import SITES

N_LAYERS, D, F_MLP, H, KV, HD, VOCAB, WINDOW = 6, 32, 64, 4, 2, 8, 100, 4
B, S = 3, 7  # batch and sequence chosen to differ from every model dimension (S > WINDOW)
SIZES = {"b": B, "s": S, "k": S, "d": D, "h": H, "kv": KV, "hd": HD, "f": F_MLP, "v": VOCAB}


def documented_names(n_layers: int = N_LAYERS) -> dict[str, tuple[int, ...]]:
    """Every name of the table with its shape for this test's sizes (symbols: see model/sites.py)."""
    out = {}
    for site in SITES:
        shape = tuple(SIZES[sym] for sym in site.shape)
        for i in range(n_layers) if site.per_layer else [None]:
            out[site.name(i)] = shape
    return out


def test_the_table_has_every_kind_once_and_the_shapes_of_the_contract():
    kinds = [s.kind for s in SITES]
    assert len(kinds) == len(set(kinds)) == 27
    assert kinds[0] == "embed" and kinds[-2:] == ["final_norm", "logits"]
    shapes = {s.kind: "".join(s.shape) for s in SITES}
    assert shapes["attn.q"] == "bshhd" and shapes["attn.k"] == "bskvhd" and shapes["attn.pattern"] == "bhsk"
    assert shapes["attn.head_out"] == "bshd" and shapes["mlp.hidden"] == "bsf" and shapes["logits"] == "bsv"
    assert {s.kind for s in SITES if s.explicit} == {"attn.scores", "attn.pattern", "attn.head_out"}


@pytest.fixture(scope="module")
def cfg() -> Gemma3Config:
    return Gemma3Config(n_layers=N_LAYERS, d_model=D, d_mlp=F_MLP, n_heads=H, n_kv_heads=KV, d_head=HD,
                        vocab_size=VOCAB, window=WINDOW)


@pytest.fixture(scope="module")
def model(cfg) -> Gemma3:
    m = Gemma3.from_config(cfg, seed=0)
    assert m.attn_impl == "auto"
    return m


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def full(model, ids) -> tuple[torch.Tensor, ActivationCache]:
    """Logits and a cache of every site (names=None)."""
    logits, cache = model.run_with_cache(ids, names=None)
    assert not model.registry.active
    return logits, cache


@pytest.fixture(autouse=True)
def _registry_clean(model):
    yield
    assert not model.registry.active, "a test left hooks behind"
    assert model.attn_impl == "auto"


def allowed_keys(s: int, window: int | None) -> torch.Tensor:
    """[s_q, s_k] True where key j is visible to query i (causal; sliding when window given)."""
    i = torch.arange(s)
    ok = i[None, :] <= i[:, None]
    if window is not None:
        ok &= (i[:, None] - i[None, :]) < window
    return ok


# ---------------------------------------------------------------------------- the name contract
def test_cached_names_equal_documented_list(model, full):
    _, cache = full
    assert set(cache) == set(documented_names())
    assert len(cache) == 3 + 24 * N_LAYERS


def test_site_names_equal_documented_list(model):
    assert set(model.site_names()) == set(documented_names())
    assert len(model.site_names()) == len(set(model.site_names()))


def test_every_site_fires_exactly_once_per_forward_in_site_order(model, ids):
    fired: list[str] = []
    with model.hooks({lambda name: True: lambda x, site: fired.append(site.name)}):
        model(ids)
    assert Counter(fired) == Counter({name: 1 for name in documented_names()})
    assert fired == model.site_names()  # site_names() is documented as firing order
    fired.clear()
    model(ids)
    assert fired == []  # nothing fires after the scope


def test_every_site_has_documented_shape(full):
    _, cache = full
    expected = documented_names()
    wrong = {n: (tuple(cache[n].shape), shape) for n, shape in expected.items() if tuple(cache[n].shape) != shape}
    assert not wrong, wrong


def test_cache_holds_fp32_of_a_fp32_model(full):
    logits, cache = full
    assert logits.dtype == torch.float32
    assert {t.dtype for t in cache.values()} == {torch.float32}
    assert not any(t.requires_grad for t in cache.values())


# ---------------------------------------------------------------------------- residual algebra
def test_residual_is_sum_of_embed_and_post_norms(full):
    _, cache = full
    total = cache["embed"].clone()
    for i in range(N_LAYERS):
        total = total + cache[f"blocks.{i}.post_attn_norm"] + cache[f"blocks.{i}.post_mlp_norm"]
    torch.testing.assert_close(total, cache[f"blocks.{N_LAYERS - 1}.resid_post"], rtol=0, atol=1e-6)


def test_decompose_resid(full):
    _, cache = full
    parts, labels = cache.decompose_resid()
    expected = ["embed"] + [f"blocks.{i}.{k}" for i in range(N_LAYERS) for k in ("post_attn_norm", "post_mlp_norm")]
    assert labels == expected
    assert parts.shape == (1 + 2 * N_LAYERS, B, S, D)
    torch.testing.assert_close(parts.sum(0), cache[f"blocks.{N_LAYERS - 1}.resid_post"], rtol=1e-6, atol=1e-5)
    for layer in (0, 1, 3):
        parts, labels = cache.decompose_resid(layer)
        assert len(labels) == 1 + 2 * layer
        torch.testing.assert_close(parts.sum(0), cache[f"blocks.{layer}.resid_pre"], rtol=1e-6, atol=1e-5)


def test_residual_stream_steps(full):
    _, cache = full
    torch.testing.assert_close(cache["blocks.0.resid_pre"], cache["embed"], rtol=0, atol=0)
    for i in range(N_LAYERS):
        b = f"blocks.{i}"
        torch.testing.assert_close(cache[f"{b}.resid_mid"], cache[f"{b}.resid_pre"] + cache[f"{b}.post_attn_norm"],
                                   rtol=0, atol=0)
        torch.testing.assert_close(cache[f"{b}.resid_post"], cache[f"{b}.resid_mid"] + cache[f"{b}.post_mlp_norm"],
                                   rtol=0, atol=0)
        if i + 1 < N_LAYERS:
            torch.testing.assert_close(cache[f"blocks.{i + 1}.resid_pre"], cache[f"{b}.resid_post"], rtol=0, atol=0)


def test_embed_is_scaled_embedding(model, ids, full):
    _, cache = full
    torch.testing.assert_close(cache["embed"], model.embed.weight[ids] * math.sqrt(D), rtol=1e-6, atol=0)


def test_logits_are_final_norm_times_tied_embedding(model, full):
    logits, cache = full
    torch.testing.assert_close(cache["logits"], logits, rtol=0, atol=0)
    torch.testing.assert_close(logits, cache["final_norm"] @ model.embed.weight.T, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- attention algebra
def test_attn_out_is_sum_of_head_out(model, ids, full):
    _, cache = full
    for i in range(N_LAYERS):
        head_out, out = cache[f"blocks.{i}.attn.head_out"], cache[f"blocks.{i}.attn.out"]
        torch.testing.assert_close(head_out.sum(dim=2), out, rtol=1e-6, atol=1e-6)
        # each head's share is its slice of o_proj applied to its own z
        w_o = model.blocks[i].attn.o_proj.weight.view(D, H, HD)
        z = cache[f"blocks.{i}.attn.z"]
        for h in range(H):
            torch.testing.assert_close(head_out[:, :, h], z[:, :, h] @ w_o[:, h].T, rtol=1e-5, atol=1e-6)
    # and equals what plain o_proj gives when head_out is not asked for
    _, plain = model.run_with_cache(ids, names="blocks.*.attn.out")
    for i in range(N_LAYERS):
        torch.testing.assert_close(plain[f"blocks.{i}.attn.out"], cache[f"blocks.{i}.attn.out"], rtol=1e-5, atol=1e-6)


def test_z_is_pattern_times_values(full):
    _, cache = full
    group = H // KV
    for i in range(N_LAYERS):
        v = cache[f"blocks.{i}.attn.v"].repeat_interleave(group, dim=2)  # [b, s, h, hd]
        z = torch.einsum("bhqk,bkhe->bqhe", cache[f"blocks.{i}.attn.pattern"], v)
        torch.testing.assert_close(z, cache[f"blocks.{i}.attn.z"], rtol=1e-5, atol=1e-6)


def test_pattern_is_softmax_of_scores(full):
    _, cache = full
    for i in range(N_LAYERS):
        scores = cache[f"blocks.{i}.attn.scores"]
        torch.testing.assert_close(torch.softmax(scores, -1), cache[f"blocks.{i}.attn.pattern"], rtol=1e-6, atol=1e-7)


def test_pattern_rows_sum_to_one_and_respect_causal_and_window(model, cfg, full):
    _, cache = full
    local_layers = [i for i in range(N_LAYERS) if not cfg.is_global(i)]
    assert local_layers == [0, 1, 2, 3, 4]  # layer 5 is global: (5 + 1) % 6 == 0
    for i in range(N_LAYERS):
        pattern = cache[f"blocks.{i}.attn.pattern"]
        torch.testing.assert_close(pattern.sum(-1), torch.ones(B, H, S), rtol=0, atol=1e-6)
        ok = allowed_keys(S, None if cfg.is_global(i) else WINDOW)
        assert (pattern[..., ~ok] == 0).all(), f"layer {i}: attention to a masked key"
        assert (pattern[..., ok] > 0).all(), f"layer {i}: a visible key got no weight"
        assert (cache[f"blocks.{i}.attn.scores"][..., ~ok] == float("-inf")).all()
    # local layers see exactly WINDOW keys (itself included) once the window is full
    assert int(allowed_keys(S, WINDOW)[-1].sum()) == WINDOW
    assert (cache["blocks.0.attn.pattern"][..., S - 1, : S - WINDOW] == 0).all()
    assert (cache[f"blocks.{N_LAYERS - 1}.attn.pattern"][..., S - 1, :] > 0).all()


def test_scores_are_scaled_rotated_q_dot_k(full, cfg):
    _, cache = full
    group = H // KV
    for i in (0, N_LAYERS - 1):
        q = cache[f"blocks.{i}.attn.q_rot"]
        k = cache[f"blocks.{i}.attn.k_rot"].repeat_interleave(group, dim=2)
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) * cfg.query_pre_attn_scalar**-0.5
        ok = allowed_keys(S, None if cfg.is_global(i) else WINDOW)
        torch.testing.assert_close(scores[..., ok], cache[f"blocks.{i}.attn.scores"][..., ok], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- MLP algebra
def test_mlp_hidden_is_act_times_up(model, full):
    _, cache = full
    for i in range(N_LAYERS):
        b = f"blocks.{i}.mlp"
        torch.testing.assert_close(cache[f"{b}.hidden"], cache[f"{b}.act"] * cache[f"{b}.up"], rtol=0, atol=0)
        gate = cache[f"{b}.gate"]
        gelu_tanh = 0.5 * gate * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)))
        torch.testing.assert_close(cache[f"{b}.act"], gelu_tanh, rtol=1e-5, atol=1e-7)
        w_down = model.blocks[i].mlp.down_proj.weight  # [d, f]
        torch.testing.assert_close(cache[f"{b}.out"], cache[f"{b}.hidden"] @ w_down.T, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- fused vs explicit
Z_AND_LOGITS = ["blocks.*.attn.z", "logits"]


def _padded_batch(ids: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad row 0 to 2 real tokens and row 1 to 5 (left or right); row 2 stays full."""
    ids, mask = ids.clone(), torch.ones_like(ids)
    for row, n_real in ((0, 2), (1, 5)):
        pad = slice(0, S - n_real) if side == "left" else slice(n_real, S)
        mask[row, pad] = 0
        ids[row, pad] = 0
    return ids, mask


@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("explicit_via", ["eager", "hook_pattern", "hook_scores", "hook_head_out"])
def test_fused_and_explicit_attention_agree(model, ids, padding, explicit_via, monkeypatch):
    mask = None
    if padding is not None:
        ids, mask = _padded_batch(ids, padding)
    fused_logits, fused = model.run_with_cache(ids, names=Z_AND_LOGITS, attention_mask=mask)
    assert not any(".attn.pattern" in n for n in fused)

    names = list(Z_AND_LOGITS)
    if explicit_via == "eager":
        monkeypatch.setattr(model, "attn_impl", "eager")
    else:
        names.append("blocks.*.attn." + explicit_via.removeprefix("hook_"))
    explicit_logits, explicit = model.run_with_cache(ids, names=names, attention_mask=mask)
    monkeypatch.undo()

    torch.testing.assert_close(explicit_logits, fused_logits, rtol=1e-5, atol=1e-5)
    for i in range(N_LAYERS):
        torch.testing.assert_close(explicit[f"blocks.{i}.attn.z"], fused[f"blocks.{i}.attn.z"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_leaves_real_tokens_unchanged(model, ids, side):
    """A padded row's real tokens get the logits of the same tokens run alone (both paths)."""
    padded, mask = _padded_batch(ids, side)
    for impl in ("auto", "eager"):
        model.attn_impl = impl
        try:
            logits = model(padded, attention_mask=mask)
            for row in range(B):
                real = mask[row].bool()
                alone = model(padded[row, real][None])
                torch.testing.assert_close(logits[row, real], alone[0], rtol=1e-5, atol=1e-5)
        finally:
            model.attn_impl = "auto"


@pytest.mark.parametrize("side", ["left", "right"])
def test_pattern_ignores_padding_keys(model, cfg, ids, side):
    padded, mask = _padded_batch(ids, side)
    _, cache = model.run_with_cache(padded, names="blocks.*.attn.pattern", attention_mask=mask)
    for i in range(N_LAYERS):
        pattern = cache[f"blocks.{i}.attn.pattern"]  # [b, h, q, k]
        torch.testing.assert_close(pattern.sum(-1), torch.ones(B, H, S), rtol=0, atol=1e-6)
        ok = allowed_keys(S, None if cfg.is_global(i) else WINDOW)
        for row in range(B):
            real = mask[row].bool()
            visible = ok[real] & real[None, :]  # real queries: causal, in window, real keys only
            assert (pattern[row][:, real][..., ~visible] == 0).all(), (i, row)
            assert (pattern[row][:, real][..., visible] > 0).all(), (i, row)


@pytest.fixture
def sdpa_calls(monkeypatch) -> list[int]:
    """Counts calls of torch.nn.functional.scaled_dot_product_attention (the fused path)."""
    calls: list[int] = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


@pytest.mark.parametrize("names, fused_layers", [
    ((), N_LAYERS),
    ("blocks.*.resid_post", N_LAYERS),
    ("blocks.3.resid_post", N_LAYERS),
    (["blocks.*.attn.z", "blocks.*.attn.q_rot", "blocks.*.attn.out", "logits"], N_LAYERS),
    ("blocks.2.attn.pattern", N_LAYERS - 1),
    ("blocks.{1,4}.attn.scores", N_LAYERS - 2),
    ("blocks.0.attn.head_out", N_LAYERS - 1),
    (None, 0),
])
def test_only_explicit_sites_switch_off_the_fused_path(model, ids, sdpa_calls, names, fused_layers):
    if names == ():
        model(ids)
    else:
        model.run_with_cache(ids, names=names)
    assert len(sdpa_calls) == fused_layers


def test_hooking_resid_post_keeps_fused_path_with_hooks(model, ids, sdpa_calls):
    with model.hooks({"blocks.*.resid_post": lambda x, site: None}):
        model(ids)
    assert len(sdpa_calls) == N_LAYERS


def test_eager_never_calls_fused_kernel(model, ids, sdpa_calls, monkeypatch):
    monkeypatch.setattr(model, "attn_impl", "eager")
    model(ids)
    assert sdpa_calls == []


# ---------------------------------------------------------------------------- the cache
def test_stack_resid_post(full):
    _, cache = full
    stacked = cache.stack("resid_post")
    assert stacked.shape == (N_LAYERS, B, S, D)
    for i in range(N_LAYERS):
        torch.testing.assert_close(stacked[i], cache[f"blocks.{i}.resid_post"], rtol=0, atol=0)
    assert cache.stack("attn.pattern").shape == (N_LAYERS, B, H, S, S)


def test_stack_of_uncached_kind_raises(model, ids):
    _, cache = model.run_with_cache(ids, names="blocks.*.resid_post")
    with pytest.raises(KeyError):
        cache.stack("mlp.out")
    with pytest.raises(KeyError, match="mlp.out"):
        cache["blocks.0.mlp.out"]


def test_nbytes_is_sum_of_element_sizes(full):
    _, cache = full
    expected = sum(t.numel() * t.element_size() for t in cache.values())
    assert cache.nbytes == expected
    numel = sum(math.prod(shape) for shape in documented_names().values())
    assert cache.nbytes == 4 * numel


def test_cache_dtype_bf16(model, ids, full):
    logits32, cache32 = full
    logits, cache = model.run_with_cache(ids, names=None, device="cpu", dtype=torch.bfloat16)
    assert logits.dtype == torch.float32  # storing the cache in bf16 does not change the run
    torch.testing.assert_close(logits, logits32, rtol=1e-5, atol=1e-5)
    assert set(cache) == set(cache32)
    assert {t.dtype for t in cache.values()} == {torch.bfloat16}
    assert cache.nbytes * 2 == cache32.nbytes
    for name in ("embed", "blocks.2.mlp.hidden", "blocks.5.attn.pattern", "logits"):
        torch.testing.assert_close(cache[name], cache32[name].to(torch.bfloat16), rtol=1e-2, atol=1e-2)


def test_cache_device(model, ids):
    _, cache = model.run_with_cache(ids, names="blocks.*.resid_post", device="meta")
    assert len(cache) == N_LAYERS
    assert {t.device.type for t in cache.values()} == {"meta"}
    _, cache = model.run_with_cache(ids, names="blocks.*.resid_post", device="cpu")
    assert {t.device.type for t in cache.values()} == {"cpu"}


def test_cache_subset_matches_full_cache(model, ids, full):
    _, cache_all = full  # the full cache ran explicit attention, the subset runs fused: fp32 rounding
    logits, cache = model.run_with_cache(ids, names="blocks.{0,3}.mlp.*")
    assert list(cache) == [f"blocks.{i}.mlp.{k}" for i in (0, 3) for k in ("gate", "act", "up", "hidden", "out")]
    for name in cache:
        torch.testing.assert_close(cache[name], cache_all[name], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- Hugging Face aliases
@pytest.mark.parametrize("alias, canonical", [
    ("model.layers.3.post_feedforward_layernorm", "blocks.3.post_mlp_norm"),
    ("model.layers.3", "blocks.3.resid_post"),
    ("model.layers.3.self_attn.o_proj.input", "blocks.3.attn.z"),
    ("model.layers.3.self_attn.o_proj", "blocks.3.attn.out"),
    ("model.layers.3.post_attention_layernorm", "blocks.3.post_attn_norm"),
    ("model.layers.3.pre_feedforward_layernorm", "blocks.3.pre_mlp_norm"),
    ("model.layers.3.input_layernorm", "blocks.3.input_norm"),
    ("model.layers.3.mlp.down_proj.input", "blocks.3.mlp.hidden"),
    ("model.layers.3.mlp", "blocks.3.mlp.out"),
    ("model.layers.0", "blocks.0.resid_post"),
    ("model.embed_tokens", "embed"),
    ("model.norm", "final_norm"),
])
def test_hf_alias_caches_canonical_site(model, ids, alias, canonical):
    _, by_alias = model.run_with_cache(ids, names=alias)
    _, by_name = model.run_with_cache(ids, names=canonical)
    assert list(by_alias) == [canonical]
    torch.testing.assert_close(by_alias[canonical], by_name[canonical], rtol=0, atol=0)


def test_hf_aliases_mixed_with_canonical_names(model, ids):
    _, cache = model.run_with_cache(ids, names=["model.layers.3", "blocks.3.resid_post", "model.layers.1.mlp"])
    assert list(cache) == ["blocks.1.mlp.out", "blocks.3.resid_post"]
