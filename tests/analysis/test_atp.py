"""Better attribution patching: integrated gradients, AtP* (exact attention softmax, GradDrop)
and edge attribution patching.

- IG with one step is AtP; more steps get closer to actual patching on average, and the layer-0
  residual scores add up to the whole effect (completeness along the embedding path).
- AtP*'s fix is exact on a model built here to be linear everywhere but one saturated softmax,
  where plain AtP misses the effect entirely; GradDrop equals a loop of backward passes written
  here with plain gradient hooks, and exposes a direct and an indirect path that cancel.
- Edge scores equal the derivative of the metric along one edge (autograd through a hook that
  feeds the sender's change to one receiver only), and add up to node scores as the residual
  stream's additivity says.
"""

from __future__ import annotations

import math

import pytest
import support
import torch

from interp.attribution import attribution_patch, attribution_patches
from interp.circuits.atp_star import _attend, _qkv
from interp.circuits.edge_attribution import EdgeScores, edge_attribution_patch
from interp.metrics import logit_diff
from interp.model import Gemma3, Gemma3Config
from interp.model.layers import RMSNorm
from interp.patching import SWEEPS, patch_sweep, patch_sweeps
from interp.tokens import Top

CLEAN = [2, 11, 23, 5, 40, 7, 19, 33]
CORRUPT = [2, 11, 31, 5, 40, 8, 19, 33]
ALL = list(SWEEPS)


@pytest.fixture(scope="module")
def model():
    m = support.make_model(support.TINY, sensitive=True)
    yield m
    assert not m.registry.active


