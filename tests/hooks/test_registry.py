"""The hook registry: name resolution, errors that help, scopes that always clean up, hook order,
identity and replacing hooks, and what a hook is told (Site)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import interp.hooks as hooks
from interp.hooks import HookError, HookRegistry, Site, SiteNames, UnknownSiteError
from interp.model import Gemma3, Gemma3Config, hf_aliases, site_names
from interp.model.sites import LAYER_FORMAT

N_LAYERS = 6
CFG = Gemma3Config(n_layers=N_LAYERS, d_model=32, d_mlp=64, n_heads=4, n_kv_heads=2, d_head=8, vocab_size=100,
                   window=4)
MLP_KINDS = ("gate", "act", "up", "hidden", "out")
EXPLICIT = (".attn.scores", ".attn.pattern", ".attn.head_out")


@pytest.fixture(scope="module")
def model() -> Gemma3:
    return Gemma3.from_config(CFG, seed=0)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def clean(model, ids) -> torch.Tensor:
    return model(ids)


@pytest.fixture(autouse=True)
def _registry_clean(model):
    yield
    assert not model.registry.active, "a test left hooks behind"


@pytest.fixture
def reg() -> HookRegistry:
    """A stand-alone registry with the model's names and aliases (no forward pass needed)."""
    return HookRegistry(SiteNames(site_names(CFG), hf_aliases(CFG), layer_format=LAYER_FORMAT))


def snapshot(reg: HookRegistry) -> dict[str, list[int]]:
    return {name: [id(r.fn) for r in regs] for name, regs in reg.active.items()}


def fire(reg: HookRegistry, name: str, x: torch.Tensor, layer=None) -> torch.Tensor:
    return reg.run().fire(name, x, layer)


# ---------------------------------------------------------------------------- resolution
def test_resolve_exact(reg):
    assert reg.resolve("blocks.3.attn.pattern") == ["blocks.3.attn.pattern"]
    assert reg.resolve("embed") == ["embed"]
    assert reg.resolve("logits") == ["logits"]


def test_resolve_glob(reg):
    assert reg.resolve("blocks.*.attn.pattern") == [f"blocks.{i}.attn.pattern" for i in range(N_LAYERS)]
    assert reg.resolve("blocks.2.mlp.*") == [f"blocks.2.mlp.{k}" for k in MLP_KINDS]
    assert reg.resolve("blocks.?.resid_post") == [f"blocks.{i}.resid_post" for i in range(N_LAYERS)]
    assert reg.resolve("blocks.[02].resid_mid") == ["blocks.0.resid_mid", "blocks.2.resid_mid"]
    assert reg.resolve("blocks.1.attn.[qk]") == ["blocks.1.attn.q", "blocks.1.attn.k"]


def test_resolve_braces(reg):
    assert reg.resolve("blocks.{3,5}.mlp.*") == [f"blocks.{i}.mlp.{k}" for i in (3, 5) for k in MLP_KINDS]
    assert reg.resolve("blocks.{5,3}.{resid_pre,resid_post}") == [
        "blocks.3.resid_pre", "blocks.3.resid_post", "blocks.5.resid_pre", "blocks.5.resid_post"]
    assert reg.resolve("{embed,logits}") == ["embed", "logits"]


def test_resolve_list_is_deduplicated_and_in_model_order(reg):
    got = reg.resolve(["logits", "blocks.1.mlp.out", "blocks.*.mlp.out", "embed", "embed"])
    assert got == ["embed"] + [f"blocks.{i}.mlp.out" for i in range(N_LAYERS)] + ["logits"]
    with pytest.raises(UnknownSiteError, match="empty list"):
        reg.resolve([])


def test_resolve_predicate(reg):
    assert reg.resolve(lambda n: n.endswith("resid_pre") and n.startswith("blocks.4")) == ["blocks.4.resid_pre"]
    with pytest.raises(UnknownSiteError, match="matches no site"):
        reg.resolve(lambda n: False)
    assert reg.resolve(lambda n: True) == list(reg.names)


def test_resolve_none_is_everything(reg):
    assert reg.resolve(None) == list(reg.names) == site_names(CFG)
    assert len(reg.resolve(None)) == 3 + 24 * N_LAYERS


