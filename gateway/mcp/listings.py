"""Filtered listings: a client sees only the tools, resources and prompts it may use.

The upstream's page (`tools/list`, `resources/list`, `resources/templates/list`,
`prompts/list`) is read, every candidate name goes to the policy in one input
(`input.listing`), and only the items the policy calls `visible` are kept. Everything
else in the result (`nextCursor`, `_meta`) is left as the upstream wrote it, so
pagination works unchanged. JSON answers are rewritten whole; SSE answers are relayed
event by event and only the event carrying the listing's response is rewritten.

Fail closed: an item without a usable name is dropped; if the policy cannot decide, the
client gets a JSON-RPC error instead of the unfiltered page.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

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


LISTINGS = {
    listing.method: listing
    for listing in (
        Listing("tools/list", "tools", "tools", "name"),
        Listing("resources/list", "resources", "resources", "uri"),
        Listing("resources/templates/list", "resources", "resourceTemplates", "uriTemplate"),
        Listing("prompts/list", "prompts", "prompts", "name"),
    )
}

#: names → the subset the caller may see; raises Refusal when the policy cannot decide
VisibleNames = Callable[[Listing, list[str]], Awaitable[frozenset[str]]]


def listing_for(method: str | None, kind: str | None) -> Listing | None:
    return LISTINGS.get(method or "") if kind == "request" else None


def _items(message: Any, listing: Listing, request_id: Any) -> list[Any] | None:
    """The page's items when `message` is the successful response to our request."""
    if not isinstance(message, dict) or message.get("id") != request_id:
        return None
    result = message.get("result")
    items = result.get(listing.items_key) if isinstance(result, dict) else None
    return items if isinstance(items, list) else None


def _name(item: Any, listing: Listing) -> str | None:
    name = item.get(listing.name_key) if isinstance(item, dict) else None
    return name if isinstance(name, str) else None


async def filter_message(message: Any, listing: Listing, request_id: Any, visible_names: VisibleNames) -> Any:
    """The message with invisible items removed (unchanged if it is not our page)."""
    items = _items(message, listing, request_id)
    if items is None:
        return message
    names = [name for item in items if (name := _name(item, listing)) is not None]
    visible = await visible_names(listing, names) if names else frozenset()
    kept = [item for item in items if _name(item, listing) in visible]
    return {**message, "result": {**message["result"], listing.items_key: kept}}


def _error_message(request_id: Any, exc: Refusal) -> dict[str, Any]:
    return json.loads(jsonrpc.error_body(jsonrpc.code_for_status(exc.status), exc.message, reason=exc.reason, request_id=request_id))


async def filter_answer(answer: UpstreamAnswer, listing: Listing, request_id: Any, visible_names: VisibleNames) -> UpstreamAnswer:
    """The upstream's answer to a listing request, filtered. Raises Refusal for a JSON page
    the policy could not judge, or an upstream page that is not JSON."""
    if answer.stream is not None:
        stream = _filter_sse(answer.stream, listing, request_id, visible_names)
        return UpstreamAnswer(answer.status, answer.headers, answer.media_type, None, stream)
    if answer.body is None or not answer.media_type.lower().startswith("application/json"):
        return answer
    try:
        message = json.loads(answer.body)
    except ValueError:
        raise UpstreamError(502, "upstream_bad_response", "the upstream's listing is not valid JSON") from None
    filtered = await filter_message(message, listing, request_id, visible_names)
    if filtered is message:
        return answer
    body = json.dumps(filtered, separators=(",", ":"), ensure_ascii=False).encode()
    return UpstreamAnswer(answer.status, answer.headers, answer.media_type, body, None)


async def _filter_sse(
    stream: AsyncIterator[bytes], listing: Listing, request_id: Any, visible_names: VisibleNames
) -> AsyncIterator[bytes]:
    """Relay SSE events as they complete; rewrite the one that answers the listing."""
    buffer = b""
    try:
        async for chunk in stream:
            buffer += chunk.replace(b"\r\n", b"\n")
            while (end := buffer.find(b"\n\n")) >= 0:
                event, buffer = buffer[: end + 2], buffer[end + 2 :]
                yield await _filter_event(event, listing, request_id, visible_names)
        if buffer:
            yield buffer
    finally:
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()


async def _filter_event(event: bytes, listing: Listing, request_id: Any, visible_names: VisibleNames) -> bytes:
    lines = event.rstrip(b"\n").split(b"\n")
    data = b"\n".join(line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:"))
    if not data:
        return event
    try:
        message = json.loads(data)
    except ValueError:
        log.warning("an SSE event of a listing is not JSON; dropped")
        return b""
    try:
        filtered = await filter_message(message, listing, request_id, visible_names)
    except Refusal as exc:
        filtered = _error_message(request_id, exc)
    if filtered is message:  # not the listing's response (a notification, another id, an error)
        return event
    others = [line for line in lines if not line.startswith(b"data:")]
    payload = json.dumps(filtered, separators=(",", ":"), ensure_ascii=False).encode()
    return b"\n".join([*others, b"data: " + payload]) + b"\n\n"
