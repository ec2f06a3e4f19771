"""The profile's audience rules, checked by the gateway before anything costly.

The rules are policy (policies/gateway.rego applies them, so security teams see and test
them); this is the same check in Python, run right after verification and before the body
is even read: a token for another resource costs no parsing and no policy evaluation.
Both must agree: tests/integration/test_audience_precheck.py compares them on generated
cases. The policy still decides every request that passes here.
"""

from __future__ import annotations

from gateway.auth.tokens import VerifiedToken
from gateway.config.profiles import AudienceRules


def _matches(pattern: str, value: str) -> bool:
    return pattern == "*" or pattern == value


def token_audiences(rules: AudienceRules, token: VerifiedToken) -> list[str]:
    if token.audiences:
        return list(token.audiences)
    if rules.missing.startswith("claim:"):
        value = token.claims.get(rules.missing[6:])
        if isinstance(value, str):
            return [value]
    return []


def audience_problem(rules: AudienceRules, token: VerifiedToken) -> str | None:
    """`audience_missing`, `audience_forbidden`, `audience_not_accepted`, or None when fine."""
    audiences = token_audiences(rules, token)
    if not audiences:
        return None if rules.missing == "accept" else "audience_missing"
    if any(_matches(p, a) for a in audiences for p in rules.reject):
        return "audience_forbidden"
    if not rules.accept:
        return None
    accepted = [any(_matches(p, a) for p in rules.accept) for a in audiences]
    if (rules.match == "any" and any(accepted)) or (rules.match == "all" and all(accepted)):
        return None
    return "audience_not_accepted"
