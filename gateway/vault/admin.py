"""The operator's side of the vault (`mcp-authz-gateway vault list|revoke|rotate-key|new-key`,
and what `check` says about it). Works on the store directly, beside running gateways, taking
each user's lock as a release does: a revocation here takes effect at their next release
(they check the store before reusing a cached token); a key rotation never overwrites a
token a gateway is rotating.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from gateway.auth.idp import IssuerMetadata
from gateway.config.profiles import Profile, load_profile, proxy_client
from gateway.config.settings import ConfigError, Settings
from gateway.oauth.server import CALLBACK_PATH
from gateway.oauth.signin import IdpSignIn
from gateway.vault.broker import grant_view
from gateway.vault.crypto import Keyring, SealError
from gateway.vault.keeper import revoke_grants, rotate_keys
from gateway.vault.store import Grant, VaultStore, build_vault_store


@dataclass
class VaultAdmin:
    settings: Settings
    profile: Profile
    keyring: Keyring
    store: VaultStore
    signin: IdpSignIn

    async def list(self) -> list[dict[str, object]]:
        return [grant_view(g) for g in await self.store.all()]

    async def revoke(self, subject: str | None, grant_id: str | None) -> tuple[int, int]:
        """Remove the matching grants and revoke each refresh token at the IdP: (removed, confirmed by the IdP)."""
        chosen = [g for g in await self.store.all()
                  if (subject is None or g.subject == subject) and (grant_id is None or g.grant_id == grant_id)]
        confirmed = await revoke_grants(self.store, self.keyring, self.signin, chosen, self.settings.config.vault.lock_timeout)
        return len(chosen), confirmed

    async def rotate(self) -> tuple[int, int, list[str]]:
        return await rotate_keys(self.store, self.keyring, self.settings.config.vault.lock_timeout)

    async def unreadable(self) -> list[Grant]:
        """Grants no configured key opens (a key dropped too early)."""
        bad = []
        for grant in await self.store.all():
            try:
                self.keyring.open(grant.kid, grant.sealed, grant.bound_to)
            except SealError:
                bad.append(grant)
        return bad


@contextlib.asynccontextmanager
async def vault_admin(settings: Settings) -> AsyncIterator[VaultAdmin]:
    """The vault of `settings` (ConfigError when it is not enabled or its keys do not load)."""
    cfg = settings.config
    if not cfg.vault.enabled:
        raise ConfigError(f"{settings.path.name}: vault.enabled: the vault is not enabled in this configuration")
    profile = load_profile(cfg.profile, settings.base_dir, resource=cfg.resource, public_url=cfg.public_url)
    keyring = Keyring.from_config(cfg.vault, settings.base_dir, settings.path.name)
    store = build_vault_store(cfg.vault, settings.base_dir, settings.path.name)
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.authorization_server.idp_timeout), trust_env=False) as http:
        signin = IdpSignIn(profile, proxy_client(profile, settings.path.name), IssuerMetadata(profile, http), http,
                           callback_url=cfg.public_url + CALLBACK_PATH, resource=cfg.resource, timeout=cfg.authorization_server.idp_timeout)
        try:
            yield VaultAdmin(settings, profile, keyring, store, signin)
        finally:
            await store.aclose()
