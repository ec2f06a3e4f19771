"""No request can make a decision expensive or hold the event loop (hardening item 1).

- The audience rules are checked in Python before the body is read; they agree with the
  Rego policy on generated rules and tokens.
- The policy input has a budget (bytes, values): a request over it is refused 413 before
  any engine runs; the default body limit is 256 KiB.
- The attack that stalled `/healthz` for 7 s (a 269 KB `tools/call` with a 40,000-element
  array, a token for another resource) is refused at once, and health stays responsive
  while requests at the edge of the budget are decided.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.auth.audience import audience_problem
from gateway.policy.bundle import load_bundle
from gateway.policy.input import over_budget
from gateway.policy.wasm import WasmEngine, WasmPolicy
from gateway.policy.wasmbuild import wasm_for
from tests.conftest import ROOT, make_profile
from tests.unit.test_policy import policy_input, profile, token

ENTRY = "mcp/gateway/decision"
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
NOTES = str(ROOT / "examples" / "notes-authz.yaml")


@pytest.fixture(scope="module")
def wasm() -> WasmEngine:
    bundle = load_bundle(ROOT / "policies")
    return WasmEngine(WasmPolicy(wasm_for(bundle, ENTRY)[0], bundle.data, ENTRY), ENTRY)


patterns = st.sampled_from(["mcp-client", "nextcloud", "*", "{resource}", "{public_url}", "account"])
audiences = st.one_of(st.none(), st.sampled_from(["mcp-client", "nextcloud", "account", "http://gw.example/mcp"]),
                      st.lists(st.sampled_from(["mcp-client", "nextcloud", "account", "http://gw.example", "x"]), max_size=3))


@settings(max_examples=300, deadline=None)
@given(accept=st.lists(patterns, max_size=3), reject=st.lists(patterns, max_size=2), match=st.sampled_from(["any", "all"]),
       missing=st.sampled_from(["reject", "accept", "claim:client_id", "claim:azp"]), aud=audiences,
       client_id=st.sampled_from([None, "mcp-client", "nextcloud"]))
def test_the_audience_precheck_agrees_with_the_policy(wasm: WasmEngine, accept: list[str], reject: list[str], match: str,
                                                      missing: str, aud: Any, client_id: str | None) -> None:
    prof = profile({"accept": accept, "reject": reject, "match": match, "missing": missing})
    tok = token(aud, **({"client_id": client_id} if client_id else {}))
    reason = wasm.evaluate(policy_input(tok, prof))["reason"]
    ours = audience_problem(prof.audience, tok)
    assert ours == (reason if reason.startswith("audience_") else None), (reason, ours)


def test_budget_counts_values_and_bytes() -> None:
    assert over_budget({"a": list(range(100))}, 10_000, 200) is None
    assert over_budget({"a": list(range(300))}, 10_000, 200) == "more than 200 values"
    assert over_budget({"a": "x" * 20_000}, 10_000, 200) == "more than 10000 bytes"
    assert over_budget({"a": [[[[[]]]]] * 60}, 10_000, 200) == "more than 200 values"


def _call(arguments: dict[str, Any]) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "create_note", "arguments": arguments}}).encode()


ATTACK = _call({"title": "t", "path": "/users/alice/x", "tags": [i for i in range(40_000)]})


def test_the_stall_attack_is_refused_before_anything(gateways: Any, issuer: Any, json_upstream: Any) -> None:
    assert 250_000 < len(ATTACK) < 300_000  # 269 KB, as found
    gw = gateways.start(profile=make_profile(issuer), upstream_url=json_upstream.url,
                        config={"policy": {"bundle": str(ROOT / "policies"), "data": [NOTES]}})
    foreign = issuer.mint(aud="https://elsewhere.example/mcp", scope="notes.read notes.write")
    ours = issuer.mint(aud=gw.resource, scope="notes.read notes.write")
    json_upstream.clear()
    refused = httpx.post(gw.mcp_url, content=ATTACK, headers={**HEADERS, "Authorization": f"Bearer {foreign}"})
    assert refused.status_code == 401 and refused.json()["error"]["data"]["reason"] == "audience_not_accepted"
    too_big = httpx.post(gw.mcp_url, content=ATTACK, headers={**HEADERS, "Authorization": f"Bearer {ours}"})
    assert too_big.status_code == 413 and too_big.json()["error"]["data"]["reason"] == "body_too_large"
    assert json_upstream.requests() == []


async def test_over_budget_is_413_and_health_stays_responsive(gateways: Any, issuer: Any, json_upstream: Any) -> None:
    gw = gateways.start(profile=make_profile(issuer), upstream_url=json_upstream.url,
                        config={"policy": {"bundle": str(ROOT / "policies"), "data": [NOTES]}, "limits": {"max_body_bytes": 4_194_304}})
    ours = issuer.mint(aud=gw.resource, scope="notes.read notes.write")
    auth = {**HEADERS, "Authorization": f"Bearer {ours}"}
    json_upstream.clear()
    started = time.monotonic()
    over = httpx.post(gw.mcp_url, content=ATTACK, headers=auth, timeout=30)
    assert over.status_code == 413 and over.json()["error"]["data"]["reason"] == "policy_input_too_large"
    assert time.monotonic() - started < 5  # was 7 s of a stalled event loop
    # at the edge of the budget: decided (in the pool), while /healthz answers promptly
    edge = _call({"title": "t", "path": "/users/alice/x", "tags": ["t%04d" % i for i in range(1_900)]})
    async with httpx.AsyncClient(timeout=30) as http:
        flood = [asyncio.create_task(http.post(gw.mcp_url, content=edge, headers=auth)) for _ in range(24)]
        await asyncio.sleep(0.05)
        waits = []
        for _ in range(5):
            t0 = time.monotonic()
            assert (await http.get(gw.base + "/healthz")).status_code == 200
            waits.append(time.monotonic() - t0)
        answers = await asyncio.gather(*flood)
    assert {a.status_code for a in answers} == {200}
    assert max(waits) < 1.0, waits
