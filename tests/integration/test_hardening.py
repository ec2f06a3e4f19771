"""The outside review's attacks, replayed against a running gateway with the SDK upstream.

Each test reproduces a class of attack that worked before its fix (the docstring says how it
looked) and checks what the attacker observes now.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, _running_upstream, make_profile

NOTES_DATA = str(ROOT / "examples" / "notes-authz.yaml")
ACCEPT = "application/json, text/event-stream"
HIDDEN_FROM_READERS = ("create_note", "delete_note", "purge_notes")


@pytest.fixture(scope="module")
def resumable_upstream(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Stateful SSE upstream whose event store is shared by every session (as attacked)."""
    yield from _running_upstream(tmp_path_factory, "resumable-upstream", "--resumable")


@pytest.fixture(scope="module")
def gateway(gateways: Any, issuer: Any, resumable_upstream: Any) -> Any:
    return gateways.start(profile=make_profile(issuer, scopes_supported=[]), upstream_url=resumable_upstream.url,
                          config={"policy": {"bundle": str(ROOT / "policies"), "data": [NOTES_DATA]}})


def headers(token: str, session: str | None = None, **extra: str) -> dict[str, str]:
    out = {"Accept": ACCEPT, "Content-Type": "application/json", "Authorization": f"Bearer {token}", "Mcp-Protocol-Version": "2025-11-25",
           **extra}
    if session:
        out["Mcp-Session-Id"] = session
    return out


async def open_session(http: httpx.AsyncClient, url: str, token: str) -> str:
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "attacker", "version": "1"}}}
    resp = await http.post(url, json=init, headers=headers(token))
    assert resp.status_code == 200, resp.text
    session = resp.headers["mcp-session-id"]
    done = await http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers(token, session))
    assert done.status_code == 202
    return session


def sse_messages(text: str) -> list[dict[str, Any]]:
    out = []
    for event in text.replace("\r\n", "\n").split("\n\n"):
        data = "\n".join(line[5:].lstrip() for line in event.split("\n") if line.startswith("data:"))
        if data:
            out.append(json.loads(data))
    return out


async def test_a_reused_request_id_never_delivers_an_unfiltered_listing(gateway: Any, issuer: Any) -> None:
    """Before: tools/list and tools/call sent at once with the same id (or "5" and 5) in one
    session; the SDK routes answers by str(id), so the unfiltered listing came back on the
    tools/call stream, relayed unfiltered (16 of 30 rounds showed purge_notes to a reader)."""
    reader = issuer.mint(aud=gateway.resource, scope="notes.read")
    async with httpx.AsyncClient(timeout=20) as http:
        session = await open_session(http, gateway.mcp_url, reader)
        seen, refused = "", 0
        for round_ in range(30):
            ids = (5, 5) if round_ % 2 else ("5", 5)
            listing = {"jsonrpc": "2.0", "id": ids[0], "method": "tools/list"}
            call = {"jsonrpc": "2.0", "id": ids[1], "method": "tools/call", "params": {"name": "list_notes", "arguments": {}}}
            answers = await asyncio.gather(*(http.post(gateway.mcp_url, json=body, headers=headers(reader, session)) for body in (listing, call)))
            for answer in answers:
                seen += answer.text
                refused += answer.status_code == 400 and "request_id_in_use" in answer.text
    assert not [name for name in HIDDEN_FROM_READERS if name in seen], "a hidden tool reached a reader"
    assert refused > 0  # the race was on, and the second request with the id was refused


async def test_ids_are_per_session(gateway: Any, issuer: Any) -> None:
    reader = issuer.mint(aud=gateway.resource, scope="notes.read")
    async with httpx.AsyncClient(timeout=20) as http:
        a, b = await open_session(http, gateway.mcp_url, reader), await open_session(http, gateway.mcp_url, reader)
        listing = {"jsonrpc": "2.0", "id": 9, "method": "tools/list"}
        answers = await asyncio.gather(*(http.post(gateway.mcp_url, json=listing, headers=headers(reader, s)) for s in (a, b)))
    assert [r.status_code for r in answers] == [200, 200]


