"""Prometheus metrics: what the gateway decides, how long each step takes, how caches do.

Each app has its own registry (several gateways can live in one process, as in `dev`).
Cache counters are read from the caches at scrape time, so the caches stay free of
metrics code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _CacheCollector:
    """Exposes hit/miss counts that the caches keep themselves (of the gateway serving now)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("mcp_gateway_cache_lookups", "Cache lookups by cache and result", labels=["cache", "result"])
        for name, (hits, misses) in self._metrics.cache_sources().items():
            family.add_metric([name, "hit"], hits)
            family.add_metric([name, "miss"], misses)
        yield family


def _loop_tasks() -> int:
    """Tasks of the running loop (scrapes are served on it); 0 outside a loop."""
    import asyncio

    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return 0


class Metrics:
    def __init__(self) -> None:
        #: set by the gateway that serves; a reload points it at the new gateway's caches
        self.cache_sources: Callable[[], dict[str, tuple[int, int]]] = dict
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mcp_gateway_requests", "Requests on the MCP endpoint by outcome", ["action", "reason"], registry=self.registry
        )
        self.step_seconds = Histogram(
            "mcp_gateway_step_seconds",
            "Time spent per step of the request path",
            ["step"],  # verify | policy | exchange | upstream | listing
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.reloads = Counter("mcp_gateway_reloads", "Policy/profile reloads by result", ["result"], registry=self.registry)
        self.shadow = Counter(
            "mcp_gateway_shadow_decisions", "Shadow policy evaluations by outcome", ["outcome"], registry=self.registry
        )  # outcome: agree | disagree | error
        self.registry.register(_CacheCollector(self))  # type: ignore[arg-type]
        #: set by the gateway: SSE answers being relayed now (each holds an upstream connection)
        self.open_streams: Callable[[], int] = int
        Gauge(
            "mcp_gateway_upstream_streams_open", "Upstream SSE answers being relayed now", registry=self.registry
        ).set_function(lambda: self.open_streams())
        Gauge("mcp_gateway_event_loop_tasks", "asyncio tasks alive in the serving loop", registry=self.registry).set_function(
            _loop_tasks
        )

        #: label children, bound once (`labels()` costs more than the observation itself)
        self._steps: dict[str, Any] = {}
        self._outcomes: dict[tuple[str, str], Any] = {}

    @contextmanager
    def timed(self, step: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            child = self._steps.get(step)
            if child is None:
                child = self._steps[step] = self.step_seconds.labels(step)
            child.observe(time.perf_counter() - started)

    def count(self, result: dict[str, Any] | None) -> None:
        result = result or {"action": "reject", "reason": "unknown"}
        key = (result.get("action", "reject"), result.get("reason", "unknown"))
        child = self._outcomes.get(key)
        if child is None:
            child = self._outcomes[key] = self.requests.labels(*key)
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
