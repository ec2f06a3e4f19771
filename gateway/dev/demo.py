"""`mcp-authz-gateway dev`: the demo upstream, a dev issuer and the gateway in one process.

Three uvicorn servers share one event loop on loopback. The gateway runs in proxy mode, so
MCP clients (mcp-remote, the Inspector, the SDKs) sign in through it with no set-up: the dev
issuer signs the demo user in at once. The notes server's per-tool rules are loaded, and the
demo user can never be granted notes.admin, so no demo token can purge the notes. Nothing is
written to disk; the printed tokens are valid for an hour.
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
from gateway.oauth.server import CALLBACK_PATH
from gateway.serving import ServerLimits, uvicorn_options


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _server(app: object, host: str, port: int, **options: object) -> uvicorn.Server:
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", server_header=False, lifespan="on", **options)
    return uvicorn.Server(config)


def run_dev(*, host: str = "127.0.0.1", port: int = 8080, user: str = "alice") -> int:
    issuer_port, upstream_port = free_port(host), free_port(host)
    issuer_url = f"http://{host}:{issuer_port}"
    public_url = f"http://{host}:{port}"
    issuer = DevIssuer(issuer_url, redirect_uris=(public_url + CALLBACK_PATH,), user=user)
    # the dev profile reads these: the issuer, and the gateway's own client there
    os.environ.update(DEV_ISSUER=issuer_url, DEV_CLIENT_ID=issuer.client_id, DEV_CLIENT_SECRET=issuer.client_secret)
    config = GatewayConfig.model_validate(
        {
            "public_url": public_url,
            "listen": {"host": host, "port": port},
            "upstream": {"url": f"http://{host}:{upstream_port}/mcp"},
            "profile": "dev",
            "authorization_server": {"mode": "proxy"},
        }
    )
    settings = Settings(config=config, path=Path.cwd() / "dev-gateway.yaml", bundle_dir=bundled_dir("policies"),
                        data_files=(bundled_dir("examples") / "notes-authz.yaml",))
    upstream_app = build_notes_server().streamable_http_app(streamable_http_path="/mcp", stateless_http=True, json_response=True)
    servers = [
        _server(issuer.app(default_audience=config.resource), host, issuer_port),
        _server(upstream_app, host, upstream_port),
        _server(create_app(settings), host, port, **uvicorn_options(ServerLimits())),  # served as `serve` serves
    ]
    reader = issuer.mint(sub="bob", scope="notes.read", aud=config.resource)
    writer = issuer.mint(sub="alice", scope="notes.read notes.write", aud=config.resource)

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
        print(_banner(public_url + config.mcp_path, issuer_url, config.upstream.url, reader, writer, user), flush=True)
        await asyncio.gather(*tasks)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0


def _banner(mcp_url: str, issuer_url: str, upstream_url: str, reader: str, writer: str, user: str) -> str:
    body = '{"jsonrpc":"2.0","id":1,"method":"tools/list"}'
    return f"""
mcp-authz-gateway dev is running (Ctrl-C stops it)
  gateway   {mcp_url}   (proxy mode: the clients' authorization server; pass-through to the upstream)
  upstream  {upstream_url}   (demo notes server, per-tool rules from notes-authz.yaml)
  issuer    {issuer_url}   (dev issuer: signs "{user}" in at once; never grants notes.admin)

Connect an MCP client; it signs in through the gateway by itself:
  npx -y mcp-remote {mcp_url}
  npx @modelcontextprotocol/inspector --cli {mcp_url} --method tools/list

Or use a token (valid 1 hour) by hand:
  export READER={reader}
  export TOKEN={writer}
  (READER: user "bob", notes.read; TOKEN: user "alice", notes.read notes.write)

  curl -s {mcp_url} -H "Authorization: Bearer $TOKEN" \\
    -H 'Content-Type: application/json' -H 'Accept: application/json, text/event-stream' \\
    -d '{body}'

Without a token you get 401 and a WWW-Authenticate header pointing at the metadata:
  curl -si {mcp_url} -H 'Content-Type: application/json' -d '{body}'
""".rstrip() + "\n"
