"""The Gateway assembly: everything one running gateway needs, built once from the config.

Expensive parts (compiled policy, HTTP clients, JWKS, verifiers, exchanger) are built here
at start-up and again on reload; a reload hands over what must outlive it (the upstream
pool, the decision log, metrics and sessions). The request path only reads from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from urllib.parse import urlsplit

import httpx

from gateway.auth.exchange import TokenExchanger
from gateway.auth.idp import IssuerMetadata
from gateway.auth.introspection import IntrospectionVerifier
from gateway.auth.metadata import metadata_url
from gateway.auth.tokens import (
    JwksCache,
    JwtVerifier,
    ProfileVerifier,
    TokenVerifier,
    VerifiedTokenCache,
)
from gateway.config.profiles import Profile, load_profile, proxy_client
from gateway.config.settings import ConfigError, Settings
from gateway.mcp.sessions import InFlight, SessionBinding, build_session_store
from gateway.mcp.upstream import UpstreamClient
from gateway.oauth.server import CALLBACK_PATH, AuthorizationServer, OAuthState
from gateway.oauth.signin import IdpSignIn
from gateway.ops.audit import DecisionLog
from gateway.ops.metrics import Metrics
from gateway.ops.tracing import Tracing
from gateway.policy.bundle import Bundle, DeclaredScopes, load_bundle
from gateway.policy.cache import CachingEngine, uncached
from gateway.policy.decision import PolicyEngine, PolicyError
from gateway.policy.engines import (
    build_engine,
    build_local_engine,
    load_live_bundle,
    with_decision_cache,
)
from gateway.policy.regotest import TestReport, run_tests_isolated
from gateway.state.concurrency import IdentityLimits
from gateway.state.quotas import MemoryQuotas, Quotas, RedisQuotas
from gateway.vault.broker import Broker
from gateway.vault.keeper import Vault, VaultState

log = logging.getLogger(__name__)


@dataclass
class Gateway:
    """Everything one running gateway needs, built once at start-up."""

    settings: Settings
    profile: Profile
    engine: PolicyEngine
    verifier: TokenVerifier
    jwks: JwksCache | None
    exchanger: TokenExchanger | None
    idp_http: httpx.AsyncClient
    upstream: UpstreamClient
    metadata_url: str
    decisions: DecisionLog
    verified_cache: VerifiedTokenCache
    metrics: Metrics
    sessions: SessionBinding
    scopes: DeclaredScopes
    shadow: PolicyEngine | None = None
    #: the clients' authorization server (authorization_server.mode: proxy), else None
    oauth: AuthorizationServer | None = None
    #: request ids in flight per session (shared with a reloaded successor)
    inflight: InFlight = field(default_factory=InFlight)
    #: requests and streams each identity holds now (shared with a reloaded successor)
    identity_limits: IdentityLimits = field(default_factory=lambda: IdentityLimits(64, 16))
    #: OpenTelemetry, from the OTEL_* variables; a no-op unless they ask for it
    tracing: Tracing = field(default_factory=Tracing)
    #: the counters of the policy's rate limits (shared with a reloaded successor)
    quotas: Quotas = field(default_factory=lambda: Quotas(MemoryQuotas()))
    #: the revision of the snapshot serving (and of the shadow's): logs, metrics, /readyz
    revision: str = ""
    shadow_revision: str | None = None
    #: the token vault (vault.enabled) and its HTTP side (POST /vault/token, /vault/grants)
    vault: Vault | None = None
    vault_broker: Broker | None = None

    def serve_metrics(self) -> None:
        """Point the shared metrics at this gateway: called once it serves (start-up, or a
        reload's swap), so /metrics never reports a candidate that was refused."""
        self.metrics.cache_sources = self._cache_counts
        self.metrics.open_streams = lambda: self.upstream.open_streams
        self.metrics.policy_info = lambda: {"revision": self.serving_revision, "shadow_revision": self.shadow_revision or "",
                                            "engine": self.engine_report["name"]}

    def _cache_counts(self) -> dict[str, tuple[int, int]]:
        counts = {"verified_tokens": (self.verified_cache.hits, self.verified_cache.misses)}
        if self.exchanger is not None:
            counts["exchanged_tokens"] = (self.exchanger.hits, self.exchanger.requests)
        if isinstance(self.engine, CachingEngine):
            counts["decisions"] = (self.engine.hits, self.engine.misses)
        return counts

    @classmethod
    def build(cls, settings: Settings, previous: Gateway | None = None, bundle: Bundle | None = None) -> Gateway:
        """Everything from the config; on reload, `previous` lends its upstream pool, log and
        metrics. `bundle`: the snapshot that was vetted (`vetted_snapshot`), served as it is."""
        cfg = settings.config
        profile = load_profile(cfg.profile, settings.base_dir, resource=cfg.resource, public_url=cfg.public_url)
        bundle = bundle if bundle is not None else load_live_bundle(settings)
        engine = with_decision_cache(build_engine(settings, bundle), settings, bundle)
        metrics = previous.metrics if previous else Metrics()
        shadow, shadow_revision = shadow_engine(settings, metrics)
        authz = bundle.data.get("authz")
        if isinstance(authz, dict) and authz.get("limits") and cfg.workers > 1 and cfg.rate_limits.store != "redis":
            raise ConfigError(f"{settings.path.name}: rate_limits.store: the policy data declares rate limits and {cfg.workers} "
                              "workers run: their counters must be shared (rate_limits: {store: redis, url: ...})")
        idp_http = httpx.AsyncClient(timeout=httpx.Timeout(5.0), follow_redirects=False, trust_env=False)
        issuer = IssuerMetadata(profile, idp_http)
        verified = VerifiedTokenCache(cfg.caches.verified_tokens)
        jwks = jwt_verifier = opaque_verifier = exchanger = None
        if "jwt" in profile.token_kinds:
            jwks = JwksCache(
                profile, idp_http, issuer, refetch_interval=cfg.caches.jwks_refetch_interval, max_age=cfg.caches.jwks_max_age
            )
            jwt_verifier = JwtVerifier(profile, jwks, verified)
        if "opaque" in profile.token_kinds:
            opaque_verifier = IntrospectionVerifier(profile, issuer, idp_http, verified,
                                                    per_address_per_minute=cfg.caches.introspections_per_address_per_minute)
        if profile.exchange is not None:
            exchanger = TokenExchanger(
                profile.exchange,
                issuer,
                idp_http,
                max_entries=cfg.caches.exchanged_tokens,
                safety_margin=profile.exchange.safety_margin,
                failure_ttl=profile.exchange.failure_ttl,
            )
        verifier = ProfileVerifier(profile, jwt_verifier, opaque_verifier)
        declared = DeclaredScopes.from_data(bundle.data)
        oauth = None
        if cfg.authorization_server.mode == "proxy":
            client = proxy_client(profile, settings.path.name)
            signin = IdpSignIn(profile, client, issuer, idp_http, callback_url=cfg.public_url + CALLBACK_PATH,
                               resource=cfg.resource, timeout=cfg.authorization_server.idp_timeout)
            oauth = AuthorizationServer(
                config=cfg.authorization_server, public_url=cfg.public_url, resource=cfg.resource, profile=profile,
                verifier=verifier, signin=signin,
                state=previous.oauth.state if previous and previous.oauth else OAuthState(cfg.authorization_server),
                known_scopes=advertised_scopes(profile, declared), initial_scopes=declared.initial,
            )
        decisions = previous.decisions if previous else DecisionLog(cfg.decision_log, max_line_bytes=cfg.decision_log_max_line_bytes)
        vault = broker = None
        if cfg.vault.enabled:
            if not profile.vault.offline_access:
                raise ConfigError(f"{settings.path.name}: vault.enabled: profile {profile.name} does not keep refresh tokens "
                                  "(set vault.offline_access: true in the profile)")
            assert oauth is not None  # the config model requires proxy mode
            vault_state = previous.vault.state if previous and previous.vault else VaultState(cfg.vault, settings.base_dir, settings.path.name)
            vault = Vault(vault_state, profile=profile, signin=signin, verifier=verifier, exchanger=exchanger, metrics=metrics)
            oauth.keeper = vault
            broker = Broker(vault, cfg.vault, profile=profile, engine=uncached(engine),
                            verifier=verifier, decisions=decisions, revision=bundle.revision, metrics=metrics,
                            shadow=shadow, shadow_revision=shadow_revision)
        elif profile.mode.value == "delegate":
            raise ConfigError(f"{settings.path.name}: vault.enabled: profile {profile.name} is in mode delegate, which "
                              "forwards tokens from the vault: enable it (vault: {enabled: true, ...})")
        return cls(
            settings=settings,
            profile=profile,
            engine=engine,
            verifier=verifier,
            jwks=jwks,
            exchanger=exchanger,
            idp_http=idp_http,
            upstream=previous.upstream if previous else UpstreamClient(cfg.upstream),
            metadata_url=metadata_url(cfg.public_url, cfg.mcp_path),
            decisions=decisions,
            verified_cache=verified,
            metrics=metrics,
            sessions=previous.sessions if previous else SessionBinding(build_session_store(cfg.sessions)),
            scopes=declared,
            shadow=shadow,
            oauth=oauth,
            inflight=previous.inflight if previous else InFlight(),
            identity_limits=previous.identity_limits if previous else IdentityLimits(
                cfg.limits.max_requests_per_identity, cfg.limits.max_streams_per_identity),
            tracing=previous.tracing if previous else Tracing(),
            quotas=previous.quotas if previous else Quotas(
                RedisQuotas(cfg.rate_limits.url or "", key_prefix=cfg.rate_limits.key_prefix, timeout=cfg.rate_limits.timeout)
                if cfg.rate_limits.store == "redis" else MemoryQuotas(cfg.rate_limits.max_entries)),
            revision=bundle.revision,
            shadow_revision=shadow_revision,
            vault=vault,
            vault_broker=broker,
        )

    @property
    def scopes_supported(self) -> tuple[str, ...]:
        """RFC 9728 `scopes_supported`: the profile's, then every scope the policy data names."""
        return advertised_scopes(self.profile, self.scopes)

    @cached_property
    def own_origin(self) -> str:
        """The gateway's own origin (scheme://host[:port] of public_url): always allowed."""
        parts = urlsplit(self.settings.config.public_url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def deciding_engine(self) -> PolicyEngine:
        """The engine itself, under the decision cache if there is one."""
        return uncached(self.engine)

    @property
    def serving_revision(self) -> str:
        """The revision that decides: the snapshot this gateway built, or, with a remote OPA,
        what OPA says it decided with (the files beside the gateway may not be what OPA loaded)."""
        return getattr(self.deciding_engine, "revision", None) or self.revision

    @property
    def engine_report(self) -> dict[str, str]:
        """Which engine decides, and where its module came from or why it stands in (/readyz)."""
        engine = self.deciding_engine
        report = {"name": engine.name}
        for attribute, key in (("source", "source"), ("fallback_reason", "fallback")):
            if getattr(engine, attribute, None):
                report[key] = getattr(engine, attribute)
        return report

    @property
    def authorization_servers(self) -> tuple[str, ...]:
        """What the protected-resource metadata names: the gateway itself in proxy mode."""
        return (self.settings.config.public_url,) if self.oauth is not None else (self.profile.issuer,)

    async def start(self) -> None:
        if self.jwks is not None and not await self.jwks.refresh(force=True):
            log.warning("the issuer's keys could not be loaded; /readyz stays 503 until they are")
        await self.engine.start()
        if self.vault is not None:
            await self.vault.count()

    @property
    def keys_ready(self) -> bool:
        return self.jwks is None or self.jwks.loaded

    async def aclose(self, *, shared: bool = True) -> None:
        """Close what this gateway owns; `shared=False` keeps what a reloaded successor reuses."""
        await self.engine.aclose()
        await self.idp_http.aclose()
        if shared:
            self.decisions.close()
            await self.upstream.aclose()
            await self.sessions.store.aclose()
            await self.quotas.store.aclose()
            self.tracing.shutdown()
            if self.oauth is not None:
                await self.oauth.state.store.aclose()
            if self.vault is not None:
                await self.vault.store.aclose()


def advertised_scopes(profile: Profile, declared: DeclaredScopes) -> tuple[str, ...]:
    """The profile's scopes, then every scope the policy data names; never `offline_access`
    (a resource does not ask for it: the MCP authorization spec's SHOULD NOT)."""
    return tuple(s for s in dict.fromkeys((*profile.scopes_supported, *declared.supported)) if s != "offline_access")


def test_problem(report: TestReport) -> str | None:
    if report.error:
        return report.error
    if report.failed:
        names = ", ".join(r.rule for r in report.failed[:5])
        return f"{len(report.failed)} of its {len(report.results)} Rego test(s) fail: {names}"
    return None


def vetted_snapshot(settings: Settings) -> tuple[Bundle, TestReport]:
    """The live bundle read once, and its own Rego tests run on that very snapshot (isolated,
    remembered by content hash). Start-up and reload apply the same rule: a bundle that does
    not compile is refused; one whose tests fail is refused, or with
    `policy.on_test_failure: warn` served with an error in the log. Raises PolicyError."""
    bundle = load_live_bundle(settings)
    report = run_tests_isolated(bundle)
    problem = test_problem(report)
    if problem is not None:
        where = f"live bundle {settings.bundle_dir} (revision {bundle.revision})"
        if report.error or settings.config.policy.on_test_failure == "refuse":
            raise PolicyError(f"{where}: {problem}")
        log.error("%s: %s; SERVED ANYWAY (policy.on_test_failure: warn)", where, problem)
    return bundle, report


def shadow_engine(settings: Settings, metrics: Metrics) -> tuple[PolicyEngine | None, str | None]:
    """The shadow bundle's engine and revision, or (None, None). Never fatal to live traffic:
    a shadow that does not load, crashes the engine or does not compile (checked in a child
    process first) is logged, counted (`mcp_gateway_reloads{result="shadow_refused"}`) and
    left out; failing tests only warn (a shadow is a candidate under observation)."""
    if settings.shadow_dir is None:
        return None, None
    where = f"shadow bundle {settings.shadow_dir}"
    try:
        snapshot = load_bundle(settings.shadow_dir, settings.data_files)
        where += f" (revision {snapshot.revision})"
        report = run_tests_isolated(snapshot)
        if report.error:
            raise PolicyError(report.error)
        if report.failed:
            log.warning("%s: %s; shadowed anyway", where, test_problem(report))
        return build_local_engine(settings, snapshot), snapshot.revision
    except Exception as exc:  # noqa: BLE001 - whatever it is, the live policy goes on
        metrics.reloads.labels("shadow_refused").inc()
        log.error("%s refused, no shadow decisions until it is fixed (the live policy is unaffected): %s", where, exc)
        return None, None
