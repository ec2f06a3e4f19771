"""The console script as a user runs it: check, policy test, serve errors, dev."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import ROOT, free_port, wait_http

SHIPPED_ENV = {
    "KEYCLOAK_ISSUER": "http://localhost:8888/realms/nextcloud-mcp",
    "MCP_CLIENT_ID": "nextcloud-mcp-server",
    "MCP_CLIENT_SECRET": "s3cret",
    "NEXTCLOUD_URL": "http://localhost:8080",
}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_check_passes_on_shipped_configs() -> None:
    for config in ("examples/gateway.yaml", "examples/nextcloud-gateway.yaml"):
        result = cli("check", "--config", config, env=SHIPPED_ENV)
        assert result.returncode == 0, result.stdout + result.stderr
        assert re.search(r"PASS: (\d+)/\1", result.stdout)


def test_check_reports_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "gateway.yaml"
    bad.write_text("public_url: http://127.0.0.1:8080\nupstream: {url: http://x/mcp, timout: 3}\nprofile: dev\n")
    result = cli("check", "--config", str(bad))
    assert result.returncode == 2
    assert "gateway.yaml: upstream.timout: unknown key" in result.stderr


def test_config_from_environment_variable(tmp_path: Path) -> None:
    result = cli("check", env={"GATEWAY_CONFIG": str(ROOT / "examples/nextcloud-gateway.yaml"), **SHIPPED_ENV})
    assert result.returncode == 0, result.stderr
    assert cli("check").returncode == 2  # neither --config nor GATEWAY_CONFIG


def test_policy_test_command(tmp_path: Path) -> None:
    ok = cli("policy", "test", "policies", "-v")
    assert ok.returncode == 0 and "PASS: data.mcp.gateway_test." in ok.stdout
    (tmp_path / "p.rego").write_text('package x\n\ndefault allow := false\n')
    (tmp_path / "p_test.rego").write_text("package x_test\n\ntest_allows if data.x.allow\n")
    failed = cli("policy", "test", str(tmp_path))
    assert failed.returncode == 2
    assert "FAIL: data.x_test.test_allows" in failed.stdout and "FAIL: 0/1" in failed.stdout


def test_serve_refuses_a_broken_policy(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.rego").write_text("package mcp.gateway\n\ndecision := {\n")
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("public_url: http://127.0.0.1:1\nupstream: {url: http://127.0.0.1:1/mcp}\nprofile: dev\npolicy: {bundle: policies}\n")
    result = cli("serve", "--config", str(cfg))
    assert result.returncode == 2
    assert "does not compile" in result.stderr


def test_dev_command_serves_a_working_demo() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "dev", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        token = None
        assert proc.stdout is not None
        for line in proc.stdout:
            if "export TOKEN=" in line:
                token = line.split("TOKEN=", 1)[1].strip()
                break
        assert token, "dev printed no token"
        url = f"http://127.0.0.1:{port}/mcp"
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        listed = httpx.post(url, json=body, headers={**headers, "Authorization": f"Bearer {token}"})
        assert listed.status_code == 200
        assert "create_note" in {t["name"] for t in listed.json()["result"]["tools"]}
        refused = httpx.post(url, json=body, headers=headers)
        assert refused.status_code == 401 and "resource_metadata" in refused.headers["www-authenticate"]
    finally:
        proc.terminate()
        proc.wait(10)


def _explain_config(tmp_path: Path, issuer) -> Path:
    import yaml

    from tests.conftest import make_profile

    (tmp_path / "profile.yaml").write_text(yaml.safe_dump(make_profile(issuer)))
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("public_url: http://127.0.0.1:8080\nupstream: {url: http://127.0.0.1:1/mcp}\nprofile: ./profile.yaml\n")
    return cfg


def test_explain_with_claims_shows_input_decision_and_action(tmp_path: Path) -> None:
    claims = tmp_path / "claims.json"
    claims.write_text('{"iss": "http://localhost:8888/realms/nextcloud-mcp", "sub": "alice", "aud": ["nextcloud-mcp-server", "account"]}')
    ok = cli("explain", "--config", "examples/gateway.yaml", "--claims", str(claims), "--tool", "read_note", "--args", '{"id": 1}', env=SHIPPED_ENV)
    assert ok.returncode == 0, ok.stderr
    assert '"tool": "read_note"' in ok.stdout and '"arguments": {\n      "id": 1' in ok.stdout
    assert "the gateway would: exchange the client's token for audience nextcloud" in ok.stdout
    claims.write_text('{"iss": "x", "sub": "alice", "aud": "account"}')
    refused = cli("explain", "--config", "examples/gateway.yaml", "--claims", str(claims), "--request", '{"jsonrpc":"2.0","id":1,"method":"tools/list"}', env=SHIPPED_ENV)
    assert refused.returncode == 1
    assert 'the gateway would: refuse with status 401 (audience_not_accepted) with WWW-Authenticate: Bearer error="invalid_token"' in refused.stdout


def test_explain_verifies_a_real_token_and_never_prints_it(tmp_path: Path, issuer) -> None:
    cfg = _explain_config(tmp_path, issuer)
    token = issuer.mint(aud="http://127.0.0.1:8080/mcp", sub="explained")
    ok = cli("explain", "--config", str(cfg), "--token", token, "--tool", "list_notes")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "the gateway would: forward to the upstream as is" in ok.stdout and '"subject": "explained"' in ok.stdout
    assert token not in ok.stdout and token.split(".")[2] not in ok.stdout
    bad = cli("explain", "--config", str(cfg), "--token", issuer.mint(aud="x", lifetime=-600), "--tool", "list_notes")
    assert bad.returncode == 1 and "refuse with status 401 (expired)" in bad.stdout


def test_proxy_mode_without_a_gateway_client_stops_check_and_serve(tmp_path: Path) -> None:
    """A profile with no client of the gateway's own at the IdP: proxy mode cannot work."""
    (tmp_path / "profile.yaml").write_text("name: bare\nissuer: http://127.0.0.1:1\n")
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"public_url: http://127.0.0.1:{free_port()}\nupstream: {{url: http://127.0.0.1:1/mcp}}\nprofile: ./profile.yaml\n"
        "authorization_server: {mode: proxy}\n"
    )
    for command in ("check", "serve"):
        result = cli(command, "--config", str(config))
        assert result.returncode == 2, result.stdout + result.stderr
        assert "gateway.yaml: authorization_server.mode: proxy needs the gateway's own client at the IdP" in result.stderr


