"""The floor: a bare proxy on the gateway's own serving stack (uvicorn + httptools + uvloop,
pyreqwest to the upstream) that checks nothing. What it costs per request, the gateway
cannot go below; the benchmark prints it beside the gateway.

    python -m benchmarks.bare_proxy --port N --upstream URL
"""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn
from pyreqwest.client import ClientBuilder

FORWARDED = (b"accept", b"content-type", b"authorization", b"mcp-protocol-version")


def build(upstream: str) -> Any:
    client = None

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal client
        if scope["type"] != "http":
            return
        if client is None:
            client = ClientBuilder().max_connections(100).follow_redirects(False).no_proxy().build()
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {k.decode(): v.decode() for k, v in scope["headers"] if k in FORWARDED}
        response = await client.post(upstream).headers(headers).body_bytes(body).build().send()
        data = bytes(await response.bytes())
        await send({"type": "http.response.start", "status": response.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    uvicorn.run(build(args.upstream), host="127.0.0.1", port=args.port, log_level="warning", access_log=False, http="httptools")


if __name__ == "__main__":
    main()
