"""Step-up with the SDK's own OAuth client against a real OpenID provider.

The client (`mcp.client.auth.OAuthClientProvider`) starts with no token: the gateway's
401 sends it to the protected resource metadata, the provider's authorization code flow
(PKCE, RFC 8707 `resource`) gives it a token with the scope the 401 asked for
(`notes.read`, from the policy data). A write then gets 403 `insufficient_scope`
naming `notes.write`; the client re-authorizes with the union of scopes and the write
goes through. The "browser" is an httpx client following the provider's redirects; the
provider's login/consent pages agree at once (tests/idp/server.mjs).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull, OAuthClientMetadata, OAuthToken

from tests.conftest import ROOT, _running_upstream

REDIRECT_URI = "http://127.0.0.1/callback"


class MemoryStorage:
    """The SDK's TokenStorage, in memory; the client is pre-registered at the provider."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.history: list[OAuthToken] = []
        self.client = OAuthClientInformationFull(
            client_id="mcp-cli",
            redirect_uris=[REDIRECT_URI],
            token_endpoint_auth_method="none",
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
        )

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens
        self.history.append(tokens)

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


class Browser:
    """Follows the provider's redirects for user `login_hint` until the client's redirect URI."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.cookies = httpx.Cookies()
        self.authorize_urls: list[str] = []
        self.result: AuthorizationCodeResult | None = None

    async def redirect(self, url: str) -> None:
        self.authorize_urls.append(url)
        url += f"&login_hint={self.user}"
        async with httpx.AsyncClient(cookies=self.cookies, follow_redirects=False, timeout=20) as http:
            for _ in range(20):
                resp = await http.get(url)
                location = resp.headers.get("location")
                assert resp.status_code in (302, 303) and location, f"{resp.status_code}: {resp.text[:500]}"
                url = str(resp.url.join(location))
                if url.startswith(REDIRECT_URI):
                    query = parse_qs(urlsplit(url).query)
                    assert "code" in query, query
                    self.result = AuthorizationCodeResult(
                        code=query["code"][0], state=query["state"][0], iss=query.get("iss", [None])[0]
                    )
                    return
            raise AssertionError("the provider never redirected back")

    async def callback(self) -> AuthorizationCodeResult:
        assert self.result is not None
        result, self.result = self.result, None
        return result


@pytest.fixture(scope="module")
def step_up_upstream(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from _running_upstream(tmp_path_factory, "step-up-upstream", "--json-response", "--stateless")


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_sdk_client_steps_up_from_read_to_write(mode, gateways, nextcloud_idp, step_up_upstream) -> None:
    gw = gateways.start(
        profile={
            "name": "nextcloud-like",
            "issuer": nextcloud_idp.issuer,
            "token_kinds": ["jwt"],
            "jwt": {"algorithms": ["RS256"], "typ": ["at+jwt"]},
            "audience": {"accept": ["{resource}"], "match": "any", "missing": "reject"},
            "mode": "passthrough",
        },
        upstream_url=step_up_upstream.url,
        config={"policy": {"bundle": str(ROOT / "policies"), "data": [str(ROOT / "examples" / "notes-authz.yaml")]}},
    )
    storage, browser = MemoryStorage(), Browser("alice")
    auth = OAuthClientProvider(
        server_url=gw.mcp_url,
        client_metadata=OAuthClientMetadata(
            redirect_uris=[REDIRECT_URI], grant_types=["authorization_code", "refresh_token"], response_types=["code"],
            token_endpoint_auth_method="none",
        ),
        storage=storage,
        redirect_handler=browser.redirect,
        callback_handler=browser.callback,
    )
    step_up_upstream.clear()
    async with httpx2.AsyncClient(auth=auth, timeout=30) as http:
        async with Client(streamable_http_client(gw.mcp_url, http_client=http), mode=mode) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            assert "create_note" not in tools and "list_notes" in tools  # a reader's listing
            assert len(storage.history) == 1 and set(storage.history[0].scope.split()) >= {"notes.read"}
            assert "notes.write" not in storage.history[0].scope.split()

            created = await client.call_tool("create_note", {"title": "after step-up", "path": "/users/alice/n"})
            assert not created.is_error, created

            assert len(storage.history) == 2, "the client did not re-authorize"
            assert {"notes.read", "notes.write"} <= set(storage.history[1].scope.split())
            assert "create_note" in {t.name for t in (await client.list_tools()).tools}

    first, second = (parse_qs(urlsplit(u).query) for u in browser.authorize_urls)
    assert "notes.read" in first["scope"][0].split() and "notes.write" not in first["scope"][0].split()
    assert {"notes.read", "notes.write"} <= set(second["scope"][0].split())
    assert first["resource"] == [gw.resource] and second["resource"] == [gw.resource]
    # the upstream saw the write once, with the stepped-up token (pass-through)
    writes = [r for r in step_up_upstream.requests() if json.loads(r["body"] or "{}").get("params", {}).get("name") == "create_note"]
    assert len(writes) == 1
    assert dict(writes[0]["headers"])["authorization"] == f"Bearer {storage.history[1].access_token}"
