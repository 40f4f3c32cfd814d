"""Randomized operation sequences against the manager, checking every invariant after each."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from jenga_jax.core import ALLOCATORS, ImageInput, KVCacheManager, ModelLayout, make_plan
from jenga_jax.core import layer_kinds as lk
from jenga_jax.core.errors import RequestTooLargeError
from jenga_jax.core.invariants import assert_pool_whole, check_manager
from jenga_jax.core.kv_cache_manager import CROSS, STATE

KIND_MAKERS = {
    "full": lambda d: lk.full(1, 4 * d(st.sampled_from([1, 2]))),
    "sliding": lambda d: lk.sliding(d(st.sampled_from([3, 8, 13, 24])), 1, 4),
    "chunked": lambda d: lk.chunked(d(st.sampled_from([8, 12, 32])), 1, 4),
    "cross": lambda d: lk.cross(1, 4),
    "state": lambda d: lk.state(
        d(st.sampled_from([24, 48, 96])), d(st.sampled_from([None, 8, 16]))
    ),
}


@st.composite
def layouts(draw):
    names = draw(st.lists(st.sampled_from(sorted(KIND_MAKERS)), min_size=1, max_size=4))
    if all(n in ("cross", "state") for n in names):
        names.append("full")
    layers = []
    for name in names:
        kind = KIND_MAKERS[name](draw)
        layers += [kind] * draw(st.integers(1, 3))
    return ModelLayout("random", tuple(layers))


class ManagerMachine(RuleBasedStateMachine):
    @initialize(
        data=st.data(),
        allocator=st.sampled_from(ALLOCATORS),
        tpp=st.sampled_from([2, 4]),
        num_large=st.integers(4, 40),
    )
    def setup(self, data, allocator, tpp, num_large):
        layout = data.draw(layouts())
        plan = make_plan(layout, allocator, tpp)
        self.m = KVCacheManager(layout, plan.large_page_bytes * num_large, plan=plan)
        self.has_cross = layout.has(CROSS)
        self.prompt_len: dict[str, int] = {}
        self.next_id = 0
        self.prefixes = [
            [data.draw(st.integers(0, 50)) for _ in range(data.draw(st.integers(4, 40)))]
            for _ in range(3)
        ]

    # ------------------------------------------------------------------ helpers
    def _waiting(self):
        return [r for r in self.prompt_len if not self.m.is_running(r)]

    def _running(self):
        return [r for r in self.prompt_len if self.m.is_running(r)]

    def _check_hit_readable(self, rid: str, hit: int) -> None:
        """A reported hit: every kind holds the pages it reads for it, with matching keys."""
        m = self.m
        req = m._requests[rid]
        length = req.num_computed  # the hit in the token stream (encoder tokens included)
        assert length - req.offset == hit or (hit == 0 and length in (0, req.offset))
        hashes = req.hasher.hashes
        for k in m._token_kinds:
            tpp = m._tpp[k]
            for p in range(m._first_needed(k, length) // tpp, length // tpp):
                page = req.pages[k][p]
                assert page is not None, f"kind {k} lacks page {p} of a {hit}-token hit"
                key = hashes[(p + 1) * m._span[k] - 1]
                assert m.alloc.key[k].get(page) == key, f"kind {k} page {p}: wrong content"
        for k in m._state_kinds:
            if length:
                assert req.cur[k] is not None and req.frozen[k]
                h = hashes[length // m.plan.block_size - 1]
                for j, page in enumerate(req.cur[k]):
                    assert m.alloc.key[k].get(page) == (h, j), "state checkpoint mismatch"

    # ------------------------------------------------------------------ rules
    @rule(data=st.data())
    def new_request(self, data):
        prefix = data.draw(st.sampled_from(self.prefixes))
        cut = data.draw(st.integers(1, len(prefix)))
        suffix = data.draw(st.lists(st.integers(0, 50), max_size=30))
        prompt = prefix[:cut] + suffix
        images = []
        if data.draw(st.booleans()):
            size = data.draw(st.integers(1, 12))
            content = data.draw(st.sampled_from(["a", "b", "c"]))
            if self.has_cross:
                images.append(ImageInput(f"img-{content}-{size}", size, 0))
            elif len(prompt) >= size:
                offset = data.draw(st.integers(0, len(prompt) - size))
                images.append(ImageInput(f"img-{content}-{size}", size, offset))
        rid = f"r{self.next_id}"
        self.next_id += 1
        salt = data.draw(st.sampled_from([None, None, "tenant"]))
        try:
            self.m.add_request(
                rid, prompt, images=images, salt=salt, max_new_tokens=data.draw(st.integers(0, 20))
            )
        except RequestTooLargeError:
            assert rid not in self.m
            return
        self.prompt_len[rid] = len(prompt)

    @precondition(lambda self: self._waiting())
    @rule(data=st.data())
    def admit(self, data):
        rid = data.draw(st.sampled_from(self._waiting()))
        hit = self.m.lookup(rid)
        todo = self.m.num_tokens(rid) - hit
        n = data.draw(st.integers(1, todo))
        before = self.m.stats()
        result = self.m.allocate(rid, n)
        if result:
            assert result.num_cached_tokens == hit
            assert hit < self.m.num_tokens(rid)
            self._check_hit_readable(rid, hit)
        else:
            assert "not enough free pages" in result.reason
            after = self.m.stats()
            assert after == before, "a refused allocation changed the pool"
            assert not self.m.is_running(rid)

    @precondition(lambda self: self._running())
    @rule(data=st.data())
    def step(self, data):
        rid = data.draw(st.sampled_from(self._running()))
        done = self.m.num_computed_tokens(rid)
        known = self.m.num_tokens(rid)
        if done < known:  # prefill: another chunk of the prompt
            result = self.m.allocate(rid, data.draw(st.integers(1, known - done)))
        else:  # decode: one sampled token
            result = self.m.allocate(rid, 1, [data.draw(st.integers(0, 50))])
        if not result:
            self.m.preempt(rid)

    @precondition(lambda self: self.prompt_len)
    @rule(data=st.data())
    def finish_or_abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.prompt_len)))
        self.m.free(rid, last_step_computed=data.draw(st.booleans()))
        del self.prompt_len[rid]

    @precondition(lambda self: self._running())
    @rule(data=st.data())
    def preempt(self, data):
        self.m.preempt(data.draw(st.sampled_from(self._running())))

    @rule()
    def reset_cache(self):
        self.m.reset_cache()
        assert not any(
            self.m.alloc.ref[k][p] == 0
            for k in range(self.m.num_kinds)
            for p in self.m.alloc.key[k]
        ), "an evictable page survived a cache reset"

    @invariant()
    def consistent(self):
        if hasattr(self, "m"):
            check_manager(self.m)

    @invariant()
    def dead_pages_released(self):
        """No running request holds a page its window or chunk will never read again."""
        if not hasattr(self, "m"):
            return
        m = self.m
        for req in m._requests.values():
            if not req.running:
                continue
            for k in m._windowed_kinds:
                dead = m._first_needed(k, req.num_computed) // m._tpp[k]
                held = [p for p in req.pages[k][:dead] if p is not None]
                assert not held, f"kind {k}: pages before index {dead} still held: {held}"

    def teardown(self):
        if not hasattr(self, "m"):
            return
        for rid in list(self.prompt_len):
            self.m.free(rid)
        self.m.reset_cache()
        check_manager(self.m)
        assert_pool_whole(self.m)


ManagerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestManagerMachine = ManagerMachine.TestCase


def test_state_kind_is_not_token_kind():
    assert lk.state(8).type is STATE and not lk.state(8).is_token_kind
