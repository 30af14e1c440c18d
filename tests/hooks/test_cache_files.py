"""ActivationCache files: what ``save`` writes, what ``load`` refuses, and caching hooks storing copies.

``load`` reads only files ``save`` wrote (metadata ``kind=ActivationCache``); a model's weights,
keys that are not site names (e.g. a path), a truncated file or tensors of different batch
sizes are a :class:`CacheFileError` naming the file. ``save`` refuses NaN/inf unless asked.
"""

from __future__ import annotations

import re

import pytest
import support
import torch
from safetensors.torch import save_file

from interp.hooks import ActivationCache, CacheFileError, NonFiniteError, caching_hook
from interp.model import Gemma3Cache

SITE = "blocks.1.resid_post"


@pytest.fixture(scope="module")
def m():
    model = support.make_model(support.TINY)
    yield model
    assert not model.registry.active, "a test left hooks on the module's model"


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.tensor([[2, 5, 9, 14, 3], [2, 8, 1, 4, 6]])


@pytest.fixture(scope="module")
def clean(m, ids) -> torch.Tensor:
    return m(ids)


def _assert_usable(m, ids, clean) -> None:
    assert not m.registry.active
    assert torch.equal(m(ids), clean)


def _write_valid(path, tensors=None) -> None:
    ActivationCache(tensors or {"embed": torch.ones(1, 2, 3)}, layer_format="blocks.{layer}.").save(path)


# ----------------------------------------------------------------------------- round trip
def test_round_trip_keeps_values_keys_and_layer_format(m, ids, tmp_path):
    _, cache = m.run_with_cache(ids, names=["embed", "blocks.*.resid_post", "blocks.*.attn.pattern"])
    path = tmp_path / "run.safetensors"
    cache.save(path)
    loaded = ActivationCache.load(path)
    assert set(loaded) == set(cache)
    for k in cache:
        assert torch.equal(loaded[k], cache[k]), k
        assert loaded[k].dtype == cache[k].dtype
    assert loaded.layer_format == "blocks.{layer}."
    assert torch.equal(loaded.stack("resid_post"), cache.stack("resid_post"))
    assert loaded.stack("resid_post").shape == (support.TINY.n_layers, *cache[SITE].shape)
    assert loaded.layers("attn.pattern") == list(range(support.TINY.n_layers))
    # the model's names accept every key of its own cache
    again = ActivationCache.load(path, names=m.site_names())
    assert set(again) == set(cache)


def test_round_trip_without_layer_format(tmp_path):
    path = tmp_path / "plain.safetensors"
    ActivationCache({"embed": torch.arange(6.0).view(1, 2, 3)}).save(path)
    loaded = ActivationCache.load(path)
    assert loaded.layer_format is None
    assert torch.equal(loaded["embed"], torch.arange(6.0).view(1, 2, 3))
    with pytest.raises(ValueError, match="no per-layer naming"):
        loaded.stack("resid_post")


def test_a_gemma3_cache_loads_as_a_gemma3_cache(m, ids, tmp_path):
    _, cache = m.run_with_cache(ids, names=["embed", "blocks.*.post_attn_norm", "blocks.*.post_mlp_norm"])
    path = tmp_path / "g.safetensors"
    cache.save(path)
    loaded = Gemma3Cache.load(path)
    assert isinstance(loaded, Gemma3Cache)
    parts, labels = loaded.decompose_resid()
    ref_parts, ref_labels = cache.decompose_resid()
    assert labels == ref_labels and torch.equal(parts, ref_parts)


# ----------------------------------------------------------------------------- files load refuses
def test_loading_a_model_weights_file_is_refused_naming_it(m, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    with pytest.raises(CacheFileError, match=re.escape(str(path)) + ".*not an ActivationCache"):
        ActivationCache.load(path)
    n = len(m.state_dict())
    with pytest.raises(CacheFileError, match=rf"holds {n} tensors such as \['blocks\.0\."):  # says what it holds
        ActivationCache.load(path, names=m.site_names())


def test_other_metadata_kinds_are_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"embed": torch.ones(1, 2)}, str(path), metadata={"kind": "SAE"})
    with pytest.raises(CacheFileError, match="not an ActivationCache"):
        ActivationCache.load(path)


