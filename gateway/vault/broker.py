"""`POST /vault/token` and `/vault/grants`: who asks, what the policy says, what the vault gives.

A backend authenticates with the credentials `gateway.yaml` registers for it (`vault.backends`);
the Rego policy decides on `input.vault` (docs/vault.md); only then does the vault look for
the user. So a backend the policy does not allow gets the same refusal whether or not the user
has a grant: the answer never tells it who is in the vault. Every request is one line of the
decision log (stage `vault`), released or not, and never holds a token.

A user reads and revokes their own grants with their own access token (`GET`/`DELETE
/vault/grants`), verified and audience-checked like a request on the MCP endpoint.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from typing import Any

from gateway.auth.audience import audience_problem
from gateway.auth.tokens import TokenError, TokenVerifier, bearer_token
from gateway.config.profiles import Profile
from gateway.config.settings import Vault as VaultConfig
from gateway.oauth.server import basic_credentials
from gateway.ops.audit import AUDIT_LOGGER, DecisionLog, DecisionRecord
from gateway.ops.metrics import Metrics
from gateway.ops.shadow import compare_shadow
from gateway.policy.decision import Action, PolicyEngine, PolicyError
from gateway.vault.keeper import Vault, VaultError
from gateway.vault.store import Grant

log = logging.getLogger(__name__)
audit = logging.getLogger(AUDIT_LOGGER)

TOKEN_PATH = "/vault/token"
GRANTS_PATH = "/vault/grants"

#: RFC 6749 §3.3 scope-token characters
_SCOPE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,128}")
_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f]+")  # fullmatch: `$` would let a trailing newline through
_MAX_SCOPES = 32


def _text(params: dict[str, Any], name: str, limit: int, *, required: bool = True) -> str:
    value = params.get(name, "")
    if not isinstance(value, str):
        raise VaultError(400, "invalid_request", "vault_bad_request", f"{name} must be a string")
    if required and not value:
        raise VaultError(400, "invalid_request", "vault_bad_request", f"{name} is required")
    if len(value) > limit or (value and not _PRINTABLE.fullmatch(value)):
        raise VaultError(400, "invalid_request", "vault_bad_request", f"{name} is too long or holds control characters")
    return value


def _scopes(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise VaultError(400, "invalid_request", "vault_bad_request", "scope must be a space-separated string")
    if len(value) > _MAX_SCOPES or not all(_SCOPE.fullmatch(v) for v in value):
        raise VaultError(400, "invalid_scope", "vault_bad_request", "scope holds an invalid or too many scope names")
    return tuple(dict.fromkeys(value))


class PolicyRefusal(VaultError):
    """The policy said no (its reason goes to the decision log, not to a metric label)."""


class Broker:
    def __init__(self, vault: Vault, config: VaultConfig, *, profile: Profile, engine: PolicyEngine, verifier: TokenVerifier,
                 decisions: DecisionLog, revision: str, metrics: Metrics, shadow: PolicyEngine | None = None,
                 shadow_revision: str | None = None) -> None:
        self.vault = vault
        self._config = config
        self._profile = profile
        self._engine = engine
        self._verifier = verifier
        self._decisions = decisions
        self._revision = revision
        self._metrics = metrics
        self._shadow = shadow
        self._shadow_revision = shadow_revision

    # --- POST /vault/token ------------------------------------------------------------

    def authenticate(self, params: dict[str, Any], authorization: str | None) -> str:
        """The backend's id (HTTP Basic, or client_id/client_secret in the body, as registered)."""
        try:
            basic = basic_credentials(authorization)
        except ValueError as exc:
            raise VaultError(401, "invalid_client", "vault_client_unauthenticated", str(exc)) from None
        if basic is not None and "client_secret" in params:
            raise VaultError(400, "invalid_request", "vault_bad_request", "use one client authentication method")
        client_id, secret = basic or (params.get("client_id"), params.get("client_secret"))
        backend = self._config.backends.get(client_id) if isinstance(client_id, str) else None
        method = "client_secret_basic" if basic else "client_secret_post"
        if (backend is None or backend.method != method or not isinstance(secret, str)
                or not hmac.compare_digest(secret.encode(), backend.client_secret.encode())):
            raise VaultError(401, "invalid_client", "vault_client_unauthenticated", "client authentication failed")
        assert isinstance(client_id, str)
        return client_id

    async def token(self, params: dict[str, Any], authorization: str | None, address: str) -> dict[str, Any]:
        record = DecisionRecord(path=TOKEN_PATH, stage="vault", requested_by=address, revision=self._revision,
                                shadow_revision=self._shadow_revision)
        status = 200
        try:
            return await self._token(params, authorization, record)
        except VaultError as exc:
            status = exc.status
            if record.stage == "vault":  # refused before the vault was asked
                # the policy's reasons are its own (unbounded): counted as `refused`; the gateway's by name
                self.vault.note_result("refused" if isinstance(exc, PolicyRefusal) else exc.reason)
            record.result = {**(record.result or {}), "outcome": exc.reason, "status": exc.status}
            raise
        except Exception:
            status = 500
            record.result = {**(record.result or {}), "outcome": "internal_error", "status": 500}
            raise
        finally:
            self._decisions.write(record, status=status)
            result = record.result or {}
            audit.info("vault decision id=%s backend=%r sub=%r outcome=%s status=%s", record.decision_id,
                       (record.input or {}).get("vault", {}).get("backend", {}).get("id"),
                       (record.input or {}).get("vault", {}).get("user", {}).get("subject"), result.get("outcome"), status)

    async def _token(self, params: dict[str, Any], authorization: str | None, record: DecisionRecord) -> dict[str, Any]:
        state = self.vault.state
        if (wait := state.blocked_for(record.requested_by or "")) > 0:
            raise VaultError(429, "temporarily_unavailable", "vault_client_blocked",
                             "too many failed authentications from this address; try again later", retry_after=wait)
        try:
            backend = self.authenticate(params, authorization)
        except VaultError:
            state.failed(record.requested_by or "")
            raise
        subject = _text(params, "subject", 256)
        audience = _text(params, "audience", 512)
        scopes = _scopes(params.get("scope", ""))
        reason = _text(params, "reason", self._config.max_reason_chars)
        record.input = policy_input = {
            "vault": {"backend": {"id": backend}, "user": {"issuer": self._profile.issuer, "subject": subject},
                      "audience": audience, "scopes": list(scopes), "reason": reason},
            "profile": self._profile.policy_view(),
        }
        record.engine = self._engine.name
        started = time.perf_counter_ns()
        try:
            decision = await self._engine.decide(policy_input)
        except PolicyError as exc:
            log.error("policy error, vault release refused: %s", exc)
            raise VaultError(503, "temporarily_unavailable", exc.reason, "the authorization policy could not decide") from None
        finally:
            record.eval_ns = time.perf_counter_ns() - started
        record.result = decision.as_dict()
        if self._shadow is not None:
            await compare_shadow(self._shadow, self._metrics, record, policy_input)
        if decision.action is Action.REJECT:
            raise PolicyRefusal(decision.status or 403, "access_denied", decision.reason, "the policy does not allow this release")
        if decision.action is not Action.RELEASE:
            raise VaultError(503, "temporarily_unavailable", "policy_error", "the policy answered a vault request with "
                             f"{decision.action.value}, not release or reject")
        record.stage = "release"
        released = await self.vault.release(self._profile.issuer, subject, audience=decision.audience or (audience,),
                                            scopes=decision.scopes or scopes, used_by=backend)
        record.result = {**record.result, "outcome": "cached" if released.cached else "released", "grant": released.grant_id,
                         "granted_scopes": list(released.scope)}
        return released.answer(time.time())

    # --- /vault/grants ----------------------------------------------------------------

    async def owner(self, authorization: str | None) -> tuple[str, str]:
        """(issuer, subject) of the user's own access token; VaultError 401 otherwise."""
        try:
            raw = bearer_token(authorization)
            if raw is None:
                raise VaultError(401, "invalid_token", "token_missing", "a bearer token is required")
            token = await self._verifier.verify(raw)
        except TokenError as exc:
            raise VaultError(401, "invalid_token", exc.reason, "the token is not valid here") from None
        if audience_problem(self._profile.audience, token) is not None or not token.subject:
            raise VaultError(401, "invalid_token", "audience_not_accepted", "the token is not meant for this gateway")
        return token.issuer, token.subject

    async def grants(self, authorization: str | None) -> dict[str, Any]:
        issuer, subject = await self.owner(authorization)
        return {"subject": subject, "grants": [grant_view(g) for g in await self.vault.grants_of(issuer, subject)]}

    async def revoke(self, authorization: str | None, grant_id: str | None) -> dict[str, Any]:
        issuer, subject = await self.owner(authorization)
        grants = [g for g in await self.vault.grants_of(issuer, subject) if grant_id is None or g.grant_id == grant_id]
        if grant_id is not None and not grants:
            raise VaultError(404, "invalid_request", "vault_no_grant", "no such grant of yours")
        confirmed = await self.vault.revoke(grants)
        log.info("vault: a user revoked %d grant(s)", len(grants))
        return {"revoked": len(grants), "revoked_at_idp": confirmed}


def grant_view(grant: Grant) -> dict[str, Any]:
    """What a user (or an operator) may see of a grant: never the sealed token."""
    return {
        "id": grant.grant_id,
        "issuer": grant.issuer,
        "subject": grant.subject,
        "scope": grant.scope,
        "key_id": grant.kid,
        "created_at": _iso(grant.created_at),
        "refreshed_at": _iso(grant.updated_at),
        "used_by": [{"backend": name, "count": int(use["count"]), "last_used_at": _iso(use["last"])}
                    for name, use in sorted(grant.used_by.items())],
    }


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
