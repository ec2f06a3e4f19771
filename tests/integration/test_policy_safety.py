"""Policy changes a security team can trust: one snapshot tested and served, a shadow that can
never take live traffic down, start-up held to the same rule as reload, revisions reported."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import yaml

import gateway.assembly as assembly
from gateway.assembly import Gateway, vetted_snapshot
from gateway.config.settings import load_config
from gateway.ops.reload import Reloader
from gateway.policy.regotest import run_tests_isolated
from tests.conftest import ROOT, make_profile
from tests.integration.test_gateway_e2e import LIST, post
from tests.integration.test_reload import metric, wait_for, write_v2

#: a valid bundle OPA accepts (`opa test` passes) on which regopy 1.5.2 aborts the process
CRASHES_REGOPY = {
    "crash_a.rego": "package crash_a\n\nf(x) := x + 1\n",
    "crash_b.rego": "package crash_b\n\nf(x, y) := x + y\n\ntest_b if f(1, 2) == 3\n",
}


def settings_for(tmp_path: Path, issuer: Any, bundle: Path, **extra: Any) -> Any:
    (tmp_path / "profile.yaml").write_text(yaml.safe_dump(make_profile(issuer)))
    config = {"public_url": "http://127.0.0.1:9", "upstream": {"url": "http://127.0.0.1:1/mcp"}, "profile": "./profile.yaml",
              "policy": {"bundle": str(bundle), "engine": "regopy"}, "decision_log": "", **extra}
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
    return load_config(tmp_path / "gateway.yaml")


async def test_a_reload_serves_exactly_the_snapshot_it_tested(tmp_path: Path, issuer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 1: the files change while the tests run (an editor saving, a git checkout): what
    serves is the tested snapshot, never the files as they are by the time of the build."""
    bundle = tmp_path / "bundle"
    shutil.copytree(ROOT / "policies", bundle)
    settings = settings_for(tmp_path, issuer, bundle)
    first, _ = vetted_snapshot(settings)
    state = SimpleNamespace(gateway=Gateway.build(settings, bundle=first))
    write_v2(bundle)  # sound: its tests pass

    def tests_then_an_edit(snapshot: Any) -> Any:
        report = run_tests_isolated(snapshot)
        # mid-reload, someone breaks the policy on disk: its own tests would fail
        (bundle / "gateway.rego").write_text((bundle / "gateway.rego").read_text().replace('"lists_frozen"', '"other"', 1))
        return report

    monkeypatch.setattr(assembly, "run_tests_isolated", tests_then_an_edit)
    reloader = Reloader(state, settings, Gateway.build, vetted_snapshot, grace=0)
    assert await reloader.reload("test")
    served = state.gateway
    tested = [m for m in (bundle / "gateway.rego").read_text().splitlines() if "other" in m]
    assert tested, "the edit happened"
    decision = await served.engine.decide({"mcp": {"kind": "request", "method": "tools/list"}, "token": {"scopes": []},
                                           "profile": {"mode": "passthrough", "audience": {"accept": [], "reject": [], "match": "any", "missing": "accept"}},
                                           "request": {"method": "POST"}})
    assert decision.reason == "lists_frozen"  # the tested v2, not the edited file
    assert served.revision != first.revision and served.revision.startswith("sha256:")
    await reloader.aclose()


def test_a_shadow_that_crashes_the_engine_never_takes_the_live_gateway_down(gateways: Any, issuer: Any, json_upstream: Any,
                                                                            tmp_path: Path) -> None:
    """Item 2: a valid bundle regopy aborts on, as the shadow: refused (logged with the shadow's
    name, counted), live traffic and live reloads go on."""
    bundle, shadow = tmp_path / "live", tmp_path / "shadow"
    shutil.copytree(ROOT / "policies", bundle)
    shutil.copytree(ROOT / "policies", shadow)
    gw = gateways.start(profile=make_profile(issuer), upstream_url=json_upstream.url, policy_bundle=bundle,
                        config={"reload": {"interval": 0.2}, "decision_log": "",
                                "policy": {"engine": "embedded", "bundle": str(bundle), "shadow": str(shadow)}})
    token = issuer.mint(aud=gw.resource)
    assert httpx.get(gw.base + "/readyz").json()["policy"]["shadow_revision"].startswith("sha256:")
    for name, text in CRASHES_REGOPY.items():
        (shadow / name).write_text(text)
    assert wait_for(lambda: metric(gw, 'mcp_gateway_reloads_total{result="shadow_refused"}') >= 1), gw.log()
    assert gw.proc.poll() is None, gw.log()
    assert "shadow bundle " + str(shadow) in gw.log() and "regopy" in gw.log()
    assert post(gw.mcp_url, token, LIST).status_code == 200
    assert httpx.get(gw.base + "/readyz").json()["policy"]["shadow_revision"] is None
    # and a live change still goes in
    write_v2(bundle)
    assert wait_for(lambda: post(gw.mcp_url, token, LIST).status_code == 403), gw.log()
    assert gw.proc.poll() is None


def failing_bundle(tmp_path: Path) -> Path:
    bundle = tmp_path / "failing"
    shutil.copytree(ROOT / "policies", bundle)
    write_v2(bundle)
    (bundle / "gateway.rego").write_text((bundle / "gateway.rego").read_text().replace('"lists_frozen"', '"other"', 1))
    return bundle


