"""mcp-remote (the stdio bridge Claude Desktop uses for remote servers), unmodified, through
the gateway in proxy mode, for the shipped `keycloak` and `nextcloud-oidc` profiles.

The test speaks MCP over stdio to mcp-remote with the SDK's client. mcp-remote does
everything else itself: discovery, registration at the gateway, opening the authorization
URL in "the browser" (`$BROWSER`, here tests/support/browser.py following the redirects as
user alice), its loopback callback, the token, step-up on 403, and refresh after a 401.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.shared.exceptions import MCPError

from tests.conftest import ROOT, free_port, wait_http
from tests.integration.test_oauth_proxy import PROXY, Setup, setup  # noqa: F401 - the fixture
from tests.support.browser import query_of

CLIENTS = ROOT / "tests" / "clients"
MCP_REMOTE = CLIENTS / "node_modules" / "mcp-remote" / "dist" / "proxy.js"


@pytest.fixture(scope="session")
def mcp_remote() -> Path:
    if not MCP_REMOTE.exists():  # scripts/test.sh installs it; this covers a bare pytest run
        subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=CLIENTS, check=True, capture_output=True)
    return MCP_REMOTE


def browser_command(tmp: Path) -> tuple[Path, Path]:
    """A `$BROWSER` that follows the URL headlessly; every URL it opened is appended to a log."""
    script, log = tmp / "browser.sh", tmp / "opened.log"
    script.write_text(f'#!/bin/sh\ncd {ROOT} && exec {sys.executable} -m tests.support.browser "$1"\n')
    script.chmod(0o755)
    return script, log


def bridge(mcp_remote: Path, url: str, tmp: Path, callback_port: int, user: str = "alice") -> StdioServerParameters:
    browser, log = browser_command(tmp)
    env = {
        "PATH": os.environ["PATH"], "HOME": str(tmp), "MCP_REMOTE_CONFIG_DIR": str(tmp / "mcp-auth"), "BROWSER": str(browser),
        "TEST_BROWSER_LOG": str(log), "TEST_BROWSER_USER": user, "DISPLAY": "",
    }
    node = shutil.which("node") or "node"
    return StdioServerParameters(command=node, args=[str(mcp_remote), url, str(callback_port), "--host", "127.0.0.1"], env=env,
                                 cwd=str(tmp))


def opened(tmp: Path) -> list[str]:
    """The sign-ins mcp-remote started (one per `state`: its opener may launch a URL twice)."""
    log = tmp / "opened.log"
    urls = log.read_text().splitlines() if log.exists() else []
    return list(dict.fromkeys(query_of(u)["state"] for u in urls))


async def test_mcp_remote_signs_in_steps_up_and_refreshes(setup: Setup, gateways: Any, mcp_remote: Path, tmp_path: Path) -> None:  # noqa: F811
    gw = setup.gateway(gateways)
    setup.idp.reset()
    port = free_port()  # the same callback port for both runs, as a desktop host keeps it
    async with Client(bridge(mcp_remote, gw.mcp_url, tmp_path, port), mode="legacy") as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert "list_notes" in tools and "create_note" not in tools
        assert len(opened(tmp_path)) == 1
        created = await client.call_tool("create_note", {"title": "via mcp-remote", "path": "/users/alice/r"})
        assert not created.is_error, created
        assert len(opened(tmp_path)) == 2  # step-up: a second sign-in, with more scopes
        assert "create_note" in {t.name for t in (await client.list_tools()).tools}
    stats = setup.idp.stats()
    assert stats["code_grants"] == 2 and stats["registrations"] == 0

    # break the stored access token: the next run gets a 401 and must refresh, not sign in again
    [tokens_file] = list((tmp_path / "mcp-auth").rglob("*_tokens.json"))
    stored = json.loads(tokens_file.read_text())
    stored["access_token"] = "not-a-valid-token"
    tokens_file.write_text(json.dumps(stored))
    async with Client(bridge(mcp_remote, gw.mcp_url, tmp_path, port), mode="legacy") as client:
        assert "list_notes" in {t.name for t in (await client.list_tools()).tools}
    assert len(opened(tmp_path)) == 2  # no third sign-in
    assert setup.idp.stats()["refresh_grants"] == 1
    refreshed = json.loads(tokens_file.read_text())
    assert refreshed["refresh_token"] != stored["refresh_token"]  # the gateway rotated its handle


async def test_dev_works_with_mcp_remote_out_of_the_box(mcp_remote: Path, tmp_path: Path) -> None:
    """`mcp-authz-gateway dev`, then `mcp-remote <url>`: sign-in, a read, a step-up for a write;
    the demo user can never get notes.admin, so purge_notes stays refused and the notes stay."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "dev", "--port", str(port), "--user", "carol"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        tokens: dict[str, str] = {}
        assert proc.stdout is not None
        for line in proc.stdout:
            for name in ("READER", "TOKEN"):
                if f"export {name}=" in line:
                    tokens[name] = line.split("=", 1)[1].strip()
            if len(tokens) == 2:
                break
        url = f"http://127.0.0.1:{port}/mcp"
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        async with Client(bridge(mcp_remote, url, tmp_path, free_port(), user=""), mode="legacy") as client:
            assert "create_note" not in {t.name for t in (await client.list_tools()).tools}  # first sign-in: notes.read
            created = await client.call_tool("create_note", {"title": "from mcp-remote", "path": "/users/carol/a"})
            assert not created.is_error, created  # stepped up to notes.write
            try:
                purged = await client.call_tool("purge_notes", {})
            except MCPError:  # mcp-remote gives up on the step-up the issuer will not grant
                purged = None
            assert purged is None or purged.is_error
        headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "purge_notes", "arguments": {}}}
        refused = httpx.post(url, json=call, headers={**headers, "Authorization": f"Bearer {tokens['TOKEN']}"})
        assert refused.status_code == 403 and "notes.admin" in refused.json()["error"]["message"]
        listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
        reader = httpx.post(url, json=listing, headers={**headers, "Authorization": f"Bearer {tokens['READER']}"}).json()
        assert "create_note" not in {t["name"] for t in reader["result"]["tools"]}
        count = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "list_notes", "arguments": {}}}
        notes = httpx.post(url, json=count, headers={**headers, "Authorization": f"Bearer {tokens['TOKEN']}"})
        assert "from mcp-remote" in notes.text  # the demo data survived
    finally:
        proc.terminate()
        proc.wait(10)