@pytest.mark.parametrize("key", ["../../../etc/passwd", "/etc/passwd", "embed/../x", "blocks.0..mlp", "",
                                 "a b", "..", "blocks.0.mlp.out;rm", "\nembed"])
def test_keys_that_are_not_site_names_are_refused(tmp_path, key):
    path = tmp_path / "evil.safetensors"
    save_file({key: torch.ones(1, 2)}, str(path), metadata={"kind": "ActivationCache", "format": "pt"})
    with pytest.raises(CacheFileError, match=re.escape(str(path)) + ".*is not a site name"):
        ActivationCache.load(path)


def test_a_key_with_a_trailing_newline_is_not_a_site_name(tmp_path):
    """``"blocks.0.mlp.out\\n"`` is not a site name; a ``$``-anchored regex (which also matches
    before a final newline) would let it through."""
    path = tmp_path / "newline.safetensors"
    save_file({"blocks.0.mlp.out\n": torch.ones(1, 2)}, str(path), metadata={"kind": "ActivationCache"})
    with pytest.raises(CacheFileError, match="is not a site name"):
        ActivationCache.load(path)


def test_path_like_key_is_refused_even_next_to_valid_keys(tmp_path):
    path = tmp_path / "mixed.safetensors"
    save_file({"embed": torch.ones(1, 2), "../../../etc/passwd": torch.ones(1, 2)}, str(path),
              metadata={"kind": "ActivationCache"})
    with pytest.raises(CacheFileError, match=re.escape("'../../../etc/passwd'")):
        ActivationCache.load(path)


@pytest.mark.parametrize("keep", [0.5, 0.95, 10, 4])
def test_a_truncated_file_is_refused_naming_it(tmp_path, keep):
    path = tmp_path / "cut.safetensors"
    _write_valid(path, {"embed": torch.randn(2, 8, 16), "blocks.0.resid_post": torch.randn(2, 8, 16)})
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    path.write_bytes(data[:n])
    with pytest.raises(CacheFileError, match=re.escape(str(path))):
        ActivationCache.load(path)


def test_an_empty_or_garbage_file_is_refused(tmp_path):
    empty, garbage = tmp_path / "empty.safetensors", tmp_path / "garbage.safetensors"
    empty.write_bytes(b"")
    garbage.write_bytes(b"\xff" * 64)
    for path in (empty, garbage):
        with pytest.raises(CacheFileError, match=re.escape(str(path))):
            ActivationCache.load(path)


def test_mixed_batch_sizes_are_refused(tmp_path):
    path = tmp_path / "batches.safetensors"
    _write_valid(path, {"embed": torch.ones(1, 2, 3), "blocks.0.resid_post": torch.ones(2, 2, 3)})
    with pytest.raises(CacheFileError, match=re.escape(str(path)) + ".*different batch sizes"):
        ActivationCache.load(path)


def test_names_restrict_keys_to_the_models_sites(m, tmp_path):
    path = tmp_path / "deeper.safetensors"
    n = support.TINY.n_layers
    foreign = f"blocks.{n + 3}.mlp.out"  # a well-formed name the 6-layer model does not have
    _write_valid(path, {"embed": torch.ones(1, 2, 3), foreign: torch.ones(1, 2, 3)})
    with pytest.raises(CacheFileError, match=re.escape(foreign) + ".*not sites of this model"):
        ActivationCache.load(path, names=m.site_names())
    assert set(ActivationCache.load(path)) == {"embed", foreign}  # without names= it is a valid cache file


def test_bad_layer_format_metadata_is_refused(tmp_path):
    path = tmp_path / "fmt.safetensors"
    save_file({"embed": torch.ones(1, 2)}, str(path), metadata={"kind": "ActivationCache", "layer_format": '"x"'})
    with pytest.raises(CacheFileError, match="layer_format"):
        ActivationCache.load(path)
    save_file({"embed": torch.ones(1, 2)}, str(path), metadata={"kind": "ActivationCache", "layer_format": "{"})
    with pytest.raises(CacheFileError, match="layer_format"):
        ActivationCache.load(path)


