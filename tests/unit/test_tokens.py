"""JWT verification against a JWKS served over HTTP by the dev issuer (a real server)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx
import pytest
from joserfc import jws
from joserfc.jwk import RSAKey

from gateway.auth.tokens import (
    JwksCache,
    JwtVerifier,
    TokenError,
    VerifiedTokenCache,
    bearer_token,
)
from gateway.config.profiles import Profile


def make_verifier(issuer: Any, http: httpx.AsyncClient, **jwks_kw: Any) -> JwtVerifier:
    profile = Profile.model_validate({"name": "t", "issuer": issuer.issuer, "jwt": {"algorithms": ["RS256"], "leeway": 5}})
    return JwtVerifier(profile, JwksCache(profile, http, **jwks_kw), VerifiedTokenCache(100))


def sign_raw(issuer: Any, payload: bytes | str, header: dict[str, Any] | None = None, key: Any = None) -> str:
    key = key or issuer.signing_key
    hdr = {"alg": "RS256", "kid": key.kid, **(header or {})}
    return jws.serialize_compact(hdr, payload, key, algorithms=[hdr["alg"]])


def claims(issuer: Any, **over: Any) -> str:
    now = int(time.time())
    body = {"iss": issuer.issuer, "sub": "alice", "aud": "x", "exp": now + 600, "iat": now, **over}
    return json.dumps(body)


def b64(obj: Any) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


async def expect(verifier: JwtVerifier, token: str, reason: str) -> TokenError:
    with pytest.raises(TokenError) as info:
        await verifier.verify(token)
    assert info.value.reason == reason, info.value.description
    return info.value


async def test_good_token_verified_and_normalised(issuer) -> None:
    async with httpx.AsyncClient() as http:
        v = make_verifier(issuer, http)
        t = await v.verify(issuer.mint(sub="bob", aud=["a", "b"], scope="notes.read notes.write"))
    assert (t.subject, t.client_id, t.audiences, t.scopes) == ("bob", "dev-client", ("a", "b"), ("notes.read", "notes.write"))
    assert t.kind == "jwt" and t.header["alg"] == "RS256"


async def test_scope_as_array_is_accepted(issuer) -> None:
    async with httpx.AsyncClient() as http:
        t = await make_verifier(issuer, http).verify(sign_raw(issuer, claims(issuer, scope=["a", "b"])))
    assert t.scopes == ("a", "b")


@pytest.mark.parametrize(
    "over,reason",
    [
        ({"aud": 5}, "invalid_claims"),
        ({"aud": {"x": 1}}, "invalid_claims"),
        ({"aud": None}, "invalid_claims"),
        ({"scope": {"a": 1}}, "invalid_claims"),
        ({"exp": "9999999999"}, "invalid_claims"),
        ({"exp": True}, "invalid_claims"),
        ({"sub": 42}, "invalid_claims"),
        ({"nbf": int(time.time()) + 3600}, "not_yet_valid"),
        ({"iss": "http://127.0.0.1:1/other"}, "wrong_issuer"),
        ({"exp": int(time.time()) - 60}, "expired"),
    ],
)
async def test_claims_of_wrong_type_or_time_refused(issuer, over, reason) -> None:
    async with httpx.AsyncClient() as http:
        await expect(make_verifier(issuer, http), sign_raw(issuer, claims(issuer, **over)), reason)


async def test_duplicated_claim_keys_refused(issuer) -> None:
    now = int(time.time())
    payload = f'{{"iss":"{issuer.issuer}","sub":"alice","sub":"admin","exp":{now + 600}}}'
    async with httpx.AsyncClient() as http:
        await expect(make_verifier(issuer, http), sign_raw(issuer, payload), "malformed_token")


async def test_hs256_signed_with_the_public_key_refused(issuer) -> None:
    """The classic key-confusion attack: HMAC keyed by the RSA public key's bytes."""
    import hashlib
    import hmac

    public_pem = issuer.signing_key.as_pem(private=False)
    signing_input = b64({"alg": "HS256", "kid": issuer.signing_key.kid}) + "." + b64(claims(issuer).encode())
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    token = signing_input + "." + b64(mac)
    async with httpx.AsyncClient() as http:
        await expect(make_verifier(issuer, http), token, "disallowed_alg")


