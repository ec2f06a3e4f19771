"""Forwarding to the upstream MCP server, and relaying its answer as it arrives.

One pooled httpx client for the gateway's lifetime. Request headers pass through an
allow-list (MCP's own headers, content negotiation), so cookies, `Host`, `Origin` and
hop-by-hop headers never reach the upstream; `Authorization` is set by the caller to
the token the policy allowed. SSE answers are relayed chunk by chunk without
buffering; when the client goes away the upstream response is closed.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from gateway.config import Upstream as UpstreamConfig
from gateway.jsonrpc import Refusal

log = logging.getLogger("gateway.upstream")

FORWARDED_REQUEST_HEADERS = frozenset(
    {
        "accept",
        "content-type",
        "mcp-session-id",
        "mcp-protocol-version",
        "mcp-method",
        "mcp-name",
        "last-event-id",
        "user-agent",
    }
)
#: 2026-07-28 mirrors selected tool arguments into `Mcp-Param-*` headers
FORWARDED_REQUEST_PREFIXES = ("mcp-param-",)

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"}
)
#: not relayed to the client: hop-by-hop, framing we redo, headers our server sets itself,
#: and the upstream's own auth challenge (clients must only see the gateway's metadata)
DROPPED_RESPONSE_HEADERS = HOP_BY_HOP | {"content-length", "content-encoding", "date", "server", "www-authenticate"}


class UpstreamError(Refusal):
    """The upstream could not be reached or broke off (502/504)."""


@dataclass(frozen=True, slots=True)
class UpstreamAnswer:
    status: int
    headers: list[tuple[str, str]]
    media_type: str
    #: the whole body (JSON and other finite answers), or None when `stream` is set
    body: bytes | None
    stream: AsyncIterator[bytes] | None

    async def discard(self) -> None:
        """Release the upstream connection of an answer that will not be relayed."""
        close = getattr(self.stream, "aclose", None)
        if close is not None:
            await close()


def forwarded_headers(client_headers: dict[str, str], extra: tuple[str, ...], bearer: str) -> dict[str, str]:
    out = {
        k: v
        for k, v in client_headers.items()
        if k in FORWARDED_REQUEST_HEADERS or k.startswith(FORWARDED_REQUEST_PREFIXES) or k in extra
    }
    out["authorization"] = f"Bearer {bearer}"
    # raw bytes are relayed as they come: ask for them uncompressed
    out["accept-encoding"] = "identity"
    return out


class UpstreamClient:
    def __init__(self, config: UpstreamConfig) -> None:
        self._config = config
        self.url = config.url
        #: SSE answers being relayed; each is closed (and counted down) when it ends, breaks or the client leaves
        self.open_streams = 0
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout, connect=config.connect_timeout),
            limits=httpx.Limits(
                max_connections=config.max_connections,
                max_keepalive_connections=config.max_connections,
                keepalive_expiry=config.keepalive_expiry,
            ),
            follow_redirects=False,
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(self, *, method: str, headers: dict[str, str], body: bytes) -> UpstreamAnswer:
        """Send one request; finite answers are read whole, SSE answers come back as a stream."""
        # a GET is the long-lived server-to-client stream: no read timeout
        timeout = None if method == "GET" else self._config.timeout
        request = self._client.build_request(
            method,
            self.url,
            headers=headers,
            content=body if method == "POST" else None,
            timeout=httpx.Timeout(self._config.timeout, connect=self._config.connect_timeout, read=timeout),
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException:
            raise UpstreamError(504, "upstream_timeout", "the upstream MCP server did not answer in time") from None
        except httpx.HTTPError as exc:
            log.warning("upstream %s unreachable: %s", self.url, type(exc).__name__)
            raise UpstreamError(502, "upstream_unreachable", "the upstream MCP server cannot be reached") from None
        headers_out = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in DROPPED_RESPONSE_HEADERS]
        media_type = response.headers.get("content-type", "application/octet-stream")
        if media_type.split(";")[0].strip().lower() == "text/event-stream":
            self.open_streams += 1
            return UpstreamAnswer(response.status_code, headers_out, media_type, None, SseRelay(self, response))
        try:
            body = await response.aread()
        except httpx.TimeoutException:
            raise UpstreamError(504, "upstream_timeout", "the upstream MCP server did not finish its answer in time") from None
        except httpx.HTTPError:
            raise UpstreamError(502, "upstream_broken", "the upstream MCP server broke off its answer") from None
        finally:
            await response.aclose()
        return UpstreamAnswer(response.status_code, headers_out, media_type, body, None)



class SseRelay:
    """The upstream's SSE bytes as they arrive, as an async iterator that always releases.

    A broken upstream ends the stream cleanly. `aclose()` closes the upstream response
    (freeing its connection) whether or not iteration started: an async generator's
    `finally` would not run if it was closed before its first item.
    """

    def __init__(self, client: UpstreamClient, response: httpx.Response) -> None:
        self._client = client
        self._response = response
        self._chunks = response.aiter_raw()
        self._closed = False

    def __aiter__(self) -> SseRelay:
        return self

    async def __anext__(self) -> bytes:
        if self._closed:
            raise StopAsyncIteration
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            await self.aclose()
            raise
        except httpx.HTTPError as exc:
            log.warning("upstream stream ended early: %s", type(exc).__name__)
            await self.aclose()
            raise StopAsyncIteration from None
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._client.open_streams -= 1
        await self._response.aclose()