def random_pairs(n: int, seq: int = 8, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        clean = torch.randint(3, 100, (seq,), generator=gen)
        clean[0] = 2
        corrupt = clean.clone()
        corrupt[3] = int(torch.randint(3, 100, (1,), generator=gen))
        out.append((clean.tolist(), corrupt.tolist()))
    return out


# ---------------------------------------------------------------------- integrated gradients
def test_ig_with_one_step_is_atp(model):
    atp = attribution_patches(model, CLEAN, CORRUPT, logit_diff(3, 4), ALL)
    ig = attribution_patches(model, CLEAN, CORRUPT, logit_diff(3, 4), ALL, method="ig", steps=1)
    for kind in ALL:
        torch.testing.assert_close(ig[kind].values, atp[kind].values, atol=1e-6, rtol=0)
        assert ig[kind].method == "integrated gradients (1 step)" and atp[kind].method == "attribution patching"
    chunked = attribution_patches(model, CLEAN, CORRUPT, logit_diff(3, 4), ALL, method="ig", steps=3, max_bytes=1)
    whole = attribution_patches(model, CLEAN, CORRUPT, logit_diff(3, 4), ALL, method="ig", steps=3)
    for kind in ALL:  # one alpha per batch gives the same means
        torch.testing.assert_close(chunked[kind].values, whole[kind].values, atol=1e-6, rtol=1e-6)


def test_ig_gets_closer_to_patching_with_more_steps(model):
    errors = {1: 0.0, 16: 0.0}
    for clean, corrupt in random_pairs(4):
        actual = patch_sweeps(model, clean, corrupt, logit_diff(3, 4), ["resid_pre", "attn.z"], progress=False)
        completeness = {}
        for steps in (1, 16, 64):
            est = attribution_patches(model, clean, corrupt, logit_diff(3, 4), ["resid_pre", "attn.z"], method="ig",
                                      steps=steps)
            if steps in errors:
                errors[steps] += sum(float((actual[k].values - est[k].values).abs().mean()) for k in actual)
            # the layer-0 residual is the embedding: its scores add up to the path integral, 1 in the limit
            completeness[steps] = abs(float(est["resid_pre"].values[0].sum()) - 1.0)
        assert completeness[64] < 0.1 and completeness[64] < completeness[1]
    assert errors[16] < 0.8 * errors[1]


# ---------------------------------------------------------------------- AtP*: saturation
def linear_but_softmax(n_layers: int) -> Gemma3:
    """Every RMSNorm ~ the identity (eps 1e8 >> mean x^2, weight 1e4 = sqrt(eps)), MLPs zero: the
    model is linear except its attention softmax. One head reads a query flag (dim 0) at the
    last token and keys from dim 1 (RoPE's slowest pair, ~no rotation); its values copy dims 5-7.
    With two layers, layer 0 attends uniformly and copies dim 3 into dim 1: it writes layer 1's keys."""
    cfg = Gemma3Config(n_layers=n_layers, d_model=8, d_mlp=8, n_heads=1, n_kv_heads=1, d_head=8, vocab_size=16,
                       eps=1e8)
    m = Gemma3.from_config(cfg, seed=0)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for mod in m.modules():
            if isinstance(mod, RMSNorm):
                mod.weight.fill_(1e4 - 1)
        if n_layers == 2:
            m.blocks[0].attn.v_proj.weight[3, 3] = 1.0
            m.blocks[0].attn.o_proj.weight[1, 3] = 1.0
        top = m.blocks[-1].attn
        top.q_proj.weight[3, 0] = 4.0
        top.k_proj.weight[3, 1] = 4.0
        for i in (5, 6, 7):
            top.v_proj.weight[i, i] = top.o_proj.weight[i, i] = 1.0
        e = torch.zeros(16, 8)
        e[2, 4] = 1.0  # BOS
        key = 1 if n_layers == 1 else 3
        e[10, key], e[10, 5] = (10.0, 1.0) if n_layers == 1 else (120.0, 1.0)  # clean token 1: the strongest key
        e[11, 7] = 1.0  # corrupt token 1: no key
        e[12, 1], e[12, 6] = 5.0 if n_layers == 1 else 10.0, 1.0  # token 2: the strongest key of the corrupt run
        e[13, 0] = 1.0  # the query
        e[14, 5], e[15, 6] = 1.0, 1.0  # what the metric reads
        m.embed.weight.copy_(e / math.sqrt(8))
    return m


@pytest.mark.parametrize("n_layers, site, cell", [(1, "resid_pre", (0, 1)), (2, "attn.z", (0, 0))])
def test_atp_star_is_exact_where_saturation_hides_the_effect(n_layers, site, cell):
    m = linear_but_softmax(n_layers)
    clean, corrupt, metric = [2, 10, 12, 13], [2, 11, 12, 13], logit_diff(14, 15)
    actual = patch_sweep(m, clean, corrupt, metric, site, progress=False)
    atp = attribution_patch(m, clean, corrupt, metric, site)
    star = attribution_patch(m, clean, corrupt, metric, site, method="atp*")
    assert star.method == "atp*"
    assert float(actual.values[cell]) > 0.45  # the patch moves the saturated attention
    assert abs(float(atp.values[cell])) < 0.05  # the gradient at the saturated softmax is ~0
    torch.testing.assert_close(star.values, actual.values, atol=1e-4, rtol=0)


def test_atp_star_recomputes_attention_as_the_model_does(model):
    """Sliding window (4 < 8 tokens), a global layer, grouped-query attention, RoPE."""
    names = ["blocks.*.resid_pre", "blocks.*.attn.z"]
    _, cache = model.run_with_cache(torch.tensor([CORRUPT]), names)
    pos = torch.arange(len(CORRUPT))[None]
    for layer in range(model.cfg.n_layers):
        with torch.no_grad():
            z = _attend(model, layer, *_qkv(model, layer, cache[f"blocks.{layer}.resid_pre"], pos))
        torch.testing.assert_close(z, cache[f"blocks.{layer}.attn.z"], atol=1e-5, rtol=1e-5)


def test_atp_star_is_atp_where_no_attention_reads_the_cell(model):
    atp = attribution_patches(model, CLEAN, CORRUPT, logit_diff(3, 4), ALL)
    star = attribution_patches(model, CLEAN, CORRUPT, logit_diff(3, 4), ALL, method="atp*")
    small = attribution_patches(model, CLEAN, CORRUPT, logit_diff(3, 4), ALL, method="atp*", max_bytes=1)
    last = model.cfg.n_layers - 1
    for kind in ALL:
        if kind != "resid_pre":  # the last layer's components and outputs reach the logits without attention
            torch.testing.assert_close(star[kind].values[last], atp[kind].values[last], atol=1e-6, rtol=0)
        assert star[kind].values.shape == atp[kind].values.shape
        torch.testing.assert_close(small[kind].values, star[kind].values, atol=1e-6, rtol=1e-5)  # one cell per batch
    assert not torch.allclose(star["resid_pre"].values, atp["resid_pre"].values, atol=1e-3)
    # positions before the first changed token change nothing: exactly 0, as in activation patching
    assert star["resid_pre"].values[:, :2].abs().max() == 0


# ---------------------------------------------------------------------- AtP*: GradDrop
def per_layer_dropped(model, kind):
    """AtP of ``kind`` with the gradient through each layer's residual contributions zeroed: one
    plain backward per layer ``[layers, *cell shape]`` (raw, not normalised)."""
    n = model.cfg.n_layers
    site = "attn.z" if kind.startswith("attn.z") else kind
    names = [f"blocks.{layer}.{site}" for layer in range(n)]
    metric = logit_diff(3, 4)
    _, clean = model.run_with_cache(torch.tensor([CLEAN]), names)
    out = []
    for drop in range(n):
        zero = {f"blocks.{drop}.post_attn_norm": lambda g, s: torch.zeros_like(g),
                f"blocks.{drop}.post_mlp_norm": lambda g, s: torch.zeros_like(g)}
        with model.backward_hooks(zero):
            _, corrupt, grads = model.run_with_grads(torch.tensor([CORRUPT]), lambda lg: metric(lg).sum(), names)
        rows = []
        for name in names:
            prod = ((clean[name] - corrupt[name]) * grads[name])[0].sum(-1)
            rows.append(prod.sum(0) if kind == "attn.z" else prod)
        out.append(torch.stack(rows))
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["resid_pre", "attn.z"])
def test_graddrop_equals_one_backward_per_layer(model, kind):
    got = attribution_patch(model, CLEAN, CORRUPT, logit_diff(3, 4), kind, graddrop=True)
    assert got.method == "attribution patching (graddrop)" and bool((got.values >= 0).all())
    span = got.clean_value - got.corrupt_value
    mags = (per_layer_dropped(model, kind) / span).abs()
    n = model.cfg.n_layers
    if kind == "attn.z":  # a head's own layer is left out: dropping it removes the head itself
        keep = ~torch.eye(n, dtype=torch.bool)[:, :, None]
        want = (mags * keep).sum(0) / (n - 1)
    else:
        want = mags.mean(0)
    torch.testing.assert_close(got.values, want, atol=1e-5, rtol=1e-5)
    star = attribution_patch(model, CLEAN, CORRUPT, logit_diff(3, 4), kind, method="atp*", graddrop=True)
    assert star.method == "atp* (graddrop)" and bool((star.values >= 0).all()) and star.values.shape == got.values.shape
    # one row per batch (a memory budget of 1 byte) changes nothing
    for method, full in (("atp", got), ("atp*", star)):
        small = attribution_patch(model, CLEAN, CORRUPT, logit_diff(3, 4), kind, method=method, graddrop=True,
                                  max_bytes=1)
        torch.testing.assert_close(small.values, full.values, atol=1e-6, rtol=1e-5)


