"""The gateway's own code per request: its ASGI endpoint driven in-process, no sockets, the
upstream's answer canned. Prints CPU-µs per request with a cached decision and with a new
argument value on every call (the decision cache cannot serve it).

    python -m benchmarks.own_code [--requests N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
import yaml

from benchmarks.run import ROOT, free_port
from gateway.app import create_app
from gateway.config.settings import load_config
from gateway.dev.issuer import DevIssuer
from gateway.mcp.upstream import UpstreamAnswer

ANSWER = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "ok"}], "isError": False}}).encode()


def call(arguments: dict[str, Any]) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "list_notes", "arguments": arguments}}).encode()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20_000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    port = free_port()
    issuer = DevIssuer(f"http://127.0.0.1:{port}")  # its JWKS is fetched once, at start
    server = uvicorn.Server(uvicorn.Config(issuer.app(), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    time.sleep(0.5)
    d = Path(tempfile.mkdtemp(prefix="mcp-gw-own-"))
    (d / "profile.yaml").write_text(yaml.safe_dump({"name": "bench", "issuer": issuer.issuer, "token_kinds": ["jwt"], "jwt": {"algorithms": ["RS256"]},
                                                    "audience": {"accept": ["{resource}"], "match": "any", "missing": "reject"}, "mode": "passthrough"}))
    (d / "gateway.yaml").write_text(yaml.safe_dump({
        "public_url": "http://127.0.0.1:9", "upstream": {"url": "http://127.0.0.1:1/mcp"}, "profile": "./profile.yaml",
        "policy": {"bundle": str(ROOT / "policies")}, "log_level": "warning", "access_log": False,
        "decision_log": str(d / "decisions.jsonl"), "reload": {"watch": False}}))
    app = create_app(load_config(d / "gateway.yaml"))
    for name in ("", "gateway", "httpx"):  # as `serve` with log_level: warning (the issuer's app set up its own)
        logging.getLogger(name).setLevel(logging.WARNING)
    token = issuer.mint(aud="http://127.0.0.1:9/mcp")
    try:
        cached, uncached = asyncio.run(drive(app, token, args.requests))
    finally:
        server.should_exit = True
    print(f"{cached:.0f} CPU-µs/request with a cached decision, {uncached:.0f} with a new argument every call")


async def drive(app: Any, token: str, n: int) -> tuple[float, float]:
    gw = app.state.gateway
    await gw.start()

    async def canned(*, method: str, headers: dict[str, str], body: bytes) -> UpstreamAnswer:
        return UpstreamAnswer(200, [("content-type", "application/json")], "application/json", ANSWER, None)

    gw.upstream.send = canned
    statuses: list[int] = []

    async def one(body: bytes) -> None:
        headers = [(b"host", b"127.0.0.1:9"), (b"accept", b"application/json, text/event-stream"), (b"content-type", b"application/json"),
                   (b"mcp-protocol-version", b"2025-11-25"), (b"authorization", f"Bearer {token}".encode()),
                   (b"content-length", str(len(body)).encode())]
        scope = {"type": "http", "method": "POST", "path": "/mcp", "raw_path": b"/mcp", "query_string": b"", "root_path": "",
                 "headers": headers, "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 9), "scheme": "http",
                 "http_version": "1.1", "app": app}
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client never leaves
            raise AssertionError

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(scope, receive, send)

    same = call({})
    for _ in range(500):
        await one(same)
    started = time.process_time()
    for _ in range(n):
        await one(same)
    cached = (time.process_time() - started) / n * 1e6
    bodies = [call({"n": i}) for i in range(n)]
    started = time.process_time()
    for body in bodies:
        await one(body)
    uncached = (time.process_time() - started) / n * 1e6
    if set(statuses) != {200}:
        raise SystemExit(f"unexpected statuses: {sorted(set(statuses))}")
    await gw.aclose()
    return cached, uncached


if __name__ == "__main__":
    main()
