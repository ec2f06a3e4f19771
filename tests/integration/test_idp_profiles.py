"""The shipped profiles end to end against a real OpenID provider (tests/idp).

Keycloak-shaped: exchange mode, the upstream (a backend verifying tokens against the
same provider) must receive an exchanged token, never the client's. Nextcloud-shaped:
pass-through with at+JWT and opaque tokens (introspection).
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import IDP_CLIENT, free_port
from tests.integration.test_gateway_e2e import LIST, mcp_client, post, reason

ROOT = Path(__file__).resolve().parents[2]


def keycloak_env(idp) -> dict[str, str]:
    return {"KEYCLOAK_ISSUER": idp.issuer, "MCP_CLIENT_ID": IDP_CLIENT[0], "MCP_CLIENT_SECRET": IDP_CLIENT[1]}


def nextcloud_env(idp) -> dict[str, str]:
    return {"NEXTCLOUD_URL": idp.issuer, "MCP_CLIENT_ID": IDP_CLIENT[0], "MCP_CLIENT_SECRET": IDP_CLIENT[1]}


def claims_of(jwt: str) -> dict[str, Any]:
    part = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def upstream_tokens(upstream) -> list[str]:
    return [a.split(" ", 1)[1] for a in upstream.authorizations() if a]


@pytest.fixture()
def keycloak_gateway(gateways, keycloak_idp, backend_upstream):
    keycloak_idp.reset()
    backend_upstream.clear()
    return gateways.start(profile="keycloak", upstream_url=backend_upstream.url, env=keycloak_env(keycloak_idp))


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_keycloak_exchange_upstream_gets_backend_token(keycloak_gateway, keycloak_idp, backend_upstream, mode) -> None:
    client_token = keycloak_idp.token("alice")
    assert claims_of(client_token)["aud"] == ["nextcloud-mcp-server", "account"]
    async with mcp_client(keycloak_gateway.mcp_url, client_token, mode) as client:
        tools = await client.list_tools()
        assert "create_note" in {t.name for t in tools.tools}
        assert not (await client.call_tool("create_note", {"title": "x"})).is_error
    seen = backend_upstream.requests()
    assert seen and all(r["verify_error"] is None for r in seen)  # the backend verified what it got
    for r in seen:
        assert r["claims"]["aud"] == "nextcloud"  # the backend audience, from the exchange
        assert r["claims"]["sub"] == "alice"  # same user
        assert r["claims"]["azp"] == "nextcloud-mcp-server"  # obtained by the gateway's client
    assert client_token not in upstream_tokens(backend_upstream)


def test_exchanged_token_never_reaches_the_client(keycloak_gateway, keycloak_idp, backend_upstream) -> None:
    resp = post(keycloak_gateway.mcp_url, keycloak_idp.token("alice"), LIST)
    assert resp.status_code == 200
    exchanged = upstream_tokens(backend_upstream)[-1]
    assert exchanged not in resp.text and all(exchanged not in v for v in resp.headers.values())
    assert exchanged not in keycloak_gateway.log()


async def test_fifty_calls_one_exchange(keycloak_gateway, keycloak_idp, backend_upstream) -> None:
    token = keycloak_idp.token("bob")
    async with httpx.AsyncClient(timeout=20) as http:
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        # concurrently: single-flight must turn 50 simultaneous misses into one exchange
        answers = await asyncio.gather(*(http.post(keycloak_gateway.mcp_url, json=LIST, headers=headers) for _ in range(50)))
    assert {a.status_code for a in answers} == {200}
    assert keycloak_idp.stats()["exchanges"] == 1
    assert len(set(upstream_tokens(backend_upstream))) == 1


DOWNSCOPE_POLICY = """package mcp.gateway

# Exchange for exactly the scopes the called tool needs (policy data: data.tool_scopes).
default decision := {"action": "reject", "reason": "unknown_tool", "status": 403}

decision := {"action": "exchange", "reason": "allowed", "audience": ["nextcloud"], "scopes": scopes} if {
	scopes := data.tool_scopes[input.mcp.tool]
}

