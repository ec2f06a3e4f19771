"""`mcp-authz-gateway explain`: what the gateway would decide for a token and an MCP request.

It builds the same policy input as the request path, asks the configured engine, and
says what the gateway would do. Nothing is sent upstream and no exchange happens; a
real token is verified as the gateway would (that may fetch the issuer's keys).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gateway.assembly import (
    Gateway,  # the gateway's own verifier, built from the same config
)
from gateway.auth.tokens import TokenError, VerifiedToken, normalise_claims, token_hash
from gateway.config.profiles import Profile, load_profile
from gateway.config.settings import Settings
from gateway.mcp.messages import McpInputError, parse_post
from gateway.policy.decision import Action, Decision
from gateway.policy.engines import build_engine
from gateway.policy.input import build_input


def redact(raw: str) -> str:
    """A token as explain may show it: its hash's prefix, never a character of the token
    (an opaque token's first characters are part of the secret)."""
    return f"[redacted, sha256 {token_hash(raw)[:16]}…]"


def token_from_claims(claims: dict[str, Any], profile: Profile) -> VerifiedToken:
    """Claims taken as verified (explain --claims): normalised exactly as a real token's."""
    subject, client, scopes, audiences = normalise_claims(claims, profile)
    exp = claims.get("exp", 0)
    return VerifiedToken("jwt", "claims-file", claims, str(claims.get("iss", profile.issuer)), subject, client, scopes, audiences, float(exp or 0))


def mcp_body(request: str | None, tool: str | None, args: str | None) -> bytes:
    if request is not None:
        text = Path(request[1:]).read_text() if request.startswith("@") else request
        return text.encode()
    if tool is None:
        raise ValueError("give --request JSON (or @file) or --tool NAME [--args JSON]")
    arguments = json.loads(args) if args else {}
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}).encode()


def what_happens(decision: Decision, profile: Profile) -> str:
    if decision.action is Action.ACCEPT:
        return "forward to the upstream as is (with the client's own token)"
    if decision.action is Action.EXCHANGE:
        exchange = profile.exchange
        audience = decision.audience or (exchange.audience if exchange else ())
        scopes = decision.scopes or (exchange.scope if exchange else ())
        return (
            f"exchange the client's token for audience {', '.join(audience) or '(none)'} "
            f"with scopes {', '.join(scopes) or '(the token’s own)'}, then forward only the new token"
        )
    status = decision.status or 403
    extra = ""
    if status == 401:
        extra = ' with WWW-Authenticate: Bearer error="invalid_token"'
    elif status == 403 and decision.scopes:
        extra = f' with WWW-Authenticate: Bearer error="insufficient_scope", scope="{" ".join(decision.scopes)}"'
    return f"refuse with status {status} ({decision.reason}){extra}"


async def explain(settings: Settings, *, raw_token: str | None, claims_file: str | None, body: bytes) -> tuple[str, int]:
    """(report text, exit code): 0 the request would be forwarded, 1 refused, 2 bad arguments."""
    cfg = settings.config
    profile = load_profile(cfg.profile, settings.base_dir, resource=cfg.resource, public_url=cfg.public_url)
    lines: list[str] = []
    if claims_file:
        token = token_from_claims(json.loads(Path(claims_file).read_text()), profile)
        lines.append(f"token: claims from {claims_file} (taken as verified)")
    elif raw_token:
        gateway = Gateway.build(settings)
        try:
            token = await gateway.verifier.verify(raw_token)
        except TokenError as exc:
            return f"token: {redact(raw_token)}\nverification failed: {exc.reason}: {exc.description}\n" \
                   f"the gateway would: refuse with status {exc.status} ({exc.reason})", 1
        finally:
            await gateway.aclose()
        lines.append(f"token: {redact(raw_token)} (verified, sha256 {token_hash(raw_token)[:16]}…)")
    else:
        return "give --token TOKEN or --claims FILE", 2
    try:
        mcp = parse_post(body, {}, max_depth=cfg.limits.max_json_depth)
    except McpInputError as exc:
        return f"the gateway would: refuse with status {exc.status} ({exc.reason}: {exc.message})", 1
    policy_input = build_input(
        token=token, profile=profile, mcp=mcp, http_method="POST", path=cfg.mcp_path, headers={}, remote_addr=None, resource=cfg.resource
    )
    engine = build_engine(settings)
    try:
        await engine.start()
        decision = await engine.decide(policy_input)
    finally:
        await engine.aclose()
    lines += [
        f"engine: {engine.name} ({cfg.policy.entrypoint})",
        "policy input:",
        json.dumps(policy_input, indent=2, ensure_ascii=False),
        "decision: " + json.dumps(decision.as_dict(), ensure_ascii=False),
        f"reason: {decision.reason}",
        "the gateway would: " + what_happens(decision, profile),
    ]
    return "\n".join(lines), 0 if decision.action is not Action.REJECT else 1

