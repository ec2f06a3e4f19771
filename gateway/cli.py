"""`mcp-authz-gateway`: serve, check, dev, policy test.

Every command that reads configuration stops with `file: key: message` lines and a
non-zero exit code when something is wrong, before anything listens.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.config.settings import ConfigError, load_config, resolve_config_path
from gateway.policy.decision import PolicyError
from gateway.policy.regotest import TestReport, run_tests_isolated

if TYPE_CHECKING:
    from gateway.config.profiles import Profile
    from gateway.config.settings import Settings

EXIT_CONFIG = 2


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_CONFIG


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # one line per upstream/IdP HTTP call would repeat the decision log, on every request
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.config.settings import worker_problem
    from gateway.serving import ServerLimits, reuse_port_socket, supervise, uvicorn_options, worker_command

    try:
        settings = load_config(resolve_config_path(args.config))
        _setup_logging(settings.config.log_level)
        cfg = settings.config
        host = args.host or cfg.listen.host
        port = args.port if args.port is not None else cfg.listen.port
        workers = 1 if args.worker else (args.workers if args.workers is not None else cfg.workers)
        if not 1 <= workers <= 64:
            raise ConfigError("--workers: must be between 1 and 64")
        effective = cfg.model_copy(update={"listen": cfg.listen.model_copy(update={"port": port})})
        if (problem := worker_problem(effective, workers)) is not None:
            raise ConfigError(f"{'--workers' if args.workers is not None else settings.path.name + ': workers'}: {problem}")
        app = create_app(settings)  # every worker would fail the same way: find out once, here
    except (ConfigError, PolicyError) as exc:
        return _fail(str(exc))
    if workers > 1:
        del app
        return supervise(worker_command(str(settings.path), host, port), workers)
    listen = cfg.listen
    limits = ServerLimits(max_header_bytes=listen.max_header_bytes, max_headers=listen.max_headers, header_timeout=listen.header_timeout,
                          body_timeout=listen.body_timeout, max_connections_per_address=listen.max_connections_per_address)
    config = uvicorn.Config(
        app,
        **uvicorn_options(limits),
        host=host,
        port=port,
        log_level=cfg.log_level,
        access_log=cfg.access_log,
        server_header=False,
        proxy_headers=False,
        lifespan="on",
    )
    # a worker binds its own socket beside its siblings' (SO_REUSEPORT); alone, uvicorn binds
    uvicorn.Server(config).run(sockets=[reuse_port_socket(host, port)] if args.worker else None)
    return 0


def print_report(report: TestReport, *, verbose: bool = False) -> None:
    if report.error:
        print(f"ERROR: {report.error}")
        return
    for r in report.results:
        if not r.passed:
            print(f"FAIL: {r.rule} ({r.module}){': ' + r.detail if r.detail else ''}")
        elif verbose:
            print(f"PASS: {r.rule}")
    passed = len(report.results) - len(report.failed)
    print(f"{'PASS' if not report.failed else 'FAIL'}: {passed}/{len(report.results)}")


def cmd_check(args: argparse.Namespace) -> int:
    from gateway.assembly import test_problem
    from gateway.config.profiles import load_profile, proxy_client
    from gateway.policy.bundle import load_bundle
    from gateway.policy.engines import build_engine, load_live_bundle

    try:
        settings = load_config(resolve_config_path(args.config))
        cfg = settings.config
        profile = load_profile(cfg.profile, settings.base_dir, resource=cfg.resource, public_url=cfg.public_url)
        client = proxy_client(profile, settings.path.name) if cfg.authorization_server.mode == "proxy" else None
        bundle = load_live_bundle(settings)
        build_engine(settings, bundle)
    except (ConfigError, PolicyError) as exc:
        return _fail(str(exc))
    print(f"config ok: {settings.path}")
    print(f"profile ok: {profile.name} (issuer {profile.issuer}, mode {profile.mode.value})")
    if client is not None:
        print(f"authorization server: proxy (signs users in at the IdP as client {client.client_id})")
    if cfg.vault.enabled:
        problem = _vault_problem(settings, profile)
        if problem is not None:
            return _fail(problem)
        print(f"vault ok: store {cfg.vault.store}, keys {', '.join(_vault_keys(settings))}")
    print(f"policy ok: {settings.bundle_dir} compiles, revision {bundle.revision}, entrypoint {cfg.policy.entrypoint}")
    report = run_tests_isolated(bundle)
    print_report(report)
    agrees = _opa_agrees(report, settings.bundle_dir, settings.data_files)
    code = report.exit_code or agrees
    if settings.shadow_dir is not None:
        try:
            shadow = load_bundle(settings.shadow_dir, settings.data_files)
            problem = test_problem(run_tests_isolated(shadow))
        except (ConfigError, PolicyError) as exc:
            shadow, problem = None, str(exc)
        if problem is None and shadow is not None:
            print(f"shadow ok: {settings.shadow_dir} compiles, revision {shadow.revision}")
        else:
            print(f"shadow: {settings.shadow_dir}: {problem}")
            code = code or 1
    return code


def _vault_keys(settings: Settings) -> tuple[str, ...]:
    from gateway.vault.crypto import Keyring

    return Keyring.from_config(settings.config.vault, settings.base_dir, settings.path.name).key_ids


def _vault_problem(settings: Settings, profile: Profile) -> str | None:
    """What stops the vault from serving: its keys, the profile, grants no key opens."""
    import asyncio

    from gateway.mcp.jsonrpc import Refusal
    from gateway.vault.admin import vault_admin

    if not profile.vault.offline_access:
        return (f"{settings.path.name}: vault.enabled: profile {profile.name} does not keep refresh tokens "
                "(set vault.offline_access: true in the profile)")

    async def unreadable() -> int:
        async with vault_admin(settings) as admin:
            return len(await admin.unreadable())

    try:
        bad = asyncio.run(unreadable())
    except ConfigError as exc:
        return str(exc)
    except Refusal as exc:  # Redis down is not configuration: said, not refused (as for the other stores)
        print(f"vault: the store cannot be read now ({exc.message}); its grants were not checked against the keys")
        return None
    if bad:
        return f"{settings.path.name}: vault.keys: {bad} grant(s) are sealed under keys no longer configured"
    return None


def cmd_vault(args: argparse.Namespace) -> int:
    """list | revoke | rotate-key | new-key: the operator's hands on the token vault."""
    import asyncio
    import json

    from gateway.mcp.jsonrpc import Refusal
    from gateway.vault.admin import vault_admin
    from gateway.vault.crypto import new_key_entry

    if args.vault_command == "new-key":
        try:
            print(new_key_entry(args.kid))
        except ValueError as exc:
            return _fail(f"--kid: {exc}")
        return 0
    if args.vault_command == "revoke" and not (args.subject or args.grant or args.all):
        return _fail("vault revoke: name --subject, --grant, or --all")

    async def run() -> int:
        settings = load_config(resolve_config_path(args.config))
        async with vault_admin(settings) as admin:
            if args.vault_command == "list":
                grants = await admin.list()
                if args.json:
                    print(json.dumps(grants, indent=2))
                    return 0
                for g in grants:
                    users = ", ".join(f"{u['backend']}×{u['count']} (last {u['last_used_at']})" for u in g["used_by"]) or "-"  # type: ignore[index,union-attr]
                    print(f"{g['subject']}\t{g['id']}\tkey {g['key_id']}\tstored {g['created_at']}\trefreshed {g['refreshed_at']}"
                          f"\tscope {g['scope'] or '-'}\tused by {users}")
                print(f"{len(grants)} grant(s)")
                return 0
            if args.vault_command == "revoke":
                removed, confirmed = await admin.revoke(args.subject, args.grant)
                print(f"revoked {removed} grant(s); the IdP confirmed {confirmed} refresh token revocation(s)")
                return 0 if removed else 1
            done, current, problems = await admin.rotate()
            print(f"re-encrypted {done} grant(s) under key {admin.keyring.current}; {current} already were")
            for problem in problems:
                print(f"not rotated: {problem}")
            return 1 if problems else 0

    try:
        return asyncio.run(run())
    except (ConfigError, PolicyError) as exc:
        return _fail(str(exc))
    except Refusal as exc:
        return _fail(exc.message)


