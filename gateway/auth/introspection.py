"""Opaque access tokens, verified by RFC 7662 introspection at the profile's IdP.

`active: true` with a matching issuer is required; results are cached until the token's
`exp` but never longer than the profile's `cache_ceiling` (a revoked token stays
accepted at most that long). `active: false` answers are remembered briefly so a burst
of dead tokens does not hammer the IdP.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import httpx

from gateway.auth.idp import DiscoveryError, IssuerMetadata, client_authentication
from gateway.auth.tokens import (
    TokenError,
    VerifiedToken,
    VerifiedTokenCache,
    cached_lookup,
    normalise_claims,
)
from gateway.config.profiles import Profile
from gateway.state.ratelimit import RateLimiter

log = logging.getLogger(__name__)
INACTIVE_TTL = 10.0


class IntrospectionVerifier:
    def __init__(
        self,
        profile: Profile,
        metadata: IssuerMetadata,
        http: httpx.AsyncClient,
        cache: VerifiedTokenCache,
        clock: Callable[[], float] = time.time,
        per_address_per_minute: int = 60,
    ) -> None:
        if profile.introspection is None:
            raise ValueError("profile has no introspection section")
        self._profile = profile
        self._settings = profile.introspection
        self._metadata = metadata
        self._http = http
        self._cache = cache
        self._clock = clock
        self._inactive: OrderedDict[str, float] = OrderedDict()
        #: each unknown string costs the IdP a call: a bucket per client address bounds it
        self._limiter = RateLimiter(per_address_per_minute)
        self.requests = 0

    async def verify(self, raw: str, *, client_address: str | None = None) -> VerifiedToken:
        digest, cached = cached_lookup(self._cache, raw)
        if cached is not None:
            return cached
        now = self._clock()
        if self._inactive.get(digest, 0.0) > now:
            raise TokenError("token_inactive", "the identity provider reports the token as not active")
        allowed, retry = self._limiter.allow(client_address or "unknown")
        if not allowed:
            log.warning("introspection rate exceeded for %s; token refused unchecked", client_address)
            raise TokenError("introspection_rate_limited", f"too many unknown tokens from this address; retry in {retry:.0f} s",
                             status=429)
        body = await self._introspect(raw)
        if body.get("active") is not True:
            self._inactive[digest] = now + INACTIVE_TTL
            while len(self._inactive) > 10_000:
                self._inactive.popitem(last=False)
            raise TokenError("token_inactive", "the identity provider reports the token as not active")
        return self._accept(body, digest, now)

    async def _introspect(self, raw: str) -> dict[str, Any]:
        unavailable = TokenError("introspection_unavailable", "the token cannot be checked now", status=503)
        try:
            endpoint = await self._metadata.endpoint("introspection_endpoint", self._settings.endpoint)
        except DiscoveryError as exc:
            log.warning("introspection impossible: %s", exc)
            raise unavailable from None
        headers, form = client_authentication(self._settings.client)
        self.requests += 1
        try:
            resp = await self._http.post(
                endpoint,
                data={**form, "token": raw, "token_type_hint": "access_token"},
                headers={**headers, "Accept": "application/json"},
                timeout=self._settings.timeout,
            )
        except httpx.HTTPError as exc:
            log.warning("introspection failed: %s", type(exc).__name__)
            raise unavailable from None
        if resp.status_code != 200:
            log.warning("introspection answered HTTP %s", resp.status_code)
            raise unavailable
        try:
            body = resp.json()
        except ValueError:
            raise unavailable from None
        if not isinstance(body, dict):
            raise unavailable
        return body

    def _accept(self, body: dict[str, Any], digest: str, now: float) -> VerifiedToken:
        claims = {k: v for k, v in body.items() if k != "active"}
        issuer = claims.get("iss", self._profile.issuer)
        if issuer != self._profile.issuer:
            raise TokenError("wrong_issuer", "the token was not issued by this profile's issuer")
        exp = claims.get("exp")
        if exp is not None and (isinstance(exp, bool) or not isinstance(exp, (int, float)) or not math.isfinite(exp)):
            raise TokenError("invalid_claims", "exp must be a finite number")
        if exp is not None and exp <= now:
            raise TokenError("expired", "the token has expired")
        subject, client, scopes, audiences = normalise_claims(claims, self._profile)
        ceiling = now + self._settings.cache_ceiling
        verified = VerifiedToken(
            kind="opaque",
            token_hash=digest,
            claims=claims,
            issuer=issuer,
            subject=subject,
            client_id=client,
            scopes=scopes,
            audiences=audiences,
            expires_at=float(min(exp, ceiling)) if exp is not None else ceiling,
        )
        self._cache.put(verified)
        return verified
