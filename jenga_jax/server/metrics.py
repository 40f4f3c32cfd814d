"""The server's Prometheus metrics (``/metrics``, text format, prometheus-client).

Request counts, KV memory (held / needed / cached bytes, per kind where the allocator
keeps them per kind), waste, prefix-cache hit rate, preemptions, tokens in and out,
and latency histograms. The engine thread updates them; a scrape only reads.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

PREFIX = "jenga"
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 2.5, 5.0, 10.0, 20.0, 60.0,
)  # fmt: skip


class ServerMetrics:
    """One registry per server. `refresh_s`: KV statistics (which walk the running
    requests' pages) are recomputed at most this often while the engine is busy, and
    whenever it goes idle."""

    def __init__(self, model_name: str, kind_names, refresh_s: float = 0.5):
        self.registry = CollectorRegistry()
        self.refresh_s = refresh_s
        self._last_refresh = 0.0
        self._kind_names = tuple(kind_names)
        r, m = self.registry, model_name
        labels = ["model"]

        def gauge(name, doc, extra=()):
            return Gauge(f"{PREFIX}_{name}", doc, [*labels, *extra], registry=r)

        def counter(name, doc, extra=()):
            return Counter(f"{PREFIX}_{name}", doc, [*labels, *extra], registry=r)

        def histogram(name, doc):
            return Histogram(
                f"{PREFIX}_{name}", doc, labels, buckets=_LATENCY_BUCKETS, registry=r
            ).labels(m)

        self.running = gauge("num_requests_running", "Requests holding pages").labels(m)
        self.waiting = gauge("num_requests_waiting", "Requests queued (or preempted)").labels(m)
        self.kv_pool = gauge("kv_pool_bytes", "Bytes of the KV pool").labels(m)
        self.kv_held = gauge(
            "kv_held_bytes", "Bytes held: the pool less empty large pages and evictable pages"
        ).labels(m)
        self.kv_needed = gauge(
            "kv_needed_bytes", "Bytes running requests truly need (no page rounding)"
        ).labels(m)
        self.kv_cached = gauge("kv_cached_bytes", "Bytes of evictable prefix-cache pages").labels(m)
        self.kv_waste = gauge("kv_waste_ratio", "1 - needed / held").labels(m)
        self.kind_held = gauge(
            "kv_kind_held_bytes", "Bytes of pages held by requests, per layer kind", ["kind"]
        )
        self.kind_cached = gauge(
            "kv_kind_cached_bytes", "Bytes of evictable cached pages, per layer kind", ["kind"]
        )
        self.hit_rate = gauge(
            "prefix_cache_hit_rate", "Cache-hit tokens / prompt tokens looked up, so far"
        ).labels(m)
        self.hit_tokens = gauge("prefix_cache_hit_tokens", "Cache-hit tokens so far").labels(m)
        self.preemptions = gauge("num_preemptions", "Preemptions so far").labels(m)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests added").labels(m)
        self.generation_tokens = counter("generation_tokens", "Tokens generated").labels(m)
        self.finished = counter(
            "requests_finished", "Requests finished, by reason", ["finish_reason"]
        )
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token")
        self.inter_token = histogram("inter_token_latency_seconds", "Between a request's tokens")
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish")
        self._model = m
        self._prompt_seen = 0
        self._generated_seen = 0

    def observe_engine(self, engine, force: bool = False) -> None:
        """Update the gauges from the engine (on the engine thread)."""
        c = engine.counters
        self.prompt_tokens.inc(c.prompt_tokens - self._prompt_seen)
        self.generation_tokens.inc(c.generated_tokens - self._generated_seen)
        self._prompt_seen, self._generated_seen = c.prompt_tokens, c.generated_tokens
        self.running.set(engine.num_running)
        self.waiting.set(engine.num_waiting)
        self.preemptions.set(engine.scheduler.num_preemptions)
        now = time.perf_counter()
        if not force and now - self._last_refresh < self.refresh_s:
            return
        self._last_refresh = now
        stats = engine.manager.stats()
        self.kv_pool.set(stats.pool_bytes)
        self.kv_held.set(stats.held_bytes)
        self.kv_needed.set(stats.needed_bytes)
        self.kv_cached.set(stats.cached_only_bytes)
        self.kv_waste.set(stats.waste)
        self.hit_rate.set(stats.hit_rate)
        self.hit_tokens.set(stats.hit_tokens)
        page_bytes = engine.manager.alloc.page_bytes
        for k, name in enumerate(self._kind_names):
            self.kind_held.labels(self._model, name).set(stats.pages_per_kind[k] * page_bytes[k])
            self.kind_cached.labels(self._model, name).set(
                stats.cached_pages_per_kind[k] * page_bytes[k]
            )

    def request_finished(self, out, e2e_s: float) -> None:
        self.finished.labels(self._model, out.finish_reason or "unknown").inc()
        self.e2e.observe(e2e_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
