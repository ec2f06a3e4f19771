"""The request path: every MCP request, read top to bottom.

origin → token → parse → session → decide → apply (refuse, or forward with the allowed
token) → bind the session → guard the answer (listings filtered) → relay. Each step is a call into its wing;
the Gateway assembly holds what the steps use. Every exit is logged as one decision.

The endpoint is a plain ASGI callable (mounted as Litestar's raw `asgi` route): the hot path
pays for no request object, signature model or response class it does not use (measured in
benchmarks/: about a fifth of the gateway's CPU per request). A `Reply` is what a step
answers; `send_reply` writes it, relaying a stream until it ends or the client leaves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.assembly import Gateway
from gateway.auth.audience import audience_problem
from gateway.auth.exchange import ExchangeError
from gateway.auth.metadata import challenge
from gateway.auth.tokens import TokenError, VerifiedToken, bearer_token
from gateway.mcp import jsonrpc
from gateway.mcp.answers import Listing, guard_answer, on_close
from gateway.mcp.jsonrpc import Refusal
from gateway.mcp.messages import (
    McpInputError,
    McpRequest,
    parse_post,
    parse_stream_request,
    stateless,
)
from gateway.mcp.sessions import Owner, SessionNotFound, session_owner
from gateway.mcp.upstream import UpstreamAnswer, UpstreamError, forwarded_headers
from gateway.ops.audit import AUDIT_LOGGER, DecisionRecord
from gateway.ops.shadow import compare_shadow
from gateway.policy.decision import Action, Decision, PolicyError
from gateway.policy.input import build_input, over_budget
from gateway.state.quotas import Exceeded, QuotaRefusal
from gateway.vault.keeper import VaultError

log = logging.getLogger(__name__)
audit = logging.getLogger(AUDIT_LOGGER)


Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
JSON = b"application/json"


@dataclass(slots=True)
class Reply:
    """What the endpoint answers: a whole body, or a stream relayed as it arrives.
    Header names are lower-case bytes."""

    status: int
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    stream: AsyncIterator[bytes] | None = None

    def header(self, name: str, value: str) -> None:
        self.headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))


def refusal(
    status: int,
    reason: str,
    message: str,
    *,
    request_id: Any = None,
    code: int | None = None,
    www_authenticate: str | None = None,
    data: dict[str, Any] | None = None,
) -> Reply:
    body = jsonrpc.error_body(
        code or jsonrpc.code_for_status(status, reason), message, reason=reason, request_id=request_id, **(data or {})
    )
    reply = Reply(status, body, [(b"content-type", JSON)])
    if www_authenticate:
        reply.header("www-authenticate", www_authenticate)
    return reply


class ClientGone(Exception):
    """The client disconnected before its request body ended: nothing to answer."""


def _headers(scope: Scope) -> dict[str, str]:
    """Lower-case header names, first value without optional whitespace (RFC 9110 §5.5: httptools
    keeps it, h11 strips it); a repeated Authorization header is refused."""
    out: dict[str, str] = {}
    for name, value in scope["headers"]:
        key = name.decode("latin-1").lower()
        if key == "authorization" and key in out:
            raise TokenError("malformed_authorization", "more than one Authorization header")
        out.setdefault(key, value.decode("latin-1").strip(" \t"))
    return out


async def _read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    too_large = McpInputError(413, jsonrpc.INVALID_REQUEST, f"the request body is larger than {limit} bytes", "body_too_large")
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


ALLOWED_METHODS = frozenset({"POST", "GET", "DELETE"})


def mcp_endpoint(gateway_of: Callable[[Scope], Gateway]) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The ASGI callable for the MCP endpoint; `gateway_of` finds the Gateway serving now
    (it follows reloads)."""

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ALLOWED_METHODS:
            reply = refusal(405, "method_not_allowed", "the MCP endpoint accepts POST, GET and DELETE")
            reply.header("allow", "GET, POST, DELETE")
            await send_reply(reply, send, receive)
            return
        await handle_mcp(gateway_of(scope), scope, receive, send)

    return endpoint


