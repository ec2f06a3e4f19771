"""The gateway as its clients' OAuth authorization server (`authorization_server.mode: proxy`).

MCP clients discover the gateway itself (RFC 8414 metadata), register with it (RFC 7591, or
a Client ID Metadata Document), and run the authorization code flow with PKCE against it.
The gateway signs the user in at the IdP with **its own** client (`signin.IdpSignIn`), so
the IdP's tokens carry the audience the profile accepts, then hands the client:
- at the callback, a one-time code of its own, bound to the client, its redirect URI and its
  PKCE challenge (RFC 9207 `iss` included);
- at the token endpoint, the IdP's access token (checked against the profile first) and,
  instead of the IdP's refresh token, a refresh handle of its own, bound to the client and
  rotated on every use; the IdP's refresh token stays sealed in the store.
A replayed code or handle is refused and what it issued is revoked (RFC 9700 §4.14).
Registrations do not cap scopes: a client registered with the first challenge's scope can
still step up to every scope the profile and the policy data name.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote, urlencode, urlsplit

from gateway.auth.tokens import TokenError, TokenVerifier
from gateway.config.profiles import Profile
from gateway.config.settings import AuthorizationServer as AuthorizationServerConfig
from gateway.oauth.clients import Client, MetadataDocuments, OAuthError, Registry
from gateway.oauth.signin import IdpError, IdpSignIn, IdpTokens, s256
from gateway.oauth.store import (
    KeyValueStore,
    build_store,
    key_of,
    seal,
    unseal,
)
from gateway.state.ratelimit import RateLimiter

log = logging.getLogger(__name__)

AUTHORIZE_PATH = "/oauth/authorize"
TOKEN_PATH = "/oauth/token"
REGISTER_PATH = "/oauth/register"
REVOKE_PATH = "/oauth/revoke"
CALLBACK_PATH = "/oauth/callback"

_CHALLENGE = re.compile(r"^[A-Za-z0-9._~-]{43,128}\Z")  # \Z, not $: `$` also matches before a final newline
_VERIFIER = _CHALLENGE
#: IdP errors passed on to the client as they are; anything else becomes server_error
_PASSED_ERRORS = frozenset({"access_denied", "invalid_scope", "login_required", "consent_required", "interaction_required",
                            "temporarily_unavailable"})
_MAX_PARAM = 4_096


def basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """(id, secret) of an `Authorization: Basic` header (RFC 6749 §2.3.1: form-URL-encoded
    before base64), None without one; ValueError when it cannot be read."""
    if not authorization or authorization[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        raise ValueError("malformed Basic credentials") from None
    raw_id, sep, raw_secret = decoded.partition(":")
    if not sep:
        raise ValueError("malformed Basic credentials")
    return unquote(raw_id), unquote(raw_secret)


@dataclass(frozen=True)
class Redirect:
    """Send the browser here (302)."""

    url: str


def single_params(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Request parameters; one sent twice, or an oversized one, is invalid (RFC 6749 §3.1)."""
    out: dict[str, str] = {}
    for name, value in pairs:
        if name in out:
            raise OAuthError("invalid_request", f"the parameter {name[:40]} is given more than once")
        if len(value) > _MAX_PARAM:
            raise OAuthError("invalid_request", f"the parameter {name[:40]} is too long")
        out[name] = value
    return out


def with_query(url: str, params: dict[str, str | None]) -> str:
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return url + ("&" if urlsplit(url).query else "?") + query


class GrantKeeper(Protocol):
    """The token vault (gateway/vault), seen from here: it owns the IdP refresh token of a
    sign-in that asked for `offline_access`, and the client's refresh handle points at it."""

    async def deposit(self, issuer: str, subject: str, refresh_token: str, scope: str | None) -> Any:
        """Store the refresh token; returns the grant (with `grant_id`)."""

    async def refresh_for_client(self, issuer: str, subject: str, grant_id: str, scope: str | None) -> IdpTokens | None:
        """New tokens (no refresh token) for the client, or None when the grant is gone; IdpError when the IdP fails."""

    async def revoke_grant(self, issuer: str, subject: str, grant_id: str) -> None: ...


