"""The vault: keeps users' IdP refresh tokens (sealed) and turns them into access tokens for a
backend, one refresh at a time per user.

- `deposit`: at the end of a sign-in through the gateway's authorization server, when the
  profile asks for `offline_access` and the IdP issued a refresh token. Each sign-in is one
  grant; a user keeps at most `max_grants_per_user` (the oldest is revoked at the IdP).
- `release`: for a backend the policy allowed (`POST /vault/token`) or for `mode: delegate`.
  Under the user's lock (in-process and in the store, so replicas agree): refresh with the
  newest grant, down-scoped to what is asked; store the rotated refresh token by
  compare-and-swap; verify the new token like any other; exchange it for the backend's
  audience (`release: exchange`) or check its audience (`release: refresh`). Access tokens are
  cached in memory only, until `token_margin` seconds before they expire, and only while
  their grant is still in the store (a revocation by another process takes effect at once).
- A refresh the IdP calls invalid removes the grant; an IdP that does not answer removes nothing.
- The client's own refresh handle (gateway/oauth) refreshes through `refresh_for_client`: one
  refresh token, one owner, so a single-use token is never spent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from gateway.auth.exchange import ExchangeError, TokenExchanger
from gateway.auth.tokens import TokenError, TokenVerifier
from gateway.config.profiles import Profile
from gateway.config.settings import Vault as VaultConfig
from gateway.mcp.jsonrpc import Refusal
from gateway.oauth.signin import IdpError, IdpSignIn, IdpTokens
from gateway.ops.metrics import Metrics
from gateway.state.ratelimit import TokenBuckets
from gateway.vault.crypto import Keyring, SealError
from gateway.vault.store import Grant, VaultStore, build_vault_store, current_grant, new_grant_id

log = logging.getLogger(__name__)


class VaultError(Exception):
    """A release that cannot be served: `error` is the OAuth error the caller gets, `reason`
    what the decision log and metrics say. Never holds a token."""

    def __init__(self, status: int, error: str, reason: str, description: str, *, retry_after: float = 0.0) -> None:
        super().__init__(description)
        self.status, self.error, self.reason, self.description = status, error, reason, description
        self.retry_after = retry_after


@dataclass(frozen=True)
class Released:
    access_token: str = field(repr=False)
    expires_at: float
    scope: tuple[str, ...]
    grant_id: str
    cached: bool = False
    #: when the store last confirmed its grant (monotonic seconds)
    checked_at: float = 0.0

    def answer(self, now: float) -> dict[str, object]:
        return {"access_token": self.access_token, "token_type": "Bearer", "expires_in": max(1, int(self.expires_at - now)),
                "scope": " ".join(self.scope)}


CacheKey = tuple[str, str, tuple[str, ...], tuple[str, ...]]


class VaultState:
    """What outlives a reload: the store, the keys, the released-token cache and the local locks."""

    def __init__(self, config: VaultConfig, base_dir: Path, config_name: str) -> None:
        self.config = config
        self.keyring = Keyring.from_config(config, base_dir, config_name)
        self.store: VaultStore = build_vault_store(config, base_dir, config_name)
        self.cache: OrderedDict[CacheKey, Released] = OrderedDict()
        self.locks: dict[str, asyncio.Lock] = {}
        #: failed backend authentications per address (a bucket each: emptied, the address waits)
        self.failures = TokenBuckets()

    def blocked_for(self, address: str) -> float:
        """Seconds this address stays refused after too many failed authentications (0: not)."""
        return self.failures.wait(address, self.config.failed_auth_per_address_per_minute, 60.0)

    def failed(self, address: str) -> None:
        self.failures.take(address, self.config.failed_auth_per_address_per_minute, 60.0)

    def local_lock(self, issuer: str, subject: str) -> asyncio.Lock:
        key = f"{issuer}\n{subject}"
        lock = self.locks.get(key)
        if lock is None:
            if len(self.locks) > 10_000:  # forget idle locks
                for name in [k for k, v in self.locks.items() if not v.locked()]:
                    del self.locks[name]
            lock = self.locks[key] = asyncio.Lock()
        return lock


class Vault:
    def __init__(self, state: VaultState, *, profile: Profile, signin: IdpSignIn, verifier: TokenVerifier,
                 exchanger: TokenExchanger | None, metrics: Metrics) -> None:
        self.state = state
        self.config = state.config
        self.store = state.store
        self._keys = state.keyring
        self._profile = profile
        self._signin = signin
        self._verifier = verifier
        self._exchanger = exchanger
        self._metrics = metrics

    # --- deposit --------------------------------------------------------------------

    async def deposit(self, issuer: str, subject: str, refresh_token: str, scope: str | None) -> Grant:
        now = time.time()
        grant_id = new_grant_id()
        bound = Grant(issuer, subject, grant_id, "", "", scope or "", now, now)
        kid, sealed = self._keys.seal({"refresh_token": refresh_token}, bound.bound_to)
        grant = replace(bound, kid=kid, sealed=sealed)
        await self.store.add(grant)
        for old in (await self.store.grants(issuer, subject))[self.config.max_grants_per_user:]:
            log.info("vault: a user's oldest grant is revoked (more than %d)", self.config.max_grants_per_user)
            await self.revoke([old])
        await self.count()
        return grant

    # --- release --------------------------------------------------------------------

    async def release(self, issuer: str, subject: str, *, audience: tuple[str, ...], scopes: tuple[str, ...],
                      used_by: str, note_cached: bool = True, recheck_after: float = 0.0) -> Released:
        """An access token of this user for `audience` with `scopes`; VaultError otherwise.
        The use is noted for the user to see. Delegate mode, on every MCP request, passes
        `note_cached=False` (only releases that refreshed are noted: a cached one costs no store
        write) and `recheck_after` (a cached token's grant is confirmed in the store at most
        that often; a revocation through this process drops it at once anyway)."""
        key: CacheKey = (issuer, subject, tuple(sorted(audience)), tuple(sorted(scopes)))
        try:
            released = await self._cached(key, recheck_after)
            if released is None:
                async with self.state.local_lock(issuer, subject), self.store.lock(issuer, subject, self.config.lock_timeout):
                    released = await self._cached(key) or await self._release(issuer, subject, audience, scopes, key)
        except VaultError as exc:
            self._metrics.vault_releases.labels(exc.reason).inc()
            raise
        except Refusal as exc:  # the store is down or busy
            self._metrics.vault_releases.labels(exc.reason).inc()
            raise VaultError(503, "temporarily_unavailable", exc.reason, exc.message) from None
        self._metrics.vault_releases.labels("cached" if released.cached else "released").inc()
        if note_cached or not released.cached:
            try:
                await self.store.note_use(issuer, subject, released.grant_id, used_by, time.time())
            except Refusal:
                log.warning("vault: a use could not be noted (the store did not answer)")
        return released

    async def _cached(self, key: CacheKey, recheck_after: float = 0.0) -> Released | None:
        hit = self.state.cache.get(key)
        if hit is None:
            return None
        if hit.expires_at <= time.time():
            self.state.cache.pop(key, None)
            return None
        now = time.monotonic()
        if now - hit.checked_at >= recheck_after:
            if not any(g.grant_id == hit.grant_id for g in await self.store.grants(key[0], key[1])):
                self.state.cache.pop(key, None)  # its grant was revoked (perhaps by another process)
                return None
            hit = self.state.cache[key] = replace(hit, checked_at=now)
        return replace(hit, cached=True)

    async def _release(self, issuer: str, subject: str, audience: tuple[str, ...], scopes: tuple[str, ...], key: CacheKey) -> Released:
        """The newest grant that works: a dead one is removed and an older one tried; so is an
        older one when the newest lacks a scope (a later sign-in may have asked for less)."""
        narrower: VaultError | None = None
        for grant in await self.store.grants(issuer, subject):
            try:
                tokens, grant = await self._refresh(grant, scopes)
            except _GrantDead:
                continue  # removed; the user may have another grant
            except VaultError as exc:
                if exc.error != "invalid_scope":
                    raise
                narrower = narrower or exc
                continue
            released = replace(await self._for_backend(grant, tokens, subject, audience, scopes), checked_at=time.monotonic())
            if self.config.max_cached_tokens > 0:
                self.state.cache[key] = released
                while len(self.state.cache) > self.config.max_cached_tokens:
                    self.state.cache.popitem(last=False)
            return released
        raise narrower or VaultError(400, "invalid_grant", "vault_no_grant", "no usable grant is stored for this user")

    async def _for_backend(self, grant: Grant, tokens: IdpTokens, subject: str, audience: tuple[str, ...],
                           scopes: tuple[str, ...]) -> Released:
        try:
            verified = await self._verifier.verify(tokens.access_token)
        except TokenError as exc:
            log.error("vault: the IdP's refreshed token is not accepted by profile %s (%s)", self._profile.name, exc.reason)
            raise VaultError(502, "server_error", "vault_token_unverifiable", "the identity provider's token could not be verified") from None
        if verified.subject != subject:
            log.error("vault: the IdP refreshed a grant into another subject's token; refused")
            raise VaultError(502, "server_error", "vault_subject_mismatch", "the identity provider's token is for another user")
        margin = self.config.token_margin
        if self._profile.vault.release == "exchange":
            assert self._exchanger is not None  # the profile model requires an exchange section
            try:
                exchanged = await self._exchanger.exchange(verified, tokens.access_token, audience=audience, scopes=scopes)
            except ExchangeError as exc:
                status = 503 if exc.status == 503 else 502 if exc.status >= 500 else 400
                raise VaultError(status, "temporarily_unavailable" if status == 503 else "invalid_target" if status == 400 else "server_error",
                                 exc.reason, "the identity provider did not exchange the token for this audience") from None
            return Released(exchanged.access_token, min(exchanged.expires_at, verified.expires_at - margin), exchanged.scopes, grant.grant_id)
        if audience and not set(audience) <= set(verified.audiences):
            raise VaultError(400, "invalid_target", "vault_audience_unavailable",
                             "the identity provider's tokens do not carry this audience (release: refresh)")
        granted = tuple(tokens.scope.split()) if tokens.scope else verified.scopes
        return Released(tokens.access_token, verified.expires_at - margin, granted, grant.grant_id)

    async def _refresh(self, grant: Grant, scopes: tuple[str, ...]) -> tuple[IdpTokens, Grant]:
        """Refresh with `grant` (caller holds the user's lock); the rotated refresh token is
        stored before anything is returned."""
        try:
            refresh_token = self._keys.open(grant.kid, grant.sealed, grant.bound_to)["refresh_token"]
        except (SealError, KeyError) as exc:
            log.error("vault: a grant cannot be opened (%s): check vault.keys", exc)
            raise VaultError(503, "temporarily_unavailable", "vault_key_missing", "the vault cannot open this user's grant") from None
        try:
            tokens = await self._signin.refresh(refresh_token, scope=" ".join(scopes) if scopes else None)
        except IdpError as exc:
            if exc.unavailable:
                self._metrics.vault_refresh_failures.labels("unavailable").inc()
                raise VaultError(503, "temporarily_unavailable", "vault_idp_unavailable", "the identity provider cannot be reached") from None
            self._metrics.vault_refresh_failures.labels(exc.error if exc.error in ("invalid_grant", "invalid_scope") else "refused").inc()
            if exc.error == "invalid_scope":
                raise VaultError(400, "invalid_scope", "vault_scope_not_granted", "the user's grant does not cover these scopes") from None
            if exc.error == "invalid_grant":
                log.info("vault: the IdP no longer accepts a grant's refresh token: the grant is removed")
                await self.store.remove(grant)
                self._drop_cached(grant)
                await self.count()
                raise _GrantDead() from None
            raise VaultError(502, "server_error", "vault_idp_refused", "the identity provider refused the refresh") from None
        if tokens.refresh_token and tokens.refresh_token != refresh_token:
            kid, sealed = self._keys.seal({"refresh_token": tokens.refresh_token}, grant.bound_to)
            rotated = replace(grant, kid=kid, sealed=sealed, updated_at=time.time())
            if not await self.store.swap(grant, rotated):
                # only if the lock expired under a very slow IdP: keep the new token as a grant
                # of its own rather than lose it (the old one is spent)
                log.error("vault: a grant changed while its user's lock was held; the rotated token is kept as a new grant")
                rotated = replace(rotated, grant_id=new_grant_id(), version=1, used_by={})
                kid, sealed = self._keys.seal({"refresh_token": tokens.refresh_token}, rotated.bound_to)
                rotated = replace(rotated, kid=kid, sealed=sealed)
                await self.store.add(rotated)
                return tokens, rotated
            grant = replace(rotated, version=grant.version + 1)
        return tokens, grant

    # --- the client's own refreshes (gateway/oauth) ------------------------------------

    async def refresh_for_client(self, issuer: str, subject: str, grant_id: str, scope: str | None) -> IdpTokens | None:
        """A client's refresh handle that points at a grant: refreshed under the user's lock,
        down-scoped to the client's scopes; None when the grant is gone (revoked, or dead at
        the IdP); IdpError (`unavailable` for a 503) when it cannot be refreshed now."""
        try:
            async with self.state.local_lock(issuer, subject), self.store.lock(issuer, subject, self.config.lock_timeout):
                grant = await current_grant(self.store, issuer, subject, grant_id)
                if grant is None:
                    return None
                tokens, _ = await self._refresh(grant, tuple(scope.split()) if scope else ())
        except _GrantDead:
            return None
        except VaultError as exc:
            raise IdpError(exc.error, exc.description, unavailable=exc.status == 503) from None
        except Refusal as exc:
            raise IdpError("temporarily_unavailable", exc.message, unavailable=True) from None
        return replace(tokens, refresh_token=None)

    async def revoke_grant(self, issuer: str, subject: str, grant_id: str) -> None:
        grant = await current_grant(self.store, issuer, subject, grant_id)
        await self.revoke([grant] if grant is not None else [])

    # --- revocation and the user's view ------------------------------------------------

    async def grants_of(self, issuer: str, subject: str) -> list[Grant]:
        return await self.store.grants(issuer, subject)

    async def revoke(self, grants: list[Grant]) -> int:
        """`revoke_grants`, and this process's cached tokens of them dropped; returns how many
        the IdP confirmed."""
        confirmed = await revoke_grants(self.store, self._keys, self._signin, grants, self.config.lock_timeout,
                                        local_lock=self.state.local_lock)
        for grant in grants:
            self._drop_cached(grant)
        await self.count()
        return confirmed

    def _drop_cached(self, grant: Grant) -> None:
        for key in [k for k, v in self.state.cache.items() if v.grant_id == grant.grant_id]:
            del self.state.cache[key]

    def note_result(self, result: str) -> None:
        """A request refused before the vault was asked (the broker's): counted with the releases."""
        self._metrics.vault_releases.labels(result).inc()

    async def count(self) -> int:
        try:
            n = await self.store.count()
        except Refusal:
            return -1
        self._metrics.vault_grants.set(n)
        return n


class _GrantDead(Exception):
    """The IdP called this grant's refresh token invalid; the grant was removed."""


async def revoke_grants(store: VaultStore, keyring: Keyring, signin: IdpSignIn, grants: list[Grant], lock_timeout: float,
                        *, local_lock: Callable[[str, str], asyncio.Lock] | None = None) -> int:
    """Remove each grant and revoke its refresh token at the IdP (`token_type_hint=refresh_token`):
    under the user's lock, re-read, so the token revoked is the one the grant holds now (not one
    a refresh rotated away meanwhile). Removed even when the IdP does not answer; returns how
    many revocations the IdP confirmed."""
    confirmed = 0
    for listed in grants:
        async with (local_lock(listed.issuer, listed.subject) if local_lock else contextlib.nullcontext()), \
                store.lock(listed.issuer, listed.subject, lock_timeout):
            grant = await current_grant(store, listed.issuer, listed.subject, listed.grant_id)
            if grant is None:
                continue
            await store.remove(grant)
        try:
            token = keyring.open(grant.kid, grant.sealed, grant.bound_to)["refresh_token"]
        except (SealError, KeyError):
            continue
        confirmed += await signin.revoke(token, "refresh_token")
    return confirmed


async def rotate_keys(store: VaultStore, keyring: Keyring, lock_timeout: float) -> tuple[int, int, list[str]]:
    """Re-encrypt every grant not under the current key: (re-encrypted, already current,
    problems). Each under its user's lock, as a release would, so a refresh running in a
    gateway meanwhile never has its rotated token overwritten. A grant that does not open
    is left as it is and named in the problems."""
    done = current = 0
    problems: list[str] = []
    for listed in await store.all():
        if listed.kid == keyring.current:
            current += 1
            continue
        async with store.lock(listed.issuer, listed.subject, lock_timeout):
            grant = await current_grant(store, listed.issuer, listed.subject, listed.grant_id)
            if grant is None:
                continue  # removed meanwhile
            try:
                value = keyring.open(grant.kid, grant.sealed, grant.bound_to)
            except SealError as exc:
                problems.append(f"grant {grant.grant_id} of {grant.subject}: {exc}")
                continue
            kid, sealed = keyring.seal(value, grant.bound_to)
            if await store.swap(grant, replace(grant, kid=kid, sealed=sealed)):
                done += 1
            else:
                problems.append(f"grant {grant.grant_id} of {grant.subject}: changed while rotating; run again")
    return done, current, problems