def _opa_agrees(report: TestReport, path: Path, data_files: tuple[Path, ...] = ()) -> int:
    """Where a real OPA is at hand, it judges the tests too: 0 it agrees (or is absent), 1 not."""
    from gateway.policy.regotest import opa_disagreements

    disagreements = opa_disagreements(report, path, data_files)
    if disagreements is None:
        return 0
    for line in disagreements:
        print(f"DISAGREE: {line}")
    print("opa test: agrees" if not disagreements else f"opa test: {len(disagreements)} disagreement(s)")
    return 1 if disagreements else 0


def cmd_policy_test(args: argparse.Namespace) -> int:
    from gateway.config.bundled import bundled_dir
    from gateway.policy.bundle import load_bundle

    path = Path(args.path) if args.path else bundled_dir("policies")
    data_files = tuple(Path(d) for d in args.data)
    try:
        bundle = load_bundle(path, data_files)
    except (ConfigError, PolicyError) as exc:
        return _fail(str(exc))
    report = run_tests_isolated(bundle)
    print_report(report, verbose=args.verbose)
    agrees = _opa_agrees(report, path, data_files)  # also where the embedded engine failed: what does OPA say?
    if args.coverage:
        from gateway.policy.regotest import opa_coverage

        try:
            print(opa_coverage(path, data_files))
        except PolicyError as exc:
            return _fail(str(exc))
    return report.exit_code or agrees


