"""One Redis connection for a store: every command bounded in time, every failure turned into
the store's own "unavailable" refusal (so a Redis outage is a clear 503, never a 500)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class RedisConnection:
    def __init__(self, url: str, timeout: float, unavailable: Callable[[str], Exception]) -> None:
        import redis.asyncio as redis

        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._errors = (redis.RedisError, OSError)
        self._unavailable = unavailable

    async def call(self, command: str, *args: Any, **kwargs: Any) -> Any:
        """`command` (a redis-py method name); raises `unavailable(<error class name>)` on failure."""
        try:
            return await getattr(self.client, command)(*args, **kwargs)
        except self._errors as exc:
            raise self._unavailable(type(exc).__name__) from None

    async def ready(self) -> bool:
        try:
            return bool(await self.client.ping())
        except self._errors:
            return False

    async def aclose(self) -> None:
        await self.client.aclose()
