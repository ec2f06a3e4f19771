"""The token vault, end to end: a real OpenID provider (tests/idp, Keycloak- and Nextcloud-
shaped), real stores (an SQLite file; a real redis-server), real backends that verify tokens.

A user signs in through the gateway's authorization server with `offline_access`; later, with
no client request in flight, a backend job asks `POST /vault/token` for that user's token and
calls an API that verifies it. Refusals, rotation of single-use refresh tokens under
concurrency, revocation by the user and by the operator, key rotation, an IdP that is down,
and `mode: delegate` on the request path.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import (
    IDP_CLIENT,
    ROOT,
    GatewayProcess,
    OpenIdProvider,
    UpstreamProcess,
    _start_idp,
    _start_upstream,
)
from tests.integration.test_idp_profiles import claims_of, keycloak_env, nextcloud_env
from tests.support.browser import follow, query_of

REDIRECT_URI = "http://127.0.0.1:47119/callback"  # nothing listens: the browser stops there
NOTES_DATA = str(ROOT / "examples" / "notes-authz.yaml")
KEY1 = "k1=" + base64.b64encode(b"1" * 32).decode()
KEY2 = "k2=" + base64.b64encode(b"2" * 32).decode()
SECRETS = {"notes-sync": "notes-sync-secret-0123456789", "reports": "reports-secret-0123456789",
           "stranger": "stranger-secret-0123456789"}


def s256(verifier: str) -> str:
    import hashlib

    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


@dataclass
class VaultSetup:
    shape: str
    idp: OpenIdProvider
    api: UpstreamProcess  # a backend API that verifies the tokens it gets (signature, issuer)
    env: dict[str, str]
    audience: str  # the backend's audience at this IdP
    tmp: Path

    def config(self, store: dict[str, Any], **vault: Any) -> dict[str, Any]:
        data = self.tmp / "vault-authz.yaml"
        text = yaml.safe_dump({"authz": {"vault": {"backends": {
            "notes-sync": {"audiences": [self.audience], "scopes": ["notes.read", "notes.write"]},
            "reports": {"audiences": [self.audience], "scopes": ["notes.read"]},
        }}}})
        if not data.exists() or data.read_text() != text:  # rewritten, running gateways would reload
            data.write_text(text)
        return {
            "authorization_server": {"mode": "proxy"},
            "policy": {"bundle": str(ROOT / "policies"), "data": [NOTES_DATA, str(data)]},
            "decision_log": str(self.tmp / f"decisions-{secrets.token_hex(4)}.jsonl"),
            "vault": {"enabled": True, "keys_env": "TEST_VAULT_KEYS", **store, **vault,
                      "backends": {name: {"client_secret": secret} for name, secret in SECRETS.items()}},
        }

    def start(self, gateways: Any, config: dict[str, Any], *, keys: str = KEY1, profile: Any = None, replica: str = "") -> GatewayProcess:
        return gateways.start(profile=profile or self.shape_profile, upstream_url=self.api.url,
                              env={**self.env, "TEST_VAULT_KEYS": keys}, config=config, replica=replica)

    @property
    def shape_profile(self) -> str:
        return "keycloak" if self.shape == "keycloak" else "nextcloud-oidc"


def _verifying_api(tmp: Path, idp: OpenIdProvider) -> UpstreamProcess:
    return _start_upstream(tmp, "--json-response", "--stateless", "--verify-jwks", idp.jwks_url, "--verify-issuer", idp.issuer)


@pytest.fixture(scope="module")
def keycloak_setup(tmp_path_factory: pytest.TempPathFactory, keycloak_idp: OpenIdProvider) -> Any:
    tmp = tmp_path_factory.mktemp("vault-keycloak")
    api = _verifying_api(tmp / "api", keycloak_idp)
    yield VaultSetup("keycloak", keycloak_idp, api, keycloak_env(keycloak_idp), "notes-backend", tmp)
    api.proc.terminate()


@pytest.fixture(scope="module")
def nextcloud_setup(tmp_path_factory: pytest.TempPathFactory, nextcloud_idp: OpenIdProvider) -> Any:
    tmp = tmp_path_factory.mktemp("vault-nextcloud")
    api = _verifying_api(tmp / "api", nextcloud_idp)
    yield VaultSetup("nextcloud", nextcloud_idp, api, nextcloud_env(nextcloud_idp), IDP_CLIENT[0], tmp)
    api.proc.terminate()


def sign_in(gw: GatewayProcess, user: str, scope: str = "notes.read notes.write") -> dict[str, Any]:
    """What an MCP client does (register, authorize with PKCE, redeem) with `user` at the IdP."""
    with httpx.Client(base_url=gw.base, timeout=20, trust_env=False) as http:
        client = http.post("/oauth/register", json={
            "client_name": "vault test", "redirect_uris": [REDIRECT_URI], "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"]}).json()
        verifier = secrets.token_urlsafe(48)
        url = str(httpx.URL(gw.base + "/oauth/authorize", params={
            "response_type": "code", "client_id": client["client_id"], "redirect_uri": REDIRECT_URI, "state": "s",
            "code_challenge": s256(verifier), "code_challenge_method": "S256", "scope": scope, "resource": gw.resource}))
        landed = query_of(follow(url, user=user, stop_at=REDIRECT_URI))
        assert "code" in landed, landed
        tokens = http.post("/oauth/token", data={"grant_type": "authorization_code", "code": landed["code"], "redirect_uri": REDIRECT_URI,
                                                 "code_verifier": verifier, "client_id": client["client_id"]}).json()
        assert "access_token" in tokens, tokens
        return {**tokens, "client_id": client["client_id"]}


def release(gw: GatewayProcess, subject: str, *, backend: str = "notes-sync", audience: str, scope: str = "notes.read",
            secret: str | None = None, as_json: bool = False) -> httpx.Response:
    body = {"subject": subject, "audience": audience, "scope": scope, "reason": "nightly notes sync"}
    auth = (backend, secret or SECRETS.get(backend, "wrong-secret-0123456789"))
    if as_json:
        return httpx.post(gw.base + "/vault/token", json=body, auth=auth, timeout=20)
    return httpx.post(gw.base + "/vault/token", data=body, auth=auth, timeout=20)


def call_api(api: UpstreamProcess, token: str) -> tuple[int, dict[str, Any]]:
    """The backend job's own call: tools/list on the backend API, which verifies the token."""
    api.clear()
    resp = httpx.post(api.url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                      headers={"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream",
                               "MCP-Protocol-Version": "2025-11-25", "Content-Type": "application/json"}, timeout=10)
    seen = api.requests()[-1]
    return resp.status_code, seen.get("claims") or {}


