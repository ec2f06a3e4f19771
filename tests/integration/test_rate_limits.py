"""Rate limits per identity, as policy data: counted in memory or in Redis (shared by every
replica and worker), answered 429 with Retry-After and a JSON-RPC error, counted in /metrics,
visible in the decision log; other users are never affected."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import make_profile
from tests.integration.test_gateway_e2e import post

CALL = {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "list_notes", "arguments": {}}}
OTHER = {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "read_note", "arguments": {"id": 1}}}


def limits_data(tmp_path: Path) -> Path:
    data = tmp_path / "limits.yaml"
    data.write_text(yaml.safe_dump({"authz": {"unlisted": "allow", "limits": {"list_notes": {"per_subject": "2/minute"}}}}))
    return data


def test_a_users_limit_is_theirs_alone(gateways: Any, issuer: Any, json_upstream: Any, tmp_path: Path) -> None:
    log = tmp_path / "decisions.jsonl"
    gw = gateways.start(profile=make_profile(issuer), upstream_url=json_upstream.url,
                        config={"decision_log": str(log), "policy": {"engine": "embedded", "data": [str(limits_data(tmp_path))]}})
    alice, bob = issuer.mint(sub="alice", aud=gw.resource), issuer.mint(sub="bob", aud=gw.resource)
    assert [post(gw.mcp_url, alice, CALL).status_code for _ in range(2)] == [200, 200]
    refused = post(gw.mcp_url, alice, CALL)
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 30
    error = refused.json()["error"]
    assert error["data"] == {"reason": "rate_limited", "limit": "list_notes"} and refused.json()["id"] == 4
    assert post(gw.mcp_url, bob, CALL).status_code == 200  # another user: untouched
    assert post(gw.mcp_url, alice, OTHER).status_code == 200  # another tool: no limit declared
    assert 'mcp_gateway_rate_limited_total{limit="list_notes"} 1.0' in httpx.get(gw.base + "/metrics").text
    line = next(json.loads(x) for x in log.read_text().splitlines() if json.loads(x)["decision_id"] == refused.headers["x-decision-id"])
    assert line["stage"] == "limits" and line["result"]["reason"] == "rate_limited" and line["status"] == 429
    assert line["result"]["limits"] == [{"name": "list_notes", "per": "per_subject", "count": 2, "period": 60.0}]


def test_replicas_share_the_counters_in_redis(gateways: Any, issuer: Any, json_upstream: Any, redis_server: Any,
                                             tmp_path: Path) -> None:
    config = {"decision_log": "", "policy": {"engine": "embedded", "data": [str(limits_data(tmp_path))]},
              "rate_limits": {"store": "redis", "url": redis_server.url}}
    one = gateways.start(profile=make_profile(issuer), upstream_url=json_upstream.url, config=config, replica="quota-a")
    two = gateways.start(profile=make_profile(issuer, audience={"accept": [one.resource], "reject": [], "match": "any", "missing": "reject"}),
                         upstream_url=json_upstream.url, config=config, replica="quota-b")
    carol = issuer.mint(sub="carol", aud=one.resource)
    assert post(one.mcp_url, carol, CALL).status_code == 200
    assert post(two.mcp_url, carol, CALL).status_code == 200
    assert post(one.mcp_url, carol, CALL).status_code == 429  # the third, whichever replica
    assert post(two.mcp_url, carol, CALL).status_code == 429
    assert httpx.get(one.base + "/readyz").json()["checks"]["rate_limits"] is True


def test_limits_with_several_workers_need_the_shared_store(tmp_path: Path, issuer: Any) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    (tmp_path / "profile.yaml").write_text(yaml.safe_dump(make_profile(issuer)))
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump({
        "public_url": "http://127.0.0.1:9", "listen": {"host": "127.0.0.1", "port": 9}, "upstream": {"url": "http://127.0.0.1:1/mcp"},
        "profile": "./profile.yaml", "workers": 2, "sessions": {"store": "redis", "url": "redis://127.0.0.1:1/0"},
        "policy": {"data": [str(limits_data(tmp_path))]}}))
    run = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--config", str(tmp_path / "gateway.yaml")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "gateway.yaml: rate_limits.store: the policy data declares rate limits and 2 workers run" in run.stderr
