"""Real MCP clients sign in through the gateway as their authorization server (proxy mode).

The SDK's `OAuthClientProvider`, unmodified and with no pre-registered client, against the
shipped `keycloak` and `nextcloud-oidc` profiles and the test OpenID provider in the matching
shape (tests/idp: Keycloak ignores `resource` and sets `aud` from audience mappers;
Nextcloud puts the requesting client's id in `aud` and has single-use refresh tokens):
discovery → dynamic registration at the gateway → authorize (PKCE) → the gateway signs the
user in at the IdP with its own client → token → tools/list → tools/call → step-up → refresh.
And the same client in `direct` mode, for contrast: it registers at the IdP itself and its
token is refused (the audience is not the gateway's).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import (
    AuthorizationCodeResult,
    OAuthClientInformationFull,
    OAuthClientMetadata,
    OAuthToken,
)

from tests.conftest import ROOT, GatewayProcess, OpenIdProvider, UpstreamProcess
from tests.integration.test_idp_profiles import claims_of, keycloak_env, nextcloud_env
from tests.support.browser import follow, query_of

REDIRECT_URI = "http://127.0.0.1:47113/callback"  # nothing listens: the browser stops there
NOTES_DATA = str(ROOT / "examples" / "notes-authz.yaml")
PROXY = {"authorization_server": {"mode": "proxy"}, "policy": {"bundle": str(ROOT / "policies"), "data": [NOTES_DATA]}}


class MemoryStorage:
    """The SDK's TokenStorage in memory; starts with no client (the SDK registers one)."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.history: list[OAuthToken] = []
        self.client: OAuthClientInformationFull | None = None

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
    """The user's browser: follows the authorization URL to the client's redirect URI."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.authorize_urls: list[str] = []
        self.landed: list[str] = []

    async def redirect(self, url: str) -> None:
        self.authorize_urls.append(url)
        self.landed.append(await asyncio.to_thread(follow, url, user=self.user, stop_at=REDIRECT_URI.rsplit("/", 1)[0]))

    async def callback(self) -> AuthorizationCodeResult:
        query = query_of(self.landed[-1])
        assert "code" in query, query
        return AuthorizationCodeResult(code=query["code"], state=query.get("state"), iss=query.get("iss"))


def sdk_auth(gw: GatewayProcess, storage: MemoryStorage, browser: Browser) -> OAuthClientProvider:
    return OAuthClientProvider(
        server_url=gw.mcp_url,
        client_metadata=OAuthClientMetadata(
            client_name="sdk test client", redirect_uris=[REDIRECT_URI], grant_types=["authorization_code", "refresh_token"],
            response_types=["code"], token_endpoint_auth_method="none",
        ),
        storage=storage,
        redirect_handler=browser.redirect,
        callback_handler=browser.callback,
    )


@dataclass
class Setup:
    shape: str
    idp: OpenIdProvider
    upstream: UpstreamProcess
    env: dict[str, str]

    def gateway(self, gateways: Any, config: dict[str, Any] | None = None) -> GatewayProcess:
        return self.gateways_start(gateways, config if config is not None else PROXY)

    def gateways_start(self, gateways: Any, config: dict[str, Any], env: dict[str, str] | None = None) -> GatewayProcess:
        return gateways.start(profile=self.shape, upstream_url=self.upstream.url, env={**self.env, **(env or {})}, config=config)


@pytest.fixture(params=["keycloak", "nextcloud-oidc"])
def setup(request: pytest.FixtureRequest) -> Setup:
    if request.param == "keycloak":
        idp = request.getfixturevalue("keycloak_idp")
        return Setup("keycloak", idp, request.getfixturevalue("backend_upstream"), keycloak_env(idp))
    idp = request.getfixturevalue("nextcloud_idp")
    return Setup("nextcloud-oidc", idp, request.getfixturevalue("nextcloud_upstream"), nextcloud_env(idp))


@pytest.mark.parametrize("vault", [False, True], ids=["no-vault", "vault"])
async def test_sdk_client_registers_signs_in_steps_up_and_refreshes(setup: Setup, gateways: Any, vault: bool,
                                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    """With the token vault on, the same client flow holds: the vault owns the IdP refresh
    token and the client's refreshes go through it (single-use tokens rotated once each)."""
    if vault:
        store = tmp_path_factory.mktemp("sdk-vault") / "vault.db"
        gw = setup.gateways_start(gateways, {**PROXY, "vault": {"enabled": True, "keys_env": "SDK_VAULT_KEYS", "path": str(store)}},
                                  env={"SDK_VAULT_KEYS": "k1=" + base64.b64encode(b"k" * 32).decode()})
    else:
        gw = setup.gateway(gateways)
    setup.idp.reset()
    setup.upstream.clear()
    storage, browser = MemoryStorage(), Browser("alice")
    auth = sdk_auth(gw, storage, browser)
    async with httpx2.AsyncClient(auth=auth, timeout=30) as http:
        async with Client(streamable_http_client(gw.mcp_url, http_client=http), mode="legacy") as client:
            # registration happened at the gateway, never at the IdP
            assert storage.client is not None and storage.client.client_id
            assert setup.idp.stats()["registrations"] == 0

            tools = {t.name for t in (await client.list_tools()).tools}
            assert "list_notes" in tools and "create_note" not in tools  # a reader's listing
            first = storage.history[0]
            assert "notes.read" in first.scope.split() and "notes.write" not in first.scope.split()
            claims = claims_of(first.access_token)
            assert claims["azp"] == "nextcloud-mcp-server" and claims["sub"] == "alice"  # the gateway's own client
            assert first.refresh_token and first.refresh_token.count(".") == 0  # a handle of the gateway's

            # step-up: a write needs notes.write; the client re-authorizes and the call goes through
            created = await client.call_tool("create_note", {"title": "after step-up", "path": "/users/alice/n"})
            assert not created.is_error, created
            assert len(storage.history) == 2
            assert {"notes.read", "notes.write"} <= set(storage.history[1].scope.split())
            assert "create_note" in {t.name for t in (await client.list_tools()).tools}  # what it can use now

            # refresh, twice (Nextcloud's refresh tokens are single-use: the second needs the rotated one)
            for n in (3, 4):
                auth.context.token_expiry_time = time.time() - 1
                assert "list_notes" in {t.name for t in (await client.list_tools()).tools}
                assert len(storage.history) == n
                assert storage.history[-1].refresh_token != storage.history[-2].refresh_token  # rotated
                assert storage.history[-1].access_token != storage.history[-2].access_token
    stats = setup.idp.stats()
    assert stats["code_grants"] == 2 and stats["refresh_grants"] == 2 and stats["registrations"] == 0
    first_url, second_url = (query_of(u) for u in browser.authorize_urls)
    assert first_url["client_id"] == second_url["client_id"] == storage.client.client_id
    seen = setup.upstream.requests()
    writes = [r for r in seen if json.loads(r["body"] or "{}").get("params", {}).get("name") == "create_note"]
    assert len(writes) == 1
    if setup.shape == "keycloak":  # exchange mode: the backend got a token meant for it
        assert writes[0]["claims"]["aud"] == "nextcloud" and writes[0]["claims"]["sub"] == "alice"
    else:  # pass-through: the stepped-up token itself
        assert dict(writes[0]["headers"])["authorization"] == f"Bearer {storage.history[1].access_token}"
    log = gw.log()
    for token in storage.history:
        assert token.access_token not in log and token.refresh_token not in log
    if vault:  # both sign-ins are grants the user can see
        grants = httpx.get(gw.base + "/vault/grants", headers={"Authorization": f"Bearer {storage.history[-1].access_token}"}).json()
        assert len(grants["grants"]) == 2


async def test_direct_mode_refuses_a_registered_clients_token(setup: Setup, gateways: Any) -> None:
    """Without the proxy, the client registers at the IdP and gets a token the gateway cannot accept."""
    gw = setup.gateways_start(gateways, {"policy": PROXY["policy"]})
    metadata = httpx.get(gw.base + "/.well-known/oauth-protected-resource/mcp").json()
    assert metadata["authorization_servers"] == [setup.idp.issuer]
    storage, browser = MemoryStorage(), Browser("alice")
    before = setup.idp.stats()["registrations"]
    with pytest.raises(Exception):  # noqa: B017 - the SDK gives up in its own way
        async with httpx2.AsyncClient(auth=sdk_auth(gw, storage, browser), timeout=30) as http:
            async with Client(streamable_http_client(gw.mcp_url, http_client=http), mode="legacy") as client:
                await client.list_tools()
    assert setup.idp.stats()["registrations"] == before + 1  # it registered at the IdP
    token = storage.history[-1].access_token
    aud = claims_of(token)["aud"]
    assert "nextcloud-mcp-server" not in ([aud] if isinstance(aud, str) else aud)
    assert "audience_not_accepted" in gw.log()
    assert all(token not in str(r["headers"]) for r in setup.upstream.requests())