def stored_refresh_tokens(db: Path, key: bytes) -> list[str]:
    """The refresh tokens in the SQLite store, opened with the test's key (what the gateway does)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    out = []
    with sqlite3.connect(db) as conn:
        for issuer, subject, grant_id, sealed in conn.execute("SELECT issuer, subject, grant_id, sealed FROM grants"):
            raw = base64.b64decode(sealed)
            value = AESGCM(key).decrypt(raw[:12], raw[12:], f"{issuer}\n{subject}\n{grant_id}".encode())
            out.append(json.loads(value)["refresh_token"])
    return out


def redis_refresh_tokens(url: str, prefix: str, key: bytes) -> list[str]:
    """The refresh tokens in the Redis store, opened with the test's key."""
    import redis as redis_py
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    out = []
    with redis_py.Redis.from_url(url) as client:
        for raw in client.hvals(prefix + "grants"):
            grant = json.loads(raw)
            sealed = base64.b64decode(grant["sealed"])
            bound = f"{grant['issuer']}\n{grant['subject']}\n{grant['grant_id']}".encode()
            out.append(json.loads(AESGCM(key).decrypt(sealed[:12], sealed[12:], bound))["refresh_token"])
    return out


def idp_refresh(idp: OpenIdProvider, refresh_token: str) -> httpx.Response:
    return httpx.post(idp.issuer + "/token", data={"grant_type": "refresh_token", "refresh_token": refresh_token}, auth=IDP_CLIENT)


def decisions(gw: GatewayProcess) -> list[dict[str, Any]]:
    path = Path(yaml.safe_load(gw.config_path.read_text())["decision_log"])
    return [json.loads(line) for line in path.read_text().splitlines() if '"/vault/token"' in line]


def vault_cli(setup: VaultSetup, gw: GatewayProcess, *args: str, keys: str = KEY1) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "vault", *args, "--config", str(gw.config_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, **setup.env, "TEST_VAULT_KEYS": keys})


# --- 1. A backend job acts for a user who is not there ----------------------------------