def test_graddrop_exposes_paths_that_cancel():
    """One layer, linear (as above). At the last token, dim 5 goes straight to the logit and the MLP
    writes exactly minus it back (its gate reads a constant): the two paths cancel, so patching
    that token changes nothing and AtP says 0. Dropping the layer's gradient leaves the direct
    path: GradDrop gives its size. (The metric moves through token 1, which attention copies.)"""
    cfg = Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=1, n_kv_heads=1, d_head=8, vocab_size=16, eps=1e8)
    m = Gemma3.from_config(cfg, seed=0)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for mod in m.modules():
            if isinstance(mod, RMSNorm):
                mod.weight.fill_(1e4 - 1)
        b = m.blocks[0]
        b.attn.v_proj.weight[6, 6] = b.attn.o_proj.weight[6, 6] = 1.0  # uniform attention copies dim 6
        b.mlp.gate_proj.weight[0, 4] = 10.0  # gelu(10) = 10: a constant gate
        b.mlp.up_proj.weight[0, 5] = 1.0
        b.mlp.down_proj.weight[5, 0] = -0.1  # writes -dim 5
        e = torch.zeros(16, 8)
        e[2, 4] = e[10, 6] = e[12, 4] = e[13, 4] = 1.0  # BOS; token 1 (clean) carries dim 6
        e[12, 5] = 1.0  # last token, clean: dim 5 (cancelled); corrupt (13) lacks it
        e[14, 5] = e[14, 6] = 1.0  # the metric's token reads dims 5 and 6
        m.embed.weight.copy_(e / math.sqrt(8))
    clean, corrupt, metric = [2, 10, 12], [2, 11, 13], logit_diff(14, 15)
    actual = patch_sweep(m, clean, corrupt, metric, "resid_pre", progress=False)
    atp = attribution_patch(m, clean, corrupt, metric, "resid_pre")
    drop = attribution_patch(m, clean, corrupt, metric, "resid_pre", graddrop=True)
    assert abs(float(actual.values[0, 2])) < 1e-4 and abs(float(atp.values[0, 2])) < 1e-4
    assert float(actual.values[0, 1]) == pytest.approx(1.0, abs=1e-4)
    # the direct path alone: dim 5 of the last token (1) against the metric's span (token 1's copy, 1/3)
    assert float(drop.values[0, 2]) == pytest.approx(3.0, rel=1e-3)


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "sgd"}, r"unknown method 'sgd'; choose from 'atp', 'ig', 'atp\*'"),
    ({"method": "atp", "steps": 4}, r"steps= is for method='ig'"),
    ({"method": "ig", "graddrop": True}, r"graddrop=True goes with method='atp' or 'atp\*'"),
    ({"method": "ig", "steps": 0}, r"steps must be a positive integer"),
])
def test_bad_options_are_errors_and_leave_the_model_usable(model, kwargs, match):
    with torch.no_grad():
        before = model(torch.tensor([CORRUPT]))
    with pytest.raises(ValueError, match=match):
        attribution_patch(model, CLEAN, CORRUPT, logit_diff(3, 4), **kwargs)
    assert not model.registry.active
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([CORRUPT])), before)


