"""Hot reload under load: a good policy replaces the live one with no failed request; broken ones are refused."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time

import httpx

from tests.conftest import ROOT, make_profile
from tests.integration.test_gateway_e2e import LIST, post

V2_TEST = """package mcp.gateway_v2_test

import data.mcp.gateway

test_lists_are_frozen if {
	d := gateway.decision with input.mcp as {"kind": "request", "method": "tools/list"}
	d.reason == "lists_frozen"
}
"""

V2 = """package mcp.gateway

# v2: tools/list is refused, everything else as before.
frozen := {"action": "reject", "reason": "lists_frozen", "status": 403}
"""


def write_v2(bundle) -> None:
    text = (ROOT / "policies" / "gateway.rego").read_text()
    marker = "} else := with_limits(with_listing(allow))\n"
    assert marker in text
    text = text.replace(marker, '} else := frozen if {\n\tinput.mcp.method == "tools/list"\n} else := with_limits(with_listing(allow))\n')
    (bundle / "gateway.rego").write_text(text + "\n" + V2.split("\n", 3)[3])
    (bundle / "gateway_v2_test.rego").write_text(V2_TEST)
    # v2 freezes listings on purpose, so the listing test of tools_test.rego no longer holds
    (bundle / "tools_test.rego").unlink(missing_ok=True)


def metric(gw, name: str) -> float:
    for line in httpx.get(gw.base + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


async def test_reload_swaps_policy_under_load_and_refuses_broken_ones(gateways, issuer, json_upstream, tmp_path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(ROOT / "policies", bundle)
    gw = gateways.start(
        profile=make_profile(issuer),
        upstream_url=json_upstream.url,
        policy_bundle=bundle,
        config={"reload": {"interval": 0.2}, "decision_log": ""},
    )
    token = issuer.mint(aud=gw.resource)
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
    outcomes: list[tuple[int, str]] = []

    async def load(http: httpx.AsyncClient, stop: asyncio.Event) -> None:
        while not stop.is_set():
            r = await http.post(gw.mcp_url, json=LIST, headers=headers)
            outcomes.append((r.status_code, r.json().get("error", {}).get("data", {}).get("reason", "ok")))

    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=20) as http:
        workers = [asyncio.create_task(load(http, stop)) for _ in range(4)]
        await asyncio.sleep(0.5)
        write_v2(bundle)  # a sound change: compiles and its tests pass
        swapped = await asyncio.to_thread(wait_for, lambda: metric(gw, 'mcp_gateway_reloads_total{result="success"}') >= 1)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*workers)
    assert swapped, gw.log()
    assert len(outcomes) > 200
    assert set(outcomes) <= {(200, "ok"), (403, "lists_frozen")}, set(outcomes)  # no request failed
    assert outcomes[0] == (200, "ok") and outcomes[-1] == (403, "lists_frozen")

    # a syntax error: refused, the running policy keeps serving
    (bundle / "gateway.rego").write_text((bundle / "gateway.rego").read_text() + "\nbroken := {\n")
    assert await asyncio.to_thread(wait_for, lambda: metric(gw, 'mcp_gateway_reloads_total{result="failure"}') >= 1), gw.log()
    assert post(gw.mcp_url, token, LIST).status_code == 403
    assert "reload (files changed) refused; the running policy (revision sha256:" in gw.log()

    # a policy that compiles but fails its own tests: refused too (SIGHUP asks as well)
    write_v2(bundle)
    (bundle / "gateway.rego").write_text((bundle / "gateway.rego").read_text().replace('"lists_frozen"', '"other"', 1))
    assert await asyncio.to_thread(wait_for, lambda: metric(gw, 'mcp_gateway_reloads_total{result="failure"}') >= 2), gw.log()
    os.kill(gw.proc.pid, signal.SIGHUP)
    assert await asyncio.to_thread(wait_for, lambda: metric(gw, 'mcp_gateway_reloads_total{result="failure"}') >= 3), gw.log()
    assert "Rego test(s) fail: data.mcp.gateway_v2_test.test_lists_are_frozen" in gw.log()
    assert post(gw.mcp_url, token, LIST).json()["error"]["data"]["reason"] == "lists_frozen"


def test_profile_change_is_picked_up_without_restart(gateways, issuer, json_upstream) -> None:
    import yaml

    gw = gateways.start(profile=make_profile(issuer), upstream_url=json_upstream.url, config={"reload": {"interval": 0.2}, "decision_log": ""})
    token = issuer.mint(aud=gw.resource)
    assert post(gw.mcp_url, token, LIST).status_code == 200
    profile_file = gw.config_path.parent / "profile.yaml"
    profile = yaml.safe_load(profile_file.read_text())
    profile["audience"]["accept"] = ["someone-else"]
    profile_file.write_text(yaml.safe_dump(profile))
    assert wait_for(lambda: metric(gw, 'mcp_gateway_reloads_total{result="success"}') >= 1), gw.log()
    refused = post(gw.mcp_url, token, LIST)
    assert refused.status_code == 401 and refused.json()["error"]["data"]["reason"] == "audience_not_accepted"
