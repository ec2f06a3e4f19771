"""`mcp-authz-gateway explain`: what the gateway would decide for a token and an MCP request,
or for a decision it logged.

It builds the same policy input as the request path (or takes the one a decision-log line
holds: `--decision-id ID --log FILE`, `--input FILE`), asks the configured engine, and says
what the gateway would do, which of the default policy's checks decided, and whether that
differs from what was logged. Nothing is sent upstream and no exchange happens; a real
token is verified as the gateway would (that may fetch the issuer's keys).
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
from gateway.policy.decision import Action, Decision, PolicyError
from gateway.policy.embedded import EmbeddedEngine
from gateway.policy.engines import build_engine, load_live_bundle
from gateway.policy.input import build_input

#: the default policy's checks, in the order its decision applies them (docs/policy.md)
CHECKS = ("audience_problem", "known_request", "known_method", "invalid_tool_name", "targets", "catalogue_problem",
          "client_problem", "claim_problem", "missing", "argument_problem", "custom_problem",
          "vault_backend", "vault_audience_allowed", "vault_extra_scopes")


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
    if decision.action is Action.DELEGATE:
        return (f"forward a token the vault derives from the user's stored grant, for audience "
                f"{', '.join(decision.audience) or '(the IdP’s choice)'} with scopes {', '.join(decision.scopes) or '(the grant’s)'}; "
                "the client's token goes no further (no grant: 401, sign in again)")
    if decision.action is Action.RELEASE:
        return (f"release the user's token to the backend, for audience {', '.join(decision.audience)} "
                f"with scopes {', '.join(decision.scopes)} (POST /vault/token answers it)")
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



def logged_entry(log_file: Path, decision_id: str) -> dict[str, Any]:
    """The decision-log line with this id; ValueError if none."""
    with log_file.open(encoding="utf-8") as lines:
        for line in lines:
            if decision_id in line:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("decision_id") == decision_id:
                    return entry
    raise ValueError(f"no decision {decision_id} in {log_file}")


def trace(settings: Settings, policy_input: dict[str, Any]) -> list[str]:
    """Each check of the default policy with its value for this input (the rules that
    decided), as `opa eval --explain` would point at them; a check a custom bundle does not
    have is left out."""
    package = "data." + settings.config.policy.entrypoint.rsplit("/", 1)[0].replace("/", ".")
    engine = EmbeddedEngine(load_live_bundle(settings), settings.config.policy.entrypoint)
    engine.evaluate(policy_input)  # sets the input (and raises the real error, if any)
    lines = []
    for check in CHECKS:
        value = engine.value_of(f"{package}.{check}")
        if value is not None:
            lines.append(f"  {check} = {json.dumps(value, ensure_ascii=False)}")
    return lines


async def explain_logged(settings: Settings, entry: dict[str, Any]) -> tuple[str, int]:
    """A logged decision decided again with the configured bundle: (report, exit code) —
    0 the same decision, 1 it differs, 2 it cannot be replayed."""
    did = entry.get("decision_id", "(from an input file)")
    policy_input = entry.get("input")
    if not isinstance(policy_input, dict):
        result = entry.get("result") or {}
        return (f"decision {did}: refused before the policy ran (stage {entry.get('stage')}, "
                f"{result.get('reason')}, status {entry.get('status')}): nothing to explain"), 2
    if entry.get("input_truncated"):
        return f"decision {did}: the log cut its input to its size limit ({entry['input_truncated']}): not the input judged", 2
    lines = [f"decision {did}" + (f", logged by revision {entry['bundles']['live']['revision']}" if entry.get("bundles") else "")]
    engine = build_engine(settings)
    try:
        await engine.start()
        decision = (await engine.decide(policy_input)).as_dict()
    except PolicyError as exc:
        decision = {"action": "error", "reason": exc.reason}
        lines.append(f"evaluation error: {exc}")
    finally:
        await engine.aclose()
    lines += [f"engine: {engine.name} ({settings.config.policy.entrypoint}), bundle {settings.bundle_dir}",
              "policy input:", json.dumps(policy_input, indent=2, ensure_ascii=False), "checks, in the decision's order:"]
    try:
        lines += trace(settings, policy_input)
    except PolicyError as exc:
        lines.append(f"  (no trace: {exc})")
    logged = entry.get("result")
    lines += ["decision now: " + json.dumps(decision, ensure_ascii=False)]
    if logged is None:
        return "\n".join(lines), 0
    lines.append("logged:       " + json.dumps(logged, ensure_ascii=False))
    same = all(decision.get(k) == logged.get(k) for k in ("action", "reason", "status", "scopes", "visible"))
    lines.append("the same decision as logged" if same else "DIFFERS from the logged decision")
    return "\n".join(lines), 0 if same else 1
