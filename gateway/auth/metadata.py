"""RFC 9728 protected resource metadata and the `WWW-Authenticate` challenges that point to it.

MCP clients discover the authorization server from a 401's `resource_metadata` URL,
then re-authorize; on 403 `insufficient_scope` they step up with the scopes named.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

WELL_KNOWN = "/.well-known/oauth-protected-resource"


def metadata_path(mcp_path: str) -> str:
    """`/.well-known/oauth-protected-resource/mcp` for an endpoint at `/mcp` (RFC 9728 §3.1)."""
    return WELL_KNOWN + mcp_path


def metadata_url(public_url: str, mcp_path: str) -> str:
    parts = urlsplit(public_url)
    return f"{parts.scheme}://{parts.netloc}{metadata_path(parts.path.rstrip('/') + mcp_path)}"


def metadata_document(*, resource: str, servers: tuple[str, ...], scopes: tuple[str, ...]) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "resource": resource,
        "authorization_servers": list(servers),
        "bearer_methods_supported": ["header"],
    }
    if scopes:
        doc["scopes_supported"] = list(scopes)
    return doc


def _quote(value: str) -> str:
    # RFC 9110 quoted-string: escape backslash and quote; drop control characters
    cleaned = "".join(ch for ch in value if ch >= " " and ch != "\x7f")
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def challenge(
    resource_metadata: str,
    *,
    error: str | None = None,
    description: str | None = None,
    scope: tuple[str, ...] = (),
) -> str:
    """A `WWW-Authenticate: Bearer ...` value."""
    params = [f"resource_metadata={_quote(resource_metadata)}"]
    if error:
        params.append(f"error={_quote(error)}")
    if description:
        params.append(f"error_description={_quote(description)}")
    if scope:
        params.append(f"scope={_quote(' '.join(scope))}")
    return "Bearer " + ", ".join(params)
