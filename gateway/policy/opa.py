"""The remote engine: decisions from a real OPA server's data API.

Uses opa-python-client's async client, opened once at start-up and reused (keep-alive).
Same input and output contract as the embedded engine. OPA unreachable, slower than
`policy.timeout`, answering an error or no `result` (undefined) → PolicyError → 503,
nothing forwarded. The client's own retries are off: a retry would only stretch the
time a request waits for a refusal.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

from opa_client import AsyncOpaClient

from gateway.policy.decision import Decision, PolicyError


class OpaEngine:
    name = "opa"

    def __init__(self, opa_url: str, entrypoint: str, *, timeout: float) -> None:
        parts = urlsplit(opa_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PolicyError(f"policy.opa_url {opa_url!r} is not an http(s) URL")
        self.entrypoint = entrypoint
        self._package, _, self._rule = entrypoint.rpartition("/")
        self._timeout = timeout
        self._client = AsyncOpaClient(
            host=parts.hostname,
            port=parts.port or (443 if parts.scheme == "https" else 80),
            ssl=parts.scheme == "https",
            timeout=timeout,
            retries=0,
        )
        self._opened = False

    async def start(self) -> None:
        await self._client.__aenter__()
        self._opened = True

    async def aclose(self) -> None:
        if self._opened:
            await self._client.close_connection()
            self._opened = False

    async def ready(self) -> bool:
        if not self._opened:
            await self.start()
        try:
            return bool(await asyncio.wait_for(self._client.check_health(), self._timeout))
        except Exception:
            return False

    async def evaluate(self, policy_input: dict[str, Any]) -> Any:
        if not self._opened:
            await self.start()
        try:
            answer = await asyncio.wait_for(self._client.query_rule(policy_input, self._package, self._rule), self._timeout)
        except TimeoutError:
            raise PolicyError("OPA did not answer in time", reason="policy_unavailable") from None
        except Exception as exc:  # aiohttp errors, HTTP errors, bad JSON
            raise PolicyError(f"OPA query failed: {type(exc).__name__}: {exc}", reason="policy_unavailable") from None
        if not isinstance(answer, dict) or "result" not in answer:
            raise PolicyError("the policy decision is undefined in OPA")
        return answer["result"]

    async def decide(self, policy_input: dict[str, Any]) -> Decision:
        return Decision.from_output(await self.evaluate(policy_input))
