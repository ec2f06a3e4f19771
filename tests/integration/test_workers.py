"""Several worker processes on one port (`workers: N`): every worker a whole gateway, sharing
sessions through Redis; the kernel spreads connections (SO_REUSEPORT); a worker that dies is
replaced; SIGHUP reaches every worker; without a shared store, start-up is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import ROOT, make_profile

CALL = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "list_notes", "arguments": {}}}
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json", "Mcp-Protocol-Version": "2025-11-25"}


def children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out.update(int(p) for p in text)
    return out


def worker_pids(parent: int, *, without: int | None = None) -> set[int] | None:
    """The parent's two workers (neither being `without`), once both run."""
    pids = children(parent)
    return pids if len(pids) == 2 and without not in pids else None


def wait_for(predicate: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def one_call(url: str, token: str, session: str) -> httpx.Response:
    """One request on its own connection (the kernel picks the worker per connection)."""
    with httpx.Client(timeout=10) as client:
        return client.post(url, json=CALL, headers={**HEADERS, "Authorization": f"Bearer {token}", "Mcp-Session-Id": session})


def decision_pids(log_file: Path) -> set[str]:
    return {json.loads(line)["labels"]["pid"] for line in log_file.read_text().splitlines() if line.strip()}


def test_workers_share_the_port_the_sessions_and_reloads(gateways: Any, issuer: Any, upstream: Any, redis_server: Any,
                                                       tmp_path: Path) -> None:
    log_file = tmp_path / "decisions.jsonl"
    gw = gateways.start(profile=make_profile(issuer), upstream_url=upstream.url, config={
        "workers": 2, "decision_log": str(log_file), "sessions": {"store": "redis", "url": redis_server.url},
        "reload": {"watch": False}})
    workers = wait_for(lambda: worker_pids(gw.proc.pid))
    token = issuer.mint(aud=gw.resource)

    # a session opened on one worker is honoured (and owned) on the other: every call below
    # goes on a connection of its own, and the kernel spreads them over both workers
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    with httpx.Client(timeout=10) as client:
        opened = client.post(gw.mcp_url, json=init, headers={**HEADERS, "Authorization": f"Bearer {token}"})
        assert opened.status_code == 200
        session = opened.headers["mcp-session-id"]
        done = client.post(gw.mcp_url, json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                           headers={**HEADERS, "Authorization": f"Bearer {token}", "Mcp-Session-Id": session})
        assert done.status_code == 202
    other = issuer.mint(sub="mallory", aud=gw.resource)
    for _ in range(30):
        assert one_call(gw.mcp_url, token, session).status_code == 200
    for _ in range(10):
        assert one_call(gw.mcp_url, other, session).status_code == 404
    wait_for(lambda: decision_pids(log_file) == {str(p) for p in workers})

    # SIGHUP to the parent reaches every worker
    before = gw.log().count("reload (SIGHUP) done")
    gw.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: gw.log().count("reload (SIGHUP) done") - before == 2)

    # a worker killed is replaced; requests keep being served meanwhile
    victim = sorted(workers)[0]
    os.kill(victim, signal.SIGKILL)
    for _ in range(10):
        assert one_call(gw.mcp_url, token, session).status_code == 200
    replaced = wait_for(lambda: worker_pids(gw.proc.pid, without=victim))
    assert "exited with -9; starting another" in gw.log()
    wait_for(lambda: all(one_call(gw.mcp_url, token, session).status_code == 200 for _ in range(5)))
    assert replaced - workers  # a new pid


def test_several_workers_without_a_shared_store_stop_start_up(tmp_path: Path, issuer: Any) -> None:
    (tmp_path / "profile.yaml").write_text(yaml.safe_dump(make_profile(issuer)))
    config = {"public_url": "http://127.0.0.1:9", "listen": {"host": "127.0.0.1", "port": 9}, "upstream": {"url": "http://127.0.0.1:1/mcp"},
              "profile": "./profile.yaml", "workers": 2}
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
    for command in (["check"], ["serve"]):
        run = subprocess.run([sys.executable, "-m", "gateway.cli", *command, "--config", str(tmp_path / "gateway.yaml")],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert run.returncode == 2, run.stderr
        assert "gateway.yaml: workers: 2 workers need sessions.store: redis" in run.stderr

    # the flag is checked the same way
    del config["workers"]
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--workers", "3", "--config", str(tmp_path / "gateway.yaml")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "--workers: 3 workers need sessions.store: redis" in run.stderr
