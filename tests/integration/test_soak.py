"""Soak: thousands of mixed requests at concurrency 32 against two gateway processes (JSON
and SSE upstreams), good and bad tokens, listings and calls. Ends with zero unexpected
statuses, no stream, socket or task left behind, and memory within a small bound.

Short in CI (2,000 requests); `MCP_GATEWAY_SOAK=long` runs 30,000. Loopback only; it
stops by itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from tests.conftest import _running_upstream, make_profile
from tests.integration.test_faults import eventually

REQUESTS = 30_000 if os.environ.get("MCP_GATEWAY_SOAK") == "long" else 2_000
CONCURRENCY = 32
ACCEPT = "application/json, text/event-stream"


@pytest.fixture(scope="module")
def sse_stateless_upstream(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from _running_upstream(tmp_path_factory, "soak-sse-upstream", "--stateless")


def gauge(gw: Any, name: str) -> float:
    for line in httpx.get(gw.base + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


BODIES = {
    "list": {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
    "call": {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "list_notes", "arguments": {}}},
    "progress": {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "count", "arguments": {"n": 3}, "_meta": {"progressToken": 3}}},
}


async def test_soak_mixed_traffic_ends_clean(gateways, issuer, json_upstream, sse_stateless_upstream) -> None:
    json_gw = gateways.start(profile=make_profile(issuer), upstream_url=json_upstream.url, config={"decision_log": ""})
    sse_gw = gateways.start(profile=make_profile(issuer), upstream_url=sse_stateless_upstream.url, config={"decision_log": ""})
    tokens = {
        gw.port: {
            "good": issuer.mint(aud=gw.resource),
            "expired": issuer.mint(aud=gw.resource, exp=int(time.time()) - 3600, iat=int(time.time()) - 7200),
            "foreign": issuer.mint(aud="https://elsewhere/mcp"),
            "garbage": "not.a.token",
            "none": None,
        }
        for gw in (json_gw, sse_gw)
    }
    expected = {"good": 200, "expired": 401, "foreign": 401, "garbage": 401, "none": 401}
    rng = random.Random(7)
    plan = [
        (rng.choice([json_gw, sse_gw]), rng.choices(list(expected), weights=[6, 1, 1, 1, 1])[0], rng.choice(list(BODIES)))
        for _ in range(REQUESTS)
    ]
    outcomes: Counter[str] = Counter()
    unexpected: list[tuple[str, int, str]] = []

    async def one(http: httpx.AsyncClient, gw: Any, kind: str, body: str) -> None:
        headers = {"Accept": ACCEPT, "Content-Type": "application/json"}
        if tokens[gw.port][kind] is not None:
            headers["Authorization"] = f"Bearer {tokens[gw.port][kind]}"
        resp = await http.post(gw.mcp_url, content=json.dumps(BODIES[body]), headers=headers)
        complete = resp.status_code != 200 or ('"result"' in resp.text and '"id":' in resp.text)
        outcomes[f"{kind}:{resp.status_code}"] += 1
        if resp.status_code != expected[kind] or not complete:
            unexpected.append((kind, resp.status_code, resp.text[:200]))

    async def run(items: list[tuple[Any, str, str]]) -> None:
        queue: asyncio.Queue[tuple[Any, str, str]] = asyncio.Queue()
        for item in items:
            queue.put_nowait(item)
        # idle connections are dropped before uvicorn's 5 s keep-alive timeout can close one under a request
        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY, keepalive_expiry=2)
        async with httpx.AsyncClient(timeout=30, limits=limits) as http:

            async def worker() -> None:
                while not queue.empty():
                    await one(http, *queue.get_nowait())

            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))

    warm = min(300, REQUESTS // 4)
    await run(plan[:warm])
    before = {gw.port: (rss_kib(gw.proc.pid), open_fds(gw.proc.pid), gauge(gw, "mcp_gateway_event_loop_tasks")) for gw in (json_gw, sse_gw)}
    started = time.monotonic()
    await run(plan[warm:])
    took = time.monotonic() - started

    assert not unexpected, unexpected[:5]
    assert sum(outcomes.values()) == REQUESTS
    for gw in (json_gw, sse_gw):
        rss0, fds0, tasks0 = before[gw.port]
        assert eventually(lambda gw=gw: gauge(gw, "mcp_gateway_upstream_streams_open") == 0, timeout=10)
        assert eventually(lambda gw=gw, fds0=fds0: open_fds(gw.proc.pid) <= fds0 + 8, timeout=10), (open_fds(gw.proc.pid), fds0)
        assert eventually(lambda gw=gw, tasks0=tasks0: gauge(gw, "mcp_gateway_event_loop_tasks") <= tasks0 + 2, timeout=10)
        growth_mib = (rss_kib(gw.proc.pid) - rss0) / 1024
        assert growth_mib < 40, f"gateway on {gw.port} grew {growth_mib:.1f} MiB over {REQUESTS} requests"
    print(f"soak: {REQUESTS} requests in {took:.1f}s ({(REQUESTS - warm) / took:.0f}/s), {dict(outcomes)}")
