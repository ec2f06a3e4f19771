"""Rate limits per identity, declared by the policy and counted here: token buckets.

The policy names the limits a request counts against (`limits` in its decision, from
`data.authz.limits`: e.g. `tools/call: {per_subject: 60/minute}`); this wing keeps one
bucket per (limit, identity) — `rate` requests per period, refilled continuously, a burst
of `rate` — in this process, or in Redis so every worker and replica shares it (one atomic
Lua script per request, on Redis's own clock). Other identities are never touched.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from gateway.state.ratelimit import TokenBuckets

PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
#: "60/minute", "1/hour"... (the schema allows exactly these)
RATE = re.compile(r"^([1-9][0-9]{0,8})/(second|minute|hour|day)\Z")  # \Z, not $: `$` also matches before a final newline


@dataclass(frozen=True, slots=True)
class Limit:
    name: str  # the data key: a method or a name pattern
    per: str  # subject | client
    count: int
    period: float

    @classmethod
    def parse(cls, name: str, per: str, rate: str) -> Limit:
        match = RATE.match(rate)
        if match is None or per not in ("per_subject", "per_client"):
            raise ValueError(f"limits.{name}.{per}: {rate!r} is not N/second|minute|hour|day")
        return cls(name, per.removeprefix("per_"), int(match.group(1)), PERIODS[match.group(2)])


class QuotaRefusal(Exception):
    """A request the limits stop: `status`, stable `reason` and `message` go to the client."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


class QuotaStoreUnavailable(QuotaRefusal):
    def __init__(self, detail: str) -> None:
        super().__init__(503, "rate_limit_store_unavailable", "the rate-limit store cannot be reached; retry later")
        self.detail = detail


class Exceeded(QuotaRefusal):
    def __init__(self, limit: Limit, retry_after: float) -> None:
        super().__init__(429, "rate_limited", f"too many requests for {limit.name} (at most {limit.count} per "
                                              f"{int(limit.period)} s for each {limit.per}); retry later")
        self.limit = limit
        self.retry_after = max(1, int(retry_after + 0.999))


def bucket_key(limit: Limit, issuer: str, identity: str) -> str:
    raw = "\0".join((limit.name, limit.per, str(limit.count), str(limit.period), issuer, identity))
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class MemoryQuotas:
    """Buckets in this process (bounded: the least recently used are forgotten, and start full)."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._buckets = TokenBuckets(max_entries)

    async def take(self, key: str, limit: Limit) -> float:
        """0 if a request may pass (and counts it), else seconds until one more would."""
        return self._buckets.take(key, float(limit.count), limit.period)

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        self._buckets.clear()


#: KEYS[1] the bucket; ARGV capacity, period (s). Redis's clock, one round trip, atomic.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cap = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local v = redis.call('HMGET', KEYS[1], 'tokens', 'seen')
local tokens = tonumber(v[1]) or cap
local seen = tonumber(v[2]) or now
tokens = math.min(cap, tokens + (now - seen) * cap / period)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) * period / cap end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'seen', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(period * 1000) + 1000)
return tostring(wait)
"""


class RedisQuotas:
    """Buckets in Redis, shared by every worker and replica pointing at `url`."""

    def __init__(self, url: str, *, key_prefix: str, timeout: float) -> None:
        from gateway.state.redis import RedisConnection

        self._redis = RedisConnection(url, timeout, QuotaStoreUnavailable)
        self._prefix = key_prefix
        self._script: Any = None

    async def take(self, key: str, limit: Limit) -> float:
        if self._script is None:
            self._script = self._redis.client.register_script(_TAKE)
        try:
            return float(await self._script(keys=[self._prefix + key], args=[limit.count, limit.period]))
        except Exception as exc:  # redis errors, timeouts: fail closed
            raise QuotaStoreUnavailable(type(exc).__name__) from None

    async def ready(self) -> bool:
        return await self._redis.ready()

    async def aclose(self) -> None:
        await self._redis.aclose()


class Quotas:
    """What the request path calls: take one of every limit the decision names, or refuse."""

    def __init__(self, store: MemoryQuotas | RedisQuotas) -> None:
        self.store = store

    async def take(self, limits: tuple[Limit, ...], issuer: str, subject: str | None, client: str | None) -> None:
        """Raises Exceeded (429) for the first limit with no token left, QuotaStoreUnavailable (503)."""
        for limit in limits:
            if limit.per == "subject":
                # a token without a subject (client credentials) is its client's: counted, never free
                identity = f"sub:{subject}" if subject else (f"client:{client}" if client else None)
            else:
                identity = f"client:{client}" if client else None
            if identity is None:
                continue  # per client, on a token naming no client: nothing to count it against
            wait = await self.store.take(bucket_key(limit, issuer, identity), limit)
            if wait > 0:
                raise Exceeded(limit, wait)
