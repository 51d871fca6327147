"""Prometheus metrics of one server (its own registry, so several apps in one process do not collide)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, batcher: Any, image_cache: Any) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("owl2_requests", "API requests (chat completions and ratings) by HTTP status",
                                ["status"], registry=self.registry)
        self.prompt_tokens = Counter("owl2_prompt_tokens", "Prompt tokens received (images counted as their tokens)",
                                     registry=self.registry)
        self.generation_tokens = Counter("owl2_generation_tokens", "Tokens generated", registry=self.registry)
        self.latency = Histogram("owl2_request_latency_seconds", "Time from arrival to the last token",
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("owl2_time_to_first_token_seconds", "Time from queueing to the first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.refused = Counter("owl2_http_refused", "Requests and connections refused before reaching a route, by "
                               "reason: body_too_large, body_timeout, header_timeout, headers_too_large, "
                               "malformed_http, too_many_connections", ["reason"], registry=self.registry)
        self.rated_items = Counter("owl2_rated_items", "Images and videos rated", registry=self.registry)
        self.rate_latency = Histogram("owl2_rate_latency_seconds", "Time from arrival to the ratings of a request",
                                      buckets=_LATENCY_BUCKETS, registry=self.registry)
        Gauge("owl2_queue_depth", "Requests waiting for a batch slot", registry=self.registry).set_function(
            lambda: batcher.queue_depth)
        Gauge("owl2_rating_rows_waiting", "Rating items waiting for a batched prefill",
              registry=self.registry).set_function(lambda: batcher.stats.waiting_prefill_rows)
        Gauge("owl2_running_requests", "Requests in the running batch", registry=self.registry).set_function(
            lambda: batcher.stats.running)
        Gauge("owl2_image_cache_entries", "Encoded images kept by content", registry=self.registry).set_function(
            lambda: len(image_cache))
        Gauge("owl2_image_cache_hits", "Images whose encoding was reused", registry=self.registry).set_function(
            lambda: image_cache.hits)
        prefix = getattr(batcher, "prefix_cache", None)  # None: prefix caching is off, every figure stays 0
        for name, field, what in (
            ("hits", "hits", "Prompts that reused a cached prefix's keys and values"),
            ("misses", "misses", "Prompts that found no cached prefix"),
            ("reused_tokens", "reused_tokens", "Prompt positions not prefilled thanks to the prefix cache (images "
             "counted as their tokens)"),
            ("bytes", "bytes", "Bytes of keys and values the prefix cache holds"),
            ("entries", "entries", "Prefixes the prefix cache holds"),
            ("evictions", "evictions", "Prefixes dropped, least recently used first, to stay within the budget"),
        ):
            Gauge(f"owl2_prefix_cache_{name}", what, registry=self.registry).set_function(
                lambda field=field: 0 if prefix is None else getattr(prefix.stats, field))

    def first_token(self, submitted: float) -> None:
        self.ttft.observe(time.perf_counter() - submitted)

    def finish(self, started: float, completion_tokens: int) -> None:
        self.requests.labels(status="200").inc()
        self.generation_tokens.inc(completion_tokens)
        self.latency.observe(time.perf_counter() - started)

    def rated(self, started: float, items: int) -> None:
        self.requests.labels(status="200").inc()
        self.rated_items.inc(items)
        self.rate_latency.observe(time.perf_counter() - started)

    def render(self) -> bytes:
        return generate_latest(self.registry)
