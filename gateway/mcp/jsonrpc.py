"""JSON-RPC error bodies and codes the gateway answers with.

Every refusal is a JSON-RPC error object, so MCP clients surface it like any server
error; `error.data.reason` carries the gateway's stable reason string.
"""

from __future__ import annotations

import json
from typing import Any

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
HEADER_MISMATCH = -32020  # the 2026-07-28 transport's code for header/body disagreement
#: gateway-specific codes, in the JSON-RPC "server error" range
UNAUTHORIZED = -32001
FORBIDDEN = -32003
UPSTREAM_ERROR = -32004
UNAVAILABLE = -32005
SESSION_NOT_FOUND = -32006

_STATUS_CODES = {401: UNAUTHORIZED, 403: FORBIDDEN, 404: SESSION_NOT_FOUND, 502: UPSTREAM_ERROR, 503: UNAVAILABLE, 504: UPSTREAM_ERROR}


class Refusal(Exception):
    """A step of the request path refuses: `status` and stable `reason` go to the client.

    `message` is shown to the client too, so it never carries a token.
    """

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


#: refusals whose JSON-RPC meaning is more precise than their HTTP status
_REASON_CODES = {"unknown_method": METHOD_NOT_FOUND}


def code_for_status(status: int, reason: str | None = None) -> int:
    if reason in _REASON_CODES:
        return _REASON_CODES[reason]
    return _STATUS_CODES.get(status, INVALID_REQUEST if status < 500 else UNAVAILABLE)


def error_body(code: int, message: str, *, reason: str, request_id: Any = None, **data: Any) -> bytes:
    """A JSON-RPC 2.0 error response; `request_id` is echoed only if it is a valid id type."""
    if not (isinstance(request_id, (str, int)) and not isinstance(request_id, bool)):
        request_id = None
    payload = {
        "jsonrpc": "2.0",
        "id": request_id,
        "error": {"code": code, "message": message, "data": {"reason": reason, **data}},
    }
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
