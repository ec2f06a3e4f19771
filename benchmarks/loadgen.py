"""A keep-alive HTTP/1.1 load generator on raw asyncio sockets (TCP_NODELAY set).

Each of `concurrency` connections sends one request, reads the whole answer
(Content-Length or chunked), and sends the next: a closed loop, so latency and
throughput are measured together. Client libraries differ a lot at concurrency 16
(their own CPU, measured, can exceed the gateway's); a raw client keeps the load generator
out of the measurement.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Run:
    latencies: list[float] = field(default_factory=list)  # seconds, measured requests only
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    elapsed: float = 0.0
    #: every answered request, warm-up included (for CPU per request)
    completed: int = 0

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0


def build_request(url: str, body: bytes, headers: dict[str, str]) -> bytes:
    parts = urlsplit(url)
    lines = [f"POST {parts.path or '/'} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    headers = {}
    for line in header_lines:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def _connection(url: str, request: bytes | Callable[[], bytes], stop_at: float, measure_from: float, run: Run) -> None:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            started = time.perf_counter()
            if started >= stop_at:
                return
            writer.write(request() if callable(request) else request)
            try:
                status = await _read_response(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                run.errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
                writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                continue
            done = time.perf_counter()
            run.completed += 1
            if started >= measure_from:
                run.latencies.append(done - started)
                run.statuses[status] = run.statuses.get(status, 0) + 1
                if status != 200:
                    run.errors += 1
    finally:
        writer.close()


async def load(url: str, body: bytes | Callable[[], bytes], headers: dict[str, str], *, concurrency: int, seconds: float,
               warmup: float = 1.0) -> Run:
    """Closed-loop load for `warmup + seconds`; only the last `seconds` are measured. `body`
    may be a function giving each request its own body (a workload no cache can serve)."""
    run = Run()
    request: bytes | Callable[[], bytes] = (lambda: build_request(url, body(), headers)) if callable(body) else build_request(url, body, headers)
    now = time.perf_counter()
    measure_from, stop_at = now + warmup, now + warmup + seconds
    await asyncio.gather(*(_connection(url, request, stop_at, measure_from, run) for _ in range(concurrency)))
    run.elapsed = seconds
    return run
