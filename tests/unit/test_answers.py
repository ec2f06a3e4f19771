"""The answer guard on real upstream-shaped answers (JSON and SSE), and the session stores.

The `visible` callbacks here stand in for the policy engine (the integration tests run
the real one); they record what they were asked so the tests can count evaluations.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gateway.mcp.answers import LISTINGS, guard_answer
from gateway.mcp.jsonrpc import Refusal
from gateway.mcp.sessions import (
    MemorySessionStore,
    Owner,
    SessionBinding,
    SessionNotFound,
)
from gateway.mcp.upstream import UpstreamAnswer, UpstreamError

TOOLS = LISTINGS[0]
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
    out = json.loads((await guard_answer(json_answer(PAGE), 7, policy)).body or b"")
    assert out["result"] == {"tools": [{"name": "list_notes"}], "nextCursor": "opaque-cursor==", "_meta": {"k": "v"}}
    assert policy.asked == [["list_notes", "delete_note"]]  # one question for the page


async def test_other_messages_pass_untouched_and_a_foreign_id_is_refused() -> None:
    policy = Policy(set())
    error = {"jsonrpc": "2.0", "id": 7, "error": {"code": -1, "message": "no"}}
    result = {"jsonrpc": "2.0", "id": 7, "result": {"content": []}}
    for message in (error, result):
        answer = json_answer(message)
        assert (await guard_answer(answer, 7, policy)) is answer
    assert policy.asked == []
    for wrong in (8, "7", 7.0, None, True):  # a mismatch never passes, "7" is not 7
        with pytest.raises(UpstreamError) as info:
            await guard_answer(json_answer({**result, "id": wrong}), 7, policy)
        assert info.value.status == 502


async def test_sse_page_filtered_across_chunks_and_notifications_relayed() -> None:
    progress = b'event: message\r\ndata: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}\r\n\r\n'
    page = b"event: message\r\nid: 3\r\ndata: " + json.dumps(PAGE).encode() + b"\r\n\r\n"
    policy = Policy({"delete_note"})
    body = await read(await guard_answer(sse_answer(progress[:20], progress[20:] + page[:30], page[30:]), 7, policy))
    events = body.split(b"\n\n")
    assert events[0] == progress.replace(b"\r\n", b"\n").rstrip(b"\n")
    assert events[1].startswith(b"event: message\nid: 3\ndata: ")
    rewritten = json.loads(events[1].split(b"data: ", 1)[1])
    assert rewritten["result"]["tools"] == [{"name": "delete_note"}] and rewritten["result"]["nextCursor"] == "opaque-cursor=="
    assert policy.asked == [["list_notes", "delete_note"]]


async def test_policy_failure_fails_closed() -> None:
    with pytest.raises(Refusal) as info:
        await guard_answer(json_answer(PAGE), 7, Policy(set(), fail=True))
    assert info.value.status == 503
    page = b"data: " + json.dumps(PAGE).encode() + b"\n\n"
    body = await read(await guard_answer(sse_answer(page), 7, Policy(set(), fail=True)))
    message = json.loads(body.split(b"data: ", 1)[1])
    assert "result" not in message and message["error"]["data"]["reason"] == "policy_error" and message["id"] == 7


async def test_unparseable_json_page_is_a_bad_gateway() -> None:
    answer = UpstreamAnswer(200, [], "application/json", b"{not json", None)
    with pytest.raises(UpstreamError) as info:
        await guard_answer(answer, 7, Policy(set()))
    assert info.value.status == 502


def _event(message: Any, eol: bytes = b"\n", event_id: bytes = b"") -> bytes:
    head = b"event: message" + eol + (b"id: " + event_id + eol if event_id else b"")
    return head + b"data: " + json.dumps(message).encode() + eol + eol


async def test_a_listing_on_another_requests_stream_is_filtered_or_dropped() -> None:
    """The reused-id leak: a tools/list page arriving on the stream of a tools/call."""
    policy = Policy({"list_notes"})
    same_id = {**PAGE, "id": 5}
    body = await read(await guard_answer(sse_answer(_event(same_id)), 5, policy))
    assert json.loads(body.split(b"data: ", 1)[1])["result"]["tools"] == [{"name": "list_notes"}]
    for other in ("5", 6):
        assert await read(await guard_answer(sse_answer(_event({**PAGE, "id": other})), 5, policy)) == b""
    out = json.loads((await guard_answer(json_answer(same_id), 5, policy)).body or b"")
    assert out["result"]["tools"] == [{"name": "list_notes"}]


async def test_replayed_listing_on_a_get_stream_is_filtered() -> None:
    policy = Policy(set())
    body = await read(await guard_answer(sse_answer(_event(PAGE, event_id=b"s1-3")), None, policy))
    assert b"id: s1-3" in body and json.loads(body.split(b"data: ", 1)[1])["result"]["tools"] == []


@pytest.mark.parametrize("eol", [b"\r", b"\r\n", b"\n"])
async def test_every_sse_line_ending_is_understood(eol: bytes) -> None:
    stream = _event({"jsonrpc": "2.0", "method": "notifications/progress", "params": {}}, eol) + _event(PAGE, eol)
    chunks = [stream[i : i + 7] for i in range(0, len(stream), 7)]  # a CRLF split across chunks, too
    body = await read(await guard_answer(sse_answer(*chunks), 7, Policy(set())))
    pages = [json.loads(e.split(b"data: ", 1)[1]) for e in body.split(b"\n\n") if b"data: " in e]
    assert len(pages) == 2 and pages[1]["result"]["tools"] == []


async def test_an_event_cut_at_the_end_a_batch_and_non_json_are_dropped() -> None:
    cut = b"data: " + json.dumps(PAGE).encode() + b"\n"  # no blank line: the stream ended mid-event
    assert await read(await guard_answer(sse_answer(cut), 7, Policy({"list_notes", "delete_note"}))) == b""
    batch = b"data: " + json.dumps([PAGE]).encode() + b"\n\n"
    assert await read(await guard_answer(sse_answer(batch), 7, Policy(set()))) == b""
    assert await read(await guard_answer(sse_answer(b"data: {not json\n\n"), 7, Policy(set()))) == b""
    with pytest.raises(UpstreamError):
        await guard_answer(json_answer([PAGE]), 7, Policy(set()))


async def test_a_successful_body_that_is_not_json_is_refused() -> None:
    text = UpstreamAnswer(200, [], "text/plain", json.dumps(PAGE).encode(), None)
    with pytest.raises(UpstreamError):
        await guard_answer(text, 7, Policy(set()))
    accepted = UpstreamAnswer(202, [], "text/plain", b"", None)
    assert (await guard_answer(accepted, None, Policy(set()))) is accepted


async def test_a_lone_surrogate_in_a_listing_is_hidden_not_a_crash() -> None:
    raw = b'{"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"ok"},{"name":"bad\\ud800"}]}}'
    policy = Policy({"ok"})
    guarded = await guard_answer(UpstreamAnswer(200, [], "application/json", raw, None), 7, policy)
    assert guarded.body is not None and json.loads(guarded.body)["result"]["tools"] == [{"name": "ok"}]
    assert policy.asked == [["ok"]]  # the unjudgeable name never reached the policy


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


async def test_a_priming_event_with_empty_data_is_relayed() -> None:
    """SEP-1699: a resumable stream opens with an event id and empty data; the client resumes
    from that id. (Dropped as 'not JSON' before: the conformance suite's SSE scenarios caught it.)"""
    priming = b"id: 1\nretry: 100\ndata: \n\n"
    message = b"id: 2\ndata: " + json.dumps({"jsonrpc": "2.0", "id": 7, "result": {}}).encode() + b"\n\n"
    assert await read(await guard_answer(sse_answer(priming + message), 7, Policy(set()))) == priming + message


async def test_a_judged_listing_is_never_marked_shareable() -> None:
    """2026-07-28 caching: a page the policy judged per caller is private, even when this caller
    lost nothing; an empty page, or one without cacheScope (older revisions), is left alone."""
    public = {"jsonrpc": "2.0", "id": 7, "result": {**PAGE["result"], "cacheScope": "public", "ttlMs": 60000}}
    everything = Policy({"list_notes", "delete_note"})
    guarded = json.loads((await guard_answer(json_answer(public), 7, everything)).body or b"")
    assert guarded["result"]["cacheScope"] == "private" and guarded["result"]["ttlMs"] == 60000
    assert [t["name"] for t in guarded["result"]["tools"]] == ["list_notes", "delete_note"]  # nothing of this caller's lost
    empty = {"jsonrpc": "2.0", "id": 7, "result": {"tools": [], "cacheScope": "public"}}
    assert json.loads((await guard_answer(json_answer(empty), 7, everything)).body or b"")["result"]["cacheScope"] == "public"
    older = json.loads((await guard_answer(json_answer(PAGE), 7, everything)).body or b"")
    assert "cacheScope" not in older["result"]
