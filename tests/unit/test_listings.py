"""Listing filters on real upstream-shaped pages (JSON and SSE), and the session stores.

The `visible` callbacks here stand in for the policy engine (the integration tests run
the real one); they record what they were asked so the tests can count evaluations.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gateway.mcp.jsonrpc import Refusal
from gateway.mcp.listings import LISTINGS, filter_answer
from gateway.mcp.sessions import (
    MemorySessionStore,
    Owner,
    SessionBinding,
    SessionNotFound,
)
from gateway.mcp.upstream import UpstreamAnswer, UpstreamError

TOOLS = LISTINGS["tools/list"]
PAGE = {
    "jsonrpc": "2.0",
    "id": 7,
    "result": {
        "tools": [{"name": "list_notes"}, {"name": "delete_note"}, {"nameless": True}, {"name": 5}],
        "nextCursor": "opaque-cursor==",
        "_meta": {"k": "v"},
    },
}


class Policy:
    """Stands in for the engine: allows the names given, records each question."""

    def __init__(self, allowed: set[str], fail: bool = False) -> None:
        self.allowed = allowed
        self.fail = fail
        self.asked: list[list[str]] = []

    async def __call__(self, listing: Any, names: list[str]) -> frozenset[str]:
        self.asked.append(names)
        if self.fail:
            raise Refusal(503, "policy_error", "the authorization policy could not filter the listing")
        return frozenset(n for n in names if n in self.allowed)


def json_answer(message: Any) -> UpstreamAnswer:
    return UpstreamAnswer(200, [], "application/json", json.dumps(message).encode(), None)


def sse_answer(*chunks: bytes) -> UpstreamAnswer:
    async def stream() -> Any:
        for chunk in chunks:
            yield chunk

    return UpstreamAnswer(200, [], "text/event-stream", None, stream())


async def read(answer: UpstreamAnswer) -> bytes:
    assert answer.stream is not None
    return b"".join([chunk async for chunk in answer.stream])


async def test_json_page_filtered_cursor_and_meta_kept() -> None:
    policy = Policy({"list_notes"})
    out = json.loads((await filter_answer(json_answer(PAGE), TOOLS, 7, policy)).body or b"")
    assert out["result"] == {"tools": [{"name": "list_notes"}], "nextCursor": "opaque-cursor==", "_meta": {"k": "v"}}
    assert policy.asked == [["list_notes", "delete_note"]]  # one question for the page


async def test_other_messages_pass_untouched() -> None:
    policy = Policy(set())
    error = {"jsonrpc": "2.0", "id": 7, "error": {"code": -1, "message": "no"}}
    other_id = {**PAGE, "id": 8}
    for message in (error, other_id):
        answer = json_answer(message)
        assert (await filter_answer(answer, TOOLS, 7, policy)) is answer
    assert policy.asked == []


async def test_sse_page_filtered_across_chunks_and_notifications_relayed() -> None:
    progress = b'event: message\r\ndata: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}\r\n\r\n'
    page = b"event: message\r\nid: 3\r\ndata: " + json.dumps(PAGE).encode() + b"\r\n\r\n"
    policy = Policy({"delete_note"})
    body = await read(await filter_answer(sse_answer(progress[:20], progress[20:] + page[:30], page[30:]), TOOLS, 7, policy))
    events = body.split(b"\n\n")
    assert events[0] == progress.replace(b"\r\n", b"\n").rstrip(b"\n")
    assert events[1].startswith(b"event: message\nid: 3\ndata: ")
    rewritten = json.loads(events[1].split(b"data: ", 1)[1])
    assert rewritten["result"]["tools"] == [{"name": "delete_note"}] and rewritten["result"]["nextCursor"] == "opaque-cursor=="
    assert policy.asked == [["list_notes", "delete_note"]]


async def test_policy_failure_fails_closed() -> None:
    with pytest.raises(Refusal) as info:
        await filter_answer(json_answer(PAGE), TOOLS, 7, Policy(set(), fail=True))
    assert info.value.status == 503
    page = b"data: " + json.dumps(PAGE).encode() + b"\n\n"
    body = await read(await filter_answer(sse_answer(page), TOOLS, 7, Policy(set(), fail=True)))
    message = json.loads(body.split(b"data: ", 1)[1])
    assert "result" not in message and message["error"]["data"]["reason"] == "policy_error" and message["id"] == 7


async def test_unparseable_json_page_is_a_bad_gateway() -> None:
    answer = UpstreamAnswer(200, [], "application/json", b"{not json", None)
    with pytest.raises(UpstreamError) as info:
        await filter_answer(answer, TOOLS, 7, Policy(set()))
    assert info.value.status == 502


async def test_memory_sessions_bind_refuse_expire_and_evict() -> None:
    binding = SessionBinding(MemorySessionStore(ttl=0.2, max_entries=2))
    alice, bob = Owner("https://idp", "alice"), Owner("https://idp", "bob")
    await binding.opened("s1", alice)
    await binding.check("s1", alice)
    await binding.check(None, bob)  # no session: nothing to check
    with pytest.raises(SessionNotFound) as info:
        await binding.check("s1", bob)
    assert info.value.detail == "owned_by_another_user" and info.value.status == 404
    with pytest.raises(SessionNotFound) as info:
        await binding.check("s1", Owner("https://other-idp", "alice"))  # same sub, other issuer
    await asyncio.sleep(0.25)
    with pytest.raises(SessionNotFound) as info:
        await binding.check("s1", alice)
    assert info.value.detail == "unknown_session"
    for sid in ("a", "b", "c"):
        await binding.opened(sid, alice)
    with pytest.raises(SessionNotFound):
        await binding.check("a", alice)  # the oldest was evicted
    await binding.closed("c")
    with pytest.raises(SessionNotFound):
        await binding.check("c", alice)
