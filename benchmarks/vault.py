"""What the token vault costs, measured side by side in one run.

    python -m benchmarks.vault [--seconds 4]

On loopback, with the Nextcloud-shaped test OpenID provider (tests/idp, node) and the
minimal MCP responder: the same gateway configuration in pass-through mode and in
`mode: delegate` (the upstream gets a token the vault refreshed from the user's grant;
after the first call it comes from the vault's memory, checked against the store), each at
concurrency 1 and 16, right after the direct run; and `POST /vault/token` for a backend
(cached releases). Prints p50/p99, requests/s and the gateway's CPU per request, and writes
benchmarks/results/vault.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import secrets
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import yaml

from benchmarks.loadgen import load
from benchmarks.run import IDP_DIR, RESULTS, ROOT, Processes, free_port, measure, start_gateway, summarize

REDIRECT = "http://127.0.0.1:47999/callback"
BACKEND = ("bench-sync", "bench-sync-secret-0123456789")


def sign_in(base: str, user: str) -> str:
    """A client's sign-in through the gateway (register, PKCE, the IdP's pages): its access token."""
    with httpx.Client(base_url=base, timeout=20, trust_env=False) as http:
        client = http.post("/oauth/register", json={"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none",
                                                    "grant_types": ["authorization_code", "refresh_token"]}).json()
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        url = base + "/oauth/authorize?" + urlencode({
            "response_type": "code", "client_id": client["client_id"], "redirect_uri": REDIRECT, "state": "s", "login_hint": user,
            "code_challenge": challenge, "code_challenge_method": "S256", "scope": "notes.read notes.write"})
        for _ in range(20):  # the browser: follow redirects until the client's redirect URI
            location = http.get(url).headers["location"]
            url = str(httpx.URL(url).join(location))
            if url.startswith(REDIRECT):
                break
        landed = parse_qs(urlsplit(url).query)
        if "code" not in landed:
            raise RuntimeError(f"the sign-in ended without a code: {landed}")
        code = landed["code"][0]
        return http.post("/oauth/token", data={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT,
                                               "code_verifier": verifier, "client_id": client["client_id"]}).json()["access_token"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    if not (shutil.which("node") and (IDP_DIR / "node_modules" / "oidc-provider").is_dir()):
        print("needs node and tests/idp/node_modules (scripts/bench.sh installs them)")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="mcp-gw-vault-bench-"))
    procs = Processes(tmp)
    results: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M"), "seconds": args.seconds, "cells": {}}
    with ExitStack() as stack:
        stack.callback(procs.stop)
        fast_port, idp_port = free_port(), free_port()
        procs.start("fast-upstream", [sys.executable, "-m", "benchmarks.fast_upstream", "--port", str(fast_port)], f"http://127.0.0.1:{fast_port}/")
        fast = f"http://127.0.0.1:{fast_port}/mcp"
        issuer = f"http://127.0.0.1:{idp_port}"
        procs.start("idp", ["node", "server.mjs", "--port", str(idp_port), "--shape", "nextcloud"], issuer + "/.well-known/openid-configuration",
                    cwd=IDP_DIR)
        env = {"NEXTCLOUD_URL": issuer, "MCP_CLIENT_ID": "nextcloud-mcp-server", "MCP_CLIENT_SECRET": "mcp-secret",
               "BENCH_VAULT_KEYS": "k1=" + base64.b64encode(secrets.token_bytes(32)).decode()}
        data = tmp / "vault-authz.yaml"
        data.write_text(yaml.safe_dump({"authz": {"vault": {"backends": {BACKEND[0]: {"audiences": ["nextcloud-mcp-server"],
                                                                                        "scopes": ["notes.read"]}}}}}))
        profile = yaml.safe_load((ROOT / "profiles" / "nextcloud-oidc.yaml").read_text())
        delegate = {**profile, "mode": "delegate", "vault": {"offline_access": True, "release": "refresh",
                                                             "delegate": {"audience": ["nextcloud-mcp-server"], "scope": ["notes.read", "notes.write"]}}}
        common = {"authorization_server": {"mode": "proxy"},
                  "vault": {"enabled": True, "keys_env": "BENCH_VAULT_KEYS", "path": str(tmp / "vault.db"),
                            "backends": {BACKEND[0]: {"client_secret": BACKEND[1]}}}}
        gateways = {}
        for name, prof in (("passthrough", profile), ("delegate", delegate)):
            prof = json.loads(json.dumps(prof).replace("${NEXTCLOUD_URL}", issuer).replace("${MCP_CLIENT_ID}", env["MCP_CLIENT_ID"])
                              .replace("${MCP_CLIENT_SECRET}", env["MCP_CLIENT_SECRET"]).replace("${NEXTCLOUD_DISCOVERY_URL:-}", "")
                              .replace("${NEXTCLOUD_INTROSPECTION_ENDPOINT:-}", ""))
            url, proc = start_gateway(procs, f"gw-{name}", profile=prof, upstream=fast, env=env,
                                      policy={"data": [str(ROOT / "examples" / "notes-authz.yaml"), str(data)]}, extra=common)
            gateways[name] = (url, proc, sign_in(url.removesuffix("/mcp"), "alice"))

        for name, (url, proc, token) in gateways.items():
            for conc in (1, 16):
                direct = asyncio.run(measure(fast, token, conc, args.seconds))
                through = asyncio.run(measure(url, token, conc, args.seconds, pid=proc.pid))
                results["cells"][f"{name}/c{conc}"] = {"direct": direct, "gateway": through,
                                                       "added_p50_ms": through["p50_ms"] - direct["p50_ms"]}
                print(f"{name:12} c={conc:<2} direct p50 {direct['p50_ms']:.2f} ms {direct['rps']:7.0f} rps | gateway p50 "
                      f"{through['p50_ms']:.2f} ms p99 {through['p99_ms']:.2f} ms {through['rps']:7.0f} rps | added p50 "
                      f"{through['p50_ms'] - direct['p50_ms']:+.2f} ms | CPU {through.get('cpu_us_per_request', 0):.0f} µs/req | "
                      f"errors {direct['errors'] + through['errors']}", flush=True)

        url, proc, _ = gateways["passthrough"]
        base = url.removesuffix("/mcp")
        form = urlencode({"subject": "alice", "audience": "nextcloud-mcp-server", "scope": "notes.read", "reason": "bench"}).encode()
        auth = "Basic " + base64.b64encode(f"{BACKEND[0]}:{BACKEND[1]}".encode()).decode()
        first = httpx.post(base + "/vault/token", content=form, headers={"Authorization": auth,
                                                                         "Content-Type": "application/x-www-form-urlencoded"})
        assert first.status_code == 200, first.text
        for conc in (1, 16):
            from benchmarks.run import cpu_seconds

            before = cpu_seconds(proc.pid)
            run = asyncio.run(load(base + "/vault/token", form, {"Authorization": auth, "Content-Type": "application/x-www-form-urlencoded"},
                                   concurrency=conc, seconds=args.seconds))
            cell = summarize(run)
            cell["cpu_us_per_request"] = (cpu_seconds(proc.pid) - before) / max(1, run.completed) * 1e6
            results["cells"][f"release-cached/c{conc}"] = cell
            print(f"{'release':12} c={conc:<2} POST /vault/token (cached) p50 {cell['p50_ms']:.2f} ms p99 {cell['p99_ms']:.2f} ms "
                  f"{cell['rps']:7.0f} rps | CPU {cell['cpu_us_per_request']:.0f} µs/req | errors {run.errors}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vault.json").write_text(json.dumps(results, indent=2))
    lines = [f"# The token vault's cost ({results['when']}, {args.seconds:.0f} s per run)", "",
             "`python -m benchmarks.vault`: the same gateway in pass-through and in `mode: delegate` (upstream gets a "
             "vault token, cached), right after the direct run; `POST /vault/token` for a backend (cached releases).", "",
             "| run | p50 ms | p99 ms | requests/s | added p50 ms | gateway CPU µs/request |", "|---|---|---|---|---|---|"]
    for name, cell in results["cells"].items():
        gw = cell.get("gateway", cell)
        added = f"{cell['added_p50_ms']:+.2f}" if "added_p50_ms" in cell else "—"
        lines.append(f"| {name} | {gw['p50_ms']:.2f} | {gw['p99_ms']:.2f} | {gw['rps']:.0f} | {added} | {gw.get('cpu_us_per_request', 0):.0f} |")
    (RESULTS / "vault.md").write_text("\n".join(lines) + "\n")
    print(f"written: {(RESULTS / 'vault.json').relative_to(ROOT)}, vault.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
