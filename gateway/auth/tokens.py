"""Bearer token verification, in code, before any policy runs.

The policy only ever sees claims that passed here: signature against the issuer's JWKS
(key chosen by `kid`, algorithm pinned by the profile, never `none` or HMAC), `iss`
exact, `exp`/`nbf` with the profile's leeway, claim types checked. Verified tokens are
cached by hash until they expire. Headers such as `jku`/`x5u` are ignored: keys only
ever come from the profile's issuer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from joserfc import errors as jose_errors
from joserfc import jwt
from joserfc.jwk import KeySet

from gateway.auth.idp import IssuerMetadata
from gateway.config.profiles import Profile
from gateway.mcp.jsonstrict import StrictDecoder

log = logging.getLogger(__name__)

#: no IdP mints access tokens this large; refusing early bounds the work an attacker can cause
MAX_TOKEN_BYTES = 16_384


class TokenError(Exception):
    """The token is not acceptable. `reason` is stable and machine-readable."""

    def __init__(self, reason: str, description: str, *, status: int = 401) -> None:
        super().__init__(description)
        self.reason = reason
        self.description = description
        self.status = status


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """What the policy may rely on: verified claims plus normalised views of them."""

    kind: str  # jwt | opaque
    token_hash: str  # sha256 of the raw token, for caches and logs (never the token)
    claims: dict[str, Any]
    issuer: str
    subject: str | None
    client_id: str | None
    scopes: tuple[str, ...]
    audiences: tuple[str, ...]
    expires_at: float
    header: dict[str, Any] = field(default_factory=dict)

    def policy_view(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "claims": self.claims,
            "issuer": self.issuer,
            "subject": self.subject,
            "client_id": self.client_id,
            "scopes": list(self.scopes),
            "audiences": list(self.audiences),
            "expires_at": self.expires_at,
            "header": {k: self.header[k] for k in ("alg", "kid", "typ") if k in self.header},
        }


class TokenVerifier(Protocol):
    async def verify(self, raw: str, *, client_address: str | None = None) -> VerifiedToken: ...


def token_hash(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None when absent.

    A header in another scheme, or an empty bearer, raises TokenError: the client sent
    something, so it gets `error="invalid_token"` rather than a bare challenge.
    """
    if authorization is None:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value or " " in value:
        raise TokenError("malformed_authorization", "the Authorization header must be `Bearer <token>`")
    return value


def _b64json(segment: str) -> Any:
    pad = "=" * (-len(segment) % 4)
    try:
        raw = base64.urlsafe_b64decode((segment + pad).encode("ascii"))
        return json.loads(raw, cls=StrictDecoder)
    except (binascii.Error, UnicodeError, ValueError) as exc:
        raise TokenError("malformed_token", f"the token is not a well-formed JWT ({type(exc).__name__})") from None


