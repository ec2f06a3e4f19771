"""Smaller findings of the outside review, each fixed at its root (hardening items 7, 12, 13,
16, 17): each test failed on the code before its fix."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.config.settings import Upstream
from gateway.explain import redact
from gateway.mcp.messages import McpInputError, parse_post
from gateway.mcp.sessions import session_owner
from gateway.mcp.upstream import UpstreamClient
from gateway.ops.audit import DecisionLog, DecisionRecord
from tests.conftest import ThreadServer, free_port


@pytest.mark.parametrize("body,reason", [
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"a":NaN}}}', "invalid_json"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"a":-Infinity}}}', "invalid_json"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":1e400}}', "invalid_json"),
    (b'{"jsonrpc":"2.0","id":"\\ud800","method":"ping"}', "invalid_unicode"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"\\udfff":1}}}', "invalid_unicode"),
])
def test_bodies_that_are_not_unicode_json_are_refused(body: bytes, reason: str) -> None:
    with pytest.raises(McpInputError) as exc:
        parse_post(body, {}, max_depth=16)
    assert exc.value.status == 400 and exc.value.reason == reason


def test_a_proper_surrogate_pair_is_fine() -> None:
    m = parse_post(b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"\\ud83d\\ude00"}}', {}, max_depth=16)
    assert m.params["x"] == "😀"


@pytest.mark.parametrize("exp", ["NaN", "Infinity", "1e400"])
async def test_a_token_that_would_never_expire_is_refused(issuer: Any, exp: str) -> None:
    """exp NaN, Infinity or 1e400 was accepted: a token that never expires."""
    import httpx

    from gateway.auth.tokens import TokenError
    from tests.unit.test_tokens import claims, make_verifier, sign_raw

    payload = claims(issuer).replace('"exp": ', '"exp": ' + exp + ', "old_exp": ')
    async with httpx.AsyncClient() as http:
        with pytest.raises(TokenError) as info:
            await make_verifier(issuer, http).verify(sign_raw(issuer, payload))
    assert info.value.status == 401


def test_session_owners_are_unambiguous() -> None:
    """client:None, sub "" and sub "client:<azp>" could share a session."""
    tok = lambda sub, client: SimpleNamespace(issuer="i", subject=sub, client_id=client)  # noqa: E731
    assert session_owner(tok("client:app", None)) != session_owner(tok(None, "app"))
    assert session_owner(tok("", "app")) == session_owner(tok(None, "app"))
    assert session_owner(tok("", None)) is None and session_owner(tok(None, None)) is None


def test_explain_shows_no_character_of_a_token() -> None:
    secret = "opaque-token-secret-part-1234567890"
    shown = redact(secret)
    assert secret[:4] not in shown and "sha256" in shown


def test_the_decision_log_hashes_session_ids(tmp_path: Any) -> None:
    log = DecisionLog(str(tmp_path / "d.jsonl"))
    record = DecisionRecord(path="p")
    record.input = {"mcp": {"session_id": "the-session-secret"}, "request": {"headers": {"mcp-session-id": "the-session-secret"}},
                    "token": {"claims": {}}}
    log.write(record, status=200)
    log.close()
    text = (tmp_path / "d.jsonl").read_text()
    assert "the-session-secret" not in text and text.count("sha256:") == 2


async def test_only_allowed_response_headers_are_relayed() -> None:
    """Set-Cookie, CORS and arbitrary upstream headers were relayed almost verbatim."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        headers = [(b"content-type", b"application/json"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"),
                   (b"access-control-allow-origin", b"*"), (b"x-internal-host", b"db-7"), (b"mcp-session-id", b"s1"),
                   (b"www-authenticate", b"Basic")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})

    port = free_port()
    server = ThreadServer(app, port)
    server.start()
    client = UpstreamClient(Upstream(url=f"http://127.0.0.1:{port}/mcp", relay_headers=("x-internal-host",)))
    try:
        answer = await client.send(method="POST", headers={"content-type": "application/json"}, body=b"{}")
        names = [k.lower() for k, _ in answer.headers]
        assert sorted(names) == ["content-type", "mcp-session-id", "x-internal-host"]
        client_default = UpstreamClient(Upstream(url=f"http://127.0.0.1:{port}/mcp"))
        answer = await client_default.send(method="POST", headers={"content-type": "application/json"}, body=b"{}")
        assert "x-internal-host" not in [k.lower() for k, _ in answer.headers]
        await client_default.aclose()
    finally:
        await client.aclose()
        server.stop()


def test_an_echoed_token_is_masked_in_any_encoding() -> None:
    """Redaction masked only the exact raw token; an IdP echoing it encoded leaked it."""
    import base64
    from urllib.parse import quote

    from gateway.auth.exchange import _scrub

    raw = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXBhcnQ="
    for echoed in (raw, quote(raw, safe=""), base64.b64encode(raw.encode()).decode(), raw.replace("/", "\\/")):
        scrubbed = _scrub(f"invalid subject_token {echoed} for client")
        assert "eyJ" not in scrubbed and "ZXlK" not in scrubbed and "invalid subject_token" in scrubbed


def test_a_decision_log_line_is_capped_and_says_so(tmp_path: Any) -> None:
    """The whole input (up to the body limit) was logged even for refusals."""
    log = DecisionLog(str(tmp_path / "d.jsonl"), max_line_bytes=4_096)
    record = DecisionRecord(path="p")
    record.result = {"action": "reject", "reason": "argument_not_allowed: path"}
    record.input = {"token": {"claims": {}, "subject": "alice"}, "mcp": {"method": "tools/call", "tool": "create_note",
                    "arguments": {"blob": "x" * 200_000}, "params": {"name": "create_note"}}}
    log.write(record, status=403)
    log.close()
    line = (tmp_path / "d.jsonl").read_text()
    entry = json.loads(line)
    assert len(line) < 4_096 and entry["input_truncated"]["bytes"] > 200_000
    assert entry["result"]["reason"] == "argument_not_allowed: path" and entry["input"]["mcp"]["tool"] == "create_note"
    assert "arguments" not in entry["input"]["mcp"]