# ---------------------------------------------------------------------- edge attribution patching
def test_edges_add_up_to_node_scores(model):
    edges = edge_attribution_patch(model, CLEAN, CORRUPT, logit_diff(3, 4))
    nodes = attribution_patches(model, CLEAN, CORRUPT, logit_diff(3, 4), ["attn.z", "resid_pre"])
    cfg = model.cfg
    assert edges.values.shape == (1 + cfg.n_layers * (cfg.n_heads + 1),
                                  cfg.n_layers * (cfg.n_heads + 2 * cfg.n_kv_heads + 1) + 1)
    sums = edges.values.sum(1)
    for layer in range(cfg.n_layers):
        for h in range(cfg.n_heads):
            i = edges.senders.index(f"L{layer}H{h}")
            # a head reaches its own layer's MLP and everything later, never its own layer's attention
            assert not edges.exists[i, edges.receivers.index(f"L{layer}H0.q")]
            assert edges.exists[i, edges.receivers.index(f"L{layer}.mlp")]
            assert float(sums[i]) == pytest.approx(float(nodes["attn.z"].values[layer, h]), rel=1e-4, abs=1e-5)
    assert float(sums[0]) == pytest.approx(float(nodes["resid_pre"].values[0].sum()), rel=1e-4)
    assert bool((edges.values[~edges.exists] == 0).all()) and edges.values.abs().max() > 0.1
    top = edges.top(3)
    assert isinstance(top[0], Top) and " -> " in top[0].label and abs(top[0].value) >= abs(top[2].value)
    assert len(edges.plot().data) == 1 and isinstance(edges, EdgeScores)