@pytest.mark.parametrize("shape,store", [("keycloak", "sqlite"), ("nextcloud", "redis")])
def test_backend_job_gets_the_users_token_and_the_api_verifies_it(shape: str, store: str, request: pytest.FixtureRequest,
                                                                 gateways: Any) -> None:
    setup: VaultSetup = request.getfixturevalue(f"{shape}_setup")
    if store == "redis":
        redis = request.getfixturevalue("redis_server")
        store_cfg = {"store": "redis", "url": redis.url, "key_prefix": f"vault-{secrets.token_hex(3)}:"}
    else:
        store_cfg = {"path": str(setup.tmp / f"vault-{secrets.token_hex(3)}.db")}
    gw = setup.start(gateways, setup.config(store_cfg))
    user_tokens = sign_in(gw, "alice")

    # no client request in flight: the job runs on its own
    resp = release(gw, "alice", audience=setup.audience, scope="notes.read", as_json=shape == "nextcloud")
    assert resp.status_code == 200, resp.text
    assert resp.headers["cache-control"] == "no-store"
    answer = resp.json()
    assert answer["token_type"] == "Bearer" and answer["scope"] == "notes.read" and answer["expires_in"] > 0
    token = answer["access_token"]
    assert token != user_tokens["access_token"]

    status, claims = call_api(setup.api, token)
    assert status == 200, claims
    assert claims["sub"] == "alice"
    audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
    assert setup.audience in audiences
    assert claims["scope"].split() == ["notes.read"]

    # the second ask is served from memory, still one decision line each, never a token in the log
    again = release(gw, "alice", audience=setup.audience, scope="notes.read")
    assert again.json()["access_token"] == token
    lines = decisions(gw)
    assert [line["result"]["outcome"] for line in lines[-2:]] == ["released", "cached"]
    assert lines[-1]["input"]["vault"]["backend"]["id"] == "notes-sync" and lines[-1]["input"]["vault"]["reason"] == "nightly notes sync"
    log_text = Path(yaml.safe_load(gw.config_path.read_text())["decision_log"]).read_text() + gw.log()
    assert token not in log_text and user_tokens["access_token"] not in log_text

    # the user sees which backend used it, and when
    grants = httpx.get(gw.base + "/vault/grants", headers={"Authorization": f"Bearer {user_tokens['access_token']}"}).json()
    assert grants["subject"] == "alice" and len(grants["grants"]) == 1
    assert grants["grants"][0]["used_by"][0]["backend"] == "notes-sync" and grants["grants"][0]["used_by"][0]["count"] == 2
    assert "sealed" not in json.dumps(grants) and "refresh" not in json.dumps(grants["grants"][0]["used_by"])

    metrics = httpx.get(gw.base + "/metrics").text
    assert "mcp_gateway_vault_grants 1.0" in metrics
    assert 'mcp_gateway_vault_releases_total{result="released"} 1.0' in metrics
    assert 'mcp_gateway_vault_releases_total{result="cached"} 1.0' in metrics
    ready = httpx.get(gw.base + "/readyz").json()
    assert ready["checks"]["vault"] is True

    # the client's own refresh goes through the vault's grant (one refresh token, one owner)
    refreshed = httpx.post(gw.base + "/oauth/token", data={"grant_type": "refresh_token", "refresh_token": user_tokens["refresh_token"],
                                                           "client_id": user_tokens["client_id"]})
    assert refreshed.status_code == 200, refreshed.text
    assert claims_of(refreshed.json()["access_token"])["sub"] == "alice"


# --- 2. What the policy refuses, and what a refusal does not tell -------------------------

