"""The gateway's side of the IdP: sign a user in with the gateway's own client.

In proxy mode the IdP only ever sees the gateway's client id, its redirect URI, its PKCE
pair and its state; so its tokens carry the audience the profile accepts, whatever the
MCP client is. `resource` is sent only where the profile says the IdP honours it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx

from gateway.auth.idp import (
    DiscoveryError,
    IssuerMetadata,
    client_authentication,
    oauth_error,
)
from gateway.config.profiles import ClientAuth, Profile

log = logging.getLogger(__name__)


def s256(verifier: str) -> str:
    """RFC 7636 S256 code challenge of `verifier`."""
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()


class IdpError(Exception):
    """The IdP refused (`error` is its OAuth error) or could not be reached (`unavailable`)."""

    def __init__(self, error: str, description: str, *, unavailable: bool = False) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.unavailable = unavailable


@dataclass(frozen=True)
class IdpTokens:
    access_token: str
    expires_in: int | None
    scope: str | None
    refresh_token: str | None

    @classmethod
    def from_answer(cls, body: Any) -> IdpTokens:
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str) or not body["access_token"]:
            raise IdpError("invalid_response", "the IdP's token answer has no access_token")
        expires = body.get("expires_in")
        scope = body.get("scope")
        refresh = body.get("refresh_token")
        return cls(
            access_token=body["access_token"],
            expires_in=int(expires) if isinstance(expires, (int, float)) and not isinstance(expires, bool) else None,
            scope=scope if isinstance(scope, str) else None,
            refresh_token=refresh if isinstance(refresh, str) and refresh else None,
        )


class IdpSignIn:
    def __init__(self, profile: Profile, client: ClientAuth, issuer: IssuerMetadata, http: httpx.AsyncClient,
                 *, callback_url: str, resource: str, timeout: float) -> None:
        self._client = client
        self._issuer = issuer
        self._http = http
        self.callback_url = callback_url
        self._resource = resource if profile.sign_in.resource_indicators else None
        self._timeout = timeout

    async def authorize_url(self, *, state: str, verifier: str, scopes: list[str], login_hint: str | None) -> str:
        endpoint = await self._endpoint("authorization_endpoint")
        params = {
            "response_type": "code",
            "client_id": self._client.client_id,
            "redirect_uri": self.callback_url,
            "state": state,
            "code_challenge": s256(verifier),
            "code_challenge_method": "S256",
        }
        if scopes:
            params["scope"] = " ".join(scopes)
        if self._resource:
            params["resource"] = self._resource
        if login_hint:
            params["login_hint"] = login_hint
        return endpoint + ("&" if "?" in endpoint else "?") + urlencode(params)

    async def redeem(self, code: str, verifier: str) -> IdpTokens:
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": self.callback_url, "code_verifier": verifier}
        return await self._token(form)

    async def refresh(self, refresh_token: str, *, scope: str | None = None) -> IdpTokens:
        """`scope`: down-scoped to these (RFC 6749 §6: at most what the grant holds)."""
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        if scope:
            form["scope"] = scope
        return await self._token(form)

    async def revoke(self, token: str, hint: str) -> bool:
        """RFC 7009 at the IdP; False when it has no revocation endpoint or did not answer 200."""
        try:
            endpoint = await self._issuer.endpoint("revocation_endpoint")
            headers, auth_form = client_authentication(self._client)
            resp = await self._http.post(endpoint, data={"token": token, "token_type_hint": hint, **auth_form},
                                         headers=headers, timeout=self._timeout)
        except (DiscoveryError, httpx.HTTPError) as exc:
            log.warning("revocation at the IdP failed: %s", type(exc).__name__)
            return False
        if resp.status_code != 200:
            log.warning("revocation at the IdP answered %s", resp.status_code)
        return resp.status_code == 200

    async def _endpoint(self, name: str) -> str:
        try:
            return await self._issuer.endpoint(name)
        except DiscoveryError as exc:
            raise IdpError("temporarily_unavailable", str(exc), unavailable=True) from None

    async def _token(self, form: dict[str, str]) -> IdpTokens:
        endpoint = await self._endpoint("token_endpoint")
        if self._resource:
            form["resource"] = self._resource
        headers, auth_form = client_authentication(self._client)
        try:
            resp = await self._http.post(endpoint, data={**form, **auth_form}, headers=headers, timeout=self._timeout)
        except httpx.HTTPError as exc:
            raise IdpError("temporarily_unavailable", f"the IdP's token endpoint did not answer ({type(exc).__name__})", unavailable=True) from None
        if resp.status_code >= 500:
            raise IdpError("temporarily_unavailable", f"the IdP's token endpoint answered {resp.status_code}", unavailable=True)
        if resp.status_code != 200:
            error, description = oauth_error(resp)
            raise IdpError(error, description or f"the IdP answered {resp.status_code}")
        try:
            return IdpTokens.from_answer(resp.json())
        except ValueError:
            raise IdpError("invalid_response", "the IdP's token answer is not JSON") from None
