"""Token buckets per key (a client address), in this process: the authorization server's
registrations and sign-ins, introspection of opaque tokens."""

from __future__ import annotations

import time
from collections import OrderedDict


class RateLimiter:
    """A token bucket per key (client address), in this process: `rate` per minute, bursts of `rate`.

    Bounded: the least recently seen keys are forgotten first (a forgotten key starts full).
    """

    def __init__(self, per_minute: int, max_keys: int = 10_000) -> None:
        self._rate = per_minute / 60.0
        self._burst = float(per_minute)
        self._max = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str) -> tuple[bool, float]:
        """(allowed, seconds until one more would be)."""
        now = time.monotonic()
        tokens, seen = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - seen) * self._rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return allowed, 0.0 if allowed else (1.0 - tokens) / self._rate
