"""The tests' upstream MCP server: the demo notes server plus tools for assertions, and a recorder.

Run as a real process: `python -m tests.support.upstream_server --port N --record DIR`.
Every HTTP request it receives is appended to DIR/requests.jsonl (method, headers, body),
so tests can assert which token arrived and what the upstream never saw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import uvicorn
from mcp.server.mcpserver import Context

from gateway.demo_upstream import build_notes_server


class Recorder:
    """ASGI middleware: one JSON line per HTTP request, written before the app runs."""

    def __init__(self, app: Any, path: Path) -> None:
        self.app = app
        self.path = path

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        entry = {
            "method": scope["method"],
            "path": scope["path"],
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
            "body": body.decode("utf-8", "replace"),
        }
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def build_app(record_dir: Path, *, json_response: bool = False, stateless: bool = False) -> Any:
    server = build_notes_server("test-notes")

    @server.tool(description="Report progress, then wait until the client creates the release file.")
    async def wait_for_release(key: str, ctx: Context) -> str:
        await ctx.report_progress(1, 2, "waiting for the client")
        flag = record_dir / f"release-{key}"
        for _ in range(200):  # at most 10 s
            if flag.exists():
                return "released"
            await asyncio.sleep(0.05)
        return "not released"

    app = server.streamable_http_app(streamable_http_path="/mcp", json_response=json_response, stateless_http=stateless)
    return Recorder(app, record_dir / "requests.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--json-response", action="store_true")
    parser.add_argument("--stateless", action="store_true")
    args = parser.parse_args()
    args.record.mkdir(parents=True, exist_ok=True)
    app = build_app(args.record, json_response=args.json_response, stateless=args.stateless)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", lifespan="on")


if __name__ == "__main__":
    main()
