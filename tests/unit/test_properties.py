"""Property-based tests (hypothesis) of what the gateway does with hostile input:
the JSON-RPC parser, the policy-input builder, forwarded headers and error bodies.

Properties: only the documented refusal escapes the parser; a parsed message keeps the
exact bytes; the client's token never enters the policy input or the forwarded headers
in exchange mode; every error body is valid JSON-RPC.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.mcp import jsonrpc
from gateway.mcp.messages import McpInputError, parse_post
from gateway.mcp.upstream import (
    FORWARDED_REQUEST_HEADERS,
    HOP_BY_HOP,
    forwarded_headers,
)
from gateway.policy.input import build_input
from tests.unit.test_policy import RESOURCE, RULES, profile, token

CLIENT_TOKEN = "eyJhbGciOiJSUzI1NiJ9.client-token-under-test.signature"
EXCHANGED = "eyJhbGciOiJSUzI1NiJ9.exchanged-token.signature"

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)
methods = st.sampled_from(["tools/call", "tools/list", "prompts/get", "resources/read", "initialize", "ping"]) | st.text(max_size=30)
names = st.text(max_size=40) | st.sampled_from(['a"b', "a\\b", "a\nb", "a\x00b", "list_nоtes", "ｌist", "x" * 300])


@st.composite
def messages(draw: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": draw(st.sampled_from(["2.0", "2.0", "1.0", 2]))}
    if draw(st.booleans()):
        msg["id"] = draw(st.integers() | st.text(max_size=8) | st.none() | st.booleans())
    if draw(st.booleans()):
        msg["method"] = draw(methods)
    params = draw(st.one_of(st.none(), json_values, st.fixed_dictionaries({"name": names, "uri": names, "arguments": json_values})))
    if params is not None or draw(st.booleans()):
        msg["params"] = params
    return msg


header_values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255), max_size=60)
client_headers = st.dictionaries(
    st.sampled_from(sorted(FORWARDED_REQUEST_HEADERS | HOP_BY_HOP | {"host", "origin", "cookie", "x-forwarded-for", "mcp-param-path"}))
    | st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20),
    header_values,
    max_size=8,
)


def _parse(body: bytes, headers: dict[str, str]) -> Any:
    try:
        return parse_post(body, headers, max_depth=16)
    except McpInputError as exc:
        assert 400 <= exc.status < 500 and exc.reason
        return None


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), client_headers)
def test_arbitrary_bytes_only_ever_give_a_refusal(body: bytes, headers: dict[str, str]) -> None:
    parsed = _parse(body, headers)
    if parsed is not None:
        assert parsed.body == body  # what is forwarded is what was judged


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(messages(), client_headers)
def test_policy_input_never_holds_the_token_and_is_json(message: dict[str, Any], headers: dict[str, str]) -> None:
    body = json.dumps(message).encode()
    headers = {**headers, "authorization": f"Bearer {CLIENT_TOKEN}", "cookie": f"session={CLIENT_TOKEN}"}
    parsed = _parse(body, headers)
    if parsed is None:
        return
    policy_input = build_input(
        token=token("mcp-client"), profile=profile(RULES["A_strict"], "exchange"), mcp=parsed, http_method="POST",
        path="/mcp", headers=headers, remote_addr="127.0.0.1", resource=RESOURCE,
    )
    text = json.dumps(policy_input, ensure_ascii=False)
    assert CLIENT_TOKEN not in text
    assert json.loads(text) == policy_input
    assert policy_input["mcp"]["method"] == message.get("method")


@settings(max_examples=400)
@given(client_headers, st.lists(st.sampled_from(["x-tenant", "mcp-param-path", "cookie"]), max_size=2))
def test_forwarded_headers_carry_only_the_allowed_token(headers: dict[str, str], extra: list[str]) -> None:
    headers = {**headers, "authorization": f"Bearer {CLIENT_TOKEN}", "proxy-authorization": CLIENT_TOKEN}
    out = forwarded_headers(headers, tuple(h for h in extra if h != "cookie"), EXCHANGED)
    assert out["authorization"] == f"Bearer {EXCHANGED}"
    assert not any(CLIENT_TOKEN in v for v in out.values())
    assert not (set(out) & (HOP_BY_HOP | {"host", "origin", "cookie"}))


@settings(max_examples=300)
@given(st.text(), st.text(), json_scalars, st.integers(min_value=400, max_value=599))
def test_error_bodies_are_valid_json_rpc(message: str, reason: str, request_id: Any, status: int) -> None:
    payload = json.loads(jsonrpc.error_body(jsonrpc.code_for_status(status, reason), message, reason=reason, request_id=request_id))
    assert payload["jsonrpc"] == "2.0" and payload["error"]["message"] == message
    assert payload["error"]["data"]["reason"] == reason
    assert payload["id"] is None or isinstance(payload["id"], (str, int))
