"""End to end: the SDK client → the gateway process → the SDK upstream process.

Each test asserts what a client observes (status, headers, JSON-RPC error reason) and
what the upstream saw (its recorder), never the gateway's internals.
"""

from __future__ import annotations

import base64
import json
from contextlib import asynccontextmanager
from typing import Any

import httpx
import httpx2
import pytest
from joserfc.jwk import RSAKey
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import make_profile

ACCEPT = "application/json, text/event-stream"
LIST = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}


@asynccontextmanager
async def mcp_client(url: str, token: str, mode: str) -> Any:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=20) as http:
        async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:
            yield client


def post(url: str, token: str | None, body: Any, **headers: str) -> httpx.Response:
    h = {"Accept": ACCEPT, "Content-Type": "application/json", **headers}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url, content=content, headers=h, timeout=20)


def reason(resp: httpx.Response) -> str:
    return resp.json()["error"]["data"]["reason"]


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_sdk_client_lists_and_calls_through_gateway(gateway, issuer, upstream, mode) -> None:
    token = issuer.mint(sub="alice", aud=gateway.resource)
    upstream.clear()
    async with mcp_client(gateway.mcp_url, token, mode) as client:
        tools = await client.list_tools()
        assert {"list_notes", "create_note", "delete_note"} <= {t.name for t in tools.tools}
        created = await client.call_tool("create_note", {"title": f"from {mode}"})
        assert not created.is_error
    seen = upstream.requests()
    assert seen, "the upstream saw nothing"
    # pass-through: the upstream received exactly the client's token
    assert {dict(r["headers"]).get("authorization") for r in seen} == {f"Bearer {token}"}
    for r in seen:
        h = dict(r["headers"])
        assert h["host"] == upstream.url.split("/")[2], "the client's Host reached the upstream"
        assert "origin" not in h and "cookie" not in h
    if mode == "legacy":
        # the 2025-11-25 session: Mcp-Session-Id went out and came back, and DELETE ended it
        assert any("mcp-session-id" in dict(r["headers"]) for r in seen)
        assert any(r["method"] == "DELETE" for r in seen)
        assert any(r["method"] == "GET" for r in seen), "the server-to-client SSE stream was not opened"
    else:
        assert any(dict(r["headers"]).get("mcp-method") == "tools/call" for r in seen)


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_progress_reaches_client_before_result(gateway, issuer, upstream, mode) -> None:
    """The tool only finishes after the client has seen its progress: a buffering proxy deadlocks it."""
    token = issuer.mint(aud=gateway.resource)
    key = f"k-{mode}"
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)
        (upstream.record_dir / f"release-{key}").touch()

    async with mcp_client(gateway.mcp_url, token, mode) as client:
        result = await client.call_tool("wait_for_release", {"key": key}, progress_callback=on_progress)
    assert progress == [1.0]
    assert result.content[0].text == "released"


def test_missing_token_gets_401_and_metadata(gateway) -> None:
    resp = post(gateway.mcp_url, None, LIST)
    assert resp.status_code == 401
    assert reason(resp) == "missing_token"
    www = resp.headers["www-authenticate"]
    metadata_url = f"{gateway.base}/.well-known/oauth-protected-resource/mcp"
    assert www == f'Bearer resource_metadata="{metadata_url}"'
    doc = httpx.get(metadata_url).json()
    assert doc["resource"] == gateway.resource
    assert doc["bearer_methods_supported"] == ["header"]
    assert doc["scopes_supported"] == ["notes.read", "notes.write"]
    root = httpx.get(f"{gateway.base}/.well-known/oauth-protected-resource").json()
    assert root == doc


def _forge_alg_none(token: str) -> str:
    header, payload, _ = token.split(".")
    none = base64.urlsafe_b64encode(json.dumps({"alg": "none", "typ": "JWT"}).encode()).rstrip(b"=").decode()
    return f"{none}.{payload}."


@pytest.mark.parametrize(
    "case,expected",
    [
        ("bad_signature", "bad_signature"),
        ("wrong_issuer", "wrong_issuer"),
        ("expired", "expired"),
        ("alg_none", "disallowed_alg"),
        ("unknown_kid", "unknown_kid"),
        ("not_a_jwt", "unsupported_token_kind"),
    ],
)
def test_bad_tokens_get_401_and_reach_nothing(gateway, issuer, upstream, case, expected) -> None:
    aud = gateway.resource
    if case == "bad_signature":
        other = RSAKey.generate_key(2048, parameters={"kid": issuer.signing_key.kid})
        token = issuer.mint(aud=aud, key=other)
    elif case == "wrong_issuer":
        token = issuer.mint(aud=aud, iss="http://127.0.0.1:1/realms/other")
    elif case == "expired":
        token = issuer.mint(aud=aud, lifetime=-600)
    elif case == "alg_none":
        token = _forge_alg_none(issuer.mint(aud=aud))
    elif case == "unknown_kid":
        token = issuer.mint(aud=aud, key=RSAKey.generate_key(2048, parameters={"kid": "never-published"}))
    else:
        token = "opaque-token-value-0123456789"
    upstream.clear()
    resp = post(gateway.mcp_url, token, LIST)
    assert resp.status_code == 401
    assert reason(resp) == expected
    assert 'error="invalid_token"' in resp.headers["www-authenticate"]
    assert upstream.requests() == []


