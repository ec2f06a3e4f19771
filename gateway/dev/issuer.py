"""A local development issuer: signing keys, JWKS, discovery, authorization and token endpoints.

It is what `mcp-authz-gateway dev` runs so the gateway can be tried without an IdP, and
what the tests use as "a JWKS served over HTTP". The tokens are real RS256 JWTs, verified
by the gateway exactly like a production IdP's. Its one client (the gateway) may use the
client_credentials grant, or the authorization code flow (PKCE S256) in which the demo user
(or `login_hint`) is signed in at once, with no page: the scopes asked for, limited to
`grantable` (never an admin scope), with single-use refresh tokens. Never expose it.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
import uuid
from typing import Any
from urllib.parse import urlencode

from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey
from litestar import Litestar, Request, Response, get, post
from litestar.response import Redirect

#: what the demo user may be granted: never notes.admin, so a demo token cannot purge the notes
GRANTABLE = ("notes.read", "notes.write")


class DevIssuer:
    def __init__(self, issuer: str, *, client_id: str = "dev-client", client_secret: str | None = None,
                 redirect_uris: tuple[str, ...] = (), user: str = "alice", grantable: tuple[str, ...] = GRANTABLE) -> None:
        self.issuer = issuer.rstrip("/")
        self.client_id = client_id
        self.client_secret = client_secret or secrets.token_urlsafe(16)
        self.redirect_uris = redirect_uris
        self.user = user
        self.grantable = grantable
        self.keys: list[RSAKey] = []
        self._codes: dict[str, dict[str, Any]] = {}
        self._refresh: dict[str, dict[str, Any]] = {}
        self.rotate()

    def rotate(self) -> RSAKey:
        """Add a new signing key (it signs from now on); old keys stay published."""
        key = RSAKey.generate_key(2048, parameters={"kid": f"dev-{uuid.uuid4().hex[:8]}", "use": "sig", "alg": "RS256"})
        self.keys.append(key)
        return key

    @property
    def signing_key(self) -> RSAKey:
        return self.keys[-1]

    def jwks(self) -> dict[str, Any]:
        return KeySet(self.keys).as_dict(private=False)

    def mint(
        self,
        *,
        sub: str | None = "alice",
        scope: str | None = "notes.read notes.write",
        aud: str | list[str] | None = None,
        lifetime: int = 3600,
        header: dict[str, Any] | None = None,
        key: RSAKey | None = None,
        **claims: Any,
    ) -> str:
        """A signed access token; `None` values are left out of the claims."""
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": self.issuer,
            "sub": sub,
            "aud": aud,
            "scope": scope,
            "azp": self.client_id,
            "iat": now,
            "exp": now + lifetime,
            "jti": uuid.uuid4().hex,
            **claims,
        }
        body = {k: v for k, v in body.items() if v is not None}
        signer = key or self.signing_key
        hdr = {"alg": "RS256", "typ": "JWT", "kid": signer.kid, **(header or {})}
        return jwt.encode(hdr, body, signer)

    def authorize(self, params: dict[str, str]) -> str:
        """Sign the demo user in at once; the redirect back to the client (with a code or an error)."""
        redirect_uri = params.get("redirect_uri", "")
        if params.get("client_id") != self.client_id or redirect_uri not in self.redirect_uris:
            raise ValueError("unknown client or redirect_uri")
        back = {"state": params.get("state"), "iss": self.issuer}
        if params.get("response_type") != "code" or params.get("code_challenge_method") != "S256" or not params.get("code_challenge"):
            back |= {"error": "invalid_request", "error_description": "code flow with PKCE S256 only"}
        else:
            code = secrets.token_urlsafe(24)
            scopes = [s for s in params.get("scope", "").split() if s in self.grantable]
            self._codes[code] = {"challenge": params["code_challenge"], "redirect_uri": redirect_uri, "scope": " ".join(scopes),
                                 "sub": params.get("login_hint") or self.user, "expires": time.monotonic() + 60}
            back["code"] = code
        return redirect_uri + "?" + urlencode({k: v for k, v in back.items() if v is not None})

    def _code_grant(self, form: Any, audience: str | None) -> dict[str, Any] | None:
        entry = self._codes.pop(str(form.get("code")), None)
        verifier = str(form.get("code_verifier") or "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if (entry is None or entry["expires"] < time.monotonic() or form.get("redirect_uri") != entry["redirect_uri"]
                or not secrets.compare_digest(challenge, entry["challenge"])):
            return None
        return self._tokens(entry["sub"], entry["scope"], audience)

    def _refresh_grant(self, form: Any, audience: str | None) -> dict[str, Any] | None:
        entry = self._refresh.pop(str(form.get("refresh_token")), None)  # single-use, like Nextcloud's
        return None if entry is None else self._tokens(entry["sub"], entry["scope"], audience)

    def _tokens(self, sub: str, scope: str, audience: str | None) -> dict[str, Any]:
        refresh = secrets.token_urlsafe(32)
        self._refresh[refresh] = {"sub": sub, "scope": scope}
        return {"access_token": self.mint(sub=sub, scope=scope, aud=audience), "token_type": "Bearer", "expires_in": 3600,
                "scope": scope, "refresh_token": refresh}

    def app(self, *, default_audience: str | None = None) -> Litestar:
        issuer = self

        @get("/.well-known/openid-configuration", sync_to_thread=False)
        def discovery() -> dict[str, Any]:
            return {
                "issuer": issuer.issuer,
                "jwks_uri": f"{issuer.issuer}/jwks",
                "authorization_endpoint": f"{issuer.issuer}/authorize",
                "token_endpoint": f"{issuer.issuer}/token",
                "response_types_supported": ["code"],
                "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
                "scopes_supported": list(issuer.grantable),
                "id_token_signing_alg_values_supported": ["RS256"],
            }

        @get("/authorize", sync_to_thread=False)
        def authorize(request: Request[Any, Any, Any]) -> Response[Any]:
            try:
                return Redirect(issuer.authorize(dict(request.query_params)), status_code=302)
            except ValueError as exc:
                return Response({"error": "invalid_request", "error_description": str(exc)}, status_code=400)

        @get("/jwks", sync_to_thread=False)
        def jwks() -> dict[str, Any]:
            return issuer.jwks()

        @post("/token", status_code=200)
        async def token(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
            form = await request.form()
            client_id, client_secret = form.get("client_id"), form.get("client_secret")
            auth = request.headers.get("authorization", "")
            if auth.lower().startswith("basic "):
                try:
                    client_id, _, client_secret = base64.b64decode(auth[6:]).decode().partition(":")
                except ValueError:
                    client_id = None
            if client_id != issuer.client_id or not secrets.compare_digest(str(client_secret), issuer.client_secret):
                return Response({"error": "invalid_client"}, status_code=401)
            grant = form.get("grant_type")
            if grant in ("authorization_code", "refresh_token"):
                answer = (issuer._code_grant if grant == "authorization_code" else issuer._refresh_grant)(form, default_audience)
                if answer is None:
                    return Response({"error": "invalid_grant"}, status_code=400)
                return Response(answer)
            if grant != "client_credentials":
                return Response({"error": "unsupported_grant_type"}, status_code=400)
            scope = form.get("scope") or "notes.read notes.write"
            audience = form.get("resource") or form.get("audience") or default_audience
            access = issuer.mint(sub=form.get("subject") or client_id, scope=scope, aud=audience)
            return Response({"access_token": access, "token_type": "Bearer", "expires_in": 3600, "scope": scope})

        return Litestar(route_handlers=[discovery, authorize, jwks, token], openapi_config=None)