def cmd_policy_replay(args: argparse.Namespace) -> int:
    from gateway.ops.replay import replay_sync
    from gateway.policy.bundle import load_bundle
    from gateway.policy.engines import standalone_engine

    try:
        bundle = load_bundle(Path(args.bundle), tuple(Path(d) for d in args.data))
        engine = standalone_engine(bundle, args.entrypoint)
        report = replay_sync(Path(args.log), engine)
    except (ConfigError, PolicyError, OSError) as exc:
        return _fail(str(exc))
    print(report.render(bundle))
    if report.changed and not args.allow_changes:
        return 3
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from gateway.explain import explain, explain_logged, logged_entry, mcp_body

    try:
        settings = load_config(resolve_config_path(args.config))
        if args.decision_id or args.input:
            if args.decision_id and not args.log:
                raise ValueError("--decision-id needs --log FILE (the decision log)")
            entry = logged_entry(Path(args.log), args.decision_id) if args.decision_id else {
                "input": json.loads(Path(args.input).read_text())}
            text, code = asyncio.run(explain_logged(settings, entry))
        else:
            body = mcp_body(args.request, args.tool, args.args)
            text, code = asyncio.run(explain(settings, raw_token=args.token, claims_file=args.claims, body=body))
    except (ConfigError, PolicyError, ValueError, OSError, json.JSONDecodeError) as exc:
        return _fail(str(exc))
    print(text)
    return code