def test_resolve_alias(reg):
    assert reg.resolve("model.layers.3.post_feedforward_layernorm") == ["blocks.3.post_mlp_norm"]
    assert reg.resolve("model.layers.3") == ["blocks.3.resid_post"]
    assert reg.resolve("model.layers.3.self_attn.o_proj.input") == ["blocks.3.attn.z"]
    assert reg.resolve(["model.layers.1", "blocks.1.resid_post"]) == ["blocks.1.resid_post"]
    assert reg.resolve("model.layers.{1,2}") == ["blocks.1.resid_post", "blocks.2.resid_post"]


def test_aliases_must_point_to_real_names():
    with pytest.raises(ValueError, match="unknown names"):
        SiteNames(["a"], {"b": "nowhere"})


@pytest.mark.parametrize("bad, suggestion", [
    ("blocks.0.attn.patern", "blocks.0.attn.pattern"),
    ("blocks.*.attn.patern", "attn.pattern"),
    ("blocks.2.resid", "blocks.2.resid_pre"),
    ("blocks.0.mlp.gelu", "blocks.0.mlp."),
    ("blocks.1.mlp_out", "blocks.1.mlp.out"),
    ("resid_post", "resid_post"),
    ("embd", "embed"),
])
def test_unknown_name_suggests_close_names(reg, bad, suggestion):
    with pytest.raises(UnknownSiteError) as info:
        reg.resolve(bad)
    msg = str(info.value)
    assert repr(bad) in msg or bad in msg
    assert "Did you mean" in msg
    suggested = msg.split("Did you mean:", 1)[1]
    first = suggested.split(",")[0].strip()
    assert suggestion in first, msg
    assert isinstance(info.value, KeyError)  # UnknownSiteError is a KeyError ...
    assert not msg.startswith(("'", '"'))  # ... but prints its message unquoted


def test_misspelled_hf_alias_suggests_the_alias_or_its_site(reg):
    """Aliases are valid names too, so a typo in one should be caught like any other."""
    with pytest.raises(UnknownSiteError) as info:
        reg.resolve("model.layers.3.post_feedforward_layernrom")
    msg = str(info.value)
    assert "Did you mean" in msg, msg
    first = msg.split("Did you mean:", 1)[1].split(",")[0].strip().rstrip("?")
    assert first in ("model.layers.3.post_feedforward_layernorm", "blocks.3.post_mlp_norm"), msg


def test_gelu_suggests_gate_or_act(reg):
    with pytest.raises(UnknownSiteError) as info:
        reg.resolve("blocks.0.mlp.gelu")
    suggested = str(info.value).split("Did you mean:", 1)[1]
    assert "blocks.0.mlp.gate" in suggested or "blocks.0.mlp.act" in suggested


def test_unknown_name_in_a_list_raises(reg):
    with pytest.raises(UnknownSiteError, match="blocks.1.attn.zz"):
        reg.resolve(["blocks.1.attn.z", "blocks.1.attn.zz"])


def test_brace_alternative_that_matches_nothing_raises(reg):
    """`blocks.{3,99}.mlp.out` on a 6-layer model is a typo, not a request for layer 3 only."""
    with pytest.raises(UnknownSiteError, match="99"):
        reg.resolve("blocks.{3,99}.mlp.out")


def test_non_string_name_is_a_type_error(reg):
    with pytest.raises(TypeError):
        reg.resolve(["embed", 3])


def test_model_hooks_unknown_name_adds_nothing(model, ids, clean):
    with pytest.raises(UnknownSiteError, match="blocks.0.attn.pattern"):
        with model.hooks({"blocks.0.mlp.out": lambda x, s: x * 0, "blocks.0.attn.patern": lambda x, s: None}):
            pass
    assert not model.registry.active
    with pytest.raises(TypeError):
        with model.hooks({"blocks.0.mlp.out": lambda x, s: x * 0, "blocks.1.mlp.out": "not callable"}):
            pass
    assert not model.registry.active
    assert torch.equal(model(ids), clean)


