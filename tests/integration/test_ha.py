"""Three replicas behind a real load balancer (HAProxy, Debian's), sharing one Redis and one
policy bundle: an SDK client's session works across replicas, a replica killed mid-run costs
only what it had in flight, and a policy change reaches all three."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, free_port, make_profile
from tests.integration.test_gateway_e2e import LIST, mcp_client, post
from tests.integration.test_reload import write_v2

HAPROXY = """global
  maxconn 1000
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  retries 2
  option redispatch
  default-server inter 300ms fall 1 rise 2
frontend mcp
  bind 127.0.0.1:{front}
  default_backend gateways
backend gateways
  balance roundrobin
  option httpchk GET /healthz
{servers}
"""


@pytest.fixture
def haproxy_binary() -> str:
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(binary).exists():
        pytest.fail("haproxy is not installed: scripts/test.sh installs it (apt-get install haproxy)")
    return binary


async def test_three_replicas_behind_haproxy(gateways: Any, issuer: Any, upstream: Any, redis_server: Any, tmp_path: Path,
                                             haproxy_binary: str) -> None:
    front = free_port()
    public = f"http://127.0.0.1:{front}"
    bundle = tmp_path / "bundle"
    shutil.copytree(ROOT / "policies", bundle)
    config = {"public_url": public, "decision_log": "", "access_log": False, "reload": {"interval": 0.2},
              "sessions": {"store": "redis", "url": redis_server.url}}
    replicas = [gateways.start(profile=make_profile(issuer), upstream_url=upstream.url, config=config, policy_bundle=bundle,
                               replica=f"ha-{i}") for i in range(3)]
    servers = "\n".join(f"  server r{i} 127.0.0.1:{gw.port} check" for i, gw in enumerate(replicas))
    (tmp_path / "haproxy.cfg").write_text(HAPROXY.format(front=front, servers=servers))
    lb = subprocess.Popen([haproxy_binary, "-db", "-f", str(tmp_path / "haproxy.cfg")], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(public + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and lb.poll() is None
            await asyncio.sleep(0.1)
        token = issuer.mint(aud=public + "/mcp")
        victim = replicas[1]

        # an SDK client's session, request after request, round-robin over the three replicas
        failures = successes = 0
        async with mcp_client(public + "/mcp", token, "legacy") as client:
            for i in range(30):
                if i == 10:
                    os.kill(victim.proc.pid, signal.SIGKILL)  # mid-run: only what it holds is lost
                try:
                    result = await client.call_tool("list_notes", {})
                    successes += 0 if result.is_error else 1
                    failures += 1 if result.is_error else 0
                except Exception:  # noqa: BLE001 - an in-flight request on the killed replica
                    failures += 1
        assert victim.proc.wait(5) == -signal.SIGKILL
        assert successes >= 28 and failures <= 2, (successes, failures)

        # one policy change reaches every replica still running
        write_v2(bundle)
        await asyncio.sleep(0.5)
        deadline = time.monotonic() + 30
        while any(post(r.mcp_url, issuer.mint(aud=public + "/mcp"), LIST).status_code != 403 for r in (replicas[0], replicas[2])):
            assert time.monotonic() < deadline, "the change did not reach every replica"
            await asyncio.sleep(0.3)
        statuses = {post(public + "/mcp", token, LIST).status_code for _ in range(6)}
        assert statuses == {403}
        revisions = {httpx.get(r.base + "/readyz").json()["policy"]["revision"] for r in (replicas[0], replicas[2])}
        assert len(revisions) == 1
    finally:
        lb.terminate()
        lb.wait(10)
