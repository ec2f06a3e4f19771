"""What may reach the client of the upstream's answers: every answer is guarded, not only
the answer to a listing request.

The upstream is trusted to serve MCP, not to route answers: an SDK server that routes by
`str(id)` delivered a `tools/list` result on the `tools/call` stream of a request reusing
the id, and a `GET` with `Last-Event-ID` replays stored events. So, for every JSON answer and
every SSE event, on POST and GET alike:
- a listing-shaped result (`tools`, `resources`, `resourceTemplates`, `prompts`) is filtered
  by the shape it has, whatever was asked: every candidate name goes to the policy in one
  input (`input.listing`), and only the items it calls `visible` are kept. Everything else
  (`nextCursor`, `_meta`) stays as the upstream wrote it, so pagination works unchanged,
  except a `cacheScope` other than `"private"`: the page is per caller now;
- on the answer to a request, a response whose id is not exactly the request's id (type
  included: `"5"` is not `5`) is dropped (SSE) or refused (JSON, 502): a mismatch never passes;
- a batch, a message that is not JSON, an SSE event cut off at the end of the stream, or a
  non-JSON body in a successful answer are dropped or refused. SSE line endings CRLF, LF and
  CR are all understood (a CR-only stream cannot slip past as one unparsed event).
Fail closed: an item without a usable name is dropped; if the policy cannot decide, the
client gets a JSON-RPC error instead of the page.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.mcp import jsonrpc
from gateway.mcp.jsonrpc import Refusal
from gateway.mcp.upstream import UpstreamAnswer, UpstreamError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Listing:
    method: str
    catalogue: str  # the data.authz section whose rules apply: tools | resources | prompts
    items_key: str  # where the page's items are in `result`
    name_key: str  # the item field that names it, as a call would


LISTINGS = (
    Listing("tools/list", "tools", "tools", "name"),
    Listing("resources/list", "resources", "resources", "uri"),
    Listing("resources/templates/list", "resources", "resourceTemplates", "uriTemplate"),
    Listing("prompts/list", "prompts", "prompts", "name"),
)
LISTING_METHODS = frozenset(listing.method for listing in LISTINGS)

#: names → the subset the caller may see; raises Refusal when the policy cannot decide
VisibleNames = Callable[[Listing, list[str]], Awaitable[frozenset[str]]]

_NO_REQUEST = object()


class Dropped(Exception):
    """A message that must not reach the client (the reason says why, for the log)."""


def _same_id(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _name(item: Any, listing: Listing) -> str | None:
    name = item.get(listing.name_key) if isinstance(item, dict) else None
    if not isinstance(name, str):
        return None
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no policy can judge it; hidden
        return None
    return name


async def guard_message(message: Any, request_id: Any, visible_names: VisibleNames) -> Any:
    """The message as the client may see it (the same object when nothing changes).

    `request_id`: the id of the request this answers, or `_NO_REQUEST` (a GET stream, or
    the answer to a notification). Raises Dropped for a message the client must not get.
    """
    if not isinstance(message, dict):
        raise Dropped("not a single JSON-RPC message (a batch or a bare value)")
    is_response = "method" not in message and ("result" in message or "error" in message)
    if not is_response:
        return message  # the server's own requests and notifications
    if request_id is not _NO_REQUEST and not _same_id(message.get("id"), request_id):
        raise Dropped("a response whose id is not the request's")
    result = message.get("result")
    if not isinstance(result, dict):
        return message
    changed: dict[str, Any] | None = None
    judged = False
    for listing in LISTINGS:
        items = result.get(listing.items_key)
        if items is None:
            continue
        if not isinstance(items, list):
            raise Dropped(f"a {listing.items_key} result that is not a list")
        names = [name for item in items if (name := _name(item, listing)) is not None]
        judged = judged or bool(items)
        visible = await visible_names(listing, names) if names else frozenset()
        kept = [item for item in items if _name(item, listing) in visible]
        if len(kept) != len(items):
            changed = changed if changed is not None else dict(result)
            changed[listing.items_key] = kept
    if judged and "cacheScope" in result and result["cacheScope"] != "private":
        # what this page shows depends on who asked: no shared cache may serve it to another
        # caller (2026-07-28 caching), whether or not this caller lost an item
        changed = changed if changed is not None else dict(result)
        changed["cacheScope"] = "private"
    return message if changed is None else {**message, "result": changed}


def _encode(message: Any) -> bytes:
    # ensure_ascii: text the upstream sent as escapes (a lone surrogate) stays encodable
    return json.dumps(message, separators=(",", ":"), ensure_ascii=True).encode()


def _error_message(request_id: Any, exc: Refusal) -> dict[str, Any]:
    rid = None if request_id is _NO_REQUEST else request_id
    return json.loads(jsonrpc.error_body(jsonrpc.code_for_status(exc.status, exc.reason), exc.message, reason=exc.reason, request_id=rid))


def _loads(raw: bytes) -> Any:
    """JSON (orjson); text with escaped lone surrogates, which orjson refuses, through the
    standard library (such names are then hidden, never a crash). ValueError if not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def _is_json(media_type: str) -> bool:
    kind = media_type.split(";")[0].strip().lower()
    return kind == "application/json" or kind.endswith("+json")


