"""Faults that end closed: a slow token endpoint, a slow or breaking upstream, a client
that goes away, unknown methods. Real processes on loopback; each test says what the
client saw, what the upstream saw, and that nothing hung.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import ROOT, _running_upstream, make_profile
from tests.integration.test_gateway_e2e import ACCEPT, post, reason
from tests.integration.test_idp_profiles import keycloak_env
from tests.integration.test_reload import wait_for as eventually


def call(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """A tools/call asking for progress (so an SSE upstream streams before its result)."""
    params = {"name": name, "arguments": args, "_meta": {"progressToken": 1}}
    return {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}


def open_streams(gw: Any) -> float:
    """The gateway's own count of upstream SSE answers it holds open (/metrics)."""
    for line in httpx.get(gw.base + "/metrics").text.splitlines():
        if line.startswith("mcp_gateway_upstream_streams_open "):
            return float(line.split()[-1])
    raise AssertionError("no mcp_gateway_upstream_streams_open metric")


@pytest.fixture(scope="module")
def sse_upstream(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Stateless, answering in SSE: progress events, then the result."""
    yield from _running_upstream(tmp_path_factory, "sse-upstream", "--stateless")


# --- Unknown methods ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tools/delete", "admin/shutdown", "TOOLS/LIST", "tools/list ", "x" * 5000, "notifications/evil"])
def test_unknown_methods_are_refused_and_not_forwarded(method, gateways, issuer, json_upstream) -> None:
    gw = gateways.start(profile=make_profile(issuer), upstream_url=json_upstream.url)
    json_upstream.clear()
    body: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if not method.startswith("notifications/"):
        body["id"] = 9
    resp = post(gw.mcp_url, issuer.mint(aud=gw.resource), body)
    assert resp.status_code == 400 and reason(resp) == "unknown_method"
    assert resp.json()["error"]["code"] == -32601
    assert json_upstream.requests() == []


# --- The token endpoint is slow ------------------------------------------------------------


def test_slow_token_endpoint_is_503_within_the_timeout_and_not_hammered(gateways, keycloak_idp, backend_upstream) -> None:
    profile = yaml.safe_load((ROOT / "profiles" / "keycloak.yaml").read_text())
    profile["exchange"]["timeout"] = 1.0
    gw = gateways.start(profile=profile, upstream_url=backend_upstream.url, env=keycloak_env(keycloak_idp))
    keycloak_idp.reset()
    backend_upstream.clear()
    keycloak_idp.exchange_mode("slow")  # the IdP sits on each exchange for 10 s
    try:
        token = keycloak_idp.token("ivan")
        started = time.monotonic()
        first = post(gw.mcp_url, token, call("list_notes", {}))
        took = time.monotonic() - started
        burst = [post(gw.mcp_url, keycloak_idp.token(f"user{i}"), call("list_notes", {})) for i in range(5)]
        burst_took = time.monotonic() - started - took
    finally:
        keycloak_idp.exchange_mode("ok")
    assert (first.status_code, reason(first)) == (503, "exchange_timeout")
    assert took < 3.0, f"the refusal took {took:.1f}s with a 1 s exchange timeout"
    assert {r.status_code for r in burst} == {503}
    assert burst_took < 2.0  # answered from the remembered failure, not after five more timeouts
    assert keycloak_idp.stats()["exchange_attempts"] == 1
    assert backend_upstream.requests() == []


# --- The upstream is slow, breaks off, or the client leaves ----------------------------


def test_slow_json_upstream_is_504(gateways, issuer, json_upstream) -> None:
    gw = gateways.start(profile=make_profile(issuer), upstream_url=json_upstream.url, config={"upstream": {"url": json_upstream.url, "timeout": 1}})
    started = time.monotonic()
    resp = post(gw.mcp_url, issuer.mint(aud=gw.resource), call("wait_for_release", {"key": "never-json"}))
    assert (resp.status_code, reason(resp)) == (504, "upstream_timeout")
    assert time.monotonic() - started < 5
    assert post(gw.mcp_url, issuer.mint(aud=gw.resource), call("list_notes", {})).status_code == 200


def test_slow_sse_upstream_ends_the_stream_cleanly(gateways, issuer, sse_upstream) -> None:
    gw = gateways.start(profile=make_profile(issuer), upstream_url=sse_upstream.url, config={"upstream": {"url": sse_upstream.url, "timeout": 1}})
    started = time.monotonic()
    resp = post(gw.mcp_url, issuer.mint(aud=gw.resource), call("wait_for_release", {"key": "never-sse"}))
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    assert "notifications/progress" in resp.text and '"result"' not in resp.text  # progress relayed, then the end
    assert time.monotonic() - started < 5


def test_upstream_breaking_off_an_sse_stream_ends_it_cleanly(gateways, issuer, sse_upstream) -> None:
    broken = sse_upstream.url.replace("/mcp", "/broken-sse")
    gw = gateways.start(profile=make_profile(issuer), upstream_url=broken)
    started = time.monotonic()
    resp = post(gw.mcp_url, issuer.mint(aud=gw.resource), call("list_notes", {}))
    assert resp.status_code == 200
    assert "notifications/progress" in resp.text  # what arrived before the break was relayed
    assert time.monotonic() - started < 5
    assert "upstream stream ended early" in gw.log()
    assert post(gw.mcp_url, issuer.mint(aud=gw.resource), call("list_notes", {})).status_code == 200  # still serving


def test_client_disconnect_releases_the_upstream_connection(gateways, issuer, sse_upstream) -> None:
    gw = gateways.start(profile=make_profile(issuer), upstream_url=sse_upstream.url, replica="disconnect")
    assert open_streams(gw) == 0
    headers = {"Accept": ACCEPT, "Content-Type": "application/json", "Authorization": f"Bearer {issuer.mint(aud=gw.resource)}"}
    with httpx.Client(timeout=20) as http:
        with http.stream("POST", gw.mcp_url, content=json.dumps(call("wait_for_release", {"key": "left"})), headers=headers) as resp:
            assert resp.status_code == 200
            chunks = resp.iter_raw()  # kept: a discarded iterator would close the response itself
            assert b"notifications/progress" in next(chunks)
            assert open_streams(gw) == 1  # the relay holds the upstream answer open
        # leaving the `with` closes our connection mid-stream; the upstream waits 10 s more
    assert eventually(lambda: open_streams(gw) == 0, timeout=5), "the upstream answer was kept open"