# ---------------------------------------------------------------------------- hook errors
def test_wrong_shape_raises_hook_error_naming_site_and_shapes(model, ids, clean):
    with pytest.raises(HookError) as info:
        model.run_with_hooks(ids, {"blocks.2.mlp.out": lambda x, s: x[:, :-1]})
    msg = str(info.value)
    assert "blocks.2.mlp.out" in msg
    assert "(2, 5, 32)" in msg and "(2, 6, 32)" in msg
    assert not model.registry.active
    assert torch.equal(model(ids), clean)


def test_wrong_dtype_raises_hook_error_naming_site_and_dtypes(model, ids, clean):
    with pytest.raises(HookError) as info:
        model.run_with_hooks(ids, {"blocks.1.attn.q": lambda x, s: x.double()})
    msg = str(info.value)
    assert "blocks.1.attn.q" in msg and "float64" in msg and "float32" in msg
    assert not model.registry.active
    assert torch.equal(model(ids), clean)


@pytest.mark.parametrize("value", [1.0, [1, 2], "x", (None,)], ids=["float", "list", "str", "tuple"])
def test_non_tensor_return_raises(model, ids, clean, value):
    with pytest.raises(HookError, match="blocks.0.resid_post"):
        model.run_with_hooks(ids, {"blocks.0.resid_post": lambda x, s: value})
    assert not model.registry.active
    assert torch.equal(model(ids), clean)


def test_hook_error_is_raised_through_run_with_cache(model, ids, clean):
    with pytest.raises(HookError, match="logits"):
        model.run_with_cache(ids, hooks={"logits": lambda x, s: x[..., :3]})
    assert not model.registry.active
    assert torch.equal(model(ids), clean)


# ---------------------------------------------------------------------------- exceptions clean up
class Boom(Exception):
    pass


def boom(x, site):
    raise Boom(site.name)


ENTRY_POINTS = ["hooks", "run_with_hooks", "run_with_cache", "run_with_cache_hooks"]


def _run_with_failing_hook(model, ids, spec, entry):
    if entry == "hooks":
        with model.hooks({"blocks.*.resid_mid": lambda x, s: x * 2, spec: boom}):
            model(ids)
    elif entry == "run_with_hooks":
        model.run_with_hooks(ids, [("blocks.*.resid_mid", lambda x, s: x * 2), (spec, boom)])
    elif entry == "run_with_cache":  # a caching run whose names include the failing site
        with model.hooks({spec: boom}):
            model.run_with_cache(ids, names=None)
    else:
        model.run_with_cache(ids, names="blocks.*.resid_post", hooks={"blocks.*.resid_mid": lambda x, s: x * 2,
                                                                       spec: boom})


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("spec", ["embed", "blocks.3.attn.pattern", "blocks.5.mlp.hidden", "logits"])
def test_exception_in_hook_leaves_no_hooks(model, ids, clean, entry, spec):
    with pytest.raises(Boom):
        _run_with_failing_hook(model, ids, spec, entry)
    assert model.registry.active == {}
    assert torch.equal(model(ids), clean)
    _, cache = model.run_with_cache(ids, names="logits")
    assert torch.equal(cache["logits"], clean)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, StopIteration, RuntimeError, KeyError, HookError])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_any_exception_type_leaves_no_hooks(model, ids, clean, entry, exc):
    def raise_it(x, site):
        raise exc("from a hook")

    with pytest.raises(exc):
        if entry == "hooks":
            with model.hooks({"blocks.2.attn.z": raise_it}):
                model(ids)
        elif entry == "run_with_hooks":
            model.run_with_hooks(ids, {"blocks.2.attn.z": raise_it})
        elif entry == "run_with_cache":
            model.run_with_cache(ids, names="blocks.*.attn.z", hooks={"blocks.2.attn.z": raise_it})
        else:
            model.run_with_cache(ids, names=None, hooks={"blocks.2.attn.pattern": raise_it})
    assert model.registry.active == {}
    assert torch.equal(model(ids), clean)