def test_check_names_the_proxy_client(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "public_url: http://127.0.0.1:8080\nupstream: {url: http://127.0.0.1:1/mcp}\nprofile: nextcloud-oidc\n"
        "authorization_server: {mode: proxy}\n"
    )
    result = cli("check", "--config", str(config), env=SHIPPED_ENV)
    assert result.returncode == 0, result.stderr
    assert "authorization server: proxy (signs users in at the IdP as client nextcloud-mcp-server)" in result.stdout


def test_policy_test_asks_a_real_opa_and_reports_where_it_disagrees(tmp_path: Path) -> None:
    """Item 6: regopy aborts on a bundle OPA accepts, and accepts an unsafe variable OPA
    rejects; with OPA at hand, `policy test` says so, with file and line."""
    from tests.conftest import find_opa

    env = {**os.environ, "OPA_BIN": find_opa()}
    crash = tmp_path / "crash"
    crash.mkdir()
    (crash / "a.rego").write_text("package crash_a\n\nf(x) := x + 1\n")
    (crash / "b.rego").write_text("package crash_b\n\nf(x, y) := x + y\n\ntest_b if f(1, 2) == 3\n")
    run = subprocess.run([sys.executable, "-m", "gateway.cli", "policy", "test", str(crash)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=env)
    assert run.returncode == 1
    assert "regopy) crashed on this bundle" in run.stdout
    assert f"DISAGREE: {crash / 'b.rego'}:5: data.crash_b.test_b: OPA ran it (pass), the embedded engine did not" in run.stdout

    unsafe = tmp_path / "unsafe"
    unsafe.mkdir()
    (unsafe / "p.rego").write_text("package unsafe\n\nallow if {\n\tx > 1\n}\n\ntest_nothing if true\n")
    run = subprocess.run([sys.executable, "-m", "gateway.cli", "policy", "test", str(unsafe)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=env)
    assert run.returncode == 1, run.stdout
    assert "DISAGREE: opa test could not run the bundle:" in run.stdout and "p.rego:4" in run.stdout

    shipped = subprocess.run([sys.executable, "-m", "gateway.cli", "policy", "test", str(ROOT / "policies"), "--data",
                              str(ROOT / "examples" / "team-rules.yaml")], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert shipped.returncode == 0 and "opa test: agrees" in shipped.stdout


def test_coverage_of_the_shipped_policies(capsys: Any) -> None:
    """Item 12: the figure for the shipped policies, printed in CI, and kept high."""
    from tests.conftest import find_opa

    run = subprocess.run([sys.executable, "-m", "gateway.cli", "policy", "test", str(ROOT / "policies"), "--coverage", "--data",
                          str(ROOT / "examples" / "team-rules.yaml")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OPA_BIN": find_opa()})
    assert run.returncode == 0, run.stdout + run.stderr
    figure = float(re.search(r"coverage: ([0-9.]+)%", run.stdout).group(1))
    with capsys.disabled():
        print("\n" + "\n".join(line for line in run.stdout.splitlines() if "coverage" in line or ".rego:" in line))
    assert figure >= 95, run.stdout
    assert "policies/tools.rego:" in run.stdout and "policies/gateway.rego:" in run.stdout


def test_check_passes_on_the_vault_example_and_names_what_is_missing(tmp_path: Path) -> None:
    import base64

    env = {**SHIPPED_ENV, "VAULT_PATH": str(tmp_path / "vault.db"), "NOTES_SYNC_SECRET": "n" * 24, "REPORTS_SECRET": "r" * 24}
    key = "k1=" + base64.b64encode(os.urandom(32)).decode()
    ok = cli("check", "--config", "examples/vault-gateway.yaml", env={**env, "MCP_GATEWAY_VAULT_KEYS": key})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "vault ok: store sqlite, keys k1" in ok.stdout and key.split("=", 1)[1] not in ok.stdout + ok.stderr
    no_keys = cli("check", "--config", "examples/vault-gateway.yaml", env=env)
    assert no_keys.returncode == 2
    assert "vault-gateway.yaml: vault.keys_env: the environment variable MCP_GATEWAY_VAULT_KEYS is not set" in no_keys.stderr
    short = cli("check", "--config", "examples/vault-gateway.yaml", env={**env, "MCP_GATEWAY_VAULT_KEYS": "k1=c2hvcnQ="})
    assert short.returncode == 2 and "vault.keys_env: key k1 must be 32 bytes (AES-256), it has 5" in short.stderr
    served = cli("serve", "--config", "examples/vault-gateway.yaml", "--port", str(free_port()), env=env)  # start-up stops the same way
    assert served.returncode == 2 and "vault.keys_env: the environment variable" in served.stderr
