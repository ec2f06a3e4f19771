"""The remote OPA engine against a real OPA server, and parity with the embedded engine."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from gateway.policy.bundle import load_bundle
from gateway.policy.decision import PolicyError
from gateway.policy.embedded import EmbeddedEngine
from gateway.policy.opa import OpaEngine
from tests.conftest import ROOT, find_opa, free_port, make_profile, start_opa, wait_http
from tests.integration.test_gateway_e2e import LIST, post, reason
from tests.unit.test_policy import EXPECTED, RULES, TOKENS, policy_input, profile, token

ENTRY = "mcp/gateway/decision"


def decision_cases() -> list[tuple[str, dict, str]]:
    """(name, policy input, expected reason): the audience matrix, both modes, odd requests, hostile names."""
    cases = []
    for rule, rules in RULES.items():
        for kind, (aud, claims) in TOKENS.items():
            for mode in ("passthrough", "exchange"):
                cases.append((f"{rule}-{kind}-{mode}", policy_input(token(aud, **claims), profile(rules, mode)), EXPECTED[rule][kind]))
    base = policy_input(token("mcp-client"), profile(RULES["A_strict"]))
    for method, kind, expected in (("GET", None, "allowed"), ("DELETE", None, "allowed"), ("PUT", None, "unknown_message_kind")):
        case = {**base, "mcp": {**base["mcp"], "kind": kind, "method": None}, "request": {**base["request"], "method": method}}
        cases.append((f"http-{method}", case, expected))
    for name in ['a"b', "a\\b", "a\nb", "é\u202e", "x" * 2000]:  # refused even without per-tool data (item 19)
        cases.append((f"name-{name[:8]!r}", policy_input(token("mcp-client"), profile(RULES["A_strict"]), tool=name), "invalid_tool_name"))
    for name in ["any_tool", "notes.v2-x"]:
        cases.append((f"name-{name}", policy_input(token("mcp-client"), profile(RULES["A_strict"]), tool=name), "allowed"))
    return cases


CASES = decision_cases()


@pytest.fixture(scope="module")
def embedded() -> EmbeddedEngine:
    return EmbeddedEngine(load_bundle(ROOT / "policies"), ENTRY)


@pytest.fixture()
async def remote(opa_server):
    engine = OpaEngine(opa_server.url, ENTRY, timeout=5)
    await engine.start()
    yield engine
    await engine.aclose()


async def test_engines_agree_on_every_case(embedded, remote) -> None:
    disagreements = []
    for name, case, expected in CASES:
        local = (await embedded.decide(case)).as_dict()
        far = (await remote.decide(case)).as_dict()
        if local != far or local["reason"] != expected:
            disagreements.append((name, expected, local, far))
    assert not disagreements, disagreements[:5]
    assert len(CASES) > 60


NOTES_DATA = ROOT / "examples" / "notes-authz.yaml"


def tool_cases() -> list[tuple[str, dict, str]]:
    """Per-tool rules (examples/notes-authz.yaml): scopes, arguments, hostile names, listings."""
    cases = []
    calls = [
        ("read_note", {"id": 1}, "notes.read", "allowed"),
        ("create_note", {"title": "t", "path": "/users/alice/x"}, "notes.read", "insufficient_scope"),
        ("create_note", {"title": "t", "path": "/users/alice/x"}, "notes.read notes.write", "allowed"),
        ("create_note", {"title": "t", "path": "/users/bob/x"}, "notes.read notes.write", "argument_not_allowed: path"),
        ("create_note", {"title": "t", "path": "/users/alice/../b"}, "notes.write", "argument_not_allowed: path"),
        ("create_note", {"title": "t", "path": "/users/alice/a\u0000"}, "notes.write", "argument_not_allowed: path"),
        ("create_note", {"title": "t" * 201, "path": "/users/alice/x"}, "notes.write", "argument_not_allowed: title"),
        ("delete_note", {"id": 1}, "notes.write", "allowed"),
        ("delete_note", {"id": "1"}, "notes.write", "allowed"),
        ("delete_note", {"id": 2}, "notes.write", "argument_not_allowed: id"),
        ("delete_note", {"id": [1]}, "notes.write", "argument_not_allowed: id"),
        ("purge_notes", {}, "notes.write", "insufficient_scope"),
        ("purge_notes", {}, "notes.admin", "allowed"),
    ]
    calls += [(name, {}, "notes.read notes.write notes.admin", "invalid_tool_name") for name in ['list_notes"', "list_notes\\", "list_notes\n", "list_nоtes", "*", "x" * 5000]]
    calls += [("list_notes2", {}, "notes.read notes.write notes.admin", "tool_not_listed")]
    for i, (tool, args, scope, expected) in enumerate(calls):
        case = policy_input(token("mcp-client", scope=scope, sub="alice"), profile(RULES["A_strict"]), tool=tool)
        case["mcp"]["arguments"] = args
        cases.append((f"tool-{i}-{tool[:12]!r}", case, expected))
    for scope in ("", "notes.read", "notes.read notes.write"):
        case = policy_input(token("mcp-client", scope=scope, sub="alice"), profile(RULES["A_strict"]))
        case["mcp"] = {**case["mcp"], "method": "tools/list", "tool": None, "arguments": None, "targets": []}
        case["listing"] = {"catalogue": "tools", "names": ["list_notes", "create_note", "purge_notes", "other"]}
        cases.append((f"listing-{scope!r}", case, "allowed"))
    return cases


async def test_engines_agree_on_tool_rules(tmp_path) -> None:
    opa = start_opa(ROOT / "policies", tmp_path, NOTES_DATA)
    remote = OpaEngine(opa.url, ENTRY, timeout=5)
    await remote.start()
    try:
        local = EmbeddedEngine(load_bundle(ROOT / "policies", (NOTES_DATA,)), ENTRY)
        disagreements = []
        for name, case, expected in tool_cases():
            near, far = (await local.decide(case)).as_dict(), (await remote.decide(case)).as_dict()
            if near != far or near["reason"] != expected:
                disagreements.append((name, expected, near, far))
        assert not disagreements, disagreements[:5]
        listing = (await local.decide(tool_cases()[-1][1])).visible
        assert listing == frozenset({"list_notes", "create_note"})
    finally:
        await remote.aclose()
        opa.stop()


async def test_opa_down_is_a_policy_error() -> None:
    engine = OpaEngine(f"http://127.0.0.1:{free_port()}", ENTRY, timeout=1)
    with pytest.raises(PolicyError) as info:
        await engine.decide(CASES[0][1])
    assert info.value.reason == "policy_unavailable"
    assert not await engine.ready()
    await engine.aclose()


async def test_undefined_decision_in_opa_is_a_policy_error(opa_server) -> None:
    engine = OpaEngine(opa_server.url, "mcp/gateway/no_such_rule", timeout=5)
    with pytest.raises(PolicyError, match="undefined"):
        await engine.decide(CASES[0][1])
    await engine.aclose()


@pytest.mark.parametrize("args", [["check"], ["fmt", "--diff"], ["test"]])
def test_shipped_policies_pass_opa_tooling(args) -> None:
    opa = find_opa()
    if opa is None:
        pytest.skip("no OPA binary: set OPA_BIN, put opa on PATH, or keep ../shared/bin/opa beside the checkout")
    result = subprocess.run([opa, *args, str(ROOT / "policies")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    if args[0] == "fmt":
        assert result.stdout.strip() == "", "opa fmt would change the shipped policies"


def test_gateway_with_opa_engine_forwards_and_fails_closed(gateways, issuer, json_upstream, tmp_path) -> None:
    opa = start_opa(ROOT / "policies", tmp_path)
    try:
        gw = gateways.start(
            profile=make_profile(issuer),
            upstream_url=json_upstream.url,
            config={"policy": {"engine": "opa", "opa_url": opa.url, "timeout": 1}},
        )
        token = issuer.mint(aud=gw.resource)
        json_upstream.clear()
        assert post(gw.mcp_url, token, LIST).status_code == 200
        assert reason(post(gw.mcp_url, issuer.mint(aud="elsewhere"), LIST)) == "audience_not_accepted"
    finally:
        opa.stop()
    json_upstream.clear()
    down = post(gw.mcp_url, token, LIST)
    assert down.status_code == 503 and reason(down) == "policy_unavailable"
    assert json_upstream.requests() == []


async def test_an_opa_evaluation_error_reaches_the_log_with_its_location(tmp_path) -> None:
    """Item 7: OPA's own error (here a conflict at a file and line) was dropped for a bare
    'policy_unavailable'; now the PolicyError the gateway logs carries it."""
    bundle = tmp_path / "conflict"
    bundle.mkdir()
    (bundle / "p.rego").write_text('package mcp.gateway\n\ndecision := "a" if input.x\n\ndecision := "b" if input.x\n')
    opa = start_opa(bundle, tmp_path)
    engine = OpaEngine(opa.url, ENTRY, timeout=5)
    try:
        with pytest.raises(PolicyError) as info:
            await engine.decide({"x": True})
        assert info.value.reason == "policy_error"
        assert "eval_conflict_error" in str(info.value) and "p.rego" in str(info.value)
    finally:
        await engine.aclose()
        opa.stop()


async def test_the_revision_opa_serves_is_what_the_gateway_reports(tmp_path) -> None:
    """Item 7: OPA serving a bundle (with a manifest revision) says which one decided; the
    gateway reports that, not the files beside it."""
    bundle = tmp_path / "bundle"
    shutil.copytree(ROOT / "policies", bundle)
    (bundle / ".manifest").write_text('{"revision": "opa-side-7"}')
    opa = find_opa()
    port = free_port()
    proc = subprocess.Popen([opa, "run", "--server", "--addr", f"127.0.0.1:{port}", "--disable-telemetry", "--log-level", "error",
                             "--bundle", str(bundle)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    engine = OpaEngine(f"http://127.0.0.1:{port}", ENTRY, timeout=5)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        await engine.start()
        assert engine.revision is not None and "opa-side-7" in engine.revision
        await engine.decide(CASES[0][1])
        assert "opa-side-7" in (engine.revision or "")
    finally:
        await engine.aclose()
        proc.terminate()
        proc.wait(10)
