"""`mcp-authz-gateway dev`: the demo upstream, a dev issuer and the gateway in one process.

Three uvicorn servers share one event loop on loopback. Nothing is written to disk;
the printed token is valid for an hour.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import uvicorn

from gateway.app import create_app
from gateway.config.bundled import bundled_dir
from gateway.config.settings import GatewayConfig, Settings
from gateway.dev.issuer import DevIssuer
from gateway.dev.notes_server import build_notes_server


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _server(app: object, host: str, port: int) -> uvicorn.Server:
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", server_header=False, lifespan="on")
    return uvicorn.Server(config)


def run_dev(*, host: str = "127.0.0.1", port: int = 8080) -> int:
    issuer_port, upstream_port = free_port(host), free_port(host)
    issuer_url = f"http://{host}:{issuer_port}"
    os.environ["DEV_ISSUER"] = issuer_url
    public_url = f"http://{host}:{port}"
    config = GatewayConfig.model_validate(
        {
            "public_url": public_url,
            "listen": {"host": host, "port": port},
            "upstream": {"url": f"http://{host}:{upstream_port}/mcp"},
            "profile": "dev",
        }
    )
    settings = Settings(config=config, path=Path.cwd() / "dev-gateway.yaml", bundle_dir=bundled_dir("policies"))
    issuer = DevIssuer(issuer_url)
    upstream_app = build_notes_server().streamable_http_app(streamable_http_path="/mcp", stateless_http=True, json_response=True)
    servers = [
        _server(issuer.app(default_audience=config.resource), host, issuer_port),
        _server(upstream_app, host, upstream_port),
        _server(create_app(settings), host, port),
    ]
    token = issuer.mint(sub="alice", aud=config.resource)

    async def main() -> None:
        tasks: list[asyncio.Task[None]] = []
        # the issuer and upstream first: the gateway loads the issuer's keys as it starts
        for group in (servers[:2], servers[2:]):
            tasks += [asyncio.create_task(s.serve()) for s in group]
            while not all(s.started for s in group):
                if any(t.done() for t in tasks):
                    for s in servers:
                        s.should_exit = True
                    await asyncio.gather(*tasks, return_exceptions=True)
                    raise SystemExit("dev: a server failed to start (is the port in use? try --port)")
                await asyncio.sleep(0.05)
        print(_banner(public_url + config.mcp_path, issuer_url, config.upstream.url, token), flush=True)
        await asyncio.gather(*tasks)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0


def _banner(mcp_url: str, issuer_url: str, upstream_url: str, token: str) -> str:
    body = '{"jsonrpc":"2.0","id":1,"method":"tools/list"}'
    return f"""
mcp-authz-gateway dev is running (Ctrl-C stops it)
  gateway   {mcp_url}   (policy: shipped policies/, profile: dev, pass-through)
  upstream  {upstream_url}   (demo notes server)
  issuer    {issuer_url}   (dev issuer: /jwks, /token)

A bearer token for user "alice" (valid 1 hour):
  export TOKEN={token}

Try it:
  curl -s {mcp_url} -H "Authorization: Bearer $TOKEN" \\
    -H 'Content-Type: application/json' -H 'Accept: application/json, text/event-stream' \\
    -d '{body}'

Without the token you get 401 and a WWW-Authenticate header pointing at the metadata:
  curl -si {mcp_url} -H 'Content-Type: application/json' -d '{body}'
""".rstrip() + "\n"