class JwksCache:
    """The issuer's signing keys: fetched once, refetched on an unknown `kid` (rate-limited)
    or when old, and kept when the IdP is unreachable."""

    def __init__(
        self,
        profile: Profile,
        http: httpx.AsyncClient,
        metadata: IssuerMetadata | None = None,
        *,
        refetch_interval: float = 10.0,
        max_age: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._profile = profile
        self._http = http
        self._refetch_interval = refetch_interval
        self._max_age = max_age
        self._clock = clock
        self._keys: KeySet | None = None
        self._by_kid: dict[str, Any] = {}
        self._fetched_at = float("-inf")
        self._attempted_at = float("-inf")
        self._lock = asyncio.Lock()
        self._metadata = metadata or IssuerMetadata(profile, http)
        self.jwks_uri: str | None = profile.jwks_uri

    @property
    def loaded(self) -> bool:
        return self._keys is not None

    async def refresh(self, *, force: bool = False) -> bool:
        """Fetch the keys unless a fetch happened too recently. True if keys changed."""
        async with self._lock:
            now = self._clock()
            # until the first keys arrive, retry sooner: nothing can be verified meanwhile
            interval = self._refetch_interval if self._keys is not None else min(1.0, self._refetch_interval)
            if not force and now - self._attempted_at < interval:
                return False
            self._attempted_at = now
            try:
                uri = await self._metadata.endpoint("jwks_uri", self.jwks_uri)
                resp = await self._http.get(uri)
                resp.raise_for_status()
                keys = KeySet.import_key_set(resp.json())
            except Exception as exc:  # any failure keeps the last good keys
                log.warning("jwks fetch from %s failed: %s", self._profile.issuer, exc)
                return False
            self._keys = keys
            self._by_kid = {k.kid: k for k in keys.keys if k.kid is not None}
            self._fetched_at = now
            return True

    async def key_for(self, kid: str | None, alg: str) -> Any:
        if self._keys is None or self._clock() - self._fetched_at > self._max_age:
            await self.refresh()
        if self._keys is None:
            raise TokenError("jwks_unavailable", "the issuer's signing keys cannot be fetched", status=503)
        key = self._pick(kid, alg)
        if key is None and await self.refresh():
            key = self._pick(kid, alg)
        if key is None:
            raise TokenError("unknown_kid", "no signing key of the issuer matches the token's kid")
        return key

    def _pick(self, kid: str | None, alg: str) -> Any:
        if kid is not None:
            return self._by_kid.get(kid)
        assert self._keys is not None
        family = {"R": "RSA", "P": "RSA", "E": "EC"}.get(alg[0], "OKP")
        candidates = [k for k in self._keys.keys if k.key_type == family]
        return candidates[0] if len(candidates) == 1 else None


class VerifiedTokenCache:
    """Verified tokens by hash, until their `exp`; bounded, oldest evicted first."""

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.time) -> None:
        self._max = max_entries
        self._clock = clock
        self._items: OrderedDict[str, VerifiedToken] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, digest: str) -> VerifiedToken | None:
        token = self._items.get(digest)
        if token is None:
            self.misses += 1
            return None
        if token.expires_at <= self._clock():
            del self._items[digest]
            self.misses += 1
            return None
        self.hits += 1
        return token

    def put(self, token: VerifiedToken) -> None:
        if self._max <= 0:
            return
        self._items[token.token_hash] = token
        self._items.move_to_end(token.token_hash)
        while len(self._items) > self._max:
            self._items.popitem(last=False)


def cached_lookup(cache: VerifiedTokenCache, raw: str) -> tuple[str, VerifiedToken | None]:
    """The first steps of every verifier: bound the size, hash, ask the verified-token cache."""
    if len(raw) > MAX_TOKEN_BYTES:
        raise TokenError("malformed_token", "the token is too large")
    digest = token_hash(raw)
    return digest, cache.get(digest)


