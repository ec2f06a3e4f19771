"""What one identity may hold at once, in this process: requests in progress and open
streams (a GET stream, or a POST answered as a stream). One user opening a hundred
long-lived streams used to take the whole upstream pool; now they get 429 at their own
limit and nobody else notices."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable


class IdentityLimits:
    def __init__(self, max_requests: int, max_streams: int) -> None:
        self._max = {"request": max_requests, "stream": max_streams}
        self._held: Counter[tuple[Hashable, str]] = Counter()

    def acquire(self, identity: Hashable, kind: str) -> Callable[[], None] | None:
        """A release function (idempotent), or None when `identity` is at its `kind` limit."""
        key = (identity, kind)
        if self._held[key] >= self._max[kind]:
            return None
        self._held[key] += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self._held[key] -= 1
            if self._held[key] <= 0:
                del self._held[key]

        return release

    def held(self, identity: Hashable, kind: str) -> int:
        return self._held.get((identity, kind), 0)
