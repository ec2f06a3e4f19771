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

    def __init__(self, opa_url: str, entrypoint: str, *, timeout: float, expected_data: dict[str, Any] | None = None) -> None:
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
        #: `policy.data` the running OPA must hold (the gateway never pushes it); checked at
        #: start-up and by /readyz; decisions are refused (503) until OPA has exactly this
        self._expected = expected_data or {}
        self._data_ok = not self._expected
        self.data_problem: str | None = None

    async def _check_data(self) -> bool:
        for key, value in self._expected.items():
            try:
                answer = await asyncio.wait_for(self._client.get_data(key), self._timeout)
            except Exception as exc:
                self.data_problem = f"OPA's data.{key} could not be read: {type(exc).__name__}"
                return False
            if not isinstance(answer, dict) or answer.get("result") != value:
                self.data_problem = (f"OPA's data.{key} differs from policy.data (load the same files into OPA: "
                                     f"opa run -s BUNDLE DATA_FILE...)")
                return False
        self.data_problem = None
        return True

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
            healthy = bool(await asyncio.wait_for(self._client.check_health(), self._timeout))
        except Exception:
            return False
        if healthy and self._expected:
            self._data_ok = await self._check_data()
        return healthy and self._data_ok

    async def evaluate(self, policy_input: dict[str, Any]) -> Any:
        if not self._opened:
            await self.start()
        if not self._data_ok and not await self._check_data():
            raise PolicyError(f"OPA does not hold the configured policy data: {self.data_problem}", reason="policy_unavailable")
        self._data_ok = True
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
