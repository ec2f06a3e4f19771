"""Where the authorization server keeps its state: registrations, pending sign-ins, one-time
codes and refresh handles, in this process or in Redis (shared by replicas and workers).

Keys are SHA-256 hashes of the secrets they are looked up by (a code, a handle, a state), so
the store never holds a usable secret as a key. Values that carry IdP tokens are sealed with
AES-GCM under a key derived from that same secret (`seal`/`unseal`): whoever reads the store
without the client's code or handle reads nothing usable. `take` reads and deletes in one
step (Redis GETDEL), which is what makes codes and handles one-time across replicas.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from typing import Any, Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.config.settings import OAuthStore as OAuthStoreConfig
from gateway.mcp.jsonrpc import Refusal
from gateway.state.redis import RedisConnection

log = logging.getLogger(__name__)


class StoreUnavailable(Refusal):
    def __init__(self, message: str) -> None:
        super().__init__(503, "oauth_store_unavailable", message)


def key_of(kind: str, secret: str) -> str:
    """`kind:<sha256(secret)>`: what a secret is stored under."""
    return f"{kind}:{hashlib.sha256(secret.encode('utf-8', 'surrogatepass')).hexdigest()}"


def _aead(secret: str, kind: str) -> AESGCM:
    key = HKDF(algorithm=SHA256(), length=32, salt=None, info=f"mcp-authz-gateway {kind}".encode()).derive(
        secret.encode("utf-8", "surrogatepass")
    )
    return AESGCM(key)


def seal(secret: str, kind: str, value: dict[str, Any]) -> str:
    """`value` encrypted under a key only `secret` (the client's code or handle) derives."""
    nonce = os.urandom(12)
    sealed = _aead(secret, kind).encrypt(nonce, json.dumps(value, separators=(",", ":")).encode(), kind.encode())
    return base64.urlsafe_b64encode(nonce + sealed).decode()


def unseal(secret: str, kind: str, blob: str) -> dict[str, Any] | None:
    try:
        raw = base64.urlsafe_b64decode(blob.encode())
        value = json.loads(_aead(secret, kind).decrypt(raw[:12], raw[12:], kind.encode()))
    except Exception:  # tampered, truncated or not ours: treated as absent
        return None
    return value if isinstance(value, dict) else None


class KeyValueStore(Protocol):
    async def put(self, key: str, value: str, ttl: float) -> None: ...

    async def get(self, key: str) -> str | None: ...

    async def take(self, key: str) -> str | None:
        """Read and delete in one step: two callers never both get the value."""

    async def delete(self, key: str) -> None: ...

    async def ready(self) -> bool: ...

    async def aclose(self) -> None: ...


class MemoryStore:
    """This process only: bounded (oldest first out), entries expire."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    async def put(self, key: str, value: str, ttl: float) -> None:
        self._entries[key] = (value, time.monotonic() + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    async def get(self, key: str) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            del self._entries[key]
            return None
        return entry[0]

    async def take(self, key: str) -> str | None:
        value = await self.get(key)
        self._entries.pop(key, None)
        return value

    async def delete(self, key: str) -> None:
        self._entries.pop(key, None)

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        self._entries.clear()


class RedisStore:
    """Shared by every replica: `<prefix><key>` with a TTL; `take` is GETDEL (Redis 6.2+)."""

    def __init__(self, url: str, prefix: str, timeout: float) -> None:
        self._prefix = prefix
        self._redis = RedisConnection(url, timeout, lambda error: StoreUnavailable(f"the authorization server's store cannot be reached ({error})"))

    @staticmethod
    def _text(raw: Any) -> str | None:
        return raw.decode() if isinstance(raw, bytes) else raw

    async def put(self, key: str, value: str, ttl: float) -> None:
        await self._redis.call("set", self._prefix + key, value, px=max(1, int(ttl * 1000)))

    async def get(self, key: str) -> str | None:
        return self._text(await self._redis.call("get", self._prefix + key))

    async def take(self, key: str) -> str | None:
        return self._text(await self._redis.call("getdel", self._prefix + key))

    async def delete(self, key: str) -> None:
        await self._redis.call("delete", self._prefix + key)

    async def ready(self) -> bool:
        return await self._redis.ready()

    async def aclose(self) -> None:
        await self._redis.aclose()


def build_store(config: OAuthStoreConfig) -> KeyValueStore:
    if config.store == "redis":
        assert config.url is not None  # the config model requires it
        return RedisStore(config.url, config.key_prefix, config.timeout)
    return MemoryStore(config.max_entries)
