"""Session binding: an `Mcp-Session-Id` belongs to the user who opened it.

The upstream hands out a session id on `initialize`; the gateway records it against the
token's (`iss`, `sub`). A later request carrying that id must come from the same
(`iss`, `sub`): otherwise, or when the id was never handed out through a gateway, it is
answered 404 "session not found", exactly as if it did not exist (MCP security best
practices: a session id is never a credential). Ids are stored hashed.

Stores: in memory (one process), or Redis so several gateway replicas share bindings.
Entries live `ttl` seconds after their last use. A store that cannot answer refuses
the request (503): a binding that cannot be checked is not assumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.config.settings import Sessions as SessionsConfig
from gateway.mcp.jsonrpc import Refusal
from gateway.state.redis import RedisConnection

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Owner:
    issuer: str
    subject: str


def session_owner(token: Any) -> Owner | None:
    """Who owns the sessions a token opens: its subject, else its client, never ambiguous
    (a subject "client:x" and the client x are different owners); None when it names neither."""
    if isinstance(token.subject, str) and token.subject:
        return Owner(token.issuer, "sub:" + token.subject)
    if isinstance(token.client_id, str) and token.client_id:
        return Owner(token.issuer, "client:" + token.client_id)
    return None


class SessionStoreError(Refusal):
    def __init__(self, message: str) -> None:
        super().__init__(503, "session_store_unavailable", message)


class SessionNotFound(Refusal):
    """Told to the client the same way whether the id is unknown or someone else's;
    `detail` tells the decision log which."""

    def __init__(self, detail: str) -> None:
        super().__init__(404, "session_not_found", "session not found")
        self.detail = detail


def session_key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()


class SessionStore(Protocol):
    async def owner(self, key: str) -> Owner | None:
        """The owner of a session (and its lifetime renewed), or None."""

    async def bind(self, key: str, owner: Owner) -> None: ...

    async def forget(self, key: str) -> None: ...

    async def ready(self) -> bool: ...

    async def aclose(self) -> None: ...


class MemorySessionStore:
    """One process's bindings: bounded, oldest-used evicted first, expired after `ttl`."""

    def __init__(self, ttl: float, max_entries: int) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._entries: OrderedDict[str, tuple[Owner, float]] = OrderedDict()

    async def owner(self, key: str) -> Owner | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        owner, expires = entry
        now = time.monotonic()
        if expires <= now:
            del self._entries[key]
            return None
        self._entries[key] = (owner, now + self._ttl)
        self._entries.move_to_end(key)
        return owner

    async def bind(self, key: str, owner: Owner) -> None:
        self._entries[key] = (owner, time.monotonic() + self._ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    async def forget(self, key: str) -> None:
        self._entries.pop(key, None)

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        self._entries.clear()


class RedisSessionStore:
    """Bindings shared by replicas: `<prefix><sha256(id)>` → `[iss, sub]`, with a TTL
    renewed on every use (GETEX)."""

    def __init__(self, url: str, ttl: float, prefix: str, timeout: float) -> None:
        self._ttl = max(1, int(ttl))
        self._prefix = prefix
        self._redis = RedisConnection(url, timeout, lambda error: SessionStoreError(f"the session store cannot be reached ({error})"))

    async def owner(self, key: str) -> Owner | None:
        raw = await self._redis.call("getex", self._prefix + key, ex=self._ttl)
        if raw is None:
            return None
        try:
            issuer, subject = json.loads(raw)
            return Owner(str(issuer), str(subject))
        except (ValueError, TypeError):
            log.error("session binding %s… is malformed in Redis; treated as absent", key[:12])
            return None

    async def bind(self, key: str, owner: Owner) -> None:
        await self._redis.call("set", self._prefix + key, json.dumps([owner.issuer, owner.subject]), ex=self._ttl)

    async def forget(self, key: str) -> None:
        try:
            await self._redis.call("delete", self._prefix + key)
        except SessionStoreError as exc:
            log.warning("could not forget session %s…: %s", key[:12], exc.message)

    async def ready(self) -> bool:
        return await self._redis.ready()

    async def aclose(self) -> None:
        await self._redis.aclose()


def build_session_store(config: SessionsConfig) -> SessionStore:
    if config.store == "redis":
        assert config.url is not None  # the config model requires it
        return RedisSessionStore(config.url, config.ttl, config.key_prefix, config.timeout)
    return MemorySessionStore(config.ttl, config.max_entries)


class SessionBinding:
    """The gateway's use of a store: check a request's session, bind, forget."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store

    async def check(self, session_id: str | None, owner: Owner) -> None:
        """Raise SessionNotFound unless the session was opened by `owner`."""
        if session_id is None:
            return
        key = session_key(session_id)
        found = await self.store.owner(key)
        if found == owner:
            return
        if found is None:
            log.warning("session %s… unknown to the gateway; refused (sub=%s)", key[:12], owner.subject)
            raise SessionNotFound("unknown_session")
        log.warning(
            "session %s… belongs to another user; refused as not found (sub=%s, owner sub=%s)",
            key[:12], owner.subject, found.subject,
        )
        raise SessionNotFound("owned_by_another_user")

    async def opened(self, session_id: str, owner: Owner) -> None:
        await self.store.bind(session_key(session_id), owner)

    async def closed(self, session_id: str) -> None:
        await self.store.forget(session_key(session_id))


class InFlight:
    """Request ids in flight per session, in this process: a request reusing an id whose first
    request is still unanswered is refused, so an upstream routing answers by id (the SDK
    does, by `str(id)`) can never hand one request's answer to another. Ids are compared as
    that routing does: `"5"` and `5` are one id."""

    def __init__(self) -> None:
        self._ids: set[tuple[str, str]] = set()

    @staticmethod
    def _key(session_id: str, request_id: Any) -> tuple[str, str]:
        return session_key(session_id), str(request_id)

    def claim(self, session_id: str, request_id: Any) -> Callable[[], None] | None:
        """A release function, or None when the id is already in flight in this session."""
        key = self._key(session_id, request_id)
        if key in self._ids:
            return None
        self._ids.add(key)
        return lambda: self._ids.discard(key)

    def __len__(self) -> int:
        return len(self._ids)
