"""HTTP for the authorization server: each route reads its request (bounded), calls
`AuthorizationServer` on the running gateway (`app.state.gateway.oauth`, so it follows
reloads), and writes an OAuth answer. Registered only in proxy mode.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from litestar import Request, Response, get, post
from litestar.handlers import HTTPRouteHandler
from litestar.response import Redirect as RedirectResponse

from gateway.mcp.jsonrpc import Refusal
from gateway.oauth.clients import OAuthError
from gateway.oauth.server import (
    AUTHORIZE_PATH,
    CALLBACK_PATH,
    REGISTER_PATH,
    REVOKE_PATH,
    TOKEN_PATH,
    AuthorizationServer,
    RateLimited,
    Redirect,
)

log = logging.getLogger(__name__)

_MAX_FORM = 16_384
_MAX_FIELDS = 40
#: answers carrying credentials are never cached (RFC 6749 §5.1)
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
#: browser-based clients (the Inspector's web UI) call these endpoints from another origin
_CORS = {"Access-Control-Allow-Origin": "*"}


def metadata_paths(public_url: str) -> list[str]:
    """RFC 8414 §3.1 (path inserted) and OpenID discovery (inserted and appended) for the issuer."""
    path = urlsplit(public_url).path.rstrip("/")
    paths = [f"/.well-known/oauth-authorization-server{path}", f"/.well-known/openid-configuration{path}"]
    if path:
        paths.append(f"{path}/.well-known/openid-configuration")
    return paths


def _server(request: Request[Any, Any, Any]) -> AuthorizationServer:
    server = request.app.state.gateway.oauth
    if server is None:  # a reload cannot switch modes, but never serve half a flow
        raise OAuthError("temporarily_unavailable", "the authorization server is not enabled", status=503)
    return server


def _address(request: Request[Any, Any, Any]) -> str:
    return request.client.host if request.client else "unknown"


def _query(request: Request[Any, Any, Any]) -> list[tuple[str, str]]:
    return form_pairs(request.scope.get("query_string", b""))


def form_pairs(raw: bytes) -> list[tuple[str, str]]:
    """A form's (name, value) pairs; too large or unreadable is OAuthError invalid_request."""
    if len(raw) > _MAX_FORM:
        raise OAuthError("invalid_request", "the request is too large")
    try:
        return parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=_MAX_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise OAuthError("invalid_request", "the request's parameters cannot be read") from None


async def read_body(request: Request[Any, Any, Any], limit: int) -> bytes:
    """The body, read as it streams in and refused (413) as soon as it passes `limit`."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise OAuthError("invalid_request", f"the request body is larger than {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


async def _form(request: Request[Any, Any, Any]) -> list[tuple[str, str]]:
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request", "the body must be application/x-www-form-urlencoded")
    return form_pairs(await read_body(request, _MAX_FORM))


def _as_oauth(exc: Refusal) -> OAuthError:
    """A refusal from below (the store is down: 503) in OAuth's words."""
    return OAuthError("temporarily_unavailable", exc.message, status=exc.status)


def oauth_error(exc: OAuthError, *, cors: bool = True) -> Response[bytes]:
    headers = {**_NO_STORE, **(_CORS if cors else {})}
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(exc.retry_after)
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="mcp-authz-gateway"'
    body = json.dumps({"error": exc.error, "error_description": exc.description}).encode()
    return Response(body, status_code=exc.status, media_type="application/json", headers=headers)


def _redirect(target: Redirect) -> RedirectResponse:
    return RedirectResponse(target.url, status_code=302, headers=_NO_STORE)


def oauth_routes(public_url: str) -> list[HTTPRouteHandler]:
    @get(metadata_paths(public_url), sync_to_thread=False)
    def as_metadata(request: Request[Any, Any, Any]) -> Response[Any]:
        try:
            return Response(_server(request).metadata(), headers={**_CORS, "Cache-Control": "max-age=300"})
        except OAuthError as exc:
            return oauth_error(exc)
        except Refusal as refusal:
            return oauth_error(_as_oauth(refusal))

    @get(AUTHORIZE_PATH)
    async def authorize(request: Request[Any, Any, Any]) -> Response[Any]:
        try:
            return _redirect(await _server(request).authorize(_query(request), _address(request)))
        except OAuthError as exc:  # shown to the user: the client or its redirect URI is not known
            return oauth_error(exc, cors=False)
        except Refusal as refusal:
            return oauth_error(_as_oauth(refusal), cors=False)

    @get(CALLBACK_PATH)
    async def callback(request: Request[Any, Any, Any]) -> Response[Any]:
        try:
            return _redirect(await _server(request).callback(_query(request)))
        except OAuthError as exc:
            return oauth_error(exc, cors=False)
        except Refusal as refusal:
            return oauth_error(_as_oauth(refusal), cors=False)

    @post(TOKEN_PATH, status_code=200, request_max_body_size=None)
    async def token(request: Request[Any, Any, Any]) -> Response[Any]:
        try:
            answer = await _server(request).token(await _form(request), request.headers.get("authorization"))
        except OAuthError as exc:
            return oauth_error(exc)
        except Refusal as refusal:
            return oauth_error(_as_oauth(refusal))
        return Response(answer, headers={**_NO_STORE, **_CORS})

    @post(REGISTER_PATH, status_code=201, request_max_body_size=None)
    async def register(request: Request[Any, Any, Any]) -> Response[Any]:
        try:
            server = _server(request)
            answer = await server.register(await read_body(request, server.config.registration.max_bytes), _address(request))
        except OAuthError as exc:
            return oauth_error(exc)
        except Refusal as refusal:
            return oauth_error(_as_oauth(refusal))
        return Response(answer, status_code=201, headers={**_NO_STORE, **_CORS})

    @post(REVOKE_PATH, status_code=200, request_max_body_size=None)
    async def revoke(request: Request[Any, Any, Any]) -> Response[Any]:
        try:
            await _server(request).revoke(await _form(request), request.headers.get("authorization"))
        except OAuthError as exc:
            return oauth_error(exc)
        except Refusal as refusal:
            return oauth_error(_as_oauth(refusal))
        return Response(b"", headers={**_NO_STORE, **_CORS})

    return [as_metadata, authorize, callback, token, register, revoke]
