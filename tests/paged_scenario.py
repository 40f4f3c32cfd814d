"""A serving scenario through the paged path, recorded for comparison with dense forwards.

It runs under any page plan: Jenga's (the default) or a baseline's ("paged", "uniform").

Request A: a long prompt in chunked prefill of varied sizes, then greedy decode.
Request B: arrives after A's prefill, shares A's prompt prefix (a prefix-cache hit),
prefills its own tail in the same steps as A's decode (a mixed batch), then decodes.
Request C: arrives once A's windows have released pages (or at step C_ARRIVES).
The pool is tight: when no row fits, the youngest request is preempted and recomputed.
Every logit of every position is kept, with the pages each request held.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from flax import nnx

from jenga_jax.core import ImageInput, KVCacheManager, RequestTooLargeError, make_plan
from jenga_jax.core.layer_kinds import AttentionType
from jenga_jax.engine.buckets import Buckets
from jenga_jax.engine.model_runner import Image, ModelRunner, Work
from models import HybridDecoder, tiny_config
from models.random_init import perturb

A_PROMPT = 100
B_SHARED, B_OWN, B_CHUNKS = 50, 22, (9, 30)
C_PROMPT = 12
C_ARRIVES = 30  # step at which C arrives in a model without windows (64 decode steps)
# Jamba's state checkpoint, within B's shared prefix: jenga 2 x its full-attention page
# (22 tokens); paged 3 x its 16-token page; uniform 1 x its 32-token page.
CHECKPOINT = {"jenga": 44, "paged": 48, "uniform": 32}
WINDOWED = (AttentionType.SLIDING, AttentionType.CHUNKED)


def a_chunks(allocator: str = "jenga") -> tuple[int, ...]:
    """A's prefill chunks; the third ends at the checkpoint (jenga: 7, 13, 24, 56)."""
    cp = CHECKPOINT[allocator]
    return (7, 13, cp - 20, A_PROMPT - cp)


def random_model(family: str, seed: int = 0) -> HybridDecoder:
    """Tiny model with every parameter perturbed (gates, sinks, norms, biases non-zero)."""
    return perturb(HybridDecoder(tiny_config(family), rngs=nnx.Rngs(seed)), seed=seed + 1)


def _images(cfg, rng, hashes, sizes=(20, 9)):
    if cfg.vision_dim is None:
        return []
    return [
        Image(h, rng.normal(size=(n, cfg.vision_dim)).astype(np.float32))
        for h, n in zip(hashes, sizes)
    ]


def min_pool(family: str, decode_steps: int = 64, allocator: str = "jenga") -> int:
    """Fewest large pages that hold request A alone at its largest moment."""
    cfg = tiny_config(family)
    checkpoint = CHECKPOINT[allocator] if cfg.mamba else None
    plan = make_plan(cfg.layout(cfg.dtype, checkpoint), allocator)
    images = [ImageInput("x", 20), ImageInput("y", 9)] if cfg.vision_dim else []
    n = 1
    while True:
        manager = KVCacheManager(plan.layout, n * plan.large_page_bytes, plan=plan)
        try:
            manager.add_request("A", [0] * A_PROMPT, images=images, max_new_tokens=decode_steps)
            return n
        except RequestTooLargeError:
            n += 1


@dataclasses.dataclass
class Trace:
    tokens: list[int]  # prompt, then generated tokens
    prompt_len: int
    budget: int  # tokens to generate
    chunks: list[int] | None  # prefill chunks still to run (None: plan them from the hit)
    images: list[Image] = dataclasses.field(default_factory=list)
    logits: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)  # position -> [V]
    pending: list[int] = dataclasses.field(default_factory=list)  # sampled, not yet fed
    done: int = 0  # tokens computed
    hits: list[int] = dataclasses.field(default_factory=list)  # hit of each (re)start
    preempted: int = 0
    first_pages: dict = dataclasses.field(default_factory=dict)  # kind -> block table
    a_pages: dict = dataclasses.field(default_factory=dict)  # A's tables at that moment

    @property
    def known(self) -> int:
        return len(self.tokens) - len(self.pending)


@dataclasses.dataclass
class Outcome:
    runner: ModelRunner
    traces: dict[str, Trace]
    released_by_a: set  # (kind, page) that A's windows released
    reused: set  # of those, the ones another request then held
    steps: int


