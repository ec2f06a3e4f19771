"""MCP request parsing: both transport revisions, header/body consistency, bad input."""

from __future__ import annotations

import json

import pytest
from mcp.shared.inbound import encode_header_value

from gateway.mcp.messages import McpInputError, parse_post, parse_stream_request


def parse(body: object, **headers: str):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_post(raw, {k.lower().replace("_", "-"): v for k, v in headers.items()}, max_depth=16)


def call(name: str, args: dict | None = None, **meta: object) -> dict:
    params: dict = {"name": name, "arguments": args or {}}
    if meta:
        params["_meta"] = meta
    return {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": params}


def test_tools_call_parsed() -> None:
    m = parse(call("read_note", {"id": 1}))
    assert (m.kind, m.method, m.tool, m.arguments, m.id) == ("request", "tools/call", "read_note", {"id": 1}, 3)
    view = m.policy_view()
    assert view["tool"] == "read_note" and view["arguments"] == {"id": 1}
    assert "arguments" not in view["params"]  # each thing once in the policy input


def test_modern_headers_matching_the_body_accepted() -> None:
    body = call("read_note", **{"io.modelcontextprotocol/protocolVersion": "2026-07-28"})
    m = parse(body, mcp_method="tools/call", mcp_name="read_note", mcp_protocol_version="2026-07-28")
    assert m.protocol_version == "2026-07-28"


def test_base64_encoded_name_header_decoded() -> None:
    name = "notes-ü"
    m = parse(call(name), mcp_method="tools/call", mcp_name=encode_header_value(name))
    assert m.tool == name


@pytest.mark.parametrize(
    "headers",
    [
        {"mcp_method": "tools/list"},
        {"mcp_method": "tools/call", "mcp_name": "delete_note"},
        {"mcp_method": "tools/call"},  # a modern request must name the tool in the header
        {"mcp_name": "other"},
        {"mcp_protocol_version": "2025-11-25"},
    ],
)
def test_header_contradicting_body_refused(headers) -> None:
    body = call("read_note", **{"io.modelcontextprotocol/protocolVersion": "2026-07-28"})
    with pytest.raises(McpInputError) as info:
        parse(body, **headers)
    assert (info.value.status, info.value.code, info.value.reason) == (400, -32020, "header_mismatch")


def test_initialize_protocol_version_and_session() -> None:
    body = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-11-25", "capabilities": {}}}
    m = parse(body, mcp_session_id="abc")
    assert (m.protocol_version, m.session_id) == ("2025-11-25", "abc")


def test_notifications_and_responses() -> None:
    assert parse({"jsonrpc": "2.0", "method": "notifications/initialized"}).kind == "notification"
    assert parse({"jsonrpc": "2.0", "id": 5, "result": {}}).kind == "response"


def test_get_and_delete_have_no_body() -> None:
    m = parse_stream_request("GET", {"mcp-session-id": "s1", "mcp-protocol-version": "2025-11-25"})
    assert (m.kind, m.method, m.session_id) == (None, None, "s1")


@pytest.mark.parametrize(
    "body,reason",
    [
        (b"", "empty_body"),
        (b"   ", "empty_body"),
        (b"{", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"null", "not_an_object"),
        (b"[]", "batch_not_supported"),
        (json.dumps([call("a")] * 3000).encode(), "batch_not_supported"),
        (b'{"jsonrpc":"1.0","id":1,"method":"x"}', "invalid_envelope"),
        (b'{"jsonrpc":"2.0","id":true,"method":"x"}', "invalid_envelope"),
        (b'{"jsonrpc":"2.0","id":1,"method":7}', "invalid_envelope"),
        (b'{"jsonrpc":"2.0","id":1}', "invalid_envelope"),
        (b'{"jsonrpc":"2.0","id":1,"method":"x","params":[1]}', "invalid_params"),
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":5}}', "invalid_params"),
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":[]}}', "invalid_params"),
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","name":"b"}}', "invalid_json"),
        (b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"a":' + b"[" * 40 + b"]" * 40 + b"}}", "too_deep"),
        (b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}", "too_deep"),
    ],
)
def test_bad_input_refused_with_reason(body, reason) -> None:
    with pytest.raises(McpInputError) as info:
        parse(body)
    assert info.value.reason == reason
    assert 400 <= info.value.status < 500


@pytest.mark.parametrize("name", ['a"b', "a\\b", "a\nb", "a\x00b", "rеad_note", "x" * 10000])
def test_hostile_tool_names_parse_to_exactly_that_name(name) -> None:
    """Names are data: they reach the policy unchanged (the policy decides)."""
    assert parse(call(name)).tool == name


@pytest.mark.parametrize("method", ["initialize", "ping", "logging/setLevel", "resources/subscribe", "resources/unsubscribe"])
def test_a_method_removed_by_the_stateless_revision_is_not_found_before_its_params_are_checked(method: str) -> None:
    """2026-07-28 answers a method it does not have with 404 / -32601 (the conformance suite's
    server-stateless scenario); the params of a method that does not exist are not judged."""
    body = {"jsonrpc": "2.0", "id": 3, "method": method, "params": {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}}
    with pytest.raises(McpInputError) as err:
        parse(body, mcp_protocol_version="2026-07-28")
    assert (err.value.status, err.value.code, err.value.reason, err.value.request_id) == (404, -32601, "unknown_method", 3)
    # the same method in 2025-11-25 is judged as before (resources/subscribe without a uri: bad params)
    if method.startswith("resources/"):
        with pytest.raises(McpInputError) as err:
            parse({"jsonrpc": "2.0", "id": 3, "method": method, "params": {}}, mcp_protocol_version="2025-11-25")
        assert (err.value.status, err.value.reason) == (400, "invalid_params")
