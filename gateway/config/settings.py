"""gateway.yaml → typed, validated settings.

Errors name the file and the key (`gateway.yaml: upstream.timeout: ...`); relative paths
in the file are resolved against the file's own directory, so a config works from any
working directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import pydantic

from gateway.config.bundled import bundled_dir
from gateway.config.yamlfile import ConfigError, Strict, load_yaml, validate

CONFIG_ENV = "GATEWAY_CONFIG"


class Listen(Strict):
    host: str = "127.0.0.1"
    port: int = pydantic.Field(8080, ge=0, le=65535)
    #: what an unauthenticated client can hold: the request head's size and header count,
    #: seconds to send the head and the body, connections per client address
    max_header_bytes: int = pydantic.Field(32_768, ge=1_024)
    max_headers: int = pydantic.Field(100, ge=10)
    header_timeout: float = pydantic.Field(10.0, gt=0)
    body_timeout: float = pydantic.Field(30.0, gt=0)
    max_connections_per_address: int = pydantic.Field(128, ge=1)


class Upstream(Strict):
    url: str
    #: seconds: connecting, and the longest silence while waiting for a POST's answer
    timeout: float = pydantic.Field(30.0, gt=0)
    connect_timeout: float = pydantic.Field(5.0, gt=0)
    #: request headers forwarded beyond the built-in MCP allow-list (lower-case names)
    forward_headers: tuple[str, ...] = ()
    #: response headers relayed to the client beyond the built-in allow-list (content-type,
    #: mcp-session-id, mcp-protocol-version, cache-control, retry-after, vary, etag, last-modified)
    relay_headers: tuple[str, ...] = ()
    max_connections: int = pydantic.Field(100, ge=1)
    #: seconds an idle pooled connection is kept; must stay below the upstream server's own
    #: idle timeout (uvicorn: 5 s), or a request may go out on a connection it is closing
    keepalive_expiry: float = pydantic.Field(2.0, ge=0)

    @pydantic.field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http:// or https:// URL")
        return v

    @pydantic.field_validator("forward_headers", "relay_headers")
    @classmethod
    def _lower(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(h.lower() for h in v)


class DecisionCacheConfig(Strict):
    #: auto: on when the policy declares itself pure (`decision_cache := {"pure": true, ...}`)
    enabled: Literal["auto"] | bool = "auto"
    size: int = pydantic.Field(10_000, ge=1)


class PolicyConfig(Strict):
    #: embedded: WebAssembly in-process when a module can be had, else regopy (said at start-up);
    #: wasm / regopy: that one or nothing; opa: a running OPA server (opa_url)
    engine: Literal["embedded", "wasm", "regopy", "opa"] = "embedded"
    #: directory of .rego files plus data files; empty means the shipped policies/
    bundle: str = ""
    entrypoint: str = "mcp/gateway/decision"
    #: the OPA server (engine: opa), e.g. http://127.0.0.1:8181
    opa_url: str | None = None
    #: seconds a decision may take before the request is refused (503), any engine
    timeout: float = pydantic.Field(1.0, gt=0)
    #: WebAssembly: threads evaluating inputs too large to evaluate on the event loop
    workers: int = pydantic.Field(2, ge=1, le=64)
    #: WebAssembly: inputs up to this many bytes of JSON are evaluated inline (cheaper than
    #: a thread hop), under a one-tick deadline after which they move to the pool
    inline_max_bytes: int = pydantic.Field(4_096, ge=0)
    #: a second bundle evaluated beside the live one (embedded engine); disagreements are
    #: logged and counted, never acted on
    shadow: str | None = None
    #: extra data files (JSON/YAML) merged at the root of the bundle's data, as
    #: `opa run BUNDLE FILE` does: the per-tool rules (data.authz) live in one
    data: tuple[str, ...] = ()
    decision_cache: DecisionCacheConfig = DecisionCacheConfig()
    #: a bundle whose own Rego tests fail, at start-up and at reload: refuse it (start-up
    #: stops, a reload keeps the running policy), or warn loudly and serve it
    on_test_failure: Literal["refuse", "warn"] = "refuse"


class Limits(Strict):
    max_body_bytes: int = pydantic.Field(262_144, ge=1)
    max_json_depth: int = pydantic.Field(64, ge=2)
    #: the policy input's budget (JSON bytes, values): a larger request is refused (413)
    #: before any engine sees it, so no request can make a decision expensive
    max_policy_input_bytes: int = pydantic.Field(65_536, ge=1_024)
    max_policy_input_elements: int = pydantic.Field(2_000, ge=50)
    #: what one identity (issuer + subject, or client) may hold at once in this process:
    #: requests in progress, and open streams (GET); beyond them, 429 with Retry-After
    max_requests_per_identity: int = pydantic.Field(64, ge=1)
    max_streams_per_identity: int = pydantic.Field(16, ge=1)


class Caches(Strict):
    verified_tokens: int = pydantic.Field(10_000, ge=0)
    exchanged_tokens: int = pydantic.Field(10_000, ge=0)
    #: a token whose `kid` is unknown triggers at most one JWKS refetch per this many seconds
    jwks_refetch_interval: float = pydantic.Field(10.0, ge=0)
    jwks_max_age: float = pydantic.Field(3600.0, gt=0)
    #: opaque tokens this gateway has not seen checked at the IdP, per client address per
    #: minute (each random string would cost the IdP a call); more are refused 429
    introspections_per_address_per_minute: int = pydantic.Field(60, ge=1)


class StoreConfig(Strict):
    """A store of shared state: this process (memory), or Redis, shared by every worker and
    replica pointing at `url`."""

    store: Literal["memory", "redis"] = "memory"
    url: str | None = None
    key_prefix: str = "mcp-gateway:"
    #: seconds a Redis command may take before the request is refused (503)
    timeout: float = pydantic.Field(1.0, gt=0)
    #: the memory store's bound
    max_entries: int = pydantic.Field(100_000, ge=1)

    @pydantic.model_validator(mode="after")
    def _redis_needs_url(self) -> StoreConfig:
        if self.store == "redis" and not self.url:
            raise ValueError("store: redis needs url (redis://host:port/db)")
        return self


class Sessions(StoreConfig):
    """Where `Mcp-Session-Id` → (iss, sub) bindings live (gateway/mcp/sessions.py)."""

    key_prefix: str = "mcp-gateway:session:"
    #: seconds a binding lives after its last use
    ttl: float = pydantic.Field(86_400.0, gt=0)


class RateLimits(StoreConfig):
    """Where the counters of the policy's rate limits (data.authz.limits) live."""

    key_prefix: str = "mcp-gateway:quota:"


