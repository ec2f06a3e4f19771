"""The remote engine: decisions from a real OPA server's data API.

One pooled httpx client for the gateway's lifetime (keep-alive, no retries: a retry would
only stretch the time a request waits for a refusal). Same input and output contract as the
embedded engines. OPA unreachable, slower than `policy.timeout`, answering an error or no
`result` (undefined) → PolicyError → 503, nothing forwarded, and OPA's own message (its
`code` and `message`, e.g. an `eval_conflict_error` at a file and line) in the gateway log.

Every query asks for OPA's provenance, so the gateway knows which bundle revision OPA
actually decided with (not the files beside the gateway, which OPA may not have loaded):
it is in each decision-log line, `/readyz` and `mcp_gateway_policy_info`.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import httpx

from gateway.policy.decision import Decision, PolicyError

#: OPA serving files, not bundles, has no revision to tell
NO_BUNDLE = "files (OPA reports no bundle revision)"


def served_revision(answer: Any) -> str | None:
    """`name@revision, ...` from a data API answer's `provenance.bundles`, or NO_BUNDLE."""
    provenance = answer.get("provenance") if isinstance(answer, dict) else None
    if not isinstance(provenance, dict):
        return None
    bundles = provenance.get("bundles")
    if not isinstance(bundles, dict) or not bundles:
        return NO_BUNDLE
    return ", ".join(f"{name}@{(info or {}).get('revision') or '(no revision)'}" for name, info in sorted(bundles.items()))


def _opa_message(response: httpx.Response) -> str:
    """OPA's error body (`code`, `message`, the first errors with their locations), bounded."""
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    parts = [f"HTTP {response.status_code}", str(body.get("code", "")), str(body.get("message", ""))]
    for error in (body.get("errors") or [])[:3]:
        where = error.get("location") or {}
        parts.append(f"{error.get('code')}: {error.get('message')} at {where.get('file')}:{where.get('row')}")
    return "; ".join(p for p in parts if p)[:1000]


class OpaEngine:
    name = "opa"

    def __init__(self, opa_url: str, entrypoint: str, *, timeout: float, expected_data: dict[str, Any] | None = None) -> None:
        parts = urlsplit(opa_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PolicyError(f"policy.opa_url {opa_url!r} is not an http(s) URL")
        self.entrypoint = entrypoint
        self._base = opa_url.rstrip("/")
        self._timeout = timeout
        self._client: httpx.AsyncClient | None = None
        #: the bundle revision(s) OPA said it decided with, last time it was asked
        self.revision: str | None = None
        #: `policy.data` the running OPA must hold (the gateway never pushes it); checked at
        #: start-up and by /readyz; decisions are refused (503) until OPA has exactly this
        self._expected = expected_data or {}
        self._data_ok = not self._expected
        self.data_problem: str | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self._base, timeout=self._timeout, trust_env=False, follow_redirects=False)
        return self._client

    async def _check_data(self) -> bool:
        for key, value in self._expected.items():
            try:
                response = await self._http().get(f"/v1/data/{key}")
                answer = response.json() if response.status_code == 200 else None
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
        self._http()
        await self.refresh_revision()

    async def refresh_revision(self) -> str | None:
        """Ask OPA which revision it serves now (a cheap query with provenance)."""
        package = self.entrypoint.rsplit("/", 1)[0]
        try:
            response = await self._http().get(f"/v1/data/{package}/decision_cache", params={"provenance": "true"})
            self.revision = served_revision(response.json()) if response.status_code == 200 else self.revision
        except Exception:  # noqa: BLE001 - /readyz says whether OPA is there
            pass
        return self.revision

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def ready(self) -> bool:
        try:
            healthy = (await self._http().get("/health")).status_code == 200
        except Exception:
            return False
        if healthy:
            await self.refresh_revision()
        if healthy and self._expected:
            self._data_ok = await self._check_data()
        return healthy and self._data_ok

    async def evaluate(self, policy_input: dict[str, Any]) -> Any:
        if not self._data_ok and not await self._check_data():
            raise PolicyError(f"OPA does not hold the configured policy data: {self.data_problem}", reason="policy_unavailable")
        self._data_ok = True
        try:
            response = await asyncio.wait_for(
                self._http().post(f"/v1/data/{self.entrypoint}", json={"input": policy_input}, params={"provenance": "true"}),
                self._timeout,
            )
        except TimeoutError:
            raise PolicyError("OPA did not answer in time", reason="policy_unavailable") from None
        except httpx.HTTPError as exc:
            raise PolicyError(f"OPA cannot be reached: {type(exc).__name__}", reason="policy_unavailable") from None
        if response.status_code != 200:
            raise PolicyError(f"OPA refused to decide: {_opa_message(response)}", reason="policy_error")
        try:
            answer = response.json()
        except ValueError:
            raise PolicyError("OPA's answer is not JSON", reason="policy_unavailable") from None
        self.revision = served_revision(answer) or self.revision
        if not isinstance(answer, dict) or "result" not in answer:
            raise PolicyError("the policy decision is undefined in OPA")
        return answer["result"]

    async def decide(self, policy_input: dict[str, Any]) -> Decision:
        return Decision.from_output(await self.evaluate(policy_input))