@pytest.mark.parametrize(
    "token,reason",
    [
        ("a.b", "unsupported_token_kind"),
        ("a.b.c.d.e", "unsupported_token_kind"),  # JWE compact form
        ("!!!.e30.sig", "malformed_token"),
        (b64([1]) + "." + b64({}) + ".sig", "malformed_token"),
        (b64(b'{"alg":"RS256","alg":"none"}') + "." + b64({}) + ".sig", "malformed_token"),
        ("x" * 65536, "malformed_token"),
    ],
)
async def test_malformed_tokens_refused(issuer, token, reason) -> None:
    async with httpx.AsyncClient() as http:
        await expect(make_verifier(issuer, http), token, reason)


async def test_kid_with_path_and_url_characters_is_just_unknown(issuer) -> None:
    async with httpx.AsyncClient() as http:
        v = make_verifier(issuer, http)
        for kid in ("../../etc/passwd", "http://127.0.0.1:1/jwks", "a\nb"):
            await expect(v, sign_raw(issuer, claims(issuer), {"kid": kid}), "unknown_kid")


async def test_jku_and_x5u_headers_are_never_fetched(issuer) -> None:
    fetched: list[str] = []

    async def record(request: httpx.Request) -> None:
        fetched.append(str(request.url))

    async with httpx.AsyncClient(event_hooks={"request": [record]}) as http:
        v = make_verifier(issuer, http)
        token = sign_raw(issuer, claims(issuer), {"jku": "http://127.0.0.1:9/keys", "x5u": "http://127.0.0.1:9/cert"})
        assert (await v.verify(token)).subject == "alice"
    assert fetched and all(u.startswith(issuer.issuer) for u in fetched)


async def test_unknown_kid_refetch_is_rate_limited(issuer) -> None:
    fetches: list[str] = []

    async def record(request: httpx.Request) -> None:
        if request.url.path == "/jwks":
            fetches.append(str(request.url))

    async with httpx.AsyncClient(event_hooks={"request": [record]}) as http:
        v = make_verifier(issuer, http, refetch_interval=60)
        await v.verify(issuer.mint(aud="x"))
        stranger = RSAKey.generate_key(2048, parameters={"kid": "stranger"})
        for _ in range(5):
            await expect(v, issuer.mint(aud="x", key=stranger), "unknown_kid")
    assert len(fetches) == 1  # the first load; unknown kids within the interval cause no refetch


async def test_key_rotation_picked_up_without_restart(issuer) -> None:
    async with httpx.AsyncClient() as http:
        v = make_verifier(issuer, http, refetch_interval=0)
        await v.verify(issuer.mint(aud="x"))
        issuer.rotate()
        t = await v.verify(issuer.mint(aud="x", sub="after-rotation"))
    assert t.subject == "after-rotation"


async def test_jwks_down_known_keys_keep_working_new_kid_fails_closed(issuer) -> None:
    profile = Profile.model_validate({"name": "t", "issuer": issuer.issuer})
    async with httpx.AsyncClient() as http:
        jwks = JwksCache(profile, http, refetch_interval=0)
        v = JwtVerifier(profile, jwks, VerifiedTokenCache(0))
        await v.verify(issuer.mint(aud="x"))
        jwks.jwks_uri = "http://127.0.0.1:9/unreachable"  # the IdP goes away
        assert (await v.verify(issuer.mint(aud="x", sub="still"))).subject == "still"
        stranger = RSAKey.generate_key(2048, parameters={"kid": "new-at-idp"})
        await expect(v, issuer.mint(aud="x", key=stranger), "unknown_kid")


async def test_no_keys_at_all_is_503(issuer) -> None:
    profile = Profile.model_validate({"name": "t", "issuer": issuer.issuer, "jwks_uri": "http://127.0.0.1:9/jwks"})
    async with httpx.AsyncClient() as http:
        v = JwtVerifier(profile, JwksCache(profile, http), VerifiedTokenCache(10))
        err = await expect(v, issuer.mint(aud="x"), "jwks_unavailable")
    assert err.status == 503


async def test_verified_tokens_cached_until_exp(issuer) -> None:
    async with httpx.AsyncClient() as http:
        cache = VerifiedTokenCache(10)
        profile = Profile.model_validate({"name": "t", "issuer": issuer.issuer})
        v = JwtVerifier(profile, JwksCache(profile, http), cache)
        token = issuer.mint(aud="x")
        first = await v.verify(token)
        second = await v.verify(token)
    assert first is second and cache.hits == 1


@pytest.mark.parametrize(
    "header,expected",
    [(None, None), ("Bearer abc", "abc"), ("bearer abc", "abc"), ("Basic abc", TokenError), ("Bearer", TokenError), ("Bearer a b", TokenError)],
)
def test_bearer_header_parsing(header, expected) -> None:
    if expected is TokenError:
        with pytest.raises(TokenError):
            bearer_token(header)
    else:
        assert bearer_token(header) == expected
