"""HTTP for the vault: bounded bodies in, OAuth error bodies out, `no-store` on everything.
Each route calls the running gateway's broker (`app.state.gateway.vault_broker`, so it
follows reloads). Registered only when `vault.enabled`.
"""

from __future__ import annotations

import json
from typing import Any

from litestar import Request, Response, delete, get, post
from litestar.handlers import HTTPRouteHandler

from gateway.mcp.jsonrpc import Refusal
from gateway.oauth.clients import OAuthError
from gateway.oauth.routes import form_pairs, read_body
from gateway.oauth.server import single_params
from gateway.mcp.jsonstrict import StrictDecoder, has_lone_surrogate
from gateway.vault.broker import GRANTS_PATH, TOKEN_PATH, Broker
from gateway.vault.keeper import VaultError

_MAX_BODY = 8_192
_MAX_FIELDS = 20
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _broker(request: Request[Any, Any, Any]) -> Broker:
    broker = request.app.state.gateway.vault_broker
    if broker is None:
        raise VaultError(503, "temporarily_unavailable", "vault_disabled", "the vault is not enabled")
    return broker


def _error(exc: VaultError) -> Response[bytes]:
    headers = dict(_NO_STORE)
    if exc.retry_after:
        headers["Retry-After"] = str(max(1, int(exc.retry_after + 0.999)))
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="mcp-authz-gateway vault"' if exc.error == "invalid_client" else \
            f'Bearer error="{exc.error}"'
    body = json.dumps({"error": exc.error, "error_description": exc.description}).encode()
    return Response(body, status_code=exc.status, media_type="application/json", headers=headers)


async def _params(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """A form (each parameter once) or a strict JSON object, at most _MAX_BODY bytes: read as
    the authorization server reads its own (gateway.oauth.routes), refusals in vault terms."""
    try:
        raw = await read_body(request, _MAX_BODY)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/x-www-form-urlencoded":
            return single_params(form_pairs(raw))
    except OAuthError as exc:
        raise VaultError(exc.status, exc.error, "vault_bad_request", exc.description) from None
    if kind != "application/json":
        raise VaultError(400, "invalid_request", "vault_bad_request", "the body must be a form or a JSON object")
    try:  # strict: a key given twice, NaN, a lone surrogate are refused
        value = json.loads(raw, cls=StrictDecoder)
        if not isinstance(value, dict) or len(value) > _MAX_FIELDS or has_lone_surrogate(raw, value):
            raise ValueError
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise VaultError(400, "invalid_request", "vault_bad_request", "the request body cannot be read") from None
    return value


def vault_routes() -> list[HTTPRouteHandler]:
    @post(TOKEN_PATH, status_code=200, request_max_body_size=None)
    async def token(request: Request[Any, Any, Any]) -> Response[Any]:
        try:
            broker = _broker(request)
            params = await _params(request)
            address = request.client.host if request.client else "unknown"
            answer = await broker.token(params, request.headers.get("authorization"), address)
        except VaultError as exc:
            return _error(exc)
        except Refusal as exc:  # the store is down
            return _error(VaultError(exc.status, "temporarily_unavailable", exc.reason, exc.message))
        return Response(answer, headers=_NO_STORE)

    @get(GRANTS_PATH)
    async def grants(request: Request[Any, Any, Any]) -> Response[Any]:
        try:
            return Response(await _broker(request).grants(request.headers.get("authorization")), headers=_NO_STORE)
        except VaultError as exc:
            return _error(exc)
        except Refusal as exc:  # the store is down
            return _error(VaultError(exc.status, "temporarily_unavailable", exc.reason, exc.message))

    @delete([GRANTS_PATH, GRANTS_PATH + "/{grant_id:str}"], status_code=200)
    async def revoke(request: Request[Any, Any, Any], grant_id: str | None = None) -> Response[Any]:
        try:
            return Response(await _broker(request).revoke(request.headers.get("authorization"), grant_id), headers=_NO_STORE)
        except VaultError as exc:
            return _error(exc)
        except Refusal as exc:  # the store is down
            return _error(VaultError(exc.status, "temporarily_unavailable", exc.reason, exc.message))

    return [token, grants, revoke]