class OAuthStore(StoreConfig):
    """Where the authorization server keeps registrations, pending sign-ins, codes and refresh handles."""

    key_prefix: str = "mcp-gateway:oauth:"


class Registration(Strict):
    """RFC 7591 dynamic client registration at the gateway."""

    enabled: bool = True
    #: the largest registration request accepted (bytes)
    max_bytes: int = pydantic.Field(16_384, ge=256, le=1_048_576)
    #: registrations per client address per minute (a burst of this many, then refilled)
    per_address_per_minute: int = pydantic.Field(10, ge=1)
    #: seconds a registration is kept after it was made
    ttl: float = pydantic.Field(90 * 86_400.0, gt=0)


class ClientMetadataDocuments(Strict):
    """Client ID Metadata Documents: a client_id that is an https URL is fetched."""

    enabled: bool = True
    timeout: float = pydantic.Field(5.0, gt=0, le=30)
    max_bytes: int = pydantic.Field(16_384, ge=256, le=1_048_576)
    #: a document's Cache-Control max-age is honoured up to this many seconds
    max_cache_seconds: float = pydantic.Field(86_400.0, ge=0)
    #: how long a document without caching headers is kept
    default_cache_seconds: float = pydantic.Field(300.0, ge=0)
    #: fetch from private, loopback and link-local addresses (tests and labs only)
    allow_private_addresses: bool = False
    #: accept http:// document URLs (tests and labs only; the spec requires https)
    allow_http: bool = False


class AuthorizationServer(Strict):
    """direct: the metadata names the IdP and clients sign in there. proxy: the gateway is
    the clients' authorization server and signs users in at the IdP with its own client."""

    mode: Literal["direct", "proxy"] = "direct"
    store: OAuthStore = OAuthStore()
    registration: Registration = Registration()
    client_metadata_documents: ClientMetadataDocuments = ClientMetadataDocuments()
    #: seconds a user may take at the IdP's sign-in page
    sign_in_ttl: float = pydantic.Field(600.0, gt=0)
    #: seconds the gateway's one-time code is valid (RFC 6749 recommends at most 10 minutes)
    code_ttl: float = pydantic.Field(60.0, gt=0, le=600)
    #: seconds a refresh handle lives without being used
    refresh_ttl: float = pydantic.Field(30 * 86_400.0, gt=0)
    #: authorization requests per client address per minute
    authorize_per_address_per_minute: int = pydantic.Field(60, ge=1)
    #: the IdP's answers to the gateway's own calls (code, refresh, revocation) may take this long
    idp_timeout: float = pydantic.Field(10.0, gt=0)


