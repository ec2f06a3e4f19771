"""Token buckets in this process: per client address for the authorization server's
registrations and sign-ins and for introspection of opaque tokens (`RateLimiter`), and the
in-memory store of the policy's rate limits (`state/quotas.py`)."""

from __future__ import annotations

import time
from collections import OrderedDict


class TokenBuckets:
    """A bucket per key: `capacity` requests per `period` seconds, refilled continuously, a burst
    of `capacity`. Bounded: the least recently seen keys are forgotten first (and start full)."""

    def __init__(self, max_keys: int = 10_000) -> None:
        self._max = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, capacity: float, period: float) -> float:
        """0 if one more may pass (and counts it), else seconds until one more would."""
        now = time.monotonic()
        rate = capacity / period
        tokens, seen = self._buckets.get(key, (capacity, now))
        tokens = min(capacity, tokens + (now - seen) * rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / rate
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return wait

    def wait(self, key: str, capacity: float, period: float) -> float:
        """Seconds until `key` may pass one more, without counting anything (0: now)."""
        tokens, seen = self._buckets.get(key, (capacity, time.monotonic()))
        tokens = min(capacity, tokens + (time.monotonic() - seen) * capacity / period)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) * period / capacity

    def clear(self) -> None:
        self._buckets.clear()


class RateLimiter:
    """A token bucket per key (client address): `per_minute` per minute, bursts of `per_minute`."""

    def __init__(self, per_minute: int, max_keys: int = 10_000) -> None:
        self._per_minute = float(per_minute)
        self._buckets = TokenBuckets(max_keys)

    def allow(self, key: str) -> tuple[bool, float]:
        """(allowed, seconds until one more would be)."""
        wait = self._buckets.take(key, self._per_minute, 60.0)
        return wait == 0.0, wait
