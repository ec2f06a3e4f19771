"""Tool-level authorization through the SDK client: per-tool scopes and argument rules
(examples/notes-authz.yaml with the shipped policy), filtered listings, session binding.

Every test asserts what a client observes and what the upstream saw.
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import ROOT, _running_upstream, make_profile

NOTES_DATA = str(ROOT / "examples" / "notes-authz.yaml")
ACCEPT = "application/json, text/event-stream"
READER = "notes.read"
WRITER = "notes.read notes.write"


@pytest.fixture(scope="module")
def notes_upstream(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A stateful SSE upstream of this module's own (these tests delete notes)."""
    yield from _running_upstream(tmp_path_factory, "notes-upstream")


@pytest.fixture(scope="module")
def notes_json_upstream(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from _running_upstream(tmp_path_factory, "notes-json-upstream", "--json-response", "--stateless")


def start_notes_gateway(gateways: Any, issuer: Any, upstream_url: str, replica: str = "", **config: Any) -> Any:
    return gateways.start(
        profile=make_profile(issuer, scopes_supported=[]),
        upstream_url=upstream_url,
        config={"policy": {"engine": "embedded", "bundle": str(ROOT / "policies"), "data": [NOTES_DATA]}, **config},
        replica=replica,
    )


@pytest.fixture(scope="module")
def notes_gateway(gateways: Any, issuer: Any, notes_upstream: Any) -> Any:
    return start_notes_gateway(gateways, issuer, notes_upstream.url)


@pytest.fixture(scope="module")
def notes_json_gateway(gateways: Any, issuer: Any, notes_json_upstream: Any) -> Any:
    return start_notes_gateway(gateways, issuer, notes_json_upstream.url)


@asynccontextmanager
async def sdk_client(url: str, token: str, mode: str) -> Any:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=20) as http:
        async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:
            yield client


def post(url: str, token: str, body: Any, **headers: str) -> httpx.Response:
    h = {"Accept": ACCEPT, "Content-Type": "application/json", "Authorization": f"Bearer {token}", **headers}
    return httpx.post(url, content=json.dumps(body), headers=h, timeout=20)


