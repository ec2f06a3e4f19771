"""The Litestar app: routes, lifespan (build, start, reload, close) and error handlers.

Only wiring lives here: `/mcp` is the request path (`gateway.pipeline`), the Gateway is
built by `gateway.assembly`, and the other routes are health, readiness, metrics, the
protected-resource metadata and, in proxy mode, the authorization server (`gateway.oauth.routes`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request, Response, asgi, get

from gateway.assembly import Gateway, vetted_snapshot
from gateway.auth.metadata import WELL_KNOWN, metadata_document, metadata_path
from gateway.config.settings import Settings
from gateway.oauth.routes import oauth_routes
from gateway.ops.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.ops.reload import Reloader
from gateway.mcp import jsonrpc
from gateway.pipeline import mcp_endpoint
from gateway.vault.routes import vault_routes

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> Litestar:
    """The ASGI app for one config. Raises ConfigError/PolicyError before serving anything."""
    bundle, _ = vetted_snapshot(settings)
    gateway = Gateway.build(settings, bundle=bundle)
    cfg = settings.config

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await app.state.gateway.start()
        app.state.gateway.serve_metrics()
        reloader = Reloader(app.state, settings, Gateway.build, vetted_snapshot)
        watcher = asyncio.create_task(reloader.watch()) if cfg.reload.watch else None
        reloader.listen_for_sighup()
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            await reloader.aclose()
            await app.state.gateway.aclose()

    @get("/healthz", sync_to_thread=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @get("/readyz")
    async def readyz(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        gateway: Gateway = request.app.state.gateway
        if gateway.jwks is not None and not gateway.jwks.loaded:
            await gateway.jwks.refresh()
        checks = {
            "jwks": gateway.keys_ready,
            "policy": await gateway.engine.ready(),
            "sessions": await gateway.sessions.store.ready(),
        }
        if gateway.oauth is not None:
            checks["oauth_store"] = await gateway.oauth.state.store.ready()
        if gateway.vault is not None:
            checks["vault"] = await gateway.vault.store.ready()
        if gateway.settings.config.rate_limits.store == "redis":
            checks["rate_limits"] = await gateway.quotas.store.ready()
        ready = all(checks.values())
        policy = {"revision": gateway.serving_revision, "shadow_revision": gateway.shadow_revision}
        if gateway.serving_revision != gateway.revision:  # a remote OPA: what it serves, and the files tested here
            policy["tested_revision"] = gateway.revision
        return Response({"ready": ready, "checks": checks, "engine": gateway.engine_report, "policy": policy},
                        status_code=200 if ready else 503)

    @get([metadata_path(cfg.mcp_path), WELL_KNOWN], sync_to_thread=False)
    def protected_resource_metadata(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        gateway = request.app.state.gateway  # follows profile and policy reloads
        document = metadata_document(resource=cfg.resource, servers=gateway.authorization_servers, scopes=gateway.scopes_supported)
        return Response(document, headers={"Access-Control-Allow-Origin": "*", "Cache-Control": "max-age=300"})

    @get("/metrics", sync_to_thread=False)
    def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
        return Response(request.app.state.gateway.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    # a raw ASGI route: the request path reads the scope itself (see gateway.pipeline)
    mcp_route = asgi(cfg.mcp_path, is_mount=False, copy_scope=False)(mcp_endpoint(lambda scope: scope["app"].state.gateway))

    handlers = [healthz, readyz, metrics, protected_resource_metadata, mcp_route]
    if cfg.authorization_server.mode == "proxy":
        handlers += oauth_routes(cfg.public_url)
    if cfg.vault.enabled:
        handlers += vault_routes()
    app = Litestar(
        route_handlers=handlers,
        lifespan=[lifespan],
        openapi_config=None,
        logging_config=None,  # the process's logging is the CLI's (no per-request queue thread)
        exception_handlers={Exception: _internal_error},
        debug=False,
    )
    app.state.gateway = gateway
    return app


def _internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Errors outside the MCP endpoint (which answers its own) get a JSON-RPC body too."""
    from litestar.exceptions import HTTPException

    if isinstance(exc, HTTPException):
        status, reason, message, code = exc.status_code, "http_error", str(exc.detail), None
    else:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        status, reason, message, code = 500, "internal_error", "the gateway failed unexpectedly; nothing was forwarded", -32603
    body = jsonrpc.error_body(code or jsonrpc.code_for_status(status, reason), message, reason=reason)
    return Response(body, status_code=status, media_type="application/json")
