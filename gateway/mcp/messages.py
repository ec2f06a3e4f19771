"""MCP requests as the gateway sees them: one parse of the HTTP body and MCP headers.

Both transport revisions are understood: 2025-11-25 (sessions, `initialize`, GET SSE
streams, DELETE) and 2026-07-28 (stateless POSTs whose `Mcp-Method` / `Mcp-Name`
headers mirror the body). The gateway decides on the body and refuses a header that
contradicts it. The raw body is kept and forwarded byte for byte: parsed once, never
re-serialised, so the upstream reads exactly what the policy judged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mcp.shared.inbound import (
    NAME_BEARING_METHODS,
    PROTOCOL_VERSION_META_KEY,
    decode_header_value,
)
from mcp.types.version import MODERN_PROTOCOL_VERSIONS
from mcp_types.methods import CLIENT_REQUESTS, SPEC_CLIENT_METHODS

from gateway.mcp import jsonrpc
from gateway.mcp.jsonstrict import StrictDecoder, depth_exceeds, has_lone_surrogate

SESSION_HEADER = "mcp-session-id"
PROTOCOL_HEADER = "mcp-protocol-version"
METHOD_HEADER = "mcp-method"
NAME_HEADER = "mcp-name"


class McpInputError(Exception):
    """The request cannot be judged; it is answered with this status and JSON-RPC error."""

    def __init__(self, status: int, code: int, message: str, reason: str, request_id: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.reason = reason
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class McpRequest:
    """One HTTP request on the MCP endpoint, parsed."""

    http_method: str  # POST | GET | DELETE
    kind: str | None  # request | notification | response; None for GET/DELETE
    method: str | None
    id: Any
    params: dict[str, Any] = field(default_factory=dict)
    #: the name-bearing value: the tool or prompt name, the resource URI
    name: str | None = None
    session_id: str | None = None
    protocol_version: str | None = None
    body: bytes = b""

    @property
    def tool(self) -> str | None:
        return self.name if self.method == "tools/call" else None

    @property
    def targets(self) -> list[dict[str, str]]:
        """Every tool, prompt or resource this request names, as {catalogue, name}: the per-name
        rules apply to each (a completion on a hidden prompt, a subscription to a hidden URI)."""
        return _targets(self.method, self.params) if self.kind == "request" else []

    @property
    def arguments(self) -> dict[str, Any] | None:
        args = self.params.get("arguments") if self.method in ("tools/call", "prompts/get") else None
        return args if isinstance(args, dict) else None

    def policy_view(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "method": self.method,
            "id": self.id,
            "tool": self.tool,
            "arguments": self.arguments,
            "resource_uri": self.name if self.method == "resources/read" else None,
            "prompt": self.name if self.method == "prompts/get" else None,
            # each thing once: the arguments are `arguments` above, request metadata is not policy
            "params": {k: v for k, v in self.params.items() if k not in ("_meta", "arguments")},
            "targets": self.targets,
            "session_id": self.session_id,
            "protocol_version": self.protocol_version,
        }


def _bad(status: int, code: int, message: str, reason: str, request_id: Any = None) -> McpInputError:
    return McpInputError(status, code, message, reason, request_id)


def parse_stream_request(http_method: str, headers: dict[str, str]) -> McpRequest:
    """GET (server-to-client SSE stream) and DELETE (end session) carry no body."""
    return McpRequest(
        http_method=http_method,
        kind=None,
        method=None,
        id=None,
        session_id=headers.get(SESSION_HEADER),
        protocol_version=headers.get(PROTOCOL_HEADER),
    )


def parse_post(body: bytes, headers: dict[str, str], *, max_depth: int) -> McpRequest:
    """Parse a POSTed JSON-RPC message and check the MCP headers against it.

    `headers` has lower-case names. Raises McpInputError for anything that must not be
    forwarded: empty or invalid JSON, a non-object, a batch, a bad envelope, a header
    that contradicts the body.
    """
    if not body.strip():
        raise _bad(400, jsonrpc.INVALID_REQUEST, "the request body is empty", "empty_body")
    try:
        msg = json.loads(body, cls=StrictDecoder)
    except RecursionError:
        raise _bad(400, jsonrpc.PARSE_ERROR, "the JSON body is nested too deeply", "too_deep") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(400, jsonrpc.PARSE_ERROR, f"the body is not valid JSON: {exc}", "invalid_json") from None
    if isinstance(msg, list):
        raise _bad(
            400,
            jsonrpc.INVALID_REQUEST,
            "JSON-RPC batches are not accepted (MCP removed them in 2025-06-18); send one message per request",
            "batch_not_supported",
        )
    if not isinstance(msg, dict):
        raise _bad(400, jsonrpc.INVALID_REQUEST, "the body must be a JSON-RPC object", "not_an_object")
    if depth_exceeds(msg, max_depth):
        raise _bad(400, jsonrpc.INVALID_REQUEST, f"the message is nested deeper than {max_depth} levels", "too_deep")
    if has_lone_surrogate(body, msg):
        raise _bad(400, jsonrpc.PARSE_ERROR, "the body holds text that is not valid Unicode (a lone surrogate)", "invalid_unicode")
    request_id = msg.get("id")
    if msg.get("jsonrpc") != "2.0":
        raise _bad(400, jsonrpc.INVALID_REQUEST, 'jsonrpc must be "2.0"', "invalid_envelope", request_id)
    if "id" in msg and (isinstance(request_id, bool) or not isinstance(request_id, (str, int))):
        raise _bad(400, jsonrpc.INVALID_REQUEST, "id must be a string or an integer", "invalid_envelope")
    method = msg.get("method")
    if "method" in msg:
        if not isinstance(method, str) or not method:
            raise _bad(400, jsonrpc.INVALID_REQUEST, "method must be a non-empty string", "invalid_envelope", request_id)
        kind = "request" if "id" in msg else "notification"
    elif "id" in msg and ("result" in msg) != ("error" in msg):
        kind = "response"
    else:
        raise _bad(400, jsonrpc.INVALID_REQUEST, "not a JSON-RPC request, notification or response", "invalid_envelope", request_id)
    params = msg.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise _bad(400, jsonrpc.INVALID_REQUEST, "params must be an object", "invalid_params", request_id)

    version = _protocol_version(method, params, headers, request_id)
    if kind == "request" and stateless(version) and method in SPEC_CLIENT_METHODS and (method, version) not in CLIENT_REQUESTS:
        # removed by this revision (initialize, ping, resources/subscribe...): its stateless
        # transport answers 404 with -32601, before any check of the params
        raise _bad(404, jsonrpc.METHOD_NOT_FOUND, f"{method} does not exist in protocol revision {version}", "unknown_method", request_id)
    name = _name_param(method, params, request_id)
    if kind == "request":
        _check_targets(method, params, request_id)
    _check_routing_headers(method, name, headers, request_id)
    return McpRequest(
        http_method="POST",
        kind=kind,
        method=method,
        id=request_id,
        params=params,
        name=name,
        session_id=headers.get(SESSION_HEADER),
        protocol_version=version,
        body=body,
    )


#: at most this many names in one request (a subscription list): each is judged
MAX_TARGETS = 100


def _targets(method: str | None, params: dict[str, Any]) -> list[dict[str, str]]:
    """The names a (validated) request carries; see `_check_targets`."""
    if method == "tools/call":
        return [{"catalogue": "tools", "name": params["name"]}]
    if method == "prompts/get":
        return [{"catalogue": "prompts", "name": params["name"]}]
    if method in ("resources/read", "resources/subscribe", "resources/unsubscribe"):
        return [{"catalogue": "resources", "name": params["uri"]}]
    if method == "completion/complete":
        ref = params["ref"]
        if ref["type"] == "ref/prompt":
            return [{"catalogue": "prompts", "name": ref["name"]}]
        return [{"catalogue": "resources", "name": ref["uri"]}]
    if method == "subscriptions/listen":
        uris = (params.get("notifications") or {}).get("resourceSubscriptions") or []
        return [{"catalogue": "resources", "name": uri} for uri in uris]
    return []


def _check_targets(method: str | None, params: dict[str, Any], request_id: Any) -> None:
    """Name-bearing params beyond `Mcp-Name`'s three: well-formed, or the request is refused."""
    def bad(message: str) -> McpInputError:
        return _bad(400, jsonrpc.INVALID_PARAMS, message, "invalid_params", request_id)

    if method in ("resources/subscribe", "resources/unsubscribe") and not isinstance(params.get("uri"), str):
        raise bad(f"{method} needs params.uri as a string")
    if method == "completion/complete":
        ref = params.get("ref")
        if not isinstance(ref, dict) or ref.get("type") not in ("ref/prompt", "ref/resource"):
            raise bad("completion/complete needs params.ref of type ref/prompt or ref/resource")
        key = "name" if ref["type"] == "ref/prompt" else "uri"
        if not isinstance(ref.get(key), str):
            raise bad(f"completion/complete needs params.ref.{key} as a string")
    if method == "subscriptions/listen":
        notifications = params.get("notifications", {})
        uris = notifications.get("resourceSubscriptions") if isinstance(notifications, dict) else None
        if not isinstance(notifications, dict) or not (uris is None or (isinstance(uris, list) and all(isinstance(u, str) for u in uris))):
            raise bad("subscriptions/listen needs params.notifications.resourceSubscriptions as a list of strings")
        if uris is not None and len(uris) > MAX_TARGETS:
            raise bad(f"subscriptions/listen names more than {MAX_TARGETS} resources")