decision := {"action": "exchange", "reason": "allowed", "audience": ["nextcloud"], "scopes": ["notes.read"]} if {
	input.mcp.method != "tools/call"
}
"""


def test_per_tool_down_scoping(gateways, keycloak_idp, backend_upstream, tmp_path) -> None:
    (tmp_path / "policy.rego").write_text(DOWNSCOPE_POLICY)
    (tmp_path / "data.yaml").write_text(
        "tool_scopes:\n  list_notes: [notes.read]\n  read_note: [notes.read]\n  create_note: [notes.write]\n  delete_note: [notes.write]\n"
    )
    gw = gateways.start(profile="keycloak", upstream_url=backend_upstream.url, env=keycloak_env(keycloak_idp), policy_bundle=tmp_path)
    token = keycloak_idp.token("carol", scope="openid notes.read notes.write")
    backend_upstream.clear()
    read = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "list_notes", "arguments": {}}}
    write = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "create_note", "arguments": {"title": "t"}}}
    assert post(gw.mcp_url, token, read).status_code == 200
    assert post(gw.mcp_url, token, write).status_code == 200
    scopes = [r["claims"]["scope"] for r in backend_upstream.requests()]
    assert scopes == ["notes.read", "notes.write"]  # a token for reading cannot write
    # a client token without notes.write cannot be exchanged into one that has it
    reader = keycloak_idp.token("dave", scope="openid notes.read")
    refused = post(gw.mcp_url, reader, write)
    assert refused.status_code == 403 and reason(refused) == "exchange_invalid_scope"


def test_idp_down_during_exchange_is_503_and_nothing_forwarded(gateways, keycloak_idp, backend_upstream) -> None:
    env = {**keycloak_env(keycloak_idp), "KEYCLOAK_TOKEN_ENDPOINT": f"http://127.0.0.1:{free_port()}/token"}
    gw = gateways.start(profile="keycloak", upstream_url=backend_upstream.url, env=env)
    backend_upstream.clear()
    resp = post(gw.mcp_url, keycloak_idp.token("erin"), LIST)
    assert resp.status_code == 503
    assert reason(resp) == "exchange_unavailable"
    assert backend_upstream.requests() == []


def test_idp_failing_exchange_is_not_hammered(keycloak_gateway, keycloak_idp, backend_upstream) -> None:
    keycloak_idp.exchange_mode("fail500")
    try:
        token = keycloak_idp.token("frank")
        statuses = [post(keycloak_gateway.mcp_url, token, LIST).status_code for _ in range(10)]
        assert set(statuses) == {502}
        assert backend_upstream.requests() == []
    finally:
        keycloak_idp.exchange_mode("ok")
    # the failing IdP was asked once: the other nine were answered from the remembered failure
    assert keycloak_idp.stats()["exchange_attempts"] == 1


def test_malformed_exchange_answer_is_502(gateways, keycloak_idp, backend_upstream) -> None:
    # a gateway of its own: the failure remembered by the previous test must not answer here
    gw = gateways.start(profile="keycloak", upstream_url=backend_upstream.url, env={**keycloak_env(keycloak_idp), "INSTANCE": "malformed"})
    backend_upstream.clear()
    keycloak_idp.exchange_mode("malformed")
    try:
        resp = post(gw.mcp_url, keycloak_idp.token("gina"), LIST)
    finally:
        keycloak_idp.exchange_mode("ok")
    assert resp.status_code == 502 and reason(resp) == "exchange_bad_response"
    assert backend_upstream.requests() == []


def test_subject_token_not_for_the_gateway_is_refused_by_audience(keycloak_gateway, keycloak_idp, backend_upstream) -> None:
    token = keycloak_idp.token("hank", audience=["account"])
    assert claims_of(token)["aud"] == ["account"]  # one audience, not a list of its letters
    resp = post(keycloak_gateway.mcp_url, token, LIST)
    assert resp.status_code == 401 and reason(resp) == "audience_not_accepted"
    assert keycloak_idp.stats()["exchanges"] == 0 and backend_upstream.requests() == []


# --- Nextcloud-shaped: pass-through, at+JWT and opaque tokens ---------------------------


@pytest.fixture()
def nextcloud_gateway(gateways, nextcloud_idp, nextcloud_upstream):
    nextcloud_upstream.clear()
    return gateways.start(profile="nextcloud-oidc", upstream_url=nextcloud_upstream.url, env=nextcloud_env(nextcloud_idp))


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_nextcloud_jwt_for_the_resource_passes_through(nextcloud_gateway, nextcloud_idp, nextcloud_upstream, mode) -> None:
    token = nextcloud_idp.token("alice", resource=nextcloud_gateway.resource)
    assert claims_of(token)["aud"] == nextcloud_gateway.resource
    async with mcp_client(nextcloud_gateway.mcp_url, token, mode) as client:
        assert "list_notes" in {t.name for t in (await client.list_tools()).tools}
    assert set(upstream_tokens(nextcloud_upstream)) == {token}


def test_nextcloud_jwt_for_another_resource_refused(nextcloud_gateway, nextcloud_idp, nextcloud_upstream) -> None:
    resp = post(nextcloud_gateway.mcp_url, nextcloud_idp.token("alice", resource="http://127.0.0.1:1/other/mcp"), LIST)
    assert resp.status_code == 401 and reason(resp) == "audience_not_accepted"
    assert nextcloud_upstream.requests() == []


def test_nextcloud_opaque_token_introspected_and_passed_through(nextcloud_gateway, nextcloud_idp, nextcloud_upstream) -> None:
    token = nextcloud_idp.token("olivia", format="opaque")
    assert token.count(".") == 0
    resp = post(nextcloud_gateway.mcp_url, token, LIST)
    assert resp.status_code == 200, resp.text
    assert upstream_tokens(nextcloud_upstream) == [token]
    assert "sub='olivia' kind=opaque" in nextcloud_gateway.log()


def test_revoked_opaque_token_is_401(nextcloud_gateway, nextcloud_idp, nextcloud_upstream) -> None:
    token = nextcloud_idp.token("paul", format="opaque")
    assert nextcloud_idp.revoke(token)
    resp = post(nextcloud_gateway.mcp_url, token, LIST)
    assert resp.status_code == 401 and reason(resp) == "token_inactive"
    assert 'error="invalid_token"' in resp.headers["www-authenticate"]
    assert nextcloud_upstream.requests() == []


def test_opaque_token_of_another_client_is_inactive_for_us(nextcloud_gateway, nextcloud_idp, nextcloud_upstream) -> None:
    token = nextcloud_idp.token("quinn", format="opaque", client=("other-client", "other-secret"))
    resp = post(nextcloud_gateway.mcp_url, token, LIST)
    assert resp.status_code == 401 and reason(resp) == "token_inactive"


def test_revocation_seen_after_the_cache_ceiling(gateways, nextcloud_idp, nextcloud_upstream, tmp_path) -> None:
    text = (ROOT / "profiles" / "nextcloud-oidc.yaml").read_text().replace("cache_ceiling: 60", "cache_ceiling: 0")
    (tmp_path / "nc.yaml").write_text(text)
    gw = gateways.start(profile=str(tmp_path / "nc.yaml"), upstream_url=nextcloud_upstream.url, env=nextcloud_env(nextcloud_idp))
    token = nextcloud_idp.token("rita", format="opaque")
    assert post(gw.mcp_url, token, LIST).status_code == 200
    nextcloud_idp.revoke(token)
    assert post(gw.mcp_url, token, LIST).status_code == 401


# --- The five audience rules of docs/profiles.md, as profile data, against real tokens -

RULES = {
    "A_strict": {"accept": ["nextcloud-mcp-server"], "missing": "reject"},
    "B_flexible": {"accept": ["*"], "reject": ["nextcloud"], "missing": "accept"},
    "C_resource_too": {"accept": ["nextcloud-mcp-server", "{resource}"], "reject": ["nextcloud"], "missing": "accept"},
    "D_unified": {"accept": ["nextcloud-mcp-server", "{public_url}", "{resource}"], "match": "all", "missing": "reject"},
    "E_fallback": {"accept": ["nextcloud-mcp-server", "{public_url}", "{resource}"], "match": "all", "missing": "claim:client_id"},
}
OK = "allowed"
EXPECTED = {  # token shape → the outcome under A..E
    "string_aud": [OK, OK, OK, OK, OK],
    "list_aud": [OK, OK, OK, "audience_not_accepted", "audience_not_accepted"],
    "no_aud": ["audience_missing", OK, OK, "audience_missing", OK],
    "nextcloud_aud": [OK, "audience_forbidden", "audience_forbidden", "audience_not_accepted", "audience_not_accepted"],
    "resource_aud": ["audience_not_accepted", OK, OK, OK, OK],
    "foreign_aud": ["audience_not_accepted", OK, "audience_not_accepted", "audience_not_accepted", "audience_not_accepted"],
}


@pytest.mark.parametrize("rule_index,rule", list(enumerate(RULES)))
def test_audience_rules_table(gateways, nextcloud_idp, nextcloud_upstream, rule_index, rule) -> None:
    profile = {
        "name": f"rule-{rule}",
        "issuer": nextcloud_idp.issuer,
        "token_kinds": ["jwt", "opaque"],
        "claims": {"client": ["client_id", "azp"]},
        "audience": RULES[rule],
        "introspection": {"client": {"client_id": IDP_CLIENT[0], "client_secret": IDP_CLIENT[1]}, "cache_ceiling": 0},
    }
    gw = gateways.start(profile=profile, upstream_url=nextcloud_upstream.url)
    tokens = {
        "string_aud": nextcloud_idp.token(),  # aud = the client id (a string)
        "list_aud": nextcloud_idp.token(audience=["nextcloud-mcp-server", "account"]),
        "no_aud": nextcloud_idp.token(format="opaque", no_aud=True),
        "nextcloud_aud": nextcloud_idp.token(audience=["nextcloud-mcp-server", "nextcloud"]),
        "resource_aud": nextcloud_idp.token(resource=gw.resource),
        "foreign_aud": nextcloud_idp.token(resource="http://127.0.0.1:1/elsewhere/mcp"),
    }
    outcomes = {}
    for shape, token in tokens.items():
        resp = post(gw.mcp_url, token, LIST)
        outcomes[shape] = OK if resp.status_code == 200 else reason(resp)
    assert outcomes == {shape: row[rule_index] for shape, row in EXPECTED.items()}


def test_one_users_failing_exchange_does_not_block_another(keycloak_gateway, keycloak_idp, backend_upstream) -> None:
    """Before: one user's IdP 5xx blocked every user's exchange for failure_ttl."""
    keycloak_idp.exchange_mode("fail500")
    try:
        assert post(keycloak_gateway.mcp_url, keycloak_idp.token("ivan"), LIST).status_code == 502
    finally:
        keycloak_idp.exchange_mode("ok")
    assert post(keycloak_gateway.mcp_url, keycloak_idp.token("judy"), LIST).status_code == 200


def test_random_opaque_strings_are_rate_limited_per_address(gateways, nextcloud_idp, nextcloud_upstream) -> None:
    """Before: each random bearer string cost one introspection call, without bound."""
    gw = gateways.start(profile="nextcloud-oidc", upstream_url=nextcloud_upstream.url, env=nextcloud_env(nextcloud_idp),
                        config={"caches": {"introspections_per_address_per_minute": 3}})
    answers = [post(gw.mcp_url, f"random-string-{i}-" + "x" * 40, LIST) for i in range(6)]
    # three were checked at the IdP (inactive), the rest refused unchecked with Retry-After
    assert [a.status_code for a in answers] == [401, 401, 401, 429, 429, 429]
    assert all(reason(a) == "token_inactive" for a in answers[:3]) and answers[3].headers["retry-after"]
    again = post(gw.mcp_url, "random-string-0-" + "x" * 40, LIST)  # remembered as inactive: no call, no bucket
    assert again.status_code == 401 and reason(again) == "token_inactive"