def test_failing_cache_storage_leaves_no_hooks(model, ids, clean):
    with pytest.raises(RuntimeError, match="no_such_device"):
        model.run_with_cache(ids, names="blocks.*.resid_post", device="no_such_device")
    assert model.registry.active == {}
    assert torch.equal(model(ids), clean)


def test_exception_in_inner_scope_keeps_outer_hooks(model, ids, clean):
    def double(x, s):
        return x * 2

    with model.hooks({"blocks.1.mlp.out": double}):
        before = snapshot(model.registry)
        doubled = model(ids)
        with pytest.raises(Boom):
            with model.hooks({"blocks.1.mlp.out": boom, "blocks.2.mlp.out": double}):
                model(ids)
        assert snapshot(model.registry) == before
        assert torch.equal(model(ids), doubled)
    assert model.registry.active == {}
    assert not torch.equal(doubled, clean)


def test_exception_in_scope_body_cleans_up(model):
    with pytest.raises(Boom):
        with model.hooks({"blocks.*.resid_post": lambda x, s: None}):
            assert len(model.registry.active) == N_LAYERS
            raise Boom("body")
    assert model.registry.active == {}


# ---------------------------------------------------------------------------- nested scopes (hypothesis)
SPECS = ["embed", "blocks.0.mlp.out", "blocks.*.resid_post", "blocks.{1,3}.attn.*", "model.layers.2",
         "blocks.2.resid_post", lambda n: n.endswith("mlp.out"), ["logits", "blocks.0.mlp.out"], None]


# A few function objects shared between scopes, so that the same hook registered by an outer and
# an inner scope on one site must be told apart by position (removing the wrong copy reorders).
POOL = [lambda x, s: None, lambda x, s: None, lambda x, s: None]


@st.composite
def scope_trees(draw, depth=0):
    """A scope: (spec index, function index; -1 = a fresh function) pairs, whether its body raises,
    and child scopes."""
    pairs = draw(st.lists(st.tuples(st.integers(0, len(SPECS) - 1), st.integers(-1, len(POOL) - 1)), max_size=3))
    raises = draw(st.integers(0, 5)) == 0
    children = [] if depth >= 3 else draw(st.lists(scope_trees(depth=depth + 1), max_size=2))
    return pairs, raises, children


def _conflicts(reg: HookRegistry, pairs) -> bool:
    """Whether one function reaches one site through two different specs."""
    via: dict[tuple[str, int], str] = {}
    for spec, fn in pairs:
        label = spec if isinstance(spec, str) else getattr(spec, "__name__", repr(spec))
        for n in reg.resolve(spec):
            if via.setdefault((n, id(fn)), str(label)) != str(label):
                return True
    return False


def _enter(reg: HookRegistry, tree, stack: list[list[tuple[str, object]]]):
    spec_fns, raises, children = tree
    pairs = [(SPECS[i], POOL[f] if f >= 0 else (lambda x, s: None)) for i, f in spec_fns]
    mine = [(n, fn) for spec, fn in pairs for n in reg.resolve(spec)]
    before = snapshot(reg)
    if _conflicts(reg, pairs):  # one function through two different specs: refused, nothing added
        with pytest.raises(ValueError, match="would run twice"):
            with reg.scope(pairs):
                pass
        assert snapshot(reg) == before
        return
    try:
        with reg.scope(pairs):
            # inside: every enclosing scope's hooks, then this scope's, in order
            expected: dict[str, list[int]] = {}
            for frame in stack + [mine]:
                for name, fn in frame:
                    expected.setdefault(name, []).append(id(fn))
            assert snapshot(reg) == expected
            stack.append(mine)
            try:
                for child in children:
                    _enter(reg, child, stack)
                if raises:
                    raise Boom("scope body")
            finally:
                stack.pop()
    except Boom:
        pass
    assert snapshot(reg) == before


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(scope_trees(), min_size=1, max_size=3))
def test_nested_scopes_restore_exactly(forest):
    reg = HookRegistry(SiteNames(site_names(CFG), hf_aliases(CFG), layer_format=LAYER_FORMAT))
    for tree in forest:
        _enter(reg, tree, [])
        assert reg.active == {}