def _sender_change(model, cc, kc, sender):
    """The sender's change in the residual stream, computed independently (torch.func.jvp)."""
    if sender == "embed":
        return cc["embed"] - kc["embed"]
    layer = int(sender[1])
    block = model.blocks[layer]
    if sender.endswith(".mlp"):
        name = f"blocks.{layer}.post_mlp_norm"
        return cc[name] - kc[name]
    h, hd = int(sender.split("H")[1]), model.cfg.d_head
    dz = cc[f"blocks.{layer}.attn.z"] - kc[f"blocks.{layer}.attn.z"]
    head_out = dz[:, :, h] @ block.attn.o_proj.weight[:, h * hd:(h + 1) * hd].T
    return torch.func.jvp(block.post_attn_norm, (kc[f"blocks.{layer}.attn.out"],), (head_out,))[1]


@pytest.mark.parametrize("sender, receiver", [("L1H2", "L3H1.q"), ("L2.mlp", "L4KV1.k"), ("embed", "L0KV0.v"),
                                              ("L3H0", "L3.mlp"), ("L4.mlp", "logits"), ("L0H3", "L5H3.q")])
def test_an_edge_is_the_derivative_along_that_edge(model, sender, receiver):
    """d metric / d eps when only ``receiver`` reads ``resid + eps * sender's change``."""
    edges = edge_attribution_patch(model, CLEAN, CORRUPT, logit_diff(3, 4))
    value = float(edges.values[edges.senders.index(sender), edges.receivers.index(receiver)])
    sites = ["embed", "blocks.*.attn.z", "blocks.*.attn.out", "blocks.*.post_mlp_norm"]
    _, cc = model.run_with_cache(torch.tensor([CLEAN]), sites)
    _, kc = model.run_with_cache(torch.tensor([CORRUPT]), sites)
    delta = _sender_change(model, cc, kc, sender)
    eps = torch.zeros((), requires_grad=True)
    resid: dict[str, torch.Tensor] = {}

    def keep(x, s):  # the corrupt residual the receiver reads (upstream of the receiver, unchanged)
        resid["x"] = x

    if receiver == "logits":
        hooks = {"blocks.5.resid_post": lambda x, s: x + eps * delta}
    else:
        layer = int(receiver[1])
        block = model.blocks[layer]
        if receiver.endswith(".mlp"):
            hooks = {f"blocks.{layer}.resid_mid": keep,
                     f"blocks.{layer}.pre_mlp_norm": lambda x, s: block.pre_mlp_norm(resid["x"] + eps * delta)}
        else:
            kind, head = receiver[-1], int(receiver.split(".")[0].split("H" if "H" in receiver else "KV")[1])
            proj = getattr(block.attn, f"{kind}_proj")

            def feed(x, s):
                new = proj(block.input_norm(resid["x"] + eps * delta)).view(x.shape)
                x = x.clone()
                x[:, :, head] = new[:, :, head]
                return x

            hooks = {f"blocks.{layer}.resid_pre": keep,
                     f"blocks.{layer}.attn.{kind}": feed}
    with torch.enable_grad():
        m = logit_diff(3, 4)(model.run_with_hooks(torch.tensor([CORRUPT]), hooks))[0]
        (deriv,) = torch.autograd.grad(m, eps)
    span = edges.clean_value - edges.corrupt_value
    assert value == pytest.approx(float(deriv) / span, rel=1e-4, abs=1e-6)
    assert abs(value) > 1e-4  # a real edge
