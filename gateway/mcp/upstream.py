"""Forwarding to the upstream MCP server, and relaying its answer as it arrives.

One pooled aiohttp session for the gateway's lifetime. Request headers pass through an
allow-list (MCP's own headers, content negotiation), so cookies, `Host`, `Origin` and
hop-by-hop headers never reach the upstream; `Authorization` is set by the caller to
the token the policy allowed. SSE answers are relayed chunk by chunk without
buffering; when the client goes away the upstream response is closed.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from gateway.config.settings import Upstream as UpstreamConfig
from gateway.mcp.jsonrpc import Refusal

log = logging.getLogger(__name__)

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

#: never forwarded either way (RFC 9110 §7.6.1); the request allow-list leaves them out anyway
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"}
)
#: the upstream's response headers a client gets (an allow-list, as for requests): cookies,
#: CORS, auth challenges, framing and anything unknown stay behind (`upstream.relay_headers`
#: adds to it)
RELAYED_RESPONSE_HEADERS = frozenset(
    {"content-type", "mcp-session-id", "mcp-protocol-version", "cache-control", "retry-after", "vary", "etag", "last-modified"}
)


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
    """One pooled aiohttp session for the gateway's lifetime (opened on first use, inside
    the event loop). aiohttp rather than httpx: measured in benchmarks/, httpx's per-request
    cost (anyio stream bookkeeping, a readability poll per pooled connection) was most of
    the gateway's CPU time."""

    def __init__(self, config: UpstreamConfig) -> None:
        self._config = config
        self.url = config.url
        #: SSE answers being relayed; each is closed (and counted down) when it ends, breaks or the client leaves
        self.open_streams = 0
        self._session: aiohttp.ClientSession | None = None
        self._relayed = RELAYED_RESPONSE_HEADERS | frozenset(config.relay_headers)

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._config.max_connections,
                keepalive_timeout=self._config.keepalive_expiry,
                use_dns_cache=True,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,  # bytes are relayed as they come (we ask for identity)
                skip_auto_headers=("User-Agent", "Content-Type"),
                trust_env=False,
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, *, method: str, headers: dict[str, str], body: bytes) -> UpstreamAnswer:
        """Send one request; finite answers are read whole, SSE answers come back as a stream."""
        # a GET is the long-lived server-to-client stream: no read timeout
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self._config.connect_timeout,
            sock_read=None if method == "GET" else self._config.timeout,
        )
        try:
            response = await self._open().request(
                method, self.url, headers=headers, data=body if method == "POST" else None, timeout=timeout, allow_redirects=False
            )
        except TimeoutError:
            raise UpstreamError(504, "upstream_timeout", "the upstream MCP server did not answer in time") from None
        except aiohttp.ClientError as exc:
            log.warning("upstream %s unreachable: %s", self.url, type(exc).__name__)
            raise UpstreamError(502, "upstream_unreachable", "the upstream MCP server cannot be reached") from None
        relayed = self._relayed
        headers_out = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers if k.decode("latin-1").lower() in relayed]
        media_type = response.headers.get("Content-Type", "application/octet-stream")
        if media_type.split(";")[0].strip().lower() == "text/event-stream":
            self.open_streams += 1
            return UpstreamAnswer(response.status, headers_out, media_type, None, SseRelay(self, response))
        try:
            body = await response.read()
        except TimeoutError:
            response.close()
            raise UpstreamError(504, "upstream_timeout", "the upstream MCP server did not finish its answer in time") from None
        except aiohttp.ClientError:
            response.close()
            raise UpstreamError(502, "upstream_broken", "the upstream MCP server broke off its answer") from None
        response.release()
        return UpstreamAnswer(response.status, headers_out, media_type, body, None)


class SseRelay:
    """The upstream's SSE bytes as they arrive, as an async iterator that always releases.

    A broken or silent upstream ends the stream cleanly. `aclose()` frees the upstream
    connection whether or not iteration started (an async generator's `finally` would not
    run if it were closed before its first item); an unfinished stream's connection is
    closed, not reused.
    """

    def __init__(self, client: UpstreamClient, response: aiohttp.ClientResponse) -> None:
        self._client = client
        self._response = response
        self._closed = False

    def __aiter__(self) -> SseRelay:
        return self

    async def __anext__(self) -> bytes:
        if self._closed:
            raise StopAsyncIteration
        try:
            chunk = await self._response.content.readany()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("upstream stream ended early: %s", type(exc).__name__)
            await self.aclose()
            raise StopAsyncIteration from None
        except BaseException:
            await self.aclose()
            raise
        if not chunk:
            await self.aclose()
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._client.open_streams -= 1
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()