async def test_replay_after_last_event_id_is_filtered_too(gateway: Any, issuer: Any) -> None:
    """Before: GET with Last-Event-ID of a filtered listing's stream replayed the upstream's
    stored, unfiltered events (with a store shared across sessions, other users' too)."""
    writer = issuer.mint(aud=gateway.resource, sub="wendy", scope="notes.read notes.write notes.admin")
    reader = issuer.mint(aud=gateway.resource, sub="rita", scope="notes.read")
    async with httpx.AsyncClient(timeout=20) as http:
        writer_session = await open_session(http, gateway.mcp_url, writer)
        page = await http.post(gateway.mcp_url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, headers=headers(writer, writer_session))
        assert "purge_notes" in page.text  # the admin sees it
        event_ids = [line[3:].strip() for line in page.text.replace("\r\n", "\n").split("\n") if line.startswith("id:")]
        assert event_ids, page.text
        reader_session = await open_session(http, gateway.mcp_url, reader)
        for last in event_ids[:1]:
            async with http.stream("GET", gateway.mcp_url, headers=headers(reader, reader_session, **{"Last-Event-ID": last})) as replay:
                text = ""
                try:
                    async with asyncio.timeout(2):
                        async for chunk in replay.aiter_text():
                            text += chunk
                except TimeoutError:
                    pass  # the GET stream stays open after the replay
        for message in sse_messages(text):
            tools = {t["name"] for t in (message.get("result") or {}).get("tools", [])}
            assert not tools & set(HIDDEN_FROM_READERS), message


@pytest.fixture(scope="module")
def json_gateway(gateways: Any, issuer: Any, json_upstream: Any) -> Any:
    return gateways.start(profile=make_profile(issuer, scopes_supported=[]), upstream_url=json_upstream.url,
                          config={"policy": {"bundle": str(ROOT / "policies"), "data": [NOTES_DATA]}})


@pytest.mark.parametrize("method,params,expected", [
    ("completion/complete", {"ref": {"type": "ref/prompt", "name": "secret_prompt"}, "argument": {"name": "a", "value": ""}},
     (403, "prompt_not_listed")),
    ("completion/complete", {"ref": {"type": "ref/resource", "uri": "files:///etc/{name}"}, "argument": {"name": "name", "value": "p"}},
     (403, "resource_not_listed")),
    ("resources/subscribe", {"uri": "files:///etc/passwd"}, (403, "resource_not_listed")),
    ("resources/unsubscribe", {"uri": "files:///etc/passwd"}, (403, "resource_not_listed")),
    ("subscriptions/listen", {"notifications": {"resourceSubscriptions": ["notes://1", "files:///etc/passwd"]}}, (403, "resource_not_listed")),
    ("completion/complete", {"ref": {"type": "ref/tool", "name": "x"}}, (400, "invalid_params")),
    ("resources/subscribe", {"uri": 5}, (400, "invalid_params")),
    ("subscriptions/listen", {"notifications": {"resourceSubscriptions": "notes://1"}}, (400, "invalid_params")),
])
def test_every_method_that_names_something_goes_through_the_per_name_rules(json_gateway: Any, issuer: Any, json_upstream: Any,
                                                                          method: str, params: dict[str, Any], expected: tuple[int, str]) -> None:
    """Before: completion/complete on a hidden prompt returned data; (un)subscribe and
    subscriptions/listen on hidden URIs were accepted."""
    token = issuer.mint(aud=json_gateway.resource, scope="notes.read notes.write notes.admin")
    json_upstream.clear()
    resp = httpx.post(json_gateway.mcp_url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params}, headers=headers(token))
    assert (resp.status_code, resp.json()["error"]["data"]["reason"]) == expected
    assert json_upstream.requests() == []


