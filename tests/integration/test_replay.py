"""`policy replay`: yesterday's decision log decided again by a candidate bundle, before it ships."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, make_profile
from tests.integration.test_gateway_e2e import LIST, post
from tests.integration.test_reload import wait_for, write_v2

CALL = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "list_notes", "arguments": {}}}


def replay(log: Path, bundle: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "policy", "replay", "--log", str(log), "--bundle", str(bundle), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_replay_reports_what_a_candidate_changes(gateways: Any, issuer: Any, json_upstream: Any, tmp_path: Path) -> None:
    log = tmp_path / "decisions.jsonl"
    gw = gateways.start(profile=make_profile(issuer), upstream_url=json_upstream.url, config={"decision_log": str(log)})
    token = issuer.mint(aud=gw.resource)
    for _ in range(3):
        assert post(gw.mcp_url, token, LIST).status_code == 200
    assert post(gw.mcp_url, token, CALL).status_code == 200
    assert post(gw.mcp_url, None, LIST).status_code == 401  # refused before the policy: nothing to replay
    # 3 listings (each a request decision and its listing's own), 1 call, 1 refusal
    assert wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == 8)

    same = replay(log, ROOT / "policies")
    assert same.returncode == 0, same.stdout + same.stderr
    assert "replayed 7 decisions" in same.stdout and "skipped 1 refused before the policy ran" in same.stdout
    assert "unchanged: 7" in same.stdout and "changed: 0" in same.stdout

    candidate = tmp_path / "candidate"
    shutil.copytree(ROOT / "policies", candidate)
    write_v2(candidate)  # refuses tools/list
    changed = replay(log, candidate)
    assert changed.returncode == 3, changed.stdout + changed.stderr
    assert "changed: 6" in changed.stdout and "unchanged: 1" in changed.stdout  # the listings' own decisions too
    listing_ids = [json.loads(line)["decision_id"] for line in log.read_text().splitlines()[:6]]
    change = next(line for line in changed.stdout.splitlines() if "->" in line)
    assert "accept/allowed -> reject/lists_frozen  method=tools/list  6" in change
    assert any(i in change for i in listing_ids)
    assert replay(log, candidate, "--allow-changes").returncode == 0


def test_explain_a_logged_decision_by_its_id(gateways: Any, issuer: Any, json_upstream: Any, tmp_path: Path) -> None:
    """Item 11: a refused user quotes X-Decision-Id; explain re-decides that input, shows the
    checks that decided and says whether the bundle now decides otherwise."""
    import yaml

    log = tmp_path / "decisions.jsonl"
    gw = gateways.start(profile=make_profile(issuer), upstream_url=json_upstream.url,
                        config={"decision_log": str(log), "policy": {"engine": "embedded", "bundle": str(ROOT / "policies"),
                                                                       "data": [str(ROOT / "examples" / "notes-authz.yaml")]}})
    refused = post(gw.mcp_url, issuer.mint(aud=gw.resource, scope="notes.read"),
                   {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "create_note", "arguments": {"title": "x"}}})
    assert refused.status_code == 403
    decision_id = refused.headers["x-decision-id"]
    assert wait_for(lambda: log.exists() and decision_id in log.read_text())

    run = subprocess.run([sys.executable, "-m", "gateway.cli", "explain", "--config", str(gw.config_path), "--decision-id", decision_id,
                          "--log", str(log)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert '  missing = ["notes.write"]' in run.stdout
    assert "the same decision as logged" in run.stdout

    config = yaml.safe_load(gw.config_path.read_text())
    config["policy"]["data"] = []  # the same request without the per-tool rules: now allowed
    other = tmp_path / "gateway.yaml"
    other.write_text(yaml.safe_dump({**config, "profile": str(gw.config_path.parent / "profile.yaml")}))
    run = subprocess.run([sys.executable, "-m", "gateway.cli", "explain", "--config", str(other), "--decision-id", decision_id,
                          "--log", str(log)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "DIFFERS from the logged decision" in run.stdout and '"reason": "allowed"' in run.stdout