class OAuthState:
    """What outlives a reload: the store, the registry (with its document cache), rate limits."""

    def __init__(self, config: AuthorizationServerConfig) -> None:
        self.store: KeyValueStore = build_store(config.store)
        documents = MetadataDocuments(config.client_metadata_documents) if config.client_metadata_documents.enabled else None
        self.registry = Registry(self.store, config.registration, documents)
        self.registrations = RateLimiter(config.registration.per_address_per_minute)
        self.authorizations = RateLimiter(config.authorize_per_address_per_minute)


class AuthorizationServer:
    def __init__(
        self,
        *,
        config: AuthorizationServerConfig,
        public_url: str,
        resource: str,
        profile: Profile,
        verifier: TokenVerifier,
        signin: IdpSignIn,
        state: OAuthState,
        known_scopes: tuple[str, ...],
        initial_scopes: tuple[str, ...],
    ) -> None:
        self.config = config
        self.issuer = public_url
        self.resource = resource
        self._profile = profile
        self._verifier = verifier
        self._signin = signin
        self.state = state
        self._store = state.store
        #: every scope the profile and the policy data name; the first challenge's scopes
        self._known = known_scopes
        self._initial = initial_scopes
        #: the token vault, when it keeps this profile's refresh tokens (set by the assembly)
        self.keeper: GrantKeeper | None = None

    # --- metadata ---------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """RFC 8414 authorization server metadata (also served as OpenID discovery)."""
        doc: dict[str, Any] = {
            "issuer": self.issuer,
            "authorization_endpoint": self.issuer + AUTHORIZE_PATH,
            "token_endpoint": self.issuer + TOKEN_PATH,
            "revocation_endpoint": self.issuer + REVOKE_PATH,
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["none", "client_secret_post", "client_secret_basic"],
            "revocation_endpoint_auth_methods_supported": ["none", "client_secret_post", "client_secret_basic"],
            "scopes_supported": list(self._known),
            "authorization_response_iss_parameter_supported": True,
            "client_id_metadata_document_supported": self.state.registry.documents_enabled,
        }
        if self.config.registration.enabled:
            doc["registration_endpoint"] = self.issuer + REGISTER_PATH
        return doc

    # --- registration -----------------------------------------------------------------

    async def register(self, body: bytes, address: str) -> dict[str, Any]:
        if not self.config.registration.enabled:
            raise OAuthError("access_denied", "dynamic registration is disabled here", status=403)
        allowed, retry = self.state.registrations.allow(address)
        if not allowed:
            raise RateLimited(retry)
        answer = await self.state.registry.register(body)
        log.info("client registered: %s… (%s, %s)", answer["client_id"][:8], answer["token_endpoint_auth_method"],
                 answer.get("client_name", "")[:60])
        return answer

    # --- authorize: client → gateway → IdP --------------------------------------------

    async def authorize(self, pairs: Iterable[tuple[str, str]], address: str) -> Redirect:
        """The browser goes to the IdP; errors before the client and its redirect URI are
        known raise OAuthError (shown, never redirected), later ones go back to the client."""
        params = single_params(pairs)
        allowed, retry = self.state.authorizations.allow(address)
        if not allowed:
            raise RateLimited(retry)
        client = await self.state.registry.find(params.get("client_id", ""))
        if client is None:
            raise OAuthError("invalid_client", "the client is not registered here")
        redirect_uri = params.get("redirect_uri") or (client.redirect_uris[0] if len(client.redirect_uris) == 1 else "")
        if not redirect_uri or not client.redirect_allowed(redirect_uri):
            raise OAuthError("invalid_request", "redirect_uri is not registered for this client")
        state = params.get("state")

        def back(error: str, description: str) -> Redirect:
            return Redirect(with_query(redirect_uri, {"error": error, "error_description": description, "state": state, "iss": self.issuer}))

        if params.get("response_type") != "code":
            return back("unsupported_response_type", "only response_type=code is supported")
        challenge = params.get("code_challenge", "")
        if not challenge:
            return back("invalid_request", "PKCE is required: send code_challenge with code_challenge_method=S256")
        if params.get("code_challenge_method") != "S256":
            return back("invalid_request", "code_challenge_method must be S256")
        if not _CHALLENGE.match(challenge):
            return back("invalid_request", "code_challenge is not a valid S256 challenge")
        if "resource" in params and params["resource"].rstrip("/") != self.resource.rstrip("/"):
            return back("invalid_target", "resource must be this gateway's MCP endpoint")
        txn, verifier = secrets.token_urlsafe(32), secrets.token_urlsafe(64)
        scopes = self._idp_scopes(params.get("scope", ""))
        pending = {"client_id": client.client_id, "redirect_uri": redirect_uri, "code_challenge": challenge,
                   "state": state, "scopes": scopes, "verifier": verifier}
        await self._store.put(key_of("signin", txn), seal(txn, "signin", pending), self.config.sign_in_ttl)
        try:
            url = await self._signin.authorize_url(state=txn, verifier=verifier, scopes=scopes, login_hint=params.get("login_hint"))
        except IdpError as exc:
            log.error("sign-in cannot start: %s", exc.description)
            return back("temporarily_unavailable", "the identity provider cannot be reached")
        return Redirect(url)

    def _idp_scopes(self, requested: str) -> list[str]:
        """What the client asked for (or the first challenge's scopes), united with the
        profile's sign-in scopes, limited to what the profile and the policy data know."""
        wanted = requested.split() or list(self._initial)
        allowed = set(self._known) | set(self._profile.sign_in.scopes)
        offline = ["offline_access"] if self.keeper is not None and self._profile.vault.offline_access else []
        return list(dict.fromkeys([*self._profile.sign_in.scopes, *offline, *(s for s in wanted if s in allowed)]))

    # --- callback: IdP → gateway → client ---------------------------------------------

    async def callback(self, pairs: Iterable[tuple[str, str]]) -> Redirect:
        params = single_params(pairs)
        txn = params.get("state", "")
        blob = await self._store.take(key_of("signin", txn)) if txn else None
        pending = unseal(txn, "signin", blob) if blob else None
        if pending is None:
            raise OAuthError("invalid_request", "this sign-in is unknown, was already completed, or expired: start again from the client")

        def back(values: dict[str, str | None]) -> Redirect:
            return Redirect(with_query(pending["redirect_uri"], {**values, "state": pending["state"], "iss": self.issuer}))

        if "iss" in params and params["iss"] != self._profile.issuer:
            log.warning("authorization response from another issuer refused (mix-up)")
            return back({"error": "access_denied", "error_description": "the authorization response came from another issuer"})
        if "error" in params:
            error = params["error"] if params["error"] in _PASSED_ERRORS else "server_error"
            log.info("the IdP refused a sign-in for client %s…: %s", pending["client_id"][:8], params["error"][:60])
            return back({"error": error, "error_description": "the identity provider did not complete the sign-in"})
        if not params.get("code"):
            return back({"error": "server_error", "error_description": "the identity provider sent no code"})
        try:
            tokens = await self._signin.redeem(params["code"], pending["verifier"])
        except IdpError as exc:
            log.warning("the IdP refused the gateway's code redemption: %s", exc.error)
            error = "temporarily_unavailable" if exc.unavailable else "server_error"
            return back({"error": error, "error_description": "the identity provider did not issue a token"})
        try:
            verified = await self._verifier.verify(tokens.access_token)
        except TokenError as exc:
            log.error("the IdP's token is not accepted by profile %s (%s): check the profile and the IdP client",
                      self._profile.name, exc.reason)
            await self._signin.revoke(tokens.refresh_token or tokens.access_token, "refresh_token" if tokens.refresh_token else "access_token")
            return back({"error": "server_error", "error_description": "the identity provider's token is not accepted by this gateway"})
        code = secrets.token_urlsafe(32)
        issued = _tokens_json(tokens)
        vault = None
        if self.keeper is not None and tokens.refresh_token and verified.subject and "offline_access" in pending["scopes"]:
            # the vault owns the refresh token from now on; the client's handle points at it
            grant = await self.keeper.deposit(verified.issuer, verified.subject, tokens.refresh_token, tokens.scope)
            vault, issued["refresh_token"] = [verified.issuer, verified.subject, grant.grant_id], None
        entry = {**pending, "tokens": issued, "family": secrets.token_urlsafe(16), "vault": vault}
        del entry["verifier"]
        await self._store.put(key_of("code", code), seal(code, "code", entry), self.config.code_ttl)
        return back({"code": code})

    # --- token ------------------------------------------------------------------------

    async def token(self, pairs: Iterable[tuple[str, str]], authorization: str | None) -> dict[str, Any]:
        form = single_params(pairs)
        client = await self._authenticate(form, authorization)
        grant = form.get("grant_type", "")
        if grant not in ("authorization_code", "refresh_token"):
            raise OAuthError("unsupported_grant_type", "grant_type must be authorization_code or refresh_token")
        if grant not in client.grant_types:
            raise OAuthError("unauthorized_client", f"this client is not registered for {grant}")
        if grant == "authorization_code":
            return await self._code_grant(client, form)
        return await self._refresh_grant(client, form)

    async def _authenticate(self, form: dict[str, str], authorization: str | None) -> Client:
        try:
            basic_id, basic_secret = basic_credentials(authorization) or (None, None)
        except ValueError as exc:
            raise OAuthError("invalid_client", str(exc), status=401) from None
        if basic_id is not None:
            if "client_secret" in form or form.get("client_id", basic_id) != basic_id:
                raise OAuthError("invalid_request", "use one client authentication method")
        client_id = basic_id or form.get("client_id", "")
        client = await self.state.registry.find(client_id) if client_id else None
        if client is None:
            raise OAuthError("invalid_client", "unknown client", status=401)
        if client.auth_method == "none":
            if basic_secret or form.get("client_secret"):
                raise OAuthError("invalid_client", "this client is registered without a secret", status=401)
            return client
        presented = basic_secret if client.auth_method == "client_secret_basic" else form.get("client_secret")
        if presented is None or not client.secret_matches(presented):
            raise OAuthError("invalid_client", f"client authentication failed ({client.auth_method})", status=401)
        return client

    async def _code_grant(self, client: Client, form: dict[str, str]) -> dict[str, Any]:
        code = form.get("code", "")
        if not code:
            raise OAuthError("invalid_request", "code is required")
        entry, _ = await self._take_once("code", code, "the code")
        tokens = entry["tokens"]
        issued = [[tokens["access_token"], "access_token"]]
        if tokens.get("refresh_token"):
            issued.insert(0, [tokens["refresh_token"], "refresh_token"])
        tombstone = {"family": entry["family"], "revoke": issued, "vault": entry.get("vault")}
        await self._store.put(key_of("used-code", code), seal(code, "used-code", tombstone), max(600.0, self.config.code_ttl * 10))
        if entry["client_id"] != client.client_id:
            log.warning("a code was presented by another client: refused, and what it issued is revoked")
            await self._revoke_family(entry["family"], issued, entry.get("vault"))
            raise OAuthError("invalid_grant", "the code was not issued to this client")
        if form.get("redirect_uri") != entry["redirect_uri"]:
            raise OAuthError("invalid_grant", "redirect_uri does not match the authorization request")
        verifier = form.get("code_verifier", "")
        if not _VERIFIER.match(verifier) or not hmac.compare_digest(s256(verifier), entry["code_challenge"]):
            raise OAuthError("invalid_grant", "PKCE verification failed")
        answer = _answer(tokens)
        if (tokens.get("refresh_token") or entry.get("vault")) and "refresh_token" in client.grant_types:
            answer["refresh_token"] = await self._new_handle(client.client_id, entry["family"], tokens.get("refresh_token"),
                                                             tokens.get("scope"), entry.get("vault"))
        return answer

    async def _refresh_grant(self, client: Client, form: dict[str, str]) -> dict[str, Any]:
        handle = form.get("refresh_token", "")
        if not handle:
            raise OAuthError("invalid_request", "refresh_token is required")
        entry, blob = await self._take_once("refresh", handle, "the refresh token")
        if entry["client_id"] != client.client_id:
            await self._revoke_family(entry["family"], _idp_refresh(entry), entry.get("vault"))
            log.warning("a refresh token was presented by another client; its family is revoked")
            raise OAuthError("invalid_grant", "the refresh token was not issued to this client")
        requested = form.get("scope")
        if requested is not None and not set(requested.split()) <= set((entry.get("scope") or "").split()):
            await self._store.put(key_of("refresh", handle), blob, self.config.refresh_ttl)  # a client mistake: keep it
            raise OAuthError("invalid_scope", "a refresh cannot add scopes: authorize again for more")
        try:
            if entry.get("vault"):  # the vault owns the refresh token: it refreshes, under the user's lock
                assert self.keeper is not None, "a vault handle outlived the vault"
                issuer, subject, grant_id = entry["vault"]
                refreshed = await self.keeper.refresh_for_client(issuer, subject, grant_id, requested or entry.get("scope"))
                if refreshed is None:
                    raise IdpError("invalid_grant", "the grant was revoked")
                tokens = refreshed
            else:
                tokens = await self._signin.refresh(entry["idp_refresh_token"])
        except IdpError as exc:
            if exc.unavailable:
                await self._store.put(key_of("refresh", handle), blob, self.config.refresh_ttl)  # try again later
                raise OAuthError("temporarily_unavailable", "the identity provider cannot be reached", status=503) from None
            await self._store.delete(key_of("family", entry["family"]))
            log.info("the IdP refused a refresh (%s): the refresh token is dead", exc.error)
            raise OAuthError("invalid_grant", "the identity provider no longer accepts this refresh token") from None
        # rotation-aware: a single-use IdP refresh token is replaced by the new one
        idp_refresh = None if entry.get("vault") else tokens.refresh_token or entry["idp_refresh_token"]
        tombstone = {"family": entry["family"], "revoke": [[idp_refresh, "refresh_token"]] if idp_refresh else [], "vault": entry.get("vault")}
        await self._store.put(key_of("used-refresh", handle), seal(handle, "used-refresh", tombstone), self.config.refresh_ttl)
        answer = _answer(_tokens_json(tokens))
        answer["refresh_token"] = await self._new_handle(client.client_id, entry["family"], idp_refresh, tokens.scope or entry.get("scope"),
                                                         entry.get("vault"))
        return answer

    async def _take_once(self, kind: str, secret: str, what: str) -> tuple[dict[str, Any], str]:
        """The entry a code or handle unlocks, taken so nobody gets it twice; a second use
        finds its tombstone (`used-<kind>`) instead and revokes what the first one issued."""
        blob = await self._store.take(key_of(kind, secret))
        entry = unseal(secret, kind, blob) if blob else None
        if entry is None or blob is None:
            await self._replayed(f"used-{kind}", secret)
            raise OAuthError("invalid_grant", f"{what} is invalid, expired or already used")
        return entry, blob

    async def _new_handle(self, client_id: str, family: str, idp_refresh_token: str | None, scope: str | None,
                          vault: list[str] | None = None) -> str:
        """A refresh handle for the client: it holds the IdP refresh token, or points at the
        vault's grant that does (`vault`: issuer, subject, grant id)."""
        handle = secrets.token_urlsafe(32)
        entry = {"client_id": client_id, "family": family, "idp_refresh_token": idp_refresh_token, "scope": scope, "vault": vault}
        await self._store.put(key_of("refresh", handle), seal(handle, "refresh", entry), self.config.refresh_ttl)
        await self._store.put(key_of("family", family), key_of("refresh", handle), self.config.refresh_ttl)
        return handle

    async def _replayed(self, kind: str, secret: str) -> None:
        """A code or handle used twice: revoke what it issued (RFC 9700 §4.14, §4.5)."""
        blob = await self._store.get(key_of(kind, secret))
        tombstone = unseal(secret, kind, blob) if blob else None
        if tombstone is None:
            return
        log.warning("a %s was used twice: refused, and the tokens it issued are revoked", kind.removeprefix("used-"))
        await self._revoke_family(tombstone["family"], tombstone.get("revoke", []), tombstone.get("vault"))

    async def _revoke_family(self, family: str, issued: list[list[str]], vault: list[str] | None = None) -> None:
        """Drop the family's live refresh handle and revoke the IdP tokens (token, hint) it came
        from, and the vault's grant it points at."""
        live = await self._store.take(key_of("family", family))
        if live is not None:
            await self._store.delete(live)
        for token, hint in issued:
            await self._signin.revoke(token, hint)
        if vault and self.keeper is not None:
            await self.keeper.revoke_grant(*vault)

    # --- revocation -------------------------------------------------------------------

    async def revoke(self, pairs: Iterable[tuple[str, str]], authorization: str | None) -> None:
        """RFC 7009: a refresh handle of this client is dropped and its IdP refresh token
        revoked; anything else is passed to the IdP as an access token. Always 200."""
        form = single_params(pairs)
        client = await self._authenticate(form, authorization)
        token = form.get("token", "")
        if not token:
            raise OAuthError("invalid_request", "token is required")
        blob = await self._store.get(key_of("refresh", token))
        entry = unseal(token, "refresh", blob) if blob else None
        if entry is not None:
            if entry["client_id"] == client.client_id:
                await self._store.delete(key_of("refresh", token))
                await self._store.delete(key_of("family", entry["family"]))
                if entry.get("vault") and self.keeper is not None:
                    await self.keeper.revoke_grant(*entry["vault"])
                elif entry.get("idp_refresh_token"):
                    await self._signin.revoke(entry["idp_refresh_token"], "refresh_token")
            return
        if form.get("token_type_hint") != "refresh_token":
            await self._signin.revoke(token, "access_token")


class RateLimited(OAuthError):
    def __init__(self, retry_after: float) -> None:
        super().__init__("temporarily_unavailable", "too many requests from this address; try again later", status=429)
        self.retry_after = max(1, int(retry_after + 0.999))


def _idp_refresh(entry: dict[str, Any]) -> list[list[str]]:
    return [[entry["idp_refresh_token"], "refresh_token"]] if entry.get("idp_refresh_token") else []


def _tokens_json(tokens: IdpTokens) -> dict[str, Any]:
    return {"access_token": tokens.access_token, "expires_in": tokens.expires_in, "scope": tokens.scope,
            "refresh_token": tokens.refresh_token}


def _answer(tokens: dict[str, Any]) -> dict[str, Any]:
    answer: dict[str, Any] = {"access_token": tokens["access_token"], "token_type": "Bearer"}
    if tokens.get("expires_in") is not None:
        answer["expires_in"] = tokens["expires_in"]
    if tokens.get("scope"):
        answer["scope"] = tokens["scope"]
    return answer


def error_json(exc: OAuthError) -> bytes:
    return json.dumps({"error": exc.error, "error_description": exc.description}).encode()