def test_a_completion_on_a_visible_prompt_is_forwarded(json_gateway: Any, issuer: Any, json_upstream: Any) -> None:
    token = issuer.mint(aud=json_gateway.resource, scope="notes.read")
    json_upstream.clear()
    body = {"jsonrpc": "2.0", "id": 1, "method": "completion/complete",
            "params": {"ref": {"type": "ref/prompt", "name": "summarize_notes"}, "argument": {"name": "topic", "value": "a"}}}
    resp = httpx.post(json_gateway.mcp_url, json=body, headers=headers(token))
    assert resp.status_code == 200, resp.text
    assert len(json_upstream.requests()) == 1


def test_a_name_cannot_forge_a_line_of_the_audit_log(json_gateway: Any, issuer: Any) -> None:
    """Names with CR/LF/NUL forged lines in the text audit log."""
    token = issuer.mint(aud=json_gateway.resource, scope="notes.read")
    forged = "x\n2026-01-01 00:00:00,000 INFO gateway.audit: decision id=forged action=accept\r\x00"
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": forged, "arguments": {}}}
    assert httpx.post(json_gateway.mcp_url, json=call, headers=headers(token)).status_code == 400
    lines = json_gateway.log().splitlines()
    assert not [line for line in lines if line.startswith("2026-01-01 00:00:00,000")]
    assert [line for line in lines if "gateway.audit" in line and "id=forged" in line]  # logged, escaped, inside a real line


