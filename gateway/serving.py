"""Serving HTTP: limits an unauthenticated client cannot get around, and several worker
processes on one port.

Workers: `serve --workers N` (or `workers: N`) starts N whole gateways, each in its own
process with its own listening socket bound with SO_REUSEPORT, so the kernel spreads new
connections over them (measured in benchmarks/: uvicorn's own `--workers`, one shared socket,
left a worker idle in a quarter of the runs). The parent only supervises: it forwards SIGHUP
(reload) to every worker, restarts one that dies (one that exits with an error while starting
stops them all), and stops them all on SIGTERM/SIGINT.

Limits (hardening item 5):

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
import signal
import socket
import subprocess
import sys
import time
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


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket that other processes may bind too (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


#: a worker that exits with an error this soon after it started failed to start (a port in use,
#: a bundle refused): everything stops; one killed by a signal is replaced whenever it happens
STARTUP_GRACE = 5.0


def supervise(worker_argv: list[str], workers: int) -> int:
    """Run `workers` copies of `worker_argv` until SIGTERM/SIGINT; SIGHUP goes to each."""
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    def reload(signum: int, frame: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGHUP)

    def start() -> tuple[subprocess.Popen[bytes], float]:
        return subprocess.Popen(worker_argv), time.monotonic()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    started = [start() for _ in range(workers)]
    procs = [proc for proc, _ in started]
    signal.signal(signal.SIGHUP, reload)
    log.warning("serving with %d worker processes (pids %s)", workers, ", ".join(str(p.pid) for p in procs))
    code = 0
    while not stopping:
        time.sleep(0.2)
        for i, (proc, since) in enumerate(started):
            if proc.poll() is None or stopping:
                continue
            if proc.returncode > 0 and time.monotonic() - since < STARTUP_GRACE:
                log.error("worker %d (pid %d) exited with %s while starting; stopping", i, proc.pid, proc.returncode)
                stopping, code = True, proc.returncode or 1
                break
            log.error("worker %d (pid %d) exited with %s; starting another", i, proc.pid, proc.returncode)
            started[i] = start()
            procs[i] = started[i][0]
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    return code


def worker_command(config_path: str, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "gateway.cli", "serve", "--config", config_path, "--host", host, "--port", str(port), "--worker"]