def _name_param(method: str | None, params: dict[str, Any], request_id: Any) -> str | None:
    key = NAME_BEARING_METHODS.get(method or "")
    if key is None:
        return None
    value = params.get(key)
    if not isinstance(value, str):
        raise _bad(400, jsonrpc.INVALID_PARAMS, f"{method} needs params.{key} as a string", "invalid_params", request_id)
    if method in ("tools/call", "prompts/get") and not isinstance(params.get("arguments", {}), dict):
        raise _bad(400, jsonrpc.INVALID_PARAMS, "params.arguments must be an object", "invalid_params", request_id)
    return value


def stateless(version: str | None) -> bool:
    """True for the 2026-07-28-style revisions: no sessions, every request on its own, and a
    method the server does not know is HTTP 404 with JSON-RPC -32601."""
    return version in MODERN_PROTOCOL_VERSIONS


def _protocol_version(method: str | None, params: dict[str, Any], headers: dict[str, str], request_id: Any) -> str | None:
    header = headers.get(PROTOCOL_HEADER)
    meta = params.get("_meta")
    body_version = meta.get(PROTOCOL_VERSION_META_KEY) if isinstance(meta, dict) else None
    if body_version is not None and header is not None and header != body_version:
        raise _bad(400, jsonrpc.HEADER_MISMATCH, f"{PROTOCOL_HEADER} header does not match the body's protocol version", "header_mismatch", request_id)
    if method == "initialize" and isinstance(params.get("protocolVersion"), str):
        return params["protocolVersion"]
    version = body_version if body_version is not None else header
    return version if isinstance(version, str) else None


def _check_routing_headers(method: str | None, name: str | None, headers: dict[str, str], request_id: Any) -> None:
    method_header = headers.get(METHOD_HEADER)
    if method_header is not None and method_header != method:
        raise _bad(400, jsonrpc.HEADER_MISMATCH, f"{METHOD_HEADER} header does not match the body's method", "header_mismatch", request_id)
    name_header = headers.get(NAME_HEADER)
    must_name = method_header is not None and name is not None
    if (name_header is not None or must_name) and decode_header_value(name_header) != name:
        raise _bad(400, jsonrpc.HEADER_MISMATCH, f"{NAME_HEADER} header does not match the body", "header_mismatch", request_id)
