"""Talking to the IdP's endpoints: discovery, and client authentication for token/introspection calls.

Discovery is fetched from the profile's `discovery_url` (an internal URL if the IdP is
reached differently from the `iss` tokens carry) and cached; endpoints set in the
profile win over discovered ones.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any
from urllib.parse import quote

import httpx

from gateway.config.profiles import ClientAuth, Profile


class DiscoveryError(Exception):
    pass


class IssuerMetadata:
    """The issuer's OpenID/OAuth discovery document, fetched once and kept."""

    def __init__(self, profile: Profile, http: httpx.AsyncClient) -> None:
        self._profile = profile
        self._http = http
        self._doc: dict[str, Any] | None = None
        self._lock = asyncio.Lock()

    async def endpoint(self, name: str, override: str | None = None) -> str:
        """`jwks_uri`, `token_endpoint`, `introspection_endpoint`...; raises DiscoveryError."""
        if override:
            return override
        async with self._lock:
            if self._doc is None:
                try:
                    resp = await self._http.get(self._profile.discovery_document_url)
                    resp.raise_for_status()
                    doc = resp.json()
                except (httpx.HTTPError, ValueError) as exc:
                    raise DiscoveryError(f"discovery at {self._profile.discovery_document_url} failed: {type(exc).__name__}") from None
                if not isinstance(doc, dict):
                    raise DiscoveryError("the discovery document is not a JSON object")
                self._doc = doc
        value = self._doc.get(name)
        if not isinstance(value, str) or not value.startswith(("http://", "https://")):
            raise DiscoveryError(f"the discovery document has no usable {name}")
        return value


def client_authentication(client: ClientAuth) -> tuple[dict[str, str], dict[str, str]]:
    """(headers, form fields) authenticating `client` as RFC 6749 §2.3.1 describes."""
    if client.method == "client_secret_post":
        return {}, {"client_id": client.client_id, "client_secret": client.client_secret}
    # client_secret_basic: form-urlencode each part before base64 (RFC 6749 §2.3.1)
    pair = f"{quote(client.client_id, safe='')}:{quote(client.client_secret, safe='')}"
    return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}, {}


def oauth_error(resp: httpx.Response) -> tuple[str, str]:
    """(error, error_description) of an OAuth error answer, tolerating non-JSON bodies."""
    try:
        body = resp.json()
    except ValueError:
        return "invalid_response", ""
    if not isinstance(body, dict):
        return "invalid_response", ""
    error = body.get("error")
    description = body.get("error_description")
    return (error if isinstance(error, str) else "invalid_response", description if isinstance(description, str) else "")