# ----------------------------------------------------------------------------- save refuses NaN
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_save_refuses_non_finite_unless_allowed(tmp_path, bad):
    t = torch.ones(1, 3, 4)
    t[0, 1, 2] = bad
    cache = ActivationCache({"embed": torch.ones(1, 3, 4), SITE: t}, layer_format="blocks.{layer}.")
    path = tmp_path / "nan.safetensors"
    with pytest.raises(NonFiniteError, match=re.escape(SITE) + ".*allow_non_finite=True"):
        cache.save(path)
    assert not path.exists(), "a refused save must not leave a file"
    cache.save(path, allow_non_finite=True)
    loaded = ActivationCache.load(path)
    assert torch.equal(loaded[SITE].isnan(), t.isnan()) and torch.equal(loaded[SITE].isinf(), t.isinf())
    finite = loaded[SITE].isfinite()
    assert torch.equal(loaded[SITE][finite], t[finite])


# ----------------------------------------------------------------------------- caching hooks copy
def _zero_in_place(x: torch.Tensor, site) -> None:
    x.mul_(0)
    return None


def test_cached_value_survives_a_later_in_place_hook_on_the_same_site(m, ids, clean):
    _, reference = m.run_with_cache(ids, names=SITE)
    assert bool((reference[SITE] != 0).any())
    store: dict[str, torch.Tensor] = {}
    with m.registry.scope([(SITE, caching_hook(store)), (SITE, _zero_in_place)]):
        mutated = m(ids)
    assert not torch.equal(mutated, clean), "the in-place hook must have changed the run"
    assert torch.equal(store[SITE], reference[SITE]), "the cache holds the activation after a later hook wrote into it"
    _assert_usable(m, ids, clean)


def test_keep_grad_and_cast_caching_hooks_also_survive_in_place_writes(m, ids, clean):
    """A cast or a position cut makes a new tensor anyway; check those paths too."""
    _, reference = m.run_with_cache(ids, names=SITE)
    stores: list[dict[str, torch.Tensor]] = [{}, {}, {}]
    hooks = [(SITE, caching_hook(stores[0], dtype=torch.float64)),
             (SITE, caching_hook(stores[1], positions=[0, -1])),
             (SITE, caching_hook(stores[2], device="cpu")),
             (SITE, _zero_in_place)]
    with m.registry.scope(hooks):
        m(ids)
    assert torch.equal(stores[0][SITE], reference[SITE].double())
    assert torch.equal(stores[1][SITE], reference[SITE][:, [0, -1]])
    assert torch.equal(stores[2][SITE], reference[SITE])
    _assert_usable(m, ids, clean)


def test_run_with_cache_hooks_run_before_caching(m, ids, clean):
    """``hooks=`` of run_with_cache run before its caching hook: the cache shows their effect."""
    logits, cache = m.run_with_cache(ids, names=SITE, hooks=[(SITE, _zero_in_place)])
    assert bool((cache[SITE] == 0).all())
    assert not torch.equal(logits, clean)
    _assert_usable(m, ids, clean)


def test_run_with_cache_alone_keeps_the_runs_own_tensors(m, ids):
    """Nothing else hooked: nothing can write into a tensor after it fires, so no copies."""
    logits, cache = m.run_with_cache(ids, names=["blocks.0.resid_post", "blocks.1.resid_pre", "logits"])
    assert cache["logits"].data_ptr() == logits.data_ptr()
    assert cache["blocks.0.resid_post"].data_ptr() == cache["blocks.1.resid_pre"].data_ptr()


@pytest.mark.parametrize("how", ["scope", "hooks="])
def test_with_another_hook_active_the_cache_holds_copies(m, ids, clean, how):
    """An in-place hook on a later site that aliases a cached one (resid_pre of layer 1 is
    resid_post of layer 0) cannot change the cached value."""
    _, reference = m.run_with_cache(ids, names="blocks.0.resid_post")
    later = [("blocks.1.resid_pre", _zero_in_place)]
    if how == "scope":
        with m.hooks(later):
            _, cache = m.run_with_cache(ids, names="blocks.0.resid_post")
    else:
        _, cache = m.run_with_cache(ids, names="blocks.0.resid_post", hooks=later)
    assert torch.equal(cache["blocks.0.resid_post"], reference["blocks.0.resid_post"])
    _assert_usable(m, ids, clean)
