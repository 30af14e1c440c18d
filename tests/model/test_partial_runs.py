"""Names a partial run cannot reach.

A hook or cache that names a site the run does not compute (a layer at or after
``stop_at_layer``, ``logits`` of a run that stops early, ``embed`` of a run that starts at a
layer) is an :class:`UnreachableSiteError` when named exactly; a glob that partly misses warns
and keeps the reachable sites; a cache glob with nothing reachable is an error. ``names=None``
with ``stop_at_layer`` caches exactly what the run computes. After every error the model has
no hooks left and gives the same logits.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager

import pytest
import support
import torch

from interp.hooks import UnknownSiteError
from interp.model import CacheTooLargeError, InputError, UnreachableSiteError

N_LAYERS = support.TINY.n_layers
STOP = 2


@pytest.fixture(scope="module")
def m():
    model = support.make_model(support.TINY)
    yield model
    assert not model.registry.active, "a test left hooks on the module's model"


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.tensor([[2, 5, 9, 14, 3, 7]])


@pytest.fixture(scope="module")
def clean(m, ids) -> torch.Tensor:
    return m(ids)


@pytest.fixture(scope="module")
def resid(m, ids) -> torch.Tensor:
    return m(ids, stop_at_layer=STOP)


def _assert_usable(m, ids, clean) -> None:
    assert not m.registry.active
    assert torch.equal(m(ids), clean)


@contextmanager
def eager(m):
    """Caching attn.scores/pattern/head_out runs the explicit attention path, which rounds
    differently from the fused kernel: compare such runs with an eager reference."""
    m.attn_impl = "eager"
    try:
        yield
    finally:
        m.attn_impl = "auto"


def _reachable(m, stop: int = STOP) -> list[str]:
    return [n for n in m.site_names() if n == "embed" or any(n.startswith(f"blocks.{i}.") for i in range(stop))]


class Recorder:
    """An identity hook that records the sites it saw."""

    def __init__(self):
        self.seen: list[str] = []

    def __call__(self, x, site):
        self.seen.append(site.name)
        return None


def test_class_hierarchy():
    assert issubclass(UnreachableSiteError, InputError) and issubclass(UnreachableSiteError, ValueError)


# ----------------------------------------------------------------------------- exact names
@pytest.mark.parametrize("name", [f"blocks.{STOP}.mlp.out", f"blocks.{N_LAYERS - 1}.attn.pattern", "final_norm",
                                  "logits"])
def test_run_with_hooks_on_an_exact_name_past_stop_raises(m, ids, clean, name):
    f = Recorder()
    with pytest.raises(UnreachableSiteError,
                       match=re.escape(name) + f".*cannot fire.*stops before layer {STOP}"):
        m.run_with_hooks(ids, {name: f}, stop_at_layer=STOP)
    assert f.seen == [], "the run must fail before it starts, not after running some layers"
    _assert_usable(m, ids, clean)


def test_hooks_scope_on_an_exact_name_past_stop_raises(m, ids, clean):
    f = Recorder()
    with m.hooks({"blocks.5.mlp.out": f}):
        with pytest.raises(UnreachableSiteError, match=r"blocks\.5\.mlp\.out.*stops before layer 2"):
            m(ids, stop_at_layer=2)
        assert f.seen == []
        assert set(m.registry.active) == {"blocks.5.mlp.out"}  # the scope itself is still open
        m(ids, stop_at_layer=6)  # a run that reaches the site is fine inside the same scope
    assert f.seen == ["blocks.5.mlp.out"]
    _assert_usable(m, ids, clean)


def test_an_exact_name_among_reachable_ones_still_raises(m, ids, clean):
    f = Recorder()
    with pytest.raises(UnreachableSiteError, match=r"blocks\.4\.resid_post"):
        m.run_with_hooks(ids, {"blocks.0.resid_post": f, "blocks.4.resid_post": f}, stop_at_layer=STOP)
    assert f.seen == []
    _assert_usable(m, ids, clean)


def test_run_with_cache_logits_with_stop_at_layer_raises(m, ids, clean):
    with pytest.raises(UnreachableSiteError, match=r"\['logits'\].*stop_at_layer=1.*does not compute"):
        m.run_with_cache(ids, names=["logits"], stop_at_layer=1)
    with pytest.raises(UnreachableSiteError, match=r"blocks\.3\.mlp\.out"):
        m.run_with_cache(ids, names=["embed", "blocks.3.mlp.out"], stop_at_layer=STOP)
    _assert_usable(m, ids, clean)


def test_run_with_cache_extra_hooks_past_stop_raise(m, ids, clean):
    f = Recorder()
    with pytest.raises(UnreachableSiteError, match=r"blocks\.5\.mlp\.out"):
        m.run_with_cache(ids, names="embed", hooks={"blocks.5.mlp.out": f}, stop_at_layer=STOP)
    assert f.seen == []
    _assert_usable(m, ids, clean)


def test_start_at_layer_with_a_hook_on_embed_raises(m, ids, clean, resid):
    f = Recorder()
    with pytest.raises(UnreachableSiteError, match=r"embed.*starts at layer 2"):
        m.run_with_hooks(resid, {"embed": f}, start_at_layer=STOP)
    with pytest.raises(UnreachableSiteError, match=r"blocks\.1\.mlp\.out.*starts at layer 2"):
        m.run_with_hooks(resid, {"blocks.1.mlp.out": f}, start_at_layer=STOP)
    with pytest.raises(UnreachableSiteError, match=r"embed"):
        m.run_with_cache(resid, names="embed", start_at_layer=STOP)
    assert f.seen == []
    # both bounds at once
    with pytest.raises(UnreachableSiteError, match=r"starts at layer 2 and stops before layer 4"):
        m.run_with_hooks(resid, {"blocks.4.mlp.out": f}, start_at_layer=STOP, stop_at_layer=4)
    _assert_usable(m, ids, clean)
    assert torch.equal(m(resid, start_at_layer=STOP), clean)


def test_a_residual_input_at_layer_zero_cannot_hook_embed(m, ids, clean):
    emb = m.run_with_cache(ids, names="embed")[1]["embed"]
    with pytest.raises(UnreachableSiteError, match="embed"):
        m.run_with_hooks(emb, {"embed": Recorder()})
    _assert_usable(m, ids, clean)


# ----------------------------------------------------------------------------- globs
def test_a_cache_glob_partly_unreachable_warns_and_caches_the_reachable_sites(m, ids, clean, resid):
    with pytest.warns(UserWarning, match=r"blocks\.\*\.resid_post.*not computed.*blocks\.2\.resid_post"):
        out, cache = m.run_with_cache(ids, names="blocks.*.resid_post", stop_at_layer=STOP)
    assert list(cache) == [f"blocks.{i}.resid_post" for i in range(STOP)]
    assert torch.equal(out, resid)
    _, full = m.run_with_cache(ids, names="blocks.*.resid_post")
    for k in cache:
        assert torch.equal(cache[k], full[k])
    _assert_usable(m, ids, clean)


@pytest.mark.parametrize("names", ["blocks.{3,4}.mlp.out", "final_*", ["blocks.5.*", "logits"],
                                   lambda n: n.startswith("blocks.5.")])
def test_a_cache_spec_with_nothing_reachable_raises(m, ids, clean, names):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an error, not a warning followed by an empty cache
        with pytest.raises(UnreachableSiteError, match="this run .*(does not compute|computes)"):
            m.run_with_cache(ids, names=names, stop_at_layer=STOP)
    _assert_usable(m, ids, clean)


def test_a_glob_matching_no_site_at_all_is_unknown_not_unreachable(m, ids, clean):
    with pytest.raises(UnknownSiteError, match="blocks.*.mlp.outt"):
        m.run_with_cache(ids, names="blocks.*.mlp.outt", stop_at_layer=STOP)
    _assert_usable(m, ids, clean)


def test_a_hook_glob_partly_unreachable_warns_and_hooks_the_reachable_sites(m, ids, clean, resid):
    f = Recorder()
    with m.hooks({"blocks.*.mlp.out": f}):
        with pytest.warns(UserWarning, match=r"4 site\(s\) matched by \['blocks\.\*\.mlp\.out'\] will not fire.*"
                                             r"stops before layer 2"):
            out = m(ids, stop_at_layer=STOP)
    assert f.seen == ["blocks.0.mlp.out", "blocks.1.mlp.out"]
    assert torch.equal(out, resid)
    _assert_usable(m, ids, clean)


def test_a_glob_that_reaches_everything_does_not_warn(m, ids, clean, resid):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with m.hooks({"blocks.{0,1}.mlp.*": Recorder()}):
            assert torch.equal(m(ids, stop_at_layer=STOP), resid)
        _, cache = m.run_with_cache(ids, names="blocks.{0,1}.resid_post", stop_at_layer=STOP)
    assert len(cache) == 2
    _assert_usable(m, ids, clean)


# ----------------------------------------------------------------------------- names=None
@pytest.mark.parametrize("stop", [0, 1, STOP, N_LAYERS])
def test_names_none_caches_exactly_the_sites_the_run_computes(m, ids, clean, stop):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # names=None asks for "everything computed": no warning
        out, cache = m.run_with_cache(ids, stop_at_layer=stop)
    expected = _reachable(m, stop)
    assert list(cache) == expected
    for kind in ("attn.scores", "attn.pattern", "attn.head_out"):  # explicit-path sites are included
        assert [n for n in cache if n.endswith(kind)] == [f"blocks.{i}.{kind}" for i in range(stop)]
    assert "logits" not in cache and "final_norm" not in cache
    with eager(m):
        assert torch.equal(out, m(ids, stop_at_layer=stop))
    _assert_usable(m, ids, clean)


def test_names_none_with_start_at_layer_caches_the_later_layers_only(m, ids, clean, resid):
    out, cache = m.run_with_cache(resid, start_at_layer=STOP)
    expected = [n for n in m.site_names() if n in ("final_norm", "logits")
                or any(n.startswith(f"blocks.{i}.") for i in range(STOP, N_LAYERS))]
    assert list(cache) == expected
    with eager(m):
        assert torch.equal(out, m(resid, start_at_layer=STOP))
    _assert_usable(m, ids, clean)


def test_the_memory_estimate_counts_only_sites_that_fire(m, ids, clean):
    batch, seq = ids.shape
    reachable = m.estimate_cache_bytes(_reachable(m), batch, seq)
    everything = m.estimate_cache_bytes(None, batch, seq)
    assert everything > reachable + 1, "the test needs sites past the stop to cost something"
    out, cache = m.run_with_cache(ids, stop_at_layer=STOP, max_bytes=reachable + 1)
    assert cache.nbytes == reachable
    with pytest.raises(CacheTooLargeError, match="needs about"):
        m.run_with_cache(ids, stop_at_layer=STOP, max_bytes=reachable - 1)
    with pytest.warns(UserWarning):  # a glob: only the reachable part counts
        m.run_with_cache(ids, names="blocks.*.attn.pattern", stop_at_layer=STOP,
                         max_bytes=m.estimate_cache_bytes("blocks.{0,1}.attn.pattern", batch, seq))
    _assert_usable(m, ids, clean)