def test_opa_without_the_configured_data_refuses_and_is_not_ready(gateways: Any, issuer: Any, json_upstream: Any, tmp_path: Any) -> None:
    """policy.engine: opa silently dropped policy.data: purge_notes became callable by anyone."""
    from tests.conftest import start_opa

    bare = start_opa(ROOT / "policies", tmp_path)  # OPA without the notes data
    try:
        gw = gateways.start(profile=make_profile(issuer, scopes_supported=[]), upstream_url=json_upstream.url,
                            config={"policy": {"engine": "opa", "opa_url": bare.url, "bundle": str(ROOT / "policies"), "data": [NOTES_DATA]}})
        token = issuer.mint(aud=gw.resource, scope="notes.read")
        json_upstream.clear()
        call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "purge_notes", "arguments": {}}}
        resp = httpx.post(gw.mcp_url, json=call, headers=headers(token))
        assert resp.status_code == 503 and json_upstream.requests() == []
        ready = httpx.get(gw.base + "/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["policy"] is False
        assert "OPA does not hold the configured policy data" in gw.log()
    finally:
        bare.stop()
    with_data = start_opa(ROOT / "policies", tmp_path, Path(NOTES_DATA))
    try:
        gw = gateways.start(profile=make_profile(issuer, scopes_supported=[]), upstream_url=json_upstream.url,
                            config={"policy": {"engine": "opa", "opa_url": with_data.url, "bundle": str(ROOT / "policies"), "data": [NOTES_DATA]}})
        token = issuer.mint(aud=gw.resource, scope="notes.read")
        resp = httpx.post(gw.mcp_url, json=call, headers=headers(token))
        assert resp.status_code == 403 and resp.json()["error"]["data"]["reason"] == "insufficient_scope"
        assert httpx.get(gw.base + "/readyz").status_code == 200
    finally:
        with_data.stop()


@pytest.fixture(scope="module")
def limited_gateway(gateways: Any, issuer: Any, json_upstream: Any) -> Any:
    listen = {"max_header_bytes": 8_192, "max_headers": 30, "header_timeout": 1.0, "body_timeout": 1.0, "max_connections_per_address": 8}
    return gateways.start(profile=make_profile(issuer, scopes_supported=[]), upstream_url=json_upstream.url,
                          config={"listen": listen}, replica="limited")


async def _raw(gateway: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", gateway.port)


async def _answer(reader: asyncio.StreamReader, within: float = 5.0) -> bytes:
    """What the server sends before it closes the connection (b"" if it just closes)."""
    async with asyncio.timeout(within):
        try:
            return await reader.read()
        except ConnectionResetError:  # closed while our request was in flight: refused
            return b""


async def test_oversized_or_overlong_request_heads_are_refused(limited_gateway: Any) -> None:
    """Before: 4 x 50 MB of unfinished headers cost 200 MB; there was no limit on size or count."""
    reader, writer = await _raw(limited_gateway)
    writer.write(b"POST /mcp HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000)
    assert (await _answer(reader)).startswith(b"HTTP/1.1 431")
    reader, writer = await _raw(limited_gateway)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(40)) + b"\r\n")
    assert (await _answer(reader)).startswith(b"HTTP/1.1 400")


async def test_slow_heads_and_bodies_are_cut_at_their_deadline(limited_gateway: Any) -> None:
    """Before: one byte a second kept a connection 40 s and more."""
    reader, writer = await _raw(limited_gateway)
    started = asyncio.get_running_loop().time()
    writer.write(b"POST /mcp HTTP/1.1\r\nHo")  # and then nothing
    assert (await _answer(reader)).startswith(b"HTTP/1.1 408")
    assert asyncio.get_running_loop().time() - started < 4
    reader, writer = await _raw(limited_gateway)
    writer.write(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"js")
    started = asyncio.get_running_loop().time()
    await _answer(reader)  # whatever the gateway says, the connection ends
    assert asyncio.get_running_loop().time() - started < 4


async def test_connections_per_address_are_capped(limited_gateway: Any) -> None:
    held = [await _raw(limited_gateway) for _ in range(8)]
    for _, writer in held:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    reader, writer = await _raw(limited_gateway)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await _answer(reader) == b""  # refused: closed without an answer
    for _, w in held:
        w.close()
    await asyncio.sleep(0.3)
    async with httpx.AsyncClient() as http:  # once they are gone, the address may connect again
        assert (await http.get(limited_gateway.base + "/healthz")).status_code == 200


async def test_one_user_cannot_starve_everyone(gateways: Any, issuer: Any, json_upstream: Any) -> None:
    """Before: 100 long-lived requests from one user took the whole upstream pool; every other
    user got 504. Now each identity has its own limit, answered 429 with Retry-After."""
    gw = gateways.start(profile=make_profile(issuer, scopes_supported=[]), upstream_url=json_upstream.url,
                        config={"limits": {"max_requests_per_identity": 2, "max_streams_per_identity": 2}}, replica="per-identity")
    alice = issuer.mint(aud=gw.resource, sub="alice-starver", scope="notes.read")
    bob = issuer.mint(aud=gw.resource, sub="bob-victim", scope="notes.read")

    def hold(key: str) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "wait_for_release", "arguments": {"key": key}}}

    async with httpx.AsyncClient(timeout=30) as http:
        held = [asyncio.create_task(http.post(gw.mcp_url, json=hold(f"starve-{i}"), headers=headers(alice))) for i in range(2)]
        await asyncio.sleep(1.0)
        third = await http.post(gw.mcp_url, json=hold("starve-2"), headers=headers(alice))
        assert third.status_code == 429 and third.json()["error"]["data"]["reason"] == "too_many_requests"
        assert third.headers["retry-after"]
        listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
        assert (await http.post(gw.mcp_url, json=listing, headers=headers(bob))).status_code == 200  # bob is not affected
        for i in range(3):
            (json_upstream.record_dir / f"release-starve-{i}").write_text("go")
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
        assert (await http.post(gw.mcp_url, json=listing, headers=headers(alice))).status_code == 200  # her slots came back


async def test_a_large_body_in_one_read_is_not_taken_for_a_large_head(limited_gateway: Any, issuer: Any) -> None:
    """The head limit counts the head only, even when one read holds the head and much body."""
    token = issuer.mint(aud=limited_gateway.resource, scope="notes.read")
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": "list_notes", "arguments": {"pad": "x" * 60_000}}}).encode()
    reader, writer = await _raw(limited_gateway)
    head = (b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
    writer.write(head + body)  # one write: the server reads head and body together
    answer = await _answer(reader, within=10)
    assert not answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert answer.startswith(b"HTTP/1.1 ")