def test_nested_scopes_on_model_restore(model, ids, clean):
    def plus(v):
        return lambda x, s: x + v

    with model.hooks({"blocks.1.resid_post": plus(1.0)}):
        one = model(ids)
        with model.hooks({"blocks.1.resid_post": plus(2.0)}):
            with model.hooks({"blocks.*.resid_post": lambda x, s: None}):
                assert len(model.registry.active) == N_LAYERS
                assert len(model.registry.active["blocks.1.resid_post"]) == 3
            assert list(model.registry.active) == ["blocks.1.resid_post"]
            three = model(ids)
        assert len(model.registry.active["blocks.1.resid_post"]) == 1
        assert torch.equal(model(ids), one)
    assert model.registry.active == {}
    with model.hooks({"blocks.1.resid_post": plus(3.0)}):
        assert torch.allclose(model(ids), three, atol=1e-5)


# ---------------------------------------------------------------------------- hook order and effects
def test_several_hooks_on_one_site_run_in_order(model, ids):
    seen = []

    def times2(x, s):
        seen.append(("times2", x.clone()))
        return x * 2

    def plus1(x, s):
        seen.append(("plus1", x.clone()))
        return x + 1

    def record(x, s):
        seen.append(("record", x.clone()))

    _, base = model.run_with_cache(ids, names="blocks.2.mlp.out")
    x0 = base["blocks.2.mlp.out"]
    _, cache = model.run_with_cache(ids, names="blocks.2.mlp.out",
                                    hooks={"blocks.2.mlp.out": times2, "blocks.{2,4}.mlp.out": plus1})
    assert [name for name, _ in seen[:2]] == ["times2", "plus1"]
    torch.testing.assert_close(seen[1][1], x0 * 2, rtol=0, atol=0)  # plus1 saw times2's output
    torch.testing.assert_close(cache["blocks.2.mlp.out"], x0 * 2 + 1, rtol=0, atol=0)

    seen.clear()
    model.run_with_hooks(ids, [("blocks.2.mlp.out", plus1), ("blocks.2.mlp.out", record),
                               ("blocks.2.mlp.out", times2), ("blocks.2.mlp.out", record)])
    assert [name for name, _ in seen] == ["plus1", "record", "times2", "record"]
    torch.testing.assert_close(seen[1][1], x0 + 1, rtol=0, atol=0)
    torch.testing.assert_close(seen[3][1], (x0 + 1) * 2, rtol=0, atol=0)


def test_inner_scope_hooks_run_after_outer(model, ids):
    order = []
    with model.hooks({"blocks.0.resid_post": lambda x, s: order.append("outer")}):
        with model.hooks({"blocks.0.resid_post": lambda x, s: order.append("inner")}):
            model(ids)
    assert order == ["outer", "inner"]


def _non_explicit(name: str) -> bool:
    return not name.endswith(EXPLICIT)


def test_identity_hooks_change_nothing_bit_for_bit(model, ids, clean):
    assert torch.equal(model.run_with_hooks(ids, {_non_explicit: lambda x, s: None}), clean)
    assert torch.equal(model.run_with_hooks(ids, {_non_explicit: lambda x, s: x}), clean)
    # hooking every site (explicit attention included) with None or x: the same run either way
    every_none = model.run_with_hooks(ids, {(lambda n: True): lambda x, s: None})
    every_x = model.run_with_hooks(ids, {lambda n: True: lambda x, s: x})
    assert torch.equal(every_none, every_x)
    torch.testing.assert_close(every_none, clean, rtol=1e-5, atol=1e-5)


def test_identity_hooks_leave_cache_bit_identical(model, ids):
    _, plain = model.run_with_cache(ids, names=_non_explicit)
    _, hooked = model.run_with_cache(ids, names=_non_explicit, hooks={_non_explicit: lambda x, s: x})
    assert list(plain) == list(hooked)
    assert all(torch.equal(plain[n], hooked[n]) for n in plain)


