"""Hook scopes belong to the thread or asyncio task that opened them.

The active hooks of a model are a :mod:`contextvars` value, so:

- another *thread* running the same model sees none of the scopes this thread has open, and
  its own scopes are invisible here (every forward takes a snapshot of its own context's hooks);
- an *asyncio task* sees the scopes that were open where it was created (``create_task`` copies
  the current context) plus the scopes it opens itself; two tasks that interleave (awaiting
  inside their ``with model.hooks(...)`` blocks) each see only their own hooks, and a scope a
  task opens never leaks into its parent. A task created inside a scope keeps that scope's
  hooks even after the parent has left the scope (it holds a copy of the context, not a view).

What *is* shared between threads: the weights, the site names and the ``check_finite`` debug
switch (a model attribute).

Each forward here is compared bit-for-bit with a single-threaded reference; the conftest pins
torch to one intra-op thread, so a forward is deterministic.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import support
import torch

from interp.hooks import NonFiniteError, add, zero_ablate

N = 200  # forwards per thread in the long races
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def m():
    model = support.make_model(support.TINY)
    yield model
    assert not model.registry.active, "a test left hooks on the module's model"


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.tensor([[2, 5, 9, 14, 3, 7, 11]])


@pytest.fixture(scope="module")
def plain(m, ids) -> torch.Tensor:
    return m(ids)


def _run_threads(*targets, timeout: float = TIMEOUT) -> list:
    """Run each target in its own thread; re-raise the first exception; return the results."""
    with ThreadPoolExecutor(len(targets)) as pool:
        futures = [pool.submit(t) for t in targets]
        return [f.result(timeout=timeout) for f in futures]


def _assert_usable(m, ids, plain) -> None:
    assert not m.registry.active
    assert torch.equal(m(ids), plain)


# ----------------------------------------------------------------------------- (a) two threads
def test_plain_and_hooked_threads_on_one_model_do_not_see_each_others_hooks(m, ids, plain):
    ablate = {"blocks.0.mlp.out": zero_ablate()}
    ablated = m.run_with_hooks(ids, ablate)
    assert not torch.equal(ablated, plain), "the ablation must change the logits for this test to mean anything"
    start = threading.Barrier(2)

    def thread_a():
        start.wait(TIMEOUT)
        bad = []
        for i in range(N):
            if not torch.equal(m(ids), plain):
                bad.append(i)
            assert not m.registry.active, "thread A sees thread B's hooks"
        return bad

    def thread_b():
        start.wait(TIMEOUT)
        bad = []
        for i in range(N):
            if not torch.equal(m.run_with_hooks(ids, ablate), ablated):
                bad.append(i)
        return bad

    bad_a, bad_b = _run_threads(thread_a, thread_b)
    assert bad_a == [], f"plain forwards that differ from the reference: {bad_a[:10]} of {N}"
    assert bad_b == [], f"ablated forwards that differ from the reference: {bad_b[:10]} of {N}"
    _assert_usable(m, ids, plain)


def test_a_scope_held_open_in_one_thread_is_invisible_to_forwards_in_another(m, ids, plain):
    """A deterministic version of the race: B's forward runs while A's scope is certainly open."""
    ablate = {"blocks.*.mlp.out": zero_ablate()}
    ablated = m.run_with_hooks(ids, ablate)
    opened, forward_done = threading.Event(), threading.Event()

    def thread_a():
        with m.hooks(ablate):
            opened.set()
            assert forward_done.wait(TIMEOUT)
            return m(ids)  # after B's forward, and still inside the scope

    def thread_b():
        assert opened.wait(TIMEOUT)
        try:
            return m(ids), dict(m.registry.active)
        finally:
            forward_done.set()

    (a_out, (b_out, b_active)) = _run_threads(thread_a, thread_b)
    assert b_active == {}
    assert torch.equal(b_out, plain)
    assert torch.equal(a_out, ablated)
    _assert_usable(m, ids, plain)


# ----------------------------------------------------------------------------- (b) cache vs steering
def test_run_with_cache_is_unaffected_by_a_steering_scope_in_another_thread(m, ids, plain):
    names = "blocks.*.resid_post"
    _, reference = m.run_with_cache(ids, names=names)
    vector = torch.randn(support.TINY.d_model, generator=torch.Generator().manual_seed(1)) * 10
    steer = {"blocks.*.resid_post": add(vector)}
    steered_logits, steered_cache = m.run_with_cache(ids, names=names, hooks=steer)
    assert not torch.equal(steered_cache["blocks.2.resid_post"], reference["blocks.2.resid_post"])
    opened, finished = threading.Event(), threading.Event()

    def steering_thread():
        runs, bad = 0, 0
        with m.hooks(steer):
            opened.set()
            while not finished.is_set() or runs == 0:
                bad += not torch.equal(m(ids), steered_logits)
                runs += 1
        return runs, bad

    def caching_thread():
        assert opened.wait(TIMEOUT)
        bad = []
        try:
            for i in range(N // 2):
                logits, cache = m.run_with_cache(ids, names=names)
                if not torch.equal(logits, plain) or set(cache) != set(reference) or not all(
                        torch.equal(cache[k], reference[k]) for k in reference):
                    bad.append(i)
        finally:
            finished.set()
        return bad

    (runs, bad_steered), bad_cached = _run_threads(steering_thread, caching_thread)
    assert bad_cached == [], f"caches that differ from the unhooked reference: {bad_cached[:10]}"
    assert runs > 0 and bad_steered == 0, f"{bad_steered} of {runs} steered forwards differ from their reference"
    _assert_usable(m, ids, plain)


# ----------------------------------------------------------------------------- (c) many threads
def test_four_threads_each_with_its_own_hook_get_their_own_reference(m, ids, plain):
    d = support.TINY.d_model
    hook_sets = [
        {"blocks.0.mlp.out": zero_ablate()},
        {"blocks.2.attn.pattern": zero_ablate(heads=[1])},  # forces the explicit path in layer 2 only
        {"blocks.*.resid_post": add(torch.ones(d), scale=3.0)},
        {"embed": zero_ablate(positions=[1, 2])},
    ]
    references = [m.run_with_hooks(ids, h) for h in hook_sets]
    for i, ref in enumerate(references):
        assert not torch.equal(ref, plain), f"hook set {i} must change the logits"
        for j in range(i):
            assert not torch.equal(ref, references[j]), f"hook sets {j} and {i} must differ"
    barrier = threading.Barrier(len(hook_sets))
    rounds = 25

    def worker(k: int):
        bad = []
        for r in range(rounds):
            barrier.wait(TIMEOUT)  # every round starts together, so the forwards overlap
            with m.hooks(hook_sets[k]):
                out = m(ids)
                seen = set(m.registry.active)
            if not torch.equal(out, references[k]):
                bad.append(r)
            assert seen == set(m.registry.resolve(list(hook_sets[k]))), f"thread {k} sees {sorted(seen)}"
        return bad

    results = _run_threads(*[lambda k=k: worker(k) for k in range(len(hook_sets))])
    assert results == [[]] * len(hook_sets), f"rounds that differ from each thread's reference: {results}"
    _assert_usable(m, ids, plain)


# ----------------------------------------------------------------------------- (d) asyncio
def test_asyncio_tasks_interleaving_inside_their_scopes_see_only_their_own_hooks(m, ids, plain):
    """Two tasks, each inside its own ``with m.hooks(...)``, await between forwards so the event
    loop switches between them while both scopes are open; each sees only its own hooks."""
    hooks_a = {"blocks.0.mlp.out": zero_ablate()}
    hooks_b = {"blocks.3.resid_post": add(torch.ones(support.TINY.d_model), scale=5.0)}
    ref_a, ref_b = m.run_with_hooks(ids, hooks_a), m.run_with_hooks(ids, hooks_b)
    assert not torch.equal(ref_a, ref_b)
    order: list[str] = []

    async def task(label: str, hooks, ref) -> list[int]:
        bad = []
        with m.hooks(hooks):
            for i in range(20):
                order.append(label)
                if not torch.equal(m(ids), ref) or set(m.registry.active) != set(hooks):
                    bad.append(i)
                await asyncio.sleep(0)
        return bad

    async def main():
        return await asyncio.gather(task("a", hooks_a, ref_a), task("b", hooks_b, ref_b))

    bad_a, bad_b = asyncio.run(main())
    assert bad_a == [] and bad_b == []
    switches = sum(x != y for x, y in zip(order, order[1:]))
    assert switches >= 10, f"the tasks did not interleave: {''.join(order)}"
    _assert_usable(m, ids, plain)


def test_a_task_created_inside_a_scope_sees_that_scope_and_its_own_scopes_do_not_leak(m, ids, plain):
    """contextvars copy semantics: ``create_task`` copies the context where it is called."""
    outer = {"blocks.0.mlp.out": zero_ablate()}
    inner = {"blocks.4.mlp.out": zero_ablate()}
    ref_outer = m.run_with_hooks(ids, outer)
    ref_both = m.run_with_hooks(ids, [*outer.items(), *inner.items()])
    assert len({ref_outer.sum().item(), ref_both.sum().item(), plain.sum().item()}) == 3

    async def child(gate: asyncio.Event):
        await gate.wait()  # runs only after the parent has left its scope
        seen_before = set(m.registry.active)
        first = m(ids)
        with m.hooks(inner):
            both = m(ids)
        return seen_before, first, both, set(m.registry.active)

    async def outside_child():
        return set(m.registry.active), m(ids)

    async def main():
        gate = asyncio.Event()
        with m.hooks(outer):
            inherited = asyncio.create_task(child(gate))
            await asyncio.sleep(0)
        orphan = asyncio.create_task(outside_child())  # created outside any scope
        parent_after = set(m.registry.active)
        gate.set()
        got = await inherited
        parent_after_child = (set(m.registry.active), m(ids))
        return got, await orphan, parent_after, parent_after_child

    (seen, first, both, seen_end), (orphan_seen, orphan_out), parent_after, (parent_end, parent_out) = \
        asyncio.run(main())
    assert seen == {"blocks.0.mlp.out"} and torch.equal(first, ref_outer), \
        "a task created inside a scope keeps that scope's hooks"
    assert torch.equal(both, ref_both), "the task's own scope adds to the inherited one"
    assert seen_end == {"blocks.0.mlp.out"}
    assert orphan_seen == set() and torch.equal(orphan_out, plain)
    assert parent_after == set()
    assert parent_end == set() and torch.equal(parent_out, plain), "a task's scope leaked into its parent"
    _assert_usable(m, ids, plain)


# ----------------------------------------------------------------------------- (e) shared state
def test_check_finite_is_shared_between_threads(ids):
    model = support.make_model(support.TINY)
    bad_hook = {"blocks.1.mlp.out": lambda x, site: torch.full_like(x, float("nan"))}
    assert model.check_finite is False
    model.check_finite = True
    try:
        def other_thread():
            seen = model.check_finite
            try:
                model.run_with_hooks(ids, bad_hook)
            except NonFiniteError as e:
                return seen, str(e), dict(model.registry.active)
            return seen, None, dict(model.registry.active)

        seen, message, active = _run_threads(other_thread)[0]
    finally:
        model.check_finite = False
    assert seen is True
    assert message is not None and "blocks.1.mlp.out" in message, "the other thread's forward did not check"
    assert active == {}
    # and switching it off is seen there too: the NaN then reaches the logits unchecked
    out = _run_threads(lambda: (model.check_finite, model.run_with_hooks(ids, bad_hook)))[0]
    assert out[0] is False and bool(torch.isnan(out[1]).all())
    assert not model.registry.active


def test_registry_active_is_empty_here_while_another_thread_holds_a_scope(m, ids, plain):
    opened, release = threading.Event(), threading.Event()
    hooks = {"blocks.*.mlp.out": zero_ablate(), "logits": zero_ablate()}

    def holder():
        with m.hooks(hooks):
            inside = set(m.registry.active)
            opened.set()
            assert release.wait(TIMEOUT)
            return inside, m(ids)

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(holder)
        try:
            assert opened.wait(TIMEOUT)
            here_active = dict(m.registry.active)
            here_hooked = m.registry.is_hooked("logits")
            here_out = m(ids)
        finally:
            release.set()
        inside, there_out = future.result(TIMEOUT)
    assert len(inside) == support.TINY.n_layers + 1
    assert bool((there_out == 0).all()), "the holder's own forward must see its hooks"
    assert here_active == {} and here_hooked is False
    assert torch.equal(here_out, plain)
    _assert_usable(m, ids, plain)