def test_backend_audience_refused_when_profile_says_so(gateways, issuer, json_upstream) -> None:
    upstream = json_upstream
    profile = make_profile(issuer, audience={"accept": ["*"], "reject": ["nextcloud"], "missing": "accept"})
    gw = gateways.start(profile=profile, upstream_url=upstream.url)
    upstream.clear()
    refused = post(gw.mcp_url, issuer.mint(aud=["nextcloud-mcp-server", "nextcloud"]), LIST)
    assert refused.status_code == 401
    assert reason(refused) == "audience_forbidden"
    assert upstream.requests() == []
    accepted = post(gw.mcp_url, issuer.mint(aud=["nextcloud-mcp-server", "account"]), LIST)
    assert accepted.status_code == 200, accepted.text


def test_token_for_another_resource_refused(gateway, issuer, upstream) -> None:
    upstream.clear()
    resp = post(gateway.mcp_url, issuer.mint(aud="http://127.0.0.1:1/other-mcp"), LIST)
    assert resp.status_code == 401
    assert reason(resp) == "audience_not_accepted"
    assert upstream.requests() == []


def test_header_contradicting_body_is_refused(gateway, issuer, upstream) -> None:
    upstream.clear()
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "delete_note", "arguments": {"id": 1}}}
    resp = post(gateway.mcp_url, issuer.mint(aud=gateway.resource), body, **{"Mcp-Method": "tools/call", "Mcp-Name": "list_notes"})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == -32020
    assert resp.json()["id"] == 7
    assert upstream.requests() == []


@pytest.mark.parametrize(
    "body,status,expected",
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "batch_not_supported"),
        (b'"a string"', 400, "not_an_object"),
        (b"", 400, "empty_body"),
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"tools/list"}', 400, "invalid_json"),
        (b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"a":' + b"[" * 80 + b"]" * 80 + b"}}", 400, "too_deep"),
    ],
)
def test_malformed_bodies_are_refused_and_not_forwarded(gateway, issuer, upstream, body, status, expected) -> None:
    upstream.clear()
    resp = post(gateway.mcp_url, issuer.mint(aud=gateway.resource), body)
    assert resp.status_code == status
    assert reason(resp) == expected
    assert resp.json()["jsonrpc"] == "2.0"
    assert upstream.requests() == []


def test_oversized_body_is_refused(gateways, issuer, upstream) -> None:
    gw = gateways.start(profile=make_profile(issuer), upstream_url=upstream.url, config={"limits": {"max_body_bytes": 2048}})
    upstream.clear()
    big = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "create_note", "arguments": {"title": "x" * 4096}}}
    resp = post(gw.mcp_url, issuer.mint(aud=gw.resource), big)
    assert resp.status_code == 413
    assert reason(resp) == "body_too_large"
    assert upstream.requests() == []


def test_foreign_origin_refused(gateways, issuer, json_upstream) -> None:
    upstream = json_upstream
    gw = gateways.start(profile=make_profile(issuer), upstream_url=upstream.url, config={"allowed_origins": ["http://app.example"]})
    token = issuer.mint(aud=gw.resource)
    upstream.clear()
    refused = post(gw.mcp_url, token, LIST, Origin="http://evil.example")
    assert refused.status_code == 403
    assert reason(refused) == "origin_not_allowed"
    assert upstream.requests() == []
    allowed = post(gw.mcp_url, token, LIST, Origin="http://app.example")
    assert allowed.status_code == 200
    assert all("origin" not in dict(r["headers"]) for r in upstream.requests())


def test_json_upstream_answer_relayed(gateways, issuer, json_upstream) -> None:
    gw = gateways.start(profile=make_profile(issuer), upstream_url=json_upstream.url)
    resp = post(gw.mcp_url, issuer.mint(aud=gw.resource), LIST)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    assert "list_notes" in {t["name"] for t in resp.json()["result"]["tools"]}


