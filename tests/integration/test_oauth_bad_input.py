"""The gateway's authorization server under hostile or broken input.

Each case: the RFC 6749/7591 error, nothing stored or issued, nothing forwarded to the IdP
(the IdP's own counters say so), and no code, refresh token or secret in the gateway's log.
Runs against the Nextcloud-shaped test IdP (`nextcloud-oidc` profile, proxy mode), and a
small document server for Client ID Metadata Documents.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

import httpx
import pytest
from litestar import Litestar, Response, get

from gateway.oauth.signin import s256
from tests.conftest import ROOT, GatewayProcess, ThreadServer, free_port
from tests.integration.test_idp_profiles import nextcloud_env
from tests.support.browser import follow, query_of

REDIRECT = "http://127.0.0.1:47114/cb"
DATA = {"bundle": str(ROOT / "policies"), "data": [str(ROOT / "examples" / "notes-authz.yaml")]}


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    return verifier, s256(verifier)


def register(gw: GatewayProcess, **metadata: Any) -> httpx.Response:
    body = {"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none", "grant_types": ["authorization_code", "refresh_token"],
            **metadata}
    return httpx.post(gw.base + "/oauth/register", json=body)


def authorize(gw: GatewayProcess, client_id: str, challenge: str | None, **params: str) -> httpx.Response:
    query = {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT, "state": "st-1", "scope": "notes.read",
             **({"code_challenge": challenge, "code_challenge_method": "S256"} if challenge else {}), **params}
    return httpx.get(gw.base + "/oauth/authorize", params=query)


def sign_in(gw: GatewayProcess, client_id: str, challenge: str, user: str = "alice") -> str:
    """The gateway's code for `client_id`, after the user signed in at the IdP."""
    resp = authorize(gw, client_id, challenge)
    assert resp.status_code == 302, resp.text
    landed = follow(resp.headers["location"], user=user, stop_at=REDIRECT)
    query = query_of(landed)
    assert query.get("state") == "st-1" and query.get("iss") == gw.base, query
    return query["code"]


def token(gw: GatewayProcess, form: dict[str, str], auth: tuple[str, str] | None = None) -> httpx.Response:
    return httpx.post(gw.base + "/oauth/token", data=form, auth=auth)


def redeem(gw: GatewayProcess, client_id: str, code: str, verifier: str) -> httpx.Response:
    return token(gw, {"grant_type": "authorization_code", "client_id": client_id, "code": code, "code_verifier": verifier,
                      "redirect_uri": REDIRECT})


def error_of(resp: httpx.Response) -> str:
    return resp.json()["error"]


