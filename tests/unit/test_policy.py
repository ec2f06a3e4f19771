"""The embedded engine with the shipped policy, the decision contract, and the Rego test runner."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from gateway.auth.tokens import VerifiedToken
from gateway.config.profiles import Profile
from gateway.mcp.messages import parse_post
from gateway.policy.bundle import load_bundle
from gateway.policy.decision import Action, Decision, PolicyError
from gateway.policy.embedded import EmbeddedEngine
from gateway.policy.input import build_input
from gateway.policy.regotest import run_tests_isolated

ROOT = Path(__file__).resolve().parents[2]
RESOURCE = "http://gw.example/mcp"
ENTRY = "mcp/gateway/decision"


@pytest.fixture(scope="module")
def engine() -> EmbeddedEngine:
    return EmbeddedEngine(load_bundle(ROOT / "policies"), ENTRY)


def token(aud: Any, **claims: Any) -> VerifiedToken:
    auds = () if aud is None else ((aud,) if isinstance(aud, str) else tuple(aud))
    body = {"iss": "http://idp", "sub": "alice", "exp": 2e9, **({} if aud is None else {"aud": aud}), **claims}
    scopes = tuple(str(claims.get("scope", "")).split())
    return VerifiedToken("jwt", "h", body, "http://idp", "alice", claims.get("client_id"), scopes, auds, 2e9)


def profile(audience: dict[str, Any], mode: str = "passthrough") -> Profile:
    data: dict[str, Any] = {"name": "p", "issuer": "http://idp", "audience": audience, "mode": mode}
    if mode == "exchange":
        data["exchange"] = {"client": {"client_id": "gw", "client_secret": "s"}, "audience": ["backend"], "scope": ["notes.read"]}
    return Profile.model_validate(data).bind(resource=RESOURCE, public_url="http://gw.example")


def policy_input(tok: VerifiedToken, prof: Profile, tool: str = "list_notes") -> dict[str, Any]:
    body = ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":%s}}' % __import__("json").dumps(tool)).encode()
    mcp = parse_post(body, {}, max_depth=16)
    return build_input(token=tok, profile=prof, mcp=mcp, http_method="POST", path="/mcp", headers={"authorization": "Bearer secret", "user-agent": "t"}, remote_addr="127.0.0.1", resource=RESOURCE)


# The five audience rules of docs/profiles.md, each only profile data, against a token matrix.
RULES = {
    "A_strict": {"accept": ["mcp-client"], "missing": "reject"},
    "B_flexible": {"accept": ["*"], "reject": ["nextcloud"], "missing": "accept"},
    "C_resource_too": {"accept": ["mcp-client", "{resource}"], "reject": ["nextcloud"], "missing": "accept"},
    "D_unified": {"accept": ["mcp-client", "{public_url}", "{resource}"], "match": "all", "missing": "reject"},
    "E_fallback": {"accept": ["mcp-client", "{public_url}", "{resource}"], "match": "all", "missing": "claim:client_id"},
}
TOKENS = {
    "string": ("mcp-client", {}),
    "list": (["mcp-client", "account"], {}),
    "none": (None, {"client_id": "mcp-client"}),
    "nextcloud": (["mcp-client", "nextcloud"], {}),
    "resource": (RESOURCE, {}),
    "foreign": ("someone-else", {}),
}
EXPECTED = {  # rule → token kind → reason
    "A_strict": {"string": "allowed", "list": "allowed", "none": "audience_missing", "nextcloud": "allowed", "resource": "audience_not_accepted", "foreign": "audience_not_accepted"},
    "B_flexible": {"string": "allowed", "list": "allowed", "none": "allowed", "nextcloud": "audience_forbidden", "resource": "allowed", "foreign": "allowed"},
    "C_resource_too": {"string": "allowed", "list": "allowed", "none": "allowed", "nextcloud": "audience_forbidden", "resource": "allowed", "foreign": "audience_not_accepted"},
    "D_unified": {"string": "allowed", "list": "audience_not_accepted", "none": "audience_missing", "nextcloud": "audience_not_accepted", "resource": "allowed", "foreign": "audience_not_accepted"},
    "E_fallback": {"string": "allowed", "list": "audience_not_accepted", "none": "allowed", "nextcloud": "audience_not_accepted", "resource": "allowed", "foreign": "audience_not_accepted"},
}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("kind", TOKENS)
async def test_audience_rules_as_profile_data(engine, rule, kind) -> None:
    aud, claims = TOKENS[kind]
    decision = await engine.decide(policy_input(token(aud, **claims), profile(RULES[rule])))
    assert decision.reason == EXPECTED[rule][kind]
    assert decision.action is (Action.ACCEPT if decision.reason == "allowed" else Action.REJECT)
    if decision.action is Action.REJECT:
        assert decision.status == 401


async def test_exchange_mode_decision_carries_audience_and_scopes(engine) -> None:
    d = await engine.decide(policy_input(token("mcp-client"), profile(RULES["A_strict"], mode="exchange")))
    assert (d.action, d.audience, d.scopes) == (Action.EXCHANGE, ("backend",), ("notes.read",))


def test_policy_input_carries_no_credentials() -> None:
    inp = policy_input(token("x"), profile(RULES["A_strict"]))
    assert "authorization" not in inp["request"]["headers"]
    assert "secret" not in str(inp)
    assert set(inp) == {"token", "profile", "mcp", "request", "gateway"}


ECHO = 'package mcp.gateway\n\ndecision := {"action": "reject", "reason": input.mcp.tool}\n'


@pytest.mark.parametrize("name", ['a"b', "a\\b", "a\nb", "a\x00b", "ré\u202ead", "x" * 5000])
async def test_hostile_names_reach_the_policy_unchanged(tmp_path, name) -> None:
    (tmp_path / "echo.rego").write_text(ECHO)
    echo = EmbeddedEngine(load_bundle(tmp_path), ENTRY)
    d = await echo.decide(policy_input(token("x"), profile(RULES["A_strict"]), tool=name))
    assert d.reason == name


@pytest.mark.parametrize(
    "rego,message",
    [
        ('package mcp.gateway\n\ndecision := {"action": "allow", "reason": "x"}\n', "decision.action"),
        ('package mcp.gateway\n\ndecision := {"action": "accept"}\n', "decision.reason"),
        ('package mcp.gateway\n\ndecision := {"action": "reject", "reason": "r", "status": 200}\n', "decision.status"),
        ('package mcp.gateway\n\ndecision := "accept"\n', "not an object"),
        ('package mcp.gateway\n\ndecision := {"action": "accept", "reason": "r"} if input.nothing\n', "undefined"),
    ],
)
async def test_malformed_or_undefined_decisions_fail_closed(tmp_path, rego, message) -> None:
    (tmp_path / "p.rego").write_text(rego)
    bad = EmbeddedEngine(load_bundle(tmp_path), ENTRY)
    with pytest.raises(PolicyError, match=message):
        await bad.decide(policy_input(token("x"), profile(RULES["A_strict"])))


def test_policy_that_does_not_compile_is_refused(tmp_path) -> None:
    (tmp_path / "p.rego").write_text("package mcp.gateway\n\ndecision := {\n")
    with pytest.raises(PolicyError, match="does not compile"):
        EmbeddedEngine(load_bundle(tmp_path), ENTRY)


def test_decision_from_output_roundtrip() -> None:
    d = Decision.from_output({"action": "exchange", "reason": "r", "scopes": ["b", "a"], "audience": "x"})
    assert d.as_dict() == {"action": "exchange", "reason": "r", "scopes": ["b", "a"], "audience": ["x"]}


def test_shipped_rego_tests_pass_in_embedded_engine() -> None:
    report = run_tests_isolated(ROOT / "policies")
    assert report.error is None and report.results
    assert not report.failed, report.failed


def test_failing_rego_test_reported(tmp_path) -> None:
    (tmp_path / "p.rego").write_text('package mcp.gateway\n\ndefault decision := {"action": "reject", "reason": "no"}\n')
    (tmp_path / "p_test.rego").write_text(
        "package mcp.gateway_test\n\nimport data.mcp.gateway\n\n"
        'test_rejects if gateway.decision.action == "reject"\n\ntest_accepts if gateway.decision.action == "accept"\n'
    )
    report = run_tests_isolated(tmp_path)
    assert [r.rule for r in report.failed] == ["data.mcp.gateway_test.test_accepts"]
    assert report.exit_code == 2


def test_engine_crash_during_tests_is_a_report(tmp_path) -> None:
    """regopy segfaults on `with input as X` + a builtin; the runner survives and says so."""
    (tmp_path / "p.rego").write_text("package g\n\nallow if count(input.l) > 0\n")
    (tmp_path / "p_test.rego").write_text('package g_test\n\ntest_x if data.g.allow with input as {"l": [1]}\n')
    report = run_tests_isolated(tmp_path)
    assert report.error is not None and "crashed" in report.error
    assert report.exit_code == 1


def test_bundle_data_files_placed_by_directory(tmp_path) -> None:
    (tmp_path / "p.rego").write_text('package mcp.gateway\n\ndecision := {"action": "reject", "reason": data.tools.reason}\n')
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "anything.yaml").write_text("reason: from-data\n")
    bundle = load_bundle(tmp_path)
    assert bundle.data == {"tools": {"reason": "from-data"}}
    assert EmbeddedEngine(bundle, ENTRY).evaluate({}) == {"action": "reject", "reason": "from-data"}


def test_method_list_covers_every_client_method_of_the_sdk() -> None:
    """policies/mcp-methods.yaml must not fall behind the protocol the SDK speaks."""
    import typing

    import mcp.types as types

    from gateway.policy.bundle import load_bundle

    def methods(union: Any) -> set[str]:
        return {a for cls in typing.get_args(union) for a in typing.get_args(cls.model_fields["method"].annotation)}

    listed = load_bundle(ROOT / "policies").data["mcp_methods"]
    assert methods(types.ClientRequest) <= set(listed["requests"])
    assert methods(types.ClientNotification) <= set(listed["notifications"])


def test_a_compile_error_names_file_line_and_column(tmp_path: Path) -> None:
    """regopy reports a byte offset in an S-expression; the gateway says file:line:col."""
    (tmp_path / "p.rego").write_text("package mcp.gateway\n\ndecision := d if {\n\td := input.a ==\n}\n")
    with pytest.raises(PolicyError) as info:
        EmbeddedEngine(load_bundle(tmp_path), ENTRY)
    assert re.search(r"p\.rego:4:\d+: ", str(info.value)), str(info.value)
    assert "errorseq" not in str(info.value)
