"""The exchange client against the Keycloak-shaped test IdP: cache lifetime and request shape."""

from __future__ import annotations

import time

import httpx
import pytest

from gateway.auth.exchange import ExchangeError, TokenExchanger
from gateway.auth.idp import IssuerMetadata
from gateway.auth.tokens import VerifiedToken, token_hash
from gateway.config.profiles import Profile
from tests.conftest import IDP_CLIENT


def profile(idp, **exchange) -> Profile:
    return Profile.model_validate({
        "name": "kc",
        "issuer": idp.issuer,
        "mode": "exchange",
        "exchange": {"client": {"client_id": IDP_CLIENT[0], "client_secret": IDP_CLIENT[1]}, "audience": ["nextcloud"], **exchange},
    })


def subject(raw: str, expires_at: float) -> VerifiedToken:
    return VerifiedToken("jwt", token_hash(raw), {}, "iss", "alice", None, (), (), expires_at)


async def test_cache_lifetime_is_bounded_by_the_subject_token(keycloak_idp) -> None:
    raw = keycloak_idp.token("ivan")
    p = profile(keycloak_idp)
    async with httpx.AsyncClient() as http:
        ex = TokenExchanger(p.exchange, IssuerMetadata(p, http), http, safety_margin=30)
        soon = time.time() + 5
        got = await ex.exchange(subject(raw, soon), raw, audience=("nextcloud",), scopes=())
        assert got.expires_at == soon  # the IdP said 300 s, the subject token ends sooner
        far = subject(raw + "x", time.time() + 3600)
        got = await ex.exchange(far, raw, audience=("nextcloud",), scopes=())
        assert time.time() + 250 < got.expires_at <= time.time() + 270  # 300 s minus the 30 s margin
        assert ex.requests == 2
        await ex.exchange(far, raw, audience=("nextcloud",), scopes=())
        assert (ex.requests, ex.hits) == (2, 1)


async def test_client_secret_post_and_bad_credentials(keycloak_idp) -> None:
    raw = keycloak_idp.token("judy")
    p = profile(keycloak_idp, client={"client_id": IDP_CLIENT[0], "client_secret": "wrong", "method": "client_secret_post"})
    async with httpx.AsyncClient() as http:
        ex = TokenExchanger(p.exchange, IssuerMetadata(p, http), http)
        with pytest.raises(ExchangeError) as info:
            await ex.exchange(subject(raw, time.time() + 60), raw, audience=("nextcloud",), scopes=())
    assert (info.value.status, info.value.reason) == (502, "exchange_client_rejected")
    assert raw not in info.value.message


async def test_resource_parameter_refused_like_keycloak(keycloak_idp) -> None:
    raw = keycloak_idp.token("kim")
    p = profile(keycloak_idp, resource=["http://backend/api"])
    async with httpx.AsyncClient() as http:
        ex = TokenExchanger(p.exchange, IssuerMetadata(p, http), http)
        with pytest.raises(ExchangeError) as info:
            await ex.exchange(subject(raw, time.time() + 60), raw, audience=("nextcloud",), scopes=())
    assert (info.value.status, info.value.reason) == (403, "exchange_invalid_request")


async def test_unavailable_audience_refused(keycloak_idp) -> None:
    raw = keycloak_idp.token("leo")
    p = profile(keycloak_idp)
    async with httpx.AsyncClient() as http:
        ex = TokenExchanger(p.exchange, IssuerMetadata(p, http), http)
        with pytest.raises(ExchangeError) as info:
            await ex.exchange(subject(raw, time.time() + 60), raw, audience=("payroll",), scopes=())
    assert info.value.status == 403
