"""IdP profiles: how one identity provider shapes its tokens, as data.

A profile says who the issuer is, where its keys are, which algorithms and token kinds
are allowed, which claims carry subject/client/scopes, the audience rules, and whether
the gateway passes the client's token through or exchanges it. Switching IdP is
switching this file. The audience rules are not applied here: they reach the Rego
policy as `input.profile.audience`, so the security team sees and tests them.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Any, Literal

import pydantic

from gateway.config.bundled import bundled_dir
from gateway.config.yamlfile import ConfigError, Strict, load_yaml, validate

#: never allowed, whatever a profile says: `none`, and HMAC (a public JWKS cannot key it)
FORBIDDEN_ALGORITHMS = frozenset({"none", "HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_MISSING = re.compile(r"^(reject|accept|claim:[A-Za-z0-9_.-]+)\Z")  # \Z, not $: `$` also matches before a final newline


class Mode(str, enum.Enum):
    PASSTHROUGH = "passthrough"
    EXCHANGE = "exchange"
    #: forward a token derived from the user's vault grant (gateway/vault), for IdPs without exchange
    DELEGATE = "delegate"


def _empty_to_none(v: Any) -> Any:
    return None if v == "" else v


def _as_list(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


class JwtRules(Strict):
    algorithms: tuple[str, ...] = ("RS256",)
    #: allowed `typ` header values (case-insensitive); empty allows any
    typ: tuple[str, ...] = ()
    leeway: int = pydantic.Field(30, ge=0, le=300)

    @pydantic.field_validator("algorithms")
    @classmethod
    def _asymmetric_only(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one algorithm is required")
        for alg in v:
            if alg in FORBIDDEN_ALGORITHMS:
                raise ValueError(f"{alg} is never accepted (no `none`, no HMAC with a public key)")
            if alg not in ASYMMETRIC_ALGORITHMS:
                raise ValueError(f"{alg} is not a supported signature algorithm")
        return v


class ClaimNames(Strict):
    """Claim names, each a list tried in order (Okta's `scp`/`cid`, Keycloak's `azp`...)."""

    subject: tuple[str, ...] = ("sub",)
    client: tuple[str, ...] = ("azp", "client_id")
    scope: tuple[str, ...] = ("scope", "scp")

    _lists = pydantic.field_validator("subject", "client", "scope", mode="before")(_as_list)


class AudienceRules(Strict):
    """The audience rules (docs/profiles.md) as data. Entries may use `{resource}` and `{public_url}`."""

    #: at least one audience must match one of these ("*" matches any); empty accepts any
    accept: tuple[str, ...] = ()
    #: an audience matching one of these refuses the token, before `accept` is looked at
    reject: tuple[str, ...] = ()
    #: any: one accepted audience is enough; all: every audience must be accepted
    match: Literal["any", "all"] = "any"
    #: a token without `aud`: reject, accept, or claim:NAME (use that claim as the audience)
    missing: str = "reject"

    @pydantic.field_validator("missing")
    @classmethod
    def _missing(cls, v: str) -> str:
        if not _MISSING.match(v):
            raise ValueError("must be reject, accept or claim:<claim name>")
        return v


class ClientAuth(Strict):
    client_id: str
    client_secret: str = pydantic.Field(repr=False)
    method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"


class ExchangeSettings(Strict):
    """RFC 8693 token exchange (used when the policy decides `exchange`)."""

    token_endpoint: str | None = None
    client: ClientAuth
    audience: tuple[str, ...] = ()
    resource: tuple[str, ...] = ()
    scope: tuple[str, ...] = ()
    subject_token_type: str = "urn:ietf:params:oauth:token-type:access_token"
    requested_token_type: str | None = "urn:ietf:params:oauth:token-type:access_token"
    timeout: float = pydantic.Field(5.0, gt=0)
    #: an exchanged token is reused until `expires_in` minus this many seconds
    safety_margin: float = pydantic.Field(30.0, ge=0)
    #: a failed exchange is remembered this long (5xx/unreachable: for every request)
    failure_ttl: float = pydantic.Field(5.0, ge=0)

    _lists = pydantic.field_validator("audience", "resource", "scope", mode="before")(_as_list)
    _none = pydantic.field_validator("token_endpoint", "requested_token_type", mode="before")(_empty_to_none)


class IntrospectionSettings(Strict):
    """RFC 7662 introspection for opaque tokens."""

    endpoint: str | None = None
    client: ClientAuth
    cache_ceiling: float = pydantic.Field(60.0, ge=0)
    timeout: float = pydantic.Field(5.0, gt=0)

    _none = pydantic.field_validator("endpoint", mode="before")(_empty_to_none)


class SignIn(Strict):
    """How the gateway signs users in at this IdP when it is the clients' authorization server
    (`authorization_server.mode: proxy` in gateway.yaml)."""

    #: does the IdP honour RFC 8707 `resource` (Keycloak and Nextcloud's oidc app do not)?
    #: Only then is the gateway's resource sent with the authorization and token requests.
    resource_indicators: bool = False
    #: scopes the gateway always asks the IdP for, besides the client's (e.g. openid)
    scopes: tuple[str, ...] = ()
    #: the gateway's own client at the IdP; default: the exchange or introspection client
    client: ClientAuth | None = None

    _lists = pydantic.field_validator("scopes", mode="before")(_as_list)


class DelegateSettings(Strict):
    """What `mode: delegate` forwards: a token for this audience, with these scopes (only those
    the client's own token also has)."""

    audience: tuple[str, ...] = ()
    scope: tuple[str, ...] = ()

    _lists = pydantic.field_validator("audience", "scope", mode="before")(_as_list)


class VaultSettings(Strict):
    """The token vault at this IdP: keep the user's refresh token (`offline_access`) at sign-in,
    and how a stored grant becomes a backend's token."""

    #: ask for `offline_access` at sign-in, and keep the refresh token when the IdP grants it
    offline_access: bool = False
    #: `refresh`: the IdP's refresh grant, down-scoped; the token's audience is the IdP's choice
    #: (Nextcloud: the gateway's client). `exchange`: refresh, then RFC 8693 exchange for the
    #: backend's audience (Keycloak; needs the profile's `exchange` section).
    release: Literal["refresh", "exchange"] = "refresh"
    delegate: DelegateSettings = DelegateSettings()


class Profile(Strict):
    name: str
    description: str = ""
    #: the exact `iss` tokens carry
    issuer: str
    #: where to fetch discovery when it differs from `{issuer}/.well-known/openid-configuration`
    discovery_url: str | None = None
    #: fetch keys here directly (skips discovery)
    jwks_uri: str | None = None
    token_kinds: tuple[Literal["jwt", "opaque"], ...] = ("jwt",)
    #: a JWT that fails verification may be tried as an opaque token (needs `opaque` in token_kinds)
    opaque_fallback: bool = False
    jwt: JwtRules = JwtRules()
    claims: ClaimNames = ClaimNames()
    audience: AudienceRules = AudienceRules()
    mode: Mode = Mode.PASSTHROUGH
    exchange: ExchangeSettings | None = None
    introspection: IntrospectionSettings | None = None
    #: advertised in the protected resource metadata
    scopes_supported: tuple[str, ...] = ()
    sign_in: SignIn = SignIn()
    vault: VaultSettings = VaultSettings()

    _none = pydantic.field_validator("discovery_url", "jwks_uri", mode="before")(_empty_to_none)
    #: policy_view() is built once: it is part of every request's policy input
    _view: dict[str, Any] | None = pydantic.PrivateAttr(default=None)

    @pydantic.field_validator("issuer")
    @classmethod
    def _issuer(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be the issuer URL exactly as tokens carry it in `iss`")
        return v

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> Profile:
        if not self.token_kinds:
            raise ValueError("token_kinds: at least one kind is required")
        if "opaque" in self.token_kinds and self.introspection is None:
            raise ValueError("token_kinds lists opaque: an `introspection` section is required")
        if self.opaque_fallback and "opaque" not in self.token_kinds:
            raise ValueError("opaque_fallback needs opaque in token_kinds")
        if self.mode is Mode.EXCHANGE and self.exchange is None:
            raise ValueError("mode is exchange: an `exchange` section is required")
        if self.vault.release == "exchange" and self.exchange is None:
            raise ValueError("vault.release is exchange: an `exchange` section is required")
        if self.mode is Mode.DELEGATE and not (self.vault.offline_access and self.vault.delegate.audience):
            raise ValueError("mode is delegate: vault.offline_access: true and vault.delegate.audience are required")
        return self

    @property
    def gateway_client(self) -> ClientAuth | None:
        """The gateway's own client at the IdP (sign-in, then exchange, then introspection)."""
        if self.sign_in.client is not None:
            return self.sign_in.client
        if self.exchange is not None:
            return self.exchange.client
        return self.introspection.client if self.introspection is not None else None

    @property
    def discovery_document_url(self) -> str:
        return self.discovery_url or self.issuer.rstrip("/") + "/.well-known/openid-configuration"

    def bind(self, *, resource: str, public_url: str) -> Profile:
        """Fill `{resource}` and `{public_url}` in the audience rules for this gateway."""

        def fill(values: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(v.replace("{resource}", resource).replace("{public_url}", public_url) for v in values)

        rules = self.audience.model_copy(
            update={"accept": fill(self.audience.accept), "reject": fill(self.audience.reject)}
        )
        bound = self.model_copy(update={"audience": rules})
        bound._view = None  # a view built before binding would show the unfilled placeholders
        return bound

    def policy_view(self) -> dict[str, Any]:
        """What the policy sees as `input.profile`: rules and mode, never secrets (built once)."""
        if self._view is None:
            self._view = self._build_view()
        return self._view

    def _build_view(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "issuer": self.issuer,
            "mode": self.mode.value,
            "token_kinds": list(self.token_kinds),
            "audience": {
                "accept": list(self.audience.accept),
                "reject": list(self.audience.reject),
                "match": self.audience.match,
                "missing": self.audience.missing,
            },
            "exchange": None
            if self.exchange is None
            else {"audience": list(self.exchange.audience), "scope": list(self.exchange.scope)},
            "delegate": None
            if self.mode is not Mode.DELEGATE
            else {"audience": list(self.vault.delegate.audience), "scope": list(self.vault.delegate.scope)},
        }


def proxy_client(profile: Profile, config_file: str) -> ClientAuth:
    """The gateway's own client at the IdP, which proxy mode cannot do without."""
    client = profile.gateway_client
    if client is None:
        raise ConfigError(
            f"{config_file}: authorization_server.mode: proxy needs the gateway's own client at the IdP; "
            f"profile {profile.name} has no sign_in.client (nor an exchange or introspection client)"
        )
    return client


def profile_path(ref: str, base_dir: Path) -> Path:
    """A bare name (`keycloak`) is a shipped profile; anything else is a path."""
    if "/" not in ref and not ref.endswith((".yaml", ".yml")):
        path = bundled_dir("profiles") / f"{ref}.yaml"
        if not path.is_file():
            shipped = sorted(p.stem for p in bundled_dir("profiles").glob("*.yaml"))
            raise ConfigError(f"profile: no shipped profile named {ref!r} (shipped: {', '.join(shipped)})")
        return path
    path = Path(ref)
    return path if path.is_absolute() else (base_dir / path).resolve()


def load_profile(ref: str, base_dir: Path, *, resource: str, public_url: str) -> Profile:
    path = profile_path(ref, base_dir)
    profile = validate(Profile, load_yaml(path), path.name)
    return profile.bind(resource=resource, public_url=public_url)