def cmd_dev(args: argparse.Namespace) -> int:
    from gateway.dev.demo import run_dev

    _setup_logging("warning")
    return run_dev(host=args.host, port=args.port, user=args.user)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcp-authz-gateway", description="Policy-driven authorization gateway for MCP servers.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="gateway.yaml (default: $GATEWAY_CONFIG)")
    serve.add_argument("--host", help="override listen.host")
    serve.add_argument("--port", type=int, help="override listen.port")
    serve.add_argument("--workers", type=int, help="override workers: gateway processes sharing the port")
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one of several, started by `serve`
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check", help="validate config and profile, compile the policy, run its Rego tests")
    check.add_argument("--config", help="gateway.yaml (default: $GATEWAY_CONFIG)")
    check.set_defaults(func=cmd_check)

    explain = sub.add_parser("explain", help="show the policy input, decision and what the gateway would do (nothing forwarded)")
    explain.add_argument("--config", help="gateway.yaml (default: $GATEWAY_CONFIG)")
    who = explain.add_mutually_exclusive_group(required=True)
    who.add_argument("--token", help="a bearer token (verified as the gateway would; shown redacted)")
    who.add_argument("--claims", help="a JSON file of claims, taken as verified")
    who.add_argument("--decision-id", help="a logged decision (with --log): its input decided again with this bundle")
    who.add_argument("--input", help="a policy input (JSON file) decided with this bundle")
    explain.add_argument("--log", help="the decision log holding --decision-id")
    explain.add_argument("--request", help="the JSON-RPC request, or @FILE")
    explain.add_argument("--tool", help="shorthand for a tools/call of this tool")
    explain.add_argument("--args", help="the tool's arguments as JSON (with --tool)")
    explain.set_defaults(func=cmd_explain)

    dev = sub.add_parser("dev", help="demo: a notes MCP server, a dev issuer and the gateway, one command")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8080, help="the gateway's port")
    dev.add_argument("--user", default="alice", help="the demo user the dev issuer signs in (default: alice)")
    dev.set_defaults(func=cmd_dev)

    policy = sub.add_parser("policy", help="policy tools")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    ptest = policy_sub.add_parser("test", help="run a bundle's Rego test_* rules with the embedded engine")
    ptest.add_argument("path", nargs="?", help="bundle directory (default: the shipped policies)")
    ptest.add_argument("-v", "--verbose", action="store_true", help="also list passing tests")
    ptest.add_argument("--data", action="append", default=[], help="data files to test with, as policy.data (repeatable)")
    ptest.add_argument("--coverage", action="store_true", help="also the lines the tests reach (needs a real OPA)")
    ptest.set_defaults(func=cmd_policy_test)
    preplay = policy_sub.add_parser("replay", help="decide a decision log's inputs again with a candidate bundle; report what changes")
    preplay.add_argument("--log", required=True, help="a decision log (decision_log: FILE), JSON lines")
    preplay.add_argument("--bundle", required=True, help="the candidate bundle directory")
    preplay.add_argument("--data", action="append", default=[], help="extra data files, as policy.data (repeatable)")
    preplay.add_argument("--entrypoint", default="mcp/gateway/decision")
    preplay.add_argument("--allow-changes", action="store_true", help="exit 0 even when decisions change (default: 3)")
    preplay.set_defaults(func=cmd_policy_replay)
    vault = sub.add_parser("vault", help="the token vault: list, revoke, rotate-key, new-key")
    vault_sub = vault.add_subparsers(dest="vault_command", required=True)
    vlist = vault_sub.add_parser("list", help="every stored grant: user, key id, dates, scope, which backends used it (never a token)")
    vlist.add_argument("--json", action="store_true")
    vrevoke = vault_sub.add_parser("revoke", help="remove grants and revoke their refresh tokens at the IdP")
    vrevoke.add_argument("--subject", help="every grant of this user (the token's sub)")
    vrevoke.add_argument("--grant", help="this grant id")
    vrevoke.add_argument("--all", action="store_true", help="every grant")
    vault_sub.add_parser("rotate-key", help="re-encrypt every grant under the first key of vault.keys_env/keys_file")
    vnew = vault_sub.add_parser("new-key", help="print a new key entry (kid=base64) to put first in the keys")
    vnew.add_argument("--kid", required=True, help="the new key's id")
    for command in (vlist, vrevoke, vault_sub.choices["rotate-key"]):
        command.add_argument("--config", help="gateway.yaml (default: $GATEWAY_CONFIG)")
    vault.set_defaults(func=cmd_vault)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