@pytest.mark.parametrize("rule", ["refuse", "warn"])
def test_start_up_applies_the_reload_rule_to_a_bundle_failing_its_tests(tmp_path: Path, issuer: Any, rule: str) -> None:
    """Item 3: `serve` refused nothing before; now start-up and reload apply one rule."""
    settings_for(tmp_path, issuer, failing_bundle(tmp_path), policy={"bundle": str(tmp_path / "failing"), "on_test_failure": rule},
                 listen={"host": "127.0.0.1", "port": 0})
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(tmp_path / "gateway.yaml")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if rule == "refuse":
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 2
            assert "live bundle" in out and "Rego test(s) fail: data.mcp.gateway_v2_test.test_lists_are_frozen" in out
        else:
            assert proc.stdout is not None
            seen = ""
            while "Application startup complete" not in seen:
                line = proc.stdout.readline()
                assert line, seen
                seen += line
            assert "SERVED ANYWAY (policy.on_test_failure: warn)" in seen
    finally:
        proc.kill()
        proc.wait()


def test_revisions_in_readyz_metrics_and_every_decision_line(gateways: Any, issuer: Any, json_upstream: Any, tmp_path: Path) -> None:
    """Item 8: the revision serving (a manifest's, with the content hash) is in /readyz, in an
    info metric and in each decision-log line."""
    bundle = tmp_path / "bundle"
    shutil.copytree(ROOT / "policies", bundle)
    (bundle / ".manifest").write_text('{"revision": "release-42"}')
    log = tmp_path / "decisions.jsonl"
    gw = gateways.start(profile=make_profile(issuer), upstream_url=json_upstream.url, policy_bundle=bundle,
                        config={"decision_log": str(log)})
    revision = httpx.get(gw.base + "/readyz").json()["policy"]["revision"]
    assert revision.startswith("release-42 (sha256:")
    assert post(gw.mcp_url, issuer.mint(aud=gw.resource), LIST).status_code == 200
    assert wait_for(lambda: log.exists() and log.read_text().strip())
    line = yaml.safe_load(log.read_text().splitlines()[-1])
    assert line["bundles"] == {"live": {"revision": revision}}
    info = [line for line in httpx.get(gw.base + "/metrics").text.splitlines() if line.startswith("mcp_gateway_policy_info{")]
    assert len(info) == 1 and f'revision="{revision}"' in info[0] and info[0].endswith(" 1.0")


@pytest.mark.parametrize(("authz", "message"), [
    ({"tools": {"create_note": {"scopes": "notes.write"}}}, "authz.tools.create_note.scopes: 'notes.write' is not of type 'array'"),
    ({"tools": {"purge_*": {"scopes": ["notes.admin"], "groups": ["admins"]}}},
     "authz.tools.purge_*: Additional properties are not allowed ('groups' was unexpected)"),
    ({"tools": {"tag_note": {"arguments": {"tag": {"one_off": ["red"]}}}}},
     "authz.tools.tag_note.arguments.tag: Additional properties are not allowed ('one_off' was unexpected)"),
    ({"unlisted": "denny"}, "authz.unlisted: 'denny' is not one of ['deny', 'allow']"),
    ({"tool": {"list_notes": {"scopes": []}}}, "authz: Additional properties are not allowed ('tool' was unexpected)"),
])
def test_per_tool_data_with_a_typo_is_refused_by_check_start_up_and_reload(tmp_path: Path, issuer: Any, authz: dict[str, Any],
                                                                          message: str) -> None:
    """Item 4: a typo in data.authz silently dropped a requirement (fail open); now `check`
    and start-up stop with file: key: message."""
    data = tmp_path / "authz.yaml"
    data.write_text(yaml.safe_dump({"authz": authz}))
    settings_for(tmp_path, issuer, ROOT / "policies", policy={"bundle": str(ROOT / "policies"), "data": [str(data)]})
    for command in ("check", "serve"):
        run = subprocess.run([sys.executable, "-m", "gateway.cli", command, "--config", str(tmp_path / "gateway.yaml")], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, run.stdout + run.stderr
        assert f"{data}: {message}" in run.stderr


async def test_a_reload_with_invalid_per_tool_data_is_refused(tmp_path: Path, issuer: Any) -> None:
    data = tmp_path / "authz.yaml"
    data.write_text(yaml.safe_dump({"authz": {"tools": {"list_notes": {"scopes": ["notes.read"]}}}}))
    settings = settings_for(tmp_path, issuer, ROOT / "policies", policy={"bundle": str(ROOT / "policies"), "data": [str(data)],
                                                                         "engine": "regopy"})
    first, _ = vetted_snapshot(settings)
    state = SimpleNamespace(gateway=Gateway.build(settings, bundle=first))
    data.write_text(yaml.safe_dump({"authz": {"tools": {"list_notes": {"scopes": "notes.read"}}}}))
    reloader = Reloader(state, settings, Gateway.build, vetted_snapshot, grace=0)
    assert not await reloader.reload("test")
    assert state.gateway.revision == first.revision
    await reloader.aclose()
