"""The decision log: one JSON line per request the gateway judged, never a token.

Field names follow OPA's decision-log format where they overlap (`decision_id`,
`timestamp`, `path`, `input`, `result`, `requested_by`, `metrics.timer_rego_query_eval_ns`,
`labels`); `engine`, `upstream_status` and `stage` are the gateway's own. Refusals
before the policy ran (bad token, bad body) are logged too, with `stage` saying where.
The input holds verified claims but never the raw or an exchanged token; a claim
named in REDACTED_CLAIMS is masked.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import orjson

#: the human-readable audit line per decision (a public logger name: operators route it)
AUDIT_LOGGER = "gateway.audit"

REDACTED_CLAIMS = frozenset({"access_token", "refresh_token", "id_token", "token"})


#: OPA's `labels` identify the instance; with several workers, `pid` says which one judged
_LABELS = {"app": "mcp-authz-gateway", "pid": str(os.getpid())}


def _timestamp() -> str:
    """RFC 3339 UTC with microseconds (what datetime.isoformat gives, at a third of the cost)."""
    now = time.time()
    seconds = int(now)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".%06dZ" % int((now - seconds) * 1_000_000)


@dataclass
class DecisionRecord:
    """What one request's path learned; filled step by step, written once at the end."""

    path: str
    decision_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    stage: str = "token"  # token | parse | policy | exchange | upstream | done | listing
    input: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    engine: str | None = None
    eval_ns: int | None = None
    upstream_status: int | None = None
    requested_by: str | None = None
    #: the shadow policy's decision, when it differs from `result`
    shadow_result: dict[str, Any] | None = None
    #: the revisions that decided (OPA's decision logs carry `bundles.<name>.revision`)
    revision: str | None = None
    shadow_revision: str | None = None
    #: a listing's own decision: the decision id of the request whose answer it filtered
    listing_of: str | None = None
    #: the OpenTelemetry trace this decision belongs to (when tracing is on)
    trace_id: str | None = None


def _line(entry: dict[str, Any]) -> str:
    """One JSON line (orjson: a tenth of json.dumps's cost); text orjson refuses (a lone
    surrogate) is written escaped by the standard library rather than lost."""
    try:
        return orjson.dumps(entry, default=str).decode() + "\n"
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(entry, ensure_ascii=True, default=str) + "\n"


def _outline(policy_input: dict[str, Any]) -> dict[str, Any]:
    """The input without what the client sent in bulk: arguments, params, listing names."""
    out = dict(policy_input)
    mcp = policy_input.get("mcp")
    if isinstance(mcp, dict):
        out["mcp"] = {k: v for k, v in mcp.items() if k not in ("arguments", "params", "targets")}
        if isinstance(mcp.get("targets"), list):
            out["mcp"]["targets_count"] = len(mcp["targets"])
        if isinstance(mcp.get("tool"), str) and len(mcp["tool"]) > 256:
            out["mcp"]["tool"] = mcp["tool"][:256] + "…"
    listing = policy_input.get("listing")
    if isinstance(listing, dict):
        out["listing"] = {"catalogue": listing.get("catalogue"), "names_count": len(listing.get("names") or [])}
    return out


def hashed_session(session_id: Any) -> Any:
    """A session id as the log may show it: a session id is a bearer of the session."""
    if not isinstance(session_id, str):
        return session_id
    return "sha256:" + hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _redacted(policy_input: dict[str, Any] | None) -> dict[str, Any] | None:
    if policy_input is None:
        return None
    out = dict(policy_input)
    token = policy_input.get("token")
    if isinstance(token, dict):
        claims = {k: ("[redacted]" if k in REDACTED_CLAIMS else v) for k, v in token.get("claims", {}).items()}
        out["token"] = {**token, "claims": claims}
    mcp = policy_input.get("mcp")
    if isinstance(mcp, dict) and mcp.get("session_id") is not None:
        out["mcp"] = {**mcp, "session_id": hashed_session(mcp["session_id"])}
    request = policy_input.get("request")
    headers = request.get("headers") if isinstance(request, dict) else None
    if isinstance(headers, dict) and "mcp-session-id" in headers:
        out["request"] = {**request, "headers": {**headers, "mcp-session-id": hashed_session(headers["mcp-session-id"])}}
    return out


class DecisionLog:
    def __init__(self, target: str, *, max_line_bytes: int = 16_384) -> None:
        """`target`: "-" for stdout, a file path to append to, or "" to log nothing. A line
        longer than `max_line_bytes` keeps the decision and the input's outline but not the
        client's arguments, and says so (`input_truncated`): a refused 256 KiB request must
        not cost 256 KiB of log.

        Lines written during one turn of the event loop are flushed together at the end of
        it (one write call for many requests under load); outside a loop, at once."""
        self._max = max_line_bytes
        self._stream: TextIO | None
        self._flush_pending = False
        if target == "-":
            self._stream = sys.stdout
        elif target:
            self._stream = Path(target).open("a", encoding="utf-8", buffering=65536)
        else:
            self._stream = None

    def write(self, record: DecisionRecord, *, status: int) -> None:
        if self._stream is None:
            return
        entry: dict[str, Any] = {
            "decision_id": record.decision_id,
            "timestamp": _timestamp(),
            "path": record.path,
            "labels": _LABELS,
            "requested_by": record.requested_by,
            "stage": record.stage,
            "input": _redacted(record.input),
            "result": record.result,
            "engine": record.engine,
            "status": status,
            "upstream_status": record.upstream_status,
        }
        if record.eval_ns is not None:
            entry["metrics"] = {"timer_rego_query_eval_ns": record.eval_ns}
        if record.listing_of is not None:
            entry["listing_of"] = record.listing_of
        if record.trace_id is not None:
            entry["trace_id"] = record.trace_id
        if record.revision is not None:
            entry["bundles"] = {"live": {"revision": record.revision}}
        if record.shadow_result is not None:
            entry["shadow_result"] = record.shadow_result
            if record.shadow_revision is not None:
                entry.setdefault("bundles", {})["shadow"] = {"revision": record.shadow_revision}
        line = _line(entry)
        if len(line) > self._max and isinstance(entry.get("input"), dict):
            entry["input"] = _outline(entry["input"])
            entry["input_truncated"] = {"bytes": len(line), "limit": self._max}
            line = _line(entry)
        try:
            self._stream.write(line)
        except (OSError, ValueError) as exc:  # a full disk must not take requests down
            logging.getLogger(__name__).error("decision log write failed: %s", exc)
            return
        if self._flush_pending:
            return
        try:
            asyncio.get_running_loop().call_soon(self.flush)
            self._flush_pending = True
        except RuntimeError:  # no loop: now
            self.flush()

    def flush(self) -> None:
        self._flush_pending = False
        if self._stream is None:
            return
        try:
            self._stream.flush()
        except (OSError, ValueError) as exc:
            logging.getLogger(__name__).error("decision log write failed: %s", exc)

    def close(self) -> None:
        self.flush()
        if self._stream is not None and self._stream is not sys.stdout:
            self._stream.close()