def test_zeroing_mlp_out_changes_logits_and_cache_shows_it(model, ids, clean):
    zero = lambda x, s: torch.zeros_like(x)  # noqa: E731
    ablated = model.run_with_hooks(ids, {"blocks.2.mlp.out": zero})
    assert not torch.allclose(ablated, clean)
    # (caching blocks.2.* would hook attn.pattern too and switch layer 2 to explicit attention)
    names = "blocks.2.{mlp.*,resid_mid,post_mlp_norm,resid_post}"
    logits, cache = model.run_with_cache(ids, names=names, hooks={"blocks.2.mlp.out": zero})
    assert torch.equal(logits, ablated)
    assert (cache["blocks.2.mlp.out"] == 0).all()
    assert (cache["blocks.2.post_mlp_norm"] == 0).all()
    assert torch.equal(cache["blocks.2.resid_post"], cache["blocks.2.resid_mid"])
    assert (cache["blocks.2.mlp.hidden"] != 0).any()  # upstream of the hook: untouched
    # via the Hugging Face name of the same tensor
    assert torch.equal(model.run_with_hooks(ids, {"model.layers.2.mlp": zero}), ablated)
    assert torch.equal(model(ids), clean)


def test_replacing_hook_in_place_of_upstream_site_propagates(model, ids, clean):
    _, base = model.run_with_cache(ids, names="blocks.3.resid_pre")
    logits, cache = model.run_with_cache(ids, names="blocks.3.resid_pre",
                                         hooks={"blocks.2.resid_post": lambda x, s: x + 1.0})
    torch.testing.assert_close(cache["blocks.3.resid_pre"], base["blocks.3.resid_pre"] + 1.0, rtol=0, atol=0)
    assert not torch.allclose(logits, clean)


# ---------------------------------------------------------------------------- Site
def test_site_carries_name_layer_positions(model, ids):
    sites: dict[str, Site] = {}
    model.run_with_hooks(ids, {(lambda n: True): lambda x, s: sites.setdefault(s.name, s) and None})
    assert list(sites) == model.site_names()
    assert sites["embed"].layer is None
    assert sites["final_norm"].layer is None and sites["logits"].layer is None
    for name, site in sites.items():
        assert isinstance(site, Site) and site.name == name
        if name.startswith("blocks."):
            assert site.layer == int(name.split(".")[1])
            assert site.kind == name.split(".", 2)[2]
        assert site.positions is not None
        assert site.positions.dtype == torch.long
        assert tuple(site.positions.shape) == tuple(ids.shape)
        assert torch.equal(site.positions, torch.arange(ids.shape[1]).expand_as(ids))
    assert sites["blocks.4.attn.pattern"].kind == "attn.pattern"


def test_site_positions_count_real_tokens_under_left_padding(model, ids):
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    seen = []
    model.run_with_hooks(ids, {"blocks.1.resid_post": lambda x, s: seen.append(s.positions.clone())},
                         attention_mask=mask)
    assert seen[0][0].tolist() == [0, 0, 0, 1, 2, 3]
    assert seen[0][1].tolist() == [0, 1, 2, 3, 4, 5]


def test_site_is_immutable():
    site = Site("blocks.1.attn.z", 1, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        site.name = "x"


def test_hooks_package_exports():
    for name in ("HookRegistry", "HookError", "UnknownSiteError", "Site", "ActivationCache", "caching_hook"):
        assert hasattr(hooks, name)


def test_resolved_names_are_not_matched_again(monkeypatch):
    from interp.hooks.registry import ResolvedNames

    reg = HookRegistry(SiteNames(["embed", "blocks.0.x", "blocks.1.x"], layer_format=LAYER_FORMAT))
    names = ResolvedNames(reg.resolve("blocks.*.x"))

    def no_matching(spec):
        raise AssertionError(f"resolved names matched again: {spec!r}")

    monkeypatch.setattr(reg.names, "resolve", no_matching)
    seen = []
    with reg.scope([(names, lambda x, site: seen.append(site.name))]):
        assert reg.resolve(names) == ["blocks.0.x", "blocks.1.x"]
        run = reg.run()
        for name in ("embed", "blocks.0.x", "blocks.1.x"):
            run.fire(name, torch.zeros(1), None)
        assert all(r.exact for r in reg.active["blocks.0.x"])  # a list of names is exact, as before
    assert seen == ["blocks.0.x", "blocks.1.x"]