@pytest.fixture(scope="module")
def documents() -> Any:
    """A web server for Client ID Metadata Documents: good, redirecting, large, slow, lying."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    def doc(path: str, **extra: Any) -> dict[str, Any]:
        return {"client_id": f"{base}{path}", "client_name": "cimd client", "redirect_uris": [REDIRECT],
                "token_endpoint_auth_method": "none", "grant_types": ["authorization_code", "refresh_token"], **extra}

    fetched: list[str] = []

    @get("/{name:str}", sync_to_thread=False)
    async def serve(name: str) -> Response[Any]:
        fetched.append(name)
        if name == "good":
            return Response(doc("/good"), headers={"Cache-Control": "max-age=600"})
        if name == "redirect":
            return Response(b"", status_code=302, headers={"Location": f"{base}/good"})
        if name == "large":
            return Response({**doc("/large"), "client_uri": "https://x.example/" + "a" * 40_000})
        if name == "slow":
            await asyncio.sleep(3)
            return Response(doc("/slow"))
        if name == "liar":
            return Response(doc("/good"))
        return Response({"error": "not found"}, status_code=404)

    server = ThreadServer(Litestar([serve], openapi_config=None), port)
    server.start()
    yield base, fetched
    server.stop()


@pytest.fixture(scope="module")
def proxy(gateways: Any, nextcloud_idp: Any, nextcloud_upstream: Any) -> GatewayProcess:
    config = {
        "authorization_server": {
            "mode": "proxy", "code_ttl": 2,
            "registration": {"per_address_per_minute": 1000},
            "client_metadata_documents": {"allow_private_addresses": True, "allow_http": True, "timeout": 1},
        },
        "policy": DATA,
    }
    return gateways.start(profile="nextcloud-oidc", upstream_url=nextcloud_upstream.url, env=nextcloud_env(nextcloud_idp), config=config)


@pytest.fixture()
def client(proxy: GatewayProcess) -> dict[str, Any]:
    resp = register(proxy, client_name="bad-input tests")
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_metadata_names_the_gateway_and_its_endpoints(proxy: GatewayProcess) -> None:
    prm = httpx.get(proxy.base + "/.well-known/oauth-protected-resource/mcp").json()
    assert prm["authorization_servers"] == [proxy.base]
    for path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
        meta = httpx.get(proxy.base + path).json()
        assert meta["issuer"] == proxy.base
        assert meta["authorization_endpoint"] == proxy.base + "/oauth/authorize"
        assert meta["token_endpoint"] == proxy.base + "/oauth/token"
        assert meta["registration_endpoint"] == proxy.base + "/oauth/register"
        assert meta["revocation_endpoint"] == proxy.base + "/oauth/revoke"
        assert meta["code_challenge_methods_supported"] == ["S256"]
        assert set(meta["grant_types_supported"]) == {"authorization_code", "refresh_token"}
        assert set(meta["token_endpoint_auth_methods_supported"]) == {"none", "client_secret_post", "client_secret_basic"}
        assert meta["client_id_metadata_document_supported"] is True
        assert {"notes.read", "notes.write", "notes.admin"} <= set(meta["scopes_supported"])
        assert "offline_access" not in prm.get("scopes_supported", [])


@pytest.mark.parametrize("uris", [
    ["http://evil.example/cb"],  # http on a non-loopback host
    ["https://app.example/cb#frag"],  # fragment
    ["https://*.example/cb"],  # wildcard
    ["javascript:alert(1)"],
    ["https://user:pw@app.example/cb"],  # credentials
    [],
    ["https://app.example/cb"] * 11,  # too many
    "https://app.example/cb",  # not a list
])
def test_registration_refuses_bad_redirect_uris(proxy: GatewayProcess, uris: Any) -> None:
    resp = register(proxy, redirect_uris=uris)
    assert resp.status_code == 400 and error_of(resp) == "invalid_redirect_uri"
    assert "client_id" not in resp.json()


@pytest.mark.parametrize("body", [
    b"{not json",
    b"[1, 2]",
    json.dumps({"redirect_uris": [REDIRECT], "grant_types": ["client_credentials"]}).encode(),
    json.dumps({"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "private_key_jwt"}).encode(),
    json.dumps({"redirect_uris": [REDIRECT], "client_name": "x" * 1000}).encode(),
    json.dumps({"redirect_uris": [REDIRECT], "client_uri": "https://x.example/" + "a" * 20_000}).encode(),  # > 16 KiB
    # strict JSON, as everywhere the gateway reads JSON from outside
    ('{"redirect_uris": ["https://evil.example/cb"], "redirect_uris": ["%s"]}' % REDIRECT).encode(),  # a key twice
    ('{"redirect_uris": ["%s"], "client_name": "\\ud800"}' % REDIRECT).encode(),  # a lone surrogate
    ('{"redirect_uris": ["%s"], "default_max_age": NaN}' % REDIRECT).encode(),
])
def test_registration_refuses_malformed_or_oversized_metadata(proxy: GatewayProcess, body: bytes) -> None:
    resp = httpx.post(proxy.base + "/oauth/register", content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code in (400, 413) and error_of(resp) in ("invalid_client_metadata", "invalid_request")
    assert "client_id" not in resp.json()


def test_registration_is_rate_limited_per_address(gateways: Any, nextcloud_idp: Any, nextcloud_upstream: Any) -> None:
    gw = gateways.start(profile="nextcloud-oidc", upstream_url=nextcloud_upstream.url, env=nextcloud_env(nextcloud_idp),
                        config={"authorization_server": {"mode": "proxy", "registration": {"per_address_per_minute": 3}}})
    statuses = [register(gw).status_code for _ in range(5)]
    assert statuses[:3] == [201, 201, 201] and statuses[3:] == [429, 429]
    limited = register(gw)
    assert error_of(limited) == "temporarily_unavailable" and int(limited.headers["retry-after"]) >= 1


def test_unknown_client_and_unregistered_redirect_are_shown_not_redirected(proxy: GatewayProcess, client: dict[str, Any], nextcloud_idp: Any) -> None:
    _, challenge = pkce()
    unknown = authorize(proxy, "no-such-client", challenge)
    assert unknown.status_code == 400 and error_of(unknown) == "invalid_client" and "location" not in unknown.headers
    for uri in ("http://127.0.0.1:47114/other", "https://evil.example/cb", "http://127.0.0.1:47114/cb/../x"):
        wrong = authorize(proxy, client["client_id"], challenge, redirect_uri=uri)
        assert wrong.status_code == 400 and error_of(wrong) == "invalid_request" and "location" not in wrong.headers
    # a loopback redirect URI matches on any port (RFC 8252)
    other_port = authorize(proxy, client["client_id"], challenge, redirect_uri="http://127.0.0.1:50001/cb")
    assert other_port.status_code == 302 and other_port.headers["location"].startswith(nextcloud_idp.issuer)


@pytest.mark.parametrize("params,error", [
    ({}, "invalid_request"),  # no PKCE at all
    ({"code_challenge": "A" * 43, "code_challenge_method": "plain"}, "invalid_request"),
    ({"code_challenge": "short", "code_challenge_method": "S256"}, "invalid_request"),
    ({"response_type": "token"}, "unsupported_response_type"),
    ({"resource": "https://elsewhere.example/mcp"}, "invalid_target"),
])
def test_bad_authorization_requests_go_back_to_the_client_with_an_error(proxy: GatewayProcess, client: dict[str, Any],
                                                                        params: dict[str, str], error: str) -> None:
    _, challenge = pkce()
    resp = authorize(proxy, client["client_id"], None if "code_challenge" in params or not params else challenge, **params)
    assert resp.status_code == 302
    location = resp.headers["location"]
    assert location.startswith(REDIRECT)  # the client's redirect, never the IdP
    query = query_of(location)
    assert query["error"] == error and query["state"] == "st-1" and query["iss"] == proxy.base and "code" not in query


def test_wrong_verifier_wrong_redirect_and_foreign_client_are_refused(proxy: GatewayProcess, client: dict[str, Any]) -> None:
    verifier, challenge = pkce()
    code = sign_in(proxy, client["client_id"], challenge)
    wrong = redeem(proxy, client["client_id"], code, pkce()[0])
    assert wrong.status_code == 400 and error_of(wrong) == "invalid_grant"
    # the code is burnt by the failed attempt: the right verifier no longer helps
    assert error_of(redeem(proxy, client["client_id"], code, verifier)) == "invalid_grant"

    code = sign_in(proxy, client["client_id"], challenge)
    other_redirect = token(proxy, {"grant_type": "authorization_code", "client_id": client["client_id"], "code": code,
                                   "code_verifier": verifier, "redirect_uri": "http://127.0.0.1:47114/other"})
    assert error_of(other_redirect) == "invalid_grant"

    code = sign_in(proxy, client["client_id"], challenge)
    other = register(proxy).json()
    foreign = redeem(proxy, other["client_id"], code, verifier)
    assert foreign.status_code == 400 and error_of(foreign) == "invalid_grant"


def test_replayed_code_is_refused_and_what_it_issued_is_revoked(proxy: GatewayProcess, client: dict[str, Any], nextcloud_idp: Any) -> None:
    verifier, challenge = pkce()
    code = sign_in(proxy, client["client_id"], challenge)
    first = redeem(proxy, client["client_id"], code, verifier)
    assert first.status_code == 200 and first.headers["cache-control"] == "no-store"
    issued = first.json()
    assert issued["token_type"] == "Bearer" and issued["refresh_token"]
    revocations = nextcloud_idp.stats()["revocations"]
    replay = redeem(proxy, client["client_id"], code, verifier)
    assert replay.status_code == 400 and error_of(replay) == "invalid_grant"
    assert nextcloud_idp.stats()["revocations"] > revocations  # the IdP was told
    refreshed = token(proxy, {"grant_type": "refresh_token", "client_id": client["client_id"], "refresh_token": issued["refresh_token"]})
    assert error_of(refreshed) == "invalid_grant"  # the refresh token the first use gave is dead


def test_expired_code_is_refused(proxy: GatewayProcess, client: dict[str, Any]) -> None:
    verifier, challenge = pkce()
    code = sign_in(proxy, client["client_id"], challenge)
    time.sleep(2.5)  # code_ttl: 2
    assert error_of(redeem(proxy, client["client_id"], code, verifier)) == "invalid_grant"


def test_replayed_refresh_token_revokes_its_family(proxy: GatewayProcess, client: dict[str, Any]) -> None:
    verifier, challenge = pkce()
    issued = redeem(proxy, client["client_id"], sign_in(proxy, client["client_id"], challenge), verifier).json()
    form = {"grant_type": "refresh_token", "client_id": client["client_id"], "refresh_token": issued["refresh_token"]}
    second = token(proxy, form)
    assert second.status_code == 200, second.text
    rotated = second.json()["refresh_token"]
    assert rotated != issued["refresh_token"]
    assert error_of(token(proxy, form)) == "invalid_grant"  # the old one, replayed
    assert error_of(token(proxy, {**form, "refresh_token": rotated})) == "invalid_grant"  # and the family with it


def test_callback_with_unknown_state_is_shown_not_redirected(proxy: GatewayProcess, nextcloud_idp: Any) -> None:
    grants = nextcloud_idp.stats()["code_grants"]
    resp = httpx.get(proxy.base + "/oauth/callback", params={"state": "forged", "code": "whatever"})
    assert resp.status_code == 400 and error_of(resp) == "invalid_request" and "location" not in resp.headers
    assert nextcloud_idp.stats()["code_grants"] == grants  # nothing redeemed at the IdP


def test_idp_error_reaches_the_client_as_an_oauth_error(proxy: GatewayProcess, client: dict[str, Any]) -> None:
    _, challenge = pkce()
    resp = authorize(proxy, client["client_id"], challenge)
    idp_url = resp.headers["location"]
    state = query_of(idp_url)["state"]
    back = httpx.get(proxy.base + "/oauth/callback", params={"state": state, "error": "access_denied", "error_description": "no"})
    assert back.status_code == 302
    query = query_of(back.headers["location"])
    assert back.headers["location"].startswith(REDIRECT) and query["error"] == "access_denied" and query["state"] == "st-1"
    # the state is used up: a second callback with it is refused
    again = httpx.get(proxy.base + "/oauth/callback", params={"state": state, "code": "x"})
    assert again.status_code == 400


def test_confidential_client_must_authenticate(proxy: GatewayProcess) -> None:
    reg = register(proxy, token_endpoint_auth_method="client_secret_basic").json()
    assert reg["client_secret"] and reg["client_secret_expires_at"] == 0
    verifier, challenge = pkce()
    code = sign_in(proxy, reg["client_id"], challenge)
    form = {"grant_type": "authorization_code", "code": code, "code_verifier": verifier, "redirect_uri": REDIRECT}
    assert token(proxy, {**form, "client_id": reg["client_id"]}).status_code == 401  # no secret
    bad = token(proxy, form, auth=(reg["client_id"], "wrong"))
    assert bad.status_code == 401 and error_of(bad) == "invalid_client"
    # the code was not consumed by failed client authentication
    good = token(proxy, form, auth=(reg["client_id"], reg["client_secret"]))
    assert good.status_code == 200, good.text
    assert reg["client_secret"] not in proxy.log()


def test_revocation_ends_the_refresh_token(proxy: GatewayProcess, client: dict[str, Any], nextcloud_idp: Any) -> None:
    verifier, challenge = pkce()
    issued = redeem(proxy, client["client_id"], sign_in(proxy, client["client_id"], challenge), verifier).json()
    before = nextcloud_idp.stats()["revocations"]
    resp = httpx.post(proxy.base + "/oauth/revoke", data={"token": issued["refresh_token"], "client_id": client["client_id"]})
    assert resp.status_code == 200
    assert nextcloud_idp.stats()["revocations"] == before + 1
    form = {"grant_type": "refresh_token", "client_id": client["client_id"], "refresh_token": issued["refresh_token"]}
    assert error_of(token(proxy, form)) == "invalid_grant"


def test_metadata_document_client_signs_in(proxy: GatewayProcess, documents: Any) -> None:
    base, fetched = documents
    client_id = f"{base}/good"
    verifier, challenge = pkce()
    code = sign_in(proxy, client_id, challenge)
    issued = redeem(proxy, client_id, code, verifier)
    assert issued.status_code == 200, issued.text
    n = fetched.count("good")
    sign_in(proxy, client_id, challenge)
    assert fetched.count("good") == n  # cached per its Cache-Control


@pytest.mark.parametrize("name", ["redirect", "large", "slow", "liar", "missing"])
def test_bad_metadata_documents_are_refused(proxy: GatewayProcess, documents: Any, name: str) -> None:
    base, _ = documents
    _, challenge = pkce()
    started = time.monotonic()
    resp = authorize(proxy, f"{base}/{name}", challenge)
    assert resp.status_code == 400 and error_of(resp) == "invalid_client" and "location" not in resp.headers
    assert time.monotonic() - started < 2.5  # the slow one is cut at the 1 s timeout


def test_metadata_document_on_a_private_address_is_refused_by_default(gateways: Any, nextcloud_idp: Any, nextcloud_upstream: Any,
                                                                       documents: Any) -> None:
    base, fetched = documents
    gw = gateways.start(profile="nextcloud-oidc", upstream_url=nextcloud_upstream.url, env=nextcloud_env(nextcloud_idp),
                        config={"authorization_server": {"mode": "proxy", "client_metadata_documents": {"allow_http": True}}})
    before = len(fetched)
    resp = authorize(gw, f"{base}/good", pkce()[1])
    assert resp.status_code == 400 and error_of(resp) == "invalid_client"
    assert len(fetched) == before  # never fetched: loopback is not a public address
    https_only = gateways.start(profile="nextcloud-oidc", upstream_url=nextcloud_upstream.url, env=nextcloud_env(nextcloud_idp),
                                config={"authorization_server": {"mode": "proxy"}})
    assert error_of(authorize(https_only, f"{base}/good", pkce()[1])) == "invalid_client"


def test_no_secret_in_the_log(proxy: GatewayProcess, client: dict[str, Any]) -> None:
    verifier, challenge = pkce()
    code = sign_in(proxy, client["client_id"], challenge)
    issued = redeem(proxy, client["client_id"], code, verifier).json()
    log = proxy.log()
    for secret in (code, verifier, issued["access_token"], issued["refresh_token"]):
        assert secret not in log


def test_two_replicas_share_registrations_codes_and_refresh_tokens_through_redis(gateways: Any, nextcloud_idp: Any,
                                                                                  nextcloud_upstream: Any, redis_server: Any) -> None:
    config = {"authorization_server": {"mode": "proxy", "store": {"store": "redis", "url": redis_server.url}}, "policy": DATA}
    a, b = (gateways.start(profile="nextcloud-oidc", upstream_url=nextcloud_upstream.url, env=nextcloud_env(nextcloud_idp),
                           config=config, replica=name) for name in ("a", "b"))
    client = register(b).json()  # registered at B
    verifier, challenge = pkce()
    code = sign_in(a, client["client_id"], challenge)  # signed in through A
    issued = redeem(b, client["client_id"], code, verifier)  # redeemed at B
    assert issued.status_code == 200, issued.text
    refreshed = token(a, {"grant_type": "refresh_token", "client_id": client["client_id"], "refresh_token": issued.json()["refresh_token"]})
    assert refreshed.status_code == 200, refreshed.text  # refreshed at A
    reply = redis_server.command("KEYS", "mcp-gateway:oauth:*")
    keys = [line for line in reply.split("\r\n") if line.startswith("mcp-gateway:oauth:")]
    assert any(k.startswith("mcp-gateway:oauth:client:") for k in keys) and any(k.startswith("mcp-gateway:oauth:refresh:") for k in keys)
    values = "".join(redis_server.command("GET", k) for k in keys if not k.startswith("mcp-gateway:oauth:family:"))
    for secret in (code, issued.json()["refresh_token"], issued.json()["access_token"],
                   refreshed.json()["access_token"], refreshed.json()["refresh_token"]):
        assert all(secret not in k for k in keys) and secret not in values  # hashes as keys, sealed values
    assert error_of(redeem(a, client["client_id"], code, verifier)) == "invalid_grant"  # the code is one-time across replicas


def test_oauth_store_down_is_503_and_not_ready(gateways: Any, nextcloud_idp: Any, nextcloud_upstream: Any) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    gw = gateways.start(profile="nextcloud-oidc", upstream_url=nextcloud_upstream.url, env=nextcloud_env(nextcloud_idp),
                        config={"authorization_server": {"mode": "proxy", "store": {"store": "redis", "url": down, "timeout": 0.5}}})
    registered = register(gw)
    assert registered.status_code == 503 and error_of(registered) == "temporarily_unavailable"
    ready = httpx.get(gw.base + "/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["oauth_store"] is False
    grants = nextcloud_idp.stats()["code_grants"]
    assert httpx.get(gw.base + "/oauth/callback", params={"state": "s", "code": "c"}).status_code == 503
    assert nextcloud_idp.stats()["code_grants"] == grants