class Scenario:
    def __init__(
        self,
        family: str,
        *,
        slack: int,
        decode_steps: int,
        seed: int,
        backend: str | None,
        allocator: str = "jenga",
        buckets: Buckets | None = None,
    ):
        cfg = tiny_config(family)
        self.runner = ModelRunner(
            random_model(family, seed),
            allocator=allocator,
            num_large_pages=min_pool(family, decode_steps, allocator) + slack,
            buckets=buckets or Buckets(min_pages=16, min_queries=8),
            checkpoint_interval=CHECKPOINT[allocator] if cfg.mamba else None,
            pool_fill=float("nan"),
            shuffle_seed=seed,
            attention_backend=backend,
        )
        rng = np.random.default_rng(seed)
        a = rng.integers(0, cfg.vocab_size, A_PROMPT).tolist()
        b = a[:B_SHARED] + rng.integers(0, cfg.vocab_size, B_OWN).tolist()
        c = rng.integers(0, cfg.vocab_size, C_PROMPT).tolist()
        images = _images(cfg, rng, ("img-1", "img-2"))
        self.a_chunks = a_chunks(allocator)
        self.c_arrives = min(C_ARRIVES, decode_steps // 2)
        self.traces = {
            "A": Trace(a, len(a), decode_steps, list(self.a_chunks), images),
            "B": Trace(b, len(b), decode_steps // 2, None, images),
            "C": Trace(c, len(c), decode_steps // 4, None, _images(cfg, rng, ("img-3",), (5,))),
        }
        self.windowed = [k for k, v in enumerate(self.runner.layout.kinds) if v.type in WINDOWED]
        self.a_pages: dict[int, set] = {}
        self.released: set = set()
        self.reused: set = set()
        self.active: list[str] = []

    def admit(self, rid: str) -> None:
        t = self.traces[rid]
        self.runner.add_request(rid, t.tokens, images=t.images, max_new_tokens=t.budget)
        self.active.append(rid)

    def work_for(self, rid: str) -> Work:
        t, manager = self.traces[rid], self.runner.manager
        if not manager.is_running(rid) and t.chunks is None:  # (re)start: chunks after the hit
            hit = manager.lookup(rid)
            t.done = hit
            rest, t.chunks = t.known - hit, []
            for c in (*(B_CHUNKS if rid == "B" else ()), rest):
                take = min(c, rest - sum(t.chunks))
                if take:
                    t.chunks.append(take)
        if manager.is_running(rid) and t.chunks:  # chunks end at the known tokens
            t.chunks[0] = min(t.chunks[0], t.known - t.done)
            t.chunks = [c for c in t.chunks if c > 0][:1] + t.chunks[1:]
        if t.chunks:
            return Work(rid, t.chunks.pop(0))
        return Work(rid, 1, tuple(t.pending))

    def record(self, rows, logits, all_logits: bool) -> None:
        manager = self.runner.manager
        for row, lg in zip(rows, logits):
            t = self.traces[row.request_id]
            if row.request_id not in self._running_before:
                t.hits.append(row.start)  # a first allocation starts at its hit
                if not t.first_pages:
                    kinds = range(len(self.runner.layout.kinds))
                    t.first_pages = {k: manager.block_table(row.request_id, k) for k in kinds}
                    if "A" in manager:
                        t.a_pages = {k: manager.block_table("A", k) for k in kinds}
            if row.start + row.num_tokens > t.known:  # the row fed the pending token
                t.pending = []
            end = row.start + row.num_tokens
            for j in range(row.num_tokens) if all_logits else (row.num_tokens - 1,):
                t.logits[row.start + j] = lg[j] if all_logits else lg
            t.done = end
            if end == len(t.tokens) and len(t.tokens) - t.prompt_len < t.budget:
                nxt = int(np.argmax(t.logits[end - 1]))  # greedy
                t.tokens.append(nxt)
                t.pending = [nxt]
            for k in range(len(self.runner.layout.kinds)):
                for p in manager.block_table(row.request_id, k):
                    if p is not None and row.request_id != "A" and (k, p) in self.released:
                        self.reused.add((k, p))
        for k in self.windowed:  # pages A's windows let go of
            if "A" in manager:
                now = {p for p in manager.block_table("A", k) if p is not None}
                self.released |= {(k, p) for p in self.a_pages.get(k, set()) - now}
                self.a_pages[k] = now

    def step(self) -> None:
        manager = self.runner.manager
        self._running_before = {rid for rid in self.active if manager.is_running(rid)}
        batch = [self.work_for(rid) for rid in self.active]
        decode = all(w.num_tokens == 1 and w.new_token_ids for w in batch)
        rows, logits, refused = self.runner.step(batch, decode=decode, all_logits=not decode)
        for w, _ in refused:  # waits for pages: the same work again next step
            t = self.traces[w.request_id]
            if not self.runner.manager.is_running(w.request_id):
                t.chunks = None
            elif w.num_tokens > 1 or not w.new_token_ids:
                t.chunks.insert(0, w.num_tokens)
        if rows:
            self.record(rows, logits, all_logits=not decode)
            return
        victims = [rid for rid in self.active if rid != "A" and self.runner.manager.is_running(rid)]
        if not victims:
            raise RuntimeError(f"the pool cannot hold request A alone: {refused}")
        victim = victims[-1]  # the youngest
        self.runner.preempt(victim)
        t = self.traces[victim]
        t.chunks, t.preempted = None, t.preempted + 1

    def run(self) -> Outcome:
        self.admit("A")
        steps = 0
        while self.active:
            self.step()
            steps += 1
            if steps == len(self.a_chunks):  # A's prompt is in: B arrives
                self.admit("B")
            c_due = self.released if self.windowed else steps >= self.c_arrives
            if c_due and "C" not in self.runner.manager and not self.traces["C"].logits:
                self.admit("C")
            for rid in list(self.active):
                t = self.traces[rid]
                if len(t.tokens) - t.prompt_len >= t.budget and t.done == len(t.tokens):
                    self.runner.free(rid)
                    self.active.remove(rid)
        return Outcome(self.runner, self.traces, self.released, self.reused, steps)


def run_scenario(
    family: str,
    *,
    slack: int,
    decode_steps: int = 64,
    seed: int = 0,
    backend: str | None = None,
    allocator: str = "jenga",
    buckets: Buckets | None = None,
) -> Outcome:
    """The scenario in a pool of `min_pool(family) + slack` large pages of the
    `allocator`'s plan; `backend`: the attention kernel (None: by platform); `buckets`
    (None: powers of two, from 16 pages and 8 queries)."""
    scenario = Scenario(
        family, slack=slack, decode_steps=decode_steps, seed=seed, backend=backend,
        allocator=allocator, buckets=buckets,
    )  # fmt: skip
    return scenario.run()


@functools.cache
def _dense_forward(family: str, seed: int):
    """The jitted dense forward of the family's random model: (tokens [1, T], images
    [1, E, vision_dim] or None, image_lens [1]) -> logits [1, T, V]."""
    graphdef, state = nnx.split(random_model(family, seed))

    def forward(state, tokens, images, image_lens):
        model = nnx.merge(graphdef, state)
        return model.forward_dense(tokens, image_embeds=images, image_lens=image_lens)

    return functools.partial(jax.jit(forward), state)


def dense_logits(family: str, trace: Trace, seed: int = 0) -> np.ndarray:
    """Logits [T, V] of the dense no-cache forward over the request's whole sequence.

    Tokens and images are padded (to multiples of 64 and 32: one compile per family);
    the padding comes after the real tokens, which are causal, and past the images'
    lengths, so it changes no logit of the sequence."""
    n = len(trace.tokens)
    tokens = np.zeros((1, -(-n // 64) * 64), np.int32)
    tokens[0, :n] = trace.tokens
    images = lens = None
    cfg = tiny_config(family)
    if cfg.vision_dim is not None:
        flat = np.concatenate([im.embeds for im in trace.images] or [np.zeros((0, cfg.vision_dim))])
        images = np.zeros((1, max(32, -(-len(flat) // 32) * 32), cfg.vision_dim), np.float32)
        images[0, : len(flat)] = flat
        lens = np.array([len(flat)], np.int32)
    return np.asarray(_dense_forward(family, seed)(tokens, images, lens))[0, :n]


def main(allocator: str = "jenga") -> None:
    """python tests/paged_scenario.py [jenga|paged|uniform]: the scenario of every family,
    with the figures the exactness tests assert on (max relative error per request, hits,
    window reuse)."""
    from models import FAMILIES

    print(f"{'family':<14}{'req':<4}{'max rel err':>12}{'tokens same':>12}  hits  released/reused")
    for family in sorted(FAMILIES):
        out = run_scenario(family, slack=2, decode_steps=64, allocator=allocator)
        for rid, t in out.traces.items():
            d = dense_logits(family, t)
            err = max(np.abs(t.logits[p] - d[p]).max() / np.abs(d[p]).max() for p in t.logits)
            want = [int(np.argmax(d[p])) for p in range(t.prompt_len - 1, len(t.tokens) - 1)]
            same = t.tokens[t.prompt_len :] == want
            reuse = f"{len(out.released_by_a)}/{len(out.reused)}" if rid == "A" else ""
            print(f"{family:<14}{rid:<4}{err:>12.1e}{same!s:>12}  {t.hits}  {reuse}")


if __name__ == "__main__":
    import sys

    main(*sys.argv[1:2])