def _first_claim(claims: dict[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        if name in claims:
            return claims[name]
    return None


def _is_number(v: Any) -> bool:
    """A finite number (NaN, Infinity and 1e400 would make a token that never expires)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def normalise_claims(claims: dict[str, Any], profile: Profile) -> tuple[str | None, str | None, tuple[str, ...], tuple[str, ...]]:
    """(subject, client_id, scopes, audiences) with their types checked; bad types raise."""
    subject = _first_claim(claims, profile.claims.subject)
    client = _first_claim(claims, profile.claims.client)
    scope = _first_claim(claims, profile.claims.scope)
    aud = claims.get("aud")
    for name, value in (("subject", subject), ("client", client)):
        if value is not None and not isinstance(value, str):
            raise TokenError("invalid_claims", f"the {name} claim must be a string")
    if scope is None:
        scopes: tuple[str, ...] = ()
    elif isinstance(scope, str):
        scopes = tuple(scope.split())
    elif isinstance(scope, list) and all(isinstance(s, str) for s in scope):
        scopes = tuple(scope)
    else:
        raise TokenError("invalid_claims", "the scope claim must be a string or a list of strings")
    if aud is None and "aud" not in claims:
        audiences: tuple[str, ...] = ()
    elif isinstance(aud, str):
        audiences = (aud,)
    elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        audiences = tuple(aud)
    else:
        raise TokenError("invalid_claims", "aud must be a string or a list of strings")
    return subject, client, scopes, audiences


class JwtVerifier:
    """Verifies JWT access tokens of one profile's issuer."""

    def __init__(self, profile: Profile, jwks: JwksCache, cache: VerifiedTokenCache, clock: Callable[[], float] = time.time) -> None:
        self._profile = profile
        self._jwks = jwks
        self._cache = cache
        self._clock = clock
        self._algorithms = frozenset(profile.jwt.algorithms)
        self._typ = frozenset(t.lower() for t in profile.jwt.typ)

    async def verify(self, raw: str, *, client_address: str | None = None) -> VerifiedToken:
        digest, cached = cached_lookup(self._cache, raw)
        if cached is not None:
            return cached
        parts = raw.split(".")
        if len(parts) == 5:
            raise TokenError("unsupported_token_kind", "encrypted tokens (JWE) are not accepted")
        if len(parts) != 3:
            raise TokenError("unsupported_token_kind", "the token is not a JWT and this profile accepts only JWTs")
        header = _b64json(parts[0])
        if not isinstance(header, dict):
            raise TokenError("malformed_token", "the token header is not a JSON object")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise TokenError("disallowed_alg", f"the algorithm {str(alg)[:16]!r} is not allowed by the profile")
        if self._typ and str(header.get("typ", "")).lower() not in self._typ:
            raise TokenError("disallowed_typ", "the token's typ header is not allowed by the profile")
        if "crit" in header:
            raise TokenError("malformed_token", "critical header extensions are not supported")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenError("malformed_token", "kid must be a string")
        key = await self._jwks.key_for(kid, alg)
        try:
            token = jwt.decode(raw, key, algorithms=[alg], decoder_cls=StrictDecoder)
        except jose_errors.BadSignatureError:
            raise TokenError("bad_signature", "the token's signature does not verify") from None
        except (jose_errors.JoseError, ValueError, TypeError) as exc:
            raise TokenError("malformed_token", f"the token cannot be decoded ({type(exc).__name__})") from None
        claims = token.claims
        if not isinstance(claims, dict):
            raise TokenError("malformed_token", "the token payload is not a JSON object")
        verified = self._check_claims(claims, header, digest)
        self._cache.put(verified)
        return verified

    def _check_claims(self, claims: dict[str, Any], header: dict[str, Any], digest: str) -> VerifiedToken:
        now = self._clock()
        leeway = self._profile.jwt.leeway
        if claims.get("iss") != self._profile.issuer:
            raise TokenError("wrong_issuer", "the token was not issued by this profile's issuer")
        exp = claims.get("exp")
        if not _is_number(exp):
            raise TokenError("invalid_claims", "exp is required and must be a number")
        if now > exp + leeway:
            raise TokenError("expired", "the token has expired")
        for name in ("nbf", "iat"):
            if name in claims and not _is_number(claims[name]):
                raise TokenError("invalid_claims", f"{name} must be a number")
        if "nbf" in claims and now + leeway < claims["nbf"]:
            raise TokenError("not_yet_valid", "the token is not valid yet (nbf)")
        subject, client, scopes, audiences = normalise_claims(claims, self._profile)
        return VerifiedToken(
            kind="jwt",
            token_hash=digest,
            claims=claims,
            issuer=claims["iss"],
            subject=subject,
            client_id=client,
            scopes=scopes,
            audiences=audiences,
            expires_at=float(exp),
            header={k: header[k] for k in ("alg", "kid", "typ") if k in header},
        )


class ProfileVerifier:
    """Routes a token by shape to the verifiers the profile allows.

    A three-part token is a JWT; anything else is opaque (introspected if the profile
    accepts opaque tokens). A JWT that fails verification is tried as opaque only when
    the profile says `opaque_fallback: true`.
    """

    def __init__(self, profile: Profile, jwt_verifier: TokenVerifier | None, opaque_verifier: TokenVerifier | None) -> None:
        self._fallback = profile.opaque_fallback
        self._jwt = jwt_verifier
        self._opaque = opaque_verifier

    async def verify(self, raw: str, *, client_address: str | None = None) -> VerifiedToken:
        if self._jwt is not None and raw.count(".") == 2:
            try:
                return await self._jwt.verify(raw)
            except TokenError as exc:
                if not (self._fallback and self._opaque is not None and exc.status == 401):
                    raise
        if self._opaque is not None:
            return await self._opaque.verify(raw, client_address=client_address)
        if self._jwt is not None:
            return await self._jwt.verify(raw)  # explains why the token is not a JWT
        raise TokenError("unsupported_token_kind", "this profile accepts no token kind")
