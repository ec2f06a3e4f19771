"""The SDK's MCPServer (the demo notes server) as a stateless JSON upstream, for the
benchmark's second upstream: what a real Python MCP server costs beside the gateway.

    python -m benchmarks.sdk_upstream --port N
"""

from __future__ import annotations

import argparse

import uvicorn

from gateway.dev.notes_server import build_notes_server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = build_notes_server("bench").streamable_http_app(streamable_http_path="/mcp", json_response=True, stateless_http=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, loop="uvloop", http="httptools")


if __name__ == "__main__":
    main()
