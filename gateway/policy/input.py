"""The policy input contract: the one document a policy sees for each request.

Built once per request from verified claims, the profile's view and the parsed MCP
message; never the raw token. docs/policy.md documents its shape.
"""

from __future__ import annotations

from typing import Any

from gateway.auth.tokens import VerifiedToken
from gateway.config.profiles import Profile
from gateway.mcp.messages import McpRequest

#: request headers the policy may look at (never Authorization or cookies)
POLICY_HEADERS = (
    "accept",
    "content-type",
    "mcp-protocol-version",
    "mcp-session-id",
    "mcp-method",
    "mcp-name",
    "origin",
    "user-agent",
)


def build_input(
    *,
    token: VerifiedToken,
    profile: Profile,
    mcp: McpRequest,
    http_method: str,
    path: str,
    headers: dict[str, str],
    remote_addr: str | None,
    resource: str,
) -> dict[str, Any]:
    """The documented policy input (docs/policy.md); the only thing a policy ever sees."""
    return {
        "token": token.policy_view(),
        "profile": profile.policy_view(),
        "mcp": mcp.policy_view(),
        "request": {
            "method": http_method,
            "path": path,
            "headers": {h: headers[h] for h in POLICY_HEADERS if h in headers},
            "remote_addr": remote_addr,
        },
        "gateway": {"resource": resource},
    }


def over_budget(policy_input: Any, max_bytes: int, max_elements: int, *, source_bytes: int | None = None) -> str | None:
    """What exceeds the policy input's budget (bytes of JSON, roughly; values), or None.

    Walks the client's part of the input once and stops as soon as a limit is passed, so its
    own cost is bounded by the budget, and so is the engine's. A value parsed from
    `source_bytes` of JSON holds at most that many values and ~4x that many counted bytes,
    so a small request is not walked at all.
    """
    if source_bytes is not None and 4 * source_bytes + 1_024 < max_bytes and source_bytes < max_elements:
        return None
    size = elements = 0
    stack = [policy_input]
    while stack:
        value = stack.pop()
        elements += 1
        if isinstance(value, dict):
            size += 2
            for key, item in value.items():
                size += len(key) + 4
                stack.append(item)
        elif isinstance(value, list):
            size += 2
            stack.extend(value)
        elif isinstance(value, str):
            size += len(value) + 2
        else:
            size += 8
        if elements > max_elements:
            return f"more than {max_elements} values"
        if size > max_bytes:
            return f"more than {max_bytes} bytes"
    return None
