"""RFC 8693 token exchange: trade the client's token for one meant for the backend.

The exchanged token goes only upstream: never to the client, never into a log or an
error message. Exchanges are cached per (subject token hash, audience, scopes) until
`expires_in` minus a safety margin and never past the subject token's own expiry;
concurrent requests for one key share one exchange; an IdP failure is remembered for a
few seconds so a burst does not hammer a failing IdP.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode

import httpx

from gateway.auth.idp import (
    DiscoveryError,
    IssuerMetadata,
    client_authentication,
    oauth_error,
)
from gateway.auth.tokens import VerifiedToken
from gateway.config.profiles import ExchangeSettings
from gateway.mcp.jsonrpc import Refusal

log = logging.getLogger(__name__)

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
#: used when the IdP omits `expires_in` (RFC 8693 only recommends it)
DEFAULT_LIFETIME = 60.0

Key = tuple[str, tuple[str, ...], tuple[str, ...]]


class ExchangeError(Refusal):
    """The exchange failed; `status`/`reason` are what the client is told (no token inside)."""


@dataclass(frozen=True, slots=True)
class ExchangedToken:
    access_token: str = field(repr=False)
    expires_at: float
    audience: tuple[str, ...]
    scopes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Failure:
    error: ExchangeError
    until: float


class TokenExchanger:
    def __init__(
        self,
        settings: ExchangeSettings,
        metadata: IssuerMetadata,
        http: httpx.AsyncClient,
        *,
        max_entries: int = 10_000,
        safety_margin: float = 30.0,
        failure_ttl: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._metadata = metadata
        self._http = http
        self._max = max_entries
        self._margin = safety_margin
        self._failure_ttl = failure_ttl
        self._clock = clock
        self._cache: OrderedDict[Key, ExchangedToken] = OrderedDict()
        self._inflight: dict[Key, asyncio.Task[ExchangedToken]] = {}
        self._refused: OrderedDict[Key, _Failure] = OrderedDict()
        self._idp_down: _Failure | None = None
        self.requests = 0  # exchanges actually sent to the IdP
        self.hits = 0

    async def exchange(self, subject: VerifiedToken, raw: str, *, audience: tuple[str, ...], scopes: tuple[str, ...]) -> ExchangedToken:
        key: Key = (subject.token_hash, tuple(sorted(audience)), tuple(sorted(scopes)))
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and cached.expires_at > now:
            self.hits += 1
            return cached
        if self._idp_down is not None and self._idp_down.until > now:
            raise self._idp_down.error
        refused = self._refused.get(key)
        if refused is not None and refused.until > now:
            raise refused.error
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._exchange_once(key, subject, raw, audience, scopes))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved even if nobody waits
            self._inflight[key] = task
        return await asyncio.shield(task)

    async def _exchange_once(
        self, key: Key, subject: VerifiedToken, raw: str, audience: tuple[str, ...], scopes: tuple[str, ...]
    ) -> ExchangedToken:
        try:
            token = await self._request(subject, raw, audience, scopes)
        except ExchangeError as exc:
            failure = _Failure(exc, self._clock() + self._failure_ttl)
            if exc.reason in ("exchange_unavailable", "exchange_timeout", "exchange_client_rejected"):
                self._idp_down = failure  # unreachable, or our own client refused: every key waits
            else:  # the IdP answered, for this subject token: only it waits (a 5xx one user causes is theirs)
                self._refused[key] = failure  # this subject token is refused: only this key waits
                while len(self._refused) > self._max:
                    self._refused.popitem(last=False)
            raise
        finally:
            self._inflight.pop(key, None)
        self._idp_down = None
        if token.expires_at > self._clock() and self._max > 0:
            self._cache[key] = token
            self._cache.move_to_end(key)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return token

    async def _request(self, subject: VerifiedToken, raw: str, audience: tuple[str, ...], scopes: tuple[str, ...]) -> ExchangedToken:
        s = self._settings
        try:
            endpoint = await self._metadata.endpoint("token_endpoint", s.token_endpoint)
        except DiscoveryError as exc:
            log.warning("token exchange impossible: %s", exc)
            raise ExchangeError(503, "exchange_unavailable", "the identity provider cannot be reached for token exchange") from None
        headers, auth_fields = client_authentication(s.client)
        form: list[tuple[str, str]] = [
            ("grant_type", GRANT_TYPE),
            ("subject_token", raw),
            ("subject_token_type", s.subject_token_type),
            *auth_fields.items(),
        ]
        if s.requested_token_type:
            form.append(("requested_token_type", s.requested_token_type))
        form += [("audience", a) for a in audience]
        form += [("resource", r) for r in s.resource]
        if scopes:
            form.append(("scope", " ".join(scopes)))
        self.requests += 1
        try:
            resp = await self._http.post(
                endpoint,
                content=urlencode(form),  # repeated `audience`/`resource` keep their order
                headers={**headers, "Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"},
                timeout=s.timeout,
            )
        except httpx.TimeoutException:
            raise ExchangeError(503, "exchange_timeout", "the identity provider did not answer the token exchange in time") from None
        except httpx.HTTPError as exc:
            log.warning("token exchange: IdP unreachable (%s)", type(exc).__name__)
            raise ExchangeError(503, "exchange_unavailable", "the identity provider cannot be reached for token exchange") from None
        if resp.status_code != 200:
            raise self._refusal(resp, raw)
        return self._parse(resp, subject, audience, scopes)

    def _refusal(self, resp: httpx.Response, raw: str) -> ExchangeError:
        error, description = oauth_error(resp)
        log.warning("token exchange refused: HTTP %s %s %s", resp.status_code, error[:60], _scrub(description)[:200])
        if resp.status_code >= 500:
            return ExchangeError(502, "exchange_failed", "the identity provider failed the token exchange")
        if error == "invalid_client":
            return ExchangeError(502, "exchange_client_rejected", "the identity provider rejected the gateway's client credentials")
        if error == "invalid_grant":
            return ExchangeError(401, "exchange_subject_invalid", "the identity provider does not accept the token for exchange")
        if error in ("access_denied", "unauthorized_client"):
            return ExchangeError(403, "exchange_denied", "the identity provider does not allow this token to be exchanged")
        if error in ("invalid_target", "invalid_request", "invalid_scope"):
            return ExchangeError(403, f"exchange_{error}", "the identity provider refused the requested audience or scopes")
        return ExchangeError(502, "exchange_failed", "the identity provider failed the token exchange")

    def _parse(self, resp: httpx.Response, subject: VerifiedToken, audience: tuple[str, ...], scopes: tuple[str, ...]) -> ExchangedToken:
        bad = ExchangeError(502, "exchange_bad_response", "the identity provider's token exchange answer is malformed")
        try:
            body = resp.json()
        except ValueError:
            raise bad from None
        if not isinstance(body, dict):
            raise bad
        access = body.get("access_token")
        token_type = body.get("token_type")
        issued = body.get("issued_token_type")
        expires_in = body.get("expires_in", DEFAULT_LIFETIME)
        if not isinstance(access, str) or not access or len(access) > 65_536:
            raise bad
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise bad
        if self._settings.requested_token_type and issued != self._settings.requested_token_type:
            raise bad
        if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)) or expires_in <= 0:
            raise bad
        granted = body.get("scope")
        granted_scopes = tuple(granted.split()) if isinstance(granted, str) else scopes
        now = self._clock()
        expires_at = min(now + float(expires_in) - self._margin, subject.expires_at)
        return ExchangedToken(access_token=access, expires_at=expires_at, audience=audience, scopes=granted_scopes)


#: a run that could be a token in any encoding (raw, URL-encoded, base64, JSON-escaped)
_TOKEN_LIKE = re.compile(r"[A-Za-z0-9\-_.~+/=%\\]{16,}")


def _scrub(text: str) -> str:
    """An IdP's error text as the log may keep it: anything token-like masked, whatever the
    encoding the IdP echoed the subject token in."""
    return _TOKEN_LIKE.sub("[redacted]", text)