async def handle_mcp(gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    """Every MCP request: run the request path, log the decision and name it to the client."""
    client = scope.get("client")
    record = DecisionRecord(path=gw.settings.config.policy.entrypoint, requested_by=client[0] if client else None,
                            revision=gw.serving_revision, shadow_revision=gw.shadow_revision)
    with gw.tracing.request(scope["headers"], scope["method"]):
        record.trace_id = gw.tracing.trace_id()
        try:
            reply = await request_path(gw, scope, receive, record)
        except ClientGone:
            record.result = {"action": "reject", "reason": "client_disconnected", "status": 400}
            gw.decisions.write(record, status=400)
            gw.metrics.count(record.result)
            return
        except Exception:
            log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            reply = refuse(record, 500, "internal_error", "the gateway failed unexpectedly; nothing was forwarded", code=-32603)
        gw.tracing.annotate(decision_id=record.decision_id, reason=(record.result or {}).get("reason"), status=reply.status)
    reply.headers.append((b"x-decision-id", record.decision_id.encode()))
    gw.decisions.write(record, status=reply.status)
    gw.metrics.count(record.result)
    await send_reply(reply, send, receive)


async def send_reply(reply: Reply, send: Send, receive: Receive) -> None:
    """Write `reply`; a stream is relayed until it ends or the client disconnects, and is
    closed either way (which releases the upstream connection and the request's claims)."""
    if reply.stream is None:
        reply.headers.append((b"content-length", str(len(reply.body)).encode()))
        await send({"type": "http.response.start", "status": reply.status, "headers": reply.headers})
        await send({"type": "http.response.body", "body": reply.body})
        return
    stream = reply.stream

    async def pump() -> None:
        await send({"type": "http.response.start", "status": reply.status, "headers": reply.headers})
        async for chunk in stream:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def client_gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    relay, watch = asyncio.ensure_future(pump()), asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait((relay, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (relay, watch):
            task.cancel()
        await asyncio.gather(relay, watch, return_exceptions=True)
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()
    if relay.done() and not relay.cancelled() and (error := relay.exception()) is not None:
        log.warning("relaying a stream failed: %s", type(error).__name__)


async def request_path(gw: Gateway, scope: Scope, receive: Receive, record: DecisionRecord) -> Reply:
    """verify → parse → decide → apply, for POST, GET and DELETE on the MCP endpoint."""
    cfg = gw.settings.config
    http_method = scope["method"]

    # 0. Browsers' requests must come from an allowed Origin (DNS rebinding).
    try:
        headers = _headers(scope)
    except TokenError as exc:
        return _token_refusal(gw, record, exc)
    origin = headers.get("origin")
    if origin is not None and origin != gw.own_origin and origin not in cfg.allowed_origins:
        return refuse(record, 403, "origin_not_allowed", "requests from this Origin are not allowed")

    # 1. Verify the bearer token: the policy only ever sees verified claims.
    try:
        raw_token = bearer_token(headers.get("authorization"))
        if raw_token is None:
            www = challenge(gw.metadata_url, scope=gw.scopes.initial)
            return refuse(record, 401, "missing_token", "a bearer token is required", www_authenticate=www)
        with gw.metrics.timed("verify"), gw.tracing.step("verify"):
            token = await gw.verifier.verify(raw_token, client_address=record.requested_by)
    except TokenError as exc:
        return _token_refusal(gw, record, exc)

    # 1b. The profile's audience rules, before any costly step (the policy applies them too).
    if (problem := audience_problem(gw.profile.audience, token)) is not None:
        record.stage = "audience"
        return _token_refusal(gw, record, TokenError(problem, "the token is not accepted for this resource"))

    # 2. Parse the MCP message (once; the raw body is what gets forwarded).
    record.stage = "parse"
    try:
        if http_method == "POST":
            body = await _read_body(receive, headers, cfg.limits.max_body_bytes)
            mcp = parse_post(body, headers, max_depth=cfg.limits.max_json_depth)
        else:
            mcp = parse_stream_request(http_method, headers)
    except McpInputError as exc:
        return refuse(record, exc.status, exc.reason, exc.message, request_id=exc.request_id, code=exc.code)

    # 2b. A session id is only honoured for the user who opened it.
    record.stage = "session"
    owner = session_owner(token)
    if owner is None:
        return _token_refusal(gw, record, TokenError("no_subject", "the token names neither a subject nor a client"))
    try:
        await gw.sessions.check(mcp.session_id, owner)
    except SessionNotFound as exc:
        refused = refuse(record, exc.status, exc.reason, exc.message, request_id=mcp.id)
        record.result["detail"] = exc.detail
        return refused
    except Refusal as exc:
        return refuse(record, exc.status, exc.reason, exc.message, request_id=mcp.id)

    # 2c. What one identity may hold at once (requests, streams): beyond it, 429 for them alone.
    kind = "stream" if http_method == "GET" else "request"
    slot = gw.identity_limits.acquire(owner, kind)
    if slot is None:
        refused = refuse(record, 429, f"too_many_{kind}s", f"too many {kind}s in progress for this user; retry later", request_id=mcp.id)
        refused.header("retry-after", "1")
        return refused
    releases = [slot]

    # 2d. One request per id per session at a time: an answer can only go to its own request.
    if mcp.session_id is not None and mcp.kind == "request":
        claim = gw.inflight.claim(mcp.session_id, mcp.id)
        if claim is None:
            slot()
            return refuse(record, 400, "request_id_in_use", "a request with this id is already in progress in this session",
                          request_id=mcp.id)
        releases.append(claim)

    def release() -> None:
        for done in releases:
            done()

    reply: Reply | None = None
    try:
        reply = await _decide_and_forward(gw, scope, record, headers, raw_token, token, mcp, owner, release)
        return reply
    finally:
        # a streamed answer releases its claims when the stream ends; anything else, now
        if reply is None or reply.stream is None:
            release()


async def _decide_and_forward(gw: Gateway, scope: Scope, record: DecisionRecord, headers: dict[str, str],
                              raw_token: str, token: VerifiedToken, mcp: McpRequest, owner: Owner,
                              release: Callable[[], None]) -> Reply:
    """Steps 3 to 6 of the request path; `release` (the identity's slot, the request id's claim)
    goes with a streamed answer."""
    cfg = gw.settings.config

    # 3. Ask the policy.
    record.stage = "policy"
    record.input = policy_input = build_input(
        token=token,
        profile=gw.profile,
        mcp=mcp,
        http_method=scope["method"],
        path=scope["path"],
        headers=headers,
        remote_addr=record.requested_by,
        resource=cfg.resource,
    )
    if (over := over_budget(policy_input["mcp"], cfg.limits.max_policy_input_bytes, cfg.limits.max_policy_input_elements,
                            source_bytes=len(mcp.body or b""))) is not None:
        return refuse(record, 413, "policy_input_too_large", f"the request is too large to judge ({over})", request_id=mcp.id)
    record.engine = gw.engine.name
    started = time.perf_counter_ns()
    try:
        with gw.metrics.timed("policy"), gw.tracing.step("policy"):
            decision = await gw.engine.decide(policy_input)
    except PolicyError as exc:
        log.error("policy error, request refused: %s", exc)
        return refuse(record, 503, exc.reason, "the authorization policy could not decide", request_id=mcp.id)
    finally:
        record.eval_ns = time.perf_counter_ns() - started
    record.result = decision.as_dict()
    if gw.shadow is not None:
        await compare_shadow(gw.shadow, gw.metrics, record, policy_input)
    audit.info(  # %r: a name with CR, LF or NUL cannot forge a line of its own
        "decision id=%s action=%s reason=%r sub=%r kind=%s method=%r name=%r",
        record.decision_id, decision.action.value, decision.reason, token.subject, token.kind, mcp.method or mcp.http_method, mcp.name,
    )

    # 4. Apply the decision.
    if decision.action is Action.REJECT:
        status = decision.status or 403
        if decision.reason == "unknown_method" and stateless(mcp.protocol_version):
            status = 404  # the stateless transport's answer to a method the server does not know
        return _policy_refusal(gw, status, decision.reason, decision.scopes, mcp)
    if decision.limits:  # the policy's rate limits: this identity's counters, nobody else's
        try:
            await gw.quotas.take(decision.limits, token.issuer, token.subject, token.client_id)
        except QuotaRefusal as exc:
            record.stage = "limits"
            refused = refuse(record, exc.status, exc.reason, exc.message, request_id=mcp.id,
                             data={"limit": exc.limit.name} if isinstance(exc, Exceeded) else None)
            record.result = {**decision.as_dict(), "action": "reject", "reason": exc.reason, "status": exc.status}
            if isinstance(exc, Exceeded):
                refused.header("retry-after", str(exc.retry_after))
                gw.metrics.rate_limited.labels(exc.limit.name).inc()
            return refused
    bearer = raw_token
    if decision.action is Action.EXCHANGE:
        record.stage = "exchange"
        if gw.exchanger is None or gw.profile.exchange is None:
            return refusal(503, "exchange_not_configured", "the policy asks for a token exchange, but the profile has no exchange section", request_id=mcp.id)
        try:
            with gw.metrics.timed("exchange"), gw.tracing.step("exchange"):
                exchanged = await gw.exchanger.exchange(
                    token,
                    raw_token,
                    audience=decision.audience or gw.profile.exchange.audience,
                    scopes=decision.scopes or gw.profile.exchange.scope,
                )
        except ExchangeError as exc:
            return refusal(exc.status, exc.reason, exc.message, request_id=mcp.id)
        bearer = exchanged.access_token  # the client's token goes no further
    elif decision.action is Action.DELEGATE:
        record.stage = "delegate"
        if gw.vault is None or token.subject is None:
            return refusal(503, "vault_not_configured", "the policy asks for a delegated token, but the vault is not enabled", request_id=mcp.id)
        try:
            with gw.metrics.timed("delegate"), gw.tracing.step("delegate"):
                released = await gw.vault.release(token.issuer, token.subject, audience=decision.audience, scopes=decision.scopes,
                                                  used_by="(mcp requests)", note_cached=False,
                                                  recheck_after=cfg.vault.delegate_recheck_seconds)
        except VaultError as exc:
            if exc.reason == "vault_no_grant":  # sign in again (with offline access) and the vault has one
                return refuse(record, 401, exc.reason, "no stored grant to act for this user: sign in again",
                              request_id=mcp.id, www_authenticate=challenge(gw.metadata_url, error="invalid_token"))
            return refusal(exc.status, exc.reason, exc.description, request_id=mcp.id)
        bearer = released.access_token  # the client's token goes no further
    elif decision.action is not Action.ACCEPT:
        return refusal(503, "policy_error", f"the policy answered an MCP request with {decision.action.value}", request_id=mcp.id)
    record.stage = "upstream"
    try:
        answer = await _forward(gw, mcp, headers, bearer)
    except UpstreamError as exc:
        return refusal(exc.status, exc.reason, exc.message, request_id=mcp.id)
    record.stage, record.upstream_status = "done", answer.status
    try:
        # 5. Bind a new session to its user; forget an ended one.
        await _track_session(gw, mcp, answer, owner)

        # 6. What reaches the client: listings only what the caller may use (one policy
        #    evaluation per page, whatever stream a page arrives on), responses only to this request.
        answer = await guard_answer(answer, mcp.id if mcp.kind == "request" else None, _visible_names(gw, policy_input, record))
    except Refusal as exc:
        await answer.discard()
        return refusal(exc.status, exc.reason, exc.message, request_id=mcp.id)
    if answer.stream is not None:
        answer = on_close(answer, release)
    return _relay(answer)


def refuse(record: DecisionRecord, status: int, reason: str, message: str, **kwargs: Any) -> Reply:
    """A refusal before the policy decided: the decision log records it as the gateway's own."""
    record.result = {"action": "reject", "reason": reason, "status": status}
    return refusal(status, reason, message, **kwargs)


def _token_refusal(gw: Gateway, record: DecisionRecord, exc: TokenError) -> Reply:
    if exc.status == 429:
        reply = refuse(record, 429, exc.reason, exc.description)
        reply.header("retry-after", "60")
        return reply
    if exc.status == 401:
        www = challenge(gw.metadata_url, error="invalid_token", description=exc.description)
        return refuse(record, 401, exc.reason, exc.description, www_authenticate=www)
    return refuse(record, exc.status, exc.reason, exc.description)


def _policy_refusal(gw: Gateway, status: int, reason: str, scopes: tuple[str, ...], mcp: McpRequest) -> Reply:
    www, data = None, {}
    if status == 401:
        www = challenge(gw.metadata_url, error="invalid_token", description=reason)
    elif status == 403 and scopes:
        www = challenge(gw.metadata_url, error="insufficient_scope", scope=scopes)
    if status == 401:
        message = "the token is not accepted for this resource"
    elif status == 403 and scopes:
        # clients show the message, not the header: name what to ask for
        message = f"the request needs the scope(s) {' '.join(scopes)}: authorize again with them"
        data = {"scopes": list(scopes)}
    else:
        message = "the request is not allowed"
    return refusal(status, reason, message, request_id=mcp.id, www_authenticate=www, data=data)


async def _forward(gw: Gateway, mcp: McpRequest, headers: dict[str, str], bearer: str) -> UpstreamAnswer:
    cfg = gw.settings.config
    with gw.metrics.timed("upstream"), gw.tracing.step("upstream"):  # until the answer's headers (SSE bodies stream on)
        return await gw.upstream.send(
            method=mcp.http_method,
            headers={**forwarded_headers(headers, cfg.upstream.forward_headers, bearer), **gw.tracing.outgoing(headers)},
            body=mcp.body,
        )


async def _track_session(gw: Gateway, mcp: McpRequest, answer: UpstreamAnswer, owner: Owner) -> None:
    if mcp.method == "initialize" and answer.status == 200:
        session_id = next((v for k, v in answer.headers if k.lower() == "mcp-session-id"), None)
        if session_id is not None:
            await gw.sessions.opened(session_id, owner)
    elif mcp.http_method == "DELETE" and mcp.session_id is not None and 200 <= answer.status < 300:
        await gw.sessions.closed(mcp.session_id)


def _visible_names(gw: Gateway, policy_input: dict[str, Any], parent: DecisionRecord) -> Any:
    """The listing's policy question: the same input plus every candidate name, asked once.
    Each is a decision of its own in the log (`listing_of` the request's), shadowed like any,
    so replay and explain cover listings too."""

    async def visible(listing: Listing, names: list[str]) -> frozenset[str]:
        listing_input = {**policy_input, "listing": {"catalogue": listing.catalogue, "names": names}}
        record = DecisionRecord(path=parent.path, stage="listing", requested_by=parent.requested_by, input=listing_input,
                                engine=gw.engine.name, revision=parent.revision, shadow_revision=parent.shadow_revision,
                                listing_of=parent.decision_id)
        started = time.perf_counter_ns()
        try:
            with gw.metrics.timed("listing"):
                decision: Decision = await gw.engine.decide(listing_input)
        except PolicyError as exc:
            record.result = {"action": "error", "reason": exc.reason}
            gw.decisions.write(record, status=503)
            log.error("policy error while filtering %s, listing refused: %s", listing.method, exc)
            raise Refusal(503, exc.reason, "the authorization policy could not filter the listing") from None
        finally:
            record.eval_ns = time.perf_counter_ns() - started
        record.result = decision.as_dict()
        if gw.shadow is not None:
            await compare_shadow(gw.shadow, gw.metrics, record, listing_input)
        gw.decisions.write(record, status=200)
        if decision.action is Action.REJECT or decision.visible is None:
            log.warning("the policy gave no visible set for %s; every item hidden", listing.method)
            return frozenset()
        return decision.visible

    return visible


def _relay(answer: UpstreamAnswer) -> Reply:
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers]
    if not any(k == b"content-type" for k, _ in headers):
        headers.append((b"content-type", answer.media_type.encode("latin-1")))
    return Reply(answer.status, answer.body or b"", headers, answer.stream)
