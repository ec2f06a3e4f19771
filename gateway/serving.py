"""Serving HTTP with limits an unauthenticated client cannot get around (hardening item 5).

uvicorn's httptools protocol bounds neither the size nor the number of request headers, nor
the time a client may take to send them or a body: four connections sending 50 MB of
unfinished headers cost 200 MB, and one byte a second kept a connection for minutes. This
protocol adds, per connection: a byte limit on the request head (431) and a count limit on
its headers (400), a deadline
for the head and one for the body (408, then closed), and a cap on connections per client
address (refused at once). Everything else is uvicorn's.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    max_header_bytes: int = 32_768
    max_headers: int = 100
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections_per_address: int = 128


class _TooManyHeaders(Exception):
    pass


def guarded_protocol(limits: ServerLimits) -> type[HttpToolsProtocol]:
    """An httptools protocol class for uvicorn's `http=` that enforces `limits`."""
    per_address: Counter[str] = Counter()

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._address = self.client[0] if self.client else "unknown"
            self._counted = False
            self._deadline: asyncio.TimerHandle | None = None
            if per_address[self._address] >= limits.max_connections_per_address:
                log.warning("too many connections from %s; refused", self._address)
                transport.close()
                return
            per_address[self._address] += 1
            self._counted = True
            self._head_bytes = 0
            self._header_count = 0
            self._in_head = True
            self._arm(limits.header_timeout, "request head")

        def _arm(self, seconds: float, what: str) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expired, what)

        def _disarm(self) -> None:
            if getattr(self, "_deadline", None) is not None:
                self._deadline.cancel()  # type: ignore[union-attr]
                self._deadline = None

        def _expired(self, what: str) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            log.warning("%s from %s not received in time; connection closed", what, self._address)
            if self.cycle is None or not self.cycle.response_started:
                self._refuse(408, b"Request Timeout")
            else:
                self.transport.close()

        def _refuse(self, status: int, text: bytes) -> None:
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-length: 0\r\nconnection: close\r\n\r\n" % (status, text))
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():
                return
            if self._in_head:
                self._head_bytes += len(data)
            # fed first: one read may hold the end of the head and the start of the body, and
            # only a head still unfinished after it counts (one read is at most a few 100 KiB)
            super().data_received(data)  # too many headers: the parser's callback error, a 400
            if self._in_head and self._head_bytes > limits.max_header_bytes and not self.transport.is_closing():
                log.warning("request head from %s larger than %d bytes; refused", self._address, limits.max_header_bytes)
                self._refuse(431, b"Request Header Fields Too Large")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if not self._in_head:  # a new request on a kept-alive connection
                self._in_head = True
                self._head_bytes = 0
                self._arm(limits.header_timeout, "request head")
            self._header_count = 0

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_count += 1
            if self._header_count > limits.max_headers:
                raise _TooManyHeaders()
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._arm(limits.body_timeout, "request body")
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if getattr(self, "_counted", False):
                per_address[self._address] -= 1
                if per_address[self._address] <= 0:
                    del per_address[self._address]
                self._counted = False
            super().connection_lost(exc)

    return GuardedHttpToolsProtocol


def uvicorn_options(limits: ServerLimits) -> dict[str, Any]:
    return {"http": guarded_protocol(limits)}
