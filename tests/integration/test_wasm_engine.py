"""The WebAssembly engine: the same decisions as a real OPA (and regopy) on every hand-written
case and on generated inputs, the shipped module kept in step with the Rego, where modules
come from, the fallback to regopy, and a deadline that interrupts a runaway evaluation.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config.settings import GatewayConfig, Settings
from gateway.policy.bundle import load_bundle
from gateway.policy.decision import PolicyError
from gateway.policy.embedded import EmbeddedEngine
from gateway.policy.engines import build_engine
from gateway.policy.opa import OpaEngine
from gateway.policy.wasm import WasmEngine, WasmPolicy
from gateway.policy.wasmbuild import SHIPPED, WasmUnavailable, rego_digest, wasm_for
from tests.conftest import ROOT, find_opa, start_opa
from tests.integration.test_opa_engine import CASES, NOTES_DATA, tool_cases
from tests.unit.test_policy import RULES, policy_input, profile, token

ENTRY = "mcp/gateway/decision"


def wasm_engine(*data_files: Path, timeout: float = 1.0) -> WasmEngine:
    bundle = load_bundle(ROOT / "policies", data_files)
    wasm, _ = wasm_for(bundle, ENTRY)
    return WasmEngine(WasmPolicy(wasm, bundle.data, ENTRY), ENTRY, timeout=timeout)


@pytest.fixture(scope="module")
def opa_with_notes(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = start_opa(ROOT / "policies", tmp_path_factory.mktemp("opa-notes"), NOTES_DATA)
    yield server
    server.stop()


async def test_wasm_decides_like_opa_and_regopy_on_every_case(opa_server: Any, opa_with_notes: Any) -> None:
    for data, opa, cases in (((), opa_server, CASES), ((NOTES_DATA,), opa_with_notes, tool_cases())):
        wasm = wasm_engine(*data)
        regopy = EmbeddedEngine(load_bundle(ROOT / "policies", data), ENTRY)
        remote = OpaEngine(opa.url, ENTRY, timeout=5)
        await remote.start()
        try:
            for name, case, expected in cases:
                ours, theirs, old = (await wasm.decide(case)).as_dict(), (await remote.decide(case)).as_dict(), (await regopy.decide(case)).as_dict()
                assert ours == theirs == old, (name, ours, theirs, old)
                assert ours["reason"] == expected, (name, ours)
        finally:
            await remote.aclose()
            await wasm.aclose()


names = st.sampled_from(["list_notes", "read_note", "create_note", "delete_note", "purge_notes", "purge_all", "count", "other",
                         'list_notes"', "a\\b", "x\ny", "list_nоtes", "*", "", "é"])
values = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False, allow_infinity=False, width=32)
                      | st.sampled_from(["/users/alice/a", "/users/bob/b", "/users/alice/../x", "1", "2", "t" * 250, "ok"]),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["a", "b"]), inner, max_size=2),
                      max_leaves=6)
arguments = st.dictionaries(st.sampled_from(["path", "title", "id", "to", "extra"]), values, max_size=4)
scopes = st.lists(st.sampled_from(["notes.read", "notes.write", "notes.admin", "openid"]), unique=True, max_size=4)


@st.composite
def policy_inputs(draw: st.DrawFn) -> dict[str, Any]:
    rule = draw(st.sampled_from(sorted(RULES)))
    aud = draw(st.sampled_from(["mcp-client", "nextcloud", ["mcp-client", "account"], [], "http://127.0.0.1:8080/mcp"]))
    case = policy_input(token(aud, scope=" ".join(draw(scopes)), sub=draw(st.sampled_from(["alice", "bob"]))),
                        profile(RULES[rule], draw(st.sampled_from(["passthrough", "exchange"]))), tool=draw(names))
    case["mcp"]["arguments"] = draw(arguments)
    if draw(st.booleans()):
        case["mcp"] = {**case["mcp"], "method": "tools/list", "tool": None, "arguments": None, "targets": []}
        case["listing"] = {"catalogue": "tools", "names": draw(st.lists(names, max_size=6))}
    return case


@pytest.fixture(scope="module")
def engines(opa_with_notes: Any) -> Any:
    loop = asyncio.new_event_loop()
    remote = OpaEngine(opa_with_notes.url, ENTRY, timeout=5)
    loop.run_until_complete(remote.start())
    yield loop, wasm_engine(NOTES_DATA), remote
    loop.run_until_complete(remote.aclose())
    loop.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=policy_inputs())
def test_wasm_and_opa_agree_on_generated_inputs(engines: Any, case: dict[str, Any]) -> None:
    loop, wasm, remote = engines
    ours = loop.run_until_complete(wasm.decide(case)).as_dict()
    theirs = loop.run_until_complete(remote.decide(case)).as_dict()
    assert ours == theirs, json.dumps(case)[:2000]


def test_the_shipped_module_is_built_from_the_shipped_rego() -> None:
    """Edit policies/ and this fails until `python -m gateway.policy.wasmbuild` rebuilds the module."""
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    assert manifest["digest"] == rego_digest(load_bundle(ROOT / "policies"), ENTRY)
    assert wasm_for(load_bundle(ROOT / "policies"), ENTRY)[1] == "shipped"


def _settings(bundle: Path, engine: str = "embedded", timeout: float = 1.0) -> Settings:
    config = GatewayConfig.model_validate({"public_url": "http://127.0.0.1:1", "upstream": {"url": "http://127.0.0.1:1/mcp"},
                                           "profile": "dev", "policy": {"engine": engine, "bundle": str(bundle), "timeout": timeout}})
    return Settings(config=config, path=bundle / "gateway.yaml", bundle_dir=bundle)


def _custom_bundle(tmp_path: Path, rule: str) -> Path:
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "p.rego").write_text(f"package mcp.gateway\n\n{rule}\n")
    return bundle


def test_a_custom_bundle_is_built_with_opa_then_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opa = find_opa()
    assert opa, "the tests need an opa binary (OPA_BIN, PATH, or ../shared/bin/opa)"
    monkeypatch.setenv("OPA_BIN", opa)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bundle = _custom_bundle(tmp_path, 'decision := {"action": "reject", "reason": concat("-", ["custom", input.x]), "status": 403}')
    first = build_engine(_settings(bundle))
    assert isinstance(first, WasmEngine) and first.source == "opa"
    assert first.evaluate({"x": "y"})["reason"] == "custom-y"
    monkeypatch.setenv("OPA_BIN", "/nonexistent")
    monkeypatch.setenv("PATH", "/nonexistent")
    again = build_engine(_settings(bundle))
    assert isinstance(again, WasmEngine) and again.source == "cache"


def test_without_opa_a_custom_bundle_falls_back_to_regopy_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("OPA_BIN", "/nonexistent")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bundle = _custom_bundle(tmp_path, 'decision := {"action": "accept", "reason": "ok"}')
    engine = build_engine(_settings(bundle))
    assert isinstance(engine, EmbeddedEngine) and "no opa binary" in (engine.fallback_reason or "")
    assert "falls back" in caplog.text or "regopy, not WebAssembly" in caplog.text
    with pytest.raises(PolicyError, match="policy.engine: wasm"):
        build_engine(_settings(bundle, engine="wasm"))
    with pytest.raises(WasmUnavailable):
        wasm_for(load_bundle(bundle), ENTRY)


def test_a_policy_needing_a_host_builtin_is_not_run_in_wasm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opa = find_opa()
    assert opa
    monkeypatch.setenv("OPA_BIN", opa)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bundle = _custom_bundle(tmp_path, 'decision := {"action": "reject", "reason": sprintf("n=%v", [input.n]), "status": 403}')
    engine = build_engine(_settings(bundle))
    assert isinstance(engine, EmbeddedEngine) and "sprintf" in (engine.fallback_reason or "")
    with pytest.raises(PolicyError, match="sprintf"):
        build_engine(_settings(bundle, engine="wasm"))


async def test_a_runaway_evaluation_is_interrupted_at_the_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opa = find_opa()
    assert opa
    monkeypatch.setenv("OPA_BIN", opa)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bundle = _custom_bundle(tmp_path, 'decision := {"action": "accept", "reason": format_int(count([x | some x in numbers.range(1, input.n)]), 10)}')
    engine = build_engine(_settings(bundle, engine="wasm", timeout=0.2))
    assert (await engine.decide({"n": 10})).reason == "10"
    started = time.monotonic()
    with pytest.raises(PolicyError) as exc:
        await engine.decide({"n": 1_000_000_000})
    assert exc.value.reason == "policy_timeout" and time.monotonic() - started < 2
    assert (await engine.decide({"n": 10})).reason == "10"  # the engine goes on
    await engine.aclose()


async def test_multi_wildcard_patterns_are_decided_in_linear_time(tmp_path: Path) -> None:
    """Before: `*_*_*_*_*_admin` or `files://*/*/*/*/*/*.md` against a 240-character name froze
    the gateway for 20 s (regopy's backtracking glob). In WebAssembly OPA matches globs with
    re2 (linear time): the decision comes well inside its fuel budget, never policy_timeout."""
    data = tmp_path / "authz.yaml"
    data.write_text(json.dumps({"authz": {"unlisted": "deny", "tools": {"*_*_*_*_*_admin": {"scopes": ["a"]}},
                                          "resources": {"files://*/*/*/*/*/*.md": {"scopes": ["a"]}}}}))
    engine = wasm_engine(data, timeout=0.5)
    tool = "a_" * 63 + "xx"  # 128 characters, the longest tool name allowed
    uri = "files://" + "a/" * 116 + "x"  # 240 characters, never ending in .md
    for method, name, reason in (("tools/call", tool, "tool_not_listed"), ("resources/read", uri, "resource_not_listed")):
        case = policy_input(token("mcp-client", scope="a"), profile(RULES["A_strict"]), tool="x")
        catalogue = "tools" if method == "tools/call" else "resources"
        case["mcp"] = {**case["mcp"], "method": method, "tool": name if catalogue == "tools" else None,
                       "resource_uri": name if catalogue == "resources" else None, "targets": [{"catalogue": catalogue, "name": name}]}
        assert (await engine.decide(case)).reason == reason
    await engine.aclose()


TEAM_DATA = ROOT / "examples" / "team-rules.yaml"


def team_case(tool: str, arguments: dict[str, Any], client: str, groups: Any) -> dict[str, Any]:
    case = policy_input(token("mcp-client", scope="notes.read notes.write"), profile(RULES["A_strict"]), tool=tool)
    case["mcp"] = {**case["mcp"], "arguments": arguments}
    case["token"] = {**case["token"], "client_id": client, "claims": {**case["token"]["claims"], "azp": client, "groups": groups}}
    return case


async def test_a_teams_rules_as_data_decide_alike_in_every_engine(tmp_path: Path) -> None:
    """The shipped example of rules without Rego (claims, not_contains, pattern, clients):
    WebAssembly, regopy and a real OPA give the same decisions."""
    cases = [
        (team_case("purge_all", {}, "mcp-client", ["notes-admins"]), "allowed"),
        (team_case("purge_all", {}, "mcp-client", ["staff"]), "claim_not_allowed: groups"),
        (team_case("create_note", {"title": "a PASSWORD note"}, "mcp-client", []), "argument_not_allowed: title"),
        (team_case("create_note", {"title": "groceries"}, "mcp-client", []), "allowed"),
        (team_case("create_note", {"title": "groceries"}, "untrusted-agent", []), "client_not_allowed"),
        (team_case("read_note", {}, "untrusted-agent", []), "allowed"),
    ]
    opa = start_opa(ROOT / "policies", tmp_path, TEAM_DATA)
    wasm, regopy = wasm_engine(TEAM_DATA), EmbeddedEngine(load_bundle(ROOT / "policies", (TEAM_DATA,)), ENTRY)
    remote = OpaEngine(opa.url, ENTRY, timeout=5)
    await remote.start()
    try:
        for case, expected in cases:
            ours, theirs, old = (await wasm.decide(case)).as_dict(), (await remote.decide(case)).as_dict(), (await regopy.decide(case)).as_dict()
            assert ours == theirs == old, (case["mcp"], ours, theirs, old)
            assert ours["reason"] == expected, (case["mcp"], ours)
    finally:
        await remote.aclose()
        await wasm.aclose()
        opa.stop()
