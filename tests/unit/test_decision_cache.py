"""The decision cache: on only for a policy that declares itself pure, keyed by the
canonical input, and the shipped policy's promise (the paths it ignores) checked."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config.settings import load_config
from gateway.policy.bundle import load_bundle
from gateway.policy.cache import CacheDeclaration, CachingEngine, canonical_key
from gateway.policy.decision import PolicyError
from gateway.policy.embedded import EmbeddedEngine
from gateway.policy.engines import with_decision_cache
from tests.unit.test_policy import RULES, policy_input, profile, token

ROOT = Path(__file__).resolve().parents[2]
ENTRY = "mcp/gateway/decision"
NOTES = ROOT / "examples" / "notes-authz.yaml"


@pytest.fixture(scope="module")
def engine() -> EmbeddedEngine:
    return EmbeddedEngine(load_bundle(ROOT / "policies", (NOTES,)), ENTRY)


def declaration(engine: EmbeddedEngine) -> CacheDeclaration:
    return CacheDeclaration.from_value(engine.value_of("data.mcp.gateway.decision_cache"))


def test_shipped_policy_declares_itself_pure(engine) -> None:
    d = declaration(engine)
    assert d.pure and ("mcp", "id") in d.ignore and ("token",) not in d.ignore


def test_auto_turns_the_cache_on_only_for_a_declared_policy(tmp_path) -> None:
    def settings_for(bundle: Path, enabled: Any = "auto") -> Any:
        cfg = tmp_path / f"gw-{bundle.name}-{enabled}.yaml"
        cfg.write_text(
            f"public_url: http://gw\nupstream: {{url: http://up/mcp}}\nprofile: dev\n"
            f"policy: {{bundle: {bundle}, decision_cache: {{enabled: {str(enabled).lower()}}}}}\n"
        )
        return load_config(cfg)

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "p.rego").write_text('package mcp.gateway\n\ndecision := {"action": "accept", "reason": "ok"}\n')
    for bundle, enabled, cached in ((ROOT / "policies", "auto", True), (plain, "auto", False), (plain, True, True), (ROOT / "policies", False, False)):
        s = settings_for(bundle, enabled)
        wrapped = with_decision_cache(EmbeddedEngine(load_bundle(bundle), ENTRY), s, load_bundle(bundle))
        assert isinstance(wrapped, CachingEngine) is cached, (bundle.name, enabled)
    # a remote OPA can change its policy without a reload here: auto stays off, true turns it on
    from gateway.policy.opa import OpaEngine

    for enabled, cached in (("auto", False), (True, True)):
        remote = OpaEngine("http://127.0.0.1:9", ENTRY, timeout=1)
        wrapped = with_decision_cache(remote, settings_for(ROOT / "policies", enabled), load_bundle(ROOT / "policies"))
        assert isinstance(wrapped, CachingEngine) is cached, ("opa", enabled)


async def test_hits_misses_and_failures_not_stored(engine) -> None:
    cache = CachingEngine(engine, declaration(engine), size=2)
    base = policy_input(token("mcp-client", scope="notes.read"), profile(RULES["A_strict"]), tool="list_notes")
    other_id = copy.deepcopy(base)
    other_id["mcp"]["id"] = 999
    first = await cache.decide(base)
    assert await cache.decide(other_id) == first  # the id is ignored: a hit
    assert (cache.hits, cache.misses) == (1, 1)
    other_tool = policy_input(token("mcp-client", scope="notes.read"), profile(RULES["A_strict"]), tool="create_note")
    assert (await cache.decide(other_tool)).reason != first.reason
    assert cache.misses == 2

    class Failing:
        name = "failing"
        calls = 0

        async def decide(self, _: Any) -> Any:
            Failing.calls += 1
            raise PolicyError("boom")

    failing = CachingEngine(Failing(), CacheDeclaration(pure=True), size=10)  # type: ignore[arg-type]
    for _ in range(2):
        with pytest.raises(PolicyError):
            await failing.decide(base)
    assert Failing.calls == 2


def test_key_is_canonical() -> None:
    a = {"b": 1, "a": {"y": 2, "x": [1, 2]}, "mcp": {"id": 1, "tool": "t"}}
    b = {"mcp": {"tool": "t", "id": 2}, "a": {"x": [1, 2], "y": 2}, "b": 1}
    ignore = (("mcp", "id"),)
    assert canonical_key(a, ignore) == canonical_key(b, ignore)
    assert canonical_key(a, ()) != canonical_key(b, ())
    assert a["mcp"]["id"] == 1  # the input itself is left alone


noise = st.one_of(st.none(), st.integers(), st.text(max_size=20), st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))


@settings(max_examples=150, deadline=None)
@given(
    tool=st.sampled_from(["list_notes", "create_note", "delete_note", "purge_notes", "unknown"]),
    scope=st.sampled_from(["", "notes.read", "notes.read notes.write", "notes.admin"]),
    values=st.lists(noise, min_size=7, max_size=7),
)
def test_ignored_paths_never_change_the_decision(engine, tool, scope, values) -> None:
    """The shipped policy's promise: whatever sits at an ignored path, the decision is the same."""
    d = declaration(engine)
    base = policy_input(token("mcp-client", scope=scope), profile(RULES["A_strict"]), tool=tool)
    base["mcp"]["arguments"] = {"path": "/users/alice/x", "id": 1}
    varied = copy.deepcopy(base)
    for path, value in zip(d.ignore, values):
        node = varied
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    assert engine.evaluate(base) == engine.evaluate(varied)