async def guard_answer(answer: UpstreamAnswer, request_id: Any, visible_names: VisibleNames) -> UpstreamAnswer:
    """The upstream's answer as the client may see it. `request_id` is the request's id, or
    None when the answer carries no response of its own (GET streams, notifications).
    Raises Refusal for a JSON answer that cannot be shown."""
    rid = _NO_REQUEST if request_id is None else request_id
    if answer.stream is not None:
        guarded = Closing(_guard_sse(answer.stream, rid, visible_names), answer.stream)
        return UpstreamAnswer(answer.status, answer.headers, answer.media_type, None, guarded)
    body = answer.body or b""
    if not _is_json(answer.media_type):
        if body and 200 <= answer.status < 300:
            raise UpstreamError(502, "upstream_bad_response", "the upstream answered with a body that is not JSON")
        return answer
    if not body:
        return answer
    try:
        message = _loads(body)
    except ValueError:
        raise UpstreamError(502, "upstream_bad_response", "the upstream's answer is not valid JSON") from None
    try:
        guarded = await guard_message(message, rid, visible_names)
    except Dropped as exc:
        log.warning("upstream answer refused: %s", exc)
        raise UpstreamError(502, "upstream_bad_response", "the upstream's answer cannot be relayed") from None
    if guarded is message:
        return answer
    return UpstreamAnswer(answer.status, answer.headers, answer.media_type, _encode(guarded), None)


class Closing:
    """Iterates `items`; closing it (or reaching the end, or an error) closes `items`, then
    `inner` (the upstream's answer), then calls `on_close`, once, even if iteration never
    began (an async generator closed before its first item would skip its `finally`)."""

    def __init__(self, items: AsyncIterator[bytes], inner: Any = None, on_close: Callable[[], None] | None = None) -> None:
        self._items = items
        self._inner = inner
        self._on_close = on_close
        self._closed = False

    def __aiter__(self) -> Closing:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._items.__anext__()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            for closable in (self._items, self._inner):
                close = getattr(closable, "aclose", None)
                if close is not None:
                    await close()
        finally:
            if self._on_close is not None:
                self._on_close()


def on_close(answer: UpstreamAnswer, callback: Callable[[], None]) -> UpstreamAnswer:
    """`answer` with `callback` run once it is done: now for a whole body, when a stream ends."""
    if answer.stream is None:
        callback()
        return answer
    return UpstreamAnswer(answer.status, answer.headers, answer.media_type, None, Closing(answer.stream, None, callback))


async def _guard_sse(stream: AsyncIterator[bytes], request_id: Any, visible_names: VisibleNames) -> AsyncIterator[bytes]:
    """Relay SSE events as they complete, each guarded; an event cut off at the end is dropped."""
    buffer = b""
    try:
        async for chunk in stream:
            buffer += chunk
            # line endings: CRLF, LF or CR (a CR at the end may be half of a CRLF: wait for more)
            held = b"\r" if buffer.endswith(b"\r") else b""
            text = (buffer[:-1] if held else buffer).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            buffer = b""
            while (end := text.find(b"\n\n")) >= 0:
                event, text = text[: end + 2], text[end + 2 :]
                if (out := await _guard_event(event, request_id, visible_names)):
                    yield out
            buffer = text + held
        text = buffer.replace(b"\r", b"\n")  # a CR held back at the very end ends its line
        while (end := text.find(b"\n\n")) >= 0:
            event, text = text[: end + 2], text[end + 2 :]
            if (out := await _guard_event(event, request_id, visible_names)):
                yield out
        if text.strip():
            log.warning("an SSE event was cut off at the end of the upstream's stream; dropped")
    finally:
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()


async def _guard_event(event: bytes, request_id: Any, visible_names: VisibleNames) -> bytes:
    lines = event.rstrip(b"\n").split(b"\n")
    data_lines = [line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:")]
    data = b"\n".join(data_lines)
    if not data.strip():
        # comments, keep-alives, an id or retry alone, or a priming event (an id with empty
        # data, SEP-1699): no message, and the id is what a client resumes from
        return event
    try:
        message = _loads(data)
    except ValueError:
        log.warning("an SSE event from the upstream is not JSON; dropped")
        return b""
    try:
        guarded = await guard_message(message, request_id, visible_names)
    except Dropped as exc:
        log.warning("an SSE event from the upstream was dropped: %s", exc)
        return b""
    except Refusal as exc:
        guarded = _error_message(request_id, exc)
    if guarded is message:
        return event
    others = [line for line in lines if not line.startswith(b"data:")]
    return b"\n".join([*others, b"data: " + _encode(guarded)]) + b"\n\n"