class VaultBackend(Strict):
    """A backend (the upstream MCP server, its workers) allowed to call `POST /vault/token`:
    its credentials only. What it may ask for is the policy's (`data.authz.vault`)."""

    client_secret: str = pydantic.Field(repr=False, min_length=16)
    method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"


class Vault(Strict):
    """The token vault (gateway/vault): users' IdP refresh tokens, encrypted at rest, released
    to registered backends as access tokens when the policy allows (docs/vault.md)."""

    enabled: bool = False
    store: Literal["sqlite", "redis"] = "sqlite"
    #: the SQLite file (store: sqlite); relative to gateway.yaml
    path: str = "vault.db"
    #: the Redis server (store: redis), shared by replicas
    url: str | None = None
    key_prefix: str = "mcp-gateway:vault:"
    #: seconds a store operation may take before the caller gets a 503
    timeout: float = pydantic.Field(2.0, gt=0)
    #: the encryption keys, `kid=<base64 of 32 bytes>` separated by commas, spaces or lines,
    #: the first one encrypting: from this environment variable, or from this file
    keys_env: str | None = None
    keys_file: str | None = None
    #: grants kept per user (one per signed-in client); the oldest is revoked beyond this
    max_grants_per_user: int = pydantic.Field(5, ge=1, le=100)
    #: a released access token is reused until this many seconds before it expires
    token_margin: float = pydantic.Field(30.0, ge=0)
    #: released access tokens kept in memory (never on disk)
    max_cached_tokens: int = pydantic.Field(10_000, ge=0)
    #: delegate mode: a cached token's grant is confirmed in the store at most this often (a
    #: revocation through another process reaches delegated requests within it; backends: at once)
    delegate_recheck_seconds: float = pydantic.Field(1.0, ge=0)
    #: seconds a release waits for another release of the same user (the per-user lock)
    lock_timeout: float = pydantic.Field(10.0, gt=0)
    #: failed backend authentications per client address per minute before its requests get 429
    failed_auth_per_address_per_minute: int = pydantic.Field(20, ge=1)
    #: reasons a backend may give are at most this long
    max_reason_chars: int = pydantic.Field(200, ge=8, le=2_000)
    backends: dict[str, VaultBackend] = {}

    @pydantic.field_validator("backends")
    @classmethod
    def _backend_ids(cls, v: dict[str, VaultBackend]) -> dict[str, VaultBackend]:
        for name in v:
            if not name or len(name) > 128 or not all(c.isalnum() or c in "._-" for c in name):
                raise ValueError(f"backend id {name[:40]!r}: letters, digits, '.', '_' and '-' only (at most 128)")
        return v

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> Vault:
        if not self.enabled:
            return self
        if self.store == "redis" and not self.url:
            raise ValueError("store: redis needs url (redis://host:port/db)")
        if bool(self.keys_env) == bool(self.keys_file):
            raise ValueError("keys_env or keys_file (exactly one) must name the encryption keys")
        return self


class Reload(Strict):
    #: watch the policy bundle (and shadow) and the profile file; SIGHUP reloads too
    watch: bool = True
    interval: float = pydantic.Field(1.0, gt=0)


