"""The decision log: one JSON line per judged request, quotable by its id, never a token."""

from __future__ import annotations

import json

from tests.conftest import ROOT, make_profile
from tests.integration.test_gateway_e2e import LIST, post


def test_decision_log_lines_match_responses(gateways, issuer, json_upstream, tmp_path) -> None:
    log_file = tmp_path / "decisions.jsonl"
    gw = gateways.start(profile=make_profile(issuer), upstream_url=json_upstream.url, config={"decision_log": str(log_file)})
    good = issuer.mint(aud=gw.resource, sub="logged")
    ok = post(gw.mcp_url, good, LIST)
    refused = post(gw.mcp_url, issuer.mint(aud="elsewhere", sub="logged"), LIST)
    bad_token = post(gw.mcp_url, good[:-4] + "AAAA", LIST)
    answers = [ok, refused, bad_token]
    ids = [a.headers["x-decision-id"] for a in answers]
    assert len(set(ids)) == 3

    lines = {entry["decision_id"]: entry for entry in map(json.loads, log_file.read_text().splitlines())}
    assert set(ids) <= set(lines)
    first, second, third = (lines[i] for i in ids)

    assert first["result"] == {"action": "accept", "reason": "allowed"}
    assert (first["status"], first["upstream_status"], first["engine"], first["stage"]) == (200, 200, "wasm", "done")
    assert first["input"]["token"]["subject"] == "logged" and first["input"]["mcp"]["method"] == "tools/list"
    assert first["metrics"]["timer_rego_query_eval_ns"] > 0
    assert first["path"] == "mcp/gateway/decision" and first["timestamp"].endswith("Z")

    assert second["result"]["reason"] == "audience_not_accepted" and second["status"] == 401
    assert second["upstream_status"] is None

    assert third["stage"] == "token" and third["result"]["reason"] == "bad_signature" and third["input"] is None

    text = log_file.read_text()
    assert good not in text and good.split(".")[2] not in text  # no raw token, not even its signature


def test_metrics_count_decisions_steps_and_cache(gateways, issuer, json_upstream) -> None:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    gw = gateways.start(profile=make_profile(issuer), upstream_url=json_upstream.url, config={"decision_log": ""})
    good = issuer.mint(aud=gw.resource)
    for _ in range(3):
        assert post(gw.mcp_url, good, LIST).status_code == 200
    assert post(gw.mcp_url, issuer.mint(aud="elsewhere"), LIST).status_code == 401
    resp = httpx.get(gw.base + "/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(resp.text) for s in f.samples}
    assert samples[("mcp_gateway_requests_total", (("action", "accept"), ("reason", "allowed")))] == 3
    assert samples[("mcp_gateway_requests_total", (("action", "reject"), ("reason", "audience_not_accepted")))] == 1
    # the token for another audience is refused before the policy runs (the profile's rules, checked first)
    for step, count in (("verify", 4), ("policy", 3), ("upstream", 3)):
        assert samples[("mcp_gateway_step_seconds_count", (("step", step),))] == count
    assert samples[("mcp_gateway_cache_lookups_total", (("cache", "verified_tokens"), ("result", "hit")))] == 2
    assert samples[("mcp_gateway_cache_lookups_total", (("cache", "verified_tokens"), ("result", "miss")))] == 2


SHADOW = """package mcp.gateway

# A stricter candidate: refuse delete_note, allow the rest as the live policy would.
default decision := {"action": "accept", "reason": "allowed"}

decision := {"action": "reject", "reason": "deletes_frozen", "status": 403} if input.mcp.tool == "delete_note"
"""


def test_shadow_policy_logs_and_counts_disagreements_without_acting(gateways, issuer, json_upstream, tmp_path) -> None:
    import httpx

    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "candidate.rego").write_text(SHADOW)
    log_file = tmp_path / "decisions.jsonl"
    gw = gateways.start(
        profile=make_profile(issuer),
        upstream_url=json_upstream.url,
        config={"decision_log": str(log_file), "policy": {"bundle": str(ROOT / "policies"), "shadow": str(shadow)}},
    )
    token = issuer.mint(aud=gw.resource)
    listed = post(gw.mcp_url, token, LIST)
    delete = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "delete_note", "arguments": {"id": 999}}}
    deleted = post(gw.mcp_url, token, delete)
    assert listed.status_code == 200 and deleted.status_code == 200  # the shadow never acts
    entries = {e["decision_id"]: e for e in map(json.loads, log_file.read_text().splitlines())}
    disagreeing = entries[deleted.headers["x-decision-id"]]
    assert disagreeing["result"]["action"] == "accept"
    assert disagreeing["shadow_result"] == {"action": "reject", "reason": "deletes_frozen", "status": 403}
    assert "shadow_result" not in entries[listed.headers["x-decision-id"]]
    # the listing's own decision is a line of its own, shadowed too: this candidate gives no
    # visible set, so it would hide every tool (a disagreement worth knowing before shipping)
    listing = next(e for e in entries.values() if e.get("listing_of") == listed.headers["x-decision-id"])
    assert listing["stage"] == "listing" and listing["input"]["listing"]["catalogue"] == "tools"
    assert listing["result"]["visible"] and "visible" not in listing["shadow_result"]
    assert "shadow policy disagrees on decision " + deleted.headers["x-decision-id"] in gw.log()
    metrics = httpx.get(gw.base + "/metrics").text
    assert 'mcp_gateway_shadow_decisions_total{outcome="disagree"} 2.0' in metrics
    assert 'mcp_gateway_shadow_decisions_total{outcome="agree"} 1.0' in metrics
