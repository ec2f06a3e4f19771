"""A local development issuer: signing keys, JWKS, discovery, and a token endpoint.

It is what `mcp-authz-gateway dev` runs so the gateway can be tried without an IdP, and
what the tests use as "a JWKS served over HTTP". The tokens are real RS256 JWTs, verified
by the gateway exactly like a production IdP's. It has no user login: the token endpoint
answers the client_credentials grant for its one configured client. Never expose it.
"""

from __future__ import annotations

import base64
import secrets
import time
import uuid
from typing import Any

from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey
from litestar import Litestar, Request, Response, get, post


class DevIssuer:
    def __init__(self, issuer: str, *, client_id: str = "dev-client", client_secret: str | None = None) -> None:
        self.issuer = issuer.rstrip("/")
        self.client_id = client_id
        self.client_secret = client_secret or secrets.token_urlsafe(16)
        self.keys: list[RSAKey] = []
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

    def app(self, *, default_audience: str | None = None) -> Litestar:
        issuer = self

        @get("/.well-known/openid-configuration", sync_to_thread=False)
        def discovery() -> dict[str, Any]:
            return {
                "issuer": issuer.issuer,
                "jwks_uri": f"{issuer.issuer}/jwks",
                "token_endpoint": f"{issuer.issuer}/token",
                "grant_types_supported": ["client_credentials"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
                "id_token_signing_alg_values_supported": ["RS256"],
            }

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
            if form.get("grant_type") != "client_credentials":
                return Response({"error": "unsupported_grant_type"}, status_code=400)
            scope = form.get("scope") or "notes.read notes.write"
            audience = form.get("resource") or form.get("audience") or default_audience
            access = issuer.mint(sub=form.get("subject") or client_id, scope=scope, aud=audience)
            return Response({"access_token": access, "token_type": "Bearer", "expires_in": 3600, "scope": scope})

        return Litestar(route_handlers=[discovery, jwks, token], openapi_config=None)
