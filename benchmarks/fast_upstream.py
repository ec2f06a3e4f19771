"""A minimal MCP responder: answers every POST at once, so the gateway's own cost shows.

Speaks just enough of the 2026-07-28 stateless transport for the benchmark (JSON answers
to `tools/call`, `tools/list`, `initialize`, `server/discover`). A bare ASGI app under
uvicorn with httptools and uvloop: no framework, no SDK.

    python -m benchmarks.fast_upstream --port N
"""

from __future__ import annotations

import argparse
import json

import uvicorn

TOOLS = {"tools": [{"name": n, "inputSchema": {"type": "object"}} for n in ("list_notes", "read_note", "create_note", "delete_note")]}
RESULT = {"content": [{"type": "text", "text": "ok"}], "isError": False}


async def app(scope, receive, send):  # noqa: ANN001 - plain ASGI
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    try:
        request = json.loads(body) if body else {}
    except ValueError:
        request = {}
    if "id" not in request:
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    method = request.get("method")
    result = TOOLS if method == "tools/list" else RESULT
    if method in ("initialize", "server/discover"):
        result = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}}, "serverInfo": {"name": "fast", "version": "1"}}
    payload = json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": result}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, loop="uvloop", http="httptools")


if __name__ == "__main__":
    main()
