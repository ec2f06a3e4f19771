"""Prometheus metrics: what the gateway decides, how long each step takes, how caches do.

Each app has its own registry (several gateways can live in one process, as in `dev`).
Cache counters are read from the caches at scrape time, so the caches stay free of
metrics code.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.utils import floatToGoString

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


class StepTimes:
    """`mcp_gateway_step_seconds`: per-step histograms kept as plain counts and turned into
    Prometheus samples at scrape time. prometheus_client's Histogram takes a lock per bucket
    update (about 3 µs an observation, three per request); the request path runs on one
    event loop thread, so plain counts are exact."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self._buckets = buckets
        self._steps: dict[str, list[float]] = {}  # step → [count per bucket..., +Inf count, sum]

    def observe(self, step: str, seconds: float) -> None:
        counts = self._steps.get(step)
        if counts is None:
            counts = self._steps[step] = [0.0] * (len(self._buckets) + 2)
        counts[bisect_left(self._buckets, seconds)] += 1
        counts[-1] += seconds

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily("mcp_gateway_step_seconds", "Time spent per step of the request path", labels=["step"])
        for step, counts in sorted(self._steps.items()):
            cumulative, running = [], 0.0
            for bound, count in zip((*map(floatToGoString, self._buckets), "+Inf"), counts[:-1]):
                running += count
                cumulative.append((bound, running))
            family.add_metric([step], cumulative, counts[-1])
        yield family


class _Timer:
    """`with metrics.timed(step):` (a class, not a generator: a third of the cost)."""

    __slots__ = ("_times", "_step", "_started")

    def __init__(self, times: StepTimes, step: str) -> None:
        self._times, self._step = times, step

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self._times.observe(self._step, time.perf_counter() - self._started)


class _PolicyInfo:
    """`mcp_gateway_policy_info{revision, shadow_revision, engine} 1`: what serves now."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[InfoMetricFamily]:
        info = self._metrics.policy_info()
        if info:
            yield InfoMetricFamily("mcp_gateway_policy", "The policy bundle serving (and the shadow's)", value=info)


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
        #: steps: verify | policy | exchange | upstream | listing
        self.step_seconds = StepTimes(BUCKETS)
        self.registry.register(self.step_seconds)  # type: ignore[arg-type]
        self.reloads = Counter("mcp_gateway_reloads", "Policy/profile reloads by result", ["result"], registry=self.registry)
        #: limit: the data key of the policy's rate limit (bounded by the policy data)
        self.rate_limited = Counter("mcp_gateway_rate_limited", "Requests refused by a rate limit of the policy, by limit",
                                    ["limit"], registry=self.registry)
        self.shadow = Counter(
            "mcp_gateway_shadow_decisions", "Shadow policy evaluations by outcome", ["outcome"], registry=self.registry
        )  # outcome: agree | disagree | error
        self.registry.register(_CacheCollector(self))  # type: ignore[arg-type]
        #: set by the gateway that serves: its policy revision, shadow revision and engine
        self.policy_info: Callable[[], dict[str, str]] = dict
        self.registry.register(_PolicyInfo(self))  # type: ignore[arg-type]
        #: set by the gateway: SSE answers being relayed now (each holds an upstream connection)
        self.open_streams: Callable[[], int] = int
        Gauge(
            "mcp_gateway_upstream_streams_open", "Upstream SSE answers being relayed now", registry=self.registry
        ).set_function(lambda: self.open_streams())
        Gauge("mcp_gateway_event_loop_tasks", "asyncio tasks alive in the serving loop", registry=self.registry).set_function(
            _loop_tasks
        )

        #: the token vault (gateway/vault): grants held, releases to backends, failed refreshes
        self.vault_grants = Gauge("mcp_gateway_vault_grants", "Grants (encrypted refresh tokens) the vault holds",
                                  registry=self.registry)
        self.vault_releases = Counter("mcp_gateway_vault_releases", "Vault releases by result", ["result"], registry=self.registry)
        self.vault_refresh_failures = Counter("mcp_gateway_vault_refresh_failures",
                                              "Refreshes of a stored grant the IdP refused or did not answer, by reason",
                                              ["reason"], registry=self.registry)

        #: label children, bound once (`labels()` costs more than the observation itself)
        self._outcomes: dict[tuple[str, str], Any] = {}

    def timed(self, step: str) -> _Timer:
        return _Timer(self.step_seconds, step)

    def count(self, result: dict[str, Any] | None) -> None:
        result = result or {"action": "reject", "reason": "unknown"}
        key = (result.get("action", "reject"), result.get("reason", "unknown"))
        child = self._outcomes.get(key)
        if child is None:
            child = self._outcomes[key] = self.requests.labels(*key)
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
