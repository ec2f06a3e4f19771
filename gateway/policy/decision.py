"""The policy's answer: a Decision (action, reason, status, scopes...), and the engine interface.

The decision is data (like opa-envoy-plugin's decision object): the request path maps it
to a response and never re-implements a rule in Python. docs/policy.md documents it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.state.quotas import Limit


class Action(str, enum.Enum):
    ACCEPT = "accept"
    EXCHANGE = "exchange"
    REJECT = "reject"
    #: MCP requests: forward a token the vault derives from the user's grant (profile mode: delegate)
    DELEGATE = "delegate"
    #: vault requests (`input.vault`): the backend gets the user's token
    RELEASE = "release"


class PolicyError(Exception):
    """The engine could not give a usable decision (error, undefined, malformed, unreachable)."""

    def __init__(self, message: str, *, reason: str = "policy_error") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str
    status: int | None = None
    scopes: tuple[str, ...] = ()
    audience: tuple[str, ...] = ()
    #: for a listing input: the names the caller may see (None: the policy said nothing)
    visible: frozenset[str] | None = None
    #: the rate limits this request counts against (the gateway keeps the counters)
    limits: tuple[Limit, ...] = ()

    @classmethod
    def from_output(cls, value: Any) -> Decision:
        """Validate what the policy returned; anything off is a PolicyError (fail closed)."""
        if not isinstance(value, dict):
            raise PolicyError(f"the decision is not an object: {type(value).__name__}")
        try:
            action = Action(value.get("action"))
        except ValueError:
            raise PolicyError(f"decision.action must be accept, exchange, delegate, release or reject, got {value.get('action')!r}") from None
        reason = value.get("reason")
        if not isinstance(reason, str) or not reason:
            raise PolicyError("decision.reason must be a non-empty string")
        status = value.get("status")
        if status is not None and (isinstance(status, bool) or status not in (400, 401, 403, 404, 429)):
            raise PolicyError("decision.status must be one of 400, 401, 403, 404, 429")
        return cls(
            action=action,
            reason=reason,
            status=status,
            scopes=_strings(value.get("scopes"), "scopes"),
            audience=_strings(value.get("audience"), "audience"),
            visible=frozenset(_strings(value["visible"], "visible")) if "visible" in value else None,
            limits=_limits(value.get("limits")),
        )

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"action": self.action.value, "reason": self.reason}
        if self.status is not None:
            out["status"] = self.status
        if self.scopes:
            out["scopes"] = list(self.scopes)
        if self.audience:
            out["audience"] = list(self.audience)
        if self.visible is not None:
            out["visible"] = sorted(self.visible)
        if self.limits:
            out["limits"] = [{"name": lim.name, "per": f"per_{lim.per}", "count": lim.count, "period": lim.period} for lim in self.limits]
        return out


def _limits(value: Any) -> tuple[Limit, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise PolicyError("decision.limits must be a list of {name, per, rate}")
    try:
        return tuple(sorted((Limit.parse(str(v.get("name")), str(v.get("per")), str(v.get("rate"))) for v in value),
                            key=lambda lim: (lim.name, lim.per)))
    except ValueError as exc:
        raise PolicyError(f"decision.limits: {exc}") from None


def _strings(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, set, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(sorted(value)) if isinstance(value, set) else tuple(value)
    raise PolicyError(f"decision.{name} must be a string or a list of strings")


class PolicyEngine(Protocol):
    """Something that turns a policy input into a Decision (opened and closed with the app)."""

    name: str

    async def decide(self, policy_input: dict[str, Any]) -> Decision: ...

    async def start(self) -> None: ...

    async def ready(self) -> bool: ...

    async def aclose(self) -> None: ...