class GatewayConfig(Strict):
    public_url: str
    mcp_path: str = "/mcp"
    listen: Listen = Listen()
    upstream: Upstream
    profile: str
    policy: PolicyConfig = PolicyConfig()
    #: browser Origins allowed to call; requests without an Origin header are always fine
    allowed_origins: tuple[str, ...] = ()
    limits: Limits = Limits()
    caches: Caches = Caches()
    reload: Reload = Reload()
    sessions: Sessions = Sessions()
    rate_limits: RateLimits = RateLimits()
    authorization_server: AuthorizationServer = AuthorizationServer()
    vault: Vault = Vault()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: uvicorn's one line per HTTP request (the decision log already has one per MCP request)
    access_log: bool = True
    #: one JSON line per decision: "-" stdout, a file path (appended), "" off
    decision_log: str = "-"
    #: a longer line drops the client's arguments from its input and says so
    decision_log_max_line_bytes: int = pydantic.Field(16_384, ge=1_024)
    #: gateway processes sharing the port (SO_REUSEPORT); more than one needs shared stores
    workers: int = pydantic.Field(1, ge=1, le=64)

    @pydantic.field_validator("public_url")
    @classmethod
    def _public_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http:// or https:// URL")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        return v.rstrip("/")

    @pydantic.field_validator("mcp_path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/") or v != v.rstrip("/") or "?" in v:
            raise ValueError("must start with / and not end with / (e.g. /mcp)")
        return v

    @pydantic.model_validator(mode="after")
    def _opa_needs_url(self) -> GatewayConfig:
        if self.policy.engine == "opa" and not self.policy.opa_url:
            raise ValueError("policy.opa_url is required when policy.engine is opa")
        return self

    @pydantic.model_validator(mode="after")
    def _workers_share_state(self) -> GatewayConfig:
        if (problem := worker_problem(self, self.workers)) is not None:
            raise ValueError(f"workers: {problem}")
        return self

    @pydantic.model_validator(mode="after")
    def _vault_needs_proxy(self) -> GatewayConfig:
        if self.vault.enabled and self.authorization_server.mode != "proxy":
            raise ValueError("vault.enabled: the vault keeps refresh tokens the gateway receives as its clients' "
                             "authorization server: set authorization_server.mode: proxy")
        return self

    @property
    def resource(self) -> str:
        """The protected resource's canonical URL (RFC 9728 `resource`, RFC 8707 audience)."""
        return self.public_url + self.mcp_path


def worker_problem(config: GatewayConfig, workers: int) -> str | None:
    """Why `workers` processes cannot serve `config` correctly, or None. Each worker is a whole
    gateway: what one worker learns (a session's owner, a sign-in in progress) must be where
    every other can read it, or a client's next request fails or, worse, is judged without it."""
    if workers <= 1:
        return None
    if config.listen.port == 0:
        return f"{workers} workers need a fixed listen.port (port 0 would give each its own)"
    if config.sessions.store != "redis":
        return f"{workers} workers need sessions.store: redis (a session opened on one worker is unknown to the others)"
    if config.authorization_server.mode == "proxy" and config.authorization_server.store.store != "redis":
        return (f"{workers} workers need authorization_server.store.store: redis (a code issued by one worker "
                "must be redeemable at another)")
    return None


class Settings(pydantic.BaseModel):
    """A loaded config plus where its relative paths point."""

    model_config = pydantic.ConfigDict(frozen=True)
    config: GatewayConfig
    path: Path
    bundle_dir: Path
    shadow_dir: Path | None = None
    data_files: tuple[Path, ...] = ()

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def resolve_config_path(cli_value: str | None) -> Path:
    value = cli_value or os.environ.get(CONFIG_ENV)
    if not value:
        raise ConfigError(f"no configuration: pass --config FILE or set {CONFIG_ENV}")
    return Path(value)


def load_config(path: Path) -> Settings:
    """Read and validate gateway.yaml; raises ConfigError with every problem found."""
    path = path.resolve()
    config = validate(GatewayConfig, load_yaml(path), path.name)
    bundle = Path(config.policy.bundle) if config.policy.bundle else bundled_dir("policies")
    if not bundle.is_absolute():
        bundle = (path.parent / bundle).resolve()
    if not bundle.is_dir():
        raise ConfigError(f"{path.name}: policy.bundle: directory {bundle} does not exist")
    shadow = None
    if config.policy.shadow:
        shadow = Path(config.policy.shadow)
        shadow = shadow if shadow.is_absolute() else (path.parent / shadow).resolve()
        if not shadow.is_dir():
            raise ConfigError(f"{path.name}: policy.shadow: directory {shadow} does not exist")
    data_files = []
    for entry in config.policy.data:
        data_file = Path(entry) if Path(entry).is_absolute() else (path.parent / entry).resolve()
        if not data_file.is_file():
            raise ConfigError(f"{path.name}: policy.data: file {data_file} does not exist")
        data_files.append(data_file)
    return Settings(config=config, path=path, bundle_dir=bundle, shadow_dir=shadow, data_files=tuple(data_files))
