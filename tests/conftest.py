"""Shared fixtures: real servers on free loopback ports.

- `issuer`: the dev issuer (JWKS, discovery, token endpoint) under uvicorn in a thread;
  tests mint tokens with its real private key.
- `upstream`: the tests' upstream MCP server (the SDK's MCPServer) as a separate process,
  recording every request it receives.
- `gateways`: starts `mcp-authz-gateway serve` processes for a profile/config, cached per shape.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import uvicorn
import yaml

from gateway.dev.issuer import DevIssuer

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen[Any] | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


class ThreadServer:
    """A uvicorn server in a background thread (a real socket, a real HTTP stack)."""

    def __init__(self, app: Any, port: int) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("thread server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def issuer() -> Any:
    port = free_port()
    dev = DevIssuer(f"http://127.0.0.1:{port}")
    server = ThreadServer(dev.app(), port)
    server.start()
    yield dev
    server.stop()


@dataclass
class UpstreamProcess:
    url: str
    record_dir: Path
    proc: subprocess.Popen[Any]

    def requests(self) -> list[dict[str, Any]]:
        path = self.record_dir / "requests.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def clear(self) -> None:
        (self.record_dir / "requests.jsonl").unlink(missing_ok=True)

    def authorizations(self) -> list[str | None]:
        return [dict(r["headers"]).get("authorization") for r in self.requests()]


def _start_upstream(tmp: Path, *extra: str) -> UpstreamProcess:
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.upstream_server", "--port", str(port), "--record", str(tmp), *extra],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "upstream.log", "w"),
    )
    url = f"http://127.0.0.1:{port}/mcp"
    wait_http(f"http://127.0.0.1:{port}/", proc)
    return UpstreamProcess(url=url, record_dir=tmp, proc=proc)


def _running_upstream(tmp_path_factory: pytest.TempPathFactory, name: str, *extra: str) -> Any:
    up = _start_upstream(tmp_path_factory.mktemp(name), *extra)
    yield up
    up.proc.terminate()
    up.proc.wait(10)


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A stateful upstream answering SSE (sessions, GET stream, DELETE)."""
    yield from _running_upstream(tmp_path_factory, "upstream")