def call(name: str, args: dict[str, Any], request_id: int = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": {"name": name, "arguments": args}}


def reason(resp: httpx.Response) -> str:
    return resp.json()["error"]["data"]["reason"]


def tool_calls(upstream: Any) -> list[str]:
    """The tool names the upstream was asked to call."""
    out = []
    for r in upstream.requests():
        body = json.loads(r["body"]) if r["body"] else {}
        if isinstance(body, dict) and body.get("method") == "tools/call":
            out.append(body["params"]["name"])
    return out


# --- Filtered listings ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_listings_are_filtered_per_user(mode, issuer, notes_gateway, notes_json_gateway) -> None:
    gw = notes_gateway if mode == "legacy" else notes_json_gateway  # SSE answers, then JSON answers
    seen: dict[str, dict[str, set[str]]] = {}
    for who, scope in (("reader", READER), ("writer", WRITER), ("admin", WRITER + " notes.admin"), ("nobody", "")):
        async with sdk_client(gw.mcp_url, issuer.mint(sub=who, aud=gw.resource, scope=scope), mode) as client:
            seen[who] = {
                "tools": {t.name for t in (await client.list_tools()).tools},
                "resources": {r.uri for r in (await client.list_resources()).resources},
                "templates": {t.uri_template for t in (await client.list_resource_templates()).resource_templates},
                "prompts": {p.name for p in (await client.list_prompts()).prompts},
            }
    # wait_for_release exists upstream but no rule names it: hidden from everyone (unlisted: deny)
    assert seen["reader"]["tools"] == {"list_notes", "read_note", "count"}
    assert seen["writer"]["tools"] == {"list_notes", "read_note", "count", "create_note", "delete_note"}
    assert seen["admin"]["tools"] == seen["writer"]["tools"] | {"purge_notes"}
    assert seen["nobody"]["tools"] == set()
    assert seen["reader"]["resources"] == {"notes://index"} and seen["reader"]["templates"] == {"notes://{id}"}
    assert seen["reader"]["prompts"] == {"summarize_notes"}
    assert seen["nobody"]["resources"] == seen["nobody"]["templates"] == seen["nobody"]["prompts"] == set()


def test_listing_filter_is_one_policy_evaluation_per_page(issuer, notes_json_gateway) -> None:
    """The decision log shows the request's decision; the page costs one more evaluation, not one per tool."""
    gw = notes_json_gateway
    before = _listing_evaluations(gw)
    resp = post(gw.mcp_url, issuer.mint(aud=gw.resource, scope=READER), {"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert resp.status_code == 200
    assert {t["name"] for t in resp.json()["result"]["tools"]} == {"list_notes", "read_note", "count"}
    assert _listing_evaluations(gw) == before + 1  # seven tools upstream, one evaluation


def _listing_evaluations(gw: Any) -> float:
    for line in httpx.get(gw.base + "/metrics").text.splitlines():
        if line.startswith('mcp_gateway_step_seconds_count{step="listing"}'):
            return float(line.split()[-1])
    return 0.0


# --- Per-tool scopes and argument rules -----------------------------------------------------


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_argument_rule_keeps_writes_in_the_callers_folder(mode, issuer, notes_gateway, notes_json_gateway) -> None:
    gw = notes_gateway if mode == "legacy" else notes_json_gateway
    token = issuer.mint(sub="alice", aud=gw.resource, scope=WRITER)
    async with sdk_client(gw.mcp_url, token, mode) as client:
        ok = await client.call_tool("create_note", {"title": "mine", "path": "/users/alice/todo"})
        assert not ok.is_error
    for path in ("/users/bob/todo", "/users/alice/../bob/x", "/users/alice/x\\..\\y", "/elsewhere"):
        resp = post(gw.mcp_url, token, call("create_note", {"title": "t", "path": path}))
        assert (resp.status_code, reason(resp)) == (403, "argument_not_allowed: path"), path
    assert "WWW-Authenticate" not in resp.headers  # not a scope problem: no step-up offered


def test_refused_calls_never_reach_the_upstream(issuer, notes_json_gateway, notes_json_upstream) -> None:
    gw = notes_json_gateway
    notes_json_upstream.clear()
    alice, bob = (issuer.mint(sub=s, aud=gw.resource, scope=WRITER) for s in ("alice", "bob"))
    assert reason(post(gw.mcp_url, bob, call("delete_note", {"id": 1}))) == "argument_not_allowed: id"  # alice's note
    assert reason(post(gw.mcp_url, bob, call("create_note", {"title": "x", "path": "/users/alice/x"}))) == "argument_not_allowed: path"
    assert reason(post(gw.mcp_url, alice, call("purge_notes", {}))) == "insufficient_scope"
    assert reason(post(gw.mcp_url, alice, call("wait_for_release", {"key": "k"}))) == "tool_not_listed"
    assert tool_calls(notes_json_upstream) == []
    ok = post(gw.mcp_url, alice, call("delete_note", {"id": 1}))  # alice owns note 1
    assert ok.status_code == 200 and "deleted 1" in ok.text
    assert tool_calls(notes_json_upstream) == ["delete_note"]


def test_missing_scope_answers_a_step_up_challenge(issuer, notes_json_gateway) -> None:
    gw = notes_json_gateway
    resp = post(gw.mcp_url, issuer.mint(aud=gw.resource, scope=READER), call("create_note", {"title": "t", "path": "/users/alice/a"}))
    assert resp.status_code == 403
    assert reason(resp) == "insufficient_scope"
    www = resp.headers["WWW-Authenticate"]
    assert www.startswith("Bearer ") and 'error="insufficient_scope"' in www and 'scope="notes.write"' in www
    assert f'resource_metadata="{gw.base}/.well-known/oauth-protected-resource/mcp"' in www
    assert resp.json()["id"] == 1 and resp.json()["error"]["code"] == -32003


def test_metadata_and_first_challenge_scopes_come_from_the_data(issuer, notes_json_gateway) -> None:
    gw = notes_json_gateway
    prm = httpx.get(gw.base + "/.well-known/oauth-protected-resource/mcp").json()
    assert prm["scopes_supported"] == ["notes.read", "notes.write", "notes.admin"]
    unauthenticated = httpx.post(gw.mcp_url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, headers={"Accept": ACCEPT})
    assert unauthenticated.status_code == 401
    assert 'scope="notes.read"' in unauthenticated.headers["WWW-Authenticate"]


HOSTILE_NAMES = [
    'list_notes"',
    "list_notes\\",
    "list_notes\n",
    "list_notes\x00",
    "list_nоtes",  # Cyrillic о
    "ｌist_notes",  # fullwidth l
    "list_notes\u200b",  # zero-width space
    "*",
    "list_*",
    "../list_notes",
    "x" * 20_000,
]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=range(len(HOSTILE_NAMES)))
def test_hostile_tool_names_are_refused(name, issuer, notes_json_gateway, notes_json_upstream) -> None:
    gw = notes_json_gateway
    notes_json_upstream.clear()
    token = issuer.mint(aud=gw.resource, scope=WRITER + " notes.admin")
    resp = post(gw.mcp_url, token, call(name, {}))
    # outside the specification's tool-name characters (policies/mcp-names.yaml): 400, never forwarded
    assert (resp.status_code, reason(resp)) == (400, "invalid_tool_name")
    assert tool_calls(notes_json_upstream) == []
    assert post(gw.mcp_url, token, call("list_notes", {})).status_code == 200  # the engine is still fine


def test_deeply_nested_arguments_get_a_decision(issuer, notes_json_gateway, notes_json_upstream) -> None:
    gw = notes_json_gateway
    notes_json_upstream.clear()
    token = issuer.mint(aud=gw.resource, scope=WRITER)
    nested: Any = "/users/alice/x"
    for _ in range(25):  # 50 levels: inside the depth limit, so the policy judges it
        nested = {"a": [nested]}
    resp = post(gw.mcp_url, token, call("create_note", {"title": "t", "path": nested}))
    assert (resp.status_code, reason(resp)) == (403, "argument_not_allowed: path")
    too_deep: Any = "x"
    for _ in range(100):
        too_deep = [too_deep]
    resp = post(gw.mcp_url, token, call("create_note", {"title": "t", "path": too_deep}))
    assert (resp.status_code, reason(resp)) == (400, "too_deep")
    assert tool_calls(notes_json_upstream) == []


# --- Session binding ----------------------------------------------------------------------


async def test_a_hijacked_session_id_is_refused_as_not_found(issuer, notes_gateway, notes_upstream) -> None:
    gw = notes_gateway
    alice = issuer.mint(sub="alice", aud=gw.resource, scope=WRITER)
    session_ids: list[str] = []

    async def remember(response: httpx2.Response) -> None:
        if sid := response.headers.get("mcp-session-id"):
            session_ids.append(sid)

    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {alice}"}, timeout=20, event_hooks={"response": [remember]}) as http:
        async with Client(streamable_http_client(gw.mcp_url, http_client=http), mode="legacy") as client:
            await client.list_tools()
            assert session_ids, "the upstream handed out no session id"
            sid = session_ids[0]
            notes_upstream.clear()
            headers = {"Mcp-Session-Id": sid, "Mcp-Protocol-Version": "2025-11-25"}
            mallory = issuer.mint(sub="mallory", aud=gw.resource, scope=WRITER)
            stolen = post(gw.mcp_url, mallory, call("list_notes", {}), **headers)
            assert (stolen.status_code, reason(stolen)) == (404, "session_not_found")
            assert stolen.json()["error"]["message"] == "session not found"
            made_up = post(gw.mcp_url, alice, call("list_notes", {}), **{**headers, "Mcp-Session-Id": "not-a-session"})
            assert made_up.status_code == 404
            assert notes_upstream.requests() == []  # neither reached the upstream
            assert not (await client.call_tool("list_notes", {})).is_error  # the owner goes on
    refusals = [line for line in gw.log().splitlines() if "refused" in line and "session" in line]
    assert any("belongs to another user; refused as not found (sub=sub:mallory, owner sub=sub:alice)" in line for line in refusals)
    assert any("unknown to the gateway; refused (sub=sub:alice)" in line for line in refusals)
    assert not any(sid in line for line in refusals)  # the warnings name the id by its hash


async def test_two_replicas_share_sessions_through_redis(gateways, issuer, notes_upstream, redis_server) -> None:
    # two replicas behind one public URL (as behind a load balancer), sharing one Redis
    config = {"public_url": "https://notes.example", "sessions": {"store": "redis", "url": redis_server.url, "ttl": 600}}
    first = start_notes_gateway(gateways, issuer, notes_upstream.url, replica="a", **config)
    second = start_notes_gateway(gateways, issuer, notes_upstream.url, replica="b", **config)
    assert first.port != second.port
    resource = "https://notes.example/mcp"
    alice = issuer.mint(sub="alice", aud=resource, scope=WRITER)
    init = {
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
    opened = post(first.mcp_url, alice, init)
    assert opened.status_code == 200
    sid = opened.headers["mcp-session-id"]
    headers = {"Mcp-Session-Id": sid, "Mcp-Protocol-Version": "2025-11-25"}
    assert post(second.mcp_url, alice, {"jsonrpc": "2.0", "method": "notifications/initialized"}, **headers).status_code == 202
    used = post(second.mcp_url, alice, call("list_notes", {}), **headers)
    assert used.status_code == 200 and "welcome" in used.text
    bob = post(second.mcp_url, issuer.mint(sub="bob", aud=resource, scope=WRITER), call("list_notes", {}), **headers)
    assert (bob.status_code, reason(bob)) == (404, "session_not_found")
    # the binding is in Redis, hashed, with a TTL
    keys = redis_server.command("KEYS", "mcp-gateway:session:*")
    assert sid not in keys and "mcp-gateway:session:" in keys
    key = next(line for line in keys.splitlines() if line.startswith("mcp-gateway:session:"))
    ttl = int(redis_server.command("TTL", key).strip().lstrip(":"))
    assert 0 < ttl <= 600
    # DELETE through either replica ends the session and the binding
    ended = httpx.delete(second.mcp_url, headers={"Authorization": f"Bearer {alice}", **headers})
    assert ended.status_code == 200
    assert redis_server.command("EXISTS", key).strip() == ":0"