def test_upstream_down_gives_502(gateways, issuer) -> None:
    from tests.conftest import free_port

    gw = gateways.start(profile=make_profile(issuer), upstream_url=f"http://127.0.0.1:{free_port()}/mcp")
    resp = post(gw.mcp_url, issuer.mint(aud=gw.resource), LIST)
    assert resp.status_code == 502
    assert reason(resp) == "upstream_unreachable"
    assert resp.json()["id"] == 1


def test_health_and_readiness(gateway) -> None:
    assert httpx.get(gateway.base + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(gateway.base + "/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"jwks": True, "policy": True, "sessions": True}


def test_tokens_never_logged(gateways, issuer, json_upstream) -> None:
    gateway = gateways.start(profile=make_profile(issuer), upstream_url=json_upstream.url)
    token = issuer.mint(aud=gateway.resource, sub="log-check")
    assert post(gateway.mcp_url, token, LIST).status_code == 200
    assert post(gateway.mcp_url, token + "x", LIST).status_code == 401
    log = gateway.log()
    assert "sub='log-check'" in log  # the decision was logged ...
    assert token.split(".")[2][:20] not in log  # ... the token was not


def test_the_gateways_own_origin_is_always_allowed(gateways, issuer, json_upstream) -> None:
    """MCP conformance (dns-rebinding-protection): a request from the gateway's own origin is
    served even when allowed_origins does not list it; foreign origins are still refused."""
    gw = gateways.start(profile=make_profile(issuer), upstream_url=json_upstream.url, config={"allowed_origins": []}, replica="own-origin")
    token = issuer.mint(aud=gw.resource)
    assert post(gw.mcp_url, token, LIST, Origin=gw.base).status_code == 200
    assert post(gw.mcp_url, token, LIST, Origin="http://127.0.0.1:1").status_code == 403
    assert post(gw.mcp_url, token, LIST, Origin=gw.base + ".evil.example").status_code == 403


async def test_header_values_lose_their_optional_whitespace(gateways, issuer, json_upstream) -> None:
    """MCP conformance (http-header-validation): `Mcp-Method:  tools/list ` is tools/list (RFC 9110
    §5.5); uvicorn's httptools parser keeps the whitespace, so the gateway strips it."""
    import asyncio

    gw = gateways.start(profile=make_profile(issuer), upstream_url=json_upstream.url)
    token = issuer.mint(aud=gw.resource)
    body = json.dumps(LIST).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
                 b"Authorization: Bearer " + token.encode() + b"\r\nMcp-Method:  tools/list \t\r\nMcp-Protocol-Version: 2025-11-25\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def test_other_http_methods_get_405_with_a_json_rpc_body(gateway, issuer) -> None:
    """The MCP endpoint is a raw ASGI route: it answers methods it does not serve itself."""
    for method in ("PUT", "PATCH", "OPTIONS"):
        resp = httpx.request(method, gateway.mcp_url, headers={"Authorization": f"Bearer {issuer.mint(aud=gateway.resource)}"}, timeout=10)
        assert resp.status_code == 405
        assert resp.headers["allow"] == "GET, POST, DELETE"
        assert resp.json()["error"]["data"]["reason"] == "method_not_allowed"


def test_an_unknown_method_is_404_in_the_stateless_revision_and_400_before(gateway, issuer) -> None:
    token = issuer.mint(aud=gateway.resource)
    modern = {"jsonrpc": "2.0", "id": 5, "method": "no/such-method",
              "params": {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}}
    resp = post(gateway.mcp_url, token, modern, **{"Mcp-Protocol-Version": "2026-07-28", "Mcp-Method": "no/such-method"})
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == -32601 and resp.json()["id"] == 5
    legacy = {"jsonrpc": "2.0", "id": 6, "method": "no/such-method", "params": {}}
    resp = post(gateway.mcp_url, token, legacy, **{"Mcp-Protocol-Version": "2025-11-25"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == -32601


def test_mcp_param_headers_reach_the_upstream_unchanged(gateways, issuer, json_upstream) -> None:
    """2026-07-28: `Mcp-Param-*` headers the gateway does not interpret are forwarded as sent
    (MUST), and the gateway still decides on the body."""
    gw = gateways.start(profile=make_profile(issuer), upstream_url=json_upstream.url)
    json_upstream.clear()
    body = {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "list_notes", "arguments": {"q": "x"},
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {},
                      "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "1"}}}}
    resp = post(gw.mcp_url, issuer.mint(aud=gw.resource), body, **{"Mcp-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call",
                                                                  "Mcp-Name": "list_notes", "Mcp-Param-Q": "x", "Mcp-Param-Region": "=?base64?ZXU=?="})
    assert resp.status_code == 200, resp.text
    seen = dict(json_upstream.requests()[-1]["headers"])
    assert seen["mcp-param-q"] == "x" and seen["mcp-param-region"] == "=?base64?ZXU=?="