def test_refusals_by_policy_never_reveal_whether_a_user_has_a_grant(nextcloud_setup: VaultSetup, gateways: Any) -> None:
    setup = nextcloud_setup
    shadow = setup.tmp / "shadow-bundle"  # a candidate that names the refusal differently: watched, never acted on
    if not shadow.exists():
        shutil.copytree(ROOT / "policies", shadow)
        for name in ("vault.rego", "vault_test.rego"):
            (shadow / name).write_text((shadow / name).read_text().replace("vault_backend_not_allowed", "vault_backend_unknown"))
    config = setup.config({"path": str(setup.tmp / "refusals.db")})
    config["policy"]["shadow"] = str(shadow)
    gw = setup.start(gateways, config)
    sign_in(gw, "alice")

    # a backend the policy does not know (it authenticates: gateway.yaml registers it)
    has_grant = release(gw, "alice", backend="stranger", audience=setup.audience)
    no_grant = release(gw, "nobody", backend="stranger", audience=setup.audience)
    assert has_grant.status_code == no_grant.status_code == 403
    assert has_grant.json() == no_grant.json() == {"error": "access_denied", "error_description": "the policy does not allow this release"}

    # another backend's scopes, another audience
    for resp in (release(gw, "alice", backend="reports", audience=setup.audience, scope="notes.write"),
                 release(gw, "nobody", backend="reports", audience=setup.audience, scope="notes.write"),
                 release(gw, "alice", audience="billing")):
        assert resp.status_code == 403 and resp.json()["error"] == "access_denied"
    reasons = [line["result"]["reason"] for line in decisions(gw)]
    assert decisions(gw)[0]["shadow_result"]["reason"] == "vault_backend_unknown"  # the shadow judged it too
    assert "shadow_result" not in decisions(gw)[2]  # and agrees elsewhere
    assert reasons[:5] == ["vault_backend_not_allowed"] * 2 + ["vault_scope_not_allowed"] * 2 + ["vault_audience_not_allowed"]

    # a logged vault decision explains like any other: decided again, each check with its value
    first = decisions(gw)[0]
    explained = subprocess.run([sys.executable, "-m", "gateway.cli", "explain", "--config", str(gw.config_path), "--decision-id",
                                first["decision_id"], "--log", yaml.safe_load(gw.config_path.read_text())["decision_log"]],
                               cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **setup.env, "TEST_VAULT_KEYS": KEY1})
    assert explained.returncode == 0, explained.stdout + explained.stderr
    assert "the same decision as logged" in explained.stdout and '"vault_backend_not_allowed"' in explained.stdout

    # a candidate policy that lets the stranger in shows up in a replay of these lines
    candidate = setup.tmp / "candidate-authz.yaml"
    candidate.write_text(yaml.safe_dump({"authz": {"vault": {"backends": {
        "stranger": {"audiences": [setup.audience], "scopes": ["notes.read"]},
        "notes-sync": {"audiences": [setup.audience], "scopes": ["notes.read", "notes.write"]},
        "reports": {"audiences": [setup.audience], "scopes": ["notes.read"]}}}}}))
    replayed = subprocess.run([sys.executable, "-m", "gateway.cli", "policy", "replay", "--log",
                               yaml.safe_load(gw.config_path.read_text())["decision_log"], "--bundle", str(ROOT / "policies"),
                               "--data", NOTES_DATA, "--data", str(candidate)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert replayed.returncode == 3, replayed.stdout + replayed.stderr
    assert "vault backend=stranger" in replayed.stdout and "release/allowed" in replayed.stdout

    # an allowed backend may learn that a user has no grant
    missing = release(gw, "nobody", audience=setup.audience)
    assert missing.status_code == 400 and missing.json()["error"] == "invalid_grant"

    # not a registered backend, or a wrong secret: 401 before the policy is asked
    for resp in (release(gw, "alice", backend="intruder", audience=setup.audience),
                 release(gw, "alice", audience=setup.audience, secret="not-the-secret-0123456")):
        assert resp.status_code == 401 and resp.json()["error"] == "invalid_client"
        assert resp.headers["www-authenticate"].startswith("Basic")
    # hostile bodies: a parameter twice, control characters, no reason, garbage
    dup = httpx.post(gw.base + "/vault/token", content="subject=alice&subject=bob&audience=a&scope=notes.read&reason=r",
                     headers={"Content-Type": "application/x-www-form-urlencoded"}, auth=("notes-sync", SECRETS["notes-sync"]))
    assert dup.status_code == 400
    ctl = httpx.post(gw.base + "/vault/token", json={"subject": "alice\n", "audience": setup.audience, "scope": "notes.read", "reason": "r"},
                     auth=("notes-sync", SECRETS["notes-sync"]))
    assert ctl.status_code == 400 and ctl.json()["error"] == "invalid_request"
    for hostile in ('{"subject": "alice", "subject": "bob", "audience": "a", "scope": "notes.read", "reason": "r"}',
                    '{"subject": "\\ud800", "audience": "%s", "scope": "notes.read", "reason": "r"}' % setup.audience,
                    '{"subject": "alice", "audience": "%s", "scope": "notes.read", "reason": NaN}' % setup.audience):
        odd = httpx.post(gw.base + "/vault/token", content=hostile, headers={"Content-Type": "application/json"},
                         auth=("notes-sync", SECRETS["notes-sync"]))
        assert odd.status_code == 400 and odd.json()["error"] == "invalid_request", (hostile, odd.text)
    no_reason = httpx.post(gw.base + "/vault/token", json={"subject": "alice", "audience": setup.audience, "scope": "notes.read"},
                           auth=("notes-sync", SECRETS["notes-sync"]))
    assert no_reason.status_code == 400
    garbage = httpx.post(gw.base + "/vault/token", content=b"\xff" * 100, headers={"Content-Type": "application/json"},
                         auth=("notes-sync", SECRETS["notes-sync"]))
    assert garbage.status_code == 400
    huge = httpx.post(gw.base + "/vault/token", content=b"a=" + b"x" * 20_000, headers={"Content-Type": "application/x-www-form-urlencoded"},
                      auth=("notes-sync", SECRETS["notes-sync"]))
    assert huge.status_code == 413
    # a user's grants are theirs: no token, a foreign token
    assert httpx.get(gw.base + "/vault/grants").status_code == 401
    foreign = setup.idp.token("alice", audience=["someone-else"])
    assert httpx.get(gw.base + "/vault/grants", headers={"Authorization": f"Bearer {foreign}"}).status_code == 401
    metrics = httpx.get(gw.base + "/metrics").text
    assert 'mcp_gateway_vault_releases_total{result="refused"} 5.0' in metrics
    assert 'mcp_gateway_vault_releases_total{result="vault_no_grant"} 1.0' in metrics
    assert 'mcp_gateway_vault_releases_total{result="vault_client_unauthenticated"} 2.0' in metrics
    assert 'result="vault_bad_request"' in metrics and "vault_backend_not_allowed" not in metrics  # policy reasons are no labels


# --- 3. Rotation: single-use refresh tokens, two releases at once -------------------------

def test_concurrent_releases_refresh_once_and_the_vault_keeps_the_rotated_token(nextcloud_setup: VaultSetup, gateways: Any) -> None:
    setup = nextcloud_setup
    db = setup.tmp / "rotation.db"
    gw = setup.start(gateways, setup.config({"path": str(db)}))
    user_tokens = sign_in(gw, "dora")
    [first] = stored_refresh_tokens(db, b"1" * 32)
    before = setup.idp.stats()["refresh_grants"]

    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=20) as http:
            body = {"subject": "dora", "audience": setup.audience, "scope": "notes.read", "reason": "two jobs at once"}
            auth = ("notes-sync", SECRETS["notes-sync"])
            return list(await asyncio.gather(*(http.post(gw.base + "/vault/token", data=body, auth=auth) for _ in range(2))))

    one, two = asyncio.run(both())
    assert one.status_code == two.status_code == 200, (one.text, two.text)
    assert one.json()["access_token"] == two.json()["access_token"]
    assert setup.idp.stats()["refresh_grants"] == before + 1  # one refresh for both
    [second] = stored_refresh_tokens(db, b"1" * 32)
    assert second != first  # the rotated one is what the vault holds

    # the vault's new token works (another scope set: not cached, a real refresh) ...
    write = release(gw, "dora", audience=setup.audience, scope="notes.write")
    assert write.status_code == 200, write.text
    [third] = stored_refresh_tokens(db, b"1" * 32)
    # ... and so does the client's own refresh, through the same grant
    client = httpx.post(gw.base + "/oauth/token", data={"grant_type": "refresh_token", "refresh_token": user_tokens["refresh_token"],
                                                        "client_id": user_tokens["client_id"]})
    assert client.status_code == 200, client.text
    assert stored_refresh_tokens(db, b"1" * 32) != [third]

    # the old refresh token is dead at the IdP (and, single-use, its reuse ends the grant there) ...
    dead = idp_refresh(setup.idp, first)
    assert dead.status_code == 400 and dead.json()["error"] == "invalid_grant"
    # ... whereupon the IdP calls the vault's token invalid too: the entry is removed
    after = release(gw, "dora", audience=setup.audience, scope="notes.read notes.write")
    assert after.status_code == 400 and after.json()["error"] == "invalid_grant"
    assert stored_refresh_tokens(db, b"1" * 32) == []
    assert 'mcp_gateway_vault_refresh_failures_total{reason="invalid_grant"} 1.0' in httpx.get(gw.base + "/metrics").text


# --- 4. The user, and the operator, revoke -----------------------------------------------

def test_revocation_by_the_user_and_by_the_operator_takes_effect_at_once(keycloak_setup: VaultSetup, gateways: Any) -> None:
    setup = keycloak_setup
    db = setup.tmp / "revoke.db"
    gw = setup.start(gateways, setup.config({"path": str(db)}))
    erin = sign_in(gw, "erin")
    assert release(gw, "erin", audience=setup.audience).status_code == 200  # a token is cached now
    [erin_rt] = stored_refresh_tokens(db, b"1" * 32)

    auth = {"Authorization": f"Bearer {erin['access_token']}"}
    [grant] = httpx.get(gw.base + "/vault/grants", headers=auth).json()["grants"]
    assert httpx.delete(gw.base + "/vault/grants/not-a-grant", headers=auth).status_code == 404
    gone = httpx.delete(gw.base + f"/vault/grants/{grant['id']}", headers=auth)
    assert gone.status_code == 200 and gone.json() == {"revoked": 1, "revoked_at_idp": 1}
    assert httpx.get(gw.base + "/vault/grants", headers=auth).json()["grants"] == []
    refused = release(gw, "erin", audience=setup.audience)  # the cached token is not handed out any more
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"
    assert idp_refresh(setup.idp, erin_rt).json()["error"] == "invalid_grant"  # revoked at the IdP

    # a client that logs out (revokes its refresh handle) revokes its grant too
    lena = sign_in(gw, "lena")
    logout = httpx.post(gw.base + "/oauth/revoke", data={"token": lena["refresh_token"], "token_type_hint": "refresh_token",
                                                         "client_id": lena["client_id"]})
    assert logout.status_code == 200
    assert httpx.get(gw.base + "/vault/grants", headers={"Authorization": f"Bearer {lena['access_token']}"}).json()["grants"] == []

    # the operator, from another process, while the gateway holds a cached token for frank
    sign_in(gw, "frank")
    assert release(gw, "frank", audience=setup.audience).status_code == 200
    listed = vault_cli(setup, gw, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [g["subject"] for g in json.loads(listed.stdout)] == ["frank"]
    done = vault_cli(setup, gw, "revoke", "--subject", "frank")
    assert done.returncode == 0 and "revoked 1 grant(s); the IdP confirmed 1" in done.stdout, done.stdout + done.stderr
    refused = release(gw, "frank", audience=setup.audience)
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"


# --- 5. Keys: rotation keeps every entry readable; nothing in clear at rest ---------------

@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_key_rotation_keeps_every_grant_readable_and_no_refresh_token_is_stored_in_clear(
        store: str, keycloak_setup: VaultSetup, gateways: Any, request: pytest.FixtureRequest) -> None:
    setup = keycloak_setup
    db = setup.tmp / f"keys-{secrets.token_hex(3)}.db"
    prefix = f"keys-{secrets.token_hex(3)}:"
    redis = request.getfixturevalue("redis_server") if store == "redis" else None
    store_cfg = {"store": "redis", "url": redis.url, "key_prefix": prefix} if redis else {"path": str(db)}
    gw = setup.start(gateways, setup.config(store_cfg))
    users = ["gina", "hugo"]
    for user in users:
        sign_in(gw, user)
        assert release(gw, user, audience=setup.audience).status_code == 200

    def at_rest() -> bytes:
        """Every byte the store keeps: the SQLite file with its WAL, or Redis's whole database
        saved uncompressed (SAVE into its own directory)."""
        if redis is None:
            return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
        import redis as redis_py

        with redis_py.Redis.from_url(redis.url) as client:
            client.config_set("rdbcompression", "no")
            client.save()
            return (Path(client.config_get("dir")["dir"]) / client.config_get("dbfilename")["dbfilename"]).read_bytes()

    tokens = stored_refresh_tokens(db, b"1" * 32) if redis is None else redis_refresh_tokens(redis.url, prefix, b"1" * 32)
    assert len(tokens) == 2
    dump = at_rest()
    assert b"gina" in dump and b"hugo" in dump  # the search is over the right bytes
    for token in tokens:
        assert token.encode() not in dump
    # the field name never shows either (the sealed JSON holds it); other stores in the same
    # Redis may name the grant type (a client registration's grant_types)
    assert b"refresh_token" not in (dump if redis is None else redis.command("HVALS", prefix + "grants").encode())

    # the operator puts a new key first and re-encrypts; then the old key can go
    both = f"{KEY2},{KEY1}"
    rotated = vault_cli(setup, gw, "rotate-key", keys=both)
    assert rotated.returncode == 0 and "re-encrypted 2 grant(s) under key k2" in rotated.stdout, rotated.stdout + rotated.stderr
    assert {g["key_id"] for g in json.loads(vault_cli(setup, gw, "list", "--json", keys=KEY2).stdout)} == {"k2"}
    # a gateway holding only the new key serves every user (not from any cache: a new process)
    fresh = setup.start(gateways, gw_config(gw), keys=KEY2, replica="new-key")
    for user in users:
        resp = release(fresh, user, audience=setup.audience, scope="notes.read notes.write")
        assert resp.status_code == 200, resp.text
    # the old key alone opens nothing any more: check says so, the release is a 503, nothing is deleted
    old_only = subprocess.run([sys.executable, "-m", "gateway.cli", "check", "--config", str(gw.config_path)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120, env={**os.environ, **setup.env, "TEST_VAULT_KEYS": KEY1})
    assert old_only.returncode == 2 and "vault.keys: 2 grant(s) are sealed under keys no longer configured" in old_only.stderr
    stale = release(gw, "gina", audience=setup.audience, scope="notes.write")
    assert stale.status_code == 503
    assert len(json.loads(vault_cli(setup, gw, "list", "--json", keys=KEY2).stdout)) == 2


def gw_config(gw: GatewayProcess) -> dict[str, Any]:
    cfg = yaml.safe_load(gw.config_path.read_text())
    for key in ("public_url", "listen", "upstream", "profile"):
        cfg.pop(key, None)
    cfg["policy"].pop("engine", None)
    return cfg


# --- 6. The IdP is down ------------------------------------------------------------------

def test_idp_down_is_a_503_and_deletes_nothing(tmp_path: Path, gateways: Any) -> None:
    idp = _start_idp("nextcloud", tmp_path)
    api = _verifying_api(tmp_path / "api", idp)
    try:
        setup = VaultSetup("nextcloud", idp, api, nextcloud_env(idp), IDP_CLIENT[0], tmp_path)
        gw = setup.start(gateways, setup.config({"path": str(tmp_path / "down.db")}))
        sign_in(gw, "ivan")
        assert release(gw, "ivan", audience=setup.audience).status_code == 200
        idp.proc.terminate()
        idp.proc.wait(10)
        down = release(gw, "ivan", audience=setup.audience, scope="notes.write")
        assert down.status_code == 503 and down.json()["error"] == "temporarily_unavailable"
        assert len(stored_refresh_tokens(tmp_path / "down.db", b"1" * 32)) == 1
        assert 'mcp_gateway_vault_refresh_failures_total{reason="unavailable"} 1.0' in httpx.get(gw.base + "/metrics").text
    finally:
        idp.proc.kill()
        api.proc.terminate()


# --- 7. mode: delegate ----------------------------------------------------------------

def test_delegate_mode_forwards_a_vault_token_never_the_clients(nextcloud_setup: VaultSetup, gateways: Any) -> None:
    setup = nextcloud_setup
    profile = yaml.safe_load((ROOT / "profiles" / "nextcloud-oidc.yaml").read_text())
    profile_text = yaml.safe_dump({**profile, "mode": "delegate",
                                   "vault": {"offline_access": True, "release": "refresh",
                                             "delegate": {"audience": [IDP_CLIENT[0]], "scope": ["notes.read", "notes.write"]}}})
    path = setup.tmp / "delegate-profile.yaml"
    path.write_text(profile_text)
    gw = setup.start(gateways, {**setup.config({"path": str(setup.tmp / "delegate.db")}), "profile": str(path)})
    user = sign_in(gw, "judy", scope="notes.read")
    setup.api.clear()
    resp = httpx.post(gw.mcp_url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                      headers={"Authorization": f"Bearer {user['access_token']}", "Accept": "application/json, text/event-stream",
                               "MCP-Protocol-Version": "2025-11-25"})
    assert resp.status_code == 200, resp.text
    seen = setup.api.requests()[-1]
    forwarded = dict(seen["headers"])["authorization"].split(" ", 1)[1]
    assert forwarded != user["access_token"]
    assert seen["verify_error"] is None and seen["claims"]["sub"] == "judy"
    assert seen["claims"]["scope"].split() == ["notes.read"]  # only what the client's own token holds

    # the user revokes: the next request has no token to delegate (the cached one is dropped at once)
    auth = {"Authorization": f"Bearer {user['access_token']}"}
    assert httpx.delete(gw.base + "/vault/grants", headers=auth).json()["revoked"] == 1
    revoked = httpx.post(gw.mcp_url, json={"jsonrpc": "2.0", "id": 3, "method": "tools/list"},
                         headers={**auth, "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-11-25"})
    assert revoked.status_code == 401 and revoked.json()["error"]["data"]["reason"] == "vault_no_grant"

    # a user without a grant is sent to sign in again (401 with a challenge)
    stranger = setup.idp.token("kim", scope="openid notes.read", resource=gw.resource)
    again = httpx.post(gw.mcp_url, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
                       headers={"Authorization": f"Bearer {stranger}", "Accept": "application/json, text/event-stream",
                                "MCP-Protocol-Version": "2025-11-25"})
    assert again.status_code == 401 and "invalid_token" in again.headers["www-authenticate"]
    assert again.json()["error"]["data"]["reason"] == "vault_no_grant"


def test_guessing_backend_secrets_from_one_address_is_slowed_down(nextcloud_setup: VaultSetup, gateways: Any) -> None:
    setup = nextcloud_setup
    gw = setup.start(gateways, setup.config({"path": str(setup.tmp / "guess.db")}, failed_auth_per_address_per_minute=3))
    for _ in range(3):
        assert release(gw, "alice", audience=setup.audience, secret="guess-0123456789abcdef").status_code == 401
    blocked = release(gw, "alice", audience=setup.audience)  # even the right secret waits now
    assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) >= 1
    assert blocked.json()["error"] == "temporarily_unavailable"
    assert 'mcp_gateway_vault_releases_total{result="vault_client_blocked"} 1.0' in httpx.get(gw.base + "/metrics").text


def test_two_replicas_sharing_redis_never_spend_a_single_use_refresh_token_twice(nextcloud_setup: VaultSetup, gateways: Any,
                                                                                 redis_server: Any) -> None:
    """Releases racing on two replicas: each refreshes under the one lock in Redis, so the
    rotated refresh token one stored is the one the other uses (else the IdP sees a consumed
    token reused, revokes the whole grant, and the user's entry is gone)."""
    setup = nextcloud_setup
    prefix = f"replicas-{secrets.token_hex(3)}:"
    config = setup.config({"store": "redis", "url": redis_server.url, "key_prefix": prefix})
    a = setup.start(gateways, config, replica="a")
    b = setup.start(gateways, config, replica="b")
    sign_in(a, "mona")
    before = setup.idp.stats()["refresh_grants"]
    # distinct scope sets: no replica can answer from its memory, every release is a refresh
    asks = [(gw, scope) for scope in ("notes.read", "notes.write", "notes.read notes.write") for gw in (a, b)]

    async def race() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as http:
            return list(await asyncio.gather(*(
                http.post(gw.base + "/vault/token", auth=("notes-sync", SECRETS["notes-sync"]),
                          data={"subject": "mona", "audience": setup.audience, "scope": scope, "reason": "race"})
                for gw, scope in asks)))

    answers = asyncio.run(race())
    assert [r.status_code for r in answers] == [200] * len(asks), [r.text for r in answers]
    assert setup.idp.stats()["refresh_grants"] - before >= 3  # real refreshes, one after the other
    [rt] = redis_refresh_tokens(redis_server.url, prefix, b"1" * 32)
    assert idp_refresh(setup.idp, rt).status_code == 200  # what the vault holds is alive at the IdP


def test_a_later_narrower_sign_in_does_not_hide_an_earlier_grants_scopes(nextcloud_setup: VaultSetup, gateways: Any) -> None:
    setup = nextcloud_setup
    gw = setup.start(gateways, setup.config({"path": str(setup.tmp / "narrower.db")}))
    sign_in(gw, "nina", scope="notes.read notes.write")
    sign_in(gw, "nina", scope="notes.read")  # the newest grant holds less
    write = release(gw, "nina", audience=setup.audience, scope="notes.write")
    assert write.status_code == 200, write.text
    assert claims_of(write.json()["access_token"])["scope"].split() == ["notes.write"]
    sign_in(gw, "omar", scope="notes.read")
    lacking = release(gw, "omar", audience=setup.audience, scope="notes.write")  # no grant of omar's has it
    assert lacking.status_code == 400 and lacking.json()["error"] == "invalid_scope"
    assert release(gw, "omar", audience=setup.audience, scope="notes.read").status_code == 200  # nothing was removed