@pytest.fixture(scope="session")
def json_upstream(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A stateless upstream answering JSON (the shape curl users and 2026-07-28 clients meet)."""
    yield from _running_upstream(tmp_path_factory, "json-upstream", "--json-response", "--stateless")


@dataclass
class GatewayProcess:
    port: int
    proc: subprocess.Popen[Any]
    log_path: Path
    config_path: Path
    base: str = field(init=False)

    def __post_init__(self) -> None:
        self.base = f"http://127.0.0.1:{self.port}"

    @property
    def mcp_url(self) -> str:
        return self.base + "/mcp"

    @property
    def resource(self) -> str:
        return self.mcp_url

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def make_profile(issuer: DevIssuer, **overrides: Any) -> dict[str, Any]:
    profile: dict[str, Any] = {
        "name": "test",
        "issuer": issuer.issuer,
        "token_kinds": ["jwt"],
        "jwt": {"algorithms": ["RS256"], "leeway": 5},
        "audience": {"accept": ["{resource}"], "reject": [], "match": "any", "missing": "reject"},
        "mode": "passthrough",
        "scopes_supported": ["notes.read", "notes.write"],
    }
    profile.update(overrides)
    return profile


class GatewayFactory:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.running: dict[str, GatewayProcess] = {}

    def start(
        self,
        *,
        profile: dict[str, Any] | str,
        upstream_url: str,
        config: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        policy_bundle: Path | None = None,
        replica: str = "",
    ) -> GatewayProcess:
        """A gateway process; `profile` is profile data, or a shipped profile's name (then `env` feeds it).

        The same arguments give the same running process; another `replica` name starts another one.
        """
        key = json.dumps([profile, upstream_url, config, env, str(policy_bundle), replica], sort_keys=True)
        if key in self.running and self.running[key].proc.poll() is None:
            return self.running[key]
        port = free_port()
        d = self.tmp / f"gw-{len(self.running)}"
        d.mkdir()
        if isinstance(profile, dict):
            (d / "profile.yaml").write_text(yaml.safe_dump(profile))
        cfg: dict[str, Any] = {
            "public_url": f"http://127.0.0.1:{port}",
            "listen": {"host": "127.0.0.1", "port": port},
            "upstream": {"url": upstream_url, "timeout": 10},
            "profile": "./profile.yaml" if isinstance(profile, dict) else profile,
            "policy": {"engine": "embedded", "bundle": str(policy_bundle or ROOT / "policies")},
            "log_level": "info",
        }
        cfg.update(config or {})
        cfg["listen"] = {"host": "127.0.0.1", **(config or {}).get("listen", {}), "port": port}  # limits may be given, never the port
        (d / "gateway.yaml").write_text(yaml.safe_dump(cfg))
        log_path = d / "gateway.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(d / "gateway.yaml")],
            cwd=ROOT,
            stdout=open(log_path, "w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        gw = GatewayProcess(port=port, proc=proc, log_path=log_path, config_path=d / "gateway.yaml")
        try:
            wait_http(gw.base + "/healthz", proc)
        except Exception:
            raise RuntimeError(f"gateway did not start:\n{gw.log()}") from None
        self.running[key] = gw
        return gw

    def stop_all(self) -> None:
        for gw in self.running.values():
            gw.proc.terminate()
        for gw in self.running.values():
            try:
                gw.proc.wait(10)
            except subprocess.TimeoutExpired:
                gw.proc.kill()


@pytest.fixture(scope="session")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Any:
    factory = GatewayFactory(tmp_path_factory.mktemp("gateways"))
    yield factory
    factory.stop_all()


@pytest.fixture(scope="session")
def gateway(gateways: GatewayFactory, issuer: DevIssuer, upstream: UpstreamProcess) -> GatewayProcess:
    """The default gateway: pass-through, audience = its own resource URL, SSE upstream."""
    return gateways.start(profile=make_profile(issuer), upstream_url=upstream.url)


# --- The real OpenID provider (tests/idp, oidc-provider on Node) -------------------------

IDP_DIR = ROOT / "tests" / "idp"
IDP_CLIENT = ("nextcloud-mcp-server", "mcp-secret")


def ensure_idp_installed() -> None:
    """`npm ci` the pinned provider once (scripts/test.sh does it too; this covers bare pytest)."""
    if not (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=IDP_DIR, check=True, capture_output=True)


@dataclass
class OpenIdProvider:
    shape: str
    base: str
    issuer: str
    proc: subprocess.Popen[Any]

    @property
    def jwks_url(self) -> str:
        return self.issuer + "/jwks"

    def token(self, subject: str = "alice", *, scope: str = "openid notes.read notes.write", audience: list[str] | None = None,
              resource: str | None = None, format: str = "jwt", no_aud: bool = False, client: tuple[str, str] = IDP_CLIENT) -> str:
        form: list[tuple[str, str]] = [("grant_type", "urn:test:grant-type:user"), ("subject", subject), ("scope", scope), ("format", format)]
        form += [("audience", a) for a in audience or []]
        if resource:
            form.append(("resource", resource))
        if no_aud:
            form.append(("no_aud", "true"))
        resp = httpx.post(self.issuer + "/token", content=urlencode(form), auth=client,
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
        resp.raise_for_status()
        return resp.json()["access_token"]

    def stats(self) -> dict[str, Any]:
        return httpx.get(self.base + "/test/stats").json()

    def reset(self) -> None:
        httpx.get(self.base + "/test/reset").raise_for_status()

    def exchange_mode(self, mode: str) -> None:
        httpx.get(self.base + "/test/exchange-mode", params={"mode": mode}).raise_for_status()

    def revoke(self, token: str) -> bool:
        return httpx.get(self.base + "/test/revoke", params={"token": token}).json()["revoked"]


def _start_idp(shape: str, log_dir: Path) -> OpenIdProvider:
    ensure_idp_installed()
    port = free_port()
    proc = subprocess.Popen(
        ["node", "server.mjs", "--port", str(port), "--shape", shape],
        cwd=IDP_DIR,
        stdout=open(log_dir / f"idp-{shape}.log", "w"),
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    issuer = base + ("/realms/mcp" if shape == "keycloak" else "")
    wait_http(issuer + "/.well-known/openid-configuration", proc)
    return OpenIdProvider(shape=shape, base=base, issuer=issuer, proc=proc)


def _running_idp(tmp_path_factory: pytest.TempPathFactory, shape: str) -> Any:
    idp = _start_idp(shape, tmp_path_factory.mktemp("idp"))
    yield idp
    idp.proc.terminate()
    idp.proc.wait(10)


@pytest.fixture(scope="session")
def keycloak_idp(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from _running_idp(tmp_path_factory, "keycloak")


@pytest.fixture(scope="session")
def nextcloud_idp(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from _running_idp(tmp_path_factory, "nextcloud")


@pytest.fixture(scope="session")
def backend_upstream(tmp_path_factory: pytest.TempPathFactory, keycloak_idp: OpenIdProvider) -> Any:
    """An upstream that, like a real backend, verifies the token it receives against the Keycloak-like IdP."""
    yield from _running_upstream(
        tmp_path_factory, "backend-upstream",
        "--json-response", "--stateless", "--verify-jwks", keycloak_idp.jwks_url, "--verify-issuer", keycloak_idp.issuer,
    )


@pytest.fixture(scope="session")
def nextcloud_upstream(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from _running_upstream(tmp_path_factory, "nextcloud-upstream", "--json-response", "--stateless")


# --- A real OPA server (../shared/bin/opa, $OPA_BIN, or opa on PATH) ----------------------


def find_opa() -> str | None:
    import shutil

    for candidate in (os.environ.get("OPA_BIN"), shutil.which("opa"), str(ROOT.parent / "shared" / "bin" / "opa")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass
class OpaServer:
    url: str
    proc: subprocess.Popen[Any]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def start_opa(bundle: Path, log_dir: Path, *data_files: Path) -> OpaServer:
    opa = find_opa()
    if opa is None:
        pytest.skip("no OPA binary: set OPA_BIN, put opa on PATH, or keep ../shared/bin/opa beside the checkout")
    port = free_port()
    proc = subprocess.Popen(
        [opa, "run", "--server", "--addr", f"127.0.0.1:{port}", "--disable-telemetry", "--log-level", "error", str(bundle), *map(str, data_files)],
        stdout=open(log_dir / f"opa-{port}.log", "w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc)
    return OpaServer(url=url, proc=proc)


@pytest.fixture(scope="session")
def opa_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = start_opa(ROOT / "policies", tmp_path_factory.mktemp("opa"))
    yield server
    server.stop()


# --- A real Redis (scripts/test.sh installs redis-server) ---------------------------------


@dataclass
class RedisServer:
    url: str
    port: int
    proc: subprocess.Popen[Any]

    def command(self, *args: str) -> str:
        """One command as RESP over a plain socket (for assertions; no client library)."""
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(payload.encode())
            return s.recv(65536).decode(errors="replace")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import shutil

    binary = os.environ.get("REDIS_SERVER_BIN") or shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        pytest.fail("redis-server is not installed: scripts/test.sh installs it (apt-get install redis-server)")
    port = free_port()
    data_dir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(data_dir)],
        stdout=open(data_dir / "redis.log", "w"),
        stderr=subprocess.STDOUT,
    )
    server = RedisServer(url=f"redis://127.0.0.1:{port}/0", port=port, proc=proc)
    deadline = time.monotonic() + 20
    while True:
        try:
            if "PONG" in server.command("PING"):
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not start: {(data_dir / 'redis.log').read_text()}")
        time.sleep(0.05)
    yield server
    proc.terminate()
    proc.wait(10)
