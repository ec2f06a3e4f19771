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

import httpx
import uvicorn
from mcp.server.mcpserver import Context
from mcp.server.streamable_http import EventMessage, EventStore

from gateway.dev.notes_server import build_notes_server


class TokenCheck:
    """Verifies the bearer JWT the upstream receives against the test IdP's JWKS."""

    def __init__(self, jwks_url: str, issuer: str) -> None:
        self.jwks_url = jwks_url
        self.issuer = issuer
        self.keys: Any = None

    async def claims(self, authorization: str | None) -> tuple[dict[str, Any] | None, str | None]:
        from joserfc import jwt
        from joserfc.jwk import KeySet

        if not authorization or not authorization.lower().startswith("bearer "):
            return None, "no bearer token"
        if self.keys is None:
            async with httpx.AsyncClient() as http:
                self.keys = KeySet.import_key_set((await http.get(self.jwks_url)).json())
        try:
            token = jwt.decode(authorization[7:], self.keys, algorithms=["RS256"])
        except Exception as exc:  # noqa: BLE001 - any failure is a refusal, reported to the test
            return None, f"{type(exc).__name__}: {exc}"
        if token.claims.get("iss") != self.issuer:
            return None, "wrong issuer"
        return token.claims, None


class Recorder:
    """ASGI middleware: one JSON line per HTTP request, written before the app runs.

    With a TokenCheck it also verifies the bearer token (as a real resource server
    would), records the verified claims, and answers 401 to a token that fails.
    """

    def __init__(self, app: Any, path: Path, check: TokenCheck | None = None) -> None:
        self.app = app
        self.path = path
        self.check = check

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
        headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]]
        entry: dict[str, Any] = {"method": scope["method"], "path": scope["path"], "headers": headers, "body": body.decode("utf-8", "replace")}
        error = None
        if self.check is not None:
            entry["claims"], error = await self.check.claims(dict(headers).get("authorization"))
            entry["verify_error"] = error
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        if error is not None:
            await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": json.dumps({"error": "invalid_token"}).encode()})
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class SharedEventStore(EventStore):
    """`--resumable`: every SSE event kept in memory, in one store for all sessions (as the
    attacked deployment had), replayed after any `Last-Event-ID`. Test-only: no bound."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []  # (event id, stream id, message)

    async def store_event(self, stream_id: str, message: Any) -> str:
        event_id = f"{stream_id}-{len(self.events)}"
        self.events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(self, last_event_id: str, send_callback: Any) -> str | None:
        ids = [e[0] for e in self.events]
        if last_event_id not in ids:
            return None
        start = ids.index(last_event_id)
        stream_id = self.events[start][1]
        for event_id, _, message in self.events[start + 1 :]:
            if message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream_id


def build_app(record_dir: Path, *, json_response: bool = False, stateless: bool = False, check: TokenCheck | None = None,
              resumable: bool = False) -> Any:
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

    app = server.streamable_http_app(streamable_http_path="/mcp", json_response=json_response, stateless_http=stateless,
                                     event_store=SharedEventStore() if resumable else None)
    return Recorder(BrokenStream(app), record_dir / "requests.jsonl", check)


class BrokenStream:
    """`POST /broken-sse`: one SSE event, then the connection is cut mid-stream (a
    crashing upstream); everything else goes to the MCP app."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/broken-sse":
            return await self.app(scope, receive, send)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        event = b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":1,"progress":1}}\n\n'
        await send({"type": "http.response.body", "body": event, "more_body": True})
        await asyncio.sleep(0.2)
        raise RuntimeError("the test upstream breaks off its stream")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--json-response", action="store_true")
    parser.add_argument("--stateless", action="store_true")
    parser.add_argument("--resumable", action="store_true", help="keep SSE events and replay them after Last-Event-ID")
    parser.add_argument("--verify-jwks", help="verify bearer JWTs against this JWKS URL")
    parser.add_argument("--verify-issuer", help="the issuer those JWTs must carry")
    args = parser.parse_args()
    args.record.mkdir(parents=True, exist_ok=True)
    check = TokenCheck(args.verify_jwks, args.verify_issuer) if args.verify_jwks else None
    app = build_app(args.record, json_response=args.json_response, stateless=args.stateless, check=check, resumable=args.resumable)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", lifespan="on")


if __name__ == "__main__":
    main()
